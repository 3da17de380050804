"""Benchmark: the MiniMind model and minimind.infer.generate against transformers' Llama.

Builds transformers' `LlamaForCausalLM` with exactly our dimensions (hidden, layers, heads, kv
heads, head dim, intermediate, vocab, tied embeddings, rope theta, norm eps), loads our random
weights into it (the parameter names are the same), and measures on the same inputs:

1. training step (forward + cross-entropy + backward; no optimizer) tokens/s, eager and
   torch.compile'd, fp32 and bf16 autocast (CUDA: bf16 autocast only), twice: with every
   position a target (pretraining; one loss code for both), and SFT-shaped, with only
   --sft-labelled of the positions labelled and each model's own training loss (ours
   `minimind.train`'s lm_loss, transformers' `model(input_ids, labels=...)`); tokens/s counts
   all positions in both;
2. greedy decode tokens/s at batch 1 and 8: our `generate` vs `model.generate(do_sample=False)`
   with its default cache (eager rows), and `generate(compile=True)` vs transformers' compiled
   recipe, its static cache with a torch.compile'd forward (compile rows); all forced to the
   full length with min_new_tokens (so none stops early on eos); the time covers the whole
   call, prefill included;
3. peak memory per case, in MiB over what was resident before it (CUDA: allocated memory;
   CPU: resident set, after returning freed heap pages to the OS with malloc_trim).

The two sides alternate step by step, so background load on a shared machine hits both alike,
and the figure reported is the best (fastest) repeat: load only ever adds time. The median is
kept in the JSON too. Warm-up steps (default 2) absorb torch.compile's compilation, including a
recompile on the second call. Prints a table and writes JSON (default bench/results/model.json).
A benchmark, not a test: it never asserts a speed. Run `python bench/model.py --help`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report import write_report  # bench/report.py, beside this file

from minimind.infer import generate
from minimind.model import MiniMindForCausalLM, preset
from minimind.train.stage import lm_loss

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "model.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = p.add_argument
    arg("--preset", default="minimind2-small", help="a dense preset")
    arg("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    arg("--batch", type=int, default=4, help="training batch size")
    arg("--seq", type=int, default=256, help="training sequence length")
    arg("--sft-labelled", type=float, default=0.2, help="labelled share of the SFT-shaped step")
    arg("--steps", type=int, default=5, help="timed training steps per case")
    arg("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    arg("--prompt-len", type=int, default=32, help="decode prompt length")
    arg("--new-tokens", type=int, default=64, help="decode new tokens per row")
    arg("--decode-repeats", type=int, default=5, help="timed generate calls per case")
    arg("--quick", action="store_true", help="tiny preset and sizes: a smoke run of seconds")
    arg("--skip-compile", action="store_true", help="eager only")
    arg(
        "--profile",
        action="store_true",
        help="also split each training step: GEMM, attention, rest",
    )
    arg("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 32, 2, 1
        args.prompt_len, args.new_tokens, args.decode_repeats = 8, 8, 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --- the two models --------------------------------------------------------------------------


def llama_twin(model: MiniMindForCausalLM, attn: str = "sdpa"):
    """transformers' LlamaForCausalLM with `model`'s dimensions and weights (our exporter's
    mapping, minimind.convert.hf), on the same device, with the given attention kernel."""
    from minimind.convert.hf import to_hf_model

    hf = to_hf_model(model)
    hf.config._attn_implementation = attn
    return hf.to(next(model.parameters()).device)


def build(args: argparse.Namespace):
    cfg = preset(args.preset)
    if cfg.use_moe or cfg.qk_norm or cfg.rope_scaling:
        raise SystemExit(f"--preset {args.preset}: Llama has no MoE / qk-norm / YaRN twin")
    torch.manual_seed(0)
    ours = MiniMindForCausalLM(cfg).to(args.device)
    return ours, llama_twin(ours)


# --- measurement helpers ---------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak extra memory while fn() runs, in MiB; None where it cannot be measured."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        # Return freed heap pages first, so the baseline is live memory, not malloc's cache;
        # then reset the kernel's high-water mark (Linux >= 4.0, clear_refs "5").
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
    except OSError:
        return None
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def alternate(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: str):
    """Run each fn `warmup` times, then `repeats` rounds taking turns; -> {name: [seconds]}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: list[float], tokens: int, mem: float | None) -> dict:
    return {
        "tokens_per_s": tokens / min(times),
        "median_tokens_per_s": tokens / statistics.median(times),
        "best_ms": min(times) * 1e3,
        "peak_mem_mib": mem,
    }


def compare(ours: dict, hf: dict) -> dict:
    mem = None
    if ours["peak_mem_mib"] and hf["peak_mem_mib"]:
        mem = ours["peak_mem_mib"] / hf["peak_mem_mib"]
    return {"speedup": ours["tokens_per_s"] / hf["tokens_per_s"], "mem_ratio": mem}


# --- 1. training step ------------------------------------------------------------------------


