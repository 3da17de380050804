"""Open any model file a user may hold: which kind it is, and one loader for all kinds.

Kinds: "pth" (a MiniMind2 `.pth` state dict, fp16, no config), "minimind" (our checkpoint
folder: config.json with a format_version), "hf" (a transformers folder: MiniMind2's own
model_type "minimind", or Llama/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE). The conversion command and
the inference loader (minimind.infer.load) both open models through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minimind.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from minimind.model import MiniMindForCausalLM

from .hf import load_hf_folder
from .minimind2 import load_minimind2_pth


def weights_kind(path: str | os.PathLike) -> str:
    """ "pth", "minimind" or "hf"; FileNotFoundError naming the path when nothing is there."""
    path = Path(path)
    if path.is_file():
        return "pth"
    try:
        cfg = resolve_checkpoint(path) / "config.json"  # also finds a killed save's path.old
    except CheckpointError:
        raise FileNotFoundError(f"no such file or folder: {path}") from None
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is a folder without a config.json: not a model")
    ours = "format_version" in json.loads(cfg.read_text(encoding="utf-8"))
    return "minimind" if ours else "hf"


def load_any(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    rope_scaling: dict[str, Any] | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    **pth_overrides: Any,
) -> MiniMindForCausalLM:
    """The model at `path` in eval mode on the CPU, whatever its kind.

    Head counts and `pth_overrides` (ModelConfig fields) describe what a `.pth` cannot tell;
    for a folder they are an error, since its config.json is the truth. `rope_scaling`
    (e.g. MINIMIND2_YARN) switches YaRN on after loading.
    """
    kind = weights_kind(path)
    if kind == "pth":
        model = load_minimind2_pth(
            path, num_attention_heads, num_key_value_heads, dtype, **pth_overrides
        )
    else:
        given = {"num_attention_heads": num_attention_heads, **pth_overrides}
        given["num_key_value_heads"] = num_key_value_heads
        named = sorted(k for k, v in given.items() if v is not None)
        if named:
            raise ValueError(
                f"{', '.join(named)} apply to a .pth file; the folder {path} has its config.json"
            )
        if kind == "hf":
            model = load_hf_folder(path, dtype)
        else:
            model = load_checkpoint(path, dtype=dtype)[0]
    if rope_scaling is not None:
        model.set_rope_scaling(rope_scaling)
    return model
