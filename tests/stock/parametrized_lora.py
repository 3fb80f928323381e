"""PEFT's expert LoRA on 4-bit (bitsandbytes-parametrized) MoE expert stacks, one training step and a second one;
prints what happened as JSON. ``MODEL [patched]``: with ``patched``, gemma4-tune's patch is applied first; without,
the process has only transformers, PEFT and bitsandbytes (run it with ``python -P``)."""
import json, sys
import torch
from bitsandbytes.nn.parametrize import replace_parameter_4bit
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

if len(sys.argv) > 2 and sys.argv[2] == "patched":
    from gemma4_tune.model.patches import patch_peft_parametrized_lora
    patch_peft_parametrized_lora()
torch.manual_seed(0)
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32)
config = LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"])
model = get_peft_model(model, config)
experts = [m for m in model.modules() if isinstance(m, Gemma4TextExperts)]
for m in experts:
    for p in ("gate_up_proj", "down_proj"):
        replace_parameter_4bit(m, p, quant_type="nf4", compress_statistics=True, blocksize=64)
ids = torch.randint(0, 200, (1, 12))
out = {}
model(input_ids=ids, labels=ids).loss.backward()
grads = [n for n, p in model.named_parameters() if "lora_" in n and p.grad is None]
out["lora_tensors_without_grad"] = len(grads)
out["lora_tensors"] = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
out["parametrizations_after_step"] = max(len(m.parametrizations[p]) for m in experts
                                         for p in ("gate_up_proj", "down_proj"))
try:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    out["second_step"] = "ok"
except Exception as exc:
    out["second_step"] = f"{type(exc).__name__}: {exc}"[:200]
print(json.dumps(out))
