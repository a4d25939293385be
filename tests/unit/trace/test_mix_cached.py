"""A traced call's prefix counts become what a warm prefix cache reuses of it, in the mix a profile replays."""

from __future__ import annotations

from scepsy_hpc.trace.graph import from_trace
from scepsy_hpc.trace.records import CallRecord, Trace
from scepsy_hpc.trace.stats import call_mix


def test_traced_shares_become_the_cached_part_of_the_mix():
    calls = (
        CallRecord("r1", "agent", 0.0, 1.0, prompt_tokens=1700, completion_tokens=100, system_tokens=1500, prefix_tokens=0),
        # the second step shares 1,800 tokens with the first (its prompt and answer): 112 whole blocks = 1,792
        CallRecord("r1", "agent", 2.0, 3.0, prompt_tokens=2400, completion_tokens=100, system_tokens=1500,
                   prefix_tokens=1800),
        # all of a 33-token prompt is shared: at most prompt − 1 = 32 tokens are reused (two blocks)
        CallRecord("r1", "agent", 4.0, 5.0, prompt_tokens=33, completion_tokens=5, prefix_tokens=33),
        CallRecord("r1", "writer", 6.0, 7.0, prompt_tokens=900, completion_tokens=50),   # an old trace: no counts
    )
    mix = call_mix(from_trace(Trace(calls=calls)))
    assert mix["agent"] == [(1700, 100, 1488), (2400, 100, 1792), (33, 5, 32)]   # 1,500 → 93 blocks = 1,488
    assert mix["writer"] == [(900, 50)]
