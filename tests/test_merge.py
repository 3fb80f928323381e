"""Streaming merge: the merged checkpoint is the trained model, in the official layout (issue: merge).

The reference is always stock PEFT: ``PeftModel.from_pretrained(base, adapter)`` (base + adapter) and
its ``merge_and_unload()``. Bases are re-typed copies of the tiny models (fp32 / fp64, same keys,
written with safetensors, not save_pretrained, so the official key set incl. KV-shared k/v/k_norm
keys survives) so that "equal" can mean 1e-6.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gemma4_tune.export import merge as merge_mod
from gemma4_tune.export.manifest import (
    MANIFEST_NAME,
    base_fingerprint,
    check_adapter_matches_base,
    read_checkpoint,
    resolve_adapter,
    write_manifest,
)
from gemma4_tune.export.merge import MODELFILE, lora_delta, merge_adapter, plan_shards
from gemma4_tune.findings import FindingError

SPECS = {"e2b": "text,vision,audio", "e4b": "text,vision,audio", "26b-a4b": "text,vision", "31b": "text,vision",
         "12b": "text,vision-embed,audio-embed"}
VARIANTS = list(SPECS)
TOWER_VARIANTS = ["e2b", "e4b", "26b-a4b", "31b"]  # the 12B has no towers (row 37)
CLAMPS = ("input_min", "input_max", "output_min", "output_max")
TOL = 1e-6


# --------------------------------------------------------------------------- helpers


def _retyped_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """The same checkpoint with float tensors in ``dtype``: same files, same keys (safetensors, not save_pretrained)."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    for part in (config, *(config.get(k) for k in ("text_config", "vision_config", "audio_config"))):
        if isinstance(part, dict):
            part["dtype"] = name
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _load_model(path: Path, dtype: torch.dtype, **kwargs):
    """Stock ``from_pretrained``; fp64 needs the eager experts (grouped_mm has no fp64 kernel)."""
    from transformers import AutoModelForImageTextToText

    if dtype == torch.float64:
        kwargs["experts_implementation"] = "eager"
    loaded = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.eval()
    return loaded


def _make_adapter(base: Path, out: Path, spec: str, dtype: torch.dtype, *, seed: int = 1, config=None) -> Path:
    """A LoRA adapter made through the user's code path, with random (non-zero) factors."""
    from gemma4_tune.plan.adapters import LoraSettings, prepare_model, save_adapter

    model = _load_model(base, dtype)
    if config is None:
        peft_model, plan = prepare_model(model, spec, LoraSettings(rank=4))
    else:
        from peft import get_peft_model

        peft_model, plan = get_peft_model(model, config), None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.05)
    return save_adapter(peft_model, out, plan=plan)


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@dataclass
class Case:
    """One variant: base, adapter, merged output, and what stock PEFT says the model computes."""

    variant: str
    base: Path
    adapter: Path
    merged: Path
    result: merge_mod.MergeResult
    loading_info: dict
    logits_merged: torch.Tensor  # our merged checkpoint, loaded by stock transformers
    logits_peft: torch.Tensor  # stock PeftModel base + adapter
    logits_peft_merged: torch.Tensor  # stock merge_and_unload()
    logits_base: torch.Tensor
    peft_state: dict[str, torch.Tensor]  # what merge_and_unload() + save_pretrained() write, by checkpoint key


