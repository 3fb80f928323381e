"""Preference tuning (``train --method dpo``, issue 21) on tiny E2B (with image pairs) and tiny 31B.

The pairs follow a rule a few steps can learn: the chosen answer names the colour politely, the
rejected one is curt. Held-out pairs use prompts never trained on. The broken setups of the issue are
induced for real on TRL's own batches: a reference that keeps the adapter on, image pairs without
``mm_token_type_ids`` on the 31B, a policy that does not start at the reference.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemma4_tune.config.options import RunConfig
from gemma4_tune.findings import FindingError
from tests.test_train import SAME_THREADS, kill_at_checkpoint

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey", "brown", "gold"]
THINGS = ["car", "house", "bird", "flower", "shirt", "boat", "lamp", "cup", "book", "door", "kite", "chair"]


def cli(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=1200, env=env)


def write_pairs(folder: Path, *, images: bool, n: int = 12, n_eval: int = 6) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl of TRL-conversational pairs; every other prompt with an image when ``images``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def rows(count: int, offset: int) -> str:
        out = []
        for i in range(count):
            colour, thing = COLOURS[(i + offset) % 12], THINGS[(3 * i + offset) % 12]
            content = [{"type": "text", "text": f"What colour is the {thing} number {i + offset}?"}]
            if images and i % 2 == 0:
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i + offset}.png")
                content.insert(0, {"type": "image", "path": f"{i + offset}.png"})
            out.append({"prompt": [{"role": "user", "content": content}],
                        "chosen": [{"role": "assistant", "content": f"Thank you for asking: the {thing} is {colour}."}],
                        "rejected": [{"role": "assistant", "content": "No."}]})
        return "".join(json.dumps(r) + "\n" for r in out)

    (folder / "train.jsonl").write_text(rows(n, 0))
    (folder / "eval.jsonl").write_text(rows(n_eval, 100))
    return folder / "train.jsonl", folder / "eval.jsonl"


def dpo_args(model: Path, data: tuple[Path, Path], targets: str = "text,vision") -> list:
    return ["--method", "dpo", "--model", model, "--data", data[0], "--eval-data", data[1], "--targets", targets,
            "--max-steps", 6, "--lr", 5e-3, "--batch-size", 2, "--rank", 8, "--seed", 1, "--eval-steps", 3]


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "images"), [("e2b", True), ("31b", True)])
def test_dpo_raises_held_out_reward_accuracy_with_the_base_as_reference(tiny_models, tmp_path, variant, images):
    data = write_pairs(tmp_path / "data", images=images)
    out = tmp_path / "run"
    proc = cli("train", *dpo_args(tiny_models[variant], data), "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    first, last = report["dpo"]["evals"][0], report["dpo"]["evals"][-1]
    print(json.dumps({"variant": variant, "before": first, "after": last}))
    assert [e["step"] for e in report["dpo"]["evals"]] == [0, 3, 6]  # before, every --eval-steps, at the end
    assert first["eval_reward_margin"] == 0.0  # the base is the reference: every reward is 0 at step 0
    assert last["eval_reward_accuracy"] > first["eval_reward_accuracy"] and last["eval_reward_margin"] > 0.1
    pf = report["dpo"]["preflight"]
    assert pf["max_abs_log_ratio_step0"] == 0.0 and pf["reference_equals_base"] and pf["policy_minus_base"] > 0.1
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == []
    steps = [m for m in report["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 7)) and steps[-1]["loss"] < steps[0]["loss"]
    assert all(m["tokens_per_s"] > 0 and "rewards/margins" in m for m in steps)
    assert (out / "dpo.png").is_file() and "Preference tuning (DPO)" in (out / "report.md").read_text()
    samples = report["samples"]  # base and tuned answers to held-out prompts, beside the chosen answer
    assert samples and all(s["held_out"] and s["reference"].startswith("Thank you") for s in samples)
    assert samples[0]["kind"] == "image"
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert keys and not [k for k in keys if ".ref." in k], "TRL's reference copy of the adapter is not saved"
    if variant == "e2b":  # a DPO adapter is an adapter: stock PEFT reproduces it on text and images
        proc = cli("verify", "--base", tiny_models[variant], "--adapter", out / "adapter", "--engine", "peft",
                   "--out", tmp_path / "v", "--json")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert {r["modalities"][0] for r in json.loads(proc.stdout)["engines"]} == {"text", "image", "audio"}


@pytest.fixture(scope="module")
def b31_trainer(tiny_models, tmp_path_factory):
    """TRL's DPOTrainer on the tiny 31B with image pairs, as train --method dpo builds it; and a real batch."""
    from gemma4_tune.train.methods.dpo import METHOD as dpo
    from gemma4_tune.train.preference import probe_batch

    root = tmp_path_factory.mktemp("dpo-31b")
    train, held = write_pairs(root / "data", images=True)
    cfg = RunConfig(model=str(tiny_models["31b"]), data=str(train), eval_data=str(held), out=str(root / "run"),
                    method="dpo", targets="text,vision", rank=8, batch_size=2)
    built = dpo.build_trainer(cfg, dpo.read_data(cfg), root / "staging")
    return built, probe_batch(built["trainer"])


