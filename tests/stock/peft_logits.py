"""Load base + adapter with stock transformers + PEFT only; write logits for the fixed batch.

usage: peft_logits.py BASE ADAPTER OUT.pt
"""

import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

sys.path.insert(0, str(Path(__file__).parent))
from batch import fixed_batch  # noqa: E402

base_path, adapter_path, out_path = sys.argv[1:4]
base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32)
n_clippable = sum(isinstance(m, Gemma4ClippableLinear) for m in base.modules())
model = PeftModel.from_pretrained(base, adapter_path).eval()
n_after = sum(isinstance(m, Gemma4ClippableLinear) for m in model.modules())
with torch.no_grad():
    logits = model(**fixed_batch(base_path)).logits
torch.save({"logits": logits, "clippable_before": n_clippable, "clippable_after": n_after,
            "imported": "gemma4_tune" in sys.modules}, out_path)
