"""Read the rows of a data file or directory through the ``datasets`` library, with a split honoured exactly.

Accepted: JSON Lines (``.jsonl``), JSON (``.json``: an array of rows, or JSON Lines), Parquet, CSV, Arrow
files, text corpora (``.txt``: one document per non-empty line, a plain-text row ``{"text": line}``, read with
``datasets``' ``text`` builder as LLaMA-Factory reads them), and directories written by ``save_to_disk`` (a
``Dataset`` or a ``DatasetDict``). LLaMA-Factory's ``dataset_info.json`` (a file, or its ``data/`` folder) is
an index of datasets, not one: it is refused with how to name a dataset in it (``is_llamafactory_info``). A ``split``
takes ``datasets``' own syntax and meaning (``train``, ``train[:10%]``, ``train[10%:]``, ``train[:500]``),
for files and saved directories alike.

JSON and JSON Lines are parsed with Python's ``json``, not ``datasets``' JSON loader: Arrow needs one type
per column, and where chat rows mix string and list content (common) that loader falls back to pandas,
which silently turns a completion ``"4."`` into the float ``4.0`` (measured with datasets 5.2). Python's
parser keeps every value as written and names a broken line by its number; the split is still taken with
``datasets``' own ReadInstruction.

Nothing is ever fetched: a URL or a hub id where a local path is expected is refused (G4T306).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.findings import FindingError, Severity, finding, register

DATA_NOT_FOUND = register("G4T303", Severity.ERROR, "Data file not found")
REMOTE_DATA = register("G4T306", Severity.ERROR, "Data given as a URL or hub id")
UNREADABLE_DATA = register("G4T307", Severity.ERROR, "Data file cannot be read")

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}
FILE_KINDS = {"json": "JSON", "parquet": "Parquet", "csv": "CSV", "arrow": "Arrow", "text": "text",
              "disk": "datasets directory"}
LLAMAFACTORY_INFO = "dataset_info.json"
_LLAMAFACTORY_SOURCES = frozenset({"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url",
                                   "cloud_file_name"})
"""The keys that say where one entry of LLaMA-Factory's dataset_info.json reads its rows."""
MAX_DEPTH = 100
"""The deepest nesting of lists and objects a row may have. A chat row needs about 10 levels; Python's ``json``
stops near 1000 (RecursionError) and Parquet's reader at 100 schema levels."""
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class RowSource:
    """The rows of one file or directory: ``(source, row)`` pairs, a row being a dict or a ``RowError``."""

    path: Path
    kind: str
    base: Path
    rows: list[tuple[str, Any]]
    reader: str = "datasets"
    total_rows: int = 0
    split: str | None = None
    notes: list[str] = field(default_factory=list)


class RowError(Exception):
    """A problem with one row: a reason key (for ``DataReport.dropped``), the field and what is wrong."""

    def __init__(self, reason: str, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}" if field_name else problem)
        self.reason = reason
        self.field = field_name


def check_depth(value: Any, field_name: str = "") -> None:
    """Raise a RowError when lists and objects in ``value`` nest deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise _too_deep(field_name)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def load_json(text: str, field_name: str = "") -> Any:
    """``json.loads`` for a JSON string inside a row: nesting past MAX_DEPTH is a RowError, never a RecursionError.

    ``json.JSONDecodeError`` is left to the caller, who says which field holds the text.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep(field_name) from None
    check_depth(value, field_name)
    return value


def _too_deep(field_name: str) -> RowError:
    return RowError("too_deep", field_name, f"lists and objects nested more than {MAX_DEPTH} levels deep")


def remote_reference(value: str) -> str | None:
    """What kind of remote reference ``value`` is (``"URL"``, ``"hub id"``), or None for a local path."""
    if _URL.match(value):
        return "URL"
    if not Path(value).exists() and _HUB_ID.match(value) and not Path(value).suffix:
        return "hub id"
    return None


def refuse_remote(value: str, what: str) -> None:
    """Raise G4T306 when ``value`` (a ``what``, e.g. "data") is a URL or a hub id rather than a local path."""
    kind = remote_reference(value)
    if kind is None:
        return
    raise FindingError(finding(
        REMOTE_DATA.code,
        f"{what} {value!r} is " + ("a URL" if kind == "URL" else "no local path and looks like a hub id")
        + ": gemma4-tune never fetches anything at run time",
        "download it first (e.g. `huggingface-cli download --repo-type dataset ID --local-dir DIR`, or "
        "`curl -o FILE URL`) and pass the local file or directory",
        value=value,
    ))


