"""Full supervised fine-tuning: one conversation per row, loss on assistant tokens only (the
mask of minimind.tokenizer.chat), rows of similar length batched together so that padding
stays small; right padding keeps the fused causal kernel (a causal query never sees a pad).
Starts from a pretrained checkpoint (`--from_weight pretrain`)."""

from __future__ import annotations

from pathlib import Path

from minimind.data.padding import SFTDataset
from minimind.data.shards import Shards

from .lm import LMStage


class SFTStage(LMStage):
    name = "sft"
    group_by_length = True

    def __init__(self, shards: str | Path, max_seq_len: int, eval_fraction=0.01, max_eval=256):
        data = Shards(shards)
        super().__init__(data, SFTDataset(data, max_seq_len), eval_fraction, max_eval)

    def collate(self, items):
        return self.dataset.collate(items)
