"""No NaN passes verify (issue 22, item 1): a non-finite output is a failure with its own finding (G4T618), in
every comparison; ``diff > tol`` and ``effect <= tol`` are both false for NaN, and Python's ``max`` drops a NaN
that is not first, so each comparison is written to fail on NaN."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_tune.findings import FindingError
from gemma4_tune.verify.parity import _compare, verify_artefacts
from gemma4_tune.verify.verdict import worst

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


def _poisoned(source: Path, out: Path, pick: str, names: tuple[str, ...] = ()) -> Path:
    """A copy of ``source`` whose first safetensors tensor matching ``pick`` is all NaN."""
    shutil.copytree(source, out)
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(file))
        key = next((k for k in tensors if pick in k and (not names or any(n in k for n in names))), None)
        if key is not None:
            tensors[key] = torch.full_like(tensors[key], float("nan"))
            save_file(tensors, str(file), metadata={"format": "pt"})
            return out
    raise AssertionError(f"no tensor matching {pick!r} in {source}")


def test_worst_keeps_a_nan_that_plain_max_drops():
    assert max(0.0, math.nan) == 0.0  # the trap: a running max forgets the NaN
    assert math.isnan(worst([1.0, math.nan, 2.0])) and worst([1.0, 3.0]) == 3.0 and worst([]) == 0.0


def test_nan_logits_are_one_non_finite_finding():
    mask = torch.ones(1, 3, dtype=torch.bool)
    reference, base = torch.zeros(1, 3, 5), torch.ones(1, 3, 5)
    got = reference.clone()
    got[0, 0, 0] = float("nan")
    result = _compare("x", got, reference, base, mask)
    assert [f.code for f in result.findings] == ["G4T618"] and not result.ok
    assert "NaN or infinite in 1 of 15 output values" in result.findings[0].message


@pytest.mark.slow
def test_a_merged_checkpoint_with_nan_weights_fails_verify(tiny_models, tmp_path):
    """The tester's case: a merged checkpoint with NaN weights gave 'greedy agreement 0.0% ... pass', exit 0."""
    from gemma4_tune.api import export
    from tests.lora_helpers import random_lora

    base = tiny_models["e2b"]
    adapter = random_lora(base, tmp_path / "adapter", seed=3)
    export(base, adapter, merged=tmp_path / "merged")
    merged = _poisoned(tmp_path / "merged", tmp_path / "nan-merged", "language_model.layers.0.mlp.down_proj")
    proc = subprocess.run([*CLI, "verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(merged),
                           "--engine", "transformers", "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "G4T618" in proc.stdout + proc.stderr and "G4T610" not in proc.stdout + proc.stderr


def test_nan_in_lora_b_fails_verify_engine_peft_before_any_comparison(tiny_models, tmp_path):
    """NaN in lora_B used to pass `verify --engine peft`: the trained model itself is NaN, nothing can verify."""
    from tests.lora_helpers import random_lora

    adapter = random_lora(tiny_models["e2b"], tmp_path / "adapter", seed=4)
    poisoned = _poisoned(adapter, tmp_path / "nan-adapter", ".lora_B.")
    with pytest.raises(FindingError) as info:
        verify_artefacts(tiny_models["e2b"], poisoned, None, ["peft"])
    assert [f.code for f in info.value.findings] == ["G4T618"]
    assert "the trained model (base + " in info.value.findings[0].message
    from gemma4_tune.api import verify

    with pytest.raises(FindingError):  # refused before comparing: verify --out still writes its verdict
        verify(tiny_models["e2b"], poisoned, engines=("peft",), out=tmp_path / "report")
    verdict = json.loads((tmp_path / "report" / "verify.json").read_text())
    assert (verdict["ok"], verdict["refused"]) == (False, True)
    assert [f["code"] for f in verdict["findings"]] == ["G4T618"]


def test_saved_adapter_with_nan_is_not_called_an_adapter_that_changes_nothing(tiny_models, tmp_path):
    """The end-of-training check (G4T601/G4T602) on a saved adapter holding NaN says NaN, not 'changes nothing'."""
    from peft import PeftModel
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.verify.parity import fixed_batch
    from gemma4_tune.verify.peft import saved_adapter_parity
    from tests.lora_helpers import random_lora

    base = tiny_models["e2b"]
    adapter = random_lora(base, tmp_path / "adapter", seed=5)
    trained = PeftModel.from_pretrained(Gemma4ForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32),
                                        str(adapter))
    parity = saved_adapter_parity(_poisoned(adapter, tmp_path / "nan", ".lora_B."), trained, fixed_batch(base))
    assert not parity.ok and [f.code for f in parity.findings()] == ["G4T618"]


def test_vllm_comparison_fails_on_nan_logprobs_anywhere():
    """A NaN logprob that is not first in a running max used to vanish; vLLM's rows with NaN are G4T618."""
    from gemma4_tune.verify.vllm import RefSequence, compare

    def ref(value: float) -> RefSequence:
        rows = torch.full((2, 4), -1.5, dtype=torch.float64)
        rows[:, 1] = value
        return RefSequence(token_ids=[1, 1], logprobs=rows, prompt_logprobs=None)

    def row(value: float, second: float) -> dict:
        return {"token_ids": [1, 1], "logprobs": [{0: -1.5, 1: value}, {0: -1.5, 1: second}]}

    reference = {"base": [ref(-0.5)], "lora": [ref(-0.2)]}
    fine = compare({"results": {"base": [row(-0.5, -0.5)], "lora": [row(-0.2, -0.2)]}}, reference)
    assert fine.ok, fine.findings
    broken = compare({"results": {"base": [row(-0.5, -0.5)], "lora": [row(-0.2, math.nan)]}}, reference)
    assert [f.code for f in broken.findings] == ["G4T618"] and math.isnan(broken.max_logprob_diff)


def test_llama_cpp_comparison_fails_on_nan_logits():
    from gemma4_tune.verify.llamacpp import _parity_finding, compare_logits

    reference = [np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)]
    assert compare_logits(reference, reference[0].copy(), "f32")["ok"]
    got = reference[0].copy()
    got[2, 7] = np.nan
    figures = compare_logits(reference, got, "f32")
    assert not figures["ok"] and figures["non_finite"] == 1
    assert _parity_finding("model-f32.gguf", figures, "x").code == "G4T618"
