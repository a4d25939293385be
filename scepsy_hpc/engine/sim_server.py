"""A simulated vLLM: an OpenAI-compatible HTTP server whose latencies come from the performance model.

    python -m scepsy_hpc.engine.sim_server --model llama-3.1-8b-instruct --gpu h100-sxm --port 8001

It stands in for a real engine where there is no GPU. Requests are scheduled by `Batcher`
(continuous batching as in `scepsy_hpc.perf.engine`) on a virtual clock in model seconds; a driver
task sleeps so that wall time tracks virtual time × `--time-scale` (0.01: 100× faster than the
modelled GPU); iterations shorter than a timer tick are computed ahead and their tokens handed out
together, at most ~1 ms late. Every reported number (usage, /metrics) is in model seconds and tokens. Requests
always behave as `ignore_eos: true`: `max_tokens` is the exact output length; without it a length
is drawn from a lognormal (mean --default-output-tokens, cv 0.5, seeded) and the finish reason is
"stop" as if the model had ended it. Token counting rules: `scepsy_hpc.engine.openai_protocol`.
Chat requests with `tools` or `response_format` are answered with tool calls or JSON as
`scepsy_hpc.engine.sim_tools` describes (the rate of tool calls: header `X-Sim-Tool-Rate`, else
--tool-call-rate); such an answer is as long as its text, capped by max_tokens.

Automatic prefix caching, as vLLM's (on by default; off with --no-enable-prefix-caching): the prompt is
laid out as pseudo-tokens (`chat_token_ids` / `completion_token_ids`, equal where the text agrees) and
its full 16-token blocks are named by vLLM's chained hashes (seeded with the served model name); a
plain-text answer is " tok" per token, so the blocks its output fills are named too (prompt tokens,
then " tok" × output). `Batcher` reuses the cached leading blocks (not prefilled, KV shared).
/metrics counts vllm:prefix_cache_queries_total (prompt tokens) and vllm:prefix_cache_hits_total (of
those, cached), and usage carries prompt_tokens_details.cached_tokens. In a chat, the next turn's prompt
puts the assistant's role markers before the answer it repeats, so the blocks of a previous turn's
output do not line up: a follow-up reuses what the previous prompt and it share (whole blocks, at most
prompt − 1 tokens).

Engine secret: with SCEPSY_ENGINE_API_KEY in its environment (never a flag: a flag shows in `ps`), /v1/*
and /scepsy/* answer only calls with `Authorization: Bearer <secret>` (401 otherwise); /health and
/metrics stay open, as vLLM leaves them.

Test hooks (for gateway and agent tests; a real engine has no such thing) exist only in an engine started
with `--test-hooks` or SCEPSY_SIM_TEST_HOOKS=1. Without, the header is refused (400 naming the fix: a
test that forgot to turn them on fails loudly instead of passing without its fault; the gateway never
forwards X-Sim-* headers, so no client of a deployment can reach this), the POST route answers 404 and
SCEPSY_SIM_FAULT is ignored with a line in the log.
  request header `X-Sim-Fault`
    http500          answer 500 with an error body, before any scheduling;
    abort-after:K    after K output tokens, close the connection abruptly — a stream has sent K
                     token chunks and no [DONE]; a non-streamed request gets no response at all.
  `POST /scepsy/sim/fault` with a JSON object of one or more of these (the answer is every fault's state,
  `{"wedged": …, "abort_after": …, "http500": …}`):
    "wedge": true|false      wedges the engine as a vLLM can be wedged: /health still answers 200 and
                             requests are accepted and queue (`vllm:num_requests_waiting` counts them),
                             but no iteration runs, so no token is generated and the token counters
                             freeze until the wedge is cleared;
    "abort_after": K|null    every call behaves as with `X-Sim-Fault: abort-after:K` (a call's own header
                             wins); null clears it;
    "http500": true|false    every call is answered 500 as with `X-Sim-Fault: http500`;
  environment `SCEPSY_SIM_FAULT=wedge@SECONDS` wedges it SECONDS after it starts (for an engine that
  a job starts: every engine started with that environment, a restarted one included, wedges).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import math
import os
import random
import sys
from itertools import count
from typing import Any, AsyncIterator, Mapping, Sequence

from aiohttp import web
from prometheus_client import generate_latest

from scepsy_hpc.engine.batcher import ABORTED, Batcher, Iteration, SimRequest
from scepsy_hpc.engine.metrics import PROMETHEUS_CONTENT_TYPE, EngineMetrics, engine_registry
from scepsy_hpc.engine.openai_protocol import SSE_DONE, TOKEN_TEXT, ApiError, ParsedRequest, ResponseWriter, \
    chat_token_ids, completion_token_ids, parse_request
from scepsy_hpc.engine.sim_tools import DEFAULT_TOOL_RATE, TOOL_RATE_HEADER, StructuredOutput, draw, parse_structured
from scepsy_hpc.errors import InfeasibleError, SpecError, run_entry
from scepsy_hpc.perf.fit import check_fit
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.perf.prefix import BLOCK_TOKENS, chained_hashes

MIN_SLEEP_S = 0.001  # below this a sleep is mostly timer overshoot: run more iterations first
OUTPUT_CV = 0.5
MAX_BODY_BYTES = 64 * 2**20  # aiohttp's 1 MiB default is below a long prompt sent as token ids
FAULT_ENV = "SCEPSY_SIM_FAULT"  # wedge@SECONDS: the engine wedges SECONDS after it starts
FAULT_PATH = "/scepsy/sim/fault"
API_KEY_ENV = "SCEPSY_ENGINE_API_KEY"  # the engine secret: /v1 and /scepsy need `Authorization: Bearer` it
TEST_HOOKS_ENV = "SCEPSY_SIM_TEST_HOOKS"  # "1": the test hooks are on (as --test-hooks)
FAULT_HEADER = "X-Sim-Fault"
GUARDED_PREFIXES = ("/v1/", "/scepsy/")  # what the engine secret guards; /health and /metrics stay open
HOOKS_FIX = f"start the engine with --test-hooks or {TEST_HOOKS_ENV}=1 to use test hooks"


class _Handle:
    """The HTTP side of one request: tokens delivered so far and a wake-up for its handler."""

    __slots__ = ("req", "finish_reason", "ready", "done", "event")

    def __init__(self, req: SimRequest, finish_reason: str) -> None:
        self.req, self.finish_reason = req, finish_reason
        self.ready = 0
        self.done = False
        self.event = asyncio.Event()


class _Writer(ResponseWriter):
    """vLLM's response bodies plus usage.prompt_tokens_details.cached_tokens (the prompt tokens the prefix
    cache served; the OpenAI API always has it, vLLM with --enable-prompt-tokens-details)."""

    cached_tokens = 0

    def usage(self, completion_tokens: int) -> dict[str, Any]:
        """The usage object with the cached prompt tokens."""
        return {**super().usage(completion_tokens), "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class SimEngineServer:
    """The engine: a `Batcher` driven in real time, plus the OpenAI-compatible handlers."""

    def __init__(self, perf: EnginePerf, *, served_name: str, time_scale: float, max_model_len: int,
                 default_output_tokens: int = 256, seed: int = 0, wedge_after_s: float | None = None,
                 api_key: str | None = None, test_hooks: bool = False,
                 tool_call_rate: float = DEFAULT_TOOL_RATE, prefix_caching: bool = True) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale={time_scale} must be > 0")
        if not 0 <= tool_call_rate <= 1:
            raise ValueError(f"tool_call_rate={tool_call_rate} must be in [0, 1]")
        if max_model_len > perf.kv_capacity_tokens:
            # A request that long could never be admitted and would block the FCFS queue.
            raise ValueError(f"max_model_len={max_model_len} exceeds the KV cache of {perf.kv_capacity_tokens} tokens")
        self.perf = perf
        self.served_name = served_name
        self.time_scale = time_scale
        self.max_model_len = max_model_len
        self.default_output_tokens = default_output_tokens
        self.prefix_caching = prefix_caching
        self.batcher = Batcher(perf, prefix_caching=prefix_caching)
        self.metrics = EngineMetrics(served_name)
        self.registry = engine_registry(self.metrics, self._load)
        self._rng = random.Random(seed)
        self.tool_call_rate = tool_call_rate
        self._tool_rng = random.Random(f"tools:{seed}")  # its own stream: tool draws leave output lengths as they were
        self._ids = count()
        self._handles: dict[int, _Handle] = {}
        self._vt = 0.0  # virtual (model) time of the next iteration boundary
        self._t0 = 0.0  # loop time at which virtual time 0 was
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task[None] | None = None
        self._unwedged: asyncio.Event | None = None  # clear while the engine is wedged (the fault hook)
        self.wedge_after_s = wedge_after_s  # wedge this many wall seconds after start (SCEPSY_SIM_FAULT)
        self._api_key = api_key.encode() if api_key else None
        self.test_hooks = test_hooks
        self.abort_after: int | None = None  # engine-level fault: every call aborts after this many tokens
        self.http500 = False                 # engine-level fault: every call is answered 500

    @property
    def wedged(self) -> bool:
        """Whether the wedge fault holds the engine (no iteration runs)."""
        return self._unwedged is not None and not self._unwedged.is_set()

    def set_wedged(self, wedged: bool) -> None:
        """Wedge the engine (iterations stop, requests still queue) or let it go on; needs `start()` first."""
        assert self._unwedged is not None
        if wedged:
            self._unwedged.clear()
        else:
            self._unwedged.set()

    def _load(self) -> tuple[int, int, float]:
        b = self.batcher
        return b.num_running, b.num_waiting, b.kv_usage

    # --- clock and driver -------------------------------------------------------------------

    def model_now(self) -> float:
        """Virtual time corresponding to the wall clock now."""
        return (asyncio.get_running_loop().time() - self._t0) / self.time_scale

    async def start(self) -> None:
        """Start the driver task (virtual time 0 is now)."""
        self._t0 = asyncio.get_running_loop().time()
        self._wake = asyncio.Event()
        self._unwedged = asyncio.Event()
        self._unwedged.set()
        if self.wedge_after_s is not None:
            asyncio.get_running_loop().call_later(self.wedge_after_s, self.set_wedged, True)
        self._driver = asyncio.create_task(self._drive(), name="sim-engine-driver")

    async def stop(self) -> None:
        """Stop the driver task."""
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None and self._unwedged is not None
        pending: list[Iteration] = []  # computed, their tokens not yet handed out
        last_yield = loop.time()
        while True:
            if not self._unwedged.is_set():
                await self._unwedged.wait()
                # The model's clock went on while wedged; what was computed before goes out at once.
                last_yield = loop.time()
                self._vt = max(self._vt, self.model_now())
            it = self.batcher.step(self._vt)
            if it is not None:
                self._vt = it.end_s
                pending.append(it)
                now = loop.time()
                # Iterations shorter than a timer tick are computed ahead and handed out together
                # (at most ~MIN_SLEEP_S late); the loop still yields that often to serve requests.
                if self._t0 + self._vt * self.time_scale - now <= MIN_SLEEP_S and now - last_yield < MIN_SLEEP_S:
                    continue
            if pending:
                # Sleep to a cumulative target so rounding in sleeps never accumulates into drift.
                delay = self._t0 + self._vt * self.time_scale - loop.time()
                await asyncio.sleep(max(delay, 0.0))
                last_yield = loop.time()
                # Wall time by which tokens go out later than the model says: the CPU cannot keep
                # up at this time scale, and whoever measures this engine should know.
                self.metrics.lag_s += max(0.0, last_yield - (self._t0 + self._vt * self.time_scale)) * len(pending)
                self.metrics.deliveries += len(pending)
                for done in pending:
                    self._deliver(done)
                pending = []
            if it is None:
                if self.batcher.idle():
                    self._wake.clear()
                    await self._wake.wait()
                    last_yield = loop.time()
                # Idle time passes in the model too; a request that arrived at virtual time t is
                # admitted at the first boundary >= t.
                self._vt = max(self._vt, self.model_now())

    def _deliver(self, it: Iteration) -> None:
        m = self.metrics
        for req, n in it.emitted:
            if req.state == ABORTED:
                continue
            m.generation_tokens += 1
            if n == 1:
                m.prompt_tokens += req.prompt
                if self.prefix_caching:
                    m.prefix_queries += req.prompt
                    m.prefix_hits += req.hit
                m.ttft.observe(req.t_first - req.t_arrive)
            else:
                m.tpot.observe(it.duration_s)  # vLLM V1 observes every inter-token interval
            h = self._handles.get(req.rid)
            if h is not None:
                h.ready = n
                h.event.set()
        for req in it.finished:
            m.e2e.observe(req.t_end - req.t_arrive)
            h = self._handles.get(req.rid)
            if h is not None:
                # vLLM counts a tool-call answer as the engine saw it: stopped
                m.success["stop" if h.finish_reason == "tool_calls" else h.finish_reason] += 1
                h.done = True
                h.event.set()

    def sample_output_tokens(self, prompt_tokens: int) -> int:
        """An output length for a request without max_tokens: lognormal, mean default_output_tokens, cv 0.5."""
        sigma2 = math.log(1 + OUTPUT_CV**2)
        x = self._rng.lognormvariate(math.log(self.default_output_tokens) - sigma2 / 2, math.sqrt(sigma2))
        return max(1, min(round(x), self.max_model_len - prompt_tokens))

    def _submit(self, prompt: int, output: int, finish_reason: str, blocks: Sequence[Any] = ()) -> _Handle:
        rid = next(self._ids)
        req = self.batcher.submit(rid, prompt, output, self.model_now(), blocks)
        h = self._handles[rid] = _Handle(req, finish_reason)
        assert self._wake is not None
        self._wake.set()
        return h

    def _release(self, h: _Handle) -> None:
        # A client that went away (or a fault) must not keep its KV reservation.
        self.batcher.abort(h.req.rid)
        self._handles.pop(h.req.rid, None)

    # --- HTTP -------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application; its startup/cleanup start and stop the driver."""
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._authorize])
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        if self.test_hooks:
            app.router.add_post(FAULT_PATH, self.handle_fault)

        async def lifecycle(_: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.stop()

        app.cleanup_ctx.append(lifecycle)
        return app

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """With an engine secret, /v1 and /scepsy answer 401 to a call without `Authorization: Bearer <secret>`."""
        if self._api_key is not None and request.path.startswith(GUARDED_PREFIXES):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # constant time: how much of a guess matched must not show in how long the answer takes
            if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)):
                err = ApiError(401, "this engine needs its deployment's secret: send 'Authorization: Bearer <secret>' "
                                    "(calls go through the scepsy gateway, which adds it)", "AuthenticationError")
                return web.json_response(err.body(), status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def handle_health(self, request: web.Request) -> web.Response:
        """GET /health: 200 while the server runs."""
        return web.Response(status=200)

    def faults(self) -> dict[str, Any]:
        """The engine-level faults now (what POST /scepsy/sim/fault answers)."""
        return {"wedged": self.wedged, "abort_after": self.abort_after, "http500": self.http500}

    async def handle_fault(self, request: web.Request) -> web.Response:
        """POST /scepsy/sim/fault `{"wedge": bool, "abort_after": K|null, "http500": bool}` (any non-empty
        subset): set the engine-level faults; answers all of them (`faults`)."""
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            body = None
        checks = {"wedge": lambda v: isinstance(v, bool), "http500": lambda v: isinstance(v, bool),
                  "abort_after": lambda v: v is None or (type(v) is int and v >= 0)}
        if not (isinstance(body, dict) and body and all(k in checks and checks[k](v) for k, v in body.items())):
            usage = (f'{FAULT_PATH} takes a JSON object of one or more of {{"wedge": true|false, '
                     f'"abort_after": K (an integer >= 0) or null, "http500": true|false}}')
            return web.json_response(ApiError(400, usage).body(), status=400)
        if "wedge" in body:
            self.set_wedged(body["wedge"])
        if "abort_after" in body:
            self.abort_after = body["abort_after"]
        if "http500" in body:
            self.http500 = body["http500"]
        return web.json_response(self.faults())

    async def handle_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the served model, vLLM-shaped."""
        card = {"id": self.served_name, "object": "model", "created": 0, "owned_by": "scepsy-sim",
                "root": self.perf.cfg.model.hf_id, "parent": None, "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus text with vLLM's metric names."""
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._serve(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise ApiError(400, f"the request body is not valid JSON (or nests too deep): {exc}") from None
            parsed = parse_request(body, chat=chat, served_name=self.served_name, max_model_len=self.max_model_len)
            abort_after = self._call_fault(request.headers.get(FAULT_HEADER))
            spec = parse_structured(body, request.headers.get(TOOL_RATE_HEADER)) if chat else None
            out = draw(spec, body["messages"], self._tool_rng, self.tool_call_rate) if spec else None
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        if out is not None:  # as long as its text, cut (finish "length") by max_tokens or the context left
            cap = parsed.max_tokens if parsed.max_tokens is not None else self.max_model_len - parsed.prompt_tokens
            output, reason = (out.tokens, out.finish_reason) if out.tokens <= cap else (cap, "length")
        elif parsed.max_tokens is not None:
            output, reason = parsed.max_tokens, "length"
        else:
            output, reason = self.sample_output_tokens(parsed.prompt_tokens), "stop"
        h = self._submit(parsed.prompt_tokens, output, reason, self._blocks(body, chat, output, out is None))
        try:
            if parsed.stream:
                try:
                    return await self._stream(request, parsed, h, abort_after, out)
                except ConnectionResetError:  # the client left between two writes: nothing to answer
                    return web.Response(status=499)
            while not (h.done or (abort_after is not None and h.ready >= abort_after)):
                h.event.clear()
                await h.event.wait()
            if abort_after is not None:
                return _drop(request)
            message = out.message(output) if out is not None else None
            w = _Writer(parsed)
            w.cached_tokens = h.req.hit
            return web.json_response(w.full(output, reason, message))
        finally:
            self._release(h)

    async def _stream(self, request: web.Request, parsed: ParsedRequest, h: _Handle,
                      abort_after: int | None, out: StructuredOutput | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        w = _Writer(parsed)
        output = h.req.output
        limit = output if abort_after is None else min(abort_after, output)
        buf = [w.role_chunk()]
        sent = 0
        while True:
            h.event.clear()
            # Several tokens may have arrived since the last write (short iterations are batched).
            while sent < min(h.ready, limit):
                sent += 1
                if out is None:
                    buf.append(w.token_chunk(h.finish_reason if sent == output else None))
                    continue
                buf += [w.delta_chunk(d, None) for d in out.deltas(sent)]
                if sent == output:  # as OpenAI ends a tool call or JSON: an empty delta with the reason
                    buf.append(w.delta_chunk({}, h.finish_reason))
            if buf:
                await resp.write(b"".join(buf))
                buf = []
            if abort_after is not None and sent >= limit:
                return _drop(request, resp)
            if sent >= output:
                break
            await h.event.wait()
        w.cached_tokens = h.req.hit
        tail = w.usage_chunk(output) if parsed.include_usage else b""
        await resp.write(tail + SSE_DONE)
        await resp.write_eof()
        return resp


    def _blocks(self, body: dict[str, Any], chat: bool, output: int, plain_text: bool) -> list[int]:
        """Block names of a request's sequence for the prefix cache: chained hashes of its prompt's
        pseudo-tokens, followed, for a plain-text answer, by its output (" tok" per token); [] when
        prefix caching is off. Linear in the prompt: about 10 ms for a 100k-token chat prompt."""
        if not self.prefix_caching:
            return []
        ids = chat_token_ids(body["messages"], body.get("tools")) if chat else completion_token_ids(body["prompt"])
        if plain_text:
            ids += [TOKEN_TEXT] * output
        return chained_hashes(ids, BLOCK_TOKENS, seed=self.served_name)

    def _call_fault(self, header: str | None) -> int | None:
        """The fault of one call: its X-Sim-Fault header, else the engine-level one (raise the 500 now, or
        return K of abort-after:K; None: no fault). A header without the test hooks is a 400."""
        if header is not None and not self.test_hooks:
            raise ApiError(400, f"{FAULT_HEADER} is a test hook, off in this engine; {HOOKS_FIX}")
        if header is None and self.http500:
            raise ApiError(500, "simulated engine failure (fault http500)", "InternalServerError")
        return _parse_fault(header) if header is not None else self.abort_after


def _parse_fault(value: str | None) -> int | None:
    """The X-Sim-Fault test hook: raise the 500 now, or return K of abort-after:K (None: no fault)."""
    if value is None:
        return None
    if value == "http500":
        raise ApiError(500, "simulated engine failure (X-Sim-Fault: http500)", "InternalServerError")
    if value.startswith("abort-after:") and value[len("abort-after:"):].isdigit():
        return int(value[len("abort-after:"):])
    raise ApiError(400, f"X-Sim-Fault: {value!r} is not a fault; use 'http500' or 'abort-after:K'")


def _drop(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
    """Close the connection under the response (the abort-after fault); what was written is flushed."""
    if request.transport is not None:
        request.transport.close()
    return resp if resp is not None else web.Response(status=500)


def build_arg_parser() -> argparse.ArgumentParser:
    """The engine-sim command line (vLLM-like flag names)."""
    p = argparse.ArgumentParser(prog="scepsy engine-sim", description="Simulated OpenAI-compatible LLM engine (no GPU).")
    p.add_argument("--model", required=True, help="model key in configs/models.yaml")
    p.add_argument("--gpu", required=True, help="GPU key in configs/gpus.yaml")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--gpu-frac", type=float, default=1.0, help="share of one GPU, (0, 1] (default 1.0)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per model second (0.01: 100x faster than the modelled GPU; default 1)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit (default: the model's, capped by the KV cache)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled output lengths")
    p.add_argument("--default-output-tokens", type=int, default=256,
                   help="mean output length of requests without max_tokens")
    p.add_argument("--tool-call-rate", type=float, default=DEFAULT_TOOL_RATE,
                   help=f"chance that a chat call offered tools (tool_choice auto) answers with a tool call, halved "
                        f"for each round of tool results in its conversation; a request's {TOOL_RATE_HEADER} header "
                        f"overrides it (default {DEFAULT_TOOL_RATE})")
    p.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true", default=True,
                   help="reuse the KV of cached prompt prefixes, as vLLM's automatic prefix caching (the default)")
    p.add_argument("--no-enable-prefix-caching", "--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="turn prefix caching off: every prompt token is prefilled, no cache hit is counted")
    p.add_argument("--test-hooks", action="store_true",
                   help=f"turn on the fault-injection test hooks ({FAULT_HEADER}, POST {FAULT_PATH}, {FAULT_ENV}); "
                        f"also {TEST_HOOKS_ENV}=1. The engine secret is read from {API_KEY_ENV} only (a flag "
                        f"would show in ps)")
    return p


def parse_fault_env(value: str | None) -> float | None:
    """The SECONDS of SCEPSY_SIM_FAULT=wedge@SECONDS (None when unset or empty); SpecError if malformed."""
    if not value:
        return None
    head, _, seconds = value.partition("@")
    try:
        wedge_after_s = float(seconds) if head == "wedge" else -1.0
    except ValueError:
        wedge_after_s = -1.0
    if not (wedge_after_s >= 0 and math.isfinite(wedge_after_s)):
        raise SpecError(f"{FAULT_ENV}={value!r} is not a fault; use wedge@SECONDS (SECONDS >= 0), or unset it")
    return wedge_after_s


def build_server(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SimEngineServer:
    """The engine the parsed arguments and `environ` (SCEPSY_ENGINE_API_KEY, SCEPSY_SIM_TEST_HOOKS,
    SCEPSY_SIM_FAULT) describe; ScepsyError if they are inconsistent."""
    from scepsy_hpc.spec.catalog import load_gpus, load_models

    environ = environ or {}
    test_hooks = bool(getattr(args, "test_hooks", False)) or environ.get(TEST_HOOKS_ENV) == "1"
    wedge_after_s = None
    if test_hooks:
        wedge_after_s = parse_fault_env(environ.get(FAULT_ENV))
    elif environ.get(FAULT_ENV):
        print(f"scepsy engine-sim: {FAULT_ENV}={environ[FAULT_ENV]!r} ignored: {HOOKS_FIX}", file=sys.stderr, flush=True)

    models, gpus = load_models(), load_gpus()
    if args.model not in models:
        raise SpecError(f"--model {args.model!r} is not in the model catalog; known: {', '.join(sorted(models))}")
    if args.gpu not in gpus:
        raise SpecError(f"--gpu {args.gpu!r} is not in the GPU catalog; known: {', '.join(sorted(gpus))}")
    model = models[args.model]
    for flag, value in (("--time-scale", args.time_scale), ("--default-output-tokens", args.default_output_tokens)):
        if not 0 < value < float("inf"):   # also refuses nan
            raise SpecError(f"{flag} {value} must be a finite number > 0")
    rate = getattr(args, "tool_call_rate", DEFAULT_TOOL_RATE)
    if not 0 <= rate <= 1:   # also refuses nan
        raise SpecError(f"--tool-call-rate {rate} must be a number from 0 to 1")
    if not 0 <= args.port <= 65535:
        raise SpecError(f"--port {args.port}: give a port from 1 to 65535, or 0 for a free one")
    try:
        cfg = EngineConfig(model, gpus[args.gpu], tp=args.tp, gpu_frac=args.gpu_frac,
                           max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    label = f"{args.model} on {args.gpu}"
    if args.max_model_len is not None and not 1 < args.max_model_len <= model.max_model_len:
        raise SpecError(f"--max-model-len {args.max_model_len} must be in [2, {model.max_model_len}] for {args.model}")
    try:
        # vLLM refuses to start if one full sequence won't fit
        if args.max_model_len is not None:
            perf = check_fit(cfg, min_kv_tokens=args.max_model_len, label=label)
        else:
            perf = check_fit(cfg, label=label)
    except InfeasibleError as exc:
        # To the server, flags the model cannot fit under are bad arguments: exit 2, like argparse's.
        raise SpecError(str(exc)) from None
    max_len = args.max_model_len or min(model.max_model_len, perf.kv_capacity_tokens)
    return SimEngineServer(perf, served_name=args.served_model_name or args.model, time_scale=args.time_scale,
                           max_model_len=max_len, default_output_tokens=args.default_output_tokens, seed=args.seed,
                           wedge_after_s=wedge_after_s, api_key=environ.get(API_KEY_ENV) or None,
                           test_hooks=test_hooks, tool_call_rate=rate,
                           prefix_caching=getattr(args, "prefix_caching", True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulated engine until SIGINT/SIGTERM; exit 2 with one line on bad arguments."""
    args = build_arg_parser().parse_args(argv)
    return run_entry(lambda: _serve(args), prog="scepsy engine-sim")


def _serve(args: argparse.Namespace) -> None:
    server = build_server(args, os.environ)
    perf = server.perf
    print(f"scepsy engine-sim: serving {server.served_name!r} ({args.model} on {args.gpu}, tp={args.tp}, "
          f"gpu_frac={args.gpu_frac:g}) at http://{args.host}:{args.port}/v1; max_model_len={server.max_model_len}, "
          f"kv_capacity={perf.kv_capacity_tokens} tokens, time_scale={args.time_scale:g}, "
          f"prefix caching {'on' if server.prefix_caching else 'off'}; "
          f"engine secret {'required' if server._api_key else 'not set: calls need none'}"
          f"{'; TEST HOOKS ON' if server.test_hooks else ''}", flush=True)
    # handler_cancellation: a client that disconnects cancels its handler, whose cleanup frees the KV.
    web.run_app(server.make_app(), host=args.host, port=args.port, print=None, access_log=None,
                handler_cancellation=True, shutdown_timeout=1.0)


if __name__ == "__main__":
    sys.exit(main())
