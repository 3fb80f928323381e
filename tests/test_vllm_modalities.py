"""Issue 17: the merged checkpoint in a real vLLM, on text, image and audio prompts, against transformers + PEFT.

Failure-catalog row 31 (engines disagree on image-token attention). One runner process serves every merged
checkpoint of this file (one vLLM import); each reference is computed while the engines start. The numbers
these tests rest on are measured on vLLM 0.32.0's CPU build (docs/verify.md):

- E2B (causal image attention): text, image and audio rows reproduce transformers + PEFT within 3e-5;
- 31B (``use_bidirectional_attention="vision"``): vLLM's CPU attention has no ``supports_mm_prefix``, so it
  attends image tokens causally, 3.3 off transformers in logprob: verify names it (G4T921);
- a lone audio clip kills the CPU engine (``onednn_mm`` on a non-contiguous input in the audio tower):
  audio is reported as not run (G4T920), never passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gemma4_tune.engines import vllm_env as engine_env

REQUIRE = bool(os.environ.get("GEMMA4_TUNE_REQUIRE_ENGINES"))
needs_vllm = pytest.mark.skipif(engine_env.vllm_python() is None and not REQUIRE,
                                reason="vLLM environment not installed (gemma4-tune engines install vllm)")
pytestmark = [pytest.mark.engine, pytest.mark.slow, needs_vllm]


def _zero_tower_b(adapter: Path, out: Path, part: str) -> Path:
    """The adapter with the lora_B of one tower set to zero (its deltas dropped, the rest kept)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from gemma4_tune.model.profile import part_of

    shutil.copytree(adapter, out)
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    zeroed = {k: torch.zeros_like(v) if ".lora_B." in k and part_of(k) == part else v for k, v in tensors.items()}
    assert any(not torch.equal(zeroed[k], tensors[k]) for k in tensors), f"the adapter has no {part} LoRA"
    save_file(zeroed, str(path), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory) -> dict:
    """E2B (vision + audio LoRA) merged, E2B with its vision deltas dropped, 31B (vision LoRA) merged: one runner.

    Each run is judged twice from the same engine output: against the model's own reference and against one
    computed with the other image attention (the flipped reference of deliverable 4).
    """
    from gemma4_tune.export.merge import merge_adapter
    from gemma4_tune.verify.vllm import PlannedRun, run_planned
    from gemma4_tune.verify.vllm_modalities import merged_run
    from tests.lora_helpers import random_lora

    root = tmp_path_factory.mktemp("vllm-modalities")
    e2b, b31 = tiny_models["e2b"], tiny_models["31b"]
    arts = {"e2b": (e2b, random_lora(e2b, root / "e2b-lora", seed=3, spec="text,vision,audio")),
            "31b": (b31, random_lora(b31, root / "31b-lora", seed=4, spec="text,vision"))}
    no_vision = _zero_tower_b(arts["e2b"][1], root / "e2b-no-vision", "vision")
    merged = {"e2b": merge_adapter(e2b, arts["e2b"][1], root / "e2b-merged").out_dir,
              "31b": merge_adapter(b31, arts["31b"][1], root / "31b-merged").out_dir,
              "e2b-no-vision": merge_adapter(e2b, no_vision, root / "e2b-no-vision-merged").out_dir}
    planned, cleans = [], []
    for name, (variant, flip) in {"e2b": ("e2b", True), "e2b-no-vision": ("e2b", False), "31b": ("31b", True)}.items():
        base, adapter = arts[variant]
        run, clean = merged_run(base, adapter, merged[name])  # the reference is always the full trained adapter
        cleans.append(clean)
        if not flip:
            planned.append(run)
            continue
        other, clean = merged_run(base, adapter, merged[name], flip_reference=True)
        cleans.append(clean)

        def both(result, run=run, other=other):
            return {"model": run.finish(result), "flipped": other.finish(result)}

        planned.append(PlannedRun(run.request, lambda run=run, other=other: (run.reference(), other.reference()),
                                  both))
    try:
        out = run_planned(planned)
    finally:
        for clean in cleans:
            clean()
    return {"e2b": out[0], "e2b-no-vision": out[1], "31b": out[2], "arts": arts, "merged": merged}


def _codes(row) -> list[str]:
    return [f.code for f in row.findings]


