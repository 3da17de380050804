"""The Stage interface: what a training method gives the engine, and nothing more.

A stage owns its datasets, its batch collation, its experience (rollouts, rewards, reference
log-probs) and its loss, and may hold frozen models such as a reference or a teacher. The
engine owns everything else: devices, precision, accumulation, the optimizer and schedule,
checkpoints and resume, logging.

One optimizer step of the engine, for the micro-batches `micro` of this process:
1. `experience(batch)` on each micro-batch, under no_grad, on the device: what the loss needs
   that is not in the data (rollouts from the live policy, rewards, reference and old
   log-probs). Default: the batch as is.
2. `num_samples(batch)`: how many dataset items the batch holds (the sampler advances by it;
   a DPO pair or a prompt with G completions is one item), never guessed from tensor shapes.
3. `updates(micro)`: the optimizer updates made from these batches, each a list of
   micro-batches (default: one update over all of them; PPO: epochs x minibatches). Per
   update, `count(batch)` then `loss(model, batch)` on each micro-batch, then one step.

Loss contract: `loss(model, batch)` returns the SUM of the per-unit losses of the micro-batch
(units are tokens for language modelling, pairs for DPO, sequences or tokens for GRPO) and
`count(batch)` the number of units, known before the forward pass. The engine divides by the
global count over all micro-batches of the update and all processes, so a step's gradient is
the same whether its batch is split 1x8, 8x1 or 2 ranks x 4.

State: `state_dict()`/`load_state_dict()` (KL coefficients, value trackers, running reward
statistics) are saved in every step checkpoint and restored on resume; a stage keeps its
state identical on every process (rank 0's copy is saved).

Extra trainable modules (a value head) belong to the model: `prepare_model` returns a module
that holds them, so they join the optimizer, the checkpoint and DDP, and `export_model`
returns the plain language model.

The command line: each stage file registers its class (`@register`), which declares `name`,
`defaults` (the common flags' values for this stage) and `add_flags`/`from_args` for its own
flags, so `minimind train NAME --help` lists them and adding a stage touches one file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: summed over the micro-batch's units
    aux: torch.Tensor | None = None  # scalar added per micro-batch, weighted by its unit share
    metrics: dict[str, float] = field(default_factory=dict)  # summed like loss_sum


@dataclass
class StageContext:
    """What the engine hands a stage in `setup`: where and how training runs.

    world: ranks and the device; dtype: "fp32" | "bf16" | "fp16" (autocast precision);
    autocast(): the training forward's autocast context; policy: samples from the model being
    trained (policy.py); step: the optimizer step about to run (set by the engine).
    """

    world: Any  # distributed.World
    dtype: str
    tokenizer_dir: Path | None
    seed: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    policy: Any = None  # policy.Policy
    trained: nn.Module | None = None  # the (unwrapped) model being trained
    step: int = 0
    _tokenizer: Any = None

    @property
    def device(self) -> torch.device:
        return self.world.device

    def tokenizer(self):
        """The run's tokenizer (loaded once)."""
        if self._tokenizer is None:
            if self.tokenizer_dir is None:
                raise ValueError("this stage needs a tokenizer: pass tokenizer_dir to Trainer")
            from minimind.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def frozen(self, model: nn.Module) -> nn.Module:
        """`model` as a frozen helper (reference, teacher, reward model): on the training
        device, in eval mode, no gradients, never in the optimizer or DDP/FSDP (it is not part
        of the trained model). On CUDA with bf16/fp16 training its weights are cast to that
        dtype (it only runs under autocast, so the matmuls see the same inputs) to halve its
        memory; elsewhere they stay fp32."""
        if self.trained is not None:
            mine = {p.data_ptr() for p in self.trained.parameters()}
            if any(p.data_ptr() in mine for p in model.parameters()):
                raise ValueError("a frozen model must not share parameters with the trained one")
        model = model.to(self.device)
        if self.device.type == "cuda" and self.dtype in ("bf16", "fp16"):
            model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype])
        model.eval()
        model.requires_grad_(False)
        return model

    def rng_seed(self, *keys: int) -> int:
        """A seed from (run seed, step, rank, *keys): a resumed run draws the same numbers,
        and each rank and micro-batch its own.

        >>> ctx = StageContext(world=type("W", (), {"rank": 0})(), dtype="fp32",
        ...                    tokenizer_dir=None, seed=1, autocast=contextlib.nullcontext)
        >>> ctx.rng_seed(0) == ctx.rng_seed(0), ctx.rng_seed(0) == ctx.rng_seed(1)
        (True, False)
        """
        text = ",".join(str(k) for k in (self.seed, self.step, self.world.rank, *keys))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage a `minimind train NAME` command."""
    REGISTRY[cls.name] = cls
    return cls


class Stage:
    """Base class; subclasses set `name` and implement the data and loss methods."""

    name = "stage"
    count_is_tokens = True  # units are tokens: the engine reports tokens/s and MFU
    # Length grouping: the sampler batches samples of similar `lengths` (padded stages).
    group_by_length = False
    # Command line: this stage's values of the common flags (data_path is a file under
    # dataset/, save_weight/from_weight names under out/) and its help line.
    defaults: ClassVar[dict[str, Any]] = {}
    help: ClassVar[str] = ""
    order: ClassVar[int] = 100  # place in `minimind train --help`
    # `max_seq_len` of the data preparation: None keeps whole documents (packed pretraining).
    prepare_cuts = True
    # Own flags that name more data (flag -> the stage whose format it is): the command line
    # prepares each like --data_path and hands from_args the prepared folder.
    data_flags: ClassVar[dict[str, str]] = {}

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """Add this stage's own flags."""

    @classmethod
    def normalize_args(cls, args: argparse.Namespace) -> None:
        """Map this stage's aliases onto the shared flags (e.g. distillation's --student_*),
        right after parsing; default: nothing."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, data: Path) -> Stage:
        """The stage for parsed flags and the prepared data folder."""
        raise NotImplementedError

    def setup(self, ctx: StageContext) -> None:
        """Called once by the engine before training: keep `ctx`, make frozen models."""
        self.ctx = ctx

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def eval_dataset(self) -> Dataset | None:
        return None

    def collate(self, items: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def num_samples(self, batch: dict[str, Any]) -> int:
        """Dataset items in `batch` (default: rows of `input_ids`)."""
        return int(batch["input_ids"].shape[0])

    def seq_len(self) -> int:
        """The longest sequence a training forward sees (for the FLOPs estimate)."""
        raise NotImplementedError

    def experience(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Run under no_grad before `count`: add what the loss needs (default: nothing).
        A `stats` dict of floats in the returned batch is averaged and logged."""
        return batch

    def updates(self, micro: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """The optimizer updates of one step, each a list of micro-batches (default: one)."""
        yield micro

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Stage-specific evaluation (e.g. reward on held-out prompts), or None for the
        engine's: the mean loss per unit (and metrics) over the eval split."""
        return None

    def lr_scale(self, name: str) -> float:
        """The learning-rate multiplier of trained parameter `name` (default 1)."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Adjust the model before wrapping (e.g. swap in LoRA, freeze); default: as is."""
        return model

    def export_model(self, model: nn.Module) -> nn.Module:
        """The plain model a checkpoint stores (e.g. LoRA merged); default: as is."""
        return model

    def export_files(self, model: nn.Module) -> dict[str, Any]:
        """Extra files for the final export ({name: bytes | str | callable(path)})."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this stage's data and tokenizer; resuming with another is refused."""
        return {}


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval mode (dropout off) within the block, back in the mode it had after:
    reference, old-policy and rollout forwards of the model being trained."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    """Next-token cross-entropy summed over labelled positions (labels already shifted, -100
    ignored), plus the model's MoE balance loss. Logits are upcast to fp32 for the softmax.

    When some positions carry no label (SFT: prompts and padding), the head runs on the
    labelled ones only (`logits_at`): the same loss and gradients without the (B*T, V) logits.
    """
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    if bool(keep.all()):  # packed pretraining: every position is a target
        out = model(input_ids)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
    else:
        at = keep.nonzero().squeeze(1)
        out = model(input_ids, logits_at=at)
        logits, flat = out.logits, flat.index_select(0, at)
    loss = F.cross_entropy(logits.float(), flat, reduction="sum")
    return LossOutput(loss, aux=out.aux_loss if out.aux_loss.requires_grad else None)


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labels (already shifted, -100 ignored) -> (logps (B, T) fp32,
    0 where unlabelled; the model's MoE balance loss). The head runs on the labelled positions
    only; `temperature` divides the logits, as sampling at that temperature did.
    attention_mask (B, T) marks real tokens of left-padded rows (rollouts)."""
    flat = labels.reshape(-1)
    at = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    out = model(input_ids, attention_mask=attention_mask, logits_at=at)
    logits = out.logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(1, flat[at, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    logps = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    return logps.index_put((at,), picked).view_as(labels), out.aux_loss


def token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labelled positions of a batch: the units a language-modelling loss is summed over."""
    return (batch["labels"] != IGNORE_INDEX).sum()


class IndexView(Dataset):
    """Items `indices` of `base`, keeping its `lengths` (for length grouping) and `collate`."""

    def __init__(self, base: Dataset, indices: range):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    @property
    def lengths(self):
        return self.base.lengths[self.indices.start : self.indices.stop]


class Numbered(Dataset):
    """Items of an IndexView with their position in the whole dataset: item i ->
    {**view[i], "index": view.indices[i]} (a stable key: caches, rollout seeds)."""

    def __init__(self, base: IndexView):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return {**self.base[i], "index": self.base.indices[i]}

    @property
    def lengths(self):
        return self.base.lengths


def split_eval(base: Dataset, fraction: float, max_items: int) -> tuple[IndexView, IndexView]:
    """(train, eval): the last `fraction` of `base` (at most `max_items`) held out for eval.

    >>> train, held = split_eval(list(range(100)), 0.05, 3)
    >>> len(train), [held[i] for i in range(len(held))]
    (97, [97, 98, 99])
    """
    n = len(base)
    n_eval = min(max_items, int(n * fraction)) if n > 1 else 0
    return IndexView(base, range(0, n - n_eval)), IndexView(base, range(n - n_eval, n))
