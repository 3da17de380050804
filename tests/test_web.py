"""minimind.serve.web (the web UI): the model picker, the page's flags, the messages of a turn,
regenerate, the two reply sources (a tiny model trained to answer "hello" with reasoning, both
loaded locally and served by the real `minimind serve` app), the `minimind web` launcher; the
page run headless by Streamlit's AppTest; and the page in Debian's chromium via playwright."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from minimind.infer import generate
from minimind.infer.chat import prompt_ids, split_reasoning, stop_ids
from minimind.infer.load import load_model
from minimind.serve import web
from minimind.serve.openai_api import create_app
from tests.serve_fixtures import ANSWER, KEY, REASONING, Server, train_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = Path(__file__).parent / "artifacts" / "web_demo.png"


# --- the model picker ------------------------------------------------------------------------


def test_find_models(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path / "home"))
    out = tmp_path / "home" / "out"
    for folder in ("full_sft_512", "zeta-hf", ".full_sft_512.tmp-ab12", "crashed.old", "x.old"):
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text("{}")
    (out / "x").mkdir()  # x exists, so its x.old is a leftover the loader would not read
    (out / "tokenizer").mkdir()  # no config.json: not a model
    (out / "pretrain_512.pth").write_bytes(b"")
    (out / "notes.txt").write_text("")
    single = tmp_path / "elsewhere" / "one_model"
    single.mkdir(parents=True)
    (single / "config.json").write_text("{}")

    dirs = web.model_dirs([single, out], env={web.ENV_MODELS: f"{tmp_path / 'none'}{os.pathsep}"})
    assert dirs == [out.resolve(), (tmp_path / "none").resolve(), single.resolve()]
    found = web.find_models(dirs)
    assert found == [
        out / "crashed",
        out / "full_sft_512",
        out / "pretrain_512.pth",
        out / "zeta-hf",
        single,
    ]
    assert web.model_label(found[2]) == f"pretrain_512.pth  ({out})"


def _args(*argv: str) -> argparse.Namespace:
    return web.parse_app_args(argv)


def test_flags_and_preselection(tmp_path):
    args = _args("--save_dir", str(tmp_path), "--weight", "full_sft", "--hidden_size", "64")
    assert web.preselected_model(args) is None  # nothing of that name: the picker's first
    (tmp_path / "full_sft_64.pth").write_bytes(b"")
    assert web.preselected_model(args) == (tmp_path / "full_sft_64.pth").resolve()
    args = _args("--load_from", str(tmp_path / "m"), "--lora_weight", "lora_identity")
    named = web.preselected_model(args)
    assert named == (tmp_path / "m").resolve()
    assert web.load_spec(named, args).lora_weight == "lora_identity"
    assert web.load_spec(tmp_path / "other", args).lora_weight == "None"  # fits one base only
    settings = web.defaults_from(
        _args("--historys", "2", "--temperature", "0.3", "--thinking", "off")
    )
    assert (settings.history_turns, settings.temperature, settings.enable_thinking) == (
        2,
        0.3,
        False,
    )
    for bad in (["--historys", "-1"], ["--max_new_tokens", "0"], ["--thinking", "maybe"]):
        with pytest.raises(SystemExit):
            web.parse_app_args(bad)


# --- a turn ----------------------------------------------------------------------------------


def _exchange(q: str, a: str, reasoning: str = "") -> list[dict]:
    return [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a, "reasoning": reasoning, "stats": "1 tokens"},
    ]


def test_turn_messages_and_regenerate():
    transcript = _exchange("q1", "a1", "r1") + _exchange("q2", "a2")
    settings = web.ChatSettings(history_turns=2, system_prompt="Be brief.")
    assert web.turn_messages(transcript, "q3", settings) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
    ]
    every = web.turn_messages(transcript, "q3", web.ChatSettings(history_turns=99))
    assert [m["content"] for m in every] == ["q1", "a1", "q2", "a2", "q3"]  # no reasoning sent
    rest, question = web.take_last_question(transcript)
    assert question == "q2" and rest == transcript[:2]
    rest, question = web.take_last_question(rest)
    assert question == "q1" and rest == []
    assert web.take_last_question([{"role": "assistant", "content": "hello"}]) is None


def test_reply_state():
    reply = web.Reply()
    assert not reply.thinking
    reply.add("reasoning", "2+2")
    assert reply.thinking  # the expander stays open until the answer starts
    reply.add("content", "4")
    assert not reply.thinking and (reply.reasoning, reply.content) == ("2+2", "4")
    with pytest.raises(ValueError, match="tool"):
        reply.add("tool", "x")
    cfg = web.ChatSettings(temperature=0.0, top_p=0.5, max_new_tokens=7).generation_config(3)
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed) == (0.0, 0.5, 7, 3)
    assert [web.ChatSettings(thinking=t).enable_thinking for t in web.THINKING] == [
        None,
        True,
        False,
    ]
    assert web.session_seed(5, 0) == 5 and web.session_seed(5, 1) == 6


# --- the local source ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> Path:
    """test_serve's tiny model, trained in seconds to answer "hello" greedily with
    REASONING (in <think>) then ANSWER: the page's replies are then known exactly."""
    return train_checkpoint(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def local(trained) -> web.LocalSource:
    spec = web.load_spec(trained, _args("--load_from", str(trained), "--device", "cpu"))
    return web.LocalSource(web.load(spec))


def test_local_source_reasoning_then_answer(local):
    updates = [
        (r.reasoning, r.content, r.stats)
        for r in local.reply([], "hello", web.ChatSettings(temperature=0.0), seed=2)
    ]
    assert updates[-1][:2] == (REASONING, ANSWER)
    assert any(c == "" and r for r, c, _ in updates)  # reasoning is drawn before the answer
    assert all(not s for *_, s in updates[:-1]) and updates[-1][2].endswith(" · stop · seed 2")


def test_local_source_is_the_model_with_the_turns_prompt(local):
    model, tok = local.loaded.model, local.loaded.tokenizer
    transcript = _exchange("hello", "hi there", "greet")
    settings = web.ChatSettings(
        history_turns=2, temperature=0.9, top_p=0.9, max_new_tokens=10, thinking="off"
    )
    settings.system_prompt = "You are tiny."
    replies = list(local.reply(transcript, "what now?", settings, seed=11))
    final = replies[-1]
    assert all(r is final for r in replies)  # one Reply, updated in place, drawn each time

    ids = prompt_ids(tok, web.turn_messages(transcript, "what now?", settings), None, False)
    cfg = settings.generation_config(11)
    expected = generate(model, [ids], cfg, stop_token_ids=stop_ids(tok, model))[0]
    reasoning, content = split_reasoning(tok.decode(expected, skip_special_tokens=True))
    assert (final.content, final.reasoning) == (content, reasoning or "")
    assert final.stats.startswith(f"{len(expected)} tokens · ")
    assert final.stats.endswith("seed 11")
    assert not local.lock.locked()


def test_local_source_releases_its_lock_when_the_page_stops_reading(local):
    it = local.reply([], "hello", web.ChatSettings(max_new_tokens=20, temperature=1.0), 0)
    next(it)
    assert local.lock.locked()
    it.close()  # what happens when a Streamlit rerun interrupts the page mid-reply
    assert not local.lock.locked()


# --- the endpoint source: the request, a stub client, then the real `minimind serve` ----------


def test_endpoint_request():
    source = web.EndpointSource("http://127.0.0.1:1/v1", "tiny")
    transcript = _exchange("hi", "hello", "r")
    settings = web.ChatSettings(history_turns=2, temperature=0.3, top_p=0.8, max_new_tokens=9)
    body = source.request(web.turn_messages(transcript, "2+2?", settings), settings, 4)
    assert body == {
        "model": "tiny",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"},
        ],
        "temperature": 0.3,
        "top_p": 0.8,
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 4,
    }  # no chat_template_kwargs unless the switch is set: OpenAI's API rejects unknown fields
    settings.thinking = "off"
    body = source.request([], settings, None)
    assert "seed" not in body
    assert body["extra_body"] == {"chat_template_kwargs": {"enable_thinking": False}}


