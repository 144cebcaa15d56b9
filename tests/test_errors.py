"""User mistakes vs bugs: one `error:` line and exit 2 with nothing written; bugs keep their traceback.

Also: a resume survives a metrics file whose last line a crash tore, and the launchers never read a
bare CONFIG variable from the environment.
"""

from __future__ import annotations

import json
import shlex

import pytest

from ctcd_ds import cli, layout

from conftest import PYTHON, read_metrics, run, run_cli, train_losses

LAUNCHER = "launchers/pretrain.sh"


# --------------------------------------------------------------------------------------------------
# checks that depend on data run before anything is written


def _short_corpus(tmp_path) -> list[str]:
    corpus = tmp_path / "short.txt"
    corpus.write_text("a few words of text\n")  # far fewer tokens than one 64-token block
    return [f"--data.train_files={corpus}", f"--data.eval_files={corpus}"]


BAD_INPUTS = {  # case: (the setting the one error line names, extra overrides for a tmp_path)
    "too_short_corpus": ("data.train_files", _short_corpus),
    "batch_larger_than_blocks_per_rank": (
        "train.micro_batch_size",
        lambda _: ["--train.micro_batch_size=512", "--data.max_train_blocks=16"],
    ),
    "bf16_without_gpu": ("train.precision", lambda _: ["--train.precision=bf16"]),
    "unknown_setting": ("train.stepz", lambda _: ["--train.stepz=3"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_user_error_exits_2_with_one_line_and_writes_nothing(case, tiny, tmp_path):
    setting, extra = BAD_INPUTS[case]
    out = tmp_path / "never_written"
    assert not out.exists()
    # a good run of these settings takes seconds; 120 s also ends a run that never stops (an endless loader)
    args = [PYTHON, "-m", "ctcd_ds.cli", "pretrain", *tiny, f"--output_dir={out}", *extra(tmp_path)]
    result = run_cli(args, timeout=120)
    report = f"rc={result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, report
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, report
    assert errors[0].startswith(f"error: {setting}"), report
    assert "Traceback" not in result.stderr, report
    assert not out.exists(), f"{out} was written before the error was reported\n{report}"


# --------------------------------------------------------------------------------------------------
# a bug is not a user error


def test_bug_keeps_its_traceback_and_is_not_exit_2(tiny, monkeypatch, capsys):
    """Only UserError becomes `error:` + exit 2; any other exception escapes main() unchanged."""

    def buggy_run_pretrain(cfg):
        raise ValueError("boom")

    joined, left = [], []
    monkeypatch.setattr(cli, "run_pretrain", buggy_run_pretrain)  # what _pretrain calls: no training happens
    # no process group either (this pytest process may hold one for other tests' in-process runs)
    monkeypatch.setattr(cli.dist, "init_distributed", lambda timeout_s: joined.append(timeout_s))
    monkeypatch.setattr(cli.dist, "cleanup", lambda: left.append(True))
    with pytest.raises(ValueError, match="boom") as excinfo:
        cli.main(["pretrain", *tiny])
    assert excinfo.traceback[-1].name == "buggy_run_pretrain"  # the original traceback, not a re-raise
    assert joined == [600] and left == [True]  # the config checked and the run reached; cleanup still ran
    assert "error:" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# resume with a torn metrics file


def test_resume_survives_a_torn_last_metrics_line(tiny):
    _, run_dir = run([*tiny])
    first = {member: train_losses(run_dir, member) for member in ("teacher", "student")}
    assert sorted(first["teacher"]) == [1, 2, 3, 4, 5, 6]

    # a crash during step 6: lines up to step 5, then a half-written record; resume from step 3
    metrics = run_dir / layout.METRICS_FILE
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 5]
    metrics.write_text("".join(line + "\n" for line in kept) + '{"step": 7, "teacher/total_lo')
    assert layout.is_checkpoint(layout.checkpoints_dir(run_dir) / "step_00000003")
    (layout.checkpoints_dir(run_dir) / layout.LATEST).write_text("step_00000003")

    summary, again = run([*tiny, "--train.steps=6"])
    assert again == run_dir and summary["checkpoint"].endswith("step_00000006")
    for line in metrics.read_text().splitlines():
        json.loads(line)  # every line is a whole record (raises on a torn one)
    records = read_metrics(run_dir)
    for member in ("teacher", "student"):
        steps = [m["step"] for m in records if f"{member}/total_loss" in m]
        assert steps == [1, 2, 3, 4, 5, 6], (member, steps)  # the first run's lines past step 3 were dropped
        resumed = train_losses(run_dir, member)
        for step in (4, 5, 6):
            assert resumed[step] == pytest.approx(first[member][step], rel=1e-6, abs=1e-7), (member, step)


# --------------------------------------------------------------------------------------------------
# the launcher never reads a bare CONFIG from the environment


def _dry_run(*args: str, **env: str) -> list[str]:
    result = run_cli(["bash", LAUNCHER, *args], env={"DRY_RUN": "1", **env})
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _config_of(cmd: list[str]) -> str | None:
    return cmd[cmd.index("--config") + 1] if "--config" in cmd else None


def test_launcher_ignores_a_bare_config_variable():
    cmd = _dry_run(CONFIG="standalone", CTCD_CONFIG="")
    assert cmd[0] == "deepspeed" and LAUNCHER in cmd
    assert _config_of(cmd) is None, cmd
    assert _config_of(_dry_run(CTCD_CONFIG="standalone")) == "standalone"
    assert _config_of(_dry_run("CONFIG=kd", CTCD_CONFIG="")) == "kd"
    # DRY_RUN given as an argument too, as users type it
    result = run_cli(["bash", LAUNCHER, "CONFIG=kd", "DRY_RUN=1"], env={"CTCD_CONFIG": "", "DRY_RUN": ""})
    assert result.returncode == 0, result.stderr
    assert _config_of(shlex.split(result.stdout)) == "kd"


def test_launched_ignores_a_bare_config_variable(monkeypatch, capsys):
    monkeypatch.delenv("CTCD_CONFIG", raising=False)
    monkeypatch.setenv("CONFIG", "standalone")
    assert cli.launched("show-config", []) == 0
    shown = capsys.readouterr().out
    assert "source: student" in shown and "edges: []" not in shown  # the default recipe (ctcd), not standalone

    monkeypatch.delenv("CONFIG")
    monkeypatch.setenv("CTCD_CONFIG", "standalone")
    assert cli.launched("show-config", []) == 0
    shown = capsys.readouterr().out
    assert "edges: []" in shown and "source: student" not in shown
