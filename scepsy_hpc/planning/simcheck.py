"""The simulator check: the MILP's best allocations, run in the discrete-event simulator.

The predictor prices each LLM by a profile measured with Poisson arrivals of single calls. Some
workflows do not feed their LLMs like that: in step-synchronous ones (beam search with a process
reward model: every step fans out, the scorer waits for the generator, the next step waits for
every score) requests drift into lock-step under load and the scorer receives its calls in
waves, so its calls wait seconds where the profile says tens of milliseconds. No per-LLM term sees
that coupling; the simulator, which runs the workflow's program against every engine at once,
does. So beside the MILP's optimum the planner lists a few other allocations (`shortlist`: the
MILP re-solved under lower utilisation caps, the same GPUs as smaller instances, the baselines'
allocations, and the next-best allocations that split the GPUs differently, constraint (7) of
allocate.milp), simulates each at
the planned rate, and keeps the one with the lowest simulated mean latency: the MILP's optimum
unless another beats it by more than `margin`.

For the max-throughput goal the criterion is the simulated sustainable rate. By default only the
choice the predictor cannot make is checked (`run_tolerance_check`): the plan against the allocation
of the most predicted capacity, which it was picked within `throughput_tol` of; when they are one, the plan
alone at the planned rate (`run_capacity_check`). When the allocation it
keeps falls a rate step or more short of the planned rate, `run_repair` re-plans with the LLM that
queued most provisioned for the capacity the simulator showed, and keeps what holds more. The full race
(`run_throughput_check`): the MILP's optimum is bracketed by bisection, the shortlist is rebuilt at a
rate the optimum does sustain (the predictor's capacity can be far above it), and the allocations
race upward in rate steps of `step`: at each step every contender is simulated at the same rate,
the sustainable ones go on, and the lowest-latency survivor's `neighbours` (a GPU moved from one
LLM to another) join the race. An alternative must sustain a rate `step` above every rate the
optimum sustained to replace it. Its judge is the bench's, sim.capacity.judge (requests stop
piling up; runs still filling are lengthened). The race is opt-in (`throughput=True`,
`--sim-check-throughput`): it costs minutes, and on beam_search, where whole-GPU and fractional
plans of one GPU split sustain the same rate within the judge's few percent, it mostly picks
among sample-path noise (README, "Measured").

It sits in planning, above allocate, because it runs the simulator (allocate's planner and
policies import no simulator); `planning.policy.checked` applies it to the milp policy's plan.

The check runs on the planner's GPU type with the engine performance model, with its own seed
(not that of any later `scepsy simulate` or `scepsy bench` run). It applies to one workflow with
a program: several workflows sharing deployments, a trace without a program, and measured
profiles (which the simulator's engine model does not use) skip it with a note.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from scepsy_hpc.allocate.allocation import as_entry, as_json

if TYPE_CHECKING:
    from scepsy_hpc.allocate.milp import Candidate
    from scepsy_hpc.allocate.planner import Outcome, Planner

DEFAULT_ALTERNATIVES = 3
DEFAULT_CAPS = (0.75, 0.6, 0.45)
BASELINES = ("equal", "independent")
SEED_OFFSET = 7919  # the check's arrivals and programs differ from a `simulate`/`bench` run at the same --seed


@dataclass
class Checked:
    """One allocation the check simulated."""

    label: str
    choice: dict[str, "Candidate"]
    predicted_s: float
    simulated_s: float
    throughput_rps: float
    sustained_rps: float | None = None   # throughput goal: the highest rate it sustained in the race (0: none tried held)
    refused_rps: float | None = None     # throughput goal: the rate at which it fell out (None: still in at the end)
    steady: dict[str, Any] | None = None  # a steady-state run's figures (SteadyRun.to_dict), when the check made one

    def record(self, rate: float, run: "RaceRun") -> bool:
        """A judgement of this allocation at `rate` (throughput goal): its figures, the highest rate it sustained
        and the lowest it refused. True when the run is that lowest refusal (its waits name the LLM short)."""
        self.simulated_s, self.throughput_rps = run.latency_s, run.throughput_rps
        if run.sustainable:
            self.sustained_rps = max(self.sustained_rps or 0.0, rate)
        elif self.refused_rps is None or rate < self.refused_rps:
            self.refused_rps = rate
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """The row as `plan --json` prints it under sim_check.allocations."""
        out = {"label": self.label, "allocation": {m: as_json(c) for m, c in self.choice.items()},
               "predicted_latency_s": self.predicted_s,
               "simulated_latency_s": self.simulated_s if math.isfinite(self.simulated_s) else None,
               "simulated_throughput_rps": self.throughput_rps}
        if self.sustained_rps is not None:
            out.update(sustained_rps=self.sustained_rps, refused_rps=self.refused_rps)
        if self.steady is not None:
            out["steady_state"] = self.steady
        return out


@dataclass(frozen=True)
class SteadyRun:
    """One allocation simulated in steady state (`SimCheck.steady`): arrivals for `warmup_s` +
    `window_s`, the simulation stopped at the window's end, the mean latency read by Little's law
    over the window (time-average requests in the system ÷ arrivals per second), so neither the
    fill nor the drain enters it and no request needs to finish inside the run."""

    latency_s: float          # mean latency over the window (Little's law)
    throughput_rps: float     # departures per second in the window
    warmup_s: float
    window_s: float
    requests: int             # arrivals simulated (warm-up and window)
    calls: int                # LLM calls simulated
    growth: float             # requests piling up per arrival over the window (≈ 0 in steady state)
    settled: bool             # the warm-up lasted ≥ `SimCheck.steady_warmup` measured latencies and the backlog held

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (a non-finite figure as None)."""
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None
        return {"latency_s": num(self.latency_s), "throughput_rps": num(self.throughput_rps), "warmup_s": self.warmup_s,
                "window_s": self.window_s, "requests": self.requests, "calls": self.calls, "growth": num(self.growth),
                "settled": self.settled}


@dataclass(frozen=True)
class RaceRun:
    """One allocation simulated at one rate in the throughput race."""

    sustainable: bool
    latency_s: float
    throughput_rps: float
    waits: dict[str, float]   # per LLM: admission wait per request (mean queue wait × calls per request)
    calls: int = 0            # LLM calls simulated for the judgement (every run length, every path)


