"""Records: the files one scepsy process writes and another reads back (serve.json, agent reports,
session records), and the one way every file is replaced on disk.

A record is a frozen pydantic model with a `schema_version`. `read_record` turns every way such a file
can be wrong — missing, too large, not JSON, another schema version, a field missing or of the wrong
type — into one `SpecError` naming the file and the field and saying how to fix it; a file written
before records carried a version reads as version 1 (the fields did not change). `write_atomic`
writes a temporary file beside the target and renames it over the target, so a reader sees the old
file or the new one, never a part of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from scepsy_hpc.errors import SpecError

MAX_RECORD_BYTES = 16 * 1024 * 1024   # far above any record we write; a larger file is not ours
PRIVATE = 0o600                       # session data: readable by its owner only

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """A file-borne value: frozen, unknown keys rejected, versioned by `SCHEMA_VERSION`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int = 1


def write_atomic(path: str | Path, data: str | bytes, *, mode: int = PRIVATE) -> None:
    """Replace `path` by `data` in one rename (never a partial file), with permissions `mode` (default: the
    owner's only, whatever the umask: the mode is set explicitly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)   # mkstemp creates 0600; the mode is set before any byte is written
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())          # on a shared file system the rename must not overtake the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: str | Path, record: Record, *, mode: int = PRIVATE) -> None:
    """Write `record` as indented JSON, atomically, readable by its owner only unless `mode` says otherwise."""
    write_atomic(path, record.model_dump_json(indent=1) + "\n", mode=mode)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(the whole file)"


def parse_record(model: type[R], data: Any, source: str, fix: str) -> R:
    """Validate parsed JSON as `model`; SpecError naming `source`, the field and `fix` when it is not one."""
    what = model.__name__
    if not isinstance(data, dict):
        raise SpecError(f"{source}: not a {what} (a JSON object was expected, found {type(data).__name__}); {fix}")
    version = data.get("schema_version", 1)
    if version != model.SCHEMA_VERSION:
        raise SpecError(f"{source}: schema_version {version!r} is not the one this scepsy reads "
                        f"({model.SCHEMA_VERSION}): the file was written by another version; {fix}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [f"{source}: {_field(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()[:5]]
        problems[-1] += f" (not a {what} this scepsy can read; {fix})"
        raise SpecError(problems) from None


def read_record(path: str | Path, model: type[R], fix: str) -> R:
    """Read a record file; SpecError naming the file (and the field) when it is missing, too large or wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECORD_BYTES:
            raise SpecError(f"{path}: {size} bytes is far too large for a {model.__name__} "
                            f"(at most {MAX_RECORD_BYTES}); {fix}")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SpecError(f"{path}: unreadable {model.__name__} ({exc}); {fix}") from None
    return parse_record(model, data, str(path), fix)
