"""The LoRA adapter folder: its one writer and its one reader.

An adapter folder holds two files, alone or inside a checkpoint folder (`minimind train lora`
exports the merged model and, beside it, the adapter it was trained as):

    adapter_config.json   {"format": "minimind-lora", "format_version": 1, "r", "alpha",
                          "dropout", "target_modules"} (minimind.model.lora.lora_config_dict)
    adapter.safetensors   `{module}.lora_A` (r, in) and `{module}.lora_B` (out, r) for every
                          adapted linear layer, module names as in the base model
                          (`model.layers.0.self_attn.q_proj.lora_A`); scaling alpha / r

The writer (`adapter_files`, `save_adapter`) takes an adapted model; the reader
(`read_adapter`, `merge_adapter`) swaps the adapters into a base model, loads them strictly and
merges them, so decoding costs nothing extra. The math (LoRALinear, apply/merge) is
minimind.model.lora's; MiniMind's own adapter `.pth` (unscaled `{module}.lora.A/B.weight`) is
read by minimind.convert.minimind2. This module sits beside checkpoint.py, above the model
package (which imports only torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minimind.checkpoint import CheckpointError
from minimind.fsutil import AtomicFolder
from minimind.model.lora import (
    LoRAConfig,
    apply_lora,
    load_lora_state_dict,
    lora_config_dict,
    lora_config_from_dict,
    lora_state_dict,
    merge_lora,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


def adapter_files(model: torch.nn.Module, lora: LoRAConfig) -> dict[str, str | Callable]:
    """{file name: content} of the adapter of LoRA-adapted `model`, in the form
    CheckpointWriter.add_file takes (the LoRA stage adds them to its export folder)."""
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save (apply_lora first)")
    return {
        WEIGHTS_NAME: lambda path: save_file(tensors, str(path)),
        CONFIG_NAME: json.dumps(lora_config_dict(lora), indent=2) + "\n",
    }


def save_adapter(folder: str | os.PathLike, model: torch.nn.Module, lora: LoRAConfig) -> Path:
    """Write an adapter folder on its own, atomically (fsutil.AtomicFolder); -> the folder."""
    files = adapter_files(model, lora)
    with AtomicFolder(folder) as out:
        for name, content in files.items():
            target = out.staging / name
            if callable(content):
                content(target)
            else:
                target.write_text(content, encoding="utf-8")
    return out.path


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A folder holding both adapter files."""
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def read_adapter(folder: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """-> (its LoRAConfig, the adapter tensors); CheckpointError naming the folder and the
    file for anything missing or malformed."""
    folder = Path(folder)
    if not is_adapter_folder(folder):
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} + {WEIGHTS_NAME} (not a LoRA adapter)")
    try:
        config = lora_config_from_dict(json.loads((folder / CONFIG_NAME).read_text("utf-8")))
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from e
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: cannot read it: {e}") from e
    return config, tensors


def merge_adapter(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Swap the adapter of `folder` into `model`, load it strictly and merge it in place."""
    config, tensors = read_adapter(folder)
    apply_lora(model, config)
    try:
        load_lora_state_dict(model, tensors)
    except ValueError as e:
        merge_lora(model)  # leave the model plain, whatever happened
        raise CheckpointError(f"{Path(folder) / WEIGHTS_NAME}: {e}") from e
    merge_lora(model)
