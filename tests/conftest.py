"""Shared fixtures: tiny models built once per session through the user's code path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GEMMA4_TUNE_MEDIA_CACHE", tempfile.mkdtemp(prefix="gemma4-tune-media-"))

VARIANTS = ["e2b", "e4b", "26b-a4b", "31b", "12b"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Lazily built tiny model directories, one per variant, via ``gemma4_tune.api.tiny_model``."""
    from gemma4_tune.api import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    class _Lazy(dict):
        def __missing__(self, variant: str) -> Path:
            path = tiny_model(variant, root / variant, seed=0)
            built[variant] = path
            self[variant] = path
            return path

    return _Lazy()
