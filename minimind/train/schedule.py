"""The learning-rate schedule: linear warmup, then cosine decay to a floor.

A function of training progress measured in GLOBAL samples, not optimizer steps, so a run
resumed with another number of processes (a different step size in samples) continues on
the same curve.
"""

from __future__ import annotations

import math


def lr_at(
    samples_seen: int, total_samples: int, peak: float, floor_ratio: float, warmup_ratio: float
) -> float:
    """Learning rate after `samples_seen` of `total_samples`.

    >>> lr_at(0, 100, 1.0, 0.1, 0.0), lr_at(50, 100, 1.0, 0.1, 0.0), lr_at(100, 100, 1.0, 0.1, 0.0)
    (1.0, 0.55, 0.1)
    >>> lr_at(5, 100, 1.0, 0.1, 0.1)  # halfway through a 10-sample warmup
    0.5
    """
    total = max(total_samples, 1)
    warmup = warmup_ratio * total
    if samples_seen < warmup:
        return peak * samples_seen / warmup
    progress = min(1.0, (samples_seen - warmup) / max(total - warmup, 1))
    floor = peak * floor_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
