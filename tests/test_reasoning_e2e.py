"""A reasoning model trained here shows its reasoning apart from its answer in every front end
(issue 11 §1): the chat command, the OpenAI-compatible server (whole replies and streamed
deltas) and the web UI; and with thinking switched off it produces none.

The model is the tiny preset trained by the engine's `reason` stage (tag-weighted SFT) until
it says its training replies back. The data are reasoning records in MiniMind's layout,
`<think>\\nR\\n</think>\\n<answer>\\nA\\n</answer>`, plus, for the same questions, the
non-thinking form that `enable_thinking=False` asks for: the chat template ends that prompt with
an empty think block (`<think>\\n\\n</think>\\n\\n`, FORMATS.md), so the reply is trained after
one, as Qwen3-style models learn both modes. The thinking form is twice as frequent, so where
the two forms part (the token after `<think>`) the greedy model thinks; after the template's
empty block there is only the answer to say.

What each front end must show, from the reply parser's rule (minimind.infer.chat): reasoning is
what follows an opening `<think>` up to `</think>`; the rest is the answer, here the
`<answer>…</answer>` block as the model writes it (the parser splits only the think block).
With thinking off the prompt carries the closed empty block, the reply opens with `<answer>`,
and no front end shows any reasoning.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

from minimind.data.prepare import prepare
from minimind.infer import generate
from minimind.infer.chat import prompt_ids, stop_ids
from minimind.infer.chat_cli import main as chat_main
from minimind.infer.load import load_model
from minimind.model import MiniMindForCausalLM, preset
from minimind.serve import web
from minimind.serve.openai_api import create_app
from minimind.tokenizer import load_tokenizer, render, train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.engine import Trainer
from minimind.train.stages.reason import ReasonStage
from tests.serve_fixtures import KEY, Server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# (question, reasoning, answer)
CASES = [
    ("What is 7 + 5?", "Add the ones: 7 + 5 makes 12.", "12"),
    ("What is 9 - 4?", "Take 4 away from 9, which leaves 5.", "5"),
    ("Which is larger, 3 or 8?", "Compare them: 8 is more than 3.", "8"),
]
SEQ = 128
EPOCHS, LR = 240, 5e-3  # one step per epoch: the 9 rows are one batch


def thinking_reply(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


def answer_block(answer: str) -> str:
    return f"<answer>\n{answer}\n</answer>"


def records() -> list[dict]:
    out = []
    for q, r, a in CASES:
        user = {"role": "user", "content": q}
        think = {"role": "assistant", "content": thinking_reply(r, a)}
        off = {"role": "assistant", "content": "<think>\n\n</think>\n\n" + answer_block(a)}
        out += [{"conversations": [user, think]}] * 2 + [{"conversations": [user, off]}]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny reasoning model, trained by the `reason` stage and exported as a checkpoint
    folder (with its tokenizer), after a check that greedy decoding says every training reply
    back in both modes."""
    root = tmp_path_factory.mktemp("reasoning_e2e")
    data = root / "r1_tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    texts = [render(r["conversations"]) for r in records()] * 20
    tok_dir = train_tokenizer(texts, root / "tok", vocab_size=400, show_progress=False)
    report = prepare(data, tok_dir, root / "shards", max_seq_len=SEQ)
    assert report.truncated == 0
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset("tiny", vocab_size=tok.vocab_size))
    config = TrainConfig(
        out_dir=str(root / "run"),
        epochs=EPOCHS,
        batch_size=len(records()),
        learning_rate=LR,
        weight_decay=0.0,
        dtype="fp32",
        device="cpu",
        log_interval=20,
        seed=0,
    )
    stage = ReasonStage(root / "shards", SEQ, max_eval=0, eval_prompts=0)
    assert stage.shards.kind == "reasoning"
    trainer = Trainer(config, stage, model, tokenizer_dir=tok_dir)
    trainer.fit()
    model = trainer.model.eval()
    wrong = []
    for q, r, a in CASES:
        for thinking, want in ((None, thinking_reply(r, a)), (False, answer_block(a))):
            ids = prompt_ids(tok, [{"role": "user", "content": q}], None, thinking)
            out = generate(model, [ids], max_new_tokens=64, temperature=0.0,
                           stop_token_ids=stop_ids(tok, model))[0]  # fmt: skip
            got = tok.decode([t for t in out if t != tok.eos_id])
            if got != want:
                wrong.append((q, thinking, got))
    assert not wrong, f"the model did not learn its replies: {wrong}"
    return trainer.export(root / "reason_64")


