"""Generation: cache vs recompute parity (also for models loaded from every folder kind), left
padding, stopping, seeding, processors, streaming."""

from __future__ import annotations

import pytest
import torch

from minimind.checkpoint import save_checkpoint
from minimind.convert import export_hf_folder
from minimind.infer import GenerationConfig, generate, stream
from minimind.infer.load import load_model
from minimind.infer.sampling import (
    choose,
    presence_frequency_penalty,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from minimind.model import KVCache, MiniMindForCausalLM, preset

PROMPTS = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6], [300, 17]]


@pytest.fixture(scope="module")
def model() -> MiniMindForCausalLM:
    # Untied head and a wider init: a random tiny model then gives varied greedy tokens
    # instead of echoing its input.
    torch.manual_seed(0)
    cfg = preset("tiny", tie_word_embeddings=False, initializer_range=0.1)
    return MiniMindForCausalLM(cfg).eval()


@torch.inference_mode()
def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    """Reference: rerun the whole sequence every step and take the last argmax."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_with_cache_equals_recompute(model):
    for prompt in PROMPTS:
        out = generate(model, [prompt], max_new_tokens=12, temperature=0, stop_token_ids=())
        assert out == [greedy_without_cache(model, prompt, 12)]
        assert out[0].finish_reason == "length"


def test_left_padded_batch_equals_each_prompt_alone(model):
    alone = [generate(model, [p], max_new_tokens=10, temperature=0)[0] for p in PROMPTS]
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=0) == alone
    assert len({tuple(a) for a in alone}) == len(PROMPTS)  # the rows really differ


def test_stop_tokens_end_rows_and_survivors_are_unchanged(model, monkeypatch):
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop_token_ids=())
    # Stop row 0 at its 3rd token and row 2 at its 6th: finished rows are dropped from the
    # cache, which must not change what the other rows generate.
    stops = (free[0][2], free[2][5])
    kept = []
    reorder = KVCache.reorder
    monkeypatch.setattr(KVCache, "reorder", lambda c, i: (kept.append(len(i)), reorder(c, i)))
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop_token_ids=stops)
    assert kept and kept[0] < len(PROMPTS)
    for got, full in zip(out, free):
        cut = next((i + 1 for i, tok in enumerate(full) if tok in stops), len(full))
        assert got == full[:cut]
        assert got.finish_reason == ("stop" if got[-1] in stops else "length")
    assert out[0].finish_reason == "stop" and out[0][-1] == stops[0]


def test_all_rows_stopping_ends_early(model):
    first = generate(model, [PROMPTS[0]], max_new_tokens=1, temperature=0)[0][0]
    out = generate(model, [PROMPTS[0]], max_new_tokens=50, temperature=0, stop_token_ids=[first])
    assert out == [[first]] and out[0].finish_reason == "stop"


def test_min_new_tokens_suppresses_stop(model):
    first = generate(model, [PROMPTS[0]], max_new_tokens=1, temperature=0)[0][0]
    out = generate(
        model,
        [PROMPTS[0]],
        max_new_tokens=5,
        temperature=0,
        stop_token_ids=[first],
        min_new_tokens=5,
    )[0]
    assert len(out) == 5 and first not in out and out.finish_reason == "length"


def test_max_len_bounds_the_output(model):
    out = generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=50, temperature=0, max_len=8)[0]
    assert len(out) == 3 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="no room"):
        generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=5, max_len=5)


def test_seeded_sampling_is_reproducible_and_private(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, stop_token_ids=())
    rng = torch.get_rng_state()
    a = generate(model, PROMPTS, seed=1, **kw)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched
    assert generate(model, PROMPTS, seed=1, **kw) == a
    assert generate(model, PROMPTS, seed=2, **kw) != a


def test_presence_penalty_forbids_repeats(model):
    # Tokens already generated lose 1e4: greedy then never repeats one.
    out = generate(
        model, [[9]], max_new_tokens=40, temperature=0, presence_penalty=1e4, stop_token_ids=()
    )[0]
    assert len(set(out)) == len(out) == 40


def test_repetition_penalty_covers_the_prompt(model):
    # The greedy first token, put into the prompt and heavily penalised, is no longer chosen.
    first = generate(model, [[9]], max_new_tokens=1, temperature=0)[0][0]
    out = generate(model, [[first, 9]], max_new_tokens=1, temperature=0, repetition_penalty=1e6)
    assert out[0][0] != first


def test_stream_yields_the_tokens_of_generate(model):
    kw = dict(max_new_tokens=8, temperature=0.8, seed=3)
    free = generate(model, PROMPTS, stop_token_ids=(), **kw)
    stops = (free[1][1],)
    rows = [[] for _ in PROMPTS]
    reasons = [None] * len(PROMPTS)
    for step in stream(model, PROMPTS, GenerationConfig(stop_token_ids=stops, **kw)):
        assert len(step.tokens) == len(step.finish_reasons) == len(PROMPTS)
        for i, (tok, why) in enumerate(zip(step.tokens, step.finish_reasons)):
            assert (tok is None) == (reasons[i] is not None)  # None exactly after finishing
            if tok is not None:
                rows[i].append(tok)
            reasons[i] = reasons[i] or why
    out = generate(model, PROMPTS, stop_token_ids=stops, **kw)
    assert rows == out
    assert reasons == [c.finish_reason for c in out]
    assert reasons[1] == "stop"


def test_runs_in_the_model_dtype(model):
    half = MiniMindForCausalLM(model.config).to(torch.bfloat16).eval()
    out = generate(half, PROMPTS, max_new_tokens=4, seed=0, stop_token_ids=())
    assert [len(o) for o in out] == [4] * len(PROMPTS)


# --- models loaded from files, as the chat CLI and the server load them --------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, one_thread) -> dict[str, MiniMindForCausalLM]:
    """One tiny random model (O(1) activations, so greedy tokens vary), written as each kind of
    folder a user may hold and loaded back by the inference loader: our checkpoint, MiniMind2's
    transformers folder (model_type "minimind", dense and MoE), our Llama export.

    MiniMind2's own modeling code under transformers 5 drops its KV cache and generates wrong
    text; we never run it, we load the weights into our model: this checks that decoding
    them with our cache gives what recomputing the whole sequence gives.
    """
    pytest.importorskip("transformers")
    from tests.test_convert import make, write_minimind2_folder, write_tokenizer

    root = tmp_path_factory.mktemp("loaded")
    tok = write_tokenizer(root / "tok")
    dense, moe = make("dense", seed=5), make("moe_shared", seed=6)
    with torch.no_grad():
        for m in (dense, moe):
            # Tied head: with N(0, 1) embeddings the residual is the input token and greedy
            # echoes it; smaller embeddings let the layers speak.
            m.model.embed_tokens.weight.mul_(0.1)
    for p in [*dense.parameters(), *moe.parameters()]:
        p.data = p.data.half().float()  # MiniMind2 folders hold fp16
    write_minimind2_folder(dense, root / "MiniMind2", safetensors=True)
    write_minimind2_folder(moe, root / "MiniMind2-MoE", safetensors=False)
    save_checkpoint(root / "ours", dense, tokenizer_dir=tok)
    export_hf_folder(dense, root / "llama", tok, torch.float32)
    names = ("MiniMind2", "MiniMind2-MoE", "ours", "llama")
    return {name: load_model(root / name, tokenizer=tok, device="cpu") for name in names}


@pytest.mark.parametrize("name", ["MiniMind2", "MiniMind2-MoE", "ours", "llama"])
def test_loaded_models_greedy_with_cache_equals_recompute(loaded, name):
    model = loaded[name].model
    assert loaded[name].kind == ("minimind" if name == "ours" else "hf")
    expected = [greedy_without_cache(model, p, 32) for p in PROMPTS]
    assert all(len(set(e)) > 5 for e in expected)  # varied text, not one token repeated
    cfg = GenerationConfig(max_new_tokens=32, temperature=0, stop_token_ids=())
    for prompt, tokens in zip(PROMPTS, expected):
        assert generate(model, [prompt], cfg) == [tokens]
    # one left-padded batch (rows of 1 to 6 tokens): each row as it is alone
    assert generate(model, PROMPTS, cfg) == expected


# --- the logits processors, on hand-made logits ---------------------------------------------


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.15, 0.1, 0.05]]).log()
    kept = lambda p: top_p_filter(logits, p).isfinite().tolist()  # noqa: E731
    assert kept(0.5) == [[False, True, False, True], [True, False, False, False]]
    assert kept(0.7) == [[False, True, False, True], [True, False, False, False]]
    assert kept(0.75) == [[False, True, True, True], [True, True, False, False]]
    assert kept(1.0) == [[True] * 4] * 2
    # Kept logits are unchanged.
    assert torch.equal(top_p_filter(logits, 0.5)[0, 1], logits[0, 1])


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.0, 1.0]])
    assert top_k_filter(logits, 2).isfinite().tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 99), logits)
    # Sampling with top_k=1 is greedy whatever the seed.
    g = torch.Generator().manual_seed(0)
    assert [int(choose(logits, 5.0, top_k=1, generator=g)) for _ in range(20)] == [1] * 20


def test_repetition_penalty_is_sign_aware():
    logits = torch.tensor([[4.0, -4.0, 4.0, -4.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[2.0, -8.0, 4.0, -4.0, 0.0]]
    assert repetition_penalty(logits, seen, 0.5).tolist() == [[8.0, -2.0, 4.0, -4.0, 0.0]]


def test_presence_and_frequency_penalties():
    counts = torch.tensor([[0.0, 1.0, 2.0]])
    out = presence_frequency_penalty(torch.ones(1, 3), counts, presence=1.0, frequency=0.5)
    assert out.tolist() == [[1.0, -0.5, -1.0]]
    # Negative values encourage repetition, as in OpenAI's API.
    out = presence_frequency_penalty(torch.zeros(1, 3), counts, presence=-1.0, frequency=0.0)
    assert out.tolist() == [[0.0, 1.0, 1.0]]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.75, 0.25]]).log().expand(4000, 2)
    g = torch.Generator().manual_seed(0)
    share = choose(logits, 1.0, generator=g).float().mean().item()
    assert 0.22 < share < 0.28


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
    ],
)
def test_bad_arguments_raise(model, kwargs, message):
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**args)
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2]], **args)


@pytest.mark.parametrize("prompts", [[], [[]], [[1], []], [[1, 512]], [[-1]]])
def test_bad_prompts_raise(model, prompts):
    with pytest.raises(ValueError, match="prompt"):
        generate(model, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt"):
        stream(model, prompts, max_new_tokens=2)  # at the call, before any step
