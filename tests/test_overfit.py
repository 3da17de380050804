"""The overfit check: a tiny model trained on 32 chat conversations until its training loss is
near zero must say each assistant reply back exactly, through the path users take.

Train and chat share only their ends (the records, and the strings compared), so every step in
between is covered: the chat template with its default system prompt, the SFT loss mask and
label shift, the engine, the checkpoint written and loaded by `minimind chat --load_from`,
greedy decoding with the KV cache, stopping at <|im_end|>, streaming detokenisation and the
reply parser. A mismatch anywhere between the two sides shows up as a wrong reply.

The teacher-forced check says which side is at fault when a reply is wrong: if the model's
argmax reproduces every target token of the training rows but the chat reply differs, training
learned what it was given and the inference path reads it differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minimind.data.demo import write_demo_corpus
from minimind.data.padding import IGNORE_INDEX, SFTDataset
from minimind.data.prepare import prepare
from minimind.data.shards import Shards
from minimind.infer.chat import ChatSession
from minimind.infer.generation import GenerationConfig
from minimind.infer.load import load_model
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import load_tokenizer, render, train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stages.sft import SFTStage

pytestmark = pytest.mark.usefixtures("one_thread")

N_CONVERSATIONS = 32
SEQ = 256  # longer than every chosen conversation: nothing is truncated
LOSS_TARGET = 0.05
# The tiny preset memorises the 32 conversations in 100 epochs of four steps (last-epoch loss
# below 1e-3, 32/32 replies; 80 epochs still give 32/32, so there is margin). A higher rate is
# not faster: at 1e-2, 100 epochs leave the batch of the longest replies at a loss of 0.4.
EPOCHS, BATCH, LR = 160, 8, 5e-3


def read_lines(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines()


def single_turn(sft_file: Path, n: int) -> list[dict]:
    """The first `n` records of one user and one assistant message, with distinct questions
    (one question with two answers cannot be reproduced exactly by a greedy model). No system
    message: training renders the template's default one, as a session without a system
    prompt does."""
    out, seen = [], set()
    for line in read_lines(sft_file):
        record = json.loads(line)
        messages = record["conversations"]
        if [m.get("role") for m in messages] != ["user", "assistant"]:
            continue
        if any(set(m) != {"role", "content"} for m in messages):  # tools, reasoning
            continue
        if messages[0]["content"] in seen:
            continue
        seen.add(messages[0]["content"])
        out.append(record)
        if len(out) == n:
            return out
    raise AssertionError(f"the demo corpus holds fewer than {n} single-turn records")


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """32 single-turn conversations, a tokenizer, their shards, and the tiny model trained on
    them by the engine (in memory, and exported as `minimind train sft` exports it)."""
    root = tmp_path_factory.mktemp("overfit")
    files = write_demo_corpus(root / "corpus", seed=0, size_mb=0.05)
    records = single_turn(files["sft"], N_CONVERSATIONS)
    sft_file = root / "sft32.jsonl"
    sft_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    texts = [json.loads(line)["text"] for line in read_lines(files["pretrain"])]
    texts += [render(json.loads(line)["conversations"]) for line in read_lines(files["sft"])]
    tok_dir = train_tokenizer(texts, root / "tok", vocab_size=512, show_progress=False)
    report = prepare(sft_file, tok_dir, root / "shards", max_seq_len=SEQ)
    assert report.docs == N_CONVERSATIONS and report.truncated == 0

    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset("tiny", vocab_size=tokenizer.vocab_size))
    config = TrainConfig(
        out_dir=str(root / "run"),
        epochs=EPOCHS,
        batch_size=BATCH,
        dtype="fp32",
        device="cpu",
        learning_rate=LR,
        weight_decay=0.0,
        log_interval=1,
        seed=0,
    )
    trainer = Trainer(
        config, SFTStage(root / "shards", SEQ, max_eval=0), model, tokenizer_dir=tok_dir
    )
    trainer.fit()
    lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    return {
        "records": records,
        "shards": root / "shards",
        "tokenizer": tokenizer,
        "model": trainer.model.eval(),
        "export": trainer.export(root / "full_sft_64"),
        "losses": losses,
        # Room beyond the longest reply, so a model that never stops is caught.
        "max_new": int(Shards(root / "shards").doc_lengths().max()),
    }


def test_training_loss_reaches_near_zero(overfit):
    last_epoch = overfit["losses"][-(N_CONVERSATIONS // BATCH) :]
    assert max(last_epoch) < LOSS_TARGET, f"losses of the last epoch: {last_epoch}"


def test_teacher_forced_argmax_reproduces_every_target(overfit):
    """What training learned, read without the inference path: at every labelled position of
    the training rows the model's most likely token is the label."""
    rows = SFTDataset(Shards(overfit["shards"]), SEQ)
    model = overfit["model"]
    wrong = []
    with torch.no_grad():
        for i in range(len(rows)):
            row = rows[i]
            logits = model(row["input_ids"][None]).logits[0]
            keep = row["labels"] != IGNORE_INDEX
            if not torch.equal(logits[keep].argmax(-1), row["labels"][keep]):
                wrong.append(i)
    assert not wrong, f"{len(rows) - len(wrong)}/{len(rows)} rows right; wrong: {wrong}"


