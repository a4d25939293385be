"""What Slurm says about each node, as `SlurmNode`: `scontrol show node` (either form) and `sinfo -N`.

GPUs come from the GRES string (`gpu:h100:4(S:0-1)`, `gpu:4`, `gpu:a100:4,gpu:v100:2`): the count is the
sum over every `gpu` entry and the type is the one with the most GPUs (the first on a tie). Other GRES
(`shard`, `mps`, `nic`) are skipped.
"""

from __future__ import annotations

import re
from dataclasses import replace

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.spec.hostlist import expand_hostlist
from scepsy_hpc.topology.model import SlurmNode

# `%T` rather than the compact `%t`: compact names ("drng", "resv", "unk") would slip past
# SlurmNode.usable; compact input is still read and expanded (see _COMPACT).
SINFO_FORMAT = "%N|%P|%T|%G|%c|%m|%f"
SINFO_ARGS = ("sinfo", "-N", "-h", "-o", SINFO_FORMAT)
_SINFO_FIELDS = ("node", "partition", "state", "gres", "cpus", "memory", "features")
_COMPACT = {"alloc": "allocated", "comp": "completing", "drain": "drained", "drng": "draining",
            "futr": "future", "mix": "mixed", "plnd": "planned", "resv": "reserved", "unk": "unknown",
            "failg": "failing", "npc": "perfctrs", "pow_dn": "power_down", "pow_up": "powering_up"}
_MARKS = {"~": "powered_down", "#": "powering_up", "%": "powering_down", "!": "power_down",
          "$": "maintenance", "@": "reboot_requested", "^": "reboot_issued", "-": "planned"}
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z][A-Za-z0-9_]*)=")
_NULL = ("", "(null)", "none", "n/a")


def _err(source: str, line: int, msg: str) -> TopologyError:
    return TopologyError(f"{source} line {line}: {msg}")


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses: `gpu:4(IDX:0,2-3),mps:0` has two entries."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def _gpus(gres: str, line: int, source: str, key: str) -> tuple[int, str | None]:
    """(GPU count, GPU type) of a GRES string; the type is the one holding most GPUs."""
    by_type: dict[str | None, int] = {}
    if gres.strip().lower() in _NULL:
        return 0, None
    for entry in _split_top(gres):
        m = re.fullmatch(r"(.*?)(\([^()]*\))?", entry)   # drop (S:0-1) / (IDX:0-1)
        parts = [p for p in (m.group(1) if m else entry).split(":") if p != "no_consume"]
        if parts[0].removeprefix("gres/") != "gpu":
            continue
        rest = parts[1:]
        if len(rest) == 1 and not rest[0].isdigit():   # `gpu:tesla` means one GPU of that type
            rest = [rest[0], "1"]
        count = rest[-1] if rest else "1"
        if not count.isdigit():
            raise _err(source, line, f"{key}={gres}: cannot read the GPU count of {entry!r}; "
                                     "expected gpu[:type]:count, e.g. gpu:h100:4")
        gtype = rest[0] if len(rest) > 1 and rest[0].lower() not in _NULL else None
        by_type[gtype] = by_type.get(gtype, 0) + int(count)
    total = sum(by_type.values())
    typed = {t: n for t, n in by_type.items() if t is not None}
    return total, max(typed, key=lambda t: typed[t]) if typed else None   # max keeps the first on a tie


def _used_idx(gres_used: str) -> tuple[int, ...] | None:
    """GPU indices in use from GresUsed's `(IDX:0-1,3)` parts; () for `IDX:N/A`; None when not printed."""
    found = re.findall(r"IDX:([^)]*)\)", gres_used)
    if not found:
        return None
    out: list[int] = []
    for body in found:
        for part in body.split(","):
            m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
            if m:
                out += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return tuple(sorted(set(out)))


def _alloc_tres_gpus(tres: str, line: int, source: str) -> int:
    """GPUs in AllocTRES (`cpu=8,mem=64G,gres/gpu=2,gres/gpu:h100=2`): gres/gpu, else the typed sum."""
    pairs = dict(item.split("=", 1) for item in tres.split(",") if "=" in item)
    wanted = ["gres/gpu"] if "gres/gpu" in pairs else [k for k in pairs if k.startswith("gres/gpu:")]
    for k in wanted:
        if not pairs[k].isdigit():
            raise _err(source, line, f"AllocTRES: {k}={pairs[k]!r} is not a GPU count")
    return sum(int(pairs[k]) for k in wanted)


def _state(raw: str, compact: bool = False) -> str:
    """`base+flag+…` in lower case as scontrol prints it; sinfo's marks (`idle~`) become the same flags, and
    not responding (`*` or +NOT_RESPONDING) a trailing `*`, so both sources read alike."""
    parts = raw.strip().lower().split("+")
    m = re.fullmatch(r"([a-z_]+)([*~#!%$@^\-]*)", parts[0])
    base, marks = (m.group(1), m.group(2)) if m else (parts[0], "")
    base = _COMPACT.get(base, base) if compact else base
    flags = [f for f in parts[1:] if f != "not_responding"]
    flags += [_MARKS[c] for c in marks if c in _MARKS and _MARKS[c] not in flags]
    star = "*" in marks or "not_responding" in parts[1:]
    return "+".join([base] + flags) + ("*" if star else "")


