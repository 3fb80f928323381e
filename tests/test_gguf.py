"""GGUF export with llama.cpp's own converters, verified in a real llama.cpp against transformers.

The engine tests need llama.cpp (``gemma4-tune engines install llama.cpp``: converters + prebuilt
runtime). They skip when it is missing, unless ``GEMMA4_TUNE_REQUIRE_ENGINES`` is set (CI): then
they fail with G4T911 instead. Converted files are shared per model through module fixtures; each
conversion takes ~5 s on CPU, a llama.cpp run of the three prompts well under a second. The fixtures
merge a LoRA on the text and the towers (the merged GGUF + mmproj then carry tower deltas that the
image and audio rows must show) and convert its text part as the adapter GGUF.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_tune.engines import glibc_compat, llamacpp_env
from gemma4_tune.export.gguf import (
    BOUNDED_CONVERTERS,
    CHUNK_BYTES,
    CLIP_BUFFERS,
    CONVERT_BYTES_PER_WEIGHT,
    CONVERTER_BASE_BYTES,
    GENERATED_TEXT_TENSORS,
    available_memory,
    bounded_converter,
    check_tensor_count,
    conversion_memory,
    convert_lora,
    convert_model,
    export_gguf,
    gguf_tensor_count,
    modelfile_text,
    plan_gguf_export,
    repoint_modelfile,
)
from gemma4_tune.findings import FindingError
from gemma4_tune.model.profile import part_of
from gemma4_tune.verify.llamacpp import (
    MEDIA_TOLERANCES,
    TOLERANCES,
    default_prompts,
    engine_results,
    verify_gguf,
)
from gemma4_tune.verify.reference import token_logits
from tests.lora_helpers import random_lora, zeroed_lora_b

REQUIRE = bool(os.environ.get("GEMMA4_TUNE_REQUIRE_ENGINES"))
needs_llamacpp = pytest.mark.skipif(llamacpp_env.llamacpp_install() is None and not REQUIRE,
                                    reason="llama.cpp not installed (gemma4-tune engines install llama.cpp); set "
                                    "GEMMA4_TUNE_REQUIRE_ENGINES=1 to fail instead")
engine = [pytest.mark.engine, pytest.mark.slow, needs_llamacpp]


def _codes(exc: pytest.ExceptionInfo) -> set[str]:
    return {f.code for f in exc.value.findings}


def _unwrapped(src: Path, out: Path) -> Path:
    """A copy of ``src`` with the row-2 'unwrap' damage: tower ``...linear.weight`` keys renamed to
    ``...weight`` and the clamp buffers dropped, as a merge that replaced the wrappers saves it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    damaged = {}
    for key, value in tensors.items():
        if part_of(key) != "text" and key.rsplit(".", 1)[-1] in CLIP_BUFFERS:
            continue
        if part_of(key) != "text" and key.endswith(".linear.weight"):
            key = key[: -len(".linear.weight")] + ".weight"
        damaged[key] = value
    save_file(damaged, str(weights), metadata={"format": "pt"})
    return out


def _exported_case(tiny: Path, root: Path, seed: int, towers: str) -> dict:
    """``tiny`` + a random LoRA on the text and ``towers`` ("trained"), merged, then exported to f32 (model,
    mmproj) with the adapter GGUF of its text part ("adapter": ``convert_lora_to_gguf.py`` drops tower LoRA,
    G4T914), with the PEFT reference on the text verify prompts (the towers do not run on them, so the text part
    and the whole adapter give the same logits there)."""
    from gemma4_tune.export.merge import merge_adapter
    from gemma4_tune.verify.parity import text_only_adapter

    trained = random_lora(tiny, root / "trained", seed=seed, spec=f"text,{towers}")
    adapter = text_only_adapter(trained, root / "adapter")
    merged = merge_adapter(tiny, trained, root / "merged", progress=False).out_dir
    prompts = default_prompts(tiny)
    return {"root": root, "base": tiny, "trained": trained, "adapter": adapter, "merged": merged, "prompts": prompts,
            "peft": token_logits(tiny, adapter, prompts),
            "f32": export_gguf(merged, root / "gguf-f32", "f32", adapter_dir=adapter, base_dir=tiny)}


@pytest.fixture(scope="module")
def e2b(tiny_models, tmp_path_factory) -> dict:
    """Tiny E2B (vision + audio towers, causal image attention) exported with a text + vision + audio LoRA."""
    return _exported_case(tiny_models["e2b"], tmp_path_factory.mktemp("gguf-e2b"), seed=1, towers="vision,audio")


@pytest.fixture(scope="module")
def b31(tiny_models, tmp_path_factory) -> dict:
    """Tiny 31B (K=V global layers, vision only, bidirectional image attention) exported with a text + vision LoRA."""
    return _exported_case(tiny_models["31b"], tmp_path_factory.mktemp("gguf-31b"), seed=2, towers="vision")


def _show(label: str, report: dict) -> None:
    keep = ("max_logit_diff", "mean_kl", "max_kl", "greedy_agreement", "top1_in_top5")
    parts = {"model": {k: report["model"][k] for k in keep}} if "model" in report else {}
    if "adapter" in report:
        parts["adapter"] = {k: report["adapter"]["adapter"][k] for k in keep}
        parts["adapter_effect"] = report["adapter"]["adapter_effect"]
        parts["reference_effect"] = report["adapter"]["reference_effect"]
    print(label, json.dumps(parts, default=float))


def _assert_ok(report: dict) -> None:
    assert report["ok"], [f.one_line() for f in report["findings"]]
    assert report["findings"] == [], [f.one_line() for f in report["findings"]]


# --------------------------------------------------------------------------- fast: refused before converting


