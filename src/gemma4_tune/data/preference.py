"""Preference data (DPO, KTO): each row read into a prompt, a chosen and a rejected answer (or, for KTO, one
answer and its label), checked before a model loads.

Files and splits are read by ``files.read_rows`` (JSON Lines, JSON, Parquet, CSV, Arrow, ``save_to_disk``, through
``datasets``); messages are read by the SFT path's own readers (``formats``: roles, ShareGPT ``from``/``value``,
tool calls, reasoning, ``images``/``audios`` columns with placeholders) and validated by ``records`` (content parts,
media paths resolved and checked), so a pair is made of exactly the message structures the SFT renderer and
collator take: ``pair.chosen_conversation()`` is a ``records.Conversation``.

Row formats, with the meaning TRL 1.16 gives them (``trl.data_utils``) and the shapes LLaMA-Factory and Axolotl use:

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings (TRL's explicit prompt, standard). Read as a user turn
  and an assistant answer, as the SFT path reads string prompt/completion; ``pair.plain_text`` says so.
- ``conversational``: ``prompt`` a list of messages, ``chosen`` / ``rejected`` lists of assistant messages (TRL's
  explicit prompt, conversational). A string prompt with message answers is one user turn.
- ``implicit``: ``chosen`` / ``rejected`` whole conversations (or strings) sharing the prompt; the prompt is their
  longest common prefix, taken exactly as ``trl.data_utils.extract_prompt`` takes it. A pair whose turns before the
  answer differ is G4T327. A string ``prompt`` next to conversational ``chosen`` / ``rejected`` that hold the user turn
  is ignored, as ``maybe_extract_prompt`` ignores it, and reported as not read.
- ``sharegpt``: ``conversations`` of ``from``/``value`` (the prompt) and ``chosen`` / ``rejected`` each one
  ``{"from": "gpt", "value": ...}`` message (LLaMA-Factory's ranking datasets; an optional ``system`` column).
- ``chat-template``: ``messages`` (the prompt: a list of messages, or a string for one user turn) and ``chosen`` /
  ``rejected`` each a message (``{"role": "assistant", "content": ...}``) or a string (Axolotl's
  ``chat_template.default`` DPO datasets; ``field_messages`` / ``message_property_mappings`` / ``roles`` apply).
- ``alpaca``: ``instruction`` (+ ``input``, ``system``, ``history``) and ``chosen`` / ``rejected`` strings
  (LLaMA-Factory's Alpaca ranking datasets).

KTO also reads unpaired rows, one answer labelled desirable (``True``) or not (``False``), as a ``LabelledAnswer``
(``load_preference_data(..., unpaired=True)``; for DPO such a row is G4T324, it has no pair):

- ``unpaired``: ``prompt``, ``completion`` (strings or message lists) and a boolean ``label`` (TRL's unpaired
  preference format, what ``trl.data_utils.unpair_preference_dataset`` writes).
- ``kto-messages``: ``messages`` (or ``conversations``) ending with the assistant answer, and a boolean ``label``
  or ``kto_tag`` (LLaMA-Factory's KTO datasets, ``kto_en_demo``: ``"columns": {"messages": "messages",
  "kto_tag": "label"}``, which the dataset_info reader passes as ``{"messages": "messages", "label": "label"}``);
  an optional ``system`` column.

A dataset's column mapping (``ChatOptions.columns``, our name -> the file's) renames each row's columns to ours
before its format is detected (``formats.apply_columns``: the columns it does not map are reported, never read);
findings name the file's columns.

Media in the prompt: content parts by path, or an ``images`` / ``audios`` column (``image`` / ``audio``) paired with
``<image>`` / ``<audio>`` placeholders or path-less ``{"type": "image"}`` parts, as for SFT. A conversational prompt
with an ``images`` column and no placeholder at all gets the images before the text of its first user turn, where
TRL's ``prepare_multimodal_messages`` puts them (a note in the summary says how many rows).

Every problem is one finding per problem with its count and first rows (G4T324-G4T328); fields nothing read are
G4T305, as for SFT; nothing usable left is G4T329.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.data.files import RowError, check_depth, read_rows
from gemma4_tune.data.formats import (
    MEANINGFUL_FIELDS,
    ChatOptions,
    apply_columns,
    chat_messages,
    fill_media,
    role_table,
    system_first,
)
from gemma4_tune.data.records import UNREAD_FIELD, Conversation, DataSource, is_empty_message, read_message
from gemma4_tune.findings import Finding, FindingError, Severity, finding, has_errors, register

NO_PREFERENCE_FORMAT = register("G4T324", Severity.ERROR, "Preference row in no recognised format")
IDENTICAL_PAIR = register("G4T325", Severity.ERROR, "Chosen and rejected answers are identical")
EMPTY_ANSWER = register("G4T326", Severity.ERROR, "Empty chosen or rejected answer")
PROMPT_DIFFERS = register("G4T327", Severity.ERROR, "Prompt differs between chosen and rejected")
INVALID_PAIR = register("G4T328", Severity.ERROR, "Invalid preference row")
NO_PAIRS = register("G4T329", Severity.ERROR, "Preference data has no usable pair")

PREFERENCE_FORMATS = {
    "standard": "prompt/chosen/rejected strings (TRL standard)",
    "conversational": "prompt/chosen/rejected messages (TRL conversational)",
    "implicit": "chosen/rejected with implicit prompt (TRL)",
    "sharegpt": "ShareGPT preference (conversations + chosen/rejected)",
    "chat-template": "messages + chosen/rejected (Axolotl chat_template)",
    "alpaca": "Alpaca preference (instruction + chosen/rejected)",
    "unpaired": "unpaired prompt/completion/label (TRL unpaired, KTO)",
    "kto-messages": "messages + label (LLaMA-Factory KTO)",
}
UNPAIRED_FORMATS = ("unpaired", "kto-messages")
_LABEL_KEYS = ("label", "kto_tag")
EXPECTED = ("prompt + chosen + rejected (strings or messages), chosen + rejected (conversations sharing the prompt), "
            "conversations + chosen + rejected (ShareGPT), messages + chosen + rejected (Axolotl chat_template), "
            "instruction + chosen + rejected (Alpaca)")
MAX_EXAMPLES = 5
_ANSWER_ROLES = ("assistant", "tool")

__all__ = ["PREFERENCE_FORMATS", "LabelledAnswer", "PreferencePair", "PreferenceReport", "extract_prompt",
           "load_preference_data", "read_preference_row"]


class _Media:
    """The media of a row's messages, in order of appearance (prompt first), as ``records.Conversation`` finds them."""

    messages: list[dict]
    tools: list[dict] | None
    source: str

    @property
    def images(self) -> list[str]:
        """Absolute image paths in order of appearance (prompt first)."""
        return Conversation(messages=self.messages, tools=self.tools, source=self.source).images

    @property
    def audios(self) -> list[str]:
        """Absolute audio paths in order of appearance (prompt first)."""
        return Conversation(messages=self.messages, tools=self.tools, source=self.source).audios


