"""Training progress, the learning-rate multiplier and Muon's momentum warm-up."""

from dataclasses import dataclass


@dataclass(kw_only=True)
class ScheduleConfig:
    warmup_steps: int = 0  # linear lr warm-up from 0 (the records use none)
    warmdown_frac: float = 0.72  # the last fraction of progress decays linearly towards 0
    min_lr: float = 0.0  # floor of the multiplier during warmdown (the record: 0.1)

    def __post_init__(self):
        if not 0.0 <= self.min_lr <= 1.0:
            raise ValueError(f"train.schedule.min_lr = {self.min_lr}: must be in [0, 1]")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ValueError(f"train.schedule.warmdown_frac = {self.warmdown_frac}: must be in "
                             "[0, 1]")


def progress(*, step: int, elapsed: float, steps: int | None, seconds: float | None) -> float:
    """Fraction of training done: by steps, by wallclock, or whichever is further along."""
    fractions = []
    if steps:
        fractions.append(step / steps)
    if seconds:
        fractions.append(elapsed / seconds)
    return min(1.0, max(fractions)) if fractions else 0.0


def lr_multiplier(cfg: ScheduleConfig, *, step: int, frac: float) -> float:
    """1 after warm-up, then over the last warmdown_frac of training the linear decay
    (1 - frac) / warmdown_frac, floored at min_lr (the SOTA record's max(decay, min_lr): the
    multiplier stays at min_lr from frac = 1 - min_lr * warmdown_frac on)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.warmdown_frac > 0 and frac > 1 - cfg.warmdown_frac:
        decay = max(0.0, (1 - frac) / cfg.warmdown_frac)
        return warm * max(decay, cfg.min_lr)
    return warm


def muon_momentum(*, step: int, start: float, end: float, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return end
    t = min(1.0, step / warmup_steps)
    return start + (end - start) * t
