"""Open any model file a user may hold: which kind it is, and one loader for all kinds.

Kinds: "pth" (a MiniMind2 `.pth` state dict, fp16, no config), "minimind" (our checkpoint
folder: config.json with a format_version), "hf" (a transformers folder: MiniMind2's own
model_type "minimind", or Llama/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE). The conversion command and
the inference loader (minimind.infer.load) both open models through here, and both find the
tokenizer that goes with a model file here (`find_tokenizer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minimind import paths
from minimind.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from minimind.model import MiniMindForCausalLM

from .hf import load_hf_folder
from .minimind2 import MINIMIND2_TOKENIZER, MINIMIND2_VOCAB, load_minimind2_pth


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


def stored_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The floating dtype the weights at `path` are stored in, when the file says so cheaply:
    our checkpoint's safetensors metadata, a transformers config's dtype; a `.pth` is fp16
    (MiniMind2's format). None when unknown or mixed."""
    kind = weights_kind(path)
    if kind == "pth":
        return torch.float16
    folder = resolve_checkpoint(path)
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if kind == "minimind":
        from safetensors import safe_open

        weights = folder / "model.safetensors"
        if not weights.is_file():
            return None
        with safe_open(str(weights), framework="pt") as f:
            name = (f.metadata() or {}).get("dtype", "")
    else:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    found = getattr(torch, names.get(name, name), None) if name else None
    return found if isinstance(found, torch.dtype) and found.is_floating_point else None


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


def tokenizer_candidates(path: str | os.PathLike) -> list[Path]:
    """Where the tokenizer of model file `path` may be, in order: the folder itself (or the
    `.pth`'s folder), `{folder}/{stem}` (our checkpoint beside a `.pth` of the same name);
    for a `.pth`, `../model` (MiniMind's layout: `out/` beside `model/`) and `../tokenizer`
    (a pipeline workdir: `out/` beside `tokenizer/`); then MINIMIND_HOME/model/tokenizer
    (ours) and MINIMIND_HOME/model (where MiniMind keeps it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    home = paths.home() / "model"
    near = [] if path.is_dir() else [folder.parent / "model", folder.parent / "tokenizer"]
    return [folder, folder / path.stem, *near, home / "tokenizer", home]


def find_tokenizer(path: str | os.PathLike, vocab_size: int) -> Path:
    """The tokenizer folder for the model at `path` whose vocabulary is `vocab_size`.

    The first of `tokenizer_candidates` holding a tokenizer.json; else, for a `.pth` (which
    carries none) of MiniMind2's vocabulary, MiniMind2's tokenizer shipped with the package.
    FileNotFoundError lists what was tried and says to pass --tokenizer.
    """
    path = Path(path)
    tried = tokenizer_candidates(path)
    for c in tried:
        if (c / "tokenizer.json").is_file():
            return c
    if weights_kind(path) == "pth":
        if vocab_size == MINIMIND2_VOCAB:
            return MINIMIND2_TOKENIZER
        shipped = (
            f"; MiniMind2's tokenizer ({MINIMIND2_VOCAB} ids) does not fit its {vocab_size} ids"
        )
    else:
        shipped = ""
    raise FileNotFoundError(
        f"no tokenizer for {path}: none of {', '.join(map(str, tried))} holds a "
        f"tokenizer.json{shipped}; pass --tokenizer DIR"
    )
