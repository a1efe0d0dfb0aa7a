"""Structured output: the JSON an answer must be, checked once and enforced per run.

A surface turns OpenAI's `response_format` or Ollama's `format` into a
request.ResponseFormat; contract_for() turns that into an OutputContract, or refuses
the request (400) naming every schema feature the server cannot enforce. The
contract then serves the whole request path:

  instruction()   what the system prompt tells the model to write;
  grammar_text    the schema the CPU runtime compiles into a llama.cpp grammar
                  (RunRequest.response_schema), so decoding cannot leave it;
  check(text)     parse + validate (jsonschema): None, or why the answer is unusable;
                  every runtime's answer goes through it (the NPU has no grammar).

What is supported is what the grammar enforces exactly, so that an answer decoded
under it always validates: types, properties / required / additionalProperties,
items / prefixItems / minItems / maxItems, enum, const, anyOf, local $ref with $defs
or definitions, minLength / maxLength, and format date, time, date-time, uuid. Other
formats are annotations (JSON Schema's default, and jsonschema's), like title,
description, default and examples. Numeric bounds, oneOf, allOf, not, if/then/else,
pattern, uniqueItems and the other keywords in UNSUPPORTED are refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import jsonschema

from rkllm_api.errors import RequestError
from rkllm_api.request import ResponseFormat

MAX_SCHEMA_BYTES = 32 * 1024
MAX_DEPTH = 24
# The grammar spells a bound out as nested optional groups; llama.cpp's grammar
# parser gives up somewhere between 1000 and 4000 levels.
MAX_BOUND = 512
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
ENFORCED_FORMATS = ("date", "time", "date-time", "uuid")
JSON_OBJECT_SCHEMA = {"type": "object"}

# Keyword -> what to say about it.
UNSUPPORTED = {
    "minimum": "numeric bounds", "maximum": "numeric bounds",
    "exclusiveMinimum": "numeric bounds", "exclusiveMaximum": "numeric bounds",
    "multipleOf": "numeric bounds",
    "oneOf": "use anyOf", "allOf": "inline the schemas", "not": "",
    "if": "", "then": "", "else": "",
    "pattern": "", "patternProperties": "", "propertyNames": "",
    "minProperties": "", "maxProperties": "",
    "dependentRequired": "", "dependentSchemas": "", "dependencies": "",
    "uniqueItems": "", "contains": "", "minContains": "", "maxContains": "",
    "unevaluatedProperties": "", "unevaluatedItems": "",
    "$dynamicRef": "", "$recursiveRef": "", "$anchor": "",
}
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
# Keywords that constrain a value (the rest are annotations). The grammar follows a
# $ref, an anyOf or a list of types alone, so these may not stand beside them.
_CONSTRAINTS = ("type", "properties", "required", "additionalProperties", "items",
                "prefixItems", "minItems", "maxItems", "enum", "const", "minLength",
                "maxLength")
_BOUNDS = (("minItems", "maxItems"), ("minLength", "maxLength"))


class _SchemaCheck:
    """Walks a schema and collects every problem as "<what> at <JSON pointer>"."""

    def __init__(self, root: dict):
        self.root = root
        self.problems: list = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{message} at {path or '#'}")

    def visit(self, node, path: str, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            self.add(path, f"nesting deeper than {MAX_DEPTH} levels")
            return
        if not isinstance(node, dict):
            self.add(path, "a schema that is not an object")
            return
        for key in node:
            if key in UNSUPPORTED:
                hint = UNSUPPORTED[key]
                self.add(path, f"'{key}'" + (f" ({hint})" if hint else ""))
        self._check_type(node, path)
        self._check_values(node, path)
        self._check_bounds(node, path)
        self._check_object(node, path)
        self._check_ref(node, path)
        self._check_alone(node, path)
        for name, child in self._children(node, path):
            self.visit(child, name, depth + 1)

    def _children(self, node: dict, path: str):
        for key in _SUBSCHEMA_MAPS:
            members = node.get(key)
            if members is None:
                continue
            if not isinstance(members, dict):
                self.add(f"{path}/{key}", f"'{key}' that is not an object")
                continue
            for name, child in members.items():
                yield f"{path}/{key}/{_escape(name)}", child
        items = node.get("items")
        if items is not None:
            yield f"{path}/items", items
        for key in ("prefixItems", "anyOf"):
            members = node.get(key)
            if members is None:
                continue
            if not isinstance(members, list) or not members:
                self.add(f"{path}/{key}", f"'{key}' that is not a non-empty list")
                continue
            for i, child in enumerate(members):
                yield f"{path}/{key}/{i}", child
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            yield f"{path}/additionalProperties", extra
        elif extra is not None and not isinstance(extra, bool):
            self.add(f"{path}/additionalProperties", "'additionalProperties' that is "
                                                     "neither a boolean nor a schema")

    def _check_type(self, node: dict, path: str) -> None:
        kind = node.get("type")
        if kind is None:
            return
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(k not in TYPES for k in kinds):
            self.add(f"{path}/type", f"'type' {json.dumps(kind)} (known: {', '.join(TYPES)})")

    def _check_values(self, node: dict, path: str) -> None:
        enum = node.get("enum")
        if enum is not None and (not isinstance(enum, list) or not enum):
            self.add(f"{path}/enum", "'enum' that is not a non-empty list")
        fmt = node.get("format")
        if fmt is not None and not isinstance(fmt, str):
            self.add(f"{path}/format", "'format' that is not a string")

    def _check_bounds(self, node: dict, path: str) -> None:
        for low_key, high_key in _BOUNDS:
            low, high = node.get(low_key), node.get(high_key)
            for key, value in ((low_key, low), (high_key, high)):
                if value is not None and (not _is_count(value) or value > MAX_BOUND):
                    self.add(f"{path}/{key}", f"'{key}' that is not an integer "
                                              f"from 0 to {MAX_BOUND}")
            if _is_count(low) and _is_count(high) and low > high:
                self.add(path, f"'{low_key}' above '{high_key}'")

    def _check_object(self, node: dict, path: str) -> None:
        required = node.get("required")
        if required is None:
            return
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            self.add(f"{path}/required", "'required' that is not a list of names")
            return
        known = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        missing = [name for name in required if name not in known]
        if missing:
            # The grammar writes only listed properties: such a name could never appear.
            self.add(f"{path}/required", "'required' naming properties not in 'properties' "
                                         f"({', '.join(missing)})")

    def _check_alone(self, node: dict, path: str) -> None:
        for key, label in (("$ref", "'$ref'"), ("anyOf", "'anyOf'")):
            if key in node and any(k in node for k in _CONSTRAINTS):
                self.add(path, f"{label} beside other constraints (move them into it)")
                return
        if isinstance(node.get("type"), list) and len(node["type"]) > 1 and \
                any(k in node for k in _CONSTRAINTS if k != "type"):
            self.add(path, "a list of types beside other constraints (use anyOf)")

    def _check_ref(self, node: dict, path: str) -> None:
        ref = node.get("$ref")
        if ref is None:
            return
        if not isinstance(ref, str) or not ref.startswith("#/"):
            self.add(f"{path}/$ref", "a '$ref' outside this schema (only '#/...' works)")
            return
        target = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                self.add(f"{path}/$ref", f"a '$ref' that points nowhere ({ref})")
                return
            target = target[part]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _escape(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def schema_problems(schema: dict) -> list:
    """Every feature of `schema` the server cannot enforce, as readable phrases."""
    check = _SchemaCheck(schema)
    check.visit(schema, "#")
    return check.problems


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n(.*)\n[ \t]*```$", re.DOTALL)


def strip_fence(text: str) -> str:
    """The answer without surrounding whitespace and without one Markdown code fence
    wrapped around all of it (models that were told "JSON" like to add one)."""
    text = text.strip()
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text


@dataclass(frozen=True)
class OutputContract:
    """What one request's answer must be. `schema`: what it is validated against;
    `grammar_schema`: what constrained decoding uses (the same, or narrower: a task
    caps its strings so the answer fits its token budget); `fallback`: an answer
    that validates, given when two attempts failed (None: refuse instead)."""
    schema: dict
    described: bool = True          # a json_schema (shown to the model) vs plain JSON mode
    grammar_schema: Optional[dict] = None
    fallback: Optional[str] = None
    name: str = ""

    @property
    def grammar_text(self) -> str:
        return json.dumps(self.grammar_schema or self.schema, ensure_ascii=False)

    @cached_property
    def _validator(self):
        kind = jsonschema.validators.validator_for(self.schema,
                                                   default=jsonschema.Draft202012Validator)
        return kind(self.schema)

    def instruction(self) -> str:
        """The system-prompt text that asks for the JSON."""
        if not self.described:
            return ("Answer with one JSON object and nothing else: no explanation "
                    "before or after it, no Markdown code fence.")
        schema = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))
        return ("Answer with JSON only, with no explanation before or after it and no "
                "Markdown code fence. The JSON must be valid against this JSON Schema:\n"
                + schema)

    def check(self, text: str) -> tuple:
        """(None, the cleaned answer) when it parses and validates, else (why not, text)."""
        cleaned = strip_fence(text)
        if not cleaned:
            return "the answer is empty", text
        try:
            value = json.loads(cleaned)
        except ValueError as exc:
            reason = getattr(exc, "msg", str(exc))
            where = getattr(exc, "pos", None)
            return (f"it is not valid JSON ({reason}"
                    + (f" at character {where}" if where is not None else "") + ")"), text
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        if error is not None:
            return f"{error.message} (at {error.json_path})", text
        return None, cleaned

    @staticmethod
    def retry_request(error: str) -> str:
        """The user turn that follows a rejected answer in the one retry."""
        return (f"That answer cannot be used: {error}. Reply again with only the "
                "corrected JSON.")


def contract_for(response_format: ResponseFormat, param: str) -> Optional[OutputContract]:
    """The contract a request's response format asks for; None for plain text.
    RequestError (400, `param` named) when the schema cannot be enforced."""
    if response_format.kind == "text":
        return None
    if response_format.kind == "json_object":
        return OutputContract(JSON_OBJECT_SCHEMA, described=False, name="json_object")
    schema = response_format.schema or {}
    if not schema:
        # An empty schema accepts any JSON; JSON mode's object is the useful reading.
        return OutputContract(JSON_OBJECT_SCHEMA, described=False, name=response_format.name)
    check_schema(schema, param)
    return OutputContract(schema, described=True, name=response_format.name)


def check_schema(schema: dict, param: str) -> None:
    """400 naming everything wrong with a schema the request gave."""
    size = len(json.dumps(schema, ensure_ascii=False).encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise RequestError(f"'{param}': the JSON schema is {size} bytes; at most "
                           f"{MAX_SCHEMA_BYTES} are supported", param=param)
    try:
        problems = schema_problems(schema)
    except RecursionError:
        problems = [f"nesting deeper than {MAX_DEPTH} levels"]
    if problems:
        raise RequestError(f"'{param}': the JSON schema uses what structured output cannot "
                           f"enforce: {'; '.join(problems)}", param=param,
                           code="unsupported_schema")
    kind = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        kind.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise RequestError(f"'{param}': not a valid JSON schema: {exc.message} "
                           f"(at {exc.json_path})", param=param) from None


def capped_schema(schema, string_chars: int, array_items: int):
    """A copy of `schema` whose strings and arrays without an upper bound get one.
    Every answer it admits is valid against the original; decoding under it fits a
    small token budget (a grammar will not end a string the model keeps writing)."""
    if not isinstance(schema, dict):
        return schema

    def cap(child):
        return capped_schema(child, string_chars, array_items)

    capped = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            capped[key] = {name: cap(child) for name, child in schema[key].items()}
    for key in ("prefixItems", "anyOf"):
        if isinstance(schema.get(key), list):
            capped[key] = [cap(child) for child in schema[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            capped[key] = cap(schema[key])
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    free = not any(k in schema for k in ("enum", "const", "format", "$ref"))
    if "string" in kinds and free and "maxLength" not in schema:
        capped["maxLength"] = max(string_chars, schema.get("minLength", 0))
    if "array" in kinds and free and "maxItems" not in schema and "prefixItems" not in schema:
        capped["maxItems"] = max(array_items, schema.get("minItems", 0))
    return capped