def test_row02_unwrapped_checkpoint_is_refused_before_any_conversion(tiny_models, tmp_path, monkeypatch) -> None:
    damaged = _unwrapped(tiny_models["e2b"], tmp_path / "damaged")

    def no_conversion(*args, **kwargs):
        raise AssertionError("a converter ran on a damaged checkpoint")

    monkeypatch.setattr("gemma4_tune.export.gguf.run_converter", no_conversion)
    monkeypatch.setattr("gemma4_tune.engines.llamacpp_env.require_llamacpp", no_conversion)
    out = tmp_path / "gguf"
    with pytest.raises(FindingError) as exc:
        export_gguf(damaged, out, "f32")
    assert _codes(exc) == {"G4T912"}
    f = exc.value.findings[0]
    assert f.details["n_renamed"] > 0 and "stored as plain `.weight`" in f.message
    assert "clamp buffers are gone" in f.message and "never unwrap" in f.fix
    assert not out.exists()
    assert not list(tmp_path.glob(".gguf*"))  # no temporary directory left either


def test_official_layout_passes_the_tower_check(tiny_models) -> None:
    plan = plan_gguf_export(tiny_models["e2b"])
    assert plan["mmproj"] and plan["counts"]["clipped_linears"] > 0
    assert plan["counts"]["towers"] > 0 and plan["findings"] == []


def test_tower_lora_adapter_gguf_is_skipped_with_a_warning(tiny_models, tmp_path) -> None:
    base = tiny_models["e2b"]
    adapter = random_lora(base, tmp_path / "adapter", seed=3, spec="text,vision,audio")
    plan = plan_gguf_export(base, adapter, base)
    assert not plan["convert_adapter"]
    assert [f.code for f in plan["findings"]] == ["G4T914"]
    assert plan["findings"][0].severity.value == "warning"
    assert "merged GGUF" in plan["findings"][0].fix


def test_adapter_gguf_needs_a_local_base(tiny_models, tmp_path) -> None:
    base = tiny_models["e2b"]
    adapter = random_lora(base, tmp_path / "adapter", seed=3)
    with pytest.raises(FindingError) as exc:
        plan_gguf_export(base, adapter, "google/gemma-4-E2B-it")
    assert _codes(exc) == {"G4T001"}
    assert plan_gguf_export(base, adapter, base)["adapter_tensors"] == 72


@pytest.fixture(scope="module")
def moe_adapter(tiny_models, tmp_path_factory) -> Path:
    """A random LoRA on the tiny 26B-A4B's text modules, MoE experts included."""
    return random_lora(tiny_models["26b-a4b"], tmp_path_factory.mktemp("gguf-moe") / "adapter", seed=4)


@pytest.mark.slow
def test_moe_expert_lora_adapter_gguf_is_skipped_with_g4t204(tiny_models, moe_adapter) -> None:
    base = tiny_models["26b-a4b"]
    plan = plan_gguf_export(base, moe_adapter, base)
    assert not plan["convert_adapter"]
    assert [f.code for f in plan["findings"]] == ["G4T204"]


def test_tiny_tokenizer_declares_the_official_named_tokens(tiny_models) -> None:
    """Declared special (as Google's tokenizer does), llama.cpp's converter marks them CONTROL."""
    from transformers import AutoTokenizer

    from gemma4_tune.model.tokenizer import NAMED_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["e2b"]))
    config = json.loads((tiny_models["e2b"] / "tokenizer_config.json").read_text())
    for name, text in NAMED_TOKENS.items():
        assert getattr(tokenizer, name) == text and config[name] == text
        assert text in tokenizer.all_special_tokens
    assert config["sot_token"] == "<|turn>" and config["eot_token"] == "<turn|>"


def test_turn_tokens_that_are_not_control_in_the_gguf_are_reported(tiny_models) -> None:
    """What the old tiny tokenizer produced: ``<|turn>`` as a plain piece, ``<turn|>`` not ending generation."""
    from transformers import AutoTokenizer

    from gemma4_tune.verify.llamacpp import _token_flags

    flags, findings = _token_flags({"12": {"control": False, "eog": False}, "13": {"control": True, "eog": False}},
                                   AutoTokenizer.from_pretrained(str(tiny_models["e2b"])))
    assert flags["<|turn>"]["id"] == 12 and flags["<turn|>"]["id"] == 13
    assert [(f.code, f.severity.value) for f in findings] == [("G4T915", "warning")] * 2
    assert "would not stop at the end of the model's turn" in findings[1].message


def test_media_layout_is_aligned_with_the_processor_or_named_with_both_counts() -> None:
    """How libmtmd's chunks map onto the processor's tokens (begin/end-of-media are text on both sides)."""
    from gemma4_tune.verify.llamacpp import align

    ids = [2, 12, 6, 9, 9, 9, 7, 40, 41]  # <bos> <|turn> <|image> 3 soft tokens <image|> text
    types = [0, 0, 0, 1, 1, 1, 0, 0, 0]
    chunks = [{"type": "text", "tokens": [2, 12, 6]}, {"type": "image", "n_tokens": 3},
              {"type": "text", "tokens": [7, 40, 41]}]
    assert align(ids, types, chunks) == ([0, 1, 2, 6, 7, 8], None)
    _, problem = align(ids, types, [chunks[0], {"type": "image", "n_tokens": 4}, chunks[2]])
    assert problem == "libmtmd lays the image out as 4 soft tokens where transformers' processor makes 3 (position 3)"
    _, problem = align(ids, types, [{"type": "text", "tokens": [2, 12]}, *chunks[1:]])
    assert problem.startswith("libmtmd lays the image out as 3 soft tokens where transformers' processor makes 0")
    _, problem = align(ids, types, [chunks[0], chunks[1], {"type": "text", "tokens": [7, 40, 42]}])
    assert problem.startswith("text chunk 2 of libmtmd (3 tokens [7, 40, 42]...) is not the processor's tokens")


