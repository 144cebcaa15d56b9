"""The shared tokenizer: train a SentencePiece unigram model and wrap it as a Hugging Face fast tokenizer.

The saved directory loads with ``AutoTokenizer.from_pretrained(dir)``; it has BERT's special tokens
([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4) and BERT's ``[CLS] A [SEP]`` template.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(directory))
    missing = [name for name in ("mask_token", "pad_token", "cls_token", "sep_token") if getattr(tok, name) is None]
    if missing:
        raise ValueError(f"tokenizer.path={directory}: the tokenizer has no {', '.join(missing)} (an MLM needs them)")
    return tok


def _iter_lines(files: list[str], limit: int):
    lines = (line.strip() for path in files for line in open(path, encoding="utf-8"))
    return itertools.islice((line for line in lines if line), limit)


def train_tokenizer(files: list[str], out_dir: Path, vocab_size: int, max_sentences: int) -> PreTrainedTokenizerFast:
    """Train SentencePiece (unigram) on ``files`` and save the fast tokenizer into ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            sentence_iterator=_iter_lines(files, max_sentences),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            control_symbols=list(SPECIAL_TOKENS[2:]),
            character_coverage=0.9995,
            hard_vocab_limit=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert [piece for piece, _ in vocab[:5]] == list(SPECIAL_TOKENS), vocab[:5]
    backend = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def cache_root() -> Path:
    return Path(os.environ.get("CTCD_DS_CACHE", Path.home() / ".cache" / "ctcd_ds"))


def trained_tokenizer_dir(files: list[str], vocab_size: int, max_sentences: int) -> Path:
    """Where the tokenizer trained on exactly these files and settings is cached (trained if absent)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).read_bytes())
    digest.update(f"{vocab_size}/{max_sentences}/unigram/v1".encode())
    cached = cache_root() / "tokenizers" / digest.hexdigest()[:16]
    if not has_tokenizer(cached):
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        train_tokenizer(files, tmp, vocab_size, max_sentences)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    return cached


def pretrained_tokenizer_source(tokenizer_path: str, weight_dirs: list[str]) -> str | None:
    """The directory the run's tokenizer is loaded from, or None if one must be trained.

    ``tokenizer.path`` wins; else the first pretrained weight directory that holds a tokenizer.
    """
    if tokenizer_path:
        return tokenizer_path
    for model in weight_dirs:
        if Path(model).is_dir() and has_tokenizer(model):
            return model
    return None
