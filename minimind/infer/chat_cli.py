"""`minimind chat` and MiniMind's `python eval_llm.py`: chat with a model in the terminal.

Owns the command line (MiniMind's eval_llm flags, plus --enable_thinking, --prompt, --mode,
--seed, --system_prompt), where prompts come from, and how a streamed reply is shown. It does
not own loading (load.py), prompts, history or the reasoning split (chat.py), or decoding
(generation.py: always our own KV cache, whatever file the model came from).

Where prompts come from, first match wins:
- `--prompt TEXT` (repeatable): answer each in order, then exit.
- `--mode 0`, or answering 0 at the start: the built-in prompt set (like MiniMind's mode 0).
- stdin is not a terminal (a pipe or a file): one prompt per line, then exit.
- otherwise the interactive loop: `/clear` forgets the history, `/exit` (or Ctrl-D, or Ctrl-C
  at the prompt) quits, Ctrl-C during a reply stops that reply. Blank lines are skipped.

Output: each prompt is echoed as `💬: TEXT` (except what was typed at the prompt); a reply's
reasoning, when it opens with `<think>`, is shown apart as a `[thinking]` ... `[/thinking]`
block (dimmed on a terminal), then the answer after `🧠: `; with --show_speed 1 a
`[Speed]: X tokens/s (...)` line follows (with --draft, also the drafts' acceptance rate and
tokens per forward of the model: speculative decoding, minimind.infer.speculative). Styles (ANSI codes) only when stdout is a terminal;
piped output is plain text. The model line goes to stderr, so stdout holds the conversation.

MiniMind's semantics kept: `--historys N` is the number of earlier messages in the prompt (an
even number: whole exchanges); a weight named `pretrain...` continues raw text (bos + prompt,
no chat template, no history), since a pretrained model has never seen the template.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from rich.console import Console

from minimind.infer.chat import ChatSession, ReplyStats
from minimind.infer.generation import GenerationConfig
from minimind.infer.load import add_model_args, load_from_args
from minimind.infer.speculative import DRAFT_DTYPES, load_draft

# Like MiniMind's mode 0: everyday questions, Chinese and English, short to answer.
BUILTIN_PROMPTS = (
    "请介绍一下你自己。",
    "为什么天空是蓝色的？",
    "用Python写一个判断素数的函数。",
    "解释一下光合作用的基本过程。",
    "推荐几道适合初学者做的家常菜。",
    "What is machine learning? Answer in two sentences.",
    "Give three tips for learning a new language.",
    "What is 12 + 35?",
)

USER, ANSWER = "💬: ", "🧠: "
THINK_OPEN, THINK_CLOSE = "[thinking]\n", "\n[/thinking]\n"
COMMANDS_HELP = "/clear forgets the history; /exit, Ctrl-D or Ctrl-C quits"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimind chat",
        description="Chat with a model (also `python eval_llm.py`, MiniMind's flags): our "
        "checkpoints, MiniMind2 .pth files and transformers folders.",
    )
    add_model_args(parser)
    g = parser.add_argument_group("generation")
    g.add_argument(
        "--max_new_tokens",
        type=int,
        default=8192,
        help="longest reply (clamped to what the model's context leaves after the prompt)",
    )
    g.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling threshold")
    g.add_argument("--seed", type=int, default=None, help="every reply samples with this seed")
    g.add_argument(
        "--draft",
        default=None,
        metavar="PATH|ngram",
        help="speculative decoding: a smaller model with the same tokenizer (any model file "
        "the loader reads) drafts tokens that the model verifies several at a time, or "
        "'ngram' drafts them from the conversation itself (prompt lookup); same output",
    )
    g.add_argument(
        "--draft_dtype",
        default=None,
        choices=DRAFT_DTYPES,
        help="the draft model's weights: int8 (default on a CPU: drafts about twice as fast "
        "as fp32) or a float dtype (default elsewhere: the model's); same output either way",
    )
    g.add_argument(
        "--draft_k",
        "--num_draft_tokens",  # the server's name of the same flag
        dest="draft_k",
        type=int,
        default=None,
        metavar="K",
        help="draft tokens per verification (default: adapted to the acceptance rate)",
    )
    g = parser.add_argument_group("conversation")
    g.add_argument(
        "--historys",
        type=int,
        default=0,
        help="earlier messages kept in the prompt (even: whole exchanges; 0 = none)",
    )
    g.add_argument("--system_prompt", default=None, help="default: the template's")
    g.add_argument(
        "--enable_thinking",
        "--open_thinking",
        type=int,
        choices=[0, 1],
        default=None,
        help="0 closes an empty think block in the prompt; default: the template's (allowed)",
    )
    g.add_argument("--show_speed", type=int, choices=[0, 1], default=1, help="print tokens/s")
    g.add_argument(
        "--mode",
        type=int,
        choices=[0, 1],
        default=None,
        help="0: the built-in prompts; 1: manual input (default: asked on a terminal)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="answer TEXT and exit (repeatable: one conversation)",
    )
    return parser


# --- showing a reply -------------------------------------------------------------------------


class Screen:
    """Where the conversation is written: plain text, or rich styles on a terminal."""

    def __init__(self, out: TextIO, styled: bool):
        self.out = out
        self.console = None
        if styled:
            self.console = Console(
                file=out, force_terminal=True, highlight=False, emoji=False, soft_wrap=True
            )

    def write(self, text: str, style: str | None = None) -> None:
        if self.console is None:
            self.out.write(text)
            self.out.flush()  # stream: each piece as it is decoded, also into a pipe
        else:
            self.console.print(text, style=style, end="", markup=False)


def show_reply(pieces: Iterable[tuple[str, str]], screen: Screen) -> None:
    """Write streamed ("reasoning" | "content", text) pieces: the reasoning (if any) as a
    delimited, dimmed block, then the answer after the answer prefix, then a newline.

    >>> import io
    >>> out = io.StringIO()
    >>> show_reply([("reasoning", "Add."), ("content", "4")], Screen(out, styled=False))
    >>> print(out.getvalue(), end="")
    [thinking]
    Add.
    [/thinking]
    🧠: 4
    """
    state = "start"  # -> reasoning -> content
    try:
        for kind, text in pieces:
            if kind == "reasoning":
                if state == "start":
                    screen.write(THINK_OPEN, "dim")
                    state = "reasoning"
                screen.write(text, "dim italic")
                continue
            if state == "reasoning":
                screen.write(THINK_CLOSE, "dim")
            if state != "content":
                screen.write(ANSWER, "bold")
                state = "content"
            screen.write(text)
    finally:  # also when a Ctrl-C stops the reply: close what was opened
        if state == "reasoning":
            screen.write(THINK_CLOSE, "dim")
        if state != "content":
            screen.write(ANSWER, "bold")  # an empty answer still says so
        screen.write("\n")


def speed_line(stats: ReplyStats) -> str:
    """MiniMind's `[Speed]` line, with the counts behind it (and, with --draft, the drafts'
    acceptance rate and the tokens gained per forward of the model)."""
    line = (
        f"[Speed]: {stats.tokens_per_second:.2f} tokens/s ({stats.completion_tokens} tokens "
        f"in {stats.seconds:.2f} s; prompt {stats.prompt_tokens} tokens)"
    )
    if stats.speculation is not None:
        line += f" [Draft]: {stats.speculation.summary()}"
    return line + "\n"


# --- sessions --------------------------------------------------------------------------------


class TextSession(ChatSession):
    """MiniMind's pretrain mode: the prompt is bos + the text, with no template and no
    history (a pretrained model continues text; it has never seen the chat template)."""

    def messages_for(self, user_text: str, max_new_tokens: int) -> tuple[list[dict], list[int]]:
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(user_text)]
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:
            raise ValueError(f"the text is {len(ids)} tokens; the model's context is {context}")
        return [], ids


def reply_budget(session: ChatSession, user_text: str, max_new_tokens: int) -> int:
    """max_new_tokens clamped to what the context leaves after the prompt.

    MiniMind's default (8192) is larger than many contexts, and the session drops history
    until the prompt leaves `max_new_tokens` of room: asked for that much, it would drop all
    history. So history is kept while it leaves min(max_new_tokens, context // 2) tokens, and
    the reply may then use the whole rest of the context (which keeps that same history).
    """
    context = session.model.config.max_position_embeddings
    _, ids = session.messages_for(user_text, min(max_new_tokens, context // 2))
    return min(max_new_tokens, context - len(ids))


@dataclasses.dataclass
class Chat:
    """One conversation on screen: answers prompts through a session and shows them."""

    session: ChatSession
    screen: Screen
    config: GenerationConfig
    show_speed: bool
    failed: int = 0

    def answer(self, text: str, echo: bool) -> None:
        if echo:
            self.screen.write(f"{USER}{text}\n", "bold")
        try:
            budget = reply_budget(self.session, text, self.config.max_new_tokens)
        except ValueError as e:  # too long for the context: say so, go on with the next
            self.failed += 1
            print(f"chat: error: {e}", file=sys.stderr)
            return
        config = dataclasses.replace(self.config, max_new_tokens=budget)
        show_reply(self.session.reply(text, config), self.screen)
        if self.show_speed and self.session.last is not None:
            self.screen.write(speed_line(self.session.last), "dim")
        self.screen.write("\n")

    def command(self, line: str) -> bool | None:
        """Run `/clear` or `/exit` -> True (handled), False (exit); None: not a command."""
        word = line.strip().lower()
        if word == "/clear":
            self.session.clear()
            self.screen.write("(history cleared)\n\n", "dim")
            return True
        if word in ("/exit", "/quit"):
            return False
        return None


def _session(args: argparse.Namespace, loaded) -> ChatSession:
    name = args.weight if args.load_from == "model" else loaded.name
    if "pretrain" in name:
        return TextSession(loaded.model, loaded.tokenizer)
    thinking = None if args.enable_thinking is None else bool(args.enable_thinking)
    return ChatSession(
        loaded.model,
        loaded.tokenizer,
        system_prompt=args.system_prompt,
        history_turns=args.historys,
        enable_thinking=thinking,
    )


def _ask_mode() -> int | None:
    """MiniMind's start question, on a terminal; None at EOF / Ctrl-C."""
    while True:
        try:
            answer = input("[0] built-in prompts (自动测试)\n[1] manual input (手动输入)\n").strip()
        except (EOFError, KeyboardInterrupt):
            return None
        if answer in ("0", "1"):
            return int(answer)


def _typed_lines() -> Iterator[str]:
    """What the user types at the prompt, until EOF or Ctrl-C."""
    with contextlib.suppress(ImportError):  # line editing and history for input()
        import readline  # noqa: F401
    while True:
        try:
            yield input(USER)
        except (EOFError, KeyboardInterrupt):
            print()
            return


def _interactive(chat: Chat) -> int:
    print(f"chat: {COMMANDS_HELP}", file=sys.stderr)
    for line in _typed_lines():
        handled = chat.command(line)
        if handled is False:
            break
        if handled or not line.strip():
            continue
        try:
            chat.answer(line.strip(), echo=False)
        except KeyboardInterrupt:  # stop this reply (it stays out of the history), go on
            chat.screen.write("[interrupted]\n\n", "dim")
    return 0


def _batch(chat: Chat, prompts: Iterable[str], commands: bool) -> int:
    """Answer every prompt in order (commands: also obey /clear and /exit lines)."""
    try:
        for line in prompts:
            if commands:
                handled = chat.command(line)
                if handled is False:
                    break
                if handled or not line.strip():
                    continue
            chat.answer(line.strip() if commands else line, echo=True)
    except KeyboardInterrupt:
        print("chat: interrupted", file=sys.stderr)
        return 130
    return 1 if chat.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.historys < 0 or args.historys % 2:
        parser.error(
            f"--historys must be an even number >= 0 (whole exchanges), got {args.historys}"
        )
    if args.draft_k is not None and args.draft is None:
        parser.error("--draft_k needs --draft PATH|ngram")
    if args.draft_dtype is not None and args.draft in (None, "ngram"):
        parser.error("--draft_dtype needs --draft PATH (a draft model)")
    try:  # checked before the (slow) load
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            draft="ngram" if args.draft == "ngram" else None,
            num_draft_tokens=args.draft_k,
        )
    except ValueError as e:
        parser.error(str(e).replace("num_draft_tokens", "--draft_k"))
    try:
        loaded = load_from_args(args)
        if args.draft is not None:
            draft, draft_text = load_draft(args.draft, loaded, args.draft_dtype)
            config = dataclasses.replace(config, draft=draft)
    except (FileNotFoundError, ValueError) as e:  # also CheckpointError, ConversionError
        print(f"chat: error: {e}", file=sys.stderr)
        return 1
    print(f"chat: {loaded.describe()}", file=sys.stderr)
    if args.draft is not None:
        print(f"chat: speculative decoding, draft: {draft_text}", file=sys.stderr)
    screen = Screen(sys.stdout, styled=sys.stdout.isatty())
    chat = Chat(_session(args, loaded), screen, config, bool(args.show_speed))

    if args.prompt:
        return _batch(chat, args.prompt, commands=False)
    interactive = sys.stdin is not None and sys.stdin.isatty()  # None: started without stdin
    mode = args.mode
    if mode is None:
        mode = _ask_mode() if interactive else 1
        if mode is None:
            return 0
    if mode == 0:
        return _batch(chat, BUILTIN_PROMPTS, commands=False)
    if interactive:
        return _interactive(chat)
    return _batch(chat, (line.rstrip("\n") for line in sys.stdin or ()), commands=True)


if __name__ == "__main__":
    sys.exit(main())
