"""Axolotl run files, read with Axolotl's meaning of every key (docs/axolotl.md has the table).

Each key is one of:

- **mapped**: set on the RunConfig with the value Axolotl gives it (``lora_target_modules`` a full-path regex
  or a list of name suffixes, ``val_set_size`` a share or a count, ``datasets[]`` with ``split``,
  ``field_messages``, ``message_property_mappings``, ``roles_to_train``...); a key Axolotl leaves out takes
  Axolotl's default (``lr_scheduler: cosine``, ``sequence_len: 512``, ``seed: 42``...);
- **no effect** here (logging, hub, plugins, kernels, ``strict``): accepted, and reported once, in one finding;
- **refused** where it contradicts what gemma4-tune guarantees (``fp16``, full fine-tuning, another chat
  template), with the reason.

A key set to null is absent, as in Axolotl. Unknown keys are one error that lists them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gemma4_tune.config.options import RunConfig
from gemma4_tune.config.reader import Reader, Translation, finite, show, strings

MARKERS = frozenset({"base_model", "datasets", "adapter", "micro_batch_size", "sequence_len", "lora_r",
                     "gradient_accumulation_steps", "num_epochs", "output_dir", "learning_rate"})
"""Keys that only Axolotl files have (``base_model``, which Axolotl requires, makes a file Axolotl's)."""

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
MAPPED_OPTIMIZERS = frozenset({
    "adamw_torch", "adamw_torch_fused", "adafactor", "adamw_torch_4bit", "adamw_torch_8bit", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit", "rmsprop",
    "ademamix", "adamw_anyprecision", "schedule_free_adamw", "stable_adamw",
})
SCHEDULERS = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                        "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"})

_NO_EFFECT: dict[str, str] = {
    "strict": "command-line overrides are always allowed",
    "plugins": "Axolotl plugins (Liger, Cut Cross Entropy, kernels) are not used; the loss is computed exactly",
    "use_kernels": "speed kernel", "use_scattermoe": "speed kernel", "experts_implementation": "speed kernel",
    "torch_compile": "speed setting", "lora_mlp_kernel": "speed kernel", "lora_qkv_kernel": "speed kernel",
    "lora_o_kernel": "speed kernel", "fused_attn_kernel": "speed kernel", "dsv4_fp4_grouped_mode": "speed kernel",
    "moe_bnb_fast": "speed kernel", "moe_dequant_chunk_size": "speed kernel", "cut_cross_entropy": "speed kernel",
    "activation_offloading": "memory setting not used here",
    "tf32": "matmul precision is PyTorch's default",
    "processor_type": "the model's AutoProcessor is always used",
    "skip_prepare_dataset": "rows are validated and encoded at the start of every run",
    "dataset_prepared_path": "rows are validated and encoded at the start of every run",
    "remove_unused_columns": "every processor output is kept",
    "pad_to_sequence_len": "batches are padded to their longest example",
    "shuffle_merged_datasets": "the Trainer shuffles the training rows every epoch",
    "shuffle_before_merging_datasets": "the Trainer shuffles the training rows every epoch",
    "ddp_find_unused_parameters": "set automatically when towers train (`--distributed ddp`)",
    "freeze_mm_modules": "towers are frozen unless --targets names them",
    "attn_implementation": "sdpa is used on every layer (FlashAttention-2 fails on the head_dim-512 global layers, "
                           "catalog row 14)",
    "gemma4_hybrid_attn_impl": "sdpa is used on every layer",
    "flash_attention": "sdpa is used on every layer", "sdp_attention": "sdpa is used on every layer",
    "flex_attention": "sdpa is used on every layer",
    "fsdp_config": "use `--distributed fsdp2 --nproc N` (wrap classes come from the model)",
    "fsdp_version": "use `--distributed fsdp2 --nproc N`", "fsdp": "use `--distributed fsdp2 --nproc N`",
    "deepspeed": "use `--distributed zero2` or `zero3` (the DeepSpeed config is written for the model)",
    "gradient_checkpointing_kwargs": "checkpointing is always non-reentrant",
    "bf16": "bf16 on CUDA, fp32 on CPU (never fp16, catalog row 19)",
    "use_wandb": "metrics go to metrics.jsonl and the report",
    "auto_resume_from_checkpoints": "use --resume",
}
_NO_EFFECT_PREFIXES = {"liger_": "Liger kernels are not used", "wandb_": "metrics go to metrics.jsonl and the report",
                       "hub_": "nothing is pushed to a hub", "mlflow_": "metrics go to metrics.jsonl and the report"}

