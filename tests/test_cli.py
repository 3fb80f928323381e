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
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)


def test_help_lists_the_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("demo", "tiny-model", "inspect", "plan"):
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


def test_plan_json_for_a_catalog_id_lists_exact_paths_and_skips() -> None:
    proc = run("plan", "--model", "e2b", "--targets", "text,vision,audio", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["groups"] == ["text", "vision", "audio"]
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear" in data["target_modules"]
    assert not [p for p in data["target_modules"] if p.endswith("layers.20.self_attn.k_proj")]
    assert {s["name"] for s in data["skipped"]} == {"k_proj", "v_proj"}
    assert data["trainable_parameters"]["total"] == sum(
        v for k, v in data["trainable_parameters"].items() if k != "total")
    assert "G4T201" in [f["code"] for f in data["findings"]]


def test_plan_memory_says_moe_experts_stay_bf16_under_4bit() -> None:
    """Failure-catalog row 18: QLoRA does not shrink the 26B-A4B experts."""
    proc = run("plan", "--model", "26b-a4b", "--quantize", "4bit", "--json")
    assert proc.returncode == 0, proc.stderr
    memory = json.loads(proc.stdout)["memory"]
    assert memory["experts_bf16_gib"] > 0.8 * memory["total_gib"]
    human = run("plan", "--model", "26b-a4b", "--quantize", "4bit")
    assert "MoE experts that bitsandbytes leaves in bf16" in human.stdout


def test_plan_with_a_tower_the_model_lacks_exits_1() -> None:
    proc = run("plan", "--model", "31b", "--targets", "text,audio")
    assert proc.returncode == 1 and "G4T102" in proc.stderr


@pytest.mark.slow
def test_demo_runs_offline_trains_verifies_and_the_loss_goes_down(tmp_path: Path) -> None:
    proc = run("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["loss_last_10_steps"] < 0.6 * summary["loss_first_10_steps"]
    assert summary["verification"]["ok"] and summary["verification"]["max_logit_diff"] <= 1e-5
    report = (tmp_path / "demo" / "run" / "report.md").read_text()
    assert "## Curves" in report and "## Export and verification" in report and "## Samples" in report
    assert summary["eval_loss_tuned"] < summary["eval_loss_base"]
    assert summary["eval_accuracy_tuned"] > summary["eval_accuracy_base"]
    assert "held-out loss" in proc.stdout
    assert (tmp_path / "demo" / "run" / "loss.png").stat().st_size > 1000
    # the work is bounded by what it does, never by wall-clock time (a loaded machine is not a failure):
    # exactly the planned optimizer steps, each logged once
    steps = [json.loads(line)["step"] for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, summary["steps"] + 1))
