"""Row formats users already have, read into the one chat shape that ``records`` validates.

Each format is a small reader in ``FORMATS``, found by ``detect``; each returns the row as
``{"messages": [...], "tools": ...}`` (OpenAI roles, content a string or parts) or ``{"text": ...}``,
plus the fields it did not read, so that nothing is dropped without a word:

- ``openai``: ``messages`` of ``role``/``content`` (string or parts), ``tool_calls``, ``tool`` turns and a
  per-turn ``weight`` (0: not supervised, 1: supervised), as OpenAI fine-tuning files have them; LLaMA-Factory
  v1 rows are read here too: parts ``{"type", "value"}`` (``text``, ``reasoning``, ``tool_call``,
  ``image_url``/``video_url``/``audio_url``) and a per-turn ``loss_weight`` (0.0 or 1.0; any other weight is an
  error, since LLaMA-Factory would scale that turn's loss and we cannot);
- ``sharegpt``: ``conversations`` of ``from``/``value`` with the roles human, gpt, system, tool,
  function_call (an assistant tool call) and observation (its result), as Axolotl and LLaMA-Factory read them;
- ``alpaca``: ``instruction``, ``input``, ``output`` and optional ``system`` / ``history``: one user turn
  (instruction, then the input after a newline), one assistant turn;
- ``prompt-completion``: TRL's ``prompt`` / ``completion``, strings or lists of messages;
- ``text``: a plain ``text`` column, trained with a language-model loss on every token.

Media: parts by path; or an ``images`` / ``audios`` column (paths) with ``<image>`` / ``<audio>``
placeholders in string content (LLaVA, TRL) or path-less ``{"type": "image"}`` parts (TRL), filled in order;
the placeholder count must equal the media given, and a placeholder with no such column is an error (it would
be trained as literal text). Tools: a list of schemas, or a JSON string of one (LLaMA-Factory, glaive); a bare
``{name, description, parameters}`` schema is wrapped as ``{"type": "function", "function": ...}``.
``ChatOptions`` carries Axolotl's dataset keys (``field_messages``, ``message_property_mappings``, ``roles``,
``roles_to_train``, the training field) and LLaMA-Factory's ``columns``.
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
    "alpaca-v1": "Alpaca (LLaMA-Factory v1 converter)",
    "prompt-completion": "prompt/completion",
    "text": "plain text",
}

DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "user": ("user", "human"),
    "assistant": ("assistant", "gpt", "model"),
    "tool": ("tool", "observation", "function", "ipython"),
    "function_call": ("function_call",),
}
"""Our role -> the dataset's names for it. ``function_call`` is an assistant turn whose content is a tool call
(JSON: one ``{"name", "arguments"}`` or a list), as ShareGPT writes them."""

MEANINGFUL_FIELDS = frozenset({
    "weight", "loss_mask", "labels", "label", "mask", "train", "training", "images", "image", "audios", "audio",
    "videos", "video", "chosen", "rejected", "loss_weight",
})
"""Fields whose being ignored would change what is trained: unread, they are an error, not a warning."""

_REASONING = ("reasoning_content", "reasoning", "thinking")
_PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
_MEDIA_COLUMNS = {"image": ("images", "image"), "audio": ("audios", "audio"), "video": ("videos", "video")}
_V1_MEDIA = {"image_url": "image", "video_url": "video", "audio_url": "audio"}


@dataclass(frozen=True)
class ChatOptions:
    """How one dataset's rows are read (Axolotl's ``datasets[]`` keys, with their meaning).

    ``property_mappings`` maps our message keys (``role``, ``content``) to the dataset's; ``roles`` maps our
    roles to the dataset's names for them; ``roles_to_train`` names the roles whose turns are supervised
    (None: what the training recipe supervises); ``training_field`` is the per-message flag that overrides it.

    ``columns`` maps OUR row column names to the file's (LLaMA-Factory's dataset_info ``columns``): before the
    format is detected, each file column ``columns[ours]`` is read as ``ours``. Our names: ``instruction``,
    ``input``, ``output``, ``history`` (Alpaca; LLaMA-Factory's ``prompt``, ``query``, ``response``, ``history``),
    ``messages`` (the list of turns, ShareGPT or OpenAI shaped), ``system``, ``tools``, ``images``, ``videos``,
    ``audios``, ``chosen``, ``rejected`` and ``label`` (LLaMA-Factory's ``kto_tag``). When given, it lists every
    column read: the file's other columns are not read (reported, G4T305), as LLaMA-Factory ignores them; findings
    name the file's columns. The config reader passes LLaMA-Factory's defaults explicitly (Alpaca:
    ``{"instruction": "instruction", "input": "input", "output": "output"}``; ShareGPT:
    ``{"messages": "conversations"}``). Empty (the default): every column is read by its own name.

    LLaMA-Factory's ShareGPT ``tags`` map onto ``property_mappings`` (``role_tag`` -> ``role``, ``content_tag`` ->
    ``content``) and ``roles`` (``user_tag`` -> ``user``, ``assistant_tag`` -> ``assistant``, ``observation_tag`` ->
    ``tool``, ``function_tag`` -> ``function_call`` (an assistant tool call), ``system_tag`` -> ``system``).
    """

    field_messages: str | None = None
    property_mappings: Mapping[str, str] = field(default_factory=dict)
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    roles_to_train: tuple[str, ...] | None = None
    training_field: str | None = None
    format: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)


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
    """A message's own supervision flag (``weight`` or ``loss_weight`` 0/1, or the configured training field) and
    the key read. A fractional ``loss_weight`` (LLaMA-Factory scales the turn's loss by it) cannot be honoured."""
    for key in (options.training_field, "weight", "loss_weight", "training"):
        if key and _present(raw, key):
            value = raw[key]
            if isinstance(value, bool) or value in (0, 1):
                return bool(value), key
            if key == "loss_weight" and isinstance(value, (int, float)):
                raise RowError("fractional_loss_weight", f"{where}.{key}", f"{value!r}: LLaMA-Factory scales this "
                               "turn's loss by it, gemma4-tune supervises a turn fully or not at all; set it to 1.0 "
                               "(supervised) or 0.0 (not supervised)")
            raise RowError("bad_field", f"{where}.{key}", f"expected 0 or 1 (or true/false), got {value!r}")
    return None, None


def _value_parts(content: list, message: dict, where: str) -> list:
    """LLaMA-Factory v1 parts ``{"type", "value"}`` in our shape: text and media parts, a ``reasoning`` part as the
    message's reasoning, ``tool_call`` parts (JSON) as its tool calls. Other parts are left for validation."""
    parts: list = []
    for j, part in enumerate(content):
        if not (isinstance(part, Mapping) and "value" in part and not {"text", "path"} & set(part)):
            parts.append(part)
            continue
        kind, value, at = part.get("type"), part["value"], f"{where}.content[{j}]"
        if kind in ("text", *_V1_MEDIA) and not isinstance(value, str):
            raise RowError("bad_content", f"{at}.value", f"a {kind!r} part's value is a string, got {_type_name(value)}")
        if kind == "text":
            parts.append({"type": "text", "text": value})
        elif kind in _V1_MEDIA:
            parts.append({"type": _V1_MEDIA[kind], "path": value})
        elif kind == "reasoning" and isinstance(value, str):
            message["reasoning_content"] = message.get("reasoning_content", "") + value
        elif kind == "tool_call":
            message["tool_calls"] = message.get("tool_calls", []) + _function_call(value, f"{at}.value")
        else:
            parts.append(part)
    return parts


def read_tools(value: Any, field_name: str = "tools") -> list | None:
    """A row's tool declarations: a list of schemas, or a JSON string of one (LLaMA-Factory, glaive; empty: none).
    A bare ``{name, description, parameters}`` schema is wrapped as ``{"type": "function", "function": ...}``, the
    shape the Gemma 4 templates render."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = load_json(value, field_name)
        except json.JSONDecodeError as exc:
            raise RowError("bad_field", field_name, f"a JSON string of tool schemas that is not valid JSON "
                           f"({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, list):
        return value
    return [{"type": "function", "function": dict(tool)} if isinstance(tool, Mapping) and "function" not in tool
            and isinstance(tool.get("name"), str) else tool for tool in value]


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
        if role == "function_call":
            message = {"role": "assistant", "content": None, "tool_calls": _function_call(raw.get(content_key), where)}
            role = "assistant"
        elif isinstance(message["content"], list):
            message["content"] = _value_parts(message["content"], message, where)
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
    return ({"messages": system_first(row, messages), "tools": read_tools(row.get("tools"))},
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


def _read_alpaca_v1(row: Mapping[str, Any], options: ChatOptions) -> tuple[dict, set[str], list[str]]:
    """LLaMA-Factory v1's ``alpaca`` converter: instruction and input joined as they are (no newline), no history."""
    if not isinstance(row.get("output"), str):
        raise RowError("bad_field", "output", f"an Alpaca row needs 'output' as a string, got "
                       f"{_type_name(row.get('output'))}")
    parts = [row.get(key) for key in ("instruction", "input")]
    for key, part in zip(("instruction", "input"), parts):
        if part is not None and not isinstance(part, str):
            raise RowError("bad_field", key, f"expected a string, got {_type_name(part)}")
    messages = [{"role": "user", "content": "".join(p for p in parts if p)},
                {"role": "assistant", "content": row["output"]}]
    return {"messages": system_first(row, messages)}, {"instruction", "input", "output", "system"}, []


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
    return {"messages": messages, "tools": read_tools(row.get("tools"))}, {"prompt", "completion", "tools"}, unread


def _read_text(row: Mapping[str, Any], options: ChatOptions) -> tuple[dict, set[str], list[str]]:
    if not isinstance(row["text"], str):
        raise RowError("bad_field", "text", f"expected a string, got {_type_name(row['text'])}")
    return {"text": row["text"]}, {"text"}, []


FORMATS: dict[str, Callable[[Mapping[str, Any], ChatOptions], tuple[dict, set[str], list[str]]]] = {
    "openai": _read_openai,
    "sharegpt": _read_sharegpt,
    "alpaca": _read_alpaca,
    "alpaca-v1": _read_alpaca_v1,
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


_ANY_PLACEHOLDER = re.compile("(" + "|".join(re.escape(p) for p in _PLACEHOLDERS.values()) + ")")
_KIND_OF = {placeholder: kind for kind, placeholder in _PLACEHOLDERS.items()}


def _split_placeholders(messages: list[dict]) -> dict[str, int]:
    """String content with ``<image>``/``<video>``/``<audio>`` placeholders as parts (one path-less media part per
    placeholder, in order, whatever mix of kinds); the first message with each kind."""
    first: dict[str, int] = {}
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str) or not _ANY_PLACEHOLDER.search(content):
            continue
        parts: list[dict] = []
        for piece in _ANY_PLACEHOLDER.split(content):
            if piece in _KIND_OF:
                parts.append({"type": _KIND_OF[piece]})
                first.setdefault(_KIND_OF[piece], i)
            elif piece:
                parts.append({"type": "text", "text": piece})
        message["content"] = parts
    return first


def _open_slot(part: Any, kind: str) -> bool:
    return (isinstance(part, Mapping) and part.get("type") == kind and not part.get("path") and not part.get(kind)
            and not part.get("url"))


def fill_media(messages: list[dict], row: Mapping[str, Any]) -> set[str]:
    """Pair an ``images``/``videos``/``audios`` column with ``<image>``/``<video>``/``<audio>`` placeholders or
    path-less parts. A placeholder in a row without that column is an error: it would be trained as literal text."""
    used: set[str] = set()
    first = _split_placeholders(messages)
    for kind in _PLACEHOLDERS:
        column, values = _media_column(row, kind)
        if column is None:
            if kind in first:
                raise RowError("placeholder_without_media", f"messages[{first[kind]}].content", f"{_PLACEHOLDERS[kind]} "
                               f"but the row has no {_MEDIA_COLUMNS[kind][0]!r} column, so it would be trained as "
                               f"the literal text {_PLACEHOLDERS[kind]}; give the row a {_MEDIA_COLUMNS[kind][0]!r} "
                               f"column with one {kind} path per placeholder (map the file's column to it), or "
                               f"remove the placeholder (there is no option to train it as text)")
            continue
        used.add(column)
        slots = sum(_open_slot(p, kind) for m in messages if isinstance(m.get("content"), list) for p in m["content"])
        if slots != len(values):
            raise RowError("media_mismatch", column, f"{len(values)} {kind}(s) in {column!r} but {slots} "
                           f"{_PLACEHOLDERS[kind]} placeholder(s) or path-less {kind} part(s) in the messages: "
                           "each one needs exactly one")
        paths = iter(_media_value(v, f"{column}[{i}]", kind) for i, v in enumerate(values))
        for message in messages:
            if isinstance(message.get("content"), list):
                message["content"] = [{**p, "path": next(paths)} if _open_slot(p, kind) else p
                                      for p in message["content"]]
    return used


def apply_columns(row: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``row`` with each file column ``columns[ours]`` renamed to ``ours`` (``ChatOptions.columns``), and our name ->
    the file's for every key of the result, to name the file's columns in findings. With ``columns`` given, the other
    columns get a name no reader reads (``"<column> (not mapped)"``), so that they are reported, never read."""
    if not columns:
        return dict(row), {key: key for key in row}
    theirs = {file_name: ours for ours, file_name in columns.items()}
    renamed: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, value in row.items():
        ours = theirs.get(key, f"{key} (not mapped)")
        renamed[ours] = value
        names[ours] = key
    return renamed, names


def _file_field(field_name: str, names: Mapping[str, str]) -> str:
    head = re.match(r"[^.\[]*", field_name).group(0)
    return names.get(head, head) + field_name[len(head):]


def read_row(row: Any, options: ChatOptions) -> Read:
    """One raw row in the canonical shape, with its format and the fields (``a``, ``messages[].b``) not read.

    Fields are named as the file names them (``options.columns`` renames them for reading only)."""
    if not isinstance(row, Mapping):
        raise RowError("not_an_object", "row", f"expected a JSON object, got {_type_name(row)}")
    row, names = apply_columns(row, options.columns)
    try:
        name = detect(row, options)
        if name not in FORMATS:
            raise RowError("bad_field", "type", f"unknown dataset type {name!r} (known: {', '.join(FORMATS)})")
        canonical, read, unread = FORMATS[name](row, options)
        if "messages" in canonical:
            read |= fill_media(canonical["messages"], row)
    except RowError as err:
        if not options.columns:
            raise
        field_name = _file_field(err.field, names)
        problem = str(err)[len(err.field) + 2:] if err.field else str(err)
        raise RowError(err.reason, field_name, problem) from None
    unread = [names[k] for k in row if _present(row, k) and k not in read] + [_file_field(k, names) for k in unread]
    return Read(canonical, name, unread)
