"""`scepsy bench --resume DIR`: the store of finished plans and simulations, and who may use it."""

from __future__ import annotations

import os
import pickle

import pytest

from scepsy_hpc.commands.bench_resume import key_of, memo_json, memo_plan, open_dir, read_runs
from scepsy_hpc.errors import SpecError


def test_keys_follow_every_input_and_the_code():
    k = key_of("cap", {"m": 1.0}, 0.5, 600, 0)
    assert k == key_of("cap", {"m": 1.0}, 0.5, 600, 0)
    assert len({k, key_of("cap", {"m": 1.0}, 0.5000001, 600, 0), key_of("cap", {"m": 2.0}, 0.5, 600, 0),
                key_of("cap", {"m": 1.0}, 0.5, 600, 1), key_of("lat", {"m": 1.0}, 0.5, 600, 0)}) == 5


def test_a_result_is_made_once_and_then_read_back(tmp_path):
    d = open_dir(str(tmp_path / "r"))
    assert (d.stat().st_mode & 0o777) == 0o700
    made = []
    assert memo_plan(d, "k", lambda: made.append(1) or {"plan": 1}) == {"plan": 1}
    assert memo_plan(d, "k", lambda: made.append(1) or {"plan": 2}) == {"plan": 1} and made == [1]
    assert memo_json(d / "x.json", lambda: {"a": 1.5}) == {"a": 1.5}
    assert memo_json(d / "x.json", lambda: {"a": 9}) == {"a": 1.5}
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in d.iterdir())
    # a torn file is made again, never an error
    (d / "plan-t.pickle").write_bytes(pickle.dumps({"plan": 3})[:5])
    assert memo_plan(d, "t", lambda: {"plan": 4}) == {"plan": 4}
    (d / "y.json").write_text('{"a": ')
    assert memo_json(d / "y.json", lambda: {"a": 2}) == {"a": 2}


def test_a_failed_plan_is_not_kept(tmp_path):
    d = open_dir(str(tmp_path))

    def fail():
        raise SpecError("no plan")
    with pytest.raises(SpecError):
        memo_plan(d, "f", fail)
    assert not list(d.iterdir())


def test_a_directory_others_may_write_is_refused_naming_it(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(SpecError, match=r".*shared.*others may write it.*chmod 700"):
        open_dir(str(d))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SpecError, match=r".*file: not a directory"):
        open_dir(str(f))


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_entries_of_another_user_are_not_read(tmp_path):
    d = open_dir(str(tmp_path / "r"))
    (d / "plan-k.pickle").write_bytes(pickle.dumps({"plan": "theirs"}))
    (d / "cap.jsonl").write_text('{"rate": 1.0, "ok": true, "throughput": 1.0, "latency": 2.0, "requests": 9}\n')
    for p in d.iterdir():
        os.chown(p, 12345, 12345)
    assert memo_plan(d, "k", lambda: {"plan": "mine"}) == {"plan": "mine"}
    assert read_runs(d / "cap.jsonl") == {}
    os.chown(d, 12345, 12345)
    with pytest.raises(SpecError, match="belongs to uid 12345"):
        open_dir(str(d))


def test_a_link_is_not_followed_and_a_torn_line_costs_only_itself(tmp_path):
    from types import SimpleNamespace

    from scepsy_hpc.commands.bench_resume import run_writer

    d = open_dir(str(tmp_path / "r"))
    target = tmp_path / "elsewhere.pickle"
    target.write_bytes(pickle.dumps({"plan": "linked"}))
    (d / "plan-s.pickle").symlink_to(target)
    assert memo_plan(d, "s", lambda: {"plan": "made"}) == {"plan": "made"}
    journal = d / "cap.jsonl"
    journal.write_text('{"rate": 1.0, "ok": true, "throughput": 1.0, "late')   # stopped mid-write
    run_writer(journal)(2.0, False, SimpleNamespace(throughput_rps=1.5, latency_mean_s=30.0, requests=1200))
    assert read_runs(journal) == {2.0: (False, 1.5, 30.0, 1200)}
