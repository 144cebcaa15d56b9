"""Bidirectional KD loss: torch baselines vs fused (chunked) vs fused LM head, time and extra memory.

    python benchmarks/kd_loss.py [--rows 1024 4096] [--vocab 8192 30522] [--hidden 256] [--reps 3] [--quick]

For every (rows N, vocab V) it times forward + both backwards (median of ``--reps``, methods interleaved
round-robin, after one warm-up each) of:

  reference        ``kd_loss(a, b)`` and ``kd_loss(b, a)`` (two ``F.kl_div``, four log-softmaxes) on full fp32
                   logits: the naive baseline
  torch_shared_lsm what a careful torch user writes (:func:`shared_log_softmax_kl`): one ``log_softmax`` per
                   side, ``p = exp(log p)``, both KL directions from those, both gradients by autograd (each
                   direction's source detached as in ``kd_loss``: ``loss_ab`` reaches only b, ``loss_ba`` only a)
  fused            ``bidirectional_kl`` (torch chunked path)
  copy floor       ``a.clone(); b.clone()``: reading both logits once and writing two fresh tensors of the
                   same size, which is what the fused loss must at least do (its two gradients). Fresh
                   memory is page-faulted in on first touch, which on this VM costs more than the copy.
  copy into        ``copy_`` of both into existing tensors (no page faults): for information only
  head reference   ``z = h @ W.T + b`` for both models (H = ``--hidden``), ``F.cross_entropy`` + ``kd_loss``,
                   backward of ``mlm_a + kd_ba`` and of ``mlm_b + kd_ab``
  head fused       ``fused_linear_bidirectional_kl`` on the same inputs

Memory (unless ``--no-memory``): each method runs once in a fresh subprocess (after a tiny warm-up call
that initialises the libraries); "peak" is the process's peak RSS during the call (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``) minus its RSS just before, with the inputs already allocated; glibc's
mmap threshold is fixed at 64 KiB there, so freed blocks go back to the OS and RSS follows live memory.
It includes the gradients the call returns; "extra" subtracts them (the logits gradients for
the logits methods; the hidden/weight/bias gradients for the head methods), i.e. what a method needs
beyond its inputs and its outputs. Ratios are to one ``N x V`` float32 tensor. RSS is page-granular and
sees every allocator; it cannot see memory that was freed and reused within the call (that is the point).

The gradients of every logits method (baselines and fused) are checked against the reference's before
timing. ``vs_ref`` is the speed
relative to the naive reference, ``vs_best`` relative to the fastest baseline of the shape, ``mem_vs_best`` the
extra memory relative to the smallest of the baselines' (for the head methods the only baseline is
``head_reference``); a line per shape then compares the fused loss with the best baseline.

The last line is JSON with the figures for the largest shape. Timings on a shared 2-core machine are
noisy: the load average is printed at start and end. ``--quick``: tiny shapes, a smoke run.

``--device cuda`` (GPU only; not runnable on our CPU machines) runs the same comparison on the GPU, in
``--dtype fp32`` or ``bf16`` logits: CUDA-event timings (median of ``--reps`` after warm-up) of the
reference, ``torch_shared_lsm`` eagerly and under ``torch.compile`` (``torch_compiled``; skipped with a
note if compilation fails, or with ``--no-compile``; compile time is not timed), the fused loss through its
torch path (``fused_torch``) and through the Triton kernel on each of its paths, forced, with the default
launch settings (``triton_one_pass``: each row read once, at any V; ``triton_two_pass``: each row read
twice), the copy floor and the two head variants; extra memory = ``torch.cuda.max_memory_allocated`` during
the call minus the memory before it and minus the gradients it returns. The kernels' effective bandwidth
counts the bytes the loss must move at least (read both logits, write both gradients: ``4 * N * V *
element size``, what ``copy_floor`` moves) and is compared with the copy floor timed in the same run
(``of_copy_floor``: ``copy_floor``'s time over the method's) and with the device's copy bandwidth, measured
first (``of_copy_bw``: ``torch.clone`` of 2 GiB). The JSON summary's ``fused`` is the path
``backend="auto"`` takes at that V (``triton_kd.resolve_path``). ``--sweep`` also times the two-pass kernel
under every launch setting of ``triton_kd.TUNING_GRID`` (block size, warps, persistent grid) and the one-pass
kernel with and without a persistent grid at each shape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ctcd_ds.losses import bidirectional_kl, fused_linear_bidirectional_kl, kd_loss, triton_kd  # noqa: E402

TAU = 2.0
QUICK_SHAPES = {"rows": [64, 256], "vocab": [2048], "hidden": 32}
"""``--quick``: tiny shapes for a smoke run (CPU and CUDA), with :data:`QUICK_REPS` reps."""
QUICK_REPS = 3
METHODS = ("reference", "torch_shared_lsm", "fused", "copy_floor", "copy_into", "head_reference", "head_fused")
BASELINES = ("reference", "torch_shared_lsm", "torch_compiled")
"""The torch implementations of the logits loss the fused one is compared with (``torch_compiled``: CUDA)."""
HEAD_BASELINES = ("head_reference",)
TRITON_ROWS = ("triton_one_pass", "triton_two_pass")
"""The Triton kernel's rows in the CUDA comparison, one per path."""


