"""Structured pruning of BERT masked LMs: importance scores, masks while training, physical removal.

Three kinds of structure, as in HomoDistil (Liang et al., ICLR 2023):

- attention heads, per layer (the query/key/value rows and output-projection columns of a head);
- FFN neurons, per layer (a row of ``intermediate.dense`` and a column of ``output.dense``);
- hidden width: one mask over the residual stream, shared by the embeddings, every layer and the MLM
  head transform (columns of every matrix that reads it, rows of every matrix that writes it, and the
  LayerNorms).

**Masks while training.** :class:`PruneMasks` holds bool masks (buffers, so they are saved in every
DeepSpeed checkpoint) and the smoothed importance scores; :func:`attach` hooks them into the model:
a pruned head's context is zeroed before the output projection, a pruned FFN neuron's activation is
zeroed, and every LayerNorm normalises over the kept hidden dims only and outputs 0 on the pruned ones.
So the masked model computes exactly what the physically smaller model computes
(:func:`prune_bert`, tested to float precision), and pruned structures receive zero gradients.

**Importance** of a structure is the sum over its parameters of the sensitivity ``|theta * dL/dtheta|``
(:func:`structure_scores`), smoothed by an exponential moving average across steps.

**Physical removal** (:func:`prune_bert`) builds a standard ``BertForMaskedLM`` with the kept sizes.
BERT's config has no separate head size (``head_dim = hidden_size / num_attention_heads``), so every
layer keeps the same number of heads and neurons, and the pruned hidden size must equal the kept heads
times the original head size: e.g. 4L-256 (4 heads of 64, FFN 1024) -> 4L-128 (2 heads of 64, FFN 512).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM


@dataclass(frozen=True, slots=True)
class Widths:
    """Per-layer sizes of a (pruned) BERT: hidden width, attention heads, FFN neurons."""

    hidden: int
    heads: int
    ffn: int


def widths_of(config: BertConfig) -> Widths:
    return Widths(config.hidden_size, config.num_attention_heads, config.intermediate_size)


def head_dim(config: BertConfig) -> int:
    return config.hidden_size // config.num_attention_heads


def target_widths(config: BertConfig, hidden: int, ffn: int) -> Widths:
    """The widths a pruning target means for ``config``: heads follow from ``hidden / head_dim``."""
    return Widths(hidden, hidden // head_dim(config), ffn)


def target_problems(flag: str, config: BertConfig, hidden: int, ffn: int) -> list[str]:
    """Why ``(hidden, ffn)`` is not a reachable pruning target of ``config`` (empty if it is)."""
    if getattr(config, "model_type", "bert") != "bert":
        return []  # reported once, by the caller's model-type check
    problems = []
    d = head_dim(config)
    if not 0 < hidden <= config.hidden_size:
        problems.append(f"{flag}.hidden_size={hidden}: must be in 1..{config.hidden_size} (the model's hidden size)")
    elif hidden % d:
        problems.append(
            f"{flag}.hidden_size={hidden}: must be a multiple of the head size {d} (BERT's head size is "
            f"hidden_size / num_attention_heads, so the pruned model keeps hidden_size / {d} heads of {d})"
        )
    if not 0 < ffn <= config.intermediate_size:
        problems.append(f"{flag}.intermediate_size={ffn}: must be in 1..{config.intermediate_size} (the model's FFN size)")
    return problems


def cubic_kept(full: int, target: int, progress: float) -> int:
    """Units kept at ``progress`` in [0, 1] of a cubic schedule from ``full`` to ``target`` (Zhu & Gupta 2017):
    the pruned share grows as ``1 - (1 - progress)^3``, fast at first and settling at the target."""
    progress = min(1.0, max(0.0, progress))
    return target + round((full - target) * (1.0 - progress) ** 3)


# --------------------------------------------------------------------------------------------------
# masks and hooks


class PruneMasks(nn.Module):
    """Masks (bool, True = kept) and smoothed importance scores of one BERT, as buffers."""

    def __init__(self, config: BertConfig):
        super().__init__()
        layers, w = config.num_hidden_layers, widths_of(config)
        self.head_dim = head_dim(config)
        self.register_buffer("heads", torch.ones(layers, w.heads, dtype=torch.bool))
        self.register_buffer("ffn", torch.ones(layers, w.ffn, dtype=torch.bool))
        self.register_buffer("hidden", torch.ones(w.hidden, dtype=torch.bool))
        self.register_buffer("head_scores", torch.zeros(layers, w.heads, dtype=torch.float32))
        self.register_buffer("ffn_scores", torch.zeros(layers, w.ffn, dtype=torch.float32))
        self.register_buffer("hidden_scores", torch.zeros(w.hidden, dtype=torch.float32))
        self.register_buffer("scored_steps", torch.zeros((), dtype=torch.long))

    def hidden_all_kept(self) -> bool:
        """Whether no hidden dim is pruned; cached per version of the ``hidden`` tensor (no device sync per call)."""
        key = (id(self.hidden), self.hidden._version)
        if getattr(self, "_all_kept_key", None) != key:
            self._all_kept_key, self._all_kept = key, bool(self.hidden.all())
        return self._all_kept

    def kept(self) -> Widths:
        """Current per-layer sizes (heads and FFN neurons are pruned uniformly over layers)."""
        return Widths(int(self.hidden.sum()), int(self.heads[0].sum()), int(self.ffn[0].sum()))

    def masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads, self.ffn, self.hidden


def masked_layer_norm(x: torch.Tensor, ln: nn.LayerNorm, keep: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the kept dims of ``x`` only (statistics included), 0 on the pruned dims: what the
    LayerNorm of the physically pruned model computes, embedded back at full width. Math in float32."""
    m = keep.to(torch.float32)
    xf = x.float()
    n = m.sum()
    mean = (xf * m).sum(-1, keepdim=True) / n
    centred = (xf - mean) * m
    var = (centred * centred).sum(-1, keepdim=True) / n
    y = centred * torch.rsqrt(var + ln.eps) * ln.weight.float() + ln.bias.float()
    return (y * m).to(x.dtype)


