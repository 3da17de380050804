"""The API's text layer in-process, from a fake token source: however a reply is cut into
deltas or tokens, streaming gives what the whole text gives."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimind.infer.chat import parse_tool_calls, split_reasoning
from minimind.serve.reply import ReplyStream, StopMatcher, ToolCallFilter
from minimind.tokenizer import load_tokenizer
from tests.infer_fixtures import make_tokenizer

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
TEXTS = [
    "plain answer",
    "<think>\nreasoning here\n</think>\n\nthe answer",
    f"Sure.\n{CALL}",
    f"{CALL}\n{CALL}",
    f"before {CALL} after",
    "<tool_call>not json</tool_call> and text",
    "<tool_call>unclosed",
    f"<think>\nuse a tool\n</think>\n\n{CALL}",
    "中文回答 END 更多",
]


def chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@given(st.sampled_from(TEXTS), st.lists(st.integers(0, 200), max_size=12))
@settings(max_examples=150, deadline=None)
def test_stop_matcher_equals_cutting_the_whole(text, cuts):
    stops = ["END", "\n\n", "}\n</"]
    m = StopMatcher(stops)
    got = "".join(m.feed(c) for c in chunks(text, cuts)) + m.flush()
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert got == (text[: min(hits)] if hits else text)
    assert m.stopped == bool(hits)


@given(st.sampled_from(TEXTS), st.lists(st.integers(0, 200), max_size=12))
@settings(max_examples=150, deadline=None)
def test_tool_call_filter_equals_parse_tool_calls(text, cuts):
    f = ToolCallFilter()
    pieces = [p for c in chunks(text, cuts) for p in f.feed(c)] + f.finish()
    content, calls = parse_tool_calls(text)
    assert "".join(v for k, v in pieces if k == "content") == (
        content if calls else content.strip()
    )
    assert [v for k, v in pieces if k == "tool_call"] == calls


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("text", TEXTS)
def test_reply_stream_token_by_token_equals_the_whole_reply(tokenizer, text):
    ids = [*tokenizer.encode(text), tokenizer.eos_id]  # the stop token is not text
    reply = ReplyStream(tokenizer, chat=True, tools=True)
    pieces = [p for t in ids for p in reply.feed(t)] + reply.finish()
    reasoning, answer = split_reasoning(text)
    content, calls = parse_tool_calls(answer)
    assert "".join(v for k, v in pieces if k == "reasoning") == (reasoning or "")
    assert "".join(v for k, v in pieces if k == "content") == content
    assert [v for k, v in pieces if k == "tool_call"] == calls
    assert reply.calls == len(calls) and reply.tokens == len(ids)


def test_reply_stream_stops_and_plain_completions(tokenizer):
    ids = tokenizer.encode("<think>\nhm\n</think>\n\nabc END xyz")
    reply = ReplyStream(tokenizer, ["END"], chat=True)
    pieces = []
    for t in ids:
        pieces += reply.feed(t)
        if reply.stopped:
            break
    pieces += reply.finish()
    joined = {k: "".join(v for kind, v in pieces if kind == k) for k in ("reasoning", "content")}
    assert joined == {"reasoning": "hm", "content": "abc"}
    # a text completion keeps the raw text (tags and whitespace) up to the stop string
    raw = ReplyStream(tokenizer, ["END"], chat=False)
    text = "".join(v for t in ids for _, v in raw.feed(t)) + "".join(v for _, v in raw.finish())
    assert text == "<think>\nhm\n</think>\n\nabc "


def test_ids_beyond_the_tokenizer_are_no_text(tokenizer):
    # A model may have more embedding rows than its tokenizer has tokens; sampling one of those
    # ids must not break the stream (it counts as a token, with no text).
    reply = ReplyStream(tokenizer, chat=False)
    ids = [*tokenizer.encode("ok"), tokenizer.vocab_size + 3, *tokenizer.encode(" go")]
    text = "".join(v for t in ids for _, v in reply.feed(t)) + "".join(v for _, v in reply.finish())
    assert text == "ok go" and reply.tokens == len(ids)
