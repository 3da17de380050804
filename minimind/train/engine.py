"""THE training loop, shared by every stage: devices, DDP/FSDP2, precision, accumulation,
clipping, schedule, evaluation, logging, checkpoints and exact resume.

A stage (stage.py) gives datasets, collation, experience and a loss; this file does
everything else, and knows nothing of tokens, chat templates, preference pairs or rewards.

Decisions:
- Loss normalisation: each micro-batch's summed loss is divided by the number of loss units
  (tokens, pairs) in the WHOLE step: all micro-batches of all processes, counted before any
  forward pass and summed with one all-reduce. Gradients are therefore identical however the
  step's samples are split between accumulation and processes. DDP and FSDP2 average
  gradients over processes, so the loss is also multiplied by the world size.
- Weight decay applies to matrices and embeddings (dim >= 2), never to norm gains (dim 1);
  AdamW (Loshchilov & Hutter 2019), fused on CUDA and CPU.
- Master weights are fp32; bf16/fp16 come from autocast (fp16 with a gradient scaler).
- The plan is fixed in samples when a run starts and kept in the resume state: the total
  (`--epochs` epochs, or `--max_steps` steps of the starting global batch, whichever is
  smaller), the global batch it was made with and an epoch's length. A resume at another
  world size keeps it, so 2 -> 1 or 1 -> 2 processes read every planned sample exactly once
  (in more or fewer, smaller or larger steps), never recomputed from the new step size.
- The schedule is a function of global samples seen out of the planned total, so a sample
  gets the same learning rate whatever the world size. Samples are dataset items as the
  sampler hands them out: a DPO pair, a prompt with its G completions.
- A step takes the next `batch_size x accumulation_steps x world_size` samples of the global
  order (fewer at the end of an epoch or of the plan, always a multiple of the world size so
  every rank runs the same number of forwards); rank r reads every world_size-th of them.
- A step: the stage's experience hook on every micro-batch (no_grad: rollouts, rewards,
  reference log-probs), then one or more optimizer updates (`Stage.updates`: PPO's epochs over
  minibatches), all at the step's learning rate. The sampler advances once per step.
- Exact resume: a step checkpoint holds weights (fp32), optimizer state (as a full,
  FQN-keyed state dict, so it loads under DDP, FSDP2 or one process), the sampler position in
  global samples, counters, the tracker run id, the stage's state (`Stage.state_dict`) and
  every process's RNG states. The DataLoader
  gets its own generator, so building one never draws from the global RNG. At the same world
  size a resumed run is bit-identical to an uninterrupted one on CPU; at another world size it
  continues at the exact next sample.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader

from minimind.checkpoint import (
    CheckpointWriter,
    load_checkpoint_weights,
    load_trainer_state,
    read_meta,
    save_checkpoint,
)
from minimind.data.sampler import ResumableSampler
from minimind.fsutil import (
    OutputError,
    atomic_write,
    check_writable,
    explained_writes,
    free_bytes,
)

from . import distributed as D
from .config import TrainConfig
from .policy import Policy
from .schedule import lr_at
from .stage import Stage, StageContext
from .state import (
    check_compatible,
    rng_state,
    seed_everything,
    set_rng_state,
    step_checkpoints,
    step_dir,
)
from .tracking import Tracker, device_peak_tflops, flops_per_token

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device, dtype: str):
    """A factory of the training forward's autocast context for `dtype` ("fp32": none)."""
    if dtype == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=AUTOCAST[dtype])


def param_groups(
    model: nn.Module, weight_decay: float, lr_scale=lambda name: 1.0
) -> list[dict[str, Any]]:
    """Trainable parameters split by the decay rule (dim >= 2 decays, dim 1 does not) and by
    `lr_scale(name)`, the stage's learning-rate multiplier (PPO's critic); a group's
    `lr_scale` multiplies the schedule's learning rate."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, float(lr_scale(name))), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
        for (decays, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: first name} of parameters registered under several names (a tied head)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _tensors(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested state dict (shared tensors once)."""
    seen: set[int] = set()
    todo = [state]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                yield item
        elif isinstance(item, dict):
            todo += item.values()
        elif isinstance(item, list | tuple):
            todo += item


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


