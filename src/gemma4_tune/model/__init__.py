"""What a Gemma 4 checkpoint is: the catalog of official variants, the model profile, tiny builders, and how to run it (loss, transformers fixes)."""
