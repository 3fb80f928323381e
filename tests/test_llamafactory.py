"""LLaMA-Factory's own example configs and dataset_info.json (tests/data/llamafactory, source and commit in its
SOURCE.md), read with LLaMA-Factory's meaning of every key and trained on tiny models with only the model, the
template and the paths changed (issue 34)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gemma4_tune.config import load_yaml, read_run_file
from gemma4_tune.findings import FindingError

LF = Path(__file__).parent / "data" / "llamafactory"
DATA = LF / "data"
CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]
EXAMPLES = {"sft": "qwen3_lora_sft.yaml", "dpo": "qwen3_lora_dpo.yaml", "kto": "qwen3_lora_kto.yaml"}


def localised(example: str, model: str | Path, out: Path, **changes: object) -> tuple[Path, dict]:
    """The example with the model, the template (a Gemma 4 one) and the paths changed, nothing else."""
    raw = yaml.safe_load((LF / "examples" / EXAMPLES[example]).read_text())
    raw.update({"model_name_or_path": str(model), "template": "gemma4", "output_dir": str(out),
                "dataset_dir": str(DATA), **changes})
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


@pytest.mark.parametrize("stage", sorted(EXAMPLES))
def test_every_example_key_has_llamafactorys_meaning(stage, tmp_path):
    path, raw = localised(stage, "m", tmp_path / "run")
    imported = read_run_file(path)
    cfg = imported.config
    assert imported.dialect == "LLaMA-Factory" and cfg.method == stage
    assert (cfg.model, cfg.out, cfg.rank, cfg.alpha) == ("m", str(tmp_path / "run"), raw["lora_rank"], None)
    batch, accum = raw["per_device_train_batch_size"], raw["gradient_accumulation_steps"]
    if stage == "kto":  # TRL's KTO needs 2 rows a batch for its KL term: the same effective batch, read so
        batch, accum = 2, accum // 2
        assert {row["key"]: row["status"] for row in imported.mapping}["per_device_train_batch_size"] == \
            "read differently"
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.epochs) == (
        float(raw["learning_rate"]), batch, accum, raw["num_train_epochs"])
    assert (cfg.lr_scheduler, cfg.warmup_ratio, cfg.max_seq_len) == (
        raw["lr_scheduler_type"], raw["warmup_ratio"], raw["cutoff_len"])
    assert (cfg.logging_steps, cfg.save_steps, cfg.seed, cfg.optimizer) == (
        raw["logging_steps"], raw["save_steps"], 42, "adamw_torch_fused")  # HF TrainingArguments' defaults
    assert cfg.targets == "text" and cfg.gradient_checkpointing
    if stage != "sft":
        assert cfg.beta == raw["pref_beta"]
    names = [name.strip() for name in raw["dataset"].split(",")]
    info = json.loads((DATA / "dataset_info.json").read_text())
    assert [Path(spec.path).name for spec in cfg.data] == [info[name]["file_name"] for name in names]
    assert all(spec.split == f"train[:{raw['max_samples']}]" for spec in cfg.data)
    statuses = {row["key"]: row["status"] for row in imported.mapping}
    assert set(raw) <= set(statuses), "a key of the file has no row in the mapping"
    assert statuses["report_to"] == statuses["plot_loss"] == statuses["ddp_timeout"] == "no effect"
    assert statuses["template"] == statuses["lora_target"] == "read differently"
    (no_effect,) = [f for f in imported.findings if f.code == "G4T006"]
    assert "report_to" in no_effect.message and "preprocessing_num_workers" in no_effect.message


def test_datasets_read_through_dataset_info_with_columns_and_tags(tmp_path):
    from gemma4_tune.data.records import load_datasets

    path, _ = localised("sft", "m", tmp_path / "run", dataset="identity,mllm_demo,glaive_toolcall_en_demo",
                        max_samples=5)
    cfg = load_yaml(path)
    identity, mllm, glaive = cfg.sources()
    assert identity.options.format == "alpaca" and identity.options.columns["instruction"] == "instruction"
    assert mllm.options.property_mappings == {"role": "role", "content": "content"}
    assert mllm.options.roles["user"] == ("user",) and mllm.options.columns["images"] == "images"
    assert glaive.options.columns == {"messages": "conversations", "tools": "tools"}
    conversations, report = load_datasets(cfg.sources())
    assert len(conversations) == report.kept == 15  # max_samples: the first 5 rows of each
    images = json.loads((DATA / "mllm_demo.json").read_text())[:5]
    assert sum(len(c.images) for c in conversations) == sum(len(row["images"]) for row in images) == 7
    tools = [c for c in conversations if c.tools]
    glaive = json.loads((DATA / "glaive_toolcall_en_demo.json").read_text())[:5]
    assert len(tools) == sum(json.loads(row["tools"]) != [] for row in glaive) == 2  # tools as JSON strings
    assert all(t["type"] == "function" for c in tools for t in c.tools)


@pytest.mark.parametrize(("changes", "reasons"), [
    ({"template": "qwen3_nothink"}, ["template: only a Gemma 4 template"]),
    ({"dataset": "alpaca_en"}, ["hf_hub_url", "never downloads"]),
    ({"dataset": "no_such_set"}, ["no dataset 'no_such_set'"]),
    ({"stage": "dpo", "dataset": "identity"}, ["cannot train stage dpo"]),
    ({"finetuning_type": "full", "use_dora": True, "quantization_bit": 8, "fp16": True},
     ["finetuning_type: gemma4-tune trains LoRA", "use_dora: DoRA", "quantization_bit: only 4-bit", "fp16: fp16"]),
    ({"learning_rat": 0.1}, ["1 unknown key(s): learning_rat (did you mean learning_rate?)"]),
])
def test_refused_and_unknown_keys_are_one_finding_with_reasons(changes, reasons, tmp_path):
    path, _ = localised("sft", "m", tmp_path / "run", **changes)
    with pytest.raises(FindingError) as info:
        load_yaml(path)
    (found,) = info.value.findings
    assert found.code == "G4T005"
    for reason in reasons:
        assert reason in found.message


def test_named_targets_stay_out_of_the_towers_unless_unfrozen(tiny_models, tmp_path):
    import torch
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    from gemma4_tune.model.profile import ModelProfile
    from gemma4_tune.plan.targets import plan_targets

    config = AutoConfig.from_pretrained(str(tiny_models["e2b"]))
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    profile = ModelProfile.from_pretrained(str(tiny_models["e2b"]), count_parameters=False)
    for frozen in (True, False):
        path, _ = localised("sft", "m", tmp_path / f"run{frozen}", lora_target="q_proj,v_proj",
                            freeze_vision_tower=frozen)
        plan = plan_targets(model, profile, load_yaml(path).targets)
        paths = {t.path.removesuffix(".linear") for t in plan.targets}
        assert paths and all(p.endswith((".q_proj", ".v_proj")) for p in paths)
        assert any(".vision_tower." in p for p in paths) == (not frozen)  # LLaMA-Factory's freeze_vision_tower
        assert any(".language_model." in p for p in paths)


def test_cli_explain_config_shows_every_key(tmp_path):
    path, _ = localised("dpo", "m", tmp_path / "run")
    proc = subprocess.run([*CLI, "train", str(path), "--explain-config", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["dialect"] == "LLaMA-Factory" and shown["config"]["method"] == "dpo"
    assert {row["key"]: row["status"] for row in shown["mapping"]}["pref_loss"] == "mapped"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(EXAMPLES))
def test_examples_train_on_tiny_models(stage, tiny_models, tmp_path):
    """Changed: the model, the template, the paths; the run cut to 2 steps without sample answers."""
    from gemma4_tune.api import run_training

    path, raw = localised(stage, tiny_models["31b"], tmp_path / "run")
    result = run_training(load_yaml(path, {"max_steps": 2, "samples": 0}))
    record = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert result.adapter is not None and (result.adapter / "adapter_model.safetensors").is_file()
    assert record["batch_size"] * record["grad_accum"] == (
        raw["per_device_train_batch_size"] * raw["gradient_accumulation_steps"])
    assert (record["method"], record["rank"], record["lr"], record["lr_scheduler"]) == (
        stage, raw["lora_rank"], float(raw["learning_rate"]), raw["lr_scheduler_type"])
    assert record["max_seq_len"] == raw["cutoff_len"] and record["seed"] == 42


def test_data_flag_names_a_dataset_of_dataset_info(tmp_path):
    from gemma4_tune.config import build_config

    cfg = build_config({"model": "m", "data": [f"{DATA / 'dataset_info.json'}:mllm_demo", f"{DATA}:identity"]})
    mllm, identity = cfg.data
    assert (Path(mllm.path).name, mllm.format, mllm.columns) == (
        "mllm_demo.json", "sharegpt", {"messages": "messages", "images": "images"})
    assert (Path(identity.path).name, identity.format) == ("identity.json", "alpaca")
    with pytest.raises(FindingError, match="alpaca_en.hf_hub_url: gemma4-tune never downloads"):
        build_config({"model": "m", "data": f"{DATA}:alpaca_en"})


def test_pretraining_text_corpus_is_read_as_documents(tmp_path):
    """LLaMA-Factory's wiki_demo entry (a .txt file, columns {prompt: text}) trains stage pt: one document a line."""
    from gemma4_tune.data.records import load_datasets

    path, _ = localised("sft", "m", tmp_path / "run", stage="pt", dataset="wiki_demo", max_samples=4)
    cfg = load_yaml(path)
    assert cfg.method == "sft" and cfg.packing and cfg.data[0].format == "text"
    conversations, report = load_datasets(cfg.sources())
    lines = [line for line in (DATA / "wiki_demo.txt").read_text().splitlines() if line.strip()][:4]
    assert [c.text for c in conversations] == lines and report.text_rows == 4


