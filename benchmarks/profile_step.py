"""Where a co-training step's time goes: the torch profiler over a few real steps, split by the step's phases.

    python benchmarks/profile_step.py [--config ctcd] [--steps 4] [--warmup 2] [--out DIR] [--trace]
                                      [--quick] [--section.key=value ...]

Builds the recipe's run through the real engines (one process), runs ``--warmup`` steps, then profiles
``--steps`` steps (CPU activity, and CUDA kernels on a GPU). The step marks its phases with ``record_function``
(``ctcd_ds/step.py``): each member's ``forward``, ``loss`` and ``backward`` (DeepSpeed's gradient hooks and
reductions run inside it), the ``kd_loss`` of every edge, and each member's ``optimizer_step`` (DeepSpeed's
step: clipping, the optimizer, ZeRO's partition updates). Prints, per phase, host time (the profiler's range)
and, on a GPU, device time (CUDA events around the phase on the stream, idle gaps inside it included) as a
share of the step; the device's busy share of the wall time (every kernel's time once; the rest: the GPU
waits for the host -- launch gaps and syncs); and the operators that take the most time (device time of the
kernels they launch on a GPU, own host time on a CPU). Writes ``profile.json`` (and with
``--trace`` a Chrome trace, for chrome://tracing or Perfetto) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctcd_ds import dist  # noqa: E402
from ctcd_ds import step as co_training_step  # noqa: E402
from ctcd_ds.checks import check  # noqa: E402
from ctcd_ds.config import load_config  # noqa: E402
from ctcd_ds.tasks import MaskedLM  # noqa: E402
from ctcd_ds.trainer import Trainer  # noqa: E402

QUICK = ["--data.seq_len=32", "--data.max_train_blocks=64", "--train.micro_batch_size=4", "--tokenizer.vocab_size=1000"]
"""--quick: a smoke run of the script itself (seconds), not a measurement."""

PHASES = ("forward", "loss", "backward", "optimizer_step")


def _self_device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


class PhaseEvents:
    """Stands in for ``record_function`` in ``ctcd_ds.step``: the same profiler range, plus (on a GPU) a CUDA event
    pair around the phase. The time between them on the stream is the phase's device time, its backward
    included (autograd runs a GPU backward on its own thread, outside the range the profiler sees)."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.spans: dict[str, list] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str):
        with record_function(name):
            if not self.on_gpu:
                yield
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans[name].append((start, end))

    def device_ms(self, name: str) -> float:
        return sum(start.elapsed_time(end) for start, end in self.spans.get(name, ()))


def phase_names(members: list[str]) -> list[str]:
    return [f"{m}/{p}" for m in members for p in PHASES[:3]] + ["kd_loss"] + [f"{m}/optimizer_step" for m in members]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ctcd", help="a recipe (e.g. ctcd_paper, ctcd_large)")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before profiling (allocations, autotuning)")
    parser.add_argument("--out", default="runs/profile", help="where profile.json (and the trace) go")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace (large)")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--quick", action="store_true", help="1 profiled step of tiny shapes: checks the script runs")
    args, overrides = parser.parse_known_args()
    if args.quick:
        args.steps, args.warmup, overrides = 1, 1, [*QUICK, *overrides]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist.init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*overrides, f"--output_dir={tmp}/run"])
        check(cfg)
        trainer = Trainer(cfg, MaskedLM(cfg))
        batches = iter(trainer.task.loader)
        for step in range(args.warmup):
            trainer.step_fn(batches, step)
        dist.synchronize()
        on_gpu = dist.device().type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        phase_events = PhaseEvents(on_gpu)
        co_training_step.record_function = phase_events  # the step's phases, timed on the device too
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for step in range(args.warmup, args.warmup + args.steps):
                trainer.step_fn(batches, step)
            dist.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
        members = list(trainer.members)
        trainer.close()
    if args.trace:
        prof.export_chrome_trace(str(out / "trace.json"))
    events = prof.key_averages()
    # every name appears once per device type: host ops and ranges are CPU entries (their device time: the kernels
    # launched inside them); each kernel is a CUDA entry too, and a range also gets a CUDA annotation entry
    host = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    by_name = {e.key: e for e in host}
    phases = {}
    for name in phase_names(members):
        e = by_name.get(name)
        if e is not None:
            phases[name] = {
                "host_ms": e.cpu_time_total / 1e3 / args.steps,
                "device_ms": phase_events.device_ms(name) / args.steps,
            }
    busy_us = sum(_self_device_us(e) for e in kernels) if on_gpu else None  # each kernel counted once
    ops = [e for e in host if e.key not in phases]
    top = sorted(ops, key=lambda e: -(_self_device_us(e) if on_gpu else e.self_cpu_time_total))
    report = {
        "config": args.config,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "step_ms": wall_us / 1e3 / args.steps,
        "device_busy_share": busy_us / wall_us if busy_us is not None else None,
        "phases": phases,
        "top_ops": [
            {
                "op": e.key,
                "self_host_ms": e.self_cpu_time_total / 1e3 / args.steps,
                "self_device_ms": _self_device_us(e) / 1e3 / args.steps,
                "calls": e.count // args.steps,
            }
            for e in top[: args.top]
        ],
    }
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print_report(report)


def print_report(r: dict) -> None:
    step = r["step_ms"]
    print(f"{r['config']} on {r['device']} ({r['threads']} threads): {step:.1f} ms per step over {r['steps']} steps")
    if r["device_busy_share"] is not None:
        print(f"device busy {100 * r['device_busy_share']:.1f}% of the wall time (the rest: waiting for the host)")
    print(f"{'phase':28s} {'host ms':>9s} {'host %':>7s} {'device ms':>10s} {'device %':>9s}")
    for name, p in r["phases"].items():
        print(
            f"{name:28s} {p['host_ms']:9.1f} {100 * p['host_ms'] / step:6.1f}% "
            f"{p['device_ms']:10.1f} {100 * p['device_ms'] / step:8.1f}%"
        )
    covered = sum(p["host_ms"] for p in r["phases"].values())
    print(f"{'(outside the phases)':28s} {step - covered:9.1f} {100 * (step - covered) / step:6.1f}%")
    print(f"\ntop operators by own time ({'device' if r['device_busy_share'] is not None else 'host'}), per step:")
    for op in r["top_ops"]:
        print(
            f"  {op['op'][:60]:60s} host {op['self_host_ms']:8.2f} ms  "
            f"device {op['self_device_ms']:8.2f} ms  x{op['calls']}"
        )


if __name__ == "__main__":
    main()
