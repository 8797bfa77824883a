"""Training and evaluation: optimizers, schedules, checkpoints, the training loop."""