@dataclass
class SimCheck:
    """How the planner checks its allocations in the simulator.

    caps           lower utilisation caps at which the MILP's optimum is also simulated
    alternatives   next-best allocations (other GPU splits) at the planner's cap to simulate
    calls          simulated LLM calls per allocation; requests = calls ÷ calls per request,
                   clamped to [min_requests, max_requests]
    margin         an alternative replaces the optimum only when its simulated mean latency is
                   lower by more than this fraction (simulation noise must not flip the plan)
    delta          GPUs by which some LLM's share must move between two checked allocations,
                   and that a neighbour moves from one LLM to another
    step           throughput goal: the race's rate step, and the precision to which the
                   optimum's sustainable rate is bisected
    max_sims       throughput goal: simulations at most (bisection and race together)
    moves          throughput goal: neighbours of the leader tried at each step
    keep           throughput goal: survivors carried from one step to the next
    paths          throughput goal: sample paths (seeds) per judgement
    quorum         throughput goal: paths that must be sustainable for the judgement to be. Near
                   capacity a heavy-tailed workflow's sample path can carry a load surge late in
                   the run that reads as overload on every allocation alike, or a light one that
                   flatters them; by default the median of three paths decides
    jobs           processes that simulate the latency check's allocations and the throughput
                   goal's contenders of a step (0: one per CPU)
    throughput     run the throughput goal's race at all (off by default: see the module docstring)
    tol_sims       throughput goal, the default tolerance check (`run_tolerance_check`): simulations at
                   most (two a rate: the plan and the allocation of the most predicted capacity)
    tol_calls      ... simulated LLM calls after which it starts no further rate (the note says so); a rate
                   started runs its two judgements to their verdicts, so one rate may run past it. A
                   count of work, not seconds, so the plan does not depend on how busy the machine is
                   (1,000,000: about 120 s on 2 cores here)
    tol_up         ... the rate step up while both allocations sustain the rate
    tol_down       ... the rate step down while neither does
    repair_rounds  ... when the allocation kept refuses a rate step (`tol_down`) below the planned rate: re-plans at most, each
                   with the LLM the simulator found saturated (the most admission wait per request at
                   the rate refused) provisioned for the capacity it showed (`run_repair`; 0: none)
    repair_sims    ... simulations the repair spends at most (one a rate)
    repair_calls   ... simulated LLM calls after which the repair starts no further rate
    steady_warmup  mean latencies of arrivals before the steady-state window. A run of
                   `requests_for` requests is steady when its first tenth spans that many
                   latencies (λ·L requests are in flight, Little's law); when it does not (long
                   requests at a high rate: 32 chained LLMs at 30 rps keep thousands in flight),
                   the check measures each allocation by `steady` instead
    steady_window  mean latencies the steady-state window lasts (at least `min_requests` arrivals)
    steady_calls   simulated LLM calls the steady-state check spends at most: the optimum is
                   always run; the shortlist's next allocations while calls remain (the note
                   says what was not simulated)
    baselines      policies (allocate.policies) whose allocations join the shortlist when they
                   carry the planned rate. The MILP prices each LLM alone; in a step-synchronous
                   workflow a plain split can simulate faster than every allocation the MILP
                   proposes (beam_search on 8 GPUs at 0.57 rps: 4 + 4 whole GPUs at 140 s against
                   the MILP's mixed groups at 149–199 s over three seeds), and the plan must not
                   lose to a baseline it could have run
    """

    alternatives: int = DEFAULT_ALTERNATIVES
    caps: tuple[float, ...] = DEFAULT_CAPS
    calls: int = 300_000
    min_requests: int = 1000
    max_requests: int = 3000
    margin: float = 0.05
    delta: float = 1.0
    seed: int = 0
    step: float = 0.03
    max_sims: int = 24
    moves: int = 4
    keep: int = 3
    paths: int = 3
    quorum: int = 2
    jobs: int = 0
    throughput: bool = False
    tol_sims: int = 8
    tol_calls: int = 1_000_000
    tol_up: float = 0.05
    tol_down: float = 0.12
    repair_rounds: int = 2
    repair_sims: int = 8
    repair_calls: int = 2_000_000
    steady_warmup: float = 1.5
    steady_window: float = 1.0
    steady_calls: int = 300_000
    baselines: tuple[str, ...] = BASELINES

    def requests_for(self, calls_per_request: float) -> int:
        """Requests per simulation for a workflow making `calls_per_request` LLM calls each."""
        n = int(self.calls / max(calls_per_request, 1.0))
        return max(self.min_requests, min(self.max_requests, n))

    def needs_steady(self, planner: "Planner", theta: float, latency_s: float) -> bool:
        """True when the fixed-length run would not leave the transient: its first tenth (the
        part it drops) spans fewer than `steady_warmup` mean latencies at the planned rate."""
        rate = theta * planner.demands[0].weight_rps
        if not (math.isfinite(latency_s) and latency_s > 0 and rate > 0):
            return False
        return 0.1 * self.requests_for(_calls(planner)) < self.steady_warmup * latency_s * rate

    def steady(self, planner: "Planner", choice: Mapping[str, "Candidate"], theta: float,
               latency_s: float, confirm_below: float = math.inf, first: SteadyRun | None = None) -> SteadyRun:
        """`choice` at rate scale θ in steady state (see `SteadyRun`), its warm-up and window sized
        from the mean latency `latency_s` (the predictor's). When the measured latency shows the
        warm-up was shorter than `steady_warmup` latencies, the run is made once more, sized from
        the measured latency — unless it already reads `confirm_below` or more: a run still
        filling reads low (it started empty), so such an allocation is slower than that anyway.
        `first`: the first run, made already (side by side with another, `run_steady_check`)."""
        run = first if first is not None else _steady_run(self.steady_job(planner, choice, theta, latency_s))
        if (not run.settled and math.isfinite(run.latency_s) and run.latency_s > latency_s
                and run.latency_s < confirm_below):
            again = _steady_run(self.steady_job(planner, choice, theta, run.latency_s))
            run = replace(again, calls=again.calls + run.calls)
        return run

    def steady_job(self, planner: "Planner", choice: Mapping[str, "Candidate"], theta: float,
                   latency_s: float) -> tuple[Any, ...]:
        """The arguments of one steady-state run (`_steady_run`, picklable for a process pool)."""
        wf, alloc, gpu, models, rate, _, seed = _race_job(planner, choice, theta * planner.demands[0].weight_rps, self)
        warm = self.steady_warmup * latency_s
        window = max(self.steady_window * latency_s, self.min_requests / rate)
        return wf, alloc, gpu, models, rate, seed, warm, window, self.steady_warmup

    def skip_reason(self, planner: "Planner") -> str | None:
        """Why the check cannot run on this planner's input, or None."""
        if len(planner.demands) != 1:
            return "the simulator check runs one workflow at a time; with several workflows it is off"
        dm = planner.demands[0]
        if dm.seqs is None:
            return "the simulator check needs the workflow's program; planning from a trace, it is off"
        if any(src.profiles_dir is not None for src, _ in planner.sources.values()):
            return "the simulator check models engines, not measured profiles; with --profiles it is off"
        return None

    def unjudgeable(self, planner: "Planner", theta: float, latency_s: float) -> str | None:
        """Why the throughput goal's judgements cannot read a plan at rate scale θ (predicted mean latency
        `latency_s`), or None. The judge (sim.capacity.judge) reads the backlog of runs it lengthens up to
        `longest_judged_run` requests; a run whose arrivals do not span the steady state's warm-up and
        window (`steady_warmup` + `steady_window` latencies, as the latency check's steady runs) reads
        the transient, not the rate (32 chained LLMs at 176 rps with 280 s latencies keep ~49,000
        requests in flight: more than the longest run)."""
        from scepsy_hpc.sim.capacity import longest_judged_run

        rate = theta * planner.demands[0].weight_rps
        if not (math.isfinite(latency_s) and latency_s > 0 and rate > 0):
            return None
        spans = self.steady_warmup + self.steady_window
        need = spans * rate * latency_s
        longest = longest_judged_run(self.requests_for(_calls(planner)))
        if need <= longest:
            return None
        return (f"simulator check: not run: at the planned {rate:.3g} rps the plan keeps ~{rate * latency_s:,.0f} requests in "
                f"flight (predicted latency {latency_s:.3g} s); judging the rate needs runs spanning {spans:g} latencies "
                f"(~{need:,.0f} requests) and the judge's stop at {longest:,}: the capacity is the predictor's, unchecked "
                f"(`scepsy simulate` with --requests {10 * int(need):d} or more checks it)")

    def simulate(self, planner: "Planner", choice: Mapping[str, "Candidate"], theta: float) -> tuple[float, float]:
        """(simulated mean latency, completed requests/s) of `choice` at rate scale θ."""
        return _sim_run(_race_job(planner, choice, theta * planner.demands[0].weight_rps, self))

    def simulate_all(self, planner: "Planner", choices: Sequence[Mapping[str, "Candidate"]],
                     theta: float) -> list[tuple[float, float]]:
        """`simulate` of each of `choices`, the same figures, in `jobs` processes (0: one per CPU) when
        there are several; in turn when there is one CPU or processes cannot start here."""
        n = min(len(choices), self.jobs or os.cpu_count() or 1)
        if n > 1:
            from concurrent.futures import ProcessPoolExecutor

            rate = theta * planner.demands[0].weight_rps
            try:
                with ProcessPoolExecutor(max_workers=n) as ex:
                    return list(ex.map(_sim_run, [_race_job(planner, c, rate, self) for c in choices]))
            except (OSError, RuntimeError):   # no processes here (a sandbox, a broken pool): in turn
                pass
        return [self.simulate(planner, c, theta) for c in choices]

    def race(self, planner: "Planner", choices: Sequence[Mapping[str, "Candidate"]], rate_rps: float,
             paths: int | None = None, quorum: int | None = None) -> list[RaceRun]:
        """Each of `choices` simulated at `rate_rps` (requests/s of the one workflow) on `paths`
        sample paths (default `self.paths`), sustainable when at least `quorum` (default `self.quorum`)
        of them are (sim.capacity.judge); the runs go to `jobs` processes when there are several."""
        n_paths = self.paths if paths is None else paths
        need = self.quorum if quorum is None else quorum
        jobs = [_race_job(planner, c, rate_rps, self, k) for c in choices for k in range(n_paths)]
        n = min(len(jobs), self.jobs or os.cpu_count() or 1)
        if n <= 1:
            runs = [_race_run(j) for j in jobs]
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=n) as ex:
                runs = list(ex.map(_race_run, jobs))
        out = []
        for i in range(len(choices)):
            each = runs[i * n_paths:(i + 1) * n_paths]
            out.append(RaceRun(sum(r.sustainable for r in each) >= need, sum(r.latency_s for r in each) / len(each),
                               sum(r.throughput_rps for r in each) / len(each),
                               {m: sum(r.waits.get(m, 0.0) for r in each) / len(each) for m in each[0].waits},
                               sum(r.calls for r in each)))
        return out


