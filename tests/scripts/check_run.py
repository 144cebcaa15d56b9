"""Assertions on finished runs, for the cluster scripts (.ci/multinode_ssh.sh, .ci/slurm.sh). Exit 1 with
one line per failed check; print what was checked otherwise.

    python tests/scripts/check_run.py finished RUN STEPS          # checkpoint of step STEPS (latest), TensorBoard
    python tests/scripts/check_run.py world-size RUN N            # every checkpoint of RUN written by N ranks
    python tests/scripts/check_run.py same-losses RUN REF [FIRST] # RUN's per-step losses == REF's, steps >= FIRST
    python tests/scripts/check_run.py log-has LOG TEXT [TEXT ...] # each TEXT occurs in the file LOG
    python tests/scripts/check_run.py log-line LOG TEXT [TEXT ...] # one line of LOG holds every TEXT
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ctcd_ds import layout  # noqa: E402

MEMBERS = ("teacher", "student")
REL = 1e-5  # bit for bit here; one CI run once had one 2-rank resume step 1.9e-6 off (test_preemption.py)


def losses(run: Path) -> dict[str, dict[int, float]]:
    rows = [json.loads(line) for line in (run / layout.METRICS_FILE).read_text().splitlines() if line.strip()]
    return {m: {r["step"]: r[f"{m}/total_loss"] for r in rows if f"{m}/total_loss" in r} for m in MEMBERS}


def finished(run: str, steps: str) -> list[str]:
    run, problems = Path(run), []
    last = layout.latest(run)
    if last is None:
        return [f"{run}: no complete checkpoint (checkpoints/latest)"]
    state = json.loads((last / layout.STATE_FILE).read_text())
    if state["step"] != int(steps):
        problems.append(f"{last}: step {state['step']}, expected {steps}")
    for member in MEMBERS:
        if not (last / member).is_dir():
            problems.append(f"{last}: no {member}/ (DeepSpeed checkpoint)")
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    if not events or not all(e.stat().st_size > 0 for e in events):
        problems.append(f"{run}/tensorboard: no TensorBoard event files")
    if not problems:
        print(f"ok: {run} finished: {last.name} (step {state['step']}), {len(events)} TensorBoard event file(s)")
    return problems


def world_size(run: str, n: str) -> list[str]:
    run = Path(run)
    found = layout.checkpoints(run)
    if not found:
        return [f"{run}: no checkpoints"]
    problems = []
    for ckpt in found:
        written = json.loads((ckpt / layout.STATE_FILE).read_text())["world_size"]
        rng = sorted(p.name for p in ckpt.glob("rng_rank*.pt"))
        if written != int(n) or len(rng) != int(n):
            problems.append(f"{ckpt}: world_size {written}, rng files {rng}; expected {n} ranks")
    if not problems:
        print(f"ok: {run}: {len(found)} checkpoint(s) written by {n} ranks")
    return problems


def same_losses(run: str, ref: str, first: str = "1") -> list[str]:
    run, ref = Path(run), Path(ref)
    a, b = losses(run), losses(ref)
    problems = []
    for m in MEMBERS:
        steps = sorted(s for s in a[m] if s >= int(first))
        if not steps or steps != sorted(s for s in b[m] if s >= int(first)):
            problems.append(f"{m}: steps {steps} in {run}, {sorted(b[m])} in {ref}")
            continue
        diff = [(s, a[m][s], b[m][s]) for s in steps if not math.isclose(a[m][s], b[m][s], rel_tol=REL)]
        if diff:
            problems.append(f"{m}: losses differ (step, {run.name}, {ref.name}): {diff}")
        else:
            print(f"ok: {m} losses of steps {steps[0]}..{steps[-1]} equal in {run.name} and {ref.name}")
    return problems


def log_has(log: str, *texts: str) -> list[str]:
    log = Path(log)
    content = log.read_text(errors="replace")
    missing = [t for t in texts if t not in content]
    if not missing:
        print(f"ok: {log} has {', '.join(repr(t) for t in texts)}")
    return [f"{log}: no {t!r}" for t in missing]


def log_line(log: str, *texts: str) -> list[str]:
    log = Path(log)
    for line in log.read_text(errors="replace").splitlines():
        if all(t in line for t in texts):
            print(f"ok: {log}: {line.strip()}")
            return []
    return [f"{log}: no line with all of {texts}"]


CHECKS = {
    "finished": finished,
    "world-size": world_size,
    "same-losses": same_losses,
    "log-has": log_has,
    "log-line": log_line,
}


def main() -> int:
    name, *args = sys.argv[1:]
    problems = CHECKS[name](*args)
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
