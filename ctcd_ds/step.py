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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch

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


class CoTrainingStep:
    """One optimizer step of every trainable member; returns the step's scalars (means over micro-batches
    and ranks), read from the device once."""

    def __init__(
        self, members: dict[str, Member], graph: Graph, task: Task, loop: LoopConfig, *, zero_stage: int, precision: str
    ):
        self.members, self.graph, self.task, self.loop = members, graph, task, loop
        self.trainable = {n: m for n, m in members.items() if m.trainable}
        self.zero_stage, self.precision = zero_stage, precision

    def __call__(self, batches: Iterator[dict[str, torch.Tensor]], step: int) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=dist.device()))
        norms: dict[str, float | None] = {}
        hook_scalars: dict[str, float] = {}
        for _ in range(self.loop.grad_accum_steps):
            self.micro_step(next(batches), step, sums)
            for name, m in self.trainable.items():
                if m.engine.is_gradient_accumulation_boundary():
                    if self.zero_stage == 0:  # ZeRO-0 records no global norm; its gradients are whole here
                        norms[name] = _grad_norm(m)
                    hook = getattr(m.engine.module, "before_optimizer_step", None)  # e.g. HomoDistil pruning
                    if hook is not None:
                        hook_scalars |= {f"{name}/{k}": float(v) for k, v in hook(step).items()}
                m.engine.step()
        return self._scalars(sums, norms, step) | hook_scalars

    def micro_step(self, batch: dict[str, torch.Tensor], step: int, sums: dict[str, torch.Tensor]) -> None:
        # 1. every member (and view) predicts the same batch
        preds: dict[str, Prediction] = {}
        for name, m in self.members.items():
            preds[name] = self.task.forward(m, batch)
            for sparsity in self.graph.views.get(name, ()):
                preds[view_name(name, sparsity)] = self.task.forward(m, batch, sparsity)
        # 2. every edge's KD loss
        kd = edge_losses({n: p.logits for n, p in preds.items()}, self.graph.edges, self.loop.kd_loss)
        # 3. each trainable member: own task loss + weighted incoming edges -> its own backward
        for name, m in self.trainable.items():
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
            m.engine.backward(total)

    def _scalars(self, sums: dict[str, torch.Tensor], norms: dict[str, float | None], step: int) -> dict[str, float]:
        keys = sorted(sums)
        means = dist.all_reduce_sum(torch.stack([sums[k] for k in keys]))
        means /= self.loop.grad_accum_steps * dist.world_size()
        out = {k: float(v) for k, v in zip(keys, means)}
        for name, m in self.trainable.items():
            out[f"{name}/lr"] = float(m.engine.get_lr()[0])
            norm = norms[name] if name in norms else m.engine.get_global_grad_norm()
            if norm is not None:
                out[f"{name}/grad_norm"] = float(norm)
            if self.precision == "fp16":
                out[f"{name}/loss_scale"] = float(m.engine.optimizer.cur_scale)
        for edge in self.graph.edges:
            out[f"edge/{edge.name}/weight"] = edge.weight(step)
        return out


def _grad_norm(m: Member) -> float:
    grads = [p.grad for p in m.engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
