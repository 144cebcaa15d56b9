"""Tokenizer, blocks, the 80/10/10 masking collator and the shared resumable loader."""

from __future__ import annotations

import itertools

import torch
from transformers import AutoTokenizer

from ctcd_ds.config import DataConfig
from ctcd_ds.data import MaskingCollator, SharedLoader, eval_batches, load_blocks
from ctcd_ds.tokenizer import SPECIAL_TOKENS, load_tokenizer


def test_trained_tokenizer_loads_with_autotokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 1000
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = tok("The tower is 300 metres tall.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "The tower is 300 metres tall."
    assert tok.convert_ids_to_tokens(tok("a [MASK] b")["input_ids"]).count("[MASK]") == 1


def test_blocks_have_seq_len_and_bert_framing(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    train, held_out = load_blocks(DataConfig(seq_len=32, max_train_blocks=50), tok, seed=0)
    assert len(train) == 50 and len(held_out) > 0
    ids = train[:]["input_ids"]
    assert ids.shape == (50, 32)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()


def test_user_corpus_gets_a_held_out_split(tokenizer_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about towers and rivers." for i in range(400)))
    train, held_out = load_blocks(
        DataConfig(train_files=[str(corpus)], seq_len=16, eval_fraction=0.1), load_tokenizer(tokenizer_dir), seed=0
    )
    assert len(held_out) == round(0.1 * (len(train) + len(held_out)))


def test_masking_is_80_10_10_and_never_touches_special_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids = torch.randint(5, len(tok), (64, 128))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    batch = MaskingCollator(tok, 0.15)({"input_ids": ids}, torch.Generator().manual_seed(0))
    chosen = batch["labels"] != -100
    assert abs(chosen.float().mean().item() - 0.15 * 126 / 128) < 0.01
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(batch["labels"][chosen], ids[chosen])
    masked = (batch["input_ids"] == tok.mask_token_id) & chosen
    kept = (batch["input_ids"] == ids) & chosen
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1) < 0.03  # (a random token equal to the original counts as kept)
    assert torch.equal(batch["input_ids"][~chosen], ids[~chosen])
    again = MaskingCollator(tok, 0.15)({"input_ids": ids}, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_loader_resumes_at_the_exact_next_batch(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    train, _ = load_blocks(DataConfig(seq_len=32, max_train_blocks=40), tok, seed=0)
    collator = MaskingCollator(tok, 0.15)
    first = SharedLoader(train, collator, batch_size=8, seed=3)
    seen = list(itertools.islice(iter(first), 7))  # crosses an epoch boundary (5 batches per epoch)
    assert first.state_dict() == {"epoch": 1, "index": 2}
    resumed = SharedLoader(train, collator, batch_size=8, seed=3)
    resumed.load_state_dict({"epoch": 1, "index": 0})
    again = list(itertools.islice(iter(resumed), 2))
    for a, b in zip(seen[5:], again):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(seen[0]["input_ids"], seen[5]["input_ids"])  # new epoch, new order
    workers = SharedLoader(train, collator, batch_size=8, seed=3, num_workers=2)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(seen[:3], itertools.islice(iter(workers), 3)))


def test_eval_batches_zero_is_the_whole_held_out_split(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    blocks, _ = load_blocks(DataConfig(seq_len=32, max_train_blocks=43), tok, seed=0)
    collator = MaskingCollator(tok, 0.15)
    everything = eval_batches(blocks, collator, batch_size=8, limit=0, seed=1)
    assert len(everything) == len(blocks) // 8 == 5  # every full batch, once
    first_two = eval_batches(blocks, collator, batch_size=8, limit=2, seed=1)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(everything, first_two))
