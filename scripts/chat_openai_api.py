"""MiniMind's `python scripts/chat_openai_api.py`: chat with a running API server through the
official `openai` package, streaming each reply (reasoning, when the model thinks, in grey).

    python scripts/serve_openai_api.py &          # in another terminal
    python scripts/chat_openai_api.py              # interactive; or give one question:
    python scripts/chat_openai_api.py "hello"
"""

from __future__ import annotations

import argparse
import os
import sys

import openai

GREY, RESET = "\033[90m", "\033[0m"


def ask(client: openai.OpenAI, args: argparse.Namespace, messages: list[dict]) -> str:
    """Stream one reply to stdout; returns its answer (reasoning is shown, not kept)."""
    stream = client.chat.completions.create(
        model=args.model,
        messages=messages,
        stream=True,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
    )
    answer, thinking = [], False
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning = getattr(delta, "reasoning_content", None)  # an extension field
        if reasoning:
            thinking = True
            print(f"{GREY}{reasoning}{RESET}" if sys.stdout.isatty() else reasoning, end="")
        if delta.content:
            if thinking:
                print("\n")
                thinking = False
            answer.append(delta.content)
            print(delta.content, end="", flush=True)
    print()
    return "".join(answer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question", nargs="*", help="ask this once and exit (default: interactive)")
    p.add_argument("--base_url", default="http://127.0.0.1:8998/v1")
    p.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--max_tokens", type=int, default=None)
    p.add_argument("--historys", type=int, default=0, help="earlier messages sent back")
    args = p.parse_args(argv)
    try:
        return chat(args)
    except openai.APIConnectionError:
        print(
            f"chat: error: no server answers at {args.base_url}; start one with "
            "`python scripts/serve_openai_api.py` (or `minimind serve`), or pass --base_url",
            file=sys.stderr,
        )
    except openai.APIStatusError as e:
        print(f"chat: error: the server answered {e.status_code}: {e.message}", file=sys.stderr)
    return 1


def chat(args: argparse.Namespace) -> int:
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    args.model = args.model or client.models.list().data[0].id
    if args.question:
        ask(client, args, [{"role": "user", "content": " ".join(args.question)}])
        return 0
    history: list[dict] = []
    while True:
        try:
            question = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not question:
            continue
        kept = history[-args.historys :] if args.historys else []
        answer = ask(client, args, [*kept, {"role": "user", "content": question}])
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


if __name__ == "__main__":
    sys.exit(main())
