"""What the rollout stages (GRPO, PPO, SPO) share: rlaif prompts split into train/eval, the
sampling settings and their flags, rewards (rewards.py) checked against the data before
training, an optional frozen reference (the start model), decoding completions into reward
samples, and the evaluation (greedy completions of the held-out prompts, their mean reward).

A subclass gives `experience` (rollouts -> what its loss needs), `count` and `loss`; one
dataset item is one prompt, whatever number of completions it gets.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from minimind.data.padding import PromptDataset
from minimind.data.shards import Shards

from .. import distributed as D
from ..rewards import RewardFunction, RewardSpec, Sample, check_samples_have_answers
from ..rollout import Rollout, rollout
from ..stage import Numbered, Stage, split_eval, token_logps


class RolloutStage(Stage):
    count_is_tokens = False
    uses_reference = True  # whether `beta` > 0 loads the frozen start model

    @classmethod
    def add_sampling_flags(cls, parser, beta: float):
        a = parser.add_argument
        a("--max_gen_len", type=int, default=256, help="new tokens per completion")
        a("--beta", type=float, default=beta, help="KL penalty to the start model (0: none)")
        a("--temperature", type=float, default=1.0)
        a("--top_p", type=float, default=1.0)
        a("--top_k", type=int, default=0)
        a("--reward", default="answer:1", help="weighted rewards, e.g. answer:1,format:0.5")
        a("--reasoning", type=int, default=0, help="1: add the think/answer format reward")
        a("--reward_model_path", default=None, help="a local sequence-classification model")
        a("--mask_truncated", type=int, default=0, help="no loss on rows that hit max_gen_len")
        a("--eval_prompts", type=int, default=64, help="held-out prompts for evaluation")

    @staticmethod
    def sampling_kwargs(args) -> dict:
        spec = args.reward
        if args.reasoning and "format" not in spec:
            spec += ",format:0.5"
        if args.reward_model_path and "model" not in spec:
            spec += ",model:1"
        return dict(
            max_gen_len=args.max_gen_len,
            max_prompt_len=args.max_seq_len,
            beta=args.beta,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            reward=RewardSpec.parse(spec, model_path=args.reward_model_path),
            mask_truncated=bool(args.mask_truncated),
            max_eval=args.eval_prompts,
        )

    def __init__(
        self,
        shards: str | Path,
        *,
        max_gen_len: int = 256,
        max_prompt_len: int = 256,
        beta: float = 0.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        reward: RewardSpec | str = "answer:1",
        mask_truncated: bool = False,
        eval_fraction: float = 0.05,
        max_eval: int = 64,
        registry=None,
    ):
        if max_gen_len < 1 or beta < 0 or not temperature > 0:
            raise ValueError(
                f"invalid {self.name} settings: max_gen_len must be >= 1, beta >= 0, "
                f"temperature > 0 (got {max_gen_len}, {beta}, {temperature})"
            )
        self.shards = Shards(shards)
        self.dataset = PromptDataset(self.shards)
        train, held = split_eval(self.dataset, eval_fraction, max_eval)
        self.train, self.eval = Numbered(train), Numbered(held)
        self.max_gen_len, self.max_prompt_len, self.beta = max_gen_len, max_prompt_len, beta
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.spec = reward if isinstance(reward, RewardSpec) else RewardSpec.parse(reward)
        self.mask_truncated = mask_truncated
        self.registry = registry  # reward name -> function, instead of rewards.REWARDS
        # Fail before training, naming the file and record, if a verifiable reward has nothing
        # to check against.
        source = self.shards.meta["source"].get("path", str(shards))
        check_samples_have_answers(self.spec, self.dataset._answers, source)
        self.ref = None

    # ------------------------------------------------------------------ set-up
    def prepare_model(self, model):
        # The reference is the model as it starts, before a resumed run loads its step weights.
        self._start = copy.deepcopy(model) if self.beta > 0 and self.uses_reference else None
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

    # ------------------------------------------------------------------ rollouts and rewards
    def samples(self, prompts, answers, ro: Rollout) -> list[Sample]:
        """The reward samples of a rollout: completions decoded without their stop token."""
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

    def sample(self, prompts: list[list[int]], seed: int, temperature: float | None = None):
        """Completions of `prompts` from the live policy -> Rollout."""
        return rollout(
            self.ctx.policy,
            prompts,
            max_new_tokens=self.max_gen_len,
            temperature=self.temperature if temperature is None else temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed,
            stop_token_ids=self.stop_ids,
            pad_id=self.pad_id,
            mask_truncated=self.mask_truncated,
            device=self.ctx.device,
        )

    def batch_seed(self, batch) -> int:
        """The rollout seed of a micro-batch: (run seed, step, rank, its first data index)."""
        return self.ctx.rng_seed(int(batch["index"][0]) if len(batch["index"]) else 0)

    def ref_logps(self, ro: Rollout, labels: torch.Tensor) -> torch.Tensor:
        with self.ctx.autocast():
            return token_logps(self.ref, ro.input_ids, labels, ro.attention_mask, self.temperature)[
                0
            ]

    def rollout_stats(self, ro: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        lengths = torch.tensor([len(c) for c in ro.completions], dtype=torch.float32)
        return {
            "reward": float(rewards.mean()),
            "completion_len": float(lengths.mean()),
            "truncated_frac": float(ro.truncated.float().mean()),
            "rollout_tokens_per_s": ro.new_tokens / max(ro.seconds, 1e-9),
            **{f"reward_{k}": sum(v) / len(v) for k, v in self.reward_fn.last_parts.items()},
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model):
        """Greedy completions of the held-out prompts: mean reward, and each part's."""
        world = self.ctx.world
        idx = list(range(world.rank, len(self.eval), world.world_size))
        items = [self.eval[i] for i in idx]
        prompts = [it["prompt_ids"][-self.max_prompt_len :].tolist() for it in items]
        answers = [it["answer"] for it in items]
        sums, keys = [0.0], ["reward"]
        if items:
            ro = self.sample(prompts, seed=0, temperature=0.0)
            rewards = self.reward_fn(self.samples(prompts, answers, ro))
            sums = [float(rewards.sum())] + [sum(v) for v in self.reward_fn.last_parts.values()]
            keys += [f"reward_{k}" for k in self.reward_fn.last_parts]
        # Every rank takes part in the all-reduce, with the same keys (spec order).
        keys = ["reward"] + [f"reward_{k}" for k in self.spec.active()]
        sums += [0.0] * (len(keys) - len(sums))
        total = D.all_reduce_sum(
            torch.tensor([*sums, len(idx)], dtype=torch.float64, device=self.ctx.device), world
        )
        if total[-1] == 0:
            return None
        return {k: float(v / total[-1]) for k, v in zip(keys, total[:-1], strict=True)}

    def fingerprint(self):
        return {
            "data": self.shards.meta["source"]["blake2b"],
            "tokenizer": self.shards.tokenizer["blake2b"],
            self.name: {"reward": self.spec.weights},
        }
