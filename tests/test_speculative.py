"""Speculative decoding (minimind/infer/speculative.py): the cache rollback it rests on, n-gram
prompt lookup, greedy output identical to plain greedy decoding (tiny random models in float64,
a tiny trained pair in float32; batch 1 and batched rows with their own accepted lengths, stop
tokens, budgets, min_new_tokens, log-probs), sampled output distributed as plain sampling (a
chi-square test over thousands of seeded rows, with a check that the test can tell two models
apart), refused inputs, and `minimind chat --draft`."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
from scipy.stats import chi2_contingency

from minimind.checkpoint import save_checkpoint
from minimind.infer import GenerationConfig, generate, stream
from minimind.infer.chat_cli import main as chat_main
from minimind.infer.speculative import check_draft, ngram_draft
from minimind.model import KVCache, MiniMindForCausalLM, preset
from tests import REPO
from tests.infer_fixtures import make_checkpoint, make_tokenizer, tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6], [300, 17], [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]


def random_model(seed: int, dtype=torch.float64, **kw) -> MiniMindForCausalLM:
    """A tiny random model with varied greedy tokens (untied head, wide init), in float64 so
    that a (B, k+1) forward and single steps agree to the last bit that an argmax can see."""
    torch.manual_seed(seed)
    cfg = preset("tiny", **{"tie_word_embeddings": False, "initializer_range": 0.1, **kw})
    return MiniMindForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="module")
def target() -> MiniMindForCausalLM:
    return random_model(0)


@pytest.fixture(scope="module")
def draft() -> MiniMindForCausalLM:
    return random_model(1, hidden_size=32, num_hidden_layers=1)


# --- the cache ------------------------------------------------------------------------------


@torch.inference_mode()
def test_rollback_forgets_tokens_per_row(target):
    """Feeding [a, b, c, d], rolling back 2 (row 0) and 1 (row 1) slots, then feeding x gives
    the logits of feeding [a, b, x] and [a, b, c, x]: positions and keys as if never fed."""
    rows = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    x = torch.tensor([[40], [41]])
    for static in (False, True):
        cache = target.new_cache(2, 16, static=static)
        target(rows, cache=cache)
        cache.rollback([2, 1])
        assert cache.length == 3 and cache.seen.tolist() == [2, 3]
        got = target(x, cache=cache).logits[:, -1]
        want0 = target(torch.tensor([[5, 6, 40]])).logits[0, -1]
        want1 = target(torch.tensor([[9, 10, 11, 41]])).logits[0, -1]
        torch.testing.assert_close(got, torch.stack([want0, want1]))
    with pytest.raises(ValueError, match="cannot drop"):
        KVCache(1, 1, 1, 1, 8).rollback([1])


@torch.inference_mode()
def test_verify_step_is_a_fixed_shape_forward(target):
    """verify_step over a StaticKVCache (the compiled verification's step) gives the logits of
    an ordinary forward for every column, writes at the device slot (rollback then decodes on
    as if the columns were never fed), and honours left padding inside the block."""
    rows = torch.tensor([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 8]])
    want = target(rows).logits
    cache = target.new_cache(2, 16, static=True)
    target(rows[:, :3], cache=cache)
    got = target.verify_step(rows[:, 3:], cache)
    cache.advance_host(3)
    torch.testing.assert_close(got, want[:, 3:])
    assert cache.length == 6 and int(cache.slot) == 6 and cache.seen.tolist() == [6, 6]
    cache.rollback([2, 1])
    mask = torch.tensor([[False, True], [True, True]])  # row 0's first column is padding
    got = target.verify_step(torch.tensor([[0, 40], [40, 41]]), cache, mask)[:, -1]
    cache.advance_host(2)
    want0 = target(torch.tensor([[5, 6, 7, 8, 40]])).logits[0, -1]
    want1 = target(torch.tensor([[3, 4, 5, 6, 7, 40, 41]])).logits[0, -1]
    torch.testing.assert_close(got, torch.stack([want0, want1]))
    assert cache.seen.tolist() == [5, 7] and int(cache.slot) == cache.length == 7


def test_ngram_draft_proposes_the_continuation_of_the_latest_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # latest 3-gram
    assert ngram_draft([4, 5, 6, 4, 5], 10) == [6, 4, 5]  # capped by what follows
    assert ngram_draft([4, 1, 9, 2], 5) == []  # no earlier occurrence of any suffix
    assert ngram_draft([7, 1, 8, 1], 2) == [8, 1]  # falls back to a 1-gram


# --- greedy: token for token ----------------------------------------------------------------


def test_greedy_equals_plain_for_every_drafter_and_k(target, draft):
    for prompt in PROMPTS:
        plain = generate(target, [prompt], max_new_tokens=24, temperature=0, stop_token_ids=())
        for drafter in ("ngram", draft, target):
            for k in (None, 1, 3):
                out = generate(
                    target,
                    [prompt],
                    max_new_tokens=24,
                    temperature=0,
                    stop_token_ids=(),
                    draft=drafter,
                    num_draft_tokens=k,
                )
                assert out == plain, (prompt, k)
                assert out[0].finish_reason == "length"
    # the target drafting for itself is always right: k + 1 tokens per forward at k = 3
    stats = generate(
        target, [[5, 6]], max_new_tokens=25, temperature=0, draft=target, num_draft_tokens=3
    )[0].speculation
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_forward == 4.0


def test_batched_rows_keep_their_own_accepted_lengths(target, draft):
    """Left-padded rows of different lengths that accept different numbers of drafts (holes in
    the cache) decode exactly as each alone; a stop token ends a row inside a verified block
    and the others go on."""
    plain = generate(target, PROMPTS, max_new_tokens=20, temperature=0, stop_token_ids=())
    for drafter in ("ngram", draft, target):
        assert (
            generate(
                target, PROMPTS, max_new_tokens=20, temperature=0, stop_token_ids=(), draft=drafter
            )
            == plain
        )
    stops = (plain[0][4], plain[2][7])
    want = generate(target, PROMPTS, max_new_tokens=20, temperature=0, stop_token_ids=stops)
    assert [c.finish_reason for c in want].count("stop") >= 2
    for drafter in ("ngram", draft, target):
        got = generate(
            target, PROMPTS, max_new_tokens=20, temperature=0, stop_token_ids=stops, draft=drafter
        )
        assert got == want and [c.finish_reason for c in got] == [c.finish_reason for c in want]
    # rows run past the first cache capacity (64 slots + drafts): regrowth keeps them exact
    long = generate(target, PROMPTS[:2], max_new_tokens=150, temperature=0, stop_token_ids=())
    assert (
        generate(
            target, PROMPTS[:2], max_new_tokens=150, temperature=0, stop_token_ids=(), draft="ngram"
        )
        == long
    )


def test_min_new_tokens_and_logprobs_as_plain(target):
    eos = generate(target, [[5, 6, 7]], max_new_tokens=6, temperature=0)[0][2]
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=(eos,), logprobs=True)
    for min_new in (0, 8):
        plain = generate(target, [[5, 6, 7]], min_new_tokens=min_new, **kw)[0]
        spec = generate(target, [[5, 6, 7]], min_new_tokens=min_new, draft=target, **kw)[0]
        assert spec == plain and spec.finish_reason == plain.finish_reason
        torch.testing.assert_close(spec.logprobs, plain.logprobs)
    assert len(plain) > 3  # min_new_tokens=8 moved the stop


def trained_pair() -> tuple[MiniMindForCausalLM, MiniMindForCausalLM, list[list[int]]]:
    """A target and a smaller draft trained briefly (float32, ~2 s) on text from a Markov
    chain over 48 tokens, each followed by one of two successors (80/20)."""
    g = torch.Generator().manual_seed(0)
    v = 48
    succ = torch.randint(3, v, (v, 2), generator=g)

    def text(n: int) -> list[int]:
        seq = torch.randint(3, v, (1,), generator=g).tolist()
        while len(seq) < n:
            seq.append(int(succ[seq[-1], int(torch.rand(1, generator=g) < 0.2)]))
        return seq

    data = torch.tensor([text(33) for _ in range(128)])
    models = []
    for seed, hidden, layers in ((0, 64, 2), (1, 32, 1)):
        torch.manual_seed(seed)
        cfg = preset("tiny", vocab_size=v, hidden_size=hidden, num_hidden_layers=layers)
        model = MiniMindForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(40):
            batch = data[(step * 32) % 128 :][:32]
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss < 1.0  # learnt (uniform: log 48 = 3.9; the chain's entropy: 0.5)
        models.append(model.eval())
    return models[0], models[1], [text(n) for n in (3, 8, 20, 5)]


def test_greedy_equals_plain_on_a_trained_pair():
    target, draft, prompts = trained_pair()
    for prompt in prompts:
        plain = generate(target, [prompt], max_new_tokens=40, temperature=0, stop_token_ids=())
        for drafter in ("ngram", draft):
            spec = generate(
                target,
                [prompt],
                max_new_tokens=40,
                temperature=0,
                stop_token_ids=(),
                draft=drafter,
            )
            assert spec == plain
    batch = generate(target, prompts, max_new_tokens=40, temperature=0, stop_token_ids=())
    spec = generate(
        target, prompts, max_new_tokens=40, temperature=0, stop_token_ids=(), draft=draft
    )
    assert spec == batch
    # the trained draft has learnt the chain's likely successors: most drafts are accepted
    stats = spec[0].speculation
    assert stats.acceptance_rate > 0.5 and stats.tokens_per_forward > 2, stats


@pytest.mark.slow
def test_compiled_speculation_equals_plain_greedy(target, draft):
    """compile=True (fixed k: a compiled (B, k + 1) verification, the draft model's compiled
    single-token steps and fixed-width pending block) gives plain greedy's tokens for n-gram
    and draft-model drafts, at batch 1 and for batched rows that accept different lengths and
    stop inside a verified block; adaptive k is refused (above)."""
    kw = dict(max_new_tokens=24, temperature=0, stop_token_ids=())
    for prompt in PROMPTS[::2]:
        plain = generate(target, [prompt], **kw)
        for drafter in ("ngram", draft, target):
            out = generate(target, [prompt], draft=drafter, num_draft_tokens=3, compile=True, **kw)
            assert out == plain, (prompt, drafter)
    stats = out[0].speculation  # the target drafting for itself: k + 1 tokens per forward
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_forward > 3.5
    prompts = PROMPTS[3:]
    plain = generate(target, prompts, max_new_tokens=20, temperature=0, stop_token_ids=())
    stops = (plain[0][5],)
    want = generate(target, prompts, max_new_tokens=20, temperature=0, stop_token_ids=stops)
    assert want[0].finish_reason == "stop"
    for drafter in ("ngram", draft):
        got = generate(
            target,
            prompts,
            max_new_tokens=20,
            temperature=0,
            stop_token_ids=stops,
            draft=drafter,
            num_draft_tokens=3,
            compile=True,
        )
        assert got == want and [c.finish_reason for c in got] == [c.finish_reason for c in want]


def test_compiled_greedy_rounds_run_as_one_graph_each(target, draft, monkeypatch):
    """compile=True greedy drafts and verifies each round in one compiled call
    (speculative.compiled_greedy_round, token ids out), for draft-model and n-gram drafts;
    min_new_tokens and log-probs take the per-forward graphs instead. Every way gives plain
    greedy's tokens (and log-probs)."""
    from minimind.infer import speculative

    calls = []
    real = speculative.compiled_greedy_round

    def counting(*args):
        fn = real(*args)

        def call(*a):
            calls.append(1)
            return fn(*a)

        return call

    monkeypatch.setattr(speculative, "compiled_greedy_round", counting)
    prompt = PROMPTS[4]  # repeats itself: n-gram drafts find matches
    kw = dict(max_new_tokens=24, temperature=0, stop_token_ids=())
    plain = generate(target, [prompt], **kw)
    for drafter in (draft, "ngram"):
        calls.clear()
        out = generate(target, [prompt], draft=drafter, num_draft_tokens=3, compile=True, **kw)
        assert out == plain
        # every round that had drafts was one call (the last round may have none to verify)
        assert 0 < len(calls) <= out[0].speculation.rounds
        if drafter is draft:
            assert len(calls) >= out[0].speculation.rounds - 1
    stop = (plain[0][4],)
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=stop, logprobs=True)
    for min_new in (0, 8):
        calls.clear()
        want = generate(target, [prompt], min_new_tokens=min_new, **kw)[0]
        spec = dict(draft=draft, num_draft_tokens=3, compile=True)
        got = generate(target, [prompt], min_new_tokens=min_new, **spec, **kw)[0]
        assert got == want and got.finish_reason == want.finish_reason and not calls
        # compiled forwards against eager ones: equal up to float reassociation
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)


