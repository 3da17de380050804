"""Speculative decoding in the continuous batcher and the API server (`minimind serve --draft
PATH|ngram`): every running row's drafts are verified in one target forward per cache group,
each row keeping its own accepted length.

At the token level (Batcher driven step by step, tiny random float64 models so that a (R, T)
verification and single steps agree to the bit an argmax sees): greedy requests arriving at
different steps decode exactly what plain decoding gives them, with n-gram drafts, a draft
model and the target drafting for itself, fixed or adaptive k, across several cache groups,
while rows in one round accept different lengths; seeded sampled requests draw exactly what
`generate(..., draft=...)` draws for them alone, penalised requests decode plainly beside them,
stop tokens and budgets end rows inside a verified block. Over real HTTP (uvicorn, the
`openai` client): concurrent greedy replies of different lengths, streamed or not, equal those
of a server without a draft, /health reports the statistics, and a draft model with another
tokenizer is refused at start naming both vocabularies. bench/serve.py --draft runs end to end
(slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import openai
import pytest
import torch

from minimind.checkpoint import save_checkpoint
from minimind.infer import GenerationConfig, generate
from minimind.infer.batcher import Batcher
from minimind.infer.load import load_model
from minimind.infer.speculative import load_draft
from minimind.model import MiniMindForCausalLM, preset
from minimind.serve.openai_api import create_app
from minimind.serve.openai_api import main as serve_main
from minimind.tokenizer import load_tokenizer, train_tokenizer
from tests import REPO
from tests.serve_fixtures import HELLO, TOOLS, WEATHER, Server, train_checkpoint
from tests.test_batcher import run

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    [5, 6, 7],
    [9],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [300, 17],
    [42] * 5,
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
]


def random_model(seed: int, **kw) -> MiniMindForCausalLM:
    """A tiny random model with varied greedy tokens (untied head, wide init), float64."""
    torch.manual_seed(seed)
    cfg = preset("tiny", **{"tie_word_embeddings": False, "initializer_range": 0.1, **kw})
    return MiniMindForCausalLM(cfg).eval().to(torch.float64)


@pytest.fixture(scope="module")
def target() -> MiniMindForCausalLM:
    return random_model(0)


@pytest.fixture(scope="module")
def small() -> MiniMindForCausalLM:
    return random_model(1, hidden_size=32, num_hidden_layers=1)


class Recording(Batcher):
    """A Batcher that keeps each round's accepted draft counts per row (observation only)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rounds: list[list[int]] = []

    def _pick(self, rows, logits, drafts, q, parts):
        runs, accepted = super()._pick(rows, logits, drafts, q, parts)
        if any(drafts):
            self.rounds.append(accepted)
        return runs, accepted


# --- the batcher, token by token --------------------------------------------------------------


def test_greedy_rows_decode_as_plain_with_every_drafter(target, small):
    """Staggered arrivals into up to 3 cache groups (merges, drops, regrowth of both caches):
    each request's tokens are plain greedy decoding's, for every drafter and k; rows of one
    round accept different lengths; the statistics add up."""
    cfg = GenerationConfig(max_new_tokens=20, temperature=0, stop_token_ids=())
    schedule = [(i % 3, p, cfg) for i, p in enumerate(PROMPTS)]
    plain = [generate(target, [p], cfg)[0] for _, p, _ in schedule]
    mixed = False
    for drafter in ("ngram", small, target):
        for k in (None, 2):
            batcher = Recording(
                target,
                max_rows=4,
                growth=4,
                group_waste=8,
                max_groups=3,
                draft=drafter,
                num_draft_tokens=k,
            )
            sinks = run(batcher, schedule)
            assert [s.tokens for s in sinks] == plain, (drafter, k)
            assert all(s.reason == "length" for s in sinks)
            spec = batcher.stats()["speculation"]
            assert spec["tokens"] == batcher.stats()["tokens"] - len(schedule)  # firsts: prefill
            assert spec["tokens"] == spec["row_forwards"] + spec["accepted"]
            assert spec["drafted"] > 0 and 0 <= spec["accepted"] <= spec["drafted"]
            mixed |= any(len(set(r)) > 1 for r in batcher.rounds)
            if drafter is target:  # drafting for itself: every draft is accepted
                assert spec["acceptance_rate"] == 1.0
                assert spec["tokens_per_forward"] > (2.5 if k == 2 else 4)
    assert mixed  # some round verified rows that accepted different lengths


