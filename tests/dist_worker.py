"""Jobs for the multi-process training tests (test_distributed.py), runnable in one process or
under `torchrun --nproc_per_node 2 tests/dist_worker.py PLAN.json` (gloo on CPU).

A plan is a JSON object {"root": folder, "audit": bool, "data": {...make_data paths...},
"jobs": [job, ...]} (a job: config_for's and run_job's keys); every process
runs the jobs in order (the same Trainer calls on every rank, as torchrun requires). A job
trains the tiny model with a `recording` stage, which notes the dataset index of every
training sample its collate receives, and, on rank 0, saves `result.pt` beside its run folder:
the sample indices each rank read (gathered), and the in-memory weights at the end (gathered
from the FSDP2 shards with DTensor.full_tensor, not through the engine's state-dict path).

With `"audit": true` each rank watches, through a Python audit hook, every file it opens for
writing, creates, renames or deletes under the plan's root, and prints at the end
`rank1-writes: [...]` (the engine writes from rank 0 only) and `rank0-writes: COUNT` (which
shows the hook sees the writes). A watchdog (faulthandler) prints every thread's stack and
exits after DIST_WORKER_TIMEOUT seconds, so a collective that never completes cannot hang.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from minimind.train import distributed as D
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stage import IndexView
from minimind.train.stages.distill import DistillStage
from minimind.train.stages.dpo import DPOStage
from minimind.train.stages.grpo import GRPOStage
from minimind.train.stages.ppo import PPOStage
from minimind.train.stages.pretrain import PretrainStage
from minimind.train.stages.sft import SFTStage
from tests.train_fixtures import SEQ, tiny_model

SFT_LEN = 96
SEED = 5
# Held-out pretrain windows: odd, so that 2 ranks split the eval set 3 + 2 (with micro-batch 2,
# one rank has a batch more: FSDP2 must still run the same forwards on both).
MAX_EVAL = 5
STAGES = {
    "pretrain": PretrainStage,
    "sft": SFTStage,
    "dpo": DPOStage,
    "grpo": GRPOStage,
    "ppo": PPOStage,
    "distill": DistillStage,
    "distill_cached": DistillStage,
}
INDEX = "_index"


class Indexed(Dataset):
    """`base` whose items also carry their own index: last in a tuple, a key in a dict."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        if isinstance(item, dict):
            return {**item, INDEX: i}
        return (*item, i)

    @property
    def lengths(self):
        return self.base.lengths


def recording(
    kind: str,
    data: dict[str, str],
    max_eval: int = MAX_EVAL,
    train_items: int | None = None,
    stage_kw: dict[str, Any] | None = None,
):
    """A `kind` stage whose training collate records the indices of the items it batches;
    `train_items` keeps only the first items of the training set (a short epoch); `stage_kw`
    are more of the stage's settings (PPO's critic)."""
    base = STAGES[kind]

    class Recording(base):
        def __init__(self):
            if kind == "pretrain":
                super().__init__(data["pretrain"], SEQ, max_eval=max_eval)
            elif kind == "grpo":
                super().__init__(data["rlaif"], num_generations=4, max_gen_len=8, max_eval=4)
            elif kind == "ppo":
                super().__init__(data["rlaif"], max_gen_len=8, max_eval=4, **(stage_kw or {}))
            elif kind.startswith("distill"):  # the same teacher on every rank: a seeded model
                teacher = tiny_model()
                torch.nn.init.normal_(teacher.lm_head.weight, std=0.5)
                kw = {}
                if kind == "distill_cached":  # its top-8 cache, built by this world's ranks
                    world = os.environ.get("WORLD_SIZE", "1")
                    cache = Path(data["sft"]).parent / f"teacher_top8_world{world}"
                    kw = dict(topk=8, teacher_cache=cache, cache_part_items=16)
                super().__init__(
                    data["sft"],
                    SFT_LEN,
                    teacher=teacher,
                    max_eval=max_eval,
                    eval_fraction=0.02,
                    **kw,
                )
            elif kind == "sft":
                # at least one eval row per rank (here and for distill): the 1% default gives one
                # row of the ~200 documents
                super().__init__(data[kind], SFT_LEN, eval_fraction=0.02, max_eval=max_eval)
            else:
                super().__init__(data[kind], SFT_LEN, max_eval=max_eval)
            self.seen: list[list[int]] = []  # one list per micro-batch, in training order

        def train_dataset(self):
            train = super().train_dataset()
            if train_items is not None:
                train = IndexView(train, range(train_items))
            return Indexed(train)

        def collate(self, items):
            first = items[0]
            if isinstance(first, dict) and INDEX in first:
                self.seen.append([it[INDEX] for it in items])
                items = [{k: v for k, v in it.items() if k != INDEX} for it in items]
            elif isinstance(first, tuple) and isinstance(first[-1], int):
                self.seen.append([it[-1] for it in items])
                items = [it[:-1] for it in items]
            return super().collate(items)  # eval items carry no index

    return Recording()


