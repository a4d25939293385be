"""The hostile corpus of spec files: hand-written attacks of every kind the issue lists, and mutations
generated from valid workflows, plans, clusters and catalogs. Each case is refused with exit 2 and a
message naming the file (and its line where the input has lines). `python corpus_specs.py` prints
the table of kinds and counts."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import yaml


@dataclass(frozen=True)
class Case:
    """One hostile input: `files` (name → bytes) written to a directory; `argv` with {dir} in it."""

    kind: str
    name: str
    files: dict[str, bytes]
    argv: tuple[str, ...]
    line: bool = True          # the message names a line (file:N:)
    env: tuple[tuple[str, str], ...] = ()


WORKFLOW = """\
name: hostile
llms:
  a: {model: llama-3.1-8b-instruct}
  b: {model: qwen2.5-7b-instruct}
tools:
  t: {latency_s: {lognormal: {mean: 1.5, cv: 0.5}}}
max_depth: 3
define:
  step:
    - {call: a, prompt_tokens: {uniform_int: {low: 100, high: 400}}, output_tokens: 50}
    - branch:
        - {p: 0.5, body: [{use: step}]}
        - {p: 0.5, body: [{tool: t}]}
program:
  - {call: a, role: plan, prompt_tokens: 500, output_tokens: {lognormal: {mean: 200, cv: 0.3}}}
  - fanout: {count: {choice: {values: [2, 3, 4], weights: [1, 1, 2]}}, body: [{call: b, prompt_tokens: 800, output_tokens: 100}]}
  - loop: {repeat: 2, body: [{use: step}]}
"""

CLUSTER = """\
name: hostile
slurm: {partition: gpu, account: proj, qos: normal, time: "4:00:00", gpu_types: {h100: h100-sxm}}
node_groups:
  - {name: gpu, nodes: "node[1-4]", gpu_type: h100-sxm, gpus_per_node: 4, nvlink: all}
switches:
  - {name: leaf1, nodes: "node[1-2]"}
  - {name: leaf2, nodes: "node[3-4]"}
  - {name: spine, switches: "leaf[1-2]"}
"""

PLAN = """\
workflow: mixture_of_agents
gpus: {type: h100-sxm, count: 16}
allocation:
  qwen72: {tp: 4, gpu_frac: 1.0, replicas: 2}
  llama70: {tp: 4, gpu_frac: 1.0, replicas: 1}
  mixtral: {tp: 2, gpu_frac: 1.0, replicas: 1}
  qwen32: {tp: 2, gpu_frac: 1.0, replicas: 1}
placement:
  - {llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], port: 8100}
  - {llm: qwen72, replica: 1, node: node2, gpus: [0, 1, 2, 3], port: 8100}
  - {llm: llama70, replica: 0, node: node3, gpus: [0, 1, 2, 3], port: 8100}
  - {llm: mixtral, replica: 0, node: node4, gpus: [0, 1], gpu_frac: 1.0, mem_frac: 0.9, mps_pct: 100, port: 8100}
  - {llm: qwen32, replica: 0, node: node4, gpus: [2, 3], port: 8101}
"""

MODELS = """\
tiny:
  {hf_id: org/tiny, params_b: 1.0, layers: 16, hidden: 2048, intermediate: 8192, heads: 32, kv_heads: 8,
   head_dim: 64, vocab: 32000, dtype_bytes: 2, max_model_len: 8192}
