"""Chat and preference batches: one conversation per row, right-padded to the longest row.

Owns: `SFTDataset` (sft and reasoning shards), `DPODataset`, `PromptDataset` (rlaif), their
collate functions, `shift_labels` and `padding_waste`.
Does not own: the shards (shards.py), pretraining windows (packing.py), grouping similar
lengths into the same batch (sampler.py's `length_grouped_order`), the losses (the stages).

SFT: length-bucketed dynamic padding, not packing. Packing several conversations into one
row either lets tokens attend across conversations (a reply conditioned on a stranger's
chat) or needs a per-document attention mask, which takes SDPA off its fused causal kernel
(on CPU it falls back to the plain path with a (B, 1, T, T) mask). One conversation per row
keeps `is_causal=True` and no mask at all: with right padding, real tokens come first and a
causal query never sees a pad, so pads change no real token's output. The cost, padding, is
made small by batching conversations of similar length (sampler.py groups them); bench/data.py
measures the waste against pad-to-max_seq_len.

Labels are shifted here: for a document of L tokens the row has L - 1 inputs, and label t is
token t + 1 when the mask of token t + 1 is 1, else -100 (`IGNORE_INDEX`, what
`torch.nn.functional.cross_entropy` ignores), so the mask is applied to the target token.
Pads are labelled -100 too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .shards import Shards

IGNORE_INDEX = -100


def shift_labels(ids: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) ids and loss mask -> (L-1,) inputs and labels, both int64.

    >>> x, y = shift_labels(np.array([5, 6, 7, 8]), np.array([0, 0, 1, 1]))
    >>> x.tolist(), y.tolist()
    ([5, 6, 7], [-100, 7, 8])
    """
    ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    keep = torch.from_numpy(np.asarray(mask[1:], dtype=bool))
    return ids[:-1], torch.where(keep, ids[1:], IGNORE_INDEX)


def _pad(rows: Sequence[torch.Tensor], value: int, length: int) -> torch.Tensor:
    """Right-pad 1-D rows into one (B, length) tensor.

    >>> _pad([torch.tensor([1, 2]), torch.tensor([3])], 0, 3).tolist()
    [[1, 2, 0], [3, 0, 0]]
    """
    out = torch.full((len(rows), length), value, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def pad_batch(rows: Sequence[dict[str, torch.Tensor]], pad_id: int, length: int | None = None):
    """Stack items with `*input_ids` and `*labels` keys, right-padded to the longest row (or
    `length`): input pads are `pad_id`, label pads -100. Other keys are left out."""
    keys = [k for k in rows[0] if k.endswith("input_ids") or k.endswith("labels")]
    T = length or max(len(row[k]) for row in rows for k in keys)
    return {
        k: _pad([row[k] for row in rows], pad_id if k.endswith("input_ids") else IGNORE_INDEX, T)
        for k in keys
    }


def padding_waste(
    lengths: Iterable[int], batches: Iterable[Sequence[int]], pad_to: int | None = None
) -> float:
    """Fraction of the tokens in padded batches that are pads: each batch (indices into
    `lengths`) padded to its longest row, or to `pad_to`.

    >>> padding_waste([3, 1, 2, 2], [[0, 1], [2, 3]])
    0.2
    >>> padding_waste([3, 1, 2, 2], [[0, 1], [2, 3]], pad_to=4)
    0.5
    """
    lengths = np.asarray(list(lengths))
    real = padded = 0
    for batch in batches:
        rows = lengths[list(batch)]
        real += int(rows.sum())
        padded += len(rows) * (pad_to or int(rows.max()))
    return (padded - real) / padded if padded else 0.0


def _open(shards: Shards | str | os.PathLike, kinds: tuple[str, ...]) -> Shards:
    shards = shards if isinstance(shards, Shards) else Shards(shards)
    if shards.kind not in kinds:
        raise ValueError(f"expected {' or '.join(kinds)} shards, got {shards.kind}")
    return shards


class _Rows(Dataset):
    """Shared by SFT and DPO: documents of masked shards as shifted (inputs, labels) rows."""

    KINDS: tuple[str, ...] = ()

    def __init__(self, shards: Shards | str | os.PathLike, max_seq_len: int | None = None):
        self.shards = _open(shards, self.KINDS)
        self.max_seq_len = max_seq_len
        self.pad_id = int(self.shards.tokenizer["pad_id"])

    def __len__(self) -> int:
        return len(self.shards)

    def _row(self, doc: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Document `doc` cut to max_seq_len + 1 tokens, as (inputs, labels)."""
        start, stop = self.shards.doc_span(doc)
        if self.max_seq_len is not None:
            stop = min(stop, start + self.max_seq_len + 1)
        return shift_labels(self.shards.tokens(start, stop), self.shards.mask(start, stop))

    def _doc_inputs(self) -> np.ndarray:
        """Inputs per document after the cut, (num_docs,) int64."""
        out = self.shards.doc_lengths() - 1
        return out if self.max_seq_len is None else np.minimum(out, self.max_seq_len)

    def collate(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Every input and label key as (B, T), T the longest row of the batch."""
        return pad_batch(rows, self.pad_id)


class SFTDataset(_Rows):
    """One conversation per item: {"input_ids": (L-1,), "labels": (L-1,)}, documents cut to
    `max_seq_len` + 1 tokens (so at most `max_seq_len` inputs). Batch with
    `DataLoader(ds, collate_fn=ds.collate, sampler=...)`; `lengths` feeds length grouping."""

    KINDS = ("sft", "reasoning")

    @property
    def lengths(self) -> np.ndarray:
        """Inputs per item, (len(self),) int64."""
        return self._doc_inputs()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self._row(i)
        return {"input_ids": x, "labels": y}


class DPODataset(_Rows):
    """Item i is pair i: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels
    (each (L-1,), labels -100 outside the assistant targets). `collate` pads both sides to
    one T, so a stage can run chosen and rejected as one (2B, T) forward."""

    KINDS = ("dpo",)

    @property
    def lengths(self) -> np.ndarray:
        """The longer side of each pair, (len(self),) int64: what a padded batch pays for."""
        return self._doc_inputs().reshape(-1, 2).max(axis=1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} outside [0, {len(self)})")
        out = {}
        for side, doc in (("chosen", 2 * i), ("rejected", 2 * i + 1)):
            out[f"{side}_input_ids"], out[f"{side}_labels"] = self._row(doc)
        return out


class PromptDataset(Dataset):
    """rlaif prompts for rollouts: {"prompt_ids": (L,) int64, "answer": str | None}. Rollouts
    pad prompts on the left themselves (infer/), so there is no collate here."""

    def __init__(self, shards: Shards | str | os.PathLike):
        self.shards = _open(shards, ("rlaif",))
        self._answers = self.shards.answers()

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.from_numpy(self.shards.doc(i).astype(np.int64))
        return {"prompt_ids": ids, "answer": self._answers[i]}
