"""THE co-training step, top to bottom.

For each of ``grad_accum_steps`` micro-batches of the one shared loader:

1. every member (and each sandwich view of a member) predicts the same batch;
2. every distillation edge's unweighted loss ``tau^2 * KL(p_source || p_target)`` is computed, the
   source detached (the two directions of a co-distilling pair in one fused pass);
3. each trainable member's loss = its task loss + sum over its incoming edges of
   ``weight(step) * KD loss`` (+ ``hidden_weight * hidden-state MSE``), and its own engine backpropagates it.

At the accumulation boundary each trainable engine steps (after its pre-step hook, e.g. HomoDistil pruning).
The graphs of the members never meet: every target of a loss is detached, so engine A's backward
reaches only A's parameters.

The step never waits for the device: its statistics stay device tensors (``StepStats``), summed over the
steps between two logs by a ``LogWindow`` and read (one all-reduce, one copy to the host) only when the loop
logs. Each phase is a named ``record_function`` range (``<member>/forward``, ``kd_loss``, ``<member>/backward``,
``<member>/optimizer_step``) for ``benchmarks/profile_step.py``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from ctcd_ds import dist
from ctcd_ds.config import LoopConfig
from ctcd_ds.engines import Member
from ctcd_ds.graph import Edge, Graph, view_name
from ctcd_ds.losses import bidirectional_kl, hidden_mse, kd_loss
from ctcd_ds.tasks import Prediction, Task


def edge_losses(logits: dict[str, torch.Tensor], edges: tuple[Edge, ...], impl: str) -> dict[Edge, torch.Tensor]:
    """Unweighted ``tau^2 * KL(p_source || p_target)`` for every edge; each graph reaches only its target.

    ``fused``: the two directions of a pair at one temperature share one pass (a one-way edge is the same
    call with the other direction's weight at 0). ``reference``: one plain-torch KL per edge."""
    if impl == "reference":
        return {e: kd_loss(logits[e.source], logits[e.target], e.temperature) for e in edges}
    assert impl == "fused", impl
    by_ends = {(e.source, e.target): e for e in edges}
    out: dict[Edge, torch.Tensor] = {}
    for e in edges:
        if e in out:
            continue
        back = by_ends.get((e.target, e.source))
        if back is not None and back.temperature != e.temperature:
            back = None  # different temperatures: two separate passes
        pair = bidirectional_kl(
            logits[e.source], logits[e.target], e.temperature, weight_ab=1.0, weight_ba=1.0 if back else 0.0
        )
        out[e] = pair.loss_ab
        if back is not None:
            out[back] = pair.loss_ba
    return out


@dataclass
class StepStats:
    """What one step measured, nothing read from the device yet.

    ``sums``: this rank's sums over the step's micro-batches (losses; device scalars). ``last``: values of the
    step itself (learning rates, gradient norms, loss scales, edge weights; device scalars or numbers)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    last: dict[str, torch.Tensor | float] = field(default_factory=dict)


class LogWindow:
    """The steps since the last log: ``add`` sums their statistics on the device; ``read`` returns the means
    over those steps, micro-batches and ranks (one all-reduce: collective) and each ``last`` value of the
    newest step, as floats, and starts a new window."""

    def __init__(self, grad_accum_steps: int):
        self.grad_accum_steps = grad_accum_steps
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, torch.Tensor | float] = {}
        self.steps = 0

    def add(self, stats: StepStats) -> None:
        for k, v in stats.sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.last |= stats.last
        self.steps += 1

    def read(self) -> dict[str, float]:
        assert self.steps, "read() of an empty window"
        keys = sorted(self.sums)
        means = dist.all_reduce_sum(torch.stack([self.sums[k] for k in keys])) if keys else torch.zeros(0)
        means /= self.steps * self.grad_accum_steps * dist.world_size()
        out = dict(zip(keys, means.tolist()))
        on_device = [k for k, v in self.last.items() if isinstance(v, torch.Tensor)]
        if on_device:
            values = torch.stack([self.last[k].detach().float().reshape(()) for k in on_device]).cpu().tolist()
            out |= dict(zip(on_device, values))
        out |= {k: float(v) for k, v in self.last.items() if not isinstance(v, torch.Tensor)}
        self._reset()
        return out


class CoTrainingStep:
    """One optimizer step of every trainable member; returns its statistics, still on the device."""

    def __init__(
        self, members: dict[str, Member], graph: Graph, task: Task, loop: LoopConfig, *, zero_stage: int, precision: str
    ):
        self.members, self.graph, self.task, self.loop = members, graph, task, loop
        self.trainable = {n: m for n, m in members.items() if m.trainable}
        self.zero_stage, self.precision = zero_stage, precision

    def __call__(self, batches: Iterator[dict[str, torch.Tensor]], step: int) -> StepStats:
        stats = StepStats(sums=defaultdict(lambda: torch.zeros((), device=dist.device())))
        for _ in range(self.loop.grad_accum_steps):
            self.micro_step(next(batches), step, stats.sums)
            for name, m in self.trainable.items():
                if m.engine.is_gradient_accumulation_boundary():
                    if self.zero_stage == 0:  # ZeRO-0 records no global norm; its gradients are whole here
                        stats.last[f"{name}/grad_norm"] = _grad_norm(m)
                    hook = getattr(m.engine.module, "before_optimizer_step", None)  # e.g. HomoDistil pruning
                    if hook is not None:
                        stats.last |= {f"{name}/{k}": v for k, v in hook(step).items()}
                with record_function(f"{name}/optimizer_step"):
                    m.engine.step()
        stats.sums = dict(stats.sums)
        stats.last |= self._after_step(step)
        return stats

    def micro_step(self, batch: dict[str, torch.Tensor], step: int, sums: dict[str, torch.Tensor]) -> None:
        # 1. every member (and view) predicts the same batch
        preds: dict[str, Prediction] = {}
        for name, m in self.members.items():
            with record_function(f"{name}/forward"):
                preds[name] = self.task.forward(m, batch)
                for sparsity in self.graph.views.get(name, ()):
                    preds[view_name(name, sparsity)] = self.task.forward(m, batch, sparsity)
        # 2. every edge's KD loss
        with record_function("kd_loss"):
            kd = edge_losses({n: p.logits for n, p in preds.items()}, self.graph.edges, self.loop.kd_loss)
        # 3. each trainable member: own task loss + weighted incoming edges -> its own backward
        for name, m in self.trainable.items():
            with record_function(f"{name}/loss"):
                own = self.task.loss(preds[name])
                total = own
                sums[f"{name}/{self.task.loss_name}"] += own.detach()
                for edge in self.graph.incoming(name):  # edge.target is this member or one of its views
                    total = total + edge.weight(step) * kd[edge]
                    sums[f"{edge.target}/kd_loss_from_{edge.source}"] += kd[edge].detach()
                    if edge.hidden_weight:
                        source, target = preds[edge.source], preds[edge.target]
                        mse = hidden_mse(source.hidden, target.hidden, source.hidden_keep, target.hidden_keep)
                        total = total + edge.hidden * mse
                        sums[f"{edge.target}/hidden_mse_from_{edge.source}"] += mse.detach()
                sums[f"{name}/total_loss"] += total.detach()
            with record_function(f"{name}/backward"):
                m.engine.backward(total)

    def _after_step(self, step: int) -> dict[str, torch.Tensor | float]:
        """Each member's lr, gradient norm (DeepSpeed's; ZeRO-0's is set in the step) and fp16 loss scale, and
        every edge's weight, as they are (no device read)."""
        out: dict[str, torch.Tensor | float] = {}
        for name, m in self.trainable.items():
            out[f"{name}/lr"] = m.engine.get_lr()[0]
            norm = m.engine.get_global_grad_norm() if self.zero_stage else None
            if norm is not None:
                out[f"{name}/grad_norm"] = norm
            if self.precision == "fp16":
                out[f"{name}/loss_scale"] = m.engine.optimizer.cur_scale
        for edge in self.graph.edges:
            out[f"edge/{edge.name}/weight"] = edge.weight(step)
        return out


def _grad_norm(m: Member) -> torch.Tensor:
    """The global norm of a ZeRO-0 engine's (whole) gradients, on the device."""
    grads = [p.grad for p in m.engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=dist.device())
