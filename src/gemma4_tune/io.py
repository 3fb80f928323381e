"""Safe writes: a file or directory appears complete or not at all, as strict JSON where it is JSON.

Also the checks every writing command makes before its long work starts: the output location is
writable (G4T021) and its disk has room for what will be written (G4T020), and the conversion of
a full disk met while writing into the same G4T020 finding.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gemma4_tune.findings import OUTPUT_EXISTS, Finding, FindingError, Severity, finding, register

NO_SPACE = register("G4T020", Severity.ERROR, "Not enough disk space")
NOT_WRITABLE = register("G4T021", Severity.ERROR, "Output location is not writable")
STALE_TEMP_REMOVED = register("G4T022", Severity.INFO, "Removed what a killed earlier write left behind")

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY = frozenset({errno.EROFS})


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def existing_folder(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (which may be a file in the way)."""
    path = Path(path).absolute()
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor))


def check_writable(path: str | Path, option: str, *, whole: bool = False) -> None:
    """Refuse (G4T021) an output location nothing can be written to, before any work starts.

    Creates and removes a temporary file in the folder the command will write into: ``path`` itself
    when it is a directory, else its nearest existing ancestor; with ``whole`` (a directory written
    beside itself and renamed into place) the folder that holds ``path``.
    """
    path = Path(path)
    folder = existing_folder(path.parent if whole or path.is_file() else path)
    if not folder.is_dir():
        raise FindingError(finding(NOT_WRITABLE.code, f"{option} {path}: {folder} is a file, so no folder can be "
                                   "made under it", f"choose a {option} whose parent folders are folders",
                                   path=str(path), folder=str(folder)))
    try:
        fd, probe = tempfile.mkstemp(prefix=".gemma4-tune-write-test-", dir=folder)
    except OSError as exc:
        found = write_error(exc, path, f"anything into {option}")
        raise FindingError(found or finding(
            NOT_WRITABLE.code, f"{option} {path}: cannot create a file in {folder} ({exc.strerror})",
            f"choose a {option} in a folder you can write to, or give yourself write permission on {folder}",
            path=str(path), folder=str(folder))) from exc
    os.close(fd)
    os.unlink(probe)


def check_free_space(needs: Sequence[tuple[str | Path, int, str]]) -> None:
    """Refuse (G4T020) writes that cannot fit: ``needs`` is ``(path, bytes, what)``; paths on one disk add up."""
    by_disk: dict[int, list[tuple[Path, int, str]]] = {}
    for path, nbytes, what in needs:
        folder = existing_folder(Path(path))
        by_disk.setdefault(os.stat(folder).st_dev, []).append((folder, nbytes, what))
    for items in by_disk.values():
        folder = items[0][0]
        needed = sum(n for _, n, _ in items)
        free = shutil.disk_usage(folder).free
        if needed > free:
            what = " and ".join(w for _, _, w in items)
            raise FindingError(finding(NO_SPACE.code, f"writing {what} needs about {_size(needed)} on the disk of "
                                       f"{folder}, but only {_size(free)} is free there", f"free at least "
                                       f"{_size(needed - free)} on that disk, or write to a disk with more room",
                                       folder=str(folder), needed_bytes=needed, free_bytes=free))


def write_error(exc: OSError, where: str | Path, what: str) -> Finding | None:
    """G4T020 for a full disk or quota (ENOSPC, EDQUOT), G4T021 for a read-only filesystem; None otherwise."""
    where = Path(exc.filename) if exc.filename else Path(where)
    if exc.errno in DISK_FULL:
        folder = existing_folder(where)
        folder = folder if folder.is_dir() else folder.parent
        free = shutil.disk_usage(folder).free
        return finding(NO_SPACE.code, f"the disk of {folder} filled up while writing {what} ({exc.strerror}: "
                       f"{where}; {_size(free)} free now)",
                       "free space on that disk (or raise the quota) and run the command again, or write to "
                       "another disk", path=str(where), free_bytes=free)
    if exc.errno in _READ_ONLY:
        return finding(NOT_WRITABLE.code, f"{where} is on a read-only filesystem: cannot write {what}",
                       "write to a folder on a writable disk", path=str(where))
    return None


@contextlib.contextmanager
def output_errors(where: str | Path, what: str, *, cleanup: Sequence[Path] = ()) -> Iterator[None]:
    """Turn a full disk or read-only filesystem met inside the block into G4T020 / G4T021.

    ``cleanup`` are paths removed first when that happens (half-written work outside an atomic write).
    """
    try:
        yield
    except OSError as exc:
        found = write_error(exc, where, what)
        if found is None:
            raise
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        raise FindingError(found) from exc


def strict(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None (JSON ``null``), recursively."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    return data


def figure_text(value: float | None, spec: str) -> str:
    """A figure read back from strict JSON, formatted by ``spec``; ``nan`` for a null (a NaN when written) or
    non-finite one."""
    return "nan" if value is None or not math.isfinite(value) else format(value, spec)


def json_text(data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON (never NaN or Infinity: those become null); unknown objects as ``str``."""
    return json.dumps(strict(data), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: the old file or the whole new one, never a part."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def write_json(path: str | Path, data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` to ``path`` as strict JSON (NaN and infinities as null), atomically."""
    return write_text_atomic(path, json_text(data, sort_keys=sort_keys) + "\n")


def ensure_empty_target(out: Path, *, overwrite: bool = False) -> None:
    """Refuse to write into a non-empty directory unless told to replace it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FindingError(finding(OUTPUT_EXISTS.code, f"{out} already exists and is not empty",
                                   "choose a new --out directory, or remove the old one"))


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale_temps(out: Path) -> Finding | None:
    """Remove the temporary siblings (``.{name}.tmp-{pid}-*``) of ``out`` whose writing process is gone.

    The pid in the folder's name says which process was writing; a folder whose process still runs
    (a write in progress) is left alone. Returns G4T022 with the count and bytes freed, or None.
    """
    if not out.parent.is_dir():
        return None
    removed, freed = [], 0
    for path in sorted(out.parent.glob(_tmp_prefix(out) + "*")):
        owner = re.fullmatch(r"(\d+)-.+", path.name[len(_tmp_prefix(out)):])
        if not path.is_dir() or owner is None or _alive(int(owner.group(1))):
            continue
        freed += _tree_size(path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if not removed:
        return None
    return finding(STALE_TEMP_REMOVED.code, f"removed {len(removed)} unfinished temporary folder(s) beside {out} "
                   f"left by a write that was killed ({removed[0]}...), freeing {_size(freed)}",
                   "nothing to do", removed=removed, freed_bytes=freed)


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out`` in one rename.

    The temporary folder's name carries this process's pid, so a later write of the same ``out``
    removes what a killed one left behind (G4T022, shown on stderr).
    """
    ensure_empty_target(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(out)
    if stale is not None:
        sys.stderr.write(stale.one_line() + "\n")
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
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