def _codes(findings) -> list[str]:
    return [f.code for f in findings]


@pytest.mark.slow
def test_the_reference_is_the_base_with_the_adapter_disabled_and_one_that_keeps_it_is_g4t512(b31_trainer,
                                                                                            monkeypatch):
    from trl.trainer import dpo_trainer

    from gemma4_tune.train.preference import dpo_preflight

    built, batch = b31_trainer
    model, profile = built["model"], built["profile"]
    assert list(model.peft_config) == ["default"], "no second adapter: the reference is the adapter disabled"
    assert "pixel_values" in batch and "mm_token_type_ids" in batch
    findings, figures = dpo_preflight(model, profile, batch)
    assert findings == [] and figures["reference_equals_base"] and figures["max_abs_log_ratio_step0"] == 0.0
    # a reference that keeps the adapter on (the tuned model as its own reference): the loss means nothing
    monkeypatch.setattr(dpo_trainer, "use_adapter", lambda model, adapter_name: contextlib.nullcontext())
    findings, figures = dpo_preflight(model, profile, batch)
    assert _codes(findings) == ["G4T512"]
    assert figures["reference_minus_base"] == figures["policy_minus_base"] > 0.1
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n), "restored"


@pytest.mark.slow
def test_31b_image_pairs_without_mm_token_type_ids_are_g4t505(b31_trainer):
    from gemma4_tune.train.preference import preflight_pairs

    built, batch = b31_trainer
    data = {"modalities": {"image": 4}}
    result = preflight_pairs(built, batch, data)  # SFT's checks on the DPO batch, then DPO's own
    assert result.findings == [] and result.reference["reference_equals_base"] and result.loss > 0
    assert set(result.lora_grad) == {"text", "vision"} and all(g > 0 for g in result.lora_grad.values())
    assert "⟦" in result.sample  # the answer is what is supervised
    dropped = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    result = preflight_pairs(built, dropped, data)
    assert _codes(result.findings) == ["G4T505"] and result.reference == {}


@pytest.mark.slow
def test_preflight_method_dpo_runs_the_sft_and_dpo_checks_and_writes_nothing(tiny_models, tmp_path):
    data = write_pairs(tmp_path / "data", images=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = cli("preflight", *dpo_args(tiny_models["e2b"], data), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["reference"]["reference_equals_base"] and result["reference"]["max_abs_log_ratio_step0"] == 0.0
    assert {"text", "vision"} <= set(result["lora_grad"]) and result["supervised_in_batch"] > 0
    assert [f["code"] for f in result["findings"] if f["severity"] == "error"] == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_a_policy_that_does_not_start_at_the_reference_is_g4t513(b31_trainer):
    from gemma4_tune.train.preference import dpo_preflight

    built, batch = b31_trainer
    model = built["model"]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.fill_(0.01)
    try:
        findings, _ = dpo_preflight(model, built["profile"], batch)
    finally:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
    assert _codes(findings) == ["G4T513"]


@pytest.mark.slow
def test_bad_pairs_stop_before_the_model_loads_and_audio_pairs_are_g4t514(tmp_path):
    from gemma4_tune.data.demo_data import write_demo_dataset
    from gemma4_tune.train.methods.dpo import METHOD as dpo

    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}) + "\n")
    proc = cli("train", "--method", "dpo", "--model", tmp_path / "no-model-needed", "--data", same, "--out",
               tmp_path / "run")
    assert proc.returncode == 1 and "G4T325" in proc.stderr, proc.stderr[-2000:]
    demo = write_demo_dataset(tmp_path / "demo", n=3)
    wav = next((demo.parent / "media").glob("*.wav"))
    audio = tmp_path / "audio.jsonl"
    audio.write_text(json.dumps({
        "prompt": [{"role": "user", "content": [{"type": "audio", "path": str(wav)}, {"type": "text", "text": "What?"}]}],
        "chosen": [{"role": "assistant", "content": "A tone."}],
        "rejected": [{"role": "assistant", "content": "No."}]}) + "\n")
    with pytest.raises(FindingError) as info:
        dpo.read_data(RunConfig(model="m", data=str(audio), method="dpo"))
    assert _codes(info.value.findings) == ["G4T514"] and "audio.jsonl:1: audio" in info.value.findings[0].message
    tool = tmp_path / "tool.jsonl"  # a tool call in the answer: TRL's rows would drop it, so it is refused
    tool.write_text(json.dumps({
        "prompt": [{"role": "user", "content": "Weather?"}],
        "chosen": [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}],
        "rejected": [{"role": "assistant", "content": "No."}]}) + "\n")
    with pytest.raises(FindingError) as info:
        dpo.read_data(RunConfig(model="m", data=str(tool), method="dpo"))
    assert _codes(info.value.findings) == ["G4T514"] and "tool_calls" in info.value.findings[0].message


