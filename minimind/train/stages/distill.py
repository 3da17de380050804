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
- Top-k (issue 11's memory option): `--topk K` compares the two distributions through the
  teacher's K most likely tokens and one bucket for the rest (`distill_topk_loss`; the
  approximation and its rationale are in train/teacher_cache.py). With `--teacher_cache DIR`
  the teacher's top-k rows are precomputed once into DIR (resumable, split over the ranks,
  refusing a stale folder) and the student trains from them without loading the teacher; the
  build runs on first use, or alone with `--build_teacher_cache`. The cached loss is the live
  top-k loss exactly (the same `teacher_topk` rows, stored losslessly), and with K = V it is
  the full-distribution loss (tested). The cache's key digest replaces the teacher in the
  resume fingerprint.
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

from .. import teacher_cache as tc
from ..stage import IGNORE_INDEX, LossOutput, register
from .lm import LMStage

DIVERGENCES = ("forward", "reverse", "jsd")
DEFAULT_TOPK = 32  # --teacher_cache without --topk


def divergence_of(log_p_t: torch.Tensor, log_p_s: torch.Tensor, divergence: str) -> torch.Tensor:
    """(N, E) teacher and student log-probabilities over the same E events -> (N,) divergence:
    forward KL(p_t || p_s), reverse KL(p_s || p_t) or the Jensen-Shannon divergence."""
    if divergence == "forward":
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if divergence == "reverse":
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p_s, log_p_t]), 0) - torch.log(torch.tensor(2.0))
        return 0.5 * (log_p_t.exp() * (log_p_t - log_m)).sum(-1) + 0.5 * (
            log_p_s.exp() * (log_p_s - log_m)
        ).sum(-1)
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")


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
    div = divergence_of(t.log_softmax(-1), s.log_softmax(-1), divergence)
    ce = F.cross_entropy(student_logits.float(), targets, reduction="none")
    return alpha * ce + (1 - alpha) * temperature**2 * div, div


