"""Iteration time of a continuous-batching engine (vLLM-style) from a roofline, and KV capacity.

One engine *iteration* runs the scheduled prefill chunks plus one decode token for every running
sequence (chunked prefill, as vLLM V1 schedules). Its time is

    t = max(FLOPs / F, bytes / B) + t_comm + t_overhead                                    (1)

    F = tp · f · bf16_peak · compute_eff        (f = GPU fraction: MPS scales compute ...)
    B = tp · f · hbm_peak  · mem_eff            (... and bandwidth by f)
    FLOPs = 2·P_mm·T + 2·V·H·S + 4·L·H_q·d·(K_dec + Σ_chunks c·(x + (c+1)/2))
    bytes = W(T) + kv·(K_dec + Σ_chunks (x + c))
    t_comm = 2·L·(α + 2(tp−1)/tp · T·H·b / β)  for tp > 1 (two all-reduces per layer, ring)

with T tokens in the iteration, S sequences sampled, K_dec the context of all decoding sequences,
chunks c of prefill after x cached tokens, P_mm the matmul parameters per token (LM head apart),
W(T) the weight bytes touched (all for dense models; for MoE the expected experts hit by T tokens),
kv the KV bytes per token, H the hidden size, b bytes per value, α the all-reduce latency and β
the per-direction link bandwidth times link_eff. Efficiency constants per GPU live in
configs/gpus.yaml with their calibration sources.

In a run of decode-only iterations with n sequences, K_dec grows by n each iteration, so both
roofline terms are linear in the iteration index i and t(i) = max(a1 + b1·i, a2 + b2·i) + c.
`DecodeSeries` sums that in closed form and inverts the sum, which lets the simulator advance
whole runs of iterations in O(1) while staying exact to iteration granularity.
"""

from __future__ import annotations

from typing import Any

import math
from dataclasses import dataclass, field

from scepsy_hpc.spec.catalog import GIB, GPUSpec, ModelSpec
from scepsy_hpc.spec.placement_entry import MEM_UTIL

TP_DEGREES = (1, 2, 4, 8, 16)



@dataclass(frozen=True)
class EngineConfig:
    """What an engine instance runs on, and its scheduler limits (vLLM flag names in comments)."""

    model: ModelSpec
    gpu: GPUSpec
    tp: int = 1  # --tensor-parallel-size
    gpu_frac: float = 1.0  # share of one GPU (MPS thread %, memory fraction); < 1 only with tp = 1
    max_num_seqs: int = 256  # --max-num-seqs
    max_batched_tokens: int = 8192  # --max-num-batched-tokens (vLLM V1 default for the API server)
    mem_util: float = MEM_UTIL  # --gpu-memory-utilization, as a share of the instance's memory

    def __post_init__(self) -> None:
        if self.tp not in TP_DEGREES:
            raise ValueError(f"tp={self.tp} is not one of {TP_DEGREES}")
        if not 0.0 < self.gpu_frac <= 1.0:
            raise ValueError(f"gpu_frac={self.gpu_frac} must be in (0, 1]")
        if self.gpu_frac < 1.0 and self.tp > 1:
            raise ValueError(f"gpu_frac={self.gpu_frac} < 1 needs tp=1 (fractional instances are single-GPU); got tp={self.tp}")
        if self.max_batched_tokens <= self.max_num_seqs:
            raise ValueError(f"max_batched_tokens ({self.max_batched_tokens}) must exceed max_num_seqs ({self.max_num_seqs})")


