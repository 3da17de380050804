"""One choice's text as it streams: token ids -> text -> stop strings cut -> reasoning split ->
tool calls taken out. Pure and synchronous: no HTTP, no batcher, no model.

The stages, each incremental (text that may still change is held back, never sent and then
taken back):
1. `tokenizer.stream()` turns ids into text without broken UTF-8 (special tokens skipped);
2. `StopMatcher` cuts the text at the first stop string, found across token boundaries; the
   stop string itself is not emitted;
3. chat only: `ReplyParser` (minimind.infer.chat) splits `<think>...</think>` reasoning from
   the answer;
4. chat with tools only: `ToolCallFilter` turns each `<tool_call>{json}</tool_call>` block of
   the answer into a call (the same rule as `parse_tool_calls`); other text stays content.

A streamed reply and a non-streamed one go through the same object, so they always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from minimind.infer.chat import TOOL_CLOSE, TOOL_OPEN, ReplyParser, parse_tool_calls
from minimind.tokenizer import Tokenizer

Piece = tuple[str, str | dict]  # ("reasoning" | "content", text) or ("tool_call", call dict)


def _held(text: str, targets: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins one of `targets` (but is not all of it).

    >>> _held("say STO", ["STOP"]), _held("say", ["STOP"]), _held("<tool", ["<tool_call>"])
    (3, 0, 5)
    """
    best = 0
    for target in targets:
        for n in range(min(len(target) - 1, len(text)), best, -1):
            if text.endswith(target[:n]):
                best = n
                break
    return best


class StopMatcher:
    """Cuts streamed text at the first stop string; `stopped` once one has appeared.

    >>> m = StopMatcher(["END", "\\n\\n"])
    >>> m.feed("one E"), m.feed("N"), m.feed("D two"), m.stopped
    ('one ', '', '', True)
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text now known to come before any stop string."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[: min(hits)]
        keep = _held(buf, self.stops)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """End of the text: what was held back was not a stop string after all."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class ToolCallFilter:
    """Answer text in, ("content", text) and ("tool_call", {"name", "arguments"}) pieces out.

    Text that may begin a `<tool_call>` block is held until it is decided. A block whose body
    is not a call stays content. As in `parse_tool_calls`, the content left around the calls
    is stripped at both ends (whitespace between pieces of content is kept).

    >>> f = ToolCallFilter()
    >>> f.feed('Sure.\\n<tool_c') + f.feed('all>{"name": "f", "arguments": {}}</tool_call>\\n')
    [('content', 'Sure.'), ('tool_call', {'name': 'f', 'arguments': '{}'})]
    >>> f.finish()
    []
    """

    def __init__(self) -> None:
        self.pending = ""
        self.space = ""  # whitespace after the last content: kept only if content follows
        self.started = False  # content has been emitted (leading whitespace is dropped)
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self.pending += text
        out: list[Piece] = []
        while True:
            start = self.pending.find(TOOL_OPEN)
            if start < 0:
                keep = _held(self.pending, [TOOL_OPEN])
                self._content(out, self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return out
            self._content(out, self.pending[:start])
            self.pending = self.pending[start:]
            end = self.pending.find(TOOL_CLOSE)
            if end < 0:
                return out  # inside a block: wait for its end
            block = self.pending[: end + len(TOOL_CLOSE)]
            self.pending = self.pending[end + len(TOOL_CLOSE) :]
            _, calls = parse_tool_calls(block)
            if calls:
                out += [("tool_call", call) for call in calls]
                self.calls += len(calls)
            else:
                self._content(out, block)

    def finish(self) -> list[Piece]:
        """End of the answer: an unfinished block is plain text."""
        out: list[Piece] = []
        self._content(out, self.pending)
        self.pending = self.space = ""
        return out

    def _content(self, out: list[Piece], text: str) -> None:
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            out.append(("content", self.space + body))
            self.space, self.started = text[len(body) :], True
        else:
            self.space += text


class ReplyStream:
    """The text pipeline of one choice. `feed(token)` and `finish()` return pieces;
    `stopped` turns True when a stop string has appeared (the caller then cancels the
    generation); `calls` counts the tool calls taken out.

    chat=False (text completions): the raw text, cut at stop strings, as ("content", text).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stops: Sequence[str] = (),
        chat: bool = True,
        tools: bool = False,
    ):
        self.decoder = tokenizer.stream(skip_special_tokens=True)
        self.matcher = StopMatcher(stops)
        self.parser = ReplyParser() if chat else None
        self.tools = ToolCallFilter() if chat and tools else None
        self.tokens = 0

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def calls(self) -> int:
        return 0 if self.tools is None else self.tools.calls

    def feed(self, token: int) -> list[Piece]:
        self.tokens += 1
        return self._text(self.matcher.feed(self.decoder.put(token)))

    def finish(self) -> list[Piece]:
        out = []
        if not self.stopped:
            text = self.matcher.feed(self.decoder.flush())
            out = self._text(text + self.matcher.flush())
        if self.parser is not None:
            out += self._route(self.parser.finish())
        if self.tools is not None:
            out += self.tools.finish()
        return out

    def _text(self, text: str) -> list[Piece]:
        if not text:
            return []
        if self.parser is None:
            return [("content", text)]
        return self._route(self.parser.feed(text))

    def _route(self, pieces: list[tuple[str, str]]) -> list[Piece]:
        if self.tools is None:
            return list(pieces)
        out: list[Piece] = []
        for kind, text in pieces:
            out += self.tools.feed(text) if kind == "content" else [(kind, text)]
        return out
