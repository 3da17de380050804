"""Tokenizer training and loading, the chat template and SFT loss masks.

The bottom of the package: imports `tokenizers` (and `tiktoken`, as a faster encoder for the
same ids, fast.py) and nothing from minimind outside itself.
"""

from minimind.tokenizer.chat import CHAT_TEMPLATE, encode_chat, render
from minimind.tokenizer.tokenizer import Tokenizer, load_tokenizer
from minimind.tokenizer.train import compression, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "Tokenizer",
    "compression",
    "encode_chat",
    "load_tokenizer",
    "render",
    "train_tokenizer",
]
