"""Preallocated key/value cache for incremental decoding.

One buffer per layer of shape (B, K, max_len, D) is allocated once; each step writes its new
keys/values in place and attention reads a view of the filled prefix, so decoding never
concatenates tensors. The cache also tracks, per row, which slots hold real tokens (left
padding) and how many real tokens each row has seen (its next rotary position).

Because positions come from `seen` and attention reads only valid slots, where a row's keys sit
in the slot axis does not matter, only their order. `merge` uses that to join caches of
different lengths (continuous batching admits new rows into a running batch) and to trim slots
no row uses any more.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def rollback(self, drop: Sequence[int]) -> None:
        """Forget the last `drop[i]` slots written in row i (B ints >= 0): speculative decoding's
        rejected draft tokens. Their slots become invalid and `seen` loses the real tokens among
        them, so the row's next token gets the position it would have had without them.

        The cache shrinks by min(drop) slots; a row that drops more keeps a hole of invalid
        slots before the next write, which attention skips (only the order of a row's keys
        matters, see the module docstring).

        >>> c = KVCache(1, 2, 1, 1, 8)
        >>> _ = c.reserve(torch.ones(2, 5, dtype=torch.bool)); c.advance(torch.ones(2, 5))
        >>> c.rollback([1, 3])
        >>> c.length, c.seen.tolist(), c.valid[:, :5].int().tolist()
        (4, [4, 2], [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
        """
        drop = [int(d) for d in drop]  # host ints: the common case needs no device sync
        if len(drop) != self.batch_size or min(drop) < 0 or max(drop) > self.length:
            raise ValueError(
                f"cannot drop {drop} of {self.length} filled slots in {self.batch_size} rows"
            )
        low, end = min(drop), self.length
        if low:  # the slots every row drops: one slice
            self.seen -= self.valid[:, end - low : end].sum(1)
            self.valid[:, end - low : end] = False
        if max(drop) != low:  # rows that drop more leave holes
            more = torch.tensor(drop, device=self.valid.device)[:, None] - low
            slots = torch.arange(end - low, device=more.device)
            gone = slots[None, :] >= end - low - more  # (B, end - low)
            self.seen -= (self.valid[:, : end - low] & gone).sum(1)
            self.valid[:, : end - low] &= ~gone
            self.has_padding = True
        self.length -= low

    def used(self) -> int:
        """Slots from the first one that any row holds through `length`: what `merge` keeps.

        >>> c = KVCache(1, 2, 1, 1, 8)
        >>> c.length = 5
        >>> c.valid[0, 3:5] = c.valid[1, 2:5] = True
        >>> c.used()
        3
        """
        if self.length == 0:
            return 0
        held = self.valid[:, : self.length].any(0)  # (length,): does any row hold slot i?
        return self.length - int(held.int().argmax()) if bool(held.any()) else 0

    def row_slots(self, row: int) -> torch.Tensor:
        """Row `row`'s keys/values over the slots it holds, in order: (layers, 2, K, n, D),
        a copy (n = its valid slots; for a prompt just prefilled, the prompt's keys/values).
        """
        held = self.valid[row, : self.length].nonzero().squeeze(1)
        return torch.stack(
            [torch.stack([lc.k[row][:, held], lc.v[row][:, held]]) for lc in self.layers]
        )

    def select(self, index: torch.Tensor, extra: int) -> KVCache:
        """Rows `index` (LongTensor) in a new cache of only the slots they use plus `extra`
        free ones: dropping finished rows and trimming the slots nobody holds any more in one
        copy of the kept window (`reorder` then `merge` copies the whole cache, then the
        window). Positions (`seen`) are kept, so the rows decode exactly as before."""
        length = self.length
        valid = self.valid[index, :length]
        held = valid.any(0)
        used = length - int(held.int().argmax()) if bool(held.any()) else 0
        first = self.layers[0].k
        out = type(self)(
            len(self.layers),
            len(index),
            first.shape[1],
            first.shape[3],
            used + extra,
            device=first.device,
            dtype=first.dtype,
        )
        window = slice(length - used, length)
        for dst, src in zip(out.layers, self.layers):
            dst.k[:, :, :used] = src.k[index, :, window]
            dst.v[:, :, :used] = src.v[index, :, window]
        out.valid[:, :used] = valid[:, window]
        out.seen.copy_(self.seen[index])
        out.length = used
        out.has_padding = not bool(out.valid[:, :used].all())
        if isinstance(out, StaticKVCache):
            out.slot.fill_(used)
        return out

    def load_prefixes(self, prefixes: Sequence[torch.Tensor | None]) -> None:
        """Start an empty cache with each row's prefix keys/values already in it.

        prefixes[j]: (layers, 2, K, m_j, D), the keys/values of a row's first m_j tokens
        (`row_slots` of an earlier cache, or slices of them), or None for m_j = 0. They are
        written right-aligned at slot L = max(m_j), as `merge` aligns rows, and each row's
        `seen` becomes m_j, so the rest of its prompt is fed next at positions m_j, m_j + 1, ...
        """
        if self.length:
            raise ValueError("load_prefixes needs an empty cache")
        if len(prefixes) != self.batch_size:
            raise ValueError(f"{len(prefixes)} prefixes for a cache of {self.batch_size} rows")
        sizes = [0 if p is None else p.shape[3] for p in prefixes]
        length = max(sizes)
        if length > self.max_len:
            raise ValueError(f"prefixes need {length} slots > max_len {self.max_len}")
        for j, (p, m) in enumerate(zip(prefixes, sizes)):
            if not m:
                continue
            for i, lc in enumerate(self.layers):
                lc.k[j, :, length - m : length] = p[i, 0]
                lc.v[j, :, length - m : length] = p[i, 1]
            self.valid[j, length - m : length] = True
            self.seen[j] = m
        self.length = length
        self.has_padding = min(sizes) < length

    @classmethod
    def merge(cls, caches: Sequence[KVCache], max_len: int) -> KVCache:
        """A new cache of capacity `max_len` holding the rows of `caches`, in order.

        Each cache's used window (its last `used()` slots, (B_i, K, used_i, D) per layer) is
        copied right-aligned into a window of length L = max(used_i), so every cache's last slot
        lands on slot L - 1; the slots to its left are marked invalid (and zeroed, so masked
        keys never meet NaN). `seen` is copied, so each row decodes exactly as before. Merging
        one cache alone trims the slots no row uses, or changes its capacity.
        """
        if not caches:
            raise ValueError("merge needs at least one cache")
        used = [c.used() for c in caches]
        length = max(used)
        if length > max_len:
            raise ValueError(f"merged caches need {length} slots > max_len {max_len}")
        first = caches[0].layers[0].k  # (B, K, S, D): the dims, dtype and device of them all
        out = cls(
            len(caches[0].layers),
            sum(c.batch_size for c in caches),
            first.shape[1],
            first.shape[3],
            max_len,
            device=first.device,
            dtype=first.dtype,
        )
        r = 0
        for c, u in zip(caches, used):
            rows, src = slice(r, r + c.batch_size), slice(c.length - u, c.length)
            for dst_layer, src_layer in zip(out.layers, c.layers):
                dst_layer.k[rows, :, length - u : length] = src_layer.k[:, :, src]
                dst_layer.v[rows, :, length - u : length] = src_layer.v[:, :, src]
            out.valid[rows, length - u : length] = c.valid[:, src]
            out.seen[rows] = c.seen
            r += c.batch_size
        out.length = length
        out.has_padding = not bool(out.valid[:, :length].all())
        return out


class SlotLayerCache:
    """One layer of a StaticKVCache in a fixed-shape step: writes at device-side slots and hands
    attention the whole buffer (B, K, max_len, D); unfilled slots are masked out. slots: the
    (T,) slots of a block step (`block_reserve`), None for a decode step (the cache's `slot`)."""

    def __init__(self, parent: StaticKVCache, index: int, slots: torch.Tensor | None = None):
        self.parent, self.index, self.slots = parent, index, slots

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, D) -> the full (B, K, max_len, D) buffers, written in place."""
        layer = self.parent.layers[self.index]
        at = self.parent.slot if self.slots is None else self.slots
        # Under autocast (sampling from a model trained in bf16) k and v arrive in the autocast
        # dtype; the buffers keep the model's (the prefill's slice assignment casts likewise).
        layer.k.index_copy_(2, at, k.to(layer.k.dtype))
        layer.v.index_copy_(2, at, v.to(layer.v.dtype))
        return layer.k, layer.v


class StaticKVCache(KVCache):
    """A KVCache whose one-token decode steps have fixed shapes and no host synchronisation,
    so `torch.compile` (and CUDA graphs) capture one step once and replay it.

    The prompt is prefilled through the ordinary path (python-int `length`, sliced views).
    A decode step (`MiniMindForCausalLM.decode_step`) then writes at `slot`, a (1,) long tensor
    on the device that mirrors `length`, with `index_copy_`, and attends over all `max_len`
    slots with the validity mask (B, 1, 1, max_len): attention costs O(max_len) per step
    rather than O(filled), so size the cache to the prompt plus the budget. `length` (the host
    mirror) is advanced by the caller, outside the captured step (`advance_host`), because a
    python int that changes every step would make the compiler specialise on it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.valid.device)
        self.slot_layers = [SlotLayerCache(self, i) for i in range(len(self.layers))]

    def advance(self, mask: torch.Tensor) -> None:
        super().advance(mask)
        self.slot.fill_(self.length)

    def step_reserve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of one real token per row -> positions (B, 1), mask (B, 1, 1, max_len)."""
        self.valid.index_fill_(1, self.slot, True)
        return self.seen[:, None], self.valid[:, None, None, :]

    def step_advance(self) -> None:
        """Device side of a decode step's commit (inside the captured step)."""
        self.seen.add_(1)
        self.slot.add_(1)

    def advance_host(self, t: int = 1) -> None:
        """Host side of a decode (t = 1) or block step's commit (outside the captured step)."""
        self.length += t

    def block_reserve(self, mask: torch.Tensor) -> tuple:
        """A block step of T new tokens per row, `mask` (B, T) bool (False: left padding) ->
        positions (B, T), attention mask (B, 1, T, max_len), per-layer caches writing at
        slots `slot`..`slot` + T - 1. Fixed shapes for a fixed T, no host sync: speculative
        decoding's compiled verification of [last, d_1..d_k]. A query sees the valid slots up
        to its own (causal within the block); a padding query sees itself (no all-masked row)."""
        t = mask.shape[1]
        slots = self.slot + torch.arange(t, device=self.slot.device)  # (T,)
        self.valid.index_copy_(1, slots, mask)
        positions = (self.seen[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)
        keys = torch.arange(self.max_len, device=slots.device)[None, :]  # (1, max_len)
        causal = keys <= slots[:, None]  # (T, max_len)
        attend = (causal[None] & self.valid[:, None, :]) | (keys == slots[:, None])[None]
        layers = [SlotLayerCache(self, i, slots) for i in range(len(self.layers))]
        return positions, attend[:, None], layers

    def block_advance(self, mask: torch.Tensor) -> None:
        """Device side of a block step's commit (inside the captured step)."""
        self.seen.add_(mask.long().sum(1))
        self.slot.add_(mask.shape[1])

    def rollback(self, drop: Sequence[int]) -> None:
        """KVCache.rollback, with the device slot moved back to the new length."""
        super().rollback(drop)
        self.slot.fill_(self.length)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.slot_layers = [SlotLayerCache(self, i) for i in range(len(self.layers))]

    @classmethod
    def merge(cls, caches: Sequence[KVCache], max_len: int) -> StaticKVCache:
        """KVCache.merge, with the device slot set to the merged length (also: regrowth)."""
        out = super().merge(caches, max_len)
        out.slot.fill_(out.length)
        return out
