"""Distributed setup and rank-aware helpers (the only module that talks to torch.distributed directly)."""

from __future__ import annotations

import contextlib
import gc
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

_nodes = 1
"""How many nodes the run has (ranks with local rank 0), counted by :func:`init_distributed`."""

_host_group = None
"""A gloo group of every rank (several ranks only): collectives of host values that must not wait for the GPU."""


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
    _share_cpu_cores()
    # DeepSpeed logs every engine's full config at INFO on every rank; keep its warnings only
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    global _nodes, _host_group
    if world_size() > 1:
        _host_group = torch_dist.new_group(backend="gloo", timeout=timeout)
    _nodes = int(all_reduce_sum(torch.tensor([float(is_local_rank0())]))[0]) if world_size() > 1 else 1
    if world_size() > 1:
        print0(
            f"distributed: {world_size()} ranks on {_nodes} node{'s' * (_nodes > 1)} "
            f"(rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
        )


def _share_cpu_cores() -> None:
    """CPU ranks on one node split its cores: without OMP_NUM_THREADS, torch would give every rank a thread per
    core, and N ranks would run N threads per core (slower than one rank alone on the CPUs here)."""
    if device().type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks_here))


SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""The shared-memory file DeepSpeed's CPU all-reduce makes per rank when every rank is on one node
(ops/csrc/cpu/comm/shm.cpp) and never removes: 66 MB of RAM per rank and run, until the machine reboots."""


def cleanup() -> None:
    me = rank()
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    if device().type == "cpu":  # the other ranks mapped this rank's buffer when they joined: the name can go
        env = os.environ
        name = SHM_BUFFER.format(
            uid=os.getuid(), addr=env.get("MASTER_ADDR", ""), port=env.get("MASTER_PORT", ""), rank=me
        )
        with contextlib.suppress(OSError):
            os.unlink(name)


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def num_nodes() -> int:
    return _nodes if torch_dist.is_initialized() else 1


def is_local_rank0() -> bool:
    """The first rank of its node: the one that fills the node's caches (nodes need not share a disk)."""
    return local_rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.barrier()


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


@contextlib.contextmanager
def rank0_first():
    """Global rank 0 runs the block first (e.g. fills a cache); then the first rank of every other node (filling
    its node's cache, or finding rank 0's where the nodes share a disk); then every other rank (reading it). Nodes
    need not share a disk; where they do, the others find rank 0's cache instead of writing it at the same time."""
    first, node_first = is_rank0(), is_local_rank0() and not is_rank0()
    if not first:
        barrier()  # rank 0 is done
    if not (first or node_first):
        barrier()  # every node's first rank is done
    yield
    if first:
        barrier()
    if first or node_first:
        barrier()


def device() -> torch.device:
    name = get_accelerator().device_name()
    return torch.device(name, local_rank()) if name != "cpu" else torch.device("cpu")


def synchronize() -> None:
    """Wait until this rank's device has done all queued work (nothing to wait for on the CPU)."""
    if device().type != "cpu":
        get_accelerator().synchronize()


def peak_memory_bytes() -> int:
    """This rank's peak memory so far: what torch allocated on the GPU (``max_memory_allocated``), or on
    a CPU-only run the process's peak resident set size (everything the process touched, not just tensors)."""
    dev = device()
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_now_bytes() -> int:
    """This rank's memory now, measured as :func:`peak_memory_bytes` measures its peak (GPU: allocated by torch;
    CPU: the resident set, from /proc/self/statm)."""
    dev = device()
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage on this rank's device that Python objects hold now (weights, gradients,
    optimizer states, buffers): what ZeRO partitions, without the allocator's slack or transient peaks."""
    dev, sizes = device().type, {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == dev:
            storage = obj.untyped_storage()
            try:
                pointer = storage.data_ptr()
            except RuntimeError:  # no memory of its own: the functional tensors torch.compile keeps from tracing
                continue
            if pointer:  # 0: no memory either (fake tensors of tracing, empty tensors)
                sizes[pointer] = storage.nbytes()
    return sum(sizes.values())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a float tensor over ranks, returned on the CPU (NCCL needs the tensor on the GPU)."""
    out = values.detach().to(device(), dtype=torch.float64 if device().type == "cpu" else torch.float32, copy=True)
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out.cpu()


def any_rank(flag: bool) -> bool:
    """Collective: whether ``flag`` is true on some rank. It goes through a CPU (gloo) group, so the host does not
    wait for the GPU's queued work (a NCCL all-reduce read back on the host would, every step)."""
    if not (torch_dist.is_initialized() and world_size() > 1):
        return flag
    if _host_group is None:  # the process group was made elsewhere: the default group, on its device
        value = torch.tensor([int(flag)], device=device())
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.cpu()[0])
    value = torch.tensor([int(flag)])
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX, group=_host_group)
    return bool(value[0])


def all_gather_object(obj) -> list:
    """Every rank's value of ``obj``, in rank order, on every rank."""
    if not (torch_dist.is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's value of ``obj`` on every rank."""
    if not (torch_dist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