def test_dpo_settings_are_checked_and_axolotl_rl_dpo_maps() -> None:
    from pydantic import ValidationError

    from gemma4_tune.config.options import build_config
    from gemma4_tune.findings import FindingError as Refused

    assert RunConfig(model="m", data="d.jsonl", method="dpo", beta=0.2).beta == 0.2
    with pytest.raises((ValidationError, Refused)):
        build_config({"model": "m", "data": "d.jsonl", "beta": 0.2})  # beta means nothing for SFT
    with pytest.raises((ValidationError, Refused)):
        build_config({"model": "m", "data": "d.jsonl", "method": "dpo", "packing": True})


def test_axolotl_rl_dpo_and_its_beta_map_and_other_objectives_are_refused(tmp_path) -> None:
    from gemma4_tune.config import read_run_file

    path = tmp_path / "dpo.yaml"
    path.write_text("base_model: m\nadapter: lora\nrl: dpo\nrl_beta: 0.05\ndatasets:\n  - path: d.jsonl\n    type: "
                    "chat_template.default\n    field_messages: conversation\noutput_dir: out\n")
    imported = read_run_file(path)
    assert imported.config.method == "dpo" and imported.config.beta == 0.05
    assert imported.config.data[0].field_messages == "conversation"
    path.write_text("base_model: m\nadapter: lora\nrl: orpo\ndatasets:\n  - path: d.jsonl\n")
    with pytest.raises(FindingError) as info:
        read_run_file(path)
    assert any("only rl: dpo, kto and grpo are trained here" in f.message for f in info.value.findings)


