"""Repetition-loop guard: notices when a model keeps writing the same passage.

Small models on long answers sometimes fall into a loop, writing one sentence or
paragraph again and again until max_tokens. The guard watches the generated text
and says when to stop.

How it decides: a loop is a unit of P >= `min_chars` characters (a sentence, a
paragraph, or several) written again and again. It is reported once the text ends
with `threshold` copies of the unit, where for a unit longer than `window` the last
copy only needs to have reached `window` characters: so "the same sentence three
times in a row" is caught at once, and a long looping paragraph after two copies
plus `window` characters of the third. Candidate periods P are the distances back to
earlier occurrences of the last `min_chars` characters; each is verified with one
string comparison (text of length L has period P when text[P:] == text[:-P]). A
unit with no letter or digit in it never counts (rules, blank lines).

Cost: the check runs only when a sentence or line ends, or every `check_every`
characters otherwise, and searches at most `history_chars` characters, so it stays
a few microseconds per token. Pure: no I/O, no threads.
"""
from __future__ import annotations

_BOUNDARIES = frozenset(".!?\n。！？")


class RepetitionGuard:
    """Feed it the text as it streams; `feed` returns True once a loop was seen."""

    def __init__(self, window: int = 200, threshold: int = 3, *, min_chars: int = 20,
                 check_every: int = 32, history_chars: int = 16384):
        self.window = max(0, int(window))
        self.threshold = int(threshold)
        self.min_chars = min_chars
        self.check_every = max(1, check_every)
        self.max_candidates = 64  # earlier probe matches tried per check, nearest first
        # Keep enough text for `threshold` copies of a paragraph several windows long.
        self.history_chars = max(history_chars, self.window * max(self.threshold, 1) * 2)
        self._text = ""
        self._pending: list = []   # pieces not yet joined into _text (joined per check)
        self._unchecked = 0
        self.detected = False

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.threshold >= 2

    def feed(self, piece: str) -> bool:
        if self.detected:
            return True
        if not self.enabled or not piece:
            return False
        # Joining happens once per check, not per token: appending to a long string
        # stored on an object copies it every time.
        self._pending.append(piece)
        self._unchecked += len(piece)
        if self._unchecked < self.check_every and not _BOUNDARIES.intersection(piece):
            return False
        self._text += "".join(self._pending)
        self._pending.clear()
        if len(self._text) > 2 * self.history_chars:
            self._text = self._text[-self.history_chars:]
        self._unchecked = 0
        self.detected = self._tail_repeats()
        return self.detected

    def _tail_repeats(self) -> bool:
        text = self._text[-self.history_chars:]
        probe_len = self.min_chars
        if len(text) < self.threshold * probe_len:
            return False
        probe = text[-probe_len:]
        end = len(text) - 1  # excludes the probe's own position
        for _ in range(self.max_candidates):
            start = text.rfind(probe, 0, end)
            if start < 0:
                return False
            period = len(text) - probe_len - start
            if self._ends_with_copies(text, period):
                return True
            end = start + probe_len - 1
        return False

    def _ends_with_copies(self, text: str, period: int) -> bool:
        needed = (self.threshold - 1) * period + min(period, self.window)
        if period < self.min_chars or needed > len(text):
            return False
        recent = text[-needed:]
        if not any(ch.isalnum() for ch in recent[-period:]):
            return False
        return recent[period:] == recent[:-period]
