"""A small, deterministic Gemma 4 style tokenizer for tiny models.

It is a ``GemmaTokenizer`` (BPE with byte fallback and ``▁`` for spaces, as the
official one) carrying every Gemma 4 special token that the chat template, the
processor and the serving engines rely on, trained on text the project ships.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# Control tokens in the order of the official vocabulary's first ids.
BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]

# Named multimodal tokens: attribute name on the tokenizer -> token text.
# The processor reads these attributes; vLLM needs their ids to equal the config's.
MEDIA_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
VIDEO_TOKEN = "<|video|>"

# Named structural tokens of the Gemma 4 chat format (turns, thinking channel, tools): attribute
# name on the official tokenizer -> token text, as Google's conversion script declares them
# (``extra_special_tokens``). Declared this way they are special, so converters such as
# llama.cpp's mark them CONTROL (``<|turn>``, ``<turn|>`` and ``<|think|>`` would otherwise be
# plain text pieces in a GGUF vocabulary).
NAMED_TOKENS = {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "escape_token": '<|"|>',
}
CHAT_TOKENS = list(NAMED_TOKENS.values())

SPECIAL_TOKENS = BASE_SPECIALS + list(MEDIA_TOKENS.values()) + [VIDEO_TOKEN] + CHAT_TOKENS
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model answers the user in a short, helpful way.
user model system assistant tool image audio video thought call response function arguments
What is in this picture? Describe the sound. The colour of the square is red, green or blue.
Translate the sentence into French. Summarise the paragraph. Write a haiku about autumn rain.
Gemma is a family of open models. Fine-tuning adapts a model to a task with a small dataset.
The weather today is sunny with a light breeze; tomorrow it will rain in the afternoon.
def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 {"name": "value"}
Question: how many legs does a spider have? Answer: eight. Question: what is two plus two?
"""


def build_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """Train the tiny BPE tokenizer; identical output for identical inputs."""
    initial = SPECIAL_TOKENS + BYTE_TOKENS
    model = BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=initial,
        initial_alphabet=[],
        limit_alphabet=200,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_tokenizer(out_dir: Path, chat_template: str, vocab_size: int = 1024) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja; return the special token ids."""
    from transformers import GemmaTokenizer

    raw = build_tokenizer(vocab_size)
    raw_path = out_dir / "tokenizer.json"
    raw.save(str(raw_path))
    hf = GemmaTokenizer(
        tokenizer_file=str(raw_path),
        extra_special_tokens={**MEDIA_TOKENS, **NAMED_TOKENS},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
    )
    hf.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    hf.chat_template = chat_template
    hf.save_pretrained(str(out_dir))
    return {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
