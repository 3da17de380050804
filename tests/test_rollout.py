"""Sampling from the live policy (train/policy.py) and the rollout batch (train/rollout.py):
the trained parameters are never rebound, samples equal plain `generate` on a copy, and the
training forward's log-probs of the sampled tokens equal the sampling-time ones."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from minimind.infer.generation import generate
from minimind.model import MiniMindForCausalLM, preset
from minimind.train.policy import Policy
from minimind.train.rollout import layout, rollout
from minimind.train.stage import IGNORE_INDEX, token_logps


def tiny(seed: int = 0, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset("tiny", vocab_size=97, **kw)).float()


PROMPTS = [[5, 9, 11, 3], [7, 2], [4, 4, 4, 8, 30, 12]]


def test_rollout_never_rebinds_trained_parameters_and_samples_like_generate():
    model = tiny(dropout=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    policy = Policy(model, contextlib.nullcontext)
    for _ in range(2):  # and again after an optimizer step
        plain = copy.deepcopy(model).eval()
        got = policy.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=7)
        want = generate(plain, PROMPTS, max_new_tokens=12, temperature=1.0, seed=7)
        assert [list(c) for c in got] == [list(c) for c in want]
        assert model.training  # back in train mode (dropout on) after the rollout
        for n, p in model.named_parameters():
            assert p is before[n][0] and p.data_ptr() == before[n][1], n
        assert all(g is None for g in (m._fused_weight for m in _groups(model)))
        # the optimizer still updates the model's own tensors
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(torch.tensor([PROMPTS[0]])).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all(not torch.equal(snapshot[n], p) for n, p in model.named_parameters())


def test_a_model_that_decoded_can_train_afterwards():
    model = tiny()
    generate(model, PROMPTS, max_new_tokens=4, temperature=0.0)  # fuses under inference_mode
    assert any(m._fused_weight is not None for m in _groups(model))
    model.train()
    model(torch.tensor([PROMPTS[0]])).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rollout_under_bf16_autocast_samples_from_an_fp32_model():
    # The engine samples under the training autocast: bf16 keys and values go into the fp32
    # cache of an fp32 (master-weight) model.
    model = tiny(seed=4)
    policy = Policy(model, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    ro = rollout(policy, PROMPTS, max_new_tokens=6, temperature=1.0, seed=1, pad_id=0)
    assert ro.new_tokens > 0 and torch.isfinite(ro.sample_logps).all()


def _groups(model):
    from minimind.model.layers import InputGroup

    return [m for m in model.modules() if isinstance(m, InputGroup)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_forward_logps_equal_sampling_logps_on_left_padded_rows(temperature):
    model = tiny(seed=1)
    policy = Policy(model, contextlib.nullcontext)
    ro = rollout(policy, PROMPTS * 2, max_new_tokens=10, temperature=temperature, seed=3, pad_id=0)
    assert ro.input_ids.shape[0] == 6 and ro.prompt_len == 6
    with torch.no_grad():
        logps, _ = token_logps(
            model, ro.input_ids, ro.labels, ro.attention_mask, temperature=temperature
        )
    mask = ro.completion_mask()
    assert int(mask.sum()) == ro.new_tokens
    torch.testing.assert_close(logps[mask], ro.sample_logps[mask], atol=1e-5, rtol=0)
    assert torch.all(logps[~mask] == 0) and torch.all(ro.sample_logps[~mask] == 0)


def test_labels_end_at_the_first_stop_token_and_truncated_rows_can_be_masked():
    model = tiny(seed=2)
    policy = Policy(model, contextlib.nullcontext)
    stops = list(range(0, 97, 8))  # an eighth of the vocabulary stops a row: lengths differ
    kw = dict(max_new_tokens=6, temperature=1.0, seed=11, stop_token_ids=stops, pad_id=0)
    ro = rollout(policy, PROMPTS * 4, **kw)
    reasons = [c.finish_reason for c in ro.completions]
    assert "stop" in reasons and "length" in reasons
    for row, comp in enumerate(ro.completions):
        labelled = ro.labels[row][ro.labels[row] != IGNORE_INDEX].tolist()
        assert labelled == list(comp)  # every completion token, the stop token included
        if comp.finish_reason == "stop":
            assert labelled[-1] in stops and not any(t in stops for t in labelled[:-1])
    masked = rollout(policy, PROMPTS * 4, mask_truncated=True, **kw)
    for row, comp in enumerate(masked.completions):
        n = int((masked.labels[row] != IGNORE_INDEX).sum())
        assert n == (0 if comp.finish_reason == "length" else len(comp))


def test_layout_matches_its_docstring_shapes():
    ids, labels, mask, lps = layout([[1, 2, 3]], [[4]], 0, torch.device("cpu"), logprobs=[[-0.5]])
    assert ids.tolist() == [[1, 2, 3]] and labels.tolist() == [[-100, -100, 4]]
    assert mask.all() and lps.tolist() == [[0.0, 0.0, -0.5]]
