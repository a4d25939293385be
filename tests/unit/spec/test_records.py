"""Records and the atomic writer: a file is replaced whole or not at all, and a file that is not a
record this scepsy reads is a SpecError naming the file and the field."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec import records
from scepsy_hpc.spec.records import Record, read_record, write_atomic, write_record

FIX = "re-run the thing"


class Sample(Record):
    """A record for these tests."""

    name: str
    count: int = 0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_record_round_trips_with_its_schema_version_and_owner_only_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "sample.json"
    write_record(path, Sample(name="a", count=3))
    assert json.loads(path.read_text())["schema_version"] == 1
    assert read_record(path, Sample, FIX) == Sample(name="a", count=3)
    assert _mode(path) == 0o600


def test_a_file_without_schema_version_reads_as_version_1(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"name": "old"}))
    assert read_record(path, Sample, FIX).name == "old"


def test_another_schema_version_is_refused_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "new.json"
    path.write_text(json.dumps({"schema_version": 7, "name": "x"}))
    with pytest.raises(SpecError) as err:
        read_record(path, Sample, FIX)
    msg = str(err.value)
    assert str(path) in msg and "schema_version 7" in msg and "(1)" in msg and FIX in msg


def test_a_foreign_file_names_the_field_that_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps({"name": "x", "count": "many", "colour": "red"}))
    with pytest.raises(SpecError) as err:
        read_record(path, Sample, FIX)
    msg = str(err.value)
    assert f"{path}: count:" in msg and f"{path}: colour:" in msg and FIX in msg


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b"{\"name\": ", b"[1, 2]", b"[" * 100_000])
def test_garbage_is_a_spec_error_naming_the_file_not_a_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.json"
    path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        read_record(path, Sample, FIX)
    assert str(path) in str(err.value) and FIX in str(err.value)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"name": "x" * 2000}))
    with pytest.raises(SpecError) as err:
        read_record(path, Sample, FIX)
    assert str(path) in str(err.value) and "too large" in str(err.value)


def test_a_missing_file_is_left_to_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "none.json", Sample, FIX)


def test_write_atomic_replaces_the_file_and_sets_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_atomic(path, "new", mode=0o600)
    assert path.read_text() == "new" and _mode(path) == 0o600
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        write_atomic(path, b"bytes")   # private by default, even under umask 000 and over a 0644 file
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"bytes" and _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_atomic(path, "new contents")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
