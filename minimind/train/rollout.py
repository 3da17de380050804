"""Rollouts for the RL stages (GRPO, PPO, SPO): sample completions from the live policy and lay
them out as a training batch.

Owns `rollout` and the `Rollout` batch. Sampling is minimind.infer.generation's batched
KV-cache decoding (left-padded prompts, a per-row stop at the first stop token, a budget of
`max_new_tokens`), run through `Policy` (policy.py: live weights, eval mode, never rebinding
parameters). The random stream is a private generator seeded by the caller (the stages derive
it from (seed, step, rank, data index)), so a resumed run samples the same completions.

Layout of the batch, N rows (prompt i repeated as the caller asked), P = longest prompt,
C = longest completion:
    full        (N, P + C): prompt right-aligned in [0, P) (left padding), completion from P,
                            then right padding
    input_ids   (N, P + C - 1) = full[:, :-1]
    labels      (N, P + C - 1): label t is full[:, t + 1] where that token is a completion
                            token up to and including the first stop token, else -100 (the
                            prompt, pads, and with `mask_truncated` every token of a row that
                            ran out of budget: its return says nothing about how it would end)
    attention_mask (N, P + C - 1) bool: real tokens (prompt and completion), False on pads
    sample_logps (N, P + C - 1) fp32: the log-prob each completion token had when sampled
                            (at its label position; 0 elsewhere). `stage.token_logps` of the
                            same model on this batch gives the same values (within 1e-5 in
                            fp32: tested), so they serve as the "old" policy of PPO's ratio.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minimind.infer.generation import Completion

from .stage import IGNORE_INDEX


@dataclass
class Rollout:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    sample_logps: torch.Tensor
    completions: list[Completion]
    prompt_len: int
    seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    @property
    def truncated(self) -> torch.Tensor:
        """(N,) bool: rows that ran out of budget before a stop token."""
        return torch.tensor([c.finish_reason == "length" for c in self.completions])

    def completion_mask(self) -> torch.Tensor:
        """(N, T) bool: the positions whose label is a trained completion token."""
        return self.labels != IGNORE_INDEX


def layout(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    *,
    trained: Sequence[bool] | None = None,
    logprobs: Sequence[Sequence[float] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask, sample_logps) of prompt/completion pairs, as laid
    out in the module docstring. trained[i] False labels no token of row i.

    >>> ids, labels, mask, _ = layout([[5, 6], [7]], [[8, 2], [9]], 0, torch.device("cpu"))
    >>> ids.tolist(), labels.tolist(), mask.int().tolist()
    ([[5, 6, 8], [0, 7, 9]], [[-100, 8, 2], [-100, 9, -100]], [[1, 1, 1], [0, 1, 1]])
    """
    n = len(prompts)
    p = max(len(x) for x in prompts)
    c = max(1, max(len(x) for x in completions))
    full = torch.full((n, p + c), pad_id, dtype=torch.long)
    real = torch.zeros(n, p + c, dtype=torch.bool)
    target = torch.zeros(n, p + c, dtype=torch.bool)
    lps = torch.zeros(n, p + c, dtype=torch.float32)
    for i, (prompt, comp) in enumerate(zip(prompts, completions, strict=True)):
        full[i, p - len(prompt) : p] = torch.as_tensor(list(prompt), dtype=torch.long)
        full[i, p : p + len(comp)] = torch.as_tensor(list(comp), dtype=torch.long)
        real[i, p - len(prompt) : p + len(comp)] = True
        if trained is None or trained[i]:
            target[i, p : p + len(comp)] = True
        if logprobs is not None and logprobs[i] is not None:
            lps[i, p : p + len(comp)] = torch.as_tensor(list(logprobs[i]), dtype=torch.float32)
    labels = torch.where(target[:, 1:], full[:, 1:], IGNORE_INDEX)
    return (
        full[:, :-1].to(device),
        labels.to(device),
        real[:, :-1].to(device),
        lps[:, 1:].to(device),
    )


def rollout(
    policy,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    pad_id: int = 0,
    mask_truncated: bool = False,
    device: torch.device | None = None,
) -> Rollout:
    """Sample one completion per prompt row from `policy` (policy.Policy) -> Rollout."""
    t0 = time.perf_counter()
    completions = policy.generate(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=stop_token_ids,
        logprobs=True,
    )
    seconds = time.perf_counter() - t0
    trained = [not (mask_truncated and c.finish_reason == "length") for c in completions]
    device = device or next(policy.model.parameters()).device
    ids, labels, mask, lps = layout(
        prompts,
        completions,
        pad_id,
        device,
        trained=trained,
        logprobs=[c.logprobs for c in completions],
    )
    return Rollout(ids, labels, mask, lps, completions, max(len(p) for p in prompts), seconds)
