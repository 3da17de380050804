"""Benchmark: greedy decode at batch 1 — our generate vs transformers and llama.cpp on the exports.

For each preset (default `demo` and `minimind2-small`, random weights, seed 0, fp32):

1. ours: `minimind.infer.generate(model, [prompt], temperature=0)` with min_new_tokens = max_new
   tokens, so it never stops early on eos;
2. transformers: `generate(do_sample=False, min_new_tokens=n)` on the twin that our exporter
   builds (`llama_twin` from bench/model.py: minimind.convert.hf's mapping, SDPA attention),
   with its default cache ("hf"), and with its compiled recipe, the static cache and a
   torch.compile'd forward ("hf compiled", on a second twin; skipped with --no-compile);
3. llama.cpp (when llama_cpp, from llama-cpp-python, is importable): the model exported by
   minimind.convert.gguf as f32 and as f16, decoded by `Llama.generate` with llama.cpp's
   greedy sampler, stopped after n tokens (no eos stop), with llama.cpp's default f16 KV cache.

Every side gets the same random prompt (ids from 3 up) and the same number of threads (one per
core). A timed call covers prefill plus all new tokens. The PyTorch sides (1, 2) take turns call
by call in this process, so load from other processes hits them alike; llama.cpp runs right
after, in a child process of its own (this script with --llamacpp-worker): torch and llama.cpp
each bring an OpenMP runtime, and in one process their spinning threads steal each other's
cores (measured here: llama.cpp 1,900 -> 36 tokens/s after a torch call), while making both
wait passively (OMP_WAIT_POLICY=PASSIVE, what this benchmark did before) slows every small
kernel launch of the torch sides (demo compiled 813 -> 694 tokens/s). The best of the repeats
is reported (load only ever adds time); the median is kept in the JSON. Greedy tokens are compared with ours (random
weights give near-uniform logits, so a near-tie may flip a token between implementations; the
count of identical leading tokens is reported). Prints a table and writes JSON (default
bench/results/decode.json). A benchmark, not a test: it never asserts a speed.

`--spec-target CKPT` switches to speculative decoding (minimind/infer/speculative.py), which
needs a trained model (random weights make drafts worthless): greedy chat replies at batch 1,
stopping at eos, from the target plain (eager, and compiled unless --no-compile), with n-gram
drafts, and with `--spec-draft CKPT` (a smaller model, same tokenizer, loaded as `minimind chat
--draft` loads it: int8 weights on a CPU unless --spec-draft-dtype) drafting; unless
--no-compile, both drafters also run compiled (`generate(draft=..., compile=True)`: a fixed k =
--spec-compile-k, since an adapted k would recompile; default 3 where layers.AVOID_MKL (an AMD
CPU: matmuls of few rows as reductions, a verification of 4 columns about 1.3x a decode step),
else 2 (MKL: one of 3 columns about 1.2x a step, of 4 about 1.8x); bench/spec_parts.py times
the parts, bench/RESULTS.md has both).
The references take their turns too: transformers' `generate` (default cache, eos stops) on the
target's twin (not with --skip-hf), and llama.cpp on the target's f32 and f16 GGUF exports (in
its own process, after the torch sides; not with --skip-llamacpp), each generating as many
tokens per prompt as plain greedy's reply, with its own prefill-only side for its decode rate.
Two prompt sets from `--spec-data` (chat jsonl, MiniMind's SFT format): "chat", single
questions, and "repeat", three earlier exchanges followed by the second question again, so the
answer repeats text of the prompt (where prompt lookup pays). A timed call answers the whole
set; the sides take turns call by call; tokens/s, acceptance rate and tokens per target forward
are reported, and every side's replies are checked against plain greedy's. "prefill only"
sides (one token per prompt; eager, and compiled, since compile=True prefills through a
compiled graph too) take their turns too, so the decode rate after the prefill is reported
apart (each side less its own kind of prefill): the demo's replies are short, and no drafter
speeds up the prefill. JSON default: bench/results/decode_speculative.json.
Run `python bench/decode.py --help`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# bench/model.py, beside this file (a script's folder is on sys.path): its transformers twin,
# turn-taking timer and machine name are reused as they are.
from model import alternate, compile_hf, device_name, hf_generate, llama_twin
from report import write_report  # bench/report.py, beside this file

from minimind.infer import generate
from minimind.infer.speculative import DRAFT_DTYPES
from minimind.model import MiniMindForCausalLM, layers, preset
from minimind.tokenizer import train_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "decode.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = p.add_argument
    arg("--presets", nargs="+", default=["demo", "minimind2-small"], help="dense presets")
    arg("--prompt-len", type=int, default=32, help="prompt tokens")
    arg("--new-tokens", type=int, default=128, help="new tokens per call (no eos stop)")
    arg("--repeats", type=int, default=5, help="timed calls per side")
    arg("--threads", type=int, default=0, help="threads per side (0: one per core)")
    arg("--skip-llamacpp", action="store_true", help="ours and transformers only")
    arg("--skip-hf", action="store_true", help="speculative mode: no transformers side")
    arg("--no-compile", action="store_true", help="skip the compiled side (generate(compile=True))")
    arg("--quick", action="store_true", help="tiny preset, 8 + 8 tokens, 1 repeat: a smoke run")
    arg("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    arg("--llamacpp-worker", type=Path, help=argparse.SUPPRESS)  # a GGUF: the child process
    arg("--spec-target", type=Path, help="speculative mode: the target checkpoint (trained)")
    arg("--spec-draft", type=Path, help="speculative mode: a draft checkpoint, same tokenizer")
    arg(
        "--spec-draft-dtype",
        default=None,
        choices=DRAFT_DTYPES,
        help="the draft model's weights, as `minimind chat --draft_dtype` (default: int8 on a CPU)",
    )
    arg("--spec-data", type=Path, help="speculative mode: chat jsonl the prompts come from")
    arg("--spec-prompts", type=int, default=8, help="speculative mode: prompts per set")
    arg("--spec-k", type=int, default=None, help="draft tokens per round (default: adaptive)")
    arg(
        "--spec-compile-k",
        type=int,
        default=3 if layers.AVOID_MKL else 2,
        help="draft tokens per round of the compiled speculative sides (fixed: compiled)",
    )
    args = p.parse_args(argv)
    if args.spec_target is not None and args.spec_data is None:
        p.error("--spec-target needs --spec-data (chat jsonl)")
    if args.quick:
        args.presets, args.prompt_len, args.new_tokens, args.repeats = ["tiny"], 8, 8, 1
    if args.threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.threads = cores or 1
    return args


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version when installed (not imported here: see the docstring)."""
    from importlib import metadata
    from importlib.util import find_spec

    if find_spec("llama_cpp") is None:
        return None
    return metadata.version("llama_cpp_python")


