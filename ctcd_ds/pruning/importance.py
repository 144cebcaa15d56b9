"""Importance of the prunable structures: the sensitivity ``sum |theta * dL/dtheta|`` over a structure's
parameters (:func:`structure_scores`), smoothed across steps by an exponential moving average
(:func:`update_scores`), or summed over a few batches in one shot (:func:`one_shot_scores`, MiniDisc)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import BertForMaskedLM

from ctcd_ds import dist
from ctcd_ds.pruning.masks import PruneMasks


def structure_scores(
    model: BertForMaskedLM, grad_of: Callable[[nn.Parameter], torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sensitivity ``sum |theta * dL/dtheta|`` of every head ``[L, A]``, FFN neuron ``[L, F]`` and hidden dim
    ``[H]``, float32 on the CPU. ``grad_of(p)`` returns a parameter's full gradient (None = zero); it is called
    once per parameter, in a fixed order (under ZeRO it is a collective)."""
    bert, cfg = model.bert, model.config
    device = bert.embeddings.word_embeddings.weight.device  # sums stay on the device; three vectors come back
    heads = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, device=device)
    ffn = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size, device=device)
    hidden = torch.zeros(cfg.hidden_size, device=device)

    def sens(p: nn.Parameter) -> torch.Tensor:
        g = grad_of(p)
        if g is None:
            return torch.zeros(p.shape, device=device)
        return (p.detach().float() * g.detach().to(device, torch.float32).view(p.shape)).abs()

    def add_linear(
        lin: nn.Linear,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
        row_groups: int = 0,
        target=None,
        layer=None,
    ):
        """Add a Linear's sensitivity: ``rows``/``cols`` get per-row / per-column sums; ``target[layer]`` gets
        per-group sums of rows (``row_groups`` > 0, heads) or columns (< 0)."""
        w, b = sens(lin.weight), sens(lin.bias) if lin.bias is not None else None
        if rows is not None:
            rows += w.sum(1) + (b if b is not None else 0)
        if cols is not None:
            cols += w.sum(0)
        if target is not None:
            if row_groups > 0:  # output rows grouped: [groups * size, in]
                target[layer] += w.view(row_groups, -1).sum(1) + (b.view(row_groups, -1).sum(1) if b is not None else 0)
            elif row_groups < 0:  # input columns grouped: [out, groups * size]
                target[layer] += w.view(w.shape[0], -row_groups, -1).sum((0, 2))
            else:  # one unit per row
                target[layer] += w.sum(1) + (b if b is not None else 0)

    def add_ln(ln: nn.LayerNorm) -> None:
        hidden.add_(sens(ln.weight) + sens(ln.bias))

    emb = bert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        hidden.add_(sens(table.weight).sum(0))
    add_ln(emb.LayerNorm)
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention
        for lin in (att.self.query, att.self.key, att.self.value):
            add_linear(lin, None, hidden, row_groups=cfg.num_attention_heads, target=heads, layer=i)
        add_linear(att.output.dense, hidden, None, row_groups=-cfg.num_attention_heads, target=heads, layer=i)
        add_ln(att.output.LayerNorm)
        add_linear(layer.intermediate.dense, None, hidden, target=ffn, layer=i)
        w = sens(layer.output.dense.weight)
        ffn[i] += w.sum(0)
        hidden.add_(w.sum(1) + sens(layer.output.dense.bias))
        add_ln(layer.output.LayerNorm)
    head = model.cls.predictions
    w = sens(head.transform.dense.weight)  # [H, H]: hidden dim d owns row d and column d (entry d,d once)
    hidden.add_(w.sum(1) + w.sum(0) - w.diagonal() + sens(head.transform.dense.bias))
    add_ln(head.transform.LayerNorm)
    if head.decoder.weight is not emb.word_embeddings.weight:  # untied decoder: its columns read the hidden dims
        hidden.add_(sens(head.decoder.weight).sum(0))
    return heads.cpu(), ffn.cpu(), hidden.cpu()


def update_scores(masks: PruneMasks, scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ema: float) -> bool:
    """Fold one step's sensitivities into the smoothed scores; False (nothing changed) if any is not finite.

    Each step's scores are normalised to sum 1 per kind of structure first, so a changing fp16 loss scale
    (gradients are still scaled before the step) does not weigh some steps more than others."""
    if not all(torch.isfinite(s).all() for s in scores):
        return False
    first = int(masks.scored_steps) == 0
    with torch.no_grad():
        for buf, s in zip((masks.head_scores, masks.ffn_scores, masks.hidden_scores), scores):
            total = float(s.sum())
            s = (s / total if total > 0 else s).to(buf.device, buf.dtype)
            buf.copy_(s) if first else buf.mul_(ema).add_(s, alpha=1.0 - ema)
        masks.scored_steps += 1
    return True


def one_shot_scores(
    model: BertForMaskedLM, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> PruneMasks:
    """Masks (all kept) whose scores are the summed sensitivities of the MLM loss over ``batches``, summed over
    ranks too (each rank scores its own batches), so every rank ranks the structures alike."""
    masks = PruneMasks(model.config)
    model.to(device).eval()  # no dropout: the sensitivities of the model as it predicts
    model.requires_grad_(True)
    totals = None
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            labels=batch["labels"].to(device),
        )
        out.loss.backward()
        step = structure_scores(model, lambda p: p.grad)
        totals = step if totals is None else tuple(a + b for a, b in zip(totals, step))
    model.zero_grad(set_to_none=True)
    assert totals is not None, "one_shot_scores needs at least one batch"
    update_scores(masks, tuple(dist.all_reduce_sum(t).float() for t in totals), ema=0.0)
    return masks
