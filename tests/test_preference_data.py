"""Preference (DPO) data: each format read with TRL's meaning, each problem a finding with its count (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gemma4_tune.data.formats import ChatOptions
from gemma4_tune.data.preference import PreferencePair, extract_prompt, load_preference_data
from gemma4_tune.data.records import Conversation, DataSource
from gemma4_tune.findings import FindingError, Severity


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def text(content: str) -> list[dict]:
    return [{"type": "text", "text": content}]


def load(path: Path, **kwargs: Any) -> tuple[list[PreferencePair], Any, list]:
    return load_preference_data(path, **kwargs)


def raised(path: Path, **kwargs: Any) -> dict[str, Any]:
    """The error findings ``load_preference_data`` raises, by code."""
    with pytest.raises(FindingError) as info:
        load_preference_data(path, **kwargs)
    return {f.code: f for f in info.value.findings}


def as_parts(messages: list[dict]) -> list[dict]:
    """TRL-style messages (string content) in our normalised shape."""
    return [{"role": m["role"], "content": text(m["content"])} for m in messages]


SKY = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    return tmp_path / "blue.png"


# ------------------------------------------------------------------ formats, with their meaning
def test_standard_strings_are_a_user_turn_and_assistant_answers(tmp_path: Path) -> None:
    row = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    pairs, report, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    (pair,) = pairs
    assert pair.format == "standard" and pair.plain_text and pair.source_row == 0
    assert pair.prompt == [{"role": "user", "content": text("The sky is")}]
    assert pair.chosen == [{"role": "assistant", "content": text(" blue.")}]
    assert pair.rejected == [{"role": "assistant", "content": text(" green.")}]
    assert report.formats == {"standard": 1} and report.plain_text_rows == 1 and report.kept == 1
    assert "TRL would train them as raw text" in report.notes[0]
    assert report.modalities == {"text": 1, "image": 0, "audio": 0} and not findings


def test_explicit_conversational_multi_turn_prompt(tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, SKY]
    row = {"prompt": prompt, "chosen": [BLUE], "rejected": [GREEN]}
    pairs, report, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    (pair,) = pairs
    assert pair.format == "conversational" and not pair.plain_text
    assert pair.prompt == as_parts(prompt) and pair.chosen == as_parts([BLUE]) and pair.rejected == as_parts([GREEN])
    assert report.multi_turn_prompts == 1 and not findings
    conv = pair.chosen_conversation()
    assert isinstance(conv, Conversation) and conv.messages == as_parts([*prompt, BLUE])
    assert pair.rejected_conversation().messages[-1] == as_parts([GREEN])[0]


def test_implicit_conversational_prompt_is_extracted_as_trl_does(tmp_path: Path) -> None:
    from trl.data_utils import extract_prompt as trl_extract_prompt

    hi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    row = {"chosen": [*hi, SKY, BLUE], "rejected": [*hi, SKY, GREEN]}
    expected = trl_extract_prompt(json.loads(json.dumps(row)))
    assert extract_prompt(row["chosen"], row["rejected"]) == expected
    pairs, report, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    (pair,) = pairs
    assert pair.format == "implicit" and report.formats == {"implicit": 1} and not findings
    assert pair.prompt == as_parts(expected["prompt"]) == as_parts([*hi, SKY])
    assert pair.chosen == as_parts(expected["chosen"]) and pair.rejected == as_parts(expected["rejected"])


def test_implicit_standard_prompt_is_extracted_as_trl_does(tmp_path: Path) -> None:
    from trl.data_utils import extract_prompt as trl_extract_prompt

    row = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    expected = trl_extract_prompt(dict(row))
    assert expected == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert extract_prompt(row["chosen"], row["rejected"]) == expected
    (pair,), _, _ = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.format == "implicit" and pair.plain_text
    assert pair.prompt == [{"role": "user", "content": text(expected["prompt"])}]
    assert pair.chosen[0]["content"] == text(" blue.") and pair.rejected[0]["content"] == text(" green.")


@pytest.mark.parametrize(("chosen", "rejected"), [
    ("abc", "abd"), ("a b", "a c"), ("abc", "abcd"), ("same", "same"), ("x", "y"),
    ([SKY, BLUE], [SKY, BLUE, SKY, GREEN]), ([SKY, BLUE], [{"role": "user", "content": "?"}, GREEN]),
])
def test_extract_prompt_equals_trl(chosen: Any, rejected: Any) -> None:
    from trl.data_utils import extract_prompt as trl_extract_prompt

    assert extract_prompt(chosen, rejected) == trl_extract_prompt({"chosen": chosen, "rejected": rejected})


def test_audio_column_with_placeholder(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    row = {"prompt": "<audio>What is said?", "chosen": "Hello.", "rejected": "Bye.", "audios": ["a.wav"]}
    (pair,), report, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.audios == [str(tmp_path / "a.wav")] and pair.prompt[0]["content"][0]["type"] == "audio"
    assert report.modalities == {"text": 0, "image": 0, "audio": 1} and not findings


def test_string_prompt_beside_full_conversations_is_ignored_as_trl_does_and_reported(tmp_path: Path) -> None:
    """maybe_extract_prompt: a string prompt with conversational chosen/rejected holding the prompt is not used."""
    row = {"prompt": "What color is the sky?", "chosen": [SKY, BLUE], "rejected": [SKY, GREEN]}
    (pair,), _, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.format == "implicit" and pair.prompt == as_parts([SKY])
    (unread,) = findings
    assert unread.code == "G4T305" and unread.severity is Severity.WARNING and "prompt (1 rows" in unread.message


def test_ultrafeedback_binarized_shape_is_implicit(tmp_path: Path) -> None:
    """HuggingFaceH4/ultrafeedback_binarized: a string prompt, full chosen/rejected conversations, a messages copy."""
    row = {"prompt": SKY["content"], "prompt_id": "abc", "chosen": [SKY, BLUE], "rejected": [SKY, GREEN],
           "messages": [SKY, BLUE], "score_chosen": 8.0, "score_rejected": 3.0}
    (pair,), _, (unread,) = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.format == "implicit" and pair.prompt == as_parts([SKY]) and pair.chosen == as_parts([BLUE])
    assert unread.code == "G4T305" and unread.severity is Severity.WARNING
    assert set(unread.details["fields"]) == {"prompt", "prompt_id", "messages", "score_chosen", "score_rejected"}


def test_string_prompt_with_message_answers_is_one_user_turn(tmp_path: Path) -> None:
    row = {"prompt": "What color is the sky?", "chosen": [BLUE], "rejected": [GREEN]}
    (pair,), _, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.format == "conversational" and pair.prompt == as_parts([SKY]) and not findings


def test_sharegpt_preference_llama_factory_shape(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "What color is the sky?"}],
           "chosen": {"from": "gpt", "value": "It is blue."}, "rejected": {"from": "gpt", "value": "It is green."},
           "system": "Be brief."}
    (pair,), report, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.format == "sharegpt" and report.formats == {"sharegpt": 1} and not findings
    assert pair.prompt == [{"role": "system", "content": text("Be brief.")}, *as_parts([SKY])]
    assert pair.chosen == as_parts([BLUE]) and pair.rejected == as_parts([GREEN])


def test_axolotl_chat_template_shape_with_its_keys(tmp_path: Path) -> None:
    rows = [{"messages": [SKY], "chosen": BLUE, "rejected": GREEN},
            {"messages": "What color is the sky?", "chosen": "It is blue.", "rejected": "It is green."}]
    pairs, report, findings = load(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.format for p in pairs] == ["chat-template", "chat-template"] and not findings
    assert all(p.prompt == as_parts([SKY]) and p.chosen == as_parts([BLUE]) for p in pairs)
    custom = {"dialog": [{"speaker": "human", "text": "What color is the sky?"}],
              "chosen": {"speaker": "bot", "text": "It is blue."},
              "rejected": {"speaker": "bot", "text": "It is green."}}
    options = ChatOptions(field_messages="dialog", property_mappings={"role": "speaker", "content": "text"},
                          roles={"user": ("human",), "assistant": ("bot",)})
    (pair,), _, findings = load_preference_data(DataSource(str(write_jsonl(tmp_path / "c.jsonl", [custom])),
                                                           options=options))
    assert pair.format == "chat-template" and pair.prompt == as_parts([SKY]) and pair.chosen == as_parts([BLUE])
    assert not findings


def test_alpaca_preference_shape(tmp_path: Path) -> None:
    row = {"instruction": "Name the sky's color.", "input": "Daytime.", "chosen": "Blue.", "rejected": "Green."}
    (pair,), _, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.format == "alpaca" and pair.plain_text and not findings
    assert pair.prompt == [{"role": "user", "content": text("Name the sky's color.\nDaytime.")}]


def test_parquet_through_datasets_with_a_split(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": f"Q{i}"}], "chosen": [{"role": "assistant", "content": f"A{i}"}],
             "rejected": [{"role": "assistant", "content": f"B{i}"}]} for i in range(4)]
    path = tmp_path / "p.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    pairs, report, findings = load(path, split="train[2:]")
    assert [p.prompt[0]["content"] for p in pairs] == [text("Q2"), text("Q3")]
    assert pairs[0].source == f"{path}#2" and report.total_rows == 4 and report.reader == "datasets"
    assert report.kept == 2 and not findings


# ------------------------------------------------------------------ media
def test_trl_vision_parquet_with_embedded_image_bytes(tmp_path: Path) -> None:
    """TRL's vision DPO shape (RLAIF-V): an Image column of bytes, path-less image parts; Arrow fills missing keys."""
    import io

    import datasets

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    turns = datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)})
    features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": turns, "chosen": turns,
                                  "rejected": turns})
    row = {"images": [{"bytes": buf.getvalue(), "path": None}],
           "prompt": [{"role": "user",
                       "content": [{"type": "image", "text": None}, {"type": "text", "text": "Color?"}]}],
           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
           "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}
    path = tmp_path / "rlaif.parquet"
    datasets.Dataset.from_list([row], features=features).to_parquet(str(path))
    (pair,), report, findings = load(path)
    (image_part, text_part) = pair.prompt[0]["content"]
    assert image_part["type"] == "image" and Path(image_part["path"]).read_bytes() == buf.getvalue()
    assert text_part == text("Color?")[0] and pair.chosen == as_parts([{"role": "assistant", "content": "Blue."}])
    assert report.modalities["image"] == 1 and not findings


def test_images_column_with_image_placeholder(tmp_path: Path, image: Path) -> None:
    row = {"prompt": [{"role": "user", "content": "<image>What color is this?"}], "chosen": [BLUE],
           "rejected": [GREEN], "images": ["blue.png"]}
    (pair,), report, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.prompt[0]["content"] == [{"type": "image", "path": str(image)}, *text("What color is this?")]
    assert pair.images == [str(image)] and report.modalities == {"text": 0, "image": 1, "audio": 0}
    assert not findings


def test_trl_pathless_image_parts_and_images_without_placeholder(tmp_path: Path, image: Path) -> None:
    parts = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
             "chosen": [BLUE], "rejected": [GREEN], "images": ["blue.png"]}
    bare = {"prompt": [{"role": "user", "content": "Color?"}], "chosen": [BLUE], "rejected": [GREEN],
            "images": ["blue.png"]}
    pairs, report, findings = load(write_jsonl(tmp_path / "p.jsonl", [parts, bare]))
    expected = [{"type": "image", "path": str(image)}, *text("Color?")]
    assert [p.prompt[0]["content"] for p in pairs] == [expected, expected] and not findings
    assert report.images_before_first_user_turn == 1 and "as TRL puts them" in report.notes[0]


