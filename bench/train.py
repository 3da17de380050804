"""Benchmark: training throughput through the real engine, against MiniMind's padded SFT loop.

Measures, on the offline demo corpus (a byte-level BPE tokenizer trained on it with the
preset's vocabulary: 6400 for minimind2-small and minimind2, 2048 for demo):

1. SFT useful tokens/s. Useful = loss-bearing targets (labels != -100): not pads, not prompt
   tokens. Ours is `Trainer` + `SFTStage` (one conversation per row, rows of similar length
   batched together, each batch right-padded to its longest row). The baseline is a loop
   written the way MiniMind's trainer/train_full_sft.py is: every row padded to
   max_seq_len, cross-entropy at every position multiplied by the loss mask, plain AdamW,
   clipping. Same rows, same model and initial weights, batch size, precision and compile
   setting. The two alternate step by step (an engine step, a padded step, ...) so that
   background load on a shared machine hits both alike.
2. Padding waste (pads / positions) and the loss-bearing share of positions, for both.
3. Pretraining tokens/s through `Trainer` + `PretrainStage` (packed windows: no pads, every
   position is a target).
4. On a GPU, MFU = non-pad tokens/s x flops_per_token / device peak (minimind.train.tracking;
   for other GPUs than the known ones pass --peak-tflops).

How an engine step is timed: `Trainer._train_step` is wrapped from outside. A step's time runs
from the moment the engine's loop got control back after the previous step to the end of this
step's optimizer update: fetching and collating the batch, forward, backward, clipping, the
update, and the loop's logging. Warm-up steps (compilation, and recompilation as SFT batch
lengths change) are not timed; see StepClock. Graphs compiled during the timed steps are
counted in the JSON and flagged under the table. The engine's own per-step figure (metrics.jsonl's tokens_per_s, which starts its clock after the
batch is fetched) is recorded beside it. The final checkpoint write is skipped (`_save_step`
is replaced): it is not a training step.

CPU (default): presets minimind2-small and demo, fp32 and bf16 autocast, eager and
torch.compile'd, on ONE thread: on a shared 2-core machine two OpenMP threads that lose a core
to another process stall at every op's barrier (a demo-sized step ran 10x slower on 2 threads
than on 1 under load); --threads 2 on a quiet machine. GPU: minimind2 in bf16, eager and
compiled, with MFU. The first compiled run on a machine fills inductor's on-disk cache and
takes minutes longer than the next.
A benchmark, not a test: it never asserts a speed. Timings on a shared machine are noisy;
the JSON records the load average before and after.

    python bench/train.py [--presets minimind2-small,demo] [--steps N] [--skip-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers is imported

import torch
import torch.nn.functional as F
from report import write_report  # bench/report.py, beside this file

from minimind.data.demo import write_demo_corpus
from minimind.data.padding import IGNORE_INDEX
from minimind.data.prepare import prepare
from minimind.data.texts import iter_texts
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import load_tokenizer, train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stages.pretrain import PretrainStage
from minimind.train.stages.sft import SFTStage
from minimind.train.tracking import device_peak_tflops, flops_per_token

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "train.json"
TRAIN_TEXTS = 20_000  # texts the tokenizer learns from
# Timed steps per case on CPU. minimind2-small's padded step (8 x 512 positions) takes about
# 9 s in fp32 on one core, and its pretrain step as long, so it gets few.
CPU_STEPS = {"minimind2-small": 3, "demo": 10}
AUTOCAST = {"bf16": torch.bfloat16}
PADDED_WARMUP = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument(
        "--presets",
        default=None,
        help="comma-separated presets (default: minimind2-small,demo on CPU; minimind2 on CUDA)",
    )
    p.add_argument(
        "--dtypes", default=None, help="comma-separated: fp32, bf16 (default: CPU both; CUDA bf16)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per case (default: CPU {CPU_STEPS}, other presets 10; CUDA 30)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="least untimed steps first (default: 1 eager CPU, 2 otherwise); compiled runs "
        "warm up further until they compile nothing new (at most 16 steps; see StepClock)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="rows per step (default: CPU 8, CUDA 64)"
    )
    p.add_argument("--max-seq-len", type=int, default=512, help="default: %(default)s")
    p.add_argument(
        "--size-mb",
        type=float,
        default=None,
        help="demo corpus size, MB of pretrain text; sft is 0.4x (default: CPU 2, CUDA 8)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (engine)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--skip-compile", action="store_true", help="eager only")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny preset, tiny corpus, 2 steps, eager only: a smoke run of seconds",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (default: %(default)s)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.presets = args.presets or "tiny"
        args.steps = args.steps or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.batch = args.batch or 2
        args.max_seq_len = 64
        args.size_mb = args.size_mb or 0.05
        args.skip_compile = True
    args.presets = (args.presets or ("minimind2" if cuda else "minimind2-small,demo")).split(",")
    args.dtypes = (args.dtypes or ("bf16" if cuda else "fp32,bf16")).split(",")
    args.batch = args.batch or (64 if cuda else 8)
    args.size_mb = args.size_mb or (8.0 if cuda else 2.0)
    args.modes = ["eager"] if args.skip_compile else ["eager", "compile"]
    if set(args.dtypes) - {"fp32", "bf16"}:
        p.error(f"--dtypes: fp32 and/or bf16, got {','.join(args.dtypes)}")
    return args


def plan(args: argparse.Namespace, name: str, mode: str) -> tuple[int, int, int]:
    """(least warm-up, most warm-up, timed) steps of one case; see StepClock."""
    cuda = args.device.startswith("cuda")
    steps = args.steps or (30 if cuda else CPU_STEPS.get(name, 10))
    least = (2 if mode == "compile" or cuda else 1) if args.warmup is None else args.warmup
    least = max(least, 1)  # the first step has no start time: the loop is not yet running
    return least, (max(least, 16) if mode == "compile" else least), steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --- data ------------------------------------------------------------------------------------


def build_data(tmp: Path, vocab_sizes: set[int], args: argparse.Namespace) -> dict[int, dict]:
    """One demo corpus; per vocabulary size a tokenizer trained on it, sft and pretrain shards."""
    corpus = write_demo_corpus(tmp / "corpus", seed=0, size_mb=args.size_mb)
    data = {}
    for vocab in sorted(vocab_sizes):
        texts = itertools.islice(iter_texts([corpus["pretrain"], corpus["sft"]]), TRAIN_TEXTS)
        tok = train_tokenizer(texts, tmp / f"tok{vocab}", vocab, show_progress=False)
        entry = {"tokenizer": tok, "vocab_size": load_tokenizer(tok).vocab_size}
        for kind, cut in (("sft", args.max_seq_len), ("pretrain", None)):
            out = tmp / f"{kind}{vocab}"
            prepare(corpus[kind], tok, out, max_seq_len=cut, workers=1)
            entry[kind] = out
        data[vocab] = entry
    return data


# --- timing the engine from outside ----------------------------------------------------------


class StepClock:
    """Wraps `trainer._train_step` to time whole engine steps (see the module docstring) and
    count their tokens. `after(micro)` runs after each step, outside the timed span.

    Warm-up ends after the first step, at least `warmup` and at most `max_warmup` in, that
    compiled no new graph (counting what `after` compiled too) although its batch shape was
    new, or, while every batch had the same shape, compiled nothing; the run is then cut to
    `steps` more steps by lowering the engine's `total_steps`. Eager runs warm up for exactly
    `warmup` steps. Why: SFT batches change length, and a compiled model settles only after
    several lengths (each frame is compiled static, then dynamic; graph breaks make more
    frames). A new length that compiles nothing shows every frame is dynamic; a quiet step
    at a known length shows nothing, so a fixed count would waste steps or time compiles."""

    def __init__(
        self,
        trainer: Trainer,
        pad_id: int | None,
        *,
        warmup: int,
        max_warmup: int,
        steps: int,
        after: Callable[[list], None] | None = None,
    ):
        for name in ("_train_step", "_save_step"):
            if not hasattr(trainer, name):
                raise SystemExit(f"bench/train.py: Trainer.{name} is gone; update StepClock")
        self.steps: list[dict] = []
        self.graphs = [graphs_compiled()]  # after each step; [0] before the first
        self.warm_at: int | None = None  # steps done when warm-up ended
        shapes: set[tuple] = set()
        self._resumed: float | None = None
        inner, device = trainer._train_step, trainer.world.device

        def timed(micro, *args):
            t0 = time.perf_counter()
            metrics = inner(micro, *args)
            sync(device)
            end = time.perf_counter()
            step = count(micro, pad_id)
            step["inner_s"] = end - t0
            step["seconds"] = None if self._resumed is None else end - self._resumed
            self.steps.append(step)
            if after is not None:
                after(micro)
            self.graphs.append(graphs_compiled())
            done = len(self.steps)
            shape = tuple(tuple(b["input_ids"].shape) for b in micro)
            telling = shape not in shapes or len(shapes) == 1
            shapes.add(shape)
            settled = telling and self.graphs[-1] == self.graphs[-2]
            if self.warm_at is None and done >= warmup and (settled or done >= max_warmup):
                self.warm_at = done
                trainer.total_steps = done + steps  # the loop stops after `steps` more
            self._resumed = time.perf_counter()
            return metrics

        trainer._train_step = timed
        trainer._save_step = lambda: None  # the final checkpoint is not a training step

    @property
    def graphs_while_timed(self) -> int:
        return self.graphs[-1] - self.graphs[self.warm_at]


def count(micro: list[dict[str, torch.Tensor]], pad_id: int | None) -> dict:
    """Useful (loss-bearing), real (non-pad), all positions and rows of a step's micro-batches.

    Pads are id `pad_id` (<|endoftext|>): byte-level BPE has no unknown token and the chat
    template uses <|im_start|>/<|im_end|>, so the id never occurs inside a conversation.
    `pad_id=None`: no pads (packed windows)."""
    useful = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
    positions = sum(b["input_ids"].numel() for b in micro)
    real = positions
    if pad_id is not None:
        real = sum(int((b["input_ids"] != pad_id).sum()) for b in micro)
    rows = sum(b["input_ids"].shape[0] for b in micro)
    return {"useful": useful, "real": real, "positions": positions, "rows": rows}


def summarise(steps: list[dict], warmup: int, config, peak: float | None) -> dict:
    """Totals over the timed steps (after `warmup`); rates are totals over total seconds.
    MFU (with a device peak) counts the model FLOPs of non-pad tokens only."""
    timed = steps[warmup:]
    seconds = sum(s["seconds"] for s in timed)
    useful, real, positions, rows = (
        sum(s[k] for s in timed) for k in ("useful", "real", "positions", "rows")
    )
    out = {
        "useful_tokens_per_s": useful / seconds,
        "real_tokens_per_s": real / seconds,
        "positions_per_s": positions / seconds,
        "pad_waste": 1 - real / positions,
        "useful_share": useful / positions,
        "median_step_ms": statistics.median(s["seconds"] for s in timed) * 1e3,
        # The untimed first steps (compilation, if any): inside the step for the engine.
        "warmup_s": sum(s.get("inner_s", s["seconds"]) for s in steps[:warmup]),
        "steps": len(timed),
        "seconds": seconds,
        "useful_tokens": useful,
        "positions": positions,
        "mean_padded_len": positions / rows,
    }
    if all("inner_s" in s for s in timed):
        # Inside _train_step vs around it (batch fetch + collate, logging).
        out["inside_step_fraction"] = sum(s["inner_s"] for s in timed) / seconds
    if peak:
        # Model FLOPs of the non-pad tokens; the attention term at the mean padded length.
        fpt = flops_per_token(config, round(positions / rows))
        out["mfu"] = real / seconds * fpt / (peak * 1e12)
    return out


def engine_reported(run_dir: Path, warmup: int) -> float | None:
    """Median tokens_per_s the engine itself logged for the timed steps."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [
        r["tokens_per_s"]
        for r in map(json.loads, path.read_text().splitlines())
        if "tokens_per_s" in r and r["step"] > warmup
    ]
    return statistics.median(values) if values else None


