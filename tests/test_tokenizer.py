"""Tokenizer training, loading, encoding, streaming decode and the command line, for our
trained tokenizer and the MiniMind2 reference tokenizer."""

import json
import random
import runpy
import subprocess
import sys

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind.tokenizer import Tokenizer, compression, load_tokenizer, train_tokenizer
from minimind.tokenizer.tokens import IM_END, SPECIAL_TOKENS, TAG_TOKENS
from tests import REFERENCE, REPO

WORDS = [
    "the",
    " quick",
    " brown",
    " fox",
    "你好",
    "世界",
    "模型",
    "训练",
    "数据",
    "😀",
    "🚀",
    "\n",
    ". ",
    "，",
]
SAMPLE = "MiniMind 训练一个小模型。<think>\n想一想 🤔\n</think>\n<answer>42</answer><|im_end|>"


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # Literal `<|im_end|>` separators, as in MiniMind2's pretraining texts.
    return ["".join(rng.choice(WORDS) for _ in range(40)) + IM_END for _ in range(n)]


@pytest.fixture(scope="module")
def ours_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    assert train_tokenizer(iter(corpus(500)), folder, vocab_size=600, show_progress=False) == folder
    return folder


@pytest.fixture(scope="module")
def ours(ours_dir):
    return load_tokenizer(ours_dir)


@pytest.fixture(scope="module")
def reference():
    if not (REFERENCE / "tokenizer.json").exists():
        pytest.skip(f"MiniMind2 reference tokenizer not found at {REFERENCE}")
    return load_tokenizer(REFERENCE)


@pytest.fixture(params=["ours", "reference"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def test_special_tokens(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.special_ids == {0, 1, 2}
    assert tokenizer.encode(IM_END) == [2]
    assert tokenizer.decode(tokenizer.encode("a<|im_end|>"), skip_special_tokens=True) == "a"


def test_tags_are_single_visible_tokens_in_ours(ours):
    assert {t: ours.added_tokens[t] for t in TAG_TOKENS} == {
        t: 3 + i for i, t in enumerate(TAG_TOKENS)
    }
    for i, tag in enumerate(TAG_TOKENS):
        assert ours.encode(tag) == [3 + i]
        assert (3 + i) in ours.encode(f"x{tag}y")
    assert ours.decode(ours.encode(SAMPLE), skip_special_tokens=True) == SAMPLE.removesuffix(IM_END)


def test_tags_split_in_minimind2(reference):
    assert reference.vocab_size == 6400
    assert all(len(reference.encode(tag)) > 1 for tag in TAG_TOKENS)


def test_training_spends_no_merges_on_added_tokens(ours):
    assert ours.vocab_size <= 600
    assert ours.token_to_id("<|") is None and ours.token_to_id("|>") is None


def test_roundtrip_and_compression(tokenizer):
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    assert tokenizer.encode_batch([SAMPLE, "fox"]) == [
        tokenizer.encode(SAMPLE),
        tokenizer.encode("fox"),
    ]
    texts = corpus(20, seed=1)
    expected = sum(map(len, texts)) / sum(len(tokenizer.encode(t)) for t in texts)
    assert compression(tokenizer, texts) == pytest.approx(expected) and expected > 1


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_roundtrip_random_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), skip=st.booleans())
def test_stream_equals_full_decode(tokenizer, data, skip):
    # Random ids include invalid UTF-8; the stream must replace it exactly as decode does.
    # Ids past the vocabulary (a model's embedding may be larger) decode to nothing in both.
    tok = tokenizer
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size + 20), max_size=40))
    stream = tok.stream(skip_special_tokens=skip)
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_never_emits_half_characters(tokenizer):
    ids = tokenizer.encode(SAMPLE * 3)
    stream = tokenizer.stream()
    pieces = [stream.put(i) for i in ids]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + stream.flush() == SAMPLE * 3


def test_transformers_loads_our_folder(ours_dir, ours):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(ours_dir)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == SPECIAL_TOKENS[1:] + SPECIAL_TOKENS[:1]
    assert hf.encode(SAMPLE, add_special_tokens=False) == ours.encode(SAMPLE)
    assert hf.decode(ours.encode(SAMPLE), skip_special_tokens=True) == SAMPLE.removesuffix(IM_END)
    assert len(hf) == ours.vocab_size


