"""Decode audio and video files with PyAV (FFmpeg's decoders, bundled in the ``av`` wheels).

``load_audio`` reads any container and codec FFmpeg reads (WAV, MP3, FLAC, OGG, M4A, the audio of an MP4, ...)
into mono float32 at the rate the processor's feature extractor expects: each channel is resampled by FFmpeg's
``swresample`` (``av.AudioResampler``), then the channels are averaged. ``load_video`` is transformers' own
``load_video`` with its ``pyav`` backend, so frames and their ``VideoMetadata`` (fps, sampled frame indices, hence
the timestamps ``Gemma4Processor`` writes before each frame) are what the processor expects; frames are sampled
while decoding, never all held in memory. Anything that cannot be decoded is a :class:`MediaError` naming why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np

__all__ = ["MediaError", "load_audio", "load_video", "resample"]


class MediaError(ValueError):
    """A media file that cannot be decoded (missing stream, corrupt or truncated data, no samples or frames)."""


def _planar(frames: list[Any]) -> np.ndarray:
    """``(channels, samples)`` float32 from resampled planar float frames."""
    arrays = [frame.to_ndarray() for frame in frames]
    return np.concatenate(arrays, axis=1) if arrays else np.zeros((1, 0), dtype=np.float32)


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples of the first audio stream of ``path``, resampled to ``sampling_rate`` (none for a stream
    without samples)."""
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise MediaError("the file has no audio stream")
            resampler = av.AudioResampler(format="fltp", rate=sampling_rate)
            frames: list[Any] = []
            for frame in container.decode(stream):
                frames += resampler.resample(frame)
            frames += resampler.resample(None)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(str(exc) or type(exc).__name__) from exc
    samples = _planar(frames)  # an empty stream is 0 samples: the caller says how short is too short
    return np.ascontiguousarray(samples.mean(axis=0), dtype=np.float32)


def resample(samples: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Mono float32 ``samples`` at ``orig`` Hz resampled to ``new`` Hz by FFmpeg's ``swresample``."""
    samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
    if orig == new or not samples.size:
        return samples
    frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
    frame.sample_rate = orig
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=new)
    return np.ascontiguousarray(_planar(resampler.resample(frame) + resampler.resample(None))[0])


def load_video(path: str | Path, *, num_frames: int | None = None, fps: float | None = None
               ) -> tuple[np.ndarray, Any]:
    """``(frames, metadata)`` of ``path``: RGB uint8 frames ``(n, height, width, 3)`` and transformers' ``VideoMetadata``.

    Frames are sampled uniformly as the video processor samples them: ``fps`` frames a second if given, else
    ``num_frames`` (at most the frames the video has), else every frame.
    """
    from transformers.video_utils import default_sample_indices_fn
    from transformers.video_utils import load_video as hf_load_video

    def sample(metadata: Any, **_: Any) -> np.ndarray:
        if not metadata.total_num_frames:
            raise MediaError("the video stream has no frames")
        if fps is not None:
            return default_sample_indices_fn(metadata, fps=fps)
        count = min(num_frames, metadata.total_num_frames) if num_frames else None
        return default_sample_indices_fn(metadata, num_frames=count)

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("the file has no video stream")
        frames, metadata = hf_load_video(str(path), backend="pyav", sample_indices_fn=sample)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise MediaError(str(exc) or type(exc).__name__) from exc
    wanted = len(metadata.frames_indices)
    if len(frames) != wanted:
        raise MediaError(f"decoded {len(frames)} of the {wanted} sampled frames (truncated or corrupt stream)")
    return frames, metadata
