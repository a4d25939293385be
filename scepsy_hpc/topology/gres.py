"""Parse Slurm GPU GRES records — `gres.conf` lines or `slurmd -G` output — per node.

`Links=` is a comma list per GPU giving its NVLink count to every GPU of the node, in Slurm's
device order (PCI bus order under AutoDetect=nvml), with -1 for the GPU itself; that order need not
be the File= order (Nebius H200 configs list /dev/nvidia0 with -1 last), so a GPU's place in the
Links ordering is where its -1 sits, not the line it is on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.spec.hostlist import expand_hostlist
from scepsy_hpc.topology.model import GPULinks

# gres.conf keys (Slurm's _gres_options) plus those `slurmd -G` prints; Slurm matches them
# case-insensitively.
_GRES_CONF_KEYS = ("NodeName", "Name", "Type", "File", "Files", "MultipleFiles", "Count", "Cores",
                   "CPUs", "Links", "Link", "Flags", "AutoDetect")
_SLURMD_KEYS = ("Index", "ID", "CoreCnt", "CpuCnt", "UniqueId")
_KEYS = {k.lower(): k for k in _GRES_CONF_KEYS + _SLURMD_KEYS}
_CANON = {"files": "File", "cpus": "Cores", "link": "Links"}   # aliases Slurm accepts
_NULL = ("", "(null)")
# `slurmd -G` (and slurmd.log) prefix each record; other lines with that prefix are log chatter.
_LOG_PREFIX = re.compile(r"^(?:slurmd\S*:|\[[^\]]+\])")
_LOG_GRES = re.compile(r"\bGres\s+(?=[A-Za-z]+=)(.*)$")
_PAIR = re.compile(r'([A-Za-z]+)=("[^"]*"|[^\s"]+)(?=\s|$)')


@dataclass(frozen=True)
class GresNode:
    """One node's GPUs as its GRES records describe them, in record (file) order."""

    gpus: int
    type: str | None = None                        # None when absent or mixed across records
    index: tuple[int, ...] = ()                    # slurmd -G `Index=`; empty when not given
    files: tuple[str, ...] = ()                    # device files, one per GPU
    cores: tuple[str, ...] = ()                    # Cores= per GPU, as written ('0-63')
    links: tuple[tuple[int, ...], ...] = ()        # Links= rows, as written, per GPU

    def links_order(self) -> tuple[int, ...]:
        """Each GPU's index in the Links ordering: where its -1 sits."""
        return tuple(row.index(-1) for row in self.links)

    def gpu_index_from_links(self) -> dict[str, int]:
        """Device file → its GPU index in the Links ordering."""
        return dict(zip(self.files, self.links_order()))

    def links_by_gpu_index(self) -> tuple[tuple[int, ...], ...]:
        """The Links rows reordered so that row g is the GPU with -1 at position g."""
        by_index = dict(zip(self.links_order(), self.links))
        if sorted(by_index) != list(range(len(self.links))):
            raise TopologyError(f"GRES Links rows put -1 at {sorted(self.links_order())}; "
                                f"expected each of 0..{len(self.links) - 1} exactly once")
        return tuple(by_index[g] for g in range(len(self.links)))

    def gpu_links(self) -> GPULinks:
        """NVLink counts per GPU pair (GPUs numbered in the Links ordering)."""
        nvlinks: dict[tuple[int, int], int] = {}
        if self.links:
            rows = self.links_by_gpu_index()
            for i, row in enumerate(rows):
                for j in range(i + 1, len(row)):
                    if row[j] > 0:
                        nvlinks[(i, j)] = row[j]
        names = (self.type,) * self.gpus if self.type else ()
        return GPULinks(n_gpus=self.gpus, nvlinks=nvlinks, gpu_names=names)


@dataclass(frozen=True)
class _Gpu:
    """One GPU of one record, with the line it came from."""

    line: int
    type: str | None
    file: str | None
    cores: str | None
    links: tuple[int, ...] | None
    index: int | None


