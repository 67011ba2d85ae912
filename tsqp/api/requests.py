"""OpenAI request bodies checked and turned into a `Job`; every refusal an `ApiError` in OpenAI's error shape.

Only what changes the answer is kept. Fields this server cannot honour (n > 1, logprobs, penalties,
tools) are refused with 400 rather than ignored, so a client never gets a silently different answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tsqp.tee.sampling import SamplingOptions

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 1024  # chat: the rest of the context, at most this many (vLLM takes all of it)
MAX_STOP_SEQUENCES = 4  # as OpenAI


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class Job:
    """One generation asked for through the API."""

    kind: str  # "chat" or "completion"
    model: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingOptions
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False  # completions: the prompt's text before the answer


_UNSUPPORTED = {  # field -> the value that is the same as leaving it out
    "n": 1,
    "best_of": 1,
    "logprobs": None,
    "top_logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "tools": None,
    "functions": None,
    "suffix": None,
}


def parse_job(kind: str, body: Any, served_model: str, tokenizer, context: int, vocab_size: int) -> Job:
    """A checked Job from a request body; tokenizer: a `tee.tokenizer.TextTokenizer`; context: positions."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model", served_model)
    if model != served_model:
        message = f"the model {model!r} does not exist: this server serves {served_model!r}"
        raise ApiError(404, message, "model", "model_not_found")
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != neutral and not (name == "logprobs" and value is False):
            raise bad(f"{name}={value!r} is not supported by this server", name, "unsupported_parameter")
    if kind == "chat":
        prompt_ids = tokenizer.encode(tokenizer.render_chat(_messages(body)), add_special_tokens=False)
    else:
        prompt_ids = _prompt_ids(body, tokenizer, vocab_size)
    if not prompt_ids:
        raise bad("the prompt is empty", "prompt" if kind == "completion" else "messages")
    room = context - len(prompt_ids)
    if room < 1:
        raise bad(
            f"this model's context is {context} tokens, and the prompt holds {len(prompt_ids)}: shorten it",
            "messages" if kind == "chat" else "prompt",
            "context_length_exceeded",
        )
    max_tokens = _max_tokens(body, kind, room)
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise bad("stream_options must be an object, and needs stream: true", "stream_options")
    return Job(
        kind=kind,
        model=served_model,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=_sampling(body),
        stop=_stop(body),
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        echo=kind == "completion" and _typed(body, "echo", bool, False),
    )


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        out.append({"role": message["role"], "content": content})
    return out


def _prompt_ids(body: dict, tokenizer, vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise bad(f"prompt token ids must lie in [0, {vocab_size})", "prompt")
        return list(prompt)
    raise bad("prompt must be a string, a list of one string, or a list of token ids (one prompt: n=1)", "prompt")


def _max_tokens(body: dict, kind: str, room: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if value is None:
        return min(room, DEFAULT_COMPLETION_TOKENS if kind == "completion" else DEFAULT_CHAT_TOKENS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad(f"{param} must be a positive integer, got {value!r}", param)
    if value > room:
        raise bad(
            f"{param}={value} is more than the {room} tokens the context leaves after the prompt",
            param,
            "context_length_exceeded",
        )
    return value


def _sampling(body: dict) -> SamplingOptions:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must lie in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad(f"seed must be an integer, got {seed!r}", "seed")
    if seed is None:
        import secrets

        seed = secrets.randbits(63)
    return SamplingOptions(temperature=temperature, top_p=top_p, seed=seed % (1 << 63))


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise bad(f"{name} must lie in [{low}, {high}], got {value}", name)
    return float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise bad(f"stop must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them", "stop")
    return stop


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad(f"{name} must be a {kind.__name__}, got {value!r}", name)
    return value
