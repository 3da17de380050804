"""LoRA fine-tuning: the SFT data and loss, with only low-rank adapters trained.

The stage swaps adapters into the model before the engine wraps it (minimind.model.lora);
step checkpoints hold the adapted model (frozen base + adapters) for exact resume; the final
export is the merged plain model, plus the adapter alone (`adapter.safetensors` and
`adapter_config.json`) for users who load adapters onto a base model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import save_file

from minimind.model.lora import (
    LoRAConfig,
    apply_lora,
    lora_config_dict,
    lora_state_dict,
    merge_lora,
)

from .sft import SFTStage


class LoRAStage(SFTStage):
    name = "lora"

    def __init__(self, shards: str | Path, max_seq_len: int, lora: LoRAConfig, **kw):
        super().__init__(shards, max_seq_len, **kw)
        self.lora = lora

    def prepare_model(self, model):
        apply_lora(model, self.lora)
        return model

    def export_model(self, model):
        plain = copy.deepcopy(model)
        merge_lora(plain)
        return plain

    def export_files(self, model):
        tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
        return {
            "adapter.safetensors": lambda path: save_file(tensors, str(path)),
            "adapter_config.json": json.dumps(lora_config_dict(self.lora), indent=2),
        }

    def fingerprint(self):
        return {**super().fingerprint(), "lora": lora_config_dict(self.lora)}
