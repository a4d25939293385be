"""Tool calls and structured output of the simulated engine: request validation, the seeded decision, and
values generated for a JSON schema.

What a chat request gets (tools given, OpenAI chat-completions format):
  tool_choice "none"              never a tool call;
  tool_choice "required"          always a tool call (a seeded choice of tool);
  tool_choice {"type": "function", "function": {"name": X}}   always one call of X (X not in tools: 400);
  tool_choice "auto" or absent    a tool call with probability P × 0.5^k, drawn from the engine's seeded
                                  generator: P is the request header `X-Sim-Tool-Rate` (0..1) or the engine's
                                  `--tool-call-rate` (default 0.5); k is the number of tool rounds already in
                                  the conversation (runs of consecutive `tool` messages). So a ReAct loop
                                  answers its first step with a tool call at rate P, and after each round of
                                  tool results the rate halves: the loop ends (expected rounds ≤ 2P).
  A tool call is one call, or 1–2 (seeded) when `parallel_tool_calls` is true; its arguments are a value
  generated for the tool's `parameters` schema, as compact JSON.
Otherwise the answer is content: `response_format` {"type": "json_object"} gives a JSON object,
{"type": "json_schema", "json_schema": {"name", "schema"}} a value valid against the schema; without a
response_format (or "text") it is the engine's usual text.

Token counts: a tool call's generated text is its name and its arguments (chars ÷ 4, rounded up, over the
calls together); JSON content is its text, the same rule. The modelled generation is that many tokens,
capped by max_tokens (or the context left): a cut answer carries finish_reason "length" and the text (the
arguments) cut at 4 × max_tokens characters, as OpenAI's is cut. Streamed, token k carries characters
[4(k-1), 4k) of that text: a call's first delta has index, id, type, the whole name and empty arguments,
then argument fragments follow.

Generated values: object (required always, optional properties half the time, additionalProperties and
min/maxProperties honoured), string (enum, const, minLength/maxLength, a few formats; `pattern` is not
honoured), integer/number (minimum/maximum, exclusive bounds, multipleOf), boolean, null, array (items,
prefixItems, minItems/maxItems, uniqueItems best effort), anyOf/oneOf (the first branch), allOf (merged),
$ref to "#/..." (e.g. $defs). Other keywords are ignored. Size is bounded: a schema of at most
MAX_SCHEMA_CHARS characters nested at most MAX_SCHEMA_DEPTH deep, a value at most MAX_VALUE_DEPTH deep with
at most MAX_VALUE_NODES nodes and MAX_VALUE_CHARS characters of strings; past these the request is a 400.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from scepsy_hpc.engine.openai_protocol import CHARS_PER_TOKEN, ApiError, text_tokens

TOOL_RATE_HEADER = "X-Sim-Tool-Rate"
DEFAULT_TOOL_RATE = 0.5
ROUND_DECAY = 0.5  # each round of tool results already in the conversation halves the rate: loops end
MAX_SCHEMA_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = 64
MAX_VALUE_DEPTH = 16
SOFT_VALUE_DEPTH = 4  # below this only what the schema requires is generated: recursive schemas stay finite
MAX_VALUE_NODES = 10_000
MAX_VALUE_CHARS = 256 * 1024
MAX_REF_CHAIN = 32
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_WORDS = ("alpha", "search", "paris", "report", "weather", "query", "result", "note", "value", "item")
_FORMATS = {"date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "time": "12:00:00", "email": "user@example.com",
            "uri": "https://example.com/", "url": "https://example.com/", "hostname": "example.com",
            "uuid": "123e4567-e89b-42d3-a456-426614174000", "ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}


@dataclass(frozen=True)
class Tool:
    """One function the client offers: its name and its parameters schema."""

    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class StructuredSpec:
    """What a chat request asks of tools and output format, validated."""

    tools: tuple[Tool, ...]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None
    parallel: bool
    rate: float | None  # the X-Sim-Tool-Rate header; None: the engine's default
    format: str | None  # None | "json_object" | "json_schema"
    schema: dict[str, Any] | None


@dataclass(frozen=True)
class ToolCall:
    """One generated call."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class StructuredOutput:
    """A generated answer that is tool calls or JSON content, and how it is cut and streamed."""

    calls: tuple[ToolCall, ...] = ()
    content: str | None = None

    @property
    def text(self) -> str:
        """The generated text the token count is taken of."""
        if self.calls:
            return "".join(c.name + c.arguments for c in self.calls)
        return self.content or ""

    @property
    def tokens(self) -> int:
        """The answer's output tokens (at least 1)."""
        return max(1, text_tokens(self.text))

    @property
    def finish_reason(self) -> str:
        """The finish reason of the whole answer."""
        return "tool_calls" if self.calls else "stop"

    def _spans(self) -> list[tuple[int, int, int]]:
        """(call index, start, end) of each call's name + arguments in `text`."""
        out, pos = [], 0
        for i, c in enumerate(self.calls):
            out.append((i, pos, pos + len(c.name) + len(c.arguments)))
            pos = out[-1][2]
        return out

    def message(self, n_tokens: int) -> dict[str, Any]:
        """The assistant message of the first n_tokens tokens (all of them: the whole answer)."""
        limit = n_tokens * CHARS_PER_TOKEN
        if not self.calls:
            return {"role": "assistant", "content": (self.content or "")[:limit], "tool_calls": []}
        calls = []
        for (i, start, _), c in zip(self._spans(), self.calls):
            if start >= limit:
                break
            args = c.arguments[:max(0, limit - start - len(c.name))]
            calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
        return {"role": "assistant", "content": None, "tool_calls": calls}

    def deltas(self, k: int) -> list[dict[str, Any]]:
        """The stream deltas of token k (1-based): characters [4(k-1), 4k) of the text."""
        lo, hi = (k - 1) * CHARS_PER_TOKEN, k * CHARS_PER_TOKEN
        if not self.calls:
            frag = (self.content or "")[lo:hi]
            return [{"content": frag}] if frag else []
        out: list[dict[str, Any]] = []
        for (i, start, end), c in zip(self._spans(), self.calls):
            if end <= lo or start >= hi:
                continue
            if lo <= start:  # the call's first character: its header, name whole
                out.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                            "function": {"name": c.name, "arguments": ""}}]})
            a0 = start + len(c.name)
            frag = c.arguments[max(lo, a0) - a0:max(0, min(hi, end) - a0)]
            if frag:
                out.append({"tool_calls": [{"index": i, "function": {"arguments": frag}}]})
        return out


