"""minimind.train.objectives: parity with TRL's DPO and GRPO losses; PPO's pieces by definition.

TRL 1.16 keeps each loss inside a trainer method that reads attributes of `self`, runs the model
and logs metrics: `DPOTrainer._compute_loss` and `GRPOTrainer._compute_loss` (there is no
standalone `dpo_loss` any more). The parity tests call those real methods unbound, with a
stand-in `self` (a SimpleNamespace carrying exactly the attributes they read) and a stand-in
model whose per-token log-probs are a tensor we control, so we compare against TRL's code, not
a transcription of it. If TRL renames an attribute the stand-in lacks, the test fails loudly
(AttributeError) rather than comparing against something else. Losses, logged rewards, clip
fractions and KL, and gradients wrt the log-probs agree within 1e-6; the parity runs in float64
so that it measures definitions, not rounding order (a bf16 test covers the dtype handling).

What cannot be called, and why:
- GRPO's group advantages are inline in `_generate_and_score_completions` (hundreds of lines
  that tokenize, generate and call reward functions); its six lines are replicated here with
  TRL's own `nanstd`.
- TRL 1.x removed its PPO trainer, so GAE, whitening and the value loss are checked against
  transcriptions of TRL 0.x's PPO loop and `masked_whiten` / `masked_var`, and GAE also against
  the definition (a discounted sum of TD residuals) computed one sequence at a time.
- TRL 1.16's `sigmoid` DPO ignores `label_smoothing`; ours is conservative DPO there (as older
  TRL), which is checked as (1 - eps) * TRL(chosen, rejected) + eps * TRL(rejected, chosen).
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minimind.train.objectives import (
    DPO_LOSSES,
    GRPO_AGGREGATIONS,
    aggregate,
    approx_kl,
    dpo_loss,
    explained_variance,
    gae,
    group_advantages,
    grpo_token_loss,
    sequence_logps,
    value_loss,
    whiten,
)

TOL = dict(rtol=1e-6, atol=1e-6)
F64 = torch.float64


def _trl():
    return pytest.importorskip("trl", reason="the parity tests need trl (pip install trl)")


def _seed(*case) -> int:
    return zlib.crc32(repr(case).encode())  # stable across runs, unlike hash() of a str


def _identity(x, *args, **kwargs):
    return x


def _accelerator():
    return SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        gather=_identity,
        gather_for_metrics=_identity,
        reduce=_identity,
        sync_gradients=True,
    )


def _prefix_mask(gen: torch.Generator, rows: int, T: int) -> torch.Tensor:
    """(rows, T) bool, right padded, every row with at least one token."""
    lengths = torch.randint(1, T + 1, (rows,), generator=gen)
    return torch.arange(T) < lengths[:, None]


# ---------------------------------------------------------------- DPO


def _trl_dpo(loss_type, beta, label_smoothing, token_logps, mask, ref_logps):
    """TRL's `DPOTrainer._compute_loss` on rows [chosen..., rejected...]: token_logps (2B, T),
    mask (2B, T) bool, ref_logps (2B,) token sums. Returns (mean loss, eval metrics)."""
    trainer = _trl().DPOTrainer
    rows, T = token_logps.shape
    # TRL shifts the completion mask by one: column 0 is the prompt's last token
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)

    def model(**kwargs):
        # the fused LM head returns log-prob 0 where the label is -100 (outside the completion)
        zeros = torch.zeros(rows, T, dtype=token_logps.dtype)
        return SimpleNamespace(
            log_probs=torch.where(mask, token_logps, 0.0),
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros(rows, T, dtype=torch.bool),
        )

    metrics = defaultdict(lambda: defaultdict(list))
    fake = SimpleNamespace(
        model=SimpleNamespace(training=False),  # eval: no token counting from attention_mask
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=metrics,
        _total_train_tokens=0,
        args=SimpleNamespace(),
    )
    B = rows // 2
    inputs = {
        "input_ids": torch.zeros(rows, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, T + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_logps[:B],
        "ref_rejected_logps": ref_logps[B:],
    }
    loss = trainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, metrics["eval"]


def _swap(x: torch.Tensor) -> torch.Tensor:
    """Rows [chosen, rejected] -> [rejected, chosen]."""
    return torch.cat(x.chunk(2, dim=0)[::-1], dim=0)


def _trl_dpo_reference(loss_type, beta, eps, token_logps, mask, ref_logps):
    """TRL's loss; for sigmoid with eps > 0 the cDPO mixture of TRL's sigmoid both ways round."""
    if loss_type == "sigmoid" and eps > 0:
        forward, metrics = _trl_dpo("sigmoid", beta, 0.0, token_logps, mask, ref_logps)
        backward, _ = _trl_dpo(
            "sigmoid", beta, 0.0, _swap(token_logps), _swap(mask), _swap(ref_logps)
        )
        return (1 - eps) * forward + eps * backward, metrics
    return _trl_dpo(loss_type, beta, eps, token_logps, mask, ref_logps)


DPO_CASES = [
    (loss_type, beta, eps)
    for loss_type in DPO_LOSSES
    for beta in (0.05, 0.1, 0.5)
    for eps in ((0.0, 0.1, 0.3) if loss_type in ("sigmoid", "robust") else (0.0,))
]


@pytest.mark.parametrize(("loss_type", "beta", "eps"), DPO_CASES)
def test_dpo_matches_trl(loss_type, beta, eps):
    gen = torch.Generator().manual_seed(_seed(loss_type, beta, eps))
    B, T = 5, 7
    mask = _prefix_mask(gen, 2 * B, T)
    base = -3 * torch.rand(2 * B, T, generator=gen, dtype=F64)
    ref_base = torch.where(mask, base, 0.0).sum(1) + 2 * torch.randn(
        2 * B, generator=gen, dtype=F64
    )
    ipo = loss_type == "ipo"
    n = mask.sum(1).to(F64)

    def ours(token_logps, ref_sums):
        logps = sequence_logps(token_logps, mask, average=ipo)
        ref = ref_sums / n if ipo else ref_sums  # IPO: per-token log-probs, as TRL divides
        return dpo_loss(
            logps[:B], logps[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type,
            label_smoothing=eps,
        )  # fmt: skip

    # the whole batch: mean loss and gradients wrt policy and reference log-probs
    tok_a, ref_a = base.clone().requires_grad_(), ref_base.clone().requires_grad_()
    tok_b, ref_b = base.clone().requires_grad_(), ref_base.clone().requires_grad_()
    terms = ours(tok_a, ref_a)
    terms.losses.mean().backward()
    trl_loss, _ = _trl_dpo_reference(loss_type, beta, eps, tok_b, mask, ref_b)
    trl_loss.backward()
    torch.testing.assert_close(terms.losses.mean(), trl_loss, **TOL)
    torch.testing.assert_close(tok_a.grad, tok_b.grad, **TOL)
    torch.testing.assert_close(ref_a.grad, ref_b.grad, **TOL)
    assert tok_a.grad.abs().sum() > 0

    # pair by pair: each loss and the rewards TRL logs (a batch of one logs the value itself)
    scale = n if ipo else torch.ones_like(n)  # TRL's IPO rewards stay in summed units
    for i in range(B):
        rows = torch.tensor([i, B + i])
        loss_i, metrics = _trl_dpo_reference(
            loss_type, beta, eps, base[rows], mask[rows], ref_base[rows]
        )
        torch.testing.assert_close(terms.losses[i], loss_i, **TOL)
        chosen, rejected = metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]
        assert terms.chosen_rewards[i].item() * scale[i].item() == pytest.approx(chosen, abs=1e-6)
        assert terms.rejected_rewards[i].item() * scale[B + i].item() == pytest.approx(
            rejected, abs=1e-6
        )
    assert not terms.chosen_rewards.requires_grad


def test_dpo_regimes_are_exercised():
    """The random inputs above cover both sides of hinge's kink and of IPO's target margin."""
    gen = torch.Generator().manual_seed(0)
    h = 2 * torch.randn(200, generator=gen)
    z = torch.zeros_like(h)
    hinge = dpo_loss(h, z, z, z, beta=0.5, loss_type="hinge").losses
    assert (hinge == 0).any() and (hinge > 0).any()


def test_dpo_validates():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(z, z, z, z, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, loss_type="robust", label_smoothing=0.5)


# ---------------------------------------------------------------- GRPO


def _trl_grpo(loss_type, beta, eps_low, eps_high, logps, old, ref, advantages, mask, max_len):
    """TRL's `GRPOTrainer._compute_loss` on one batch (train mode, no accumulation).
    Returns (loss, train metrics)."""
    trainer = _trl().GRPOTrainer
    B, T = logps.shape

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        assert logits_to_keep == T
        return logps, torch.zeros_like(logps), None

    metrics = defaultdict(lambda: defaultdict(list))
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        accelerator=_accelerator(),
        _metrics=metrics,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 3, dtype=torch.long),
        "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),  # dapo: tokens of the whole generation batch
    }
    return trainer._compute_loss(fake, None, inputs), metrics["train"]


@pytest.mark.parametrize("per_token_advantages", [False, True], ids=["adv_seq", "adv_token"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("kind", GRPO_AGGREGATIONS)
def test_grpo_matches_trl(kind, beta, per_token_advantages):
    gen = torch.Generator().manual_seed(_seed(kind, beta, per_token_advantages))
    B, T, max_len = 8, 9, 12
    eps_low, eps_high = 0.2, 0.28
    mask = _prefix_mask(gen, B, T)
    base = -2 * torch.rand(B, T, generator=gen, dtype=F64)
    old = base + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)  # ratios on both clip edges
    ref = base + 0.5 * torch.randn(B, T, generator=gen, dtype=F64)
    shape = (B, T) if per_token_advantages else (B,)
    adv = torch.randn(*shape, generator=gen, dtype=F64)

    trl_logps = base.clone().requires_grad_()
    trl_loss, metrics = _trl_grpo(
        kind, beta, eps_low, eps_high, trl_logps, old, ref, adv, mask, max_len
    )
    trl_loss.backward()

    # ours over two uneven micro-batches, divided by the global unit count as the engine does
    logps = base.clone().requires_grad_()
    total, units, clipped, kl = 0.0, 0.0, [], []
    for rows in (slice(0, 3), slice(3, B)):
        per_token, stats = grpo_token_loss(
            logps[rows], old[rows], ref[rows] if beta else None, adv[rows],
            eps_low=eps_low, eps_high=eps_high, beta=beta,
        )  # fmt: skip
        loss_sum, n = aggregate(per_token, mask[rows], kind, max_completion_length=max_len)
        total, units = total + loss_sum, units + n
        clipped.append(stats["clipped"][mask[rows]])
        kl += [stats["kl"][mask[rows]]] if beta else []
    loss = total / units
    loss.backward()

    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(logps.grad, trl_logps.grad, **TOL)
    clip_fraction = torch.cat(clipped).double().mean().item()
    assert 0 < clip_fraction < 1
    assert clip_fraction == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    if beta:
        assert torch.cat(kl).mean().item() == pytest.approx(metrics["kl"][-1], abs=1e-6)


def test_grpo_on_policy_and_validation():
    logps = torch.randn(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    per_token, stats = grpo_token_loss(logps, None, None, adv)
    torch.testing.assert_close(per_token, -adv[:, None].expand(2, 3))  # ratio 1
    per_token.sum().backward()
    torch.testing.assert_close(logps.grad, -adv[:, None].expand(2, 3))  # d ratio / d logp = 1
    assert not stats["clipped"].any()
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_token_loss(logps, None, None, adv, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(per_token, torch.ones(2, 3), "dr_grpo")
    with pytest.raises(ValueError, match="kind"):
        aggregate(per_token, torch.ones(2, 3), "bnpo")


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_trl(scale_by_std):
    """TRL's `_generate_and_score_completions`, `sum_then_normalize`, scale_rewards 'group' or
    'none', replicated with TRL's own `nanstd` (the method itself generates and scores)."""
    _trl()
    from trl.trainer.utils import nanstd

    gen = torch.Generator().manual_seed(1)
    G = 4
    rewards = torch.randint(0, 3, (6 * G,), generator=gen).double()
    rewards[:G] = 1.0  # one group with no spread
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    expected = rewards - mean
    if scale_by_std:
        expected = expected / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))

    adv, zero_std = group_advantages(rewards, G, scale_by_std=scale_by_std)
    torch.testing.assert_close(adv, expected, **TOL)
    assert torch.equal(zero_std.repeat_interleave(G), is_std_zero)
    assert zero_std[0] and not zero_std.all()


