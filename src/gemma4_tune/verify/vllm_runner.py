"""Run a model in a real vLLM engine, without and with a LoRA adapter, and write what it produced.

A standalone script: it runs with the vLLM environment's python (``gemma4_tune.verify.engine_env``),
whose transformers release differs from the training one, so it imports nothing from
``gemma4_tune`` and only standard-library modules at import time (vLLM is imported in ``main``).

    python vllm_runner.py REQUEST.json RESULT.json

Request (JSON)::

    {"model": "/path/base", "adapter": "/path/adapter" (optional, mode "lora"),
     "adapters": {"name": "/path/adapter", ...} (optional, one mode per name), "max_lora_rank": 8,
     "prompts": [[2, 17, 40], ...], "max_tokens": 8, "logprobs": 5, "prompt_logprobs": 5 (optional),
     "dtype": "float32", "max_model_len": 256, "enable_tower_connector_lora": false (optional),
     "allowed_token_ids": [...] or "banned_token_ids": [...] (optional), "seed": 0 (optional),
     "enforce_eager": true (optional), "gpu_memory_utilization": 0.3 (optional)}

Result (JSON)::

    {"schema": 1, "vllm_version": "0.32.0", "torch_version": ..., "transformers_version": ...,
     "model": ..., "adapter": ..., "max_tokens": 8, "logprobs": 5,
     "modes": ["base", "lora"], "adapters": {"lora": "/path/adapter"},
     "results": {"base": [{"prompt_index": 0, "prompt_token_ids": [...], "token_ids": [...],
                           "logprobs": [{"<token id>": <logprob>, ...} per generated position],
                           "prompt_logprobs": [null, {"<token id>": <logprob>, ...}, ...] (if asked),
                           "finish_reason": "length"}, ...],
                 "lora": [...]},
     "timings": {"import_s": ..., "engine_start_s": ..., "base_s": ..., "lora_s": ..., "total_s": ...}}

Greedy decoding (temperature 0). Logprobs are vLLM's default raw log-probabilities (before
``allowed_token_ids`` masking), so they compare with a log-softmax of the model's logits; each
position holds the top-k plus the chosen token. All modes run in one engine: each adapter is
sent per request (``LoRARequest``), as a server does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SCHEMA = 1


def _logprob_dict(entry: Any) -> dict[str, float] | None:
    if entry is None:
        return None
    return {str(int(tok)): float(lp.logprob) for tok, lp in entry.items()}


def _engine_kwargs(req: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": req["model"],
        "dtype": req.get("dtype", "float32"),
        "max_model_len": int(req.get("max_model_len", 256)),
        "seed": int(req.get("seed", 0)),
        "enforce_eager": bool(req.get("enforce_eager", True)),
        # Text-only checks: no image/audio/video inputs, so vLLM builds no multimodal profiling
        # inputs (which would need torchvision, removed from the CPU environment).
        "limit_mm_per_prompt": {"image": 0, "audio": 0, "video": 0},
        "max_num_seqs": max(1, len(req["prompts"])),
    }
    if _adapters(req):
        kwargs.update(enable_lora=True, max_lora_rank=int(req.get("max_lora_rank", 8)), max_loras=1)
        if req.get("enable_tower_connector_lora"):
            kwargs["enable_tower_connector_lora"] = True
    if req.get("gpu_memory_utilization") is not None:
        kwargs["gpu_memory_utilization"] = float(req["gpu_memory_utilization"])
    kwargs.update(req.get("engine_kwargs") or {})
    return kwargs


def _adapters(req: dict[str, Any]) -> list[tuple[str, str]]:
    """(mode, path) of every adapter in the request, ``adapter`` first as mode ``lora``."""
    out = [("lora", str(req["adapter"]))] if req.get("adapter") else []
    for name, path in (req.get("adapters") or {}).items():
        if name == "base" or name in dict(out):
            raise ValueError(f"adapter mode name {name!r} is reserved or repeated")
        out.append((str(name), str(path)))
    return out


def _allowed_ids(req: dict[str, Any], vocab_size: int) -> list[int] | None:
    if req.get("allowed_token_ids") is not None:
        return [int(t) for t in req["allowed_token_ids"]]
    banned = {int(t) for t in req.get("banned_token_ids") or ()}
    if not banned:
        return None
    return [t for t in range(vocab_size) if t not in banned]


def _vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as handle:
        config = json.load(handle)
    text = config.get("text_config") or config
    return int(text["vocab_size"])


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Start one engine, generate for every prompt without and with the adapter."""
    t0 = time.monotonic()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t_import = time.monotonic()
    print(f"[vllm runner] vllm {vllm.__version__}: starting the engine for {req['model']}", file=sys.stderr,
          flush=True)
    llm = LLM(**_engine_kwargs(req))
    t_engine = time.monotonic()
    print(f"[vllm runner] engine ready in {t_engine - t_import:.1f} s", file=sys.stderr, flush=True)

    params = SamplingParams(
        temperature=0.0,
        max_tokens=int(req.get("max_tokens", 8)),
        logprobs=int(req.get("logprobs", 5)),
        prompt_logprobs=int(req["prompt_logprobs"]) if req.get("prompt_logprobs") is not None else None,
        allowed_token_ids=_allowed_ids(req, _vocab_size(req["model"])),
        ignore_eos=True,
        detokenize=False,
        seed=int(req.get("seed", 0)),
    )
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in req["prompts"]]
    adapters = _adapters(req)
    modes: list[tuple[str, Any]] = [("base", None)]
    modes += [(name, LoRARequest(name, i, path)) for i, (name, path) in enumerate(adapters, 1)]

    results: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {"import_s": round(t_import - t0, 3), "engine_start_s": round(t_engine - t_import, 3)}
    for mode, lora in modes:
        start = time.monotonic()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        timings[f"{mode}_s"] = round(time.monotonic() - start, 3)
        rows = []
        for i, out in enumerate(outputs):
            comp = out.outputs[0]
            rows.append({
                "prompt_index": i,
                "prompt_token_ids": list(out.prompt_token_ids or req["prompts"][i]),
                "token_ids": [int(t) for t in comp.token_ids],
                "logprobs": [_logprob_dict(e) for e in (comp.logprobs or [])],
                "prompt_logprobs": ([_logprob_dict(e) for e in out.prompt_logprobs]
                                    if out.prompt_logprobs is not None else None),
                "finish_reason": comp.finish_reason,
            })
        results[mode] = rows
        print(f"[vllm runner] {mode}: {len(rows)} prompts in {timings[f'{mode}_s']:.1f} s", file=sys.stderr,
              flush=True)
    timings["total_s"] = round(time.monotonic() - t0, 3)

    import torch
    import transformers

    return {
        "schema": SCHEMA,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model": req["model"],
        "adapter": req.get("adapter"),
        "adapters": dict(adapters),
        "max_tokens": params.max_tokens,
        "logprobs": params.logprobs,
        "modes": [m for m, _ in modes],
        "results": results,
        "timings": timings,
    }


def main(argv: list[str] | None = None) -> int:
    """``vllm_runner.py REQUEST.json RESULT.json``: exit 0 with RESULT written, else non-zero."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: vllm_runner.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        req = json.load(handle)
    result = run(req)
    if "gemma4_tune" in sys.modules:  # a verdict of "vLLM alone" must not rest on our code in its process
        print("vllm_runner: gemma4_tune is imported in this process; refusing to report", file=sys.stderr)
        return 3
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
