"""Interchange details (issue 14, section 3): a `.pth` without a tokenizer gets MiniMind2's
(shipped with the package), the head count a `.pth` does not record is a flag everywhere its
size flags are (chat, convert, train) with an error that names it and the counts the shapes
allow, --preset names the weights, and a transformers export keeps the checkpoint's precision."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from minimind.checkpoint import CheckpointError, save_checkpoint
from minimind.convert.cli import main as convert_main
from minimind.convert.minimind2 import MINIMIND2_TOKENIZER, save_minimind2_pth
from minimind.infer.load import add_model_args, load_from_args, load_model
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import load_tokenizer
from tests.infer_fixtures import VOCAB, make_tokenizer

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("interchange"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty MINIMIND_HOME: no model/tokenizer to fall back on."""
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def demo_model(vocab: int = VOCAB, seed: int = 0) -> MiniMindForCausalLM:
    """The demo preset's shape (hidden 192, 6 query heads of 32, 2 key/value heads)."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset("demo", vocab_size=vocab)).eval()


def logits(model, ids=(1, 5, 9, 42, 7)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


# --- MiniMind2's tokenizer, shipped ----------------------------------------------------------


def test_minimind2_tokenizer_ships_as_attributed_package_data():
    assert {p.name for p in MINIMIND2_TOKENIZER.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "TOKENIZER_NOTICE",
        "LICENSE-APACHE-2.0",
    }
    notice = (MINIMIND2_TOKENIZER / "TOKENIZER_NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and "github.com/jingyaogong/minimind" in notice
    assert "Apache License" in (MINIMIND2_TOKENIZER / "LICENSE-APACHE-2.0").read_text()
    # packaged: an installed (non-editable) minimind carries the folder
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\n"minimind.convert" = ["minimind2_tokenizer/*"]' in (
        pyproject
    )
    tokenizer = load_tokenizer(MINIMIND2_TOKENIZER)
    assert tokenizer.vocab_size == 6400 and tokenizer.chat_template
    assert tokenizer.encode("<|im_start|>") == [1]


def test_pth_without_a_tokenizer_gets_minimind2s(tmp_path, home):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset("tiny", vocab_size=6400, num_attention_heads=8)).eval()
    save_minimind2_pth(model, tmp_path / "out" / "full_sft_64.pth")
    loaded = load_model(tmp_path / "out" / "full_sft_64.pth", device="cpu")
    text = "你好, MiniMind2!"
    assert loaded.tokenizer.encode(text) == load_tokenizer(MINIMIND2_TOKENIZER).encode(text)
    # a .pth whose vocabulary is not MiniMind2's is not given MiniMind2's tokenizer
    save_minimind2_pth(demo_model(), tmp_path / "small" / "x.pth")
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path / "small" / "x.pth", device="cpu", num_attention_heads=6)
    assert f"MiniMind2's tokenizer (6400 ids) does not fit its {VOCAB} ids" in str(e.value)
    assert "--tokenizer" in str(e.value)


def test_convert_with_minimind_flags_writes_a_tokenizer_into_every_hf_folder(tmp_path, home, tok):
    torch.manual_seed(0)
    big = MiniMindForCausalLM(preset("tiny", vocab_size=6400, num_attention_heads=8)).eval()
    save_minimind2_pth(big, tmp_path / "out" / "full_sft_64.pth")
    argv = ["--weight", "full_sft", "--hidden_size", "64", "--save_dir", str(tmp_path / "out")]
    assert convert_main([*argv, "--transformers_path", str(tmp_path / "hf")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "TOKENIZER_NOTICE"):
        assert (tmp_path / "hf" / name).is_file(), name  # MiniMind2's, with its attribution
    # the demo's layout: the .pth beside our checkpoint folder of the same name and tokenizer
    save_checkpoint(tmp_path / "out" / "full_sft_192", demo_model(), tokenizer_dir=tok)
    save_minimind2_pth(demo_model(), tmp_path / "out" / "full_sft_192.pth")
    argv = ["--weight", "full_sft", "--preset", "demo", "--save_dir", str(tmp_path / "out")]
    assert convert_main([*argv, "--transformers_path", str(tmp_path / "hf2")]) == 0
    assert (tmp_path / "hf2" / "tokenizer.json").read_bytes() == (
        tok / "tokenizer.json"
    ).read_bytes()


# --- the head count a .pth does not record ----------------------------------------------------


@pytest.fixture
def demo_pth(tmp_path, tok) -> Path:
    """out/full_sft_192.pth of the demo preset's shape, its tokenizer beside it."""
    out = tmp_path / "out"
    save_minimind2_pth(demo_model(), out / "full_sft_192.pth")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # as MiniMind keeps them in model/
        shutil.copy(tok / name, out / name)
    return out / "full_sft_192.pth"


