"""The web UI's logic, kept free of Streamlit so it is testable without a browser; and
`minimind web`, which starts Streamlit on the page (web_app.py).

Owns: which models the picker offers (checkpoint folders and MiniMind2 `.pth` files under
out/, `--models_dir` and $MINIMIND_WEB_MODELS), the page's command-line flags, the messages
sent for a turn, regenerate, the two reply sources and what a reply shows while it streams.
Does not own: the page layout and widgets (web_app.py), loading (minimind.infer.load),
prompts and the reasoning split (minimind.infer.chat).

Reply sources: `LocalSource` decodes one loaded model through a ChatSession; `EndpointSource`
streams from any OpenAI-compatible server with the official `openai` client. Both turn their
("reasoning" | "content", text) pieces into one growing `Reply`, so the page draws them the
same way. An endpoint's reasoning arrives as `delta.reasoning_content` (vLLM, DeepSeek,
`minimind serve`) or inline as `<think>...</think>` in the content, which ReplyParser splits.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind import paths

ENV_MODELS = "MINIMIND_WEB_MODELS"  # extra folders to scan, os.pathsep-separated
THINKING = ("model default", "on", "off")  # the thinking switch's choices
APP_FILE = Path(__file__).with_name("web_app.py")


# --- the model picker ------------------------------------------------------------------------


def model_dirs(extra: Sequence[str | os.PathLike] = (), env: Mapping[str, str] | None = None):
    """The folders the picker scans, without repeats: out/, then $MINIMIND_WEB_MODELS, then
    `extra` (--models_dir)."""
    env = os.environ if env is None else env
    found = [paths.out_dir()]
    found += [Path(p) for p in env.get(ENV_MODELS, "").split(os.pathsep) if p]
    found += [Path(p) for p in extra]
    out: list[Path] = []
    for d in found:
        d = d.expanduser().resolve()
        if d not in out:
            out.append(d)
    return out


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def find_models(dirs: Sequence[Path]) -> list[Path]:
    """Every model directly in `dirs` (a folder that is itself a model counts too): folders
    with a config.json (ours or transformers') and `.pth` files, sorted by name per folder.

    Hidden entries are skipped (a checkpoint save stages in `.NAME.tmp-*`); a `NAME.old`
    left by a killed save is offered as NAME, which the loader resolves to it.
    """
    models: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            continue
        if _is_model_folder(d):
            models.append(d)
            continue
        for entry in sorted(d.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.suffix == ".pth":
                models.append(entry)
            elif entry.is_dir() and _is_model_folder(entry):
                if entry.suffix == ".old":
                    base = entry.with_suffix("")
                    if not base.exists():
                        models.append(base)
                else:
                    models.append(entry)
    return list(dict.fromkeys(models))


def model_label(path: Path) -> str:
    """What the picker shows: the name, then the folder it is in.

    >>> model_label(Path("/x/out/full_sft_512.pth"))
    'full_sft_512.pth  (/x/out)'
    """
    return f"{path.name}  ({path.parent})"


# --- the page's flags --------------------------------------------------------------------------


def app_parser() -> argparse.ArgumentParser:
    """The page's flags (after `--` in `streamlit run scripts/web_demo.py -- FLAGS`): the model
    flags of eval_llm.py / serve_openai_api.py, where to look for models, an endpoint, and the
    sidebar's starting values."""
    from minimind.infer.load import add_model_args  # imports torch: only when parsing

    p = argparse.ArgumentParser(
        prog="minimind web",
        description="Chat in the browser with a local model or an OpenAI-compatible endpoint.",
    )
    add_model_args(p)
    g = p.add_argument_group("web UI")
    g.add_argument(
        "--models_dir",
        action="append",
        default=[],
        help=f"another folder of models for the picker (repeatable; also ${ENV_MODELS})",
    )
    g.add_argument("--endpoint", help="start in endpoint mode with this base URL (…/v1)")
    g.add_argument(
        "--api_key", default=None, help="the endpoint's API key (default: $OPENAI_API_KEY)"
    )
    g.add_argument("--endpoint_model", default="", help="the endpoint's model id")
    g.add_argument("--historys", type=int, default=4, help="earlier messages sent back")
    g.add_argument("--temperature", type=float, default=0.85)
    g.add_argument("--top_p", type=float, default=0.85)
    g.add_argument("--max_new_tokens", type=int, default=1024)
    g.add_argument("--thinking", choices=THINKING, default="model default")
    g.add_argument("--system_prompt", default="")
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="reproducible sessions: the n-th reply of a session samples with seed + n",
    )
    return p


