"""Slurm hostlist expressions: `gpu[01-04,07]`, `a[1-2]b[1-2]`, `n1,n[3-4]`.

Checked against python-hostlist on Slurm's documented forms (tests/unit/spec/test_hostlist.py): the
same names in the same order (duplicates kept, as `allow_duplicates=True`); whitespace around a name
is dropped (`a, b` is a and b; python-hostlist keeps " b"). Ours stays because its errors name the expression
and what is wrong, and a spec file's validator adds the file and line.
"""

from __future__ import annotations

import itertools
import re

from scepsy_hpc.spec import limits

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# Far above any cluster (the largest have tens of thousands of nodes), low enough that a typo such as
# node[1-100000000] is refused at once instead of filling memory; SCEPSY_MAX_HOSTS raises it.
MAX_HOSTS = limits.HOSTS.default
_MAX_EXPR = 65_536   # characters of one expression: a Slurm hostlist string is far shorter


def _split_top(expr: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {_short(expr)}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unclosed '[' in hostlist {_short(expr)}")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _short(expr: str) -> str:
    return repr(expr if len(expr) <= 80 else expr[:80] + "…")


def _ranges(body: str, expr: str) -> list[tuple[int, int, int]]:
    """(low, high, zero-padded width) of each item of one bracket, checked, nothing expanded."""
    out: list[tuple[int, int, int]] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in hostlist {_short(expr)}; use forms like [1-4,7] or [01-16]")
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        if len(lo_s) > 18 or len(hi_s) > 18:
            raise ValueError(f"range {item!r} in hostlist {_short(expr)}: numbers of at most 18 digits")
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"range {item!r} in hostlist {_short(expr)} runs backwards")
        out.append((lo, hi, len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0))
    return out


def _too_many(n: int, expr: str) -> ValueError:
    return ValueError(f"hostlist {_short(expr)} names {n} hosts or more; at most {limits.HOSTS.value()} "
                      f"({limits.HOSTS.env}=N raises it if you really need more)")


def expand_hostlist(expr: str) -> list[str]:
    """All host names of a hostlist expression, in order, zero padding kept.

    The number of names is counted from the ranges before anything is expanded, so
    `n[1-100000]x[1-100000]` is refused at once, not after filling memory.
    """
    cap = limits.HOSTS.value()
    if len(expr) > _MAX_EXPR:
        raise ValueError(f"hostlist of {len(expr):,} characters; at most {_MAX_EXPR:,}")
    parsed: list[list[list[tuple[int, int, int]] | str]] = []
    total = 0
    for part in _split_top(expr):
        pieces: list[list[tuple[int, int, int]] | str] = []
        pos = 0
        for m in re.finditer(r"\[([^\[\]]*)\]", part):
            pieces.append(part[pos:m.start()])
            pieces.append(_ranges(m.group(1), expr))
            pos = m.end()
        pieces.append(part[pos:])
        if any(c in "[]" for p in pieces if isinstance(p, str) for c in p):
            raise ValueError(f"malformed brackets in hostlist {_short(expr)}")
        n = 1
        for p in pieces:  # several ranges multiply (rack[1-500]-node[1-500])
            if not isinstance(p, str):
                n *= sum(hi - lo + 1 for lo, hi, _ in p)
                if total + n > cap:
                    raise _too_many(total + n, expr)
        total += n
        parsed.append(pieces)
    hosts: list[str] = []
    for pieces in parsed:
        choices = [[p] if isinstance(p, str) else [str(i).zfill(w) for lo, hi, w in p for i in range(lo, hi + 1)]
                   for p in pieces]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts
