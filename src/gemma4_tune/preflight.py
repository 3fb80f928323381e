"""Preflight: one real batch, forward and backward once, before any training step counts.

Each check is a small function registered with ``@check``; it reads a PreflightContext
and returns findings. The batch, the model and the LoRA plan are the ones training will
use; the model's initial state is restored afterwards (LoRA weights, gradients, train
mode), so a preflight changes nothing about the run that follows. Each check cites its
failure-catalog row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gemma4_tune.findings import Finding, Severity, finding, has_errors, register
from gemma4_tune.model.loss import IGNORE_INDEX
from gemma4_tune.model.profile import ModelProfile, tower_of
from gemma4_tune.plan.targets import EMBED_GROUPS, GROUP_MODALITY, TargetPlan

LOSS_NOT_FINITE = register("G4T501", Severity.ERROR, "Loss is not finite on a real batch", (19,))
TOWER_NO_GRADIENT = register("G4T502", Severity.ERROR, "A planned tower's LoRA gets no gradient", (21,))
TOWER_WITHOUT_DATA = register("G4T503", Severity.WARNING, "A planned tower has no matching data", (21,))
NO_SUPERVISED_IN_BATCH = register("G4T504", Severity.ERROR, "The batch has no supervised token", (12,))
MM_TYPE_IDS_DROPPED = register("G4T505", Severity.ERROR, "Images without mm_token_type_ids on a bidirectional model",
                               (10,))
FLASH_ATTENTION_HEAD_DIM = register("G4T506", Severity.ERROR, "FlashAttention cannot run head_dim 512 layers", (14,))
FP16_OVERFLOWS = register("G4T507", Severity.ERROR, "fp16 overflows Gemma 4", (19,))
KV_SHARING_BROKEN = register("G4T508", Severity.ERROR, "KV-shared layers differ with and without cache", (9,))
MOE_EXPERTS_UNTRAINED = register("G4T509", Severity.WARNING, "MoE experts carry no LoRA", (16,))
PREFLIGHT_SKIPPED = register("G4T510", Severity.WARNING, "Preflight was skipped")
MODEL_IMAGE_MASKS = register("G4T511", Severity.INFO, "The 12B trains with its own image masks, not its forward's",
                             (31,))

FLASH_ATTENTION_MAX_HEAD_DIM = 256


@dataclass
class PreflightContext:
    """Everything the checks may look at; filled by ``run_preflight``."""

    model: Any  # the PeftModel training will use
    profile: ModelProfile
    plan: TargetPlan
    batch: dict[str, torch.Tensor]
    dataset_modalities: dict[str, int]
    dataset_supervised: int
    loss: torch.Tensor | None = None
    lora_grad: dict[str, float] = field(default_factory=dict)


CheckFn = Callable[[PreflightContext], list[Finding]]
STATIC_CHECKS: list[CheckFn] = []
BATCH_CHECKS: list[CheckFn] = []


def check(*, static: bool) -> Callable[[CheckFn], CheckFn]:
    """Register a preflight check. Static checks run first, on the model alone; if one of them
    finds an error the batch is not run (it could crash or hang); batch checks see the loss and
    the gradients of one forward and backward pass."""

    def register_check(fn: CheckFn) -> CheckFn:
        (STATIC_CHECKS if static else BATCH_CHECKS).append(fn)
        return fn

    return register_check


@dataclass
class PreflightResult:
    """Findings plus the figures a person wants to see."""

    findings: list[Finding]
    loss: float
    supervised_in_batch: int
    tokens_in_batch: int
    lora_grad: dict[str, float]
    seconds: float
    sample: str = ""
    reference: dict[str, Any] = field(default_factory=dict)  # DPO/KTO: the reference checks (train.preference.dpo_preflight)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"findings": [f.to_dict() for f in self.findings], "loss": self.loss,
                "supervised_in_batch": self.supervised_in_batch, "tokens_in_batch": self.tokens_in_batch,
                "lora_grad": self.lora_grad, "seconds": self.seconds, "sample": self.sample,
                **({"reference": self.reference} if self.reference else {})}


def _forward_backward(ctx: PreflightContext) -> None:
    """One forward and backward pass with the training loss; gradients of lora_B summed per tower."""
    from gemma4_tune.model.loss import batch_sums

    model = ctx.model
    model.train()
    inputs = {k: v for k, v in ctx.batch.items() if k != "labels"}
    total, count, _ = batch_sums(model, inputs, ctx.batch["labels"])
    loss = total / count
    ctx.loss = loss.detach()
    if torch.isfinite(loss):
        loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None and "lora_B" in name:
            tower = tower_of(name)
            ctx.lora_grad[tower] = ctx.lora_grad.get(tower, 0.0) + float(param.grad.detach().abs().sum())


def run_preflight(model: Any, profile: ModelProfile, plan: TargetPlan, batch: dict[str, torch.Tensor], *,
                  dataset_modalities: dict[str, int], dataset_supervised: int, sample: str = "") -> PreflightResult:
    """Run every registered check on one real batch; restore the model's state afterwards."""
    started = time.perf_counter()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    ctx = PreflightContext(model, profile, plan, batch, dataset_modalities, dataset_supervised)
    findings: list[Finding] = []
    try:
        for fn in STATIC_CHECKS:
            findings += fn(ctx)
        if not has_errors(findings):
            _forward_backward(ctx)
            for fn in BATCH_CHECKS:
                findings += fn(ctx)
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in snapshot:
                    param.copy_(snapshot[name])
                param.grad = None
        model.train(was_training)
    labels = batch["labels"][:, 1:]
    return PreflightResult(findings, float(ctx.loss) if ctx.loss is not None else float("nan"),
                           int(labels.ne(-100).sum()), int(batch["attention_mask"].sum()), ctx.lora_grad,
                           round(time.perf_counter() - started, 2), sample)