class Trainer:
    """Runs `stage` on `model` with `config`. `fit()` returns the final checkpoint folder.

    The caller builds the model identically on every process (same seed), as FSDP2 shards
    whatever each process holds.
    """

    def __init__(
        self,
        config: TrainConfig,
        stage: Stage,
        model: nn.Module,
        *,
        tokenizer_dir: str | Path | None = None,
        world: D.World | None = None,
    ):
        self.config, self.stage, self.tokenizer_dir = config, stage, tokenizer_dir
        self.world = world or D.setup(config.device)
        self.run_dir = Path(config.out_dir)
        self.model = stage.prepare_model(model).to(self.world.device)
        self.step = 0
        self.samples_seen = 0
        self.tracker_run_id: str | None = None

    # ------------------------------------------------------------------ set-up
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "model_config": self.model.config.to_dict(),
            "stage": self.stage.name,
            **self.stage.fingerprint(),
        }

    def _autocast(self):
        return autocast_for(self.world.device, self.config.dtype)()

    def _build(self) -> None:
        cfg, world, model = self.config, self.world, self.model
        if cfg.activation_checkpointing:
            model.set_activation_checkpointing(True)
        self.resume_from = None
        if cfg.resume:
            found = step_checkpoints(self.run_dir)
            if found:
                self.resume_from = found[-1][1]
                check_compatible(
                    read_meta(self.resume_from).get("fingerprint", {}),
                    self._fingerprint(),
                    self.resume_from,
                )
                load_checkpoint_weights(self.resume_from, model)
            elif world.is_main:
                print(f"resume: no step checkpoint in {self.run_dir}; starting fresh")
        # Under FSDP2 the parameters become shards in place; the export needs a plain module of
        # the same structure to load the gathered weights into: a meta-device copy costs nothing.
        self._template = copy.deepcopy(model).to("meta") if cfg.fsdp and world.distributed else None
        self.wrapped = D.wrap(model, world, cfg.fsdp)
        self.forward_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.ctx = StageContext(
            world=world,
            dtype=cfg.dtype,
            tokenizer_dir=Path(self.tokenizer_dir) if self.tokenizer_dir else None,
            seed=cfg.seed,
            # Not the bound self._autocast: the stage would then hold the Trainer in a cycle,
            # freed only by the garbage collector, after the process group is gone (gloo's
            # threads then abort the process at exit).
            autocast=autocast_for(world.device, cfg.dtype),
            policy=Policy(model, autocast_for(world.device, cfg.dtype), fsdp=cfg.fsdp),
            trained=model,
        )
        self.stage.setup(self.ctx)
        # The fused kernel exists for CUDA and CPU (about 4x faster than the per-tensor loop on
        # CPU: 3 vs 15 ms per step for the demo model); other devices take the default.
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay, self.stage.lr_scale),
            lr=cfg.learning_rate,
            betas=cfg.betas,
            fused=world.device.type in ("cuda", "cpu") or None,
        )
        self.scaler = torch.amp.GradScaler(world.device.type) if cfg.dtype == "fp16" else None
        self.train_set = self.stage.train_dataset()
        group = self.stage.group_by_length
        self.step_samples = cfg.batch_size * cfg.accumulation_steps * world.world_size
        # Length groups of one step's global batch: the order, and so the trajectory, depends
        # on the global batch size only, not on how it is split into micro-batches and ranks.
        # A resume keeps the run's groups (the sampler adopts the saved group size).
        self.sampler = ResumableSampler(
            len(self.train_set),
            seed=cfg.seed,
            rank=world.rank,
            world_size=world.world_size,
            lengths=self.train_set.lengths if group else None,
            group_size=self.step_samples if group else None,
            drop_last=world.distributed,
        )
        self.plan = self._new_plan()
        if self.resume_from is not None:
            state = load_trainer_state(self.resume_from)
            self._restore(state)
            self.plan = self._resumed_plan(state.get("plan"))
        self.total_samples = self.plan["total_samples"]
        self.total_steps = self.step + self._steps_left()
        if self.resume_from is not None and world.is_main:
            note = ""
            if self.plan["step_samples"] != self.step_samples:
                note = (
                    f" ({self.step_samples} samples a step now, {self.plan['step_samples']} "
                    f"planned: {self.total_steps - self.step} steps left)"
                )
            print(
                f"resumed from {self.resume_from}: step {self.step}, "
                f"sample {self.samples_seen:,} of {self.total_samples:,}{note}"
            )

    # ------------------------------------------------------------------ the plan
    def _new_plan(self) -> dict[str, Any]:
        """The run's plan in samples, from this run's settings and world size."""
        world, n = self.world, len(self.train_set)
        epoch = n - n % world.world_size if world.distributed else n  # drop_last
        return self._plan(epoch, self.step_samples)

    def _plan(self, epoch_samples: int, step_samples: int) -> dict[str, Any]:
        cfg = self.config
        total = cfg.epochs * epoch_samples
        if cfg.max_steps is not None:
            if cfg.max_steps * step_samples > total and self.world.is_main:
                steps = math.ceil(epoch_samples / step_samples)
                print(
                    f"max_steps {cfg.max_steps} is more than {cfg.epochs} epoch(s) of {steps} "
                    f"steps: stopping after {cfg.epochs * steps} (raise --epochs to train longer)"
                )
            total = min(total, cfg.max_steps * step_samples)
        return {
            "total_samples": total,
            "epochs": cfg.epochs,
            "max_steps": cfg.max_steps,
            "step_samples": step_samples,
            "epoch_samples": epoch_samples,
        }

    def _resumed_plan(self, saved: dict[str, Any] | None) -> dict[str, Any]:
        """The saved plan; recomputed in the run's original units (its step size and epoch
        length) when --epochs or --max_steps changed, from this run when none was saved."""
        cfg = self.config
        if saved is None:  # a checkpoint from before plans were saved
            return self.plan
        if (saved["epochs"], saved["max_steps"]) == (cfg.epochs, cfg.max_steps):
            return saved
        plan = self._plan(saved["epoch_samples"], saved["step_samples"])
        if self.world.is_main:
            print(
                f"plan changed (epochs {saved['epochs']} -> {cfg.epochs}, max_steps "
                f"{saved['max_steps']} -> {cfg.max_steps}): {plan['total_samples']:,} samples "
                f"instead of {saved['total_samples']:,}"
            )
        return plan

    def _epoch_end(self, position: int) -> int:
        """Where the current epoch ends for a sampler at `position`: the sampler's end (after
        drop_last at this world size), never past the plan's epoch length."""
        n, w = self.sampler.num_samples, self.world.world_size
        end = n - (n - position) % w if self.world.distributed else n
        return min(end, self.plan["epoch_samples"])

    def _step_sizes(self, position: int, samples_seen: int) -> list[int]:
        """Global samples of each remaining step of the epoch from `position`."""
        w, per_step = self.world.world_size, self.step_samples
        end = min(self._epoch_end(position), position + self.total_samples - samples_seen)
        sizes = []
        while position < end:
            n = min(per_step, end - position)
            n -= n % w  # every rank reads the same number of samples
            if n == 0:
                break
            sizes.append(n)
            position += n
        return sizes

    def _steps_left(self) -> int:
        """Optimizer steps until the plan is done (the progress bar's total)."""
        position, epoch, seen, steps = (
            self.sampler.position,
            self.sampler.epoch,
            self.samples_seen,
            0,
        )
        while seen < self.total_samples and epoch < self.config.epochs:
            sizes = self._step_sizes(position, seen)
            steps += len(sizes)
            seen += sum(sizes)
            if position + sum(sizes) < self._epoch_end(position):
                break  # the plan ends inside this epoch
            position, epoch = 0, epoch + 1
        return steps

    def _restore(self, state: dict[str, Any]) -> None:
        world = self.world
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.stage.load_state_dict(state.get("stage") or {})
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.tracker_run_id = state.get("tracker_run_id")
        rngs = state["rng"]
        if len(rngs) == world.world_size:
            set_rng_state(rngs[world.rank])
        else:  # another world size: data order is exact, dropout streams start afresh
            seed_everything(self.config.seed + 1000003 * self.step + world.rank)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        cfg, world = self.config, self.world
        seed_everything(cfg.seed + world.rank)
        if world.is_main:  # a run that cannot save finds out now, not after all its steps
            check_writable(self.run_dir, "the run folder (out_dir)")
        self._build()
        if self.resume_from is not None and world.is_main:
            self._drop_metrics_after(self.step)
        self.tracker = Tracker(
            self.run_dir,
            {"train": cfg.to_dict(), **self._fingerprint()},
            world.is_main,
            tracker=cfg.tracker,
            project=cfg.tracker_project,
            run_id=self.tracker_run_id,
            tensorboard=cfg.tensorboard,
            total_steps=self.total_steps,
            start_step=self.step,
        )
        self.tracker_run_id = self.tracker.run_id
        self.flops_per_token = flops_per_token(self.model.config, self.stage.seq_len())
        self.peak = device_peak_tflops(world.device, cfg.peak_tflops)
        self.model.train()
        last_saved = self.step if self.resume_from is not None else -1
        try:
            while self.samples_seen < self.total_samples and self.sampler.epoch < cfg.epochs:
                epoch, stepped = self.sampler.epoch, False
                for n, micro in self._epoch_steps():
                    stepped = True
                    metrics = self._train_step(micro, n)
                    self.step += 1
                    self.tracker.advance(self.step)
                    if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                        self.tracker.log(self.step, metrics)
                    if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                        self._log_eval()
                    if cfg.save_interval and self.step % cfg.save_interval == 0:
                        self._save_step()
                        last_saved = self.step
                if self.sampler.epoch == epoch and not stepped:
                    # The plan's last samples are fewer than the processes (after a change
                    # of world size): they cannot be split evenly.
                    if world.is_main:
                        left = self.total_samples - self.samples_seen
                        print(f"the plan's last {left} sample(s) cannot be split over "
                              f"{world.world_size} processes; stopping")  # fmt: skip
                    break
            if not cfg.eval_interval or self.step % cfg.eval_interval:
                self._log_eval()
            if last_saved != self.step:
                self._save_step()
            return step_dir(self.run_dir, self.step)
        finally:
            self.tracker.close()

    def _drop_metrics_after(self, step: int) -> None:
        """A run killed after logging steps it never saved logs them again when resumed:
        drop the records past the resumed step, so metrics.jsonl holds each step once."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] > step:
                    continue
            except (ValueError, KeyError, TypeError):  # a line cut by the kill
                continue
            keep.append(line)
        if keep != lines:
            atomic_write(path, lambda f: f.write("".join(keep).encode("utf-8")))

    def _loader(self, chunks: list[list[int]]) -> DataLoader:
        """Micro-batches of the dataset items in `chunks`, in order."""
        cfg = self.config
        return DataLoader(
            self.train_set,
            batch_sampler=chunks,
            collate_fn=self.stage.collate,
            num_workers=cfg.num_workers,
            pin_memory=self.world.device.type == "cuda",
            generator=torch.Generator(),  # never draw from the global RNG (exact resume)
        )

    def _epoch_steps(self):
        """(global samples, this rank's micro-batches) of each remaining step of the current
        epoch, up to the plan's end; at the epoch's end the sampler moves to the next one."""
        cfg, world, sampler = self.config, self.world, self.sampler
        sizes = self._step_sizes(sampler.position, self.samples_seen)
        order, position = sampler.order(), sampler.position
        chunks, per_step = [], []
        for n in sizes:
            mine = order[position + world.rank : position + n : world.world_size]
            step = [
                mine[i : i + cfg.batch_size].tolist() for i in range(0, len(mine), cfg.batch_size)
            ]
            chunks += step
            per_step.append(len(step))
            position += n
        epoch, batches = sampler.epoch, iter(self._loader(chunks))
        for n, k in zip(sizes, per_step, strict=True):
            yield n, [next(batches) for _ in range(k)]
        # The sampler starts the next epoch at its own end; the plan's end may come first
        # (an epoch planned at another world size dropped fewer samples).
        if sampler.epoch == epoch and sampler.position >= self._epoch_end(sampler.position):
            sampler.set_epoch(epoch + 1)

    def _train_step(self, micro: list[dict[str, Any]], step_samples: int) -> dict[str, float]:
        """One optimizer step on this rank's `micro`-batches; `step_samples` is the global
        count of dataset items in the step (all ranks)."""
        cfg, world, stage = self.config, self.world, self.stage
        t0 = time.perf_counter()
        self.ctx.step = self.step
        micro = [_to(b, world.device) for b in micro]
        with torch.no_grad():
            micro = [stage.experience(b) for b in micro]
        t_exp = time.perf_counter() - t0
        lr = lr_at(
            self.samples_seen,
            self.total_samples,
            cfg.learning_rate,
            cfg.min_lr_ratio,
            cfg.warmup_ratio,
        )
        results = [self._update(update, lr) for update in stage.updates(micro)]
        self.sampler.advance(step_samples)
        self.samples_seen += step_samples
        elapsed = time.perf_counter() - t0
        units = sum(r.pop("_units") for r in results)
        # Several updates (PPO epochs): loss and metrics are their mean, grad_norm the last.
        metrics = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
        metrics.update(lr=lr, grad_norm=results[-1]["grad_norm"], samples=self.samples_seen)
        if len(results) > 1:
            metrics["updates"] = len(results)
        metrics.update(self._mean_stats([b.get("stats", {}) for b in micro]))
        if t_exp > 0.05 * elapsed:  # a stage with real experience work (rollouts)
            metrics.update(experience_s=t_exp, update_s=elapsed - t_exp)
        if stage.count_is_tokens:
            metrics["tokens_per_s"] = units / elapsed
            if self.peak:
                achieved = units / elapsed * self.flops_per_token / world.world_size
                metrics["mfu"] = achieved / (self.peak * 1e12)
        return metrics

    def _mean_stats(self, stats: list[dict[str, float]]) -> dict[str, float]:
        """Per-micro-batch stats of the experience hook, averaged over micro-batches and
        processes (every process's stage reports the same keys)."""
        keys = sorted({k for s in stats for k in s})
        if not keys:
            return {}
        local = torch.tensor(
            [[s.get(k, 0.0) for k in keys] for s in stats], dtype=torch.float64
        ).mean(0)
        mean = D.all_reduce_sum(local.to(self.world.device), self.world) / self.world.world_size
        return dict(zip(keys, mean.tolist(), strict=True))

    def _update(self, micro: list[dict[str, Any]], lr: float) -> dict[str, float]:
        """One optimizer update over `micro` (this process's micro-batches of the update)."""
        cfg, world, stage = self.config, self.world, self.stage
        counts = [stage.count(b).to(torch.float64) for b in micro]
        local = torch.stack(counts).sum().to(world.device)
        total = D.all_reduce_sum(local, world).clamp(min=1)
        scale = world.world_size / total
        loss_sum = torch.zeros((), dtype=torch.float64, device=world.device)
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with self._sync(last), self._autocast():
                out = stage.loss(self.forward_model, batch)
                loss = out.loss_sum.float() * scale.float()
                if out.aux is not None:
                    # The balance loss is a per-forward mean: weight it by the micro-batch's
                    # share of the step's units so that splitting the step changes nothing.
                    loss = loss + out.aux.float() * (counts[i].to(world.device) * scale).float()
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += out.loss_sum.detach().double()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if cfg.grad_clip > 0
            else torch.zeros(())
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": float(D.all_reduce_sum(loss_sum, world) / total)}
        metrics.update({k: v / float(total) * world.world_size for k, v in sums.items()})
        metrics.update(grad_norm=float(grad_norm), _units=float(total))
        return metrics

    def _sync(self, last: bool):
        """Gradient sync only on the last micro-batch of a step."""
        w = self.wrapped
        if hasattr(w, "no_sync") and not last:
            return w.no_sync()
        if hasattr(w, "set_requires_gradient_sync"):  # FSDP2
            w.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The stage's own evaluation when it has one (`Stage.evaluate`), else the mean loss
        per unit (`eval_loss`) and the loss metrics over the first `eval_batches` batches of
        the eval split, after the experience hook."""
        self.ctx.step = self.step
        self.model.eval()
        try:
            custom = self.stage.evaluate(self.model)
            if custom is not None:
                return {f"eval_{k}": v for k, v in custom.items()}
            return self._eval_loss()
        finally:
            self.model.train()

    def _eval_loss(self) -> dict[str, float]:
        eval_set = self.stage.eval_dataset()
        if eval_set is None or len(eval_set) == 0:
            return {}
        cfg, world = self.config, self.world
        n = min(len(eval_set), cfg.eval_batches * cfg.batch_size * world.world_size)
        # Every rank runs the same number of forwards: under FSDP2 each forward all-gathers,
        # so a rank with one batch more would wait forever for the others.
        n -= n % world.world_size
        if n == 0:
            return {}
        indices = torch.arange(world.rank, n, world.world_size)
        loader = DataLoader(
            eval_set,
            batch_sampler=[
                indices[i : i + cfg.batch_size].tolist()
                for i in range(0, len(indices), cfg.batch_size)
            ],
            collate_fn=self.stage.collate,
            generator=torch.Generator(),
        )
        loss = torch.zeros((), dtype=torch.float64, device=world.device)
        units = torch.zeros((), dtype=torch.float64, device=world.device)
        sums: dict[str, torch.Tensor] = {}
        for batch in loader:
            batch = self.stage.experience(_to(batch, world.device))
            with self._autocast():
                out = self.stage.loss(self.forward_model, batch)
            loss += out.loss_sum.double()
            units += self.stage.count(batch).double()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        total = D.all_reduce_sum(units, world).clamp(min=1)
        result = {"eval_loss": float(D.all_reduce_sum(loss, world) / total)}
        for k in sorted(sums):
            value = torch.tensor(sums[k], dtype=torch.float64, device=world.device)
            result[f"eval_{k}"] = float(D.all_reduce_sum(value, world) / total)
        return result

    def _log_eval(self) -> None:
        values = self.evaluate()
        if values:
            self.tracker.log(self.step, values)

    # ------------------------------------------------------------------ checkpoints
    def _save_step(self) -> Path:
        """Every process takes part (FSDP2 gathers); only rank 0 writes."""
        world = self.world
        weights = self._full_weights()
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        rngs: list[Any] = [None] * world.world_size
        if world.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        path = step_dir(self.run_dir, self.step)
        if world.is_main:
            self._check_space(path, weights, optim)
        with explained_writes(path, "the step checkpoint"):
            if world.is_main:
                self._write_step(path, weights, optim, rngs)
        D.barrier(world)
        return path

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """The whole weights on rank 0's CPU (empty on the other ranks); a collective under
        FSDP2, which every rank must call."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=full)
        # FSDP2 gathers a tied head and its embedding into two tensors: share them again, so
        # the checkpoint stores the pair once, as it does from one process or DDP.
        for alias, name in tied_names(self.model).items():
            if alias in weights and name in weights:
                weights[alias] = weights[name]
        return weights

    def _check_space(self, path: Path, *states: dict[str, Any]) -> None:
        """Refuse a save the disk cannot hold before writing any of it (the tensors' bytes;
        the previous checkpoints stay until the new one is complete)."""
        need = 0
        for state in states:
            for t in _tensors(state):
                need += t.numel() * t.element_size()
        free = free_bytes(self.run_dir)
        if need > free:
            raise OutputError(
                f"cannot write the step checkpoint {path}: no space left on the device "
                f"({need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free)"
            )

    def _write_step(self, path: Path, weights, optim, rngs) -> None:
        """Rank 0: the checkpoint folder, then the oldest beyond keep_last go."""
        cfg, world = self.config, self.world
        with CheckpointWriter(path) as w:
            w.write_weights(weights, self.model.config)
            if self.tokenizer_dir is not None:
                w.copy_tokenizer(self.tokenizer_dir)
            w.write_meta(
                {
                    "step": self.step,
                    "samples_seen": self.samples_seen,
                    "world_size": world.world_size,
                    "train_config": cfg.to_dict(),
                    "fingerprint": self._fingerprint(),
                }
            )
            w.write_trainer_state(
                {
                    "optimizer": optim,
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "sampler": self.sampler.state_dict(),
                    "stage": self.stage.state_dict(),
                    "step": self.step,
                    "samples_seen": self.samples_seen,
                    "plan": self.plan,
                    "rng": rngs,
                    "tracker_run_id": self.tracker_run_id,
                }
            )
        for step, old in step_checkpoints(self.run_dir)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            # The writer's lock file stays after a save; that step is never written again.
            lock = step_dir(self.run_dir, step)
            lock.with_name(f".{lock.name}.lock").unlink(missing_ok=True)

    def plain_model(self) -> nn.Module | None:
        """The trained module with whole weights, on rank 0 (None on the other ranks): the
        model itself, or under FSDP2 a plain CPU copy that every rank helps gather."""
        if self._template is None:
            return self.model if self.world.is_main else None
        weights = self._full_weights()
        if not self.world.is_main:
            return None
        plain = copy.deepcopy(self._template).to_empty(device="cpu")
        plain.load_state_dict(weights)
        return plain

    def export(
        self, path: str | Path, dtype: str | None = None, pth: str | Path | None = None
    ) -> Path:
        """The trained model as a plain checkpoint folder (the stage's export form, e.g. LoRA
        merged) and, with `pth`, also as a MiniMind2 .pth; written by rank 0, every rank
        called (FSDP2 gathers)."""
        path = Path(path)
        plain = self.plain_model()
        if plain is not None:
            exported = self.stage.export_model(plain)
            with explained_writes(path, "the final weights"):
                save_checkpoint(
                    path,
                    exported,
                    dtype=dtype,
                    tokenizer_dir=self.tokenizer_dir,
                    extra_files=self.stage.export_files(plain),
                )
            if pth is not None:
                from minimind.convert.minimind2 import save_minimind2_pth

                with explained_writes(pth, "the .pth weights"):
                    save_minimind2_pth(exported, Path(pth))
        D.barrier(self.world)
        return path
