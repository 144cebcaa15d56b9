"""The wheel is self-contained: recipes and the ZeRO templates ship inside the package, and an installed
copy trains from a directory outside the checkout.

The checkout may also be installed in editable mode in the system site-packages (setuptools'
``__editable__.ctcd_ds-*.pth`` appends a meta-path finder that maps ``ctcd_ds`` to the checkout). A
``--system-site-packages`` venv runs that ``.pth`` too, but the finder comes *after* the regular path
finder, so the wheel in the venv's own site-packages (earlier on ``sys.path``) wins. The import test
below checks exactly that, so the other tests cannot pass by running the checkout.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, run_cli

# what the wheel must not be built from (nor an in-tree build write into): VCS data, build outputs, caches, runs
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", "runs",
    ".pytest_cache", ".whl", ".benchmarks", ".hypothesis", ".ruff_cache",
)  # fmt: skip
NO_PATH = {"PYTHONPATH": ""}  # nothing may put the checkout on sys.path
PIP_ENV = {**NO_PATH, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _ok(result) -> None:
    report = f"rc={result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, report


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, venv): a wheel of the checkout, installed without its dependencies into a fresh venv that
    takes the heavy ones (torch, deepspeed, transformers) from the system site-packages."""
    root = tmp_path_factory.mktemp("packaging")
    # build from a copy: an in-tree build would write build/ and ctcd_ds.egg-info/ into the shared checkout
    src = root / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)
    wheels = root / "wheels"
    build = [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    build += ["-w", str(wheels), str(src)]
    _ok(run_cli(build, env=PIP_ENV, cwd=root, timeout=300))
    (wheel,) = wheels.glob("ctcd_ds-*.whl")
    venv = root / "venv"
    _ok(run_cli([PYTHON, "-m", "venv", "--system-site-packages", str(venv)], env=NO_PATH, cwd=root, timeout=300))
    install = [str(venv / "bin" / "pip"), "install", "--no-deps", "--no-index", str(wheel)]
    _ok(run_cli(install, env=PIP_ENV, cwd=root, timeout=300))
    return wheel, venv


def _venv_python(venv: Path, *args: str, cwd: Path, timeout: int = 300):
    """``VENV/bin/python ARGS`` from ``cwd`` (a directory outside the checkout)."""
    return run_cli([str(venv / "bin" / "python"), *args], env=NO_PATH, cwd=cwd, timeout=timeout)


def test_wheel_ships_recipes_and_zero_templates(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ctcd_ds/ds_templates/zero3.json", "ctcd_ds/ds_templates/zero2.json", "ctcd_ds/recipes/ctcd.yaml"):
        assert name in names, f"{name} missing from {wheel.name}"


def test_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    _, venv = installed
    code = "import ctcd_ds, ctcd_ds.assets as a; print(ctcd_ds.__file__); print(a.templates_dir())"
    result = _venv_python(venv, "-c", code, cwd=tmp_path)
    _ok(result)
    package_file, templates = result.stdout.split()
    assert package_file != "None", "ctcd_ds imported as a namespace package (no __init__.py in the wheel?)"
    package, templates = Path(package_file).resolve().parent, Path(templates).resolve()
    assert package.is_relative_to(venv.resolve()), f"imported {package}, not the venv's copy"
    assert not package.is_relative_to(REPO)
    assert templates == package / "ds_templates" and (templates / "zero3.json").is_file(), templates


def test_installed_cli_lists_presets(installed, tmp_path):
    _, venv = installed
    result = _venv_python(venv, "-m", "ctcd_ds.cli", "presets", cwd=tmp_path)
    _ok(result)
    (recipes,) = [line for line in result.stdout.splitlines() if line.startswith("recipes: ")]
    assert {"ctcd", "kd", "standalone"} <= set(recipes[len("recipes: ") :].split(", ")), result.stdout
    assert "tiny-teacher" in result.stdout  # the presets come first


def test_installed_package_trains_with_a_shipped_zero3_template(installed, tmp_path, tokenizer_dir):
    _, venv = installed
    out = tmp_path / "run"
    result = _venv_python(
        venv, "-m", "ctcd_ds.cli", "pretrain", "--deepspeed.template=zero3",
        f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}",
        "--data.seq_len=32", "--data.max_train_blocks=32", "--train.micro_batch_size=4",
        "--train.steps=2", "--train.eval_batches=1", "--export=false",
        cwd=tmp_path, timeout=400,
    )  # fmt: skip
    _ok(result)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
