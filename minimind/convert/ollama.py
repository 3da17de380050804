"""Ollama export: a folder with `model.gguf` (gguf.py) and the `Modelfile` that `ollama create`
reads: `FROM ./model.gguf`, the chat format as a Go template, and the stop tokens.

Ollama renders prompts with its own Go `text/template`, not with the Jinja template stored in
the GGUF, so the ChatML format (minimind.tokenizer.chat) is written again here in Go. For a
conversation of system/user/assistant/tool messages it renders exactly what `render(messages,
add_generation_prompt=True)` renders (tested by executing it with Go where Go is installed):

  - the system block: the first message when it is a system message, else the default
    "You are a helpful assistant"; with tools, the tool header and one JSON line per tool;
  - user turns and later system turns as `<|im_start|>{role}\\n{content}<|im_end|>\\n`;
  - assistant turns with their reasoning (Ollama's `Thinking`, needs Ollama >= 0.9) as
    `<think>\\n...\\n</think>\\n\\n`, their content and tool calls, closed by `<|im_end|>\\n`;
  - a tool result as a user turn `<tool_response>\\n...\\n</tool_response>`;
  - the generation prompt `<|im_start|>assistant\\n` after a final non-assistant message.

Where Ollama differs, by design: a final assistant message is left open (Ollama continues it
rather than starting a new turn); Ollama merges consecutive messages of one role into one (two
tool results become one <tool_response> block); tool JSON is Go's compact `json` (no spaces,
keys sorted, <>& escaped) instead of Python's `json.dumps`; `enable_thinking=False` has no
equivalent. The model weights are the GGUF's; nothing here imports gguf or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

from minimind.fsutil import atomic_write
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer.chat import DEFAULT_SYSTEM_PROMPT, TOOLS_FOOTER, TOOLS_HEADER
from minimind.tokenizer.tokens import ENDOFTEXT, IM_END, IM_START

GGUF_NAME = "model.gguf"
# <|im_end|> ends every turn; <|endoftext|> ends pretraining documents; <|im_start|> would open
# a turn the model should not write for the user.
STOP_TOKENS = (IM_END, ENDOFTEXT, IM_START)

_FIRST_IS_SYSTEM = '(and .Messages (eq (index .Messages 0).Role "system"))'
# Go text/template. `{{-` / `-}}` trim the whitespace beside them, so every newline that is
# output is written literally. `$last` is Ollama's idiom for "the final message".
OLLAMA_TEMPLATE = (
    # system block (with the tool listing when tools are given)
    "{{- if .Tools }}<|im_start|>system\n"
    f"{{{{ if {_FIRST_IS_SYSTEM} }}}}{{{{ (index .Messages 0).Content }}}}\n\n{{{{ end }}}}"
    f"{TOOLS_HEADER}\n"
    "{{- range .Tools }}\n{{ json . }}\n{{- end }}"
    f"{TOOLS_FOOTER}"
    f"{{{{ else if {_FIRST_IS_SYSTEM} }}}}<|im_start|>system\n"
    "{{ (index .Messages 0).Content }}<|im_end|>\n"
    "{{ else }}<|im_start|>system\n"
    f"{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
    "{{ end }}"
    # the turns
    "{{- range $i, $m := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if or (eq $m.Role "user") (and (eq $m.Role "system") (ne $i 0)) }}'
    "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
    '{{ else if eq $m.Role "assistant" }}<|im_start|>assistant\n'
    "{{ if $m.Thinking }}<think>\n{{ $m.Thinking }}\n</think>\n\n{{ end }}"
    "{{ $m.Content }}\n"
    "{{- range $j, $c := $m.ToolCalls }}\n"
    "{{- if or $j $m.Content }}\n{{ end }}"
    '<tool_call>\n{"name": "{{ $c.Function.Name }}", '
    '"arguments": {{ json $c.Function.Arguments }}}\n</tool_call>\n'
    "{{- end }}\n"
    "{{- if not $last }}<|im_end|>\n{{ end }}\n"
    '{{- else if eq $m.Role "tool" }}<|im_start|>user\n'
    "<tool_response>\n{{ $m.Content }}\n</tool_response><|im_end|>\n"
    "{{ end }}\n"
    # the generation prompt
    '{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
    "{{- end }}"
)


def modelfile(gguf_name: str = GGUF_NAME, stops: tuple[str, ...] = STOP_TOKENS) -> str:
    """The Modelfile text: the weights beside it, the template, one `PARAMETER stop` per token.

    >>> print(modelfile().splitlines()[0])
    FROM ./model.gguf
    >>> [line for line in modelfile().splitlines() if line.startswith("PARAMETER")][0]
    'PARAMETER stop "<|im_end|>"'
    """
    if '"""' in OLLAMA_TEMPLATE:  # pragma: no cover - would end the quoted block early
        raise ValueError('the template contains """')
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{OLLAMA_TEMPLATE}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def export_ollama(
    model: MiniMindForCausalLM,
    folder: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    dtype: str = "f16",
) -> str:
    """Write `folder/model.gguf` and `folder/Modelfile`; returns the llama.cpp architecture.
    Then: `ollama create NAME -f folder/Modelfile` and `ollama run NAME`."""
    from .gguf import export_gguf

    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; an Ollama export is a folder")
    arch = export_gguf(model, out / GGUF_NAME, tokenizer_dir, dtype)
    atomic_write(out / "Modelfile", lambda f: f.write(modelfile().encode("utf-8")))
    return arch
