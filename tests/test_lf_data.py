"""LLaMA-Factory's own demo data read with LLaMA-Factory's meaning, nothing silent (issue 34).

Every test reads the files copied unchanged from LLaMA-Factory (tests/data/llamafactory/SOURCE.md), or a row
of them changed in one field, and asserts what is read and, where it matters, the exact tokens supervised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gemma4_tune.data.collate import Gemma4Batcher
from gemma4_tune.data.files import is_llamafactory_info, read_rows
from gemma4_tune.data.formats import ChatOptions, read_row
from gemma4_tune.data.records import load_conversations
from gemma4_tune.findings import FindingError
from tests.test_formats import supervised, write_jsonl

LF = Path(__file__).parent / "data" / "llamafactory" / "data"
MLLM_TAGS = {"property_mappings": {"role": "role", "content": "content"},
             "roles": {"user": ("user",), "assistant": ("assistant",)}}
"""LLaMA-Factory's ``tags`` of mllm_demo (role_tag, content_tag, user_tag, assistant_tag) as ChatOptions."""


def finding_of(path: Path, **kwargs: Any) -> tuple[str, str, dict]:
    with pytest.raises(FindingError) as info:
        load_conversations(path, **kwargs)
    (found,) = info.value.findings
    return found.code, found.message, found.details


