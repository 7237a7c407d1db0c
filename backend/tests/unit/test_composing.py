"""The typing benchmark's users: drafts go by the chat page's rules, and its figures."""

from __future__ import annotations

import random
import time

from benchmarks.client import Reply
from benchmarks.composing import Composed, Keys, compose, summary


def play(keys: Keys) -> tuple[str, list[tuple[float, str]]]:
    """The text at Enter and the drafts sent, each with when it went."""
    began = time.perf_counter()
    sent: list[tuple[float, str]] = []

    def send(text: str) -> bool:
        sent.append((time.perf_counter() - began, text))
        return True

    text, count = compose(keys, send)
    assert count == len(sent)
    return text, sent


def test_a_paste_goes_at_once_and_quick_typing_waits_for_a_pause() -> None:
    keys = Keys()
    keys.paste("A long document.\n\n")
    keys.type("How far?", 0.2, random.Random(1))  # quicker than a draft a second allows
    text, sent = play(keys)
    assert text == "A long document.\n\nHow far?"
    assert [t for _, t in sent] == ["A long document.\n\n"]  # Enter cancels what was due


def test_a_pause_sends_what_was_written_and_more_words_wait_for_the_next_second() -> None:
    keys = Keys()
    keys.strokes += [(0.01, c) for c in "Where"]
    keys.strokes += [(1.2, " ")]  # a pause after the first word: a draft
    keys.strokes += [(0.01, c) for c in "did we go"]  # three more words, at once
    text, sent = play(keys)
    assert text == "Where did we go"
    assert [t for _, t in sent] == ["Where"]
    keys.strokes += [(1.1, "!")]  # a pause: the three words go, a second after "Where"
    text, sent = play(keys)
    assert [t for _, t in sent] == ["Where", "Where did we go"]
    (first, _), (second, _) = sent
    assert 0.95 <= second - first < 2.0  # due a second after, whatever the load


def test_figures_split_pastes_from_follow_ups_and_take_every_gap_of_the_others() -> None:
    composed = [
        Composed(0, "paste", 100.0, 2000, 1900, 1800, 3),
        Composed(0, "follow-up", 50.0, 2100, 2080, 20, 2),
        Composed(1, "paste", 300.0, 2000, 200, 0, 0),
    ]
    other = Reply("", 10.0, 100.0, 50, 40, 3, sent_at=0.0, arrivals=(0.010, 0.030, 0.070))
    figures = summary(composed, [other], wall_s=12.34)
    assert figures["paste_ttft_p50_ms"] == 100.0  # the nearest rank, as every benchmark's
    assert figures["paste_ttft_p95_ms"] == 300.0
    assert figures["follow_up_ttft_p50_ms"] == 50.0
    assert (figures["others_tpot_p50_ms"], figures["others_tpot_p95_ms"]) == (20.0, 40.0)
    assert figures["drafts_sent"] == 5
    assert figures["draft_tokens_used"] == 1820
    assert figures["wall_s"] == 12.3
