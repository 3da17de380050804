"""Preallocated key/value cache for incremental decoding.

One buffer per layer of shape (B, K, max_len, D) is allocated once; each step writes its new
keys/values in place and attention reads a view of the filled prefix, so decoding never
concatenates tensors. The cache also tracks, per row, which slots hold real tokens (left
padding) and how many real tokens each row has seen (its next rotary position).
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's view of the shared KVCache."""

    def __init__(self, parent: KVCache, k: torch.Tensor, v: torch.Tensor):
        self.parent, self.k, self.v = parent, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at the current offset; return the filled (B, K, S, D) views."""
        start, t = self.parent.length, k.shape[2]
        self.k[:, :, start : start + t] = k
        self.v[:, :, start : start + t] = v
        return self.k[:, :, : start + t], self.v[:, :, : start + t]


class KVCache:
    """Keys and values for every layer, plus the token-validity mask and per-row positions."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.layers = [
            LayerCache(
                self,
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(num_layers)
        ]
        self.max_len = max_len
        self.length = 0  # slots filled (same for all rows: padding is on the left)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.has_padding = False

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        """A cache sized for `model` (a MiniMindForCausalLM), on its device and dtype."""
        cfg = model.config
        p = next(model.parameters())
        return cls(
            cfg.num_hidden_layers,
            batch_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            max_len,
            device=p.device,
            dtype=dtype or p.dtype,
        )

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reserve(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record T new tokens with validity `mask` (B, T) bool.

        Returns (positions (B, T), key_valid (B, S)) for this step. Must be followed by exactly
        one forward through every layer, after which `advance` commits the step.
        """
        b, t = mask.shape
        if b != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows, got a batch of {b}")
        if self.length + t > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {t} new tokens > max_len {self.max_len}"
            )
        self.valid[:, self.length : self.length + t] = mask
        self.has_padding = self.has_padding or not bool(mask.all())
        positions = self.seen[:, None] + mask.long().cumsum(1) - 1
        return positions.clamp_(min=0), self.valid[:, : self.length + t]

    def advance(self, mask: torch.Tensor) -> None:
        self.length += mask.shape[1]
        self.seen += mask.long().sum(1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (LongTensor): drop finished rows or fan out for n samples."""
        for layer in self.layers:
            layer.k, layer.v = layer.k[index], layer.v[index]
        self.valid, self.seen = self.valid[index], self.seen[index]