_DIRECT = {"base_model": "model", "output_dir": "out", "lora_r": "rank", "lora_alpha": "alpha",
           "lora_dropout": "lora_dropout", "micro_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs", "max_steps": "max_steps",
           "sample_packing": "packing", "warmup_steps": "warmup_steps", "warmup_ratio": "warmup_ratio",
           "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "adam_beta1": "adam_beta1",
           "adam_beta2": "adam_beta2", "adam_epsilon": "adam_epsilon", "logging_steps": "logging_steps",
           "seed": "seed", "save_steps": "save_steps", "eval_steps": "eval_steps",
           "evals_per_epoch": "evals_per_epoch", "saves_per_epoch": "saves_per_epoch",
           "gradient_checkpointing": "gradient_checkpointing"}

_DEFAULTS = {"lr_scheduler": ("lr_scheduler", "cosine"), "optimizer": ("optimizer", "adamw_torch_fused"),
             "seed": ("seed", 42), "sequence_len": ("max_seq_len", 512)}
"""Axolotl's defaults for keys a file leaves out, where ours differ: (our field, Axolotl's value)."""

_DATASET_TYPES = {"chat_template": None, "sharegpt": "sharegpt", "alpaca": "alpaca", "completion": "text"}
_DATASET_KEYS = frozenset({"path", "type", "split", "field_messages", "message_property_mappings",
                           "message_field_role", "message_field_content", "roles", "roles_to_train", "train_on_eos",
                           "message_field_training", "ds_type", "field", "chat_template"})
_KNOWN = (MARKERS | set(_NO_EFFECT) | set(_DIRECT) | set(_DEFAULTS)
          | {"load_in_4bit", "bnb_config_kwargs", "quantize_moe_experts", "load_in_8bit", "lora_target_modules", "lora_target_linear",
             "lora_target_parameters",
             "lora_modules_to_save", "optim_args", "train_on_inputs", "fp16", "val_set_size", "chat_template",
             "chat_template_jinja", "eot_tokens", "special_tokens", "tokens", "resume_from_checkpoint",
             "image_size", "image_resize_algorithm", "rl", "rl_beta", "dpo_beta", "test_datasets", "trl",
             "kto_desirable_weight", "kto_undesirable_weight"})




#: Axolotl's ``trl:`` keys for GRPO with the same meaning here -> our field.
_TRL_GRPO = {"beta": "beta", "num_generations": "num_generations", "max_completion_length": "max_completion_length",
             "temperature": "temperature", "loss_type": "loss_type", "reward_weights": "reward_weights"}
#: ``trl:`` keys that change nothing here, with why.
_TRL_NO_EFFECT = {"use_vllm": "generation runs in transformers on the CPU; with CUDA and vLLM installed TRL's colocated "
                              "vLLM is used (docs/grpo.md)",
                  "vllm_mode": "no vLLM server is used (colocated where vLLM runs)",
                  "vllm_server_host": "no vLLM server is used", "vllm_server_port": "no vLLM server is used",
                  "vllm_server_timeout": "no vLLM server is used", "log_completions": "the report keeps samples"}


def _trl_section(section: Any, grpo: bool, t: Translation) -> None:
    """Axolotl's ``trl:`` block: GRPO's settings and reward functions (``module.function`` as Axolotl imports
    them, read here as ``module:function``), key by key."""
    if not grpo or not isinstance(section, dict):
        t.refuse("trl", section, "trl: settings mean something here only with rl: grpo")
        return
    for key, value in section.items():
        where = f"trl.{key}"
        if key == "reward_funcs":
            funcs = value if isinstance(value, list) else [value]
            if not strings(funcs) or not all("." in f for f in funcs):
                t.refuse(where, value, "expected a list of module.function names (Axolotl's form)")
                continue
            ours = [":".join(f.rsplit(".", 1)) for f in funcs]
            t.map(where, value, "rewards", ours, "Axolotl's module.function imported as module:function, from "
                                                 "the directory you run in")
        elif key in _TRL_GRPO:
            t.map(where, value, _TRL_GRPO[key], value)
        elif key in _TRL_NO_EFFECT:
            t.ignore(where, value, _TRL_NO_EFFECT[key])
        else:
            t.refuse(where, value, "not a GRPO setting gemma4-tune reads (docs/grpo.md lists them)")


