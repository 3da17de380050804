"""Tiny data for training tests: a demo corpus, a small tokenizer, prepared shards of every
kind; the tiny stages built on them (`make_stage`); and a worker entry point
(`python tests/train_fixtures.py RUN_DIR SHARDS STEPS [KIND]`) that the kill test starts,
SIGKILLs and restarts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from minimind.data.demo import write_demo_corpus
from minimind.data.prepare import prepare
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stages.distill import DistillStage
from minimind.train.stages.dpo import DPOStage
from minimind.train.stages.grpo import GRPOStage
from minimind.train.stages.ppo import PPOStage
from minimind.train.stages.pretrain import PretrainStage
from minimind.train.stages.reason import ReasonStage
from minimind.train.stages.sft import SFTStage
from minimind.train.stages.spo import SPOStage

SEQ = 32


def make_data(root: Path) -> dict[str, Path]:
    files = write_demo_corpus(root / "corpus", seed=0, size_mb=0.05)
    texts = [line for line in files["pretrain"].read_text("utf-8").splitlines()]
    tok = train_tokenizer(texts, root / "tok", vocab_size=400, show_progress=False)
    out = {"tokenizer": tok}
    for kind in ("pretrain", "sft", "dpo", "rlaif", "reasoning"):
        prepare(
            files[kind],
            tok,
            root / f"shards_{kind}",
            max_seq_len=None if kind == "pretrain" else 96,
        )
        out[kind] = root / f"shards_{kind}"
    return out


def make_stage(kind: str, shards: Path, **kw):
    """The tiny-test stage of `kind` on prepared `shards` (pretrain, sft, dpo, grpo, ppo, spo,
    reason, distill, distill_cached: distill from the teacher's top-k cache)."""
    if kind == "pretrain":
        return PretrainStage(shards, SEQ, **{"max_eval": 4, **kw})
    if kind == "sft":
        return SFTStage(shards, 96, **{"max_eval": 4, **kw})
    if kind == "dpo":
        return DPOStage(shards, 96, **{"max_eval": 8, **kw})
    if kind == "grpo":
        kw = {"num_generations": 4, "max_gen_len": 8, "max_eval": 4, "beta": 0.1, **kw}
        return GRPOStage(shards, **kw)
    if kind == "ppo":
        kw = {"max_gen_len": 8, "max_eval": 4, "kl_coef": 0.05, **kw}
        return PPOStage(shards, **kw)
    if kind == "reason":
        return ReasonStage(shards, 96, **{"max_eval": 4, "eval_prompts": 4, **kw})
    if kind in ("distill", "distill_cached"):
        torch.manual_seed(11)  # the teacher: another tiny model
        teacher = MiniMindForCausalLM(preset("tiny", vocab_size=400))
        if kind == "distill_cached":  # its top-8 rows, built beside the shards on first use
            kw = {"teacher_cache": shards.parent / f"{shards.name}.teacher_top8", "topk": 8, **kw}
        return DistillStage(shards, 96, **{"teacher": teacher, "max_eval": 4, **kw})
    if kind == "spo":
        return SPOStage(shards, **{"max_gen_len": 8, "max_eval": 4, "init_samples": 2, **kw})
    raise ValueError(kind)


def tiny_model(vocab: int = 400, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(preset("tiny", vocab_size=vocab, **kw))


def train(run_dir, shards, steps, resume=True, kind="pretrain", **kw) -> Path:
    settings = {"batch_size": 4, "dtype": "fp32", "log_interval": 1, "save_interval": 1}
    config = TrainConfig(
        out_dir=str(run_dir),
        max_steps=steps,
        seed=1,
        resume=resume,
        learning_rate=1e-2,
        **{**settings, **kw},
    )
    stage = make_stage(kind, Path(shards))
    tok = Path(shards).parent / "tok"
    return Trainer(config, stage, tiny_model(dropout=0.1), tokenizer_dir=tok).fit()


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind = sys.argv[4] if len(sys.argv) > 4 else "pretrain"
    train(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), kind=kind)
