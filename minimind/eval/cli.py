"""`minimind eval MODEL [--tasks ...]`: every measure of eval/ on one model, as one table.

Owns the task list (a name -> the demo corpus file it reads, the split it is, and its measure),
`evaluate` (Python's entry: a model and tokenizer already loaded -> rows) and the command line
(load, evaluate, print, `--json`). The measures are perplexity.py's and tasks.py's; the model
and tokenizer come from the universal loader (minimind.infer.load: our checkpoint folder, a
MiniMind2 `.pth`, a transformers folder); `--write-lm-eval-tasks` is lm_eval_tasks.py's.

Tasks (default: every one whose file is in `--data`, the demo corpus of `minimind demo`):
- perplexity: mean NLL per token, perplexity and bits per byte on held-out text: the tail of
  the pretraining file (perplexity.held_out_texts), or every document of `--text FILE`.
- facts_trained, facts, arith_trained, arith: greedy answers to questions in phrasings and on
  operand pairs that training uses ("trained": memorisation) and in held-out ones
  (generalisation), scored by tasks.score, with the chance level of guessing beside each.
- arith_rl: the operand pairs RL practises on; strangers: the share of questions about unknown
  people that the model declines; identity: the share of held-out identity questions answered
  with the LoRA identity's name (neither has a guessing baseline: one right reply per language).
- dpo: the share of held-out preference pairs whose chosen reply has the higher log-probability
  (chance 50%), overall and per pair kind.
- reasoning: format rate and answer match of greedy replies to the reasoning file's held-out
  prompts: its last 1% of records, at most 64, the split the reasoning stage evaluates on
  (minimind.train.stage.split_eval over the file's order, which the shards keep).
`--limit N` keeps the first N items of each task (documents, questions, pairs, prompts); chance
is over the whole file, as the pipeline reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minimind import paths

# name -> (demo corpus file key (minimind.data.demo.FILE_NAMES), split, measure)
TASKS: dict[str, tuple[str, str, str]] = {
    "perplexity": ("pretrain", "held-out", "text"),
    "facts_trained": ("eval_facts_trained", "trained", "answer"),
    "facts": ("eval_facts", "held-out", "answer"),
    "arith_trained": ("eval_arith_trained", "trained", "answer"),
    "arith": ("eval_arith", "held-out", "answer"),
    "arith_rl": ("eval_arith_rl", "RL pairs", "answer"),
    "strangers": ("eval_strangers", "held-out", "abstain"),
    "identity": ("eval_identity", "held-out", "named"),
    "dpo": ("eval_dpo", "held-out", "preference"),
    "reasoning": ("reasoning", "held-out", "reasoning"),
}
REASON_EVAL_FRACTION, REASON_MAX_EVAL = 0.01, 64  # the pipeline's ReasonStage split
RATES = {"accuracy", "abstains", "prefers chosen", "format rate", "answer match"}


def file_name(key: str) -> str:
    """The demo corpus's file name of a file key (an eval file newer than this module's
    minimind.data.demo is named after its key)."""
    from minimind.data.demo import FILE_NAMES

    return FILE_NAMES.get(key, f"{key}.jsonl")


def default_data_dir() -> Path:
    """The demo corpus of the default `minimind demo` workdir."""
    return paths.home() / "runs" / "demo" / "dataset"


@dataclass
class Row:
    """One line of the table: `value` is a rate in [0, 1] for the rate metrics (printed as a
    percentage), else a plain number; `correct`/`total` count the items behind a rate (`total`
    alone: the documents behind a perplexity figure)."""

    task: str
    split: str
    metric: str
    value: float
    total: int
    correct: int | None = None
    chance: float | None = None
    samples: list[dict] | None = None  # the first items: prompt, reply, gold, ok (not printed)

    def cells(self) -> list[str]:
        rate = self.metric.split(":")[0] in RATES
        value = f"{100 * self.value:.1f}%" if rate else f"{self.value:.4f}"
        count = f"{self.correct}/{self.total}" if self.correct is not None else str(self.total)
        chance = "" if self.chance is None else f"{100 * self.chance:.1f}%"
        return [self.task, self.split, self.metric, value, count, chance]


HEADER = ["task", "split", "metric", "value", "n", "chance"]


def format_table(rows: list[Row]) -> str:
    lines = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    right = {3, 4, 5}  # numbers align right
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    )


def task_files(data: Path, tasks: list[str], text: Path | None = None) -> dict[str, Path]:
    """Each task's input file; FileNotFoundError naming what is missing and what to do."""
    out: dict[str, Path] = {}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        if task == "perplexity" and text is not None:
            if not text.is_file():
                raise FileNotFoundError(f"--text {text}: no such file")
            out[task] = text
            continue
        if not data.is_dir():
            raise FileNotFoundError(
                f"no demo corpus at {data}: run `minimind demo` first or pass --data DIR"
            )
        path = data / file_name(TASKS[task][0])
        if not path.is_file():
            raise FileNotFoundError(f"{data} has no {path.name} (task {task}); pass --data DIR")
        out[task] = path
    return out


