"""The shared tokenizer: train a SentencePiece unigram model and wrap it as a Hugging Face fast tokenizer.

The saved directory loads with ``AutoTokenizer.from_pretrained(dir)`` on transformers 4.57 and 5 (checked:
4.57.0, 4.57.6, 5.24.0; see :func:`save_tokenizer`); it has BERT's special tokens ([PAD]=0 [UNK]=1 [CLS]=2
[SEP]=3 [MASK]=4) and BERT's ``[CLS] A [SEP]`` template.

Nothing is lost: the model has the 256 byte pieces ``<0x00>``..``<0xFF>`` (ids 5-260), so a character
without a piece of its own is encoded as its UTF-8 bytes (never ``[UNK]``), and there is no normalizer
(no NFKC, no whitespace collapse). For every ``text`` that contains neither "▁" (U+2581, the word-boundary
mark) nor a special-token string such as "[MASK]"::

    tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text.removeprefix(" ")

(one leading space is not kept: it and the "▁" added before the first word are the same piece). "[MASK]"
takes the spaces before it (``lstrip``), so "The [MASK] sat." encodes as ``▁The [MASK] ▁sat ...``, as "The
cat sat." with ``▁cat`` masked does in pre-training, and filling the mask with ``▁cat`` decodes with single
spaces: "The cat sat.".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ctcd_ds.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BYTE_PIECES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_PIECES + 64
"""The smallest ``tokenizer.vocab_size``: the special tokens, the byte pieces and room for some characters
(training may still ask for more: SentencePiece needs a piece for each common character of the corpus)."""
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The ``tokenizer_class`` saved for a tokenizer.json tokenizer: transformers 4.x loads it as that class,
5.x as ``TokenizersBackend`` (its alias there); transformers 5 itself writes "TokenizersBackend", which 4.x
does not know."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(directory))
    missing = [name for name in ("mask_token", "pad_token", "cls_token", "sep_token") if getattr(tok, name) is None]
    if missing:
        raise ValueError(f"tokenizer.path={directory}: the tokenizer has no {', '.join(missing)} (an MLM needs them)")
    return tok


def _lines(files: list[str]):
    for path in files:
        with open(path, encoding="utf-8") as f:
            yield from (stripped for line in f if (stripped := line.strip()))


def _iter_lines(files: list[str], limit: int):
    """The first ``limit`` non-empty lines of ``files``, streamed (a corpus may be larger than memory)."""
    return itertools.islice(_lines(files), limit)


def train_tokenizer(files: list[str], out_dir: Path, vocab_size: int, max_sentences: int) -> PreTrainedTokenizerFast:
    """Train SentencePiece (unigram, byte fallback) on ``files`` and save the fast tokenizer into ``out_dir``.

    ``vocab_size`` counts every token: the 5 special tokens, the 256 byte pieces and the learned pieces
    (SentencePiece may return fewer on a small corpus). Raises ``UserError`` naming ``tokenizer.vocab_size``
    if it is too small for the corpus's common characters.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        try:
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
                byte_fallback=True,
                # learn the pieces on the text as the fast tokenizer sees it: not normalized
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                character_coverage=0.9995,
                hard_vocab_limit=False,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as exc:
            needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc))
            if needed is None:
                raise
            raise UserError(
                f"tokenizer.vocab_size={vocab_size}: too small for this training text; it needs at least "
                f"{needed.group(1)} ({len(SPECIAL_TOKENS)} special tokens, {BYTE_PIECES} byte pieces and a piece "
                "for each common character)"
            ) from None
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert [piece for piece, _ in vocab[:5]] == list(SPECIAL_TOKENS), vocab[:5]
    assert [piece for piece, _ in vocab[5 : 5 + BYTE_PIECES]] == [f"<0x{b:02X}>" for b in range(BYTE_PIECES)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=True))
    # As Llama's fast tokenizer: spaces -> "▁", "▁" before the first word only (text after a special token
    # keeps its own space or none); decoding turns "▁" back into spaces, byte pieces into their characters,
    # and drops the first word's "▁"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    # "[MASK]" takes the spaces before it: "The [MASK] sat" -> ▁The [MASK] ▁sat, as a masked word in pre-training
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=t == "[MASK]") for t in SPECIAL_TOKENS]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        clean_up_tokenization_spaces=False,  # it would drop spaces before punctuation: "a ." -> "a."
    )
    save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """``tok.save_pretrained(directory)``, loadable with transformers 4.x as well as 5.x.

    transformers 5 saves a tokenizer.json tokenizer as ``"tokenizer_class": "TokenizersBackend"``, a class
    transformers 4 does not have; it is rewritten to :data:`PORTABLE_TOKENIZER_CLASS`, which both load.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        config_file.write_text(
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def cache_root() -> Path:
    return Path(os.environ.get("CTCD_DS_CACHE", Path.home() / ".cache" / "ctcd_ds"))


def trained_tokenizer_dir(files: list[str], vocab_size: int, max_sentences: int) -> Path:
    """Where the tokenizer trained on exactly these files and settings is cached (trained if absent)."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:  # in chunks: a corpus may be larger than memory
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    digest.update(f"{vocab_size}/{max_sentences}/unigram/v2".encode())  # v2: byte fallback
    cached = cache_root() / "tokenizers" / digest.hexdigest()[:16]
    if not has_tokenizer(cached):
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        train_tokenizer(files, tmp, vocab_size, max_sentences)
        _install(tmp, cached)
    return cached


def _install(tmp: Path, cached: Path) -> None:
    """Move the complete directory ``tmp`` to ``cached``; if another process put one there first, keep that."""
    if cached.is_dir() and not has_tokenizer(cached):  # left by an interrupted copy
        shutil.rmtree(cached, ignore_errors=True)
    try:
        os.replace(tmp, cached)
    except OSError:
        if not has_tokenizer(cached):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    """The files of a saved tokenizer directory, by name (a few MB at most)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def cache_tokenizer_files(name: str, files: dict[str, bytes]) -> Path:
    """``files`` (the :func:`tokenizer_files` of another node's ``tokenizers/NAME``) in this node's cache: as
    ``tokenizers/NAME``, or, where a different tokenizer already has that name (SentencePiece run on other
    hardware can learn other scores), as ``tokenizers/NAME-<hash of the files>``. Returns the directory."""
    cached = cache_root() / "tokenizers" / name
    if has_tokenizer(cached) and tokenizer_files(cached) != files:
        content = hashlib.sha256(b"".join(k.encode() + b"\0" + v for k, v in sorted(files.items())))
        cached = cached.with_name(f"{name}-{content.hexdigest()[:8]}")
    if not has_tokenizer(cached):
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".tmp", dir=cached.parent))  # unique on a shared cache too
        for file, data in files.items():
            (tmp / file).write_bytes(data)
        _install(tmp, cached)
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
