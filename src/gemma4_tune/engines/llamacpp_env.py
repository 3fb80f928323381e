"""llama.cpp for GGUF export and verification: its own converters and a real runtime, cached.

Two parts, installed once into ``${GEMMA4_TUNE_ENGINES:-~/.cache/gemma4-tune/engines}/llama.cpp``
(outside the project and outside git), both from PyPI with pip:

- ``converters/``: llama.cpp's own ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their
  ``conversion/`` package and the matching ``gguf-py``, taken from the llama.cpp tree vendored in
  the ``llama-cpp-python`` source distribution (there is no wheel of the converters). pip
  downloads the sdist; reading its metadata needs ``scikit-build-core``, installed into a
  throw-away folder and used without build isolation, so nothing is compiled (about 5 s instead
  of a 90 s isolated build environment). The converters run with the training environment's
  python (they need torch, transformers, numpy, safetensors) and ``PYTHONPATH=converters/gguf-py``:
  the PyPI ``gguf`` release is older than these converters (``AttributeError: DFLASH``).
- ``site/``: ``llama-cpp-py-sync``, a cffi binding shipping prebuilt ``libllama``/``libggml``/
  ``libmtmd``, installed with ``pip install --target``. Its libraries need glibc 2.38; on an
  older glibc (Debian 12: 2.36) they are patched by :mod:`gemma4_tune.engines.glibc_compat`, the
  originals kept in ``unpatched/``. GGUF files are run by ``llamacpp_runner.py`` in a subprocess.

A stamp, written only after the runtime loads and the converter imports in a subprocess,
records versions, the recipe and the seconds each step took; without it nothing counts as
installed. The install is built in a temporary sibling folder that replaces the old one in a
single rename, under a file lock, so a crash leaves the previous install or none.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4_tune.engines import glibc_compat
from gemma4_tune.engines.vllm_env import (
    engines_root,
    install_lock,
    quiet_pip,
    read_stamp,
    run_streaming,
    stamp_path,
)
from gemma4_tune.findings import FindingError, Severity, finding, register

INSTALL_FAILED = register("G4T910", Severity.ERROR, "llama.cpp install failed")
NOT_INSTALLED = register("G4T911", Severity.ERROR, "llama.cpp not installed")

#: The sdist whose vendored llama.cpp tree provides the converters and gguf-py.
CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
#: Prebuilt llama.cpp runtime (cffi binding + shared libraries), llama.cpp build b11739.
RUNTIME_PACKAGE = "llama-cpp-py-sync"
RUNTIME_VERSION = "0.11739"
#: Only to let pip read the sdist's metadata (``pip download`` prepares it); removed afterwards.
METADATA_BACKEND = "scikit-build-core"
#: Bumped whenever the recipe changes, so that an older install counts as not installed.
RECIPE = 1

CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
CONVERTER_DIRS = ("conversion", "gguf-py")
INSTALL_FIX = ("check network access to PyPI and free disk space (~150 MB), then run "
               "`gemma4-tune engines install llama.cpp`")
NOT_INSTALLED_FIX = "run `gemma4-tune engines install llama.cpp` (about 30 s, ~110 MB, outside the project)"

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def llamacpp_dir() -> Path:
    """Where llama.cpp is installed: ``<engines root>/llama.cpp``."""
    return engines_root() / "llama.cpp"


@dataclass(frozen=True)
class LlamaCpp:
    """A complete, stamped llama.cpp install."""

    root: Path
    stamp: dict[str, Any]

    @property
    def converters(self) -> Path:
        """Folder holding ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/``, ``gguf-py/``."""
        return self.root / "converters"

    @property
    def site(self) -> Path:
        """``--target`` folder of the runtime binding (put it on ``PYTHONPATH``)."""
        return self.root / "site"

    @property
    def python(self) -> str:
        """The interpreter that runs converters and runner: this (training) environment's python."""
        return sys.executable

    def converter(self, name: str) -> list[str]:
        """Command line prefix that runs converter script ``name``."""
        return [self.python, str(self.converters / name)]

    def converter_environ(self) -> dict[str, str]:
        """Environment for a converter: the vendored gguf-py first on ``PYTHONPATH``, hub offline."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.converters / "gguf-py"), str(self.converters)])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.pop("NO_LOCAL_GGUF", None)  # the scripts then also put their own gguf-py first
        return env

    def runtime_environ(self) -> dict[str, str]:
        """Environment for ``llamacpp_runner.py``: only the runtime's folder on ``PYTHONPATH``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.site)
        for key in ("PYTHONHOME", "PYTHONSTARTUP", "LLAMA_CPP_LIB"):
            env.pop(key, None)
        env.setdefault("OMP_NUM_THREADS", "1")
        return env


