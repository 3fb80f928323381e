"""Hostile settings and over-long rows (issue 22): refused up front by name, or handled one way and said once."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma4_tune.config import build_config, read_run_file
from gemma4_tune.findings import Finding, FindingError, Severity

BASE = {"model": "m", "data": "d.jsonl", "out": "o"}
CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


def refused(values: dict) -> list:
    with pytest.raises(FindingError) as info:
        build_config({**BASE, **values})
    return info.value.findings


@pytest.mark.parametrize(("values", "given", "allowed"), [
    ({"max_steps": 0}, "given: 0", "-1 (train for --epochs) or a whole number >= 1"),
    ({"lr": math.inf}, "given: inf", "<= 1"),
    ({"lr": 1e30}, "given: 1e+30", "<= 1"),
    ({"rank": True}, "given: True", "a whole number >= 1"),
    ({"seed": -1}, "given: -1", "from 0 to 4294967295"),
    ({"seed": 2**32}, "given: 4294967296", "from 0 to 4294967295"),
    ({"epochs": math.inf}, "given: inf", "a finite number > 0"),
    ({"targets": [1, 2]}, "given: [1, 2]", "a list of strings"),
    ({"targets": 5}, "given: 5", "a list of strings"),
    ({"lr": True}, "given: True", "<= 1"),
    ({"packing": 1}, "given: 1", "true or false"),
])
def test_each_bad_setting_is_one_finding_with_key_value_and_range(values: dict, given: str, allowed: str) -> None:
    (found,) = refused(values)
    (key,) = values
    assert found.code == "G4T005" and found.message.startswith(f"flags: {key}: ") and given in found.message
    assert allowed in found.fix and found.details["key"] == key


def test_sensible_values_at_the_edges_are_accepted() -> None:
    cfg = build_config({**BASE, "lr": "1e-4", "max_steps": -1, "seed": 2**32 - 1, "targets": ["text", "vision"],
                        "epochs": 0.5})
    assert (cfg.lr, cfg.max_steps, cfg.seed, cfg.targets, cfg.epochs) == (1e-4, -1, 2**32 - 1, "text,vision", 0.5)
    assert build_config({**BASE, "lr": 1, "max_steps": 1}).lr == 1.0


def _refused(run: Path, text: str) -> Finding:
    """The one finding reading the run file ``text`` gives."""
    run.write_text(text)
    with pytest.raises(FindingError) as info:
        read_run_file(run)
    (found,) = info.value.findings
    return found


@pytest.mark.parametrize(("line", "key"), [("max_steps: 0", "max_steps"), ("lr: .inf", "lr"), ("lr: 1e30", "lr"),
                                           ("rank: true", "rank"), ("seed: -1", "seed"), ("epochs: .inf", "epochs"),
                                           ("targets: [1, 2]", "targets"), ("targets: 5", "targets")])
def test_yaml_values_are_read_as_yaml_types_and_refused(tmp_path: Path, line: str, key: str) -> None:
    run = tmp_path / "run.yaml"
    found = _refused(run, f"model: m\ndata: d.jsonl\nout: o\n{line}\n")
    assert found.code == "G4T005" and found.message.startswith(f"{run}: {key}: ")


@pytest.mark.parametrize(("line", "named"), [("learning_rate: .inf", "learning_rate (lr)"),
                                             ("learning_rate: true", "learning_rate (lr)"),
                                             ("num_epochs: .inf", "num_epochs (epochs)"),
                                             ("seed: -1", "seed"), ("lora_r: true", "lora_r (rank)"),
                                             ("val_set_size: abc", "val_set_size")])
def test_an_axolotl_file_goes_through_the_same_validation(tmp_path: Path, line: str, named: str) -> None:
    found = _refused(tmp_path / "axolotl.yaml",
                     f"base_model: m\nadapter: lora\ndatasets:\n  - path: d.jsonl\n{line}\n")
    assert found.code == "G4T005" and named in found.message


def test_cli_refuses_a_bad_run_file_with_exit_2_before_anything_loads(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {tmp_path / 'no-model'}\ndata: {tmp_path / 'no-data.jsonl'}\nout: {tmp_path / 'r'}\n"
                   "max_steps: 0\n")
    proc = subprocess.run([*CLI, "train", str(run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "G4T005" in proc.stderr and "max_steps" in proc.stderr
    assert "G4T001" not in proc.stderr and "G4T303" not in proc.stderr and not (tmp_path / "r").exists()


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.mark.slow
def test_over_long_rows_are_cut_said_once_and_dropped_when_nothing_is_left(tiny_models, tmp_path: Path) -> None:
    from gemma4_tune.preflight import run_preflight
    from gemma4_tune.train.methods.sft import METHOD as sft

    long_row = _chat("word " * 300 + "What is one plus one?", "Two.")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [long_row] + [_chat(f"{i} plus {i}?", f"{2 * i}.")
                                                                         for i in range(5)]))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps(_chat("7 plus 7?", "14.")) + "\n" + json.dumps(long_row) + "\n")
    cfg = build_config({"model": str(tiny_models["e2b"]), "data": str(data), "eval_data": str(held_out),
                        "max_seq_len": 64, "out": str(tmp_path / "unused")})
    conversations = sft.read_data(cfg)
    setup = sft.prepare(cfg, conversations)

    by_code = {f.code: f for f in setup.findings if f.code in ("G4T318", "G4T319")}
    assert [f.code for f in setup.findings].count("G4T318") == 1 and [f.code for f in setup.findings].count(
        "G4T319") == 1
    cut, dropped = by_code["G4T318"], by_code["G4T319"]
    assert cut.severity is dropped.severity is Severity.WARNING
    assert "1 of 6 training rows and 1 of 2 held-out rows are longer than --max-seq-len 64" in cut.message
    assert f"{data}:1" in cut.message and cut.details["longest"] > 64
    assert "1 of 6 training rows and 1 of 2 held-out rows have no supervised token left" in dropped.message
    assert f"(the first: {data}:1)" in dropped.message
    assert len(setup.examples) == 5 and len(setup.eval_examples) == 1
    assert all(e["num_supervised"] > 0 for e in [*setup.examples, *setup.eval_examples])
    assert (setup.data["truncated"], setup.data["unsupervised_dropped"], setup.data["eval_unsupervised_dropped"]) == (
        1, 1, 1)

    # the first row was the over-long one: preflight runs on one that trains, and finds nothing wrong
    result = sft.preflight(cfg, setup, conversations)
    assert not [f for f in result.findings if f.severity is Severity.ERROR], result.findings
    assert result.supervised_in_batch > 0 and math.isfinite(result.loss)
    # a batch with no supervised token is said once (G4T504), not also as a NaN loss or a frozen tower
    masked = {**setup.probe, "labels": torch.full_like(setup.probe["labels"], -100)}
    alone = run_preflight(setup.model, setup.profile, setup.plan, masked, dataset_modalities=setup.data["modalities"],
                          dataset_supervised=setup.data["supervised_tokens"])
    assert [f.code for f in alone.findings if f.severity is Severity.ERROR] == ["G4T504"]
