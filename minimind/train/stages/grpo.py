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

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch

from minimind.data.padding import PromptDataset
from minimind.data.shards import Shards

from ..objectives import GRPO_AGGREGATIONS, aggregate, group_advantages, grpo_token_loss
from ..rewards import RewardFunction, RewardSpec, Sample, check_samples_have_answers
from ..rollout import Rollout, rollout
from ..stage import (
    IGNORE_INDEX,
    LossOutput,
    Numbered,
    Stage,
    register,
    split_eval,
    token_logps,
)


@register
class GRPOStage(Stage):
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
    count_is_tokens = False

    @classmethod
    def add_flags(cls, parser):
        a = parser.add_argument
        a("--num_generations", type=int, default=8, help="completions per prompt (G)")
        a("--max_gen_len", type=int, default=256, help="new tokens per completion")
        a("--beta", type=float, default=0.02, help="k3 KL penalty to the start model (0: none)")
        a("--epsilon", type=float, default=0.2, help="clip range below 1")
        a("--epsilon_high", type=float, default=None, help="clip range above 1 (default: eps)")
        a("--loss_type", default="dapo", choices=GRPO_AGGREGATIONS)
        a("--scale_rewards", type=int, default=1, help="divide advantages by the group std")
        a("--num_iterations", type=int, default=1, help="optimizer updates per rollout batch")
        a("--temperature", type=float, default=1.0)
        a("--top_p", type=float, default=1.0)
        a("--top_k", type=int, default=0)
        a("--reward", default="answer:1", help="weighted rewards, e.g. answer:1,format:0.5")
        a("--reasoning", type=int, default=0, help="1: add the think/answer format reward")
        a("--reward_model_path", default=None, help="a local sequence-classification model")
        a("--mask_truncated", type=int, default=0, help="no loss on rows that hit max_gen_len")
        a("--drop_zero_std", type=int, default=0, help="no loss on groups with equal rewards")
        a("--eval_prompts", type=int, default=64, help="held-out prompts for evaluation")

    @classmethod
    def from_args(cls, args, data):
        spec = args.reward
        if args.reasoning and "format" not in spec:
            spec += ",format:0.5"
        if args.reward_model_path and "model" not in spec:
            spec += ",model:1"
        return cls(
            data,
            num_generations=args.num_generations,
            max_gen_len=args.max_gen_len,
            max_prompt_len=args.max_seq_len,
            beta=args.beta,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            loss_type=args.loss_type,
            scale_rewards=bool(args.scale_rewards),
            num_iterations=args.num_iterations,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            reward=RewardSpec.parse(spec, model_path=args.reward_model_path),
            mask_truncated=bool(args.mask_truncated),
            drop_zero_std=bool(args.drop_zero_std),
            max_eval=args.eval_prompts,
        )

    def __init__(
        self,
        shards: str | Path,
        *,
        num_generations: int = 8,
        max_gen_len: int = 256,
        max_prompt_len: int = 256,
        beta: float = 0.02,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "dapo",
        scale_rewards: bool = True,
        num_iterations: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        reward: RewardSpec | str = "answer:1",
        mask_truncated: bool = False,
        drop_zero_std: bool = False,
        eval_fraction: float = 0.05,
        max_eval: int = 64,
        registry=None,
    ):
        errors = []
        if num_generations < 2:
            errors.append(f"num_generations must be >= 2 (a group), got {num_generations}")
        if max_gen_len < 1 or num_iterations < 1:
            errors.append("max_gen_len and num_iterations must be >= 1")
        if beta < 0 or epsilon <= 0 or not temperature > 0:
            errors.append("beta must be >= 0, epsilon and temperature > 0")
        if loss_type not in GRPO_AGGREGATIONS:
            errors.append(f"loss_type must be one of {', '.join(GRPO_AGGREGATIONS)}")
        if errors:
            raise ValueError("invalid GRPO settings: " + "; ".join(errors))
        self.shards = Shards(shards)
        self.dataset = PromptDataset(self.shards)
        train, held = split_eval(self.dataset, eval_fraction, max_eval)
        self.train, self.eval = Numbered(train), Numbered(held)
        self.G, self.max_gen_len, self.max_prompt_len = num_generations, max_gen_len, max_prompt_len
        self.beta, self.eps_low = beta, epsilon
        self.eps_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_type, self.scale_rewards, self.mu = loss_type, scale_rewards, num_iterations
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.spec = reward if isinstance(reward, RewardSpec) else RewardSpec.parse(reward)
        self.mask_truncated, self.drop_zero_std = mask_truncated, drop_zero_std
        self.registry = registry  # reward name -> function, instead of rewards.REWARDS
        # Fail before training, naming the file and record, if a verifiable reward has nothing
        # to check against.
        check_samples_have_answers(
            self.spec, self.dataset._answers, self.shards.meta["source"].get("path", str(shards))
        )
        self.ref = None

    # ------------------------------------------------------------------ set-up
    def prepare_model(self, model):
        # The reference is the model as it starts, before a resumed run loads its step weights.
        self._start = copy.deepcopy(model) if self.beta > 0 else None
        return model

    def setup(self, ctx):
        super().setup(ctx)
        if self._start is not None:
            self.ref = ctx.frozen(self._start)
        self._start = None
        self.tokenizer = ctx.tokenizer()
        self.reward_fn = RewardFunction(self.spec, device=ctx.device, registry=self.registry)
        mcfg = ctx.trained.config
        self.stop_ids = (mcfg.eos_token_id,)
        self.pad_id = mcfg.pad_token_id

    def train_dataset(self):
        return self.train

    def eval_dataset(self):
        return self.eval

    def seq_len(self):
        return self.max_prompt_len + self.max_gen_len

    def collate(self, items):
        return {
            "prompt_ids": [item["prompt_ids"][-self.max_prompt_len :] for item in items],
            "answers": [item["answer"] for item in items],
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }

    def num_samples(self, batch):
        return int(batch["index"].shape[0])  # prompts (kept through the experience hook)

    # ------------------------------------------------------------------ experience
    def _samples(self, prompts, answers, ro: Rollout) -> list[Sample]:
        tok, out = self.tokenizer, []
        for i, comp in enumerate(ro.completions):
            ids = comp[:-1] if comp and comp[-1] in self.stop_ids else list(comp)
            prompt = tok.decode(prompts[i], skip_special_tokens=True)
            out.append(
                Sample(
                    prompt=[{"role": "user", "content": prompt}],
                    completion=tok.decode(ids, skip_special_tokens=True),
                    answer=answers[i],
                )
            )
        return out

    def _rollout(self, prompts: list[list[int]], seed: int, temperature: float) -> Rollout:
        return rollout(
            self.ctx.policy,
            prompts,
            max_new_tokens=self.max_gen_len,
            temperature=temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed,
            stop_token_ids=self.stop_ids,
            pad_id=self.pad_id,
            mask_truncated=self.mask_truncated,
            device=self.ctx.device,
        )

    def experience(self, batch):
        g = self.G
        prompts = [p.tolist() for p in batch["prompt_ids"] for _ in range(g)]
        answers = [a for a in batch["answers"] for _ in range(g)]
        seed = self.ctx.rng_seed(int(batch["index"][0]) if len(batch["index"]) else 0)
        ro = self._rollout(prompts, seed, self.temperature)
        rewards = self.reward_fn(self._samples(prompts, answers, ro)).to(self.ctx.device)
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
            with self.ctx.autocast():
                out["ref_logps"] = token_logps(
                    self.ref, ro.input_ids, labels, ro.attention_mask, self.temperature
                )[0]
        lengths = torch.tensor([len(c) for c in ro.completions], dtype=torch.float32)
        out["stats"] = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, g).std(1).mean()),
            "zero_std_frac": float(zero_std.float().mean()),
            "completion_len": float(lengths.mean()),
            "truncated_frac": float(ro.truncated.float().mean()),
            "rollout_tokens_per_s": ro.new_tokens / max(ro.seconds, 1e-9),
            **{f"reward_{k}": sum(v) / len(v) for k, v in self.reward_fn.last_parts.items()},
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

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model):
        """Greedy completions of the held-out prompts: mean reward, and each part's."""
        world = self.ctx.world
        idx = list(range(world.rank, len(self.eval), world.world_size))
        if not idx:
            return None
        items = [self.eval[i] for i in idx]
        prompts = [it["prompt_ids"][-self.max_prompt_len :].tolist() for it in items]
        answers = [it["answer"] for it in items]
        ro = rollout(
            self.ctx.policy,
            prompts,
            max_new_tokens=self.max_gen_len,
            temperature=0.0,
            stop_token_ids=self.stop_ids,
            pad_id=self.pad_id,
            device=self.ctx.device,
        )
        rewards = self.reward_fn(self._samples(prompts, answers, ro))
        sums = [float(rewards.sum())] + [sum(v) for v in self.reward_fn.last_parts.values()]
        keys = ["reward"] + [f"reward_{k}" for k in self.reward_fn.last_parts]
        from .. import distributed as D

        total = D.all_reduce_sum(
            torch.tensor([*sums, len(idx)], dtype=torch.float64, device=self.ctx.device), world
        )
        return {k: float(v / total[-1]) for k, v in zip(keys, total[:-1], strict=True)}

    def fingerprint(self):
        return {
            "data": self.shards.meta["source"]["blake2b"],
            "tokenizer": self.shards.tokenizer["blake2b"],
            "grpo": {"G": self.G, "reward": self.spec.weights, "loss_type": self.loss_type},
        }
