"""Hand-written hostile inputs: every kind the issue lists (YAML bombs, huge quantities, impossible
values, unsafe names, corrupted placements, bad command-line values)."""

from __future__ import annotations

from typing import Iterator

from corpus_specs import CLUSTER, PLAN, WORKFLOW, Case, spec_case

HEAD = "name: x\nllms:\n  a: {model: llama-3.1-8b-instruct}\ntools:\n  t: {latency_s: 1}\n"
CALL = "{call: a, prompt_tokens: 10, output_tokens: 10}"


def _wf(program: str, extra: str = "") -> str:
    return HEAD + extra + "program:\n" + program


def _bomb(levels: int = 9) -> str:
    text = 'name: x\na0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + f"program: *a{levels - 1}\n"


def yaml_attacks() -> Iterator[Case]:
    """The YAML layer: bombs, recursion, nesting, bytes."""
    yield spec_case("yaml-alias-bomb", "workflow", "billion-laughs", _bomb())
    yield spec_case("yaml-alias-bomb", "workflow", "merge-keys", "b0: &b0 {x: 1, y: 2}\n" + "".join(
        f"b{i}: &b{i} {{<<: [*b{i - 1}], k{i}: [*b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}]}}\n"
        for i in range(1, 12)) + "name: x\n")
    yield spec_case("yaml-alias-bomb", "workflow", "too-many-aliases", "a: &a 1\nb: [" + ",".join(["*a"] * 10_001) + "]\n")
    yield spec_case("yaml-recursive-alias", "workflow", "list", "name: x\nprogram: &p [*p]\n")
    yield spec_case("yaml-recursive-alias", "workflow", "mapping", "name: x\nllms: &l {a: *l}\nprogram: []\n")
    yield spec_case("yaml-recursive-alias", "plan", "in-allocation", "gpus: {type: h100-sxm, count: 4}\nallocation: &a {x: *a}\n")
    yield spec_case("yaml-nesting", "workflow", "20k-flow-lists", "name: x\nprogram: " + "[" * 20_000 + "]" * 20_000 + "\n")
    yield spec_case("yaml-nesting", "workflow", "20k-flow-maps", "name: x\nprogram: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n")
    yield spec_case("yaml-nesting", "cluster", "block-200", "name: x\nnode_groups:\n" + "".join(
        "  " * i + "- \n" for i in range(1, 200)))
    for i, where in enumerate((5, len(WORKFLOW) // 2, len(WORKFLOW) - 3)):
        yield spec_case("bytes-nul", "workflow", f"at{where}", WORKFLOW[:where] + "\0" + WORKFLOW[where:])
    yield spec_case("bytes-nul", "workflow", "escaped-in-name", WORKFLOW.replace("name: hostile", 'name: "ho\\0stile"'))
    yield spec_case("bytes-control", "workflow", "escape", WORKFLOW.replace("hostile", "\x1b[31mhostile"))
    yield spec_case("bytes-control", "cluster", "bell", CLUSTER.replace("leaf1", "le\x07af1"))
    yield spec_case("bytes-invalid-utf8", "workflow", "latin1", WORKFLOW.encode().replace(b"hostile", b"host\xe9le"))
    yield spec_case("bytes-invalid-utf8", "plan", "truncated-utf8", PLAN.encode() + b"\xe2\x82")
    yield spec_case("bytes-invalid-utf8", "cluster", "binary", bytes(range(256)) * 4, line=False)
    yield spec_case("yaml-scalar", "workflow", "int-5000-digits", WORKFLOW.replace("max_depth: 3", "max_depth: " + "9" * 5000))
    yield spec_case("yaml-scalar", "plan", "bad-timestamp", PLAN.replace("workflow: mixture_of_agents", "workflow: 2024-13-45"))
    yield spec_case("yaml-scalar", "workflow", "python-tag", WORKFLOW.replace("name: hostile", "name: !!python/object/apply:os.system [id]"))
    yield spec_case("yaml-scalar", "workflow", "list-key", WORKFLOW + "? [a, b]\n: 1\n")
    yield spec_case("yaml-scalar", "workflow", "undefined-alias", WORKFLOW.replace("max_depth: 3", "max_depth: *nope"))
    yield spec_case("yaml-shape", "workflow", "empty", "", line=False)
    yield spec_case("yaml-shape", "workflow", "scalar", "just text\n")
    yield spec_case("yaml-shape", "plan", "list", "- 1\n- 2\n")
    yield spec_case("yaml-shape", "workflow", "two-documents", WORKFLOW + "---\n" + WORKFLOW)
    big = ("# " + "x" * 1000 + "\n") * 8500
    yield spec_case("file-too-big", "workflow", "8.3MB", WORKFLOW + big, line=False)
    yield spec_case("file-too-big", "workflow", "limit-lowered", WORKFLOW, line=False, env=(("SCEPSY_MAX_FILE_BYTES", "100"),))
    yield Case("file-special", "dev-zero", {}, ("validate", "/dev/zero"), line=False)
    yield Case("file-special", "directory", {}, ("validate", "{dir}"), line=False)
    yield Case("file-special", "missing", {}, ("validate", "{dir}/nope.yaml"), line=False)


def workflow_attacks() -> Iterator[Case]:
    """Quantities that would make sampling run away, impossible values, unsafe names."""
    w = "workflow"
    yield spec_case("fanout-huge", w, "1e9", _wf(f"  - fanout: {{count: 1.0e+9, body: [{CALL}]}}\n"))
    yield spec_case("fanout-huge", w, "choice-1e9", _wf(f"  - fanout: {{count: {{choice: {{values: [1, 1.0e+9]}}}}, body: [{CALL}]}}\n"))
    yield spec_case("fanout-huge", w, "poisson-mean-1e9", _wf(f"  - fanout: {{count: {{poisson: {{mean: 1.0e+9}}}}, body: [{CALL}]}}\n"))
    yield spec_case("fanout-huge", w, "nested-100^3", _wf(
        f"  - fanout: {{count: 100, body: [{{fanout: {{count: 100, body: [{{fanout: {{count: 100, body: [{CALL}]}}}}]}}}}]}}\n"))
    yield spec_case("loop-huge", w, "1e8", _wf(f"  - loop: {{repeat: 100000000, body: [{CALL}]}}\n"))
    yield spec_case("loop-huge", w, "uniform_int-1e9", _wf(f"  - loop: {{repeat: {{uniform_int: {{low: 1, high: 1000000000}}}}, body: [{CALL}]}}\n"))
    yield spec_case("loop-huge", w, "geometric-mean-1e8", _wf(f"  - loop: {{repeat: {{geometric: {{mean: 1.0e+8}}}}, body: [{CALL}]}}\n"))
    yield spec_case("recursion-doubling", w, "max_depth-64", _wf("  - use: r\n", f"max_depth: 64\ndefine:\n  r: [{CALL}, {{use: r}}, {{use: r}}]\n"))
    yield spec_case("recursion-doubling", w, "mutual-max_depth-40", _wf(
        "  - use: p\n", f"max_depth: 40\ndefine:\n  p: [{CALL}, {{use: q}}, {{use: q}}]\n  q: [{{use: p}}, {{use: p}}]\n"))
    yield spec_case("recursion-doubling", w, "fanout-in-recursion", _wf(
        "  - use: r\n", f"max_depth: 20\ndefine:\n  r: [{{fanout: {{count: 3, body: [{CALL}, {{use: r}}]}}}}]\n"))
    yield spec_case("recursion-unbounded", w, "no-max_depth", _wf("  - use: r\n", f"define:\n  r: [{CALL}, {{use: r}}]\n"))
    for name, tok in (("inf", ".inf"), ("nan", ".nan"), ("zero", "0"), ("1e12", "1.0e+12"), ("negative", "-5"),
                      ("uniform-low-0", "{uniform: {low: 0, high: 10}}"), ("lognormal-mean-1e6", "{lognormal: {mean: 1.0e+6, cv: 0.1}}")):
        yield spec_case("output-tokens", w, name, _wf(f"  - {{call: a, prompt_tokens: 10, output_tokens: {tok}}}\n"))
    yield spec_case("prompt-over-context", w, "200k", _wf("  - {call: a, prompt_tokens: 200000, output_tokens: 10}\n"))
    yield spec_case("prompt-over-context", w, "sum-over", _wf("  - {call: a, prompt_tokens: 131000, output_tokens: 1000}\n"))
    yield spec_case("prompt-over-context", w, "choice-max", _wf(
        "  - {call: a, prompt_tokens: {choice: {values: [10, 500000]}}, output_tokens: 10}\n"))
    for name, lat in (("inf", ".inf"), ("nan", ".nan"), ("1e9", "1.0e+9"), ("exponential-inf", "{exponential: {mean: .inf}}")):
        yield spec_case("tool-latency", w, name, HEAD.replace("latency_s: 1", f"latency_s: {lat}") + "program:\n  - {tool: t}\n")
    for name, d in (("uniform-high-inf", "{uniform: {low: 1, high: .inf}}"), ("normal-sd-nan", "{normal: {mean: 5, sd: .nan}}"),
                    ("choice-nan", "{choice: {values: [1, .nan]}}"), ("weights-inf", "{choice: {values: [1, 2], weights: [1, .inf]}}"),
                    ("lognormal-cv-inf", "{lognormal: {mean: 5, cv: .inf}}"), ("geometric-mean-0", "{geometric: {mean: 0}}"),
                    ("two-kinds", "{uniform: {low: 1, high: 2}, normal: {mean: 1, sd: 1}}")):
        yield spec_case("dist-params", w, name, _wf(f"  - {{call: a, prompt_tokens: {d}, output_tokens: 10}}\n"))
    for name, llm in (("space", "my llm"), ("semicolon", "a;id"), ("subshell", "$(id)"), ("newline", "a\\nb"),
                      ("long", "x" * 200), ("unicode", "modèle"), ("leading-dash", "-rf")):
        yield spec_case("llm-name", w, name, f'name: x\nllms:\n  "{llm}": {{model: llama-3.1-8b-instruct}}\nprogram:\n'
                        f'  - {{call: "{llm}", prompt_tokens: 10, output_tokens: 10}}\n')
    yield spec_case("branch", w, "p-sum-2", _wf(f"  - branch: [{{p: 1, body: [{CALL}]}}, {{p: 1, body: [{CALL}]}}]\n"))
    yield spec_case("branch", w, "p-nan", _wf(f"  - branch: [{{p: .nan, body: [{CALL}]}}]\n"))


def cluster_attacks() -> Iterator[Case]:
    """Names that reach Slurm, huge hostlists, switch cycles."""
    c = "cluster"
    for key, value in (("partition", "gpu;id"), ("partition", "gpu id"), ("account", "$(id)"), ("qos", "a`b`"),
                       ("partition", "-p"), ("account", "x" * 100)):
        yield spec_case("slurm-name", c, f"{key}={value[:12]}", CLUSTER.replace(
            {"partition": "partition: gpu", "account": "account: proj", "qos": "qos: normal"}[key], f"{key}: '{value}'"))
    yield spec_case("slurm-name", c, "constraint", CLUSTER.replace("qos: normal", "qos: normal, constraint: 'a;b'"))
    yield spec_case("slurm-name", c, "gres-type", CLUSTER.replace("{h100: h100-sxm}", "{'h100;x': h100-sxm}"))
    yield spec_case("node-name", c, "semicolon", CLUSTER.replace('"node[1-4]"', '"node[1-4],evil;id"'))
    yield spec_case("node-name", c, "space", CLUSTER.replace('"node[1-4]"', '"node[1-4],a b"'))
    yield spec_case("switch-name", c, "space", CLUSTER.replace("name: spine", "name: 'sp ine'"))
    for name, expr in (("1e5x1e5", "n[1-100000]x[1-100000]"), ("1e9", "n[1-1000000000]"), ("20-digits", "n[1-99999999999999999999]"),
                       ("many-brackets", "n" + "[1-10]" * 40), ("many-parts", ",".join(f"a{i}[1-99999]" for i in range(3))),
                       ("backwards", "n[9-1]"), ("unbalanced", "n[1-4")):
        yield spec_case("hostlist", c, name, CLUSTER.replace('"node[1-4]"', f'"{expr}"'))
    yield spec_case("hostlist", c, "long-expression", CLUSTER.replace('"node[1-4]"', '"' + ",".join(f"n{i}" for i in range(20000)) + '"'))
    yield spec_case("switch-cycle", c, "two", CLUSTER + "  - {name: s1, switches: s2}\n  - {name: s2, switches: s1}\n")
    yield spec_case("switch-cycle", c, "self", CLUSTER + "  - {name: s3, switches: s3}\n")
    yield spec_case("switch-cycle", c, "three", CLUSTER + "  - {name: x1, switches: x2}\n  - {name: x2, switches: x3}\n  - {name: x3, switches: x1}\n")
    yield spec_case("cluster-values", c, "gpus-per-node-1e9", CLUSTER.replace("gpus_per_node: 4", "gpus_per_node: 1000000000"))
    yield spec_case("cluster-values", c, "duplicate-node", CLUSTER.replace("switches:", "  - {name: g2, nodes: node1, gpu_type: h100-sxm, gpus_per_node: 4}\nswitches:", 1))


def plan_attacks() -> Iterator[Case]:
    """Allocations past the limits and corrupted placements."""
    p = "plan"
    first = "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], port: 8100}"
    for name, entry in (("port-abc", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], port: abc}"),
                        ("no-node", "{llm: qwen72, replica: 0, gpus: [0, 1, 2, 3], port: 8100}"),
                        ("node99", "{llm: qwen72, replica: 0, node: node99, gpus: [0, 1, 2, 3], port: 8100}"),
                        ("gpu99", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 99], port: 8100}"),
                        ("gpu-twice", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 0, 1, 2], port: 8100}"),
                        ("tp-count", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1], port: 8100}"),
                        ("port-70000", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], port: 70000}"),
                        ("port-negative", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], port: -1}"),
                        ("replica-again", "{llm: qwen72, replica: 1, node: node1, gpus: [0, 1, 2, 3], port: 8100}"),
                        ("unknown-llm", "{llm: gpt5, replica: 0, node: node1, gpus: [0, 1, 2, 3], port: 8100}"),
                        ("node-semicolon", "{llm: qwen72, replica: 0, node: 'node1;id', gpus: [0, 1, 2, 3], port: 8100}"),
                        ("gpu-frac-differs", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], gpu_frac: 0.5, port: 8100}"),
                        ("mem-frac-2", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], mem_frac: 2, port: 8100}"),
                        ("mps-0", "{llm: qwen72, replica: 0, node: node1, gpus: [0, 1, 2, 3], mps_pct: 0, port: 8100}"),
                        ("not-a-mapping", "node1")):
        yield spec_case("placement", p, name, PLAN.replace(first, entry))
    yield spec_case("placement", p, "duplicate-port", PLAN.replace("gpus: [2, 3], port: 8101", "gpus: [2, 3], port: 8100"))
    yield spec_case("placement", p, "gpu-shared-beyond-whole", PLAN.replace("gpus: [2, 3], port: 8101", "gpus: [0, 1], port: 8101"))
    yield spec_case("placement", p, "missing-instance", PLAN.replace("  - " + first + "\n", ""))
    yield spec_case("placement", p, "placement-scalar", PLAN.split("placement:")[0] + "placement: 7\n")
    for name, a in (("replicas-1e8", "qwen72: {tp: 4, gpu_frac: 1.0, replicas: 100000000}"),
                    ("tp-3", "qwen72: {tp: 3, gpu_frac: 1.0, replicas: 2}"),
                    ("frac-0", "qwen72: {tp: 4, gpu_frac: 0, replicas: 2}"),
                    ("frac-with-tp", "qwen72: {tp: 4, gpu_frac: 0.5, replicas: 2}"),
                    ("max-num-seqs-1e12", "qwen72: {tp: 4, gpu_frac: 1.0, replicas: 2, max_num_seqs: 1000000000000}"),
                    ("name-space", "'qwen 72': {tp: 4, gpu_frac: 1.0, replicas: 2}")):
        yield spec_case("allocation", p, name, PLAN.replace("qwen72: {tp: 4, gpu_frac: 1.0, replicas: 2}", a))
    yield spec_case("allocation", p, "gpus-1e9", PLAN.replace("count: 16", "count: 1000000000"))
    yield spec_case("allocation", p, "gpus-too-few", PLAN.replace("count: 16", "count: 8"))
    yield spec_case("allocation", p, "schema-99", "schema_version: 99\n" + PLAN)
    yield spec_case("plan-workflow", p, "path-traversal", PLAN.replace("workflow: mixture_of_agents", "workflow: ../../../etc/passwd"))
    yield spec_case("plan-workflow", p, "nul-escape", PLAN.replace("workflow: mixture_of_agents", 'workflow: "a\\0b"'))
    yield spec_case("plan-workflow", p, "unknown", PLAN.replace("workflow: mixture_of_agents", "workflow: nope"), line=False)
    yield Case("plan-cluster", "cluster-missing", {"f.yaml": PLAN.encode()},
               ("validate", "--cluster", "{dir}/nope.yaml", "{dir}/f.yaml"), line=False)
    yield Case("plan-cluster", "cluster-bomb", {"f.yaml": PLAN.encode(), "c.yaml": _bomb().encode()},
               ("validate", "--cluster", "{dir}/c.yaml", "{dir}/f.yaml"))
