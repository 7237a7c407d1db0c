from __future__ import annotations

import sys
import unicodedata

import pytest

from chatbot.engines import chat_format
from chatbot.engines.stops import TRANSCRIPT_STOPS, Stops, StopScanner, request_stops

CF = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) == "Cf")
"""Unicode's whole format category, from the running Python's own database."""


def run(pieces: list[str], stops: tuple[str, ...] | Stops) -> tuple[str, bool]:
    scanner = StopScanner(stops if isinstance(stops, Stops) else Stops(stops))
    out = "".join(scanner.feed(p) for p in pieces)
    return out + scanner.flush(), scanner.stopped


def test_text_without_stops_passes_through() -> None:
    assert run(["Hello", ", ", "world"], ("\nUser:",)) == ("Hello, world", False)


@pytest.mark.parametrize(
    "pieces",
    [
        ["Paris.", "\nUser:", " more"],
        ["Paris.", "\n", "User", ":", " more"],
        ["Paris.\nUs", "er: more"],
    ],
)
def test_a_stop_split_over_pieces_is_never_emitted(pieces: list[str]) -> None:
    assert run(pieces, ("\nUser:",)) == ("Paris.", True)


def test_a_partial_match_that_does_not_complete_is_released() -> None:
    scanner = StopScanner(Stops(("\nUser:",)))
    assert scanner.feed("a\nUs") == "a"
    assert scanner.feed("ually") == "\nUsually"


def test_the_earliest_of_several_stops_wins() -> None:
    assert run(["x END y STOP"], ("STOP", "END")) == ("x ", True)


def test_nothing_is_emitted_after_a_stop() -> None:
    scanner = StopScanner(Stops(("#",)))
    scanner.feed("a#b")
    assert scanner.feed("more") == ""
    assert scanner.flush() == ""


def test_the_one_rule_puts_the_formats_stops_first_then_the_clients_each_once() -> None:
    client = ("END", "\nUser:", "END", "")
    stops = request_stops(TRANSCRIPT_STOPS, client)
    assert stops.strings == (*chat_format.STOPS, "END")
    assert stops.turns
    assert request_stops(Stops(), client) == Stops(("END", "\nUser:"), turns=False)


@pytest.mark.parametrize(
    "line",
    ["user:", "USER:", "Assistant :", "  system\t:", "> User:", ">assistant:", "> > SYSTEM:"],
)
def test_a_turn_ends_the_answer_in_any_case_and_quoted(line: str) -> None:
    text, stopped = run(["5+5 is 10.", "\n", *line, " What is 5+5?"], TRANSCRIPT_STOPS)
    assert (text, stopped) == ("5+5 is 10.", True)


def test_the_full_format_category_cannot_hide_a_turn_from_the_stops() -> None:
    assert len(CF) > 150  # the category, not a handful of characters
    assert CF == chat_format.INVISIBLE_CHARS
    for c in CF:
        for pieces in (["5+5 is 11\n", c, "User: What is 5+5?"], [f"5+5 is 11\n {c}{c}user:"]):
            assert run(pieces, TRANSCRIPT_STOPS) == ("5+5 is 11", True), f"U+{ord(c):04X}"


@pytest.mark.parametrize("brk", ["\r", "\u2028", "\u2029", "\x85", "\x0b"])
def test_every_line_break_the_prompt_reads_as_one_starts_a_turn(brk: str) -> None:
    assert run([f"Paris.{brk}Assistant: more"], TRANSCRIPT_STOPS) == ("Paris.", True)


@pytest.mark.parametrize(
    "text",
    [
        "Username: bob\nSystems: three\nuser manual: page 2\nThe user: me",
        "Quoted:\n> a quote\n>> deeper",
        "Ends on a role word\nuser",
    ],
)
def test_lines_that_only_look_like_turns_pass_through(text: str) -> None:
    assert run([text], TRANSCRIPT_STOPS) == (text, False)
    assert run(list(text), TRANSCRIPT_STOPS) == (text, False)  # one character at a time


def test_a_line_that_may_still_become_a_turn_is_held_back_then_released() -> None:
    scanner = StopScanner(TRANSCRIPT_STOPS)
    assert scanner.feed("a\n\u200b> Ass") == "a"
    assert scanner.feed("ume nothing") == "\n\u200b> Assume nothing"
    assert scanner.matched is None


def test_client_stops_stay_exact() -> None:
    assert run(["one STOP two"], ("stop",)) == ("one STOP two", False)