# ---------------------------------------------------------------------------------------------- inputs


def logits_inputs(n: int, v: int):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    b = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    return a, b


def head_inputs(n: int, v: int, h: int):
    g = torch.Generator().manual_seed(1)
    ts = []
    for _ in range(2):
        ts += [
            torch.randn(n, h, generator=g).requires_grad_(),
            (torch.randn(v, h, generator=g) * 0.1).requires_grad_(),
            (torch.randn(v, generator=g) * 0.1).requires_grad_(),
        ]
    labels = torch.randint(0, v, (n,), generator=g)
    return ts, labels


# ---------------------------------------------------------------------------------------------- methods


def clear(tensors):
    for t in tensors:
        t.grad = None


def run_reference(a, b):
    clear((a, b))
    kd_loss(a, b, TAU).backward()
    kd_loss(b, a, TAU).backward()


def shared_log_softmax_kl(a: torch.Tensor, b: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_ab, loss_ba)`` as ``kd_loss(a, b, tau)`` and ``kd_loss(b, a, tau)``, from one log-softmax per side.

    ``loss_ab = tau^2 * sum p_a * (log p_a - log p_b) / N`` with ``p_a`` and ``log p_a`` detached, so its gradient
    reaches only ``b``; ``loss_ba`` symmetrically reaches only ``a``. Each side's ``log_softmax`` (computed in
    float32) is shared by both directions, and ``p = exp(log p)`` is taken from the detached log-probabilities.
    """
    la = F.log_softmax(a.float() / tau, dim=-1)
    lb = F.log_softmax(b.float() / tau, dim=-1)
    la_src, lb_src = la.detach(), lb.detach()
    pa, pb = la_src.exp(), lb_src.exp()
    scale = tau * tau / max(a.shape[0], 1)
    loss_ab = (pa * (la_src - lb)).sum() * scale
    loss_ba = (pb * (lb_src - la)).sum() * scale
    return loss_ab, loss_ba


def run_shared(a, b, fn=shared_log_softmax_kl):
    """Forward, and both gradients in one backward call (the two graphs are disjoint, so this costs what one
    backward per loss would; it also works for a compiled ``fn``, whose losses share one autograd node)."""
    clear((a, b))
    torch.autograd.backward(fn(a, b, TAU))


def run_fused(a, b):
    clear((a, b))
    out = bidirectional_kl(a, b, TAU, backend="torch")
    out.loss_ab.backward()
    out.loss_ba.backward()


def run_copy_floor(a, b):
    return a.detach().clone(), b.detach().clone()


def run_copy_into(a, b, out):
    out[0].copy_(a.detach())
    out[1].copy_(b.detach())


def run_head_reference(ts, labels):
    clear(ts)
    ha, wa, ba, hb, wb, bb = ts
    za, zb = F.linear(ha, wa, ba), F.linear(hb, wb, bb)
    (F.cross_entropy(za, labels) + kd_loss(zb, za, TAU)).backward()
    (F.cross_entropy(zb, labels) + kd_loss(za, zb, TAU)).backward()


def run_head_fused(ts, labels):
    clear(ts)
    out = fused_linear_bidirectional_kl(*ts[:3], *ts[3:], labels, TAU, backend="torch")
    (out.mlm_a + out.loss_ba).backward()
    (out.mlm_b + out.loss_ab).backward()


def make_calls(n: int, v: int, h: int):
    """({method: zero-argument callable}, the logits inputs), the methods sharing the inputs."""
    a, b = logits_inputs(n, v)
    ts, labels = head_inputs(n, v, h)
    out = (torch.zeros_like(a), torch.zeros_like(b))
    calls = {
        "reference": lambda: run_reference(a, b),
        "torch_shared_lsm": lambda: run_shared(a, b),
        "fused": lambda: run_fused(a, b),
        "copy_floor": lambda: run_copy_floor(a, b),
        "copy_into": lambda: run_copy_into(a, b, out),
        "head_reference": lambda: run_head_reference(ts, labels),
        "head_fused": lambda: run_head_fused(ts, labels),
    }
    return calls, (a, b)


def check_gradients(calls: dict, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    """Exit with an error unless every logits method gives the reference's gradients (max abs difference
    within ``tol`` times the largest reference entry, per input)."""
    calls["reference"]()
    want = a.grad.float().clone(), b.grad.float().clone()
    for m, fn in calls.items():
        if m == "reference" or m.startswith(("head", "copy")):
            continue
        fn()
        for name, t, w in (("a", a, want[0]), ("b", b, want[1])):
            err = (t.grad.float() - w).abs().max().item()
            if not err <= tol * w.abs().max().item():
                sys.exit(f"{m}: gradient of {name} differs from the reference's by {err:.3g} (N={a.shape[0]})")


def best_of(rows: dict, methods, key: str):
    """(method, value) with the smallest ``rows[m][key]`` among ``methods`` present with a positive figure."""
    have = [(rows[m][key], m) for m in methods if m in rows and rows[m][key] is not None and rows[m][key] > 0]
    return (min(have)[1], min(have)[0]) if have else (None, None)


def add_comparisons(rows: dict) -> None:
    """Fill each row's ``vs_ref``, ``vs_best`` (speed relative to the naive / the fastest baseline) and
    ``mem_vs_best`` (extra memory relative to the baselines' smallest) for the rows of one shape."""
    for m, row in rows.items():
        head = m.startswith("head")
        baselines = HEAD_BASELINES if head else BASELINES
        _, best_time = best_of(rows, baselines, "time_s")
        _, best_mem = best_of(rows, baselines, "extra_MB")
        row["vs_ref"] = rows["head_reference" if head else "reference"]["time_s"] / row["time_s"]
        row["vs_best"] = best_time / row["time_s"]
        extra = row.get("extra_MB")
        row["mem_vs_best"] = None if extra is None or best_mem is None else extra / best_mem


def print_fused_vs_best(n: int, v: int, rows: dict, fused: str) -> None:
    """One line: the fused loss against the fastest and the leanest baseline of this shape."""
    t_name, t_best = best_of(rows, BASELINES, "time_s")
    m_name, m_best = best_of(rows, BASELINES, "extra_MB")
    f = rows[fused]
    line = f"N={n} V={v}: {fused} is {t_best / f['time_s']:.2f}x the speed of the fastest baseline ({t_name})"
    if m_name is not None and f.get("extra_MB") is not None:
        line += f", with {f['extra_MB'] / m_best:.2f}x the extra memory of the leanest ({m_name})"
    print(line)


# ---------------------------------------------------------------------------------------------- memory


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_memory_child(method: str, n: int, v: int, h: int) -> None:
    """(In a subprocess.) Print JSON: peak RSS delta of one call, and the bytes of gradients it hands back."""

    def setup(n, v, h):
        if method.startswith("head"):
            ts, labels = head_inputs(n, v, h)
            fn = run_head_reference if method == "head_reference" else run_head_fused
            return (lambda: fn(ts, labels)), ts
        a, b = logits_inputs(n, v)
        fns = {
            "reference": run_reference,
            "torch_shared_lsm": run_shared,
            "fused": run_fused,
            "copy_floor": run_copy_floor,
        }
        fn = fns[method]
        return (lambda: fn(a, b)), (a, b)

    warm, _ = setup(8, 64, 8)  # one-time library initialisation is not the method's memory
    warm()
    call, grads = setup(n, v, h)
    before = psutil.Process().memory_info().rss
    try:  # reset the peak-RSS mark (Linux >= 4.0), so the peak is this call's
        Path("/proc/self/clear_refs").write_text("5")
        result = call()
        peak = _proc_status("VmHWM")
    except OSError:  # fall back on the process-lifetime peak
        result = call()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out_bytes = sum(t.numel() * t.element_size() for t in grads)  # the gradients (or copies) it returns
    del result
    print(json.dumps({"peak": peak - before, "outputs": out_bytes}))


def measure_memory(method: str, n: int, v: int, h: int) -> dict:
    cmd = [sys.executable, __file__, "--_child", method, str(n), str(v), str(h)]
    # A fixed mmap threshold: every allocation above 64 KiB is mmapped and unmapped when freed, so RSS
    # follows live memory (glibc's dynamic threshold would serve later blocks from retained heap memory).
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        MALLOC_MMAP_THRESHOLD_="65536",
        GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536",
    )
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def time_methods(calls: dict, reps: int) -> dict:
    times = {m: [] for m in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(reps):
        for m, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(ts) for m, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 30522])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU comparison (see above)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="logits dtype (--device cuda only)")
    parser.add_argument(
        "--sweep", action="store_true", help="also time every Triton launch setting (--device cuda only)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile baseline (--device cuda only)"
    )
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda":
        cuda_main(args)
        return
    if args.dtype != "fp32":
        parser.error(f"--dtype={args.dtype}: only with --device cuda (the CPU comparison is in float32)")
    if args._child:
        method, n, v, h = args._child
        measure_memory_child(method, int(n), int(v), int(h))
        return
    if args.quick:
        vars(args).update(QUICK_SHAPES, reps=QUICK_REPS)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"tau={TAU}, hidden={args.hidden}, reps={args.reps}; time = forward + both backwards, median")
    print("memory: peak RSS delta of one call in a fresh subprocess; 'extra' = peak minus the gradients it returns")
    print("vs_ref / vs_best: speed relative to the naive reference / the fastest baseline; mem_vs_best: extra memory")
    print("relative to the leanest baseline (head rows: relative to head_reference); torch.compile baseline: CUDA only")
    header = (
        f"{'N':>5} {'V':>6}  {'method':<17} {'time_s':>8} {'vs_ref':>7} {'vs_best':>8} {'vs_copy':>8} "
        f"{'peak_MB':>8} {'extra_MB':>9} {'extra/logits':>12} {'mem_vs_best':>11}"
    )
    print(header)
    print("-" * len(header))
    all_rows = []
    for n in args.rows:
        for v in args.vocab:
            calls, (a, b) = make_calls(n, v, args.hidden)
            check_gradients(calls, a, b, tol=1e-4)
            times = time_methods(calls, args.reps)
            del calls, a, b
            logits_bytes = n * v * 4
            rows = {}
            for m in METHODS:
                mem = None if args.no_memory or m == "copy_into" else measure_memory(m, n, v, args.hidden)
                head = m.startswith("head")
                row = {"N": n, "V": v, "method": m, "time_s": times[m]}
                row["vs_copy"] = None if head else times[m] / times["copy_floor"]
                row["peak_MB"] = mem and mem["peak"] / 2**20
                row["extra_MB"] = mem and (mem["peak"] - mem["outputs"]) / 2**20
                row["extra_vs_logits"] = mem and (mem["peak"] - mem["outputs"]) / logits_bytes
                row["peak_vs_logits"] = mem and mem["peak"] / logits_bytes
                rows[m] = row
            add_comparisons(rows)
            for m, row in rows.items():
                print(
                    f"{n:>5} {v:>6}  {m:<17} {row['time_s']:>8.3f} {row['vs_ref']:>6.2f}x {row['vs_best']:>7.2f}x "
                    f"{fmt(row['vs_copy'], '7.2f')}x {fmt(row['peak_MB'], '8.0f')} {fmt(row['extra_MB'], '9.0f')} "
                    f"{fmt(row['extra_vs_logits'], '12.3f')} {fmt(row['mem_vs_best'], '10.2f')}x"
                )
            print_fused_vs_best(n, v, rows, "fused")
            all_rows += rows.values()
    print(f"load average at end {os.getloadavg()[0]:.2f}")

    n, v = max(args.rows), max(args.vocab)
    r = {row["method"]: row for row in all_rows if row["N"] == n and row["V"] == v}
    fastest, _ = best_of(r, BASELINES, "time_s")
    leanest, _ = best_of(r, BASELINES, "extra_MB")
    summary = {
        "shape": [n, v],
        "hidden": args.hidden,
        "threads": torch.get_num_threads(),
        "speedup_vs_reference": rnd(r["fused"]["vs_ref"]),
        "fastest_baseline": fastest,
        "speedup_vs_fastest_baseline": rnd(r["fused"]["vs_best"]),
        "leanest_baseline": leanest,
        "memory_vs_leanest_baseline": rnd(r["fused"]["mem_vs_best"]),
        "time_vs_copy_floor": rnd(r["fused"]["vs_copy"]),
        "time_vs_copy_into_existing": rnd(r["fused"]["time_s"] / r["copy_into"]["time_s"]),
        "memory_vs_logits": rnd(r["fused"]["extra_vs_logits"], 3),
        "memory_with_grads_vs_logits": rnd(r["fused"]["peak_vs_logits"], 3),
        "reference_memory_vs_logits": rnd(r["reference"]["extra_vs_logits"], 3),
        "torch_shared_lsm_memory_vs_logits": rnd(r["torch_shared_lsm"]["extra_vs_logits"], 3),
        "head_speedup_vs_reference": rnd(r["head_fused"]["vs_ref"]),
        "head_memory_vs_logits": rnd(r["head_fused"]["extra_vs_logits"], 3),
        "head_memory_with_grads_vs_logits": rnd(r["head_fused"]["peak_vs_logits"], 3),
        "head_reference_memory_vs_logits": rnd(r["head_reference"]["extra_vs_logits"], 3),
        "times_s": {m: rnd(row["time_s"], 4) for m, row in r.items()},
        "memory_measure": "peak RSS delta of one call in a fresh subprocess; memory_* excludes the returned gradients",
    }
    print(json.dumps(summary))


