"""The Python API under the CLI; other trainers call these."""

from __future__ import annotations

from pathlib import Path

from gemma4_tune.catalog import resolve_variant
from gemma4_tune.io import atomic_directory


def tiny_model(variant: str, out: str | Path, *, seed: int = 0, template_revision: str = "v5") -> Path:
    """Write a tiny random Gemma 4 shaped like ``variant`` to ``out`` (atomically); return the path."""
    from gemma4_tune.catalog.tiny import build_tiny_model
    from gemma4_tune.data.chat import official_template

    spec = resolve_variant(variant)
    template = official_template(template_revision)
    out = Path(out)
    with atomic_directory(out) as tmp:
        build_tiny_model(spec, tmp, seed=seed, chat_template=template)
    return out
