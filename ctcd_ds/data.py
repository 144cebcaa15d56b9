"""Text -> fixed-length token blocks (datasets, fingerprint-cached, or read from a prepared directory), the
MLM masking collator, and the one shared, resumable, distributed data loader whose batches every member sees."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from ctcd_ds import dist, prepared
from ctcd_ds.assets import corpus_files
from ctcd_ds.config import DataConfig, PretrainConfig
from ctcd_ds.errors import UserError
from ctcd_ds.presets import weight_dirs
from ctcd_ds.tokenizer import (
    cache_tokenizer_files,
    load_tokenizer,
    pretrained_tokenizer_source,
    tokenizer_files,
    trained_tokenizer_dir,
)

MAX_AUTO_PROC = 16
"""``data.num_proc=0`` (auto) uses at most this many tokenizing processes."""
AUTO_PROC_MIN_BYTES = 32 << 20
"""``data.num_proc=0`` (auto) tokenizes local text smaller than this in one process."""


def token_dtype(vocab_size: int) -> str:
    """How token ids are stored: 2 bytes each while the vocabulary fits (batches are int64 either way)."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def auto_num_proc(cfg: DataConfig, files: list[str]) -> int:
    """``data.num_proc``, with 0 (auto) resolved: one process per usable CPU core (at most
    :data:`MAX_AUTO_PROC`) for a corpus of at least :data:`AUTO_PROC_MIN_BYTES`, else 1 (starting processes
    costs more than they save on small text; a `datasets` hub corpus counts as large)."""
    if cfg.num_proc:
        return cfg.num_proc
    if files and sum(os.path.getsize(f) for f in files) < AUTO_PROC_MIN_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_PROC))


def _blocks(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    text_column: str,
    num_proc: int,
    work: Path | None = None,
    name: str = "",
) -> datasets.Dataset:
    """``seq_len``-token ``[CLS] ... [SEP]`` blocks of ``ds``: every 1000 consecutive non-empty lines are
    tokenized, concatenated and cut into blocks (their remainder is dropped).

    Tokenizing is row by row, in ``num_proc`` processes; grouping is vectorised (Arrow/NumPy) in one process,
    so the blocks do not depend on ``num_proc``. ``work``: write the results there (``work/NAME-*.arrow``)
    instead of the `datasets` cache."""
    body = cfg.seq_len - 2
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    dtype = token_dtype(len(tokenizer))

    def tokenize(batch):
        texts = [t for t in batch[text_column] if t and not t.isspace()]
        ids = tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
        )["input_ids"]
        return {"ids": ids}

    def group(batch: pa.Table) -> pa.Table:
        flat = batch.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        n = len(flat) // body
        blocks = np.empty((n, cfg.seq_len), dtype=flat.dtype)
        blocks[:, 0], blocks[:, -1] = cls, sep
        blocks[:, 1:-1] = flat[: n * body].reshape(n, body)
        return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), cfg.seq_len)})

    def to(kind: str) -> dict:
        return {"cache_file_name": str(work / f"{name}-{kind}.arrow"), "load_from_cache_file": False} if work else {}

    ids = ds.map(
        tokenize,
        batched=True,
        remove_columns=ds.column_names,
        features=datasets.Features({"ids": datasets.List(datasets.Value(dtype))}),
        num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
        desc="tokenize",
        **to("ids"),
    )
    blocks = ids.with_format("arrow").map(
        group,
        batched=True,
        batch_size=1000,
        remove_columns=["ids"],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value(dtype), length=cfg.seq_len)}),
        desc=f"group into {cfg.seq_len}-token blocks",
        **to("blocks"),
    )
    if work:  # the token lists are in the blocks now; free their disk space at once (a corpus can be large)
        del ids
        for f in glob.glob(str(work / f"{name}-ids*.arrow")):
            os.remove(f)
    return blocks.with_format(None)


