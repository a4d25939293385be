"""A per-user disk cache of synthetic profiles, so that planning again (another rate, GPU count, goal or
policy) does not synthesise them again.

A synthetic profile is a pure function of its inputs: the LLM and workflow names it is labelled with,
the model and GPU specs, the engine configuration, the call mix (in order: calls are drawn from it by
position), the calls per point, the seed, and the code that simulates it. The key is a SHA-256 of all
of them, the code as the bytes of the modules that make a profile, so a change to the performance
model or the sweep misses the cache instead of returning stale profiles. Request-shaped profiles
(`--arrivals requests`) are not cached.

Where: `$SCEPSY_PROFILE_CACHE` (a directory; `off` turns the cache off), else
`$XDG_CACHE_HOME/scepsy/profiles`, else `~/.cache/scepsy/profiles`. The directory is made private
(0700) and used only when it belongs to the user and no one else may write it; files are written
atomically, owner-only, and a file that does not read back as a profile is ignored and made again.
At most `MAX_ENTRIES` files are kept: the oldest tenth goes when it is full.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from scepsy_hpc.profile.table import ProfileTable, table_from_dict
from scepsy_hpc.spec.records import PRIVATE, write_atomic

log = logging.getLogger("scepsy_hpc.predict")

MAX_ENTRIES = 20_000      # ~10 KB each
MAX_FILE_BYTES = 4 << 20  # a profile is far smaller; anything larger is not ours
ENV = "SCEPSY_PROFILE_CACHE"
# the modules whose code decides what a synthetic profile is
CODE = ("scepsy_hpc.perf.model", "scepsy_hpc.perf.engine", "scepsy_hpc.perf.replay", "scepsy_hpc.perf.prefix",
        "scepsy_hpc.perf.events", "scepsy_hpc.perf.fit", "scepsy_hpc.profile.synthetic", "scepsy_hpc.profile.sweep",
        "scepsy_hpc.profile.table", "scepsy_hpc.workload.arrivals", "scepsy_hpc.workload.sampler")
_code_digest: str | None = None


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "no", "false") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scepsy" / "profiles"


def code_digest() -> str:
    """SHA-256 of the source of the modules that make a profile (once per process)."""
    global _code_digest
    if _code_digest is None:
        h = hashlib.sha256()
        for name in CODE:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
            h.update(name.encode())
            h.update(Path(origin).read_bytes() if origin and os.path.exists(origin) else b"?")
        _code_digest = h.hexdigest()
    return _code_digest


def key_of(parts: tuple[Any, ...]) -> str:
    """The cache key of a profile's inputs (reprs of specs and numbers: stable across runs)."""
    h = hashlib.sha256(code_digest().encode())
    for p in parts:
        h.update(b"\x1f")
        h.update(repr(p).encode())
    return h.hexdigest()


def _usable(d: Path) -> bool:
    """The directory exists (made private if new), is ours and nobody else may write it."""
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = d.stat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def load(key: str) -> ProfileTable | None:
    """The cached profile of `key`, or None (absent, unreadable, not ours, or the cache is off)."""
    d = cache_dir()
    if d is None or not d.is_dir():
        return None
    path = d / f"{key}.json"
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > MAX_FILE_BYTES:
            return None
        if not _usable(d):
            return None
        return table_from_dict(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 — a bad entry is made again, never an error
        log.debug("profile cache: ignoring %s: %s", path, exc)
        return None


def store(key: str, table: ProfileTable) -> None:
    """Keep `table` under `key` (best effort: a full disk or a foreign directory only costs the cache)."""
    d = cache_dir()
    if d is None or not _usable(d):
        return
    try:
        write_atomic(d / f"{key}.json", json.dumps(table.to_dict(), allow_nan=True), mode=PRIVATE)
        _trim(d)
    except OSError as exc:
        log.debug("profile cache: not stored: %s", exc)


def _trim(d: Path) -> None:
    """Drop the oldest tenth of the entries when there are more than MAX_ENTRIES."""
    try:
        entries = [e for e in os.scandir(d) if e.name.endswith(".json") and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime)
    for e in entries[: len(entries) - MAX_ENTRIES + MAX_ENTRIES // 10]:
        try:
            os.unlink(e.path)
        except OSError:
            pass
