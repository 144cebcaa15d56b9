"""Resuming on another number of data-parallel ranks (2 -> 1, 1 -> 2) through DeepSpeed universal checkpoints:
the weights are exactly the checkpoint's, the same samples are seen, and the losses continue."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from ctcd_ds import layout
from ctcd_ds.export import export_checkpoint
from ctcd_ds.resume import map_loader_position

from conftest import PYTHON, free_port, run_cli, train_losses


def test_loader_position_maps_to_the_same_samples():
    # 5 batches of 4 on 2 ranks = the first 40 samples of the epoch = 5 batches of 8 on 1 rank
    assert map_loader_position({"epoch": 3, "index": 5}, 4, 2, 8, 1) == ({"epoch": 3, "index": 5}, None)
    assert map_loader_position({"epoch": 0, "index": 6}, 8, 1, 4, 2) == ({"epoch": 0, "index": 6}, None)
    assert map_loader_position({"epoch": 0, "index": 3}, 4, 2, 4, 1) == ({"epoch": 0, "index": 6}, None)
    mapped, note = map_loader_position({"epoch": 0, "index": 5}, 4, 2, 4, 3)  # 40 samples, 12 per batch
    assert mapped["index"] == 3 and "4 samples are seen twice" in note  # rounded down: none skipped


def _run(ranks: int, out: Path, tokenizer_dir: Path, micro: int, steps: int, *extra: str):
    args = [
        f"--output_dir={out}",
        f"--tokenizer.path={tokenizer_dir}",
        "--data.seq_len=32",
        "--data.max_train_blocks=64",
        f"--train.micro_batch_size={micro}",
        f"--train.steps={steps}",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.eval_batches=1",
        "--checkpoint.every=2",
        "--checkpoint.keep_last=0",
        *extra,
    ]
    if ranks == 1:
        result = run_cli([PYTHON, "-m", "ctcd_ds.cli", "pretrain", *args], timeout=600)
    else:
        result = run_cli(
            ["bash", "launchers/pretrain.sh", f"NUM_GPUS={ranks}", f"MASTER_PORT={free_port()}", *args], timeout=900
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(before, after, tmp_path, tokenizer_dir):
    global_batch = 8
    first = tmp_path / "first"
    _run(before, first, tokenizer_dir, global_batch // before, 4, "--export=false")
    step2 = layout.checkpoints_dir(first) / "step_00000002"
    saved = export_checkpoint(step2, tmp_path / "saved")
    # resume at step 2 and train no further: the engines hold exactly the checkpoint's weights
    same = tmp_path / "same"
    result = _run(after, same, tokenizer_dir, global_batch // after, 2, f"--checkpoint.resume={step2}")
    assert f"resuming on {after} ranks a checkpoint written on {before}" in result.stdout
    for member in ("teacher", "student"):
        expected = AutoModelForMaskedLM.from_pretrained(saved[member]).state_dict()
        loaded = AutoModelForMaskedLM.from_pretrained(same / "export" / member).state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=f"{member} {key}")
    assert not list(layout.checkpoints_dir(same).glob(".universal*"))  # the converted copy is removed
    # continue to step 4 on the new world size: same samples; the losses go on from where they were
    resumed = tmp_path / "resumed"
    _run(after, resumed, tokenizer_dir, global_batch // after, 4, f"--checkpoint.resume={step2}", "--export=false")
    for member in ("teacher", "student"):
        a, b = train_losses(first, member), train_losses(resumed, member)
        assert sorted(b) == [3, 4]
        # masks and dropout are drawn per rank and each rank averages its own tokens, so the values differ from
        # the uninterrupted run's by the noise of a batch of ~40 masked tokens (the weights above are exact)
        assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=0.06), member
