"""GRES parsing (gres.conf and `slurmd -G`): real captures against their ground truth, corrupted
copies of them, and hand-written corner cases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.topology.gres import GresNode, parse_gres

# Hand-written gres.conf for what no public capture covers (NodeName ranges, continuations, …).
DATA = Path(__file__).resolve().parents[2] / "data" / "topology"


def _node(parsed: dict[str, GresNode], text: str, node: str) -> GresNode:
    # EXPECTED names the node from the capture's context (a prompt in the source); lines that
    # carry no NodeName= are keyed "*" by the parser.
    return parsed[node] if re.search(r"(?i)nodename=", text) else parsed["*"]


def _gpu_lines(text: str) -> list[int]:
    """0-based indices of the GPU record lines (found without the parser under test)."""
    return [i for i, s in enumerate(text.split("\n")) if re.search(r"(?i)\bName=gpu\b", s)]


def _raises(text: str, source: str) -> str:
    with pytest.raises(TopologyError) as info:
        parse_gres(text, source)
    return str(info.value)


def _as_lists(value):
    if isinstance(value, tuple):
        return [_as_lists(v) for v in value]
    return value


@pytest.mark.captures("gres")
def test_capture_matches_ground_truth(name, capture):
    text, exp = capture(name)
    parsed = parse_gres(text, name)
    assert len(parsed) == len(exp["nodes"])
    for node, want in exp["nodes"].items():
        got = _node(parsed, text, node)
        for field, value in want.items():
            if field == "gpu_index_from_links":
                assert got.gpu_index_from_links() == value
            elif field == "links_by_gpu_index":
                assert _as_lists(got.links_by_gpu_index()) == value
            else:
                assert _as_lists(getattr(got, field)) == value, field


@pytest.mark.captures("gres")
def test_capture_links_become_gpu_links(name, capture):
    text, exp = capture(name)
    parsed = parse_gres(text, name)
    for node, want in exp["nodes"].items():
        links = _node(parsed, text, node).gpu_links()
        rows = want.get("links_by_gpu_index", want["links"])
        assert links.n_gpus == want["gpus"]
        assert links.pairs() == sorted((i, j, rows[i][j]) for i in range(len(rows))
                                       for j in range(i + 1, len(rows)) if rows[i][j] > 0)


def test_slurmd_g_agrees_with_nvidia_smi_of_the_same_node(capture):
    gres_text, _ = capture("gres-01-baobab-gpu048-slurmd-G.conf")
    _, nvsmi = capture("nvsmi-05-rtx-a6000-8gpu-nv4-pairs.txt")
    links = parse_gres(gres_text)["*"].gpu_links()
    assert [list(p) for p in links.pairs()] == nvsmi["nvlink_pairs"]
    assert links.domains() == nvsmi["nvlink_domains"]


def _edit_links(line: str, edit) -> str:
    """`line` with its Links= list replaced by edit(list of ints)."""
    row = [int(v) for v in re.search(r"Links=(\S+)", line).group(1).split(",")]
    return re.sub(r"Links=\S+", "Links=" + ",".join(map(str, edit(row))), line)


def _not_self(row: list[int]) -> int:
    return next(k for k, v in enumerate(row) if v != -1)


def _mutate(text: str, edit) -> tuple[str, int]:
    """The capture with its first GPU record line edited; returns the text and that line (1-based)."""
    lines = text.split("\n")
    i = _gpu_lines(text)[0]
    lines[i] = edit(lines[i])
    return "\n".join(lines), i + 1


@pytest.mark.captures("gres")
def test_links_row_too_short(name, capture):
    def drop(row: list[int]) -> list[int]:
        return row[:_not_self(row)] + row[_not_self(row) + 1:]

    text, line = _mutate(capture(name)[0], lambda s: _edit_links(s, drop))
    n = len(_gpu_lines(text))   # one record per GPU in these captures
    msg = _raises(text, name)
    assert msg.startswith(f"{name} line {line}: Links has {n - 1} entries but the node has {n} GPUs")


@pytest.mark.captures("gres")
def test_links_with_two_selves(name, capture):
    def second_self(row: list[int]) -> list[int]:
        j = _not_self(row)
        return row[:j] + [-1] + row[j + 1:]

    text, line = _mutate(capture(name)[0], lambda s: _edit_links(s, second_self))
    msg = _raises(text, name)
    assert msg.startswith(f"{name} line {line}: Links=")
    assert "must hold -1 exactly once" in msg


@pytest.mark.captures("gres")
def test_unknown_key(name, capture):
    text, line = _mutate(capture(name)[0], lambda s: s + " Foo=bar")
    assert _raises(text, name).startswith(f"{name} line {line}: unknown key 'Foo'")


@pytest.mark.captures("gres")
def test_malformed_pair(name, capture):
    text, line = _mutate(capture(name)[0], lambda s: s.replace("Type=", "Type ", 1))
    msg = _raises(text, name)
    assert msg.startswith(f"{name} line {line}: expected Key=Value, found 'Type'")


@pytest.mark.captures("gres")
def test_duplicated_record_conflicts(name, capture):
    text, _ = capture(name)
    first = _gpu_lines(text)[0]
    lines = text.rstrip("\n").split("\n")
    lines.append(lines[first])
    msg = _raises("\n".join(lines), name)
    assert msg.startswith(f"{name} line {len(lines)}: conflicting records")
    assert f"line {first + 1}" in msg


@pytest.mark.captures("gres")
def test_asymmetric_links_name_both_lines(name, capture):
    text, _ = capture(name)
    lines = text.split("\n")
    gpu = _gpu_lines(text)
    rows = [[int(v) for v in re.search(r"Links=(\S+)", lines[i]).group(1).split(",")] for i in gpu]
    j = _not_self(rows[0])
    lines[gpu[0]] = _edit_links(lines[gpu[0]], lambda r: [v + (k == j) for k, v in enumerate(r)])
    partner = gpu[next(k for k, r in enumerate(rows) if r.index(-1) == j)]
    msg = _raises("\n".join(lines), name)
    assert "Links disagree" in msg
    assert f"line {gpu[0] + 1}" in msg and f"line {partner + 1}" in msg


@pytest.mark.captures("gres")
def test_links_missing_on_one_record(name, capture):
    text, line = _mutate(capture(name)[0], lambda s: re.sub(r"\s*Links=\S+", "", s))
    msg = _raises(text, name)
    assert msg.startswith(f"{name} line {line}: conflicting records")
    assert "gives Links=" in msg


# --- hand-written gres.conf --------------------------------------------------------------------

def test_hand_written_conf_with_nodename_ranges():
    parsed = parse_gres((DATA / "gres-conf-nodename-ranges.conf").read_text())
    assert sorted(parsed) == ["gpu01", "gpu02", "gpu03", "gpu04", "old01"]
    assert parsed["gpu01"] == parsed["gpu02"]
    assert parsed["gpu01"].files == tuple(f"/dev/nvidia{k}" for k in range(4))
    assert parsed["gpu01"].cores == ("0-15",) * 4 and parsed["gpu01"].links == ()
    assert parsed["gpu01"].gpu_links().pairs() == []
    v100 = parsed["gpu03"]
    assert (v100.gpus, v100.type) == (4, "v100")
    assert v100.gpu_links().pairs() == [(0, 1, 2), (2, 3, 2)]
    assert v100.gpu_links().gpu_names == ("v100",) * 4
    assert parsed["old01"] == GresNode(gpus=2, type="k80")


def test_slurmd_log_prefixes_and_chatter():
    text = ("slurmd: debug:  gpu/nvml: init: loaded\n"
            "slurmd: debug:  Gres Name=gpu Type=h100 Count=1 Index=0 ID=7696487 File=/dev/nvidia0 "
            "Links=-1,18 Flags=HAS_FILE\n"
            "[2025-01-02T03:04:05.678] Gres Name=gpu Type=h100 Count=1 Index=1 ID=7696487 "
            "File=/dev/nvidia1 Links=18,-1 Flags=HAS_FILE\n")
    node = parse_gres(text)["*"]
    assert node.index == (0, 1) and node.gpu_links().pairs() == [(0, 1, 18)]


def test_keys_are_case_insensitive_and_values_may_be_quoted():
    node = parse_gres('NAME=gpu TYPE="a100" FILE=/dev/nvidia[0-1] CPUs=0-7\n')["*"]
    assert (node.gpus, node.type, node.cores) == (2, "a100", ("0-7", "0-7"))


def test_count_must_match_files():
    msg = _raises("Name=gpu File=/dev/nvidia[0-1] Count=3\n", "c.conf")
    assert msg == "c.conf line 1: Count=3 but File= names 2 device(s)"


def test_links_on_a_multi_device_line():
    msg = _raises("Name=gpu File=/dev/nvidia[0-1] Links=-1,2\n", "m.conf")
    assert msg.startswith("m.conf line 1: Links= describes one GPU but this record has 2")


def test_autodetect_only_says_what_to_do():
    msg = _raises("# nothing static\nAutoDetect=nvml\n", "a.conf")
    assert msg.startswith("a.conf line 2: no Name=gpu records found")
    assert "slurmd -G" in msg


def test_continuation_error_reports_the_first_line():
    msg = _raises("Name=gpu \\\n  File=/dev/nvidia0 Bogus=1\n", "k.conf")
    assert msg.startswith("k.conf line 1: unknown key 'Bogus'")


def test_record_without_name_and_default_source():
    msg = _raises("NodeName=n1 File=/dev/nvidia0\n", "<gres.conf>")
    assert msg.startswith("<gres.conf> line 1: record has no Name=")


def test_bad_nodename_hostlist():
    assert _raises("NodeName=gpu[01-02 Name=gpu Count=1\n", "n").startswith("n line 1: NodeName=")


def test_non_gpu_gres_are_skipped():
    text = "Name=gpu Count=1\nName=mps Count=100\nName=VramPerGpu Count=5 Flags=CountOnly\n"
    assert parse_gres(text) == {"*": GresNode(gpus=1)}