def test_e2b_merged_checkpoint_matches_transformers_on_text_and_images(served):
    rows = served["e2b"]["model"]
    assert list(rows) == ["text", "image", "audio"]
    for modality in ("text", "image"):
        row = rows[modality]
        assert _codes(row) == [], [f.message for f in row.findings]
        assert row.prompts == (3 if modality == "text" else 2) and row.positions > 50
        assert row.max_logprob_diff <= row.tolerance == 2e-4 and row.greedy_agreement == 1.0
        assert row.adapter_effect > 100 * row.tolerance  # the fine-tune shows on this modality in vLLM
        assert row.parity.max_prompt_logprob_diff > 0  # prompt positions were compared, not only generated ones


def test_a_lone_audio_clip_is_reported_as_not_run_naming_vllm_and_its_error(served):
    """vLLM 0.32.0's CPU build dies on one audio request (two clips batched together run): G4T920, a warning
    with the engine's own error, and no parity figure. When vLLM fixes it this test fails: then judge audio."""
    row = served["e2b"]["model"]["audio"]
    assert _codes(row) == ["G4T920"] and row.parity is None and row.prompts == 0
    (f,) = row.findings
    assert "vLLM 0.32.0" in f.message and "stride" in row.not_run and "audio is not verified" in f.message


def test_dropped_vision_deltas_fail_the_image_rows_while_text_passes(served):
    """A merged checkpoint whose vision-tower deltas are zeroed, against the trained adapter (rows 2 and 31)."""
    rows = served["e2b-no-vision"]
    assert _codes(rows["text"]) == []
    assert _codes(rows["image"]) == ["G4T903"] and rows["image"].max_logprob_diff > 100 * rows["image"].tolerance
    assert "vision tower" in rows["image"].findings[0].fix


def test_e2b_with_a_bidirectional_reference_fails_and_names_the_attention(served):
    """Deliverable 4 on a causal model: the reference flipped to bidirectional image attention makes the image
    rows fail, the finding says how vLLM attends, and the text rows are untouched."""
    rows = served["e2b"]["flipped"]
    assert _codes(rows["text"]) == []
    assert _codes(rows["image"]) == ["G4T921"]
    (f,) = rows["image"].findings
    assert f.details["engine_attention"] == "causal" and f.details["reference_attention"] == "bidirectional"
    assert "attends image tokens causally where the reference (transformers) attends them bidirectionally" in f.message


def test_31b_vllm_cpu_attends_image_tokens_causally_and_verify_names_it(served):
    """The 31B asks for bidirectional attention within each image; vLLM's CPU attention cannot (no mm_prefix
    support) and attends causally, silently: the image rows fail with G4T921, the text rows pass. With the
    reference flipped to causal, vLLM reproduces transformers: the diagnosis is right, not a guess."""
    rows = served["31b"]["model"]
    assert _codes(rows["text"]) == []
    assert _codes(rows["image"]) == ["G4T921"]
    assert rows["image"].findings[0].details["engine_attention"] == "causal"
    assert rows["image"].max_logprob_diff > 0.1
    flipped = served["31b"]["flipped"]["image"]
    assert _codes(flipped) == [] and flipped.max_logprob_diff <= flipped.tolerance


def test_verify_shows_one_row_per_engine_and_modality(served, tmp_path):
    """`verify --engine vllm --merged` on E2B: the adapter's text row, then one merged row per modality in verify.md
    (peft and transformers rows per modality: tests/test_export_verify.py)."""
    from gemma4_tune.api import verify

    base, adapter = served["arts"]["e2b"]
    report = verify(base, adapter, merged=served["merged"]["e2b"], engines=("vllm",), out=tmp_path / "v")
    rows = [(e["engine"], e["modalities"], e["verdict"]) for e in report["engines"]]
    assert rows == [("vllm adapter (text LoRA only)", ["text"], "pass"), ("vllm merged", ["text"], "pass"),
                    ("vllm merged", ["image"], "pass"), ("vllm merged", ["audio"], "not run")]
    assert report["ok"]  # a modality vLLM cannot run is a warning that says so, not a failure of the artefact
    assert all(e["reference_effect"] > 1.0 for e in report["engines"][1:3])  # the adapter's own effect, shown
    table = (tmp_path / "v" / "verify.md").read_text()
    assert "| vllm merged | image | 2 prompts," in table and "| vllm merged | audio | 0 prompts, 0 positions |" in table
    assert "not run" in table and "G4T920" in table
