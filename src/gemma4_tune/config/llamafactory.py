"""LLaMA-Factory run files, read with LLaMA-Factory's meaning of every key (docs/llamafactory.md has the table).

A file is LLaMA-Factory's when it has ``model_name_or_path`` with ``stage`` or ``finetuning_type`` (every example
under LLaMA-Factory's ``examples/train_lora`` has them). ``stage: sft | dpo | kto`` (and ``pt``) with
``finetuning_type: lora`` are trained; datasets are named through ``dataset_dir/dataset_info.json``
(``data.dataset_info``), each field read with LLaMA-Factory's meaning; ``max_samples`` takes the first rows of each
dataset, as LLaMA-Factory does. Keys LLaMA-Factory leaves out take its defaults (HF TrainingArguments' where
LLaMA-Factory has none: ``learning_rate`` 5e-5, ``num_train_epochs`` 3, ``per_device_train_batch_size`` 8, ...).
A key set to null is absent. Unknown keys are one error that lists them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma4_tune.config.reader import Reader, Translation, finite, show
from gemma4_tune.data import dataset_info

GEMMA4_TEMPLATES = ("gemma4", "gemma4n")
"""LLaMA-Factory's Gemma 4 templates (gemma4n: E2B, E4B and 12B, with audio)."""

_DIRECT = {"model_name_or_path": "model", "output_dir": "out", "lora_rank": "rank", "lora_alpha": "alpha",
           "lora_dropout": "lora_dropout", "per_device_train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "max_steps": "max_steps",
           "warmup_steps": "warmup_steps", "warmup_ratio": "warmup_ratio", "weight_decay": "weight_decay",
           "max_grad_norm": "max_grad_norm", "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
           "adam_epsilon": "adam_epsilon", "logging_steps": "logging_steps", "seed": "seed",
           "save_steps": "save_steps", "save_total_limit": "save_total_limit", "eval_steps": "eval_steps",
           "learning_rate": "lr", "cutoff_len": "max_seq_len", "pref_beta": "beta", "lr_scheduler_type":
           "lr_scheduler", "optim": "optimizer"}

#: LLaMA-Factory's (or HF TrainingArguments') value for a key the file leaves out, where ours differs.
_DEFAULTS = {"learning_rate": ("lr", 5e-5, "HF TrainingArguments' default"),
             "num_train_epochs": ("epochs", 3.0, "HF TrainingArguments' default"),
             "per_device_train_batch_size": ("batch_size", 8, "HF TrainingArguments' default"),
             "lr_scheduler_type": ("lr_scheduler", "linear", "HF TrainingArguments' default"),
             "optim": ("optimizer", "adamw_torch_fused", "HF TrainingArguments' default"),
             "logging_steps": ("logging_steps", 500, "HF TrainingArguments' default"),
             "save_steps": ("save_steps", 500, "HF TrainingArguments' default"),
             "seed": ("seed", 42, "HF TrainingArguments' default"),
             "lora_rank": ("rank", 8, "LLaMA-Factory's default"),
             "cutoff_len": ("max_seq_len", 2048, "LLaMA-Factory's default")}

