"""`scepsy --remote HOST COMMAND …`: the command run by scepsy on the login node, over SSH, as if local.

- **Which scepsy**: `--remote-scepsy CMD`, else the host's `scepsy:` in the client config file
  (`$SCEPSY_REMOTE_CONFIG`, else `~/.config/scepsy/remote.yaml`; `hosts: {ALIAS: {scepsy: CMD}}`,
  `"*"` for every host), else `scepsy` on the remote PATH. CMD is shell words, e.g.
  `~/venvs/scepsy/bin/scepsy` or `env SCEPSY_STATE_DIR=/scratch/me/scepsy scepsy`.
- **Files** named on the command line (an argument, or an `--option=VALUE` value, that is a local
  regular file and looks like a path: a `/` or a suffix) are copied first by SFTP to
  `~/.scepsy/uploads/SHA256/NAME` on the remote (0700 directories, 0600 files; the name kept, so
  a workflow's or plan's file name still names the deployment), and the argument is rewritten to
  that path. Shipped names (`rag_rerank`) and remote paths pass unchanged.
- **Output and exit status** are the remote command's: stdout and stderr streamed as they come
  (`--json` stays one document), its exit status returned. SSH failures are `RemoteError`s (exit
  255); a remote without scepsy is named, with the fix.
- **Ctrl-C** reaches the remote command as SIGINT (a `up` that follows its deployment stops it, as
  locally): the command runs under a small sh wrapper that sends SIGINT when the session's stdin
  closes, which is what the first Ctrl-C does here; its output is still shown until it exits. A
  second Ctrl-C drops the connection.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shlex
import sys
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from scepsy_hpc.remote.ssh import Connection, RemoteError, connect

CLIENT_CONFIG_ENV = "SCEPSY_REMOTE_CONFIG"
UPLOADS = ".scepsy/uploads"           # under the remote home
MAX_UPLOAD_BYTES = 256 << 20          # a workflow, plan or trace; anything larger is refused, not half-copied
MAX_CONFIG_BYTES = 1 << 20
NOT_FOUND = 127                       # the shell's "command not found"

# sh: watch our stdin (the SSH channel) in the background and SIGINT the command when it closes; the
# command replaces the shell (exec), so its pid is $$ and its exit status the session's. (A background
# list's stdin is /dev/null and its SIGINT ignored, hence the watcher reads fd 3 and only sends.)
WRAPPER = ('exec 3<&0 </dev/null; { cat <&3 >/dev/null 2>&1; kill -INT $$ 2>/dev/null; } >/dev/null 2>&1 & '
           'exec 3<&- "$@"')


def client_config_path() -> Path:
    env = os.environ.get(CLIENT_CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "scepsy" / "remote.yaml"


def client_config(path: Path | None = None) -> dict[str, dict[str, str]]:
    """`hosts:` of the client config file (absent: empty), validated: ALIAS → {scepsy: CMD}."""
    import yaml

    from scepsy_hpc.errors import SpecError

    p = path or client_config_path()
    if not p.is_file():
        if os.environ.get(CLIENT_CONFIG_ENV):
            raise SpecError(f"{p}: no such file (from {CLIENT_CONFIG_ENV})")
        return {}
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise SpecError(f"{p}: larger than {MAX_CONFIG_BYTES >> 10} KiB; this is not a scepsy client config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or set(data) - {"hosts"}:
        raise SpecError(f"{p}: expected `hosts: {{ALIAS: {{scepsy: CMD}}}}` at the top level")
    hosts = data.get("hosts") or {}
    if not isinstance(hosts, dict):
        raise SpecError(f"{p}: hosts: expected a mapping of host aliases")
    out: dict[str, dict[str, str]] = {}
    for alias, v in hosts.items():
        if not isinstance(v, dict) or set(v) - {"scepsy"} or not isinstance(v.get("scepsy", ""), str):
            raise SpecError(f"{p}: hosts.{alias}: expected {{scepsy: CMD}} (CMD: how to run scepsy there, e.g. "
                            f"~/venv/bin/scepsy)")
        out[str(alias)] = dict(v)
    return out


def remote_scepsy(host: str, explicit: str | None = None, config: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The shell words that run scepsy on `host` (see the module docstring)."""
    if explicit:
        return explicit
    cfg = client_config() if config is None else config
    alias = host.rsplit("@", 1)[-1]
    for key in (host, alias, "*"):
        if key in cfg and cfg[key].get("scepsy"):
            return cfg[key]["scepsy"]
    return "scepsy"