def test_the_head_count_error_names_the_flag_and_the_counts_the_shapes_allow(demo_pth):
    with pytest.raises(CheckpointError) as e:
        load_model(demo_pth, device="cpu")  # MiniMind2's 8 heads do not fit 192 = 6 x 32
    message = str(e.value)
    assert "--num_attention_heads 8 (MiniMind2's, the default) does not fit" in message
    assert "6 (head_dim 32)" in message and "--preset" in message
    loaded = load_model(demo_pth, device="cpu", num_attention_heads=6)
    config = loaded.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 2, 32)
    ref = demo_model().half().float()  # the .pth is fp16
    torch.testing.assert_close(logits(loaded.model), logits(ref))


def chat_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return parser.parse_args([*argv, "--device", "cpu"])


def test_chat_flags_take_the_head_count_and_the_preset(demo_pth):
    out = str(demo_pth.parent)
    by_heads = load_from_args(chat_args("--load_from", str(demo_pth), "--num_attention_heads", "6"))
    by_preset = load_from_args(
        chat_args("--save_dir", out, "--weight", "full_sft", "--preset", "demo")
    )
    assert by_preset.path == demo_pth  # --preset demo names full_sft_192, not full_sft_512
    for loaded in (by_heads, by_preset):
        assert loaded.model.config.num_attention_heads == 6
    with pytest.raises(ValueError, match=r"--hidden_size 640 \(the preset: 192\)"):
        load_from_args(chat_args("--save_dir", out, "--preset", "demo", "--hidden_size", "640"))
    # a folder's config.json says its heads: a flag that contradicts it is refused
    folder = save_checkpoint(demo_pth.parent / "ckpt", demo_model())
    with pytest.raises(CheckpointError, match=r"--num_attention_heads 3 \(its config.json: 6\)"):
        load_from_args(chat_args("--load_from", str(folder), "--num_attention_heads", "3"))


def test_convert_takes_the_head_count_and_the_preset(demo_pth, tmp_path, capsys):
    argv = ["--weight", "full_sft", "--save_dir", str(demo_pth.parent)]
    assert convert_main([*argv, "--hidden_size", "192", "--transformers_path", "x"]) == 1
    err = capsys.readouterr().err
    assert "--num_attention_heads 8 (MiniMind2's, the default) does not fit" in err
    assert "6 (head_dim 32)" in err
    heads = ["--hidden_size", "192", "--num_attention_heads", "6"]
    assert convert_main([*argv, *heads, "--transformers_path", str(tmp_path / "a")]) == 0
    assert (
        convert_main([*argv, "--preset", "demo", "--transformers_path", str(tmp_path / "b")]) == 0
    )
    a = load_model(tmp_path / "a", device="cpu").model
    b = load_model(tmp_path / "b", device="cpu").model
    torch.testing.assert_close(logits(a), logits(b), atol=0, rtol=0)
    assert a.config.num_attention_heads == 6