def train_step_fn(model, x, y, device: str, bf16: bool) -> Callable[[], None]:
    """Every position a target (pretraining): the same loss code for both models."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()

    return step


def hf_labels(y: torch.Tensor) -> torch.Tensor:
    """Our shifted labels y (B, T) as transformers' `labels=` wants them: it shifts labels
    itself, so it gets y moved one step right (the same targets; y's last column unlabelled)."""
    return F.pad(y[:, :-1], (1, 0), value=-100)


def sft_step_fn(model, x, y, device: str, bf16: bool, ours: bool) -> Callable[[], None]:
    """Most positions unlabelled (SFT: prompts, padding), each model's own training loss:
    ours `lm_loss` (minimind.train; y already shifted), transformers' `model(x, labels=...)`."""
    theirs = hf_labels(y)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, x, y).loss_sum if ours else model(x, labels=theirs).loss
        loss.backward()

    return step


@torch.no_grad()
def sft_loss_gap(ours, hf, x, y) -> float:
    """|ours - transformers'| mean SFT loss in fp32 eager, on the benchmark's batch."""
    mine = lm_loss(ours, x, y).loss_sum / (y != -100).sum()
    theirs = hf(x, labels=hf_labels(y)).loss
    return float((mine - theirs).abs())


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def step_breakdown(step: Callable[[], None], device: str, steps: int = 2) -> dict[str, float]:
    """ms per step in GEMMs, in attention kernels and in everything else (torch.profiler self
    time: CPU, or the GPU's kernel time on CUDA): what a faster implementation could still
    remove is the "other" share, since both models call the same GEMM and attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        t = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
        kind = (
            "gemm"
            if e.key in GEMM_OPS
            else "attention"
            if "scaled_dot_product" in e.key or "flash" in e.key
            else "other"
        )
        split[kind] += t / steps / 1e3
    return split


def bench_training(ours, hf, args, sft: bool = False) -> dict:
    """sft=False: every position a target; True: a fraction --sft-labelled of them (the last
    ones of each row, as an answer after its prompt), the last position never (see sft_step_fn)."""
    cfg = ours.config
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    if sft:
        answer = max(1, round(args.sft_labelled * args.seq))
        y[:, : args.seq - answer] = -100
        y[:, -1] = -100
    tokens = args.batch * args.seq
    modes = ["eager"] if args.skip_compile else ["eager", "compile"]
    precisions = ["bf16"] if args.device == "cuda" else ["fp32", "bf16"]
    for m in (ours, hf):
        m.train()
    results = {}
    for mode in modes:
        models = {"ours": ours, "hf": hf}
        if mode == "compile":
            torch._dynamo.reset()
            models = {name: torch.compile(m) for name, m in models.items()}
        for precision in precisions:
            bf16 = precision == "bf16"
            fns = {
                name: sft_step_fn(m, x, y, args.device, bf16, ours=name == "ours")
                if sft
                else train_step_fn(m, x, y, args.device, bf16)
                for name, m in models.items()
            }
            t0 = time.perf_counter()
            times = alternate(fns, args.warmup, args.steps, args.device)
            mems = {name: peak_memory_mib(fn, args.device) for name, fn in fns.items()}
            case = {n: summarise(times[n], tokens, mems[n]) for n in fns}
            case.update(compare(case["ours"], case["hf"]))
            if sft:  # the two losses are the same number (mean over the labelled positions)
                case["loss_abs_diff"] = sft_loss_gap(ours, hf, x, y)
            if args.profile:
                case["breakdown_ms"] = {n: step_breakdown(fn, args.device) for n, fn in fns.items()}
            case["wall_s"] = time.perf_counter() - t0
            results[f"{mode}/{precision}"] = case
            kind = "train_sft" if sft else "train"
            print(f"  {kind} {mode}/{precision}: {case['wall_s']:.0f} s", file=sys.stderr)
    for m in (ours, hf):
        m.zero_grad(set_to_none=True)
    return results


# --- 2. decode -------------------------------------------------------------------------------


def decode_dtype(args) -> torch.dtype:
    """CUDA decodes with bf16 weights; CPU keeps fp32 (generate() runs in the model's dtype)."""
    return torch.bfloat16 if args.device == "cuda" else torch.float32


@torch.inference_mode()
def hf_generate(
    hf, ids: torch.Tensor, n: int, cfg, static: bool = False, eos_stops: bool = False
) -> list[list[int]]:
    """transformers' greedy `generate` of exactly n new tokens per row of ids (B, T), or at most
    n ending at eos when `eos_stops`; static=True: its static KV cache (what a compiled forward
    needs)."""
    seq = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0 if eos_stops else n,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        **({"cache_implementation": "static"} if static else {}),
    )
    return seq[:, ids.shape[1] :].tolist()


def compile_hf(hf) -> None:
    """transformers' recipe for a compiled generate: torch.compile the forward (used with the
    static cache). `uncompile_hf` undoes it."""
    hf.forward = torch.compile(hf.forward, dynamic=False)


def uncompile_hf(hf) -> None:
    del hf.forward  # the instance attribute: the class's forward again


