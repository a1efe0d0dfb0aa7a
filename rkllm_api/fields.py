"""Field checks every surface's wire parser shares: numbers that are numbers (not
booleans, not NaN), 32-bit integers, stop sequences. Each surface names its own
fields and limits; the rules are written once."""
from __future__ import annotations

import math

from rkllm_api.errors import RequestError

INT32_MAX = 2 ** 31 - 1


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stop_sequences(value, param: str, most: int) -> tuple:
    """A string or a list of strings, at most `most` of them; empty ones dropped (an
    empty stop string can never be matched)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RequestError(f"'{param}' must be a string or a list of strings", param=param)
    if len(value) > most:
        raise RequestError(f"'{param}' may hold at most {most} sequences", param=param)
    return tuple(s for s in value if s)
