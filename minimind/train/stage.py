"""The Stage interface: what a training method gives the engine, and nothing more.

A stage owns its datasets, its batch collation and its loss (and may hold frozen models such
as a reference or a teacher). The engine owns everything else: devices, precision,
accumulation, the optimizer and schedule, checkpoints and resume, logging.

Loss contract: `loss(model, batch)` returns the SUM of the per-unit losses of the micro-batch
(units are tokens for language modelling, pairs for DPO) and `count(batch)` the number of
units, known before the forward pass. The engine divides by the global count over all
micro-batches of the step and all processes, so a step's gradient is the same whether its
batch is split 1x8, 8x1 or 2 ranks x 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: summed over the micro-batch's units
    aux: torch.Tensor | None = None  # scalar added per micro-batch, weighted by its unit share
    metrics: dict[str, float] = field(default_factory=dict)  # summed like loss_sum


class Stage:
    """Base class; subclasses set `name` and implement the data and loss methods."""

    name = "stage"
    count_is_tokens = True  # units are tokens: the engine reports tokens/s and MFU
    # Length grouping: the sampler batches samples of similar `lengths` (padded stages).
    group_by_length = False

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def eval_dataset(self) -> Dataset | None:
        return None

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Adjust the model before wrapping (e.g. swap in LoRA, freeze); default: as is."""
        return model

    def export_model(self, model: nn.Module) -> nn.Module:
        """The plain model a checkpoint stores (e.g. LoRA merged); default: as is."""
        return model

    def export_files(self, model: nn.Module) -> dict[str, Any]:
        """Extra files for the final export ({name: bytes | str | callable(path)})."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this stage's data and tokenizer; resuming with another is refused."""
        return {}


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    """Next-token cross-entropy summed over labelled positions (labels already shifted, -100
    ignored), plus the model's MoE balance loss. Logits are upcast to fp32 for the softmax.

    When some positions carry no label (SFT: prompts and padding), the head runs on the
    labelled ones only (`logits_at`): the same loss and gradients without the (B*T, V) logits.
    """
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    if bool(keep.all()):  # packed pretraining: every position is a target
        out = model(input_ids)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
    else:
        at = keep.nonzero().squeeze(1)
        out = model(input_ids, logits_at=at)
        logits, flat = out.logits, flat.index_select(0, at)
    loss = F.cross_entropy(logits.float(), flat, reduction="sum")
    return LossOutput(loss, aux=out.aux_loss if out.aux_loss.requires_grad else None)


def token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labelled positions of a batch: the units a language-modelling loss is summed over."""
    return (batch["labels"] != IGNORE_INDEX).sum()


class IndexView(Dataset):
    """Items `indices` of `base`, keeping its `lengths` (for length grouping) and `collate`."""

    def __init__(self, base: Dataset, indices: range):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    @property
    def lengths(self):
        return self.base.lengths[self.indices.start : self.indices.stop]


def split_eval(base: Dataset, fraction: float, max_items: int) -> tuple[IndexView, IndexView]:
    """(train, eval): the last `fraction` of `base` (at most `max_items`) held out for eval.

    >>> train, held = split_eval(list(range(100)), 0.05, 3)
    >>> len(train), [held[i] for i in range(len(held))]
    (97, [97, 98, 99])
    """
    n = len(base)
    n_eval = min(max_items, int(n * fraction)) if n > 1 else 0
    return IndexView(base, range(0, n - n_eval)), IndexView(base, range(n - n_eval, n))
