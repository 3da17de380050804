"""Weight-only int8 (minimind/model/quant.py): Int8Linear is the matmul with its dequantized
weight on both of its paths (the int8 kernel for few rows, the bf16 cast for many), the
rounding error is at most half a step, quantize_int8 leaves the original model alone and stores
each projection group once, a quantized trained draft proposes what the fp32 one proposes (so
speculative greedy output stays plain greedy's, compiled too) and sampled output keeps the
target's distribution, and `--draft_dtype` loads it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minimind.infer import GenerationConfig, generate
from minimind.model import MiniMindForCausalLM, preset
from minimind.model.layers import InputGroup
from minimind.model.quant import PACK_ROWS, Int8Linear, quantize_int8
from tests.test_speculative import homogeneity, perturbed_pair, trained_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("width", [48, 40])  # the int8 kernel needs a multiple of 16
def test_int8_linear_is_its_dequantized_matmul(width):
    torch.manual_seed(0)
    weight = torch.randn(96, width)
    lin = Int8Linear.from_weight(weight, torch.bfloat16)
    step = lin.scale.float()[:, None]
    dequant = lin.qweight.float() * step
    assert lin.qweight.dtype == torch.int8 and int(lin.qweight.abs().max()) == 127
    # round to nearest: within half a step of the weight, per output row (a row's largest
    # weight, clamped to 127, may be off by what the bf16 scale's rounding moved it)
    assert ((weight - dequant).abs() <= 0.5 * step + 127 * step / 256).all()
    assert ((weight - dequant).abs() <= 0.5001 * step).float().mean() > 0.99
    for rows in (1, 3, PACK_ROWS - 1, PACK_ROWS, 40):  # the int8 kernel, then the bf16 cast
        x = torch.randn(2, rows, width)
        y = lin(x.bfloat16())
        assert y.shape == (2, rows, 96) and y.dtype == torch.bfloat16
        want = x.bfloat16().float() @ dequant.T
        torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.02)


def test_quantize_int8_copies_and_stores_each_group_once():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset("tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.new_cache(1, 8)  # fused q/k/v and gate/up buffers, as a decoding model has them
    q = quantize_int8(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in after)
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert q.model.embed_tokens.weight.dtype == torch.bfloat16
    for group in (m for m in q.modules() if isinstance(m, InputGroup)):
        base = group.packed.qweight
        start = 0
        for name in group.GROUP:  # each projection: its rows of the packed buffer, no copy
            w = getattr(group, name).qweight
            assert w.data_ptr() == base[start:].data_ptr()
            start += w.shape[0]
        assert start == base.shape[0]
    ids = torch.randint(3, 400, (2, 12))
    with torch.inference_mode():
        ref, got = model(ids).logits, q(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), got.flatten(0, 1), dim=-1)
    assert cos.min() > 0.99, cos.min()


def test_quantize_int8_of_an_moe_model():
    """Experts are groups too (each its own packed gate/up); a decode step routes one token
    to top-k experts, so the others run on zero rows, which both matmul paths must take."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset("tiny", use_moe=True)).eval()
    q = quantize_int8(model)
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert Int8Linear.from_weight(torch.randn(32, 48), torch.bfloat16)(
        torch.empty(0, 48, dtype=torch.bfloat16)
    ).shape == (0, 32)
    ids = torch.randint(3, 400, (1, 12))
    plain = generate(model, ids.tolist(), max_new_tokens=6, temperature=0, stop_token_ids=())
    small = generate(q, ids.tolist(), max_new_tokens=6, temperature=0, stop_token_ids=())
    assert len(small[0]) == 6
    with torch.inference_mode():
        for cut in (1, 3, 12):  # kernel path, then the cast path
            ref, got = model(ids[:, :cut]).logits, q(ids[:, :cut]).logits.float()
            cos = torch.nn.functional.cosine_similarity(ref[0], got[0], dim=-1)
            assert cos.min() > 0.99, (cut, cos.min())
    assert plain[0][:1] == small[0][:1]


def test_an_int8_draft_proposes_what_the_fp32_draft_proposes():
    """The tiny trained pair: with the draft quantized, greedy speculation is plain greedy
    decoding, and about as many drafts are accepted as with the fp32 draft (the kernel path
    for decode steps, the cast path for the prompts of 20 tokens)."""
    target, draft, prompts = trained_pair()
    small = quantize_int8(draft)
    plain = generate(target, prompts, max_new_tokens=40, temperature=0, stop_token_ids=())
    rates = []
    for drafter in (draft, small):
        spec = generate(
            target, prompts, max_new_tokens=40, temperature=0, stop_token_ids=(), draft=drafter
        )
        assert spec == plain
        rates.append(spec[0].speculation.acceptance_rate)
    assert rates[1] > 0.5 and abs(rates[0] - rates[1]) < 0.1, rates


@pytest.mark.slow
def test_compiled_speculation_with_an_int8_draft_equals_plain():
    """compile=True: the draft model's compiled prefill (prompt lengths on both sides of
    PACK_ROWS) and the one-graph greedy round, with an int8 bf16 draft beside an fp32 target."""
    target, draft, prompts = trained_pair()
    small = quantize_int8(draft)
    prompts = [*prompts, prompts[2] * 2]  # 3, 8, 20, 5 and 40 tokens
    for prompt in prompts:
        plain = generate(target, [prompt], max_new_tokens=24, temperature=0, stop_token_ids=())
        spec = generate(
            target,
            [prompt],
            max_new_tokens=24,
            temperature=0,
            stop_token_ids=(),
            draft=small,
            num_draft_tokens=2,
            compile=True,
        )
        assert spec == plain, prompt
        assert spec[0].speculation.accepted > 0
    torch._dynamo.reset()


def test_sampling_with_an_int8_draft_follows_the_targets_distribution():
    """As test_speculative's chi-square test: a bf16 int8 draft of a perturbed float64 target
    (its probabilities q are the draft's own) leaves every position's token distributed as
    plain sampling gives it."""
    target, other = perturbed_pair()
    small = quantize_int8(other)
    prompt = [[3, 4, 5, 3, 4]] * 2000
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.9, top_k=16, stop_token_ids=())
    plain = generate(target, prompt, cfg, seed=0)
    spec = generate(target, prompt, cfg, seed=1, draft=small, num_draft_tokens=2)
    assert 0.3 < spec[0].speculation.acceptance_rate < 0.8, spec[0].speculation
    for position in range(4):
        assert homogeneity(plain, spec, position) > 1e-3, position
