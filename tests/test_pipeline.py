"""The demo pipeline end to end (the README's first command), on a small corpus."""

import pytest

from minimind.pipeline import main, run


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(tmp_path, capsys):
    result = run(tmp_path, size_mb=0.3, vocab_size=600, max_steps=3, eval_limit=8)
    assert result["hf_max_abs_diff"] < 1e-4
    assert result["chars_per_token"] > 1.2  # BPE merges beat one byte per token
    assert (tmp_path / "out" / "full_sft_192" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "all files valid" in out and "eval_facts" in out
    assert 0 <= result["eval_facts_accuracy"] <= 1


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--workdir" in capsys.readouterr().out
