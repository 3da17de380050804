"""The report card's content: the stages' entries, the quality goals, the environment.

Owns `build_card` (the dict that minimind.pipeline.report renders: its schema is documented
there) and `GOALS`, issue 12's quality goals, each computed from the stages' measured rows:
a goal whose stage did not run is reported as not measured, never as met.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

BUDGET_S = 600.0  # the demo's budget on this project's 2-core CPU


def _row(stages: dict, stage: str, name: str) -> dict | None:
    for m in stages.get(stage, {}).get("metrics", []):
        if m["name"] == name:
            return m
    return None


def _after(stages, stage, name):
    row = _row(stages, stage, name)
    return None if row is None else row.get("after")


def _goal(name, target, value, ok, detail, metric=None):
    """A goal; `metric` ("stage/metric name") marks its level on that metric's bar."""
    out = {"name": name, "target": target, "value": value, "met": ok, "detail": detail}
    if metric:
        out["metric"] = metric
    return out


def goals(stages: dict, total_s: float | None, budget_s: float | None) -> list[dict]:
    """Issue 12's quality goals from the measured rows."""
    out = []
    facts, arith = _after(stages, "sft", "facts"), _after(stages, "sft", "arith")
    out.append(_goal("facts after SFT (held-out phrasings)", ">= 80%", facts,
                     None if facts is None else facts >= 0.8, "greedy, eval_facts.jsonl", "sft/facts"))  # fmt: skip
    out.append(_goal("arithmetic after SFT (held-out operand pairs)", ">= 60%", arith,
                     None if arith is None else arith >= 0.6, "greedy, eval_arith.jsonl", "sft/arith"))  # fmt: skip
    held = _after(stages, "grpo", "arith")
    rl, rl_sft = _after(stages, "grpo", "arith_rl"), _after(stages, "sft", "arith_rl")
    gain = None if held is None or arith is None else held - arith
    detail = "held-out operand pairs, GRPO model minus SFT model"
    if rl is not None and rl_sft is not None:
        detail += (
            f"; on the RL operand pairs (what GRPO practises; no SFT text solves them) "
            f"{100 * rl_sft:.1f}% (SFT) -> {100 * rl:.1f}% ({100 * (rl - rl_sft):+.1f} points)"
        )
    out.append(_goal("GRPO raises arithmetic over SFT", ">= +10 points", gain,
                     None if gain is None else gain >= 0.10, detail))  # fmt: skip
    pref = _after(stages, "dpo", "dpo")
    out.append(_goal("DPO preference accuracy (held-out pairs)", ">= 90%", pref,
                     None if pref is None else pref >= 0.9, "higher summed log-prob on chosen",
                     "dpo/dpo"))  # fmt: skip
    loss = _row(stages, "dpo", "sft_loss")
    rise = None
    if loss is not None and loss["before"] and loss["after"] is not None:
        rise = loss["after"] / loss["before"] - 1
    out.append(_goal("DPO keeps the held-out SFT loss", "<= 10% above SFT's", rise,
                     None if rise is None else rise <= 0.10,
                     "mean token loss on SFT's held-out conversations (issue 10)"))  # fmt: skip
    ce = _row(stages, "distill", "held_out_ce")
    ok = None
    if ce is not None and ce["before"] is not None and ce["after"] is not None:
        ok = ce["after"] < ce["before"]
    out.append(_goal(
        "distilled student beats the same student without the teacher",
        "lower held-out CE",
        None if ce is None else ce["after"],
        ok,
        "" if ce is None or ce["before"] is None else f"labels alone {ce['before']:.4f}",
    ))  # fmt: skip
    out[-1]["unit"] = "loss"
    fmt = _after(stages, "reason", "format_rate")
    out.append(_goal("reasoning format after reasoning distillation", ">= 90%", fmt,
                     None if fmt is None else fmt >= 0.9, "held-out reasoning prompts, greedy",
                     "reason/format_rate"))  # fmt: skip
    if budget_s:
        reused = [n for n, r in stages.items() if r.get("status") == "reused"]
        detail = "this run, on this machine"
        if reused:  # the time the whole pipeline took: each stage's own recorded time
            total_s = sum(r.get("wall_s") or 0.0 for r in stages.values())
            detail = f"sum of the stages' times ({', '.join(reused)} from an earlier run)"
        out.append(_goal("whole pipeline wall time", f"<= {budget_s:.0f} s", total_s,
                         None if total_s is None else total_s <= budget_s, detail))  # fmt: skip
        out[-1]["unit"] = "seconds"
    return out


def environment(data_hash: str | None) -> dict:
    import torch

    libraries = {}
    for name in ("numpy", "tokenizers", "safetensors", "transformers", "gguf", "matplotlib"):
        try:
            libraries[name] = __import__(name).__version__
        except Exception:  # not installed: left out
            continue
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    import os

    hardware = (
        f"{platform.machine()} {_cpu_name() or platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, device {device}"
    )
    return {
        "git_commit": _git_commit(),
        "data_hash": data_hash or "",
        "hardware": hardware,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "libraries": libraries,
    }


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out + ("+local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_card(
    results: list[dict],
    recipe,
    *,
    workdir: Path,
    seed: int,
    total_s: float,
    budget_s: float | None,
    limits: dict,
) -> dict:
    stages = {r["name"]: r for r in results}
    data_hash = stages.get("corpus", {}).get("data_hash")
    params = stages.get("pretrain", {}).get("parameters")
    config = {**asdict(recipe), "seed": seed, **{k: v for k, v in limits.items() if v is not None}}
    if params:
        config["parameters"] = params
    samples = [s for r in results for s in r.get("samples", [])]
    entries = []
    for r in results:
        entry = {k: v for k, v in r.items() if k not in ("samples", "data_hash", "parameters")}
        entry.setdefault("metrics", [])
        entry.setdefault("curves", {})
        entry.setdefault("artifacts", {})
        entry.setdefault("notes", [])
        entry.setdefault("reason", None)
        for key in ("wall_s", "tokens", "tokens_per_s", "steps"):
            entry.setdefault(key, None)
        entries.append(entry)
    ckpt = stages.get("grpo", {}).get("artifacts", {}).get("checkpoint")
    reason = stages.get("reason", {}).get("artifacts", {}).get("checkpoint")
    lora = stages.get("lora", {}).get("artifacts", {}).get("checkpoint")
    nxt = []
    if ckpt:
        path = workdir / ckpt
        nxt += [
            f"minimind chat --load_from {path}",
            f"minimind serve --load_from {path}   (OpenAI API on 127.0.0.1:8998)",
            f"minimind web --load_from {path}",
        ]
    if reason:
        nxt.append(f"minimind chat --load_from {workdir / reason} --enable_thinking 1")
    if lora:
        nxt.append(f"minimind chat --load_from {workdir / lora}   (the LoRA identity, merged)")
    exports = stages.get("export", {}).get("artifacts", {})
    if "transformers" in exports and "lm_eval_tasks" in exports:
        nxt.append(
            f"lm_eval --model hf --model_args pretrained={workdir / exports['transformers']} "
            f"--include_path {workdir / exports['lm_eval_tasks']} --tasks minimind"
        )
    if ckpt:
        nxt.append(f"minimind eval {workdir / ckpt} --data {workdir / 'dataset'}")
    return {
        "title": "MiniMind pipeline report card",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workdir": str(workdir),
        "total_wall_s": total_s,
        "budget_s": budget_s,
        "environment": environment(data_hash),
        "config": config,
        "stages": entries,
        "goals": goals(stages, total_s, budget_s),
        "samples": samples,
        "next": nxt,
    }
