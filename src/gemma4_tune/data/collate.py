"""Turn conversations into Gemma 4 training batches with exact assistant-only labels.

``Gemma4Batcher.encode`` renders one conversation with the *training* template of its official
chat-template revision (byte-identical to the official rendering, plus generation markers; catalog
rows 12 and 13), tokenizes the unexpanded text with offsets to get a per-token assistant mask, runs
the processor (which expands every ``<|image|>`` into ``<|image>`` + N soft tokens + ``<image|>``, every
``<|audio|>`` into ``<|audio>`` + M soft tokens + ``<audio|>`` and every ``<|video|>`` into, per sampled
frame, its ``mm:ss`` timestamp + ``<|image>`` + K ``<|video|>`` soft tokens + ``<image|>``) and aligns the
two id sequences, so labels sit exactly on what the model must produce and never on a media, timestamp or
placeholder token. Audio and video files are decoded by ``gemma4_tune.data.media`` (PyAV).

``collate`` pads right and keeps every processor output key (``mm_token_type_ids`` above all: without
it the 26B/31B models silently give image tokens a causal mask, catalog row 10). Media tensors are
concatenated across the batch exactly as ``Gemma4Processor`` does for several samples: one row per
image (``pixel_values``/``image_position_ids``, patches padded to the same count with position -1),
one row per audio clip (``input_features``/``input_features_mask``, frames padded with 0/False), one
row per video frame (``pixel_values_videos``/``video_position_ids``) with ``num_frames_per_video`` per video.

``pack`` does padding-free packing of text-only examples for transformers' position-ids packing
detection (``masking_utils.find_packed_sequence_indices``): ``position_ids`` restart at 0 for each
sequence, there is no ``attention_mask`` (its presence switches the detection off), and the first
label of every sequence is -100 so no sequence is trained to predict the next one's first token
(catalog row 15). Multimodal examples are never packed with others: ``pack`` puts each one in a row
of its own (its block-bidirectional image mask is only correct in a row of its own).

Loss normalisation is left to the trainer: ``Gemma4ForConditionalGeneration.accepts_loss_kwargs`` is
False, so it averages per micro-batch (catalog row 26); ``count_supervised`` gives the token count to
normalise by across gradient accumulation.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from gemma4_tune.data.chat import END_OF_TURN, REVISIONS, assistant_char_spans, detect_revision, message_regions, render
from gemma4_tune.data.media import MediaError, load_audio, load_video, resample
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register

UNKNOWN_REVISION = register("G4T310", Severity.ERROR, "Unknown chat template revision", (12, 13))
LABEL_ALIGNMENT = register("G4T311", Severity.ERROR, "Labels could not be aligned with the processor output", (12,))
MEDIA_MISMATCH = register("G4T312", Severity.ERROR, "Media parts and rendered placeholders disagree")
MEDIA_UNREADABLE = register("G4T313", Severity.ERROR, "A media part cannot be loaded")
PACK_TOO_LONG = register("G4T314", Severity.ERROR, "Example longer than the packing length", (15,))
MM_TYPE_IDS_MISSING = register("G4T315", Severity.ERROR, "Media in a batch without mm_token_type_ids", (10,))
BAD_BATCHER_OPTION = register("G4T316", Severity.ERROR, "Invalid batcher option")
MIXED_TURN_WEIGHTS = register("G4T317", Severity.ERROR, "Messages of one model turn have different weights")
ROWS_TRUNCATED = register("G4T318", Severity.WARNING, "Rows truncated to --max-seq-len")
ROWS_UNSUPERVISED = register("G4T319", Severity.WARNING, "Rows with no supervised token left are not trained on")

IGNORE_INDEX = -100
SAMPLING_RATE = 16_000

TRAIN_ON = ("assistant", "all")

# Keys ``encode`` adds beside the processor's tensors; ``collate`` does not pass them to the model.
META_KEYS = frozenset({"truncated", "full_length", "num_supervised", "num_sequences"})

# Media tensors (one row per image / audio clip / video, or per video frame), by modality.
_MEDIA_KEYS = {
    "pixel_values": "image",
    "image_position_ids": "image",
    "input_features": "audio",
    "input_features_mask": "audio",
    "pixel_values_videos": "video",
    "video_position_ids": "video",
    "num_frames_per_video": "video",
}
_PER_FRAME = frozenset({"pixel_values_videos", "video_position_ids"})
# Tokens of the ``mm:ss`` timestamp (and separating space) the processor writes before each video frame, at most.
_MAX_TIMESTAMP_TOKENS = 16
MODALITIES = ("image", "audio", "video")
_PER_TOKEN_PAD = {"attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}


@runtime_checkable
class ConversationLike(Protocol):
    """What ``encode`` needs from a conversation (``gemma4_tune.data.records.Conversation`` has it).

    ``messages`` have content as a list of parts: ``{"type": "text", "text": ...}``,
    ``{"type": "image", "path": ...}``, ``{"type": "audio", "path": ...}``, ``{"type": "video", "path": ...}``.
    """

    messages: list[dict]
    tools: list[dict] | None


def count_supervised(batch: Mapping[str, Any]) -> int:
    """Number of tokens a causal-LM loss is computed on: labels after the first position that are not -100.

    Sum the per-token loss and divide by this (summed over the micro-batches of one optimizer step)
    to average per token across gradient accumulation (catalog row 26).
    """
    labels = batch["labels"]
    if not torch.is_tensor(labels):
        labels = torch.as_tensor(labels)
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def keep_supervised(examples: Sequence[Mapping[str, Any]], sources: Sequence[str], max_seq_len: int, *,
                    held_out: int = 0) -> tuple[list[bool], list[Finding]]:
    """Which encoded ``examples`` to keep (those with a supervised token), and what to tell the user.

    One G4T318 counts the rows cut to ``max_seq_len`` (with the longest); one G4T319 counts the rows left
    with no supervised token, which are dropped: each would be a step of zero loss and zero gradient.
    ``sources`` name the rows (``file:line``); the last ``held_out`` examples are held-out rows, counted apart.
    """
    train = len(examples) - held_out

    def counted(indices: list[int], singular: str, plural: str) -> str:
        kept = sum(i < train for i in indices)
        text = f"{kept} of {train} training rows"
        if len(indices) > kept:
            text += f" and {len(indices) - kept} of {held_out} held-out rows"
        return f"{text} {singular if len(indices) == 1 else plural}"

    findings: list[Finding] = []
    cut = [i for i, e in enumerate(examples) if e["truncated"]]
    if cut:
        longest = max(cut, key=lambda i: int(examples[i]["full_length"]))
        length = int(examples[longest]["full_length"])
        findings.append(finding(
            ROWS_TRUNCATED.code,
            f"{counted(cut, 'is', 'are')} longer than --max-seq-len {max_seq_len} tokens and cut to that length: what "
            f"follows the cut is not trained on (the longest, {sources[longest]}, has {length} tokens)",
            f"raise --max-seq-len (to {length} to keep every row whole; memory grows with it), or shorten those "
            "rows", rows=len(cut), longest=length, longest_row=sources[longest],
        ))
    empty = [i for i, e in enumerate(examples) if not int(e["num_supervised"])]
    if empty:
        lost = sum(bool(examples[i]["truncated"]) for i in empty)
        why = (f"after truncation to --max-seq-len {max_seq_len}" if lost == len(empty) else
               f"({lost} lost them to truncation to --max-seq-len {max_seq_len}, {len(empty) - lost} had none: "
               "no supervised turn)")
        findings.append(finding(
            ROWS_UNSUPERVISED.code,
            f"{counted(empty, 'has', 'have')} no supervised token left {why}: left out, since each would be a "
            f"step of zero loss and zero gradient (the first: {sources[empty[0]]})",
            "raise --max-seq-len, or shorten those rows so that the answers start within the first "
            f"{max_seq_len} tokens", rows=len(empty), first_row=sources[empty[0]],
        ))
    return [bool(int(e["num_supervised"])) for e in examples], findings


class Gemma4Batcher:
    """Encode, collate and pack Gemma 4 conversations for training.

    ``revision`` names the official chat-template revision (``v1`` ... ``v5``); None detects it from
    ``processor.chat_template``. ``train_on="assistant"`` labels what the model produces in model
    turns; ``"all"`` labels every token but media and placeholders. ``chat_kwargs`` go to the
    template (``enable_thinking``, ``preserve_thinking``, ...). Video frames are sampled as the processor's
    video processor says (its ``fps``, else its ``num_frames``, at most the frames a video has; Gemma 4's
    default is 32 frames of 70 soft tokens each); ``num_frames`` overrides that count.
    """

    def __init__(
        self,
        processor: Any,
        *,
        revision: str | None = None,
        max_seq_len: int = 2048,
        train_on: str = "assistant",
        chat_kwargs: dict | None = None,
        num_frames: int | None = None,
    ) -> None:
        if train_on not in TRAIN_ON:
            raise FindingError(finding(
                BAD_BATCHER_OPTION.code, f"train_on={train_on!r} is not one of {TRAIN_ON}",
                'use train_on="assistant" (model turns only) or train_on="all"',
            ))
        if num_frames is not None and num_frames < 1:
            raise FindingError(finding(
                BAD_BATCHER_OPTION.code, f"num_frames={num_frames} is too small", "use num_frames >= 1",
            ))
        if max_seq_len < 2:
            raise FindingError(finding(
                BAD_BATCHER_OPTION.code, f"max_seq_len={max_seq_len} is too small", "use max_seq_len >= 2",
            ))
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.revision = _resolve_revision(processor, revision)
        self.max_seq_len = max_seq_len
        self.train_on = train_on
        self.chat_kwargs = dict(chat_kwargs or {})
        extractor = getattr(processor, "feature_extractor", None)
        self.sampling_rate = int(getattr(extractor, "sampling_rate", None) or SAMPLING_RATE)
        video = getattr(processor, "video_processor", None)
        self.video_sampling = ({"fps": video.fps} if num_frames is None and getattr(video, "fps", None)
                               else {"num_frames": num_frames or getattr(video, "num_frames", None)})

        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = {}
        for name in ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token", "video_token"):
            token = getattr(processor, name, None) or getattr(tok, name, None)
            ids[name] = tok.convert_tokens_to_ids(token) if token else None
        self.token_ids = ids
        # placeholder id in the rendered text -> (begin id, end id, modality) of its expanded block
        self._blocks = {
            ids["image_token"]: (ids["boi_token"], ids["eoi_token"], "image"),
        }
        if ids["audio_token"] is not None:
            self._blocks[ids["audio_token"]] = (ids["boa_token"], ids["eoa_token"], "audio")
        if ids["video_token"] is not None and video is not None:
            # per sampled frame: its timestamp, <|image>, the frame's <|video|> soft tokens, <image|>
            self._blocks[ids["video_token"]] = (ids["boi_token"], ids["eoi_token"], "video")
        self.media_token_ids = frozenset(v for v in ids.values() if v is not None)

    # ------------------------------------------------------------------ encode
    def render(self, conv: ConversationLike) -> tuple[str, list[tuple[int, int]]]:
        """Rendered training text of ``conv`` and the character spans to supervise.

        By default the spans are what the model produces in its turns; a message's ``train`` flag (a
        ``weight``, ``roles_to_train``) takes its turn out or puts it in. A plain-text row (``text``) is a
        document: supervised whole, after the ``<bos>`` it is given if it does not start with one and up to the
        end-of-text token it is given if it does not end with one (as LLaMA-Factory's pretraining stage and TRL's
        language-modelling rows add it), so that the model learns where a document ends.
        """
        raw = conv.get("text") if isinstance(conv, Mapping) else getattr(conv, "text", None)
        if raw is not None:
            bos, eos = self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
            text = raw if not bos or raw.startswith(bos) else bos + raw
            text = text if not eos or text.endswith(eos) else text + eos
            return text, [(0, len(text))]
        messages, tools = _messages_and_tools(conv)
        kwargs = {**dict(self.tokenizer.special_tokens_map), **self.chat_kwargs}
        text, spans = assistant_char_spans(messages, revision=self.revision, tools=tools, **kwargs)
        if any("train" in m for m in messages):
            spans = self._flagged_spans(messages, tools, kwargs, text, spans)
        return text, spans

    def _flagged_spans(self, messages: list[dict], tools: list[dict] | None, kwargs: dict[str, Any], text: str,
                       spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Apply each message's ``train`` flag to the assistant spans (and add flagged non-assistant turns).

        A generation span belongs to the assistant messages between the non-assistant messages around it; a
        non-assistant message's span is its content and the ``<turn|>`` that closes it.
        """
        rendered, regions = message_regions(messages, revision=self.revision, tools=tools, **kwargs)
        seps = [(i, regions[i]) for i, m in enumerate(messages) if m["role"] != "assistant"]
        lost = [i for i, region in seps if region is None]
        if lost:
            i = lost[0]
            raise FindingError(finding(
                LABEL_ALIGNMENT.code,
                f"message {i} ({messages[i]['role']}) is not rendered by the chat template {self.revision} in one "
                "place (a tool result with no tool call before it is dropped), so its weight cannot be applied",
                "give that message the tool call it answers, or remove it (or its weight)",
            ))
        if rendered != text:
            raise _alignment_error("the conversation renders differently twice in a row")
        kept: list[tuple[int, int]] = []
        for start, end in spans:
            before = max((i for i, r in seps if r[1] <= start), default=-1)
            after = min((i for i, r in seps if r[0] >= end), default=len(messages))
            flags = {m.get("train", True) for m in messages[before + 1 : after] if m["role"] == "assistant"}
            if len(flags) > 1:
                raise FindingError(finding(
                    MIXED_TURN_WEIGHTS.code,
                    f"messages {before + 1}-{after - 1} are consecutive assistant messages with different weights, "
                    "rendered as one model turn: their tokens cannot be told apart",
                    "give consecutive assistant messages the same weight, or merge them into one message",
                ))
            if flags != {False}:
                kept.append((start, end))
        for i, region in seps:
            if messages[i].get("train") and region is not None:
                close = region[1] + len(END_OF_TURN) if text.startswith(END_OF_TURN, region[1]) else region[1]
                kept.append((region[0], close))
        return sorted(kept)

    def encode(self, conv: ConversationLike) -> dict[str, Any]:
        """One training example: processor outputs (no batch dimension on per-token keys) plus labels.

        Per-token keys (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels``) are 1-D;
        media keys keep the processor's one-row-per-image/clip layout. Also ``truncated`` (bool),
        ``full_length`` (tokens before truncation) and ``num_supervised`` (labelled tokens; the first token
        is never labelled, nothing predicts it). Truncation keeps the start and never cuts a media block: a
        block the cut would split is dropped whole, with its media and every later one. A media part that
        gives no token (audio too short for one frame) is G4T313, named by the conversation's ``source``.
        """
        messages, _ = _messages_and_tools(conv)
        where = getattr(conv, "source", None) or (conv.get("source") if isinstance(conv, Mapping) else None)
        text, spans = self.render(conv)
        images, audios, videos, names = self._load_media(messages, text, where)

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain_ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        if self.train_on == "assistant":
            plain_mask = [_starts_in(start, spans) for start, _ in offsets]
        else:
            plain_mask = [True] * len(plain_ids)

        out = self._process(text, images, audios, videos)
        input_ids = out["input_ids"]
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise _alignment_error(f"processor returned input_ids of shape {tuple(input_ids.shape)} for one text")
        seq_len = input_ids.shape[1]
        expanded = input_ids[0].tolist()
        mask, blocks = self._align(plain_ids, plain_mask, expanded, [len(frames) for frames, _ in videos])
        _check_blocks_not_empty(blocks, names, audios, where, self.sampling_rate)

        labels = torch.tensor(expanded, dtype=torch.long)
        keep = torch.tensor(mask, dtype=torch.bool)
        keep &= ~torch.isin(labels, torch.tensor(sorted(self.media_token_ids), dtype=torch.long))
        keep &= labels != self.pad_token_id
        keep[0] = False
        labels = torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))

        example: dict[str, Any] = {}
        for key, value in out.items():
            if not torch.is_tensor(value):
                continue
            if key not in _MEDIA_KEYS and value.ndim >= 2 and value.shape[0] == 1 and value.shape[1] == seq_len:
                example[key] = value[0]
            else:
                example[key] = value
        example["labels"] = labels

        truncated = seq_len > self.max_seq_len
        if truncated:
            example = self._truncate(example, blocks, seq_len)
        example["truncated"] = truncated
        example["full_length"] = seq_len
        example["num_supervised"] = int((example["labels"] != IGNORE_INDEX).sum())
        return example

    def _process(self, text: str, images: list[Any], audios: list[np.ndarray],
                 videos: list[tuple[np.ndarray, Any]]) -> dict[str, Any]:
        """The processor's outputs for one rendered text and its media (a batch of one).

        Videos go in as their sampled frames with their metadata (the fps and frame indices the processor
        writes the timestamps from), so the processor does not sample them again.
        """
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            kwargs["images"] = [images]
        if audios:
            kwargs["audio"] = audios
        if videos:
            kwargs["videos"] = [frames for frames, _ in videos]
            kwargs["video_metadata"] = [metadata for _, metadata in videos]
            kwargs["do_sample_frames"] = False
        return dict(self.processor(**kwargs))

    def encode_prompt(self, conv: ConversationLike) -> tuple[dict[str, torch.Tensor], str]:
        """Model inputs (a batch of one) for generating ``conv``'s last assistant turn, and that turn's text.

        The prompt is every message before the last assistant turn, rendered as the official
        template renders it with ``add_generation_prompt``, with its images and audio.
        """
        messages, tools = _messages_and_tools(conv)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise ValueError("the conversation has no assistant turn after a prompt")
        inputs, _ = self.encode_generation(messages[:last], tools=tools, source=getattr(conv, "source", None))
        answer = messages[last].get("content")
        if isinstance(answer, list):
            answer = "".join(p.get("text", "") for p in answer if isinstance(p, Mapping))
        return inputs, str(answer or "")

    def encode_generation(self, prompt: list[dict], *, tools: list[dict] | None = None, source: str | None = None
                          ) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """Model inputs (a batch of one, no padding) that ask the model for its next turn after ``prompt``, rendered
        as the official template renders it with ``add_generation_prompt`` (and ``chat_kwargs``: thinking), and the
        loaded images in order."""
        kwargs = {**dict(self.tokenizer.special_tokens_map), **self.chat_kwargs}
        text = render(prompt, revision=self.revision, tools=tools, add_generation_prompt=True, **kwargs)
        images, audios, videos, _ = self._load_media(prompt, text, source)
        return {k: v for k, v in self._process(text, images, audios, videos).items() if torch.is_tensor(v)}, images

    def _align(
        self, plain: list[int], plain_mask: list[bool], expanded: list[int], video_frames: Sequence[int] = ()
    ) -> tuple[list[bool], list[tuple[int, int, str]]]:
        """Map the unexpanded token mask onto the processor's ids; return it and the media blocks.

        ``video_frames`` are the sampled frame counts of the videos in order; a video's block spans all its
        frames with their timestamps.
        """
        mask = [False] * len(expanded)
        blocks: list[tuple[int, int, str]] = []
        j = 0
        for i, token in enumerate(plain):
            if token in self._blocks:
                begin, end, kind = self._blocks[token]
                if kind == "video":
                    index = sum(b[2] == "video" for b in blocks)
                    if index >= len(video_frames):
                        raise _alignment_error(f"video placeholder at text token {i} has no video")
                    start = j
                    for _ in range(video_frames[index]):
                        j = self._frame_end(expanded, j, token, begin, end)
                    blocks.append((start, j, kind))
                    continue
                if j >= len(expanded) or expanded[j] != begin:
                    raise _alignment_error(
                        f"placeholder {token} at text token {i} is not expanded into a {kind} block at id {j} "
                        f"(found {expanded[j] if j < len(expanded) else 'end of sequence'})"
                    )
                k = j + 1
                while k < len(expanded) and expanded[k] == token:
                    k += 1
                if k >= len(expanded) or expanded[k] != end:
                    raise _alignment_error(f"{kind} block starting at id {j} has no end token")
                blocks.append((j, k + 1, kind))
                j = k + 1
                continue
            if j >= len(expanded) or expanded[j] != token:
                raise _alignment_error(
                    f"text token {i} (id {token}) differs from processor id {j} "
                    f"({expanded[j] if j < len(expanded) else 'end of sequence'})"
                )
            mask[j] = plain_mask[i]
            j += 1
        if j != len(expanded):
            raise _alignment_error(f"processor output has {len(expanded) - j} ids beyond the rendered text")
        return mask, blocks

    def _frame_end(self, expanded: list[int], j: int, token: int, begin: int, end: int) -> int:
        """Index after the video frame starting at ``j``: timestamp text, ``begin``, ``token``s, ``end``."""
        k = j
        while k < len(expanded) and k - j < _MAX_TIMESTAMP_TOKENS and expanded[k] not in self.media_token_ids:
            k += 1
        if k >= len(expanded) or expanded[k] != begin:
            raise _alignment_error(f"no video frame block after the timestamp at id {j}")
        k += 1
        while k < len(expanded) and expanded[k] == token:
            k += 1
        if k >= len(expanded) or expanded[k] != end:
            raise _alignment_error(f"video frame block at id {j} has no end token")
        return k + 1

    def _truncate(self, example: dict[str, Any], blocks: list[tuple[int, int, str]], seq_len: int) -> dict[str, Any]:
        cut = self.max_seq_len
        for start, end, _ in blocks:
            if start < cut < end:
                cut = start
                break
        kept = dict.fromkeys(MODALITIES, 0)
        for _, end, kind in blocks:
            if end <= cut:
                kept[kind] += 1
        result: dict[str, Any] = {}
        for key, value in example.items():
            if key in _MEDIA_KEYS:
                n = kept[_MEDIA_KEYS[key]]
                if key in _PER_FRAME:
                    n = int(example["num_frames_per_video"][:n].sum())
                if n:
                    result[key] = value[:n]
            elif torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == seq_len:
                result[key] = value[:cut]
            elif torch.is_tensor(value) and any(start >= cut for start, _, _ in blocks):
                raise FindingError(finding(
                    LABEL_ALIGNMENT.code,
                    f"cannot truncate processor output {key!r} of shape {tuple(value.shape)} consistently",
                    "raise max_seq_len so the example fits, or shorten the conversation",
                ))
            else:
                result[key] = value
        return result

    def _load_media(self, messages: Sequence[Mapping[str, Any]], text: str, where: str | None = None
                    ) -> tuple[list[Any], list[np.ndarray], list[tuple[np.ndarray, Any]], dict[str, list[str]]]:
        """The images, audio clips and videos (sampled frames, metadata) of ``messages`` in order, and what to
        call each in a finding."""
        images: list[Any] = []
        audios: list[np.ndarray] = []
        videos: list[tuple[np.ndarray, Any]] = []
        names: dict[str, list[str]] = {kind: [] for kind in MODALITIES}
        kinds = {b[2] for b in self._blocks.values()}
        at = f"{where}: " if where else ""
        for message in messages:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind in ("image", "image_url"):
                    images.append(_load_image(part, at))
                    names["image"].append(_media_name(part, "image"))
                elif kind in ("audio", "input_audio"):
                    if "audio" not in kinds:
                        raise FindingError(finding(
                            MEDIA_UNREADABLE.code, f"{at}the conversation has audio but the processor has no audio "
                            "token", "use a model with an audio tower (E2B, E4B) or drop the audio parts",
                        ))
                    audios.append(_load_audio(part, at, self.sampling_rate))
                    names["audio"].append(_media_name(part, "audio"))
                elif kind == "video":
                    if "video" not in kinds:
                        raise FindingError(finding(
                            MEDIA_UNREADABLE.code, f"{at}the conversation has video but the processor has no video "
                            "processor or video token", "use the model's full processor (AutoProcessor), or drop "
                            "the video parts",
                        ))
                    videos.append(_load_video(part, at, self.video_sampling))
                    names["video"].append(_media_name(part, "video"))
        placeholders = {
            "image": (len(images), text.count(str(getattr(self.processor, "image_token", "<|image|>")))),
        }
        for modality, found in (("audio", audios), ("video", videos)):
            token = getattr(self.processor, f"{modality}_token", None)
            if token:
                placeholders[modality] = (len(found), text.count(token))
        for kind, (parts, rendered) in placeholders.items():
            if parts != rendered:
                raise FindingError(finding(
                    MEDIA_MISMATCH.code,
                    f"{at}the conversation has {parts} {kind} part(s) but the rendered text has {rendered} {kind} "
                    "placeholder(s)",
                    f"remove literal placeholder tokens from message text, and put {kind} parts only where the "
                    f"chat template {self.revision} renders them",
                ))
        return images, audios, videos, names

    # ----------------------------------------------------------------- collate
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad (right) and stack encoded or packed examples into one batch for the model.

        Keeps every processor key. If any example carries ``position_ids`` (``pack`` rows), the batch
        is in packed form: ``position_ids`` are kept (padding gets its own run restarting at 0) and
        there is no ``attention_mask``, so transformers detects the packed sequences from positions.
        """
        if not examples:
            raise ValueError("collate needs at least one example")
        packed = any("position_ids" in ex for ex in examples)
        lengths = [int(ex["input_ids"].shape[0]) for ex in examples]
        width = max(lengths)
        token_keys: list[str] = []
        media_keys: list[str] = []
        for ex in examples:
            for key, value in ex.items():
                if key in META_KEYS or not torch.is_tensor(value):
                    continue
                target = media_keys if key in _MEDIA_KEYS or value.shape[:1] != ex["input_ids"].shape[:1] else token_keys
                if key not in target:
                    target.append(key)
        if packed and "attention_mask" in token_keys:
            token_keys.remove("attention_mask")
        if any(_MEDIA_KEYS.get(k) for k in media_keys) and "mm_token_type_ids" not in token_keys:
            raise FindingError(finding(
                MM_TYPE_IDS_MISSING.code,
                "the batch has image or audio inputs but no mm_token_type_ids",
                "keep every key the Gemma 4 processor returns (encode with Gemma4Batcher); without "
                "mm_token_type_ids image tokens get a causal mask on 26B/31B",
            ))
        for ex in examples:
            if "mm_token_type_ids" not in ex and any(k in ex for k in _MEDIA_KEYS):
                raise FindingError(finding(
                    MM_TYPE_IDS_MISSING.code, "an example with media has no mm_token_type_ids",
                    "encode examples with Gemma4Batcher, which keeps every processor output",
                ))

        batch: dict[str, torch.Tensor] = {}
        for key in token_keys:
            rows = []
            for ex, length in zip(examples, lengths):
                value = ex.get(key)
                if value is None:
                    if key == "position_ids":
                        value = torch.arange(length)
                    elif key == "attention_mask":
                        value = torch.ones(length, dtype=torch.long)
                    else:
                        value = torch.zeros(length, dtype=_dtype_of(examples, key))
                pad = width - length
                if pad:
                    if key == "position_ids":
                        tail = torch.arange(pad, dtype=value.dtype)
                    else:
                        fill = self.pad_token_id if key == "input_ids" else _PER_TOKEN_PAD.get(key, 0)
                        tail = torch.full((pad, *value.shape[1:]), fill, dtype=value.dtype)
                    value = torch.cat([value, tail])
                rows.append(value)
            batch[key] = torch.stack(rows)
        for key in media_keys:
            parts = [ex[key] for ex in examples if key in ex]
            batch[key] = _concat_padded(parts, _media_pad_value(key))
        return batch

    __call__ = collate

    count_supervised = staticmethod(count_supervised)

    # -------------------------------------------------------------------- pack
    def pack(self, examples: list[dict[str, Any]], max_len: int) -> list[dict[str, Any]]:
        """Pack text-only examples into rows of at most ``max_len`` tokens (first fit, in order).

        Each row has ``position_ids`` restarting at 0 per sequence, no ``attention_mask``, and the
        first label of every sequence set to -100; ``collate`` turns rows into a packed batch that
        transformers' sdpa/eager masks isolate per sequence. Multimodal examples are not packed:
        each becomes a row of its own in the same form. An example longer than ``max_len`` is
        finding G4T314.
        """
        rows: list[list[dict[str, Any]]] = []
        used: list[int] = []
        singles: list[tuple[int, dict[str, Any]]] = []
        order: list[tuple[str, int]] = []
        for ex in examples:
            length = int(ex["input_ids"].shape[0])
            if length > max_len:
                raise FindingError(finding(
                    PACK_TOO_LONG.code, f"an example of {length} tokens does not fit rows of {max_len}",
                    "pack with max_len >= the batcher's max_seq_len",
                ))
            if _is_multimodal(ex):
                singles.append((len(order), ex))
                order.append(("single", len(singles) - 1))
                continue
            for r, size in enumerate(used):
                if size + length <= max_len:
                    rows[r].append(ex)
                    used[r] += length
                    break
            else:
                rows.append([ex])
                used.append(length)
                order.append(("row", len(rows) - 1))
        result = []
        for kind, index in order:
            if kind == "row":
                result.append(_join(rows[index]))
            else:
                result.append(_join([singles[index][1]]))
        return result


# ---------------------------------------------------------------------------- helpers
def _resolve_revision(processor: Any, revision: str | None) -> str:
    known = ", ".join(REVISIONS)
    fix = (
        f"pass revision= one of {known} (the official Gemma 4 chat-template revision the model was released "
        "with; `gemma4_tune.data.chat.detect_revision` names the revision of an unmodified official "
        "template), or restore the model's official chat_template.jinja"
    )
    if revision is None:
        template = getattr(processor, "chat_template", None) or getattr(
            getattr(processor, "tokenizer", None), "chat_template", None
        )
        if isinstance(template, Mapping):
            template = template.get("default")
        detected = detect_revision(template) if isinstance(template, str) else None
        if detected is None:
            what = "no chat template" if not template else "a chat template that is no official Gemma 4 revision"
            raise FindingError(finding(UNKNOWN_REVISION.code, f"the processor has {what}", fix))
        return detected
    if revision not in REVISIONS:
        raise FindingError(finding(UNKNOWN_REVISION.code, f"unknown chat template revision {revision!r}", fix))
    return revision


def _messages_and_tools(conv: Any) -> tuple[list[dict], list[dict] | None]:
    if isinstance(conv, Mapping):
        messages, tools = conv["messages"], conv.get("tools")
    else:
        messages, tools = conv.messages, getattr(conv, "tools", None)
    return [_plain_text_content(m) for m in messages], tools


def _plain_text_content(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message whose content is one text part (or none) gets it back as a string.

    The official templates render string content and a one-part list differently for
    system and tool turns (some revisions print the Python list), so text-only content is
    rendered the way users write it and the templates expect it.
    """
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content) \
            and len(content) <= 1:
        return {**message, "content": content[0]["text"] if content else ""}
    return dict(message)


