"""The import contract (issue 23): layers follow the data flow, and the check fails on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)


def test_every_import_goes_down_the_layers() -> None:
    result = _lint(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 kept, 0 broken" in result.stdout


def _lint_with(tmp_path: Path, module: str, addition: str) -> subprocess.CompletedProcess[str]:
    """lint-imports on a copy of the package with ``addition`` appended to ``module`` (a path under gemma4_tune)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "gemma4_tune", src / "gemma4_tune", ignore=shutil.ignore_patterns("__pycache__"))
    path = src / "gemma4_tune" / module
    path.write_text(path.read_text() + addition)
    return _lint(src)


def test_an_engine_comparison_importing_another_breaks_the_verify_contract(tmp_path: Path) -> None:
    """The verify contract (issue 32): vLLM's comparison reaching back into parity (as it did) is refused."""
    result = _lint_with(tmp_path, "verify/vllm.py",
                        "\n\ndef _back() -> None:\n    from gemma4_tune.verify.parity import ENGINES  # noqa\n")
    assert result.returncode != 0
    assert "gemma4_tune.verify.vllm -> gemma4_tune.verify.parity" in result.stdout


def test_shared_preference_code_importing_a_unit_or_a_unit_another_breaks_the_train_contracts(tmp_path: Path) -> None:
    """The train contracts: the import circle recipe <-> preference (as it was) is refused, as is a unit importing
    another unit."""
    result = _lint_with(tmp_path, "train/preference.py",
                        "\n\ndef _up() -> None:\n    from gemma4_tune.train.methods.sft import METHOD  # noqa\n")
    assert result.returncode != 0
    assert "gemma4_tune.train.preference -> gemma4_tune.train.methods.sft" in result.stdout
    result = _lint_with(tmp_path / "units", "train/methods/kto.py",
                        "\n\ndef _other() -> None:\n    from gemma4_tune.train.methods.dpo import DPO  # noqa\n")
    assert result.returncode != 0
    assert "gemma4_tune.train.methods.kto -> gemma4_tune.train.methods.dpo" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    result = _lint_with(tmp_path, "model/profile.py",
                        "\n\ndef _upward() -> None:\n    from gemma4_tune.api import plan  # noqa\n")
    assert result.returncode != 0
    assert "gemma4_tune.model.profile -> gemma4_tune.api" in result.stdout


def test_the_readme_names_the_contract_layers() -> None:
    import re
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layers = [layer.replace("gemma4_tune.", "") for layer in contract["layers"]]
    line = re.search(r"Layers, top to bottom: (.+?)\.\n", (ROOT / "README.md").read_text(), re.S).group(1)
    assert [part.strip().strip("`") for part in line.replace("\n", " ").split(">")] == layers
