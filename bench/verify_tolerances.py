"""What each verify comparison measures when the artefact is right, so that every tolerance is set from it.

For each tiny Gemma 4 variant (random weights, the real structure), a rank-8 random LoRA on the text and
every tower (and a zeroed copy of it, which must fail), its streaming-merged fp32 checkpoint, and then every
engine that ``verify`` runs on every modality's prompts: stock PEFT and transformers (max |logit diff|), a
real vLLM (max |logprob diff|, fp32: the adapter's text part, and the merged checkpoint on text, images and
audio), and llama.cpp on the f32, f16, bf16 and q8_0 GGUF conversions of a text LoRA's merge (max |logit
diff|, mean KL, top-1 in top-5).
The tolerances in ``verify/parity.py``, ``verify/vllm.py`` and ``verify/llamacpp.py`` are checked against
these figures by ``tests/test_tolerances.py``; docs/verify.md is written from them.

Writes bench/results/verify_tolerances.json (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def measure(variant: str, root: Path) -> dict[str, Any]:
    """Every engine's figures for one variant's random LoRA."""
    from lora_helpers import random_lora, zeroed_lora_b

    from gemma4_tune.api import export, tiny_model
    from gemma4_tune.export.gguf import export_gguf
    from gemma4_tune.verify.llamacpp import default_prompts, engine_results, verify_gguf
    from gemma4_tune.verify.parity import verify_artefacts, vllm_results
    from gemma4_tune.verify.prompts import model_modalities
    from gemma4_tune.verify.reference import token_logits
    from gemma4_tune.verify.verdict import worst

    base = tiny_model(variant, root / "base", seed=0)
    adapter = random_lora(base, root / "adapter", seed=3)
    merged = root / "merged"
    export(base, adapter, merged=merged)
    # the towers too, for every modality's rows (llama.cpp's adapter GGUF takes text LoRA only: it keeps `adapter`)
    towers = {"image": "vision", "audio": "audio"}
    spec = ",".join(["text", *(towers[m] for m in model_modalities(base) if m in towers)])
    tower_adapter = random_lora(base, root / "tower-adapter", seed=3, spec=spec)
    tower_merged = root / "tower-merged"
    export(base, tower_adapter, merged=tower_merged)
    zeroed = zeroed_lora_b(tower_adapter, root / "zeroed")
    out: dict[str, Any] = {"tower_lora": spec}
    for name, result in (("stock", verify_artefacts(base, tower_adapter, tower_merged, ["peft", "transformers"])),
                         ("stock_zeroed", verify_artefacts(base, zeroed, None, ["peft"]))):
        out[name] = {}
        for engine in dict.fromkeys(r.engine for r in result):  # the worst row of each engine, and every row
            rows = [r for r in result if r.engine == engine]
            out[name][engine] = {"max_logit_diff": worst(r.max_logit_diff for r in rows),
                                 "adapter_effect": min(r.adapter_effect for r in rows),
                                 "positions": sum(r.positions for r in rows),
                                 "modalities": {r.modalities[0]: {"max_logit_diff": r.max_logit_diff,
                                                                  "adapter_effect": r.adapter_effect,
                                                                  "positions": r.positions} for r in rows}}
    adapter_row, *merged_rows = vllm_results(base, tower_adapter, tower_merged)
    if adapter_row.ok:
        out["vllm"] = {"max_logprob_diff": adapter_row.max_logit_diff, "greedy_agreement": adapter_row.greedy_agreement,
                       "adapter_effect": adapter_row.adapter_effect, "positions": adapter_row.positions}
    else:  # vLLM's CPU build cannot run LoRA on the MoE model (catalog rows 5, 6)
        out["vllm"] = {"not_measured": adapter_row.findings[0].message.splitlines()[0][:300]}
    out["vllm_merged"] = {r.modalities[0] if r.modalities else "all": {
        "max_logprob_diff": r.max_logit_diff, "greedy_agreement": r.greedy_agreement,
        "adapter_effect": r.adapter_effect, "positions": r.positions, "ok": r.ok, "not_run": r.not_run[:300],
        "findings": [f.code for f in r.findings]} for r in merged_rows}
    prompts = default_prompts(base)
    reference = token_logits(base, adapter, prompts)
    keys = ("max_logit_diff", "mean_kl", "top1_in_top5", "greedy_agreement", "adapter_effect")
    for gguf_type in GGUF_TYPES:
        folder = root / f"gguf-{gguf_type}"
        export_gguf(merged, folder, gguf_type, adapter_dir=adapter, base_dir=base, repoint=False)
        report = verify_gguf(folder, reference["tuned"], prompts, gguf_type, adapter_reference=reference,
                             base_dir=base, adapter_dir=adapter, base_reference=reference["base"],
                             log=lambda _line: None)
        row = {"merged": {k: report["model"].get(k) for k in keys}, "findings": [f.code for f in report["findings"]]}
        if "adapter" in report:
            row["adapter"] = {**{k: report["adapter"]["adapter"].get(k) for k in keys[:4]},
                              "adapter_effect": report["adapter"]["adapter_effect"]}
        out[f"llama.cpp {gguf_type}"] = row
    # every modality in llama.cpp: the tower merge's f32 GGUF + mmproj, as `verify --engine llama.cpp` runs it
    folder = root / "gguf-f32-towers"
    export_gguf(tower_merged, folder, "f32", adapter_dir=tower_adapter, base_dir=base, repoint=False)
    out["llama.cpp f32 media"] = {
        r.modalities[0]: {"max_logit_diff": r.max_logit_diff, "mean_kl": r.figures.get("mean_kl"),
                          "top1_in_top5": r.figures.get("top1_in_top5"), "adapter_effect": r.adapter_effect,
                          "ok": r.ok, "not_run": r.not_run[:300], "findings": sorted({f.code for f in r.findings})}
        for r in engine_results(base, tower_adapter, folder, log=lambda _line: None) if r.engine.endswith(".gguf")}
    return out


def measure_half(variant: str, root: Path) -> dict[str, Any]:
    """A bf16 checkpoint (as published): its bf16 merged checkpoint in stock transformers, and vLLM in bf16."""
    from lora_helpers import random_lora

    from gemma4_tune.api import export, tiny_model
    from gemma4_tune.verify.parity import HALF_RELATIVE_TOLERANCE, verify_artefacts
    from gemma4_tune.verify.prompts import TEXT_PROMPTS
    from gemma4_tune.verify.vllm import vllm_parity

    base = tiny_model(variant, root / "base", seed=0, dtype="bfloat16")
    adapter = random_lora(base, root / "adapter", seed=3)
    export(base, adapter, merged=root / "merged")
    rows = verify_artefacts(base, adapter, root / "merged", ["transformers"])
    worst_row = max(rows, key=lambda r: r.max_logit_diff / r.tolerance)
    out: dict[str, Any] = {"transformers_bf16_merged": {
        "max_logit_diff": worst_row.max_logit_diff, "relative_diff": worst_row.max_logit_diff / worst_row.tolerance
        * HALF_RELATIVE_TOLERANCE, "greedy_agreement": min(r.greedy_agreement for r in rows),
        "ok": all(r.ok for r in rows), "modalities": [r.modalities[0] for r in rows]}}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    try:
        parity = vllm_parity(base, adapter, [tokenizer(p).input_ids for p in TEXT_PROMPTS], dtype="bfloat16")
        out["vllm_bf16"] = {"max_logprob_diff": parity.max_logprob_diff, "greedy_agreement": parity.greedy_agreement,
                            "ok": parity.ok}
    except Exception as exc:  # noqa: BLE001 - recorded: why this engine could not be measured here
        out["vllm_bf16"] = {"not_measured": str(exc).splitlines()[0][:300]}
    return out


def main() -> None:
    import common

    machine = common.machine()
    started = time.perf_counter()
    path = common.RESULTS / "verify_tolerances.json"
    if "--half" in sys.argv:  # add the bf16 figures to the fp32 record
        record = json.loads(path.read_text())
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory(prefix=f"g4t-tol-{variant}-bf16-") as tmp:
                record["variants"][variant]["half"] = measure_half(variant, Path(tmp))
                print(variant, json.dumps(record["variants"][variant]["half"], default=str)[:400], flush=True)
        record["half_seconds"] = round(time.perf_counter() - started)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return
    figures = {}
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory(prefix=f"g4t-tol-{variant}-") as tmp:
            figures[variant] = measure(variant, Path(tmp))
            figures[variant]["half"] = measure_half(variant, Path(tmp) / "bf16")
            print(variant, json.dumps(figures[variant], default=str)[:400], flush=True)
    common.write_result("verify_tolerances", machine, {"variants": figures,
                                                       "seconds": round(time.perf_counter() - started)})


if __name__ == "__main__":
    main()