@dataclass(frozen=True)
class PreferencePair(_Media):
    """One validated preference pair in the SFT path's message structure.

    ``prompt`` holds the system/user (and earlier assistant/tool) messages, ``chosen`` and ``rejected`` the assistant
    message(s) answering it; content is always a list of ``text`` / ``image`` / ``audio`` parts, media parts carry an
    absolute ``path`` (as in ``records.Conversation``). ``plain_text`` is True for rows given as plain strings (TRL's
    standard format), read as a user turn and an assistant answer. ``source_row`` is the row's 0-based position among
    the rows read (after the split; counted on across several datasets), ``source`` its ``file:line`` (or ``file#N``).
    """

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    source_row: int
    format: str
    source: str = ""
    tools: list[dict] | None = None
    plain_text: bool = False

    def chosen_conversation(self) -> Conversation:
        """Prompt + chosen as a ``records.Conversation`` (what the SFT renderer and batcher encode)."""
        return Conversation(messages=[*self.prompt, *self.chosen], tools=self.tools, source=self.source)

    def rejected_conversation(self) -> Conversation:
        """Prompt + rejected as a ``records.Conversation``."""
        return Conversation(messages=[*self.prompt, *self.rejected], tools=self.tools, source=self.source)

    @property
    def messages(self) -> list[dict]:
        """Every message of the pair: prompt, chosen, rejected."""
        return [*self.prompt, *self.chosen, *self.rejected]


@dataclass(frozen=True)
class LabelledAnswer(_Media):
    """One validated unpaired KTO row: a prompt and one answer, ``label`` True when it is desirable.

    Fields mean what they mean in :class:`PreferencePair`; ``completion`` holds the assistant message(s).
    """

    prompt: list[dict]
    completion: list[dict]
    label: bool
    source_row: int
    format: str
    source: str = ""
    tools: list[dict] | None = None
    plain_text: bool = False

    def chosen_conversation(self) -> Conversation:
        """Prompt + the answer as a ``records.Conversation`` (what the SFT renderer and batcher encode)."""
        return Conversation(messages=self.messages, tools=self.tools, source=self.source)

    @property
    def messages(self) -> list[dict]:
        """Every message of the row: prompt, then the answer."""
        return [*self.prompt, *self.completion]


@dataclass
class PreferenceReport:
    """What loading found: rows read, kept and dropped (by problem), formats, modalities, unread fields; ``labels``
    counts the unpaired rows (KTO's) by label."""

    path: str
    format: str = ""
    formats: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    kept: int = 0
    total_rows: int = 0
    split: str | None = None
    reader: str = "datasets"
    dropped: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=lambda: {"text": 0, "image": 0, "audio": 0})
    labels: dict[str, int] = field(default_factory=lambda: {"desirable": 0, "undesirable": 0})
    plain_text_rows: int = 0
    multi_turn_prompts: int = 0
    images_before_first_user_turn: int = 0
    unread: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def summary(self) -> str:
        """One line a person reads: "ShareGPT preference ..., 1,204 pairs from data.jsonl (train[:10%] of 12,040)"."""
        split = f" ({self.split} of {self.total_rows:,})" if self.split else ""
        dropped = sum(self.dropped.values())
        extra = f", {dropped} invalid rows dropped" if dropped else ""
        answers = sum(self.labels.values())
        kept = [f"{self.kept - answers:,} pairs"] if self.kept > answers or not answers else []
        if answers:
            kept.append(f"{answers:,} unpaired answers ({self.labels['desirable']:,} desirable, "
                        f"{self.labels['undesirable']:,} undesirable)")
        return f"{self.format}, {', '.join(kept)} from {self.path}{split}{extra}"


