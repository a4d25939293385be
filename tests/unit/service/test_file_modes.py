"""Nothing a deployment writes is readable by group or others, even when the user's umask is 000: a real daemon,
`up` on the local backend, calls through the gateway, `down`; then every file and directory under the state
dir, and the node-local directory of the agents' port lock, is checked."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX modes, process groups"),
              pytest.mark.timeout(60)]


@pytest.fixture
def umask_000() -> Iterator[None]:
    """This process (and so every scepsy process the test starts) under umask 000."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _open_to_others(root: Path) -> tuple[list[str], int]:
    """Every path under `root` (itself included) with a group or other permission bit, as 'MODE path'; and how
    many paths were looked at. Symbolic links are not judged (their own mode means nothing)."""
    bad, seen = [], 0
    for dirpath, _, filenames in os.walk(root):   # each directory is judged as the walk enters it
        for path in [Path(dirpath)] + [Path(dirpath) / n for n in filenames]:
            try:
                st = os.lstat(path)
            except FileNotFoundError:   # removed while we looked (an atomic write's temporary)
                continue
            seen += 1
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                bad.append(f"{stat.filemode(st.st_mode)} {oct(stat.S_IMODE(st.st_mode))} {path}")
    return bad, seen


def _chat(base_url: str, model: str, key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    return out.choices[0].message.content or ""


def test_a_deployment_under_umask_000_writes_nothing_group_or_other_readable(tmp_path: Path, state: Path, sv: Any,
                                                                            umask_000: None) -> None:
    from scepsy_hpc.backend.agent import PORT_LOCK_NAME, port_lock_path

    started = sv.scepsy(state, "daemon", "start", "--poll", "0.5")
    assert started.returncode == 0, started.stderr
    up = sv.scepsy(state, "up", str(sv.small_plan(tmp_path / "plan.yaml")), "--name", "modes", "--detach",
                   "--time-scale", "0.05")
    assert up.returncode == 0, up.stderr
    doc = sv.wait_state(state, "modes", "serving")
    # the owner's client key where the daemon makes one (`keys show`); a gateway without keys takes any
    shown = sv.scepsy(state, "keys", "show", "modes")
    key = shown.stdout.split()[-1] if shown.returncode == 0 and shown.stdout.strip() else "unused"
    for llm in ("generator", "rewriter", "reranker"):
        assert _chat(f"{doc['gateway_url']}/d/modes/v1", llm, key)

    session = state / "deployments" / "modes"
    kinds = {p.name for p in session.rglob("*")}
    assert {"serve.json", "logs", "agents"} <= kinds and any(k.startswith("engine-") for k in kinds), sorted(kinds)
    bad, seen = _open_to_others(state)
    # the agents' port lock: node-local, in a directory of this user's own (never a shared /tmp file)
    lock = port_lock_path(os.environ, session)
    assert lock.exists() and lock.parent != Path(tempfile.gettempdir()) and lock.parent.stat().st_uid == os.getuid()
    assert lock.name == PORT_LOCK_NAME and lock != Path("/tmp/scepsy-agent-ports.lock")
    lock_bad, _ = _open_to_others(lock.parent) if lock.parent != session else ([], 0)
    assert not bad + lock_bad, f"{len(bad + lock_bad)} of {seen} paths are open to group or others:\n" + \
        "\n".join(bad + lock_bad)

    down = sv.scepsy(state, "down", "modes")
    assert down.returncode == 0, down.stderr
    bad, _ = _open_to_others(state)
    assert not bad, "after down:\n" + "\n".join(bad)
    print(json.dumps({"checked": seen, "lock": str(lock)}))