def evaluate(
    model,
    tokenizer,
    files: dict[str, Path],
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    reasoning_tokens: int = 256,
    seq_len: int = 512,
    held_out_text: bool = True,
    log=None,
) -> list[Row]:
    """The rows of the tasks named by `files` (task -> its file, see `task_files`), in TASKS'
    order. `held_out_text` False: perplexity on every document of its file, not the tail."""
    from minimind.data.formats import RecordReader
    from minimind.train.stage import split_eval

    from .perplexity import held_out_texts, perplexity, read_texts
    from .tasks import answer_accuracy, chance_level, preference_accuracy, reasoning_accuracy

    rows: list[Row] = []
    for task in (t for t in TASKS if t in files):
        path, (_, split, measure) = files[task], TASKS[task]
        t0 = time.perf_counter()
        if measure == "text":
            texts = held_out_texts(path) if held_out_text else read_texts(path)
            texts = texts[:limit]
            split = split if held_out_text else path.name
            ppl = perplexity(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size)
            for metric, key in (("bits per byte", "bits_per_byte"), ("perplexity", "perplexity")):
                rows.append(Row(task, split, metric, ppl[key], len(texts)))
            rows.append(Row(task, split, "nll (nats/token)", ppl["nll"], len(texts)))
        elif measure in ("answer", "abstain", "named"):
            lines = path.read_text("utf-8").splitlines()
            rows_json = [json.loads(line) for line in lines if line.strip()]
            records = list(RecordReader(path))[:limit]
            acc = answer_accuracy(
                model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            metric = "abstains" if measure == "abstain" else "accuracy"
            chance = chance_level(rows_json) if measure == "answer" else None
            samples = [
                {"prompt": q, "reply": a, "gold": g, "ok": ok} for q, a, g, ok in acc.samples
            ]
            rows.append(
                Row(task, split, metric, acc.value, acc.total, acc.correct, chance, samples)
            )
        elif measure == "preference":
            kinds = [json.loads(line).get("kind") for line in path.read_text("utf-8").splitlines()]
            records = list(RecordReader(path))[:limit]
            acc = preference_accuracy(model, tokenizer, records, batch_size=batch_size)
            rows.append(Row(task, split, "prefers chosen", acc.value, acc.total, acc.correct, 0.5))
            for kind in sorted({k for k in kinds[: acc.total] if k}):
                oks = [ok for ok, k in zip(acc.oks, kinds) if k == kind]
                value = sum(oks) / len(oks)
                rows.append(
                    Row(task, split, f"prefers chosen: {kind}", value, len(oks), sum(oks), 0.5)
                )
        else:  # reasoning: the held-out tail of the file
            records = list(RecordReader(path))
            held = split_eval(records, REASON_EVAL_FRACTION, REASON_MAX_EVAL)[1]
            held = [held[i] for i in range(len(held))][:limit]
            layout, match = reasoning_accuracy(
                model, tokenizer, held, max_new_tokens=reasoning_tokens, batch_size=batch_size
            )
            for metric, acc in (("format rate", layout), ("answer match", match)):
                rows.append(Row(task, split, metric, acc.value, acc.total, acc.correct))
        if log is not None:
            log(f"{task}: {time.perf_counter() - t0:.1f}s")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimind eval",
        description="Evaluate a model: perplexity, task accuracy, preference accuracy and "
        "reasoning format on the demo corpus's held-out splits.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="our checkpoint folder, a MiniMind2 .pth or a transformers folder",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated, of: {', '.join(TASKS)} (default: every one whose file exists)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"the demo corpus folder (default: {default_data_dir()})",
    )
    parser.add_argument(
        "--text",
        type=Path,
        default=None,
        help="perplexity on every document of this file (a .jsonl data file, or plain text)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64, help="per answer")
    parser.add_argument("--reasoning_tokens", type=int, default=256, help="per reasoning reply")
    parser.add_argument("--seq_len", type=int, default=512, help="perplexity window")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    parser.add_argument(
        "--write-lm-eval-tasks",
        dest="lm_eval_dir",
        type=Path,
        default=None,
        help="write the demo tasks as lm-evaluation-harness task files into this folder "
        "(`lm_eval --include_path DIR --tasks minimind`); MODEL is then optional",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = args.data or default_data_dir()
    try:
        if args.lm_eval_dir is not None:
            from .lm_eval_tasks import write_lm_eval_tasks

            if not data.is_dir():
                raise FileNotFoundError(
                    f"no demo corpus at {data}: run `minimind demo` first or pass --data DIR"
                )
            names = write_lm_eval_tasks(data, args.lm_eval_dir, max_new_tokens=args.max_new_tokens)
            print(f"lm-eval tasks {', '.join(names)} in {args.lm_eval_dir}")
            if args.model is None:
                return 0
        if args.model is None:
            raise ValueError("MODEL is required (a checkpoint folder, .pth or transformers folder)")
        if args.tasks:
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        else:
            tasks = [t for t, (key, _, _) in TASKS.items() if (data / file_name(key)).is_file()]
            if args.text is not None and "perplexity" not in tasks:
                tasks.insert(0, "perplexity")
            if not tasks:
                raise FileNotFoundError(
                    f"no demo corpus at {data}: run `minimind demo` first or pass --data DIR"
                )
        files = task_files(data, tasks, args.text)
    except (FileNotFoundError, ValueError) as e:
        print(f"minimind eval: {e}", file=sys.stderr)
        return 2

    from minimind.infer.load import load_model

    loaded = load_model(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
    print(f"model: {loaded.describe()}", file=sys.stderr)
    rows = evaluate(
        loaded.model,
        loaded.tokenizer,
        files,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        reasoning_tokens=args.reasoning_tokens,
        seq_len=args.seq_len,
        held_out_text=args.text is None,
        log=lambda line: print(f"  {line}", file=sys.stderr),
    )
    print(format_table(rows))
    if args.json is not None:
        report = {
            "model": str(args.model),
            "kind": loaded.kind,
            "data": str(data),
            "text": None if args.text is None else str(args.text),
            "limit": args.limit,
            "rows": [asdict(row) for row in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return 0
