"""Axolotl's own Gemma 4 example configs (tests/data/axolotl, sources in each file's first line), read with
Axolotl's meaning of every key and trained on tiny models with nothing but paths changed (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from gemma4_tune.config import load_yaml, read_run_file
from gemma4_tune.findings import FindingError

EXAMPLES = Path(__file__).parent / "data" / "axolotl"
NAMES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
VARIANT = {"e2b": "e2b", "26b": "26b-a4b", "31b": "31b"}
CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


def sharegpt_rows(n: int = 20) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": f"{2 * i}."}]} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """FineTome-shaped ShareGPT rows, and llava-instruct-mix-vsft-shaped rows (messages + images column)."""
    root = tmp_path_factory.mktemp("axolotl-data")
    (root / "finetome.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt_rows()))
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    rows = []
    for i in range(8):  # llava-instruct-mix-vsft's shape: messages with path-less image parts, images embedded
        name = list(colours)[i % 2]
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                               {"type": "text", "text": "What colour?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": f"{name}."}]}],
                     "images": [Image.new("RGB", (16, 16), colours[name])]})
    part = {"type": Value("string"), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(part)}),
                         "images": List(ImageFeature())})
    Dataset.from_list(rows, features=features).to_parquet(str(root / "llava.parquet"))
    return {"finetome": root / "finetome.jsonl", "llava": root / "llava.parquet"}


def localised(name: str, model: str | Path, data: dict[str, Path], out: Path) -> tuple[Path, dict]:
    """The example with base_model, the dataset path and output_dir changed, nothing else."""
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    raw["base_model"] = str(model)
    raw["datasets"][0]["path"] = str(data["llava" if name.startswith("e2b") else "finetome"])
    raw["output_dir"] = str(out)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


@pytest.mark.parametrize("name", NAMES)
def test_every_example_maps_each_key_with_axolotls_meaning(name, data, tmp_path):
    path, raw = localised(name, "m", data, tmp_path / "run")
    imported = read_run_file(path)
    cfg = imported.config
    assert imported.dialect == "Axolotl"
    assert (cfg.model, cfg.out, cfg.rank, cfg.alpha, cfg.lora_dropout) == (
        "m", str(tmp_path / "run"), raw["lora_r"], raw["lora_alpha"], raw["lora_dropout"])
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.epochs) == (
        float(raw["learning_rate"]), raw["micro_batch_size"], raw["gradient_accumulation_steps"], raw.get("num_epochs", 1))
    assert (cfg.packing, cfg.max_seq_len) == (raw["sample_packing"], raw["sequence_len"])
    assert (cfg.optimizer, cfg.lr_scheduler, cfg.warmup_ratio, cfg.weight_decay) == (
        raw["optimizer"], raw["lr_scheduler"], raw["warmup_ratio"], raw["weight_decay"])
    assert cfg.quantize == ("4bit" if raw.get("load_in_4bit") else None)
    assert cfg.max_grad_norm == raw.get("max_grad_norm", 1.0) and cfg.adam_beta2 == raw.get("adam_beta2", 0.999)
    assert cfg.max_steps == raw.get("max_steps", -1)
    assert cfg.eval_split == raw["val_set_size"]
    assert (cfg.evals_per_epoch, cfg.saves_per_epoch) == (raw.get("evals_per_epoch"), raw.get("saves_per_epoch"))
    targets = cfg.targets.split(",")
    assert targets[0] == f"re:{raw['lora_target_modules']}"
    assert ("text-experts" in targets) == ("lora_target_parameters" in raw)
    (spec,) = cfg.data
    entry = raw["datasets"][0]
    assert spec.split == entry["split"] and spec.field_messages == entry.get("field_messages")
    assert spec.message_property_mappings == entry.get("message_property_mappings", {})
    statuses = {row["key"]: row["status"] for row in imported.mapping}
    assert set(raw) <= {key.split("[")[0] for key in statuses}, "a key of the file has no row in the mapping"
    assert statuses["strict"] == "no effect" and statuses["plugins"] == "no effect"
    (no_effect,) = [f for f in imported.findings if f.code == "G4T006"]
    assert "strict" in no_effect.message and no_effect.message.count("plugins") == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_examples_train_on_tiny_models(name, tiny_models, data, tmp_path):
    """Changed: paths, and the run cut to 3 steps without sample answers. Everything else is the example's, on
    this CPU too: QLoRA (bitsandbytes' CPU backend) and the 8-bit optimizers (torchao's, bitsandbytes')."""
    from gemma4_tune.api import run_training

    model = tiny_models[VARIANT[name.split("-")[0]]]
    path, raw = localised(name, model, data, tmp_path / "run")
    result = run_training(load_yaml(path, {"max_steps": 3, "samples": 0}))
    record = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert result.adapter is not None and (result.adapter / "adapter_model.safetensors").is_file()
    assert (record["optimizer"], record["quantize"]) == (raw["optimizer"], "4bit" if raw.get("load_in_4bit") else None)
    manifest = json.loads((result.adapter / "gemma4_tune_manifest.json").read_text())
    if raw.get("load_in_4bit"):  # the 4-bit base, as Axolotl's bnb_config_kwargs set it, is what the manifest says
        double = raw.get("bnb_config_kwargs", {}).get("bnb_4bit_use_double_quant", True)
        assert (manifest["quantization"]["quant_type"], manifest["quantization"]["double_quant"]) == ("nf4", double)
        assert bool(manifest["quantization"]["experts"]) == bool(raw.get("quantize_moe_experts"))  # Axolotl's key
    else:
        assert "quantization" not in manifest
    assert (record["rank"], record["alpha"], record["lr"], record["packing"], record["lr_scheduler"]) == (
        raw["lora_r"], raw["lora_alpha"], float(raw["learning_rate"]), raw["sample_packing"], raw["lr_scheduler"])
    assert record["targets"].startswith(f"re:{raw['lora_target_modules']}")
    assert record["data"][0]["split"] == raw["datasets"][0]["split"]
    plan = json.loads((result.adapter / "target_plan.json").read_text())
    assert bool(plan["target_parameters"]) == ("lora_target_parameters" in raw)
    assert not any(".vision_tower." in m or ".audio_tower." in m for m in plan["target_modules"])
    if name.startswith("e2b"):
        assert result.data["modalities"]["image"] == 8  # train[:100] of 8 rows: all 8, each with its image
        assert result.data["sources"][0]["format"] == "OpenAI chat"


def test_refused_and_unknown_keys_are_one_finding_with_reasons(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("base_model: m\nadapter: lora\nfp16: true\nlora_modules_to_save: [embed_tokens]\n"
                   "datasets:\n  - path: d.jsonl\n    type: input_output\nlearning_rat: 0.1\nfoo_bar: 1\n"
                   "eot_tokens: ['<eos>']\n")
    with pytest.raises(FindingError) as info:
        load_yaml(run)
    (found,) = info.value.findings
    assert found.code == "G4T005"
    assert "2 unknown key(s): foo_bar, learning_rat (did you mean learning_rate?)" in found.message
    for reason in ("fp16: fp16 overflows", "lora_modules_to_save:", "datasets[0].type: dataset type 'input_output'",
                   "eot_tokens: Gemma 4 turns end with <turn|>"):
        assert reason in found.message


def test_full_fine_tune_and_qlora_without_4bit_are_refused(tmp_path):
    for body, reason in (("", "without `adapter: lora`"), ("adapter: qlora\n", "needs load_in_4bit")):
        run = tmp_path / "run.yaml"
        run.write_text(f"base_model: m\ndatasets: [d.jsonl]\n{body}")
        with pytest.raises(FindingError, match=reason):
            load_yaml(run)


def test_defaults_val_set_size_count_and_dataset_keys(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("base_model: m\nadapter: lora\nval_set_size: 5\nlora_target_modules: [q_proj, v_proj]\n"
                   "train_on_inputs: true\nwandb_project:\ndatasets:\n  - path: a.jsonl\n    roles_to_train: [user, "
                   "assistant]\n    roles: {user: [human], assistant: [bot]}\n  - path: b.parquet\n    type: alpaca\n")
    imported = read_run_file(run)
    cfg = imported.config
    assert cfg.eval_split == 5 and cfg.train_on == "all"
    assert (cfg.lr_scheduler, cfg.optimizer, cfg.seed, cfg.max_seq_len, cfg.warmup_ratio) == (
        "cosine", "adamw_torch_fused", 42, 512, 0.03)
    assert cfg.targets == r"re:(?:.*\.)?(?:q_proj|v_proj)"
    first, second = cfg.sources()
    assert first.options.roles_to_train == ("user", "assistant") and first.options.roles["assistant"] == ("bot",)
    assert second.options.format == "alpaca"
    statuses = {row["key"]: row["status"] for row in imported.mapping}
    assert statuses["wandb_project"] == "absent" and statuses["eot_tokens"] == "read differently"


def test_list_targets_match_names_as_peft_does(tiny_models):
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    from gemma4_tune.model.profile import ModelProfile
    from gemma4_tune.plan.targets import plan_targets

    config = AutoConfig.from_pretrained(str(tiny_models["e2b"]))
    import torch

    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    profile = ModelProfile.from_pretrained(str(tiny_models["e2b"]), count_parameters=False)
    plan = plan_targets(model, profile, r"re:(?:.*\.)?(?:q_proj)")
    suffixes = {name for name, _ in model.named_modules() if name.endswith(".q_proj")}
    planned = {t.path.removesuffix(".linear") for t in plan.targets}
    assert planned == suffixes and any(".vision_tower." in p for p in planned)


def test_cli_explain_config_and_usage_exit_codes(data, tmp_path):
    path, _ = localised("31b-qlora.yaml", "m", data, tmp_path / "run")
    proc = subprocess.run([*CLI, "train", str(path), "--explain-config"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lora_target_modules" in proc.stdout and "[no effect] Liger kernels are not used" in proc.stdout
    assert "rank: 16" in proc.stdout and not (tmp_path / "run").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: m\nadapter: lora\nfp16: true\n")
    proc = subprocess.run([*CLI, "train", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "G4T005" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_preflight_needs_no_out_and_bad_data_is_a_finding_without_traceback(tiny_models, data, tmp_path):
    base = [*CLI, "preflight", "--model", str(tiny_models["31b"])]
    proc = subprocess.run([*base, "--data", str(data["finetome"])], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data: ShareGPT, 20 rows from" in proc.stderr and list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "A", "loss_mask": [1]}]}) + "\n")
    proc = subprocess.run([*base, "--data", str(bad)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1 and "G4T305" in proc.stderr and "messages[].loss_mask" in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_axolotl_names_in_our_own_file_get_the_right_did_you_mean(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model: m\ndata: d.jsonl\nmicro_batch_size: 2\nlearnin_rate: 1\n")
    with pytest.raises(FindingError) as info:
        load_yaml(run)
    (found,) = info.value.findings
    assert "'micro_batch_size' (did you mean 'batch_size'? ('micro_batch_size' is Axolotl's name" in found.message
    assert "'learnin_rate'" in found.message and "learnin_rate' (did" not in found.message


def test_rl_kto_maps_to_the_kto_method_and_its_weights_are_read(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("base_model: m\nadapter: lora\nrl: kto\nrl_beta: 0.2\nkto_desirable_weight: 1.0\n"
                   "datasets:\n  - path: kto.jsonl\n")
    imported = read_run_file(run)
    assert (imported.config.method, imported.config.beta) == ("kto", 0.2)
    assert {row["key"]: row["status"] for row in imported.mapping}["kto_desirable_weight"] == "mapped"
    run.write_text("base_model: m\nadapter: lora\nrl: kto\nkto_undesirable_weight: 1.5\ndatasets: [kto.jsonl]\n")
    with pytest.raises(FindingError, match="kto_undesirable_weight: KTO's desirable and undesirable weights are 1"):
        load_yaml(run)
