"""One entry of a plan's `placement:` list: an instance of an LLM on concrete GPUs of a node.

    {llm, replica, node, gpus, gpu_frac, mem_frac, mps_pct, port}

`scepsy plan --cluster` writes every field; a hand-written entry may leave out `gpu_frac`,
`mem_frac`, `mps_pct` and `port`, and the defaults below — the only copy of them — fill in what the
engine is started with. The entry has no version of its own: it is part of the plan file.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable

from pydantic import Field

from scepsy_hpc.spec.base import SpecModel

# --gpu-memory-utilization as a share of an instance's memory: vLLM refuses to start unless that much
# is free, so instances sharing a GPU together ask for at most 0.9 of it (the memory model uses it too)
MEM_UTIL = 0.9
BASE_PORT = 8100   # the first engine port on each node; co-located engines count up from it


def default_mem_frac(gpu_frac: float) -> float:
    """The memory fraction an instance of `gpu_frac` asks for (MEM_UTIL of its share)."""
    return gpu_frac * MEM_UTIL


def default_mps_pct(gpu_frac: float) -> int:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for an instance of `gpu_frac` (100 for a whole GPU)."""
    return 100 if gpu_frac >= 1.0 else round(100 * gpu_frac)


class PlacementEntry(SpecModel):
    """An instance on concrete GPUs, with what its engine is started with."""

    llm: str
    replica: Annotated[int, Field(ge=0)]
    node: str
    gpus: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    gpu_frac: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    mem_frac: Annotated[float, Field(gt=0.0, le=1.0)] | None = None   # vLLM --gpu-memory-utilization
    mps_pct: Annotated[int, Field(ge=1, le=100)] | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = BASE_PORT

    def mem_frac_at(self, gpu_frac: float) -> float:
        """The memory fraction written, else the default for the allocation's `gpu_frac`."""
        return self.mem_frac if self.mem_frac is not None else default_mem_frac(gpu_frac)

    def mps_pct_at(self, gpu_frac: float) -> int:
        """The MPS thread percentage written, else the default for the allocation's `gpu_frac`."""
        return self.mps_pct if self.mps_pct is not None else default_mps_pct(gpu_frac)


def placement_entries(items: Iterable[Any]) -> list[PlacementEntry]:
    """Entries from a placement list of entries or of their dict form (`Placement.as_list()`)."""
    return [PlacementEntry.model_validate(p) for p in items]
