"""Benchmark: the OpenAI-compatible server under N concurrent streaming clients.

Starts the real server (scripts/serve_openai_api.py, in its own process) on a model of the
given preset with random weights and a tokenizer trained on the demo corpus, then for each
client count N runs N concurrent streaming chat clients on localhost (asyncio connections
speaking HTTP/1.1 and server-sent events directly: a light load generator), each sending
`--rounds` requests one after another. Every request asks
for exactly `--tokens` tokens (`ignore_eos`, the vLLM extension the server accepts), so all
levels decode the same work. Per level it reports:

- aggregate tokens/s: completion tokens (from each stream's usage chunk) / wall time of the
  level, and its ratio to the single-client level;
- per-stream tokens/s: each request's tokens / its own duration, median;
- time to first token, p50 and p99: from sending the request to the first chunk carrying text
  (queueing and prefill included);
- rows per step: tokens decoded / batcher steps during the level (from /health): how many
  streams really shared each decoding step.

Then, with the server stopped, the same requests go straight into a `Batcher` in this process
(no HTTP, no client): the engine's own tokens/s at each level, which separates what batching
gains from what HTTP and the clients cost on the same cores.

The client runs in this process and the server in another, on the same machine: on a 2-core
machine they share the cores (the server gets `--server-threads` torch threads, default 1).
Bounded: at most `--max-seconds` per level (then clients send no further request). Every
level runs `--repeats` times, interleaved with the others, and its best run is reported (load
from other processes only ever adds time); all runs are kept in the JSON. A benchmark, not a
test: it never asserts a speed. Prints a table and writes JSON (default
bench/results/serve.json). Run `python bench/serve.py --help`.

`--mixed` measures the server under mixed load instead (bench/serve_mixed.py): the running
streams' inter-token latency while a long prompt is prefilled, whole or in chunks, and the time
to first token of n=8 choices against n=1, with prompt sharing off and on (default JSON
bench/results/serve_mixed.json). `--load_from` serves a trained checkpoint instead of random
weights (e.g. the demo's).

`--draft PATH|ngram` compares speculative decoding in the server with plain decoding
(`main_draft`): two servers of the checkpoint, one with `--draft`, taking turns on the same
greedy questions (`--questions`: a chat jsonl's user turns), tokens/s per side and level,
their ratio, the draft side's acceptance and tokens per target forward from /health, and
whether every reply was the same (default JSON bench/results/serve_draft.json).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import torch
from report import write_report  # bench/report.py, beside this file

from minimind.checkpoint import save_checkpoint
from minimind.data.demo import write_demo_corpus
from minimind.infer.batcher import Batcher
from minimind.infer.chat import prompt_ids
from minimind.infer.generation import GenerationConfig
from minimind.infer.load import load_model
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "serve.json"
QUESTION = "Tell me a long story about the little world and everyone who lives in it."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = p.add_argument
    arg("--preset", default="demo", help="model preset (random weights)")
    arg("--device", default="cpu", help="the server's device: cpu, cuda, auto")
    arg("--clients", default="1,4,16", help="comma-separated client counts; 1 is the baseline")
    arg("--tokens", type=int, default=128, help="completion tokens per request (forced)")
    arg("--rounds", type=int, default=3, help="requests per client, one after another")
    arg("--repeats", type=int, default=3, help="runs of every level, interleaved; best kept")
    arg("--max-seconds", type=float, default=60.0, help="per level: no new request after this")
    arg("--max-rows", type=int, default=32, help="the server's --max_rows")
    arg("--server-threads", type=int, default=1, help="the server's torch threads")
    arg("--stream-interval", type=float, default=0.0, help="the server's --stream_interval")
    arg("--quick", action="store_true", help="tiny preset, few tokens: a smoke run of seconds")
    arg("--out", type=Path, default=None, help=f"where to write the JSON (default {DEFAULT_OUT})")
    arg("--load_from", type=Path, default=None, help="serve this checkpoint, not random weights")
    m = p.add_argument_group("mixed load (--mixed)")
    m.add_argument("--mixed", action="store_true", help="run the mixed-load mode (see above)")
    m.add_argument("--streams", type=int, default=None, help="running streams (default: the "
                   "largest --clients)")  # fmt: skip
    m.add_argument("--stream-tokens", type=int, default=1500, help="forced tokens per stream "
                   "(they are cancelled when a turn ends)")  # fmt: skip
    m.add_argument("--long-tokens", type=int, default=1500, help="the long prompt's tokens")
    m.add_argument("--chunk", type=int, default=None, help="the chunked side's --prefill_chunk "
                   "(default: the server's default)")  # fmt: skip
    m.add_argument("--n", type=int, default=8, help="choices in the TTFT comparison")
    m.add_argument("--window", type=float, default=1.0, help="seconds of gaps before the long "
                   "prompt")  # fmt: skip
    d = p.add_argument_group("speculative decoding (--draft)")
    d.add_argument("--draft", default=None, metavar="PATH|ngram", help="compare a server "
                   "with `--draft` against one without, sides taking turns (see above)")  # fmt: skip
    d.add_argument("--draft-k", type=int, default=None, help="the draft side's "
                   "--num_draft_tokens (default: adaptive)")  # fmt: skip
    d.add_argument("--questions", type=Path, default=None, help="chat jsonl (MiniMind's SFT "
                   "format) whose user turns are asked, greedily (default: one question)")  # fmt: skip
    d.add_argument("--num-questions", type=int, default=64, help="user turns taken from it")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.clients, args.tokens, args.rounds, args.repeats = "tiny", "1,4", 16, 1, 1
        args.stream_tokens, args.long_tokens, args.window = 900, 200, 0.15
        args.chunk = args.chunk or 64
    args.levels = sorted({int(c) for c in args.clients.split(",")} | {1})
    args.streams = args.streams or args.levels[-1]
    if args.chunk is None:
        from minimind.serve.openai_api import PREFILL_CHUNK

        args.chunk = PREFILL_CHUNK
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("serve_mixed.json") if args.mixed else DEFAULT_OUT
        if args.draft is not None:
            args.out = DEFAULT_OUT.with_name("serve_draft.json")
    return args


def make_checkpoint(folder: Path, name: str) -> tuple[Path, int]:
    """A random-weight model of the preset with a tokenizer trained on the demo corpus."""
    files = write_demo_corpus(folder / "corpus", seed=0, size_mb=0.2)
    texts = files["pretrain"].read_text("utf-8").splitlines()
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset(name))
    vocab = min(model.config.vocab_size, 2048)
    tok = train_tokenizer(texts, folder / "tokenizer", vocab_size=vocab, show_progress=False)
    return save_checkpoint(folder / "model", model, tokenizer_dir=tok), model.num_parameters()


def start_server(ckpt: Path, args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "serve_openai_api.py"),
        "--load_from", str(ckpt),
        "--device", args.device,
        "--port", str(port),
        "--max_rows", str(args.max_rows),
        "--threads", str(args.server_threads),
        "--stream_interval", str(args.stream_interval),
        "--log_level", "warning",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start in 120 s")
        time.sleep(0.1)


async def sse_post(url: str, path: str, body: dict) -> AsyncIterator[str]:
    """POST `body` as JSON over a fresh HTTP/1.1 connection and yield each server-sent event's
    data. A few lines of asyncio instead of an HTTP library: the load generator shares the
    cores with the server, so it should take as little of them as it can."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    try:
        status = (await reader.readuntil(b"\r\n")).split()[1]
        headers = (await reader.readuntil(b"\r\n\r\n")).lower()
        if status != b"200" or b"transfer-encoding: chunked" not in headers:
            raise RuntimeError(f"{path}: HTTP {status.decode()}: {await reader.read()!r}")
        buffer = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):  # chunked body
            buffer += (await reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:].decode()
    finally:
        writer.close()


