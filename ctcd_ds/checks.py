"""Check a whole config before anything is written; report every problem at once.

``problems(cfg)`` returns one ``setting=value: reason`` line per problem; ``check(cfg)`` raises them as one
:class:`~ctcd_ds.errors.UserError`. Choices (``Literal`` settings) and types were checked when the config
was built. This module imports nothing that imports DeepSpeed, so checking is fast and safe anywhere.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoConfig

from ctcd_ds import ds_config, prepared
from ctcd_ds.assets import corpus_files
from ctcd_ds.config import ExperimentConfig, FinetuneConfig, PretrainConfig
from ctcd_ds.errors import UserError
from ctcd_ds.graph import VIEW_SEP
from ctcd_ds.layout import checkpoints, is_checkpoint, is_checkpoint_member
from ctcd_ds.presets import PRESETS, is_pretrained_path, model_config, remap_problems, weight_dirs
from ctcd_ds.pruning.widths import target_problems, widths_at_sparsity, widths_of
from ctcd_ds.task_data import GLUE, glue_problem, load_splits, task_kind
from ctcd_ds.tokenizer import MIN_VOCAB_SIZE, has_tokenizer, load_tokenizer, pretrained_tokenizer_source

_CHUNK = 1 << 20
_DECODE_HEAD = 16 << 20
"""Corpora can be many GB, and every rank checks them at every start. So a corpus is read in 1 MiB chunks: the
first 16 MiB are decoded as UTF-8 (a file in another encoding shows it there), and the whole file is streamed for
NUL bytes (a memchr per chunk, GB/s: finds binary files and NUL-filled tails that would be trained on as text).
An invalid byte after the first 16 MiB is left to the reader (`datasets` stops there with a UnicodeDecodeError)."""
_DECOMPRESS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
"""`datasets` reads compressed corpora: these are checked decompressed (the first 16 MiB only: slow to stream)."""
_UNCHECKED = (b"(\xb5/\xfd", b"PK\x03\x04", b"7z\xbc\xaf\x27\x1c", b"\x04\x22\x4d\x18")
"""zstd, zip, 7z, lz4: also read by `datasets` (with extra packages); their content is not checked here."""


def _utf8_problem(data: bytes, offset: int, final: bool) -> tuple[str | None, bytes]:
    """(problem or None, the undecoded tail: a character the next chunk completes) of ``data`` at ``offset``."""
    try:
        _, used = codecs.utf_8_decode(data, "strict", final)
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at byte {offset + exc.start})", b""
    return None, data[used:]


def _text_problem(fh, whole: bool) -> str | None:
    """The problem of a binary stream that should hold UTF-8 text, or None; ``whole``: scan it all for NULs."""
    pos, pending, has_text = 0, b"", False
    while chunk := fh.read(_CHUNK):
        if pos == 0 and chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "not UTF-8 text (UTF-16, by its byte-order mark; save it as UTF-8)"
        if b"\0" in chunk:
            return "a binary file (NUL bytes), not text"
        if pos < _DECODE_HEAD:
            problem, pending = _utf8_problem(pending + chunk, pos - len(pending), final=False)
            if problem:
                return problem
        has_text = has_text or bool(chunk.strip())
        pos += len(chunk)
        if pos >= _DECODE_HEAD and has_text and not whole:
            break
    if pending and pos <= _DECODE_HEAD:  # the file ends inside a character
        return _utf8_problem(pending, pos - len(pending), final=True)[0]
    return None if has_text else "the file has no text (empty corpus)"


def _text_file_problem(flag: str, path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return f"{flag}: {path}: no such file"
    try:
        with open(p, "rb") as fh:
            magic = fh.read(6)
            if magic.startswith(_UNCHECKED):
                return None
            opener = next((o for m, o in _DECOMPRESS.items() if magic.startswith(m)), None)
            if opener is None:
                fh.seek(0)
                problem = _text_problem(fh, whole=True)
            else:
                with opener(p, "rb") as inner:
                    problem = _text_problem(inner, whole=False)
    except (OSError, EOFError, lzma.LZMAError) as exc:  # unreadable, or a broken compressed file
        problem = f"cannot read it: {exc}"
    return f"{flag}: {path}: {problem}" if problem else None


def _member_problems(cfg: PretrainConfig, problems: list[str]) -> dict[str, object]:
    """Per-member checks; returns ``{flag: transformers config}`` of every pretrained directory that loaded."""
    hf_configs: dict[str, object] = {}
    if not cfg.members:
        problems.append("members: a run needs at least one member")
    for flag, directory in weight_dirs(cfg.members).items():
        if not (Path(directory) / "config.json").is_file():
            hint = f"neither a preset ({', '.join(PRESETS)}) nor" if flag.endswith(".model") else "not"
            problems.append(f"{flag}={directory}: {hint} a model directory with config.json")
            continue
        try:
            hf_configs[flag] = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            problems.append(f"{flag}={directory}: cannot read its config: {exc}")
    for name, m in cfg.members.items():
        flag = f"members.{name}"
        if VIEW_SEP in name:
            problems.append(
                f"{flag}: member names must not contain '{VIEW_SEP}' (it names sandwich sub-networks, e.g. "
                f"student{VIEW_SEP}0.5)"
            )
        if not is_pretrained_path(m.model) and not m.trainable:
            problems.append(
                f"{flag}.trainable=false: a frozen member needs pretrained weights, but model={m.model} is a preset "
                "(give a model directory)"
            )
        if m.init_from and is_pretrained_path(m.model):
            problems.append(
                f"{flag}.init_from={m.init_from}: remapping builds a preset from a smaller model, but "
                f"model={m.model} is already pretrained"
            )
        elif f"{flag}.init_from" in hf_configs:
            source = hf_configs[f"{flag}.init_from"]
            target = model_config(m.model, vocab_size=source.vocab_size, pad_token_id=0)
            problems.extend(remap_problems(f"{flag}.init_from={m.init_from}", target, source))
        if m.lr <= 0:
            problems.append(f"{flag}.lr={m.lr}: must be > 0")
        if m.weight_decay < 0:
            problems.append(f"{flag}.weight_decay={m.weight_decay}: must be >= 0")
        for beta in ("beta1", "beta2"):
            if not 0 <= getattr(m, beta) < 1:
                problems.append(f"{flag}.{beta}={getattr(m, beta)}: must be in [0, 1)")
        if not 0 <= m.warmup_ratio < 1:
            problems.append(f"{flag}.warmup_ratio={m.warmup_ratio}: must be in [0, 1)")
    if cfg.members and not any(m.trainable for m in cfg.members.values()):
        problems.append("members: no member is trainable; nothing to train")
    return hf_configs


def _edge_problems(cfg: PretrainConfig, problems: list[str]) -> None:
    seen = Counter((e.source, e.target) for e in cfg.edges)
    for i, e in enumerate(cfg.edges):
        flag = f"edges.{i}"
        for end in ("source", "target"):
            if getattr(e, end) not in cfg.members:
                problems.append(
                    f"{flag}.{end}={getattr(e, end)}: no member of that name (members: {', '.join(cfg.members)})"
                )
        if e.source == e.target:
            problems.append(f"{flag}: source and target are both {e.source}; an edge joins two members")
        elif e.target in cfg.members and not cfg.members[e.target].trainable:
            problems.append(
                f"{flag}.target={e.target}: that member is frozen and cannot learn; make it the source or set "
                f"members.{e.target}.trainable=true"
            )
        if e.weight < 0:
            problems.append(f"{flag}.weight={e.weight}: must be >= 0")
        if e.temperature <= 0:
            problems.append(f"{flag}.temperature={e.temperature}: must be > 0")
        if e.schedule == "constant" and (e.schedule_end != 1.0 or e.final_weight != 1.0):
            problems.append(
                f"{flag}.schedule=constant: final_weight={e.final_weight} / schedule_end={e.schedule_end} would "
                "have no effect; choose linear, cosine or step"
            )
        elif not 0 < e.schedule_end <= 1:
            problems.append(f"{flag}.schedule_end={e.schedule_end}: a fraction of train.steps, in (0, 1]")
        elif e.schedule != "constant" and round(e.schedule_end * cfg.train.steps) < 1:
            problems.append(
                f"{flag}.schedule_end={e.schedule_end}: with train.steps={cfg.train.steps} the schedule would "
                "end before the first step"
            )
        if e.final_weight < 0:
            problems.append(f"{flag}.final_weight={e.final_weight}: must be >= 0")
        if seen[(e.source, e.target)] > 1:
            problems.append(f"{flag}: the edge {e.source}->{e.target} is given {seen[(e.source, e.target)]} times")


def _architecture(m, hf_configs: dict[str, object], name: str):
    """The transformers config of a member's model (preset or loaded directory), or None if unknown."""
    if not is_pretrained_path(m.model):
        return model_config(m.model, vocab_size=8, pad_token_id=0)
    return hf_configs.get(f"members.{name}.model")