# ---------------------------------------------------------------------------------------------- CUDA

DEVICE = "cuda"


def cuda_calls(n: int, v: int, h: int, dtype: torch.dtype, compile_baseline: bool):
    """({method: callable}, {method: tensors whose gradients it returns}, {launch name: the kernel under it},
    the logits inputs) on the GPU."""
    dev = torch.device(DEVICE)
    a, b = (t.detach().to(dev, dtype).requires_grad_() for t in logits_inputs(n, v))
    ts, labels = head_inputs(n, v, h)
    ts = [t.detach().to(dev, dtype).requires_grad_() for t in ts]
    labels = labels.to(dev)

    def fused(backend: str, path: str = "auto", launch: dict | None = None):
        def call():
            clear((a, b))
            with triton_kd.launch_settings(**launch) if launch else contextlib.nullcontext():
                with triton_kd.kernel_path(path):
                    out = bidirectional_kl(a, b, TAU, backend=backend)
            out.loss_ab.backward()
            out.loss_ba.backward()

        return call

    def head_fused():
        clear(ts)
        out = fused_linear_bidirectional_kl(*ts[:3], *ts[3:], labels, TAU)  # auto: Triton for the KL part
        (out.mlm_a + out.loss_ba).backward()
        (out.mlm_b + out.loss_ab).backward()

    calls = {
        "reference": lambda: run_reference(a, b),
        "torch_shared_lsm": lambda: run_shared(a, b),
    }
    if compile_baseline:
        torch.compiler.reset()  # compile afresh for this shape: static shapes, no recompilation limit reached
        compiled = torch.compile(shared_log_softmax_kl, dynamic=False)
        try:
            run_shared(a, b, compiled)  # compiles now, outside the timings
            calls["torch_compiled"] = lambda: run_shared(a, b, compiled)
        except Exception as e:  # noqa: BLE001 (whatever the compiler raises: note it, go on without it)
            print(f"note: torch.compile baseline skipped at N={n} V={v}: {type(e).__name__}: {str(e)[:300]}")
    calls["fused_torch"] = fused("torch")
    if triton_kd.TRITON_AVAILABLE:
        calls.update({m: fused("triton", m.removeprefix("triton_")) for m in TRITON_ROWS})
    calls.update(
        copy_floor=lambda: run_copy_floor(a, b),
        head_reference=lambda: run_head_reference(ts, labels),
        head_fused=head_fused,
    )
    grads = {m: ts if m.startswith("head") else (a, b) for m in calls}
    sweep = {}
    if triton_kd.TRITON_AVAILABLE:
        sweep = {triton_kd.launch_name(**c): fused("triton", "two_pass", c) for c in triton_kd.TUNING_GRID}
        for pps in (None, 2, 4):
            launch = {"block": triton_kd.BLOCK_V, "warps": triton_kd.NUM_WARPS, "programs_per_sm": pps}
            sweep[f"one_pass-p{pps}"] = fused("triton", "one_pass", launch)
    return calls, grads, sweep, (a, b)


