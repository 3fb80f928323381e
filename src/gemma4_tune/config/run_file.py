"""Run files: the YAML read, the reader that claims it (found in ``READERS``), and the RunConfig it becomes.

A file with ``base_model`` is Axolotl's, one with ``model_name_or_path`` and ``stage`` or ``finetuning_type`` is
LLaMA-Factory's, any other is ours. What each key became is ``ImportedConfig.mapping``
(``train --explain-config``); flags given on the command line override the file's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemma4_tune.config import axolotl, llamafactory, ours
from gemma4_tune.config.options import BAD_CONFIG, RunConfig, build_config
from gemma4_tune.config.reader import Reader
from gemma4_tune.findings import Finding, FindingError, finding

READERS: tuple[Reader, ...] = (axolotl.READER, llamafactory.READER, ours.READER)
"""The readers, asked in order; ours claims every file the others do not."""


@dataclass
class ImportedConfig:
    """A run file read: the RunConfig, where each key went (``mapping``) and what to tell the user."""

    config: RunConfig
    dialect: str = "gemma4-tune"
    mapping: list[dict[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _aliases() -> dict[str, tuple[str, str]]:
    return {key: (our, reader.dialect) for reader in READERS for key, our in reader.aliases.items() if key != our}


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML run file's mapping, every problem of reading it a G4T005 finding."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FindingError(finding(BAD_CONFIG.code, f"{path} does not exist", "check the path of the run file")) \
            from None
    except yaml.YAMLError as exc:
        raise FindingError(finding(BAD_CONFIG.code, f"{path} is not valid YAML: {exc}", "fix the YAML syntax")) \
            from None
    except RecursionError:
        raise FindingError(finding(BAD_CONFIG.code, f"{path} nests lists or mappings too deep to read",
                                   "write the run file as flat `key: value` lines")) from None
    if not isinstance(data, dict):
        raise FindingError(finding(BAD_CONFIG.code, f"{path} must hold a mapping of keys to values",
                                   "write `key: value` lines, e.g. `model: runs/tiny-e2b`"))
    return data


def read_run_file(path: str | Path, overrides: dict[str, Any] | None = None) -> ImportedConfig:
    """Read a YAML run file with the meaning its tool gives each key; ``overrides`` (flags) win."""
    path = Path(path)
    data = read_yaml(path)
    overrides = overrides or {}
    reader = next(r for r in READERS if r.claims(data))
    translation = reader.translate(data, source=str(path))
    values, mapping, notes = translation.finish(reader.known)
    names = {ours_: key for ours_, key in translation.names.items() if ours_ not in overrides and ours_ != key}
    config = build_config({**values, **overrides}, source=str(path), names=names, aliases=_aliases())
    if reader is ours.READER:
        return ImportedConfig(config)
    return ImportedConfig(config, reader.dialect, mapping, notes)


def load_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run file (ours, Axolotl's or LLaMA-Factory's) into a RunConfig."""
    return read_run_file(path, overrides).config
