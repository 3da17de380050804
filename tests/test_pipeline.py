"""The demo pipeline end to end (the README's first command), on a small corpus."""

import json

import pytest

from minimind.pipeline import Recipe, main, run

TASKS = ("eval_facts_trained", "eval_facts", "eval_arith_trained", "eval_arith")


def logged_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text("utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(tmp_path, capsys):
    recipe = Recipe(size_mb=0.3, vocab_size=600)
    result = run(tmp_path, recipe=recipe, max_steps=100, eval_limit=8)
    assert result["hf_max_abs_diff"] < 1e-4
    assert result["chars_per_token"] > 1.2  # BPE merges beat one byte per token
    assert (tmp_path / "out" / "full_sft_192" / "model.safetensors").is_file()
    # Both stages learn: the loss falls from the first logged values (steps 25, 50) to the last
    # (75, 100); pairs, because one batch of 8 rows is a noisy sample.
    for stage in ("pretrain", "sft"):
        losses = logged_losses(tmp_path / "checkpoints" / stage)
        assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]), (stage, losses)
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "all files valid" in out
    # Every task is scored and printed with its chance level (8 questions each here).
    for task in TASKS:
        acc, chance = result[f"{task}_accuracy"], result[f"{task}_chance"]
        assert acc * 8 == round(acc * 8) and 0 < chance < 0.5
        assert f"{task} " in out and f"chance {100 * chance:.1f}%" in out


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--pretrain-batch" in out and "--split-digits" in out
