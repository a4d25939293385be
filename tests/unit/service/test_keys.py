"""Client keys: their format, kept hashed, the owner key kept across `up`, revocation and its errors, the daemon's
own key kept in the state, the endpoints file's `auth`; a state dir narrowed to 0700 with a warning."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Iterator

import pytest

from scepsy_hpc.service.keys import (DAEMON_KEY_ID, OWNER_MAX_CONCURRENT, ClientKeyError, Keys, key_doc, key_sha256,
                                     new_key)
from scepsy_hpc.service.paths import StatePaths
from scepsy_hpc.service.state import StateStore

KEY = re.compile(r"^sk-scepsy-[0-9a-f]{8}-[A-Za-z0-9_-]{43}$")


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[Keys]:
    store = StateStore(tmp_path / "state" / "state.db")
    yield Keys(store)
    store.close()


def test_a_key_has_the_documented_form_and_only_its_hash_is_stored(keys: Keys) -> None:
    a, b = new_key()[1], new_key()[1]
    assert KEY.match(a) and KEY.match(b) and a != b
    row, key = keys.create("demo", label="ci", rpm=60)
    assert KEY.match(key) and key.split("-")[2] == row.id
    assert row.sha256 == key_sha256(key) and key not in repr(row)
    doc = key_doc(row)
    assert doc["rpm"] == 60 and doc["max_concurrent"] is None and not doc["revoked"]
    assert key not in str(doc) and row.sha256 not in str(doc)   # `keys list` shows neither
    raw = (keys.store.path).read_bytes() + Path(f"{keys.store.path}-wal").read_bytes()
    assert key.encode() not in raw and row.sha256.encode() in raw


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_a_limit_that_is_not_a_whole_number_above_zero_is_refused_naming_its_flag(keys: Keys, bad: object) -> None:
    with pytest.raises(Exception) as err:
        keys.create("demo", rpm=bad)   # type: ignore[arg-type]
    assert "--rpm" in str(err.value) and repr(bad) in str(err.value)
    assert keys.store.keys() == []


@pytest.mark.parametrize("label", ["x" * 201, "two\nlines", "esc\x1b[31m"])
def test_a_label_too_long_or_with_control_characters_is_refused(keys: Keys, label: str) -> None:
    with pytest.raises(Exception) as err:
        keys.create("demo", label=label)
    assert "--label" in str(err.value)
    assert keys.store.keys() == []


def test_a_label_is_listed_as_text_not_as_rich_markup(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from scepsy_hpc.commands import keys as keys_cmd

    doc = {"keys": [{"id": "0a0a0a0a", "deployment": "demo", "label": "[/] [bold]x", "created": 0.0,
                     "revoked": False, "revoked_at": None, "max_concurrent": None, "rpm": None}]}
    client = SimpleNamespace(request=lambda *a, **kw: doc)
    keys_cmd._list(SimpleNamespace(name=None, json=False), client)
    assert "[/] [bold]x" in capsys.readouterr().out


def test_the_owner_key_is_kept_in_a_private_file_and_reused_until_revoked(keys: Keys, tmp_path: Path) -> None:
    session = tmp_path / "state" / "deployments" / "demo"
    first = keys.ensure_owner("demo", session)
    path = session / "owner.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.label == "owner" and first.max_concurrent == OWNER_MAX_CONCURRENT and first.rpm is None
    assert keys.ensure_owner("demo", session) == first          # `up` again keeps the same key
    row, key = keys.owner("demo", session)
    assert row == first and key == path.read_text().strip()
    keys.revoke(first.id)
    with pytest.raises(ClientKeyError) as err:
        keys.owner("demo", session)
    assert f"owner key of 'demo' (id {first.id}) was revoked" in str(err.value) and "scepsy keys create demo" in str(err.value)
    again = keys.ensure_owner("demo", session)                  # a revoked owner key is replaced at the next `up`
    assert again.id != first.id and keys.owner("demo", session)[0] == again


def test_revoking_an_unknown_or_revoked_key_says_so_and_changes_nothing(keys: Keys) -> None:
    row, _ = keys.create("demo")
    with pytest.raises(ClientKeyError) as unknown:
        keys.revoke("nope1234")
    assert "no key 'nope1234'" in str(unknown.value) and row.id in str(unknown.value)
    keys.revoke(row.id)
    with pytest.raises(ClientKeyError) as twice:
        keys.revoke(row.id)
    assert f"key {row.id!r} of 'demo' is already revoked" in str(twice.value)
    assert keys.store.keys(include_revoked=False) == []


def test_auth_lists_every_working_key_and_the_daemons_which_outlives_the_daemon(keys: Keys, tmp_path: Path) -> None:
    a, _ = keys.create("a", max_concurrent=4)
    b, _ = keys.create("b")
    gone, _ = keys.create("a")
    keys.revoke(gone.id)
    auth = keys.auth()
    by_id = {k.id: k for k in auth.keys}
    assert set(by_id) == {a.id, b.id, DAEMON_KEY_ID}
    assert by_id[a.id].deployments == ["a"] and by_id[a.id].max_concurrent == 4 and by_id[b.id].deployments == ["b"]
    daemon_key = keys.daemon_key()
    assert by_id[DAEMON_KEY_ID].deployments == ["*"] and by_id[DAEMON_KEY_ID].sha256 == key_sha256(daemon_key)
    keys.store.close()
    with StateStore(tmp_path / "state" / "state.db") as store:     # the next daemon talks to the same gateway
        assert Keys(store).daemon_key() == daemon_key


def test_a_state_dir_open_to_others_is_narrowed_to_0700_with_a_warning_in_the_log(tmp_path: Path) -> None:
    root = tmp_path / "st"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    paths = StatePaths(root)
    paths.ensure()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.log.stat().st_mode) == 0o600
    assert "was mode 755 (others could read it): narrowed to 700" in paths.log.read_text()
    paths.ensure()                                                   # once narrowed, nothing more is said
    assert paths.log.read_text().count("narrowed") == 1
    fresh = StatePaths(tmp_path / "a" / "b" / "state")               # every directory it makes is private
    fresh.ensure()
    for d in (tmp_path / "a", tmp_path / "a" / "b", fresh.root):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