def _structure_problems(cfg: PretrainConfig, hf_configs: dict[str, object], problems: list[str]) -> None:
    """HomoDistil pruning, MiniDisc selection and hidden-state edges: settings the model shapes decide."""
    zero3 = (
        not ds_config.template_problems(cfg.deepspeed.template)
        and ds_config.zero_stage(ds_config.load_template(cfg.deepspeed.template)) == 3
    )
    for name, m in cfg.members.items():
        flag = f"members.{name}"
        arch = _architecture(m, hf_configs, name)
        p, md = m.prune, m.minidisc
        uses = [
            k
            for k, on in (
                ("prune", p.enabled),
                ("minidisc.sparsities", md.sparsities),
                ("minidisc.sandwich", md.sandwich),
            )
            if on
        ]
        if uses and not m.trainable:
            problems.append(
                f"{flag}.trainable=false: {uses[0]} shapes the member while it trains; it must be trainable"
            )
        if len(uses) > 1:
            problems.append(f"{flag}: {' and '.join(uses)} cannot be combined; choose one")
        if (p.enabled or md.sandwich) and zero3:
            problems.append(
                f"{flag}.{'prune' if p.enabled else 'minidisc.sandwich'}: masks and importance read whole "
                f"parameters, which needs ZeRO stage 0, 1 or 2; deepspeed.template={cfg.deepspeed.template} is ZeRO-3"
            )
        if uses and arch is not None and getattr(arch, "model_type", "bert") != "bert":
            problems.append(
                f"{flag}.{uses[0]}: structured pruning supports BERT models only, not model_type={arch.model_type}"
            )
        if md.sandwich and not all(0 < x < 1 for x in md.sandwich):
            problems.append(f"{flag}.minidisc.sandwich={md.sandwich}: each width sparsity must be in (0, 1)")
        for key, values in (("sparsities", md.sparsities), ("sandwich", md.sandwich)):
            if len(set(values)) != len(values):
                problems.append(f"{flag}.minidisc.{key}={values}: a sparsity is given twice")
            if arch is not None and getattr(arch, "model_type", "bert") == "bert":
                full = [x for x in values if 0 < x < 1 and widths_at_sparsity(arch, x) == widths_of(arch)]
                if full:
                    problems.append(
                        f"{flag}.minidisc.{key}: sparsity {full[0]} keeps every head and FFN neuron of this model "
                        "(too small to prune anything)"
                    )
        if md.sandwich and not any(e.target == name for e in cfg.edges):
            problems.append(
                f"{flag}.minidisc.sandwich={md.sandwich}: the sub-networks only average incoming KD losses, and no "
                f"edge targets {name}"
            )
        if p.hidden_size < 0 or p.intermediate_size < 0:
            problems.append(
                f"{flag}.prune: hidden_size={p.hidden_size}, intermediate_size={p.intermediate_size}: must be >= 0 "
                "(0 = keep)"
            )
        if p.enabled:
            if arch is not None:
                problems.extend(
                    target_problems(
                        f"{flag}.prune",
                        arch,
                        p.hidden_size or arch.hidden_size,
                        p.intermediate_size or arch.intermediate_size,
                    )
                )
            if not 0 <= p.start < 1:
                problems.append(f"{flag}.prune.start={p.start}: must be in [0, 1)")
            if not p.start < p.end <= 1:
                problems.append(f"{flag}.prune.end={p.end}: must be in (prune.start={p.start}, 1]")
            elif round(p.end * cfg.train.steps) <= round(p.start * cfg.train.steps):
                problems.append(
                    f"{flag}.prune.end={p.end}: with train.steps={cfg.train.steps} pruning would have no step to run "
                    "(start and end round to the same step)"
                )
            if p.every < 1:
                problems.append(f"{flag}.prune.every={p.every}: must be >= 1")
            if not 0 <= p.ema < 1:
                problems.append(f"{flag}.prune.ema={p.ema}: must be in [0, 1)")
        if md.sparsities:
            bad = [s for s in md.sparsities if not 0 < s < 1]
            if bad:
                problems.append(f"{flag}.minidisc.sparsities={md.sparsities}: each must be in (0, 1)")
            if md.lam < 0:
                problems.append(f"{flag}.minidisc.lam={md.lam}: must be >= 0")
            if md.batches < 1:
                problems.append(f"{flag}.minidisc.batches={md.batches}: must be >= 1")
    for i, e in enumerate(cfg.edges):
        if e.hidden_weight < 0:
            problems.append(f"edges.{i}.hidden_weight={e.hidden_weight}: must be >= 0")
        if e.hidden_weight <= 0 or e.source not in cfg.members or e.target not in cfg.members:
            continue
        if any(cfg.members[n].minidisc.sparsities for n in (e.source, e.target)):
            problems.append(
                f"edges.{i}.hidden_weight={e.hidden_weight}: a MiniDisc member's hidden size is chosen at run time; "
                "hidden-state MSE needs equal, known sizes"
            )
            continue
        sizes = [
            getattr(_architecture(cfg.members[n], hf_configs, n), "hidden_size", None) for n in (e.source, e.target)
        ]
        if None not in sizes and sizes[0] != sizes[1]:
            problems.append(
                f"edges.{i}.hidden_weight={e.hidden_weight}: {e.source} (hidden {sizes[0]}) and {e.target} (hidden "
                f"{sizes[1]}) differ; hidden-state MSE needs equal hidden sizes (a member pruned while training "
                "keeps its full width)"
            )


