"""Training on several processes: DDP, FSDP2 or DeepSpeed ZeRO-2/3, launched with torchrun.

``gemma4-tune train --distributed S --nproc N`` plans the run for the model at hand (FSDP wraps
``Gemma4TextDecoderLayer``, and a tower's layer class only where that tower exists and trains,
row 25), writes the run file and the DeepSpeed or FSDP configuration into ``OUT/launch/`` and starts
``torchrun``. Every process then runs the ordinary SFT run in ``train/methods/sft.py`` with the strategy's
TrainingArguments. Rank 0 reports and writes; every rank takes part in the collectives: evaluation,
samples, and gathering the partitioned LoRA weights before the adapter is saved (row 23).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from gemma4_tune.findings import OUTPUT_EXISTS, FindingError, Severity, finding, register

STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")
SHARDED = ("fsdp2", "zero3")  # each process holds only a shard of every weight
LAUNCH_DIR = "launch"
RUN_FILE = "run.yaml"
PLAN_FILE = "plan.json"
DEEPSPEED_FILE = "deepspeed.json"
FSDP_FILE = "fsdp.json"
EXTENSIONS_VAR = "TORCH_EXTENSIONS_DIR"  # where DeepSpeed caches the ops it compiles on first start

LAUNCH_INVALID = register("G4T410", Severity.ERROR, "The distributed run cannot start")
NOT_ONE_JOB = register("G4T412", Severity.ERROR, "The processes did not form the requested distributed job", (27,))
WRAP_CLASS_MISSING = register("G4T413", Severity.ERROR, "An FSDP wrap class is not in the model", (25,))


@dataclass(frozen=True)
class DistributedPlan:
    """How a run is spread over processes, decided once by the launcher and read by every process."""

    strategy: str
    nproc: int
    wrap_classes: tuple[str, ...]
    find_unused_parameters: bool
    activation_checkpointing: bool
    cpu: bool
    global_batch: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        """Processes in the whole job."""
        return self.nproc * self.nnodes

    @property
    def sharded(self) -> bool:
        """True when no process holds a whole weight (FSDP2, ZeRO-3)."""
        return self.strategy in SHARDED

    def deepspeed_config(self) -> dict[str, Any] | None:
        """The DeepSpeed configuration for zero2/zero3; batch sizes and clipping come from the Trainer ("auto")."""
        if not self.strategy.startswith("zero"):
            return None
        zero: dict[str, Any] = {"stage": int(self.strategy[-1])}
        if self.strategy == "zero3":
            # Partition every tensor, the small LoRA matrices included, so that saving always gathers.
            zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}

    def fsdp_config(self) -> dict[str, Any] | None:
        """The FSDP2 settings, as accelerate's FSDP plugin takes them through TrainingArguments.fsdp_config."""
        if self.strategy != "fsdp2":
            return None
        return {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": list(self.wrap_classes), "reshard_after_forward": True,
                "activation_checkpointing": self.activation_checkpointing, "state_dict_type": "FULL_STATE_DICT"}

    def training_arguments(self, launch_dir: Path) -> dict[str, Any]:
        """Keyword arguments for TrainingArguments on top of the single-process ones."""
        if self.strategy == "ddp":
            return {"ddp_find_unused_parameters": self.find_unused_parameters, "use_cpu": self.cpu}
        if self.strategy == "fsdp2":
            # FSDP checkpoints each wrapped layer itself; the Trainer's own checkpointing would gather twice.
            return {"fsdp": "full_shard auto_wrap", "fsdp_config": str(launch_dir / FSDP_FILE), "use_cpu": False,
                    "activation_checkpointing": False}
        return {"deepspeed": str(launch_dir / DEEPSPEED_FILE), "use_cpu": False}

    def command(self, run_file: Path) -> list[str]:
        """The torchrun command line that starts this node's processes."""
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc}"]
        if self.nnodes == 1:
            cmd.append("--standalone")
        else:
            cmd += [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                    f"--master-port={self.master_port}"]
        return [*cmd, "-m", "gemma4_tune", "train", str(run_file)]

    def environment(self) -> dict[str, str]:
        """Variables the processes need, beyond the caller's (which win)."""
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.nproc)),
               EXTENSIONS_VAR: str(Path.home() / ".cache" / "gemma4-tune" / "torch_extensions")}
        if self.cpu and self.strategy.startswith("zero"):
            env["DS_ACCELERATOR"] = "cpu"
        return {k: v for k, v in env.items() if k not in os.environ}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "world_size": self.world_size}


