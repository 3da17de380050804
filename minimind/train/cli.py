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
    a(
        "--on-error",
        "--on_error",
        dest="on_error",
        choices=("raise", "skip"),
        default="raise",
        help="a bad line in a jsonl --data_path: stop with its file:line (raise) or skip it",
    )
    # model (MiniMind's flags; used when starting from scratch)
    a("--preset", default=None, help="a named preset (minimind presets) instead of the size flags")
    a("--hidden_size", type=int, default=None, help="default 512")
    a("--num_hidden_layers", type=int, default=None, help="default 8")
    a("--use_moe", type=int, default=None, help="default 0")
    a(
        "--num_attention_heads",
        type=int,
        default=None,
        help="query heads (default 8); also how to read a --from_weight .pth, which does not "
        "record them",
    )
    a("--num_key_value_heads", type=int, default=None, help="key/value heads (default 2)")
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


# MiniMind's size flags and their defaults; None in the parser tells a flag given from one
# left out, so that a conflict with --preset or --from_weight is an error, not ignored.
SIZE_FLAGS = {"hidden_size": 512, "num_hidden_layers": 8, "use_moe": 0}
SIZE_FLAGS.update(num_attention_heads=None, num_key_value_heads=None)  # None: ModelConfig's


def size_flags(args) -> dict[str, int]:
    """The size flags given on the command line ({name: value}); fills in the others'
    defaults. A --preset with a size flag is refused: one of them would be ignored."""
    given = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None}
    for k, default in SIZE_FLAGS.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    if args.preset and given:
        flags = " ".join(f"--{k} {v}" for k, v in given.items())
        raise UsageError(
            f"--preset {args.preset} sets the model size, and {flags} would be ignored: give "
            "the preset or the size flags, not both"
        )
    return given


def _dtype(name: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)


def weight_name(name: str, config) -> str:
    """MiniMind's naming: `{name}_{hidden}[_moe]`.

    >>> from minimind.model import preset
    >>> weight_name("full_sft", preset("minimind2-moe"))
    'full_sft_640_moe'
    """
    return f"{name}_{config.hidden_size}{'_moe' if config.use_moe else ''}"


def named_size(args) -> dict[str, int | None]:
    """The size --from_weight NAME is looked up and read with: --preset's when given (so
    `--preset demo --from_weight pretrain` finds pretrain_192), else the size flags."""
    from minimind.model import preset

    keys = ("hidden_size", "num_hidden_layers", "use_moe", "num_attention_heads")
    keys += ("num_key_value_heads",)
    if args.preset:
        config = preset(args.preset)
        return {k: int(getattr(config, k)) for k in keys}
    return {k: getattr(args, k) for k in keys}


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


def data_file(stage: str, spec: str | None) -> Path:
    """--data_path (or the stage's default file) -> a jsonl file or a prepared folder that
    exists."""
    cls = stages()[stage]
    path = Path(spec) if spec else paths.dataset_dir() / cls.defaults["data_path"]
    if (path.is_dir() and (path / "meta.json").is_file()) or path.is_file():
        return path
    raise UsageError(
        f"no training data at {path}. Generate the offline demo corpus with "
        f"`minimind data demo --out {path.parent}`, or fetch MiniMind's public files with "
        f"`minimind data download {cls.defaults['data_path']}`."
    )


def cache_dir(stage: str, path: Path, tokenizer_dir: Path, max_seq_len: int) -> Path:
    """The shard cache of jsonl `path` for `stage`: one folder per (input file, tokenizer
    content, stage, length), under MINIMIND_HOME/dataset/shards. Its meta.json records the
    input's stamp (size, mtime, sampled content), by which a stale cache is found."""
    import hashlib

    from minimind.data.prepare import file_blake2b, tokenizer_file

    key = hashlib.blake2b(digest_size=6)
    key.update(str(path.resolve()).encode())
    key.update(file_blake2b(tokenizer_file(tokenizer_dir)).encode())
    return (
        paths.home() / "dataset" / "shards" / f"{path.stem}-{stage}-{max_seq_len}-{key.hexdigest()}"
    )


