"""Run a scaling sweep: each point a real short run through the launcher, measured from what the run itself wrote
(its per-step times and its summary), one result file per point so an interrupted sweep goes on where it stopped.

    <output_dir>/points/POINT/run/          the point's run directory (config.yaml, metrics.jsonl, summary.json)
    <output_dir>/points/POINT/log.txt       its launcher output
    <output_dir>/points/POINT/result.json   the point's row, written last (a finished point)
    <output_dir>/scaling.csv, scaling.png   every row, and the plot
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from ctcd_ds import perf
from ctcd_ds.checks import output_problems
from ctcd_ds.config import ScaleConfig
from ctcd_ds.config.loading import resolve_recipe
from ctcd_ds.ds_config import load_template, template_problems, zero_stage
from ctcd_ds.errors import UserError
from ctcd_ds.layout import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from ctcd_ds.scaling.grid import LAUNCHER, Point, command, environment, points, settings_key
from ctcd_ds.scaling.report import add_efficiencies, write_csv, write_plot

RESULT_FILE = "result.json"
LOG_TAIL = 4000


def scale_problems(cfg: ScaleConfig) -> list[str]:
    """Every problem of a sweep's settings, one line each, found before any point starts."""
    problems: list[str] = []
    output_problems(cfg.output_dir, problems)
    for key in ("recipes", "ranks", "nodes", "templates", "micro_batch", "grad_accum", "precision"):
        if not getattr(cfg, key):
            problems.append(f"{key}=[]: give at least one value")
    for key in ("ranks", "nodes", "micro_batch", "grad_accum", "seq_len"):
        problems += [f"{key}={v}: must be at least 1" for v in getattr(cfg, key) if v < 1]
    for template in cfg.templates:
        problems += template_problems(template)
    for recipe in cfg.recipes:
        try:
            resolve_recipe(recipe)
        except UserError as exc:
            problems += [f"recipes: {p}" for p in exc.problems]
    for i, models in enumerate(cfg.members):
        if not models:
            problems.append(f"members.{i}: give at least one member: preset")
    if cfg.steps < 2:
        problems.append(f"steps={cfg.steps}: a point needs at least 2 steps")
    if not 0 <= cfg.warmup_steps < cfg.steps:
        problems.append(f"warmup_steps={cfg.warmup_steps}: must be at least 0 and less than steps={cfg.steps}")
    if cfg.cpu_threads_per_rank < 0:
        problems.append(f"cpu_threads_per_rank={cfg.cpu_threads_per_rank}: must be 0 (auto) or positive")
    if cfg.timeout_s < 1:
        problems.append(f"timeout_s={cfg.timeout_s}: must be at least 1")
    if cfg.peak_tflops < 0:
        problems.append(f"peak_tflops={cfg.peak_tflops}: must be 0 (look the GPU up) or positive")
    if any(n > 1 for n in cfg.nodes) and not cfg.hostfile:
        problems.append(f"nodes={cfg.nodes}: more than one node needs hostfile (a DeepSpeed hostfile listing them)")
    if cfg.cpu_threads_per_rank and any(n > 1 for n in cfg.nodes):
        problems.append(
            f"cpu_threads_per_rank={cfg.cpu_threads_per_rank}: reaches only this machine's ranks (DeepSpeed does not "
            "pass OMP_NUM_THREADS to other nodes); leave it 0 with nodes > 1"
        )
    names = [p.name for p in points(cfg)]
    problems += sorted({f"two points are both named {n}: give each value once" for n in names if names.count(n) > 1})
    if cfg.hostfile and not Path(cfg.hostfile).is_file():
        problems.append(f"hostfile={cfg.hostfile}: no such file")
    if not LAUNCHER.is_file():
        problems.append(f"scale starts each point with {LAUNCHER}: run it from a checkout (pip install -e .)")
    return problems


