"""Distributed setup and rank-aware helpers (the only module that talks to torch.distributed directly)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as torch_dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.accelerator import get_accelerator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600) -> None:
    """Join the process group the deepspeed launcher set up, or make a 1-process one when run directly;
    a collective that waits longer than ``timeout_s`` for the other ranks fails."""
    if torch_dist.is_initialized():
        return
    if "RANK" not in os.environ:  # run without a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed builds its data-parallel groups with new_group(), which takes torch's module-level default
    # (30 minutes for gloo, 10 for NCCL) rather than the world group's timeout: make ours the default.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=None, verbose=False, timeout=timeout)
    # DeepSpeed logs every engine's full config at INFO on every rank; keep its warnings only
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.barrier()


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (e.g. fills a cache), then the other ranks run it."""
    if not is_rank0():
        barrier()
    yield
    if is_rank0():
        barrier()


def device() -> torch.device:
    name = get_accelerator().device_name()
    return torch.device(name, local_rank()) if name != "cpu" else torch.device("cpu")


def peak_memory_bytes() -> int:
    """This rank's peak memory so far: what torch allocated on the GPU (``max_memory_allocated``), or on
    a CPU-only run the process's peak resident set size (everything the process touched, not just tensors)."""
    dev = device()
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a float tensor over ranks, returned on the CPU (NCCL needs the tensor on the GPU)."""
    out = values.detach().to(device(), dtype=torch.float64 if device().type == "cpu" else torch.float32, copy=True)
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out.cpu()


def broadcast_object(obj):
    """Rank 0's value of ``obj`` on every rank."""
    if not (torch_dist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
