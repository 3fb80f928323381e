"""Gemma 4 chat templates: official revisions, training variants, rendering and assistant spans.

The official Gemma 4 chat template has no ``{% generation %}`` markers, so assistant-only loss is
impossible with it (catalog row 12). ``templates/gemma4_vN.jinja`` are verbatim copies of the five
published revisions; ``templates/gemma4_vN_training.jinja`` render byte-identically to them but wrap
what the model emits in a model turn (thinking channel, tool calls and the ``<|tool_response>`` that
ends them, content, ``<turn|>``) in generation markers.

Some revisions render a finished assistant turn inconsistently with their own generation prompt
(catalog row 13). The training templates keep that rendering (byte identity wins);
``KNOWN_PROMPT_MISMATCHES`` records each case and ``prompt_mismatch`` finds one in a conversation.
Most revisions also drop reasoning from some assistant turns (``REASONING_RENDERED``), so it is never
trained; ``dropped_reasoning`` finds those turns. ``detect_revision`` and ``template_sha256`` name the
revision of a template (an adapter's manifest records the one it was trained with, catalog row 34).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

_TEMPLATES = Path(__file__).parent / "templates"

REVISIONS: tuple[str, ...] = ("v1", "v2", "v3", "v4", "v5")

Message = Mapping[str, Any]


def _normalise(template: str) -> str:
    return template.rstrip()


def template_sha256(template: str) -> str:
    """sha256 of a chat template's text with trailing whitespace stripped (how revisions are told apart)."""
    return hashlib.sha256(_normalise(template).encode("utf-8")).hexdigest()


@cache
def _read(name: str) -> str:
    return (_TEMPLATES / name).read_text(encoding="utf-8")


OFFICIAL_REVISIONS: dict[str, str] = {rev: template_sha256(_read(f"gemma4_{rev}.jinja")) for rev in REVISIONS}
"""Revision name -> sha256 of the official template text with trailing whitespace stripped."""


def _check_revision(revision: str) -> None:
    if revision not in OFFICIAL_REVISIONS:
        raise ValueError(f"unknown Gemma 4 chat template revision {revision!r}; expected one of {REVISIONS}")


def detect_revision(chat_template: str) -> str | None:
    """Name of the official revision that ``chat_template`` is (ignoring trailing whitespace), else None."""
    digest = template_sha256(chat_template)
    return next((rev for rev, known in OFFICIAL_REVISIONS.items() if known == digest), None)


def training_template(revision: str) -> str:
    """Text of the training template (official revision plus generation markers) for ``revision``."""
    _check_revision(revision)
    return _read(f"gemma4_{revision}_training.jinja")