def _alignment_error(detail: str) -> FindingError:
    return FindingError(finding(
        LABEL_ALIGNMENT.code,
        f"the processor's token ids do not match the rendered conversation: {detail}",
        "this is a gemma4-tune bug; report it with the conversation, the model's tokenizer and processor config",
    ))


def _starts_in(start: int, spans: Sequence[tuple[int, int]]) -> bool:
    """Whether a token starting at character ``start`` lies in one of the sorted, disjoint ``spans``."""
    i = bisect.bisect_right(spans, (start, math.inf)) - 1
    return i >= 0 and spans[i][0] <= start < spans[i][1]


def _is_multimodal(ex: Mapping[str, Any]) -> bool:
    if any(key in ex for key in _MEDIA_KEYS):
        return True
    mm = ex.get("mm_token_type_ids")
    return bool(mm is not None and (mm != 0).any())


def _join(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One packed row: per-token keys concatenated, positions restarting, first labels ignored."""
    row: dict[str, Any] = {}
    lengths = [int(p["input_ids"].shape[0]) for p in parts]
    for key, value in parts[0].items():
        if key in META_KEYS or key in ("attention_mask", "position_ids") or not torch.is_tensor(value):
            continue
        if key in _MEDIA_KEYS or value.shape[:1] != parts[0]["input_ids"].shape[:1]:
            row[key] = value
            continue
        row[key] = torch.cat([p[key] for p in parts])
    row["position_ids"] = torch.cat([torch.arange(n) for n in lengths])
    labels = row["labels"].clone()
    starts = np.cumsum([0, *lengths[:-1]])
    labels[torch.as_tensor(starts)] = IGNORE_INDEX
    row["labels"] = labels
    row["truncated"] = any(bool(p.get("truncated", False)) for p in parts)
    row["num_supervised"] = int((labels != IGNORE_INDEX).sum())
    row["num_sequences"] = len(parts)
    return row


def _dtype_of(examples: list[dict[str, Any]], key: str) -> torch.dtype:
    for ex in examples:
        if key in ex:
            return ex[key].dtype
    return torch.long


def _media_pad_value(key: str) -> Any:
    if key.endswith("position_ids"):
        return -1
    if key.endswith("_mask"):
        return False
    return 0


def _concat_padded(parts: list[torch.Tensor], fill: Any) -> torch.Tensor:
    """Concatenate along dim 0, padding the other dims at the end to the largest (as the processor does)."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
    padded = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            out = torch.full((p.shape[0], *shape), fill, dtype=p.dtype)
            out[(slice(None), *(slice(0, s) for s in p.shape[1:]))] = p
            p = out
        padded.append(p)
    return torch.cat(padded)


def _media_value(part: Mapping[str, Any], kind: str) -> Any:
    value = part.get("path") or part.get(kind) or part.get("url")
    return (value.get("path") or value.get("url")) if isinstance(value, Mapping) else value


def _media_name(part: Mapping[str, Any], kind: str) -> str:
    """What a finding calls a media part: its file, or ``(inline)``."""
    value = _media_value(part, kind)
    return str(value) if isinstance(value, (str, Path)) else "(inline)"


def _media_path(part: Mapping[str, Any], kind: str, at: str) -> Path:
    value = _media_value(part, kind)
    if not isinstance(value, (str, Path)):
        raise FindingError(finding(
            MEDIA_UNREADABLE.code, f"{at}a {kind} part has no file path: {dict(part)!r:.200}",
            f'give every {kind} part a local file path: {{"type": "{kind}", "path": "/abs/file"}}',
        ))
    text = str(value)
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text)
    if not path.is_file():
        raise FindingError(finding(
            MEDIA_UNREADABLE.code, f"{at}{kind} file not found: {text}", "fix the path or drop the record",
        ))
    return path


