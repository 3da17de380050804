"""minimind.infer.load: every kind of model file loads with its tokenizer, by path and by
MiniMind's flags; LoRA adapters (ours and MiniMind's) are merged exactly; errors name paths."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from minimind.checkpoint import CheckpointError, save_checkpoint
from minimind.convert import export_hf_folder, save_minimind2_pth
from minimind.infer.load import (
    add_model_args,
    apply_adapter,
    find_weight,
    load_from_args,
    load_model,
)
from minimind.model.lora import LoRAConfig, apply_lora, lora_config_dict, lora_state_dict
from tests.infer_fixtures import make_checkpoint, tiny_chat_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load"))


def _logits(model, ids=(1, 5, 9, 42, 7)):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_our_checkpoint(ckpt):
    loaded = load_model(ckpt, device="cpu")
    assert loaded.kind == "minimind" and loaded.name == "model"
    assert not loaded.model.training
    assert loaded.tokenizer.vocab_size == 400
    assert "minimind" in loaded.describe()
    torch.testing.assert_close(_logits(loaded.model), _logits(tiny_chat_model()))


def test_pth_finds_tokenizer_beside_it(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a .pth does not say its head count: MiniMind2's 8 heads are assumed
    save_minimind2_pth(tiny_chat_model(num_attention_heads=8), out / "full_sft_64.pth")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(out / "full_sft_64.pth", device="cpu")
    shutil.copy(ckpt / "tokenizer.json", out / "tokenizer.json")
    loaded = load_model(out / "full_sft_64.pth", device="cpu")
    assert loaded.kind == "pth" and loaded.name == "full_sft_64"
    # fp16 storage: equal to the fp16-rounded weights
    ref = tiny_chat_model(num_attention_heads=8).half().float()
    torch.testing.assert_close(_logits(loaded.model), _logits(ref))


def test_transformers_folder(ckpt, tmp_path):
    export_hf_folder(tiny_chat_model(), tmp_path / "hf", ckpt, torch.float32)
    loaded = load_model(tmp_path / "hf", device="cpu")
    assert loaded.kind == "hf"
    torch.testing.assert_close(_logits(loaded.model), _logits(tiny_chat_model()))


def test_minimind_flags(ckpt, tmp_path):
    save_checkpoint(tmp_path / "full_sft_64", tiny_chat_model(), tokenizer_dir=ckpt)
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(
        ["--save_dir", str(tmp_path), "--hidden_size", "64", "--device", "cpu"]
    )
    assert load_from_args(args).path == tmp_path / "full_sft_64"
    args = parser.parse_args(["--load_from", str(ckpt), "--dtype", "bf16", "--device", "cpu"])
    assert next(load_from_args(args).model.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="pretrain_64"):
        find_weight("pretrain", 64, False, tmp_path)


def test_our_lora_adapter_is_merged(ckpt, tmp_path):
    config = LoRAConfig(r=4, alpha=8.0)
    adapted = tiny_chat_model()
    apply_lora(adapted, config)
    torch.manual_seed(1)
    for p in lora_state_dict(adapted).values():
        p.copy_(torch.randn_like(p) * 0.1)  # a trained-looking adapter (B is zero at init)
    folder = tmp_path / "lora_x_64"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in lora_state_dict(adapted).items()},
        str(folder / "adapter.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps(lora_config_dict(config)))
    loaded = load_model(ckpt, device="cpu", lora=folder)
    torch.testing.assert_close(_logits(loaded.model), _logits(adapted.eval()), atol=1e-5, rtol=1e-5)
    assert _logits(loaded.model).sub(_logits(tiny_chat_model())).abs().max() > 1e-3


def test_minimind_lora_pth_is_merged(ckpt, tmp_path):
    torch.manual_seed(2)
    model = tiny_chat_model()
    target = model.model.layers[0].self_attn.o_proj  # MiniMind adapts the square layers
    a = torch.randn(8, target.in_features) * 0.1
    b = torch.randn(target.out_features, 8) * 0.1
    path = tmp_path / "lora_identity_64.pth"
    torch.save(
        {
            "model.layers.0.self_attn.o_proj.lora.A.weight": a,
            "model.layers.0.self_attn.o_proj.lora.B.weight": b,
        },
        path,
    )
    x = torch.randn(3, target.in_features)
    expected = target(x) + x @ a.T @ b.T
    apply_adapter(model, path)
    torch.testing.assert_close(target(x), expected, atol=1e-5, rtol=1e-5)
    torch.save({"model.layers.0.self_attn.o_proj.lora.A.weight": a}, path)
    with pytest.raises(CheckpointError, match=r"lora_identity_64\.pth"):
        apply_adapter(model, path)


def test_vocabulary_mismatch_is_an_error(ckpt, tmp_path):
    bigger = save_checkpoint(
        tmp_path / "small", tiny_chat_model(vocab_size=256), tokenizer_dir=ckpt
    )
    with pytest.raises(CheckpointError, match="400 tokens"):
        load_model(bigger, device="cpu")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