def _fail(source: str, line: int, what: str) -> TopologyError:
    return TopologyError(f"{source} line {line}: {what}")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) per logical line: comments cut, backslash continuations joined."""
    buf, start = "", 0
    for no, raw in enumerate(text.replace("\r", "").split("\n"), 1):
        line = raw.split("#", 1)[0].rstrip()
        start = start or no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        yield start, buf + line
        buf, start = "", 0
    if buf.strip():
        yield start, buf


def _pairs(body: str, line: int, source: str) -> dict[str, str]:
    """Key=Value pairs of one record, keys canonical; unknown or malformed ones are errors."""
    out: dict[str, str] = {}
    pos = 0
    while True:
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if pos >= len(body):
            return out
        m = _PAIR.match(body, pos)
        if not m:
            word = body[pos:].split()[0]
            hint = f"no value after '{word}'" if word.endswith("=") else f"found '{word}'"
            raise _fail(source, line, f"expected Key=Value, {hint}")
        key = _KEYS.get(m.group(1).lower())
        if key is None:
            raise _fail(source, line, f"unknown key '{m.group(1)}' (gres.conf keys: "
                                      f"{', '.join(_GRES_CONF_KEYS)})")
        key = _CANON.get(key.lower(), key)
        if key in out:
            raise _fail(source, line, f"key {key}= given twice")
        out[key] = m.group(2).strip('"')
        pos = m.end()


def _links(value: str, line: int, source: str) -> tuple[int, ...]:
    try:
        row = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise _fail(source, line, f"Links={value} is not a comma list of numbers "
                                  "(expected e.g. Links=-1,4,0,0)") from None
    if row.count(-1) != 1 or min(row) < -1:
        raise _fail(source, line, f"Links={value} must hold -1 exactly once (the GPU itself) and "
                                  "link counts >= 0 elsewhere")
    return row


def _record(kv: dict[str, str], line: int, source: str) -> list[_Gpu]:
    """The GPUs one GPU record describes (File=/dev/nvidia[0-3] is four)."""
    multi = "MultipleFiles" in kv
    if multi and "File" in kv:
        raise _fail(source, line, "File= and MultipleFiles= exclude each other")
    try:
        files = [kv["MultipleFiles"]] if multi else expand_hostlist(kv.get("File", ""))
    except ValueError as e:
        raise _fail(source, line, f"File=: {e}") from None
    count = len(files) or 1
    if "Count" in kv:
        try:
            count = int(kv["Count"])
        except ValueError:
            raise _fail(source, line, f"Count={kv['Count']} is not a whole number") from None
        if files and count != len(files):
            raise _fail(source, line, f"Count={count} but File= names {len(files)} device(s)")
    links = None if kv.get("Links", "") in _NULL else _links(kv["Links"], line, source)
    if links and count != 1:
        raise _fail(source, line, f"Links= describes one GPU but this record has {count}; "
                                  "give one File= per line")
    index = None
    if "Index" in kv:
        if not kv["Index"].isdigit():
            raise _fail(source, line, f"Index={kv['Index']} is not a GPU index")
        index = int(kv["Index"])
    gtype = None if kv.get("Type", "") in _NULL else kv["Type"]
    cores = None if kv.get("Cores", "") in _NULL else kv["Cores"]
    return [_Gpu(line, gtype, files[k] if files else None, cores, links,
                 None if index is None else index + k) for k in range(count)]


def _first_dup(values: list, gpus: list[_Gpu]) -> tuple[int, int] | None:
    seen: dict = {}
    for v, g in zip(values, gpus):
        if v in seen:
            return seen[v], g.line
        seen[v] = g.line
    return None


def _node(name: str, gpus: list[_Gpu], source: str) -> GresNode:
    """Check one node's GPUs against each other and build its GresNode."""
    where = "" if name == "*" else f" of {name}"
    for what, get in (("File=", lambda g: g.file), ("Type=", lambda g: g.type),
                      ("Links=", lambda g: g.links)):
        given = [g for g in gpus if get(g) is not None]
        if given and len(given) != len(gpus):
            bare = next(g for g in gpus if get(g) is None)
            raise _fail(source, bare.line, f"conflicting records{where}: line {given[0].line} "
                                           f"gives {what} but this one does not")
    for what, values in (("File", [g.file for g in gpus]), ("Index", [g.index for g in gpus])):
        dup = None if None in values else _first_dup(values, gpus)
        if dup:
            raise _fail(source, dup[1], f"conflicting records{where}: same {what} as line {dup[0]}")
    n = len(gpus)
    rows = [g.links for g in gpus if g.links is not None]
    for g in gpus:
        if g.links is not None and len(g.links) != n:
            raise _fail(source, g.line, f"Links has {len(g.links)} entries but the node{where} "
                                        f"has {n} GPUs (one entry per GPU)")
    if rows:
        dup = _first_dup([r.index(-1) for r in rows], gpus)
        if dup:
            raise _fail(source, dup[1], f"conflicting records{where}: -1 at the same Links "
                                        f"position as line {dup[0]}")
        at = {r.index(-1): g for r, g in zip(rows, gpus)}
        for i in range(n):
            for j in range(i + 1, n):
                a, b = at[i], at[j]
                if a.links[j] != b.links[i]:
                    raise _fail(source, a.line, f"Links disagree: GPU {i} has {a.links[j]} links "
                                                f"to GPU {j} on line {a.line} but GPU {j} has "
                                                f"{b.links[i]} to GPU {i} on line {b.line}")
    types = {g.type for g in gpus}
    cores = [g.cores for g in gpus]
    return GresNode(
        gpus=n,
        type=types.pop() if len(types) == 1 else None,
        index=tuple(g.index for g in gpus) if all(g.index is not None for g in gpus) else (),
        files=tuple(g.file for g in gpus if g.file is not None),
        cores=tuple(c or "" for c in cores) if any(cores) else (),
        links=tuple(rows),
    )


def parse_gres(text: str, source: str = "<gres.conf>") -> dict[str, GresNode]:
    """Parse gres.conf or `slurmd -G` output into GPU GRES per node ('*' when lines name no node)."""
    per_node: dict[str, list[_Gpu]] = {}
    last = 1
    for line, body in _logical_lines(text):
        body = body.strip()
        last = line if body else last
        if _LOG_PREFIX.match(body):
            m = _LOG_GRES.search(body)
            if not m:
                continue                              # slurmd log chatter, not a GRES record
            body = m.group(1)
        if not body:
            continue
        kv = _pairs(body, line, source)
        if "Name" not in kv:
            if set(kv) <= {"AutoDetect", "NodeName"}:
                continue                              # AutoDetect=nvml: nothing static to read
            raise _fail(source, line, "record has no Name= (expected e.g. Name=gpu Type=a100 "
                                      "File=/dev/nvidia0)")
        if kv["Name"].lower() != "gpu":
            continue                                  # mps, shard, count-only GRES (VramPerGpu)
        try:
            nodes = expand_hostlist(kv["NodeName"]) if "NodeName" in kv else ["*"]
        except ValueError as e:
            raise _fail(source, line, f"NodeName=: {e}") from None
        gpus = _record(kv, line, source)
        for node in nodes:
            per_node.setdefault(node, []).extend(gpus)
    if not per_node:
        raise _fail(source, last, "no Name=gpu records found; with AutoDetect=nvml only slurmd "
                                  "knows the GPUs: run `slurmd -G` on a node and parse its output")
    return {name: _node(name, gpus, source) for name, gpus in per_node.items()}
