"""The demo pipeline end to end (the README's first command), on a small corpus."""

import json
import math

import pytest

from minimind.pipeline import Recipe, main, run

TASKS = ("eval_facts_trained", "eval_facts", "eval_arith_trained", "eval_arith")


def logged_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text("utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(tmp_path, capsys):
    recipe = Recipe(size_mb=0.3, vocab_size=600, grpo_steps=6, grpo_prompts=4)
    result = run(tmp_path, recipe=recipe, max_steps=100, eval_limit=8)
    assert result["hf_max_abs_diff"] < 1e-4
    assert result["chars_per_token"] > 1.2  # BPE merges beat one byte per token
    assert (tmp_path / "out" / "full_sft_192" / "model.safetensors").is_file()
    # Both stages learn: every logged loss (steps 25-100) is far below log(vocabulary), the
    # loss of a uniform guess, where an untrained model starts (one batch of 8 rows is too
    # noisy a sample to compare step 25 with step 100).
    for stage in ("pretrain", "sft"):
        losses = logged_losses(tmp_path / "checkpoints" / stage)
        assert len(losses) == 4 and max(losses) < 0.75 * math.log(600), (stage, losses)
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "all files valid" in out
    # Every task is scored and printed with its chance level (8 questions each here).
    for task in TASKS:
        acc, chance = result[f"{task}_accuracy"], result[f"{task}_chance"]
        assert acc * 8 == round(acc * 8) and 0 < chance < 0.5
        assert f"{task} " in out and f"chance {100 * chance:.1f}%" in out
    # DPO and GRPO ran from the SFT model, each measured before and after.
    for key in ("eval_dpo", "eval_strangers", "eval_arith_rl"):
        assert 0 <= result[f"{key}_before_accuracy"] <= 1 and 0 <= result[f"{key}_accuracy"] <= 1
    assert "preference accuracy" in out and "RL pairs" in out
    assert 0 <= result["reason_format_rate"] <= 1 and "think>/<answer> layout" in out
    for stage in ("dpo", "grpo", "reason"):
        assert logged_losses(tmp_path / "checkpoints" / stage), stage
        assert (tmp_path / "out" / f"{stage}_192" / "model.safetensors").is_file()


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--pretrain-batch" in out and "--split-digits" in out