class _StubStream(list):
    closed = False

    def close(self):
        self.closed = True


def _stub_client(deltas: list[dict]):
    """An object shaped like openai.OpenAI whose chat.completions.create streams `deltas`."""
    from openai.types.chat import ChatCompletionChunk

    chunks = _StubStream(
        ChatCompletionChunk.model_validate(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": d, "finish_reason": d.pop("finish", None)}],
            }
        )
        for d in deltas
    )
    create = lambda **body: chunks  # noqa: E731
    return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create))), chunks


def test_endpoint_inline_think_tags():
    # A server that leaves <think> in the content (llama.cpp without a reasoning parser).
    parts = ["<thi", "nk>\nhm", "m\n</th", "ink>\n\nYes", ""]
    client, stream = _stub_client([{"content": c} for c in parts[:-1]] + [{"finish": "stop"}])
    source = web.EndpointSource("http://unused/v1", "m", _client=client)
    updates = [(r.reasoning, r.content) for r in source.reply([], "ok?", web.ChatSettings())]
    assert updates[-1] == ("hmm", "Yes")
    assert ("hmm", "") in updates  # shown as reasoning before the answer began
    assert stream.closed


def test_endpoint_stream_closed_when_the_page_stops_reading():
    client, stream = _stub_client([{"content": "a"}, {"content": "b c"}, {"content": " d"}])
    source = web.EndpointSource("http://unused/v1", "m", _client=client)
    it = source.reply([], "q", web.ChatSettings())
    next(it)
    assert not stream.closed
    it.close()  # a Streamlit rerun mid-reply: the HTTP stream is released at once
    assert stream.closed