@dataclass(frozen=True)
class DecodeSeries:
    """Times of consecutive decode-only iterations: t(i) = max(a1 + b1·i, a2 + b2·i) + c, i = 0, 1, …"""

    a1: float
    b1: float
    a2: float
    b2: float
    c: float
    _switch: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # First integer index at which the line not dominant at i = 0 takes over (inf if never).
        first_hi = self.a1 >= self.a2
        da, db = (self.a1 - self.a2, self.b1 - self.b2) if first_hi else (self.a2 - self.a1, self.b2 - self.b1)
        switch = math.inf if db >= 0 else max(0.0, math.ceil(-da / db))
        object.__setattr__(self, "_switch", switch)

    def _lines(self) -> tuple[tuple[float, float], tuple[float, float]]:
        first = (self.a1, self.b1) if self.a1 >= self.a2 else (self.a2, self.b2)
        second = (self.a2, self.b2) if self.a1 >= self.a2 else (self.a1, self.b1)
        return first, second

    def term(self, i: int) -> float:
        """Time of iteration i."""
        return max(self.a1 + self.b1 * i, self.a2 + self.b2 * i) + self.c

    @staticmethod
    def _sum_line(a: float, b: float, start: float, count: float) -> float:
        # Σ_{i=start}^{start+count-1} (a + b·i)
        return count * a + b * count * (2 * start + count - 1) / 2

    def total(self, k: int) -> float:
        """Time of the first k iterations."""
        if k <= 0:
            return 0.0
        (fa, fb), (sa, sb) = self._lines()
        m = min(k, self._switch)
        out = self._sum_line(fa, fb, 0, m) + self.c * k
        if k > m:
            out += self._sum_line(sa, sb, m, k - m)
        return out

    def count_within(self, dt: float) -> int:
        """Largest k with total(k) <= dt (iterations finished within dt)."""
        if dt <= 0:
            return 0
        (fa, fb), (sa, sb) = self._lines()

        def solve(a: float, b: float, start: float, budget: float, cap: float) -> int:
            # largest j <= cap with Σ_{i=start}^{start+j-1} (a + c + b·i) <= budget
            lin = a + self.c + b * start
            if b == 0:
                j = math.floor(budget / lin) if lin > 0 else cap
            else:
                qa, qb = b / 2, lin - b / 2
                disc = qb * qb + 4 * qa * budget
                j = math.floor((-qb + math.sqrt(max(disc, 0.0))) / (2 * qa))
            j = int(max(0, min(j, cap if cap != math.inf else j)))
            # guard against rounding at the boundary
            while j > 0 and self._sum_line(a + self.c, b, start, j) > budget * (1 + 1e-12) + 1e-15:
                j -= 1
            while (cap == math.inf or j < cap) and self._sum_line(a + self.c, b, start, j + 1) <= budget * (1 + 1e-12) + 1e-15:
                j += 1
            return j

        m = self._switch
        j = solve(fa, fb, 0, dt, m)
        if j < m:
            return j
        rest = dt - self._sum_line(fa + self.c, fb, 0, m)
        return int(m) + solve(sa, sb, m, rest, math.inf)