async def one_request(
    url: str, model: str, tokens: int, seed: int, question: str | None = None
) -> dict:
    """One streamed chat request: `tokens` forced, sampled (the default: a random model's
    greedy text is one token repeated), or with `question`, a greedy reply of at most
    `tokens` that ends where the model ends it (--draft mode: real replies of a trained
    model). -> time to first text, completion tokens, seconds, the text."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question or QUESTION}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if question is None:
        body.update(ignore_eos=True, temperature=1.0, seed=seed)
    else:
        body.update(temperature=0)
    t0 = time.perf_counter()
    first = None
    count = 0
    text = []
    async for data in sse_post(url, "/v1/chat/completions", body):
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            count = chunk["usage"]["completion_tokens"]
        for c in chunk["choices"]:
            piece = (c["delta"].get("reasoning_content") or "") + (c["delta"].get("content") or "")
            text.append(piece)
            if first is None and piece:
                first = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    return {
        "ttft": first if first is not None else seconds,
        "tokens": count,
        "seconds": seconds,
        "text": "".join(text),
    }


async def run_level(
    url: str, model: str, clients: int, args, questions: list[str] | None = None
) -> dict:
    """`clients` concurrent clients, `args.rounds` requests each; with `questions`, client c's
    round r asks questions[(c * rounds + r) % len] greedily (the same question under the same
    key on every side, so replies can be compared)."""
    async with httpx.AsyncClient(timeout=600) as client:
        before = (await client.get(url + "/health")).json()
        results: list[dict] = []
        t0 = time.perf_counter()

        async def loop(c: int) -> None:
            for r in range(args.rounds):
                if time.perf_counter() - t0 > args.max_seconds:
                    return
                seed = len(results)
                key = c * args.rounds + r
                question = None if questions is None else questions[key % len(questions)]
                out = await one_request(url, model, args.tokens, seed, question)
                results.append({**out, "key": key})

        await asyncio.gather(*(loop(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        after = (await client.get(url + "/health")).json()
    spec = {}
    if "speculation" in after:  # this level's share of the server's totals
        a, b = after["speculation"], before["speculation"]
        d = {k: a[k] - b[k] for k in ("drafted", "accepted", "row_forwards", "tokens")}
        spec = {
            "speculation": d,
            "acceptance_rate": d["accepted"] / d["drafted"] if d["drafted"] else 0.0,
            "tokens_per_forward": d["tokens"] / d["row_forwards"] if d["row_forwards"] else 0.0,
        }
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    steps = after["steps"] - before["steps"]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "per_stream_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in results),
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "rows_per_step": (after["tokens"] - before["tokens"]) / steps if steps else 0.0,
        "replies": {r["key"]: r["text"] for r in results} if questions is not None else None,
        **spec,
    }


def engine_level(loaded, clients: int, args) -> float:
    """Tokens/s of the bare batcher for `clients` requests of the benchmark's settings."""
    ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": QUESTION}])
    batcher = Batcher(loaded.model, max_rows=args.max_rows)
    for seed in range(clients):
        cfg = GenerationConfig(
            max_new_tokens=args.tokens, temperature=1.0, seed=seed, stop_token_ids=()
        )
        batcher.submit(ids, cfg, lambda token, reason: None)
    t0 = time.perf_counter()
    while not batcher.idle:
        batcher.step()
    return clients * args.tokens / (time.perf_counter() - t0)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
    (2.0, 4.0)
    """
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n q / 100), at least 1
    return sorted_values[int(rank) - 1]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def run_meta(args, load_start, load_end, **extra) -> dict:
    """What every report of this script records about its run: date, machine and the load
    (other processes' load skews CPU timings: it is kept with the figures it may have skewed)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "server_threads": args.server_threads,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "torch": torch.__version__,
        **extra,
    }


