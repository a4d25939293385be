"""Prompt prefixes as the gateway sees them: what each call shares with its request's earlier calls
(`prefix_tokens`) and with other requests' calls (`system_tokens`), per LLM.

A prompt is turned into the engine's pseudo-tokens (`engine.openai_protocol.chat_token_ids` /
`completion_token_ids`: 4 characters a token, the sim engine's rule, equal where the text agrees;
laid out as a string of 4-character cells, `chat_token_text`, which is ~7x faster than a list of
token objects: ~0.4 ms instead of ~2.9 ms for a 32k-token prompt) and cut into blocks of `block_tokens` (16, vLLM's block); each full block is named by a chained hash
(`perf.prefix.chained_hashes`), so one hash names a whole leading run. Shared counts are whole
blocks: what a prefix cache could reuse.

The rule for `prefix_tokens` (same request, same LLM key): the longest leading run the prompt shares
with any earlier call's prompt (calls that *started* earlier, so parallel fan-out calls count) or
with an earlier call's prompt followed by the assistant message it returned (a ReAct step re-sends
the previous prompt plus that answer; the answer is laid out as `{"role": "assistant", "content":
..., "tool_calls": [...]}` in the engine's tokenisation — a client that re-serialises the tool calls
differently shares up to their text). `system_tokens`: the longest leading run shared with a prompt
of *another* request (or of a call without a request id), among the first `system_blocks` blocks of
recent prompts: a common system prompt or tool definitions.

Counts are the gateway's estimate. When the engine reports `usage.prompt_tokens` (a real tokenizer),
the shared counts are scaled by usage / estimate (capped at usage): the shared *share* of the prompt
is what the text says; its token count is the engine's. With the sim engine the two agree.

Bounded memory: per (request, LLM) a set of block hashes (at most `max_request_blocks`), at most
`max_requests` requests (least recently used dropped first) and `max_total_blocks` hashes across
them; a request's state goes when its request span ends. Per LLM, at most `max_system_entries`
leading-block hashes (LRU). A prompt is hashed up to `max_prompt_blocks` blocks (longer ones count
their head only), so one 8 MiB body costs one bounded pass. About 60 bytes per stored hash: the
defaults hold at most ~30 MB of request state and ~4 MB per LLM of system state.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from scepsy_hpc.engine.openai_protocol import (CHARS_PER_TOKEN, CHAT_TOKENS_PER_MESSAGE, ApiError, chat_prompt_tokens,
                                               completion_prompt_tokens, completion_token_ids)
from scepsy_hpc.gateway.tracing import ToolBook
from scepsy_hpc.perf.prefix import chained_hashes
from scepsy_hpc.trace.records import SpanRecord

BLOCK_TOKENS = 16
MAX_PROMPT_BLOCKS = 8192          # 128k tokens hashed per prompt at most
MAX_REQUEST_BLOCKS = 32768        # per (request, LLM): a few long prompts' worth
MAX_REQUESTS = 4096
MAX_TOTAL_BLOCKS = 500_000
SYSTEM_BLOCKS = 256               # the first 4096 tokens of a prompt may be a shared system prompt
MAX_SYSTEM_ENTRIES = 65_536       # per LLM
MAX_ANSWER_CHARS = 1 << 20        # an answer kept for the next prompt's comparison, at most (1 MiB of text)

_MANY = object()   # a system block seen from two or more requests


def _text(content: Any) -> str:
    if isinstance(content, list):   # multi-part content: its text parts, as the engine counts them
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _padded(text: str) -> str:
    """Text as whole 4-character tokens (the last one padded with NULs, as `_text_ids` cuts it)."""
    r = len(text) % CHARS_PER_TOKEN
    return text + "\0" * (CHARS_PER_TOKEN - r) if r else text


def chat_token_text(messages: list[Any], tools: Any = None) -> str:
    """`chat_token_ids(messages, tools)` laid out as a string of exactly 4 characters per token (role
    markers as 16 characters per message): equal tokens give equal 4-character cells, so comparing
    blocks of this string compares blocks of tokens, at C speed instead of one Python object a token."""
    parts = [_padded(json.dumps(tools))] if tools else []
    for m in messages:
        role = m.get("role")
        parts.append(f"\x01{role if isinstance(role, str) else '?':\x01<15.15}")   # CHAT_TOKENS_PER_MESSAGE = 4 cells
        text = _text(m.get("content"))
        if m.get("tool_calls"):
            text += json.dumps(m["tool_calls"])
        parts.append(_padded(text))
    return "".join(parts)


def chain_text(text: str, block_tokens: int, seed: Hashable = None) -> list[int]:
    """Chained hashes of the full blocks of a token string (4 characters a token), as
    `perf.prefix.chained_hashes` names blocks of a token list."""
    width = block_tokens * CHARS_PER_TOKEN
    out: list[int] = []
    parent: Hashable = seed
    for i in range(0, len(text) - width + 1, width):
        parent = hash((parent, text[i:i + width]))
        out.append(parent)
    return out


@dataclass(frozen=True)
class Prompt:
    """A call's prompt, hashed: its estimated token count, chained block hashes and the tokens after the
    last full block (the answer continues the chain from there; None for a prompt of token ids)."""

    est_tokens: int
    chain: list[int]
    tail: str | None
    chat: bool

    @classmethod
    def of(cls, body: dict[str, Any], *, chat: bool, block_tokens: int = BLOCK_TOKENS,
           max_blocks: int = MAX_PROMPT_BLOCKS) -> "Prompt | None":
        """The prompt of a call body, or None when the engine would refuse it (the engine says why)."""
        limit = max_blocks * block_tokens
        try:
            if chat:
                messages, tools = body.get("messages"), body.get("tools")
                est = chat_prompt_tokens(messages, tools)
                if est > limit:   # lay out whole messages up to the limit, not the whole body
                    n, k = chat_prompt_tokens(messages[:1], tools), 1
                    while k < len(messages) and n < limit:
                        n += chat_prompt_tokens(messages[k:k + 1])
                        k += 1
                    messages = messages[:k]
                text = chat_token_text(messages, tools)
            else:
                prompt = body.get("prompt")
                est = completion_prompt_tokens(prompt)
                ids = completion_token_ids(prompt)
                if not all(isinstance(t, str) for t in ids):   # token ids: hashed as a list, no answer continuation
                    chain = chained_hashes(ids[:limit], block_tokens)
                    return cls(est, chain, None, chat)
                text = "".join(_padded(t) if t else "\0" * CHARS_PER_TOKEN for t in ids)
        except (ApiError, TypeError, ValueError, AttributeError):
            return None
        text = text[:limit * CHARS_PER_TOKEN]
        chain = chain_text(text, block_tokens)
        return cls(est, chain, text[len(chain) * block_tokens * CHARS_PER_TOKEN:], chat)


@dataclass
class Answer:
    """The assistant message a call returned (content and tool calls), from the JSON body or the stream's
    deltas; bounded to `MAX_ANSWER_CHARS` of text."""

    content: list[str] = field(default_factory=list)
    chars: int = 0
    calls: dict[int, dict[str, str]] = field(default_factory=dict)   # tool-call index -> id, name, arguments
    text_completion: bool = False

    def reset(self) -> None:
        """Forget what was collected (the call is retried on another replica)."""
        self.content, self.chars, self.calls, self.text_completion = [], 0, {}, False

    def _add(self, text: Any) -> None:
        if isinstance(text, str) and text and self.chars < MAX_ANSWER_CHARS:
            self.content.append(text[:MAX_ANSWER_CHARS - self.chars])
            self.chars += len(self.content[-1])

    def _add_call(self, i: int, tc: Any) -> None:
        if not isinstance(tc, dict) or (i not in self.calls and len(self.calls) >= 256):
            return
        slot = self.calls.setdefault(i, {"id": "", "name": "", "arguments": ""})
        if isinstance(tc.get("id"), str):
            slot["id"] = tc["id"]
        fn = tc.get("function")
        if isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                slot["name"] += fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str) and self.chars < MAX_ANSWER_CHARS:
                slot["arguments"] += args
                self.chars += len(args)

    def take_body(self, obj: Any) -> None:
        """A whole (non-streamed) answer's JSON."""
        self._take_choice(_first_choice(obj), "message")

    def feed_sse(self, events: bytes) -> None:
        """Whole SSE events as the gateway forwards them (chunks of deltas)."""
        for line in events.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                self._take_choice(_first_choice(json.loads(payload)), "delta")
            except ValueError:
                continue

    def _take_choice(self, choice: Any, part: str) -> None:
        """A choice's text (completions) or its `message`/`delta` content and tool calls (a delta's tool
        calls name their slot by `index`)."""
        if choice is None:
            return
        if "text" in choice:
            self.text_completion = True
            self._add(choice.get("text"))
        got = choice.get(part)
        if not isinstance(got, dict):
            return
        self._add(got.get("content"))
        tcs = got.get("tool_calls")
        if isinstance(tcs, list):
            for k, tc in enumerate(tcs):
                idx = tc.get("index", k) if part == "delta" and isinstance(tc, dict) else k
                self._add_call(idx if isinstance(idx, int) else k, tc)

    def tool_calls(self) -> list[tuple[str, str]]:
        """(id, function name) of each tool call with an id, in order."""
        return [(c["id"], c["name"]) for _, c in sorted(self.calls.items()) if c["id"]]

    def token_text(self) -> str:
        """The answer as it will appear in the next prompt, as a token string (`chat_token_text`)."""
        text = "".join(self.content)
        if self.text_completion:
            return _padded(text)
        msg: dict[str, Any] = {"role": "assistant", "content": text or None}
        if self.calls:
            msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for _, c in sorted(self.calls.items())]
        return chat_token_text([msg])


