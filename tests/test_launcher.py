"""launchers/pretrain.sh in both forms: `bash launchers/pretrain.sh` and `deepspeed launchers/pretrain.sh`."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

from conftest import MINI, PYTHON, free_port, read_metrics, run_cli

LAUNCHER = "launchers/pretrain.sh"
LAUNCH_SETTINGS = (
    "NUM_GPUS",
    "NUM_NODES",
    "HOSTFILE",
    "NODE_RANK",
    "LAUNCHER",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CONFIG",
)  # the shell's own must not leak in


def dry_run(*args: str, **env: str) -> list[str]:
    result = run_cli(["bash", LAUNCHER, *args], env={"DRY_RUN": "1", **{k: "" for k in LAUNCH_SETTINGS}, **env})
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_dry_run_single_node_defaults():
    """An unset MASTER_PORT becomes a port free on this machine (two runs on one box must not collide)."""
    cmd = dry_run("--train.steps=3")
    assert cmd[:4] == ["deepspeed", "--num_gpus", "1", "--master_port"]
    assert cmd[5:] == [LAUNCHER, "--train.steps=3"]
    assert cmd[4].isdigit() and 1024 <= int(cmd[4]) <= 65535, cmd
    # not a fixed port: the kernel picks it from its ephemeral range (32768-60999 by default)
    assert cmd[4] != "29500", cmd


def test_dry_run_key_value_args_and_pass_through():
    port = free_port()  # an explicit port is passed through unchanged (it is free, so no error)
    cmd = dry_run(
        "NUM_GPUS=8", "CONFIG=ctcd_large", f"MASTER_PORT={port}", "--deepspeed.template=zero3", "--train.steps=9"
    )
    assert cmd == [
        "deepspeed",
        "--num_gpus",
        "8",
        "--master_port",
        port,
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


def test_dry_run_per_node_start(tmp_path):
    """NODE_RANK: every node started on its own (srun, Kubernetes) -> deepspeed --no_ssh --node_rank. DeepSpeed's
    runner counts nodes and ranks only from a hostfile, so the launcher writes one (NUM_GPUS slots per node)."""
    cmd = dry_run("--train.steps=1", NODE_RANK="1", NUM_NODES="2", MASTER_ADDR="10.1.2.3", TMPDIR=str(tmp_path))
    hostfile = cmd[2]
    assert cmd == [
        "deepspeed",
        "--hostfile",
        hostfile,
        "--num_nodes",
        "2",
        "--num_gpus",
        "1",
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_port",
        "29500",  # unset: the same default on every node
        "--master_addr",
        "10.1.2.3",
        LAUNCHER,
        "--train.steps=1",
    ]
    assert Path(hostfile).parent == tmp_path and Path(hostfile).read_text() == "node0 slots=1\nnode1 slots=1\n"
    cmd = dry_run(NODE_RANK="0", NUM_NODES="3", NUM_GPUS="4", MASTER_ADDR="node-a", TMPDIR=str(tmp_path))
    assert Path(cmd[2]).read_text() == "node0 slots=4\nnode1 slots=4\nnode2 slots=4\n"
    # a hostfile of the user's: used as it is; NUM_NODES from it
    mine = tmp_path / "hostfile"
    mine.write_text("node-a slots=2\nnode-b slots=2\n")
    cmd = dry_run(NODE_RANK="1", HOSTFILE=str(mine), MASTER_ADDR="node-a", MASTER_PORT="29601")
    assert cmd[:9] == ["deepspeed", "--hostfile", str(mine), "--num_nodes", "2", "--no_ssh", "--node_rank", "1",
                       "--master_port"]  # fmt: skip
    # one node: an ordinary single-node start (a free port)
    cmd = dry_run(NODE_RANK="0", NUM_NODES="1")
    assert "--no_ssh" not in cmd and cmd[cmd.index("--master_port") + 1] != "29500"
    # the other multi-node backends of DeepSpeed, from a hostfile
    cmd = dry_run(HOSTFILE=str(mine), LAUNCHER="openmpi")
    assert cmd[cmd.index("--launcher") + 1] == "openmpi"


def launch_error(*args: str, **env: str) -> str:
    """A dry run that must stop with exit status 2 and one `error:` line (returned), printing no command."""
    result = run_cli(["bash", LAUNCHER, *args], env={"DRY_RUN": "1", **{k: "" for k in LAUNCH_SETTINGS}, **env})
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "" and result.stderr.count("error:") == 1, (result.stdout, result.stderr)
    return result.stderr.strip()


def test_launcher_rejects_bad_launch_settings(tmp_path):
    assert "HOSTFILE" in launch_error(HOSTFILE=str(tmp_path / "missing"))
    assert "needs HOSTFILE" in launch_error(NUM_NODES="4")
    assert "or NODE_RANK" in launch_error(NUM_NODES="4")


def test_launcher_rejects_bad_per_node_settings(tmp_path):
    assert launch_error(NODE_RANK="1") == (
        "error: NODE_RANK=1 needs NUM_NODES (how many nodes the run has, the same on every node) or a HOSTFILE"
    )
    assert launch_error(NODE_RANK="2", NUM_NODES="2", MASTER_ADDR="a") == (
        "error: NODE_RANK=2: must be below NUM_NODES=2 (nodes count from 0)"
    )
    assert launch_error(NODE_RANK="x1", NUM_NODES="2") == (
        "error: NODE_RANK=x1: must be a node number (0 for the node of rank 0)"
    )
    assert launch_error(NODE_RANK="1", NUM_NODES="2", TMPDIR=str(tmp_path)) == (
        "error: NODE_RANK=1: a per-node start needs MASTER_ADDR (the address of node 0, the same on every node)"
    )
    assert "not one of DeepSpeed's multi-node launchers" in launch_error(LAUNCHER="ssh")
    assert "starts the nodes from a HOSTFILE" in launch_error(LAUNCHER="openmpi")


def test_launcher_rejects_counts_that_are_not_positive_integers(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\n")
    for value in ("abc", "0", "-1", "2.5", "1x"):
        assert launch_error(f"NUM_GPUS={value}") == f"error: NUM_GPUS={value}: must be a positive integer"
        assert launch_error(NUM_NODES=value, HOSTFILE=str(hostfile)) == (
            f"error: NUM_NODES={value}: must be a positive integer"
        )
    assert launch_error("MASTER_PORT=http") == "error: MASTER_PORT=http: must be a port number (1-65535)"
    hostfile.write_text("# no hosts\n")
    assert launch_error(HOSTFILE=str(hostfile)) == (
        f"error: HOSTFILE={hostfile}: lists no hosts (one 'HOST slots=N' line per node)"
    )


def test_launcher_rejects_a_busy_master_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert launch_error(f"MASTER_PORT={port}") == (
            f"error: MASTER_PORT={port}: in use on this machine; choose another or leave MASTER_PORT unset"
        )
        # multi-node: the port is the one every node uses, and rank 0 may be another machine: not probed
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
        cmd = dry_run(f"MASTER_PORT={port}", HOSTFILE=str(hostfile), MASTER_ADDR="node-a")
        assert cmd[cmd.index("--master_port") + 1] == port
        # unset: a free port is chosen, not the busy one
        cmd = dry_run()
        assert cmd[cmd.index("--master_port") + 1] != port
    # multi-node without MASTER_PORT: DeepSpeed's default, the same on every node
    cmd = dry_run(HOSTFILE=str(hostfile))
    assert cmd[cmd.index("--master_port") + 1] == "29500"


def test_per_node_starts_probe_the_port_on_node_0_only(tmp_path):
    """Every node must use the same MASTER_PORT; node 0 (rank 0) binds it, so only node 0 can tell it is taken."""
    per_node = {"NUM_NODES": "2", "MASTER_ADDR": "127.0.0.1", "TMPDIR": str(tmp_path)}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert launch_error(NODE_RANK="0", MASTER_PORT=port, **per_node) == (
            f"error: MASTER_PORT={port}: in use on this machine, node 0; set MASTER_PORT to a free port, the same "
            "on every node"
        )
        cmd = dry_run(NODE_RANK="1", MASTER_PORT=port, **per_node)  # node 0 may be this machine, already bound
        assert cmd[cmd.index("--master_port") + 1] == port


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