class Sweep:
    def __init__(self, cfg: ScaleConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.points = points(cfg)

    def run(self) -> list[dict]:
        """Run every point not finished yet (failed ones too with ``retry_failed``); write the CSV and plot."""
        rows = []
        bar = tqdm(self.points, desc="scale", unit="point", dynamic_ncols=True)
        for point in bar:
            bar.set_postfix_str(point.name)
            rows.append(self.point(point))
        bar.close()
        add_efficiencies(rows)
        write_csv(rows, self.out / "scaling.csv")
        write_plot(rows, self.out / "scaling.png")
        return rows

    def point(self, point: Point) -> dict:
        folder = self.out / "points" / point.name
        done = folder / RESULT_FILE
        key = settings_key(self.cfg, point)
        if done.is_file():
            row = json.loads(done.read_text())
            if row.get("settings") != key:
                tqdm.write(
                    f"{point.name}: measured with other settings before (steps, overrides, ...); running it again"
                )
            elif row["status"] == "ok" or not self.cfg.retry_failed:
                return row
        run_dir = folder / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt: start the point afresh
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        env = environment(self.cfg, dict(os.environ))
        error = _launch(command(self.cfg, point, run_dir), folder / "log.txt", self.cfg.timeout_s, env)
        row = point.as_dict() | {
            "status": "failed",
            "error": error,
            "cpu_threads_per_rank": self.cfg.cpu_threads_per_rank or "auto",
            "wall_s": round(time.monotonic() - started, 1),
        }
        if error is None:
            try:
                row |= measure(run_dir, self.cfg.warmup_steps) | {"status": "ok"}
            except (OSError, KeyError, ValueError) as exc:  # the run ended well but left no usable record
                row["error"] = f"no measurements in {run_dir}: {exc!r}"
        row["zero_stage"] = zero_stage(load_template(point.template))
        row["settings"] = key
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1))
        os.replace(tmp, done)
        return row


def _launch(cmd: list[str], log: Path, timeout_s: int, env: dict[str, str]) -> str | None:
    """Run one point; None when it finished, else what went wrong (the end of its output included)."""
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return f"timeout: still running after {timeout_s} s"
        except BaseException:  # Ctrl-C on the sweep: take the point's ranks down with it
            _stop(proc)
            raise
    if code == 0:
        return None
    tail = log.read_text(errors="replace")[-LOG_TAIL:]
    if "out of memory" in tail.lower() or code in (137, -9):
        kind = "out of memory"
    else:
        kind = f"exit status {code}"
    last = [line for line in tail.splitlines() if line.startswith("error:") or "Error" in line]
    return f"{kind}: {last[-1].strip() if last else 'see ' + str(log)}"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the point's whole process group (launcher and ranks), SIGKILL if it has not gone in 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def measure(run_dir: Path, warmup_steps: int) -> dict:
    """The figures of one finished run: step times after the warm-up (from metrics.jsonl), the batch (from its
    config.yaml) and the members, memory and FLOPs its summary.json recorded."""
    cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    times = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        m = json.loads(line)
        if "perf/step_time_s" in m:
            times[m["step"]] = m["perf/step_time_s"]
    timed = [t for step, t in sorted(times.items()) if step > warmup_steps]
    if not timed:
        raise ValueError(f"no step after the {warmup_steps} warm-up steps was timed")
    median = statistics.median(timed)
    world, tokens_per_step = summary["world_size"], summary["tokens_per_step"]
    tokens_per_s = tokens_per_step / median
    flops_per_token = sum(m["flops_per_token"] for m in summary["members"].values())
    peak = summary.get("peak_tflops")
    memory = summary["memory_per_rank"]
    row = {
        "seq_len": cfg["data"]["seq_len"],
        "world_size": world,
        "members_params": ";".join(f"{n}={m['parameters']}" for n, m in summary["members"].items()),
        "parameters": sum(m["parameters"] for m in summary["members"].values()),
        "tokens_per_step": tokens_per_step,
        "timed_steps": len(timed),
        "step_time_median_s": median,
        "step_time_min_s": min(timed),
        "step_time_max_s": max(timed),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_rank": tokens_per_s / world,
        "peak_memory_gb_max": max(r["peak_gb"] for r in memory),
        "peak_memory_gb_per_rank": ";".join(f"{r['peak_gb']:.3f}" for r in memory),
        "engine_memory_gb_max": max(r["peak_gb"] - r["before_engines_gb"] for r in memory),
        "tensors_gb_max": max((r.get("tensors_gb") or 0.0) for r in memory) or None,
        "memory_kind": memory[0]["kind"],
        "cpu_threads_per_rank": ";".join(str(r["cpu_threads"]) for r in memory if "cpu_threads" in r) or None,
        "reserved_gb_max": max((r.get("reserved_gb") or 0.0) for r in memory) or None,
        "flops_per_token": flops_per_token,
        "model_tflops": perf.model_tflops(tokens_per_s, flops_per_token),
        "peak_tflops": peak,
        "mfu": perf.mfu(tokens_per_s, flops_per_token, peak, world) if peak else None,
    }
    return row


def run_scale(cfg: ScaleConfig) -> list[dict]:
    """Check the settings (UserError with every problem), then run the sweep; returns its rows."""
    problems = scale_problems(cfg)
    if problems:
        raise UserError(problems)
    sweep = Sweep(cfg)
    if cfg.dry_run:
        for point in sweep.points:
            print(shlex.join(command(cfg, point, sweep.out / "points" / point.name / "run")))
        return []
    return sweep.run()