# --- request validation --------------------------------------------------------------------------------------


def parse_structured(body: dict[str, Any], rate_header: str | None) -> StructuredSpec | None:
    """The tools, tool_choice and response_format of a chat request (None: it asks for neither); ApiError 400
    for a malformed one."""
    tools = _parse_tools(body.get("tools"))
    choice, named = _parse_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, f"'parallel_tool_calls' must be a boolean; got {parallel!r}")
    fmt, schema = _parse_format(body.get("response_format"))
    rate = _parse_rate(rate_header)
    if not tools and fmt is None:
        return None
    return StructuredSpec(tools, choice, named, bool(parallel), rate, fmt, schema)


def _parse_tools(tools: Any) -> tuple[Tool, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ApiError(400, f"'tools' must be a list of {{\"type\": \"function\", \"function\": {{...}}}} objects; "
                            f"got {type(tools).__name__}")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(400, f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'; got {name!r}")
        if any(o.name == name for o in out):
            raise ApiError(400, f"tools[{i}].function.name {name!r} is given twice; tool names must be unique")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object; got {type(params).__name__}")
        check_schema(params, f"tools[{i}].function.parameters")
        out.append(Tool(name, params))
    return tuple(out)


def _parse_choice(choice: Any, tools: tuple[Tool, ...]) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise ApiError(400, "tool_choice 'required' needs 'tools'; give tools or drop tool_choice")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        if name not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools) or "none: no tools given"
            raise ApiError(400, f"tool_choice names function {name!r}, which is not in 'tools' (known: {known})")
        return "named", name
    raise ApiError(400, f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", \"function\": "
                        f"{{\"name\": ...}}}}; got {choice!r}")


def _parse_format(fmt: Any) -> tuple[str | None, dict[str, Any] | None]:
    if fmt is None:
        return None, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        return "json_object", {"type": "object"}
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str):
            raise ApiError(400, "response_format json_schema needs 'json_schema': {\"name\": ..., \"schema\": {...}}")
        schema = js.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ApiError(400, f"response_format.json_schema.schema must be a JSON schema object; got {type(schema).__name__}")
        check_schema(schema, "response_format.json_schema.schema")
        return "json_schema", schema
    raise ApiError(400, f"response_format type {kind!r} is not known; use 'text', 'json_object' or 'json_schema'")


