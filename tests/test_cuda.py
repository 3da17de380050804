"""CUDA-only checks (marker `cuda`; skipped without a CUDA device): the paths CPU tests cannot
reach. bench/gpu.py runs them first on a lent GPU.

- The same weights give the same logits on CPU (fp32) and CUDA: fp32 within 1e-4 relative
  (TF32 off), bf16 autocast within bf16's rounding.
- Compiled static-cache greedy decoding on CUDA equals eager greedy decoding.
- Training on CUDA (bf16 autocast, fused AdamW) resumed from a step checkpoint ends
  bit-identical to the uninterrupted run (deterministic algorithms on).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from minimind.model import MiniMindForCausalLM, preset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def model(name: str = "demo", vocab: int = 2048, seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset(name, vocab_size=vocab)).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_logits_agree_between_cpu_and_cuda():
    cpu = model()
    ids = torch.randint(0, 2048, (4, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(ids).logits
        gpu = model().cuda()
        torch.backends.cuda.matmul.allow_tf32 = False
        assert rel(gpu(ids.cuda()).logits.cpu(), ref) < 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(ids.cuda()).logits.cpu()
    assert rel(low, ref) < 2e-2  # bf16 keeps 8 bits of mantissa


def test_compiled_decode_equals_eager_on_cuda():
    from minimind.infer import generate

    m = model().cuda()
    prompts = [[5, 17, 99, 3], [8, 8, 1000, 42, 7, 7]]
    eager = generate(m, prompts, max_new_tokens=24, temperature=0.0)
    compiled = generate(m, prompts, max_new_tokens=24, temperature=0.0, compile=True)
    assert compiled == eager


def test_resume_on_cuda_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from tests.train_fixtures import make_data, train

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        data = make_data(tmp_path / "data")
        kw = {"device": "cuda", "dtype": "bf16", "keep_last": 12}
        train(tmp_path / "ref", data["pretrain"], 8, resume=False, **kw)
        train(tmp_path / "cut", data["pretrain"], 8, resume=False, **kw)
        for step in range(5, 9):  # as if killed after step 4's checkpoint
            shutil.rmtree(tmp_path / "cut" / f"step_{step:08d}")
        train(tmp_path / "cut", data["pretrain"], 8, resume=True, **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    ref = load_file(str(tmp_path / "ref" / "step_00000008" / "model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "step_00000008" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
