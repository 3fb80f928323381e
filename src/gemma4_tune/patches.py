"""The one place gemma4-tune changes a library's internals. Each patch is version-gated, and a test
(tests/test_distributed.py) fails as soon as the upstream release no longer has the bug.

accelerate on a machine without an accelerator (failure-catalog row 27): under ``torchrun`` with
DeepSpeed, ``PartialState._prepare_backend`` returns no backend, so every process runs as
``DistributedType.NO`` with one process, N separate jobs that each see the whole data; and
``AcceleratorState`` promotes only accelerator types (``MULTI_GPU``...) to ``FSDP``, so an FSDP2 run
on CPU silently trains as plain DDP. On GPUs neither patch is applied.

The only other patch is to files, not to code in this process: llama.cpp's prebuilt libraries are
rebound to glibc < 2.38 at install time (``verify/glibc_compat.py``, beside the engine install it
serves; tested the same way).
"""

from __future__ import annotations

from typing import Any

from packaging.version import Version

#: accelerate releases known to have the row-27 behaviour (the range pyproject.toml pins).
ACCELERATE_AFFECTED = (Version("1.15.0"), Version("1.16.0"))


def accelerate_is_affected() -> bool:
    """True for the accelerate releases whose CPU launch behaviour the patch below corrects."""
    import accelerate

    low, high = ACCELERATE_AFFECTED
    return low <= Version(accelerate.__version__) < high


def patch_accelerate_for_cpu_launch() -> bool:
    """Make accelerate see a ``torchrun`` launch on CPU as one job of WORLD_SIZE processes over gloo, and
    honour the FSDP plugin there. Applied only without CUDA, under a launcher, on affected releases;
    returns whether it is in effect."""
    import torch

    from gemma4_tune.distributed import under_launcher

    if torch.cuda.is_available() or not under_launcher() or not accelerate_is_affected():
        return False
    from accelerate import state
    from accelerate.utils import DistributedType

    if getattr(state.PartialState._prepare_backend, "_gemma4_tune", False):
        return True
    prepare_backend = state.PartialState._prepare_backend
    accelerator_init = state.AcceleratorState.__init__

    def _prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False,
                         backend: str | None = None) -> tuple[str | None, Any]:
        chosen, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        if chosen is None:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    def _accelerator_init(self: Any, *args: Any, **kwargs: Any) -> None:
        accelerator_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    _prepare_backend._gemma4_tune = True  # type: ignore[attr-defined]
    state.PartialState._prepare_backend = _prepare_backend
    state.AcceleratorState.__init__ = _accelerator_init
    return True
