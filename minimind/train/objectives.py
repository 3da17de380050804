"""Preference and policy-gradient objectives as pure tensor functions (torch only).

Owns the arithmetic of the DPO, GRPO, PPO and SPO losses: log-ratios, clipping, KL estimators,
advantages (group baselines, GAE), whitening, aggregation, and the diagnostics logged with them.
It does not own models, rollouts, rewards or batching (the stages under stages/ do), nor the
division by the step's unit count (the engine does).

Loss contract. A stage returns the SUM of its micro-batch's per-unit losses and the number of
units; the engine divides by the global unit count of the update (all micro-batches, all
processes). So `aggregate` returns `(loss_sum, units)` with `loss_sum / units` equal to the
reference's mean on the whole batch, and DPO's units are pairs: `dpo_loss(...).losses.sum()`
over `B`. Math runs in at least fp32 whatever the input dtype (bf16 log-probs are upcast).

Papers, with the reference each function matches (TRL 1.16 unless stated):
- DPO, Rafailov et al. 2023, Eq. 7 (`sigmoid`); conservative DPO (cDPO, Mitchell 2023):
  label smoothing of the sigmoid loss; robust DPO, Chowdhury et al. 2024 (`robust`);
  IPO, Azar et al. 2023, Eq. 17 (`ipo`); SLiC, Zhao et al. 2023 (`hinge`). TRL 1.16's `sigmoid`
  no longer reads `label_smoothing` (older TRL did: the cDPO form used here); with 0 they agree.
- GRPO, Shao et al. 2024 (DeepSeekMath), Eq. 3: group-relative advantages, PPO's clipped ratio
  per token, and a k3 KL penalty to the reference; Dr. GRPO, Liu et al. 2025 (no per-sequence
  length normalisation); DAPO, Yu et al. 2025 (token-mean aggregation, asymmetric clip range
  `eps_low` / `eps_high`).
- k3, Schulman 2020, "Approximating KL divergence": exp(r) - r - 1 with r = ref - logp, an
  unbiased, non-negative estimator of KL(pi || ref) on samples from pi.
- PPO, Schulman et al. 2017, Eq. 7 (clipped surrogate) and the PPO2 clipped value loss;
  GAE, Schulman et al. 2016, Eq. 16; whitening and the value loss follow TRL's former PPO
  trainer (removed from TRL 1.x), whose code the tests transcribe.
- SPO (single-stream policy optimisation) reuses `clipped_token_loss` with its own baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def _f32(x: Tensor) -> Tensor:
    """Upcast half precisions to fp32; fp32 and fp64 pass through unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ---------------------------------------------------------------- preference (DPO family)


@dataclass
class DPOTerms:
    losses: Tensor  # (B,) one loss per pair
    chosen_rewards: Tensor  # (B,) beta * (logp - ref_logp), detached
    rejected_rewards: Tensor  # (B,)


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Per-sequence log-probability: sum (default) or mean of `token_logps` (B, T) over `mask`.

    Positions outside the mask are ignored even when they hold -inf or NaN. An empty row
    averages to 0 (its count is clamped to 1, as TRL does).

    >>> lp = torch.tensor([[-1.0, -2.0, float("-inf")]])
    >>> m = torch.tensor([[1, 1, 0]])
    >>> sequence_logps(lp, m), sequence_logps(lp, m, average=True)
    (tensor([-3.]), tensor([-1.5000]))
    """
    mask = mask.bool()
    total = torch.where(mask, _f32(token_logps), 0.0).sum(-1)  # (B,)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOTerms:
    """Per-pair preference losses from sequence log-probabilities, each (B,).

    With h = (logp_c - ref_c) - (logp_r - ref_r) and eps = label_smoothing:
      sigmoid: -(1-eps) log s(beta h) - eps log s(-beta h)   (DPO; cDPO when eps > 0)
      robust:  (-(1-eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)   (unbiased under
               labels flipped with probability eps)
      hinge:   relu(1 - beta h)   (SLiC)
      ipo:     (h - 1/(2 beta))^2   (beta is IPO's tau)
    IPO is meant for length-normalised log-probs; which aggregation the inputs carry is the
    caller's choice: pass `sequence_logps(..., average=True)` for policy and reference alike to
    match TRL, which divides by the completion length inside its IPO loss. Rewards are in the
    same units as the inputs (per token for averaged log-probs).

    >>> z = torch.zeros(2)
    >>> dpo_loss(z, z, z, z).losses  # h = 0: log 2
    tensor([0.6931, 0.6931])
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, not {loss_type!r}")
    if loss_type in ("sigmoid", "robust") and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), not {label_smoothing}")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing has no meaning for the {loss_type} loss")

    chosen_ratio = _f32(chosen_logps) - _f32(ref_chosen_logps)  # (B,)
    rejected_ratio = _f32(rejected_logps) - _f32(ref_rejected_logps)
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        clean = -(1 - eps) * F.logsigmoid(beta * h)
        flipped = -eps * F.logsigmoid(-beta * h)
        losses = (clean - flipped) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    return DPOTerms(
        losses=losses,
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
    )


