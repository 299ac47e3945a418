"""The OpenAI wire format: strict request models, error objects, responses and stream chunks."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imm_ray.serve.settings import LimitSettings

if TYPE_CHECKING:
    from starlette.requests import Request

# Prompts longer than this many characters per allowed token are refused before tokenizing (no
# tokenizer's tokens are that long on average), so a big body never ties up the tokenizer.
MAX_CHARS_PER_TOKEN = 16


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (never a 500 for bad input)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    seed: int | None = None  # honoured where the engine can (see `OpenAIServer.prepare`)
    # end-user / cache identifiers: they do not change the output, here as at OpenAI
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list["TextPart"]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send exactly one prompt per request")
            v = v[0]
        return v


# OpenAI parameters this server does not implement: accepted with their default (or null), which
# clients send when the user set nothing and which means the same here; any other value is a 400.
_NOT_IMPLEMENTED_COMMON: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},)}
NOT_IMPLEMENTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "chat": {**_NOT_IMPLEMENTED_COMMON, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
             "tool_choice": ("none", "auto"), "parallel_tool_calls": (True,), "functions": ([],),
             "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "store": (False,),
             "metadata": ({},), "modalities": (["text"],), "audio": (), "prediction": (),
             "reasoning_effort": (), "service_tier": ("auto", "default"), "web_search_options": (),
             "verbosity": ()},
    "completion": {**_NOT_IMPLEMENTED_COMMON, "logprobs": (), "best_of": (1,), "suffix": ("",)},
}


def _same(value: Any, default: Any) -> bool:
    """JSON equality without Python's ``False == 0`` (``logprobs: 0`` is not ``logprobs: false``)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def _drop_defaults(data: dict[str, Any], kind: str) -> None:
    """Remove not-implemented parameters that hold their default; 400 for any other value."""
    for name, defaults in NOT_IMPLEMENTED[kind].items():
        if name not in data:
            continue
        value = data.pop(name)
        if value is not None and not any(_same(value, d) for d in defaults):
            allowed = ", ".join(["null", *(json.dumps(d) for d in defaults)])
            raise APIError(400, f"parameter {name!r} is not supported by this server (allowed: {allowed})",
                           param=name, code="unsupported_parameter")


_Request.model_rebuild()
ChatMessage.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


def parse_request(cls: type[_Request], raw: bytes, limits: LimitSettings) -> _Request:
    """Parse and bound a JSON body; raise `APIError` 400/413 with the offending parameter."""
    if len(raw) > limits.max_body_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}",
                       code="request_too_large")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    _drop_defaults(data, "chat" if cls is ChatRequest else "completion")
    try:
        req = cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unknown parameter {param!r}", param=param, code="unknown_parameter") from None
        raise APIError(400, f"invalid value for {param!r}: {err['msg']}", param=param,
                       code="invalid_value") from None
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n} exceeds the limit {limits.max_n}", param="n", code="invalid_value")
    if req.stop and len(req.stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings", param="stop", code="invalid_value")
    chars = len(req.prompt) if isinstance(req, CompletionRequest) else sum(len(m.text()) for m in req.messages)
    max_chars = limits.max_prompt_tokens * MAX_CHARS_PER_TOKEN
    if chars > max_chars:
        raise APIError(400, f"the prompt has {chars} characters; at most {max_chars} ({MAX_CHARS_PER_TOKEN} per "
                       "token of limits.max_prompt_tokens) are tokenized",
                       param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    max_tokens = requested_max_tokens(req)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} exceeds the limit {limits.max_tokens}", param="max_tokens",
                       code="invalid_value")
    return req


def requested_max_tokens(req: _Request) -> int | None:
    return getattr(req, "max_completion_tokens", None) or req.max_tokens


@dataclass(frozen=True)
class GenParams:
    """What the backend needs from a request (prompt already tokenized)."""

    prompt_ids: list[int]
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None = None


def gen_params(req: _Request, prompt_ids: list[int], limits: LimitSettings, max_model_len: int) -> GenParams:
    """Bound the prompt and the completion length; raise `APIError` 400 when they cannot fit."""
    budget = min(limits.max_prompt_tokens, max_model_len - 1)
    if len(prompt_ids) > budget:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is {budget}",
                       param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    room = max_model_len - len(prompt_ids)
    max_tokens = min(requested_max_tokens(req) or limits.max_tokens, room)
    return GenParams(prompt_ids, req.n, req.temperature, req.top_p, max_tokens, tuple(req.stop or ()), req.seed)


# --- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, choices: list[tuple[str, str]], use: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object from (text, finish_reason) per choice."""
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                     "logprobs": None} for i, (text, reason) in enumerate(choices)],
        "usage": use,
    }


def completion_response(rid: str, model: str, choices: list[tuple[str, str]], use: dict[str, int]) -> dict[str, Any]:
    """A ``text_completion`` object from (text, finish_reason) per choice."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                    for i, (text, reason) in enumerate(choices)],
        "usage": use,
    }


def chunk(rid: str, model: str, chat: bool, index: int, text: str | None, finish_reason: str | None,
          role: bool = False) -> dict[str, Any]:
    """One streamed chunk (``chat.completion.chunk`` or ``text_completion``)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, use: dict[str, int]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event (``data: ...`` + blank line)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def models_list(ids: list[str], owned_by: str = "imm-ray") -> dict[str, Any]:
    now = int(time.time())
    return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": owned_by}
                                       for i in ids]}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(part)
    return b"".join(chunks)
