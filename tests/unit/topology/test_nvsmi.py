"""`nvidia-smi topo -m` parsing: real captures against their ground truth, corrupted copies of them,
and hand-written corner cases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.topology.nvsmi import parse_nvsmi

# Hand-written captures for cases no public capture covers (ANSI, MIG, SOC, CRLF, one GPU).
DATA = Path(__file__).resolve().parents[2] / "data" / "topology"


def _header(lines: list[str]) -> int:
    return next(i for i, s in enumerate(lines) if s.split()[:2] == ["GPU0", "GPU1"])


def _row(lines: list[str], label: str) -> int:
    """0-based index of the matrix row `label` (found without the parser under test)."""
    head = _header(lines)
    return next(i for i in range(head + 1, len(lines)) if lines[i].split()[:1] == [label])


def _raises(text: str, source: str) -> str:
    with pytest.raises(TopologyError) as info:
        parse_nvsmi(text, source)
    return str(info.value)


@pytest.mark.captures("nvsmi")
def test_capture_matches_ground_truth(name, capture):
    text, exp = capture(name)
    links = parse_nvsmi(text, name)
    assert links.n_gpus == exp["gpus"]
    assert links.domains() == exp["nvlink_domains"]
    assert links.components() == exp["nvlink_components"]
    assert [list(p) for p in links.pairs()] == exp["nvlink_pairs"]
    assert links.mig == {}


@pytest.mark.captures("nvsmi")
def test_tabs_or_single_spaces_parse_the_same(name, capture):
    text, _ = capture(name)
    assert parse_nvsmi(re.sub(r"[ \t]+", " ", text)) == parse_nvsmi(text)


@pytest.mark.captures("nvsmi")
def test_corrupt_cell_token_names_line_and_column(name, capture):
    text, _ = capture(name)
    lines = text.split("\n")
    i = _row(lines, "GPU1")
    lines[i] = re.sub(r"^(\s*GPU1\s+)\S+", r"\g<1>QQQ", lines[i], count=1)
    msg = _raises("\n".join(lines), name)
    assert msg.startswith(f"{name} line {i + 1}: ")
    assert "cell 'QQQ' in column GPU0 is not a link type (expected X, NV#" in msg


@pytest.mark.captures("nvsmi")
def test_deleted_cell_is_a_cell_count_error(name, capture):
    text, _ = capture(name)
    lines = text.split("\n")
    i = _row(lines, "GPU0")
    cut = re.sub(r"^(\s*GPU0\s+X\s+)\S+\s+", r"\1", lines[i], count=1)
    assert cut != lines[i]
    lines[i] = cut
    msg = _raises("\n".join(lines), name)
    assert msg.startswith(f"{name} line {i + 1}: row GPU0 has ")
    assert "a cell is missing or extra" in msg


@pytest.mark.captures("nvsmi")
def test_asymmetric_matrix_names_both_lines(name, capture):
    text, _ = capture(name)
    lines = text.split("\n")
    i0, i1 = _row(lines, "GPU0"), _row(lines, "GPU1")
    old = lines[i1].split()[1]
    new = "SYS" if old.startswith("NV") else "NV4"
    lines[i1] = re.sub(r"^(\s*GPU1\s+)\S+", rf"\g<1>{new}", lines[i1], count=1)
    msg = _raises("\n".join(lines), name)
    assert f"line {i0 + 1}" in msg and f"line {i1 + 1}" in msg
    assert f"GPU1–GPU0 is '{new}'" in msg and "symmetric" in msg


@pytest.mark.captures("nvsmi")
def test_truncated_after_header_has_no_gpu_rows(name, capture):
    text, _ = capture(name)
    lines = text.split("\n")
    head = _header(lines)
    msg = _raises("\n".join(lines[:head + 1]) + "\n", name)
    assert msg.startswith(f"{name} line {head + 2}: expected row GPU0")


@pytest.mark.captures("nvsmi")
def test_rows_out_of_order(name, capture):
    text, _ = capture(name)
    lines = text.split("\n")
    i1, i2 = _row(lines, "GPU1"), _row(lines, "GPU2")
    lines[i1], lines[i2] = lines[i2], lines[i1]
    msg = _raises("\n".join(lines), name)
    assert msg.startswith(f"{name} line {i1 + 1}: expected row GPU1")
    assert "found row GPU2" in msg


@pytest.mark.captures("nvsmi")
def test_duplicated_row(name, capture):
    text, _ = capture(name)
    lines = text.split("\n")
    i1, i2 = _row(lines, "GPU1"), _row(lines, "GPU2")
    lines[i2] = lines[i1]
    msg = _raises("\n".join(lines), name)
    assert msg.startswith(f"{name} line {i2 + 1}: expected row GPU2")
    assert "found row GPU1" in msg


# --- hand-written captures ---------------------------------------------------------------------

def _data(name: str) -> str:
    return (DATA / name).read_bytes().decode()   # bytes: keep CRLF as written


def test_ansi_colour_codes_are_stripped():
    links = parse_nvsmi(_data("nvsmi-ansi-colour.txt"))
    assert links.n_gpus == 4
    assert links.pairs() == [(0, 1, 8), (2, 3, 8)]
    assert links.domains() == [[0, 1], [2, 3]]


def test_mig_rows_and_listing_are_recorded_without_breaking_the_matrix():
    links = parse_nvsmi(_data("nvsmi-mig.txt"), "nvsmi-mig.txt")
    assert links.n_gpus == 4
    assert links.domains() == [[0, 1, 2, 3]]
    assert links.pairs()[0] == (0, 1, 12)
    assert links.mig == {0: ("3g.40gb", "2g.20gb", "1g.10gb"), 3: ("7g.80gb",)}
    assert links.gpu_names == ("NVIDIA A100-SXM4-80GB",) * 4


def test_soc_from_old_drivers_is_not_nvlink():
    links = parse_nvsmi(_data("nvsmi-soc-old-driver.txt"))
    assert links.n_gpus == 4
    assert links.pairs() == []
    assert links.domains() == [[0], [1], [2], [3]]


def test_single_gpu_with_crlf_and_prompt_lines():
    links = parse_nvsmi(_data("nvsmi-single-gpu-crlf.txt"))
    assert links.n_gpus == 1
    assert links.domains() == [[0]]


# --- small inline variants ---------------------------------------------------------------------

GOOD = "\tGPU0\tGPU1\tCPU Affinity\n" "GPU0\t X \tNV2\t0-7\n" "GPU1\tNV2\t X \t0-7\n"


def test_glued_cells_are_split_back():
    text = "\tGPU0\tGPU1\tNIC0\tNIC1\tCPU Affinity\n" \
           "GPU0\t X \tNV6\tPXBNODE\t0-7\n" "GPU1\tNV6\t X \tSYSSYS\t0-7\n" \
           "NIC0\tPXB\tSYS\t X NODE\n" "NIC1\tNODE\tSYS\tNODE\t X\n"
    assert parse_nvsmi(text).pairs() == [(0, 1, 6)]


def test_default_source_name_is_in_messages():
    msg = _raises(GOOD.replace("NV2\t0-7\nGPU1", "QQQ\t0-7\nGPU1"), "<nvidia-smi topo -m>")
    assert msg == ("<nvidia-smi topo -m> line 2: cell 'QQQ' in column GPU1 is not a link type "
                   "(expected X, NV#, SYS, NODE, PHB, PXB, PIX, SOC or N/A)")
    with pytest.raises(TopologyError) as info:
        parse_nvsmi("nothing here")
    assert str(info.value).startswith("<nvidia-smi topo -m> line 1: no header line")


def test_rows_without_header():
    msg = _raises("$ nvidia-smi topo -m\nGPU0\t X \tNV2\nGPU1\tNV2\t X \n", "t.txt")
    assert msg.startswith("t.txt line 2: row GPU0 has no header line")


def test_diagonal_must_be_x_and_x_only_there():
    assert "expected X (the GPU itself)" in _raises(GOOD.replace(" X \tNV2\t0-7", "NV2\tNV2\t0-7"), "s")
    msg = _raises(GOOD.replace("GPU1\tNV2\t X ", "GPU1\tX\t X "), "s")
    assert msg.startswith("s line 3: cell 'X' in column GPU0 of row GPU1")


def test_na_cells_are_not_nvlink():
    text = GOOD.replace("NV2", "N/A")
    assert parse_nvsmi(text).pairs() == []


def test_header_columns_out_of_order():
    msg = _raises(GOOD.replace("\tGPU0\tGPU1\t", "\tGPU0\tGPU2\t"), "h")
    assert msg.startswith("h line 1: header column 'GPU2' where GPU1 was expected")


def test_extra_cell_is_a_count_error():
    msg = _raises(GOOD.replace("NV2\t0-7\nGPU1", "NV2\tSYS\t0-7\nGPU1"), "e")
    assert msg.startswith("e line 2: row GPU0 has 4 cells but the header (line 1) has 3 columns")


def test_extra_gpu_row_after_the_last():
    msg = _raises(GOOD + "GPU2\tSYS\tSYS\t X \t0-7\n", "x")
    assert msg.startswith("x line 4: row GPU2 after GPU1: duplicate or extra row")


def test_mig_row_for_a_gpu_not_in_the_matrix():
    msg = _raises(GOOD + "GPU5 MIG 1g.10gb Device 0\n", "m")
    assert msg.startswith("m line 4: MIG device listed for GPU5")


def test_nv_counts_of_two_digits_and_more():
    assert parse_nvsmi(GOOD.replace("NV2", "NV18")).pairs() == [(0, 1, 18)]
    assert parse_nvsmi(GOOD.replace("NV2", "NV36")).pairs() == [(0, 1, 36)]