def _pins() -> dict[str, str]:
    return {CONVERTER_PACKAGE: CONVERTER_VERSION, RUNTIME_PACKAGE: RUNTIME_VERSION}


def _complete(root: Path, stamp: dict[str, Any] | None) -> bool:
    if not stamp or stamp.get("recipe") != RECIPE or stamp.get("pins") != _pins():
        return False
    files = [root / "converters" / f for f in CONVERTER_FILES] + [root / "converters" / d for d in CONVERTER_DIRS]
    return all(p.exists() for p in files) and (root / "site" / "llama_cpp_py_sync").is_dir()


def llamacpp_install() -> LlamaCpp | None:
    """The installed llama.cpp, or None when it is missing, incomplete or from another recipe."""
    root = llamacpp_dir()
    stamp = read_stamp(root)
    return LlamaCpp(root, stamp) if stamp is not None and _complete(root, stamp) else None


def require_llamacpp() -> LlamaCpp:
    """The installed llama.cpp, or a G4T911 finding saying how to install it."""
    install = llamacpp_install()
    if install is None:
        raise FindingError(finding(NOT_INSTALLED.code, f"llama.cpp (converters and runtime) is not installed at "
                                   f"{llamacpp_dir()}", NOT_INSTALLED_FIX, env_dir=str(llamacpp_dir())))
    return install


def llamacpp_status() -> dict[str, Any]:
    """Where llama.cpp is, whether it is usable, what it holds and what the install cost."""
    root = llamacpp_dir()
    stamp = read_stamp(root)
    install = llamacpp_install()
    status: dict[str, Any] = {
        "engine": "llama.cpp",
        "env_dir": str(root),
        "installed": install is not None,
        "exists": root.exists(),
        "stamp": stamp,
        "stale": bool(stamp) and install is None,
        "glibc": glibc_compat.libc_version_text(),
        "glibc_patch_needed": glibc_compat.patch_needed(),
    }
    if install is not None:
        status.update(converters=str(install.converters), site=str(install.site),
                      llama_cpp_build=stamp.get("llama_cpp_build"), install_seconds=stamp.get("install_seconds"))
    return status


def _run(cmd: Sequence[str], *, env: dict[str, str], log: Log, tail: collections.deque[str], step: str) -> None:
    run_streaming(cmd, env=env, log=log, tail=tail, step=f"[llama.cpp] {step}")


