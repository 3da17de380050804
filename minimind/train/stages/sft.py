"""Full supervised fine-tuning: one conversation per row, loss on assistant tokens only (the
mask of minimind.tokenizer.chat), rows of similar length batched together so that padding
stays small; right padding keeps the fused causal kernel (a causal query never sees a pad).
Starts from a pretrained checkpoint (`--from_weight pretrain`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from minimind.data.padding import SFTDataset
from minimind.data.shards import Shards

from ..stage import register
from .lm import LMStage


@register
class SFTStage(LMStage):
    name = "sft"
    help = "supervised fine-tuning on chats, loss on assistant turns (train_full_sft.py)"
    order = 20  # place in `minimind train --help` (the pipeline's order)
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "sft_mini_512.jsonl",
        "save_weight": "full_sft",
        "from_weight": "pretrain",
        "learning_rate": 5e-5,
    }
    group_by_length = True

    @classmethod
    def from_args(cls, args, data):
        return cls(data, args.max_seq_len)

    def __init__(self, shards: str | Path, max_seq_len: int, eval_fraction=0.01, max_eval=256):
        data = Shards(shards)
        super().__init__(data, SFTDataset(data, max_seq_len), eval_fraction, max_eval)
        self.max_seq_len = max_seq_len

    def seq_len(self):
        return self.max_seq_len

    def collate(self, items):
        return self.dataset.collate(items)