def _load_image(part: Mapping[str, Any], at: str = "") -> Any:
    from PIL import Image

    inline = part.get("image")
    if isinstance(inline, Image.Image):
        image, name = inline.convert("RGB"), "an inline image"
    else:
        path = _media_path(part, "image", at)
        name = f"image {path}"
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as exc:  # PIL raises many types for bad files
            raise FindingError(finding(
                MEDIA_UNREADABLE.code, f"{at}cannot read image {path}: {exc}",
                "convert it to PNG or JPEG, or drop the record",
            )) from exc
    if not image.width or not image.height:
        raise FindingError(finding(
            MEDIA_UNREADABLE.code, f"{at}{name} is empty ({image.width}x{image.height} pixels)",
            "replace it with the real image, or drop the record",
        ))
    return image


def _load_audio(part: Mapping[str, Any], at: str, sampling_rate: int) -> np.ndarray:
    inline = part.get("array")
    if isinstance(inline, np.ndarray):
        rate = int(part.get("sampling_rate", sampling_rate))
        return resample(np.asarray(inline, dtype=np.float32), rate, sampling_rate)
    path = _media_path(part, "audio", at)
    try:
        return load_audio(path, sampling_rate)
    except MediaError as exc:
        raise FindingError(finding(
            MEDIA_UNREADABLE.code, f"{at}cannot read audio {path}: {exc}",
            "re-encode it (WAV, FLAC or MP3; FFmpeg decodes the file through PyAV), or drop the record",
        )) from exc