_NO_EFFECT: dict[str, str] = {
    "do_train": "train always trains", "trust_remote_code": "Gemma 4's classes are in transformers",
    "preprocessing_num_workers": "rows are read and encoded in this process",
    "preprocessing_batch_size": "rows are read and encoded in this process",
    "dataloader_num_workers": "batches are built in the training process", "plot_loss": "the report plots the loss",
    "report_to": "metrics go to metrics.jsonl and the report", "overwrite_output_dir": "use a new --out, or --resume",
    "overwrite_cache": "rows are validated and encoded at the start of every run",
    "ddp_timeout": "use --distributed for several processes", "run_name": "the run is named by --out",
    "logging_dir": "metrics go to metrics.jsonl in --out", "flash_attn": "sdpa is used on every layer (catalog "
    "row 14)", "enable_liger_kernel": "Liger kernels are not used; the loss is computed exactly",
    "use_unsloth": "Unsloth is not used", "use_unsloth_gc": "Unsloth is not used",
    "bf16": "bf16 on CUDA, fp32 on CPU (never fp16, catalog row 19)",
    "per_device_eval_batch_size": "evaluation runs one batch size", "eval_strategy": "evaluation follows "
    "eval_steps (or 4 times a run) when there is held-out data", "include_num_input_tokens_seen": "the report "
    "counts tokens", "include_effective_tokens_per_second": "the report counts tokens",
    "compute_accuracy": "the report shows held-out loss", "print_param_status": "`plan` lists every target",
    "hf_hub_token": "nothing is downloaded or pushed", "ms_hub_token": "nothing is downloaded or pushed",
    "om_hub_token": "nothing is downloaded or pushed", "push_to_hub": "nothing is pushed to a hub",
    "low_cpu_mem_usage": "weights load shard by shard", "ddp_find_unused_parameters": "set automatically "
    "(`--distributed ddp`)", "upcast_layernorm": "norms run in the model's precision",
    "disable_tqdm": "progress is shown by gemma4-tune", "tokenized_path": "rows are encoded at the start of "
    "every run", "mix_strategy": "datasets are concatenated (LLaMA-Factory's default, concat)",
}
_REFUSE_IF_TRUE = {
    "use_dora": "DoRA adapters are not trained (engines serve plain LoRA)",
    "use_rslora": "rank-stabilised scaling is not used; set lora_alpha instead",
    "pissa_init": "PiSSA initialisation is not used", "pissa_convert": "PiSSA is not used",
    "use_galore": "GaLore trains full weights", "use_apollo": "APOLLO trains full weights",
    "use_badam": "BAdam trains full weights", "use_llama_pro": "LLaMA Pro expands the model",
    "mask_history": "only the last turn supervised is not read; mark earlier answers with loss_weight 0 or "
                    "weight 0 in the data", "streaming": "datasets are read whole (they are validated first)",
    "shift_attn": "S^2-Attn is not used", "resize_vocab": "the vocabulary of Gemma 4 is kept as it is",
    "train_from_scratch": "LoRA trains on pretrained weights", "use_adam_mini": "Adam-mini is not used",
    "use_muon": "Muon is not used", "fp16": "fp16 overflows Gemma 4's MLP into NaN (catalog row 19); remove it",
    "neat_packing": None,
}
_REFUSED = {
    "adapter_name_or_path": "training on top of an existing adapter is not supported; start from the base, or "
                            "merge the adapter first (`gemma4-tune export --merged`)",
    "resume_from_checkpoint": "use --resume with the same --out", "deepspeed": "use `--distributed zero2` or "
    "`zero3` (the DeepSpeed config is written for the model)", "eval_dataset": "give one held-out file as "
    "eval_data (--eval-data), or hold out a share with val_size", "additional_target": "full copies of modules "
    "(modules_to_save) are not trained; engines serve LoRA deltas only", "default_system": "the official template "
    "adds no system prompt; put the system message in the data", "ref_model": "the reference is the base model "
    "with the adapter disabled", "tool_format": "tools are rendered by the official Gemma 4 template",
    "new_special_tokens_config": "the vocabulary and special tokens of Gemma 4 are kept as they are",
    "add_tokens": "the vocabulary and special tokens of Gemma 4 are kept as they are",
    "add_special_tokens": "the vocabulary and special tokens of Gemma 4 are kept as they are",
    "rope_scaling": "Gemma 4's RoPE settings are kept", "interleave_probs": "datasets are concatenated",
}
_MEDIA = ("image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels", "video_fps",
          "video_maxlen", "image_do_pan_and_scan", "crop_to_patches", "use_audio_in_video", "audio_sampling_rate")
_KNOWN = frozenset({*_DIRECT, *_NO_EFFECT, *_REFUSE_IF_TRUE, *_REFUSED, *_MEDIA, "stage", "finetuning_type",
                    "lora_target", "template", "dataset", "dataset_dir", "media_dir", "max_samples", "val_size",
                    "train_on_prompt", "packing", "quantization_bit", "quantization_method", "quantization_type",
                    "double_quantization", "freeze_vision_tower", "freeze_multi_modal_projector",
                    "freeze_language_model", "pref_loss", "pref_ftx", "dpo_label_smoothing", "kto_chosen_weight",
                    "kto_rejected_weight", "enable_thinking", "save_only_model", "gradient_checkpointing",
                    "disable_gradient_checkpointing", "save_strategy", "do_eval", "do_predict",
                    "loraplus_lr_ratio", "create_new_adapter"})