def cuda_time(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, by CUDA events, after 2 warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def cuda_memory(fn, grads) -> tuple[int, int]:
    """(peak bytes allocated during one call above what was allocated before it, bytes of returned grads)."""
    clear(grads)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    outputs = sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None)
    return peak, outputs


def device_copy_bandwidth() -> float:
    """Bytes/s of ``clone`` on a 2 GiB tensor (read + write counted), median of 10."""
    x = torch.empty(2**29, dtype=torch.float32, device=DEVICE)
    seconds = cuda_time(lambda: x.clone(), 10)
    return 2 * x.numel() * 4 / seconds


def cuda_main(args) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.quick:
        vars(args).update(QUICK_SHAPES, reps=QUICK_REPS)
    if args.sweep and not triton_kd.TRITON_AVAILABLE:
        sys.exit("--sweep times the Triton kernel, but triton is not installed")
    props = torch.cuda.get_device_properties(0)
    bw = device_copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; ", end="")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"tau={TAU}, logits {args.dtype}, hidden={args.hidden}, reps={args.reps}; ", end="")
    print("time = forward + both backwards, median")
    print("vs_ref / vs_best: speed relative to the naive reference / the fastest baseline; mem_vs_best: extra memory")
    print("relative to the leanest baseline (head rows: relative to head_reference)")
    if not triton_kd.TRITON_AVAILABLE:
        print("note: triton is not installed: no triton_one_pass / triton_two_pass rows")
    print("of_copy_floor: the bandwidth of the minimum bytes (4 N V elements) over copy_floor's (the same bytes)")
    header = (
        f"{'N':>5} {'V':>6}  {'method':<17} {'time_ms':>8} {'vs_ref':>7} {'vs_best':>8} {'vs_copy':>8} {'TB/s':>6} "
        f"{'of_copy_floor':>13} {'of_copy_bw':>10} {'extra_MB':>9} {'extra/logits':>12} {'mem_vs_best':>11}"
    )
    print(header)
    print("-" * len(header))
    all_rows = []
    best_launch = {}
    for n in args.rows:
        for v in args.vocab:
            calls, grads, sweep, (a, b) = cuda_calls(n, v, args.hidden, dtype, compile_baseline=not args.no_compile)
            check_gradients(calls, a, b, tol=1e-4 if dtype == torch.float32 else 2e-2)
            times = {m: cuda_time(fn, args.reps) for m, fn in calls.items()}
            logits_bytes = n * v * dtype.itemsize
            if args.sweep:
                swept = {c: cuda_time(fn, args.reps) for c, fn in sweep.items()}
                for c, t in sorted(swept.items(), key=lambda kv: kv[1]):
                    frac = 4 * logits_bytes / t / bw
                    print(f"{n:>5} {v:>6}  sweep {c:<20} {1000 * t:8.3f} ms {frac:6.2f} of copy bandwidth")
                best_launch[(n, v)] = min(swept, key=swept.get), 4 * logits_bytes / min(swept.values()) / bw
            rows = {}
            for m, fn in calls.items():
                peak, outputs = cuda_memory(fn, grads[m])
                head = m.startswith("head")
                moved = 4 * logits_bytes  # read both logits, write both gradients
                row = {"N": n, "V": v, "method": m, "time_s": times[m]}
                row["vs_copy"] = None if head else times[m] / times["copy_floor"]
                row["of_copy_floor"] = None if head else times["copy_floor"] / times[m]
                row["tb_per_s"] = None if head else moved / times[m] / 1e12
                row["of_copy_bw"] = None if head else moved / times[m] / bw
                row["extra_MB"] = (peak - outputs) / 2**20
                row["extra_vs_logits"] = (peak - outputs) / logits_bytes
                rows[m] = row
            add_comparisons(rows)
            for m, row in rows.items():
                print(
                    f"{n:>5} {v:>6}  {m:<17} {1000 * row['time_s']:>8.3f} "
                    f"{row['vs_ref']:>6.2f}x {row['vs_best']:>7.2f}x {fmt(row['vs_copy'], '7.2f')}x "
                    f"{fmt(row['tb_per_s'], '6.2f')} {fmt(row['of_copy_floor'], '13.2f')} "
                    f"{fmt(row['of_copy_bw'], '10.2f')} "
                    f"{row['extra_MB']:>9.1f} {row['extra_vs_logits']:>12.3f} {fmt(row['mem_vs_best'], '10.2f')}x"
                )
            for fused_name in (*TRITON_ROWS, "fused_torch"):
                if fused_name in rows:
                    print_fused_vs_best(n, v, rows, fused_name)
            all_rows += rows.values()
            del calls, grads, sweep, a, b
            torch.cuda.empty_cache()

    n, v = max(args.rows), max(args.vocab)
    r = {row["method"]: row for row in all_rows if row["N"] == n and row["V"] == v}
    auto_path = triton_kd.resolve_path(v)
    kernel = r.get(f"triton_{auto_path}", r["fused_torch"])
    if best_launch:
        print(
            "best launch per shape: " + ", ".join(f"{k[0]}x{k[1]} {c} ({f:.2f})" for k, (c, f) in best_launch.items())
        )
    fastest, _ = best_of(r, BASELINES, "time_s")
    leanest, _ = best_of(r, BASELINES, "extra_MB")
    summary = {
        "device": props.name,
        "dtype": args.dtype,
        "shape": [n, v],
        "copy_bandwidth_tb_s": rnd(bw / 1e12),
        "fused": kernel["method"],
        "launch": {
            "path": auto_path,
            "one_pass_max_block": triton_kd.ONE_PASS_MAX_BLOCK,
            "block": triton_kd.BLOCK_V,
            "warps": triton_kd.NUM_WARPS,
            "programs_per_sm": triton_kd.PROGRAMS_PER_SM,
        },
        "best_swept_launch": best_launch.get((n, v), (None,))[0],
        "best_swept_bandwidth_vs_copy": rnd(best_launch[(n, v)][1]) if (n, v) in best_launch else None,
        "speedup_vs_reference": rnd(kernel["vs_ref"]),
        "fastest_baseline": fastest,
        "speedup_vs_fastest_baseline": rnd(kernel["vs_best"]),
        "leanest_baseline": leanest,
        "memory_vs_leanest_baseline": rnd(kernel["mem_vs_best"]),
        "time_vs_copy_floor": rnd(kernel["vs_copy"]),
        "bandwidth_vs_copy": rnd(kernel["of_copy_bw"]),
        "bandwidth_vs_copy_floor": {m: rnd(r[m]["of_copy_floor"]) for m in TRITON_ROWS if m in r},
        "memory_vs_logits": rnd(kernel["extra_vs_logits"], 3),
        "torch_path_speedup_vs_reference": rnd(r["fused_torch"]["vs_ref"]),
        "torch_path_speedup_vs_fastest_baseline": rnd(r["fused_torch"]["vs_best"]),
        "head_speedup_vs_reference": rnd(r["head_fused"]["vs_ref"]),
        "head_memory_vs_logits": rnd(r["head_fused"]["extra_vs_logits"], 3),
        "head_reference_memory_vs_logits": rnd(r["head_reference"]["extra_vs_logits"], 3),
        "times_ms": {m: rnd(1000 * row["time_s"], 3) for m, row in r.items()},
    }
    print(json.dumps(summary))


def fmt(x, spec: str) -> str:
    """``format(x, spec)``, or a right-aligned dash for a missing figure."""
    width = int(spec.split(".")[0])
    return "-".rjust(width) if x is None else format(x, spec)


def rnd(x, digits: int = 2):
    return None if x is None else round(x, digits)


if __name__ == "__main__":
    main()