# --- sampling: the target's distribution ----------------------------------------------------


def homogeneity(a: list[list[int]], b: list[list[int]], position: int) -> float:
    """Chi-square p-value that the token at `position` has one distribution in samples a and
    b (tokens seen fewer than 10 times in both together pooled into one cell)."""
    counts: dict[int, list[int]] = {}
    for i, rows in enumerate((a, b)):
        for row in rows:
            counts.setdefault(row[position], [0, 0])[i] += 1
    cells = [c for c in counts.values() if sum(c) >= 10]
    rare = [sum(c[i] for c in counts.values() if sum(c) < 10) for i in (0, 1)]
    if sum(rare):
        cells.append(rare)
    return chi2_contingency(torch.tensor(cells).T.numpy())[1]


def perturbed_pair():
    """A float64 random target of 24 ids and its copy with the head perturbed (a draft that
    agrees with it about half the time at temperature 0.9)."""
    target = random_model(0, vocab_size=24, initializer_range=0.3)
    other = copy.deepcopy(target)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        noise = torch.randn(other.lm_head.weight.shape, generator=g, dtype=torch.float64)
        other.lm_head.weight += 0.15 * noise
    return target, other


def test_sampled_tokens_follow_the_targets_distribution():
    """2,000 seeded rows of 4 tokens: the token at every position has the same distribution
    with a draft model that half agrees with the target (its head perturbed: about half the
    drafts accepted) or with n-gram drafts as with plain sampling (p > 0.001); the draft
    model's own samples fail the same test against the target's (p < 1e-6), so the test sees
    a distribution as wrong as an always-accepting rule would give."""
    target, other = perturbed_pair()
    prompt = [[3, 4, 5, 3, 4]] * 2000  # repeats: the n-gram drafter proposes
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.9, top_k=16, stop_token_ids=())
    plain = generate(target, prompt, cfg, seed=0)
    for drafter, low, high in ((other, 0.3, 0.8), ("ngram", 0.02, 0.5)):
        spec = generate(target, prompt, cfg, seed=1, draft=drafter, num_draft_tokens=2)
        stats = spec[0].speculation
        assert low < stats.acceptance_rate < high, stats
        for position in range(4):
            assert homogeneity(plain, spec, position) > 1e-3, (drafter, position)
    wrong = generate(other, prompt, cfg, seed=2)
    assert max(homogeneity(plain, wrong, i) for i in range(4)) < 1e-6
    # seeded: the same call gives the same tokens
    again = generate(target, prompt[:50], cfg, seed=3, draft=other)
    assert again == generate(target, prompt[:50], cfg, seed=3, draft=other)


