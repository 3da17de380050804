"""The API's request bodies: parsing, validation, and their translation into generation settings.

Owns the OpenAI request schema as we accept it (pydantic models in strict mode: a string where
a number belongs is an error, not a coercion) and every check a request must pass before it
reaches the batcher: field types and ranges, unsupported options, the model name, and the
token budget against the context. Each failure is an `APIError` with status 400 (404 for an
unknown model) naming the offending parameter. Unknown fields are ignored, as OpenAI-compatible
servers do, so clients that send newer fields keep working. Options that would change the
answer's meaning but cannot be honoured are refused, never silently ignored: `logprobs`,
`echo`, `suffix`, a `response_format` other than text (no constrained decoding here), and a
`tool_choice` that forces a call ("required" or a named function). `tool_choice="none"` leaves
the tools out of the prompt; "auto" lists them. OpenAI's rules between fields hold: a `tool`
message needs its `tool_call_id`; `stream_options` needs `stream`. A text completion's
`prompt` is a string, a list of strings, a list of token ids or a list of such lists.

Extensions beyond OpenAI's fields, with vLLM's names: `top_k`, `repetition_penalty`,
`min_tokens`, `ignore_eos` (the benchmark uses it to force a fixed length), and for chat
`enable_thinking` (also accepted as `chat_template_kwargs.enable_thinking`).

Token budget: a prompt that fills the context is refused (400, code context_length_exceeded);
so is a `max_tokens` that does not fit beside the prompt (OpenAI's behaviour: no silent
clamping). Without `max_tokens`, a reply may use the rest of the context.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minimind.infer.generation import GenerationConfig

from .errors import APIError, bad_request

MAX_N = 16  # choices per request: each is a batch row
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; more costs nothing here)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def for_template(self) -> dict:
        """The message as the chat template reads it ("developer" is OpenAI's new "system")."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        return out


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False


Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]


class SamplingRequest(_Strict):
    """The fields chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    # vLLM's extensions
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    def requested_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"at most {MAX_STOP} stop strings are allowed", "stop")
        if any(s == "" for s in stops):
            raise bad_request("stop strings must not be empty", "stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """OpenAI's rules between fields (APIError 400)."""
        if self.stream_options is not None and not self.stream:
            raise bad_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def check(self) -> None:
        super().check()
        for i, m in enumerate(self.messages):
            if m.role == "tool" and not m.tool_call_id:
                raise bad_request(
                    f"messages.{i}: a message with role 'tool' must have a 'tool_call_id' (the "
                    "id of the call it answers).",
                    f"messages.{i}.tool_call_id",
                )
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            # Refused rather than ignored: a client asking for JSON must not get free text.
            raise bad_request(
                f"response_format {kind!r} is not supported: this server does not constrain "
                "decoding to JSON. Omit response_format (or use {'type': 'text'}) and ask for "
                "JSON in the prompt.",
                "response_format",
            )
        if self.tool_choice == "required" or isinstance(self.tool_choice, dict):
            raise bad_request(
                f"tool_choice {self.tool_choice!r} is not supported: this server cannot force "
                "the model to call a tool. Use 'auto' (the model decides) or 'none'.",
                "tool_choice",
            )

    def template_tools(self) -> list[dict] | None:
        """The tools to list in the prompt and parse calls for (none when tool_choice="none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def thinking(self) -> bool | None:
        value = (self.chat_template_kwargs or {}).get("enable_thinking", self.enable_thinking)
        if value is not None and not isinstance(value, bool):
            raise bad_request("enable_thinking must be a boolean", "enable_thinking")
        return value


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids (OpenAI accepts a string, a list of
        strings, a list of token ids, or a list of such lists)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [self.prompt]
        if not self.prompt:
            raise bad_request("prompt must not be empty", "prompt")
        return list(self.prompt)


def _where(loc: tuple) -> str:
    """pydantic's error location without its union-member tags: ('stop', 'str') -> 'stop'."""
    names = [
        str(p)
        for p in loc
        if isinstance(p, int) or (not any(c in p for c in "[]-") and p not in _TAGS)
    ]
    return ".".join(names)


_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal", "function-after"}


def parse(cls: type[SamplingRequest], body: Any) -> SamplingRequest:
    """Validate a decoded JSON body; APIError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _where(err["loc"])
        raise bad_request(
            f"{where}: {err['msg']}" if where else err["msg"], where or None
        ) from None
    if getattr(request, "logprobs", None):
        raise bad_request("logprobs are not supported by this server", "logprobs")
    if getattr(request, "echo", False):
        raise bad_request("echo is not supported by this server", "echo")
    if getattr(request, "suffix", None):
        raise bad_request("suffix is not supported by this server", "suffix")
    request.check()
    return request


def check_model(name: str, served: list[str]) -> None:
    if name not in served:
        raise APIError(
            404,
            f"The model {name!r} does not exist; this server serves {', '.join(served)}",
            param="model",
            code="model_not_found",
        )


def token_budget(
    prompt_len: int, requested: int | None, param: str, context: int, prompt_param: str = "messages"
) -> int:
    """New tokens a reply may use; APIError 400 when the prompt or the request do not fit.

    >>> token_budget(10, None, "max_tokens", 100), token_budget(10, 90, "max_tokens", 100)
    (90, 90)
    >>> token_budget(10, 91, "max_tokens", 100)
    Traceback (most recent call last):
    ...
    minimind.serve.errors.APIError: This model's maximum context length is 100 tokens, but 101 were requested (10 in the prompt, 91 for the completion). Lower max_tokens or shorten the prompt.
    """
    if prompt_len >= context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens, but the prompt is "
            f"{prompt_len} tokens. Shorten the prompt.",
            prompt_param,
            "context_length_exceeded",
        )
    if requested is None:
        return context - prompt_len
    if prompt_len + requested > context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens, but "
            f"{prompt_len + requested} were requested ({prompt_len} in the prompt, {requested} "
            f"for the completion). Lower {param} or shorten the prompt.",
            param,
            "context_length_exceeded",
        )
    return requested


def generation_configs(
    request: SamplingRequest, max_new_tokens: int, stop_ids: tuple[int, ...], count: int
) -> list[GenerationConfig]:
    """One GenerationConfig per choice. With a seed, choice i draws from seed + i, so the n
    choices differ and the same request gives the same n choices again."""
    if request.min_tokens > max_new_tokens:
        raise bad_request(
            f"min_tokens ({request.min_tokens}) exceeds the token budget ({max_new_tokens})",
            "min_tokens",
        )
    greedy = request.temperature == 0 or request.top_p == 0  # top_p 0 keeps only the top token
    try:
        return [
            GenerationConfig(
                max_new_tokens=max_new_tokens,
                temperature=0.0 if greedy else request.temperature,
                top_k=max(request.top_k, 0),
                top_p=request.top_p if request.top_p > 0 else 1.0,
                repetition_penalty=request.repetition_penalty,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                stop_token_ids=() if request.ignore_eos else stop_ids,
                min_new_tokens=request.min_tokens,
                seed=None if request.seed is None else (request.seed + i) % 2**64,
            )
            for i in range(count)
        ]
    except ValueError as exc:
        raise bad_request(str(exc)) from None