def shortlist(planner: "Planner", best: "Outcome", check: SimCheck) -> list[tuple[str, dict[str, "Candidate"]]]:
    """(label, allocation) to simulate, duplicates dropped (see `shortlist_timed`)."""
    return shortlist_timed(planner, best, check)[0]


def shortlist_timed(planner: "Planner", best: "Outcome", check: SimCheck) -> tuple[list[tuple[str, dict[str, "Candidate"]]], float]:
    """(the shortlist, `best.solve_time_s` plus the solve time of the MILPs that made it). The shortlist:
    - the MILP's optimum;
    - its optimum with every LLM held to each lower utilisation cap of `check.caps`, and with one
      LLM at a time held to the lowest (the predictor is optimistic under bursty load, so the check
      tries more headroom);
    - each of those with every LLM's GPUs spread over more, smaller instances (the smallest tp that
      fits memory): a burst of calls that lands on few large instances queues longer than the
      Poisson-fed profile says, and the simulator sees it;
    - the allocations of the baseline policies `check.baselines` that carry the rate (`baseline`);
    - the `check.alternatives` next-best allocations at the planner's cap that split the GPUs
      differently (constraint (7))."""
    solve = [best.solve_time_s]
    items = list(iter_shortlist(planner, best, check, solve))
    return items, solve[0]


def iter_shortlist(planner: "Planner", best: "Outcome", check: SimCheck,
                   solve_time_s: list[float]) -> Iterator[tuple[str, dict[str, "Candidate"]]]:
    """The shortlist of `shortlist_timed`, made lazily in its order (each entry's MILP is solved
    when the entry is asked for); the MILPs' solve time is added to `solve_time_s[0]`."""
    from scepsy_hpc.allocate.candidates import prune_by_bound
    from scepsy_hpc.allocate.milp import choice_key, solve
    from scepsy_hpc.errors import InfeasibleError, SolverError

    seen: set[tuple[Any, ...]] = set()
    made: list[tuple[str, dict[str, "Candidate"]]] = []

    def fresh(label: str, choice: Mapping[str, "Candidate"] | None) -> bool:
        if choice is None or choice_key(choice) in seen:
            return False
        seen.add(choice_key(choice))
        made.append((label, dict(choice)))
        return True

    budget = {planner.gpu_name: planner.n_gpus}

    def milp(cands: Mapping[str, list["Candidate"]], exclude: list[dict[str, float]]) -> dict[str, "Candidate"] | None:
        if not exclude:  # candidates that cannot be optimal go (allocate.candidates.prune_by_bound)
            cands = prune_by_bound(cands, planner.n_gpus, planner.fits)
        try:
            res = solve(cands, budget, time_limit_s=planner.time_limit_s, gap=planner.gap,
                        domain_caps=planner.domain_caps, exclude=exclude, delta=check.delta)
        except (InfeasibleError, SolverError):
            return None
        solve_time_s[0] += res.solve_time_s
        return dict(res.choice)

    theta = best.theta
    if fresh("optimum", best.choice):
        yield made[-1]
    paths = {i: best.predictions[dm.wf.name].paths for i, dm in enumerate(planner.demands)}
    caps = [c for c in check.caps if c < planner.max_util - 1e-9]
    loads = planner.loads(theta)

    def holds(m: str, cap: float) -> bool:
        """The optimum's entry of `m` is a candidate at utilisation cap `cap` too: a single configuration
        whose capacity carries the load at `cap`. Then a MILP that only lowers caps finds the optimum
        again (its feasible set shrank around it), so it need not be solved. A mixed group is not known
        to be among the capped candidates (they are made around the capped base), so it is solved."""
        c = best.choice[m]
        return not c.more and loads.get(m, 0.0) <= cap * c.capacity_rps * (1 + 1e-9)

    for cap in caps:
        if all(holds(m, cap) for m in best.choice):
            continue
        if fresh(f"cap {cap:.0%}", milp(planner.latency_candidates(theta, paths, max_util=cap), [])):
            yield made[-1]
    low = [d for d in planner.deployments if d in best.choice and not holds(d, min(caps))] if caps else []
    if low and len(planner.deployments) > 1:
        loose = planner.latency_candidates(theta, paths)
        tight = planner.latency_candidates(theta, paths, max_util=min(caps))
        for d in low:
            if fresh(f"{d} at {min(caps):.0%}", milp({m: (tight[m] if m == d else cs) for m, cs in loose.items()}, [])):
                yield made[-1]
    for label, choice in list(made):
        if fresh(f"{label}, spread", spread_out(planner, choice, theta)):
            yield made[-1]
    for name in check.baselines:
        if fresh(f"{name} split", baseline(planner, name, theta)):
            yield made[-1]
    shares = [{m: c.gpus for m, c in best.choice.items()}]
    for k in range(check.alternatives):
        got = milp(best.priced, shares)  # type: ignore[arg-type]
        if got is None:
            break
        if fresh(f"split {k + 2}", got):
            yield made[-1]
        shares.append({m: c.gpus for m, c in got.items()})