def _layer_norms(model: BertForMaskedLM) -> list[nn.LayerNorm]:
    bert = model.bert
    lns = [bert.embeddings.LayerNorm, model.cls.predictions.transform.LayerNorm]
    for layer in bert.encoder.layer:
        lns += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
    return lns


def attach(model: BertForMaskedLM, masks: PruneMasks) -> list:
    """Hook ``masks`` into ``model`` (see the module docstring); returns the hook handles.

    The hooks read the buffers through ``masks`` at every call, so they follow the module when DeepSpeed
    moves or converts it."""
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):

        def head_gate(module, args, i=i):
            keep = masks.heads[i].repeat_interleave(masks.head_dim).to(args[0].dtype)
            return (args[0] * keep, *args[1:])

        def ffn_gate(module, args, output, i=i):
            return output * masks.ffn[i].to(output.dtype)

        handles.append(layer.attention.output.register_forward_pre_hook(head_gate))
        handles.append(layer.intermediate.register_forward_hook(ffn_gate))
    def ln_gate(module, args, output):
        return output if masks.hidden_all_kept() else masked_layer_norm(args[0], module, masks.hidden)

    for ln in _layer_norms(model):
        handles.append(ln.register_forward_hook(ln_gate))
    return handles


# --------------------------------------------------------------------------------------------------
# importance


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

    def add_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None, row_groups: int = 0, target=None, layer=None):
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


