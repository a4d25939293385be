"""The synthetic driver: a workflow's `program` sampled per request and executed with real HTTP calls.

Each sampled Call becomes a streamed `/v1/completions` request whose prompt is exactly
`prompt_tokens` token ids and whose output is exactly `output_tokens` tokens (`ignore_eos`);
each Tool is a sleep bracketed by tool span events; a parallel group runs its lanes concurrently.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from scepsy_hpc.drive.core import (
    REQUEST_HEADER, ROLE_HEADER, DriveResult, RequestResult, SpanReporter, make_session, normalize_base,
    request_id, run_arrivals,
)
from scepsy_hpc.workload.sampler import Call, RequestSampler, Tool
from scepsy_hpc.spec.workflow import Workflow

ID_STYLES = ("header", "path")
# Prompt token ids are drawn from [_TOKEN_LO, _TOKEN_LO + _TOKEN_SPAN): clear of the special tokens
# at the start of every vocabulary and inside the smallest vocabulary we ship (32k, Mistral).
_TOKEN_LO, _TOKEN_SPAN = 1000, 30000


class CallFailed(Exception):
    """An LLM call of a synthetic request failed; the message says which and why."""


def prompt_ids(n_tokens: int, offset: int) -> list[int]:
    """`n_tokens` token ids starting at a per-call offset, so that calls share no prefix."""
    return [_TOKEN_LO + (offset + k) % _TOKEN_SPAN for k in range(n_tokens)]


class _Request:
    """Executes one sampled request against the server; collects its errors and call count."""

    def __init__(self, session: Any, base: str, rid: str, id_style: str, spans: SpanReporter,
                 time_scale: float, rng: random.Random, model_prefix: str = "") -> None:
        self.session, self.spans, self.rid, self.time_scale, self.rng = session, spans, rid, time_scale, rng
        self.model_prefix = model_prefix
        self.url = f"{base}/r/{rid}/v1/completions" if id_style == "path" else f"{base}/v1/completions"
        self.headers = {REQUEST_HEADER: rid} if id_style == "header" else {}
        self.n_calls = 0
        self.n_tools = 0
        self.errors: list[str] = []

    async def run_seq(self, seq: list[Any]) -> None:
        """Run a sequence; the first failure stops it (sibling lanes still finish)."""
        for item in seq:
            if isinstance(item, Call):
                await self.call(item)
            elif isinstance(item, Tool):
                await self.tool(item)
            else:
                outcomes = await asyncio.gather(*(self.run_seq(lane) for lane in item), return_exceptions=True)
                for out in outcomes:
                    if isinstance(out, BaseException):
                        raise out

    async def call(self, c: Call) -> None:
        """One streamed completion, read to the end of the stream."""
        self.n_calls += 1
        body = {"model": self.model_prefix + c.llm, "prompt": prompt_ids(c.prompt_tokens, self.rng.randrange(_TOKEN_SPAN)),
                "max_tokens": c.output_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        headers = dict(self.headers)
        if c.role is not None:
            headers[ROLE_HEADER] = c.role
        what = f"call {self.n_calls} to {c.llm}" + (f" ({c.role})" if c.role else "")
        try:
            async with self.session.post(self.url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    raise CallFailed(f"{what}: HTTP {resp.status}: {text}")
                await _read_sse(resp, what)
        except CallFailed as exc:
            self.errors.append(str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - transport errors become the request's error
            msg = f"{what}: {type(exc).__name__}: {exc}"
            self.errors.append(msg)
            raise CallFailed(msg) from exc

    async def tool(self, t: Tool) -> None:
        """A tool wait, scaled to wall time, bracketed by span events."""
        self.n_tools += 1
        ident = str(self.n_tools)  # tools of one name run concurrently in a fan-out: pair them exactly
        await self.spans.event("tool", "start", self.rid, name=t.name, ident=ident, errors=self.errors)
        await asyncio.sleep(t.latency_s * self.time_scale)
        await self.spans.event("tool", "end", self.rid, name=t.name, ident=ident, errors=self.errors)


async def _read_sse(resp: Any, what: str) -> None:
    """Consume a server-sent-event stream to its end; no `[DONE]` or an `error` object in it is a failure."""
    done = False
    # Read to EOF, not just to [DONE]: closing early races the server's final write (the chunked
    # terminator), which a gateway may record as a client disconnect.
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if done or not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        if '"error"' in data:  # cheap pre-check: only chunks that may carry an error are parsed
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                continue
            # vLLM sends {"error": {...}} mid-stream; an error body itself is {"object": "error", ...}.
            if isinstance(obj, dict) and (obj.get("error") or obj.get("object") == "error"):
                raise CallFailed(f"{what}: error in stream: {data[:300]}")
    if not done:
        raise CallFailed(f"{what}: stream ended without [DONE]")


async def drive_program(wf: Workflow, base_url: str, *, n_requests: int, rate_rps: float | None = None,
                        concurrency: int | None = None, seed: int = 0, time_scale: float = 1.0,
                        id_style: str = "header", request_prefix: str = "r", model_prefix: str = "",
                        api_key: str | None = None) -> DriveResult:
    """Sample `n_requests` requests of `wf.program` and execute them against a gateway (or bare engine).

    Each call names its LLM as `model_prefix + llm` (a gateway serving several deployments knows
    deployment `d`'s LLM `x` as `d/x`).
    Open loop (Poisson, `rate_rps` in model time) when `rate_rps` is given, else closed loop with
    `concurrency` requests in flight (default 1). `base_url` is the server root (a trailing /v1 is accepted).
    `api_key`: the gateway's client key, sent with every call.
    """
    if id_style not in ID_STYLES:
        raise ValueError(f"id_style must be one of {', '.join(ID_STYLES)}, got {id_style!r}")
    base = normalize_base(base_url)
    sampler = RequestSampler(wf)

    async with make_session(api_key=api_key) as session:
        spans = SpanReporter(session, base)

        async def run_one(i: int) -> RequestResult:
            rid = request_id(request_prefix, i)
            rng = random.Random(f"{seed}/request/{i}")
            seq = sampler.sample(rng)
            req = _Request(session, base, rid, id_style, spans, time_scale, random.Random(f"{seed}/prompt/{i}"),
                           model_prefix)
            t0 = time.monotonic()
            await spans.event("request", "start", rid, name=wf.name, errors=req.errors)
            try:
                await req.run_seq(seq)
            except CallFailed:
                pass  # already recorded in req.errors
            latency = (time.monotonic() - t0) / time_scale
            await spans.event("request", "end", rid, name=wf.name, status="error" if req.errors else "ok",
                              error=req.errors[0] if req.errors else None, errors=req.errors)
            return RequestResult(rid, "error" if req.errors else "ok", latency, req.n_calls, tuple(req.errors))

        results, wall_s = await run_arrivals(run_one, n_requests, rate_rps=rate_rps, concurrency=concurrency,
                                             seed=seed, time_scale=time_scale)
        reported = spans.enabled
    return DriveResult({r.request: r for r in results}, wall_s / time_scale, time_scale, reported,
                       {"driver": "program", "workflow": wf.name, "id_style": id_style, "seed": seed})
