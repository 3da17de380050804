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
"""

import json
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


def _tool_call(call: dict) -> str:
    call = call.get("function") or call
    args = call["arguments"]
    args = args if isinstance(args, str) else _tojson(args)
    return f'<tool_call>\n{{"name": "{call.get("name", "")}", "arguments": {args}}}\n</tool_call>'


def _assistant_body(message: Message, content: str) -> str:
    """What an assistant turn says: reasoning, content, tool calls; its training target."""
    reasoning = message.get("reasoning_content")
    body = f"<think>\n{reasoning}\n</think>\n\n" if isinstance(reasoning, str) and reasoning else ""
    body += content
    for j, call in enumerate(message.get("tool_calls") or ()):
        if j > 0 or content:
            body += "\n"
        body += _tool_call(call)
    return body


def _system_block(first: Message, tools: Sequence[dict] | None) -> str:
    is_system = first.get("role") == "system"
    if tools:
        system = first["content"] + "\n\n" if is_system else ""
        listing = "".join("\n" + _tojson(tool) for tool in tools)
        return f"<|im_start|>system\n{system}{TOOLS_HEADER}{listing}{TOOLS_FOOTER}"
    system = first["content"] if is_system else DEFAULT_SYSTEM_PROMPT
    return f"<|im_start|>system\n{system}<|im_end|>\n"


def _pieces(
    messages: Sequence[Message],
    tools: Sequence[dict] | None,
    add_generation_prompt: bool,
    enable_thinking: bool | None,
) -> Iterator[tuple[str, bool]]:
    """The rendered text in order, as (text, is_assistant_target) pieces."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    yield _system_block(messages[0], tools), False
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        content = content if isinstance(content, str) else ""
        if role == "user" or (role == "system" and i > 0):
            yield f"<|im_start|>{role}\n{content}<|im_end|>\n", False
        elif role == "assistant":
            yield "<|im_start|>assistant\n", False
            yield _assistant_body(message, content) + "<|im_end|>", True
            yield "\n", False
        elif role == "tool":
            opens = i == 0 or messages[i - 1].get("role") != "tool"
            closes = i == last or messages[i + 1].get("role") != "tool"
            head = "<|im_start|>user" if opens else ""
            tail = "<|im_end|>\n" if closes else ""
            yield f"{head}\n<tool_response>\n{content}\n</tool_response>{tail}", False
    if add_generation_prompt:
        # The template tests `enable_thinking is false`: None (unset) means thinking allowed.
        yield "<|im_start|>assistant\n" + (_NO_THINKING if enable_thinking is False else ""), False


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
    text, spans, pos = [], [], 0
    for piece, is_target in _pieces(messages, tools, add_generation_prompt, enable_thinking):
        if is_target:
            spans.append((pos, pos + len(piece)))
        text.append(piece)
        pos += len(piece)
    return "".join(text), spans


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
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its SFT loss mask (1 = train on this
    token: the assistant targets, see `render_with_spans`). The text is tokenized once, so
    the ids equal `tokenizer.encode(render(...))`; the stage shifts mask and ids itself."""
    text, spans = render_with_spans(messages, tools, add_generation_prompt, enable_thinking)
    if tokenizer.fast is None:
        ids, offsets = tokenizer.encode_with_offsets(text)
        return ids, target_mask(offsets, spans)
    # The same rule as target_mask (a token overlapping a span is a target), vectorised.
    ids = tokenizer.fast.encode(text)
    starts, ends = tokenizer.char_spans(ids)
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask |= (ends > lo) & (starts < hi)
    return ids, mask.astype(np.int64).tolist()
