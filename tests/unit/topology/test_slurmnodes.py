"""`scontrol show node` (both forms) and `sinfo -N` into SlurmNode: our own captures, GRES forms, errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.topology.model import SlurmNode
from scepsy_hpc.topology.slurmnodes import SINFO_ARGS, SINFO_FORMAT, parse_scontrol_nodes, parse_sinfo

DATA = Path(__file__).resolve().parents[2] / "data" / "topology"
MULTI = (DATA / "scontrol-show-node-multiline.txt").read_text(encoding="utf-8")
ONELINE = (DATA / "scontrol-show-node-oneliner.txt").read_text(encoding="utf-8")
SINFO = (DATA / "sinfo-nodes.txt").read_text(encoding="utf-8")

WANT = {
    "gpu01": SlurmNode("gpu01", 4, "h100", 2, "mixed", ("gpu", "all"), 64, 1031000, ("h100", "nvlink", "ib")),
    "gpu02": SlurmNode("gpu02", 4, "h100", 0, "idle+drain", ("gpu", "all"), 64, 1031000, ("h100", "nvlink", "ib")),
    "gpu03": SlurmNode("gpu03", 8, "a100", 0, "down*", ("gpu",), 128, 2063000, ("a100", "ib")),
    "cpu01": SlurmNode("cpu01", 0, None, 0, "idle", ("cpu", "all"), 128, 515000, ()),
    "mix01": SlurmNode("mix01", 6, "v100", 3, "mixed", ("gpu",), 32, 385000, ("a100", "v100")),
    "gpu04": SlurmNode("gpu04", 2, "l40s", 0, "idle+cloud+powered_down", ("cloud",), 48, 191000, ("l40s", "cloud")),
}
USABLE = {"gpu01", "cpu01", "mix01"}


def error_of(parse, text: str, source: str = "src") -> str:
    with pytest.raises(TopologyError) as ei:
        parse(text, source)
    msg = str(ei.value)
    assert msg.startswith(f"{source} line "), msg
    return msg


def line_no(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), start=1) if needle in ln)


def one(gres: str = "gpu:4", extra: str = "") -> SlurmNode:
    (node,) = parse_scontrol_nodes(f"NodeName=n1 CPUTot=8 RealMemory=1000 Gres={gres} State=IDLE {extra}\n")
    return node


# --- scontrol show node ---------------------------------------------------------------------------------


def test_multiline_capture():
    nodes = parse_scontrol_nodes(MULTI, "multi")
    assert [n.name for n in nodes] == list(WANT)
    for n in nodes:
        assert replace(n, gpus_alloc_idx=None) == WANT[n.name]
    assert {n.name: n.gpus_alloc_idx for n in nodes}["gpu01"] == (0, 1)
    assert {n.name for n in nodes if n.usable} == USABLE


def test_oneliner_reads_the_same():
    assert parse_scontrol_nodes(ONELINE) == parse_scontrol_nodes(MULTI)
    assert len(ONELINE.splitlines()) == len(WANT)


def test_reason_text_with_key_like_words_does_not_override():
    # gpu02's Reason= says "State=fallen off the bus": the first State= is the node's
    assert "State=fallen" in MULTI
    assert {n.name: n.state for n in parse_scontrol_nodes(MULTI)}["gpu02"] == "idle+drain"


@pytest.mark.parametrize("gres, gpus, gtype", [
    ("gpu:4", 4, None),
    ("gpu:h100:4(S:0-1)", 4, "h100"),
    ("gpu:a100:4,gpu:v100:2", 6, "a100"),
    ("gpu:a100:2(S:0),gpu:v100:2(S:1)", 4, "a100"),              # a tie keeps the first
    ("gpu:4(S:0,2-3),mps:400(S:0)", 4, None),                    # commas inside (...) and other GRES
    ("gpu:nvidia_h100_80gb_hbm3:8(S:0-1),shard:nvidia_h100_80gb_hbm3:64(S:0-1)", 8, "nvidia_h100_80gb_hbm3"),
    ("gpu:tesla:no_consume:2", 2, "tesla"),
    ("gpu:tesla", 1, "tesla"),
    ("(null)", 0, None),
    ("nic:2", 0, None),
])
def test_gres_forms(gres, gpus, gtype):
    node = one(gres)
    assert (node.gpus, node.gpu_type) == (gpus, gtype)


@pytest.mark.parametrize("extra, alloc", [
    ("GresUsed=gpu:h100:3(IDX:0-1,3)", 3),
    ("GresUsed=gpu:(null):0(IDX:N/A)", 0),
    ("GresUsed=gpu:a100:1(IDX:0),gpu:v100:2(IDX:2-3) AllocTRES=gres/gpu=9", 3),   # GresUsed first
    ("AllocTRES=cpu=4,mem=32G,gres/gpu=2,gres/gpu:h100=2", 2),
    ("AllocTRES=cpu=4,gres/gpu:a100=1,gres/gpu:v100=2", 3),
    ("AllocTRES=", 0),
])
def test_allocated_gpus(extra, alloc):
    assert one("gpu:4", extra).gpus_alloc == alloc


@pytest.mark.parametrize("state, want, usable", [
    ("IDLE", "idle", True),
    ("MIXED+DRAIN", "mixed+drain", False),
    ("DOWN+DRAIN+NOT_RESPONDING", "down+drain*", False),
    ("IDLE+NOT_RESPONDING", "idle*", False),
    ("ALLOCATED+COMPLETING", "allocated+completing", True),
    ("IDLE+MAINTENANCE+RESERVED", "idle+maintenance+reserved", False),
])
def test_scontrol_states(state, want, usable):
    (node,) = parse_scontrol_nodes(f"NodeName=n1 State={state}")
    assert node.state == want
    assert node.usable is usable


def test_corrupted_multiline_names_the_line():
    k = line_no(MULTI, "CPUTot=128 CPULoad=0.10")
    bad = MULTI.replace("CPUTot=128 CPULoad=0.10", "CPUTot=12x8 CPULoad=0.10")
    msg = error_of(parse_scontrol_nodes, bad, "show-node")
    assert msg.startswith(f"show-node line {k}: CPUTot='12x8': expected a whole number")


def test_corrupted_gres_names_the_line():
    k = line_no(MULTI, "Gres=gpu:l40s:2(S:0)")
    msg = error_of(parse_scontrol_nodes, MULTI.replace("Gres=gpu:l40s:2(S:0)", "Gres=gpu:l40s:two(S:0)"))
    assert msg.startswith(f"src line {k}: Gres=gpu:l40s:two(S:0): cannot read the GPU count")


@pytest.mark.parametrize("text, line, needle", [
    ("Node gpu99 not found\n", 1, "expected a node entry starting with NodeName="),
    ("NodeName=n1 State=IDLE\nCPUTot=4\n", 2, "expected a node entry starting with NodeName="),
    ("NodeName=n1 CPUTot=4\n   RealMemory=1000\n", 1, "node 'n1' has no State="),
    ("NodeName=n1 State=IDLE\n   RealMemory=lots\n", 2, "RealMemory='lots'"),
    ("NodeName=n1 State=IDLE\n   AllocTRES=gres/gpu=N/A\n", 2, "gres/gpu='N/A' is not a GPU count"),
    ("NodeName= State=IDLE\n", 1, "NodeName= has no value"),
])
def test_scontrol_errors(text, line, needle):
    msg = error_of(parse_scontrol_nodes, text)
    assert msg.startswith(f"src line {line}:"), msg
    assert needle in msg


# --- sinfo -----------------------------------------------------------------------------------------------


def test_sinfo_format_is_what_the_parser_reads():
    assert SINFO_FORMAT.count("|") == 6
    assert SINFO_ARGS[-1] == SINFO_FORMAT and {"-N", "-h"} <= set(SINFO_ARGS)


def test_sinfo_capture_merges_partitions():
    nodes = {n.name: n for n in parse_sinfo(SINFO, "sinfo")}
    assert len(nodes) == len(WANT) < len(SINFO.splitlines())
    assert nodes["gpu01"].partitions == ("gpu", "all")
    assert nodes["gpu02"].state == "drained" and nodes["gpu03"].state == "down*"
    assert nodes["gpu04"].state == "idle+powered_down"
    assert all(n.gpus_alloc == 0 for n in nodes.values())


def test_sinfo_agrees_with_scontrol():
    shown = {n.name: n for n in parse_scontrol_nodes(MULTI)}
    for n in parse_sinfo(SINFO):
        s = shown[n.name]
        assert (n.gpus, n.gpu_type, n.partitions, n.cpus, n.mem_mib, n.features) == \
               (s.gpus, s.gpu_type, s.partitions, s.cpus, s.mem_mib, s.features), n.name
        assert n.usable is s.usable, n.name


@pytest.mark.parametrize("state, want, usable", [
    ("mix", "mixed", True), ("alloc", "allocated", True), ("drng", "draining", False),
    ("drain", "drained", False), ("resv", "reserved", False), ("unk*", "unknown*", False),
    ("idle~", "idle+powered_down", False), ("idle*", "idle*", False), ("maint$", "maint+maintenance", False),
])
def test_sinfo_compact_states(state, want, usable):
    (node,) = parse_sinfo(f"n1|p|{state}|(null)|4|1000|(null)")
    assert node.state == want
    assert node.usable is usable


def test_sinfo_header_and_hostlists():
    text = "NODELIST|PARTITION|STATE|GRES|CPUS|MEMORY|AVAIL_FEATURES\nn[1-3]|gpu*|idle|gpu:2|8|1000|a,b\n"
    nodes = parse_sinfo(text)
    assert [n.name for n in nodes] == ["n1", "n2", "n3"]
    assert nodes[2] == SlurmNode("n3", 2, None, 0, "idle", ("gpu",), 8, 1000, ("a", "b"))


@pytest.mark.parametrize("text, line, needle", [
    ("n1|gpu|idle|gpu:2|8|1000\n", 1, "expected 7 '|'-separated fields"),
    ("n1|gpu|idle|gpu:2|8|1000|a\nn2|gpu|idle|gpu:2|8+|1000|a\n", 2,
     "CPUs='8+': expected a whole number; run sinfo with -N"),
    ("n1|gpu|idle|gpu:h100:x|8|1000|(null)\n", 1, "cannot read the GPU count"),
    ("n[1-|gpu|idle|gpu:2|8|1000|(null)\n", 1, "node list 'n[1-'"),
    ("n1|gpu||gpu:2|8|1000|(null)\n", 1, "needs a node name and a state"),
])
def test_sinfo_errors(text, line, needle):
    msg = error_of(parse_sinfo, text)
    assert msg.startswith(f"src line {line}:"), msg
    assert needle in msg


def test_corrupted_sinfo_capture_names_the_line():
    lines = SINFO.splitlines()
    lines[4] = lines[4].replace("|64|", "|sixty-four|")
    msg = error_of(parse_sinfo, "\n".join(lines), "sinfo-nodes.txt")
    assert msg.startswith("sinfo-nodes.txt line 5: CPUs='sixty-four'")


def test_gres_used_indices_decide_which_gpus_are_free() -> None:
    from scepsy_hpc.topology.build import from_slurm
    from scepsy_hpc.topology.model import Network

    text = ("NodeName=g1 Gres=gpu:h100:4(S:0-1) GresUsed=gpu:h100:2(IDX:1,3) State=MIXED Partitions=gpu\n"
            "NodeName=g2 Gres=gpu:h100:4 GresUsed=gpu:h100:0(IDX:N/A) State=IDLE Partitions=gpu\n"
            "NodeName=g3 Gres=gpu:h100:4 AllocTRES=cpu=4,gres/gpu=1 State=MIXED Partitions=gpu\n")
    nodes = parse_scontrol_nodes(text, "nodes.txt")
    assert [n.gpus_alloc_idx for n in nodes] == [(1, 3), (), None]
    topo = from_slurm(nodes, Network(), "h100-sxm", 80.0)
    free = {n.name: n.free() for n in topo.nodes}
    assert free == {"g1": [[0, 2]], "g2": [[0, 1, 2, 3]], "g3": [[1, 2, 3]]}
