"""LLaMA-Factory's ``dataset_info.json``: a dataset named there, read with LLaMA-Factory's meaning of each field.

An entry (``"mllm_demo": {"file_name": ..., "formatting": "sharegpt", "columns": {...}, "tags": {...}}``)
becomes the keys of one dataset of a run (``DatasetSpec``'s fields) and a row per field saying what it became:

- ``file_name`` (relative to the folder of ``dataset_info.json``, LLaMA-Factory's ``dataset_dir``), ``split``;
- ``formatting`` ``alpaca`` (the default), ``sharegpt`` or ``openai``; ``ranking: true`` marks pairs (DPO);
- ``columns``: LLaMA-Factory's column roles -> the file's columns, given to the row readers in our names
  (``prompt``/``query``/``response`` are Alpaca's ``instruction``/``input``/``output``, ``kto_tag`` is ``label``);
- ``tags`` (ShareGPT): ``role_tag``/``content_tag`` and the role names, as the message keys and roles to read.

Entries that name a hub or a script (``hf_hub_url``, ``ms_hub_url``, ``om_hub_url``, ``script_url``,
``cloud_file_name``) are refused: nothing is downloaded at run time. ``num_samples`` (a random subsample),
``subset`` and ``folder`` are refused with the reason; any other field is unknown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = "dataset_info.json"

#: LLaMA-Factory's column roles -> ours (the row readers' column names).
COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
           "messages": "messages", "system": "system", "tools": "tools", "images": "images", "videos": "videos",
           "audios": "audios", "chosen": "chosen", "rejected": "rejected", "kto_tag": "label"}
#: LLaMA-Factory's defaults for the columns of each formatting (DatasetAttr).
_DEFAULT_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
                    "sharegpt": {"messages": "conversations"}, "openai": {"messages": "conversations"}}
#: LLaMA-Factory's ShareGPT tags and their defaults.
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_HUBS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_FIELDS = frozenset({"file_name", "formatting", "ranking", "split", "columns", "tags", "subset", "folder",
                     "num_samples", *_HUBS})


@dataclass
class InfoEntry:
    """One dataset of ``dataset_info.json``: the dataset keys it becomes, its kind, and a row per field."""

    name: str
    spec: dict[str, Any] = field(default_factory=dict)
    kind: str = "sft"
    """``sft``, ``ranking`` (pairs: DPO) or ``kto`` (rows with a desirable/undesirable tag)."""
    rows: list[tuple[str, Any, str, str]] = field(default_factory=list)
    """(field, value, status, what it became or why it is refused); status: mapped, read differently, refused."""

    @property
    def refused(self) -> list[str]:
        return [f"{key}: {why}" for key, _, status, why in self.rows if status == "refused"]


def read_info(path: Path) -> dict[str, Any]:
    """The parsed ``dataset_info.json``; ``ValueError`` with the reason when it is not a mapping of names."""
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise ValueError(f"{path} is not LLaMA-Factory's dataset_info.json (a mapping of dataset names to objects)")
    return info


def resolve(info: dict[str, Any], name: str, dataset_dir: Path) -> InfoEntry:
    """The dataset ``name`` of a parsed ``dataset_info.json`` in ``dataset_dir``, field by field."""
    entry = InfoEntry(name)
    where = f"{name}"
    attrs = info.get(name)
    if attrs is None:
        entry.rows.append((where, None, "refused", f"no dataset {name!r} in {dataset_dir / FILE_NAME} (it defines: "
                                                   f"{', '.join(sorted(info)) or 'none'})"))
        return entry
    for key in sorted(set(attrs) - _FIELDS):
        entry.rows.append((f"{where}.{key}", attrs[key], "refused", "not a dataset_info.json field"))
    hub = next((key for key in _HUBS if key in attrs), None)
    if hub:
        entry.rows.append((f"{where}.{hub}", attrs[hub], "refused", "gemma4-tune never downloads at run time: "
                           "download the dataset and give its local file as file_name"))
        return entry
    file_name = attrs.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        entry.rows.append((f"{where}.file_name", file_name, "refused", "each local dataset needs a file_name"))
        return entry
    path = (dataset_dir / file_name).resolve()
    entry.spec["path"] = str(path)
    entry.rows.append((f"{where}.file_name", file_name, "mapped", f"path = {path}"))
    for key, why in (("subset", "a subset (config name) of a local file means nothing to datasets' json/csv "
                                "readers; split the file instead"),
                     ("folder", "give the folder's file as file_name"),
                     ("num_samples", "a random subsample (with replacement above the file's size) is not "
                                     "reproduced; use max_samples (the first N rows) or sample the file first")):
        if attrs.get(key) is not None:
            entry.rows.append((f"{where}.{key}", attrs[key], "refused", why))
    split = attrs.get("split", "train")
    entry.spec["split"] = str(split)
    formatting = attrs.get("formatting", "alpaca")
    if formatting not in _DEFAULT_COLUMNS:
        entry.rows.append((f"{where}.formatting", formatting, "refused", "formatting is alpaca, sharegpt or openai"))
        return entry
    ranking = attrs.get("ranking", False)
    if not isinstance(ranking, bool):
        entry.rows.append((f"{where}.ranking", ranking, "refused", "ranking is true or false"))
        return entry
    columns = attrs.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        entry.rows.append((f"{where}.columns", columns, "refused", "columns maps column roles to column names"))
        return entry
    for key in sorted(set(columns) - set(COLUMNS)):
        entry.rows.append((f"{where}.columns.{key}", columns[key], "refused",
                           f"not one of LLaMA-Factory's column roles ({', '.join(COLUMNS)})"))
    given = {**_DEFAULT_COLUMNS[formatting], **{k: v for k, v in columns.items() if k in COLUMNS}}
    entry.kind = "ranking" if ranking else "kto" if "kto_tag" in given else "sft"
    if ranking and not ({"chosen", "rejected"} <= set(given)):
        entry.rows.append((f"{where}.columns", columns, "refused", "ranking: true needs the chosen and rejected "
                                                                   "columns"))
    mapped = {COLUMNS[role]: column for role, column in given.items()}
    entry.spec["columns"] = mapped
    text = formatting == "alpaca" and entry.kind == "sft" and "prompt" in columns and not {"query", "response"} & set(
        columns)
    if text:
        entry.spec["format"] = "text"  # a prompt column alone is a document (LLaMA-Factory's pt data, e.g. .txt)
        entry.spec["columns"] = {"text": given["prompt"]}
        mapped = entry.spec["columns"]
    elif formatting == "alpaca":
        entry.spec["format"] = None if entry.kind != "sft" else "alpaca"
    else:
        entry.spec["format"] = None if entry.kind != "sft" else ("sharegpt" if formatting == "sharegpt" else "openai")
        _tags(attrs.get("tags"), where, entry)
    entry.rows.append((where, attrs, "mapped", ("plain-text documents" if text else f"{formatting} rows") + (", pairs" if ranking else "")
                       + (", KTO tags" if entry.kind == "kto" else "") + f", columns {mapped}"))
    return entry


def _tags(tags: Any, where: str, entry: InfoEntry) -> None:
    """ShareGPT/OpenAI tags: the message keys and the role names, as the chat reader's mappings and roles."""
    if tags is None:
        return  # the row readers' defaults: ShareGPT's are LLaMA-Factory's (from/value, human/gpt/...), OpenAI's too
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        entry.rows.append((f"{where}.tags", tags, "refused", "tags maps tag names to strings"))
        return
    for key in sorted(set(tags) - set(TAGS)):
        entry.rows.append((f"{where}.tags.{key}", tags[key], "refused", f"not one of {', '.join(TAGS)}"))
    value = {**TAGS, **{k: v for k, v in tags.items() if k in TAGS}}  # LLaMA-Factory's defaults for the others
    entry.spec["message_property_mappings"] = {"role": value["role_tag"], "content": value["content_tag"]}
    entry.spec["roles"] = {"user": [value["user_tag"]], "assistant": [value["assistant_tag"]],
                           "tool": [value["observation_tag"]], "function_call": [value["function_tag"]],
                           "system": [value["system_tag"]]}


