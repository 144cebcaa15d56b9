"""launchers/pretrain.sh in both forms: `bash launchers/pretrain.sh` and `deepspeed launchers/pretrain.sh`."""

from __future__ import annotations

import shlex

from conftest import MINI, PYTHON, free_port, read_metrics, run_cli

LAUNCHER = "launchers/pretrain.sh"
LAUNCH_SETTINGS = (
    "NUM_GPUS",
    "NUM_NODES",
    "HOSTFILE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CONFIG",
)  # the shell's own must not leak in


def dry_run(*args: str, **env: str) -> list[str]:
    result = run_cli(["bash", LAUNCHER, *args], env={"DRY_RUN": "1", **{k: "" for k in LAUNCH_SETTINGS}, **env})
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_dry_run_single_node_defaults():
    assert dry_run("--train.steps=3") == [
        "deepspeed",
        "--num_gpus",
        "1",
        "--master_port",
        "29500",
        LAUNCHER,
        "--train.steps=3",
    ]


def test_dry_run_key_value_args_and_pass_through():
    cmd = dry_run(
        "NUM_GPUS=8", "CONFIG=ctcd_large", "MASTER_PORT=1234", "--deepspeed.template=zero3", "--train.steps=9"
    )
    assert cmd == [
        "deepspeed",
        "--num_gpus",
        "8",
        "--master_port",
        "1234",
        LAUNCHER,
        "--config",
        "ctcd_large",
        "--deepspeed.template=zero3",
        "--train.steps=9",
    ]


def test_dry_run_multi_node_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    cmd = dry_run("--train.steps=1", HOSTFILE=str(hostfile), MASTER_ADDR="node-a", MASTER_PORT="29600")
    assert cmd == [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--num_nodes",
        "2",
        "--master_port",
        "29600",
        "--master_addr",
        "node-a",
        LAUNCHER,
        "--train.steps=1",
    ]
    cmd = dry_run(HOSTFILE=str(hostfile), NUM_NODES="1", NUM_GPUS="4")
    assert cmd[:7] == ["deepspeed", "--hostfile", str(hostfile), "--num_nodes", "1", "--num_gpus", "4"]


def test_launcher_rejects_bad_launch_settings(tmp_path):
    result = run_cli(["bash", LAUNCHER], env={"DRY_RUN": "1", "HOSTFILE": str(tmp_path / "missing")})
    assert result.returncode == 2 and "HOSTFILE" in result.stderr
    result = run_cli(["bash", LAUNCHER], env={"DRY_RUN": "1", "NUM_NODES": "4", "HOSTFILE": ""})
    assert result.returncode == 2 and "needs HOSTFILE" in result.stderr


def test_file_is_also_python():
    result = run_cli([PYTHON, LAUNCHER, "--help"])
    assert result.returncode == 0 and "--train.steps" in result.stdout
    result = run_cli([PYTHON, LAUNCHER, "CONFIG=standalone", "--trian.steps=1"])
    assert result.returncode == 2 and "trian: unknown setting (did you mean 'train'?)" in result.stderr


def test_two_rank_cotraining_through_bash_launcher(tmp_path, tokenizer_dir):
    """`bash launchers/pretrain.sh` with 2 CPU ranks (ZeRO-2): both members' losses go down."""
    out = tmp_path / "two_ranks"
    result = run_cli(
        [
            "bash",
            LAUNCHER,
            "NUM_GPUS=2",
            f"MASTER_PORT={free_port()}",
            f"--output_dir={out}",
            f"--tokenizer.path={tokenizer_dir}",
            "--data.seq_len=64",
            "--train.micro_batch_size=16",
            "--train.steps=40",
            "--train.log_every=1",
            "--train.eval_every=20",
            "--train.eval_batches=2",
            "--members.teacher.lr=1e-3",
            "--members.student.lr=1e-3",
            "--checkpoint.every=20",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "export:" in result.stdout and str(out / "export" / "student") in result.stdout
    metrics = read_metrics(out)
    train = [m for m in metrics if "teacher/total_loss" in m]
    evals = [m for m in metrics if "eval/teacher/mlm_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 41))
    for member in ("teacher", "student"):
        first = sum(m[f"{member}/mlm_loss"] for m in train[:5]) / 5
        last = sum(m[f"{member}/mlm_loss"] for m in train[-5:]) / 5
        assert last < first - 0.5, (member, first, last)
        assert evals[-1][f"eval/{member}/mlm_loss"] < evals[0][f"eval/{member}/mlm_loss"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000040").glob("rng_rank*")) == [
        "rng_rank00000.pt",
        "rng_rank00001.pt",
    ]


def test_deepspeed_runs_the_launcher_file_directly(tmp_path, tokenizer_dir):
    """The exact form users type on clusters: `deepspeed launchers/pretrain.sh [overrides]`."""
    out = tmp_path / "direct"
    result = run_cli(
        [
            "deepspeed",
            "--num_gpus",
            "1",
            "--master_port",
            free_port(),
            LAUNCHER,
            "CONFIG=standalone",
            f"--output_dir={out}",
            f"--tokenizer.path={tokenizer_dir}",
            *MINI,
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(out)
    assert "teacher/mlm_loss" in metrics[0] and not any(
        k.startswith("teacher/kd_loss") for k in metrics[0]
    )  # standalone
    bad = run_cli(
        ["deepspeed", "--num_gpus", "1", "--master_port", free_port(), LAUNCHER, "--train.steps=0"], timeout=300
    )
    assert bad.returncode != 0 and "train.steps=0: must be > 0" in bad.stdout + bad.stderr
