"""Server-sent events passing through the gateway: split into events, inspected, forwarded or dropped.

OpenAI-style streams are `data: {json}` events separated by blank lines and closed by
`data: [DONE]`. The gateway reads each event once to learn when content first arrived (t_first)
and the token counts (the `usage` chunk, which it may have asked for on the client's behalf).
"""

from __future__ import annotations

import json
from typing import Any, Callable


# Byte patterns of chunks that must be parsed after the first token: a usage object (either JSON
# spacing) or an error. `"usage":null` on every chunk (vLLM with include_usage) matches neither.
_MARKERS = (b'"usage":{', b'"usage": {', b'"error"')


def has_content(choices: Any) -> bool:
    """Whether a chunk's choices carry generated output (text, content, reasoning or tool calls)."""
    if not isinstance(choices, list):
        return False
    for c in choices:
        if not isinstance(c, dict):
            continue
        if c.get("text"):
            return True
        d = c.get("delta")
        if isinstance(d, dict) and (d.get("content") or d.get("tool_calls") or d.get("reasoning_content") or d.get("reasoning")):
            return True
    return False


def error_message(err: Any) -> str:
    """The message of an OpenAI-style `error` value (a dict with `message`, or a string)."""
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return err if isinstance(err, str) else json.dumps(err)


class SSEFilter:
    """Incremental SSE reader: `feed(bytes)` returns the bytes to forward (whole events only).

    `drop_usage` removes the usage-only chunk (empty `choices`), used when the gateway injected
    `stream_options.include_usage` and the client did not ask for it.
    """

    def __init__(self, clock: Callable[[], float], *, drop_usage: bool) -> None:
        self.clock = clock
        self.drop_usage = drop_usage
        self.t_first: float | None = None
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.done = False
        self.chunks = 0
        self._buf = b""
        self._lines: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        """Take bytes from upstream; return the complete events to pass on."""
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        start = 0
        while True:
            i = buf.find(b"\n", start)
            if i < 0:
                break
            line = buf[start:i]
            start = i + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                self._lines.append(line)
            elif self._lines:
                ev = self._event(self._lines)
                self._lines = []
                if ev is not None:
                    out.append(ev)
        self._buf = buf[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        """Whatever is left after upstream ended (an event without its closing blank line)."""
        lines = self._lines + ([self._buf] if self._buf else [])
        self._lines, self._buf = [], b""
        if not lines:
            return b""
        ev = self._event(lines)
        return ev or b""

    def _event(self, lines: list[bytes]) -> bytes | None:
        raw = b"\n".join(lines) + b"\n\n"
        data = [ln[6:] if ln.startswith(b"data: ") else ln[5:] for ln in lines if ln.startswith(b"data:")]
        if not data:
            return raw  # comments, event:/id: lines: not ours to judge
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if payload.strip() == b"[DONE]":
            self.done = True
            return raw
        self.chunks += 1
        if self.t_first is not None and not any(m in payload for m in _MARKERS):
            return raw  # after the first token, only usage and error chunks matter: skip parsing the rest
        try:
            obj = json.loads(payload)
        except ValueError:
            return raw
        if not isinstance(obj, dict):
            return raw
        if obj.get("error") is not None:
            self.error = error_message(obj["error"])
            return raw
        choices = obj.get("choices")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if self.t_first is None and choices and has_content(choices):
            self.t_first = self.clock()
        if self.drop_usage and usage and not choices:
            return None
        return raw
