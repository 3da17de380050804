"""The one-shot GPU check (issue 13, section 3): everything that only a CUDA device can run, in
one call of a few minutes, ending in one table.

Parts (each a child process with its own time limit; `--parts` picks some):
- tests: the CUDA-marked tests (tests/test_cuda.py: CPU/GPU logits, compiled decode, resume
  bit-exact on GPU) and the GPU-capable ones of the suite's model tests;
- pipeline: the reduced pipeline (tiny preset, 20 steps a stage) on the GPU, every stage's
  CUDA path (bf16 autocast everywhere, rollouts, exports);
- train: bench/train.py on CUDA, bf16 + torch.compile: tokens/s and MFU of minimind2 (104M) and
  minimind2-small (goal: >= 40% MFU for 104M on an H100/H200-class GPU);
- decode: greedy decode tokens/s of minimind2 at batch 1 and 32, eager and compiled
  (`generate(compile=True)`: the static-cache CUDA-graph-friendly path), 128 new tokens;
- serve: bench/serve.py on CUDA at 1 and 64 clients.

Without a CUDA device it prints that no GPU is present and exits 0 having run nothing (tested).
Writes JSON (default bench/results/gpu.json) and the children's logs beside it.

    python bench/gpu.py --budget 900    # everything, about 15 minutes on an H200
    python bench/gpu.py --parts tests,train --budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("tests", "pipeline", "train", "decode", "serve")
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated, of: " + ", ".join(PARTS)
    )
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path")
    p.add_argument(
        "--work", type=Path, default=None, help="logs and scratch (default: beside --out, gpu/)"
    )
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    return args


def child(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run `cmd` from the repo root with the package importable; its output into `log`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace").splitlines()[-12:]
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": log.name, "tail": tail}


def part_tests(out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "tests/test_cuda.py", "tests/test_model.py", "tests/test_generate.py", "-x"]  # fmt: skip
    return child(cmd, out / "tests.log", timeout)


def part_pipeline(out: Path, timeout: float) -> dict:
    work = out / "pipeline"
    cmd = [sys.executable, "-m", "minimind.cli", "pipeline", "--workdir", str(work),
           "--preset", "tiny", "--size-mb", "0.3", "--vocab-size", "600", "--pretrain-epochs",
           "1", "--sft-epochs", "1", "--grpo-steps", "4", "--grpo-prompts", "4",
           "--student-hidden", "32", "--student-heads", "2", "--max-steps", "20",
           "--eval-limit", "4"]  # fmt: skip
    result = child(cmd, out / "pipeline.log", timeout)
    card = work / "report" / "report.json"
    if card.is_file():
        report = json.loads(card.read_text())
        result["stages"] = {s["name"]: s["status"] for s in report["stages"]}
        result["device"] = report["environment"]["hardware"]
    return result


def part_train(out: Path, timeout: float) -> dict:
    js = out / "train.json"
    cmd = [sys.executable, "bench/train.py", "--device", "cuda", "--presets",
           "minimind2,minimind2-small", "--dtypes", "bf16", "--steps", "10", "--out", str(js)]  # fmt: skip
    result = child(cmd, out / "train.log", timeout)
    if js.is_file():
        result["report"] = json.loads(js.read_text())
    return result


def part_decode(out: Path, timeout: float) -> dict:
    js = out / "decode.json"
    cmd = [sys.executable, str(Path(__file__)), "--decode-worker", str(js)]
    result = child(cmd, out / "decode.log", timeout)
    if js.is_file():
        result["report"] = json.loads(js.read_text())
    return result


def decode_worker(path: Path) -> None:
    """minimind2 (random weights), bf16, greedy, forced to 128 new tokens: tokens/s at batch
    1 and 32, eager and compiled (the best of 3 timed calls after 2 warm-ups)."""
    import torch

    from minimind.infer import generate
    from minimind.model import MiniMindForCausalLM, preset

    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset("minimind2")).cuda().to(torch.bfloat16).eval()
    rows = {}
    for batch in (1, 32):
        prompts = torch.randint(10, 6000, (batch, 32)).tolist()
        for compiled in (False, True):

            def call(prompts=prompts, compiled=compiled):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs = generate(model, prompts, max_new_tokens=128, temperature=0.0,
                                min_new_tokens=128, compile=compiled)  # fmt: skip
                torch.cuda.synchronize()
                return time.perf_counter() - t0, sum(len(o) for o in outs)

            for _ in range(2):
                call()
            runs = [call() for _ in range(3)]
            seconds, tokens = min(runs)
            rows[f"batch {batch}, {'compiled' if compiled else 'eager'}"] = {
                "tokens_per_s": tokens / seconds,
                "seconds": seconds,
                "tokens": tokens,
            }
            print(json.dumps({batch: rows}), flush=True)
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


def part_serve(out: Path, timeout: float) -> dict:
    js = out / "serve.json"
    cmd = [sys.executable, "bench/serve.py", "--device", "cuda", "--preset", "minimind2-small",
           "--clients", "1,64", "--rounds", "2", "--repeats", "1", "--max-rows", "64",
           "--out", str(js)]  # fmt: skip
    result = child(cmd, out / "serve.log", timeout)
    if js.is_file():
        result["report"] = json.loads(js.read_text())
    return result


RUNNERS = {  # part -> (runner, its share of the budget; train needs about 8 minutes alone)
    "tests": (part_tests, 0.1),
    "pipeline": (part_pipeline, 0.1),
    "train": (part_train, 0.55),
    "decode": (part_decode, 0.1),
    "serve": (part_serve, 0.15),
}


def table(report: dict) -> str:
    lines = [f"GPU check on {report['device']} ({report['seconds']:.0f} s)", ""]
    lines.append(f"{'part':<9} {'rc':>7} {'seconds':>8}  result")
    for name, r in report["parts"].items():
        lines.append(f"{name:<9} {r['rc']!s:>7} {r['seconds']:>8.1f}  {summary(name, r)}")
    return "\n".join(lines)


def summary(name: str, r: dict) -> str:
    if name in ("tests", "pipeline") or "report" not in r:
        extra = ""
        if name == "pipeline" and "stages" in r:
            done = [k for k, v in r["stages"].items() if v == "done"]
            extra = f"{len(done)}/{len(r['stages'])} stages done; "
        return extra + (r["tail"][-1] if r["tail"] else "")
    rep = r["report"]
    if name == "decode":
        return "; ".join(f"{k}: {v['tokens_per_s']:,.0f} tok/s" for k, v in rep["rows"].items())
    if name == "train":
        return "; ".join(
            f"{c['preset']} {c['mode']}: {c['ours']['positions_per_s']:,.0f} tok/s, "
            f"MFU {c['ours'].get('mfu', 0):.1%}"
            for c in rep.get("pretrain", [])
        )
    return " | ".join(r["tail"][-4:])


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--decode-worker":
        decode_worker(Path(argv[1]))
        return 0
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check ran nothing (run it where a GPU is present)")
        return 0
    out = args.work or args.out.parent / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "parts": {}}
    for i, name in enumerate(args.parts):
        fn, share = RUNNERS[name]
        # this part's share of what is left: time a part does not use passes to the next ones
        left = args.budget - (time.perf_counter() - t0)
        weight = sum(RUNNERS[p][1] for p in args.parts[i:])
        timeout = max(30.0, left * share / weight)
        print(f"== {name} (at most {timeout:.0f} s)", flush=True)
        report["parts"][name] = fn(out, timeout)
        print(
            f"   rc {report['parts'][name]['rc']}, {report['parts'][name]['seconds']} s", flush=True
        )
        report["seconds"] = time.perf_counter() - t0
        args.out.write_text(json.dumps(report, indent=1, default=str))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
