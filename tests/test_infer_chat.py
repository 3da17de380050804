"""minimind.infer.chat: reasoning split (whole and streamed, any chunking), tool-call parsing,
and a multi-turn session over a real tiny model whose streamed reply equals plain generation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimind.infer import GenerationConfig, generate
from minimind.infer.chat import (
    ChatSession,
    ReplyParser,
    parse_tool_calls,
    prompt_ids,
    split_reasoning,
    stop_ids,
)
from minimind.infer.load import load_model
from minimind.tokenizer.chat import render
from tests.infer_fixtures import make_checkpoint

CASES = [
    ("<think>\nR\n</think>\n\nA", ("R", "A")),
    ("  <think>R</think>A  ", ("R", "A")),
    ("<think>\n\n</think>\n\nA", ("", "A")),
    ("A <think>x</think>", (None, "A <think>x</think>")),
    ("<think>only", ("only", "")),
    ("<thin", (None, "<thin")),
    ("", (None, "")),
    ("  \n ", (None, "")),
    ("<think>a </ b </think>c\n d \n", ("a </ b", "c\n d")),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_template_round_trip():
    message = {"role": "assistant", "content": "The answer.", "reasoning_content": "Think.\nOk"}
    rendered = render([message])
    reply = rendered.split("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    assert split_reasoning(reply) == ("Think.\nOk", "The answer.")


pieces = st.lists(
    st.sampled_from(
        ["<think>", "</think>", "<", "</", "think>", "\n", " ", "a", "b c", "\n\n", "x"]
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(pieces, st.data())
def test_streaming_equals_whole(parts, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    parser = ReplyParser()
    out = [p for chunk in chunks for p in parser.feed(chunk)] + parser.finish()
    reasoning, content = split_reasoning(text)
    assert "".join(t for k, t in out if k == "content") == content
    assert "".join(t for k, t in out if k == "reasoning") == (reasoning or "")
    kinds = [k for k, _ in out]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # reasoning comes first
    assert all(t for _, t in out)


def test_tool_calls():
    text = (
        'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n'
        '</tool_call>\n<tool_call>{"name": "time", "arguments": "{}"}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert calls == [
        {"name": "weather", "arguments": '{"city": "北京"}'},
        {"name": "time", "arguments": "{}"},
    ]
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_checkpoint(tmp_path_factory.mktemp("chat")), device="cpu")


def test_session_streams_what_generate_gives(loaded):
    model, tok = loaded.model, loaded.tokenizer
    session = ChatSession(model, tok, history_turns=2)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    pieces = list(session.reply("hello", cfg))
    ids = prompt_ids(tok, [{"role": "user", "content": "hello"}])
    expected = generate(model, [ids], cfg, stop_token_ids=stop_ids(tok, model))[0]
    text = tok.decode(expected, skip_special_tokens=True)
    reasoning, content = split_reasoning(text)
    assert "".join(t for k, t in pieces if k == "content") == content
    assert "".join(t for k, t in pieces if k == "reasoning") == (reasoning or "")
    stats = session.last
    assert stats.prompt_tokens == len(ids)
    assert stats.completion_tokens == len(expected)
    assert stats.finish_reason == expected.finish_reason
    assert stats.tokens_per_second > 0
    assert session.history == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": content},
    ]


def test_session_history_is_bounded(loaded):
    session = ChatSession(loaded.model, loaded.tokenizer, history_turns=2, system_prompt="S")
    cfg = GenerationConfig(max_new_tokens=3, temperature=0)
    for question in ("one", "two", "three"):
        list(session.reply(question, cfg))
    messages, ids = session.messages_for("four", 3)
    assert [m["content"] for m in messages[:2]] == ["S", "three"]
    assert len(messages) == 4
    # no room for the whole history: the oldest turns go first
    context = loaded.model.config.max_position_embeddings
    session.history_turns = 6
    bare = ChatSession(loaded.model, loaded.tokenizer, system_prompt="S").messages_for("four", 1)
    messages, ids = session.messages_for("four", context - len(bare[1]))
    assert (messages, ids) == bare
    with pytest.raises(ValueError, match="context"):
        session.messages_for("word " * context, 1)