class _Problem(Exception):
    """A problem with one preference row: its finding code, a reason key and what is wrong."""

    def __init__(self, code: str, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.code = code
        self.reason = reason


def _present(row: Mapping[str, Any], key: str) -> bool:
    return row.get(key) is not None


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _from_value(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return any(isinstance(m, Mapping) and "from" in m and "role" not in m for m in items)


def extract_prompt(chosen: Any, rejected: Any) -> dict[str, Any]:
    """The shared prompt of an implicit-prompt pair, exactly as ``trl.data_utils.extract_prompt`` takes it.

    The longest common prefix of ``chosen`` and ``rejected`` (strings: characters; conversations: whole messages),
    a space just before the first difference left with the answers; returns ``{"prompt", "chosen", "rejected"}``.
    Two degenerate cases differ from TRL, both refused before or after this is called: empty inputs give an empty
    prompt instead of a NameError (G4T326), and a pair differing from its first element keeps an empty prompt where
    TRL, when ``chosen`` ends with a space, takes ``chosen[:-1]`` (G4T327).
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def detect(row: Mapping[str, Any], options: ChatOptions) -> str:
    """The preference format of one row (``options.format`` when the config names it); G4T324 when there is none."""
    seen = ", ".join(f"{k} ({_type_name(row[k])})" for k in row if _present(row, k)) or "none"
    if options.format:
        if options.format not in PREFERENCE_FORMATS:
            raise _Problem(NO_PREFERENCE_FORMAT.code, "unknown_format",
                           f"unknown preference format {options.format!r} (known: {', '.join(PREFERENCE_FORMATS)})")
        messages = options.field_messages or ("conversations" if options.format == "sharegpt" else "messages")
        needed = {"standard": ("prompt",), "conversational": ("prompt",), "alpaca": ("instruction",),
                  "sharegpt": (messages,), "chat-template": (messages,), "unpaired": ("prompt", "completion"),
                  "kto-messages": (messages,)}.get(options.format, ())
        answers = () if options.format in UNPAIRED_FORMATS else ("chosen", "rejected")
        missing = [k for k in (*answers, *needed) if not _present(row, k)]
        if options.format in UNPAIRED_FORMATS and _label_key(row) is None:
            missing.append("label (or kto_tag)")
        if missing:
            raise _Problem(NO_PREFERENCE_FORMAT.code, "no_format", f"format {options.format!r} needs "
                           f"{', '.join(missing)} (columns: {seen})")
        return options.format
    if _label_key(row) is not None and not (_present(row, "chosen") or _present(row, "rejected")):
        if _present(row, "completion") and _present(row, "prompt"):
            return "unpaired"
        if any(_present(row, k) for k in (options.field_messages, "messages", "conversations") if k):
            return "kto-messages"
    if not (_present(row, "chosen") and _present(row, "rejected")):
        raise _Problem(NO_PREFERENCE_FORMAT.code, "no_format", f"columns: {seen}")
    chosen, rejected = row["chosen"], row["rejected"]
    answer_kinds = {type(chosen), type(rejected)}
    if answer_kinds == {list} and not isinstance(row.get("prompt"), list) and _holds_prompt(chosen, rejected, options):
        # whole conversations: the prompt is in them (trl maybe_extract_prompt ignores a string prompt beside them,
        # and a messages column, as in ultrafeedback_binarized, is not read either)
        return "implicit"
    field_messages = options.field_messages if options.field_messages and _present(row, options.field_messages) \
        else next((k for k in ("conversations", "messages") if _present(row, k)), None)
    if field_messages is not None and answer_kinds <= {str, dict, list}:
        sharegpt = _from_value(row[field_messages]) or _from_value(chosen) or field_messages == "conversations"
        return "sharegpt" if sharegpt else "chat-template"
    if _present(row, "prompt"):
        prompt = row["prompt"]
        if isinstance(prompt, str) and answer_kinds == {str}:
            return "standard"
        if answer_kinds <= {str, list} and (isinstance(prompt, list) or answer_kinds == {list}):
            return "conversational"
    elif _present(row, "instruction") and answer_kinds == {str}:
        return "alpaca"
    elif len(answer_kinds) == 1 and answer_kinds <= {str, list}:
        return "implicit"
    raise _Problem(NO_PREFERENCE_FORMAT.code, "no_format", f"columns: {seen}")


def _label_key(row: Mapping[str, Any]) -> str | None:
    """The column holding an unpaired row's desirability (``label``, TRL's; ``kto_tag``, LLaMA-Factory's)."""
    return next((k for k in _LABEL_KEYS if _present(row, k)), None)


def _file_names(fields: list[str], names: Mapping[str, str]) -> list[str]:
    """Fields (``a``, ``chosen[].b``) named as the file names their column (``formats.apply_columns``'s ``names``)."""
    out = []
    for name in fields:
        head = re.match(r"[^.\[]*", name).group(0)
        out.append(names.get(head, head) + name[len(head):])
    return out


def _holds_prompt(chosen: list, rejected: list, options: ChatOptions) -> bool:
    """True if a list of ``chosen`` / ``rejected`` messages holds a system or user turn (a whole conversation)."""
    roles = role_table(options)
    role_key = options.property_mappings.get("role")
    for message in (*chosen, *rejected):
        if isinstance(message, Mapping):
            name = message.get(role_key) if role_key else message.get("role", message.get("from"))
            if isinstance(name, str) and roles.get(name) in ("system", "user"):
                return True
    return False


def _messages(value: Any, name: str, options: ChatOptions, *, default_role: str) -> tuple[list[dict], list[str]]:
    """``value`` (a string, one message or a list of messages) as OpenAI-role messages, with the fields not read.

    Messages are read by the SFT reader (``formats._chat_messages``: role names, ShareGPT ``from``/``value``, tool
    calls, reasoning); a per-turn ``weight``/``training`` flag means nothing to DPO and is reported as not read.
    LLaMA-Factory v1's ``loss_weight`` is kept as ``_loss_weight`` for ``_check_loss_weights``: preference tuning
    trains exactly the answers, so it must say so (0 on the prompt, 1 on the answers).
    """
    if isinstance(value, str):
        return [{"role": default_role, "content": value}], []
    if isinstance(value, Mapping):
        value, name = [value], name
    if not isinstance(value, list):
        raise RowError("bad_message", name, f"expected a string, a message or a list of messages, got "
                       f"{_type_name(value)}")
    messages, unread = chat_messages(value, name, options, sharegpt=_from_value(value))
    for raw, message in zip(value, messages, strict=True):
        train = message.pop("train", None)
        if _present(raw, "loss_weight"):
            message["_loss_weight"] = train
        unread += [f"{name}[].{k}" for k in dict.fromkeys(("weight", "training", options.training_field or ""))
                   if k and _present(raw, k)]
    return messages, unread


def _answers_text(chosen: str, rejected: str) -> tuple[list[dict], list[dict]]:
    return [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]


def _read_raw(row: Mapping[str, Any], name: str, options: ChatOptions) -> tuple[dict[str, Any], set[str], list[str]]:
    """``{"prompt", "chosen", "rejected"}`` (OpenAI-role messages, content as given), the columns read, unread."""
    unread: list[str] = []
    read = {"chosen", "rejected", "tools"}

    def msgs(value: Any, key: str, role: str) -> list[dict]:
        out, extra = _messages(value, key, options, default_role=role)
        unread.extend(extra)
        return out

    if name == "standard":
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row[key], str):
                raise RowError("bad_field", key, f"the standard format has {key} as a string, got "
                               f"{_type_name(row[key])}")
        prompt = [{"role": "user", "content": row["prompt"]}]
        chosen, rejected = _answers_text(row["chosen"], row["rejected"])
        read.add("prompt")
    elif name == "conversational":
        prompt = msgs(row["prompt"], "prompt", "user")
        chosen, rejected = msgs(row["chosen"], "chosen", "assistant"), msgs(row["rejected"], "rejected", "assistant")
        read.add("prompt")
    elif name == "implicit":
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], (str, list)):
                raise RowError("bad_message", key, f"expected a conversation or a string, got {_type_name(row[key])}")
        if type(row["chosen"]) is not type(row["rejected"]):
            raise _Problem(NO_PREFERENCE_FORMAT.code, "no_format", "chosen and rejected are of different kinds "
                           f"({_type_name(row['chosen'])}, {_type_name(row['rejected'])})")
        if not row["chosen"] or not row["rejected"]:
            raise _Problem(EMPTY_ANSWER.code, "empty_answer", "chosen or rejected is empty")
        shorter, longer = sorted(("chosen", "rejected"), key=lambda k: len(row[k]))
        if len(row[shorter]) < len(row[longer]) and row[longer][:len(row[shorter])] == row[shorter]:
            raise _Problem(EMPTY_ANSWER.code, "empty_answer", f"{shorter} is all prompt: it ends where {longer} "
                           "goes on, so it has no answer of its own")
        parts = extract_prompt(row["chosen"], row["rejected"])
        if isinstance(row["chosen"], str):
            prompt = [{"role": "user", "content": parts["prompt"]}] if parts["prompt"] else []
            chosen, rejected = _answers_text(parts["chosen"], parts["rejected"])
        else:
            prompt = msgs(parts["prompt"], "chosen", "user") if parts["prompt"] else []
            chosen = msgs(parts["chosen"], "chosen", "assistant") if parts["chosen"] else []
            rejected = msgs(parts["rejected"], "rejected", "assistant") if parts["rejected"] else []
            stray = [m["role"] for m in (*chosen, *rejected) if m["role"] not in _ANSWER_ROLES]
            if stray or not prompt:
                at = len(parts["prompt"])
                raise _Problem(PROMPT_DIFFERS.code, "prompt_differs", f"chosen and rejected differ at message {at} "
                               f"({'a ' + stray[0] + ' turn' if stray else 'the first message'}), before the answer: "
                               "the prompt is not shared")
        if not prompt:
            raise _Problem(PROMPT_DIFFERS.code, "prompt_differs", "chosen and rejected share no prompt (they differ "
                           "from their first character)")
    elif name in ("sharegpt", "chat-template"):
        key = options.field_messages if options.field_messages and _present(row, options.field_messages) else (
            "conversations" if _present(row, "conversations") else "messages")
        prompt = system_first(row, msgs(row.get(key), key, "user"))
        chosen, rejected = msgs(row["chosen"], "chosen", "assistant"), msgs(row["rejected"], "rejected", "assistant")
        read |= {key, "system"}
    elif name == "alpaca":
        text = row["instruction"] if isinstance(row["instruction"], str) else None
        if text is None or not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            raise RowError("bad_field", "instruction", "an Alpaca preference row needs instruction, chosen and "
                           "rejected as strings")
        if isinstance(row.get("input"), str) and row["input"]:
            text = f"{text}\n{row['input']}"
        prompt = []
        for k, turn in enumerate(row.get("history") or []):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
                raise RowError("bad_field", f"history[{k}]", "expected a [question, answer] pair of strings")
            prompt += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        prompt = system_first(row, [*prompt, {"role": "user", "content": text}])
        chosen, rejected = _answers_text(row["chosen"], row["rejected"])
        read |= {"instruction", "input", "system", "history"}
    else:  # pragma: no cover - detect() only returns known names
        raise AssertionError(name)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": row.get("tools")}, read, unread


