"""Training records: read every dataset, validate each row, before any model is loaded.

``files`` reads the rows (JSON Lines, JSON, Parquet, CSV, Arrow, ``save_to_disk`` directories, through
``datasets``, with a split honoured exactly); ``formats`` reads each row's format (OpenAI chat, ShareGPT,
Alpaca, prompt/completion, plain text, image/audio columns) into one chat shape; this module validates that
shape: roles system, user, assistant and tool; content a string or a list of ``text`` / ``image`` / ``audio``
parts, media paths relative to the file's directory; assistant ``tool_calls`` (OpenAI style) and reasoning,
tool turns ``tool_call_id`` and ``name``; a per-message ``train`` flag where the data says which turns are
supervised (a ``weight``, ``roles_to_train``).

Every problem names the file, the line (or row) and the field. A file that mixes formats (G4T304), a field
nothing reads (G4T305: a warning, an error where ignoring it would change what is trained) are findings.
Conversations come back normalised: content is always a list of parts and media parts carry an absolute
``path``; a plain-text row is a conversation with ``text`` and no messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.data.files import DATA_NOT_FOUND, RowError, check_depth, load_json, read_rows, remote_reference
from gemma4_tune.data.formats import FORMAT_NAMES, MEANINGFUL_FIELDS, ChatOptions, read_row
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register

INVALID_ROW = register("G4T301", Severity.ERROR, "Invalid training row")
NOTHING_TO_LEARN = register("G4T302", Severity.ERROR, "Dataset has nothing to learn", (12,))
MIXED_FORMATS = register("G4T304", Severity.ERROR, "A data file mixes row formats")
UNREAD_FIELD = register("G4T305", Severity.WARNING, "A data field is not read")
ARROW_NULLS = register("G4T308", Severity.WARNING, "Null tool-call arguments dropped (Arrow fills missing keys)")

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image", "audio", "video")
MAX_EXAMPLES = 5
__all__ = ["DATA_NOT_FOUND", "ChatOptions", "Conversation", "DataReport", "DataSource", "load_conversations",
           "load_datasets", "conversation_key", "split_conversations"]

_FORMAT_HINT = (
    'see docs/formats.md: OpenAI {"messages": [...]}, ShareGPT {"conversations": [...]}, Alpaca '
    '{"instruction", "input", "output"}, {"prompt", "completion"} or {"text"}'
)


@dataclass(frozen=True)
class Conversation:
    """One validated, normalised conversation.

    ``messages`` content is always a list of parts; image and audio parts carry an absolute
    ``path``; assistant ``tool_calls`` have their ``arguments`` parsed to dicts; a message may carry
    ``train`` (whether its turn is supervised, where the data says so). A plain-text row has ``text``
    (every token supervised) and no messages.
    """

    messages: list[dict]
    tools: list[dict] | None
    source: str
    text: str | None = None

    def _media(self, kind: str) -> list[str]:
        return [part["path"] for m in self.messages for part in m["content"] if part["type"] == kind]

    @property
    def images(self) -> list[str]:
        """Absolute image paths in order of appearance."""
        return self._media("image")

    @property
    def audios(self) -> list[str]:
        """Absolute audio paths in order of appearance."""
        return self._media("audio")


@dataclass(frozen=True)
class DataSource:
    """One dataset to read: a path, an optional ``datasets`` split (``train[:10%]``) and how to read its rows."""

    path: str
    split: str | None = None
    options: ChatOptions = field(default_factory=ChatOptions)


@dataclass
class DataReport:
    """What loading found: rows read, kept and dropped (by reason), formats, modalities, turns, supervision."""

    path: str
    format: str = ""
    rows: int = 0
    kept: int = 0
    total_rows: int = 0
    split: str | None = None
    reader: str = "datasets"
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    modalities: dict[str, int] = field(default_factory=lambda: {"text": 0, "image": 0, "audio": 0})
    assistant_turns: int = 0
    empty_assistant_turns: int = 0
    turns_not_supervised: int = 0
    supervised_roles: dict[str, int] = field(default_factory=dict)
    text_rows: int = 0
    unread: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        data = asdict(self)
        data["findings"] = [f.to_dict() for f in self.findings]
        return data

    def summary(self) -> str:
        """One line a person reads: "ShareGPT, 1,204 rows from data.jsonl (train[:10%] of 12,040)"."""
        split = f" ({self.split} of {self.total_rows:,})" if self.split else ""
        dropped = sum(self.dropped.values())
        extra = f", {dropped} invalid rows dropped" if dropped else ""
        return f"{self.format}, {self.kept:,} rows from {self.path}{split}{extra}"


_RowError = RowError


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _present(row: dict, key: str) -> bool:
    """True if ``key`` holds a value (datasets fills absent struct fields with None)."""
    return row.get(key) is not None


def _media_part(part: dict, kind: str, at: str, base: Path) -> dict:
    raw = part.get("path")
    if raw is None:
        nested = part.get(kind) or part.get("url")
        raw = (nested.get("url") or nested.get("path")) if isinstance(nested, dict) else nested
    kind = {"image_url": "image", "input_audio": "audio"}.get(kind, kind)
    if isinstance(raw, str) and raw.startswith("file://"):
        raw = raw[len("file://"):]
    if isinstance(raw, str) and (raw.startswith("data:") or remote_reference(raw) == "URL"):
        what = "inline data URL" if raw.startswith("data:") else f"URL {raw[:120]}"
        raise _RowError("remote_media", f"{at}", f"the {kind} is given as an {what}: gemma4-tune never fetches or "
                        f"decodes media at run time; download it and give a local file path")
    if not isinstance(raw, str) or not raw:
        problem = f"an {kind} part needs a file path, got {_type_name(raw)}"
        raise _RowError("bad_content", f"{at}.path", problem)
    resolved = os.path.abspath(base / os.path.expanduser(raw))
    if not os.path.isfile(resolved):
        raise _RowError("media_not_found", f"{at}.path", f"{kind} file not found: {resolved}")
    return {"type": kind, "path": resolved}


def _parts(content: Any, where: str, role: str, base: Path) -> list[dict]:
    if content is None and role == "assistant":
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        problem = f"expected a string or a list of parts, got {_type_name(content)}"
        raise _RowError("bad_content", f"{where}.content", problem)
    parts: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _RowError("bad_content", at, f"expected a part object, got {_type_name(part)}")
        kind = part.get("type")
        if kind not in (*PART_TYPES, "image_url", "input_audio"):
            problem = f"unknown part type {kind!r} (expected {', '.join(PART_TYPES)})"
            raise _RowError("unknown_part_type", f"{at}.type", problem)
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _RowError("bad_content", f"{at}.text", f"expected a string, got {_type_name(text)}")
            parts.append({"type": "text", "text": text})
            continue
        parts.append(_media_part(part, kind, at, base))
    return parts


def _tool_calls(calls: Any, where: str, nulls: Counter[str]) -> list[dict]:
    if not isinstance(calls, list):
        problem = f"expected a list of tool calls, got {_type_name(calls)}"
        raise _RowError("bad_tool_calls", f"{where}.tool_calls", problem)
    out: list[dict] = []
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise _RowError("bad_tool_calls", at, f"expected an object, got {_type_name(call)}")
        if call.get("type") not in ("function", None):
            problem = f"unknown tool call type {call['type']!r} (expected 'function')"
            raise _RowError("bad_tool_calls", f"{at}.type", problem)
        function = call.get("function")
        if not isinstance(function, dict):
            problem = f'expected {{"name": ..., "arguments": ...}}, got {_type_name(function)}'
            raise _RowError("bad_tool_calls", f"{at}.function", problem)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            problem = f"expected a function name, got {_type_name(name)}"
            raise _RowError("bad_tool_calls", f"{at}.function.name", problem)
        arguments = function.get("arguments")
        if arguments is None:
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = load_json(arguments, f"{at}.function.arguments") if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
                raise _RowError("bad_tool_calls", f"{at}.function.arguments", problem) from None
        elif isinstance(arguments, dict) and "arrow" in nulls:
            for key in [key for key, value in arguments.items() if value is None]:
                nulls[key] += 1
                del arguments[key]
        if not isinstance(arguments, dict):
            problem = f"expected a JSON object, got {_type_name(arguments)}"
            raise _RowError("bad_tool_calls", f"{at}.function.arguments", problem)
        normalised: dict[str, Any] = {"id": str(call["id"])} if _present(call, "id") else {}
        normalised.update(type="function", function={"name": name, "arguments": arguments})
        out.append(normalised)
    return out


def read_message(raw: Any, where: str, base: Path, nulls: Counter[str]) -> dict:
    """One message normalised and checked: role, content parts (media paths resolved against ``base``)."""
    if not isinstance(raw, dict):
        raise _RowError("bad_message", where, f"expected a message object, got {_type_name(raw)}")
    role = raw.get("role")
    if role not in ROLES:
        problem = "missing" if role is None else f"unknown role {role!r}"
        raise _RowError("unknown_role", f"{where}.role", f"{problem} (expected {', '.join(ROLES)})")
    message: dict[str, Any] = {"role": role, "content": _parts(raw.get("content"), where, role, base)}
    if _present(raw, "tool_calls"):
        if role != "assistant":
            problem = f"only assistant turns make tool calls, not {role}"
            raise _RowError("bad_tool_calls", f"{where}.tool_calls", problem)
        message["tool_calls"] = _tool_calls(raw["tool_calls"], where, nulls)
    extras = {"assistant": ("reasoning_content",), "tool": ("tool_call_id", "name")}.get(role, ())
    for key in (k for k in extras if _present(raw, k)):
        if not isinstance(raw[key], str):
            raise _RowError("bad_field", f"{where}.{key}", f"expected a string, got {_type_name(raw[key])}")
        message[key] = raw[key]
    if "train" in raw:
        message["train"] = bool(raw["train"])
    return message


def is_empty_message(message: dict) -> bool:
    """An assistant turn with no text, tool calls or reasoning: nothing to supervise."""
    text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
    reasoning = message.get("reasoning_content", "")
    return not text.strip() and not message.get("tool_calls") and not reasoning.strip()


def _conversation(canonical: dict, source: str, base: Path, nulls: Counter[str]) -> Conversation:
    if "text" in canonical:
        return Conversation(messages=[], tools=None, source=source, text=canonical["text"])
    raw = canonical["messages"]
    if not raw:
        raise _RowError("empty_conversation", "messages", "empty conversation")
    messages = [read_message(m, f"messages[{i}]", base, nulls) for i, m in enumerate(raw)]
    answering = False  # inside the tool results of an assistant turn that made tool calls
    for i, message in enumerate(messages):
        if message["role"] == "tool" and not answering:
            raise _RowError("orphan_tool_result", f"messages[{i}]", "a tool result with no assistant tool call "
                            "before it: the official Gemma 4 templates (v1, v3-v5) drop it without a word, so the "
                            "model would never see it (and OpenAI's format refuses it); add the assistant turn "
                            "with its tool_calls, or remove the tool message")
        answering = message["role"] == "tool" or bool(message.get("tool_calls"))
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError("no_assistant_turn", "messages", "no assistant turn (nothing to train on)")
    tools = canonical.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _RowError("bad_field", "tools", f"expected a list of tool schemas, got {_type_name(tools)}")
    for k, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            problem = f"expected a tool schema object, got {_type_name(tool)}"
            raise _RowError("bad_field", f"tools[{k}]", problem)
    return Conversation(messages=messages, tools=tools or None, source=source)


def _supervised(message: dict) -> bool:
    return message.get("train", message["role"] == "assistant")


def _count(report: DataReport, conversation: Conversation) -> None:
    if conversation.text is not None:
        report.text_rows += 1
        report.modalities["text"] += 1
        return
    kinds = [kind for kind in ("image", "audio", "video") if conversation._media(kind)]
    for kind in kinds or ["text"]:
        report.modalities[kind] = report.modalities.get(kind, 0) + 1
    for message in conversation.messages:
        if _supervised(message):
            report.supervised_roles[message["role"]] = report.supervised_roles.get(message["role"], 0) + 1
        if message["role"] == "assistant":
            report.assistant_turns += 1
            report.empty_assistant_turns += is_empty_message(message)
            report.turns_not_supervised += not _supervised(message)


def _file_findings(path: str, formats: Counter[str], firsts: dict[str, str], unread: Counter[str],
                   unread_at: dict[str, str], nulls: Counter[str]) -> list[Finding]:
    """G4T304 (raised) for a file of several formats; G4T305 for fields nothing read; G4T308 for dropped nulls."""
    found: list[Finding] = []
    if len(formats) > 1:
        mix = "; ".join(f"{FORMAT_NAMES[name]}: {n} rows, first at {firsts[name]}" for name, n in formats.most_common())
        # Chat formats all become conversations supervised the same way; plain text is supervised whole.
        text = "text" in formats
        mixed = finding(
            MIXED_FORMATS.code, f"{path} mixes row formats ({mix})" + (
                ": plain-text rows are supervised on every token, the others on the model's turns only" if text
                else ""),
            "convert every row to one format, or split the file by format and list each as its own dataset "
            "(datasets: [{path: a.jsonl}, {path: b.jsonl}] in YAML)", path=path, formats=dict(formats),
            severity=Severity.ERROR if text else Severity.WARNING,
        )
        if text:
            raise FindingError(mixed)
        found.append(mixed)
    meaningful = sorted(k for k in unread if k.rsplit(".", 1)[-1] in MEANINGFUL_FIELDS)
    if unread:
        listed = ", ".join(f"{k} ({unread[k]} rows, e.g. {unread_at[k]})" for k in sorted(unread))
        severity = Severity.ERROR if meaningful else Severity.WARNING
        why = (f"{', '.join(meaningful)} would change what is trained if it were ignored" if meaningful
               else "their values are not used in training")
        found.append(finding(
            UNREAD_FIELD.code, f"{path}: fields not read: {listed}; {why}",
            "remove them, or map them to what gemma4-tune reads (docs/formats.md: weight 0/1 on a turn, "
            "images/audios with <image>/<audio> placeholders, field_messages / message_property_mappings in YAML)",
            severity=severity, path=path, fields=dict(unread),
        ))
    nulls.pop("arrow", None)
    if nulls:
        keys = ", ".join(f"{k} ({n})" for k, n in sorted(nulls.items()))
        found.append(finding(
            ARROW_NULLS.code, f"{path}: tool-call argument keys set to null were dropped: {keys}",
            "Arrow (datasets) fills keys missing from a row with null, so a real null cannot be told apart; write "
            "tool-call arguments as JSON strings to keep nulls", path=path,
        ))
    return found


def _read_source(source: DataSource, skip_invalid: bool, report: DataReport) -> list[Conversation]:
    rows = read_rows(source.path, source.split)
    report.total_rows, report.split, report.reader, report.notes = (rows.total_rows, source.split, rows.reader,
                                                                      list(rows.notes))
    dropped: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    firsts: dict[str, str] = {}
    unread: Counter[str] = Counter()
    unread_at: dict[str, str] = {}
    nulls: Counter[str] = Counter({"arrow": 1}) if rows.reader == "datasets" else Counter()
    conversations: list[Conversation] = []
    for where, row in rows.rows:
        report.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            check_depth(row)
            read = read_row(row, source.options)
            conversation = _conversation(read.row, where, rows.base, nulls)
        except RowError as err:
            message = f"{where}: {err}"
            if not skip_invalid:
                raise FindingError(finding(
                    INVALID_ROW.code, message,
                    f"fix or remove this row ({_FORMAT_HINT}), or pass --skip-invalid (skip_invalid=True in "
                    "Python) to drop and count bad rows",
                    row=where, field=err.field, reason=err.reason,
                )) from None
            dropped[err.reason] += 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(message)
            continue
        formats[read.format] += 1
        firsts.setdefault(read.format, where)
        for key in dict.fromkeys(read.unread):
            unread[key] += 1
            unread_at.setdefault(key, where)
        conversations.append(conversation)
        _count(report, conversation)
    report.kept = len(conversations)
    report.dropped = dict(sorted(dropped.items()))
    report.format = ", ".join(FORMAT_NAMES[name] for name in formats) or "no rows"
    report.findings = _file_findings(source.path, formats, firsts, unread, unread_at, nulls)
    return conversations


def _nothing_to_learn(report: DataReport) -> None:
    if not report.kept:
        raise FindingError(finding(
            NOTHING_TO_LEARN.code,
            f"{report.path}: no usable conversation ({report.rows} rows, {sum(report.dropped.values())} dropped "
            "as invalid)",
            "add rows with at least one assistant turn; if rows were dropped, fix the problems listed in the "
            "report's examples",
            report=report.to_dict(),
        ))
    if report.text_rows:
        return
    if report.empty_assistant_turns == report.assistant_turns:
        raise FindingError(finding(
            NOTHING_TO_LEARN.code,
            f"{report.path}: all {report.assistant_turns} assistant turns are empty, so there is nothing to "
            "supervise (the loss covers assistant turns only)",
            "put the answers the model should learn in the assistant messages' content (or tool_calls)",
            report=report.to_dict(),
        ))
    if not report.supervised_roles:
        raise FindingError(finding(
            NOTHING_TO_LEARN.code,
            f"{report.path}: no turn is supervised ({report.turns_not_supervised} assistant turns have weight 0 "
            "or a role outside roles_to_train)",
            "give the turns the model should learn weight 1 (or list their role in roles_to_train)",
            report=report.to_dict(),
        ))


def load_conversations(
    path: str | Path, *, skip_invalid: bool = False, split: str | None = None, options: ChatOptions | None = None,
) -> tuple[list[Conversation], DataReport]:
    """Load and validate every conversation of one data file or saved ``datasets`` directory.

    Without ``skip_invalid`` the first bad row raises ``FindingError`` (G4T301); with it, bad rows are
    dropped and counted in the report. Raises G4T303 if ``path`` does not exist, G4T306 for a URL or hub id,
    G4T304 for a file that mixes formats, G4T305 for a field that would change training but is not read, and
    G4T302 if nothing is left to learn from. Warnings are in ``report.findings``.
    """
    return load_datasets([DataSource(str(path), split, options or ChatOptions())], skip_invalid=skip_invalid)


def load_datasets(sources: list[DataSource], *, skip_invalid: bool = False) -> tuple[list[Conversation], DataReport]:
    """Every dataset of ``sources`` read and validated, concatenated in order, with one report (and one per source)."""
    conversations: list[Conversation] = []
    parts: list[DataReport] = []
    for source in sources:
        part = DataReport(path=source.path)
        conversations += _read_source(source, skip_invalid, part)
        _nothing_to_learn(part)
        parts.append(part)
    if len(parts) == 1:
        report = parts[0]
        report.sources = [_source_summary(report)]
        return conversations, report
    report = DataReport(path=" + ".join(p.path for p in parts), format=", ".join(dict.fromkeys(p.format for p in parts)))
    for part in parts:
        for name in ("rows", "kept", "total_rows", "assistant_turns", "empty_assistant_turns", "turns_not_supervised",
                     "text_rows"):
            setattr(report, name, getattr(report, name) + getattr(part, name))
        for name in ("dropped", "modalities", "supervised_roles", "unread"):
            merged = getattr(report, name)
            for key, n in getattr(part, name).items():
                merged[key] = merged.get(key, 0) + n
        report.examples += part.examples[: MAX_EXAMPLES - len(report.examples)]
        report.notes += [f"{part.path}: {note}" for note in part.notes]
        report.findings += part.findings
        report.sources.append(_source_summary(part))
    return conversations, report


def _source_summary(part: DataReport) -> dict:
    return {"path": part.path, "format": part.format, "rows": part.kept, "total_rows": part.total_rows,
            "split": part.split, "reader": part.reader, "summary": part.summary()}


def conversation_key(conv: Conversation) -> str:
    """A digest of what a conversation says (messages and tools, not where it came from)."""
    payload = json.dumps({"messages": conv.messages, "tools": conv.tools, "text": conv.text}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def split_conversations(
    convs: list[Conversation], eval_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Split whole conversations into (train, eval), seeded and deterministic, each in input order.

    The eval set gets ``round(len * eval_fraction)`` conversations (``eval_fraction`` itself when it is a
    whole number of at least 1: a count, as Axolotl's ``val_set_size`` reads it), at least one when it is
    positive, and never all of them. Identical conversations (same messages and tools, anywhere in
    the file) always land on the same side, so a duplicated row cannot leak into the eval set.
    """
    if eval_fraction < 0 or (eval_fraction >= 1 and eval_fraction != int(eval_fraction)):
        raise ValueError(f"eval_fraction must be a share in [0, 1) or a whole count, got {eval_fraction}")
    n = len(convs)
    wanted = int(eval_fraction) if eval_fraction >= 1 else round(n * eval_fraction)
    n_eval = min(max(wanted, 1 if eval_fraction > 0 else 0), max(n - 1, 0))
    groups: dict[str, list[int]] = {}
    for i, conv in enumerate(convs):
        groups.setdefault(conversation_key(conv), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held_out: set[int] = set()
    for members in order:
        if len(held_out) >= n_eval:
            break
        if len(held_out) + len(members) < n:
            held_out.update(members)
    train = [c for i, c in enumerate(convs) if i not in held_out]
    evaluation = [c for i, c in enumerate(convs) if i in held_out]
    return train, evaluation
