"""Training records: loading, validation findings, splitting, and the generated demo dataset."""

from __future__ import annotations

import json
import wave
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gemma4_tune.data.demo_data import write_demo_dataset
from gemma4_tune.data.records import Conversation, conversation_key, load_conversations, split_conversations
from gemma4_tune.findings import FindingError

USER = {"role": "user", "content": "Hi?"}
ANSWER = {"role": "assistant", "content": "Hello."}
GOOD = {"messages": [USER, ANSWER]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSONL; a str row is written verbatim (for broken JSON)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def calling(*calls: dict) -> dict:
    """A conversation whose assistant turn makes ``calls``."""
    return {"messages": [USER, {"role": "assistant", "tool_calls": list(calls)}]}


def call(name: Any = "f", arguments: Any = "{}") -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def error_of(path: Path, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(FindingError) as info:
        load_conversations(path, **kwargs)
    (found,) = info.value.findings
    return found.code, found.message


@pytest.fixture
def media(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "red.png")
    with wave.open(str(tmp_path / "beep.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\x00\x00" * 160)
    return tmp_path


BAD_ROWS = [
    pytest.param(
        '{"messages": [{"role": "user", "content": "Hi',
        "truncated JSON (the line ends mid-value): Unterminated string",
        id="truncated-json",
    ),
    pytest.param('{"messages": [} ', "invalid JSON: Expecting value (column 15)", id="invalid-json"),
    pytest.param('{"messages": [], "tools": [{}]', "truncated JSON", id="truncated-after-value"),
    pytest.param([1, 2], "row: expected a JSON object, got list", id="not-object"),
    pytest.param(
        {"body": "hello"},
        "row: no known format (found keys: body)",
        id="no-messages",
    ),
    pytest.param({"prompt": "Hi?"}, "completion: missing", id="prompt-without-completion"),
    pytest.param(
        {"messages": [USER, ANSWER, {"role": "bot", "content": "x"}]},
        "messages[2].role: unknown role 'bot' (expected one of assistant, function",
        id="unknown-role",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": 5}, ANSWER]},
        "messages[0].content: expected a string or a list of parts, got int",
        id="content-type",
    ),
    pytest.param(
        {"messages": [user({"type": "document", "path": "d.pdf"}), ANSWER]},
        "messages[0].content[0].type: unknown part type 'document'",
        id="part-type",
    ),
    pytest.param(
        {"messages": [user({"type": "text", "text": 3}), ANSWER]},
        "messages[0].content[0].text: expected a string",
        id="text-part",
    ),
    pytest.param({"messages": []}, "messages: empty conversation", id="empty"),
    pytest.param({"messages": [USER]}, "messages: no assistant turn", id="no-assistant"),
    pytest.param(
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": {"name": "f"}}]},
        "messages[1].tool_calls: expected a list of tool calls, got object",
        id="tool-calls-not-list",
    ),
    pytest.param(
        calling(call(name=None)),
        "messages[1].tool_calls[0].function.name: expected a function name",
        id="tool-call-name",
    ),
    pytest.param(
        calling(call(arguments="{oops")),
        "messages[1].tool_calls[0].function.arguments: not valid JSON",
        id="tool-call-args-json",
    ),
    pytest.param(
        calling(call(arguments="[1]")),
        "messages[1].tool_calls[0].function.arguments: expected a JSON object, got list",
        id="tool-call-args-object",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}, ANSWER]},
        "messages[0].tool_calls: only assistant turns make tool calls",
        id="tool-calls-on-user",
    ),
    pytest.param({"messages": [USER, ANSWER], "tools": {"name": "f"}}, "tools: expected a list", id="tools"),
    pytest.param(
        {"messages": [USER, ANSWER], "tools": ["f"]},
        "tools[0]: expected a tool schema object, got string",
        id="tool-schema",
    ),
]