def _check_loss_weights(raw: dict[str, Any]) -> None:
    """LLaMA-Factory v1's per-message ``loss_weight`` in preference rows, read with its meaning: the prompt's
    messages 0 (not trained), the answers' 1; anything else would train other tokens than DPO/KTO train: an error."""
    for key in ("prompt", "chosen", "rejected", "completion"):
        for i, message in enumerate(raw.get(key) or []):
            weight = message.pop("_loss_weight", None) if isinstance(message, dict) else None
            if weight is None or weight == (key != "prompt"):
                continue
            where = "the prompt" if key == "prompt" else f"the {key} answer"
            raise RowError("bad_field", f"{key}[{i}].loss_weight", f"loss_weight {int(weight)} on a message of {where}: "
                           "preference tuning trains exactly the answers (loss_weight 1) against the prompt (loss_weight "
                           "0); fix the weights or move the message")


def _read_unpaired(row: Mapping[str, Any], name: str, options: ChatOptions
                   ) -> tuple[dict[str, Any], set[str], list[str]]:
    """An unpaired row as ``{"prompt", "completion", "label", "tools"}`` (OpenAI-role messages), the columns read,
    the fields not read."""
    unread: list[str] = []
    label_key = _label_key(row)
    label = row[label_key]
    if not isinstance(label, bool):
        raise RowError("bad_field", label_key, f"the {label_key} of an unpaired row is true (a desirable answer) or "
                       f"false (an undesirable one), got {_type_name(label)} {label!r}")
    read = {label_key, "tools"}
    if name == "unpaired":
        prompt, extra = _messages(row["prompt"], "prompt", options, default_role="user")
        completion, more = _messages(row["completion"], "completion", options, default_role="assistant")
        unread += extra + more
        read |= {"prompt", "completion"}
    else:
        key = next(k for k in (options.field_messages, "messages", "conversations") if k and _present(row, k))
        messages, unread = _messages(row[key], key, options, default_role="user")
        if not messages or messages[-1].get("role") != "assistant":
            last = messages[-1].get("role") if messages else "nothing"
            raise RowError("answer_not_assistant", f"{key}[-1]", f"the last message is {last!r}: an unpaired "
                           "row's messages end with the assistant answer that is labelled")
        prompt, completion = system_first(row, messages[:-1]), messages[-1:]
        read |= {key, "system"}
    return {"prompt": prompt, "completion": completion, "label": label, "tools": row.get("tools")}, read, unread


