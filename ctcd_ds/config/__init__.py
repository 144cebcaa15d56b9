"""The one typed config tree: sections (``sections.py``), run schemas (``runs.py``), loading and help
(``loading.py``). Every setting lives in one place; each engine's DeepSpeed JSON is derived from it."""

from ctcd_ds.config.loading import (
    DEFAULT_RECIPE,
    PACKAGE_DIR,
    dump_yaml,
    from_dict,
    load_config,
    options_help,
    recipe_names,
    to_dict,
)
from ctcd_ds.config.runs import ExperimentConfig, FinetuneConfig, PretrainConfig, ScaleConfig
from ctcd_ds.config.sections import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    EdgeConfig,
    LoopConfig,
    MemberConfig,
    MiniDiscConfig,
    PretrainMemberConfig,
    PruneConfig,
    TaskConfig,
    TokenizerConfig,
)

__all__ = [
    "DEFAULT_RECIPE",
    "PACKAGE_DIR",
    "CheckpointConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "EdgeConfig",
    "ExperimentConfig",
    "FinetuneConfig",
    "LoopConfig",
    "MemberConfig",
    "MiniDiscConfig",
    "PretrainConfig",
    "PretrainMemberConfig",
    "PruneConfig",
    "ScaleConfig",
    "TaskConfig",
    "TokenizerConfig",
    "dump_yaml",
    "from_dict",
    "load_config",
    "options_help",
    "recipe_names",
    "to_dict",
]
