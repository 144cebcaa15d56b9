"""Bad files and directories: each gives one `error:` line naming the setting (or file) and the value, exit
status 2, and nothing written. Checked in process (``problems``), and end to end through the command line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from ctcd_ds.checks import problems
from ctcd_ds.config import ExperimentConfig, FinetuneConfig, PretrainConfig, TaskConfig, load_config
from ctcd_ds.errors import UserError
from ctcd_ds.task_data import load_splits, read_file
from ctcd_ds.tokenizer import load_tokenizer

from conftest import PYTHON, run_cli

MIB = 1 << 20


def cli_error(args: list[str], out: Path) -> str:
    """Run ``ctcd_ds.cli ARGS``: exit status 2, exactly one `error:` line, no traceback, ``out`` not written.
    Returns the error line."""
    result = run_cli([PYTHON, "-m", "ctcd_ds.cli", *args], timeout=300)
    report = f"rc={result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, report
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, report
    assert "Traceback" not in result.stderr, report
    assert not out.exists(), f"{out} was written before the error was reported\n{report}"
    return errors[0]


def pretrain_problems(overrides: list[str]) -> list[str]:
    return problems(load_config(None, overrides, PretrainConfig))


# --------------------------------------------------------------------------------------------------
# output_dir


def test_output_dir_that_cannot_be_written(tmp_path):
    """Even root cannot create files in /proc or /sys: found by creating (and at once dropping) a file in the
    nearest existing ancestor, not by permission bits (which say yes to root)."""
    assert pretrain_problems(["--output_dir=/sys/ctcd_test/run"]) == [
        "output_dir=/sys/ctcd_test/run: cannot create files in /sys (Permission denied)"
    ]
    assert pretrain_problems(["--output_dir=/proc/ctcd_test"]) == [
        "output_dir=/proc/ctcd_test: cannot create files in /proc (No such file or directory)"
    ]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert pretrain_problems([f"--output_dir={afile}"]) == [f"output_dir={afile}: exists and is not a directory"]
    assert pretrain_problems([f"--output_dir={afile}/run"]) == [
        f"output_dir={afile}/run: {afile} is a file, not a directory"
    ]
    finetune = problems(load_config(None, ["--output_dir=/sys/ctcd_test/ft"], FinetuneConfig))
    assert "output_dir=/sys/ctcd_test/ft: cannot create files in /sys (Permission denied)" in finetune
    experiment = problems(load_config(None, ["--output_dir=/sys/ctcd_test/exp"], ExperimentConfig))
    assert experiment == ["output_dir=/sys/ctcd_test/exp: cannot create files in /sys (Permission denied)"]
    # a writable output_dir passes, and the probe leaves nothing behind
    (tmp_path / "existing").mkdir()
    for out in (tmp_path / "existing", tmp_path / "new" / "run"):
        assert pretrain_problems([f"--output_dir={out}"]) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "existing"]
    assert list((tmp_path / "existing").iterdir()) == []


@pytest.mark.parametrize("case", ["unwritable", "a_file"])
def test_cli_output_dir_exits_2(case, tiny, tmp_path):
    if case == "unwritable":
        out = Path("/sys/ctcd_test/run")
        expected = f"error: output_dir={out}: cannot create files in /sys (Permission denied)"
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "run"
        expected = f"error: output_dir={out}: {tmp_path / 'afile'} is a file, not a directory"
    assert cli_error(["pretrain", *tiny, f"--output_dir={out}"], out) == expected


# --------------------------------------------------------------------------------------------------
# corpora: UTF-8 text, not binary


def corpus_problems(tmp_path, content: bytes, name: str = "corpus.txt") -> list[str]:
    corpus = tmp_path / name
    corpus.write_bytes(content)
    return pretrain_problems([f"--output_dir={tmp_path / 'run'}", f"--data.train_files={corpus}"])


def test_corpus_not_utf8(tmp_path):
    corpus = tmp_path / "corpus.txt"
    assert corpus_problems(tmp_path, "café au lait\n".encode("latin-1")) == [
        f"data.train_files: {corpus}: not UTF-8 text (invalid byte 0xe9 at byte 3)"
    ]
    # the offset counts from the file's start across read chunks; a character split by a chunk boundary is fine
    text = b"a" * (MIB - 1) + "é".encode() + b"b" * MIB
    assert corpus_problems(tmp_path, text + b"\n") == []
    assert corpus_problems(tmp_path, text + b"\x80 end\n") == [
        f"data.train_files: {corpus}: not UTF-8 text (invalid byte 0x80 at byte {len(text)})"
    ]
    # a character cut off by the end of the file
    assert corpus_problems(tmp_path, b"line\n\xe2\x82") == [
        f"data.train_files: {corpus}: not UTF-8 text (invalid byte 0xe2 at byte 5)"
    ]
    assert corpus_problems(tmp_path, "text\n".encode("utf-16")) == [
        f"data.train_files: {corpus}: not UTF-8 text (UTF-16, by its byte-order mark; save it as UTF-8)"
    ]


def test_corpus_binary(tmp_path):
    corpus = tmp_path / "corpus.txt"
    assert corpus_problems(tmp_path, b"text\n\x00\x01\x02\x03\n") == [
        f"data.train_files: {corpus}: a binary file (NUL bytes), not text"
    ]
    # NUL bytes are looked for in the whole file (the UTF-8 decoding covers the first MiBs)
    assert corpus_problems(tmp_path, b"text\n" * (5 * MIB) + b"\x00\x00\n") == [
        f"data.train_files: {corpus}: a binary file (NUL bytes), not text"
    ]
    # eval files too; an empty file is still reported as such
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"\n  \n")
    assert pretrain_problems(
        [f"--output_dir={tmp_path / 'run'}", f"--data.train_files={empty}", f"--data.eval_files={binary}"]
    ) == [
        f"data.train_files: {empty}: the file has no text (empty corpus)",
        f"data.eval_files: {binary}: a binary file (NUL bytes), not text",
    ]
    assert corpus_problems(tmp_path, b"") == [f"data.train_files: {corpus}: the file has no text (empty corpus)"]


def test_compressed_corpus_is_checked_decompressed(tmp_path):
    """`datasets` reads gzip/bz2/xz corpora: their compressed bytes are not text, their contents must be."""
    assert corpus_problems(tmp_path, gzip.compress(b"plain text\n" * 100), "corpus.txt.gz") == []
    assert corpus_problems(tmp_path, gzip.compress("café\n".encode("latin-1")), "corpus.txt.gz") == [
        f"data.train_files: {tmp_path / 'corpus.txt.gz'}: not UTF-8 text (invalid byte 0xe9 at byte 3)"
    ]


@pytest.mark.parametrize("case", ["latin1", "binary"])
def test_cli_bad_corpus_exits_2(case, tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    if case == "latin1":
        corpus.write_bytes("naïve text\n".encode("latin-1") * 50)
        expected = f"error: data.train_files: {corpus}: not UTF-8 text (invalid byte 0xef at byte 2)"
    else:
        corpus.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64)
        expected = f"error: data.train_files: {corpus}: a binary file (NUL bytes), not text"
    out = tmp_path / "never_written"
    assert cli_error(["pretrain", *tiny, f"--output_dir={out}", f"--data.train_files={corpus}"], out) == expected


# --------------------------------------------------------------------------------------------------
# fine-tuning TSV/CSV rows with more cells than the header


def test_row_with_more_columns_than_header(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\na fine film\t1\nnot\tgood\t0\n")  # a stray tab: the label would be 'good'
    with pytest.raises(UserError) as exc:
        read_file(str(tsv), TaskConfig(), "classification", "task.train_file")
    assert exc.value.problems == [f"{tsv}:3: the row has 3 columns, the header has 2 (a stray tab or comma?)"]
    csv_file = tmp_path / "dev.csv"
    csv_file.write_text('sentence,label\n"quoted, comma",1\nbad, comma,0\n')
    with pytest.raises(UserError) as exc:
        read_file(str(csv_file), TaskConfig(), "classification", "task.dev_file")
    assert exc.value.problems == [f"{csv_file}:3: the row has 3 columns, the header has 2 (a stray tab or comma?)"]
    # without a header row, the first row sets the number of columns
    tsv.write_text("a fine film\t1\nnot\tgood\t0\n")
    cfg = TaskConfig(header=False, text_columns=["0"], label_column="1")
    with pytest.raises(UserError) as exc:
        read_file(str(tsv), cfg, "classification", "task.train_file")
    assert exc.value.problems == [f"{tsv}:2: the row has 3 columns, the first row has 2 (a stray tab or comma?)"]
    # empty cells after the last column shift nothing (a trailing tab): accepted
    tsv.write_text("sentence\tlabel\na fine film\t1\t\nbad\t0\n")
    assert read_file(str(tsv), TaskConfig(), "classification", "task.train_file").labels == ["1", "0"]
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nfine\t1\n")
    tsv.write_text("sentence\tlabel\nfine\t1\nnot\tgood\t0\n")
    with pytest.raises(UserError):
        load_splits(TaskConfig(train_file=str(tsv), dev_file=str(dev)))


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny masked LM with the test tokenizer (an `export/NAME` directory)."""
    out = tmp_path_factory.mktemp("mlm") / "model"
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    return out


def test_cli_finetune_stray_tab_exits_2(mlm_dir, tmp_path):
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\nnot\tgood\t0\n")
    dev.write_text("sentence\tlabel\nfine\t1\ndull\t0\n")
    out = tmp_path / "never_written"
    overrides = [
        f"--output_dir={out}",
        f"--members.model.model={mlm_dir}",
        f"--task.train_file={train}",
        f"--task.dev_file={dev}",
        "--task.seq_len=16",
        "--train.micro_batch_size=2",
        "--train.steps=1",
    ]
    expected = f"{train}:4: the row has 3 columns, the header has 2 (a stray tab or comma?)"
    assert problems(load_config(None, overrides, FinetuneConfig)) == [expected]
    assert cli_error(["finetune", *overrides], out) == f"error: {expected}"