# ---------------------------------------------------------------- policy gradient (GRPO, SPO)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref), elementwise: exp(d) - d - 1, d = ref - logp.

    >>> k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]))
    tensor([0.0000, 0.7183])
    """
    d = _f32(ref_logps) - _f32(logps)
    return torch.exp(d) - d - 1


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """GRPO's group-relative advantages (Shao et al. 2024, Sec. 4.1.2), as TRL computes them.

    `rewards` (N*G,) holds N groups of G completions of one prompt, group after group.
    Returns (advantages (N*G,), zero_std (N,) bool). A = r - mean_group, divided by
    (std_group + eps) when `scale_by_std` (std unbiased, as TRL's nanstd; Dr. GRPO sets
    scale_by_std=False). zero_std marks groups whose rewards are all equal: their advantages
    are 0 and they carry no gradient (DAPO's dynamic sampling drops them).

    >>> adv, zero = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    >>> adv, zero
    (tensor([ 0.7070, -0.7070,  0.0000,  0.0000]), tensor([False,  True]))
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = _f32(rewards).reshape(-1, group_size)  # (N, G)
    mean = r.mean(dim=1, keepdim=True)
    if group_size > 1:
        std = r.std(dim=1, keepdim=True)  # unbiased (Bessel), as TRL
    else:
        std = torch.zeros_like(mean)  # TRL: a single completion has no spread
    adv = r - mean
    if scale_by_std:
        adv = adv / (std + eps)
    zero_std = torch.isclose(std, torch.zeros_like(std)).squeeze(1)
    return adv.reshape(-1), zero_std


def clipped_token_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, Eq. 7), negated as a loss.

    loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logps - old_logps).
    `logps`, `old_logps` (B, T); `advantages` (B,) per sequence or (B, T) per token.
    `old_logps=None` means on-policy (one update per rollout): r = 1 with the gradient of r.
    Returns (per_token (B, T), clipped (B, T) bool): clipped marks tokens where the clipped
    branch is active and the gradient is zero (r below 1 - eps_low with A < 0, or above
    1 + eps_high with A > 0), TRL's `clip_ratio/region_mean` before masking.
    """
    logps = _f32(logps)
    old = logps.detach() if old_logps is None else _f32(old_logps)
    ratio = torch.exp(logps - old)  # (B, T)
    adv = _f32(advantages)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # (B, 1)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    r = ratio.detach()
    clipped = ((r < 1 - eps_low) & (adv < 0)) | ((r > 1 + eps_high) & (adv > 0))
    return per_token, clipped


def grpo_token_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's per-token loss (Shao et al. 2024, Eq. 3): clipped surrogate + beta * k3 KL.

    `ref_logps` may be None when beta is 0 (no reference model needed). Returns
    (per_token (B, T), stats) with stats["clipped"] (B, T) bool and, when `ref_logps` is given,
    stats["kl"] (B, T) detached k3 values; mask and average them with the per-token loss.
    """
    per_token, clipped = clipped_token_loss(
        logps, old_logps, advantages, eps_low=eps_low, eps_high=eps_high
    )
    stats: dict[str, Tensor] = {"clipped": clipped}
    if ref_logps is None:
        if beta != 0.0:
            raise ValueError("beta != 0 needs ref_logps")
        return per_token, stats
    kl = k3_kl(logps, ref_logps)  # (B, T)
    if beta != 0.0:
        per_token = per_token + beta * kl
    stats["kl"] = kl.detach()
    return per_token, stats


