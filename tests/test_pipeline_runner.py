"""The pipeline's stage runner on toy stages (no training): which stages run, which are
reused, which resume, and what the record on disk says."""

import json
from dataclasses import replace

import pytest

from minimind.pipeline.recipe import Recipe
from minimind.pipeline.runner import STATE_FILE, Runner, Step


class Toy:
    """Stages that write one file each and count their calls."""

    def __init__(self, workdir):
        self.workdir, self.calls, self.resumed = workdir, [], {}
        self.resuming = False  # set by the runner before each stage

    def make(self, name):
        def fn(context):
            self.calls.append(name)
            self.resumed[name] = context.resuming
            (self.workdir / name).mkdir(exist_ok=True)
            (self.workdir / name / "out.txt").write_text(name)
            return {"artifacts": {"out": f"{name}/out.txt"}, "metrics": [{"name": name}]}

        return fn


def steps(toy):
    # corpus -> tokenizer -> pretrain -> sft -> (lora | dpo -> grpo)
    graph = {
        "corpus": (),
        "tokenizer": ("corpus",),
        "pretrain": ("tokenizer",),
        "sft": ("pretrain",),
        "lora": ("sft",),
        "dpo": ("sft",),
        "grpo": ("dpo",),
    }
    return [Step(n, n.upper(), toy.make(n), after, (n,)) for n, after in graph.items()]


def run(tmp_path, recipe=None, **kw):
    toy = Toy(tmp_path)
    runner = Runner(tmp_path, steps(toy), recipe or Recipe(), **kw)
    results = runner.run(toy)
    return toy, {r["name"]: r["status"] for r in results}, runner


def test_a_first_run_runs_everything_and_a_second_reuses_it(tmp_path):
    toy, status, _ = run(tmp_path)
    assert toy.calls == ["corpus", "tokenizer", "pretrain", "sft", "lora", "dpo", "grpo"]
    assert set(status.values()) == {"done"}
    toy, status, _ = run(tmp_path)
    assert toy.calls == [] and set(status.values()) == {"reused"}
    record = json.loads((tmp_path / STATE_FILE).read_text())
    assert record["stages"]["grpo"]["result"]["metrics"] == [{"name": "grpo"}]


def test_a_recipe_field_reruns_its_stage_and_what_reads_it(tmp_path):
    run(tmp_path)
    toy, _, _ = run(tmp_path, replace(Recipe(), dpo_lr=1e-4))
    assert toy.calls == ["dpo", "grpo"]  # lora reads sft, not dpo: reused
    toy, _, _ = run(tmp_path, replace(Recipe(), dpo_lr=1e-4, vocab_size=4096))
    assert toy.calls == ["tokenizer", "pretrain", "sft", "lora", "dpo", "grpo"]
    toy, _, _ = run(tmp_path, replace(Recipe(), dpo_lr=1e-4, vocab_size=4096), seed=1)
    assert len(toy.calls) == 7  # the seed feeds every stage


def test_from_reruns_a_stage_and_every_later_one_until_stops(tmp_path):
    run(tmp_path)
    toy, status, _ = run(tmp_path, start_from="lora")
    assert toy.calls == ["lora", "dpo", "grpo"]
    toy, status, _ = run(tmp_path, start_from="pretrain", until="sft")
    assert toy.calls == ["pretrain", "sft"]
    assert [n for n, s in status.items() if s == "skipped"] == ["lora", "dpo", "grpo"]
    # the skipped stages keep their records, and are no longer current: the SFT model they
    # read was made again
    toy, status, _ = run(tmp_path)
    assert toy.calls == ["lora", "dpo", "grpo"]
    with pytest.raises(SystemExit, match="no such stage"):
        run(tmp_path, start_from="nope")
    with pytest.raises(SystemExit, match="comes before"):
        run(tmp_path, start_from="sft", until="pretrain")


def test_an_unfinished_stage_resumes_and_a_missing_artifact_reruns(tmp_path):
    run(tmp_path)
    record = json.loads((tmp_path / STATE_FILE).read_text())
    dpo = record["stages"]["dpo"]  # as a kill during DPO leaves it
    record["stages"]["dpo"] = {"key": dpo["key"], "inputs": dpo["inputs"], "status": "started"}
    (tmp_path / STATE_FILE).write_text(json.dumps(record))
    (tmp_path / "dpo" / "keep.txt").write_text("a step checkpoint")
    toy, _, _ = run(tmp_path)
    assert toy.calls == ["dpo", "grpo"]
    assert toy.resumed == {"dpo": True, "grpo": False}
    assert (tmp_path / "dpo" / "keep.txt").exists()  # resuming keeps the stage's folder
    (tmp_path / "sft" / "out.txt").unlink()
    toy, _, _ = run(tmp_path)
    assert toy.calls == ["sft", "lora", "dpo", "grpo"]
    assert not (tmp_path / "dpo" / "keep.txt").exists()  # a fresh rerun starts empty


def test_an_unreadable_record_means_running_again(tmp_path, capsys):
    run(tmp_path)
    (tmp_path / STATE_FILE).write_text("{ half a file")
    toy, _, _ = run(tmp_path)
    assert len(toy.calls) == 7 and "unreadable" in capsys.readouterr().out
