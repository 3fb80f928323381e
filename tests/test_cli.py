"""The CLI: help, version, exit codes, findings instead of tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_tune import __version__

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("tiny-model", "inspect"):
        assert command in proc.stdout


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gemma4-tune {__version__}"


def test_usage_error_exits_2() -> None:
    proc = run("inspect")
    assert proc.returncode == 2
    assert "Missing argument" in proc.stderr


def test_unknown_model_is_a_finding_without_traceback() -> None:
    proc = run("inspect", "gemma-5-7b")
    assert proc.returncode == 1
    assert "G4T003" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback() -> None:
    proc = run("--debug", "inspect", "gemma-5-7b")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_not_a_gemma4_directory_is_a_finding(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = run("inspect", str(tmp_path))
    assert proc.returncode == 1 and "G4T002" in proc.stderr


def test_inspect_catalog_id_as_json_needs_no_weights() -> None:
    proc = run("inspect", "26b-a4b", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["variant"] == "gemma-4-26b-a4b" and data["moe"]["num_experts"] > 1
    assert data["parameters"]["total"] > 20_000_000_000


def test_inspect_human_report_names_the_features() -> None:
    proc = run("inspect", "e2b")
    assert proc.returncode == 0, proc.stderr
    for text in ("KV sharing", "per-layer embeddings", "audio tower", "Text layers", "reuse"):
        assert text in proc.stdout


@pytest.mark.slow
def test_tiny_model_command_writes_atomically_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = run("tiny-model", "--variant", "31b", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary leftovers"
    again = run("tiny-model", "--variant", "31b", "--out", str(out))
    assert again.returncode == 1 and "G4T004" in again.stderr