def distill_topk_loss(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    tail: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`distill_token_loss` against the teacher's stored top-k rows (teacher_cache.py): values
    (N, k) teacher log-probs at T, indices (N, k), tail (N,) the teacher's log mass outside
    them. Both distributions are coarsened to the k tokens plus one bucket for every other
    token (the student's bucket: logsumexp of its log-probs outside `indices`); with k = V
    there is no bucket and this is the full loss.

    >>> z = torch.randn(3, 6)
    >>> v, i, t = tc.teacher_topk(z, 6, 1.0, "float32")
    >>> full, _ = distill_token_loss(z * 2, z, torch.tensor([0, 1, 2]), alpha=0.5, temperature=1.0)
    >>> topk, _ = distill_topk_loss(z * 2, v, i, t, torch.tensor([0, 1, 2]), alpha=0.5,
    ...                             temperature=1.0)
    >>> torch.allclose(full, topk, atol=1e-5)
    True
    """
    log_q = (student_logits.float() / temperature).log_softmax(-1)  # (N, V)
    log_q_k = log_q.gather(1, indices)  # (N, k)
    log_p = values.float()
    if indices.shape[-1] < log_q.shape[-1]:  # the rest of the vocabulary as one event
        log_q_tail = log_q.scatter(1, indices, float("-inf")).logsumexp(-1, keepdim=True)
        log_p = torch.cat([log_p, tail.float()[:, None]], -1)  # (N, k + 1)
        log_q_k = torch.cat([log_q_k, log_q_tail], -1)
    div = divergence_of(log_p, log_q_k, divergence)
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
        a(
            "--topk",
            type=int,
            default=0,
            help="0: the teacher's whole distribution; K: its top K tokens and one bucket for "
            f"the rest (default {DEFAULT_TOPK} with --teacher_cache)",
        )
        a(
            "--teacher_cache",
            default=None,
            metavar="DIR",
            help="train from the teacher's top-k rows precomputed in DIR, without loading the "
            "teacher (built on first use; resumable; a stale DIR is refused)",
        )
        a("--teacher_cache_dtype", default="float16", choices=tuple(tc.VALUE_DTYPES))
        a(
            "--build_teacher_cache",
            action="store_true",
            help="build --teacher_cache DIR (every rank under torchrun) and exit",
        )

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
        if args.build_teacher_cache and not args.teacher_cache:
            raise ValueError("--build_teacher_cache needs --teacher_cache DIR")
        stage = cls(
            data,
            args.max_seq_len,
            teacher=teacher,
            alpha=args.alpha,
            temperature=args.temperature,
            divergence=args.divergence,
            teacher_overrides=overrides,
            topk=args.topk,
            teacher_cache=args.teacher_cache,
            cache_dtype=args.teacher_cache_dtype,
            cache_batch_size=args.batch_size,
        )
        if args.build_teacher_cache:
            # Build, then end the command: the cache is the product (train later from it).
            from ..distributed import setup
            from ..engine import autocast_for

            world = setup(args.device)
            dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
                args.dtype, args.dtype
            )
            stage.build_cache(world, autocast_for(world.device, dtype))
            if world.is_main:
                size = stage.cache.nbytes() / 2**20
                print(f"teacher cache ready: {stage.cache_dir} ({size:.1f} MiB)")
            raise SystemExit(0)
        return stage

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
        topk: int = 0,
        teacher_cache: str | Path | None = None,
        cache_dtype: str = "float16",
        cache_batch_size: int = 16,
        cache_part_items: int = 1024,
        eval_fraction: float = 0.01,
        max_eval: int = 256,
    ):
        if not 0 <= alpha <= 1 or not temperature > 0 or divergence not in DIVERGENCES:
            raise ValueError(
                f"alpha must be in [0, 1], temperature > 0, divergence one of "
                f"{', '.join(DIVERGENCES)} (got {alpha}, {temperature}, {divergence!r})"
            )
        if topk < 0 or cache_dtype not in tc.VALUE_DTYPES:
            raise ValueError(
                f"topk must be >= 0 and the cache dtype one of {', '.join(tc.VALUE_DTYPES)} "
                f"(got {topk}, {cache_dtype!r})"
            )
        data = Shards(shards)
        packed = data.kind == "pretrain"
        dataset = PackedDataset(data, max_seq_len) if packed else SFTDataset(data, max_seq_len)
        super().__init__(data, dataset, eval_fraction, max_eval)
        self.group_by_length, self.packed, self.max_seq_len = not packed, packed, max_seq_len
        self.alpha, self.temperature, self.divergence = alpha, temperature, divergence
        self.cache_dir = Path(teacher_cache) if teacher_cache is not None else None
        self.topk = topk or (DEFAULT_TOPK if self.cache_dir is not None else 0)
        self.cache_dtype, self.cache_batch_size = cache_dtype, cache_batch_size
        self.cache_part_items = cache_part_items
        self.teacher_spec, self.teacher_overrides = teacher, teacher_overrides or {}
        self.teacher_model: torch.nn.Module | None = None
        self.teacher = None
        self.cache: tc.TeacherCache | None = None
        if self.cache_dir is None:
            self.teacher_model = self._load_teacher()
            if isinstance(teacher, torch.nn.Module):
                self.teacher_id = {"module": type(teacher).__name__}
            else:
                self.teacher_id = {"path": str(Path(teacher).resolve())}
            self.teacher_id["config"] = _config_hash(self.teacher_model)
            return
        # Cached: the teacher's identity from its files (or tensors), without building it.
        if isinstance(teacher, torch.nn.Module):
            self.teacher_id = {
                "config": _config_hash(teacher),
                "weights": tc.module_digest(teacher),
            }
        else:
            self.teacher_id = {"files": tc.files_digest(teacher), **self.teacher_overrides}
        self.key = tc.cache_key(
            teacher=self.teacher_id,
            data={
                "source": data.meta["source"]["blake2b"],
                "tokenizer": data.tokenizer["blake2b"],
                "docs": data.num_docs,
                "tokens": data.num_tokens,
                "prepare_max_seq_len": data.meta["settings"].get("max_seq_len"),
            },
            packed=packed,
            seq_len=max_seq_len,
            items=len(dataset),
            k=self.topk,
            temperature=temperature,
            values_dtype=cache_dtype,
        )
        if tc.is_complete(self.cache_dir, self.key):  # a stale folder is refused here
            self.cache = tc.TeacherCache(self.cache_dir, self.key)

    def _load_teacher(self) -> torch.nn.Module:
        if isinstance(self.teacher_spec, torch.nn.Module):
            return self.teacher_spec
        from minimind.convert.detect import load_any

        return load_any(self.teacher_spec, **self.teacher_overrides)

    def _teacher_vocab(self) -> int:
        if self.cache is not None:
            return self.cache.vocab_size
        if self.teacher_model is None:  # the cache is to be built: the teacher is needed
            self.teacher_model = self._load_teacher()
        return self.teacher_model.config.vocab_size

    def prepare_model(self, model):
        v_s, v_t = model.config.vocab_size, self._teacher_vocab()
        if v_s != v_t:
            raise ValueError(
                f"the teacher's vocabulary ({v_t} ids) differs from the student's ({v_s}): "
                "distillation compares distributions over the same tokens"
            )
        if self.topk > v_t:
            raise ValueError(f"--topk {self.topk} exceeds the vocabulary ({v_t} ids)")
        return model

    def setup(self, ctx):
        super().setup(ctx)
        if self.cache_dir is None:
            self.teacher = ctx.frozen(self.teacher_model)
        elif self.cache is None:
            self.build_cache(ctx.world, ctx.autocast, ctx.frozen)

    def build_cache(self, world, autocast, frozen=None) -> None:
        """Build the teacher cache: rank 0 creates (or checks) the folder, every rank writes
        its share of the parts, rank 0 marks it complete. Then the teacher is let go."""
        from .. import distributed as D

        if self.teacher_model is None:
            self.teacher_model = self._load_teacher()
        if frozen is None:
            teacher = self.teacher_model.to(world.device).eval().requires_grad_(False)
        else:
            teacher = frozen(self.teacher_model)
        if world.is_main:
            tc.start(
                self.cache_dir,
                self.key,
                vocab_size=teacher.config.vocab_size,
                part_items=self.cache_part_items,
            )
        D.barrier(world)
        tc.build(
            self.cache_dir,
            self.key,
            self.dataset,
            self._collate_plain,
            teacher,
            device=world.device,
            autocast=autocast,
            batch_size=self.cache_batch_size,
            rank=world.rank,
            world_size=world.world_size,
            log=print if world.is_main else None,
        )
        D.barrier(world)
        if world.is_main:
            tc.finalize(self.cache_dir, self.key)
        D.barrier(world)
        self.cache = tc.TeacherCache(self.cache_dir, self.key)
        self.teacher_model = None  # training reads the cache; the teacher's memory goes

    def train_dataset(self):
        return self.train if self.cache is None else tc.CachedItems(self.train, self.cache)

    def eval_dataset(self):
        return self.eval if self.cache is None else tc.CachedItems(self.eval, self.cache)

    def seq_len(self):
        return self.max_seq_len

    def _collate_plain(self, items):
        if self.packed:
            inputs, labels = zip(*items)
            return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}
        return self.dataset.collate(items)

    def collate(self, items):
        if not isinstance(items[0], dict) or "teacher_tail" not in items[0]:
            return self._collate_plain(items)
        if self.packed:
            batch = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels")}
        else:
            batch = self.dataset.collate(items)
        return {**batch, **tc.collate_rows(items)}

    def _teacher_rows(self, batch, at):
        """(values, indices, tail) of the batch's labelled positions: from the cache, or
        from the live teacher through the same `teacher_topk`."""
        if "teacher_tail" in batch:
            rows = batch["teacher_values"], batch["teacher_indices"], batch["teacher_tail"]
            if rows[2].shape[0] != at.shape[0]:
                raise tc.StaleCacheError(
                    f"teacher cache {self.cache_dir}: {rows[2].shape[0]} rows for a batch of "
                    f"{at.shape[0]} labelled tokens"
                )
            return rows
        with torch.no_grad():
            logits = self.teacher(batch["input_ids"], logits_at=at).logits
        return tc.teacher_topk(logits, self.topk, self.temperature, self.cache_dtype)

    def loss(self, model, batch):
        flat = batch["labels"].reshape(-1)
        at = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        out = model(batch["input_ids"], logits_at=at)
        kw = dict(alpha=self.alpha, temperature=self.temperature, divergence=self.divergence)
        if self.topk:
            values, indices, tail = self._teacher_rows(batch, at)
            per_token, div = distill_topk_loss(out.logits, values, indices, tail, flat[at], **kw)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input_ids"], logits_at=at).logits
            per_token, div = distill_token_loss(out.logits, teacher_logits, flat[at], **kw)
        return LossOutput(
            per_token.sum(),
            aux=out.aux_loss if out.aux_loss.requires_grad else None,
            metrics={"kl": float(div.detach().sum())},
        )

    def fingerprint(self):
        fp = {
            **super().fingerprint(),
            "teacher": self.teacher_id,
            "distill": [self.alpha, self.temperature, self.divergence],
        }
        if self.cache_dir is not None:
            fp["teacher_cache"] = tc.key_digest(self.key)
        elif self.topk:
            fp["topk"] = [self.topk, self.cache_dtype]
        return fp


def _config_hash(model: torch.nn.Module) -> str:
    config = json.dumps(model.config.to_dict(), sort_keys=True)
    return hashlib.blake2b(config.encode(), digest_size=8).hexdigest()
