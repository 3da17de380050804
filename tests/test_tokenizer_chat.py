"""The chat format: `render` and `encode_chat` against transformers rendering the Jinja
templates, for our trained tokenizer and for the MiniMind2 reference tokenizer."""

import json
import random

import pytest

from minimind.tokenizer import CHAT_TEMPLATE, encode_chat, load_tokenizer, render, train_tokenizer
from minimind.tokenizer.chat import render_with_spans
from tests import REFERENCE

transformers = pytest.importorskip("transformers")

N_CONVERSATIONS = 300

PIECES = [
    "hello", " world", "MiniMind", "你好", "，世界。", "模型训练", "😀", "👍🏽", "é", " ", "  ",
    "\n", "\n\n", "\t", "<", ">", "&", "'", '"', "{}", "42", "3.14", "<think>", "</think>",
    "<answer>", "</tool_call>", "<tool_response>", "<|im_end|>",
]  # fmt: skip
NAMES = ["get_weather", "add", "搜索", "f"]


def text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))


def tool(rng: random.Random) -> dict:
    # Keys deliberately out of alphabetical order: transformers' tojson does not sort.
    fn = {
        "name": rng.choice(NAMES),
        "description": text(rng),
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
    }
    return {"type": "function", "function": fn} if rng.random() < 0.7 else fn


def tool_call(rng: random.Random) -> dict:
    args = {"z": text(rng), "a": [1, 2.5, None, True], "城市": "北京"}
    if rng.random() < 0.4:
        args = json.dumps(args, ensure_ascii=rng.random() < 0.5)
    call = {"name": rng.choice(NAMES), "arguments": args}
    return {"type": "function", "function": call} if rng.random() < 0.7 else call


def assistant(rng: random.Random, reasoning: bool) -> dict:
    message = {"role": "assistant", "content": text(rng)}
    if reasoning and rng.random() < 0.4:
        message["reasoning_content"] = text(rng)
    return message


def conversation(rng: random.Random, reasoning: bool) -> dict:
    """Keyword arguments for `render`: messages, tools and the generation flags."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": text(rng)})
    if rng.random() < 0.05:
        messages.append({"role": "tool", "content": text(rng)})
    for _ in range(rng.randint(1, 3)):
        content = [{"type": "text", "text": "x"}] if rng.random() < 0.05 else text(rng)
        messages.append({"role": "user", "content": content})
        reply = assistant(rng, reasoning)
        messages.append(reply)
        if rng.random() < 0.3:
            reply["tool_calls"] = [tool_call(rng) for _ in range(rng.randint(1, 2))]
            if rng.random() < 0.3:
                reply["content"] = None
            messages += [{"role": "tool", "content": text(rng)} for _ in range(rng.randint(1, 3))]
            messages.append(assistant(rng, reasoning))
        if rng.random() < 0.1:
            messages.append({"role": rng.choice(["system", "function"]), "content": text(rng)})
    if rng.random() < 0.4:
        messages.append({"role": "user", "content": text(rng)})
    return {
        "messages": messages,
        "tools": rng.choice([None, [], [tool(rng)], [tool(rng), tool(rng)]]),
        "add_generation_prompt": rng.random() < 0.5,
        "enable_thinking": rng.choice([None, True, False]),
    }


def with_generation_tags(template: str) -> str:
    """The template with the assistant targets inside `{% generation %}`, so transformers
    computes the loss mask independently of our code (`return_assistant_tokens_mask`)."""
    start = "   {{- '<|im_start|>' + message.role + '\\n' }}\n"
    end = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
    assert template.count(start) == 1 and template.count(end) == 1
    template = template.replace(start, start + "{%- generation %}\n")
    return template.replace(
        end, end.replace("'<|im_end|>\\n' }}", "'<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}")
    )


def hf_kwargs(case: dict) -> dict:
    kwargs = {k: case[k] for k in ("tools", "add_generation_prompt")}
    if case["enable_thinking"] is not None:  # unset, as a caller who never heard of it
        kwargs["enable_thinking"] = case["enable_thinking"]
    return kwargs


def check_parity(tokenizer, hf, case: dict) -> None:
    kwargs = hf_kwargs(case)
    expected_text = hf.apply_chat_template(case["messages"], tokenize=False, **kwargs)
    assert render(**case) == expected_text
    ids, mask = encode_chat(tokenizer, **case)
    expected = hf.apply_chat_template(
        case["messages"],
        chat_template=with_generation_tags(CHAT_TEMPLATE),
        return_dict=True,
        return_assistant_tokens_mask=True,
        **kwargs,
    )
    assert ids == expected["input_ids"]
    assert mask == expected["assistant_masks"]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    rng = random.Random(0)
    texts = [render(**conversation(rng, reasoning=True)) for _ in range(300)]
    folder = train_tokenizer(
        texts, tmp_path_factory.mktemp("tok"), vocab_size=800, show_progress=False
    )
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference():
    if not (REFERENCE / "tokenizer.json").exists():
        pytest.skip(f"MiniMind2 reference tokenizer not found at {REFERENCE}")
    return load_tokenizer(REFERENCE), transformers.AutoTokenizer.from_pretrained(REFERENCE)


def test_our_template_is_shipped(ours):
    tokenizer, hf = ours
    assert tokenizer.chat_template == hf.chat_template == CHAT_TEMPLATE


def test_parity_with_our_template(ours):
    tokenizer, hf = ours
    for seed in range(N_CONVERSATIONS):
        case = conversation(random.Random(seed), reasoning=True)
        try:
            check_parity(tokenizer, hf, case)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {case}") from e


def test_parity_with_minimind2_template(reference):
    # MiniMind2's template ignores reasoning_content; without it the templates agree.
    tokenizer, hf = reference
    for seed in range(N_CONVERSATIONS):
        case = conversation(random.Random(seed), reasoning=False)
        try:
            check_parity(tokenizer, hf, case)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {case}") from e


def test_mask_covers_exactly_the_replies(ours):
    tokenizer, _ = ours
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi 😀", "reasoning_content": "greet"},
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": "{}"}]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "3"},
    ]
    ids, mask = encode_chat(tokenizer, messages)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == (
        "<think>\ngreet\n</think>\n\nHi 😀<|im_end|>"
        '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call><|im_end|>'
        "3<|im_end|>"
    )
    # The mask opens right after each `<|im_start|>assistant\n` and closes on `<|im_end|>`.
    for start in (k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]):
        assert tokenizer.decode(ids[start - 3 : start]) == "<|im_start|>assistant\n"
    assert all(ids[k] == tokenizer.eos_id for k in range(len(mask) - 1) if mask[k] > mask[k + 1])


def test_generation_prompt(ours):
    tokenizer, _ = ours
    messages = [{"role": "user", "content": "hi"}]
    for thinking, tail in ((None, ""), (True, ""), (False, "<think>\n\n</think>\n\n")):
        text = render(messages, add_generation_prompt=True, enable_thinking=thinking)
        assert text.endswith("<|im_start|>assistant\n" + tail)
        ids, mask = encode_chat(
            tokenizer, messages, add_generation_prompt=True, enable_thinking=thinking
        )
        assert ids == tokenizer.encode(text) and not any(mask)


def test_spans_and_system_prompt():
    text, spans = render_with_spans(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        tools=[{"name": "f"}],
    )
    # With tools the template adds no default system prompt.
    assert "You are a helpful assistant" not in text and '\n{"name": "f"}\n</tools>' in text
    assert [text[s:e] for s, e in spans] == ["a<|im_end|>"]
    with pytest.raises(ValueError):
        render([])