def baseline(planner: "Planner", policy: str, theta: float) -> dict[str, "Candidate"] | None:
    """The allocation of baseline `policy` at rate scale θ when it carries that rate (every LLM's
    predicted utilisation under 100%); None when it does not, or cannot fit."""
    from scepsy_hpc.allocate import policies
    from scepsy_hpc.errors import InfeasibleError

    try:
        o = policies.plan_at(planner, policy, theta)
    except InfeasibleError:
        return None
    if o.status == "under-capacity" or any(lp.utilisation >= 1.0 for pr in o.predictions.values()
                                           for lp in pr.per_llm.values()):
        return None
    return dict(o.choice)


def spread_out(planner: "Planner", choice: Mapping[str, "Candidate"], theta: float) -> dict[str, "Candidate"] | None:
    """`choice` with each whole-GPU deployment's GPUs as instances of the smallest tp that fits its
    memory and carries its load at the planner's cap; None when nothing changes."""
    from scepsy_hpc.allocate.milp import Candidate

    loads = planner.loads(theta)
    out, changed = dict(choice), False
    for m, c in choice.items():
        if c.gpu_frac < 1.0 or c.tp == 1 or c.more:   # a mixed group keeps its shape
            continue
        for cfg in sorted(planner.deployments[m].configs, key=lambda k: k.tp):
            if cfg.gpu_frac < 1.0 or cfg.tp >= c.tp or cfg.profile is None:
                continue
            r = c.tp * c.replicas // cfg.tp
            mu = cfg.profile.capacity_rps
            if r * mu * planner.max_util >= loads[m]:
                out[m] = Candidate(c.gpu, cfg.tp, 1.0, r, 0.0, r * mu)
                changed = True
            break
    return out if changed else None


def run_check(planner: "Planner", check: SimCheck, best: "Outcome", goal: str = "latency") -> "Outcome":
    """Simulate `best` (the milp policy's Outcome) and its shortlist at its rate scale; return the
    Outcome to keep (see the module docstring), a new value. `goal` "throughput" runs `run_throughput_check`."""
    why = check.skip_reason(planner)
    if why is None and goal == "throughput":
        why = check.unjudgeable(planner, best.theta, best.latency_s)
    if why is not None:
        return best.noted(why)
    if goal == "throughput" and not check.throughput:
        return run_tolerance_check(planner, check, best)
    if best.priced is None:   # the MILP's candidates, which the shortlist is made from (not for mixed groups)
        if goal == "throughput":
            return run_tolerance_check(planner, check, best.noted(
                "simulator check: the throughput race starts from the one-configuration MILP's candidates and this plan "
                "is mixed groups (the counts MILP's); the tolerance check ran instead"))
        return best
    if goal == "throughput":
        return run_throughput_check(planner, check, best)
    t0 = time.perf_counter()
    theta = best.theta
    if check.needs_steady(planner, theta, best.latency_s):
        return run_steady_check(planner, check, best)
    checked = []
    items, solve_time_s = shortlist_timed(planner, best, check)
    best = replace(best, solve_time_s=solve_time_s)
    planner.progress(f"simulator check: {len(items)} allocations ({', '.join(label for label, _ in items)})")
    sims = check.simulate_all(planner, [choice for _, choice in items], theta)
    for (label, choice), (lat, thr) in zip(items, sims):
        pred = sum(p.latency_s for p in planner.evaluate(choice, theta).values())
        checked.append(Checked(label, choice, pred, lat, thr))
    base = checked[0]
    win = min(checked, key=lambda c: c.simulated_s)
    elapsed = time.perf_counter() - t0
    out, kept = best, base
    if win is not base and win.simulated_s < base.simulated_s * (1 - check.margin):
        out, kept = _outcome(planner, best, dict(win.choice), theta), win
        out = out.noted(f"simulator check: the MILP's optimum simulates at {base.simulated_s:.3g} s mean latency; "
                         f"the {win.label} allocation simulates at {win.simulated_s:.3g} s and is kept "
                         f"({len(checked)} allocations, {check.requests_for(_calls(planner))} requests each, {elapsed:.1f} s)")
    else:
        others = min((c.simulated_s for c in checked[1:]), default=math.nan)
        out = out.noted(f"simulator check: the MILP's optimum simulates at {base.simulated_s:.3g} s mean latency, "
                         f"the best of {len(checked) - 1} others at {others:.3g} s; kept "
                         f"({check.requests_for(_calls(planner))} requests each, {elapsed:.1f} s)")
    out = _trust(out, kept.simulated_s, f"the simulation ({check.requests_for(_calls(planner))} requests)")
    return replace(out, checked=tuple(checked), check_time_s=elapsed)


LOOKAHEAD = 4   # shortlist entries the steady-state check ranks by predicted latency before it runs any


def run_steady_check(planner: "Planner", check: SimCheck, best: "Outcome") -> "Outcome":
    """The latency check when a fixed-length run would not leave the transient (`SimCheck.needs_steady`):
    the shortlist's allocations in its order, each simulated in steady state (`SimCheck.steady`)
    while `check.steady_calls` simulated calls last (the optimum always), the same margin rule as
    `run_check`. The notes say how many allocations were simulated and how long each run was,
    and, when the predicted and the steady-state latency of the kept plan differ by more than
    15%, which figure the plan trusts: the simulator's (it runs the program on every engine at
    once; the predictor prices each LLM alone by its Poisson-fed profile)."""
    t0 = time.perf_counter()
    theta = best.theta
    solve = [best.solve_time_s]
    checked: list[Checked] = []
    spent = 0
    items = iter_shortlist(planner, best, check, solve)
    # the optimum and the first alternative are run side by side when there are CPUs for it: the rest
    # in turn, while the budget lasts (two runs made side by side are both kept: their time is spent)
    # The budget holds few runs at this size, so the first alternatives are the likeliest to win: of
    # the next `LOOKAHEAD` entries of the shortlist, in order of predicted latency.
    opt = next(items)
    ahead = [(sum(p.latency_s for p in planner.evaluate(c, theta).values()), k, (label, c))
             for k, (label, c) in enumerate(itertools.islice(items, LOOKAHEAD))]
    ahead.sort(key=lambda a: (a[0], a[1]))
    head_items = [opt] + [a[2] for a in ahead[:1]]
    preds = [best.latency_s] + [a[0] for a in ahead[:1]]
    items = itertools.chain((a[2] for a in ahead[1:]), items)
    firsts: list[SteadyRun | None] = [None] * len(head_items)
    if len(head_items) == 2:
        planner.progress("simulator check (steady state): " + ", ".join(label for label, _ in head_items))
        got = _side_by_side(check, [check.steady_job(planner, c, theta, pr) for (_, c), pr in zip(head_items, preds)])
        if got is not None:
            firsts = list(got)
    # the rest of the shortlist stays lazy: each entry's MILP is solved only when the budget reaches it
    queue = itertools.chain(((label, c, pr, f) for (label, c), pr, f in zip(head_items, preds, firsts)),
                            ((label, c, None, None) for label, c in items))
    for label, choice, pred, first in queue:
        if pred is None:
            pred = sum(p.latency_s for p in planner.evaluate(choice, theta).values())
        if first is None:
            planner.progress(f"simulator check (steady state): {label}")
        # an alternative is confirmed (run again when it had not settled) only if it may beat the optimum
        # and the budget holds another run; unconfirmed, its reading is a lower bound and cannot win
        per_run = first.calls if first is not None else spent / max(len(checked), 1)
        room = spent + (0 if first is not None else per_run) + per_run <= check.steady_calls
        run = (check.steady(planner, choice, theta, pred, first=first) if not checked else
               check.steady(planner, choice, theta, pred,
                            confirm_below=checked[0].simulated_s * (1 - check.margin) if room else -math.inf,
                            first=first))
        spent += run.calls
        checked.append(Checked(label, choice, pred, run.latency_s, run.throughput_rps, steady=run.to_dict()))
        if spent + spent / len(checked) > check.steady_calls:   # the next run (as long as the average) would pass it
            break
    more = next(queue, None) is not None
    best = replace(best, solve_time_s=solve[0])
    base = checked[0]
    # an alternative still filling reads low (it started empty): only a settled one may win
    win = min((c for c in checked if c is base or (c.steady or {}).get("settled", True)),
              key=lambda c: c.simulated_s if math.isfinite(c.simulated_s) else math.inf)
    elapsed = time.perf_counter() - t0
    st = base.steady or {}
    how = (f"steady state: {st.get('warmup_s', 0):.0f} s of warm-up, {st.get('window_s', 0):.0f} s measured "
           f"by Little's law, {st.get('calls', 0)} calls")
    out, kept = best, base
    if win is not base and win.simulated_s < base.simulated_s * (1 - check.margin):
        out, kept = _outcome(planner, best, dict(win.choice), theta), win
        out = out.noted(f"simulator check: the MILP's optimum simulates at {base.simulated_s:.3g} s mean latency; "
                        f"the {win.label} allocation simulates at {win.simulated_s:.3g} s and is kept "
                        f"({len(checked)} allocations, {how}; {elapsed:.1f} s)")
    else:
        others = min((c.simulated_s for c in checked[1:]), default=math.nan)
        rest = f", the best of {len(checked) - 1} others at {others:.3g} s" if len(checked) > 1 else ""
        out = out.noted(f"simulator check: the MILP's optimum simulates at {base.simulated_s:.3g} s mean latency{rest}; "
                        f"kept ({how}; {elapsed:.1f} s)")
    if more:
        out = out.noted(f"simulator check: {len(checked)} of the shortlisted allocations simulated; the others "
                        f"(lower utilisation caps, spread instances, the baselines' splits, other GPU splits) were not: "
                        f"a steady-state run of "
                        f"this workflow takes ~{spent // len(checked)} simulated calls and the check spends at most "
                        f"{check.steady_calls}")
    if not (kept.steady or {}).get("settled", True):
        out = out.noted(f"simulator check: the {kept.label} allocation's run did not settle (its backlog still moved "
                        f"by {_growth(kept):.1%} of the arrivals over the window); "
                        f"its simulated latency is a lower bound")
    out = _trust(out, kept.simulated_s, "the steady-state simulation")
    return replace(out, checked=tuple(checked), check_time_s=elapsed)


