"""The GPU-efficiency levers, checked on the CPU: the step reads nothing from the device between two logs,
the log window's means, the fused KD loss's device-side backward, and the fused-AdamW / attention settings
(they reach every engine and train like the alternatives)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ctcd_ds import dist
from ctcd_ds.checks import check
from ctcd_ds.config import load_config
from ctcd_ds.losses import bidirectional_kl, fused
from ctcd_ds.step import LogWindow, StepStats
from ctcd_ds.tasks import MaskedLM, _on_device
from ctcd_ds.trainer import Trainer

from conftest import tiny_overrides

PACKAGE = str(Path(dist.__file__).parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """Every read of a tensor's value on the host made directly by ctcd_ds code (not by torch or DeepSpeed),
    except where a batch still on the host is inspected (``tasks._on_device``): what would wait for a GPU."""
    seen: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def recorder(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE) and caller.f_code.co_name != "_on_device":
                seen.append(f"{_name} in {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorder)
    monkeypatch.setattr(fused, "HOST_READ_DEVICES", ())  # the fused loss's backward as on a GPU
    return seen


def _trainer(tiny: list[str], *extra: str, config: str = "ctcd") -> Trainer:
    cfg = load_config(config, [*tiny, *extra])
    check(cfg)
    dist.init_distributed()
    return Trainer(cfg, MaskedLM(cfg))


def _steps(trainer: Trainer, n: int) -> list[StepStats]:
    batches = iter(trainer.task.loader)
    return [trainer.step_fn(batches, step) for step in range(n)]


def test_log_window_means_over_steps_micro_batches_and_ranks():
    window = LogWindow(grad_accum_steps=2)
    for step, (loss, lr) in enumerate([(3.0, 0.1), (5.0, 0.2), (10.0, 0.3)]):
        window.add(
            StepStats(sums={"a/mlm_loss": torch.tensor(loss)}, last={"a/lr": lr, "a/grad_norm": torch.tensor(step)})
        )
    assert window.read() == {"a/mlm_loss": pytest.approx(18.0 / 6), "a/lr": 0.3, "a/grad_norm": 2.0}
    assert window.steps == 0 and not window.sums  # a new window
    window.add(StepStats(sums={"a/mlm_loss": torch.tensor(4.0)}))
    assert window.read() == {"a/mlm_loss": 2.0}


@pytest.mark.parametrize("template", ["zero0", "zero2"])
def test_the_step_reads_nothing_from_the_device(tiny, host_reads, template):
    trainer = _trainer(tiny, f"--deepspeed.template={template}", "--train.grad_accum_steps=2")
    try:
        stats = _steps(trainer, 2)
        assert host_reads == [], host_reads
        window = LogWindow(2)
        for s in stats:
            window.add(s)
        scalars = window.read()  # the log step: here the values come to the host
        assert host_reads
        assert {"teacher/mlm_loss", "student/kd_loss_from_teacher", "teacher/grad_norm", "student/lr"} <= set(scalars)
    finally:
        trainer.close()


def _pair(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 11, generator=gen).requires_grad_()
    b = torch.randn(6, 11, generator=gen).requires_grad_()
    return a, b


def test_fused_loss_backward_scales_on_the_device(host_reads):
    a2, b2 = _pair()
    bidirectional_kl(a2, b2, 2.0).loss_ab.backward()
    ref_gb = b2.grad.clone()

    a, b = _pair()
    out = bidirectional_kl(a, b, 2.0)
    (1024.0 * out.loss_ab).backward(retain_graph=True)  # first backward: scaled on the device
    assert host_reads == [], host_reads
    torch.testing.assert_close(b.grad, 1024.0 * ref_gb)
    b.grad = None
    (0.25 * out.loss_ab).backward()  # a retained graph's second backward reads grad_output on the host
    torch.testing.assert_close(b.grad, 0.25 * ref_gb)

    zeroed = bidirectional_kl(a.detach(), b.detach().requires_grad_(), 2.0)
    (0.0 * zeroed.loss_ab).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="zero or non-finite"):
        zeroed.loss_ab.backward()


def test_on_device_decides_on_the_host():
    labels = torch.tensor([[-100, 7, -100], [5, -100, 9]])
    full = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3), "labels": labels}
    ids, mask, predict, targets = _on_device(full, torch.device("cpu"))
    assert mask is None  # no padding: no mask, SDPA may take its fastest kernel
    assert predict.tolist() == [1, 3, 5] and targets.tolist() == [7, 5, 9]
    padded = full | {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    assert _on_device(padded, torch.device("cpu"))[1] is not None


def test_fused_adamw_and_attention_reach_every_engine_and_train_alike(tmp_path, tokenizer_dir):
    losses = {}
    for name, extra in {
        "default": [],
        "unfused_eager": ["--train.fused_optimizer=false", "--train.attention=eager"],
    }.items():
        trainer = _trainer(tiny_overrides(tmp_path / name, tokenizer_dir), *extra)
        try:
            for m in trainer.members.values():
                torch_adamw = m.engine.optimizer.optimizer  # inside DeepSpeed's ZeRO-2 optimizer
                assert torch_adamw.param_groups[0]["fused"] is (name == "default")
                assert m.engine.module.hf.config._attn_implementation == ("sdpa" if name == "default" else "eager")
            window = LogWindow(1)
            losses[name] = []
            for s in _steps(trainer, 3):  # each step read on its own: the levers differ from the second step on
                window.add(s)
                losses[name].append(window.read())
        finally:
            trainer.close()
    for step in range(3):
        for key in ("teacher/mlm_loss", "student/mlm_loss", "teacher/kd_loss_from_student"):
            got, expected = losses["unfused_eager"][step][key], losses["default"][step][key]
            assert got == pytest.approx(expected, rel=1e-4), (step, key)


def test_compiled_members_train_like_eager_ones(tmp_path, tokenizer_dir, monkeypatch):
    """train.compile: every engine's model compiled in place (keys unchanged), the same losses as eager (inductor's
    own dropout RNG switched to torch's for the comparison)."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    losses, keys = {}, {}
    for compiled in (False, True):
        trainer = _trainer(tiny_overrides(tmp_path / str(compiled), tokenizer_dir), f"--train.compile={compiled}")
        try:
            assert all(m.engine.is_compiled is compiled for m in trainer.members.values())
            keys[compiled] = sorted(trainer.members["student"].engine.module.state_dict())
            torch.manual_seed(0)
            window = LogWindow(1)
            for s in _steps(trainer, 3):
                window.add(s)
            losses[compiled] = window.read()
        finally:
            trainer.close()
    torch._dynamo.reset()  # no compiled code or fake tensors left for the tests that follow
    assert keys[True] == keys[False] and not any("_orig_mod" in k for k in keys[True])
    for key in ("teacher/mlm_loss", "student/mlm_loss", "student/kd_loss_from_teacher"):
        assert losses[True][key] == pytest.approx(losses[False][key], rel=1e-4), key


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")