def _data_problems(cfg: PretrainConfig, problems: list[str]) -> None:
    d = cfg.data
    train_files, eval_files = corpus_files(d)
    if d.dataset and d.train_files:
        problems.append(f"data.dataset={d.dataset}: give either data.dataset or data.train_files, not both")
    for flag, files in (("data.train_files", train_files), ("data.eval_files", eval_files)):
        if not d.prepared:  # prepared blocks replace the text: it is not read (nor scanned at every start)
            problems.extend(p for p in (_text_file_problem(flag, f) for f in files) if p)
    if d.seq_len < 8:
        problems.append(f"data.seq_len={d.seq_len}: must be >= 8")
    if not 0 < d.mlm_probability < 1:
        problems.append(f"data.mlm_probability={d.mlm_probability}: must be in (0, 1)")
    if not 0 <= d.eval_fraction < 1:
        problems.append(f"data.eval_fraction={d.eval_fraction}: must be in [0, 1)")
    if d.max_train_blocks < 0:
        problems.append(f"data.max_train_blocks={d.max_train_blocks}: must be >= 0")
    if d.num_workers < 0:
        problems.append(f"data.num_workers={d.num_workers}: must be >= 0")
    if d.num_proc < 0:
        problems.append(f"data.num_proc={d.num_proc}: must be >= 0 (0 = auto)")
    problems.extend(prepared.run_problems(cfg))


