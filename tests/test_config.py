"""The config tree: loading, overrides, every shipped file, and every user mistake reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctcd_ds import checks, ds_config, layout
from ctcd_ds.config import (
    ExperimentConfig,
    FinetuneConfig,
    PretrainConfig,
    dump_yaml,
    load_config,
    options_help,
    recipe_names,
    to_dict,
)
from ctcd_ds.errors import UserError
from ctcd_ds.graph import Graph
from ctcd_ds.presets import PRESETS, is_pretrained_path, model_config
from ctcd_ds.tokenizer import load_tokenizer

from conftest import PYTHON, run_cli


def problems_of(overrides: list[str], config: str = "ctcd") -> list[str]:
    problems: list[str] = []
    cfg = load_config(config, overrides, problems=problems)
    return problems + checks.problems(cfg)


@pytest.mark.parametrize("root", [PretrainConfig, FinetuneConfig, ExperimentConfig])
def test_every_setting_is_documented_with_its_choices(root):
    rows = {flag: doc for flag, _, doc in options_help(root)}
    assert len(rows) > 10
    assert all(rows.values()), [flag for flag, doc in rows.items() if not doc]
    choices = {"PretrainConfig": "train.precision", "FinetuneConfig": "task.kind", "ExperimentConfig": "alpha_schedule"}
    assert "Choices: " in rows[choices[root.__name__]]


def test_finetune_help_has_no_pretraining_settings():
    flags = [flag for flag, _, _ in options_help(FinetuneConfig)]
    assert "members.NAME.lr" in flags and "task.kind" in flags
    assert not [f for f in flags if "prune" in f or "minidisc" in f or "init_from" in f or f.startswith("data.")]
    problems: list[str] = []
    load_config(None, ["--members.model.prune.hidden_size=64"], FinetuneConfig, problems)
    assert problems == ["members.model.prune: unknown setting"]


def test_values_are_yaml_1_2_and_choices_are_checked():
    cfg = load_config(None, ["--task.label_column=no", "--task.text_columns=[on, off]"], FinetuneConfig)
    assert cfg.task.label_column == "no" and cfg.task.text_columns == ["on", "off"]
    assert load_config("ctcd", ["--export=false", "--members.teacher.lr=1e-3"]).members["teacher"].lr == 1e-3
    problems: list[str] = []
    load_config(
        "ctcd",
        ["--export=yes", "--members.teacher.lr_schedule=cosinus", "--tokenizer.model_type=bpe"],
        problems=problems,
    )
    assert problems == [
        "members.teacher.lr_schedule=cosinus: must be one of linear, cosine, constant",
        "tokenizer.model_type: unknown setting",
        "export: expected true or false, got 'yes'",
    ], problems


def test_overrides_all_forms(tiny):
    cfg = load_config(
        "ctcd", ["--train.steps=7", "--members.teacher.lr", "0.01", "edges.1.weight=0.5", "--data.train_files=a.txt"]
    )
    assert cfg.train.steps == 7
    assert cfg.members["teacher"].lr == 0.01
    assert cfg.edges[1].weight == 0.5 and cfg.edges[0].weight == 1.0
    assert cfg.data.train_files == ["a.txt"]


def test_default_run_is_the_ctcd_recipe_defined_once():
    cfg = load_config(None)
    assert list(cfg.members) == ["teacher", "student"]
    assert {(e.source, e.target) for e in cfg.edges} == {("student", "teacher"), ("teacher", "student")}
    assert to_dict(cfg) == to_dict(load_config("ctcd"))
    assert PretrainConfig().members == {} and PretrainConfig().edges == []  # members and edges live in the recipe only
    assert load_config(None, [f"--output_dir={cfg.output_dir}"]).output_dir == "runs/ctcd-tiny"
    assert dump_yaml(load_config(None)) == dump_yaml(cfg)


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_loads_and_validates(recipe, tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the placeholder run directories recipes name must not exist
    # kd needs a pretrained teacher directory; everything else must validate as shipped
    overrides = [f"--output_dir={tmp_path / 'out'}"]
    cfg = load_config(recipe, overrides)
    assert cfg.members and all(e.source in cfg.members and e.target in cfg.members for e in cfg.edges)
    frozen = [name for name, m in cfg.members.items() if not m.trainable]
    if frozen:  # recipes with a pretrained teacher name a placeholder directory the user must give
        problems = problems_of(overrides, recipe)
        placeholders = [
            n for n, m in cfg.members.items() if is_pretrained_path(m.model)
        ]  # the teachers and their copies
        assert [p.split(":")[0] for p in problems] == [
            f"members.{n}.model={cfg.members[n].model}" for n in placeholders
        ], problems
        teacher = _pretrained_dir(
            tmp_path, tokenizer_dir, vocab=1000, hidden=256, heads=4, ffn=1024
        )  # the tiny teacher's width
        load_tokenizer(tokenizer_dir).save_pretrained(str(teacher))  # an export carries its tokenizer
        overrides += [f"--members.{n}.model={teacher}" for n in frozen]
    assert problems_of(overrides, recipe) == []


@pytest.mark.parametrize("template", ds_config.template_names())
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_ds_template_derives_engine_configs(template, precision):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config("ctcd", [f"--deepspeed.template={template}"])
    assert ds_config.template_problems(template) == []
    for trainable in (True, False):
        ds = ds_config.engine_config(
            cfg.deepspeed.template,
            micro_batch_size=4,
            grad_accum_steps=2,
            grad_clip=1.0,
            trainable=trainable,
            precision=precision,
        )
        assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
        parsed = DeepSpeedConfig(json.loads(json.dumps(ds)))  # DeepSpeed's own parser accepts it
        assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]
        assert parsed.bfloat16_config.enabled == (precision == "bf16")
        if not trainable:
            assert ds["zero_optimization"]["stage"] in (0, 3) and "gradient_clipping" not in ds
            assert "offload_optimizer" not in ds["zero_optimization"]


def test_template_may_not_own_run_values(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 5}, "train_micro_batch_size_per_gpu": 3}))
    problems = ds_config.template_problems(str(bad))
    assert any("train.micro_batch_size" in p for p in problems)
    assert any("stage=5" in p for p in problems)


def _pretrained_dir(
    tmp_path: Path, tokenizer_dir: Path, vocab: int, max_pos: int = 512, hidden: int = 32, heads: int = 2, ffn: int = 64
) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    out = tmp_path / f"model_v{vocab}_p{max_pos}_h{hidden}"
    BertForMaskedLM(
        BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=max_pos,
        )
    ).save_pretrained(out)
    return out


def test_each_mistake_is_named(tmp_path, tokenizer_dir, tiny):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    wrong_vocab = _pretrained_dir(tmp_path, tokenizer_dir, vocab=999)
    short = _pretrained_dir(tmp_path, tokenizer_dir, vocab=1000, max_pos=32)
    bad_stage = tmp_path / "stage5.json"
    bad_stage.write_text('{"zero_optimization": {"stage": 5}}')
    cases = {
        "--train.stepz=3": "train.stepz: unknown setting (did you mean 'steps'?)",
        "--data.train_files=/no/such.txt": "data.train_files: /no/such.txt: no such file",
        f"--data.train_files={empty}": "the file has no text (empty corpus)",
        f"--members.teacher.model={wrong_vocab}": "vocab_size=999 but the run's tokenizer",
        f"--members.teacher.model={short}": "data.seq_len=64: exceeds members.teacher max_position_embeddings=32",
        "--data.seq_len=1024": "data.seq_len=1024: exceeds members.teacher (tiny-teacher) max positions 512",
        f"--deepspeed.template={bad_stage}": "zero_optimization.stage=5 is not a ZeRO stage",
        "--edges.0.source=ghost": "edges.0.source=ghost: no member of that name",
        "--members.student.trainable=false": "members.student.trainable=false: a frozen member needs pretrained "
        "weights",
        "--train.precision=fp8": "train.precision=fp8: must be one of",
        "--train.steps=many": "train.steps: expected an integer, got 'many'",
    }
    for override, expected in cases.items():
        problems = problems_of([*tiny, override])
        assert any(expected in p for p in problems), (override, problems)
    # several mistakes at once: all of them are reported (one case per setting, else the last one wins)
    by_setting = {override.split("=")[0]: (override, expected) for override, expected in cases.items()}
    del by_setting["--data.seq_len"]  # it would change the max-positions message of the short model
    all_at_once = problems_of([*tiny, *(override for override, _ in by_setting.values())])
    assert len(by_setting) >= 8
    for override, expected in by_setting.values():
        assert any(expected in p for p in all_at_once), (override, all_at_once)


def test_pruning_and_minidisc_mistakes_are_named(tiny):
    cases = {
        (
            "--members.teacher.prune.hidden_size=100",
        ): "members.teacher.prune.hidden_size=100: must be a multiple of the head size 64",
        ("--members.teacher.prune.hidden_size=512",): "members.teacher.prune.hidden_size=512: must be in 1..256",
        (
            "--members.teacher.prune.intermediate_size=4096",
        ): "members.teacher.prune.intermediate_size=4096: must be in 1..1024",
        (
            "--members.teacher.prune.hidden_size=128",
            "--members.teacher.prune.end=1.5",
        ): "members.teacher.prune.end=1.5: must be in (prune.start=0.0, 1]",
        (
            "--members.teacher.prune.hidden_size=128",
            "--members.teacher.prune.start=0.5",
            "--members.teacher.prune.end=0.51",
        ): "pruning would have no step to run",
        ("--members.teacher.prune.hidden_size=128", "--deepspeed.template=zero3"): "which needs ZeRO stage 0, 1 or 2",
        (
            "--members.teacher.prune.hidden_size=128",
            "--members.teacher.minidisc.sparsities=[0.5]",
        ): "members.teacher: prune and minidisc.sparsities cannot be combined",
        (
            "--members.student.minidisc.sandwich=[0.5,0]",
        ): "members.student.minidisc.sandwich=[0.5, 0.0]: each width sparsity must be in (0, 1)",
        (
            "--members.student.minidisc.sandwich=[0.5,0.5]",
        ): "members.student.minidisc.sandwich=[0.5, 0.5]: a sparsity is given twice",
        ("--members.student.minidisc.sandwich=[0.0005]",): "sparsity 0.0005 keeps every head and FFN neuron",
        ("--members.student.minidisc.sandwich=[0.5]", "--edges=[]"): "no edge targets student",
        (
            "--members.teacher.prune.hidden_size=-5",
        ): "members.teacher.prune: hidden_size=-5, intermediate_size=0: must be >= 0",
        ("--members.stu@dent.model=tiny-student",): "members.stu@dent: member names must not contain '@'",
        (
            "--members.teacher.minidisc.sparsities=[0.5,1.2]",
        ): "members.teacher.minidisc.sparsities=[0.5, 1.2]: each must be in (0, 1)",
        (
            "--edges.0.hidden_weight=1.0",
        ): "edges.0.hidden_weight=1.0: student (hidden 128) and teacher (hidden 256) differ",
        ("--edges.0.hidden_weight=-1",): "edges.0.hidden_weight=-1.0: must be >= 0",
        ("--train.compile=true", "--deepspeed.template=zero3"): "train.compile=true: not with deepspeed.template=zero3",
        (
            "--train.compile=true",
            "--members.teacher.prune.hidden_size=128",
        ): "train.compile=true: not with members.teacher's HomoDistil pruning",
        (
            "--train.compile=true",
            "--members.student.minidisc.sandwich=[0.5]",
        ): "train.compile=true: not with members.student's HomoDistil pruning or sandwich training",
    }
    for overrides, expected in cases.items():
        problems = problems_of([*tiny, *overrides])
        assert any(expected in p for p in problems), (overrides, problems)


def test_a_member_can_copy_another_members_model():
    cfg = load_config("ctcd", ["--members.teacher.model=paper-teacher", "--members.student.model=teacher"])
    assert cfg.members["student"].model == "paper-teacher"
    with pytest.raises(UserError, match=r"copy each other's model in a cycle \(teacher -> student -> teacher\)"):
        load_config("ctcd", ["--members.teacher.model=student", "--members.student.model=teacher"])


def test_cli_reports_all_errors_exits_2_and_writes_nothing(tmp_path, tiny):
    out = tmp_path / "never"
    result = run_cli(
        [
            PYTHON,
            "-m",
            "ctcd_ds.cli",
            "pretrain",
            *tiny,
            f"--output_dir={out}",
            "--train.stepz=1",
            "--edges.1.target=nobody",
        ]
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert not out.exists()


def test_resume_never_refuses_to_overwrite(tmp_path, tiny):
    run = tmp_path / "run"
    (layout.checkpoints_dir(run) / "step_00000003").mkdir(parents=True)
    (layout.checkpoints_dir(run) / "step_00000003" / layout.STATE_FILE).write_text("{}")
    (layout.checkpoints_dir(run) / layout.LATEST).write_text("step_00000003")
    problems = problems_of([*tiny, "--checkpoint.resume=never"])
    assert any("checkpoint.resume=never" in p and "nothing is overwritten" in p for p in problems), problems


EXPECTED_SHAPES = {  # (layers, hidden, heads, FFN), written out independently of PRESETS
    "tiny-teacher": (4, 256, 4, 1024),
    "tiny-student": (2, 128, 2, 512),
    "ratio-teacher": (6, 256, 4, 1024),
    "ratio-student": (4, 256, 4, 1024),
    "paper-teacher": (6, 768, 12, 3072),
    "paper-student": (4, 768, 12, 3072),
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),
}


@pytest.mark.parametrize("preset", list(EXPECTED_SHAPES))
def test_every_preset_builds_its_shape(preset):
    from ctcd_ds.models import build_model

    layers, hidden, heads, ffn = EXPECTED_SHAPES[preset]
    assert set(PRESETS) == set(EXPECTED_SHAPES)
    hf = model_config(preset, vocab_size=1000, pad_token_id=0)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.intermediate_size) == (
        layers,
        hidden,
        heads,
        ffn,
    )
    if hidden <= 256:  # instantiate the small ones: the weights have the shape
        model = build_model(preset, 1000, 0)
        layer = model.bert.encoder.layer[0]
        assert len(model.bert.encoder.layer) == layers
        assert tuple(layer.attention.self.query.weight.shape) == (hidden, hidden)
        assert tuple(layer.intermediate.dense.weight.shape) == (ffn, hidden)
        assert layer.attention.self.num_attention_heads == heads


def test_checking_a_config_imports_no_deepspeed():
    """Checks run before any process group or engine: loading and checking a config must stay DeepSpeed-free."""
    import subprocess
    import sys

    code = "import sys, ctcd_ds.checks, ctcd_ds.config; sys.exit('deepspeed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_edge_schedules_are_fractions_of_the_run():
    problems = problems_of(["--edges.0.schedule_steps=100"], "dwt")
    assert "edges.0.schedule_steps: replaced by schedule_end, a fraction of train.steps" in " ".join(problems)
    problems = problems_of(["--edges.0.schedule_end=1.5"], "dwt")
    assert "edges.0.schedule_end=1.5: a fraction of train.steps, in (0, 1]" in problems
    problems = problems_of(["--edges.0.schedule_end=0.1", "--train.steps=4"], "dwt")
    assert any(
        "schedule_end=0.1: with train.steps=4 the schedule would end before the first step" in p for p in problems
    )
    # the same fraction means the same share of any run: the weight reaches final_weight at 40% of the steps
    for steps in (30, 250, 1000):
        cfg = load_config("dwt", [f"--train.steps={steps}"])
        (edge,) = Graph.from_config(cfg).edges
        assert edge.weight(0) == 4.0 and edge.weight(round(0.4 * steps)) == 1.0 and edge.weight(steps - 1) == 1.0
