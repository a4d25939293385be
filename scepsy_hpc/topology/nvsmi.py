"""Parse saved `nvidia-smi topo -m` output into `GPULinks`.

The matrix is meant to be tab-separated, but what users paste is not: terminal copies turn tabs into
runs of spaces, forum pastes glue neighbouring cells (`PXBNODE`), the self cell comes as ' X ', 'X'
or ' \\tX ', ANSI colour codes wrap header cells, older drivers drop the NUMA columns and say `SOC`
for what is now `SYS`, and the shell prompt or `nvidia-smi -L` listing is often pasted around it.
So cells are split on any whitespace run, glued link tokens are split apart again, and only the
GPU×GPU block is held to strict rules (shape, tokens, diagonal, symmetry).

MIG: `topo -m` has one row per *physical* GPU, and a MIG-enabled GPU keeps its row (NVLink P2P is
unavailable between MIG instances, which is for placement to weigh). The MIG devices show up in the
`nvidia-smi -L` listing pasted next to it (`GPU 0: … (UUID: …)` then `  MIG 1g.10gb  Device  0: …`)
or as per-GPU rows `GPU0 MIG 1g.10gb Device 0`; both are recorded in `GPULinks.mig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.topology.model import GPULinks

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TOKEN = r"X|SYS|NODE|PHB|PXB|PIX|SOC|N/A|NV[1-9]\d*"
_LINK = re.compile(_TOKEN)
_GLUED = re.compile(rf"(?:{_TOKEN})+")
_NV = re.compile(r"NV(\d+)")
_GPU_COL = re.compile(r"GPU(\d+)")
_NIC_ROW = re.compile(r"NIC\d+|mlx\d+_\d+|[a-z]+\d*_\d+")
_MIG_ROW = re.compile(r"GPU(\d+)\s+MIG\s+(\S+)\s+Device\s+(\d+)\b")
_LIST_GPU = re.compile(r"GPU\s+(\d+):\s+(.*?)\s+\(UUID:")
_LIST_MIG = re.compile(r"MIG\s+(\S+)\s+Device\s+(\d+):")
_EXPECTED = "expected X, NV#, SYS, NODE, PHB, PXB, PIX, SOC or N/A"
# Multi-word column names; spaces inside them are indistinguishable from separators in pastes.
_AFFINITY = (("CPU", "Affinity"), ("NUMA", "Affinity"), ("GPU", "NUMA", "ID"))


@dataclass(frozen=True)
class _Header:
    """The header line: GPU columns, then other devices (NICs), then affinity columns."""

    line: int
    n_gpus: int
    devices: tuple[str, ...]
    affinity: tuple[str, ...]


def _fail(source: str, line: int, what: str) -> TopologyError:
    return TopologyError(f"{source} line {line}: {what}")


def _cells(tokens: list[str]) -> list[str]:
    """Split glued link tokens ('PXBNODE', 'SYSSYS') back into cells; leave others alone."""
    out: list[str] = []
    for t in tokens:
        if _GLUED.fullmatch(t) and not _LINK.fullmatch(t):
            out.extend(m.group(0) for m in _LINK.finditer(t))
        else:
            out.append(t)
    return out


def _is_header(tokens: list[str]) -> bool:
    # A header starts with GPU0 and goes on with a column name; the GPU0 row goes on with a cell.
    if not tokens or tokens[0] != "GPU0":
        return False
    return len(tokens) == 1 or (not _LINK.fullmatch(tokens[1]) and tokens[1] != "MIG")


def _parse_header(tokens: list[str], line: int, source: str) -> _Header:
    i, n = 0, 0
    while i < len(tokens) and _GPU_COL.fullmatch(tokens[i]):
        if tokens[i] != f"GPU{n}":
            raise _fail(source, line, f"header column '{tokens[i]}' where GPU{n} was expected "
                                      "(GPU columns must run GPU0, GPU1, … in order)")
        i, n = i + 1, n + 1
    devices = [f"GPU{g}" for g in range(n)]
    affinity: list[str] = []
    while i < len(tokens):
        name = next((t for t in _AFFINITY if tuple(tokens[i:i + len(t)]) == t), None)
        if name:
            affinity.append(" ".join(name))
            i += len(name)
        elif affinity:
            affinity.append(tokens[i])  # a column newer drivers may add after the affinities
            i += 1
        else:
            devices.append(tokens[i])   # NIC column: mlx5_0, NIC0, …
            i += 1
    return _Header(line, n, tuple(devices), tuple(affinity))


def _parse_row(cells: list[str], k: int, head: _Header, line: int, source: str) -> list[str]:
    """Validate one GPU row's cells and return its GPU×GPU cells."""
    n_dev = len(head.devices)
    n_cols = n_dev + len(head.affinity)
    dev = cells[:n_dev]
    bad = next(((c, col) for c, col in zip(dev, head.devices) if not _LINK.fullmatch(c)), None)
    # Affinity cells may be blank (and vanish in space-separated pastes), so fewer is tolerated
    # as long as every device column still holds a link token.
    if len(cells) < n_dev or len(cells) > n_cols or (bad and len(cells) != n_cols):
        cols = f"{n_dev} device column{'s' * (n_dev != 1)}"
        if head.affinity:
            cols += " + " + ", ".join(head.affinity)
        raise _fail(source, line, f"row GPU{k} has {len(cells)} cells but the header (line "
                                  f"{head.line}) has {n_cols} columns ({cols}); a cell is "
                                  "missing or extra")
    if bad:
        raise _fail(source, line, f"cell '{bad[0]}' in column {bad[1]} is not a link type ({_EXPECTED})")
    for j in range(head.n_gpus):
        if (j == k) != (dev[j] == "X"):
            want = "X (the GPU itself)" if j == k else "a link type, not X (X marks the GPU itself)"
            raise _fail(source, line, f"cell '{dev[j]}' in column GPU{j} of row GPU{k}: expected {want}")
    return dev[:head.n_gpus]


