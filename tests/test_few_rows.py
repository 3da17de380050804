"""layers.linear: in a CPU graph being compiled, a matmul of at most FEW_ROWS rows is traced as
per-row reductions where REDUCE_FEW_ROWS (an AMD CPU, or MINIMIND_CPU_FEW_ROWS=reduce), with
F.linear's values; more rows, dynamic row counts and eager calls keep F.linear; and compiled
decoding (steps, and a speculative verification of 3 columns) gives eager greedy's tokens with
the choice either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
    monkeypatch.setattr(layers, "REDUCE_FEW_ROWS", reduce)
    torch.manual_seed(0)
    weight = torch.randn(96, 48)
    for rows in range(1, layers.FEW_ROWS + 2):
        x = torch.randn(1, rows, 48)
        ops, y = traced_ops(layers.linear, x, weight)
        assert (F.linear in ops) == (not reduce or rows > layers.FEW_ROWS), (rows, ops)
        assert y.shape == (1, rows, 96)
        torch.testing.assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    # eager, and a row count that is symbolic in the graph: F.linear
    x = torch.randn(3, 48)
    assert torch.equal(layers.linear(x, weight), F.linear(x, weight))
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 0)
    ops, y = traced_ops(layers.linear, x, weight, dynamic=None)
    assert F.linear in ops
    torch._dynamo.reset()


def test_the_choice_follows_the_environment(monkeypatch):
    for value, want in (("reduce", True), ("blas", False), (" Reduce ", True)):
        monkeypatch.setenv("MINIMIND_CPU_FEW_ROWS", value)
        assert layers._blas_slow_for_few_rows() is want
    monkeypatch.delenv("MINIMIND_CPU_FEW_ROWS")
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        amd = any(line.startswith("vendor_id") and "AMD" in line for line in f)
    assert layers._blas_slow_for_few_rows() is amd


@pytest.mark.slow
@pytest.mark.parametrize("reduce", [True, False])
def test_compiled_decoding_equals_eager_either_way(monkeypatch, reduce):
    """Inductor's code for both forms: compiled steps (batch 3 and 1) and compiled n-gram
    speculation with 2 drafts (3-column verifications) give eager plain greedy's tokens."""
    monkeypatch.setattr(layers, "REDUCE_FEW_ROWS", reduce)
    torch._dynamo.reset()
    model = wide_model().eval()
    kw = dict(max_new_tokens=20, temperature=0, stop_token_ids=())
    for prompts in (PROMPTS, PROMPTS[:1]):
        assert generate(model, prompts, **kw, compile=True) == generate(model, prompts, **kw)
    repeats = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
    spec = generate(model, repeats, **kw, compile=True, draft="ngram", num_draft_tokens=2)
    assert spec == generate(model, repeats, **kw)
    torch._dynamo.reset()
