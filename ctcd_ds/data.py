"""Text -> fixed-length token blocks (datasets, fingerprint-cached), the MLM masking collator, and the
one shared, resumable, distributed data loader whose batches every member sees."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from ctcd_ds import dist
from ctcd_ds.assets import corpus_files
from ctcd_ds.config import DataConfig
from ctcd_ds.errors import UserError


def _blocks(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, text_column: str
) -> datasets.Dataset:
    body = cfg.seq_len - 2
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def tokenize(batch):
        texts = [t for t in batch[text_column] if t and not t.isspace()]
        return {"ids": tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]}

    def group(batch):
        flat = [tok for ids in batch["ids"] for tok in ids]
        n = len(flat) // body
        return {"input_ids": [[cls, *flat[i * body : (i + 1) * body], sep] for i in range(n)]}

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")
    return ds.map(
        group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"group into {cfg.seq_len}-token blocks"
    )


def load_blocks(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Tokenized training and held-out blocks (``input_ids`` of length ``seq_len``)."""
    cache_dir = cfg.cache_dir or None
    train_files, eval_files = corpus_files(cfg)
    with dist.rank0_first():  # rank 0 fills the datasets cache, the others read it
        if cfg.dataset:
            raw = datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, cache_dir=cache_dir)
            text_column = cfg.text_column
            train = _blocks(raw["train"], tokenizer, cfg, text_column)
            held_out_split = next((s for s in ("validation", "valid", "test") if s in raw), None)
            held_out = _blocks(raw[held_out_split], tokenizer, cfg, text_column) if held_out_split else None
        else:
            files = {"train": train_files, **({"eval": eval_files} if eval_files else {})}
            raw = datasets.load_dataset("text", data_files=files, cache_dir=cache_dir)
            text_column = "text"
            train = _blocks(raw["train"], tokenizer, cfg, text_column)
            held_out = _blocks(raw["eval"], tokenizer, cfg, text_column) if eval_files else None
    if len(train) == 0:
        raise UserError(
            f"data.train_files={train_files or cfg.dataset}: no {cfg.seq_len}-token block could be made (empty or "
            "too short corpus)"
        )
    if held_out is None:
        split = train.train_test_split(test_size=max(cfg.eval_fraction, 1 / len(train)), seed=seed, shuffle=True)
        train, held_out = split["train"], split["test"]
    if cfg.max_train_blocks:
        train = train.select(range(min(cfg.max_train_blocks, len(train))))
    train.set_format("torch", columns=["input_ids"])
    held_out.set_format("torch", columns=["input_ids"])
    return train, held_out


@dataclass(slots=True)
class MaskingCollator:
    """BERT masking: pick ``probability`` of the non-special tokens; 80% -> [MASK], 10% -> random, 10% kept.

    Masks come from an explicit generator, so a batch's masks depend only on (seed, epoch, index, rank)
    and a resumed run masks exactly as an uninterrupted one.
    """

    tokenizer: PreTrainedTokenizerBase
    probability: float

    def __call__(self, rows: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        input_ids = rows["input_ids"].clone()
        special = torch.zeros_like(input_ids, dtype=torch.bool)
        for tid in self.tokenizer.all_special_ids:
            special |= input_ids == tid
        attention_mask = (input_ids != self.tokenizer.pad_token_id).long()
        chosen = (torch.rand(input_ids.shape, generator=generator) < self.probability) & ~special
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        roll = torch.rand(input_ids.shape, generator=generator)
        to_mask = chosen & (roll < 0.8)
        to_random = chosen & (roll >= 0.8) & (roll < 0.9)
        random_ids = torch.randint(len(self.tokenizer), input_ids.shape, generator=generator)
        input_ids[to_mask] = self.tokenizer.mask_token_id
        input_ids[to_random] = random_ids[to_random]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _batch_seed(seed: int, epoch: int, index: int, rank: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_003 + index) * 1_009 + rank) % (2**63)


class _EpochBatches(torch.utils.data.Dataset):
    """Batch ``i`` of one epoch of one rank, masked with its own seeded generator (works in workers)."""

    def __init__(self, loader: SharedLoader, order: list[int]):
        self.loader, self.order, self.epoch = loader, order, loader.epoch

    def __len__(self) -> int:
        return self.loader.batches_per_epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        bs = self.loader.batch_size
        rows = self.loader.dataset[self.order[i * bs : (i + 1) * bs]]
        gen = torch.Generator().manual_seed(_batch_seed(self.loader.seed, self.epoch, i, dist.rank()))
        return self.loader.collator(rows, gen)


class SharedLoader:
    """The one loader of a run: a distributed sampler over data-parallel ranks, endless over epochs,
    with a ``state_dict`` (epoch, batches consumed) that resumes at the exact next batch.

    ``collator(rows, generator)`` turns the dataset rows of one batch into tensors; it gets a generator
    seeded by (seed, epoch, batch, rank) for any randomness (masking)."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        collator: Callable,
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        num_workers: int = 0,
    ):
        self.dataset, self.collator, self.batch_size, self.seed = dataset, collator, batch_size, seed
        self.shuffle, self.num_workers = shuffle, num_workers
        self.sampler = DistributedSampler(
            dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=shuffle, seed=seed, drop_last=True
        )
        if len(self.sampler) < batch_size:
            raise UserError(
                f"train.micro_batch_size={batch_size}: only {len(self.sampler)} blocks per rank "
                f"({len(dataset)} blocks over {dist.world_size()} ranks); use a larger corpus or a smaller batch"
            )
        self.epoch, self.index = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            self.sampler.set_epoch(self.epoch)
            batches = _EpochBatches(self, list(self.sampler))
            remaining = range(self.index, len(batches))
            # its own generator: creating a DataLoader iterator must not draw from the global RNG (dropout)
            loader = DataLoader(
                batches,
                batch_size=None,
                sampler=remaining,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(self.seed),
            )
            for batch in loader:
                self.index += 1
                yield batch
            self.epoch, self.index = self.epoch + 1, 0
            if not self.shuffle:
                return


def eval_batches(
    dataset: datasets.Dataset, collator: Callable, batch_size: int, limit: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """The fixed held-out batches of this rank (same masks at every evaluation)."""
    per_rank = max(1, len(dataset) // dist.world_size())
    loader = SharedLoader(dataset, collator, min(batch_size, per_rank), seed + 1, shuffle=False)
    return [b for b, _ in zip(loader, range(limit))]