def _fill_prompt_media(prompt: list[dict], row: Mapping[str, Any], plain: bool) -> tuple[set[str], bool]:
    """Pair the row's ``images``/``audios`` columns with the prompt (``formats._fill_media``), the columns used and
    whether images were put before the first user turn's text as TRL does (a conversational prompt, no placeholder)."""
    placed = False
    column = next((c for c in ("images", "image") if _present(row, c)), None)
    if column is not None and not plain:
        values = row[column] if isinstance(row[column], list) else [row[column]]
        def slots(m: dict) -> int:
            content = m.get("content")
            if isinstance(content, str):
                return content.count("<image>")
            return sum(1 for p in content or [] if isinstance(p, Mapping) and p.get("type") == "image"
                       and not p.get("path") and not p.get("image") and not p.get("url"))
        first_user = next((m for m in prompt if m.get("role") == "user" and isinstance(m.get("content"), str)), None)
        if values and first_user is not None and not any(slots(m) for m in prompt):
            text = {"type": "text", "text": first_user["content"]}
            first_user["content"] = [*({"type": "image"} for _ in values), text]
            placed = True
    return fill_media(prompt, row), placed


def _blank(message: dict) -> bool:
    """A message with no media, no tool calls and only blank text."""
    return not message.get("tool_calls") and all(p["type"] == "text" and not p["text"].strip()
                                                 for p in message["content"])


