#!/usr/bin/env python3
"""Does the current code still plan each table cell's milp allocation? A cell of `bench_table.py` depends on
the code through milp's max-throughput plan (the baselines, bounds and judge aside), so a cell measured at
an older commit stands when this prints SAME for it. The plan is the bench's request (1 rps weight, the
cell's GPUs, default tuning, the simulator check on); the check's notes follow each line.

    PYTHONPATH=$PWD .venv/bin/python scripts/check_table_plans.py --dir bench/table W:G [W:G ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.commands.bench import short_allocation  # noqa: E402
from scepsy_hpc.planning.api import plan  # noqa: E402
from scepsy_hpc.planning.request import PlanRequest  # noqa: E402
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models  # noqa: E402
from scepsy_hpc.spec.workflow import load_workflow  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, type=Path, help="the table's folder (bench_table.py --dir)")
    ap.add_argument("cells", nargs="+", metavar="W:G", help="workflow:GPUs of a measured cell")
    args = ap.parse_args()
    models, gpus = load_models(None), load_gpus(None)
    for cell in args.cells:
        w, _, g = cell.partition(":")
        f = args.dir / f"b_{w}_{g}.json"
        if not (w.replace("_", "").isalnum() and w.isascii()) or not g.isdigit() or not f.exists():
            ap.error(f"{cell}: no measured cell {f} (give workflow:GPUs of a cell in --dir)")
        rec = json.loads(f.read_text())["cells"][0]["policies"]["milp"]["allocation"]
        wf = load_workflow(config_dir() / "workflows" / f"{w}.yaml", models)
        t0 = time.perf_counter()
        out = plan(PlanRequest(workflows=(wf,), models=models, gpus=gpus, policy="milp", goal="max-throughput",
                               target_rps={wf.name: 1.0}, gpu_count=int(g))).outcome
        now = short_allocation(out.choice)
        notes = " | ".join(n for n in out.notes if "simulator check" in n)
        print(f"{w} x{g}: {'SAME' if now == rec else 'DIFFERS'} recorded {rec!r} now {now!r} "
              f"({time.perf_counter() - t0:.0f} s) | {notes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
