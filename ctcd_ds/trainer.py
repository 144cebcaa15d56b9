"""Masked-LM co-training: the shared loop (``ctcd_ds.loop``) with MLM as every member's task.

A member's loss is its MLM cross-entropy at the masked positions plus, for every incoming edge,
``weight * tau^2 * KL(p_source || p_target)`` with the source detached, so the members' graphs stay
disjoint and each engine backpropagates only its own loss.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
import torch.nn.functional as F

from ctcd_ds import dist, minidisc
from ctcd_ds.config import MemberConfig, RunConfig
from ctcd_ds.data import MaskingCollator, SharedLoader, corpus_files, eval_batches, load_blocks
from ctcd_ds.engines import Member
from ctcd_ds.loop import Prediction, TrainingLoop
from ctcd_ds.models import SparseMLM, build_model, remap_init, weight_dirs
from ctcd_ds.pruning import SANDWICH_EMA, Pruner, Sandwich, target_widths, widths_of
from ctcd_ds.tokenizer import load_tokenizer, pretrained_tokenizer_source, trained_tokenizer_dir


class Trainer(TrainingLoop):
    """Builds tokenizer, data, members and engines from a validated RunConfig; ``train()`` runs the loop."""

    task_loss_name = "mlm_loss"
    progress_label = "co-training"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.tokenizer = self._tokenizer()
        train_blocks, eval_blocks = load_blocks(cfg.data, self.tokenizer, cfg.seed)
        collator = MaskingCollator(self.tokenizer, cfg.data.mlm_probability)
        self.loader = SharedLoader(train_blocks, collator, cfg.train.micro_batch_size, cfg.seed, num_workers=cfg.data.num_workers)
        self.eval_batches = eval_batches(eval_blocks, collator, cfg.train.micro_batch_size, cfg.train.eval_batches, cfg.seed)
        self._build_members(self._module)
        self._start(cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * dist.world_size())

    def _module(self, name: str, m: MemberConfig) -> SparseMLM:
        model = build_model(m.model, len(self.tokenizer), self.tokenizer.pad_token_id)
        if m.init_from:
            mapping = remap_init(model, m.init_from)
            dist.print0(f"{name}: layers initialised from {m.init_from} layers {[i + 1 for i in mapping]}")
        if m.minidisc.sparsities:
            model = self._minidisc(name, m, model)
        structure = None
        if m.prune.enabled:
            target = target_widths(model.config, m.prune.hidden_size or model.config.hidden_size, m.prune.intermediate_size or model.config.intermediate_size)
            steps = self.cfg.train.steps
            structure = Pruner(model, target, round(m.prune.start * steps), round(m.prune.end * steps), m.prune.every, m.prune.ema)
            dist.print0(f"{name}: pruned while training from {widths_of(model.config)} to {target} (steps {structure.start_step}-{structure.end_step})")
        elif m.minidisc.sandwich:
            structure = Sandwich(model, SANDWICH_EMA)
            dist.print0(f"{name}: sandwich training with sub-networks at width sparsities {m.minidisc.sandwich}")
        return SparseMLM(model, structure)

    def _minidisc(self, name: str, m: MemberConfig, model):
        """MiniDisc: the best one-shot pruning of ``model`` (see ctcd_ds.minidisc); prints and saves the table.
        A resumed run rebuilds the shape it chose (the weights come from the checkpoint)."""
        resume = self.resume_path()
        if resume is not None:
            chosen = minidisc.recorded_choice(model, resume.parent.parent, name)
            if dist.is_rank0() and resume.parent.parent.resolve() != self.out.resolve():  # this run's exports need it too
                shutil.copy(resume.parent.parent / minidisc.TABLE_FILE, self.out / minidisc.TABLE_FILE)
            dist.print0(f"{name}: the teacher assistant chosen earlier ({widths_of(chosen.config)}), from {minidisc.TABLE_FILE}")
            return chosen
        batches = iter(SharedLoader(self.loader.dataset, self.loader.collator, self.loader.batch_size, self.cfg.seed + 17))
        score_batches = [next(batches) for _ in range(m.minidisc.batches)]
        chosen, candidates, best = minidisc.select(model, m.minidisc, score_batches, self.eval_batches, self.device)
        dist.print0(minidisc.table(candidates, best, m.minidisc.lam))
        if dist.is_rank0():
            minidisc.write_table(self.out, name, candidates, best, m.minidisc.lam)
        return chosen

    def _tokenizer(self):
        cfg = self.cfg
        source = pretrained_tokenizer_source(cfg.tokenizer.path, list(weight_dirs(cfg.members).values()))
        if source is None:
            train_files, _ = corpus_files(cfg.data)
            if not train_files:
                raise ValueError(f"tokenizer.path: empty; give a tokenizer for data.dataset={cfg.data.dataset} (training one needs local files)")
            with dist.rank0_first():
                source = str(trained_tokenizer_dir(train_files, cfg.tokenizer.vocab_size, cfg.tokenizer.max_sentences))
        tok = load_tokenizer(source)
        if dist.is_rank0():
            tok.save_pretrained(str(self.out / "tokenizer"))
        dist.print0(f"tokenizer: {source} ({len(tok)} tokens)")
        return tok

    # ---------------------------------------------------------------------------------------------
    def _forward(self, m: Member, batch: dict[str, torch.Tensor], view: float = 0.0) -> Prediction:
        """Logits and hidden states of one member (or its sandwich sub-network ``view``) at the batch's masked
        positions, and the true tokens there."""
        labels = batch["labels"].to(self.device)
        predict = labels != -100
        with torch.set_grad_enabled(m.trainable and torch.is_grad_enabled()):
            logits, hidden = m.engine(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device), predict, view)
        return Prediction(logits, labels[predict], hidden, m.engine.module.hidden_keep(view))

    def task_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out MLM loss, perplexity and accuracy of every member (summed over ranks)."""
        out = {}
        for name, m in self.members.items():
            m.engine.eval()
            sums = torch.zeros(3, dtype=torch.float64)
            for batch in self.eval_batches:
                logits, targets, *_ = self._forward(m, batch)
                sums += torch.tensor([F.cross_entropy(logits.float(), targets, reduction="sum").item(), (logits.argmax(-1) == targets).sum().item(), targets.numel()], dtype=torch.float64)
            loss_sum, correct, count = dist.all_reduce_sum(sums).tolist()
            if m.trainable:
                m.engine.train()
            loss = loss_sum / max(count, 1)
            out |= {f"eval/{name}/mlm_loss": loss, f"eval/{name}/perplexity": float(np.exp(min(loss, 50))), f"eval/{name}/accuracy": correct / max(count, 1)}
        return out