@pytest.mark.parametrize(("row", "expected"), BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path: Path, row: Any, expected: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", row, GOOD])
    code, message = error_of(path)
    assert code == "G4T301"
    assert message.startswith(f"{path}:3: ")
    assert expected in message


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n')
    code, message = error_of(path)
    assert code == "G4T301" and message.startswith(f"{path}:2: invalid JSON: not UTF-8")


def test_missing_media_names_resolved_path(media: Path) -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/blue.png"}]}, ANSWER]}
    code, message = error_of(write_jsonl(media / "data.jsonl", [row]))
    assert code == "G4T301"
    expected = f"messages[0].content[0].path: image file not found: {media / 'img' / 'blue.png'}"
    assert f"data.jsonl:1: {expected}" in message


def test_missing_audio(media: Path) -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "audio", "path": "nope.wav"}]}, ANSWER]}
    _, message = error_of(write_jsonl(media / "data.jsonl", [row]))
    assert f"messages[0].content[0].path: audio file not found: {media / 'nope.wav'}" in message


def test_missing_data_file(tmp_path: Path) -> None:
    code, message = error_of(tmp_path / "absent.jsonl")
    assert code == "G4T303"
    assert "absent.jsonl" in message


def test_directory_that_is_not_a_dataset(tmp_path: Path) -> None:
    code, _ = error_of(tmp_path)
    assert code == "G4T303"


def test_skip_invalid_counts_reasons_and_keeps_examples(tmp_path: Path) -> None:
    bad = [
        "{broken",
        {"messages": [{"role": "bot", "content": "x"}, ANSWER]},
        {"messages": [{"role": "robot", "content": "x"}, ANSWER]},
        {"messages": [USER]},
        {"nothing": 1},
        {"messages": []},
        {"messages": [USER, {"role": "assistant", "tool_calls": "f()"}]},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, *bad, GOOD])
    convs, report = load_conversations(path, skip_invalid=True)
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:9"]
    assert (report.rows, report.kept) == (9, 2)
    assert report.dropped == {
        "bad_tool_calls": 1,
        "empty_conversation": 1,
        "invalid_json": 1,
        "no_assistant_turn": 1,
        "no_messages": 1,
        "unknown_role": 2,
    }
    assert len(report.examples) == 5
    assert report.examples[0].startswith(f"{path}:2: ")
    assert report.examples[1].startswith(f"{path}:3: messages[0].role: unknown role 'bot'")
    assert json.loads(json.dumps(report.to_dict()))["dropped"] == report.dropped


def test_nothing_left_after_skipping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": [USER]}, "{"])
    code, message = error_of(path, skip_invalid=True)
    assert code == "G4T302"
    assert "2 rows, 2 dropped" in message


def test_empty_file_has_nothing_to_learn(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n\n")
    assert error_of(path)[0] == "G4T302"


def test_all_assistant_turns_empty(tmp_path: Path) -> None:
    rows = [
        {"messages": [USER, {"role": "assistant", "content": ""}]},
        {"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "  "}]}]},
    ]
    code, message = error_of(write_jsonl(tmp_path / "data.jsonl", rows))
    assert code == "G4T302"
    assert "all 2 assistant turns are empty" in message


def test_some_empty_assistant_turns_are_counted(tmp_path: Path) -> None:
    rows = [GOOD, {"messages": [USER, {"role": "assistant", "content": ""}]}]
    _, report = load_conversations(write_jsonl(tmp_path / "data.jsonl", rows))
    assert (report.assistant_turns, report.empty_assistant_turns) == (2, 1)


def test_normalisation(media: Path) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": "img/red.png"},
                    {"type": "text", "text": "Colour and sound?"},
                    {"type": "audio", "path": str(media / "beep.wav")},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Look first.",
                "tool_calls": [{"id": "c1", **call("look", '{"x": 1}')}],
            },
            {"role": "tool", "tool_call_id": "c1", "name": "look", "content": "red"},
            {"role": "assistant", "content": "Red, beep."},
        ],
        "tools": [{"type": "function", "function": {"name": "look"}}],
    }
    path = write_jsonl(media / "data.jsonl", [row])
    [conv], report = load_conversations(path)
    assert conv.source == f"{path}:1"
    assert conv.images == [str(media / "img" / "red.png")]
    assert conv.audios == [str(media / "beep.wav")]
    assert all(isinstance(m["content"], list) for m in conv.messages)
    assert conv.messages[0]["content"] == [{"type": "text", "text": "Be brief."}]
    turn = conv.messages[2]
    assert turn["content"] == []
    assert turn["reasoning_content"] == "Look first."
    assert turn["tool_calls"] == [{"id": "c1", **call("look", {"x": 1})}]
    assert conv.messages[3]["tool_call_id"] == "c1" and conv.messages[3]["name"] == "look"
    assert conv.tools == row["tools"]
    assert report.modalities == {"text": 0, "image": 1, "audio": 1}
    assert report.assistant_turns == 2 and report.empty_assistant_turns == 0


