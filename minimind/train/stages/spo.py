"""SPO, Single-stream Policy Optimization (Xu & Ding 2025, arXiv 2509.13232): one completion
per prompt, a persistent per-prompt value tracker as the baseline, advantages normalised over
the whole batch, prompts drawn by priority; MiniMind's `trainer/train_spo.py`.

The paper, and how it is followed here:
- Tracker: a Beta(alpha, beta) belief over each training prompt's success rate; the baseline
  is p = alpha / (alpha + beta), read BEFORE the prompt's new reward is added. After reward r
  in [0, 1]: alpha <- rho alpha + r, beta <- rho beta + (1 - r).
- KL-adaptive forgetting: rho = 2^(-D / D_half), clipped to [rho_min, rho_max], where D is how
  far the policy moved on this prompt since it was last seen: the mean absolute difference
  between the log-probs its previous completion had then and has now (one extra forward over
  the previous completions of the batch's prompts). A prompt seen for the first time gets
  rho_max. Defaults as the authors' recipe: D_half 0.06, rho in [0.875, 0.96].
- Initialisation: with `--init_samples` n0 > 0, n0 completions of every training prompt from
  the starting policy, s of them successful, give alpha = N (s + 0.5) / (n0 + 1), beta =
  N (n0 - s + 0.5) / (n0 + 1), N = 1 / (1 - rho_min) (the tracker's effective memory); with
  n0 = 0 every prompt starts at alpha = beta = 0.5.
- Advantages: A = r - p over the batch, then (A - mean) / (std + 1e-8) over the whole global
  batch (every rank's), never per group. Loss: PPO's clipped surrogate per token with the
  sequence's advantage, token-mean over the batch (on-policy: ratio 1 with its gradient).
- Prioritised sampling: each loaded micro-batch of prompts is resampled, with replacement,
  with weights sqrt(p (1 - p)) + 0.05 (the recipe's exploration epsilon), so prompts the
  model sometimes solves are drawn most. Deviation: the paper samples from the whole training
  set; resampling within the loaded batch keeps the engine's sampler (and so exact resume and
  the epoch structure) unchanged. The draw is seeded by (seed, step, rank).
- Rewards are taken as success in [0, 1] (a verifiable reward); other rewards are clipped to
  [0, 1] for the tracker (the advantage uses the raw reward).

The tracker (alpha, beta, and each prompt's last completion with its log-probs) is the
stage's state: saved in every step checkpoint, restored exactly on resume, and kept identical
on every rank (updates are all-gathered).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..objectives import clipped_token_loss
from ..rollout import layout
from ..stage import IGNORE_INDEX, LossOutput, eval_mode, register, token_logps
from .rl import RolloutStage

EXPLORATION = 0.05  # added to sqrt(p (1 - p)): no prompt's weight is ever 0


@register
class SPOStage(RolloutStage):
    name = "spo"
    help = "single-stream policy optimisation with a per-prompt value tracker (train_spo.py)"
    order = 55
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "rlaif-mini.jsonl",
        "save_weight": "spo",
        "from_weight": "full_sft",
        "learning_rate": 1e-6,
        "batch_size": 16,
        "max_seq_len": 256,
    }

    @classmethod
    def add_flags(cls, parser):
        a = parser.add_argument
        a("--epsilon", type=float, default=0.2, help="clip range of the ratio")
        a("--d_half", type=float, default=0.06, help="policy change that halves the memory")
        a("--rho_min", type=float, default=0.875)
        a("--rho_max", type=float, default=0.96)
        a("--init_samples", type=int, default=0, help="completions per prompt for the prior")
        a("--prioritize", type=int, default=1, help="resample prompts by sqrt(p(1-p))")
        cls.add_sampling_flags(parser, beta=0.0)

    @classmethod
    def from_args(cls, args, data):
        return cls(
            data,
            epsilon=args.epsilon,
            d_half=args.d_half,
            rho_min=args.rho_min,
            rho_max=args.rho_max,
            init_samples=args.init_samples,
            prioritize=bool(args.prioritize),
            **cls.sampling_kwargs(args),
        )

    def __init__(
        self,
        shards: str | Path,
        *,
        epsilon: float = 0.2,
        d_half: float = 0.06,
        rho_min: float = 0.875,
        rho_max: float = 0.96,
        init_samples: int = 0,
        prioritize: bool = True,
        **kw,
    ):
        if not 0 < rho_min <= rho_max <= 1 or d_half <= 0 or init_samples < 0 or epsilon <= 0:
            raise ValueError(
                "invalid SPO settings: need 0 < rho_min <= rho_max <= 1, d_half > 0, "
                "init_samples >= 0, epsilon > 0"
            )
        super().__init__(shards, **kw)
        self.eps, self.d_half, self.rho_min, self.rho_max = epsilon, d_half, rho_min, rho_max
        self.init_samples, self.prioritize = init_samples, prioritize
        n = len(self.dataset)
        self.alpha = torch.full((n,), 0.5, dtype=torch.float64)
        self.beta_ = torch.full((n,), 0.5, dtype=torch.float64)
        # index -> (completion token ids, their log-probs when sampled): for the KL of rho
        self.last: dict[int, tuple[list[int], list[float]]] = {}
        self._initialised = False

    # ------------------------------------------------------------------ state
    def state_dict(self):
        return {
            "alpha": self.alpha.clone(),
            "beta": self.beta_.clone(),
            "last": {int(k): (list(v[0]), list(v[1])) for k, v in self.last.items()},
            "initialised": self._initialised,
        }

    def load_state_dict(self, state):
        if state:
            self.alpha, self.beta_ = state["alpha"].clone(), state["beta"].clone()
            self.last = {int(k): (list(v[0]), list(v[1])) for k, v in state["last"].items()}
            self._initialised = bool(state["initialised"])

    def value(self, index: torch.Tensor) -> torch.Tensor:
        """The tracker's success estimate p of prompts `index` (dataset positions)."""
        a, b = self.alpha[index.cpu()], self.beta_[index.cpu()]
        return a / (a + b)

    # ------------------------------------------------------------------ the prior
    @torch.no_grad()
    def _initialise(self) -> None:
        """The offline prior from `init_samples` completions of every training prompt."""
        self._initialised = True
        n0 = self.init_samples
        if n0 == 0:
            return
        scale = 1.0 / (1.0 - self.rho_min) if self.rho_min < 1 else 1.0
        for start in range(0, len(self.train), 16):
            items = [self.train[i] for i in range(start, min(start + 16, len(self.train)))]
            prompts = [it["prompt_ids"][-self.max_prompt_len :].tolist() for it in items]
            rows = [p for p in prompts for _ in range(n0)]
            answers = [it["answer"] for it in items for _ in range(n0)]
            ro = self.sample(rows, seed=self.ctx.rng_seed(start, 0x5B0))
            wins = self.reward_fn(self.samples(rows, answers, ro)).clamp(0, 1).view(-1, n0)
            s = wins.sum(1).double().cpu()
            index = torch.tensor([it["index"] for it in items])
            self.alpha[index] = scale * (s + 0.5) / (n0 + 1)
            self.beta_[index] = scale * (n0 - s + 0.5) / (n0 + 1)

    # ------------------------------------------------------------------ experience
    def _prioritised(self, batch) -> list[int]:
        """Positions (into the loaded micro-batch) of the prompts to roll out."""
        n = len(batch["index"])
        if not self.prioritize or n == 0:
            return list(range(n))
        p = self.value(batch["index"])
        weights = (p * (1 - p)).sqrt() + EXPLORATION
        gen = torch.Generator().manual_seed(self.batch_seed(batch) ^ 0x5F0)
        return torch.multinomial(weights, n, replacement=True, generator=gen).tolist()

    @torch.no_grad()
    def _rho(self, index: list[int]) -> torch.Tensor:
        """Forgetting factors of prompts `index` from the policy's change on their last
        completion (rho_max for prompts never seen)."""
        rho = torch.full((len(index),), self.rho_max, dtype=torch.float64)
        seen = [j for j, i in enumerate(index) if i in self.last]
        if not seen:
            return rho
        items = [self.dataset[index[j]] for j in seen]
        prompts = [it["prompt_ids"][-self.max_prompt_len :].tolist() for it in items]
        comps = [self.last[index[j]][0] for j in seen]
        ids, labels, mask, then = layout(
            prompts,
            comps,
            self.pad_id,
            self.ctx.device,
            logprobs=[self.last[index[j]][1] for j in seen],
        )
        model = self.ctx.policy.model
        with eval_mode(model), self.ctx.autocast():
            now = token_logps(model, ids, labels, mask, self.temperature)[0]
        valid = labels != IGNORE_INDEX
        d = ((now - then).abs() * valid).sum(1) / valid.sum(1).clamp(min=1)
        rho[seen] = torch.pow(2.0, -d.double().cpu() / self.d_half)
        return rho.clamp(self.rho_min, self.rho_max)

    def experience(self, batch):
        if not self._initialised:
            self._initialise()
        picks = self._prioritised(batch)
        index = batch["index"][picks]
        prompts = [batch["prompt_ids"][j].tolist() for j in picks]
        answers = [batch["answers"][j] for j in picks]
        ro = self.sample(prompts, self.batch_seed(batch))
        rewards = self.reward_fn(self.samples(prompts, answers, ro)).double().cpu()
        baseline = self.value(index)
        raw = rewards - baseline
        # Global normalisation: mean and std over every rank's batch.
        everything = _gather(raw, self.ctx.world)
        adv = (raw - everything.mean()) / (everything.std() + 1e-8) if len(everything) > 1 else raw
        rho = self._rho(index.tolist())
        self._update_tracker(index, rewards, rho, ro)
        return {
            "input_ids": ro.input_ids,
            "labels": ro.labels,
            "attention_mask": ro.attention_mask,
            "advantages": adv.float().to(self.ctx.device),
            "index": batch["index"],  # the loaded prompts: what the sampler counts
            "stats": {
                **self.rollout_stats(ro, rewards),
                "baseline": float(baseline.mean()),
                "rho": float(rho.mean()),
                "distinct_prompts": len(set(index.tolist())) / max(len(index), 1),
            },
        }

    def _update_tracker(self, index, rewards, rho, ro) -> None:
        """The Beta update on every rank, from every rank's prompts in rank order."""
        comps = [(list(c), list(c.logprobs or [])) for c in ro.completions]
        local = (index.tolist(), rewards.tolist(), rho.tolist(), comps)
        for idx, rs, rhos, cs in _gather_objects(local, self.ctx.world):
            for i, r, k, comp in zip(idx, rs, rhos, cs, strict=True):
                success = min(max(r, 0.0), 1.0)
                self.alpha[i] = k * self.alpha[i] + success
                self.beta_[i] = k * self.beta_[i] + (1.0 - success)
                self.last[i] = comp

    # ------------------------------------------------------------------ the loss
    def count(self, batch):
        return (batch["labels"] != IGNORE_INDEX).sum()

    def loss(self, model, batch):
        mask = batch["labels"] != IGNORE_INDEX
        logps, aux = token_logps(
            model, batch["input_ids"], batch["labels"], batch["attention_mask"], self.temperature
        )
        per_token, clipped = clipped_token_loss(
            logps, None, batch["advantages"], eps_low=self.eps, eps_high=self.eps
        )
        return LossOutput(
            torch.where(mask, per_token, 0.0).sum(),
            aux=aux if aux.requires_grad else None,
            metrics={"clip_frac": float((clipped & mask).sum())},
        )

    def fingerprint(self):
        fp = super().fingerprint()
        fp["spo"].update(d_half=self.d_half, rho=[self.rho_min, self.rho_max])
        return fp


def _gather(x: torch.Tensor, world) -> torch.Tensor:
    """Every rank's 1-D tensor `x`, concatenated in rank order (CPU)."""
    if not world.distributed:
        return x
    return torch.cat([torch.as_tensor(p) for p in _gather_objects(x.tolist(), world)])


def _gather_objects(obj, world) -> list:
    if not world.distributed:
        return [obj]
    out: list = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out