def _pip_environ(extra_path: Path | None = None) -> dict[str, str]:
    env = quiet_pip(dict(os.environ))
    for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(key, None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return env


def _extract_converters(sdist: Path, out: Path) -> int:
    """Copy the converter scripts, ``conversion/`` and ``gguf-py/`` out of the sdist; return the file count."""
    count = 0
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                continue
            rel = "/".join(parts[3:])
            if rel not in CONVERTER_FILES and parts[3] not in CONVERTER_DIRS:
                continue
            if ".." in parts or rel.startswith("/"):
                continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            dest.write_bytes(src.read())
            count += 1
    missing = [n for n in (*CONVERTER_FILES, *CONVERTER_DIRS) if not (out / n).exists()]
    if missing:
        raise ValueError(f"{sdist.name} has no vendor/llama.cpp/{', '.join(missing)}")
    return count


_SMOKE = """\
import json
import llama_cpp_py_sync as m
from llama_cpp_py_sync._cffi_bindings import get_lib, get_mtmd_lib
lib = get_lib(); get_mtmd_lib(); lib.llama_backend_init()
print(json.dumps({"runtime": m.__version__, "llama_cpp_build": m.__llama_cpp_tag__,
                  "llama_cpp_commit": m.__llama_cpp_commit__}))
"""


def install_llamacpp(force: bool = False, *, log: Log | None = None) -> LlamaCpp:
    """Install (or reuse) llama.cpp's converters and runtime; return the install.

    Idempotent: a complete, stamped install is returned at once unless ``force``. Raises G4T910
    with pip's or the smoke test's last lines when a step fails (the previous install, if any,
    is left as it was).
    """
    log = log or _stderr
    root = llamacpp_dir()
    with install_lock(root.parent, "llamacpp"):
        stamp = read_stamp(root)
        if not force and _complete(root, stamp):
            assert stamp is not None
            log(f"[llama.cpp] already installed at {root} (llama.cpp {stamp.get('llama_cpp_build')})")
            return LlamaCpp(root, stamp)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp.tmp-", dir=root.parent))
        tmp.chmod(0o755)
        tail: collections.deque[str] = collections.deque(maxlen=25)
        seconds: dict[str, float] = {}
        pip = [sys.executable, "-m", "pip"]

        def timed(name: str, start: float) -> None:
            seconds[name] = round(time.monotonic() - start, 1)

        try:
            t = time.monotonic()
            _run([*pip, "install", "--quiet", "--target", str(tmp / "build-tools"), METADATA_BACKEND],
                 env=_pip_environ(), log=log, tail=tail, step=f"installing {METADATA_BACKEND} (to read the sdist)")
            timed("metadata_backend", t)
            t = time.monotonic()
            _run([*pip, "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
                  f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", "-d", str(tmp / "download")],
                 env=_pip_environ(tmp / "build-tools"), log=log, tail=tail,
                 step=f"downloading {CONVERTER_PACKAGE}=={CONVERTER_VERSION} (sdist, ~75 MB, for the converters)")
            timed("download", t)
            t = time.monotonic()
            sdist = next((tmp / "download").glob("*.tar.gz"))
            files = _extract_converters(sdist, tmp / "converters")
            timed("extract", t)
            log(f"[llama.cpp] extracted {files} converter files into converters/")
            shutil.rmtree(tmp / "download", ignore_errors=True)
            shutil.rmtree(tmp / "build-tools", ignore_errors=True)
            t = time.monotonic()
            _run([*pip, "install", "--quiet", "--target", str(tmp / "site"), f"{RUNTIME_PACKAGE}=={RUNTIME_VERSION}"],
                 env=_pip_environ(), log=log, tail=tail,
                 step=f"installing the runtime {RUNTIME_PACKAGE}=={RUNTIME_VERSION} (prebuilt libllama)")
            timed("runtime", t)
            t = time.monotonic()
            patched: list[str] = []
            if glibc_compat.patch_needed():
                libs = tmp / "site" / "llama_cpp_py_sync"
                for lib in sorted(libs.glob("*.so*")):
                    if glibc_compat.needs_glibc(lib):
                        (tmp / "unpatched").mkdir(exist_ok=True)
                        shutil.copy2(lib, tmp / "unpatched" / lib.name)
                patched = glibc_compat.patch_directory(libs)
                log(f"[llama.cpp] glibc {glibc_compat.libc_version_text()} < 2.38: rebound "
                    f"the __isoc23_* imports of {len(patched)} libraries ({', '.join(patched)})")
            timed("glibc_patch", t)
            t = time.monotonic()
            tail.clear()
            install = LlamaCpp(tmp, {})
            _run([sys.executable, "-c", _SMOKE], env=install.runtime_environ(), log=log, tail=tail,
                 step="checking that the runtime loads (libllama, libmtmd)")
            versions = json.loads(next(line for line in reversed(tail) if line.startswith('{"runtime"')))
            tail.clear()
            _run([*install.converter("convert_hf_to_gguf.py"), "--help"], env=install.converter_environ(),
                 log=lambda _line: None, tail=tail, step="checking that convert_hf_to_gguf.py imports")
            timed("smoke", t)
        except (subprocess.CalledProcessError, OSError, ValueError, StopIteration, tarfile.TarError,
                glibc_compat.ElfPatchError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            last = "\n".join(tail)
            raise FindingError(finding(INSTALL_FAILED.code, f"installing llama.cpp into {root} failed: {exc}\n{last}",
                                       INSTALL_FIX, pip_tail=list(tail), env_dir=str(root))) from exc
        elapsed = time.monotonic() - started
        gguf_py = (tmp / "converters" / "gguf-py" / "pyproject.toml").read_text()
        record = {
            "recipe": RECIPE,
            "pins": _pins(),
            "converters_from": f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION} sdist, vendor/llama.cpp",
            "gguf_py_version": next((line.split("=", 1)[1].strip().strip('"') for line in gguf_py.splitlines()
                                     if line.startswith("version")), None),
            "runtime_version": versions["runtime"],
            "llama_cpp_build": versions["llama_cpp_build"],
            "llama_cpp_commit": versions["llama_cpp_commit"],
            "glibc": glibc_compat.libc_version_text(),
            "glibc_patched": patched,
            "python": sys.executable,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": seconds,
            "install_seconds": round(elapsed, 1),
        }
        stamp_path(tmp).write_text(json.dumps(record, indent=2) + "\n")
        old = root.with_name(".llama.cpp.old")
        shutil.rmtree(old, ignore_errors=True)
        if root.exists():
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
        log(f"[llama.cpp] installed converters ({CONVERTER_PACKAGE} {CONVERTER_VERSION}) and runtime "
            f"(llama.cpp {versions['llama_cpp_build']}) in {elapsed:.0f} s at {root}")
        return LlamaCpp(root, record)


__all__ = ["CONVERTER_VERSION", "INSTALL_FAILED", "NOT_INSTALLED", "RUNTIME_VERSION", "LlamaCpp",
           "install_llamacpp", "llamacpp_dir", "llamacpp_install", "llamacpp_status", "require_llamacpp"]
