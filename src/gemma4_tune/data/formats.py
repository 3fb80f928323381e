"""Row formats users already have, read into the one chat shape that ``records`` validates.

Each format is a small reader in ``FORMATS``, found by ``detect``; each returns the row as
``{"messages": [...], "tools": ...}`` (OpenAI roles, content a string or parts) or ``{"text": ...}``,
plus the fields it did not read, so that nothing is dropped without a word:

- ``openai``: ``messages`` of ``role``/``content`` (string or parts), ``tool_calls``, ``tool`` turns and a
  per-turn ``weight`` (0: not supervised, 1: supervised), as OpenAI fine-tuning files have them;
- ``sharegpt``: ``conversations`` of ``from``/``value`` with the roles human, gpt, system, tool,
  function_call (an assistant tool call) and observation (its result), as Axolotl and LLaMA-Factory read them;
- ``alpaca``: ``instruction``, ``input``, ``output`` and optional ``system`` / ``history``: one user turn
  (instruction, then the input after a newline), one assistant turn;
- ``prompt-completion``: TRL's ``prompt`` / ``completion``, strings or lists of messages;
- ``text``: a plain ``text`` column, trained with a language-model loss on every token.

Media: parts by path; or an ``images`` / ``audios`` column (paths) with ``<image>`` / ``<audio>``
placeholders in string content (LLaVA, TRL) or path-less ``{"type": "image"}`` parts (TRL), filled in order;
the placeholder count must equal the media given. ``ChatOptions`` carries Axolotl's dataset keys
(``field_messages``, ``message_property_mappings``, ``roles``, ``roles_to_train``, the training field).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gemma4_tune.data.files import RowError, load_json, materialise

FORMAT_NAMES = {
    "openai": "OpenAI chat",
    "sharegpt": "ShareGPT",
    "alpaca": "Alpaca",
    "prompt-completion": "prompt/completion",
    "text": "plain text",
}

DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "user": ("user", "human"),
    "assistant": ("assistant", "gpt", "model", "function_call"),
    "tool": ("tool", "observation", "function", "ipython"),
}

MEANINGFUL_FIELDS = frozenset({
    "weight", "loss_mask", "labels", "label", "mask", "train", "training", "images", "image", "audios", "audio",
    "videos", "video", "chosen", "rejected",
})
"""Fields whose being ignored would change what is trained: unread, they are an error, not a warning."""

_REASONING = ("reasoning_content", "reasoning", "thinking")
_PLACEHOLDERS = {"image": "<image>", "audio": "<audio>"}
_MEDIA_COLUMNS = {"image": ("images", "image"), "audio": ("audios", "audio")}


@dataclass(frozen=True)
class ChatOptions:
    """How one dataset's rows are read (Axolotl's ``datasets[]`` keys, with their meaning).

    ``property_mappings`` maps our message keys (``role``, ``content``) to the dataset's; ``roles`` maps our
    roles to the dataset's names for them; ``roles_to_train`` names the roles whose turns are supervised
    (None: what the training recipe supervises); ``training_field`` is the per-message flag that overrides it.
    """

    field_messages: str | None = None
    property_mappings: Mapping[str, str] = field(default_factory=dict)
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    roles_to_train: tuple[str, ...] | None = None
    training_field: str | None = None
    format: str | None = None


@dataclass
class Read:
    """One row in the canonical shape, the format it was read as, and the fields nothing read."""

    row: dict[str, Any]
    format: str
    unread: list[str]


def _present(row: Mapping[str, Any], key: str) -> bool:
    return row.get(key) is not None


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def detect(row: Mapping[str, Any], options: ChatOptions) -> str:
    """The format of one row, from the fields it has (``options.format`` when the config names it)."""
    if options.format:
        return options.format
    if _present(row, "chosen") or _present(row, "rejected"):
        raise RowError("preference_row", "row", "a preference row (chosen/rejected) is DPO data: train it with "
                       "`train --method dpo` (or method: dpo), or train SFT on the chosen conversations "
                       "(messages = prompt + chosen)")
    if options.field_messages and _present(row, options.field_messages):
        messages = row[options.field_messages]
        return "sharegpt" if _uses_from_value(messages) else "openai"
    if _present(row, "messages"):
        return "sharegpt" if _uses_from_value(row["messages"]) else "openai"
    if _present(row, "conversations"):
        return "sharegpt"
    if _present(row, "instruction") or (_present(row, "output") and _present(row, "input")):
        return "alpaca"
    if _present(row, "prompt") or _present(row, "completion"):
        return "prompt-completion"
    if _present(row, "text"):
        return "text"
    keys = ", ".join(sorted(k for k in row if _present(row, k))) or "none"
    raise RowError("no_messages", "row", f"no known format (found keys: {keys}); expected messages (OpenAI), "
                   "conversations (ShareGPT), instruction/output (Alpaca), prompt/completion, or text")


def _uses_from_value(messages: Any) -> bool:
    return isinstance(messages, list) and any(isinstance(m, Mapping) and "from" in m and "role" not in m
                                              for m in messages)


def role_table(options: ChatOptions) -> dict[str, str]:
    """Dataset role name -> our role. Explicit ``roles`` replace the default names (as in Axolotl)."""
    if not options.roles:
        return {name: ours for ours, names in DEFAULT_ROLES.items() for name in names}
    table = {ours: ours for ours in DEFAULT_ROLES}
    for ours, names in options.roles.items():
        for name in names:
            table[name] = ours
    return table


def _training_flag(raw: Mapping[str, Any], where: str, options: ChatOptions) -> tuple[bool | None, str | None]:
    """A message's own supervision flag (``weight`` 0/1, or the configured training field) and the key read."""
    for key in (options.training_field, "weight", "training"):
        if key and _present(raw, key):
            value = raw[key]
            if isinstance(value, bool) or value in (0, 1):
                return bool(value), key
            raise RowError("bad_field", f"{where}.{key}", f"expected 0 or 1 (or true/false), got {value!r}")
    return None, None


