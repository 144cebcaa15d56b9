"""MiniDisc teacher-assistant selection (Zhang et al., "MiniDisc: Minimal Distillation Schedule").

Candidates are the teacher pruned, in one shot, to a grid of width sparsities ``s``: each keeps
``(1 - s)`` of the attention heads (so of the hidden width, ``heads x head size``) and of the FFN
neurons, the structures ranked by the sensitivities ``|theta * dL/dtheta|`` of the MLM loss on a few
training batches (:func:`ctcd_ds.pruning.importance.one_shot_scores`). Each candidate is scored without any
training:

    score(s) = held-out MLM accuracy(s) + lambda * sparsity(s)

with ``sparsity`` the share of the teacher's parameters the candidate removes. A teacher assistant sits
between teacher and student by definition, so only candidates larger than the student (the largest member
the TA teaches) are eligible; the others are listed, unscored. The best eligible candidate becomes the
teacher assistant; the run then distils teacher -> TA -> student through ordinary edges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import BertForMaskedLM

from ctcd_ds import dist
from ctcd_ds.config import MiniDiscConfig
from ctcd_ds.errors import UserError
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
    mlm_accuracy: float | None
    """None when the candidate is not eligible (not larger than the student): it is not scored."""
    score: float | None

    @property
    def eligible(self) -> bool:
        return self.score is not None


@dataclass(frozen=True, slots=True)
class Reference:
    """The sizes a teacher assistant must sit between: the unpruned teacher and the student."""

    teacher_params: int
    teacher_mlm_accuracy: float
    student: str
    """The member the TA teaches with the most parameters ("" when it teaches none)."""
    student_params: int


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
    student: tuple[str, int] = ("", 0),
    flag: str = "minidisc",
) -> tuple[BertForMaskedLM, list[Candidate], int, Reference]:
    """(the best candidate as a smaller model, every candidate, the index of the best, the teacher and student
    sizes). Only candidates with more parameters than ``student`` (name, parameters) are scored. The same on every
    rank: the structures are ranked by sensitivities summed over ranks and the accuracies are counted over ranks."""
    masks = one_shot_scores(model, score_batches, device)
    full_params = count_parameters(model)
    reference = Reference(full_params, mlm_accuracy(model, eval_batches, device), *student)
    candidates, models = [], []
    for s in cfg.sparsities:
        w = widths_at_sparsity(model.config, s)
        m = PruneMasks(model.config)
        m.load_state_dict(masks.state_dict())  # every candidate ranks by the same scores
        prune_to(m, w)
        small = prune_bert(model, m)
        params = count_parameters(small)
        sparsity = 1 - params / full_params
        acc = mlm_accuracy(small, eval_batches, device) if params > reference.student_params else None
        score = None if acc is None else acc + cfg.lam * sparsity
        candidates.append(Candidate(s, w.hidden, w.heads, w.ffn, params, sparsity, acc, score))
        models.append(small)
    eligible = [i for i, c in enumerate(candidates) if c.eligible]
    if not eligible:
        sizes = ", ".join(f"{c.sparsity:g}: {c.params / 1e6:.2f}M" for c in candidates)
        raise UserError(
            f"{flag}.sparsities={cfg.sparsities}: every candidate ({sizes}) is no larger than the student "
            f"{reference.student} ({reference.student_params / 1e6:.2f}M); a teacher assistant sits between the "
            "teacher and the student: choose smaller sparsities"
        )
    best = max(eligible, key=lambda i: candidates[i].score)
    best = dist.broadcast_object(best)  # the scores agree across ranks; rank 0 settles float ties
    return models[best], candidates, best, reference


def choice_of(candidate: Candidate) -> dict[str, int]:
    """The shape of ``candidate`` as a plain dict ``{"hidden", "heads", "ffn"}`` (to store, e.g. in a checkpoint's
    trainer state, and give back to :func:`rebuild_choice`)."""
    return {"hidden": candidate.hidden, "heads": candidate.heads, "ffn": candidate.ffn}


def rebuild_choice(model: BertForMaskedLM, choice: dict) -> BertForMaskedLM:
    """A fresh model of the teacher-assistant shape ``choice`` (from :func:`choice_of`) pruned from ``model``'s
    config (resume, offline export); its weights come from the member's checkpoint."""
    return type(model)(pruned_config(model.config, Widths(choice["hidden"], choice["heads"], choice["ffn"])))


def table(candidates: list[Candidate], best: int, lam: float, reference: Reference) -> str:
    lines = [
        f"MiniDisc candidates (score = held-out MLM accuracy + {lam} x parameter sparsity; only candidates larger "
        "than the student are eligible):",
        f"  {'sparsity':>8} {'shape':>16} {'params':>9} {'param sp.':>9} {'MLM acc':>8} {'score':>7}",
        f"  {'teacher':>8} {'(unpruned)':>16} {reference.teacher_params / 1e6:>8.2f}M {0:>9.3f} "
        f"{reference.teacher_mlm_accuracy:>8.4f}",
    ]
    for i, c in enumerate(candidates):
        shape = f"H{c.hidden} A{c.heads} F{c.ffn}"
        if c.eligible:
            scored = f"{c.mlm_accuracy:>8.4f} {c.score:>7.4f}" + ("  <- teacher assistant" if i == best else "")
        else:
            scored = f"{'-':>8} {'-':>7}  not eligible: no larger than the student"
        lines.append(f"  {c.sparsity:>8.2f} {shape:>16} {c.params / 1e6:>8.2f}M {c.param_sparsity:>9.3f} {scored}")
    if reference.student:
        student_sp = 1 - reference.student_params / reference.teacher_params
        lines.append(
            f"  {'student':>8} {reference.student:>16} {reference.student_params / 1e6:>8.2f}M {student_sp:>9.3f}"
        )
    return "\n".join(lines)


def write_table(
    out_dir: Path, member: str, candidates: list[Candidate], best: int, lam: float, reference: Reference
) -> Path:
    path = Path(out_dir) / TABLE_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[member] = {
        "lambda": lam,
        "chosen": best,
        "candidates": [asdict(c) for c in candidates],
        **asdict(reference),
    }
    path.write_text(json.dumps(data, indent=2))
    return path
