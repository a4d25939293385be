#!/usr/bin/env python3
"""The planning-quality table: `scepsy bench` on every workflow × GPU count, one cell at a time, and the
verdicts of issue 23's criteria per cell.

Each cell is `scepsy bench --workflows W --gpus G --requests N --jobs J --policies milp,equal,independent
--json`, run as its own process; its JSON goes to DIR/b_W_G.json (and DIR/b_W_G.meta.json: the commit,
the wall time, the exit status), so an interrupted table resumes where it stopped (a cell with a JSON is
not run again unless --rerun), and an interrupted cell too: it runs with `--resume DIR/.resume/W_G`, so
its plans and finished simulations are reused by the next run of the cell at the same code (removed
once the cell has its JSON). The store is plain files keyed by the package's source, so it also serves on
another machine that runs the same commit: an unfinished cell's store is kept in git between sessions under
`bench/table/resume/COMMIT/W_G/` and copied back to DIR/.resume/W_G in a checkout of COMMIT. Then the
table is printed from every cell in DIR:

- milp's simulated max throughput and each baseline's, and milp ÷ each (≥ 0.97 required);
- milp's mean latency ÷ each baseline's at 90 %, 95 % and 99 % of the weakest policy's maximum (≤ 1.05);
- the instance bound (predicted and its own allocation simulated) and milp's fraction of it in simulated
  requests/s (≥ 0.95 required at 16 GPUs), the fluid bound;
- milp's predicted max ÷ its simulated max (the predictor's error on the plan it chose; summarised below
  the table);
- the verdict (ok / LOSS) and milp's max-throughput allocation.

    .venv/bin/python scripts/bench_table.py --dir bench-table [--gpus 8,16,32] [--workflows a,b] \\
        [--requests 600] [--jobs 1] [--table-only] [--rerun] [--json]

A cell takes from half a minute to over an hour on 2 cores (beam_search: ~300 LLM calls per request,
runs lengthened up to 32× near capacity); --table-only prints what DIR holds without running anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_MIN = 0.97    # milp's simulated max ÷ each baseline's
LATENCY_MAX = 1.05       # milp's mean latency ÷ each baseline's at every common rate
INSTANCE_MIN = 0.95      # milp's simulated max ÷ the instance bound's (required at 16 GPUs)
PREDICTION_CLOSE = 0.08  # reported: milp's predicted max ÷ its simulated max within 1 ± this


def shipped_workflows() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "workflows").glob("*.yaml"))


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_cell(d: Path, w: str, g: int, args: argparse.Namespace) -> None:
    out, log, meta = d / f"b_{w}_{g}.json", d / f"b_{w}_{g}.log", d / f"b_{w}_{g}.meta.json"
    kept = d / ".resume" / f"{w}_{g}"   # what an interrupted run of the cell had finished (same code only)
    cmd = [sys.executable, "-m", "scepsy_hpc.cli", "bench", "--workflows", w, "--gpus", str(g), "--requests",
           str(args.requests), "--jobs", str(args.jobs), "--policies", "milp,equal,independent", "--json",
           "--resume", str(kept)]
    print(f"cell {w} × {g} GPUs ...", file=sys.stderr, flush=True)
    t0 = time.time()
    with open(out.with_suffix(".part"), "w") as fo, open(log, "w") as fe:
        rc = subprocess.run(cmd, stdout=fo, stderr=fe, cwd=ROOT).returncode
    wall = time.time() - t0
    if rc == 0:
        out.with_suffix(".part").replace(out)
        shutil.rmtree(kept, ignore_errors=True)
    meta.write_text(json.dumps({"commit": commit(), "wall_s": wall, "rc": rc, "command": cmd[2:]}))
    print(f"cell {w} × {g} GPUs: rc {rc}, {wall:.0f} s", file=sys.stderr, flush=True)


def verdict(c: dict[str, Any]) -> dict[str, Any]:
    """One cell's figures and whether it meets the criteria."""
    m = c["policies"]["milp"]
    if "error" in m:
        return {"workflow": c["workflow"], "gpus": c["gpus"], "error": f"milp: {m['error']}"}
    # a baseline with no plan on these GPUs (it cannot fit) has nothing to lose to
    pols = {p: v for p, v in c["policies"].items() if "error" not in v}
    no_plan = {p: v["error"] for p, v in c["policies"].items() if "error" in v}
    thr = {p: v.get("milp_throughput_ratio") for p, v in pols.items() if p != "milp"}
    lat = {p: [a.get("milp_latency_ratio") for a in v.get("at_common", [])] for p, v in pols.items() if p != "milp"}
    ok_t = all(x is not None and x >= THROUGHPUT_MIN for x in thr.values())
    ok_l = all(qs and all(q is not None and q <= LATENCY_MAX for q in qs) for qs in lat.values())
    inst = c.get("milp_instance_sim_fraction")
    pred, sim = m.get("predicted_max_rps"), m.get("sim_max_rps")
    return {"workflow": c["workflow"], "gpus": c["gpus"], "milp_max_rps": sim,
            "milp_predicted_rps": pred, "milp_prediction_ratio": pred / sim if pred and sim else None,
            "baseline_max_rps": {p: v.get("sim_max_rps") for p, v in pols.items() if p != "milp"},
            "throughput_ratio": thr, "latency_ratio": lat, "instance_bound_rps": c.get("instance_bound_rps"),
            "instance_bound_sim_rps": c.get("instance_bound_sim_rps"), "instance_fraction": inst,
            "fluid_rps": c.get("fluid_rps"), "allocation": m.get("allocation"), "no_plan": no_plan,
            "ok": ok_t and ok_l, "instance_ok": inst is not None and inst >= INSTANCE_MIN}