def _build_case(tiny: Path, root: Path, variant: str, dtype: torch.dtype) -> Case:
    from peft import PeftModel

    from tests.stock.batch import fixed_batch

    base = _retyped_copy(tiny, root / "base", dtype)
    adapter = _make_adapter(base, root / "adapter", SPECS[variant], dtype)
    result = merge_adapter(base, adapter, root / "merged", progress=False)
    batch = fixed_batch(str(base))
    with torch.no_grad():
        model, info = _load_model(result.out_dir, dtype, output_loading_info=True)
        logits_merged = model(**batch).logits
        peft_model = PeftModel.from_pretrained(_load_model(base, dtype), str(adapter)).eval()
        logits_peft = peft_model(**batch).logits
        with peft_model.disable_adapter():
            logits_base = peft_model(**batch).logits
        unloaded = peft_model.merge_and_unload()
        logits_peft_merged = unloaded(**batch).logits
    # saved, so keys are the checkpoint's (the 12B stores embed_vision.patch_dense as vision_embedder.patch_dense)
    unloaded.save_pretrained(str(root / "peft-merged"))
    state = _load_dir(root / "peft-merged")
    return Case(variant, base, adapter, result.out_dir, result, info, logits_merged, logits_peft,
                logits_peft_merged, logits_base, state)


@pytest.fixture(scope="module")
def cases(tiny_models, tmp_path_factory):
    """Lazily built fp32 cases, one per variant."""
    built: dict[str, Case] = {}

    def get(variant: str) -> Case:
        if variant not in built:
            root = tmp_path_factory.mktemp(f"merge-{variant}")
            built[variant] = _build_case(tiny_models[variant], root, variant, torch.float32)
        return built[variant]

    return get


def _codes(exc: pytest.ExceptionInfo) -> set[str]:
    return {f.code for f in exc.value.findings}


# --------------------------------------------------------------------------- stock loading and parity


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_checkpoint_loads_in_stock_transformers_with_empty_loading_info(cases, variant):
    case = cases(variant)
    assert {k: sorted(map(str, v)) for k, v in case.loading_info.items()} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert case.result.tensors_merged > 0
    assert case.result.tensors_merged + case.result.tensors_copied == len(read_checkpoint(case.base))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_equals_peft_merge_and_unload_tensor_for_tensor(cases, variant):
    case = cases(variant)
    merged = _load_dir(case.merged)
    base = _load_dir(case.base)
    for key, tensor in merged.items():
        reference = case.peft_state.get(key, base[key])  # keys the model drops (row 7) must equal the base
        assert tensor.dtype == reference.dtype, key
        assert tensor.shape == reference.shape, key
        assert (tensor.double() - reference.double()).abs().max().item() <= TOL if tensor.numel() else True, key
    # every module of the merged model is in the file (lm_head is tied to the embeddings)
    assert set(case.peft_state) - set(merged) <= {"lm_head.weight"}
    assert (case.logits_merged - case.logits_peft_merged).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_logits_equal_peft_base_plus_adapter_fp32(cases, variant):
    case = cases(variant)
    assert (case.logits_base - case.logits_peft).abs().max().item() > 1e-2, "the adapter must change the model"
    ours = (case.logits_merged - case.logits_peft).abs().max().item()
    # fp32 reassociation (x W^T + s (x A^T) B^T vs x (W + s B A)^T) costs ~1e-5 to 2e-4 on logits (the 12B: 1.5e-4
    # with two threads, 2.1e-4 with one, on an AVX-512 CPU): no more than PEFT's own merge_and_unload; the fp64
    # test below shows the 1e-6 equality itself.
    peft_own = (case.logits_peft_merged - case.logits_peft).abs().max().item()
    assert ours <= peft_own + TOL
    assert ours <= 5e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_logits_equal_peft_base_plus_adapter_fp64(tiny_models, tmp_path, variant):
    from peft import PeftModel

    from tests.stock.batch import fixed_batch

    base = _retyped_copy(tiny_models[variant], tmp_path / "base", torch.float64)
    adapter = _make_adapter(base, tmp_path / "adapter", SPECS[variant], torch.float64)
    out = merge_adapter(base, adapter, tmp_path / "merged", progress=False).out_dir
    # the audio tower hard-codes .float() in its attention, so fp64 runs without audio (the fp32 tests have it)
    batch = fixed_batch(str(base), with_audio=False)
    with torch.no_grad():
        ours = _load_model(out, torch.float64)(**batch).logits
        peft = PeftModel.from_pretrained(_load_model(base, torch.float64), str(adapter)).eval()
        reference = peft(**batch).logits
        with peft.disable_adapter():
            plain = peft(**batch).logits
    assert (plain - reference).abs().max().item() > 1e-2
    assert (ours - reference).abs().max().item() <= TOL