def test_session_prompt_is_the_prefix_trained_on(overfit):
    """The chat session's prompt (default system prompt, generation prompt) is, token for
    token, what precedes the first trained token of the same conversation in the shards, and
    the trained tokens are the reply followed by <|im_end|>."""
    shards, tokenizer = Shards(overfit["shards"]), overfit["tokenizer"]
    session = ChatSession(overfit["model"], tokenizer)
    for i, record in enumerate(overfit["records"]):
        user, assistant = (m["content"] for m in record["conversations"])
        ids, mask = shards.doc(i).tolist(), shards.doc_mask(i).tolist()
        first = mask.index(1)
        _, prompt = session.messages_for(user, overfit["max_new"])
        assert prompt == ids[:first], f"record {i}: prompt differs from the training prefix"
        target = [t for t, m in zip(ids, mask, strict=True) if m]
        assert target[-1] == tokenizer.eos_id
        assert tokenizer.decode(target[:-1]) == assistant, f"record {i}"


def replies(model, tokenizer, records, max_new) -> tuple[list[str], list[str | None]]:
    """Each record's user message answered by a fresh session, greedily; the joined content
    pieces and the finish reasons."""
    config = GenerationConfig(max_new_tokens=max_new, temperature=0)
    texts, reasons = [], []
    for record in records:
        session = ChatSession(model, tokenizer)
        user = record["conversations"][0]["content"]
        pieces = list(session.reply(user, config))
        texts.append("".join(text for kind, text in pieces if kind == "content"))
        reasons.append(session.last.finish_reason)
    return texts, reasons


@pytest.mark.parametrize("source", ["trained", "loaded"])
def test_chat_says_every_reply_back_exactly(overfit, source):
    if source == "trained":
        model, tokenizer = overfit["model"], overfit["tokenizer"]
    else:  # what `minimind chat --load_from FOLDER` loads
        loaded = load_model(overfit["export"], device="cpu")
        model, tokenizer = loaded.model, loaded.tokenizer
    records = overfit["records"]
    got, reasons = replies(model, tokenizer, records, overfit["max_new"])
    want = [r["conversations"][1]["content"] for r in records]
    # The finish reason too: the parser strips trailing whitespace and the decoder skips
    # special tokens, so a reply that runs on past its text instead of ending on <|im_end|>
    # can still read right.
    wrong = [(w, g, r) for w, g, r in zip(want, got, reasons, strict=True) if (g, r) != (w, "stop")]
    assert not wrong, (
        f"{len(want) - len(wrong)}/{len(want)} replies exact and stopped; first mismatches "
        f"(want, got, finish_reason): {wrong[:5]}"
    )
