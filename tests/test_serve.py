"""The OpenAI-compatible server end to end: the real `openai` client (and raw httpx where the
wire format itself is checked) against the real app in uvicorn on a free 127.0.0.1 port.

The model is trained in the fixture, in seconds, on two conversations, so its greedy replies
are known: "hello" -> reasoning + answer, and "weather in Paris?" with a tool listed -> one
tool call. The tokenizer is trained on the same texts, which keeps the prompts short.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from minimind.infer import GenerationConfig, generate
from minimind.infer.chat import prompt_ids
from minimind.infer.load import load_model
from minimind.serve.openai_api import create_app
from tests import REPO
from tests.serve_fixtures import (
    ANSWER,
    CONTEXT,
    HELLO,
    KEY,
    REASONING,
    REPLIES,
    TOOLS,
    WEATHER,
    Server,
    train_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return train_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt, device="cpu")


@pytest.fixture(scope="module")
def served(loaded):
    server = Server(create_app(loaded, api_key=KEY, max_rows=32, max_waiting=256))
    yield server
    server.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


def health(served) -> dict:
    return httpx.get(served.url + "/health").json()


def test_models_and_health(client, served, loaded):
    assert [m.id for m in client.models.list()] == [loaded.name]
    h = health(served)
    assert h["status"] == "ok" and h["running"] == 0 and h["max_rows"] == 32


def test_chat_reasoning_split_and_usage(client, loaded):
    r = client.chat.completions.create(model=loaded.name, messages=HELLO, temperature=0)
    choice = r.choices[0]
    assert choice.message.content == ANSWER
    assert choice.message.reasoning_content == REASONING
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    tok = loaded.tokenizer
    assert r.usage.prompt_tokens == len(prompt_ids(tok, HELLO))
    assert r.usage.completion_tokens == len(tok.encode(REPLIES[0][2])) + 1  # + <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_deltas_and_usage_chunk(client, loaded):
    kw = dict(model=loaded.name, messages=HELLO, temperature=0, stream=True)
    chunks = list(client.chat.completions.create(**kw, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in body)
    content = "".join(c.choices[0].delta.content or "" for c in body)
    assert (reasoning, content) == (REASONING, ANSWER)
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["stop"]
    assert len({c.id for c in chunks}) == 1
    # Without include_usage no chunk carries usage.
    assert all(c.usage is None for c in client.chat.completions.create(**kw))


def test_tool_calls(client, loaded):
    kw = dict(model=loaded.name, messages=WEATHER, tools=TOOLS, temperature=0)
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(**kw, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_across_tokens_and_are_not_sent(client, loaded, stream):
    def ask(stop):
        r = client.chat.completions.create(
            model=loaded.name, messages=HELLO, temperature=0, stop=stop, stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )  # fmt: skip
        if not stream:
            c = r.choices[0]
            return c.message.content, c.message.reasoning_content, c.finish_reason, r.usage
        chunks = list(r)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        content = "".join(d.content or "" for d in deltas)
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return content, reasoning or None, reason, chunks[-1].usage

    full = ask(None)[3].completion_tokens
    content, reasoning, reason, usage = ask(["zzz", "e! Ni"])  # inside "there! Nice"
    assert (content, reasoning, reason) == ("Hello ther", REASONING, "stop")
    assert usage.completion_tokens < full  # the row was stopped, not run to its end
    content, reasoning, reason, _ = ask("greets")
    assert (content, reasoning, reason) == ("", "The user", "stop")


def test_n_choices_and_seed_reproduce_generate(client, loaded):
    kw = dict(model=loaded.name, prompt="Paris weather", max_tokens=12, temperature=1.0, n=3)
    a = client.completions.create(seed=5, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert client.completions.create(seed=5, **kw).choices == a.choices
    assert client.completions.create(seed=6, **kw).choices != a.choices
    assert len({c.text for c in a.choices}) > 1
    tok = loaded.tokenizer
    ids = tok.encode("Paris weather")
    for i, c in enumerate(a.choices):  # choice i samples with seed + i, as generate does alone
        cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5 + i, stop_token_ids=(2,))
        out = generate(loaded.model, [ids], cfg)[0]
        assert c.text == tok.decode(out, skip_special_tokens=True)
        assert c.finish_reason == out.finish_reason
    assert a.usage.prompt_tokens == len(ids)
    assert a.usage.completion_tokens == sum(
        len(generate(loaded.model, [ids], max_new_tokens=12, temperature=1.0, seed=5 + i,
                     stop_token_ids=(2,))[0])
        for i in range(3)
    )  # fmt: skip
    # ignore_eos forces the length; a stream of text chunks, then [DONE]
    chunks = list(
        client.completions.create(
            model=loaded.name, prompt="hi", max_tokens=7, temperature=0, stream=True,
            extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].usage.completion_tokens == 7
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"


def post(served, path, body=None, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body)
    r = httpx.post(served.url + path, content=content, headers=headers, timeout=30)
    return r.status_code, r.json()


def test_errors_have_openai_shape_and_status(served, loaded, client):
    ok = {"model": loaded.name, "messages": HELLO, "max_tokens": 4}
    cases = [
        (dict(raw=b"{not json"), 400, None, None),
        (dict(body={**ok, "temperature": "hot"}), 400, "temperature", None),
        (dict(body={**ok, "n": 0}), 400, "n", None),
        (dict(body={**ok, "messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role", None),
        (dict(body={"model": loaded.name}), 400, "messages", None),
        (dict(body=[1, 2]), 400, None, None),
        (dict(body={**ok, "stop": ["a"] * 17}), 400, "stop", None),
        (dict(body={**ok, "logprobs": True}), 400, "logprobs", None),
        (dict(body=ok, key="wrong"), 401, None, "invalid_api_key"),
        (dict(body=ok, key=None), 401, None, "invalid_api_key"),
        (dict(body={**ok, "model": "gpt-9"}), 404, "model", "model_not_found"),
        (dict(body={**ok, "max_tokens": CONTEXT + 1}), 400, "max_tokens", "context_length_exceeded"),
        (dict(body={**ok, "max_completion_tokens": CONTEXT - 3}), 400, "max_completion_tokens", "context_length_exceeded"),
        (dict(body={**ok, "messages": [{"role": "user", "content": "hello " * CONTEXT}]}), 400, "messages", "context_length_exceeded"),
    ]  # fmt: skip
    for kw, status, param, code in cases:
        got, body = post(served, "/v1/chat/completions", **kw)
        assert got == status, (kw, body)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        assert (err["param"], err["code"]) == (param, code), (kw, err)
    # a prompt too long for a text completion, counted in tokens
    long_prompt = {"model": loaded.name, "prompt": [5] * CONTEXT}
    status, body = post(served, "/v1/completions", long_prompt)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert f"{CONTEXT} tokens" in body["error"]["message"]
    status, body = post(served, "/v1/nothing", {})
    assert status == 404 and "error" in body
    # the openai client raises its usual exceptions
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=99999)
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # and the server still answers
    assert client.chat.completions.create(
        model=loaded.name, messages=HELLO, temperature=0
    ).choices[0].message.content == ANSWER  # fmt: skip


def wait_for(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_disconnect_cancels_the_row(served, loaded):
    before = health(served)
    body = {
        "model": loaded.name,
        "prompt": "hi",
        "max_tokens": CONTEXT - 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: health(served)["running"] == 1)
    # the client is gone: its row leaves the batch long before its last token
    wait_for(lambda: health(served)["running"] == 0)
    after = health(served)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"]
    assert after["tokens"] - before["tokens"] < CONTEXT - 8
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            served.url + "/v1/completions",
            json={**body, "stream": False},
            headers=headers,
            timeout=httpx.Timeout(30, read=0.3),
        )
    wait_for(lambda: health(served)["running"] == 0)
    assert health(served)["cancelled"] == before["cancelled"] + 2


def test_200_concurrent_requests(served, loaded):
    async def main():
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)

        async def one(i):
            kw = dict(model=loaded.name, messages=HELLO, temperature=0)
            if i % 2:
                r = await client.chat.completions.create(**kw)
                return r.choices[0].message.content
            stream = await client.chat.completions.create(**kw, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        answers = await asyncio.gather(*(one(i) for i in range(200)))
        await client.close()
        return answers

    before = health(served)
    answers = asyncio.run(main())
    assert answers == [ANSWER] * 200
    # decoded together, not one after another: each batcher step gave tokens to many rows (the
    # counters, not a sampled "running": the requests can finish between two samples)
    after = health(served)
    tokens, steps = (after[k] - before[k] for k in ("tokens", "steps"))
    assert after["finished"] - before["finished"] == 200
    assert tokens > 4 * steps, (tokens, steps)
    h = health(served)
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0
    c = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    r = c.chat.completions.create(model=loaded.name, messages=WEATHER, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"


def test_full_queue_answers_429(loaded):
    server = Server(create_app(loaded, max_rows=1, max_waiting=1))
    try:
        body = {"model": loaded.name, "prompt": "hi", "max_tokens": 300, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(timeout=60) as h:
                return await asyncio.gather(
                    *(h.post(server.url + "/v1/completions", json=body) for _ in range(6))
                )

        answers = asyncio.run(main())
        assert sorted(r.status_code for r in answers)[0] == 200
        busy = [r for r in answers if r.status_code == 429]
        assert busy and busy[0].headers["retry-after"] == "1"
        assert busy[0].json()["error"]["code"] == "queue_full"
        again = httpx.post(server.url + "/v1/completions", json=body)  # idle again: accepted
        assert again.status_code == 200, again.text
        assert again.json()["usage"]["completion_tokens"] == 300
    finally:
        server.stop()


def test_stream_interval_groups_tokens_into_fewer_chunks(loaded):
    server = Server(create_app(loaded, stream_interval=0.3))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        chunks = list(
            client.completions.create(
                model=loaded.name, prompt="hi", max_tokens=40, temperature=0, stream=True,
                extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
            )
        )  # fmt: skip
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        assert chunks[-1].usage.completion_tokens == 40
        assert 1 <= len(texts) < 10  # 40 tokens, but few chunks: the first, then one per 0.3 s
    finally:
        server.stop()


def test_scripts_serve_and_chat(ckpt, tmp_path):
    """scripts/serve_openai_api.py with MiniMind's flags, and scripts/chat_openai_api.py
    (the official openai package) streaming a reply from it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "serve_openai_api.py"), "--load_from",
           str(ckpt), "--device", "cpu", "--port", str(port), "--log_level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60)
        chat = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "chat_openai_api.py"), "--base_url",
             url + "/v1", "--temperature", "0", "hello"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr
        assert REASONING in chat.stdout and ANSWER in chat.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_chat_script_without_a_server_says_so():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = REPO / "scripts" / "chat_openai_api.py"
    done = subprocess.run(
        [sys.executable, str(script), "--base_url", f"http://127.0.0.1:{port}/v1", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "no server answers" in done.stderr and "Traceback" not in done.stderr
