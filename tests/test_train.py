"""The training engine: loss normalisation invariants, exact resume after SIGKILL, refusals."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.schedule import lr_at
from minimind.train.stages.pretrain import PretrainStage
from minimind.train.stages.sft import SFTStage
from tests.train_fixtures import SEQ, make_data, tiny_model, train

WORKER = Path(__file__).parent / "train_fixtures.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train_data"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def run_stage(stage, out, **kw):
    config = TrainConfig(out_dir=str(out), dtype="fp32", log_interval=1, seed=3, **kw)
    return weights(Trainer(config, stage, tiny_model()).fit())


@pytest.mark.parametrize("stage_kind", ["pretrain", "sft"])
def test_accumulation_split_does_not_change_the_trajectory(data, tmp_path, stage_kind):
    def stage():
        if stage_kind == "pretrain":
            return PretrainStage(data["pretrain"], SEQ, max_eval=0)
        return SFTStage(data["sft"], 96, max_eval=0)

    # SFT rows carry different numbers of target tokens: only global-count normalisation makes
    # the 1x8 and 8x1 splits agree.
    a = run_stage(stage(), tmp_path / "a", batch_size=8, accumulation_steps=1, max_steps=3)
    b = run_stage(stage(), tmp_path / "b", batch_size=1, accumulation_steps=8, max_steps=3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_schedule_warmup_then_cosine_floor():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(0, 101, 10)]
    assert lrs[0] == 0 and lrs[1] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_metrics_and_checkpoints_written(data, tmp_path):
    final = train(tmp_path / "run", data["pretrain"], 4, keep_last=2)
    steps = sorted(p.name for p in (tmp_path / "run").glob("step_*"))
    assert steps == ["step_00000003", "step_00000004"] and final.name == "step_00000004"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"eval_loss"' in line for line in lines) and '"tokens_per_s"' in lines[0]


def test_resume_with_another_model_is_refused_and_nothing_is_written(data, tmp_path):
    train(tmp_path / "run", data["pretrain"], 2)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), max_steps=4, batch_size=4, dtype="fp32", resume=True
    )
    other = tiny_model(num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        Trainer(config, PretrainStage(data["pretrain"], SEQ), other).fit()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["pretrain", "dpo", "grpo", "ppo", "spo", "distill", "distill_cached"]
)
def test_sigkill_anywhere_then_resume_is_bit_identical(data, tmp_path, kind):
    # dpo: the reference must stay the start model; grpo: rollouts are seeded by (seed, step,
    # rank, data index), so the resumed run samples the same completions.
    steps = 12 if kind in ("pretrain", "dpo") else 8
    rl = kind in ("grpo", "ppo", "spo")
    shards = data["rlaif" if rl else "sft" if kind.startswith("distill") else kind]
    run = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("MINIMIND_KILL_SEED", time.time_ns() % 10_000)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(WORKER), str(run), str(shards), str(steps), kind]
    # The reference runs in a worker process too: the same thread count, so the same float
    # reduction order in every kernel.
    subprocess.run([*cmd[:2], str(tmp_path / "ref"), *cmd[3:]], check=True, env=env)
    reference = weights(tmp_path / "ref" / f"step_{steps:08d}")
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )
        target = rng.randint(1, 3)  # kill after a few logged steps, at a random moment
        seen = 0
        for line in proc.stdout:
            seen += line.startswith("step ")
            if seen >= target:
                time.sleep(rng.uniform(0, 0.05))
                break
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    resumed = weights(run / f"step_{steps:08d}")
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k


def test_lora_stage_trains_adapters_only_and_exports_merged(data, tmp_path):
    from minimind.checkpoint import load_checkpoint
    from minimind.model.lora import LoRAConfig
    from minimind.train.stages.lora import LoRAStage

    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    stage = LoRAStage(data["sft"], 96, LoRAConfig(r=4), max_eval=4)
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, dtype="fp32", learning_rate=1e-2
    )
    trainer = Trainer(config, stage, base)
    trainer.fit()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    for name, p in trainer.model.named_parameters():
        if name.endswith(".base.weight"):  # frozen base weights did not move
            assert torch.equal(p, before[name.replace(".base.weight", ".weight")]), name
    out = trainer.export(tmp_path / "final")
    merged, _ = load_checkpoint(out)
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(ids).logits, trainer.model.eval()(ids).logits, atol=1e-5, rtol=1e-5
        )
    assert (out / "adapter.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_cli_missing_data_says_how_to_get_it(tmp_path, monkeypatch, capsys, data):
    from minimind.train.cli import main

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    code = main(
        ["pretrain", "--tokenizer", str(data["tokenizer"]), "--preset", "tiny", "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "minimind data demo" in err and "minimind data download" in err


def test_cli_vocabulary_mismatch_is_a_clear_error(tmp_path, monkeypatch, capsys, data):
    from minimind.checkpoint import save_checkpoint
    from minimind.train.cli import main

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    save_checkpoint(tmp_path / "base", tiny_model(vocab=512))  # the tokenizer has 400 ids
    args = ["sft", "--tokenizer", str(data["tokenizer"]), "--from_weight", str(tmp_path / "base")]
    code = main([*args, "--data_path", str(data["sft"]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "vocabulary mismatch" in err and "512" in err and "400" in err


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_and_activation_checkpointing_train(data, tmp_path, dtype):
    config = TrainConfig(
        out_dir=str(tmp_path), max_steps=2, batch_size=4, dtype=dtype, activation_checkpointing=True
    )
    trainer = Trainer(config, PretrainStage(data["pretrain"], SEQ, max_eval=4), tiny_model())
    trainer.fit()
    assert trainer.model.model.gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    assert (trainer.scaler is not None) == (dtype == "fp16")


def test_resume_says_where_it_starts(data, tmp_path, capsys):
    train(tmp_path / "run", data["pretrain"], 2)  # resume=True, but nothing to resume
    assert "no step checkpoint in" in capsys.readouterr().out
    train(tmp_path / "run", data["pretrain"], 3)
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 2, sample 8 of 12" in out, out


def test_wandb_offline_run_id_survives_resume(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # a dev dependency; installed by `make test`
    from minimind.checkpoint import load_trainer_state

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tmp_path / "run", data["pretrain"], 2, tracker="wandb")
    first = load_trainer_state(tmp_path / "run" / "step_00000002")["tracker_run_id"]
    train(tmp_path / "run", data["pretrain"], 4, tracker="wandb")
    assert (
        first and load_trainer_state(tmp_path / "run" / "step_00000004")["tracker_run_id"] == first
    )
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{first}"))


@pytest.mark.parametrize("labelled", [1.0, 0.3, 0.0])
def test_lm_loss_on_labelled_positions_equals_the_full_logits_loss(labelled):
    """lm_loss runs the head on labelled positions only: same loss, same gradients."""
    import torch.nn.functional as F

    from minimind.train.stage import IGNORE_INDEX, lm_loss

    model = tiny_model().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (3, 17), generator=g)
    labels[torch.rand(3, 17, generator=g) >= labelled] = IGNORE_INDEX
    got = lm_loss(model, ids, labels).loss_sum
    got.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids).logits
    ref = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    ref.backward()
    torch.testing.assert_close(got, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, msg=n)


# ---------------------------------------------------------------- the command line's data cache
def cli_train(tmp_path, data_file, tok, *extra) -> list[str]:
    return [
        "pretrain", "--data_path", str(data_file), "--tokenizer", str(tok), "--preset", "tiny",
        "--max_seq_len", "32", "--batch_size", "4", "--max_steps", "1", "--device", "cpu",
        "--dtype", "fp32", "--save_pth", "0", "--save_dir", str(tmp_path / "out"),
        "--eval_batches", "1", *extra,
    ]  # fmt: skip


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def caches(home: Path) -> dict[str, dict]:
    root = home / "dataset" / "shards"
    return {p.name: json.loads((p / "meta.json").read_text()) for p in sorted(root.iterdir())}


def test_cli_data_cache_is_keyed_by_content_and_rebuilt_when_stale(data, tmp_path, home, capsys):
    from minimind.train.cli import main

    corpus = data["tokenizer"].parent / "corpus" / "pretrain_hq.jsonl"
    text = tmp_path / "pretrain_hq.jsonl"
    shutil.copy(corpus, text)
    assert main(cli_train(tmp_path, text, data["tokenizer"], "--out_dir", str(tmp_path / "a"))) == 0
    (first,) = caches(home).values()
    with open(text, "a", encoding="utf-8") as f:  # the file is edited
        f.write(json.dumps({"text": "one more document about the demo world."}) + "\n")
    capsys.readouterr()
    assert main(cli_train(tmp_path, text, data["tokenizer"], "--out_dir", str(tmp_path / "b"))) == 0
    out = capsys.readouterr().out
    assert "is stale (the input's size changed" in out and "rebuilding it" in out, out
    (second,) = caches(home).values()  # rebuilt in place, from the new content
    assert second["source"]["bytes"] == text.stat().st_size != first["source"]["bytes"]
    assert second["totals"]["docs"] == first["totals"]["docs"] + 1
    # Another tokenizer in a folder of the same name: its own cache, the first one kept.
    other = tmp_path / "elsewhere" / data["tokenizer"].name
    shutil.copytree(data["tokenizer"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(spec, indent=1))  # same ids, new bytes
    assert main(cli_train(tmp_path, text, other, "--out_dir", str(tmp_path / "c"))) == 0
    assert len(caches(home)) == 2
    # An up-to-date cache is used as is: nothing is prepared again.
    capsys.readouterr()
    assert main(cli_train(tmp_path, text, other, "--out_dir", str(tmp_path / "d"))) == 0
    assert "shards" not in capsys.readouterr().out


def test_cli_refused_resume_writes_no_cache(data, tmp_path, home, capsys):
    from minimind.train.cli import main

    text = tmp_path / "pretrain_hq.jsonl"
    shutil.copy(data["tokenizer"].parent / "corpus" / "pretrain_hq.jsonl", text)
    run = ["--out_dir", str(tmp_path / "run")]
    assert main(cli_train(tmp_path, text, data["tokenizer"], *run)) == 0
    before = {p: p.stat().st_mtime_ns for p in (home / "dataset").rglob("*")}
    with open(text, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "an edit after the first run."}) + "\n")
    capsys.readouterr()
    code = main(cli_train(tmp_path, text, data["tokenizer"], *run, "--from_resume", "1"))
    err = capsys.readouterr().err
    assert code == 1 and "cannot resume from" in err and "data: '" in err, err
    assert "model_config" not in err and "tokenizer" not in err  # only what differs
    assert {p: p.stat().st_mtime_ns for p in (home / "dataset").rglob("*")} == before


def test_cli_on_error_skip_or_raise(data, tmp_path, home, capsys):
    from minimind.train.cli import main

    text = tmp_path / "pretrain_hq.jsonl"
    lines = (data["tokenizer"].parent / "corpus" / "pretrain_hq.jsonl").read_text().splitlines()
    text.write_text("\n".join([*lines[:50], '{"text": 3}', *lines[50:]]) + "\n")
    assert main(cli_train(tmp_path, text, data["tokenizer"], "--out_dir", str(tmp_path / "a"))) == 1
    err = capsys.readouterr().err
    assert f"{text}:51" in err and "text" in err, err
    args = cli_train(tmp_path, text, data["tokenizer"], "--out_dir", str(tmp_path / "b"))
    assert main([*args, "--on-error", "skip"]) == 0
    assert "1 bad line" in capsys.readouterr().out


def test_cli_pretraining_on_chat_data_warns(data, tmp_path, home, capsys):
    from minimind.train.cli import main

    chat = data["tokenizer"].parent / "corpus" / "sft_mini_512.jsonl"
    assert main(cli_train(tmp_path, chat, data["tokenizer"], "--out_dir", str(tmp_path / "a"))) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "sft records" in out and "minimind train sft" in out


# ---------------------------------------------------------------- filesystem faults
def mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs at `folder` (root only); False where that is not possible."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write in: a read-only tmpfs for root (which ignores permission
    bits), mode 0555 for anyone else."""
    folder = tmp_path / "read_only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        pytest.skip("running as root without mount: no folder is read-only to us")


