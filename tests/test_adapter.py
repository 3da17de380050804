"""The LoRA adapter folder has one writer and one reader (minimind.adapter); MiniMind's adapter
`.pth` is parsed in minimind.convert.minimind2. No other module spells the file names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import minimind
from minimind import adapter
from minimind.checkpoint import CheckpointError, save_checkpoint
from minimind.convert.minimind2 import read_minimind2_lora
from minimind.infer.load import load_model
from minimind.model.lora import LoRAConfig, apply_lora, lora_state_dict
from minimind.train.stages.lora import adapter_files as stage_adapter_files
from tests.infer_fixtures import make_tokenizer, tiny_chat_model

PACKAGE = Path(minimind.__file__).resolve().parent


def trained_adapter(config: LoRAConfig):
    model = tiny_chat_model()
    apply_lora(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn_like(p) * 0.1)  # B is zero at init: make the adapter matter
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 42, 7]])).logits


def test_the_writer_and_the_reader_round_trip(tmp_path):
    config = LoRAConfig(r=4, alpha=8.0, target_modules=("q_proj", "down_proj"))
    adapted = trained_adapter(config)
    folder = adapter.save_adapter(tmp_path / "lora", adapted, config)
    assert {p.name for p in folder.iterdir()} == {adapter.CONFIG_NAME, adapter.WEIGHTS_NAME}
    read_config, tensors = adapter.read_adapter(folder)
    assert read_config == config and tensors.keys() == lora_state_dict(adapted).keys()
    base = tiny_chat_model()
    adapter.merge_adapter(base, folder)
    torch.testing.assert_close(logits(base), logits(adapted), atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in base.state_dict())  # merged: a plain model again


def test_the_stage_export_is_read_by_the_same_reader(tmp_path):
    """`minimind train lora` exports the merged model with the adapter beside it: the files
    come from adapter.adapter_files, and load_model --lora reads them through merge_adapter."""
    assert stage_adapter_files is adapter.adapter_files  # the stage writes with the module
    config = LoRAConfig(r=2, alpha=4.0)
    adapted = trained_adapter(config)
    tok = make_tokenizer(tmp_path / "t")
    base = save_checkpoint(tmp_path / "base", tiny_chat_model(), tokenizer_dir=tok)
    files = stage_adapter_files(adapted, config)
    export = save_checkpoint(tmp_path / "export", tiny_chat_model(), extra_files=files)
    assert adapter.is_adapter_folder(export)
    merged = load_model(base, device="cpu", lora=export).model
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)


def test_errors_name_the_file(tmp_path):
    config = LoRAConfig(r=2)
    folder = adapter.save_adapter(tmp_path / "lora", trained_adapter(config), config)
    (folder / adapter.CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match=r"lora/adapter_config\.json: not a LoRA adapter"):
        adapter.read_adapter(folder)
    wide = LoRAConfig(r=2, target_modules=("q_proj",))
    folder = adapter.save_adapter(tmp_path / "wide", trained_adapter(wide), wide)
    other = tiny_chat_model(hidden_size=128)  # another base: the shapes differ
    with pytest.raises(CheckpointError, match=r"wide/adapter\.safetensors: .*shape"):
        adapter.merge_adapter(other, folder)
    assert not any("lora" in k for k in other.state_dict())  # left plain
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        adapter.read_adapter(tmp_path)


def test_minimind_lora_pth_is_parsed_in_convert(tmp_path):
    a, b = torch.randn(8, 64), torch.randn(64, 8)
    name = "model.layers.0.self_attn.o_proj"
    torch.save({f"{name}.lora.A.weight": a, f"{name}.lora.B.weight": b}, tmp_path / "l.pth")
    pairs = read_minimind2_lora(tmp_path / "l.pth")
    assert list(pairs) == [name] and torch.equal(pairs[name][0], a)


def string_constants(path: Path) -> set[str]:
    """String literals of a module, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }


@pytest.mark.parametrize(
    "part", ["train", "infer", "convert", "serve", "eval", "model", "pipeline"]
)
def test_only_the_adapter_module_spells_the_file_names(part):
    names = {adapter.CONFIG_NAME, adapter.WEIGHTS_NAME}
    spelled = [
        str(path.relative_to(PACKAGE))
        for path in sorted((PACKAGE / part).rglob("*.py"))
        if any(name in text for text in string_constants(path) for name in names)
    ]
    assert spelled == [], "use minimind.adapter's CONFIG_NAME / WEIGHTS_NAME"
    assert any(n in t for t in string_constants(PACKAGE / "adapter.py") for n in names)
