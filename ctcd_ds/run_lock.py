"""One live run per output directory: an exclusive ``flock`` on ``<output_dir>/.lock``, held by global rank 0
for the whole run and released by the kernel when the process ends, however it ends.

A second live run in the same directory stops with a line naming the directory and the owner. A lock file
left with an owner's details by a run that died (kill -9, a lost node) is taken over with a warning: the
kernel already released its lock. ``flock`` is reliable on local disks and most cluster file systems
(Lustre, GPFS, NFSv4 with locking); on file systems without locking the check does nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ctcd_ds.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None

    def _owner(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return "an unknown process"
        if not info:
            return ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        return f"pid {info.get('pid')} on {info.get('host')}, started {started}"

    def acquire(self) -> None:
        """Take the lock (creating the output directory), or raise UserError if a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"output_dir={self.path.parent}: another run is using it ({self._owner()}); wait for it to end, "
                "stop it, or choose another output_dir"
            ) from None
        stale = self._owner()
        if stale:
            print(f"warning: {self.path}: taking over the lock of a run that is gone ({stale})", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0
        )
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Clear the owner's details and let go (a run that ends normally leaves no stale details)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
