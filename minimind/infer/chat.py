"""Chat over a model: conversation -> prompt ids, streamed text -> reasoning and answer, tool
calls out of the answer, and a multi-turn session. Shared by the chat CLI, the API server and
the web UI, so all three read a model's output the same way.

Output conventions (the inverse of the chat template in minimind.tokenizer.chat):
- Reasoning: a reply that opens with `<think>` (after optional whitespace) carries reasoning up
  to `</think>`; the rest is the answer. Whitespace around both parts is stripped, so
  `<think>\\nR\\n</think>\\n\\nA` gives ("R", "A"). A reply without the opening tag is all
  answer (with `enable_thinking=False` the template itself closes an empty think block).
- Tool calls: each `<tool_call>{"name": ..., "arguments": ...}</tool_call>` block whose body is
  a JSON object with a string name becomes a call; anything else stays in the text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from minimind.infer.generation import GenerationConfig, stream
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import Tokenizer
from minimind.tokenizer.chat import encode_chat

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def prompt_ids(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    enable_thinking: bool | None = None,
) -> list[int]:
    """The conversation rendered with the generation prompt, as token ids (message content is
    text: `<|im_start|>` typed by a user is not a control token; see `encode_chat`)."""
    return encode_chat(tokenizer, messages, tools, True, enable_thinking)[0]


def stop_ids(tokenizer: Tokenizer, model: MiniMindForCausalLM) -> tuple[int, ...]:
    """The tokens that end a reply: the tokenizer's eos (`<|im_end|>`) and the model's."""
    return tuple(sorted({tokenizer.eos_id, model.config.eos_token_id}))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """-> (reasoning or None, answer).

    >>> split_reasoning("<think>\\nAdd them.\\n</think>\\n\\n4")
    ('Add them.', '4')
    >>> split_reasoning("4")
    (None, '4')
    >>> split_reasoning("<think>unfinished")
    ('unfinished', '')
    """
    parser = ReplyParser()
    parts = parser.feed(text) + parser.finish()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    content = "".join(t for kind, t in parts if kind == "content")
    return (reasoning if parser.had_reasoning else None), content


class ReplyParser:
    """Incremental `split_reasoning`: feed text deltas as they stream, get
    ("reasoning" | "content", text) pieces; joined, they equal `split_reasoning` of the whole.

    Text that could still be the start of a tag, or whitespace that may turn out to be trailing,
    is held back until the next delta decides it.

    >>> p = ReplyParser()
    >>> p.feed("<thi") + p.feed("nk>\\nhm") + p.feed("\\n</think>\\n\\nYes") + p.finish()
    [('reasoning', 'hm'), ('content', 'Yes')]
    """

    def __init__(self) -> None:
        self.state = "start"  # start -> (reasoning ->) content
        self.pending = ""
        self.had_reasoning = False
        self._lead = True  # the current part has emitted nothing yet: drop leading whitespace

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.pending += delta
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self.pending = head[len(THINK_OPEN) :]
                    self.state, self.had_reasoning, self._lead = "reasoning", True, True
                    continue
                if THINK_OPEN.startswith(head):  # empty or a prefix of the tag: wait
                    return out
                self.state = "content"
            if self.state == "reasoning":
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    self._emit(out, "reasoning", self.pending[:end].rstrip())
                    self.pending = self.pending[end + len(THINK_CLOSE) :]
                    self.state, self._lead = "content", True
                    continue
                self._emit(out, "reasoning", self._safe_prefix(THINK_CLOSE))
                return out
            # content: only trailing whitespace is held (the reply may end there)
            self._emit(out, "content", self._safe_prefix(None))
            return out

    def finish(self) -> list[tuple[str, str]]:
        """End of the reply: flush what was held back (an unclosed think block is reasoning)."""
        out: list[tuple[str, str]] = []
        kind = "reasoning" if self.state == "reasoning" else "content"
        text = self.pending.strip() if self._lead else self.pending.rstrip()
        if self.state == "start" and text.startswith(THINK_OPEN):
            kind, self.had_reasoning = "reasoning", True
            text = text[len(THINK_OPEN) :].strip()
        self._emit(out, kind, text)
        self.pending = ""
        return out

    def _safe_prefix(self, tag: str | None) -> str:
        """Take from `pending` what can no longer be part of `tag` or of trailing whitespace."""
        text = self.pending
        cut = len(text)
        if tag is not None:
            for n in range(min(len(tag) - 1, len(text)), 0, -1):
                if tag.startswith(text[-n:]):
                    cut -= n
                    break
        cut = len(text[:cut].rstrip())  # whitespace before the held tail may be trailing too
        self.pending = text[cut:]
        return text[:cut]

    def _emit(self, out: list[tuple[str, str]], kind: str, text: str) -> None:
        if self._lead:
            text = text.lstrip()
        if text:
            out.append((kind, text))
            self._lead = False


_TOOL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """-> (text without the call blocks, [{"name": str, "arguments": json str}, ...]).

    `arguments` is a JSON string as in OpenAI's API, whether the model wrote an object or a
    string. A block that is not valid JSON with a string "name" stays in the text.

    >>> parse_tool_calls('<tool_call>\\n{"name": "add", "arguments": {"a": 1}}\\n</tool_call>')
    ('', [{'name': 'add', 'arguments': '{"a": 1}'}])
    >>> parse_tool_calls("no calls")
    ('no calls', [])
    """
    calls: list[dict] = []

    def take(match: re.Match) -> str:
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return match.group(0)
        args = body.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append({"name": body["name"], "arguments": args})
        return ""

    rest = _TOOL_BLOCK.sub(take, text)
    return (rest.strip() if calls else rest), calls


# --- a multi-turn session -------------------------------------------------------------------


@dataclass
class ReplyStats:
    """What one reply cost: prompt and generated token counts, seconds, and why it ended."""

    prompt_tokens: int
    completion_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    finish_reason: str | None = None
    speculation: object | None = None  # speculative.SpeculationStats, with a draft

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ChatSession:
    """A conversation with one model: keeps the history, streams each reply.

    history_turns: how many earlier messages go back into the prompt (MiniMind's `--historys`,
    0 = each question alone). Older messages are also dropped, oldest first, when the prompt
    would not leave `max_new_tokens` of room in the model's context. Reasoning is not kept in
    the history (only the answer), as reasoning models are trained.
    """

    model: MiniMindForCausalLM
    tokenizer: Tokenizer
    system_prompt: str | None = None
    history_turns: int = 0
    enable_thinking: bool | None = None
    tools: Sequence[dict] | None = None
    history: list[dict] = field(default_factory=list)
    last: ReplyStats | None = None

    def clear(self) -> None:
        self.history.clear()

    def messages_for(self, user_text: str, max_new_tokens: int) -> tuple[list[dict], list[int]]:
        """The messages and prompt ids for the next reply (history trimmed to fit)."""
        context = self.model.config.max_position_embeddings
        kept = self.history[-self.history_turns :] if self.history_turns > 0 else []
        while True:
            system = (
                [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            )
            messages = [*system, *kept, {"role": "user", "content": user_text}]
            ids = prompt_ids(self.tokenizer, messages, self.tools, self.enable_thinking)
            if len(ids) + max_new_tokens <= context or not kept:
                break
            kept = kept[2:] if len(kept) >= 2 else []
        if len(ids) >= context:
            raise ValueError(
                f"the message is {len(ids)} tokens with the template; the model's context is "
                f"{context}"
            )
        return messages, ids

    def reply(self, user_text: str, config: GenerationConfig) -> Iterator[tuple[str, str]]:
        """Stream ("reasoning" | "content", text) pieces of the reply to `user_text`; when the
        iterator is exhausted, the exchange is in `history` and its stats in `last`."""
        _, ids = self.messages_for(user_text, config.max_new_tokens)
        if config.stop_token_ids is None:
            config = dataclasses.replace(
                config, stop_token_ids=stop_ids(self.tokenizer, self.model)
            )
        stats = ReplyStats(prompt_tokens=len(ids))
        decoder = self.tokenizer.stream(skip_special_tokens=True)
        parser = ReplyParser()
        content: list[str] = []
        start = time.perf_counter()
        for step in stream(self.model, [ids], config):
            token, reason = step.tokens[0], step.finish_reasons[0]
            if stats.first_token_seconds is None:
                stats.first_token_seconds = time.perf_counter() - start
            stats.completion_tokens += 1
            stats.finish_reason = reason or stats.finish_reason
            stats.speculation = step.speculation
            for kind, text in parser.feed(decoder.put(token)):
                if kind == "content":
                    content.append(text)
                yield kind, text
        stats.seconds = time.perf_counter() - start
        for kind, text in parser.feed(decoder.flush()) + parser.finish():
            if kind == "content":
                content.append(text)
            yield kind, text
        self.last = stats
        self.history += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": "".join(content)},
        ]
