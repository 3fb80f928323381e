"""Run a model in a real vLLM engine, without and with a LoRA adapter, and write what it produced.

A standalone script: it runs with the vLLM environment's python (``gemma4_tune.engines.vllm_env``),
whose transformers release differs from the training one, so it imports nothing from
``gemma4_tune`` and only standard-library modules at import time (vLLM is imported in ``main``).

    python vllm_runner.py REQUEST.json RESULT.json

Request (JSON), or ``{"runs": [request, ...]}`` for several models one after the other in one process
(result ``{"schema": 1, "runs": [result, ...]}``)::

    {"model": "/path/base", "adapter": "/path/adapter" (optional, mode "lora"),
     "adapters": {"name": "/path/adapter", ...} (optional, one mode per name), "max_lora_rank": 8,
     "prompts": [[2, 17, 40], ...] or multimodal prompts
                {"prompt": "<bos>...<|image|>...", "modality": "image", "images": ["/path.png"],
                 "audios": ["/path.npy"], "sampling_rate": 16000,
                 "videos": [{"frames": "/path.npy", "metadata": {"fps": 1.0, "frames_indices": [0, 1, 2], ...}}]},
     "max_tokens": 8, "logprobs": 5, "prompt_logprobs": 5 (optional),
     "dtype": "float32", "max_model_len": 256, "enable_tower_connector_lora": false (optional),
     "allowed_token_ids": [...] or "banned_token_ids": [...] (optional), "seed": 0 (optional),
     "enforce_eager": true (optional), "gpu_memory_utilization": 0.3 (optional)}

Result (JSON)::

    {"schema": 1, "vllm_version": "0.32.0", "torch_version": ..., "transformers_version": ...,
     "model": ..., "adapter": ..., "max_tokens": 8, "logprobs": 5,
     "modes": ["base", "lora"], "adapters": {"lora": "/path/adapter"},
     "results": {"base": [{"prompt_index": 0, "modality": "text", "prompt_token_ids": [...], "token_ids": [...],
                           "logprobs": [{"<token id>": <logprob>, ...} per generated position],
                           "prompt_logprobs": [null, {"<token id>": <logprob>, ...}, ...] (if asked),
                           "finish_reason": "length"}, ...],
                 "lora": [...]},
     "errors": {"audio": "<the error>"} (a media modality the engine failed on: its rows and later ones are left
                out; an error on the text prompts fails the run),
     "timings": {"import_s": ..., "engine_start_s": ..., "base_s": ..., "lora_s": ..., "total_s": ...}}

Greedy decoding (temperature 0). Logprobs are vLLM's default raw log-probabilities (before
``allowed_token_ids`` masking), so they compare with a log-softmax of the model's logits; each
position holds the top-k plus the chosen token. All modes run in one engine: each adapter is
sent per request (``LoRARequest``), as a server does. Text prompts run as one batch; image, audio and video
prompts one request each, as a user sends them (a video as its decoded frames with their metadata, so vLLM
samples nothing again). Prompts run by modality (text, image, video, audio: the CPU build dies on a lone clip),
each for every mode, so an engine that fails on one modality still reports the ones before it.
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor): the same
model code and kernels as a served engine, without its ~20 s of spawned processes per start.
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
        # Only the media the prompts hold: without any, vLLM builds no multimodal profiling inputs.
        "limit_mm_per_prompt": {"image": _most(req, "images"), "audio": _most(req, "audios"),
                                "video": _most(req, "videos")},
        "max_num_seqs": max(1, len(req["prompts"])),
        "distributed_executor_backend": "uni",
    }
    if _adapters(req):
        kwargs.update(enable_lora=True, max_lora_rank=int(req.get("max_lora_rank", 8)), max_loras=1)
        if req.get("enable_tower_connector_lora"):
            kwargs["enable_tower_connector_lora"] = True
    if req.get("gpu_memory_utilization") is not None:
        kwargs["gpu_memory_utilization"] = float(req["gpu_memory_utilization"])
    kwargs.update(req.get("engine_kwargs") or {})
    return kwargs


def _most(req: dict[str, Any], media: str) -> int:
    """The most ``media`` (images, audios, videos) any prompt of the request holds."""
    return max((len(p.get(media) or ()) for p in req["prompts"] if isinstance(p, dict)), default=0)


def _modality(prompt: Any) -> str:
    return str(prompt.get("modality", "text")) if isinstance(prompt, dict) else "text"


def _engine_prompt(prompt: Any) -> Any:
    """A token prompt, or a text prompt with its images (PIL), audio clips ((samples, rate)) and videos ((frames,
    metadata))."""
    from vllm.inputs import TokensPrompt

    if not isinstance(prompt, dict):
        return TokensPrompt(prompt_token_ids=[int(t) for t in prompt])
    data: dict[str, Any] = {}
    if prompt.get("images"):
        from PIL import Image

        data["image"] = [Image.open(path).convert("RGB") for path in prompt["images"]]
    if prompt.get("audios"):
        import numpy as np

        rate = int(prompt.get("sampling_rate", 16000))
        data["audio"] = [(np.load(path), rate) for path in prompt["audios"]]
    if prompt.get("videos"):
        import numpy as np

        data["video"] = [(np.load(v["frames"]), dict(v["metadata"])) for v in prompt["videos"]]
    out: dict[str, Any] = {"prompt": prompt["prompt"]}
    if data:
        out["multi_modal_data"] = {k: v[0] if len(v) == 1 else v for k, v in data.items()}
    return out


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
    """Start one engine, generate for every prompt without and with the adapter, modality by modality."""
    t0 = time.monotonic()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
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
    adapters = _adapters(req)
    modes: list[tuple[str, Any]] = [("base", None)]
    modes += [(name, LoRARequest(name, i, path)) for i, (name, path) in enumerate(adapters, 1)]

    order = [m for m in ("text", "image", "video", "audio") if any(_modality(p) == m for p in req["prompts"])]
    order += sorted({_modality(p) for p in req["prompts"]} - set(order))
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _ in modes}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {"import_s": round(t_import - t0, 3), "engine_start_s": round(t_engine - t_import, 3)}
    for modality in order:
        indices = [i for i, p in enumerate(req["prompts"]) if _modality(p) == modality]
        try:
            prompts = [_engine_prompt(req["prompts"][i]) for i in indices]
            for mode, lora in modes:
                start = time.monotonic()
                if modality == "text":
                    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
                else:  # one request per media prompt, as users send them (a lone clip runs other kernels)
                    outputs = [o for prompt in prompts
                               for o in llm.generate([prompt], params, lora_request=lora, use_tqdm=False)]
                timings[f"{mode}_s"] = round(timings.get(f"{mode}_s", 0.0) + time.monotonic() - start, 3)
                for i, out in zip(indices, outputs, strict=True):
                    comp = out.outputs[0]
                    results[mode].append({
                        "prompt_index": i,
                        "modality": modality,
                        "prompt_token_ids": [int(t) for t in (out.prompt_token_ids or [])],
                        "token_ids": [int(t) for t in comp.token_ids],
                        "logprobs": [_logprob_dict(e) for e in (comp.logprobs or [])],
                        "prompt_logprobs": ([_logprob_dict(e) for e in out.prompt_logprobs]
                                            if out.prompt_logprobs is not None else None),
                        "finish_reason": comp.finish_reason,
                    })
                print(f"[vllm runner] {mode}, {modality}: {len(indices)} prompts in "
                      f"{time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - the engine's error is the finding; the engine may be dead now
            if modality == "text":  # the model or adapter itself does not run: the whole run failed
                raise
            errors[modality] = f"{type(exc).__name__}: {exc}{_where(exc)}"
            print(f"[vllm runner] {modality} prompts failed: {errors[modality]}", file=sys.stderr, flush=True)
            for mode in results:
                results[mode] = [r for r in results[mode] if r["modality"] != modality]
            break
    for mode in results:
        results[mode].sort(key=lambda r: r["prompt_index"])
    _shutdown(llm)
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
        "errors": errors,
        "timings": timings,
    }


def _where(exc: BaseException) -> str:
    """`` (in gemma4.py:575 forward <- ...)``: the innermost frames of the engine's error, for the report."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" in f.filename][-3:]
    if not frames:
        return ""
    return " (in " + " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames)) + ")"


def _shutdown(llm: Any) -> None:
    """Stop the in-process engine so that the next run of this process can start another."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def _run_or_error(req: dict[str, Any]) -> dict[str, Any]:
    """One run of a several-model request: its result, or the error that stopped it (the next run still starts)."""
    import traceback

    try:
        return run(req)
    except Exception as exc:  # noqa: BLE001 - reported per run, as the caller's finding
        traceback.print_exc()
        return {"schema": SCHEMA, "model": req["model"], "failed": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    """``vllm_runner.py REQUEST.json RESULT.json``: exit 0 with RESULT written, else non-zero."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: vllm_runner.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        req = json.load(handle)
    result = {"schema": SCHEMA, "runs": [_run_or_error(r) for r in req["runs"]]} if "runs" in req else run(req)
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
