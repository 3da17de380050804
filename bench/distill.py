"""Evidence for the distillation stages on the demo corpus (prints JSON, writes
bench/results/distill.json). An evaluation, not a timed test: it asserts nothing.

- Knowledge distillation: a smaller student (hidden 128, 2 layers: about a third of the demo
  model's non-embedding weights) trained from scratch on the SFT file for the same steps and
  tokens, twice: by SFT alone (alpha 1) and distilled from the demo's SFT model (alpha 0.5,
  forward KL, T 1). Reported: held-out SFT loss (plain CE), held-out fact and arithmetic
  accuracy, and minutes, for both.
- Reasoning distillation: the demo's SFT model trained by `ReasonStage` on the reasoning file;
  the held-out format rate and answer match before and after.

    python bench/distill.py --workdir runs/demo      # the folder `minimind demo` wrote
"""

from __future__ import annotations

import argparse
import json
import platform
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
from minimind.train.engine import Trainer
from minimind.train.stages.distill import DistillStage
from minimind.train.stages.reason import ReasonStage

ROOT = Path(__file__).resolve().parent


def accuracy(model, tok, workdir: Path, name: str) -> float:
    records = list(RecordReader(workdir / "dataset" / f"{name}.jsonl"))
    return answer_accuracy(model, tok, records, max_new_tokens=24).value


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
            result[part] = (run_kd if part == "kd" else run_reason)(args, sft_dir, work)
            print(part, json.dumps(result[part], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