# --- MiniMind's padded loop ------------------------------------------------------------------


class PaddedLoop:
    """MiniMind's SFT step (trainer/train_full_sft.py), reduced to what costs time: rows padded
    to max_seq_len, per-position cross-entropy times the loss mask over its sum plus the MoE
    aux loss, backward, clip, plain AdamW (MiniMind's `optim.AdamW(model.parameters())`).

    It trains on exactly the rows of the engine step it follows (each re-padded to
    max_seq_len), so both sides count the same useful tokens and the speed-up is a ratio of
    times. Its data path (re-padding a collated batch) is cheaper than MiniMind's, which
    tokenizes and pads each sample in the Dataset: that favours the baseline."""

    def __init__(self, model, pad_id: int, max_seq_len: int, dtype: str, compile: bool, device):
        self.model, self.pad_id, self.T, self.dtype, self.device = (
            model,
            pad_id,
            max_seq_len,
            dtype,
            device,
        )
        # Static shapes: one graph for (B, max_seq_len), as a padded loop would compile.
        self.forward = torch.compile(model, dynamic=False) if compile else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
        self.steps: list[dict] = []

    def step(self, micro: list[dict[str, torch.Tensor]]) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        rows = [(b["input_ids"].cpu(), b["labels"].cpu()) for b in micro]
        batch = {
            "input_ids": torch.cat(
                [F.pad(x, (0, self.T - x.shape[1]), value=self.pad_id) for x, _ in rows]
            ),
            "labels": torch.cat(
                [F.pad(y, (0, self.T - y.shape[1]), value=IGNORE_INDEX) for _, y in rows]
            ),
        }
        x = batch["input_ids"].to(self.device)  # (B, T)
        y = batch["labels"].to(self.device)  # (B, T), -100 on prompt and pad
        mask = (y != IGNORE_INDEX).float()
        autocast = (
            torch.autocast(self.device.type, dtype=AUTOCAST[self.dtype])
            if self.dtype in AUTOCAST
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.forward(x)
            logits = out.logits  # (B, T, V)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.clamp(min=0).reshape(-1), reduction="none"
            ).view(y.shape)
            loss = (loss * mask).sum() / mask.sum() + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # MiniMind logs it; also a sync point
        sync(self.device)
        step = count([batch], self.pad_id)
        step["seconds"] = time.perf_counter() - t0
        self.steps.append(step)