@pytest.fixture(scope="module")
def served(trained):
    """`minimind serve`'s app (the real OpenAI-compatible server) in uvicorn on a free port."""
    loaded = load_model(trained, device="cpu")
    server = Server(create_app(loaded, api_key=KEY))
    yield server.url + "/v1", loaded.name
    server.stop()


def test_endpoint_against_minimind_serve(served):
    import openai

    url, name = served
    source = web.EndpointSource(url, "", api_key=KEY)
    assert source.models() == [name]
    source.model = name
    settings = web.ChatSettings(temperature=0.0, thinking="on")  # chat_template_kwargs accepted
    updates = [(r.reasoning, r.content, r.stats) for r in source.reply([], "hello", settings, 4)]
    reasoning, content, stats = updates[-1]
    assert (reasoning, content) == (REASONING, ANSWER)  # from delta.reasoning_content
    assert any(c == "" and r for r, c, _ in updates)
    assert stats.split(" tokens · ")[0].isdigit() and stats.endswith(" · stop · seed 4")

    with pytest.raises(openai.AuthenticationError):
        list(web.EndpointSource(url, name, api_key="wrong").reply([], "hello", settings))
    with pytest.raises(openai.NotFoundError):
        list(web.EndpointSource(url, "no-such-model", api_key=KEY).reply([], "hello", settings))


def test_page_with_minimind_serve(served, monkeypatch):
    """The page's own flow, run by Streamlit's headless AppTest (no browser) in endpoint mode:
    a reply with its reasoning folded in an expander, regenerate, a server error, clear."""
    from streamlit.testing.v1 import AppTest

    url, name = served
    argv = ["web_demo.py", "--endpoint", url, "--api_key", KEY, "--temperature", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--seed", "7"])  # as `streamlit run F -- FLAGS`
    at = AppTest.from_file(str(web.APP_FILE), default_timeout=30).run()
    assert not at.exception and at.sidebar.radio[0].value == "OpenAI-compatible endpoint"
    assert at.caption[0].value == f"{name} at {url}"  # the model id: the first one listed

    at.chat_input[0].set_value("hello").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    (thinking,) = at.expander
    assert thinking.label == "Thinking" and thinking.markdown[0].value == REASONING
    assert at.chat_message[1].markdown[-1].value == ANSWER
    assert at.chat_message[1].caption[0].value.endswith(" · stop · seed 7")

    regenerate, clear = at.sidebar.button
    assert (regenerate.label, clear.label) == ("Regenerate", "Clear")
    regenerate.click().run()
    assert len(at.chat_message) == 2  # replaced, not appended
    assert at.chat_message[1].markdown[-1].value == ANSWER  # greedy: the same answer
    assert at.chat_message[1].caption[0].value.endswith(" · seed 8")

    at.sidebar.text_input[2].set_value("no-such-model").run()  # the model id field
    at.chat_input[0].set_value("again").run()
    assert "NotFoundError" in at.error[0].value and "not kept" in at.error[0].value
    at.run()  # the next interaction: the failed exchange left no trace
    assert len(at.chat_message) == 2 and not at.error

    at.sidebar.button[1].click().run()
    assert len(at.chat_message) == 0


# --- `minimind web` ---------------------------------------------------------------------------


def test_launcher_checks_flags_then_becomes_streamlit(monkeypatch, capsys):
    from minimind.cli import resolve

    assert resolve(["web"])[0] is web.main
    with pytest.raises(SystemExit):  # a typo fails here, not later in the browser
        web.main(["--temperature", "warm"])
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, cmd: calls.append(cmd))
    web.main(["--port", "9999", "--seed", "1", "--load_from", "out/x"])
    (cmd,) = calls
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(web.APP_FILE)]
    flags = dict(zip(cmd[5:-5:2], cmd[6:-5:2]))
    assert flags["--server.address"] == "127.0.0.1"  # this machine only, unless --host
    assert flags["--server.port"] == "9999" and flags["--server.headless"] == "true"
    assert cmd[-5:] == ["--", "--seed", "1", "--load_from", "out/x"]
    assert "http://127.0.0.1:9999" in capsys.readouterr().out
    assert web.APP_FILE.is_file()