def _trust(out: "Outcome", sim: float, what: str) -> "Outcome":
    """`out` with a note saying which latency to trust when the predicted and the simulated one of the
    kept plan differ by more than 15%."""
    pred = out.latency_s
    if math.isfinite(sim) and sim > 0 and abs(pred / sim - 1) > 0.15:
        out = out.noted(f"latency: the predictor says {pred:.3g} s, {what} {sim:.3g} s "
                        f"({pred / sim:.2f}×); trust the simulation: it runs the workflow's program on every engine "
                        f"at once, where the predictor prices each LLM alone by its Poisson-fed profile")
    return out


def _steady_run(job: tuple[Any, ...]) -> SteadyRun:
    """One steady-state run (`SimCheck.steady`): arrivals for the warm-up and the window, the simulation
    stopped at the window's end, the mean latency by Little's law over the window."""
    from scepsy_hpc.sim.core import simulate

    wf, alloc, gpu, models, rate, seed, warm, window, warmup_latencies = job
    end = warm + window
    n = int(math.ceil(rate * end * 1.2)) + 50   # arrivals past `end` are never reached
    res = simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=n, seed=seed, horizon_s=end)
    area, arrived, departed, in0, in1 = 0.0, 0, 0, 0, 0
    for r in res.request_records:
        done = r.t_end if r.t_end >= 0 else math.inf
        lo, hi = max(r.t_arrive, warm), min(done, end)
        if hi > lo:
            area += hi - lo
        arrived += warm <= r.t_arrive < end
        departed += warm <= done <= end
        in0 += r.t_arrive <= warm < done
        in1 += r.t_arrive <= end < done
    lat = area / arrived if arrived else math.nan
    growth = (in1 - in0) / arrived if arrived else math.inf
    settled = math.isfinite(lat) and warm >= warmup_latencies * lat * 0.9 and growth <= 0.05
    return SteadyRun(lat, departed / window, warm, window, len(res.request_records), res.llm_calls, growth, settled)


def _side_by_side(check: SimCheck, jobs: Sequence[tuple[Any, ...]]) -> list[SteadyRun] | None:
    """The first runs of several allocations in processes (one per CPU, at most `check.jobs`); None
    when there is one CPU or one job (then each runs in turn)."""
    n = min(len(jobs), check.jobs or os.cpu_count() or 1)
    if n <= 1:
        return None
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(max_workers=n) as ex:
            return list(ex.map(_steady_run, jobs))
    except (OSError, RuntimeError):   # no processes here (a sandbox, a broken pool): in turn
        return None


def _growth(c: Checked) -> float:
    g = (c.steady or {}).get("growth")
    return math.nan if g is None else float(g)


def neighbours(planner: "Planner", choice: Mapping[str, "Candidate"], delta: float,
               waits: Mapping[str, float] | None = None) -> list[tuple[str, dict[str, "Candidate"]]]:
    """Allocations one move from `choice`: at least `delta` GPUs' worth of instances taken from
    one LLM (keeping one) and as many instances as then pack given to another, both keeping their
    instance size. Each fits the GPUs and the NVLink domain caps. Ordered by how much more
    admission wait per request (`waits`, from a simulation) the receiving LLM had than the giving
    one: the move most likely to help comes first."""
    waits = waits or {}
    live = [m for m in choice if planner.deployments[m].calls > 0]
    out = []
    live = [m for m in live if not choice[m].more]   # moves keep an instance size: not for a mixed group
    for a in live:
        ca = choice[a]
        k = max(1, math.ceil(delta / (ca.tp * ca.gpu_frac) - 1e-9))
        if ca.replicas <= k:
            continue
        for b in live:
            if b == a:
                continue
            new = dict(choice)
            new[a] = _with_replicas(ca, ca.replicas - k)
            cb, added = choice[b], 0
            while planner.fits({**new, b: _with_replicas(cb, cb.replicas + added + 1)}):
                added += 1
            if added == 0:
                continue
            new[b] = _with_replicas(cb, cb.replicas + added)
            out.append((waits.get(b, 0.0) - waits.get(a, 0.0), f"{a} → {b}", new))
    out.sort(key=lambda t: -t[0])
    return [(label, c) for _, label, c in out]


