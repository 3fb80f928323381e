"""The demo's small multimodal chat dataset, generated here: license-clean, deterministic, offline.

Tasks are simple enough that a tiny model's loss drops visibly within ~30 steps: name the colour
of a square in a picture, say whether a tone is high or low, and answer a few fixed text questions
(with a system prompt on some rows, multi-turn rows, one row with reasoning and one with a tool
call). About a third of the rows have an image and a quarter have audio.
"""

from __future__ import annotations

import json
import math
import random
import struct
import wave
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

IMAGE_SIZE = (64, 48)  # width, height
SAMPLE_RATE = 16_000
TONE_SECONDS = 0.5

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (240, 210, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
TONES = {"low": (220.0, 330.0), "high": (1760.0, 2640.0)}
SYSTEM_PROMPT = "Answer in as few words as you can."
QA = (
    ("What is two plus two?", "four."),
    ("What is three plus three?", "six."),
    ("What colour is the sky on a clear day?", "blue."),
    ("How many legs does a cat have?", "four."),
    ("What is the opposite of hot?", "cold."),
    ("Say hello.", "hello."),
)
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def _write_png(path: Path, square: tuple[int, int, int], background: tuple[int, int, int] | None) -> None:
    """A 64x48 PNG: solid ``square`` colour, or a centred square of it on ``background``."""
    image = Image.new("RGB", IMAGE_SIZE, background or square)
    if background is not None:
        ImageDraw.Draw(image).rectangle((16, 8, 47, 39), fill=square)
    image.save(path, format="PNG")


def _write_wav(path: Path, frequency: float) -> None:
    """0.5 s of a sine tone at ``frequency`` Hz: 16 kHz mono 16-bit PCM."""
    n = int(SAMPLE_RATE * TONE_SECONDS)
    samples = [round(0.5 * 32767 * math.sin(2 * math.pi * frequency * i / SAMPLE_RATE)) for i in range(n)]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(struct.pack(f"<{n}h", *samples))


def _user(text: str, media: dict[str, str] | None = None) -> dict[str, Any]:
    if media is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [media, {"type": "text", "text": text}]}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def _image_row(i: int, rng: random.Random, media_dir: Path) -> dict[str, Any]:
    colour = rng.choice(sorted(COLOURS))
    background = rng.choice([None, *sorted(BACKGROUNDS)])
    name = f"square_{i:03d}.png"
    _write_png(media_dir / name, COLOURS[colour], BACKGROUNDS[background] if background else None)
    part = {"type": "image", "path": f"media/{name}"}
    return {"messages": [_user("What colour is the square?", part), _assistant(f"{colour}.")]}


def _audio_row(i: int, rng: random.Random, media_dir: Path) -> dict[str, Any]:
    pitch = rng.choice(sorted(TONES))
    name = f"tone_{i:03d}.wav"
    _write_wav(media_dir / name, rng.choice(TONES[pitch]))
    part = {"type": "audio", "path": f"media/{name}"}
    return {"messages": [_user("Is the tone high or low?", part), _assistant(f"{pitch}.")]}


def _text_row(kind: str, rng: random.Random) -> dict[str, Any]:
    question, answer = rng.choice(QA)
    if kind == "tool":
        call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": {"a": 17, "b": 25}}}
        return {
            "messages": [
                _user("What is 17 plus 25? Use the calculator."),
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": "42"},
                _assistant("forty-two."),
            ],
            "tools": [ADD_TOOL],
        }
    if kind == "reasoning":
        return {
            "messages": [
                _user("What is two plus two?"),
                {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "four."},
            ]
        }
    if kind == "multi":
        second, second_answer = rng.choice([qa for qa in QA if qa[0] != question])
        return {"messages": [_user(question), _assistant(answer), _user(second), _assistant(second_answer)]}
    return {"messages": [_user(question), _assistant(answer)]}


def write_demo_dataset(out_dir: Path, *, seed: int = 0, n: int = 48) -> Path:
    """Write ``out_dir/train.jsonl`` (``n`` conversations) and its media under ``out_dir/media``.

    The same ``seed`` and ``n`` give byte-identical files. Returns the JSONL path.
    """
    if n < 3:
        raise ValueError(f"the demo dataset needs n >= 3 (one row per modality), got {n}")
    rng = random.Random(seed)
    n_image, n_audio = max(1, round(n / 3)), max(1, round(n / 4))
    n_text = n - n_image - n_audio
    text_kinds = (["tool", "reasoning", "multi", "multi"] + ["qa"] * n_text)[:n_text]
    kinds = ["image"] * n_image + ["audio"] * n_audio + text_kinds
    rng.shuffle(kinds)

    out_dir = Path(out_dir)
    media_dir = out_dir / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, kind in enumerate(kinds):
        if kind == "image":
            row = _image_row(i, rng, media_dir)
        elif kind == "audio":
            row = _audio_row(i, rng, media_dir)
        else:
            row = _text_row(kind, rng)
        if i % 4 == 0:
            row["messages"].insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        lines.append(json.dumps(row, ensure_ascii=False))
    path = out_dir / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
