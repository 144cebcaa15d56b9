"""CPU parallelism for the fused losses: row ranges on worker threads, each running single-threaded torch ops.

The chunked torch path of :mod:`ctcd_ds.losses.fused` issues ~16 elementwise/reduction ops per chunk. With
torch's intra-op (OpenMP) threads every op is a parallel region ending in a barrier; when the cores are
shared (another process, or two ranks on two cores) a barrier waits for a descheduled thread for a whole
scheduler slice, which makes such a loop of small ops far slower than running it single-threaded. Instead,
on CPU, :func:`row_parallel` hands row ranges to ``torch.get_num_threads()`` Python threads (torch releases
the GIL inside ops) while the intra-op thread count is set to 1, so there is no barrier per op.

The intra-op setting is global: it is restored on exit, and concurrent callers of these functions from
several Python threads are not supported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

THREAD_NAME_PREFIX = "ctcd-kd"
"""Name prefix of the worker threads."""

_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, pool)
_POOL_LOCK = threading.Lock()


def worker_pool(size: int) -> ThreadPoolExecutor:
    """The persistent worker pool, rebuilt when torch's thread count changes or in a forked child (whose
    copy of the pool has no threads)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[:2] != (os.getpid(), size):
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown(wait=False)
            _POOL = (os.getpid(), size, ThreadPoolExecutor(size, thread_name_prefix=THREAD_NAME_PREFIX))
        return _POOL[2]


@contextmanager
def single_threaded_ops():
    """Inside the block torch ops use one intra-op thread; the previous count is restored on exit."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def row_parallel(device: torch.device, n: int, min_rows: int, fn: Callable[[int, int], None]) -> None:
    """Run ``fn(start, end)`` over ``[0, n)``: split across worker threads on CPU when worth it.

    On CPU, up to ``torch.get_num_threads()`` contiguous ranges of at least ``min_rows`` rows each run on
    :func:`worker_pool` under :func:`single_threaded_ops`; otherwise (other devices, one thread, too few
    rows) ``fn(0, n)`` runs in the calling thread.
    """
    threads = torch.get_num_threads()
    workers = min(threads, n // max(min_rows, 1)) if device.type == "cpu" else 1
    if workers <= 1:
        fn(0, n)
        return
    step = -(-n // workers)
    pool = worker_pool(threads)
    with single_threaded_ops():
        for f in [pool.submit(fn, s, min(s + step, n)) for s in range(0, n, step)]:
            f.result()
