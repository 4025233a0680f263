"""Putting predicted windows back together: jobs, a reorder buffer, the blender and the writer.

A raster is predicted in jobs, one per window row of a vertical stripe (``plan_jobs``), top to
bottom within a stripe. Predicted windows reach the driver in any order; ``Stitcher`` keeps
them until their job is complete, then blends the jobs in order (``semisup.blend``) and hands
the rows no later window touches to the output's ``MapWriter``. Ray-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from semisup import blend
from semisup import columns as C
from semisup.map_writer import MapWriter
from semisup.raster_windows import RasterSource
from semisup.window_predictor import JOB, PROBABILITIES


@dataclass(frozen=True)
class Job:
    """The unit of work of an actor: the windows of one window row of one stripe of one output."""

    seq: int
    output: int  # index into the run's outputs
    stripe: int
    y0: int  # px, the window row's first row
    first_col: int  # [first_col, last_col) index into the raster's column window starts
    last_col: int
    finish_row: int  # rows above this are final once the job is blended
    first_of_stripe: bool


class Stripes(Protocol):
    """What ``plan_jobs`` reads of an output: its stripes and the rows of each already done
    (a ``MapWriter``; detection, which writes boxes, has its own)."""

    @property
    def stripes(self) -> list[tuple[int, int]]: ...  # [x0, x1) px per vertical stripe

    @property
    def rows_done(self) -> list[int]: ...  # rows of each stripe already written


def plan_jobs(
    outputs: Sequence[tuple[RasterSource, Stripes]], tile: int, overlap: int
) -> list[Job]:
    """Jobs for every row not yet written, output by output, stripe by stripe, top to bottom."""
    jobs: list[Job] = []
    for index, (source, writer) in enumerate(outputs):
        row_starts = blend.window_starts(source.height, tile, overlap)
        col_starts = blend.window_starts(source.width, tile, overlap)
        for stripe, (x0, x1) in enumerate(writer.stripes):
            done = writer.rows_done[stripe]
            if done >= source.height:
                continue
            first_col, last_col = blend.windows_in_span(col_starts, tile, x0, x1)
            first_row, _ = blend.windows_in_span(row_starts, tile, done, source.height)
            for row in range(first_row, len(row_starts)):
                finish = row_starts[row + 1] if row + 1 < len(row_starts) else source.height
                jobs.append(
                    Job(
                        len(jobs),
                        index,
                        stripe,
                        row_starts[row],
                        first_col,
                        last_col,
                        finish,
                        row == first_row,
                    )
                )
    return jobs


class Stitcher:
    """Takes predicted windows in any order; blends and writes them job by job, in order."""

    def __init__(
        self,
        jobs: Sequence[Job],
        outputs: Sequence[tuple[RasterSource, MapWriter]],
        num_classes: int,
        weights: np.ndarray,
    ) -> None:
        self.jobs, self.outputs = jobs, outputs
        self.num_classes, self.weights = num_classes, weights
        self.pending: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
        self.next = 0
        self.accumulator: blend.BandAccumulator | None = None
        self.finished: list[int] = []  # outputs completed, in order

    def add(self, batch: Mapping[str, np.ndarray]) -> int:
        """Buffer a batch of windows; process every job now complete. Returns windows added."""
        for i, seq in enumerate(batch[JOB]):
            self.pending.setdefault(int(seq), []).append(
                (
                    int(batch[C.Y0][i]),
                    int(batch[C.X0][i]),
                    batch[PROBABILITIES][i],
                    batch[C.VALID][i],
                )
            )
        while self.next < len(self.jobs):
            job = self.jobs[self.next]
            windows = self.pending.get(job.seq, [])
            if len(windows) < job.last_col - job.first_col:
                break
            self._blend(job, self.pending.pop(job.seq))
            self.next += 1
        return len(batch[JOB])

    def _blend(self, job: Job, windows: list[tuple[int, int, np.ndarray, np.ndarray]]) -> None:
        source, writer = self.outputs[job.output]
        x0, x1 = writer.stripes[job.stripe]
        if job.first_of_stripe or self.accumulator is None:
            self.accumulator = blend.BandAccumulator(
                x0,
                x1,
                source.height,
                self.num_classes,
                self.weights,
                top=writer.rows_done[job.stripe],
            )
        for y0, wx0, probabilities, valid in windows:
            self.accumulator.add(y0, wx0, probabilities, valid)
        first, label, confidence = self.accumulator.finish(job.finish_row)
        writer.add_rows(job.stripe, first, label, confidence)
        if writer.complete:
            self.finished.append(job.output)