@check(static=True)
def targets_carry_lora(ctx: PreflightContext) -> list[Finding]:
    """Rows 1, 3, 16: every planned target is a LoRA layer by type, nothing else is, wrappers intact."""
    from gemma4_tune.plan.adapters import check_lora_placement

    return check_lora_placement(ctx.model, ctx.plan)


@check(static=True)
def versions_are_not_known_bad(ctx: PreflightContext) -> list[Finding]:
    """Rows 9, 11, 20, 24: installed transformers/TRL against the catalog's known-bad versions."""
    from gemma4_tune.doctor import version_findings

    return version_findings()


@check(static=True)
def moe_experts_targeted(ctx: PreflightContext) -> list[Finding]:
    """Row 16: on an MoE model, a plan that trains the MLPs but not the experts is almost always a mistake."""
    if ctx.profile.moe is None or ctx.plan.target_parameters:
        return []
    return [finding(MOE_EXPERTS_UNTRAINED.code, f"this MoE model has {ctx.profile.moe['num_experts']} experts per "
                    "layer but the plan puts no LoRA on them: most of the MLP capacity stays untrained",
                    "use --targets text (it adds experts.gate_up_proj/down_proj through target_parameters)")]


def _supervised(ctx: PreflightContext) -> int:
    return int(ctx.batch["labels"][:, 1:].ne(-100).sum())


@check(static=False)
def loss_is_finite(ctx: PreflightContext) -> list[Finding]:
    """Row 19: NaN/inf on the first batch never trains into something useful.

    A batch with no supervised token has a 0/0 loss: G4T504 says so, not this check.
    """
    if (ctx.loss is not None and torch.isfinite(ctx.loss)) or not _supervised(ctx):
        return []
    return [finding(LOSS_NOT_FINITE.code, f"the loss on the first batch is {float(ctx.loss)}",
                    "train in bf16 on GPU or fp32 on CPU (never fp16); check the data for empty examples")]


