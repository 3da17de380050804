"""The server under mixed load, end to end over real HTTP (uvicorn on a free port, the real
`openai` client): the n choices of a request share one prefill, a repeated system prompt is
read from the prefix cache (counted in usage.prompt_tokens_details.cached_tokens) without
changing a reply, the cache stays within its bound, and a long prompt prefilled in chunks
while a stream runs gets the reply an unchunked prefill gives it. Replies are compared with
those of a server with chunking and the cache off (`plain`)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from minimind.infer.chat import prompt_ids
from minimind.infer.load import load_model
from minimind.serve.openai_api import create_app, parse_args
from tests.serve_fixtures import HELLO, Server, train_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# A system prompt long enough to fill several 16-token blocks.
SYSTEM = "You are Lumen, the keeper of the little world's lighthouse. " * 3


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(train_checkpoint(tmp_path_factory.mktemp("prefix")), device="cpu")


@pytest.fixture(scope="module")
def served(loaded):
    server = Server(create_app(loaded, prefill_chunk=16, prefix_cache_tokens=4096))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(loaded):
    server = Server(create_app(loaded, prefill_chunk=0, prefix_cache_tokens=0))
    yield server
    server.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def ask(server, loaded, messages, **kw):
    return client(server).chat.completions.create(
        model=loaded.name, messages=messages, temperature=0, **kw
    )


def reply(choice) -> tuple[str, str]:
    # a reply without a think block has no reasoning_content field at all
    message = choice.message
    return getattr(message, "reasoning_content", None) or "", message.content or ""


def plain_reply(plain, loaded, messages, max_tokens: int) -> tuple[str, str]:
    """The greedy reply of the server without chunking or cache, forced to max_tokens."""
    r = ask(plain, loaded, messages, max_tokens=max_tokens, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    return reply(r.choices[0])


def test_n_choices_share_one_prefill(served, plain, loaded):
    messages = [{"role": "system", "content": "n choices: " + SYSTEM}, *HELLO]
    ids = prompt_ids(loaded.tokenizer, messages)
    before = health(served)
    r = ask(served, loaded, messages, n=4, max_tokens=12, extra_body={"ignore_eos": True})
    after = health(served)
    # One prefill for the four choices: the prompt's tokens once (none of it was cached).
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert after["prefill_tokens"] - before["prefill_tokens"] == len(ids)
    want = plain_reply(plain, loaded, messages, 12)
    assert [reply(c) for c in r.choices] == [want] * 4
    assert r.usage.completion_tokens == 4 * 12


def test_repeated_system_prompt_is_read_from_the_cache(served, plain, loaded):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "who are you"}]
    a = ask(served, loaded, first, max_tokens=10, extra_body={"ignore_eos": True})
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    ids_a, ids_b = (prompt_ids(loaded.tokenizer, m) for m in (first, second))
    shared = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    before = health(served)
    chunks = list(
        ask(served, loaded, second, max_tokens=10, extra_body={"ignore_eos": True}, stream=True,
            stream_options={"include_usage": True})
    )  # fmt: skip
    usage = chunks[-1].usage
    cached = usage.prompt_tokens_details.cached_tokens
    # Whole 16-token blocks of the shared system prompt came from the cache...
    assert cached == shared // 16 * 16 and cached >= 48
    assert health(served)["cached_tokens"] - before["cached_tokens"] == cached
    assert usage.prompt_tokens == len(ids_b)
    # ...and the reply is the one the model gives without any cache.
    delta = [c.choices[0].delta for c in chunks if c.choices]
    got = tuple("".join(getattr(d, f, None) or "" for d in delta)
                for f in ("reasoning_content", "content"))  # fmt: skip
    assert got == plain_reply(plain, loaded, second, 10)
    # The same request again: its whole blocks are cached, all but its last token served
    again = ask(served, loaded, second, max_tokens=10, extra_body={"ignore_eos": True})
    whole = len(ids_b) // 16 * 16
    assert again.usage.prompt_tokens_details.cached_tokens == min(whole, len(ids_b) - 1)
    assert reply(again.choices[0]) == got


def test_long_prompt_prefilled_in_chunks_while_a_stream_runs(served, plain, loaded):
    # A stream decodes while a long prompt arrives: the long prompt goes in 16-token chunks
    # between the stream's steps, the stream gets all its tokens, the long prompt the reply an
    # unchunked prefill gives.
    long = [{"role": "user", "content": "Tell me about the lighthouse and the sea. " * 12}]
    n_long = len(prompt_ids(loaded.tokenizer, long))
    assert n_long > 200
    stream = {}

    def streamer():
        kw = {"extra_body": {"ignore_eos": True}, "stream_options": {"include_usage": True}}
        stream["chunks"] = list(ask(served, loaded, HELLO, max_tokens=300, stream=True, **kw))

    before = health(served)
    thread = threading.Thread(target=streamer)
    thread.start()
    while health(served)["running"] < 1 and thread.is_alive():
        pass
    r = ask(served, loaded, long, max_tokens=8, extra_body={"ignore_eos": True})
    thread.join(60)
    after = health(served)
    assert reply(r.choices[0]) == plain_reply(plain, loaded, long, 8)
    assert stream["chunks"][-1].usage.completion_tokens == 300
    assert after["prefill_chunks"] - before["prefill_chunks"] >= n_long // 16


def test_cache_bounded_and_flags(plain, loaded):
    # A 32-token cache holds two blocks whatever goes through it; with the cache off (the
    # command line's 0) nothing is cached and /health says so.
    args = parse_args(["--load_from", "x", "--prefill_chunk", "0", "--prefix_cache_tokens", "0"])
    assert (args.prefill_chunk, args.prefix_cache_tokens) == (0, 0)
    small = Server(create_app(loaded, prefix_cache_tokens=32))
    off = plain
    try:
        for topic in ("the sea", "the lamp", "the keeper", "the island"):
            messages = [{"role": "user", "content": f"Tell me about {topic}. " * 4}]
            ask(small, loaded, messages, max_tokens=2)
            assert health(small)["prefix_cache_tokens"] <= 32
        h = health(small)
        assert h["prefix_cache_max_tokens"] == 32 and h["prefix_cache_evicted_blocks"] > 0
        r = [ask(off, loaded, messages, max_tokens=4) for _ in range(2)]
        assert r[1].usage.prompt_tokens_details.cached_tokens == 0
        assert r[0].choices[0].message.content == r[1].choices[0].message.content
        assert "prefix_cache_tokens" not in health(off)
    finally:
        small.stop()
