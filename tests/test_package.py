"""The package's public face and floor plan, as a user and CI see them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import guidance_tune
from guidance_tune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_is_the_object_its_module_defines():
    assert guidance_tune.train is train  # the function, not a module of the same name
    for name in guidance_tune.__all__:
        value = getattr(guidance_tune, name)
        if name != "__version__":
            assert not isinstance(value, type(guidance_tune)), name  # no module behind a name
            assert value.__name__ == name


def test_the_imports_run_one_way_and_a_wrong_one_is_named(tmp_path):
    """import-linter's contracts in pyproject.toml hold on the package; a copy with one upward
    import (the loop reaching for MLflow's record) breaks them, naming that import."""
    linter = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]
    kept = subprocess.run(linter, capture_output=True, text=True, cwd=ROOT)
    assert kept.returncode == 0, kept.stdout
    for name in ("guidance_tune", "search_spaces", "pyproject.toml"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    loop = tmp_path / "guidance_tune" / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\nfrom guidance_tune.tracking import record  # noqa\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy before the install
    broken = subprocess.run(linter, capture_output=True, text=True, cwd=tmp_path, env=environment)
    assert broken.returncode == 1
    assert "guidance_tune.training.loop -> guidance_tune.tracking.record" in broken.stdout