def table(levels: list[dict]) -> str:
    rows = [
        ("clients", "requests", "tokens", "seconds", "agg tok/s", "vs 1", "stream tok/s",
         "TTFT p50 ms", "TTFT p99 ms", "rows/step"),
    ]  # fmt: skip
    for lv in levels:
        rows.append(
            (
                str(lv["clients"]),
                str(lv["requests"]),
                str(lv["tokens"]),
                f"{lv['wall_s']:.1f}",
                f"{lv['tokens_per_s']:.0f}",
                f"{lv['speedup']:.2f}x",
                f"{lv['per_stream_tokens_per_s']:.0f}",
                f"{lv['ttft_p50_ms']:.0f}",
                f"{lv['ttft_p99_ms']:.0f}",
                f"{lv['rows_per_step']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.mixed:
        return main_mixed(args)
    if args.draft is not None:
        return main_draft(args)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, params = make_checkpoint(Path(tmp), args.preset)
        if args.load_from is not None:
            ckpt = args.load_from
            params = load_model(ckpt, device="cpu").model.num_parameters()
        proc, url = start_server(ckpt, args)
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            asyncio.run(run_level(url, model, 1, argparse.Namespace(**{**vars(args), "rounds": 1})))
            load_start = os.getloadavg()
            runs = {n: [] for n in args.levels}
            for _ in range(args.repeats):  # interleaved, so background load hits every level
                for n in args.levels:
                    runs[n].append(asyncio.run(run_level(url, model, n, args)))
            load_end = os.getloadavg()
        finally:
            proc.terminate()
            proc.wait(30)
        torch.set_num_threads(args.server_threads)
        loaded = load_model(ckpt, device=args.device)
        engine = {n: [] for n in args.levels}
        for _ in range(args.repeats):
            for n in args.levels:
                engine[n].append(engine_level(loaded, n, args))
    # Load only ever adds time: each level's best run is the figure (as bench/model.py does).
    levels = [max(runs[n], key=lambda r: r["tokens_per_s"]) for n in args.levels]
    for lv in levels:
        lv["speedup"] = lv["tokens_per_s"] / levels[0]["tokens_per_s"]
        lv["all_runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs[lv["clients"]]]
        lv["engine_tokens_per_s"] = max(engine[lv["clients"]])
        lv["engine_speedup"] = lv["engine_tokens_per_s"] / max(engine[levels[0]["clients"]])
    report = {
        "meta": run_meta(
            args,
            load_start,
            load_end,
            stream_interval=args.stream_interval,
            python=platform.python_version(),
            preset=args.preset,
            params=params,
            tokens_per_request=args.tokens,
            rounds=args.rounds,
            repeats=args.repeats,
            max_rows=args.max_rows,
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        ),
        "levels": levels,
    }
    m = report["meta"]
    print(
        f"{m['preset']} ({params / 1e6:.2f}M params, random weights) on {m['cpu']}, server "
        f"{m['server_threads']} thread(s); {args.tokens} tokens per request, {args.rounds} "
        f"per client; best of {args.repeats} interleaved runs per level; 1-min load average "
        f"{load_start[0]:.1f} -> {load_end[0]:.1f}"
    )
    print(table(levels))
    print(
        "engine only (the same requests straight into a Batcher, no HTTP): "
        + ", ".join(
            f"batch {lv['clients']}: {lv['engine_tokens_per_s']:.0f} tok/s "
            f"({lv['engine_speedup']:.2f}x)"
            for lv in levels
        )
    )
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return report


def main_mixed(args) -> dict:
    """`--mixed`: bench/serve_mixed.py's two parts, on the checkpoint or a random model."""
    from serve_mixed import run_mixed

    with tempfile.TemporaryDirectory() as tmp:
        if args.load_from is not None:
            ckpt, name = args.load_from, str(args.load_from)
            params = load_model(ckpt, device="cpu").model.num_parameters()
        else:
            (ckpt, params), name = make_checkpoint(Path(tmp), args.preset), args.preset
        load_start = os.getloadavg()
        mixed = run_mixed(ckpt, args)
        load_end = os.getloadavg()
    report = {
        "meta": run_meta(
            args,
            load_start,
            load_end,
            model=name,
            params=params,
            repeats=args.repeats,
            max_rows=args.max_rows,
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        ),
        "mixed": mixed,
    }
    print(
        f"{name} ({params / 1e6:.2f}M params) on {report['meta']['cpu']}, servers of "
        f"{args.server_threads} thread(s); 1-min load average {load_start[0]:.1f} -> "
        f"{load_end[0]:.1f}"
    )
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return report


# --- --draft: speculative decoding in the server, with and without ----------------------------


def chat_questions(data: Path | None, n: int) -> list[str]:
    """The first n user turns of a chat jsonl, or the one built-in question."""
    if data is None:
        return [QUESTION]
    out = []
    for line in data.read_text("utf-8").splitlines():
        for turn in json.loads(line)["conversations"]:
            if turn["role"] == "user" and turn["content"].strip():
                out.append(turn["content"])
                break
        if len(out) == n:
            break
    return out


def main_draft(args) -> dict:
    """`--draft`: two servers of one checkpoint, `plain` and `draft` (`--draft SPEC`), both
    up, the sides taking turns level by level (their order swapped every repeat) on the same
    greedy requests: client c's round r asks the same question on both sides. Per level and
    side the best run's tokens/s; the ratio of the bests and the median of the paired runs'
    ratios; the draft side's acceptance and tokens per target forward (from /health); and
    whether every reply was the same on both sides (greedy: it must be)."""
    questions = chat_questions(args.questions, args.num_questions)
    flags = {"plain": [], "draft": ["--draft", str(args.draft)]}
    if args.draft_k is not None:
        flags["draft"] += ["--num_draft_tokens", str(args.draft_k)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, params = (
            (args.load_from, None) if args.load_from else make_checkpoint(Path(tmp), args.preset)
        )
        procs, urls = {}, {}
        try:
            for side, extra in flags.items():
                procs[side], urls[side] = start_server(ckpt, args, extra)
            model = httpx.get(urls["plain"] + "/v1/models").json()["data"][0]["id"]
            warm = argparse.Namespace(**{**vars(args), "rounds": 1})
            for url in urls.values():
                asyncio.run(run_level(url, model, 1, warm, questions))
            load_start = os.getloadavg()
            runs = {side: {n: [] for n in args.levels} for side in flags}
            for rep in range(args.repeats):
                order = list(flags) if rep % 2 == 0 else list(flags)[::-1]
                for n in args.levels:
                    for side in order:
                        runs[side][n].append(
                            asyncio.run(run_level(urls[side], model, n, args, questions))
                        )
            load_end = os.getloadavg()
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(30)
    levels = []
    for n in args.levels:
        plain, draft = runs["plain"][n], runs["draft"][n]
        best_p = max(plain, key=lambda r: r["tokens_per_s"])
        best_d = max(draft, key=lambda r: r["tokens_per_s"])
        drafted = sum(r["speculation"]["drafted"] for r in draft)
        accepted = sum(r["speculation"]["accepted"] for r in draft)
        row_forwards = sum(r["speculation"]["row_forwards"] for r in draft)
        tokens = sum(r["speculation"]["tokens"] for r in draft)
        levels.append(
            {
                "clients": n,
                "plain_tokens_per_s": best_p["tokens_per_s"],
                "draft_tokens_per_s": best_d["tokens_per_s"],
                "ratio": best_d["tokens_per_s"] / best_p["tokens_per_s"],
                "paired_ratio_median": statistics.median(
                    d["tokens_per_s"] / p["tokens_per_s"] for p, d in zip(plain, draft)
                ),
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "tokens_per_forward": tokens / row_forwards if row_forwards else 0.0,
                "same_replies": all(p["replies"] == d["replies"] for p, d in zip(plain, draft)),
                "requests": best_p["requests"],
                "completion_tokens": best_p["tokens"],
                "plain_all_tokens_per_s": [r["tokens_per_s"] for r in plain],
                "draft_all_tokens_per_s": [r["tokens_per_s"] for r in draft],
            }
        )
    report = {
        "meta": run_meta(
            args,
            load_start,
            load_end,
            checkpoint=str(ckpt),
            params=params,
            draft=str(args.draft),
            draft_k=args.draft_k or "adaptive",
            questions=len(questions),
            max_tokens=args.tokens,
            rounds=args.rounds,
            repeats=args.repeats,
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        ),
        "levels": levels,
    }
    print(
        f"{ckpt} with and without --draft {args.draft} (k {report['meta']['draft_k']}), "
        f"greedy, {len(questions)} questions, max {args.tokens} tokens, {args.rounds} per "
        f"client, best of {args.repeats} turns; 1-min load {load_start[0]:.1f} -> "
        f"{load_end[0]:.1f}"
    )
    rows = [("clients", "plain tok/s", "draft tok/s", "ratio", "paired", "accepted",
             "tok/forward", "same replies")]  # fmt: skip
    for lv in levels:
        rows.append(
            (
                str(lv["clients"]),
                f"{lv['plain_tokens_per_s']:.0f}",
                f"{lv['draft_tokens_per_s']:.0f}",
                f"{lv['ratio']:.2f}x",
                f"{lv['paired_ratio_median']:.2f}x",
                f"{lv['acceptance_rate']:.0%}",
                f"{lv['tokens_per_forward']:.2f}",
                str(lv["same_replies"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows))
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
