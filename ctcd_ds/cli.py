"""``ctcd-ds`` command line: pretrain | finetune | experiment | scale | evaluate | export | prepare-data | presets |
show-config.

Thin: parse, load the config, check it, call the library entry point. User mistakes
(:class:`~ctcd_ds.errors.UserError`) print ``error: ...`` lines (all of them at once) and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import torch.distributed

from ctcd_ds import dist
from ctcd_ds.checks import check, prepare_problems
from ctcd_ds.config import (
    DeepSpeedConfig,
    ExperimentConfig,
    FinetuneConfig,
    PretrainConfig,
    ScaleConfig,
    dump_yaml,
    load_config,
    options_help,
    recipe_names,
)
from ctcd_ds.config.loading import parse_overrides
from ctcd_ds.errors import EXIT_PREEMPTED, EXIT_USAGE, Preempted, UserError
from ctcd_ds.experiment.runner import Experiment
from ctcd_ds.export import export_checkpoint
from ctcd_ds.layout import SUMMARY_FILE
from ctcd_ds.prepare import prepare_data
from ctcd_ds.prepared import use_prepared_tokenizer
from ctcd_ds.presets import PRESETS
from ctcd_ds.scaling.report import table
from ctcd_ds.scaling.sweep import run_scale, scale_problems
from ctcd_ds.task_data import beats_baseline
from ctcd_ds.tasks import evaluate_model
from ctcd_ds.trainer import run_finetune, run_pretrain

CONFIG_ENV = "CTCD_CONFIG"
"""The launchers' environment variable naming the recipe (a bare CONFIG from the shell is never read)."""