def test_train_from_weight_takes_the_head_count_and_the_preset(demo_pth, tok):
    from minimind.train.cli import UsageError, build_model, build_parser, size_flags

    save_dir = demo_pth.parent
    tokenizer = load_tokenizer(tok)

    def model(*argv: str):
        args = build_parser("sft").parse_args(["--from_weight", "full_sft", *argv])
        args.size_given = size_flags(args)
        return build_model(args, tokenizer, save_dir)

    assert model("--preset", "demo").config.num_attention_heads == 6  # finds full_sft_192.pth
    heads = model("--hidden_size", "192", "--num_attention_heads", "6").config
    assert (heads.num_attention_heads, heads.num_key_value_heads) == (6, 2)
    with pytest.raises(UsageError, match=r"--num_attention_heads 8 .*6 \(head_dim 32\)"):
        model("--hidden_size", "192")
    save_checkpoint(save_dir / "full_sft_192", demo_model())  # the folder is preferred
    with pytest.raises(UsageError, match=r"--preset tiny .*disagree with --from_weight"):
        model("--preset", "tiny", "--from_weight", str(save_dir / "full_sft_192"))


# --- the transformers export's precision -----------------------------------------------------


def test_hf_export_keeps_the_checkpoints_precision_and_says_it(tmp_path, tok, capsys):
    transformers = pytest.importorskip("transformers")
    model = demo_model()
    save_minimind2_pth(model, tmp_path / "m.pth")  # fp16: widened to float32, exactly
    argv = ["--input", str(tmp_path / "m.pth"), "--num_attention_heads", "6"]
    assert convert_main([*argv, "--output", str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 0
    assert "float32" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert next(hf.parameters()).dtype == torch.float32
    ours = load_model(tmp_path / "m.pth", tokenizer=tok, device="cpu", num_attention_heads=6).model
    with torch.no_grad():
        theirs = hf(torch.tensor([[1, 5, 9, 42, 7]])).logits.float()
    assert (theirs - logits(ours)).abs().max() < 1e-5  # a float16 export differed by ~1e-3
    save_checkpoint(tmp_path / "bf16", model, dtype="bf16", tokenizer_dir=tok)
    argv = ["--input", str(tmp_path / "bf16"), "--output", str(tmp_path / "hf_bf16")]
    assert convert_main(argv) == 0
    assert "bfloat16" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_bf16")
    assert next(hf.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["model", "tokenizer"])
def test_pth_finds_the_tokenizer_of_its_layout(tmp_path, home, tok, layout):
    """MiniMind keeps `out/` beside `model/` (the tokenizer files); a pipeline workdir keeps
    `out/` beside `tokenizer/`: a .pth in either finds its tokenizer without --tokenizer."""
    save_minimind2_pth(demo_model(), tmp_path / "out" / "chat_192.pth")
    shutil.copytree(tok, tmp_path / layout)
    loaded = load_model(tmp_path / "out" / "chat_192.pth", device="cpu", num_attention_heads=6)
    assert loaded.tokenizer.encode("hello world") == load_tokenizer(tok).encode("hello world")


def test_the_web_page_takes_the_head_count_and_the_preset(demo_pth):
    from minimind.serve import web

    for flags in (["--num_attention_heads", "6"], ["--preset", "demo"]):
        args = web.parse_app_args(["--load_from", str(demo_pth), "--device", "cpu", *flags])
        loaded = web.load(web.load_spec(demo_pth, args))
        assert loaded.model.config.num_attention_heads == 6, flags


def test_size_flags_that_contradict_load_from_weights_are_refused(demo_pth):
    out = demo_pth.parent
    folder = save_checkpoint(out / "ckpt192", demo_model())
    with pytest.raises(ValueError, match=r"--hidden_size 128 \(the weights: 192\)"):
        load_from_args(
            chat_args("--load_from", str(folder), "--tokenizer", str(out), "--hidden_size", "128")
        )
    with pytest.raises(ValueError, match=r"--use_moe 1 \(the weights: 0\)"):
        load_from_args(
            chat_args("--load_from", str(folder), "--tokenizer", str(out), "--use_moe", "1")
        )
    # MiniMind's defaults (512, 0) and agreeing flags pass: the weights set the size
    for flags in ([], ["--hidden_size", "192"]):
        loaded = load_from_args(
            chat_args("--load_from", str(folder), "--tokenizer", str(out), *flags)
        )
        assert loaded.model.config.hidden_size == 192
