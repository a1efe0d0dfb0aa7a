"""Field checks every surface's wire parser shares: numbers that are numbers (not
booleans, not NaN), 32-bit integers, optional strings and booleans, a message's
role, stop sequences. Each surface names its own fields, roles and limits; the
rules are written once."""
from __future__ import annotations

import math

from rkllm_api.errors import RequestError

INT32_MAX = 2 ** 31 - 1


def is_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:   # an integer past any float (400 digits in the JSON): no number
        return False        # a field can use; isfinite() raised, which made it a 500


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


def _param(name: str, where: str) -> str:
    return f"{where}.{name}" if where else name


def optional_bool(body: dict, name: str, default: bool = False, where: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        param = _param(name, where)
        raise RequestError(f"'{param}' must be a boolean", param=param)
    return value


def optional_str(body: dict, name: str, where: str = "") -> str:
    """The string field, "" when absent or null."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        param = _param(name, where)
        raise RequestError(f"'{param}' must be a string", param=param)
    return value


def message_role(raw, index: int, roles: tuple) -> tuple:
    """(where, role) of messages[index]: an object whose role is one of `roles`."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise RequestError(f"'{where}' must be an object", param="messages")
    role = raw.get("role")
    if role not in roles:
        raise RequestError(f"'{where}.role' must be one of {', '.join(roles)}",
                           param=f"{where}.role")
    return where, role