def parse_app_args(argv: Sequence[str]) -> argparse.Namespace:
    args = app_parser().parse_args(list(argv))
    if args.historys < 0 or args.max_new_tokens < 1:
        app_parser().error("--historys must be >= 0 and --max_new_tokens >= 1")
    return args


def preselected_model(args: argparse.Namespace) -> Path | None:
    """The model the flags name (`--load_from PATH`, or `--weight` MiniMind's way if that file
    exists), else None: the picker then starts on the first model found."""
    from minimind.infer.load import find_weight

    if args.load_from != "model":
        return Path(args.load_from).expanduser().resolve()
    save_dir = Path(args.save_dir) if args.save_dir else paths.out_dir()
    try:
        return find_weight(args.weight, args.hidden_size, bool(args.use_moe), save_dir).resolve()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class LoadSpec:
    """Everything a load depends on (the cache key of the page's loaded model)."""

    path: str
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str | None = None
    rope_scaling: bool = False
    lora_weight: str = "None"  # only for the model the flags named: an adapter fits one base
    save_dir: str | None = None
    hidden_size: int = 512
    # a .pth does not record its head count: MiniMind's size flags and --preset say it
    preset: str | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None


def load_spec(path: Path, args: argparse.Namespace) -> LoadSpec:
    named = preselected_model(args)
    return LoadSpec(
        path=str(path),
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        rope_scaling=args.inference_rope_scaling,
        lora_weight=args.lora_weight if named == path else "None",
        save_dir=args.save_dir,
        hidden_size=args.hidden_size,
        preset=getattr(args, "preset", None),
        num_attention_heads=getattr(args, "num_attention_heads", None),
        num_key_value_heads=getattr(args, "num_key_value_heads", None),
    )


def load(spec: LoadSpec):
    """spec -> LoadedModel, through the flags loader (so LoRA names resolve as in eval_llm)."""
    from minimind.infer.load import load_from_args

    ns = argparse.Namespace(
        load_from=spec.path,
        weight="",
        use_moe=0,
        **{k: getattr(spec, k) for k in ("tokenizer", "device", "dtype", "lora_weight")},
        save_dir=spec.save_dir,
        hidden_size=spec.hidden_size,
        preset=spec.preset,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        inference_rope_scaling=spec.rope_scaling,
    )
    return load_from_args(ns)


# --- a turn ----------------------------------------------------------------------------------


@dataclass
class ChatSettings:
    """The sidebar: what the next reply is asked with."""

    history_turns: int = 4  # earlier messages sent back (MiniMind's --historys)
    temperature: float = 0.85
    top_p: float = 0.85
    max_new_tokens: int = 1024
    thinking: str = "model default"  # one of THINKING
    system_prompt: str = ""

    @property
    def enable_thinking(self) -> bool | None:
        """The chat template's switch: None leaves the model's default.

        >>> ChatSettings(thinking="off").enable_thinking
        False
        """
        return {"on": True, "off": False}.get(self.thinking)

    def generation_config(self, seed: int | None = None):
        from minimind.infer.generation import GenerationConfig

        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
        )


def session_seed(base: int | None, replies_so_far: int) -> int | None:
    """The seed of a session's next reply: None stays None (fresh randomness), else base + n,
    so a regenerated reply differs from the one it replaces yet a session replays exactly.

    >>> session_seed(None, 3) is None, session_seed(10, 3)
    (True, 13)
    """
    return None if base is None else base + replies_so_far


def defaults_from(args: argparse.Namespace) -> ChatSettings:
    """The sidebar's starting values, from the page's flags."""
    return ChatSettings(
        history_turns=args.historys,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        thinking=args.thinking,
        system_prompt=args.system_prompt,
    )