def _tokenized(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, work: Path | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training blocks, held-out blocks or None when they are to be split off the training blocks).
    ``work``: every file is written there (the text as Arrow too) rather than into the `datasets` cache."""
    train_files, eval_files = corpus_files(cfg)
    num_proc = auto_num_proc(cfg, train_files + eval_files)
    if cfg.dataset:
        raw = datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, cache_dir=cfg.cache_dir or None)
        text_column = cfg.text_column
        held_out_split = next((s for s in ("validation", "valid", "test") if s in raw), None)
    else:
        files = {"train": train_files, **({"eval": eval_files} if eval_files else {})}
        cache_dir = str(work / "text") if work else cfg.cache_dir or None
        raw = datasets.load_dataset("text", data_files=files, cache_dir=cache_dir)
        text_column, held_out_split = "text", "eval" if eval_files else None
    train = _blocks(raw["train"], tokenizer, cfg, text_column, num_proc, work, "train")
    held_out = None
    if held_out_split:
        held_out = _blocks(raw[held_out_split], tokenizer, cfg, text_column, num_proc, work, "eval")
    return train, held_out


def _nonempty(train: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    """``train``, if it has a block (checked by every rank after ``rank0_first``: a rank raising inside it
    would leave the others waiting)."""
    if len(train) == 0:
        raise UserError(
            f"data.train_files={corpus_files(cfg)[0] or cfg.dataset}: no {cfg.seq_len}-token block could be made "
            "(empty or too short corpus)"
        )
    return train


def _split(train: datasets.Dataset, cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``eval_fraction`` of the blocks (at least one), drawn with ``seed``, held out."""
    train = _nonempty(train, cfg)
    split = train.train_test_split(test_size=max(cfg.eval_fraction, 1 / len(train)), seed=seed, shuffle=True)
    return split["train"], split["test"]


