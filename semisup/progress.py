"""Progress lines of long work: ``LABEL: done/total UNIT (percent), rate UNIT/s``, every few s."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TextIO

PROGRESS_EVERY_S: Final = 2.0  # seconds between two progress lines


class Progress:
    """Counts items done and prints a progress line on ``log`` at most every PROGRESS_EVERY_S.

    ``already``: items done by an earlier, interrupted run (counted in ``done``, not in the
    rate). ``pixels_per_item``: when set, the line also gives megapixels per second.
    ``on_advance``: called with (done, total) after every ``advance``.
    """

    def __init__(
        self,
        log: TextIO | None,
        total: int,
        *,
        label: str,
        unit: str,
        already: int = 0,
        pixels_per_item: int | None = None,
        on_advance: Callable[[int, int], None] | None = None,
    ) -> None:
        self.log, self.total, self.label, self.unit = log, total, label, unit
        self.on_advance = on_advance
        self.done, self.processed, self.pixels_per_item = already, 0, pixels_per_item
        self.start = self.last = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds since this run started."""
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Items this run processed per second."""
        return self.processed / max(self.seconds, 1e-9)

    def advance(self, items: int) -> None:
        """Count ``items`` more done; print a line when the last one is old enough."""
        self.done += items
        self.processed += items
        if self.on_advance is not None:
            self.on_advance(self.done, self.total)
        if time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self.say()

    def say(self) -> None:
        """Print the line now (nothing without a log)."""
        self.last = time.perf_counter()
        if self.log is None:
            return
        percent = 100.0 * self.done / max(self.total, 1)
        line = (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
            f"{self.rate:.2f} {self.unit}/s"
        )
        if self.pixels_per_item is not None:
            line += f", {self.rate * self.pixels_per_item / 1e6:.2f} Mpx/s"
        print(line, file=self.log, flush=True)