def run_tolerance_check(planner: "Planner", check: SimCheck, best: "Outcome") -> "Outcome":
    """The max-throughput goal's default check. The milp plan is the lowest-latency allocation whose
    predicted capacity is within `throughput_tol` of the most (`best.top_choice`, the allocation of the
    most predicted capacity): two allocations the predictor cannot tell apart in capacity, and the
    predictor over-rates some shapes (small fractional replicas serving long conversations) by far more
    than that. So when they differ, both are judged (sim.capacity.judge, one sample path, the same
    for both) at the planned rate, then up by `tol_up` while both sustain it or down by `tol_down`
    while neither does, until one sustains a rate the other refuses: the plan is kept unless it is the
    one refused, and the allocation of the most capacity replaces it then. Both falling at the same
    step, or the budget (`tol_sims` simulations, `tol_calls` simulated calls) running out, keeps the plan."""
    from scepsy_hpc.allocate.milp import choice_key

    top = best.top_choice
    if top is None or choice_key(top) == choice_key(best.choice):
        return run_capacity_check(planner, check, best)
    t0 = time.perf_counter()
    w = planner.demands[0].weight_rps
    theta = best.theta
    rows = [Checked("plan", dict(best.choice), best.latency_s, math.nan, 0.0, 0.0, None),
            Checked("most capacity", dict(top), sum(p.latency_s for p in planner.evaluate(top, theta).values()),
                    math.nan, 0.0, 0.0, None)]
    rate, way, sims, verdict, spent = theta * w, 0, 0, None, 0
    tried = rate   # the last rate both were judged at
    refusals: list[dict[str, float]] = [{}, {}]   # per row: the admission waits of its run at the rate it refused
    while sims + 2 <= check.tol_sims and spent < check.tol_calls:
        planner.progress(f"simulator check (tolerance): the plan and the allocation of the most capacity at {rate:.3g} rps")
        runs = check.race(planner, [r.choice for r in rows], rate, paths=1, quorum=1)
        sims += 2
        spent += sum(run.calls for run in runs)
        tried = rate
        for r, run in zip(rows, runs):
            if r.record(rate, run):
                refusals[rows.index(r)] = run.waits
        held = [run.sustainable for run in runs]
        if held[0] != held[1]:
            verdict = "top" if held[1] else "plan"
            break
        if (held[0] and way < 0) or (not held[0] and way > 0):
            verdict = "tie"
            break
        way = 1 if held[0] else -1
        rate = rate * (1 + check.tol_up) if held[0] else rate / (1 + check.tol_down)
    elapsed = time.perf_counter() - t0
    plan_row, top_row = rows
    pred_top = planner.throughput_scale(planner.evaluate(top, theta)) * w
    pred_plan = planner.throughput_scale(best.predictions) * w
    what = (f"the plan (predicted capacity {pred_plan:.3g} rps) against the allocation of the most predicted capacity "
            f"({pred_top:.3g} rps)")
    how = f"{sims} runs, {spent:,} calls, {elapsed:.1f} s"
    if verdict == "top":
        out = _outcome(planner, best, dict(top), theta).noted(
            f"simulator check (tolerance): {what}: the plan does not sustain {rate:.3g} rps in the simulator where "
            f"the allocation of the most capacity does; that allocation is kept ({how})")
    elif verdict == "plan":
        out = best.noted(f"simulator check (tolerance): {what}: the plan sustains {rate:.3g} rps in the simulator "
                         f"where the other does not; kept ({how})")
    elif verdict == "tie":
        held_rate = rate / (1 + check.tol_up) if way > 0 else rate
        out = best.noted(f"simulator check (tolerance): {what}: both sustain {held_rate:.3g} rps in the simulator and "
                         f"neither {held_rate * (1 + (check.tol_up if way > 0 else check.tol_down)):.3g}; the plan kept ({how})")
    else:
        span = (f"no rate from {theta * w:.3g} to {tried:.3g} rps told them apart" if abs(tried - theta * w) > 1e-12
                else f"{tried:.3g} rps did not tell them apart")
        out = best.noted(f"simulator check (tolerance): {what}: {span} within {check.tol_sims} runs / "
                         f"{check.tol_calls:,} simulated calls; the plan kept ({how})")
    kept = top_row if verdict == "top" else plan_row
    return _repair_and_say(planner, check, out, kept, refusals[rows.index(kept)], [plan_row, top_row], theta, t0)


def run_capacity_check(planner: "Planner", check: SimCheck, best: "Outcome") -> "Outcome":
    """The tolerance check when the plan is the allocation of the most predicted capacity (nothing to tell
    apart): does it carry the rate planned? It is judged (one sample path) at the planned rate, and down by
    `tol_down` once while it refuses; when it refuses that too (a rate step short: an LLM the predictor
    over-rates), `run_repair` runs as after the two-allocation check. The same budgets (`tol_sims`,
    `tol_calls`); the notes say what held."""
    t0 = time.perf_counter()
    w = planner.demands[0].weight_rps
    theta = best.theta
    planned = theta * w
    row = Checked("plan", dict(best.choice), best.latency_s, math.nan, 0.0, 0.0, None)
    rate, sims, spent, waits = planned, 0, 0, {}
    while sims < check.tol_sims and spent < check.tol_calls:
        planner.progress(f"simulator check (capacity): the plan at {rate:.3g} rps")
        run = check.race(planner, [row.choice], rate, paths=1, quorum=1)[0]
        sims += 1
        spent += run.calls
        if row.record(rate, run):
            waits = run.waits
        if run.sustainable:
            break
        if rate <= planned / (1 + check.tol_down) * (1 + 1e-9):
            break
        rate /= 1 + check.tol_down
    how = f"{sims} run{'s' if sims != 1 else ''}, {spent:,} calls, {time.perf_counter() - t0:.1f} s"
    pred = planner.throughput_scale(best.predictions) * w
    what = f"the plan (the allocation of the most predicted capacity, {pred:.3g} rps)"
    if row.sustained_rps and row.refused_rps is None:
        out = best.noted(f"simulator check (capacity): {what} sustains the {planned:.3g} rps planned in the simulator ({how})")
    elif row.sustained_rps:
        out = best.noted(f"simulator check (capacity): {what} refuses the {row.refused_rps:.3g} rps planned in the "
                         f"simulator and sustains {row.sustained_rps:.3g} ({how})")
    elif row.refused_rps is not None and row.refused_rps < planned * (1 - 1e-9):
        out = best.noted(f"simulator check (capacity): {what} refuses {planned:.3g} rps (planned) and "
                         f"{row.refused_rps:.3g} rps in the simulator ({how})")
    elif row.refused_rps is not None:   # refused the planned rate, and the budget ended before a step down
        out = best.noted(f"simulator check (capacity): {what} refuses the {planned:.3g} rps planned in the simulator; "
                         f"the budget ({check.tol_sims} runs / {check.tol_calls:,} simulated calls) ended before a rate "
                         f"step down ({how})")
    else:
        row.sustained_rps = None   # nothing tried
        out = best.noted(f"simulator check (capacity): {what}: no run within {check.tol_sims} runs / {check.tol_calls:,} "
                         f"simulated calls ({how})")
    return _repair_and_say(planner, check, out, row, waits, [row], theta, t0)


def _repair_and_say(planner: "Planner", check: SimCheck, out: "Outcome", kept: Checked, waits: Mapping[str, float],
                    checked: list[Checked], theta: float, t0: float) -> "Outcome":
    """After the tolerance (or capacity) check kept `kept` (`waits`: the admission waits of its run at the rate
    it refused): the repair when it falls a rate step short of the planned rate, then a note when what is kept
    does not hold the rate planned; `checked`: the rows judged so far."""
    w = planner.demands[0].weight_rps
    planned = theta * w
    checked = list(checked)
    # the repair, when the allocation kept falls a rate step or more short of the planned rate (it refuses
    # planned ÷ (1 + tol_down) too): a shortfall that size is an LLM the predictor over-rates, not noise
    if (check.repair_rounds > 0 and kept.refused_rps is not None
            and kept.refused_rps <= planned / (1 + check.tol_down) * (1 + 1e-9)):
        base = out
        kept, repairs, note = run_repair(planner, check, kept, waits, theta)
        checked += repairs
        if kept in repairs:   # planned at its predicted capacity's cap, as the race does, at most the rate planned before
            top_new = planner.throughput_scale(planner.evaluate(kept.choice, theta))
            theta_new = min(theta, top_new * planner.max_util)
            base = _outcome(planner, base, dict(kept.choice), theta_new)
            planned = theta_new * w
        if note:
            out = base.noted(note)
    if kept.refused_rps is not None and kept.refused_rps <= planned * (1 + 1e-9):
        held = (f"sustains {kept.sustained_rps:.3g} rps" if kept.sustained_rps else
                f"sustains less than {kept.refused_rps:.3g} rps")
        capacity = planner.throughput_scale(out.predictions) * w
        share = f"{planned / capacity:.0%} of its predicted capacity" if capacity > 0 else "its predicted capacity"
        out = out.noted(f"throughput: the kept allocation {held} in the simulator, short of the {planned:.3g} rps planned "
                        f"({share}); trust the simulation: it runs the workflow's "
                        f"program on every engine at once, where the predictor prices each LLM alone")
    return replace(out, checked=tuple(checked), check_time_s=time.perf_counter() - t0)


