"""Structured pruning (ctcd_ds.pruning): masks equal physical removal, importance scores, the cubic schedule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from ctcd_ds.models import count_parameters
from ctcd_ds.pruning.importance import one_shot_scores, structure_scores
from ctcd_ds.pruning.masks import PruneMasks, attach, prune_lowest, prune_to
from ctcd_ds.pruning.minidisc import TABLE_FILE, Candidate, Reference, choice_of, rebuild_choice, write_table
from ctcd_ds.pruning.schedule import cubic_kept
from ctcd_ds.pruning.surgery import prune_bert
from ctcd_ds.pruning.training import Pruner, Sandwich
from ctcd_ds.pruning.widths import Widths, target_problems

CFG = {
    "vocab_size": 97,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "max_position_embeddings": 32,
}


def _model(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(**CFG)).eval()


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (3, 12), generator=g)
    labels = torch.where(torch.rand(3, 12, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _random_masks(model: BertForMaskedLM, kept: Widths, seed: int = 3) -> PruneMasks:
    masks = PruneMasks(model.config)
    g = torch.Generator().manual_seed(seed)
    masks.head_scores.copy_(torch.rand(masks.head_scores.shape, generator=g))
    masks.ffn_scores.copy_(torch.rand(masks.ffn_scores.shape, generator=g))
    masks.hidden_scores.copy_(torch.rand(masks.hidden_scores.shape, generator=g))
    prune_to(masks, kept)
    return masks


def test_masked_model_computes_what_the_pruned_model_computes(tmp_path):
    model = _model()
    masks = _random_masks(model, Widths(hidden=32, heads=2, ffn=40))
    assert masks.kept() == Widths(32, 2, 40)
    attach(model, masks)
    ids = _batch()["input_ids"]
    masked = model(input_ids=ids).logits
    small = prune_bert(model, masks)
    assert (small.config.hidden_size, small.config.num_attention_heads, small.config.intermediate_size) == (32, 2, 40)
    torch.testing.assert_close(small(input_ids=ids).logits, masked, rtol=1e-5, atol=1e-5)
    assert count_parameters(small) < count_parameters(model) / 2
    small.save_pretrained(tmp_path / "small")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "small").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_pruned_structures_get_no_gradient():
    model = _model()
    masks = _random_masks(model, Widths(hidden=48, heads=3, ffn=50))
    attach(model, masks)
    model.train()
    batch = _batch()
    model(**batch).loss.backward()
    layer = model.bert.encoder.layer[0]
    dropped_head = (~masks.heads[0]).nonzero()[0].item()
    rows = slice(dropped_head * 16, (dropped_head + 1) * 16)
    assert layer.attention.self.value.weight.grad[rows].abs().max() == 0
    assert layer.attention.output.dense.weight.grad[:, rows].abs().max() == 0
    dropped_neuron = (~masks.ffn[0]).nonzero()[0].item()
    assert layer.intermediate.dense.weight.grad[dropped_neuron].abs().max() == 0
    dropped_dim = (~masks.hidden).nonzero()[0].item()
    assert layer.output.dense.weight.grad[dropped_dim].abs().max() == 0
    assert model.bert.embeddings.word_embeddings.weight.grad[:, dropped_dim].abs().max() == 0
    kept_dim = masks.hidden.nonzero()[0].item()
    assert layer.output.dense.weight.grad[kept_dim].abs().max() > 0


def test_structure_scores_sum_the_sensitivities_of_each_structure():
    model = _model()
    model(**_batch()).loss.backward()
    heads, ffn, hidden = structure_scores(model, lambda p: p.grad)
    s = {n: (p.detach() * p.grad).abs() for n, p in model.named_parameters()}
    p = "bert.encoder.layer.1."
    h = slice(2 * 16, 3 * 16)  # head 2 of layer 1
    expected = sum(
        s[f"{p}attention.self.{x}.weight"][h].sum() + s[f"{p}attention.self.{x}.bias"][h].sum()
        for x in ("query", "key", "value")
    )
    expected += s[f"{p}attention.output.dense.weight"][:, h].sum()
    assert heads[1, 2].item() == pytest.approx(expected.item(), rel=1e-5)
    j = 7  # FFN neuron 7 of layer 1
    expected = (
        s[f"{p}intermediate.dense.weight"][j].sum()
        + s[f"{p}intermediate.dense.bias"][j]
        + s[f"{p}output.dense.weight"][:, j].sum()
    )
    assert ffn[1, j].item() == pytest.approx(expected.item(), rel=1e-5)
    d = 5  # hidden dim 5: every parameter indexed by the residual stream (the decoder is tied to the word embeddings)
    expected = 0.0
    for name, t in s.items():
        if name == "cls.predictions.bias":
            continue
        if "embeddings" in name and name.endswith("embeddings.weight"):
            expected += t[:, d].sum()
        elif (
            name.endswith(("LayerNorm.weight", "LayerNorm.bias", "output.dense.bias"))
            or name == "cls.predictions.transform.dense.bias"
        ):
            expected += t[d]
        elif any(name.endswith(f"{x}.weight") for x in ("query", "key", "value", "intermediate.dense")):
            expected += t[:, d].sum()
        elif name.endswith("output.dense.weight"):
            expected += t[d].sum()
        elif name == "cls.predictions.transform.dense.weight":
            expected += t[d].sum() + t[:, d].sum() - t[d, d]
    assert hidden[d].item() == pytest.approx(float(expected), rel=1e-5)


def test_cubic_schedule_and_lowest_first():
    assert [cubic_kept(1024, 512, p) for p in (0.0, 0.5, 1.0, 1.5)] == [1024, 576, 512, 512]
    kept = [cubic_kept(4, 2, i / 10) for i in range(11)]
    assert kept[0] == 4 and kept[-1] == 2 and kept == sorted(kept, reverse=True)
    keep = torch.tensor([True, True, False, True, True])
    prune_lowest(keep, torch.tensor([0.5, 0.1, 0.0, 0.9, 0.3]), 2)
    assert keep.tolist() == [True, False, False, True, False]


def test_pruner_reaches_its_target_on_schedule():
    model = _model()
    pruner = Pruner(model, Widths(32, 2, 48), start_step=2, end_step=8, every=2, ema=0.5)
    # after step s the pruned share is 1 - (1 - (s + 1 - 2) / 6)^3: 48 + 48 * (5/6)^3 = 75.8, 48 + 48 / 8 = 54
    assert [pruner.widths_at(s).ffn for s in (1, 2, 4, 7, 9)] == [96, 76, 54, 48, 48]
    masks = pruner.masks
    for step in range(10):
        model.zero_grad()
        model.train()
        model(**_batch(step)).loss.backward()
        kept = pruner.before_step(step)  # outside DeepSpeed, safe_get_full_grad reads p.grad
        expected = pruner.widths_at(step) if step >= 2 and (step % 2 == 0 or step == 7) else None
        if expected is not None:
            assert masks.kept() == expected, step
        assert kept == {
            "kept_hidden": masks.kept().hidden,
            "kept_heads": masks.kept().heads,
            "kept_ffn": masks.kept().ffn,
        }
    assert masks.kept() == Widths(32, 2, 48)
    assert int(masks.scored_steps) == 10


def test_one_shot_scores_rank_by_the_batches():
    model = _model()
    masks = one_shot_scores(model, [_batch(1), _batch(2)], torch.device("cpu"))
    assert masks.head_scores.gt(0).all() and masks.ffn_scores.gt(0).all() and masks.hidden_scores.gt(0).all()
    assert masks.kept() == Widths(64, 4, 96)  # scores only; nothing pruned yet


def test_target_problems():
    cfg = BertConfig(**CFG)
    assert target_problems("p", cfg, 32, 48) == []
    assert any("multiple of the head size 16" in p for p in target_problems("p", cfg, 40, 48))
    assert any("intermediate_size=200: must be in 1..96" in p for p in target_problems("p", cfg, 32, 200))


def test_sandwich_view_is_the_sub_network_of_the_most_important_units():
    model = _model()
    sandwich = Sandwich(model, ema=0.0)
    model(**_batch()).loss.backward()
    sandwich.score()
    full_ids = _batch()["input_ids"]
    full = model(input_ids=full_ids).logits
    with sandwich.view(0.5):
        half = model(input_ids=full_ids).logits
    torch.testing.assert_close(model(input_ids=full_ids).logits, full)  # the full model is back
    heads, ffn, hidden = sandwich.sub_masks(0.5)
    assert heads.sum(1).tolist() == [2, 2] and ffn.sum(1).tolist() == [48, 48] and int(hidden.sum()) == 32
    top = sandwich.masks.head_scores[0].topk(2).indices
    assert heads[0, top].all()
    sub = PruneMasks(model.config)
    sub.heads.copy_(heads), sub.ffn.copy_(ffn), sub.hidden.copy_(hidden)
    torch.testing.assert_close(prune_bert(model, sub)(input_ids=full_ids).logits, half, rtol=1e-5, atol=1e-5)


def test_widths_imports_no_deepspeed():
    """Config validation imports ``ctcd_ds.pruning.widths``; it must stay DeepSpeed-free."""
    code = "import sys, ctcd_ds.pruning.widths; sys.exit('deepspeed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_minidisc_choice_rebuilds_the_candidate_shape(tmp_path):
    model = _model()
    chosen = Candidate(0.5, hidden=32, heads=2, ffn=48, params=1, param_sparsity=0.5, mlm_accuracy=0.1, score=0.6)
    choice = choice_of(chosen)
    assert choice == {"hidden": 32, "heads": 2, "ffn": 48}
    ta = rebuild_choice(model, choice)
    assert type(ta) is BertForMaskedLM
    assert (ta.config.hidden_size, ta.config.num_attention_heads, ta.config.intermediate_size) == (32, 2, 48)
    assert ta.config.num_hidden_layers == 2 and model.config.hidden_size == 64  # the teacher's config is untouched
    other = Candidate(0.25, 48, 3, 72, 2, 0.25, 0.2, 0.45)
    reference = Reference(teacher_params=4, teacher_mlm_accuracy=0.3, student="student", student_params=1)
    write_table(tmp_path, "ta", [other, chosen], best=1, lam=1.0, reference=reference)
    table = json.loads((tmp_path / TABLE_FILE).read_text())["ta"]  # the table people read names the same choice
    assert {k: table["candidates"][table["chosen"]][k] for k in choice} == choice
    assert table["student_params"] == 1 and table["teacher_params"] == 4  # the sizes a TA sits between
