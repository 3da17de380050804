"""`minimind eval` and its measures: perplexity against a hand computation, the command's table
and JSON on a tiny trained model over a tiny demo corpus, the three model formats, the error for
a missing corpus, and lm-evaluation-harness scoring the exported model exactly as we do.

The model is taught, by SFT through the engine, the answers to the first TAUGHT fact and
arithmetic questions of the held-out files, the chosen replies of the first TAUGHT_DPO held-out
preference pairs and the held-out reasoning replies, so it gets a known mix right and wrong: a
scorer that disagrees, or a task that reads the wrong file, shows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from minimind.convert.hf import export_hf_folder
from minimind.convert.minimind2 import save_minimind2_pth
from minimind.data.demo import write_demo_corpus
from minimind.data.formats import RecordReader
from minimind.data.prepare import prepare
from minimind.eval.cli import TASKS, file_name, main
from minimind.eval.perplexity import perplexity
from minimind.eval.tasks import answer_accuracy, preference_accuracy
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import load_tokenizer, render, train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stage import split_eval
from minimind.train.stages.sft import SFTStage

pytestmark = pytest.mark.usefixtures("one_thread")

TAUGHT, TAUGHT_DPO, LIMIT = 8, 4, 16


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny demo corpus, the conversations the model will be taught, and a tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    files = write_demo_corpus(root / "dataset", seed=0, size_mb=0.05)
    taught = []
    for key in ("eval_facts", "eval_arith"):
        for row in lines(files[key])[:TAUGHT]:
            reply = {"role": "assistant", "content": row["answer"]}
            taught.append({"conversations": [row["conversations"][0], reply]})
    taught += [{"conversations": row["chosen"]} for row in lines(files["eval_dpo"])[:TAUGHT_DPO]]
    reasoning = lines(files["reasoning"])
    held = split_eval(reasoning, 0.01, 64)[1]  # the reasoning task's held-out prompts
    taught += [held[i] for i in range(len(held))]
    texts = [row["text"] for row in lines(files["pretrain"])]
    texts += [render(c["conversations"]) for c in taught]
    tok_dir = train_tokenizer(texts, root / "tok", vocab_size=512, show_progress=False)
    return {"root": root, "data": root / "dataset", "taught": taught, "tok": tok_dir}


@pytest.fixture(scope="module")
def trained(corpus):
    """The tiny model (8 query heads: what a MiniMind2 .pth loads without flags) trained until it
    says every taught reply, exported as our checkpoint, a .pth and a transformers folder."""
    root = corpus["root"]
    sft = root / "taught.jsonl"
    sft.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in corpus["taught"]))
    prepare(sft, corpus["tok"], root / "shards", max_seq_len=256)
    tokenizer = load_tokenizer(corpus["tok"])
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, num_attention_heads=8)
    train = TrainConfig(
        out_dir=str(root / "run"),
        epochs=90,  # the longest taught reply (a chain of sums) needs more than 60
        batch_size=4,
        dtype="fp32",
        device="cpu",
        learning_rate=1e-2,
        weight_decay=0.0,
        log_interval=50,
        seed=0,
    )
    stage = SFTStage(root / "shards", 256, max_eval=0)
    trainer = Trainer(train, stage, MiniMindForCausalLM(config), tokenizer_dir=corpus["tok"])
    trainer.fit()
    model = trainer.model.eval()
    save_minimind2_pth(model, root / "pth" / "full_sft_64.pth")
    export_hf_folder(model, root / "hf", tokenizer_dir=corpus["tok"])
    return {
        **corpus,
        "model": model,
        "tokenizer": tokenizer,
        "ckpt": trainer.export(root / "ckpt"),
        "pth": root / "pth" / "full_sft_64.pth",
        "hf": root / "hf",
    }


def test_perplexity_equals_a_hand_computation(corpus):
    """Summed NLL, tokens and bytes against one unbatched forward per window, written out."""
    tokenizer = load_tokenizer(corpus["tok"])
    torch.manual_seed(3)
    model = MiniMindForCausalLM(preset("tiny", vocab_size=tokenizer.vocab_size))
    long_text = max((row["text"] for row in lines(corpus["data"] / "pretrain_hq.jsonl")), key=len)
    texts = ["Mira lives in Stonebridge.", "薇拉的工作是陶艺师。", long_text]
    seq_len = 16  # the long text spans many windows; batches of 2 pad the short ones
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
            for s in range(0, len(ids) - 1, seq_len):
                x, y = ids[s : s + seq_len], ids[s + 1 : s + seq_len + 1]
                logp = model.eval()(torch.tensor([x])).logits[0, : len(y)].log_softmax(-1)
                total -= logp[torch.arange(len(y)), torch.tensor(y)].sum().item()
                n_tokens += len(y)
    assert n_tokens > 4 * seq_len  # windows were cut
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    model.train()
    got = perplexity(model, tokenizer, texts, seq_len=seq_len, batch_size=2)
    assert model.training, "the caller's mode is put back"
    assert (got["tokens"], got["bytes"], got["documents"]) == (n_tokens, n_bytes, 3)
    assert got["nll"] == pytest.approx(total / n_tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / n_tokens), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_one_table_and_the_same_numbers_as_json(trained, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code, out, _ = run_cli(
        capsys, trained["ckpt"], "--data", trained["data"], "--limit", LIMIT, "--json", report
    )
    assert code == 0
    rows = json.loads(report.read_text())["rows"]
    table = out.strip().splitlines()
    assert re.split(r"\s{2,}", table[0]) == ["task", "split", "metric", "value", "n", "chance"]
    assert len(table) == 1 + len(rows)
    for line, row in zip(table[1:], rows, strict=True):
        cells = re.split(r"\s{2,}", line.strip())
        rate = row["metric"].split(":")[0] in {
            "accuracy",
            "abstains",
            "prefers chosen",
            "format rate",
            "answer match",
        }
        value = f"{100 * row['value']:.1f}%" if rate else f"{row['value']:.4f}"
        n = f"{row['correct']}/{row['total']}" if row["correct"] is not None else str(row["total"])
        want = [row["task"], row["split"], row["metric"], value, n]
        if row["chance"] is not None:
            want.append(f"{100 * row['chance']:.1f}%")
        assert cells == want, line
    by = {(r["task"], r["metric"]): r for r in rows}
    present = {
        t for t, (key, _, _) in TASKS.items() if (trained["data"] / file_name(key)).is_file()
    }
    assert {r["task"] for r in rows} == present and len(present) >= len(TASKS) - 1
    # The taught questions come first in their files: at least those are answered.
    for task in ("facts", "arith"):
        assert by[task, "accuracy"]["total"] == LIMIT
        assert by[task, "accuracy"]["correct"] >= TAUGHT, by[task, "accuracy"]
    assert by["facts_trained", "accuracy"]["split"] == "trained"
    assert by["dpo", "prefers chosen"]["correct"] >= TAUGHT_DPO
    assert by["reasoning", "format rate"]["value"] == 1.0
    assert by["reasoning", "answer match"]["value"] == 1.0
    nll = by["perplexity", "nll (nats/token)"]["value"]
    assert by["perplexity", "perplexity"]["value"] == pytest.approx(math.exp(nll))
    # --text: every document of a file; the taught replies read likelier than pretraining text
    # the model never saw. Replies alone: the model learnt no user turn (SFT trains on the
    # replies only), and a user turn as raw text reads no likelier than unseen text (about 14-15
    # nats a token for this overfit model, the replies about 11).
    replies = tmp_path / "replies.jsonl"
    replies.write_text(
        "".join(
            json.dumps({"text": c["conversations"][-1]["content"]}, ensure_ascii=False) + "\n"
            for c in trained["taught"]
        )
    )
    code, out, _ = run_cli(
        capsys, trained["ckpt"], "--text", replies, "--tasks", "perplexity", "--json", report
    )
    assert code == 0 and "replies.jsonl" in out
    (row,) = (r for r in json.loads(report.read_text())["rows"] if r["metric"].startswith("nll"))
    assert row["total"] == len(trained["taught"])
    assert row["value"] < nll - 2, (row["value"], nll)


def test_every_model_format_loads_and_scores_alike(trained, tmp_path, capsys):
    results = {}
    for kind, extra in (
        ("minimind", [trained["ckpt"]]),
        ("pth", [trained["pth"], "--tokenizer", trained["tok"]]),  # no tokenizer beside it
        ("hf", [trained["hf"]]),
    ):
        out = tmp_path / f"{kind}.json"
        args = ["--data", trained["data"], "--tasks", "perplexity,facts", "--limit", LIMIT]
        code, _, _ = run_cli(capsys, *extra, *args, "--json", out)
        assert code == 0
        report = json.loads(out.read_text())
        assert report["kind"] == kind
        results[kind] = {(r["task"], r["metric"]): r for r in report["rows"]}
    ours, hf, pth = results["minimind"], results["hf"], results["pth"]
    nll = ("perplexity", "nll (nats/token)")
    assert hf[nll]["value"] == pytest.approx(ours[nll]["value"], rel=1e-5)
    assert pth[nll]["value"] == pytest.approx(ours[nll]["value"], rel=1e-2)  # fp16 weights
    for other in (hf, pth):
        assert other["facts", "accuracy"]["correct"] == ours["facts", "accuracy"]["correct"]


def test_missing_data_folder_says_what_to_do(trained, tmp_path, capsys, monkeypatch):
    absent = tmp_path / "absent"
    code, _, err = run_cli(capsys, trained["ckpt"], "--data", absent)
    assert code == 2
    assert f"no demo corpus at {absent}: run `minimind demo` first or pass --data DIR" in err
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path / "home"))
    code, _, err = run_cli(capsys, trained["ckpt"], "--tasks", "facts")
    default = tmp_path / "home" / "runs" / "demo" / "dataset"
    assert code == 2 and f"no demo corpus at {default}: run `minimind demo` first" in err
    partial = tmp_path / "partial"
    partial.mkdir()
    code, _, err = run_cli(capsys, trained["ckpt"], "--data", partial, "--tasks", "arith")
    assert code == 2 and f"{partial} has no eval_arith.jsonl (task arith)" in err
    code, _, err = run_cli(capsys, trained["ckpt"], "--data", trained["data"], "--tasks", "math")
    assert code == 2 and "unknown task 'math'; tasks: perplexity, facts_trained" in err


@pytest.mark.slow
def test_lm_eval_scores_the_export_as_we_do(trained, tmp_path, capsys, monkeypatch):
    """lm-eval on the transformers export, with the task files `minimind eval` writes, gives
    each question and preference pair the verdict our scorer gives our model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        pytest.skip(f"lm-eval is not installed (the dev extra; it keeps torch): {e}")
    tasks_dir = tmp_path / "tasks"
    code, out, _ = run_cli(capsys, "--write-lm-eval-tasks", tasks_dir, "--data", trained["data"])
    assert code == 0 and "minimind_facts" in out
    names = ["minimind_facts", "minimind_arith", "minimind_dpo"]
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={trained['hf']},dtype=float32",
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        device="cpu",
        batch_size=8,
        limit=LIMIT,
        log_samples=True,
    )
    model, tokenizer = trained["model"], trained["tokenizer"]
    for name, key in (("facts", "eval_facts"), ("arith", "eval_arith"), ("dpo", "eval_dpo")):
        records = list(RecordReader(trained["data"] / f"{key}.jsonl"))[:LIMIT]
        if name == "dpo":
            ours = preference_accuracy(model, tokenizer, records).oks
        else:
            ours = answer_accuracy(model, tokenizer, records, max_new_tokens=24).oks
        samples = sorted(results["samples"][f"minimind_{name}"], key=lambda s: s["doc_id"])
        theirs = [s["acc"] == 1.0 for s in samples]
        assert theirs == ours, name
        assert 0 < sum(ours) < len(ours), f"{name}: no mix of right and wrong to agree on"
        assert results["results"][f"minimind_{name}"]["acc,none"] == sum(ours) / len(ours)