@pytest.mark.slow
def test_dpo_that_learns_nothing_is_g4t515_and_compare_shows_it_beside_an_sft_run(tiny_models, tmp_path):
    data = write_pairs(tmp_path / "data", images=False, n=4, n_eval=2)
    args = dpo_args(tiny_models["31b"], data, targets="text")
    args[args.index("--lr") + 1] = 1e-12
    args[args.index("--max-steps") + 1] = 2
    proc = cli("train", *args, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "G4T515" in [f["code"] for f in report["findings"]]
    # compare puts it beside an SFT run, each with its own method and held-out figures
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                         {"role": "assistant", "content": " ".join("1234"[:i])}]})
                                + "\n" for i in range(1, 5)))
    proc = cli("train", "--model", tiny_models["31b"], "--data", sft_data, "--out", tmp_path / "sft",
               "--max-steps", 2, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("compare", tmp_path / "sft", tmp_path / "run", "--out", tmp_path / "cmp", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads(proc.stdout)["runs"]}
    assert (runs["sft"]["method"], runs["run"]["method"]) == ("sft", "dpo")
    assert runs["run"]["eval_reward_accuracy_start"] == 0.0 and runs["sft"]["eval_reward_accuracy_start"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tiny_models, tmp_path, method):
    data = write_pairs(tmp_path / "data", images=False, n=8, n_eval=2)
    args = [*dpo_args(tiny_models["31b"], data, targets="text"), "--save-steps", 2, "--samples", 0]
    args[args.index("--method") + 1] = method
    reference = tmp_path / "reference"
    proc = cli("train", *args, "--out", reference, env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_at_checkpoint(args, killed, "checkpoint-2")
    other = list(args)
    other[other.index("--lr") + 1] = 1e-3
    proc = cli("train", *other, "--beta", 0.5, "--out", killed, "--resume", env=SAME_THREADS)
    assert proc.returncode != 0 and "G4T414" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "beta: 0.1 -> 0.5" in proc.stdout + proc.stderr and "lr: 0.005 -> 0.001" in proc.stdout + proc.stderr
    proc = cli("train", *args, "--out", killed, "--resume", env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((killed / "report.json").read_text())
    assert report["summary"]["resumed from"].endswith(("checkpoint-2", "checkpoint-4"))
    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-6), key
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    held_out = "eval_reward_accuracy" if method == "dpo" else "eval_reward_margin"  # KTO counts no accuracy
    assert [r["step"] for r in rows if held_out in r] == [0, 3, 6]
    recipe = json.loads((killed / "run-start.json").read_text())["recipe"]
    assert (recipe["method"], recipe["beta"]) == (method, 0.1)


def test_held_out_pairs_repeating_training_pairs_are_g4t407_and_the_split_keeps_twins_together(tmp_path) -> None:
    from gemma4_tune.train.methods.dpo import METHOD as dpo

    train, held = write_pairs(tmp_path / "data", images=False, n=6, n_eval=2)
    twice = tmp_path / "twice.jsonl"  # every pair twice: a split must keep both copies on one side
    twice.write_text(train.read_text() * 2)
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(held.read_text() + train.read_text().splitlines(keepends=True)[0])
    leaked = dpo.read_data(RunConfig(model="m", data=str(train), eval_data=str(leaky), method="dpo"))
    assert len(leaked.eval_pairs) == 3 and [f.code for f in leaked.findings] == ["G4T407"]
    assert "1 of 3 held-out preference pairs" in leaked.findings[0].message
    assert dpo.read_data(RunConfig(model="m", data=str(train), eval_data=str(held), method="dpo")).findings == []
    split = dpo.read_data(RunConfig(model="m", data=str(twice), eval_split=0.34, method="dpo"))
    kept, eval_pairs = split.pairs, split.eval_pairs
    assert (len(kept), len(eval_pairs)) == (8, 4) and split.summary["eval_pairs"] == 4
    held_prompts = {json.dumps(p.prompt) for p in eval_pairs}
    assert not held_prompts & {json.dumps(p.prompt) for p in kept}


@pytest.mark.slow
def test_trl_renders_pairs_token_for_token_as_our_batcher_and_supervises_the_same_answer(tiny_models, tmp_path):
    """prompt + chosen and prompt + rejected, text and image pairs, through TRL's collator: the same tokens as
    Gemma4Batcher.encode of the same conversation, the same supervised positions (SFT's: the answer up to its
    end-of-turn token; TRL alone would also train the template's newline after it), the same pixels."""
    from gemma4_tune.data.collate import Gemma4Batcher
    from gemma4_tune.train.methods.dpo import METHOD as dpo
    from gemma4_tune.train.preference import probe_batch

    train, held = write_pairs(tmp_path / "data", images=True, n=4, n_eval=2)
    cfg = RunConfig(model=str(tiny_models["e2b"]), data=str(train), eval_data=str(held), out=str(tmp_path / "run"),
                    method="dpo", rank=8)
    data = dpo.read_data(cfg)
    pairs = data.pairs
    built = dpo.build_trainer(cfg, data, tmp_path / "staging")
    batch = probe_batch(built["trainer"])  # the first pair with an image, then the first without
    batcher = Gemma4Batcher(built["processor"], revision=cfg.template_revision, max_seq_len=cfg.max_seq_len)
    picked = [pairs[0], pairs[1]]
    assert picked[0].images and not picked[1].images
    rows = [(p, side) for side in ("chosen", "rejected") for p in picked]
    for i, (pair, side) in enumerate(rows):
        ours = batcher.encode(pair.chosen_conversation() if side == "chosen" else pair.rejected_conversation())
        keep = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][keep].tolist() == list(ours["input_ids"]), (i, side)
        assert batch["completion_mask"][i][keep].tolist() == [int(x != -100) for x in ours["labels"]], (i, side)
        if pair.images:
            assert torch.equal(batch["pixel_values"][0], torch.as_tensor(ours["pixel_values"])[0])


def test_held_out_rewards_are_strict_json_and_a_nan_figure_is_no_rise(tmp_path) -> None:
    """A NaN held-out margin is written as null (as every metrics row) and read back as no rise: G4T515."""
    from types import SimpleNamespace

    from gemma4_tune.train.methods.dpo import METHOD as dpo
    from gemma4_tune.train.preference import HeldOutRewards, not_learning

    path = tmp_path / "metrics.jsonl"
    callback = HeldOutRewards(path, 3, dpo.rewards_row)
    metrics = {"eval_rewards/accuracies": 0.5, "eval_rewards/margins": float("nan"), "eval_loss": 0.7,
               "eval_logps/chosen": -3.0, "eval_logps/rejected": -4.0}
    callback.on_evaluate(None, SimpleNamespace(global_step=6), None, metrics=metrics)
    line = path.read_text().strip()
    assert "NaN" not in line and json.loads(line)["eval_reward_margin"] is None
    first = {"eval_reward_accuracy": 0.5, "eval_reward_margin": 0.0}
    found = not_learning(first, json.loads(line))
    assert [f.code for f in found] == ["G4T515"] and "margin 0.000 -> nan" in found[0].message
    assert not_learning(first, {"eval_reward_accuracy": 1.0, "eval_reward_margin": None}) == []
    assert [f.code for f in not_learning({"eval_reward_margin": 0.0}, {"eval_reward_margin": None})] == ["G4T515"]
