"""``ctcd-ds`` command line: pretrain | export | presets | show-config.

User mistakes print ``error: ...`` lines (all of them at once) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ctcd_ds.config import ConfigError, ExperimentConfig, FinetuneConfig, dump_yaml, load_config, options_help, recipe_names

EXIT_USAGE = 2


def _options_epilog(root: type | None = None) -> str:
    lines = ["settings (override any with --section.key=VALUE; values are parsed as YAML):"]
    for flag, default, doc in options_help(root):
        lines.append(f"  --{flag} (default {default})")
        lines.extend(textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctcd-ds", description="Co-training and co-distillation of masked LMs on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    pre = sub.add_parser(
        "pretrain",
        help="co-train the members of a run (run it under the deepspeed launcher for several ranks)",
        formatter_class=fmt,
        epilog=_options_epilog(),
        description="Train every member of a distillation graph on one shared MLM data stream.",
    )
    pre.add_argument("--config", default=None, help=f"a recipe name ({', '.join(recipe_names())}) or a YAML/JSON file; default: ctcd")
    pre.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    show = sub.add_parser("show-config", help="print the resolved config of a recipe and overrides, then exit", formatter_class=fmt, epilog=_options_epilog())
    show.add_argument("--config", default=None)
    fin = sub.add_parser(
        "finetune",
        help="fine-tune exported members on a classification/regression task (optionally co-distilling)",
        formatter_class=fmt,
        epilog=_options_epilog(FinetuneConfig),
        description="Fine-tune members through DeepSpeed engines; ends with dev metrics in <output_dir>/results.json.",
    )
    fin.add_argument("--config", default=None, help="a YAML/JSON file of fine-tuning settings (optional)")
    fin.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    xp = sub.add_parser(
        "experiment",
        help="reproduce the CTCD findings: pre-train 4 variants, fine-tune every model over seeds, table + plot",
        formatter_class=fmt,
        epilog=_options_epilog(ExperimentConfig),
        description="Standalone, one-way KD, CTCD and Community KD on the same data, steps, batch and seeds.",
    )
    xp.add_argument("--config", default=None, help="a YAML/JSON file of experiment settings (optional)")
    xp.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ev = sub.add_parser(
        "evaluate",
        help="print the dev metrics of a fine-tuned model and write them to JSON",
        formatter_class=fmt,
        epilog="task settings: the --task.* options of `ctcd-ds finetune --help` (default: the bundled SST-2 dev split)",
    )
    ev.add_argument("--model", required=True, help="a fine-tuned model directory (e.g. runs/finetune/export/model)")
    ev.add_argument("--out", default=None, help="JSON file for the results (default: <model>/eval_results.json)")
    exp = sub.add_parser("export", help="export every member of a checkpoint as a Hugging Face directory")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint dir (checkpoints/step_N) or a run dir (its latest checkpoint)")
    exp.add_argument("--out", required=True, help="output directory; one sub-directory per member")
    sub.add_parser("presets", help="list model presets and recipes")
    return parser


def pretrain(cfg) -> dict:
    """Train a validated config in an initialised process group; return where its outputs went."""
    from ctcd_ds.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
        summary["exports"] = trainer.export() if cfg.export else {}
    finally:
        trainer.close()
    return summary


def _pretrain(config: str | None, overrides: list[str]) -> int:
    from ctcd_ds import dist
    from ctcd_ds.validation import validate

    problems: list[str] = []
    cfg = load_config(config or "ctcd", overrides, problems)
    validate(cfg, problems)  # everything at once, before any file is written or process group joined
    dist.init_distributed()
    summary = pretrain(cfg)
    dist.print0(f"\ndone: {cfg.train.steps} steps of {', '.join(cfg.members)}")
    dist.print0(f"  tensorboard: {summary['tensorboard']}   (tensorboard --logdir {summary['tensorboard']})")
    dist.print0(f"  checkpoint:  {summary['checkpoint']}")
    for name, path in summary["exports"].items():
        dist.print0(f"  export:      {path}   ({name})")
    if summary["tokens_per_s"] is not None:
        memory = "GPU memory allocated" if dist.device().type == "cuda" else "process RSS"
        dist.print0(f"  throughput:  {summary['tokens_per_s']:.0f} tokens/s (all ranks, steps after the first); "
                    f"peak {memory} {summary['peak_memory_gb']:.2f} GB on rank 0")
    dist.cleanup()
    return 0


def _finetune(config: str | None, overrides: list[str]) -> int:
    from ctcd_ds import dist
    from ctcd_ds.validation import validate_finetune

    problems: list[str] = []
    cfg = load_config(config, overrides, problems, root=FinetuneConfig)
    validate_finetune(cfg, problems)
    dist.init_distributed()
    summary = finetune(cfg)
    dist.print0(f"  results:     {summary['results']}")
    dist.print0(f"  tensorboard: {summary['tensorboard']}")
    for name, path in summary["exports"].items():
        dist.print0(f"  export:      {path}   ({name})")
    dist.cleanup()
    return 0


def finetune(cfg) -> dict:
    """Fine-tune a validated FinetuneConfig in an initialised process group; print and return the results."""
    from ctcd_ds import dist
    from ctcd_ds.finetune import FinetuneTrainer

    trainer = FinetuneTrainer(cfg)
    try:
        summary = trainer.train()
        summary["results"] = trainer.write_results()
        summary["exports"] = trainer.export() if cfg.export else {}
    finally:
        trainer.close()
    for name, splits in trainer.results.items():
        for split, metrics in splits.items():
            dist.print0(f"{name} {split}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    summary["metrics"] = trainer.results
    return summary


def _experiment(config: str | None, overrides: list[str]) -> int:
    from ctcd_ds import dist
    from ctcd_ds.experiment import Experiment, experiment_problems

    problems: list[str] = []
    exp = load_config(config, overrides, problems, root=ExperimentConfig)
    problems += experiment_problems(exp)
    if problems:
        raise ConfigError(problems)
    dist.init_distributed()
    table = Experiment(exp).run()
    dist.print0(f"\n{table}\n\nwritten: {exp.output_dir}/results.md, results.json, results.png")
    dist.cleanup()
    return 0


def _evaluate(model: str, out: str | None, overrides: list[str]) -> int:
    from pathlib import Path

    from ctcd_ds.finetune import evaluate_model

    task_overrides = [o for o in overrides if o.lstrip("-").startswith("task.")]
    if len(task_overrides) != len(overrides):
        raise ConfigError([f"{o}: evaluate takes only --task.* settings" for o in overrides if o not in task_overrides])
    task = load_config(None, task_overrides, root=FinetuneConfig).task
    out_path = Path(out) if out else Path(model) / "eval_results.json"
    for split, metrics in evaluate_model(model, task, out_path).items():
        print(f"{split}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"results: {out_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "pretrain":
            return _pretrain(args.config, rest)
        if args.command == "finetune":
            return _finetune(args.config, rest)
        if args.command == "experiment":
            return _experiment(args.config, rest)
        if args.command == "evaluate":
            return _evaluate(args.model, args.out, rest)
        if args.command == "show-config":
            print(dump_yaml(load_config(args.config or "ctcd", rest)), end="")
            return 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "export":
            from ctcd_ds.export import export_checkpoint

            export_checkpoint(args.checkpoint, args.out)
        elif args.command == "presets":
            from ctcd_ds.models import PRESETS

            for name, p in PRESETS.items():
                print(f"{name:14s} {p.layers:2d}L-{p.hidden:<4d} {p.heads:2d} heads, ffn {p.ffn:<5d} {p.note}")
            print(f"recipes: {', '.join(recipe_names())}")
    except ValueError as exc:  # user mistakes (ConfigError lists several), found before or while loading
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        if os.environ.get("RANK", "0") == "0":  # every rank finds them; one report is enough
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def launched(command: str, args: list[str]) -> int:
    """Entry of the launcher files on every rank: ``CONFIG=x`` (argument or environment) -> ``--config x``."""
    config = [a.split("=", 1)[1] for a in args if a.startswith("CONFIG=")]
    args = [a for a in args if not a.startswith("CONFIG=")]
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        config = config or ([os.environ["CONFIG"]] if os.environ.get("CONFIG") else [])
        args = [f"--config={c}" for c in config[-1:]] + args
    return main([command, *args])


if __name__ == "__main__":
    sys.exit(main())
