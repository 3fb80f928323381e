"""A fixed multimodal batch for a model directory, built with stock transformers only.

Shared by the in-process tests and the stock-tool subprocess scripts, so both sides
see the same inputs. Never imports gemma4_tune.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoProcessor


def fixed_batch(path: str, *, with_image: bool = True, with_audio: bool = True, text: str = "Describe it.") -> dict:
    """Processor output for a one-turn chat with an image (and audio when the model has an audio tower)."""
    config = json.loads((Path(path) / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(0)
    content, images, audio = [], None, None
    if with_image:
        content.append({"type": "image"})
        images = [[Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8"))]]
    if with_audio and config.get("audio_config"):
        content.append({"type": "audio"})
        audio = [(rng.standard_normal(8000) * 0.1).astype("float32")]
    content.append({"type": "text", "text": text})
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "A small test answer."}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[rendered], images=images, audio=audio, return_tensors="pt")
    return dict(batch)
