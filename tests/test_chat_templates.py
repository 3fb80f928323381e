"""Gemma 4 training chat templates: byte identity with the official revisions, assistant spans, row 13 facts."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import trl
from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from gemma4_tune.data import chat
from gemma4_tune.model.tokenizer import save_tokenizer

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
TRL_FILES = {"v1": "gemma4.jinja", "v2": "gemma4_v2.jinja", "v3": "gemma4_v3.jinja", "v4": "gemma4_v4.jinja",
             "v5": "gemma4_v5.jinja"}
PACKAGED = Path(chat.__file__).parent / "templates"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a timezone.",
        "parameters": {"type": "object", "required": ["tz"], "properties": {"tz": {"type": "string"}}}}},
]


def call(name: str, arguments: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    tool_call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        tool_call["id"] = call_id
    return tool_call


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any, **fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **fields}


def tool(call_id: str, content: Any) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


PARIS = call("get_weather", {"city": "Paris", "unit": "celsius"}, "c1")
TOKYO = call("get_time", {"tz": "Asia/Tokyo"}, "c2")
PARIS_CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
TOKYO_CALL = '<|tool_call>call:get_time{tz:<|"|>Asia/Tokyo<|"|>}<tool_call|>'
END = "<turn|>"
STOP = "<|tool_response>"  # the model's stop token after tool calls
REVS = chat.REVISIONS
OLD = ("v1", "v3", "v4")  # same message-loop logic


def thought(text: str) -> str:
    return f"<|channel>thought\n{text}\n<channel|>"


# name -> (messages, tools, template kwargs, expected span texts: {revisions: [...]})
CORPUS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any], dict]] = {
    "single": ([user("Hello there"), assistant("Hi, how can I help?")], None, {},
               {REVS: ["Hi, how can I help?" + END]}),
    "system": ([{"role": "system", "content": "  Be terse.  "}, user("Sum of two and two?"), assistant(" Four. ")],
               None, {}, {REVS: ["Four." + END]}),
    "system_parts": ([{"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                      user("Colour of the sky?"), assistant("Bleu.")], None, {}, {REVS: ["Bleu." + END]}),
    "multi_turn": ([user("Name a fruit"), assistant("Apple"), user("Another one"), assistant("Banana")], None, {},
                   {REVS: ["Apple" + END, "Banana" + END]}),
    "image": ([user([{"type": "image"}, {"type": "text", "text": "What animal is this?"}]),
               assistant([{"type": "text", "text": "A cat."}])], None, {}, {REVS: ["A cat." + END]}),
    "audio": ([user([{"type": "audio"}, {"type": "text", "text": "Transcribe the clip."}]),
               assistant("good morning")], None, {}, {REVS: ["good morning" + END]}),
    "reasoning": ([user("Q one"), assistant("A one", reasoning_content="think one"),
                   user("Q two"), assistant("A two", reasoning_content="think two")], None, {},
                  {OLD + ("v2",): ["A one" + END, "A two" + END],
                   ("v5",): ["A one" + END, thought("think two") + "A two" + END]}),
    "reasoning_enable_thinking": ([user("Q one"), assistant("A one", reasoning_content="think one"),
                                   user("Q two"), assistant("A two", reasoning_content="think two")], None,
                                  {"enable_thinking": True},
                                  {OLD + ("v2",): ["A one" + END, "A two" + END],
                                   ("v5",): ["A one" + END, thought("think two") + "A two" + END]}),
    "tool_call": ([user("Weather in Paris?"), assistant("", tool_calls=[PARIS]), tool("c1", "18C, sunny"),
                   assistant("It is 18C and sunny.")], TOOLS, {},
                  {OLD + ("v5",): [PARIS_CALL + STOP, "It is 18C and sunny." + END],
                   ("v2",): [PARIS_CALL + END, "It is 18C and sunny." + END]}),
    "tool_calls_reasoning": ([user("Weather in Paris?"),
                              assistant("", reasoning_content="Use the tool.", tool_calls=[PARIS]),
                              tool("c1", "18C, sunny"),
                              assistant("18C in Paris.", reasoning_content="Report it.")], TOOLS, {},
                             {OLD: [thought("Use the tool.") + PARIS_CALL + STOP, "18C in Paris." + END],
                              ("v2",): [PARIS_CALL + END, "18C in Paris." + END],
                              ("v5",): [thought("Use the tool.") + PARIS_CALL + STOP,
                                        thought("Report it.") + "18C in Paris." + END]}),
    "tool_calls_enable_thinking": ([{"role": "system", "content": "Use tools."}, user("Paris weather, Tokyo time?"),
                                    assistant("", reasoning_content="Two tools.", tool_calls=[PARIS, TOKYO]),
                                    tool("c1", "18C, sunny"), tool("c2", [{"type": "text", "text": "09:00"}]),
                                    assistant("Paris 18C; Tokyo 09:00.", reasoning_content="Combine.")],
                                   TOOLS, {"enable_thinking": True},
                                   {OLD: [thought("Two tools.") + PARIS_CALL + TOKYO_CALL + STOP,
                                          "Paris 18C; Tokyo 09:00." + END],
                                    ("v2",): [PARIS_CALL + TOKYO_CALL + END, "Paris 18C; Tokyo 09:00." + END],
                                    # v5's generation prompt already supplies '<|channel>thought\n' here
                                    ("v5",): [thought("Two tools.") + PARIS_CALL + TOKYO_CALL + STOP,
                                              "Combine.\n<channel|>Paris 18C; Tokyo 09:00." + END]}),
    "tool_call_enable_thinking_no_reasoning": ([user("Weather in Paris?"), assistant("", tool_calls=[PARIS]),
                                                tool("c1", "18C, sunny"), assistant("Sunny, 18C.")], TOOLS,
                                               {"enable_thinking": True},
                                               {OLD + ("v5",): [PARIS_CALL + STOP, "Sunny, 18C." + END],
                                                ("v2",): [PARIS_CALL + END, "Sunny, 18C." + END]}),
    "tool_call_pending": ([user("Weather in Paris?"), assistant("", tool_calls=[PARIS])], TOOLS, {},
                          {OLD + ("v5",): [PARIS_CALL + STOP], ("v2",): [PARIS_CALL + END]}),
    "tool_call_with_content": ([user("Weather in Paris?"), assistant("Checking.", tool_calls=[PARIS]),
                                tool("c1", "18C, sunny"), assistant("18C.")], TOOLS, {},
                               {OLD: [PARIS_CALL + STOP, "Checking." + END, "18C." + END],
                                ("v2",): [PARIS_CALL + "Checking." + END, "18C." + END],
                                ("v5",): [PARIS_CALL + STOP, "Checking.18C." + END]}),
    "legacy_tool_responses": ([user("Weather in Paris?"),
                               assistant("It is 18C.", tool_calls=[PARIS],
                                         tool_responses=[{"name": "get_weather", "response": {"temp_c": 18}}])],
                              TOOLS, {}, {REVS: [PARIS_CALL + STOP, "It is 18C." + END]}),
    "consecutive_assistant": ([user("Two facts please"), assistant("Fact one."), assistant("Fact two.")], None, {},
                              {OLD + ("v2",): ["Fact one." + END, "Fact two." + END],
                               ("v5",): ["Fact one.Fact two." + END]}),
    "empty_assistant": ([user("Say nothing"), assistant(""), user("Now greet me"), assistant("Hey!")], None, {},
                        {REVS: [END, "Hey!" + END]}),
    "thinking_inline_in_content": ([user("Why is grass green?"),
                                    assistant("<|channel>thought\nchlorophyll<channel|>Chlorophyll.")], None, {},
                                   {REVS: ["Chlorophyll." + END]}),
}


def official(rev: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
             add_generation_prompt: bool = False, **kwargs: Any) -> str:
    template = (TRL_TEMPLATES / TRL_FILES[rev]).read_text(encoding="utf-8")
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
    return rendered[0]


def expected_spans(name: str, rev: str) -> list[str]:
    matches = [texts for revs, texts in CORPUS[name][3].items() if rev in revs]
    assert len(matches) == 1, (name, rev)
    return matches[0]


def test_corpus_expectations_cover_every_revision():
    assert len(CORPUS) >= 12
    for name in CORPUS:
        for rev in REVS:
            expected_spans(name, rev)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", CORPUS)
@pytest.mark.parametrize("rev", REVS)
def test_training_template_renders_like_official(rev: str, name: str, add_generation_prompt: bool):
    messages, tools, kwargs, _ = CORPUS[name]
    kwargs = {"bos_token": "<bos>", **kwargs}
    want = official(rev, messages, tools, add_generation_prompt, **kwargs)
    got = chat.render(messages, revision=rev, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == want



def random_conversation(rng: random.Random) -> list[dict[str, Any]]:
    """Loosely valid conversations: odd orders, content shapes, reasoning keys, argument types."""
    def content() -> Any:
        if rng.random() < 0.5:
            return rng.choice(["", " padded ", "pre<|channel>thought\nx<channel|>post", None])
        kinds = ["text", "image", "audio", "video", "image_url", "input_audio"]
        return [{"type": k, "text": " t "} if k == "text" else {"type": k} for k in rng.choices(kinds, k=rng.randint(0, 3))]

    messages: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        messages.append({"role": rng.choice(["system", "developer"]), "content": "sys"})
    for i in range(rng.randint(1, 6)):
        r = rng.random()
        if r < 0.3:
            messages.append(user(content()))
        elif r < 0.75:
            message = assistant(content())
            if rng.random() < 0.4:
                message[rng.choice(["reasoning_content", "reasoning", "thinking"])] = "why"
            if rng.random() < 0.4:
                arguments = rng.choice([{"city": "X", "n": 3, "ok": True, "l": [1, "a"], "d": {"k": None}}, {}, None])
                message["tool_calls"] = [call("get_time", arguments, f"c{i}")]
            if rng.random() < 0.1:
                message["tool_responses"] = [{"name": "get_time", "response": rng.choice([{"t": 1}, "s"])}]
            messages.append(message)
        else:
            messages.append(tool(f"c{i - 1}", rng.choice(["r", [{"type": "text", "text": "t"}, {"type": "image"}]])))
    return messages


@pytest.mark.parametrize("rev", REVS)
def test_training_template_renders_like_official_fuzz(rev: str):
    rng = random.Random(0)
    for _ in range(60):
        messages = random_conversation(rng)
        tools = TOOLS if rng.random() < 0.5 else None
        kwargs = {"bos_token": "<bos>", "enable_thinking": rng.random() < 0.5, "preserve_thinking": rng.random() < 0.3}
        add_generation_prompt = rng.random() < 0.5
        try:
            want = official(rev, messages, tools, add_generation_prompt, **kwargs)
        except Exception as error:  # the official template rejects some inputs; ours must too
            with pytest.raises(type(error)):
                chat.render(messages, revision=rev, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
            continue
        assert chat.render(messages, revision=rev, tools=tools, add_generation_prompt=add_generation_prompt,
                           **kwargs) == want, messages

@pytest.mark.parametrize("name", CORPUS)
@pytest.mark.parametrize("rev", REVS)
def test_assistant_spans(rev: str, name: str):
    messages, tools, kwargs, _ = CORPUS[name]
    text, spans = chat.assistant_char_spans(messages, revision=rev, tools=tools, bos_token="<bos>", **kwargs)
    assert text == official(rev, messages, tools, bos_token="<bos>", **kwargs)
    assert [text[start:end] for start, end in spans] == expected_spans(name, rev)
    assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert all("<|turn>" not in text[start:end] for start, end in spans)  # no headers, no prompt cue

    covered = set().union(*(range(start, end) for start, end in spans))
    for message in messages:
        if message["role"] == "assistant":
            continue
        content = message["content"]
        for part in [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]:
            part = part.strip()
            at = text.find(part)
            assert at != -1, part
            assert covered.isdisjoint(range(at, at + len(part))), f"{message['role']} text in a span: {part!r}"
    for marker in ("response:", "<tool_response|>", "<|tool>", "<|think|>"):
        at = text.find(marker)
        while at != -1:
            assert covered.isdisjoint(range(at, at + len(marker))), marker
            at = text.find(marker, at + 1)
    # Every non-empty assistant answer is trained (the templates strip inline thinking and whitespace).
    for message in messages:
        if message["role"] == "assistant" and isinstance(message["content"], str):
            answer = re.sub(r"<\|channel>.*?<channel\|>", "", message["content"], flags=re.S).strip()
            if answer:
                assert any(answer in text[start:end] for start, end in spans), answer


@pytest.mark.parametrize("rev", REVS)
def test_spans_merge_transformers_generation_indices(rev: str):
    messages, tools, kwargs, _ = CORPUS["tool_calls_enable_thinking"]
    text, spans = chat.assistant_char_spans(messages, revision=rev, tools=tools, **kwargs)
    _, indices = render_jinja_template([messages], tools=tools, chat_template=chat.training_template(rev),
                                       return_assistant_tokens_mask=True, **kwargs)
    raw = "".join(text[start:end] for start, end in indices[0])
    assert raw == "".join(text[start:end] for start, end in spans)


@pytest.mark.parametrize("rev", REVS)
def test_packaged_official_copies_match_trl(rev: str):
    assert (PACKAGED / f"gemma4_{rev}.jinja").read_bytes() == (TRL_TEMPLATES / TRL_FILES[rev]).read_bytes()
    assert chat.official_template(rev) == (TRL_TEMPLATES / TRL_FILES[rev]).read_text(encoding="utf-8")


@pytest.mark.parametrize("rev", REVS)
def test_detect_revision(rev: str):
    template = (TRL_TEMPLATES / TRL_FILES[rev]).read_text(encoding="utf-8")
    assert chat.detect_revision(template) == rev
    assert chat.detect_revision(template.rstrip() + "\n\n") == rev
    assert chat.detect_revision(template.replace("<|turn>model", "<|turn>assistant", 1)) is None
    assert chat.detect_revision(chat.training_template(rev)) is None


def test_revisions_are_distinct_and_unknown_names_rejected():
    assert set(chat.OFFICIAL_REVISIONS) == set(REVS)
    assert len(set(chat.OFFICIAL_REVISIONS.values())) == len(REVS)
    assert chat.detect_revision("{{ messages }}") is None
    with pytest.raises(ValueError):
        chat.training_template("v6")


@pytest.mark.parametrize("rev", REVS)
def test_training_template_has_generation_markers(rev: str):
    template = chat.training_template(rev)
    assert template.count("{%- generation -%}") == template.count("{%- endgeneration -%}") > 0


@pytest.mark.parametrize("known", chat.KNOWN_PROMPT_MISMATCHES, ids=lambda k: k.case)
@pytest.mark.parametrize("rev", REVS)
def test_known_prompt_mismatches(rev: str, known: chat.KnownPromptMismatch):
    messages = list(known.messages)
    tools = TOOLS if any(m.get("tool_calls") for m in messages) else None
    found = chat.prompt_mismatch(messages, revision=rev, tools=tools, bos_token="<bos>", **known.kwargs)
    assert (None if found is None else (found.prompt, found.rendered)) == known.outcomes[rev]
    # The recorded facts hold for the official file, not just for our copy of it.
    prompt = official(rev, messages[:-1], tools, True, bos_token="<bos>", **known.kwargs)
    rendered = official(rev, messages, tools, bos_token="<bos>", **known.kwargs)
    assert rendered.startswith(prompt) == (known.outcomes[rev] is None)


@pytest.mark.parametrize("rev", REVS)
def test_prefix_consistency_over_corpus(rev: str):
    """Every corpus prefix that ends in an assistant message is consistent, except the recorded cases."""
    recorded = {o[0] for k in chat.KNOWN_PROMPT_MISMATCHES if (o := k.outcomes[rev]) is not None}
    inconsistent = set()
    for name, (messages, tools, kwargs, _) in CORPUS.items():
        for i in range(1, len(messages)):
            if messages[i]["role"] == "assistant":
                found = chat.prompt_mismatch(messages[: i + 1], revision=rev, tools=tools, **kwargs)
                if found is not None:
                    assert found.prompt in recorded, (name, i, found)
                    inconsistent.add(name)
    expected = {"v1": {"consecutive_assistant"}, "v2": set(), "v3": {"consecutive_assistant"},
                "v4": {"consecutive_assistant"},
                "v5": {"consecutive_assistant", "tool_call_with_content", "tool_call_enable_thinking_no_reasoning"}}
    assert inconsistent == expected[rev]


def test_prompt_mismatch_needs_final_assistant():
    with pytest.raises(ValueError):
        chat.prompt_mismatch([user("hi")], revision="v5")


REASONING_HISTORY = [
    user("Q one"), assistant("A one", reasoning_content="r1"),  # 1
    user("Q two"), assistant("", reasoning_content="r2", tool_calls=[PARIS]), tool("c1", "18C"),  # 3
    assistant("A two", reasoning="r3"),  # 5
    user("Q three"),
]


@pytest.mark.parametrize(("rev", "kwargs", "plain", "with_tool_calls"), [
    # the last turn is plain / has tool calls; see chat.REASONING_RENDERED
    ("v1", {}, [1, 3, 5, 7], [1, 3, 5]),
    ("v2", {}, [1, 3, 5, 7], [1, 3, 5, 7]),
    ("v3", {}, [1, 3, 5, 7], [1, 3, 5]),
    ("v4", {}, [1, 3, 5, 7], [1, 3, 5]),
    ("v5", {}, [1, 3, 5], [1, 3, 5]),
    ("v5", {"preserve_thinking": True}, [1, 5], [1, 5]),
])
def test_dropped_reasoning(rev: str, kwargs: dict[str, Any], plain: list[int], with_tool_calls: list[int]):
    last_plain = assistant("A three", thinking="r4")
    last_calls = assistant("", thinking="r4", tool_calls=[TOKYO])
    assert chat.dropped_reasoning(REASONING_HISTORY + [last_plain], revision=rev, tools=TOOLS, **kwargs) == plain
    assert chat.dropped_reasoning(REASONING_HISTORY + [last_calls], revision=rev, tools=TOOLS,
                                  **kwargs) == with_tool_calls


@pytest.mark.parametrize("rev", REVS)
def test_tokenizer_assistant_mask(rev: str, tmp_path: Path):
    """End to end through apply_chat_template on the project's local Gemma 4 style tokenizer."""
    save_tokenizer(tmp_path, chat.training_template(rev))
    tokenizer = GemmaTokenizer.from_pretrained(tmp_path)
    messages, tools, kwargs, _ = CORPUS["tool_call"]
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, **kwargs)
    masked = [token for token, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(masked) == "".join(expected_spans("tool_call", rev))
    assert masked[-1] == tokenizer.convert_tokens_to_ids("<turn|>")  # the model learns to stop
