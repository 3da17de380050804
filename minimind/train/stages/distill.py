"""Knowledge distillation (Hinton et al. 2015): a student trained on the data's labels and on
a frozen teacher's token distributions; MiniMind's `trainer/train_distillation.py`.

- Loss per labelled token: alpha x CE(student, label) + (1 - alpha) x T^2 x D(teacher ||
  student) at temperature T, summed over the labelled tokens (the units): so packed pretraining
  (every position) and SFT (assistant tokens) both work, and the engine's global-count
  contract holds. D: forward KL (default, KL(p_teacher || p_student): the student covers the
  teacher's mass), reverse KL (KL(p_student || p_teacher): mode-seeking, as in MiniLLM, Gu et
  al. 2024) or the Jensen-Shannon divergence (the symmetric mean of both KLs to the average).
- The teacher: one of our checkpoints, a MiniMind2 `.pth` or a transformers causal-LM folder
  (minimind.convert.detect.load_any), frozen by `ctx.frozen` (on the training device, eval,
  no gradients, never in the optimizer or DDP) and run under the training autocast. Its
  vocabulary must be the student's (an error naming both sizes before training starts). Its
  path and a hash of its config are in the stage fingerprint, so resuming with another
  teacher is refused.
- MiniMind's flags: `--from_teacher_weight` (a name under out/ or a path), `--alpha`,
  `--temperature`; the student is the run's model (`--from_student_weight`, `--student_*`
  mapped onto the usual `--from_weight`, `--hidden_size`, `--num_hidden_layers`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from minimind.data.packing import PackedDataset
from minimind.data.padding import SFTDataset
from minimind.data.shards import Shards

from ..stage import IGNORE_INDEX, LossOutput, register
from .lm import LMStage

DIVERGENCES = ("forward", "reverse", "jsd")


def distill_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits of the labelled positions and their targets (N,) -> (loss per token (N,),
    divergence per token (N,)), fp32. The divergence is scaled by T^2 inside the loss (so its
    gradient keeps its size as T changes, Hinton et al. 2015) and reported unscaled.

    >>> z = torch.randn(4, 7)
    >>> loss, kl = distill_token_loss(z, z, torch.tensor([0, 1, 2, 3]), alpha=0.0, temperature=2.0)
    >>> bool(kl.abs().max() < 1e-6), bool(loss.abs().max() < 1e-6)
    (True, True)
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    log_p_s, log_p_t = s.log_softmax(-1), t.log_softmax(-1)
    if divergence == "forward":
        div = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    elif divergence == "reverse":
        div = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p_s, log_p_t]), 0) - torch.log(torch.tensor(2.0))
        div = 0.5 * (log_p_t.exp() * (log_p_t - log_m)).sum(-1) + 0.5 * (
            log_p_s.exp() * (log_p_s - log_m)
        ).sum(-1)
    else:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    ce = F.cross_entropy(student_logits.float(), targets, reduction="none")
    return alpha * ce + (1 - alpha) * temperature**2 * div, div


@register
class DistillStage(LMStage):
    name = "distill"
    help = "knowledge distillation from a frozen teacher (train_distillation.py)"
    order = 70
    defaults: ClassVar[dict[str, Any]] = {
        "data_path": "sft_mini_512.jsonl",
        "save_weight": "full_dist",
        "from_weight": "none",
        "learning_rate": 5e-4,
    }

    @classmethod
    def add_flags(cls, parser):
        a = parser.add_argument
        a("--from_teacher_weight", default="full_sft", help="teacher: a name under out/ or a path")
        a("--teacher_hidden_size", type=int, default=None, help="find the teacher by size")
        a("--teacher_num_layers", type=int, default=None, help="(a MiniMind2 .pth: its depth)")
        a("--from_student_weight", default=None, help="same as --from_weight")
        a("--student_hidden_size", type=int, default=None, help="same as --hidden_size")
        a("--student_num_layers", type=int, default=None, help="same as --num_hidden_layers")
        a("--alpha", type=float, default=0.5, help="weight of the label CE (1 - alpha: KL)")
        a("--temperature", type=float, default=1.0)
        a("--divergence", default="forward", choices=DIVERGENCES)

    @classmethod
    def normalize_args(cls, args):
        """MiniMind's student flags are the run's model flags."""
        if args.from_student_weight is not None:
            args.from_weight = args.from_student_weight
        if args.student_hidden_size is not None:
            args.hidden_size = args.student_hidden_size
        if args.student_num_layers is not None:
            args.num_hidden_layers = args.student_num_layers

    @classmethod
    def from_args(cls, args, data):
        from minimind import paths
        from minimind.infer.load import find_weight

        save_dir = Path(args.save_dir) if args.save_dir else paths.out_dir()
        hidden = args.teacher_hidden_size or args.hidden_size
        try:
            teacher = find_weight(args.from_teacher_weight, hidden, bool(args.use_moe), save_dir)
        except FileNotFoundError as e:
            raise ValueError(f"--from_teacher_weight {e}") from None
        overrides = {}
        if teacher.suffix == ".pth" and args.teacher_num_layers:
            overrides["num_hidden_layers"] = args.teacher_num_layers
        return cls(
            data,
            args.max_seq_len,
            teacher=teacher,
            alpha=args.alpha,
            temperature=args.temperature,
            divergence=args.divergence,
            teacher_overrides=overrides,
        )

    def __init__(
        self,
        shards: str | Path,
        max_seq_len: int,
        *,
        teacher: str | Path | torch.nn.Module,
        alpha: float = 0.5,
        temperature: float = 1.0,
        divergence: str = "forward",
        teacher_overrides: dict | None = None,
        eval_fraction: float = 0.01,
        max_eval: int = 256,
    ):
        if not 0 <= alpha <= 1 or not temperature > 0 or divergence not in DIVERGENCES:
            raise ValueError(
                f"alpha must be in [0, 1], temperature > 0, divergence one of "
                f"{', '.join(DIVERGENCES)} (got {alpha}, {temperature}, {divergence!r})"
            )
        data = Shards(shards)
        packed = data.kind == "pretrain"
        dataset = PackedDataset(data, max_seq_len) if packed else SFTDataset(data, max_seq_len)
        super().__init__(data, dataset, eval_fraction, max_eval)
        self.group_by_length, self.packed, self.max_seq_len = not packed, packed, max_seq_len
        self.alpha, self.temperature, self.divergence = alpha, temperature, divergence
        if isinstance(teacher, torch.nn.Module):
            self.teacher_model, self.teacher_id = teacher, {"module": type(teacher).__name__}
        else:
            from minimind.convert.detect import load_any

            self.teacher_model = load_any(teacher, **(teacher_overrides or {}))
            self.teacher_id = {"path": str(Path(teacher).resolve())}
        config = json.dumps(self.teacher_model.config.to_dict(), sort_keys=True)
        self.teacher_id["config"] = hashlib.blake2b(config.encode(), digest_size=8).hexdigest()
        self.teacher = None

    def prepare_model(self, model):
        v_s, v_t = model.config.vocab_size, self.teacher_model.config.vocab_size
        if v_s != v_t:
            raise ValueError(
                f"the teacher's vocabulary ({v_t} ids) differs from the student's ({v_s}): "
                "distillation compares distributions over the same tokens"
            )
        return model

    def setup(self, ctx):
        super().setup(ctx)
        self.teacher = ctx.frozen(self.teacher_model)

    def seq_len(self):
        return self.max_seq_len

    def collate(self, items):
        if self.packed:
            inputs, labels = zip(*items)
            return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}
        return self.dataset.collate(items)

    def loss(self, model, batch):
        flat = batch["labels"].reshape(-1)
        at = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        out = model(batch["input_ids"], logits_at=at)
        with torch.no_grad():
            teacher_logits = self.teacher(batch["input_ids"], logits_at=at).logits
        per_token, div = distill_token_loss(
            out.logits,
            teacher_logits,
            flat[at],
            alpha=self.alpha,
            temperature=self.temperature,
            divergence=self.divergence,
        )
        return LossOutput(
            per_token.sum(),
            aux=out.aux_loss if out.aux_loss.requires_grad else None,
            metrics={"kl": float(div.detach().sum())},
        )

    def fingerprint(self):
        return {
            **super().fingerprint(),
            "teacher": self.teacher_id,
            "distill": [self.alpha, self.temperature, self.divergence],
        }
