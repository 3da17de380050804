"""Command lines over data files: `data check`, `data demo`, `data prepare`, `data download`,
`tokenizer train`.

Each is `main(argv) -> exit code`, listed in minimind/cli.py. The work is in formats.py,
check.py, demo.py and minimind.tokenizer; this file only parses arguments and prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from minimind import paths

from .check import check_file, format_report
from .demo import write_demo_corpus
from .formats import KINDS, DataError
from .texts import iter_texts

HOLDOUT_EVERY = 100  # one text in this many is kept out of tokenizer training
HOLDOUT_MAX = 1000  # so memory stays constant on any corpus


def check_main(argv: list[str] | None = None) -> int:
    """`minimind data check FILE...`: kind, record count, token lengths, bad lines."""
    parser = argparse.ArgumentParser(prog="minimind data check", description=check_main.__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--kind", choices=KINDS, help="skip detection")
    parser.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json for lengths")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip")
    parser.add_argument("--max-records", type=int, help="stop after this many records")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from minimind.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    bad = 0
    for path in args.files:
        try:
            report = check_file(
                path, args.kind, tokenizer, args.on_error, max_records=args.max_records
            )
        except (DataError, FileNotFoundError) as err:
            print(f"error: {err}")
            return 1
        print(format_report(report))
        bad += report.bad_lines
        if report.records == 0 and not report.bad_lines:
            print(f"error: {path} holds no records")
            bad += 1
    return 1 if bad else 0


def demo_main(argv: list[str] | None = None) -> int:
    """`minimind data demo`: write the deterministic offline demo corpus (every format)."""
    parser = argparse.ArgumentParser(prog="minimind data demo", description=demo_main.__doc__)
    parser.add_argument("--out", type=Path, default=paths.dataset_dir() / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-mb", type=float, default=3.0, help="size of the pretrain file")
    args = parser.parse_args(argv)
    for kind, path in write_demo_corpus(args.out, seed=args.seed, size_mb=args.size_mb).items():
        print(f"{kind:<11} {path}  ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def tokenizer_train_main(argv: list[str] | None = None) -> int:
    """`minimind tokenizer train --data_path F... --out_dir D`: byte-level BPE from jsonl."""
    from minimind.tokenizer import load_tokenizer
    from minimind.tokenizer.train import compression, train_tokenizer

    parser = argparse.ArgumentParser(
        prog="minimind tokenizer train", description=tokenizer_train_main.__doc__
    )
    parser.add_argument("--data_path", nargs="+", required=True, help="jsonl file(s), any kind")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--out_dir", type=Path, default=paths.home() / "model" / "tokenizer")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="raise")
    parser.add_argument("--split_digits", action="store_true", help="numbers digit by digit")
    parser.add_argument("--cjk_chunk", type=int, help="no token spans more Chinese characters")
    args = parser.parse_args(argv)
    held_out: list[str] = []

    def training_texts() -> Iterator[str]:
        for i, text in enumerate(iter_texts(args.data_path, args.on_error)):
            if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and len(held_out) < HOLDOUT_MAX:
                held_out.append(text)
            else:
                yield text

    try:
        out = train_tokenizer(
            training_texts(),
            args.out_dir,
            vocab_size=args.vocab_size,
            split_digits=args.split_digits,
            cjk_chunk=args.cjk_chunk,
        )
    except DataError as err:
        print(f"error: {err}")
        return 1
    ratio = compression(load_tokenizer(out), held_out)
    print(f"saved {out}: {ratio:.2f} chars/token on {len(held_out)} held-out texts")
    return 0


def prepare_main(argv: list[str] | None = None) -> int:
    """`minimind data prepare --data_path F --tokenizer DIR --out DIR`: jsonl -> token shards."""
    import os
    import sys

    from .prepare import StaleShardsError, prepare

    parser = argparse.ArgumentParser(prog="minimind data prepare", description=prepare_main.__doc__)
    parser.add_argument("--data_path", type=Path, required=True, help="a jsonl file")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.json")
    parser.add_argument("--out", type=Path, help="shard folder (default: dataset/shards/STEM)")
    parser.add_argument("--kind", choices=KINDS, help="skip detection")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max_seq_len", type=int, help="cut chat documents to this context")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--overwrite", action="store_true", help="replace stale shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    out = args.out or paths.dataset_dir() / "shards" / args.data_path.stem
    try:
        report = prepare(
            args.data_path,
            args.tokenizer,
            out,
            kind=args.kind,
            workers=args.workers,
            max_seq_len=args.max_seq_len,
            on_error=args.on_error,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (DataError, StaleShardsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


def download_main(argv: list[str] | None = None) -> int:
    """`minimind data download NAME...`: fetch MiniMind's public data files from a hub."""
    import sys

    from .download import FILES, SOURCES, DownloadError, download

    parser = argparse.ArgumentParser(
        prog="minimind data download",
        description=download_main.__doc__,
        epilog="names: " + ", ".join(f.removesuffix(".jsonl") for f in FILES),
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="e.g. sft_mini_512")
    parser.add_argument("--source", choices=SOURCES, default="huggingface")
    parser.add_argument("--out", type=Path, default=paths.dataset_dir())
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            path = download(name, args.source, args.out)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except DownloadError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(path)
    return 0