# --------------------------------------------------------------------------- key layout (rows 2, 7)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_row07_merged_key_set_equals_base_incl_kv_shared_keys(cases, variant):
    case = cases(variant)
    base_keys, merged_keys = set(read_checkpoint(case.base)), set(read_checkpoint(case.merged))
    assert merged_keys == base_keys
    dropped_by_model = base_keys - set(case.peft_state)
    if variant in ("e2b", "e4b"):
        # official E2B/E4B checkpoints carry k/v/k_norm for KV-shared layers; save_pretrained would drop them
        assert dropped_by_model, "the tiny E2B/E4B base should carry KV-shared k/v/k_norm keys"
        assert all(any(f".self_attn.{p}." in k for p in ("k_proj", "v_proj", "k_norm")) for k in dropped_by_model)
        base, merged = _load_dir(case.base), _load_dir(case.merged)
        for key in dropped_by_model:
            assert torch.equal(base[key], merged[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("variant", TOWER_VARIANTS)
def test_row02_tower_linear_keys_and_clamp_buffers_kept(cases, variant):
    case = cases(variant)
    base, merged = _load_dir(case.base), _load_dir(case.merged)
    tower_linear = [k for k in merged if "_tower." in k and k.endswith(".linear.weight")]
    assert tower_linear
    for key in tower_linear:  # never renamed to ...q_proj.weight
        assert key.removesuffix(".linear.weight") + ".weight" not in merged
    assert any(not torch.equal(base[k], merged[k]) for k in tower_linear), "tower LoRA was merged"
    clamps = sorted(k for k in merged if k.rsplit(".", 1)[-1] in CLAMPS)
    assert clamps == sorted(k for k in base if k.rsplit(".", 1)[-1] in CLAMPS)
    if '"use_clipped_linears": true' in (case.base / "config.json").read_text():  # E2B/E4B towers
        assert clamps
    for key in clamps:
        assert torch.equal(base[key], merged[key]), key


# --------------------------------------------------------------------------- MoE experts (row 17)


@pytest.mark.slow
def test_row17_expert_keys_map_to_parameters_in_peft_nesting_order(cases):
    case = cases("26b-a4b")
    layout = resolve_adapter(case.adapter, case.base)
    prefix = "base_model.model.model.language_model.layers.0.experts"
    down = layout.deltas["model.language_model.layers.0.experts.down_proj"][0]
    gate_up = layout.deltas["model.language_model.layers.0.experts.gate_up_proj"][0]
    assert (down.lora_a, down.lora_b) == (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
    assert (gate_up.lora_a, gate_up.lora_b) == (f"{prefix}.base_layer.lora_A.weight",
                                                f"{prefix}.base_layer.lora_B.weight")
    assert down.kind == gate_up.kind == "experts" and down.num_experts == 4


@pytest.mark.slow
def test_row17_expert_merge_uses_peft_layout(cases):
    case = cases("26b-a4b")
    layout = resolve_adapter(case.adapter, case.base)
    adapter = load_file(case.adapter / "adapter_model.safetensors")
    base, merged = _load_dir(case.base), _load_dir(case.merged)
    key = "model.language_model.layers.1.experts.gate_up_proj"
    (delta,) = layout.deltas[key]
    a, b = adapter[delta.lora_a], adapter[delta.lora_b]
    n, r = delta.num_experts, delta.rank
    # lora_A rows are expert-major (e*r + k), lora_B columns rank-major (k*n + e)
    expected = torch.stack([b[:, e::n] @ a[e * r:(e + 1) * r] for e in range(n)]) * delta.scaling
    assert torch.allclose(merged[key] - base[key], expected, atol=1e-6)
    assert torch.allclose(lora_delta(delta, a, b), expected, atol=1e-6)
    # the other reading of lora_B (expert-major columns) gives another model: the check discriminates
    wrong = torch.stack([b[:, e * r:(e + 1) * r] @ a[e * r:(e + 1) * r] for e in range(n)]) * delta.scaling
    assert (wrong - expected).abs().max() > 1e-3
    assert torch.allclose(merged[key], case.peft_state[key], atol=TOL)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
def test_rslora_rank_pattern_and_alpha_pattern_match_peft(tiny_models, tmp_path):
    from peft import LoraConfig, PeftModel

    base = _retyped_copy(tiny_models["26b-a4b"], tmp_path / "base", torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                        target_modules=r".*language_model.*\.(q_proj|o_proj)|.*vision_tower.*\.linear",
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                        rank_pattern={"q_proj": 8, "experts.gate_up_proj": 2},
                        alpha_pattern={"o_proj": 3, "experts.down_proj": 5})
    adapter = _make_adapter(base, tmp_path / "adapter", "", torch.float32, config=config)
    layout = resolve_adapter(adapter, base)
    scalings = {d.scaling for ds in layout.deltas.values() for d in ds}
    assert len(scalings) >= 4  # 8/2, 8/sqrt(8), 3/2, 8/sqrt(2), 5/2
    out = merge_adapter(base, adapter, tmp_path / "merged", progress=False).out_dir
    peft = PeftModel.from_pretrained(_load_model(base, torch.float32), str(adapter)).merge_and_unload()
    reference = peft.state_dict()
    for key, tensor in _load_dir(out).items():
        assert (tensor - reference[key]).abs().max().item() <= TOL, key


@pytest.mark.slow
def test_bf16_base_keeps_dtypes_and_rounds_once(tiny_models, tmp_path):
    from peft import PeftModel

    base = tiny_models["26b-a4b"]
    adapter = _make_adapter(base, tmp_path / "adapter", SPECS["26b-a4b"], torch.float32)
    out = merge_adapter(base, adapter, tmp_path / "merged", progress=False).out_dir
    base_info, merged_info = read_checkpoint(base), read_checkpoint(out)
    assert {k: (v.dtype, v.shape) for k, v in base_info.items()} == \
        {k: (v.dtype, v.shape) for k, v in merged_info.items()}
    # reference: PEFT's fp32 merge of the bf16 weights, rounded to bf16 once
    reference = PeftModel.from_pretrained(_load_model(base, torch.float32), str(adapter)).merge_and_unload()
    reference = reference.state_dict()
    merged = _load_dir(out)
    assert set(merged) <= set(reference)
    for key, tensor in merged.items():
        assert torch.equal(tensor, reference[key].to(tensor.dtype)), key


# --------------------------------------------------------------------------- shards, files, Ollama


@pytest.mark.slow
def test_multi_shard_output_has_index_covering_every_key(cases, tmp_path):
    case = cases("26b-a4b")
    result = merge_adapter(case.base, case.adapter, tmp_path / "sharded", shard_size_mb=1, progress=False)
    out = result.out_dir
    assert len(result.shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_checkpoint(case.base))
    assert set(index["weight_map"].values()) == set(result.shards)
    for shard in result.shards:
        with safe_open(out / shard, "pt") as f:
            keys = list(f.keys())
            assert f.metadata() == {"format": "pt"}
            assert {index["weight_map"][k] for k in keys} == {shard}
        infos = [t for t in read_checkpoint(out).values() if t.file.name == shard]
        assert sum(t.nbytes for t in infos) <= 1_000_000 or len(infos) == 1
    single, sharded = _load_dir(case.merged), _load_dir(out)
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    _, info = _load_model(out, torch.float32, output_loading_info=True)
    assert not any(info.values())


@pytest.mark.slow
def test_non_weight_files_copied_and_modelfile_written(cases):
    case = cases("e2b")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "processor_config.json"):
        assert (case.merged / name).read_bytes() == (case.base / name).read_bytes(), name
    modelfile = (case.merged / MODELFILE).read_text()
    lines = [line for line in modelfile.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM ."
    assert 'PARAMETER stop "<turn|>"' in lines
    assert not any(line.split()[0] in ("ADAPTER", "TEMPLATE") for line in lines)
    assert "v0.34.1" in modelfile


# --------------------------------------------------------------------------- refusals and crashes


@pytest.mark.slow
def test_adapter_for_another_variant_is_refused(cases, tmp_path):
    e2b, e4b = cases("e2b"), cases("e4b")
    with pytest.raises(FindingError) as exc:
        merge_adapter(e4b.base, e2b.adapter, tmp_path / "out", progress=False)
    assert _codes(exc) == {"G4T802"}
    assert not (tmp_path / "out").exists()
    with_manifest = shutil.copytree(e2b.adapter, tmp_path / "adapter")
    write_manifest(with_manifest, e2b.base, training={"rank": 4}, versions={"peft": "test"})
    with pytest.raises(FindingError) as exc:
        check_adapter_matches_base(with_manifest, e4b.base)
    assert _codes(exc) == {"G4T801", "G4T802"}
    assert exc.value.findings[0].code == "G4T801"
    assert str(e2b.base.resolve()) in exc.value.findings[0].message


@pytest.mark.slow
def test_manifest_refuses_same_shaped_base_with_other_weights(cases, tmp_path):
    from gemma4_tune.api import tiny_model

    case = cases("31b")
    other = _retyped_copy(tiny_model("31b", tmp_path / "seed1", seed=1), tmp_path / "other", torch.float32)
    adapter = shutil.copytree(case.adapter, tmp_path / "adapter")
    check_adapter_matches_base(adapter, other)  # without a manifest the shapes fit: nothing to tell them apart
    write_manifest(adapter, case.base, training={"rank": 4}, versions={})
    check_adapter_matches_base(adapter, case.base)
    fp_base, fp_other = base_fingerprint(case.base), base_fingerprint(other)
    assert fp_base["tensors_sha256"] == fp_other["tensors_sha256"]
    assert fp_base["config_sha256"] == fp_other["config_sha256"]
    with pytest.raises(FindingError) as exc:
        merge_adapter(other, adapter, tmp_path / "out", progress=False)
    assert _codes(exc) == {"G4T801"}
    assert fp_base["sample_sha256"][:12] in exc.value.findings[0].message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dora_adapter_is_refused(tiny_models, tmp_path):
    from peft import LoraConfig

    base = _retyped_copy(tiny_models["31b"], tmp_path / "base", torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True,
                        target_modules=r".*language_model.*\.(q_proj|v_proj)")
    adapter = _make_adapter(base, tmp_path / "adapter", "", torch.float32, config=config)
    with pytest.raises(FindingError) as exc:
        merge_adapter(base, adapter, tmp_path / "out", progress=False)
    assert "G4T803" in _codes(exc)
    assert any("DoRA" in f.message for f in exc.value.findings)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_crash_mid_merge_leaves_no_out_dir(cases, tmp_path, monkeypatch):
    case = cases("31b")
    calls = {"n": 0}
    real = merge_mod._write_tensor_bytes

    def failing(fh, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(fh, data, offset)

    monkeypatch.setattr(merge_mod, "_write_tensor_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(case.base, case.adapter, tmp_path / "out", progress=False)
    assert calls["n"] in (5, 6)  # the failure surfaces when its buffer is next needed: one write may follow
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- without models (fast)


def _synthetic(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A two-tensor 'checkpoint' and a rank-2 linear adapter for it, written by hand."""
    gen = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    weights = {"model.language_model.layers.0.self_attn.q_proj.weight": torch.randn(8, 4, generator=gen),
               "model.language_model.layers.0.input_layernorm.weight": torch.randn(4, generator=gen)}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "gemma4", "transformers_version": "5.0",
                                                  "text_config": {"hidden_size": 4, "dtype": "float32"}}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6,
                                                             "target_modules": ["q_proj"], "bias": "none"}))
    prefix = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    lora = {f"{prefix}.lora_A.weight": torch.randn(2, 4, generator=gen),
            f"{prefix}.lora_B.weight": torch.randn(8, 2, generator=gen)}
    save_file(lora, adapter / "adapter_model.safetensors")
    return base, adapter, {**weights, **lora}


def test_synthetic_linear_merge_is_w_plus_scaled_ba(tmp_path):
    base, adapter, t = _synthetic(tmp_path)
    result = merge_adapter(base, adapter, tmp_path / "out", progress=False)
    merged = load_file(result.out_dir / "model.safetensors")
    q = "model.language_model.layers.0.self_attn.q_proj"
    lora_b, lora_a = t[f"base_model.model.{q}.lora_B.weight"], t[f"base_model.model.{q}.lora_A.weight"]
    expected = t[f"{q}.weight"] + (lora_b @ lora_a) * 3.0  # alpha 6 / r 2
    assert torch.equal(merged[f"{q}.weight"], expected)
    assert torch.equal(merged["model.language_model.layers.0.input_layernorm.weight"],
                       t["model.language_model.layers.0.input_layernorm.weight"])
    assert (result.tensors_merged, result.tensors_copied) == (1, 1)
    assert result.peak_rss_mb > 0 and result.bytes_written == (result.out_dir / "model.safetensors").stat().st_size


def test_non_finite_merge_is_refused_and_leaves_nothing(tmp_path):
    base, adapter, _ = _synthetic(tmp_path)
    lora = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    lora[key][0, 0] = float("nan")
    save_file(lora, adapter / "adapter_model.safetensors")
    with pytest.raises(FindingError) as exc:
        merge_adapter(base, adapter, tmp_path / "out", progress=False)
    assert _codes(exc) == {"G4T806"}
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_base_value_under_lora_is_refused(tmp_path, value):
    """The finiteness check goes through a sum: one bad value among finite ones must still be caught."""
    base, adapter, t = _synthetic(tmp_path)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    weights = load_file(base / "model.safetensors")
    weights[q][5, 2] = value
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FindingError) as exc:
        merge_adapter(base, adapter, tmp_path / "out", progress=False)
    assert _codes(exc) == {"G4T806"} and q in exc.value.findings[0].message
    assert not (tmp_path / "out").exists()


def test_finite_values_whose_sum_overflows_are_not_refused(tmp_path):
    """A sum that is inf only because the values are large falls back to the element check: merged, not refused."""
    base, adapter, t = _synthetic(tmp_path)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    weights = load_file(base / "model.safetensors")
    weights[q] = torch.full_like(weights[q], 3e38)
    assert not torch.isfinite(weights[q].sum())
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    merged = load_file(merge_adapter(base, adapter, tmp_path / "out", progress=False).out_dir / "model.safetensors")
    prefix = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    expected = weights[q] + (t[f"{prefix}.lora_B.weight"] @ t[f"{prefix}.lora_A.weight"]) * 3.0
    assert torch.isfinite(merged[q]).all() and torch.equal(merged[q], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_tensor_of_many_blocks_merges_to_the_whole_tensor_computation(tmp_path, dtype):
    """The element-wise part runs block by block: a tensor of several blocks must equal PEFT's whole-tensor
    ``W + (B @ A) * scaling`` in fp32, rounded once, bit for bit."""
    base, adapter, _ = _synthetic(tmp_path)
    gen = torch.Generator().manual_seed(5)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    weights = load_file(base / "model.safetensors")
    weights[q] = (torch.randn(640, 512, generator=gen) * 0.02).to(dtype)
    assert weights[q].numel() > 2 * merge_mod._BLOCK
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    prefix = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    lora = {f"{prefix}.lora_A.weight": torch.randn(2, 512, generator=gen), f"{prefix}.lora_B.weight":
            torch.randn(640, 2, generator=gen) * 0.01}
    save_file(lora, adapter / "adapter_model.safetensors")
    merged = load_file(merge_adapter(base, adapter, tmp_path / "out", progress=False).out_dir / "model.safetensors")
    whole = weights[q].float()
    whole += (lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]) * 3.0
    assert merged[q].dtype == dtype and torch.equal(merged[q], whole.to(dtype))


def _mixed_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """Copied tensors of several dtypes and sizes around two merged ones, in two base shards."""
    base, adapter, _ = _synthetic(tmp_path)
    gen = torch.Generator().manual_seed(3)
    first = load_file(base / "model.safetensors")
    first["model.language_model.embed_tokens.weight"] = torch.randn(300, 4, generator=gen).to(torch.bfloat16)
    first["model.language_model.layers.0.layer_scalar"] = torch.randn(1, generator=gen).to(torch.float16)
    second = {"model.language_model.layers.1.self_attn.q_proj.weight": torch.randn(8, 4, generator=gen),
              "model.language_model.layers.1.mlp.down_proj.weight": torch.randn(4, 4096, generator=gen),
              "model.language_model.norm.weight": torch.randn(4, generator=gen).double()}
    (base / "model.safetensors").unlink()
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for name, part in zip(names, (first, second), strict=True):
        save_file(part, base / name, metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in zip(names, (first, second), strict=True) for k in part}}))
    prefix = "base_model.model.model.language_model.layers.{}.self_attn.q_proj"
    lora = load_file(adapter / "adapter_model.safetensors")
    lora.update({f"{prefix.format(1)}.lora_A.weight": torch.randn(2, 4, generator=gen),
                 f"{prefix.format(1)}.lora_B.weight": torch.randn(8, 2, generator=gen)})
    save_file(lora, adapter / "adapter_model.safetensors")
    return base, adapter


def _tensor_bytes(model_dir: Path) -> dict[str, bytes]:
    """Each tensor's stored bytes, read from the file (not through safetensors)."""
    out = {}
    for info in read_checkpoint(model_dir).values():
        with open(info.file, "rb") as fh:
            fh.seek(info.start)
            out[info.name] = fh.read(info.nbytes)
    return out


def test_every_copy_way_writes_the_base_bytes_and_the_same_files(tmp_path, monkeypatch):
    """copy_file_range, sendfile and the buffered copy (each used where the one before is refused) give
    byte-identical checkpoints; every unchanged tensor holds exactly the base's bytes."""
    import errno
    import os

    base, adapter = _mixed_checkpoint(tmp_path)
    base_bytes = _tensor_bytes(base)
    outputs = {}

    def refuse(*_args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    for way, refused in (("copy_file_range", ()), ("sendfile", ("copy_file_range",)),
                         ("buffered", ("copy_file_range", "sendfile"))):
        for name in refused:
            monkeypatch.setattr(os, name, refuse)
        result = merge_adapter(base, adapter, tmp_path / way, shard_size_mb=1, progress=False)
        assert result.copied_by == [way] and (result.tensors_merged, result.tensors_copied) == (2, 5)
        outputs[way] = {p.name: p.read_bytes() for p in sorted(result.out_dir.glob("*.safetensors*"))}
        merged_bytes = _tensor_bytes(result.out_dir)
        assert set(merged_bytes) == set(base_bytes)
        changed = {k for k in base_bytes if merged_bytes[k] != base_bytes[k]}
        assert changed == {f"model.language_model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)}
    assert outputs["copy_file_range"] == outputs["sendfile"] == outputs["buffered"]


def test_fingerprint_ignores_save_noise_and_sees_shapes_and_weights(tmp_path):
    base, _, _ = _synthetic(tmp_path)
    before = base_fingerprint(base)
    assert before["num_tensors"] == 2
    config = json.loads((base / "config.json").read_text())
    config.update(transformers_version="9.9", _name_or_path="/elsewhere", torch_dtype="bfloat16")
    config["text_config"]["dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(config, indent=4))
    assert base_fingerprint(base) == before
    tensors = load_file(base / "model.safetensors")
    tensors["model.language_model.layers.0.input_layernorm.weight"] += 1
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    after = base_fingerprint(base)
    assert after["tensors_sha256"] == before["tensors_sha256"] and after["sample_sha256"] != before["sample_sha256"]
    tensors["model.language_model.layers.0.input_layernorm.weight"] = torch.zeros(5)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    assert base_fingerprint(base)["tensors_sha256"] != before["tensors_sha256"]


def test_manifest_records_base_and_check_passes_on_it(tmp_path):
    base, adapter, _ = _synthetic(tmp_path)
    path = write_manifest(adapter, base, training={"rank": 2, "lr": 1e-4}, versions={"peft": "0.21.2"})
    assert path.name == MANIFEST_NAME
    data = json.loads(path.read_text())
    assert data["base"]["fingerprint"] == base_fingerprint(base)
    assert data["base"]["path"] == str(base.resolve()) and data["training"]["rank"] == 2
    check_adapter_matches_base(adapter, base)
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["hidden_size"] = 5
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(FindingError) as exc:
        check_adapter_matches_base(adapter, base)
    assert _codes(exc) == {"G4T801"}


def test_row02_unwrapped_tower_adapter_is_refused_with_the_reason(tmp_path):
    base, adapter, t = _synthetic(tmp_path)
    tensors = load_file(base / "model.safetensors")
    tensors["model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"] = torch.zeros(4, 4)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    lora = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"  # no .linear: unwrapped
    lora.update({f"{prefix}.lora_A.weight": torch.zeros(2, 4), f"{prefix}.lora_B.weight": torch.zeros(4, 2)})
    save_file(lora, adapter / "adapter_model.safetensors")
    with pytest.raises(FindingError) as exc:
        check_adapter_matches_base(adapter, base)
    assert _codes(exc) == {"G4T808"}  # one finding with the count and the repair, not a G4T802 per module
    assert "row-2" in exc.value.findings[0].message and "gemma4-tune repair" in exc.value.findings[0].fix


def test_shape_mismatch_unknown_tensors_and_empty_tensors_are_refused(tmp_path):
    base, adapter, _ = _synthetic(tmp_path)
    lora = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**lora, key: torch.zeros(2, 5)}, adapter / "adapter_model.safetensors")
    with pytest.raises(FindingError) as exc:
        check_adapter_matches_base(adapter, base)
    assert _codes(exc) == {"G4T802"} and "in-features" in exc.value.findings[0].message
    save_file({**lora, "base_model.model.x.lora_magnitude_vector": torch.zeros(3)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(FindingError) as exc:
        check_adapter_matches_base(adapter, base)
    assert _codes(exc) == {"G4T803"}
    save_file({k: torch.zeros(0, 4) if "lora_A" in k else v for k, v in lora.items()},
              adapter / "adapter_model.safetensors")
    with pytest.raises(FindingError) as exc:
        check_adapter_matches_base(adapter, base)
    assert _codes(exc) == {"G4T805"} and "row 23" in exc.value.findings[0].message
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FindingError) as exc:
        merge_adapter(base, adapter, tmp_path / "out", progress=False)
    assert _codes(exc) == {"G4T805"}


def test_plan_shards_bounds_size_and_keeps_alignment(tmp_path):
    tensors = {"a": torch.zeros(3, dtype=torch.bfloat16), "b": torch.zeros(300_000), "c": torch.zeros(10),
               "d": torch.zeros(5, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    infos = list(read_checkpoint(tmp_path).values())
    (single,) = plan_shards(infos, 2000)
    assert single.name == "model.safetensors"
    assert [t.itemsize for t in single.tensors] == sorted((t.itemsize for t in single.tensors), reverse=True)
    shards = plan_shards(infos, 1)
    assert [s.name for s in shards][0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(t.name for s in shards for t in s.tensors) == sorted(tensors)
    for s in shards:
        assert sum(t.nbytes for t in s.tensors) <= 1_000_000 or len(s.tensors) == 1
    with pytest.raises(ValueError):
        plan_shards(infos, 0)
