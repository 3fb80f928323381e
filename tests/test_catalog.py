"""The catalog holds the published configs of the official variants, with sources."""

from __future__ import annotations

import pytest

from gemma4_tune.findings import FindingError
from gemma4_tune.model.catalog import ALIASES, resolve_variant, variants
from gemma4_tune.model.profile import ModelProfile

EXPECTED = {
    # variant: (KV sharing, PLE, double-wide MLP, K=V, MoE, bidirectional vision, audio input)
    "gemma-4-e2b": (True, True, True, False, False, False, True),
    "gemma-4-e4b": (True, True, False, False, False, False, True),
    "gemma-4-26b-a4b": (False, False, False, True, True, True, False),
    "gemma-4-31b": (False, False, False, True, False, True, False),
    "gemma-4-12b": (False, False, False, True, False, True, True),
}


def flags(profile: ModelProfile) -> tuple[bool, ...]:
    return (
        profile.num_kv_shared_layers > 0,
        profile.ple_hidden_size > 0,
        profile.use_double_wide_mlp,
        profile.attention_k_eq_v,
        profile.moe is not None,
        profile.bidirectional_attention == "vision",
        profile.has_part("audio"),
    )


def test_catalog_has_the_four_official_families_with_public_sources() -> None:
    table = variants()
    assert set(EXPECTED) <= set(table)
    for variant in table.values():
        assert variant.sources and all(s.startswith("https://") for s in variant.sources)
        assert variant.hf_repos["base"].startswith("google/") and variant.hf_repos["it"].endswith("-it")


@pytest.mark.parametrize("variant_id", sorted(EXPECTED))
def test_published_config_builds_and_has_the_variant_features(variant_id: str) -> None:
    profile = ModelProfile.from_variant(variants()[variant_id])
    assert flags(profile) == EXPECTED[variant_id]
    assert profile.has_part("vision")
    assert profile.max_head_dim == 512, "global layers use head_dim 512 (failure-catalog row 14)"
    assert {layer.attention for layer in profile.layers} == {"sliding", "full"}
    assert profile.layers[-1].attention == "full"
    assert profile.tied_embeddings
    assert profile.parameters["total"] > 1_000_000_000


def test_12b_is_encoder_free_and_counts_the_published_parameters() -> None:
    """Row 37: the 12B has no towers; images and audio enter through embedders only."""
    variant = variants()["gemma-4-12b"]
    profile = ModelProfile.from_variant(variant)
    assert profile.model_type == "gemma4_unified" and profile.towers == []
    assert [(e.name, e.module_prefix, e.input_size) for e in profile.embedders] == [
        ("vision", "model.embed_vision", 48 * 48 * 3), ("audio", "model.embed_audio", 640)]
    full = [layer for layer in profile.layers if layer.attention == "full"]
    assert (len(profile.layers), len(full), profile.sliding_window) == (48, 8, 1024)
    assert all(layer.k_eq_v and layer.num_kv_heads == 1 and layer.head_dim == 512 for layer in full)
    assert profile.ple_hidden_size == 0 and profile.moe is None and profile.hidden_size == 3840
    # the Hugging Face API counts 11,959,730,224 safetensors values: these parameters and one
    # layer_scalar buffer per decoder layer; the model card says 11.95B
    assert profile.parameters["total"] + profile.num_layers == 11_959_730_224
    assert variant.published_parameters["total"] == "11.95B"
    assert set(profile.parameters) == {"embeddings", "vision_embedder", "audio_embedder", "text_decoder", "total"}


def test_kv_shared_variants_have_sliding_and_full_producers() -> None:
    profile = ModelProfile.from_variant(variants()["gemma-4-e2b"])
    producers = {layer.attention for layer in profile.layers if layer.kv_sharing == "store"}
    assert producers == {"sliding", "full"}
    assert all(layer.attention_projections == ["q_proj", "o_proj"]
               for layer in profile.layers if layer.kv_sharing == "reuse")


@pytest.mark.parametrize("name", [*ALIASES, "google/gemma-4-E2B-it", "GEMMA-4-31B"])
def test_variants_resolve_by_short_name_catalog_id_or_repo(name: str) -> None:
    assert resolve_variant(name).id in EXPECTED


def test_unknown_variant_is_a_finding_naming_the_choices() -> None:
    with pytest.raises(FindingError) as info:
        resolve_variant("gemma-5-7b")
    (f,) = info.value.findings
    assert f.code == "G4T003" and "e2b" in f.fix
