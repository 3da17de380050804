"""The resumable distributed sampler (minimind.data.sampler): every sample of an epoch read
exactly once across steps, ranks, checkpoints and changes of world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from minimind.data.sampler import ResumableSampler, epoch_order, length_grouped_order


def samplers(n: int, world: int, state: dict | None = None, **kwargs) -> list[ResumableSampler]:
    out = [ResumableSampler(n, seed=7, rank=r, world_size=world, **kwargs) for r in range(world)]
    for s in out:
        if state is not None:
            s.load_state_dict(state)
    return out


def run_steps(ranks: list[ResumableSampler], steps: int, batch: int) -> list[int]:
    """Each rank reads `batch` samples per step, as a DataLoader would; then all advance."""
    seen = []
    for _ in range(steps):
        for s in ranks:
            seen += s.indices(batch).tolist()
        for s in ranks:
            s.advance(batch * len(ranks))
    return seen


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 120),
    before=st.integers(1, 4),
    after=st.integers(1, 4),
    batch=st.integers(1, 6),
    data=st.data(),
)
def test_resume_with_another_world_size_reads_each_sample_once(n, before, after, batch, data):
    steps = data.draw(st.integers(0, (n - 1) // (batch * before)))  # stay inside the epoch
    first = samplers(n, before)
    seen = run_steps(first, steps, batch)
    state = first[0].state_dict()
    assert state == first[-1].state_dict()  # every rank holds the same state
    assert state["epoch"] == 0 and state["position"] == steps * batch * before
    resumed = samplers(n, after, state)
    rest = [i for s in resumed for i in s]  # each rank iterates to the end of the epoch
    assert sorted(seen + rest) == list(range(n))


@given(n=st.integers(1, 60), world=st.integers(1, 4), batch=st.integers(1, 5))
def test_epoch_rollover_and_new_order(n, world, batch):
    ranks = samplers(n, world)
    for epoch in range(2):
        seen = []
        while ranks[0].epoch == epoch:
            seen += run_steps(ranks, 1, batch)
        assert sorted(seen) == list(range(n))
        assert all(s.position == 0 and s.epoch == epoch + 1 for s in ranks)


def test_each_epoch_has_its_own_permutation():
    orders = [epoch_order(1000, seed=3, epoch=e) for e in range(3)]
    assert all(sorted(o.tolist()) == list(range(1000)) for o in orders)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert np.array_equal(orders[2], epoch_order(1000, seed=3, epoch=2))
    assert not np.array_equal(orders[0], epoch_order(1000, seed=4, epoch=0))


def test_indices_are_a_function_of_the_state():
    a = ResumableSampler(50, seed=1, rank=1, world_size=3)
    a.advance(9)
    b = ResumableSampler(50, seed=99, rank=1, world_size=3)
    b.load_state_dict(a.state_dict())
    assert b.seed == 1 and b.indices(4).tolist() == a.indices(4).tolist()
    assert a.indices(4).tolist() == epoch_order(50, 1, 0)[10:22:3].tolist()
    assert a.indices(4).tolist() == a.indices(4).tolist()  # reading does not advance


def test_drop_last_gives_every_rank_the_same_count():
    ranks = samplers(10, 3, drop_last=True)
    assert [len(s) for s in ranks] == [3, 3, 3]
    assert len({i for s in ranks for i in s}) == 9
    keep = samplers(10, 3)
    assert [len(s) for s in keep] == [4, 3, 3]


def test_state_for_other_data_is_refused():
    state = ResumableSampler(10).state_dict()
    with pytest.raises(ValueError, match="num_samples=10"):
        ResumableSampler(11).load_state_dict(state)
    grouped = ResumableSampler(10, lengths=list(range(10)), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        grouped.load_state_dict(state)


@settings(deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), min_size=1, max_size=300),
    group=st.integers(1, 16),
    seed=st.integers(0, 3),
)
def test_length_grouped_order_is_a_permutation_of_sorted_groups(lengths, group, seed):
    order = length_grouped_order(lengths, seed, 0, group)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    assert np.array_equal(order, length_grouped_order(lengths, seed, 0, group))
    lengths = np.asarray(lengths)
    for k in range(0, len(order) - len(order) % group, group):
        run = lengths[order[k : k + group]]
        assert (np.diff(run) <= 0).all()  # each group is one sorted slice of a window


def test_grouped_sampler_resumes_across_world_sizes():
    lengths = np.random.default_rng(0).integers(1, 300, 103)
    kwargs = {"lengths": lengths, "group_size": 8}
    first = samplers(103, 2, **kwargs)
    seen = run_steps(first, 3, 4)
    resumed = samplers(103, 4, first[0].state_dict(), **kwargs)
    assert sorted(seen + [i for s in resumed for i in s]) == list(range(103))


def test_grouped_resume_with_another_global_batch_keeps_the_runs_groups():
    # 2 ranks x 4 (groups of 8) resumed by one process x 4: the new sampler is built with
    # group_size 4 and adopts the saved 8, so the order and the saved position still agree.
    lengths = np.random.default_rng(1).integers(1, 300, 90)
    first = samplers(90, 2, lengths=lengths, group_size=8)
    seen = run_steps(first, 3, 4)
    resumed = samplers(90, 1, first[0].state_dict(), lengths=lengths, group_size=4)
    assert resumed[0].group_size == 8
    rest = list(resumed[0])
    assert sorted(seen + rest) == list(range(90))
    order = length_grouped_order(lengths, 7, 0, 8).tolist()
    assert sorted(seen) == sorted(order[:24]) and rest == order[24:]


def test_works_as_a_dataloader_sampler():
    sampler = ResumableSampler(20, seed=0, rank=0, world_size=2)
    loader = DataLoader(torch.arange(100, 120), batch_size=4, sampler=sampler)
    batches = []
    for batch in loader:
        batches.append(batch)
        sampler.advance(4 * 2)
    assert torch.cat(batches).tolist() == (100 + epoch_order(20, 0, 0)[0::2]).tolist()
    assert sampler.epoch == 1 and sampler.position == 0