def run_repair(planner: "Planner", check: SimCheck, kept: Checked, waits: Mapping[str, float],
               theta: float) -> tuple[Checked, list[Checked], str]:
    """The tolerance check's repair, when the allocation `kept` refuses the planned rate in the simulator.
    The predictor prices each LLM alone; where an LLM loses in the workflow what its profile assumed
    (its prefix hits, when the conversations in flight outgrow its KV cache under load), the MILP gives
    it too little. The LLM with the most admission wait per request in `kept`'s refused run (`waits`) is
    taken as the one short. When no rate `kept` held is known, `kept` is judged down by `tol_down` until
    it holds one; the LLM saturated midway between that rate and the one refused, f × the rate its
    predicted capacity carries. It is provisioned for 1 / f times its calls (`Planner.derated`; factors
    kept across rounds) and the max-throughput MILP solved again. The new allocation is judged from the
    rate `kept` refused, down by `tol_down` while it refuses: it wins at the first rate it holds above
    what `kept` held by a rate step (`tol_up`; the steps down stop there), and loses when it refuses that
    one (a tie is no gain: `kept` stays). A winner is judged up by `tol_up` while it holds, short of a rate it already refused, replaces
    `kept`, and the next round starts from its refusal. At most
    `repair_rounds` re-plans, `repair_sims` judgements and `repair_calls` simulated calls. Returns the
    allocation kept, the rows judged, and the note ("" when nothing was tried)."""
    from scepsy_hpc.allocate import policies
    from scepsy_hpc.allocate.milp import choice_key
    from scepsy_hpc.errors import InfeasibleError, SolverError

    t0 = time.perf_counter()
    w = planner.demands[0].weight_rps
    factors: dict[str, float] = {}
    seen = {choice_key(kept.choice)}
    rows: list[Checked] = []
    said: list[str] = []
    sims = spent = 0
    refusal: dict[int, dict[str, float]] = {id(kept): dict(waits)}   # per row: the waits of the run it refused

    def room() -> bool:
        return sims < check.repair_sims and spent < check.repair_calls

    def judge(r: Checked, rate: float) -> bool:
        """`r` judged at `rate` (one sample path), recorded on it."""
        nonlocal sims, spent
        planner.progress(f"simulator check (repair): {r.label} at {rate:.3g} rps")
        run = check.race(planner, [r.choice], rate, paths=1, quorum=1)[0]
        sims += 1
        spent += run.calls
        if r.record(rate, run):
            refusal[id(r)] = run.waits
        return run.sustainable

    cur = kept
    for _ in range(check.repair_rounds):
        cur_waits = refusal.get(id(cur), {})
        if cur.refused_rps is None or not cur_waits or not room():
            break
        queued = {m: v for m, v in cur_waits.items() if math.isfinite(v) and v > 0}   # NaN: no call of it ran
        if not queued:   # no LLM queued calls: nothing names the one short
            break
        llm = max(queued, key=lambda m: queued[m])
        rate = cur.refused_rps
        while not cur.sustained_rps and room():   # what it does hold: down until it holds
            rate /= 1 + check.tol_down
            judge(cur, rate)
        if not cur.sustained_rps:
            said.append(f"{llm} queued most, but no rate the allocation holds was found within the budget")
            break
        dep = planner.dep_of[0, llm]
        at = 0.5 * (cur.sustained_rps + cur.refused_rps)
        calls = planner.deployments[dep].calls
        if not calls > 0:   # the planner's sampled programs never call it: nothing to provision it by
            said.append(f"{llm} queued most, but the planner's programs do not call it: no re-plan")
            break
        predicted = cur.choice[dep].capacity_rps / calls * w   # what its predicted capacity carries
        f = at / predicted if predicted > 0 else 1.0
        if not f < 1 - check.tol_up:   # not short of its prediction by more than a rate step: nothing to correct
            said.append(f"{llm} saturates near {at:.3g} rps, not a rate step short of its predicted {predicted:.3g}: "
                        "no re-plan")
            break
        factors[dep] = max(factors.get(dep, 1.0), 1 / f)
        try:
            alt = policies.max_throughput(planner.derated(factors), "milp")
        except InfeasibleError:
            said.append(f"no allocation carries {llm} at {f:.2f}× its predicted capacity")
            break
        except SolverError as e:   # the re-plan is optional: the allocation kept stands
            said.append(f"re-planning with {llm} at {f:.2f}× its predicted capacity failed ({e})")
            break
        key = choice_key(alt.choice)
        if key in seen:
            said.append(f"{llm} at {f:.2f}× its predicted capacity: the MILP gives the same allocation")
            break
        seen.add(key)
        pred = sum(p.latency_s for p in planner.evaluate(alt.choice, theta).values())
        row = Checked(f"repair: {llm} at {f:.2f}× its predicted capacity", dict(alt.choice), pred, math.nan, 0.0, 0.0, None)
        rows.append(row)
        # it wins only by holding a rate step above what `cur` holds (a tie is no gain), so the steps down
        # from `cur`'s refusal stop at that rate
        rate, won = cur.refused_rps, None
        gain = cur.sustained_rps * (1 + check.tol_up)
        while won is None and room():
            if judge(row, rate):
                won = True
            elif rate <= gain * (1 + 1e-9):
                won = False
            else:
                rate = max(rate / (1 + check.tol_down), gain)
        if won:   # up while it holds, short of a rate it already refused
            rate = row.sustained_rps * (1 + check.tol_up)
            while room() and (row.refused_rps is None or rate < row.refused_rps * (1 - 1e-9)) and judge(row, rate):
                rate *= 1 + check.tol_up
        else:
            said.append(f"{row.label}: " + (
                f"it refuses {row.refused_rps:.3g} rps, a rate step above the {cur.sustained_rps:.3g} the other holds"
                if won is False else
                f"no rate it holds within {check.repair_sims} runs / {check.repair_calls:,} simulated calls"))
            break
        said.append(f"{row.label}: it sustains {row.sustained_rps:.3g} rps" +
                    (f" (not {row.refused_rps:.3g})" if row.refused_rps else ""))
        cur = row
    if not said:
        return kept, rows, ""
    how = f"{sims} runs, {spent:,} calls, {time.perf_counter() - t0:.1f} s"
    if cur is kept:
        return kept, rows, f"simulator check (repair): {'; '.join(said)}; the allocation kept ({how})"
    before = (f"sustains {kept.sustained_rps:.3g} rps and refuses {kept.refused_rps:.3g}" if kept.sustained_rps
              else f"sustains less than {kept.refused_rps:.3g} rps")
    return cur, rows, (f"simulator check (repair): the allocation kept before {before}; {'; '.join(said)}; "
                       f"the last that won is kept ({how})")


