"""Training: one run (``run``) over method units (``methods``: SFT, DPO, KTO on the transformers/TRL trainers)
over shared parts (``base``, ``preference``), guard callbacks, evaluation, run directories, distributed launch."""
