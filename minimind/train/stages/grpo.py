"""GRPO (Shao et al. 2024, DeepSeekMath): G completions per prompt from the live policy,
rewards normalised within each group as advantages, a clipped token-level objective, and an
optional k3 KL penalty to the frozen starting model; MiniMind's `trainer/train_grpo.py`.

- Experience (engine hook, no_grad): each prompt of the micro-batch is sampled G times
  (rollout.py), the completions are decoded and scored (rewards.py: a weighted sum set by
  `--reward`, e.g. "answer:1,format:0.5"; `--reward_model_path` adds a sequence-classification
  reward model), and each group's rewards become advantages (r - mean) / (std + 1e-4), or
  r - mean with `--scale_rewards 0` (Dr. GRPO, Liu et al. 2025). With `--beta` > 0 the frozen
  reference's log-probs are taken here too; beta 0 loads no reference.
- Loss (objectives.py): -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) per
  completion token (DAPO's separate high clip, Yu et al. 2025) plus beta * k3 KL, aggregated
  by `--loss_type`: grpo (per-sequence mean, then mean), dr_grpo (sum / (rows x max_gen_len)),
  dapo (token mean; the default, as in TRL). The engine's units are what the aggregation
  divides by, so splitting a step over micro-batches and ranks changes nothing.
- `--num_iterations` mu > 1 makes mu optimizer updates per batch of rollouts, the "old" policy
  being the sampling-time log-probs (rollout.py: equal to a training forward in fp32). With
  mu = 1 the ratio is exactly 1 and only its gradient matters (old = logps.detach(), as TRL).
- Zero-variance groups (every completion scored alike) carry no signal; their fraction is
  logged, and `--drop_zero_std 1` leaves their rows out of the loss.
- Units: one dataset item is one prompt (the sampler counts prompts), so resume and the
  schedule see prompts, whatever G is.
- Evaluation: greedy completions of the held-out prompts, their mean reward and each part's.

Deviations from MiniMind's script: its log-probs ignored the attention mask on left-padded
prompts (here positions and masks follow the real tokens), its KL term was per token but
averaged with the padding; both fixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..objectives import GRPO_AGGREGATIONS, aggregate, group_advantages, grpo_token_loss
from ..stage import IGNORE_INDEX, LossOutput, register, token_logps
from .rl import RolloutStage


@register
class GRPOStage(RolloutStage):
    name = "grpo"
    help = "group relative policy optimisation with verifiable/model rewards (train_grpo.py)"
    order = 50  # place in `minimind train --help` (the pipeline's order)
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "rlaif-mini.jsonl",
        "save_weight": "grpo",
        "from_weight": "full_sft",
        "learning_rate": 1e-6,
        "batch_size": 4,
        "max_seq_len": 256,  # prompt tokens kept (the last ones)
    }

    @classmethod
    def add_flags(cls, parser):
        a = parser.add_argument
        a("--num_generations", type=int, default=8, help="completions per prompt (G)")
        a("--epsilon", type=float, default=0.2, help="clip range below 1")
        a("--epsilon_high", type=float, default=None, help="clip range above 1 (default: eps)")
        a("--loss_type", default="dapo", choices=GRPO_AGGREGATIONS)
        a("--scale_rewards", type=int, default=1, help="divide advantages by the group std")
        a("--num_iterations", type=int, default=1, help="optimizer updates per rollout batch")
        a("--drop_zero_std", type=int, default=0, help="no loss on groups with equal rewards")
        cls.add_sampling_flags(parser, beta=0.02)

    @classmethod
    def from_args(cls, args, data):
        return cls(
            data,
            num_generations=args.num_generations,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            loss_type=args.loss_type,
            scale_rewards=bool(args.scale_rewards),
            num_iterations=args.num_iterations,
            drop_zero_std=bool(args.drop_zero_std),
            **cls.sampling_kwargs(args),
        )

    def __init__(
        self,
        shards: str | Path,
        *,
        num_generations: int = 8,
        beta: float = 0.02,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "dapo",
        scale_rewards: bool = True,
        num_iterations: int = 1,
        drop_zero_std: bool = False,
        **kw,
    ):
        errors = []
        if num_generations < 2:
            errors.append(f"num_generations must be >= 2 (a group), got {num_generations}")
        if num_iterations < 1 or epsilon <= 0:
            errors.append("num_iterations must be >= 1 and epsilon > 0")
        if loss_type not in GRPO_AGGREGATIONS:
            errors.append(f"loss_type must be one of {', '.join(GRPO_AGGREGATIONS)}")
        if errors:
            raise ValueError("invalid GRPO settings: " + "; ".join(errors))
        super().__init__(shards, beta=beta, **kw)
        self.G, self.eps_low = num_generations, epsilon
        self.eps_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_type, self.scale_rewards, self.mu = loss_type, scale_rewards, num_iterations
        self.drop_zero_std = drop_zero_std

    # ------------------------------------------------------------------ experience
    def experience(self, batch):
        g = self.G
        prompts = [p.tolist() for p in batch["prompt_ids"] for _ in range(g)]
        answers = [a for a in batch["answers"] for _ in range(g)]
        ro = self.sample(prompts, self.batch_seed(batch))
        rewards = self.reward_fn(self.samples(prompts, answers, ro)).to(self.ctx.device)
        adv, zero_std = group_advantages(rewards, g, scale_by_std=self.scale_rewards)
        labels = ro.labels
        if self.drop_zero_std:
            keep = (~zero_std).repeat_interleave(g)
            labels = torch.where(keep[:, None], labels, IGNORE_INDEX)
        out = {
            "input_ids": ro.input_ids,
            "labels": labels,
            "attention_mask": ro.attention_mask,
            "old_logps": ro.sample_logps,
            "advantages": adv,
            "index": batch["index"],
        }
        if self.ref is not None:
            out["ref_logps"] = self.ref_logps(ro, labels)
        out["stats"] = {
            **self.rollout_stats(ro, rewards),
            "reward_std": float(rewards.view(-1, g).std(1).mean()),
            "zero_std_frac": float(zero_std.float().mean()),
        }
        return out

    def updates(self, micro):
        for _ in range(self.mu):
            yield micro

    # ------------------------------------------------------------------ the loss
    def _mask(self, batch) -> torch.Tensor:
        return batch["labels"] != IGNORE_INDEX

    def count(self, batch):
        mask = self._mask(batch)
        if self.loss_type == "dapo":
            return mask.sum()
        return torch.tensor(mask.shape[0])

    def loss(self, model, batch):
        mask = self._mask(batch)
        logps, aux = token_logps(
            model, batch["input_ids"], batch["labels"], batch["attention_mask"], self.temperature
        )
        per_token, stats = grpo_token_loss(
            logps,
            None if self.mu == 1 else batch["old_logps"],  # None: on-policy, ratio 1
            batch.get("ref_logps"),
            batch["advantages"],
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            beta=self.beta,
        )
        loss_sum, _ = aggregate(per_token, mask, self.loss_type, self.max_gen_len)
        # Token statistics aggregated like the loss, so the engine's division by the units
        # gives the same kind of mean.
        metrics = {
            k: float(aggregate(stats[k].float(), mask, self.loss_type, self.max_gen_len)[0])
            for k in ("clipped", "kl")
            if k in stats
        }
        return LossOutput(loss_sum, aux=aux if aux.requires_grad else None, metrics=metrics)

    def fingerprint(self):
        fp = super().fingerprint()
        fp["grpo"].update(G=self.G, loss_type=self.loss_type)
        return fp
