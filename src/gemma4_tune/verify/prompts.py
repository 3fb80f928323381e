"""The verification prompts: a fixed, seeded set per modality, used by every engine comparison.

Text prompts always; image prompts where the model has a vision tower (two images of different
aspect ratios, so of different soft-token counts, each more soft tokens than the sliding window of
the tiny models, so the image block crosses it); audio prompts where it has an audio tower (two
clip lengths); a video prompt where the model has a vision tower, its processor has a video processor and
token, and the adapter was trained on video (its manifest's ``data_modalities``: :func:`trained_modalities`).
Media are generated here from fixed seeds, never downloaded: every engine sees the same pixels and samples.
Each prompt is a user turn rendered by the model's own chat template with the generation prompt, its media
placeholders left for the processor (and for the engine's own processor) to expand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODALITIES = ("text", "image", "audio", "video")
TEXT_PROMPTS = ("What is the capital of France?", "Write one short sentence about the sea.", "List three colours.")
#: (height, width) of the generated images: a wide and a tall one, so the processor gives them different
#: soft-token counts (60 and 64 under the tiny models' budget of 70; both cross their 32-token sliding window).
IMAGE_SIZES = ((200, 300), (64, 48))
#: Lengths of the generated audio clips, seconds (13 and 50 soft tokens in the tiny models).
AUDIO_SECONDS = (0.5, 2.0)
SAMPLING_RATE = 16_000
#: The generated video: (height, width) of its frames (63 soft tokens each under the tiny models' video budget of
#: 70), its frame count and frame rate (the processor writes each frame's ``mm:ss`` timestamp from them).
VIDEO_SIZE = (48, 64)
VIDEO_FRAMES = 3
VIDEO_FPS = 1.0
SEED = 0


@dataclass(frozen=True)
class VerifyPrompt:
    """One verification prompt: its rendered text (placeholders unexpanded) and its media."""

    name: str
    modality: str
    text: str
    images: tuple[np.ndarray, ...] = field(default=(), compare=False)  # HxWx3 uint8
    audios: tuple[np.ndarray, ...] = field(default=(), compare=False)  # float32 mono at SAMPLING_RATE
    videos: tuple[np.ndarray, ...] = field(default=(), compare=False)  # NxHxWx3 uint8 frames at VIDEO_FPS

    def pil_images(self) -> list[Any]:
        """The images as PIL images (what processors take)."""
        from PIL import Image

        return [Image.fromarray(pixels) for pixels in self.images]

    def video_metadata(self) -> list[Any]:
        """transformers' ``VideoMetadata`` of each video: every frame kept, at :data:`VIDEO_FPS` (the timestamps)."""
        from transformers.video_utils import VideoMetadata

        return [VideoMetadata(total_num_frames=len(frames), fps=VIDEO_FPS, width=frames.shape[2],
                              height=frames.shape[1], duration=len(frames) / VIDEO_FPS, video_backend="pyav",
                              frames_indices=list(range(len(frames)))) for frames in self.videos]


