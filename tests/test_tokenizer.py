"""The shared tokenizer loses no text (byte fallback), decodes filled masks with single spaces, and saves a
directory that transformers 4.x loads as well as the installed 5.x."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from ctcd_ds import checks
from ctcd_ds.assets import BUNDLED_TRAIN
from ctcd_ds.config import load_config
from ctcd_ds.errors import UserError
from ctcd_ds.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

TRANSFORMERS_4_CLASSES = {"PreTrainedTokenizerFast"}
"""``tokenizer_class`` values transformers 4.57 loads a tokenizer.json directory with (checked in a 4.57.6
environment; transformers 5 writes "TokenizersBackend", which 4.x does not have)."""

SAMPLES = [
    "Hello, world! Is this & that #1? (yes) ~ {x} | 50% $3 @home ^_^ \\ `q`",
    "Café naïve façade über Ångström Dvořák São Paulo",
    "東京は日本の首都です。北京。서울",
    "emoji 😀👍🏽 and 🇫🇷 flags",
    "ﬁ ½ Ⅸ ＡＢＣ",  # NFKC would rewrite these
    "two  spaces,   three,\ttab,\nnewline\r\n",  # whitespace collapse would change these
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def round_trip(tok, text: str) -> tuple[list[int], str]:
    ids = tok(text)["input_ids"]
    return ids, tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_byte_pieces_have_fixed_ids(tok):
    assert len(tok) == 1000  # vocab_size counts the special tokens and the byte pieces
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert tok.convert_ids_to_tokens(list(range(5, 261))) == [f"<0x{b:02X}>" for b in range(256)]


@pytest.mark.parametrize("text", SAMPLES)
def test_samples_round_trip_without_unk(tok, text):
    ids, decoded = round_trip(tok, text)
    assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
    assert decoded == text


@settings(max_examples=150, deadline=None, database=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="▁"), max_size=40))
@example(text="  leading spaces")
@example(text="trailing space ")
@example(text="")
@example(text="a\u00a0b\u200bc\u0301")  # no-break space, zero-width space, combining accent
def test_any_text_round_trips_without_unk(tok, text):
    """The docstring's guarantee: everything but one leading space comes back; no [UNK]."""
    if any(special in text for special in SPECIAL_TOKENS):
        return
    ids, decoded = round_trip(tok, text)
    assert tok.unk_token_id not in ids
    assert decoded == text.removeprefix(" ")


def test_filled_mask_decodes_with_single_spaces(tok):
    """As the fill-mask pipeline does: replace each [MASK] by a predicted word piece and decode."""
    word = next(t for t in tok.convert_ids_to_tokens(list(range(261, len(tok)))) if t[1:].isalpha() and t[0] == "▁")
    word_id = tok.convert_tokens_to_ids(word)
    text = "The [MASK] of the city is [MASK]."
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "▁" not in [pieces[i - 1] for i, t in enumerate(pieces) if t == "[MASK]"], pieces  # as in pre-training
    filled = tok.decode([word_id if i == tok.mask_token_id else i for i in ids], skip_special_tokens=True)
    assert filled == f"The {word[1:]} of the city is {word[1:]}."
    assert tok.decode([word_id]) == word[1:]  # the pipeline's token_str


def test_vocab_size_too_small_for_the_byte_pieces_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer\.vocab_size=300: too small"):
        train_tokenizer(BUNDLED_TRAIN, tmp_path / "tok", vocab_size=300, max_sentences=2000)
    cfg = load_config("ctcd", [f"--output_dir={tmp_path / 'run'}", "--tokenizer.vocab_size=300"])
    assert any(p.startswith("tokenizer.vocab_size=300: must be >=") for p in checks.problems(cfg))


def saved_class(directory) -> str:
    return json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"]


def test_trained_tokenizer_saves_a_class_transformers_4_loads(tokenizer_dir, tok):
    assert saved_class(tokenizer_dir) in TRANSFORMERS_4_CLASSES
    reloaded = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert reloaded.is_fast and len(reloaded) == len(tok)
    assert reloaded("Café 東京 [MASK] x")["input_ids"] == tok("Café 東京 [MASK] x")["input_ids"]


def test_exported_model_directory_saves_a_class_transformers_4_loads(tmp_path, tok):
    """A loaded tokenizer saved again (the run's tokenizer/ and every export) keeps a portable class."""
    from ctcd_ds.export import _write  # what export_member and `ctcd-ds export` write a member with

    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = BertForMaskedLM(config)
    out = tmp_path / "export"
    _write(model, model.state_dict(), tok, out)
    assert saved_class(out) in TRANSFORMERS_4_CLASSES
    reloaded = AutoTokenizer.from_pretrained(str(out))
    ids = reloaded("The [MASK] sat.", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [tok("The [MASK] sat.")["input_ids"]]
    with torch.no_grad():
        assert BertForMaskedLM.from_pretrained(str(out))(input_ids=ids).logits.shape[-1] == len(tok)
