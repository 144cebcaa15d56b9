"""Training time as the loop measures it, without making the host wait for the device at every step.

The co-training step only queues work on a GPU; its time is known once the device has done it. The clock
reads the time where the loop waits anyway (a log step reads its statistics), once after the first step of
the process (left out of the run's throughput: allocations, autotuning, compilation) and around evaluations
and checkpoints (left out of both: they are not training).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from ctcd_ds import dist


class TrainingClock:
    """Seconds of training in the current log window and in the run so far (first step excluded)."""

    def __init__(self) -> None:
        self._run_start: float | None = None  # set once the first step is done
        self._run_steps = 0
        self._run_paused = 0.0
        self.new_window()

    def new_window(self) -> None:
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_paused = 0.0

    def stepped(self) -> None:
        """A training step was queued (and, the first time, waited for)."""
        self._window_steps += 1
        if self._run_start is None:
            dist.synchronize()
            self._run_start = time.perf_counter()
        else:
            self._run_steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training time: the device finishes the queued steps first."""
        dist.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self._window_paused += seconds
            if self._run_start is not None:
                self._run_paused += seconds

    def window_tokens_per_s(self, tokens_per_step: int) -> float | None:
        """Tokens/s of the window's steps; call it once the device is done with them (after a read)."""
        seconds = time.perf_counter() - self._window_start - self._window_paused
        return self._window_steps * tokens_per_step / seconds if self._window_steps and seconds > 0 else None

    def run_tokens_per_s(self, tokens_per_step: int) -> float | None:
        """Tokens/s of every step after the first; None when only one step ran."""
        if not self._run_steps:
            return None
        dist.synchronize()
        seconds = time.perf_counter() - self._run_start - self._run_paused
        return self._run_steps * tokens_per_step / seconds