def _validate(raw: dict[str, Any], base: Path) -> tuple[list[dict], dict[str, list[dict]], Any]:
    """The prompt, the answers (``chosen`` and ``rejected``, or an unpaired row's ``completion``) and the tools,
    each message validated by ``records.read_message``."""
    nulls: Counter[str] = Counter()
    prompt = [read_message(m, f"prompt[{i}]", base, nulls) for i, m in enumerate(raw["prompt"])]
    keys = ("completion",) if "completion" in raw else ("chosen", "rejected")
    answers = {}
    for key in keys:
        messages = [read_message(m, f"{key}[{i}]", base, nulls) for i, m in enumerate(raw[key])]
        for i, m in enumerate(messages):
            if m["role"] not in _ANSWER_ROLES or (i == 0 and m["role"] != "assistant"):
                raise RowError("answer_not_assistant", f"{key}[{i}].role", f"a {m['role']} turn in the {key} answer: "
                               f"{key} holds the assistant message(s) answering the prompt (tool results only after "
                               "an assistant tool call); put the other turns in the prompt")
        answers[key] = messages
    if all(_blank(m) for m in prompt):
        raise RowError("empty_prompt", "prompt", "empty prompt: there is nothing for the answers to answer")
    for key in keys:
        if not answers[key] or all(is_empty_message(m) for m in answers[key] if m["role"] == "assistant"):
            raise _Problem(EMPTY_ANSWER.code, "empty_answer", f"the {key} answer is empty (no text, tool calls or "
                           "reasoning)")
    if keys == ("chosen", "rejected") and json.dumps(answers["chosen"], sort_keys=True, default=str) == json.dumps(answers["rejected"], sort_keys=True,
                                                                                   default=str):
        raise _Problem(IDENTICAL_PAIR.code, "identical", "chosen and rejected are the same answer")
    tools = raw.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RowError("bad_field", "tools", f"not valid JSON ({exc.msg})") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise RowError("bad_field", "tools", f"expected a list of tool schemas, got {_type_name(tools)}")
    return prompt, answers, tools or None


def _v1_pair(row: dict[str, Any], names: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """LLaMA-Factory v1's pair rows: ``chosen_messages`` / ``rejected_messages`` are conversations sharing their
    prompt (TRL's implicit-prompt shape), read as ``chosen`` / ``rejected``."""
    renamed = {{"chosen_messages": "chosen", "rejected_messages": "rejected"}.get(k, k): v for k, v in row.items()}
    theirs = {{"chosen_messages": "chosen", "rejected_messages": "rejected"}.get(k, k): names.get(k, k) for k in row}
    return renamed, theirs


def read_preference_row(row: Any, where: str, index: int, base: Path, options: ChatOptions | None = None, *,
                        unpaired: bool = False) -> tuple[PreferencePair | LabelledAnswer, list[str], bool]:
    """One raw row as a validated ``PreferencePair`` (or, with ``unpaired``, KTO's, an unpaired row as a
    ``LabelledAnswer``), the fields nothing read, and whether images were placed as TRL places them. The dataset's
    column mapping (``options.columns``) is applied first. Raises ``_Problem`` (a finding code) or ``RowError``
    (G4T328) for a bad row."""
    options = options or ChatOptions()
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, Mapping):
        raise _Problem(NO_PREFERENCE_FORMAT.code, "not_an_object", f"expected a JSON object, got {_type_name(row)}")
    check_depth(row)
    row, names = apply_columns(row, options.columns)
    if {"chosen_messages", "rejected_messages"} <= set(row) and not {"chosen", "rejected"} & set(row):
        row, names = _v1_pair(row, names)
    name = detect(row, options)
    if name in UNPAIRED_FORMATS and not unpaired:
        raise _Problem(NO_PREFERENCE_FORMAT.code, "unpaired", "an unpaired row (one answer and a label: KTO data) "
                       "has no pair of answers to compare; train it with --method kto")
    raw, read, unread = (_read_unpaired if name in UNPAIRED_FORMATS else _read_raw)(row, name, options)
    _check_loss_weights(raw)
    plain = (name in ("standard", "alpaca") or (name == "implicit" and isinstance(row["chosen"], str))
             or (name == "unpaired" and isinstance(row["prompt"], str) and isinstance(row["completion"], str)))
    used, placed = _fill_prompt_media(raw["prompt"], row, plain)
    read |= used
    prompt, answers, tools = _validate(raw, base)
    unread = _file_names([k for k in row if _present(row, k) and k not in read] + unread, names)
    item: PreferencePair | LabelledAnswer
    if "completion" in answers:
        item = LabelledAnswer(prompt=prompt, completion=answers["completion"], label=raw["label"], source_row=index,
                              format=name, source=where, tools=tools, plain_text=plain)
    else:
        item = PreferencePair(prompt=prompt, chosen=answers["chosen"], rejected=answers["rejected"],
                              source_row=index, format=name, source=where, tools=tools, plain_text=plain)
    return item, list(dict.fromkeys(unread)), placed