#: Axolotl's ``bnb_config_kwargs`` keys (BitsAndBytesConfig's names) -> the RunConfig field and the values it takes.
_BNB_KEYS = {"bnb_4bit_quant_type": ("quant_type", ("nf4", "fp4")),
             "bnb_4bit_use_double_quant": ("double_quant", (True, False)),
             "bnb_4bit_compute_dtype": ("compute_dtype", ("float32", "bfloat16"))}


def _bnb_settings(kwargs: Any, four_bit: bool, t: Translation) -> None:
    """``bnb_config_kwargs``: each key read with its BitsAndBytesConfig meaning, or refused with the reason."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        t.refuse("bnb_config_kwargs", kwargs, "expected a mapping of BitsAndBytesConfig keywords")
        return
    for key, value in kwargs.items():
        where = f"bnb_config_kwargs[{key}]"
        field_name, allowed = _BNB_KEYS.get(key, (None, ()))
        if not four_bit:
            t.refuse(where, value, "bitsandbytes settings need load_in_4bit: true")
        elif field_name is None:
            t.refuse(where, value, f"not a 4-bit setting gemma4-tune applies (it reads {', '.join(_BNB_KEYS)})")
        elif value not in allowed:
            t.refuse(where, value, f"{key} must be one of {', '.join(map(str, allowed))} here")
        else:
            t.map(where, value, field_name, value)


def _targets(data: dict[str, Any], t: Translation) -> None:
    items: list[str] = []
    modules = data.get("lora_target_modules")
    if isinstance(modules, str):
        items.append(f"re:{modules}")
        t.row("lora_target_modules", modules, "mapped", f"targets re:{show(modules)} (a regex on the full module "
              "path, as PEFT matches a string; a Gemma4ClippableLinear match trains its inner .linear)")
    elif isinstance(modules, list) and modules:
        names = "|".join(re.escape(str(m)) for m in modules)
        items.append(f"re:(?:.*\\.)?(?:{names})")
        t.row("lora_target_modules", modules, "mapped", "targets: every module whose name is or ends with one of "
              "these names, as PEFT matches a list (tower projections through their inner .linear)")
    elif modules is not None:
        t.refuse("lora_target_modules", modules, "expected a regex string or a list of module names")
    if data.get("lora_target_linear"):
        items.append("all")
        t.differ("lora_target_linear", True, None, None, "every text projection, the MoE experts and the towers "
                 "present (inner .linear, clamps kept); the multimodal embedders are left out, since engines "
                 "cannot serve LoRA on them (catalog rows 3, 37)")
    parameters = data.get("lora_target_parameters")
    if parameters is not None:
        given = [parameters] if isinstance(parameters, str) else parameters if isinstance(parameters, list) else []
        if strings(given) and sorted(given) == sorted(EXPERTS):
            items.append("text-experts")
            t.row("lora_target_parameters", parameters, "mapped", "targets text-experts (PEFT target_parameters "
                  "on every MoE layer's experts.gate_up_proj and experts.down_proj)")
        else:
            t.refuse("lora_target_parameters", parameters, f"only the MoE experts ({', '.join(EXPERTS)}, both) can "
                     "carry parameter LoRA on Gemma 4")
    if items:
        t.values["targets"] = ",".join(items)
    else:
        t.values["targets"] = "text"
        t.row("lora_target_modules", None, "default", "targets text (absent: PEFT has no Gemma 4 default, so "
              "gemma4-tune's own default applies: every text attention and MLP projection and the MoE experts)")


def _dataset(entry: Any, where: str, t: Translation, preference: bool = False) -> dict[str, Any] | None:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        t.refuse(where, entry, "each dataset needs a `path`")
        return None
    entry = {k: v for k, v in entry.items() if v is not None}
    spec: dict[str, Any] = {"path": entry["path"]}
    for key in sorted(set(entry) - _DATASET_KEYS):
        t.refuse(f"{where}.{key}", entry[key], "not read here (see docs/axolotl.md for the dataset keys)")
    kind = entry.get("type", "chat_template")
    if kind == "chat_template.default" and preference:
        spec["format"] = None  # Axolotl's DPO rows (messages + chosen + rejected): data.preference reads them
    elif not isinstance(kind, str) or kind not in _DATASET_TYPES:
        t.refuse(f"{where}.type", kind, f"dataset type {kind!r} is not read here; use chat_template, alpaca, "
                 "completion or sharegpt (docs/formats.md)")
    else:
        spec["format"] = _DATASET_TYPES[kind]
        if kind == "alpaca":
            t.differ(f"{where}.type", kind, None, None, "Alpaca rows are rendered with the Gemma 4 chat template "
                     "(user: instruction, newline, input; model: output), not Axolotl's Alpaca prompt text")
        if kind == "completion" and entry.get("field", "text") != "text":
            t.refuse(f"{where}.field", entry["field"], "a completion dataset is read from its `text` column")
    if "split" in entry:
        spec["split"] = str(entry["split"])
    if "field_messages" in entry:
        spec["field_messages"] = entry["field_messages"]
    mappings = entry.get("message_property_mappings") or {}
    if not isinstance(mappings, dict):
        t.refuse(f"{where}.message_property_mappings", mappings, "expected a mapping such as {role: from, content: "
                 "value}")
        mappings = {}
    mappings = dict(mappings)
    for legacy, ours in (("message_field_role", "role"), ("message_field_content", "content")):
        if legacy in entry:
            mappings.setdefault(ours, entry[legacy])
    unknown = sorted(set(mappings) - {"role", "content"})
    if unknown:
        t.refuse(f"{where}.message_property_mappings", mappings, f"only role and content can be mapped, not "
                 f"{', '.join(unknown)}")
    spec["message_property_mappings"] = {k: v for k, v in mappings.items() if k in ("role", "content")}
    roles = entry.get("roles")
    if roles is not None:
        listed = {ours: [names] if isinstance(names, str) else names for ours, names in roles.items()} \
            if isinstance(roles, dict) else {}
        if isinstance(roles, dict) and all(strings(names) for names in listed.values()):
            spec["roles"] = listed
        else:
            t.refuse(f"{where}.roles", roles, "expected a mapping of role to its names, e.g. {user: [human]}")
    if "roles_to_train" in entry:
        if strings(entry["roles_to_train"]):
            spec["roles_to_train"] = list(entry["roles_to_train"])
        else:
            t.refuse(f"{where}.roles_to_train", entry["roles_to_train"], "expected a list of roles, e.g. [assistant]")
    if "message_field_training" in entry:
        spec["message_field_training"] = entry["message_field_training"]
    eos = entry.get("train_on_eos", "turn")
    if eos != "turn":
        t.refuse(f"{where}.train_on_eos", eos, "gemma4-tune supervises the <turn|> that closes each supervised turn "
                 "(train_on_eos: turn); `all` and `last` are not read")
    if "chat_template" in entry:
        _chat_template(entry["chat_template"], f"{where}.chat_template", t)
    if "ds_type" in entry:
        t.row(f"{where}.ds_type", entry["ds_type"], "mapped", "the file type comes from the file's suffix")
    t.row(where, entry, "mapped", f"data: {show(spec)}")
    return spec


def _chat_template(value: Any, key: str, t: Translation) -> None:
    if value in ("gemma4", "tokenizer_default") or str(value).startswith("tokenizer_default_fallback_"):
        t.row(key, value, "mapped", "the model's official Gemma 4 template (its revision detected from the "
              "checkpoint), with generation markers for exact assistant labels")
    else:
        t.refuse(key, value, "only the official Gemma 4 template is used (labels and serving must agree, catalog "
                 "rows 12, 34); use chat_template: gemma4 or tokenizer_default")


def _translate(data: dict[str, Any], source: str) -> Translation:
    """An Axolotl file as RunConfig values, key by key."""
    t = Translation(source, "Axolotl", "docs/axolotl.md")
    given = {k: v for k, v in data.items() if v is not None}
    for key in sorted(set(data) - set(given)):
        t.row(key, None, "absent", "null, so absent (as in Axolotl)")
    own = {k for k in given if k in RunConfig.model_fields and k not in _KNOWN}
    unknown = sorted(k for k in given if k not in _KNOWN and k not in own
                     and not k.startswith(tuple(_NO_EFFECT_PREFIXES)))
    for key, value in given.items():
        if key in own:
            t.values[key] = value
            t.row(key, value, "mapped", f"{key} = {show(value)} (a gemma4-tune key)")
        elif key in _DIRECT:
            t.map(key, value, _DIRECT[key], value)
        elif key in _NO_EFFECT or key.startswith(tuple(_NO_EFFECT_PREFIXES)):
            reason = _NO_EFFECT.get(key) or next(r for p, r in _NO_EFFECT_PREFIXES.items() if key.startswith(p))
            t.ignore(key, value, reason)
    if "learning_rate" in given:  # as given: RunConfig reads YAML's unquoted 1e-4 (a string) and refuses non-numbers
        t.map("learning_rate", given["learning_rate"], "lr", given["learning_rate"])
    sequence_len = given.get("sequence_len")
    if sequence_len is not None:
        t.differ("sequence_len", sequence_len, "max_seq_len", sequence_len, "longer examples are truncated (media "
                 "blocks kept whole) and counted in the report, where Axolotl drops them")
    _targets(given, t)
    adapter = given.get("adapter")
    if adapter not in ("lora", "qlora"):
        t.refuse("adapter", adapter, "gemma4-tune trains LoRA adapters; without `adapter: lora` (or qlora) Axolotl "
                 "would fine-tune every weight" if adapter is None else f"adapter {adapter!r} is not LoRA")
    else:
        t.row("adapter", adapter, "mapped", "LoRA through PEFT" + (" on 4-bit base weights" if adapter == "qlora"
                                                                     else ""))
    if adapter == "qlora" and not given.get("load_in_4bit"):
        t.refuse("adapter", adapter, "adapter: qlora needs load_in_4bit: true (as in Axolotl)")
    if given.get("load_in_4bit"):
        t.map("load_in_4bit", True, "quantize", "4bit", "QLoRA through bitsandbytes, on CUDA or the CPU; NF4 with "
              "double quantization unless bnb_config_kwargs says otherwise, as in Axolotl")
    _bnb_settings(given.get("bnb_config_kwargs"), bool(given.get("load_in_4bit")), t)
    experts = given.get("quantize_moe_experts")
    if experts and not given.get("load_in_4bit"):
        t.refuse("quantize_moe_experts", experts, "quantize_moe_experts needs load_in_4bit: true (as in Axolotl)")
    elif given.get("load_in_4bit"):  # Axolotl leaves the experts in bf16 unless the file asks
        t.values["quantize_experts"] = bool(experts)
        t.row("quantize_moe_experts", experts, "mapped" if "quantize_moe_experts" in given else "default",
              f"quantize_experts = {bool(experts)}" + (" (bitsandbytes' 4-bit parametrization, as Axolotl)" if experts
                                                       else " (Axolotl's default: the MoE experts stay in bf16)"))
    if given.get("load_in_8bit"):
        t.refuse("load_in_8bit", True, "8-bit base weights are not supported; use load_in_4bit (QLoRA) or neither")
    if given.get("lora_modules_to_save"):
        t.refuse("lora_modules_to_save", given["lora_modules_to_save"], "full copies of embeddings or lm_head are "
                 "not trained (engines serve LoRA deltas only)")
    if given.get("fp16"):
        t.refuse("fp16", True, "fp16 overflows Gemma 4's MLP into NaN (catalog row 19); remove it (bf16 on CUDA)")
    if given.get("rl") == "dpo":
        t.map("rl", "dpo", "method", "dpo", "TRL's DPOTrainer; the reference is the base with the adapter disabled")
    elif given.get("rl") == "grpo":
        t.map("rl", "grpo", "method", "grpo", "TRL's GRPOTrainer with gemma4-tune's rendering; the reference is the "
                                               "base with the adapter disabled")
    elif given.get("rl") == "kto":
        t.map("rl", "kto", "method", "kto", "TRL's KTOTrainer; the reference is the base with the adapter disabled")
    elif given.get("rl"):
        t.refuse("rl", given["rl"], "only rl: dpo, kto and grpo are trained here (ORPO, IPO and SimPO are not)")
    for key in ("kto_desirable_weight", "kto_undesirable_weight"):
        if key in given:
            if given.get("rl") == "kto" and finite(given[key]) == 1.0:
                t.row(key, given[key], "mapped", "1.0 (what is trained)")
            else:
                t.refuse(key, given[key], "KTO's desirable and undesirable weights are 1 here (with rl: kto)")
    for key in ("rl_beta", "dpo_beta"):
        if key in given:
            if given.get("rl") in ("dpo", "kto", "grpo"):
                t.map(key, given[key], "beta", given[key])
            else:
                t.refuse(key, given[key], "the KL weight has no effect without rl: dpo, kto or grpo")
    if "trl" in given:
        _trl_section(given["trl"], given.get("rl") == "grpo", t)
    if given.get("test_datasets"):
        t.refuse("test_datasets", given["test_datasets"], "give one held-out file as eval_data (--eval-data)")
    for key in ("special_tokens", "tokens"):
        if given.get(key):
            t.refuse(key, given[key], "the vocabulary and special tokens of Gemma 4 are kept as they are")
    for key in ("chat_template_jinja", "image_size", "image_resize_algorithm", "resume_from_checkpoint"):
        if key in given:
            fix = {"resume_from_checkpoint": "use --resume with the same --out",
                   "chat_template_jinja": "only the official Gemma 4 template is used"}.get(
                       key, "images are given to the processor as they are; resize them beforehand")
            t.refuse(key, given[key], fix)
    if "optimizer" in given:
        name = given["optimizer"]
        if isinstance(name, str) and name in MAPPED_OPTIMIZERS:
            t.map("optimizer", name, "optimizer", name)
        else:
            t.refuse("optimizer", name, f"not a transformers optimizer that gemma4-tune runs; use one of "
                     f"{', '.join(sorted(MAPPED_OPTIMIZERS))}")
    if "lr_scheduler" in given:
        name = given["lr_scheduler"]
        if isinstance(name, str) and name in SCHEDULERS:
            t.map("lr_scheduler", name, "lr_scheduler", name)
        else:
            t.refuse("lr_scheduler", name, f"use one of {', '.join(sorted(SCHEDULERS))}")
    if "optim_args" in given:
        args = given["optim_args"]
        text = ",".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, dict) else str(args)
        t.map("optim_args", args, "optim_args", text)
    inputs = bool(given.get("train_on_inputs", False))
    if "train_on_inputs" in given:
        if inputs:
            t.differ("train_on_inputs", True, "train_on", "all", "every token but media is supervised, turn headers "
                     "included (Axolotl supervises every turn's content)")
        else:
            t.map("train_on_inputs", False, "train_on", "assistant")
    if "val_set_size" in given:
        size = finite(given["val_set_size"])
        if size is None or size < 0:
            t.refuse("val_set_size", given["val_set_size"], "expected a share below 1 (0.05) or a count of "
                     "conversations (200)")
        else:
            share = int(size) if size > 1 else size
            how = f"{int(size)} conversations" if size > 1 else f"a share of {size:g}"
            t.differ("val_set_size", given["val_set_size"], "eval_split", share, f"{how} held out by a seeded split "
                     "that keeps identical conversations on one side (Axolotl takes the last rows)")
    if "chat_template" in given:
        _chat_template(given["chat_template"], "chat_template", t)
    eot = given.get("eot_tokens")
    if eot is None:
        t.differ("eot_tokens", None, None, None, "absent: Axolotl would supervise <eos>, which rendered chats never "
                 "contain; gemma4-tune supervises the <turn|> that ends each model turn (catalog row 29)")
    elif eot == ["<turn|>"]:
        t.row("eot_tokens", eot, "mapped", "<turn|> is supervised at the end of each supervised turn")
    else:
        t.refuse("eot_tokens", eot, "Gemma 4 turns end with <turn|>; that is the token supervised (catalog row 29)")
    if "datasets" in given:
        entries = given["datasets"] if isinstance(given["datasets"], list) else [given["datasets"]]
        preference = given.get("rl") in ("dpo", "kto")
        specs = [_dataset(entry, f"datasets[{i}]", t, preference) for i, entry in enumerate(entries)]
        t.values["data"] = [s for s in specs if s is not None]
    for key, (field_name, value) in _DEFAULTS.items():
        if key not in given:
            t.values.setdefault(field_name, value)
            t.row(key, None, "default", f"{field_name} = {show(value)} (Axolotl's default)")
    if "warmup_steps" not in given and "warmup_ratio" not in given:
        t.values["warmup_ratio"] = 0.03
        t.row("warmup_ratio", None, "default", "warmup_ratio = 0.03 (Axolotl's default; it caps warmup at 100 steps, "
              "gemma4-tune does not)")
    t.unknown = unknown
    return t


class AxolotlReader(Reader):
    """Axolotl's run files: every file with ``base_model``, which Axolotl requires."""

    dialect = "Axolotl"
    aliases = {**_DIRECT, "learning_rate": "lr", "sequence_len": "max_seq_len", "datasets": "data",
               "val_set_size": "eval_split"}
    known = _KNOWN

    def claims(self, data: Mapping[str, Any]) -> bool:
        return "base_model" in data

    def translate(self, data: dict[str, Any], *, source: str) -> Translation:
        return _translate(data, source)


READER = AxolotlReader()