def test_group_advantages_edges():
    adv, zero = group_advantages(torch.tensor([3.0, 5.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(2)) and zero.all()
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.zeros(5), group_size=2)


def test_half_precision_inputs_compute_in_fp32():
    gen = torch.Generator().manual_seed(2)
    lp = -torch.rand(4, 6, generator=gen, dtype=F64)
    old = lp + 0.1 * torch.randn(4, 6, generator=gen, dtype=F64)
    adv = torch.randn(4, generator=gen, dtype=F64)
    exact, _ = grpo_token_loss(lp, old, old, adv, beta=0.1)
    half, _ = grpo_token_loss(
        lp.bfloat16(), old.bfloat16(), old.bfloat16(), adv.bfloat16(), beta=0.1
    )
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), exact, rtol=0, atol=0.05)  # bf16 input rounding
    terms = dpo_loss(*(lp[:, 0].bfloat16() for _ in range(4)))
    assert terms.losses.dtype == torch.float32


# ---------------------------------------------------------------- PPO


def _trl_ppo_gae(rewards, values, gamma, lam):
    """TRL 0.x PPOTrainer.train, step 6: rewards and values already zero past the response."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def _gae_by_definition(rewards, values, length, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over one sequence (Schulman et al. 2016, Eq. 16)."""
    r, v = rewards[:length].tolist(), [*values[:length].tolist(), 0.0]  # V after the end: 0
    deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    return [
        sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, length)) for t in range(length)
    ]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae(gamma, lam):
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 10
    mask = _prefix_mask(gen, B, T)
    rewards = 0.1 * torch.randn(B, T, generator=gen, dtype=F64)  # a per-token KL penalty...
    lengths = mask.sum(1)
    rewards[torch.arange(B), lengths - 1] += torch.randn(B, generator=gen, dtype=F64)  # + score
    values = torch.randn(B, T, generator=gen, dtype=F64)
    # garbage past the end must not leak in
    noisy_r = torch.where(mask, rewards, 100.0)
    noisy_v = torch.where(mask, values, -50.0)
    adv, ret = gae(noisy_r, noisy_v, mask, gamma, lam)

    trl_adv, trl_ret = _trl_ppo_gae(
        torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0), gamma, lam
    )
    torch.testing.assert_close(adv, trl_adv, **TOL)
    torch.testing.assert_close(ret, trl_ret, **TOL)
    for i in range(B):
        n = int(lengths[i])
        expected = _gae_by_definition(rewards[i], values[i], n, gamma, lam)
        torch.testing.assert_close(adv[i, :n], torch.tensor(expected, dtype=F64), **TOL)
        assert not adv[i, n:].any() and not ret[i, n:].any()
    torch.testing.assert_close(ret, torch.where(mask, adv + values, 0.0))


