"""bench/serve.py runs end to end at toy size (real server process, real streaming clients)
and writes the JSON it promises (no speed is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


def test_quick_serve_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"date", "cpu", "preset", "params", "tokens_per_request"} <= set(report["meta"])
    assert [lv["clients"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        # every request got exactly its forced token count, streamed
        assert lv["tokens"] == lv["requests"] * report["meta"]["tokens_per_request"]
        assert lv["tokens_per_s"] > 0 and lv["engine_tokens_per_s"] > 0
        assert 0 < lv["ttft_p50_ms"] <= lv["ttft_p99_ms"]
    assert report["levels"][1]["rows_per_step"] > 1  # the 4 streams shared decoding steps
    assert "agg tok/s" in proc.stdout


def test_quick_mixed_load_benchmark_writes_its_report(tmp_path):
    # --mixed --quick: the three servers, both parts, every figure present (no speed checked)
    out = tmp_path / "mixed.json"
    cmd = [sys.executable, str(BENCH), "--mixed", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mixed = json.loads(out.read_text())["mixed"]
    assert set(mixed["itl"]) == {"whole", "chunked"} and mixed["chunk"] == 64
    for side in mixed["itl_trials"].values():
        for trial in side:
            assert trial["gaps_before"] > 0 and trial["gaps_during"] > 0
            assert 0 < trial["before_p50_ms"] <= trial["before_p99_ms"]
    assert set(mixed["ttft"]) == {"unshared", "chunked"}
    assert all(v["n1_ms"] > 0 and v["n8_ms"] > 0 for v in mixed["ttft"].values())
    assert "p99 during/before" in proc.stdout and "n=8 / n=1" in proc.stdout
