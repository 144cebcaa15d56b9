"""`ctcd-ds prepare-data` and `data.prepared`: blocks tokenized once and read by every run, through the real
code path on small slices of the bundled WikiText-2 text.

Covers: a run on prepared blocks trains exactly as one tokenizing the text (and reads no text); the blocks do
not depend on `data.num_proc` and nothing goes to the `datasets` cache; a seq_len or tokenizer mismatch is a
user error naming both values; finished prepared data is never overwritten by accident; an interrupted
preparation is never taken for prepared data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import datasets
import pytest
import torch

from ctcd_ds import cli
from ctcd_ds.assets import BUNDLED_EVAL, BUNDLED_TRAIN
from ctcd_ds.checks import problems
from ctcd_ds.config import DataConfig, load_config
from ctcd_ds.data import load_blocks
from ctcd_ds.errors import UserError
from ctcd_ds.prepare import prepare_data
from ctcd_ds.prepared import TOKENIZER, tokenizer_fingerprint
from ctcd_ds.tokenizer import load_tokenizer, train_tokenizer

from conftest import MINI, PYTHON, read_metrics, run, run_cli, train_losses


def _corpus(tmp_path):
    """A corpus of its own (the bundled valid text, copied): a run that ignored data.prepared and read the
    default corpus would train on other blocks."""
    corpus = tmp_path / "corpus.txt"
    shutil.copy(BUNDLED_EVAL[0], corpus)
    return corpus


def _listing(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _prepare(out, tokenizer_dir, *extra) -> int:
    return cli.main(["prepare-data", f"--out={out}", f"--tokenizer.path={tokenizer_dir}", "--data.seq_len=32", *extra])


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, tokenizer_dir):
    """The bundled corpus prepared into 32-token blocks with the test tokenizer (shared, never modified)."""
    out = tmp_path_factory.mktemp("prepared") / "blocks"
    assert _prepare(out, tokenizer_dir) == 0
    return out


def test_prepared_run_trains_exactly_as_tokenizing_the_text(tmp_path, tokenizer_dir, monkeypatch):
    corpus = _corpus(tmp_path)
    text = [f"--data.train_files=[{corpus}]"]  # no eval files: the held-out split is drawn with the seed
    mini = [*MINI, "--train.log_every=1", "--seed=5"]
    prepared = tmp_path / "prepared"
    assert _prepare(prepared, tokenizer_dir, *text, "--seed=5") == 0  # the run's seed: its held-out split
    before = _listing(prepared)

    _, on_the_fly = run([*mini, f"--output_dir={tmp_path / 'text'}", f"--tokenizer.path={tokenizer_dir}", *text])
    corpus.unlink()  # a node with the prepared blocks needs no text
    # through the command line, with no tokenizer.path: the run must take the tokenizer saved with the blocks
    monkeypatch.setattr(cli.dist, "cleanup", lambda: None)  # keep this process's group for other in-process runs
    out = tmp_path / "prepared_run"
    assert cli.main(["pretrain", *mini, f"--output_dir={out}", f"--data.prepared={prepared}"]) == 0

    assert load_config(str(out / "config.yaml")).tokenizer.path == str(prepared / TOKENIZER)
    for member in ("teacher", "student"):
        assert train_losses(out, member) == train_losses(on_the_fly, member)
        assert len(train_losses(out, member)) == 2
    evals = [{k: v for k, v in m.items() if k.startswith("eval/")} for m in read_metrics(out)]
    assert evals == [{k: v for k, v in m.items() if k.startswith("eval/")} for m in read_metrics(on_the_fly)]
    assert any(evals)
    assert _listing(prepared) == before  # read only: the directory can be shared by every run and node


def test_blocks_are_the_same_for_any_num_proc_and_prepared(tmp_path, tokenizer_dir, monkeypatch):
    tok = load_tokenizer(tokenizer_dir)
    corpus = _corpus(tmp_path)
    data = DataConfig(train_files=[str(corpus)], seq_len=32)
    procs = []
    real_map = datasets.Dataset.map

    def map_spy(self, *args, **kwargs):
        procs.append(kwargs.get("num_proc"))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", map_spy)
    # separate caches: each num_proc really tokenizes
    one = load_blocks(dataclasses.replace(data, num_proc=1, cache_dir=str(tmp_path / "c1")), tok, seed=3)
    assert 2 not in procs
    two = load_blocks(dataclasses.replace(data, num_proc=2, cache_dir=str(tmp_path / "c2")), tok, seed=3)
    assert 2 in procs  # the tokenizing map ran in 2 processes

    cache = tmp_path / "datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    cfg = load_config(
        "ctcd",
        [
            f"--data.train_files=[{corpus}]",
            "--data.seq_len=32",
            "--data.num_proc=2",
            f"--tokenizer.path={tokenizer_dir}",
        ],
    )
    cfg.seed = 3
    prepared = tmp_path / "prepared"
    prepare_data(cfg, prepared)
    assert not list(cache.rglob("*.arrow")), "preparing wrote into the datasets cache"
    assert sorted(os.listdir(prepared)) == ["eval", "manifest.json", "tokenizer", "train"]  # no work files left
    from_dir = load_blocks(
        DataConfig(prepared=str(prepared), seq_len=32), tok, seed=99
    )  # the split is the prepared one

    for name, a, b, c in zip(("train", "held out"), one, two, from_dir):
        assert len(a) > 10, name
        assert torch.equal(a[:]["input_ids"], b[:]["input_ids"]), name
        assert torch.equal(a[:]["input_ids"], c[:]["input_ids"]), name
    assert all(f["filename"].startswith(str(prepared)) for f in from_dir[0].cache_files)  # memory-mapped from it
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["blocks"] == {"train": len(one[0]), "eval": len(one[1])}
    assert manifest["token_dtype"] == "uint16" and 2 <= manifest["bytes_per_token"] < 2.2


def test_a_mismatched_seq_len_or_tokenizer_is_a_user_error_naming_both(tmp_path, tokenizer_dir, prepared_dir):
    other = tmp_path / "other_tokenizer"  # same size, other pieces and scores: only a fingerprint tells them apart
    train_tokenizer(BUNDLED_TRAIN, other, vocab_size=1000, max_sentences=1000)
    assert len(load_tokenizer(other)) == len(load_tokenizer(tokenizer_dir))
    ours, theirs = tokenizer_fingerprint(load_tokenizer(other)), tokenizer_fingerprint(load_tokenizer(tokenizer_dir))
    assert ours != theirs

    out = tmp_path / "never_written"
    args = [*MINI, f"--output_dir={out}", f"--data.prepared={prepared_dir}", f"--tokenizer.path={other}"]
    found = problems(load_config("ctcd", [*args, "--data.seq_len=64"]))
    seq = [p for p in found if p.startswith("data.seq_len=64:")]
    assert len(seq) == 1 and "holds 32-token blocks" in seq[0], found
    tok = [p for p in found if p.startswith(f"tokenizer.path={other}:")]
    assert len(tok) == 1 and ours in tok[0] and theirs in tok[0] and str(prepared_dir / TOKENIZER) in tok[0], found

    assert cli.main(["pretrain", *args]) == 2  # the command line: exit 2 before anything is written
    assert not out.exists()
    with pytest.raises(UserError, match=theirs):  # and at startup, whichever way the run got its tokenizer
        load_blocks(DataConfig(prepared=str(prepared_dir), seq_len=32), load_tokenizer(other), seed=0)
    # the same tokenizer from anywhere, and the same seq_len: nothing to say
    good = load_config(
        "ctcd", [*MINI, f"--output_dir={out}", f"--data.prepared={prepared_dir}", f"--tokenizer.path={tokenizer_dir}"]
    )
    assert not [p for p in problems(good) if "prepared" in p], problems(good)


def test_prepare_never_overwrites_by_accident(tmp_path, tokenizer_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not blocks")
    for extra in ([], ["--overwrite"]):  # a directory that is not prepared data is never replaced
        assert _prepare(mine, tokenizer_dir, *extra) == 2
        assert "error: --out=" in capsys.readouterr().err
        assert os.listdir(mine) == ["notes.txt"]

    out = tmp_path / "blocks"
    assert _prepare(out, tokenizer_dir) == 0
    written = _listing(out)
    capsys.readouterr()
    assert _prepare(out, tokenizer_dir) == 0  # the same settings again: nothing to do, nothing rewritten
    assert "nothing to do" in capsys.readouterr().out
    assert _listing(out) == written

    assert _prepare(out, tokenizer_dir, "--data.seq_len=64") == 2  # other settings: refused ...
    err = capsys.readouterr().err
    assert "seq_len 32 there, 64 now" in err and "--overwrite" in err
    assert _listing(out) == written
    assert _prepare(out, tokenizer_dir, "--data.seq_len=64", "--overwrite") == 0  # ... unless asked
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 64
    assert sorted(os.listdir(tmp_path)) == ["blocks", "mine"]  # no partial or replaced copies left


CRASH_AFTER_BLOCKS = """
import os, sys
from ctcd_ds import cli, prepare
real = prepare.write_blocks
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os._exit(9)  # killed with the blocks written, before the tokenizer and the manifest
prepare.write_blocks = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_an_interrupted_preparation_is_not_taken_as_prepared(tmp_path, tokenizer_dir):
    out = tmp_path / "blocks"
    args = ["prepare-data", f"--out={out}", f"--tokenizer.path={tokenizer_dir}", "--data.seq_len=32"]
    result = run_cli([PYTHON, "-c", CRASH_AFTER_BLOCKS, *args], timeout=300)
    assert result.returncode == 9, result.stderr[-3000:]
    assert not out.exists()
    (partial,) = tmp_path.glob(".blocks.partial-*")
    assert (partial / "train" / "state.json").is_file()  # the blocks are there, the manifest is not

    tok = load_tokenizer(tokenizer_dir)
    for directory, reason in ((out, "no such directory"), (partial, "not a prepared data directory")):
        found = problems(load_config("ctcd", [*MINI, f"--data.prepared={directory}", f"--output_dir={tmp_path / 'r'}"]))
        assert [p for p in found if p.startswith(f"data.prepared={directory}: {reason}")], found
        with pytest.raises(UserError, match=reason):
            load_blocks(DataConfig(prepared=str(directory), seq_len=32), tok, seed=0)

    assert cli.main(args) == 0  # preparing again removes the dead process's leftover
    assert sorted(os.listdir(tmp_path)) == ["blocks"]
    assert not [p for p in problems(load_config("ctcd", [*MINI, f"--data.prepared={out}"])) if "prepared" in p]


def test_prepare_data_benchmark_quick():
    """The benchmark script runs (``--quick``: a 2 MB corpus) and each num_proc writes the same number of tokens."""
    result = run_cli([PYTHON, "benchmarks/prepare_data.py", "--quick"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tok/s/proc" in result.stdout and "free cores for tokenizing" in result.stdout
    summary = json.loads(result.stdout.splitlines()[-1])
    assert [r["num_proc"] for r in summary["rows"]] == [1, 2]
    assert len({r["tokens"] for r in summary["rows"]}) == 1 and summary["rows"][0]["tokens"] > 0
