"""Users' data formats and files: each read into conversations, with the exact tokens it supervises (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gemma4_tune.data.collate import IGNORE_INDEX, Gemma4Batcher
from gemma4_tune.data.formats import ChatOptions
from gemma4_tune.data.records import load_conversations
from gemma4_tune.findings import FindingError, Severity


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def error_of(path: Path, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(FindingError) as info:
        load_conversations(path, **kwargs)
    (found,) = info.value.findings
    return found.code, found.message


@pytest.fixture(scope="module")
def batcher(tiny_models) -> Gemma4Batcher:
    from transformers import AutoProcessor

    return Gemma4Batcher(AutoProcessor.from_pretrained(str(tiny_models["e2b"])))


def supervised(batcher: Gemma4Batcher, conv: Any) -> list[str]:
    """The decoded runs of labelled tokens of one encoded conversation."""
    ex = batcher.encode(conv)
    runs: list[list[int]] = [[]]
    for token, label in zip(ex["input_ids"].tolist(), ex["labels"].tolist(), strict=True):
        if label != IGNORE_INDEX:
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    return [batcher.tokenizer.decode(run) for run in runs if run]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    return tmp_path / "blue.png"


# ------------------------------------------------------------------ formats and what they supervise
@pytest.mark.slow
def test_openai_weight_zero_turn_is_not_supervised(batcher, tmp_path):
    row = {"messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U1"},
                        {"role": "assistant", "content": "A1", "weight": 0}, {"role": "user", "content": "U2"},
                        {"role": "assistant", "content": "A2", "weight": 1}]}
    convs, report = load_conversations(write_jsonl(tmp_path / "ft.jsonl", [row]))
    assert report.format == "OpenAI chat" and report.turns_not_supervised == 1 and not report.findings
    assert supervised(batcher, convs[0]) == ["A2<turn|>"]


@pytest.mark.slow
def test_openai_tool_calls_and_tool_turns(batcher, tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    row = {"messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "content": "NOON"},
                        {"role": "assistant", "content": "It is noon."}]}
    convs, _ = load_conversations(write_jsonl(tmp_path / "tools.jsonl", [row]))
    runs = supervised(batcher, convs[0])
    assert "".join(runs).count("get_time") == 1 and runs[-1].endswith("It is noon.<turn|>")
    assert "NOON" not in "".join(runs) and "Time?" not in "".join(runs)


@pytest.mark.slow
def test_sharegpt_roles_to_train_user_and_assistant(batcher, tmp_path):
    row = {"conversations": [{"from": "system", "value": "SYS"}, {"from": "human", "value": "Q1"},
                             {"from": "gpt", "value": "R1"}, {"from": "human", "value": "Q2"},
                             {"from": "gpt", "value": "R2"}]}
    path = write_jsonl(tmp_path / "sg.jsonl", [row])
    convs, report = load_conversations(path)
    assert report.format == "ShareGPT"
    assert supervised(batcher, convs[0]) == ["R1<turn|>", "R2<turn|>"]
    convs, report = load_conversations(path, options=ChatOptions(roles_to_train=("user", "assistant")))
    assert supervised(batcher, convs[0]) == ["Q1<turn|>", "R1<turn|>", "Q2<turn|>", "R2<turn|>"]
    assert report.supervised_roles == {"user": 2, "assistant": 2}


@pytest.mark.slow
def test_sharegpt_function_call_observation_and_renamed_fields(batcher, tmp_path):
    row = {"chat": [{"speaker": "human", "text": "Weather?"},
                    {"speaker": "function_call", "text": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                    {"speaker": "observation", "text": "RAINY"}, {"speaker": "gpt", "text": "Rain."}]}
    options = ChatOptions(field_messages="chat", property_mappings={"role": "speaker", "content": "text"})
    convs, report = load_conversations(write_jsonl(tmp_path / "fc.jsonl", [row]), options=options)
    roles = [m["role"] for m in convs[0].messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert convs[0].messages[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Oslo"}}
    joined = "".join(supervised(batcher, convs[0]))
    assert "weather" in joined and "Rain.<turn|>" in joined and "RAINY" not in joined


@pytest.mark.slow
def test_alpaca_with_system_and_history(batcher, tmp_path):
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be terse.",
           "history": [["Hi", "Hello"]]}
    convs, report = load_conversations(write_jsonl(tmp_path / "alpaca.jsonl", [row]))
    assert report.format == "Alpaca"
    messages = convs[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == [{"type": "text", "text": "Translate\nchat"}]
    assert supervised(batcher, convs[0]) == ["Hello<turn|>", "cat<turn|>"]


@pytest.mark.slow
def test_prompt_completion_and_plain_text(batcher, tmp_path):
    convs, _ = load_conversations(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2?", "completion": "4."}]))
    assert supervised(batcher, convs[0]) == ["4.<turn|>"]
    convs, report = load_conversations(write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time."}]))
    assert report.format == "plain text" and report.text_rows == 1
    assert supervised(batcher, convs[0]) == ["Once upon a time.<eos>"]  # every token after <bos>, up to <eos>


@pytest.mark.slow
def test_images_column_with_placeholders_llava_and_trl(batcher, tmp_path, image):
    llava = {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Blue."}],
             "images": [image.name]}
    trl = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}], "images": [str(image)]}
    for row in (llava, trl):
        convs, report = load_conversations(write_jsonl(tmp_path / "vis.jsonl", [row]))
        assert convs[0].images == [str(image)] and report.modalities["image"] == 1 and not report.findings
        assert supervised(batcher, convs[0]) == ["Blue.<turn|>"]
        assert "pixel_values" in batcher.encode(convs[0])
    two = {**llava, "messages": [{"role": "user", "content": "<image><image>?"}, llava["messages"][1]]}
    code, message = error_of(write_jsonl(tmp_path / "bad.jsonl", [two]))
    assert code == "G4T301" and "bad.jsonl:1: images: 1 image(s) in 'images' but 2 <image> placeholder" in message


@pytest.mark.slow
def test_consecutive_assistant_messages_with_different_weights_are_refused(batcher, tmp_path):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0},
                        {"role": "assistant", "content": "B", "weight": 1}]}
    convs, _ = load_conversations(write_jsonl(tmp_path / "two.jsonl", [row]))
    with pytest.raises(FindingError) as info:
        batcher.encode(convs[0])
    assert info.value.findings[0].code == "G4T317"


# ------------------------------------------------------------------ files and splits
ROWS = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(20)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk"])
def test_every_file_kind_and_split_slicing(tmp_path, kind):
    from datasets import Dataset

    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "parquet":
        Dataset.from_list(ROWS).to_parquet(str(path))
    elif kind == "csv":
        Dataset.from_list(ROWS).to_csv(str(path), index=False)
    else:
        Dataset.from_list(ROWS).save_to_disk(str(path))
    convs, report = load_conversations(path)
    assert report.format == "Alpaca" and report.kept == 20
    head, report = load_conversations(path, split="train[:10%]")
    assert [c.messages[0]["content"][0]["text"] for c in head] == ["Say 0", "Say 1"]
    assert report.total_rows == 20 and report.kept == 2 and "train[:10%] of 20" in report.summary()
    tail, _ = load_conversations(path, split="train[10%:]")
    assert [c.messages[0]["content"][0]["text"] for c in tail] == [f"Say {i}" for i in range(2, 20)]
    code, message = error_of(path, split="validation")
    assert code == "G4T307" and "validation" in message


@pytest.mark.parametrize("value", ["https://example.com/data.jsonl", "HuggingFaceH4/llava-instruct-mix-vsft",
                                   "hf://datasets/x/y"])
def test_url_or_hub_id_is_refused_and_nothing_is_fetched(value):
    with pytest.raises(FindingError) as info:
        load_conversations(value)
    (found,) = info.value.findings
    assert found.code == "G4T306" and "never fetches" in found.message and "download" in found.fix


def test_media_by_url_is_refused_with_the_url(tmp_path):
    row = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
        {"role": "assistant", "content": "A cat."}]}
    code, message = error_of(write_jsonl(tmp_path / "url.jsonl", [row]))
    assert code == "G4T301" and "https://example.com/cat.png" in message and "never fetches" in message


def test_local_image_url_part_is_read(tmp_path, image):
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{image}"}}]},
                        {"role": "assistant", "content": "Blue."}]}
    convs, _ = load_conversations(write_jsonl(tmp_path / "local.jsonl", [row]))
    assert convs[0].images == [str(image)]


# ------------------------------------------------------------------ nothing dropped without a word
def test_unread_fields_are_one_warning_with_counts(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Q", "lang": "en"}, {"role": "assistant", "content": "A"}],
             "id": i} for i in range(3)]
    convs, report = load_conversations(write_jsonl(tmp_path / "extra.jsonl", rows))
    (found,) = report.findings
    assert found.code == "G4T305" and found.severity is Severity.WARNING
    assert "id (3 rows" in found.message and "messages[].lang (3 rows" in found.message


def test_an_unread_field_that_would_change_training_is_an_error(tmp_path):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "loss_mask": [0]}]}
    _, report = load_conversations(write_jsonl(tmp_path / "mask.jsonl", [row]))
    (found,) = report.findings
    assert found.code == "G4T305" and found.severity is Severity.ERROR and "messages[].loss_mask" in found.message


def test_weight_must_be_zero_or_one(tmp_path):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0.5}]}
    code, message = error_of(write_jsonl(tmp_path / "w.jsonl", [row]))
    assert code == "G4T301" and "messages[1].weight: expected 0 or 1" in message


def test_all_turns_weight_zero_is_nothing_to_learn(tmp_path):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0}]}
    code, message = error_of(write_jsonl(tmp_path / "w0.jsonl", [row]))
    assert code == "G4T302" and "no turn is supervised" in message


def test_mixed_formats(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    _, report = load_conversations(write_jsonl(tmp_path / "mix.jsonl", [chat, {"prompt": "P", "completion": "C"}]))
    (found,) = report.findings
    assert found.code == "G4T304" and found.severity is Severity.WARNING and "prompt/completion: 1 rows" in found.message
    code, message = error_of(write_jsonl(tmp_path / "mixtext.jsonl", [chat, {"text": "raw"}]))
    assert code == "G4T304" and "plain-text rows are supervised on every token" in message


def test_preference_rows_are_refused_by_name(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"}
    code, message = error_of(write_jsonl(tmp_path / "dpo.jsonl", [{"chosen": row["chosen"], "rejected": "bad"}]))
    assert code == "G4T301" and "preference row" in message


def test_images_embedded_in_parquet_are_read_through_the_media_cache(tmp_path, monkeypatch):
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    monkeypatch.setenv("GEMMA4_TUNE_MEDIA_CACHE", str(tmp_path / "cache"))
    rows = [{"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Blue."}],
             "images": [Image.new("RGB", (8, 8), (0, 0, 255))]}] * 2
    features = Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                         "images": List(ImageFeature())})
    Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "vis.parquet"))
    convs, report = load_conversations(tmp_path / "vis.parquet")
    (first,), (second,) = convs[0].images, convs[1].images
    assert first == second and Path(first).parent == tmp_path / "cache"  # one file per content
    with Image.open(first) as im:
        assert im.convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert report.modalities["image"] == 2 and not report.findings


def test_a_tool_result_without_its_tool_call_is_refused(tmp_path):
    """The official templates (v1, v3-v5) drop such a message without a word: refused at load, not trained blind."""
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "RESULT"},
                        {"role": "assistant", "content": "Hello."}]}
    code, message = error_of(write_jsonl(tmp_path / "orphan.jsonl", [row]))
    assert code == "G4T301" and "messages[1]: a tool result with no assistant tool call before it" in message


# ------------------------------------------------------------------ absurd rows and empty media (issue 22)
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_rows_nested_absurdly_deep_are_findings_with_the_row(tmp_path):
    ok = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    deep = ok[:-1] + f', "extra": {_nested(100_000)}}}'
    (tmp_path / "deep.jsonl").write_text(f"{ok}\n{deep}\n")
    code, message = error_of(tmp_path / "deep.jsonl")
    assert code == "G4T301" and message.startswith(f"{tmp_path / 'deep.jsonl'}:2: ") and "more than 100" in message
    convs, report = load_conversations(tmp_path / "deep.jsonl", skip_invalid=True)
    assert len(convs) == 1 and report.dropped == {"too_deep": 1}
    (tmp_path / "deep.json").write_text(f"[{ok}, {deep}]")
    code, message = error_of(tmp_path / "deep.json")
    assert code == "G4T307" and "nested more than 100 levels deep" in message
    (tmp_path / "shallow.json").write_text(f"[{ok}, {ok[:-1]}, \"extra\": {_nested(150)}}}]")
    code, message = error_of(tmp_path / "shallow.json")
    assert code == "G4T301" and message.startswith(f"{tmp_path / 'shallow.json'}#1: ")


def test_tool_call_arguments_nested_absurdly_deep_name_the_field(tmp_path):
    arguments = '{"a": ' * 100_000 + "1" + "}" * 100_000
    row = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "tool_calls": [{"type": "function",
                                                              "function": {"name": "f", "arguments": arguments}}]},
                        {"role": "tool", "content": "r", "name": "f"}, {"role": "assistant", "content": "Done."}]}
    code, message = error_of(write_jsonl(tmp_path / "tools.jsonl", [row]))
    assert code == "G4T301" and "messages[1].tool_calls[0].function.arguments: lists and objects nested" in message


def _wav(path: Path, samples: int) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(b"\x10\x00" * samples)
    return path


@pytest.mark.slow
def test_empty_media_are_g4t313_with_the_row(batcher, tmp_path):
    for samples, heard in ((0, "0 samples (0 ms"), (100, "100 samples (6 ms"), (400, None)):
        wav = _wav(tmp_path / f"clip{samples}.wav", samples)
        row = {"messages": [{"role": "user", "content": [{"type": "audio", "path": str(wav)}]},
                            {"role": "assistant", "content": "Silence."}]}
        (conv,), _ = load_conversations(write_jsonl(tmp_path / "audio.jsonl", [row]))
        if heard is None:  # 25 ms is one audio frame: read
            assert batcher.encode(conv)["num_supervised"] > 0
            continue
        with pytest.raises(FindingError) as info:
            batcher.encode(conv)
        (found,) = info.value.findings
        assert found.code == "G4T313" and found.message.startswith(f"{tmp_path / 'audio.jsonl'}:1: audio {wav}")
        assert heard in found.message and "less than one audio frame" in found.message
    empty = Image.new("RGB", (0, 0))
    conv = {"source": "inline.jsonl:3", "messages": [
        {"role": "user", "content": [{"type": "image", "image": empty}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}]}]}
    with pytest.raises(FindingError) as info:
        batcher.encode(conv)
    (found,) = info.value.findings
    assert found.code == "G4T313" and found.message == "inline.jsonl:3: an inline image is empty (0x0 pixels)"
