"""Training a MiniMind tokenizer (the `tokenizer train` command line is in minimind.data.commands).

Byte-level BPE as in MiniMind2: no normalizer, no prefix space, the 256 byte symbols always
in the vocabulary, `<|endoftext|>`/`<|im_start|>`/`<|im_end|>` as ids 0/1/2. We add the tag
tokens (tokens.py) as ids 3-10, inside the vocabulary size, so a model sized for 6400 ids
covers them. Texts stream through `train_from_iterator`; memory grows with the number of
distinct words, not with the corpus. Loading and saving live in tokenizer.py.
"""

import json
import os
import re
from collections.abc import Iterable, Sized
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from minimind.tokenizer.chat import CHAT_TEMPLATE
from minimind.tokenizer.tokenizer import Tokenizer
from minimind.tokenizer.tokens import SPECIAL_TOKENS, TAG_TOKENS

# Encoding cuts added tokens out of the text before BPE sees it, so training must not spend
# merges on their fragments (MiniMind2's pretraining texts are full of literal `<|im_end|>`).
_ADDED = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, *TAG_TOKENS)))
_DIGIT = re.compile(r"(\d)")  # split keeping each digit as a piece of its own
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")  # CJK ideographs


def _mark_non_special(backend: tokenizers.Tokenizer, tokens: Iterable[str]) -> tokenizers.Tokenizer:
    """The same tokenizer with `tokens` marked non-special (the trainer marks every token it
    reserves special, which would make decode(skip_special_tokens=True) drop the tags)."""
    data = json.loads(backend.to_str())
    names = set(tokens)
    for entry in data["added_tokens"]:
        if entry["content"] in names:
            entry["special"] = False
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def _cut_cjk(text: str, n: int) -> list[str]:
    """
    >>> _cut_cjk("Mira 米拉住在沙港镇。ok", 2)
    ['Mira ', '米拉', '住在', '沙港', '镇', '。ok']
    """
    out, last = [], 0
    for run in _CJK.finditer(text):
        out.append(text[last : run.start()])
        out += [run.group()[i : i + n] for i in range(0, len(run.group()), n)]
        last = run.end()
    out.append(text[last:])
    return [p for p in out if p]


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 6400,
    show_progress: bool = True,
    split_digits: bool = False,
    cjk_chunk: int | None = None,
) -> Path:
    """Train on `texts` (any iterable, consumed once) and save the folder; returns its path.

    `split_digits`: learn no merge that touches a digit, so every number encodes digit by
    digit ("38" -> "3", "8"; " 38" -> " ", "3", "8") and arithmetic sees the same digit tokens
    in every position and language. The encoding rules stay GPT-2's byte-level BPE (the
    trainer only never sees a digit beside another character), so llama.cpp, tiktoken and
    transformers still encode such a vocabulary exactly.

    `cjk_chunk`: the trainer sees runs of CJK characters cut into pieces of at most this many
    characters, so no token spans more (GPT-2's regex keeps a whole Chinese clause as one word:
    a small vocabulary trained on a repetitive corpus then learns clause tokens such as
    "米拉住在沙港镇", and a fact becomes one opaque token instead of words a model can compose).
    """
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *TAG_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    length = len(texts) if isinstance(texts, Sized) else None  # only sizes the progress bar
    # Each item may be a list of strings: the pieces of one text between added tokens.
    pieces = (_ADDED.split(text) for text in texts)
    if split_digits:
        pieces = ([p for piece in ps for p in _DIGIT.split(piece) if p] for ps in pieces)
    if cjk_chunk:
        pieces = ([p for piece in ps for p in _cut_cjk(piece, cjk_chunk)] for ps in pieces)
    backend.train_from_iterator(pieces, trainer=trainer, length=length)
    tokenizer = Tokenizer(_mark_non_special(backend, TAG_TOKENS), chat_template=CHAT_TEMPLATE)
    return tokenizer.save(out_dir)


def compression(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Characters per token over `texts` (higher is better; report it on held-out text)."""
    chars = tokens = 0
    for text in texts:
        chars += len(text)
        tokens += len(tokenizer.encode(text))
    return chars / max(tokens, 1)
