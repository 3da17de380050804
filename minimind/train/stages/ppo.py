"""PPO for language models (Schulman et al. 2017; Ouyang et al. 2022): an actor and a critic,
token-level GAE, clipped policy and value losses, several epochs over minibatches of each
rollout batch; MiniMind's `trainer/train_ppo.py`.

- Critic, `--critic head` (default): a value head (one Linear on the final hidden states) on
  the policy's own backbone (`PolicyWithValue`), so one forward gives log-probs and values.
  `--critic model`: a separate critic (`Critic`: a decoder backbone, no LM head, and a value
  head) beside the policy in one trained module (`PolicyAndCritic`, `.lm` and `.critic`); its
  backbone starts as a copy of the start policy's, or from `--critic_from` (a checkpoint
  folder or MiniMind .pth of any size with the same vocabulary, e.g. a smaller model: the
  critic reads the same token ids, it never samples). Either way the critic belongs to the
  trained module: it is in the optimizer (every critic parameter at `--critic_learning_rate`,
  through the engine's per-parameter learning-rate scale), in every step checkpoint and under
  DDP/FSDP2 (both decoders' blocks sharded); the exported model is the policy alone, and
  rollouts sample from `.lm` (under FSDP2 they, and the old actor below, gather the policy's
  weights only).
  Trade-off: the head adds one Linear and no forward, but the value loss's gradient flows
  into the policy's trunk, coupling the two objectives (`--vf_coef` weighs them). A separate
  critic decouples them (MiniMind's design) at the cost of its own weights, gradients and
  AdamW moments (four copies of its parameters in fp32) and a second forward and backward per
  update; a critic smaller than the policy cuts both costs in proportion to its size.
- Experience (no_grad): one completion per prompt (`--num_generations` for more), the reward
  (rewards.py) at its last token, and per token the KL penalty -kl_coef * (logp - ref_logp)
  to the frozen start model (k1, as in InstructGPT and TRL). The old log-probs and values
  come from one forward of the trained model in eval mode; the advantages from GAE
  (gamma, lambda) over the completion tokens, whitened over the batch. lambda defaults to 1
  (verl's default; TRL's is 0.95): the reward comes at the last token only, and with 0.95 a
  45-token reply passes 0.95^45 = 0.1 of it to its first token, whose choice (work the sum by
  columns, or answer from memory) is what decides it. The rest of that credit is the untrained
  critic's. On the demo, held-out arithmetic moved 53 -> 49 of 158 with 0.95 and 53 -> 72
  with 1 (bench/RESULTS.md, "RL that carries over").
- Updates: `--ppo_epochs` passes over the rollout batch, each in `--num_minibatches`
  minibatches (rows shuffled per epoch by a seeded generator), one optimizer update each:
  clipped surrogate + vf_coef x clipped value loss, averaged over completion tokens. With
  `--target_kl` > 0 the remaining updates of a batch are skipped once the approximate KL
  (mean 0.5 (logp - old)^2, over all ranks) passes 1.5 x target_kl.
- `--update_old_actor_freq` k > 1 (MiniMind's flag): the ratio's "old" policy is a frozen copy
  refreshed every k steps instead of the policy at rollout time; the copy is stage state (in
  checkpoints), so resume stays exact.
- Logged: value loss, explained variance, clip fraction, approx KL, KL to the reference.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed as D
from ..objectives import (
    clipped_token_loss,
    explained_variance,
    gae,
    value_loss,
    whiten,
)
from ..stage import IGNORE_INDEX, LossOutput, eval_mode, register, token_logps
from .rl import RolloutStage


def value_head(hidden_size: int) -> nn.Linear:
    """A scalar head on final hidden states, drawn from a fixed seed: every rank builds the
    same one (FSDP2 shards what each rank holds and, unlike DDP, broadcasts nothing)."""
    head = nn.Linear(hidden_size, 1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (hidden_size + 1), generator=gen)
        head.bias.zero_()
    return head


class PolicyWithValue(nn.Module):
    """The policy `lm` and a scalar value head on its final hidden states.

    forward(...) is lm's, with `values` (B, T) fp32 added to the output: V of the state after
    reading each position (the state that predicts the next token)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.config = lm, lm.config
        self.value_head = value_head(lm.config.hidden_size)

    def forward(self, input_ids, attention_mask=None, **kw):
        out = self.lm(input_ids, attention_mask=attention_mask, **kw)
        out.values = self.value_head(out.hidden_states).squeeze(-1).float()
        return out

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.lm.set_activation_checkpointing(enabled)