class Stop(Exception):
    """Raised on every rank right after the step checkpoint `stop_after` (an interrupted run)."""


class StoppingTrainer(Trainer):
    stop_after: int | None = None

    def _save_step(self):
        path = super()._save_step()
        if self.stop_after is not None and self.step >= self.stop_after:
            raise Stop
        return path


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, unsharded (a collective under FSDP2: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


def config_for(job: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        out_dir=job["out_dir"],
        max_steps=job["steps"],  # None: the whole of `epochs`
        epochs=job.get("epochs", 1),
        batch_size=job["batch_size"],
        accumulation_steps=job.get("accumulation_steps", 1),
        fsdp=job.get("fsdp", False),
        resume=job.get("resume", False),
        save_interval=job.get("save_interval", 1),
        keep_last=job.get("keep_last", 2),
        dtype="fp32",
        device="cpu",
        log_interval=1,
        learning_rate=1e-2,  # cosine decay over the run: a function of the samples seen
        seed=SEED,
    )


def run_job(job: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    """Train as `job` says; -> {"records": [rank 0's, rank 1's, ...], "weights": ...,
    "step": ...}, also saved by rank 0 as `result.pt` in `job["result_dir"]` when given."""
    stage = recording(
        job["stage"],
        data,
        job.get("max_eval", MAX_EVAL),
        job.get("train_items"),
        job.get("stage_kw"),
    )
    trainer = StoppingTrainer(
        config_for(job),
        stage,
        tiny_model(),
        tokenizer_dir=data["tokenizer"] if job.get("tokenizer") else None,
    )
    trainer.stop_after = job.get("stop_after")
    with contextlib.suppress(Stop):
        trainer.fit()
    world = trainer.world
    records: list[Any] = [None] * world.world_size
    if world.distributed:
        dist.all_gather_object(records, stage.seen)
    else:
        records = [stage.seen]
    if job.get("export"):  # every rank calls it: FSDP2 gathers the shards for rank 0
        folder = Path(job["result_dir"])
        trainer.export(folder / "export", pth=folder / "export.pth")
    result = {
        "records": records,
        "weights": full_weights(trainer.model),
        "step": trainer.step,
        "total_steps": trainer.total_steps,  # the progress bar's total
    }
    if world.is_main and job.get("result_dir"):
        folder = Path(job["result_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(result, folder / "result.pt")
    D.barrier(world)
    return result


# ---------------------------------------------------------------------------- rank-1 audit
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {
    "os.mkdir": 1,
    "os.rename": 2,
    "os.replace": 2,
    "os.remove": 1,
    "os.rmdir": 1,
    "os.truncate": 1,
    "os.symlink": 2,
    "os.link": 2,
    "shutil.rmtree": 1,
    "shutil.copyfile": 2,
    "shutil.move": 2,
}


def audit_writes(root: Path) -> list[str]:
    """Start noting this process's writes under `root`; returns the (growing) list."""
    root = root.resolve()
    seen: list[str] = []

    def under(p) -> bool:
        if isinstance(p, int) or p is None:
            return False
        p = os.fsdecode(p)
        return Path(os.path.abspath(p)).is_relative_to(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing and under(path):
                seen.append(f"open {os.fsdecode(path)}")
        elif event in _PATH_EVENTS:
            paths = args[: _PATH_EVENTS[event]]
            if any(under(p) for p in paths):
                seen.append(f"{event} {[os.fsdecode(p) for p in paths if p is not None]}")

    sys.addaudithook(hook)
    return seen


def main(plan_file: str) -> None:
    faulthandler.dump_traceback_later(float(os.environ.get("DIST_WORKER_TIMEOUT", 200)), exit=True)
    torch.set_num_threads(1)  # two processes on two cores
    plan = json.loads(Path(plan_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    writes = audit_writes(Path(plan["root"])) if plan.get("audit") else None
    try:
        for job in plan["jobs"]:
            run_job(job, plan["data"])
    finally:
        if writes is not None:
            shown = len(writes) if rank == 0 else json.dumps(writes)
            sys.stdout.flush()  # one write: the two ranks share torchrun's stdout
            os.write(sys.stdout.fileno(), f"\nrank{rank}-writes: {shown}\n".encode())
        D.teardown()
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main(sys.argv[1])
