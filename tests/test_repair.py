"""``gemma4-tune repair``: artefacts made with the "unwrap" fix (failure-catalog row 2), diagnosed with one
finding and put back into the official layout exactly, or refused with the reason (issue 16, item 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_tune.findings import FindingError
from tests.lora_helpers import unwrap_clippable
from tests.test_vllm import needs_vllm

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]
CLIP = ("input_min", "input_max", "output_min", "output_max")


@pytest.fixture(scope="module")
def unwrapped_adapter(tiny_models, tmp_path_factory) -> Path:
    """An adapter trained the way the unwrap fix trains: PEFT on q/v of every layer, towers unwrapped."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(str(tiny_models["e2b"]), dtype=torch.float32)
    assert unwrap_clippable(model) > 0
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("unwrap") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


def _damaged(src: Path, out: Path, *, drop: str | None = None) -> Path:
    """``src`` saved as a merge of unwrapped towers saves it: ``.linear.weight`` renamed, clamp buffers gone."""
    shutil.copytree(src, out)
    weights = out / "model.safetensors"
    tensors = {}
    for key, value in load_file(str(weights)).items():
        if key.rsplit(".", 1)[-1] in CLIP or key == drop:
            continue
        tensors[key.replace(".linear.weight", ".weight") if ".linear.weight" in key else key] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_unwrapped_adapter_is_one_finding_with_the_count_and_the_repair(tiny_models, unwrapped_adapter):
    from gemma4_tune.api import export

    with pytest.raises(FindingError) as info:
        export(tiny_models["e2b"], unwrapped_adapter, engines=("transformers",))
    (found,) = info.value.findings
    towers = sum(".vision_tower." in k or ".audio_tower." in k for k in load_file(
        str(unwrapped_adapter / "adapter_model.safetensors"))) // 2
    assert found.code == "G4T808" and found.details["modules"] == towers > 1
    assert "gemma4-tune repair --base" in found.fix


@pytest.mark.slow
def test_repaired_adapter_is_the_same_factors_on_the_inner_linear_and_verifies(tiny_models, unwrapped_adapter,
                                                                               tmp_path):
    out = tmp_path / "repaired"
    proc = subprocess.run([*CLI, "repair", "--base", str(tiny_models["e2b"]), "--adapter", str(unwrapped_adapter),
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["verify"]["ok"] and report["verify"]["adapter_effect"] > 1e-2
    before = load_file(str(unwrapped_adapter / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert len(before) == len(after)
    for key, value in before.items():
        moved = key.replace(".lora_", ".linear.lora_") if ".vision_tower." in key or ".audio_tower." in key else key
        assert torch.equal(after[moved], value)
    again = subprocess.run([*CLI, "repair", "--base", str(tiny_models["e2b"]), "--adapter", str(out), "--out",
                            str(tmp_path / "twice")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "G4T810" in again.stderr


@pytest.mark.slow
def test_damaged_merged_checkpoint_is_rebuilt_and_verified_against_base_plus_adapter(tiny_models, tmp_path):
    from gemma4_tune.api import export
    from gemma4_tune.verify.repair import repair_merged
    from tests.lora_helpers import random_lora

    base = tiny_models["e2b"]
    adapter = random_lora(base, tmp_path / "adapter", seed=4)
    export(base, adapter, merged=tmp_path / "merged")
    damaged = _damaged(tmp_path / "merged", tmp_path / "damaged")
    report = repair_merged(base, damaged, tmp_path / "repaired", adapter)
    assert report["renamed"] > 0 and report["from_base"] > 0
    assert report["verify"]["ok"] and report["verify"]["max_logit_diff"] < 1e-4, report["verify"]
    official = load_file(str(tmp_path / "merged" / "model.safetensors"))
    rebuilt = {}
    for file in sorted((tmp_path / "repaired").glob("*.safetensors")):
        rebuilt.update(load_file(str(file)))
    assert official.keys() == rebuilt.keys() and all(torch.equal(official[k], rebuilt[k]) for k in official)


@pytest.mark.slow
def test_what_cannot_be_repaired_exactly_is_refused(tiny_models, tmp_path):
    from gemma4_tune.verify.repair import repair_merged

    base = tiny_models["e2b"]
    text_weight = "model.language_model.layers.0.mlp.up_proj.weight"
    damaged = _damaged(base, tmp_path / "lost-weight", drop=text_weight)
    with pytest.raises(FindingError) as info:
        repair_merged(base, damaged, tmp_path / "out")
    assert info.value.findings[0].code == "G4T809" and text_weight in info.value.findings[0].message
    with pytest.raises(FindingError) as info:
        repair_merged(base, base, tmp_path / "out")
    assert info.value.findings[0].code == "G4T810"
    report = repair_merged(base, _damaged(base, tmp_path / "plain"), tmp_path / "without-adapter")
    assert [f.code for f in report["findings"]] == ["G4T811"] and report["verify"]["loading_report"] is not None
    assert not any(report["verify"]["loading_report"].values())
    assert not (tmp_path / "out").exists()


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
def test_the_repaired_adapter_passes_verify_in_peft_and_a_real_vllm(tiny_models, unwrapped_adapter, tmp_path):
    from gemma4_tune.api import verify
    from gemma4_tune.verify.repair import repair_adapter

    repaired = repair_adapter(tiny_models["e2b"], unwrapped_adapter, tmp_path / "repaired")["adapter"]
    report = verify(tiny_models["e2b"], repaired, engines=("peft", "vllm"), out=tmp_path / "v")
    assert report["ok"], [f.one_line() for f in report["findings"]]
    assert [(e["engine"], e["modalities"]) for e in report["engines"]] == [
        ("peft", ["text"]), ("peft", ["image"]), ("peft", ["audio"]), ("vllm adapter (text LoRA only)", ["text"])]
