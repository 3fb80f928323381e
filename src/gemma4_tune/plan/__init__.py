"""What a run will touch: target modules, the LoRA adapter applied through PEFT, memory, and what each engine can deploy."""
