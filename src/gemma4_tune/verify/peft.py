"""PEFT: does the saved adapter reproduce the trained model, and does it change anything?

The saved adapter's logits on a fixed batch must equal the in-memory trained model's, and
must differ from the base model's: an adapter that changes nothing is a failure too
(failure-catalog row 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gemma4_tune.findings import Finding, Severity, finding, register
from gemma4_tune.verify.verdict import non_finite_finding, worst

RELOAD_MISMATCH = register("G4T601", Severity.ERROR, "Saved adapter does not reproduce the trained model", (2, 4))
ADAPTER_NO_EFFECT = register("G4T602", Severity.ERROR, "Adapter does not change the model's output", (4,))

FP32_LOGIT_TOLERANCE = 1e-5


@dataclass
class ReloadParity:
    """Figures of one stock reload comparison."""

    max_logit_diff: float
    greedy_agreement: float
    adapter_effect: float
    tolerance: float
    non_finite: int = 0  # NaN or infinite logits of the reloaded adapter, of ``values``
    values: int = 0

    @property
    def ok(self) -> bool:
        """Finite, within tolerance, and the adapter does something."""
        return not self.findings()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "ok": self.ok}

    def findings(self) -> list[Finding]:
        """Errors when the reload gives NaN/inf, differs, or the adapter has no effect."""
        if self.non_finite:
            return [non_finite_finding("the saved adapter, reloaded by stock PEFT", self.non_finite, self.values,
                                       "the adapter holds NaN or infinite weights: the run diverged; train again "
                                       "with a lower --lr (and read the run's G4T403 findings)")]
        out = []
        if not self.max_logit_diff <= self.tolerance:
            out.append(finding(RELOAD_MISMATCH.code, f"stock PEFT reload differs from the trained model by "
                               f"{self.max_logit_diff:.2e} in the logits (tolerance {self.tolerance:.0e})",
                               "check that the adapter directory belongs to this base model and was saved "
                               "after training (adapter_model.safetensors)"))
        if not self.adapter_effect > self.tolerance:
            out.append(finding(ADAPTER_NO_EFFECT.code, f"with the adapter the logits move by at most "
                               f"{self.adapter_effect:.2e}: it changes nothing",
                               "check that training ran (metrics.jsonl) and that lora_B is not all zeros"))
        return out


def saved_adapter_parity(adapter_dir: str | Path, trained: Any, batch: dict[str, torch.Tensor]) -> ReloadParity:
    """Compare ``trained`` (a PeftModel in memory) with the saved adapter loaded by PEFT's own loader.

    The saved files are loaded as a second adapter on the same base weights
    (``PeftModel.load_adapter``, the loader ``PeftModel.from_pretrained`` uses), so the check
    costs no second copy of the base model; the base output comes from ``disable_adapter``. The
    logits are computed a chunk of positions at a time (``logits_to_keep``, ``loss.CHUNK_BYTES``).
    """
    from gemma4_tune.model.loss import CHUNK_BYTES, unwrapped

    device = next(trained.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(inputs["input_ids"],
                                                                                            dtype=torch.bool)
    where = mask.nonzero()
    per = max(1, CHUNK_BYTES // (4 * unwrapped(trained).config.get_text_config().vocab_size))
    was_training = trained.training
    trained.eval()
    active = trained.active_adapter
    diff = effect = 0.0
    agreeing = bad = values = 0
    with torch.no_grad():
        trained.load_adapter(str(adapter_dir), adapter_name="reloaded")
        try:
            for i in range(0, where.shape[0], per):  # a chunk of positions at a time: at Gemma 4's vocabulary the
                keep = torch.zeros_like(mask)       # probe batch's full logits would outgrow the training step
                keep[where[i:i + per, 0], where[i:i + per, 1]] = True
                trained.set_adapter(active)
                ours = trained(**inputs, logits_to_keep=keep).logits.float()
                with trained.disable_adapter():
                    plain = trained(**inputs, logits_to_keep=keep).logits.float()
                trained.set_adapter("reloaded")
                theirs = trained(**inputs, logits_to_keep=keep).logits.float()
                diff = worst(((ours - theirs).abs().max().item(),), diff)
                effect = worst(((theirs - plain).abs().max().item(),), effect)
                agreeing += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
                bad += int((~torch.isfinite(theirs)).sum())
                values += theirs.numel()
        finally:
            trained.set_adapter(active)
            trained.delete_adapter("reloaded")
    trained.train(was_training)
    dtype = next(p for p in trained.parameters() if p.is_floating_point()).dtype
    tolerance = FP32_LOGIT_TOLERANCE if dtype == torch.float32 else 5e-2
    return ReloadParity(max_logit_diff=diff, greedy_agreement=agreeing / max(where.shape[0], 1), adapter_effect=effect,
                        tolerance=tolerance, non_finite=bad, values=values)


@dataclass
class TensorParity:
    """The saved adapter file against the trained LoRA weights, tensor by tensor (runs sharded across processes,
    where no process can run the whole model alone to compare logits)."""

    tensors: int
    max_tensor_diff: float
    missing: list[str]
    max_abs_lora_b: float

    non_finite: int = 0  # NaN or infinite values in the saved tensors

    @property
    def ok(self) -> bool:
        """Every trained tensor saved and finite, bit-for-bit within fp32 rounding, and lora_B not all zero."""
        return not self.findings()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "ok": self.ok}

    def findings(self) -> list[Finding]:
        """Errors when a tensor is missing, not finite or differs, or lora_B is all zeros."""
        if self.non_finite:
            return [non_finite_finding("the saved adapter's tensors", self.non_finite, self.tensors,
                                       "the run diverged: train again with a lower --lr (and read the run's G4T403 "
                                       "findings)", unit="tensors")]
        out = []
        if self.missing or not self.max_tensor_diff <= FP32_LOGIT_TOLERANCE:
            what = f"{len(self.missing)} trained tensors are missing (e.g. {self.missing[0]})" if self.missing else \
                f"saved tensors differ from the trained ones by {self.max_tensor_diff:.2e}"
            out.append(finding(RELOAD_MISMATCH.code, f"the saved adapter does not hold the trained weights: {what}",
                               "check that the adapter was saved after training from the gathered weights"))
        if not self.max_abs_lora_b > 0:
            out.append(finding(ADAPTER_NO_EFFECT.code, "every lora_B weight is zero: the adapter changes nothing",
                               "check that training ran (metrics.jsonl) and that the optimizer got the LoRA weights"))
        return out


def saved_tensor_parity(adapter_dir: str | Path, model: Any, trained: dict[str, torch.Tensor] | None) -> TensorParity:
    """Compare the saved ``adapter_model.safetensors`` with ``trained`` (full LoRA tensors gathered from all
    processes; None: the model's own), keyed as the adapter file keys them (``adapters.adapter_weights``)."""
    from safetensors.torch import load_file

    from gemma4_tune.plan.adapters import adapter_weights

    expected = adapter_weights(model, trained)
    saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    missing = sorted(k for k in expected if k not in saved or saved[k].shape != expected[k].shape)
    common = [k for k in expected if k not in missing]
    diff = worst(float((saved[k].float() - expected[k].float().cpu()).abs().max()) for k in common if saved[k].numel())
    lora_b = worst(float(saved[k].abs().max()) for k in common if "lora_B" in k and saved[k].numel())
    bad = sum(int((~torch.isfinite(t.float())).any()) for t in saved.values())
    return TensorParity(tensors=len(saved), max_tensor_diff=diff, missing=missing, max_abs_lora_b=lora_b,
                        non_finite=bad)
