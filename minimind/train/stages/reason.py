"""Reasoning distillation: SFT on `<think>...</think><answer>...</answer>` replies (or an
assistant turn with `reasoning_content`), with an extra loss weight on the tags themselves;
MiniMind's `trainer/train_reason.py` (documented as `train_distill_reason.py`).

- Tags: `<think>`, `</think>`, `<answer>`, `</answer>`. Each is located in the label stream as
  its EXACT token sequence (`tag_sequences`): one added token in our tokenizer; several pieces
  in MiniMind2's, where only the whole run of pieces counts, never a lone `<` or `th` elsewhere
  (MiniMind's script up-weights every occurrence of each piece).
- Loss: sum over target tokens of w_t x CE_t, with w_t = `--tag_weight` on tag tokens and 1
  elsewhere; the units are the summed weights, so the engine's division by the global count
  makes the loss a weighted mean and 1x8 = 8x1 still holds (tested).
- Evaluation (`Stage.evaluate`): greedy replies to the held-out prompts: the share that follows
  the layout and the share whose answer block equals the reference's (both read by
  minimind.train.rewards.reasoning_layout), beside the weighted loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from minimind.train.rewards import reasoning_layout

from ..stage import IGNORE_INDEX, LossOutput, register
from .sft import SFTStage

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tag_sequences(tokenizer, tags=TAGS) -> list[list[int]]:
    """The token ids of each tag as the tokenizer writes it alone.

    >>> class Pieces:  # a tokenizer without added tag tokens: "<", "think", ">" ...
    ...     def encode(self, text):
    ...         return [{"<": 1, "/": 2, ">": 3}.get(t, 9) for t in text.replace("think", "T")]
    >>> tag_sequences(Pieces(), ("<think>", "</think>"))
    [[1, 9, 3], [1, 2, 9, 3]]
    """
    return [list(tokenizer.encode(tag)) for tag in tags]


def tag_weights(labels: torch.Tensor, sequences: list[list[int]], weight: float) -> torch.Tensor:
    """Per-position loss weights (B, T) fp32: 0 where unlabelled, `weight` on every position
    inside a complete run of one of `sequences` among the labels, 1 elsewhere.

    >>> labels = torch.tensor([[-100, 5, 1, 9, 3, 1, 7]])
    >>> tag_weights(labels, [[1, 9, 3]], 10.0).tolist()
    [[0.0, 1.0, 10.0, 10.0, 10.0, 1.0, 1.0]]
    """
    w = (labels != IGNORE_INDEX).float()
    tagged = torch.zeros_like(labels, dtype=torch.bool)
    for seq in sequences:
        n = len(seq)
        if n == 0 or n > labels.shape[1]:
            continue
        windows = labels.unfold(1, n, 1)  # (B, T - n + 1, n)
        hit = (windows == torch.tensor(seq, device=labels.device)).all(-1)  # (B, T - n + 1)
        for k in range(n):  # mark all n positions of every hit
            tagged[:, k : k + hit.shape[1]] |= hit
    return torch.where(tagged & (labels != IGNORE_INDEX), weight * w, w)


@register
class ReasonStage(SFTStage):
    name = "reason"
    help = "reasoning distillation: SFT on think/answer replies, tags weighted (train_reason.py)"
    order = 60
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "r1_mix_1024.jsonl",
        "save_weight": "reason",
        "from_weight": "full_sft",
        "learning_rate": 5e-5,
        "max_seq_len": 1024,
    }
    count_is_tokens = False  # units are weighted tokens

    @classmethod
    def add_flags(cls, parser):
        parser.add_argument(
            "--tag_weight", type=float, default=10.0, help="loss weight of the tag tokens"
        )
        parser.add_argument(
            "--eval_prompts", type=int, default=32, help="held-out prompts for the format rate"
        )

    @classmethod
    def from_args(cls, args, data):
        return cls(
            data, args.max_seq_len, tag_weight=args.tag_weight, eval_prompts=args.eval_prompts
        )

    def __init__(
        self,
        shards: str | Path,
        max_seq_len: int,
        *,
        tag_weight: float = 10.0,
        eval_prompts: int = 32,
        **kw,
    ):
        if not tag_weight > 0:
            raise ValueError(f"tag_weight must be > 0, got {tag_weight}")
        super().__init__(shards, max_seq_len, **kw)
        self.tag_weight, self.eval_prompts = tag_weight, eval_prompts
        self.sequences: list[list[int]] | None = None

    def setup(self, ctx):
        super().setup(ctx)
        self.tokenizer = ctx.tokenizer()
        self.sequences = tag_sequences(self.tokenizer)

    def _weights(self, batch) -> torch.Tensor:
        if "weights" not in batch:
            batch["weights"] = tag_weights(batch["labels"], self.sequences, self.tag_weight)
        return batch["weights"]

    def count(self, batch):
        return self._weights(batch).sum()

    def loss(self, model, batch):
        labels = batch["labels"]
        flat = labels.reshape(-1)
        at = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        out = model(batch["input_ids"], logits_at=at)
        ce = F.cross_entropy(out.logits.float(), flat[at], reduction="none")
        w = self._weights(batch).reshape(-1)[at]
        return LossOutput((w * ce).sum(), aux=out.aux_loss if out.aux_loss.requires_grad else None)

    @torch.no_grad()
    def evaluate(self, model):
        """Held-out greedy replies: format rate and answer match, and the weighted loss."""

        data = self.eval_dataset()
        n = min(len(data), self.eval_prompts)
        if n == 0:
            return None
        tok, stop = self.tokenizer, model.config.eos_token_id
        prompts, golds = [], []
        for i in range(n):
            ids, labels = data[i]["input_ids"], data[i]["labels"]
            first = int((labels != IGNORE_INDEX).nonzero()[0])  # the reply starts after it
            prompts.append(ids[: first + 1].tolist())
            gold_ids = [int(t) for t in labels[first:] if t != IGNORE_INDEX and t != stop]
            golds.append(tok.decode(gold_ids, skip_special_tokens=False))
        outs = self.ctx.policy.generate(prompts, max_new_tokens=256, temperature=0.0)
        formatted = answered = 0
        for out, gold in zip(outs, golds, strict=True):
            ids = out[:-1] if out and out[-1] == stop else list(out)
            layout, match = reasoning_layout(tok.decode(ids, skip_special_tokens=False), gold)
            formatted += layout
            answered += match
        loss = self._engine_loss(model)
        return {"loss": loss, "format_rate": formatted / n, "answer_match": answered / n}

    def _engine_loss(self, model) -> float:
        total = units = 0.0
        data = self.eval_dataset()
        for start in range(0, min(len(data), 64), 16):
            batch = self.collate([data[i] for i in range(start, min(start + 16, len(data)))])
            batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
            with self.ctx.autocast():
                total += float(self.loss(model, batch).loss_sum)
            units += float(self.count(batch))
        return total / max(units, 1.0)

    def fingerprint(self):
        return {**super().fingerprint(), "tag_weight": self.tag_weight}