class EnginePerf:
    """The performance model of one engine configuration (precomputed coefficients of eq. 1)."""

    def __init__(self, cfg: EngineConfig) -> None:
        m, g = cfg.model, cfg.gpu
        self.cfg = cfg
        self.flops_per_s = cfg.tp * cfg.gpu_frac * g.bf16_tflops * 1e12 * g.compute_eff
        self.bytes_per_s = cfg.tp * cfg.gpu_frac * g.hbm_tbps * 1e12 * g.mem_eff
        self.kv_bytes_per_token = m.kv_bytes_per_token
        self._mm_flops_per_token = 2.0 * m.active_matmul_params
        self._head_flops_per_seq = 2.0 * m.embed_params
        self._attn_flops_per_ctx = 4.0 * m.layers * m.heads * m.head_dim
        self._dense_weight_bytes = (m.params_b * 1e9 - m.expert_params) * m.dtype_bytes
        self._expert_bytes = m.expert_params * m.dtype_bytes
        self.overhead_s = g.iter_overhead_ms / 1e3
        if cfg.tp > 1:
            link_gbps = g.nvlink_gbps / 2 if g.nvlink_gbps > 0 else g.pcie_gbps  # datasheet NVLink is bidirectional
            beta = link_gbps * 1e9 * g.link_eff
            ring = 2 * (cfg.tp - 1) / cfg.tp
            self._comm_fixed = 2 * m.layers * g.allreduce_latency_us * 1e-6
            self._comm_per_token = 2 * m.layers * ring * m.hidden * m.dtype_bytes / beta
        else:
            self._comm_fixed = self._comm_per_token = 0.0
        # KV capacity: the instance's memory share, less a per-GPU reserve (CUDA context,
        # activations, CUDA graphs), less the weights; KV is sharded over tp like the weights.
        usable = cfg.tp * (cfg.gpu_frac * g.mem_gib * cfg.mem_util - g.reserved_gib) * GIB - m.weight_bytes
        self.kv_capacity_tokens = max(0, int(usable // self.kv_bytes_per_token))

    def weight_bytes_read(self, tokens: int) -> float:
        """Weight bytes read in an iteration of `tokens` tokens (MoE: expected distinct experts hit)."""
        m = self.cfg.model
        if not m.experts:
            return self._dense_weight_bytes
        hit = 1.0 - (1.0 - m.experts_per_token / m.experts) ** max(tokens, 1)
        return self._dense_weight_bytes + self._expert_bytes * hit

    def iteration_time(self, n_decode: int, ctx_decode: float, prefill: list[tuple[int, int]] = ()) -> float:
        """Seconds for one iteration: `n_decode` decoding sequences with total context `ctx_decode`
        tokens, plus prefill chunks given as (chunk tokens c, tokens already cached x)."""
        c_sum = 0
        attn_ctx = float(ctx_decode)
        kv_read = float(ctx_decode)
        for c, x in prefill:
            c_sum += c
            attn_ctx += c * (x + (c + 1) / 2)
            kv_read += x + c
        tokens = n_decode + c_sum
        if tokens == 0:
            return 0.0
        seqs = n_decode + len(prefill)
        flops = self._mm_flops_per_token * tokens + self._head_flops_per_seq * seqs + self._attn_flops_per_ctx * attn_ctx
        nbytes = self.weight_bytes_read(tokens) + self.kv_bytes_per_token * kv_read
        compute = flops / self.flops_per_s
        memory = nbytes / self.bytes_per_s
        return max(compute, memory) + self._comm_fixed + self._comm_per_token * tokens + self.overhead_s

    def decode_series(self, n: int, ctx0: float) -> DecodeSeries:
        """Times of consecutive decode-only iterations of `n` sequences starting at context `ctx0`."""
        comp_a = (self._mm_flops_per_token * n + self._head_flops_per_seq * n + self._attn_flops_per_ctx * ctx0) / self.flops_per_s
        comp_b = self._attn_flops_per_ctx * n / self.flops_per_s
        mem_a = (self.weight_bytes_read(n) + self.kv_bytes_per_token * ctx0) / self.bytes_per_s
        mem_b = self.kv_bytes_per_token * n / self.bytes_per_s
        c = self._comm_fixed + self._comm_per_token * n + self.overhead_s
        return DecodeSeries(comp_a, comp_b, mem_a, mem_b, c)

    def prefill_time(self, prompt_tokens: int) -> float:
        """Time to prefill one prompt alone (chunked by max_batched_tokens), i.e. unloaded TTFT."""
        budget = self.cfg.max_batched_tokens
        t, done = 0.0, 0
        while done < prompt_tokens:
            c = min(budget, prompt_tokens - done)
            t += self.iteration_time(0, 0, [(c, done)])
            done += c
        return t

    def request_latency(self, prompt_tokens: int, output_tokens: int, batch: int = 1) -> float:
        """Latency of one request decoding alongside `batch`−1 similar ones (unloaded if batch=1)."""
        ttft = self.prefill_time(prompt_tokens)
        if output_tokens <= 1:
            return ttft
        series = self.decode_series(batch, batch * (prompt_tokens + 1))
        return ttft + series.total(output_tokens - 1)


def chunk_prefills(prefilling: Any, budget: int) -> tuple[list[tuple[int, int]], list[Any]]:
    """vLLM's chunked prefill, FCFS: give each prefilling sequence (`.prompt`, `.prefilled`) as many
    of the iteration's `budget` tokens as it still needs, in order, until the budget runs out.
    Advances `.prefilled`; returns the (chunk, already prefilled) pairs for `iteration_time` and the
    sequences whose prefill completes in this iteration. Shared by the simulator and the sim engine
    server, so both schedule identically."""
    chunks: list[tuple[int, int]] = []
    done: list[Any] = []
    for s in prefilling:
        if budget <= 0:
            break
        c = min(budget, s.prompt - s.prefilled)
        chunks.append((c, s.prefilled))
        s.prefilled += c
        budget -= c
        if s.prefilled == s.prompt:
            done.append(s)
    return chunks, done
