"""Token shards (minimind.data.prepare, .shards), the batches over them (.packing, .padding)
and `data download`'s offline path: round trips against the tokenizer, idempotence, kill
safety, worker-count determinism, packing and padding invariants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

from minimind.data import shards as fmt
from minimind.data.commands import download_main, prepare_main
from minimind.data.demo import write_demo_corpus
from minimind.data.download import FILES, DownloadError, download
from minimind.data.formats import DataError, RecordReader
from minimind.data.packing import PackedDataset, document_causal_mask
from minimind.data.padding import (
    IGNORE_INDEX,
    DPODataset,
    PromptDataset,
    SFTDataset,
    padding_waste,
)
from minimind.data.prepare import StaleShardsError, cached_differences, prepare
from minimind.data.sampler import length_grouped_order
from minimind.data.shards import Shards
from minimind.data.texts import iter_texts
from minimind.tokenizer import encode_chat, load_tokenizer, render, train_tokenizer
from minimind.tokenizer.tokenizer import Tokenizer
from tests import REFERENCE

SMALL = {"shard_tokens": 4000, "chunk_lines": 64}  # several chunks per shard, several shards


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0, size_mb=0.3)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    texts = iter_texts([corpus["pretrain"], corpus["sft"]])
    return train_tokenizer(texts, folder, vocab_size=600, show_progress=False)


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus, tok_dir):
    """Kind -> shard folder, each prepared once with small shards."""
    root = tmp_path_factory.mktemp("shards")
    return {
        kind: prepare(corpus[kind], tok_dir, root / kind, **SMALL).folder
        for kind in ("pretrain", "sft", "reasoning", "dpo", "rlaif")
    }


def records(path: Path) -> list:
    return list(RecordReader(path))


def messages(conv) -> list[dict]:
    return [m.to_dict() for m in conv.messages]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- round trips


def test_pretrain_round_trip(prepared, corpus, tok):
    shards = Shards(prepared["pretrain"])
    texts = [r.text for r in records(corpus["pretrain"])]
    assert len(shards.meta["shards"]) > 1 and shards.dtype == np.uint16
    assert len(shards) == len(texts)
    for i, text in enumerate(texts):  # bos + text + eos, as MiniMind frames a sample
        ids = shards.doc(i).tolist()
        assert ids == [tok.bos_id, *tok.encode(text), tok.eos_id]
        assert tok.decode(ids) == tok.bos_token + text + tok.eos_token
    # The stream is the documents back to back.
    stream = shards.tokens(0, shards.num_tokens)
    framed = "".join(tok.bos_token + t + tok.eos_token for t in texts)
    assert tok.decode(stream.tolist()) == framed


def test_older_format_version_is_refused_by_the_reader_and_rebuilt_by_prepare(
    tmp_path, corpus, tok_dir
):
    out = tmp_path / "out"
    first = prepare(corpus["pretrain"], tok_dir, out, **SMALL)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": 1}))  # as v1 wrote it
    with pytest.raises(ValueError, match=r"v1, this reader needs v2 .*bos \+ text \+ eos"):
        Shards(out)
    again = prepare(corpus["pretrain"], tok_dir, out, **SMALL)  # no StaleShardsError
    assert again.reused == 0 and again.docs == first.docs and Shards(out).meta["version"] == 2


@pytest.mark.parametrize("kind", ["sft", "reasoning"])
def test_chat_masks_equal_encode_chat(prepared, corpus, tok, kind):
    shards = Shards(prepared[kind])
    convs = records(corpus[kind])
    assert len(shards) == len(convs)
    for i, conv in enumerate(convs):
        ids, mask = encode_chat(tok, messages(conv), conv.tools)
        assert shards.doc(i).tolist() == ids
        assert shards.doc_mask(i).tolist() == mask


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="MiniMind2 reference tokenizer absent")
def test_reference_tokenizer_masks(tmp_path, corpus):
    shards = Shards(prepare(corpus["sft"], REFERENCE, tmp_path, chunk_lines=64).folder)
    ref = load_tokenizer(REFERENCE)
    for i, conv in enumerate(records(corpus["sft"])[:50]):
        ids, mask = encode_chat(ref, messages(conv), conv.tools)
        assert shards.doc(i).tolist() == ids and shards.doc_mask(i).tolist() == mask


def test_dpo_pairs_aligned(prepared, corpus, tok):
    shards, data = Shards(prepared["dpo"]), DPODataset(prepared["dpo"])
    pairs = records(corpus["dpo"])
    assert len(shards) == len(data) == len(pairs) and shards.num_docs == 2 * len(pairs)
    for i, pair in enumerate(pairs):
        for doc, conv in ((2 * i, pair.chosen), (2 * i + 1, pair.rejected)):
            ids, mask = encode_chat(tok, messages(conv), conv.tools)
            assert shards.doc(doc).tolist() == ids and shards.doc_mask(doc).tolist() == mask
    item = data[3]
    ids, mask = encode_chat(tok, messages(pairs[3].rejected))
    want = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    assert item["rejected_labels"].tolist() == want
    batch = data.collate([data[0], data[1]])
    assert {v.shape for v in batch.values()} == {batch["chosen_input_ids"].shape}


def test_rlaif_prompts_and_answers(prepared, corpus, tok):
    data = PromptDataset(prepared["rlaif"])
    recs = records(corpus["rlaif"])
    assert len(data) == len(recs)
    for i, rec in enumerate(recs):
        prompt = render(messages(rec.conversation)[:-1], rec.conversation.tools, True)
        assert data[i]["prompt_ids"].tolist() == tok.encode(prompt)
        assert data[i]["answer"] == rec.answer


def test_uint32_when_vocabulary_exceeds_uint16(tmp_path, tok_dir):
    backend = load_tokenizer(tok_dir).backend
    extra = 65600 - backend.get_vocab_size()
    backend.add_tokens([AddedToken(f"<x{i}>", normalized=False) for i in range(extra)])
    big = Tokenizer(backend).save(tmp_path / "big")
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"text": f"a <x{extra - 1}> b"}) + "\n", encoding="utf-8")
    shards = Shards(prepare(data, big, tmp_path / "out").folder)
    assert shards.dtype == np.uint32
    assert shards.doc(0).max() == 65599
    want = backend.encode(f"a <x{extra - 1}> b", add_special_tokens=False).ids
    assert shards.doc(0).tolist() == [1, *want, 2]  # bos, text, eos


def test_max_seq_len_cuts_chat_documents(tmp_path, corpus, tok_dir, prepared):
    full = Shards(prepared["sft"])
    T = int(np.median(full.doc_lengths()))  # half the documents are cut
    report = prepare(corpus["sft"], tok_dir, tmp_path, max_seq_len=T)
    cut = Shards(report.folder)
    assert report.truncated == int((full.doc_lengths() > T + 1).sum()) > 0
    assert cut.doc_lengths().max() == T + 1
    # a document whose first T + 1 tokens hold no assistant target trains nothing: dropped and
    # counted (a batch of them would be a step with loss 0)
    trains = [i for i in range(len(full)) if full.mask(*full.doc_span(i))[1 : T + 1].any()]
    assert 0 < report.untrained == len(full) - len(trains) == len(full) - len(cut)
    assert "dropped (no assistant token within max_seq_len" in report.format()
    for j, i in enumerate(trains):
        assert cut.doc(j).tolist() == full.doc(i)[: T + 1].tolist()


# ---------------------------------------------------------------- idempotence and safety


def test_rerun_skips_and_stale_is_refused(tmp_path, corpus, tok_dir):
    data = tmp_path / "sft.jsonl"
    shutil.copy(corpus["sft"], data)
    out = tmp_path / "out"
    first = prepare(data, tok_dir, out, **SMALL)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(data, tok_dir, out, **SMALL)
    assert again.reused == again.shards == first.shards > 1 and again.bytes_done == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    with pytest.raises(StaleShardsError, match=r"settings\.max_seq_len: None -> 64"):
        prepare(data, tok_dir, out, max_seq_len=64, **SMALL)
    other_tok = train_tokenizer(iter_texts([data]), tmp_path / "tok2", 300, show_progress=False)
    with pytest.raises(StaleShardsError, match=r"tokenizer\.blake2b"):
        prepare(data, other_tok, out, **SMALL)
    with data.open("a", encoding="utf-8") as f:  # same size and mtime would not be enough
        f.write(data.read_text(encoding="utf-8").splitlines()[0] + "\n")
    with pytest.raises(StaleShardsError, match="--overwrite"):
        prepare(data, tok_dir, out, **SMALL)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    redone = prepare(data, tok_dir, out, overwrite=True, **SMALL)
    assert redone.reused == 0 and redone.docs == first.docs + 1
    (out / "meta.json").unlink()  # shards whose origin cannot be checked
    with pytest.raises(StaleShardsError, match=r"no meta\.json"):
        prepare(data, tok_dir, out, **SMALL)


def test_cached_differences_judge_by_stamp_and_tokenizer(tmp_path, corpus, tok_dir):
    import os

    data = tmp_path / "pretrain.jsonl"
    shutil.copy(corpus["pretrain"], data)
    out = tmp_path / "out"
    assert cached_differences(out, data, tok_dir) is None  # nothing prepared there
    prepare(data, tok_dir, out, **SMALL)
    assert cached_differences(out, data, tok_dir, max_seq_len=None) == []
    assert cached_differences(out, data, tok_dir, max_seq_len=64) == ["max_seq_len: None -> 64"]
    meta = (out / "meta.json").read_bytes()
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    assert cached_differences(out, data, tok_dir) == ["the input was modified (mtime)"]
    again = prepare(data, tok_dir, out, **SMALL)  # the full blake2b agrees: nothing rewritten
    assert again.bytes_done == 0 and cached_differences(out, data, tok_dir) == []
    assert json.loads((out / "meta.json").read_bytes())["shards"] == json.loads(meta)["shards"]
    raw = bytearray(data.read_bytes())
    raw[5:9] = b"XXXX"  # same size, another content
    data.write_bytes(bytes(raw))
    assert cached_differences(out, data, tok_dir) == ["the input's content changed"]
    other = tmp_path / "tok2"
    shutil.copytree(tok_dir, other)
    (other / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text() + " ")
    assert "the tokenizer changed" in " ".join(cached_differences(out, data, other))


def test_interrupted_prepare_resumes_to_identical_shards(tmp_path, corpus, tok_dir, monkeypatch):
    clean = prepare(corpus["sft"], tok_dir, tmp_path / "clean", **SMALL).folder
    out = tmp_path / "out"
    assert len(list(clean.glob("shard_*.json"))) >= 4
    real_add = fmt.ShardWriter.add

    def dying_add(self, *args, **kwargs):
        real_add(self, *args, **kwargs)
        if self.index == 2:  # killed in the middle of shard 2, after a chunk went to disk
            raise KeyboardInterrupt

    monkeypatch.setattr(fmt.ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus["sft"], tok_dir, out, **SMALL)
    monkeypatch.undo()
    finished = sorted(p.name for p in out.glob("shard_*.json"))
    assert finished == ["shard_00000.json", "shard_00001.json"]
    assert not list(out.glob("*.tmp"))  # the open shard's temp files were removed
    with pytest.raises(ValueError, match="did not finish"):
        Shards(out)
    # What a SIGKILL can leave: temp files, and data files renamed before their record.
    (out / "shard_00007.tokens.bin.tmp").write_bytes(b"junk")
    n = len(finished)
    (out / f"{fmt.shard_name(n)}.tokens.bin").write_bytes(b"half a shard")
    resumed = prepare(corpus["sft"], tok_dir, out, **SMALL)
    assert resumed.reused == n
    assert folder_bytes(out) == folder_bytes(clean)


def test_one_and_two_workers_write_identical_shards(tmp_path, corpus, tok_dir):
    one = prepare(corpus["sft"], tok_dir, tmp_path / "one", workers=1, **SMALL).folder
    two = prepare(corpus["sft"], tok_dir, tmp_path / "two", workers=2, **SMALL).folder
    assert folder_bytes(one) == folder_bytes(two)


def test_bad_lines_raise_with_location_or_are_skipped(tmp_path, corpus, tok_dir):
    lines = corpus["sft"].read_text(encoding="utf-8").splitlines()[:100]
    lines[4] = '{"conversations": [{"role": "bot", "content": "hi"}]}'
    lines[70] = "{not json"
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for workers in (1, 2):  # a worker's error reaches the caller intact
        with pytest.raises(DataError, match=r"bad\.jsonl:5: conversations\[0\]\.role"):
            prepare(data, tok_dir, tmp_path / f"raise{workers}", workers=workers, chunk_lines=16)
    report = prepare(data, tok_dir, tmp_path / "skip", kind="sft", on_error="skip", chunk_lines=16)
    assert report.summary.bad_lines == 2 and report.docs == 98
    assert "bad.jsonl:71: invalid JSON" in report.format()


# ---------------------------------------------------------------- batches


def test_packing_has_no_padding_and_covers_the_stream(prepared):
    shards = Shards(prepared["pretrain"])
    data = PackedDataset(shards, seq_len=64)
    assert len(data) == (shards.num_tokens - 1) // 64
    xs, ys = zip(*(data[i] for i in range(len(data))))
    inputs, labels = torch.cat(xs), torch.cat(ys)
    stream = torch.from_numpy(shards.tokens(0, len(data) * 64 + 1).astype(np.int64))
    assert torch.equal(inputs, stream[:-1]) and torch.equal(labels, stream[1:])
    assert all(len(x) == 64 for x in xs)  # no window is short, nothing is padded


def test_packing_document_ids_and_mask(prepared, tok):
    shards = Shards(prepared["pretrain"])
    data = PackedDataset(shards, seq_len=128, doc_ids=True)
    x, _, docs = data[5]
    # A new document starts right after each eos.
    assert docs[0] == 0 and torch.equal(docs[1:] - docs[:-1], (x[:-1] == tok.eos_id).long())
    mask = document_causal_mask(torch.stack([docs, docs]))
    assert mask.shape == (2, 1, 128, 128) and mask.dtype == torch.bool
    i, j = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    assert torch.equal(mask[0, 0], (j <= i) & (docs[i] == docs[j]))


def test_sft_labels_and_padding(prepared):
    data = SFTDataset(prepared["sft"])
    shards = data.shards
    for i in (0, 7, len(data) - 1):
        ids, mask = shards.doc(i).astype(np.int64), shards.doc_mask(i)
        item = data[i]
        assert item["input_ids"].tolist() == ids[:-1].tolist()
        want = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
        assert item["labels"].tolist() == want.tolist()
    batch = data.collate([data[0], data[1], data[2]])
    longest = max(len(data[k]["input_ids"]) for k in range(3))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, longest)
    short = min(range(3), key=lambda k: len(data[k]["input_ids"]))
    n = len(data[short]["input_ids"])
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == data.pad_id).all()


def test_length_grouping_wastes_less_padding(prepared):
    lengths = SFTDataset(prepared["sft"]).lengths
    B = 16

    def batches(order):
        return [order[k : k + B] for k in range(0, len(order), B)]

    shuffled = np.random.default_rng(0).permutation(len(lengths))
    grouped = length_grouped_order(lengths, seed=0, epoch=0, group_size=B)
    to_max = padding_waste(lengths, batches(shuffled), pad_to=int(lengths.max()))
    dynamic = padding_waste(lengths, batches(shuffled))
    bucketed = padding_waste(lengths, batches(grouped))
    assert bucketed < dynamic < to_max
    assert bucketed < 0.15, (bucketed, dynamic)  # 0.106 on the demo corpus at size 0.3 MB


def test_shards_pickle_without_data(prepared):
    import pickle

    shards = Shards(prepared["pretrain"])
    shards.tokens(0, 10)
    assert len(pickle.dumps(shards)) < 20_000
    assert pickle.loads(pickle.dumps(shards)).doc(3).tolist() == shards.doc(3).tolist()


# ---------------------------------------------------------------- command lines


def test_prepare_command(tmp_path, corpus, tok_dir, capsys):
    argv = ["--data_path", str(corpus["dpo"]), "--tokenizer", str(tok_dir)]
    argv += ["--out", str(tmp_path), "--workers", "1"]
    assert prepare_main(argv) == 0  # with the progress bar, on a captured stderr
    assert "dpo, 1 shards" in capsys.readouterr().out
    argv.append("--no-progress")
    assert prepare_main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert prepare_main([*argv, "--max_seq_len", "32"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_download_offline_explains_placing_files_by_hand(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and download checks it before any client call
    assert download_main(["sft_mini_512", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "huggingface.co/datasets/jingyaogong/minimind_dataset" in err
    assert "modelscope.cn/datasets/gongjy/minimind_dataset" in err
    assert str(tmp_path) in err and "  sft_mini_512.jsonl" in err
    with pytest.raises(DownloadError, match="offline"):
        download("dpo", "modelscope", tmp_path)
    (tmp_path / "dpo.jsonl").write_text("{}\n")  # already there: nothing to fetch
    assert download("dpo.jsonl", out_dir=tmp_path) == tmp_path / "dpo.jsonl"


def test_download_validates_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_main(["sft_4096", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert all(f.removesuffix(".jsonl") in err for f in FILES)
    with pytest.raises(ValueError, match="unknown source"):
        download("dpo", "github", tmp_path)
    with pytest.raises(SystemExit):
        download_main(["dpo", "--source", "github"])


def test_check_command_fails_on_a_file_without_records(tmp_path, capsys):
    from minimind.data.commands import check_main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert check_main([str(empty)]) == 1
    assert f"error: {empty} holds no records" in capsys.readouterr().out
