"""Pretraining: next-token prediction over packed windows of the token stream (no padding),
plus the MoE balance loss. The last windows of the stream are held out for evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.data.packing import PackedDataset
from minimind.data.shards import Shards

from .lm import LMStage


class PretrainStage(LMStage):
    name = "pretrain"

    def __init__(self, shards: str | Path, seq_len: int, eval_fraction=0.01, max_eval=256):
        data = Shards(shards)
        super().__init__(data, PackedDataset(data, seq_len), eval_fraction, max_eval)

    def collate(self, items):
        inputs, labels = zip(*items)
        return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}