def run_throughput_check(planner: "Planner", check: SimCheck, best: "Outcome") -> "Outcome":
    """The max-throughput goal's check (module docstring; `run_check` decides whether it runs): bisect the optimum's simulated
    sustainable rate, race the shortlist rebuilt at that rate and the leaders' neighbours upward
    from it, and keep the allocation that sustained the highest rate (the optimum unless another
    went a full `step` above it)."""
    from scepsy_hpc.allocate.milp import choice_key
    from scepsy_hpc.errors import InfeasibleError
    from scepsy_hpc.sim.capacity import bisect_rate

    t0 = time.perf_counter()
    w = planner.demands[0].weight_rps
    sims = 0
    rows: dict[tuple[Any, ...], Checked] = {}

    def row(label: str, choice: Mapping[str, "Candidate"], theta: float) -> Checked:
        k = choice_key(choice)
        if k not in rows:
            pred = sum(p.latency_s for p in planner.evaluate(choice, theta).values())
            rows[k] = Checked(label, dict(choice), pred, math.nan, 0.0, 0.0, None)
        return rows[k]

    # 1. the optimum's sustainable rate
    opt = row("optimum", best.choice, best.theta)
    last: dict[str, RaceRun] = {}

    def ok(rate: float) -> bool:
        nonlocal sims
        sims += 1
        planner.progress(f"simulator check: the optimum at {rate:.3g} rps")
        run = check.race(planner, [best.choice], rate)[0]
        opt.record(rate, run)
        if run.sustainable:
            last["optimum"] = run
        return run.sustainable

    lo, hi = bisect_rate(ok, best.theta * w, rel_tol=check.step, max_runs=max(2, check.max_sims // 3), step=1.5)
    if lo <= 0:
        best = best.noted(f"simulator check: the MILP's optimum sustains no rate down to {hi:.3g} rps in the simulator; kept")
        return _finish(best, rows, t0)
    # 2. contenders: the shortlist rebuilt at the first rate of the race, and the optimum's neighbours
    rate = lo * (1 + check.step)
    theta = rate / w
    contenders: list[tuple[str, dict[str, "Candidate"]]] = []
    try:
        base = planner.milp_latency(theta)
        items, base_solve_s = shortlist_timed(planner, base, check)
        contenders += [(f"at {rate:.3g} rps: {label}", c) for label, c in items]
        best = replace(best, solve_time_s=best.solve_time_s + base_solve_s)
    except InfeasibleError:
        pass
    waits = last["optimum"].waits if "optimum" in last else None
    contenders += neighbours(planner, best.choice, check.delta, waits)[:check.moves]
    leader, lead_rate = opt, lo
    alive: list[Checked] = [opt] if rate < hi else []
    tried = {choice_key(best.choice)}
    # 3. the race
    while sims < check.max_sims:
        fresh = []
        for label, c in contenders:
            if choice_key(c) not in tried:
                tried.add(choice_key(c))
                fresh.append(row(label, c, theta))
        field = (alive + fresh)[:max(1, check.max_sims - sims)]
        if not field:
            break
        planner.progress(f"simulator check: {len(field)} allocations at {rate:.3g} rps")
        runs = check.race(planner, [r.choice for r in field], rate)
        sims += len(field)
        passed = []
        for r, run in zip(field, runs):
            r.record(rate, run)
            if run.sustainable:
                passed.append((run.latency_s, r, run))
        if not passed:
            break
        passed.sort(key=lambda t: t[0])
        leader, lead_rate = passed[0][1], rate
        alive = [r for _, r, _ in passed[:check.keep]]
        contenders = neighbours(planner, leader.choice, check.delta, passed[0][2].waits)[:check.moves]
        rate *= 1 + check.step
        theta = rate / w
    elapsed = time.perf_counter() - t0
    n_req = check.requests_for(_calls(planner))
    if leader is opt:
        best = best.noted(f"simulator check (throughput): the MILP's optimum sustains {lo:.3g} rps in the simulator "
                          f"(the predictor says {best.theta * w / planner.max_util:.3g}); no other of {len(rows) - 1} "
                          f"allocations sustained {lo * (1 + check.step):.3g}; kept ({sims} judgements of {check.paths}×{n_req} requests, {elapsed:.1f} s)")
        return _finish(best, rows, t0)
    choice = dict(leader.choice)
    top = planner.throughput_scale(planner.evaluate(choice, best.theta))
    out = _outcome(planner, best, choice, min(best.theta, top * planner.max_util))
    out = out.noted(f"simulator check (throughput): the MILP's optimum sustains {lo:.3g} rps in the simulator; "
                     f"the {leader.label} allocation sustains {lead_rate:.3g} rps and is kept ({len(rows)} allocations, "
                     f"{sims} judgements of {check.paths}×{n_req} requests, {elapsed:.1f} s)")
    return _finish(out, rows, t0)


def _outcome(planner: "Planner", best: "Outcome", choice: dict[str, "Candidate"], theta: float) -> "Outcome":
    """`best` with `choice` in place of its allocation, priced at θ; solver figures and notes kept."""
    return planner.outcome(choice, theta, best.status, solve_time_s=best.solve_time_s, iterations=best.iterations,
                           candidates=best.candidates, notes=best.notes, milp=best.milp, priced=best.priced)


def _finish(out: "Outcome", rows: Mapping[Any, Checked], t0: float) -> "Outcome":
    return replace(out, checked=tuple(sorted(rows.values(), key=lambda r: (r.label != "optimum", -(r.sustained_rps or 0.0)))),
                   check_time_s=time.perf_counter() - t0)


def _with_replicas(c: "Candidate", r: int) -> "Candidate":
    return replace(c, replicas=r, capacity_rps=c.capacity_rps * r / c.replicas, cost_s=0.0)


def _race_job(planner: "Planner", choice: Mapping[str, "Candidate"], rate: float, check: SimCheck,
              path: int = 0) -> tuple[Any, ...]:
    dm = planner.demands[0]
    alloc = {llm: as_entry(choice[planner.dep_of[0, llm]]) for llm in dm.wf.llms}
    return (dm.wf, alloc, planner.gpus[planner.gpu_name], planner.models, rate, check.requests_for(_calls(planner)),
            check.seed + SEED_OFFSET + path)


def _sim_run(job: tuple[Any, ...]) -> tuple[float, float]:
    """One `_race_job` simulated (`SimCheck.simulate`, here or in a worker process): (mean latency, requests/s)."""
    from scepsy_hpc.sim.core import simulate

    wf, alloc, gpu, models, rate, n, seed = job
    res = simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=n, seed=seed)
    return res.latency_mean_s, res.throughput_rps


def _race_run(job: tuple[Any, ...]) -> RaceRun:
    from scepsy_hpc.sim.capacity import judge
    from scepsy_hpc.sim.core import GrowingRun

    wf, alloc, gpu, models, rate, n, seed = job
    calls = 0   # the calls of the runs judged, as if each were simulated afresh: the budgets' unit
    grow = GrowingRun(wf, alloc, gpu, models, rate_rps=rate, seed=seed)

    def run(k: int) -> Any:
        nonlocal calls
        res = grow(k)
        calls += res.llm_calls
        return res

    good, res = judge(run, n)
    waits = {llm: s.queue_mean_s * s.calls_per_request for llm, s in res.per_llm.items()}
    return RaceRun(good, res.latency_mean_s, res.throughput_rps, waits, calls)


def _calls(planner: "Planner") -> float:
    stats = planner.demands[0].stats
    assert stats is not None
    return sum(s.n for s in stats.per_llm.values())
