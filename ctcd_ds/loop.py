"""The loop every training command shares: members as DeepSpeed engines, one shared loader, the
distillation graph, and per step: forward every member -> each member's task loss plus its incoming
edges' KD losses -> each trainable engine's own backward and step; logging, evaluation, checkpoints.

Subclasses say what a batch is and what the task loss is (``_forward``, ``task_loss``, ``evaluate``).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ctcd_ds import checkpoint, dist, ds_config, losses
from ctcd_ds.config import dump_yaml, to_dict
from ctcd_ds.engines import Member, build_engine
from ctcd_ds.export import export_member
from ctcd_ds.graph import Graph, view_name
from ctcd_ds.models import count_parameters
from ctcd_ds.monitor import Monitor


class Prediction(NamedTuple):
    """What one member predicts for a batch: what the task and KD losses read."""

    logits: torch.Tensor
    """[rows, classes]: at the masked positions (MLM) or per example (classification)."""
    targets: torch.Tensor
    """[rows]: the true tokens or labels."""
    hidden: torch.Tensor | None = None
    """[rows, hidden] last hidden states at the same rows (MLM), for hidden-state MSE edges."""
    hidden_keep: torch.Tensor | None = None
    """bool [hidden]: the hidden dims the member keeps while it is being pruned (None: all)."""


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingLoop:
    """Shared machinery; a subclass builds ``tokenizer`` and ``loader`` then calls ``_build_members``
    and ``_start``. ``cfg`` needs output_dir, seed, members, edges, train, deepspeed, checkpoint."""

    task_loss_name = "task_loss"
    progress_label = "training"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.graph = Graph.from_config(cfg)
        self.precision = resolve_precision(cfg.train.precision)
        self.device = dist.device()
        self.step = 0
        if dist.is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))

    def _build_members(self, make_module: Callable[[str, Any], torch.nn.Module]) -> None:
        """``make_module(name, member_cfg)`` -> the module each engine wraps (it must hold ``.hf``)."""
        cfg = self.cfg
        self.members: dict[str, Member] = {}
        for i, (name, m) in enumerate(cfg.members.items()):
            seed_everything(cfg.seed + 1000 * i)  # same init on every rank, different per member
            module = make_module(name, m)
            ds = ds_config.engine_config(
                cfg.deepspeed.template,
                micro_batch_size=cfg.train.micro_batch_size,
                grad_accum_steps=cfg.train.grad_accum_steps,
                grad_clip=cfg.train.grad_clip,
                trainable=m.trainable,
                precision=self.precision,
            )
            self.members[name] = build_engine(name, module, m, ds, cfg.train.steps)
            dist.print0(f"{name}: {m.model}, {count_parameters(module) / 1e6:.2f}M parameters, {'trainable' if m.trainable else 'frozen'}")
        self.trainable = {n: mem for n, mem in self.members.items() if mem.trainable}
        self.zero_stage = ds_config.zero_stage(ds_config.load_template(cfg.deepspeed.template))

    def _start(self, tokens_per_step: int) -> None:
        """Resume if asked (engines, loader, RNG), else seed dropout; open the monitor."""
        self.tokens_per_step = tokens_per_step
        self.checkpointer = checkpoint.Checkpointer(self.out, self.cfg.checkpoint.every, self.cfg.checkpoint.keep_last)
        self._resume()
        if self.step == 0:  # a resumed run got its RNG states back from the checkpoint
            seed_everything(self.cfg.seed + 7919 * (dist.rank() + 1))  # dropout differs per rank
        self.monitor = Monitor(self.out, self.step)

    def resume_path(self) -> Path | None:
        """The checkpoint this run resumes from, if any."""
        c = self.cfg.checkpoint
        return None if c.resume == "never" else (checkpoint.latest(self.out) if c.resume == "auto" else Path(c.resume))

    def _resume(self) -> None:
        path = self.resume_path()
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
    def _forward(self, m: Member, batch: dict[str, torch.Tensor], view: float = 0.0) -> Prediction:
        """One member's prediction on a batch (``view``: as its sandwich sub-network at that sparsity)."""
        raise NotImplementedError

    def task_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def _micro_step(self, batch: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
        preds = {}
        for name, m in self.members.items():
            preds[name] = self._forward(m, batch)
            for sparsity in self.graph.views.get(name, ()):
                preds[view_name(name, sparsity)] = self._forward(m, batch, sparsity)
        kd = losses.edge_losses({n: p.logits for n, p in preds.items()}, self.graph.edges, self.cfg.train.kd_loss)
        for name, m in self.trainable.items():
            own = self.task_loss(preds[name].logits, preds[name].targets)
            total = own
            stats[f"{name}/{self.task_loss_name}"] += own.detach()
            for edge in self.graph.incoming(name):  # edge.target is this member or one of its views
                total = total + edge.weight(self.step) * kd[edge]
                stats[f"{edge.target}/kd_loss_from_{edge.source}"] += kd[edge].detach()
                if edge.hidden_weight:
                    source, target = preds[edge.source], preds[edge.target]
                    mse = losses.hidden_mse(source.hidden, target.hidden, source.hidden_keep, target.hidden_keep)
                    total = total + edge.hidden * mse
                    stats[f"{edge.target}/hidden_mse_from_{edge.source}"] += mse.detach()
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
        member_scalars: dict[str, float] = {}
        for _ in range(self.cfg.train.grad_accum_steps):
            self._micro_step(next(batches), stats)
            for name, m in self.trainable.items():
                if m.engine.is_gradient_accumulation_boundary():
                    if self.zero_stage == 0:
                        norms[name] = self._stage0_grad_norm(m)
                    hook = getattr(m.engine.module, "before_optimizer_step", None)  # e.g. HomoDistil pruning
                    if hook is not None:
                        member_scalars |= {f"{name}/{k}": float(v) for k, v in hook(self.step).items()}
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
        return out | member_scalars

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
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.progress_label, disable=not dist.is_rank0(), dynamic_ncols=True, mininterval=1.0)
        last_ckpt = checkpoint.latest(self.out)
        window_start, window_steps = time.perf_counter(), 0
        train_time, timed_steps = 0.0, -1  # the first step of a run (warm-up, allocations) is not timed
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            scalars = self.train_step(batches)
            self.step += 1
            window_steps += 1
            timed_steps += 1
            if timed_steps:
                train_time += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in scalars.items() if k.endswith("/total_loss")})
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                scalars |= {
                    "perf/step_time_s": time.perf_counter() - t0,
                    "perf/tokens_per_s": window_steps * self.tokens_per_step / elapsed,
                    "perf/peak_memory_gb": dist.peak_memory_bytes() / 2**30,
                }
                self.monitor.write(self.step, scalars)
                window_start, window_steps = time.perf_counter(), 0
            last = self.step == cfg.steps
            if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                self.monitor.write(self.step, self.evaluate())
            if self.checkpointer.due(self.step, last):
                last_ckpt = self._save()
        bar.close()
        return {
            "tensorboard": str(self.monitor.tb_dir),
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            # training steps only (evaluation and checkpoints left out)
            "tokens_per_s": timed_steps * self.tokens_per_step / train_time if timed_steps > 0 else None,
            "peak_memory_gb": dist.peak_memory_bytes() / 2**30,
        }

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