# --- the cases -------------------------------------------------------------------------------


def new_model(name: str, vocab: int, seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset(name, vocab_size=vocab))


def train_config(run_dir: Path, args, dtype: str, mode: str, steps: int) -> TrainConfig:
    return TrainConfig(
        out_dir=str(run_dir),
        epochs=10**6,  # max_steps decides
        max_steps=steps,
        batch_size=args.batch,
        dtype=dtype,
        device=args.device,
        compile=mode == "compile",
        log_interval=1,
        num_workers=args.num_workers,
        peak_tflops=args.peak_tflops,
    )


def fit_quietly(trainer: Trainer) -> None:
    """The tracker prints a line per logged step; keep the benchmark's output to its table."""
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()


def run_case(stage_kind: str, name: str, entry: dict, dtype: str, mode: str, args, tmp: Path):
    """One engine run of `stage_kind` ("sft": paired with the padded loop, or "pretrain")."""
    warmup, max_warmup, steps = plan(args, name, mode)
    torch._dynamo.reset()
    run_dir = tmp / f"run_{stage_kind}_{name}_{mode}_{dtype}"
    if stage_kind == "sft":
        stage = SFTStage(entry["sft"], args.max_seq_len, max_eval=0)
        pad_id = stage.dataset.pad_id
    else:
        stage, pad_id = PretrainStage(entry["pretrain"], args.max_seq_len, max_eval=0), None
    trainer = Trainer(
        train_config(run_dir, args, dtype, mode, max_warmup + steps),
        stage,
        new_model(name, entry["vocab_size"]),
    )
    padded = None
    if stage_kind == "sft":
        padded = PaddedLoop(
            new_model(name, entry["vocab_size"]).to(trainer.world.device).train(),
            pad_id,
            args.max_seq_len,
            dtype,
            mode == "compile",
            trainer.world.device,
        )

    def after(micro) -> None:
        # The padded loop pairs every timed step; of the warm-up it needs only 2 steps (its
        # one static shape: compile, then the rotary table's first build recompiles).
        if clock.warm_at is not None or len(padded.steps) < PADDED_WARMUP:
            padded.step(micro)

    clock = StepClock(
        trainer,
        pad_id,
        warmup=warmup,
        max_warmup=max_warmup,
        steps=steps,
        after=after if padded else None,
    )
    t0 = time.perf_counter()
    fit_quietly(trainer)
    wall = time.perf_counter() - t0
    peak = device_peak_tflops(trainer.world.device, args.peak_tflops)
    config = trainer.model.config
    ours = summarise(clock.steps, clock.warm_at, config, peak)
    ours["engine_reported_tokens_per_s"] = engine_reported(run_dir, clock.warm_at)
    case = {
        "stage": stage_kind,
        "preset": name,
        "params": config.num_parameters(),
        "vocab_size": config.vocab_size,
        "mode": mode,
        "dtype": dtype,
        "warmup_steps": clock.warm_at,
        "ours": ours,
    }
    if padded is not None:
        timed = len(clock.steps) - clock.warm_at
        case["padded"] = summarise(padded.steps, len(padded.steps) - timed, config, peak)
        case["speedup"] = ours["useful_tokens_per_s"] / case["padded"]["useful_tokens_per_s"]
    case["graphs_compiled_while_timed"] = clock.graphs_while_timed
    case["wall_s"] = wall
    return case


