"""Gemma4Batcher: exact labels, processor-key fidelity, media batching, truncation, packing."""

from __future__ import annotations

import struct
import wave
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gemma4_tune.data.collate import (
    IGNORE_INDEX,
    Gemma4Batcher,
    count_supervised,
)
from gemma4_tune.data.media import load_audio, resample
from gemma4_tune.findings import FindingError


@dataclass(frozen=True)
class Conv:
    """Same shape as gemma4_tune.data.records.Conversation."""

    messages: list[dict]
    tools: list[dict] | None = None
    source: str = "test"

    def _parts(self, kind: str) -> list[str]:
        return [p["path"] for m in self.messages for p in m["content"] if p.get("type") == kind]

    @property
    def images(self) -> list[str]:
        return self._parts("image")

    @property
    def audios(self) -> list[str]:
        return self._parts("audio")


def T(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


TOOLS = [{"type": "function", "function": {
    "name": "get_time", "description": "Time now",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}


def agent_conv() -> Conv:
    return Conv([
        {"role": "system", "content": T("SYSTEXT")},
        {"role": "user", "content": T("USERONE")},
        {"role": "assistant", "content": T("ASSISTONE")},
        {"role": "user", "content": T("USERTWO")},
        {"role": "assistant", "content": T(""), "reasoning_content": "THINKA", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": T("TOOLRESULT")},
        {"role": "assistant", "content": T("ASSISTTWO"), "reasoning_content": "THINKB"},
    ], TOOLS)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def e2b_dir(tiny_models) -> Path:
    return tiny_models["e2b"]


@pytest.fixture(scope="session")
def b31_dir(tiny_models) -> Path:
    return tiny_models["31b"]


@pytest.fixture(scope="session")
def e2b_processor(e2b_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(e2b_dir))


@pytest.fixture(scope="session")
def b31_processor(b31_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(b31_dir))


@pytest.fixture(scope="session")
def e2b_model(e2b_dir):
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(
        str(e2b_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def b31_models(b31_dir):
    from transformers import Gemma4ForConditionalGeneration

    return {impl: Gemma4ForConditionalGeneration.from_pretrained(
        str(b31_dir), dtype=torch.float32, attn_implementation=impl).eval() for impl in ("sdpa", "eager")}


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, str]:
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    paths = {}
    for name, shape in {"img_a": (48, 64, 3), "img_b": (90, 40, 3), "img_c": (30, 30, 3)}.items():
        paths[name] = str(root / f"{name}.png")
        Image.fromarray((rng.random(shape) * 255).astype("uint8")).save(paths[name])
    for name, n in {"aud_a": 8000, "aud_b": 14000}.items():
        paths[name] = str(root / f"{name}.wav")
        _write_pcm16(paths[name], (rng.standard_normal(n) * 3000).astype("<i2"), 16000, 1)
    return paths


def _write_pcm16(path, samples: np.ndarray, rate: int, channels: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def image_conv(media, *, image="img_a", answer="It is noise.") -> Conv:
    return Conv([
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "path": media[image]},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": T(answer)},
    ])


def audio_conv(media, *, audio="aud_a") -> Conv:
    return Conv([
        {"role": "user", "content": [{"type": "audio", "path": media[audio]}, {"type": "text", "text": "Transcribe."}]},
        {"role": "assistant", "content": T("Static hiss.")},
    ])


def text_conv(i: int, words: int = 6) -> Conv:
    body = " ".join(f"w{i}x{k}" for k in range(words))
    return Conv([
        {"role": "system", "content": T(f"System {i}.")},
        {"role": "user", "content": T(f"Question {i}: {body}?")},
        {"role": "assistant", "content": T(f"Answer {i}: {body}.")},
        {"role": "user", "content": T("More?")},
        {"role": "assistant", "content": T(f"Also {i}.")},
    ])


def _runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    if current:
        runs.append(current)
    return runs


def _media_ids(processor) -> set[int]:
    tok = processor.tokenizer
    names = ["image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token", "video_token"]
    return {tok.convert_tokens_to_ids(getattr(processor, n)) for n in names}


# ---------------------------------------------------------------- no model needed
def test_unknown_revision_is_g4t310():
    fake = SimpleNamespace(chat_template="{{ messages }}", tokenizer=SimpleNamespace(chat_template=None))
    with pytest.raises(FindingError) as err:
        Gemma4Batcher(fake)
    f = err.value.findings[0]
    assert f.code == "G4T310"
    assert "v1" in f.fix and "v5" in f.fix and "revision=" in f.fix
    with pytest.raises(FindingError) as err:
        Gemma4Batcher(SimpleNamespace(chat_template=None), revision="v9")
    assert err.value.findings[0].code == "G4T310"
    with pytest.raises(FindingError) as err:
        Gemma4Batcher(SimpleNamespace(chat_template=None), revision="v5", train_on="users")
    assert err.value.findings[0].code == "G4T316"


def test_wav_decoded_to_mono_and_resampled(tmp_path):
    t = np.arange(8000) / 8000.0
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype("<i2")
    stereo = np.stack([tone, tone // 2], axis=1).reshape(-1)
    _write_pcm16(tmp_path / "s.wav", stereo, 8000, 2)
    samples = load_audio(tmp_path / "s.wav", 8000)
    assert samples.dtype == np.float32 and samples.shape == (8000,)
    np.testing.assert_allclose(samples, (tone + tone // 2) / 2 / 32768.0, atol=1e-6)  # mono: the channels' mean
    up = resample((tone / 32768.0).astype(np.float32), 8000, 16000)
    assert up.shape == (16000,) and up.dtype == np.float32
    ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000.0) * 10000 / 32768.0
    assert np.abs(up[200:-200] - ref[200:-200]).max() < 0.01
    # IEEE float WAV (format 3), which the stdlib wave module cannot read
    data = np.linspace(-0.5, 0.5, 100, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    (tmp_path / "f.wav").write_bytes(b"RIFF" + struct.pack("<I", len(riff)) + riff)
    np.testing.assert_allclose(load_audio(tmp_path / "f.wav", 16000), np.linspace(-0.5, 0.5, 100, dtype=np.float32))
    assert np.abs(load_audio(tmp_path / "s.wav", 16000)[200:-200] - ref[200:-200] * 0.75).max() < 0.01


# ---------------------------------------------------------------- labels
@pytest.mark.slow
@pytest.mark.parametrize("chat_kwargs", [{}, {"enable_thinking": True}])
def test_assistant_labels_are_exactly_the_model_turns(e2b_processor, chat_kwargs):
    batcher = Gemma4Batcher(e2b_processor, chat_kwargs=chat_kwargs)
    conv = agent_conv()
    text, spans = batcher.render(conv)
    # records.py stores every content as a list of parts; a turn that is one text part renders as the
    # official template renders the string the user wrote (a one-part list differs in system/tool turns).
    as_written = [{**m, "content": m["content"][0]["text"]} if len(m.get("content") or []) == 1
                  and m["content"][0].get("type") == "text" else m for m in conv.messages]
    assert text == e2b_processor.apply_chat_template(as_written, tools=conv.tools, tokenize=False, **chat_kwargs)
    ex = batcher.encode(conv)
    tok = e2b_processor.tokenizer
    decoded = [tok.decode(run) for run in _runs(ex["labels"])]
    assert decoded == [text[s:e] for s, e in spans]
    joined = "".join(decoded)
    assert decoded[0] == "ASSISTONE<turn|>"
    assert decoded[-1].endswith("ASSISTTWO<turn|>")
    for rendered in ("THINKA", "THINKB", "<|tool_call>call:get_time{tz:", "<tool_call|>"):
        assert rendered in joined
    for foreign in ("SYSTEXT", "USERONE", "USERTWO", "TOOLRESULT", "<|turn>", "model\n", "user"):
        assert foreign not in joined
    assert ex["num_supervised"] == int((ex["labels"] != IGNORE_INDEX).sum()) > 0
    assert ex["truncated"] is False
    assert ex["labels"][0] == IGNORE_INDEX


@pytest.mark.slow
def test_train_on_all_labels_everything_but_media(e2b_processor, media):
    batcher = Gemma4Batcher(e2b_processor, train_on="all")
    conv = Conv([
        {"role": "system", "content": T("Be brief.")},
        {"role": "user", "content": [{"type": "image", "path": media["img_a"]}, {"type": "text", "text": "What?"},
                                     {"type": "audio", "path": media["aud_a"]}]},
        {"role": "assistant", "content": T("Noise.")},
    ])
    ex = batcher.encode(conv)
    ids, labels = ex["input_ids"], ex["labels"]
    is_media = torch.isin(ids, torch.tensor(sorted(_media_ids(e2b_processor))))
    assert is_media.sum() > 20
    expected = torch.where(is_media, IGNORE_INDEX, ids)
    expected[0] = IGNORE_INDEX  # nothing predicts the first token
    assert torch.equal(labels, expected)
    assert ex["num_supervised"] == int((~is_media).sum()) - 1


# ---------------------------------------------------------------- media
@pytest.mark.slow
def test_media_tokens_never_labelled_and_typed(e2b_processor, media):
    conv = Conv([
        {"role": "user", "content": [{"type": "image", "path": media["img_a"]}, {"type": "text", "text": "and"},
                                     {"type": "image", "path": media["img_b"]}, {"type": "audio", "path": media["aud_b"]},
                                     {"type": "text", "text": "Describe."}]},
        # media in an assistant turn stays unlabelled too
        {"role": "assistant", "content": [{"type": "text", "text": "Two images"},
                                          {"type": "image", "path": media["img_c"]}, {"type": "text", "text": "done."}]},
    ])
    for train_on in ("assistant", "all"):
        ex = Gemma4Batcher(e2b_processor, train_on=train_on).encode(conv)
        ids, labels, mm = ex["input_ids"], ex["labels"], ex["mm_token_type_ids"]
        media_mask = torch.isin(ids, torch.tensor(sorted(_media_ids(e2b_processor))))
        assert (labels[media_mask] == IGNORE_INDEX).all()
        assert torch.equal(mm == 1, ids == e2b_processor.image_token_id)  # image soft tokens only
        assert torch.equal(mm == 3, ids == e2b_processor.audio_token_id)  # audio soft tokens (processor: 3)
        assert set(mm.unique().tolist()) == {0, 1, 3}
        assert ex["pixel_values"].shape[0] == 3 and ex["input_features"].shape[0] == 1
        soft = (ex["image_position_ids"][..., 0] != -1).sum(-1) // e2b_processor.image_processor.pooling_kernel_size ** 2
        assert int(soft.sum()) == int((ids == e2b_processor.image_token_id).sum())
        if train_on == "assistant":  # the image block splits the model turn's labels in two
            runs = [e2b_processor.tokenizer.decode(run) for run in _runs(labels)]
            assert runs == ["Two images", "done.<turn|>"]


@pytest.mark.slow
def test_collate_mirrors_processor_batching(e2b_processor, media):
    batcher = Gemma4Batcher(e2b_processor)
    convs = [
        Conv([{"role": "user", "content": [{"type": "image", "path": media["img_a"]},
                                           {"type": "audio", "path": media["aud_a"]}, {"type": "text", "text": "Hi"}]},
              {"role": "assistant", "content": T("Short.")}]),
        Conv([{"role": "user", "content": [{"type": "image", "path": media["img_b"]},
                                           {"type": "image", "path": media["img_c"]},
                                           {"type": "audio", "path": media["aud_b"]},
                                           {"type": "text", "text": "Compare these two long pictures please"}]},
              {"role": "assistant", "content": T("A somewhat longer answer than the first.")}]),
    ]
    examples = [batcher.encode(c) for c in convs]
    batch = batcher.collate(examples)

    from PIL import Image

    texts = [batcher.render(c)[0] for c in convs]
    images = [[Image.open(media["img_a"]).convert("RGB")],
              [Image.open(media["img_b"]).convert("RGB"), Image.open(media["img_c"]).convert("RGB")]]
    audio = [load_audio(media["aud_a"], 16000), load_audio(media["aud_b"], 16000)]
    ref = e2b_processor(text=texts, images=images, audio=audio, return_tensors="pt", padding=True,
                        padding_side="right", add_special_tokens=False)
    assert set(ref.keys()) <= set(batch.keys())
    assert set(batch.keys()) == set(ref.keys()) | {"labels"}
    for key in ref:
        assert batch[key].shape == ref[key].shape, key
        assert torch.equal(batch[key], ref[key].to(batch[key].dtype)), key
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert count_supervised(batch) == sum(ex["num_supervised"] for ex in examples)


@pytest.mark.slow
def test_mixed_batches_forward_finite_loss(e2b_processor, e2b_model, b31_processor, b31_models, media):
    batcher = Gemma4Batcher(e2b_processor)
    image_ex = batcher.encode(image_conv(media))
    text_ex = batcher.encode(text_conv(0))
    audio_ex = batcher.encode(audio_conv(media))
    for group in ([image_ex, text_ex], [audio_ex, text_ex], [text_ex, image_ex, audio_ex]):
        batch = batcher.collate(group)
        assert "mm_token_type_ids" in batch
        with torch.no_grad():
            out = e2b_model(**batch, use_cache=False)
        assert torch.isfinite(out.loss)

    # 31B-shaped: image tokens attend bidirectionally only through mm_token_type_ids (catalog row 10)
    b31 = Gemma4Batcher(b31_processor)
    batch = b31.collate([b31.encode(image_conv(media)), b31.encode(text_conv(1))])
    model = b31_models["sdpa"]
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        assert torch.isfinite(out.loss)
        without = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}, use_cache=False)
    assert not torch.allclose(out.logits[0], without.logits[0])
    assert torch.allclose(out.logits[1], without.logits[1], atol=1e-5)
    with pytest.raises(FindingError) as err:
        b31.collate([{k: v for k, v in b31.encode(image_conv(media)).items() if k != "mm_token_type_ids"}])
    assert err.value.findings[0].code == "G4T315"


# ---------------------------------------------------------------- truncation
@pytest.mark.slow
def test_truncation_never_splits_a_media_block(e2b_processor, e2b_model, media):
    conv = Conv([
        {"role": "user", "content": [{"type": "text", "text": "First look at this one:"},
                                     {"type": "image", "path": media["img_a"]},
                                     {"type": "text", "text": "then listen"}, {"type": "audio", "path": media["aud_b"]},
                                     {"type": "text", "text": "and say."}]},
        {"role": "assistant", "content": T("A long answer about noise and hiss.")},
    ])
    full = Gemma4Batcher(e2b_processor).encode(conv)
    ids = full["input_ids"].tolist()
    boi = ids.index(e2b_processor.tokenizer.convert_tokens_to_ids(e2b_processor.boi_token))
    eoi = ids.index(e2b_processor.tokenizer.convert_tokens_to_ids(e2b_processor.eoi_token))
    boa = ids.index(e2b_processor.tokenizer.convert_tokens_to_ids(e2b_processor.boa_token))
    eoa = ids.index(e2b_processor.tokenizer.convert_tokens_to_ids(e2b_processor.eoa_token))
    assert full["truncated"] is False and boi < eoi < boa < eoa

    cases = {
        boi + 10: (boi, 0, 0),          # inside the image: cut before it, drop image and audio
        boa + 3: (boa, 1, 0),           # inside the audio: keep the image, drop the audio
        eoa + 4: (eoa + 4, 1, 1),       # after both: keep everything up to the cut
        boi: (boi, 0, 0),               # exactly at the block start
        eoi + 1: (eoi + 1, 1, 0),       # exactly after the image block
    }
    examples = []
    for max_len, (length, n_images, n_audio) in cases.items():
        ex = Gemma4Batcher(e2b_processor, max_seq_len=max_len).encode(conv)
        assert ex["truncated"] is True
        assert ex["input_ids"].shape[0] == length <= max_len
        assert torch.equal(ex["input_ids"], full["input_ids"][:length])
        assert torch.equal(ex["labels"], full["labels"][:length])
        assert ex["pixel_values"].shape[0] == n_images if n_images else "pixel_values" not in ex
        assert ex["input_features"].shape[0] == n_audio if n_audio else "input_features" not in ex
        kept = ex["input_ids"]
        for begin, end in ((e2b_processor.boi_token, e2b_processor.eoi_token),
                           (e2b_processor.boa_token, e2b_processor.eoa_token)):
            b_id, e_id = (e2b_processor.tokenizer.convert_tokens_to_ids(t) for t in (begin, end))
            assert int((kept == b_id).sum()) == int((kept == e_id).sum())
        assert ex["num_supervised"] == int((ex["labels"] != IGNORE_INDEX).sum())
        examples.append(ex)
    batch = Gemma4Batcher(e2b_processor).collate(examples)
    with torch.no_grad():
        out = e2b_model(**batch, use_cache=False)  # media rows and soft tokens still agree
    assert out.logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.slow
def test_media_findings(e2b_processor, media, tmp_path):
    batcher = Gemma4Batcher(e2b_processor)
    literal = Conv([{"role": "user", "content": T("A literal <|image|> token")},
                    {"role": "assistant", "content": T("Hm.")}])
    with pytest.raises(FindingError) as err:
        batcher.encode(literal)
    assert err.value.findings[0].code == "G4T312"
    missing = Conv([{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "nope.png")}]},
                    {"role": "assistant", "content": T("Hm.")}])
    with pytest.raises(FindingError) as err:
        batcher.encode(missing)
    assert err.value.findings[0].code == "G4T313"
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    bad = Conv([{"role": "user", "content": [{"type": "audio", "path": str(tmp_path / "bad.wav")}]},
                {"role": "assistant", "content": T("Hm.")}])
    with pytest.raises(FindingError) as err:
        batcher.encode(bad)
    assert err.value.findings[0].code == "G4T313"


# ---------------------------------------------------------------- packing
def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["31b-sdpa", "31b-eager", "e2b"])
@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_packed_loss_equals_unpacked(request, variant, train_on):
    if variant == "e2b":  # KV-shared layers, default attention (sdpa text, eager audio)
        model, processor = request.getfixturevalue("e2b_model"), request.getfixturevalue("e2b_processor")
    else:
        processor = request.getfixturevalue("b31_processor")
        model = request.getfixturevalue("b31_models")[variant.split("-")[1]]
    batcher = Gemma4Batcher(processor, train_on=train_on)
    # lengths straddle the tiny model's sliding window (32), so windows must restart per sequence
    examples = [batcher.encode(text_conv(i, words=w)) for i, w in enumerate([8, 3, 14, 5])]
    lengths = [int(ex["input_ids"].shape[0]) for ex in examples]
    max_len = lengths[0] + lengths[1] + 4
    rows = batcher.pack(examples, max_len)
    assert len(rows) >= 2 and all(int(r["input_ids"].shape[0]) <= max_len for r in rows)
    assert sum(r["num_sequences"] for r in rows) == 4
    assert any(r["num_sequences"] > 1 for r in rows)

    packed = batcher.collate(rows)
    assert "attention_mask" not in packed and "mm_token_type_ids" in packed
    # position_ids restart at 0 for every sequence, and for the padding after the last one (row 15)
    for r, row in enumerate(rows):
        pos = packed["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert len(starts) == row["num_sequences"] + (1 if len(pos) > row["input_ids"].shape[0] else 0)
        assert all(b == a + 1 or b == 0 for a, b in zip(pos, pos[1:]))
    unpacked = batcher.collate(examples)
    assert count_supervised(packed) == count_supervised(unpacked) == sum(ex["num_supervised"] for ex in examples)

    with torch.no_grad():
        out_u = model(**unpacked, use_cache=False)
        out_p = model(**packed, use_cache=False)
    n = count_supervised(unpacked)
    loss_u = _token_loss_sum(out_u.logits, unpacked["labels"]) / n
    loss_p = _token_loss_sum(out_p.logits, packed["labels"]) / n
    assert abs(loss_u.item() - loss_p.item()) < 1e-5
    assert abs(out_u.loss.item() - out_p.loss.item()) < 1e-5  # model's own (per-batch mean) loss
    # every packed sequence sees exactly what it sees alone
    matched = 0
    for r, row in enumerate(rows):
        pos = packed["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0 and i < row["input_ids"].shape[0]]
        for start, end in zip(starts, [*starts[1:], int(row["input_ids"].shape[0])]):
            ids = packed["input_ids"][r, start:end]
            (k,) = [k for k, ex in enumerate(examples) if torch.equal(ex["input_ids"], ids)]
            torch.testing.assert_close(out_p.logits[r, start:end], out_u.logits[k, : end - start],
                                       atol=1e-4, rtol=1e-4)  # fp32 sums in another order
            matched += 1
    assert matched == 4
    # negative control: an attention_mask switches transformers' packed-sequence detection off
    with torch.no_grad():
        leaky = model(**packed, attention_mask=torch.ones_like(packed["input_ids"]), use_cache=False)
    assert abs(_token_loss_sum(leaky.logits, packed["labels"]).item() / n - loss_p.item()) > 1e-4


@pytest.mark.slow
def test_pack_leaves_multimodal_examples_in_own_rows(b31_processor, b31_models, media):
    batcher = Gemma4Batcher(b31_processor)
    examples = [batcher.encode(text_conv(0)), batcher.encode(image_conv(media)), batcher.encode(text_conv(1)),
                batcher.encode(text_conv(2))]
    rows = batcher.pack(examples, 10_000)
    assert [r["num_sequences"] for r in rows] == [3, 1]
    assert "pixel_values" in rows[1] and "pixel_values" not in rows[0]
    assert torch.equal(rows[1]["position_ids"], torch.arange(rows[1]["input_ids"].shape[0]))
    packed, unpacked = batcher.collate(rows), batcher.collate(examples)
    assert torch.equal(packed["pixel_values"], unpacked["pixel_values"])
    model = b31_models["sdpa"]
    with torch.no_grad():
        out_p = model(**packed, use_cache=False)
        out_u = model(**unpacked, use_cache=False)
    n = count_supervised(unpacked)
    assert count_supervised(packed) == n
    loss_p = _token_loss_sum(out_p.logits, packed["labels"]) / n
    loss_u = _token_loss_sum(out_u.logits, unpacked["labels"]) / n
    assert abs(loss_p.item() - loss_u.item()) < 1e-5
    with pytest.raises(FindingError) as err:
        batcher.pack(examples, 10)
    assert err.value.findings[0].code == "G4T314"
