"""LoRA fine-tuning: the SFT data and loss, with only low-rank adapters trained.

The stage swaps adapters into the model before the engine wraps it (minimind.model.lora);
step checkpoints hold the adapted model (frozen base + adapters) for exact resume; the final
export is the merged plain model, plus the adapter alone for users who load adapters onto a
base model (the adapter folder format and its files are minimind.adapter's).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

from minimind.adapter import adapter_files
from minimind.model.lora import LoRAConfig, apply_lora, lora_config_dict, merge_lora

from ..stage import register
from .sft import SFTStage

__all__ = ["LoRAStage", "adapter_files", "add_lora_flags", "lora_from_args", "merged_copy"]


def merged_copy(model):
    """A plain copy of an adapted model, adapters merged (the export form)."""
    plain = copy.deepcopy(model)
    merge_lora(plain)
    return plain


def add_lora_flags(parser, rank: int = 8) -> None:
    a = parser.add_argument
    a(
        "--lora_rank",
        type=int,
        default=rank,
        help="adapter rank" + (" (0: no LoRA)" if not rank else ""),
    )
    a("--lora_alpha", type=float, default=16.0)
    a("--lora_dropout", type=float, default=0.0)
    a("--lora_targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def lora_from_args(args) -> LoRAConfig | None:
    if not args.lora_rank:
        return None
    return LoRAConfig(
        r=args.lora_rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=tuple(args.lora_targets.split(",")),
    )


@register
class LoRAStage(SFTStage):
    name = "lora"
    help = "LoRA fine-tuning: SFT with low-rank adapters only (train_lora.py)"
    order = 30  # place in `minimind train --help` (the pipeline's order)
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "lora_identity.jsonl",
        "save_weight": "lora_identity",
        "from_weight": "full_sft",
        "learning_rate": 1e-4,
    }

    @classmethod
    def add_flags(cls, parser):
        add_lora_flags(parser)

    @classmethod
    def from_args(cls, args, data):
        return cls(data, args.max_seq_len, lora_from_args(args))

    def __init__(self, shards: str | Path, max_seq_len: int, lora: LoRAConfig, **kw):
        super().__init__(shards, max_seq_len, **kw)
        self.lora = lora

    def prepare_model(self, model):
        apply_lora(model, self.lora)
        return model

    def export_model(self, model):
        return merged_copy(model)

    def export_files(self, model):
        return adapter_files(model, self.lora)

    def fingerprint(self):
        return {**super().fingerprint(), "lora": lora_config_dict(self.lora)}
