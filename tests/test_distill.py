"""Reasoning distillation (tag-weighted SFT) and knowledge distillation (teacher KL): the
weights touch only whole tags, the weighted loss keeps the engine's split invariance, the KL
is zero for a student that is its teacher and falls with training, and the loss equals a
plain reference implementation."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minimind.tokenizer import load_tokenizer
from minimind.train import teacher_cache as tc
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stages.distill import (
    DIVERGENCES,
    DistillStage,
    distill_token_loss,
    distill_topk_loss,
)
from minimind.train.stages.reason import TAGS, ReasonStage, tag_sequences, tag_weights
from tests import REFERENCE
from tests.train_fixtures import make_data, tiny_model

TEXT = "<think>\n1 < 2, so think again: 7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("distill_data"))


def weighted_positions(tokenizer, text: str) -> tuple[list[int], list[str]]:
    ids = tokenizer.encode(text)
    labels = torch.tensor([ids])
    w = tag_weights(labels, tag_sequences(tokenizer), 10.0)[0]
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return [i for i, x in enumerate(w.tolist()) if x == 10.0], pieces


def test_our_tags_are_single_tokens_and_only_they_are_weighted(data):
    tok = load_tokenizer(data["tokenizer"])
    assert all(len(seq) == 1 for seq in tag_sequences(tok))
    hits, pieces = weighted_positions(tok, TEXT)
    assert [pieces[i] for i in hits] == list(TAGS)


@pytest.mark.skipif(not (REFERENCE / "tokenizer.json").is_file(), reason="no MiniMind2 tokenizer")
def test_minimind2_tags_are_weighted_as_whole_runs_never_as_loose_pieces():
    tok = load_tokenizer(REFERENCE)
    seqs = tag_sequences(tok)
    assert any(len(s) > 1 for s in seqs)  # MiniMind2 writes the tags in several pieces
    hits, pieces = weighted_positions(tok, TEXT)
    assert "".join(pieces[i] for i in hits).replace("\n", "") == "".join(TAGS)
    # the "<" of "1 < 2" and the word "think" in the thought are not weighted
    assert sum(len(s) for s in seqs) == len(hits)


def run(stage, out, data, steps=3, **kw):
    config = TrainConfig(
        out_dir=str(out), max_steps=steps, dtype="fp32", log_interval=1, seed=2, **kw
    )
    trainer = Trainer(config, stage, tiny_model(), tokenizer_dir=data["tokenizer"])
    trainer.fit()
    return trainer


def test_weighted_loss_is_the_same_step_however_the_batch_is_split(data, tmp_path):
    a = run(ReasonStage(data["reasoning"], 96, max_eval=0), tmp_path / "a", data, batch_size=8)
    b = run(
        ReasonStage(data["reasoning"], 96, max_eval=0),
        tmp_path / "b",
        data,
        batch_size=1,
        accumulation_steps=8,
    )
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_reason_stage_reports_format_rate_and_answer_match(data, tmp_path):
    run(
        ReasonStage(data["reasoning"], 96, max_eval=4, eval_prompts=4), tmp_path, data, batch_size=8
    )
    import json

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert {"eval_loss", "eval_format_rate", "eval_answer_match"} <= last.keys()
    assert 0 <= last["eval_format_rate"] <= 1


def reference_loss(s, t, y, alpha, temperature, divergence):
    """The textbook formulas, written out with torch's own kl_div."""
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if divergence == "forward":
        div = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    elif divergence == "reverse":
        div = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    else:
        m = torch.log((ls.exp() + lt.exp()) / 2)
        div = 0.5 * F.kl_div(m, lt, log_target=True, reduction="none").sum(-1) + 0.5 * F.kl_div(
            m, ls, log_target=True, reduction="none"
        ).sum(-1)
    return alpha * F.cross_entropy(s, y, reduction="none") + (1 - alpha) * temperature**2 * div


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_distill_loss_equals_the_reference_formulas(divergence):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    got, _ = distill_token_loss(s, t, y, alpha=0.3, temperature=2.0, divergence=divergence)
    torch.testing.assert_close(got, reference_loss(s, t, y, 0.3, 2.0, divergence))