def test_repoint_modelfile_points_at_the_gguf_and_is_idempotent(tmp_path) -> None:
    from gemma4_tune.export.merge import MODELFILE_TEXT

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "Modelfile").write_text(MODELFILE_TEXT)
    gguf = tmp_path / "gguf" / "model-q8_0.gguf"
    for _ in range(2):
        path = repoint_modelfile(merged, gguf)
    lines = path.read_text().splitlines()
    assert [ln for ln in lines if ln.startswith("FROM ")] == ["FROM ../gguf/model-q8_0.gguf"]
    assert sum("FROM points at the GGUF" in ln for ln in lines) == 1
    assert 'PARAMETER stop "<turn|>"' in lines
    text = modelfile_text("f16", mmproj=True, adapter=False)
    assert "FROM ./model-f16.gguf" in text and "--mmproj mmproj-f16.gguf" in text
    assert not [ln for ln in text.splitlines() if ln.startswith("ADAPTER")]  # Ollama dropped ADAPTER (row 22)


# --------------------------------------------------------------------------- glibc compatibility patch


def _runtime_lib() -> Path:
    install = llamacpp_env.require_llamacpp()
    unpatched = install.root / "unpatched" / "libllama.so"
    return unpatched if unpatched.exists() else install.site / "llama_cpp_py_sync" / "libllama.so"


@needs_llamacpp
def test_upstream_runtime_still_needs_glibc_2_38_and_the_patch_rebinds_it(tmp_path) -> None:
    """Fails once upstream ships libraries built for an older glibc: then drop ``glibc_compat``."""
    lib = _runtime_lib()
    assert glibc_compat.needs_glibc(lib), f"{lib} no longer needs GLIBC_2.38: the glibc patch can go"
    copy = tmp_path / lib.name
    shutil.copy2(lib, copy)
    assert glibc_compat.patch_library(copy) is True
    assert not glibc_compat.needs_glibc(copy)
    assert glibc_compat.patch_library(copy) is False  # idempotent
    dynsym = copy.read_bytes()
    assert b"__isoc23_strtol" in dynsym  # .dynstr untouched: the symbols now point at its "strtol" tail
    if glibc_compat.patch_needed():
        install = llamacpp_env.require_llamacpp()
        assert install.stamp["glibc_patched"], "the install did not patch its libraries"
        for name in install.stamp["glibc_patched"]:
            assert not glibc_compat.needs_glibc(install.site / "llama_cpp_py_sync" / name)


@needs_llamacpp
def test_install_is_stamped_and_idempotent() -> None:
    install = llamacpp_env.require_llamacpp()
    assert install.stamp["pins"] == {"llama-cpp-python": llamacpp_env.CONVERTER_VERSION,
                                     "llama-cpp-py-sync": llamacpp_env.RUNTIME_VERSION}
    assert install.stamp["install_seconds"] > 0 and set(install.stamp["seconds"]) >= {"download", "runtime"}
    again = llamacpp_env.install_llamacpp(log=lambda _line: None)
    assert again.stamp == install.stamp
    status = llamacpp_env.llamacpp_status()
    assert status["installed"] and status["llama_cpp_build"] == install.stamp["llama_cpp_build"]


def test_failed_install_is_g4t910_and_leaves_nothing(monkeypatch, tmp_path) -> None:
    import subprocess as sp

    monkeypatch.setenv("GEMMA4_TUNE_ENGINES", str(tmp_path / "engines"))

    def failing_pip(cmd, *, env, log, tail, step):
        tail.append("ERROR: No matching distribution found for llama-cpp-python==0.3.36")
        raise sp.CalledProcessError(1, list(cmd))

    monkeypatch.setattr(llamacpp_env, "_run", failing_pip)
    with pytest.raises(FindingError) as exc:
        llamacpp_env.install_llamacpp(log=lambda _line: None)
    assert _codes(exc) == {"G4T910"}
    assert "No matching distribution" in exc.value.findings[0].message
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == [".llamacpp-install.lock"]
    assert llamacpp_env.llamacpp_install() is None