def test_missing_image_and_placeholder_mismatch_are_g4t328(tmp_path: Path, image: Path) -> None:
    missing = {"prompt": [{"role": "user", "content": [{"type": "image", "path": "nope.png"}]}],
               "chosen": [BLUE], "rejected": [GREEN]}
    mismatch = {"prompt": "<image><image>Color?", "chosen": "Blue.", "rejected": "Green.", "images": ["blue.png"]}
    path = write_jsonl(tmp_path / "p.jsonl", [missing, mismatch])
    pairs, _, findings = load(path, raise_errors=False)
    assert not pairs
    by_reason = {f.details["reason"]: f for f in findings if f.code == "G4T328"}
    assert set(by_reason) == {"media_not_found", "media_mismatch"}
    assert f"image file not found: {tmp_path / 'nope.png'}" in by_reason["media_not_found"].message
    assert by_reason["media_mismatch"].details["rows"] == [f"{path}:2"]


# ------------------------------------------------------------------ findings
def test_identical_pairs_are_one_g4t325_with_count_and_first_rows(tmp_path: Path) -> None:
    good = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    same = {"prompt": "Q", "chosen": "A", "rejected": "A"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, same, good, same, same])
    found = raised(path)
    assert set(found) == {"G4T325"}
    f = found["G4T325"]
    assert f.details["count"] == 3 and f.details["rows"] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "3 of 5 rows have identical chosen and rejected answers" in f.message


