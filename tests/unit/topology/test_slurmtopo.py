"""Slurm topology parsers: real captures against their ground truth, corrupted copies, and each rule."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.topology.model import Network
from scepsy_hpc.topology.slurmtopo import (
    TopologySet,
    parse_scontrol_topology,
    parse_topology_conf,
    parse_topology_yaml,
)

CAPTURES = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "topology-captures"
DATA = Path(__file__).resolve().parents[2] / "data" / "topology"
KINDS = {"topology-conf": parse_topology_conf, "slurm-topology": parse_scontrol_topology}


def _expected() -> dict:
    path = CAPTURES / "EXPECTED.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


EXPECTED = _expected()
SLURM = sorted(n for n, e in EXPECTED.items() if e.get("kind") in KINDS)
TREES = [n for n in SLURM if "switches" in EXPECTED[n]]


def need_captures() -> None:
    """Skip without the third-party captures, except in CI, which must have them."""
    if not SLURM:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CAPTURES} is missing or has no Slurm captures; CI must provide them")
        pytest.skip(f"third-party captures not found at {CAPTURES}")


def capture(name: str):
    need_captures()
    return (CAPTURES / name).read_text(encoding="utf-8"), KINDS[EXPECTED[name]["kind"]]


def error_of(parse, text: str, source: str, **kw) -> str:
    with pytest.raises(TopologyError) as ei:
        parse(text, source, **kw)
    msg = str(ei.value)
    assert msg.startswith(source), msg
    return msg


def test_captures_cover_both_forms():
    need_captures()
    kinds = {EXPECTED[n]["kind"] for n in SLURM}
    assert kinds == set(KINDS)
    assert any("blocks" in EXPECTED[n] for n in SLURM) and any("switches" in EXPECTED[n] for n in SLURM)


@pytest.mark.parametrize("name", SLURM or ["<no captures>"])
def test_capture_matches_ground_truth(name):
    text, parse = capture(name)
    want = EXPECTED[name]
    net = parse(text, name)
    got = net.as_json()
    for key in ("switches", "derived_levels", "blocks", "block_sizes"):
        assert got.get(key) == want.get(key), key
    if "block_index" in want:
        assert {b.name: b.index for b in net.blocks.values()} == want["block_index"]
    if "switches" in want:   # file order, not just the same mapping
        assert list(net.switches) == list(want["switches"])


# --- corrupted copies of every capture: the error names the source and the line -----------------------


def data_lines(text: str) -> list[int]:
    """0-based indexes of lines holding a record (not blank, not a comment)."""
    return [i for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("name", SLURM or ["<no captures>"])
def test_corrupt_unknown_key(name):
    text, parse = capture(name)
    lines = text.splitlines()
    k = [i for i in data_lines(text) if "Nodes=" in lines[i]][-1]
    lines[k] = lines[k].replace("Nodes=", "Ndoes=", 1)
    msg = error_of(parse, "\n".join(lines), name)
    assert f"{name} line {k + 1}: unknown key 'Ndoes'" in msg
    assert "(did you mean 'Nodes'?)" in msg


@pytest.mark.parametrize("name", SLURM or ["<no captures>"])
def test_corrupt_unbalanced_bracket(name):
    text, parse = capture(name)
    lines = text.splitlines()
    k = [i for i in data_lines(text) if "]" in lines[i]][-1]
    lines[k] = lines[k].replace("]", "", 1)
    msg = error_of(parse, "\n".join(lines), name)
    assert f"{name} line {k + 1}:" in msg
    assert "'['" in msg


@pytest.mark.parametrize("name", TREES or ["<no captures>"])
def test_corrupt_missing_child_switch(name):
    text, parse = capture(name)
    lines = text.splitlines()
    parents = [i for i in data_lines(text) if "Switches=" in lines[i]]
    if parents:   # point an existing reference at nothing
        k = parents[0]
        head, _, kids = lines[k].partition("Switches=")
        lines[k] = f"{head}Switches=ghost-switch,{kids}"
    else:         # leaves only: add a parent above a switch nobody defines
        lines.append("SwitchName=top Switches=ghost-switch")
        k = len(lines) - 1
    msg = error_of(parse, "\n".join(lines), name)
    assert f"{name} line {k + 1}: Switches= names 'ghost-switch', which no switch defines" in msg


@pytest.mark.parametrize("name", SLURM or ["<no captures>"])
def test_corrupt_duplicated_record(name):
    text, parse = capture(name)
    lines = text.splitlines()
    first = data_lines(text)[0]
    lines.append(lines[first])
    msg = error_of(parse, "\n".join(lines), name)
    what = "switch" if "switches" in EXPECTED[name] else "block"
    assert f"{name} line {len(lines)}: {what} " in msg
    assert f"is defined twice (first at line {first + 1})" in msg


# --- topology.conf ------------------------------------------------------------------------------------


def test_conf_syntax_variants():
    text = ("# fabric\n"
            "switchname=leaf1\tnodes=n[1-2]   # two nodes\n"
            "SWITCHNAME=leaf2 Nodes = n3 \\\n"
            "   LinkSpeed=100   \n"
            "\n"
            "SwitchName=spine Switches=\"leaf[1-2]\" Level=1")
    net = parse_topology_conf(text, "t.conf")
    assert list(net.switches) == ["leaf1", "leaf2", "spine"]
    assert net.switches["leaf1"].nodes == ("n1", "n2")
    assert net.switches["leaf2"].nodes == ("n3",)
    assert net.switches["spine"].children == ("leaf1", "leaf2")
    assert net.switches["spine"].level == 1 and net.switches["leaf1"].level is None
    assert net.derived_levels() == {"leaf1": 0, "leaf2": 0, "spine": 1}


def test_conf_error_message_form():
    msg = error_of(parse_topology_conf, "SwitchName=s1 Nodes=n1\nSwitchName=s2 Swtiches=s1\n", "topology.conf")
    assert msg == ("topology.conf line 2: unknown key 'Swtiches'; valid keys: SwitchName, Switches, Nodes, "
                   "Level, LinkSpeed (did you mean 'Switches'?)")


def test_conf_continuation_error_names_the_physical_line():
    msg = error_of(parse_topology_conf, "SwitchName=s1 \\\n  Nodes=n1 \\\n  Bogus=2\n", "t.conf")
    assert msg.startswith("t.conf line 3: unknown key 'Bogus'")


@pytest.mark.parametrize("text, line, needle", [
    ("SwtichName=s1 Nodes=n1", 1, "did you mean 'SwitchName'"),
    ("Nodes=n1 SwitchName=s1", 1, "a line starts with one of: SwitchName, BlockName, BlockSizes"),
    ("SwitchName=s1 Nodes=n1\nSwitchName=s2 Nodes=n2 Switches=s1", 2, "both Nodes= and Switches="),
    ("SwitchName=s1 Nodes=n1 LinkSpeed=fast", 1, "LinkSpeed='fast': expected a whole number"),
    ("SwitchName=s1 Nodes=n1 Level=-1", 1, "Level='-1'"),
    ("SwitchName=s1 Nodes=n1 oops", 1, "expected Key=Value, got 'oops'"),
    ("SwitchName=s1 Nodes=n1 Nodes=n2", 1, "Nodes= given twice"),
    ("SwitchName=s1 Nodes= Switches=s2", 1, "Nodes= has no value"),
    ("SwitchName=s1 Nodes=n[1-x]", 1, "bad range"),
    (f"SwitchName={'s' * 65} Nodes=n1", 1, "longer than 64"),
    ("SwitchName=a Switches=b\nSwitchName=b Switches=c\nSwitchName=c Switches=a", 1, "cycle: a -> b -> c -> a"),
    ("SwitchName=a Nodes=n1\nSwitchName=b Switches=b", 2, "cycle: b -> b"),
    ("RingName=r0 Nodes=n[1-8]", 1, "topology/ring"),
    ("SwitchName=s1 Nodes=n1\nBlockName=b1 Nodes=n2", 2, "mixes switch"),
    ("BlockName=b1 Nodes=n[1-4]\nBlockSizes=4,12", 2, "12 is not the base size 4 times a power of two"),
    ("BlockName=b1\nBlockName=b2", 1, "no block lists any node"),
])
def test_conf_errors(text, line, needle):
    msg = error_of(parse_topology_conf, text, "t.conf")
    assert msg.startswith(f"t.conf line {line}:"), msg
    assert needle in msg


def test_conf_switch_without_children_is_an_empty_leaf():
    # slurmctld takes it ("empty leaf switch"), so we do too
    net = parse_topology_conf("SwitchName=spare\nSwitchName=s1 Nodes=n1\nSwitchName=top Switches=spare,s1")
    assert net.switches["spare"].nodes == () and net.switches["spare"].children == ()
    assert net.derived_levels() == {"spare": 0, "s1": 0, "top": 1}


def test_conf_node_under_two_leaves_warns_or_fails_when_strict(caplog):
    text = "SwitchName=a Nodes=n[1-2]\nSwitchName=b Nodes=n[2-3]\n"
    with caplog.at_level(logging.WARNING, logger="scepsy_hpc.topology"):
        net = parse_topology_conf(text, "t.conf")
    assert net.switches["b"].nodes == ("n2", "n3")
    assert "t.conf line 2: node 'n2' is under leaf switches 'a' (line 1) and 'b'" in caplog.text
    msg = error_of(parse_topology_conf, text, "t.conf", strict=True)
    assert msg.startswith("t.conf line 2: node 'n2'")


def test_conf_block_form():
    text = ("BlockName=b1 Nodes=node[01-04]\nBlockName=b2 Nodes=node[05-08]\n"
            "BlockName=b3 Nodes=node[09-12]\nBlockName=b4 Nodes=node[13-16]\nBlockSizes=4,16\n")
    net = parse_topology_conf(text)
    assert list(net.blocks) == ["b1", "b2", "b3", "b4"]
    assert net.blocks["b3"].nodes[0] == "node09"
    assert [b.index for b in net.blocks.values()] == [0, 1, 2, 3]
    assert {b.size for b in net.blocks.values()} == {4}
    assert net.block_sizes == (4, 16)
    assert not net.switches


def test_conf_block_size_defaults_to_first_block():
    net = parse_topology_conf("BlockName=b1 Nodes=n[1-18]\nBlockName=b2 Nodes=n[19-36]")
    assert net.block_sizes == () and net.blocks["b2"].size == 18
    assert net.as_json()["block_sizes"] == [18]


def test_conf_only_comments_is_an_empty_network():
    assert parse_topology_conf("# nothing yet\n\n") == Network()


# --- scontrol show topology ---------------------------------------------------------------------------

SHOW_2205 = """\
SwitchName=leaf1 Level=0 LinkSpeed=1 Nodes=node[01-02]
SwitchName=leaf2 Level=0 LinkSpeed=1 Nodes=node03,node04
SwitchName=spine Level=1 LinkSpeed=1 Nodes=node[01-04] Switches=leaf1,leaf2
"""


def test_show_upper_switch_nodes_are_dropped():
    net = parse_scontrol_topology(SHOW_2205)
    assert net.switches["spine"].nodes == ()
    assert net.switches["spine"].children == ("leaf1", "leaf2")
    assert net.switches["leaf2"].nodes == ("node03", "node04")
    assert net.derived_levels() == {"leaf1": 0, "leaf2": 0, "spine": 1}
    assert net.leaf_of()["node04"] == "leaf2"


def test_show_filtered_output_is_refused():
    filtered = "\n".join(SHOW_2205.splitlines()[1:])   # `scontrol show topology node03`
    msg = error_of(parse_scontrol_topology, filtered, "show")
    assert msg.startswith("show line 2: Switches= names 'leaf1'")
    assert "filtered" in msg


def test_show_aggregated_blocks_give_sizes_only():
    text = ("BlockName=b1 BlockIndex=0 Nodes=n[01-18] BlockSize=18\n"
            "BlockName=b2 BlockIndex=1 Nodes=n[19-36] BlockSize=18\n"
            "AggregatedBlock=b[1-2] BlockIndex=2 Nodes=n[01-36] BlockSize=36\n")
    net = parse_scontrol_topology(text)
    assert list(net.blocks) == ["b1", "b2"]
    assert net.block_sizes == (18, 36)
    assert net.blocks["b2"].index == 1 and net.blocks["b2"].size == 18


def test_show_rejects_conf_only_keys():
    msg = error_of(parse_scontrol_topology, "BlockName=b1 BlockIndex=0 Nodes=n1 BlockSize=1\nBlockSizes=1", "s")
    assert msg.startswith("s line 2: unknown key 'BlockSizes'")
    assert "AggregatedBlock" in msg


def test_show_empty_output_is_flat():
    assert parse_scontrol_topology("") == Network()


# --- topology.yaml ------------------------------------------------------------------------------------


def test_yaml_file():
    topo = parse_topology_yaml((DATA / "topology-yaml-tree-block.yaml").read_text(encoding="utf-8"))
    assert isinstance(topo, TopologySet)
    assert list(topo.networks) == ["fabric", "nvl72", "anywhere"]
    assert topo.kinds == {"fabric": "tree", "nvl72": "block", "anywhere": "flat"}
    assert topo.default == "fabric"
    tree = topo.cluster_default()
    assert tree.switches["spine"].children == ("leaf1", "leaf2")
    assert tree.switches["leaf2"].nodes == ("gpu05", "gpu06", "gpu07", "gpu08")
    assert tree.derived_levels()["spine"] == 1
    blocks = topo.networks["nvl72"]
    assert blocks.block_sizes == (18, 36)
    assert [(b.name, b.index, b.size, len(b.nodes)) for b in blocks.blocks.values()] == [
        ("rack1", 0, 18, 18), ("rack2", 1, 18, 18)]
    assert topo.networks["anywhere"] == Network()


@pytest.mark.parametrize("flags, default", [((False, False), "t0"), ((False, True), "t1"), ((True, True), "t0")])
def test_yaml_default_is_first_marked_else_first(flags, default):
    text = "".join(f"- topology: t{i}\n  cluster_default: {str(f).lower()}\n  flat: true\n"
                   for i, f in enumerate(flags))
    assert parse_topology_yaml(text).default == default


YAML_BASE = """\
- topology: main
  cluster_default: true
  tree:
    switches:
      - switch: top
        children: s[1-2]
      - switch: s1
        nodes: n[1-2]
      - switch: s2
        nodes: n[3-4]