def test_missing_install_is_g4t911(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GEMMA4_TUNE_ENGINES", str(tmp_path / "engines"))
    with pytest.raises(FindingError) as exc:
        llamacpp_env.require_llamacpp()
    assert _codes(exc) == {"G4T911"}
    assert "engines install llama.cpp" in exc.value.findings[0].fix


# --------------------------------------------------------------------------- bounded memory (issue 19)


def test_machine_too_small_for_the_conversion_is_g4t919_before_anything_is_written(tiny_models, tmp_path,
                                                                                     monkeypatch) -> None:
    """G4T919: the estimate from the safetensors headers is compared with MemAvailable before any converter runs."""
    def no_conversion(*args, **kwargs):
        raise AssertionError("a converter ran on a machine that cannot hold it")

    pins = {llamacpp_env.CONVERTER_PACKAGE: llamacpp_env.CONVERTER_VERSION}
    install = llamacpp_env.LlamaCpp(tmp_path / "llama.cpp", {"pins": pins, "gguf_py_version": "0.19.0"})
    monkeypatch.setattr("gemma4_tune.engines.llamacpp_env.require_llamacpp", lambda: install)
    monkeypatch.setattr("gemma4_tune.export.gguf.run_converter", no_conversion)
    monkeypatch.setattr("gemma4_tune.export.gguf.available_memory", lambda: 300 * 10**6)
    out = tmp_path / "gguf"
    with pytest.raises(FindingError) as exc:
        export_gguf(tiny_models["e2b"], out, "bf16")
    assert _codes(exc) == {"G4T919"}
    f = exc.value.findings[0]
    needed = conversion_memory(tiny_models["e2b"], "bf16")
    assert f.details == {"needed_bytes": needed, "available_bytes": 300 * 10**6, "bounded": True}
    assert f"needs about {needed / 1e9:.1f} GB" in f.message and "has 0.3 GB available" in f.message
    assert "row chunks of 64 MiB" in f.message and "free memory" in f.fix
    assert not out.exists() and not list(tmp_path.glob(".gguf*"))


def test_memory_estimate_counts_a_row_chunk_of_large_tensors_when_bounded(tiny_models) -> None:
    """The per-weight model measured in the helper report, on the E2B's 262144 x 8960 per-layer embedding table:
    whole it is the 19.1 GB peak (4x its 4.7 GB of bf16), in row chunks ~1.3 GB whatever the checkpoint's size."""
    from gemma4_tune.export.gguf import _chunk_weights

    ple = (262144, 35 * 256)
    assert _chunk_weights(ple, 2) == (CHUNK_BYTES // (ple[1] * 2)) * ple[1]
    whole = CONVERTER_BASE_BYTES + ple[0] * ple[1] * CONVERT_BYTES_PER_WEIGHT["bf16"]
    assert 19.1e9 <= whole <= 1.1 * 19.1e9
    assert _chunk_weights((1536,), 2) == 1536 and _chunk_weights((128, 1408, 2816), 2) == 8 * 1408 * 2816
    tiny = tiny_models["e2b"]  # every tensor is below one chunk: the same estimate either way
    assert conversion_memory(tiny, "f32") == conversion_memory(tiny, "f32", bounded=False) > CONVERTER_BASE_BYTES
    assert conversion_memory(tiny, "f32", towers=True) > CONVERTER_BASE_BYTES
    with open("/proc/meminfo") as fh:
        total = int(fh.readline().split()[1]) * 1024
    assert 0 < available_memory() <= total


def test_only_checked_converter_releases_are_patched(tmp_path) -> None:
    """The version gate of the one llama.cpp patch: another converter release runs as it is."""
    pins = {llamacpp_env.CONVERTER_PACKAGE: llamacpp_env.CONVERTER_VERSION}
    checked = llamacpp_env.LlamaCpp(tmp_path, {"pins": pins, "gguf_py_version": "0.19.0"})
    assert bounded_converter(checked)
    assert not bounded_converter(llamacpp_env.LlamaCpp(tmp_path, {"pins": pins, "gguf_py_version": "0.20.0"}))
    newer = {llamacpp_env.CONVERTER_PACKAGE: "0.3.37"}
    assert not bounded_converter(llamacpp_env.LlamaCpp(tmp_path, {"pins": newer, "gguf_py_version": "0.19.0"}))


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_bounded_conversion_writes_the_same_bytes_as_the_converter(tiny_models, tmp_path) -> None:
    """Row chunks (here of 256 bytes, so every 2-D tensor is cut, token_embd through its [:n_vocab] slice) give
    byte for byte the GGUF llama.cpp's converter writes on its own: bf16 text and a bf16 projector from a bf16
    checkpoint (as the official ones are), f32 text from a float32 one (chunks read without a copy). q8_0 and f16
    take the same chunks through gguf-py's row-wise quantizers (q8_0 blocks lie along a row); they were checked
    byte for byte when this patch was written and are left out here for CI time (one converter run is ~7 s)."""
    import filecmp

    from gemma4_tune.api import tiny_model
    from gemma4_tune.export.gguf import read_checkpoint, run_converter

    install = llamacpp_env.require_llamacpp()
    assert bounded_converter(install), (
        f"llama.cpp converters {install.stamp.get('pins')} / gguf-py {install.stamp.get('gguf_py_version')} are not "
        f"in BOUNDED_CONVERTERS {sorted(BOUNDED_CONVERTERS)}: check _bounded_convert against this release (this "
        "test), then add it")
    e2b_bf16 = tiny_model("e2b", tmp_path / "e2b-bf16", dtype="bfloat16")
    cases = [(e2b_bf16, "bf16", False), (e2b_bf16, "bf16", True), (tiny_models["31b"], "f32", False)]
    for model, gguf_type, mmproj in cases:
        text_2d = sum(1 for t in read_checkpoint(model).values()
                      if len(t.shape) >= 2 and part_of(t.name) == "text")
        name = f"{model.name}-{'mmproj' if mmproj else 'model'}-{gguf_type}.gguf"
        lines: list[str] = []
        convert_model(model, tmp_path / f"bounded-{name}", gguf_type, mmproj=mmproj, log=lines.append, chunk_bytes=256)
        args = [str(model), "--outtype", gguf_type, "--outfile", str(tmp_path / f"plain-{name}")]
        run_converter("convert_hf_to_gguf.py", args + (["--mmproj"] if mmproj else []), what=name,
                      log=lambda _line: None)
        assert filecmp.cmp(tmp_path / f"bounded-{name}", tmp_path / f"plain-{name}", shallow=False), name
        chunked = [ln for ln in lines if "row chunks of 256 bytes" in ln]
        assert len(chunked) == 1, lines
        if not mmproj:
            assert chunked[0].startswith(f"[gguf] {text_2d} tensors"), (chunked, text_2d)


# --------------------------------------------------------------------------- engine: convert and run


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_e2b_merged_f32_model_and_mmproj_match_transformers(e2b) -> None:
    summary = e2b["f32"]
    assert summary["findings"] == []
    counts = plan_gguf_export(e2b["merged"])["counts"]
    assert summary["tensors"]["model"] == {"expected": counts["text"] + GENERATED_TEXT_TENSORS, "written": 108}
    assert summary["tensors"]["mmproj"] == {"expected": counts["towers"], "written": 217}
    for name in ("model", "mmproj", "base", "adapter"):
        assert Path(summary["files"][name]).is_file()
    modelfile = (Path(summary["out_dir"]) / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf" in modelfile
    assert "FROM ../gguf-f32/model-f32.gguf" in (e2b["merged"] / "Modelfile").read_text()
    report = verify_gguf(summary["out_dir"])  # references computed from the record: merged dir, base + adapter
    _show("e2b f32", report)
    _assert_ok(report)
    assert report["model"]["max_logit_diff"] <= TOLERANCES["f32"].max_logit_diff
    assert report["model"]["top1_in_top5"] == 1.0
    assert report["mmproj"]["vision"] and report["mmproj"]["audio"]
    assert report["vocab"]["<|turn>"]["control"] and report["vocab"]["<turn|>"]["eog"]
    from gemma4_tune.export.manifest import served_chat_template  # what verify compares with the manifest (row 34)

    assert report["chat_template"] == served_chat_template(e2b["merged"])


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_e2b_text_lora_adapter_gguf_matches_peft_and_changes_the_output(e2b) -> None:
    summary = e2b["f32"]
    assert summary["tensors"]["adapter"] == {"expected": 72, "written": 72}
    files = {k: summary["files"][k] for k in ("base", "adapter")}
    report = verify_gguf(files, prompts=e2b["prompts"], gguf_type="f32", adapter_reference=e2b["peft"])
    _show("e2b adapter f32", report)
    _assert_ok(report)
    part = report["adapter"]
    assert part["adapter"]["max_logit_diff"] <= TOLERANCES["f32"].max_logit_diff
    assert part["adapter_effect"] > 0.9 * part["reference_effect"] > 0.1


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_adapter_gguf_that_changes_nothing_fails(e2b, tmp_path) -> None:
    zeroed = zeroed_lora_b(e2b["adapter"], tmp_path / "zeroed")
    out = tmp_path / "adapter-f32.gguf"
    convert_lora(zeroed, e2b["base"], out, "f32", log=lambda _line: None)
    files = {"base": e2b["f32"]["files"]["base"], "adapter": out}
    report = verify_gguf(files, prompts=e2b["prompts"], gguf_type="f32", adapter_reference=e2b["peft"])
    assert not report["ok"]
    assert [f.code for f in report["findings"]] == ["G4T611"]
    assert report["adapter"]["adapter_effect"] < 1e-3


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_e2b_merged_q8_0_is_within_its_tolerance(e2b) -> None:
    summary = export_gguf(e2b["merged"], e2b["root"] / "gguf-q8_0", "q8_0", repoint=False)
    assert summary["tensors"]["model"]["written"] == 108 and summary["tensors"]["mmproj"]["written"] == 217
    assert Path(summary["files"]["model"]).stat().st_size < 0.5 * Path(e2b["f32"]["files"]["model"]).stat().st_size
    report = verify_gguf(summary["out_dir"], e2b["peft"]["tuned"], e2b["prompts"])
    _show("e2b q8_0", report)
    _assert_ok(report)
    assert report["gguf_type"] == "q8_0"
    assert report["model"]["mean_kl"] <= TOLERANCES["q8_0"].mean_kl
    assert report["model"]["mean_kl"] > report["model"]["tolerance"]["mean_kl"] * 1e-4  # it did quantise


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_31b_merged_f32_model_and_mmproj_match_transformers(b31) -> None:
    summary = b31["f32"]
    assert summary["tensors"]["model"]["written"] == summary["tensors"]["model"]["expected"] == 85
    assert summary["tensors"]["mmproj"]["written"] == summary["tensors"]["mmproj"]["expected"] == 31
    report = verify_gguf(summary["out_dir"], b31["peft"]["tuned"], b31["prompts"])
    _show("31b f32", report)
    _assert_ok(report)
    assert report["mmproj"]["vision"] and not report["mmproj"]["audio"]


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_31b_text_lora_adapter_gguf_matches_peft_on_k_eq_v_layers(b31) -> None:
    """Unlike vLLM 0.32 (G4T210), llama.cpp applies a k_proj LoRA to the values of K=V global layers too."""
    from gemma4_tune.verify.vllm import k_eq_v_lora_layers

    assert k_eq_v_lora_layers(b31["base"], b31["adapter"])  # the case vLLM gets wrong is present
    summary = b31["f32"]
    assert summary["tensors"]["adapter"]["written"] == summary["tensors"]["adapter"]["expected"] == 80
    files = {k: summary["files"][k] for k in ("base", "adapter")}
    report = verify_gguf(files, prompts=b31["prompts"], gguf_type="f32", adapter_reference=b31["peft"])
    _show("31b adapter f32", report)
    _assert_ok(report)
    assert report["adapter"]["adapter_effect"] > 0.9 * report["adapter"]["reference_effect"] > 0.1


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_31b_merged_f16_text_is_within_its_tolerance(b31, tmp_path) -> None:
    out = tmp_path / "model-f16.gguf"
    convert_model(b31["merged"], out, "f16", log=lambda _line: None)
    check_tensor_count(out, 85, "model")
    report = verify_gguf({"model": out}, b31["peft"]["tuned"], b31["prompts"], "f16")
    _show("31b f16", report)
    _assert_ok(report)


# --------------------------------------------------------------------------- engine: image and audio prompts


def _rows(label: str, rows: list) -> dict[str, object]:
    """The merged GGUF's rows by modality, printed with their figures."""
    for r in rows:
        fig = getattr(r, "figures", None) or {}
        print(label, r.engine, r.modalities, r.compared, json.dumps(
            {"max_logit_diff": r.max_logit_diff, "mean_kl": fig.get("mean_kl"), "top1_in_top5": fig.get("top1_in_top5"),
             "adapter_effect": r.adapter_effect, "reference_effect": fig.get("reference_effect"),
             "other_attention": fig.get("other_attention"), "findings": [f.code for f in r.findings]}, default=float))
    merged = [r for r in rows if r.engine.startswith("llama.cpp model-")]
    assert all(len(r.modalities) == 1 for r in rows)
    return {r.modalities[0]: r for r in merged}


def _build() -> str:
    """The llama.cpp build of the install (``b11739``), which the findings name."""
    return llamacpp_env.require_llamacpp().stamp["llama_cpp_build"]


def _errors(row) -> list:
    return [f for f in row.findings if f.severity.value == "error"]


def _only_resize_warnings(row) -> None:
    """What is left on a passing image row: libmtmd sizes a user's image unlike the processor (this build)."""
    assert all(f.code == "G4T918" and f.severity.value == "warning" and "soft tokens where transformers' "
               "processor makes" in f.message for f in row.findings), [f.one_line() for f in row.findings]


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_e2b_image_and_audio_prompts_in_llama_cpp(e2b) -> None:
    """Text and audio rows pass. The image rows are laid out as transformers lays them out (boi, 60 and 63 soft
    tokens, eoi), but llama.cpp b11739 decodes E2B's image tokens bidirectionally where the model is causal
    (llama.cpp#28318): G4T921, and llama.cpp matches transformers run with bidirectional image attention.
    Fails once the llama.cpp pin decodes them causally: then assert that the image row passes."""
    rows = engine_results(e2b["base"], e2b["trained"], e2b["f32"]["out_dir"], log=lambda _line: None)
    assert [r.modalities for r in rows] == [["text"], ["image"], ["audio"], ["text"]]
    by = _rows("e2b", rows)
    assert by["text"].ok and by["text"].findings == [], [f.one_line() for f in by["text"].findings]
    audio = by["audio"]
    assert audio.ok and audio.findings == [], [f.one_line() for f in audio.findings]
    assert (audio.prompts, audio.positions) == (2, 46)  # 13 and 50 soft tokens, 23 text positions each
    assert audio.max_logit_diff <= MEDIA_TOLERANCES["f32"].max_logit_diff
    assert audio.adapter_effect > 0.5 * audio.figures["reference_effect"] > 0.1
    image = by["image"]
    assert (image.prompts, image.positions) == (2, 40)  # the layout matched: every text position compared
    assert [f.code for f in _errors(image)] == ["G4T921"], [f.one_line() for f in image.findings]
    message = _errors(image)[0].message
    assert "attends image tokens bidirectionally where transformers attends them causally" in message
    assert "mtmd_decode_use_non_causal" in message and _build() in message
    assert image.figures["other_attention"]["ok"]  # what llama.cpp does is transformers with bidirectional images
    assert image.figures["other_attention"]["max_logit_diff"] <= MEDIA_TOLERANCES["f32"].max_logit_diff
    assert image.figures["max_logit_diff"] > 3 * MEDIA_TOLERANCES["f32"].max_logit_diff
    assert all(image.figures["non_causal"])


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_31b_text_and_image_prompts_match_transformers(b31) -> None:
    """31B attends image tokens bidirectionally, and so does libmtmd: text and image rows pass, the vision
    LoRA merged into the mmproj shows in the image rows."""
    by = _rows("31b", engine_results(b31["base"], b31["trained"], b31["f32"]["out_dir"], log=lambda _line: None))
    assert sorted(by) == ["image", "text"]
    assert by["text"].ok and by["text"].findings == []
    image = by["image"]
    assert image.ok and (image.prompts, image.positions) == (2, 40)
    _only_resize_warnings(image)
    assert image.max_logit_diff <= MEDIA_TOLERANCES["f32"].max_logit_diff
    assert image.figures["mean_kl"] <= MEDIA_TOLERANCES["f32"].mean_kl and image.figures["top1_in_top5"] == 1.0
    assert image.adapter_effect > 0.5 * image.figures["reference_effect"] > 0.1


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_flipped_image_attention_fails_the_31b_image_rows_only(b31) -> None:
    """The check of the check (row 31): against transformers run with causal image attention, which 31B does not
    use, the image rows fail and are diagnosed; the text rows still pass."""
    merged = {k: b31["f32"]["files"][k] for k in ("model", "mmproj")}  # the base + adapter pair is not at stake
    by = _rows("31b flipped", engine_results(b31["base"], b31["trained"], merged, log=lambda _line: None,
                                             flip_image_attention=True))
    assert by["text"].ok and by["text"].findings == []
    image = by["image"]
    assert not image.ok and [f.code for f in _errors(image)] == ["G4T921"]
    assert "attends image tokens bidirectionally where transformers attends them causally" in _errors(image)[0].message
    assert image.positions == 40


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_mmproj_without_the_vision_deltas_fails_the_image_rows(b31, tmp_path) -> None:
    """A merge that lost the vision LoRA (its lora_B zeroed) behind the same text model: the reference is the
    whole adapter, so the image rows fail (G4T915, not an attention difference); the text rows pass."""
    import torch
    from safetensors.torch import load_file, save_file

    from gemma4_tune.export.merge import merge_adapter
    from gemma4_tune.model.profile import part_of

    lost = tmp_path / "adapter-no-vision"
    shutil.copytree(b31["trained"], lost)
    weights = lost / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    zeroed = [k for k in tensors if ".lora_B." in k and part_of(k) == "vision"]
    assert zeroed
    save_file({k: torch.zeros_like(v) if k in zeroed else v for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt"})
    merged = merge_adapter(b31["base"], lost, tmp_path / "merged", progress=False).out_dir
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-f32.gguf").symlink_to(b31["f32"]["files"]["model"])  # the same text model
    convert_model(merged, gguf / "mmproj-f32.gguf", "f32", mmproj=True, log=lambda _line: None)
    by = _rows("31b no vision delta", engine_results(b31["base"], b31["trained"], gguf, log=lambda _line: None))
    assert by["text"].ok and by["text"].findings == []
    image = by["image"]
    assert [f.code for f in _errors(image)] == ["G4T915"], [f.one_line() for f in image.findings]
    assert "on image prompts in llama.cpp differs from transformers" in _errors(image)[0].message
    assert "not an attention difference" in _errors(image)[0].message
    assert not image.figures["other_attention"]["ok"]


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_towers_without_an_mmproj_are_warning_rows_that_compared_nothing(e2b, tmp_path) -> None:
    """G4T920: a modality llama.cpp cannot run is a warning row of 0 prompts, never a pass of something compared."""
    (tmp_path / "model-f32.gguf").symlink_to(e2b["f32"]["files"]["model"])
    by = _rows("e2b no mmproj", engine_results(e2b["base"], e2b["trained"], tmp_path, log=lambda _line: None))
    assert by["text"].ok and by["text"].positions == 75
    for modality in ("image", "audio"):
        row = by[modality]
        assert [(f.code, f.severity.value) for f in row.findings] == [("G4T920", "warning")]
        assert (row.prompts, row.positions) == (0, 0) and row.criterion == "not run" and row.verdict == "not run"
        assert "no mmproj" in row.not_run
        message = row.findings[0].message
        assert "no mmproj" in message and f"{_build()} cannot run the {modality} prompts" in message


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_26b_a4b_moe_checkpoint_converts_and_matches_transformers(tiny_models, tmp_path) -> None:
    """What G4T204 tells users to do with MoE expert LoRA: convert the merged (full) checkpoint instead."""
    summary = export_gguf(tiny_models["26b-a4b"], tmp_path / "gguf", "f32", repoint=False)
    assert summary["tensors"]["model"]["written"] == summary["tensors"]["model"]["expected"]
    assert summary["tensors"]["mmproj"]["written"] == summary["tensors"]["mmproj"]["expected"]
    report = verify_gguf(summary["out_dir"])
    _show("26b-a4b f32", report)
    _assert_ok(report)


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_row22_converter_failure_is_g4t916_with_the_cause(tiny_models, moe_adapter, tmp_path) -> None:
    """Why G4T204 skips expert LoRA: convert_lora_to_gguf.py cannot map it (and says so only in a traceback)."""
    with pytest.raises(FindingError) as exc:
        convert_lora(moe_adapter, tiny_models["26b-a4b"], tmp_path / "adapter-f32.gguf", "f32", log=lambda _line: None)
    assert _codes(exc) == {"G4T916"}
    assert "Can not map tensor" in exc.value.findings[0].message and "experts" in exc.value.findings[0].message
    assert Path(exc.value.findings[0].details["log"]).is_file()
    assert not (tmp_path / "adapter-f32.gguf").exists()
    Path(exc.value.findings[0].details["log"]).unlink()


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_row02_unwrapped_checkpoint_converts_silently_so_the_count_check_catches_it(tiny_models, tmp_path) -> None:
    """Why the pre-check exists: llama.cpp's mmproj converter accepts the damaged keys without an error."""
    damaged = _unwrapped(tiny_models["e2b"], tmp_path / "damaged")
    out = tmp_path / "mmproj-f32.gguf"
    convert_model(damaged, out, "f32", mmproj=True, log=lambda _line: None)
    expected = plan_gguf_export(tiny_models["e2b"])["counts"]["towers"]
    assert gguf_tensor_count(out) < expected
    with pytest.raises(FindingError) as exc:
        check_tensor_count(out, expected, "mmproj")
    assert _codes(exc) == {"G4T913"}


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_runner_is_standalone(e2b, tmp_path) -> None:
    """A user with only llama.cpp's binding runs the same script: it imports nothing from gemma4_tune."""
    import ast

    from gemma4_tune.verify.llamacpp import RUNNER

    tree = ast.parse(RUNNER.read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.startswith("gemma4_tune") for m in imported), imported
    install = llamacpp_env.require_llamacpp()
    (tmp_path / "req.json").write_text(json.dumps({"model": e2b["f32"]["files"]["model"], "prompts": [[2, 5, 6]]}))
    done = subprocess.run([sys.executable, "-P", str(RUNNER), str(tmp_path / "req.json"), str(tmp_path / "res.json")],
                          env=install.runtime_environ(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "res.json").read_text())
    assert result["modes"]["base"]["logits"] == "base-logits.npy" and result["n_vocab"] > 0
    assert (tmp_path / "base-logits.npy").is_file()


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_runner_evaluates_media_prompts_chunk_by_chunk(e2b, b31, tmp_path) -> None:
    """Through libmtmd: text chunks with every position's logits, media chunks encoded and decoded; a medium the
    projector cannot take is recorded with libmtmd's reason, not a crash."""
    import numpy as np

    from gemma4_tune.verify.llamacpp import RUNNER
    from gemma4_tune.verify.prompts import audio, image

    install = llamacpp_env.require_llamacpp()
    image(96, 144).tofile(tmp_path / "im.rgb")  # 2 x 3 blocks of 48 px: 6 soft tokens, kept as it is
    audio(0.5).tofile(tmp_path / "a.f32")
    text = "<bos><|turn>user\n<__media__>Hi<turn|>\n<|turn>model\n"
    media = {"image": {"kind": "image", "rgb": str(tmp_path / "im.rgb"), "width": 144, "height": 96},
             "audio": {"kind": "audio", "f32": str(tmp_path / "a.f32")}}
    for case, kinds in ((e2b, ("image", "audio")), (b31, ("audio",))):
        files = case["f32"]["files"]
        req = {"model": files["model"], "mmproj": files["mmproj"], "image_min_tokens": 1, "image_max_tokens": 70,
               "mm_prompts": [{"text": text, "media": [media[k]]} for k in kinds]}
        (tmp_path / "req.json").write_text(json.dumps(req))
        done = subprocess.run([sys.executable, "-P", str(RUNNER), str(tmp_path / "req.json"),
                               str(tmp_path / "res.json")], env=install.runtime_environ(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads((tmp_path / "res.json").read_text())
        assert "logits" not in result["modes"]["base"]  # no text-only prompts were given
        logits = np.load(tmp_path / result["modes"]["base"]["mm_logits"])
        records = dict(zip(kinds, result["mm_prompts"], strict=True))
        if case is e2b:
            for kind, n_media in (("image", 6), ("audio", 13)):
                chunks = records[kind]["chunks"]
                boi = {"image": "<|image>", "audio": "<|audio>"}[kind]
                assert [c["type"] for c in chunks] == ["text", kind, "text"] and records[kind]["error"] is None
                assert chunks[1]["n_tokens"] == n_media  # begin/end-of-media tokens are text, around the chunk
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(e2b["base"]))
                assert tok.convert_ids_to_tokens(chunks[0]["tokens"][-1]) == boi
                n_text = len(chunks[0]["tokens"]) + len(chunks[2]["tokens"])
                assert records[kind]["text_positions"] == n_text
            assert logits.shape == (sum(r["text_positions"] for r in records.values()), result["n_vocab"])
            assert np.isfinite(logits).all()
        else:  # the 31B projector has no audio encoder
            assert records["audio"]["chunks"] is None and records["audio"]["text_positions"] == 0
            assert "does not support audio input" in records["audio"]["error"] and logits.shape[0] == 0


# --------------------------------------------------------------------------- the command line, end to end

CLI = [sys.executable, "-m", "gemma4_tune"]


def test_export_gguf_without_merged_is_refused_before_writing(b31_adapter_only, tmp_path) -> None:
    base, adapter = b31_adapter_only
    done = subprocess.run([*CLI, "export", "--base", str(base), "--adapter", str(adapter), "--gguf",
                           str(tmp_path / "gguf")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "G4T614" in done.stdout + done.stderr and "--merged" in done.stdout + done.stderr
    assert not (tmp_path / "gguf").exists()


def test_export_merged_and_gguf_refuses_g4t919_before_the_merge(b31_adapter_only, tmp_path, monkeypatch) -> None:
    """`export --merged M --gguf G`: the memory check runs on the base's tensors before the merge writes M."""
    from gemma4_tune import api

    base, adapter = b31_adapter_only
    pins = {llamacpp_env.CONVERTER_PACKAGE: llamacpp_env.CONVERTER_VERSION}
    install = llamacpp_env.LlamaCpp(tmp_path / "llama.cpp", {"pins": pins, "gguf_py_version": "0.19.0"})
    monkeypatch.setattr("gemma4_tune.engines.llamacpp_env.require_llamacpp", lambda: install)
    monkeypatch.setattr("gemma4_tune.export.gguf.available_memory", lambda: 300 * 10**6)
    with pytest.raises(FindingError) as exc:
        api.export(base, adapter, merged=tmp_path / "merged", gguf=tmp_path / "gguf", gguf_type="bf16")
    assert _codes(exc) == {"G4T919"}
    assert not (tmp_path / "merged").exists() and not (tmp_path / "gguf").exists()


@pytest.fixture(scope="module")
def b31_adapter_only(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    base = tiny_models["31b"]
    return base, random_lora(base, tmp_path_factory.mktemp("gguf-cli") / "adapter", seed=3)


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_cli_export_gguf_then_verify_in_llama_cpp(b31_adapter_only, tmp_path) -> None:
    """What a user runs: merge + GGUF in one export, the Modelfile pointed at it, then verify against PEFT."""
    base, adapter = b31_adapter_only
    merged, gguf = tmp_path / "merged", tmp_path / "gguf"
    done = subprocess.run([*CLI, "export", "--base", str(base), "--adapter", str(adapter), "--merged", str(merged),
                           "--gguf", str(gguf), "--gguf-type", "f16"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in gguf.glob("*.gguf")) == ["adapter-f16.gguf", "base-f16.gguf", "mmproj-f16.gguf",
                                                            "model-f16.gguf"]
    froms = [ln for ln in (merged / "Modelfile").read_text().splitlines() if ln.startswith("FROM ")]
    assert froms == ["FROM ../gguf/model-f16.gguf"]  # issue 9: the Modelfile points at the GGUF
    assert [ln for ln in (gguf / "Modelfile").read_text().splitlines() if ln.startswith("FROM ")] == [
        "FROM ./model-f16.gguf"]
    done = subprocess.run([*CLI, "verify", "--base", str(base), "--adapter", str(adapter), "--engine", "llama.cpp",
                           "--gguf", str(gguf), "--out", str(tmp_path / "verify"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    report = json.loads(done.stdout)
    rows = {(r["engine"], *r["modalities"]): r for r in report["engines"]}
    assert sorted(rows) == [("llama.cpp base-f16.gguf + adapter-f16", "text"), ("llama.cpp model-f16.gguf", "image"),
                            ("llama.cpp model-f16.gguf", "text")], rows
    assert all(r["ok"] for r in rows.values()), rows
    assert all(r["adapter_effect"] > 0.5 for r in rows.values())  # the fine-tune shows in llama.cpp
    assert rows[("llama.cpp model-f16.gguf", "image")]["positions"] == 40  # the text around both images
    assert (tmp_path / "verify" / "verify.md").read_text().count("llama.cpp") >= 3
