"""gemma4-tune: LoRA fine-tuning for Gemma 4 that refuses silent failures."""

__version__ = "0.1.0"
