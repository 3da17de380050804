"""Fixed-shape decode steps (StaticKVCache + MiniMindForCausalLM.decode_step): the same logits
as the ordinary cached path, for dense, q/k-norm and MoE models and left-padded batches; and a
compiled step captured once gives the same tokens."""

from __future__ import annotations

import pytest
import torch

from minimind.model import MiniMindForCausalLM, preset

CONFIGS = {
    "dense": {},
    "qk_norm": {"qk_norm": True},
    "moe": {"use_moe": True, "n_routed_experts": 4, "n_shared_experts": 1},
}


def build(name: str) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(preset("tiny", **CONFIGS[name])).eval()


def prompts_batch(b: int, t: int, vocab: int):
    """Left-padded ids (b, t) and mask (b, t): row i has t - 3 * i real tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, : 3 * i] = False
    return ids, mask


@torch.inference_mode()
def run(model, ids, mask, steps: int, static: bool, step_fn=None):
    """Greedy decode; -> (tokens (B, steps), logits of every step (steps, B, V))."""
    b, t = ids.shape
    cache = model.new_cache(b, t + steps + 1, static=static)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        tok = logits.argmax(-1)
        tokens.append(tok)
        if static:
            logits = (step_fn or model.decode_step)(tok[:, None], cache)
            cache.advance_host()
        else:
            logits = model(tok[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
        all_logits.append(logits)
    return torch.stack(tokens, 1), torch.stack(all_logits)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_steps_equal_the_ordinary_path(name):
    model = build(name)
    ids, mask = prompts_batch(3, 12, model.config.vocab_size)
    ref_tokens, ref_logits = run(model, ids, mask, 20, static=False)
    tokens, logits = run(model, ids, mask, 20, static=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_static_cache_state():
    model = build("dense")
    cache = model.new_cache(2, 16, static=True)
    ids, mask = prompts_batch(2, 5, model.config.vocab_size)
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=cache)
        assert cache.length == 5 and int(cache.slot) == 5
        model.decode_step(ids[:, -1:], cache)
        cache.advance_host()
    assert cache.length == 6 and int(cache.slot) == 6
    assert cache.seen.tolist() == [6, 3]
    assert cache.valid[:, :6].tolist() == [[True] * 6, [False] * 3 + [True] * 3]
    assert not cache.valid[:, 6:].any()


@pytest.mark.slow
def test_compiled_step_is_captured_once_and_exact():
    torch._dynamo.reset()
    model = build("dense")
    ids, mask = prompts_batch(2, 10, model.config.vocab_size)
    compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
    ref_tokens, ref_logits = run(model, ids, mask, 12, static=False)
    tokens, logits = run(model, ids, mask, 12, static=True, step_fn=compiled)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # a second generation reuses the graph: no recompilation
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run(model, ids, mask, 12, static=True, step_fn=compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before


@torch.inference_mode()
def prefill_both(model, ids, mask, capacity: int):
    """steps.prefill and the eager prefill of the same prompts, each on a fresh static cache
    of `capacity` slots, their cache bookkeeping compared -> (logits, eager logits, cache,
    eager cache)."""
    from minimind.infer.steps import prefill

    ref_cache = model.new_cache(ids.shape[0], capacity, static=True)
    ref = model(ids, attention_mask=mask, cache=ref_cache, logits_to_keep=1).logits[:, -1]
    cache = model.new_cache(ids.shape[0], capacity, static=True)
    got = prefill(model, ids, mask, cache)
    assert cache.length == ref_cache.length == int(cache.slot) == ids.shape[1]
    assert torch.equal(cache.seen, ref_cache.seen) and torch.equal(cache.valid, ref_cache.valid)
    assert cache.has_padding == ref_cache.has_padding
    return got, ref, cache, ref_cache


@pytest.mark.slow
@pytest.mark.parametrize("avoid_mkl", [False, True])
def test_compiled_prefill_serves_every_prompt_length_with_one_graph(monkeypatch, avoid_mkl):
    """steps.prefill (compile=True's prefill: a block step with the prompt length dynamic)
    gives the eager prefill's last logits and cache state, for left-padded batches and for
    prompts of many lengths, which after the first compile add no graph; a one-token prompt
    goes eager, and so does every prompt of this float32 model where layers.AVOID_MKL (no
    graph at all)."""
    from minimind.model import layers

    monkeypatch.setattr(layers, "AVOID_MKL", avoid_mkl)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model = build("dense")
    vocab = model.config.vocab_size

    def both(ids, mask):
        got, ref, cache, ref_cache = prefill_both(model, ids, mask, 32)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(cache.layers, ref_cache.layers):
            n = ids.shape[1]
            torch.testing.assert_close(a.k[:, :, :n], b.k[:, :, :n], atol=1e-5, rtol=1e-5)

    both(*prompts_batch(3, 12, vocab))  # left padding
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert (graphs > before) is not avoid_mkl
    for t in (2, 5, 9, 17):
        both(torch.randint(3, vocab, (3, t)), None)
        both(*prompts_batch(3, t + 7, vocab))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    both(torch.randint(3, vocab, (3, 1)), None)


@pytest.mark.slow
def test_compiled_prefill_of_an_int8_model_where_float32_stays_eager(monkeypatch):
    """Where layers.AVOID_MKL only a float32 model's prefill stays eager (its matmuls are
    oneDNN's); an int8 draft model's (minimind.model.quant) compiles with the length dynamic
    and gives the eager prefill's logits within bf16 rounding, left-padded or not, for prompts
    on both sides of the int8 kernel's row limit (rows: batch x length; a graph per batch size
    and side, no more: batch 1 on both sides, batch 3 always above it)."""
    from minimind.model import layers
    from minimind.model.quant import PACK_ROWS, quantize_int8

    monkeypatch.setattr(layers, "AVOID_MKL", True)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model = quantize_int8(build("dense"))
    vocab = model.config.vocab_size

    def both(ids, mask):
        got, ref, _, _ = prefill_both(model, ids, mask, 48)
        assert got.dtype == ref.dtype == torch.bfloat16
        scale = float(ref.float().abs().max())
        assert float((got.float() - ref.float()).abs().max()) <= 0.02 * scale

    for t in (PACK_ROWS + 4, 5, 2 * PACK_ROWS + 1, 9):
        both(torch.randint(3, vocab, (1, t)), None)
        both(*prompts_batch(3, t + 7, vocab))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before + 3


# --- generate() over the static cache (minimind.infer.steps) ------------------------------

PROMPTS = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]


def wide_model() -> MiniMindForCausalLM:
    # untied and widely initialised: varied greedy tokens (as in test_generate.py)
    torch.manual_seed(0)
    return MiniMindForCausalLM(preset("tiny", tie_word_embeddings=False, initializer_range=0.1))


@torch.inference_mode()
def recompute(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_generate_grows_the_cache_exactly():
    from minimind.infer import generate
    from minimind.infer.steps import CHUNK

    model = wide_model().eval()
    n = 2 * CHUNK + 20  # the capacity starts at prompt + CHUNK and doubles twice
    out = generate(model, PROMPTS, max_new_tokens=n, temperature=0, stop_token_ids=())
    assert [list(o) for o in out] == [recompute(model, p, n) for p in PROMPTS]


@pytest.mark.slow
def test_generate_compiled_equals_eager():
    from minimind.infer import generate

    model = wide_model().eval()
    eager = generate(model, PROMPTS, max_new_tokens=24, temperature=0, stop_token_ids=())
    # stop row 0 early: with compile, finished rows are decoded along, not dropped
    stops = (eager[0][3],)
    expected = generate(model, PROMPTS, max_new_tokens=24, temperature=0, stop_token_ids=stops)
    got = generate(
        model, PROMPTS, max_new_tokens=24, temperature=0, stop_token_ids=stops, compile=True
    )
    assert got == expected
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
    sampled = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    assert generate(model, PROMPTS, **sampled, compile=True) == generate(model, PROMPTS, **sampled)


@pytest.mark.slow
def test_compiled_generate_calls_with_other_shapes_stay_exact():
    """Later steps of a compiled call skip guard evaluation (steps.py): calls alternating
    between batch sizes and capacities, i.e. between cached graphs, must still each pick
    their own graph."""
    from minimind.infer import generate

    model = wide_model().eval()
    cases = [(PROMPTS[:1], 8), (PROMPTS, 8), (PROMPTS[:1], 80), (PROMPTS[:1], 8), (PROMPTS, 8)]
    for prompts, n in cases:
        kw = dict(max_new_tokens=n, temperature=0, stop_token_ids=())
        assert generate(model, prompts, **kw, compile=True) == generate(model, prompts, **kw)


@pytest.mark.slow
def test_compiled_generate_of_an_moe_model_equals_eager():
    """An MoE model's compiled steps break the graph at the expert dispatch (counts read on
    the host), so the code after the break meets new counts: steps.skip_guards leaves guard
    evaluation on for it, and compiled decoding (plain and speculative) stays exact."""
    from minimind.infer import generate

    torch.manual_seed(0)
    cfg = preset("tiny", tie_word_embeddings=False, initializer_range=0.1, **CONFIGS["moe"])
    model = MiniMindForCausalLM(cfg).eval()
    kw = dict(max_new_tokens=10, temperature=0, stop_token_ids=())
    try:
        want = generate(model, PROMPTS, **kw)
        assert generate(model, PROMPTS, **kw, compile=True) == want
        got = generate(model, PROMPTS[:1], **kw, compile=True, draft="ngram", num_draft_tokens=2)
        assert got == want[:1]
    finally:
        torch._dynamo.reset()  # its many graph-broken frames stay out of later tests' caches