def test_cli_unwritable_save_dir_is_refused_before_training(
    data, tmp_path, home, read_only_dir, capsys
):
    from minimind.train.cli import main

    corpus = data["tokenizer"].parent / "corpus" / "pretrain_hq.jsonl"
    args = cli_train(tmp_path, corpus, data["tokenizer"], "--out_dir", str(tmp_path / "run"))
    code = main([*args, "--save_dir", str(read_only_dir / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err
    assert err.startswith(f"error: --save_dir {read_only_dir / 'out'} is not writable: ")
    assert err.endswith(("read-only file system", "permission denied"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    assert not (home / "dataset").exists()  # no data cache for a refused run
    # The engine checks its run folder itself, before the first step.
    from minimind.fsutil import OutputError

    with pytest.raises(OutputError, match=r"the run folder \(out_dir\) .* is not writable"):
        train(read_only_dir / "run", data["pretrain"], 1)


def test_a_write_cut_short_during_a_save_is_one_line_and_the_last_checkpoint_loads(data, tmp_path):
    """A file size limit (RLIMIT_FSIZE) makes the kernel refuse writes past 600 kB, as a full
    disk would: the weights file fits, torch.save's trainer_state.pt does not."""
    import resource

    from minimind.checkpoint import load_checkpoint, load_trainer_state
    from minimind.fsutil import OutputError
    from minimind.train.state import step_checkpoints

    run = tmp_path / "run"
    train(run, data["pretrain"], 1)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, hard))
    try:
        with pytest.raises(OutputError) as caught:
            train(run, data["pretrain"], 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    message = str(caught.value)
    assert "\n" not in message and "unexpected pos" not in message
    assert message.startswith(f"cannot write the step checkpoint {run / 'step_00000002'}: ")
    assert "the write stopped short" in message, message
    assert [step for step, _ in step_checkpoints(run)] == [1]
    load_checkpoint(run / "step_00000001")
    assert load_trainer_state(run / "step_00000001")["step"] == 1


def test_a_full_disk_is_found_before_a_save_and_the_last_checkpoint_loads(data, tmp_path):
    from minimind.checkpoint import load_checkpoint, load_trainer_state
    from minimind.fsutil import OutputError

    disk = tmp_path / "disk"  # room for one step checkpoint (1.5 MB), not two
    if not mount_tmpfs(disk, "size=2600k"):
        pytest.skip("a small filesystem needs root and mount")
    try:
        run = disk / "run"
        train(run, data["pretrain"], 1)
        with pytest.raises(OutputError) as caught:
            train(run, data["pretrain"], 2)
        message = str(caught.value)
        assert message.startswith(f"cannot write the step checkpoint {run / 'step_00000002'}: ")
        assert "no space left on the device" in message and "MB free" in message
        load_checkpoint(run / "step_00000001")
        assert load_trainer_state(run / "step_00000001")["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------- conflicting flags
def test_cli_conflicting_size_flags_are_refused(data, tmp_path, home, capsys):
    from minimind.checkpoint import save_checkpoint
    from minimind.train.cli import main

    corpus = data["tokenizer"].parent / "corpus" / "pretrain_hq.jsonl"
    args = cli_train(tmp_path, corpus, data["tokenizer"], "--out_dir", str(tmp_path / "run"))
    assert main([*args, "--hidden_size", "128"]) == 1  # with cli_train's --preset tiny
    err = capsys.readouterr().err
    assert "--preset tiny sets the model size, and --hidden_size 128 would be ignored" in err
    save_checkpoint(tmp_path / "base", tiny_model())  # hidden_size 64, dense
    args = [a for a in args if a not in ("--preset", "tiny")]
    base = ["--from_weight", str(tmp_path / "base")]
    assert main([*args, *base, "--hidden_size", "512", "--use_moe", "1"]) == 1
    err = capsys.readouterr().err
    assert "--hidden_size 512 (the weights: 64), --use_moe 1 (the weights: 0) disagree" in err
    assert "the weights set the model's size" in err
    assert main([*args, *base, "--hidden_size", "64", "--use_moe", "0"]) == 0  # they agree
    assert not (home / "dataset").exists() or len(caches(home)) == 1


# ---------------------------------------------------------------- what a run reports
def test_metrics_hold_each_step_once_after_a_resume_with_samples_seen(data, tmp_path):
    run = tmp_path / "run"
    train(run, data["pretrain"], 3)
    # Killed after logging step 3, before its checkpoint was complete.
    shutil.rmtree(run / "step_00000003")
    train(run, data["pretrain"], 4)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["samples"] for r in steps] == [4, 8, 12, 16]  # the sampler's position


def test_max_steps_beyond_the_epochs_says_it_is_capped(data, capsys, tmp_path):
    config = TrainConfig(out_dir=str(tmp_path), max_steps=100, batch_size=4, epochs=2)
    trainer = Trainer(config, PretrainStage(data["pretrain"], SEQ), tiny_model())
    plan = trainer._plan(epoch_samples=40, step_samples=8)
    assert plan["total_samples"] == 80
    out = capsys.readouterr().out
    assert "max_steps 100 is more than 2 epoch(s) of 5 steps: stopping after 10" in out


def test_export_help_names_minimind_export(capsys):
    from minimind.convert.export_cli import main

    assert main(["gguf", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minimind export gguf") and "convert_model.py" not in out


# ---------------------------------------------------------------- document framing
@pytest.mark.slow
def test_a_model_pretrained_here_is_not_hurt_by_a_leading_bos(data, tmp_path, one_thread):
    """Pretraining documents are bos + text + eos, as MiniMind frames them (shards.py), so a
    text read as MiniMind reads it, bos first, is no worse predicted than without the bos.
    (Framed text + eos, the bos embedding was never trained as an input: with it first the
    same toy model predicted the text worse.)"""
    from minimind.tokenizer import load_tokenizer

    tok = load_tokenizer(data["tokenizer"])
    corpus = data["tokenizer"].parent / "corpus" / "pretrain_hq.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text("utf-8").splitlines()[-100:]]
    config = TrainConfig(
        out_dir=str(tmp_path), epochs=10, batch_size=16, dtype="fp32", learning_rate=3e-3,
        log_interval=1000, seed=0,
    )  # fmt: skip
    trainer = Trainer(config, PretrainStage(data["pretrain"], 64, max_eval=8), tiny_model())
    trainer.fit()
    model = trainer.model.eval()

    def nll(prefix: list[int]) -> float:
        """Mean NLL of each text's tokens after its first (predicted in both framings)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([prefix + tok.encode(text)[:63] + [tok.eos_id]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                per = -logp.gather(1, ids[0, 1:, None])[len(prefix) :, 0]
                total, count = total + per.sum().item(), count + len(per)
        return total / count

    plain, framed = nll([]), nll([tok.bos_id])
    assert plain < 0.5 * math.log(tok.vocab_size)  # the model learned the toy language
    assert framed < plain, (framed, plain)


def test_progress_bar_advances_every_step_and_the_log_line_shows_samples(
    data, tmp_path, capsys, monkeypatch
):
    train(tmp_path / "plain", data["pretrain"], 2)  # not a terminal: a line per logged step
    out = capsys.readouterr().out
    assert "step 2/2 " in out and "samples=8 " in out, out
    seen = []

    class Watching(Trainer):
        def _train_step(self, micro, n):
            seen.append(self.tracker._progress.tasks[0].completed)
            return super()._train_step(micro, n)

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the rich bar
    config = TrainConfig(out_dir=str(tmp_path / "bar"), max_steps=4, batch_size=4, log_interval=100)
    Watching(config, PretrainStage(data["pretrain"], SEQ, max_eval=4), tiny_model()).fit()
    assert seen == [0, 1, 2, 3]