def _parse_rate(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        rate = float(header)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:  # also refuses nan
        raise ApiError(400, f"{TOOL_RATE_HEADER}: {header!r} must be a number from 0 to 1 (the tool-call rate)")
    return rate


def check_schema(schema: dict[str, Any], where: str) -> None:
    """Refuse (400) a schema larger than MAX_SCHEMA_CHARS or nested deeper than MAX_SCHEMA_DEPTH."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ApiError(400, f"{where} nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children)
    size = len(json.dumps(schema))  # after the depth check: a deep schema would hit the encoder's recursion limit
    if size > MAX_SCHEMA_CHARS:
        raise ApiError(400, f"{where} is {size} characters of JSON; the simulated engine takes at most {MAX_SCHEMA_CHARS}")


# --- the decision --------------------------------------------------------------------------------------------


def tool_rounds(messages: list[Any]) -> int:
    """Rounds of tool results in a conversation: runs of consecutive `tool` (or legacy `function`) messages."""
    rounds, prev = 0, False
    for m in messages:
        is_tool = isinstance(m, dict) and m.get("role") in ("tool", "function")
        rounds += is_tool and not prev
        prev = is_tool
    return rounds


def draw(spec: StructuredSpec, messages: list[Any], rng: random.Random, default_rate: float) -> StructuredOutput | None:
    """The answer to a request: tool calls, JSON content, or None (the engine's plain text)."""
    call = False
    if spec.tools and spec.choice in ("required", "named"):
        call = True
    elif spec.tools and spec.choice == "auto":
        rate = (default_rate if spec.rate is None else spec.rate) * ROUND_DECAY ** tool_rounds(messages)
        call = rng.random() < rate
    if call:
        if spec.choice == "named":
            chosen = [next(t for t in spec.tools if t.name == spec.named)]
        else:
            n = rng.randint(1, 2) if spec.parallel else 1
            chosen = [rng.choice(spec.tools) for _ in range(n)]
        calls = tuple(ToolCall(f"call_{rng.getrandbits(96):024x}", t.name, _dumps(generate(t.parameters, rng)))
                      for t in chosen)
        return StructuredOutput(calls=calls)
    if spec.format is not None:
        assert spec.schema is not None
        return StructuredOutput(content=_dumps(generate(spec.schema, rng)))
    return None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- values for a schema -------------------------------------------------------------------------------------


def generate(schema: Any, rng: random.Random) -> Any:
    """A value valid against `schema` (the subset in the module docstring); ApiError 400 when none can be made
    within the bounds."""
    return _Generator(schema, rng).value(schema, 0, "#")


def _num(x: Any) -> float | None:
    """A finite JSON number, else None (bools and infinities are no bounds)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return x


def _count(x: Any) -> int | None:
    """A non-negative integer keyword (minItems, maxLength, …), else None."""
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


class _Generator:
    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.nodes = 0
        self.chars = 0

    def fail(self, path: str, why: str) -> ApiError:
        return ApiError(400, f"the simulated engine cannot generate a value for the schema at {path}: {why}")

    def resolve(self, schema: dict[str, Any], path: str) -> dict[str, Any]:
        for _ in range(MAX_REF_CHAIN):
            ref = schema.get("$ref")
            if not isinstance(ref, str):
                return schema
            if not ref.startswith("#"):
                raise self.fail(path, f"$ref {ref!r} is not local; only '#/...' references are resolved")
            target: Any = self.root
            for part in [p for p in ref[1:].split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise self.fail(path, f"$ref {ref!r} points at nothing")
            if target is True:
                target = {}
            if not isinstance(target, dict):
                raise self.fail(path, f"$ref {ref!r} is not a schema")
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        raise self.fail(path, f"$ref chains longer than {MAX_REF_CHAIN}")

    def value(self, schema: Any, depth: int, path: str, hops: int = 0) -> Any:
        self.nodes += 1
        if hops > MAX_REF_CHAIN:
            raise self.fail(path, f"anyOf/oneOf/allOf/$ref nest more than {MAX_REF_CHAIN} deep without a value")
        if self.nodes > MAX_VALUE_NODES:
            raise self.fail(path, f"the value would have more than {MAX_VALUE_NODES} parts (minItems, required)")
        if depth > MAX_VALUE_DEPTH:
            raise self.fail(path, f"it requires values nested deeper than {MAX_VALUE_DEPTH} (required recursion?)")
        if schema is False:
            raise self.fail(path, "the schema false admits no value")
        if not isinstance(schema, dict):
            schema = {}
        schema = self.resolve(schema, path)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self.rng.choice(enum)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                first = branches[0] if isinstance(branches[0], dict) else {}
                return self.value({**rest, **self.resolve(first, path)}, depth, f"{path}/{key}/0", hops + 1)
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            return self.value(self.merge(schema, all_of, path), depth, path, hops + 1)
        kind = _type_of(schema)
        if kind == "object":
            return self.object(schema, depth, path)
        if kind == "array":
            return self.array(schema, depth, path)
        if kind == "integer":
            return self.integer(schema, path)
        if kind == "number":
            return self.number(schema, path)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self.string(schema, path)

    def merge(self, schema: dict[str, Any], parts: list[Any], path: str) -> dict[str, Any]:
        out = {k: v for k, v in schema.items() if k != "allOf"}
        props = dict(_dict(out.get("properties")))
        required = list(_names(out.get("required")))
        for part in parts:
            part = self.resolve(part, path) if isinstance(part, dict) else {}
            props.update(_dict(part.get("properties")))
            required += [r for r in _names(part.get("required")) if r not in required]
            out.update({k: v for k, v in part.items() if k not in ("properties", "required")})
        if props:
            out["properties"] = props
        if required:
            out["required"] = required
        return out

    def object(self, schema: dict[str, Any], depth: int, path: str) -> dict[str, Any]:
        props = _dict(schema.get("properties"))
        required = _names(schema.get("required"))
        extra = schema.get("additionalProperties", True)
        keys = list(required)
        optional = [k for k in props if k not in keys]
        shallow = depth < SOFT_VALUE_DEPTH
        keys += [k for k in optional if shallow and self.rng.random() < 0.5]
        lo, hi = _count(schema.get("minProperties")) or 0, _count(schema.get("maxProperties"))
        if hi is not None and len(required) > hi:
            raise self.fail(path, f"{len(required)} required properties > maxProperties {hi}")
        if hi is not None:
            keys = keys[:hi]
        for k in optional:
            if len(keys) >= lo:
                break
            if k not in keys:
                keys.append(k)
        i = 0
        while len(keys) < lo:
            if extra is False:
                raise self.fail(path, f"minProperties {lo} > the {len(keys)} properties allowed")
            i += 1
            if f"extra_{i}" not in props:
                keys.append(f"extra_{i}")
        out = {}
        for k in keys:
            sub = props[k] if k in props else (extra if isinstance(extra, dict) else {})
            out[k] = self.value(sub, depth + 1, f"{path}/properties/{k}")
        return out

    def array(self, schema: dict[str, Any], depth: int, path: str) -> list[Any]:
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # draft 4's tuple form
            prefix, items = items, schema.get("additionalItems", {})
        prefix = prefix if isinstance(prefix, list) else []
        lo, hi = _count(schema.get("minItems")) or 0, _count(schema.get("maxItems"))
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and hi < lo:
            raise self.fail(path, f"minItems {lo} > maxItems {hi}" if items is not False
                            else f"minItems {lo} > the {hi} items allowed")
        cap = 3 if hi is None else hi
        n_lo, n_hi = lo, lo  # deep in the value: only what minItems requires
        if depth < SOFT_VALUE_DEPTH:
            n_lo = max(lo, min(1, cap))
            n_hi = max(n_lo, min(lo + 2, cap))
        n = self.rng.randint(n_lo, n_hi)
        out: list[Any] = []
        unique = schema.get("uniqueItems") is True
        for i in range(n):
            sub = prefix[i] if i < len(prefix) else items if isinstance(items, dict) else {}
            v = self.value(sub, depth + 1, f"{path}/items/{i}")
            for _ in range(8 if unique else 0):  # best effort: redraw a repeated item
                if v not in out:
                    break
                v = self.value(sub, depth + 1, f"{path}/items/{i}")
            if unique and v in out and len(out) >= lo:
                break
            out.append(v)
        return out

    def _bounds(self, schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        lo, hi = _num(schema.get("minimum")), _num(schema.get("maximum"))
        lo_x, hi_x = False, False
        ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if ex_lo is True:  # draft 4: a flag on minimum
            lo_x = lo is not None
        elif _num(ex_lo) is not None and (lo is None or ex_lo >= lo):
            lo, lo_x = ex_lo, True
        if ex_hi is True:
            hi_x = hi is not None
        elif _num(ex_hi) is not None and (hi is None or ex_hi <= hi):
            hi, hi_x = ex_hi, True
        return lo, lo_x, hi, hi_x

    def integer(self, schema: dict[str, Any], path: str) -> int:
        lo, lo_x, hi, hi_x = self._bounds(schema)
        a = None if lo is None else (math.floor(lo) + 1 if lo_x else math.ceil(lo))
        b = None if hi is None else (math.ceil(hi) - 1 if hi_x else math.floor(hi))
        if a is None and b is None:
            a, b = 0, 100
        elif a is None:
            a = b - 100
        elif b is None:
            b = a + 100
        step = _num(schema.get("multipleOf"))
        if isinstance(step, int) and step > 0:
            first = -(-a // step) * step
            if first > b:
                raise self.fail(path, f"no multiple of {step} in [{a}, {b}]")
            return first + step * self.rng.randint(0, min((b - first) // step, 100))
        if a > b:
            raise self.fail(path, f"no integer in the bounds (minimum {lo}, maximum {hi})")
        return self.rng.randint(a, min(b, a + 10**6))

    def number(self, schema: dict[str, Any], path: str) -> float | int:
        lo, lo_x, hi, hi_x = self._bounds(schema)
        step = _num(schema.get("multipleOf"))
        if step is not None and step > 0 and not isinstance(step, int):
            a = (-100.0 if hi is None else hi - 100.0) if lo is None else lo
            k = math.ceil(a / step) + (1 if lo_x and math.ceil(a / step) * step <= a else 0)
            x = round(k * step, 12)
            if hi is not None and (x > hi or (hi_x and x >= hi)):
                raise self.fail(path, f"no multiple of {step} in the bounds (minimum {lo}, maximum {hi})")
            return x
        if step is not None and step > 0:
            return self.integer(schema, path)
        a = (hi - 100.0 if hi is not None else 0.0) if lo is None else float(lo)
        b = a + 100.0 if hi is None else float(hi)
        if a > b or (a == b and (lo_x or hi_x)):
            raise self.fail(path, f"no number in the bounds (minimum {lo}, maximum {hi})")
        x = round(a + (b - a) * self.rng.random(), 2)
        if not (a < x if lo_x else a <= x) or not (x < b if hi_x else x <= b):
            x = a + (b - a) / 2
        return x

    def string(self, schema: dict[str, Any], path: str) -> str:
        lo, hi = _count(schema.get("minLength")) or 0, _count(schema.get("maxLength"))
        if hi is not None and hi < lo:
            raise self.fail(path, f"minLength {lo} > maxLength {hi}")
        if lo + self.chars > MAX_VALUE_CHARS:
            raise self.fail(path, f"its strings would pass {MAX_VALUE_CHARS} characters (minLength {lo})")
        fmt = schema.get("format")
        s = (_FORMATS.get(fmt) if isinstance(fmt, str) else None) or " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(1, 3)))
        if len(s) < lo:
            s = (s + " ") * (lo // (len(s) + 1) + 1)
            s = s[:lo]
        if hi is not None:
            s = s[:hi]
        self.chars += len(s)
        return s


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _names(x: Any) -> list[str]:
    """The property names of a `required` keyword, unique, in order."""
    return list(dict.fromkeys(r for r in x if isinstance(r, str))) if isinstance(x, list) else []


def _type_of(schema: dict[str, Any]) -> str:
    t = schema.get("type")
    if isinstance(t, list):
        named = [x for x in t if isinstance(x, str)]
        t = next((x for x in named if x != "null"), "null" if named else None)
    if isinstance(t, str):
        return t
    if any(k in schema for k in ("properties", "required", "additionalProperties", "minProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        return "number"
    return "string"
