"""Record schemas of MiniMind's JSON Lines data files, and the streaming readers that validate them.

Owns: the five record kinds of docs/FORMATS.md (pretrain, sft, dpo, rlaif, reasoning) as small frozen
dataclasses; `parse_record`, which turns one decoded JSON object into a record or raises
`DataError` naming the field; `RecordReader`, which streams a file line by line and names
`file:line` in every error; `detect_kind`; `split_reasoning`.
Does not own: tokenization, chat rendering and loss masks (minimind.tokenizer), the `data check`
report (check.py), shards, batching and sampling.

Decisions:
- Records are dataclasses (`PretrainRecord`, `Conversation`, `DPORecord`, `RLAIFRecord`), not
  dicts: a record that exists has been validated, and its fields have the types they claim.
  sft and reasoning both give a `Conversation`; `Message.to_dict()` gives back the plain dict a
  chat template wants.
- One exception type, `DataError` (a `ValueError`), for every malformed line. Its text is
  `file:line: field.path: what is wrong`; its `reason` is a short stable key used for counting.
- `on_error="skip"` skips a bad line and counts it in `RecordReader.summary`; every line is
  accounted for: `lines == records + blank_lines + bad_lines`.
- Blank lines (JSON whitespace only) are skipped and counted, never an error: trailing blank
  lines are common in hand-edited files and carry no record.
- Lines are read as bytes and decoded one at a time, so memory stays constant on multi-GB files
  and a bad byte costs one line, not the file. A UTF-8 byte order mark on line 1 is ignored.
- Unknown fields are ignored. `content: null` (or no content) is accepted only on an assistant
  turn that carries tool calls (OpenAI's convention) and becomes "".
- Tools: the first non-empty list among the top-level `tools`, `functions`, then the first
  message's `tools`, `functions` (MiniMind puts `functions` on the system message).
- rlaif `answer` may be a string or a number; a number is kept as its JSON text ("12"), since
  rewards compare strings.
"""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from os import PathLike
from typing import Any, Literal

KINDS = ("pretrain", "sft", "dpo", "rlaif", "reasoning")
ROLES = ("system", "user", "assistant", "tool")
Kind = Literal["pretrain", "sft", "dpo", "rlaif", "reasoning"]
OnError = Literal["raise", "skip"]
StrPath = str | PathLike