def test_relative_media_resolve_against_the_file(media: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (media / "nested").mkdir()
    (media / "nested" / "img").mkdir()
    Image.new("RGB", (4, 4)).save(media / "nested" / "img" / "red.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/red.png"}]}, ANSWER]}
    write_jsonl(media / "nested" / "data.jsonl", [row])
    monkeypatch.chdir(media)
    [conv], _ = load_conversations(Path("nested") / "data.jsonl")
    assert conv.images == [str(media / "nested" / "img" / "red.png")]


def test_prompt_completion_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "completion": "4."},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}],
            "completion": [{"role": "assistant", "content": "6."}],
        },
    ]
    convs, report = load_conversations(write_jsonl(tmp_path / "pc.jsonl", rows))
    assert convs[0].messages == [
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4."}]},
    ]
    assert [m["role"] for m in convs[1].messages] == ["system", "user", "assistant"]
    assert report.kept == 2 and report.modalities["text"] == 2


def test_prompt_completion_field_names(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "bot", "content": "y"}]}
    _, message = error_of(write_jsonl(tmp_path / "pc.jsonl", [row]))
    assert "pc.jsonl:1: completion[0].role: unknown role 'bot'" in message


def test_datasets_directory(media: Path) -> None:
    from datasets import Dataset, DatasetDict

    # Arrow fills absent struct fields with None (a text part's "path", a user turn's "tool_calls");
    # the loader treats them as absent. Media paths are relative to the dataset directory.
    question, answer = {"type": "text", "text": "Colour?"}, {"type": "text", "text": "Red."}
    said = {"role": "assistant", "content": [answer]}
    look = {"role": "assistant", "content": [], "tool_calls": [call("look", '{"x": 1}')]}
    rows = [
        {"messages": [user({"type": "image", "path": "img/red.png"}, question), said]},
        {"messages": [user(question), look]},
    ]
    Dataset.from_list(rows).save_to_disk(media / "ds")
    (media / "ds" / "img").mkdir()
    Image.new("RGB", (4, 4)).save(media / "ds" / "img" / "red.png")
    convs, report = load_conversations(media / "ds")
    assert [c.source for c in convs] == [f"{media / 'ds'}#0", f"{media / 'ds'}#1"]
    assert convs[0].images == [str(media / "ds" / "img" / "red.png")]
    assert convs[0].messages[0]["content"][1] == {"type": "text", "text": "Colour?"}
    assert convs[1].messages[1]["tool_calls"] == [call("look", {"x": 1})]
    assert "tool_calls" not in convs[1].messages[0]
    assert report.modalities == {"text": 1, "image": 1, "audio": 0}

    split = DatasetDict({"train": Dataset.from_list([{"prompt": "2+2?", "completion": "4."}] * 3)})
    split.save_to_disk(media / "dd")
    convs, report = load_conversations(media / "dd")
    assert len(convs) == 3 and report.rows == 3
    assert convs[2].source == f"{media / 'dd'}#2"

    bad = [{"prompt": "2+2?", "completion": "4."}, {"prompt": None, "completion": None}]
    Dataset.from_list(bad).save_to_disk(media / "bad")
    code, message = error_of(media / "bad")
    assert code == "G4T301"
    assert message.startswith(f"{media / 'bad'}#1: row: no known format")