class Critic(nn.Module):
    """A separate value model: a decoder backbone (`model`, MiniMindModel: embeddings, blocks,
    final norm; no LM head) and a value head. forward(input_ids, attention_mask) -> values
    (B, T) fp32, V of the state after reading each position. Its MoE balance loss, if any, is
    not trained (PPO's loss adds none for the policy either)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.model, self.config = backbone, backbone.config
        self.value_head = value_head(backbone.config.hidden_size)

    def forward(self, input_ids, attention_mask=None):
        hidden, _aux = self.model(input_ids, attention_mask)
        return self.value_head(hidden).squeeze(-1).float()


class PolicyAndCritic(nn.Module):
    """The policy `lm` and a separate `critic`, trained as one module (one optimizer, one
    checkpoint, one DDP/FSDP2 wrapper). forward(...) is lm's, with the critic's `values`
    (B, T) fp32 on the same input_ids and attention_mask added to the output."""

    def __init__(self, lm: nn.Module, critic: Critic):
        super().__init__()
        self.lm, self.critic, self.config = lm, critic, lm.config

    def forward(self, input_ids, attention_mask=None, **kw):
        out = self.lm(input_ids, attention_mask=attention_mask, **kw)
        out.values = self.critic(input_ids, attention_mask)
        return out

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.lm.set_activation_checkpointing(enabled)
        self.critic.model.gradient_checkpointing = enabled


def load_critic_backbone(path: str | Path) -> nn.Module:
    """The backbone of a checkpoint folder or a MiniMind .pth (read with MiniMind2's 8 query
    heads), as a critic's starting point."""
    from minimind.checkpoint import load_checkpoint
    from minimind.convert.minimind2 import load_minimind2_pth

    path = Path(path)
    if not path.exists():
        raise ValueError(f"--critic_from {path}: no such checkpoint folder or .pth file")
    lm = load_minimind2_pth(path) if path.suffix == ".pth" else load_checkpoint(path)[0]
    return lm.float().train().model