def _links(cell: str) -> int:
    m = _NV.fullmatch(cell)
    return int(m.group(1)) if m else 0


def _add_mig(mig: dict[int, dict[int, tuple[str, int]]], gpu: int, dev: int, profile: str,
             line: int, n: int, source: str) -> None:
    if gpu >= n:
        raise _fail(source, line, f"MIG device listed for GPU{gpu} but the matrix has GPU0..GPU{n - 1}")
    seen = mig.setdefault(gpu, {})
    if dev in seen and seen[dev][0] != profile:
        raise _fail(source, line, f"MIG device {dev} of GPU{gpu} is '{profile}' here but "
                                  f"'{seen[dev][0]}' on line {seen[dev][1]}")
    seen.setdefault(dev, (profile, line))


def _listing(lines: list[str], n: int, source: str,
             mig: dict[int, dict[int, tuple[str, int]]]) -> tuple[str, ...]:
    """GPU names and MIG devices from an `nvidia-smi -L` listing pasted with the matrix."""
    names: dict[int, str] = {}
    current: int | None = None
    for no, text in enumerate(lines, 1):
        s = text.strip()
        if m := _LIST_GPU.match(s):
            current = int(m.group(1))
            if current >= n:
                raise _fail(source, no, f"listing names GPU {current} but the matrix has "
                                        f"GPU0..GPU{n - 1}")
            names[current] = m.group(2)
        elif (m := _LIST_MIG.match(s)) and current is not None:
            _add_mig(mig, current, int(m.group(2)), m.group(1), no, n, source)
    # Names only when the listing covers every GPU; a partial listing cannot be indexed.
    return tuple(names[g] for g in range(n)) if len(names) == n else ()


def parse_nvsmi(text: str, source: str = "<nvidia-smi topo -m>") -> GPULinks:
    """Parse saved `nvidia-smi topo -m` output (pasted in any of its real-world shapes) into GPULinks."""
    lines = _ANSI.sub("", text).replace("\r", "").split("\n")
    if lines[-1] == "":
        lines.pop()                       # the final newline ends a line, it does not start one
    head_at = next((i for i, s in enumerate(lines) if _is_header(s.split())), None)
    if head_at is None:
        row = next((i for i, s in enumerate(lines) if s.split()[:1] == ["GPU0"]), None)
        if row is not None:
            raise _fail(source, row + 1, "row GPU0 has no header line above it (expected a line of "
                                         "column names GPU0 GPU1 … CPU Affinity)")
        raise _fail(source, 1, "no header line starting with GPU0 (expected `nvidia-smi topo -m` "
                               "output: a header of GPU0 GPU1 … then one row per GPU)")
    head = _parse_header(lines[head_at].split(), head_at + 1, source)
    n = head.n_gpus
    if n == 0:
        raise _fail(source, head.line, "header has no GPU columns")

    matrix: list[list[str]] = []
    row_line: list[int] = []
    mig: dict[int, dict[int, tuple[str, int]]] = {}
    nics = set(head.devices[n:])
    for i in range(head_at + 1, len(lines)):
        no, tokens = i + 1, lines[i].split()
        if m := _MIG_ROW.match(lines[i].strip()):
            _add_mig(mig, int(m.group(1)), int(m.group(3)), m.group(2), no, n, source)
            continue
        k = len(matrix)
        label = tokens[0] if tokens else ""
        if k == n:
            if label in nics or _NIC_ROW.fullmatch(label):
                continue                  # NIC rows add nothing to GPU-GPU links
            if _GPU_COL.fullmatch(label):
                raise _fail(source, no, f"row {label} after GPU{n - 1}: duplicate or extra row "
                                        f"(the header has GPU0..GPU{n - 1})")
            break                         # blank line, Legend:, a prompt: the matrix is over
        if not tokens:
            continue                      # stray blank line inside a pasted matrix
        if label != f"GPU{k}":
            found = f"row {label}" if _GPU_COL.fullmatch(label) else f"'{lines[i].strip()[:40]}'"
            raise _fail(source, no, f"expected row GPU{k} (rows follow the header's columns "
                                    f"GPU0..GPU{n - 1}), found {found}")
        matrix.append(_parse_row(_cells(tokens[1:]), k, head, no, source))
        row_line.append(no)
    if len(matrix) < n:
        raise _fail(source, len(lines) + 1, f"expected row GPU{len(matrix)} (the header has "
                                            f"GPU0..GPU{n - 1}), found end of input")

    nvlinks: dict[tuple[int, int], int] = {}
    for a in range(n):
        for b in range(a + 1, n):
            if _links(matrix[a][b]) != _links(matrix[b][a]):
                raise _fail(source, row_line[a],
                            f"GPU{a}–GPU{b} is '{matrix[a][b]}' on line {row_line[a]} but "
                            f"GPU{b}–GPU{a} is '{matrix[b][a]}' on line {row_line[b]}; the matrix "
                            "must be symmetric")
            if _links(matrix[a][b]):
                nvlinks[(a, b)] = _links(matrix[a][b])
    names = _listing(lines, n, source, mig)
    mig_out = {g: tuple(p for _, (p, _l) in sorted(devs.items())) for g, devs in sorted(mig.items())}
    return GPULinks(n_gpus=n, nvlinks=nvlinks, gpu_names=names, mig=mig_out)