def _function_call(value: Any, where: str) -> list[dict]:
    """A ShareGPT ``function_call`` turn's value (JSON: one call or a list) as OpenAI tool calls."""
    try:
        parsed = load_json(value, where) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise RowError("bad_tool_calls", where, f"function_call value is not valid JSON ({exc.msg})") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for call in calls:
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            raise RowError("bad_tool_calls", where, 'a function_call value is {"name": ..., "arguments": {...}}')
        out.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
    return out


def chat_messages(raw_messages: Any, name: str, options: ChatOptions, sharegpt: bool) -> tuple[list, list[str]]:
    """A row's messages with the dataset's roles and field names mapped to ours; and the fields not read."""
    if not isinstance(raw_messages, list):
        raise RowError("bad_message", name, f"expected a list of messages, got {_type_name(raw_messages)}")
    role_key = options.property_mappings.get("role", "from" if sharegpt else "role")
    content_key = options.property_mappings.get("content", "value" if sharegpt else "content")
    roles = role_table(options)
    messages: list[dict] = []
    unread: list[str] = []
    for i, raw in enumerate(raw_messages):
        where = f"{name}[{i}]"
        if not isinstance(raw, Mapping):
            raise RowError("bad_message", where, f"expected a message object, got {_type_name(raw)}")
        source_role = raw.get(role_key)
        role = roles.get(source_role) if isinstance(source_role, str) else None
        if role is None:
            known = ", ".join(sorted(roles))
            problem = f"missing {role_key!r}" if source_role is None else f"unknown role {source_role!r}"
            raise RowError("unknown_role", f"{where}.{role_key}", f"{problem} (expected one of {known}; map other "
                           "names with the dataset's `roles:` in YAML)")
        message: dict[str, Any] = {"role": role, "content": raw.get(content_key)}
        if source_role == "function_call":
            message = {"role": "assistant", "content": None, "tool_calls": _function_call(raw.get(content_key), where)}
        read = {role_key, content_key, "tool_calls", *({"tool_call_id", "name"} if role == "tool" else ()),
                *(_REASONING if role == "assistant" else ())}
        for key in ("tool_calls", "tool_call_id", "name"):
            if _present(raw, key) and key in read and key not in message:
                message[key] = raw[key]
        reasoning = next((raw[k] for k in _REASONING if _present(raw, k)), None)
        if reasoning is not None and role == "assistant":
            message["reasoning_content"] = reasoning
        flag, flag_key = _training_flag(raw, where, options)
        if flag is None and options.roles_to_train is not None:
            flag = role in options.roles_to_train
        if flag is not None:
            message["train"] = flag
        unread += [f"{name}[].{k}" for k in raw if _present(raw, k) and k not in read and k != flag_key]
        messages.append(message)
    return messages, unread


def system_first(row: Mapping[str, Any], messages: list[dict]) -> list[dict]:
    """A row-level ``system`` column (LLaMA-Factory) becomes the first message, unless one is there."""
    system = row.get("system")
    if not isinstance(system, str) or not system or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _read_chat(row: Mapping[str, Any], options: ChatOptions, sharegpt: bool) -> tuple[dict, set[str], list[str]]:
    name = options.field_messages if options.field_messages and _present(row, options.field_messages) else (
        "messages" if _present(row, "messages") else "conversations")
    messages, unread = chat_messages(row.get(name), name, options, sharegpt)
    return ({"messages": system_first(row, messages), "tools": row.get("tools")},
            {name, "tools", "system"}, unread)


def _read_openai(row: Mapping[str, Any], options: ChatOptions) -> tuple[dict, set[str], list[str]]:
    return _read_chat(row, options, sharegpt=False)


def _read_sharegpt(row: Mapping[str, Any], options: ChatOptions) -> tuple[dict, set[str], list[str]]:
    return _read_chat(row, options, sharegpt=True)