# --- bad input ------------------------------------------------------------------------------


def test_refusals_name_the_reason(target):
    other_vocab = random_model(1, vocab_size=300)
    with pytest.raises(ValueError, match=r"draft \[300 tokens.*\] vs target \[512 tokens"):
        generate(target, [[1, 2]], max_new_tokens=4, draft=other_vocab)
    with pytest.raises(ValueError, match=r"draft model \(Linear\) has no KV-cache decoding path"):
        generate(target, [[1, 2]], max_new_tokens=4, draft=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"target model \(Linear\) has no KV-cache"):
        check_draft(torch.nn.Linear(2, 2), "ngram")
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.2 not supported with a draft"):
        stream(target, [[1, 2]], max_new_tokens=4, draft="ngram", repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"compile=True with a draft needs a fixed num_draft"):
        stream(target, [[1, 2]], max_new_tokens=4, draft="ngram", compile=True)
    with pytest.raises(ValueError, match=r"num_draft_tokens must be an integer in 1\.\.64"):
        GenerationConfig(max_new_tokens=4, draft="ngram", num_draft_tokens=0)
    with pytest.raises(ValueError, match="draft must be a model, 'ngram' or None, got 'bigram'"):
        GenerationConfig(max_new_tokens=4, draft="bigram")


# --- minimind chat --draft ------------------------------------------------------------------


