"""`minimind train STAGE` and MiniMind's `trainer/train_*.py`: flags -> a run.

Owns the flags every stage shares (MiniMind's names) and their mapping to ModelConfig and
TrainConfig, and the resolution of names to files: `--data_path` (a jsonl file, prepared into token shards
once and cached, or an already prepared shards folder), `--tokenizer`, `--from_weight`
(a name under out/ or a path) and `--save_weight`. A stage's own flags, its defaults for the
shared ones and its construction live in its file (stages/, `Stage.add_flags`, `defaults`,
`from_args`); the loop itself is engine.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minimind import paths

# The shared flags' defaults; a stage's `defaults` override them.
COMMON_DEFAULTS = {
    "max_seq_len": 512,
    "batch_size": 32,
    "accumulation_steps": 1,
    "learning_rate": 5e-5,
    "epochs": 1,
}


def stages() -> dict:
    """{name: Stage class} of every registered stage, in pipeline order."""
    from .stages import REGISTRY

    return dict(sorted(REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


class UsageError(Exception):
    """A problem with the command line or the files it names; printed without a traceback."""


def build_parser(stage: str) -> argparse.ArgumentParser:
    cls = stages()[stage]
    d = {**COMMON_DEFAULTS, **cls.defaults}
    p = argparse.ArgumentParser(
        prog=f"minimind train {stage}",
        description=f"MiniMind {stage} training: {cls.help}" if cls.help else None,
    )
    a = p.add_argument
    a(
        "--data_path",
        default=None,
        help=f"jsonl file or prepared shards folder (default: dataset/{d['data_path']})",
    )
    a(
        "--tokenizer",
        default=None,
        help="tokenizer folder (default: the --from_weight checkpoint's, else model/tokenizer)",
    )
    a(
        "--out_dir",
        default=None,
        help="run folder for step checkpoints (default: checkpoints/{save_weight}_{hidden})",
    )
    a("--save_dir", default=None, help="where the final weights go (default: out/)")
    a("--save_weight", default=d["save_weight"], help="name of the final weights")
    a("--from_weight", default=d["from_weight"], help="'none', a name under out/, or a path")
    a("--save_pth", type=int, default=1, help="also write MiniMind's out/{name}_{hidden}.pth (1/0)")
    # model (MiniMind's flags; used when starting from scratch)
    a("--preset", default=None, help="a named preset (minimind presets) instead of the size flags")
    a("--hidden_size", type=int, default=512)
    a("--num_hidden_layers", type=int, default=8)
    a("--use_moe", type=int, default=0)
    a("--max_seq_len", type=int, default=d["max_seq_len"])
    # loop
    a("--epochs", type=int, default=d["epochs"])
    a("--max_steps", type=int, default=None)
    a("--batch_size", type=int, default=d["batch_size"])
    a("--accumulation_steps", type=int, default=d["accumulation_steps"])
    a("--learning_rate", type=float, default=d["learning_rate"])
    a("--min_lr_ratio", type=float, default=0.1)
    a("--warmup_ratio", type=float, default=0.0)
    a("--weight_decay", type=float, default=0.1)
    a("--grad_clip", type=float, default=1.0)
    a("--dtype", default="bf16", choices=("bf16", "fp16", "fp32", "bfloat16", "float16", "float32"))
    a("--device", default="auto")
    a("--use_compile", type=int, default=0)
    a("--activation_checkpointing", type=int, default=0)
    a("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    a("--num_workers", type=int, default=0)
    a("--log_interval", type=int, default=100)
    a("--save_interval", type=int, default=1000)
    a("--eval_interval", type=int, default=0)
    a("--eval_batches", type=int, default=20)
    a("--keep_last", type=int, default=3)
    a("--seed", type=int, default=42)
    a("--from_resume", type=int, default=0, help="1: continue the run in --out_dir")
    a("--resume", action="store_true", help="same as --from_resume 1")
    a("--use_wandb", action="store_true", help="track with wandb (WANDB_MODE=offline works)")
    a("--use_swanlab", action="store_true", help="track with SwanLab")
    a("--wandb_project", default="MiniMind")
    a("--tensorboard", action="store_true")
    a("--peak_tflops", type=float, default=None, help="device peak for the MFU estimate")
    cls.add_flags(p.add_argument_group(f"{stage} options"))
    return p


def _dtype(name: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)


def weight_name(name: str, config) -> str:
    """MiniMind's naming: `{name}_{hidden}[_moe]`.

    >>> from minimind.model import preset
    >>> weight_name("full_sft", preset("minimind2-moe"))
    'full_sft_640_moe'
    """
    return f"{name}_{config.hidden_size}{'_moe' if config.use_moe else ''}"


def resolve_weight(spec: str, hidden: int, moe: bool, save_dir: Path) -> Path:
    """A --from_weight value -> a checkpoint folder or .pth file that exists."""
    from minimind.infer.load import find_weight

    try:
        return find_weight(spec, hidden, moe, save_dir)
    except FileNotFoundError as e:
        raise UsageError(
            f"--from_weight {e}. Train that stage first (e.g. `minimind train pretrain`), or "
            "give a path."
        ) from None


def resolve_data(stage: str, spec: str | None, tokenizer_dir: Path, max_seq_len: int) -> Path:
    """--data_path -> a prepared shards folder (jsonl files are prepared once and cached)."""
    from minimind.data.prepare import prepare
    from minimind.data.shards import Shards

    cls = stages()[stage]
    path = Path(spec) if spec else paths.dataset_dir() / cls.defaults["data_path"]
    if path.is_dir() and (path / "meta.json").is_file():
        return path
    if not path.is_file():
        raise UsageError(
            f"no training data at {path}. Generate the offline demo corpus with "
            f"`minimind data demo --out {path.parent}`, or fetch MiniMind's public files with "
            f"`minimind data download {cls.defaults['data_path']}`."
        )
    cache = (
        paths.home()
        / "dataset"
        / "shards"
        / f"{path.stem}-{stage}-{max_seq_len}-{tokenizer_dir.name}"
    )
    prepare(path, tokenizer_dir, cache, max_seq_len=max_seq_len if cls.prepare_cuts else None)
    Shards(cache)  # fail here, not in the loop, if the folder is unreadable
    return cache


def build_model(args, tokenizer, save_dir: Path):
    """The starting model: --from_weight, else a fresh one from --preset or the size flags."""
    from minimind.checkpoint import load_checkpoint
    from minimind.convert.minimind2 import load_minimind2_pth
    from minimind.model import MiniMindForCausalLM, ModelConfig, preset

    if args.from_weight != "none":
        src = resolve_weight(args.from_weight, args.hidden_size, bool(args.use_moe), save_dir)
        model = load_minimind2_pth(src) if src.suffix == ".pth" else load_checkpoint(src)[0]
        origin = str(src)
    else:
        if args.preset:
            config = preset(args.preset, vocab_size=tokenizer.vocab_size)
        else:
            config = ModelConfig(
                hidden_size=args.hidden_size,
                num_hidden_layers=args.num_hidden_layers,
                use_moe=bool(args.use_moe),
                vocab_size=tokenizer.vocab_size,
            )
        torch.manual_seed(args.seed)  # every process builds the same initial weights
        model = MiniMindForCausalLM(config)
        origin = "scratch"
    if model.config.vocab_size != tokenizer.vocab_size:
        raise UsageError(
            f"vocabulary mismatch: the model ({origin}) has {model.config.vocab_size} ids, the "
            f"tokenizer has {tokenizer.vocab_size}. Use the tokenizer the model was trained with."
        )
    return model.float()


def run(stage_name: str, argv: list[str]) -> Path:
    """Parse, resolve, train, export; returns the final checkpoint folder."""
    from minimind.convert.minimind2 import save_minimind2_pth
    from minimind.tokenizer import load_tokenizer

    from .config import TrainConfig
    from .distributed import main_first, setup
    from .engine import Trainer

    args = build_parser(stage_name).parse_args(argv)
    stages()[stage_name].normalize_args(args)
    save_dir = Path(args.save_dir) if args.save_dir else paths.out_dir()
    tok_dir = _tokenizer_dir(args, save_dir)
    tokenizer = load_tokenizer(tok_dir)
    model = build_model(args, tokenizer, save_dir)
    world = setup(args.device)
    with main_first(world):  # rank 0 prepares the shard cache; the others then find it complete
        shards = resolve_data(stage_name, args.data_path, tok_dir, args.max_seq_len)
    stage = stages()[stage_name].from_args(args, shards)
    name = weight_name(args.save_weight, model.config)
    tracker = "wandb" if args.use_wandb else "swanlab" if args.use_swanlab else None
    config = TrainConfig(
        out_dir=args.out_dir or str(paths.checkpoints_dir() / name),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        accumulation_steps=args.accumulation_steps,
        learning_rate=args.learning_rate,
        min_lr_ratio=args.min_lr_ratio,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        dtype=_dtype(args.dtype),
        device=args.device,
        compile=bool(args.use_compile),
        activation_checkpointing=bool(args.activation_checkpointing),
        fsdp=args.fsdp,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        save_interval=args.save_interval,
        keep_last=args.keep_last,
        log_interval=args.log_interval,
        seed=args.seed,
        resume=bool(args.from_resume) or args.resume,
        num_workers=args.num_workers,
        tracker=tracker,
        tracker_project=args.wandb_project,
        tensorboard=args.tensorboard,
        peak_tflops=args.peak_tflops,
    )
    trainer = Trainer(config, stage, model, tokenizer_dir=tok_dir, world=world)
    trainer.fit()
    final = trainer.export(save_dir / name)
    if args.save_pth and trainer.world.is_main:
        save_minimind2_pth(stage.export_model(trainer.model), save_dir / f"{name}.pth")
    if trainer.world.is_main:
        print(f"saved {final}" + (f" and {save_dir / name}.pth" if args.save_pth else ""))
    return final


def _tokenizer_dir(args, save_dir: Path) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    if args.from_weight != "none":
        src = resolve_weight(args.from_weight, args.hidden_size, bool(args.use_moe), save_dir)
        if src.is_dir() and (src / "tokenizer.json").is_file():
            return src
    default = paths.home() / "model" / "tokenizer"
    if not (default / "tokenizer.json").is_file():
        raise UsageError(
            f"no tokenizer: pass --tokenizer DIR, or train one into {default} with "
            "`minimind tokenizer train --data_path FILE`."
        )
    return default


def main(argv: list[str] | None = None) -> int:
    """`minimind train STAGE [flags]`."""
    from minimind.checkpoint import CheckpointError
    from minimind.data.formats import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    known = stages()
    if not argv or argv[0] not in known:
        width = max(len(n) for n in known)
        lines = [f"  {n:<{width}}  {cls.help}" for n, cls in known.items()]
        text = "usage: minimind train STAGE [--help]\n\nstages:\n" + "\n".join(lines)
        asks_help = bool(argv) and argv[0] in ("-h", "--help")
        print(text, file=sys.stdout if asks_help else sys.stderr)
        return 0 if asks_help else 2
    try:
        run(argv[0], argv[1:])
    except (UsageError, DataError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        from .distributed import teardown

        teardown()
    return 0