def test_v1_dataset_yaml_is_read_with_its_converters(tmp_path, monkeypatch):
    """LLaMA-Factory v1's dataset YAML: paths from the directory you run in, alpaca rows joined as v1's converter
    joins them (instruction + input, no newline); its random `size` draw and hub sources are refused."""
    from gemma4_tune.config import build_config
    from gemma4_tune.data.records import load_datasets

    monkeypatch.chdir(LF)  # v1's paths (data/identity.json) start from LLaMA-Factory's root
    with pytest.raises(FindingError, match="alpaca_en_demo.size: draws rows at random with replacement"):
        build_config({"model": "m", "data": "data/v1_sft_demo.yaml"})
    with pytest.raises(FindingError, match="dpo_zh_demo.source: 'hf_hub': gemma4-tune never downloads"):
        build_config({"model": "m", "data": "data/v1_dpo_demo.yaml"})
    entries = yaml.safe_load((DATA / "v1_sft_demo.yaml").read_text())
    entries["alpaca_en_demo"].pop("size")
    (tmp_path / "v1.yaml").write_text(yaml.safe_dump(entries, sort_keys=False))
    cfg = build_config({"model": "m", "data": str(tmp_path / "v1.yaml")})
    assert [(Path(s.path).name, s.format) for s in cfg.data] == [
        ("identity.json", "alpaca-v1"), ("alpaca_en_demo.json", "alpaca-v1")]
    conversations, report = load_datasets(cfg.sources())
    rows = json.loads((DATA / "identity.json").read_text()) + json.loads((DATA / "alpaca_en_demo.json").read_text())
    assert report.kept == len(rows)
    with_input = next(i for i, row in enumerate(rows) if row["input"])
    user = conversations[with_input].messages[0]["content"][0]["text"]
    assert user == rows[with_input]["instruction"] + rows[with_input]["input"]


