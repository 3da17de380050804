"""Task accuracy: ask a chat model each held-out question, score its answer against the gold.

Owns `score` (pure: is a free-text answer correct?), `answer_accuracy` (greedy batched
generation through minimind.infer, then `score`) and `preference_accuracy` (does the model
give the chosen reply of a held-out DPO pair the higher log-probability?) and
`reasoning_accuracy` (do greedy replies to reasoning prompts follow the think/answer layout, and
is their answer the reference's?). Questions come as rlaif records with an
`answer` field (minimind.data.formats.RLAIFRecord), the format of the demo corpus's eval
splits; `score` is the RL stages' verifiable reward (minimind.train.rewards), not a copy, and
the reasoning check is the reasoning stage's (minimind.train.rewards.reasoning_layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def score(answer: str, gold: str) -> bool:
    """True when `answer` states `gold`: the RL stages' verifiable reward
    (minimind.train.rewards.answer_match), so evaluation and reward agree by construction.

    A numeric gold must be the LAST number of the answer (so echoing the question's operands
    does not count); any other gold must appear as a whole word, case-insensitively (Chinese:
    as a substring). A reply in the `<answer>` layout is judged on its answer block.

    >>> score("17 - 9 = 8.", "8"), score("17 - 9 = 9.", "8"), score("8 + 1 = 9", "8")
    (True, False, False)
    >>> score("By trade, Hugo is a painter.", "painter"), score("painters", "painter")
    (True, False)
    >>> score("薇拉的工作是陶艺师。", "陶艺师")
    True
    """
    from minimind.train.rewards import Sample, answer_match

    return answer_match([Sample([], answer, gold)])[0] == 1.0


def chance_level(rows: Sequence[dict]) -> float:
    """Expected accuracy of guessing: each row's gold drawn uniformly from the distinct golds
    of rows of its own `task`/`kind`/`lang` (rows as read from a demo eval file).

    >>> rows = [{"answer": a, "kind": "job"} for a in ("baker", "doctor", "baker", "potter")]
    >>> round(chance_level(rows), 3)
    0.333
    """
    keys = [(r.get("task"), r.get("kind"), r.get("lang")) for r in rows]
    golds: dict[tuple, set[str]] = {}
    for key, r in zip(keys, rows, strict=True):
        golds.setdefault(key, set()).add(r["answer"])
    return sum(1 / len(golds[k]) for k in keys) / max(len(rows), 1)


@dataclass
class Accuracy:
    correct: int = 0
    total: int = 0
    samples: list[tuple[str, str, str, bool]] = field(default_factory=list)  # q, answer, gold, ok
    oks: list[bool] = field(default_factory=list)  # every item's result, in order

    @property
    def value(self) -> float:
        return self.correct / max(self.total, 1)


def answer_accuracy(
    model,
    tokenizer,
    records: Sequence,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    keep_samples: int = 4,
) -> Accuracy:
    """Greedy answers to each record's prompt (chat template, generation prompt), scored."""
    from minimind.infer import generate
    from minimind.tokenizer import encode_chat

    result = Accuracy()
    model.eval()
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [
            encode_chat(tokenizer, [m.to_dict() for m in r.prompt], add_generation_prompt=True)[0]
            for r in batch
        ]
        outs = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop_token_ids=[tokenizer.eos_id],
        )
        for record, out in zip(batch, outs, strict=True):
            text = tokenizer.decode(out, skip_special_tokens=True).strip()
            ok = score(text, record.answer)
            result.correct += ok
            result.total += 1
            result.oks.append(ok)
            if len(result.samples) < keep_samples:
                result.samples.append((record.prompt[-1].content, text, record.answer, ok))
    return result


def preference_accuracy(model, tokenizer, records: Sequence, *, batch_size: int = 16) -> Accuracy:
    """DPO's held-out measure: the share of preference pairs (DPORecord) whose chosen reply
    has the higher summed log-probability over its assistant tokens (the SFT loss mask).
    `samples` keeps (question, chosen, rejected, ok) of the first pairs; `oks` every pair's."""
    import torch

    from minimind.data.padding import pad_batch, shift_labels
    from minimind.tokenizer import encode_chat

    def row(conv) -> dict:
        ids, mask = encode_chat(tokenizer, [m.to_dict() for m in conv.messages])
        x, y = shift_labels(ids, mask)
        return {"input_ids": x, "labels": y}

    result = Accuracy()
    model.eval()
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        rows = [row(r.chosen) for r in batch] + [row(r.rejected) for r in batch]
        padded = pad_batch(rows, tokenizer.pad_id)
        labels = padded["labels"].to(next(model.parameters()).device)
        with torch.no_grad():
            logits = model(padded["input_ids"].to(labels.device)).logits.float()
        keep = labels != -100
        picked = logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
        seq = (picked * keep).sum(1)
        n = len(batch)
        for i, record in enumerate(batch):
            ok = bool(seq[i] > seq[n + i])
            result.correct += ok
            result.total += 1
            result.oks.append(ok)
            if len(result.samples) < 4:
                result.samples.append(
                    (
                        record.prompt[-1].content,
                        record.chosen.messages[-1].content,
                        record.rejected.messages[-1].content,
                        ok,
                    )
                )
    return result


def reasoning_accuracy(
    model,
    tokenizer,
    records: Sequence,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
) -> tuple[Accuracy, Accuracy]:
    """(format rate, answer match) of greedy replies to reasoning conversations (Conversation
    records ending with the reference assistant turn): each prompt is every turn before it with
    the plain generation prompt (thinking on), as the reasoning stage asks its held-out
    prompts; replies are decoded with their tags (added tokens) and read by
    `reasoning_layout` against the reference reply as the chat template renders it.
    `samples` keep (question, reply, reference, ok) of the first replies."""
    from minimind.infer import generate
    from minimind.tokenizer import encode_chat, render
    from minimind.train.rewards import reasoning_layout

    layout, match = Accuracy(), Accuracy()
    model.eval()
    stop = tokenizer.eos_id
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts, references = [], []
        for r in batch:
            messages, tools = [m.to_dict() for m in r.messages], r.tools
            prompt = render(messages[:-1], tools, add_generation_prompt=True)
            # the reference reply: the last turn as rendered after the generation prompt, up to
            # its <|im_end|> (reasoning_content, if any, rendered inside <think> as trained)
            full = render(messages, tools)
            references.append(full[len(prompt) :].rsplit(tokenizer.decode([stop]), 1)[0])
            prompts.append(encode_chat(tokenizer, messages[:-1], tools, True)[0])
        outs = generate(
            model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[stop]
        )
        for r, out, reference in zip(batch, outs, references, strict=True):
            ids = out[:-1] if out and out[-1] == stop else list(out)
            reply = tokenizer.decode(ids, skip_special_tokens=False)
            ok_layout, ok_match = reasoning_layout(reply, reference)
            for acc, ok in ((layout, ok_layout), (match, ok_match)):
                acc.correct += ok
                acc.total += 1
                acc.oks.append(ok)
                if len(acc.samples) < 4:
                    acc.samples.append((r.messages[-2].content, reply, reference, ok))
    return layout, match
