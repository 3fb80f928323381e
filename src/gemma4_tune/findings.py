"""Findings: every check reports what is wrong in the user's terms and how to fix it.

Each finding has a stable code (``G4T###``) registered here once, with its severity,
a one-line title and the failure-catalog row it guards against. ``docs/checks.md``
documents every code; a test keeps the two in step.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Severity(str, enum.Enum):
    """How bad a finding is: errors stop the command (exit 1), warnings are reported."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class CheckSpec:
    """The registered, documented identity of a check."""

    code: str
    severity: Severity
    title: str
    catalog_rows: tuple[int, ...] = ()


@dataclass
class Finding:
    """One result of one check."""

    code: str
    severity: Severity
    message: str
    fix: str
    source: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["severity"] = self.severity.value
        return data

    def one_line(self) -> str:
        """``G4T###: message — fix``, the form shown on a terminal."""
        return f"{self.code}: {self.message} — {self.fix}"


REGISTRY: dict[str, CheckSpec] = {}


def register(code: str, severity: Severity, title: str, catalog_rows: tuple[int, ...] = ()) -> CheckSpec:
    """Register a check code once; a duplicate code is a programming error."""
    if code in REGISTRY:
        raise ValueError(f"check code {code} registered twice")
    spec = CheckSpec(code, severity, title, catalog_rows)
    REGISTRY[code] = spec
    return spec


def finding(code: str, message: str, fix: str, *, severity: Severity | None = None, **details: Any) -> Finding:
    """Build a finding for a registered code (its default severity unless overridden)."""
    spec = REGISTRY[code]
    rows = ", ".join(str(r) for r in spec.catalog_rows)
    source = f"failure-catalog row {rows}" if rows else ""
    return Finding(code, severity or spec.severity, message, fix, source, details)


class FindingError(Exception):
    """Raised to stop a command with one or more findings (the CLI renders them, exit 1)."""

    def __init__(self, *findings: Finding) -> None:
        super().__init__("; ".join(f.one_line() for f in findings))
        self.findings = list(findings)


def has_errors(findings: list[Finding]) -> bool:
    """True if any finding is an error."""
    return any(f.severity is Severity.ERROR for f in findings)


# Foundation: inputs, models, environment.
MODEL_NOT_FOUND = register("G4T001", Severity.ERROR, "Model not found")
NOT_GEMMA4 = register("G4T002", Severity.ERROR, "Not a Gemma 4 checkpoint")
UNKNOWN_VARIANT = register("G4T003", Severity.ERROR, "Unknown catalog variant")
OUTPUT_EXISTS = register("G4T004", Severity.ERROR, "Output directory is not empty")