def _split_rows(path: Path, n: int, split: str | None, names: tuple[str, ...] = ("train",)) -> list[int]:
    """Row indices that ``split`` selects from ``n`` rows, with ``datasets``' own ReadInstruction semantics."""
    from datasets import ReadInstruction

    spec = split or "train"
    name = _split_name(spec)
    if name not in names:
        raise _bad_split(path, spec, f"there is no split {name!r} here", list(names))
    try:
        instructions = ReadInstruction.from_spec(spec).to_absolute({name: n})
    except (ValueError, AssertionError) as exc:
        raise _bad_split(path, spec, str(exc), list(names)) from None
    picked: list[int] = []
    for instruction in instructions:
        picked.extend(range(instruction.from_, instruction.to))
    return picked


def _split_name(spec: str) -> str:
    return spec.split("[", 1)[0].strip()


def _bad_split(path: Path, spec: str, detail: str, names: list[str]) -> FindingError:
    return FindingError(finding(
        UNREADABLE_DATA.code,
        f"{path}: split {spec!r} cannot be taken: {detail.strip()}",
        f"use one of the splits {', '.join(names)}, optionally sliced as datasets slices them "
        "(train[:10%], train[10%:], train[:500])",
        path=str(path),
    ))


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    """``(line number, row or RowError)`` for each non-blank line of a JSON Lines file."""
    out: list[tuple[int, Any]] = []
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.append((number, RowError("invalid_json", "", f"invalid JSON: not UTF-8 (byte {exc.start + 1})")))
                continue
            body = text.strip()
            if not body:
                continue
            try:
                out.append((number, json.loads(body)))
            except RecursionError:
                out.append((number, _too_deep("")))
            except json.JSONDecodeError as exc:
                truncated = exc.pos >= len(body) or exc.msg.startswith("Unterminated string")
                what = "truncated JSON (the line ends mid-value)" if truncated else "invalid JSON"
                out.append((number, RowError("invalid_json", "", f"{what}: {exc.msg} (column {exc.colno})")))
    return out


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _python_rows(path: Path) -> list[tuple[str, Any]]:
    """Rows of a JSON or JSON Lines file read with Python's ``json``, each with its line (or index)."""
    if _is_json_array(path):
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FindingError(finding(
                UNREADABLE_DATA.code, f"{path}: not valid JSON ({exc})",
                "fix the file: a JSON file holds one array of row objects (or write JSON Lines, one row a line)",
                path=str(path),
            )) from None
        except RecursionError:
            raise FindingError(finding(
                UNREADABLE_DATA.code, f"{path}: lists and objects nested more than {MAX_DEPTH} levels deep (Python's "
                "JSON parser gives up)", "fix the rows that nest this deep; written as JSON Lines, each such row "
                "is named by its line", path=str(path),
            )) from None
        return [(f"{path}#{i}", row) for i, row in enumerate(loaded)]
    return [(f"{path}:{number}", row) for number, row in _json_lines(path)]


def _datasets_table(path: Path, builder: str) -> Any:
    """The whole file as one ``datasets`` table (a single file is one split, ``train``)."""
    import datasets

    datasets.disable_progress_bars()
    # CSV holds text: every cell stays the string it is ("0" is not the number 0, "" is not missing).
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        kwargs = {"features": datasets.Features({name: datasets.Value("string") for name in header}),
                  "na_filter": False}
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def _read_file(path: Path, split: str | None) -> RowSource:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise FindingError(finding(
            UNREADABLE_DATA.code, f"{path}: unknown file type {path.suffix or '(no suffix)'!r}",
            f"use one of {', '.join(BUILDERS)} (or a directory written by save_to_disk)", path=str(path),
        ))
    base = path.absolute().parent
    if builder == "json":
        everything = _python_rows(path)
        picked = _split_rows(path, len(everything), split)
        return RowSource(path, builder, base, [everything[i] for i in picked], reader="json",
                         total_rows=len(everything), split=split)
    try:
        table = _datasets_table(path, builder)
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types; the message says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FindingError(finding(
            UNREADABLE_DATA.code, f"{path}: datasets cannot read this {FILE_KINDS[builder]} file: "
            f"{type(exc).__name__}: {first}",
            f"check that the file is a valid {FILE_KINDS[builder]} file (open it with "
            f"datasets.load_dataset({builder!r}, data_files=...))", path=str(path),
        )) from None
    if builder == "text":
        return _text_rows(path, table, split)
    picked = _split_rows(path, table.num_rows, split)
    rows = _undecoded(table.select(picked) if len(picked) != table.num_rows else table)
    located = [(f"{path}#{i}", row) for i, row in zip(picked, rows, strict=True)]
    return RowSource(path, builder, base, located, total_rows=table.num_rows, split=split)


def _text_rows(path: Path, table: Any, split: str | None) -> RowSource:
    """A text corpus: each non-empty line one plain-text row, named by its line; ``split`` counts documents."""
    documents = [(f"{path}:{number}", {"text": text}) for number, text in enumerate(table["text"], start=1)
                 if text.strip()]
    picked = _split_rows(path, len(documents), split)
    blank = table.num_rows - len(documents)
    notes = [f"{blank} blank lines are not documents"] if blank else []
    return RowSource(path, "text", path.absolute().parent, [documents[i] for i in picked], total_rows=len(documents),
                     split=split, notes=notes)


