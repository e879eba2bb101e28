"""Learning rate as a pure function of the step number (so a resumed run needs no scheduler state)."""
from __future__ import annotations

import math

from megatron_code.errors import ConfigError
from megatron_code.training.config import OptimizerConfig, SchedulerConfig

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


def _decay_coefficient(style: str, ratio: float) -> float:
    """Fraction of (max_lr - min_lr) left after `ratio` (0..1) of the decay phase."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return 2.0 * (0.5**ratio) - 1.0  # 1 at the start, 0 at the end
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ValueError(style)


class LearningRateSchedule:
    """Linear warmup to `lr`, then the decay style down to `min_lr` at lr_decay_iters."""

    def __init__(self, sched: SchedulerConfig, optim: OptimizerConfig, train_iters: int):
        if sched.lr_decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {sched.lr_decay_style!r}.")
        if sched.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ConfigError(
                f"--lr-wsd-decay-style must be one of {WSD_DECAY_STYLES}, got {sched.lr_wsd_decay_style!r}.")
        self.max_lr, self.min_lr = optim.lr, optim.min_lr
        self.warmup = sched.lr_warmup_iters
        self.decay_iters = sched.lr_decay_iters or train_iters
        if self.warmup > self.decay_iters:
            raise ConfigError(f"--lr-warmup-iters ({self.warmup}) exceeds --lr-decay-iters ({self.decay_iters}).")
        self.style = sched.lr_decay_style
        self.wsd_style = sched.lr_wsd_decay_style
        self.wsd_decay_iters = sched.lr_wsd_decay_iters or max(1, self.decay_iters // 10)

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step `step` (1-based: the first update uses step 1)."""
        if self.warmup > 0 and step <= self.warmup:
            return self.max_lr * step / self.warmup
        if self.style == "constant":
            return self.max_lr
        if self.style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(self.warmup, 1)) / math.sqrt(step))
        if step >= self.decay_iters:
            return self.min_lr
        if self.style == "WSD":
            decay_start = self.decay_iters - self.wsd_decay_iters
            if step <= decay_start:
                return self.max_lr
            coefficient = _decay_coefficient(self.wsd_style, (step - decay_start) / self.wsd_decay_iters)
        else:
            ratio = (step - self.warmup) / (self.decay_iters - self.warmup)
            coefficient = _decay_coefficient(self.style, ratio)
        return self.min_lr + coefficient * (self.max_lr - self.min_lr)
