"""The sim engine's JSON-schema value generator and request validation (scepsy_hpc.engine.sim_tools)."""

from __future__ import annotations

import json
import random
import time

import pytest

from scepsy_hpc.engine.openai_protocol import ApiError
from scepsy_hpc.engine.sim_tools import MAX_SCHEMA_DEPTH, StructuredOutput, ToolCall, draw, generate, parse_structured, \
    tool_rounds

SCHEMAS = {
    "weather": {"type": "object", "properties": {"city": {"type": "string", "minLength": 2, "maxLength": 40},
                                                 "unit": {"type": "string", "enum": ["c", "f"]},
                                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "unit"], "additionalProperties": False},
    "numbers": {"type": "object", "required": ["a", "b", "c", "d", "e"], "properties": {
        "a": {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 8},
        "b": {"type": "number", "minimum": -1.5, "maximum": -1.5},
        "c": {"type": "integer", "multipleOf": 7, "minimum": 10, "maximum": 30},
        "d": {"type": "number", "multipleOf": 0.25, "minimum": 0.3},
        "e": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.001}}},
    "arrays": {"type": "object", "required": ["tags", "pair", "set", "deep"], "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 4, "maxItems": 4},
        "pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}], "items": False},
        "set": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "uniqueItems": True},
        "deep": {"type": "array", "items": {"type": "array", "items": {"type": "object", "properties": {
            "x": {"type": "string", "format": "date-time"}}, "required": ["x"]}, "minItems": 1}, "minItems": 1}}},
    "refs": {"$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"},
                                                               "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                                "required": ["name"]}},
             "type": "object", "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]},
    "unions": {"type": "object", "required": ["u", "o", "all", "t", "c"], "properties": {
        "u": {"anyOf": [{"type": "integer", "minimum": 3}, {"type": "string"}]},
        "o": {"oneOf": [{"type": "string", "minLength": 5}, {"type": "integer"}]},
        "all": {"allOf": [{"type": "object", "properties": {"p": {"type": "integer"}}, "required": ["p"]},
                          {"properties": {"q": {"type": "boolean"}}, "required": ["q"]}]},
        "t": {"type": ["null", "string"], "minLength": 1},
        "c": {"const": {"k": [1, 2]}}}},
    "min_properties": {"type": "object", "minProperties": 3, "properties": {"a": {"type": "integer"}},
                       "additionalProperties": {"type": "boolean"}},
    "unknown_keywords": {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z]+$",
                                                                "x-whatever": [1], "format": ["odd"]}},
                         "required": ["s"], "dependentSchemas": {"s": {}}, "if": {}, "then": False},
    "untyped": {"properties": {"n": {"maximum": -5}, "l": {"minItems": 1}, "any": {}}, "required": ["n", "l", "any"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generated_values_are_valid_for_their_schema(name, validate):
    schema = SCHEMAS[name]
    for seed in range(40):
        value = generate(schema, random.Random(seed))
        assert validate(value, schema) == [], (seed, value)
        json.dumps(value)  # JSON-encodable


def test_optional_properties_appear_sometimes_and_seeds_repeat():
    schema = SCHEMAS["weather"]
    values = [generate(schema, random.Random(s)) for s in range(40)]
    assert 0 < sum("days" in v for v in values) < 40
    assert values == [generate(schema, random.Random(s)) for s in range(40)]


def test_recursive_schema_stays_small():
    value = generate(SCHEMAS["refs"], random.Random(1))
    assert len(json.dumps(value)) < 5000


@pytest.mark.parametrize("schema, why", [
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 > maxLength 2"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "no integer"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/loop"}}, "required": ["x"],
      "$defs": {"loop": {"type": "object", "properties": {"y": {"$ref": "#/$defs/loop"}}, "required": ["y"]}}},
     "deeper than"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "$ref chains"),
    ({"anyOf": [{"$ref": "#"}]}, "nest more than"),
    ({"$ref": "#/nowhere"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "not local"),
    ({"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1000}, "minItems": 1000},
     "more than"),
    ({"type": "string", "minLength": 10**9}, "characters"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "false"),
])
def test_schemas_without_a_bounded_value_are_a_400(schema, why):
    t0 = time.monotonic()
    with pytest.raises(ApiError) as info:
        generate(schema, random.Random(0))
    assert info.value.status == 400 and why in info.value.message
    assert time.monotonic() - t0 < 2.0


def _body(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMAS["weather"]}}


@pytest.mark.parametrize("kw, why", [
    ({"tools": {"a": 1}}, "'tools' must be a list"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name must be"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "name must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "parameters must be a JSON schema"),
    ({"tools": [TOOL, TOOL]}, "given twice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0] must be"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in 'tools'"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": {"type": "yaml"}}, "'yaml' is not known"),
    ({"response_format": {"type": "json_schema"}}, "needs 'json_schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "s"}}}, "schema must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": "x" * 70000}}}},
     "characters of JSON"),
])
def test_malformed_tools_and_formats_are_a_400(kw, why):
    with pytest.raises(ApiError) as info:
        parse_structured(_body(**kw), None)
    assert info.value.status == 400 and why in info.value.message


def test_a_schema_nested_too_deep_is_a_400():
    deep: dict = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(ApiError) as info:
        parse_structured(_body(tools=[{"type": "function", "function": {"name": "f", "parameters": deep}}]), None)
    assert "nests deeper" in info.value.message and "tools[0].function.parameters" in info.value.message


