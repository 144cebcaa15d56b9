"""The co-training loop: one shared batch -> every member's forward -> each member's own loss ->
each trainable engine's own backward and step.

A member's loss is its MLM cross-entropy at the masked positions plus, for every incoming edge,
``weight * tau^2 * KL(p_source || p_target)`` with the source detached, so the members' graphs stay
disjoint and each engine backpropagates only its own loss.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import torch.nn.functional as F
from tqdm import tqdm

from ctcd_ds import checkpoint, dist, ds_config, losses
from ctcd_ds.config import RunConfig, dump_yaml, to_dict
from ctcd_ds.data import MaskingCollator, SharedLoader, corpus_files, eval_batches, load_blocks
from ctcd_ds.engines import Member, build_engine
from ctcd_ds.export import export_member
from ctcd_ds.graph import Graph
from ctcd_ds.models import SparseMLM, build_model, count_parameters, remap_init, weight_dirs
from ctcd_ds.monitor import Monitor
from ctcd_ds.tokenizer import load_tokenizer, pretrained_tokenizer_source, trained_tokenizer_dir


def resolve_precision(requested: str) -> str:
    """``auto`` -> bf16 on accelerators that support it, else fp32; fp16/bf16 need an accelerator."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    if requested == "auto":
        return "bf16" if not on_cpu and acc.is_bf16_supported() else "fp32"
    if requested in ("fp16", "bf16") and on_cpu:
        raise ValueError(f"train.precision={requested}: needs a GPU; DeepSpeed runs on the CPU here (use fp32 or auto)")
    return requested


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "checkpoint.resume":
            out.append(f"{prefix}{key}={b!r} (was {a!r})")
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds tokenizer, data, members and engines from a validated config; ``train()`` runs the loop."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.graph = Graph.from_config(cfg)
        self.precision = resolve_precision(cfg.train.precision)
        if dist.is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))

        self.tokenizer = self._tokenizer()
        train_blocks, eval_blocks = load_blocks(cfg.data, self.tokenizer, cfg.seed)
        collator = MaskingCollator(self.tokenizer, cfg.data.mlm_probability)
        self.loader = SharedLoader(train_blocks, collator, cfg.train.micro_batch_size, cfg.seed, num_workers=cfg.data.num_workers)
        self.eval_batches = eval_batches(eval_blocks, collator, cfg.train.micro_batch_size, cfg.train.eval_batches, cfg.seed)
        self.device = dist.device()

        self.members: dict[str, Member] = {}
        for i, (name, m) in enumerate(cfg.members.items()):
            _seed_everything(cfg.seed + 1000 * i)  # same init on every rank, different per member
            model = build_model(m.model, len(self.tokenizer), self.tokenizer.pad_token_id)
            if m.init_from:
                mapping = remap_init(model, m.init_from)
                dist.print0(f"{name}: layers initialised from {m.init_from} layers {[i + 1 for i in mapping]}")
            ds = ds_config.engine_config(
                cfg.deepspeed.template,
                micro_batch_size=cfg.train.micro_batch_size,
                grad_accum_steps=cfg.train.grad_accum_steps,
                grad_clip=cfg.train.grad_clip,
                trainable=m.trainable,
                precision=self.precision,
            )
            self.members[name] = build_engine(name, SparseMLM(model), m, ds, cfg.train.steps)
            dist.print0(f"{name}: {m.model}, {count_parameters(model) / 1e6:.2f}M parameters, {'trainable' if m.trainable else 'frozen'}")
        self.trainable = {n: mem for n, mem in self.members.items() if mem.trainable}
        self.zero_stage = ds_config.zero_stage(ds_config.load_template(cfg.deepspeed.template))
        self.checkpointer = checkpoint.Checkpointer(self.out, cfg.checkpoint.every, cfg.checkpoint.keep_last)
        self.step = 0
        self._resume()
        if self.step == 0:  # a resumed run got its RNG states back from the checkpoint
            _seed_everything(cfg.seed + 7919 * (dist.rank() + 1))  # dropout differs per rank
        self.monitor = Monitor(self.out, self.step)
        self.tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * dist.world_size()

    # ---------------------------------------------------------------------------------------------
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

    def _resume(self) -> None:
        c = self.cfg.checkpoint
        path = None if c.resume == "never" else (checkpoint.latest(self.out) if c.resume == "auto" else Path(c.resume))
        if path is None:
            return
        changed = _changed_settings(yaml.safe_load((path / "config.yaml").read_text()), to_dict(self.cfg))
        if changed:
            dist.print0(f"warning: resuming {path} with settings that differ from its run: {', '.join(changed)}")
        state = self.checkpointer.load(path, {n: m.engine for n, m in self.trainable.items()})
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        dist.print0(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------------------------------------
    def _forward(self, m: Member, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of one member at the batch's masked positions, and the true tokens there."""
        labels = batch["labels"].to(self.device)
        predict = labels != -100
        with torch.set_grad_enabled(m.trainable and torch.is_grad_enabled()):
            logits = m.engine(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device), predict)
        return logits, labels[predict]

    def _micro_step(self, batch: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
        logits = {}
        for name, m in self.members.items():
            logits[name], targets = self._forward(m, batch)
        kd = losses.edge_losses(logits, self.graph.edges, self.cfg.train.kd_loss)
        for name, m in self.trainable.items():
            mlm = F.cross_entropy(logits[name].float(), targets)
            total = mlm
            stats[f"{name}/mlm_loss"] += mlm.detach()
            for edge in self.graph.incoming(name):
                total = total + edge.weight(self.step) * kd[edge]
                stats[f"{name}/kd_loss_from_{edge.source}"] += kd[edge].detach()
            stats[f"{name}/total_loss"] += total.detach()
            m.engine.backward(total)

    @staticmethod
    def _stage0_grad_norm(m: Member) -> float:
        """ZeRO-0 records no global norm; its gradients are whole (and all-reduced) at the boundary."""
        grads = [p.grad for p in m.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step of every trainable member: ``grad_accum_steps`` shared micro-batches."""
        stats: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        norms: dict[str, float | None] = {}
        for _ in range(self.cfg.train.grad_accum_steps):
            self._micro_step(next(batches), stats)
            for name, m in self.trainable.items():
                if self.zero_stage == 0 and m.engine.is_gradient_accumulation_boundary():
                    norms[name] = self._stage0_grad_norm(m)
                m.engine.step()
        for name, m in self.trainable.items():
            if name not in norms:
                norm = m.engine.get_global_grad_norm()
                norms[name] = None if norm is None else float(norm)
        keys = sorted(stats)
        means = dist.all_reduce_sum(torch.stack([stats[k] for k in keys])) / (self.cfg.train.grad_accum_steps * dist.world_size())
        out = {k: float(v) for k, v in zip(keys, means)}
        for name, m in self.trainable.items():
            out[f"{name}/lr"] = float(m.engine.get_lr()[0])
            if norms[name] is not None:
                out[f"{name}/grad_norm"] = norms[name]
            if self.precision == "fp16":
                out[f"{name}/loss_scale"] = float(m.engine.optimizer.cur_scale)
        for edge in self.graph.edges:
            out[f"edge/{edge.name}/weight"] = edge.weight(self.step)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out MLM loss, perplexity and accuracy of every member (summed over ranks)."""
        out = {}
        for name, m in self.members.items():
            m.engine.eval()
            sums = torch.zeros(3, dtype=torch.float64)
            for batch in self.eval_batches:
                logits, targets = self._forward(m, batch)
                sums += torch.tensor([F.cross_entropy(logits.float(), targets, reduction="sum").item(), (logits.argmax(-1) == targets).sum().item(), targets.numel()], dtype=torch.float64)
            loss_sum, correct, count = dist.all_reduce_sum(sums).tolist()
            if m.trainable:
                m.engine.train()
            loss = loss_sum / max(count, 1)
            out |= {f"eval/{name}/mlm_loss": loss, f"eval/{name}/perplexity": float(np.exp(min(loss, 50))), f"eval/{name}/accuracy": correct / max(count, 1)}
        return out

    # ---------------------------------------------------------------------------------------------
    def _save(self) -> Path:
        return self.checkpointer.save(
            self.step,
            {n: m.engine for n, m in self.trainable.items()},
            {"loader": self.loader.state_dict(), "members": list(self.members)},
            dump_yaml(self.cfg),
        )

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.train
        batches = iter(self.loader)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="co-training", disable=not dist.is_rank0(), dynamic_ncols=True, mininterval=1.0)
        last_ckpt = checkpoint.latest(self.out)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            scalars = self.train_step(batches)
            self.step += 1
            window_steps += 1
            bar.update(1)
            bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in scalars.items() if k.endswith("/total_loss")})
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                scalars |= {"perf/step_time_s": time.perf_counter() - t0, "perf/tokens_per_s": window_steps * self.tokens_per_step / elapsed}
                self.monitor.write(self.step, scalars)
                window_start, window_steps = time.perf_counter(), 0
            last = self.step == cfg.steps
            if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                self.monitor.write(self.step, self.evaluate())
            if self.checkpointer.due(self.step, last):
                last_ckpt = self._save()
        bar.close()
        return {"tensorboard": str(self.monitor.tb_dir), "checkpoint": str(last_ckpt) if last_ckpt else None}

    def export(self) -> dict[str, str]:
        """Every member as a Hugging Face directory under ``<run>/export/<name>``."""
        out = {}
        for name, m in self.members.items():
            path = self.out / "export" / name
            export_member(m.engine, self.tokenizer, path)
            out[name] = str(path)
        return out

    def close(self) -> None:
        self.monitor.close()