def test_chat_draft_flags(tmp_path, capsys):
    target = make_checkpoint(tmp_path / "t")
    tok = make_tokenizer(tmp_path / "t")
    draft = save_checkpoint(tmp_path / "d", tiny_chat_model(seed=1), tokenizer_dir=tok)
    base = ["--load_from", str(target), "--device", "cpu", "--temperature", "0"]
    base += ["--max_new_tokens", "12", "--prompt", "hello there, hello there"]
    assert chat_main(base) == 0
    plain = capsys.readouterr().out.split("[Speed]")[0]
    speed = re.compile(r"\[Draft\]: acceptance \d+% \(\d+/\d+ drafted\), [\d.]+ tokens per ")
    drafts = {  # flags: how the draft is described (a model: int8 by default on a CPU)
        ("--draft", "ngram"): "n-gram prompt lookup",
        ("--draft", str(draft), "--draft_k", "2"): "int8 weights, bf16 activations, cpu)",
        ("--draft", str(draft), "--draft_dtype", "fp32"): "parameters, float32, cpu)",
    }
    for flags, described in drafts.items():
        assert chat_main([*base, *flags]) == 0
        out = capsys.readouterr()
        assert out.out.split("[Speed]")[0] == plain  # greedy: the same reply
        assert speed.search(out.out), out.out
        assert "speculative decoding, draft:" in out.err and described in out.err, out.err
    # a draft with another tokenizer is refused, naming both
    torch.manual_seed(0)
    other_tok = make_tokenizer(tmp_path / "o")  # same recipe, so change the vocabulary
    spec = json.loads((other_tok / "tokenizer.json").read_text("utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other_tok / "tokenizer.json").write_text(json.dumps(spec), "utf-8")
    alien = save_checkpoint(tmp_path / "a", tiny_chat_model(seed=1), tokenizer_dir=other_tok)
    assert chat_main([*base, "--draft", str(alien)]) == 1
    err = capsys.readouterr().err
    assert f"--draft {alien}: its tokenizer (400 tokens, {alien})" in err
    assert f"differs from the model's (400 tokens, {target})" in err
    with pytest.raises(SystemExit):
        chat_main([*base, "--draft_k", "3"])
    assert "--draft_k needs --draft" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat_main([*base, "--draft", "ngram", "--draft_dtype", "int8"])
    assert "--draft_dtype needs --draft PATH" in capsys.readouterr().err


# --- bench/decode.py's speculative mode -------------------------------------------------------


@pytest.mark.slow
def test_bench_speculative_mode_writes_its_report(tmp_path):
    """At toy size (random tiny checkpoints): every side answers both sets as plain greedy
    does, and the JSON carries acceptance rates and tokens per target forward, and the
    references (transformers on the twin; llama.cpp on the GGUF exports when installed) with
    their replies and our sides' ratios to them."""
    from importlib.util import find_spec

    target = make_checkpoint(tmp_path / "t")
    tok = make_tokenizer(tmp_path / "t")
    draft = save_checkpoint(tmp_path / "d", tiny_chat_model(seed=1), tokenizer_dir=tok)
    data = tmp_path / "chat.jsonl"
    pairs = [(f"What is {i} + {i}?", f"{i} + {i} = {2 * i}.") for i in range(8)]
    data.write_text(
        "".join(
            json.dumps(
                {
                    "conversations": [
                        {"role": "user", "content": u},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
            + "\n"
            for u, a in pairs
        ),
        "utf-8",
    )
    out = tmp_path / "spec.json"
    cmd = [sys.executable, str(REPO / "bench" / "decode.py"), "--spec-target", str(target)]
    cmd += ["--spec-draft", str(draft), "--spec-data", str(data), "--spec-prompts", "2"]
    cmd += ["--repeats", "1", "--no-compile", "--new-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["sets"]) == {"chat", "repeat"}
    for r in report["sets"].values():
        assert set(r["sides"]) == {"plain", "ngram", "draft model"}
        assert r["prefill_best_ms"] > 0
        assert all(s["same_as_plain"] for s in r["sides"].values())
        spec = r["sides"]["draft model"]
        assert 0 <= spec["acceptance_rate"] <= 1 and spec["tokens_per_target_forward"] >= 1
        refs = {"transformers"}
        if find_spec("llama_cpp") is not None:
            refs |= {"llama.cpp f32", "llama.cpp f16"}
        assert set(r["references"]) == refs
        # same weights, greedy, fp32: the references generate plain greedy's replies
        assert r["references"]["transformers"]["replies_same_as_plain"] == 2
        if "llama.cpp f32" in refs:
            assert r["references"]["llama.cpp f32"]["replies_same_as_plain"] == 2
        assert r["references"]["transformers"]["prefill_best_ms"] > 0
        assert spec["vs transformers"] > 0 and spec["decode vs transformers"] > 0
    assert "tok/fwd" in proc.stdout and "vs transformers" in proc.stdout