def _vocab_problems(cfg: PretrainConfig, hf_configs: dict[str, object], problems: list[str]) -> None:
    t = cfg.tokenizer
    if t.path and not has_tokenizer(t.path):
        problems.append(f"tokenizer.path={t.path}: no tokenizer files there")
        return
    if t.vocab_size < MIN_VOCAB_SIZE:  # 5 special tokens + 256 byte pieces + 64
        problems.append(f"tokenizer.vocab_size={t.vocab_size}: must be >= {MIN_VOCAB_SIZE}")
    if t.max_sentences <= 0:
        problems.append(f"tokenizer.max_sentences={t.max_sentences}: must be > 0")
    dirs = weight_dirs(cfg.members)
    source = pretrained_tokenizer_source(t.path, list(dirs.values()))
    vocab = None
    if source:
        try:
            vocab = len(load_tokenizer(source))
        except (OSError, ValueError) as exc:
            problems.append(f"tokenizer: cannot load the tokenizer in {source}: {exc}")
    elif hf_configs:
        problems.append(
            f"tokenizer.path: empty, and the pretrained {', '.join(hf_configs)} carry no tokenizer; give the "
            "tokenizer they were trained with"
        )
    for flag, hf in hf_configs.items():
        member_vocab = getattr(hf, "vocab_size", None)
        if vocab is not None and member_vocab != vocab:
            problems.append(
                f"{flag}={dirs[flag]}: vocab_size={member_vocab} but the run's tokenizer ({source}) has {vocab} "
                "tokens; all members must share one vocabulary"
            )
        max_pos = getattr(hf, "max_position_embeddings", None)
        if flag.endswith(".model") and max_pos is not None and cfg.data.seq_len > max_pos:
            problems.append(
                f"data.seq_len={cfg.data.seq_len}: exceeds {flag[: -len('.model')]} max_position_embeddings={max_pos}"
            )
    for name, m in cfg.members.items():
        if m.model in PRESETS and cfg.data.seq_len > PRESETS[m.model].max_positions:
            problems.append(
                f"data.seq_len={cfg.data.seq_len}: exceeds members.{name} ({m.model}) max positions "
                f"{PRESETS[m.model].max_positions}"
            )


