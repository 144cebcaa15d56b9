"""One co-training step on a fixed global batch, split over ranks and micro-batches; rank 0 saves the step's
scalars and every member's weights after it. Run directly (1 rank) or under `deepspeed --num_gpus N`.

    python tests/scripts/equal_step.py OUT.pt ROWS [--section.key=value ...]

ROWS rows of the training data form the global batch; each rank takes its share, split into
train.grad_accum_steps micro-batches of train.micro_batch_size rows. Every row has the same number of
masked positions and dropout is off (modules in eval mode), so every way of splitting the batch computes
the same mean losses and gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ctcd_ds import dist  # noqa: E402
from ctcd_ds.checks import check  # noqa: E402
from ctcd_ds.config import load_config  # noqa: E402
from ctcd_ds.step import LogWindow  # noqa: E402
from ctcd_ds.tasks import MaskedLM  # noqa: E402
from ctcd_ds.trainer import Trainer  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it first
    out, rows, overrides = Path(args[0]), int(args[1]), args[2:]
    cfg = load_config("ctcd", overrides)
    check(cfg)
    dist.init_distributed()
    task = MaskedLM(cfg)
    trainer = Trainer(cfg, task)
    for m in trainer.members.values():
        m.engine.module.eval()  # no dropout
    ids = task.loader.dataset[:rows]["input_ids"].clone()
    labels = torch.full_like(ids, -100)
    positions = torch.arange(3, ids.shape[1] - 1, 5)
    labels[:, positions] = ids[:, positions]
    ids[:, positions] = task.tokenizer.mask_token_id
    share = rows // dist.world_size()
    mine = slice(dist.rank() * share, (dist.rank() + 1) * share)
    micro = cfg.train.micro_batch_size
    assert micro * cfg.train.grad_accum_steps == share, (micro, cfg.train.grad_accum_steps, share)
    batches = [
        {
            "input_ids": ids[mine][i : i + micro],
            "attention_mask": torch.ones_like(ids[mine][i : i + micro]),
            "labels": labels[mine][i : i + micro],
        }
        for i in range(0, share, micro)
    ]
    window = LogWindow(cfg.train.grad_accum_steps)
    window.add(trainer.step_fn(iter(batches), 0))
    scalars = window.read()
    if dist.is_rank0():
        weights = {
            n: {k: v.detach().cpu().clone() for k, v in m.engine.module.hf.state_dict().items()}
            for n, m in trainer.members.items()
        }
        torch.save({"scalars": scalars, "weights": weights, "world": dist.world_size()}, out)
    trainer.close()
    dist.cleanup()


if __name__ == "__main__":
    main()