def _load_video(part: Mapping[str, Any], at: str, sampling: Mapping[str, Any]) -> tuple[np.ndarray, Any]:
    path = _media_path(part, "video", at)
    try:
        return load_video(path, **sampling)
    except MediaError as exc:
        raise FindingError(finding(
            MEDIA_UNREADABLE.code, f"{at}cannot read video {path}: {exc}",
            "re-encode it (MP4 with H.264; FFmpeg decodes the file through PyAV), or drop the record",
        )) from exc


def _check_blocks_not_empty(blocks: list[tuple[int, int, str]], names: dict[str, list[str]],
                            audios: list[np.ndarray], where: str | None, sampling_rate: int) -> None:
    """G4T313 for a media part the processor turned into no token (a WAV of 0 samples, a clip under one frame)."""
    seen = dict.fromkeys(MODALITIES, 0)
    for start, end, kind in blocks:
        index = seen[kind]
        seen[kind] += 1
        if end - start > 2:
            continue
        what = names[kind][index] if index < len(names[kind]) else ""
        detail = ""
        if kind == "audio" and index < len(audios):
            n = int(audios[index].size)
            detail = (f": {n} samples ({1000 * n / sampling_rate:.0f} ms at {sampling_rate / 1000:g} kHz), less "
                      "than one audio frame")
        raise FindingError(finding(
            MEDIA_UNREADABLE.code, f"{where + ': ' if where else ''}{kind} {what} gives no {kind} token{detail}",
            "replace it with the real recording (at least 25 ms), or drop the record" if kind == "audio"
            else "replace it with the real image, or drop the record",
        ))
