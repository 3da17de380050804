"""minimind.convert.ollama: the Modelfile text, its Go chat template, and the exported folder.

The template is checked two ways: structurally everywhere (FROM line, quoting, stop tokens, the
ChatML pieces), and, where a Go toolchain is installed, by executing it with Go's text/template
on Ollama's data shapes (System, Messages with Role/Content/Thinking/ToolCalls, Tools, and a
`json` function) and comparing with our Python renderer for a set of conversations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from minimind.convert.ollama import OLLAMA_TEMPLATE, STOP_TOKENS, modelfile
from minimind.tokenizer.chat import render


def test_modelfile_structure():
    text = modelfile()
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert text.count('"""') == 2  # one quoted TEMPLATE block, nothing inside closes it early
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == OLLAMA_TEMPLATE
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == [f'PARAMETER stop "{s}"' for s in STOP_TOKENS]
    assert {"<|im_end|>", "<|endoftext|>"} <= set(STOP_TOKENS)
    assert modelfile("x.gguf").startswith("FROM ./x.gguf\n")


def test_template_pieces():
    t = OLLAMA_TEMPLATE
    assert "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n" in t  # default system
    assert "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n" in t  # user turns
    assert "<|im_start|>assistant\n" in t and "<|im_end|>" in t
    assert "<think>\n{{ $m.Thinking }}\n</think>\n\n" in t
    assert "<tool_response>\n{{ $m.Content }}\n</tool_response>" in t
    # the generation prompt after a final message that is not the assistant's
    assert '{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}' in t
    # Go template delimiters balance
    assert t.count("{{") == t.count("}}") - t.count("}}}") + t.count("}}}")


# --- executing the template with Go -----------------------------------------------------------

GO_PROGRAM = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// The shapes of Ollama's api.Message / api.ToolCall that the template reads.
type ToolCallFunction struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}
type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}
type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking"`
	ToolCalls []ToolCall `json:"tool_calls"`
}
type Case struct {
	Messages []*Message      `json:"messages"`
	Tools    []map[string]any `json:"tools"`
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("t").Funcs(funcs).Parse(string(src)))
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		var system []string
		for _, m := range c.Messages {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": c.Messages, "Tools": c.Tools, "Response": ""}
		if len(c.Tools) == 0 {
			data["Tools"] = nil
		}
		if err := tmpl.Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""

U1 = {"role": "user", "content": "Hi, who are you?"}
A1 = {"role": "assistant", "content": "I am MiniMind."}
U2 = {"role": "user", "content": "2+2=?\nshow steps"}
SYS = {"role": "system", "content": "Be brief."}
CASES = [
    [U1],
    [SYS, U1],
    [U1, A1, U2],
    [SYS, U1, A1, U2],
    [U1, {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4"}, U2],
    [SYS, U1, A1, {"role": "system", "content": "Now in French."}, U2],
    [U1, A1, {"role": "tool", "content": '{"temp": 21}'}],
    [{"role": "user", "content": "中文，可以吗？"}, {"role": "assistant", "content": "可以。"}, U2],
]


def _ollama_message(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"], "thinking": m.get("reasoning_content", "")}


@pytest.mark.slow
def test_go_template_renders_like_our_chat_template(tmp_path):
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain on PATH: the template is checked structurally only")
    (tmp_path / "main.go").write_text(GO_PROGRAM)
    (tmp_path / "template.txt").write_text(OLLAMA_TEMPLATE)
    cases = [{"messages": [_ollama_message(m) for m in case], "tools": []} for case in CASES]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    cases.append({"messages": [_ollama_message(SYS), _ollama_message(U1)], "tools": tools})
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath")}
    env["GOFLAGS"] = "-mod=mod"
    proc = subprocess.run(
        [go, "run", "main.go", "template.txt"],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    for case, text in zip(CASES, got):
        assert text == render(case, add_generation_prompt=True), case
    # tools: Go's json is compact (and here sorts map keys) where Python's has spaces
    expected = render([SYS, U1], tools=tools, add_generation_prompt=True)
    compact = json.dumps(tools[0], separators=(",", ":"), sort_keys=True)
    assert got[-1] == expected.replace(json.dumps(tools[0]), compact)
