"""The CLI's side of the control API: HTTP/JSON over the daemon's unix socket, standard library only.

Before it connects, the client checks that the socket is this user's own (a socket another user
planted in a shared directory is refused, never spoken to). An error the daemon returns comes back
as the same `ScepsyError` subclass with the same exit code, so `scepsy up` fails the same way whether
the problem was found here or in the daemon.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Any

from scepsy_hpc import errors
from scepsy_hpc.errors import ScepsyError
from scepsy_hpc.service.paths import StateDirError, StatePaths

MAX_ANSWER_BYTES = 64 * 1024 * 1024


class DaemonNotRunning(ScepsyError):
    """No daemon answers on the state dir's socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self._path))
        except OSError:
            s.close()
            raise
        self.sock = s


def _error_from(doc: dict[str, Any]) -> ScepsyError:
    """The ScepsyError an API error document describes (its class by name, else the root)."""
    err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    cls = getattr(errors, str(err.get("type", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, ScepsyError)):
        cls = ScepsyError
    exc = cls(str(err.get("message", "the daemon gave an error without a message")))
    code = err.get("exit_code")
    if isinstance(code, int) and code != exc.exit_code:
        exc.exit_code = code   # a subclass defined outside errors (e.g. the state store's) keeps its code
    return exc


class DaemonClient:
    """Calls on the daemon of one state dir."""

    def __init__(self, paths: StatePaths, timeout_s: float = 30.0) -> None:
        self.paths = paths
        self.timeout_s = timeout_s

    def _check_socket(self) -> Path:
        sock = self.paths.socket
        try:
            st = sock.lstat()
        except FileNotFoundError:
            raise DaemonNotRunning(f"no scepsy daemon runs for {self.paths.root} (no socket {sock}); start one with "
                                   f"`scepsy daemon start`") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise StateDirError(f"{sock} is not a socket; refusing to use it: move it aside and run `scepsy daemon start`")
        if st.st_uid != os.getuid():
            raise StateDirError(f"socket {sock} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); refusing to "
                                f"talk to it: set --state-dir (or $SCEPSY_STATE_DIR) to a directory of your own")
        return sock

    def request(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None,
                query: dict[str, Any] | None = None) -> Any:
        """One API call; the decoded JSON answer, or the daemon's error raised as a ScepsyError."""
        sock = self._check_socket()
        if query:
            path += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        conn = _UnixConnection(sock, timeout_s or self.timeout_s)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read(MAX_ANSWER_BYTES + 1)
        except (ConnectionRefusedError, FileNotFoundError):
            raise DaemonNotRunning(f"no scepsy daemon answers on {sock} (a stale socket: the daemon is gone); start it with "
                                   f"`scepsy daemon start`") from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            raise DaemonNotRunning(f"the scepsy daemon on {sock} went away during {method} {path}; see {self.paths.log}, "
                                   f"and start it again with `scepsy daemon start`") from None
        except (socket.timeout, TimeoutError):
            raise ScepsyError(f"the scepsy daemon on {sock} did not answer {method} {path} within "
                              f"{timeout_s or self.timeout_s:g} s; see {self.paths.log}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ScepsyError(f"talking to the scepsy daemon on {sock} failed ({exc}); see {self.paths.log}") from None
        finally:
            conn.close()
        if len(raw) > MAX_ANSWER_BYTES:
            raise ScepsyError(f"the daemon's answer to {method} {path} is larger than {MAX_ANSWER_BYTES} bytes")
        try:
            doc = json.loads(raw or b"null")
        except ValueError:
            raise ScepsyError(f"the daemon answered {method} {path} with HTTP {resp.status} and no JSON: "
                              f"{raw[:200]!r}; see {self.paths.log}") from None
        if resp.status >= 400:
            raise _error_from(doc if isinstance(doc, dict) else {})
        return doc

    def alive(self) -> bool:
        """Whether a daemon answers."""
        try:
            self.request("GET", "/v1/daemon", timeout_s=5.0)
        except DaemonNotRunning:
            return False
        return True

    def wait_alive(self, timeout_s: float, proc_alive: Any = None) -> bool:
        """Until a daemon answers (False after `timeout_s`, or as soon as `proc_alive()` says the process died)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.alive():
                    return True
            except StateDirError:
                raise
            except ScepsyError:
                pass
            if proc_alive is not None and not proc_alive():
                return False
            time.sleep(0.05)
        return False