def image(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A seeded random RGB image: smooth colour gradients plus noise, uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
    return np.clip((0.7 * base + 0.3 * rng.random((height, width, 3))) * 255, 0, 255).astype("uint8")


def audio(seconds: float, seed: int = SEED) -> np.ndarray:
    """A seeded clip: two tones under noise, float32 in [-1, 1] at :data:`SAMPLING_RATE`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    clip = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t) + 0.05 * rng.standard_normal(t.size)
    return clip.astype("float32")


def video(frames: int, height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A seeded video: ``frames`` images of :func:`image`, each from its own seed, uint8 ``(frames, h, w, 3)``."""
    return np.stack([image(height, width, seed=seed + i) for i in range(frames)])


def model_modalities(model_dir: str | Path) -> list[str]:
    """The modalities the checkpoint in ``model_dir`` can take: text, and each tower it has."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return ["text", *(["image"] if config.get("vision_config") else []),
            *(["audio"] if config.get("audio_config") else [])]


def trained_modalities(adapter: str | Path | None) -> dict[str, int]:
    """``{modality: conversations}`` of the data ``adapter`` was trained on, as its manifest records it
    (``data_modalities``); empty without an adapter, a manifest or that record (older or stock adapters)."""
    if adapter is None:
        return {}
    from gemma4_tune.export.manifest import read_manifest

    recorded = (read_manifest(adapter) or {}).get("data_modalities") or {}
    return {str(k): int(n) for k, n in recorded.items() if isinstance(n, int) and n > 0}


def verified_modalities(model_dir: str | Path, processor: Any, adapter: str | Path | None = None) -> list[str]:
    """The modalities verify compares for the model in ``model_dir``: :func:`model_modalities`, and video where the
    model has a vision tower, ``processor`` a video processor and video token, and ``adapter`` was trained on video."""
    modalities = model_modalities(model_dir)
    takes_video = getattr(processor, "video_processor", None) is not None and getattr(processor, "video_token", None)
    if "image" in modalities and takes_video and trained_modalities(adapter).get("video"):
        modalities.append("video")
    return modalities


def verification_prompts(model_dir: str | Path, processor: Any | None = None,
                         adapter: str | Path | None = None) -> list[VerifyPrompt]:
    """The prompts for the model in ``model_dir``: text, then image, audio and video as
    :func:`verified_modalities` says (video only for an ``adapter`` trained on it)."""
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(model_dir))
    modalities = verified_modalities(model_dir, processor, adapter)

    def render(content: Any) -> str:
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    out = [VerifyPrompt(f"text-{i}", "text", render(p)) for i, p in enumerate(TEXT_PROMPTS, 1)]
    if "image" in modalities:
        out += [VerifyPrompt(f"image-{h}x{w}", "image", render([{"type": "image"}, {"type": "text", "text":
                                                                "Describe the image."}]),
                             images=(image(h, w, seed=SEED + i),))
                for i, (h, w) in enumerate(IMAGE_SIZES)]
    if "audio" in modalities:
        out += [VerifyPrompt(f"audio-{s:g}s", "audio", render([{"type": "audio"}, {"type": "text", "text":
                                                               "What do you hear?"}]),
                             audios=(audio(s, seed=SEED + i),))
                for i, s in enumerate(AUDIO_SECONDS)]
    if "video" in modalities:
        out.append(VerifyPrompt(f"video-{VIDEO_FRAMES}x{VIDEO_SIZE[0]}x{VIDEO_SIZE[1]}", "video",
                                render([{"type": "video"}, {"type": "text", "text": "Describe the video."}]),
                                videos=(video(VIDEO_FRAMES, *VIDEO_SIZE, seed=SEED + 10),)))
    return out


def by_modality(prompts: list[VerifyPrompt]) -> dict[str, list[VerifyPrompt]]:
    """The prompts grouped by modality, in :data:`MODALITIES` order, empty groups left out."""
    groups = {m: [p for p in prompts if p.modality == m] for m in MODALITIES}
    return {m: g for m, g in groups.items() if g}


def processed(processor: Any, prompts: list[VerifyPrompt]) -> dict[str, Any]:
    """One padded batch (right padding, ``return_tensors="pt"``) of prompts of one modality.

    The rendered text already holds ``<bos>``, so the tokenizer adds no special tokens of its own.
    """
    kinds = {p.modality for p in prompts}
    if len(kinds) != 1:
        raise ValueError(f"a batch holds one modality, got {sorted(kinds)}")
    kwargs: dict[str, Any] = {}
    if kinds == {"image"}:
        kwargs["images"] = [p.pil_images() for p in prompts]
    if kinds == {"audio"}:
        kwargs["audio"] = [clip for p in prompts for clip in p.audios]
        kwargs["sampling_rate"] = SAMPLING_RATE
    if kinds == {"video"}:  # the frames as they are, with their timestamps' metadata: nothing sampled again
        kwargs["videos"] = [frames for p in prompts for frames in p.videos]
        kwargs["video_metadata"] = [meta for p in prompts for meta in p.video_metadata()]
        kwargs["do_sample_frames"] = False
    return dict(processor(text=[p.text for p in prompts], return_tensors="pt", padding=True, padding_side="right",
                          add_special_tokens=False, **kwargs))


def batches(model_dir: str | Path, prompts: list[VerifyPrompt] | None = None,
            adapter: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """``{modality: processed batch}`` of the verification prompts of ``model_dir`` (for ``adapter``)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    prompts = verification_prompts(model_dir, processor, adapter) if prompts is None else prompts
    return {m: processed(processor, group) for m, group in by_modality(prompts).items()}


__all__ = ["AUDIO_SECONDS", "IMAGE_SIZES", "MODALITIES", "SAMPLING_RATE", "TEXT_PROMPTS", "VIDEO_FPS", "VIDEO_FRAMES",
           "VIDEO_SIZE", "VerifyPrompt", "audio", "batches", "by_modality", "image", "model_modalities", "processed",
           "trained_modalities", "verification_prompts", "verified_modalities", "video"]
