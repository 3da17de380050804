"""Incremental detokenization: token ids in, text out, never half a UTF-8 character.

A byte-level BPE token is a run of bytes, and one Chinese character or emoji is often split
over two or three tokens, so decoding each token on its own prints U+FFFD garbage. The
`StreamDecoder` keeps each token's bytes (the same bytes `tokenizers`' ByteLevel decoder
uses) and feeds them through Python's incremental UTF-8 decoder, which holds back an
unfinished character until its last byte arrives. Joined, the pieces equal a full decode.
This module knows nothing of chat templates or models.
"""

import codecs
from collections.abc import Iterable, Sequence

import tokenizers


def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible map from the 256 printable stand-in characters back to bytes.

    >>> d = _byte_decoder()
    >>> d["a"], d["Ġ"], d["Ċ"], len(d)
    (97, 32, 10, 256)
    """
    # Printable bytes stand for themselves; the others shift to U+0100 and up, in order.
    chars = {b: chr(b) for r in ((33, 126), (161, 172), (174, 255)) for b in range(r[0], r[1] + 1)}
    shifted = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return {c: b for b, c in chars.items()}


def token_bytes(backend: tokenizers.Tokenizer) -> list[bytes]:
    """The bytes each id decodes to, indexed by id.

    As in `tokenizers`' ByteLevel decoder, a token made only of stand-in characters maps back
    to raw bytes and any other token (e.g. an added token with a space) is its UTF-8 text.
    """
    table = _byte_decoder()
    out = []
    for token_id in range(backend.get_vocab_size(with_added_tokens=True)):
        token = backend.id_to_token(token_id) or ""
        if all(c in table for c in token):
            out.append(bytes(table[c] for c in token))
        else:
            out.append(token.encode("utf-8"))
    return out


class StreamDecoder:
    """Decodes one token at a time; `put` returns the text that is now complete.

    Invalid bytes become U+FFFD exactly as in a full decode; `flush` ends the stream and
    returns what is still held back.
    """

    def __init__(self, table: Sequence[bytes], skip_ids: Iterable[int] = ()):
        self._table = table
        self._skip = frozenset(skip_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token_id: int) -> str:
        # An id beyond the vocabulary (a model whose embedding table is larger than its
        # tokenizer, as trained models often are) decodes to nothing, as in a full decode.
        if token_id in self._skip or not 0 <= token_id < len(self._table):
            return ""
        return self._utf8.decode(self._table[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