def test_video_and_audio_placeholders_in_one_message_are_filled_in_order(tmp_path):
    """mllm_video_audio_demo: `<video><audio>` in one string, each filled from its own column, in place."""
    from gemma4_tune.data.records import load_datasets

    cfg = load_yaml(localised("sft", "m", tmp_path / "run", dataset="mllm_video_audio_demo")[0])
    conversations, report = load_datasets(cfg.sources())
    rows = json.loads((DATA / "mllm_video_audio_demo.json").read_text())
    assert report.kept == len(rows) == len(conversations)
    for conv, row in zip(conversations, rows):
        parts = [p for m in conv.messages for p in m["content"]]
        kinds = [p["type"] for p in parts if p["type"] != "text"]
        assert kinds == ["video", "audio"]
        assert [Path(p["path"]).name for p in parts if p["type"] != "text"] == [
            Path(row["videos"][0]).name, Path(row["audios"][0]).name]


def test_v1_pair_rows_read_with_their_loss_weights(tmp_path):
    """v1_dpo_demo.jsonl: chosen_messages / rejected_messages share the prompt; loss_weight 0 on the prompt and 1 on
    the answers is what DPO trains, and a weight that says otherwise is an error naming the row and the field."""
    from gemma4_tune.data.preference import load_preference_data
    from gemma4_tune.data.records import DataSource

    items, _, findings = load_preference_data([DataSource(str(DATA / "v1_dpo_demo.jsonl"))])
    rows = [json.loads(line) for line in (DATA / "v1_dpo_demo.jsonl").read_text().splitlines()]
    assert len(items) == len(rows) and not [f for f in findings if f.code == "G4T305"]
    first = rows[0]["chosen_messages"]
    assert items[0].chosen[0]["content"][0]["text"] == first[-1]["content"][0]["value"]
    assert [m["role"] for m in items[0].prompt] == [m["role"] for m in first[:-1]]
    row = json.loads(json.dumps(rows[0]))
    row["chosen_messages"][-1]["loss_weight"] = 0.0  # the chosen answer said not to be trained
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(FindingError) as info:
        load_preference_data([DataSource(str(tmp_path / "bad.jsonl"))])
    assert info.value.findings[0].code == "G4T328"
    assert "chosen[0].loss_weight" in info.value.findings[0].message and "bad.jsonl:1" in info.value.findings[0].message
