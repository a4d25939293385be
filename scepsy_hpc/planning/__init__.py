"""Planning: workflows + GPUs (or a cluster) + a goal → a plan, with the simulator check and placement.

`plan(PlanRequest) -> PlanResult` is what `scepsy plan`, `scepsy bench`, `scepsy up` and the
service call; see planning.api. Importing this package is cheap: the planner, the solver and the
simulator load when `plan` runs.
"""

from __future__ import annotations

from scepsy_hpc.planning.api import plan, prepare
from scepsy_hpc.planning.request import PlanRequest, PlanResult

__all__ = ["PlanRequest", "PlanResult", "plan", "prepare"]
