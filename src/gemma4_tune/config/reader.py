"""What every run-file reader is: a unit that turns one tool's YAML into RunConfig values, key by key.

A reader (``ours``, ``axolotl``, ``llamafactory``) says whether a file is written for its tool (``claims``) and
translates it with that tool's meaning of every key. Each key becomes a row of the mapping that
``train --explain-config`` shows:

- **mapped**: set on the RunConfig with the value the tool gives it (a key the file leaves out takes the tool's
  default where ours differs, shown as **default**);
- **read differently**: read as closely as gemma4-tune allows, with how it differs (one G4T007 finding);
- **no effect** here (logging, hubs, kernels, workers): accepted and reported once (one G4T006 finding);
- **refused** where it contradicts what gemma4-tune guarantees, with the reason.

Refused and unknown keys end in one G4T005 finding that lists them all. Readers import this module and
``options``; ``options`` imports no reader, and no reader imports another (``pyproject.toml`` contracts).
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gemma4_tune.config.options import BAD_CONFIG
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register

NO_EFFECT = register("G4T006", Severity.WARNING, "Config keys with no effect here")
READ_DIFFERENTLY = register("G4T007", Severity.INFO, "Config keys read as closely as gemma4-tune allows")


@dataclass
class Translation:
    """The values, the key-by-key mapping and the refusals of one run file."""

    source: str
    tool: str
    doc: str
    values: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    no_effect: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    """Our field -> the key the user wrote for it, so that a bad value is reported under the user's key."""

    def row(self, key: str, value: Any, status: str, became: str) -> None:
        self.rows.append({"key": key, "value": show(value), "status": status, "became": became})

    def map(self, key: str, value: Any, field_name: str, new: Any, note: str = "") -> None:
        self.values[field_name] = new
        self.names.setdefault(field_name, key)
        self.row(key, value, "mapped", f"{field_name} = {show(new)}" + (f" ({note})" if note else ""))

    def default(self, key: str, field_name: str, value: Any, note: str) -> None:
        """A key the file leaves out: the tool's default, where it differs from ours."""
        self.values.setdefault(field_name, value)
        self.row(key, None, "default", f"{field_name} = {show(value)} ({note})")

    def refuse(self, key: str, value: Any, reason: str) -> None:
        self.refused.append(f"{key}: {reason}")
        self.row(key, value, "refused", reason)

    def differ(self, key: str, value: Any, field_name: str | None, new: Any, how: str) -> None:
        if field_name:
            self.values[field_name] = new
            self.names.setdefault(field_name, key)
        self.differs.append(f"{key}: {how}")
        self.row(key, value, "read differently", (f"{field_name} = {show(new)}; " if field_name else "") + how)

    def ignore(self, key: str, value: Any, reason: str) -> None:
        self.no_effect.append(key)
        self.row(key, value, "no effect", reason)

    def finish(self, known: Iterable[str] = ()) -> tuple[dict[str, Any], list[dict[str, str]], list[Finding]]:
        """The values, the mapping and the findings to show; refused or unknown keys raise one G4T005 finding."""
        if self.unknown or self.refused:
            parts = []
            if self.unknown:
                names = sorted(known)
                hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, n=1, cutoff=0.85))
                         else k for k in self.unknown]
                parts.append(f"{len(self.unknown)} unknown key(s): {', '.join(hints)}")
            if self.refused:
                parts.append(f"{len(self.refused)} refused: {'; '.join(self.refused)}")
            raise FindingError(finding(BAD_CONFIG.code, f"{self.source}: {' — '.join(parts)}",
                                       f"remove or change these keys ({self.doc} lists every key and what it "
                                       "becomes; `gemma4-tune train FILE --explain-config` shows this file's "
                                       "mapping)", mapping=self.rows))
        notes: list[Finding] = []
        if self.no_effect:
            notes.append(finding(NO_EFFECT.code, f"{self.source}: {len(self.no_effect)} {self.tool} keys have no "
                                 f"effect here: {', '.join(self.no_effect)}",
                                 "nothing to do; `--explain-config` gives each reason"))
        if self.differs:
            notes.append(finding(READ_DIFFERENTLY.code, f"{self.source}: {'; '.join(self.differs)}",
                                 f"nothing to do unless the difference matters to you; see {self.doc}"))
        return self.values, self.rows, notes


class Reader(ABC):
    """One tool's run files: ``claims`` recognises them, ``translate`` reads them with the tool's meaning."""

    dialect: str
    """The tool's name, as the mapping and the findings show it."""
    aliases: Mapping[str, str] = {}
    """The tool's key -> ours, for keys that map one to one (a did-you-mean for our own files)."""
    known: frozenset[str] = frozenset()
    """The tool's keys this reader knows (a did-you-mean for an unknown key)."""

    @abstractmethod
    def claims(self, data: Mapping[str, Any]) -> bool:
        """Whether a run file is written for this tool."""

    @abstractmethod
    def translate(self, data: dict[str, Any], *, source: str) -> Translation:
        """The file as RunConfig values, key by key (``Translation.finish`` raises on refused or unknown keys)."""


def strings(value: Any) -> bool:
    """Whether ``value`` is a list of strings."""
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def finite(value: Any) -> float | None:
    """A finite number given as a number or a numeric string (YAML reads unquoted 1e-4 as one); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def show(value: Any) -> str:
    """A value as the mapping shows it (cut at 100 characters)."""
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 100 else text[:97] + "..."
