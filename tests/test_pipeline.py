"""The pipeline end to end (the README's first command), reduced: a small corpus, few steps.

One run (module fixture) is checked for its artifacts (every checkpoint, the tokenizer, the
exports, the report card and its plots load), for learning (pretraining and SFT losses fall)
and for a report whose numbers are report.json's. Then reruns: an unchanged rerun reuses every
stage, `--from` reruns a stage and what follows it, a recipe change reruns only the stages it
feeds, and a run killed mid-stage resumes that stage from its step checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minimind.pipeline import Recipe, main, run
from minimind.pipeline.report import parse_cell, read_tables

pytestmark = pytest.mark.timeout(600)  # the module fixture runs the reduced pipeline

SMOKE = Recipe(
    preset="tiny",
    size_mb=0.3,
    vocab_size=600,
    pretrain_epochs=1,
    sft_epochs=1,
    grpo_steps=4,
    grpo_prompts=4,
    student_hidden=32,
    student_heads=2,
)
LIMITS = {"max_steps": 20, "eval_limit": 4}
STAGES = [
    "corpus",
    "tokenizer",
    "shards",
    "pretrain",
    "sft",
    "lora",
    "dpo",
    "grpo",
    "reason",
    "distill",
    "export",
    "chat",
]


def logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text("utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    card = run(workdir, recipe=SMOKE, **LIMITS)
    return workdir, card


@pytest.mark.slow
def test_every_stage_ran_and_every_artifact_loads(demo):
    from minimind.checkpoint import load_checkpoint
    from minimind.tokenizer import load_tokenizer

    workdir, card = demo
    assert [s["name"] for s in card["stages"]] == list(STAGES)
    assert {s["status"] for s in card["stages"]} == {"done"}
    tokenizer = load_tokenizer(workdir / "tokenizer")
    probe = torch.tensor([tokenizer.encode("Mira lives in Stonebridge.")])
    for stage in card["stages"]:
        for label, rel in stage["artifacts"].items():
            path = workdir / rel
            assert path.exists(), (stage["name"], label, path)
            if label in ("checkpoint", "student_sft"):
                model, _ = load_checkpoint(path)
                assert torch.isfinite(model.eval()(probe).logits).all()
    export = {s["name"]: s for s in card["stages"]}["export"]
    diffs = {m["name"]: m["after"] for m in export["metrics"]}
    assert diffs["hf_logits"] < 1e-4 and diffs["gguf_tensors"] == 0.0
    assert diffs["pth_logits"] < 5e-2  # the .pth is fp16
    assert list((workdir / "lm_eval_tasks").glob("*.yaml"))
    for name in ("report.md", "report.json", "report.html", "plots/metrics.png"):
        assert (workdir / "report" / name).stat().st_size > 0, name
    for stage in ("pretrain", "sft", "dpo", "grpo", "reason", "distill"):
        assert (workdir / "report" / "plots" / f"loss_{stage}.png").is_file(), stage


@pytest.mark.slow
def test_pretraining_and_sft_losses_fall(demo):
    # Held-out loss (the same rows every time) from its first evaluation to its last; the
    # training batches of SFT are too unlike each other (grouped by length) to compare two.
    workdir, card = demo
    stages = {s["name"]: s for s in card["stages"]}
    for stage in ("pretrain", "sft"):
        evals = [loss for _, loss in stages[stage]["curves"]["eval"]]
        assert len(evals) >= 4 and evals[-1] < evals[0], (stage, evals)
        losses = logged_losses(workdir / "checkpoints" / stage)
        train = [loss for _, loss in stages[stage]["curves"]["train"]]
        assert len(train) >= 4 and train == losses  # the report's curve is the engine's log
    pretrain = stages["pretrain"]["curves"]["train"]
    assert pretrain[-1][1] < pretrain[0][1]
    loss = {m["name"]: m for m in stages["pretrain"]["metrics"]}["eval_loss"]
    assert loss["after"] < loss["before"]


@pytest.mark.slow
def test_report_numbers_are_report_json(demo):
    workdir, card = demo
    saved = json.loads((workdir / "report" / "report.json").read_text("utf-8"))
    assert saved == json.loads(json.dumps(card))
    tables = read_tables((workdir / "report" / "report.md").read_text("utf-8"))
    goals = next(rows for heading, _, rows in tables if heading == "Goals")
    assert [row[0] for row in goals] == [g["name"] for g in saved["goals"]]
    for row, goal in zip(goals, saved["goals"]):
        if goal["value"] is not None:
            assert parse_cell(row[2]) == pytest.approx(goal["value"], abs=6e-4), goal
    checked = 0
    for stage in saved["stages"]:
        table = [rows for heading, _, rows in tables if heading.endswith(f"({stage['name']})")]
        if not stage["metrics"]:
            continue
        rows = table[0]
        for row, metric in zip(rows, stage["metrics"], strict=True):
            assert row[0] == metric["label"]
            for cell, key in ((row[2], "before"), (row[3], "after")):
                value = parse_cell(cell)
                if metric[key] is None:
                    assert value is None
                else:
                    # as written: accuracies to 0.1 point, losses to 3 decimals, others 3 digits
                    assert value == pytest.approx(metric[key], rel=5e-3, abs=6e-4), (metric, key)
                    checked += 1
    assert checked >= 30


@pytest.mark.slow
def test_reruns_reuse_what_is_unchanged(demo, tmp_path):
    workdir = tmp_path / "again"
    shutil.copytree(demo[0], workdir)
    t0 = time.perf_counter()
    card = run(workdir, recipe=SMOKE, **LIMITS)
    assert {s["status"] for s in card["stages"]} == {"reused"}
    assert time.perf_counter() - t0 < 30
    reused = {s["name"]: s["metrics"] for s in card["stages"]}
    assert reused == {s["name"]: s["metrics"] for s in demo[1]["stages"]}
    # --from reruns that stage and every stage after it
    card = run(workdir, recipe=SMOKE, **LIMITS, start_from="distill")
    status = {s["name"]: s["status"] for s in card["stages"]}
    assert [n for n in STAGES if status[n] == "done"] == ["distill", "export", "chat"]
    # a recipe field reruns the stages it feeds, and only those
    changed = Recipe(**{**SMOKE.__dict__, "grpo_lr": SMOKE.grpo_lr / 2})
    card = run(workdir, recipe=changed, **LIMITS)
    status = {s["name"]: s["status"] for s in card["stages"]}
    assert [n for n in STAGES if status[n] == "done"] == ["grpo", "reason", "export", "chat"]


@pytest.mark.slow
def test_a_killed_run_resumes_the_stage_it_was_in(tmp_path):
    workdir = tmp_path / "killed"
    argv = [
        sys.executable, "-m", "minimind.cli", "demo", "--workdir", str(workdir),
        "--preset", "tiny", "--size-mb", "0.3", "--vocab-size", "600", "--pretrain-epochs", "1",
        "--max-steps", "20", "--eval-limit", "4", "--save-every", "10", "--until", "sft",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = workdir / "checkpoints" / "pretrain"
    deadline = time.time() + 120
    while time.time() < deadline and not list(steps.glob("step_*")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(steps.glob("step_*")), "no step checkpoint within 120 s"
    record = json.loads((workdir / "pipeline.json").read_text("utf-8"))
    assert record["stages"]["pretrain"]["status"] == "started"
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pretraining  (resuming)" in out.stdout and "resumed from" in out.stdout
    assert "demo corpus, written and validated  (reused from the last run)" in out.stdout
    record = json.loads((workdir / "pipeline.json").read_text("utf-8"))
    assert [n for n, s in record["stages"].items() if s["status"] == "done"] == list(STAGES[:5])
    card = json.loads((workdir / "report" / "report.json").read_text("utf-8"))
    skipped = [s for s in card["stages"] if s["status"] == "skipped"]
    assert [s["name"] for s in skipped] == list(STAGES[5:])
    assert all(s["reason"] == "after --until sft" for s in skipped)


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--pretrain-batch" in out and "--from" in out
    assert "--student-hidden" in out and "--lora-rank" in out


def test_from_names_a_stage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--workdir", str(tmp_path), "--from", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
