"""QLoRA (issue 32, failure-catalog row 38): 4-bit training for real on this CPU (bitsandbytes' CPU backend), and
every artefact judged against the model that was trained, the 4-bit base + adapter, not the full-precision base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma4_tune.config.options import RunConfig
from gemma4_tune.findings import FindingError
from gemma4_tune.model.quantization import QuantSpec, dequantized, load_quantized, quantized_modules, spec_of
from tests.test_dpo import dpo_args, write_pairs
from tests.test_train import SAME_THREADS, adapter_tensors, cli, demo_data, kill_at_checkpoint, text_data

__all__ = ["demo_data", "text_data"]  # session fixtures shared with test_train


@pytest.fixture(scope="module")
def qlora_run(tiny_models, demo_data, tmp_path_factory) -> Path:
    """A QLoRA run on the tiny E2B: text, vision and audio LoRA on the 4-bit base."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    proc = cli("train", "--model", tiny_models["e2b"], "--data", demo_data, "--out", out, "--quantize", "4bit",
               "--targets", "text,vision,audio", "--max-steps", 4, "--lr", 1e-2, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def stock_merge(base: Path, adapter: Path, out: Path) -> None:
    """The adapter merged into the original (full-precision) weights with stock PEFT, as most tools do."""
    script = ("import sys\nfrom peft import PeftModel\nfrom transformers import AutoModelForImageTextToText\n"
              "base = AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
              "PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])\n"
              "assert 'gemma4_tune' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-P", "-c", script, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (base / name).is_file():
            (out / name).write_bytes((base / name).read_bytes())


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_dequantized_is_bit_for_bit_what_the_4bit_model_computes_with(tiny_models, quant_type, double_quant):
    """The merge's weights are the loaded 4-bit layers' weights exactly: bitsandbytes' own round trip."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    spec = QuantSpec(quant_type=quant_type, double_quant=double_quant)
    model = load_quantized(str(tiny_models["e2b"]), spec, torch.float32)
    spec = spec_of(model, spec)
    stored = load_file(str(tiny_models["e2b"] / "model.safetensors"))
    modules = dict(model.named_modules())
    assert any(".vision_tower." in m and m.endswith(".linear") for m in spec.modules)  # the towers' inner linears
    assert "lm_head" not in spec.modules and spec.modules == quantized_modules(model)
    for name in spec.modules:
        weight = modules[name].weight
        assert torch.equal(bnbf.dequantize_4bit(weight.data, weight.quant_state),
                           dequantized(stored[f"{name}.weight"], spec)), name


def test_quant_settings_need_quantize_and_resolve_per_device():
    cfg = RunConfig(model="m", data="d.jsonl", quantize="4bit", quant_type="fp4", double_quant=False)
    spec = cfg.quant_spec()
    assert (spec.quant_type, spec.double_quant, spec.compute_dtype) == ("fp4", False, "float32")  # CPU: fp32
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert RunConfig(model="m", data="d.jsonl").quant_spec() is None
    from gemma4_tune.config.options import build_config

    for written in (cfg, RunConfig(model="m", data="d.jsonl")):  # a launch file (cfg.dump()) reads back as it was
        assert build_config(written.dump()) == written
    with pytest.raises(FindingError) as info:
        build_config({"model": "m", "data": "d.jsonl", "quant_type": "fp4"})
    assert info.value.findings[0].code == "G4T005" and "quantize: 4bit" in info.value.findings[0].message


@pytest.mark.slow
def test_qlora_run_records_its_quantization_exactly(qlora_run):
    manifest = json.loads((qlora_run / "adapter" / "gemma4_tune_manifest.json").read_text())
    quant = manifest["quantization"]
    assert {k: quant[k] for k in ("method", "quant_type", "double_quant", "blocksize", "compute_dtype", "load_dtype")} \
        == {"method": "bitsandbytes-4bit", "quant_type": "nf4", "double_quant": True, "blocksize": 64,
            "compute_dtype": "float32", "load_dtype": "float32"}
    assert quant["library"].startswith("bitsandbytes 0.50.")
    towers = {m.split(".")[1] for m in quant["modules"] if "_tower." in m}
    assert towers == {"vision_tower", "audio_tower"}
    report = json.loads((qlora_run / "report.json").read_text())
    assert "4-bit nf4" in json.dumps(report)


@pytest.mark.slow
def test_export_merges_into_the_4bit_weights_and_verify_judges_against_the_4bit_model(qlora_run, tiny_models,
                                                                                        tmp_path):
    """Row 38: the default merge is the trained model (passes); merges into the original weights, ours on request
    or stock PEFT's, are another model and fail by name (G4T619). With a full-precision reference they would pass."""
    base, adapter = tiny_models["e2b"], qlora_run / "adapter"
    proc = cli("export", "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged", "--for",
               "transformers", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(proc.stdout)["merged"]
    modules = json.loads((adapter / "gemma4_tune_manifest.json").read_text())["quantization"]["modules"]
    assert (merged["weights"], merged["tensors_dequantized"]) == ("dequantized", len(modules))
    proc = cli("verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged",
               "--out", tmp_path / "v-ok")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = json.loads((tmp_path / "v-ok" / "verify.json").read_text())
    assert verdict["quantization"]["quant_type"] == "nf4" and verdict["ok"]
    assert {r["engine"] for r in verdict["engines"]} == {"peft", "transformers"}
    assert "as trained" in (tmp_path / "v-ok" / "verify.md").read_text()

    proc = cli("export", "--base", base, "--adapter", adapter, "--merged", tmp_path / "original", "--merge-into",
               "original", "--for", "transformers")
    assert proc.returncode == 0 and "G4T814" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    stock_merge(base, adapter, tmp_path / "stock")
    for name in ("original", "stock"):
        proc = cli("verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / name, "--engine",
                   "transformers", "--out", tmp_path / f"v-{name}")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "G4T619" in out and "G4T610" not in out, out[-3000:]
        assert "matches the adapter on the full-precision base" in out
        rows = json.loads((tmp_path / f"v-{name}" / "verify.json").read_text())["engines"]
        assert all(r["max_logit_diff"] > 1e-2 for r in rows)  # another model, by far more than the tolerance


@pytest.mark.slow
def test_qlora_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tiny_models, text_data, tmp_path):
    args = ["--model", tiny_models["31b"], "--data", text_data, "--max-steps", 6, "--save-steps", 2,
            "--batch-size", 2, "--lr", 1e-2, "--seed", 3, "--quantize", "4bit", "--samples", 0]
    reference = tmp_path / "reference"
    proc = cli("train", *args, "--out", reference, env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_at_checkpoint(args, killed, "checkpoint-2")
    proc = cli("train", *args, "--quant-type", "fp4", "--out", killed, "--resume", env=SAME_THREADS)
    assert proc.returncode == 1 and "G4T414" in proc.stdout + proc.stderr and "quant_type" in proc.stderr
    proc = cli("train", *args, "--out", killed, "--resume", env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = adapter_tensors(reference), adapter_tensors(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_tuning_on_a_4bit_base_verifies_against_it(tiny_models, tmp_path, method):
    data = write_pairs(tmp_path / "data", images=False, n=8, n_eval=2)
    args = [*dpo_args(tiny_models["31b"], data, targets="text"), "--samples", 0, "--quantize", "4bit"]
    args[args.index("--method") + 1] = method
    proc = cli("train", *args, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "gemma4_tune_manifest.json").read_text())["quantization"]["quant_type"] == "nf4"
    proc = cli("verify", "--base", tiny_models["31b"], "--adapter", adapter, "--engine", "peft")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_4bit_is_refused_by_name_only_where_bitsandbytes_cannot_run(tiny_models, text_data, tmp_path):
    """G4T120 when bitsandbytes does not import (here: made unimportable in the process, as a broken install is)."""
    code = ("import sys; sys.modules['bitsandbytes'] = None\nfrom gemma4_tune.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--model", str(tiny_models["31b"]), "--data",
                           str(text_data), "--out", str(tmp_path / "run"), "--quantize", "4bit"],
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 1 and "G4T120" in proc.stderr and "does not import" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "adapter").exists()


def test_low_bit_optimizers_run_on_this_cpu_and_a_missing_package_is_g4t420():
    """Axolotl's QLoRA examples use adamw_torch_8bit: torchao's and bitsandbytes' low-bit optimizers step on the
    CPU, so only a missing package is refused (schedulefree is not a dependency, so it is really missing here)."""
    import importlib.util

    from gemma4_tune.train.base import check_optimizer

    for name in ("adamw_torch_8bit", "adamw_torch_4bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        check_optimizer(name)
    assert importlib.util.find_spec("schedulefree") is None
    with pytest.raises(FindingError) as info:
        check_optimizer("schedule_free_adamw")
    assert info.value.findings[0].code == "G4T420" and "schedulefree" in info.value.findings[0].message


@pytest.mark.slow
@pytest.mark.engine
def test_qlora_exports_serve_in_vllm_and_llamacpp_as_the_4bit_model(qlora_run, tiny_models, tmp_path):
    """Item 4: the dequantized merge converts to GGUF and verifies in llama.cpp and vLLM; the adapter served on the
    full-precision base (vLLM's LoRA) is another model and says so (G4T619); no adapter GGUF is written (G4T922)."""
    base, adapter = tiny_models["e2b"], qlora_run / "adapter"
    proc = cli("export", "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged", "--gguf",
               tmp_path / "gguf")
    assert proc.returncode == 0 and "G4T922" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "gguf").glob("adapter-*.gguf"))
    proc = cli("verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged", "--gguf",
               tmp_path / "gguf", "--engine", "vllm,llama.cpp", "--out", tmp_path / "v")
    rows = json.loads((tmp_path / "v" / "verify.json").read_text())["engines"]
    by = {(r["engine"].split(" (")[0], r["modalities"][0] if r["modalities"] else None): r for r in rows}
    assert by["vllm merged", "text"]["ok"] and by["vllm merged", "image"]["ok"], rows
    assert by["llama.cpp model-f32.gguf", "text"]["ok"] and by["llama.cpp model-f32.gguf", "audio"]["ok"], rows
    served = by["vllm adapter", "text"]
    assert [f["code"] for f in served["findings"] if f["severity"] == "error"] == ["G4T619"], served["findings"]
    assert "vLLM serves the adapter on the full-precision base" in served["findings"][-1]["message"]
    assert proc.returncode == 1


@pytest.mark.slow
def test_serve_refuses_a_qlora_adapter_on_the_full_precision_base(qlora_run, tiny_models, tmp_path):
    """vLLM serves LoRA on the full-precision base: for a QLoRA adapter that is another model (G4T906 with the
    merged fix); the merged checkpoint is what serve takes (its parity is the `vllm merged` rows above)."""
    from gemma4_tune.serve import plan_serving

    adapter = qlora_run / "adapter"
    with pytest.raises(FindingError) as info:
        plan_serving(tiny_models["e2b"], {"run": adapter}, tmp_path, flavour="cpu")
    refusal = next(f for f in info.value.findings if "4-bit" in f.message)
    assert refusal.code == "G4T906" and "--merged MERGED" in refusal.fix


@pytest.mark.slow
@pytest.mark.parametrize("patched", [False, True])
def test_peft_bugs_on_4bit_experts_exist_upstream_and_the_patch_fixes_them(tiny_models, patched):
    """The two PEFT bugs gemma4_tune.model.patches works around (stock transformers + PEFT + bitsandbytes): half of
    the expert LoRA tensors get no gradient (a stale cached 4-bit value), and the second step fails (a proxy left
    behind). If the unpatched case stops failing, PEFT fixed them: drop patch_peft_parametrized_lora."""
    script = Path(__file__).parent / "stock" / "parametrized_lora.py"
    proc = subprocess.run([sys.executable, *([] if patched else ["-P"]), str(script), str(tiny_models["26b-a4b"]),
                           *(["patched"] if patched else [])], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if patched:
        assert (out["lora_tensors_without_grad"], out["parametrizations_after_step"], out["second_step"]) == (0, 1, "ok")
    else:
        assert out["lora_tensors_without_grad"] == out["lora_tensors"] // 2
        assert "only Tensors of floating point dtype can require gradients" in out["second_step"]


@pytest.mark.slow
def test_26b_a4b_qlora_holds_the_experts_in_4_bits_and_exports_the_model_it_trained(tiny_models, text_data, tmp_path):
    """Item 2: the MoE experts in 4 bits (bitsandbytes' parametrization) with expert LoRA training on them (every
    expert lora_B moved), recorded, merged into their dequantized values and verified; stock PEFT cannot run LoRA
    on them (its two bugs) and its row says so."""
    base = tiny_models["26b-a4b"]
    proc = cli("train", "--model", base, "--data", text_data, "--out", tmp_path / "run", "--quantize", "4bit",
               "--targets", "text", "--max-steps", 3, "--lr", 1e-2, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = tmp_path / "run" / "adapter"
    quant = json.loads((adapter / "gemma4_tune_manifest.json").read_text())["quantization"]
    layers = json.loads((base / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(quant["experts"]) == 2 * layers and quant["quantize_experts"]
    expert_b = {k: v for k, v in adapter_tensors(tmp_path / "run").items() if ".experts." in k and "lora_B" in k}
    assert len(expert_b) == 2 * layers and all(v.abs().max() > 0 for v in expert_b.values())  # both wrappers trained
    proc = cli("export", "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged", "--for",
               "transformers", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["merged"]["tensors_dequantized"] == len(quant["modules"]) + len(quant["experts"])
    proc = cli("verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged", "--out", tmp_path / "v")
    rows = json.loads((tmp_path / "v" / "verify.json").read_text())["engines"]
    assert all(r["ok"] for r in rows if r["engine"] == "transformers"), rows
    peft_rows = [r for r in rows if r["engine"] == "peft"]
    assert peft_rows and all([f["code"] for f in r["findings"]] == ["G4T619"] for r in peft_rows)
    assert "stock PEFT (this release) applies LoRA wrongly to the 4-bit MoE expert stacks" in \
        peft_rows[0]["findings"][0]["message"]
    proc = cli("train", "--model", base, "--data", text_data, "--out", tmp_path / "bf16-experts", "--quantize", "4bit",
               "--no-quantize-experts", "--targets", "text", "--max-steps", 1, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "bf16-experts" / "adapter" / "gemma4_tune_manifest.json").read_text())
    assert manifest["quantization"]["experts"] == [] and not manifest["quantization"]["quantize_experts"]


def test_4bit_layers_keep_their_weights_unpacked_in_evaluation():
    """bitsandbytes 0.50's AVX512-BF16 CPU path repacks a Linear4bit's weight in place at its first no-grad forward
    in eval mode, and asserts on its shape (out_features 48: "N must be divisible by block_n" on such a CPU). After
    ``keep_4bit_weights_unpacked`` the weight stays the NF4 data training used, on every CPU. Where the processor has
    AVX512-BF16, the stock layer must still fail: this test fails once a release packs safely (drop the patch)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from gemma4_tune.model.patches import bnb_packs_cpu_weights, keep_4bit_weights_unpacked

    def layer() -> torch.nn.Module:
        torch.manual_seed(0)
        module = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        module.weight = bnb.nn.Params4bit(torch.randn(48, 64), requires_grad=False, quant_type="nf4")
        return module.to("cpu").eval()  # quantizes on the CPU backend

    x = torch.randn(2, 64)
    patched = torch.nn.Sequential(layer())
    assert keep_4bit_weights_unpacked(patched) == (1 if bnb_packs_cpu_weights() else 0)
    before = patched[0].weight.data.clone()
    with torch.no_grad():
        out = patched(x)
    assert torch.equal(patched[0].weight.data, before) and torch.isfinite(out).all()
    if has_avx512bf16() and bnb_packs_cpu_weights():
        with torch.no_grad(), pytest.raises((AssertionError, RuntimeError)):
            layer()(x)