def _render(
    messages: Sequence[Message],
    revision: str,
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    with_spans: bool,
    kwargs: dict[str, Any],
) -> tuple[str, list[tuple[int, int]]]:
    rendered, indices = render_jinja_template(
        conversations=[list(messages)],
        tools=list(tools) if tools is not None else None,
        chat_template=training_template(revision),
        return_assistant_tokens_mask=with_spans,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return rendered[0], (indices[0] if with_spans else [])


def render(
    messages: Sequence[Message],
    *,
    revision: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """Render ``messages`` exactly as the official ``revision`` does, with transformers' jinja environment.

    ``kwargs`` go to the template as ``apply_chat_template`` passes them (``bos_token``,
    ``enable_thinking``, ``preserve_thinking``, ...).
    """
    return _render(messages, revision, tools, add_generation_prompt, False, kwargs)[0]


def assistant_char_spans(
    messages: Sequence[Message],
    *,
    revision: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the ``[start, end)`` character spans the model must learn to produce.

    The spans are transformers' generation indices for the training template, with empty ones
    dropped and touching ones merged, in order.
    """
    text, indices = _render(messages, revision, tools, False, True, kwargs)
    spans: list[tuple[int, int]] = []
    for start, end in indices:
        if start == end:
            continue
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return text, spans


@dataclass(frozen=True)
class PromptMismatch:
    """Where a finished assistant turn departs from the generation prompt (catalog row 13).

    From character ``offset`` on (moved back to the start of a ``<...>`` marker it would split),
    the generation prompt has ``prompt`` but the rendered conversation has ``rendered``.
    """

    offset: int
    prompt: str
    rendered: str


def prompt_mismatch(
    messages: Sequence[Message],
    *,
    revision: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> PromptMismatch | None:
    """Check a conversation ending in an assistant message against its generation prompt.

    The rendered conversation must start with ``render(messages[:-1], add_generation_prompt=True)``;
    otherwise the model is trained on that turn in a context it never sees at inference.
    Returns None when it does.
    """
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise ValueError("prompt_mismatch needs a conversation that ends in an assistant message")
    prompt = render(messages[:-1], revision=revision, tools=tools, add_generation_prompt=True, **kwargs)
    rendered = render(messages, revision=revision, tools=tools, **kwargs)
    if rendered.startswith(prompt):
        return None
    offset = len(os.path.commonprefix([prompt, rendered]))
    marker = prompt.rfind("<", 0, offset)
    if marker != -1 and ">" not in prompt[marker:offset]:
        offset = marker
    return PromptMismatch(offset, prompt[offset:], rendered[offset:])


@dataclass(frozen=True)
class KnownPromptMismatch:
    """A conversation shape that official revisions render inconsistently with their generation prompt.

    ``outcomes`` maps each revision to ``(prompt, rendered)`` of ``prompt_mismatch`` on the example
    ``messages`` rendered with ``kwargs``, or to None where that revision is consistent.
    """

    case: str
    condition: str
    messages: tuple[Mapping[str, Any], ...]
    kwargs: Mapping[str, Any]
    outcomes: Mapping[str, tuple[str, str] | None]


_TIME_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
_TIME_RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}

KNOWN_PROMPT_MISMATCHES: tuple[KnownPromptMismatch, ...] = (
    KnownPromptMismatch(
        case="consecutive_assistant",
        condition="the assistant message follows another assistant message that has no tool calls",
        messages=(
            {"role": "user", "content": "Two things?"},
            {"role": "assistant", "content": "One."},
            {"role": "assistant", "content": "Two."},
        ),
        kwargs={},
        outcomes={
            "v1": ("<|turn>model\n", "Two.<turn|>\n"),
            "v2": None,
            "v3": ("<|turn>model\n", "Two.<turn|>\n"),
            "v4": ("<|turn>model\n", "Two.<turn|>\n"),
            "v5": ("<turn|>\n<|turn>model\n", "Two.<turn|>\n"),
        },
    ),
    KnownPromptMismatch(
        case="content_then_tool_calls",
        condition="the assistant message follows the tool results of an assistant message with content and "
        "tool calls, and renders something (an empty one happens to match)",
        messages=(
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [_TIME_CALL]},
            _TIME_RESULT,
            {"role": "assistant", "content": "Noon."},
        ),
        kwargs={},
        outcomes={"v1": None, "v2": None, "v3": None, "v4": None, "v5": ("<turn|>\n", "Noon.<turn|>\n")},
    ),
    KnownPromptMismatch(
        case="content_then_tool_calls_thinking",
        condition="as content_then_tool_calls, with enable_thinking=True",
        messages=(
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [_TIME_CALL]},
            _TIME_RESULT,
            {"role": "assistant", "content": "Noon.", "reasoning_content": "It is 12:00."},
        ),
        kwargs={"enable_thinking": True},
        outcomes={
            "v1": None,
            "v2": None,
            "v3": None,
            "v4": None,
            "v5": ("<turn|>\n<|channel>thought\n", "<|channel>thought\nIt is 12:00.\n<channel|>Noon.<turn|>\n"),
        },
    ),
    KnownPromptMismatch(
        case="thinking_after_tool_results",
        condition="enable_thinking=True and the assistant message follows tool results but has no reasoning",
        messages=(
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "", "tool_calls": [_TIME_CALL]},
            _TIME_RESULT,
            {"role": "assistant", "content": "Noon."},
        ),
        kwargs={"enable_thinking": True},
        outcomes={"v1": None, "v2": None, "v3": None, "v4": None, "v5": ("<|channel>thought\n", "Noon.<turn|>\n")},
    ),
)
"""Every class of generation-prompt inconsistency found in the official revisions (v2 has none)."""

REASONING_RENDERED: dict[str, str] = {
    "v1": "only in assistant messages with tool_calls after the last user message",
    "v2": "never",
    "v3": "only in assistant messages with tool_calls after the last user message",
    "v4": "only in assistant messages with tool_calls after the last user message",
    "v5": "in assistant messages after the last user message; with preserve_thinking=True also in earlier "
    "assistant messages with tool_calls",
}
"""When each official revision renders an assistant message's reasoning; elsewhere it is dropped.

All revisions also strip ``<|channel>...<channel|>`` blocks from assistant content."""

_REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")
_SENTINEL = "\x00gemma4-tune-reasoning\x00"


def dropped_reasoning(
    messages: Sequence[Message],
    *,
    revision: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> list[int]:
    """Indices of assistant messages whose reasoning the revision does not render (so never trains)."""
    dropped: list[int] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or not any(message.get(key) for key in _REASONING_KEYS):
            continue
        probe = {key: value for key, value in message.items() if key not in _REASONING_KEYS}
        probe["reasoning_content"] = _SENTINEL
        probed = [*messages[:i], probe, *messages[i + 1 :]]
        if _SENTINEL not in render(probed, revision=revision, tools=tools, **kwargs):
            dropped.append(i)
    return dropped


def official_template(revision: str) -> str:
    """Text of the official (published) template for ``revision``."""
    _check_revision(revision)
    return _read(f"gemma4_{revision}.jinja")


_PROBE = "\ue000gemma4-tune-probe\ue001"
END_OF_TURN = "<turn|>"


def message_regions(
    messages: Sequence[Message],
    *,
    revision: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> tuple[str, list[tuple[int, int] | None]]:
    """Rendered text and, per message, the ``[start, end)`` characters its content occupies in it.

    Each message's content is swapped for a probe string and rendered again: the text before the probe and
    after it must be the same as in the real rendering, so the content lies between them. None where a
    message's content is not rendered in one place (the template drops it, or renders it twice).
    """
    rendered = render(messages, revision=revision, tools=tools, **kwargs)
    regions: list[tuple[int, int] | None] = []
    for i, message in enumerate(messages):
        probed = render([*messages[:i], {**message, "content": _PROBE}, *messages[i + 1 :]], revision=revision,
                        tools=tools, **kwargs)
        at = probed.find(_PROBE)
        tail = len(probed) - at - len(_PROBE)
        end = len(rendered) - tail
        if at < 0 or probed.count(_PROBE) != 1 or end < at or rendered[:at] != probed[:at] \
                or rendered[end:] != probed[len(probed) - tail :]:
            regions.append(None)
            continue
        regions.append((at, end))
    return rendered, regions
