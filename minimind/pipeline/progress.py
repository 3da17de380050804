"""The pipeline's one progress display: the stage, its own progress, the whole run's ETA.

Owns `Display`. Each stage starts with a header line (`[5/12] pretrain ... 1m23s elapsed,
about 4m10s left`); while a training stage runs, the engine's logged steps come here through
`minimind.train.tracking.step_listener` (the engine then draws no bar of its own), shown as
one line rewritten in place on a terminal and as a line per tenth of the stage otherwise
(logs, CI).

The ETA weighs the stages still to run by their typical share of a default run on this
project's 2-core CPU (`WEIGHTS`, seconds; bench/RESULTS.md), scaled by how fast this run has
gone so far, and the running stage by its fraction of steps done. Reused stages cost nothing.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from minimind.train.tracking import step_listener

WEIGHTS = {
    "corpus": 6,
    "tokenizer": 8,
    "shards": 8,
    "pretrain": 300,
    "sft": 120,
    "lora": 30,
    "dpo": 35,
    "grpo": 50,
    "reason": 40,
    "distill": 60,
    "export": 8,
    "chat": 5,
}
_SHOWN = ("loss", "reward", "eval_loss")


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Display:
    def __init__(self, names: list[str], plan: dict[str, str], stream=None):
        self.names, self.plan = names, plan
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done_weight = 0.0  # weight of the stages run (not reused) and finished
        self.done_seconds = 0.0
        self.current: str | None = None
        self.stage_t0 = self.t0
        self._shown_tenth = -1

    def _weight(self, name: str) -> float:
        return 0.0 if self.plan.get(name) in ("reuse", "skip") else float(WEIGHTS.get(name, 10))

    def eta(self, fraction: float = 0.0) -> float | None:
        """Seconds left: the remaining weight at this run's own speed so far."""
        if self.current is None:
            return None
        i = self.names.index(self.current)
        left = sum(self._weight(n) for n in self.names[i + 1 :])
        left += self._weight(self.current) * (1 - fraction)
        elapsed_now = time.perf_counter() - self.stage_t0
        seconds = self.done_seconds + elapsed_now
        weight = self.done_weight + self._weight(self.current) * fraction
        rate = seconds / weight if weight > 1e-9 and seconds > 5 else 1.0
        return left * rate

    def start(self, index: int, name: str, title: str, action: str) -> None:
        self.finish_stage()
        self.current, self.stage_t0, self._shown_tenth = name, time.perf_counter(), -1
        elapsed = time.perf_counter() - self.t0
        eta = self.eta()
        what = {
            "reuse": "reused from the last run",
            "resume": "resuming",
            "run": "",
            "skip": "skipped: after --until",
        }[action]
        print(
            f"\n== [{index + 1}/{len(self.names)}] {title}"
            + (f"  ({what})" if what else "")
            + f"   [{clock(elapsed)} elapsed, about {clock(eta or 0)} left]",
            file=self.stream,
            flush=True,
        )

    def finish_stage(self) -> None:
        if self.current is not None and self.plan.get(self.current) not in ("reuse", "skip"):
            self.done_seconds += time.perf_counter() - self.stage_t0
            self.done_weight += self._weight(self.current)
        if self.tty and self.current is not None:
            print(file=self.stream, flush=True)
        self.current = None

    def step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """The engine's step listener."""
        fraction = step / max(total, 1)
        info = " ".join(f"{k} {metrics[k]:.4g}" for k in _SHOWN if k in metrics)
        line = (
            f"   {self.current} step {step}/{total} {info}   "
            f"[run: {clock(time.perf_counter() - self.t0)} elapsed, about "
            f"{clock(self.eta(fraction) or 0)} left]"
        )
        if self.tty:
            print("\r" + line.ljust(100), end="", file=self.stream, flush=True)
        elif int(fraction * 10) > self._shown_tenth or "eval_loss" in metrics:
            self._shown_tenth = int(fraction * 10)
            print(line, file=self.stream, flush=True)

    @contextmanager
    def listening(self):
        """Route the engine's logged steps here for the duration."""
        token = step_listener.set(self.step)
        try:
            yield self
        finally:
            step_listener.reset(token)
