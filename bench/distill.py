"""Evidence for the distillation stages on the demo corpus (prints JSON, writes
bench/results/distill.json). An evaluation, not a timed test: it asserts nothing.

- Knowledge distillation: a smaller student (hidden 128, 2 layers: about a third of the demo
  model's non-embedding weights) trained from scratch on the SFT file for the same steps and
  tokens, twice: by SFT alone (alpha 1) and distilled from the demo's SFT model (alpha 0.5,
  forward KL, T 1). Reported: held-out SFT loss (plain CE), held-out fact and arithmetic
  accuracy, and minutes, for both.
- Reasoning distillation: the demo's SFT model trained by `ReasonStage` on the reasoning file;
  the held-out format rate and answer match before and after.
- The top-k teacher cache (`--parts topk`, `--topk K`): the cache of the SFT file's first
  `--topk_records` records built once from the demo's SFT model (seconds, bytes on disk, bytes per labelled token), then the same
  student trained `--topk_steps` steps three ways in the same run: with the live teacher (full
  distribution), with the live teacher's top k, and from the cache (no teacher in memory), in
  `--topk_rounds` interleaved rounds; reported: each run's median training tokens/s over the
  steps after the first few, the median over rounds, and the held-out CE each reached; then
  the step's compute alone (forward, loss, backward) timed batch by batch with the three
  interleaved (`step_speed`), the steadier comparison on a shared machine.

    python bench/distill.py --workdir runs/demo      # the folder `minimind demo` wrote
    python bench/distill.py --workdir runs/demo --parts topk --out bench/results/distill_topk.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from stages import sft_loss  # bench/stages.py, beside this file: held-out CE per token

from minimind.checkpoint import load_checkpoint
from minimind.data.formats import RecordReader
from minimind.data.prepare import prepare
from minimind.eval.tasks import answer_accuracy
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.distributed import World
from minimind.train.engine import Trainer
from minimind.train.stages.distill import DistillStage
from minimind.train.stages.reason import ReasonStage

ROOT = Path(__file__).resolve().parent


def accuracy(model, tok, workdir: Path, name: str) -> float:
    records = list(RecordReader(workdir / "dataset" / f"{name}.jsonl"))
    return answer_accuracy(model, tok, records, max_new_tokens=64).value


def student(vocab: int) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(
        preset(
            "demo",
            vocab_size=vocab,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def run_kd(args, teacher_dir: Path, tmp: Path) -> dict:
    tok = load_tokenizer(teacher_dir)
    shards = tmp / "shards_sft"
    prepare(args.workdir / "dataset" / "sft_mini_512.jsonl", teacher_dir, shards, max_seq_len=256)
    out = {}
    for name, alpha in (("sft_only", 1.0), ("distilled", args.alpha)):
        stage = DistillStage(
            shards, 256, teacher=teacher_dir, alpha=alpha, temperature=args.temperature
        )
        config = TrainConfig(
            out_dir=str(tmp / name),
            epochs=args.epochs,
            batch_size=8,
            learning_rate=1e-3,
            warmup_ratio=0.02,
            dtype="fp32",
            log_interval=100,
            seed=0,
        )
        t0 = time.perf_counter()
        trainer = Trainer(config, stage, student(tok.vocab_size), tokenizer_dir=teacher_dir)
        trainer.fit()
        model = trainer.model.eval()
        out[name] = {
            "steps": trainer.step,
            "minutes": (time.perf_counter() - t0) / 60,
            "held_out_ce": sft_loss(model, stage),
            "facts_held_out": accuracy(model, tok, args.workdir, "eval_facts"),
            "facts_trained": accuracy(model, tok, args.workdir, "eval_facts_trained"),
            "arith_held_out": accuracy(model, tok, args.workdir, "eval_arith"),
            "arith_trained": accuracy(model, tok, args.workdir, "eval_arith_trained"),
        }
        print(name, json.dumps(out[name]), flush=True)
    out["student_parameters"] = student(tok.vocab_size).num_parameters()
    out["teacher"] = str(teacher_dir)
    return out


def run_topk(args, teacher_dir: Path, tmp: Path) -> dict:
    tok = load_tokenizer(teacher_dir)
    shards = tmp / "shards_sft"
    lines = (args.workdir / "dataset" / "sft_mini_512.jsonl").read_text("utf-8").splitlines()
    head = tmp / "sft_head.jsonl"  # the first records: the build's cost grows with the data
    head.write_text("\n".join(lines[: args.topk_records]) + "\n", encoding="utf-8")
    prepare(head, teacher_dir, shards, max_seq_len=256)
    cache = tmp / "teacher_cache"
    common = dict(teacher=teacher_dir, alpha=args.alpha, temperature=args.temperature)
    t0 = time.perf_counter()
    stage = DistillStage(shards, 256, topk=args.topk, teacher_cache=cache, **common)
    stage.build_cache(World(), contextlib.nullcontext)  # fp32 on the CPU, as the runs train
    meta = stage.cache.meta
    out: dict = {
        "k": args.topk,
        "build_seconds": time.perf_counter() - t0,
        "cache_bytes": stage.cache.nbytes(),
        "labelled_tokens": meta["rows"],
        "bytes_per_token": stage.cache.nbytes() / meta["rows"],
        "items": meta["items"],
    }
    print("cache", json.dumps(out), flush=True)
    runs = {
        "live_full": dict(topk=0),
        "live_topk": dict(topk=args.topk),
        "cached": dict(topk=args.topk, teacher_cache=cache),
    }
    # Rounds of the three runs, interleaved: on a shared machine the load drifts between runs,
    # and each run's median is compared within its round.
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.topk_rounds):
        for name, kw in runs.items():
            stage = DistillStage(shards, 256, **common, **kw)
            config = TrainConfig(
                out_dir=str(tmp / f"{name}_{r}"),
                max_steps=args.topk_steps,
                batch_size=8,
                learning_rate=1e-3,
                dtype="fp32",
                log_interval=1,
                eval_interval=0,
                seed=0,
            )
            trainer = Trainer(config, stage, student(tok.vocab_size), tokenizer_dir=teacher_dir)
            trainer.fit()
            lines = (tmp / f"{name}_{r}" / "metrics.jsonl").read_text().splitlines()
            rows = [json.loads(x) for x in lines]
            # past the first steps' warm-up; a batch without labelled tokens (loss 0) is no step
            per_step = [x["tokens_per_s"] for x in rows if x.get("loss")][5:]
            speeds[name].append(statistics.median(per_step))
            out[name] = {
                "steps": trainer.step,
                "tokens_per_s_per_round": speeds[name],
                "tokens_per_s": statistics.median(speeds[name]),
                "held_out_ce": sft_loss(trainer.model.eval(), stage),
                "teacher_in_memory": stage.teacher_model is not None,
            }
            print(name, r, json.dumps(out[name]), flush=True)
    out["cached_vs_live_full"] = out["cached"]["tokens_per_s"] / out["live_full"]["tokens_per_s"]
    out["interleaved"] = step_speed(args, shards, common, runs, tok, teacher_dir, tmp)
    print("interleaved", json.dumps(out["interleaved"]), flush=True)
    return out


def step_speed(args, shards, common, runs, tok, teacher_dir, tmp) -> dict:
    """The training step's compute (forward, loss, backward) per configuration, timed batch by
    batch with the configurations interleaved (ABCABC...), so that load drifting on a shared
    machine falls on all of them alike. The same first batches of the data for each; no
    optimizer step (it is the same for all)."""
    trainers = {}
    for name, kw in runs.items():
        config = TrainConfig(out_dir=str(tmp / f"speed_{name}"), dtype="fp32", seed=0)
        stage = DistillStage(shards, 256, **common, **kw)
        trainers[name] = Trainer(config, stage, student(tok.vocab_size), tokenizer_dir=teacher_dir)
        trainers[name]._build()
    batches = {
        name: [
            t.stage.collate([t.train_set[i] for i in range(b * 8, b * 8 + 8)])
            for b in range(args.speed_batches)
        ]
        for name, t in trainers.items()
    }
    seconds = {name: [] for name in runs}
    names = list(runs)
    for _rep in range(3):
        for b in range(args.speed_batches):
            for name in names[b % 3 :] + names[: b % 3]:  # rotate who goes first
                t = trainers[name]
                t0 = time.perf_counter()
                t.stage.loss(t.model, batches[name][b]).loss_sum.backward()
                seconds[name].append(time.perf_counter() - t0)
                t.model.zero_grad(set_to_none=True)
    tokens = sum(int(t.stage.count(x)) for x in batches["cached"]) * 3
    out = {name: {"tokens_per_s": tokens / sum(sec)} for name, sec in seconds.items()}
    for name in names:
        ratios = [a / b for a, b in zip(seconds["live_full"], seconds[name], strict=True)]
        out[name]["median_speedup_vs_live_full"] = statistics.median(ratios)
    return out


def run_reason(args, sft_dir: Path, tmp: Path) -> dict:
    shards = tmp / "shards_reasoning"
    prepare(args.workdir / "dataset" / "r1_mix_1024.jsonl", sft_dir, shards, max_seq_len=256)
    stage = ReasonStage(shards, 256, tag_weight=10.0, eval_prompts=64, max_eval=64)
    model, _ = load_checkpoint(sft_dir)
    config = TrainConfig(
        out_dir=str(tmp / "reason"),
        epochs=1,
        batch_size=8,
        learning_rate=5e-4,
        dtype="fp32",
        log_interval=100,
        seed=0,
    )
    trainer = Trainer(config, stage, model.train(), tokenizer_dir=sft_dir)
    trainer._build()  # evaluate the starting model as fit() would see it
    before = trainer.evaluate()
    t0 = time.perf_counter()
    trainer = Trainer(config, ReasonStage(shards, 256, eval_prompts=64, max_eval=64),
                      load_checkpoint(sft_dir)[0].train(), tokenizer_dir=sft_dir)  # fmt: skip
    trainer.fit()
    minutes = (time.perf_counter() - t0) / 60
    after = trainer.evaluate()
    return {"steps": trainer.step, "minutes": minutes, "before": before, "after": after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--parts", default="kd,reason")
    p.add_argument("--epochs", type=int, default=3, help="student epochs over the SFT file")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=32, help="k of the teacher cache (--parts topk)")
    p.add_argument("--topk_steps", type=int, default=40, help="student steps per topk run")
    p.add_argument("--topk_rounds", type=int, default=1, help="interleaved rounds of the runs")
    p.add_argument("--speed_batches", type=int, default=24, help="batches timed per config")
    p.add_argument("--topk_records", type=int, default=1024, help="SFT records cached")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "distill.json")
    args = p.parse_args()
    found = sorted((args.workdir / "out").glob("full_sft_*[0-9]"))
    if not found:
        raise SystemExit(f"no out/full_sft_* in {args.workdir}: run `minimind demo` first")
    sft_dir = found[-1]
    result: dict = {"machine": platform.platform(), "date": time.ctime(), "sft": str(sft_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            work = Path(tmp) / part
            work.mkdir()
            run = {"kd": run_kd, "reason": run_reason, "topk": run_topk}[part]
            result[part] = run(args, sft_dir, work)
            print(part, json.dumps(result[part], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