def test_sampled_rows_draw_as_alone_and_penalties_decode_plainly(target, small):
    """Seeded sampled requests (different settings: two Rule parts) draw exactly what
    `generate(..., draft=...)` draws for each alone, whoever shares their rounds; a request
    with a repetition penalty beside them decodes as plain `generate`; stop tokens and
    min_new_tokens act inside verified blocks as in plain decoding."""
    free = generate(target, [PROMPTS[0]], max_new_tokens=20, temperature=0, stop_token_ids=())[0]
    at = next(i for i in range(3, 20) if free[i] not in free[:i])  # a stop token first seen here
    stop = GenerationConfig(
        max_new_tokens=20, temperature=0, stop_token_ids=(free[at],), min_new_tokens=3
    )
    for drafter in ("ngram", small, target):
        configs = [
            GenerationConfig(max_new_tokens=16, temperature=1.0, seed=1, stop_token_ids=()),
            GenerationConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=2),
            GenerationConfig(max_new_tokens=16, temperature=1.0, seed=3, stop_token_ids=()),
            GenerationConfig(max_new_tokens=14, temperature=0, repetition_penalty=1.3),
            stop,
        ]
        prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[5], PROMPTS[3], PROMPTS[0]]
        schedule = [(i % 2, p, c) for i, (p, c) in enumerate(zip(prompts, configs))]
        batcher = Batcher(target, max_rows=5, growth=4, draft=drafter)
        sinks = run(batcher, schedule)
        for (_, prompt, c), sink in zip(schedule, sinks):
            penalised = c.repetition_penalty != 1.0
            alone = generate(target, [prompt], c, draft=None if penalised else drafter)[0]
            assert (sink.tokens, sink.reason) == (list(alone), alone.finish_reason), (drafter, c)
        assert sinks[-1].reason == "stop" and sinks[-1].tokens == free[: at + 1]
    assert batcher.stats()["speculation"]["accepted"] > 0


def test_bad_settings_are_refused(target):
    with pytest.raises(ValueError, match=r"num_draft_tokens must be in 1\.\.64"):
        Batcher(target, draft="ngram", num_draft_tokens=0)
    with pytest.raises(ValueError, match="draft must be a model or 'ngram'"):
        Batcher(target, draft="bigram")
    other = random_model(2, vocab_size=300)
    with pytest.raises(ValueError, match=r"draft \[300 tokens.*\] vs target \[512 tokens"):
        Batcher(target, draft=other)


# --- the server over HTTP ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt, device="cpu")


@pytest.fixture(scope="module")
def draft_ckpt(ckpt, loaded):
    """A draft model with the target's tokenizer that agrees with it often but not always:
    the target's weights with noise (a stand-in for a smaller model trained alike)."""
    model = MiniMindForCausalLM(loaded.model.config)
    model.load_state_dict(loaded.model.state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())
    return save_checkpoint(
        ckpt.parent / "draft", model.eval(), tokenizer_dir=ckpt.parent / "tokenizer"
    )


@pytest.fixture(scope="module")
def servers(loaded, draft_ckpt):
    draft, _ = load_draft(str(draft_ckpt), loaded)
    made = {
        "plain": Server(create_app(loaded)),
        "ngram": Server(create_app(loaded, draft="ngram")),
        "model": Server(create_app(loaded, draft=draft, num_draft_tokens=3)),
    }
    yield made
    for server in made.values():
        server.stop()


# (kind, messages or prompt, max_tokens, ignore_eos): replies of different lengths at once
REQUESTS = [
    ("chat", HELLO, 60, False),
    ("chat", WEATHER, 60, False),
    ("chat", [{"role": "system", "content": "Be brief."}, *HELLO], 24, True),
    ("text", "hello hello hello", 40, True),
    ("text", "The user greets me. The user", 9, True),
    ("chat", HELLO, 5, True),
]


