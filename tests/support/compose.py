"""Docker Compose's variable interpolation, the part docker-compose.yml uses: `${VAR}`
and `${VAR:-default}` (the default used when VAR is unset or empty), defaults that
nest (`${A:-${B:-x}}`). Compose itself is not installed here; this lets tests see the
values Compose would hand Open WebUI for a given env file."""
from __future__ import annotations

import re

# Innermost first: a default holding no "$", "{" or "}" is complete.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")


def interpolate(text: str, variables: dict) -> str:
    while True:
        resolved = _VARIABLE.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), text)
        if resolved == text:
            return resolved
        text = resolved
