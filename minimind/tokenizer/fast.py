"""A faster encoder for the same ids: our byte-level BPE run by tiktoken's rank-based BPE.

Why: data preparation is bound by encoding, and tiktoken's encoder gives the same ids several
times faster than the `tokenizers` library (bench/RESULTS.md, "Why the code is shaped so").

When it is used: only for a vocabulary whose encoding tiktoken reproduces. The structure must
be the one both implement: no normalizer; a ByteLevel pre-tokenizer with GPT-2's regex and no
prefix space; a BPE model without dropout, unknown token, byte fallback, word prefixes or
suffixes, or whole-word lookups; added tokens that match literally (no lstrip/rstrip/single
word). Ranks are the token ids (merges in training order follow the 256 byte tokens), added
tokens are tiktoken's special tokens, split out of the text first, as `tokenizers` does.

Why it is the same function: BPE with a merge list merges, in a word, the adjacent pair with
the earliest merge; tiktoken merges the adjacent pair whose concatenation has the lowest rank.
These agree whenever every adjacent pair whose concatenation is a token is that token's own
merge pair. A vocabulary can hold tokens with other splits (about a quarter of MiniMind2's),
so agreement is checked rather than assumed: `fast_encoder` encodes a probe set with both (a
fixed text sample, every token's own text, and seeded random concatenations of token texts,
which put token boundaries everywhere) and returns None on any difference. On top, the tests
compare both encoders on random text for our tokenizer and MiniMind2's (no difference seen in
31,000 texts of the demo corpus and random strings).

Chat encoding takes its token offsets from the byte table (Tokenizer.char_spans);
`Tokenizer.encode_with_offsets` stays with `tokenizers`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import tokenizers

from minimind.tokenizer.stream import token_bytes

MAX_ADDED = 1024  # added tokens beyond which the fast path is not tried

# GPT-2's pre-tokenization regex, which `tokenizers`' ByteLevel(use_regex=True) applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE_TEXT = (
    "Hello, world! It's 2026; we'll see what they've done. 你好，世界！今天是2026年11月29日。\n"
    "  leading spaces\tand\ttabs\n\n\nnewlines  trailing   \r\n"
    "数学：12 + 35 = 47，3.14159 ≈ π。 emoji 🙂👍🏽 mixed中文English混合123abc。\n"
    "<|im_start|>user\nhi<|im_end|>\n<think>\nreason\n</think>\n\n<tool_call>{}</tool_call>"
    "https://example.com/a_b-c?d=e&f=g#h  def f(x):\n    return x ** 2  # comment\n"
)


def _structure_ok(spec: dict) -> bool:
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain_model = (
        model.get("type") == "BPE"
        and model.get("dropout") is None
        and model.get("unk_token") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback", False)
        and not model.get("ignore_merges", False)
    )
    plain_pre = (
        pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and pre.get("use_regex", True)
    )
    plain_added = all(
        not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
        for t in spec.get("added_tokens", [])
    )
    return spec.get("normalizer") is None and plain_model and plain_pre and plain_added


def probe_texts(backend: tokenizers.Tokenizer, n: int = 2000, seed: int = 0) -> list[str]:
    """The texts `fast_encoder` checks: PROBE_TEXT's lines, every token's text, and n seeded
    random runs of 2-12 token texts (with spaces and newlines between some of them)."""
    rng = random.Random(seed)
    pieces = [backend.decode([i]) for i in range(backend.get_vocab_size(with_added_tokens=True))]
    pieces = [p for p in pieces if p and "\ufffd" not in p]
    texts = [*PROBE_TEXT.splitlines(keepends=True), PROBE_TEXT, *pieces]
    for _ in range(n):
        parts = rng.choices(pieces, k=rng.randint(2, 12))
        texts.append("".join(p + rng.choice(["", "", "", " ", "\n"]) for p in parts))
    return texts


class FastEncoder:
    """encode / encode_batch with tiktoken, for a vocabulary `fast_encoder` has checked."""

    def __init__(self, encoding):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encoding.encode(t, allowed_special="all") for t in texts]

    def encode_text(self, text: str) -> list[int]:
        """Added tokens written in `text` are plain characters (tiktoken's encode_ordinary)."""
        return self.encoding.encode_ordinary(text)


def fast_encoder(backend: tokenizers.Tokenizer, check: bool = True) -> FastEncoder | None:
    """A FastEncoder giving exactly `backend`'s ids, or None (tiktoken missing, a structure it
    does not implement, or any difference on the probe texts)."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(backend.to_str())
    if not _structure_ok(spec):
        return None
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    if len(added) > MAX_ADDED:
        return None  # tiktoken matches added tokens with one alternation regex: too slow
    table = token_bytes(backend)
    ranks: dict[bytes, int] = {}
    for token_id, raw in enumerate(table):
        if token_id in added.values():
            continue
        if raw in ranks:  # two ids for one byte string: tiktoken cannot say which
            return None
        ranks[raw] = token_id
    if any(bytes([b]) not in ranks for b in range(256)):
        return None  # tiktoken starts every word from single-byte tokens
    try:
        encoding = tiktoken.Encoding(
            "minimind", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=added
        )
    except ValueError:
        return None
    fast = FastEncoder(encoding)
    if check:
        texts = probe_texts(backend)
        expected = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        if fast.encode_batch(texts) != expected:
            return None
    return fast
