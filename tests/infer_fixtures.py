"""Tiny models with tokenizers for inference tests (chat, server, web): a checkpoint folder made
in seconds, so every test loads a real model through the real loader."""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.checkpoint import save_checkpoint
from minimind.data.demo import write_demo_corpus
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import train_tokenizer

VOCAB = 400


def make_tokenizer(root: Path) -> Path:
    """A byte-level BPE tokenizer (VOCAB ids, all special and tag tokens) from the demo corpus."""
    files = write_demo_corpus(root / "corpus", seed=0, size_mb=0.05)
    texts = files["pretrain"].read_text("utf-8").splitlines()
    return train_tokenizer(texts, root / "tokenizer", vocab_size=VOCAB, show_progress=False)


def tiny_chat_model(seed: int = 0, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset("tiny", **{"vocab_size": VOCAB, **kw})).eval()


def make_checkpoint(root: Path, seed: int = 0, **kw) -> Path:
    """A checkpoint folder (config, weights, tokenizer) of a random tiny model under root."""
    tok = make_tokenizer(root)
    return save_checkpoint(root / "model", tiny_chat_model(seed, **kw), tokenizer_dir=tok)
