"""What each verify comparison measures when the artefact is right, so that every tolerance is set from it.

For each tiny Gemma 4 variant (random weights, the real structure), a rank-8 random text LoRA (and a
zeroed copy of it, which must fail), its streaming-merged fp32 checkpoint, and then every engine that
``verify`` runs: stock PEFT and transformers (max |logit diff|), a real vLLM (max |logprob diff|, fp32)
and llama.cpp on the f32, f16, bf16 and q8_0 GGUF conversions (max |logit diff|, mean KL, top-1 in top-5).
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
    from gemma4_tune.verify.llamacpp import default_prompts, peft_logits, verify_gguf
    from gemma4_tune.verify.parity import verify_artefacts, vllm_result

    base = tiny_model(variant, root / "base", seed=0)
    adapter = random_lora(base, root / "adapter", seed=3)
    zeroed = zeroed_lora_b(adapter, root / "zeroed")
    merged = root / "merged"
    export(base, adapter, merged=merged)
    out: dict[str, Any] = {}
    for name, result in (("stock", verify_artefacts(base, adapter, merged, ["peft", "transformers"])),
                         ("stock_zeroed", verify_artefacts(base, zeroed, None, ["peft"]))):
        out[name] = {r.engine: {"max_logit_diff": r.max_logit_diff, "adapter_effect": r.adapter_effect,
                                "positions": r.positions} for r in result}
    vllm = vllm_result(base, adapter)
    if vllm.ok:
        out["vllm"] = {"max_logprob_diff": vllm.max_logit_diff, "greedy_agreement": vllm.greedy_agreement,
                       "adapter_effect": vllm.adapter_effect, "positions": vllm.positions}
    else:  # vLLM's CPU build cannot run LoRA on the MoE model (catalog rows 5, 6)
        out["vllm"] = {"not_measured": vllm.findings[0].message.splitlines()[0][:300]}
    prompts = default_prompts(base)
    reference = peft_logits(base, adapter, prompts)
    keys = ("max_logit_diff", "mean_kl", "top1_in_top5", "greedy_agreement", "adapter_effect")
    for gguf_type in GGUF_TYPES:
        folder = root / f"gguf-{gguf_type}"
        export_gguf(merged, folder, gguf_type, adapter_dir=adapter, base_dir=base, repoint=False)
        report = verify_gguf(folder, reference["adapter"], prompts, gguf_type, adapter_reference=reference,
                             base_dir=base, adapter_dir=adapter, base_reference=reference["base"],
                             log=lambda _line: None)
        row = {"merged": {k: report["model"].get(k) for k in keys}, "findings": [f.code for f in report["findings"]]}
        if "adapter" in report:
            row["adapter"] = {**{k: report["adapter"]["adapter"].get(k) for k in keys[:4]},
                              "adapter_effect": report["adapter"]["adapter_effect"]}
        out[f"llama.cpp {gguf_type}"] = row
    return out


def measure_half(variant: str, root: Path) -> dict[str, Any]:
    """A bf16 checkpoint (as published): its bf16 merged checkpoint in stock transformers, and vLLM in bf16."""
    from lora_helpers import random_lora

    from gemma4_tune.api import export, tiny_model
    from gemma4_tune.verify.parity import HALF_RELATIVE_TOLERANCE, PROMPTS, verify_artefacts
    from gemma4_tune.verify.vllm import vllm_parity

    base = tiny_model(variant, root / "base", seed=0, dtype="bfloat16")
    adapter = random_lora(base, root / "adapter", seed=3)
    export(base, adapter, merged=root / "merged")
    (merged,) = verify_artefacts(base, adapter, root / "merged", ["transformers"])
    out: dict[str, Any] = {"transformers_bf16_merged": {
        "max_logit_diff": merged.max_logit_diff, "relative_diff": merged.max_logit_diff / merged.tolerance
        * HALF_RELATIVE_TOLERANCE, "greedy_agreement": merged.greedy_agreement, "ok": merged.ok}}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    try:
        parity = vllm_parity(base, adapter, [tokenizer(p).input_ids for p in PROMPTS], dtype="bfloat16")
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