def plan_distributed(cfg: Any) -> DistributedPlan:
    """Decide the distributed settings of a RunConfig for its model, refusing what cannot run."""
    from gemma4_tune.plan.overview import plan as target_plan

    strategy = cfg.distributed
    cpu = not torch.cuda.is_available()
    gpus = torch.cuda.device_count()
    nproc = cfg.nproc or (gpus or 1)
    problems = []
    if strategy.startswith("zero") and not _importable("deepspeed"):
        problems.append(finding(LAUNCH_INVALID.code, f"--distributed {strategy} needs DeepSpeed, which is not installed",
                                "pip install hjson msgpack py-cpuinfo einops && pip install --no-build-isolation "
                                "'deepspeed==0.19.8' (see docs/distributed.md), or use --distributed fsdp2"))
    if not cpu and nproc > gpus:
        problems.append(finding(LAUNCH_INVALID.code, f"--nproc {nproc} but this node has {gpus} GPUs",
                                f"use --nproc {gpus} or less (one process per GPU)"))
    if cfg.quantize and strategy in SHARDED:
        problems.append(finding(LAUNCH_INVALID.code, f"--quantize 4bit cannot be combined with {strategy} here",
                                "use --distributed ddp or zero2 for QLoRA, or drop --quantize"))
    if problems:
        raise FindingError(*problems)
    profile, targets, _ = target_plan(cfg.model, cfg.targets, rank=cfg.rank)
    trained = set(targets.groups)
    towers = [t for t in profile.towers if t.name in trained]
    embedders = [e for e in profile.embedders if e.group in trained]
    return DistributedPlan(
        strategy=strategy, nproc=nproc, nnodes=cfg.nnodes, node_rank=cfg.node_rank, master_addr=cfg.master_addr,
        master_port=cfg.master_port,
        wrap_classes=(profile.family.layer_classes["text"], *(t.layer_class for t in towers)),
        # tower or embedder LoRA gets no gradient from a batch without that modality; DDP must be told
        find_unused_parameters=bool(towers or embedders), activation_checkpointing=cfg.gradient_checkpointing,
        cpu=cpu,
        global_batch=cfg.batch_size * cfg.grad_accum * nproc * cfg.nnodes)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def write_launch_files(cfg: Any, dplan: DistributedPlan) -> Path:
    """Write OUT/launch/{run.yaml, plan.json, deepspeed.json or fsdp.json}; return the run file."""
    folder = Path(cfg.out) / LAUNCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    run_file = folder / RUN_FILE
    run_file.write_text(yaml.safe_dump({k: v for k, v in cfg.dump().items() if v is not None}, sort_keys=False))
    (folder / PLAN_FILE).write_text(json.dumps(dplan.to_dict(), indent=2) + "\n")
    for name, content in ((DEEPSPEED_FILE, dplan.deepspeed_config()), (FSDP_FILE, dplan.fsdp_config())):
        if content is not None:
            (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return run_file


def read_plan(out: str | Path) -> DistributedPlan:
    """The plan the launcher wrote for this run."""
    path = Path(out) / LAUNCH_DIR / PLAN_FILE
    if not path.is_file():
        raise FindingError(finding(LAUNCH_INVALID.code, f"{path} is missing: this process was started by a "
                                   "launcher, but not by `gemma4-tune train --distributed`",
                                   "start distributed runs with `gemma4-tune train --distributed S --nproc N` "
                                   "(or run the command its --dry-run prints)"))
    data = json.loads(path.read_text())
    data.pop("world_size", None)
    data["wrap_classes"] = tuple(data["wrap_classes"])
    return DistributedPlan(**data)


def launch(cfg: Any, *, dry_run: bool = False, log: Any = print) -> int:
    """Plan, write the launch files and start torchrun (or, with ``dry_run``, print what would run).

    Returns torchrun's exit status (0 for a dry run). Node 0's launcher holds the run directory's lock
    for the whole job (G4T417 for a second run on it); its processes know it by ``LOCK_ENV``.
    """
    from gemma4_tune.train.rundir import LOCK_ENV, check_not_in_use, lock_run_dir, release_run_dir

    out = Path(cfg.out)
    holds_lock = cfg.node_rank == 0 and not dry_run
    if holds_lock:
        check_not_in_use(out)
    leftovers = [p.name for p in out.iterdir() if p.name != LAUNCH_DIR] if out.is_dir() else []
    if leftovers and not cfg.resume and cfg.node_rank == 0:
        raise FindingError(finding(OUTPUT_EXISTS.code, f"{out} already exists and is not empty ({leftovers[0]}...)",
                                   "choose a new --out directory, or remove the old one"))
    dplan = plan_distributed(cfg)
    if not holds_lock:
        return _start(cfg, dplan, dry_run=dry_run, log=log)
    lock_run_dir(out)
    try:
        return _start(cfg, dplan, dry_run=dry_run, log=log, extra_env={LOCK_ENV: str(os.getpid())})
    finally:
        release_run_dir(out)


def _start(cfg: Any, dplan: DistributedPlan, *, dry_run: bool, log: Any,
           extra_env: dict[str, str] | None = None) -> int:
    """Write the launch files, print the plan and run torchrun (unless ``dry_run``)."""
    run_file = write_launch_files(cfg, dplan)
    cmd = dplan.command(run_file.resolve())
    env = dplan.environment()
    log(f"distributed: {dplan.strategy} on {dplan.world_size} processes ({dplan.nnodes} node(s) x {dplan.nproc}, "
        f"{'CPU, gloo' if dplan.cpu else 'GPU'}), global batch {dplan.global_batch} = batch {cfg.batch_size} x "
        f"grad-accum {cfg.grad_accum} x {dplan.world_size} processes")
    if dplan.strategy == "fsdp2":
        log(f"FSDP2 wraps: {', '.join(dplan.wrap_classes)}")
    if dplan.strategy == "ddp":
        log(f"DDP find_unused_parameters: {dplan.find_unused_parameters}")
    log(f"launch files: {run_file.parent}")
    log("command: " + " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + " ".join(cmd))
    if dry_run:
        return 0
    return subprocess.run(cmd, env={**os.environ, **env, **(extra_env or {})}, check=False).returncode


# -- inside the processes -----------------------------------------------------------------------------


def check_job(trainer: Any, dplan: DistributedPlan) -> dict[str, Any]:
    """Refuse a run whose processes did not form the job the plan asked for (row 27); return what they formed."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    expected = {"ddp": (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU), "fsdp2": (DistributedType.FSDP,),
                "zero2": (DistributedType.DEEPSPEED,), "zero3": (DistributedType.DEEPSPEED,)}[dplan.strategy]
    world = int(os.environ.get("WORLD_SIZE", 1))
    formed = {"strategy": dplan.strategy, "world_size": state.num_processes, "expected_world_size": world,
              "distributed_type": str(state.distributed_type).split(".")[-1]}
    if state.num_processes != world or state.distributed_type not in expected:
        raise FindingError(finding(NOT_ONE_JOB.code, f"{dplan.strategy}: accelerate sees {state.num_processes} "
                                   f"process(es) of type {formed['distributed_type']}, but {world} were started: "
                                   "each would train alone on all the data", "report the versions in `gemma4-tune "
                                   "doctor`; on CPU-only machines gemma4-tune patches accelerate 1.15 for this "
                                   "(gemma4_tune.model.patches), so a newer accelerate may need a new gemma4-tune"))
    return formed


def check_wrap_classes(model: Any, dplan: DistributedPlan) -> None:
    """Every class FSDP is told to wrap must exist in the model, or accelerate stops at prepare (row 25)."""
    if dplan.strategy != "fsdp2":
        return
    present = {type(m).__name__ for m in model.modules()}
    missing = [c for c in dplan.wrap_classes if c not in present]
    if missing:
        raise FindingError(finding(WRAP_CLASS_MISSING.code, f"FSDP would wrap {', '.join(missing)}, which this model "
                                   "does not have (`Could not find the transformer layer class`)",
                                   "rerun `gemma4-tune train --distributed fsdp2` so the plan is made for this model "
                                   "(the wrap classes are read from OUT/launch/plan.json)"))
