"""The bug zoo: each failure-catalog row that reproduces on CPU is induced on a tiny model,
and preflight (or the guards, or doctor) must name it by its code. A healthy run has no errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma4_tune.config.options import RunConfig
from gemma4_tune.findings import Severity
from gemma4_tune.preflight import TOWER_NO_GRADIENT, TOWER_WITHOUT_DATA, run_preflight

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma4_tune.data.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("zoo-data"), n=12)


@pytest.fixture(scope="session")
def vision_data(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo rows without audio (for models with no audio tower)."""
    path = tmp_path_factory.mktemp("zoo-vision") / "train.jsonl"
    media = demo_data.parent
    rows = [json.loads(line) for line in demo_data.read_text().splitlines()]
    keep = [r for r in rows if '"audio"' not in json.dumps(r)]
    text = "".join(json.dumps(r) + "\n" for r in keep).replace('"path": "media/', f'"path": "{media}/media/')
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zoo-text") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def setup_run(model: Path, data: Path, targets: str = "text"):
    from gemma4_tune.train.methods.sft import METHOD as sft

    cfg = RunConfig(model=str(model), data=str(data), out="unused", targets=targets)
    return sft.prepare(cfg, sft.read_data(cfg))


def preflight(setup, batch=None, modalities=None):
    return run_preflight(setup.model, setup.profile, setup.plan, batch if batch is not None else setup.probe,
                         dataset_modalities=modalities or setup.data["modalities"],
                         dataset_supervised=setup.data["supervised_tokens"])


def codes(result) -> list[str]:
    return [f.code for f in result.findings]


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "targets"), [("e2b", "text,vision,audio"), ("31b", "text,vision"),
                                                  ("26b-a4b", "text,vision")])
def test_healthy_runs_pass_preflight_and_the_model_is_restored(tiny_models, demo_data, vision_data, variant,
                                                               targets):
    setup = setup_run(tiny_models[variant], demo_data if "audio" in targets else vision_data, targets)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    result = preflight(setup)
    assert not [f for f in result.findings if f.severity is Severity.ERROR], result.findings
    assert math.isfinite(result.loss) and result.supervised_in_batch > 0
    assert set(result.lora_grad) == set(setup.plan.groups) and all(g > 0 for g in result.lora_grad.values())
    for name, param in setup.model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]) and param.grad is None


@pytest.mark.slow
def test_row01_row03_lora_outside_the_plan(tiny_models, vision_data):
    from peft import LoraConfig, get_peft_model

    setup = setup_run(tiny_models["31b"], vision_data, "text-attention")
    base = setup.model.unload()
    setup.model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    assert "G4T112" in codes(preflight(setup))


@pytest.mark.slow
def test_row02_unwrapped_tower_linear(tiny_models, demo_data):
    setup = setup_run(tiny_models["e2b"], demo_data, "text,vision")
    attn = setup.model.get_base_model().model.vision_tower.encoder.layers[0].self_attn
    attn.k_proj = attn.k_proj.linear
    assert "G4T111" in codes(preflight(setup))


@pytest.mark.slow
def test_row09_kv_sharing_that_depends_on_the_cache(tiny_models, text_data):
    setup = setup_run(tiny_models["e2b"], text_data)
    shared = next(layer for layer in setup.profile.layers if layer.kv_sharing == "reuse")
    attn = setup.model.get_base_model().model.language_model.layers[shared.index].self_attn

    def stale_without_cache(module, args, kwargs):  # what transformers < 5.5.2 did: wrong K/V without a cache
        if kwargs.get("past_key_values") is None:
            kwargs["hidden_states"] = kwargs["hidden_states"].flip(-1)
        return args, kwargs

    attn.register_forward_pre_hook(stale_without_cache, with_kwargs=True)
    assert "G4T508" in codes(preflight(setup))


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "targets"), [("31b", "text,vision"), ("12b", "text,vision-embed")])
def test_row10_images_without_mm_token_type_ids(tiny_models, vision_data, variant, targets):
    """The 12B's config asks for bidirectional image attention too: the same finding."""
    setup = setup_run(tiny_models[variant], vision_data, targets)
    assert "G4T505" not in codes(preflight(setup))
    batch = {k: v for k, v in setup.probe.items() if k != "mm_token_type_ids"}
    assert "pixel_values" in batch
    assert "G4T505" in codes(preflight(setup, batch))