def test_datasets_dict_without_train_split(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    test_only = DatasetDict({"test": Dataset.from_list([{"prompt": "a", "completion": "b"}])})
    test_only.save_to_disk(tmp_path / "dd")
    code, message = error_of(tmp_path / "dd")
    assert code == "G4T307" and "no 'train' split (found: test)" in message


def _convs(n: int) -> list[Conversation]:
    return [Conversation(messages=[{"role": "user", "content": [{"type": "text", "text": f"question {i}"}]}, ANSWER],
                         tools=None, source=f"x.jsonl:{i + 1}") for i in range(n)]


def test_split_is_seeded_deterministic_disjoint_and_complete() -> None:
    convs = _convs(50)
    train, evaluation = split_conversations(convs, 0.2, seed=3)
    again = split_conversations(convs, 0.2, seed=3)
    assert [c.source for c in again[0]] == [c.source for c in train]
    assert [c.source for c in again[1]] == [c.source for c in evaluation]
    assert len(evaluation) == 10 and len(train) == 40
    sources = [c.source for c in train + evaluation]
    assert sorted(sources) == sorted(c.source for c in convs) and len(set(sources)) == 50
    other = split_conversations(convs, 0.2, seed=4)[1]
    assert [c.source for c in other] != [c.source for c in evaluation]
    order = [c.source for c in convs]
    assert [c.source for c in train] == [s for s in order if s in {c.source for c in train}]


def test_split_edges() -> None:
    assert split_conversations(_convs(5), 0.0, seed=0) == (_convs(5), [])
    train, evaluation = split_conversations(_convs(5), 0.01, seed=0)
    assert len(evaluation) == 1 and len(train) == 4
    assert split_conversations(_convs(1), 0.5, seed=0) == (_convs(1), [])
    assert len(split_conversations(_convs(5), 2, seed=0)[1]) == 2  # a whole number >= 1 is a count
    with pytest.raises(ValueError):
        split_conversations(_convs(5), 1.5, seed=0)


def test_demo_dataset_loads_with_every_modality(tmp_path: Path) -> None:
    path = write_demo_dataset(tmp_path / "demo")
    assert path == tmp_path / "demo" / "train.jsonl"
    convs, report = load_conversations(path)
    assert (report.rows, report.kept, report.dropped) == (48, 48, {})
    assert report.modalities == {"text": 20, "image": 16, "audio": 12}
    assert report.empty_assistant_turns == 0
    messages = [m for c in convs for m in c.messages]
    assert any(m["role"] == "system" for m in messages)
    assert any(m.get("reasoning_content") for m in messages)
    assert any(m.get("tool_calls") for m in messages) and any(m["role"] == "tool" for m in messages)
    assert any(c.tools for c in convs)
    assert any(sum(m["role"] == "assistant" for m in c.messages) >= 2 and not c.tools for c in convs)
    answers = {c.messages[-1]["content"][0]["text"] for c in convs if c.images or c.audios}
    assert {"high.", "low."} < answers and len(answers) >= 4
    for image in (p for c in convs for p in c.images):
        with Image.open(image) as img:
            assert img.format == "PNG" and img.size == (64, 48)
    for audio in (p for c in convs for p in c.audios):
        with wave.open(audio) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert wav.getnframes() == 8000


def test_demo_dataset_is_deterministic(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path / "a", seed=1, n=12)
    second = write_demo_dataset(tmp_path / "b", seed=1, n=12)
    assert first.read_bytes() == second.read_bytes()
    for media in sorted((tmp_path / "a" / "media").iterdir()):
        assert media.read_bytes() == (tmp_path / "b" / "media" / media.name).read_bytes()
    assert write_demo_dataset(tmp_path / "c", seed=2, n=12).read_bytes() != first.read_bytes()


def test_split_never_puts_a_duplicated_conversation_on_both_sides() -> None:
    """Issue 10: a row repeated in the file must not be trained on and evaluated on."""
    other = {"role": "assistant", "content": [{"type": "text", "text": "something else"}]}
    convs = [Conversation(messages=[USER, ANSWER if i % 3 else other], tools=None, source=f"x.jsonl:{i + 1}")
             for i in range(30)]
    for seed in range(20):
        train, evaluation = split_conversations(convs, 0.2, seed=seed)
        assert evaluation and train
        assert not {conversation_key(c) for c in train} & {conversation_key(c) for c in evaluation}
        assert len(train) + len(evaluation) == 30