"""

GPUS = """\
g1: {mem_gib: 80, bf16_tflops: 989, hbm_tbps: 3.35, nvlink_gbps: 450, compute_eff: 0.6, mem_eff: 0.8}
"""

BASES = {"workflow": WORKFLOW, "plan": PLAN, "cluster": CLUSTER, "models": MODELS, "gpus": GPUS}


def argv_for(kind: str) -> tuple[str, ...]:
    """How a file of `kind` is validated (plans against the cluster spec, so placements are checked)."""
    if kind == "plan":
        return ("validate", "--cluster", "{dir}/cluster.yaml", "{dir}/f.yaml")
    return ("validate", "{dir}/f.yaml")


def spec_case(kind: str, base: str, name: str, text: str | bytes, *, line: bool = True, **kw: Any) -> Case:
    """A case validating one file `f.yaml` of kind `base`."""
    files = {"f.yaml": text.encode() if isinstance(text, str) else text}
    if base == "plan":
        files["cluster.yaml"] = CLUSTER.encode()
    return Case(kind, name, files, argv_for(base), line, **kw)


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=1000)


def _leaves(data: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, loc + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, loc + (i,))
    else:
        yield loc, data


def _keys(data: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield loc + (k,)
            yield from _keys(v, loc + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _keys(v, loc + (i,))


def _set(data: Any, loc: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(data)
    cur = out
    for k in loc[:-1]:
        cur = cur[k]
    cur[loc[-1]] = value
    return out


def _rename(data: Any, loc: tuple[Any, ...]) -> Any:
    out = copy.deepcopy(data)
    cur = out
    for k in loc[:-1]:
        cur = cur[k]
    items = list(cur.items())
    cur.clear()
    cur.update({(f"{k}_x" if k == loc[-1] else k): v for k, v in items})
    return out


# values no numeric field of these documents accepts (0 and 1 are valid somewhere: replica 0, p 1)
BAD_NUMBERS = (float("nan"), float("inf"), -1, "abc", [], {})
HUGE = 1.0e18
# numeric fields where a huge value is valid (a catalog's model may be large) are left out of HUGE
NO_HUGE = {"models", "gpus"}
# dict keys that are free names (renaming one is a different, valid name)
FREE_NAME_DEPTH = {"models": 1, "gpus": 1}
# keys whose removal must be refused
REQUIRED = {
    "workflow": [("name",), ("llms",), ("program",), ("program", 0, "prompt_tokens"), ("program", 0, "output_tokens"),
                 ("program", 1, "fanout", "count"), ("llms", "a", "model"), ("tools", "t", "latency_s")],
    "plan": [("gpus",), ("allocation",), ("placement", 0, "node"), ("placement", 0, "gpus"), ("placement", 0, "llm"),
             ("placement", 0, "replica"), ("gpus", "type")],
    "cluster": [("name",), ("node_groups", 0, "nodes"), ("node_groups", 0, "gpu_type"), ("switches", 0, "name"),
                ("slurm", "partition")],
    "models": [("tiny", "hf_id"), ("tiny", "layers"), ("tiny", "max_model_len")],
    "gpus": [("g1", "mem_gib"), ("g1", "hbm_tbps")],
}


def mutations() -> Iterator[Case]:
    """Generated: every numeric field × bad values, every key renamed (unknown key), required keys
    deleted, key lines duplicated, files cut inside a flow mapping."""
    for base, text in BASES.items():
        data = yaml.safe_load(text)
        numeric = [(loc, v) for loc, v in _leaves(data) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i, (loc, value) in enumerate(numeric):
            bads = BAD_NUMBERS + (() if base in NO_HUGE or loc[-1] == "cv" or "weights" in loc else (HUGE,))
            # two bad values per field, rotating, so every value meets every kind of field
            picks = (bads[i % len(bads)],) if base == "plan" else (bads[i % len(bads)], bads[(i + 3) % len(bads)])
            for bad in picks:
                yield spec_case(f"mutate-number-{base}", base, f"{'.'.join(map(str, loc))}={bad!r}", _dump(_set(data, loc, bad)))
        renamable = [loc for loc in _keys(data) if len(loc) > FREE_NAME_DEPTH.get(base, 0) and "gpu_types" not in loc[:-1]]
        for loc in renamable[::3]:
            if not isinstance(loc[-1], int):
                yield spec_case(f"mutate-unknown-key-{base}", base, ".".join(map(str, loc)), _dump(_rename(data, loc)))
        for loc in REQUIRED[base]:
            out = copy.deepcopy(data)
            cur = out
            for k in loc[:-1]:
                cur = cur[k]
            del cur[loc[-1]]
            yield spec_case(f"mutate-delete-key-{base}", base, ".".join(map(str, loc)), _dump(out))
        lines = text.splitlines(keepends=True)
        for i, ln in enumerate(lines):
            if ln.strip() and not ln.lstrip().startswith(("-", "{", "#")) and ":" in ln and i % 2 == 0:
                yield spec_case(f"mutate-duplicate-key-{base}", base, f"line{i + 1}", "".join(lines[:i + 1] + [ln] + lines[i + 1:]))
        cuts = [i for i, ch in enumerate(text) if ch == "{"]
        for j in sorted({cuts[0], cuts[len(cuts) // 2], cuts[-1]}):
            yield spec_case(f"mutate-truncated-{base}", base, f"at{j + 3}", text[:j + 3])
