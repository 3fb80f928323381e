"""Audio in any format and video end to end: PyAV decoding, the processor's blocks, labels, training the vision LoRA.

The media are LLaMA-Factory's demo files, copied unchanged (tests/data/llamafactory/SOURCE.md), read through
``load_conversations`` as a user's data file is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gemma4_tune.data.collate import IGNORE_INDEX, Gemma4Batcher
from gemma4_tune.data.media import MediaError, load_audio, load_video
from gemma4_tune.data.records import load_conversations
from gemma4_tune.findings import FindingError

LF = Path(__file__).parent / "data" / "llamafactory" / "data"
DEMO = LF / "mllm_demo_data"
# Durations (s) and native rates of the demo clips, as their containers state them (ffprobe).
CLIPS = {"1.mp3": (4.032, 48_000), "2.wav": (2.901, 16_000), "3.flac": (5.855, 16_000), "4.mp3": (5.0, 44_100)}
VIDEO_TYPE = 2  # mm_token_type_ids: 0 text, 1 image, 2 video, 3 audio (ProcessorMixin.create_mm_token_type_ids)
AUDIO_TYPE = 3


@pytest.fixture(scope="module")
def processor(tiny_models):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_models["e2b"]))


def _bad_copy(tmp_path: Path, name: str, keep: float) -> Path:
    """The first ``keep`` of a demo file (0: garbage bytes under its name)."""
    data = (DEMO / name).read_bytes()
    out = tmp_path / f"bad-{name}"
    out.write_bytes(data[: int(len(data) * keep)] if keep else b"not a media file " * 200)
    return out


# ---------------------------------------------------------------- decoding (no model)
@pytest.mark.parametrize("name", sorted(CLIPS))
def test_audio_decoded_mono_at_the_requested_rate_for_its_real_duration(name):
    seconds, rate = CLIPS[name]
    samples = load_audio(DEMO / name, 16_000)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size / 16_000 - seconds) < 0.03, samples.size
    assert 0.05 < np.abs(samples).max() < 1.5 and np.isfinite(samples).all()
    native = load_audio(DEMO / name, rate)
    assert abs(native.size / rate - seconds) < 0.03


@pytest.mark.parametrize("name", ["1.mp4", "2.avi"])
def test_video_frames_sampled_uniformly_with_timestamps(name):
    frames, metadata = load_video(DEMO / name, num_frames=4)
    assert frames.shape[0] == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8
    assert frames.shape[1:3] == (metadata.height, metadata.width)
    assert metadata.total_num_frames > 100 and metadata.fps > 20
    stamps = metadata.timestamps
    assert stamps[0] == 0 and all(b > a for a, b in zip(stamps, stamps[1:])) and stamps[-1] < metadata.duration
    frames, metadata = load_video(DEMO / name, num_frames=10_000)  # more than it has: every frame
    assert frames.shape[0] == metadata.total_num_frames


@pytest.mark.parametrize(("name", "keep", "loader"), [
    ("1.mp3", 0, "audio"), ("3.flac", 0.001, "audio"), ("1.mp4", 0.5, "video"), ("2.avi", 0.3, "video"),
    ("1.mp4", 1.0, "audio"), ("1.mp3", 1.0, "video"),
])
def test_undecodable_media_is_a_media_error(tmp_path, name, keep, loader):
    path = _bad_copy(tmp_path, name, keep) if keep != 1.0 else DEMO / name
    with pytest.raises(MediaError):
        load_audio(path, 16_000) if loader == "audio" else load_video(path, num_frames=2)


# ---------------------------------------------------------------- through the processor
@pytest.mark.slow
def test_mp3_flac_wav_rows_placed_at_their_audio_blocks(processor):
    convs, report = load_conversations(LF / "mllm_audio_demo.json")
    assert report.modalities["audio"] == 3
    batcher = Gemma4Batcher(processor)
    tok = processor.tokenizer
    boa, audio_id = tok.convert_tokens_to_ids(processor.boa_token), processor.audio_token_id
    for conv in convs:
        (path,) = conv.audios
        ex = batcher.encode(conv)
        ids = ex["input_ids"]
        assert int((ids == boa).sum()) == 1 and ex["input_features"].shape[0] == 1
        assert ex["input_features_mask"].any() and ex["input_features"][0][ex["input_features_mask"][0]].abs().sum() > 0
        expected = processor._compute_audio_num_tokens(load_audio(path, 16_000), 16_000)
        soft = ids == audio_id
        assert int(soft.sum()) == expected > 50
        assert (ex["labels"][soft] == IGNORE_INDEX).all() and (ex["mm_token_type_ids"][soft] == AUDIO_TYPE).all()
        assert ex["num_supervised"] > 0


@pytest.mark.slow
def test_video_rows_expand_into_timestamped_frames_with_video_types_and_no_labels(processor):
    convs, report = load_conversations(LF / "mllm_video_demo.json")
    assert report.modalities.get("video") == 3
    batcher = Gemma4Batcher(processor)
    frames_each = processor.video_processor.num_frames  # the tiny processor's default: 2
    tok = processor.tokenizer
    boi = tok.convert_tokens_to_ids(processor.boi_token)
    examples = []
    for conv, name in zip(convs, ["1.mp4", "2.avi"]):
        assert conv.messages[0]["content"][0] == {"type": "video", "path": str((DEMO / name).absolute())}
        ex = batcher.encode(conv)
        frames, metadata = load_video(DEMO / name, num_frames=frames_each)
        says = processor._get_num_multimodal_tokens(video_sizes=[frames.shape[:3]])["num_video_tokens"][0]
        soft = ex["input_ids"] == processor.video_token_id
        assert int(soft.sum()) == says > 0
        assert int((ex["input_ids"] == boi).sum()) == frames_each
        assert ex["num_frames_per_video"].tolist() == [frames_each]
        assert ex["pixel_values_videos"].shape[0] == frames_each == ex["video_position_ids"].shape[0]
        assert (ex["labels"][soft] == IGNORE_INDEX).all() and (ex["mm_token_type_ids"][soft] == VIDEO_TYPE).all()
        assert (ex["mm_token_type_ids"][~soft] != VIDEO_TYPE).all()
        prompt = tok.decode(ex["input_ids"][: int(soft.nonzero()[-1]) + 2])
        for seconds in metadata.timestamps:  # each frame after its mm:ss timestamp, unsupervised
            assert f"{int(seconds // 60):02d}:{int(seconds % 60):02d}" in prompt
        supervised = tok.decode(ex["labels"][ex["labels"] != IGNORE_INDEX])
        assert supervised.startswith(conv.messages[1]["content"][0]["text"])
        examples.append(ex)
    batch = batcher.collate(examples)
    assert batch["pixel_values_videos"].shape[0] == 2 * frames_each and batch["num_frames_per_video"].tolist() == [
        frames_each, frames_each]
    assert (batch["mm_token_type_ids"] == VIDEO_TYPE).sum() == sum(int(e["mm_token_type_ids"].eq(2).sum())
                                                                   for e in examples)
    more = Gemma4Batcher(processor, num_frames=3).encode(convs[1])
    assert more["num_frames_per_video"].tolist() == [3] and int((more["input_ids"] == boi).sum()) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("name", "keep", "kind"), [("1.mp3", 0, "audio"), ("1.mp4", 0.5, "video"),
                                                   ("2.avi", 0.3, "video"), ("3.flac", 0.001, "audio")])
def test_corrupt_media_file_is_g4t313_naming_it(processor, tmp_path, name, keep, kind):
    bad = _bad_copy(tmp_path, name, keep)
    conv = {"messages": [{"role": "user", "content": [{"type": kind, "path": str(bad)},
                                                      {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}],
            "source": "data.json#4"}
    with pytest.raises(FindingError) as err:
        Gemma4Batcher(processor).encode(conv)
    (found,) = err.value.findings
    assert found.code == "G4T313" and str(bad) in found.message and "data.json#4" in found.message
    assert f"cannot read {kind}" in found.message


# ---------------------------------------------------------------- training
@pytest.mark.slow
def test_one_step_on_video_rows_trains_the_vision_lora(tiny_models, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", "from gemma4_tune.cli import main; main()", "train", "--model", str(tiny_models["e2b"]),
         "--data", str(LF / "mllm_video_demo.json"), "--out", str(out), "--targets", "text,vision",
         "--max-steps", "1", "--batch-size", "2", "--lr", "5e-3"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    vision_b = {k: v for k, v in tensors.items() if ".vision_tower." in k and "lora_B" in k}
    # lora_B starts at zero: after one step it is nonzero only where the video rows gave a gradient
    assert vision_b and all(torch.count_nonzero(v) > 0 for v in vision_b.values())
