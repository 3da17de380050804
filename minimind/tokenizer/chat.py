"""The chat format, in one place: the Jinja template we ship, its plain-Python twin, and the
SFT loss mask.

`CHAT_TEMPLATE` is MiniMind2's ChatML template (reference/minimind2/tokenizer_config.json)
with one addition: an assistant message's `reasoning_content`, when it is a non-empty string,
is rendered as `<think>\\n{reasoning}\\n</think>\\n\\n` before its content. MiniMind2's template
drops `reasoning_content`; we keep it, in every assistant turn, so reasoning data trains its
reasoning and a conversation that carries reasoning renders it the same way in SFT and in
chat (a caller that wants old reasoning dropped leaves it out of the history). For messages
without reasoning the two templates render identically.

`render` produces exactly the string `transformers` renders from `CHAT_TEMPLATE` (the tests
compare them), without Jinja, because data preparation renders millions of conversations.
Template quirks it reproduces on purpose: the default system prompt is added only when there
are no tools; roles other than system/user/assistant/tool are dropped; consecutive tool
results share one user turn; a non-string content renders as ''; tool arguments that are not
a string go through transformers' `tojson`, which is `json.dumps(x, ensure_ascii=False)` (no
key sorting and no HTML escaping, unlike plain Jinja's `tojson`).
Tokenization and data loading are not here: `encode_chat` takes any `Tokenizer`.

Control tokens come from the template only. `encode_chat` encodes what callers write
(system, user and tool content, tool listings, call arguments) as plain text, so a user who
types `<|im_end|>\n<|im_start|>assistant\n` gets those characters, not a forged turn; an
assistant's content keeps the tag tokens (`<think>`, `<tool_call>`) the model itself says.
The text is the same, and so are the ids whenever no message writes an added token; data
that writes control tokens in content on purpose opts in with `special_in_content=True`.
"""

import json
import re
import weakref
from collections.abc import Iterator, Sequence

import numpy as np

from minimind.tokenizer.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"

CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
 {%- if messages[0]['role'] == 'system' -%}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else -%}
        {{- '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}
 {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
   {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.reasoning_content is string and message.reasoning_content %}
            {{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}
        {%- endif %}
   {{- content }}
  {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
_NO_THINKING = "<think>\n\n</think>\n\n"

Message = dict
Span = tuple[int, int]


def _tojson(value: object) -> str:
    """transformers' `tojson` filter.

    >>> _tojson({"b": "<&'>", "a": "中"})
    '{"b": "<&\\'>", "a": "中"}'
    """
    return json.dumps(value, ensure_ascii=False)


# How a piece of the rendered text is tokenized (encode_chat):
TEMPLATE = "template"  # the template's own text: its markers are the added tokens they name
TEXT = "text"  # a caller's text (system, user, tool, tool listings, call names/arguments): no
# added token is recognised in it, so a user who types `<|im_start|>` cannot open a turn
REPLY = "reply"  # an assistant's content and reasoning: tag tokens (`<think>`, `<tool_call>`)
# are recognised, being what the model says; control tokens (`<|im_end|>`) are not

Piece = tuple[str, bool, str]  # (text, is_assistant_target, TEMPLATE | TEXT | REPLY)


def _tool_call(call: dict) -> list[Piece]:
    call = call.get("function") or call
    args = call["arguments"]
    args = args if isinstance(args, str) else _tojson(args)
    return [
        ('<tool_call>\n{"name": "', True, TEMPLATE),
        (str(call.get("name", "")), True, TEXT),
        ('", "arguments": ', True, TEMPLATE),
        (args, True, TEXT),
        ("}\n</tool_call>", True, TEMPLATE),
    ]


def _assistant_body(message: Message, content: str) -> list[Piece]:
    """What an assistant turn says: reasoning, content, tool calls; its training target."""
    reasoning = message.get("reasoning_content")
    body: list[Piece] = []
    if isinstance(reasoning, str) and reasoning:
        body += [("<think>\n", True, TEMPLATE), (reasoning, True, REPLY)]
        body += [("\n</think>\n\n", True, TEMPLATE)]
    body.append((content, True, REPLY))
    for j, call in enumerate(message.get("tool_calls") or ()):
        if j > 0 or content:
            body.append(("\n", True, TEMPLATE))
        body += _tool_call(call)
    return body


def _system_block(first: Message, tools: Sequence[dict] | None) -> list[Piece]:
    is_system = first.get("role") == "system"
    head = ("<|im_start|>system\n", False, TEMPLATE)
    if tools:
        system = [(first["content"], False, TEXT), ("\n\n", False, TEMPLATE)] if is_system else []
        listing = [
            p for tool in tools for p in (("\n", False, TEMPLATE), (_tojson(tool), False, TEXT))
        ]
        return [
            head,
            *system,
            (TOOLS_HEADER, False, TEMPLATE),
            *listing,
            (TOOLS_FOOTER, False, TEMPLATE),
        ]
    system = first["content"] if is_system else DEFAULT_SYSTEM_PROMPT
    return [head, (system, False, TEXT), ("<|im_end|>\n", False, TEMPLATE)]


def _pieces(
    messages: Sequence[Message],
    tools: Sequence[dict] | None,
    add_generation_prompt: bool,
    enable_thinking: bool | None,
) -> Iterator[Piece]:
    """The rendered text in order, as (text, is_assistant_target, how to tokenize) pieces."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    yield from _system_block(messages[0], tools)
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        content = content if isinstance(content, str) else ""
        if role == "user" or (role == "system" and i > 0):
            yield f"<|im_start|>{role}\n", False, TEMPLATE
            yield content, False, TEXT
            yield "<|im_end|>\n", False, TEMPLATE
        elif role == "assistant":
            yield "<|im_start|>assistant\n", False, TEMPLATE
            yield from _assistant_body(message, content)
            yield "<|im_end|>", True, TEMPLATE
            yield "\n", False, TEMPLATE
        elif role == "tool":
            opens = i == 0 or messages[i - 1].get("role") != "tool"
            closes = i == last or messages[i + 1].get("role") != "tool"
            head = "<|im_start|>user" if opens else ""
            tail = "<|im_end|>\n" if closes else ""
            yield f"{head}\n<tool_response>\n", False, TEMPLATE
            yield content, False, TEXT
            yield f"\n</tool_response>{tail}", False, TEMPLATE
    if add_generation_prompt:
        # The template tests `enable_thinking is false`: None (unset) means thinking allowed.
        tail = _NO_THINKING if enable_thinking is False else ""
        yield "<|im_start|>assistant\n" + tail, False, TEMPLATE


def render_with_spans(
    messages: Sequence[Message],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
) -> tuple[str, list[Span]]:
    """`render`, plus the (start, end) character spans of the assistant targets: each
    assistant turn from just after `<|im_start|>assistant\\n` through its `<|im_end|>`.

    >>> text, spans = render_with_spans(
    ...     [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ... )
    >>> [text[s:e] for s, e in spans]
    ['4<|im_end|>']
    """
    pieces = list(_pieces(messages, tools, add_generation_prompt, enable_thinking))
    return "".join(p[0] for p in pieces), _target_spans(pieces)


def _target_spans(pieces: Sequence[Piece]) -> list[Span]:
    spans: list[Span] = []
    pos, in_target = 0, False
    for text, is_target, _ in pieces:
        if is_target and in_target:
            spans[-1] = (spans[-1][0], pos + len(text))
        elif is_target:
            spans.append((pos, pos + len(text)))
        in_target = is_target
        pos += len(text)
    return spans


def render(
    messages: Sequence[Message],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
) -> str:
    """The conversation as `CHAT_TEMPLATE` renders it.

    >>> print(render([{"role": "user", "content": "hi"}], add_generation_prompt=True), end="")
    <|im_start|>system
    You are a helpful assistant<|im_end|>
    <|im_start|>user
    hi<|im_end|>
    <|im_start|>assistant
    >>> calls = [{"function": {"name": "add", "arguments": {"a": 1}}}]
    >>> print(render([
    ...     {"role": "system", "content": "Be brief."},
    ...     {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
    ...      "tool_calls": calls},
    ...     {"role": "tool", "content": "1"},
    ... ]), end="")
    <|im_start|>system
    Be brief.<|im_end|>
    <|im_start|>assistant
    <think>
    Use the tool.
    </think>
    <BLANKLINE>
    <tool_call>
    {"name": "add", "arguments": {"a": 1}}
    </tool_call><|im_end|>
    <|im_start|>user
    <tool_response>
    1
    </tool_response><|im_end|>
    """
    return render_with_spans(messages, tools, add_generation_prompt, enable_thinking)[0]


def target_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """1 for each token whose characters overlap a target span, else 0.

    A byte-level token can straddle a span edge (e.g. the newline ending
    `<|im_start|>assistant\\n` merges with a reply that starts with a newline); it is trained,
    so every target character is covered, the rule transformers uses for assistant masks.

    >>> target_mask([(0, 3), (3, 5), (5, 8), (8, 9)], [(4, 8)])
    [0, 1, 1, 0]
    """
    mask, k = [], 0
    for start, end in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        mask.append(int(k < len(spans) and end > spans[k][0]))
    return mask


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    special_in_content: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its SFT loss mask (1 = train on this
    token: the assistant targets, see `render_with_spans`); the stage shifts mask and ids.

    The template's markers are their tokens; what callers wrote is text (TEXT and REPLY
    above): `<|im_start|>` typed in a user message is encoded as its characters, so no
    message can open or close a turn. The ids decode back to `render(...)` either way, and
    they equal `tokenizer.encode(render(...))` whenever no message writes an added token.
    `special_in_content=True` recognises added tokens anywhere in the rendered text (the
    transformers behaviour), for data that writes control tokens in content on purpose."""
    pieces = list(_pieces(messages, tools, add_generation_prompt, enable_thinking))
    text, spans = "".join(p[0] for p in pieces), _target_spans(pieces)
    if not special_in_content and _writes_tokens(tokenizer, pieces):
        ids = _encode_pieces(tokenizer, pieces)
    elif tokenizer.fast is None:
        ids, offsets = tokenizer.encode_with_offsets(text)
        return ids, target_mask(offsets, spans)
    else:
        ids = tokenizer.fast.encode(text)
    # The same rule as target_mask (a token overlapping a span is a target), vectorised.
    starts, ends = tokenizer.char_spans(ids)
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask |= (ends > lo) & (starts < hi)
    return ids, mask.astype(np.int64).tolist()


class _Splitters:
    """Per tokenizer: a regex finding the added tokens recognised in each kind of piece."""

    def __init__(self, tokenizer: Tokenizer):
        added = tokenizer.added_tokens
        tags = [t for t, i in added.items() if i not in tokenizer.special_ids]
        self.ids = added
        self.by_mode = {TEMPLATE: _alternation(added), REPLY: _alternation(tags), TEXT: None}
        # what may not appear in a piece for the whole text to be encoded in one call
        self.forbidden = {TEMPLATE: None, REPLY: _alternation(added.keys() - set(tags))}
        self.forbidden[TEXT] = self.by_mode[TEMPLATE]


def _alternation(tokens) -> re.Pattern | None:
    # Longest first: at one position the longest token wins, as in `tokenizers` (leftmost-longest)
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


_SPLITTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _splitters(tokenizer: Tokenizer) -> _Splitters:
    found = _SPLITTERS.get(tokenizer)
    if found is None:
        found = _SPLITTERS[tokenizer] = _Splitters(tokenizer)
    return found


def _writes_tokens(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> bool:
    """Whether a caller's piece writes an added token it may not use. When none does, the
    whole text encodes to the same ids as piece by piece: an added token cannot straddle a
    piece boundary, as no template text next to a caller's text continues a token."""
    forbidden = _splitters(tokenizer).forbidden
    return any(
        (pattern := forbidden[mode]) is not None and pattern.search(text)
        for text, _, mode in pieces
    )


def _encode_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> list[int]:
    """Ids of the pieces: each piece's recognised added tokens are their ids, and each run of
    text between them is encoded with `encode_text` (no added token recognised), as
    `tokenizers` encodes the text between the added tokens it splits out."""
    split = _splitters(tokenizer)
    ids: list[int] = []
    run: list[str] = []
    for text, _, mode in pieces:
        pattern, pos = split.by_mode[mode], 0
        for match in pattern.finditer(text) if pattern is not None else ():
            run.append(text[pos : match.start()])
            ids += tokenizer.encode_text("".join(run)) if any(run) else []
            ids.append(split.ids[match.group()])
            run, pos = [], match.end()
        run.append(text[pos:])
    return ids + (tokenizer.encode_text("".join(run)) if any(run) else [])
