"""Slurm's network topology as `Network`: topology.conf, topology.yaml (Slurm ≥ 25.05), `scontrol show topology`.

Checks follow what slurmctld does with the same input (plugins/topology/tree/switch_record.c and
block/block_record.c): what it stops on with fatal() is a TopologyError naming the source and line; what it
only warns about (a node under two leaf switches) is logged, or an error with strict=True.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from scepsy_hpc.errors import SpecError, TopologyError
from scepsy_hpc.spec.hostlist import expand_hostlist
from scepsy_hpc.spec.source import SourceMap, parse_yaml
from scepsy_hpc.topology.model import Block, Network, Switch

log = logging.getLogger("scepsy_hpc.topology")

_MAX_NAME = 64  # slurmctld refuses switch names longer than HOST_NAME_MAX
# Keys valid after each leading key. topology.conf: Slurm itself rejects Level=, but we take it so a pasted
# `scontrol show topology` line still reads. scontrol: upper switches also print Nodes= (all nodes below).
_CONF_KEYS = {"SwitchName": ("SwitchName", "Switches", "Nodes", "Level", "LinkSpeed"),
              "BlockName": ("BlockName", "Nodes"), "BlockSizes": ("BlockSizes",)}
_SHOW_KEYS = {"SwitchName": ("SwitchName", "Level", "LinkSpeed", "Nodes", "Switches"),
              "BlockName": ("BlockName", "BlockIndex", "Nodes", "BlockSize"),
              "AggregatedBlock": ("AggregatedBlock", "BlockIndex", "Nodes", "BlockSize")}
_UNSUPPORTED = {"ringname": "topology/ring"}   # Slurm 26.x; torus3d exists only in topology.yaml
# Slurm's key=value form: spaces may surround '='; a value is "quoted" or runs to the next space.
_KV = re.compile(r'([A-Za-z0-9_.]+)[ \t]*=[ \t]*(?:"([^"]*)"|(?![A-Za-z0-9_.]+=)([^\s"]+))?')


def _err(source: str, line: int | None, msg: str) -> TopologyError:
    return TopologyError(f"{source} line {line}: {msg}" if line else f"{source}: {msg}")


def _hint(word: str, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word.lower(), [v.lower() for v in valid], n=1, cutoff=0.6)
    return next((f" (did you mean {v!r}?)" for v in valid if close and v.lower() == close[0]), "")


def _hosts(expr: str, line: int | None, source: str, key: str) -> tuple[str, ...]:
    try:
        return tuple(dict.fromkeys(expand_hostlist(expr)))  # Slurm keeps a node once (a bitmap)
    except ValueError as exc:
        raise _err(source, line, f"{key}={expr}: {exc}") from None


def _int(value: str, line: int, source: str, key: str) -> int:
    if not re.fullmatch(r"\d+", value):
        raise _err(source, line, f"{key}={value!r}: expected a whole number")
    return int(value)


@dataclass(frozen=True)
class _Record:
    """One logical line: its leading key, and key → (value, line) for every key on it."""

    lead: str
    line: int
    values: Mapping[str, tuple[str, int]]


@dataclass(frozen=True)
class _SwitchDef:
    name: str
    line: int
    nodes: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    children_line: int | None = None
    level: int | None = None


@dataclass(frozen=True)
class _BlockDef:
    name: str
    line: int
    nodes: tuple[str, ...] = ()
    index: int | None = None
    size: int | None = None
    aggregated: bool = False


def _records(text: str, source: str, leads: Mapping[str, tuple[str, ...]]) -> list[_Record]:
    """Comments stripped, backslash continuations joined, keys case-folded to Slurm's spelling."""
    records: list[_Record] = []
    items: list[tuple[str, str | None, int]] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), start=1):
        body = re.split(r"(?<!\\)#", raw, maxsplit=1)[0].rstrip()
        cont = len(body) - len(body.rstrip("\\"))
        body = body[:-1] if cont % 2 else body
        pos = 0
        while pos < len(body):
            if body[pos].isspace():
                pos += 1
                continue
            m = _KV.match(body, pos)
            if not m:
                word = body[pos:].split()[0]
                raise _err(source, n, f"expected Key=Value, got {word!r}")
            start = start or n
            items.append((m.group(1), m.group(2) if m.group(2) is not None else m.group(3), n))
            pos = m.end()
        if cont % 2 or not items:
            continue
        records.append(_record(items, start, source, leads))
        items, start = [], 0
    if items:
        records.append(_record(items, start, source, leads))
    return records