def _first_choice(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return choices[0]


def scaled(shared_est: int | None, est_tokens: int, prompt_tokens: int | None) -> int | None:
    """A shared count in the engine's tokens: scaled by usage / estimate when the engine reported usage."""
    if shared_est is None or prompt_tokens is None or est_tokens <= 0 or prompt_tokens == est_tokens:
        return shared_est
    return min(prompt_tokens, round(shared_est * prompt_tokens / est_tokens))


class PrefixBook:
    """Per LLM: the block hashes of each live request's prompts (and prompt + answer), and the leading
    blocks of recent prompts of all requests. Bounded as the module docstring says."""

    def __init__(self, *, block_tokens: int = BLOCK_TOKENS, max_requests: int = MAX_REQUESTS,
                 max_request_blocks: int = MAX_REQUEST_BLOCKS, max_total_blocks: int = MAX_TOTAL_BLOCKS,
                 system_blocks: int = SYSTEM_BLOCKS, max_system_entries: int = MAX_SYSTEM_ENTRIES) -> None:
        self.block_tokens = block_tokens
        self.max_requests = max_requests
        self.max_request_blocks = max_request_blocks
        self.max_total_blocks = max_total_blocks
        self.system_blocks = system_blocks
        self.max_system_entries = max_system_entries
        self._requests: OrderedDict[str, dict[str, set[int]]] = OrderedDict()
        self._system: dict[str, OrderedDict[int, object]] = {}
        self.total_blocks = 0
        self.dropped_requests = 0

    def prompt(self, body: dict[str, Any], *, chat: bool) -> Prompt | None:
        """Hash a call body's prompt with this book's block size."""
        return Prompt.of(body, chat=chat, block_tokens=self.block_tokens)

    # -- one call ------------------------------------------------------------------------------

    def observe(self, request: str | None, owner: str, llm: str, p: Prompt) -> tuple[int | None, int]:
        """(prefix_tokens, system_tokens) of a call starting now, in estimated tokens; then remember its
        prompt. `owner` names the call's request for the system comparison (its call id without one);
        prefix_tokens is None for a call without a request id."""
        prefix = None
        if request is not None:
            seen = self._requests.get(request, {}).get(llm)
            prefix = self._longest(p.chain, seen) * self.block_tokens if seen else 0
        system = self._system_match(llm, owner, p.chain) * self.block_tokens
        self._remember_system(llm, owner, p.chain)
        if request is not None:
            self._remember(request, llm, p.chain)
        return prefix, system

    def answered(self, request: str | None, llm: str, p: Prompt, answer: Answer) -> None:
        """Remember the prompt followed by the answer a call returned (what its next turn re-sends)."""
        if request is None or request not in self._requests or p.tail is None:
            return   # ended (or dropped) while the call ran; or a prompt of token ids
        room = MAX_PROMPT_BLOCKS - len(p.chain)
        if room <= 0:
            return
        text = (p.tail + answer.token_text())[:room * self.block_tokens * CHARS_PER_TOKEN]
        self._remember(request, llm, chain_text(text, self.block_tokens, seed=p.chain[-1] if p.chain else None))

    def end_request(self, request: str) -> None:
        """The request ended: drop what it holds."""
        per = self._requests.pop(request, None)
        if per:
            self.total_blocks -= sum(len(s) for s in per.values())

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _longest(chain: list[int], seen: set[int]) -> int:
        """Leading blocks of `chain` in `seen`. A request's set is prefix-closed (a block's hash is stored
        with all its predecessors'), so a binary search finds the end of the run."""
        lo, hi = 0, len(chain)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if chain[mid - 1] in seen:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _remember(self, request: str, llm: str, chain: list[int]) -> None:
        per = self._requests.get(request)
        if per is None:
            per = self._requests[request] = {}
        else:
            self._requests.move_to_end(request)
        s = per.setdefault(llm, set())
        before = len(s)
        if before + len(chain) <= self.max_request_blocks:
            s.update(chain)
        else:   # full: keep what is there, add what fits (a prefix of the chain: the set stays prefix-closed)
            s.update(chain[:max(0, self.max_request_blocks - before)])
        self.total_blocks += len(s) - before
        while self._requests and (len(self._requests) > self.max_requests or self.total_blocks > self.max_total_blocks):
            _, old = self._requests.popitem(last=False)
            self.total_blocks -= sum(len(x) for x in old.values())
            self.dropped_requests += 1

    def _system_match(self, llm: str, owner: str, chain: list[int]) -> int:
        table = self._system.get(llm)
        if not table:
            return 0
        n = 0
        for h in chain[:self.system_blocks]:
            o = table.get(h)
            if o is None or o == owner:
                break
            n += 1
        return n

    def _remember_system(self, llm: str, owner: str, chain: list[int]) -> None:
        table = self._system.get(llm)
        if table is None:
            table = self._system[llm] = OrderedDict()
        for h in chain[:self.system_blocks]:
            o = table.get(h)
            if o is None:
                table[h] = owner
            else:
                if o is not _MANY and o != owner:
                    table[h] = _MANY
                table.move_to_end(h)
        while len(table) > self.max_system_entries:
            table.popitem(last=False)

    def system_entries(self, llm: str) -> int:
        """Leading-block hashes held for `llm` (for tests of the bound)."""
        return len(self._system.get(llm, ()))


@dataclass
class Tracked:
    """What the tracker knows of one call in flight."""

    prompt: Prompt | None
    prefix_est: int | None = None
    system_est: int | None = None
    answer: Answer = field(default_factory=Answer)


class CallTracker:
    """The gateway's view of agent traffic: prefix accounting (PrefixBook) and inferred tool spans
    (ToolBook) per call, and the request-span events that end a request's state."""

    def __init__(self, prefixes: PrefixBook, tools: ToolBook, emit: Callable[[SpanRecord], None]) -> None:
        self.prefixes = prefixes
        self.tools = tools
        self.emit = emit

    def start(self, request: str | None, call_id: str, llm: str, prompt: Prompt | None, messages: Any,
              t_start: float) -> Tracked:
        """A call starts: its shared counts (estimated), and the tool spans its tool results close."""
        tr = Tracked(prompt)
        if prompt is not None:
            tr.prefix_est, tr.system_est = self.prefixes.observe(request, request or call_id, llm, prompt)
        if request is not None and messages is not None:
            for rec in self.tools.answered(request, messages, t_start):
                self.emit(rec)
        return tr

    def finish(self, request: str | None, llm: str, tr: Tracked, ok: bool, usage: dict[str, Any] | None,
               t_end: float) -> tuple[int | None, int | None]:
        """A call ended: remember its answer; its (prefix_tokens, system_tokens) for the record."""
        if ok and request is not None:
            if tr.prompt is not None:
                self.prefixes.answered(request, llm, tr.prompt, tr.answer)
            self.tools.asked(request, tr.answer.tool_calls(), t_end)
        if tr.prompt is None:
            return None, None
        used = usage.get("prompt_tokens") if usage else None
        used = used if isinstance(used, int) and not isinstance(used, bool) else None
        return (scaled(tr.prefix_est, tr.prompt.est_tokens, used), scaled(tr.system_est, tr.prompt.est_tokens, used))

    def span_event(self, body: Any) -> None:
        """An explicit span event was accepted: a tool span turns inference off for its request; the end of a
        request span drops the request's state."""
        if not isinstance(body, dict) or not isinstance(body.get("request"), str):
            return
        rid = body["request"]
        if body.get("span") == "tool":
            self.tools.explicit(rid)
        elif body.get("span") == "request" and body.get("event") == "end":
            self.prefixes.end_request(rid)
            self.tools.end_request(rid)


__all__ = ["Answer", "BLOCK_TOKENS", "CHAT_TOKENS_PER_MESSAGE", "chat_token_text", "chain_text", "CallTracker", "Prompt", "PrefixBook", "Tracked",
           "scaled"]
