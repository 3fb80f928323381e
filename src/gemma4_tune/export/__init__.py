"""Export: adapters tied to the base they were trained on, and streaming merges into full checkpoints.

``manifest`` fingerprints a base checkpoint from its safetensors headers and config, records it beside
an adapter, and checks that an adapter fits a base before anything is written. ``merge`` folds a PEFT
LoRA adapter into the base checkpoint shard by shard, keeping the official key layout (failure
catalog rows 2, 7, 17, 22).
"""