def _train_problems(cfg: PretrainConfig | FinetuneConfig, problems: list[str]) -> None:
    tr = cfg.train
    for key in ("steps", "micro_batch_size", "grad_accum_steps", "log_every"):
        if getattr(tr, key) <= 0:
            problems.append(f"train.{key}={getattr(tr, key)}: must be > 0")
    if getattr(tr, "eval_batches", 0) < 0:
        problems.append(f"train.eval_batches={tr.eval_batches}: must be >= 0 (0 = the whole held-out split)")
    if tr.eval_every < 0:
        problems.append(f"train.eval_every={tr.eval_every}: must be >= 0")
    if tr.grad_clip < 0:
        problems.append(f"train.grad_clip={tr.grad_clip}: must be >= 0")
    if tr.peak_tflops < 0:
        problems.append(f"train.peak_tflops={tr.peak_tflops}: must be >= 0 (0 = look the device up)")
    if tr.precision in ("bf16", "fp16") and not torch.cuda.is_available():
        problems.append(
            f"train.precision={tr.precision}: needs a GPU; DeepSpeed runs on the CPU here (use fp32 or auto)"
        )


def _compile_problems(cfg: PretrainConfig | FinetuneConfig, problems: list[str]) -> None:
    if not cfg.train.compile:
        return
    if ds_config.zero_stage(ds_config.load_template(cfg.deepspeed.template)) == 3:
        problems.append(
            f"train.compile=true: not with deepspeed.template={cfg.deepspeed.template} (ZeRO-3): its per-module "
            "parameter hooks split the compiled graph (measured slower than eager); use a ZeRO-0/1/2 template"
        )
    for name, m in cfg.members.items():
        prune, minidisc = getattr(m, "prune", None), getattr(m, "minidisc", None)
        if (prune is not None and prune.enabled) or (minidisc is not None and minidisc.sandwich):
            problems.append(
                f"train.compile=true: not with members.{name}'s HomoDistil pruning or sandwich training (its masks "
                "change while it trains); set train.compile=false"
            )


def _loop_problems(cfg: PretrainConfig | FinetuneConfig, problems: list[str]) -> None:
    """The sections every training run has: train, deepspeed, checkpoint."""
    _train_problems(cfg, problems)
    problems.extend(ds_config.template_problems(cfg.deepspeed.template))
    if not ds_config.template_problems(cfg.deepspeed.template):
        _compile_problems(cfg, problems)
    if cfg.deepspeed.collective_timeout_s <= 0:
        problems.append(f"deepspeed.collective_timeout_s={cfg.deepspeed.collective_timeout_s}: must be > 0")
    _checkpoint_problems(cfg, problems)