def run_tokenizer(cfg: PretrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a pre-training run: ``tokenizer.path``, else a pretrained member's, else the one saved
    with ``data.prepared``, else one trained on the corpus (see :func:`_shared_trained_tokenizer`)."""
    source = pretrained_tokenizer_source(cfg.tokenizer.path, list(weight_dirs(cfg.members).values()))
    if source is None and cfg.data.prepared:
        source = str(Path(cfg.data.prepared) / prepared.TOKENIZER)
    if source is None:
        train_files, _ = corpus_files(cfg.data)
        if not train_files:
            raise UserError(
                f"tokenizer.path: empty; give a tokenizer for data.dataset={cfg.data.dataset} (training one "
                "needs local files)"
            )
        source = str(_shared_trained_tokenizer(train_files, cfg.tokenizer.vocab_size, cfg.tokenizer.max_sentences))
    tok = load_tokenizer(source)
    dist.print0(f"tokenizer: {source} ({len(tok)} tokens)")
    return tok


def _shared_trained_tokenizer(files: list[str], vocab_size: int, max_sentences: int) -> Path:
    """The tokenizer trained on the corpus, byte for byte the same on every node: global rank 0 trains it (or
    finds it in its cache) and sends its files to every rank; the first rank of each other node caches them in
    its node's cache (``CTCD_DS_CACHE``: nodes need not share a disk), then that node's other ranks load it."""
    answer: tuple | None = None
    error: BaseException | None = None
    if dist.is_rank0():
        try:
            cached = trained_tokenizer_dir(files, vocab_size, max_sentences)
            answer = ("files", cached.name, tokenizer_files(cached))
        except UserError as exc:
            answer, error = ("problems", exc.problems), exc
        except Exception as exc:  # rank 0 raises it, the others a line about it (they would wait forever)
            answer, error = ("failed", repr(exc)), exc
    kind, *value = dist.broadcast_object(answer)
    if error is not None:
        raise error
    if kind == "problems":
        raise UserError(value[0])
    if kind == "failed":
        raise RuntimeError(f"training the tokenizer failed on rank 0: {value[0]}")
    with dist.rank0_first():  # each other node's first rank writes its copy; its other ranks find it there
        return cached if dist.is_rank0() else cache_tokenizer_files(*value)


def load_blocks(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Tokenized training and held-out blocks (``input_ids`` of length ``seq_len``): read memory-mapped from
    ``data.prepared`` on every rank, or made from the text (rank 0 fills the `datasets` cache, the others
    read it)."""
    if cfg.prepared:
        train, held_out = load_prepared(cfg, tokenizer)
    else:
        with dist.rank0_first():  # each node's first rank fills its node's `datasets` cache
            train, held_out = _tokenized(cfg, tokenizer)
        train, held_out = _split(train, cfg, seed) if held_out is None else (_nonempty(train, cfg), held_out)
    _same_on_every_node(train, held_out, cfg)
    if cfg.max_train_blocks:
        train = train.select(range(min(cfg.max_train_blocks, len(train))))
    train.set_format("torch", columns=["input_ids"])
    held_out.set_format("torch", columns=["input_ids"])
    return train, held_out


def _signature(train: datasets.Dataset, held_out: datasets.Dataset) -> tuple[int, int, str]:
    """(training blocks, held-out blocks, a hash of 16 training blocks spread over the set and the first and
    last held-out block): what two nodes that made or read the same blocks agree on."""
    digest = hashlib.sha256()
    picks = sorted({i * (len(train) - 1) // 15 for i in range(16)}) if len(train) else []
    for ds, rows in ((train, picks), (held_out, sorted({0, len(held_out) - 1}) if len(held_out) else [])):
        for i in rows:
            digest.update(np.asarray(ds[i]["input_ids"], dtype=np.int64).tobytes())
    return len(train), len(held_out), digest.hexdigest()[:16]


def _same_on_every_node(train: datasets.Dataset, held_out: datasets.Dataset, cfg: DataConfig) -> None:
    """Collective: every node made (or read) the same blocks as rank 0. Each node reads its own copy of the
    corpus, tokenizer and cache; a copy that differs would silently train the ranks on different data."""
    if dist.world_size() == 1:
        return
    mine = _signature(train, held_out)
    signatures = dist.all_gather_object(mine)
    differ = [(r, s) for r, s in enumerate(signatures) if s != signatures[0]]
    if differ:
        if cfg.prepared or cfg.dataset:
            source = f"data.prepared={cfg.prepared}" if cfg.prepared else f"data.dataset={cfg.dataset}"
        else:
            source = f"data.train_files={','.join(corpus_files(cfg)[0])}"
        (n0, e0, _), (r, (n, e, _)) = signatures[0], differ[0]
        raise UserError(
            f"{source}: rank {r} made other blocks than rank 0 ({n} training and {e} held-out blocks, against "
            f"{n0} and {e0}, or other tokens); every node must have byte-identical corpus files (or prepared "
            "data) and tokenizer at the same paths"
        )


def load_prepared(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The blocks of ``data.prepared`` (memory-mapped: nothing is copied or written), after checking that the
    run's ``seq_len`` and tokenizer are the ones they were made with."""
    problems = prepared.compatibility_problems(cfg, tokenizer, f"the run's tokenizer ({tokenizer.name_or_path})")
    if problems:
        raise UserError(problems)
    root = Path(cfg.prepared)
    train, held_out = (datasets.load_from_disk(str(root / split)) for split in prepared.SPLITS)
    return train, held_out


def write_blocks(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, dest: Path) -> dict[str, int]:
    """``dest/train`` and ``dest/eval``: the blocks :func:`load_blocks` would make from the text with this
    tokenizer and seed (the same held-out split), saved with ``save_to_disk``. Every intermediate file (the
    text as Arrow, the token lists, the unsplit blocks) is written under ``dest/.work`` and removed as soon as
    it is used: nothing goes to the `datasets` cache. Returns the number of blocks of each split."""
    work = dest / ".work"
    work.mkdir(parents=True)
    train, held_out = _tokenized(cfg, tokenizer, work)
    shutil.rmtree(work / "text", ignore_errors=True)  # the text is tokenized: drop its Arrow copy
    train, held_out = _split(train, cfg, seed) if held_out is None else (_nonempty(train, cfg), held_out)
    counts = {}
    for split, ds in zip(prepared.SPLITS, (train, held_out)):
        ds.save_to_disk(str(dest / split))
        counts[split] = len(ds)
    del train, held_out
    shutil.rmtree(work)
    return counts


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
                pin_memory=dist.device().type == "cuda",  # page-locked: copies to the GPU do not block the host
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
    """The fixed held-out batches of this rank (same masks at every evaluation): the first ``limit``, or with
    ``limit`` 0 every full batch of the split (one pass)."""
    per_rank = max(1, len(dataset) // dist.world_size())
    loader = SharedLoader(dataset, collator, min(batch_size, per_rank), seed + 1, shuffle=False)
    return list(loader) if limit == 0 else [b for b, _ in zip(loader, range(limit))]
