"""A vLLM-ready adapter: vLLM 0.32 applies a k_proj LoRA to the keys only on K=V global layers (26B-A4B, 31B).

transformers computes those layers' values with ``k_proj`` too, so the copy for vLLM duplicates the k_proj
LoRA onto ``v_proj`` there. For vLLM only: PEFT cannot load it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from gemma4_tune.io import atomic_directory
from gemma4_tune.model.profile import part_of

_K_LORA = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([kv])_proj\.lora_[AB]\.")


def _text_lora_keys(adapter_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        return [k for k in handle.keys() if part_of(k) == "text"]  # noqa: SIM118


def k_eq_v_lora_layers(base_dir: str | Path, adapter_dir: str | Path) -> list[int]:
    """K=V global layers where the adapter has a k_proj LoRA but no v_proj LoRA.

    On ``attention_k_eq_v`` full-attention layers transformers computes the values with
    ``k_proj`` (there is no ``v_proj``), so a k_proj LoRA changes keys and values alike.
    vLLM 0.32 loads k_proj's weight into both the K and V slots of its fused ``qkv_proj``
    but applies the k_proj LoRA to the K slot only: the values lose the delta, silently.
    """
    text = json.loads((Path(base_dir) / "config.json").read_text())
    text = text.get("text_config") or text
    if not text.get("attention_k_eq_v"):
        return []
    types = text.get("layer_types") or []
    first_shared = len(types) - int(text.get("num_kv_shared_layers") or 0)
    full = {i for i, t in enumerate(types[:first_shared]) if t == "full_attention"}
    seen: dict[str, set[int]] = {"k": set(), "v": set()}
    for key in _text_lora_keys(Path(adapter_dir)):
        m = _K_LORA.search(key)
        if m:
            seen[m.group(2)].add(int(m.group(1)))
    return sorted((seen["k"] - seen["v"]) & full)


def vllm_ready_adapter(adapter_dir: str | Path, base_dir: str | Path, out: str | Path, *,
                       overwrite: bool = False) -> Path:
    """A copy of the adapter that vLLM 0.32 serves like transformers + PEFT on K=V global layers.

    The k_proj LoRA of every layer :func:`k_eq_v_lora_layers` names is copied to ``v_proj``
    (same A, B, rank and alpha), so vLLM applies it to the V slot of ``qkv_proj`` too. For
    vLLM only: PEFT cannot load it (those layers have no ``v_proj`` module in transformers).
    """
    from safetensors.torch import load_file, save_file

    adapter_dir, out = Path(adapter_dir), Path(out)
    layers = set(k_eq_v_lora_layers(base_dir, adapter_dir))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        extra = {}
        for key, value in tensors.items():
            m = _K_LORA.search(key)
            if m and m.group(2) == "k" and int(m.group(1)) in layers and part_of(key) == "text":
                extra[key.replace(".k_proj.lora_", ".v_proj.lora_")] = value.clone()
        save_file({**tensors, **extra}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        targets = config.get("target_modules")
        if isinstance(targets, list):
            added = {t.replace(".k_proj", ".v_proj") for t in targets
                     if t.endswith(".k_proj") and (m := re.search(r"layers\.(\d+)\.", t)) and int(m.group(1)) in layers}
            config["target_modules"] = sorted(set(targets) | added)
        for pattern in ("rank_pattern", "alpha_pattern"):
            values = dict(config.get(pattern) or {})
            for name, value in list(values.items()):
                if ".k_proj" in name and (m := re.search(r"layers\.(\d+)\.", name)) and int(m.group(1)) in layers:
                    values[name.replace(".k_proj", ".v_proj")] = value
            if values:
                config[pattern] = values
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "vllm_ready.json").write_text(json.dumps({"source": str(adapter_dir), "k_eq_v_layers_copied_to_v_proj":
                                                         sorted(layers)}, indent=2) + "\n")
    return out
