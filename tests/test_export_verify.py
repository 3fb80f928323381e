"""export + verify from the command line: good artefacts pass, broken ones exit non-zero."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ev-data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Spell {w}."}, {"role": "assistant", "content": "-".join(w)}]}
            for w in ("cat", "dog", "sun", "sea", "red", "blue")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def trained(tiny_models, text_data, tmp_path_factory) -> dict[str, Path]:
    """A short real training run per variant: the adapter verify has to prove."""
    runs = {}
    for variant, targets in (("e2b", "text,vision"), ("31b", "text,vision")):
        out = tmp_path_factory.mktemp(f"ev-{variant}") / "run"
        proc = cli("train", "--model", tiny_models[variant], "--data", text_data, "--out", out, "--targets", targets,
                   "--max-steps", 3, "--lr", 1e-2, "--batch-size", 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[variant] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_export_merged_then_verify_passes(tiny_models, trained, tmp_path, variant):
    merged = tmp_path / "merged"
    proc = cli("export", "--base", tiny_models[variant], "--adapter", trained[variant] / "adapter",
               "--merged", merged, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["merged"]["tensors_merged"] > 0
    assert (merged / "Modelfile").read_text().startswith("FROM") or "FROM ." in (merged / "Modelfile").read_text()
    codes = [f["code"] for f in report["findings"]]
    assert "G4T201" in codes, "vision LoRA needs vLLM's tower flag: the export must say so"
    proc = cli("verify", "--base", tiny_models[variant], "--adapter", trained[variant] / "adapter",
               "--merged", merged, "--engine", "peft,transformers", "--out", tmp_path / "v", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    modalities = ["text", "image", "audio"] if variant == "e2b" else ["text", "image"]
    assert result["ok"] and [(e["engine"], e["modalities"]) for e in result["engines"]] == [
        (engine, [m]) for engine in ("peft", "transformers") for m in modalities]  # one row per engine x modality
    assert all(e["adapter_effect"] > e["tolerance"] for e in result["engines"])
    for e in result["engines"]:  # every row says what its verdict rests on
        assert e["prompts"] == (3 if e["modalities"] == ["text"] else 2) and e["positions"] > 20
    table = (tmp_path / "v" / "verify.md").read_text()
    assert table.count("| pass |") == 2 * len(modalities)
    assert "| peft | image | 2 prompts," in table and "| transformers | text | 3 prompts," in table


@pytest.mark.slow
def test_row02_unwrap_renamed_merged_checkpoint_fails_verify(tiny_models, trained, tmp_path):
    merged = tmp_path / "merged"
    assert cli("export", "--base", tiny_models["e2b"], "--adapter", trained["e2b"] / "adapter",
               "--merged", merged).returncode == 0
    weights = merged / "model.safetensors"
    tensors = load_file(str(weights))
    renamed = {k.replace(".linear.weight", ".weight"): v for k, v in tensors.items()
               if not k.endswith(("input_min", "input_max", "output_min", "output_max"))}
    save_file(renamed, str(weights), metadata={"format": "pt"})
    proc = cli("verify", "--base", tiny_models["e2b"], "--adapter", trained["e2b"] / "adapter", "--merged", merged,
               "--engine", "transformers", "--out", tmp_path / "v", "--json")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    rows = result["engines"]
    assert [r["modalities"] for r in rows] == [["text"], ["image"], ["audio"]]
    assert all([f["code"] for f in r["findings"]] == ["G4T612"] and r["verdict"] == "FAIL" for r in rows)
    (found,) = result["findings"]  # one clear finding, said once: the cause, with the repair
    assert found["code"] == "G4T612" and "gemma4-tune repair" in found["fix"] and found["details"]["rows"] == 3


@pytest.mark.slow
def test_row04_adapter_with_zeroed_lora_b_fails_verify(tiny_models, trained, tmp_path):
    adapter = tmp_path / "zeroed"
    shutil.copytree(trained["31b"] / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    proc = cli("verify", "--base", tiny_models["31b"], "--adapter", adapter, "--engine", "peft",
               "--out", tmp_path / "v")
    assert proc.returncode == 1 and "G4T611" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_adapter_for_another_base_is_refused_naming_both(tiny_models, trained, tmp_path):
    from gemma4_tune.api import tiny_model

    other = tiny_model("31b", tmp_path / "other-31b", seed=7)
    for command in (["export", "--base", other, "--adapter", trained["31b"] / "adapter"],
                    ["verify", "--base", other, "--adapter", trained["31b"] / "adapter", "--engine", "peft"]):
        proc = cli(*command)
        assert proc.returncode == 1 and "G4T801" in proc.stderr, proc.stderr[-2000:]
    proc = cli("export", "--base", tiny_models["e2b"], "--adapter", trained["31b"] / "adapter")
    assert proc.returncode == 1 and ("G4T801" in proc.stderr or "G4T802" in proc.stderr)


@pytest.mark.slow
def test_export_for_vllm_flags_moe_expert_lora(tiny_models, text_data, tmp_path):
    """Failure-catalog rows 6 and 22: expert LoRA is dropped by vLLM and not convertible to a GGUF adapter."""
    out = tmp_path / "moe"
    assert cli("train", "--model", tiny_models["26b-a4b"], "--data", text_data, "--out", out, "--max-steps", 1
               ).returncode == 0
    proc = cli("export", "--base", tiny_models["26b-a4b"], "--adapter", out / "adapter", "--for", "vllm,llama.cpp",
               "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes = [f["code"] for f in json.loads(proc.stdout)["findings"]]
    assert "G4T202" in codes and "G4T204" in codes
