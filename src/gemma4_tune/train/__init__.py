"""The training recipe: SFT and DPO on the transformers/TRL trainers, guard callbacks, loss, evaluation, run directories, distributed launch."""