# --- report ----------------------------------------------------------------------------------


def _git() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "-s"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def meta(args, device: torch.device, peak: float | None) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/train.py", *sys.argv[1:]]),
        "device": str(device),
        "cpu": cpu,
        "cpus_usable": usable,
        "threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": _git(),
        "presets": args.presets,
        "dtypes": args.dtypes,
        "modes": args.modes,
        "batch": args.batch,
        "max_seq_len": args.max_seq_len,
        "corpus_size_mb": args.size_mb,
        "num_workers": args.num_workers,
        "target": "SFT useful tokens/s: ours >= 2x the padded loop",
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
        out["peak_tflops"] = peak
    return out


def table(report: dict) -> str:
    gpu = "gpu" in report["meta"]
    head = ["preset", "mode", "dtype", "ours useful/s", "padded useful/s", "ours/padded"]
    head += ["waste ours", "waste padded", "useful share", "pretrain tok/s"]
    head += ["MFU sft", "MFU pretrain"] if gpu else []
    rows = [head]
    pre = {(c["preset"], c["mode"], c["dtype"]): c["ours"] for c in report["pretrain"]}
    for c in report["sft"]:
        o, b = c["ours"], c["padded"]
        p = pre.get((c["preset"], c["mode"], c["dtype"]))
        row = [
            c["preset"],
            c["mode"],
            c["dtype"],
            f"{o['useful_tokens_per_s']:.0f}",
            f"{b['useful_tokens_per_s']:.0f}",
            f"{c['speedup']:.2f}x",
            f"{o['pad_waste']:.1%}",
            f"{b['pad_waste']:.1%}",
            f"{o['useful_share']:.0%} / {b['useful_share']:.0%}",
            f"{p['positions_per_s']:.0f}" if p else "-",
        ]
        if gpu:
            row += [f"{o.get('mfu', 0):.1%}", f"{p.get('mfu', 0):.1%}" if p else "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.rjust(w) if i > 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    peak = device_peak_tflops(device, args.peak_tflops)
    report = {"meta": meta(args, device, peak), "complete": False, "sft": [], "pretrain": []}
    vocabs = {name: preset(name).vocab_size for name in args.presets}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        data = build_data(tmp, set(vocabs.values()), args)
        report["meta"]["data_s"] = time.perf_counter() - t0
        for name in args.presets:
            entry = data[vocabs[name]]
            for mode, dtype in itertools.product(args.modes, args.dtypes):
                for stage in ("sft", "pretrain"):
                    case = run_case(stage, name, entry, dtype, mode, args, tmp)
                    report[stage].append(case)
                    write_report(report, args.out)  # a partial report survives an interrupted run
                    print(
                        f"  {name} {mode}/{dtype} {stage}: {case['wall_s']:.0f} s", file=sys.stderr
                    )
    m = report["meta"]
    m["loadavg_end"] = list(os.getloadavg())
    m["wall_s"] = time.perf_counter() - t0
    report["complete"] = True
    write_report(report, args.out)
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} threads"
    print(
        f"{where}; torch {m['torch']}; batch {args.batch} rows, max_seq_len {args.max_seq_len}; "
        f"load average {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
    )
    print(
        "useful = loss-bearing target tokens; padded = MiniMind's loop, every row padded to "
        "max_seq_len; waste = pads / positions; useful share = useful / positions (ours / padded)"
    )
    print(table(report))
    for c in report["sft"] + report["pretrain"]:
        if c["graphs_compiled_while_timed"]:
            print(
                f"note: {c['graphs_compiled_while_timed']} graphs compiled during the timed steps "
                f"of {c['preset']} {c['mode']}/{c['dtype']} {c['stage']}: its figure includes them"
            )
    print(f"command: {m['command']}; wall {m['wall_s']:.0f} s")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