def _record(items: list[tuple[str, str | None, int]], start: int, source: str,
            leads: Mapping[str, tuple[str, ...]]) -> _Record:
    key0 = items[0][0]
    lead = next((k for k in leads if k.lower() == key0.lower()), None)
    if lead is None:
        if key0.lower() in _UNSUPPORTED:
            raise _err(source, start, f"{key0}= is {_UNSUPPORTED[key0.lower()]}, which scepsy does not model; "
                                      "it reads tree (SwitchName=) and block (BlockName=) topologies")
        raise _err(source, start, f"unknown key {key0!r}; a line starts with one of: {', '.join(leads)}"
                                  f"{_hint(key0, tuple(leads))}")
    valid = leads[lead]
    values: dict[str, tuple[str, int]] = {}
    for key, value, n in items:
        canon = next((v for v in valid if v.lower() == key.lower()), None)
        if canon is None:
            raise _err(source, n, f"unknown key {key!r}; valid keys: {', '.join(valid)}{_hint(key, valid)}")
        if canon in values:
            raise _err(source, n, f"{canon}= given twice for one {lead}")
        if value is None:
            raise _err(source, n, f"{canon}= has no value")
        values[canon] = (value, n)
    if not values[lead][0]:
        raise _err(source, start, f"{lead}= needs a name")
    return _Record(lead, start, values)


def _switch_def(rec: _Record, source: str, show: bool) -> _SwitchDef:
    name, line = rec.values["SwitchName"]
    if len(name) > _MAX_NAME:
        raise _err(source, line, f"switch name {name!r} is longer than {_MAX_NAME} characters")
    level = _int(*rec.values["Level"], source, "Level") if "Level" in rec.values else None
    if "LinkSpeed" in rec.values:
        _int(*rec.values["LinkSpeed"], source, "LinkSpeed")
    nodes = _hosts(*rec.values["Nodes"], source, "Nodes") if "Nodes" in rec.values else ()
    children, children_line = (), None
    if "Switches" in rec.values:
        expr, children_line = rec.values["Switches"]
        children = _hosts(expr, children_line, source, "Switches")
        if "Nodes" in rec.values and not show:
            raise _err(source, rec.line, f"switch {name!r} lists both Nodes= and Switches=; a switch holds "
                                         "either nodes (a leaf) or switches, not both")
        nodes = ()  # scontrol prints every node below an upper switch; the children already say it
    return _SwitchDef(name, rec.line, nodes, children, children_line, level)


def _unique(defs: list, source: str, what: str) -> dict:
    first: dict = {}
    for d in defs:
        if d.name in first:
            raise _err(source, d.line, f"{what} {d.name!r} is defined twice (first at line {first[d.name].line})")
        first[d.name] = d
    return first