# --- the sides -------------------------------------------------------------------------------


def ours_fn(model: MiniMindForCausalLM, prompt: list[int], n: int, out: dict, compile=False):
    side = "ours compiled" if compile else "ours"

    def run() -> None:
        out[side] = list(
            generate(
                model,
                [prompt],
                max_new_tokens=n,
                min_new_tokens=n,
                temperature=0,
                compile=compile,
            )[0]
        )

    return run


def hf_fn(hf, prompt: list[int], n: int, cfg, out: dict, static: bool = False):
    ids = torch.tensor([prompt])
    side = "hf compiled" if static else "hf"

    def run() -> None:
        out[side] = hf_generate(hf, ids, n, cfg, static=static)[0]

    return run


def llamacpp_worker(args) -> None:
    """The child process: time llama.cpp on one GGUF; job JSON on stdin, result on stdout.

    The job is a list of prompts and, for each, how many tokens to generate (no eos stop); a
    timed call generates them all, as a speculative-mode call answers its whole prompt set."""
    import llama_cpp

    job = json.loads(sys.stdin.read())
    prompts, ns = job["prompts"], job["ns"]
    llm = llama_cpp.Llama(
        str(args.llamacpp_worker),
        n_ctx=max(len(p) + n for p, n in zip(prompts, ns)) + 16,
        n_batch=max(max(len(p) for p in prompts), 32),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    out: dict[str, list[list[int]]] = {}

    def fn(side: str, counts: list[int]):
        def run() -> None:
            replies = []
            for prompt, n in zip(prompts, counts):
                # reset() first: generate() would otherwise reuse the KV cache of the previous
                # call's identical prompt and skip the prefill.
                llm.reset()
                tokens: list[int] = []
                for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # greedy
                    tokens.append(int(token))
                    if len(tokens) == n:  # as ours: prefill + n - 1 decode steps, no eos stop
                        break
                replies.append(tokens)
            out[side] = replies

        return run

    fns = {"llama.cpp": fn("llama.cpp", ns)}
    if job["prefill"]:  # one token per prompt, taking turns: the decode rate apart
        fns["prefill only"] = fn("prefill only", [1] * len(ns))
    times = alternate(fns, 1, job["repeats"], "cpu")
    print(json.dumps({"times": times, "tokens": out["llama.cpp"]}))


def run_llamacpp(
    path: Path, prompts: list[list[int]], ns: list[int], args, prefill: bool = False
) -> tuple[dict[str, list[float]], list[list[int]]]:
    """-> ({"llama.cpp": seconds per call[, "prefill only": ...]}, tokens per prompt) of
    llama.cpp on `path`, from a child process."""
    job = json.dumps({"prompts": prompts, "ns": ns, "repeats": args.repeats, "prefill": prefill})
    cmd = [sys.executable, __file__, "--llamacpp-worker", str(path), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, input=job, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp worker on {path} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["times"], result["tokens"]


def export_ggufs(model: MiniMindForCausalLM, folder: Path, tokenizer=None) -> dict[str, Path]:
    """f32 and f16 GGUF files of `model` with `tokenizer` (a trained model's); without one, a
    small tokenizer (the ids decoded here are random; a tokenizer smaller than the vocabulary is
    padded with unused ids)."""
    from minimind.convert.gguf import export_gguf

    if tokenizer is None:
        texts = ["the quick brown fox jumps over the lazy dog 0123456789"] * 50
        tok = train_tokenizer(texts, folder / "tok", 300, show_progress=False)
    else:
        tok = tokenizer.save(folder / "tok")
    paths = {}
    for dtype in ("f32", "f16"):
        paths[dtype] = folder / f"model-{dtype}.gguf"
        export_gguf(model, paths[dtype], tok, dtype)
    return paths


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bench_preset(name: str, args, llama_cpp: str | None) -> dict:
    cfg = preset(name)
    if cfg.use_moe or cfg.qk_norm or cfg.rope_scaling:
        raise SystemExit(f"--presets {name}: the transformers twin here is Llama (dense only)")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg).eval()
    hf = llama_twin(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    n = args.new_tokens
    out: dict[str, list[int]] = {}
    fns = {"ours": ours_fn(model, prompt, n, out), "hf": hf_fn(hf, prompt, n, cfg, out)}
    if not args.no_compile:  # the warm-up call compiles (not timed)
        fns["ours compiled"] = ours_fn(model, prompt, n, out, compile=True)
        hf_compiled = llama_twin(model)
        compile_hf(hf_compiled)
        fns["hf compiled"] = hf_fn(hf_compiled, prompt, n, cfg, out, static=True)
    t0 = time.perf_counter()
    times = alternate(fns, 1, args.repeats, "cpu")
    if llama_cpp is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for dtype, path in export_ggufs(model, Path(tmp)).items():
                side = f"llama.cpp {dtype}"
                t, (out[side],) = run_llamacpp(path, [prompt], [n], args)
                times[side] = t["llama.cpp"]
    wall = time.perf_counter() - t0
    sides = {
        side: {
            "tokens_per_s": n / min(t),
            "median_tokens_per_s": n / statistics.median(t),
            "best_ms": min(t) * 1e3,
            "same_leading_tokens_as_ours": leading_agreement(out[side], out["ours"]),
        }
        for side, t in times.items()
    }
    ratios = {
        f"{a}/{b}": sides[a]["tokens_per_s"] / sides[b]["tokens_per_s"]
        for a in ("ours", "ours compiled")
        for b in sides
        if a in sides and b != a and not b.startswith("ours")
    }
    print(f"  {name}: {wall:.0f} s", file=sys.stderr)
    return {"params": model.num_parameters(), "sides": sides, "ratios": ratios, "wall_s": wall}


# --- report ----------------------------------------------------------------------------------


def meta(args, llama_cpp: str | None) -> dict:
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name("cpu"),
        "threads": args.threads,
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llama_cpp_python": llama_cpp,
        "python": platform.python_version(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batch": 1,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "llamacpp": "own child process, after the torch sides",
        "weights": "random (seed 0), fp32; GGUF f32 and f16; llama.cpp KV cache f16 (default)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def table(report: dict) -> str:
    sides = ["ours", "ours compiled", "hf", "hf compiled", "llama.cpp f32", "llama.cpp f16"]
    ratio_keys = {  # column title: ratio key
        "ours/hf": "ours/hf",
        "compiled/hf": "ours compiled/hf",
        "compiled/hf compiled": "ours compiled/hf compiled",
        "compiled/llama f32": "ours compiled/llama.cpp f32",
    }
    head = ["preset", *[f"{s} tok/s" for s in sides], *ratio_keys]
    rows = [head]
    for name, r in report["presets"].items():
        s, q = r["sides"], r["ratios"]
        rows.append(
            [
                f"{name} ({r['params'] / 1e6:.1f}M)",
                *[f"{s[x]['tokens_per_s']:.0f}" if x in s else "-" for x in sides],
                *[f"{q[k]:.2f}x" if k in q else "-" for k in ratio_keys.values()],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- speculative decoding ----------------------------------------------------------------------


def spec_prompts(tokenizer, data: Path, n: int) -> dict[str, list[list[int]]]:
    """The "chat" and "repeat" prompt sets (see the module docstring) as prompt ids."""
    from minimind.infer.chat import prompt_ids

    pairs = []  # (user, assistant) exchanges, in file order
    for line in data.read_text("utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        if len(turns) >= 2 and turns[-2]["role"] == "user" and turns[-1]["content"]:
            pairs.append((turns[-2]["content"], turns[-1]["content"]))
    if len(pairs) < 4 * n:
        raise SystemExit(f"--spec-data {data}: {len(pairs)} exchanges, need {4 * n}")
    chat = [prompt_ids(tokenizer, [{"role": "user", "content": u}]) for u, _ in pairs[:n]]
    repeat = []
    for i in range(n):
        history = []
        for user, answer in pairs[n + 3 * i : n + 3 * i + 3]:
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        repeat.append(prompt_ids(tokenizer, [*history, history[2]]))
    return {"chat": chat, "repeat": repeat}


def decode_rate(decoded: int, t: list[float], t_prefill: list[float]) -> float:
    """Tokens/s of the `decoded` tokens after each prompt's first: the best timed call less
    the best prefill-only call."""
    return decoded / max(min(t) - min(t_prefill), 1e-9)


def bench_speculative(args, llama_cpp: str | None) -> dict:
    """Plain vs speculative greedy decoding of a trained target over both prompt sets, with
    transformers' `generate` (default cache) on the target's twin and llama.cpp on its GGUF
    exports as references: each generates as many tokens per prompt as plain greedy's reply."""
    from minimind.infer.chat import stop_ids
    from minimind.infer.load import load_model
    from minimind.infer.speculative import load_draft

    target = load_model(args.spec_target, device="cpu", dtype="float32")
    draft, draft_text = None, None
    if args.spec_draft is not None:  # as `minimind chat --draft` loads it
        try:
            draft, draft_text = load_draft(str(args.spec_draft), target, args.spec_draft_dtype)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--spec-draft: {e}") from None
    stops = stop_ids(target.tokenizer, target.model)
    sets = spec_prompts(target.tokenizer, args.spec_data, args.spec_prompts)
    drafters: dict[str, object] = {"plain": None, "ngram": "ngram"}
    if draft is not None:
        drafters["draft model"] = draft
    if not args.no_compile:
        # compiled speculation verifies k + 1 columns in one fixed-shape step: k is fixed
        drafters["plain compiled"] = None
        drafters["ngram compiled"] = "ngram"
        if draft is not None:
            drafters["draft model compiled"] = draft
    drafters["prefill only"] = None  # max_new_tokens=1: the share no drafter can speed up
    if not args.no_compile:  # compile=True prefills through a compiled graph too
        drafters["prefill only compiled"] = None
    hf = None if args.skip_hf else llama_twin(target.model).eval()
    tmp = tempfile.TemporaryDirectory()
    ggufs = (
        {} if llama_cpp is None else export_ggufs(target.model, Path(tmp.name), target.tokenizer)
    )
    out: dict[str, dict[str, list]] = {}

    def fn(set_name: str, side: str):
        compiled = side.endswith("compiled")
        k = None if drafters[side] is None else args.spec_compile_k if compiled else args.spec_k

        def run() -> None:
            replies = []
            for prompt in sets[set_name]:
                replies.append(
                    generate(
                        target.model,
                        [prompt],
                        max_new_tokens=1 if side.startswith("prefill only") else args.new_tokens,
                        temperature=0,
                        stop_token_ids=stops,
                        draft=drafters[side],
                        num_draft_tokens=k,
                        compile=compiled,
                    )[0]
                )
            out[set_name][side] = replies

        return run

    def hf_run(set_name: str, side: str):
        def run() -> None:  # runs after plain's warm-up, which fixes each reply's length
            plain = out[set_name]["plain"]
            cfg = target.model.config
            ns = [1 if side.endswith("prefill") else len(r) for r in plain]
            out[set_name][side] = [
                hf_generate(hf, torch.tensor([p]), n, cfg, eos_stops=True)[0]
                for p, n in zip(sets[set_name], ns)
            ]

        return run

    report = {}
    for set_name in sets:
        out[set_name] = {}
        fns = {side: fn(set_name, side) for side in drafters}
        if hf is not None:
            fns["transformers"] = hf_run(set_name, "transformers")
            fns["transformers prefill"] = hf_run(set_name, "transformers prefill")
        t0 = time.perf_counter()
        times = alternate(fns, 1, args.repeats, "cpu")
        plain = [list(r) for r in out[set_name]["plain"]]
        tokens = sum(len(r) for r in plain)
        decoded = tokens - len(plain)  # after each prompt's first token (the prefill's)
        prefill = times.pop("prefill only")
        prefill_compiled = times.pop("prefill only compiled", prefill)
        references = {}  # side: (seconds per call, seconds per prefill-only call)
        if hf is not None:
            references["transformers"] = (
                times.pop("transformers"),
                times.pop("transformers prefill"),
            )
        for dtype, path in ggufs.items():  # in its own process, after the torch sides
            side = f"llama.cpp {dtype}"
            t, out[set_name][side] = run_llamacpp(
                path, sets[set_name], [len(r) for r in plain], args, prefill=True
            )
            references[side] = (t["llama.cpp"], t["prefill only"])
        sides = {}
        for side, t in times.items():
            replies = out[set_name][side]
            own_prefill = prefill_compiled if side.endswith("compiled") else prefill
            stats = [r.speculation for r in replies if r.speculation is not None]
            drafted = sum(s.drafted for s in stats)
            row_rounds = sum(s.row_rounds for s in stats)
            sides[side] = {
                "tokens_per_s": tokens / min(t),
                "median_tokens_per_s": tokens / statistics.median(t),
                "best_ms": min(t) * 1e3,
                "decode_tokens_per_s": decode_rate(decoded, t, own_prefill),
                "same_as_plain": [list(r) for r in replies] == plain,
                "acceptance_rate": sum(s.accepted for s in stats) / drafted if drafted else None,
                "tokens_per_target_forward": (
                    sum(s.tokens for s in stats) / row_rounds if row_rounds else None
                ),
            }
        for side in sides:
            sides[side]["vs_plain"] = sides[side]["tokens_per_s"] / sides["plain"]["tokens_per_s"]
            sides[side]["decode_vs_plain"] = (
                sides[side]["decode_tokens_per_s"] / sides["plain"]["decode_tokens_per_s"]
            )
        refs = {}
        for ref, (t, t_prefill) in references.items():
            replies = [list(r) for r in out[set_name][ref]]
            refs[ref] = {
                "tokens_per_s": tokens / min(t),
                "median_tokens_per_s": tokens / statistics.median(t),
                "best_ms": min(t) * 1e3,
                "prefill_best_ms": min(t_prefill) * 1e3,
                "decode_tokens_per_s": decode_rate(decoded, t, t_prefill),
                "replies_same_as_plain": sum(a == b for a, b in zip(replies, plain)),
            }
            for side in sides:
                for rate, key in (("tokens_per_s", "vs"), ("decode_tokens_per_s", "decode vs")):
                    sides[side][f"{key} {ref}"] = sides[side][rate] / refs[ref][rate]
        report[set_name] = {
            "prompts": len(sets[set_name]),
            "prefill_best_ms": min(prefill) * 1e3,
            "prefill_compiled_best_ms": min(prefill_compiled) * 1e3,
            "mean_prompt_tokens": statistics.mean(len(p) for p in sets[set_name]),
            "reply_tokens": tokens,
            "sides": sides,
            "references": refs,
            "wall_s": time.perf_counter() - t0,
        }
        print(f"  {set_name}: {report[set_name]['wall_s']:.0f} s", file=sys.stderr)
    tmp.cleanup()
    return {
        "target": f"{args.spec_target} ({target.model.num_parameters() / 1e6:.2f}M)",
        "draft": draft_text,
        "sets": report,
    }


def spec_table(report: dict) -> str:
    refs = next(iter(report["sets"].values()))["references"]
    rows = [["set", "side", "tok/s", "median", "vs plain", "decode tok/s", "vs plain"]]
    rows[0] += ["accepted", "tok/fwd", "same"]
    rows[0] += [f"{key} {ref}" for ref in refs for key in ("vs", "decode vs")]
    for set_name, r in report["sets"].items():
        name = f"{set_name} ({r['prompts']} x ~{r['mean_prompt_tokens']:.0f} tok)"
        for side, s in r["sides"].items():
            acc, tpf = s["acceptance_rate"], s["tokens_per_target_forward"]
            rows.append(
                [
                    name,
                    side,
                    f"{s['tokens_per_s']:.0f}",
                    f"{s['median_tokens_per_s']:.0f}",
                    f"{s['vs_plain']:.2f}x",
                    f"{s['decode_tokens_per_s']:.0f}",
                    f"{s['decode_vs_plain']:.2f}x",
                    "-" if acc is None else f"{acc:.0%}",
                    "-" if tpf is None else f"{tpf:.2f}",
                    "yes" if s["same_as_plain"] else "NO",
                    *[f"{s[f'{key} {ref}']:.2f}x" for ref in refs for key in ("vs", "decode vs")],
                ]
            )
        for ref, s in r["references"].items():
            same = f"{s['replies_same_as_plain']}/{r['prompts']}"
            rows.append([name, ref, f"{s['tokens_per_s']:.0f}", f"{s['median_tokens_per_s']:.0f}"])
            rows[-1] += ["-", f"{s['decode_tokens_per_s']:.0f}", "-", "-", "-", same]
            rows[-1] += ["-" for _ in refs for _ in range(2)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main_speculative(args, llama_cpp: str | None) -> dict:
    import transformers  # noqa: F401  (meta() reports its version)

    if args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.with_name("decode_speculative.json")
    report = {"meta": meta(args, llama_cpp), **bench_speculative(args, llama_cpp)}
    report["meta"]["loadavg_end"] = os.getloadavg()
    report["meta"]["weights"] = (
        "trained checkpoints, fp32; GGUF f32 and f16; llama.cpp KV cache f16 (default)"
    )
    report["meta"].pop("prompt_len")
    m = report["meta"]
    print(
        f"speculative greedy decode, batch 1, up to {args.new_tokens} new tokens (eos stops), "
        f"best of {args.repeats}; target {report['target']}, draft {report['draft']}; "
        f"{m['device_name']}, {args.threads} threads; torch {m['torch']}, transformers "
        f"{m['transformers']}, llama-cpp-python {m['llama_cpp_python']}; 1-min load average "
        f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
    )
    print(spec_table(report))
    for set_name, r in report["sets"].items():
        print(
            f"{set_name}: prefill only {r['prefill_best_ms']:.0f} ms eager, "
            f"{r['prefill_compiled_best_ms']:.0f} ms compiled (a timed call, all prompts)"
        )
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return report


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.llamacpp_worker:
        llamacpp_worker(args)
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    llama_cpp = None if args.skip_llamacpp else llama_cpp_version()
    if llama_cpp is None and not args.skip_llamacpp:
        print("llama-cpp-python is not installed: llama.cpp columns skipped", file=sys.stderr)
    if args.spec_target is not None:
        return main_speculative(args, llama_cpp)
    report = {"meta": meta(args, llama_cpp), "presets": {}}
    for name in args.presets:
        report["presets"][name] = bench_preset(name, args, llama_cpp)
    report["meta"]["loadavg_end"] = os.getloadavg()
    m = report["meta"]
    print(
        f"greedy decode, batch 1, prompt {args.prompt_len} + {args.new_tokens} new tokens, best of "
        f"{args.repeats}; {m['device_name']}, {args.threads} threads; torch {m['torch']}, "
        f"transformers {m['transformers']}, llama-cpp-python {m['llama_cpp_python']}; 1-min load "
        f"average {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
    )
    print(table(report))
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