_TITLES = {
    NO_PREFERENCE_FORMAT.code: (f"are in no recognised preference format (expected {EXPECTED})",
                                "convert these rows to one of the preference shapes (docs/formats.md), or remove "
                                "them"),
    IDENTICAL_PAIR.code: ("have identical chosen and rejected answers: DPO learns nothing from such a pair (its "
                          "log-ratio difference is 0 whatever the model does)",
                          "fix the pairs so that rejected is the worse answer, or remove them"),
    EMPTY_ANSWER.code: ("have an empty chosen or rejected answer",
                        "put the answer text (or tool calls) in both chosen and rejected, or remove the rows"),
    PROMPT_DIFFERS.code: ("have a prompt that differs between chosen and rejected (implicit prompt: the turns before "
                          "the answer must be the same in both), so no pair compares two answers to one prompt",
                          "make chosen and rejected share every turn before the final answer, or give the prompt "
                          "explicitly (prompt + chosen + rejected)"),
    INVALID_PAIR.code: ("are invalid preference rows", "fix or remove these rows (docs/formats.md)"),
    (NO_PREFERENCE_FORMAT.code, "unpaired"): ("are unpaired (an answer and a label, no rejected answer): DPO "
                                              "compares two answers to one prompt",
                                              "train these rows with --method kto, or give each prompt a chosen and a "
                                              "rejected answer"),
}


def _problem_findings(path: str, rows: int, problems: dict[tuple[str, str], list[str]], messages: dict[tuple, str],
                      skip_invalid: bool) -> list[Finding]:
    found = []
    for (code, reason), where in problems.items():
        what, fix = _TITLES.get((code, reason)) or _TITLES[code]
        first = "; ".join([f"{messages[(code, reason, w)]}" for w in where[:MAX_EXAMPLES]])
        kind = f" ({reason})" if code == INVALID_PAIR.code else ""
        dropped = ", dropped (--skip-invalid)" if skip_invalid else ""
        found.append(finding(
            code, f"{path}: {len(where)} of {rows} rows {what}{kind}{dropped}; the first: {first}",
            fix + ("" if skip_invalid else "; or pass --skip-invalid (skip_invalid=True) to drop and count them"),
            severity=Severity.WARNING if skip_invalid else None, path=path, reason=reason, count=len(where),
            rows=where[:MAX_EXAMPLES],
        ))
    return found


def _unread_finding(path: str, unread: Counter[str], unread_at: dict[str, str]) -> list[Finding]:
    if not unread:
        return []
    meaningful = sorted(k for k in unread if k.rsplit(".", 1)[-1] in MEANINGFUL_FIELDS)
    listed = ", ".join(f"{k} ({unread[k]} rows, e.g. {unread_at[k]})" for k in sorted(unread))
    why = (f"{', '.join(meaningful)} would change what is trained if it were ignored" if meaningful
           else "their values are not used in training")
    return [finding(
        UNREAD_FIELD.code, f"{path}: fields not read: {listed}; {why}",
        "remove them, or give them as gemma4-tune reads preference rows (docs/formats.md: prompt/chosen/rejected, "
        "images/audios with <image>/<audio> placeholders in the prompt; DPO has no per-turn weight)",
        severity=Severity.ERROR if meaningful else Severity.WARNING, path=path, fields=dict(unread),
    )]


