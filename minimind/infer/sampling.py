"""Logits processors and the next-token choice: pure functions over (B, V) logits.

Owns the arithmetic of temperature, top-k, top-p (nucleus), the sign-aware repetition penalty
and OpenAI's presence/frequency penalties, plus greedy/sampled selection. Each processor takes
logits (B, V) float and returns new logits; `choose` returns token ids (B,). None keeps state,
touches the model or draws from the global RNG (sampling uses an explicit torch.Generator).
Which tokens count as seen, and when a row stops, belong to generation.py.

Filtered-out tokens get -inf, so a later softmax gives them probability exactly 0.
"""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (temperature > 0; 0 means greedy and is handled by `choose`).

    >>> apply_temperature(torch.tensor([[2.0, -4.0]]), 2.0)
    tensor([[ 1., -2.]])
    """
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept too); k = 0 keeps all.

    >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    tensor([[-inf, 3., 2., -inf]])
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020, eq. 3): keep the smallest set of most likely tokens
    whose probability mass is >= p; p = 1 keeps all. The most likely token is always kept.

    Probabilities here are 0.5, 0.3, 0.2: p = 0.8 needs the top two, p = 0.81 all three.

    >>> logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    >>> top_p_filter(logits, 0.8).isfinite()
    tensor([[ True,  True, False]])
    >>> top_p_filter(logits, 0.81).isfinite()
    tensor([[True, True, True]])
    >>> top_p_filter(logits, 0.1).isfinite()
    tensor([[ True, False, False]])
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)
    # Token i is dropped when the tokens before it already reach p: then it is not needed.
    # The small tolerance counts a mass equal to p up to float rounding (0.5 + 0.3 vs 0.8).
    drop_sorted = (probs.cumsum(-1) - probs) >= p - 1e-6
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Sign-aware repetition penalty (Keskar et al. 2019, CTRL sec. 4.1, as transformers does
    it): for tokens already seen, positive logits are divided by `penalty` and negative ones
    multiplied, so penalty > 1 always makes them less likely. seen (B, V) bool.

    >>> seen = torch.tensor([[True, True, False]])
    >>> repetition_penalty(torch.tensor([[2.0, -2.0, 2.0]]), seen, 2.0)
    tensor([[ 1., -4.,  2.]])
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence,
    counts (B, V) being how often token j was generated so far in that row.

    >>> counts = torch.tensor([[0.0, 1.0, 3.0]])
    >>> presence_frequency_penalty(torch.zeros(1, 3), counts, 0.5, 0.25)
    tensor([[ 0.0000, -0.7500, -1.2500]])
    """
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def choose(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row, (B,) long: argmax when temperature == 0, else a draw from
    p = softmax(top_p(top_k(logits / temperature))).

    The draw is inverse transform sampling: one uniform u per row, and the token whose interval
    of the cumulative distribution (float64, so even tiny probabilities keep their mass) holds
    u * total. The randomness is thus one number per row, which `uniform` (B, 1) may supply:
    the continuous batcher draws each row's from that row's own generator, so rows sampled
    together draw exactly what they would alone. Otherwise it comes from `generator`.

    >>> choose(torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]]), temperature=0.0)
    tensor([1, 0])
    >>> g = torch.Generator().manual_seed(0)
    >>> choose(torch.tensor([[0.0, 5.0, 1.0]]), temperature=1.0, top_k=1, generator=g)
    tensor([1])
    >>> p = torch.tensor([[0.5, 0.0, 0.5]]).log()  # u * total below 0.5: token 0, else token 2
    >>> choose(p, 1.0, uniform=torch.tensor([[0.49]])), choose(p, 1.0, uniform=torch.tensor([[0.5]]))
    (tensor([0]), tensor([2]))
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    cdf = logits.double().softmax(-1).cumsum(-1)  # (B, V), non-decreasing
    if uniform is None:
        uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    target = uniform.to(cdf.dtype) * cdf[:, -1:]  # (B, 1), < total since u < 1
    # right=True: the first token whose cumulative mass exceeds the target, never a token of
    # probability 0 (its interval is empty); the clamp guards a target rounded up to the total.
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=cdf.shape[-1] - 1)
