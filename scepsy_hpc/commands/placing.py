"""`scepsy plan --cluster`: plan, place on the cluster's topology, re-plan around placement failures."""

from __future__ import annotations

import math
from typing import Any

from scepsy_hpc.errors import SpecError

MAX_REPLANS = 6


def plan_and_place(planner: Any, policy: str, mode: str, slo: float | None, topo: Any) -> tuple[Any, Any]:
    """(Outcome, Placement). The MILP gets the NVLink-domain caps of the topology (constraint (6));
    when a placement still fails, the failing shape's cap drops to what did fit (a failing fraction
    takes one GPU off the budget) and the planner solves again, up to MAX_REPLANS times."""
    from scepsy_hpc.allocate import policies
    from scepsy_hpc.place.placement import PlacementError, domain_caps, place
    from scepsy_hpc.spec.plan import LLMAlloc

    planner.domain_caps = domain_caps(topo, planner.gpu_name, planner.max_tp)
    notes: list[str] = []
    for attempt in range(MAX_REPLANS + 1):
        out = policies.run(planner, policy, mode, slo)
        alloc = {d: LLMAlloc(tp=c.tp, gpu_frac=c.gpu_frac, replicas=c.replicas) for d, c in out.choice.items()}
        try:
            placement = place(alloc, topo, gpu_type=planner.gpu_name)
        except PlacementError as exc:
            w = exc.want
            if policy != "milp" or w is None or attempt == MAX_REPLANS:
                hint = "" if policy == "milp" else "; the milp policy re-plans around such failures"
                raise PlacementError(f"{exc} (after {attempt} re-plan(s){hint})", w, exc.placed_of_shape) from None
            if w.gpu_frac >= 1.0:
                cap = min(planner.domain_caps.get(w.tp, math.inf), exc.placed_of_shape)
                planner.domain_caps[w.tp] = int(cap)
                notes.append(f"placement failed ({exc}); re-planned with at most {int(cap)} group(s) of {w.tp} "
                             f"GPUs inside NVLink domains")
            else:
                planner.n_gpus -= 1
                notes.append(f"placement failed ({exc}); re-planned on {planner.n_gpus} GPUs")
            continue
        out.notes.extend(notes)
        return out, placement
    raise AssertionError("unreachable")


def placement_rows(placement: Any, topo: Any) -> list[tuple[str, str, str]]:
    """(node, leaf, GPU → instances) per node used, for the human table."""
    rows = []
    for name in placement.nodes():
        node = topo.node(name)
        per_gpu: dict[int, list[str]] = {}
        for p in placement.instances:
            if p.node == name:
                for g in p.gpus:
                    per_gpu.setdefault(g, []).append(f"{p.llm}·{p.replica}" + (f" ({p.gpu_frac:g})" if p.gpu_frac < 1 else ""))
        cells, run = [], []   # consecutive GPUs with the same instances print as one range
        for g in sorted(per_gpu) + [None]:
            if run and (g is None or g != run[-1] + 1 or per_gpu[g] != per_gpu[run[0]]):
                span = str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
                cells.append(f"{span}: {' + '.join(per_gpu[run[0]])}")
                run = []
            if g is not None:
                run.append(g)
        rows.append((name, str(node.leaf or "-"), "   ".join(cells)))
    return rows


def print_placement(placement: Any, topo: Any) -> None:
    """The placement as a table per node, and its fragmentation."""
    from rich.table import Table

    from scepsy_hpc.commands.common import make_console

    c = make_console()
    t = Table(title="placement (instance = LLM·replica; GPU fraction in brackets)")
    t.add_column("node", no_wrap=True)
    t.add_column("leaf", no_wrap=True)
    t.add_column("GPU: instances")
    for row in placement_rows(placement, topo):
        t.add_row(*row)
    c.print(t)
    f = placement.fragmentation
    c.print(f"nodes {f.nodes_used} (lower bound {f.nodes_min}), leaf switches {f.leaves_used} (lower bound {f.leaves_min}), "
            f"{f.partial_gpus} partly used GPU(s), {f.idle_gpus_on_used_nodes} idle GPU(s) on used nodes, "
            f"{f.free_whole_nodes} whole node(s) left free; placed in {placement.solve_time_s * 1000:.1f} ms ({placement.method})")


def check_plot_args(args: Any) -> None:
    """--plot draws the placement, which needs --cluster."""
    if getattr(args, "plot", None) and not args.cluster:
        raise SpecError("--plot draws the placement: give --cluster CLUSTER.yaml to place the plan")
