"""A ReAct tool-calling agent: LangChain's `create_agent` (a LangGraph graph) with three local tools.

    run({"question": "...", "max_steps": 6}, "http://host:port/v1")

One request is a loop: the `agent` LLM answers with tool calls or with the final answer; each round
of tool calls is executed here and its results go back in the conversation. Calls per request: 1 + the
number of tool rounds (the model decides; `max_steps` bounds it). The tools are real Python: they check
their arguments and answer an error string for bad input, as tools an LLM calls must (a model may send
any schema-valid value). Tool time is the gap between the call that asked for a tool and the call that
carries its result: the gateway sees it without the program reporting anything.
The key is $SCEPSY_API_KEY, else $OPENAI_API_KEY (`export OPENAI_API_KEY=$(scepsy keys show NAME)`).
"""

from __future__ import annotations

import ast
import math
import operator
import os
from typing import Literal

from langchain.agents import create_agent
from langchain.agents.middleware import ModelCallLimitMiddleware
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

SYSTEM_PROMPT = ("You are a careful research assistant. Use the tools for arithmetic, unit conversions and "
                 "facts; never guess a number. When you have what you need, answer in two sentences.")

# --- tools ---------------------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "abs": abs, "round": round}
_NAMES = {"pi": math.pi, "e": math.e}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large (at most 100)")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords and len(node.args) == 1):
        return _FUNCS[node.func.id](_eval(node.args[0]))
    raise ValueError(f"unsupported element {ast.unparse(node)!r}")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, sqrt, log, exp, abs, round, pi, e."""
    if len(expression) > 200:
        return "error: expression longer than 200 characters"
    try:
        return repr(_eval(ast.parse(expression, mode="eval")))
    except SyntaxError:
        return f"error: {expression!r} is not an arithmetic expression"
    except (ValueError, ArithmeticError, TypeError) as exc:
        return f"error: {exc}"


# factor to the base unit of each dimension
_UNITS = {"m": ("length", 1.0), "km": ("length", 1000.0), "mi": ("length", 1609.344), "ft": ("length", 0.3048),
          "g": ("mass", 1.0), "kg": ("mass", 1000.0), "lb": ("mass", 453.59237),
          "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0)}
Unit = Literal["m", "km", "mi", "ft", "g", "kg", "lb", "s", "min", "h"]


@tool
def convert_units(value: float, from_unit: Unit, to_unit: Unit) -> str:
    """Convert a value between units of length (m, km, mi, ft), mass (g, kg, lb) or time (s, min, h)."""
    if from_unit not in _UNITS or to_unit not in _UNITS:
        return f"error: unknown unit; known: {', '.join(_UNITS)}"
    (dim_a, fa), (dim_b, fb) = _UNITS[from_unit], _UNITS[to_unit]
    if dim_a != dim_b:
        return f"error: cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})"
    if not math.isfinite(value):
        return "error: value must be a finite number"
    return f"{value} {from_unit} = {value * fa / fb:.6g} {to_unit}"


_FACTS = {
    "paris": "Paris is the capital of France; about 2.1 million people live in the city proper.",
    "everest": "Mount Everest is 8849 m high.",
    "marathon": "A marathon is 42.195 km long.",
    "h100": "An NVIDIA H100 SXM has 80 GB of HBM3 memory.",
    "light": "Light travels 299792.458 km in one second.",
    "weather": "Forecasts more than ten days ahead are little better than climatology.",
}


@tool
def search(query: str) -> str:
    """Look a topic up in the local encyclopedia; returns the matching facts."""
    if not query.strip():
        return "error: empty query"
    words = {w.strip(".,?!").lower() for w in query.split()}
    hits = [fact for key, fact in _FACTS.items() if key in words]
    return "\n".join(hits) if hits else f"no entry for {query!r}; try one of: {', '.join(_FACTS)}"


TOOLS = [calculator, convert_units, search]


# --- the agent -----------------------------------------------------------------------------------------------

def api_key() -> str:
    """The gateway's client key: $SCEPSY_API_KEY, else $OPENAI_API_KEY (a bare engine may need none)."""
    return os.environ.get("SCEPSY_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"


def build_agent(base_url: str, max_steps: int, max_tokens: int = 64):  # -> CompiledStateGraph
    """The ReAct graph with its model bound to `base_url` (model = the workflow's LLM key `agent`); after
    `max_steps` model calls it stops with a note instead of calling the model again."""
    llm = ChatOpenAI(model="agent", base_url=base_url, api_key=api_key(), max_tokens=max_tokens, max_retries=0,
                     temperature=0)
    return create_agent(llm, TOOLS, system_prompt=SYSTEM_PROMPT,
                        middleware=[ModelCallLimitMiddleware(run_limit=max_steps, exit_behavior="end")])


def run(input: dict, base_url: str) -> dict:
    """Answer input["question"] with at most input["max_steps"] model calls; returns the answer, the tool
    calls the model made (name, arguments, result) and the number of model calls."""
    max_steps = int(input.get("max_steps", 6))
    question = input.get("question", "How many marathons laid end to end reach the height of Everest?")
    agent = build_agent(base_url, max_steps)
    # The step limit ends the loop; the recursion limit (graph node visits) is only a backstop.
    state = agent.invoke({"messages": [{"role": "user", "content": question}]},
                         {"recursion_limit": 10 * max_steps + 10})
    messages = state["messages"]
    results = {m.tool_call_id: m.content for m in messages if isinstance(m, ToolMessage)}
    tool_calls = [{"name": c["name"], "args": c["args"], "result": results.get(c["id"])}
                  for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    # The model's messages carry token usage; the limit's closing note is written locally and carries none.
    llm_calls = sum(isinstance(m, AIMessage) and m.usage_metadata is not None for m in messages)
    return {"answer": messages[-1].content, "tool_calls": tool_calls, "llm_calls": llm_calls}
