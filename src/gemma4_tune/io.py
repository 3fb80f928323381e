"""Atomic artefact writes: a directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gemma4_tune.findings import OUTPUT_EXISTS, FindingError, finding


def ensure_empty_target(out: Path, *, overwrite: bool = False) -> None:
    """Refuse to write into a non-empty directory unless told to replace it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FindingError(finding(OUTPUT_EXISTS.code, f"{out} already exists and is not empty",
                                   "choose a new --out directory, or remove the old one"))


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out`` in one rename."""
    ensure_empty_target(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
