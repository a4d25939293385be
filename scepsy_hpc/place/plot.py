"""A picture of a placement: nodes (grouped by leaf switch) as columns of GPUs, coloured by LLM."""

from __future__ import annotations

from pathlib import Path

from scepsy_hpc.errors import SpecError
from scepsy_hpc.place.placement import Placement
from scepsy_hpc.topology.model import Topology

NODES_PER_ROW = 16


def plot_placement(placement: Placement, topo: Topology, path: str | Path, *, title: str = "",
                   only_used_leaves: bool = True) -> Path:
    """Draw `placement` on `topo` into a PNG: one column per node, one cell per GPU; fractional
    instances split their GPU's cell by share; busy GPUs (not ours) grey; leaf switches labelled."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        raise SpecError("--plot needs matplotlib: pip install 'scepsy-hpc[plot]'") from None
    used = set(placement.nodes())
    leaves = {n.leaf for n in topo.nodes if n.name in used}
    nodes = [n for n in topo.nodes if not only_used_leaves or n.leaf in leaves or n.name in used]
    nodes.sort(key=lambda n: (str(n.leaf), n.name))
    llms = list(dict.fromkeys(p.llm for p in placement.instances))
    cmap = plt.get_cmap("tab20" if len(llms) > 10 else "tab10")
    colour = {llm: cmap(i % cmap.N) for i, llm in enumerate(llms)}
    cells: dict[tuple[str, int], list[tuple[str, float, str]]] = {}
    for p in placement.instances:
        for i, g in enumerate(p.gpus):
            # the instance's label on its first GPU: "llm·replica"
            label = f"{p.llm}·{p.replica}" if i == 0 else ""
            cells.setdefault((p.node, g), []).append((p.llm, p.gpu_frac, label))
    max_gpus = max(n.n_gpus for n in nodes)
    rows = (len(nodes) + NODES_PER_ROW - 1) // NODES_PER_ROW
    cols = min(len(nodes), NODES_PER_ROW)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * cols + 2.5), 0.45 * (max_gpus + 2.5) * rows + 1.2))
    for k, node in enumerate(nodes):
        x0, y0 = k % NODES_PER_ROW, -(k // NODES_PER_ROW) * (max_gpus + 2.5)
        free = {g for d in node.free() for g in d}
        for d_i, dom in enumerate(node.nvlink_domains):
            ys = [y0 + max_gpus - 1 - g for g in dom]
            ax.add_patch(Rectangle((x0 + 0.02, min(ys) - 0.02), 0.84, max(ys) - min(ys) + 1.04, fill=False,
                                   lw=0.6, ls=":", ec="0.4"))
        for g in range(node.n_gpus):
            y = y0 + max_gpus - 1 - g
            if g not in free:
                ax.add_patch(Rectangle((x0 + 0.05, y + 0.05), 0.78, 0.9, color="0.8", hatch="//", fill=True))
                continue
            ax.add_patch(Rectangle((x0 + 0.05, y + 0.05), 0.78, 0.9, fill=False, ec="0.6", lw=0.5))
            left = x0 + 0.05
            for llm, frac, label in cells.get((node.name, g), []):
                ax.add_patch(Rectangle((left, y + 0.05), 0.78 * frac, 0.9, fc=colour[llm], ec="white", lw=1.0))
                if label and len(nodes) <= 32:
                    ax.text(left + 0.39 * frac, y + 0.5, label, ha="center", va="center", fontsize=5,
                            rotation=90 if frac < 1 else 0, color="white")
                left += 0.78 * frac
        ax.text(x0 + 0.44, y0 + max_gpus + 0.1, node.name, ha="center", va="bottom", fontsize=7, rotation=45)
        ax.text(x0 + 0.44, y0 - 0.4, str(node.leaf or ""), ha="center", va="top", fontsize=6, color="0.35")
    ax.set_xlim(-0.3, cols + 0.2)
    ax.set_ylim(-(rows - 1) * (max_gpus + 2.5) - 1.2, max_gpus + 1.6)
    ax.set_axis_off()
    fr = placement.fragmentation
    ax.set_title((title + "\n" if title else "") +
                 f"{len(placement.instances)} instances on {fr.gpus_used} GPUs of {fr.nodes_used} node(s) "
                 f"(≥ {fr.nodes_min}), {fr.leaves_used} leaf switch(es); {fr.partial_gpus} partly used GPU(s)",
                 fontsize=9)
    handles = [Patch(color=colour[m], label=m) for m in llms] + [Patch(color="0.8", hatch="//", label="busy (not ours)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out
