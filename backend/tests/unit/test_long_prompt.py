"""The long-prompt workload's figures, from hand-made replies."""

from __future__ import annotations

from benchmarks.client import Reply
from benchmarks.long_prompt import Stream, summary


def reply(sent_at: float, ttft_s: float, arrivals: tuple[float, ...] = ()) -> Reply:
    return Reply(
        text="",
        ttft_ms=ttft_s * 1000,
        total_ms=0.0,
        prompt_tokens=6000,
        cached_tokens=0,
        completion_tokens=len(arrivals),
        sent_at=sent_at,
        arrivals=arrivals,
    )


def test_only_the_gaps_and_requests_during_the_long_prefill_count() -> None:
    long = reply(sent_at=10.0, ttft_s=5.0)  # its prefill: 10 s to 15 s
    streams = [
        # 1.0 s before the prefill does not count; 9.5-12.5 overlaps it; 12.5-12.7 is in it
        Stream(0, reply(8.0, 0.5, (8.5, 9.5, 12.5, 12.7))),
        Stream(1, reply(12.0, 2.0, (14.0, 14.1, 16.0))),  # sent during it; 14.1-16.0 overlaps
        Stream(2, reply(16.0, 0.1, (16.1, 19.0))),  # after it: none of it counts
    ]
    figures = summary(long, streams, reply(0.0, 4.0))
    assert figures["long_ttft_ms"] == 5000
    assert figures["solo_long_ttft_ms"] == 4000
    assert figures["others_largest_gap_ms"] == 3000
    assert figures["others_gaps"] == 4  # 3.0, 0.2, 0.1, 1.9 s
    assert figures["others_gap_p95_ms"] == 3000
    assert figures["others_ttft_during_ms"] == [2000]
    assert figures["others_answers"] == 3