def bench_decode(ours, hf, args) -> dict:
    """Greedy decode at batch 1 and 8. Eager: our generate vs transformers' default generate.
    Compiled: generate(compile=True) vs transformers with the static cache and a compiled
    forward (its documented recipe); compilation happens in the warm-up call."""
    cfg = ours.config
    n = args.new_tokens
    dtype = decode_dtype(args)
    for m in (ours, hf):
        m.to(dtype).eval()
    results = {}
    modes = ["eager"] if args.skip_compile else ["eager", "compile"]
    for mode in modes:
        compiled = mode == "compile"
        if compiled:
            compile_hf(hf)
        for batch in (1, 8):
            g = torch.Generator().manual_seed(2 + batch)
            # Ids from 3 up: no special tokens in the prompts.
            prompt = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=g)
            ids = prompt.to(args.device)
            out: dict[str, list] = {}

            def run_ours(prompt=prompt, out=out, compiled=compiled) -> None:
                out["ours"] = generate(
                    ours,
                    prompt.tolist(),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    temperature=0,
                    compile=compiled,
                )

            def run_hf(ids=ids, out=out, compiled=compiled) -> None:
                out["hf"] = hf_generate(hf, ids, n, cfg, static=compiled)

            fns = {"ours": run_ours, "hf": run_hf}
            t0 = time.perf_counter()
            times = alternate(fns, 1, args.decode_repeats, args.device)
            mems = {name: peak_memory_mib(fn, args.device) for name, fn in fns.items()}
            case = {name: summarise(times[name], batch * n, mems[name]) for name in fns}
            case.update(compare(case["ours"], case["hf"]))
            # Same weights, both greedy: the tokens should agree (a near-tie may flip one).
            case["same_tokens_rows"] = sum(a == b for a, b in zip(out["ours"], out["hf"])) / batch
            case["wall_s"] = time.perf_counter() - t0
            key = f"batch{batch}" if not compiled else f"compile/batch{batch}"
            results[key] = case
            print(f"  decode {key}: {case['wall_s']:.0f} s", file=sys.stderr)
        if compiled:
            uncompile_hf(hf)
    return results


# --- report ----------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def meta(args, ours) -> dict:
    import transformers

    c = ours.config
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name(args.device),
        "threads": torch.get_num_threads(),
        # Other processes' load skews CPU timings; kept with the figures it may have skewed.
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "preset": args.preset,
        "params": ours.num_parameters(),
        "dims": {
            k: getattr(c, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "intermediate_size",
                "vocab_size",
                "tie_word_embeddings",
                "rope_theta",
            )
        },
        "train_shape": [args.batch, args.seq],
        "steps": args.steps,
        "warmup": args.warmup,
        "decode": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "dtype": str(decode_dtype(args)).removeprefix("torch."),
        },
        "attention": "sdpa",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def table(report: dict) -> str:
    def mem(v):
        return "-" if v is None else f"{v:.0f}"

    def ratio(v):
        return "-" if v is None else f"{v:.2f}x"

    rows = [("case", "ours tok/s", "HF tok/s", "ours/HF", "ours MiB", "HF MiB", "mem ours/HF")]
    for section in ("train", "train_sft", "decode"):
        for name, c in report[section].items():
            rows.append(
                (
                    f"{section} {name}",
                    f"{c['ours']['tokens_per_s']:.0f}",
                    f"{c['hf']['tokens_per_s']:.0f}",
                    f"{c['speedup']:.2f}x",
                    mem(c["ours"]["peak_mem_mib"]),
                    mem(c["hf"]["peak_mem_mib"]),
                    ratio(c["mem_ratio"]),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for section in ("train", "train_sft"):  # with --profile
        for name, c in report[section].items():
            for side, split in c.get("breakdown_ms", {}).items():
                total = sum(split.values())
                lines.append(
                    f"{section} {name} {side}: {total:.0f} ms/step profiled = "
                    + ", ".join(f"{k} {v:.0f} ({v / total:.0%})" for k, v in split.items())
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        # One thread per core; --quick uses one, as toy sizes gain nothing from threads and a
        # smoke run must not crawl when other processes share the cores.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(1 if args.quick else cores or 1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate()'s advice about flags is noise here
    ours, hf = build(args)
    report = {"meta": meta(args, ours)}
    t0 = time.perf_counter()
    report["train"] = bench_training(ours, hf, args)
    report["train_sft"] = bench_training(ours, hf, args, sft=True)
    report["decode"] = bench_decode(ours, hf, args)
    report["meta"]["wall_s"] = time.perf_counter() - t0
    report["meta"]["loadavg_end"] = os.getloadavg()
    m = report["meta"]
    print(
        f"{m['preset']} ({m['params'] / 1e6:.1f}M params) on {m['device_name']}, {m['threads']} threads, "
        f"torch {m['torch']}, transformers {m['transformers']}; train batch {args.batch} x {args.seq}, "
        f"decode prompt {args.prompt_len} + {args.new_tokens} new; best of {args.steps} steps / "
        f"{args.decode_repeats} calls; memory = peak MiB over resident; 1-min load average "
        f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
    )
    print(table(report))
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