_STAGES = {"sft": "sft", "dpo": "dpo", "kto": "kto", "pt": "sft"}
_STAGE_DATA = {"sft": "sft", "pt": "sft", "dpo": "ranking", "kto": "kto"}


def _names(value: Any) -> list[str] | None:
    """A comma-separated string or a list of names, as LLaMA-Factory splits ``dataset`` and ``lora_target``."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    return None


def _stage(given: dict[str, Any], t: Translation) -> str:
    stage = given.get("stage", "sft")
    if stage not in _STAGES:
        t.refuse("stage", stage, "gemma4-tune trains stage sft, dpo, kto or pt (rm, ppo and the others are not)")
        return "sft"
    if stage == "pt":
        t.differ("stage", stage, "method", "sft", "plain-text rows are trained on every token with the language-"
                 "model loss (SFT on text rows, an end-of-text token after each document, as LLaMA-Factory's pt)")
    else:
        t.map("stage", stage, "method", _STAGES[stage], {"sft": "", "dpo": "TRL's DPOTrainer; the reference is the "
              "base with the adapter disabled, as LLaMA-Factory without ref_model", "kto": "TRL's KTOTrainer; the "
              "reference is the base with the adapter disabled"}[stage])
    finetuning = given.get("finetuning_type", "lora")
    if finetuning != "lora":
        t.refuse("finetuning_type", finetuning, "gemma4-tune trains LoRA adapters (finetuning_type: lora)")
    else:
        t.row("finetuning_type", finetuning, "mapped" if "finetuning_type" in given else "default",
              "LoRA through PEFT (LLaMA-Factory's default)")
    return stage


def _targets(given: dict[str, Any], t: Translation) -> None:
    """``lora_target`` with the freeze_* keys: LLaMA-Factory's selection as our target groups or a pattern."""
    towers = given.get("freeze_vision_tower", True) is False
    if given.get("freeze_multi_modal_projector", True) is False:
        t.refuse("freeze_multi_modal_projector", False, "LoRA on the multimodal embedders is not trained with "
                 "`all`: engines cannot serve it (catalog rows 3, 37); use --targets vision-embed explicitly")
    if given.get("freeze_language_model"):
        t.refuse("freeze_language_model", True, "to train only the towers, use targets vision,audio in a "
                 "gemma4-tune run file")
    for key in ("freeze_vision_tower", "freeze_multi_modal_projector"):
        if key in given and given[key] is not False:
            t.row(key, given[key], "mapped", "the towers and embedders stay frozen (LLaMA-Factory's default)")
    raw = given.get("lora_target", "all")
    names = _names(raw)
    if not names:
        t.refuse("lora_target", raw, "expected `all` or comma-separated module names (q_proj,v_proj)")
        return
    if names == ["all"]:
        how = ("every nn.Linear outside the towers and embedders (on E2B/E4B also the per-layer-input gates and "
               "projections, on the 26B-A4B not the MoE experts, which are not nn.Linear)")
        if towers:
            t.differ("lora_target", raw, "targets", "all", f"LLaMA-Factory's `all` with freeze_vision_tower: false "
                     f"is {how} plus the towers; here: every text attention and MLP projection, the MoE experts "
                     "and the towers present (inner .linear, clamps kept)")
        else:
            t.differ("lora_target", raw, "targets", "text", f"LLaMA-Factory's `all` is {how}; here `text`: every "
                     "text attention and MLP projection and the MoE experts (catalog row 16)")
        return
    frozen = "" if towers else "(?!.*(?:vision_tower|audio_tower|embed_vision|embed_audio))"
    pattern = f"re:^{frozen}.*(?:{'|'.join(re.escape(n) for n in names)})$"
    t.map("lora_target", raw, "targets", pattern, "every module whose path ends with one of these names"
          + ("" if towers else ", outside the towers and embedders (freeze_vision_tower)")
          + "; tower projections through their inner .linear")


