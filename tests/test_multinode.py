"""Two nodes on this one machine, each started on its own (`NODE_RANK` -> DeepSpeed's `--no_ssh --node_rank`, as
srun and Kubernetes start nodes), each with its own working directory and caches (`CTCD_DS_CACHE`, the `datasets`
cache) and one shared output directory: they train exactly as one node with two ranks, their checkpoint resumes on
one node, a SIGTERM to one node's launcher checkpoints both, a killed node brings the other down at once, and an
output directory or corpus the nodes do not share is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ctcd_ds import layout
from ctcd_ds.errors import EXIT_PREEMPTED, EXIT_USAGE
from ctcd_ds.integrity import damage

from conftest import DIST_ENV, REPO, free_port, read_metrics, run_cli, train_losses

LAUNCHER = str(REPO / "launchers" / "pretrain.sh")
STEPS = 6


def _args(out: Path | str, steps: int = STEPS) -> list[str]:
    """A tiny run whose tokenizer is trained (into each node's own cache), checkpointed at step 3 and the end."""
    return [
        f"--output_dir={out}",
        "--tokenizer.vocab_size=1000",
        "--tokenizer.max_sentences=2000",
        "--data.seq_len=64",
        "--data.max_train_blocks=256",
        "--train.micro_batch_size=8",
        f"--train.steps={steps}",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.eval_batches=1",
        "--checkpoint.every=3",
        "--checkpoint.keep_last=0",
        "--export=false",
        "--deepspeed.collective_timeout_s=60",  # a test that goes wrong fails in a minute, not ten
    ]


def _machine(root: Path) -> dict[str, str]:
    """The per-machine environment of a "node" whose files are under ``root``: its own caches."""
    return {
        "CTCD_DS_CACHE": str(root / "cache" / "ctcd_ds"),
        "HF_DATASETS_CACHE": str(root / "cache" / "datasets"),
        "HF_HOME": str(root / "cache" / "hf"),
    }


class Node:
    """One node's `bash launchers/pretrain.sh`, started in ``<tmp>/node<N>`` (its own session: killable whole)."""

    def __init__(self, tmp: Path, rank: int, port: str, args: list[str]):
        self.dir = tmp / f"node{rank}"
        self.dir.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | _machine(self.dir)
        env |= {"PYTHONUNBUFFERED": "1", "NODE_RANK": str(rank), "NUM_NODES": "2", "MASTER_ADDR": "127.0.0.1"}
        env |= {"MASTER_PORT": port}
        self.log = self.dir / "launcher.log"
        with open(self.log, "w") as log:  # a file, not a pipe: nobody reads while the test waits
            self.proc = subprocess.Popen(
                ["bash", LAUNCHER, *args], cwd=self.dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node still running after {timeout} s:\n{self.output()[-3000:]}") from None

    def ranks(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True) if "--local_rank=0" in p.cmdline()]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


STARTED: list[Node] = []


@pytest.fixture(autouse=True)
def _no_node_left_behind():
    yield
    while STARTED:  # a failed test must not leave a node training in the background
        STARTED.pop().kill()


def _two_nodes(tmp: Path, args: list[str]) -> list[Node]:
    port = free_port()  # unset, every node would use 29500: the nodes must agree on one
    STARTED.extend(Node(tmp, rank, port, args) for rank in (0, 1))
    return STARTED[-2:]


def _wait_for_step(out: Path, step: int, nodes: list[Node], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for node in nodes:
            assert node.proc.poll() is None, node.output()[-3000:]
        if (out / layout.METRICS_FILE).is_file() and any(m["step"] >= step for m in read_metrics(out)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run on one node with two ranks (its own caches too)."""
    root = tmp_path_factory.mktemp("one_node")
    result = run_cli(
        ["bash", LAUNCHER, "NUM_GPUS=2", f"MASTER_PORT={free_port()}", *_args(root / "run")],
        env=_machine(root),
        cwd=root,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "run"


def _same_losses(run: Path, reference: Path) -> None:
    for member in ("teacher", "student"):
        got, want = train_losses(run, member), train_losses(reference, member)
        assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), member
        assert [got[s] for s in want] == pytest.approx([want[s] for s in want], rel=1e-5), member


def test_two_nodes_started_per_node_train_as_one_node_with_two_ranks(tmp_path, reference):
    """Both nodes join (2 ranks on 2 nodes), each fills its own caches (node 1 gets rank 0's tokenizer, byte for
    byte), the losses are those of one node with two ranks (same batches, same masks), and the checkpoint resumes
    on one node with two ranks."""
    out = tmp_path / "shared" / "run"
    nodes = _two_nodes(tmp_path, _args(out))
    codes = [node.wait() for node in nodes]
    assert codes == [0, 0], [node.output()[-3000:] for node in nodes]
    assert "distributed: 2 ranks on 2 nodes" in nodes[0].output()
    state = json.loads((out / "checkpoints" / "step_00000006" / layout.STATE_FILE).read_text())
    assert state["world_size"] == 2
    _same_losses(out, reference)
    # every node did its own per-node work: the tokenizer and the `datasets` cache are in each node's own cache
    tokenizers = [sorted((n.dir / "cache" / "ctcd_ds" / "tokenizers").glob("*/tokenizer.json")) for n in nodes]
    assert len(tokenizers[0]) == len(tokenizers[1]) == 1
    assert tokenizers[0][0].read_bytes() == tokenizers[1][0].read_bytes()
    assert all(list((n.dir / "cache" / "datasets").rglob("*.arrow")) for n in nodes)

    # resume on one node with two ranks, from the checkpoint of step 3 (its later steps are written again)
    step3 = out / "checkpoints" / "step_00000003"
    resumed = run_cli(
        ["bash", LAUNCHER, "NUM_GPUS=2", f"MASTER_PORT={free_port()}", *_args(out), f"--checkpoint.resume={step3}"],
        env=_machine(nodes[0].dir),
        cwd=nodes[0].dir,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {step3} at step 3" in resumed.stdout
    assert "distributed: 2 ranks on 1 node " in resumed.stdout
    _same_losses(out, reference)


def test_sigterm_to_one_nodes_launcher_checkpoints_both_nodes(tmp_path):
    """What Kubernetes does to a pod (SIGTERM to its first process, here node 1's `deepspeed`): node 1's rank sees
    its launcher go, the nodes agree, both write the checkpoint of one step, and node 0 exits with status 75."""
    out = tmp_path / "shared" / "run"
    nodes = _two_nodes(tmp_path, _args(out, steps=100000))
    _wait_for_step(out, 3, nodes)
    rank1 = nodes[1].ranks()
    nodes[1].proc.send_signal(signal.SIGTERM)
    start = time.time()
    assert nodes[0].wait(timeout=120) == EXIT_PREEMPTED, nodes[0].output()[-3000:]
    psutil.wait_procs(rank1, timeout=60)
    assert time.time() - start < 60
    assert "the deepspeed launcher exited (rank 1)" in nodes[1].output()
    stopped = layout.latest(out)
    step = json.loads((stopped / layout.STATE_FILE).read_text())["step"]
    assert f"stopped by a signal on another rank at step {step}" in nodes[0].output(), nodes[0].output()[-2000:]
    assert step >= 3 and max(m["step"] for m in read_metrics(out)) == step
    assert sorted(p.name for p in stopped.glob("rng_rank*")) == ["rng_rank00000.pt", "rng_rank00001.pt"]
    assert damage(stopped) == []  # complete: its manifest checks out


@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_node_brings_the_other_down_at_once(tmp_path, killed):
    """A node killed whole (kill -9 of its launcher and ranks; node 0 also holds the rendezvous): the other node's
    next collective fails, and it exits at once with a line saying so (not after collective_timeout_s)."""
    out = tmp_path / "shared" / "run"
    nodes = _two_nodes(tmp_path, _args(out, steps=100000))
    _wait_for_step(out, 3, nodes)
    nodes[killed].kill()
    survivor = nodes[1 - killed]
    start = time.time()
    code = survivor.wait(timeout=120)
    assert time.time() - start < 30, time.time() - start
    assert code not in (0, EXIT_PREEMPTED)
    assert f"error: a collective failed on rank {1 - killed}: another rank died" in survivor.output()


def test_an_output_dir_the_nodes_do_not_share_is_refused(tmp_path):
    """`--output_dir=run` is a different directory in each node's working directory: every rank writes each
    checkpoint into output_dir, so the run stops at start, and leaves nothing behind."""
    nodes = _two_nodes(tmp_path, _args("run"))
    codes = [node.wait() for node in nodes]
    assert codes == [EXIT_USAGE, EXIT_USAGE], [node.output()[-3000:] for node in nodes]
    assert "error: output_dir=run: not shared between nodes: rank 1 (on another node than rank 0) does not see" in (
        nodes[0].output()
    )
    assert not (nodes[0].dir / "run").exists() and not (nodes[1].dir / "run").exists()


def test_a_corpus_that_differs_between_nodes_is_refused(tmp_path):
    """`--data.train_files=corpus.txt` names each node's own copy; node 1's differs: stopped before training."""
    for rank, words in ((0, "alpha beta gamma"), (1, "delta epsilon zeta")):
        (tmp_path / f"node{rank}").mkdir()
        (tmp_path / f"node{rank}" / "corpus.txt").write_text(f"{words} {rank}\n" * 3000)
    nodes = _two_nodes(tmp_path, [*_args(tmp_path / "run"), "--data.train_files=[corpus.txt]"])
    codes = [node.wait() for node in nodes]
    assert codes == [EXIT_USAGE, EXIT_USAGE], [node.output()[-3000:] for node in nodes]
    assert "error: data.train_files=corpus.txt: rank 1 made other blocks than rank 0" in nodes[0].output()
