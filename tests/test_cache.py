"""KVCache.used and KVCache.merge: joined and trimmed caches decode as the originals."""

from __future__ import annotations

import pytest
import torch

from minimind.model import KVCache, MiniMindForCausalLM, preset


@pytest.fixture(scope="module")
def model() -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(preset("tiny", initializer_range=0.1)).eval()


def prefill(model, rows: list[list[int]], extra: int = 8):
    """Left-padded prefill of `rows` -> (cache, last logits (B, V))."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = True
    cache = model.new_cache(len(rows), width + extra)
    return cache, model(ids, attention_mask=mask, cache=cache).logits[:, -1]


def decode(model, cache, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor(tokens)[:, None], cache=cache).logits[:, -1]


@torch.inference_mode()
def test_merged_caches_decode_as_each_alone(model):
    a, _ = prefill(model, [[5, 6, 7], [9]])
    b, _ = prefill(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    decode(model, a, [11, 12])  # a: 4 slots filled, b: 10
    merged = KVCache.merge([a, b], max_len=16)
    assert merged.batch_size == 3 and merged.length == 10 and merged.max_len == 16
    assert merged.seen.tolist() == [4, 2, 10]
    # Row 0's 4 slots (and row 1's 2) end at the last slot; the left gap is invalid.
    assert merged.valid[0, :10].tolist() == [False] * 6 + [True] * 4
    assert merged.valid[1, :10].tolist() == [False] * 8 + [True] * 2
    got = decode(model, merged, [3, 4, 5])
    want = torch.cat([decode(model, a, [3, 4]), decode(model, b, [5])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_merge_alone_trims_dead_slots_and_changes_capacity(model):
    cache, _ = prefill(model, [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]])
    decode(model, cache, [3, 4])
    cache.reorder(torch.tensor([1]))  # the long row leaves: 6 leading slots hold nothing
    assert cache.length == 9 and cache.used() == 3
    trimmed = KVCache.merge([cache], max_len=5)
    assert trimmed.length == 3 and trimmed.max_len == 5 and not trimmed.has_padding
    torch.testing.assert_close(
        decode(model, trimmed, [7]), decode(model, cache, [7]), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="need 4 slots"):
        KVCache.merge([trimmed], max_len=3)


def test_empty_cache_has_nothing_used():
    cache = KVCache(1, 2, 1, 4, 8)
    assert cache.used() == 0
    assert KVCache.merge([cache, cache], 2).length == 0
    with pytest.raises(ValueError, match="at least one"):
        KVCache.merge([], 4)