def _trl_masked_whiten(values, mask, shift_mean=True):
    """TRL 0.x `masked_whiten` with `masked_mean` and the unbiased `masked_var`."""

    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    gen = torch.Generator().manual_seed(4)
    mask = _prefix_mask(gen, 5, 8)
    x = 3 + 2 * torch.randn(5, 8, generator=gen, dtype=F64)
    out = whiten(torch.where(mask, x, 1e6), mask, shift_mean=shift_mean)
    expected = _trl_masked_whiten(x, mask.to(F64), shift_mean=shift_mean)
    torch.testing.assert_close(out[mask], expected[mask], **TOL)
    assert not out[~mask].any()
    inside = out[mask] - (0 if shift_mean else x[mask].mean())
    assert inside.mean().item() == pytest.approx(0, abs=1e-9)
    assert inside.var().item() == pytest.approx(1, abs=1e-6)  # unbiased, as TRL
    with pytest.raises(ValueError, match="two"):
        whiten(x, torch.eye(5, 8, dtype=torch.bool)[:1])


def test_value_loss_clips_pessimistically():
    old, ret, clip = torch.zeros(1, 4), torch.ones(1, 4), 0.2
    v = torch.tensor([[0.1, 0.5, -0.5, 0.9]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = value_loss(v, old, ret, mask, clip)
    # inside the clip range: plain squared error; moved past it toward R: the clipped (larger)
    # error with no gradient; moved away from R: the unclipped (larger) error with gradient
    expected = torch.tensor([[0.5 * 0.9**2, 0.5 * 0.8**2, 0.5 * 1.5**2, 0.0]])
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[-0.9, 0.0, -1.5, 0.0]]))
    # random inputs: TRL PPO's 0.5 * max(vf_losses1, vf_losses2) where the mask is set
    gen = torch.Generator().manual_seed(5)
    v, old, ret = (torch.randn(4, 6, generator=gen, dtype=F64) for _ in range(3))
    mask = _prefix_mask(gen, 4, 6)
    vpredclipped = torch.clamp(v, old - clip, old + clip)
    trl = 0.5 * torch.max(torch.square(v - ret), torch.square(vpredclipped - ret))
    torch.testing.assert_close(value_loss(v, old, ret, mask, clip), torch.where(mask, trl, 0.0))


def test_approx_kl_is_masked_half_squared_log_ratio():
    gen = torch.Generator().manual_seed(6)
    mask = _prefix_mask(gen, 3, 5)
    lp, old = (torch.randn(3, 5, generator=gen, dtype=F64) for _ in range(2))
    got = approx_kl(torch.where(mask, lp, 9.0), old, mask)
    assert got.item() == pytest.approx((0.5 * (lp - old)[mask] ** 2).mean().item(), abs=1e-12)
    assert approx_kl(lp, lp, mask).item() == 0


def test_explained_variance():
    gen = torch.Generator().manual_seed(7)
    mask = _prefix_mask(gen, 4, 6)
    ret = torch.randn(4, 6, generator=gen, dtype=F64)
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    mean = ret[mask].mean()
    assert explained_variance(torch.full_like(ret, mean.item()), ret, mask).item() == (
        pytest.approx(0.0, abs=1e-12)
    )
    noisy = ret + 0.1 * torch.randn(4, 6, generator=gen, dtype=F64)
    assert 0.9 < explained_variance(noisy, ret, mask).item() < 1.0
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask).item())