def _checkpoint_problems(cfg: PretrainConfig | FinetuneConfig, problems: list[str]) -> None:
    c = cfg.checkpoint
    if c.every < 0:
        problems.append(f"checkpoint.every={c.every}: must be >= 0")
    if c.keep_last < 0:
        problems.append(f"checkpoint.keep_last={c.keep_last}: must be >= 0")
    if c.resume == "never":
        existing = checkpoints(cfg.output_dir)
        if existing:
            problems.append(
                f"checkpoint.resume=never: {cfg.output_dir} already holds checkpoint {existing[-1].name}; choose "
                "another output_dir (nothing is overwritten)"
            )
    elif c.resume != "auto" and not is_checkpoint(c.resume):
        problems.append(
            f"checkpoint.resume={c.resume}: not auto, never, or a checkpoint directory (one with trainer_state.json)"
        )


def output_problems(output_dir: str, problems: list[str], flag: str = "output_dir") -> None:
    if not output_dir:
        problems.append(f"{flag}: must not be empty")
        return
    out = Path(os.path.abspath(output_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        problems.append(f"{flag}={output_dir}: exists and is not a directory")
        return
    ancestor = next(p for p in (out, *out.parents) if os.path.exists(p))  # os.path: False, not raise, on EACCES
    if not os.path.isdir(ancestor):
        problems.append(f"{flag}={output_dir}: {ancestor} is a file, not a directory")
        return
    # Create (and at once drop) a file where the first directory would be made: permission bits say yes to
    # root even where nothing can be written (read-only mounts, /proc, /sys).
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        problems.append(f"{flag}={output_dir}: cannot create files in {ancestor} ({exc.strerror or exc})")


def pretrain_problems(cfg: PretrainConfig) -> list[str]:
    """Every problem of a pre-training config."""
    problems: list[str] = []
    output_problems(cfg.output_dir, problems)
    hf_configs = _member_problems(cfg, problems)
    _edge_problems(cfg, problems)
    _structure_problems(cfg, hf_configs, problems)
    _data_problems(cfg, problems)
    _vocab_problems(cfg, hf_configs, problems)
    _loop_problems(cfg, problems)
    return problems


def prepare_problems(cfg: PretrainConfig, out: str) -> list[str]:
    """Every problem of ``ctcd-ds prepare-data --out OUT`` with a pre-training config: its members (a pretrained
    member's tokenizer is the run's), data and tokenizer settings, and the output directory."""
    problems: list[str] = []
    output_problems(out, problems, flag="--out")
    if not problems:  # writable: it must also be new, empty, or prepared data
        problems.extend(prepared.out_problems(out))
    if cfg.data.prepared:
        problems.append(prepared.PREPARE_WRITES.format(cfg.data.prepared))
    hf_configs = _member_problems(cfg, problems)
    _data_problems(cfg, problems)
    _vocab_problems(cfg, hf_configs, problems)
    return problems


def finetune_problems(cfg: FinetuneConfig) -> list[str]:
    """Every problem of a fine-tuning config, its local data files included."""
    problems: list[str] = []
    output_problems(cfg.output_dir, problems)
    if not cfg.members:
        problems.append("members: give at least one model to fine-tune")
    vocab: dict[str, int] = {}
    for name, m in cfg.members.items():
        flag = f"members.{name}"
        if is_checkpoint_member(m.model):
            if not Path(m.model).is_dir():
                problems.append(f"{flag}.model={m.model}: the checkpoint has no member '{Path(m.model).name}'")
            continue
        if not (Path(m.model) / "config.json").is_file():
            problems.append(
                f"{flag}.model={m.model}: not a model directory (an export/NAME dir) nor a checkpoint member "
                "(checkpoints/step_N/NAME)"
            )
            continue
        hf = AutoConfig.from_pretrained(m.model)
        vocab[name] = hf.vocab_size
        if not m.trainable and not any(a.endswith("ForSequenceClassification") for a in (hf.architectures or [])):
            problems.append(
                f"{flag}.trainable=false: a frozen member must already be fine-tuned for the task (a sequence "
                f"classifier); {m.model} is not"
            )
        if not has_tokenizer(m.model):
            problems.append(f"{flag}.model={m.model}: no tokenizer in that directory")
    if len(set(vocab.values())) > 1:
        problems.append(
            f"members: vocabularies differ ({', '.join(f'{n}={v}' for n, v in vocab.items())}); co-distilled members "
            "must share one tokenizer"
        )
    if cfg.members and not any(m.trainable for m in cfg.members.values()):
        problems.append("members: no member is trainable; nothing to train")
    _edge_problems(cfg, problems)
    problems.extend(
        f"edges.{i}.hidden_weight={e.hidden_weight}: hidden-state MSE is for pre-training; fine-tuning distils class "
        "logits"
        for i, e in enumerate(cfg.edges)
        if e.hidden_weight
    )
    t = cfg.task
    if t.glue and t.glue not in GLUE:
        problems.append(f"task.glue={t.glue}: not a GLUE task ({', '.join(GLUE)})")
    if t.glue and (t.train_file or t.dev_file or t.test_file):
        problems.append(
            f"task.glue={t.glue}: give either a GLUE task or local files (task.train_file/dev_file/test_file), not both"
        )
    if (t.glue in GLUE or not t.glue) and cfg.edges and task_kind(t) == "regression":
        problems.append("edges: co-distillation on class logits needs a classification task (task.kind=regression)")
    if len(t.text_columns) not in (1, 2):
        problems.append(f"task.text_columns={t.text_columns}: give one column (single sentences) or two (pairs)")
    if bool(t.train_file) != bool(t.dev_file):
        problems.append("task.train_file / task.dev_file: give both local files, or neither (for the bundled SST-2)")
    if t.seq_len < 8:
        problems.append(f"task.seq_len={t.seq_len}: must be >= 8")
    for key in ("max_train_examples", "max_dev_examples"):
        if getattr(t, key) < 0:
            problems.append(f"task.{key}={getattr(t, key)}: must be >= 0")
    if not problems and not t.glue:  # read the files now: column, label and format problems name file and line
        try:
            load_splits(t)
        except UserError as exc:
            problems.extend(exc.problems)
    if t.glue in GLUE:  # not cached and no hub: say so in seconds (`datasets` would wait silently)
        problems.extend(filter(None, [glue_problem(t.glue)]))
    _loop_problems(cfg, problems)
    return problems


def experiment_problems(exp: ExperimentConfig) -> list[str]:
    """Every problem of an experiment config (each run it makes is checked again when it starts)."""
    problems: list[str] = []
    output_problems(exp.output_dir, problems)
    if any(v in exp.variants for v in ("kd", "community_kd")) and "standalone" not in exp.variants:
        problems.append("variants: kd and community_kd take their teacher from the standalone run; include standalone")
    for key in ("alpha", "alpha_final", "beta", "peer_weight"):
        if getattr(exp, key) < 0:
            problems.append(f"{key}={getattr(exp, key)}: edge weights must be >= 0")
    if exp.temperature <= 0:
        problems.append(f"temperature={exp.temperature}: must be > 0")
    for key, what in (("pretrain_seeds", "pre-training"), ("seeds", "fine-tuning")):
        seeds = getattr(exp, key)
        if not seeds:
            problems.append(f"{key}: give at least one {what} seed")
        elif len(set(seeds)) != len(seeds):
            problems.append(f"{key}={seeds}: a seed is given twice")
    for key in ("teacher", "student"):
        model = getattr(exp, key)
        if model and is_pretrained_path(model) and not (Path(model) / "config.json").is_file():
            problems.append(
                f"{key}={model}: neither a model preset ({', '.join(PRESETS)}) nor a model directory with a config.json"
            )
    for key in ("pretrain_steps", "pretrain_batch", "pretrain_seq_len", "finetune_steps", "pretrain_lr", "finetune_lr"):
        if getattr(exp, key) <= 0:
            problems.append(f"{key}={getattr(exp, key)}: must be > 0")
    return problems


_PROBLEMS = {
    PretrainConfig: pretrain_problems,
    FinetuneConfig: finetune_problems,
    ExperimentConfig: experiment_problems,
}


def problems(cfg: PretrainConfig | FinetuneConfig | ExperimentConfig) -> list[str]:
    """Every problem of a config of any run schema, one line each (empty: good to go)."""
    return _PROBLEMS[type(cfg)](cfg)


def check(cfg: PretrainConfig | FinetuneConfig | ExperimentConfig, earlier: list[str] | None = None) -> None:
    """Raise one UserError listing the problems found while loading (``earlier``) and every problem of ``cfg``."""
    found = [*(earlier or []), *problems(cfg)]
    if found:
        raise UserError(found)
