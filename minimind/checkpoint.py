"""Self-describing checkpoint folders: config.json + model.safetensors (+ tokenizer files).

Owns strict weight loading (every missing, unexpected or mis-shaped key is named), used by
training, inference and conversion alike, so inference never imports the training package.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into, or is unreadable."""


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Copy `state_dict` into `model` strictly, casting dtype; name every mismatch at once.

    A tied head may be absent from `state_dict` (it is the embedding).
    """
    own = model.state_dict()
    # Tied parameters (the head and the embedding) share storage: one name of a group suffices.
    groups: dict[int, list[str]] = {}
    for name, p in own.items():
        groups.setdefault(p.data_ptr(), []).append(name)
    missing = sorted(
        name
        for names in groups.values()
        if not any(n in state_dict for n in names)
        for name in names
    )
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {'; '.join(shapes)}")
    if problems:
        where = f" from {source}" if source else ""
        raise CheckpointError(f"cannot load weights{where}: " + " | ".join(problems))
    with torch.no_grad():
        for k, v in state_dict.items():
            own[k].copy_(v.to(own[k].dtype))
