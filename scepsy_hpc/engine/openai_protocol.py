"""The OpenAI/vLLM wire format the simulated engine speaks: request parsing, token counts, bodies.

Token counts without a tokenizer: a text costs ceil(chars / 4) tokens (at least 1 for a prompt); a
chat prompt costs that for each message's content (text parts of multi-part content, and the JSON
of any tool calls) plus 4 tokens per message for the chat template's role markers, plus the JSON of
`tools` if given. A prompt given as token ids costs exactly its length. Each output token is the
text " tok" (4 characters), so counting the output text the same way gives back its token count.
Tool calls and JSON output (`scepsy_hpc.engine.sim_tools`) are counted by the same rule over their text.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 4  # role markers of a typical chat template (Llama 3: header + eot)
TOKEN_TEXT = " tok"


class ApiError(Exception):
    """An error answered in vLLM's OpenAI error format."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_

    def body(self) -> dict[str, Any]:
        """The JSON body vLLM sends for this error."""
        return error_body(self.message, self.type, self.status)


def error_body(message: str, type_: str, code: int) -> dict[str, Any]:
    """vLLM's error object: {"object": "error", "message", "type", "param", "code"}."""
    return {"object": "error", "message": message, "type": type_, "param": None, "code": code}


def text_tokens(text: str) -> int:
    """Tokens of a text: ceil(chars / 4)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # multi-part content: only text parts cost tokens here
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    raise ApiError(400, f"message content must be a string, a list of parts or null; got {type(content).__name__}")


def chat_prompt_tokens(messages: Any, tools: Any = None) -> int:
    """Prompt tokens of a chat request (see the module docstring for the rule)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects")
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'")
        chars = _content_chars(m.get("content"))
        if m.get("tool_calls"):
            chars += len(json.dumps(m["tool_calls"]))
        total += math.ceil(chars / CHARS_PER_TOKEN) + CHAT_TOKENS_PER_MESSAGE
    if tools:
        total += text_tokens(json.dumps(tools))
    return total


def _text_ids(text: str) -> list[str]:
    return [text[i:i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def chat_token_ids(messages: Any, tools: Any = None) -> list[Any]:
    """The prompt of a chat request as pseudo-tokens (hashable, equal text gives equal tokens), exactly
    `chat_prompt_tokens` of them, in the order a chat template lays them out: the tools' JSON first (the
    templates put tool definitions in the system turn), then per message its role markers and its text
    in 4-character pieces. Two prompts share a leading run of tokens exactly where their text and message
    structure agree, which is what a prefix cache reuses. Call after `chat_prompt_tokens` validated them."""
    ids: list[Any] = []
    if tools:
        ids += _text_ids(json.dumps(tools))
    for m in messages:
        ids += [("<|role|>", m.get("role"), k) for k in range(CHAT_TOKENS_PER_MESSAGE)]
        text = _content_text(m.get("content"))
        if m.get("tool_calls"):
            text += json.dumps(m["tool_calls"])
        ids += _text_ids(text)
    return ids


def completion_token_ids(prompt: Any) -> list[Any]:
    """The prompt of a completions request as (pseudo-)tokens, `completion_prompt_tokens` of them (a
    string in 4-character pieces, at least one; token ids as given). Call after validation."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _text_ids(prompt) or [""]
    return list(prompt)


def completion_prompt_tokens(prompt: Any) -> int:
    """Prompt tokens of a completions request: a string, token ids, or a list of one of those."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, f"batched prompts are not supported by the simulated engine; got {len(prompt)} prompts, send one")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return max(1, text_tokens(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    raise ApiError(400, "'prompt' must be a non-empty string, a non-empty list of token ids, or a list of one of those")


@dataclass(frozen=True)
class ParsedRequest:
    """What the engine needs from a completions or chat request."""

    chat: bool
    model: str
    prompt_tokens: int
    max_tokens: int | None  # exact output length (ignore_eos); None: the engine samples one
    stream: bool
    include_usage: bool


def parse_request(body: Any, *, chat: bool, served_name: str, max_model_len: int) -> ParsedRequest:
    """Validate a request body as vLLM's OpenAI server would; raise ApiError for the client."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", served_name)
    if model != served_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
    if chat:
        if "messages" not in body:
            raise ApiError(400, "missing field 'messages'")
        prompt = chat_prompt_tokens(body["messages"], body.get("tools"))
    else:
        if "prompt" not in body:
            raise ApiError(400, "missing field 'prompt'")
        prompt = completion_prompt_tokens(body["prompt"])
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, f"n={n!r} is not supported by the simulated engine; send n=1")
    max_tokens = body.get("max_completion_tokens") if chat else None  # the chat API's newer name wins
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ApiError(400, f"max_tokens must be an integer >= 1; got {max_tokens!r}")
    if max_tokens is not None and prompt + max_tokens > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                            f"{prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} in the completion). "
                            f"Please reduce the length of the messages or completion.")
    if prompt >= max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                            f"{prompt} tokens, which leaves no room for the completion. Please reduce the length of the messages.")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean; got {stream!r}")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object")
    return ParsedRequest(chat, model, prompt, max_tokens, stream, bool(opts.get("include_usage")))


class ResponseWriter:
    """Builds the response bodies and SSE chunks of one request, vLLM-shaped."""

    def __init__(self, req: ParsedRequest) -> None:
        self.req = req
        prefix = "chatcmpl" if req.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        self._token_chunk = self._token_chunk_for(None)  # all but the last token chunk are identical

    def usage(self, completion_tokens: int) -> dict[str, int]:
        """The usage object."""
        p = self.req.prompt_tokens
        return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model}

    def full(self, n_tokens: int, finish_reason: str, message: dict[str, Any] | None = None) -> dict[str, Any]:
        """The non-streaming response body; a chat `message` (tool calls, JSON) replaces the token text."""
        text = TOKEN_TEXT * n_tokens
        if self.req.chat:
            message = message or {"role": "assistant", "content": text, "tool_calls": []}
            choice = {"index": 0, "message": message,
                      "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                      "stop_reason": None, "prompt_logprobs": None}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage(n_tokens)}

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return sse({**self._head(obj), "choices": [choice]})

    def role_chunk(self) -> bytes:
        """The first chat chunk (assistant role, empty content), as vLLM sends it; empty for completions."""
        if not self.req.chat:
            return b""
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})

    def token_chunk(self, finish_reason: str | None) -> bytes:
        """One output token as an SSE chunk; the last one carries the finish reason."""
        return self._token_chunk if finish_reason is None else self._token_chunk_for(finish_reason)

    def _token_chunk_for(self, finish_reason: str | None) -> bytes:
        if self.req.chat:
            return self._chunk({"index": 0, "delta": {"content": TOKEN_TEXT}, "logprobs": None, "finish_reason": finish_reason})
        return self._chunk({"index": 0, "text": TOKEN_TEXT, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None})

    def delta_chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        """A chat chunk with the given delta (tool-call fragments, JSON content, or {} with the finish reason)."""
        return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})

    def usage_chunk(self, completion_tokens: int) -> bytes:
        """The final chunk of `stream_options.include_usage`: no choices, only usage."""
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return sse({**self._head(obj), "choices": [], "usage": self.usage(completion_tokens)})


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
