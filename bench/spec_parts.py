"""The parts of a compiled speculative round, timed one by one (issue 13): the target's decode
step, its verification of k + 1 columns, the draft model's step, and the whole greedy round
(`speculative.compiled_greedy_round`: the draft's k tokens, the verification and the argmaxes
in one graph), each through the same compiled graphs `generate(..., compile=True)` uses, with
guard evaluation skipped as there. What bench/decode.py's tokens/s are made of: a round costs
about `round k` and emits (tokens per target forward) tokens, so it pays while that count
exceeds round / step.

    python bench/spec_parts.py --target out/small_512 --draft out/draft_192 --ks 1 2 3 4

Checkpoints as `minimind chat` loads them (the draft int8 on a CPU, as `--draft`); or
`--target-preset`/`--draft-preset` for random weights of a preset shape (timings only: the
shapes are what costs). Caches hold a 40-token prompt and 256 slots; every timed call starts
from the same cache state (rewound after each call), and the parts take turns call by call.
One side per run: the CPU matmul path is the process's (`MINIMIND_CPU_MATMUL`,
minimind/model/layers.py), so an A/B of it is two runs, one after the other. Prints a table, writes JSON (default
bench/results/spec_parts.json). A benchmark, not a test: it never asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from pathlib import Path

import torch
from model import alternate, device_name  # bench/model.py, beside this file
from report import write_report  # bench/report.py

from minimind.infer.speculative import compiled_greedy_round, compiled_verify
from minimind.infer.steps import compiled_step, skip_guards
from minimind.model import MiniMindForCausalLM, layers, preset
from minimind.model.quant import quantize_int8

PROMPT, CAPACITY = 40, 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, help="target checkpoint (as `minimind chat` loads it)")
    p.add_argument("--draft", type=Path, help="draft checkpoint (int8 on a CPU, as --draft)")
    p.add_argument("--target-preset", default=None, help="random target of this preset shape")
    p.add_argument("--draft-preset", default=None, help="random draft of this preset shape")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4], help="draft lengths")
    p.add_argument("--calls", type=int, default=40, help="timed calls per part")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("bench/results/spec_parts.json"))
    args = p.parse_args(argv)
    if (args.target is None) == (args.target_preset is None):
        p.error("give one of --target CKPT and --target-preset NAME")
    if args.draft is not None and args.draft_preset is not None:
        p.error("give at most one of --draft CKPT and --draft-preset NAME")
    if any(k < 1 for k in args.ks):
        p.error("--ks: draft lengths are at least 1")
    return args


def load(path: Path | None, name: str | None) -> MiniMindForCausalLM:
    if path is None:
        torch.manual_seed(0)
        return MiniMindForCausalLM(preset(name)).eval()
    from minimind.infer.load import load_model  # the model stack, only for a checkpoint

    return load_model(path, device="cpu", dtype=torch.float32).model.eval()


def call(model, fn, args: tuple, caches: tuple):
    """A first call of fn(*args) (compiles, guards evaluated), then a closure for
    model.alternate to time: one call as generate makes it after its first (guards skipped),
    waiting for the result, then `caches` rewound."""
    fn(*args)
    rewind(*caches)

    def once() -> None:
        with skip_guards(model):
            out = fn(*args)
        out.tolist() if out.dtype == torch.long else out.sum().item()  # waits for the result
        rewind(*caches)

    return once


def fresh_cache(model: MiniMindForCausalLM, prompt: torch.Tensor):
    cache = model.new_cache(1, CAPACITY, static=True)
    model(prompt, cache=cache, logits_to_keep=1)
    return cache


def rewind(*caches) -> None:
    """Back to the prompt: the next call writes the same slots at the same positions and sees
    no slot a previous call filled."""
    for c in caches:
        c.slot.fill_(c.length)
        c.seen.fill_(c.length)
        c.valid[:, c.length :] = False


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load(args.target, args.target_preset)
    draft = None
    if args.draft is not None or args.draft_preset is not None:
        draft = quantize_int8(load(args.draft, args.draft_preset))
    vocab = target.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=g)
    fns = {}  # part -> a closure of one call (each graph compiled by `call`)
    with torch.inference_mode():
        ct = fresh_cache(target, prompt)
        tok = torch.tensor([[5]])
        step = compiled_step(target)
        fns["target step"] = call(target, step, (tok, ct), (ct,))
        verify = compiled_verify(target)
        for k in args.ks:
            ids = torch.randint(0, vocab, (1, k + 1), generator=g)
            mask = torch.ones_like(ids, dtype=torch.bool)
            fns[f"verify {k + 1} columns"] = call(target, verify, (ids, ct, mask), (ct,))
        if draft is not None:
            cd = fresh_cache(draft, prompt)
            dstep = compiled_step(draft)
            fns["draft step"] = call(draft, dstep, (tok, cd), (cd,))
            last, pending = torch.tensor([[5]]), torch.tensor([[3, 4]])
            pmask = torch.ones(1, 2, dtype=torch.bool)
            for k in args.ks:
                rnd = compiled_greedy_round(target, draft, k)
                rargs = (last, pending, pmask, None, ct, cd)
                fns[f"round k={k}"] = call(target, rnd, rargs, (ct, cd))
        times = alternate(fns, warmup=3, repeats=args.calls, device="cpu")
    parts = {
        name: {"median_ms": statistics.median(ts) * 1e3, "best_ms": min(ts) * 1e3}
        for name, ts in times.items()
    }
    step_ms = parts["target step"]["median_ms"]
    for part in parts.values():
        part["vs_step"] = part["median_ms"] / step_ms
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device_name": device_name("cpu"),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "avoid_mkl": layers.AVOID_MKL,
            "target": str(args.target or args.target_preset),
            "target_params_m": target.num_parameters() / 1e6,
            "draft": None if draft is None else str(args.draft or args.draft_preset),
        },
        "parts": parts,
    }
    print(
        f"compiled parts, batch 1, {PROMPT}-token prompt, {CAPACITY} slots; target "
        f"{report['meta']['target']} ({report['meta']['target_params_m']:.2f}M), draft "
        f"{report['meta']['draft']} (int8); {report['meta']['device_name']}, "
        f"{report['meta']['threads']} threads; matmuls around MKL: {layers.AVOID_MKL}"
    )
    print(f"{'part':<20} {'median ms':>10} {'best ms':>8} {'vs step':>8}")
    for name, part in parts.items():
        print(
            f"{name:<20} {part['median_ms']:>10.2f} {part['best_ms']:>8.2f} "
            f"{part['vs_step']:>7.2f}x"
        )
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