@pytest.mark.slow
def test_12b_embedder_without_gradient_and_without_data_are_named(tiny_models, vision_data, text_data):
    """Row 21 for the 12B's embedders: no image data (G4T5xx before training), or a detached embedder."""
    setup = setup_run(tiny_models["12b"], vision_data, "text,vision-embed")
    assert codes(preflight(setup)) == ["G4T511"]  # the model's own image masks (row 31), an info
    no_images = preflight(setup, modalities={"text": 4, "image": 0, "audio": 0})
    assert any(f.code == TOWER_WITHOUT_DATA.code and "vision embedder" in f.message for f in no_images.findings)
    embed = setup.model.get_base_model().model.embed_vision
    embed.register_forward_hook(lambda _m, _a, out: out.__class__(**{k: v.detach() for k, v in out.items()}))
    detached = preflight(setup)
    assert any(f.code == TOWER_NO_GRADIENT.code and "vision embedder" in f.message for f in detached.findings)


@pytest.mark.slow
def test_row12_batch_with_every_label_masked(tiny_models, text_data):
    setup = setup_run(tiny_models["31b"], text_data)
    batch = {**setup.probe, "labels": torch.full_like(setup.probe["labels"], -100)}
    assert "G4T504" in codes(preflight(setup, batch))


@pytest.mark.slow
def test_row14_flash_attention_on_head_dim_512(tiny_models, text_data):
    import dataclasses

    from gemma4_tune.model.catalog import resolve_variant
    from gemma4_tune.model.profile import ModelProfile

    setup = setup_run(tiny_models["31b"], text_data)
    setup.model.get_base_model().config.get_text_config()._attn_implementation_internal = "flash_attention_2"
    # tiny models keep the global/sliding head ratio, not the real 512: take the head dims of the real 31B
    real = ModelProfile.from_variant(resolve_variant("31b"), count_parameters=False)
    setup.profile = dataclasses.replace(setup.profile, layers=real.layers)
    result = preflight(setup)
    assert "G4T506" in codes(result) and math.isnan(result.loss), "the batch must not run after a static error"


@pytest.mark.slow
def test_row16_moe_plan_without_experts(tiny_models, text_data):
    setup = setup_run(tiny_models["26b-a4b"], text_data, "text-attention")
    assert "G4T509" in codes(preflight(setup))


