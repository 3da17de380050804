"""Resume state: RNG snapshots, finding the latest step checkpoint, refusing a mismatched resume.

Step checkpoints live in the run folder as `step_XXXXXXXX/` (minimind.checkpoint folders whose
trainer_state.pt holds the optimizer, sampler, RNG and counters). Each is written atomically,
so any such folder that exists is complete; a save killed midway leaves only a temporary
sibling that is never read.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind.checkpoint import resolve_checkpoint

_STEP = re.compile(r"^step_(\d{8})(\.old)?$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step_{step:08d}"


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step checkpoint, oldest first."""
    found: dict[int, Path] = {}
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_dir():
                step = int(m.group(1))
                found[step] = resolve_checkpoint(step_dir(run_dir, step))
    return sorted(found.items())


def rng_state() -> dict[str, Any]:
    """Every RNG the loop may draw from, in types that `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def differing_keys(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """`key: saved -> current` for every leaf that differs, nested keys joined by dots.

    >>> differing_keys({"m": {"a": 1, "b": 2}, "s": "x"}, {"m": {"a": 1, "b": 3}, "s": "x"})
    ['m.b: 2 -> 3']
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += differing_keys(saved.get(key), current.get(key), name)
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def check_compatible(
    saved: dict[str, Any], current: dict[str, Any], folder: Path, keys=None
) -> None:
    """Refuse to resume when the model config, tokenizer, data or stage differ (only `keys`
    of `current` when given); the message names the differing keys, checkpoint -> this run."""
    diffs = []
    for key in current if keys is None else keys:
        diffs += differing_keys(saved.get(key), current.get(key), key)
    if diffs:
        raise ValueError(
            f"cannot resume from {folder} (checkpoint -> this run): "
            + "; ".join(diffs)
            + ". Start a new run (another --out_dir) or restore the original settings."
        )
