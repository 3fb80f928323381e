"""Run GGUF files in a real llama.cpp and write the logits it produced at every prompt position.

A standalone script: it imports nothing from ``gemma4_tune`` and only the standard library and
numpy at import time; the llama.cpp binding (``llama_cpp_py_sync``, prebuilt libllama) comes
from ``PYTHONPATH`` (``gemma4_tune.verify.llamacpp_env``). A user with only llama.cpp can run
the same calls.

    python llamacpp_runner.py REQUEST.json RESULT.json

Request (JSON)::

    {"model": "/path/model-f32.gguf",
     "prompts": [[2, 17, 40], ...],                      # token ids, no tokenizer round trip
     "modes": [{"name": "base"},                          # optional; default: one "base" mode
               {"name": "lora", "adapter": "/path/adapter-f32.gguf", "scale": 1.0}],
     "mmproj": "/path/mmproj-f32.gguf",                   # optional: load it with libmtmd
     "check_token_ids": [105, 106],                       # optional: report their vocab flags
     "n_threads": 1, "kv_type": "f32"}                    # optional

Result (JSON), with one ``<mode>-logits.npy`` (float32, ``[positions, n_vocab]``, the prompts'
positions one after the other) beside it::

    {"schema": 1, "runtime_version": "0.11739", "llama_cpp_build": "b11739", "n_vocab": 1024,
     "prompt_lengths": [3, ...], "modes": {"base": {"logits": "base-logits.npy", "adapter": null}},
     "vocab": {"bos": 2, "eos": 1, "eot": 106, "tokens": {"105": {"control": true, "eog": false}}},
     "mmproj": {"path": ..., "vision": true, "audio": true, "load_s": 0.1},
     "chat_template": "...",                              # the GGUF's tokenizer.chat_template, or null
     "timings": {"load_s": ..., "base_s": ..., "total_s": ...}}

Each prompt is decoded as one batch from an empty KV cache with every position's logits
requested (no flash attention, f32 KV cache by default: the numerically closest settings).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SCHEMA = 1
_GGML_TYPES = {"f32": 0, "f16": 1}


def _say(msg: str) -> None:
    print(f"[llamacpp runner] {msg}", file=sys.stderr, flush=True)


def _decode_all(lib: Any, ffi: Any, ctx: Any, prompt: list[int], n_vocab: int, np: Any) -> Any:
    """Logits at every position of ``prompt``, decoded in one batch from an empty cache."""
    mem = lib.llama_get_memory(ctx)
    if mem != ffi.NULL:
        lib.llama_memory_clear(mem, True)
    n = len(prompt)
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, tok in enumerate(prompt):
            batch.token[i] = int(tok)
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = np.empty((n, n_vocab), dtype=np.float32)
        for i in range(n):
            ptr = lib.llama_get_logits_ith(ctx, i)
            if ptr == ffi.NULL:
                raise RuntimeError(f"llama_get_logits_ith({i}) returned NULL")
            out[i] = np.frombuffer(ffi.buffer(ptr, n_vocab * 4), dtype=np.float32)
        return out
    finally:
        lib.llama_batch_free(batch)


def run(req: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Load the model (and mmproj), evaluate every prompt in every mode, save the logits."""
    t0 = time.monotonic()
    import numpy as np

    import llama_cpp_py_sync as binding
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

    lib, ffi = get_lib(), get_ffi()
    lib.llama_backend_init()
    prompts = [[int(t) for t in p] for p in req["prompts"]]
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    threads = int(req.get("n_threads", 1))
    kv = _GGML_TYPES[req.get("kv_type", "f32")]

    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(req["model"].encode(), mparams)
    if model == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {req['model']}")
    longest = max(len(p) for p in prompts)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = max(64, -(-longest // 64) * 64)
    cparams.n_batch = cparams.n_ubatch = max(longest, 1)
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.flash_attn_type = 0
    cparams.type_k = cparams.type_v = kv
    cparams.embeddings = False
    cparams.swa_full = True
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    if ctx == ffi.NULL:
        lib.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context")
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = int(lib.llama_vocab_n_tokens(vocab))
    t_load = time.monotonic()
    _say(f"llama.cpp {binding.__llama_cpp_tag__}: loaded {os.path.basename(req['model'])} "
         f"(vocab {n_vocab}) in {t_load - t0:.1f} s")

    result: dict[str, Any] = {
        "schema": SCHEMA, "runtime_version": binding.__version__, "llama_cpp_build": binding.__llama_cpp_tag__,
        "model": req["model"], "n_vocab": n_vocab, "prompt_lengths": [len(p) for p in prompts], "modes": {},
        "timings": {"load_s": round(t_load - t0, 3)},
    }
    result["vocab"] = {
        "bos": int(lib.llama_vocab_bos(vocab)), "eos": int(lib.llama_vocab_eos(vocab)),
        "eot": int(lib.llama_vocab_eot(vocab)),
        "tokens": {str(int(t)): {"control": bool(lib.llama_vocab_is_control(vocab, int(t))),
                                 "eog": bool(lib.llama_vocab_is_eog(vocab, int(t))),
                                 "text": ffi.string(lib.llama_vocab_get_text(vocab, int(t))).decode("utf-8", "replace")}
                   for t in req.get("check_token_ids") or []},
    }
    template = lib.llama_model_chat_template(model, ffi.NULL)  # tokenizer.chat_template of the GGUF
    result["chat_template"] = None if template == ffi.NULL else ffi.string(template).decode("utf-8", "replace")
    adapters: list[Any] = []
    try:
        for mode in req.get("modes") or [{"name": "base"}]:
            name = str(mode["name"])
            start = time.monotonic()
            path = mode.get("adapter")
            if path:
                adapter = lib.llama_adapter_lora_init(model, str(path).encode())
                if adapter == ffi.NULL:
                    raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
                adapters.append(adapter)
                arr = ffi.new("struct llama_adapter_lora *[1]", [adapter])
                scales = ffi.new("float[1]", [float(mode.get("scale", 1.0))])
                rc = lib.llama_set_adapters_lora(ctx, arr, 1, scales)
            else:
                rc = lib.llama_set_adapters_lora(ctx, ffi.NULL, 0, ffi.NULL)
            if rc != 0:
                raise RuntimeError(f"llama_set_adapters_lora returned {rc} for mode {name}")
            rows = [_decode_all(lib, ffi, ctx, p, n_vocab, np) for p in prompts]
            fname = f"{name}-logits.npy"
            np.save(os.path.join(out_dir, fname), np.concatenate(rows, axis=0))
            result["modes"][name] = {"logits": fname, "adapter": path, "scale": float(mode.get("scale", 1.0))}
            result["timings"][f"{name}_s"] = round(time.monotonic() - start, 3)
            _say(f"{name}: {len(prompts)} prompts, {sum(map(len, prompts))} positions in "
                 f"{result['timings'][f'{name}_s']:.2f} s")
        if req.get("mmproj"):
            start = time.monotonic()
            from llama_cpp_py_sync._cffi_bindings import get_mtmd_lib

            mtmd = get_mtmd_lib()
            mp = mtmd.mtmd_context_params_default()
            mp.use_gpu = False
            mp.n_threads = threads
            mp.warmup = False
            mctx = mtmd.mtmd_init_from_file(str(req["mmproj"]).encode(), model, mp)
            if mctx == ffi.NULL:
                raise RuntimeError(f"libmtmd could not load the projector {req['mmproj']}")
            result["mmproj"] = {"path": req["mmproj"], "vision": bool(mtmd.mtmd_support_vision(mctx)),
                                "audio": bool(mtmd.mtmd_support_audio(mctx)),
                                "load_s": round(time.monotonic() - start, 3)}
            mtmd.mtmd_free(mctx)
            _say(f"mmproj loaded: vision={result['mmproj']['vision']} audio={result['mmproj']['audio']}")
    finally:
        lib.llama_set_adapters_lora(ctx, ffi.NULL, 0, ffi.NULL)
        lib.llama_free(ctx)  # loaded adapters are freed with their model
        lib.llama_model_free(model)
    result["timings"]["total_s"] = round(time.monotonic() - t0, 3)
    return result


def main(argv: list[str]) -> int:
    """``llamacpp_runner.py REQUEST.json RESULT.json``."""
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as handle:
        req = json.load(handle)
    out_dir = os.path.dirname(os.path.abspath(argv[2]))
    result = run(req, out_dir)
    if "gemma4_tune" in sys.modules:  # a verdict of "llama.cpp alone" must not rest on our code in its process
        print("llamacpp_runner: gemma4_tune is imported in this process; refusing to report", file=sys.stderr)
        return 3
    tmp = argv[2] + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle)
    os.replace(tmp, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