def _options_epilog(root: type) -> str:
    lines = ["settings (override any with --section.key=VALUE or --section.key VALUE; values are read as YAML):"]
    for flag, default, doc in options_help(root):
        lines.append(f"  --{flag} (default {default})")
        lines.extend(textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _task_epilog() -> str:
    lines = ["task settings (default: the bundled SST-2 dev split; --task.train_file is not read):"]
    for flag, default, doc in options_help(FinetuneConfig):
        if flag.startswith("task.") and flag not in ("task.train_file", "task.max_train_examples"):
            lines.append(f"  --{flag} (default {default})")
            lines.extend(textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctcd-ds", description="Co-training and co-distillation of language models on DeepSpeed."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    def with_config(name: str, root: type, config_help: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, formatter_class=fmt, epilog=_options_epilog(root), **kwargs)
        p.add_argument("--config", default=None, help=config_help)
        p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
        return p

    recipes = f"a recipe name ({', '.join(recipe_names())}) or a YAML/JSON file; default: ctcd"
    with_config(
        "pretrain",
        PretrainConfig,
        recipes,
        help="co-train the members of a run (under the deepspeed launcher for several ranks)",
        description="Train every member of a distillation graph on one shared MLM data stream.",
    )
    with_config(
        "show-config", PretrainConfig, recipes, help="print the resolved config of a recipe and overrides, then exit"
    )
    with_config(
        "finetune",
        FinetuneConfig,
        "a YAML/JSON file of fine-tuning settings (optional)",
        help="fine-tune exported members on a classification/regression task (optionally co-distilling)",
        description="Fine-tune members through DeepSpeed engines; ends with dev metrics in <output_dir>/results.json.",
    )
    with_config(
        "experiment",
        ExperimentConfig,
        "a YAML/JSON file of experiment settings (optional)",
        help="reproduce the CTCD findings: pre-train 4 variants, fine-tune every model over seeds, table + plot",
        description="Standalone, one-way KD, CTCD and Community KD on the same data, steps, batch and seeds.",
    )
    sc = sub.add_parser(
        "scale",
        formatter_class=fmt,
        epilog=_options_epilog(ScaleConfig),
        help="a scaling experiment: a short run per grid point through the launcher; scaling.csv + scaling.png",
        description="Sweep ranks, nodes, ZeRO templates, micro-batch, accumulation, precision, sequence length and "
        "models; each point is a real short run of launchers/pretrain.sh, timed after its warm-up steps "
        "(docs/scaling.md#scaling-experiments). Run it on one process: it starts the ranks itself.",
    )
    sc.add_argument("--config", default=None, help="a YAML/JSON file of sweep settings (optional)")
    ev = sub.add_parser(
        "evaluate",
        help="print the dev/test metrics of a fine-tuned model; write them to JSON with per-example predictions",
        formatter_class=fmt,
        description="Metrics and per-example predictions of a fine-tuned model on a dev and/or test file. The labels "
        "come from the model (id2label): no training file is read.",
        epilog=_task_epilog(),
    )
    ev.add_argument("--model", required=True, help="a fine-tuned model directory (e.g. runs/finetune/export/model)")
    ev.add_argument("--out", default=None, help="JSON file for the results (default: <model>/eval_results.json)")
    exp = sub.add_parser(
        "export", help="export every member of a checkpoint (pre-training or fine-tuning) as a Hugging Face directory"
    )
    exp.add_argument(
        "--checkpoint", required=True, help="a checkpoint dir (checkpoints/step_N) or a run dir (its latest checkpoint)"
    )
    exp.add_argument("--out", required=True, help="output directory; one sub-directory per member")
    prep = with_config(
        "prepare-data",
        PretrainConfig,
        recipes,
        help="tokenize a corpus into blocks once, for data.prepared=DIR in any run on any node (docs/data.md)",
        description="Resolve or train the tokenizer as `pretrain` with the same config would, tokenize the corpus, "
        "group it into data.seq_len blocks and write them with the tokenizer and a manifest to --out.",
    )
    prep.add_argument("--out", required=True, help="the directory to write (new, empty, or earlier prepared data)")
    prep.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds data prepared with other settings"
    )
    sub.add_parser("presets", help="list model presets and recipes")
    return parser


def _pretrain(cfg: PretrainConfig) -> None:
    summary = run_pretrain(cfg)
    frozen = summary["frozen"]
    taught = f" (taught by frozen {', '.join(frozen)})" if frozen else ""
    dist.print0(f"\ndone: {cfg.train.steps} steps of {', '.join(summary['trained'])}{taught}")
    for name in cfg.members:
        metrics = {k.split("/")[-1]: v for k, v in summary["final_eval"].items() if k.startswith(f"eval/{name}/")}
        if metrics:
            dist.print0(
                f"  held-out:    {name}: MLM loss {metrics['mlm_loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
                f"masked-token accuracy {metrics['accuracy']:.4f}"
            )
    dist.print0(f"  tensorboard: {summary['tensorboard']}   (tensorboard --logdir {summary['tensorboard']})")
    dist.print0(f"  checkpoint:  {summary['checkpoint']}")
    for name, path in summary["exports"].items():
        dist.print0(f"  export:      {path}   ({name})")
    for name, path in frozen.items():
        dist.print0(f"  input:       {path}   ({name}, frozen: unchanged, not exported again)")
    if summary["tokens_per_s"] is not None:
        memory = "GPU memory allocated" if dist.device().type == "cuda" else "process RSS"
        dist.print0(
            f"  throughput:  {summary['tokens_per_s']:.0f} tokens/s (all ranks, steps after the first); "
            f"peak {memory} {summary['peak_memory_gb']:.2f} GB on rank 0"
        )
    if summary.get("model_tflops") is not None:
        mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else " (MFU: no peak known here)"
        dist.print0(f"  efficiency:  {summary['model_tflops']:.3f} model TFLOP/s (all members, all ranks){mfu}")
    dist.print0(f"  summary:     {Path(cfg.output_dir) / SUMMARY_FILE}")


def _finetune(cfg: FinetuneConfig) -> None:
    summary = run_finetune(cfg)
    if dist.is_rank0():
        _print_finetune_results(json.loads(Path(summary["results"]).read_text()))
    dist.print0(f"  results:     {summary['results']}")
    dist.print0(f"  tensorboard: {summary['tensorboard']}")
    for name, path in summary["exports"].items():
        dist.print0(f"  export:      {path}   ({name})")


def _print_finetune_results(results: dict) -> None:
    """Every member's metrics per split, next to the majority-class baseline; a warning where a member does not
    beat it (classification: it has learned nothing the label frequencies do not give)."""
    baseline = results.get("majority_baseline")
    for name, splits in results["members"].items():
        for split, metrics in splits.items():
            role = results["splits"][split]["role"]
            line = f"{name} {split} ({role}): " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            if baseline:
                base = baseline["accuracy"][split]
                line += f"  (majority baseline: accuracy={base:.4f}, always {baseline['label']!r})"
            print(line)
    if baseline:
        for name, splits in results["members"].items():
            for split, metrics in splits.items():
                base = baseline["accuracy"][split]
                beats, margin = beats_baseline(metrics["accuracy"], base, baseline["examples"][split])
                if not beats:
                    print(
                        f"warning: {name} {split}: accuracy {metrics['accuracy']:.4f} does not beat the majority-class "
                        f"baseline {base:.4f} (always predicting {baseline['label']!r}, the most frequent training "
                        f"label) by more than noise (+{margin:.4f}: two standard errors on "
                        f"{baseline['examples'][split]} examples): the model has not learned the task; try another "
                        f"members.{name}.lr (too low, it barely moves; too high, it collapses to one label) or more "
                        "train.steps"
                    )
    for name, files in results.get("predictions", {}).items():
        for path in files.values():
            print(f"  predictions: {path}   ({name})")


def _experiment(exp: ExperimentConfig) -> None:
    summary = Experiment(exp).run()
    dist.print0(f"\n{summary}\n\nwritten: {exp.output_dir}/results.md, results.json, results.png")


RUNS = {
    "pretrain": (PretrainConfig, _pretrain),
    "finetune": (FinetuneConfig, _finetune),
    "experiment": (ExperimentConfig, _experiment),
}


def _run(command: str, config: str | None, overrides: list[str]) -> None:
    """Load and check everything before any file is written or process group joined; then run."""
    root, run = RUNS[command]
    problems: list[str] = []
    cfg = load_config(config, overrides, root, problems)
    if isinstance(cfg, PretrainConfig):
        use_prepared_tokenizer(cfg)  # data.prepared and no tokenizer of its own: the one saved with the blocks
    check(cfg, problems)
    timeout_s = getattr(cfg, "deepspeed", DeepSpeedConfig()).collective_timeout_s
    dist.init_distributed(timeout_s)
    try:
        run(cfg)
    except RuntimeError as exc:  # not a user error; if a collective failed, say what it usually means
        if not _collective_failure(exc):
            raise
        print(
            f"error: a collective failed on rank {dist.rank()}: another rank died or did not answer within "
            f"deepspeed.collective_timeout_s={timeout_s} s",
            file=sys.stderr,
            flush=True,
        )
        raise
    finally:
        dist.cleanup()


COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "NCCL error")


