"""``ctcd-ds`` command line: pretrain | finetune | experiment | evaluate | export | presets | show-config.

Thin: parse, load the config, check it, call the library entry point. User mistakes
(:class:`~ctcd_ds.errors.UserError`) print ``error: ...`` lines (all of them at once) and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import torch.distributed

from ctcd_ds import dist
from ctcd_ds.checks import check
from ctcd_ds.config import (
    DeepSpeedConfig,
    ExperimentConfig,
    FinetuneConfig,
    PretrainConfig,
    dump_yaml,
    load_config,
    options_help,
    recipe_names,
)
from ctcd_ds.errors import EXIT_PREEMPTED, EXIT_USAGE, Preempted, UserError
from ctcd_ds.experiment.runner import Experiment
from ctcd_ds.export import export_checkpoint
from ctcd_ds.presets import PRESETS
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
    ev = sub.add_parser(
        "evaluate",
        help="print the dev metrics of a fine-tuned model and write them to JSON",
        formatter_class=fmt,
        epilog="task settings: the --task.* options of `ctcd-ds finetune --help` (default: the bundled SST-2 dev "
        "split)",
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
    sub.add_parser("presets", help="list model presets and recipes")
    return parser


def _pretrain(cfg: PretrainConfig) -> None:
    summary = run_pretrain(cfg)
    dist.print0(f"\ndone: {cfg.train.steps} steps of {', '.join(cfg.members)}")
    dist.print0(f"  tensorboard: {summary['tensorboard']}   (tensorboard --logdir {summary['tensorboard']})")
    dist.print0(f"  checkpoint:  {summary['checkpoint']}")
    for name, path in summary["exports"].items():
        dist.print0(f"  export:      {path}   ({name})")
    if summary["tokens_per_s"] is not None:
        memory = "GPU memory allocated" if dist.device().type == "cuda" else "process RSS"
        dist.print0(
            f"  throughput:  {summary['tokens_per_s']:.0f} tokens/s (all ranks, steps after the first); "
            f"peak {memory} {summary['peak_memory_gb']:.2f} GB on rank 0"
        )


def _finetune(cfg: FinetuneConfig) -> None:
    summary = run_finetune(cfg)
    for name, splits in summary["metrics"].items():
        for split, metrics in splits.items():
            dist.print0(f"{name} {split}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    dist.print0(f"  results:     {summary['results']}")
    dist.print0(f"  tensorboard: {summary['tensorboard']}")
    for name, path in summary["exports"].items():
        dist.print0(f"  export:      {path}   ({name})")


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
    not_task = [o for o in overrides if not o.lstrip("-").startswith("task.")]
    if not_task:
        raise UserError([f"{o}: evaluate takes only --task.* settings" for o in not_task])
    task = load_config(None, overrides, FinetuneConfig).task
    out_path = Path(out) if out else Path(model) / "eval_results.json"
    for split, metrics in evaluate_model(model, task, out_path).items():
        print(f"{split}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"results: {out_path}")


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
            print(dump_yaml(load_config(args.config, rest)), end="")
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
