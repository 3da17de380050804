"""Command lines over data files: `data check`, `data demo`, `tokenizer train`.

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
    args = parser.parse_args(argv)
    held_out: list[str] = []

    def training_texts() -> Iterator[str]:
        for i, text in enumerate(iter_texts(args.data_path, args.on_error)):
            if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and len(held_out) < HOLDOUT_MAX:
                held_out.append(text)
            else:
                yield text

    try:
        out = train_tokenizer(training_texts(), args.out_dir, vocab_size=args.vocab_size)
    except DataError as err:
        print(f"error: {err}")
        return 1
    ratio = compression(load_tokenizer(out), held_out)
    print(f"saved {out}: {ratio:.2f} chars/token on {len(held_out)} held-out texts")
    return 0
