"""bench/model.py runs end to end at toy size and writes the JSON it promises (no speeds checked)."""

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
    cmd = [sys.executable, str(BENCH), "--quick", "--skip-compile", "--device", "cpu"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"date", "device", "device_name", "torch", "transformers", "dims"} <= set(report["meta"])
    assert set(report["train"]) == {"eager/fp32", "eager/bf16"}
    assert set(report["decode"]) == {"batch1", "batch8"}
    for case in [*report["train"].values(), *report["decode"].values()]:
        assert {"ours", "hf", "speedup", "mem_ratio"} <= set(case)
        for side in (case["ours"], case["hf"]):
            assert side["tokens_per_s"] > 0
            assert {"median_tokens_per_s", "best_ms", "peak_mem_mib"} <= set(side)
    # Same weights, both greedy: the two implementations agree token for token.
    assert report["decode"]["batch1"]["same_tokens_rows"] == 1.0
    assert "ours/HF" in proc.stdout
