"""The node agent's decisions: which GPUs an engine gets, and which engines must start one after another."""

from __future__ import annotations

import pytest

from scepsy_hpc.backend.agent import Instance, colocation_chains, map_gpus
from scepsy_hpc.engine.adapters import EngineLaunch


def test_without_slurm_the_planned_indices_are_used_as_they_are() -> None:
    mapping, remapped = map_gpus([2, 3, 3], {})
    assert mapping == {2: (2, "2"), 3: (3, "3")}
    assert not remapped


def test_planned_gpus_the_job_holds_keep_their_index_and_get_the_visible_name() -> None:
    # Slurm without device constraint: the job holds physical 2,3 and CUDA names them 2,3
    env = {"SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert map_gpus([3, 2], env) == ({2: (2, "2"), 3: (3, "3")}, False)
    # with ConstrainDevices=yes the same GPUs are renumbered from 0 inside the step
    env = {"SLURM_STEP_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert map_gpus([3], env) == ({3: (3, "1")}, False)


def test_gpus_other_than_planned_are_mapped_in_order_and_flagged() -> None:
    env = {"SLURM_JOB_GPUS": "1,3", "CUDA_VISIBLE_DEVICES": "1,3"}
    mapping, remapped = map_gpus([0, 2], env)
    assert mapping == {0: (1, "1"), 2: (3, "3")}
    assert remapped


def test_a_job_holding_fewer_gpus_than_planned_is_an_error_naming_both() -> None:
    with pytest.raises(RuntimeError) as exc:
        map_gpus([0, 1, 2], {"SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert "holds GPUs 0,1" in str(exc.value) and "[0, 1, 2]" in str(exc.value)


def _inst(llm: str, replica: int, gpus: list[int], frac: float = 1.0) -> Instance:
    return Instance(llm=llm, replica=replica, gpus=gpus, gpu_frac=frac, mps_pct=round(100 * frac),
                    launch=EngineLaunch("sim", llm, llm, llm, "h100-sxm"))


def test_engines_sharing_a_gpu_form_one_chain_largest_share_first_others_start_alone() -> None:
    a, b, c = _inst("a", 0, [0], 0.25), _inst("b", 0, [0], 0.5), _inst("c", 0, [1, 2])
    d = _inst("d", 0, [3], 0.5)
    chains = colocation_chains([a, b, c, d])
    assert sorted([[(i.llm, i.replica) for i in ch] for ch in chains]) == [[("b", 0), ("a", 0)], [("c", 0)], [("d", 0)]]


def test_chains_are_transitive_across_gpus() -> None:
    # x and y share no GPU, but z's TP group spans both of theirs: all three start one after another
    x, y, z = _inst("x", 0, [0], 0.5), _inst("y", 0, [1], 0.5), _inst("z", 0, [0, 1])
    chains = colocation_chains([x, y, z])
    assert len(chains) == 1
    assert [i.llm for i in chains[0]] == ["z", "x", "y"]


def test_agent_main_reports_a_foreign_serve_json_as_one_line_not_a_traceback(tmp_path, capsys):
    from scepsy_hpc.backend.agent import main

    (tmp_path / "serve.json").write_text('{"schema_version": 99}')
    rc = main(["--session", str(tmp_path), "--node", "n1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "agent on n1:" in err and "schema_version 99" in err and "re-run `scepsy up`" in err
    assert "Traceback" not in err
