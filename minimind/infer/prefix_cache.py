"""A bounded LRU cache of prompt-prefix keys/values, shared by the requests of a server.

A prompt's keys/values are kept in blocks of `block` (16) tokens. A block is keyed by (its
parent block's id, its own tokens), so it stands for the whole prefix that ends with it, and a
lookup walks a new prompt block by block from its first token: a tree of blocks, the scheme of
vLLM's automatic prefix caching (hash-chained blocks) and SGLang's RadixAttention, here with
exact keys (the parent's id and the token tuple) rather than hashes, so a match is never a
collision. A block holds its slots' keys and values for every layer in one tensor
(layers, 2, K, block, D).

Why a prefix of any cached prompt serves any prompt that starts with the same tokens: with
causal attention and rotary positions counted from the prompt's first token, the keys/values at
position i depend on tokens 0..i only. (Numerically they can differ in the last bits from the
ones a fresh prefill of the new prompt would compute, as any two batch layouts do; greedy
outputs are checked equal in tests/test_batcher.py.)

Bounded by `max_tokens` (blocks x block tokens); past it, the least recently used blocks go,
leaves first. Invariant: a block is never less recently used than any of its descendants (a
lookup or an insert touches its path from the deepest block up to the root), so the least
recently used block is always a leaf and evicting it leaves every cached prefix whole: O(1)
per eviction, no scan.

Used by one thread (the batcher's worker); not thread-safe.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per block: vLLM's default; shorter shared prefixes are not worth a lookup


@dataclass(eq=False)
class _Block:
    id: int
    parent: int  # the parent block's id; 0 for a prompt's first block
    tokens: tuple[int, ...]
    kv: torch.Tensor  # (layers, 2, K, block, D)
    children: int = 0


class PrefixCache:
    """Keys/values of recent prompts' prefixes, `max_tokens` at most (see module docstring)."""

    def __init__(self, max_tokens: int, block: int = BLOCK):
        if max_tokens < 0 or block < 1:
            raise ValueError("max_tokens must be >= 0 and block >= 1")
        self.block = block
        self.max_blocks = max_tokens // block
        self._ids = itertools.count(1)
        self._blocks: dict[tuple[int, tuple[int, ...]], _Block] = {}
        self._lru: collections.OrderedDict[int, _Block] = collections.OrderedDict()  # oldest first
        self.evicted = 0  # blocks evicted since start

    @property
    def max_tokens(self) -> int:
        return self.max_blocks * self.block

    @property
    def tokens(self) -> int:
        """Tokens held now (whole blocks)."""
        return len(self._lru) * self.block

    def _path(self, prompt: Sequence[int]) -> list[_Block]:
        """The cached blocks that begin `prompt`, in order."""
        path, parent, b = [], 0, self.block
        for start in range(0, len(prompt) - b + 1, b):
            node = self._blocks.get((parent, tuple(prompt[start : start + b])))
            if node is None:
                break
            path.append(node)
            parent = node.id
        return path

    def _touch(self, path: list[_Block]) -> None:
        for node in reversed(path):  # deepest first: ancestors end up more recent
            self._lru.move_to_end(node.id)

    def match(self, prompt: Sequence[int], limit: int | None = None) -> int:
        """How many of `prompt`'s first tokens (at most `limit`) the cache holds. No side
        effects: the batcher asks this while it plans a step."""
        if not self.max_blocks:
            return 0
        held = len(self._path(prompt)) * self.block
        return held if limit is None else min(held, limit)

    def get(self, prompt: Sequence[int], tokens: int) -> torch.Tensor | None:
        """Keys/values of `prompt`'s first `tokens` tokens, (layers, 2, K, tokens, D) (a new
        tensor), or None for 0; marks them recently used. `tokens` <= match(prompt)."""
        if tokens <= 0:
            return None
        path = self._path(prompt)[: -(-tokens // self.block)]
        if len(path) * self.block < tokens:
            raise ValueError(f"the cache holds {len(path) * self.block} tokens of this prompt")
        self._touch(path)
        return torch.cat([node.kv for node in path], dim=3)[:, :, :, :tokens]

    def put(self, prompt: Sequence[int], kv: torch.Tensor) -> int:
        """Cache the whole blocks of `prompt` given its keys/values kv (layers, 2, K, >= len
        prefix, D) in order; blocks held already are only marked recently used. Evicts least
        recently used blocks past the bound. Returns the blocks added."""
        b = self.block
        count = min(len(prompt), kv.shape[3]) // b
        count = min(count, self.max_blocks)  # never more than the cache holds
        if not count:
            return 0
        path = self._path(prompt[: count * b])
        added = 0
        parent = path[-1].id if path else 0
        for i in range(len(path), count):
            tokens = tuple(prompt[i * b : (i + 1) * b])
            node = _Block(next(self._ids), parent, tokens, kv[:, :, :, i * b : (i + 1) * b].clone())
            self._blocks[(parent, tokens)] = node
            self._lru[node.id] = node
            if parent:
                path[-1].children += 1
            path.append(node)
            parent = node.id
            added += 1
        self._touch(path)
        self._evict()
        return added

    def _evict(self) -> None:
        while len(self._lru) > self.max_blocks:
            _, node = self._lru.popitem(last=False)
            assert node.children == 0, "the least recently used block has children"
            del self._blocks[(node.parent, node.tokens)]
            if node.parent:
                self._lru[node.parent].children -= 1
            self.evicted += 1

    def stats(self) -> dict[str, int]:
        return {
            "prefix_cache_tokens": self.tokens,
            "prefix_cache_max_tokens": self.max_tokens,
            "prefix_cache_evicted_blocks": self.evicted,
        }