def _quantization(given: dict[str, Any], t: Translation) -> None:
    bits = given.get("quantization_bit")
    if bits is None:
        for key in ("quantization_method", "quantization_type", "double_quantization"):
            if key in given:
                t.ignore(key, given[key], "no effect without quantization_bit (as in LLaMA-Factory)")
        return
    if bits != 4:
        t.refuse("quantization_bit", bits, "only 4-bit base weights (QLoRA) are trained; use 4 or remove it")
        return
    t.map("quantization_bit", bits, "quantize", "4bit", "QLoRA through bitsandbytes, on CUDA or the CPU")
    method = given.get("quantization_method", "bnb")
    if method != "bnb":
        t.refuse("quantization_method", method, "only bitsandbytes (bnb) quantizes on the fly here")
    kind = given.get("quantization_type", "nf4")
    if kind not in ("nf4", "fp4"):
        t.refuse("quantization_type", kind, "nf4 or fp4")
    else:
        t.map("quantization_type", kind, "quant_type", kind)
    double = given.get("double_quantization", True)
    t.map("double_quantization", double, "double_quant", bool(double), "LLaMA-Factory's default is true"
          if "double_quantization" not in given else "")
    t.values["quantize_experts"] = False
    t.row("quantize_experts", None, "default", "quantize_experts = False (LLaMA-Factory quantizes nn.Linear "
          "layers only: the 26B-A4B's experts stay in 16 bits)")


def _preference(given: dict[str, Any], stage: str, t: Translation) -> None:
    for key, default, why in (("pref_loss", "sigmoid", "only the sigmoid (DPO) loss is trained"),
                              ("pref_ftx", 0, "an SFT term beside DPO is not trained"),
                              ("dpo_label_smoothing", 0, "label smoothing (cDPO) is not used"),
                              ("kto_chosen_weight", 1, "KTO's desirable weight is 1 here"),
                              ("kto_rejected_weight", 1, "KTO's undesirable weight is 1 here")):
        if key not in given:
            continue
        if given[key] != default or finite(given[key]) is None and key != "pref_loss":
            t.refuse(key, given[key], why)
        else:
            t.row(key, given[key], "mapped", f"{show(default)} (what is trained)")
    if "pref_beta" in given and stage not in ("dpo", "kto"):
        t.ignore("pref_beta", given["pref_beta"], "no effect without stage dpo or kto (as in LLaMA-Factory)")


