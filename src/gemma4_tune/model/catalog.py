"""The catalog of official Gemma 4 variants: published configs and their sources, as data.

One JSON file per checkpoint family in ``variants/`` holds the verbatim published
``config.json`` plus where it came from. Everything else (profiles, memory
estimates, tiny-model builders) derives its Gemma 4 facts from these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from gemma4_tune.findings import UNKNOWN_VARIANT, FindingError, finding

# Short names accepted on the command line -> catalog id.
ALIASES = {
    "e2b": "gemma-4-e2b",
    "e4b": "gemma-4-e4b",
    "26b-a4b": "gemma-4-26b-a4b",
    "26b": "gemma-4-26b-a4b",
    "31b": "gemma-4-31b",
    "12b": "gemma-4-12b",
}


@dataclass(frozen=True)
class Variant:
    """One official Gemma 4 checkpoint family."""

    id: str
    name: str
    hf_repos: dict[str, str]
    sources: list[str]
    config: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    published_parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        """The CLI short name (``e2b``, ``31b``...)."""
        return next(k for k, v in ALIASES.items() if v == self.id)


@cache
def variants() -> dict[str, Variant]:
    """All catalog variants by id, read from the packaged data files."""
    out: dict[str, Variant] = {}
    for entry in sorted(resources.files(__package__).joinpath("variants").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        out[data["id"]] = Variant(
            id=data["id"],
            name=data["name"],
            hf_repos=data["hf_repos"],
            sources=data["sources"],
            config=data["config"],
            tokenizer=data.get("tokenizer", {}),
            published_parameters=data.get("published_parameters", {}),
        )
    return out


def resolve_variant(name: str) -> Variant:
    """Look a variant up by short name, catalog id or Hugging Face repo id (case-insensitive)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    table = variants()
    if key in table:
        return table[key]
    for variant in table.values():
        repos = {r.lower() for r in variant.hf_repos.values()}
        if key in repos or key.split("/")[-1] in {r.split("/")[-1] for r in repos}:
            return variant
    known = ", ".join(sorted(ALIASES)) + "; or " + ", ".join(sorted(table))
    raise FindingError(
        finding(
            UNKNOWN_VARIANT.code,
            f"'{name}' is neither a local model directory nor a Gemma 4 variant in the catalog",
            f"pass a directory with a config.json, or one of: {known}",
        )
    )
