"""What the language-modelling stages (pretrain, sft, lora) share: token shards split into
train/eval, the summed next-token loss, and the data fingerprint that guards resume."""

from __future__ import annotations

from torch.utils.data import Dataset

from minimind.data.shards import Shards

from ..stage import Stage, lm_loss, split_eval, token_count


class LMStage(Stage):
    """Subclasses build `dataset` from `self.shards` and give `collate`."""

    def __init__(self, shards: Shards, dataset: Dataset, eval_fraction: float, max_eval: int):
        self.shards, self.dataset = shards, dataset
        self.train, self.eval = split_eval(dataset, eval_fraction, max_eval)

    def train_dataset(self):
        return self.train

    def eval_dataset(self):
        return self.eval

    count = staticmethod(token_count)

    def loss(self, model, batch):
        return lm_loss(model, batch["input_ids"], batch["labels"])

    def fingerprint(self):
        return {
            "data": self.shards.meta["source"]["blake2b"],
            "tokenizer": self.shards.tokenizer["blake2b"],
        }