def prune_lowest(keep: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """In place: keep only the ``count`` highest-scoring of the units ``keep`` still keeps (1-d)."""
    current = int(keep.sum())
    if count >= current:
        return
    ranked = torch.where(keep, scores.float(), torch.tensor(math.inf))
    drop = torch.argsort(ranked, stable=True)[: current - count]
    keep[drop] = False


def prune_to(masks: PruneMasks, target: Widths) -> None:
    """Shrink the masks to ``target`` by the smoothed scores (per layer for heads and FFN neurons)."""
    with torch.no_grad():
        for i in range(masks.heads.shape[0]):
            prune_lowest(masks.heads[i], masks.head_scores[i], target.heads)
            prune_lowest(masks.ffn[i], masks.ffn_scores[i], target.ffn)
        prune_lowest(masks.hidden, masks.hidden_scores, target.hidden)


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


def widths_at_sparsity(config: BertConfig, sparsity: float) -> Widths:
    """Per-layer widths that keep ``1 - sparsity`` of the heads (so of the hidden width, ``heads x head size``)
    and of the FFN neurons, at least one of each."""
    full = widths_of(config)
    heads = max(1, round(full.heads * (1 - sparsity)))
    return Widths(heads * head_dim(config), heads, max(1, round(full.ffn * (1 - sparsity))))


class _Scored:
    """A member gated by masks, whose importance scores are updated from its gradients before every step."""

    def __init__(self, model: BertForMaskedLM, ema: float):
        self.model, self.masks, self.ema = model, PruneMasks(model.config), ema
        attach(model, self.masks)

    def score(self) -> None:
        """Fold this step's sensitivities into the scores; collective under ZeRO (every rank, same order)."""
        from deepspeed.utils import safe_get_full_grad

        update_scores(self.masks, structure_scores(self.model, safe_get_full_grad), self.ema)


class Pruner(_Scored):
    """HomoDistil's schedule for one member: every step, fold the sensitivities of its gradients into the
    scores; between ``start_step`` and ``end_step`` (every ``every`` steps) shrink the masks to the cubic
    schedule's widths, reaching ``target`` at ``end_step``. Masks only ever shrink."""

    def __init__(self, model: BertForMaskedLM, target: Widths, start_step: int, end_step: int, every: int, ema: float):
        assert 0 <= start_step < end_step and every >= 1, (start_step, end_step, every)
        super().__init__(model, ema)
        self.full, self.target = widths_of(model.config), target
        self.start_step, self.end_step, self.every = start_step, end_step, every

    def widths_at(self, step: int) -> Widths:
        """The widths once optimizer step ``step`` (0-based) is taken."""
        progress = (step + 1 - self.start_step) / (self.end_step - self.start_step)
        return Widths(*(cubic_kept(f, t, progress) for f, t in zip(
            (self.full.hidden, self.full.heads, self.full.ffn), (self.target.hidden, self.target.heads, self.target.ffn))))

    def before_step(self, step: int) -> dict[str, float]:
        """Score, and prune when due; collective. Returns the kept widths (to log)."""
        from ctcd_ds import dist

        self.score()
        due = step >= self.start_step and ((step - self.start_step) % self.every == 0 or step + 1 >= self.end_step)
        if due and self.masks.kept() != self.target:
            prune_to(self.masks, self.widths_at(step))
            # every rank computed the same masks from the same reduced gradients; rank 0's are the law
            for buf, value in zip(self.masks.masks(), dist.broadcast_object([m.cpu() for m in self.masks.masks()])):
                buf.copy_(value)
        kept = self.masks.kept()
        return {"kept_hidden": kept.hidden, "kept_heads": kept.heads, "kept_ffn": kept.ffn}


SANDWICH_EMA = 0.85
"""Smoothing of the importance scores that choose a sandwich member's sub-networks."""


class Sandwich(_Scored):
    """MiniDisc's sandwich training: the member also runs as weight-shared sub-networks at several width
    sparsities, each keeping its most important heads, FFN neurons and hidden dims by the running scores
    (before the first scores, ties keep the last units). The full model's masks stay all-kept."""

    def __init__(self, model: BertForMaskedLM, ema: float):
        super().__init__(model, ema)
        self._subs: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def sub_masks(self, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(heads, ffn, hidden) masks of the sub-network at ``sparsity``, from the current scores (cached until
        the next step's scores)."""
        if sparsity not in self._subs:
            sub = PruneMasks(self.model.config)
            sub.load_state_dict({k: v.cpu() for k, v in self.masks.state_dict().items()})
            prune_to(sub, widths_at_sparsity(self.model.config, sparsity))
            device = self.masks.heads.device
            self._subs[sparsity] = (sub.heads.to(device), sub.ffn.to(device), sub.hidden.to(device))
        return self._subs[sparsity]

    @contextmanager
    def view(self, sparsity: float):
        """Gate the model as the sub-network at ``sparsity`` inside the block (a forward builds its graph with
        copies of the masks, so swapping them back afterwards is safe)."""
        full = self.masks.masks()
        self.masks.heads, self.masks.ffn, self.masks.hidden = self.sub_masks(sparsity)
        try:
            yield
        finally:
            self.masks.heads, self.masks.ffn, self.masks.hidden = full

    def before_step(self, step: int) -> dict[str, float]:
        self.score()
        self._subs.clear()
        return {}


# --------------------------------------------------------------------------------------------------
# physical removal


def pruned_config(config: BertConfig, kept: Widths) -> BertConfig:
    cfg = copy.deepcopy(config)
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = kept.hidden, kept.heads, kept.ffn
    return cfg


def prune_bert(model: BertForMaskedLM, masks: PruneMasks) -> BertForMaskedLM:
    """A new, smaller ``BertForMaskedLM`` holding the kept rows/columns of ``model`` (fp32, eval mode)."""
    kept = masks.kept()
    d = masks.head_dim
    if kept.heads * d != kept.hidden:
        raise ValueError(
            f"cannot build a BERT with hidden size {kept.hidden} and {kept.heads} heads of {d}: pruning has not reached "
            f"its target yet (hidden must equal heads x {d}); export after members.NAME.prune.end"
        )
    for name, mask in (("heads", masks.heads), ("ffn", masks.ffn)):
        counts = mask.sum(1)
        assert bool((counts == counts[0]).all()), (name, counts.tolist())  # uniform per layer by construction
    hid = masks.hidden.nonzero().squeeze(1).cpu()
    src = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    layers = model.config.num_hidden_layers

    def take(name: str, *dims: torch.Tensor | None) -> None:
        t = src[name]
        for axis, idx in enumerate(dims):
            if idx is not None:
                t = t.index_select(axis, idx)
        out[name] = t.contiguous()

    e = "bert.embeddings."
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        take(f"{e}{table}.weight", None, hid)
    for p in ("weight", "bias"):
        take(f"{e}LayerNorm.{p}", hid)
    for i in range(layers):
        head_rows = masks.heads[i].cpu().repeat_interleave(d).nonzero().squeeze(1)
        neurons = masks.ffn[i].nonzero().squeeze(1).cpu()
        p = f"bert.encoder.layer.{i}."
        for qkv in ("query", "key", "value"):
            take(f"{p}attention.self.{qkv}.weight", head_rows, hid)
            take(f"{p}attention.self.{qkv}.bias", head_rows)
        take(f"{p}attention.output.dense.weight", hid, head_rows)
        take(f"{p}attention.output.dense.bias", hid)
        take(f"{p}intermediate.dense.weight", neurons, hid)
        take(f"{p}intermediate.dense.bias", neurons)
        take(f"{p}output.dense.weight", hid, neurons)
        take(f"{p}output.dense.bias", hid)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            for q in ("weight", "bias"):
                take(f"{p}{ln}.{q}", hid)
    h = "cls.predictions."
    take(f"{h}transform.dense.weight", hid, hid)
    take(f"{h}transform.dense.bias", hid)
    for q in ("weight", "bias"):
        take(f"{h}transform.LayerNorm.{q}", hid)
    take(f"{h}bias")
    if f"{h}decoder.weight" in src:
        take(f"{h}decoder.weight", None, hid)
    if f"{h}decoder.bias" in src:
        take(f"{h}decoder.bias")
    cfg = pruned_config(model.config, kept)
    cfg.tie_word_embeddings = model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    small = BertForMaskedLM(cfg)
    missing, unexpected = small.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("decoder.weight") and not k.endswith("decoder.bias")]  # tied
    assert not missing and not unexpected, (missing, unexpected)
    return small.eval()


# --------------------------------------------------------------------------------------------------
# one-shot pruning (MiniDisc candidates)


def one_shot_scores(model: BertForMaskedLM, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> PruneMasks:
    """Masks (all kept) whose scores are the summed sensitivities of the MLM loss over ``batches``, summed over
    ranks too (each rank scores its own batches), so every rank ranks the structures alike."""
    from ctcd_ds import dist

    masks = PruneMasks(model.config)
    model.to(device).eval()  # no dropout: the sensitivities of the model as it predicts
    model.requires_grad_(True)
    totals = None
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), labels=batch["labels"].to(device))
        out.loss.backward()
        step = structure_scores(model, lambda p: p.grad)
        totals = step if totals is None else tuple(a + b for a, b in zip(totals, step))
    model.zero_grad(set_to_none=True)
    assert totals is not None, "one_shot_scores needs at least one batch"
    update_scores(masks, tuple(dist.all_reduce_sum(t).float() for t in totals), ema=0.0)
    return masks
