"""Gemma 4 12B (``gemma4_unified``, encoder-free) through the whole chain (failure-catalog row 37).

The 12B has no towers: images enter as raw 48x48 patches, audio as raw frames, through embedders
only. The per-variant tests (stock load, plan counts equal PEFT's, one backward reaching every
group, merge equal to PEFT, vLLM parity on K=V layers) run it through ``tests.conftest.VARIANTS``;
here: what is particular to it, and the chain from training to every engine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gemma4_tune.findings import FindingError

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=1200)


def test_text_never_reaches_the_embedders_that_peft_all_linear_reaches(tiny_models) -> None:
    """Row 37: ``all-linear`` LoRA lands on the 12B's multimodal embedders; ``text`` never does."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.api import meta_model
    from gemma4_tune.plan.targets import plan_targets

    module, profile = meta_model(tiny_models["12b"])
    text = plan_targets(module, profile, "text")
    assert text.groups == ["text"] and not [t for t in text.targets if ".embed_" in t.path]
    embed = plan_targets(module, profile, "vision-embed,audio-embed")
    assert sorted(t.path for t in embed.targets) == [
        "model.embed_audio.embedding_projection", "model.embed_vision.multimodal_embedder.embedding_projection",
        "model.embed_vision.patch_dense"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["12b"])
    stock = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n for n, m in stock.named_modules() if isinstance(m, LoraLayer)}
    assert any(".embed_vision." in n for n in wrapped) and any(".embed_audio." in n for n in wrapped)


def test_a_tower_group_on_the_12b_points_at_its_embedder() -> None:
    from gemma4_tune.api import plan

    with pytest.raises(FindingError) as info:
        plan("12b", "text,vision")
    (f,) = info.value.findings
    assert f.code == "G4T102" and "model.embed_vision" in f.message and "'vision-embed'" in f.fix
    _, all_plan, _ = plan("12b", "all")
    assert all_plan.groups == ["text", "vision-embed", "audio-embed"]
    (note,) = [f for f in all_plan.findings if f.code == "G4T201"]
    assert "audio/vision embedder" in note.message and "refuses" not in note.message
    with pytest.raises(FindingError) as info:
        plan("31b", "audio-embed")
    assert [f.code for f in info.value.findings] == ["G4T102"]


@pytest.mark.slow
def test_row31_transformers_12b_masks_images_two_ways_and_training_uses_the_models_own(tiny_models):
    """transformers 5.23: the 12B's plain forward (and generate() with a dynamic cache) ORs each image block
    into every mask after the sliding window; its class's own create_masks_for_generate (generate() with a
    static cache) keeps the global layers causal and the window. This test fails once a release makes them
    agree (then UNIFIED_MASK_AFFECTED and the hook in gemma4_tune.model.patches go)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.model.patches import model_image_masks, unified_masks_are_affected, use_model_image_masks
    from tests.stock.batch import fixed_batch

    path = tiny_models["12b"]
    batch = fixed_batch(str(path), with_audio=False)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def first_logits(cache: str | None) -> torch.Tensor:
        return model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, cache_implementation=cache).logits[0][0]

    with torch.no_grad():
        plain = model(**batch).logits
        dynamic, static = first_logits(None), first_logits("static")
        assert unified_masks_are_affected()
        assert (plain[0, -1] - dynamic).abs().max() < 1e-5
        assert (dynamic - static).abs().max() > 0.1, "upstream made the two masks agree: drop the patch"
        explicit = model(**{**batch, "attention_mask": model_image_masks(model, batch)}).logits
        assert use_model_image_masks(model)
        hooked = model(**batch).logits
        assert (explicit[0, -1] - static).abs().max() < 1e-5
        assert torch.equal(hooked, explicit)
        text = fixed_batch(str(path), with_image=False, with_audio=False)  # no image, no change
        fresh = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        assert torch.equal(model(**text).logits, fresh(**text).logits)


@pytest.mark.slow
@pytest.mark.engine
def test_12b_trains_on_text_image_and_audio_and_every_engine_is_verified(tiny_models, tmp_path) -> None:
    """Train -> export (merged, GGUF) -> verify in PEFT, transformers, vLLM and llama.cpp.

    Every engine matches transformers on text and audio, and llama.cpp on images too (once the
    reference uses the model's own image masks, G4T511). vLLM 0.32 attends the 12B's image tokens causally:
    verify fails those rows and names it (G4T921, row 31).
    """
    from gemma4_tune.data.demo_data import write_demo_dataset

    model = tiny_models["12b"]
    data = write_demo_dataset(tmp_path / "data", n=16)
    run = tmp_path / "run"
    proc = cli("train", "--model", model, "--data", data, "--out", run, "--targets", "text,vision-embed,audio-embed",
               "--max-steps", 4, "--lr", 1e-2, "--batch-size", 4, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert [f["code"] for f in report["preflight"]["findings"]] == ["G4T511"]
    assert set(report["preflight"]["lora_grad"]) == {"text", "vision-embed", "audio-embed"}
    proc = cli("export", "--base", model, "--adapter", run / "adapter", "--merged", tmp_path / "merged",
               "--gguf", tmp_path / "gguf", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads(proc.stdout)
    assert exported["merged"]["tensors_merged"] == 43  # 40 text projections + patch_dense and both projections
    codes = {f["code"] for f in exported["findings"]}
    assert {"G4T201", "G4T210", "G4T914"} <= codes  # embedder LoRA, K=V layers, no adapter GGUF for embedders
    proc = cli("verify", "--base", model, "--adapter", run / "adapter", "--merged", tmp_path / "merged",
               "--gguf", tmp_path / "gguf", "--engine", "peft,transformers,vllm,llama.cpp", "--out",
               tmp_path / "v", "--json")
    result = json.loads(proc.stdout)
    ready = "vllm adapter (text LoRA only, vLLM-ready)"
    verdicts = {(r["engine"].split(" ")[0], r["modalities"][0]): r["verdict"]
                for r in result["engines"] if r["engine"] != ready}
    assert verdicts == {
        ("peft", "text"): "pass", ("peft", "image"): "pass", ("peft", "audio"): "pass",
        ("transformers", "text"): "pass", ("transformers", "image"): "pass", ("transformers", "audio"): "pass",
        ("vllm", "text"): "pass", ("vllm", "image"): "FAIL", ("vllm", "audio"): "pass",
        ("llama.cpp", "text"): "pass", ("llama.cpp", "image"): "pass", ("llama.cpp", "audio"): "pass"}
    # the K=V layers' k_proj LoRA duplicated onto v_proj (G4T210) serves the text part exactly
    assert [r["verdict"] for r in result["engines"] if r["engine"] == ready] == ["pass"]
    assert all(r["adapter_effect"] > r["tolerance"] for r in result["engines"])
    assert {f["code"] for f in result["findings"] if f["severity"] == "error"} == {"G4T921"}
    assert proc.returncode != 0