def aggregate(
    per_token: Tensor, mask: Tensor, kind: str, max_completion_length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Reduce a per-token loss (B, T) over `mask` to (loss_sum, units), both scalar tensors.

      grpo:    mean over each sequence's tokens, mean over sequences -> (sum of means, B)
      dr_grpo: every token's loss over a constant B * max_completion_length (Liu et al. 2025)
               -> (sum / max_completion_length, B)
      dapo:    mean over all tokens of the update (Yu et al. 2025) -> (sum, number of tokens)
    loss_sum / units over a whole batch is TRL's loss for the same loss_type; summed over
    micro-batches and processes it is that loss on the global batch (TRL's `dapo` normalises by
    the tokens of the whole generation batch, i.e. the same thing).

    >>> pt, m = torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    >>> [tuple(t.item() for t in aggregate(pt, m, k, 4)) for k in GRPO_AGGREGATIONS]
    [(4.0, 2.0), (1.5, 2.0), (6.0, 3.0)]
    """
    mask = mask.bool()
    masked = torch.where(mask, _f32(per_token), 0.0)  # (B, T)
    batch = masked.new_tensor(float(per_token.shape[0]))
    if kind == "grpo":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return per_seq.sum(), batch
    if kind == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        return masked.sum() / max_completion_length, batch
    if kind == "dapo":
        return masked.sum(), mask.sum().to(masked.dtype)
    raise ValueError(f"kind must be one of {GRPO_AGGREGATIONS}, not {kind!r}")


# ---------------------------------------------------------------- PPO (actor-critic)


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation per token (Schulman et al. 2016, Eq. 16).

    `rewards`, `values`, `mask` (B, T); the mask is a prefix per row (right padding): each
    sequence ends at its last real token, where nothing is bootstrapped. Rewards are usually
    the score at that last token plus a per-token KL penalty. delta_t = r_t + gamma V_{t+1}
    - V_t; A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = A + V), both (B, T),
    zero outside the mask, with no gradient. Whatever lies beyond the mask is ignored.

    >>> a, ret = gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.zeros(1, 3),
    ...              torch.tensor([[1, 1, 0]]), gamma=1.0, lam=1.0)
    >>> a, ret
    (tensor([[1., 1., 0.]]), tensor([[1., 1., 0.]]))
    """
    v = torch.where(mask.bool(), _f32(values), 0.0)  # (B, T)
    r = torch.where(mask.bool(), _f32(rewards), 0.0).to(v.dtype)
    m = mask.to(v.dtype)
    T = r.shape[1]
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]
        running = delta + gamma * lam * next_m * running  # next_m = 0 ends the episode
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + v) * m


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Masked whitening, as TRL's `masked_whiten`: (x - mean) / sqrt(var + 1e-8) over `mask`.

    The variance is unbiased (Bessel), as TRL's `masked_var`. `shift_mean=False` adds the mean
    back (rewards keep their sign; only their scale changes). Unlike TRL, positions outside the
    mask come back as 0 (TRL's PPO zero-fills them right after).

    >>> whiten(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0]))
    tensor([-0.7071,  0.7071,  0.0000])
    """
    mask = mask.bool()
    n = mask.sum()
    if n < 2:
        raise ValueError("whitening needs at least two unmasked values")
    x = _f32(x)
    masked = torch.where(mask, x, 0.0)
    mean = masked.sum() / n
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> Tensor:
    """PPO2's clipped value loss per token, as TRL's PPO: 0.5 max((v - R)^2, (v_clip - R)^2).

    v_clip = clamp(v, old - clip, old + clip) keeps the critic near the values it had when the
    rollout was scored. All (B, T); zero outside the mask.
    """
    v = _f32(values)
    old = _f32(old_values)
    ret = _f32(returns)
    v_clipped = torch.clamp(v, old - clip, old + clip)
    per_token = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2)
    return torch.where(mask.bool(), per_token, 0.0)


@torch.no_grad()
def approx_kl(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of 0.5 (logp - old)^2 (k2; Schulman 2020), a scalar for logging.

    TRL's PPO logs the same quantity as `approxkl`, but averages over padding too.
    """
    mask = mask.bool()
    d = _f32(logps) - _f32(old_logps)
    return torch.where(mask, 0.5 * d**2, 0.0).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over the mask, a scalar: 1 for a perfect critic, 0 for one that
    predicts the mean, negative for worse. NaN when the returns are constant (as SB3, CleanRL).

    >>> ret, m = torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]])
    >>> explained_variance(ret, ret, m), explained_variance(torch.full((1, 3), 1.5), ret, m)
    (tensor(1.), tensor(0.))
    """
    mask = mask.bool()
    n = mask.sum().clamp(min=1)
    ret = _f32(returns)
    err = ret - _f32(values)

    def var(x: Tensor) -> Tensor:
        mean = torch.where(mask, x, 0.0).sum() / n
        return torch.where(mask, (x - mean) ** 2, 0.0).sum() / n

    var_ret = var(ret)
    if var_ret == 0:
        return torch.full_like(var_ret, float("nan"))
    return 1 - var(err) / var_ret