def test_split_digits_encodes_numbers_digit_by_digit(tmp_path):
    # Numbers are frequent in this corpus, so without the option BPE merges them ("2026", " 12").
    rng = random.Random(1)
    texts = [
        " ".join(
            f"{rng.randint(0, 99)} + {rng.randint(0, 99)} = {rng.randint(0, 199)}"
            for _ in range(20)
        )
        + " 2026年11月29日，数学12加35等于47。"
        for _ in range(300)
    ]
    merged = load_tokenizer(train_tokenizer(texts, tmp_path / "a", 400, show_progress=False))
    assert any(len(merged.decode([i])) > 1 for i in merged.encode("12 + 35 = 47"))
    folder = train_tokenizer(texts, tmp_path / "b", 400, show_progress=False, split_digits=True)
    split = load_tokenizer(folder)
    text = "In 2026, 12 + 35 = 47; 数学12加35等于47。"
    pieces = [split.decode([i]) for i in split.encode(text)]
    assert "".join(pieces) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("20261235471235" + "47")
    assert split.fast is not None and split.fast.encode(text) == split.encode(text)
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(folder).encode(text) == split.encode(text)


def test_cjk_chunk_bounds_chinese_tokens(tmp_path):
    # A repetitive Chinese corpus: left alone, BPE learns whole clauses as single tokens.
    rng = random.Random(2)
    names, places = ["米拉", "托马斯", "莉娜", "费利克斯"], ["松谷镇", "石桥镇", "河湾镇"]
    texts = [
        "".join(f"{rng.choice(names)}住在{rng.choice(places)}。" for _ in range(10))
        for _ in range(300)
    ]
    text = "费利克斯住在石桥镇。米拉住在河湾镇。"
    for chunk in (None, 2):
        folder = train_tokenizer(texts, tmp_path / str(chunk), 400, False, cjk_chunk=chunk)
        tok = load_tokenizer(folder)
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        assert "".join(pieces) == text
        widest = max(len(p) for p in pieces)
        assert widest <= 2 if chunk else widest >= 5, pieces
        assert tok.fast is not None and tok.fast.encode(text) == tok.encode(text)


def test_save_keeps_minimind2_config(reference, tmp_path):
    reference.save(tmp_path)
    saved, original = (
        json.loads((d / "tokenizer_config.json").read_text()) for d in (tmp_path, REFERENCE)
    )
    for key in (
        "added_tokens_decoder",
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "chat_template",
    ):
        assert saved[key] == original[key], key
    again = load_tokenizer(tmp_path)
    assert again.encode(SAMPLE) == reference.encode(SAMPLE)


def test_bare_tokenizer_json(ours_dir, ours):
    bare = load_tokenizer(ours_dir / "tokenizer.json")
    assert bare.chat_template is None and bare.encode(SAMPLE) == ours.encode(SAMPLE)


def test_rejects_non_byte_level():
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS)})
    )
    with pytest.raises(ValueError, match="byte-level"):
        Tokenizer(backend)


def test_command_line(tmp_path, monkeypatch, capsys):
    # One pretrain file and one sft file: the command reads every MiniMind kind.
    pretrain, sft = tmp_path / "pretrain.jsonl", tmp_path / "sft.jsonl"
    pretrain.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus(200)),
        encoding="utf-8",
    )
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "🚀 fox"}]
    sft.write_text(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n", "utf-8")
    argv = ["train_tokenizer.py", "--data_path", str(pretrain), str(sft)]
    argv += ["--vocab_size", "500", "--out_dir", str(tmp_path / "tok")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "trainer" / "train_tokenizer.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "chars/token on 2 held-out texts" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok").encode("你好") != []


def test_command_line_passes_the_piece_options(tmp_path):
    from minimind.data.commands import tokenizer_train_main

    data = tmp_path / "pretrain.jsonl"
    texts = [t + " 2026 年 123" for t in corpus(200)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    argv = ["--data_path", str(data), "--vocab_size", "500", "--out_dir", str(tmp_path / "tok")]
    assert tokenizer_train_main([*argv, "--split_digits", "--cjk_chunk", "1"]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert [tok.decode([i]) for i in tok.encode("你好2026")] == ["你", "好", "2", "0", "2", "6"]


def test_imports_stay_at_the_bottom():
    # The tokenizer package sits under everything else and never needs torch or transformers.
    code = (
        "import sys, minimind.tokenizer; "
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith('minimind.') and not m.startswith('minimind.tokenizer')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
