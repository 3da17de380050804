"""Every stage learns on a learnable toy through the one engine, and the engine's stage
interface holds: registry and flags, experience before count, several updates per step,
stage state in checkpoints, DPO's loss contract and reference modes, GRPO's reward checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.rewards import RewardError, RewardSpec
from minimind.train.stages.lora import LoRAStage
from minimind.train.stages.pretrain import PretrainStage
from tests.train_fixtures import SEQ, make_data, make_stage, tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("stage_data"))


def fit(stage, out: Path, data, steps: int, **kw) -> Trainer:
    config = TrainConfig(
        out_dir=str(out), max_steps=steps, dtype="fp32", log_interval=1, seed=1, **kw
    )
    trainer = Trainer(config, stage, tiny_model(), tokenizer_dir=data["tokenizer"])
    trainer.fit()
    return trainer


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lower_case(samples):
    """Toy reward: the share of the reply's characters that are ASCII lower-case letters."""
    return [
        sum(c.isascii() and c.islower() for c in s.completion) / max(1, len(s.completion))
        for s in samples
    ]


def _seen_pairs_dpo(shards):
    from minimind.train.stage import IndexView, Numbered

    stage = make_stage("dpo", shards, max_eval=0)
    stage.eval = Numbered(IndexView(stage.dataset, range(16)))  # 16 of its training pairs
    return stage


def _lora_stage(shards):
    from minimind.model.lora import LoRAConfig

    return LoRAStage(shards, 96, LoRAConfig(r=8, alpha=16), max_eval=8)


# name -> (stage builder, settings, the eval metric, how far it must fall (loss) or rise) after
# 16 steps from a random tiny model; measured: pretrain 6.02 -> 4.6, sft 6.02 -> 5.56, lora
# (lr 1e-1) 6.02 -> 5.94, dpo 0.69 -> 0.58, grpo 0.2 -> 0.8, ppo 0.2 -> 1.0.
LEARNS = {
    "pretrain": (lambda d: make_stage("pretrain", d["pretrain"], max_eval=8), {}, "loss", 0.5),
    "sft": (lambda d: make_stage("sft", d["sft"], max_eval=8), {}, "loss", 0.25),
    # adapters on a random, frozen base learn slowly (its features are noise): a small fall
    "lora": (lambda d: _lora_stage(d["sft"]), {"learning_rate": 1e-1}, "loss", 0.05),
    # DPO from a random model does not generalise to unseen pairs in 16 steps (strangers' names,
    # held-out facts): the toy is to fit the preference of pairs it trains on.
    "dpo": (lambda d: _seen_pairs_dpo(d["dpo"]), {"learning_rate": 1e-2}, "loss", 0.08),
    "grpo": (
        lambda d: make_stage(
            "grpo",
            d["rlaif"],
            reward=RewardSpec({"lower": 1.0}),
            registry={"lower": lower_case},
            num_generations=8,
            beta=0.0,
        ),
        {"batch_size": 2, "min_lr_ratio": 1.0},
        "reward",
        0.2,
    ),
    "ppo": (
        lambda d: make_stage(
            "ppo",
            d["rlaif"],
            reward=RewardSpec({"lower": 1.0}),
            registry={"lower": lower_case},
            kl_coef=0.0,
        ),
        {"min_lr_ratio": 1.0},
        "reward",
        0.2,
    ),
    "reason": (lambda d: make_stage("reason", d["reasoning"], max_eval=8), {}, "loss", 0.25),
    "distill": (lambda d: make_stage("distill", d["sft"], max_eval=8), {}, "loss", 0.1),
    "spo": (
        lambda d: make_stage(
            "spo",
            d["rlaif"],
            reward=RewardSpec({"lower": 1.0}),
            registry={"lower": lower_case},
        ),
        {"min_lr_ratio": 1.0},
        "reward",
        0.2,
    ),
}


@pytest.mark.parametrize("name", list(LEARNS))
def test_every_stage_learns_and_moves_its_trained_parameters(data, tmp_path, name):
    build, settings, key, fall = LEARNS[name]
    kw = {"batch_size": 8, "learning_rate": 1e-2, **settings}
    config = TrainConfig(
        out_dir=str(tmp_path), max_steps=16, dtype="fp32", log_interval=1, seed=1, **kw
    )

    def trainer() -> Trainer:
        return Trainer(config, build(data), tiny_model(), tokenizer_dir=data["tokenizer"])

    untrained = trainer()
    untrained._build()  # set up as fit() does, to evaluate the starting model
    before = untrained.evaluate()[f"eval_{key}"]
    trainer = trainer()
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    after = metrics(tmp_path)[-1][f"eval_{key}"]
    if key == "loss":
        assert after < before - fall, (before, after)
    else:
        assert after > before + fall, (before, after)
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, start[n])}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert moved == trainable and moved, sorted(trainable - moved)[:5]


