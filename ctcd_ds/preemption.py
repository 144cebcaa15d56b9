"""Stopping cleanly: a signal or a vanished launcher becomes a stop request that every rank agrees on.

SIGTERM (Slurm's preemption, Kubernetes eviction), SIGUSR1 (``#SBATCH --signal``) and SIGINT (Ctrl-C) on
any rank set a flag; the trainer finishes the optimizer step it is in, the ranks agree (one all-reduce of
the flag per step), every rank writes the checkpoint of that step, and the run ends with
:class:`~ctcd_ds.errors.Preempted` (exit status 75 from the command line). Running the same command again
resumes there. A second SIGINT aborts at once.

Under the ``deepspeed`` launcher each rank also watches the launcher: if the top-level ``deepspeed``
process disappears (killed alone, so its ranks would train on as orphans), the rank stops the same way.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ctcd_ds import dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
WATCH_INTERVAL_S = 1.0


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (Linux /proc), or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the command name


def _launched_by_deepspeed(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"deepspeed.launcher.launch" in cmdline


class StopRequest:
    """The flag a signal or the launcher watch sets; ``install()`` / ``restore()`` around a run."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._watching = threading.Event()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        launcher = os.getppid()
        runner = _parent_of(launcher)
        if runner is not None and _launched_by_deepspeed(launcher):
            self._watching.set()
            threading.Thread(
                target=self._watch, args=(launcher, runner), name="ctcd-launcher-watch", daemon=True
            ).start()

    def restore(self) -> None:
        self._watching.clear()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: abort now, no checkpoint
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason} on rank {dist.rank()}: stopping after this step with a checkpoint", flush=True)

    def _watch(self, launcher: int, runner: int) -> None:
        """Stop when the launcher process goes, or when it is orphaned (its parent, ``deepspeed``, went)."""
        while self._watching.is_set():
            time.sleep(WATCH_INTERVAL_S)
            if os.getppid() != launcher or _parent_of(launcher) != runner:
                self.reason = "the deepspeed launcher exited"
                print(f"\n{self.reason} (rank {dist.rank()}): stopping after this step with a checkpoint", flush=True)
                return

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was asked to stop (a host-side collective, every step)."""
        return dist.any_rank(self.reason is not None)
