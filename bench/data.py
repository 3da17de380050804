"""Benchmark of data preparation and batching (prints a table, writes bench/results/data.json).

Measures, on the offline demo corpus:
- `data prepare` throughput in MB of jsonl per second of wall time, and per CPU-second (the
  per-core figure, which other processes on a shared machine distort less), with 1 worker
  and with N, for pretrain and sft, with a tokenizer trained here and with the MiniMind2
  reference tokenizer when present; beside it the ceiling: the tokenizer's own
  single-thread batch encode of the same pretrain texts, with nothing else around it;
- padding waste (% of pad tokens) of sft batches: padded to max_seq_len, padded to the
  longest row in random order, and length-grouped (what SFTDataset + the sampler do);
  packing (pretrain) has none by construction.
Never asserts a speed. TOKENIZERS_PARALLELISM=false, so one worker is one core.

    python bench/data.py [--size-mb 20] [--workers N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported

import numpy as np
from report import write_report  # bench/report.py, beside this file

from minimind.data.demo import write_demo_corpus
from minimind.data.formats import RecordReader
from minimind.data.prepare import prepare
from minimind.data.sampler import length_grouped_order
from minimind.data.texts import iter_texts
from minimind.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent
REFERENCE = ROOT.parents[1] / "shared" / "reference" / "minimind2"
TRAIN_TEXTS = 20_000  # texts the benchmark tokenizer learns from (enough for its merges)


def ceiling(tokenizer_dir: Path, path: Path) -> dict[str, float]:
    """MB per CPU-second of a single-thread batch encode of the pretrain texts alone (JSON
    decoding excluded), by the `tokenizers` library and by the fast encoder (tiktoken, when it
    applies: minimind.tokenizer.fast): the most any preparation can reach per core."""
    tok = load_tokenizer(tokenizer_dir)
    texts = [r.text for r in RecordReader(path, "pretrain")]
    mb = path.stat().st_size / 1e6
    out = {}
    start = time.process_time()
    for k in range(0, len(texts), 1024):
        tok.backend.encode_batch_fast(texts[k : k + 1024], False)
    out["tokenizers"] = mb / (time.process_time() - start)
    if tok.fast is not None:
        start = time.process_time()
        for k in range(0, len(texts), 1024):
            tok.fast.encode_batch(texts[k : k + 1024])
        out["fast"] = mb / (time.process_time() - start)
    return out


def throughput(path: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict:
    report = prepare(path, tokenizer_dir, out, workers=workers, overwrite=True)
    mb = report.bytes_done / 1e6
    return {
        "MB/s": mb / report.seconds,
        "MB/cpu-s": mb / report.cpu_seconds,
        "seconds": report.seconds,
        "cpu_seconds": report.cpu_seconds,
    }


def waste(folder: Path, max_seq_len: int, batch: int) -> dict:
    # Imported here: padding.py imports torch, and every prepare worker re-imports this
    # script as its __main__ (spawn/forkserver), which must stay light.
    from minimind.data.padding import SFTDataset, padding_waste

    lengths = SFTDataset(folder, max_seq_len).lengths
    shuffled = np.random.default_rng(0).permutation(len(lengths))
    grouped = length_grouped_order(lengths, seed=0, epoch=0, group_size=batch)

    def batches(order):
        return [order[k : k + batch] for k in range(0, len(order), batch)]

    return {
        "pad_to_max_seq_len": padding_waste(lengths, batches(shuffled), pad_to=max_seq_len),
        "dynamic_random_order": padding_waste(lengths, batches(shuffled)),
        "length_grouped": padding_waste(lengths, batches(grouped)),
        "packing_pretrain": 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=20.0, help="demo pretrain file size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "data.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_demo_corpus(tmp / "demo", seed=0, size_mb=args.size_mb)
        texts = itertools.islice(iter_texts([corpus["pretrain"], corpus["sft"]]), TRAIN_TEXTS)
        tokenizers = {"trained": train_tokenizer(texts, tmp / "tok", 6400, show_progress=False)}
        if (REFERENCE / "tokenizer.json").is_file():
            tokenizers["minimind2"] = REFERENCE
        rows = []
        for name, tok_dir in tokenizers.items():
            for kind in ("pretrain", "sft"):
                path = corpus[kind]
                row = {"tokenizer": name, "kind": kind, "MB": path.stat().st_size / 1e6}
                for w in sorted({1, args.workers}):
                    row[f"{w} workers"] = throughput(path, tok_dir, tmp / f"{name}_{kind}", w)
                # the same with `tokenizers` only (the fast encoder switched off)
                os.environ["MINIMIND_FAST_ENCODER"] = "0"
                row["1 worker, tokenizers only"] = throughput(path, tok_dir, tmp / "slow", 1)
                del os.environ["MINIMIND_FAST_ENCODER"]
                if kind == "pretrain":
                    row["encoder alone MB/cpu-s"] = ceiling(tok_dir, path)
                rows.append(row)
        padding = waste(tmp / "trained_sft", args.max_seq_len, args.batch_size)

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "size_mb": args.size_mb,
        "throughput": rows,
        "padding_waste": {
            "max_seq_len": args.max_seq_len,
            "batch_size": args.batch_size,
            **padding,
        },
    }
    write_report(result, args.out)

    ws = sorted({1, args.workers})
    head = f"{'tokenizer':<10} {'kind':<9} {'MB':>6}"
    head += "".join(f" {f'{w}w MB/s':>9} {f'{w}w MB/cpu-s':>12}" for w in ws)
    head += f" {'1w slow MB/cpu-s':>17} {'enc alone: tokenizers':>22} {'fast':>6}"
    print(head)
    for row in rows:
        line = f"{row['tokenizer']:<10} {row['kind']:<9} {row['MB']:>6.1f}"
        for w in ws:
            r = row[f"{w} workers"]
            line += f" {r['MB/s']:>9.2f} {r['MB/cpu-s']:>12.2f}"
        line += f" {row['1 worker, tokenizers only']['MB/cpu-s']:>17.2f}"
        cap = row.get("encoder alone MB/cpu-s", {})
        line += f" {cap['tokenizers']:>22.2f}" if cap else f" {'-':>22}"
        line += f" {cap['fast']:>6.2f}" if "fast" in cap else f" {'-':>6}"
        print(line)
    print(
        f"\nsft padding waste (batch {args.batch_size}, max_seq_len {args.max_seq_len}): "
        + ", ".join(f"{k} {v:.1%}" for k, v in padding.items())
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
