"""Training records: load and validate chat data before any model is loaded.

Accepted inputs:

- a JSONL file, one conversation a line: ``{"messages": [...], "tools": [...]}`` with roles system,
  user, assistant and tool; content a string or a list of ``text`` / ``image`` / ``audio`` parts,
  media paths relative to the file's directory; assistant turns may carry ``tool_calls`` (OpenAI
  style) and ``reasoning_content``, tool turns ``tool_call_id`` and ``name``;
- a JSONL file of ``{"prompt": ..., "completion": ...}`` rows (each a string or a list of messages),
  turned into a user/assistant conversation;
- a directory written by ``datasets``' ``save_to_disk`` (a DatasetDict's ``train`` split) whose rows
  have either form; media paths are relative to that directory.

Every problem names the file, the line (or row) and the field. Conversations come back normalised:
content is always a list of parts and media parts carry an absolute ``path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.findings import FindingError, Severity, finding, register

INVALID_ROW = register("G4T301", Severity.ERROR, "Invalid training row")
NOTHING_TO_LEARN = register("G4T302", Severity.ERROR, "Dataset has nothing to learn", (12,))
DATA_NOT_FOUND = register("G4T303", Severity.ERROR, "Data file not found")

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image", "audio")
MAX_EXAMPLES = 5

_FORMAT_HINT = (
    'each row is {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}'
)


@dataclass(frozen=True)
class Conversation:
    """One validated, normalised conversation.

    ``messages`` content is always a list of parts; image and audio parts carry an absolute
    ``path``; assistant ``tool_calls`` have their ``arguments`` parsed to dicts.
    """

    messages: list[dict]
    tools: list[dict] | None
    source: str

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


@dataclass
class DataReport:
    """What loading a dataset found: rows read, kept and dropped (by reason), modalities, turns."""

    path: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    modalities: dict[str, int] = field(default_factory=lambda: {"text": 0, "image": 0, "audio": 0})
    assistant_turns: int = 0
    empty_assistant_turns: int = 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


class _RowError(Exception):
    """A problem with one row: a reason key (for ``DataReport.dropped``), the field and what is wrong."""

    def __init__(self, reason: str, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}" if field_name else problem)
        self.reason = reason
        self.field = field_name


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _present(row: dict, key: str) -> bool:
    """True if ``key`` holds a value (datasets fills absent struct fields with None)."""
    return row.get(key) is not None


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
        if kind not in PART_TYPES:
            problem = f"unknown part type {kind!r} (expected {', '.join(PART_TYPES)})"
            raise _RowError("unknown_part_type", f"{at}.type", problem)
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _RowError("bad_content", f"{at}.text", f"expected a string, got {_type_name(text)}")
            parts.append({"type": "text", "text": text})
            continue
        raw = part.get("path")
        if not isinstance(raw, str) or not raw:
            problem = f"an {kind} part needs a file path, got {_type_name(raw)}"
            raise _RowError("bad_content", f"{at}.path", problem)
        resolved = os.path.abspath(base / os.path.expanduser(raw))
        if not os.path.isfile(resolved):
            raise _RowError("media_not_found", f"{at}.path", f"{kind} file not found: {resolved}")
        parts.append({"type": kind, "path": resolved})
    return parts


def _tool_calls(calls: Any, where: str) -> list[dict]:
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
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
                raise _RowError("bad_tool_calls", f"{at}.function.arguments", problem) from None
        if not isinstance(arguments, dict):
            problem = f"expected a JSON object, got {_type_name(arguments)}"
            raise _RowError("bad_tool_calls", f"{at}.function.arguments", problem)
        normalised: dict[str, Any] = {"id": str(call["id"])} if _present(call, "id") else {}
        normalised.update(type="function", function={"name": name, "arguments": arguments})
        out.append(normalised)
    return out


def _message(raw: Any, where: str, base: Path) -> dict:
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
        message["tool_calls"] = _tool_calls(raw["tool_calls"], where)
    extras = {"assistant": ("reasoning_content",), "tool": ("tool_call_id", "name")}.get(role, ())
    for key in (k for k in extras if _present(raw, k)):
        if not isinstance(raw[key], str):
            raise _RowError("bad_field", f"{where}.{key}", f"expected a string, got {_type_name(raw[key])}")
        message[key] = raw[key]
    return message


def _messages_of(value: Any, name: str, default_role: str) -> list[tuple[str, Any]]:
    """``(field, raw message)`` pairs of a ``messages``/``prompt``/``completion`` value."""
    if isinstance(value, str) and name != "messages":
        return [(name, {"role": default_role, "content": value})]
    if not isinstance(value, list):
        expected = "a list of messages" if name == "messages" else "a string or a list of messages"
        raise _RowError("bad_message", name, f"expected {expected}, got {_type_name(value)}")
    return [(f"{name}[{i}]", m) for i, m in enumerate(value)]


def _is_empty(message: dict) -> bool:
    """An assistant turn with no text, tool calls or reasoning: nothing to supervise."""
    text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
    reasoning = message.get("reasoning_content", "")
    return not text.strip() and not message.get("tool_calls") and not reasoning.strip()


def _conversation(row: Any, source: str, base: Path) -> Conversation:
    if not isinstance(row, dict):
        raise _RowError("not_an_object", "row", f"expected a JSON object, got {_type_name(row)}")
    if _present(row, "messages"):
        raw = _messages_of(row["messages"], "messages", "user")
    elif _present(row, "prompt") or _present(row, "completion"):
        for key in ("prompt", "completion"):
            if not _present(row, key):
                raise _RowError("no_messages", key, "missing (prompt/completion rows need both)")
        raw = _messages_of(row["prompt"], "prompt", "user")
        raw += _messages_of(row["completion"], "completion", "assistant")
    else:
        keys = ", ".join(sorted(k for k in row if _present(row, k))) or "none"
        problem = f'needs "messages" or "prompt" and "completion" (found keys: {keys})'
        raise _RowError("no_messages", "row", problem)
    if not raw:
        raise _RowError("empty_conversation", "messages", "empty conversation")
    messages = [_message(m, where, base) for where, m in raw]
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError("no_assistant_turn", "messages", "no assistant turn (nothing to train on)")
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _RowError("bad_field", "tools", f"expected a list of tool schemas, got {_type_name(tools)}")
    for k, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            problem = f"expected a tool schema object, got {_type_name(tool)}"
            raise _RowError("bad_field", f"tools[{k}]", problem)
    return Conversation(messages=messages, tools=tools or None, source=source)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(source, row or _RowError)`` for each non-blank line of a JSONL file."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            source = f"{path}:{number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield source, _RowError("invalid_json", "", f"invalid JSON: not UTF-8 (byte {exc.start + 1})")
                continue
            body = text.strip()
            if not body:
                continue
            try:
                yield source, json.loads(body)
            except json.JSONDecodeError as exc:
                truncated = exc.pos >= len(body) or exc.msg.startswith("Unterminated string")
                what = "truncated JSON (the line ends mid-value)" if truncated else "invalid JSON"
                yield source, _RowError("invalid_json", "", f"{what}: {exc.msg} (column {exc.colno})")


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(source, row)`` for each row of a ``save_to_disk`` directory (a DatasetDict's train split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise FindingError(
            finding(
                DATA_NOT_FOUND.code,
                f"{path} is a directory but not a saved datasets directory "
                "(no dataset_info.json or dataset_dict.json)",
                "Pass a JSONL file, or a directory written by Dataset/DatasetDict.save_to_disk.",
                path=str(path),
            )
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise FindingError(
                finding(
                    INVALID_ROW.code,
                    f"{path}: splits: no 'train' split (found: {', '.join(loaded) or 'none'})",
                    "Save the training rows as the 'train' split, or save that split alone with "
                    "Dataset.save_to_disk.",
                    path=str(path),
                )
            )
        loaded = loaded["train"]
    for index, row in enumerate(loaded):
        yield f"{path}#{index}", row


def load_conversations(
    path: str | Path, *, skip_invalid: bool = False
) -> tuple[list[Conversation], DataReport]:
    """Load and validate every conversation in a JSONL file or a saved ``datasets`` directory.

    Without ``skip_invalid`` the first bad row raises ``FindingError`` (G4T301); with it, bad rows are
    dropped and counted in the report. Raises G4T303 if ``path`` does not exist and G4T302 if nothing
    is left to learn from (no conversation, or every assistant turn empty).
    """
    path = Path(path)
    if not path.exists():
        resolved = "" if path.is_absolute() else f" (resolved: {path.absolute()})"
        raise FindingError(
            finding(
                DATA_NOT_FOUND.code,
                f"data file not found: {path}{resolved}",
                "Pass an existing JSONL file (one conversation a line) or a save_to_disk directory.",
                path=str(path),
            )
        )
    if path.is_dir():
        rows, base = _dataset_rows(path), path.absolute()
    else:
        rows, base = _jsonl_rows(path), path.absolute().parent
    report = DataReport(path=str(path))
    dropped: Counter[str] = Counter()
    conversations: list[Conversation] = []
    for source, row in rows:
        report.rows += 1
        try:
            if isinstance(row, _RowError):
                raise row
            conversation = _conversation(row, source, base)
        except _RowError as err:
            message = f"{source}: {err}"
            if not skip_invalid:
                raise FindingError(
                    finding(
                        INVALID_ROW.code,
                        message,
                        f"Fix or remove this row ({_FORMAT_HINT}), or pass --skip-invalid (skip_invalid=True in Python) to drop and "
                        "count bad rows.",
                        row=source,
                        field=err.field,
                        reason=err.reason,
                    )
                ) from None
            dropped[err.reason] += 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(message)
            continue
        conversations.append(conversation)
        kinds = [kind for kind in ("image", "audio") if getattr(conversation, f"{kind}s")]
        for kind in kinds or ["text"]:
            report.modalities[kind] += 1
        for message in conversation.messages:
            if message["role"] == "assistant":
                report.assistant_turns += 1
                report.empty_assistant_turns += _is_empty(message)
    report.kept = len(conversations)
    report.dropped = dict(sorted(dropped.items()))
    if not conversations:
        raise FindingError(
            finding(
                NOTHING_TO_LEARN.code,
                f"{path}: no usable conversation "
                f"({report.rows} rows, {sum(dropped.values())} dropped as invalid)",
                "Add rows with at least one assistant turn; if rows were dropped, fix the problems listed in "
                "the report's examples.",
                report=report.to_dict(),
            )
        )
    if report.empty_assistant_turns == report.assistant_turns:
        raise FindingError(
            finding(
                NOTHING_TO_LEARN.code,
                f"{path}: all {report.assistant_turns} assistant turns are empty, so there is nothing to "
                "supervise (the loss covers assistant turns only)",
                "Put the answers the model should learn in the assistant messages' content (or tool_calls).",
                report=report.to_dict(),
            )
        )
    return conversations, report


def conversation_key(conv: Conversation) -> str:
    """A digest of what a conversation says (messages and tools, not where it came from)."""
    payload = json.dumps({"messages": conv.messages, "tools": conv.tools}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def split_conversations(
    convs: list[Conversation], eval_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Split whole conversations into (train, eval), seeded and deterministic, each in input order.

    The eval set gets ``round(len * eval_fraction)`` conversations, at least one when the fraction is
    positive, and never all of them. Identical conversations (same messages and tools, anywhere in
    the file) always land on the same side, so a duplicated row cannot leak into the eval set.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(convs)
    n_eval = min(max(round(n * eval_fraction), 1 if eval_fraction > 0 else 0), max(n - 1, 0))
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