def _undecoded(table: Any) -> Any:
    """``table`` with its Image/Audio columns left as ``{"bytes", "path"}`` (no decoding, nothing lost)."""
    import datasets

    def raw(feature: Any) -> Any:
        if isinstance(feature, (datasets.Image, datasets.Audio)):
            return type(feature)(decode=False)
        if isinstance(feature, (datasets.List, datasets.LargeList)):
            inner = raw(feature.feature)
            return type(feature)(inner) if inner is not feature.feature else feature
        return feature

    for name, feature in table.features.items():
        if raw(feature) is not feature:
            table = table.cast_column(name, raw(feature))
    return table


def media_cache() -> Path:
    """Where embedded media are written so that they can be read by path: ``$GEMMA4_TUNE_MEDIA_CACHE`` or
    ``~/.cache/gemma4-tune/media``, one file per content hash."""
    return Path(os.environ.get("GEMMA4_TUNE_MEDIA_CACHE") or Path.home() / ".cache" / "gemma4-tune" / "media")


def materialise(data: bytes, kind: str) -> str:
    """A file holding embedded media bytes (named by their sha256, written once, atomically)."""
    if kind == "audio" and not data.startswith(b"RIFF"):
        raise RowError("bad_content", "", "embedded audio that is not WAV cannot be read; convert it to WAV files "
                       "and list their paths")
    folder = media_cache()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(data).hexdigest()}{'.wav' if kind == 'audio' else '.img'}"
    if not target.is_file():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return str(target)


def _read_directory(path: Path, split: str | None) -> RowSource:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise FindingError(finding(
            DATA_NOT_FOUND.code,
            f"{path} is a directory but not a saved datasets directory (no dataset_info.json or dataset_dict.json)",
            "pass a data file (.jsonl, .json, .parquet, .csv) or a directory written by Dataset/DatasetDict.save_to_disk",
            path=str(path),
        )) from None
    spec = split or "train"
    name = _split_name(spec)
    if isinstance(loaded, datasets.DatasetDict):
        if name not in loaded:
            raise FindingError(finding(
                UNREADABLE_DATA.code, f"{path}: splits: no {name!r} split (found: {', '.join(loaded) or 'none'})",
                "save the training rows as the 'train' split, or name the split to read "
                "(datasets[].split in YAML, e.g. `split: validation`)", path=str(path),
            ))
        table = loaded[name]
    else:
        if name != "train":
            raise _bad_split(path, spec, "a saved Dataset (not a DatasetDict) has one split, 'train'", ["train"])
        table = loaded
    picked = _split_rows(path, table.num_rows, spec, (name,))
    rows = _undecoded(table.select(picked) if len(picked) != table.num_rows else table)
    located = [(f"{path}#{i}", row) for i, row in zip(picked, rows, strict=True)]
    return RowSource(path, "disk", path.absolute(), located, total_rows=table.num_rows, split=split)


def is_llamafactory_info(path: str | Path) -> bool:
    """True for LLaMA-Factory's ``dataset_info.json`` (names -> objects with ``file_name``, ``hf_hub_url``, ...), or a
    folder holding one that is not a ``save_to_disk`` directory (whose own dataset_info.json describes features)."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return False
        path = path / LLAMAFACTORY_INFO
    if path.name != LLAMAFACTORY_INFO or not path.is_file():
        return False
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    return (isinstance(info, dict) and bool(info) and all(isinstance(entry, dict) for entry in info.values())
            and any(_LLAMAFACTORY_SOURCES & entry.keys() for entry in info.values()))


def read_rows(path: str | Path, split: str | None = None) -> RowSource:
    """Every row of a data file or ``save_to_disk`` directory that ``split`` selects, located for findings."""
    refuse_remote(str(path), "data")
    path = Path(path)
    if not path.exists():
        resolved = "" if path.is_absolute() else f" (resolved: {path.absolute()})"
        raise FindingError(finding(
            DATA_NOT_FOUND.code, f"data file not found: {path}{resolved}",
            "pass an existing data file (.jsonl, .json, .parquet, .csv, .txt) or a save_to_disk directory",
            path=str(path),
        ))
    if is_llamafactory_info(path):
        info = path / LLAMAFACTORY_INFO if path.is_dir() else path
        raise FindingError(finding(
            UNREADABLE_DATA.code, f"{info} is LLaMA-Factory's dataset_info.json, an index of datasets, not rows",
            f"name one of its datasets: `--data {info}:NAME` (or the dataset's own file)", path=str(path),
        ))
    return _read_directory(path, split) if path.is_dir() else _read_file(path, split)
