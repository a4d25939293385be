"""`scepsy bench --resume DIR`: what an interrupted bench had finished, kept so that running the same
command again goes on where it stopped instead of starting over.

A long cell (tot_verifier on 16 GPUs: ~13 min of planning, then hours of simulation on one core)
outlasts a session or a job's walltime. With `--resume DIR` the bench keeps, in DIR:
- each policy's plan (`plan-<key>.pickle`): planning again could come out otherwise (the MILP's time
  limit is wall time), and every simulation below is keyed by the plan it measures;
- each capacity bisection's judged rates, one JSON line per rate as it is decided
  (`cap-<key>.jsonl`): `max_sustainable_rate` replays them (the bisection is deterministic given its
  verdicts) and simulates only the rates not yet decided;
- each latency run's figures (`lat-<key>.json`).

A key is a SHA-256 of everything the result depends on: the source of every module of the package
(so a result of other code is never reused), and the inputs' reprs (workflow, allocation, catalogs,
rate, requests, seed; for a plan, the whole request and GPU count). The directory is made private
(0700) and used only when it belongs to the user and nobody else may write it — a plan is a pickle,
and a pickle from another user would run their code. Files are written atomically, owner-only; a
line or file that does not read back is ignored (done again), never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import stat
import sys
from pathlib import Path
from typing import Any, Callable

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.records import PRIVATE, write_atomic

MAX_FILE_BYTES = 64 << 20   # a plan with its checks is far smaller; anything larger is not ours
_code: str | None = None


def code_digest() -> str:
    """SHA-256 of the source of every module of the package, the interpreter and the versions of the
    libraries a plan depends on (once per process)."""
    global _code
    if _code is None:
        from importlib.metadata import PackageNotFoundError, version

        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256(f"{sys.version}|{platform.machine()}".encode())
        for lib in ("pydantic", "pulp", "highspy", "numpy", "PyYAML"):
            try:
                h.update(f"|{lib}={version(lib)}".encode())
            except PackageNotFoundError:
                h.update(f"|{lib}=-".encode())
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
        _code = h.hexdigest()
    return _code


def key_of(*parts: Any) -> str:
    """The key of a result of `parts` (reprs of specs and numbers: stable across processes)."""
    h = hashlib.sha256(code_digest().encode())
    for p in parts:
        h.update(b"\x1f")
        h.update(repr(p).encode())
    return h.hexdigest()[:32]


def open_dir(path: str) -> Path:
    """`path` made (0700) or checked: ours, and nobody else may write it; else a SpecError saying so."""
    d = Path(path).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = d.stat()
    except FileExistsError:
        raise SpecError(f"{path}: not a directory; name a directory (it is made if missing)") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot make or read the directory ({e.strerror}); name one you may write") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{path}: not a directory; name a directory (it is made if missing)")
    if st.st_uid != os.getuid():
        raise SpecError(f"{path}: belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); its results could be "
                        "anyone's — use a directory of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SpecError(f"{path}: others may write it (mode {stat.S_IMODE(st.st_mode):o}); its results could be "
                        f"anyone's — use a directory of your own, or chmod 700 {path}")
    return d


def _read_own(path: Path) -> bytes | None:
    """The bytes of `path` when it is a regular file of ours (opened without following a link, checked on
    the open file: nothing can be swapped in between), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > MAX_FILE_BYTES:
            return None
        return f.read(MAX_FILE_BYTES + 1)


def is_kept(path: Path) -> bool:
    """`path` is a regular file of ours (what a reader here would read back)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size <= MAX_FILE_BYTES


def memo_plan(d: Path | None, key: str, make: Callable[[], Any], reused: list[int] | None = None) -> Any:
    """The plan kept under `key` in `d`, else `make()` kept there (an error raised by `make` is not kept);
    `reused[0]` counts the plans read back."""
    if d is None:
        return make()
    path = d / f"plan-{key}.pickle"
    data = _read_own(path)
    if data is not None:
        try:
            out = pickle.loads(data)
            if reused is not None:
                reused[0] += 1
            return out
        except Exception:   # noqa: BLE001 — a torn entry is planned again
            pass
    out = make()
    try:
        write_atomic(path, pickle.dumps(out), mode=PRIVATE)
    except Exception:   # noqa: BLE001 — best effort: an unpicklable plan (or a full disk) is planned again next time
        pass
    return out


def memo_json(path: Path | None, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON object kept at `path`, else `make()` kept there."""
    if path is None:
        return make()
    data = _read_own(path)
    if data is not None:
        try:
            v = json.loads(data)
            if isinstance(v, dict):
                return v
        except ValueError:
            pass
    out = make()
    try:
        write_atomic(path, json.dumps(out), mode=PRIVATE)
    except OSError:
        pass
    return out


def read_runs(path: Path | None) -> dict[float, tuple[bool, float, float, int]]:
    """The judged rates of a capacity journal: rate → (sustained, throughput, mean latency, requests);
    a torn last line (the bench stopped mid-write) is skipped."""
    known: dict[float, tuple[bool, float, float, int]] = {}
    data = None if path is None else _read_own(path)
    if data is None:
        return known
    for line in data.decode(errors="replace").splitlines():
        try:
            r = json.loads(line)
            known[float(r["rate"])] = (bool(r["ok"]), float(r["throughput"]), float(r["latency"]), int(r["requests"]))
        except (ValueError, KeyError, TypeError):
            continue
    return known


def run_writer(path: Path | None) -> Callable[[float, bool, Any], None] | None:
    """An `on_run` for `max_sustainable_rate` appending each judged rate to the journal at `path`."""
    if path is None:
        return None

    def write(rate: float, ok: bool, res: Any) -> None:
        line = json.dumps({"rate": rate, "ok": ok, "throughput": res.throughput_rps, "latency": res.latency_mean_s,
                           "requests": res.requests})
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, PRIVATE)
            with os.fdopen(fd, "a") as f:
                f.write("\n" + line + "\n")   # on a line of its own even after a torn one (blank lines are skipped)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass   # best effort: the rate is judged again next time
    return write


def journal(d: Path | None, kind: str, key: str, suffix: str) -> Path | None:
    """Where a result of `kind` under `key` is kept in `d` (None: nowhere)."""
    return None if d is None else d / f"{kind}-{key}.{suffix}"