def resolve_data(
    stage: str,
    spec: str | Path | None,
    tokenizer_dir: Path,
    max_seq_len: int,
    on_error: str = "raise",
    verbose: bool = True,
) -> Path:
    """--data_path -> a prepared shards folder. A jsonl file is prepared once into its cache
    (`cache_dir`); a cache whose input or tokenizer changed since is rebuilt, saying why."""
    from minimind.data.prepare import StaleShardsError, cached_differences, prepare
    from minimind.data.shards import Shards
    from minimind.fsutil import explained_writes

    cls = stages()[stage]
    path = data_file(stage, spec)
    if path.is_dir():
        return path
    cache = cache_dir(stage, path, tokenizer_dir, max_seq_len)
    cut = max_seq_len if cls.prepare_cuts else None
    stale = cached_differences(cache, path, tokenizer_dir, max_seq_len=cut)
    if stale != []:
        rebuild = bool(stale) and stale != ["preparation did not finish"]
        if rebuild and verbose:
            print(f"data cache {cache} is stale ({'; '.join(stale)}): rebuilding it")
        with explained_writes(cache, "the data cache"):
            try:
                report = prepare(
                    path, tokenizer_dir, cache, max_seq_len=cut, on_error=on_error,
                    overwrite=rebuild,
                )  # fmt: skip
            except StaleShardsError as err:  # an unfinished cache of other content
                if verbose:
                    print(f"data cache {cache} is stale ({err}): rebuilding it")
                report = prepare(
                    path, tokenizer_dir, cache, max_seq_len=cut, on_error=on_error, overwrite=True
                )
        if verbose:
            print(report.format())
    Shards(cache)  # fail here, not in the loop, if the folder is unreadable
    return cache


def data_identity(path: Path, stage: str, tokenizer_dir: Path, max_seq_len: int) -> str:
    """The blake2b of the input's content, as the stage fingerprint records it: from the
    prepared folder or an up-to-date cache when there is one, else by reading the file."""
    from minimind.data.prepare import cached_differences, file_blake2b
    from minimind.data.shards import read_json

    if path.is_dir():
        return read_json(path / "meta.json")["source"]["blake2b"]
    cache = cache_dir(stage, path, tokenizer_dir, max_seq_len)
    cut = max_seq_len if stages()[stage].prepare_cuts else None
    if cached_differences(cache, path, tokenizer_dir, max_seq_len=cut) == []:
        return read_json(cache / "meta.json")["source"]["blake2b"]
    return file_blake2b(path)


def check_resume(
    out_dir: Path, model, stage: str, tokenizer_dir: Path, data: Path, max_seq_len: int
) -> None:
    """Refuse a resume of `out_dir`'s latest step checkpoint whose model config, stage,
    tokenizer or data differ from this run's, before any file is written (the engine checks
    the stage's other settings when it loads the checkpoint)."""
    from minimind.checkpoint import read_meta
    from minimind.data.prepare import file_blake2b, tokenizer_file

    from .state import check_compatible, step_checkpoints

    found = step_checkpoints(out_dir)
    if not found:
        return
    folder = found[-1][1]
    saved = read_meta(folder).get("fingerprint", {})
    current = {
        "model_config": model.config.to_dict(),
        "stage": stage,
        "tokenizer": lambda: file_blake2b(tokenizer_file(tokenizer_dir)),
        "data": lambda: data_identity(data, stage, tokenizer_dir, max_seq_len),
    }
    keys = [k for k in current if k in saved]
    current = {k: current[k]() if callable(current[k]) else current[k] for k in keys}
    check_compatible(saved, current, folder, keys)


CHAT_STAGES = {"sft": "sft", "reasoning": "reason", "dpo": "dpo", "rlaif": "grpo"}


def warn_on_data_kind(stage: str, shards: Path, data: Path, show: bool) -> None:
    """Pretraining packs whatever it is given as plain text: say so when the file holds
    conversations, which belong to sft (or dpo, reasoning, rlaif)."""
    from minimind.data.shards import read_json

    kind = read_json(shards / "meta.json")["kind"]
    if stage == "pretrain" and kind != "pretrain" and show:
        print(
            f"warning: {data} holds {kind} records (conversations), not pretraining text; "
            f"pretraining packs them as templated text. For chat data use "
            f"`minimind train {CHAT_STAGES.get(kind, 'sft')}`."
        )


