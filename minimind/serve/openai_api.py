"""The OpenAI-compatible HTTP API: `create_app(loaded)` and the `minimind serve` command line
(also `python scripts/serve_openai_api.py`, with MiniMind's flags).

Routes: POST /v1/chat/completions, POST /v1/completions (stream and non-stream), GET
/v1/models, GET /health (status plus the batcher's counters: running rows, waiting requests,
cache slots; with a draft, `speculation`: drafted and accepted tokens, acceptance rate, tokens
per target forward). Every error is OpenAI's JSON error shape (errors.py).

Design decisions:
- One model, one continuous batcher (minimind.infer.batcher) in its own thread; every choice
  of every request is a row, so concurrent requests share decoding steps. A long prompt is
  prefilled `prefill_chunk` tokens per step between the running rows' decoding steps (their
  streams keep their pace), the `n` choices of a prompt share one prefill, and a bounded LRU
  prefix cache (`prefix_cache_tokens`) serves prompt prefixes seen before (a shared system
  prompt, the earlier turns of a conversation). The event loop only
  parses, renders templates, detokenizes and writes; it never runs the model.
- Speculative decoding (`--draft PATH|ngram`): the batcher's decoding rounds verify every
  running row's drafts in one target forward per cache group, each row keeping its own accepted
  length (batcher.py); greedy replies are the same tokens as without a draft, sampled ones keep
  the model's distribution. A request with repetition/presence/frequency penalties is served
  plainly, one token per round from the same forward (a penalty changes inside a verified
  block). A draft model with another tokenizer is refused at start, naming both.
- Bounded everywhere: at most `max_rows` rows decode together, at most `max_waiting` wait
  (then 429 with Retry-After), n <= 16, and a prompt plus its max_tokens must fit the context
  (else 400, as OpenAI; max_tokens is never silently clamped; omitted, it is the rest of the
  context).
- No request can stall the others: a body over `max_body_bytes` is refused with 413 from its
  Content-Length, before it is read (or as soon as a chunked body passes the limit); a prompt
  with more characters than the context's tokens can span is refused before it is tokenized;
  parsing, rendering and tokenizing run in a worker thread, off the event loop that feeds the
  streams. One request queues at most `max_request_rows` rows (prompts x n; default
  max_waiting // 8), so no request takes more than a fair share of the waiting queue.
- Message content is text: `<|im_start|>` typed in a message is not a control token
  (minimind.tokenizer.chat.encode_chat). A text completion's prompt is the caller's own
  document, so control tokens written in it do act.
- A failure inside the server reaches the client as a generic 500 (OpenAI's shape); the
  exception goes to the log. A non-ASCII API key is compared as bytes: a wrong one is 401.
- A client that goes away cancels its rows: a stream's generator is cancelled by Starlette
  when the client disconnects, a non-streamed request watches for the disconnect message.
- Stop strings are matched on text, across token boundaries, and not sent; when one appears
  the row is cancelled at once. Reasoning (`<think>...</think>`) is sent as
  `reasoning_content`; with `tools`, `<tool_call>` blocks become `tool_calls` and the finish
  reason "tool_calls" (reply.py).
- A stream sends what it has whenever the decoding thread wakes it: one chunk per step, or one
  chunk for several tokens when the writer fell behind. `stream_interval` (seconds, default 0)
  can space a stream's chunks further (the first text still goes at once): fewer, larger
  chunks for clients that pay per chunk. On the 2 shared cores of bench/serve.py, 20 ms made no
  difference that rose above the run-to-run noise at 16 streams, so it is off by default.
- `usage` counts prompt tokens once per prompt and every token generated (a final stop token
  included); `prompt_tokens_details.cached_tokens` (OpenAI's field) counts the prompt tokens
  read from the batcher's prefix cache instead of prefilled (per prompt, its first choice's:
  the choices of one prompt share its prefill). A stream carries it in a last chunk with empty
  choices when `stream_options.include_usage` is true, as OpenAI does, and not at all
  otherwise.
- With `--api-key`, the /v1 routes need `Authorization: Bearer KEY` (401 otherwise); /health
  stays open for probes. The default bind address is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from minimind.infer.batcher import Batcher
from minimind.infer.chat import prompt_ids, stop_ids
from minimind.infer.load import LoadedModel
from minimind.infer.speculative import DRAFT_DTYPES, load_draft
from minimind.tokenizer.chat import render
from minimind.tokenizer.stream import token_bytes

from . import protocol
from .bridge import Submission
from .errors import INTERNAL_ERROR, APIError, bad_request, error_body
from .reply import Piece, ReplyStream

log = logging.getLogger(__name__)


class _Choice:
    """One choice's pipeline and what it has produced so far."""

    def __init__(self, reply: ReplyStream):
        self.reply = reply
        self.finish_reason: str | None = None
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict] = []

    def take(self, pieces: list[Piece]) -> None:
        for kind, value in pieces:
            if kind == "reasoning":
                self.reasoning.append(value)
            elif kind == "content":
                self.content.append(value)
            else:
                self.tool_calls.append(value)


