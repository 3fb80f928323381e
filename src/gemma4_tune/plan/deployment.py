"""What each serving engine accepts from a Gemma 4 LoRA adapter, as data and one check.

Facts from ../shared/reference/vllm-cpu.md (vLLM 0.32) and the failure catalog
(rows 3, 4, 6, 22). The plan reports them up front; export enforces them.
"""

from __future__ import annotations

from collections.abc import Iterable

from gemma4_tune.findings import Finding, Severity, finding, register

ENGINES = ("transformers", "vllm", "llama.cpp")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_TEXT_MODULES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection",
})

VLLM_TOWER_FLAG = register("G4T201", Severity.WARNING, "vLLM does not serve tower or embedder LoRA as trained",
                           (3, 4))
VLLM_EXPERTS_DROPPED = register("G4T202", Severity.WARNING, "vLLM drops MoE expert LoRA deltas", (6,))
VLLM_RANK = register("G4T203", Severity.INFO, "vLLM --max-lora-rank to use")
LLAMACPP_EXPERTS = register("G4T204", Severity.WARNING, "llama.cpp cannot convert MoE expert LoRA", (22,))
VLLM_MODULE_REJECTED = register("G4T205", Severity.ERROR, "vLLM rejects a LoRA module of this adapter", (3,))
VLLM_RANK_TOO_HIGH = register("G4T206", Severity.ERROR, "Rank above vLLM's largest --max-lora-rank")


def vllm_max_lora_rank(rank: int) -> int | None:
    """Smallest ``--max-lora-rank`` value vLLM accepts that fits ``rank`` (None if none does)."""
    return next((v for v in VLLM_LORA_RANKS if v >= rank), None)


def deployment_findings(rank: int, groups: Iterable[str], text_module_names: Iterable[str],
                        has_experts: bool) -> list[Finding]:
    """What an adapter with these contents needs, or will lose, in each engine."""
    groups = set(groups)
    out: list[Finding] = []
    max_rank = vllm_max_lora_rank(rank)
    if max_rank is None:
        out.append(finding(VLLM_RANK_TOO_HIGH.code, f"rank {rank} is above vLLM's largest --max-lora-rank "
                           f"({VLLM_LORA_RANKS[-1]})", f"use --rank {VLLM_LORA_RANKS[-1]} or less, or serve the "
                           "merged checkpoint"))
    else:
        out.append(finding(VLLM_RANK.code, f"vLLM needs --max-lora-rank {max_rank} for rank {rank}",
                           f"start vLLM with --enable-lora --max-lora-rank {max_rank}"))
    rejected = sorted(set(text_module_names) - VLLM_TEXT_MODULES)
    if rejected:
        out.append(finding(VLLM_MODULE_REJECTED.code, f"vLLM refuses LoRA on {', '.join(rejected)} "
                           "(`expected target modules in {...}`)", "drop those modules from --targets, or "
                           "serve the merged checkpoint"))
    towers = sorted(groups & {"vision", "audio"})
    embedders = sorted({g.removesuffix("-embed") for g in groups if g.endswith("-embed")})
    if towers:
        out.append(finding(VLLM_TOWER_FLAG.code, f"vLLM 0.32 refuses the {'/'.join(towers)} tower LoRA "
                           "(`expected target modules in {...}`) unless enable_tower_connector_lora=True, an "
                           "experimental flag that did not start on CPU here", "serve the merged checkpoint "
                           "(gemma4-tune export --merged) for tower fine-tunes; vLLM can serve the text part"))
    elif embedders:
        out.append(finding(VLLM_TOWER_FLAG.code, f"vLLM 0.32 loads LoRA on the {'/'.join(embedders)} embedder "
                           "without an error, but nothing shows it applies it: PEFT names the modules after "
                           "transformers' tree (embed_vision.patch_dense), vLLM after the checkpoint's "
                           "(vision_embedder.patch_dense), and on text prompts it changes nothing", "serve the "
                           "merged checkpoint (gemma4-tune export --merged) for embedder fine-tunes; vLLM can "
                           "serve the text part"))
    if has_experts:
        out.append(finding(VLLM_EXPERTS_DROPPED.code, "vLLM does not map PEFT's expert LoRA keys "
                           "(experts.base_layer.lora_A): the expert deltas would change nothing when served",
                           "merge the adapter into the base and serve the merged checkpoint in vLLM"))
        out.append(finding(LLAMACPP_EXPERTS.code, "convert_lora_to_gguf.py cannot map MoE expert LoRA tensors",
                           "merge first, then convert the merged checkpoint to GGUF"))
    return out
