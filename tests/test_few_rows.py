"""layers.linear where AVOID_MKL (an AMD CPU, or MINIMIND_CPU_MATMUL=bypass): in a CPU graph
being compiled, a matmul of at most FEW_ROWS rows is traced as per-row reductions over rows
realized in a buffer, with F.linear's values, while more rows and dynamic row counts keep
F.linear; eager float32 calls without autograd run oneDNN's matmul, with F.linear's values,
and calls with autograd run F.linear itself; and decoding, eager and compiled (steps, and a speculative verification of 3
columns), gives the same greedy tokens with the choice either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.inductor_prims import force_stride_order

from minimind.infer import generate
from minimind.model import layers
from tests.test_static_decode import PROMPTS, wide_model

pytestmark = pytest.mark.usefixtures("one_thread")


def traced_ops(fn, *args, dynamic=False):
    """fn compiled with a backend that records the traced graph's call targets, and its output."""
    seen = []

    def backend(gm, _inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, dynamic=dynamic)(*args)
    return seen, out


@pytest.mark.parametrize("reduce", [True, False])
def test_few_rows_are_traced_as_reductions_with_linears_values(monkeypatch, reduce):
    monkeypatch.setattr(layers, "AVOID_MKL", reduce)
    torch.manual_seed(0)
    weight = torch.randn(96, 48)
    for rows in range(1, layers.FEW_ROWS + 2):
        x = torch.randn(1, rows, 48)
        ops, y = traced_ops(layers.linear, x, weight)
        few = reduce and rows <= layers.FEW_ROWS
        assert (F.linear in ops) == (not few), (rows, ops)
        # the rows realized in a buffer of their own (see layers.linear)
        assert (force_stride_order in ops) == few, (rows, ops)
        assert y.shape == (1, rows, 96)
        torch.testing.assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    # a row count that is symbolic in the graph: F.linear
    x = torch.randn(3, 48)
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 0)
    ops, y = traced_ops(layers.linear, x, weight, dynamic=None)
    assert F.linear in ops
    torch._dynamo.reset()


def test_compiled_few_rows_with_autograd_have_linears_gradients(monkeypatch):
    """A compiled training step of few rows (the rows' buffer op has no backward: not used
    under autograd) gives F.linear's gradients."""
    monkeypatch.setattr(layers, "AVOID_MKL", True)
    torch.manual_seed(0)
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(1, 3, 8, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(lambda x, w: layers.linear(x, w).square().sum())(x, w).backward()
    got = x.grad, w.grad
    x.grad = w.grad = None
    F.linear(x, w).square().sum().backward()
    torch.testing.assert_close(got, (x.grad, w.grad), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("avoid", [True, False])
def test_eager_calls_without_autograd_have_linears_values(monkeypatch, avoid):
    monkeypatch.setattr(layers, "AVOID_MKL", avoid)
    torch.manual_seed(0)
    weight = torch.randn(96, 48, requires_grad=True)
    for x in (torch.randn(1, 48), torch.randn(2, 8, 48), torch.randn(40, 60)[:, 6:54]):
        with torch.no_grad():
            want = F.linear(x, weight)
            torch.testing.assert_close(layers.linear(x, weight), want, atol=1e-5, rtol=1e-5)
        with torch.inference_mode():
            torch.testing.assert_close(layers.linear(x, weight), want, atol=1e-5, rtol=1e-5)
        y = layers.linear(x, weight)  # autograd on: F.linear, exactly, with its gradient
        assert torch.equal(y, F.linear(x, weight)) and y.requires_grad
    with torch.no_grad(), torch.profiler.profile() as prof:  # which kernel ran
        layers.linear(x, weight)
    ops = {event.key for event in prof.key_averages()}
    assert ("mkldnn::_linear_pointwise" in ops) is avoid, ops
    with torch.no_grad():  # other dtypes, empty inputs and a transposed weight: F.linear
        wt = torch.randn(48, 96).t()
        assert torch.equal(layers.linear(x, wt), F.linear(x, wt))
        x = torch.randn(3, 48).bfloat16()
        assert torch.equal(layers.linear(x, weight.bfloat16()), F.linear(x, weight.bfloat16()))
        assert layers.linear(torch.empty(0, 48), weight).shape == (0, 96)


def test_the_choice_follows_the_environment(monkeypatch):
    for value, want in (("bypass", True), ("mkl", False), (" Bypass ", True)):
        monkeypatch.setenv("MINIMIND_CPU_MATMUL", value)
        assert layers._avoid_mkl() is want
    monkeypatch.delenv("MINIMIND_CPU_MATMUL")
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        amd = any(line.startswith("vendor_id") and "AMD" in line for line in f)
    assert layers._avoid_mkl() is amd


@pytest.mark.slow
def test_decoding_equals_eager_either_way(monkeypatch):
    """Compiled steps (batch 3 and 1) and compiled n-gram speculation with 2 drafts
    (3-column verifications) with reductions or not, and eager decoding with oneDNN, give the
    tokens of eager decoding with F.linear."""
    model = wide_model().eval()
    kw = dict(max_new_tokens=20, temperature=0, stop_token_ids=())
    repeats = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
    monkeypatch.setattr(layers, "AVOID_MKL", False)
    want = {i: generate(model, p, **kw) for i, p in enumerate((PROMPTS, PROMPTS[:1], repeats))}
    for avoid in (True, False):
        monkeypatch.setattr(layers, "AVOID_MKL", avoid)
        torch._dynamo.reset()
        for i, prompts in enumerate((PROMPTS, PROMPTS[:1])):
            assert generate(model, prompts, **kw, compile=True) == want[i], (avoid, i)
            assert generate(model, prompts, **kw) == want[i], (avoid, i)
        spec = generate(model, repeats, **kw, compile=True, draft="ngram", num_draft_tokens=2)
        assert spec == want[2], avoid
    torch._dynamo.reset()
