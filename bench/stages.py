"""Evidence that the stages after SFT help: DPO, GRPO, PPO and SPO from the demo's SFT
checkpoint, on the demo corpus, with the held-out measures before and after (prints JSON,
writes bench/results/stages.json). An evaluation, not a timed test: it asserts nothing.

Measures (greedy decoding, the demo's held-out splits):
- GRPO, PPO, SPO: arithmetic accuracy on the RL operand pairs (`eval_arith_rl.jsonl`: what
  the rlaif prompts ask, never in pretraining or SFT text) and on the held-out pairs
  (`eval_arith.jsonl`: in no training file at all), before and after RL on the arithmetic
  prompts of `rlaif-mini.jsonl` (answer reward), with steps, minutes and the rollout/update
  split of a step.
- DPO (the demo's recipe: RPO alpha 1): preference accuracy on `eval_dpo.jsonl` (held-out
  pairs, minimind.eval.tasks.preference_accuracy), the share of questions about held-out
  strangers declined in generation, and the held-out SFT loss, before and after (DPO must not
  wreck the chat model).

Options: `--eval-every N` adds the curve of both arithmetic measures every N steps (on a copy
of the live weights, time not counted); `--rl-start CKPT` starts RL elsewhere than SFT (e.g.
the demo's DPO model, as the pipeline chains them); `--replay-alpha A` gives DPO the SFT
replay (`--replay_data`) at weight A; `--dpo-data FILE` another pairs file.

    python bench/stages.py --workdir runs/demo      # the folder `minimind demo` wrote
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from minimind.checkpoint import load_checkpoint
from minimind.data.formats import RecordReader
from minimind.data.prepare import prepare
from minimind.eval.tasks import answer_accuracy, preference_accuracy
from minimind.model.lora import LoRAConfig
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stage import IGNORE_INDEX
from minimind.train.stages.dpo import DPOStage
from minimind.train.stages.grpo import GRPOStage
from minimind.train.stages.ppo import PPOStage
from minimind.train.stages.sft import SFTStage
from minimind.train.stages.spo import SPOStage
from minimind.train.tracking import step_listener

ROOT = Path(__file__).resolve().parent


def sft_checkpoint(workdir: Path) -> Path:
    found = sorted((workdir / "out").glob("full_sft_*[0-9]"))
    if not found:
        raise SystemExit(f"no out/full_sft_* in {workdir}: run `minimind demo --workdir {workdir}`")
    return found[-1]


def ask(model, tok, workdir: Path, name: str) -> dict:
    records = list(RecordReader(workdir / "dataset" / f"{name}.jsonl"))
    acc = answer_accuracy(model, tok, records, max_new_tokens=64)
    return {"correct": acc.correct, "total": acc.total, "accuracy": acc.value}


def arith(model, tok, workdir: Path) -> dict:
    return {
        "rl_pairs": ask(model, tok, workdir, "eval_arith_rl"),
        "held_out": ask(model, tok, workdir, "eval_arith"),
    }


def dpo_measures(model, tok, workdir: Path, sft: SFTStage) -> dict:
    pairs = list(RecordReader(workdir / "dataset" / "eval_dpo.jsonl"))
    return {
        "preference": preference_accuracy(model, tok, pairs).value,
        "declines_strangers": ask(model, tok, workdir, "eval_strangers")["accuracy"],
        "facts_held_out": ask(model, tok, workdir, "eval_facts")["accuracy"],
        "arith_held_out": ask(model, tok, workdir, "eval_arith")["accuracy"],
        "sft_loss": sft_loss(model, sft),
    }


@torch.no_grad()
def sft_loss(model, stage: SFTStage) -> float:
    from minimind.train.stage import lm_loss

    model.eval()
    data = stage.eval_dataset()
    loss = count = 0.0
    for start in range(0, len(data), 16):
        batch = stage.collate([data[i] for i in range(start, min(start + 16, len(data)))])
        loss += float(lm_loss(model, batch["input_ids"], batch["labels"]).loss_sum)
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    return loss / count


def rl_stage(kind: str, shards: Path, args):
    common = dict(max_gen_len=64, reward="answer:1", max_eval=32)
    if kind == "grpo":
        return GRPOStage(shards, num_generations=args.generations, beta=args.beta, **common)
    if kind == "ppo":
        return PPOStage(shards, kl_coef=args.beta, lam=args.lam, **common)
    return SPOStage(shards, init_samples=args.spo_init, **common)


def run_rl(kind: str, args, ckpt: Path, tmp: Path) -> dict:
    model, _ = load_checkpoint(ckpt)
    tok = load_tokenizer(ckpt)
    before = arith(model, tok, args.workdir)
    src = args.workdir / "dataset" / "rlaif-mini.jsonl"
    rows = [json.loads(line) for line in src.read_text("utf-8").splitlines()]
    rows = [r for r in rows if str(r.get("answer", "")).lstrip("-").isdigit()]  # arithmetic
    arith_file = tmp / "rlaif_arith.jsonl"
    arith_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    prepare(arith_file, ckpt, tmp / "shards_rlaif", max_seq_len=128)
    stage = rl_stage(kind, tmp / "shards_rlaif", args)
    config = TrainConfig(
        out_dir=str(tmp / kind),
        epochs=1000,  # max_steps decides
        max_steps=args.rl_steps,
        # prompts per step: GRPO's G completions each; PPO and SPO one each, so they get G x
        # the prompts and every method samples the same number of completions per step
        batch_size=args.rl_batch * (1 if kind == "grpo" else args.generations),
        learning_rate=args.rl_lr,
        min_lr_ratio=1.0,
        dtype="fp32",
        log_interval=10,
        eval_interval=0,
        seed=0,
    )
    # The held-out curve: every --eval-every steps, both measures on a copy of the live
    # weights (a copy: generation must not touch the trained tensors); its time is not counted.
    curve: list[dict] = []
    held: dict = {"trainer": None, "eval_s": 0.0, "last": 0}

    def listen(step: int, total: int, metrics: dict) -> None:
        # the listener hears logged steps (every log_interval): measure at the first one past
        # each multiple of --eval-every
        due = args.eval_every and step // args.eval_every > held["last"] // args.eval_every
        if due and held["trainer"] is not None:
            held["last"] = step
            e0 = time.perf_counter()
            live = copy.deepcopy(stage.export_model(held["trainer"].model))
            curve.append({"step": step, **arith(live, tok, args.workdir)})
            held["eval_s"] += time.perf_counter() - e0

    token = step_listener.set(listen)
    t0 = time.perf_counter()
    try:
        trainer = held["trainer"] = Trainer(config, stage, model, tokenizer_dir=ckpt)
        trainer.fit()
    finally:
        step_listener.reset(token)
    minutes = (time.perf_counter() - t0 - held["eval_s"]) / 60
    after = arith(stage.export_model(trainer.model), tok, args.workdir)
    logs = [json.loads(x) for x in (tmp / kind / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logs if "reward" in m]
    return {
        "prompts": len(rows),
        "steps": trainer.step,
        "minutes": minutes,
        "arith_before": before,
        "arith_after": after,
        "curve": [
            {
                "step": c["step"],
                "rl_pairs": c["rl_pairs"]["accuracy"],
                "held_out": c["held_out"]["accuracy"],
            }
            for c in curve
        ],
        "train_reward_first": steps[0]["reward"],
        "train_reward_last": steps[-1]["reward"],
        "experience_s_per_step": sum(m.get("experience_s", 0) for m in steps) / len(steps),
        "update_s_per_step": sum(m.get("update_s", 0) for m in steps) / len(steps),
        "rollout_tokens_per_s": sum(m["rollout_tokens_per_s"] for m in steps) / len(steps),
        "settings": {
            "G": args.generations,
            "batch": config.batch_size,
            "lr": args.rl_lr,
            "beta_or_kl": args.beta,
            **({"lam": args.lam} if kind == "ppo" else {}),
        },
    }


def run_dpo(args, ckpt: Path, tmp: Path) -> dict:
    model, _ = load_checkpoint(ckpt)
    tok = load_tokenizer(ckpt)
    pairs = args.dpo_data or args.workdir / "dataset" / "dpo.jsonl"
    prepare(pairs, ckpt, tmp / "shards_dpo", max_seq_len=256)
    prepare(
        args.workdir / "dataset" / "sft_mini_512.jsonl", ckpt, tmp / "shards_sft", max_seq_len=256
    )
    lora = LoRAConfig(r=args.dpo_lora, alpha=2.0 * args.dpo_lora) if args.dpo_lora else None
    stage = DPOStage(
        tmp / "shards_dpo",
        256,
        beta=args.dpo_beta,
        rpo_alpha=args.rpo_alpha,
        replay=tmp / "shards_sft" if args.replay_alpha else None,
        replay_alpha=args.replay_alpha,
        lora=lora,
        max_eval=64,
    )
    sft = SFTStage(tmp / "shards_sft", 256, max_eval=256)
    before = dpo_measures(model, tok, args.workdir, sft)
    config = TrainConfig(
        out_dir=str(tmp / "dpo"),
        epochs=args.dpo_epochs,
        batch_size=8,
        learning_rate=args.dpo_lr,
        dtype="fp32",
        log_interval=25,
        seed=0,
    )
    t0 = time.perf_counter()
    trainer = Trainer(config, stage, model.train(), tokenizer_dir=ckpt)
    trainer.fit()
    minutes = (time.perf_counter() - t0) / 60
    after = dpo_measures(stage.export_model(trainer.model).eval(), tok, args.workdir, sft)
    return {
        "train_pairs": len(stage.train_dataset()),
        "steps": trainer.step,
        "minutes": minutes,
        "before": before,
        "after": after,
        "settings": {
            "lr": args.dpo_lr,
            "epochs": args.dpo_epochs,
            "beta": args.dpo_beta,
            "rpo_alpha": args.rpo_alpha,
            "replay_alpha": args.replay_alpha,
            "lora_rank": args.dpo_lora,
            "batch": 8,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--stages", default="dpo,grpo,ppo,spo")
    p.add_argument("--rl-steps", type=int, default=160)
    p.add_argument("--rl-start", type=Path, default=None, help="RL's start (default: SFT's)")
    p.add_argument("--rl-batch", type=int, default=8, help="GRPO prompts per step")
    p.add_argument("--rl-lr", type=float, default=5e-5)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.0, help="GRPO beta, PPO kl_coef")
    p.add_argument("--lam", type=float, default=1.0, help="PPO's GAE lambda")
    p.add_argument("--eval-every", type=int, default=0, help="held-out curve every N steps")
    p.add_argument("--spo-init", type=int, default=4, help="SPO prior samples per prompt")
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--dpo-epochs", type=int, default=2)
    p.add_argument("--rpo-alpha", type=float, default=1.0)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--replay-alpha", type=float, default=0.0, help="DPO: SFT replay weight")
    p.add_argument("--dpo-data", type=Path, default=None, help="default: the demo's dpo.jsonl")
    p.add_argument("--dpo-lora", type=int, default=0, help="LoRA rank for DPO (0: full)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "stages.json")
    args = p.parse_args()
    torch.manual_seed(0)
    ckpt = sft_checkpoint(args.workdir)
    rl_start = args.rl_start or ckpt
    result: dict = {
        "checkpoint": str(ckpt),
        "rl_start": str(rl_start),
        "machine": platform.platform(),
        "date": time.ctime(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stages.split(","):
            print(f"== {name}", flush=True)
            work = Path(tmp) / name
            work.mkdir()
            if name == "dpo":
                result[name] = run_dpo(args, ckpt, work)
            else:
                result[name] = run_rl(name, args, rl_start, work)
            print(json.dumps(result[name], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
