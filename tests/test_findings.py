"""Every check code is registered once and documented in docs/checks.md."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import gemma4_tune
from gemma4_tune.findings import REGISTRY

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checks.md"


def _import_all() -> None:
    for mod in pkgutil.walk_packages(gemma4_tune.__path__, "gemma4_tune."):
        importlib.import_module(mod.name)


def test_every_registered_code_has_a_documented_section() -> None:
    _import_all()
    text = DOCS.read_text()
    documented = set(re.findall(r"^## (G4T\d{3})\b", text, flags=re.M))
    assert set(REGISTRY) == documented
    for code in REGISTRY:
        section = text.split(f"## {code}", 1)[1].split("\n## ", 1)[0]
        for heading in ("What it does", "Why it matters", "Example", "Fix"):
            assert f"**{heading}**" in section, f"{code} lacks '{heading}'"


def test_codes_have_the_stable_format() -> None:
    _import_all()
    assert all(re.fullmatch(r"G4T\d{3}", code) for code in REGISTRY)


def test_the_summary_table_lists_every_code() -> None:
    _import_all()
    assert set(re.findall(r"^\| (G4T\d{3}) \|", DOCS.read_text(), flags=re.M)) == set(REGISTRY)