def load(d: Path) -> tuple[list[dict[str, Any]], list[str], set[tuple[str, int]]]:
    """Every cell in `d`: the rows, the errors (said), and the cells that could not be planned."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    failed: set[tuple[str, int]] = set()
    for f in sorted(d.glob("b_*.json")):
        if f.name.endswith(".meta.json"):
            continue
        text = f.read_text() if f.stat().st_size else ""
        if not text.strip():
            continue   # a cell still running (its process writes the JSON at the end)
        try:
            doc = json.loads(text)
        except (OSError, json.JSONDecodeError) as e:
            errors.append(f"{f.name}: unreadable ({e})")
            continue
        meta_f = f.with_name(f.stem + ".meta.json")
        meta = json.loads(meta_f.read_text()) if meta_f.exists() else {}
        for c in doc.get("cells", []):
            if "error" in c:
                errors.append(f"{c['workflow']} × {c['gpus']}: {c['error']}")
                failed.add((c["workflow"], c["gpus"]))
                continue
            r = verdict(c)
            if "error" in r:
                errors.append(f"{c['workflow']} × {c['gpus']}: {r['error']}")
                failed.add((c["workflow"], c["gpus"]))
                continue
            r.update(commit=meta.get("commit"), wall_s=meta.get("wall_s", doc.get("wall_s")))
            rows.append(r)
    return rows, errors, failed


def fmt(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workflow | GPUs | milp max rps | equal | independent | milp ÷ equal / indep. (max) | "
             "milp lat. ÷ equal ; ÷ indep. at 90/95/99 % | instance bound pred. / sim. | milp ÷ inst. (sim.) | "
             "fluid | milp pred. ÷ sim. | verdict | milp allocation (max thr.) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["gpus"], r["workflow"])):
        b, t, lt = r["baseline_max_rps"], r["throughput_ratio"], r["latency_ratio"]
        lines.append(
            f"| {r['workflow']} | {r['gpus']} | {fmt(r['milp_max_rps'])} | {fmt(b.get('equal'))} | "
            f"{fmt(b.get('independent'))} | {fmt(t.get('equal'), '.2f')} / {fmt(t.get('independent'), '.2f')} | "
            + " ; ".join("/".join(fmt(q, ".2f") for q in lt.get(p, [])) or "—" for p in ("equal", "independent"))
            + f" | {fmt(r['instance_bound_rps'])} / {fmt(r['instance_bound_sim_rps'])} | {fmt(r['instance_fraction'], '.2f')}"
            f" | {fmt(r['fluid_rps'])} | {fmt(r.get('milp_prediction_ratio'), '.2f')} | {'ok' if r['ok'] else 'LOSS'} | {r['allocation']} | {r.get('commit') or '—'} |")
    return "\n".join(lines)


def prediction_summary(rows: list[dict[str, Any]]) -> str | None:
    """How close milp's predicted max throughput is to its simulated max, over the cells measured."""
    ratios = [(f"{r['workflow']} × {r['gpus']}", r["milp_prediction_ratio"]) for r in rows if r.get("milp_prediction_ratio")]
    if not ratios:
        return None
    within = [q for _, q in ratios if abs(q - 1) <= PREDICTION_CLOSE]
    over = sorted(((c, q) for c, q in ratios if q > 1 + PREDICTION_CLOSE), key=lambda x: -x[1])
    under = sorted(((c, q) for c, q in ratios if q < 1 - PREDICTION_CLOSE), key=lambda x: x[1])
    text = f"milp's predicted max within ±{PREDICTION_CLOSE:.0%} of its simulated max on {len(within)} of {len(ratios)}"
    if over:
        text += "; over-rated: " + ", ".join(f"{c} {q:.2f}×" for c, q in over)
    if under:
        text += "; under-rated: " + ", ".join(f"{c} {q:.2f}×" for c, q in under)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, type=Path, help="where each cell's JSON goes (and is read from)")
    ap.add_argument("--workflows", default=None, help="comma-separated (default: every configs/workflows/*.yaml)")
    ap.add_argument("--gpus", default="8,16,32")
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--table-only", action="store_true", help="print the table of the cells DIR holds; run none")
    ap.add_argument("--rerun", action="store_true", help="run cells that already have a JSON again")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = ap.parse_args()
    try:
        counts = [int(x) for x in args.gpus.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--gpus {args.gpus!r}: comma-separated whole numbers, e.g. 8,16,32")
    if not 1 <= args.requests <= 1_000_000 or not 0 <= args.jobs <= 1024:
        ap.error(f"--requests {args.requests} / --jobs {args.jobs}: requests 1..1,000,000, jobs 0..1024 (0: one per CPU)")
    if any(not 1 <= g <= 100_000 for g in counts) or not counts:
        ap.error(f"--gpus {args.gpus!r}: GPU counts from 1 to 100,000")
    shipped = shipped_workflows()
    wfs = [w.strip() for w in args.workflows.split(",")] if args.workflows else shipped
    unknown = [w for w in wfs if w not in shipped]
    if unknown:
        ap.error(f"--workflows: no configs/workflows/{unknown[0]}.yaml; one of {', '.join(shipped)}")
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--dir {args.dir}: cannot make it ({e.strerror}); give a writable folder")
    if not args.table_only:
        for g in counts:
            for w in wfs:
                if args.rerun or not (args.dir / f"b_{w}_{g}.json").exists():
                    run_cell(args.dir, w, g, args)
    rows, errors, failed = load(args.dir)
    rows = [r for r in rows if r["workflow"] in wfs and r["gpus"] in counts]
    have = {(r["workflow"], r["gpus"]) for r in rows}
    missing = [f"{w} × {g}" for g in counts for w in wfs if (w, g) not in have and (w, g) not in failed]
    losses = [f"{r['workflow']} × {r['gpus']}" for r in rows if not r["ok"]]
    short16 = [f"{r['workflow']} ({fmt(r['instance_fraction'], '.2f')})" for r in rows
               if r["gpus"] == 16 and not r["instance_ok"]]
    if args.json:
        print(json.dumps({"rows": rows, "errors": errors, "missing": missing, "losses": losses,
                          "instance_short_at_16": short16}, indent=1))
        return 0
    print(table(rows))
    print()
    print(f"cells measured: {len(rows)} of {len(wfs) * len(counts)}; ok: {len(rows) - len(losses)}; "
          f"losses: {', '.join(losses) or 'none'}")
    at16 = [r for r in rows if r["gpus"] == 16]
    if at16:
        print(f"at 16 GPUs, milp ≥ {INSTANCE_MIN} of the instance bound (simulated) on {len(at16) - len(short16)} of "
              f"{len(at16)} measured" + (f"; short: {', '.join(short16)}" if short16 else ""))
    said = prediction_summary(rows)
    if said:
        print(said)
    if missing:
        print(f"not measured: {', '.join(missing)}")
    for e in errors:
        print(f"error: {e}")
    for r in rows:
        for p, why in r["no_plan"].items():
            print(f"no {p} plan for {r['workflow']} × {r['gpus']}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
