"""bench/model.py and bench/decode.py run end to end at toy size and write the JSON they promise
(no speeds checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "model.py"


def test_quick_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "model.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--skip-compile", "--device", "cpu", "--profile"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"date", "device", "device_name", "torch", "transformers", "dims"} <= set(report["meta"])
    assert set(report["train"]) == set(report["train_sft"]) == {"eager/fp32", "eager/bf16"}
    for case in report["train_sft"].values():  # each model's own loss: the same number
        assert case["loss_abs_diff"] < 1e-4
    for case in [*report["train"].values(), *report["train_sft"].values()]:
        for split in case["breakdown_ms"].values():
            assert set(split) == {"gemm", "attention", "other"} and split["gemm"] > 0
    assert set(report["decode"]) == {"batch1", "batch8"}
    for case in [
        *report["train"].values(),
        *report["train_sft"].values(),
        *report["decode"].values(),
    ]:
        assert {"ours", "hf", "speedup", "mem_ratio"} <= set(case)
        for side in (case["ours"], case["hf"]):
            assert side["tokens_per_s"] > 0
            assert {"median_tokens_per_s", "best_ms", "peak_mem_mib"} <= set(side)
    # Same weights, both greedy: the two implementations agree token for token.
    assert report["decode"]["batch1"]["same_tokens_rows"] == 1.0
    assert "ours/HF" in proc.stdout


def test_quick_decode_benchmark_writes_its_report(tmp_path):
    """bench/decode.py at toy size; the llama.cpp sides (own child processes) when installed."""
    from importlib.util import find_spec

    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(BENCH.with_name("decode.py")), "--quick", "--no-compile"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sides = json.loads(out.read_text())["presets"]["tiny"]["sides"]
    expected = {"ours", "hf"}
    if find_spec("llama_cpp") is not None:
        expected |= {"llama.cpp f32", "llama.cpp f16"}
    assert set(sides) == expected
    # Same weights, greedy, fp32: transformers (and llama.cpp on the f32 export) agree with ours.
    assert sides["hf"]["same_leading_tokens_as_ours"] == 8
    if "llama.cpp f32" in sides:
        assert sides["llama.cpp f32"]["same_leading_tokens_as_ours"] == 8


@pytest.mark.slow
def test_spec_parts_benchmark_writes_its_report(tmp_path):
    """bench/spec_parts.py on random tiny models: every part timed, through the compiled graphs."""
    out = tmp_path / "parts.json"
    cmd = [sys.executable, str(BENCH.with_name("spec_parts.py")), "--target-preset", "tiny"]
    cmd += ["--draft-preset", "tiny", "--ks", "1", "2", "--calls", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    names = {"target step", "verify 2 columns", "verify 3 columns", "draft step"}
    assert set(parts) == names | {"round k=1", "round k=2"}
    assert all(p["best_ms"] > 0 and p["median_ms"] >= p["best_ms"] for p in parts.values())
    assert parts["target step"]["vs_step"] == 1.0
    for argv, says in (([], "give one of --target"), ([*cmd[2:4], "--ks", "0"], "at least 1")):
        bad = subprocess.run([*cmd[:2], *argv], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr


def test_gpu_check_on_a_cpu_machine(tmp_path):
    """bench/gpu.py where no GPU is present: says so, exits 0, runs and writes nothing; an
    unknown part is refused naming the parts. Its plumbing runs here for real: a part's child
    process keeps its exit status and last lines, one past its time limit is reported as a
    timeout, and the table has a line for each."""
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu.py would run its parts (minutes)")
    path = BENCH.with_name("gpu.py")
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(path), "--out", str(out), "--parts", "tests,decode"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout
    assert not out.exists() and not (tmp_path / "gpu").exists()
    bad = subprocess.run([*cmd[:4], "--parts", "tests,warp"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown part(s) warp" in bad.stderr and "serve" in bad.stderr, bad.stderr

    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    failed = [sys.executable, "-c", "print('first'); print('last'); raise SystemExit(3)"]
    parts = {
        "tests": gpu.child(failed, tmp_path / "tests.log", timeout=60),
        "serve": gpu.child(
            [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "serve.log", 1
        ),
    }
    assert parts["tests"]["rc"] == 3 and parts["tests"]["tail"] == ["first", "last"]
    assert parts["serve"]["rc"] == "timeout" and parts["serve"]["seconds"] < 20
    lines = gpu.table({"device": "none", "seconds": 2.0, "parts": parts}).splitlines()
    assert lines[-2].split()[:2] == ["tests", "3"] and lines[-2].endswith("last")
    assert lines[-1].split()[:2] == ["serve", "timeout"]