def v1_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (LF / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def batcher(tiny_models) -> Gemma4Batcher:
    from transformers import AutoProcessor

    return Gemma4Batcher(AutoProcessor.from_pretrained(str(tiny_models["e2b"])))


# ------------------------------------------------------------------ columns and tags (dataset_info.json)
def test_mllm_demo_read_with_its_columns_and_tags():
    options = ChatOptions(format="sharegpt", columns={"messages": "messages", "images": "images"}, **MLLM_TAGS)
    convs, report = load_conversations(LF / "mllm_demo.json", options=options)
    rows = json.loads((LF / "mllm_demo.json").read_text(encoding="utf-8"))
    assert report.kept == len(rows) and not report.findings and not report.dropped
    assert [m["role"] for m in convs[0].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[0].images == [str((LF / "mllm_demo_data" / "1.jpg").absolute())] * 2
    assert convs[0].messages[0]["content"][1] == {"type": "text", "text": "Who are they?"}


def test_alpaca_columns_are_read_by_the_files_names_and_findings_name_them(tmp_path):
    row = {"q": "Translate", "ctx": "chat", "a": "cat", "sys": "Be terse.", "instruction": "IGNORED"}
    columns = {"instruction": "q", "input": "ctx", "output": "a", "system": "sys"}
    convs, report = load_conversations(write_jsonl(tmp_path / "lf.jsonl", [row]),
                                       options=ChatOptions(format="alpaca", columns=columns))
    assert [(m["role"], m["content"][0]["text"]) for m in convs[0].messages] == [
        ("system", "Be terse."), ("user", "Translate\nchat"), ("assistant", "cat")]
    (unread,) = report.findings  # a column named like ours that no mapping points at is not read, and said so
    assert unread.code == "G4T305" and "instruction (1 rows" in unread.message
    code, message, details = finding_of(write_jsonl(tmp_path / "bad.jsonl", [{**row, "a": None}]),
                                        options=ChatOptions(format="alpaca", columns=columns))
    assert code == "G4T301" and details["field"] == "a" and "bad.jsonl:1: a: an Alpaca row needs" in message


# ------------------------------------------------------------------ LLaMA-Factory v1 rows
@pytest.mark.slow
def test_v1_sft_demo_value_parts_and_loss_weight(batcher):
    convs, report = load_conversations(LF / "v1_sft_demo.jsonl")
    assert report.kept == len(v1_rows("v1_sft_demo.jsonl")) and not report.findings and not report.dropped
    first = convs[0].messages
    assert [(m["role"], m["content"], m["train"]) for m in first] == [
        ("user", [{"type": "text", "text": "hi"}], False),
        ("assistant", [{"type": "text", "text": "Hello! I am {{name}}, an AI assistant developed by {{author}}. "
                                                "How can I assist you today?"}], True)]
    assert supervised(batcher, convs[0]) == [
        "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?<turn|>"]


@pytest.mark.slow
def test_v1_loss_weights_swapped_supervise_the_user_turn_not_the_answer(batcher, tmp_path):
    row = v1_rows("v1_sft_demo.jsonl")[0]
    row["messages"][0]["loss_weight"], row["messages"][1]["loss_weight"] = 1.0, 0.0
    convs, report = load_conversations(write_jsonl(tmp_path / "swapped.jsonl", [row]))
    assert report.supervised_roles == {"user": 1} and report.turns_not_supervised == 1
    runs = supervised(batcher, convs[0])
    assert runs == ["hi<turn|>"] and "Hello!" not in "".join(runs)


def test_v1_fractional_loss_weight_is_an_error_naming_row_and_field(tmp_path):
    row = v1_rows("v1_sft_demo.jsonl")[0]
    row["messages"][1]["loss_weight"] = 0.5
    path = write_jsonl(tmp_path / "half.jsonl", [row])
    code, message, details = finding_of(path)
    assert code == "G4T301" and details["field"] == "messages[1].loss_weight"
    assert details["reason"] == "fractional_loss_weight" and f"{path}:1: messages[1].loss_weight: 0.5" in message
    _, report = load_conversations(write_jsonl(tmp_path / "both.jsonl", [row, v1_rows("v1_sft_demo.jsonl")[1]]),
                                   skip_invalid=True)
    assert report.dropped == {"fractional_loss_weight": 1} and report.kept == 1


def test_v1_part_with_a_null_value_names_value(tmp_path):
    row = v1_rows("v1_sft_demo.jsonl")[0]
    row["messages"][1]["content"][0]["value"] = None
    code, message, details = finding_of(write_jsonl(tmp_path / "null.jsonl", [row]))
    assert code == "G4T301" and details["field"] == "messages[1].content[0].value" and "got null" in message


def test_v1_multimodal_demo_image_url_parts(tmp_path):
    # LLaMA-Factory's paths start at its repository root (data/mllm_demo_data/...); ours at the file's folder.
    (tmp_path / "data").symlink_to(LF, target_is_directory=True)
    (tmp_path / "v1.jsonl").write_bytes((LF / "v1_multimodal_demo.jsonl").read_bytes())
    convs, report = load_conversations(tmp_path / "v1.jsonl")
    assert report.kept == len(v1_rows("v1_multimodal_demo.jsonl")) and not report.findings
    assert [Path(p).name for p in convs[0].images] == ["1.jpg", "1.jpg"]
    assert convs[0].messages[2]["content"][0] == {"type": "text", "text": "What are they doing?"}


# ------------------------------------------------------------------ tools (glaive)
GLAIVE = ChatOptions(format="sharegpt", columns={"messages": "conversations", "tools": "tools"})


@pytest.mark.slow
def test_glaive_tool_rows_read_whole_with_their_declarations_rendered(batcher):
    convs, report = load_conversations(LF / "glaive_toolcall_en_demo.json", options=GLAIVE)
    assert report.kept == 300 and not report.dropped and not report.findings
    first = convs[0]
    assert first.tools[0]["type"] == "function" and first.tools[0]["function"]["name"] == "search_recipes"
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant", "tool", "assistant",
                                                   "user", "assistant"]
    text, spans = batcher.render(first)
    declaration = '<|tool>declaration:search_recipes{description:<|"|>Search for recipes based on ingredients<|"|>'
    assert declaration in text[:spans[0][0]]  # declared in the system turn, not supervised
    runs = supervised(batcher, first)
    assert runs[1] == ('<|tool_call>call:search_recipes{ingredients:[<|"|>chicken<|"|>,<|"|>bell peppers<|"|>,'
                       '<|"|>rice<|"|>]}<tool_call|><|tool_response>')
    assert '{"recipes"' in text and '{"recipes"' not in "".join(runs)  # the observation is read, not supervised
    assert runs[2].startswith("I found two recipes for you.") and runs[2].endswith("<turn|>")
    assert sum(bool(c.tools) for c in convs) == 191  # the other 109 rows declare "[]"


def test_tools_as_invalid_json_name_the_row_and_field(tmp_path):
    rows = json.loads((LF / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))[:2]
    rows[1]["tools"] = rows[0]["tools"][:-3]  # cut mid-value
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    code, message, details = finding_of(path, options=GLAIVE)
    assert code == "G4T301" and details["field"] == "tools" and f"{path}#1: tools:" in message
    _, report = load_conversations(path, options=GLAIVE, skip_invalid=True)
    assert report.kept == 1 and report.dropped == {"bad_field": 1}


def test_a_custom_function_tag_reads_tool_calls():
    rows = json.loads((LF / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))[:1]
    for message in rows[0]["conversations"]:
        message["from"] = {"function_call": "fc", "observation": "obs"}.get(message["from"], message["from"])
    roles = {"user": ("human",), "assistant": ("gpt",), "function_call": ("fc",), "tool": ("obs",)}
    messages = read_row(rows[0], ChatOptions(format="sharegpt", roles=roles)).row["messages"]
    assert messages[3]["tool_calls"][0]["function"]["name"] == "search_recipes"
    assert [m["role"] for m in messages][3:5] == ["assistant", "tool"]


# ------------------------------------------------------------------ .txt corpora
def test_wiki_demo_txt_is_one_plain_text_row_per_line():
    convs, report = load_conversations(LF / "wiki_demo.txt")
    lines = (LF / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    assert report.format == "plain text" and report.kept == report.text_rows == len(lines) == 30
    assert [c.text for c in convs] == lines and convs[0].source == f"{LF / 'wiki_demo.txt'}:1"
    _, report = load_conversations(LF / "wiki_demo.txt", split="train[:5]")
    assert report.kept == 5 and report.total_rows == 30


def test_blank_lines_are_not_documents(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first document\n\n   \nsecond document\n", encoding="utf-8")
    rows = read_rows(path)
    assert rows.rows == [(f"{path}:1", {"text": "first document"}), (f"{path}:4", {"text": "second document"})]
    assert rows.reader == "datasets" and rows.notes == ["2 blank lines are not documents"]


# ------------------------------------------------------------------ placeholders without media
def test_a_placeholder_without_its_media_column_is_an_error(tmp_path):
    # The video demo read without its videos column (a reader that dropped it): <video> must not become text.
    options = ChatOptions(format="sharegpt", columns={"messages": "messages"}, **MLLM_TAGS)
    code, message, details = finding_of(LF / "mllm_video_demo.json", options=options)
    assert code == "G4T301" and details["reason"] == "placeholder_without_media"
    assert details["field"] == "messages[0].content" and "'videos'" in message and "literal text <video>" in message
    row = {"messages": [{"role": "user", "content": "What does <image> do in HTML?"},
                        {"role": "assistant", "content": "Nothing."}]}
    code, message, details = finding_of(write_jsonl(tmp_path / "code.jsonl", [row]))
    assert code == "G4T301" and "'images'" in message and "remove the placeholder" in message


# ------------------------------------------------------------------ dataset_info.json
def test_llamafactory_dataset_info_is_refused_with_how_to_name_a_dataset(tmp_path):
    for given in (LF / "dataset_info.json", LF):
        assert is_llamafactory_info(given)
        with pytest.raises(FindingError) as info:
            read_rows(given)
        (found,) = info.value.findings
        assert found.code == "G4T307" and f"--data {LF / 'dataset_info.json'}:NAME" in found.fix


def test_a_save_to_disk_directory_is_not_taken_for_llamafactory_info(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a document"}]).save_to_disk(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "dataset_info.json").is_file()
    assert not is_llamafactory_info(tmp_path / "saved")
    assert not is_llamafactory_info(tmp_path / "saved" / "dataset_info.json")
    assert read_rows(tmp_path / "saved").rows == [(f"{tmp_path / 'saved'}#0", {"text": "a document"})]