def test_stage_registry_lists_every_stage_and_its_own_flags(capsys):
    from minimind.train.cli import main

    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in ("pretrain", "sft", "lora", "dpo", "ppo", "grpo", "spo", "reason", "distill"):
        assert f"  {name} " in listing
    for name, flags in {"dpo": ("--beta", "--loss_type"), "grpo": ("--num_generations",)}.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert all(f in out for f in flags), out
    assert main(["nonsense"]) == 2


class Interrupted(Exception):
    pass


class CountingStage(PretrainStage):
    """Pretraining with a stage state (experience calls seen) and two updates per step; it
    stops the run (an exception) on experience call `crash_at`."""

    def __init__(self, *a, crash_at: int = 0, **kw):
        super().__init__(*a, **kw)
        self.seen, self.crash_at = 0, crash_at

    def experience(self, batch):
        assert torch.is_grad_enabled() is False  # the hook runs under no_grad
        self.seen += 1
        if self.seen == self.crash_at:
            raise Interrupted
        batch["stats"] = {"seen": float(self.seen)}
        return batch

    def updates(self, micro):
        yield micro
        yield micro

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_experience_state_and_several_updates_survive_resume(data, tmp_path):
    def run(out, steps, resume=False, crash_at=0):
        # max_eval=0: experience runs on training batches only
        stage = CountingStage(data["pretrain"], SEQ, max_eval=0, crash_at=crash_at)
        t = fit(stage, out, data, steps, batch_size=4, save_interval=1, resume=resume)
        return stage, t

    whole, t = run(tmp_path / "whole", 4)
    assert whole.seen == 4
    # two optimizer updates per step: AdamW's step counter is 8 after 4 steps
    assert all(s["step"].item() == 8 for s in t.optimizer.state.values())
    rows = [m for m in metrics(tmp_path / "whole") if "loss" in m]
    assert [m["seen"] for m in rows] == [1.0, 2.0, 3.0, 4.0] and rows[0]["updates"] == 2
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", 4, crash_at=3)  # during step 3, after step 2 was saved
    resumed, _ = run(tmp_path / "cut", 4, resume=True)
    assert resumed.seen == 4  # the state came back from the step-2 checkpoint
    a = load_file(str(tmp_path / "whole" / "step_00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_loss_contract_pairs_split_any_way_give_one_step(data, tmp_path):
    a = fit(make_stage("dpo", data["dpo"], max_eval=0), tmp_path / "a", data, 2, batch_size=8)
    b = fit(
        make_stage("dpo", data["dpo"], max_eval=0),
        tmp_path / "b",
        data,
        2,
        batch_size=1,
        accumulation_steps=8,
    )
    # atol 5e-5: summation order (8 pairs at once or one by one) moved 1 of 25,600 embedding
    # weights by 1.7e-5 on the session-8 corpus; a wrong loss scale moves them by the lr, 5e-4
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=5e-5, rtol=1e-4, msg=n)
    assert a.samples_seen == b.samples_seen == 16  # pairs, not rows of the (2B, T) batch


def test_dpo_precomputed_reference_trains_like_the_frozen_model(data, tmp_path):
    runs = [
        fit(make_stage("dpo", data["dpo"], ref=ref), tmp_path / ref, data, 3, batch_size=4)
        for ref in ("model", "precompute")
    ]
    assert runs[1].stage.ref is None  # the cache replaced the model
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_dpo_reference_is_the_start_model_even_when_resuming(data, tmp_path):
    fit(make_stage("dpo", data["dpo"]), tmp_path, data, 2, batch_size=4, learning_rate=1e-2)
    stage = make_stage("dpo", data["dpo"])
    start = tiny_model()
    t = fit(stage, tmp_path, data, 3, batch_size=4, resume=True)
    assert t.step == 3
    for p, q in zip(stage.ref.parameters(), start.parameters(), strict=True):
        assert torch.equal(p, q)


def test_grpo_refuses_rlaif_data_without_answers_before_training(data, tmp_path):
    from minimind.data.prepare import prepare

    src = tmp_path / "noanswer.jsonl"
    turns = [
        [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": ""}]
        for i in range(4)
    ]
    rows = [{"conversations": t} for t in turns]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(src, data["tokenizer"], tmp_path / "shards", max_seq_len=64)
    with pytest.raises(RewardError, match=r"noanswer\.jsonl: record 0 has no 'answer'"):
        make_stage("grpo", tmp_path / "shards")
    make_stage("grpo", tmp_path / "shards", reward="format")  # no answer needed: accepted


def test_grpo_logs_rollout_split_and_group_statistics(data, tmp_path):
    fit(make_stage("grpo", data["rlaif"]), tmp_path, data, 2, batch_size=2)
    row = [m for m in metrics(tmp_path) if "loss" in m][-1]
    for key in ("reward", "zero_std_frac", "completion_len", "rollout_tokens_per_s", "kl"):
        assert key in row, row
    assert "experience_s" in row and "update_s" in row
    assert any("eval_reward" in m for m in metrics(tmp_path))


def test_ppo_value_head_trains_at_its_own_rate_is_checkpointed_and_not_exported(data, tmp_path):
    stage = make_stage("ppo", data["rlaif"], critic_lr_scale=0.5, ppo_epochs=2, num_minibatches=2)
    t = fit(stage, tmp_path, data, 2, batch_size=4, save_interval=1, learning_rate=1e-3)
    scales = {g["lr_scale"] for g in t.optimizer.param_groups}
    assert scales == {1.0, 0.5}
    head = [g for g in t.optimizer.param_groups if g["lr_scale"] == 0.5]
    assert {id(p) for g in head for p in g["params"]} == {
        id(p) for p in t.model.value_head.parameters()
    }
    saved = load_file(str(tmp_path / "step_00000002" / "model.safetensors"))
    assert any(k.startswith("value_head.") for k in saved)
    exported = t.export(tmp_path / "export")
    plain = load_file(str(exported / "model.safetensors"))
    assert not any(k.startswith("value_head") for k in plain)
    row = [m for m in metrics(tmp_path) if "loss" in m][-1]
    assert row["updates"] == 4  # 2 epochs x 2 minibatches
    for key in ("value_loss", "explained_variance", "clip_frac", "approx_kl", "kl_ref"):
        assert key in row, row


def test_spo_tracker_follows_the_beta_update_and_forgets_faster_when_the_policy_moves(
    data, tmp_path
):
    from minimind.data.prepare import prepare

    src = tmp_path / "two.jsonl"
    rows = [
        {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]}
        for q in ("What is 2 + 3?", "What is 4 + 1?")
    ]
    src.write_text("".join(json.dumps({**r, "answer": "5"}) + "\n" for r in rows))
    prepare(src, data["tokenizer"], tmp_path / "shards", max_seq_len=64)
    stage = make_stage(
        "spo",
        tmp_path / "shards",
        reward=RewardSpec({"lower": 1.0}),
        registry={"lower": lower_case},
        init_samples=0,
        eval_fraction=0.0,
        max_eval=0,
        prioritize=False,
    )
    alpha0, beta0 = stage.alpha.clone(), stage.beta_.clone()
    fit(stage, tmp_path / "run", data, 6, batch_size=2, learning_rate=5e-2, epochs=6)
    rows = [m for m in metrics(tmp_path / "run") if "rho" in m]
    assert rows[0]["rho"] == pytest.approx(0.96)  # never seen: rho_max
    assert min(m["rho"] for m in rows[1:]) < 0.96  # the policy moved on a seen prompt
    # Beta update: alpha + beta = rho (alpha + beta) + 1 per visit; both prompts seen 6 times,
    # so the effective count grew from 1 towards 1 / (1 - rho) without reaching 6.
    total = stage.alpha + stage.beta_
    assert torch.all(total > alpha0 + beta0) and torch.all(total < 1 + 6)
    assert len(stage.last) == 2 and stage.state_dict()["alpha"].shape == (2,)


def test_dpo_with_lora_uses_the_base_as_reference_without_a_copy(data, tmp_path):
    from minimind.model.lora import LoRAConfig
    from minimind.train.stage import token_logps
    from minimind.train.stages.dpo import DPOStage

    stage = DPOStage(data["dpo"], 96, lora=LoRAConfig(r=4, alpha=8), max_eval=0)
    t = fit(stage, tmp_path, data, 3, batch_size=4, learning_rate=1e-2)
    assert stage.ref is None  # no frozen copy: the reference is the adapted model, adapters off
    base = tiny_model()  # the starting weights
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    batch = stage.collate([stage.train_dataset()[i] for i in range(4)])
    got = stage._ref_logps(batch)
    with torch.no_grad():
        logps, _ = token_logps(base, batch["input_ids"], batch["labels"])
    want = (logps * (batch["labels"] != -100)).sum(1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    policy, _ = token_logps(t.model.eval(), batch["input_ids"], batch["labels"])
    assert not torch.allclose((policy * (batch["labels"] != -100)).sum(1), want)  # it trained
    out = t.export(tmp_path / "export")
    assert (out / "adapter.safetensors").is_file()
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
