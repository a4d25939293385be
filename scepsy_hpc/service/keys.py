"""Client keys of the gateway: made, kept hashed, revoked, and written into the endpoints file's `auth`.

    sk-scepsy-<id>-<token>     id: 8 hex characters (public: `scepsy keys list`, logs); token: 32 random
                               bytes, URL-safe base64 (43 characters), from the `secrets` module

The state keeps only each key's SHA-256; the text is shown once, when it is made. The key made for the
owner at `scepsy up` is also kept in `<deployment dir>/owner.key` (0600), so `scepsy keys show NAME`,
`scepsy drive` and the examples can use it; `up` again keeps it while it is not revoked. Keys belong to
a deployment's name and outlive a `down`: a key revoked stays revoked.

The daemon has a key of its own (id `daemon`, every deployment) for the gateway's stats and metrics;
it lives in the state (`meta`), so a new daemon keeps talking to the gateway it adopts.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scepsy_hpc.errors import ScepsyError, SpecError
from scepsy_hpc.service.state import KeyRow, StateStore

if TYPE_CHECKING:
    from scepsy_hpc.gateway.endpoints import Auth

PREFIX = "sk-scepsy-"
OWNER_LABEL = "owner"
OWNER_MAX_CONCURRENT = 512     # the owner key's calls in flight at once (a `keys create` key has no limit by default)
OWNER_RPM: int | None = None   # the owner key's requests per minute: no limit
DAEMON_KEY_ID = "daemon"
OWNER_FILE = "owner.key"
_DAEMON_META = "daemon_key"


class ClientKeyError(ScepsyError):
    """A key id that names no key, or a key that cannot be used as asked (revoked)."""


def new_key(key_id: str | None = None) -> tuple[str, str]:
    """(id, key): a fresh key `sk-scepsy-<id>-<token>` (a random 8-hex id unless given)."""
    key_id = key_id or secrets.token_hex(4)
    return key_id, f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def key_sha256(key: str) -> str:
    """The hex SHA-256 of the key's UTF-8 text (what the state and the gateway keep)."""
    return hashlib.sha256(key.encode()).hexdigest()


def engine_secret() -> str:
    """A fresh engine secret for one serving job."""
    return secrets.token_urlsafe(32)


def owner_key_path(session_dir: str | Path) -> Path:
    """Where the owner key of the deployment with this session directory is kept."""
    return Path(session_dir) / OWNER_FILE


def _write_private(path: Path, text: str) -> None:
    from scepsy_hpc.spec.records import PRIVATE, write_atomic

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, text, mode=PRIVATE)


def _limit(value: int | None, flag: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SpecError(f"{flag} {value!r}: give a whole number ≥ 1 (or leave it out for no limit)")
    return value


class Keys:
    """The keys of one state: made, listed, revoked, and the gateway's `auth` section."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def create(self, deployment: str, *, label: str = "", max_concurrent: int | None = None,
               rpm: int | None = None) -> tuple[KeyRow, str]:
        """A new key of `deployment`; (its row, the key text, which is never stored)."""
        _limit(max_concurrent, "--max-concurrent")
        _limit(rpm, "--rpm")
        if len(label) > 200:
            raise SpecError(f"--label of {len(label)} characters: keep it under 200")
        if not label.isprintable():
            raise SpecError(f"--label {label!r}: use printable characters (no control characters or line breaks)")
        for _ in range(8):   # 2^32 ids: a collision is rare, and another draw fixes it
            key_id, key = new_key()
            if self.store.get_key(key_id) is None and key_id != DAEMON_KEY_ID:
                break
        row = self.store.add_key(KeyRow(id=key_id, deployment=deployment, sha256=key_sha256(key), label=label,
                                        created=time.time(), max_concurrent=max_concurrent, rpm=rpm))
        return row, key

    def ensure_owner(self, deployment: str, session_dir: str | Path) -> KeyRow:
        """The owner key of `deployment`: the one in its owner.key while that works, else a new one (written there)."""
        path = owner_key_path(session_dir)
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            sha = key_sha256(text)
            for row in self.store.keys(deployment, include_revoked=False):
                if row.sha256 == sha:
                    return row
        row, key = self.create(deployment, label=OWNER_LABEL, max_concurrent=OWNER_MAX_CONCURRENT, rpm=OWNER_RPM)
        _write_private(path, key + "\n")
        return row

    def owner(self, deployment: str, session_dir: str | Path) -> tuple[KeyRow, str]:
        """(row, key) of the owner key kept for `deployment`; ClientKeyError saying how to get one when it has none."""
        path = owner_key_path(session_dir)
        try:
            text = path.read_text().strip()
        except OSError:
            raise ClientKeyError(f"deployment {deployment!r} has no owner key ({path} is missing): `scepsy up` makes one, "
                            f"`scepsy keys create {deployment}` makes another key") from None
        sha = key_sha256(text)
        row = next((r for r in self.store.keys(deployment) if r.sha256 == sha), None)
        if row is None:
            raise ClientKeyError(f"{path} holds no key of deployment {deployment!r}: `scepsy up` again makes a new one")
        if row.revoked_at is not None:
            raise ClientKeyError(f"the owner key of {deployment!r} (id {row.id}) was revoked at "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row.revoked_at))}: "
                            f"`scepsy keys create {deployment}` makes a new key, `scepsy up` a new owner key")
        return row, text

    def revoke(self, key_id: str) -> KeyRow:
        """Revoke the key `key_id`; ClientKeyError when there is none or it is revoked already."""
        row = self.store.get_key(key_id)
        if row is None:
            known = [r.id for r in self.store.keys(include_revoked=False)]
            raise ClientKeyError(f"no key {key_id!r} here; `scepsy keys list` shows them"
                            + (f" (working: {', '.join(known[:10])}{' …' if len(known) > 10 else ''})" if known else
                               " (none works now)"))
        if row.revoked_at is not None:
            raise ClientKeyError(f"key {key_id!r} of {row.deployment!r} is already revoked (at "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row.revoked_at))}); nothing to do")
        return self.store.revoke_key(key_id)

    def daemon_key(self) -> str:
        """The daemon's own key for the gateway (made once, kept in the state)."""
        key = self.store.get_meta(_DAEMON_META)
        if not key:
            _, key = new_key(DAEMON_KEY_ID)
            self.store.set_meta(_DAEMON_META, key)
        return key

    def auth(self) -> Auth:
        """The endpoints file's `auth`: every working key of every deployment, and the daemon's."""
        from scepsy_hpc.gateway.endpoints import Auth, ClientKey

        keys = [ClientKey(id=r.id, sha256=r.sha256, deployments=[r.deployment], max_concurrent=r.max_concurrent,
                          rpm=r.rpm) for r in self.store.keys(include_revoked=False)]
        keys.append(ClientKey(id=DAEMON_KEY_ID, sha256=key_sha256(self.daemon_key()), deployments=["*"]))
        return Auth(keys=keys)


def key_doc(row: KeyRow) -> dict[str, object]:
    """A key as `scepsy keys list --json` shows it: never the key nor its hash."""
    return {"id": row.id, "deployment": row.deployment, "label": row.label, "created": row.created,
            "revoked": row.revoked_at is not None, "revoked_at": row.revoked_at,
            "max_concurrent": row.max_concurrent, "rpm": row.rpm}
