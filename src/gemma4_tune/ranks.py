"""Which process this is and what it holds: rank checks, collectives, and local or gathered parameters.

Every helper is also right in a single process (no launcher, no process group), so the code above it
never asks whether the run is distributed.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gemma4_tune.findings import FindingError, Severity, finding, register

EMPTY_ADAPTER = register("G4T411", Severity.ERROR, "The adapter would be saved with empty tensors", (23,))


def under_launcher() -> bool:
    """True inside a process started by torchrun (or another launcher that sets LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", -1)) != -1


def local_gpu() -> int:
    """This process's GPU index: LOCAL_RANK under a launcher, else 0."""
    return max(0, int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    """Rank 0 of the job (or a single process): the one that reports and writes."""
    return int(os.environ.get("RANK", 0)) == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if _initialized():
        torch.distributed.barrier()


def all_reduce(value: float, op: str = "sum") -> float:
    """``value`` summed (or maxed) over all processes (itself in a single process)."""
    if not _initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return float(t.item())


def local_data(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: its ZeRO-3 partition, its FSDP2 shard, or all of it."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if hasattr(param, "to_local"):
        return param.to_local()
    return param


def gather_trainable(model: Any) -> dict[str, torch.Tensor]:
    """Full copies of every trainable tensor on every process (collective under ZeRO-3 and FSDP2)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in named}


def check_not_empty(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse to write an adapter with a 0-element tensor (a ZeRO-3 partition saved ungathered, row 23)."""
    empty = [n for n, t in state.items() if t.numel() == 0 or hasattr(t, "full_tensor")]
    if empty:
        raise FindingError(finding(EMPTY_ADAPTER.code, f"{len(empty)} of {len(state)} LoRA tensors for {where} "
                                   f"are empty or shards (e.g. {empty[0]}): they are still partitioned across processes",
                                   "gather them before saving (gemma4-tune does this under --distributed); when "
                                   "saving yourself under ZeRO-3, use deepspeed.zero.GatheredParameters or "
                                   "Trainer.save_model"))
