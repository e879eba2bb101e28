"""--skip-steps: the steps whose global batch is read and discarded instead of trained on.

The usual remedy for a loss spike at scale (PaLM, OPT, BLOOM skipped a few hundred batches): roll
the checkpoint marker back to a step before the spike and resume past the data that preceded it.
The batches are read, not left out of the sample order, so every later step sees the same samples
as it would have without the skip and a resumed run stays at the same data position."""
from __future__ import annotations

from megatron_code.errors import ConfigError


def parse_skip_steps(values: list[str], train_iters: int) -> frozenset[int]:
    """`["12001-12400", "13050"]` -> the step numbers; each in [1, train_iters]."""
    steps: set[int] = set()
    for value in values:
        first, _, last = value.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"--skip-steps: {value!r} is neither a step nor a FIRST-LAST range of steps "
                              f"(e.g. 12001-12400).") from None
        if not 1 <= low <= high <= train_iters:
            raise ConfigError(f"--skip-steps: {value!r} must lie within steps 1..{train_iters} (--train-iters), "
                              f"first <= last; steps are numbered from 1, as the log numbers them.")
        steps.update(range(low, high + 1))
    return frozenset(steps)


def describe_skips(steps: frozenset[int], after: int, global_batch_size: int) -> str | None:
    """The startup line naming the skips still ahead of step `after` (None: none)."""
    ahead = sorted(step for step in steps if step > after)
    if not ahead:
        return None
    ranges, start = [], ahead[0]
    for previous, step in zip(ahead, ahead[1:] + [None]):
        if step != previous + 1:
            ranges.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = step
    batches = f"{len(ahead)} global batch{'es' if len(ahead) > 1 else ''}"
    return (f"skipping steps {', '.join(ranges)} (--skip-steps): {batches}, "
            f"{len(ahead) * global_batch_size} samples read and not trained on")
