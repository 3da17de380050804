"""Pretraining batches: the token stream packed into fixed windows, with no padding.

Owns: `PackedDataset` (window i of the stream as (input_ids, labels), optionally with
per-token document ids) and `document_causal_mask`.
Does not own: the shards (shards.py), chat and preference batches (padding.py), the order in
which windows are visited (sampler.py).

Packing: window i is tokens [i*T, i*T + T + 1) of the whole stream: inputs are its first T
tokens, labels its last T (label t is token t + 1). Windows do not overlap, every token is a
label exactly once (but the first), nothing is padded and no token is wasted except the
tail of fewer than T + 1 tokens. Documents are framed bos + text + eos (shards.py), so a
window that spans a boundary reads `... end of A, eos, bos, start of B ...`.

Without document masking a token attends to earlier documents in its window, as in
MiniMind and GPT-2 pretraining. With `doc_ids=True` each item also carries per-token
document ids, numbered from 0 inside the window; `document_causal_mask` turns a batch of them
into the (B, 1, T, T) boolean mask that keeps attention inside each document. The model does
not take such a mask yet; the engine can pass it once attention accepts one (it costs the
fused causal kernel, so it stays optional).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .shards import Shards


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: query i may attend key j iff j <= i and both
    tokens belong to the same document (True = attend, as SDPA's boolean `attn_mask`).

    >>> document_causal_mask(torch.tensor([[0, 0, 1]]))[0, 0].int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [0, 0, 1]], dtype=torch.int32)
    """
    T = doc_ids.shape[-1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]


class PackedDataset(Dataset):
    """Fixed windows of `seq_len` tokens over prepared shards of any kind (usually pretrain).

    Item i is `(input_ids, labels)`, each (T,) int64, or `(input_ids, labels, doc_ids)` with
    `doc_ids=True`. Works with the default DataLoader collation.
    """

    def __init__(self, shards: Shards | str | os.PathLike, seq_len: int, doc_ids: bool = False):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shards = shards if isinstance(shards, Shards) else Shards(shards)
        self.seq_len = seq_len
        self.doc_ids = doc_ids

    def __len__(self) -> int:
        return max(0, (self.shards.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} outside [0, {len(self)})")
        start = i * self.seq_len
        window = torch.from_numpy(
            self.shards.tokens(start, start + self.seq_len + 1).astype(np.int64)
        )
        item = (window[:-1], window[1:])
        if not self.doc_ids:
            return item
        # The document of each input position: the last document start at or before it.
        positions = np.arange(start, start + self.seq_len)
        docs = np.searchsorted(self.shards.offsets, positions, side="right") - 1
        return (*item, torch.from_numpy(docs - docs[0]))
