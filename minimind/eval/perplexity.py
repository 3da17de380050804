"""Perplexity and bits per byte of a model on held-out text.

Owns `perplexity` (the measure) and the choice of text it is measured on: `held_out_texts`
(the tail of a pretraining file, which the pretrain stage never trains on) and `read_texts`
(any jsonl or plain text file). Does not own loading the model (minimind.infer.load) or the
table that prints the figures (cli.py).

Framing: a document is `[bos] + text + [eos]`, the bos given as context only: our pretraining
shards frame every document so (minimind.data.prepare, as MiniMind frames a pretraining
sample), so this measures the predictions training makes. A model trained with another framing
(e.g. documents separated by one eos) is measured as it was trained with `prefix_id`. A
document longer than `seq_len` predictions is cut into consecutive windows of `seq_len`
predictions, each window seeing only its own tokens (as packed training windows do).

Bits per byte = the total NLL in bits over the UTF-8 bytes of the texts (the framing tokens
count in the NLL, not in the bytes). Unlike perplexity, which is per token, it does not depend on
the tokenizer: two models with different vocabularies are compared on the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    seq_len: int = 512,
    batch_size: int = 16,
    prefix_id: int | None = None,
) -> dict:
    """Mean NLL per predicted token (nats), perplexity (exp of it) and bits per byte of
    `model` (ours, minimind.model) on `texts`, framed as the module docstring says.

    Batched (windows sorted by length, right-padded; the model is causal, so padding after a
    window changes none of its logits), under no_grad, in eval mode (the caller's mode is put
    back), on the model's device. Returns {"nll", "perplexity", "bits_per_byte", "tokens",
    "bytes", "documents"}.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    first = tokenizer.bos_id if prefix_id is None else prefix_id
    windows: list[list[int]] = []  # each: seq_len + 1 tokens at most (inputs, then last label)
    n_bytes = 0
    for text in texts:
        ids = [first, *tokenizer.encode(text), tokenizer.eos_id]
        n_bytes += len(text.encode("utf-8"))
        windows += [ids[s : s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    windows.sort(key=len, reverse=True)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                width = len(batch[0]) - 1
                x = torch.full((len(batch), width), tokenizer.pad_id, dtype=torch.long)
                y = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                for i, w in enumerate(batch):
                    x[i, : len(w) - 1] = torch.tensor(w[:-1])
                    y[i, : len(w) - 1] = torch.tensor(w[1:])
                flat = y.reshape(-1).to(device)
                at = (flat != IGNORE_INDEX).nonzero().squeeze(1)
                # logits only at the labelled positions: (N, V), not (B, T, V)
                logits = model(x.to(device), logits_at=at).logits.float()
                total += F.cross_entropy(logits, flat[at], reduction="sum").item()
                n_tokens += at.numel()
    finally:
        model.train(was_training)
    nll = total / max(n_tokens, 1)
    return {
        "nll": nll,
        "perplexity": math.exp(nll),
        "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "documents": len(texts),
    }


def read_texts(path: str | os.PathLike) -> list[str]:
    """The documents of a file: each record's strings for a `.jsonl` data file of any kind
    (minimind.data.texts; a pretraining file gives one document per line), else the whole
    file as one document."""
    path = Path(path)
    if path.suffix == ".jsonl":
        from minimind.data.texts import iter_texts

        return list(iter_texts([path]))
    return [path.read_text(encoding="utf-8")]


def held_out_texts(path: str | os.PathLike, fraction: float = 0.005, max_docs: int = 128):
    """The last `fraction` of a pretraining jsonl's documents (at most `max_docs`, at least 1).

    The pretrain stage holds out the END of its packed stream (minimind.train.stage.split_eval:
    the last 1% of windows, at most 256), and the shards keep the file's order, so the file's
    last documents are evaluated on, never trained on. Half that share keeps clear of the
    window cut for documents of about equal length, as the demo's are.
    """
    lines = [line for line in Path(path).read_text("utf-8").splitlines() if line.strip()]
    n = max(1, min(max_docs, int(len(lines) * fraction)))
    return [json.loads(line)["text"] for line in lines[-n:]]
