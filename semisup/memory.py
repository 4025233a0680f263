"""Peak memory of this process and the Ray processes it started, sampled in a background thread.

Two figures. All processes summed as proportional set size (PSS, Linux): pages shared between
processes, such as the Ray object store's shared memory or imported libraries, count once in
the sum instead of once per process, so the figure is what the job really holds. And the
unique set size (USS) of the processes doing the work (this process and, say, an actor class):
what they hold privately, which is where a job's own buffers live. Where PSS or USS is
unavailable, RSS is used. Only processes on this machine are seen: with a remote cluster, the
driver alone.
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


def tree_memory_bytes(focus: str | None = None) -> tuple[int, int]:
    """(PSS, else RSS, of ``process_tree()`` summed; USS of this process plus the descendants
    with ``focus`` in their command line) now, in bytes. USS counts only pages a process holds
    alone (its heap, model, buffers), not shared ones such as the Ray object store's, whose
    touched pages stay resident as data cycles through the store. Processes that exit
    meanwhile are skipped."""
    total = focused = 0
    for index, process in enumerate(process_tree()):
        with suppress(psutil.Error):
            info = process.memory_full_info()
            total += int(getattr(info, "pss", info.rss))
            if index == 0 or (focus and focus in " ".join(process.cmdline())):
                focused += int(getattr(info, "uss", info.rss))
    return total, focused


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
    """Context manager: peak and baseline of ``tree_memory_bytes(focus)``.

    ``baseline_bytes`` and ``focus_baseline_bytes`` are sampled on entry; ``peak_bytes`` and
    ``focus_peak_bytes`` are the largest samples while inside (every ``interval_s`` seconds,
    and once on exit). ``focus`` names the processes doing the work (e.g. an actor class):
    their figure leaves out Ray's own processes, which come and go independently of the job.
    """

    def __init__(self, focus: str | None = None, interval_s: float = SAMPLE_EVERY_S) -> None:
        self.focus, self.interval_s = focus, interval_s
        self.baseline_bytes = self.peak_bytes = 0
        self.focus_baseline_bytes = self.focus_peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        total, focused = tree_memory_bytes(self.focus)
        self.peak_bytes = max(self.peak_bytes, total)
        self.focus_peak_bytes = max(self.focus_peak_bytes, focused)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.baseline_bytes, self.focus_baseline_bytes = tree_memory_bytes(self.focus)
        self.peak_bytes, self.focus_peak_bytes = self.baseline_bytes, self.focus_baseline_bytes
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
