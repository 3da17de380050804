"""minimind.tokenizer.fast: tiktoken's encoder stands in for `tokenizers` only where it gives
the same ids; checked on random text for our tokenizer and MiniMind2's, and refused for
vocabularies or structures it would encode differently."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from minimind.tokenizer import Tokenizer, load_tokenizer
from minimind.tokenizer.fast import MAX_ADDED, fast_encoder, probe_texts
from tests import REFERENCE
from tests.test_tokenizer import corpus

pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    from minimind.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(corpus(500)), folder, vocab_size=600, show_progress=False)
    return load_tokenizer(folder)


@pytest.fixture(params=["ours", "reference"])
def tok(request, ours):
    if request.param == "ours":
        return ours
    if not (REFERENCE / "tokenizer.json").exists():
        pytest.skip(f"MiniMind2 reference tokenizer not found at {REFERENCE}")
    return load_tokenizer(REFERENCE)


def slow_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.backend.encode(text, add_special_tokens=False).ids


def test_fast_path_is_taken_and_equal(tok):
    assert tok.fast is not None
    texts = corpus(200, seed=3) + probe_texts(tok.backend, n=200, seed=9)
    assert tok.encode_batch(texts) == [slow_ids(tok, t) for t in texts]
    assert [tok.encode(t) for t in texts[:50]] == [slow_ids(tok, t) for t in texts[:50]]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80), data=st.data())
def test_random_text_encodes_alike(ours, text, data):
    assert ours.fast.encode(text) == slow_ids(ours, text)
    # runs of token texts put token boundaries everywhere
    pieces = [ours.backend.decode([i]) for i in range(ours.vocab_size)]
    joined = "".join(data.draw(st.lists(st.sampled_from(pieces), max_size=12)))
    assert ours.fast.encode(joined) == slow_ids(ours, joined)


def _rebuilt(tok: Tokenizer, edit) -> tokenizers.Tokenizer:
    spec = json.loads(tok.backend.to_str())
    edit(spec)
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def test_structures_it_does_not_implement_are_refused(ours):
    def normalizer(spec):
        spec["normalizer"] = {"type": "NFKC"}

    def prefix_space(spec):
        spec["pre_tokenizer"]["add_prefix_space"] = True

    def stripping_added_token(spec):
        spec["added_tokens"][3]["lstrip"] = True

    for edit in (normalizer, prefix_space, stripping_added_token):
        assert fast_encoder(_rebuilt(ours, edit)) is None, edit.__name__
    many = _rebuilt(ours, lambda spec: None)
    many.add_tokens([tokenizers.AddedToken(f"<x{i}>", normalized=False) for i in range(MAX_ADDED)])
    assert fast_encoder(many) is None


def test_ids_out_of_merge_order_are_caught_by_the_probe(ours):
    def swap(spec):
        # give the first merged token the last id and vice versa: tiktoken ranks by id, so
        # the first merge would come last
        vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
        first = "".join(merges[0].split(" ") if isinstance(merges[0], str) else merges[0])
        last = "".join(merges[-1].split(" ") if isinstance(merges[-1], str) else merges[-1])
        vocab[first], vocab[last] = vocab[last], vocab[first]

    backend = _rebuilt(ours, swap)
    unchecked = fast_encoder(backend, check=False)  # builds, but encodes differently:
    texts = probe_texts(backend)
    assert any(unchecked.encode(t) != backend.encode(t).ids for t in texts)
    assert fast_encoder(backend) is None  # so the probe refuses it
    tok = Tokenizer(backend)  # and the Tokenizer falls back to `tokenizers`
    text = " ".join(random.Random(0).choices(corpus(5), k=3))
    assert tok.fast is None and tok.encode(text) == slow_ids(tok, text)


def test_chat_ids_and_masks_match_the_slow_path(tok):
    from minimind.tokenizer import encode_chat
    from tests.test_tokenizer_chat import conversation

    slow = Tokenizer(tok.backend)
    slow._fast = None  # `tokenizers` only
    rng = random.Random(5)
    for _ in range(300):
        case = conversation(rng, reasoning=True)
        # replies that begin with newlines or spaces put token boundaries at the span edges
        for m in case["messages"]:
            if m.get("role") == "assistant" and isinstance(m.get("content"), str):
                m["content"] = rng.choice(["", "\n", "\n\n", " ", "  "]) + m["content"]
        assert encode_chat(tok, **case) == encode_chat(slow, **case)
