"""The Trainer: builds every component of a run in ``__init__``, then ``train()`` loops the co-training step.

    task       tokenizer, data, the one shared loader, forward/loss/evaluate    (ctcd_ds.tasks)
    members    one DeepSpeed engine per member (own optimizer; none when frozen) (ctcd_ds.engines)
    graph      members + distillation edges, weight schedules, sandwich views    (ctcd_ds.graph)
    step       THE co-training step                                               (ctcd_ds.step)
    checkpointer, monitor                                                         (ctcd_ds.checkpoint, .monitor)

Nothing is written to the output directory until every component is built: a bad corpus, batch size or
precision stops the run with the output directory untouched. ``run_pretrain`` and ``run_finetune`` are the
library entry points (the command line calls them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ctcd_ds import dist, ds_config, perf
from ctcd_ds.checkpoint import Checkpointer
from ctcd_ds.clock import TrainingClock
from ctcd_ds.config import FinetuneConfig, PretrainConfig, dump_yaml, to_dict
from ctcd_ds.engines import Member, build_engine, resolve_precision
from ctcd_ds.errors import Preempted, UserError
from ctcd_ds.export import export_member
from ctcd_ds.graph import Graph
from ctcd_ds.integrity import replace_synced
from ctcd_ds.layout import CONFIG_FILE, STATE_FILE, SUMMARY_FILE, latest
from ctcd_ds.models import count_parameters
from ctcd_ds.monitor import Monitor
from ctcd_ds.preemption import StopRequest
from ctcd_ds.resume import map_loader_position, needs_universal, resume_point, saved_world_size
from ctcd_ds.run_lock import RunLock
from ctcd_ds.step import CoTrainingStep, LogWindow
from ctcd_ds.tasks import Classification, MaskedLM, Task
from ctcd_ds.tokenizer import save_tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "checkpoint.resume":
            out.append(f"{prefix}{key}={b!r} (was {a!r})")
    return out


class Trainer:
    """Co-trains the members of a validated config on ``task``; every attribute is set here."""

    def __init__(self, cfg: PretrainConfig | FinetuneConfig, task: Task):
        self.cfg = cfg
        self.task = task
        self.out = Path(cfg.output_dir)
        self.memory_before_engines = dist.memory_now_bytes()
        """This rank's memory once the data is loaded, before any model: what the engines add is measured from it."""
        self.precision = resolve_precision(cfg.train.precision)
        self.graph = Graph.from_config(cfg)
        self.resume_from = self._resume_path()
        resume_state = json.loads((self.resume_from / STATE_FILE).read_text()) if self.resume_from else {}
        self.zero_stage = ds_config.zero_stage(ds_config.load_template(cfg.deepspeed.template))
        # written on another number of ranks: the engines load a DeepSpeed universal checkpoint instead
        self.universal = self.resume_from is not None and needs_universal(self.resume_from, self.zero_stage)
        self.members = self._build_members(resume_state.get("task", {}))
        self.step_fn = CoTrainingStep(
            self.members, self.graph, task, cfg.train, zero_stage=self.zero_stage, precision=self.precision
        )
        self.tokens_per_step = task.tokens_per_micro_batch * cfg.train.grad_accum_steps * dist.world_size()
        self.member_flops = self._member_flops()
        """Model FLOPs per token of each member (sandwich views included), or None: not counted (see below)."""
        self.flops_per_token = sum(self.member_flops.values()) if self.member_flops else None
        self.peak_tflops = perf.peak_tflops(cfg.train.peak_tflops, self.precision)
        """One device's peak TFLOP/s (the setting, else the GPU's), or None: no MFU."""
        self.checkpointer = Checkpointer(self.out, cfg.checkpoint.every, cfg.checkpoint.keep_last)
        self.step = 0
        # everything is built: from here on the run writes into its output directory, alone
        self.lock = RunLock(self.out)
        self._take_lock()
        if dist.is_rank0():
            self.checkpointer.remove_leftovers()  # what a crash mid-save left (only now: the run is ours)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        else:
            seed_everything(cfg.seed + 7919 * (dist.rank() + 1))  # dropout differs per rank
        if dist.is_rank0():
            (self.out / CONFIG_FILE).write_text(dump_yaml(cfg))
            save_tokenizer(task.tokenizer, self.out / "tokenizer")
            task.write_outputs(self.out)
        monitors = ds_config.enabled_monitors(ds_config.load_template(cfg.deepspeed.template))
        self.monitor = Monitor(self.out, self.step, list(self.members), monitors)
        self.stop = StopRequest()

    def _take_lock(self) -> None:
        """Rank 0 takes the output directory's lock; every rank learns whether it could."""
        problems = None
        if dist.is_rank0():
            try:
                self.lock.acquire()
            except UserError as exc:
                problems = exc.problems
        problems = dist.broadcast_object(problems)
        if problems:
            raise UserError(problems)

    def _resume_path(self) -> Path | None:
        """The newest intact checkpoint to resume from (a damaged one is skipped with a warning), or None."""
        return resume_point(self.out, self.cfg.checkpoint.resume)

    def _build_members(self, recorded: dict[str, Any]) -> dict[str, Member]:
        cfg = self.cfg
        members = {}
        for i, (name, m) in enumerate(cfg.members.items()):
            seed_everything(cfg.seed + 1000 * i)  # same init on every rank, different per member
            module = self.task.build_module(name, m, recorded.get(name))
            module.hf.set_attn_implementation(cfg.train.attention)
            ds = ds_config.engine_config(
                cfg.deepspeed.template,
                micro_batch_size=cfg.train.micro_batch_size,
                grad_accum_steps=cfg.train.grad_accum_steps,
                grad_clip=cfg.train.grad_clip,
                trainable=m.trainable,
                precision=self.precision,
                load_universal=self.universal,
            )
            members[name] = build_engine(
                name,
                module,
                m,
                ds,
                cfg.train.steps,
                fused_optimizer=cfg.train.fused_optimizer,
                compile=cfg.train.compile,
            )
            role = "trainable" if m.trainable else "frozen"
            source = getattr(cfg, "copied_from", {}).get(name)
            model = f"a copy of {source}'s model ({m.model})" if source else m.model
            dist.print0(f"{name}: {model}, {count_parameters(module) / 1e6:.2f}M parameters, {role}")
        return members

    def _member_flops(self) -> dict[str, float] | None:
        """Model FLOPs per token of the shared batch for each member, its sandwich views included
        (``ctcd_ds.perf``). None when fine-tuning (a batch is padded to its longest example, fewer tokens than it
        counts) or when a member is not BERT-shaped."""
        if not isinstance(self.task, MaskedLM):
            return None
        data, out = self.cfg.data, {}
        for name, m in self.members.items():
            passes = 1 + len(self.graph.views.get(name, ()))  # each view: one more forward and backward
            config = m.engine.module.hf.config
            try:
                flops = perf.flops_per_token(config, data.seq_len, data.mlm_probability, trainable=m.trainable)
            except ValueError as exc:
                dist.print0(f"warning: members.{name}: {exc}; no perf/model_tflops or perf/mfu")
                return None
            out[name] = passes * flops
        return out

    def _efficiency(self, tokens_per_s: float) -> dict[str, float]:
        """``perf/model_tflops`` (every member, every rank) and, when a peak is known, ``perf/mfu``."""
        if self.flops_per_token is None:
            return {}
        out = {"perf/model_tflops": perf.model_tflops(tokens_per_s, self.flops_per_token)}
        if self.peak_tflops:
            out["perf/mfu"] = perf.mfu(tokens_per_s, self.flops_per_token, self.peak_tflops, dist.world_size())
        return out

    @property
    def trainable(self) -> dict[str, Member]:
        return {n: m for n, m in self.members.items() if m.trainable}

    def _resume(self, path: Path) -> None:
        """Engines (weights, optimizer, lr schedule), loader position and RNG from ``path``."""
        old_cfg = yaml.safe_load((path / CONFIG_FILE).read_text())
        changed = changed_settings(old_cfg, to_dict(self.cfg))
        if changed:
            dist.print0(f"warning: resuming {path} with settings that differ from its run: {', '.join(changed)}")
        engines = {n: m.engine for n, m in self.trainable.items()}
        state = self.checkpointer.load(path, engines, universal=self.universal)
        self.step = int(state["step"])
        loader_state = state["loader"]
        old_world, new_world = saved_world_size(path), dist.world_size()
        old_batch, new_batch = int(old_cfg["train"]["micro_batch_size"]), self.cfg.train.micro_batch_size
        if old_world and (old_world, old_batch) != (new_world, new_batch):  # the same samples, other batches
            loader_state, note = map_loader_position(loader_state, old_batch, old_world, new_batch, new_world)
            if note:
                dist.print0(f"warning: {note}")
        if self.universal:  # no rank of the old run matches one of this run: fresh per-rank RNG, by step
            seed_everything(self.cfg.seed + 7919 * (dist.rank() + 1) + 104_729 * self.step)
            dist.print0(f"resuming on {new_world} ranks a checkpoint written on {old_world} (universal checkpoint)")
        self.task.loader.load_state_dict(loader_state)
        dist.print0(f"resumed from {path} at step {self.step}")

    def _save(self, last_step: bool) -> Path | None:
        state = {
            "loader": self.task.loader.state_dict(),
            "world_size": dist.world_size(),
            "members": list(self.members),
            "task": self.task.state(),
        }
        engines = {n: m.engine for n, m in self.trainable.items()}
        return self.checkpointer.save(self.step, engines, state, dump_yaml(self.cfg), last_step=last_step)

    def evaluate(self) -> dict[str, float]:
        return self.task.evaluate(self.members)

    def _log(self, window: LogWindow, clock: TrainingClock, bar: tqdm) -> None:
        """Read the window's statistics (the one wait for the device between logs) and write them with the
        window's throughput; start the next window."""
        scalars = window.read()
        bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in scalars.items() if k.endswith("/total_loss")})
        scalars["perf/peak_memory_gb"] = dist.peak_memory_bytes() / 2**30
        tokens_per_s = clock.window_tokens_per_s(self.tokens_per_step)
        if tokens_per_s is not None:
            scalars |= {
                "perf/step_time_s": self.tokens_per_step / tokens_per_s,  # the window's mean
                "perf/tokens_per_s": tokens_per_s,
            } | self._efficiency(tokens_per_s)
        self.monitor.write(self.step, scalars)
        clock.new_window()

    def train(self) -> dict[str, Any]:
        """Train to ``train.steps``; return where the outputs went and the run's throughput and memory."""
        loop = self.cfg.train
        batches = iter(self.task.loader)
        bar = tqdm(
            total=loop.steps,
            initial=self.step,
            desc=self.task.progress_label,
            disable=not dist.is_rank0(),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        last_ckpt = latest(self.out)
        final_eval = None
        window = LogWindow(loop.grad_accum_steps)  # statistics stay on the device until a log step reads them
        clock = TrainingClock()
        self.stop.install()
        try:
            while self.step < loop.steps:
                window.add(self.step_fn(batches, self.step))
                self.step += 1
                clock.stepped()
                bar.update(1)
                last = self.step == loop.steps
                if self.step % loop.log_every == 0 or last:
                    self._log(window, clock, bar)
                evaluating = last or (loop.eval_every and self.step % loop.eval_every == 0)
                saving = self.checkpointer.due(self.step, last_step=last and self.cfg.checkpoint.at_end)
                saved = None
                if evaluating or saving:
                    with clock.paused():  # evaluation and checkpoints are not training time
                        if evaluating:
                            final_eval = self.evaluate()
                            self.monitor.write(self.step, final_eval)
                        saved = self._save(last and self.cfg.checkpoint.at_end)
                last_ckpt = saved or last_ckpt
                if not last and self.stop.agreed():  # a signal on some rank: every rank saves this step and stops
                    last_ckpt = saved or self._save(last_step=True)
                    raise Preempted(self.stop.reason or "a signal on another rank", self.step, str(last_ckpt))
        finally:
            self.stop.restore()
            bar.close()
        tokens_per_s = clock.run_tokens_per_s(self.tokens_per_step)
        efficiency = self._efficiency(tokens_per_s) if tokens_per_s else {}
        return {
            "tensorboard": str(self.monitor.tb_dir),
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            # training steps only (evaluation and checkpoints left out)
            "tokens_per_s": tokens_per_s,
            "model_tflops": efficiency.get("perf/model_tflops"),  # None: fine-tuning, or no step timed
            "mfu": efficiency.get("perf/mfu"),  # a fraction; None: no peak known (the CPU, an unlisted GPU)
            "peak_memory_gb": dist.peak_memory_bytes() / 2**30,
            "memory_per_rank": dist.all_gather_object(self._memory()),  # collective
            "world_size": dist.world_size(),
            "nodes": dist.num_nodes(),
            "tokens_per_step": self.tokens_per_step,
            "peak_tflops": self.peak_tflops,
            "members": {
                name: {
                    "parameters": count_parameters(m.engine.module),
                    "trainable": m.trainable,
                    "flops_per_token": self.member_flops[name] if self.member_flops else None,
                }
                for name, m in self.members.items()
            },
            # the held-out metrics at the last step (None when the run resumed there: nothing was trained)
            "final_eval": final_eval if self.step == loop.steps else None,
            "trained": list(self.trainable),
            "frozen": {n: self.cfg.members[n].model for n in self.members if n not in self.trainable},
        }

    def _memory(self) -> dict[str, Any]:
        """This rank's memory: its peak, and what it held before the engines were built (GB; GPU: allocated by
        torch, and the peak reserved by its caching allocator; CPU: the process's resident set)."""
        out = {
            "rank": dist.rank(),
            "kind": "cuda" if dist.device().type == "cuda" else "rss",
            "peak_gb": dist.peak_memory_bytes() / 2**30,
            "before_engines_gb": self.memory_before_engines / 2**30,
        }
        if out["kind"] == "cuda":
            out["reserved_gb"] = torch.cuda.max_memory_reserved(dist.device()) / 2**30
        else:
            out["cpu_threads"] = torch.get_num_threads()
            out["tensors_gb"] = dist.live_tensor_bytes() / 2**30  # after the last step: the state ZeRO partitions
        return out

    def export(self) -> dict[str, str]:
        """Every trained member as a Hugging Face directory under ``<run>/export/<name>`` (collective); a frozen
        member is an unchanged input, not exported again."""
        out = {}
        for name, m in self.trainable.items():
            path = self.out / "export" / name
            export_member(m.engine, self.task.tokenizer, path)
            out[name] = str(path)
        return out

    def close(self) -> None:
        self.monitor.close()
        self.lock.release()


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train a checked config in an initialised process group; return where its outputs went."""
    trainer = Trainer(cfg, MaskedLM(cfg))
    try:
        summary = trainer.train()
        if summary["final_eval"] is None:  # resumed at the last step: evaluate what the checkpoint holds
            summary["final_eval"] = trainer.evaluate()
        summary["exports"] = trainer.export() if cfg.export else {}
    finally:
        trainer.close()
    if dist.is_rank0():
        replace_synced(Path(cfg.output_dir) / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune a checked config in an initialised process group; return its results and outputs."""
    task = Classification(cfg, Path(cfg.output_dir))
    trainer = Trainer(cfg, task)
    try:
        summary = trainer.train()
        if not task.results:  # resumed at the last step: nothing was evaluated in this process
            trainer.evaluate()
        summary["results"] = str(task.write_results(trainer.out, trainer.step))
        summary["exports"] = trainer.export() if cfg.export else {}
    finally:
        trainer.close()
    summary["metrics"] = task.results
    return summary
