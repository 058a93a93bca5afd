"""Training: the trainer, optimizers, schedule, EMA, distributed helpers and resume state."""
