"""Load a model directory with stock transformers only (never imports gemma4_tune).

Prints one JSON line: the loading report, a forward pass over a processor-rendered
chat (with an image, and audio when the model has an audio tower), and greedy tokens.
"""

import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

path = sys.argv[1]
assert "gemma4_tune" not in sys.modules
model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
model.eval()
tokenizer = AutoTokenizer.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
rng = np.random.default_rng(0)
image = Image.fromarray((rng.random((60, 90, 3)) * 255).astype("uint8"))
content = [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]
audio = None
if model.config.audio_config is not None:
    content.insert(1, {"type": "audio"})
    audio = [(rng.standard_normal(16000) * 0.1).astype("float32")]
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
batch = processor(text=[text], images=[[image]], audio=audio, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
print(json.dumps({
    "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
    "rendered": text,
    "batch_keys": sorted(batch.keys()),
    "logits_shape": list(logits.shape),
    "logits_finite": bool(torch.isfinite(logits).all()),
    "new_tokens": generated[0, batch["input_ids"].shape[1]:].tolist(),
    "tokenizer_class": type(tokenizer).__name__,
    "processor_class": type(processor).__name__,
    "special_ids": {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
                    for name in ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token")},
    "video_id": tokenizer.convert_tokens_to_ids("<|video|>"),
    "gemma4_tune_imported": "gemma4_tune" in sys.modules,
}))
