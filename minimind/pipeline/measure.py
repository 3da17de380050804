"""What the pipeline measures after each stage, on the demo corpus's held-out files.

Owns `LABELS` (how the report names each task of `minimind eval`) and `Measures`, which
scores a model on a task once and remembers the figure under the model's name: a stage's
"before" is the figure its starting model already earned, so no evaluation runs twice. The
tasks and their scoring are minimind.eval.cli's (the same numbers `minimind eval MODEL`
prints): greedy answers scored by the RL stages' verifiable reward, preference accuracy by
summed log-probabilities, bits per byte on held-out text.

A metric is the report card's row: {name, label, split, before, after, unit, chance, n}.
"""

from __future__ import annotations

import json
from pathlib import Path

# task of minimind.eval.cli -> (the report's label, the row's metric, its unit)
LABELS: dict[str, tuple[str, str, str]] = {
    "perplexity": ("bits per byte of held-out text", "bits per byte", "bits/byte"),
    "facts_trained": ("facts", "accuracy", "accuracy"),
    "facts": ("facts", "accuracy", "accuracy"),
    "arith_trained": ("arithmetic", "accuracy", "accuracy"),
    "arith": ("arithmetic", "accuracy", "accuracy"),
    "arith_rl": ("arithmetic on the RL operand pairs", "accuracy", "accuracy"),
    "strangers": ("declines questions about unknown people", "abstains", "accuracy"),
    "identity": ("answers as Lumen (the LoRA identity)", "accuracy", "accuracy"),
    "dpo": ("prefers the chosen reply (DPO pairs)", "prefers chosen", "accuracy"),
}


class Measures:
    """Task figures of named models, memoised in `store` (kept across reruns by the runner)."""

    def __init__(self, data: Path, tokenizer, store: dict, limit: int | None = None):
        self.data, self.tokenizer, self.store, self.limit = data, tokenizer, store, limit

    def score(self, model_name: str, model, task: str) -> dict:
        """{"value", "n", "chance", "split", "samples", "by_kind"} of `model` on `task`,
        computed once per (model name, task)."""
        key = f"{model_name}:{task}"
        if key not in self.store:
            self.store[key] = self._score(model, task)
        return self.store[key]

    def _score(self, model, task: str) -> dict:
        from minimind.eval.cli import evaluate, task_files

        rows = evaluate(model, self.tokenizer, task_files(self.data, [task]), limit=self.limit)
        metric = LABELS[task][1]
        main = next(r for r in rows if r.metric == metric)
        by_kind = {
            r.metric.split(": ", 1)[1]: [r.correct, r.total]
            for r in rows
            if r.metric.startswith(f"{metric}: ")
        }
        return {
            "value": main.value,
            "n": main.total,
            "chance": main.chance,
            "split": main.split,
            "samples": (main.samples or [])[:2],
            "by_kind": by_kind,
        }

    def metric(self, task: str, before: dict | None, after: dict | None) -> dict:
        """The report row of `task` from two `score` results (either may be None)."""
        label, _, unit = LABELS[task]
        ref = after or before or {}
        return {
            "name": task,
            "label": label,
            "split": ref.get("split"),
            "before": None if before is None else before["value"],
            "after": None if after is None else after["value"],
            "unit": unit,
            "chance": ref.get("chance"),
            "n": ref.get("n"),
        }

    def compare(self, tasks, before_name, before_model, after_name, after_model) -> list[dict]:
        """Rows for `tasks`, each scored on both models (a None model: that side left empty)."""
        rows = []
        for task in tasks:
            b = self.score(before_name, before_model, task) if before_model is not None else None
            a = self.score(after_name, after_model, task) if after_model is not None else None
            rows.append(self.metric(task, b, a))
        return rows


def loss_metric(name: str, label: str, before: float | None, after: float | None) -> dict:
    """A report row for a held-out loss (lower is better)."""
    return {
        "name": name,
        "label": label,
        "split": "held-out",
        "before": before,
        "after": after,
        "unit": "loss",
        "chance": None,
        "n": None,
    }


def curves(run_dir: Path, keys: dict[str, str] | None = None) -> dict[str, list[list[float]]]:
    """Curves of an engine run (its metrics.jsonl): metric key -> curve name, by default the
    train loss ("loss" -> "train") and the held-out loss ("eval_loss" -> "eval"); a step logged
    twice (a resumed run) keeps its last value."""
    keys = keys or {"loss": "train", "eval_loss": "eval"}
    out: dict[str, list[list[float]]] = {curve: [] for curve in keys.values()}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    seen: dict[tuple[str, int], float] = {}
    for line in path.read_text("utf-8").splitlines():
        record = json.loads(line)
        for key, curve in keys.items():
            if key in record:
                seen[(curve, int(record["step"]))] = float(record[key])
    for (curve, step), value in sorted(seen.items()):
        out[curve].append([step, value])
    return out