@check(static=False)
def towers_get_gradients(ctx: PreflightContext) -> list[Finding]:
    """Row 21: a tower in the plan whose LoRA gets no gradient learns nothing; lora_B's gradient is the signal.

    Without a supervised token in the batch (G4T504) or a finite loss (G4T501) no tower gets one: not checked.
    """
    out = []
    trained = _supervised(ctx) and ctx.loss is not None and bool(torch.isfinite(ctx.loss))
    present = {"image": "pixel_values" in ctx.batch or "pixel_values_videos" in ctx.batch,
               "audio": "input_features" in ctx.batch}
    for tower in ctx.plan.groups:
        kind = GROUP_MODALITY.get(tower)
        part = f"{tower.removesuffix('-embed')} embedder" if tower in EMBED_GROUPS else f"{tower} tower"
        seen = ("image", "video") if kind == "image" else (kind,)  # video frames go through the vision tower
        if kind and not any(ctx.dataset_modalities.get(k) for k in seen):
            what = " or ".join(seen)
            out.append(finding(TOWER_WITHOUT_DATA.code, f"the plan trains the {part} but the data has no "
                               f"{what} — its LoRA would stay at zero", f"drop {tower} from --targets, or add "
                               f"{what} examples"))
            continue
        if trained and (kind is None or present[kind]) and not ctx.lora_grad.get(tower, 0.0) > 0:
            out.append(finding(TOWER_NO_GRADIENT.code, f"the {part}'s LoRA got no gradient from a batch "
                               f"with {kind or tower} inputs", "check that the part is not frozen or detached (no "
                               "torch.no_grad around it) and that its targets are the inner .linear modules"))
    return out


@check(static=False)
def batch_is_supervised(ctx: PreflightContext) -> list[Finding]:
    """Row 12: a batch (or dataset) with no labelled token trains nothing."""
    supervised = _supervised(ctx)
    if supervised and ctx.dataset_supervised:
        return []
    return [finding(NO_SUPERVISED_IN_BATCH.code, f"supervised tokens: {supervised} in the first batch, "
                    f"{ctx.dataset_supervised} in the dataset", "check that assistant turns have content and are "
                    "not cut away by --max-seq-len; --train-on all trains on every token")]


@check(static=True)
def images_keep_mm_token_type_ids(ctx: PreflightContext) -> list[Finding]:
    """Row 10: without mm_token_type_ids, image tokens silently get a causal mask on 26B/31B."""
    if ctx.profile.bidirectional_attention != "vision" or not {"pixel_values", "pixel_values_videos"} & set(ctx.batch):
        return []
    if "mm_token_type_ids" in ctx.batch:
        return []
    return [finding(MM_TYPE_IDS_DROPPED.code, "the batch has images but no mm_token_type_ids: this model attends "
                    "bidirectionally over image tokens only when it gets them", "keep every processor output "
                    "in your collator (gemma4-tune's batcher does); do not rebuild batches from input_ids")]


@check(static=True)
def image_masks_as_served(ctx: PreflightContext) -> list[Finding]:
    """Row 31: transformers 5.23's 12B forward masks image tokens unlike its own mask function; say which is used."""
    from gemma4_tune.model.patches import UNIFIED_MASK_AFFECTED, uses_model_image_masks

    if "pixel_values" not in ctx.batch or not uses_model_image_masks(ctx.model):
        return []
    low, high = UNIFIED_MASK_AFFECTED
    return [finding(MODEL_IMAGE_MASKS.code, f"transformers >={low},<{high} gives this model's plain forward other "
                    "image masks than its own create_masks_for_generate (global layers bidirectional over each "
                    "image, and past the sliding window); training uses the model's own, the masks llama.cpp and "
                    "Google's reference use", "nothing to do; a script that trains this model on a plain forward "
                    "learns under other masks (see docs/checks.md#g4t511)")]


