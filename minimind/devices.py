"""Device choice, shared by training, inference and serving: "auto" -> cuda, mps or cpu."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" picks cuda (this rank's GPU), then mps, then cpu; "cuda" means this rank's GPU.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device