class DataError(ValueError):
    """A malformed line or record. Its text is `file:line: field: detail`.

    `reason` is a short stable key (`invalid_json`, `unknown_role`, ...) for counting errors.

    >>> str(DataError("unknown_role", "unknown role 'bot'", field="conversations[2].role",
    ...               path="sft.jsonl", line=17))
    "sft.jsonl:17: conversations[2].role: unknown role 'bot'"
    >>> str(DataError("missing_field", "missing field", field="text"))
    'text: missing field'
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        field: str = "",
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.field = field
        self.path = path
        self.line = line
        where = "" if path is None else f"{path}:" if line is None else f"{path}:{line}:"
        parts = [p for p in (where, f"{field}:" if field else "", detail) if p]
        super().__init__(" ".join(parts))

    def at(self, path: str, line: int) -> DataError:
        """The same error, located at `path:line`."""
        return DataError(self.reason, self.detail, field=self.field, path=path, line=line)

    def __reduce__(self):
        # DataLoader workers pickle exceptions; the default reduce would call __init__(message).
        kwargs = {"field": self.field, "path": self.path, "line": self.line}
        return (partial(DataError, **kwargs), (self.reason, self.detail))


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn. `reasoning_content` and `tool_calls` are only ever set on assistant turns."""

    role: str
    content: str
    reasoning_content: str | None = None
    tool_calls: tuple[dict[str, Any], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The message as the plain dict a chat template expects (unset fields left out).

        >>> Message("user", "hi").to_dict()
        {'role': 'user', 'content': 'hi'}
        """
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls is not None:
            out["tool_calls"] = list(self.tool_calls)
        return out


@dataclass(frozen=True, slots=True)
class Conversation:
    """An sft or reasoning record: the turns, and the tool schemas offered to the model, if any."""

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class PretrainRecord:
    text: str


@dataclass(frozen=True, slots=True)
class DPORecord:
    """Two whole conversations with the same prompt; each ends with an assistant turn."""

    chosen: Conversation
    rejected: Conversation

    @property
    def prompt(self) -> tuple[Message, ...]:
        return self.chosen.messages[:-1]


@dataclass(frozen=True, slots=True)
class RLAIFRecord:
    """A prompt (all turns but the last), a last assistant turn (often empty), and the optional
    ground-truth `answer` for verifiable rewards."""

    conversation: Conversation
    answer: str | None = None

    @property
    def prompt(self) -> tuple[Message, ...]:
        return self.conversation.messages[:-1]

    @property
    def reference(self) -> str:
        """The content of the last assistant turn ("" in the public rlaif-mini.jsonl)."""
        return self.conversation.messages[-1].content


Record = PretrainRecord | Conversation | DPORecord | RLAIFRecord

_REASONING = re.compile(r"\s*<think>\n?(.*?)\n?</think>\s*<answer>\n?(.*?)\n?</answer>\s*", re.S)


def split_reasoning(content: str) -> tuple[str, str] | None:
    """Split `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` into (think, answer).

    None when `content` is not in that layout. Whitespace between the blocks is tolerated.

    >>> split_reasoning("<think>\\n7 + 5 = 12\\n</think>\\n<answer>\\n12\\n</answer>")
    ('7 + 5 = 12', '12')
    >>> split_reasoning("<think>\\n\\n</think>\\n\\n<answer>\\nHi\\n</answer>")
    ('', 'Hi')
    >>> split_reasoning("12") is None
    True
    """
    m = _REASONING.fullmatch(content)
    return None if m is None else (m.group(1), m.group(2))


# ---------------------------------------------------------------- parsing one decoded object

BLANK = object()


def _json_type(value: Any) -> str:
    """JSON's name for a decoded value's type, for error messages.

    >>> _json_type(True), _json_type(3), _json_type(None), _json_type([])
    ('boolean', 'number', 'null', 'array')
    """
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names = {str: "string", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _wrong_type(where: str, expected: str, value: Any) -> DataError:
    return DataError("wrong_type", f"expected {expected}, got {_json_type(value)}", field=where)


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _required(obj: dict, key: str, typ: type, expected: str, parent: str = "") -> Any:
    where = _join(parent, key)
    value = obj.get(key, BLANK)
    if value is BLANK:
        raise DataError("missing_field", "missing field", field=where)
    if not isinstance(value, typ):
        raise _wrong_type(where, expected, value)
    return value


def _tool_calls(raw: Any, where: str) -> tuple[dict[str, Any], ...] | None:
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list):
        raise _wrong_type(where, "array", raw)
    for i, call in enumerate(raw):
        item = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise _wrong_type(item, "object", call)
        # Both OpenAI's {"type": "function", "function": {...}} and the bare {"name", "arguments"}.
        fn = call
        if "function" in call:
            item, fn = f"{item}.function", call["function"]
            if not isinstance(fn, dict):
                raise _wrong_type(item, "object", fn)
        _required(fn, "name", str, "string", item)
        args = fn.get("arguments")
        if args is not None and not isinstance(args, str | dict):
            raise _wrong_type(f"{item}.arguments", "string or object", args)
    return tuple(raw)


def _message(raw: Any, where: str) -> Message:
    if not isinstance(raw, dict):
        raise _wrong_type(where, "object", raw)
    role = _required(raw, "role", str, "string", where)
    if role not in ROLES:
        detail = f"unknown role {role!r} (expected {'|'.join(ROLES)})"
        raise DataError("unknown_role", detail, field=f"{where}.role")
    reasoning = tool_calls = None
    if role == "assistant":
        tool_calls = _tool_calls(raw.get("tool_calls"), f"{where}.tool_calls")
        reasoning = raw.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise _wrong_type(f"{where}.reasoning_content", "string", reasoning)
    content = raw.get("content", BLANK)
    if tool_calls is not None and content in (None, BLANK):
        content = ""
    elif content is BLANK:
        raise DataError("missing_field", "missing field", field=f"{where}.content")
    elif not isinstance(content, str):
        raise _wrong_type(f"{where}.content", "string", content)
    return Message(role, content, reasoning, tool_calls)


def _tools(top: dict, first: dict, where: str) -> tuple[dict[str, Any], ...] | None:
    for holder, parent in ((top, ""), (first, f"{where}[0]")):
        for key in ("tools", "functions"):
            value = holder.get(key)
            if value is None:
                continue
            if not isinstance(value, list):
                raise _wrong_type(_join(parent, key), "array", value)
            for i, tool in enumerate(value):
                if not isinstance(tool, dict):
                    raise _wrong_type(f"{_join(parent, key)}[{i}]", "object", tool)
            if value:
                return tuple(value)
    return None


def _conversation(obj: dict, key: str) -> Conversation:
    raw = _required(obj, key, list, "array of messages")
    if not raw:
        raise DataError("empty", "empty conversation", field=key)
    messages = tuple(_message(m, f"{key}[{i}]") for i, m in enumerate(raw))
    return Conversation(messages, _tools(obj, raw[0], key))


def _ends_with_assistant(conv: Conversation, key: str, *, need_prompt: bool) -> None:
    last = len(conv.messages) - 1
    if conv.messages[last].role != "assistant":
        detail = f"last message must be an assistant turn, got {conv.messages[last].role!r}"
        raise DataError("last_not_assistant", detail, field=f"{key}[{last}].role")
    if need_prompt and last == 0:
        raise DataError("empty_prompt", "no prompt before the last assistant turn", field=key)


def _parse_pretrain(obj: dict) -> PretrainRecord:
    text = _required(obj, "text", str, "string")
    if not text:
        raise DataError("empty", "empty text", field="text")
    return PretrainRecord(text)


def _parse_sft(obj: dict) -> Conversation:
    conv = _conversation(obj, "conversations")
    if not any(m.role == "assistant" for m in conv.messages):
        raise DataError("no_assistant", "no assistant turn to learn from", field="conversations")
    return conv


def _parse_reasoning(obj: dict) -> Conversation:
    conv = _conversation(obj, "conversations")
    _ends_with_assistant(conv, "conversations", need_prompt=False)
    if split_reasoning(conv.messages[-1].content) is None:
        detail = r"expected '<think>\n...\n</think>\n<answer>\n...\n</answer>'"
        where = f"conversations[{len(conv.messages) - 1}].content"
        raise DataError("bad_reasoning", detail, field=where)
    return conv


def _parse_rlaif(obj: dict) -> RLAIFRecord:
    conv = _conversation(obj, "conversations")
    _ends_with_assistant(conv, "conversations", need_prompt=True)
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise _wrong_type("answer", "string or number", answer)
        if not isinstance(answer, str):
            answer = json.dumps(answer)
    return RLAIFRecord(conv, answer)


def _parse_dpo(obj: dict) -> DPORecord:
    chosen, rejected = _conversation(obj, "chosen"), _conversation(obj, "rejected")
    _ends_with_assistant(chosen, "chosen", need_prompt=True)
    _ends_with_assistant(rejected, "rejected", need_prompt=True)
    a, b = chosen.messages[:-1], rejected.messages[:-1]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            attr = ".role" if x.role != y.role else ".content" if x.content != y.content else ""
            detail = f"prompt differs from chosen[{i}]{attr}"
            raise DataError("prompt_mismatch", detail, field=f"rejected[{i}]{attr}")
    if len(a) != len(b):
        detail = f"prompt has {len(b)} messages but chosen's has {len(a)}"
        raise DataError("prompt_mismatch", detail, field="rejected")
    return DPORecord(chosen, rejected)


_PARSERS: dict[str, Callable[[dict], Record]] = {
    "pretrain": _parse_pretrain,
    "sft": _parse_sft,
    "dpo": _parse_dpo,
    "rlaif": _parse_rlaif,
    "reasoning": _parse_reasoning,
}


def parse_record(obj: Any, kind: Kind) -> Record:
    """Validate one decoded JSON value as a record of `kind`; raise `DataError` naming the field.

    >>> parse_record({"text": "hello", "source": "web"}, "pretrain")
    PretrainRecord(text='hello')
    >>> parse_record({"conversations": [{"role": "bot", "content": "hi"}]}, "sft")
    Traceback (most recent call last):
    ...
    minimind.data.formats.DataError: conversations[0].role: unknown role 'bot' (expected system|user|assistant|tool)
    """
    if kind not in _PARSERS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    if not isinstance(obj, dict):
        raise DataError("not_object", f"expected a JSON object, got {_json_type(obj)}")
    return _PARSERS[kind](obj)


# ---------------------------------------------------------------- streaming a file


@dataclass
class ReadSummary:
    """What one pass over a file saw. Every line is a record, a blank line or a bad line."""

    path: str
    lines: int = 0
    records: int = 0
    blank_lines: int = 0
    bad_lines: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add_bad(self, err: DataError) -> None:
        self.bad_lines += 1
        self.reasons[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def format(self) -> str:
        """One line of counts, then the first few bad lines.

        >>> s = ReadSummary("a.jsonl", lines=3, records=1, blank_lines=1)
        >>> s.add_bad(DataError("invalid_json", "invalid JSON", path="a.jsonl", line=2))
        >>> print(s.format())
        a.jsonl: 1 records, 1 bad lines (invalid_json 1), 1 blank lines, of 3 lines
          a.jsonl:2: invalid JSON
        """
        reasons = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common())
        bad = f"{self.bad_lines} bad lines" + (f" ({reasons})" if reasons else "")
        head = f"{self.path}: {self.records} records, {bad}, {self.blank_lines} blank lines"
        return "\n".join([f"{head}, of {self.lines} lines", *(f"  {e}" for e in self.examples)])


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_WHITESPACE = " \t\r\n"


def decode_line(raw: bytes, name: str, lineno: int) -> Any:
    """The JSON value on one line, or `BLANK` for a blank line; raises a located DataError."""
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.end]
        detail = f"invalid UTF-8 at byte {exc.start} ({bad!r}): {exc.reason}"
        raise DataError("invalid_utf8", detail, path=name, line=lineno) from None
    if not text.strip(_JSON_WHITESPACE):
        return BLANK
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        detail = f"invalid JSON: {exc.msg} at column {exc.colno}"
        raise DataError("invalid_json", detail, path=name, line=lineno) from None
    except (ValueError, RecursionError) as exc:  # too many digits in an int, too deeply nested
        raise DataError("invalid_json", f"invalid JSON: {exc}", path=name, line=lineno) from None
    # json.loads accepts a lone surrogate escape ("\ud800"), which no UTF-8 encoder can write
    # back; the regex keeps the full check off the common path.
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            detail = "lone surrogate escape in a JSON string (not valid Unicode)"
            raise DataError("invalid_unicode", detail, path=name, line=lineno) from None
    return value


def iter_json_values(
    path: StrPath, summary: ReadSummary, on_error: OnError = "raise"
) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON value) of each non-blank, decodable line of `path`.

    The layer below `RecordReader`: it counts lines, blank lines and undecodable lines
    (invalid UTF-8 or JSON) into `summary`, but does not look inside the values.
    """
    name = str(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            summary.lines += 1
            try:
                value = decode_line(raw, name, lineno)
            except DataError as err:
                summary.add_bad(err)
                if on_error == "raise":
                    raise
                continue
            if value is BLANK:
                summary.blank_lines += 1
            else:
                yield lineno, value


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


class RecordReader:
    """Iterate over the validated records of one JSON Lines file, streaming.

    `kind=None` detects the kind from the first records (`detect_kind`). With
    `on_error="raise"` the first bad line raises `DataError`; with `"skip"` bad lines are
    skipped and counted. `summary` describes the latest pass (it is reset by each iteration).

        reader = RecordReader("sft_mini_512.jsonl", on_error="skip")
        for conversation in reader: ...
        print(reader.summary.format())
    """

    def __init__(
        self,
        path: StrPath,
        kind: Kind | None = None,
        *,
        on_error: OnError = "raise",
        max_examples: int = 5,
    ) -> None:
        check_on_error(on_error)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        self.path = path
        self.kind: Kind = kind if kind is not None else detect_kind(path)
        self.on_error = on_error
        self.max_examples = max_examples
        self.summary = ReadSummary(str(path), max_examples=max_examples)

    def __iter__(self) -> Iterator[Record]:
        summary = self.summary = ReadSummary(str(self.path), max_examples=self.max_examples)
        parse = _PARSERS[self.kind]
        for lineno, value in iter_json_values(self.path, summary, self.on_error):
            try:
                if not isinstance(value, dict):
                    raise DataError(
                        "not_object", f"expected a JSON object, got {_json_type(value)}"
                    )
                record = parse(value)
            except DataError as err:
                located = err.at(summary.path, lineno)
                summary.add_bad(located)
                if self.on_error == "raise":
                    raise located from None
                continue
            summary.records += 1
            yield record


def _chat_flavour(obj: dict) -> tuple[bool, bool]:
    """(looks like rlaif, looks like reasoning) for one object with a `conversations` field."""
    conv = obj["conversations"]
    last = conv[-1] if isinstance(conv, list) and conv else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return "answer" in obj, False
    content = last.get("content")
    rlaif = "answer" in obj or (content == "" and not last.get("tool_calls"))
    reasoning = isinstance(content, str) and split_reasoning(content) is not None
    return rlaif, reasoning


def detect_kind(path: StrPath, *, sample: int = 64, max_lines: int = 10_000) -> Kind:
    """The kind of a file, judged from its first `sample` JSON objects (bad lines are skipped).

    The most common shape wins: `chosen`+`rejected` is dpo, `text` is pretrain, `conversations`
    is rlaif when every sampled record has an `answer` or an empty last assistant turn, reasoning
    when every sampled last assistant turn has the `<think>`/`<answer>` layout, else sft.
    Raises `DataError` (reason `undetectable`) when no line has a recognisable shape.
    """
    shapes: Counter[str] = Counter()
    flavours: list[tuple[bool, bool]] = []
    summary = ReadSummary(str(path))
    for _, value in iter_json_values(path, summary, "skip"):
        if isinstance(value, dict):
            if "chosen" in value and "rejected" in value:
                shapes["dpo"] += 1
            elif "conversations" in value:
                shapes["chat"] += 1
                flavours.append(_chat_flavour(value))
            elif "text" in value:
                shapes["pretrain"] += 1
        if shapes.total() >= sample or summary.lines >= max_lines:
            break
    if not shapes:
        detail = (
            f"cannot detect the kind from the first {summary.lines} lines: no JSON object with "
            "a 'text', 'conversations' or 'chosen'/'rejected' field; pass the kind explicitly"
        )
        raise DataError("undetectable", detail, path=str(path))
    shape = shapes.most_common(1)[0][0]
    if shape != "chat":
        return shape  # type: ignore[return-value]
    if all(rlaif for rlaif, _ in flavours):
        return "rlaif"
    if all(reasoning for _, reasoning in flavours):
        return "reasoning"
    return "sft"