# --- the chat command -------------------------------------------------------------------------


def chat(model_dir, capsys, thinking: int) -> str:
    argv = ["--load_from", str(model_dir), "--device", "cpu", "--temperature", "0"]
    argv += ["--show_speed", "0", "--enable_thinking", str(thinking)]
    for q, _, _ in CASES:
        argv += ["--prompt", q]
    assert chat_main(argv) == 0
    return capsys.readouterr().out


def test_chat_cli_shows_reasoning_apart_and_none_when_off(model_dir, capsys):
    out = chat(model_dir, capsys, 1)
    want = "".join(
        f"💬: {q}\n[thinking]\n{r}\n[/thinking]\n🧠: {answer_block(a)}\n\n" for q, r, a in CASES
    )
    assert out == want
    out = chat(model_dir, capsys, 0)
    assert out == "".join(f"💬: {q}\n🧠: {answer_block(a)}\n\n" for q, _, a in CASES)
    assert not any(r in out for _, r, _ in CASES)


# --- the OpenAI-compatible server -------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model_dir):
    loaded = load_model(model_dir, device="cpu")
    server = Server(create_app(loaded, api_key=KEY))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    yield client, loaded
    server.stop()


def off(thinking: bool) -> dict:
    return {} if thinking else {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}


@pytest.mark.parametrize("thinking", [True, False])
def test_server_reasoning_content_apart_from_content(served, thinking):
    client, loaded = served
    name = loaded.name
    for q, r, a in CASES:
        messages = [{"role": "user", "content": q}]
        reply = client.chat.completions.create(
            model=name, messages=messages, temperature=0, **off(thinking)
        )
        message = reply.choices[0].message
        assert message.content == answer_block(a)
        assert getattr(message, "reasoning_content", None) == (r if thinking else None)
        assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("thinking", [True, False])
def test_server_streams_reasoning_deltas_before_content_deltas(served, thinking):
    client, loaded = served
    q, r, a = CASES[0]
    # The server sends what has accumulated since its last write in one chunk (a writer that
    # fell behind sends several tokens at once), and the tiny model can write a whole reasoning
    # faster than a busy CI machine schedules the writer. Each decoder forward here waits 20 ms,
    # so every token is written before the next exists, and "streamed, not in one piece" is
    # what the server does rather than a race.
    slow = loaded.model.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(0.02))
    try:
        chunks = client.chat.completions.create(
            model=loaded.name,
            messages=[{"role": "user", "content": q}],
            temperature=0,
            stream=True,
            **off(thinking),
        )
        kinds = []  # ("reasoning" | "content", text) per delta, in order
        for chunk in chunks:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if getattr(delta, "reasoning_content", None):
                kinds.append(("reasoning", delta.reasoning_content))
            if delta.content:
                kinds.append(("content", delta.content))
    finally:
        slow.remove()
    reasoning = "".join(t for k, t in kinds if k == "reasoning")
    content = "".join(t for k, t in kinds if k == "content")
    assert (reasoning, content) == ((r if thinking else ""), answer_block(a))
    order = [k for k, _ in kinds]
    assert order == sorted(order, key=lambda k: k == "content")  # all reasoning first
    if thinking:
        assert order.count("reasoning") > 1  # streamed as it was written, not in one piece


# --- the web UI -------------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", ["on", "off"])
def test_web_ui_folds_reasoning_apart_and_shows_none_when_off(
    model_dir, tmp_path, monkeypatch, thinking
):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path / "home"))  # scan no real out/
    argv = ["web_demo.py", "--load_from", str(model_dir), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [*argv, "--temperature", "0", "--thinking", thinking])
    at = AppTest.from_file(str(web.APP_FILE), default_timeout=60).run()
    assert not at.exception
    q, r, a = CASES[1]
    at.chat_input[0].set_value(q).run()
    assert not at.exception and [m.name for m in at.chat_message] == ["user", "assistant"]
    assert at.chat_message[1].markdown[-1].value == answer_block(a)
    if thinking == "on":
        (folded,) = at.expander
        assert folded.label == "Thinking" and folded.markdown[0].value == r
    else:
        assert len(at.expander) == 0