@CUDA
def test_cuda_forward_and_losses_do_not_wait_for_the_device(tiny):
    """On a GPU, every member's forward, the edges' KD losses and the task losses under
    ``torch.cuda.set_sync_debug_mode("error")``: any operation that makes the host wait raises (boolean-mask
    indexing, nonzero, .item(), blocking copies...), whichever code calls it."""
    from ctcd_ds.step import edge_losses

    trainer = _trainer(tiny)
    try:
        batch = next(iter(trainer.task.loader))
        trainer.task.forward(trainer.members["teacher"], batch)  # warm-up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            preds = {n: trainer.task.forward(m, batch) for n, m in trainer.members.items()}
            kd = edge_losses({n: p.logits for n, p in preds.items()}, trainer.graph.edges, "fused")
            losses = [trainer.task.loss(p) for p in preds.values()] + list(kd.values())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(torch.isfinite(x).item() for x in losses)
    finally:
        trainer.close()


@CUDA
def test_cuda_fused_loss_backward_does_not_wait_for_the_device():
    a, b = (x.cuda().requires_grad_() for x in (t.detach() for t in _pair()))
    ref_a, ref_b = (x.detach().clone().requires_grad_() for x in (a, b))
    bidirectional_kl(ref_a, ref_b, 2.0).loss_ab.backward()
    out = bidirectional_kl(a, b, 2.0)
    weight = torch.tensor(0.375, device="cuda")  # e.g. an edge weight over gradient accumulation, on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        (weight * out.loss_ab).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(b.grad, 0.375 * ref_b.grad)


def test_a_compiled_run_trains_summarises_and_exports(tiny):
    """train.compile through the whole run: training, the end-of-run summary (which walks every live tensor, and
    compiled code leaves tensors without memory behind), checkpoint and export."""
    import torch._inductor.config

    from conftest import run

    torch._inductor.config.fallback_random = True
    try:
        summary, out = run([*tiny, "--train.compile=true", "--train.steps=2", "--train.eval_every=0"])
    finally:
        torch._inductor.config.fallback_random = False
        torch._dynamo.reset()
    assert summary["tokens_per_s"] > 0 and summary["memory_per_rank"][0]["tensors_gb"] > 0
    assert (out / "export" / "student" / "config.json").is_file()