def _collective_failure(exc: RuntimeError) -> bool:
    """A collective that failed because another rank died or hung (gloo and NCCL say so in their messages)."""
    return isinstance(exc, torch.distributed.DistError) or any(m in str(exc) for m in COLLECTIVE_FAILURES)


def _evaluate(model: str, out: str | None, overrides: list[str]) -> None:
    not_task = [key for key, _ in parse_overrides(overrides) if not key.startswith("task.")]
    if not_task:
        raise UserError([f"--{key}: evaluate takes only --task.* settings (and --model, --out)" for key in not_task])
    task = load_config(None, overrides, FinetuneConfig).task
    out_path = Path(out) if out else Path(model) / "eval_results.json"
    report = evaluate_model(model, task, out_path)
    for split, metrics in report["results"].items():
        print(f"{split}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        info = report["splits"][split]
        print(f"  {info['role']}: {info['file']} ({info['examples']} examples)")
        print(f"  predictions: {report['predictions'][split]}")
    print(f"results: {out_path}")


def _prepare_data(config: str | None, overrides: list[str], out: str, overwrite: bool) -> None:
    problems: list[str] = []
    cfg = load_config(config, overrides, PretrainConfig, problems)
    found = [*problems, *prepare_problems(cfg, out)]
    if found:
        raise UserError(found)
    result = prepare_data(cfg, out, overwrite)
    m = result["manifest"]
    if result["status"] == "unchanged":
        print(f"{result['dir']} already holds these blocks (same seq_len, tokenizer and sources); nothing to do")
    else:
        print(
            f"prepared {result['dir']}: {m['blocks']['train']} train + {m['blocks']['eval']} eval blocks of "
            f"{m['seq_len']} tokens, {sum(m['bytes'].values()) / 1e6:.1f} MB ({m['bytes_per_token']} bytes/token), "
            f"{m['seconds']} s with data.num_proc={m['num_proc']}"
        )
    print(f"  tokenizer: {result['dir']}/tokenizer ({m['vocab_size']} tokens)")
    print(f"  use it:    ctcd-ds pretrain --data.prepared={result['dir']} --data.seq_len={m['seq_len']} ...")


def _scale(config: str | None, overrides: list[str]) -> None:
    problems: list[str] = []
    cfg = load_config(config, overrides, ScaleConfig, problems)
    found = [*problems, *scale_problems(cfg)]
    if found:
        raise UserError(found)
    rows = run_scale(cfg)
    if cfg.dry_run:
        return
    print(f"\n{table(rows)}\n\nwritten: {cfg.output_dir}/scaling.csv, scaling.png")
    failed = sum(r["status"] != "ok" for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} points failed (their errors are in the table and points/*/log.txt)")


def _presets() -> None:
    for name, p in PRESETS.items():
        print(f"{name:14s} {p.layers:2d}L-{p.hidden:<4d} {p.heads:2d} heads, ffn {p.ffn:<5d} {p.note}")
    print(f"recipes: {', '.join(recipe_names())}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command in ("export", "presets"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in RUNS:
            _run(args.command, args.config, rest)
        elif args.command == "show-config":
            print(dump_yaml(use_prepared_tokenizer(load_config(args.config, rest))), end="")
        elif args.command == "scale":
            _scale(args.config, rest)
        elif args.command == "prepare-data":
            _prepare_data(args.config, rest, args.out, args.overwrite)
        elif args.command == "evaluate":
            _evaluate(args.model, args.out, rest)
        elif args.command == "export":
            export_checkpoint(args.checkpoint, args.out)
        else:
            _presets()
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank finds them; one report is enough
            for line in exc.problems:
                print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as stop:
        dist.print0(
            f"\nstopped by {stop.reason} at step {stop.step}: checkpoint {stop.checkpoint}; "
            "run the same command again to resume"
        )
        return EXIT_PREEMPTED
    return 0


def launched(command: str, args: list[str]) -> int:
    """Entry of the launcher files on every rank: a ``CONFIG=x`` argument, or ``CTCD_CONFIG`` in the
    environment, becomes ``--config x`` unless ``--config`` is given."""
    config = [a.split("=", 1)[1] for a in args if a.startswith("CONFIG=")]
    args = [a for a in args if not a.startswith("CONFIG=")]
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        config = config or ([os.environ[CONFIG_ENV]] if os.environ.get(CONFIG_ENV) else [])
        args = [f"--config={c}" for c in config[-1:]] + args
    return main([command, *args])


if __name__ == "__main__":
    sys.exit(main())
