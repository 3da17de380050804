"""Reasoning distillation (tag-weighted SFT) and knowledge distillation (teacher KL): the
weights touch only whole tags, the weighted loss keeps the engine's split invariance, the KL
is zero for a student that is its teacher and falls with training, and the loss equals a
plain reference implementation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stages.distill import DistillStage, distill_token_loss
from minimind.train.stages.reason import TAGS, ReasonStage, tag_sequences, tag_weights
from tests.train_fixtures import make_data, tiny_model

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "minimind2"
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
    assert evals[-1] < evals[0] - 0.1 and evals == sorted(evals, reverse=True), evals


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
