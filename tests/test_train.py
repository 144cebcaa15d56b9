"""End-to-end co-training on tiny models through the real DeepSpeed engines (1 rank, in process)."""

from __future__ import annotations

import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForMaskedLM, AutoTokenizer

from ctcd_ds import layout

from conftest import PYTHON, read_metrics, run, run_cli, tiny_overrides, train_losses


@pytest.fixture(scope="module")
def ctcd_run(tmp_path_factory, tokenizer_dir):
    """One 6-step CTCD run (ZeRO-2), checkpoints at steps 3 and 6, shared by the tests below."""
    out = tmp_path_factory.mktemp("ctcd") / "run"
    overrides = tiny_overrides(out, tokenizer_dir)
    summary, run_dir = run(overrides)
    return summary, run_dir, overrides


def test_run_layout_and_summary(ctcd_run):
    summary, run_dir, _ = ctcd_run
    ckpts = sorted(p.name for p in layout.checkpoints_dir(run_dir).glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (layout.checkpoints_dir(run_dir) / "latest").read_text() == "step_00000006"
    last = layout.checkpoints_dir(run_dir) / "step_00000006"
    assert {p.name for p in last.iterdir()} >= {
        "teacher",
        "student",
        "rng_rank00000.pt",
        "trainer_state.json",
        "config.yaml",
    }
    assert summary["checkpoint"] == str(last)
    assert set(summary["exports"]) == {"teacher", "student"}
    assert summary["tokens_per_s"] > 0  # measured over steps 2-6
    assert summary["peak_memory_gb"] > 0.1  # a CPU run: the process's peak RSS (torch alone is more)
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file() and (run_dir / "config.yaml").is_file()


def test_tensorboard_has_every_scalar(ctcd_run):
    _, run_dir, _ = ctcd_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for m, other in (("teacher", "student"), ("student", "teacher")):
        assert {f"{m}/mlm_loss", f"{m}/kd_loss_from_{other}", f"{m}/total_loss", f"{m}/lr", f"{m}/grad_norm"} <= tags
        assert {f"eval/{m}/mlm_loss", f"eval/{m}/perplexity", f"eval/{m}/accuracy"} <= tags
    assert {"perf/tokens_per_s", "perf/step_time_s", "perf/peak_memory_gb", "edge/student->teacher/weight"} <= tags
    peaks = [e.value for e in acc.Scalars("perf/peak_memory_gb")]
    assert peaks == sorted(peaks) and peaks[0] > 0  # a running peak never goes down
    assert [e.step for e in acc.Scalars("teacher/total_loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("eval/student/perplexity")] == [3, 6]


def test_losses_are_mlm_plus_weighted_kd(ctcd_run):
    _, run_dir, _ = ctcd_run
    for m in read_metrics(run_dir):
        if "teacher/total_loss" in m:
            assert m["teacher/total_loss"] == pytest.approx(
                m["teacher/mlm_loss"] + m["teacher/kd_loss_from_student"], rel=1e-5
            )
            assert m["student/kd_loss_from_teacher"] > 0


def test_resume_equals_uninterrupted(ctcd_run, tmp_path):
    """Stop after step 3 (keep only that checkpoint), resume: steps 4-6 match the uninterrupted run."""
    _, run_dir, overrides = ctcd_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        layout.checkpoints_dir(run_dir) / "step_00000003", layout.checkpoints_dir(resumed_dir) / "step_00000003"
    )
    (layout.checkpoints_dir(resumed_dir) / "latest").write_text("step_00000003")
    run([*overrides, f"--output_dir={resumed_dir}"])
    for member in ("teacher", "student"):
        full, resumed = train_losses(run_dir, member), train_losses(resumed_dir, member)
        assert sorted(resumed) == [4, 5, 6]
        for step in (4, 5, 6):
            assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (
                member,
                step,
                resumed[step],
                full[step],
            )


def test_fused_and_reference_kd_losses_train_alike(ctcd_run, tmp_path):
    """The default fused loss and the plain-torch reference give the same per-step losses and grad norms."""
    _, run_dir, overrides = ctcd_run
    assert read_metrics(run_dir)[0] and "kd_loss: fused" in (run_dir / "config.yaml").read_text()
    _, ref_dir = run(
        [
            *overrides,
            f"--output_dir={tmp_path / 'reference'}",
            "--checkpoint.every=0",
            "--export=false",
            "--train.kd_loss=reference",
        ]
    )
    fused = {m["step"]: m for m in read_metrics(run_dir) if "teacher/total_loss" in m}
    reference = {m["step"]: m for m in read_metrics(ref_dir) if "teacher/total_loss" in m}
    assert sorted(fused) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in fused:
        for key in (
            "teacher/mlm_loss",
            "teacher/kd_loss_from_student",
            "student/kd_loss_from_teacher",
            "student/total_loss",
            "teacher/grad_norm",
            "student/grad_norm",
        ):
            assert fused[step][key] == pytest.approx(reference[step][key], rel=1e-4), (step, key)


def test_export_round_trip(ctcd_run, tmp_path):
    summary, run_dir, _ = ctcd_run
    result = run_cli(
        [PYTHON, "-m", "ctcd_ds.cli", "export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "offline")]
    )
    assert result.returncode == 0, result.stderr
    for member, path in summary["exports"].items():
        live = AutoModelForMaskedLM.from_pretrained(path)
        offline = AutoModelForMaskedLM.from_pretrained(tmp_path / "offline" / member)
        AutoTokenizer.from_pretrained(path)
        for (name, a), b in zip(live.state_dict().items(), offline.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        ids = torch.tensor([[2, 10, 4, 11, 3]])
        assert live(input_ids=ids).logits.shape == (1, 5, 1000)
    assert live.config.num_hidden_layers == 2 and live.config.hidden_size == 128  # the tiny student


def test_deepspeed_zero_to_fp32_gives_the_exported_weights(ctcd_run, tmp_path):
    """What docs/configuration.md says about DeepSpeed's own script: the tag is the member, keys start with hf."""
    summary, run_dir, _ = ctcd_run
    step = layout.latest(run_dir)
    result = run_cli([PYTHON, str(step / "zero_to_fp32.py"), str(step), str(tmp_path / "fp32"), "--tag", "teacher"])
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "fp32" / "pytorch_model.bin")
    assert all(k.startswith("hf.") for k in state)
    model = AutoModelForMaskedLM.from_pretrained(summary["exports"]["teacher"])
    exported = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k.removeprefix("hf."): v for k, v in state.items()})
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, exported[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("template", ["zero0", "zero1", "zero3"])
def test_other_zero_stages_train_and_export(template, tmp_path, tokenizer_dir):
    summary, run_dir = run(
        [
            f"--output_dir={tmp_path / template}",
            f"--tokenizer.path={tokenizer_dir}",
            "--data.seq_len=32",
            "--data.max_train_blocks=64",
            "--train.micro_batch_size=4",
            "--train.grad_accum_steps=2",
            "--train.steps=2",
            "--train.eval_batches=1",
            f"--deepspeed.template={template}",
        ]
    )
    metrics = read_metrics(run_dir)
    assert metrics[-1]["eval/teacher/mlm_loss"] > 0 and metrics[0]["teacher/grad_norm"] > 0
    model = AutoModelForMaskedLM.from_pretrained(summary["exports"]["teacher"])
    assert model.config.num_hidden_layers == 4


def test_one_way_kd_with_a_frozen_pretrained_teacher(ctcd_run, tmp_path):
    summary, _, _ = ctcd_run
    teacher_dir = summary["exports"]["teacher"]
    run_dir = tmp_path / "kd"
    result = run_cli(
        [
            PYTHON,
            "-m",
            "ctcd_ds.cli",
            "pretrain",
            "--config=kd",
            f"--output_dir={run_dir}",
            f"--members.teacher.model={teacher_dir}",
            "--data.seq_len=64",
            "--data.max_train_blocks=64",
            "--train.micro_batch_size=8",
            "--train.steps=2",
            "--train.eval_batches=1",
        ]
    )
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(run_dir)
    assert "student/kd_loss_from_teacher" in metrics[0] and "teacher/total_loss" not in metrics[0]
    last = metrics[-1]
    assert "eval/teacher/mlm_loss" in last  # the frozen teacher is still evaluated
    # the summary: what was trained, the final held-out metrics of every member, the frozen input not re-exported
    out = result.stdout
    assert "done: 2 steps of student (taught by frozen teacher)" in out
    for name in ("teacher", "student"):
        assert f"held-out:    {name}: MLM loss {last[f'eval/{name}/mlm_loss']:.4f}, perplexity" in out
    assert f"input:       {teacher_dir}   (teacher, frozen: unchanged, not exported again)" in out
    assert (run_dir / "export" / "student").is_dir() and not (run_dir / "export" / "teacher").exists()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@needs_cuda
@pytest.mark.parametrize("template", ["zero2", "zero3"])
def test_gpu_bf16_fused_and_reference_train_alike(template, tiny, tmp_path):
    """On a GPU: bf16 CTCD through the real engines with the fused loss (the Triton kernel where installed) and
    with the reference loss; the losses agree to bf16 accuracy, stay finite and the peak GPU memory is logged."""
    common = [
        *tiny,
        "--train.precision=bf16",
        f"--deepspeed.template={template}",
        "--checkpoint.every=0",
        "--export=false",
    ]
    _, fused_dir = run([*common, f"--output_dir={tmp_path / 'fused'}"])
    _, ref_dir = run([*common, f"--output_dir={tmp_path / 'reference'}", "--train.kd_loss=reference"])
    fused = {m["step"]: m for m in read_metrics(fused_dir) if "teacher/total_loss" in m}
    reference = {m["step"]: m for m in read_metrics(ref_dir) if "teacher/total_loss" in m}
    assert sorted(fused) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for key in ("teacher/mlm_loss", "teacher/kd_loss_from_student", "student/kd_loss_from_teacher"):
        assert fused[1][key] == pytest.approx(reference[1][key], rel=2e-2), key  # same weights, same batch
        assert all(torch.isfinite(torch.tensor(m[key])) for m in fused.values())
    assert fused[6]["perf/peak_memory_gb"] > 0
