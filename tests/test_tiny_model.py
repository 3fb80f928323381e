"""Tiny models keep each variant's structure and load with stock tools (issue: foundation)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gemma4_tune.model.catalog import resolve_variant
from gemma4_tune.model.profile import ModelProfile
from gemma4_tune.model.tiny import VLLM_SOFT_TOKENS_FIELD
from tests.conftest import VARIANTS
from tests.test_catalog import flags

STOCK_LOADER = Path(__file__).parent / "stock" / "load_model.py"


def stock_load(path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(STOCK_LOADER), str(path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_loads_in_stock_transformers_and_runs(tiny_models: dict, variant: str) -> None:
    path = tiny_models[variant]
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 8_000_000, f"tiny model is {size} bytes"
    report = stock_load(path)
    assert not report["gemma4_tune_imported"]
    assert report["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                      "error_msgs": []}
    assert report["logits_finite"] and len(report["new_tokens"]) >= 1
    profile = ModelProfile.from_pretrained(path, count_parameters=False)
    assert report["processor_class"] == profile.family.processor_class
    assert report["tokenizer_class"] == "GemmaTokenizer"
    assert "mm_token_type_ids" in report["batch_keys"] and "pixel_values" in report["batch_keys"]
    assert report["rendered"].startswith("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n")
    assert report["rendered"].endswith("<|turn>model\n")
    has_audio = resolve_variant(variant).config.get("audio_config") is not None
    assert ("input_features" in report["batch_keys"]) == has_audio
    config = json.loads((path / "config.json").read_text())
    ids = report["special_ids"]
    assert ids["image_token"] == config["image_token_id"] and ids["boi_token"] == config["boi_token_id"]
    assert ids["eoi_token"] == config["eoi_token_id"] and report["video_id"] == config["video_token_id"]
    if has_audio:
        assert ids["audio_token"] == config["audio_token_id"] and ids["boa_token"] == config["boa_token_id"]
    assert config["vision_config"][VLLM_SOFT_TOKENS_FIELD[profile.model_type]] == 70, "vLLM reads it"


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_profile_keeps_the_catalog_feature_flags(tiny_models: dict, variant: str) -> None:
    tiny = ModelProfile.from_pretrained(tiny_models[variant])
    published = ModelProfile.from_variant(resolve_variant(variant))
    assert tiny.tiny and tiny.variant == published.variant
    assert flags(tiny) == flags(published)
    assert {layer.attention for layer in tiny.layers} == {"sliding", "full"}
    assert tiny.max_head_dim > min(layer.head_dim for layer in tiny.layers), "global layers keep a wider head"
    assert [t.name for t in tiny.towers] == [t.name for t in published.towers]
    assert [t.clipped_linears for t in tiny.towers] == [t.clipped_linears for t in published.towers]
    assert [e.name for e in tiny.embedders] == [e.name for e in published.embedders]
    # without a tower (the 12B) the embedder takes raw 48x48 patches and raw audio frames: same width as published
    assert [e.input_size for e in tiny.embedders if not tiny.tower(e.name)] == [
        e.input_size for e in published.embedders if not published.tower(e.name)]
    if published.num_kv_shared_layers:
        producers = {layer.attention for layer in tiny.layers if layer.kv_sharing == "store"}
        assert producers == {"sliding", "full"}
        assert any(layer.double_wide_mlp for layer in tiny.layers) == published.use_double_wide_mlp
    assert tiny.parameters["total"] < 2_000_000


@pytest.mark.slow
def test_kv_shared_layers_keep_official_keys_in_the_checkpoint(tiny_models: dict) -> None:
    """Failure-catalog row 7: official E2B/E4B files carry k/v/k_norm for KV-shared layers."""
    path = tiny_models["e2b"]
    profile = ModelProfile.from_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for layer in profile.layers:
        prefix = f"model.language_model.layers.{layer.index}.self_attn."
        assert {prefix + "k_proj.weight", prefix + "v_proj.weight", prefix + "k_norm.weight"} <= keys


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_tower_clamps_are_finite_and_change_the_output(tiny_models: dict, variant: str) -> None:
    """Failure-catalog row 2: a fix that drops the clamps must be visible on tiny models."""
    from transformers import Gemma4ForConditionalGeneration
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    model = Gemma4ForConditionalGeneration.from_pretrained(tiny_models[variant]).eval()
    clipped = [m for m in model.modules() if isinstance(m, Gemma4ClippableLinear) and m.use_clipped_linears]
    assert clipped and all(torch.isfinite(m.input_max) and torch.isfinite(m.output_min) for m in clipped)
    vc = model.config.vision_config
    side = 24
    pixels = torch.rand((1, side * side, 3 * vc.patch_size**2), generator=torch.Generator().manual_seed(1))
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], -1).unsqueeze(0)
    with torch.no_grad():
        clamped = model.model.vision_tower(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
        for m in clipped:
            for buf in (m.input_min, m.output_min):
                buf.fill_(-float("inf"))
            for buf in (m.input_max, m.output_max):
                buf.fill_(float("inf"))
        unclamped = model.model.vision_tower(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
    assert (clamped - unclamped).abs().max() > 1e-4


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, tiny_models: dict) -> None:
    from gemma4_tune.api import tiny_model

    def digest(p: Path) -> str:
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    again = tiny_model("31b", tmp_path / "again", seed=0)
    other = tiny_model("31b", tmp_path / "other", seed=1)
    assert digest(again) == digest(tiny_models["31b"])
    assert digest(other) != digest(again)
