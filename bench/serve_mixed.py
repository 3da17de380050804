"""bench/serve.py --mixed: the server under mixed load (issue 13, section 2).

Three servers of one model run side by side, each in its own process (only one is loaded at a
time; the others sleep), so every comparison is made in one run with the sides taking turns:

- `whole`:    --prefill_chunk 0 (every prompt prefilled whole, in one step)
- `chunked`:  --prefill_chunk C (the default, or --chunk), prompt sharing and prefix cache on
- `unshared`: --prefill_chunk C, --no_prompt_sharing, --prefix_cache_tokens 0

Part 1, inter-token latency under a long prompt (`whole` vs `chunked`, --repeats turns each):
--clients (16) streams decode text completions (forced length, sampled); once each has
streamed 20 chunks, the gaps between consecutive chunks are recorded for --window seconds
("before"), then one --long-tokens (1,500) prompt arrives (a completion of 8 tokens) and the
gaps are recorded until it has finished ("during": its whole prefill and its first tokens).
Reported: p50 and p99 of the gaps in each window (all streams together), their ratio, and the
long prompt's own time to first token.

Part 2, time to first token of n choices (`unshared` vs `chunked`): a completion request of a
--long-tokens prompt with n=1, then with n=--n (8), on an otherwise idle server; TTFT is the
time from sending it to the first text of its *last* choice. Every request of the run has its
own prompt (windows of the demo corpus at different offsets), so no prefix is cached from an
earlier request: what `chunked` saves here is the sharing of one prefill by the n choices.

A gap is measured per chunk: a stream sends one chunk per decoding step, or one for several
tokens when its writer falls behind, so a stall shows as one long gap either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from serve import QUESTION, percentile, sse_post, start_server  # bench/serve.py

from minimind.data.demo import write_demo_corpus
from minimind.tokenizer import load_tokenizer

SIDES = ("whole", "chunked", "unshared")


def corpus_ids(ckpt: Path, folder: Path) -> list[int]:
    """The demo corpus's pretraining text in the checkpoint's tokens (long prompts are windows)."""
    files = write_demo_corpus(folder / "corpus", seed=0, size_mb=0.2)
    lines = files["pretrain"].read_text("utf-8").splitlines()
    text = " ".join(json.loads(line)["text"] for line in lines[:2000])
    return load_tokenizer(ckpt).encode(text)


def server_flags(side: str, chunk: int) -> list[str]:
    return {
        "whole": ["--prefill_chunk", "0"],
        "chunked": ["--prefill_chunk", str(chunk)],
        "unshared": [
            "--prefill_chunk", str(chunk), "--no_prompt_sharing", "--prefix_cache_tokens", "0",
        ],
    }[side]  # fmt: skip


async def stream_chunks(url: str, body: dict, times: list[float], stop: asyncio.Event) -> None:
    """Stream a completion, appending the arrival time of every chunk with text, until done or
    `stop` is set (then the connection closes and the server cancels the row)."""
    async with contextlib.aclosing(sse_post(url, "/v1/completions", body)) as events:
        async for data in events:
            if data == "[DONE]" or stop.is_set():
                return
            if any(c.get("text") for c in json.loads(data)["choices"]):
                times.append(time.perf_counter())


async def first_texts(url: str, body: dict) -> tuple[float, float, float]:
    """-> (sent, first text of the first choice, first text of the last choice) of a streamed
    completion with n choices, read to its end."""
    sent, firsts = time.perf_counter(), {}
    async with contextlib.aclosing(sse_post(url, "/v1/completions", body)) as events:
        async for data in events:
            if data == "[DONE]":
                break
            for c in json.loads(data)["choices"]:
                if c.get("text") and c["index"] not in firsts:
                    firsts[c["index"]] = time.perf_counter()
    if len(firsts) < body["n"]:
        raise RuntimeError(f"{body['n'] - len(firsts)} choices sent no text")
    return sent, min(firsts.values()), max(firsts.values())


def request(model: str, prompt, tokens: int, seed: int, n: int = 1) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": seed,
        "n": n,
        "stream": True,
    }


def gaps(times: list[list[float]], lo: float, hi: float) -> list[float]:
    """Gaps between consecutive chunks of each stream that end in [lo, hi), in ms."""
    return sorted(1000 * (b - a) for ts in times for a, b in itertools.pairwise(ts) if lo <= b < hi)


async def itl_trial(url: str, model: str, long: list[int], seed: int, args) -> dict:
    stop = asyncio.Event()
    times: list[list[float]] = [[] for _ in range(args.streams)]
    body = request(model, QUESTION, args.stream_tokens, seed)
    tasks = [
        asyncio.create_task(stream_chunks(url, {**body, "seed": seed + i}, times[i], stop))
        for i in range(args.streams)
    ]
    try:
        deadline = time.perf_counter() + 60
        while min(map(len, times)) < 20:  # every stream is decoding
            if time.perf_counter() > deadline or any(t.done() for t in tasks):
                raise RuntimeError("the streams did not start")
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        await asyncio.sleep(args.window)
        sent, first, _ = await first_texts(url, request(model, long, 8, seed))
        done = time.perf_counter()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    before, during = gaps(times, start, sent), gaps(times, sent, done)
    if not before or not during:
        raise RuntimeError(
            f"the streams sent {len(before)} chunks before the long prompt and {len(during)} while "
            f"it ran: they ended too soon; raise --stream-tokens (now {args.stream_tokens})"
        )
    return {
        "before_p50_ms": percentile(before, 50),
        "before_p99_ms": percentile(before, 99),
        "during_p50_ms": percentile(during, 50),
        "during_p99_ms": percentile(during, 99),
        "during_max_ms": during[-1],
        "p99_ratio": percentile(during, 99) / percentile(before, 99),
        "long_ttft_ms": 1000 * (first - sent),
        "long_s": done - sent,
        "gaps_before": len(before),
        "gaps_during": len(during),
    }


async def ttft_trial(url: str, model: str, prompt: list[int], n: int, seed: int) -> float:
    sent, _, last = await first_texts(url, request(model, prompt, 4, seed, n))
    return 1000 * (last - sent)


def run_mixed(ckpt: Path, args) -> dict:
    """Both parts (module docstring) -> the JSON report's "mixed" section; prints tables."""
    with tempfile.TemporaryDirectory() as tmp:
        ids = corpus_ids(ckpt, Path(tmp))
    length = args.long_tokens
    need = (4 * args.repeats + 1) * 997 + length
    if len(ids) < need:
        raise RuntimeError(f"the corpus gives {len(ids)} tokens, fewer than {need}")
    windows = (ids[i * 997 : i * 997 + length] for i in range(10**6))  # a new prompt each time
    procs, urls = {}, {}
    try:
        for side in SIDES:
            procs[side], urls[side] = start_server(ckpt, args, server_flags(side, args.chunk))
        model = httpx.get(urls["chunked"] + "/v1/models").json()["data"][0]["id"]
        itl = {side: [] for side in ("whole", "chunked")}
        ttft = {(side, n): [] for side in ("unshared", "chunked") for n in (1, args.n)}
        # warm-up: one short turn of each part on every server (allocator, first forwards)
        for side in SIDES:
            asyncio.run(ttft_trial(urls[side], model, next(windows)[:64], args.n, 0))
        for r in range(args.repeats):
            for side in itl:
                itl[side].append(
                    asyncio.run(itl_trial(urls[side], model, next(windows), 100 * r, args))
                )
            for side, n in ttft:
                ttft[side, n].append(
                    asyncio.run(ttft_trial(urls[side], model, next(windows), n, r))
                )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    med = statistics.median
    summary_itl = {
        side: {k: med(t[k] for t in trials) for k in trials[0]} for side, trials in itl.items()
    }
    summary_ttft = {
        side: {
            "n1_ms": med(ttft[side, 1]),
            f"n{args.n}_ms": med(ttft[side, args.n]),
            "ratio": med(a / b for a, b in zip(ttft[side, args.n], ttft[side, 1])),
        }
        for side in ("unshared", "chunked")
    }
    print(
        f"mixed load: {args.streams} streams of {args.stream_tokens} forced tokens, then one "
        f"{length}-token prompt; --prefill_chunk {args.chunk} against 0; median of "
        f"{args.repeats} turns per side"
    )
    print(itl_table(summary_itl))
    print(f"TTFT of the last of n choices, {length}-token prompt, idle server:")
    print(ttft_table(summary_ttft, args.n))
    return {
        "streams": args.streams,
        "long_tokens": length,
        "chunk": args.chunk,
        "n": args.n,
        "window_s": args.window,
        "itl": summary_itl,
        "ttft": summary_ttft,
        "itl_trials": itl,
        "ttft_trials": {f"{side} n={n}": v for (side, n), v in ttft.items()},
    }


def itl_table(summary: dict) -> str:
    head = ("prefill", "ITL p50 before", "p99 before", "p50 during", "p99 during",
            "p99 during/before", "max during", "long prompt TTFT")  # fmt: skip
    rows = [head]
    for side, s in summary.items():
        rows.append(
            (
                side,
                f"{s['before_p50_ms']:.1f} ms",
                f"{s['before_p99_ms']:.1f} ms",
                f"{s['during_p50_ms']:.1f} ms",
                f"{s['during_p99_ms']:.1f} ms",
                f"{s['p99_ratio']:.2f}x",
                f"{s['during_max_ms']:.0f} ms",
                f"{s['long_ttft_ms']:.0f} ms",
            )
        )
    return _table(rows)


def ttft_table(summary: dict, n: int) -> str:
    rows = [("prompt sharing", "n=1", f"n={n}", f"n={n} / n=1")]
    for side, s in summary.items():
        name = "on (chunked)" if side == "chunked" else "off"
        rows.append((name, f"{s['n1_ms']:.0f} ms", f"{s[f'n{n}_ms']:.0f} ms", f"{s['ratio']:.2f}x"))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
