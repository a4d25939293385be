"""Our hostlist expander and the fake Slurm's compressor against python-hostlist, on Slurm's documented forms.

The forms are those of slurm.conf(5) (NodeName=linux[0-64], zero padding, several bracket groups, comma
lists) and scontrol(1) `show hostnames`/`show hostlist`. Ours expands; python-hostlist is the reference.
"""

from __future__ import annotations

import hostlist as reference
import pytest

from scepsy_hpc.backend.fake import hostlist as compress
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.cluster import load_cluster
from scepsy_hpc.spec.hostlist import MAX_HOSTS, expand_hostlist

VALID = [
    "node[1-4]",
    "node[01-10]",  # zero padding kept
    "node[001-3]",  # the width is the first bound's
    "node[9-11]", "node[09-11]",
    "n[1-3,7]",
    "gpu[01-04,07]",
    "rack[1-2]-node[1-3]",  # several bracket groups: the product, leftmost varying slowest
    "a[1-2]b[1-2]", "node[1-2][3-4]", "node[1,2]x",
    "a,b[1-2]", "n1,n[3-4]", "x[1-2],y",
    "node5", "n[7]", "n[0]", "n[00]",
    "node-[1-2].ib", "/dev/nvidia[0-3]",  # gres.conf File= uses the same syntax
    "node[1-2],node[1-2]",  # duplicates kept (Slurm dedups where it keeps a bitmap; so do our callers)
    "",
    "a,,b",
]
BAD = {
    "node[3-1]": "runs backwards",
    "node[": "unclosed '['",
    "node[1-2": "unclosed '['",
    "node]": "unbalanced ']'",
    "node[a-b]": "bad range 'a-b'",
    "n[]": "bad range ''",
    "n[1 - 2]": "bad range '1 - 2'",
}


@pytest.mark.parametrize("expr", VALID)
def test_expansion_matches_python_hostlist(expr: str) -> None:
    ours = expand_hostlist(expr)
    assert ours == reference.expand_hostlist(expr, allow_duplicates=True)
    assert ours or expr == ""


def test_whitespace_around_names_is_dropped() -> None:
    # python-hostlist keeps the spaces in the names ("   " is one host called "   "); Slurm and we do not.
    assert expand_hostlist("   ") == [] and expand_hostlist("a, b[1-2] ") == ["a", "b1", "b2"]


@pytest.mark.parametrize("expr", sorted(BAD))
def test_bad_forms_are_refused_by_both_and_ours_says_why(expr: str) -> None:
    with pytest.raises(ValueError) as ours:
        expand_hostlist(expr)
    with pytest.raises(reference.BadHostlist):
        reference.expand_hostlist(expr)
    assert BAD[expr] in str(ours.value) and repr(expr) in str(ours.value)


@pytest.mark.parametrize("expr", ["node[1-100000000]", "node[0-100000]", "rack[1-1000]-node[1-1000]",
                                  "a[1-60000],b[1-60000]"])
def test_huge_hostlists_are_refused_before_expanding(expr: str) -> None:
    with pytest.raises(ValueError) as exc:
        expand_hostlist(expr)
    assert f"at most {MAX_HOSTS}" in str(exc.value)
    assert len(expand_hostlist(f"n[1-{MAX_HOSTS}]")) == MAX_HOSTS  # the bound itself is allowed


def test_a_bad_hostlist_in_a_cluster_file_names_file_and_line(tmp_path, gpus) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("node_groups:\n  - nodes: gpu[01-04]\n    gpu_type: h100-sxm\n    gpus_per_node: 8\n"
                    "  - nodes: gpu[9-1]\n    gpu_type: h100-sxm\n    gpus_per_node: 8\n")
    with pytest.raises(SpecError) as exc:
        load_cluster(path, gpus)
    assert f"{path}:5" in str(exc.value) and "runs backwards" in str(exc.value)


COMPRESS = [
    ["node1", "node2", "node4"],
    ["node01", "node02", "node10"],  # zero padding, as Slurm prints node[01-02,10]
    ["node09", "node10", "node11"],
    ["n9", "n10", "n11"],
    ["a", "b1", "b2"],
    ["x", "n0", "n1"],
    ["rack1-node1", "rack1-node2", "rack2-node1"],
    ["n2", "n1", "n2"],
    ["n1"],
    [],
]


@pytest.mark.parametrize("names", COMPRESS)
def test_fake_slurm_compresses_like_python_hostlist_and_round_trips(names: list[str]) -> None:
    text = compress(names)
    assert text == reference.collect_hostlist(names)
    assert sorted(expand_hostlist(text)) == sorted(set(names))