@check(static=True)
def attention_fits_head_dim(ctx: PreflightContext) -> list[Finding]:
    """Row 14: FlashAttention-2 stops at head_dim 256; Gemma 4 global layers use 512."""
    config = ctx.model.get_base_model().config.get_text_config()
    impl = str(getattr(config, "_attn_implementation", "") or "")
    if "flash" not in impl or ctx.profile.max_head_dim <= FLASH_ATTENTION_MAX_HEAD_DIM:
        return []
    return [finding(FLASH_ATTENTION_HEAD_DIM.code, f"attention is {impl} but the global layers have head_dim "
                    f"{ctx.profile.max_head_dim} (FlashAttention supports at most {FLASH_ATTENTION_MAX_HEAD_DIM})",
                    "load the model with attn_implementation='sdpa' (gemma4-tune's default)")]


@check(static=True)
def dtype_is_safe(ctx: PreflightContext) -> list[Finding]:
    """Row 19: Gemma 4's MLP saturates fp16."""
    dtypes = {p.dtype for p in ctx.model.parameters() if p.is_floating_point()}
    if torch.float16 not in dtypes:
        return []
    return [finding(FP16_OVERFLOWS.code, "the model runs in fp16, where Gemma 4's MLP overflows into NaN",
                    "use bf16 on GPU (or fp32 on CPU)")]


@check(static=False)
def kv_sharing_intact(ctx: PreflightContext) -> list[Finding]:
    """Row 9: KV-shared layers must give the same logits whether or not a cache is used."""
    if not ctx.profile.num_kv_shared_layers:
        return []
    model = ctx.model
    inputs = {k: v for k, v in ctx.batch.items() if k != "labels"}
    # the logits at the supervised positions only (as training computes them): at Gemma 4's vocabulary the full
    # logits of the batch would be the largest tensors of the whole run
    keep = torch.zeros_like(ctx.batch["labels"], dtype=torch.bool)
    keep[:, :-1] = ctx.batch["labels"][:, 1:].ne(IGNORE_INDEX)
    if not keep.any():  # nothing supervised (G4T504 says so): compare every real position instead
        keep = ctx.batch["attention_mask"].bool() if "attention_mask" in ctx.batch else torch.ones_like(keep)
    model.eval()
    with torch.no_grad():
        cached = model(**inputs, use_cache=True, logits_to_keep=keep).logits.float()
        uncached = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
    model.train()
    diff = float((cached - uncached).abs().max())
    tolerance = 1e-4 if cached.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 5e-2
    if diff <= tolerance:
        return []
    return [finding(KV_SHARING_BROKEN.code, f"logits differ by {diff:.3g} between use_cache=True and False: the "
                    "KV-shared layers read the wrong keys/values without a cache", "upgrade transformers to "
                    ">= 5.5.2 (PR #45312); until then never train with use_cache=False")]


def skipped_finding() -> Finding:
    """What a run that skipped preflight reports."""
    return finding(PREFLIGHT_SKIPPED.code, "preflight was skipped (--no-preflight): no check proved that the "
                   "targets are wrapped, that gradients reach every tower or that the loss is masked",
                   "drop --no-preflight")


def masked_sample(tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor, limit: int = 1200) -> str:
    """One example as text with the supervised tokens in ⟦ ⟧ and runs of media tokens collapsed.

    What a person needs to see to trust the masking (row 12): exactly the answers are marked.
    """
    ids = input_ids.reshape(-1).tolist()
    supervised = labels.reshape(-1).ne(-100).tolist()
    pieces: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"⟦{text}⟧" if supervised[i - 1] else text)
            run.clear()

    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i] and not supervised[j]:
            j += 1
        if j - i > 2:
            flush()
            pieces.append(f"{tokenizer.convert_ids_to_tokens(ids[i])}×{j - i}")
            i = j
            continue
        if run and supervised[i] != supervised[i - 1]:
            flush()
        run.append(ids[i])
        i += 1
    flush()
    sample = "".join(pieces)
    return sample if len(sample) <= limit else sample[:limit] + " …"
