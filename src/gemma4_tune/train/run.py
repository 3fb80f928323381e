"""One training run, whatever its method: the method's unit (``train.methods``), found by name, runs it."""

from __future__ import annotations

from gemma4_tune.config.options import RunConfig
from gemma4_tune.preflight import PreflightResult
from gemma4_tune.train import methods
from gemma4_tune.train.base import TrainResult
from gemma4_tune.train.rundir import release_run_dir


def train(cfg: RunConfig) -> TrainResult:
    """Run one training job described by ``cfg``; return where everything went.

    Under a launcher (``--distributed``) every process runs this; rank 0 writes and reports. The run
    directory is locked from the first check to the end (G4T417 for a second run on it).
    """
    try:
        return methods.get(cfg.method).train(cfg)
    finally:
        release_run_dir(cfg.out)


def preflight(cfg: RunConfig) -> PreflightResult:
    """Preflight only: the method's data, model, adapter and its checks on one real batch; nothing is written."""
    return methods.get(cfg.method).preflight_only(cfg)