def build_model(args, tokenizer, save_dir: Path):
    """The starting model: --from_weight, else a fresh one from --preset or the size flags."""
    from minimind.checkpoint import CheckpointError, load_checkpoint
    from minimind.convert.minimind2 import load_minimind2_pth
    from minimind.model import MiniMindForCausalLM, ModelConfig, preset

    if args.from_weight != "none":
        size = named_size(args)
        src = resolve_weight(args.from_weight, size["hidden_size"], bool(size["use_moe"]), save_dir)
        if src.suffix == ".pth":  # it does not record its head counts: the flags or preset say
            heads = ("num_attention_heads", "num_key_value_heads")
            try:
                model = load_minimind2_pth(src, *(size[k] for k in heads))
            except CheckpointError as e:
                raise UsageError(f"--from_weight {src}: {e}") from None
        else:
            model = load_checkpoint(src)[0]
        origin = str(src)
        given = dict(getattr(args, "size_given", {}))
        if args.preset:  # the preset's size, like a size flag, must be the weights'
            given = {k: v for k, v in size.items() if v is not None}
        differ = {}
        for k, v in given.items():
            have = getattr(model.config, k)
            if (bool(have) != bool(v)) if k == "use_moe" else have != v:
                differ[k] = v
        if differ:
            flags = ", ".join(
                f"--{k} {v} (the weights: {int(getattr(model.config, k))})"
                for k, v in differ.items()
            )
            if args.preset:
                flags = f"--preset {args.preset} ({flags.replace('--', '')})"
            raise UsageError(
                f"{flags} disagree with --from_weight {src}: the weights set the model's "
                "size. Drop the size flags, or start from scratch with --from_weight none."
            )
    else:
        if args.preset:
            config = preset(args.preset, vocab_size=tokenizer.vocab_size)
        else:
            heads = ("num_attention_heads", "num_key_value_heads")
            config = ModelConfig(
                hidden_size=args.hidden_size,
                num_hidden_layers=args.num_hidden_layers,
                use_moe=bool(args.use_moe),
                vocab_size=tokenizer.vocab_size,
                **{k: getattr(args, k) for k in heads if getattr(args, k) is not None},
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
    from minimind.fsutil import check_writable
    from minimind.tokenizer import load_tokenizer

    from .config import TrainConfig
    from .distributed import main_first, setup
    from .engine import Trainer

    args = build_parser(stage_name).parse_args(argv)
    stages()[stage_name].normalize_args(args)
    args.size_given = size_flags(args)
    save_dir = Path(args.save_dir) if args.save_dir else paths.out_dir()
    tok_dir = _tokenizer_dir(args, save_dir)
    tokenizer = load_tokenizer(tok_dir)
    model = build_model(args, tokenizer, save_dir)
    world = setup(args.device)
    name = weight_name(args.save_weight, model.config)
    out_dir = Path(args.out_dir) if args.out_dir else paths.checkpoints_dir() / name
    resume = bool(args.from_resume) or args.resume
    data = data_file(stage_name, args.data_path)
    if world.is_main:  # found now, not after training
        check_writable(save_dir, "--save_dir")
        check_writable(out_dir, "--out_dir")
    if resume:  # refuse before anything is written, the data cache included
        check_resume(out_dir, model, stage_name, tok_dir, data, args.max_seq_len)
    with main_first(world):  # rank 0 prepares the shard cache; the others then find it complete
        shards = resolve_data(
            stage_name, data, tok_dir, args.max_seq_len, args.on_error, verbose=world.is_main
        )
        for flag, kind in stages()[stage_name].data_flags.items():
            if getattr(args, flag, None):
                folder = resolve_data(
                    kind, getattr(args, flag), tok_dir, args.max_seq_len, args.on_error,
                    verbose=world.is_main,
                )  # fmt: skip
                setattr(args, flag, str(folder))
    warn_on_data_kind(stage_name, shards, data, world.is_main)
    stage = stages()[stage_name].from_args(args, shards)
    tracker = "wandb" if args.use_wandb else "swanlab" if args.use_swanlab else None
    config = TrainConfig(
        out_dir=str(out_dir),
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
        resume=resume,
        num_workers=args.num_workers,
        tracker=tracker,
        tracker_project=args.wandb_project,
        tensorboard=args.tensorboard,
        peak_tflops=args.peak_tflops,
    )
    trainer = Trainer(config, stage, model, tokenizer_dir=tok_dir, world=world)
    trainer.fit()
    pth = save_dir / f"{name}.pth" if args.save_pth else None
    final = trainer.export(save_dir / name, pth=pth)
    if trainer.world.is_main:
        print(f"saved {final}" + (f" and {save_dir / name}.pth" if args.save_pth else ""))
    return final


def _tokenizer_dir(args, save_dir: Path) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    if args.from_weight != "none":
        size = named_size(args)
        src = resolve_weight(args.from_weight, size["hidden_size"], bool(size["use_moe"]), save_dir)
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
    from minimind.data.prepare import StaleShardsError
    from minimind.fsutil import OutputError

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
    except (
        UsageError,
        DataError,
        CheckpointError,
        StaleShardsError,
        OutputError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        from .distributed import teardown

        teardown()
    return 0