def _datasets(given: dict[str, Any], stage: str, t: Translation) -> None:
    names = _names(given.get("dataset"))
    if not names:
        t.refuse("dataset", given.get("dataset"), "name one or more datasets of dataset_info.json (dataset: a,b)")
        return
    dataset_dir = Path(str(given.get("dataset_dir", "data"))).expanduser()
    t.row("dataset_dir", given.get("dataset_dir"), "mapped" if "dataset_dir" in given else "default",
          f"datasets are looked up in {dataset_dir / dataset_info.FILE_NAME} (relative to the directory you run in, "
          "as in LLaMA-Factory)")
    try:
        info = dataset_info.read_info(dataset_dir / dataset_info.FILE_NAME)
    except ValueError as exc:
        t.refuse("dataset_dir", str(dataset_dir), str(exc))
        return
    media_dir = given.get("media_dir")
    limit = given.get("max_samples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        t.refuse("max_samples", limit, "a whole number >= 1")
        limit = None
    specs = []
    for name in names:
        entry = dataset_info.resolve(info, name, dataset_dir)
        for key, value, status, why in entry.rows:
            if status == "refused":
                t.refuse(f"dataset_info[{key}]", value, why)
            else:
                t.row(f"dataset_info[{key}]", value, status, why)
        if entry.refused:
            continue
        if _STAGE_DATA[stage] != entry.kind:
            t.refuse(f"dataset[{name}]", name, f"a {entry.kind} dataset cannot train stage {stage} (LLaMA-Factory "
                     "refuses it too): " + {"ranking": "pairs (ranking: true) are DPO data",
                                            "kto": "rows with a kto_tag are KTO data",
                                            "sft": "stage dpo needs ranking: true, kto a kto_tag column"}[entry.kind])
            continue
        spec = dict(entry.spec)
        if limit is not None:
            spec["split"] = f"{spec.get('split', 'train')}[:{limit}]"
        if media_dir is not None and Path(str(media_dir)).expanduser().resolve() != Path(spec["path"]).parent:
            t.refuse("media_dir", media_dir, "media paths are resolved against the data file's folder; move the "
                     "media or make its paths relative to the data file")
        specs.append(spec)
    if limit is not None:
        t.map("max_samples", limit, "data", f"the first {limit} rows of each dataset", "as LLaMA-Factory's "
              "dataset.select(range(max_samples))")
    t.map("dataset", given["dataset"], "data", specs, f"{len(specs)} dataset(s) of dataset_info.json, concatenated")


def _translate(data: dict[str, Any], source: str) -> Translation:
    t = Translation(source, "LLaMA-Factory", "docs/llamafactory.md")
    given = {k: v for k, v in data.items() if v is not None}
    for key in sorted(set(data) - set(given)):
        t.row(key, None, "absent", "null, so absent (as in LLaMA-Factory)")
    t.unknown = sorted(k for k in given if k not in _KNOWN)
    stage = _stage(given, t)
    for key, value in given.items():
        kto_batch = key == "per_device_train_batch_size" and stage == "kto" and value == 1  # read below
        if key in _DIRECT and key not in ("pref_beta", "cutoff_len") and not kto_batch:
            t.map(key, value, _DIRECT[key], value)
        elif key in _NO_EFFECT:
            t.ignore(key, value, _NO_EFFECT[key])
        elif key in _REFUSED:
            t.refuse(key, value, _REFUSED[key])
        elif key in _REFUSE_IF_TRUE and value:
            if key == "neat_packing":
                t.differ(key, value, "packing", True, "packing without attention across examples, which is how "
                         "gemma4-tune packs")
            else:
                t.refuse(key, value, _REFUSE_IF_TRUE[key] or "")
        elif key in _REFUSE_IF_TRUE:
            t.row(key, value, "mapped", "false: nothing to do")
    if "pref_beta" in given and stage in ("dpo", "kto"):
        t.map("pref_beta", given["pref_beta"], "beta", given["pref_beta"])
    if "cutoff_len" in given:
        t.differ("cutoff_len", given["cutoff_len"], "max_seq_len", given["cutoff_len"], "longer examples are cut at "
                 "the end (media blocks kept whole) and counted in the report, where LLaMA-Factory shortens the "
                 "prompt and the answer in proportion")
    template = given.get("template")
    if template is None:
        t.refuse("template", None, "name LLaMA-Factory's Gemma 4 template (template: gemma4, or gemma4n for E2B, "
                 "E4B and 12B)")
    elif template not in GEMMA4_TEMPLATES:
        t.refuse("template", template, f"only a Gemma 4 template ({', '.join(GEMMA4_TEMPLATES)}) trains Gemma 4; "
                 "it is rendered with the model's official chat template")
    else:
        t.differ("template", template, None, None, "rendered with the model's official Gemma 4 chat template, "
                 "exactly as served: LLaMA-Factory's own gemma4 template adds a default system prompt (\"You are a "
                 "helpful assistant.\") and <|think|> to every conversation, the official one only what the data has")
    if "enable_thinking" in given:
        t.differ("enable_thinking", given["enable_thinking"], None, None, "reasoning is trained where the data "
                 "has it (reasoning_content), rendered by the official template's thought channel")
    _targets(given, t)
    _quantization(given, t)
    _preference(given, stage, t)
    if given.get("train_on_prompt"):
        t.differ("train_on_prompt", True, "train_on", "all", "every token but media is supervised, turn headers "
                 "included")
    elif "train_on_prompt" in given:
        t.map("train_on_prompt", False, "train_on", "assistant")
    if "packing" in given:
        t.map("packing", given["packing"], "packing", bool(given["packing"]))
    elif stage == "pt":
        t.default("packing", "packing", True, "LLaMA-Factory packs pt data by default")
    if "val_size" in given:
        size = finite(given["val_size"])
        if size is None or size < 0:
            t.refuse("val_size", given["val_size"], "expected a share below 1 (0.1) or a count of rows (200)")
        else:
            share = int(size) if size > 1 else size
            t.differ("val_size", given["val_size"], "eval_split", share, "held out by a seeded split that keeps "
                     "identical conversations on one side")
    if given.get("disable_gradient_checkpointing"):
        t.map("disable_gradient_checkpointing", True, "gradient_checkpointing", False)
    elif "gradient_checkpointing" in given:
        t.map("gradient_checkpointing", given["gradient_checkpointing"], "gradient_checkpointing",
              bool(given["gradient_checkpointing"]))
    else:
        t.default("gradient_checkpointing", "gradient_checkpointing", True, "LLaMA-Factory checkpoints unless "
                  "disable_gradient_checkpointing")
    for key in ("save_only_model", "save_strategy", "do_eval", "do_predict", "loraplus_lr_ratio",
                "create_new_adapter"):
        if key not in given:
            continue
        value = given[key]
        if key == "save_only_model" and value:
            t.differ(key, value, None, None, "checkpoints keep the optimizer state anyway, so that --resume continues "
                     "exactly")
        elif key == "save_only_model":
            t.row(key, value, "mapped", "checkpoints hold the optimizer and scheduler state (resumable)")
        elif key == "save_strategy" and value != "steps":
            t.refuse(key, value, "checkpoints are saved every save_steps steps")
        elif key in ("do_eval", "do_predict", "loraplus_lr_ratio", "create_new_adapter") and value:
            t.refuse(key, value, {"do_eval": "evaluation runs during training when there is held-out data (val_size)",
                                  "do_predict": "use `gemma4-tune compare` or the report's samples",
                                  "loraplus_lr_ratio": "LoRA+ learning rates are not used",
                                  "create_new_adapter": "training on top of an adapter is not supported"}[key])
        else:
            t.row(key, value, "mapped", "nothing to do")
    for key in _MEDIA:
        if key in given:
            t.differ(key, given[key], None, None, "images, video frames and audio go to Gemma 4's processor as "
                     "they are (its own resizing to the soft-token budget, its own frame sampling); LLaMA-Factory "
                     "would resize or resample them first")
    if stage == "kto" and given.get("per_device_train_batch_size", 8) == 1:
        accum = given.get("gradient_accumulation_steps", 1)
        accum = accum if isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1 else 1
        t.differ("per_device_train_batch_size", 1, "batch_size", 2, f"TRL's KTO estimates its KL term on each row's "
                 f"prompt with another row's answer of the same batch, so it needs 2 rows (LLaMA-Factory builds "
                 f"those mismatched pairs in preprocessing); grad_accum {max(1, accum // 2)} keeps the effective "
                 f"batch at {2 * max(1, accum // 2)} (it was {accum})")
        t.values["grad_accum"] = max(1, accum // 2)
    if stage in ("dpo", "kto") and given.get("packing"):
        t.refuse("packing", True, f"stage {stage} trains its pairs unpacked")
    _datasets(given, stage, t)
    for key, (field_name, value, note) in _DEFAULTS.items():
        if key not in given:
            t.default(key, field_name, value, note)
    if "lora_alpha" not in given:
        t.row("lora_alpha", None, "default", "alpha = 2 x rank (LLaMA-Factory's default, ours too)")
    return t


class LlamaFactoryReader(Reader):
    """LLaMA-Factory's run files: ``model_name_or_path`` with ``stage`` or ``finetuning_type``."""

    dialect = "LLaMA-Factory"
    aliases = {k: v for k, v in _DIRECT.items() if k not in ("model_name_or_path", "output_dir")}
    known = _KNOWN

    def claims(self, data: Mapping[str, Any]) -> bool:
        return "model_name_or_path" in data and ("stage" in data or "finetuning_type" in data)

    def translate(self, data: dict[str, Any], *, source: str) -> Translation:
        return _translate(data, source)


READER = LlamaFactoryReader()
