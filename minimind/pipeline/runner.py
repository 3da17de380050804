"""Running the pipeline's stages in order, resumably: which to run, which to reuse, where a
killed run picks up.

Owns `Step` (one stage: name, title, the stages it reads, its function) and `Runner`, which
keeps `WORKDIR/pipeline.json`, the record of every stage: its input key and, once finished,
its result (the report card's entry for it: metrics, artifacts, wall time).

Contract:
- A stage's key hashes its recipe fields (recipe.STAGE_FIELDS), the seed and the smoke-run
  limits, and the keys of the stages it depends on; so changing `grpo_lr` reruns GRPO and what
  reads it, and reuses the corpus, the tokenizer, pretraining and SFT.
- A finished stage whose key is unchanged, whose artifacts still exist and whose upstream
  stages have not produced new outputs since (each finished stage gets a run id; a stage
  records the run ids it read) is reused: its recorded result is reported again with status
  "reused".
- `--from NAME` reruns NAME and every stage after it, whatever their records say; `--until
  NAME` stops after NAME (the later stages are reported as skipped, their records kept).
- A stage that started but did not finish (Ctrl-C, SIGKILL, a crash) is run again; training
  stages then resume from their last step checkpoint (the engine's bit-exact resume), so an
  interrupted run continues where it stopped. A stage that reruns for any other reason starts
  from an empty folder.
- The record is written atomically after every change: a kill never leaves it half-written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minimind.fsutil import atomic_write
from minimind.pipeline.recipe import STAGE_FIELDS, Recipe

STATE_FILE = "pipeline.json"
# Bump when a stage's meaning changes, so old records are not reused for it.
VERSION = 1


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    fn: Callable[[Any], dict]  # (Run) -> the stage's result entry
    after: tuple[str, ...] = ()  # the stages whose outputs it reads
    dirs: tuple[str, ...] = ()  # its folders under the workdir, emptied when it reruns afresh


class Runner:
    """Runs `steps` under `workdir`, reusing what an earlier run finished."""

    def __init__(
        self,
        workdir: Path,
        steps: list[Step],
        recipe: Recipe,
        *,
        seed: int = 0,
        limits: dict[str, Any] | None = None,
        start_from: str | None = None,
        until: str | None = None,
    ):
        names = [s.name for s in steps]
        for flag, name in (("--from", start_from), ("--until", until)):
            if name is not None and name not in names:
                raise SystemExit(f"{flag} {name}: no such stage; the stages are {', '.join(names)}")
        if start_from and until and names.index(until) < names.index(start_from):
            raise SystemExit(f"--until {until} comes before --from {start_from}")
        self.until = until
        self.workdir, self.steps, self.recipe = workdir, steps, recipe
        self.seed, self.limits = seed, dict(limits or {})
        self.start_from = start_from
        self.path = workdir / STATE_FILE
        self.state = self._load()
        self.keys = self._keys()

    def _load(self) -> dict:
        if not self.path.is_file():
            return {"version": VERSION, "stages": {}}
        try:
            state = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            print(f"   {self.path} unreadable ({e}); running every stage again")
            return {"version": VERSION, "stages": {}}
        if state.get("version") != VERSION:
            return {"version": VERSION, "stages": {}}
        return state

    def _save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        blob = (json.dumps(self.state, indent=1) + "\n").encode()
        atomic_write(self.path, lambda f: f.write(blob))

    def _keys(self) -> dict[str, str]:
        recipe = asdict(self.recipe)
        keys: dict[str, str] = {}
        for step in self.steps:
            payload = {
                "version": VERSION,
                "stage": step.name,
                "seed": self.seed,
                "limits": self.limits,
                "fields": {f: recipe[f] for f in STAGE_FIELDS.get(step.name, ())},
                "upstream": [keys[a] for a in step.after],
            }
            blob = json.dumps(payload, sort_keys=True).encode()
            keys[step.name] = hashlib.sha256(blob).hexdigest()[:16]
        return keys

    def plan(self) -> dict[str, str]:
        """name -> "reuse" | "resume" | "run" | "skip" (after --until) for every stage."""
        plan: dict[str, str] = {}
        forced = stopped = False
        for step in self.steps:
            if stopped:
                plan[step.name] = "skip"
                continue
            stopped = step.name == self.until
            forced = forced or step.name == self.start_from
            record = self.state["stages"].get(step.name) or {}
            same = record.get("key") == self.keys[step.name] and record.get(
                "inputs"
            ) == self._inputs(step)
            upstream_ok = all(plan[a] == "reuse" for a in step.after)
            if forced or not same or not upstream_ok:
                plan[step.name] = "run"
            elif record.get("status") == "started":
                plan[step.name] = "resume"
            elif record.get("status") == "done" and self._artifacts_exist(record):
                plan[step.name] = "reuse"
            else:
                plan[step.name] = "run"
        return plan

    def _inputs(self, step: Step) -> dict[str, str | None]:
        """The run ids of the upstream results a stage reads (a stage whose upstream stage
        produced new outputs since is not current, even with an unchanged key)."""
        stages = self.state["stages"]
        return {a: stages.get(a, {}).get("run_id") for a in step.after}

    def _artifacts_exist(self, record: dict) -> bool:
        artifacts = record.get("result", {}).get("artifacts", {})
        return all((self.workdir / p).exists() for p in artifacts.values())

    def result(self, name: str) -> dict:
        """The finished result of stage `name` (this run's or a reused one)."""
        return self.state["stages"][name]["result"]

    def run(self, context, on_start: Callable[[int, Step, str], None] | None = None) -> list[dict]:
        """Run or reuse every stage in order; returns their results (report entries)."""
        plan = self.plan()
        results = []
        for i, step in enumerate(self.steps):
            action = plan[step.name]
            if on_start is not None:
                on_start(i, step, action)
            if action == "skip":
                result = {"status": "skipped", "reason": f"after --until {self.until}"}
            elif action == "reuse":
                result = dict(self.result(step.name), status="reused")
            else:
                if action == "run":
                    for d in step.dirs:
                        shutil.rmtree(self.workdir / d, ignore_errors=True)
                self.state["stages"][step.name] = {
                    "key": self.keys[step.name],
                    "inputs": self._inputs(step),
                    "status": "started",
                }
                self._save()
                context.resuming = action == "resume"
                t0 = time.perf_counter()
                result = step.fn(context)
                result.setdefault("wall_s", time.perf_counter() - t0)
                result.setdefault("status", "done")
                self.state["stages"][step.name] = {
                    "key": self.keys[step.name],
                    "inputs": self._inputs(step),
                    "status": "done",
                    "run_id": uuid.uuid4().hex[:12],
                    "result": result,
                }
                self._save()
            result = {"name": step.name, "title": step.title, **result}
            results.append(result)
        return results
