"""bench/train.py --quick runs end to end and writes the JSON the report is read from.

Checks the keys and the counting (both sides train on the same rows, so they count the same
useful tokens; packed windows have no pads), never a speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train.py"
RATES = ("useful_tokens_per_s", "real_tokens_per_s", "positions_per_s")
SIDE_KEYS = {
    *RATES,
    "pad_waste",
    "useful_share",
    "median_step_ms",
    "warmup_s",
    "steps",
    "seconds",
    "useful_tokens",
    "positions",
    "mean_padded_len",
}


def test_quick_run_writes_the_report(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours/padded" in proc.stdout and str(out) in proc.stdout

    report = json.loads(out.read_text())
    assert report["complete"] is True
    meta = report["meta"]
    for key in ("date", "command", "device", "cpu", "threads", "torch", "python", "git"):
        assert key in meta
    assert meta["loadavg_start"] and meta["loadavg_end"]
    assert meta["modes"] == ["eager"]  # --quick skips compilation

    assert len(report["sft"]) == len(report["pretrain"]) == len(meta["dtypes"]) > 0
    for case in report["sft"]:
        assert {"preset", "mode", "dtype", "warmup_steps", "speedup", "wall_s"} <= case.keys()
        ours, padded = case["ours"], case["padded"]
        assert ours.keys() >= SIDE_KEYS and padded.keys() >= SIDE_KEYS
        assert "engine_reported_tokens_per_s" in ours and "inside_step_fraction" in ours
        assert ours["steps"] == padded["steps"] == 2
        assert ours["useful_tokens"] == padded["useful_tokens"] > 0  # the same rows
        assert padded["mean_padded_len"] == meta["max_seq_len"]
        assert 0 <= ours["pad_waste"] <= padded["pad_waste"] < 1
        assert case["graphs_compiled_while_timed"] == 0
        assert all(ours[k] > 0 and padded[k] > 0 for k in RATES)
    for case in report["pretrain"]:
        ours = case["ours"]
        assert ours.keys() >= SIDE_KEYS and "padded" not in case
        assert ours["pad_waste"] == 0 and ours["useful_share"] == 1  # packed: every position
        assert ours["useful_tokens_per_s"] > 0