def _count(value: str, line: int, source: str, key: str, hint: str = "") -> int:
    if not value.strip().isdigit():
        raise _err(source, line, f"{key}={value!r}: expected a whole number{hint}")
    return int(value)


def _names(value: str) -> tuple[str, ...]:
    return () if value.strip().lower() in _NULL else tuple(v.strip() for v in value.split(",") if v.strip())


def _entries(text: str, source: str) -> list[list[tuple[int, str]]]:
    """Lines per node: each entry starts at NodeName=; the block form continues on indented lines."""
    entries: list[list[tuple[int, str]]] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if raw.lstrip().startswith("NodeName="):
            entries.append([(n, raw)])
        elif entries and raw[:1].isspace():
            entries[-1].append((n, raw))
        else:
            raise _err(source, n, f"expected a node entry starting with NodeName=, got {raw.strip()[:60]!r}")
    return entries


def _fields(lines: list[tuple[int, str]]) -> dict[str, tuple[str, int]]:
    """Key → (value, line); a value runs to the next ` Key=` (OS= and Reason= hold spaces); first wins."""
    out: dict[str, tuple[str, int]] = {}
    last: str | None = None   # the key whose value a keyless line continues (a Reason= over lines)
    for n, text in lines:
        marks = list(_KEY.finditer(text))
        head = text[:marks[0].start()] if marks else text
        if head.strip() and last:
            out[last] = (f"{out[last][0]} {head.strip()}", out[last][1])
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            last = m.group(1) if m.group(1) not in out else None
            out.setdefault(m.group(1), (text[m.end():end].strip(), n))
    return out


def _node(fields: dict[str, tuple[str, int]], start: int, source: str) -> SlurmNode:
    name = fields["NodeName"][0]
    if not name:
        raise _err(source, start, "NodeName= has no value")
    if "State" not in fields:
        raise _err(source, start, f"node {name!r} has no State=; is this `scontrol show node` output?")
    gpus, gtype = _gpus(*fields["Gres"], source, "Gres") if "Gres" in fields else (0, None)
    idx = None
    if "GresUsed" in fields:
        alloc = _gpus(*fields["GresUsed"], source, "GresUsed")[0]
        idx = _used_idx(fields["GresUsed"][0])
    else:
        alloc = _alloc_tres_gpus(*fields["AllocTRES"], source) if "AllocTRES" in fields else 0
    num = {k: _count(*fields[k], source, k) if k in fields else 0 for k in ("CPUTot", "RealMemory")}
    return SlurmNode(name=name, gpus=gpus, gpu_type=gtype, gpus_alloc=alloc, gpus_alloc_idx=idx, state=_state(fields["State"][0]),
                     partitions=_names(fields.get("Partitions", ("", 0))[0]), cpus=num["CPUTot"],
                     mem_mib=num["RealMemory"], features=_names(fields.get("AvailableFeatures", ("", 0))[0]))


def parse_scontrol_nodes(text: str, source: str = "<scontrol show node>") -> list[SlurmNode]:
    """Parse `scontrol show node` output, block form or `--oneliner`, into one SlurmNode per node.

    Allocated GPUs come from GresUsed= when printed, else from AllocTRES= gres/gpu."""
    return [_node(_fields(lines), lines[0][0], source) for lines in _entries(text, source)]


def parse_sinfo(text: str, source: str = "<sinfo>") -> list[SlurmNode]:
    """Parse `sinfo -N -h -o SINFO_FORMAT` (one line per node and partition) into one SlurmNode per node.

    sinfo prints no allocated GPUs, so gpus_alloc stays 0; take it from `scontrol show node`."""
    nodes: dict[str, SlurmNode] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        cells = [c.strip() for c in raw.split("|")]
        if len(cells) != len(_SINFO_FIELDS):
            raise _err(source, n, f"expected {len(_SINFO_FIELDS)} '|'-separated fields "
                                  f"({', '.join(_SINFO_FIELDS)}: sinfo -N -h -o \"{SINFO_FORMAT}\"), got {len(cells)}")
        if cells[0].upper() in ("NODELIST", "HOSTNAMES"):   # run without -h: the header
            continue
        try:
            names = expand_hostlist(cells[0])
        except ValueError as exc:
            raise _err(source, n, f"node list {cells[0]!r}: {exc}") from None
        if not names or not cells[2]:
            raise _err(source, n, "a line needs a node name and a state")
        hint = "; run sinfo with -N so each line is one node"
        gpus, gtype = _gpus(cells[3], n, source, "GRES")
        part = cells[1].rstrip("*")   # '*' marks the default partition
        for name in names:
            if name in nodes:
                if part and part not in nodes[name].partitions:
                    nodes[name] = replace(nodes[name], partitions=nodes[name].partitions + (part,))
                continue
            nodes[name] = SlurmNode(name=name, gpus=gpus, gpu_type=gtype, state=_state(cells[2], compact=True),
                                    partitions=(part,) if part else (), cpus=_count(cells[4], n, source, "CPUs", hint),
                                    mem_mib=_count(cells[5], n, source, "memory", hint), features=_names(cells[6]))
    return list(nodes.values())
