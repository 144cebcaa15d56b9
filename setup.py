import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("ctcd_ds/__init__.py").read_text()).group(1)

setup(
    name="ctcd-ds",
    version=VERSION,
    description="Co-training and co-distillation (CTCD) of language models on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # the ZeRO templates live in ds_configs/ and ship inside the package as ctcd_ds/ds_templates/
    packages=[*find_packages(include=["ctcd_ds", "ctcd_ds.*"]), "ctcd_ds.ds_templates"],
    package_dir={"ctcd_ds.ds_templates": "ds_configs"},
    package_data={
        "ctcd_ds": ["recipes/*.yaml", "assets/wikitext-2/*", "assets/sst2/*"],
        "ctcd_ds.ds_templates": ["*.json"],
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # 0.19.3 still had the multi-rank ZeRO-2 + bf16 wrong-gradient regression (deepspeed #8224, fixed Aug 2026);
        # 0.19.8 is the release this project is tested with.
        "deepspeed>=0.19.8",
        "transformers>=4.57",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "numpy",
        "scikit-learn>=1.3",  # GLUE metrics
        "scipy>=1.10",
        "matplotlib>=3.7",  # experiment plots
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6", "ruff>=0.6"]},
    entry_points={"console_scripts": ["ctcd-ds=ctcd_ds.cli:main"]},
)
