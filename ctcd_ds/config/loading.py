"""Building a config: defaults <- recipe file (``--config``) <- ``--section.key=value`` overrides.

Values are read as YAML 1.2 (only ``true``/``false`` are booleans: ``--task.label_column=no`` stays the
string "no"). Types and ``Literal`` choices are checked while building; every problem is collected and
raised once as a :class:`~ctcd_ds.errors.UserError`. ``options_help`` turns the field docs into ``--help``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ctcd_ds.config.runs import FinetuneConfig, PretrainConfig
from ctcd_ds.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
RECIPES_DIR = PACKAGE_DIR / "recipes"
DEFAULT_RECIPE = "ctcd"
"""The run `ctcd-ds pretrain` trains when no --config is given."""


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: yes/no/on/off stay strings."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------------------------------
# docstrings -> help


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (inherited fields included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # one line, however it is wrapped
    return docs


def _choices(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is Literal:
        return typing.get_args(typing.get_args(tp)[0])
    return None


HELP_OVERRIDES: dict[type, dict[str, str | None]] = {
    FinetuneConfig: {
        "members.NAME.model": "The pretrained model to fine-tune: an exported directory (export/NAME of a pre-training "
        "run) or a member's folder inside a pre-training checkpoint (checkpoints/step_N/NAME; exported first). A "
        "classification or regression head is added on top.",
        "members.NAME.trainable": "Train this member. A frozen member (false) must already be a classifier fine-tuned "
        "for the task (a fine-tuned teacher); it only teaches through edges.",
        "edges.I.hidden_weight": None,  # rejected by fine-tuning: it distils class logits
    },
}
"""Per run schema: a doc that differs from the shared section's (the flag's own wording), or None for a setting the
schema has but rejects (left out of its --help)."""


def options_help(root: type = PretrainConfig) -> list[tuple[str, str, str]]:
    """(flag, default, doc) for every setting of ``root``, in tree order; members under `members.NAME.`,
    edges under `edges.I.`; choices are appended to the doc. Defaults are ``root``'s own (a fine-tuning member's
    lr is FinetuneConfig's default member's); :data:`HELP_OVERRIDES` rewords or leaves out a shared setting."""
    rows: list[tuple[str, str, str]] = []
    overrides = HELP_OVERRIDES.get(root, {})

    def walk(cls: type, prefix: str, default_obj: Any) -> None:
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in settings(cls):
            value = getattr(default_obj, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.", value)
            elif typing.get_origin(tp) is dict:
                item = typing.get_args(tp)[1]
                rows.append((f"{prefix}{f.name}.NAME.*", ", ".join(value) or "(none)", docs[f.name]))
                walk(
                    item, f"{prefix}{f.name}.NAME.", next(iter(value.values()), None) or item()
                )  # the default member's values
            elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                item = typing.get_args(tp)[0]
                rows.append((f"{prefix}{f.name}", f"{len(value)} items", docs[f.name]))
                walk(item, f"{prefix}{f.name}.I.", item(source="?", target="?"))
            else:
                doc = docs.get(f.name, "")
                choices = _choices(tp)
                if choices:
                    doc = f"{doc} Choices: {', '.join(map(str, choices))}."
                rows.append((f"{prefix}{f.name}", json.dumps(value), doc))

    walk(root, "", root())
    return [
        (flag, default, overrides.get(flag, doc))
        for flag, default, doc in rows
        if not (flag in overrides and overrides[flag] is None)
    ]


# --------------------------------------------------------------------------------------------------
# building from dicts


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Turn a YAML/CLI value into ``tp``, or record a problem and return None."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return _build(tp, value, where, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        problems.append(f"{where}={value}: must be one of {', '.join(map(str, choices))}")
        return None
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of names, got {value!r}")
            return {}
        items = {
            str(k): _coerce(v if v is not None else {}, val_tp, f"{where}.{k}", problems) for k, v in value.items()
        }
        return {k: v for k, v in items.items() if v is not None}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not dataclasses.is_dataclass(item_tp):
            value = [value]  # one value for a list of scalars: --seeds=3, --ranks=2
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        items = [_coerce(v, item_tp, f"{where}.{i}", problems) for i, v in enumerate(value)]
        return [v for v in items if v is not None]
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return None
    raise AssertionError(f"unsupported config type {tp} at {where}")


REPLACED = {
    "schedule_steps": "replaced by schedule_end, a fraction of train.steps (e.g. schedule_steps=100 of a 250-step "
    "run is schedule_end=0.4)",
}
"""Settings of earlier versions, and what to write instead."""


def settings(cls: Any) -> list[dataclasses.Field]:
    """The settings of a config class: its fields a user sets (not the ones it derives, ``init=False``)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def _build(cls: type, data: dict[str, Any], where: str, problems: list[str]) -> Any:
    names = [f.name for f in settings(cls)]
    hints = {k: v for k, v in typing.get_type_hints(cls).items() if k in names}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints and key in REPLACED:
            problems.append(f"{path}: {REPLACED[key]}")
            continue
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{path}: unknown setting{hint}")
            continue
        value = _coerce(value, hints[key], path, problems)
        if value is not None:  # a bad value was reported; keep the default so checking can go on
            kwargs[key] = value
    missing = [
        f.name
        for f in settings(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in missing:
        problems.append(f"{where}.{name}: required" if where else f"{name}: required")
    if missing:
        return None
    try:
        return cls(**kwargs)
    except UserError as exc:  # __post_init__ checks
        problems.extend(exc.problems)
        return None


def to_dict(cfg: Any) -> Any:
    """The config as plain YAML/JSON-able data (inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in settings(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(data: dict[str, Any], root: type = PretrainConfig, problems: list[str] | None = None) -> Any:
    """Build ``root`` from nested data.

    Unknown keys and wrong types raise one UserError; if a ``problems`` list is given they are appended
    to it instead and the offending values keep their defaults, so that checking can report them together
    with everything else.
    """
    collect: list[str] = [] if problems is None else problems
    cfg = _build(root, data, "", collect)
    if problems is None and collect:
        raise UserError(collect)
    return cfg if cfg is not None else root()


# --------------------------------------------------------------------------------------------------
# recipe files and overrides


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe name (``ctcd``) or a YAML/JSON path -> the file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    raise UserError(
        f"--config={name_or_path}: no such file and no recipe of that name (recipes: {', '.join(recipe_names())})"
    )


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else parse_yaml(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"--config={path}: cannot read it: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config={path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``--a.b=v``, ``--a.b v`` or ``a.b=v`` -> [("a.b", parsed v)]; values are parsed as YAML 1.2."""
    out: list[tuple[str, Any]] = []
    problems: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, value = None, None
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = body, args[i + 1]
                i += 1
            else:
                problems.append(f"{arg}: needs a value (--{body}=VALUE)")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            problems.append(f"{arg}: not an override; use --section.key=value")
        if key is not None:
            try:
                parsed = parse_yaml(value) if value != "" else ""
            except yaml.YAMLError:
                parsed = value
            out.append((key, parsed))
        i += 1
    if problems:
        raise UserError(problems)
    return out


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b]... = value`` for the dotted key, creating mappings (and list items by index)."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(node, part, key)]
            continue
        if not isinstance(node, dict):
            raise UserError(f"--{key}: {'.'.join(parts[:depth])} is not a section")
        if part not in node or node[part] is None:
            node[part] = [] if parts[depth + 1].isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--{key}: {'.'.join(parts[:-1])} is not a section")


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--{key}: list index {part} out of range (it has {len(node)} items)")
    return int(part)


def load_config(
    config: str | None = None,
    overrides: list[str] | None = None,
    root: type = PretrainConfig,
    problems: list[str] | None = None,
) -> Any:
    """Defaults <- recipe file <- overrides, then build (types and choices checked, unknown keys rejected;
    see :func:`from_dict` for ``problems``). A pre-training run without ``config`` is the default recipe."""
    if config is None and root is PretrainConfig:
        config = DEFAULT_RECIPE
    data: dict[str, Any] = to_dict(root())
    if config:
        recipe = load_file(resolve_recipe(config))
        # members and edges in a recipe replace the defaults; other sections merge key by key.
        for key, value in recipe.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "members":
                data[key].update(value)
            else:
                data[key] = value
    for key, value in parse_overrides(overrides or []):
        apply_override(data, key, value)
    return from_dict(data, root, problems)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
