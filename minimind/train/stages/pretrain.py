"""Pretraining: next-token prediction over packed windows of the token stream (no padding),
plus the MoE balance loss. The last windows of the stream are held out for evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from minimind.data.packing import PackedDataset
from minimind.data.shards import Shards

from ..stage import register
from .lm import LMStage


@register
class PretrainStage(LMStage):
    name = "pretrain"
    help = "next-token prediction on packed text (train_pretrain.py)"
    order = 10  # place in `minimind train --help` (the pipeline's order)
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "pretrain_hq.jsonl",
        "save_weight": "pretrain",
        "from_weight": "none",
        "learning_rate": 5e-4,
        "accumulation_steps": 8,
        "max_seq_len": 340,
    }
    prepare_cuts = False  # packing cuts windows across documents

    @classmethod
    def from_args(cls, args, data):
        return cls(data, args.max_seq_len)

    def __init__(self, shards: str | Path, seq_len: int, eval_fraction=0.01, max_eval=256):
        data = Shards(shards)
        super().__init__(data, PackedDataset(data, seq_len), eval_fraction, max_eval)
        self._seq_len = seq_len

    def seq_len(self):
        return self._seq_len

    def collate(self, items):
        inputs, labels = zip(*items)
        return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}