"""


@pytest.mark.parametrize("old, new, line, needle", [
    ("children: s[1-2]", "chilren: s[1-2]", 6, "unknown key 'chilren' in a switch; valid keys: switch, children, "
                                               "nodes (did you mean 'children'?)"),
    ("children: s[1-2]", "children: s[1-3]", 6, "Switches= names 's3', which no switch defines"),
    ("nodes: n[3-4]", "nodes: n[3-4", 10, "unclosed '['"),
    ("- switch: s2", "- switch: s1", 9, "switch 's1' is defined twice (first at line 7)"),
    ("  cluster_default: true", "  cluster_default: yes please", 2, "cluster_default must be true or false"),
    ("  cluster_default: true", "  cluster_default: true\n  flat: true", 1, "exactly one of tree, block"),
    ("      - switch: s2\n", "      - switch: s2\n        children: s1\n", 9, "has both children and nodes"),
    ("        nodes: n[1-2]", "        nodes: n[1-2]\n       bad: indent", 9, "YAML syntax error"),
])
def test_yaml_errors(old, new, line, needle):
    assert old in YAML_BASE
    msg = error_of(parse_topology_yaml, YAML_BASE.replace(old, new, 1), "topo.yaml")
    assert msg.startswith(f"topo.yaml line {line}:"), msg
    assert needle in msg


@pytest.mark.parametrize("text, line, needle", [
    ("", 1, "empty; expected a list of topologies"),
    ("topology: main\nflat: true\n", 1, "must be a list"),
    ("- topology: a\n  flat: true\n- topology: a\n  flat: true\n", 3,
     "topology 'a' is defined twice (first at line 1)"),
    ("- topology: a\n  block:\n    block_sizes: [4, 6]\n    blocks:\n      - block: b\n        nodes: n[1-4]\n", 3,
     "6 is not the base size 4 times a power of two"),
    ("- topology: a\n  tree:\n    switches: []\n", 3, "tree has no switches"),
    ("- cluster_default: true\n  flat: true\n", 1, "a topology needs `topology: <name>`"),
])
def test_yaml_document_errors(text, line, needle):
    msg = error_of(parse_topology_yaml, text, "topo.yaml")
    assert msg.startswith(f"topo.yaml line {line}:"), msg
    assert needle in msg


def test_yaml_unmodelled_kind_reads_as_flat(caplog):
    text = "- topology: r\n  cluster_default: true\n  ring:\n    rings:\n      - ring: r0\n        nodes: n[1-8]\n"
    with caplog.at_level(logging.WARNING, logger="scepsy_hpc.topology"):
        topo = parse_topology_yaml(text, "t.yaml")
    assert topo.kinds == {"r": "ring"} and topo.cluster_default() == Network()
    assert "ring, which scepsy does not model" in caplog.text