def _build_tree(defs: list[_SwitchDef], source: str, strict: bool, missing_hint: str = "") -> dict[str, Switch]:
    """Switches in source order, after Slurm's checks: unique names, children defined, no cycle."""
    first = _unique(defs, source, "switch")
    for d in defs:
        for child in d.children:
            if child not in first:
                raise _err(source, d.children_line, f"Switches= names {child!r}, which no switch defines"
                                                    f"{_hint(child, tuple(first))}{missing_hint}")
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise _err(source, first[cycle[0]].line, f"switches form a cycle: {' -> '.join(cycle)}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for child in first[name].children:
            visit(child, path + [name])
        state[name] = 2

    for d in defs:
        visit(d.name, [])
    leaf_of: dict[str, _SwitchDef] = {}
    for d in defs:
        for node in d.nodes:
            if node in leaf_of:
                msg = (f"node {node!r} is under leaf switches {leaf_of[node].name!r} (line {leaf_of[node].line}) "
                       f"and {d.name!r}")
                if strict:
                    raise _err(source, d.line, msg)
                log.warning("%s line %d: %s; Slurm only warns about this", source, d.line, msg)
            leaf_of.setdefault(node, d)
    return {d.name: Switch(d.name, d.level, d.nodes, d.children) for d in defs}


def _block_sizes(values: list[Any], source: str, line: int | None) -> tuple[int, ...]:
    """BlockSizes as slurmctld accepts them: the base size, then base × a power of two each."""
    sizes: list[int] = []
    for v in values:
        if isinstance(v, bool) or not re.fullmatch(r"\d+", str(v).strip()) or int(str(v).strip()) <= 0:
            raise _err(source, line, f"BlockSizes: {v!r} is not a positive whole number")
        size = int(str(v).strip())
        ratio = size // sizes[0] if sizes else 1
        if sizes and (size % sizes[0] or ratio & (ratio - 1) or ratio > 1 << 15):
            raise _err(source, line, f"BlockSizes: {size} is not the base size {sizes[0]} times a power of two")
        sizes.append(size)
    return tuple(sizes)


def _build_blocks(defs: list[_BlockDef], sizes: tuple[int, ...], source: str) -> Network:
    """Base blocks in source order (aggregated ones only add their size), after Slurm's checks."""
    _unique(defs, source, "block")
    base = [d for d in defs if not d.aggregated]
    stated = sorted({d.size for d in defs if d.size})
    if stated:   # scontrol states each block's size
        return Network(blocks={d.name: Block(d.name, d.nodes, d.index, d.size) for d in base},
                       block_sizes=tuple(stated))
    size = sizes[0] if sizes else next((len(d.nodes) for d in base if d.nodes), 0)
    if base and not size:
        raise _err(source, base[0].line, "no block lists any node and BlockSizes is not set")
    return Network(blocks={d.name: Block(d.name, d.nodes, i, size) for i, d in enumerate(base)}, block_sizes=sizes)


def _assemble(records: list[_Record], source: str, show: bool, strict: bool) -> Network:
    """One Network from the records of a file or of scontrol's output (`show`)."""
    switches: list[_SwitchDef] = []
    blocks: list[_BlockDef] = []
    sizes: tuple[int, ...] = ()
    for rec in records:
        if rec.lead == "SwitchName":
            switches.append(_switch_def(rec, source, show))
        elif rec.lead == "BlockSizes":
            expr, line = rec.values["BlockSizes"]
            sizes = _block_sizes(expr.split(","), source, line)
        else:
            name, _ = rec.values[rec.lead]
            v = rec.values
            blocks.append(_BlockDef(
                name, rec.line, _hosts(*v["Nodes"], source, "Nodes") if "Nodes" in v else (),
                _int(*v["BlockIndex"], source, "BlockIndex") if "BlockIndex" in v else None,
                _int(*v["BlockSize"], source, "BlockSize") if "BlockSize" in v else None,
                rec.lead == "AggregatedBlock"))
        if switches and (blocks or sizes):
            raise _err(source, rec.line, "mixes switch (SwitchName=) and block (BlockName=/BlockSizes=) lines; "
                                         "one topology is either a tree or blocks")
    if switches:
        hint = "; was the output filtered (`scontrol show topology <node>`)? run it without arguments" if show else ""
        return Network(switches=_build_tree(switches, source, strict, hint))
    if blocks or sizes:
        return _build_blocks(blocks, sizes, source)
    return Network()


def parse_topology_conf(text: str, source: str = "<topology.conf>", *, strict: bool = False) -> Network:
    """Parse a topology.conf (tree: SwitchName=…; block: BlockName=…, BlockSizes=…) into a Network."""
    return _assemble(_records(text, source, _CONF_KEYS), source, show=False, strict=strict)


def parse_scontrol_topology(text: str, source: str = "<scontrol show topology>", *,
                            strict: bool = False) -> Network:
    """Parse `scontrol show topology` output (one SwitchName=/BlockName= record per line) into a Network.

    An upper switch's Nodes= (every node below it) is dropped: its Switches= already say it. Output filtered
    by node (`scontrol show topology node03`) names switches it does not print, and is refused as incomplete."""
    return _assemble(_records(text, source, _SHOW_KEYS), source, show=True, strict=strict)


@dataclass(frozen=True)
class TopologySet:
    """The topologies of a topology.yaml, in file order, and which one is the cluster default."""

    networks: Mapping[str, Network] = field(default_factory=dict)
    kinds: Mapping[str, str] = field(default_factory=dict)   # "tree", "block", "flat", "ring", "torus3d"
    default: str | None = None   # first with cluster_default: true, else the first (as slurmctld picks)

    def cluster_default(self) -> Network:
        """The network partitions without `Topology=` use; empty when the file defines none."""
        return self.networks[self.default] if self.default else Network()


_KINDS = ("tree", "block", "flat", "ring", "torus3d")
_TOPO_KEYS = ("topology", "cluster_default") + _KINDS


class _Yaml:
    """Schema checks on a loaded topology.yaml; every error names the line of the offending value."""

    def __init__(self, source: str, smap: SourceMap, strict: bool) -> None:
        self.source, self.smap, self.strict = source, smap, strict

    def err(self, loc: tuple, msg: str, key: bool = False) -> TopologyError:
        return _err(self.source, self.smap.line_of(loc, key=key), msg)

    def mapping(self, value: Any, loc: tuple, valid: tuple[str, ...], what: str) -> dict:
        if not isinstance(value, dict):
            raise self.err(loc, f"{what} must be a mapping with keys {', '.join(valid)}")
        for key in value:
            if key not in valid:
                raise self.err(loc + (key,), f"unknown key {key!r} in {what}; valid keys: {', '.join(valid)}"
                                             f"{_hint(str(key), valid)}", key=True)
        return value

    def seq(self, value: Any, loc: tuple, what: str) -> list:
        if not isinstance(value, list):
            raise self.err(loc, f"{what} must be a list")
        return value

    def name(self, item: dict, key: str, loc: tuple, what: str) -> str:
        if not isinstance(item.get(key), (str, int)) or isinstance(item.get(key), bool) or item[key] == "":
            raise self.err(loc + (key,) if key in item else loc, f"{what} needs `{key}: <name>`")
        return str(item[key])

    def hosts(self, item: dict, key: str, loc: tuple) -> tuple[str, ...]:
        value = item.get(key)
        if value is None:
            return ()
        if isinstance(value, list):   # not Slurm's form (a hostlist string), but unambiguous
            value = ",".join(str(v) for v in value)
        return _hosts(str(value), self.smap.line_of(loc + (key,)), self.source, key)

    def tree(self, value: Any, loc: tuple) -> Network:
        tree = self.mapping(value, loc, ("switches",), "tree")
        defs = []
        for i, item in enumerate(self.seq(tree.get("switches"), loc + ("switches",), "tree.switches")):
            at = loc + ("switches", i)
            item = self.mapping(item, at, ("switch", "children", "nodes"), "a switch")
            name = self.name(item, "switch", at, "a switch")
            if len(name) > _MAX_NAME:
                raise self.err(at + ("switch",), f"switch name {name!r} is longer than {_MAX_NAME} characters")
            if "children" in item and "nodes" in item:
                raise self.err(at, f"switch {name!r} has both children and nodes; a switch holds either")
            defs.append(_SwitchDef(name, self.smap.line_of(at) or 0, self.hosts(item, "nodes", at),
                                   self.hosts(item, "children", at), self.smap.line_of(at + ("children",))))
        if not defs:
            raise self.err(loc, "tree has no switches; slurmctld refuses to start with none")
        return Network(switches=_build_tree(defs, self.source, self.strict))

    def block(self, value: Any, loc: tuple) -> Network:
        block = self.mapping(value, loc, ("block_sizes", "blocks"), "block")
        sizes: tuple[int, ...] = ()
        if "block_sizes" in block:
            raw = block["block_sizes"]
            raw = raw.split(",") if isinstance(raw, str) else self.seq(raw, loc + ("block_sizes",), "block_sizes")
            sizes = _block_sizes(raw, self.source, self.smap.line_of(loc + ("block_sizes",)))
        defs = []
        for i, item in enumerate(self.seq(block.get("blocks"), loc + ("blocks",), "block.blocks")):
            at = loc + ("blocks", i)
            item = self.mapping(item, at, ("block", "nodes"), "a block")
            defs.append(_BlockDef(self.name(item, "block", at, "a block"), self.smap.line_of(at) or 0,
                                  self.hosts(item, "nodes", at)))
        if not defs:
            raise self.err(loc, "block has no blocks; slurmctld refuses to start with none")
        return _build_blocks(defs, sizes, self.source)


def parse_topology_yaml(text: str, source: str = "<topology.yaml>", *, strict: bool = False) -> TopologySet:
    """Parse a Slurm ≥ 25.05 topology.yaml: a list of named tree / block / flat topologies."""
    if not any(ln.split("#", 1)[0].strip() not in ("", "---", "...") for ln in text.splitlines()):
        raise _err(source, 1, "empty; expected a list of topologies (- topology: <name> …)")
    try:
        data, smap = parse_yaml(text, source)
    except SpecError as exc:   # "src:7: msg" from the shared loader → our "src line 7: msg"
        raise TopologyError([re.sub(rf"^{re.escape(source)}:(\d+):", rf"{source} line \1:", p)
                             for p in exc.problems]) from None
    y = _Yaml(source, smap, strict)
    networks: dict[str, Network] = {}
    kinds: dict[str, str] = {}
    lines: dict[str, int | None] = {}
    first_default = None
    for i, item in enumerate(y.seq(data, (), "topology.yaml (a list of topologies)")):
        item = y.mapping(item, (i,), _TOPO_KEYS, "a topology")
        name = y.name(item, "topology", (i,), "a topology")
        if name in networks:
            raise y.err((i, "topology"), f"topology {name!r} is defined twice (first at line {lines[name]})")
        lines[name] = smap.line_of((i, "topology"))
        flag = item.get("cluster_default", False)
        if not isinstance(flag, bool):
            raise y.err((i, "cluster_default"), f"cluster_default must be true or false, got {flag!r}")
        present = [k for k in _KINDS if k in item and item[k] is not False]
        if len(present) != 1:
            raise y.err((i,), f"topology {name!r} must define exactly one of {', '.join(_KINDS)}"
                              f"{'; it has ' + ', '.join(present) if present else ''}")
        kind = present[0]
        if kind == "tree":
            networks[name] = y.tree(item[kind], (i, kind))
        elif kind == "block":
            networks[name] = y.block(item[kind], (i, kind))
        else:
            if kind == "flat" and not (item[kind] is True or isinstance(item[kind], dict)):
                raise y.err((i, kind), f"flat must be true (or a mapping of options), got {item[kind]!r}")
            if kind != "flat":   # placement then sees no network structure, which is safe, only less tight
                log.warning("%s: topology %r is %s, which scepsy does not model; read as flat", source, name, kind)
            networks[name] = Network()
        kinds[name] = kind
        first_default = first_default or (name if flag else None)
    return TopologySet(networks, kinds, first_default or next(iter(networks), None))
