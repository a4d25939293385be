"""Placement entries: the one copy of the engine defaults, and what a hand-written entry may leave out."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from scepsy_hpc.spec.placement_entry import (BASE_PORT, MEM_UTIL, PlacementEntry, default_mem_frac, default_mps_pct,
                                             placement_entries)


def test_a_full_entry_round_trips_in_the_plan_files_key_order() -> None:
    data = {"llm": "gen", "replica": 1, "node": "n1", "gpus": [0, 1], "gpu_frac": 1.0, "mem_frac": 0.9, "mps_pct": 100,
            "port": 8101}
    entry = PlacementEntry.model_validate(data)
    assert entry.model_dump() == data
    assert list(entry.model_dump()) == list(data)


def test_a_hand_written_entry_gets_the_defaults_for_the_allocations_share() -> None:
    entry = PlacementEntry(llm="r", replica=0, node="n2", gpus=[0])
    assert entry.port == BASE_PORT == 8100
    assert entry.mem_frac_at(0.5) == pytest.approx(0.45) == default_mem_frac(0.5) == 0.5 * MEM_UTIL
    assert entry.mps_pct_at(0.5) == 50 and entry.mps_pct_at(1.0) == 100 == default_mps_pct(1.0)
    written = PlacementEntry(llm="r", replica=0, node="n2", gpus=[0], mem_frac=0.3, mps_pct=40)
    assert written.mem_frac_at(0.5) == 0.3 and written.mps_pct_at(0.5) == 40


@pytest.mark.parametrize("bad", [{"gpus": []}, {"gpus": [-1]}, {"replica": -1}, {"port": 0}, {"mem_frac": 1.5},
                                 {"colour": "red"}])
def test_invalid_entries_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        PlacementEntry.model_validate({"llm": "r", "replica": 0, "node": "n", "gpus": [0], **bad})


def test_placement_entries_accepts_entries_and_their_dict_form() -> None:
    e = PlacementEntry(llm="r", replica=0, node="n", gpus=[0])
    assert placement_entries([e, e.model_dump()]) == [e, e]