# --- the page in a browser ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, seconds: float = 40) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"minimind web exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"minimind web did not come up in {seconds} s:\n{log.read_text()}")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_page_in_chromium(trained, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(
            "no /usr/bin/chromium: `make test` installs Debian's chromium when run as root with "
            "apt-get (or: apt-get install chromium)"
        )
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    pytest.importorskip("streamlit")
    port, log = _free_port(), tmp_path / "web.log"
    env = {**os.environ, "MINIMIND_HOME": str(tmp_path / "home")}  # scan no real out/
    argv = ["--port", str(port), "--load_from", str(trained), "--device", "cpu"]
    argv += ["--seed", "0", "--temperature", "0", "--historys", "2"]
    with open(log, "w") as log_file:
        # `minimind web` execs Streamlit, so this pid is the server; its own group, for cleanup.
        proc = subprocess.Popen(
            [sys.executable, "-m", "minimind.cli", "web", *argv],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh profile every run
                executable_path=str(CHROMIUM),
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
                viewport={"width": 1200, "height": 1000},
            )
            try:
                _drive(browser.new_page(), url, tmp_path)
            finally:
                browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def unfold(thinking) -> None:
    """Click the folded reasoning open until it shows: a click that lands while Streamlit is
    still rerunning the page after a reply is lost with the old expander (seen once in CI)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    reasoning = thinking.get_by_text(REASONING)
    for _ in range(5):
        if reasoning.is_visible():
            return
        thinking.get_by_text("Thinking").click()
        try:
            reasoning.wait_for(state="visible", timeout=3_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError("the reasoning expander never unfolded")


def _drive(page, url: str, tmp_path: Path) -> None:
    page.goto(url)
    page.get_by_text(re.compile(r"^model \(minimind, [0-9.]+M parameters")).wait_for(timeout=40_000)
    box = page.locator('[data-testid="stChatInput"] textarea')
    box.fill("hello")
    box.press("Enter")
    stats = page.locator(".st-key-stats-1")
    stats.get_by_text("seed 0").wait_for(timeout=30_000)  # the reply has finished
    assert page.locator(".st-key-content-0").inner_text().strip() == "hello"
    assert page.locator(".st-key-content-1").inner_text().strip() == ANSWER
    assert " tokens · " in stats.inner_text()
    thinking = page.locator('[data-testid="stExpander"]')
    assert not thinking.get_by_text(REASONING).is_visible()  # folded once the answer came
    unfold(thinking)

    page.get_by_role("button", name="Regenerate").click()
    stats.get_by_text("seed 1").wait_for(timeout=30_000)  # the next seed: a new reply
    assert page.locator('[data-testid="stChatMessage"]').count() == 2  # replaced, not added
    assert page.locator(".st-key-content-1").inner_text().strip() == ANSWER  # greedy
    unfold(thinking)  # for the screenshot

    shot = tmp_path / "web_demo.png"
    page.screenshot(path=str(shot), full_page=True, animations="disabled")
    ARTIFACT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
    assert shot.stat().st_size > 10_000

    page.get_by_role("button", name="Clear").click()
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=\"stChatMessage\"]').length === 0",
        timeout=15_000,
    )
