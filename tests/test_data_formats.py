"""Readers, validation messages, kind detection and `data check` (minimind.data.formats, .check)."""

from __future__ import annotations

import contextlib
import json
import pickle
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind.data.check import LengthStats, check_file, format_report
from minimind.data.formats import (
    KINDS,
    ROLES,
    Conversation,
    DataError,
    DPORecord,
    Message,
    PretrainRecord,
    RecordReader,
    RLAIFRecord,
    detect_kind,
    parse_record,
)
from minimind.tokenizer.chat import render

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
THINK = {"role": "assistant", "content": "<think>\nso\n</think>\n<answer>\nyes\n</answer>"}


def write_lines(path: Path, lines: list) -> Path:
    """Write JSON values (or raw bytes / str lines as given) one per line."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(json.dumps(line, ensure_ascii=False).encode())
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def first_error(tmp_path: Path, kind: str, line, name: str = "data.jsonl") -> str:
    """The message of the error raised by a file whose line 2 is `line` (line 1 is valid)."""
    good = {
        "pretrain": {"text": "ok"},
        "sft": {"conversations": [U, A]},
        "dpo": {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "no"}]},
        "rlaif": {"conversations": [U, {"role": "assistant", "content": ""}]},
        "reasoning": {"conversations": [U, THINK]},
    }[kind]
    path = write_lines(tmp_path / name, [good, line])
    with pytest.raises(DataError) as info:
        list(RecordReader(path, kind))
    message = str(info.value)
    assert message.startswith(f"{path}:2: "), message
    return message[len(f"{path}:2: ") :]


# ---------------------------------------------------------------- valid records


def test_pretrain_record_and_unknown_fields(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"text": "一段文字<|im_end|>", "meta": {"x": 1}}])
    assert list(RecordReader(path, "pretrain")) == [PretrainRecord("一段文字<|im_end|>")]


def test_sft_record_with_tools_and_tool_calls(tmp_path):
    fn = {"name": "calc", "parameters": {}}
    record = {
        "conversations": [
            {"role": "system", "content": "sys", "functions": [fn]},
            U,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "calc", "arguments": {"x": 1}}],
            },
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "2", "reasoning_content": "because"},
        ],
        "id": 7,
    }
    conv = parse_record(record, "sft")
    assert isinstance(conv, Conversation)
    assert conv.tools == (fn,)
    assert conv.messages[2] == Message(
        "assistant", "", None, ({"name": "calc", "arguments": {"x": 1}},)
    )
    assert conv.messages[4].reasoning_content == "because"
    assert conv.messages[4].to_dict() == {
        "role": "assistant",
        "content": "2",
        "reasoning_content": "because",
    }


def test_tools_at_top_level_win_and_openai_tool_call_layout():
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    record = {
        "tools": [{"name": "top"}],
        "conversations": [
            {"role": "system", "content": "", "tools": [{"name": "first"}]},
            U,
            {"role": "assistant", "tool_calls": [call]},
        ],
    }
    conv = parse_record(record, "sft")
    assert conv.tools == ({"name": "top"},)
    assert conv.messages[2].content == ""


def test_dpo_rlaif_reasoning_records():
    dpo = parse_record(
        {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "meh"}]}, "dpo"
    )
    assert isinstance(dpo, DPORecord) and dpo.prompt == (Message("user", "hi"),)
    rl = parse_record(
        {"conversations": [U, {"role": "assistant", "content": ""}], "answer": 12}, "rlaif"
    )
    assert isinstance(rl, RLAIFRecord) and rl.answer == "12" and rl.reference == ""
    assert rl.prompt == (Message("user", "hi"),)
    assert parse_record({"conversations": [U, THINK]}, "reasoning").messages[-1] == Message(**THINK)


def test_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \n{"text": "b"}\r\n')
    reader = RecordReader(path, "pretrain")
    assert [r.text for r in reader] == ["a", "b"]
    s = reader.summary
    assert (s.lines, s.records, s.blank_lines, s.bad_lines) == (4, 2, 2, 0)


# ---------------------------------------------------------------- one error message per problem

ERRORS = [
    ("pretrain", b'{"text": "a"', "invalid JSON: Expecting ',' delimiter at column 13"),
    ("pretrain", b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13 (b'\\xe9'): invalid continuation byte"),
    ("pretrain", b'{"text": "\\ud800"}', "lone surrogate escape in a JSON string (not valid Unicode)"),
    ("pretrain", [1, 2], "expected a JSON object, got array"),
    ("pretrain", {"txt": "a"}, "text: missing field"),
    ("pretrain", {"text": 3}, "text: expected string, got number"),
    ("pretrain", {"text": ""}, "text: empty text"),
    ("sft", {"conversations": [U, U, {"role": "bot", "content": "x"}]},
     "conversations[2].role: unknown role 'bot' (expected system|user|assistant|tool)"),
    ("sft", {"conversations": []}, "conversations: empty conversation"),
    ("sft", {"conversations": {"role": "user"}}, "conversations: expected array of messages, got object"),
    ("sft", {"conversations": [U, "hello"]}, "conversations[1]: expected object, got string"),
    ("sft", {"conversations": [{"role": "user"}, A]}, "conversations[0].content: missing field"),
    ("sft", {"conversations": [{"content": "x"}, A]}, "conversations[0].role: missing field"),
    ("sft", {"conversations": [U, {"role": "assistant", "content": None}]},
     "conversations[1].content: expected string, got null"),
    ("sft", {"conversations": [U]}, "conversations: no assistant turn to learn from"),
    ("sft", {"conversations": [{**U, "functions": "calc"}, A]},
     "conversations[0].functions: expected array, got string"),
    ("sft", {"tools": [["x"]], "conversations": [U, A]}, "tools[0]: expected object, got array"),
    ("sft", {"conversations": [U, {**A, "reasoning_content": 1}]},
     "conversations[1].reasoning_content: expected string, got number"),
    ("sft", {"conversations": [U, {**A, "tool_calls": {"name": "f"}}]},
     "conversations[1].tool_calls: expected array, got object"),
    ("sft", {"conversations": [U, {**A, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "conversations[1].tool_calls[0].function.name: missing field"),
    ("sft", {"conversations": [U, {**A, "tool_calls": [{"name": "f", "arguments": 1}]}]},
     "conversations[1].tool_calls[0].arguments: expected string or object, got number"),
    ("dpo", {"chosen": [U, A], "rejected": [{"role": "user", "content": "ho"}, A]},
     "rejected[0].content: prompt differs from chosen[0].content"),
    ("dpo", {"chosen": [U, A], "rejected": [{"role": "system", "content": "hi"}, A]},
     "rejected[0].role: prompt differs from chosen[0].role"),
    ("dpo", {"chosen": [U, A], "rejected": [U, U, A]}, "rejected: prompt has 2 messages but chosen's has 1"),
    ("dpo", {"chosen": [U, A, U], "rejected": [U, A]},
     "chosen[2].role: last message must be an assistant turn, got 'user'"),
    ("dpo", {"chosen": [A], "rejected": [A]}, "chosen: no prompt before the last assistant turn"),
    ("dpo", {"chosen": [U, A]}, "rejected: missing field"),
    ("rlaif", {"conversations": [U]}, "conversations[0].role: last message must be an assistant turn, got 'user'"),
    ("rlaif", {"conversations": [U, A], "answer": True}, "answer: expected string or number, got boolean"),
    ("reasoning", {"conversations": [U, A]},
     "conversations[1].content: expected '<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>'"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "line", "expected"), ERRORS)
def test_error_names_file_line_and_field(tmp_path, kind, line, expected):
    assert first_error(tmp_path, kind, line) == expected


def test_exact_message_from_the_issue(tmp_path):
    line = {"conversations": [U, A, {"role": "bot", "content": "x"}]}
    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": [U, A]}] * 16 + [line])
    with pytest.raises(DataError) as info:
        list(RecordReader(path, "sft"))
    assert str(info.value) == (
        f"{path}:17: conversations[2].role: unknown role 'bot' (expected system|user|assistant|tool)"
    )
    assert (info.value.path, info.value.line, info.value.field) == (
        str(path),
        17,
        "conversations[2].role",
    )
    assert info.value.reason == "unknown_role"
    assert isinstance(info.value, ValueError)


def test_data_error_pickles():
    err = DataError("unknown_role", "bad", field="x", path="f.jsonl", line=3)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.reason, back.line) == (str(err), "unknown_role", 3)


def test_skip_counts_reasons_and_keeps_examples(tmp_path):
    path = write_lines(
        tmp_path / "s.jsonl",
        [{"text": "a"}, b"{oops", {"text": 1}, b"", {"text": "b"}, b"nope", b"\xff"],
    )
    reader = RecordReader(path, "pretrain", on_error="skip", max_examples=2)
    assert [r.text for r in reader] == ["a", "b"]
    s = reader.summary
    assert (s.lines, s.records, s.blank_lines, s.bad_lines) == (7, 2, 1, 4)
    assert dict(s.reasons) == {"invalid_json": 2, "wrong_type": 1, "invalid_utf8": 1}
    assert s.examples[0].startswith(f"{path}:2: invalid JSON")
    assert s.examples[1] == f"{path}:3: text: expected string, got number"
    assert len(s.examples) == 2
    assert "4 bad lines (invalid_json 2, wrong_type 1, invalid_utf8 1)" in s.format()
    # A second pass starts a fresh summary.
    assert len(list(reader)) == 2 and reader.summary.bad_lines == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_error"):
        RecordReader("x.jsonl", "sft", on_error="ignore")
    with pytest.raises(ValueError, match="unknown kind"):
        RecordReader("x.jsonl", "chat")
    with pytest.raises(ValueError, match="unknown kind"):
        parse_record({}, "chat")


# ---------------------------------------------------------------- kind detection

DETECT = [
    ([{"text": "a"}], "pretrain"),
    ([{"conversations": [U, A]}], "sft"),
    ([{"conversations": [U, THINK]}], "reasoning"),
    ([{"conversations": [U, THINK]}, {"conversations": [U, A]}], "sft"),
    ([{"conversations": [U, {"role": "assistant", "content": ""}]}], "rlaif"),
    ([{"conversations": [U, A], "answer": "4"}], "rlaif"),
    ([{"chosen": [U, A], "rejected": [U, A]}], "dpo"),
    ([b"garbage", {"text": 5}, {"text": "a"}], "pretrain"),
]


@pytest.mark.parametrize(("lines", "kind"), DETECT)
def test_detect_kind(tmp_path, lines, kind):
    assert detect_kind(write_lines(tmp_path / "d.jsonl", lines)) == kind


def test_detect_kind_is_overridable_and_fails_clearly(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"conversations": [U, THINK]}])
    assert RecordReader(path).kind == "reasoning"
    assert RecordReader(path, "sft").kind == "sft"
    empty = write_lines(tmp_path / "e.jsonl", [b"", {"x": 1}, b"[1]"])
    with pytest.raises(DataError, match=r"e\.jsonl: cannot detect the kind from the first 3 lines"):
        detect_kind(empty)


# ---------------------------------------------------------------- data check


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_check_file_report(tmp_path):
    path = write_lines(
        tmp_path / "sft.jsonl",
        [{"conversations": [U, A]}, {"conversations": [U, {"role": "bot", "content": ""}]}, b""],
    )
    report = check_file(path, tokenizer=CharTokenizer())
    assert (
        report.kind,
        report.kind_detected,
        report.records,
        report.bad_lines,
        report.blank_lines,
    ) == (
        "sft",
        True,
        1,
        1,
        1,
    )
    assert report.bad_reasons == {"unknown_role": 1}
    assert report.bad_examples[0].startswith(f"{path}:2: conversations[1].role: unknown role 'bot'")
    rendered = render([U, A])
    assert report.lengths["chat_chars"].max == len(rendered)
    assert report.lengths["chat_tokens"].max == len(rendered)
    text = format_report(report)
    assert "kind: sft (detected)" in text and "chat_tokens (the conversation rendered" in text
    with pytest.raises(DataError):
        check_file(path, on_error="raise")


def test_check_file_with_tokenizer_json_and_dpo(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hi": 0, "hello": 1, "no": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_lines(
        tmp_path / "dpo.jsonl",
        [{"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "no no"}]}],
    )
    for tokenizer in (tmp_path, tmp_path / "tokenizer.json", tok):
        report = check_file(path, "dpo", tokenizer=tokenizer)
        assert not report.kind_detected
        for side, last in (("chosen", A), ("rejected", {"role": "assistant", "content": "no no"})):
            expected = len(tok.encode(render([U, last])).ids)
            assert report.lengths[f"{side}_chat_tokens"].max == expected
    with pytest.raises(TypeError):
        check_file(path, tokenizer=42)


def test_check_file_undetectable_and_max_records(tmp_path):
    junk = write_lines(tmp_path / "junk.jsonl", [b"{", b"[]"])
    report = check_file(junk)
    assert (report.kind, report.records, report.bad_lines, report.lines) == (None, 0, 1, 2)
    assert "unknown (could not be detected)" in format_report(report)
    with pytest.raises(DataError):
        check_file(junk, kind="pretrain", on_error="raise")
    many = write_lines(tmp_path / "many.jsonl", [{"text": "x" * n} for n in range(1, 50)])
    report = check_file(many, max_records=10)
    assert report.records == 10 and report.stopped_early
    assert report.lengths["text_chars"].quantile(1.0) == 10


def test_length_stats_empty():
    s = LengthStats()
    assert (s.count, s.min, s.max, s.mean, s.quantile(0.5)) == (0, 0, 0, 0.0, 0)
    assert s.histogram() == [(0, 8, 0)]


# ---------------------------------------------------------------- property tests: only DataError

KEYS = ["text", "conversations", "chosen", "rejected", "answer", "tools", "functions", "role",
        "content", "reasoning_content", "tool_calls", "function", "name", "arguments"]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*ROLES, "bot", "", THINK["content"]])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=16,
)
tool_call = st.fixed_dictionaries(
    {}, optional={"name": json_values, "arguments": json_values, "function": json_values}
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from([*ROLES, "bot"]) | json_values,
        "content": st.text(max_size=12) | json_values,
    },
    optional={
        "tool_calls": st.lists(tool_call, max_size=2) | json_values,
        "reasoning_content": json_values,
        "functions": st.lists(json_values, max_size=2) | json_values,
    },
)
conversation = st.lists(message, max_size=4) | json_values
record = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=12) | json_values,
        "conversations": conversation,
        "chosen": conversation,
        "rejected": conversation,
        "answer": json_values,
        "tools": json_values,
    },
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_data_errors(path: Path) -> None:
    with contextlib.suppress(DataError):
        detect_kind(path)
    for kind in KINDS:
        with contextlib.suppress(DataError):
            list(RecordReader(path, kind))
        reader = RecordReader(path, kind, on_error="skip")
        list(reader)
        s = reader.summary
        assert s.lines == s.records + s.blank_lines + s.bad_lines
        assert s.bad_lines == sum(s.reasons.values())


@FAST
@given(st.one_of(record, json_values))
def test_parse_record_raises_only_data_error(value):
    for kind in KINDS:
        try:
            parse_record(value, kind)
        except DataError as err:
            assert err.reason and str(err)


@FAST
@given(st.lists(st.binary(max_size=40) | st.text(max_size=30).map(str.encode), max_size=6))
def test_random_bytes_raise_only_data_error(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        path.write_bytes(b"\n".join(lines))
        _only_data_errors(path)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(record, json_values), min_size=1, max_size=4))
def test_random_json_files_raise_only_data_error(values):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "j.jsonl"
        path.write_text("\n".join(json.dumps(v) for v in values), encoding="utf-8")
        _only_data_errors(path)


valid_message = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(ROLES),
    st.text(max_size=20),
)


@FAST
@given(st.lists(valid_message, max_size=4), st.text(max_size=20))
def test_valid_conversations_round_trip(messages, reply):
    messages = [*messages, {"role": "assistant", "content": reply}]
    conv = parse_record({"conversations": messages}, "sft")
    assert [m.to_dict() for m in conv.messages] == messages
