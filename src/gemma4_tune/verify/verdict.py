"""The verdict of an engine comparison, shared by every engine: a row's figures and findings, and the rules
every row is judged by (the adapter must change the output, NaN never passes, a row that compared nothing fails,
a QLoRA artefact is judged against the 4-bit model).

The engine comparisons (``verify.parity`` for stock PEFT/transformers, ``verify.vllm``,
``verify.vllm_modalities``, ``verify.llamacpp``) import this module and the reference, never each other's
internals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from gemma4_tune.findings import Finding, Severity, finding, register

if TYPE_CHECKING:
    from gemma4_tune.model.quantization import QuantSpec

NO_EFFECT_IN_ENGINE = register("G4T611", Severity.ERROR, "The adapter changes nothing in an engine", (4,))
NOTHING_COMPARED = register("G4T616", Severity.ERROR, "An engine compared nothing")
BARELY_MOVES = register("G4T617", Severity.WARNING, "The adapter barely moves the model", (4,))
NON_FINITE_OUTPUT = register("G4T618", Severity.ERROR, "An output holds NaN or infinite values")
NOT_THE_4BIT_MODEL = register("G4T619", Severity.ERROR, "An artefact is not the 4-bit model that was trained", (38,))
MODALITY_NOT_RUN = register("G4T920", Severity.WARNING, "An engine cannot run a modality of this model", (31,))
IMAGE_ATTENTION_DIFFERS = register("G4T921", Severity.ERROR, "An engine attends image tokens differently from "
                                   "transformers", (31,))

#: An adapter effect above the parity tolerance but below this many tolerances, or below this share of the
#: reference's logit scale, is reported as barely moving the model (a warning: too little training, a tiny lr).
BARELY_TOLERANCES = 10
BARELY_SCALE = 1e-3


@dataclass
class EngineResult:
    """One engine's comparison with the reference."""

    engine: str
    max_logit_diff: float
    greedy_agreement: float
    adapter_effect: float
    tolerance: float
    findings: list[Finding] = field(default_factory=list)
    criterion: str = ""  # the pass rule in words where it is not a max |logit diff| (GGUF types: KL)
    prompts: int = 0  # what was compared: prompts, token positions, and the modalities they held
    positions: int = 0
    modalities: list[str] = field(default_factory=list)
    not_run: str = ""  # why the engine could not run this row's prompts (its finding says so); not a pass
    figures: dict[str, Any] = field(default_factory=dict, repr=False)  # the engine's own figures for this row

    @property
    def verdict(self) -> str:
        """``pass``, ``FAIL`` or ``not run``, for tables."""
        return "FAIL" if not self.ok else ("not run" if self.not_run else "pass")

    @property
    def compared(self) -> str:
        """``4 prompts, 75 positions (text, image)``: what the verdict rests on."""
        kinds = f" ({', '.join(self.modalities)})" if self.modalities else ""
        return f"{self.prompts} prompts, {self.positions} positions{kinds}"

    @property
    def rule(self) -> str:
        """What the comparison had to meet, for tables."""
        return self.criterion or f"{self.tolerance:.0e}"

    @property
    def ok(self) -> bool:
        """No error findings."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        figures = data.pop("figures")
        data["reference_effect"] = figures.get("reference_effect")  # the adapter's effect in transformers + PEFT
        data["findings"] = [f.to_dict() for f in self.findings]
        data["ok"] = self.ok
        data["rule"] = self.rule
        data["compared"] = self.compared
        data["verdict"] = self.verdict
        return data


def summarize(rows: list[EngineResult]) -> dict[str, Any]:
    """One engine's modality rows as one verdict: the worst difference, the smallest effect, what was compared."""
    kinds = [m for r in rows for m in r.modalities]
    return {"ok": all(r.ok for r in rows), "max_logit_diff": worst(r.max_logit_diff for r in rows),
            "adapter_effect": min((r.adapter_effect for r in rows), default=0.0),
            "compared": f"{sum(r.prompts for r in rows)} prompts, {sum(r.positions for r in rows)} positions "
                        f"({', '.join(kinds)})", "rows": [r.to_dict() for r in rows]}


def report_findings(rows: list[EngineResult]) -> list[Finding]:
    """The rows' findings with one problem said once: a code an engine raises on several modality rows becomes
    one finding that names them (each row keeps its own, for its verdict)."""
    from dataclasses import replace

    groups: dict[tuple[str, str], list[tuple[EngineResult, Finding]]] = {}
    for row in rows:
        for f in row.findings:
            groups.setdefault((row.engine, f.code), []).append((row, f))
    out = []
    for items in groups.values():
        first_row, first = items[0]
        if len(items) == 1:
            out.append(first)
            continue
        kinds = [m for row, _ in items for m in row.modalities]
        out.append(replace(first, message=f"{first.message} [{first_row.engine}: the same on {len(items)} rows, "
                                          f"{', '.join(kinds)}; each row's figures in verify.md]",
                           details={**first.details, "modalities": kinds, "rows": len(items)}))
    return out