def _looks_like_file(value: str) -> bool:
    p = Path(value)
    return ("/" in value or bool(p.suffix)) and p.is_file()


def local_files(argv: Sequence[str]) -> list[tuple[int, str, str]]:
    """(index, prefix, path) of the arguments that name local files (`--opt=PATH`: prefix `--opt=`)."""
    out = []
    for i, a in enumerate(argv):
        prefix, value = "", a
        if a.startswith("--") and "=" in a:
            prefix, value = a.split("=", 1)
            prefix += "="
        if value and _looks_like_file(value):
            out.append((i, prefix, value))
    return out


def upload(conn: Connection, path: str) -> str:
    """Copy a local file to `~/.scepsy/uploads/SHA256/NAME` on the remote (once per content); its remote path."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise RemoteError(f"{path}: {size >> 20} MiB is more than --remote copies ({MAX_UPLOAD_BYTES >> 20} MiB); "
                          f"copy it to the login node yourself and name the remote path")
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:32]
    sftp = conn.sftp()
    try:
        home = sftp.normalize(".")
        where = home
        for part in [*UPLOADS.split("/"), digest]:
            where = posixpath.join(where, part)
            try:
                sftp.mkdir(where, mode=0o700)
            except OSError:
                st = _stat(sftp, where)
                if st is None or not _is_dir(st):
                    raise RemoteError(f"{conn.target.alias}: cannot make the upload directory {where}") from None
        dest = posixpath.join(where, p.name)
        st = _stat(sftp, dest)
        if st is None or st.st_size != size:
            tmp = dest + ".part"
            with sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            sftp.chmod(tmp, 0o600)
            sftp.posix_rename(tmp, dest)
        return dest
    except OSError as e:
        raise RemoteError(f"{conn.target.alias}: copying {path} failed: {e}") from None
    finally:
        sftp.close()


def _stat(sftp: Any, path: str) -> Any:
    try:
        return sftp.stat(path)
    except OSError:
        return None


def _is_dir(st: Any) -> bool:
    import stat

    return stat.S_ISDIR(st.st_mode or 0)


def command_line(scepsy: str, argv: Sequence[str], host: str = "") -> str:
    """The remote command: `argv` run by `scepsy` under the SIGINT wrapper, with $SCEPSY_REMOTE_CLIENT
    naming `host` (its hints then say how to reach a deployment from the workstation)."""
    env = f"env SCEPSY_REMOTE_CLIENT={shlex.quote(host)} " if host else ""
    return f"{env}sh -c {shlex.quote(WRAPPER)} scepsy-remote {scepsy} {shlex.join(argv)}"


def run_remote(host: str, argv: Sequence[str], *, scepsy: str | None = None, ssh_config: str | None = None,
               out: IO[bytes] | None = None, err: IO[bytes] | None = None) -> int:
    """Run `scepsy ARGV` on `host` (files uploaded, output streamed); its exit status."""
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    cmd = remote_scepsy(host, scepsy)
    with connect(host, config_file=ssh_config) as conn:
        args = list(argv)
        for i, prefix, path in local_files(args):
            args[i] = prefix + upload(conn, path)
        status = conn.exec(command_line(cmd, args, host), out=out, err=err, interruptible=True)
    if status == NOT_FOUND:
        raise RemoteError(f"{host}: `{cmd}` was not found there (exit 127): install scepsy on the login node, then "
                          f"name it with --remote-scepsy PATH or `hosts: {{{host}: {{scepsy: PATH}}}}` in "
                          f"{client_config_path()}")
    return status
