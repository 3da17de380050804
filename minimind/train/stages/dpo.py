"""DPO (Rafailov et al. 2023): preference pairs, chosen and rejected in one forward, against a
frozen reference; MiniMind's `trainer/train_dpo.py`.

- A batch of B pairs is one (2B, T) forward: rows [0, B) chosen, [B, 2B) rejected, both
  right-padded to one T (so the fused causal kernel stays on, as in SFT). Log-probabilities
  are taken on the assistant tokens only (the SFT loss mask), never on the prompt or pads.
- Sequence log-prob: summed over the reply (`--logp_agg sum`, DPO's definition, the default)
  or averaged over its tokens (`mean`: length-normalised, what IPO assumes).
- The reference is the starting model (`--from_weight`). `--ref model` (default) keeps a
  frozen copy on the device and runs it in the experience hook of every step; `--ref
  precompute` runs it once over the training pairs before the first step, keeps the (N, 2)
  log-probs in memory, indexed by each pair's position in the data, and frees the copy
  (one model less in memory; recomputed, identically, when a run resumes). With LoRA
  (`--lora_rank` r > 0) only adapters train and the reference is the trained model itself
  with its adapters switched off (minimind.model.lora.adapters_off): no copy at all; the
  export is the merged model plus the adapter files, as `minimind train lora` writes.
- Losses (objectives.dpo_loss): sigmoid (default, beta 0.1; label smoothing gives
  conservative DPO), robust (Chowdhury et al. 2024), ipo (Azar et al. 2023), hinge (SLiC).
- `--rpo_alpha` > 0 adds alpha x the chosen reply's negative log-likelihood (mean over its
  tokens) to each pair's loss (RPO, Pang et al. 2024; TRL's `rpo_alpha`, which averages over
  the batch's chosen tokens instead). DPO only moves log-ratios against the reference: when
  the reference finds the chosen reply very unlikely (a behaviour SFT never showed), the pair
  is "won" long before the model would write that reply; the NLL term teaches it to.
- `--replay_data` (SFT conversations) with `--replay_alpha` > 0 replays SFT beside the pairs
  (the "ptx" mix of InstructGPT, Ouyang et al. 2022, applied to DPO): each step's B pairs
  bring B SFT rows drawn from the SFT stage's own training split (its held-out rows never
  appear), seeded by (step, rank, first pair), so resume draws the same ones; they join the
  pairs' forward as rows [2B, 3B) and add alpha x each row's mean token NLL per pair. DPO
  sharpens the policy (mode seeking) and lowers log-probs it was never asked about; the
  replay keeps the SFT distribution where the pairs do not speak.
- Units are pairs: the loss is summed over pairs and the engine divides by the step's pairs.
  Logged per pair: rewards of chosen and rejected (beta x log-ratio to the reference), their
  margin, and the preference accuracy (chosen reward above rejected).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from minimind.data.padding import DPODataset, pad_batch
from minimind.data.shards import Shards
from minimind.model.lora import lora_config_dict

from ..objectives import DPO_LOSSES, dpo_loss, sequence_logps
from ..stage import IGNORE_INDEX, LossOutput, Numbered, eval_mode, register, token_logps
from .lm import LMStage
from .lora import adapter_files, add_lora_flags, lora_from_args, merged_copy


@register
class DPOStage(LMStage):
    name = "dpo"
    help = "direct preference optimisation on chosen/rejected pairs (train_dpo.py)"
    # MiniMind's train_dpo.py: batch 4, 1024 tokens, from full_sft. Its lr (4e-8) is tuned for
    # its own SFT schedule; 1e-6 is the usual DPO rate (TRL's default) and moves a tiny model.
    order = 40  # place in `minimind train --help` (the pipeline's order)
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "dpo.jsonl",
        "save_weight": "dpo",
        "from_weight": "full_sft",
        "learning_rate": 1e-6,
        "batch_size": 4,
        "max_seq_len": 1024,
    }
    count_is_tokens = False
    group_by_length = True
    data_flags: ClassVar[dict[str, str]] = {"replay_data": "sft"}

    @classmethod
    def add_flags(cls, parser):
        a = parser.add_argument
        a("--beta", type=float, default=0.1, help="strength of the KL constraint")
        a("--loss_type", default="sigmoid", choices=DPO_LOSSES)
        a("--label_smoothing", type=float, default=0.0, help="sigmoid/robust: label noise")
        a("--logp_agg", default="sum", choices=("sum", "mean"), help="sequence log-prob")
        a("--ref", default="model", choices=("model", "precompute"), help="reference log-probs")
        a("--rpo_alpha", type=float, default=0.0, help="weight of the chosen reply's NLL")
        a("--replay_data", default=None, help="SFT data replayed beside the pairs (jsonl)")
        a("--replay_alpha", type=float, default=0.0, help="weight of the replayed rows' NLL")
        add_lora_flags(parser, rank=0)

    @classmethod
    def from_args(cls, args, data):
        return cls(
            data,
            args.max_seq_len,
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            logp_agg=args.logp_agg,
            ref=args.ref,
            rpo_alpha=args.rpo_alpha,
            replay=args.replay_data,
            replay_alpha=args.replay_alpha,
            lora=lora_from_args(args),
        )

    def __init__(
        self,
        shards: str | Path,
        max_seq_len: int,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        logp_agg: str = "sum",
        ref: str = "model",
        rpo_alpha: float = 0.0,
        replay: str | Path | None = None,
        replay_alpha: float = 0.0,
        lora=None,
        eval_fraction: float = 0.01,
        max_eval: int = 256,
    ):
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
        if logp_agg not in ("sum", "mean") or ref not in ("model", "precompute"):
            raise ValueError(
                f"logp_agg must be sum|mean and ref model|precompute: {logp_agg}, {ref}"
            )
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if (replay is None) != (replay_alpha == 0.0) or replay_alpha < 0:
            raise ValueError(
                "--replay_data and --replay_alpha > 0 go together "
                f"(got {replay!r} and {replay_alpha})"
            )
        data = Shards(shards)
        super().__init__(data, DPODataset(data, max_seq_len), eval_fraction, max_eval)
        self.train, self.eval = Numbered(self.train), Numbered(self.eval)
        self.max_seq_len = max_seq_len
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average, self.ref_mode, self.rpo_alpha = logp_agg == "mean", ref, rpo_alpha
        self.ref = None
        self.lora = lora  # minimind.model.lora.LoRAConfig or None
        self._ref_cache: torch.Tensor | None = None  # (pairs, 2) reference log-probs
        self.replay_alpha, self.replay = replay_alpha, None
        if replay is not None:  # SFT's own train/eval split: its held-out rows stay unseen
            from .sft import SFTStage

            self._replay_source = SFTStage(replay, max_seq_len)
            self.replay = self._replay_source.train_dataset()

    # ------------------------------------------------------------------ set-up
    def prepare_model(self, model):
        if self.lora is not None:
            from minimind.model.lora import apply_lora

            apply_lora(model, self.lora)
            self._start = None  # the reference is the base: the adapters switched off
            return model
        # The reference is the model as it starts, before a resumed run loads its step weights.
        self._start = copy.deepcopy(model)
        return model

    def export_model(self, model):
        return merged_copy(model) if self.lora is not None else model

    def export_files(self, model):
        return adapter_files(model, self.lora) if self.lora is not None else {}

    def setup(self, ctx):
        super().setup(ctx)
        if self._start is not None:
            self.ref = ctx.frozen(self._start)
        self._start = None
        if self.ref_mode == "precompute":
            self._ref_cache = self._precompute()
            self.ref = None  # the cache replaces the model

    @torch.no_grad()
    def _precompute(self) -> torch.Tensor:
        out = torch.zeros(len(self.dataset), 2, dtype=torch.float32, device=self.ctx.device)
        for data in (self.train, self.eval):
            for batch in DataLoader(data, batch_size=16, collate_fn=self.collate):
                batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
                out[batch["index"]] = self._ref_logps(batch).view(2, -1).T
        return out

    def seq_len(self):
        return self.max_seq_len

    # ------------------------------------------------------------------ batches
    def collate(self, items):
        """B pairs -> input_ids, labels (2B, T): chosen rows first; index (B,)."""
        sides = [
            {"input_ids": item[f"{side}_input_ids"], "labels": item[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for item in items
        ]
        batch = pad_batch(sides, self.dataset.pad_id)
        batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch

    def num_samples(self, batch):
        return int(batch["index"].shape[0])

    def count(self, batch):
        return torch.tensor(batch["index"].shape[0])

    def _seq_logps(self, model, batch, nll: bool = False):
        """-> (sequence log-probs (2B,), aux loss[, mean token NLL of each row (2B,)])."""
        logps, aux = token_logps(model, batch["input_ids"], batch["labels"])
        mask = batch["labels"] != IGNORE_INDEX
        seq = sequence_logps(logps, mask, self.average)
        if not nll:
            return seq, aux
        return seq, aux, -(logps * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _ref_logps(self, batch) -> torch.Tensor:
        if self.lora is not None:  # the trained model with its adapters off, in eval mode
            from minimind.model.lora import adapters_off

            model = self.ctx.trained
            with eval_mode(model), adapters_off(model), self.ctx.autocast():
                return self._seq_logps(model, batch)[0].float()
        with self.ctx.autocast():
            return self._seq_logps(self.ref, batch)[0].float()

    def experience(self, batch):
        if self.ref is not None or (self.lora is not None and self._ref_cache is None):
            batch["ref_logps"] = self._ref_logps(batch)
        else:  # (B, 2) -> (2B,): chosen rows first, as in the batch
            batch["ref_logps"] = self._ref_cache[batch["index"]].T.reshape(-1)
        if self.replay is not None:
            batch = self._with_replay(batch)
        return batch

    def _with_replay(self, batch):
        """B SFT rows appended to the (2B, T) pairs: (3B, T') input_ids and labels."""
        b = int(batch["index"].shape[0])
        gen = torch.Generator().manual_seed(self.ctx.rng_seed(int(batch["index"][0]), 0x5F7))
        rows = torch.randint(len(self.replay), (b,), generator=gen).tolist()
        replay = pad_batch([self.replay[i] for i in rows], self.dataset.pad_id)
        T = max(batch["input_ids"].shape[1], replay["input_ids"].shape[1])
        out = dict(batch)
        for key, fill in (("input_ids", self.dataset.pad_id), ("labels", IGNORE_INDEX)):
            both = [batch[key], replay[key].to(batch[key].device)]  # right-padded to T
            out[key] = torch.cat([F.pad(x, (0, T - x.shape[1]), value=fill) for x in both])
        return out

    # ------------------------------------------------------------------ the loss
    def loss(self, model, batch):
        seq, aux, nll = self._seq_logps(model, batch, nll=True)
        b = int(batch["index"].shape[0])
        ref = batch["ref_logps"]
        terms = dpo_loss(
            seq[:b],
            seq[b : 2 * b],
            ref[:b],
            ref[b:],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        c, r = terms.chosen_rewards, terms.rejected_rewards
        metrics = {
            "reward_accuracy": float((c > r).float().sum()),
            "reward_margin": float((c - r).sum()),
            "reward_chosen": float(c.sum()),
            "reward_rejected": float(r.sum()),
        }
        losses = terms.losses
        if self.rpo_alpha:
            losses = losses + self.rpo_alpha * nll[:b]
            metrics["nll_chosen"] = float(nll[:b].detach().sum())
        if self.replay is not None:  # one replayed row per pair
            losses = losses + self.replay_alpha * nll[2 * b :]
            metrics["nll_replay"] = float(nll[2 * b :].detach().sum())
        return LossOutput(losses.sum(), aux=aux if aux.requires_grad else None, metrics=metrics)

    def fingerprint(self):
        return {
            **super().fingerprint(),
            "dpo": {
                "beta": self.beta,
                "loss_type": self.loss_type,
                "label_smoothing": self.label_smoothing,
                "logp_agg": "mean" if self.average else "sum",
                "rpo_alpha": self.rpo_alpha,
                "replay": None
                if self.replay is None
                else {
                    "alpha": self.replay_alpha,
                    "data": self._replay_source.fingerprint()["data"],
                },
                "lora": None if self.lora is None else lora_config_dict(self.lora),
            },
        }
