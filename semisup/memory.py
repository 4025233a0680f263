"""Peak memory of this process and the Ray processes it started, sampled in a background thread.

Summed as proportional set size (PSS, Linux): pages shared between processes, such as the Ray
object store's shared memory or imported libraries, count once in the sum instead of once per
process, so the figure is what the job really holds. Where PSS is unavailable, RSS is used.
Only processes on this machine are seen: with a remote cluster, the driver alone.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from types import TracebackType
from typing import Final

import psutil

SAMPLE_EVERY_S: Final = 0.1


def process_tree() -> list[psutil.Process]:
    """This process and all its descendants (a local Ray's raylet, GCS and workers)."""
    this = psutil.Process()
    return [this, *this.children(recursive=True)]


def tree_memory_bytes() -> int:
    """PSS (else RSS) of ``process_tree()`` now, summed; processes that exit meanwhile skipped."""
    total = 0
    for process in process_tree():
        with suppress(psutil.Error):
            info = process.memory_full_info()
            total += int(getattr(info, "pss", info.rss))
    return total


def wait_for_exit(name: str, timeout_s: float = 60.0) -> bool:
    """Wait until no descendant process has ``name`` in its command line (e.g. the actors of a
    finished Ray Data run, which Ray ends lazily); True when none is left within the timeout.
    A measurement started meanwhile would count them in its baseline or its peak."""
    deadline = time.monotonic() + timeout_s
    while True:
        names = []
        for process in process_tree()[1:]:
            with suppress(psutil.Error):
                names.append(" ".join(process.cmdline()))
        if not any(name in line for line in names):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


class PeakMemory:
    """Context manager: ``peak_bytes`` and ``baseline_bytes`` of ``tree_memory_bytes``.

    ``baseline_bytes`` is sampled on entry; ``peak_bytes`` is the largest sample while inside
    (every ``interval_s`` seconds, and once on exit).
    """

    def __init__(self, interval_s: float = SAMPLE_EVERY_S) -> None:
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, tree_memory_bytes())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.baseline_bytes = self.peak_bytes = tree_memory_bytes()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