def plain_history(transcript: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The transcript as chat messages: role and answer only (reasoning is not sent back, as
    reasoning models are trained; neither are the page's stats).

    >>> plain_history([{"role": "user", "content": "hi"},
    ...                {"role": "assistant", "content": "yo", "reasoning": "r", "stats": "s"}])
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]
    """
    return [{"role": m["role"], "content": m["content"]} for m in transcript]


def turn_messages(
    transcript: Sequence[Mapping[str, Any]], user_text: str, settings: ChatSettings
) -> list[dict]:
    """The messages for the next reply: the system prompt, the last `history_turns` messages,
    the new question. (Locally, ChatSession also trims the history to the model's context.)

    >>> t = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    >>> turn_messages(t, "c", ChatSettings(history_turns=0, system_prompt="S"))
    [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'c'}]
    >>> len(turn_messages(t, "c", ChatSettings(history_turns=2)))
    3
    """
    history = plain_history(transcript)
    kept = history[-settings.history_turns :] if settings.history_turns > 0 else []
    system = [{"role": "system", "content": settings.system_prompt}]
    return [
        *(system if settings.system_prompt else []),
        *kept,
        {"role": "user", "content": user_text},
    ]


def take_last_question(transcript: list[dict]) -> tuple[list[dict], str] | None:
    """For "regenerate": the transcript without its last question and the answers after it,
    and that question; None when there is no question yet.

    >>> take_last_question([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    ([], 'q')
    >>> take_last_question([]) is None
    True
    """
    for i in range(len(transcript) - 1, -1, -1):
        if transcript[i]["role"] == "user":
            return transcript[:i], transcript[i]["content"]
    return None


@dataclass
class Reply:
    """An assistant reply as it streams in: what the page shows, and what the transcript keeps.

    >>> r = Reply()
    >>> for piece in [("reasoning", "add"), ("reasoning", " them"), ("content", "4")]:
    ...     r.add(*piece)
    >>> r.as_message()
    {'role': 'assistant', 'content': '4', 'reasoning': 'add them', 'stats': ''}
    """

    reasoning: str = ""
    content: str = ""
    stats: str = ""

    def add(self, kind: str, text: str) -> None:
        if kind == "reasoning":
            self.reasoning += text
        elif kind == "content":
            self.content += text
        else:
            raise ValueError(f"a piece is 'reasoning' or 'content', not {kind!r}")

    @property
    def thinking(self) -> bool:
        """Still inside the reasoning (the page keeps its expander open until the answer)."""
        return bool(self.reasoning) and not self.content

    def as_message(self) -> dict:
        return {
            "role": "assistant",
            "content": self.content,
            "reasoning": self.reasoning,
            "stats": self.stats,
        }


def format_stats(
    seconds: float,
    first_token_seconds: float | None = None,
    tokens: int | None = None,
    finish_reason: str | None = None,
    seed: int | None = None,
) -> str:
    """The line under a reply.

    >>> format_stats(2.0, 0.25, 50, "stop")
    '50 tokens · 25.0 tokens/s · first token 0.25 s · stop'
    >>> format_stats(1.5, finish_reason="length", seed=3)
    '1.50 s · length · seed 3'
    """
    parts = []
    if tokens is not None:
        parts.append(f"{tokens} tokens")
        parts.append(f"{tokens / seconds:.1f} tokens/s" if seconds > 0 else "")
    else:
        parts.append(f"{seconds:.2f} s")
    if first_token_seconds is not None:
        parts.append(f"first token {first_token_seconds:.2f} s")
    if finish_reason:
        parts.append(finish_reason)
    if seed is not None:
        parts.append(f"seed {seed}")
    return " · ".join(p for p in parts if p)


# --- reply sources ---------------------------------------------------------------------------
# Each source's `reply(...)` yields the same Reply object after every piece, then once more
# with its stats filled in; the sources keep no per-reply state, so one cached source serves
# every browser session.


@dataclass
class LocalSource:
    """A loaded model; one reply at a time (concurrent browser sessions queue on the lock, as
    one model on one device gains nothing from interleaving their decodes)."""

    loaded: Any  # minimind.infer.load.LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def describe(self) -> str:
        return self.loaded.describe()

    def reply(
        self,
        transcript: Sequence[Mapping[str, Any]],
        user_text: str,
        settings: ChatSettings,
        seed: int | None = None,
    ) -> Iterator[Reply]:
        from minimind.infer.chat import ChatSession

        session = ChatSession(
            self.loaded.model,
            self.loaded.tokenizer,
            system_prompt=settings.system_prompt or None,
            history_turns=settings.history_turns,
            enable_thinking=settings.enable_thinking,
            history=plain_history(transcript),
        )
        config = settings.generation_config(seed)
        reply = Reply()
        with self.lock:
            for kind, text in session.reply(user_text, config):
                reply.add(kind, text)
                yield reply
        last = session.last
        reply.stats = format_stats(
            last.seconds, last.first_token_seconds, last.completion_tokens, last.finish_reason, seed
        )
        yield reply


@dataclass
class EndpointSource:
    """An OpenAI-compatible server (ours, vLLM, llama.cpp, OpenAI...), via the `openai` client.

    The thinking switch is sent as vLLM's `chat_template_kwargs` only when set, so a server
    that knows no such field (OpenAI's rejects unknown ones) is not sent it by default.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    _client: Any = field(default=None, repr=False, compare=False)

    def client(self):
        if self._client is None:
            import openai

            key = self.api_key or os.environ.get("OPENAI_API_KEY") or "none"  # local servers
            self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout)
        return self._client

    def describe(self) -> str:
        return f"{self.model or '(no model id)'} at {self.base_url}"

    def models(self) -> list[str]:
        """The server's model ids (GET /models)."""
        return [m.id for m in self.client().models.list()]

    def request(self, messages: list[dict], settings: ChatSettings, seed: int | None) -> dict:
        """The keyword arguments of `chat.completions.create` for one streamed reply."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_tokens": settings.max_new_tokens,
            "stream": True,
            # a last chunk with the token counts (OpenAI's field; servers without it send none)
            "stream_options": {"include_usage": True},
        }
        if seed is not None:
            body["seed"] = seed
        if settings.enable_thinking is not None:
            body["extra_body"] = {
                "chat_template_kwargs": {"enable_thinking": settings.enable_thinking}
            }
        return body

    def reply(
        self,
        transcript: Sequence[Mapping[str, Any]],
        user_text: str,
        settings: ChatSettings,
        seed: int | None = None,
    ) -> Iterator[Reply]:
        from minimind.infer.chat import ReplyParser

        body = self.request(turn_messages(transcript, user_text, settings), settings, seed)
        reply = Reply()
        parser = ReplyParser()  # content goes through it: a server may leave <think> inline
        start, first, finish, tokens = time.perf_counter(), None, None, None
        response = self.client().chat.completions.create(**body)
        try:
            for chunk in response:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish = choice.finish_reason or finish
                pieces = []
                reasoning = getattr(choice.delta, "reasoning_content", None)  # not OpenAI's schema
                if reasoning:
                    pieces.append(("reasoning", reasoning))
                if choice.delta.content:
                    pieces += parser.feed(choice.delta.content)
                if pieces and first is None:
                    first = time.perf_counter() - start
                for kind, text in pieces:
                    reply.add(kind, text)
                    yield reply
            for kind, text in parser.finish():
                reply.add(kind, text)
                yield reply
        finally:
            response.close()  # also when the page stops reading: frees the server's slot
        reply.stats = format_stats(time.perf_counter() - start, first, tokens, finish, seed)
        yield reply


# --- `minimind web` -------------------------------------------------------------------------


def streamlit_command(app_argv: Sequence[str], host: str, port: int, browser: bool) -> list[str]:
    """`python -m streamlit run web_app.py` (Streamlit's documented module entry point) with
    the server flags, then the page's own flags after `--`."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_FILE),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "false" if browser else "true",
        "--browser.gatherUsageStats",
        "false",  # no usage reports leave the machine
        "--client.toolbarMode",
        "minimal",  # a chat page for users: no developer menu or "Deploy" button
        "--",
        *app_argv,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """`minimind web [--host H] [--port P] [--browser] [page flags]`: the page's flags are
    checked here, so a typo fails in the terminal rather than in the browser."""
    p = argparse.ArgumentParser(
        prog="minimind web",
        description="Start the web UI (Streamlit). Other flags are the page's: see "
        "`minimind web --help-page`.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: this machine only)"
    )
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--browser", action="store_true", help="open a browser tab")
    p.add_argument("--help-page", action="store_true", help="describe the page's flags")
    args, app_argv = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.help_page:
        app_parser().print_help()
        return 0
    parse_app_args(app_argv)
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("minimind web needs streamlit: pip install 'minimind[web]'", file=sys.stderr)
        return 1
    cmd = streamlit_command(app_argv, args.host, args.port, args.browser)
    print(f"minimind web: http://{args.host}:{args.port}", flush=True)
    if os.name != "posix":
        import subprocess

        return subprocess.call(cmd)
    # Become Streamlit (same pid), so Ctrl-C and a supervisor's signals reach the server.
    os.execv(cmd[0], cmd)
    return 0  # not reached, unless execv is replaced (the tests do)