def effect_findings(engine: str, effect: float, tolerance: float, scale: float = 0.0) -> list[Finding]:
    """Whether the adapter changes ``engine``'s output: an error when the change is within the parity tolerance
    (it cannot be told from noise: the adapter does nothing), a warning when it is within a small factor of it or
    a tiny share of the logit ``scale``. The one rule every engine's verdict uses (row 4)."""
    if not (effect > tolerance):  # within the tolerance, or NaN: nothing shown to change
        return [finding(NO_EFFECT_IN_ENGINE.code, f"{engine}: with the adapter the output moves by at most "
                        f"{effect:.3g}, within the parity tolerance {tolerance:.0e}: the adapter changes nothing",
                        "check that lora_B is not all zeros (was the adapter saved after training?)",
                        adapter_effect=effect, tolerance=tolerance)]
    floor = max(BARELY_TOLERANCES * tolerance, BARELY_SCALE * scale)
    if effect < floor:
        return [finding(BARELY_MOVES.code, f"{engine}: the adapter moves the output by only {effect:.3g} (under "
                        f"{floor:.2g}: {BARELY_TOLERANCES} x the parity tolerance {tolerance:.0e}"
                        + (f", or {BARELY_SCALE:g} of the logit scale {scale:.3g}" if scale else "") + ")",
                        "check that training ran long enough to change the model (metrics.jsonl, the report's "
                        "samples); a very small learning rate or few steps leave the adapter near zero",
                        adapter_effect=effect, floor=floor)]
    return []


def worst(values: Any, start: float = 0.0) -> float:
    """The largest of ``values`` (and ``start``), NaN if any is NaN: Python's ``max`` keeps the first of two
    values whenever the comparison is false, so a NaN that is not first would vanish from a running maximum."""
    out = start
    for value in values:
        value = float(value)
        if math.isnan(value) or math.isnan(out):
            return math.nan
        out = max(out, value)
    return out


def non_finite_finding(what: str, count: int, total: int, fix: str, unit: str = "output values") -> Finding:
    """G4T618: ``count`` of ``total`` ``unit`` of ``what`` are NaN or infinite. Such a comparison proves
    nothing either way (NaN compares false with every bound), so it fails on its own finding."""
    return finding(NON_FINITE_OUTPUT.code, f"{what}: NaN or infinite in {count} of {total} {unit}, so nothing "
                   "can be compared", fix, non_finite=count, values=total)


def require_comparisons(results: list[EngineResult]) -> None:
    """Each engine row must rest on something: zero prompts or positions is an error (G4T616), never a pass."""
    for result in results:
        if (result.prompts <= 0 or result.positions <= 0) and result.ok and not result.not_run:  # a failed or
            # not-run row already says why
            result.findings.append(finding(NOTHING_COMPARED.code, f"{result.engine}: compared "
                                           f"{result.compared}, so it verified nothing",
                                           "run verify again; if it persists, report it with verify.json"))


#: The findings of an engine row whose output is not the reference's: on a QLoRA adapter, G4T619 says why.
PARITY_CODES = ("G4T610", "G4T903", "G4T915")


def four_bit_finding(engine: str, quant: QuantSpec, figures: str, cause: str) -> Finding:
    """G4T619: ``engine``'s artefact is not the model that was trained, whose base was 4-bit (row 38)."""
    return finding(NOT_THE_4BIT_MODEL.code, f"{engine}: the adapter was trained on the base in {quant.describe()}, "
                   f"and this artefact is not that model ({figures}); {cause}",
                   "merge with `gemma4-tune export --merged DIR` (it merges into the dequantized 4-bit weights, "
                   "the model you trained, unless --merge-into original) and serve that checkpoint; or serve the "
                   "adapter on the base loaded in 4 bits with the manifest's settings (BitsAndBytesConfig "
                   f"{quant.bnb_kwargs()})", **quant.bnb_kwargs())


def explain_four_bit(rows: list[EngineResult], quant: QuantSpec | None) -> None:
    """On a QLoRA adapter, a row that failed because its output is not the reference's fails on G4T619 instead:
    the reference is the 4-bit model, and the finding says how the artefact left it (the row keeps its figures)."""
    if quant is None:
        return
    for row in rows:
        codes = {f.code for f in row.findings}
        if NOT_THE_4BIT_MODEL.code in codes or not codes & set(PARITY_CODES):
            continue
        if row.engine.startswith("vllm adapter"):
            cause = "vLLM serves the adapter on the full-precision base"
        elif row.engine.startswith("llama.cpp") and " + adapter" in row.engine:
            cause = "llama.cpp applies the adapter GGUF to the full-precision base GGUF"
        else:
            cause = "it was made from, or is served on, weights other than the 4-bit ones"
        row.findings = [f for f in row.findings if f.code not in PARITY_CODES]
        row.findings.append(four_bit_finding(row.engine, quant, f"max diff {row.max_logit_diff:.3g}, greedy "
                                             f"agreement {row.greedy_agreement:.1%}", cause))
