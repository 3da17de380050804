"""The web UI page (Streamlit): the sidebar, the chat, the streaming reply.

Streamlit runs this file top to bottom on every click and message; what survives a run is
`st.session_state` (one per browser tab: the transcript and the reply count) and the
`st.cache_resource` objects (one per server process: the loaded model). Everything that
decides something (which models, which messages, what a reply shows) is in web.py; this file
only lays out widgets. Run it with `minimind web` or `streamlit run scripts/web_demo.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

from minimind.serve import web

LOCAL, ENDPOINT = "Local model", "OpenAI-compatible endpoint"


@st.cache_resource(show_spinner=False)
def _args(argv: tuple[str, ...]):
    return web.parse_app_args(argv)


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def _local_source(spec: web.LoadSpec) -> web.LocalSource:
    # Two entries: switching back and forth between two models in the picker stays instant.
    return web.LocalSource(web.load(spec))


@st.cache_data(ttl=30, show_spinner=False)
def _endpoint_models(base_url: str, api_key: str) -> list[str]:
    return web.EndpointSource(base_url, "", api_key or None).models()


def _clamp(value, low, high):
    return min(max(value, low), high)


def _sidebar(args) -> tuple[web.ChatSettings, object | None, str | None]:
    """-> (settings, source or None, why there is none)."""
    defaults = web.defaults_from(args)
    source, problem = None, None
    with st.sidebar:
        st.header("MiniMind")
        mode = st.radio("Talk to", [LOCAL, ENDPOINT], index=1 if args.endpoint else 0)
        if mode == LOCAL:
            dirs = web.model_dirs(args.models_dir)
            models = web.find_models(dirs)
            named = web.preselected_model(args)
            if named is not None and named not in models:
                models.insert(0, named)
            picked = None
            if models:
                index = models.index(named) if named is not None else 0
                picked = st.selectbox("Model", models, index=index, format_func=web.model_label)
            else:
                st.caption("No models in " + ", ".join(map(str, dirs)))
            typed = st.text_input("…or a path", placeholder="a checkpoint folder or .pth file")
            path = Path(typed.strip()).expanduser().resolve() if typed.strip() else picked
            if path is None:
                problem = "Pick a model or type its path."
            else:
                try:
                    source = _local_source(web.load_spec(path, args))
                except Exception as e:  # a bad path or file: say so on the page, keep running
                    problem = f"Could not load {path}: {e}"
        else:
            url = st.text_input("Base URL", args.endpoint or "http://127.0.0.1:8998/v1")
            key = st.text_input("API key", args.api_key or "", type="password")
            model_id = st.text_input("Model id", args.endpoint_model, placeholder="first listed")
            if not model_id:
                try:
                    model_id = _endpoint_models(url, key)[0]
                except Exception as e:
                    problem = f"No model id given, and {url}/models did not list one: {e}"
            if model_id:
                source = web.EndpointSource(url, model_id, key or None)

        st.divider()
        settings = web.ChatSettings(
            history_turns=st.slider(
                "History (messages sent back)", 0, 32, _clamp(defaults.history_turns, 0, 32)
            ),
            temperature=st.slider(
                "Temperature", 0.0, 2.0, _clamp(defaults.temperature, 0.0, 2.0), 0.05
            ),
            top_p=st.slider("Top-p", 0.05, 1.0, _clamp(defaults.top_p, 0.05, 1.0), 0.05),
            max_new_tokens=int(
                st.number_input("Max new tokens", 1, 32768, defaults.max_new_tokens, step=64)
            ),
            thinking=st.selectbox(
                "Thinking", web.THINKING, index=web.THINKING.index(defaults.thinking)
            ),
            system_prompt=st.text_area("System prompt", defaults.system_prompt),
        )
    return settings, source, problem


def _draw_reasoning(reasoning: str, thinking: bool) -> None:
    # Open while the model is still thinking, folded once the answer starts.
    with st.expander("Thinking…" if thinking else "Thinking", expanded=thinking):
        st.markdown(reasoning)


def _draw_message(i: int, message: dict) -> None:
    with st.chat_message(message["role"]):
        if message.get("reasoning"):
            _draw_reasoning(message["reasoning"], False)
        # Keyed containers (CSS class st-key-…) let the browser test find each reply.
        st.container(key=f"content-{i}").markdown(message["content"] or "_(empty reply)_")
        if message.get("stats"):
            st.container(key=f"stats-{i}").caption(message["stats"])


def _stream_reply(i: int, source, transcript, question: str, settings, seed) -> dict | None:
    """Draw the reply as it streams; -> its transcript message, or None after an error."""
    with st.chat_message("assistant"):
        reasoning_slot = st.empty()
        content_slot = st.container(key=f"content-{i}").empty()
        stats_slot = st.container(key=f"stats-{i}").empty()
        reply = None
        try:
            for reply in source.reply(transcript, question, settings, seed):
                if reply.reasoning:
                    with reasoning_slot.container():
                        _draw_reasoning(reply.reasoning, reply.thinking)
                content_slot.markdown(reply.content + ("" if reply.stats else "▌"))
        except Exception as e:  # the model or the server failed: show it, keep the transcript
            st.error(f"{type(e).__name__}: {e} (this exchange is not kept)")
            return None
        if reply is None:  # nothing streamed at all (an empty server response)
            reply = web.Reply(stats="empty response")
        if not reply.content:
            content_slot.markdown("_(empty reply)_")
        stats_slot.caption(reply.stats)
    return reply.as_message()


def page() -> None:
    st.set_page_config(page_title="MiniMind", page_icon="💬")
    try:
        args = _args(tuple(sys.argv[1:]))
    except SystemExit:
        st.error("Bad page flags: see `minimind web --help-page`. " + " ".join(sys.argv[1:]))
        st.stop()
    state = st.session_state
    state.setdefault("transcript", [])
    state.setdefault("replies", 0)

    settings, source, problem = _sidebar(args)
    with st.sidebar:
        left, right = st.columns(2)
        regenerate = left.button("Regenerate", disabled=not state.transcript, width="stretch")
        clear = right.button("Clear", disabled=not state.transcript, width="stretch")

    question = None
    if clear:
        state.transcript = []
    elif regenerate and (taken := web.take_last_question(state.transcript)):
        state.transcript, question = taken

    st.caption(source.describe() if source else "")
    if problem:
        st.warning(problem)
    for i, message in enumerate(state.transcript):
        _draw_message(i, message)

    typed = st.chat_input("Message MiniMind", disabled=source is None)
    question = typed or question
    if question and source is not None:
        i = len(state.transcript)
        _draw_message(i, {"role": "user", "content": question})
        seed = web.session_seed(args.seed, state.replies)
        answer = _stream_reply(i + 1, source, state.transcript, question, settings, seed)
        state.replies += 1
        if answer is not None:
            # Kept only once complete, so a stopped or failed reply leaves no half exchange.
            state.transcript = [*state.transcript, {"role": "user", "content": question}, answer]
            st.rerun()  # redraw so Regenerate/Clear see the new transcript


if __name__ == "__main__":  # `streamlit run` executes this file as __main__ on every rerun
    page()