def _read_alpaca(row: Mapping[str, Any], options: ChatOptions) -> tuple[dict, set[str], list[str]]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise RowError("bad_field", key, f"an Alpaca row needs {key!r} as a string, got {_type_name(row.get(key))}")
    prompt = row["instruction"]
    if isinstance(row.get("input"), str) and row["input"]:
        prompt = f"{prompt}\n{row['input']}"
    messages: list[dict] = []
    for k, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError("bad_field", f"history[{k}]", "expected a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if options.roles_to_train is not None:
        for message in messages:
            message["train"] = message["role"] in options.roles_to_train
    return {"messages": system_first(row, messages)}, {"instruction", "input", "output", "system", "history"}, []


def _read_prompt_completion(row: Mapping[str, Any], options: ChatOptions) -> tuple[dict, set[str], list[str]]:
    for key in ("prompt", "completion"):
        if not _present(row, key):
            raise RowError("no_messages", key, "missing (prompt/completion rows need both)")
    messages: list[dict] = []
    unread: list[str] = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = row[key]
        if isinstance(value, str):
            messages.append({"role": role, "content": value})
            continue
        part, extra = chat_messages(value, key, options, sharegpt=False)
        messages += part
        unread += extra
    return {"messages": messages, "tools": row.get("tools")}, {"prompt", "completion", "tools"}, unread


def _read_text(row: Mapping[str, Any], options: ChatOptions) -> tuple[dict, set[str], list[str]]:
    if not isinstance(row["text"], str):
        raise RowError("bad_field", "text", f"expected a string, got {_type_name(row['text'])}")
    return {"text": row["text"]}, {"text"}, []


FORMATS: dict[str, Callable[[Mapping[str, Any], ChatOptions], tuple[dict, set[str], list[str]]]] = {
    "openai": _read_openai,
    "sharegpt": _read_sharegpt,
    "alpaca": _read_alpaca,
    "prompt-completion": _read_prompt_completion,
    "text": _read_text,
}


def _media_column(row: Mapping[str, Any], kind: str) -> tuple[str | None, list[Any]]:
    for column in _MEDIA_COLUMNS[kind]:
        if _present(row, column):
            value = row[column]
            return column, list(value) if isinstance(value, list) else [value]
    return None, []


def _media_value(value: Any, where: str, kind: str) -> str:
    """A path from an ``images``/``audios`` column entry: a string, or a datasets ``{"bytes", "path"}`` dict whose
    embedded bytes are written to the media cache (``files.materialise``)."""
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            try:
                return materialise(bytes(value["bytes"]), kind)
            except RowError as err:
                raise RowError(err.reason, where, str(err)) from None
        if isinstance(value.get("path"), str) and value["path"]:
            return value["path"]
    if isinstance(value, str) and value:
        return value
    raise RowError("bad_content", where, f"expected a {kind} file path, got {_type_name(value)}")


def fill_media(messages: list[dict], row: Mapping[str, Any]) -> set[str]:
    """Pair an ``images``/``audios`` column with ``<image>``/``<audio>`` placeholders or path-less parts."""
    used: set[str] = set()
    for kind in ("image", "audio"):
        column, values = _media_column(row, kind)
        slots = 0
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and _PLACEHOLDERS[kind] in content:
                slots += content.count(_PLACEHOLDERS[kind])
            elif isinstance(content, list):
                slots += sum(1 for p in content if isinstance(p, Mapping) and p.get("type") == kind
                             and not p.get("path") and not p.get(kind) and not p.get("url"))
        if column is None:
            continue
        used.add(column)
        if slots != len(values):
            raise RowError("media_mismatch", column, f"{len(values)} {kind}(s) in {column!r} but {slots} "
                           f"{_PLACEHOLDERS[kind]} placeholder(s) or path-less {kind} part(s) in the messages: "
                           "each one needs exactly one")
        paths = iter(_media_value(v, f"{column}[{i}]", kind) for i, v in enumerate(values))
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and _PLACEHOLDERS[kind] in content:
                pieces = re.split(f"({re.escape(_PLACEHOLDERS[kind])})", content)
                parts = []
                for piece in pieces:
                    if piece == _PLACEHOLDERS[kind]:
                        parts.append({"type": kind, "path": next(paths)})
                    elif piece:
                        parts.append({"type": "text", "text": piece})
                message["content"] = parts
            elif isinstance(content, list):
                message["content"] = [
                    {**p, "path": next(paths)} if isinstance(p, Mapping) and p.get("type") == kind
                    and not p.get("path") and not p.get(kind) and not p.get("url") else p
                    for p in content
                ]
    return used


def read_row(row: Any, options: ChatOptions) -> Read:
    """One raw row in the canonical shape, with its format and the fields (``a``, ``messages[].b``) not read."""
    if not isinstance(row, Mapping):
        raise RowError("not_an_object", "row", f"expected a JSON object, got {_type_name(row)}")
    name = detect(row, options)
    if name not in FORMATS:
        raise RowError("bad_field", "type", f"unknown dataset type {name!r} (known: {', '.join(FORMATS)})")
    canonical, read, unread = FORMATS[name](row, options)
    if "messages" in canonical:
        read |= fill_media(canonical["messages"], row)
    unread = [k for k in row if _present(row, k) and k not in read] + unread
    return Read(canonical, name, unread)