def ask(server, loaded, kind, content, max_tokens, ignore_eos, stream=False, **kw) -> tuple:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    body = dict(model=loaded.name, temperature=0, max_tokens=max_tokens, stream=stream, **kw)
    body["extra_body"] = {"ignore_eos": ignore_eos}
    if kind == "chat":
        tools = TOOLS if content is WEATHER else None
        if stream:
            chunks = list(client.chat.completions.create(messages=content, tools=tools, **body))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            return (
                "".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
                "".join(d.content or "" for d in deltas),
                [c.choices[0].finish_reason for c in chunks if c.choices][-1],
            )
        r = client.chat.completions.create(messages=content, tools=tools, **body)
        m = r.choices[0].message
        calls = [c.function.arguments for c in m.tool_calls or []]
        extra = getattr(m, "reasoning_content", None)
        return extra, m.content, calls, r.choices[0].finish_reason, r.usage.completion_tokens
    if stream:
        chunks = list(client.completions.create(prompt=content, **body))
        return "".join(c.choices[0].text for c in chunks if c.choices)
    r = client.completions.create(prompt=content, **body)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def concurrently(server, loaded, requests, **kw) -> list:
    out: list = [None] * len(requests)
    errors: list = []

    def one(i, req):
        try:
            out[i] = ask(server, loaded, *req, **kw)
        except Exception as e:  # reported below, in this thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def test_server_replies_are_those_without_a_draft(servers, loaded):
    """Concurrent greedy requests of different lengths (chat with reasoning, a tool call,
    forced lengths, text completions), streamed and not: the same replies and token counts
    with n-gram drafts and with a draft model as without; /health shows what was drafted."""
    want = concurrently(servers["plain"], loaded, REQUESTS)
    want_streams = concurrently(servers["plain"], loaded, REQUESTS, stream=True)
    assert want[1][2], "the weather question should be answered with a tool call"
    assert "speculation" not in health(servers["plain"])
    for name in ("ngram", "model"):
        server = servers[name]
        assert concurrently(server, loaded, REQUESTS) == want, name
        assert concurrently(server, loaded, REQUESTS, stream=True) == want_streams, name
        spec = health(server)["speculation"]
        assert spec["draft"] == name
        assert spec["num_draft_tokens"] == ("adaptive" if name == "ngram" else 3)
        assert 0 < spec["accepted"] < spec["drafted"]  # some drafts rejected, some not
        assert spec["acceptance_rate"] == round(spec["accepted"] / spec["drafted"], 4)
        assert spec["tokens_per_forward"] > 1.0
        assert spec["target_forwards"] <= spec["row_forwards"]


def test_penalised_requests_are_served_plainly(servers, loaded):
    """A request with a frequency penalty on the n-gram server: no drafts for its row, and
    the reply of the server without a draft."""
    req = ("text", "hello hello hello", 30, True)
    kw = dict(frequency_penalty=0.8)
    want = ask(servers["plain"], loaded, *req, **kw)
    before = health(servers["ngram"])["speculation"]
    assert ask(servers["ngram"], loaded, *req, **kw) == want
    after = health(servers["ngram"])["speculation"]
    assert after["drafted"] == before["drafted"]
    assert after["row_forwards"] - before["row_forwards"] == 29  # one token per forward


def test_a_draft_with_another_tokenizer_is_refused_at_start(ckpt, loaded, tmp_path):
    texts = ["a draft model trained on other text has another vocabulary"] * 20
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=300, show_progress=False)
    model = MiniMindForCausalLM(preset("tiny", vocab_size=300))
    alien = save_checkpoint(tmp_path / "alien", model.eval(), tokenizer_dir=tok)
    base = ["--load_from", str(ckpt), "--device", "cpu", "--port", "1"]
    with pytest.raises(SystemExit) as e:
        serve_main([*base, "--draft", str(alien)])
    message = str(e.value)
    theirs, ours = load_tokenizer(tok).vocab_size, loaded.tokenizer.vocab_size
    assert theirs != ours
    assert f"--draft {alien}: its tokenizer ({theirs} tokens, {alien})" in message
    assert f"differs from the model's ({ours} tokens, {ckpt})" in message
    with pytest.raises(SystemExit, match="--num_draft_tokens needs --draft"):
        serve_main([*base, "--num_draft_tokens", "3"])
    with pytest.raises(SystemExit, match=r"--num_draft_tokens must be in 1\.\.64, got 0"):
        serve_main([*base, "--draft", "ngram", "--num_draft_tokens", "0"])


@pytest.mark.slow
def test_bench_serve_draft_mode_writes_its_report(tmp_path):
    """bench/serve.py --draft ngram --quick: both servers, both levels, the same replies on
    both sides (greedy), the draft side's statistics present (no speed is checked)."""
    out = tmp_path / "draft.json"
    bench = REPO / "bench" / "serve.py"
    cmd = [sys.executable, str(bench), "--draft", "ngram", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["meta"]["draft"] == "ngram" and report["meta"]["draft_k"] == "adaptive"
    assert [lv["clients"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["same_replies"] is True
        assert lv["plain_tokens_per_s"] > 0 and lv["draft_tokens_per_s"] > 0
        assert 0 < lv["acceptance_rate"] <= 1 and lv["tokens_per_forward"] >= 1
    assert "same replies" in proc.stdout


def test_chat_and_serve_take_either_name_of_the_draft_length_flag():
    from minimind.infer.chat_cli import build_parser
    from minimind.serve.openai_api import parse_args

    for flag in ("--draft_k", "--num_draft_tokens"):
        assert build_parser().parse_args(["--draft", "ngram", flag, "3"]).draft_k == 3
        assert parse_args(["--draft", "ngram", flag, "3"]).num_draft_tokens == 3
