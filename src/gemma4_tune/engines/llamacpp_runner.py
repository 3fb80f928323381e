"""Run GGUF files in a real llama.cpp and write the logits it produced at every prompt position.

A standalone script: it imports nothing from ``gemma4_tune`` and only the standard library and
numpy at import time; the llama.cpp binding (``llama_cpp_py_sync``, prebuilt libllama and
libmtmd) comes from ``PYTHONPATH`` (``gemma4_tune.engines.llamacpp_env``). A user with only
llama.cpp can run the same calls.

    python llamacpp_runner.py REQUEST.json RESULT.json

Request (JSON)::

    {"model": "/path/model-f32.gguf",
     "prompts": [[2, 17, 40], ...],                      # token ids, no tokenizer round trip
     "modes": [{"name": "base"},                          # optional; default: one "base" mode
               {"name": "lora", "adapter": "/path/adapter-f32.gguf", "scale": 1.0}],
     "mmproj": "/path/mmproj-f32.gguf",                   # optional: load it with libmtmd
     "mm_prompts": [                                      # optional, needs mmproj: prompts with media
         {"text": "<bos><|turn>user\\n<__media__>Describe the image.<turn|>\\n<|turn>model\\n",
          "media": [{"kind": "image", "rgb": "/path/0.rgb", "width": 300, "height": 200},
                    {"kind": "audio", "f32": "/path/1.f32"}]}],   # one entry per marker, in order
     "media_marker": "<__media__>",                       # optional: the marker in mm_prompts' text
     "image_min_tokens": 1, "image_max_tokens": 280,      # optional: libmtmd's image token budget
     "layout_prompts": [...], "layout_params": {"image_max_tokens": 280},  # optional: tokenized only
     "check_token_ids": [105, 106],                       # optional: report their vocab flags
     "n_threads": 1, "kv_type": "f32"}                    # optional

Media travel as raw files: an image as its ``height * width * 3`` RGB bytes (row-major, uint8),
audio as mono float32 samples (native byte order) at libmtmd's sample rate (16 kHz for Gemma 4).

Result (JSON), with one ``<mode>-logits.npy`` (float32, ``[positions, n_vocab]``, the prompts'
positions one after the other) beside it, and with ``mm_prompts`` one ``<mode>-mm-logits.npy``
(the text positions of the multimodal prompts, one after the other)::

    {"schema": 2, "runtime_version": "0.11739", "llama_cpp_build": "b11739", "n_vocab": 1024,
     "prompt_lengths": [3, ...],
     "modes": {"base": {"logits": "base-logits.npy", "mm_logits": "base-mm-logits.npy", "adapter": null}},
     "vocab": {"bos": 2, "eos": 1, "eot": 106, "tokens": {"105": {"control": true, "eog": false}}},
     "mmproj": {"path": ..., "vision": true, "audio": true, "load_s": 0.1, "marker": "<__media__>"},
     "mm_prompts": [{"error": null,                       # or why libmtmd could not take the prompt
                     "chunks": [{"type": "text", "tokens": [2, 105, ...]},
                                {"type": "image", "n_tokens": 60, "n_pos": 60, "non_causal": true}, ...],
                     "text_positions": 23}],              # rows of this prompt in <mode>-mm-logits.npy
     "layout_prompts": [{"error": null, "chunks": [...]}],  # the chunks libmtmd makes of them, no logits
     "chat_template": "...",                              # the GGUF's tokenizer.chat_template, or null
     "timings": {"load_s": ..., "base_s": ..., "total_s": ...}}

Each text-only prompt is decoded as one batch from an empty KV cache with every position's logits
requested (no flash attention, f32 KV cache by default: the numerically closest settings). A
multimodal prompt is split by ``mtmd_tokenize`` into chunks and evaluated chunk by chunk from an
empty cache: each text chunk with ``llama_decode``, every position's logits requested; each media
chunk with ``mtmd_helper_eval_chunk_single`` (the encoder, then the embeddings decoded with the
attention libmtmd chooses for that chunk, ``mtmd_decode_use_non_causal``). So logits come back at
every text position, the ones after the media included. A prompt libmtmd refuses (a modality the
projector does not support, a tokenize or encode error) is recorded with its reason and gets no
rows; the run goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SCHEMA = 2
_GGML_TYPES = {"f32": 0, "f16": 1}
_CHUNK_TYPES = {0: "text", 1: "image", 2: "audio"}
_KIND_SUPPORT = {"image": "vision", "audio": "audio"}


def _say(msg: str) -> None:
    print(f"[llamacpp runner] {msg}", file=sys.stderr, flush=True)


def _clear(lib: Any, ffi: Any, ctx: Any) -> None:
    mem = lib.llama_get_memory(ctx)
    if mem != ffi.NULL:
        lib.llama_memory_clear(mem, True)


def _decode_tokens(lib: Any, ffi: Any, ctx: Any, tokens: list[int], pos0: int, n_vocab: int, np: Any) -> Any:
    """Decode ``tokens`` at positions ``pos0...`` as one batch on sequence 0; their logits ``[n, vocab]``."""
    n = len(tokens)
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, tok in enumerate(tokens):
            batch.token[i] = int(tok)
            batch.pos[i] = pos0 + i
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


def _decode_all(lib: Any, ffi: Any, ctx: Any, prompt: list[int], n_vocab: int, np: Any) -> Any:
    """Logits at every position of ``prompt``, decoded in one batch from an empty cache."""
    _clear(lib, ffi, ctx)
    return _decode_tokens(lib, ffi, ctx, prompt, 0, n_vocab, np)


def _bitmap(mtmd: Any, ffi: Any, media: dict[str, Any], np: Any) -> Any:
    """A libmtmd bitmap of one image (raw RGB file) or audio clip (raw float32 file)."""
    kind = media.get("kind")
    if kind == "image":
        width, height = int(media["width"]), int(media["height"])
        data = np.fromfile(media["rgb"], dtype=np.uint8)
        if data.size != width * height * 3:
            raise ValueError(f"{media['rgb']}: {data.size} bytes, {width}x{height} RGB needs {width * height * 3}")
        bitmap = mtmd.mtmd_bitmap_init(width, height, ffi.from_buffer("unsigned char[]", data))
    elif kind == "audio":
        samples = np.ascontiguousarray(np.fromfile(media["f32"], dtype=np.float32))
        bitmap = mtmd.mtmd_bitmap_init_from_audio(samples.size, ffi.from_buffer("float[]", samples))
    else:
        raise ValueError(f"unknown media kind {kind!r} (image or audio)")
    if bitmap == ffi.NULL:
        raise RuntimeError(f"mtmd_bitmap_init returned NULL for the {kind}")
    return bitmap


def _tokenize_mm(mtmd: Any, ffi: Any, mctx: Any, prompt: dict[str, Any], caps: dict[str, bool],
                 np: Any) -> tuple[Any, list[dict[str, Any]] | None, str | None]:
    """``(chunks, layout, error)`` of one multimodal prompt; ``chunks`` is NULL where ``error`` says why."""
    media = list(prompt.get("media") or [])
    for item in media:
        need = _KIND_SUPPORT.get(str(item.get("kind")))
        if need and not caps.get(need):
            return ffi.NULL, None, (f"the projector loaded by libmtmd does not support {item['kind']} input "
                                    f"(mtmd_support_{need} is false)")
    bitmaps = []
    try:
        try:
            bitmaps = [_bitmap(mtmd, ffi, item, np) for item in media]
        except (OSError, ValueError, RuntimeError) as exc:
            return ffi.NULL, None, f"could not build the media bitmaps: {exc}"
        text = str(prompt["text"]).encode()
        c_text = ffi.new("char[]", text)
        inp = ffi.new("struct mtmd_input_text *")
        inp.text, inp.text_len, inp.add_special, inp.parse_special = c_text, len(text), False, True
        arr = ffi.new("mtmd_bitmap *[]", bitmaps) if bitmaps else ffi.NULL
        chunks = mtmd.mtmd_input_chunks_init()
        rc = mtmd.mtmd_tokenize(mctx, chunks, inp, arr, len(bitmaps))
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            why = {1: "the number of media markers in the text differs from the number of media",
                   2: "libmtmd could not preprocess the media"}.get(int(rc), "error")
            return ffi.NULL, None, f"mtmd_tokenize returned {rc} ({why})"
    finally:
        for bitmap in bitmaps:
            mtmd.mtmd_bitmap_free(bitmap)
    layout: list[dict[str, Any]] = []
    for i in range(int(mtmd.mtmd_input_chunks_size(chunks))):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        kind = _CHUNK_TYPES.get(int(mtmd.mtmd_input_chunk_get_type(chunk)), "unknown")
        if kind == "text":
            n = ffi.new("size_t *")
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, n)
            layout.append({"type": "text", "tokens": [int(ptr[j]) for j in range(int(n[0]))]})
        else:
            layout.append({"type": kind, "n_tokens": int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)),
                           "n_pos": int(mtmd.mtmd_input_chunk_get_n_pos(chunk)),
                           "non_causal": bool(mtmd.mtmd_decode_use_non_causal(mctx, chunk))})
    return chunks, layout, None


def _eval_mm(lib: Any, mtmd: Any, ffi: Any, ctx: Any, mctx: Any, chunks: Any, layout: list[dict[str, Any]],
             n_batch: int, n_vocab: int, np: Any) -> Any:
    """Evaluate a tokenized multimodal prompt from an empty cache; the logits of its text positions."""
    _clear(lib, ffi, ctx)
    rows, n_past = [], 0
    new_n_past = ffi.new("llama_pos *")
    for i, part in enumerate(layout):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if part["type"] == "text":
            if part["tokens"]:
                rows.append(_decode_tokens(lib, ffi, ctx, part["tokens"], n_past, n_vocab, np))
            n_past += len(part["tokens"])
        else:  # encode the media, then decode its embeddings (libmtmd picks causal or not)
            rc = mtmd.mtmd_helper_eval_chunk_single(mctx, ctx, chunk, n_past, 0, n_batch, False, new_n_past)
            if rc != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunk_single returned {rc} on the {part['type']} chunk {i}")
            n_past = int(new_n_past[0])
    return np.concatenate(rows, axis=0) if rows else np.empty((0, n_vocab), dtype=np.float32)


def _mtmd_context(mtmd: Any, ffi: Any, req: dict[str, Any], model: Any, marker: Any, params: dict[str, Any],
                  threads: int) -> Any:
    """A libmtmd context for the request's projector: CPU, no warmup, no flash attention, ``params``'
    ``image_min_tokens``/``image_max_tokens`` (llama.cpp's ``--image-min-tokens``/``--image-max-tokens``)."""
    mp = mtmd.mtmd_context_params_default()
    mp.use_gpu = False
    mp.n_threads = threads
    mp.warmup = False
    mp.flash_attn_type = 0
    mp.media_marker = marker
    for key in ("image_min_tokens", "image_max_tokens"):
        if params.get(key):
            setattr(mp, key, int(params[key]))
    mctx = mtmd.mtmd_init_from_file(str(req["mmproj"]).encode(), model, mp)
    if mctx == ffi.NULL:
        raise RuntimeError(f"libmtmd could not load the projector {req['mmproj']}")
    return mctx


def run(req: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Load the model (and mmproj), evaluate every prompt in every mode, save the logits."""
    t0 = time.monotonic()
    import llama_cpp_py_sync as binding
    import numpy as np
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

    lib, ffi = get_lib(), get_ffi()
    lib.llama_backend_init()
    prompts = [[int(t) for t in p] for p in req.get("prompts") or []]
    mm_prompts = list(req.get("mm_prompts") or [])
    if any(not p for p in prompts) or not (prompts or mm_prompts):
        raise ValueError("give prompts or mm_prompts; every prompt needs at least one token")
    if mm_prompts and not req.get("mmproj"):
        raise ValueError("mm_prompts need an mmproj")
    threads = int(req.get("n_threads", 1))
    kv = _GGML_TYPES[req.get("kv_type", "f32")]

    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(req["model"].encode(), mparams)
    if model == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {req['model']}")
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

    mtmd = mctx = None
    tokenized: list[tuple[Any, list[dict[str, Any]] | None]] = []
    ctx = ffi.NULL
    adapters: list[Any] = []
    try:
        if req.get("mmproj"):
            start = time.monotonic()
            from llama_cpp_py_sync._cffi_bindings import get_mtmd_lib

            mtmd = get_mtmd_lib()
            marker = ffi.new("char[]", str(req.get("media_marker") or ffi.string(mtmd.mtmd_default_marker()).decode())
                             .encode())
            mctx = _mtmd_context(mtmd, ffi, req, model, marker, req, threads)
            caps = {"vision": bool(mtmd.mtmd_support_vision(mctx)), "audio": bool(mtmd.mtmd_support_audio(mctx))}
            result["mmproj"] = {"path": req["mmproj"], **caps, "marker": ffi.string(marker).decode(),
                                "audio_sample_rate": int(mtmd.mtmd_get_audio_sample_rate(mctx)) if caps["audio"]
                                else None, "load_s": round(time.monotonic() - start, 3)}
            _say(f"mmproj loaded: vision={caps['vision']} audio={caps['audio']}")
            result["mm_prompts"] = []
            for i, prompt in enumerate(mm_prompts):
                chunks, layout, error = _tokenize_mm(mtmd, ffi, mctx, prompt, caps, np)
                tokenized.append((chunks, layout))
                result["mm_prompts"].append({"error": error, "chunks": layout, "text_positions": 0})
                if error:
                    _say(f"mm prompt {i}: {error}")
            if req.get("layout_prompts"):  # tokenized only, under their own libmtmd settings
                lctx = _mtmd_context(mtmd, ffi, req, model, marker, req.get("layout_params") or {}, threads)
                result["layout_prompts"] = []
                try:
                    for prompt in req["layout_prompts"]:
                        chunks, layout, error = _tokenize_mm(mtmd, ffi, lctx, prompt, caps, np)
                        if chunks != ffi.NULL:
                            mtmd.mtmd_input_chunks_free(chunks)
                        result["layout_prompts"].append({"error": error, "chunks": layout})
                finally:
                    mtmd.mtmd_free(lctx)
        mm_longest = max((sum(len(c.get("tokens", ())) or c.get("n_tokens", 0) for c in lay)
                          for _, lay in tokenized if lay), default=0)
        mm_pos = max((sum(len(c.get("tokens", ())) or c.get("n_pos", 0) for c in lay)
                      for _, lay in tokenized if lay), default=0)
        longest = max([len(p) for p in prompts] + [mm_longest, 1])
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = max(64, -(-max(longest, mm_pos) // 64) * 64)
        cparams.n_batch = cparams.n_ubatch = max(longest, 1)  # one ubatch: a media block is never split
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = 0
        cparams.type_k = cparams.type_v = kv
        cparams.embeddings = False
        cparams.swa_full = True
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if ctx == ffi.NULL:
            raise RuntimeError("llama.cpp could not create a context")
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
            info: dict[str, Any] = {"adapter": path, "scale": float(mode.get("scale", 1.0))}
            if prompts:
                rows = [_decode_all(lib, ffi, ctx, p, n_vocab, np) for p in prompts]
                info["logits"] = f"{name}-logits.npy"
                np.save(os.path.join(out_dir, info["logits"]), np.concatenate(rows, axis=0))
            if tokenized:
                mm_rows = []
                for (chunks, layout), record in zip(tokenized, result["mm_prompts"], strict=True):
                    if record["error"] or layout is None:
                        continue
                    try:
                        got = _eval_mm(lib, mtmd, ffi, ctx, mctx, chunks, layout, int(cparams.n_batch), n_vocab, np)
                    except RuntimeError as exc:  # recorded, not a crash: the caller reports it per modality
                        record["error"] = str(exc)
                        _say(f"mm prompt: {exc}")
                        continue
                    record["text_positions"] = int(got.shape[0])
                    mm_rows.append(got)
                info["mm_logits"] = f"{name}-mm-logits.npy"
                np.save(os.path.join(out_dir, info["mm_logits"]), np.concatenate(mm_rows, axis=0) if mm_rows
                        else np.empty((0, n_vocab), dtype=np.float32))
            result["modes"][name] = info
            result["timings"][f"{name}_s"] = round(time.monotonic() - start, 3)
            done = [r for r in result.get("mm_prompts", []) if not r["error"]]
            _say(f"{name}: {len(prompts)} prompts, {sum(map(len, prompts))} positions"
                 + (f"; {len(done)} of {len(mm_prompts)} multimodal prompts, "
                    f"{sum(r['text_positions'] for r in done)} text positions" if mm_prompts else "")
                 + f" in {result['timings'][f'{name}_s']:.2f} s")
    finally:
        if ctx != ffi.NULL:
            lib.llama_set_adapters_lora(ctx, ffi.NULL, 0, ffi.NULL)
            lib.llama_free(ctx)  # loaded adapters are freed with their model
        for chunks, _ in tokenized:
            if chunks != ffi.NULL:
                mtmd.mtmd_input_chunks_free(chunks)
        if mctx is not None and mctx != ffi.NULL:
            mtmd.mtmd_free(mctx)
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
