"""The served test model and an in-thread uvicorn server, shared by the server and web UI
tests: a tiny model trained in seconds so that its greedy replies are known ("hello" ->
reasoning + answer; "weather in Paris?" with a tool listed -> one tool call)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from minimind.checkpoint import save_checkpoint
from minimind.infer import generate
from minimind.infer.chat import prompt_ids
from minimind.model import MiniMindForCausalLM, preset
from minimind.tokenizer import load_tokenizer, train_tokenizer
from minimind.tokenizer.chat import render

KEY = "sk-test"
CONTEXT = 4096  # longer than the tiny preset's, so a forced-length row runs long enough to cancel
HELLO = [{"role": "user", "content": "hello"}]
WEATHER = [{"role": "user", "content": "weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
REASONING, ANSWER = "The user greets me.", "Hello there! Nice to meet you."
REPLIES = [
    (HELLO, None, f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"),
    (
        WEATHER,
        TOOLS,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
]


def train_checkpoint(root: Path) -> Path:
    """A tiny model whose greedy replies to REPLIES' prompts are REPLIES' texts."""
    texts = [render(m, t, True) + r for m, t, r in REPLIES] * 20
    tok_dir = train_tokenizer(texts, root / "tokenizer", vocab_size=512, show_progress=False)
    tok = load_tokenizer(tok_dir)
    seqs = [(prompt_ids(tok, m, t), [*tok.encode(r), tok.eos_id]) for m, t, r in REPLIES]
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(r)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset("tiny", max_position_embeddings=CONTEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(400):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9 and loss.item() < 0.05:
            model.eval()
            got = [
                generate(model, [p], max_new_tokens=len(r) + 2, temperature=0)[0] for p, r in seqs
            ]
            if got == [r for _, r in seqs]:
                break
            model.train()
    else:
        raise AssertionError("the fixture model did not learn its replies")
    return save_checkpoint(root / "model", model.eval(), tokenizer_dir=tok_dir)


class Server:
    """uvicorn serving `app` in a thread, on a socket bound to a free port."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
