"""Shared by the sim engine's tool tests: a JSON-schema validator for the subset the sim engine generates
(jsonschema is not a dependency; this checks every keyword the generator claims to honour)."""

from __future__ import annotations

import math
from typing import Any

import pytest


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        node = node[int(part)] if isinstance(node, list) else node[part.replace("~1", "/").replace("~0", "~")]
    return node


_TYPES = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
          "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}


def schema_errors(value: Any, schema: Any, root: Any = None, path: str = "$") -> list[str]:
    """Why `value` is not valid against `schema` (empty: valid)."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{path}: schema false"]
    errs: list[str] = []
    if "$ref" in schema:
        errs += schema_errors(value, _resolve(root, schema["$ref"]), root, path)
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: {value!r} != const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in enum")
    for sub in schema.get("allOf", []):
        errs += schema_errors(value, sub, root, path)
    if "anyOf" in schema and not any(not schema_errors(value, s, root, path) for s in schema["anyOf"]):
        errs.append(f"{path}: matches no anyOf branch")
    if "oneOf" in schema and sum(not schema_errors(value, s, root, path) for s in schema["oneOf"]) != 1:
        errs.append(f"{path}: does not match exactly one oneOf branch")
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_TYPES[x](value) for x in types):
            return errs + [f"{path}: {value!r} is not {t}"]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for r in schema.get("required", []):
            if r not in value:
                errs.append(f"{path}: missing required {r!r}")
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += schema_errors(v, props[k], root, f"{path}.{k}")
            elif extra is False:
                errs.append(f"{path}: additional property {k!r}")
            elif isinstance(extra, dict):
                errs += schema_errors(v, extra, root, f"{path}.{k}")
        if len(value) < schema.get("minProperties", 0) or len(value) > schema.get("maxProperties", math.inf):
            errs.append(f"{path}: {len(value)} properties out of bounds")
    if isinstance(value, list):
        prefix = schema.get("prefixItems", [])
        for i, v in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items", True)
            errs += schema_errors(v, sub, root, f"{path}[{i}]")
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            errs.append(f"{path}: {len(value)} items out of bounds")
        if schema.get("uniqueItems") and any(value[i] in value[:i] for i in range(len(value))):
            errs.append(f"{path}: items not unique")
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            errs.append(f"{path}: length {len(value)} out of bounds")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{path}: {value} < minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{path}: {value} > maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errs.append(f"{path}: {value} <= exclusiveMinimum")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            errs.append(f"{path}: {value} >= exclusiveMaximum")
        if "multipleOf" in schema:
            q = value / schema["multipleOf"]
            if abs(q - round(q)) > 1e-9:
                errs.append(f"{path}: {value} not a multiple of {schema['multipleOf']}")
    return errs


@pytest.fixture(scope="session")
def validate():
    """validate(value, schema) -> list of errors (empty: valid)."""
    return schema_errors