def test_implicit_identical_conversations_are_g4t325(tmp_path: Path) -> None:
    found = raised(write_jsonl(tmp_path / "p.jsonl", [{"chosen": [SKY, BLUE], "rejected": [SKY, BLUE]}]))
    assert set(found) == {"G4T325"}


def test_empty_answers_are_g4t326(tmp_path: Path) -> None:
    rows = [{"prompt": "Q", "chosen": "", "rejected": "B"},
            {"prompt": [SKY], "chosen": [], "rejected": [GREEN]},
            {"prompt": [SKY], "chosen": [BLUE], "rejected": [{"role": "assistant", "content": "  "}]},
            {"chosen": "", "rejected": "x"},
            {"chosen": [SKY, BLUE], "rejected": [SKY]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    found = raised(path)
    assert set(found) == {"G4T326"} and found["G4T326"].details["count"] == 5
    assert f"{path}:5: rejected is all prompt" in found["G4T326"].message


def test_prompt_differing_between_chosen_and_rejected_is_g4t327(tmp_path: Path) -> None:
    other = {"role": "user", "content": "What color is grass?"}
    rows = [{"chosen": [SKY, BLUE], "rejected": [other, GREEN]},
            {"chosen": [SKY, BLUE, SKY, BLUE], "rejected": [SKY, GREEN, SKY, GREEN]},
            {"chosen": "Sky?", "rejected": "Grass?"}]
    found = raised(write_jsonl(tmp_path / "p.jsonl", rows))
    assert set(found) == {"G4T327"} and found["G4T327"].details["count"] == 3
    assert "differ at message 0" in found["G4T327"].message and "a user turn" in found["G4T327"].message


def test_row_in_no_preference_format_is_g4t324_naming_columns(tmp_path: Path) -> None:
    rows = [{"question": "Q", "good": "A", "bad": "B"}, {"prompt": "Q", "chosen": 3, "rejected": "B"}]
    found = raised(write_jsonl(tmp_path / "p.jsonl", rows))
    assert set(found) == {"G4T324"} and found["G4T324"].details["count"] == 2
    message = found["G4T324"].message
    assert "columns: question (string), good (string), bad (string)" in message
    assert "prompt + chosen + rejected" in message and "conversations + chosen + rejected (ShareGPT)" in message
    forced = DataSource(str(write_jsonl(tmp_path / "f.jsonl", [{"chosen": "A", "rejected": "B"}])),
                        options=ChatOptions(format="standard"))
    found = raised(forced)
    assert "format 'standard' needs prompt (columns: chosen (string), rejected (string))" in found["G4T324"].message


def test_answer_holding_a_user_turn_and_bad_messages_are_g4t328(tmp_path: Path) -> None:
    rows = [{"prompt": [SKY], "chosen": [SKY, BLUE], "rejected": [GREEN]},
            {"prompt": [{"role": "bot", "content": "x"}], "chosen": [BLUE], "rejected": [GREEN]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    found = raised(path)
    assert set(found) == {"G4T328"}
    _, _, findings = load(path, raise_errors=False)
    assert {f.details["reason"] for f in findings} == {"answer_not_assistant", "unknown_role"}


def test_unread_fields_are_reported(tmp_path: Path) -> None:
    row = {"prompt": [SKY], "chosen": [{**BLUE, "lang": "en"}], "rejected": [GREEN], "id": 7, "score": 0.9}
    (pair,), report, findings = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    (f,) = findings
    assert f.code == "G4T305" and f.severity is Severity.WARNING
    assert set(f.details["fields"]) == {"id", "score", "chosen[].lang"} and report.unread["id"] == 1
    weighted = {"prompt": [SKY], "chosen": [{**BLUE, "weight": 1}], "rejected": [GREEN]}
    found = raised(write_jsonl(tmp_path / "w.jsonl", [weighted]))
    assert found["G4T305"].severity is Severity.ERROR and "chosen[].weight" in found["G4T305"].message


def test_skip_invalid_drops_and_counts_bad_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q", "chosen": "A", "rejected": "A"},
            {"prompt": "Q", "chosen": "", "rejected": "B"}, "not json"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + "{broken\n")
    pairs, report, findings = load(path, skip_invalid=True)
    assert [p.source_row for p in pairs] == [0] and report.kept == 1 and report.rows == 4
    assert report.dropped == {"empty_answer": 1, "identical": 1, "invalid_json": 1}
    assert {f.code for f in findings} == {"G4T325", "G4T326", "G4T328"}
    assert all(f.severity is Severity.WARNING and "dropped (--skip-invalid)" in f.message for f in findings)
    assert "dropped" in report.summary()


def test_nothing_usable_is_g4t329(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert set(raised(empty)) == {"G4T329"}
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "A"}])
    found = raised(same, skip_invalid=True)
    assert set(found) == {"G4T329"} and "1 dropped as invalid: identical (1)" in found["G4T329"].message
    assert found["G4T329"].details["dropped"][0].startswith("G4T325: ")


def test_several_sources_are_one_report(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"chosen": [SKY, BLUE], "rejected": [SKY, GREEN]}])
    pairs, report, findings = load_preference_data([a, b])
    assert [p.source_row for p in pairs] == [0, 1] and report.formats == {"standard": 1, "implicit": 1}
    assert len(report.sources) == 2 and report.kept == 2 and not findings
