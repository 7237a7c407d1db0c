"""Stop strings over a token stream whose text arrives in arbitrary pieces."""

from __future__ import annotations


class StopScanner:
    """Passes text through until a stop string appears, holding back a possible prefix of one.

    Text that could still become the start of a stop string is kept until the next piece
    decides it, so a stop string is never streamed to a client, even split over tokens.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the text."""

    def feed(self, piece: str) -> str:
        """Add a piece; returns the text that is now safe to emit."""
        if self.stopped:
            return ""
        text = self._held + piece
        found = [(i, stop) for stop in self._stops if (i := text.find(stop)) >= 0]
        if found:
            cut, self.matched = min(found)
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._longest_partial_stop(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text, once the stream ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_stop(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