@pytest.mark.parametrize("header", ["1.5", "-0.1", "nan", "often"])
def test_a_bad_tool_rate_header_is_a_400(header):
    with pytest.raises(ApiError) as info:
        parse_structured(_body(tools=[TOOL]), header)
    assert "X-Sim-Tool-Rate" in info.value.message


def test_no_tools_and_no_format_ask_for_nothing():
    assert parse_structured(_body(), None) is None
    assert parse_structured(_body(tools=[], response_format={"type": "text"}, tool_choice="none"), None) is None


def test_tool_rounds_count_runs_of_tool_messages():
    msgs = [{"role": "user"}, {"role": "assistant"}, {"role": "tool"}, {"role": "tool"}, {"role": "assistant"},
            {"role": "tool"}, {"role": "user"}]
    assert tool_rounds(msgs) == 2 and tool_rounds(msgs[:2]) == 0


def _rate(spec, messages, default=0.5, n=2000):
    rng = random.Random(3)
    return sum(bool(o and o.calls) for o in (draw(spec, messages, rng, default) for _ in range(n))) / n


def test_the_tool_rate_halves_with_each_round_of_tool_results():
    spec = parse_structured(_body(tools=[TOOL]), None)
    first = [{"role": "user", "content": "q"}]
    after_one = first + [{"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "r"}]
    after_two = after_one + [{"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "r"}]
    assert abs(_rate(spec, first) - 0.5) < 0.05
    assert abs(_rate(spec, after_one) - 0.25) < 0.04
    assert abs(_rate(spec, after_two) - 0.125) < 0.03
    header = parse_structured(_body(tools=[TOOL]), "1")
    assert _rate(header, first) == 1.0 and abs(_rate(header, after_one) - 0.5) < 0.05
    assert _rate(parse_structured(_body(tools=[TOOL]), "0"), first) == 0.0


def test_tool_choice_modes():
    msgs = [{"role": "tool", "content": "r"}] * 1
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    none = parse_structured(_body(tools=[TOOL], tool_choice="none"), "1")
    required = parse_structured(_body(tools=[TOOL, other], tool_choice="required"), "0")
    named = parse_structured(_body(tools=[TOOL, other], tool_choice={"type": "function", "function": {"name": "other"}},
                                   parallel_tool_calls=True), "0")
    rng = random.Random(0)
    assert all(draw(none, msgs, rng, 1.0) is None for _ in range(50))
    req = [draw(required, msgs, rng, 0.0) for _ in range(50)]
    assert all(len(o.calls) == 1 for o in req) and {o.calls[0].name for o in req} == {"get_weather", "other"}
    assert all([c.name for c in draw(named, msgs, rng, 0.0).calls] == ["other"] for _ in range(50))


def test_parallel_tool_calls_give_one_or_two_calls():
    single = parse_structured(_body(tools=[TOOL]), "1")
    parallel = parse_structured(_body(tools=[TOOL], parallel_tool_calls=True), "1")
    rng = random.Random(0)
    assert {len(draw(single, [], rng, 0).calls) for _ in range(50)} == {1}
    assert {len(draw(parallel, [], rng, 0).calls) for _ in range(50)} == {1, 2}


def test_json_formats_give_content_when_no_tool_is_called(validate):
    obj = draw(parse_structured(_body(response_format={"type": "json_object"}), None), [], random.Random(0), 0.5)
    assert isinstance(json.loads(obj.content), dict) and obj.finish_reason == "stop"
    schema = SCHEMAS["unions"]
    fmt = {"type": "json_schema", "json_schema": {"name": "u", "schema": schema, "strict": True}}
    out = draw(parse_structured(_body(response_format=fmt, tools=[TOOL], tool_choice="none"), None), [],
               random.Random(0), 0.5)
    assert validate(json.loads(out.content), schema) == []


def test_streamed_deltas_rebuild_the_answer_and_cover_every_token():
    calls = (ToolCall("call_1", "get_weather", '{"city":"paris","unit":"c"}'), ToolCall("call_2", "f", "{}"))
    out = StructuredOutput(calls=calls)
    assert out.tokens == -(-len("get_weather" + calls[0].arguments + "f{}") // 4)
    got: dict[int, dict] = {}
    for k in range(1, out.tokens + 1):
        for d in out.deltas(k):
            for tc in d["tool_calls"]:
                slot = got.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                if "id" in tc:
                    assert slot["id"] is None and tc["function"]["arguments"] == ""
                    slot["id"], slot["name"] = tc["id"], tc["function"]["name"]
                slot["arguments"] += tc["function"]["arguments"]
    assert [(g["id"], g["name"], g["arguments"]) for g in got.values()] == [(c.id, c.name, c.arguments) for c in calls]
    assert out.message(out.tokens)["tool_calls"][1]["function"]["arguments"] == "{}"
    cut = out.message(4)  # 16 characters: the name (11) and 5 of the arguments
    assert [c["function"]["arguments"] for c in cut["tool_calls"]] == ['{"cit']
    content = StructuredOutput(content='{"a":12345}')
    assert "".join(d["content"] for k in range(1, content.tokens + 1) for d in content.deltas(k)) == '{"a":12345}'
    assert content.message(2)["content"] == '{"a":123'  # 8 characters