@register
class PPOStage(RolloutStage):
    name = "ppo"
    help = "PPO with a value head or a separate critic, GAE and a KL penalty (train_ppo.py)"
    order = 45
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "rlaif-mini.jsonl",
        "save_weight": "ppo",
        "from_weight": "full_sft",
        "learning_rate": 1e-6,
        "batch_size": 8,
        "max_seq_len": 256,
    }

    @classmethod
    def add_flags(cls, parser):
        a = parser.add_argument
        a(
            "--critic",
            choices=("head", "model"),
            default="head",
            help="head: a value head on the policy's backbone; model: a separate critic model",
        )
        a(
            "--critic_from",
            default=None,
            help="with --critic model: a checkpoint folder or .pth whose backbone starts the "
            "critic (same vocabulary, any size; default: a copy of the start policy)",
        )
        a(
            "--critic_learning_rate",
            type=float,
            default=None,
            help="learning rate of every critic parameter (default: --learning_rate)",
        )
        a("--clip_epsilon", type=float, default=0.2, help="policy ratio clip")
        a("--vf_clip", type=float, default=0.2, help="value clip around the old values")
        a("--vf_coef", type=float, default=0.5, help="weight of the value loss")
        a("--kl_coef", type=float, default=0.02, help="per-token KL penalty in the reward")
        a("--gamma", type=float, default=1.0)
        a("--lam", type=float, default=1.0, help="GAE lambda (docstring: why 1)")
        a("--ppo_epochs", type=int, default=2, help="passes over each rollout batch")
        a("--num_minibatches", type=int, default=2, help="updates per pass")
        a("--target_kl", type=float, default=0.0, help="stop a batch's updates past 1.5x (0 off)")
        a("--update_old_actor_freq", type=int, default=1, help="steps between old-actor copies")
        a("--num_generations", type=int, default=1, help="completions per prompt")
        a("--whiten_advantages", type=int, default=1)
        parser.set_defaults(beta=0.0)  # the KL term is --kl_coef here
        cls.add_sampling_flags(parser, beta=0.0)

    @classmethod
    def from_args(cls, args, data):
        kw = cls.sampling_kwargs(args)
        kw.pop("beta")
        scale = None
        if args.critic_learning_rate is not None:
            scale = args.critic_learning_rate / args.learning_rate
        if args.critic_from and args.critic != "model":
            raise ValueError("--critic_from needs --critic model")
        return cls(
            data,
            critic=args.critic,
            critic_from=args.critic_from,
            critic_lr_scale=scale or 1.0,
            clip_epsilon=args.clip_epsilon,
            vf_clip=args.vf_clip,
            vf_coef=args.vf_coef,
            kl_coef=args.kl_coef,
            gamma=args.gamma,
            lam=args.lam,
            ppo_epochs=args.ppo_epochs,
            num_minibatches=args.num_minibatches,
            target_kl=args.target_kl,
            update_old_actor_freq=args.update_old_actor_freq,
            num_generations=args.num_generations,
            whiten_advantages=bool(args.whiten_advantages),
            **kw,
        )

    def __init__(
        self,
        shards: str | Path,
        *,
        critic: str = "head",
        critic_from: str | Path | nn.Module | None = None,
        critic_lr_scale: float = 1.0,
        clip_epsilon: float = 0.2,
        vf_clip: float = 0.2,
        vf_coef: float = 0.5,
        kl_coef: float = 0.02,
        gamma: float = 1.0,
        lam: float = 1.0,
        ppo_epochs: int = 2,
        num_minibatches: int = 2,
        target_kl: float = 0.0,
        update_old_actor_freq: int = 1,
        num_generations: int = 1,
        whiten_advantages: bool = True,
        **kw,
    ):
        if min(ppo_epochs, num_minibatches, update_old_actor_freq, num_generations) < 1:
            raise ValueError(
                "ppo_epochs, num_minibatches, update_old_actor_freq and num_generations "
                "must be >= 1"
            )
        if critic not in ("head", "model"):
            raise ValueError(f"critic must be 'head' or 'model', not {critic!r}")
        if critic_from is not None and critic != "model":
            raise ValueError("critic_from needs critic='model'")
        if clip_epsilon <= 0 or kl_coef < 0 or not 0 <= lam <= 1 or not 0 <= gamma <= 1:
            raise ValueError("clip_epsilon must be > 0, kl_coef >= 0, gamma and lam in [0, 1]")
        # The reference is loaded when the KL penalty is on (beta is RolloutStage's switch).
        super().__init__(shards, beta=kl_coef, **kw)
        self.critic, self.critic_from = critic, critic_from
        self.critic_lr_scale, self.clip, self.vf_clip = critic_lr_scale, clip_epsilon, vf_clip
        self.vf_coef, self.kl_coef, self.gamma, self.lam = vf_coef, kl_coef, gamma, lam
        self.epochs, self.minibatches, self.target_kl = ppo_epochs, num_minibatches, target_kl
        self.old_freq, self.G, self.whiten = (
            update_old_actor_freq,
            num_generations,
            whiten_advantages,
        )
        self.old_actor: nn.Module | None = None
        self._kl = [0.0, 0.0]  # approx-KL sum and tokens of the current update

    # ------------------------------------------------------------------ set-up
    def prepare_model(self, model):
        super().prepare_model(model)  # the reference: a copy of the start model
        if self.critic == "head":
            return PolicyWithValue(model)
        source = self.critic_from
        if source is None:
            backbone = copy.deepcopy(model.model)
        elif isinstance(source, nn.Module):  # a model given in code (tests, the pipeline)
            backbone = copy.deepcopy(getattr(source, "model", source)).float().train()
        else:
            backbone = load_critic_backbone(source)
        if backbone.config.vocab_size != model.config.vocab_size:
            name = source if isinstance(source, str | Path) else type(source).__name__
            raise ValueError(
                f"--critic_from {name}: {backbone.config.vocab_size} token ids, the policy "
                f"has {model.config.vocab_size}; the critic must use the policy's tokenizer"
            )
        self._critic_config = backbone.config.to_dict()
        return PolicyAndCritic(model, Critic(backbone))

    def export_model(self, model):
        return model.lm

    def lr_scale(self, name):
        critic = name.startswith(("value_head.", "critic."))
        return self.critic_lr_scale if critic else 1.0

    def setup(self, ctx):
        super().setup(ctx)
        if self.old_freq > 1:
            # A plain model of the policy's config holding its full weights (gathered from the
            # shards under FSDP2), refreshed in `experience`.
            from minimind.model import MiniMindForCausalLM

            old = MiniMindForCausalLM(copy.deepcopy(ctx.trained.config))
            old.load_state_dict(ctx.policy.full_state_dict())
            self.old_actor = ctx.frozen(old)

    def fingerprint(self):
        out = super().fingerprint()
        if self.critic == "model":  # resuming with another critic is refused by name
            out[self.name]["critic"] = self._critic_config
        return out

    def state_dict(self):
        if self.old_actor is None:
            return {}
        return {"old_actor": {k: v.detach().cpu() for k, v in self.old_actor.state_dict().items()}}

    def load_state_dict(self, state):
        if self.old_actor is not None and "old_actor" in state:
            self.old_actor.load_state_dict(state["old_actor"])

    # ------------------------------------------------------------------ experience
    @torch.no_grad()
    def experience(self, batch):
        ctx, model = self.ctx, self.ctx.trained
        if self.old_actor is not None and ctx.step % self.old_freq == 0:
            self.old_actor.load_state_dict(ctx.policy.full_state_dict())
        prompts = [p.tolist() for p in batch["prompt_ids"] for _ in range(self.G)]
        answers = [a for a in batch["answers"] for _ in range(self.G)]
        ro = self.sample(prompts, self.batch_seed(batch))
        scores = self.reward_fn(self.samples(prompts, answers, ro)).to(ctx.device)
        labels, mask = ro.labels, ro.completion_mask()
        with eval_mode(model), ctx.autocast():
            logps, values = self._forward(model, ro.input_ids, labels, ro.attention_mask)
            if self.old_actor is not None:
                logps = token_logps(
                    self.old_actor, ro.input_ids, labels, ro.attention_mask, self.temperature
                )[0]
        # Per-token rewards: the KL penalty on every completion token, the score on the last.
        rewards = torch.zeros_like(logps)
        kl = torch.zeros_like(logps)
        if self.ref is not None:
            kl = torch.where(mask, logps - self.ref_logps(ro, labels), 0.0)
            rewards = -self.kl_coef * kl
        last = mask.cumsum(1).argmax(1)  # the last labelled position of each row
        has = mask.any(1)
        rows = torch.arange(len(prompts), device=ctx.device)
        rewards[rows[has], last[has]] += scores[has]
        # GAE over the completion region: positions P-1.. hold the completion's labels, so
        # the sliced mask is a prefix per row, as gae() expects.
        p0 = ro.prompt_len - 1
        adv_c, ret_c = gae(rewards[:, p0:], values[:, p0:], mask[:, p0:], self.gamma, self.lam)
        if self.whiten and int(mask.sum()) > 1:
            adv_c = whiten(adv_c, mask[:, p0:])
        advantages, returns = torch.zeros_like(logps), torch.zeros_like(logps)
        advantages[:, p0:], returns[:, p0:] = adv_c, ret_c
        stats = self.rollout_stats(ro, scores)
        ev = explained_variance(values, returns, mask)
        stats.update(
            kl_ref=float(kl.sum() / mask.sum().clamp(min=1)),
            value_mean=float(values[mask].mean()) if mask.any() else 0.0,
        )
        stats["explained_variance"] = float(ev)  # NaN when every return is equal
        return {
            "input_ids": ro.input_ids,
            "labels": labels,
            "attention_mask": ro.attention_mask,
            "old_logps": logps,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "index": batch["index"],
            "stats": stats,
        }

    def _forward(self, model, input_ids, labels, attention_mask):
        """-> token log-probs (B, T) at the labels (0 elsewhere) and values (B, T)."""
        flat = labels.reshape(-1)
        at = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        out = model(input_ids, attention_mask=attention_mask, logits_at=at)
        logits = out.logits.float() / self.temperature
        picked = logits.gather(1, flat[at, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        logps = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        return logps.index_put((at,), picked).view_as(labels), out.values

    # ------------------------------------------------------------------ updates
    def updates(self, micro):
        """ppo_epochs x num_minibatches updates; each minibatch takes its share of the rows of
        every micro-batch (rows shuffled per epoch, seeded by the step)."""
        for epoch in range(self.epochs):
            gen = torch.Generator().manual_seed(self.ctx.rng_seed(epoch, 0x990))
            perms = [torch.randperm(b["input_ids"].shape[0], generator=gen) for b in micro]
            for k in range(self.minibatches):
                self._kl = [0.0, 0.0]
                yield [_rows(b, p.chunk(self.minibatches)[k]) for b, p in zip(micro, perms)]
                if self.target_kl > 0:
                    kl = torch.tensor(self._kl, dtype=torch.float64, device=self.ctx.device)
                    kl = D.all_reduce_sum(kl, self.ctx.world)
                    if float(kl[0] / kl[1].clamp(min=1)) > 1.5 * self.target_kl:
                        return

    def count(self, batch):
        return (batch["labels"] != IGNORE_INDEX).sum()

    def loss(self, model, batch):
        mask = batch["labels"] != IGNORE_INDEX
        logps, values = self._forward(
            model, batch["input_ids"], batch["labels"], batch["attention_mask"]
        )
        pg, clipped = clipped_token_loss(
            logps, batch["old_logps"], batch["advantages"], eps_low=self.clip, eps_high=self.clip
        )
        vl = value_loss(values, batch["old_values"], batch["returns"], mask, self.vf_clip)
        per_token = torch.where(mask, pg + self.vf_coef * vl, 0.0)
        d = torch.where(mask, logps.detach() - batch["old_logps"], 0.0)
        approx = float((0.5 * d**2).sum())
        self._kl[0] += approx
        self._kl[1] += float(mask.sum())
        metrics = {
            "policy_loss": float(torch.where(mask, pg.detach(), 0.0).sum()),
            "value_loss": float(vl.detach().sum()),
            "clip_frac": float((clipped & mask).sum()),
            "approx_kl": approx,
        }
        return LossOutput(per_token.sum(), metrics=metrics)


def _rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The rows `index` of every (B, ...) tensor of an experienced batch."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == batch["input_ids"].shape[0]:
            out[k] = v[index.to(v.device)]
        elif k != "stats":
            out[k] = v
    return out
