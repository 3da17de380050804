"""Continuous batching at the token level: every request, whenever it arrives and whoever it
shares the batch with, decodes exactly what `generate` decodes for it alone."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from minimind.infer import GenerationConfig, generate
from minimind.infer.batcher import Batcher, QueueFull
from minimind.infer.prefix_cache import PrefixCache
from minimind.infer.sampling import choose
from minimind.model import MiniMindForCausalLM, preset


@pytest.fixture(scope="module")
def model() -> MiniMindForCausalLM:
    # As in test_generate: an untied, wide init gives varied greedy tokens.
    torch.manual_seed(0)
    return MiniMindForCausalLM(
        preset("tiny", tie_word_embeddings=False, initializer_range=0.1)
    ).eval()


class Collect:
    """A sink that records tokens and the finish reason."""

    def __init__(self):
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()

    def __call__(self, token, reason):
        assert self.reason is None, "a sink call after the last token"
        if token is not None:
            self.tokens.append(token)
        if reason is not None:
            self.reason = reason
            self.done.set()


def run(batcher: Batcher, schedule, on_step=None) -> list[Collect]:
    """schedule: [(arrival step, prompt, config)]; steps the batcher by hand until idle."""
    sinks = [Collect() for _ in schedule]
    step = 0
    while step <= max(s[0] for s in schedule) or not batcher.idle:
        for (at, prompt, cfg), sink in zip(schedule, sinks):
            if at == step:
                sink.request = batcher.submit(prompt, cfg, sink)
        batcher.step()
        if on_step is not None:
            on_step(batcher)
        step += 1
    return sinks


def assert_alone(model, schedule, sinks):
    for (_, prompt, cfg), sink in zip(schedule, sinks):
        alone = generate(model, [prompt], cfg)[0]
        assert sink.tokens == alone, (prompt, cfg)
        assert sink.reason == alone.finish_reason


GREEDY = GenerationConfig(max_new_tokens=9, temperature=0, stop_token_ids=())


def sampled(seed: int, **kw) -> GenerationConfig:
    kw = dict(max_new_tokens=9, temperature=1.0, top_k=40, top_p=0.9, stop_token_ids=(), **kw)
    return GenerationConfig(seed=seed, **kw)


PROMPTS = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [300, 17], [42] * 5, [7, 8]]

PATTERNS = {
    # everything at step 0
    "together": [(0, p, GREEDY) for p in PROMPTS],
    # one per step, short and long prompts alternating: new rows merge into a running cache
    # both shorter and longer than theirs
    "staggered": [(i, p, GREEDY if i % 2 else sampled(i)) for i, p in enumerate(PROMPTS)],
    # a long prompt joins late, then a short one after the first rows have finished
    "late": [(0, PROMPTS[1], GREEDY), (3, PROMPTS[2], sampled(3)), (12, PROMPTS[3], GREEDY)],
    # more requests than rows: they queue, and join as rows free up
    "queued": [(0, p, sampled(10 + i)) for i, p in enumerate(PROMPTS)]
    + [(2, p, GREEDY) for p in PROMPTS],
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", [3, 16])
@pytest.mark.parametrize("waste", [4096, 0])
def test_requests_decode_as_alone(model, pattern, rows, waste):
    # waste 0: every admission opens a cache group while fewer than 3 run, then joins the
    # group that wastes least, so rows decode across several groups and are merged into them
    schedule = PATTERNS[pattern]
    batcher = Batcher(model, max_rows=rows, growth=4, group_waste=waste, max_groups=3)
    peak, groups = [], []

    def check(b):
        peak.append(b.stats()["running"])
        groups.append(b.stats()["cache_groups"])

    sinks = run(batcher, schedule, on_step=check)
    assert_alone(model, schedule, sinks)
    assert 2 <= max(peak) <= rows  # rows really shared steps, never more than max_rows
    assert max(groups) <= 3
    if not waste and pattern in ("staggered", "late"):  # arrivals into running rows
        assert max(groups) >= 2
    assert batcher.stats()["tokens"] == sum(len(s.tokens) for s in sinks)


def test_processors_stops_and_length_per_row(model):
    free = generate(model, [PROMPTS[0]], GREEDY)[0]
    cfgs = [
        GenerationConfig(max_new_tokens=9, temperature=0, stop_token_ids=(free[3],)),
        GenerationConfig(
            max_new_tokens=9, temperature=0, stop_token_ids=(free[0],), min_new_tokens=4
        ),
        GenerationConfig(max_new_tokens=12, temperature=0, presence_penalty=1e4),
        GenerationConfig(max_new_tokens=12, temperature=0, repetition_penalty=3.0),
        sampled(5, frequency_penalty=0.5, presence_penalty=0.5),
        GenerationConfig(max_new_tokens=4, temperature=0.7, seed=2),  # model eos stops
        GenerationConfig(max_new_tokens=1, temperature=0),  # finishes at its prefill
        GenerationConfig(max_new_tokens=50, temperature=0, max_len=8, stop_token_ids=()),
    ]
    schedule = [(i % 3, PROMPTS[0] if i < 2 else PROMPTS[i % 6], c) for i, c in enumerate(cfgs)]
    sinks = run(Batcher(model, max_rows=4, growth=2), schedule)
    assert_alone(model, schedule, sinks)
    assert sinks[0].reason == "stop" and len(sinks[0].tokens) == 4
    assert len(sinks[-1].tokens) == 8 - len(schedule[-1][1])  # capped by its max_len


def test_memory_stays_bounded_and_dead_slots_are_trimmed(model):
    # Staggered long and short rows with small growth: the cache never holds much more than
    # its longest live row, however many tokens went through it.
    schedule = [(4 * i, PROMPTS[i % 6], GREEDY) for i in range(12)]
    seen = []

    def check(b):
        s = b.stats()
        seen.append(s["cache_capacity"])
        assert s["cache_capacity"] <= len(PROMPTS[2]) + 9 + 4

    sinks = run(Batcher(model, max_rows=2, growth=4), schedule, on_step=check)
    assert_alone(model, schedule, sinks)
    assert max(seen) > 0


def test_cancel_removes_the_row_and_spares_the_others(model):
    batcher = Batcher(model, max_rows=4)
    sinks = [Collect() for _ in range(3)]
    reqs = [batcher.submit(p, GREEDY, s) for p, s in zip(PROMPTS, sinks)]
    for _ in range(3):
        batcher.step()
    assert batcher.stats()["running"] == 3
    reqs[1].cancel()
    batcher.step()
    assert batcher.stats()["running"] == 2 and batcher.stats()["cancelled"] == 1
    while not batcher.idle:
        batcher.step()
    assert len(sinks[1].tokens) == 3 and sinks[1].reason is None
    for prompt, sink in zip([PROMPTS[0], PROMPTS[2]], [sinks[0], sinks[2]]):
        assert sink.tokens == generate(model, [prompt], GREEDY)[0]


def test_bounded_queue_and_validation(model):
    batcher = Batcher(model, max_rows=1, max_waiting=2)
    a = batcher.submit([1], GREEDY, Collect())
    batcher.submit([2], GREEDY, Collect())
    with pytest.raises(QueueFull):
        batcher.submit([3], GREEDY, Collect())
    a.cancel()  # a waiting request leaves the queue at once
    batcher.submit([3], GREEDY, Collect())
    assert batcher.stats()["waiting"] == 2
    with pytest.raises(ValueError, match="no room"):
        batcher.submit([1] * 1024, GREEDY, Collect())
    with pytest.raises(ValueError, match="token ids"):
        batcher.submit([512], GREEDY, Collect())
    with pytest.raises(ValueError, match="token ids"):
        batcher.submit([], GREEDY, Collect())


def test_a_raising_sink_cancels_only_its_request(model):
    def bad(token, reason):
        raise RuntimeError("client went away")

    good = Collect()
    batcher = Batcher(model)
    batcher.submit(PROMPTS[0], GREEDY, bad)
    batcher.submit(PROMPTS[1], GREEDY, good)
    while not batcher.idle:
        batcher.step()
    assert good.tokens == generate(model, [PROMPTS[1]], GREEDY)[0]
    assert batcher.stats()["cancelled"] == 1


def test_worker_thread_serves_concurrent_submitters(model):
    batcher = Batcher(model, max_rows=5).start()
    jobs = [(PROMPTS[i % 6], sampled(i) if i % 2 else GREEDY) for i in range(20)]
    sinks = [Collect() for _ in jobs]

    def client(i):
        batcher.submit(jobs[i][0], jobs[i][1], sinks[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s.done.wait(30) for s in sinks)
    assert_alone(model, [(0, *job) for job in jobs], sinks)
    # A failing forward fails the running requests with "error"; the worker goes on.
    broken = Collect()
    forward = model.forward
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        req = batcher.submit(PROMPTS[0], GREEDY, broken)
        assert broken.done.wait(10) and broken.reason == "error"
        assert str(req.error) == "boom"
    finally:
        del model.forward
    assert model.forward == forward
    again = Collect()
    batcher.submit(PROMPTS[0], GREEDY, again)
    assert again.done.wait(10) and again.tokens == generate(model, [PROMPTS[0]], GREEDY)[0]
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(PROMPTS[0], GREEDY, Collect())


def test_sampling_draws_each_token_with_its_probability():
    # sampling.choose samples by inverse transform (one uniform per row, so the batcher can
    # draw each row from its own generator): check the frequencies, and that a token of
    # probability 0 is never drawn, even at u = 0.
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = p.log().expand(40000, 5)
    tok = choose(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=5) / len(tok)
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    assert freq[4] == 0
    zeros = choose(torch.tensor([[-math.inf, 0.0, 0.0]]), 1.0, uniform=torch.zeros(1, 1))
    assert zeros.tolist() == [1]
    # temperature 0.5 squares the probabilities (then renormalises)
    tok = choose(logits, 0.5, generator=torch.Generator().manual_seed(1))
    want = p**2 / (p**2).sum()
    torch.testing.assert_close(torch.bincount(tok, minlength=5) / len(tok), want, atol=0.01, rtol=0)


# --- chunked prefill and prefix sharing -----------------------------------------------------

LONG = [(7 * i + 3) % 500 + 1 for i in range(70)]  # a prompt many chunks long
SYSTEM = [(11 * i + 5) % 500 + 1 for i in range(40)]  # a shared prefix: two full blocks and more


SCHEDULE_LONG = [
    (0, PROMPTS[0], GenerationConfig(max_new_tokens=120, temperature=0, stop_token_ids=())),
    (0, PROMPTS[2], sampled(1)),
    (2, LONG, GREEDY),
    (3, LONG[5:50], sampled(2)),
    (3, PROMPTS[3], GREEDY),
    (4, [9, 8, 7, *LONG], GREEDY),
]


@pytest.mark.parametrize("chunk", [4, 13, None])
def test_chunked_prefill_decodes_as_whole_and_bounds_each_step(model, chunk):
    # Long prompts arrive while rows decode, short ones behind them: every row decodes what it
    # decodes alone (so what an unchunked prefill gives it, chunk None), each step with rows
    # decoding prefills at most `chunk` prompt tokens, and the running rows get a token every
    # step while a long prompt is prefilled. A long prompt gets a cache group of its own (the
    # short rows do not attend over its length), which goes when it finishes.
    batcher = Batcher(model, max_rows=8, growth=4, prefill_chunk=chunk, group_waste=16)
    before = {"prefill_tokens": 0, "tokens": 0, "running": 0}
    during = []  # per step with a chunked prompt in progress: did every running row decode?

    def check(b):
        s = b.stats()
        if chunk and before["running"]:  # the background row runs to the end
            assert s["prefill_tokens"] - before["prefill_tokens"] <= chunk
        if s["prefilling"] and before["running"]:
            during.append(s["tokens"] - before["tokens"] >= before["running"])
        before.update(s)

    groups = []
    sinks = run(
        batcher,
        SCHEDULE_LONG,
        on_step=lambda b: (check(b), groups.append(b.stats()["cache_groups"])),
    )
    assert_alone(model, SCHEDULE_LONG, sinks)
    assert max(groups) >= 2 and groups[-1] == 0
    if chunk:
        assert len(during) > 5 and all(during)
        assert batcher.stats()["prefill_chunks"] >= 2 * len(LONG) // chunk
    else:
        assert not during and batcher.stats()["prefill_chunks"] == 0


def test_no_chunking_without_rows_to_protect(model):
    # With no row decoding, a long prompt is prefilled whole: chunks would only delay it.
    batcher = Batcher(model, prefill_chunk=4)
    sinks = run(batcher, [(0, LONG, GREEDY)])
    assert_alone(model, [(0, LONG, GREEDY)], sinks)
    assert batcher.stats()["prefill_chunks"] == 0


def test_n_choices_share_one_prefill(model):
    # The n choices of one request wait one after another with the same prompt: one prefill,
    # its cache row copied per choice; each choice still decodes as alone (greedy and seeded).
    # With share_prompts off each choice prefills the prompt itself, to the same tokens.
    cfgs = [GREEDY, sampled(3), sampled(4), GREEDY]
    for chunk in (None, 8):
        for share in (True, False):
            batcher = Batcher(model, max_rows=8, prefill_chunk=chunk, share_prompts=share)
            schedule = [(0, PROMPTS[0], GREEDY)] + [(1, LONG, c) for c in cfgs]
            sinks = run(batcher, schedule)
            assert_alone(model, schedule, sinks)
            copies = 1 if share else len(cfgs)
            assert batcher.stats()["prefill_tokens"] == len(PROMPTS[0]) + copies * len(LONG)


@pytest.mark.parametrize("chunk", [None, 7])
def test_prefix_cache_serves_a_shared_prefix(model, chunk):
    # Prompts that share SYSTEM decode as alone; after the first, each reads the whole blocks
    # of SYSTEM from the cache (request.cached), whether prefilled whole or in chunks.
    tails = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [2]]
    schedule = [(3 * i, SYSTEM + t, GREEDY if i % 2 else sampled(i)) for i, t in enumerate(tails)]
    batcher = Batcher(model, max_rows=4, prefill_chunk=chunk, prefix_cache_tokens=256)
    sinks = run(batcher, schedule)
    assert_alone(model, schedule, sinks)
    assert [s.request.cached for s in sinks] == [0, 32, 32, 32]
    s = batcher.stats()
    assert s["cached_tokens"] == 96
    assert s["prefill_tokens"] == sum(len(p) for _, p, _ in schedule) - 96
    # the third prompt is 56 tokens: three whole blocks cached, the longest prompt so far
    assert s["prefix_cache_tokens"] == 48


def test_prefix_cache_off_and_short_prompts(model):
    # The last prompt token is always fed (its logits choose the first token), so a prompt of
    # exactly one block reads at most 15 tokens from the cache; without the cache none.
    batcher = Batcher(model, prefix_cache_tokens=64)
    block = SYSTEM[:16]
    reqs = [batcher.submit(block, GREEDY, Collect()) for _ in range(1)]
    while not batcher.idle:
        batcher.step()
    reqs.append(batcher.submit(block, GREEDY, Collect()))
    while not batcher.idle:
        batcher.step()
    assert [r.cached for r in reqs] == [0, 15]
    off = Batcher(model)
    assert "prefix_cache_tokens" not in off.stats()
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        Batcher(model, prefix_cache_tokens=-1)


def test_prefix_cache_lru_keeps_prefixes_whole_and_bounded():
    # kv (layers 1, 2, K 1, L, D 1) whose value at slot i is i + 100 * prompt: a slice shows
    # which prompt and slots it came from.
    def kv(prompt_id, n):
        return (
            (torch.arange(n, dtype=torch.float32) + 100 * prompt_id)
            .view(1, 1, 1, n, 1)
            .expand(1, 2, 1, n, 1)
        )

    a, b, c = [1] * 16 + [2] * 16 + [3] * 5, [1] * 16 + [4] * 16, [5] * 32
    cache = PrefixCache(max_tokens=64, block=16)
    assert cache.put(a, kv(1, len(a))) == 2  # whole blocks only
    assert cache.put(b, kv(2, len(b))) == 1  # its first block is a's
    assert cache.tokens == 48 and cache.match(b) == 32 and cache.match(a, 20) == 20
    got = cache.get(b, 20)  # b's first block from a, the rest from b
    assert got[0, 0, 0, :, 0].tolist() == list(range(100, 116)) + list(range(216, 220))
    assert cache.match([1] * 16 + [9] * 16) == 16 and cache.match([7] * 40) == 0
    # c needs two blocks: the least recently used leaf goes first (a's second block: b was
    # used later), never a block that still has children (the shared first block).
    cache.put(c, kv(3, 32))
    assert cache.tokens == 64 and cache.evicted == 1
    assert cache.match(a) == 16 and cache.match(b) == 32 and cache.match(c) == 32
    for prompt in ([6] * 48, [8] * 64, [9] * 200):  # bounded whatever is put
        cache.put(prompt, kv(4, len(prompt)))
        assert cache.tokens <= 64
    assert cache.match([9] * 200) == 64  # a prompt longer than the cache keeps its start
    assert PrefixCache(max_tokens=15).put(a, kv(1, len(a))) == 0  # less than a block: off


def test_a_failing_chunk_fails_its_step_and_the_worker_goes_on(model):
    # A chunk's forward raises: the chunked request and the rows of that step get "error" once
    # each; the next request is served as usual.
    forward = model.forward

    def chunk_fails(ids, *a, **k):
        if ids.shape == (1, 4):
            raise RuntimeError("chunk boom")
        return forward(ids, *a, **k)

    batcher = Batcher(model, prefill_chunk=4).start()
    running, long = Collect(), Collect()
    cfg = GenerationConfig(max_new_tokens=200, temperature=0, stop_token_ids=())
    batcher.submit(PROMPTS[0], cfg, running)
    while not running.tokens:  # decoding: the long prompt will go in chunks
        threading.Event().wait(0.001)
    model.forward = chunk_fails
    try:
        batcher.submit(LONG, GREEDY, long)
        assert long.done.wait(10) and running.done.wait(10)
    finally:
        del model.forward
    assert (long.reason, running.reason) == ("error", "error")
    again = Collect()
    batcher.submit(LONG, GREEDY, again)
    assert again.done.wait(10) and again.tokens == generate(model, [LONG], GREEDY)[0]
    assert batcher.stats()["prefill_chunks"] == 0  # alone, LONG went whole
    batcher.close()