def _tool_call(call: dict, index: int) -> dict:
    return {
        "index": index,
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": call["name"], "arguments": call["arguments"]},
    }


MAX_BODY_BYTES = 8 << 20  # 8 MiB: far more JSON than any context here holds
# Prompt tokens prefilled per batcher step at most while rows decode (bench/serve.py --mixed: a
# 1,500-token prompt then costs the running streams many short pauses instead of one long one).
# 32 suits small models on CPU, where a 32-token chunk costs about one decoding step of 16 rows;
# smaller chunks delay the long prompt's own first token more (the trade-off, measured at 32, 64
# and 128: bench/RESULTS.md, "Mixed load"). A GPU takes far larger chunks for the same pause.
PREFILL_CHUNK = 32
# Prefix cache bound in tokens: per token 2 x layers x kv_heads x head_dim values (2 KiB for
# the demo model, 24 KiB for minimind2 in fp32: 8192 tokens are 16 and 192 MiB).
PREFIX_CACHE_TOKENS = 8192


class OpenAIServer:
    """The routes' logic over one loaded model and its batcher."""

    def __init__(
        self,
        loaded: LoadedModel,
        batcher: Batcher,
        api_key: str | None = None,
        served_names: Sequence[str] | None = None,
        stream_interval: float = 0.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_request_rows: int | None = None,
    ):
        self.loaded, self.batcher = loaded, batcher
        self.api_key = None if api_key is None else api_key.encode("utf-8")
        self.stream_interval = stream_interval
        self.max_body_bytes = max_body_bytes
        # a fair share of the queue: at least eight requests of the largest size can wait
        self.max_request_rows = max_request_rows or max(1, batcher.max_waiting // 8)
        self.tokenizer = loaded.tokenizer
        self.names = list(served_names or [loaded.name])
        self.stop_ids = stop_ids(loaded.tokenizer, loaded.model)
        self.created = int(time.time())
        # A token spans at most this many characters (bytes bound characters), so a text of
        # more than max_len * this many characters cannot fit: refused without tokenizing it.
        self.max_chars = batcher.max_len * max(map(len, token_bytes(loaded.tokenizer.backend)))

    # --- checks shared by the routes --------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        # Compared as bytes: Starlette decodes headers as latin-1, so any byte gives a str that
        # encodes back to the bytes sent (compare_digest refuses non-ASCII str with TypeError).
        given = key.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, self.api_key):
            raise APIError(
                401,
                "Incorrect API key provided." if header else "Missing API key (Bearer).",
                code="invalid_api_key",
            )

    async def read(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is known to exceed the limit: from
        Content-Length before reading anything, else while it streams in."""
        self.authorize(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size, more=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int, more: bool = False) -> APIError:
        return APIError(
            413,
            f"The request body is {'over ' if more else ''}{size} bytes; this server accepts "
            f"at most {self.max_body_bytes} (--max_body_mb).",
            code="request_too_large",
        )

    def parse(self, raw: bytes, cls: type[protocol.SamplingRequest]):
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request.") from None
        req = protocol.parse(cls, data)
        protocol.check_model(req.model, self.names)
        return req

    def check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise bad_request(
                f"This model's maximum context length is {self.batcher.max_len} tokens, but "
                f"the prompt is {chars} characters, more than that many tokens can hold. "
                "Shorten the prompt.",
                param,
                "context_length_exceeded",
            )

    def check_rows(self, rows: int, prompts: int) -> None:
        if rows > self.max_request_rows:
            raise bad_request(
                f"This request asks for {rows} generations ({prompts} prompt(s) x n); this "
                f"server takes at most {self.max_request_rows} per request (a fair share of "
                "its queue). Split the request.",
                "n" if prompts == 1 else "prompt",
            )

    # --- routes -----------------------------------------------------------------------------
    def health(self) -> dict:
        return {"status": "ok", "model": self.names[0], **self.batcher.stats()}

    def models(self) -> dict:
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "minimind"}
            for name in self.names
        ]
        return {"object": "list", "data": data}

    def chat_prompt(self, raw: bytes) -> tuple[protocol.ChatRequest, list[dict] | None, list[int]]:
        """Body -> (request, tools, prompt ids). CPU work: run in a worker thread."""
        req = self.parse(raw, protocol.ChatRequest)
        tools = req.template_tools()
        messages = [m.for_template() for m in req.messages]
        thinking = req.thinking()
        self.check_rows(req.n, 1)
        self.check_chars(len(render(messages, tools, True, thinking)), "messages")
        return req, tools, prompt_ids(self.tokenizer, messages, tools, thinking)

    def completion_prompts(self, raw: bytes) -> tuple[protocol.CompletionRequest, list[list[int]]]:
        """Body -> (request, prompt ids per prompt). CPU work: run in a worker thread."""
        req = self.parse(raw, protocol.CompletionRequest)
        prompts = req.prompts()
        self.check_rows(len(prompts) * req.n, len(prompts))
        for p in prompts:
            if isinstance(p, str):
                self.check_chars(len(p), "prompt")
        # as pretraining: a document follows an eos
        ids = [(list(p) if isinstance(p, list) else self.tokenizer.encode(p)) for p in prompts]
        return req, [p or [self.tokenizer.eos_id] for p in ids]

    async def chat(self, request: Request):
        raw = await self.read(request)
        # parsing, rendering and tokenizing off the event loop: streams keep flowing meanwhile
        req, tools, ids = await asyncio.to_thread(self.chat_prompt, raw)
        requested, param = req.requested_tokens()
        budget = protocol.token_budget(len(ids), requested, param, self.batcher.max_len)
        configs = protocol.generation_configs(req, budget, self.stop_ids, req.n)
        stops = req.stops()
        choices = [
            _Choice(ReplyStream(self.tokenizer, stops, chat=True, tools=tools is not None))
            for _ in range(req.n)
        ]
        sub = Submission(self.batcher, [ids] * req.n, configs)
        meta = self._meta("chatcmpl", "chat.completion")
        if req.stream:
            return self._stream(sub, choices, len(ids), req.include_usage, meta, True, req.n)
        await self._collect(request, sub, choices)
        return {
            **meta,
            "choices": [
                {"index": i, "message": self._message(c), "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ],
            "usage": self._usage(len(ids), choices, sub.cached(req.n)),
        }

    async def completions(self, request: Request):
        raw = await self.read(request)
        req, encoded = await asyncio.to_thread(self.completion_prompts, raw)
        requested, param = req.requested_tokens()
        prompts, configs = [], []
        for ids in encoded:
            budget = protocol.token_budget(
                len(ids), requested, param, self.batcher.max_len, "prompt"
            )
            prompts += [ids] * req.n
            configs += protocol.generation_configs(req, budget, self.stop_ids, req.n)
        stops = req.stops()
        choices = [_Choice(ReplyStream(self.tokenizer, stops, chat=False)) for _ in prompts]
        sub = Submission(self.batcher, prompts, configs)
        prompt_tokens = sum(len(p) for p in prompts[:: req.n])
        meta = self._meta("cmpl", "text_completion")
        if req.stream:
            return self._stream(sub, choices, prompt_tokens, req.include_usage, meta, False, req.n)
        await self._collect(request, sub, choices)
        return {
            **meta,
            "choices": [
                {
                    "index": i,
                    "text": "".join(c.content),
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": self._usage(prompt_tokens, choices, sub.cached(req.n)),
        }

    # --- generation ---------------------------------------------------------------------------
    def _meta(self, prefix: str, obj: str) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.names[0],
        }

    @staticmethod
    def _advance(sub: Submission, choices: list[_Choice], events) -> dict[int, list[Piece]]:
        """Run events through their choices' pipelines -> new pieces per choice. Sets each
        finished choice's finish_reason; a stop string cancels its row."""
        out: dict[int, list[Piece]] = {}
        for i, token, reason in events:
            choice = choices[i]
            if choice.finish_reason is not None:
                continue  # tokens already in flight when a stop string cancelled the row
            if token is None:
                log.error("generation failed: %r", sub.requests[i].error)
                raise APIError(500, INTERNAL_ERROR, type="server_error", code="internal")
            pieces = choice.reply.feed(token)
            if choice.reply.stopped:
                sub.cancel(i)
                reason = "stop"
            if reason is not None:
                pieces += choice.reply.finish()
                calls = choice.reply.calls
                choice.finish_reason = "tool_calls" if calls and reason == "stop" else reason
            choice.take(pieces)
            out.setdefault(i, []).extend(pieces)
        return out

    async def _collect(self, request: Request, sub: Submission, choices: list[_Choice]) -> None:
        async def run() -> None:
            while any(c.finish_reason is None for c in choices):
                self._advance(sub, choices, await sub.events())

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                raise APIError(499, "client closed the request", code="client_closed")
            work.result()  # re-raises an APIError from the generation
        finally:
            watch.cancel()
            sub.cancel()

    @staticmethod
    def _message(choice: _Choice) -> dict:
        content = "".join(choice.content)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not choice.tool_calls else None,
        }
        if choice.reasoning:
            message["reasoning_content"] = "".join(choice.reasoning)
        if choice.tool_calls:
            message["tool_calls"] = [
                {k: v for k, v in _tool_call(c, i).items() if k != "index"}
                for i, c in enumerate(choice.tool_calls)
            ]
        return message

    @staticmethod
    def _usage(prompt_tokens: int, choices: list[_Choice], cached: int) -> dict:
        completion = sum(c.reply.tokens for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _stream(
        self,
        sub: Submission,
        choices: list[_Choice],
        prompt_tokens: int,
        include_usage: bool,
        meta: dict,
        chat: bool,
        n: int,
    ) -> StreamingResponse:
        meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(i: int, delta: dict | None = None, finish: str | None = None) -> str:
            body = (
                {"index": i, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
                if chat
                else {
                    "index": i,
                    "text": (delta or {}).get("content", ""),
                    "logprobs": None,
                    "finish_reason": finish,
                }
            )
            return (
                f"data: {json.dumps({**meta, 'choices': [body], **extra}, ensure_ascii=False)}\n\n"
            )

        def deltas(i: int, pieces: list[Piece]) -> list[str]:
            """New pieces of choice i -> chunks: one per run of text of one kind, one per call."""
            runs: list[tuple[str, Any]] = []
            for kind, value in pieces:
                if kind != "tool_call" and runs and runs[-1][0] == kind:
                    runs[-1] = (kind, runs[-1][1] + value)
                else:
                    runs.append((kind, value))
            # the calls in `pieces` are already counted in choices[i].tool_calls
            index = len(choices[i].tool_calls) - sum(kind == "tool_call" for kind, _ in runs)
            out = []
            for kind, value in runs:
                if kind == "tool_call":
                    out.append(chunk(i, {"tool_calls": [_tool_call(value, index)]}))
                    index += 1
                else:
                    field = "reasoning_content" if kind == "reasoning" else "content"
                    out.append(chunk(i, {field: value}))
            return out

        async def body() -> AsyncIterator[str]:
            try:
                if chat:
                    for i in range(len(choices)):
                        yield chunk(i, {"role": "assistant", "content": ""})
                loop, last = asyncio.get_running_loop(), -1e9
                while any(c.finish_reason is None for c in choices):
                    wait = last + self.stream_interval - loop.time()
                    if wait > 0:  # tokens accumulate meanwhile and go out in one chunk
                        await asyncio.sleep(wait)
                    try:
                        new = self._advance(sub, choices, await sub.events())
                    except APIError as err:
                        yield f"data: {json.dumps(err.body())}\n\n"
                        return
                    for i, pieces in new.items():
                        for text in deltas(i, pieces):
                            yield text
                        if choices[i].finish_reason is not None:
                            yield chunk(i, None, choices[i].finish_reason)
                    last = loop.time()
                if include_usage:
                    usage = self._usage(prompt_tokens, choices, sub.cached(n))
                    yield f"data: {json.dumps({**meta, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when Starlette cancels us because the client went away
                sub.cancel()

        return StreamingResponse(body(), media_type="text/event-stream")


def create_app(
    loaded: LoadedModel,
    *,
    api_key: str | None = None,
    max_rows: int = 32,
    max_waiting: int = 256,
    max_len: int | None = None,
    served_names: Sequence[str] | None = None,
    stream_interval: float = 0.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_request_rows: int | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
    share_prompts: bool = True,
    draft: Any = None,
    num_draft_tokens: int | None = None,
) -> FastAPI:
    """The FastAPI app serving `loaded`; its batcher thread runs while the app is up
    (`app.state.server.batcher`). prefill_chunk 0: prompts prefilled whole; prefix_cache_tokens
    0: no prefix cache; share_prompts False: each of the n choices prefills the prompt itself;
    draft: "ngram" or a draft model (speculative.load_draft) for speculative decoding, with
    num_draft_tokens per round (None: adapted per row)."""
    batcher = Batcher(
        loaded.model,
        max_rows=max_rows,
        max_waiting=max_waiting,
        max_len=max_len,
        prefill_chunk=prefill_chunk,
        prefix_cache_tokens=prefix_cache_tokens,
        share_prompts=share_prompts,
        draft=draft,
        num_draft_tokens=num_draft_tokens,
    )
    server = OpenAIServer(
        loaded, batcher, api_key, served_names, stream_interval, max_body_bytes, max_request_rows
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="MiniMind OpenAI-compatible API", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        # The exception text stays in the log: it may describe the server, not the request.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(INTERNAL_ERROR, "server_error")
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    return app


# --- the command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from minimind.infer.load import add_model_args

    p = argparse.ArgumentParser(
        prog="minimind serve",
        description="OpenAI-compatible API server with continuous batching",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8998)
    g.add_argument(
        "--api-key",
        "--api_key",
        dest="api_key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1 routes",
    )
    g.add_argument(
        "--max_seq_len",
        type=int,
        default=None,
        help="context cap, prompt + reply (default: the model's)",
    )
    g.add_argument("--max_rows", type=int, default=32, help="rows decoded together at most")
    g.add_argument(
        "--max_waiting", type=int, default=256, help="queued requests at most; beyond, 429"
    )
    g.add_argument(
        "--served_model_name",
        nargs="+",
        default=None,
        help="model ids to answer to (default: the weight's name)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, one per core)",
    )
    g.add_argument(
        "--stream_interval",
        type=float,
        default=0.0,
        help="seconds between a stream's chunks at least (the first goes at once); tokens "
        "decoded meanwhile share a chunk. 0: a chunk whenever tokens are ready",
    )
    g.add_argument(
        "--max_body_mb",
        type=float,
        default=MAX_BODY_BYTES / 2**20,
        help="largest request body in MiB; larger ones get 413 before they are read",
    )
    g.add_argument(
        "--max_request_rows",
        type=int,
        default=None,
        help="generations (prompts x n) one request may queue (default: max_waiting // 8)",
    )
    g.add_argument(
        "--prefill_chunk",
        type=int,
        default=PREFILL_CHUNK,
        help="prompt tokens prefilled per step at most: a longer prompt is prefilled in chunks "
        "between the running streams' decoding steps. 0: every prompt whole, in one step",
    )
    g.add_argument(
        "--prefix_cache_tokens",
        type=int,
        default=PREFIX_CACHE_TOKENS,
        help="tokens of prompt-prefix keys/values kept for reuse across requests (LRU, in "
        "16-token blocks; reported as usage.prompt_tokens_details.cached_tokens). 0: off",
    )
    g.add_argument(
        "--no_prompt_sharing",
        dest="share_prompts",
        action="store_false",
        help="each of a request's n choices prefills the prompt itself (for measuring what "
        "sharing saves: bench/serve.py --mixed)",
    )
    g.add_argument(
        "--draft",
        default=None,
        metavar="PATH|ngram",
        help="speculative decoding: a smaller model with the same tokenizer drafts tokens that "
        "the model verifies several at a time for every running row, or 'ngram' drafts them "
        "from each row's own prompt and reply (prompt lookup); the same replies (greedy: token "
        "for token). Requests with penalties decode plainly. /health reports the acceptance",
    )
    g.add_argument(
        "--draft_dtype",
        default=None,
        choices=DRAFT_DTYPES,
        help="the draft model's weights: int8 (default on a CPU: drafts about twice as fast "
        "as fp32) or a float dtype (default elsewhere: the model's); the same replies",
    )
    g.add_argument(
        "--num_draft_tokens",
        "--draft_k",  # the chat command's name of the same flag
        dest="num_draft_tokens",
        type=int,
        default=None,
        metavar="K",
        help="draft tokens per round (default: adapted per row to its acceptance)",
    )
    g.add_argument("--log_level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from minimind.infer.load import load_from_args

    args = parse_args(argv)
    if args.num_draft_tokens is not None and args.draft is None:
        raise SystemExit("minimind serve: error: --num_draft_tokens needs --draft PATH|ngram")
    if args.draft_dtype is not None and args.draft in (None, "ngram"):
        raise SystemExit("minimind serve: error: --draft_dtype needs --draft PATH (a model)")
    if args.num_draft_tokens is not None and not 1 <= args.num_draft_tokens <= 64:
        raise SystemExit(
            f"minimind serve: error: --num_draft_tokens must be in 1..64, got "
            f"{args.num_draft_tokens}"
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = load_from_args(args)
    draft, draft_text = None, None
    if args.draft is not None:
        try:
            draft, draft_text = load_draft(args.draft, loaded, args.draft_dtype)
        except (FileNotFoundError, ValueError) as e:  # also CheckpointError
            raise SystemExit(f"minimind serve: error: {e}") from None
    app = create_app(
        loaded,
        api_key=args.api_key,
        max_rows=args.max_rows,
        max_waiting=args.max_waiting,
        max_len=args.max_seq_len,
        served_names=args.served_model_name,
        stream_interval=args.stream_interval,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_request_rows=args.max_request_rows,
        prefill_chunk=args.prefill_chunk,
        prefix_cache_tokens=args.prefix_cache_tokens,
        share_prompts=args.share_prompts,
        draft=draft,
        num_draft_tokens=args.num_draft_tokens,
    )
    print(f"serving {loaded.describe()} at http://{args.host}:{args.port}/v1", flush=True)
    if draft_text is not None:
        print(f"speculative decoding, draft: {draft_text}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
