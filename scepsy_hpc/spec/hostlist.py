"""Slurm hostlist expressions: `gpu[01-04,07]`, `a[1-2]b[1-2]`, `n1,n[3-4]`.

Checked against python-hostlist on Slurm's documented forms (tests/unit/spec/test_hostlist.py): the
same names in the same order (duplicates kept, as `allow_duplicates=True`); whitespace around a name
is dropped (`a, b` is a and b; python-hostlist keeps " b"). Ours stays because its errors name the expression
and what is wrong, and a spec file's validator adds the file and line.
"""

from __future__ import annotations

import itertools
import math
import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# Far above any cluster (the largest have tens of thousands of nodes), low enough that a typo such as
# node[1-100000000] is refused at once instead of filling memory.
MAX_HOSTS = 100_000


def _split_top(expr: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {expr!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unclosed '[' in hostlist {expr!r}")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_brackets(body: str, expr: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in hostlist {expr!r}; use forms like [1-4,7] or [01-16]")
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"range {item!r} in hostlist {expr!r} runs backwards")
        if hi - lo >= MAX_HOSTS:
            raise ValueError(f"range {item!r} in hostlist {expr!r} names {hi - lo + 1} hosts; at most {MAX_HOSTS}")
        width = len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def expand_hostlist(expr: str) -> list[str]:
    """All host names of a hostlist expression, in order, zero padding kept."""
    hosts: list[str] = []
    for part in _split_top(expr):
        pieces: list[list[str]] = []
        pos = 0
        for m in re.finditer(r"\[([^\[\]]*)\]", part):
            pieces.append([part[pos:m.start()]])
            pieces.append(_expand_brackets(m.group(1), expr))
            pos = m.end()
        pieces.append([part[pos:]])
        if any(c in "[]" for c in part[pos:]) or any(c in "[]" for p in pieces[::2] for c in p[0]):
            raise ValueError(f"malformed brackets in hostlist {expr!r}")
        n = len(hosts) + math.prod(len(p) for p in pieces)
        if n > MAX_HOSTS:  # several ranges multiply (rack[1-500]-node[1-500])
            raise ValueError(f"hostlist {expr!r} names {n} hosts or more; at most {MAX_HOSTS}")
        hosts.extend("".join(combo) for combo in itertools.product(*pieces))
    return hosts
