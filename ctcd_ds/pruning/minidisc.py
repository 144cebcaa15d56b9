"""MiniDisc teacher-assistant selection (Zhang et al., "MiniDisc: Minimal Distillation Schedule").

Candidates are the teacher pruned, in one shot, to a grid of width sparsities ``s``: each keeps
``(1 - s)`` of the attention heads (so of the hidden width, ``heads x head size``) and of the FFN
neurons, the structures ranked by the sensitivities ``|theta * dL/dtheta|`` of the MLM loss on a few
training batches (:func:`ctcd_ds.pruning.importance.one_shot_scores`). Each candidate is scored without any
training:

    score(s) = held-out MLM accuracy(s) + lambda * sparsity(s)

with ``sparsity`` the share of the teacher's parameters the candidate removes. The best candidate becomes
the teacher assistant; the run then distils teacher -> TA -> student through ordinary edges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import BertForMaskedLM

from ctcd_ds import dist
from ctcd_ds.config import MiniDiscConfig
from ctcd_ds.models import count_parameters
from ctcd_ds.pruning.importance import one_shot_scores
from ctcd_ds.pruning.masks import PruneMasks, prune_to
from ctcd_ds.pruning.surgery import prune_bert
from ctcd_ds.pruning.widths import Widths, pruned_config, widths_at_sparsity

TABLE_FILE = "minidisc_candidates.json"


@dataclass(frozen=True, slots=True)
class Candidate:
    sparsity: float
    """The width sparsity asked for."""
    hidden: int
    heads: int
    ffn: int
    params: int
    param_sparsity: float
    """Share of the unpruned model's parameters removed."""
    mlm_accuracy: float
    score: float


@torch.no_grad()
def mlm_accuracy(model: BertForMaskedLM, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Held-out masked-token accuracy, summed over every rank's batches."""
    model.to(device).eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        labels = batch["labels"].to(device)
        predict = labels != -100
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[predict]
        counts += torch.tensor(
            [(logits.argmax(-1) == labels[predict]).sum().item(), predict.sum().item()], dtype=torch.float64
        )
    correct, total = dist.all_reduce_sum(counts).tolist()
    return correct / max(total, 1.0)


def select(
    model: BertForMaskedLM,
    cfg: MiniDiscConfig,
    score_batches: list[dict[str, torch.Tensor]],
    eval_batches: list[dict[str, torch.Tensor]],
    device: torch.device,
) -> tuple[BertForMaskedLM, list[Candidate], int]:
    """(the best candidate as a smaller model, every candidate, the index of the best). The same on every rank:
    the structures are ranked by sensitivities summed over ranks and the accuracies are counted over ranks."""
    masks = one_shot_scores(model, score_batches, device)
    full_params = count_parameters(model)
    candidates, models = [], []
    for s in cfg.sparsities:
        w = widths_at_sparsity(model.config, s)
        m = PruneMasks(model.config)
        m.load_state_dict(masks.state_dict())  # every candidate ranks by the same scores
        prune_to(m, w)
        small = prune_bert(model, m)
        params = count_parameters(small)
        sparsity = 1 - params / full_params
        acc = mlm_accuracy(small, eval_batches, device)
        candidates.append(Candidate(s, w.hidden, w.heads, w.ffn, params, sparsity, acc, acc + cfg.lam * sparsity))
        models.append(small)
    best = max(range(len(candidates)), key=lambda i: candidates[i].score)
    best = dist.broadcast_object(best)  # the scores agree across ranks; rank 0 settles float ties
    return models[best], candidates, best


def choice_of(candidate: Candidate) -> dict[str, int]:
    """The shape of ``candidate`` as a plain dict ``{"hidden", "heads", "ffn"}`` (to store, e.g. in a checkpoint's
    trainer state, and give back to :func:`rebuild_choice`)."""
    return {"hidden": candidate.hidden, "heads": candidate.heads, "ffn": candidate.ffn}


def rebuild_choice(model: BertForMaskedLM, choice: dict) -> BertForMaskedLM:
    """A fresh model of the teacher-assistant shape ``choice`` (from :func:`choice_of`) pruned from ``model``'s
    config (resume, offline export); its weights come from the member's checkpoint."""
    return type(model)(pruned_config(model.config, Widths(choice["hidden"], choice["heads"], choice["ffn"])))


def table(candidates: list[Candidate], best: int, lam: float) -> str:
    lines = [
        f"MiniDisc candidates (score = held-out MLM accuracy + {lam} x parameter sparsity):",
        f"  {'sparsity':>8} {'shape':>16} {'params':>9} {'param sp.':>9} {'MLM acc':>8} {'score':>7}",
    ]
    for i, c in enumerate(candidates):
        shape = f"H{c.hidden} A{c.heads} F{c.ffn}"
        mark = "  <- teacher assistant" if i == best else ""
        lines.append(
            f"  {c.sparsity:>8.2f} {shape:>16} {c.params / 1e6:>8.2f}M {c.param_sparsity:>9.3f} "
            f"{c.mlm_accuracy:>8.4f} {c.score:>7.4f}{mark}"
        )
    return "\n".join(lines)


def write_table(out_dir: Path, member: str, candidates: list[Candidate], best: int, lam: float) -> Path:
    path = Path(out_dir) / TABLE_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[member] = {"lambda": lam, "chosen": best, "candidates": [asdict(c) for c in candidates]}
    path.write_text(json.dumps(data, indent=2))
    return path