def test_student_equal_to_teacher_has_zero_kl_and_training_lowers_it(data, tmp_path):
    teacher = tiny_model()
    same = DistillStage(data["sft"], 96, teacher=copy.deepcopy(teacher), alpha=0.0, max_eval=4)
    t = Trainer(
        TrainConfig(out_dir=str(tmp_path / "same"), max_steps=1, dtype="fp32", learning_rate=1e-9),
        same,
        copy.deepcopy(teacher),
        tokenizer_dir=data["tokenizer"],
    )
    t._build()
    assert t.evaluate()["eval_loss"] == pytest.approx(0.0, abs=1e-6)
    # a random student learns to match a teacher that is another random model
    torch.manual_seed(7)
    other = tiny_model()
    for p in other.parameters():
        p.data.mul_(5)  # a peaked teacher: far from the student's near-uniform start
    stage = DistillStage(data["sft"], 96, teacher=other, alpha=0.0, max_eval=8)
    run(
        stage, tmp_path / "learn", data, steps=16, batch_size=8, learning_rate=3e-3, eval_interval=4
    )
    import json

    rows = [json.loads(x) for x in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_kl"] for r in rows if "eval_kl" in r]
    assert evals[-1] < evals[0] - 0.05 and evals == sorted(evals, reverse=True), evals  # -0.096


def test_distill_on_packed_pretraining_data_and_teacher_from_a_checkpoint(data, tmp_path):
    first = run(
        DistillStage(data["pretrain"], 32, teacher=tiny_model(), alpha=0.5, max_eval=4),
        tmp_path / "t",
        data,
        steps=2,
        batch_size=4,
    )
    teacher_dir = first.export(tmp_path / "teacher")
    stage = DistillStage(data["pretrain"], 32, teacher=teacher_dir, alpha=0.5, max_eval=4)
    assert stage.packed and stage.teacher_id["path"] == str(teacher_dir.resolve())
    run(stage, tmp_path / "s", data, steps=2, batch_size=4, save_interval=1)
    assert load_file(str(tmp_path / "s" / "step_00000002" / "model.safetensors"))
    # resuming with another teacher is refused, naming the teacher
    other = DistillStage(data["pretrain"], 32, teacher=tiny_model(), alpha=0.5, max_eval=4)
    with pytest.raises(ValueError, match="teacher"):
        run(other, tmp_path / "s", data, steps=3, batch_size=4, resume=True)


def test_teacher_with_another_vocabulary_is_refused_before_training(data, tmp_path):
    teacher = tiny_model(vocab=500)
    stage = DistillStage(data["sft"], 96, teacher=teacher, max_eval=0)
    with pytest.raises(ValueError, match=r"teacher's vocabulary \(500 ids\).*student's \(400\)"):
        Trainer(TrainConfig(out_dir=str(tmp_path)), stage, tiny_model())


# ---------------------------------------------------------------------------- top-k cache
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_loss_with_k_equal_to_the_vocabulary_is_the_full_loss(divergence):
    g = torch.Generator().manual_seed(1)
    s, t = 3 * torch.randn(6, 11, generator=g), 3 * torch.randn(6, 11, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    kw = dict(alpha=0.3, temperature=2.0, divergence=divergence)
    s_full, s_topk = s.clone().requires_grad_(), s.clone().requires_grad_()
    full, _ = distill_token_loss(s_full, t, y, **kw)
    rows = tc.teacher_topk(t, 11, 2.0, "float32")
    got, _ = distill_topk_loss(s_topk, *rows, y, **kw)
    torch.testing.assert_close(got, full)
    full.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(s_topk.grad, s_full.grad)
    # the stored float16 values: only their rounding (relative 2^-11 of a log-prob) differs
    got16, _ = distill_topk_loss(s, *tc.teacher_topk(t, 11, 2.0, "float16"), y, **kw)
    assert (got16 - full).abs().max() < 5e-3


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_loss_is_the_divergence_over_k_tokens_and_one_tail_bucket(divergence):
    """A plain reference: both distributions coarsened by hand to the teacher's top 3 tokens
    and "any other token"; the forward KL is a lower bound of the full one (chain rule)."""
    g = torch.Generator().manual_seed(2)
    s, t = 2 * torch.randn(5, 9, generator=g), 2 * torch.randn(5, 9, generator=g)
    y = torch.randint(0, 9, (5,), generator=g)
    p, q = t.softmax(-1), s.softmax(-1)
    top = p.topk(3, -1).indices
    pc = torch.cat([p.gather(1, top), 1 - p.gather(1, top).sum(-1, keepdim=True)], -1)
    qc = torch.cat([q.gather(1, top), 1 - q.gather(1, top).sum(-1, keepdim=True)], -1)
    want = reference_loss(qc.log(), pc.log(), y.clamp(max=3), 0.0, 1.0, divergence)
    got, div = distill_topk_loss(
        s, *tc.teacher_topk(t, 3, 1.0, "float32"), y, alpha=0.0, temperature=1.0,
        divergence=divergence,
    )  # fmt: skip
    torch.testing.assert_close(got, want)
    if divergence == "forward":
        _, full_div = distill_token_loss(s, t, y, alpha=0.0, temperature=1.0)
        assert bool((div <= full_div + 1e-6).all()) and bool((div >= -1e-6).all())


def peaked_teacher():
    teacher = tiny_model()
    for p in teacher.parameters():
        p.data.mul_(5)  # far from a random student's near-uniform start
    return teacher


def cached_stage(data, cache, teacher, **kw):
    kw = {"alpha": 0.5, "topk": 8, "max_eval": 8, "cache_batch_size": 8, **kw}
    return DistillStage(data["sft"], 96, teacher=teacher, teacher_cache=cache, **kw)


def built(stage, out, data):
    trainer = Trainer(
        TrainConfig(out_dir=str(out), dtype="fp32", batch_size=8),
        stage,
        tiny_model(),
        tokenizer_dir=data["tokenizer"],
    )
    trainer._build()
    return trainer


def test_cached_loss_equals_the_live_topk_loss_exactly(data, tmp_path):
    teacher = peaked_teacher()
    live = built(DistillStage(data["sft"], 96, teacher=teacher, alpha=0.5, topk=8), tmp_path, data)
    cached = built(cached_stage(data, tmp_path / "cache", copy.deepcopy(teacher)), tmp_path, data)
    assert cached.stage.cache is not None and cached.stage.teacher_model is None
    for start in (0, 8):  # the build's first two batches: the teacher saw the same inputs
        a = live.stage.collate([live.train_set[i] for i in range(start, start + 8)])
        b = cached.stage.collate([cached.train_set[i] for i in range(start, start + 8)])
        assert set(b) - set(a) == {"teacher_values", "teacher_indices", "teacher_tail"}
        assert b["teacher_values"].dtype == torch.float16
        la, lb = live.stage.loss(live.model, a), cached.stage.loss(cached.model, b)
        assert torch.equal(la.loss_sum, lb.loss_sum) and la.metrics == lb.metrics
    # and with another teacher the loss differs: the comparison can fail
    other = built(cached_stage(data, tmp_path / "other", tiny_model()), tmp_path / "o", data)
    c = other.stage.collate([other.train_set[i] for i in range(8)])
    assert not torch.equal(other.stage.loss(other.model, c).loss_sum, la.loss_sum)


def test_training_from_the_cache_follows_the_live_topk_run_and_lowers_the_kl(data, tmp_path):
    teacher = peaked_teacher()
    kw = dict(steps=8, batch_size=8, learning_rate=3e-3, eval_interval=2)
    live = DistillStage(data["sft"], 96, teacher=teacher, alpha=0.0, topk=8, max_eval=8)
    run(live, tmp_path / "live", data, **kw)
    run(cached_stage(data, tmp_path / "c", teacher, alpha=0.0), tmp_path / "cached", data, **kw)
    import json

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    losses = [[r["loss"] for r in rows(n) if "loss" in r] for n in ("live", "cached")]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    evals = [r["eval_kl"] for r in rows("cached") if "eval_kl" in r]
    assert evals[-1] < evals[0] - 0.05 and evals == sorted(evals, reverse=True), evals  # -0.096


def test_a_stale_cache_is_refused_naming_what_differs(data, tmp_path):
    teacher = tiny_model()
    built(cached_stage(data, tmp_path / "cache", teacher), tmp_path / "run", data)
    with pytest.raises(tc.StaleCacheError, match=r"temperature: 1.0 in the cache, 2.0 in this"):
        cached_stage(data, tmp_path / "cache", teacher, temperature=2.0)
    with pytest.raises(tc.StaleCacheError, match=r"k: 8 in the cache, 4 in this run"):
        cached_stage(data, tmp_path / "cache", teacher, topk=4)
    with pytest.raises(tc.StaleCacheError, match=r"teacher\.weights"):
        cached_stage(data, tmp_path / "cache", peaked_teacher())
    with pytest.raises(tc.StaleCacheError, match=r"data\.source.*packed.*seq_len"):
        DistillStage(
            data["pretrain"], 32, teacher=teacher, teacher_cache=tmp_path / "cache", topk=8
        )
    cached_stage(data, tmp_path / "cache", teacher)  # the same run still opens it


def part_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part_*"))}


def test_an_interrupted_build_continues_where_it_stopped(data, tmp_path):
    teacher = peaked_teacher()
    whole = cached_stage(data, tmp_path / "whole", teacher, cache_part_items=16)
    built(whole, tmp_path / "a", data)
    n_parts = tc.TeacherCache(tmp_path / "whole", whole.key).meta["parts"]
    assert n_parts >= 4
    # An interrupted build: only the even parts finished (rank 0 of 2), and part 1 was killed
    # after writing one of its files, before its record.
    folder = tmp_path / "cache"
    stage = cached_stage(data, folder, teacher, cache_part_items=16)
    tc.start(folder, stage.key, vocab_size=400, part_items=16)
    tc.build(
        folder, stage.key, stage.dataset, stage._collate_plain, teacher.eval(),
        device=torch.device("cpu"), autocast=contextlib.nullcontext, batch_size=8,
        rank=0, world_size=2,
    )  # fmt: skip
    (folder / "part_00001.values.bin").write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("part_00000.*")}
    with pytest.raises(ValueError, match=r"unfinished"):
        tc.TeacherCache(folder, stage.key)
    assert not tc.is_complete(folder, stage.key)
    written = tc.build(
        folder, stage.key, stage.dataset, stage._collate_plain, teacher.eval(),
        device=torch.device("cpu"), autocast=contextlib.nullcontext, batch_size=8,
    )  # fmt: skip
    assert written == n_parts // 2  # the odd parts only
    assert before == {p.name: p.stat().st_mtime_ns for p in folder.glob("part_00000.*")}
    tc.finalize(folder, stage.key)
    assert part_files(folder) == part_files(tmp_path / "whole")


def test_cli_builds_the_cache_then_trains_without_loading_the_teacher(
    data, tmp_path, monkeypatch, capsys
):
    from minimind.checkpoint import save_checkpoint
    from minimind.train.cli import main

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    teacher = save_checkpoint(tmp_path / "teacher", peaked_teacher())
    cache = tmp_path / "cache"
    args = ["distill", "--data_path", str(data["sft"]), "--tokenizer", str(data["tokenizer"])]
    args += ["--from_teacher_weight", str(teacher), "--preset", "tiny", "--device", "cpu"]
    args += ["--dtype", "float32", "--max_seq_len", "96", "--batch_size", "8", "--topk", "8"]
    args += ["--teacher_cache", str(cache), "--save_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--build_teacher_cache"])
    assert stop.value.code == 0 and "teacher cache ready" in capsys.readouterr().out
    assert json.loads((cache / "meta.json").read_text())["complete"]

    def no_teacher(*a, **kw):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr("minimind.convert.detect.load_any", no_teacher)
    assert main([*args, "--max_steps", "2", "--save_pth", "0"]) == 0
    assert (tmp_path / "out" / "full_dist_64" / "model.safetensors").is_file()
