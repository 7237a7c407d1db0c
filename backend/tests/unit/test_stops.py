from __future__ import annotations

import pytest

from chatbot.engines.stops import StopScanner


def run(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
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
    scanner = StopScanner(("\nUser:",))
    assert scanner.feed("a\nUs") == "a"
    assert scanner.feed("ually") == "\nUsually"


def test_the_earliest_of_several_stops_wins() -> None:
    assert run(["x END y STOP"], ("STOP", "END")) == ("x ", True)


def test_nothing_is_emitted_after_a_stop() -> None:
    scanner = StopScanner(("#",))
    scanner.feed("a#b")
    assert scanner.feed("more") == ""
    assert scanner.flush() == ""