@pytest.mark.slow
def test_row19_fp16_is_refused_and_a_nan_loss_is_caught(tiny_models, text_data):
    setup = setup_run(tiny_models["31b"], text_data)
    setup.model.half()
    assert "G4T507" in codes(preflight(setup))
    setup = setup_run(tiny_models["31b"], text_data)
    lora_b = next(p for n, p in setup.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.fill_(float("nan"))
    assert "G4T501" in codes(preflight(setup))


@pytest.mark.slow
def test_row21_tower_without_gradient_or_without_data(tiny_models, demo_data, text_data):
    setup = setup_run(tiny_models["e2b"], demo_data, "text,vision")
    tower = setup.model.get_base_model().model.vision_tower
    tower.register_forward_hook(lambda module, args, output: type(output)(
        last_hidden_state=output.last_hidden_state.detach()))
    assert "G4T502" in codes(preflight(setup))
    setup = setup_run(tiny_models["e2b"], text_data, "text,audio")
    assert "G4T503" in codes(preflight(setup))


def test_version_rows_9_and_11_are_named():
    from gemma4_tune.doctor import version_findings

    found = [f.code for f in version_findings({"transformers": "5.5.1", "trl": "1.15.0"})]
    assert "G4T701" in found and "G4T704" in found
    assert not [f for f in version_findings() if f.severity is Severity.ERROR]


def test_version_rows_20_and_24_probe_the_installed_fix(monkeypatch):
    import gemma4_tune.doctor as doctor

    assert doctor._ple_resize_fixed() and doctor._zero3_buffers_fixed(), "transformers 5.23 carries both fixes"
    monkeypatch.setattr(doctor, "_ple_resize_fixed", lambda: False)
    monkeypatch.setattr(doctor, "_zero3_buffers_fixed", lambda: False)
    found = [f.code for f in doctor.version_findings({"transformers": "5.6.0", "deepspeed": "0.19.8"})]
    assert "G4T702" in found and "G4T703" in found


def test_guard_stops_on_zero_gradients_and_on_frozen_lora():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from gemma4_tune.train.callbacks import GuardCallback

    model = torch.nn.Linear(2, 2)
    model.weight.requires_grad_(True)
    args = TrainingArguments(output_dir="unused", report_to=[])
    guard, state, control = GuardCallback(model, zero_grad_steps=2), TrainerState(), TrainerControl()
    guard.on_train_begin(args, state, control)
    for step in (1, 2):
        state.global_step = step
        guard.on_log(args, state, control, logs={"loss": 1.0, "grad_norm": 0.0})
    assert [f.code for f in guard.findings] == ["G4T404"] and control.should_training_stop
    guard, control = GuardCallback(model, stall_steps=2), TrainerControl()
    state.global_step = 0
    guard.on_train_begin(args, state, control)
    state.global_step = 2
    guard.on_step_end(args, state, control)
    assert [f.code for f in guard.findings] == ["G4T405"] and not control.should_save


@pytest.mark.slow
def test_guard_stops_a_diverging_run_and_keeps_the_last_good_checkpoint(tiny_models, text_data, tmp_path):
    from gemma4_tune.api import run_training
    from gemma4_tune.config.options import build_config
    from gemma4_tune.findings import FindingError

    out = tmp_path / "run"
    cfg = build_config({"model": str(tiny_models["31b"]), "data": str(text_data), "out": str(out), "max_steps": 6,
                        "save_steps": 1})
    # --lr above 1 is refused up front (G4T005); the guard is the net for a run that diverges all the same.
    with pytest.raises(FindingError) as info:
        run_training(cfg.model_copy(update={"lr": 1e30}))
    assert "G4T403" in [f.code for f in info.value.findings]
    assert not (out / "adapter").exists()
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and all(json.loads((p / "trainer_state.json").read_text())["log_history"][-1]["loss"] < 1e6
                        for p in kept)
    report = json.loads((out / "report.json").read_text())
    assert "G4T403" in [f["code"] for f in report["findings"]]


@pytest.mark.slow
def test_audio_data_for_a_model_without_audio_tower_is_refused(tiny_models, demo_data):
    from gemma4_tune.findings import FindingError

    with pytest.raises(FindingError) as info:
        setup_run(tiny_models["31b"], demo_data, "text")
    assert [f.code for f in info.value.findings] == ["G4T406"]


@pytest.mark.slow
def test_no_preflight_is_itself_reported(tiny_models, text_data, tmp_path):
    proc = subprocess.run([*CLI, "train", "--model", str(tiny_models["31b"]), "--data", str(text_data),
                           "--out", str(tmp_path / "r"), "--max-steps", "1", "--no-preflight"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "G4T510" in [f["code"] for f in report["findings"]] and report["preflight"] is None


@pytest.mark.slow
def test_preflight_command_prints_json_with_the_masked_sample_and_exits_1_on_errors(tiny_models, text_data,
                                                                                     demo_data):
    proc = subprocess.run([*CLI, "preflight", "--model", str(tiny_models["26b-a4b"]), "--data", str(text_data),
                           "--out", "unused", "--targets", "text-attention", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert [f["code"] for f in data["findings"]] == ["G4T509"] and "⟦" in data["sample"]
    proc = subprocess.run([*CLI, "preflight", "--model", str(tiny_models["31b"]), "--data", str(demo_data),
                           "--out", "unused"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1 and "G4T406" in proc.stderr


@pytest.mark.slow
def test_rows_9_20_24_known_bad_versions_stop_preflight(tiny_models, text_data, monkeypatch):
    import gemma4_tune.doctor as doctor

    setup = setup_run(tiny_models["31b"], text_data)
    monkeypatch.setattr(doctor, "installed_versions", lambda: {"transformers": "5.5.1", "trl": "1.16.0"})
    result = preflight(setup)
    assert "G4T701" in codes(result) and math.isnan(result.loss), "a known-bad transformers stops the batch"
