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


def test_plan_memory_shows_the_moe_experts_in_4_bits_and_without() -> None:
    """Failure-catalog row 18: bitsandbytes' loading leaves the 26B-A4B experts in bf16; gemma4-tune holds them in 4
    bits, and plan shows both figures for the real 26B-A4B."""
    proc = run("plan", "--model", "26b-a4b", "--quantize", "4bit", "--json")
    assert proc.returncode == 0, proc.stderr
    memory = json.loads(proc.stdout)["memory"]
    assert memory["experts_quantized"] and memory["experts_bf16_gib"] > 0.8 * memory["total_gib_experts_bf16"]
    assert memory["experts_4bit_gib"] < 0.27 * memory["experts_bf16_gib"]
    assert memory["total_gib"] < 0.4 * memory["total_gib_experts_bf16"]
    human = run("plan", "--model", "26b-a4b", "--quantize", "4bit")
    assert "MoE experts in 4 bits too" in human.stdout and "left in bf16" in human.stdout


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


# --- train / preflight options: declared once, as RunConfig's fields ------------------------------------------------

#: the flags of train/preflight that are no RunConfig field, or spell one otherwise (OWN_FLAG: resume, preflight)
EXPLICIT = {"--dry-run", "--resume", "--no-preflight", "--json", "--explain-config", "--reward", "--reward-weights"}
OWN = {"resume": "--resume", "preflight": "--no-preflight", "rewards": "--reward", "reward_weights": "--reward-weights"}


def test_every_run_config_field_is_a_flag_with_its_description_or_marked() -> None:
    import typer.main

    from gemma4_tune.cli import app
    from gemma4_tune.config.options import RunConfig, cli_spec

    commands = typer.main.get_command(app).commands
    for name in ("train", "preflight"):
        options = {param.opts[0]: param for param in commands[name].params if param.param_type_name == "option"}
        made = set()
        for field, info in RunConfig.model_fields.items():
            assert info.description, f"{field} has no description (its help)"
            spec, flag = cli_spec(info), "--" + field.replace("_", "-")
            if spec == "yaml-only":
                assert flag not in options, f"{field} is marked YAML_ONLY but {flag} exists"
            elif spec == "own":
                assert OWN[field] in options, f"{field}: cli.py declares {OWN[field]} itself"
            else:
                flag = (spec["flag"] or flag).split("/")[0]
                assert options[flag].help == info.description, field
                assert options[flag].default is None, f"{flag}: only the flags given override the run file"
                made.add(flag)
        assert set(options) == made | EXPLICIT, "a flag that is no RunConfig field, or a field with two flags"
        assert options["--resume"].help == RunConfig.model_fields["resume"].description
    assert options["--packing"].secondary_opts == ["--no-packing"] and options["--skip-invalid"].secondary_opts == []
    refused = run("train", "--distributed", "zero4")
    assert refused.returncode == 2 and "zero4" in refused.stderr and "G4T005" not in refused.stderr


def test_a_field_added_to_run_config_is_a_flag_with_no_other_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generation reads the model class: a new field appears in `train --help` and reaches build_config."""
    from typing import Literal

    import typer
    from pydantic import Field
    from typer.testing import CliRunner

    from gemma4_tune.cli import _train_command
    from gemma4_tune.config import options as config_options
    from gemma4_tune.config.options import YAML_ONLY, RunConfig, Whole, cli
    from gemma4_tune.findings import FindingError, finding

    class Extended(RunConfig):
        warmup_cycles: Whole | None = Field(None, ge=1, description="Cycles of a new schedule [1]")
        new_mode: Literal["a", "b"] | None = Field(None, description="A new choice", json_schema_extra=cli(choices=True))
        file_only: Whole = Field(3, description="A key of the run file only", json_schema_extra=YAML_ONLY)

    app = typer.Typer()
    app.command("train")(_train_command(preflight_only=False, config=Extended))
    app.command("other")(lambda: None)
    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "--warmup-cycles" in shown.output and "Cycles of a new schedule" in shown.output
    assert "--new-mode" in shown.output and "<a|b>" in shown.output
    assert "--file-only" not in shown.output and "--rank" in shown.output

    given = {}

    def capture(values: dict, **_: object) -> None:
        given.update(values)
        raise FindingError(finding("G4T005", "captured", "nothing"))

    monkeypatch.setattr(config_options, "build_config", capture)
    ran = CliRunner().invoke(app, ["train", "--warmup-cycles", "5", "--new-mode", "b", "--distributed", "ddp",
                                   "--no-packing", "--resume", "--no-preflight"])
    assert ran.exit_code == 2, ran.output
    assert given == {"warmup_cycles": 5, "new_mode": "b", "distributed": "ddp", "packing": False, "resume": True,
                     "preflight": False}
    assert all(type(value) in (int, str, bool) for value in given.values()), "choices arrive as plain strings"


def test_readme_lists_the_train_flags_and_the_run_file_keys() -> None:
    """README's list of `train` flags and of the keys with no flag is checked against RunConfig's fields."""
    import re
    import typing

    import typer.main

    from gemma4_tune.cli import _alternatives, app
    from gemma4_tune.config.options import DatasetSpec, RunConfig, cli_spec

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (listed,) = re.findall(r"`train` flags: `([^`]*)`", readme)
    options = [param for param in typer.main.get_command(app).commands["train"].params
               if param.param_type_name == "option"]
    assert set(re.findall(r"--[a-z][a-z-]*", listed)) == {param.opts[0] for param in options} - {"--help"}
    for flag, choices in re.findall(r"(--[a-z-]+) \{([a-z0-9,]+)\}", listed):
        (kind,) = _alternatives(RunConfig.model_fields[flag[2:].replace("-", "_")].annotation)
        values = typing.get_args(kind)
        assert choices.split(",") == list(values), flag
    (keys,) = re.findall(r"these with no flag: ((?:`\w+`[,\s]*)+)", readme)
    assert set(re.findall(r"`(\w+)`", keys)) == {name for name, info in RunConfig.model_fields.items()
                                                 if cli_spec(info) == "yaml-only"}
    (dataset,) = re.findall(r"list of datasets with ((?:`\w+`[,\s]*)+)", readme)
    assert set(re.findall(r"`(\w+)`", dataset)) == set(DatasetSpec.model_fields) - {"path"}


def test_json_output_stays_alone_on_stdout_while_libraries_log_there(capsys) -> None:
    """DeepSpeed (imported with TRL) logs to a handler bound to sys.stdout: under --json that went into the JSON."""
    import logging

    from gemma4_tune.console import json_only_stdout, print_json

    with json_only_stdout():
        logger = logging.getLogger("gemma4-tune-test-library")
        logger.addHandler(logging.StreamHandler(stream=sys.stdout))  # bound when the library is imported
        logger.warning("[WARNING] Setting accelerator to CPU.")
        print("a library's print")
        print_json({"ok": True})
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ok": True}
    assert "Setting accelerator to CPU" in err and "a library's print" in err


def test_the_command_line_starts_without_torch() -> None:
    """`gemma4-tune --help` and the commands' option parsing import no torch (it costs seconds and ~300 MB);
    export.adapter once pulled it in through plan.targets for one string rule."""
    code = "import sys, gemma4_tune.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