def _read_source(source: DataSource, skip_invalid: bool, unpaired: bool
                 ) -> tuple[list[PreferencePair | LabelledAnswer], PreferenceReport, list[Finding]]:
    rows = read_rows(source.path, source.split)
    report = PreferenceReport(path=source.path, total_rows=rows.total_rows, split=source.split, reader=rows.reader,
                              notes=list(rows.notes))
    problems: dict[tuple[str, str], list[str]] = {}
    messages: dict[tuple, str] = {}
    formats: Counter[str] = Counter()
    unread: Counter[str] = Counter()
    unread_at: dict[str, str] = {}
    pairs: list[PreferencePair | LabelledAnswer] = []
    for index, (where, row) in enumerate(rows.rows):
        report.rows += 1
        try:
            pair, row_unread, placed = read_preference_row(row, where, index, rows.base, source.options,
                                                           unpaired=unpaired)
        except (_Problem, RowError) as err:
            code = err.code if isinstance(err, _Problem) else INVALID_PAIR.code
            reason = err.reason
            problems.setdefault((code, reason), []).append(where)
            detail = str(err)
            messages[(code, reason, where)] = f"{where}: {detail}" if detail else where
            continue
        formats[pair.format] += 1
        for key in row_unread:
            unread[key] += 1
            unread_at.setdefault(key, where)
        if isinstance(pair, LabelledAnswer):
            report.labels["desirable" if pair.label else "undesirable"] += 1
        report.plain_text_rows += pair.plain_text
        report.multi_turn_prompts += sum(m["role"] == "user" for m in pair.prompt) > 1
        report.images_before_first_user_turn += placed
        kinds = [k for k in ("image", "audio") if getattr(pair, f"{k}s")]
        for kind in kinds or ["text"]:
            report.modalities[kind] += 1
        pairs.append(pair)
    report.kept = len(pairs)
    report.formats = dict(formats.most_common())
    report.format = ", ".join(PREFERENCE_FORMATS[name] for name in report.formats) or "no rows"
    report.unread = dict(sorted(unread.items()))
    if skip_invalid:
        dropped: Counter[str] = Counter()
        for (_, reason), where in problems.items():
            dropped[reason] += len(where)
        report.dropped = dict(sorted(dropped.items()))
    if report.plain_text_rows:
        report.notes.append(f"{report.plain_text_rows} rows give plain strings (TRL's standard format): each is read "
                            "as a user turn and an assistant answer and rendered with the chat template, as string "
                            "prompt/completion rows are for SFT (TRL would train them as raw text without a template)")
    if report.images_before_first_user_turn:
        report.notes.append(f"{report.images_before_first_user_turn} rows have an images column and no <image> "
                            "placeholder: their images go before the text of the first user turn, as TRL puts them")
    found = _problem_findings(source.path, report.rows, problems, messages, skip_invalid)
    found += _unread_finding(source.path, unread, unread_at)
    if not pairs and not has_errors(found):
        reasons = ", ".join(f"{reason} ({n})" for reason, n in report.dropped.items())
        found.append(finding(
            NO_PAIRS.code, f"{source.path}: no usable preference pair ({report.rows} rows, "
            f"{sum(report.dropped.values())} dropped as invalid{': ' + reasons if reasons else ''})",
            "add rows with a prompt, a chosen and a rejected answer; if rows were dropped, fix the problems listed "
            "in the findings", path=source.path, dropped=[f.one_line() for f in found],
        ))
    return pairs, report, found


def load_preference_data(
    data: str | Path | DataSource | Sequence[str | Path | DataSource], *, split: str | None = None,
    options: ChatOptions | None = None, skip_invalid: bool = False, raise_errors: bool = True, unpaired: bool = False,
) -> tuple[list[PreferencePair | LabelledAnswer], PreferenceReport, list[Finding]]:
    """Read and validate every preference pair of one or more data files or ``save_to_disk`` directories.

    ``data`` is a path, a ``records.DataSource`` (path, split, ``ChatOptions``) or a list of them; ``split`` and
    ``options`` apply to plain paths. Returns the valid pairs in order, one report (``sources`` holds one summary per
    dataset) and the findings: one per problem with its count and first rows (G4T324-G4T328), G4T305 for fields
    nothing read, G4T329 when no pair is usable. Without ``skip_invalid`` a bad row is an error; with it, bad rows
    are dropped and the findings say how many (warnings). With ``raise_errors`` (the default) any error finding is
    raised, all of them at once, as a ``FindingError``; file problems (G4T303, G4T306, G4T307) always raise.
    With ``unpaired`` (KTO), unpaired rows (an answer and its label) are read too, as ``LabelledAnswer``; without it
    they are G4T324.
    """
    items = list(data) if isinstance(data, Sequence) and not isinstance(data, str) else [data]
    sources = [item if isinstance(item, DataSource) else DataSource(str(item), split, options or ChatOptions())
               for item in items]
    pairs: list[PreferencePair | LabelledAnswer] = []
    findings: list[Finding] = []
    parts: list[PreferenceReport] = []
    for source in sources:
        got, part, found = _read_source(source, skip_invalid, unpaired)
        offset = sum(p.rows for p in parts)
        pairs += got if not offset else [_reindex(p, offset) for p in got]
        findings += found
        parts.append(part)
    report = parts[0] if len(parts) == 1 else _merge(parts)
    report.sources = [{"path": p.path, "format": p.format, "rows": p.kept, "total_rows": p.total_rows,
                       "split": p.split, "reader": p.reader, "summary": p.summary()} for p in parts]
    if raise_errors and has_errors(findings):
        raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
    return pairs, report, findings


def _reindex(pair: PreferencePair | LabelledAnswer, offset: int) -> PreferencePair | LabelledAnswer:
    from dataclasses import replace

    return replace(pair, source_row=pair.source_row + offset)


def _merge(parts: list[PreferenceReport]) -> PreferenceReport:
    report = PreferenceReport(path=" + ".join(p.path for p in parts))
    for part in parts:
        for name in ("rows", "kept", "total_rows", "plain_text_rows", "multi_turn_prompts",
                     "images_before_first_user_turn"):
            setattr(report, name, getattr(report, name) + getattr(part, name))
        for name in ("formats", "dropped", "modalities", "unread", "labels"):
            merged = getattr(report, name)
            for key, n in getattr(part, name).items():
                merged[key] = merged.get(key, 0) + n
        report.notes += [f"{part.path}: {note}" for note in part.notes]
    report.format = ", ".join(PREFERENCE_FORMATS[name] for name in report.formats) or "no rows"
    return report