#: LLaMA-Factory v1's converters -> our row format (None: detected, the rows are v1's own or preference rows).
V1_CONVERTERS = {"alpaca": "alpaca-v1", "sharegpt": "sharegpt", "pair": None}
_V1_FIELDS = frozenset({"path", "source", "split", "converter", "size", "weight", "streaming"})


def is_v1_yaml(path: Path) -> bool:
    """Whether ``path`` is a LLaMA-Factory v1 dataset YAML (names -> ``{path, source, converter, ...}``)."""
    return path.suffix in (".yaml", ".yml") and path.is_file()


def read_v1_yaml(path: Path) -> list[dict[str, Any]]:
    """A v1 dataset YAML as datasets of a run, in order; ``ValueError`` naming every field that cannot be read.

    ``path`` of each entry is relative to the directory you run in (as LLaMA-Factory opens it); ``source: local``
    is required (nothing is downloaded); ``size`` and ``weight`` draw rows at random with replacement, unseeded,
    in LLaMA-Factory, and are refused; ``streaming`` is refused (datasets are validated whole).
    """
    import yaml

    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path} cannot be read as YAML ({exc})") from None
    if not isinstance(entries, dict) or not entries or not all(isinstance(v, dict) for v in entries.values()):
        raise ValueError(f"{path} is not a LLaMA-Factory v1 dataset YAML (names -> {{path, source, converter}})")
    specs: list[dict[str, Any]] = []
    problems: list[str] = []
    for name, entry in entries.items():
        problems += [f"{name}.{key}: not a v1 dataset field" for key in sorted(set(entry) - _V1_FIELDS)]
        if entry.get("source", "hf_hub") != "local":
            problems.append(f"{name}.source: {entry.get('source', 'hf_hub')!r}: gemma4-tune never downloads at run "
                            "time; download it and give a local path with source: local")
            continue
        for key, why in (("size", "draws rows at random with replacement, unseeded"),
                         ("weight", "draws rows at random with replacement, unseeded"),
                         ("streaming", "datasets are read whole, validated first")):
            if entry.get(key):
                problems.append(f"{name}.{key}: {why} in LLaMA-Factory; remove it (or sample the file first)")
        converter = entry.get("converter")
        if converter is not None and converter not in V1_CONVERTERS:
            problems.append(f"{name}.converter: {converter!r} is not one of {', '.join(V1_CONVERTERS)}")
            continue
        if not isinstance(entry.get("path"), str):
            problems.append(f"{name}.path: each dataset needs a path")
            continue
        specs.append({"path": str(Path(entry["path"]).expanduser().resolve()), "split": str(entry.get("split", "train")),
                      "format": V1_CONVERTERS.get(converter) if converter else None})
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}")
    return specs
