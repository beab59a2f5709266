"""main.py - a single-file, OpenAI-compatible chat server for Hugging Face transformers models.

Endpoints (every /v1 route needs `Authorization: Bearer <key>` when API_KEY is set)
  POST /v1/chat/completions         OpenAI chat completions: JSON, or SSE when `stream: true`; text, images,
                                    videos; with `Last-Event-ID` (or ?last_event_id=) it resumes a stream instead
  GET  /v1/sessions/{id}/events     the same resume for EventSource: events after Last-Event-ID, then the tail
  GET  /v1/sessions/{id}            a session's state
  POST /v1/cancel/{id}              stop a generation at its next token
  POST /v1/responses                the Responses API on the same sessions: JSON, SSE, `background: true`
  GET  /v1/responses/{id}           the response now; `?stream=true&starting_after=N` its events after N
  POST /v1/responses/{id}/cancel    (background responses) DELETE /v1/responses/{id}, GET .../input_items
  GET  /v1/models, /v1/models/{id}  the one served model (its id: SERVED_MODEL_NAME, the hub id, or a file name)
  GET  /health, /health/live, /health/ready, /metrics (Prometheus)

Streams
  Every SSE event carries `id: <session_id>:<index>` (index from 0, one per event, `[DONE]` included); the
  session id is also the `X-Session-Id` header. Generation is decoupled from the HTTP connection: a runner
  appends events to a session (ring buffer, optionally journaled in SQLite), and every response only reads it,
  so a client that drops reconnects with Last-Event-ID and gets exactly what it missed. Nobody reading for
  CANCEL_AFTER_DISCONNECT_SECONDS cancels the generation. The JSON response is a fold over the same events.
  Bodies and chunks follow OpenAI's OpenAPI spec (a cancelled generation says finish_reason "stop"; its
  session state says "cancelled"). SSE goes through sse-starlette (keep-alive ping, disconnect, shutdown).
  Text requests share one continuous batch; requests with media run their own generate().
  Responses streams carry `event: <type>` and `id: <response_id>:<sequence_number>`, and no [DONE].

Outputs
  `response_format` (json_object, json_schema) and forced `tool_choice` are enforced by constrained decoding
  (llguidance): every row's next tokens are masked to what its grammar allows. Tool calls (`<tool_call>` blocks)
  and reasoning (`<think>`) are parsed from the text as it streams, into `tool_calls` and `reasoning_content`.

Errors
  Always `{"error": {"message", "type", "param", "code"}}`: bad input 400, bad key 401, unknown route or
  session 404, expired events 410, body too large 413, overload 429 (with Retry-After), model not ready or failed
  to load 503, anything else 500 with no internals. An error after the stream started is one `data:` event
  holding an `error` object, then `data: [DONE]`.

Configuration
  Environment variables (or a `.env` file), one per `Settings` field, named as the field in upper case; see
  `.env.example`. An invalid value stops start-up with a message naming the variable.

Run: `uvicorn main:app --port 3000` or `python main.py` (PORT, HOST); `python main.py convert-gguf FILE FOLDER`
turns a GGUF into a folder that loads in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import collections
import contextlib
import contextvars
import copy
import functools
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import os
import queue
import re
import secrets
import shutil
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePath, PureWindowsPath
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, Protocol, TypeVar, cast
from urllib.parse import urlsplit
from urllib.request import url2pathname

import anyio
from dotenv import dotenv_values
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:  # heavy imports happen lazily, inside the engine, never at import time
    import torch

log = logging.getLogger("llm_server")


# ==== 1. Config =====================================================================================================
# Frozen, validated Settings from the environment (.env.example names); logging with redaction.


DEFAULT_MODEL_REPO_ID = "unsloth/Qwen3-4B-Instruct-2507"


TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """An environment variable holds a value the server cannot use; the message names the variable."""


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


_CASTS: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": parse_bool}


HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$|^[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_path(repo_id: str) -> bool:
    """A local file or folder rather than a hub id (`owner/name`), judged by its text alone (pure: no I/O): it
    names a .gguf, starts like a path (`.`, `~`, `/`, `\\`, a drive letter) or has a shape no hub id has."""
    text = repo_id.strip()
    if text.lower().endswith(".gguf"):
        return True
    if text.startswith((".", "~", "/", "\\")) or re.match(r"^[A-Za-z]:", text):
        return True
    return not HUB_ID_PATTERN.match(text)


APP_DIR = Path(__file__).parent  # deliberate: .env and a relative SESSIONS_DB_PATH live here, not in the working
# directory (started from Task Scheduler or as a Windows service, that is C:\\Windows\\System32)
PathT = TypeVar("PathT", bound=PurePath)


def beside(app_dir: PathT, raw: str) -> PathT:
    """A path setting as the server uses it: absolute (or `~`) as given, relative beside main.py. Pure: the
    flavour of `app_dir` decides what is absolute (a PureWindowsPath tests the Windows rules anywhere)."""
    candidate = type(app_dir)(raw)
    return candidate if candidate.is_absolute() or raw.startswith("~") else app_dir / candidate


def shutdown_seconds(platform: str) -> tuple[float, float]:
    """(the whole graceful shutdown, the part of it open streams get for their last events). Closing a Windows
    console window gives the process about 5 s before it is ended, so 4 s there; 10 s elsewhere (a SIGTERM)."""
    return (4.0, 2.0) if platform == "win32" else (10.0, 5.0)


def size_text(nbytes: float) -> str:
    """A byte count for people: "1.50 GiB", "640.0 KiB"."""
    for unit in ("B", "KiB", "MiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


def at_least(default: Any, minimum: int) -> Any:
    """A setting's Field with its floor; a failure says "at least 1" (or "0 or more") as the variable's message."""
    return Field(default=default, ge=minimum, description=f"at least {minimum}" if minimum else "0 or more")


def more_than_zero(default: float) -> Any:
    return Field(default=default, gt=0, description="more than 0")


def one_of(default: str, *allowed: str) -> Any:
    return Field(
        default=default, description=" or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
    )


class Settings(BaseModel):
    """Every setting, read from the variable of the same name in upper case (`port` <- `PORT`). pydantic checks
    them; a failure names the variable and what it must be (each Field's description)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(default=3000, ge=0, le=65535, description="a port number (0-65535)")
    host: str = "127.0.0.1"  # deliberate: loopback by default; set 0.0.0.0 to serve the network
    model_repo_id: str = Field(default=DEFAULT_MODEL_REPO_ID, pattern=r"\S", description="a model id or path")
    # ^ hub id, local folder, or path to a .gguf file
    served_model_name: str = ""  # the model id clients see; empty = the hub id, or the file or folder name
    hf_token: str = ""
    trust_remote_code: bool = False  # deliberate: off; on runs the model repo's own Python (only some models need it)
    preload_model: bool = False  # load at start-up instead of on the first request
    model_load_retry_seconds: float = at_least(30.0, 0)  # after a failed load, 503 + Retry-After until then
    device_map: str = "auto"  # passed to from_pretrained; "none" leaves placement to torch
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = one_of("auto", *TORCH_DTYPES)
    max_tokens: int = at_least(256, 1)  # default completion length when a request names none
    temperature: float = Field(default=0.7, ge=0, le=2, description="between 0 and 2")  # the default; 0 means greedy
    max_video_frames: int = at_least(16, 1)  # frames sampled evenly from each video
    max_images_per_request: int = at_least(8, 0)
    max_image_bytes: int = at_least(20_000_000, 1)
    max_image_pixels: int = at_least(25_000_000, 1)  # width x height; larger images (decompression bombs) refused
    max_video_bytes: int = at_least(100_000_000, 1)
    media_fetch_timeout_seconds: float = more_than_zero(10.0)
    media_allow_private_hosts: bool = False  # deliberate: http(s) media may not reach loopback/private networks
    media_root: str = ""  # local paths and file:// URLs are allowed only under this folder; empty = refused
    max_concurrent_generations: int = at_least(8, 1)  # generations admitted at once (text ones share one batch)
    max_batch_size: int = at_least(8, 1)  # rows stepped together by the continuous batch
    prefix_cache_bytes: int = Field(default=-1, ge=-1, description="-1 (auto), 0 (off) or a byte count")
    # ^ KV of earlier prompts kept for reuse; -1 = 1 GiB on CPU, 15% of a GPU; 0 = off
    kv_cache_bytes: int = Field(default=-1, ge=-1, description="-1 (auto), 0 (no budget) or a byte count")
    # ^ what the batch's KV (and the prefix cache) may hold; -1 = the memory free once the model is loaded, less
    # headroom (GPU: 10% of the card, at least 1 GiB; CPU: half the RAM available)
    batching: Literal["auto", "off"] = one_of("auto", "auto", "off")  # off = one generate() per request
    speculative_tokens: int = Field(default=8, ge=0, le=16, description="between 0 and 16")
    # ^ draft tokens a row may verify in one pass (prompt lookup, tried where it pays); 0 = off
    prefill_batch_tokens: int = at_least(0, 0)  # prompt tokens (padded) per prefill forward; 0 = 256 CPU, 4096 GPU
    max_queued_requests: int = at_least(16, 0)  # waiting beyond the running ones; past this, 429
    keepalive_seconds: float = more_than_zero(15.0)  # SSE comment interval, so proxies keep a long prefill open
    persist_sessions: bool = False
    sessions_db_path: str = "sessions.db"
    sessions_ttl_seconds: float = more_than_zero(3600.0)
    session_store: str = Field(
        default="", pattern=r"^(|(redis|rediss|unix)://.*)$", description="empty or a redis:// URL"
    )
    # ^ redis://host:port/db: sessions shared by every replica in Redis; empty = this process
    session_lease_seconds: float = at_least(5.0, 1)  # with Redis: a dead replica's sessions are claimed after this
    restart_sessions: Literal["continue", "interrupt"] = one_of("continue", "continue", "interrupt")
    # ^ with persistence: a restart continues running sessions, or interrupts them
    continue_max_attempts: int = at_least(2, 0)  # continuations of one session (each restart is one)
    continue_max_age_seconds: float = more_than_zero(3600.0)  # older at restart: interrupted, not continued
    cancel_after_disconnect_seconds: float = at_least(3600.0, 0)  # 0 disables the auto-cancel
    session_buffer_events: int = at_least(4096, 16)
    max_sessions: int = at_least(1024, 1)
    log_level: str = Field(default="INFO", description="a logging level")
    api_key: str = ""  # one key or a comma-separated list; when set, every /v1 route needs Bearer <key>
    cors_allow_origins: str = ""  # comma-separated origins ("*" for any); empty = CORS off
    max_request_bytes: int = at_least(67_108_864, 1024)  # 64 MiB: room for a few base64 images; larger get 413
    max_messages: int = at_least(512, 1)
    max_prompt_tokens: int = at_least(0, 0)  # 0 = the model's context length
    max_generation_seconds: float = at_least(0.0, 0)  # a generation running longer ends with length; 0 = no cap
    max_schema_bytes: int = at_least(65_536, 2)  # a response_format schema larger than this (compact) is refused
    grammar_compile_timeout_seconds: float = more_than_zero(10.0)  # a schema compiling longer: a 400
    grammar_cache_size: int = at_least(64, 1)  # compiled grammars kept, by schema: a repeated schema compiles once
    max_n: int = at_least(8, 1)  # choices one request may ask for (n); never more than MAX_BATCH_SIZE

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError(value)
        return value

    @classmethod
    def env_names(cls) -> list[str]:
        return [name.upper() for name in cls.model_fields]

    @classmethod
    def from_env(cls, environ: Mapping[str, str], dotenv_path: Path | None = None) -> Settings:
        """Build from `environ`, over the values of a `.env` file when one is given and exists. Each value is cast
        to its field's type first, so that "PORT must be int, got 'abc'" names the type and a range error shows
        the number."""
        values: dict[str, str] = {}
        if dotenv_path is not None and dotenv_path.is_file():
            values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        values.update(environ)
        kwargs: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            raw = values.get(name.upper())
            if raw is None:
                continue
            kind = info.annotation if info.annotation in (int, float, bool) else str
            try:
                kwargs[name] = _CASTS[kind.__name__](raw.strip())
            except ValueError:
                raise ConfigError(f"{name.upper()} must be {kind.__name__}, got {raw!r}") from None
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0])
            expected = cls.model_fields[name].description or error["msg"]
            raise ConfigError(f"{name.upper()} must be {expected}, got {error['input']!r}") from None

    def model_id(self) -> str:
        """The id responses and /v1/models carry: SERVED_MODEL_NAME, else the hub id as given, else (for a
        local file or folder) its name. Never an absolute path: that would leak the server's file system."""
        if self.served_model_name.strip():
            return self.served_model_name.strip()
        repo_id = self.model_repo_id.strip()
        if not looks_like_path(repo_id):
            return repo_id
        return re.split(r"[\\/]", repo_id.rstrip("\\/"))[-1]  # either separator, whatever this OS uses

    def api_keys(self) -> list[str]:
        return [key.strip() for key in self.api_key.split(",") if key.strip()]

    def persists(self) -> bool:
        """Whether sessions outlive this process: in SQLite (PERSIST_SESSIONS) or in Redis (SESSION_STORE)."""
        return self.persist_sessions or bool(self.session_store)

    def secrets(self) -> list[str]:
        password = urllib.parse.urlsplit(self.session_store).password if self.session_store else None
        return [s for s in (self.hf_token, *self.api_keys(), password) if s]


def redact_url(url: str) -> str:
    """A store URL for logs and /health: its password replaced."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class AddRequestId(logging.Filter):
    """Tags every record with the id of the request it was logged under (tasks inherit it from their request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class RedactSecrets(logging.Filter):
    """Replaces known secret values and bearer credentials in every record before it is written."""

    BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")

    def __init__(self, secret_values: list[str]) -> None:
        super().__init__()
        self.secret_values = [s for s in secret_values if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.BEARER.sub(r"\1***", message)
        for value in self.secret_values:
            redacted = redacted.replace(value, "***")
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def configure_logging(settings: Settings) -> None:
    """One stderr handler on the root logger, with redaction, so uvicorn's records are covered too."""
    root = logging.getLogger()
    if not any(getattr(h, "_llm_server", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
        handler._llm_server = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for existing in root.handlers:
        existing.filters = [f for f in existing.filters if not isinstance(f, RedactSecrets | AddRequestId)]
        existing.addFilter(AddRequestId())
        existing.addFilter(RedactSecrets(settings.secrets()))
    root.setLevel(settings.log_level.upper())


# ==== 2. Wire types =================================================================================================
# The pydantic request and response models, named as OpenAI names them.


SESSION_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"


MAX_TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for, as OpenAI's top_logprobs


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")  # deliberate: unknown OpenAI fields are ignored, not rejected


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ImageURL(WireModel):
    url: str
    detail: str | None = None


class ImagePart(WireModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(WireModel):
    url: str


class VideoPart(WireModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionCall(WireModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # the spec: only an assistant's may be absent
            raise PydanticCustomError("missing_content", "a {role} message needs content", {"role": self.role})
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("missing_tool_call_id", "a tool message needs tool_call_id", {})
        return self


class FunctionSpec(WireModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; none: no arguments
    strict: bool | None = None


class ToolSpec(WireModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(WireModel):
    include_usage: bool | None = None


class TextFormat(WireModel):
    type: Literal["text"]


class JsonObjectFormat(WireModel):
    type: Literal["json_object"]


class JsonSchemaSpec(WireModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)  # journals say `schema`

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # deliberate: `schema` shadows BaseModel
    strict: bool | None = None  # deliberate: informational; every schema is enforced, as vLLM and SGLang do


class JsonSchemaFormat(WireModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class SamplingFields(WireModel):
    """What chat completions and the legacy completions share: length, sampling, stops, choices, streaming, and
    the session to attach. `logprobs` differs between the two (a flag there, a count here)."""

    model: str | None = None  # informational: the server serves one model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)  # null (as every field the spec marks nullable) means the default
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as text) -> -100..100; ids checked against the vocabulary
    # the extensions vLLM users send
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)  # transformers' (CTRL) formula; 1 = off
    top_k: int | None = Field(default=None, ge=-1)  # 0 or -1: off; null: the model's default
    min_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)  # ours: names the session to attach


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0},
                {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 16,
                 "stream_options": {"include_usage": True}, "session_id": "example-1"},
            ]
        },
    )  # fmt: skip

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs: true
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool | None = None  # default true
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension, e.g. {"enable_thinking": false}


class CompletionRequest(SamplingFields):
    """The legacy `/v1/completions`: a raw prompt (no chat template), `echo`, and `logprobs` as a count."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: only score the prompt (evaluation harnesses)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None  # refused unless empty: no insertion (fill-in-the-middle) here
    best_of: int | None = Field(default=None, ge=1)  # refused above 1


# -- the Responses API's request: flat tools and formats, input items (what clients echo back included) --


class InputText(WireModel):
    type: Literal["input_text", "output_text"]  # output_text: an assistant message echoed back as input
    text: str


class InputImage(WireModel):
    type: Literal["input_image"]
    image_url: str
    detail: str | None = None


InputPart = Annotated[InputText | InputImage, Field(discriminator="type")]


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]


class ReasoningInputItem(WireModel):
    type: Literal["reasoning"]  # an earlier answer's reasoning echoed back: accepted, not shown to the model


def _item_type(value: Any) -> str:
    found = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return str(found)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningInputItem, Tag("reasoning")],
    Discriminator(_item_type),
]  # fmt: skip


class FlatFunctionTool(WireModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FlatNamedToolChoice(WireModel):
    type: Literal["function"]
    name: str


class FlatJsonSchemaFormat(WireModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(WireModel):
    format: Annotated[TextFormat | JsonObjectFormat | FlatJsonSchemaFormat, Field(discriminator="type")] | None = None


OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"


ResponseIncludable = Literal[
    "message.output_text.logprobs",  # built: logprobs on output_text parts and delta events
    "message.input_image.image_url",  # input items list their image urls anyway
    "reasoning.encrypted_content",  # deliberate: reasoning is kept as text, never encrypted: nothing to add
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",  # hosted tools this server has not
]  # the spec's IncludeEnum: another value is a 400 naming `include`


class ResponsesRequest(WireModel):
    model: str | None = None  # informational, as on chat completions
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None  # not carried over to a response that continues this one
    previous_response_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    tools: list[FlatFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FlatNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = None
    background: bool | None = None
    store: bool | None = None  # deliberate: every response is kept (for its TTL); nothing is lost either way
    metadata: dict[str, str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include: list[ResponseIncludable] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def wants_logprobs(self) -> bool:
        """Asked by `include` (as OpenAI returns them) or by `top_logprobs` alone (deliberate: never ignored)."""
        return OUTPUT_TEXT_LOGPROBS in (self.include or ()) or self.top_logprobs is not None


# -- response bodies: typed, so that /openapi.json documents every response; the protocol section builds them --

WireFinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


def _omit_none(value: object) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(default=None, exclude_if=_omit_none)  # with a hit


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None  # required by the spec (null when there is none)
    tool_calls: list[ResponseToolCall] | None = Field(default=None, exclude_if=_omit_none)
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)  # llama.cpp's name
    reasoning: str | None = Field(default=None, exclude_if=_omit_none)  # vLLM's: clients read one or the other


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: WireFinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=_omit_none)  # only in a call's first delta
    arguments: str | None = Field(default=None, exclude_if=_omit_none)


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = Field(default=None, exclude_if=_omit_none)  # only in a call's first delta
    type: Literal["function"] | None = Field(default=None, exclude_if=_omit_none)
    function: FunctionCallDelta


class ChunkDelta(BaseModel):
    """Only the fields a chunk carries are written: `{"content": "x"}`, or `{}` on the finishing chunk."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_omit_none)
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)
    reasoning: str | None = Field(default=None, exclude_if=_omit_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: WireFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)  # only on the usage chunk (choices: [])


class LegacyLogprobs(BaseModel):
    """The legacy endpoint's logprobs: parallel lists, one entry per token (the first prompt token's is null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TextChoice(BaseModel):
    text: str
    index: int
    logprobs: LegacyLogprobs | None = None
    finish_reason: WireFinishReason | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class SessionInfo(BaseModel):
    """Ours: a session's state. `state` says how it ended (a cancelled one streams finish_reason "stop")."""

    id: str
    object: Literal["chat.session"] = "chat.session"
    state: Literal["queued", "running", "finished", "cancelled", "failed", "interrupted"]
    created: int
    events: int  # events so far, [DONE] included once ended; the last one's index is events - 1
    readers: int


class CancelResult(SessionInfo):
    already_ended: bool


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    model_loaded: bool
    model_error: str | None
    generations_running: int
    generations_queued: int
    sessions: int
    persistence: str
    sessions_continued: int = 0  # unfinished sessions this process continued at start-up (PERSIST_SESSIONS=1)
    device: str | None = None  # where the model runs, once loaded: "cuda:0 (NVIDIA ...)" or "cpu"
    dtype: str | None = None  # its weights' dtype, once loaded
    kv_cache_bytes: int | None = None  # KV the batch holds (padding included) with the prefix cache; None: no batch
    kv_cache_budget_bytes: int | None = None  # KV_CACHE_BYTES as bytes; 0: no budget
    requests_waiting_for_memory: int | None = None  # rows held back until the KV budget has room


class Ready(BaseModel):
    status: Literal["ready"]
    persistence: str


class Live(BaseModel):
    status: Literal["ok"]


# ==== 3. Errors =====================================================================================================
# One APIError family -> the OpenAI error body; validation errors -> a 400 naming the param.


class APIError(Exception):
    """An error with its OpenAI shape; raise a subclass, the handler turns it into the response."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return make_error(self.message, self.type, self.param, self.code)


class BadRequest(APIError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(APIError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class Overloaded(APIError):
    status, type, code = 429, "rate_limit_error", "server_overloaded"


class EventsGone(APIError):
    status, type, code = 410, "invalid_request_error", "events_expired"


class ModelNotReady(APIError):
    status, type, code = 503, "service_unavailable_error", "model_not_ready"


class StoreUnavailable(APIError):
    status, type, code = 503, "service_unavailable_error", "session_store_unavailable"


class DeviceOutOfMemory(APIError):
    """A request the device ran out of memory for while it ran alone (with others, it is preempted instead)."""

    status, type, code = 503, "service_unavailable_error", "out_of_memory"


def make_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


UNION_BRANCH_LABEL = re.compile(r"[\[\],]|^(str|int|float|bool|none|dict|list)$|^[A-Z][A-Za-z0-9]*$")  # or a class


TAGGED_UNION_FIELDS = {"messages[].content[]", "response_format", "input[]", "input[].content[]", "text.format"}
# pydantic puts the branch's tag after these fields


def param_parts(location: tuple[int | str, ...]) -> list[int | str]:
    """A pydantic error location without "body", without union branch labels ("str", "list[...]") and without
    the tag a discriminated union adds after its field (`response_format.json_schema` for a missing
    `response_format.json_schema`, which pydantic reports at `response_format.json_schema.json_schema`)."""
    parts = location[1:] if location and location[0] == "body" else location
    kept: list[int | str] = []
    shape, tag_due = "", False  # the path so far with indexes as []; whether the next name is a union's tag
    for part in parts:
        if isinstance(part, str) and (UNION_BRANCH_LABEL.search(part) or tag_due):
            tag_due = tag_due and bool(UNION_BRANCH_LABEL.search(part))
            continue
        kept.append(part)
        shape += "[]" if isinstance(part, int) else (f".{part}" if shape else part)
        tag_due = shape in TAGGED_UNION_FIELDS
    return kept


def to_param_path(location: tuple[int | str, ...]) -> str | None:
    """pydantic's ("body", "messages", 1, "content") -> "messages[1].content"."""
    path = ""
    for part in param_parts(location):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def describe_validation_error(errors: list[Any]) -> BadRequest:
    """The first invalid field as a 400 naming it. A union reports an error per branch; the one that got
    furthest (the deepest location) is the useful one: for a list of content parts, the part at fault rather
    than "should be a valid string"."""
    field_errors = [e for e in errors if param_parts(tuple(e.get("loc", ())))[:1] == param_parts(errors[0]["loc"])[:1]]
    chosen = max(field_errors, key=lambda e: len(param_parts(tuple(e.get("loc", ())))))
    param = to_param_path(tuple(chosen.get("loc", ())))
    message = str(chosen.get("msg", "invalid"))
    if chosen.get("type") == "union_tag_invalid":
        ctx = chosen.get("ctx") or {}
        message = f"type {ctx.get('tag')!r} is not supported (supported: {ctx.get('expected_tags')})"
    return BadRequest(f"{param or 'body'}: {message}", param=param)


# ==== 4. Records ====================================================================================================
# Pure from here to section 7: OpenAI JSON -> internal records -> SSE bytes. No I/O, no globals, no
# model. Here: what flows between the parts (params, engine events, prompts, stream metadata, event ids) and the
# Engine protocol.


DONE = "[DONE]"


FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


ConstraintKind = Literal["json_schema", "tool_call", "tool_calls", "auto_tool_call", "auto_tool_calls"]
# tool_call(s): the answer is one call, or one or more; auto_: free text, then (optionally) the call(s)


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must be, as the request said it: a JSON Schema, compact JSON text in the request's key order
    (the engine keeps the properties in that order), or forced tool calls: `<tool_call>` blocks around JSON that
    matches `source`. The engine compiles it; `param` names it in a 400."""

    source: str  # the JSON Schema; for tool calls, the schema of one call's JSON
    param: str
    kind: ConstraintKind = "json_schema"


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int  # 0 (legacy echo only): the prompt is scored, nothing is generated
    temperature: float  # 0 means greedy
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    constraint: ConstraintSpec | None = None  # None: free text
    parallel_tool_calls: bool = True  # False: an answer ends after its first tool call
    n: int = 1  # choices, each a row of its own in the batch (the prompt prefilled once)
    logprobs: int | None = None  # alternatives per token when logprobs are asked for (0-20); None: no logprobs
    prompt_logprobs: bool = False  # the legacy echo: the prompt's own tokens scored too
    presence_penalty: float = 0.0  # OpenAI's penalties, over the tokens generated so far
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers' and vLLM's, over the prompt and the tokens generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    top_k: int | None = None  # None: the model's generation config; 0: off
    min_p: float = 0.0
    min_tokens: int = 0  # end-of-text is masked until this many tokens
    ignore_eos: bool = False  # end-of-text does not end the answer (benchmarks)
    cache_salt: str = ""  # whose prompts these are (the API key's owner id): prefix-cache entries never cross owners
    score_end_token: bool = False  # a generated end-of-text token gets its logprob entry too (legacy completions:
    # lm-evaluation-harness reads the last entry as the generated token's; chat, as OpenAI's, lists text tokens only)
    asked_max_tokens: bool = False  # max_new_tokens is the request's own (past the context: a 400), not a default

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits are changed before sampling; a row that says no pays nothing for it."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)  # fmt: skip

    @property
    def penalizes_counts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass(frozen=True)
class TokenScore:
    """One token's log-probability under the model (raw logits: before bias, penalties, masks and temperature),
    with its most likely alternatives, each (text, logprob, bytes). A prompt's first token has no logprob."""

    token: str
    logprob: float | None
    raw: bytes  # its bytes: half of a multi-byte character stays half
    top: tuple[tuple[str, float, bytes], ...] = ()


@dataclass(frozen=True)
class StreamMeta:
    """What every chunk of one completion repeats."""

    completion_id: str
    created: int
    model: str
    include_usage: bool
    protocol: Literal["chat", "responses", "completions"] = "chat"  # whose events the session holds
    response_json: str = ""  # responses: the response object as created (JSON), its status and output empty
    conversation_json: str = ""  # responses: the chat messages it was asked (JSON), for previous_response_id
    input_json: str = ""  # responses: its input items, as GET .../input_items lists them (JSON)
    background: bool = False  # responses: runs to its end even if every reader leaves (no disconnect cancel)
    echo_json: str = ""  # completions with echo: each choice's prompt text (JSON list), written before its answer


def format_event_id(session_id: str, index: int) -> str:
    return f"{session_id}:{index}"


def parse_event_id(text: str) -> tuple[str, int] | None:
    """`<session_id>:<index>` -> (session_id, index), or None when malformed."""
    session_id, sep, index = text.strip().rpartition(":")
    if not sep or not re.fullmatch(SESSION_ID_PATTERN, session_id) or not re.fullmatch(r"\d{1,18}", index):
        return None
    return session_id, int(index)


ReasoningMode = Literal["off", "open", "maybe"]  # off: none; open: the prompt opened <think>; maybe: the model may


@dataclass(frozen=True)
class OutputFormat:
    """How to read what a model writes, known from its chat template and the rendered prompt."""

    tool_calls: bool = False  # parse <tool_call> blocks
    reasoning: ReasoningMode = "off"
    parallel_tool_calls: bool = True  # False: the answer ends after the first call


@dataclass(frozen=True)
class Delta:
    text: str
    choice: int = 0  # which of the request's n choices
    logprobs: tuple[TokenScore, ...] = ()  # the tokens this text came from, when logprobs are asked for
    tokens: tuple[int, ...] = ()  # the token ids this text came from (journaled: a restart continues after them)


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    completion_tokens: int
    choice: int = 0
    cached_tokens: int = 0  # prompt tokens this choice's prompt read from the prefix cache (not computed)


@dataclass(frozen=True)
class PromptScores:
    """The legacy echo with logprobs: the prompt's tokens, scored, before the choice's first delta."""

    scores: tuple[TokenScore, ...]
    choice: int = 0


EngineEvent = Delta | Finished | PromptScores


@dataclass(frozen=True)
class ChoiceResume:
    """Where one choice stands when a restart continues it: the tokens it has emitted (re-prefilled after the
    prompt, counted against max_tokens and by the penalties), whether it has ended, and whether its prompt
    scores (the legacy echo) were already sent."""

    tokens: tuple[int, ...] = ()
    finished: bool = False
    scored: bool = False


@dataclass
class PreparedPrompt:
    """A templated, tokenized prompt, ready for the engine (inputs are engine-specific)."""

    inputs: Any
    prompt_tokens: int
    grammar: CompiledGrammar | None = None  # the compiled response_format or forced tool call, if any
    output: OutputFormat = field(default_factory=OutputFormat)  # how to read what the model writes
    text: str = ""  # a raw prompt as text (the legacy echo)


@dataclass(frozen=True)
class TemplateInputs:
    """What the chat template takes beside the messages: the tools to show, and the request's own keywords."""

    tools: list[dict[str, Any]] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # chat_template_kwargs, e.g. {"enable_thinking": False}

    def as_kwargs(self) -> dict[str, Any]:
        return {**self.kwargs, **({"tools": self.tools} if self.tools else {})}


@dataclass(frozen=True)
class Placement:
    """Where a loaded model runs, as the load log line and /health say it."""

    device: str  # "cuda:0 (NVIDIA GeForce RTX 4090)", "cpu"
    dtype: str  # "bfloat16"
    weights_bytes: int
    why_cpu: str = ""  # on the CPU: why (a CPU build of torch, no GPU visible, DEVICE_MAP=cpu)

    def describe(self) -> str:
        where = f"{self.device} ({self.why_cpu})" if self.why_cpu else self.device
        return f"device {where}, dtype {self.dtype}, weights {self.weights_bytes / 2**30:.2f} GiB"


class Engine(Protocol):
    """What the server needs from a model. Every method blocks: call them from worker threads."""

    model_name: str

    def is_loaded(self) -> bool: ...

    def placement(self) -> Placement | None: ...  # None until loaded

    def prefix_cache_stats(self) -> dict[str, int]: ...  # lookups, hits, reused_tokens, ..., bytes; {} when none

    def batch_stats(self) -> dict[str, int]: ...  # KV bytes, budget, waiting rows, preemptions, drafted and accepted

    # tokens; {} when there is no batch

    def kv_limit(self) -> KvLimit | None: ...  # what the KV budget holds for one request; None: no budget

    def load_error(self) -> str | None: ...

    def load(self) -> None: ...

    def context_length(self) -> int | None: ...

    def prepare(
        self, messages: list[dict[str, Any]], params: GenerationParams, template: TemplateInputs | None = None
    ) -> PreparedPrompt: ...

    def prepare_text(self, prompt: str | list[int], params: GenerationParams) -> PreparedPrompt: ...

    def stream(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event,
        ends: Sequence[threading.Event] = (), resume: Sequence[ChoiceResume] = (),
    ) -> Iterator[EngineEvent]: ...  # fmt: skip


# ==== 5. Requests ===================================================================================================
# An API request -> template messages, tools, constraints and sampling params; policy checks; a
# Responses request as the chat request it means.


GRAMMAR_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# deliberate: constrained JSON has one fixed layout, `{"a": 1, "b": [2, 3]}`. With free whitespace small models
# drift into runs of spaces and newlines, or numbers without end, until max_tokens (vLLM's
# --disable-any-whitespace exists for this).


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # Qwen2.5, Qwen3 and Hermes-style templates


def key_owner(authorization: str | None, keys: list[str]) -> str:
    """The owner id of a request: "" when no keys are set, else a short hash of the key it presented.
    Compares against every key in constant time, so timing says neither whether nor which one matched."""
    if not keys:
        return ""
    scheme, _, token = (authorization or "").strip().partition(" ")
    presented = token.strip().encode()
    matched = None
    for key in keys:
        if hmac.compare_digest(presented, key.encode()):
            matched = key
    if matched is None or scheme.lower() != "bearer":
        raise Unauthorized("missing or invalid API key: send Authorization: Bearer <key>")
    return hashlib.sha256(matched.encode()).hexdigest()[:16]


def storage_key(owner: str, session_id: str) -> str:
    """Sessions live in one namespace per API key ("/" cannot appear in a session id): another key's session
    of the same name is simply another session, so ids can be neither probed nor hijacked."""
    return f"{owner}/{session_id}" if owner else session_id


def check_message_count(request: ChatCompletionRequest, max_messages: int) -> None:
    if len(request.messages) > max_messages:
        raise BadRequest(f"too many messages: {len(request.messages)} (at most {max_messages})", param="messages")


@dataclass(frozen=True)
class KvLimit:
    """What the KV budget holds for one request: its prompt and answer together, in tokens."""

    tokens: int
    budget_bytes: int


def check_token_limit(params: GenerationParams, prompt_tokens: int, limit: int, what: str) -> GenerationParams:
    """A prompt that reaches `limit` (the context, or what the KV budget holds for one request), or with the
    max_tokens it asked for passes it, is refused with the figures; a default max_tokens is capped instead."""
    if prompt_tokens >= limit:
        raise BadRequest(f"{what} is {limit} tokens. However, your messages resulted in {prompt_tokens} tokens.",
                         param="messages", code="context_length_exceeded")  # fmt: skip
    if params.asked_max_tokens and prompt_tokens + params.max_new_tokens > limit:
        raise BadRequest(
            f"{what} is {limit} tokens. However, you requested {prompt_tokens + params.max_new_tokens} tokens "
            f"({prompt_tokens} in the messages, {params.max_new_tokens} in the completion). Please reduce the "
            "length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    return replace(params, max_new_tokens=min(params.max_new_tokens, limit - prompt_tokens))


def fit_to_context(
    params: GenerationParams, prompt_tokens: int, context_tokens: int | None, max_prompt_tokens: int,
    kv: KvLimit | None = None,
) -> GenerationParams:  # fmt: skip
    """Refuses a prompt past the context, MAX_PROMPT_TOKENS or what the KV budget holds for one request, and an
    asked-for max_tokens past the context or the budget; caps a default max_tokens to what is left."""
    if max_prompt_tokens and prompt_tokens > max_prompt_tokens:
        raise BadRequest(
            f"The server's prompt limit (MAX_PROMPT_TOKENS) is {max_prompt_tokens} tokens. "
            f"However, your messages resulted in {prompt_tokens} tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    if context_tokens is not None:
        params = check_token_limit(params, prompt_tokens, context_tokens, "This model's maximum context length")
    if kv is not None:
        what = f"The server's KV cache budget (KV_CACHE_BYTES, {size_text(kv.budget_bytes)}) for one request"
        params = check_token_limit(params, prompt_tokens, kv.tokens, what)
    return params


def parse_resume_point(header: str | None, query: str | None) -> tuple[str, int] | None:
    """The `Last-Event-ID` header (or `?last_event_id=`) -> (session_id, index); None when neither is given."""
    raw = header if header is not None else query
    if raw is None:
        return None
    point = parse_event_id(raw)
    if point is None:
        raise BadRequest(f"malformed Last-Event-ID {raw[:200]!r}: expected <session_id>:<index>", param="Last-Event-ID")
    return point


def to_text(content: str | list[Any] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content if isinstance(part, TextPart))


@dataclass(frozen=True)
class MediaRef:
    """An image or video part, before anything is fetched or decoded."""

    kind: Literal["image", "video"]
    url: str
    param: str  # where it sits in the request, e.g. messages[1].content[2]


def to_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Wire messages -> the list `apply_chat_template` takes. Text-only content becomes one string; content with
    media stays a list of parts, each media part holding a `MediaRef` under "ref". `developer` -> `system`."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = message.content if isinstance(message.content, list) else []
        if message.role in ("assistant", "tool") or all(isinstance(part, TextPart) for part in parts):
            out.append(to_template_text_message(message, role, i))
            continue
        content: list[dict[str, Any]] = []
        for j, part in enumerate(parts):
            param = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise BadRequest(f"{part.type} parts are only allowed in user messages", param=param)
            if isinstance(part, ImagePart):
                content.append({"type": "image", "ref": MediaRef("image", part.image_url.url, param)})
            else:
                content.append({"type": "video", "ref": MediaRef("video", part.video_url.url, param)})
        out.append({"role": role, "content": content})
    return out


def to_template_text_message(message: ChatMessage, role: str, index: int) -> dict[str, Any]:
    """A message whose content is text (parts flattened: the Qwen3 template renders list content as empty). An
    assistant's calls go in as templates take them, their arguments parsed (templates write them with `tojson`);
    a tool result keeps the id of the call it answers."""
    parts = message.content if isinstance(message.content, list) else []
    if any(not isinstance(part, TextPart) for part in parts):
        raise BadRequest(f"{message.role} messages take text parts only", param=f"messages[{index}].content")
    out: dict[str, Any] = {"role": role, "content": to_text(message.content)}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": parse_arguments(call.function.arguments)}}
            for call in message.tool_calls
        ]  # fmt: skip
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def parse_arguments(arguments: str) -> Any:
    """A call's arguments as the template wants them: the JSON object, or the text as it is if it is not one."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def media_refs(messages: list[dict[str, Any]]) -> list[MediaRef]:
    return [part["ref"] for m in messages if isinstance(m["content"], list) for part in m["content"] if "ref" in part]


def check_media_count(refs: list[MediaRef], max_images: int) -> None:
    images = [ref for ref in refs if ref.kind == "image"]
    if len(images) > max_images:
        raise BadRequest(
            f"too many images: {len(images)} (at most {max_images} per request)", param=images[max_images].param
        )


ANY_JSON_OBJECT = '{"type":"object"}'


SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def close_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists `properties` and says nothing
    about others. Deliberate: what xgrammar's strict mode (vLLM's default) does, and what OpenAI's strict mode
    requires: an answer (or a call's arguments) holds the properties asked for, not more; a small model otherwise
    goes on inventing keys until max_tokens. An object schema without `properties` stays open."""
    if not isinstance(schema, dict):
        return schema
    out = {key: close_objects(value) if key in ("items", "additionalProperties", "not", "if", "then", "else")
           else value for key, value in schema.items()}  # fmt: skip
    for key in SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [close_objects(item) for item in schema[key]]
    for key in SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: close_objects(item) for name, item in schema[key].items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def to_constraint(response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None, max_bytes: int
                  ) -> ConstraintSpec | None:  # fmt: skip
    """`json_object` is any JSON object; `json_schema` its schema; `text` (or none) no constraint."""
    if isinstance(response_format, JsonObjectFormat):
        return ConstraintSpec(ANY_JSON_OBJECT, "response_format")
    if not isinstance(response_format, JsonSchemaFormat):
        return None
    param = "response_format.json_schema.schema"
    if response_format.json_schema.schema_ is None:
        raise BadRequest(f"{param} is required for a json_schema response format", param=param)
    schema = close_objects(response_format.json_schema.schema_)
    schema_json = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(schema_json.encode()) > max_bytes:
        raise BadRequest(f"{param} is larger than {max_bytes} bytes (MAX_SCHEMA_BYTES)", param=param)
    return ConstraintSpec(schema_json, param)


def to_template_tools(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the chat template shows the model (none for `tool_choice: "none"`: then no call can come), after
    checking names are unique and a named choice names one of them."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return None
    names = [tool.function.name for tool in request.tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise BadRequest(f"tools[{i}].function.name: {name!r} is given twice", param=f"tools[{i}].function.name")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise BadRequest(f"tool_choice.function.name: no tool is named {choice.function.name!r}",
                         param="tool_choice.function.name")  # fmt: skip
    if choice == "none":
        return None
    return [{"type": "function", "function": tool.function.model_dump(exclude_none=True, exclude={"strict"})}
            for tool in request.tools]  # fmt: skip


NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call_schema(function: FunctionSpec, enforce_arguments: bool = True) -> dict[str, Any]:
    arguments = close_objects(function.parameters) if function.parameters is not None else NO_ARGUMENTS
    return {"type": "object", "properties": {"name": {"const": function.name},
            "arguments": arguments if enforce_arguments else {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip


def to_tool_constraint(request: ChatCompletionRequest) -> ConstraintSpec | None:
    """`tool_choice` "required" or a named function, as a grammar: the answer is `<tool_call>` blocks (one, or
    one or more with parallel calls) whose JSON is a call of an allowed function with arguments that validate
    against its `parameters`. Written in the Qwen3/Hermes format, the one the parser reads. With `auto` and a
    `strict` tool, free text may come first and the calls are optional, but a call's name is one of the tools and
    a strict tool's arguments validate."""
    choice, tools = request.tool_choice, request.tools or []
    several = request.parallel_tool_calls is not False
    if choice == "required":
        allowed, kind = [tool.function for tool in tools], "tool_calls" if several else "tool_call"
    elif isinstance(choice, NamedToolChoice):
        allowed, kind = [tool.function for tool in tools if tool.function.name == choice.function.name], "tool_call"
    elif choice in (None, "auto") and any(tool.function.strict for tool in tools):
        allowed, kind = [tool.function for tool in tools], "auto_tool_calls" if several else "auto_tool_call"
    else:
        return None
    schemas = [tool_call_schema(f, enforce_arguments=f.strict or not kind.startswith("auto")) for f in allowed]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = json.dumps({"x-guidance": GRAMMAR_LAYOUT, **schema}, ensure_ascii=False)
    return ConstraintSpec(body, "tools", kind=kind)  # type: ignore[arg-type]


RESERVED_TEMPLATE_KWARGS = {"tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
                            "return_dict", "return_tensors", "chat_template", "padding", "truncation", "max_length",
                            "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"}  # fmt: skip


def to_template_kwargs(request: ChatCompletionRequest) -> dict[str, Any]:
    """`chat_template_kwargs` as the template's own variables (`enable_thinking`, ...); the names the server sets
    itself are refused rather than let a request change how the prompt is built."""
    kwargs = request.chat_template_kwargs or {}
    for name in kwargs:
        if name in RESERVED_TEMPLATE_KWARGS:
            raise BadRequest(f"chat_template_kwargs.{name} is set by the server", param=f"chat_template_kwargs.{name}")
    return dict(kwargs)


def check_tool_messages(messages: list[ChatMessage]) -> None:
    """A tool message must answer a call an earlier assistant message made (as the OpenAI API checks)."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        called.update(call.id for call in message.tool_calls or [])
        if message.role == "tool" and message.tool_call_id not in called:
            raise BadRequest(f"messages[{i}].tool_call_id: {message.tool_call_id!r} answers no earlier tool call",
                             param=f"messages[{i}].tool_call_id")  # fmt: skip


LOGIT_BIAS_KEY = re.compile(r"\d{1,9}")


def to_logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """`{"1234": -100}` -> ((1234, -100.0),); keys must be token ids and values within -100..100 (the ids are
    checked against the vocabulary once the model is known: `check_logit_bias`)."""
    out: list[tuple[int, float]] = []
    for key, value in (bias or {}).items():
        if not LOGIT_BIAS_KEY.fullmatch(key):
            raise BadRequest(f"logit_bias keys must be token ids, got {key[:40]!r}", param="logit_bias")
        if not -100 <= value <= 100:
            raise BadRequest(f"logit_bias[{key}] must be between -100 and 100, got {value}", param="logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def check_logit_bias(bias: tuple[tuple[int, float], ...], vocab: int) -> None:
    for token, _ in bias:
        if token >= vocab:
            raise BadRequest(f"logit_bias: token id {token} is not in the vocabulary (0-{vocab - 1})",
                             param="logit_bias")  # fmt: skip


def to_sampling_params(request: SamplingFields, max_new_tokens: int, settings: Settings) -> GenerationParams:
    """The fields chat and legacy completions share, checked (400 naming the field)."""
    limit = min(settings.max_n, settings.max_batch_size)
    if (request.n or 1) > limit:
        raise BadRequest(f"n must be at most {limit} on this server (MAX_N, MAX_BATCH_SIZE)", param="n")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4:
        raise BadRequest("at most 4 stop sequences are allowed", param="stop")
    temperature = settings.temperature if request.temperature is None else request.temperature
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(s for s in stop if s),
        n=request.n or 1,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        logit_bias=to_logit_bias(request.logit_bias),
        top_k=None if request.top_k is None else max(request.top_k, 0),
        min_p=request.min_p or 0.0,
        min_tokens=request.min_tokens or 0,
        ignore_eos=bool(request.ignore_eos),
    )


def to_generation_params(request: ChatCompletionRequest, settings: Settings) -> GenerationParams:
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    max_new_tokens = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    return replace(
        to_sampling_params(request, max_new_tokens, settings),
        asked_max_tokens=bool(request.max_completion_tokens or request.max_tokens),
        constraint=to_tool_constraint(request) or to_constraint(request.response_format, settings.max_schema_bytes),
        parallel_tool_calls=request.parallel_tool_calls is not False,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )


MAX_COMPLETION_PROMPTS = 64  # prompts in one legacy request (each with its n choices)


def to_completion_params(request: CompletionRequest, settings: Settings) -> GenerationParams:
    """The legacy endpoint's fields; those it cannot honour are refused, never ignored."""
    if request.suffix:
        raise BadRequest("suffix is not supported (no insertion on this server)", param="suffix")
    if (request.best_of or 1) > 1:
        raise BadRequest("best_of above 1 is not supported; ask for n choices instead", param="best_of")
    if request.max_tokens == 0 and not request.echo:
        raise BadRequest("max_tokens 0 only makes sense with echo (to score the prompt)", param="max_tokens")
    max_new_tokens = settings.max_tokens if request.max_tokens is None else request.max_tokens
    return replace(to_sampling_params(request, max_new_tokens, settings), logprobs=request.logprobs,
                   asked_max_tokens=request.max_tokens is not None,
                   prompt_logprobs=bool(request.echo) and request.logprobs is not None,
                   score_end_token=request.logprobs is not None)  # fmt: skip


def to_prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A string, strings, token ids, or lists of token ids -> one entry per prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [cast(list[int], prompt)]
    prompts = cast(list[str | list[int]], prompt)
    if not prompts or any(not p for p in prompts):
        raise BadRequest("prompt must not be empty", param="prompt")
    if len(prompts) > MAX_COMPLETION_PROMPTS:
        raise BadRequest(f"at most {MAX_COMPLETION_PROMPTS} prompts per request", param="prompt")
    return prompts


def to_chat_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """Input items as chat messages (what the chat path validates and templates): function calls become an
    assistant's tool_calls, their outputs tool messages, echoed output text an assistant message."""
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    messages: list[dict[str, Any]] = []
    for item in request.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": to_chat_content(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return messages


def to_chat_content(content: str | list[InputText | InputImage]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part.text} if isinstance(part, InputText)
            else {"type": "image_url", "image_url": {"url": part.image_url}} for part in content]  # fmt: skip


def to_chat_request(request: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request a Responses request means: `instructions` as the system message (never carried over),
    the conversation so far (`previous_response_id`), then the input; tools, tool_choice and `text.format`
    unflattened. Validated as any chat request, so the same 400s apply."""
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    body: dict[str, Any] = {"messages": system + history + to_chat_messages(request)}
    if request.tools:
        body["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                         for tool in request.tools]  # fmt: skip
    if isinstance(request.tool_choice, FlatNamedToolChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    elif request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    text_format = request.text.format if request.text is not None else None
    if isinstance(text_format, FlatJsonSchemaFormat):
        spec = text_format.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif text_format is not None:
        body["response_format"] = {"type": text_format.type}
    fields = {"parallel_tool_calls": request.parallel_tool_calls, "temperature": request.temperature,
              "top_p": request.top_p, "max_completion_tokens": request.max_output_tokens,
              "chat_template_kwargs": request.chat_template_kwargs}  # fmt: skip
    if request.wants_logprobs:
        fields |= {"logprobs": True, "top_logprobs": request.top_logprobs or 0}
    body.update({key: value for key, value in fields.items() if value is not None})
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise describe_validation_error(exc.errors()) from exc


def to_input_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """A request's input as the API lists it back: items with ids, a string as one user message."""
    if isinstance(request.input, str):
        items: list[dict[str, Any]] = [{"type": "message", "role": "user",
                                        "content": [{"type": "input_text", "text": request.input}]}]  # fmt: skip
    else:
        items = [item.model_dump(exclude_none=True) for item in request.input]
    for item in items:
        if isinstance(item.get("content"), str):
            item["content"] = [{"type": "input_text", "text": item["content"]}]
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(item["type"], "item")
        item.setdefault("id", f"{prefix}_{secrets.token_hex(12)}")
        if item["type"] != "reasoning":
            item.setdefault("status", "completed")
    return items


# ==== 6. Output parsing =============================================================================================
# Stop strings, logprob alignment, and the incremental tool-call / reasoning parser.


class LogprobAligner:
    """Hands out scored tokens with the text they made: a token goes out with the chunk that carries its first
    byte. Stop strings hold text back and cut it; the tokens of the text they cut are dropped (`rest`)."""

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[int, TokenScore]] = collections.deque()  # (its first byte, it)
        self.queued = 0  # bytes of the tokens queued so far
        self.sent = 0  # bytes of the text sent so far

    def push(self, scores: Sequence[TokenScore]) -> None:
        for score in scores:
            self.queue.append((self.queued, score))
            self.queued += len(score.raw)

    def take(self, text: str) -> list[TokenScore]:
        self.sent += len(text.encode())
        out: list[TokenScore] = []
        while self.queue and (self.queue[0][0] < self.sent or (self.queue[0][0] == self.sent
                                                                and not self.queue[0][1].raw)):  # fmt: skip
            out.append(self.queue.popleft()[1])
        return out

    def rest(self, cut: bool) -> list[TokenScore]:
        """At the end: the tokens not sent yet, or none where a stop string cut the text they made."""
        out = [] if cut else [score for _, score in self.queue]
        self.queue.clear()
        return out


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        if self.matched:
            return ""
        buffer = self.pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self.pending = True, ""
            return buffer[: min(hits)]
        hold = max((n for s in self.stops for n in range(1, len(s)) if buffer.endswith(s[:n])), default=0)
        self.pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


# -- the model's output -> content, reasoning and tool calls (an incremental parser: text deltas in, pieces out) --

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


CALL_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class ReasoningPiece:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    call_id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    text: str


OutputPiece = ContentPiece | ReasoningPiece | ToolCallStart | ToolCallArguments


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (what to hold back)."""
    return max((n for n in range(1, len(tag)) if text.endswith(tag[:n])), default=0)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def derived_id(prefix: str, scope: str, n: int) -> str:
    """The n-th id a renderer hands out within `scope` (a completion's choice, a response): unique as its scope
    is, and the same when a restart's replay makes the same events again, so continued chunks name what the
    client already saw."""
    return f"{prefix}_{hashlib.sha256(f'{scope}:{n}'.encode()).hexdigest()[:24]}"


def id_sequence(prefix: str, scope: str) -> Callable[[], str]:
    counter = itertools.count()
    return lambda: derived_id(prefix, scope, next(counter))


class OutputParser:
    """Splits a model's text, delta by delta, into content, reasoning (`<think>...</think>`) and tool calls
    (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`). It holds back what may be the start of a tag, so no
    tag text ever reaches `content`; a call's name is sent once, then its arguments as they are written. A block
    that is not a call (no `"name"` then `"arguments"`) is content, tags and all. With tools, whitespace around calls
    is held back and dropped, as the model writes it only to separate them."""

    def __init__(self, output: OutputFormat, call_id: Callable[[], str] = new_call_id) -> None:
        self.output, self.call_id = output, call_id
        self.state = {"off": "content", "open": "reasoning", "maybe": "start"}[output.reasoning]
        self.buffer = ""
        self.calls = 0  # calls started
        self.arguments = ""  # the current call's arguments sent so far
        self.done = False  # parallel_tool_calls false and one call is complete: the rest is dropped
        self.strip_leading = output.reasoning == "open"  # whitespace after <think>, </think> and a call is dropped

    def feed(self, text: str) -> list[OutputPiece]:
        self.buffer += text
        pieces: list[OutputPiece] = []
        while not self.done and self._step(pieces):
            pass
        return pieces

    def _step(self, pieces: list[OutputPiece]) -> bool:
        """Consumes what it can of the buffer in the current state; True when the state changed (go again)."""
        if self.state == "start":
            return self._start()
        if self.state == "reasoning":
            return self._reasoning(pieces)
        if self.state == "content":
            return self._content(pieces)
        if self.state == "header":
            return self._header(pieces)
        return self._arguments(pieces)

    def _start(self) -> bool:
        stripped = self.buffer.lstrip()
        if stripped.startswith(THINK_OPEN):
            self.state, self.buffer, self.strip_leading = "reasoning", stripped[len(THINK_OPEN) :], True
            return True
        if stripped and not THINK_OPEN.startswith(stripped):
            self.state = "content"
            return True
        return False  # nothing yet, or a start of "<think>": wait

    def _reasoning(self, pieces: list[OutputPiece]) -> bool:
        if self._stripping_leading():
            return False
        end = self.buffer.find(THINK_CLOSE)
        if end < 0:  # hold back a start of the tag, and the whitespace before it (dropped before the tag)
            cut = len(self.buffer[: len(self.buffer) - partial_suffix(self.buffer, THINK_CLOSE)].rstrip())
            self._emit(pieces, ReasoningPiece, self.buffer[:cut])
            self.buffer = self.buffer[cut:]
            return False
        self._emit(pieces, ReasoningPiece, self.buffer[:end].rstrip())
        self.state, self.buffer, self.strip_leading = "content", self.buffer[end + len(THINK_CLOSE) :], True
        return True

    def _content(self, pieces: list[OutputPiece]) -> bool:
        if self._stripping_leading():
            return False
        if not self.output.tool_calls:
            self._emit(pieces, ContentPiece, self.buffer)
            self.buffer = ""
            return False
        start = self.buffer.find(TOOL_CALL_OPEN)
        if start >= 0:
            self._emit_content(pieces, self.buffer[:start].rstrip())
            self.state, self.buffer = "header", self.buffer[start + len(TOOL_CALL_OPEN) :]
            return True
        cut = len(self.buffer[: len(self.buffer) - partial_suffix(self.buffer, TOOL_CALL_OPEN)].rstrip())
        self._emit_content(pieces, self.buffer[:cut])  # held back: a start of the tag and the whitespace before it
        self.buffer = self.buffer[cut:]
        return False

    def _stripping_leading(self) -> bool:
        """Drops leading whitespace while `strip_leading`; True while nothing else has come yet."""
        if self.strip_leading:
            self.buffer = self.buffer.lstrip()
            self.strip_leading = not self.buffer
        return self.strip_leading

    def _emit_content(self, pieces: list[OutputPiece], text: str) -> None:
        if not (self.calls and not text.strip()):  # deliberate: the whitespace between calls is dropped
            self._emit(pieces, ContentPiece, text)

    def _header(self, pieces: list[OutputPiece]) -> bool:
        match = CALL_HEADER.match(self.buffer)
        if match is not None:
            try:
                name = json.loads(f'"{match.group(1)}"')
            except json.JSONDecodeError:
                name = match.group(1)
            pieces.append(ToolCallStart(self.calls, self.call_id(), name))
            self.calls += 1
            self.state, self.buffer, self.arguments = "arguments", self.buffer[match.end() :], ""
            return True
        end = self.buffer.find(TOOL_CALL_CLOSE)
        if end >= 0:  # a block that is not a call: it is content, as written
            block = self.buffer[: end + len(TOOL_CALL_CLOSE)]
            self.buffer = self.buffer[len(block) :]
            self.state = "content"
            self._emit(pieces, ContentPiece, TOOL_CALL_OPEN + block)
            return True
        return False

    def _arguments(self, pieces: list[OutputPiece]) -> bool:
        if not self.arguments:
            self.buffer = self.buffer.lstrip()  # the space after `"arguments":` may come in a later delta
        end = self.buffer.find(TOOL_CALL_CLOSE)
        if end >= 0:
            self._send_arguments(pieces, self._without_outer_brace(self.buffer[:end]))
            self.state, self.buffer = "content", self.buffer[end + len(TOOL_CALL_CLOSE) :]
            self.done, self.strip_leading = not self.output.parallel_tool_calls, True
            return True
        brace = self.buffer.rfind("}")  # the call's own closing brace may be the last one: hold it back
        if brace >= 0 and TOOL_CALL_CLOSE.startswith(self.buffer[brace + 1 :].lstrip()):
            self._send_arguments(pieces, self.buffer[:brace])
            self.buffer = self.buffer[brace:]
        else:
            self._send_arguments(pieces, self.buffer)
            self.buffer = ""
        return False

    def _without_outer_brace(self, text: str) -> str:
        text = text.rstrip()
        return text[:-1] if text.endswith("}") else text

    def _send_arguments(self, pieces: list[OutputPiece], text: str) -> None:
        if text:
            self.arguments += text
            pieces.append(ToolCallArguments(self.calls - 1, text))

    def _emit(self, pieces: list[OutputPiece], kind: type[ContentPiece] | type[ReasoningPiece], text: str) -> None:
        if text:
            pieces.append(kind(text))

    def flush(self) -> list[OutputPiece]:
        """What is held back at the end of the generation: a partial tag is text after all; an unfinished call
        keeps the arguments written (without the call's closing brace, when the rest is whole JSON)."""
        pieces: list[OutputPiece] = []
        text, self.buffer = self.buffer, ""
        if self.done or not text:
            return pieces
        if self.state in ("start", "content"):
            self._emit_content(pieces, text.rstrip() if self.output.tool_calls else text)
        elif self.state == "reasoning":
            self._emit(pieces, ReasoningPiece, text)
        elif self.state == "header":
            self._emit(pieces, ContentPiece, TOOL_CALL_OPEN + text)
        else:
            whole = self.arguments + self._without_outer_brace(text)
            self._send_arguments(pieces, self._without_outer_brace(text) if is_json(whole) else text)
        return pieces


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# ==== 7. Renderers ==================================================================================================
# Engine output -> each API's events (a Renderer per API), SSE bytes, the JSON folds; one
# WireProtocol table per API.


SSE_LINE_END = "\n"  # deliberate: sse-starlette's default is CRLF; clients and tests rely on LF framing


KEEPALIVE_LINE = b": keep-alive\n"  # deliberate: no blank line after it (see KeepaliveComment)


def make_interrupted_error() -> dict[str, Any]:
    return make_error(
        "the generation was interrupted: the server stopped before it finished", "server_error", None, "interrupted"
    )


def make_store_failed_error() -> dict[str, Any]:
    return make_error("the generation was interrupted: the session store (Redis) stopped answering", "server_error",
                      None, "session_store_unavailable")  # fmt: skip


def make_events_lost_error(lost_from: int) -> dict[str, Any]:
    return make_error(
        f"events from index {lost_from} on are lost: the session journal failed while this generation ran (a full "
        "disk?) and the server restarted before it finished", "server_error", None, "events_lost",
    )  # fmt: skip


def events_lost_tail(lost_from: int) -> list[str]:
    """What a replay of a session whose journal failed part-way ends with, sent without event ids: those indices
    were handed out as content before the restart and are not in the journal."""
    return [json.dumps(make_events_lost_error(lost_from)), DONE]


def interrupted_tail() -> list[str]:
    """The last events of a generation the server left behind, whether it shut down or crashed."""
    return [json.dumps(make_interrupted_error()), DONE]


def make_sse_event(data: str, event_id: str | None = None, event: str | None = None) -> ServerSentEvent:
    """One SSE event, framed by sse-starlette: `id:` line, `event:` line (Responses streams), one `data:` line per
    line of data, blank line."""
    return ServerSentEvent(data, id=event_id, event=event, sep=SSE_LINE_END)


class KeepaliveComment(ServerSentEvent):
    """The keep-alive: one comment line and no blank line after it, so it travels with the next event. Bytes keep
    proxies from timing out a long prefill, and no client dispatches anything. Deliberate: a blank line after the
    comment (sse-starlette's ping) makes openai-python, which never resets the last event id as the SSE spec says,
    dispatch an empty event and fail parsing it as JSON on every stream that outlives one interval."""

    def encode(self) -> bytes:
        return KEEPALIVE_LINE


def make_keepalive() -> ServerSentEvent:
    return KeepaliveComment(sep=SSE_LINE_END)


def encode_sse(data: str, event_id: str | None = None, event: str | None = None) -> bytes:
    """The exact bytes of one event on the wire."""
    return make_sse_event(data, event_id, event).encode()


def to_wire_finish_reason(reason: str) -> WireFinishReason:
    """The spec has no "cancelled": a cancelled generation stopped where it was asked to, so it says "stop";
    the session's state ("cancelled", GET /v1/sessions/{id}) keeps the fact visible."""
    return "length" if reason == "length" else "tool_calls" if reason == "tool_calls" else "stop"


def make_chunk(
    meta: StreamMeta, content: str | None = None, *, role: bool = False, finish_reason: str | None = None,
    index: int = 0, logprobs: Sequence[TokenScore] = (),
) -> ChatCompletionChunk:  # fmt: skip
    delta = ChunkDelta(role="assistant" if role else None, content=content)
    return make_delta_chunk(meta, delta, finish_reason, index, logprobs)


def make_delta_chunk(
    meta: StreamMeta, delta: ChunkDelta, finish_reason: str | None = None, index: int = 0,
    logprobs: Sequence[TokenScore] = (),
) -> ChatCompletionChunk:  # fmt: skip
    finish = None if finish_reason is None else to_wire_finish_reason(finish_reason)
    choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=to_choice_logprobs(logprobs))
    return ChatCompletionChunk(id=meta.completion_id, created=meta.created, model=meta.model, choices=[choice])


def to_top_logprob(text: str, logprob: float, raw: bytes) -> TopLogprob:
    return TopLogprob(token=text, logprob=logprob, bytes=list(raw))


def to_token_logprobs(scores: Sequence[TokenScore]) -> list[TokenLogprob]:
    """Scored tokens as the entries chat's `logprobs.content` and a Responses `output_text` part list."""
    return [TokenLogprob(token=s.token, logprob=s.logprob if s.logprob is not None else 0.0, bytes=list(s.raw),
                         top_logprobs=[to_top_logprob(*top) for top in s.top]) for s in scores]  # fmt: skip


def to_choice_logprobs(scores: Sequence[TokenScore]) -> ChoiceLogprobs | None:
    """Scored tokens as chat's `logprobs`; None (the field's null) when there are none."""
    return ChoiceLogprobs(content=to_token_logprobs(scores)) if scores else None


class ContentChunks:
    """The content chunks of one completion, the per-token hot path: the bytes of
    `make_chunk(meta, text).model_dump_json()` (a test holds them equal over a table of texts), built by joining a
    prefix and suffix made once with the text's JSON. Deliberate: on 2 CPU cores every microsecond the event loop
    spends per token is taken from the model's threads (measured: ~17 us to build and dump the model per chunk,
    against ~2 us for this)."""

    def __init__(self, meta: StreamMeta, index: int = 0) -> None:
        marker = "\u0000marker\u0000"
        head, _, tail = make_chunk(meta, marker, index=index).model_dump_json().partition(json.dumps(marker))
        self.prefix, self.suffix = head, tail

    def encode(self, text: str) -> str:
        return self.prefix + json.dumps(text, ensure_ascii=False) + self.suffix


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """`prompt_tokens_details.cached_tokens` only when the prefix cache served some (as OpenAI omits it)."""
    details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens else None
    total = prompt_tokens + completion_tokens
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total,
                 prompt_tokens_details=details)  # fmt: skip


def make_usage_chunk(meta: StreamMeta, usage: Usage) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=meta.completion_id, created=meta.created, model=meta.model, choices=[], usage=usage)


@dataclass
class ChoiceText:
    """One choice of a completion as the stream's deltas build it (the JSON answer's fold)."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    calls: dict[int, dict[str, str]] = field(default_factory=dict)  # index -> id, name, arguments, joined
    logprobs: list[dict[str, Any]] | None = None  # the chat entries, as streamed

    def tool_calls(self) -> list[ResponseToolCall]:
        return [ResponseToolCall(id=c["id"], function=ResponseFunctionCall(name=c["name"], arguments=c["arguments"]))
                for _, c in sorted(self.calls.items())]  # fmt: skip


def make_choice(index: int, choice: ChoiceText) -> Choice:
    """With calls, `content` is the text before them, or null when there is none (as the API answers)."""
    finish = None if choice.finish_reason is None else to_wire_finish_reason(choice.finish_reason)
    tool_calls, reasoning = choice.tool_calls(), choice.reasoning
    message = ResponseMessage(content=choice.text or (None if tool_calls else choice.text),
                              tool_calls=tool_calls or None, reasoning_content=reasoning or None,
                              reasoning=reasoning or None)  # fmt: skip
    logprobs = None if choice.logprobs is None else ChoiceLogprobs.model_validate({"content": choice.logprobs})
    return Choice(index=index, message=message, finish_reason=finish, logprobs=logprobs)


def make_completion(
    meta: StreamMeta, text: str, finish_reason: str | None, usage: Usage | None, reasoning: str = "",
    tool_calls: list[ResponseToolCall] | None = None,
) -> ChatCompletion:  # fmt: skip
    calls = {i: {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for i, c in enumerate(tool_calls or [])}  # fmt: skip
    choice = make_choice(0, ChoiceText(text, reasoning, finish_reason, calls))
    return ChatCompletion(id=meta.completion_id, created=meta.created, model=meta.model, choices=[choice], usage=usage)


class StreamFailed(APIError):
    """Raised by the JSON fold when the stream ended with an error event."""

    def __init__(self, message: str, type_: str, code: str | None) -> None:
        super().__init__(message, code=code)
        self.type = type_
        self.status = 503 if type_ == ModelNotReady.type else 500


def stream_payloads(event_data: list[str]) -> Iterator[dict[str, Any]]:
    """A session's chunk payloads up to its end marker; an error event raises it."""
    for data in event_data:
        if data == DONE:
            return
        payload = json.loads(data)
        if "error" in payload:
            error = payload["error"]
            raise StreamFailed(error["message"], error["type"], error.get("code"))
        yield payload


def fold_completion(meta: StreamMeta, event_data: list[str]) -> ChatCompletion:
    """The JSON answer is the fold of the stream's event payloads, choice by choice; an error event raises it."""
    choices: dict[int, ChoiceText] = {}
    usage = None
    for payload in stream_payloads(event_data):
        for chunk in payload["choices"]:
            choice, delta = choices.setdefault(chunk.get("index", 0), ChoiceText()), chunk["delta"]
            choice.text += delta.get("content") or ""
            choice.reasoning += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                entry = choice.calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.get("id") or ""
                entry["name"] += call["function"].get("name") or ""
                entry["arguments"] += call["function"].get("arguments") or ""
            if chunk.get("logprobs"):
                choice.logprobs = (choice.logprobs or []) + chunk["logprobs"]["content"]
            choice.finish_reason = chunk["finish_reason"] or choice.finish_reason
        usage = Usage.model_validate(payload["usage"]) if payload.get("usage") else usage
    answer = [make_choice(i, c) for i, c in sorted(choices.items())]
    return ChatCompletion(id=meta.completion_id, created=meta.created, model=meta.model, choices=answer, usage=usage)


def to_delta(piece: OutputPiece) -> ChunkDelta:
    """A parsed piece as the API streams it: a call's id, type and name only in its first delta (clients join
    every string they see again: the "add_two_numbersadd_two_numbers" bug), then its arguments piece by piece;
    reasoning under both names clients read."""
    if isinstance(piece, ReasoningPiece):
        return ChunkDelta(reasoning_content=piece.text, reasoning=piece.text)
    if isinstance(piece, ToolCallStart):
        function = FunctionCallDelta(name=piece.name, arguments="")
        return ChunkDelta(tool_calls=[ToolCallDelta(index=piece.index, id=piece.call_id, type="function",
                                                    function=function)])  # fmt: skip
    if isinstance(piece, ToolCallArguments):
        return ChunkDelta(
            tool_calls=[ToolCallDelta(index=piece.index, function=FunctionCallDelta(arguments=piece.text))]
        )
    return ChunkDelta(content=piece.text)


class ChatRenderer:
    """Chat completions' renderer, one per choice: the role chunk, then text deltas -> chunk payloads, then the
    finish chunk; the first choice's also closes the stream (the usage chunk). Free text takes `ContentChunks`'
    fast path; with tools or reasoning the text goes through an `OutputParser` first (nothing is parsed for a
    request that has neither). Scored tokens (logprobs) go with the first chunk made from their text, or, when
    the parser holds that text back, with the next one (the finish chunk at the latest)."""

    def __init__(self, meta: StreamMeta, output: OutputFormat, index: int = 0) -> None:
        self.meta, self.index, self.content = meta, index, ContentChunks(meta, index)
        parses = output.tool_calls or output.reasoning != "off"
        self.parser = OutputParser(output, id_sequence("call", f"{meta.completion_id}:{index}")) if parses else None
        self.scores: list[TokenScore] = []  # scored tokens whose text made no chunk yet

    @property
    def calls(self) -> int:
        return self.parser.calls if self.parser is not None else 0

    @property
    def complete(self) -> bool:
        """One call is done and parallel calls are off: what follows is dropped, the model can stop."""
        return self.parser is not None and self.parser.done

    def encode(self, text: str, scores: Sequence[TokenScore] = ()) -> list[str]:
        self.scores.extend(scores)
        if self.parser is None:
            return [self._content(text)] if text or self.scores else []
        return [self._encode(piece) for piece in self.parser.feed(text)] if text else []

    def flush(self) -> list[str]:
        return [self._encode(piece) for piece in self.parser.flush()] if self.parser is not None else []

    def echo(self, scores: Sequence[TokenScore]) -> list[str]:
        return []  # chat has no echo

    def _taken(self) -> list[TokenScore]:
        taken, self.scores = self.scores, []
        return taken

    def _content(self, text: str) -> str:
        if not self.scores:
            return self.content.encode(text)
        return make_chunk(self.meta, text, index=self.index, logprobs=self._taken()).model_dump_json()

    def _encode(self, piece: OutputPiece) -> str:
        if isinstance(piece, ContentPiece):
            return self._content(piece.text)
        return make_delta_chunk(self.meta, to_delta(piece), None, self.index, self._taken()).model_dump_json()

    def start(self) -> list[str]:
        return [make_chunk(self.meta, "", role=True, index=self.index).model_dump_json()]

    def finish(self, finished: Finished) -> list[str]:
        chunk = make_chunk(self.meta, finish_reason=finished.finish_reason, index=self.index, logprobs=self._taken())
        return [chunk.model_dump_json()]

    def close(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> list[str]:
        if not self.meta.include_usage:
            return []
        usage = make_usage(prompt_tokens, completion_tokens, cached_tokens)
        return [make_usage_chunk(self.meta, usage).model_dump_json()]

    def failure(self, error: dict[str, Any]) -> list[str]:
        return [json.dumps(error)]


# -- the Responses API: requests as chat requests, engine output as Responses events, events back as objects --

RESPONSE_TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


EVENT_TYPE_AT = len('{"type":"')  # every Responses event's JSON starts with its type


def to_chat_history(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages they answered with: text, then the calls it made."""
    text = "".join(part.get("text", "") for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]  # fmt: skip
    if not text and not calls:
        return []
    return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]


def make_response_object(response_id: str, created: int, model: str, request: ResponsesRequest) -> dict[str, Any]:
    """The response object as created: what the request asked, no output yet."""
    text_format = request.text.format if request.text is not None and request.text.format is not None else None
    shown_format = text_format.model_dump(exclude_none=True, by_alias=True) if text_format else {"type": "text"}
    tools = [
        {"strict": False, "parameters": None, **tool.model_dump(exclude_none=True)} for tool in request.tools or []
    ]
    return {
        "id": response_id, "object": "response", "created_at": created, "status": "queued",
        "background": bool(request.background), "error": None, "incomplete_details": None,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens, "model": model,
        "output": [], "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id, "store": request.store is not False,
        "temperature": request.temperature, "top_p": request.top_p, "top_logprobs": request.top_logprobs,
        "text": {"format": shown_format},
        "tool_choice": request.tool_choice.model_dump() if isinstance(request.tool_choice, BaseModel)
                       else request.tool_choice or "auto",
        "tools": tools,
        "metadata": request.metadata or {},
    }  # fmt: skip


def compact_json(value: Any) -> str:
    """JSON as the chat chunks are written: compact, non-ASCII as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def make_response_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    details = {"cached_tokens": cached_tokens, "cache_write_tokens": 0}  # deliberate: no billing here: writes are 0
    return {"input_tokens": prompt_tokens, "input_tokens_details": details,
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


class ResponsesRenderer:
    """Engine text -> the Responses API's events, in its order: created, in_progress, then per output item
    added / deltas / done (a message with one output_text part, a function call, a reasoning item), then the
    terminal event with the whole response. `sequence_number` counts from 0 in the order they are made, which is
    the order the runner appends them, so it equals the session index (and `id: <response_id>:<n>`)."""

    def __init__(self, response: dict[str, Any], output: OutputFormat) -> None:
        self.response = response
        self.parser = OutputParser(output, id_sequence("call", response["id"]))
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # the output so far; the last may be open
        self.open: str | None = None  # the type of the open item: "message", "function_call", "reasoning"
        self.text: list[str] = []  # the open message's or reasoning's text, joined when it closes
        self.finished = Finished("stop", 0)  # how the (one) choice ended, for `close`
        self.scores: list[TokenScore] = []  # scored tokens (logprobs asked for) whose text made no event yet

    @property
    def calls(self) -> int:
        return self.parser.calls

    @property
    def complete(self) -> bool:
        return self.parser.done

    def _event(self, type_: str, **fields: Any) -> str:
        event = compact_json({"type": type_, "sequence_number": self.sequence, **fields})  # type first: EVENT_TYPE_AT
        self.sequence += 1
        return event

    def start(self) -> list[str]:
        self.response = {**self.response, "status": "in_progress"}
        return [self._event("response.created", response=self.response),
                self._event("response.in_progress", response=self.response)]  # fmt: skip

    def encode(self, text: str, scores: Sequence[TokenScore] = ()) -> list[str]:
        """Scored tokens go with the next output_text delta; those that made reasoning or a call are dropped
        (the API lists logprobs for output text only)."""
        self.scores.extend(scores)
        return [event for piece in self.parser.feed(text) for event in self._piece(piece)] if text else []

    def echo(self, scores: Sequence[TokenScore]) -> list[str]:
        return []  # the Responses API has no echo

    def flush(self) -> list[str]:
        return [event for piece in self.parser.flush() for event in self._piece(piece)]

    def _piece(self, piece: OutputPiece) -> list[str]:
        index = len(self.items) - 1
        scored, self.scores = self.scores, []
        if isinstance(piece, ToolCallArguments):
            self.items[index]["arguments"] += piece.text
            return [self._event("response.function_call_arguments.delta", item_id=self.items[index]["id"],
                                output_index=index, delta=piece.text)]  # fmt: skip
        kind = {ContentPiece: "message", ReasoningPiece: "reasoning", ToolCallStart: "function_call"}[type(piece)]
        events = [] if self.open == kind and kind != "function_call" else self._close() + self._add(kind, piece)
        index = len(self.items) - 1
        item = self.items[index]
        if isinstance(piece, ContentPiece | ReasoningPiece):
            self.text.append(piece.text)
            is_text = isinstance(piece, ContentPiece)
            logprobs = [entry.model_dump() for entry in to_token_logprobs(scored)] if is_text else None
            if logprobs:
                item["content"][0]["logprobs"] += logprobs
            events.append(self.text_delta(item["id"], index, piece.text, logprobs))
        return events

    def text_delta(self, item_id: str, index: int, text: str, logprobs: list[dict[str, Any]] | None) -> str:
        """An output_text delta event (`logprobs` a list, empty when not asked for) or a reasoning_text one (None),
        the per-token hot path: the bytes `_event` would make (a test holds them equal), without building and
        dumping a dict."""
        sequence, self.sequence = self.sequence, self.sequence + 1
        kind, tail = ("reasoning_text", "}")
        if logprobs is not None:
            kind, tail = "output_text", f',"logprobs":{compact_json(logprobs)}}}'
        delta = json.dumps(text, ensure_ascii=False)
        return (f'{{"type":"response.{kind}.delta","sequence_number":{sequence},"item_id":"{item_id}",'
                f'"output_index":{index},"content_index":0,"delta":{delta}{tail}')  # fmt: skip

    def _settle_text(self) -> None:
        """Writes the open item's text into it (kept as pieces until then: no quadratic string growth)."""
        if self.open in ("message", "reasoning") and self.items[-1].get("content"):
            self.items[-1]["content"][0]["text"] = "".join(self.text)

    def _add(self, kind: str, piece: OutputPiece) -> list[str]:
        self.text = []
        index = len(self.items)
        item: dict[str, Any]
        if isinstance(piece, ToolCallStart):
            item = {"id": f"fc_{piece.call_id.removeprefix('call_')}", "type": "function_call",
                    "status": "in_progress", "call_id": piece.call_id, "name": piece.name, "arguments": ""}  # fmt: skip
        elif kind == "reasoning":
            item = {"id": derived_id("rs", self.response["id"], index), "type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}]}  # fmt: skip
        else:
            item = {"id": derived_id("msg", self.response["id"], index), "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}  # fmt: skip
        self.items.append(item)
        self.open = kind
        shown = {**item, "content": []} if "content" in item else dict(item)
        events = [self._event("response.output_item.added", output_index=index, item=shown)]
        if kind == "message":
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append({**part, "logprobs": []})
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part=part))  # fmt: skip
        return events

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        index, item, kind = len(self.items) - 1, self.items[-1], self.open
        self._settle_text()
        self.open = None
        events = []
        if kind == "message":
            part = item["content"][0]
            events.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=part["text"], logprobs=part["logprobs"]))  # fmt: skip
            events.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                      content_index=0, part=part))  # fmt: skip
        elif kind == "reasoning":
            events.append(self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=item["content"][0]["text"]))  # fmt: skip
        else:
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=item["name"], arguments=item["arguments"]))  # fmt: skip
        if "status" in item:
            item["status"] = "completed"
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def finish(self, finished: Finished) -> list[str]:
        """The open item's done events; the terminal event waits for `close`."""
        self.finished = finished
        return self._close()

    def close(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> list[str]:
        """The terminal event: completed; incomplete at max_output_tokens; a cancel ends `cancelled` (the API has
        no event of its own for it: `response.incomplete` carries it)."""
        events, finished = self._close(), self.finished
        usage = make_response_usage(prompt_tokens, completion_tokens, cached_tokens)
        done = {**self.response, "output": self.items, "usage": usage}
        if finished.finish_reason == "length":
            done |= {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
            return [*events, self._event("response.incomplete", response=done)]
        if finished.finish_reason == "cancelled":
            return [*events, self._event("response.incomplete", response=done | {"status": "cancelled"})]
        done |= {"status": "completed", "completed_at": int(time.time())}
        return [*events, self._event("response.completed", response=done)]

    def failure(self, error: dict[str, Any]) -> list[str]:
        self._settle_text()
        detail = error["error"]
        failed = {**self.response, "output": self.items, "status": "failed",
                  "error": {"code": detail.get("code") or "server_error", "message": detail["message"]}}  # fmt: skip
        return [self._event("response.failed", response=failed)]


# -- the legacy completions: text chunks, logprobs as parallel lists --


def make_text_chunk(
    meta: StreamMeta, index: int, text: str = "", finish_reason: str | None = None,
    logprobs: LegacyLogprobs | None = None,
) -> TextCompletion:  # fmt: skip
    finish = None if finish_reason is None else to_wire_finish_reason(finish_reason)
    choice = TextChoice(text=text, index=index, logprobs=logprobs, finish_reason=finish)
    return TextCompletion(id=meta.completion_id, created=meta.created, model=meta.model, choices=[choice])


class CompletionsRenderer:
    """The legacy endpoint's renderer, one per choice: (echo) the prompt's text, then text chunks, then the finish
    chunk; the first choice's also writes the usage chunk. Scored tokens become the legacy lists, `text_offset`
    counting characters from the start of the choice's text (its echoed prompt included)."""

    def __init__(self, meta: StreamMeta, index: int) -> None:
        self.meta, self.index = meta, index
        self.echo_text = json.loads(meta.echo_json)[index] if meta.echo_json else None
        self.chars = codecs.getincrementaldecoder("utf-8")(errors="replace")  # bytes so far -> characters so far
        self.offset = 0

    calls, complete = 0, False  # no tools on this endpoint

    def start(self) -> list[str]:
        if self.echo_text is None:
            return []
        self.offset += len(self.echo_text)
        return [make_text_chunk(self.meta, self.index, self.echo_text).model_dump_json()]

    def echo(self, scores: Sequence[TokenScore]) -> list[str]:
        """The prompt's tokens, scored (echo with logprobs); their text went out first, at `start`."""
        self.offset = 0
        return [make_text_chunk(self.meta, self.index, "", logprobs=self.legacy(scores)).model_dump_json()]

    def legacy(self, scores: Sequence[TokenScore]) -> LegacyLogprobs | None:
        if not scores:
            return None
        offsets = []
        for score in scores:
            offsets.append(self.offset)
            self.offset += len(self.chars.decode(score.raw))
        return LegacyLogprobs(tokens=[s.token for s in scores], token_logprobs=[s.logprob for s in scores],
                              top_logprobs=[None if s.logprob is None else {t: lp for t, lp, _ in s.top}
                                            for s in scores], text_offset=offsets)  # fmt: skip

    def encode(self, text: str, scores: Sequence[TokenScore] = ()) -> list[str]:
        if not text and not scores:
            return []
        return [make_text_chunk(self.meta, self.index, text, logprobs=self.legacy(scores)).model_dump_json()]

    def flush(self) -> list[str]:
        return []

    def finish(self, finished: Finished) -> list[str]:
        return [make_text_chunk(self.meta, self.index, finish_reason=finished.finish_reason).model_dump_json()]

    def close(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> list[str]:
        if not self.meta.include_usage:
            return []
        usage = make_usage(prompt_tokens, completion_tokens, cached_tokens)
        chunk = TextCompletion(id=self.meta.completion_id, created=self.meta.created, model=self.meta.model,
                               choices=[], usage=usage)  # fmt: skip
        return [chunk.model_dump_json()]

    def failure(self, error: dict[str, Any]) -> list[str]:
        return [json.dumps(error)]


def fold_text_completion(meta: StreamMeta, event_data: list[str]) -> TextCompletion:
    """The legacy JSON answer: the stream's chunks joined choice by choice, their logprob lists concatenated."""
    choices: dict[int, TextChoice] = {}
    usage = None
    for payload in stream_payloads(event_data):
        for chunk in payload["choices"]:
            choice = choices.setdefault(chunk["index"], TextChoice(text="", index=chunk["index"], finish_reason=None))
            choice.text += chunk["text"]
            choice.finish_reason = chunk["finish_reason"] or choice.finish_reason
            if chunk.get("logprobs"):
                add = LegacyLogprobs.model_validate(chunk["logprobs"])
                have = choice.logprobs or LegacyLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
                choice.logprobs = LegacyLogprobs(
                    tokens=have.tokens + add.tokens, token_logprobs=have.token_logprobs + add.token_logprobs,
                    top_logprobs=have.top_logprobs + add.top_logprobs, text_offset=have.text_offset + add.text_offset,
                )  # fmt: skip
        usage = Usage.model_validate(payload["usage"]) if payload.get("usage") else usage
    return TextCompletion(id=meta.completion_id, created=meta.created, model=meta.model,
                          choices=[choices[i] for i in sorted(choices)], usage=usage)  # fmt: skip


def to_responses_sse(data: str, index: int) -> tuple[str, str] | None:
    """A session event as the Responses stream sends it, (event type, JSON); None for the session's end marker
    (the stream ends at its terminal event, without [DONE]). The session's own error events (an interrupted
    generation, a lost journal tail: chat-shaped) become the API's `error` event."""
    if data == DONE:
        return None
    if data.startswith('{"error"'):
        error = json.loads(data)["error"]
        event = {"type": "error", "code": error.get("code") or error.get("type"), "message": error["message"],
                 "param": error.get("param"), "sequence_number": index}  # fmt: skip
        return "error", json.dumps(event)
    return data[EVENT_TYPE_AT : data.index('"', EVENT_TYPE_AT)], data


def fold_response(response: dict[str, Any], event_data: list[str]) -> dict[str, Any]:
    """The response object now, from its events: the terminal event's, or the one created with the items so far
    (those done, and the open one as written), status in_progress; an error event makes it failed."""
    items: dict[int, dict[str, Any]] = {}
    for data in event_data:
        if data == DONE:
            break
        event = json.loads(data)
        kind = event.get("type")
        if kind in RESPONSE_TERMINAL_EVENTS:
            return dict(event["response"])
        if kind in ("response.created", "response.in_progress"):
            response = event["response"]
        elif kind in ("response.output_item.added", "response.output_item.done"):
            items[event["output_index"]] = copy.deepcopy(event["item"])
        elif kind == "response.content_part.added":
            items[event["output_index"]].setdefault("content", []).append(dict(event["part"]))
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            item = items[event["output_index"]]
            if not item.get("content"):
                item["content"] = [{"type": "reasoning_text", "text": ""}]
            item["content"][event["content_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            items[event["output_index"]]["arguments"] += event["delta"]
        elif "error" in event:
            error = event["error"]
            return {**response, "output": [items[i] for i in sorted(items)], "status": "failed",
                    "error": {"code": error.get("code") or "server_error", "message": error["message"]}}  # fmt: skip
    return {**response, "output": [items[i] for i in sorted(items)]}


# -- one table per wire protocol: nothing else switches on `StreamMeta.protocol` --


class Renderer(Protocol):
    """How one choice's engine output is written for one API, as session events (JSON strings, in order):
    `start`, then `encode` per text delta (with its scored tokens), `flush` of what a parser held back,
    `finish` (the choice's end), and on the first choice `close` (usage, the terminal event) or `failure`."""

    @property
    def calls(self) -> int: ...  # tool calls made so far

    @property
    def complete(self) -> bool: ...  # one call is done and parallel calls are off: the row may stop

    def start(self) -> list[str]: ...
    def encode(self, text: str, scores: Sequence[TokenScore] = ()) -> list[str]: ...
    def echo(self, scores: Sequence[TokenScore]) -> list[str]: ...
    def flush(self) -> list[str]: ...
    def finish(self, finished: Finished) -> list[str]: ...
    def close(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> list[str]: ...
    def failure(self, error: dict[str, Any]) -> list[str]: ...


def encode_chat_sse(session_id: str, data: str, index: int, with_id: bool) -> bytes:
    """Chat and completions chunks as they are, then [DONE]."""
    return encode_sse(data, format_event_id(session_id, index) if with_id else None)


def encode_responses_sse(session_id: str, data: str, index: int, with_id: bool) -> bytes:
    """Responses events with their `event:` line, the session's own error events as the API's `error` event,
    and no [DONE]."""
    translated = to_responses_sse(data, index)
    if translated is None:
        return b""
    return encode_sse(translated[1], format_event_id(session_id, index) if with_id else None, translated[0])


@dataclass(frozen=True)
class WireProtocol:
    """What the sessions of one API differ in."""

    make_renderer: Callable[[StreamMeta, OutputFormat, int], Renderer]  # (meta, output, choice index)
    encode: Callable[[str, str, int, bool], bytes]  # (session id, event, index, with its id) -> SSE bytes
    fold: Callable[[StreamMeta, list[str]], Any]  # a whole session's events -> the JSON answer


WIRE_PROTOCOLS: dict[str, WireProtocol] = {
    "chat": WireProtocol(ChatRenderer, encode_chat_sse, fold_completion),
    "completions": WireProtocol(lambda meta, _output, index: CompletionsRenderer(meta, index), encode_chat_sse,
                                fold_text_completion),
    "responses": WireProtocol(lambda meta, output, _index: ResponsesRenderer(json.loads(meta.response_json), output),
                              encode_responses_sse, lambda meta, data: fold_response(json.loads(meta.response_json),
                                                                                     data)),
}  # fmt: skip


def make_renderer(meta: StreamMeta, output: OutputFormat, index: int = 0) -> Renderer:
    return WIRE_PROTOCOLS[meta.protocol].make_renderer(meta, output, index)


# ==== 8. Media ======================================================================================================
# Fetching and decoding images and videos, bounded. Blocking: runs in the worker thread that
# prepares the prompt.


MEDIA_MAX_REDIRECTS = 3


@dataclass
class DecodedVideo:
    frames: list[Any]  # PIL images, evenly sampled
    fps: float | None
    total_frames: int
    indices: list[int]  # positions of the sampled frames in the whole clip


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise BadRequest("data URLs must be base64: data:<type>;base64,<data>", param=param)
    if len(payload) * 3 // 4 > max_bytes:
        raise BadRequest(f"media is larger than {max_bytes} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise BadRequest("invalid base64 in data URL", param=param) from None


def check_public_host(host: str, param: str) -> None:
    """Refuses hosts that resolve to loopback, private, link-local or reserved addresses (SSRF guard)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        raise BadRequest(f"cannot resolve host {host!r}", param=param) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise BadRequest(
                f"refusing to fetch from {host} ({address}): not a public address "
                "(MEDIA_ALLOW_PRIVATE_HOSTS=1 allows it)",
                param=param,
            )


def fetch_http(url: str, param: str, max_bytes: int, settings: Settings) -> bytes:
    """GET with a timeout, a size cap, and the host re-checked on every redirect."""
    import httpx

    deadline = time.monotonic() + settings.media_fetch_timeout_seconds
    with httpx.Client(timeout=settings.media_fetch_timeout_seconds, follow_redirects=False) as client:
        for _ in range(MEDIA_MAX_REDIRECTS + 1):
            host = urlsplit(url).hostname or ""
            if not settings.media_allow_private_hosts:
                check_public_host(host, param)
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise BadRequest(f"fetching {url} gave HTTP {response.status_code}", param=param)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise BadRequest(f"media at {url} is larger than {max_bytes} bytes", param=param)
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("deadline")
                    return bytes(body)
            except httpx.TimeoutException:
                raise BadRequest(
                    f"fetching {url} timed out after {settings.media_fetch_timeout_seconds:g} s", param=param
                ) from None
            except httpx.HTTPError as exc:
                raise BadRequest(f"fetching {url} failed: {type(exc).__name__}", param=param) from None
    raise BadRequest(f"too many redirects fetching {url}", param=param)


def read_local_file(url: str, param: str, max_bytes: int, media_root: str) -> bytes:
    if not media_root:
        raise BadRequest("local files are not allowed (the server has no MEDIA_ROOT)", param=param)
    root = Path(media_root).resolve()
    raw = url2pathname(urlsplit(url).path) if url.lower().startswith("file:") else url
    path = (root / raw).resolve()  # an absolute `raw` replaces root; either way it must end up under root
    if not path.is_relative_to(root):
        raise BadRequest("local files must be under MEDIA_ROOT", param=param)
    if not path.is_file():
        raise BadRequest(f"no file {raw!r} under MEDIA_ROOT", param=param)
    if path.stat().st_size > max_bytes:
        raise BadRequest(f"media is larger than {max_bytes} bytes", param=param)
    return path.read_bytes()


def read_media_bytes(url: str, param: str, max_bytes: int, settings: Settings) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, param, max_bytes)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_http(url, param, max_bytes, settings)
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive, C:\\...
        return read_local_file(url, param, max_bytes, settings.media_root)
    raise BadRequest(f"unsupported URL scheme {scheme!r}: use data:, http(s): or a file under MEDIA_ROOT", param=param)


def decode_image(data: bytes, param: str, max_pixels: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:  # checked from the header, before any pixel is decoded
                raise BadRequest(f"image is {image.width}x{image.height}, more than {max_pixels} pixels", param=param)
            return image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadRequest(f"image has more than {max_pixels} pixels", param=param) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise BadRequest("the bytes are not an image Pillow can read", param=param) from None


def sample_indices(total: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread evenly over `total` frames, first and last included."""
    if total <= wanted:
        return list(range(total))
    return sorted({round(i * (total - 1) / (wanted - 1)) for i in range(wanted)}) if wanted > 1 else [0]


def decode_video(data: bytes, param: str, max_frames: int, max_pixels: int) -> DecodedVideo:
    """PyAV decode; samples at most `max_frames` frames evenly over the clip."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise BadRequest("the video has no video stream", param=param)
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            total = sum(1 for _ in container.decode(stream))  # deliberate: container frame counts are unreliable
        wanted = set(sample_indices(total, max_frames))
        frames, indices = [], []
        with av.open(io.BytesIO(data), mode="r") as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index in wanted:
                    if frame.width * frame.height > max_pixels:
                        raise BadRequest(f"video frames are larger than {max_pixels} pixels", param=param)
                    frames.append(frame.to_image().convert("RGB"))  # type: ignore[no-untyped-call]
                    indices.append(index)
    except av.FFmpegError:
        raise BadRequest("the bytes are not a video PyAV can decode", param=param) from None
    if not frames:
        raise BadRequest("the video has no decodable frames", param=param)
    return DecodedVideo(frames, fps, total, indices)


def load_media(ref: MediaRef, settings: Settings) -> Any:
    """A `MediaRef` -> a PIL image, or a `DecodedVideo`. Raises BadRequest naming the part."""
    if ref.kind == "image":
        data = read_media_bytes(ref.url, ref.param, settings.max_image_bytes, settings)
        return decode_image(data, ref.param, settings.max_image_pixels)
    data = read_media_bytes(ref.url, ref.param, settings.max_video_bytes, settings)
    return decode_video(data, ref.param, settings.max_video_frames, settings.max_image_pixels)


# ==== 9. Constraints ================================================================================================
# Structured outputs and forced tool calls: a JSON Schema (or `<tool_call>` blocks around one) compiled once
# (llguidance) into a grammar over the model's tokens. Each constrained row gets its own matcher; before every
# sampling step it masks out the tokens that cannot continue a valid output, so greedy and sampled rows alike can
# only write text the grammar accepts. The choice of engine (llguidance over xgrammar: no dependencies, 3 MB,
# Windows wheels; measured in CLAUDE.md) stays in this section.


GRAMMAR_ERROR_MAX_CHARS = 500  # the engine's reason, as much of it as a 400 repeats


class ConstraintError(RuntimeError):
    """A row's grammar reached a state with no way on (a dead end or a resource limit of the engine)."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32  # one bit per token id, 32 per int32 word


class RowConstraint:
    """One row's matcher: the tokens that may come next, advanced by each token the row takes."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fill(self, bitmask_row: Any) -> None:
        """Writes the allowed next tokens into one contiguous int32 row of a bitmask. Raises ConstraintError when
        none is allowed: every logit would be -inf, and sampling would pick garbage (or NaN)."""
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * bitmask_row.element_size())
        if self.matcher.is_error():
            raise ConstraintError(f"constrained decoding failed: {self.matcher.get_error()[:GRAMMAR_ERROR_MAX_CHARS]}")
        if not bool(bitmask_row.any()):
            raise ConstraintError("constrained decoding failed: the grammar allows no next token")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar would take from here (nothing is consumed)."""
        return int(self.matcher.validate_tokens(tokens))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"constrained decoding failed: {self.matcher.get_error()[:GRAMMAR_ERROR_MAX_CHARS]}")

    @property
    def complete(self) -> bool:
        """The output is whole: nothing but end-of-text may follow."""
        return bool(self.matcher.is_stopped())


def apply_token_bitmask(logits: Any, bitmask: Any, rows: list[int]) -> None:
    """Sets to -inf, in place, each listed row's logits that its bitmask row forbids (bit b of word w is token
    32w + b). Plain tensor ops on the logits' device (llguidance's own kernel needs torch.compile, so a C++
    compiler, which a Windows machine rarely has). Token ids past the bitmask (padded logits) are forbidden. Row
    by row in place: no gather and scatter of the rows (measured: 0.18 ms a row at a 49,152-token vocabulary on
    this CPU, 1.4 ms for 8)."""
    import torch

    device, width = logits.device, logits.shape[-1]
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    words = bitmask[rows].to(device, non_blocking=True)
    forbidden = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1) == 0
    if forbidden.shape[1] < width:
        forbidden = torch.nn.functional.pad(forbidden, (0, width - forbidden.shape[1]), value=True)
    for i, row in enumerate(rows):
        logits[row].masked_fill_(forbidden[i, :width], float("-inf"))


class CompiledGrammar:
    """A compiled schema whose first mask is already computed (the engine builds its lexer lazily); each request
    starts from a copy of it, which costs about a microsecond."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def start(self) -> RowConstraint:
        return RowConstraint(self.matcher.deep_copy())


class GrammarCompiler:
    """Compiles `ConstraintSpec`s against one tokenizer, each within a time limit, and keeps the last
    `cache_size` by schema. The tokenizer's view for the engine is built at the first schema (about 1 s)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: set[int], timeout_seconds: float, cache_size: int
                 ) -> None:  # fmt: skip
        self.hf_tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, sorted(eos)
        self.timeout_seconds, self.cache_size = timeout_seconds, cache_size
        self.cache: dict[ConstraintSpec, CompiledGrammar] = {}  # insertion order is the LRU order
        self.lock = threading.Lock()
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        with self.lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos)  # fmt: skip
            return self._tokenizer

    def tag_is_token(self, tag: str) -> bool:
        return self.tag_reference(tag).startswith("<[")

    def tag_reference(self, tag: str) -> str:
        """A tag as a grammar must write it: where the tokenizer has the tag as one added token (Qwen3's
        `<tool_call>`), that token, `<[id]>` (llguidance keeps added tokens apart from text: the literal would
        never match the token the model writes); otherwise the text itself."""
        token = self.hf_tokenizer.convert_tokens_to_ids(tag)
        known = isinstance(token, int) and self.hf_tokenizer.decode([token]) == tag
        return f"<[{token}]>" if known and self.tokenizer().is_special_token(token) else json.dumps(tag)

    def compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        """The spec's grammar, from the cache or compiled now. Raises BadRequest naming `spec.param` when the
        schema is invalid, not supported, admits nothing, or takes longer than `timeout_seconds`."""
        with self.lock:
            if (cached := self.cache.pop(spec, None)) is not None:
                self.cache[spec] = cached  # now the most recent
                return cached
        try:
            tokenizer = self.tokenizer()
        except ImportError as exc:
            raise BadRequest("structured outputs need the llguidance package on the server (pip install "
                             "llguidance)", param=spec.param) from exc  # fmt: skip
        compiled = self._compile_within_limit(spec, tokenizer)
        with self.lock:
            self.cache[spec] = compiled
            while len(self.cache) > self.cache_size:
                del self.cache[next(iter(self.cache))]
        return compiled

    def _compile_within_limit(self, spec: ConstraintSpec, tokenizer: Any) -> CompiledGrammar:
        """Compiles in a thread of its own and waits at most `timeout_seconds`. Deliberate: a compile cannot be
        interrupted, so one past the limit finishes unseen (the engine's own fuel limits bound its work)."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["grammar"] = compile_grammar(spec, tokenizer, self.vocab_size, self.tag_reference)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="grammar-compile", daemon=True)
        thread.start()
        thread.join(self.timeout_seconds)
        if thread.is_alive():
            raise BadRequest(f"{spec.param}: compiling the schema took longer than {self.timeout_seconds:g} s "
                             "(GRAMMAR_COMPILE_TIMEOUT_SECONDS)", param=spec.param)  # fmt: skip
        if "error" in outcome:
            raise outcome["error"]
        return outcome["grammar"]  # type: ignore[no-any-return]


def tool_call_lark(spec: ConstraintSpec, tag: Callable[[str], str]) -> str:
    """Tool calls as a Lark grammar: one `<tool_call>` block, or several on their own lines, each holding JSON that
    matches `spec.source`; `tag` writes a tag as the tokenizer knows it. The auto kinds let free text come first
    (TEXT matches text only, never an added token such as Qwen3's `<tool_call>`, so the text ends where a call
    starts) and the calls are optional."""
    calls = 'call ("\\n" call)*' if spec.kind.endswith("calls") else "call"
    start = f"start: TEXT? ({calls})?\nTEXT: /(?s:.+)/" if spec.kind.startswith("auto") else f"start: {calls}"
    return f'{start}\ncall: {tag(TOOL_CALL_OPEN)} "\\n" body "\\n" {tag(TOOL_CALL_CLOSE)}\nbody: %json {spec.source}\n'


def compile_grammar(spec: ConstraintSpec, tokenizer: Any, vocab_size: int,
                    tag_reference: Callable[[str], str]) -> CompiledGrammar:  # fmt: skip
    import torch
    from llguidance import LLMatcher

    def refuse(reason: str) -> BadRequest:
        return BadRequest(f"{spec.param}: {reason[:GRAMMAR_ERROR_MAX_CHARS]}", param=spec.param)

    try:
        if spec.kind != "json_schema":
            grammar = LLMatcher.grammar_from_lark(tool_call_lark(spec, tag_reference))
        else:
            grammar = LLMatcher.grammar_from_json_schema(spec.source, defaults=GRAMMAR_LAYOUT)  # type: ignore[arg-type]
    except ValueError as exc:
        raise refuse(str(exc)) from exc
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise refuse(matcher.get_error())
    first = torch.zeros(bitmask_words(vocab_size), dtype=torch.int32)
    try:
        RowConstraint(matcher).fill(first)  # builds the lexer now, not at the first step of a batch
    except ConstraintError as exc:
        raise refuse(f"the schema admits no value ({exc})") from exc
    return CompiledGrammar(matcher)


def _make_constraint_processor(constraint: RowConstraint, prompt_tokens: int, vocab_size: int) -> Any:
    from transformers import LogitsProcessor

    class ConstrainLogits(LogitsProcessor):  # type: ignore[misc]
        """The same row constraint for `generate()` (media requests, BATCHING=off): one row."""

        def __init__(self) -> None:
            import torch

            self.bitmask = torch.zeros((1, bitmask_words(vocab_size)), dtype=torch.int32)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] > prompt_tokens:
                constraint.advance(int(input_ids[0, -1]))  # the token chosen at the previous step
            constraint.fill(self.bitmask[0])
            apply_token_bitmask(scores, self.bitmask, [0])
            return scores

    return ConstrainLogits()


def vocab_size(loaded: LoadedModel) -> int:
    """The width of the model's logits, which can exceed the tokenizer's length (Qwen3 pads it to 151936)."""
    config = loaded.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


# ==== 10. Engine ====================================================================================================
# Model loading, vision, token tables, the per-row record and the logit adjustments both decode
# paths share, and the generate() path (infer_stream: media requests and BATCHING=off).


@dataclass
class LoadedModel:
    model: Any
    processor: Any  # an AutoProcessor, or the tokenizer itself for text-only models
    tokenizer: Any
    vision: VisionPipeline | None  # None: the model takes text only


class VisionPipeline(Protocol):
    native_video: bool  # False: videos go in as their sampled frames, one image each

    def encode(self, messages: list[dict[str, Any]], images: list[Any], videos: list[DecodedVideo],
               template: dict[str, Any]) -> Any: ...  # fmt: skip


class StockVision:
    """The model's own processor (needs torchvision for Qwen-VL): images and videos on their native paths."""

    native_video = True

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def encode(self, messages: list[dict[str, Any]], images: list[Any], videos: list[DecodedVideo],
               template: dict[str, Any]) -> Any:  # fmt: skip
        from transformers.video_utils import VideoMetadata

        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template)
        extra: dict[str, Any] = {}
        if videos:
            import numpy as np

            extra["videos"] = [np.stack([np.asarray(f) for f in v.frames]) for v in videos]
            extra["video_metadata"] = [
                VideoMetadata(total_num_frames=v.total_frames, fps=v.fps, frames_indices=v.indices) for v in videos
            ]
            extra["do_sample_frames"] = False  # deliberate: already sampled, MAX_VIDEO_FRAMES at most
        return self.processor(text=[text], images=images or None, return_tensors="pt", **extra)


class PilVision:
    """Torchvision-free Qwen-VL preprocessing: the PIL image processor, and the image placeholder expanded to
    one token per merged patch, as the stock processor does. Videos arrive as frames (native_video False)."""

    native_video = False

    def __init__(self, tokenizer: Any, image_processor: Any, image_token: str) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token

    def encode(self, messages: list[dict[str, Any]], images: list[Any], videos: list[DecodedVideo],
               template: dict[str, Any]) -> Any:  # fmt: skip
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template)
        pixels: dict[str, Any] = {}
        if images:
            pixels = dict(self.image_processor(images, return_tensors="pt"))
            merge = self.image_processor.merge_size**2
            pieces = text.split(self.image_token)
            if len(pieces) - 1 != len(images):
                raise BadRequest(f"the chat template placed {len(pieces) - 1} images for {len(images)} given")
            counts = [int(grid.prod()) // merge for grid in pixels["image_grid_thw"]]
            text = pieces[0] + "".join(self.image_token * n + rest for n, rest in zip(counts, pieces[1:], strict=True))
        encoded = self.tokenizer(text, return_tensors="pt")
        encoded.update(pixels)
        return encoded


def resolve_model_source(repo_id: str) -> tuple[str, dict[str, str]]:
    """A `.gguf` path loads from its folder with `gguf_file=`; anything else goes to from_pretrained as is."""
    if repo_id.lower().endswith(".gguf"):
        path = Path(repo_id).expanduser()
        return str(path.parent), {"gguf_file": path.name}
    return repo_id, {}


def load_pil_vision(source: str, token: str | None, config: Any, tokenizer: Any) -> PilVision:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, token=token)
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    return PilVision(tokenizer, image_processor, image_token)


@functools.cache
def packed_linear() -> type:
    """A `torch.nn.Linear` whose weight oneDNN has reordered once for its own matrix product, instead of MKL
    repacking it at every call. On a CPU a decode step multiplies a few rows by each weight: that is where MKL's
    per-call packing costs most (measured on SmolLM2, fp32, 2 AMD cores: a step 56 -> 47 ms at batch 1 and
    102 -> 72 ms at batch 8; a 5-position verify pass 95 -> 62 ms; prefill unchanged). Built on first use: torch
    is imported lazily."""
    import torch

    class PackedLinear(torch.nn.Module):
        def __init__(self, linear: Any) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            self.register_buffer("packed", packed, persistent=False)
            self.bias = linear.bias

        def forward(self, x: Any) -> Any:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    return PackedLinear


def packable_linears(model: Any) -> list[tuple[Any, str]]:
    """(parent, name) of every plain float32 `Linear` on the CPU in the text decoder and the output head, without
    an accelerate hook (offloaded weights move at each call; they stay as they are). A vision tower's projections
    see many rows at once, where MKL is as fast."""
    import torch

    def plain(module: Any) -> bool:
        weight = getattr(module, "weight", None)
        return (type(module) is torch.nn.Linear and weight is not None and weight.device.type == "cpu"
                and weight.dtype == torch.float32 and not hasattr(module, "_hf_hook"))  # fmt: skip

    head, decoder = model.get_output_embeddings(), set(model.get_decoder().modules())
    return [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if plain(child) and (child in decoder or child is head)]  # fmt: skip


def ties_output_head(model: Any) -> bool:
    """Whether the output head's weight is the input embeddings' (a reference to it would outlive the packing)."""
    weight = getattr(model.get_output_embeddings(), "weight", None)
    return weight is not None and weight is getattr(model.get_input_embeddings(), "weight", None)


def pack_linear_weights(model: Any) -> int:
    """Replaces the CPU float32 linears of the decoder and head by `PackedLinear`s; returns how many. One at a time,
    each dense weight freed as its packed one is in (the whole model is never held twice). Tokens can differ from
    the unpacked model's only by float rounding (oneDNN sums in another order). A tied output head gets a packed
    copy: the input embeddings keep the dense weight (SmolLM2 +113 MB, Qwen3-4B +1.5 GB in float32, logged). A
    torch without oneDNN, or a first product that disagrees with the plain one, leaves the model as is."""
    import torch

    places = packable_linears(model)
    if not places or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return 0
    probe = torch.randn(3, getattr(*places[0]).in_features)
    try:
        expected, got = getattr(*places[0])(probe), packed_linear()(getattr(*places[0]))(probe)
    except (RuntimeError, AttributeError, TypeError) as exc:  # a build without these ops, or other signatures
        log.info("oneDNN linear unavailable (%s); MKL serves the matrix products", str(exc)[:120])
        return 0
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        log.warning("oneDNN linear disagrees with torch's; MKL serves the matrix products")
        return 0
    tied = ties_output_head(model)
    for parent, name in places:
        setattr(parent, name, packed_linear()(getattr(parent, name)))
    if tied:
        weight = model.get_input_embeddings().weight
        log.info("tied output head packed separately: +%s", size_text(weight.numel() * weight.element_size()))
    return len(places)


def check_local_source(repo_id: str) -> None:
    """A MODEL_REPO_ID that looks like a path must exist: otherwise the hub would report it as a bad repo id."""
    if looks_like_path(repo_id) and not Path(repo_id.strip()).expanduser().exists():
        raise FileNotFoundError(f"no such file or folder: {Path(repo_id.strip()).expanduser().resolve()}")


LIBRARY_LOGGERS = ("transformers", "huggingface_hub")


def route_library_logs() -> None:
    """transformers and huggingface_hub each add a stderr handler of their own; the hub's also propagates, so
    every retry warning was printed twice. Their records go through the root handler only (one line each, with
    redaction and the request id). Called after they are imported: transformers adds its handler lazily."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True


def load_model(settings: Settings, pack: bool = True) -> LoadedModel:
    """The model, processor, tokenizer and vision pipeline of `settings`; `pack`: CPU float32 linears packed for
    serving (`pack_linear_weights`; a conversion keeps them as loaded)."""
    import transformers

    route_library_logs()
    check_local_source(settings.model_repo_id)
    source, extra = resolve_model_source(settings.model_repo_id)
    common: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code, "token": settings.hf_token or None,
                              **extra}  # fmt: skip
    config = transformers.AutoConfig.from_pretrained(source, **common)
    accepts_images = getattr(config, "vision_config", None) is not None
    model_class = transformers.AutoModelForImageTextToText if accepts_images else transformers.AutoModelForCausalLM
    device_map = None if settings.device_map.lower() == "none" else settings.device_map
    model: Any = model_class.from_pretrained(source, dtype=settings.torch_dtype, device_map=device_map, **common)
    model.eval()
    if pack and (packed := pack_linear_weights(model)):
        log.info("CPU float32: %d linear layers packed for oneDNN (faster decode steps)", packed)
    processor: Any
    try:
        processor = transformers.AutoProcessor.from_pretrained(source, **common)  # type: ignore[no-untyped-call]
    except (ImportError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.info("AutoProcessor unavailable (%s: %s); using AutoTokenizer", type(exc).__name__, str(exc)[:120])
        processor = transformers.AutoTokenizer.from_pretrained(source, **common)
    tokenizer = getattr(processor, "tokenizer", processor)
    vision: VisionPipeline | None = None
    if accepts_images and hasattr(processor, "image_processor"):
        vision = StockVision(processor)
    elif accepts_images:
        vision = load_pil_vision(source, common["token"], config, tokenizer)
        log.info("vision without torchvision: PIL image processor; videos are sent as their sampled frames")
    return LoadedModel(model, processor, tokenizer, vision)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantizes a .gguf into a safetensors folder (model and tokenizer) that loads in seconds instead of the
    ~30 s transformers spends parsing GGUF metadata in Python: `python main.py convert-gguf FILE.gguf FOLDER`.
    Written beside the target first and renamed, so a half-written folder is never left under its name."""
    loaded = load_model(Settings(model_repo_id=str(gguf), device_map="cpu"), pack=False)
    if getattr(loaded.model, "hf_quantizer", None) is not None:
        loaded.model.hf_quantizer.remove_quantization_config(loaded.model)  # else: "not serializable"
    partial = target.with_name(target.name + ".partial")
    loaded.model.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def describe_load_error(repo_id: str, exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    if isinstance(exc, OSError) and not looks_like_path(repo_id):
        return f"model {repo_id} could not be loaded (no network and no local copy?): {first_line}"
    return f"model {repo_id} could not be loaded: {first_line}"


LOAD_FAILURE_ADVICE = (
    "To serve a model you have on disk, set MODEL_REPO_ID to its folder or .gguf file; if the hub cannot be "
    "reached, set HF_HUB_OFFLINE=1 so that a load uses the local cache only and fails at once"
)


CUDA_README_SECTION = "README: Windows and CUDA"


def why_on_cpu(torch_version: str, torch_cuda: str | None, cuda_available: bool, device_map: str) -> str:
    """Why a model landed on the CPU, in the words a user can act on (pure: the facts are parameters)."""
    if torch_cuda is None:
        return f"torch {torch_version} has no CUDA support; install the CUDA build, see {CUDA_README_SECTION}"
    if not cuda_available:
        return f"torch {torch_version} sees no CUDA device (driver, or CUDA_VISIBLE_DEVICES?)"
    return f"DEVICE_MAP={device_map}"


def describe_placement(loaded: LoadedModel, device_map: str) -> Placement:
    import torch

    model = loaded.model
    device = model.device
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    why = "" if device.type != "cpu" else why_on_cpu(torch.__version__, torch.version.cuda,
                                                     torch.cuda.is_available(), device_map)  # fmt: skip
    return Placement(where, str(model.dtype).removeprefix("torch."), weights, why)


def nvidia_gpu_visible(platform: str, exists: Callable[[str], bool], which: Callable[[str], str | None],
                       system_root: str) -> bool:  # fmt: skip
    """Whether the OS has an NVIDIA driver, whatever torch can use (pure: the probes are parameters)."""
    if which("nvidia-smi"):
        return True
    if platform == "win32":
        return exists(str(PureWindowsPath(system_root, "System32", "nvcuda.dll")))
    return exists("/proc/driver/nvidia/version")


def check_torch_build() -> None:
    """Once at start: an NVIDIA GPU that torch cannot use (the CPU wheel, what a plain `pip install torch` gives
    on Windows) would leave the model on the CPU at a token or two per second, with nothing said."""
    import torch

    visible = nvidia_gpu_visible(
        sys.platform, os.path.exists, shutil.which, os.environ.get("SYSTEMROOT", "C:\\Windows")
    )
    if visible and torch.version.cuda is None:
        log.warning("an NVIDIA GPU is visible, but torch %s is a CPU build: the model will run on the CPU. Install "
                    "the CUDA build of torch (%s)", torch.__version__, CUDA_README_SECTION)  # fmt: skip


class ModelHandle:
    """The lazy model singleton: loaded once, under a lock, on first use. A failed load is tried again at most
    every MODEL_LOAD_RETRY_SECONDS; until then requests get its error at once (503 + Retry-After), instead of
    each waiting through another attempt (a hub that cannot be reached takes ~25 s to give up)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self.placement: Placement | None = None
        self._attempts = 0
        self._failed_at: float | None = None
        self.error: str | None = None

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def retry_after_seconds(self) -> int:
        """Whole seconds until a failed load may be tried again; 0 when it may be tried now."""
        if self._failed_at is None or self.error is None:
            return 0
        left = self._failed_at + self.settings.model_load_retry_seconds - self.clock()
        return max(0, int(left + 0.999))

    def not_ready(self) -> ModelNotReady:
        wait = self.retry_after_seconds()
        headers = {"Retry-After": str(max(1, wait))}
        message = f"{self.error}; next attempt in {wait} s" if wait else str(self.error)
        return ModelNotReady(message, headers=headers)

    def get(self) -> LoadedModel:
        if self._loaded is not None:
            return self._loaded
        if self.retry_after_seconds():
            raise self.not_ready()
        seen_attempts = self._attempts
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            if self._attempts != seen_attempts and self.error:
                raise self.not_ready()  # deliberate: callers queued behind a failed load share it
            return self._load()

    def _load(self) -> LoadedModel:
        self._attempts += 1
        started = time.perf_counter()
        hub = "" if looks_like_path(self.settings.model_repo_id) else " (from the hub cache, or downloaded now)"
        log.info("loading model %s%s", self.settings.model_repo_id, hub)
        try:
            self._loaded = load_model(self.settings)
        except Exception as exc:
            self.error = describe_load_error(self.settings.model_repo_id, exc)
            self._failed_at = self.clock()
            retry = self.settings.model_load_retry_seconds
            if self._attempts == 1:  # deliberate: the advice once, not at every retry
                log.error("%s. %s. Requests get 503 until the next attempt, %g s from now.", self.error,
                          LOAD_FAILURE_ADVICE, retry)  # fmt: skip
            else:
                log.error("%s (attempt %d; next in %g s)", self.error, self._attempts, retry)
            raise self.not_ready() from exc
        self.error = self._failed_at = None
        self.placement = describe_placement(self._loaded, self.settings.device_map)
        log.info("model %s loaded in %.1f s: %s", self.settings.model_repo_id, time.perf_counter() - started,
                 self.placement.describe())  # fmt: skip
        return self._loaded


def _make_cancel_criteria(cancel: threading.Event) -> Any:
    from transformers import StoppingCriteria

    class CancelOnEvent(StoppingCriteria):  # type: ignore[misc]
        """Stops generate at the next token once `cancel` is set."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            import torch

            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return CancelOnEvent()


GREEDY_KWARGS: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
# deliberate: generate() always takes the argmax; a sampled row's draw is made by `Sampler` in the last processor


def _make_draw_processor(row: BatchRequest, sampler: Sampler) -> Any:
    import torch
    from transformers import LogitsProcessor

    class DrawLogits(LogitsProcessor):  # type: ignore[misc]
        """Last of the processors: the row's token drawn by the batch's sampler, every other logit -inf, so
        generate()'s greedy pick is that draw (the same draws as the batch, seeded per position)."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            token = sampler.draw(scores[0], row)
            chosen = torch.full_like(scores, -float("inf"))
            chosen[0, token] = 0
            return chosen

    return DrawLogits()


class Sampler:
    """The one sampler of both decode paths: temperature, then top-k, top-p and min-p (the model's generation
    config fills what the request leaves out, as generate() would), drawn from the row's own generator seeded by
    (seed, position): a seeded request is reproducible on either path, and a continued one draws what it would
    have drawn."""

    def __init__(self, generation_config: Any) -> None:
        self.default_top_k = int(generation_config.top_k or 0)
        self.default_top_p = generation_config.top_p

    def draw(self, logits: Any, request: BatchRequest) -> Any:
        """One row's next token from its adjusted, masked logits (1-D)."""
        import torch

        params = request.params
        scores = logits.float() / params.temperature
        top_k = self.default_top_k if params.top_k is None else params.top_k
        if 0 < top_k < scores.shape[-1]:
            scores[scores < scores.topk(top_k).values[-1]] = -float("inf")
        top_p = params.top_p if params.top_p is not None else self.default_top_p
        if top_p is not None and top_p < 1:
            ordered, order = scores.sort(descending=True)
            probabilities = ordered.softmax(-1)
            outside = probabilities.cumsum(-1) - probabilities > top_p  # keep the smallest set reaching p
            ordered[outside] = -float("inf")
            scores = torch.full_like(scores, -float("inf")).scatter(0, order, ordered)
        probabilities = scores.softmax(-1)
        if params.min_p > 0:
            probabilities[probabilities < params.min_p * probabilities.max()] = 0
        request.generator.manual_seed(position_seed(request.seed, request.generated))
        return torch.multinomial(probabilities, 1, generator=request.generator)[0]


def _make_row_processor(row: BatchRequest, prompt_tokens: int, eos_index: Any) -> Any:
    from transformers import LogitsProcessor

    class RowLogits(LogitsProcessor):  # type: ignore[misc]
        """The batch's per-row logit work for `generate()`: the raw log-softmax kept for logprobs, then bias and
        penalties. generate() runs the processors it is given before its warpers (temperature, top-k, top-p), and
        this one first, so it sees the model's own logits."""

        length: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            row.generated = int(input_ids.shape[1]) - prompt_tokens
            if self.length is not None:
                count_token(row, int(input_ids[0, -1]))  # the token chosen at the previous step
            self.length = int(input_ids.shape[1])
            if row.params.logprobs is not None:
                row.scores = scores[0].float().log_softmax(-1)
            if row.params.adjusts_logits:
                adjust_logits(scores[0], row, eos_index)
            return scores

    return RowLogits()


def _make_token_streamer(on_token: Callable[[int], None], on_end: Callable[[], None]) -> Any:
    from transformers.generation.streamers import BaseStreamer

    class TokenStreamer(BaseStreamer):  # type: ignore[misc]
        """generate()'s tokens as they are chosen, one by one (the first `put` is the prompt)."""

        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.view(-1).tolist():
                on_token(int(token))

        def end(self) -> None:
            on_end()

    return TokenStreamer()


def infer_stream(
    loaded: LoadedModel, texts: TokenTexts, prompt: PreparedPrompt, params: GenerationParams,
    cancel: threading.Event, ends: Sequence[threading.Event] = (), resume: Sequence[ChoiceResume] = (),
) -> Iterator[EngineEvent]:  # fmt: skip
    """Runs `generate` in a worker thread, once per choice (one after another), and yields each one's text
    deltas (with their logprobs when asked), then its `Finished`.

    Closing the iterator early (or an exception in the caller) sets `cancel`, so generate stops at the next
    token and the thread never outlives its reader.
    """
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    try:
        for choice in range(params.n):
            end = ends[choice] if choice < len(ends) else None
            state = resume[choice] if choice < len(resume) else ChoiceResume()
            if state.finished:
                continue
            if params.prompt_logprobs and not state.scored:
                yield PromptScores(infer_prompt_scores(loaded, texts, prompt, params), choice)
            if cancel.is_set() or params.max_new_tokens <= len(state.tokens):
                yield Finished("cancelled" if cancel.is_set() else "length", len(state.tokens), choice)
                continue
            yield from infer_choice(loaded, texts, prompt, params, cancel, end, choice, choice_seed(seed, choice),
                                    state.tokens)  # fmt: skip
    finally:
        cancel.set()


def infer_prompt_scores(
    loaded: LoadedModel, texts: TokenTexts, prompt: PreparedPrompt, params: GenerationParams
) -> tuple[TokenScore, ...]:
    import torch

    with torch.inference_mode():
        logits = loaded.model(**prompt.inputs).logits[0]
    ids = prompt.inputs["input_ids"][0].tolist()
    return score_prompt(texts, logits.float().log_softmax(-1), ids, params.logprobs or 0)


def row_processors(loaded: LoadedModel, row: BatchRequest, prompt_tokens: int, eos: set[int]) -> Any:
    """One choice's logits processors for `generate()`: the row's own work (logprobs, bias, penalties,
    min_tokens), its grammar mask (advanced past any resumed tokens already), and for a sampled row the draw."""
    import torch
    from transformers import LogitsProcessorList

    eos_index = torch.tensor(sorted(eos), device=loaded.model.device) if eos else None
    processors = LogitsProcessorList([_make_row_processor(row, prompt_tokens, eos_index)])
    if row.constraint is not None:
        processors.append(_make_constraint_processor(row.constraint, int(row.input_ids.shape[1]), vocab_size(loaded)))
    if row.params.temperature > 0:
        processors.append(_make_draw_processor(row, Sampler(loaded.model.generation_config)))
    return processors


def infer_choice(
    loaded: LoadedModel, texts: TokenTexts, prompt: PreparedPrompt, params: GenerationParams,
    cancel: threading.Event, end: threading.Event | None, choice: int, seed: int, resumed: tuple[int, ...] = (),
) -> Iterator[EngineEvent]:  # fmt: skip
    """One choice through `generate()`; a continued one (`resumed`: the tokens it had emitted) re-prefills them
    after the prompt and goes on from there."""
    import torch
    from transformers import StoppingCriteriaList

    eos = eos_ids(loaded)
    row = make_row(loaded, prompt, params, cancel, queue.Queue(), choice, seed, end, ChoiceResume(resumed))
    prepare_row(row, vocab_size(loaded))
    inputs = {**prompt.inputs, "input_ids": row.input_ids, "attention_mask": torch.ones_like(row.input_ids)}
    if not resumed:
        inputs = prompt.inputs  # media inputs (pixel values, grids) go as they are
    processors = row_processors(loaded, row, prompt.prompt_tokens, eos)
    tokens: queue.Queue[object] = queue.Queue()
    k = params.logprobs or 0
    streamer = _make_token_streamer(  # on_token runs in generate's thread, right after the token is chosen
        lambda token: tokens.put((token, texts.score(row.scores, token, k) if row.scores is not None else None)),
        lambda: tokens.put(_BATCH_END),
    )
    outcome: dict[str, Any] = {}
    leave = threading.Event()  # the reader left: this choice's generate stops (the next choice may still run)
    stopping = StoppingCriteriaList([_make_cancel_criteria(e) for e in (cancel, end, leave) if e is not None])

    def generate() -> None:
        try:
            with torch.inference_mode():
                loaded.model.generate(
                    **inputs,
                    streamer=streamer,
                    stopping_criteria=stopping,
                    logits_processor=processors,
                    max_new_tokens=params.max_new_tokens - len(resumed),
                    min_new_tokens=params.max_new_tokens - len(resumed) if params.ignore_eos else None,
                    pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id,
                    **GREEDY_KWARGS,
                )
        except BaseException as exc:
            outcome["error"] = exc
            tokens.put(_BATCH_END)  # deliberate: wakes the reader, which would otherwise wait forever

    thread = threading.Thread(target=generate, name="generate", daemon=True)
    thread.start()
    generated: list[int] = list(resumed)
    try:
        while (item := tokens.get()) is not _BATCH_END:
            token, score = cast(tuple[int, TokenScore | None], item)
            generated.append(token)
            text = row.accept(token, token in eos and not params.ignore_eos, score)
            if text is not None and (text or row.pending):
                yield Delta(text, choice, tuple(row.pending), tuple(row.tokens))
                row.pending, row.tokens = [], []
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        if (tail := row.decoder.flush()) or row.pending:
            yield Delta(tail, choice, tuple(row.pending), tuple(row.tokens))
        stopped = cancel.is_set() or (end is not None and end.is_set())
        yield Finished(finish_reason_of(generated, eos, params, stopped), len(generated), choice)
    finally:
        leave.set()
        thread.join(timeout=30)


def eos_ids(loaded: LoadedModel) -> set[int]:
    configured = loaded.model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(loaded.tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def finish_reason_of(generated: list[int], eos: set[int], params: GenerationParams, stopped: bool) -> FinishReason:
    if generated and generated[-1] in eos and not params.ignore_eos:
        return "stop"
    if len(generated) >= params.max_new_tokens:
        return "length"
    return "cancelled" if stopped else "stop"


def encode_vision(
    vision: VisionPipeline, messages: list[dict[str, Any]], refs: list[MediaRef], settings: Settings,
    template_kwargs: dict[str, Any],
) -> Any:  # fmt: skip
    """Fetches and decodes every media part, then lets the pipeline build the model inputs. Without a native
    video path, a video becomes its sampled frames, each an image part, in place (never dropped)."""
    loaded_media = {id(ref): load_media(ref, settings) for ref in refs}
    images: list[Any] = []
    videos: list[DecodedVideo] = []
    template: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message["content"], list):
            template.append(message)
            continue
        content: list[dict[str, Any]] = []
        for part in message["content"]:
            media: Any = loaded_media.get(id(part.get("ref")))
            if part["type"] == "image":
                images.append(media)
                content.append({"type": "image"})
            elif part["type"] == "video" and vision.native_video:
                videos.append(media)
                content.append({"type": "video"})
            elif part["type"] == "video":
                images.extend(media.frames)
                content.extend({"type": "image"} for _ in media.frames)
            else:
                content.append(part)
        template.append({**message, "content": content})
    return vision.encode(template, images, videos, template_kwargs)


# ---- continuous batching -------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Token ids -> text deltas, one token at a time, never splitting a multi-byte character. Decodes only a
    short window (the prefix/read offsets of TGI and vLLM), so each step costs the same however long the text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or half a character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


_BATCH_END = object()


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class TokenTexts:
    """Token ids -> (text, raw bytes) for logprobs, each looked up once. The bytes of a special token (one the
    decoded text skips, as end-of-text) are empty, so that the bytes of an answer's tokens join to its content."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a a", add_special_tokens=False))
        self.byte_level = "Ġ" in "".join(p or "" for p in pieces)
        # GPT-2's byte-level alphabet, character -> byte (transformers' own table): Qwen, SmolLM2 and Llama 3 tokens
        # are written in it (a space is "Ġ"), so a token's raw bytes, half a character included, read off its text
        self.alphabet = {char: byte for byte, char in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
        self.cache: dict[int, tuple[str, bytes]] = {}

    def lookup(self, token: int) -> tuple[str, bytes]:
        found = self.cache.get(token)
        if found is None:
            found = self.cache[token] = self._lookup(token)
        return found

    def _lookup(self, token: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token) or ""
        if token in self.special:
            return piece, b""
        if self.byte_level and all(c in self.alphabet for c in piece):
            raw = bytes(self.alphabet[c] for c in piece)
        elif match := BYTE_TOKEN.fullmatch(piece):
            raw = bytes([int(match[1], 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()  # SentencePiece's word marker is a space
        return raw.decode("utf-8", errors="backslashreplace"), raw  # half a character reads as `\xe2\x80`

    def score(self, logprobs: Any, token: int | None, k: int) -> TokenScore:
        """`token`'s entry from one position's log-softmax, with the `k` most likely tokens (most likely first)."""
        top: tuple[tuple[str, float, bytes], ...] = ()
        if k:
            values, ids = logprobs.topk(k)
            pairs = zip(values.tolist(), ids.tolist(), strict=True)
            top = tuple((text, value, raw) for value, (text, raw) in ((v, self.lookup(i)) for v, i in pairs))
        if token is None:
            return TokenScore("", None, b"", top)
        text, raw = self.lookup(token)
        return TokenScore(text, float(logprobs[token]), raw, top)


def score_prompt(texts: TokenTexts, logprobs: Any, ids: list[int], k: int) -> tuple[TokenScore, ...]:
    """A prompt's tokens, scored: `logprobs[j]` is the distribution after `ids[: j + 1]`, so it scores `ids[j + 1]`;
    the first token has nothing before it (null, as the legacy API)."""
    first = TokenScore(*_first_token(texts, ids[0]))
    return (first, *(texts.score(logprobs[j], ids[j + 1], k) for j in range(len(ids) - 1)))


def _first_token(texts: TokenTexts, token: int) -> tuple[str, None, bytes]:
    text, raw = texts.lookup(token)
    return text, None, raw


@dataclass
class BatchRequest:
    """One row of the batch: one choice of one prompt. The `n` choices of a prompt are its siblings: submitted
    together, prefilled once, each with its own generator, decoder, constraint and end."""

    input_ids: Any  # (1, prompt_tokens), on the model's device
    params: GenerationParams
    cancel: threading.Event  # the whole request's
    decoder: IncrementalDecoder
    generator: Any  # a torch.Generator of its own when sampling: seeds hold whatever else runs
    constraint: RowConstraint | None = None  # its response_format or forced call matcher; None: free text
    out: queue.Queue[object] = field(default_factory=queue.Queue)  # shared by the siblings
    choice: int = 0
    end: threading.Event | None = None  # this choice's alone (its stop string matched)
    generated: int = 0
    cached: int = 0  # real tokens in the KV cache, so the position of the next one
    done: bool = False
    counts: Any = None  # (vocab,) generated-token counts, for presence/frequency penalties; None: not penalized
    seen: Any = None  # (vocab,) bool: prompt and generated tokens, for repetition_penalty; None: not penalized
    bias: tuple[Any, Any] | None = None  # logit_bias as (ids, values) tensors on the device
    scores: Any = None  # this step's raw log-softmax, when logprobs are asked for
    pending: list[TokenScore] = field(default_factory=list)  # scored tokens whose text is not out yet
    tokens: list[int] = field(default_factory=list)  # token ids whose text is not out yet
    seed: int = 0  # a sampled row draws token i from a generator seeded by (seed, i): see position_seed
    resumed: tuple[int, ...] = ()  # tokens emitted before a restart (already at the end of input_ids)
    history: list[int] = field(default_factory=list)  # every token sampled for this row (the prefix cache's key)
    reused: int = 0  # prompt tokens read from the prefix cache instead of computed
    hit: tuple[PrefixEntry, int] | None = None  # the prefix-cache entry it starts from, and how many tokens of it
    joined: int = 0  # its place in admission order (the youngest row is preempted first)
    acceptance: float | None = None  # the chance it takes a drafted token after the ones before; None: no draft yet
    prompt_ids: Any = None  # input_ids as an int64 numpy array, copied from the device once; None: not yet

    def fed(self) -> Any:
        """Every token fed so far, prompt and sampled, as an int64 numpy array (prefix lookups, drafts, entries):
        the prompt is copied from the device once, not at every step."""
        import numpy as np

        if self.prompt_ids is None:
            self.prompt_ids = self.input_ids[0].cpu().numpy()
        return np.concatenate([self.prompt_ids, np.asarray(self.history, dtype=np.int64)])

    @property
    def stopped(self) -> bool:
        return self.cancel.is_set() or (self.end is not None and self.end.is_set())

    def accept(self, token: int, ends: bool, score: TokenScore | None) -> str | None:
        """The per-token step both decode loops take: the token's logprob entry (an end-of-text token's only
        where the API lists it), then, unless it ends the answer, its text from the decoder (maybe "" while a
        character is incomplete). None: it ended the answer."""
        if score is not None and (self.params.score_end_token or not ends):
            self.pending.append(score)
        if ends:
            return None  # end-of-text is not part of the answer (its entry, if any, goes with the tail)
        self.tokens.append(token)
        return self.decoder.push(token)

    def put(self, text: str) -> None:
        if text or self.pending:
            self.out.put(Delta(text, self.choice, tuple(self.pending), tuple(self.tokens)))
            self.pending, self.tokens = [], []

    def finish(self, reason: FinishReason) -> None:
        self.put(self.decoder.flush())
        self.out.put(Finished(reason, self.generated, self.choice, self.reused))
        self.out.put(_BATCH_END)
        self.done = True


def prepare_row(request: BatchRequest, width: int) -> None:
    """The per-row state for logit adjustments, made once at admission (none for a row that asks for none)."""
    import torch

    params, device = request.params, request.input_ids.device
    if params.penalizes_counts:
        request.counts = torch.zeros(width, dtype=torch.float32, device=device)
    if params.repetition_penalty != 1:
        request.seen = torch.zeros(width, dtype=torch.bool, device=device)
        request.seen[request.input_ids[0]] = True
    if params.logit_bias:
        ids, values = zip(*params.logit_bias, strict=True)
        request.bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device))
    for token in request.resumed:
        count_token(request, token)


def count_token(request: BatchRequest, token: int) -> None:
    """A generated token, counted for the penalties that look at what came before."""
    if request.counts is not None:
        request.counts[token] += 1
    if request.seen is not None:
        request.seen[token] = True


def adjust_logits(row: Any, request: BatchRequest, eos: Any) -> None:
    """One row's logits, in place, before masks and sampling: logit_bias, OpenAI's penalties
    (`-= frequency * count + presence * (count > 0)` over the generated tokens), repetition_penalty (a seen
    token's positive logit divided by it, a negative one multiplied), and end-of-text masked before
    min_tokens."""
    import torch

    params = request.params
    if request.bias is not None:
        row.index_add_(0, request.bias[0], request.bias[1].to(row.dtype))
    if request.counts is not None:
        row -= request.counts * params.frequency_penalty + (request.counts > 0) * params.presence_penalty
    if request.seen is not None:
        penalty = params.repetition_penalty
        row.copy_(torch.where(request.seen, torch.where(row > 0, row / penalty, row * penalty), row))
    if request.generated < params.min_tokens and eos is not None:
        row[eos] = -float("inf")


def choice_seed(seed: int, choice: int) -> int:
    """Choice 0 takes the request's seed as it is (n=1 is unchanged); the others seeds of their own, so that the
    n choices differ from one another and a second call with the same seed repeats all of them."""
    return seed if choice == 0 else (seed + choice * 0x9E3779B97F4A7C15) % (1 << 63)


def position_seed(seed: int, position: int) -> int:
    """The seed of a row's draw at `position`: the draw depends on (seed, position) alone, never on how many
    draws came before, so a restart that continues at token i draws what the first run would have drawn."""
    return (seed * 0x5851F42D4C957F2D + position * 0x14057B7EF767814F + 1) % (1 << 63)


def make_row(
    loaded: LoadedModel, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event,
    out: queue.Queue[object], choice: int, seed: int, end: threading.Event | None, state: ChoiceResume,
) -> BatchRequest:  # fmt: skip
    """One choice's row; a continued one starts where it stood: its tokens after the prompt, its decoder and
    constraint fed with them, its prompt scores not sent twice."""
    import torch

    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=loaded.model.device)
    constraint = prompt.grammar.start() if prompt.grammar is not None else None
    decoder = IncrementalDecoder(loaded.tokenizer)
    input_ids = prompt.inputs["input_ids"]
    if state.tokens:
        input_ids = torch.cat([input_ids, input_ids.new_tensor([state.tokens])], dim=1)
        for token in state.tokens:
            decoder.push(token)  # deliberate: the text is out already; this restores the held bytes
            if constraint is not None:
                constraint.advance(token)
    if state.scored:
        params = replace(params, prompt_logprobs=False)
    return BatchRequest(input_ids, params, cancel, decoder, generator, constraint, out, choice, end,
                        generated=len(state.tokens), seed=seed, resumed=state.tokens)  # fmt: skip


# ==== 11. KV memory =================================================================================================
# The batch's key/value cache: growing buffers, the prefix cache, the KV budget, a group of rows as a rectangle.


KV_ROOM_TOKENS = 256  # a batch's key/value buffers grow by this many positions at a time


def room(tokens: int) -> int:
    """The positions a `GrowingLayer`'s buffers hold for `tokens`: rounded up to KV_ROOM_TOKENS."""
    return -(-tokens // KV_ROOM_TOKENS) * KV_ROOM_TOKENS


@functools.cache
def growing_layer() -> type:
    """A `DynamicLayer` whose keys and values are views into a buffer with room to spare, so a decode step writes
    one position in place where `DynamicLayer` would `torch.cat` (copy) every layer's whole cache. Anything that
    replaces `keys`/`values` (a merge, a dropped row) is adopted into a fresh buffer at the next update; so is a
    prefill's output, kept as computed, so that the copy falls after the first token (a burst of 8: prefill
    ~15 ms sooner, the first step ~6 ms longer). Built on first use: transformers is imported lazily."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):  # type: ignore[misc,no-untyped-call]
        buffers: tuple[Any, Any] | None = None
        views: tuple[Any, Any] = (None, None)  # what `update` last returned, to notice replaced keys/values

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.get_seq_length()
            if not length and self.buffers is None:  # a prefill: adopted at the next update, after its token
                self.keys, self.values = key_states, value_states
                return key_states, value_states
            needed = length + key_states.shape[-2]
            buffers = self.buffers
            if buffers is None or self.keys is not self.views[0] or buffers[0].shape[-2] < needed:
                buffers = self.buffers = self._adopt(length, needed, key_states)
            for buffer, states in zip(buffers, (key_states, value_states), strict=True):
                buffer[:, :, length:needed] = states
            self.views = self.keys, self.values = buffers[0][:, :, :needed], buffers[1][:, :, :needed]
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            """Keeps the rows in `indices`: one copy, into buffers that keep their room (DynamicLayer's copy
            would be adopted, so copied again, at the next update)."""
            if self.buffers is None or self.keys is not self.views[0]:
                super().batch_select_indices(indices)
                return
            length = self.get_seq_length()
            buffers = self.buffers = self.buffers[0][indices], self.buffers[1][indices]
            self.views = self.keys, self.values = buffers[0][:, :, :length], buffers[1][:, :, :length]

        def crop(self, length: int) -> None:
            """Keeps the first `length` positions (a verify pass's rejected tail goes); the buffers keep their room
            and the next update writes over what was cut."""
            keys, values = cast(Any, self.keys), cast(Any, self.values)
            self.views = self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def _adopt(self, length: int, needed: int, like: Any) -> tuple[Any, Any]:
            """Fresh buffers with room for `needed` positions and more, holding the `length` cached so far."""
            rows, heads, _, dim = like.shape
            shape = (rows, heads, room(needed), dim)
            buffers = like.new_empty(shape), like.new_empty(shape)
            if length:
                buffers[0][:, :, :length] = self.keys
                buffers[1][:, :, :length] = self.values
            return buffers

    return GrowingLayer


PREFIX_CACHE_CPU_BYTES = 1 << 30  # the automatic budget on a CPU; on a GPU a share of its memory:
PREFIX_CACHE_GPU_SHARE = 0.15  # 3.6 GB of a 24 GB card: ~25k tokens of Qwen3-4B at 144 KiB a token


def prefix_cache_budget(setting: int, device: Any) -> int:
    """PREFIX_CACHE_BYTES as bytes: -1 (auto) is 1 GiB on a CPU and 15% of a GPU's memory."""
    if setting >= 0:
        return setting
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory * PREFIX_CACHE_GPU_SHARE)
    return PREFIX_CACHE_CPU_BYTES


def common_prefix(a: Any, b: Any, limit: int) -> int:
    """How many leading token ids two int64 arrays share, at most `limit`."""
    import numpy as np

    k = min(len(a), len(b), limit)
    if k <= 0:
        return 0
    differ = np.flatnonzero(a[:k] != b[:k])
    return int(differ[0]) if differ.size else k


@dataclass
class PrefixEntry:
    """The KV of one token sequence (a prompt, or a prompt and its answer), one (keys, values) pair per layer,
    each (1, kv heads, tokens, head dim). Never written in place: a row that starts from it copies it at its
    first forward pass (`GrowingLayer` adopts the slice into buffers of its own)."""

    salt: str  # the owner's id: a lookup sees only its own owner's entries
    tokens: Any  # int64 numpy array
    layers: list[tuple[Any, Any]]
    nbytes: int


class PrefixCache:
    """Earlier prompts' KV for reuse (prefix caching), by token ids, bounded by a byte budget with LRU eviction.
    Used by the batch's thread only (no lock). A lookup returns the entry sharing the longest prefix with a
    prompt, never all of it: the last prompt token is always computed, for the first logits."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: collections.OrderedDict[int, PrefixEntry] = collections.OrderedDict()  # id -> entry, LRU first
        self.held = self.peak = 0
        self.stats = dict.fromkeys(("lookups", "hits", "reused_tokens", "stored", "evictions"), 0)

    def lookup(self, salt: str, prompt: Any) -> tuple[PrefixEntry, int] | None:
        self.stats["lookups"] += 1
        best: tuple[PrefixEntry, int] | None = None
        for entry in self.entries.values():
            shared = common_prefix(entry.tokens, prompt, len(prompt) - 1) if entry.salt == salt else 0
            if shared and (best is None or shared > best[1]):
                best = (entry, shared)
        if best is not None:
            self.entries.move_to_end(id(best[0]))
            self.stats["hits"] += 1
            self.stats["reused_tokens"] += best[1]
        return best

    def store(self, salt: str, tokens: Any, layers: list[tuple[Any, Any]], room: int | None = None) -> None:
        """Keeps a copy of `layers` (views of a live cache) for `tokens`, within its budget and the `room` the
        KV budget leaves it. An entry that is a prefix of another is redundant and goes (the longer one serves
        every lookup it would)."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        limit = self.budget if room is None else min(self.budget, room)
        if nbytes > limit or len(tokens) < 2:
            return
        for key, entry in list(self.entries.items()):
            if entry.salt != salt:
                continue
            shared = common_prefix(entry.tokens, tokens, len(tokens))
            if shared == len(tokens):
                self.entries.move_to_end(key)  # already held, in full
                return
            if shared == len(entry.tokens):
                self._drop(key)
        self.shrink(limit - nbytes)
        entry = PrefixEntry(salt, tokens, [(k.clone(), v.clone()) for k, v in layers], nbytes)
        self.entries[id(entry)] = entry
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        self.stats["stored"] += 1

    def shrink(self, limit: int) -> None:
        """Evicts the least recently used entries until at most `limit` bytes are held."""
        while self.entries and self.held > limit:
            self._drop(next(iter(self.entries)))
            self.stats["evictions"] += 1

    def _drop(self, key: int) -> None:
        self.held -= self.entries.pop(key).nbytes


KV_GPU_HEADROOM_SHARE = 0.1  # of a GPU's memory left out of the automatic KV budget, at least 1 GiB: activations
KV_GPU_HEADROOM_MIN_BYTES = 1 << 30  # (a 4096-token prefill of Qwen3-4B: ~0.3 GB), the allocator's fragmentation
KV_CPU_SHARE = 0.5  # of the RAM available once the model is loaded; the rest for the OS, other programs, activations
KV_CPU_FALLBACK_BYTES = 4 << 30  # without psutil (it comes with accelerate), the automatic budget on a CPU
KV_GROUPS = 2  # groups of rows the batch may split into when a long row would widen short ones past the budget
KV_OUT_OF_MEMORY_SHARE = 0.9  # after an out-of-memory error, the budget drops to this share of what was held


def kv_budget(setting: int, device: Any) -> int | None:
    """KV_CACHE_BYTES as bytes, None for no budget (0). -1 (auto), measured once the model is loaded: on a GPU
    its free memory less 10% of the card (at least 1 GiB); elsewhere half the RAM then available."""
    if setting >= 0:
        return setting or None
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return max(free - max(KV_GPU_HEADROOM_MIN_BYTES, int(total * KV_GPU_HEADROOM_SHARE)), 0)
    try:
        import psutil
    except ImportError:
        log.warning("psutil is not installed: the KV budget is %d GiB (pip install psutil, or set KV_CACHE_BYTES)",
                    KV_CPU_FALLBACK_BYTES >> 30)  # fmt: skip
        return KV_CPU_FALLBACK_BYTES
    return int(psutil.virtual_memory().available * KV_CPU_SHARE)


def kv_token_bytes(model: Any) -> int:
    """Bytes one token's keys and values take in the batch's cache: 2 x layers x KV heads x head size x the
    dtype's size (Qwen3-4B in bfloat16: 144 KiB; SmolLM2-135M in float32: 45 KiB)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize)


def cache_bytes(cache: Any) -> int:
    """The bytes a cache really holds: the storage behind its layers' keys, values and buffers (padding and
    room included), each counted once."""
    storages: dict[int, int] = {}
    for layer in cache.layers if cache is not None else ():
        for tensor in (layer.keys, layer.values, *(getattr(layer, "buffers", None) or ())):
            if tensor is not None and tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def is_out_of_memory(exc: BaseException) -> bool:
    """The device's allocation failure: torch's `OutOfMemoryError` (CUDA and the other accelerators), or the CPU
    allocator's RuntimeError ("can't allocate memory" on Linux, "not enough memory" on Windows)."""
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
    )


class KvBudget:
    """The batch's KV memory against KV_CACHE_BYTES (None: no budget). What is held is measured in the layout
    the cache really has (rows left-padded to the longest, buffers with room); what admitting rows needs is
    planned from the token size: the merged rectangle with room for the next KV_ROOM_TOKENS tokens, twice (a
    merge holds the old rows and their merged copy at once). Kept by the batch's thread; read whole by others."""

    def __init__(self, budget: int | None, token_bytes: int) -> None:
        self.budget, self.token_bytes = budget, token_bytes
        self.held = self.peak = 0
        self.waiting = 0  # rows held back for memory now
        self.preempted = 0  # rows taken out of the batch for memory, in all
        self.holding = False  # admission is holding requests back (logged once when it starts)

    def limit(self) -> KvLimit | None:
        """What one request may reach (prompt and answer), alone in the batch, with room to grow."""
        if self.budget is None:
            return None
        tokens = self.budget // self.token_bytes // KV_ROOM_TOKENS * KV_ROOM_TOKENS - KV_ROOM_TOKENS
        return KvLimit(max(tokens, 0), self.budget)

    def rectangle(self, rows: int, width: int) -> int:
        """Bytes of `rows` rows `width` positions wide, in buffers with room."""
        return rows * room(width) * self.token_bytes

    def merge_need(self, rows: int, width: int) -> int:
        return 2 * self.rectangle(rows, width + KV_ROOM_TOKENS)

    def place(self, shapes: list[tuple[int, int]], rows: int, longest: int, max_groups: int) -> tuple[int, int]:
        """Where `rows` new rows (the longest `longest` tokens) go, given the groups' (rows, width), and what that
        needs: the group to merge into that fits with the least memory, else a new group (index `len(shapes)`,
        while fewer than `max_groups`: each group costs a forward pass a step), else the least needy (it does not
        fit: they wait). A placement needs every group's rectangle with room for the next KV_ROOM_TOKENS tokens,
        the target's twice (the merge)."""
        base = sum(self.rectangle(r, w + KV_ROOM_TOKENS) for r, w in shapes)
        needs = [base - self.rectangle(r, w + KV_ROOM_TOKENS) + self.merge_need(r + rows, max(w, longest))
                 for r, w in shapes] + [base + self.merge_need(rows, longest)]  # fmt: skip
        merges = sorted(range(len(shapes)), key=needs.__getitem__)
        if merges and (self.fits(needs[merges[0]]) or len(shapes) >= max_groups):
            return merges[0], needs[merges[0]]
        return len(shapes), needs[-1]

    def fits(self, need: int) -> bool:
        return self.budget is None or need <= self.budget

    def note(self, held: int, transient: int = 0) -> None:
        self.held = held
        self.peak = max(self.peak, held + transient)

    def stats(self) -> dict[str, int]:
        return {"bytes": self.held, "peak_bytes": self.peak, "budget_bytes": self.budget or 0,
                "waiting_rows": self.waiting, "preempted": self.preempted}  # fmt: skip


class Batch:
    """The running rows and their KV cache: one row per request, left-padded to the longest (a rectangle;
    `mask` is 0 on padding), each row's newest token sampled but not yet in the cache."""

    def __init__(self) -> None:
        self.requests: list[BatchRequest] = []
        self.cache: Any = None  # a DynamicCache of `GrowingLayer`s, one row per request
        self.mask: Any = None  # (rows, cache length): 0 where a row is left padding
        self.next_tokens: Any = None  # (rows, 1): each row's newest token, not yet in the cache

    def __len__(self) -> int:
        return len(self.requests)

    def clear(self) -> None:
        self.requests, self.cache, self.mask, self.next_tokens = [], None, None, None

    def merge(self, requests: list[BatchRequest], cache: Any, mask: Any, tokens: Any) -> None:
        """Adds prefilled rows to the batch, left-padding the shorter side's keys, values and mask. All or nothing:
        a failure part-way (a `torch.cat` out of GPU memory, say) puts back the layers merged so far, so that only
        the newcomers fail and the running rows go on. Keeping the old tensors until the end costs at most the
        batch's old cache, and usually nothing: once stepped, a `GrowingLayer`'s buffers hold them anyway."""
        import torch
        import torch.nn.functional as F

        if self.cache is None:
            self.requests.extend(requests)
            self.cache, self.mask, self.next_tokens = cache, mask, tokens.view(-1, 1)
            return
        length = max(self.mask.shape[1], mask.shape[1])
        pad_old, pad_new = length - self.mask.shape[1], length - mask.shape[1]
        merged: list[tuple[Any, Any, Any]] = []  # (layer, its keys, its values) before the merge
        try:
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                keys = torch.cat([F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
                values = torch.cat([F.pad(old.values, (0, 0, pad_old, 0)), F.pad(new.values, (0, 0, pad_new, 0))])
                merged.append((old, old.keys, old.values))
                old.keys, old.values = keys, values
            self.mask, self.next_tokens = (torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))]),
                                           torch.cat([self.next_tokens, tokens.view(-1, 1)]))  # fmt: skip
        except Exception:
            for layer, keys, values in merged:
                layer.keys, layer.values = keys, values
            raise
        for layer in self.cache.layers:
            layer.buffers = None  # the old buffers go now; the next update adopts the merged copy
        self.requests.extend(requests)

    def width(self) -> int:
        return int(self.mask.shape[1]) if self.mask is not None else 0

    def capacity(self) -> int:
        """Positions the buffers hold before the next step must allocate (0: that step adopts the cache into new
        buffers: after a merge, a trim, or a prefill)."""
        layer = self.cache.layers[0] if self.cache is not None else None
        if layer is None or layer.buffers is None or layer.keys is not layer.views[0]:
            return 0
        return int(layer.buffers[0].shape[-2])

    def holes(self) -> float:
        """The share of the rectangle that is padding inside rows (rejected draft positions), not at their left."""
        real = self.mask.sum(dim=1)
        spans = self.mask.shape[1] - self.mask.argmax(dim=1)  # from each row's first real column to the end
        return float((spans - real).sum() / max(int(self.mask.numel()), 1))

    def compact(self) -> None:
        """Moves each row's real columns to the right end, as a merge lays them out (holes become left padding,
        which `keep` trims): one gather per layer."""
        import torch

        width = int(self.mask.sum(dim=1).max())
        index = torch.sort(self.mask, dim=1, stable=True).indices[:, -width:]  # padding first, then the real ones
        self.mask = self.mask.gather(1, index)
        for layer in self.cache.layers:
            at = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, at), layer.values.gather(2, at)
            layer.buffers = None  # the old buffers go now; the next update adopts the gathered copy

    def step_inputs(self) -> tuple[Any, Any, Any]:
        """(input ids, attention mask, position ids) of the next decode step: the mask gains the new column."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.requests), 1)], dim=1)
        positions = torch.tensor([[r.cached] for r in self.requests], device=self.mask.device)
        return self.next_tokens, self.mask, positions

    def keep(self, keep: list[int]) -> None:
        """Keeps the rows at `keep`, then drops left-padding columns that no remaining row needs."""
        if not keep:
            self.clear()
            return
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.requests = [self.requests[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask, self.next_tokens = self.mask[index], self.next_tokens[index]
        unused = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]


# ==== 12. Batching ==================================================================================================
# The continuous batch: prefill planning and admission, sampling, speculation, the passes, the loop.


BATCH_IDLE_WAIT_SECONDS = 0.5  # how long the batch thread sleeps on an empty queue before looking again


CPU_PREFILL_TOKENS = 256  # default prefill group size on CPU: measured, see BatchScheduler._next_group


ACCELERATOR_PREFILL_TOKENS = 4096  # elsewhere a prefill forward is nearly free up to thousands of tokens


def joins_prefill_group(size: int, longest: int, length: int, budget: int) -> bool:
    """Whether a prompt of `length` tokens joins a prefill group of `size` prompts (the longest `longest`) within
    `budget` padded tokens. The first prompt of a group always does, however long."""
    return size == 0 or (size + 1) * max(longest, length) <= budget


Family = list[BatchRequest]  # one prompt's rows: its n choices


@dataclass
class ChunkedPrefill:
    """A prompt longer than the prefill budget, prefilled a slice per step into a cache of its own."""

    family: Family
    cache: Any
    target: Batch | None = None  # the group it joins (None: a new one), chosen at admission
    done: int = 0  # prompt tokens in `cache` so far
    scores: list[TokenScore] = field(default_factory=list)  # the prompt scored so far (echo with logprobs)


def cache_keyword(model: Any) -> str:
    """The name `forward` takes the KV cache by: transformers 5.24 renamed `past_key_values` to `cache` (the old
    name still works, with a FutureWarning at the first step of every run, until 5.40); 5.23 knows only the old."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefillQueue:
    """The batch's waiting prompts and how they are taken: rows preempted for memory first, then in arrival
    order; grouped for one prefill within the padded-token budget and as long as the KV budget `fits` them, a
    prefix-cache hit alone (it starts from a cache of its own); each looked up in the prefix cache when taken."""

    def __init__(self, prefix: PrefixCache, prefill_tokens: int, max_batch: int,
                 fits: Callable[[int, int], bool]) -> None:  # fmt: skip
        self.prefix, self.prefill_tokens, self.max_batch, self.fits = prefix, prefill_tokens, max_batch, fits
        self.pending: queue.Queue[Family] = queue.Queue()
        self.preempted: collections.deque[Family] = collections.deque()  # rows out of the batch for memory
        self.held: Family | None = None  # taken from `pending` but left for the next prefill group

    def next_group(self, rows: int, wait: bool) -> list[Family]:
        """Waiting prompts, in arrival order, up to the free rows and `prefill_tokens` padded prompt tokens (a
        longer prompt goes alone, in slices). Deliberate: on CPU prefill is compute-bound, so a group's cost grows
        with every prompt in it and all of them wait for it; groups of about 4 chat prompts were measured the
        best trade (0.64x the cost per prompt of one alone, CLAUDE.md)."""
        group: list[Family] = []
        longest = 0
        while rows < self.max_batch:
            family = self.take(block=wait and not group)
            if family is None:
                break
            if all(r.stopped for r in family):
                for request in family:
                    request.finish("cancelled")
                continue
            length = int(family[0].input_ids.shape[1])
            fits = rows + len(family) <= self.max_batch
            alone = family[0].hit is not None  # it starts from a cache of its own
            if (not fits or (alone and group) or not joins_prefill_group(len(group), longest, length,
                                                                         self.prefill_tokens)
                    or not self.fits(sum(map(len, group)) + len(family), max(longest, length))):  # fmt: skip
                self.held = family  # first in line for the next group
                break
            group.append(family)
            longest, rows = max(longest, length), rows + len(family)
            if alone:
                break
        return group

    def take(self, block: bool) -> Family | None:
        if self.held is not None:
            family, self.held = self.held, None
            return family
        if self.preempted:
            family = self.preempted.popleft()
            self.look_up(family[0])
            return family
        try:
            family = self.pending.get(timeout=BATCH_IDLE_WAIT_SECONDS) if block else self.pending.get_nowait()
        except queue.Empty:
            return None
        self.look_up(family[0])
        return family

    def drop_stopped(self) -> None:
        """Cancelled rows among those that wait for memory end now, not when memory frees."""
        waiting = [self.held] if self.held is not None else []
        for family in [*waiting, *self.preempted]:
            if all(r.stopped for r in family):
                for request in family:
                    request.finish("cancelled")
        self.preempted = collections.deque(f for f in self.preempted if not all(r.done for r in f))
        if self.held is not None and all(r.done for r in self.held):
            self.held = None

    def waiting_rows(self) -> int:
        return sum(map(len, self.preempted)) + (len(self.held) if self.held is not None else 0)

    def look_up(self, request: BatchRequest) -> None:
        """The longest cached prefix of a newcomer's prompt, once, when it is taken from the queue. Not for the
        legacy echo with logprobs: it needs the logits of every prompt position."""
        if self.prefix.budget and not request.params.prompt_logprobs:
            request.hit = self.prefix.lookup(request.params.cache_salt, request.fed())


class RowSampler:
    """Each row's next token from one step's logits: its raw scores kept for logprobs, its adjustments, its
    grammar mask, then greedy or the one `Sampler`. A row whose grammar fails is handed to `fail`."""

    def __init__(self, sampler: Sampler, eos_index: Any, max_batch: int,
                 fail: Callable[[list[BatchRequest], Exception, str], None]) -> None:  # fmt: skip
        self.sampler, self.eos_index, self.max_batch, self.fail = sampler, eos_index, max_batch, fail
        self.bitmask: Any = None  # (max_batch, words) int32 on the CPU: constrained rows' allowed tokens

    def _constrain(self, logits: Any, requests: list[BatchRequest]) -> None:
        """Masks each constrained row to the tokens its grammar allows next. Free rows pay nothing. On a GPU the
        masks are computed while the forward pass that made `logits` still runs (nothing has waited for it yet).
        A row whose grammar fails ends with the error; the others go on."""
        import torch

        rows: list[int] = []
        for row, request in enumerate(requests):
            if request.constraint is None or request.done:
                continue
            if self.bitmask is None:
                self.bitmask = torch.zeros((self.max_batch, bitmask_words(logits.shape[-1])), dtype=torch.int32)
            try:
                request.constraint.fill(self.bitmask[row])
                rows.append(row)
            except ConstraintError as exc:
                self.fail([request], exc, "constrained decoding")
        if rows:
            apply_token_bitmask(logits, self.bitmask, rows)

    def sample(self, logits: Any, requests: list[BatchRequest]) -> Any:
        """The next token of every row: raw log-softmax kept for rows that ask for logprobs, then each row's
        adjustments (bias, penalties, min_tokens), grammar masks, and greedy or sampled choice. Rows that use
        none of it pay nothing."""
        for row, request in enumerate(requests):
            if request.done:
                continue
            if request.params.logprobs is not None:
                request.scores = logits[row].float().log_softmax(-1)
            if request.params.adjusts_logits:
                adjust_logits(logits[row], request, self.eos_index)
        self._constrain(logits, requests)
        tokens = logits.argmax(dim=-1)
        for row, request in enumerate(requests):
            if request.params.temperature > 0 and not request.done:
                tokens[row] = self.sampler.draw(logits[row], request)
        return tokens


SPEC_NGRAM_MAX = 4  # the longest suffix of a row's tokens looked up for a draft
SPEC_NGRAM_MIN = 2  # a one-token match proposes too often to pay
SPEC_PRIOR_ACCEPTANCE = 0.5  # the chance a drafted token is taken (its predecessors were), before any row drafted
SPEC_MARGIN = 1.1  # a verify pass must promise this much more than a plain step's tokens a second (noise, optimism)
SPEC_EXPLORE_EVERY = 64  # declined drafts between passes taken anyway, per plain step a pass costs
SPEC_RECOVERY = 0.05  # each step a row does not draft, its acceptance drifts back this far towards the prior
SPEC_SMOOTHING = 0.7  # weight of the past in the running figures (a row's acceptance, a pass's seconds)
SPEC_HOLES_SHARE = 0.25  # rejected positions (holes in the rectangle) past this share of it are compacted away


def expected_accepted(chance: float, length: int) -> float:
    """The tokens a draft of `length` is expected to give: each is taken only if all before it were, each with
    `chance` (a copy runs until the output departs from the source, then the rest of the draft is wasted)."""
    return sum(chance**i for i in range(1, length + 1))


def observed_chance(drafted: int, accepted: int) -> float:
    """One pass's evidence of the chance a drafted token is taken: its accepted tokens against its first rejected
    one (none when the whole draft was taken)."""
    return accepted / (accepted + (accepted < drafted))


def draft_tokens(tokens: Any, k: int) -> list[int]:
    """Prompt lookup: the `k` tokens (at most) that followed the most recent earlier occurrence of the longest
    suffix of `tokens` (an int64 array: the row's prompt and output), from SPEC_NGRAM_MAX tokens down to
    SPEC_NGRAM_MIN; none when nothing matches. Every row drafts at every step, over its whole context: so one
    pass over it (where the last token occurred before), then only those places are extended backwards, one
    token at a time (a 32k-token context: ~0.04 ms a row; comparing every window of every length took ~1.2 ms)."""
    import numpy as np

    if len(tokens) < 2:
        return []
    last = len(tokens) - 1
    ends, matched = np.flatnonzero(tokens[:-1] == tokens[last]), 1  # where an earlier occurrence could end
    for back in range(1, SPEC_NGRAM_MAX):
        room = ends[ends >= back]
        longer = room[tokens[room - back] == tokens[last - back]]
        if not longer.size:
            break
        ends, matched = longer, back + 1
    if matched < SPEC_NGRAM_MIN:
        return []
    start = int(ends[-1]) + 1  # ascending: the most recent of the longest
    return [int(t) for t in tokens[start : start + k]]


class Speculation:
    """When a verify pass pays, and how wide: the measured seconds of a pass by batch size and width (1: a plain
    step) against the tokens the rows are expected to take from it (each one, plus `expected_accepted` of its
    draft cut to the width, from its own running chance). On a CPU with packed weights a wider pass costs more as
    the batch grows (SmolLM2, batch 1: 47 ms for 1 position, 62 for 5, 71 for 9; batch 8: 72, 165 and 240 ms), so
    a row that copies long runs drafts wide alone and narrow in a full batch. A width not measured yet at a batch
    size is costed between the measured ones either side; none wider: the widest is tried once. A row that has
    not drafted yet is expected to do what rows did lately (`prior`). Counts drafted and accepted tokens and
    passes."""

    def __init__(self, k: int) -> None:
        self.k, self.prior, self.declined = k, SPEC_PRIOR_ACCEPTANCE, 0
        self.seconds: dict[tuple[int, int], float] = {}  # (rows, positions) -> a pass's running seconds
        self.drafted = self.accepted = self.passes = 0

    def acceptance(self, request: BatchRequest) -> float:
        return self.prior if request.acceptance is None else request.acceptance

    def width(self, requests: list[BatchRequest], drafts: list[list[int]]) -> int:
        """The positions of the pass that pays best (1: a plain step), SPEC_MARGIN ahead of a plain step. Now and
        then the best pass is taken anyway (after SPEC_EXPLORE_EVERY declined drafts, times the pass's cost in
        plain steps): the figures it was declined on (one slow first pass, rows that have since started copying)
        are measured again."""
        rows, widest = len(requests), 1 + max(map(len, drafts), default=0)
        plain = self.seconds.get((rows, 1))
        if widest == 1 or plain is None:
            return 1  # a plain step first: what a verify pass has to beat
        costs, rates = {}, {}
        for width in range(2, widest + 1):
            seconds = self.cost(rows, width)
            if seconds is None:
                return widest  # not measured this wide at this batch size: tried once
            expected = sum(1 + expected_accepted(self.acceptance(r), min(len(d), width - 1))
                           for d, r in zip(drafts, requests, strict=True))  # fmt: skip
            costs[width], rates[width] = seconds, expected / seconds
        best = max(rates, key=rates.__getitem__)
        explore = SPEC_EXPLORE_EVERY * costs[best] / plain  # the dearer the pass, the rarer: ~1/64 of the time at most
        if rates[best] > SPEC_MARGIN * rows / plain or self.declined + 1 >= explore:
            self.declined = 0
            return best
        self.declined += 1
        return 1

    def cost(self, rows: int, width: int) -> float | None:
        """The seconds of a pass `width` wide over `rows` rows: measured, or read off the line between the nearest
        measured widths either side (a pass's cost grows about linearly with its width); None: none wider."""
        measured = sorted((w, s) for (r, w), s in self.seconds.items() if r == rows)
        for (low, below), (high, above) in itertools.pairwise(measured):
            if low < width <= high:
                return below + (above - below) * (width - low) / (high - low)
        return None

    def note(self, rows: int, positions: int, seconds: float) -> None:
        past = self.seconds.get((rows, positions))
        smoothed = seconds if past is None else SPEC_SMOOTHING * past + (1 - SPEC_SMOOTHING) * seconds
        self.seconds[(rows, positions)] = smoothed

    def drafts(self, requests: list[BatchRequest]) -> list[list[int]]:
        """Each row's draft: prompt lookup over its tokens, cut where its grammar would refuse a token and where
        max_tokens would end it. A row that does not draft drifts back towards the prior acceptance."""
        drafts = []
        for request in requests:
            left = request.params.max_new_tokens - request.generated - 1  # the pass's own token comes on top
            draft = draft_tokens(request.fed(), min(self.k, left)) if left > 0 else []
            if draft and request.constraint is not None:
                draft = draft[: request.constraint.valid_prefix(draft)]
            if not draft and request.acceptance is not None:
                request.acceptance += (self.prior - request.acceptance) * SPEC_RECOVERY
            drafts.append(draft)
        return drafts

    def taken(self, request: BatchRequest, drafted: int, accepted: int) -> None:
        self.drafted, self.accepted = self.drafted + drafted, self.accepted + accepted
        if drafted:
            chance = observed_chance(drafted, accepted)
            request.acceptance = SPEC_SMOOTHING * self.acceptance(request) + (1 - SPEC_SMOOTHING) * chance
            self.prior = SPEC_SMOOTHING * self.prior + (1 - SPEC_SMOOTHING) * chance


class Prefiller:
    """The forward passes that read prompts: a group left-padded to a common length, or one prompt (a long one,
    or a prefix-cache hit's new part) a slice at a time into a cache of its own; the legacy echo's prompt scores,
    sent once. Each ends with what `BatchScheduler._join` takes: lengths, the prompts' cache, their mask and the
    last position's logits."""

    def __init__(self, loaded: LoadedModel, prefill_tokens: int, texts: TokenTexts) -> None:
        self.loaded, self.prefill_tokens, self.texts = loaded, prefill_tokens, texts
        self.cache_kw = cache_keyword(loaded.model)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.loaded.model.config)
        cache.layers = [growing_layer()() for _ in cache.layers]
        return cache

    def chunked(self, family: Family, target: Batch | None) -> ChunkedPrefill:
        """A prompt prefilled in slices into a cache of its own: from the start, or after the prefix it shares
        with a cache entry (the cache then starts as views of the entry's first tokens; the first slice's forward
        copies them into buffers of the row's own, so the entry is never written)."""
        hit = family[0].hit
        if hit is None:
            return ChunkedPrefill(family, self.new_cache(), target)
        entry, shared = hit
        cache = self.new_cache()
        for layer, (keys, values) in zip(cache.layers, entry.layers, strict=True):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys[:, :, :shared], values[:, :, :shared]
        for request in family:
            request.reused = request.reused if request.cached else shared  # a preempted row's usage stays
        return ChunkedPrefill(family, cache, target, done=shared)

    def group(self, group: list[Family]) -> tuple[list[int], Any, Any, Any]:
        """One forward over the newcomers' prompts, left-padded to a common length."""
        import torch

        lengths = [int(family[0].input_ids.shape[1]) for family in group]
        longest = max(lengths)
        ids = torch.zeros((len(group), longest), dtype=torch.long, device=group[0][0].input_ids.device)
        mask = torch.zeros_like(ids)
        for row, (family, length) in enumerate(zip(group, lengths, strict=True)):
            ids[row, longest - length :] = family[0].input_ids[0]
            mask[row, longest - length :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from its first real token
        cache = self.new_cache()
        scored = any(family[0].params.prompt_logprobs for family in group)  # echo: every position's logits
        logits = self.loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self.cache_kw: cache},
                                   use_cache=True, logits_to_keep=0 if scored else 1).logits  # fmt: skip
        for row, (family, length) in enumerate(zip(group, lengths, strict=True)):
            if family[0].params.prompt_logprobs:
                self.send_prompt_scores(family, list(self.score_slice(family[0], logits[row, longest - length :], 0)))
        return lengths, cache, mask, logits[:, -1:, :]

    def slice(self, chunked: ChunkedPrefill) -> tuple[Any, Any] | None:
        """The next `prefill_tokens` of a chunked prompt into its cache; after the last, (its mask, its last
        logits)."""
        import torch

        request, start = chunked.family[0], chunked.done
        length = int(request.input_ids.shape[1])
        end = min(start + self.prefill_tokens, length)
        device = request.input_ids.device
        scored = request.params.prompt_logprobs
        logits = self.loaded.model(input_ids=request.input_ids[:, start:end],
                                   attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                                   position_ids=torch.arange(start, end, device=device).unsqueeze(0),
                                   **{self.cache_kw: chunked.cache}, use_cache=True,
                                   logits_to_keep=0 if scored else 1).logits  # fmt: skip
        if scored:
            chunked.scores.extend(self.score_slice(request, logits[0], start))
        chunked.done = end
        if end < length:
            return None
        if scored:
            self.send_prompt_scores(chunked.family, chunked.scores)
        return torch.ones((1, end), dtype=torch.long, device=device), logits[:, -1:, :]

    def score_slice(self, request: BatchRequest, logits: Any, start: int) -> Iterator[TokenScore]:
        """The prompt tokens that `logits` (positions `start`... of the prompt) predict, scored."""
        prompt = request.input_ids[0].tolist()
        k = request.params.logprobs or 0
        if start == 0:
            yield TokenScore(*_first_token(self.texts, prompt[0]))
        logprobs = logits.float().log_softmax(-1)
        for j in range(min(len(logits), len(prompt) - start - 1)):
            yield self.texts.score(logprobs[j], prompt[start + j + 1], k)

    @staticmethod
    def send_prompt_scores(family: Family, scores: list[TokenScore]) -> None:
        for request in family:
            request.out.put(PromptScores(tuple(scores), request.choice))
            request.params = replace(request.params, prompt_logprobs=False)  # once: a preempted row is not rescored


class Stepper:
    """The decode passes over one group of rows: a plain step (each row's newest token), or a verify pass over
    their drafts; every token chosen by `RowSampler` and emitted through one per-token step."""

    def __init__(self, loaded: LoadedModel, sampler: RowSampler, eos: set[int], texts: TokenTexts,
                 fail: Callable[[list[BatchRequest], Exception, str], None]) -> None:  # fmt: skip
        self.model, self.rows_sampler, self.eos, self.texts, self.fail = loaded.model, sampler, eos, texts, fail
        self.cache_kw = cache_keyword(loaded.model)

    def first(self, logits: Any, requests: list[BatchRequest]) -> Any:
        """The first tokens of rows just prefilled (from their last prompt position), chosen as every later one."""
        return self.rows_sampler.sample(logits[:, -1, :], requests)

    def plain(self, batch: Batch) -> None:
        """Each row's newest token through the model, then each row's next token chosen and emitted."""
        ids, mask, positions = batch.step_inputs()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            **{self.cache_kw: batch.cache}, use_cache=True).logits  # fmt: skip
        tokens = self.rows_sampler.sample(logits[:, -1, :], batch.requests)
        batch.next_tokens = tokens.view(-1, 1)
        for request, token in zip(batch.requests, tokens.tolist(), strict=True):
            request.cached += 1
            self.emit(request, int(token))

    def verify(self, batch: Batch, drafts: list[list[int]], positions: int) -> list[int]:
        """One pass over each row's newest token and its draft (`positions` a row; a shorter draft padded). Each
        position's token is chosen exactly as a plain step would choose it (adjustments, grammar mask, greedy or
        the row's sampler seeded by position) and emitted; a row goes on while its token equals its draft's, so
        the output is what plain decoding gives. The rejected tail is cut from the cache, or masked out in a
        row that took fewer than another. Returns the tokens each row took (its draft's accepted ones and one)."""
        import torch

        rows, width = len(batch), batch.width()
        device = batch.mask.device
        padded = [draft + [0] * (positions - 1 - len(draft)) for draft in drafts]
        ids = torch.cat([batch.next_tokens, torch.tensor(padded, dtype=torch.long, device=device)], dim=1)
        mask = torch.cat([batch.mask, batch.mask.new_ones(rows, positions)], dim=1)
        at = torch.tensor([[r.cached] for r in batch.requests], device=device) + torch.arange(positions, device=device)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=at,
                            **{self.cache_kw: batch.cache}, use_cache=True).logits  # fmt: skip
        taken, last, alive = [0] * rows, [0] * rows, list(range(rows))
        for j in range(positions):
            requests = [batch.requests[r] for r in alive]
            tokens = self.rows_sampler.sample(logits[alive, j, :], requests).tolist()
            going = []
            for r, request, token in zip(alive, requests, tokens, strict=True):
                taken[r], last[r] = j + 1, token
                self.emit(request, token)
                if not request.done and j < len(drafts[r]) and token == drafts[r][j]:
                    going.append(r)
            alive = going
        kept = max(taken)
        for layer in batch.cache.layers:
            layer.crop(width + kept)
        batch.mask = mask[:, : width + kept]
        for r, request in enumerate(batch.requests):
            batch.mask[r, width + taken[r] :] = 0
            request.cached += taken[r]
        batch.next_tokens = torch.tensor(last, device=device).view(-1, 1)
        if batch.holes() > SPEC_HOLES_SHARE:
            batch.compact()
        return taken

    def emit(self, request: BatchRequest, token: int) -> None:
        """The per-token step of the batch: counts, end of text, the grammar, logprobs, the decoder, max_tokens."""
        if request.done:
            return  # its constraint failed at this step
        request.generated += 1
        request.history.append(token)
        count_token(request, token)
        ends = token in self.eos and not request.params.ignore_eos
        if request.constraint is not None and not ends:
            try:
                request.constraint.advance(token)
            except ConstraintError as exc:
                self.fail([request], exc, "constrained decoding")
                return
        scores, request.scores = request.scores, None
        score = self.texts.score(scores, token, request.params.logprobs or 0) if scores is not None else None
        text = request.accept(token, ends, score)
        if text is None:
            request.finish("stop")
            return
        request.put(text)
        if request.constraint is not None and request.constraint.complete:
            request.finish("stop")  # the output is whole: end now rather than spend a step on end-of-text
        elif request.generated >= request.params.max_new_tokens:
            request.finish("length")


class Rows:
    """The batch's rows and their KV memory: the groups (each a `Batch`: its own rectangle and forward pass), the
    chunked prefill in progress, and the waiting queue; where newcomers go within the budget (`fits`), which rows
    give way when a step would pass it (`make_room`, `preempt`), and what is held."""

    def __init__(self, kv: KvBudget, prefix: PrefixCache, prefill_tokens: int, max_batch: int, device: Any) -> None:
        self.kv, self.prefix, self.device = kv, prefix, device
        self.queue = PrefillQueue(prefix, prefill_tokens, max_batch, self.fits)
        self.chunked: ChunkedPrefill | None = None  # a prompt longer than `prefill_tokens`, prefilled in slices
        self.batches: list[Batch] = []  # groups of rows, each its own rectangle and forward pass (KV_GROUPS)
        self.target: Batch | None = None  # where the newcomers being admitted go (None: a new group)
        self.joined = itertools.count()  # admission order: the youngest row is preempted first

    def requests(self) -> list[BatchRequest]:
        return [request for batch in self.batches for request in batch.requests]

    def running(self) -> int:
        return sum(map(len, self.batches))

    def count(self) -> int:
        return self.running() + (len(self.chunked.family) if self.chunked is not None else 0)

    def idle(self) -> bool:
        return not self.batches and self.chunked is None

    def shed(self, exc: Exception) -> None:
        """After an out-of-memory error in a step (other programs on the GPU, fragmentation, a budget set too
        high): the budget drops to 90% of what was held, the prefix cache empties, and every row is preempted;
        none fails. They come back as the lowered budget allows."""
        held = sum(cache_bytes(batch.cache) for batch in self.batches) + self.prefix.held
        self.kv.budget = int(min(self.kv.budget or held, held) * KV_OUT_OF_MEMORY_SHARE)
        log.warning("out of memory in a step of %d rows (%s): KV budget lowered to %s; the rows wait to be "
                    "prefilled again", self.running(), exc.__class__.__name__, size_text(self.kv.budget))  # fmt: skip
        self.prefix.shrink(0)
        for batch in list(self.batches):
            self.preempt(batch, list(range(len(batch))))
        self.release_memory()

    def release_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def shapes(self) -> list[tuple[int, int]]:
        """Each group's (rows, width) as admission plans it: a chunked prefill in progress counted in its target."""
        shapes = [(len(batch), batch.width()) for batch in self.batches]
        if self.chunked is not None:
            rows, width = len(self.chunked.family), int(self.chunked.family[0].input_ids.shape[1])
            if self.chunked.target in self.batches:
                i = self.batches.index(self.chunked.target)
                shapes[i] = (shapes[i][0] + rows, max(shapes[i][1], width))
            else:
                shapes.append((rows, width))
        return shapes

    def fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` more rows, the longest prompt `longest` tokens, may join now, and where
        (`KvBudget.place`: a group they fit in, or a group of their own, so that a long row does not widen short
        ones past the budget); the prefix cache gives way. Always when nothing else runs: a request alone must make
        progress (the 400 at admission keeps it within the budget)."""
        kv = self.kv
        place, need = kv.place(self.shapes(), rows, longest, KV_GROUPS)
        if self.idle() or kv.fits(need):
            self.target = self.batches[place] if place < len(self.batches) else None
            if kv.budget is not None:
                self.prefix.shrink(kv.budget - need)
            kv.holding, kv.waiting = False, self.queue.waiting_rows()
            return True
        if not kv.holding:
            log.warning("KV budget: holding requests back for memory (%s held of %s; %d more rows would need %s)",
                        size_text(kv.held), size_text(kv.budget or 0), rows, size_text(need))  # fmt: skip
        kv.holding, kv.waiting = True, self.queue.waiting_rows() + rows
        return False

    def preempt(self, batch: Batch, rows: list[int]) -> None:
        """Takes rows out of a group, giving their memory back. Each goes to the front of the queue as it
        stands (sampler, decoder, grammar, penalties), to be prefilled again from its prompt and the tokens it
        has emitted: its stream pauses, then goes on; nothing sent is lost or sent twice. Exact for greedy up to
        a prefill's numerics; a sampled row draws by (seed, position), so the same tokens."""
        import torch

        for row in sorted(rows, key=lambda row: batch.requests[row].joined, reverse=True):  # the oldest first in line
            request = batch.requests[row]
            emitted = request.input_ids.new_tensor([request.history])
            request.input_ids, request.history, request.hit = torch.cat([request.input_ids, emitted], dim=1), [], None
            request.prompt_ids = None
            self.queue.preempted.appendleft([request])
        self.kv.preempted += len(rows)
        self.kv.waiting = self.queue.waiting_rows()
        self.keep(batch, [i for i in range(len(batch)) if i not in rows])

    def keep(self, batch: Batch, keep: list[int]) -> None:
        batch.keep(keep)
        if not batch:
            self.batches.remove(batch)
        self.note_held()

    def note_held(self, transient: int = 0) -> None:
        chunked = self.chunked.cache if self.chunked is not None else None
        live = sum(cache_bytes(batch.cache) for batch in self.batches) + cache_bytes(chunked)
        self.kv.note(live + self.prefix.held, transient)

    def make_room(self, batch: Batch, columns: int) -> None:
        """Before a step that allocates a group's buffers anew: if every group together would pass the budget,
        the prefix cache gives way, then the youngest rows of any group are preempted, until they fit. One row
        always stays (alone, it fits: checked at admission)."""
        kv = self.kv
        while kv.budget is not None and batch and batch.width() + columns > batch.capacity():
            others = sum(cache_bytes(b.cache) for b in self.batches if b is not batch)
            chunked = cache_bytes(self.chunked.cache) if self.chunked is not None else 0
            need = kv.rectangle(len(batch), batch.width() + columns) + others + chunked
            if need <= kv.budget or self.running() == 1:
                self.prefix.shrink(kv.budget - need)
                return
            group, row = max(((b, i) for b in self.batches for i in range(len(b))),
                             key=lambda found: found[0].requests[found[1]].joined)  # fmt: skip
            self.preempt(group, [row])

    def wait_for_memory(self, group: list[Family]) -> None:
        """Newcomers whose prefill ran out of memory beside running rows: the budget drops to 90% of what is
        held, and they wait at the front of the queue."""
        self.note_held()
        self.kv.budget = int(min(self.kv.budget or self.kv.held, self.kv.held) * KV_OUT_OF_MEMORY_SHARE)
        log.warning("out of memory in a prefill beside %d rows: KV budget lowered to %s; the newcomers wait",
                    self.running(), size_text(self.kv.budget))  # fmt: skip
        self.queue.preempted.extendleft(reversed(group))
        self.release_memory()

    def live_bytes(self) -> int:
        """What the groups and the chunked prefill hold (the prefix cache aside)."""
        return sum(cache_bytes(b.cache) for b in self.batches) + cache_bytes(self.chunked and self.chunked.cache)


class BatchScheduler:
    """Continuous batching: one thread steps every active request together. Newcomers are prefilled before the
    next step, in left-padded groups of up to `prefill_tokens` prompt tokens, their KV cache merged into the
    batch's (left-padded to a common length), and from then on each step is one forward pass over all rows, each
    with its own position ids. Rows leave as they finish or are cancelled; requests join and leave between steps.
    A prompt with n choices is prefilled once and its cache rows copied n times. Device-agnostic: plain tensor
    ops on the model's device."""

    def __init__(self, loaded: LoadedModel, max_batch: int, prefill_tokens: int = 0, prefix_cache_bytes: int = 0,
                 kv_cache_bytes: int = 0, speculative_tokens: int = 0) -> None:  # fmt: skip
        import torch

        self.loaded = loaded
        self.prefix = PrefixCache(prefix_cache_budget(prefix_cache_bytes, loaded.model.device))
        log.info("prefix cache: %s", size_text(self.prefix.budget) if self.prefix.budget else "off")
        self.kv = KvBudget(kv_budget(kv_cache_bytes, loaded.model.device), kv_token_bytes(loaded.model))
        limit = self.kv.limit()
        log.info("KV budget: %s (%s a token)", f"{size_text(limit.budget_bytes)}, {limit.tokens} tokens for one request"
                 if limit else "none (KV_CACHE_BYTES=0)", size_text(self.kv.token_bytes))  # fmt: skip
        self.max_batch = max_batch
        on_cpu = loaded.model.device.type == "cpu"
        self.prefill_tokens = prefill_tokens or (CPU_PREFILL_TOKENS if on_cpu else ACCELERATOR_PREFILL_TOKENS)
        eos = eos_ids(loaded)
        eos_index = torch.tensor(sorted(eos), device=loaded.model.device) if eos else None
        texts = TokenTexts(loaded.tokenizer)
        self.prefiller = Prefiller(loaded, self.prefill_tokens, texts)
        sampler = RowSampler(Sampler(loaded.model.generation_config), eos_index, max_batch, self._fail)
        self.stepper = Stepper(loaded, sampler, eos, texts, self._fail)
        self.rows = Rows(self.kv, self.prefix, self.prefill_tokens, max_batch, loaded.model.device)
        self.spec = Speculation(speculative_tokens) if speculative_tokens else None
        self.thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self.thread.start()

    def submit(self, family: Family) -> None:
        self.rows.queue.pending.put(family)

    def _run(self) -> None:
        import torch

        while True:
            try:
                with torch.inference_mode():
                    self._admit()
                    self._drop_cancelled()
                    if self.rows.chunked is not None:
                        self._prefill_chunk(self.rows.chunked)
                    for batch in list(self.rows.batches):
                        self._step(batch)
            except Exception as exc:
                if is_out_of_memory(exc) and self.rows.running() > 1:
                    self.rows.shed(exc)
                    continue
                self._fail(self.rows.requests(), self._alone(exc), "batched generation")  # the batch is lost
                self.rows.batches = []

    def _alone(self, exc: Exception) -> Exception:
        """What a request that failed alone is told: out of memory, a clear 503; anything else as it is."""
        if not is_out_of_memory(exc):
            return exc
        return DeviceOutOfMemory(f"the device ran out of memory for this request ({exc.__class__.__name__}); "
                                 "retry it with fewer tokens, or lower KV_CACHE_BYTES")  # fmt: skip

    def _admit(self) -> None:
        """Prefills everyone waiting, group by group, before the next decode step (prefill first, as vLLM does):
        a newcomer waits for at most one step plus the prefills ahead of it, and requests that arrive during a
        prefill join the next group instead of waiting behind a step. A prompt longer than `prefill_tokens` is
        prefilled in slices instead, one per step (`_prefill_chunk`), so it does not stall the others."""
        rows = self.rows
        while rows.count() < self.max_batch and (group := rows.queue.next_group(rows.count(), wait=rows.idle())):
            first = group[0][0]
            left = int(first.input_ids.shape[1]) - (first.hit[1] if first.hit is not None else 0)
            if len(group) == 1 and (left > self.prefill_tokens or first.hit is not None):
                if self.rows.chunked is not None:
                    self.rows.queue.held = group[0]  # one such prompt at a time; it waits for the current one
                    return
                self.rows.chunked = self.prefiller.chunked(group[0], self.rows.target)
                if left <= self.prefill_tokens:  # a cache hit with a short new part: its one slice now
                    self._prefill_chunk(self.rows.chunked)
                continue
            try:
                self._prefill(group)
            except Exception as exc:  # only these requests fail, or wait; the batch goes on
                self._failed_prefill(group, exc)

    def _failed_prefill(self, group: list[Family], exc: Exception) -> None:
        """Newcomers whose prefill failed: out of memory while others run, they wait at the front of the queue
        (the budget lowered to 90% of what is held); otherwise they fail, and the batch goes on."""
        if is_out_of_memory(exc) and self.rows.batches:
            self.rows.wait_for_memory(group)
            return
        self._fail([r for family in group for r in family], self._alone(exc), "prefill")

    def _fail(self, requests: list[BatchRequest], exc: Exception, what: str) -> None:
        log.exception("%s failed", what)
        for request in requests:
            request.done = True
            request.out.put(exc)
            request.out.put(_BATCH_END)

    def _remember(self, request: BatchRequest, tokens: Any, row: int, batch: Batch) -> None:
        """`tokens` (int64 array) and their KV, the last `len(tokens)` real positions of `row` in the group's
        cache (holes skipped), into the prefix cache (copied: the live cache goes on changing)."""
        if self.prefix.budget:
            columns = batch.mask[row].nonzero().view(-1)[-len(tokens) :]
            rows = slice(row, row + 1)
            layers = [(layer.keys[rows, :, columns], layer.values[rows, :, columns]) for layer in batch.cache.layers]
            room = self.kv.budget - self.rows.live_bytes() if self.kv.budget is not None else None
            self.prefix.store(request.params.cache_salt, tokens, layers, room)

    def _remember_answer(self, request: BatchRequest, row: int, batch: Batch) -> None:
        """A finished row's prompt and answer: the next turn of a conversation starts with them when the chat
        template writes the answer back as it was generated."""
        self._remember(request, request.fed()[: request.cached], row, batch)

    def _prefill(self, group: list[Family]) -> None:
        self._join(group, *self.prefiller.group(group))

    def _prefill_chunk(self, chunked: ChunkedPrefill) -> None:
        """The next slice of the chunked prompt; after the last, it joins the group chosen at its admission."""
        try:
            whole = self.prefiller.slice(chunked)
            if whole is not None:
                self.rows.chunked, self.rows.target = None, chunked.target
                self._join([chunked.family], [int(chunked.family[0].input_ids.shape[1])], chunked.cache, *whole)
        except Exception as exc:  # only this request fails, or waits; the batch goes on
            self.rows.chunked = None
            self._failed_prefill([chunked.family], exc)

    def _join(self, group: list[Family], lengths: list[int], cache: Any, mask: Any, logits: Any) -> None:
        """Copies each prompt's row once per choice, samples the first tokens, merges the rows into the batch,
        and keeps each prompt's KV in the prefix cache. A choice asked for no new tokens (echo only) ends here.
        A preempted row comes back as it stood (its per-row state is not made again)."""
        import torch

        requests = [request for family in group for request in family]
        if len(requests) > len(group):
            index = torch.tensor([row for row, family in enumerate(group) for _ in family], device=mask.device)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
            lengths = [length for length, family in zip(lengths, group, strict=True) for _ in family]
        for request in requests:
            if not request.cached:
                prepare_row(request, vocab_size(self.loaded))
                request.joined = next(self.rows.joined)
        tokens = self.stepper.first(logits, requests)
        target = self.rows.target  # the group admission chose, or a new one
        batch = target if target in self.rows.batches else Batch()
        first = len(batch)
        batch.merge(requests, cache, mask, tokens)
        if not first:
            self.rows.batches.append(batch)
        self.rows.note_held(transient=cache_bytes(cache) if first else 0)  # the old rows, their merged copy, the new
        row = first
        for family in group:  # its prompt, as the last positions of its first row
            self._remember(family[0], family[0].fed(), row, batch)
            row += len(family)
        for request, length, token in zip(requests, lengths, tokens.tolist(), strict=True):
            request.cached = length
            if request.params.max_new_tokens == 0:
                request.finish("length")
                continue
            self.stepper.emit(request, int(token))
        self._retire(batch)

    def _step(self, batch: Batch) -> None:
        """One pass over a group's rows: a plain step (each row's newest token), or a verify pass where drafts
        are expected to pay (`Speculation`). Timed for that choice."""
        spec = self.spec
        self.rows.make_room(batch, 1 + (spec.k if spec is not None else 0))
        if not batch:
            return  # all of it preempted
        started, rows = time.perf_counter(), len(batch)
        drafts = spec.drafts(batch.requests) if spec is not None else []
        positions = spec.width(batch.requests, drafts) if spec is not None else 1
        if spec is not None and positions > 1:
            drafts = [draft[: positions - 1] for draft in drafts]
            for request, draft, taken in zip(batch.requests, drafts, self.stepper.verify(batch, drafts, positions),
                                             strict=True):  # fmt: skip
                spec.taken(request, len(draft), taken - 1)
            spec.passes += 1
            self.rows.note_held()
        else:
            grows = batch.width() + 1 > batch.capacity()
            self.stepper.plain(batch)
            if grows:
                self.rows.note_held()
        if spec is not None:
            spec.note(rows, positions, time.perf_counter() - started)
        self._retire(batch)

    def _drop_cancelled(self) -> None:
        if self.rows.chunked is not None and all(r.stopped for r in self.rows.chunked.family):
            family, self.rows.chunked = self.rows.chunked.family, None  # before finish(): its reader may look at once
            for request in family:
                request.finish("cancelled")
        self.rows.queue.drop_stopped()
        self.kv.waiting = self.rows.queue.waiting_rows()
        for batch in list(self.rows.batches):
            for request in batch.requests:
                if request.stopped and not request.done:
                    request.finish("cancelled")  # stops at this step: its row is not computed again
            self._retire(batch)

    def _retire(self, batch: Batch) -> None:
        """Drops a group's finished rows (their prompt and answer into the prefix cache), then the left-padding
        columns that no remaining row needs; an empty group goes."""
        keep = [i for i, request in enumerate(batch.requests) if not request.done]
        if len(keep) == len(batch):
            return
        for row, request in enumerate(batch.requests):
            if request.done and request.cached > 1:
                self._remember_answer(request, row, batch)
        self.rows.keep(batch, keep)


def batchable(loaded: LoadedModel) -> bool:
    """Text-only models whose cache is plain (no sliding-window layers): the ones the scheduler can merge."""
    config = loaded.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sliding = getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True)
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    return loaded.vision is None and not sliding and layer_types == {"full_attention"}


def stream_batched(
    scheduler: BatchScheduler, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event,
    ends: Sequence[threading.Event] = (), resume: Sequence[ChoiceResume] = (),
) -> Iterator[EngineEvent]:  # fmt: skip
    """One prompt's n choices as rows of the batch, prefilled once. A continued choice (`resume`) is a family of
    its own: its prompt is the original one plus the tokens it had emitted."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    out: queue.Queue[object] = queue.Queue()
    family: Family = []
    families = [family]
    for choice in range(params.n):
        state = resume[choice] if choice < len(resume) else ChoiceResume()
        if state.finished:
            continue
        end = ends[choice] if choice < len(ends) else None
        row = make_row(scheduler.loaded, prompt, params, cancel, out, choice, choice_seed(seed, choice), end, state)
        if not state.tokens and not state.scored:
            family.append(row)
        elif len(state.tokens) >= params.max_new_tokens:  # it had reached max_tokens: only its finish was lost
            row.finish("length")
        else:
            families.append([row])
    running = sum(1 for c in range(params.n) if not (c < len(resume) and resume[c].finished))
    for submitted in families:
        if submitted:
            scheduler.submit(submitted)
    try:
        while running:
            item = out.get()
            if item is _BATCH_END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        cancel.set()  # a reader that leaves takes its rows out at the next step


# ==== 13. Serving engine ============================================================================================
# TransformersEngine: loads once, templates a prompt, streams it through the batch or generate().


PROMPT_TAIL_TOKENS = 8  # enough of the rendered prompt's end to see a `<think>` the template opened


def chat_template_source(loaded: LoadedModel) -> str:
    source = getattr(loaded.processor, "chat_template", None) or getattr(loaded.tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one
        source = source.get("default") or next(iter(source.values()), "")
    return str(source or "")


@functools.lru_cache(maxsize=8)
def template_variables(source: str) -> frozenset[str]:
    """The variables a chat template reads, parsed once per template (not once per request)."""
    import jinja2.meta

    try:
        return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source)))
    except jinja2.TemplateError:
        return frozenset()


def check_renders_tools(source: str, model_name: str) -> None:
    """Tools need a template that shows them to the model and a call format the parser reads (Qwen2.5, Qwen3,
    Hermes: `<tool_call>` blocks); known from the template itself, never from the model's name."""
    if "tools" not in template_variables(source):
        raise BadRequest(f"the chat template of {model_name} cannot render tools", param="tools")
    if TOOL_CALL_OPEN not in source:
        raise BadRequest(f"the chat template of {model_name} asks for tool calls in a format this server does not "
                         f"parse (it reads {TOOL_CALL_OPEN} blocks)", param="tools")  # fmt: skip


def reasoning_mode(source: str, prompt_tail: str, kwargs: Mapping[str, Any]) -> ReasoningMode:
    """`open` when the prompt itself ends inside `<think>` (Qwen3-*-Thinking-2507); `maybe` when the template
    lets the model think and the request did not turn it off (Qwen3 hybrid: the model writes `<think>`); `off`
    otherwise. Deliberate: Qwen3-Instruct-2507's template mentions `<think>` only to render history, so the
    template's text alone is not enough: no `enable_thinking`, no reasoning parser (one on an Instruct-2507 model
    is what broke structured outputs in vLLM #23315)."""
    if prompt_tail.rstrip().endswith(THINK_OPEN):
        return "open"
    if "enable_thinking" in source and THINK_OPEN in source and kwargs.get("enable_thinking") is not False:
        return "maybe"
    return "off"


class TransformersEngine:
    """The real engine: a `ModelHandle`, chat templating, and `infer_stream`."""

    def __init__(self, settings: Settings) -> None:
        self.handle = ModelHandle(settings)
        self.model_name = settings.model_id()
        self._scheduler: BatchScheduler | None = None
        self._scheduler_lock = threading.Lock()
        self._grammars: GrammarCompiler | None = None
        self._texts: TokenTexts | None = None

    def is_loaded(self) -> bool:
        return self.handle.is_loaded

    def placement(self) -> Placement | None:
        return self.handle.placement

    def prefix_cache_stats(self) -> dict[str, int]:
        """Read from another thread than the batch's: plain ints, each read whole."""
        scheduler = self._scheduler
        if scheduler is None:
            return {}
        cache = scheduler.prefix
        return {**cache.stats, "bytes": cache.held, "peak_bytes": cache.peak, "budget_bytes": cache.budget}

    def batch_stats(self) -> dict[str, int]:
        scheduler = self._scheduler
        if scheduler is None:
            return {}
        spec = scheduler.spec
        drafted, accepted = (spec.drafted, spec.accepted) if spec is not None else (0, 0)
        passes = spec.passes if spec is not None else 0
        return {**scheduler.kv.stats(), "drafted_tokens": drafted, "accepted_tokens": accepted, "verify_passes": passes}

    def kv_limit(self) -> KvLimit | None:
        """Made when first asked (the budget is measured once the model is loaded), by the batch: the generate()
        path runs one request's choices at a time and has none."""
        scheduler = self.scheduler_for(self.handle.get())
        return scheduler.kv.limit() if scheduler is not None else None

    def load_error(self) -> str | None:
        return self.handle.error

    def load(self) -> None:
        self.handle.get()

    def context_length(self) -> int | None:
        config = self.handle.get().model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text_config, "max_position_embeddings", None)
        return int(value) if value else None

    def prepare(
        self, messages: list[dict[str, Any]], params: GenerationParams, template: TemplateInputs | None = None
    ) -> PreparedPrompt:
        import jinja2

        loaded, template = self.handle.get(), template or TemplateInputs()
        check_logit_bias(params.logit_bias, vocab_size(loaded))
        refs = media_refs(messages)
        if refs and loaded.vision is None:
            raise BadRequest(f"model {self.model_name} does not accept images or videos", param=refs[0].param)
        check_media_count(refs, self.handle.settings.max_images_per_request)
        source = chat_template_source(loaded)
        if template.tools:
            check_renders_tools(source, self.model_name)
        try:
            if loaded.vision is None:
                inputs = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True, return_tensors="pt",
                                                              **template.as_kwargs())  # fmt: skip
            else:
                inputs = encode_vision(loaded.vision, messages, refs, self.handle.settings, template.as_kwargs())
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise BadRequest(f"the chat template rejected these messages: {exc}", param="messages") from exc
        inputs = inputs.to(loaded.model.device)
        tail = loaded.tokenizer.decode(inputs["input_ids"][0, -PROMPT_TAIL_TOKENS:])
        reasoning, constraint = reasoning_mode(source, tail, template.kwargs), params.constraint
        if constraint is not None and constraint.kind.startswith("auto"):
            # `strict` with `auto` needs the call tag as one token (the free text must end where a call starts)
            # and no reasoning (its tags are tokens the free text cannot hold): otherwise it is not enforced
            usable = reasoning == "off" and self.grammars(loaded).tag_is_token(TOOL_CALL_OPEN)
            constraint = constraint if usable else None
        # deliberate: a forced answer starts at its first token, so it has no reasoning to parse, even where the
        # prompt opened <think> (the grammar is what the model writes)
        reasoning = "off" if constraint is not None else reasoning
        output = OutputFormat(bool(template.tools), reasoning, params.parallel_tool_calls)
        grammar = self.grammars(loaded).compile(constraint) if constraint is not None else None
        return PreparedPrompt(inputs, int(inputs["input_ids"].shape[1]), grammar, output)

    def grammars(self, loaded: LoadedModel) -> GrammarCompiler:
        settings = self.handle.settings
        with self._scheduler_lock:
            if self._grammars is None:
                timeout, size = settings.grammar_compile_timeout_seconds, settings.grammar_cache_size
                self._grammars = GrammarCompiler(loaded.tokenizer, vocab_size(loaded), eos_ids(loaded), timeout, size)
        return self._grammars

    def prepare_text(self, prompt: str | list[int], params: GenerationParams) -> PreparedPrompt:
        """A raw prompt (the legacy completions): text tokenized as it is, no chat template, or token ids."""
        import torch

        loaded = self.handle.get()
        width = vocab_size(loaded)
        check_logit_bias(params.logit_bias, width)
        if isinstance(prompt, str):
            ids = loaded.tokenizer(prompt)["input_ids"]
            if not ids:
                raise BadRequest("the prompt is empty", param="prompt")
        else:
            ids = prompt
            if (bad := next((t for t in ids if not 0 <= t < width), None)) is not None:
                raise BadRequest(f"prompt: token id {bad} is not in the vocabulary (0-{width - 1})", param="prompt")
        input_ids = torch.tensor([ids], dtype=torch.long, device=loaded.model.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        text = prompt if isinstance(prompt, str) else str(loaded.tokenizer.decode(ids, skip_special_tokens=True))
        grammar = self.grammars(loaded).compile(params.constraint) if params.constraint is not None else None
        return PreparedPrompt(inputs, len(ids), grammar, text=text)  # a constraint: a restart's continued chat

    def texts(self, loaded: LoadedModel) -> TokenTexts:
        with self._scheduler_lock:
            if self._texts is None:
                self._texts = TokenTexts(loaded.tokenizer)
        return self._texts

    def stream(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event,
        ends: Sequence[threading.Event] = (), resume: Sequence[ChoiceResume] = (),
    ) -> Iterator[EngineEvent]:  # fmt: skip
        """Text requests join the continuous batch; what it cannot take (images, sliding-window caches, or
        BATCHING=off) runs its own `generate`, a choice at a time. `ends[i]` ends choice i alone; `resume[i]`
        continues choice i where a restart found it."""
        loaded = self.handle.get()
        scheduler = self.scheduler_for(loaded)
        if scheduler is not None:
            return stream_batched(scheduler, prompt, params, cancel, ends, resume)
        why = "BATCHING=off" if self.handle.settings.batching == "off" else "a vision model, or sliding-window layers"
        log.debug("generate() path (%s): no prefix cache", why)
        return infer_stream(loaded, self.texts(loaded), prompt, params, cancel, ends, resume)

    def scheduler_for(self, loaded: LoadedModel) -> BatchScheduler | None:
        settings = self.handle.settings
        if settings.batching == "off" or not batchable(loaded):
            return None
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = BatchScheduler(loaded, settings.max_batch_size, settings.prefill_batch_tokens,
                                                 settings.prefix_cache_bytes, settings.kv_cache_bytes,
                                                 settings.speculative_tokens)  # fmt: skip
        return self._scheduler


# ==== 14. Sessions ==================================================================================================
# Ring buffer, session, store; continuation plans and journaled steps; following another
# replica's session.


class SessionState:
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    ENDED = (FINISHED, CANCELLED, FAILED, INTERRUPTED)


@dataclass(frozen=True)
class Event:
    index: int
    data: str  # the `data:` payload: chunk JSON, error JSON, or "[DONE]"


class ReadCursor:
    """A reader's place in a RingBuffer. Held weakly: a response dropped before its body ever ran (the client left
    during the headers) lets its events go with it instead of pinning them."""


class RingBuffer:
    """The last `capacity` events of a session, addressed by their absolute index. Events that an attached reader
    has not read yet stay past the capacity until it has: a burst of appends (the runner drains its queue without
    yielding to the readers) must never outrun a live stream. A stalled reader so holds at most its session."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: list[str] = []
        self.first_index = 0  # absolute index of _items[0]
        self._unread: weakref.WeakKeyDictionary[ReadCursor, int] = weakref.WeakKeyDictionary()  # -> its next index

    @property
    def next_index(self) -> int:
        return self.first_index + len(self._items)

    def append(self, data: str) -> int:
        self._items.append(data)
        self._trim()
        return self.next_index - 1

    def hold(self, cursor: ReadCursor, index: int) -> None:
        """Keeps events from `index` on for `cursor` (called again as it reads on); release() lets them go."""
        self._unread[cursor] = index
        self._trim()

    def release(self, cursor: ReadCursor) -> None:
        self._unread.pop(cursor, None)
        self._trim()

    def _trim(self) -> None:
        keep_from = min(self._unread.values(), default=self.next_index)
        drop = min(len(self._items) - self.capacity, keep_from - self.first_index)
        if drop > 0:
            del self._items[:drop]
            self.first_index += drop

    def read_from(self, index: int) -> list[Event]:
        """Events from `index` on; past the end, none (not yet); before the window, EventsGone."""
        if index < self.first_index:
            raise EventsGone(
                f"events before index {self.first_index} are no longer held (asked from {index})",
                param="Last-Event-ID",
            )
        start = index - self.first_index
        return [Event(self.first_index + i, d) for i, d in enumerate(self._items[start:], start)]


@dataclass(frozen=True)
class StoredSession:
    id: str
    state: str
    meta: StreamMeta
    created_at: float
    ended_at: float | None
    events: list[Event]
    lost_from: int | None = None  # events from this index on were sent but never journaled (the journal failed)
    plan: str = ""  # ContinuationPlan JSON; "" when it cannot be continued
    steps: tuple[EngineEvent, ...] = ()  # loaded for a session a restart continues


@dataclass(frozen=True)
class ContinuationPlan:
    """What a restart needs to continue a generation: each prompt's token ids (after the chat template) and raw
    text, how to read the output, and the parameters, with the seed fixed at the start (a sampled request without
    one gets one), so that the continuation draws what the first run would have."""

    prompts: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]
    output: OutputFormat
    params: GenerationParams

    def to_json(self) -> str:
        return json.dumps({"prompts": self.prompts, "texts": self.texts, "output": asdict(self.output),
                           "params": asdict(self.params)}, separators=(",", ":"))  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> ContinuationPlan:
        data = json.loads(text)
        params = dict(data["params"])
        constraint = params.pop("constraint")
        params.update(stop=tuple(params["stop"]), logit_bias=tuple((int(t), float(b)) for t, b in params["logit_bias"]),
                      constraint=None if constraint is None else ConstraintSpec(**constraint))  # fmt: skip
        return cls(tuple(tuple(p) for p in data["prompts"]), tuple(data["texts"]), OutputFormat(**data["output"]),
                   GenerationParams(**params))  # fmt: skip


def continuation_plan(prompts: Sequence[PreparedPrompt], params: GenerationParams) -> ContinuationPlan | None:
    """The plan of a generation a restart could continue; None when its inputs are more than token ids (images,
    videos: the pixels are not journaled, so such a session is interrupted by a restart, as before)."""
    inputs = [prompt.inputs for prompt in prompts]
    if any(not isinstance(i, Mapping) or set(i.keys()) - {"input_ids", "attention_mask"} for i in inputs):
        return None
    if params.constraint is not None and prompts[0].grammar is None:
        params = replace(params, constraint=None)  # `strict` with `auto` where it is not enforced: not at restart
    ids = tuple(tuple(int(t) for t in i["input_ids"][0].tolist()) for i in inputs)
    return ContinuationPlan(ids, tuple(prompt.text for prompt in prompts), prompts[0].output, params)


def encode_score(score: TokenScore) -> list[Any]:
    return [score.token, score.logprob, score.raw.hex(), [[t, lp, raw.hex()] for t, lp, raw in score.top]]


def decode_score(data: list[Any]) -> TokenScore:
    token, logprob, raw, top = data
    return TokenScore(token, logprob, bytes.fromhex(raw), tuple((t, lp, bytes.fromhex(r)) for t, lp, r in top))


def encode_step(item: EngineEvent) -> str:
    """One engine event as the journal keeps it (compact JSON): what a restart replays through the renderers."""
    if isinstance(item, Delta):
        data: dict[str, Any] = {"d": item.text, "c": item.choice, "t": item.tokens}
        if item.logprobs:
            data["l"] = [encode_score(score) for score in item.logprobs]
    elif isinstance(item, Finished):
        data = {"f": item.finish_reason, "c": item.choice, "n": item.completion_tokens}
        if item.cached_tokens:
            data["k"] = item.cached_tokens
    else:
        data = {"p": [encode_score(score) for score in item.scores], "c": item.choice}
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def decode_step(text: str) -> EngineEvent:
    data = json.loads(text)
    if "d" in data:
        scores = tuple(decode_score(score) for score in data.get("l", ()))
        return Delta(data["d"], data["c"], scores, tuple(data["t"]))
    if "f" in data:
        return Finished(data["f"], data["n"], data["c"], data.get("k", 0))
    return PromptScores(tuple(decode_score(score) for score in data["p"]), data["c"])


def resume_points(steps: Sequence[EngineEvent], choices: int) -> list[ChoiceResume]:
    """Where each choice stood after `steps`: its tokens, whether it ended, whether its prompt was scored."""
    tokens: list[list[int]] = [[] for _ in range(choices)]
    finished, scored = [False] * choices, [False] * choices
    for item in steps:
        if isinstance(item, Delta):
            tokens[item.choice] += item.tokens
        elif isinstance(item, Finished):
            finished[item.choice] = True
        else:
            scored[item.choice] = True
    return [ChoiceResume(tuple(t), f, p) for t, f, p in zip(tokens, finished, scored, strict=True)]


@dataclass(frozen=True)
class ContinuePolicy:
    """Which sessions a restart continues (RESTART_SESSIONS=continue): not those continued `max_attempts` times
    already (a poison request must not crash-loop the server), nor those older than `max_age_seconds`."""

    max_attempts: int
    max_age_seconds: float

    def allows(self, session_id: str, attempts: int, created_at: float, now: float) -> bool:
        if attempts >= self.max_attempts:
            log.warning("session %s: continued %d time(s) already; ending it as interrupted", session_id, attempts)
            return False
        if now - created_at > self.max_age_seconds:
            log.warning("session %s: older than CONTINUE_MAX_AGE_SECONDS; ending it as interrupted", session_id)
            return False
        return True


@dataclass
class Recovery:
    """What a restart did with the sessions it found unfinished."""

    continued: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)


REDIS_RETRY_SECONDS = 1.0  # after a failure, how often the writer tries Redis again


class Session:
    """One generation's events and state. Written by its runner, read by any number of responses."""

    def __init__(
        self, session_id: str, meta: StreamMeta, capacity: int, journal: Journal | None = None, key: str = ""
    ) -> None:
        self.id = session_id  # what the client sees
        self.key = key or session_id  # where it is stored: storage_key(owner, id)
        self.time_limited = False
        self.meta = meta
        self.state = SessionState.QUEUED
        self.buffer = RingBuffer(capacity)
        self.journal = journal
        self.cancel = threading.Event()  # read by the model thread's StoppingCriteria
        self.cancel_requested = False
        self.cancelled = asyncio.Event()  # wakes a runner still waiting for a generation slot
        self.created_at = time.time()
        self.ended_at: float | None = None
        self.readers = 0
        self.grace_timer: asyncio.TimerHandle | None = None  # set while nobody reads a running session
        self.durable_index = -1  # with a journal: the last event index known to be committed
        self.lost_from: int | None = None  # restored: events from here on were sent before a restart, never journaled
        self.continuable = False  # its engine events are journaled as steps, so that a restart can continue it
        self.steps = 0  # steps journaled so far
        self.replayed = 0  # a continuation's runner remakes the events held already: this many appends are those
        self.suspended = False  # the server stopped with it left to be continued: readers end, nothing is written
        self.follower: asyncio.Task[None] | None = None  # another replica generates it: this tails its events
        self.grace_check: asyncio.Task[None] | None = None  # with Redis: counting the readers on other replicas
        self._changed = asyncio.Event()

    @classmethod
    def restore(cls, stored: StoredSession, capacity: int, journal: Journal) -> Session:
        session = cls(stored.id.rpartition("/")[2], stored.meta, capacity, journal, key=stored.id)
        for event in stored.events:
            session.buffer.append(event.data)  # deliberate: not append(), which would journal them again
        session.state, session.created_at, session.ended_at = stored.state, stored.created_at, stored.ended_at
        session.durable_index = session.buffer.next_index - 1
        session.lost_from = stored.lost_from
        session.continuable, session.steps = bool(stored.plan), len(stored.steps)
        return session

    @property
    def ended(self) -> bool:
        return self.state in SessionState.ENDED

    @property
    def closed(self) -> bool:
        """Nothing more will be written here by this process: ended, or left to a restart to continue."""
        return self.ended or self.suspended

    def append(self, data: str) -> int:
        if self.replayed:  # a continuation remaking an event the session holds already (the same text)
            self.replayed -= 1
            return self.buffer.next_index - 1 - self.replayed
        if self.closed:  # deliberate: after [DONE] (a store failure or shutdown ended it first), the runner's late
            return self.buffer.next_index - 1  # events (a cancelled finish, usage, a second [DONE]) are dropped
        index = self.buffer.append(data)
        if self.journal is not None:
            self.journal.record_event(self.key, index, data, self._on_durable(index))
        self._notify()
        return index

    def mirror(self, event: Event) -> None:
        """An event another replica wrote (acknowledged by the store already), for this replica's readers."""
        if event.index == self.buffer.next_index:  # deliberate: a repeated read of the tail is no new event
            self.buffer.append(event.data)
            self.durable_index = event.index
            self._notify()

    def record_step(self, item: EngineEvent) -> None:
        """Journals one engine event (before the events made of it), for a restart to continue from."""
        if self.continuable and self.journal is not None and not self.suspended:
            self.journal.record_step(self.key, self.steps, encode_step(item))
            self.steps += 1

    def suspend(self) -> None:
        """The server is stopping and a restart will continue this session: its readers end their streams (the
        client resumes with Last-Event-ID), and nothing more is written, so the journal holds it as running."""
        self.suspended = True
        self.cancel.set()
        self._notify()

    def finish(self, state: str) -> None:
        """Appends [DONE] and ends the session in `state`: one journal operation for both. Once only: the first
        end (a store failure, a shutdown, the runner) is the one its readers and the journal keep."""
        if self.closed:
            return
        index = self.buffer.append(DONE)
        self._enter(state)
        if self.journal is not None:
            self.journal.record_end(self.key, index, DONE, state, self.ended_at, self._on_durable(index))
        self._notify()

    def _on_durable(self, index: int) -> Callable[[], object]:
        """The journal's commit callback for event `index` (it runs on the writer thread)."""
        loop = asyncio.get_running_loop()
        return lambda: loop.call_soon_threadsafe(self._mark_durable, index)

    def _mark_durable(self, index: int) -> None:
        if index > self.durable_index:
            self.durable_index = index
            self._notify()

    @property
    def readable_end(self) -> int:
        """Events below this index may be sent. With a journal, only committed ones (write-ahead): a client
        never holds an event that a crash could take back, so after a restart the indices it has stay valid."""
        if self.journal is None or self.journal.error is not None:
            return self.buffer.next_index
        return self.durable_index + 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # deliberate: a fresh event per change; waiters hold the old one

    def set_state(self, state: str) -> None:
        self._enter(state)
        if self.journal is not None:
            self.journal.record_state(self.key, state, self.ended_at)
        self._notify()

    def _enter(self, state: str) -> None:
        self.state = state
        if state in SessionState.ENDED:
            self.ended_at = time.time()
            self.cancel_grace_timer()

    def cancel_grace_timer(self) -> None:
        """Drops a pending disconnect timer; it would otherwise keep this session alive until it fires."""
        if self.grace_timer is not None:
            self.grace_timer.cancel()
            self.grace_timer = None

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.cancel.set()
        self.cancelled.set()

    async def wait_for_events(self, index: int, timeout_seconds: float) -> bool:
        """Waits until an event at `index` exists or the session ends; False on timeout."""
        changed = self._changed
        end = self.readable_end
        if end > index or (self.closed and end >= self.buffer.next_index) or self.suspended:
            return True
        try:
            async with asyncio.timeout(timeout_seconds):  # deliberate: not wait_for, which makes a task per wait
                await changed.wait()
        except TimeoutError:
            return False
        return True

    def describe(self) -> SessionInfo:
        return SessionInfo.model_validate(
            {"id": self.id, "state": self.state, "created": int(self.created_at), "events": self.buffer.next_index,
             "readers": self.readers}
        )  # fmt: skip


async def follow_session(session: Session, journal: SharedJournal) -> None:
    """Tails a session another replica generates (or a replica that claims it after that one died) into this
    replica's copy, in short awaited reads, until its [DONE]; its final state is read then."""
    while not session.ended:
        try:
            events = await journal.tail(session.key, session.buffer.next_index - 1)
        except Exception as exc:  # deliberate: redis.RedisError, OSError: Redis away for a while: try again
            log.warning("session %s: cannot read the session store: %s", session.id, exc)
            await asyncio.sleep(REDIS_RETRY_SECONDS)
            continue
        for event in events:
            session.mirror(event)
        if session.buffer.next_index and session.buffer.read_from(session.buffer.next_index - 1)[0].data == DONE:
            final: str | None = await asyncio.to_thread(journal.state_of, session.key)
            session._enter(final or SessionState.FINISHED)
            session._notify()


class SessionStore:
    """Sessions in memory, bounded in number (the oldest ended go first), backed by the journal when enabled."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self.journal: Journal | None = None

    def create(
        self, meta: StreamMeta, session_id: str | None, request_json: str, owner: str = "", plan: str = ""
    ) -> Session:
        self.evict(room=1)
        wire_id = session_id or secrets.token_hex(16)
        key = storage_key(owner, wire_id)
        session = Session(wire_id, meta, self.settings.session_buffer_events, key=key)
        if self.journal is not None and self.journal.error is None:
            session.journal = self.journal
            session.continuable = bool(plan)
            self.journal.record_session(key, meta, request_json, session.created_at, plan)
        self.sessions[key] = session
        return session

    def peek(self, session_id: str, owner: str = "") -> Session | None:
        return self.sessions.get(storage_key(owner, session_id))

    async def find(self, session_id: str, owner: str = "") -> Session | None:
        """From memory, else from the journal (a session from before a restart, or evicted from memory)."""
        key = storage_key(owner, session_id)
        session = self.sessions.get(key)
        if session is not None or self.journal is None:
            return session
        try:  # deliberate: also after a failed write (a full disk): the file may well still be readable
            stored = await asyncio.to_thread(self.journal.load_session, key)
        except sqlite3.Error as exc:
            log.warning("session %s: the journal could not be read: %s", session_id, exc)
            return None
        except Exception as exc:  # deliberate: redis.RedisError, OSError: Redis is away, and it may hold the session
            raise StoreUnavailable(f"the session store could not be read: {exc}", headers={"Retry-After": "2"}) from exc
        if stored is None:
            return None
        session = self.sessions.get(key)
        if session is None:
            session = Session.restore(stored, self.settings.session_buffer_events, self.journal)
            if (shared := self.journal.shared) is not None and not session.ended:  # another replica generates it
                session.follower = asyncio.get_running_loop().create_task(follow_session(session, shared))
        self.sessions[key] = session
        return session

    def check_available(self) -> None:
        """New generations need a store that answers (Redis may be away): else 503, retried later."""
        if self.journal is not None and self.journal.shared is not None and self.journal.error is not None:
            raise StoreUnavailable(f"{self.journal.error}; try again shortly", headers={"Retry-After": "2"})

    async def get(self, session_id: str, owner: str = "") -> Session:
        session = await self.find(session_id, owner)
        if session is None:
            raise NotFound(f"no session {session_id!r}", param="session_id")
        return session

    async def delete(self, session: Session) -> None:
        """Forgets an ended session, in memory and in the journal."""
        self.sessions.pop(session.key, None)
        if self.journal is not None and self.journal.error is None:
            self.journal.delete_session(session.key)

    def evict(self, now: float | None = None, room: int = 0) -> None:
        """Drops expired ended sessions, then the oldest ended ones until `room` more fit under the cap."""
        now = time.time() if now is None else now
        ttl = self.settings.sessions_ttl_seconds
        ended = sorted((s for s in self.sessions.values() if s.ended), key=lambda s: s.ended_at or 0)
        expired = [s for s in ended if now - (s.ended_at or now) > ttl]
        overflow = max(0, len(self.sessions) - len(expired) - self.settings.max_sessions + room)
        for session in expired + [s for s in ended if s not in expired][:overflow]:
            del self.sessions[session.key]


# ==== 15. Journals ==================================================================================================
# The Journal protocols, one queued writer, the SQLite and Redis journals.


JOURNAL_MIGRATIONS = [
    # 1: sessions and their events; an event row is written once and never changed
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, state TEXT NOT NULL, meta TEXT NOT NULL, request TEXT NOT NULL,
        created_at REAL NOT NULL, ended_at REAL
    );
    CREATE TABLE events (
        session_id TEXT NOT NULL, idx INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (session_id, idx)
    ) WITHOUT ROWID;
    CREATE INDEX sessions_ended_at ON sessions (ended_at);
    """,
    # 2: the first event index that never reached the journal (it failed while the session ran); NULL = whole
    "ALTER TABLE sessions ADD COLUMN lost_from INTEGER",
    # 3: continuation after a restart: what the generation needs (its prompts' token ids and parameters; NULL: it
    # cannot be continued), how many restarts have continued it, and the engine's output so far, step by step
    """
    ALTER TABLE sessions ADD COLUMN plan TEXT;
    ALTER TABLE sessions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE steps (
        session_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    """,
]


JOURNAL_BATCH_MAX_OPS = 1024


def migrate_journal(conn: sqlite3.Connection) -> int:
    """Brings the schema to the newest version (`PRAGMA user_version` counts the migrations applied)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number, script in enumerate(JOURNAL_MIGRATIONS[version:], version + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    return len(JOURNAL_MIGRATIONS)


class QueuedOp(Protocol):
    """One queued write of either journal."""

    @property
    def on_commit(self) -> Callable[[], object] | None: ...  # runs on the writer thread once committed (or dropped)

    @property
    def event(self) -> tuple[str, int] | None: ...  # (session, index) of the event it writes, if it writes one


OpT = TypeVar("OpT", bound=QueuedOp)


class QueuedWriter(Generic[OpT]):
    """The write path of both journals: writes are queued and committed in batches by one writer thread, so the
    token stream never waits on the store. One failure semantics for both: the first failed batch sets `error`
    (logged once, `on_failure` told), and from then on every write is dropped, the first index of each session's
    dropped events kept in `lost_from` (under a lock: the writer and the event loop both add to it), until
    `write_loss_marks` (every sweep, and at close) has written those marks to the store: then `error` clears and
    writing resumes. Subclasses say how a batch is committed and how marks are written."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.lost_from: dict[str, int] = {}  # per session, the first event that never reached the store
        self.on_failure: Callable[[str], object] | None = None  # called on the writer thread at a failure
        self._lost_lock = threading.Lock()
        self._queue: queue.Queue[OpT | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)

    def _commit(self, ops: list[OpT]) -> None:
        raise NotImplementedError

    def _write_marks(self, marks: dict[str, int]) -> None:
        """Marks the sessions whose events from `lost_from` on never reached the store; raises while it fails."""
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def _writer_done(self) -> None:
        """On the writer thread, after its last batch."""

    def _put_op(self, op: OpT) -> None:
        if self.error is None:
            self._queue.put(op)
        else:
            self._settle([op], lost=True)

    def _settle(self, ops: list[OpT], lost: bool) -> None:
        """Ops committed, or dropped (`lost`: a failed batch, or put while the store is failed): what was lost is
        noted, and every op's readers are released. A dropped event's readers too: they must not wait for it once
        the store is back (`readable_end` then follows `durable_index` again)."""
        if lost:
            self._note_lost(ops)
        for op in ops:
            if op.on_commit is not None:
                with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is waiting
                    op.on_commit()

    def _note_lost(self, ops: list[OpT]) -> None:
        """Once the store has failed, events are still sent: a replay after a restart must not hand out those
        indices again, so the first one of each session is remembered."""
        with self._lost_lock:
            for session_id, index in (op.event for op in ops if op.event is not None):
                self.lost_from[session_id] = min(index, self.lost_from.get(session_id, index))

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            log.error("%s; writes are dropped until it takes one again", reason)
            if self.on_failure is not None:
                self.on_failure(reason)

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < JOURNAL_BATCH_MAX_OPS and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            ops = [op for op in batch if op is not None]
            try:
                if self.error is None and ops:
                    self._commit(ops)
            except Exception as exc:  # deliberate: sqlite3.Error, redis.RedisError, OSError: the store, not us
                self._fail(f"{self._describe()} failed: {exc}")
            finally:
                self._settle(ops, lost=self.error is not None)
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                self._writer_done()
                return

    def flush(self) -> None:
        """Blocks until every queued write is committed (or dropped after a failure)."""
        self._queue.join()

    def _stop_writer(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=30)
        self.write_loss_marks()  # deliberate: a restart after a failure must know what was never journaled

    def write_loss_marks(self) -> bool:
        """After a failure: writes the sessions' `lost_from` marks once the store takes a write again, and clears
        `error` (writing resumes). True when nothing is left to write."""
        with self._lost_lock:
            marks = dict(self.lost_from)
        if self.error is None and not marks:
            return True
        try:
            self._write_marks(marks)
        except Exception as exc:  # deliberate: still failing; tried again at the next sweep
            log.warning("%s: %d session(s) not marked incomplete yet: %s", self._describe(), len(marks), exc)
            return False
        with self._lost_lock:
            for session_id, index in marks.items():
                if self.lost_from.get(session_id) == index:
                    del self.lost_from[session_id]
        if self.error is not None:
            log.info("%s takes writes again; %d session(s) marked incomplete", self._describe(), len(marks))
        self.error = None
        return True


@dataclass(frozen=True)
class JournalOp:
    statements: tuple[tuple[str, tuple[Any, ...]], ...]  # (sql, params), always committed in one transaction
    on_commit: Callable[[], object] | None = None
    event: tuple[str, int] | None = None


class SqliteRecovery:
    """A start-up's pass over the sessions a server left behind in SQLite, on the journal's reading connection (its
    lock held), in one transaction: each continued (its attempt counted) or interrupted (the interrupted tail
    journaled; what a failed journal lost dropped)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def run(self, now: float, policy: ContinuePolicy | None) -> Recovery:
        recovery, conn = Recovery(), self.conn
        rows = conn.execute(
            "SELECT id, lost_from, plan, attempts, created_at FROM sessions"
            " WHERE state IN (?, ?) OR (lost_from IS NOT NULL AND state != ?)",
            (SessionState.QUEUED, SessionState.RUNNING, SessionState.INTERRUPTED),
        ).fetchall()
        conn.execute("BEGIN")
        for session_id, lost_from, plan, attempts, created_at in rows:
            if (
                lost_from is None
                and policy is not None
                and plan
                and self._may_continue(session_id, policy, attempts, created_at, now)
            ):
                conn.execute("UPDATE sessions SET attempts = attempts + 1 WHERE id = ?", (session_id,))
                recovery.continued.append(session_id)
            elif self._recover(session_id, lost_from, now):
                recovery.interrupted.append(session_id)
        conn.execute("COMMIT")
        return recovery

    def _may_continue(self, session_id: str, policy: ContinuePolicy, attempts: int, created_at: float,
                      now: float) -> bool:  # fmt: skip
        return not self._ended_with_done(session_id) and policy.allows(session_id, attempts, created_at, now)

    def _ended_with_done(self, session_id: str) -> bool:
        (last,) = self.conn.execute("SELECT MAX(idx) FROM events WHERE session_id = ?", (session_id,)).fetchone()
        return last is not None and self._event_at(session_id, last) == DONE

    def _recover(self, session_id: str, lost_from: int | None, now: float) -> bool:
        conn = self.conn
        end = "UPDATE sessions SET state = ?, ended_at = ? WHERE id = ?"
        conn.execute("DELETE FROM steps WHERE session_id = ?", (session_id,))
        if lost_from is not None:
            conn.execute("DELETE FROM events WHERE session_id = ? AND idx >= ?", (session_id, lost_from))
            conn.execute(end, (SessionState.INTERRUPTED, now, session_id))
            return True
        (last,) = conn.execute("SELECT MAX(idx) FROM events WHERE session_id = ?", (session_id,)).fetchone()
        if last is not None and self._event_at(session_id, last) == DONE:  # it had ended; only its state was lost
            conn.execute(end, (SessionState.FINISHED, now, session_id))
            return False
        for index, data in enumerate(interrupted_tail(), 0 if last is None else last + 1):
            conn.execute("INSERT INTO events (session_id, idx, data) VALUES (?, ?, ?)", (session_id, index, data))
        conn.execute(end, (SessionState.INTERRUPTED, now, session_id))
        return True

    def _event_at(self, session_id: str, index: int) -> str | None:
        row = self.conn.execute("SELECT data FROM events WHERE session_id = ? AND idx = ?", (session_id, index))
        found = row.fetchone()
        return None if found is None else str(found[0])


class SqliteJournal(QueuedWriter[JournalOp]):
    """Sessions and events in SQLite (WAL), written through the queued writer; reads use their own connection.
    A failed write stops persistence (logged, reported by /health) instead of failing requests."""

    shared: None = None  # one process: no readers, cancels or leases across replicas

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path = path.expanduser()
        self._read_lock = threading.Lock()
        self._reader = self._connect(path)
        migrate_journal(self._reader)
        self._conn = self._connect(path)  # the writer thread's alone
        self._writer.start()

    def _describe(self) -> str:
        return f"session journal {self.path}"

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a power cut may lose the last batch, never corrupt
        return conn

    # -- writes: queued, never blocking the caller --

    def _put(self, sql: str, params: tuple[Any, ...], on_commit: Callable[[], object] | None = None) -> None:
        self._put_op(JournalOp(((sql, params),), on_commit))

    def record_session(
        self, session_id: str, meta: StreamMeta, request_json: str, created_at: float, plan: str = ""
    ) -> None:
        meta_json = json.dumps(meta.__dict__)
        self._put(
            "INSERT OR REPLACE INTO sessions (id, state, meta, request, created_at, plan) VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, SessionState.QUEUED, meta_json, request_json, created_at, plan or None),
        )

    def record_step(self, session_id: str, seq: int, data: str) -> None:
        """One engine event of a running session (written before the chunks made of it: a committed chunk's
        step is always committed too)."""
        self._put("INSERT OR REPLACE INTO steps (session_id, seq, data) VALUES (?, ?, ?)", (session_id, seq, data))

    def record_event(
        self, session_id: str, index: int, data: str, on_commit: Callable[[], object] | None = None
    ) -> None:
        sql = "INSERT OR REPLACE INTO events (session_id, idx, data) VALUES (?, ?, ?)"
        self._put_op(JournalOp(((sql, (session_id, index, data)),), on_commit, (session_id, index)))

    def record_state(self, session_id: str, state: str, ended_at: float | None) -> None:
        self._put(*self._state_statement(session_id, state, ended_at))

    def record_end(
        self, session_id: str, index: int, data: str, state: str, ended_at: float | None,
        on_commit: Callable[[], object] | None = None,
    ) -> None:  # fmt: skip
        """The last event ([DONE]) and the final state as one operation: committed together or not at all, so a
        crash can never leave a journaled [DONE] under a session still marked running."""
        event = ("INSERT OR REPLACE INTO events (session_id, idx, data) VALUES (?, ?, ?)", (session_id, index, data))
        steps = ("DELETE FROM steps WHERE session_id = ?", (session_id,))  # an ended session is never continued
        statements = (event, self._state_statement(session_id, state, ended_at), steps)
        self._put_op(JournalOp(statements, on_commit, (session_id, index)))

    @staticmethod
    def _state_statement(session_id: str, state: str, ended_at: float | None) -> tuple[str, tuple[Any, ...]]:
        return "UPDATE sessions SET state = ?, ended_at = ? WHERE id = ?", (state, ended_at, session_id)

    def _commit(self, ops: list[JournalOp]) -> None:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            for op in ops:
                for sql, params in op.statements:
                    conn.execute(sql, params)
        except BaseException:
            conn.execute("ROLLBACK")  # deliberate: no half-written batch
            raise
        conn.execute("COMMIT")

    def _writer_done(self) -> None:
        self._conn.close()

    def close(self) -> None:
        self._stop_writer()
        with self._read_lock:
            self._reader.close()

    def _write_marks(self, marks: dict[str, int]) -> None:
        """On a connection of its own: the write that failed (a full disk) may succeed now."""
        conn = self._connect(self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock: with no marks, the probe that the file is writable
            conn.executemany("UPDATE sessions SET lost_from = MIN(COALESCE(lost_from, ?), ?) WHERE id = ?",
                             [(index, index, session_id) for session_id, index in marks.items()])  # fmt: skip
            conn.execute("COMMIT")
        finally:
            conn.close()

    # -- reads and maintenance: blocking, call from worker threads --

    def load_session(self, session_id: str) -> StoredSession | None:
        self.flush()
        with self._read_lock:
            row = self._reader.execute(
                "SELECT id, state, meta, created_at, ended_at, lost_from, plan FROM sessions WHERE id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            events = self._reader.execute(
                "SELECT idx, data FROM events WHERE session_id = ? ORDER BY idx", (session_id,)
            ).fetchall()
            steps = self._reader.execute(
                "SELECT data FROM steps WHERE session_id = ? ORDER BY seq", (session_id,)
            ).fetchall()
        return StoredSession(row[0], row[1], StreamMeta(**json.loads(row[2])), row[3], row[4],
                             [Event(*e) for e in events], row[5], row[6] or "",
                             tuple(decode_step(step) for (step,) in steps))  # fmt: skip

    def read_events(self, session_id: str, start: int, stop: int) -> list[Event]:
        """Events with start <= index < stop."""
        self.flush()
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT idx, data FROM events WHERE session_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
                (session_id, start, stop),
            ).fetchall()
        return [Event(*row) for row in rows]

    def recover_interrupted(self, now: float, policy: ContinuePolicy | None = None) -> Recovery:
        """Sessions a server left behind, at start-up. One that was running or queued is continued when `policy`
        allows it (its attempt counted now, committed before it runs: a request that crashes the server every
        time is ended after `max_attempts`); else it is interrupted (journal the interrupted error and [DONE]).
        One whose journal failed part-way is interrupted after dropping what is past `lost_from` (a replay then
        says those events are lost rather than reuse indices clients hold)."""
        with self._read_lock:
            return SqliteRecovery(self._reader).run(now, policy)

    def delete_ended_before(self, cutoff: float) -> int:
        self.flush()
        with self._read_lock:
            conn = self._reader
            ids = [r[0] for r in conn.execute("SELECT id FROM sessions WHERE ended_at < ?", (cutoff,)).fetchall()]
            conn.execute("BEGIN")
            conn.executemany("DELETE FROM events WHERE session_id = ?", [(i,) for i in ids])
            conn.executemany("DELETE FROM steps WHERE session_id = ?", [(i,) for i in ids])
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in ids])
            conn.execute("COMMIT")
        return len(ids)

    def delete_session(self, session_id: str) -> None:
        """Forgets one session, events and all (in the writer's order: after anything it still has to write)."""
        self._put("DELETE FROM events WHERE session_id = ?", (session_id,))
        self._put("DELETE FROM steps WHERE session_id = ?", (session_id,))
        self._put("DELETE FROM sessions WHERE id = ?", (session_id,))

    def count_sessions(self) -> int:
        with self._read_lock:
            return int(self._reader.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])


REDIS_FENCED_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED lease lost') end
return redis.call('XADD', KEYS[2], ARGV[2], 'd', ARGV[3])
"""  # a replica that lost its lease on a session cannot append to it (another one has claimed it)


REDIS_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


REDIS_BLOCK_MS = 1000  # one XREAD slice; deliberate: below redis-py's 5 s socket timeout, which breaks long blocks


def stream_id(index: int) -> str:
    """The Redis Stream entry id of event `index`: explicit and increasing, so that a retried append of the same
    index is refused by Redis instead of duplicated."""
    return f"0-{index + 1}"


def stream_index(entry_id: str | bytes) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2]) - 1


@dataclass(frozen=True)
class RedisOp:
    """One queued write: commands for a pipeline, and what to run once Redis has acknowledged them."""

    apply: Callable[[Any], object]
    on_commit: Callable[[], object] | None = None
    event: tuple[str, int] | None = None
    session: str = ""  # the session a lease-checked append writes to (refused once another replica claimed it)


class RedisJournal(QueuedWriter[RedisOp]):
    """The same journal, in Redis, shared by every replica (SESSION_STORE=redis://...): per session a hash
    (state, meta, plan, attempts, cancel flag), a Stream of events (entry id = index + 1) and one of steps, and
    a lease held by the replica generating it. Writes are queued and sent in pipelines by one writer thread
    (write-ahead: an event is sent to clients once Redis acknowledged it); appends are fenced by the lease. A
    failure sets `error` (new requests get 503, running ones end) until Redis answers again."""

    def __init__(self, url: str, replica: str, ttl_seconds: float, lease_seconds: float) -> None:
        try:
            import redis
        except ImportError:
            raise RuntimeError("SESSION_STORE needs the redis package: pip install redis") from None

        super().__init__()
        self.url, self.replica, self.ttl_ms = url, replica, int(ttl_seconds * 1000)
        self.lease_ms = int(lease_seconds * 1000)
        # Any: redis-py's annotations cover both its sync and async returns; every call here is sync
        self.client: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, decode_responses=True)
        self.client.ping()  # fails fast at start-up with the reason (refused, auth, ...)
        self._tail_client: Any = None  # redis.asyncio, made on the event loop at the first follow
        self.on_fenced: Callable[[str], object] | None = None  # a session another replica has claimed
        self._append = self.client.register_script(REDIS_FENCED_APPEND)
        self._renew = self.client.register_script(REDIS_RENEW_LEASE)
        self._writer.start()

    @property
    def shared(self) -> RedisJournal:
        return self

    def _describe(self) -> str:
        return f"session store {redact_url(self.url)}"

    @staticmethod
    def keys(session_id: str) -> tuple[str, str, str, str]:
        """(hash, events, steps, lease); the braces keep a session's keys on one Redis Cluster slot."""
        base = f"llm:s:{{{session_id}}}"
        return base, base + ":ev", base + ":st", base + ":lease"

    # -- writes: queued, never blocking the caller --

    def record_session(
        self, session_id: str, meta: StreamMeta, request_json: str, created_at: float, plan: str = ""
    ) -> None:
        meta_hash, events, steps, lease = self.keys(session_id)
        fields = {"state": SessionState.QUEUED, "meta": json.dumps(meta.__dict__), "request": request_json,
                  "created_at": created_at, "plan": plan, "attempts": 0, "owner": self.replica}  # fmt: skip
        hold_ms = self.ttl_ms + 86_400_000  # deliberate: a running session must not expire under its writer

        def apply(pipe: Any) -> None:
            pipe.delete(meta_hash, events, steps)
            pipe.hset(meta_hash, mapping=fields)
            pipe.pexpire(meta_hash, hold_ms)
            pipe.set(lease, self.replica, px=self.lease_ms)
            pipe.sadd("llm:running", session_id)

        self._put_op(RedisOp(apply))

    def record_event(
        self, session_id: str, index: int, data: str, on_commit: Callable[[], object] | None = None
    ) -> None:
        _, events, _, lease = self.keys(session_id)
        self._put_op(RedisOp(self._appender(lease, events, index, data), on_commit, (session_id, index), session_id))

    def record_step(self, session_id: str, seq: int, data: str) -> None:
        _, _, steps, lease = self.keys(session_id)
        self._put_op(RedisOp(self._appender(lease, steps, seq, data), session=session_id))

    def _appender(self, lease: str, stream: str, index: int, data: str) -> Callable[[Any], object]:
        return lambda pipe: self._append(keys=[lease, stream], args=[self.replica, stream_id(index), data], client=pipe)

    def record_state(self, session_id: str, state: str, ended_at: float | None) -> None:
        meta_hash = self.keys(session_id)[0]
        self._put_op(RedisOp(lambda pipe: pipe.hset(meta_hash, mapping={"state": state, "ended_at": ended_at or ""})))

    def record_end(
        self, session_id: str, index: int, data: str, state: str, ended_at: float | None,
        on_commit: Callable[[], object] | None = None,
    ) -> None:  # fmt: skip
        """[DONE] and the final state in one pipeline (MULTI): the ended session's keys then expire after the TTL."""
        meta_hash, events, steps, lease = self.keys(session_id)

        def apply(pipe: Any) -> None:
            self._append(keys=[lease, events], args=[self.replica, stream_id(index), data], client=pipe)
            pipe.hset(meta_hash, mapping={"state": state, "ended_at": ended_at or ""})
            pipe.delete(steps, lease)
            pipe.srem("llm:running", session_id)
            pipe.pexpire(meta_hash, self.ttl_ms)
            pipe.pexpire(events, self.ttl_ms)

        self._put_op(RedisOp(apply, on_commit, (session_id, index), session_id))

    def _commit(self, ops: list[RedisOp]) -> None:
        import redis

        pipe = self.client.pipeline(transaction=False)
        spans = []
        for op in ops:
            before = len(pipe.command_stack)
            op.apply(pipe)
            spans.append((op, before, len(pipe.command_stack)))
        results = pipe.execute(raise_on_error=False)
        for op, start, end in spans:
            errors = [r for r in results[start:end] if isinstance(r, Exception)]
            if any("FENCED" in str(r) for r in errors):
                if self.on_fenced is not None:
                    self.on_fenced(op.session)  # another replica has claimed it: this one stops writing it
            elif any(not isinstance(r, redis.ResponseError) or "equal or smaller" not in str(r) for r in errors):
                raise errors[0]  # deliberate: an "equal or smaller" id is a retried append, already written

    def close(self) -> None:
        self._stop_writer()
        self.client.close()

    async def close_tail(self) -> None:
        if self._tail_client is not None:
            await self._tail_client.aclose()

    def _write_marks(self, marks: dict[str, int]) -> None:
        """The sessions that lost events while Redis was gone end interrupted (their replay ends with
        `events_lost`)."""
        self.client.ping()
        pipe = self.client.pipeline(transaction=False)
        for session_id, index in marks.items():
            meta_hash, _, steps, lease = self.keys(session_id)
            pipe.hset(meta_hash, mapping={"state": SessionState.INTERRUPTED, "lost_from": index,
                                          "ended_at": time.time()})  # fmt: skip
            pipe.delete(steps, lease)
            pipe.srem("llm:running", session_id)
            pipe.pexpire(meta_hash, self.ttl_ms)
        pipe.execute()

    # -- reads, leases and claims: blocking, call from worker threads --

    def load_session(self, session_id: str) -> StoredSession | None:
        self.flush()
        meta_hash, events, steps, _ = self.keys(session_id)
        fields = self.client.hgetall(meta_hash)
        if not fields:
            return None
        entries = self.client.xrange(events)
        step_entries = self.client.xrange(steps)
        lost = fields.get("lost_from")
        return StoredSession(
            session_id, fields["state"], StreamMeta(**json.loads(fields["meta"])), float(fields["created_at"]),
            float(fields["ended_at"]) if fields.get("ended_at") else None,
            [Event(stream_index(i), e["d"]) for i, e in entries], int(lost) if lost else None, fields.get("plan", ""),
            tuple(decode_step(e["d"]) for _, e in step_entries),
        )  # fmt: skip

    def read_events(self, session_id: str, start: int, stop: int) -> list[Event]:
        self.flush()
        if stop <= start:
            return []
        entries = self.client.xrange(self.keys(session_id)[1], stream_id(start), stream_id(stop - 1))
        return [Event(stream_index(i), e["d"]) for i, e in entries]

    async def tail(self, session_id: str, after: int) -> list[Event]:
        """Events after index `after`, waiting up to one short slice for the first (a follower's live tail).
        Awaited on the event loop (redis.asyncio): a followed session holds no thread."""
        if self._tail_client is None:
            import redis.asyncio

            self._tail_client = redis.asyncio.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2,
                                                             decode_responses=True)  # fmt: skip
        key = self.keys(session_id)[1]
        found = await self._tail_client.xread({key: stream_id(after)}, block=REDIS_BLOCK_MS, count=256)
        return [Event(stream_index(i), e["d"]) for _, entries in found or [] for i, e in entries]

    def count_reader(self, session_id: str, change: int) -> None:
        """Readers of a session on every replica, for the disconnect grace window (queued: never blocks)."""
        meta_hash = self.keys(session_id)[0]
        self._put_op(RedisOp(lambda pipe: pipe.hincrby(meta_hash, "readers", change)))

    def readers(self, session_id: str) -> int:
        self.flush()
        return int(self.client.hget(self.keys(session_id)[0], "readers") or 0)

    def state_of(self, session_id: str) -> str | None:
        state = self.client.hget(self.keys(session_id)[0], "state")
        return None if state is None else str(state)

    def request_cancel(self, session_id: str) -> None:
        """A durable flag (the owner checks it at each lease renewal) and a message (it stops at its next step)."""
        self.client.hset(self.keys(session_id)[0], "cancel", 1)
        self.client.publish("llm:cancel", session_id)

    def renew_leases(self, session_ids: list[str]) -> tuple[list[str], list[str]]:
        """Renews this replica's leases: (the sessions whose lease another replica has taken, those with a cancel
        flag set)."""
        lost, cancelled = [], []
        for session_id in session_ids:
            meta_hash, _, _, lease = self.keys(session_id)
            if not self._renew(keys=[lease], args=[self.replica, self.lease_ms]):
                lost.append(session_id)
            elif self.client.hget(meta_hash, "cancel"):
                cancelled.append(session_id)
        return lost, cancelled

    def recover_interrupted(self, now: float, policy: ContinuePolicy | None = None) -> Recovery:
        """Claims the unfinished sessions whose lease has expired (their replica died, or this one before its
        restart): each is taken by exactly one replica (SET NX), then continued when `policy` allows it, else
        ended with the interrupted tail. Run at start-up and every lease period."""
        recovery = Recovery()
        for session_id in self.client.smembers("llm:running"):
            meta_hash, events, steps, lease = self.keys(session_id)
            if self.client.exists(lease) or not self.client.set(lease, self.replica, nx=True, px=self.lease_ms):
                continue
            fields = self.client.hgetall(meta_hash)
            if not fields or fields.get("state") in SessionState.ENDED:
                self.client.srem("llm:running", session_id)
                continue
            attempts, created_at = int(fields.get("attempts") or 0), float(fields["created_at"])
            if policy is not None and fields.get("plan") and policy.allows(session_id, attempts, created_at, now):
                self.client.hincrby(meta_hash, "attempts", 1)
                self.client.hset(meta_hash, "owner", self.replica)
                recovery.continued.append(session_id)
                continue
            last = self.client.xrevrange(events, count=1)
            start = stream_index(last[0][0]) + 1 if last else 0
            for index, data in enumerate(interrupted_tail(), start):
                self._append(keys=[lease, events], args=[self.replica, stream_id(index), data])
            self.client.hset(meta_hash, mapping={"state": SessionState.INTERRUPTED, "ended_at": now})
            self.client.delete(steps, lease)
            self.client.srem("llm:running", session_id)
            self.client.pexpire(meta_hash, self.ttl_ms)
            self.client.pexpire(events, self.ttl_ms)
            recovery.interrupted.append(session_id)
        return recovery

    def delete_ended_before(self, cutoff: float) -> int:
        return 0  # deliberate: Redis expires ended sessions itself (PEXPIRE at their end)

    def delete_session(self, session_id: str) -> None:
        self._put_op(RedisOp(lambda pipe: pipe.delete(*self.keys(session_id))))

    def count_sessions(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match="llm:s:{*}", count=1000, _type="hash"))

    def subscribe_cancels(self, on_cancel: Callable[[str], object], stop: threading.Event) -> None:
        """Runs on a thread of its own: every cancel message to `on_cancel` until `stop` (reconnecting if Redis
        goes away; the durable flag covers what is missed meanwhile)."""
        while not stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe("llm:cancel")
                while not stop.is_set():
                    message = pubsub.get_message(timeout=REDIS_BLOCK_MS / 1000)
                    if message is not None:
                        on_cancel(str(message["data"]))
                pubsub.close()
            except Exception:  # deliberate: redis.RedisError, OSError: wait and subscribe again
                stop.wait(REDIS_RETRY_SECONDS)


class Journal(Protocol):
    """What every session store implements (SqliteJournal, RedisJournal): writes queued through the one
    `QueuedWriter` (never blocking the caller), reads blocking (called from worker threads)."""

    error: str | None  # set by a failed write, cleared once the store takes writes again
    lost_from: dict[str, int]

    @property
    def shared(self) -> SharedJournal | None: ...  # the extras of a store shared by replicas, or None

    def record_session(self, session_id: str, meta: StreamMeta, request_json: str, created_at: float,
                       plan: str = "") -> None: ...  # fmt: skip
    def record_step(self, session_id: str, seq: int, data: str) -> None: ...
    def record_event(self, session_id: str, index: int, data: str,
                     on_commit: Callable[[], object] | None = None) -> None: ...  # fmt: skip
    def record_state(self, session_id: str, state: str, ended_at: float | None) -> None: ...
    def record_end(self, session_id: str, index: int, data: str, state: str, ended_at: float | None,
                   on_commit: Callable[[], object] | None = None) -> None: ...  # fmt: skip
    def delete_session(self, session_id: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def write_loss_marks(self) -> bool: ...
    def load_session(self, session_id: str) -> StoredSession | None: ...
    def read_events(self, session_id: str, start: int, stop: int) -> list[Event]: ...
    def recover_interrupted(self, now: float, policy: ContinuePolicy | None = None) -> Recovery: ...
    def delete_ended_before(self, cutoff: float) -> int: ...
    def count_sessions(self) -> int: ...


class SharedJournal(Journal, Protocol):
    """A store shared by replicas (Redis): readers counted on every replica, cancels sent to the replica
    generating a session, leases, claims, and a live tail for the replicas that follow a session."""

    url: str
    on_failure: Callable[[str], object] | None
    on_fenced: Callable[[str], object] | None

    async def tail(self, session_id: str, after: int) -> list[Event]: ...
    async def close_tail(self) -> None: ...
    def state_of(self, session_id: str) -> str | None: ...
    def count_reader(self, session_id: str, change: int) -> None: ...
    def readers(self, session_id: str) -> int: ...
    def request_cancel(self, session_id: str) -> None: ...
    def renew_leases(self, session_ids: list[str]) -> tuple[list[str], list[str]]: ...
    def subscribe_cancels(self, on_cancel: Callable[[str], object], stop: threading.Event) -> None: ...


# ==== 16. Runner ====================================================================================================
# One generation into one session (admission gate, a renderer per choice), and its readers.


PREFIX_CACHE_COUNTERS = {
    "lookups": "Prompts looked up in the prefix cache",
    "hits": "Prompts that started from a prefix-cache entry",
    "reused_tokens": "Prompt tokens read from the prefix cache instead of computed",
    "stored": "Entries stored in the prefix cache",
    "evictions": "Prefix-cache entries evicted for room (LRU)",
}


class CacheCollector:
    """The engine's prefix-cache and KV-budget figures at each scrape (kept by the batch's thread, not here)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kv = self.engine.batch_stats()
        yield GaugeMetricFamily("llm_kv_cache_bytes", "Bytes of KV held: the batch (padding and room included), a "
                                "chunked prefill, the prefix cache", kv.get("bytes", 0))  # fmt: skip
        yield GaugeMetricFamily("llm_kv_cache_peak_bytes", "The most held, merges included", kv.get("peak_bytes", 0))
        yield GaugeMetricFamily("llm_kv_cache_budget_bytes", "KV_CACHE_BYTES as bytes (0: none, or not yet)",
                                kv.get("budget_bytes", 0))  # fmt: skip
        yield GaugeMetricFamily("llm_kv_waiting_rows", "Rows waiting for KV memory", kv.get("waiting_rows", 0))
        yield CounterMetricFamily("llm_kv_preemptions", "Rows taken out of the batch for memory, to be prefilled "
                                  "again", value=kv.get("preempted", 0))  # fmt: skip
        yield CounterMetricFamily("llm_spec_drafted_tokens", "Draft tokens verified (speculative decoding)",
                                  value=kv.get("drafted_tokens", 0))  # fmt: skip
        yield CounterMetricFamily("llm_spec_accepted_tokens", "Draft tokens accepted (each saved a step)",
                                  value=kv.get("accepted_tokens", 0))  # fmt: skip
        yield CounterMetricFamily("llm_spec_verify_passes", "Verify passes (a step over drafts)",
                                  value=kv.get("verify_passes", 0))  # fmt: skip
        stats = self.engine.prefix_cache_stats()
        for name, description in PREFIX_CACHE_COUNTERS.items():
            yield CounterMetricFamily(f"llm_prefix_cache_{name}", description, value=stats.get(name, 0))
        yield GaugeMetricFamily("llm_prefix_cache_bytes", "Bytes of KV the prefix cache holds", stats.get("bytes", 0))
        yield GaugeMetricFamily("llm_prefix_cache_peak_bytes", "The most it has held", stats.get("peak_bytes", 0))
        yield GaugeMetricFamily("llm_prefix_cache_budget_bytes", "PREFIX_CACHE_BYTES as bytes (0: off or not yet)",
                                stats.get("budget_bytes", 0))  # fmt: skip


class Metrics:
    """Prometheus metrics, in a registry of this app's own (tests build many apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("llm_generated_tokens", "Completion tokens generated", registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Admission to first content delta", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))  # fmt: skip
        self.token_latency = Histogram("llm_token_latency_seconds", "Time between content deltas", registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))  # fmt: skip
        self.resumes = Counter("llm_resumes", "Streams resumed with Last-Event-ID", registry=r)
        self.cancels = Counter("llm_cancels", "Generations cancelled, by who", ["kind"], registry=r)
        for kind in ("manual", "auto"):
            self.cancels.labels(kind=kind)
        self.generations_active = Gauge("llm_generations_active", "Generations running", registry=r)
        self.generations_queued = Gauge("llm_generations_queued", "Generations waiting for a slot", registry=r)
        self.sessions_in_memory = Gauge("llm_sessions_in_memory", "Sessions held in memory", registry=r)
        self.sessions_on_disk = Gauge("llm_sessions_on_disk", "Sessions in the SQLite journal", registry=r)
        self.continued = Counter("llm_sessions_continued", "Sessions continued after a restart", registry=r)


class GenerationGate:
    """At most `limit` generations run; at most `max_queued` more wait; past that, 429 at admission."""

    def __init__(self, limit: int, max_queued: int) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.admitted = 0  # running + waiting
        self.running = 0
        self._semaphore = asyncio.Semaphore(limit)

    def admit(self) -> None:
        if self.admitted >= self.limit + self.max_queued:
            raise Overloaded(
                f"server busy: {self.running} generating, {self.admitted - self.running} queued",
                headers={"Retry-After": "1"},
            )
        self.admitted += 1

    def readmit(self) -> None:
        """A session continued after a restart: admitted before it, so never refused now."""
        self.admitted += 1

    def release_admission(self) -> None:
        """An admitted generation that will never ask for its slot."""
        self.admitted -= 1

    @contextlib.asynccontextmanager
    async def slot(self, give_up: asyncio.Event) -> AsyncIterator[bool]:
        """Holds one generation slot (yields True), or yields False if `give_up` is set while waiting.
        Pairs with one `admit()`."""
        try:
            acquire = asyncio.ensure_future(self._semaphore.acquire())
            waiter = asyncio.ensure_future(give_up.wait())
            await asyncio.wait({acquire, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            acquired = acquire.done() and not acquire.cancelled()
            if not acquired:
                acquire.cancel()
            elif give_up.is_set():
                self._semaphore.release()
                acquired = False
            if not acquired:
                yield False
                return
            self.running += 1
            try:
                yield True
            finally:
                self.running -= 1
                self._semaphore.release()
        finally:
            self.admitted -= 1


_END = object()


ENGINE_JOIN_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class _Failure:
    exc: BaseException


T = TypeVar("T")


async def in_daemon_thread(call: Callable[[], T]) -> T:
    """`call()` on a daemon thread (the request's context, so its log lines keep their request id), awaited."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # the awaiting task may have been cancelled meanwhile
            outcome()

    def run() -> None:
        try:
            result = context.run(call)
        except BaseException as exc:
            action = functools.partial(done.set_exception, exc)
        else:
            action = functools.partial(done.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, action)

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return await done


async def drain_in_thread(
    engine: Engine, prompts: Sequence[PreparedPrompt], params: GenerationParams, cancel: threading.Event,
    ends: Sequence[threading.Event] = (), resume: Sequence[ChoiceResume] = (),
) -> AsyncIterator[EngineEvent]:  # fmt: skip
    """Bridges the blocking engine iterators, each run in its own thread, to async code via an asyncio.Queue.
    Prompt p's n choices are the request's choices p*n ... p*n + n-1 (the legacy endpoint's list of prompts)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[object] = asyncio.Queue()

    def post(item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening anyway
            loop.call_soon_threadsafe(events.put_nowait, item)

    def pump(prompt: PreparedPrompt, first: int) -> None:
        try:
            mine = slice(first, first + params.n)
            for item in engine.stream(prompt, params, cancel, ends[mine], resume[mine]):
                post(replace(item, choice=first + item.choice) if first else item)
        except BaseException as exc:
            post(_Failure(exc))
        finally:
            post(_END)

    threads = [threading.Thread(target=pump, args=(prompt, p * params.n), name="engine-pump", daemon=True)
               for p, prompt in enumerate(prompts)]  # fmt: skip
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = await events.get()
            if item is _END:
                running -= 1
            elif isinstance(item, _Failure):
                raise item.exc
            else:
                yield item  # type: ignore[misc]
    finally:
        cancel.set()  # deliberate: a runner that stops reading must not leave generate running
        for thread in threads:  # when the runner ends, so has the model
            await asyncio.to_thread(thread.join, ENGINE_JOIN_TIMEOUT_SECONDS)


def to_error_event(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, APIError):
        return exc.body()
    return make_error("internal error during generation", "server_error", None, "internal_error")


class DeltaClock:
    """Feeds the time-to-first-token and per-token latency histograms."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.last = time.perf_counter()
        self.first = True

    def tick(self) -> None:
        now = time.perf_counter()
        (self.metrics.ttft if self.first else self.metrics.token_latency).observe(now - self.last)
        self.first, self.last = False, now


def limit_runtime(session: Session, max_seconds: float) -> asyncio.TimerHandle | None:
    """Ends a generation that runs past `max_seconds` (it then finishes with `length`)."""

    def expire() -> None:
        if not session.ended:
            log.warning("session %s reached MAX_GENERATION_SECONDS (%g s); ending it", session.id, max_seconds)
            session.time_limited = True
            session.cancel.set()

    return asyncio.get_running_loop().call_later(max_seconds, expire) if max_seconds > 0 else None


@dataclass
class ChoiceRun:
    """One choice as the runner drives it: its renderer, stop strings, logprob alignment and end (set when its
    stop string matched or its one call is done: that row alone stops)."""

    renderer: Renderer
    stop: StopMatcher
    aligner: LogprobAligner = field(default_factory=LogprobAligner)
    end: threading.Event = field(default_factory=threading.Event)
    finished: Finished | None = None

    def feed(self, item: Delta) -> list[str]:
        text = self.stop.feed(item.text)
        if item.logprobs or self.aligner.queue:
            self.aligner.push(item.logprobs)
            return self.renderer.encode(text, self.aligner.take(text))
        return self.renderer.encode(text)

    def close(self, finished: Finished, session: Session) -> list[str]:
        """The held-back tail, then the finish: how it really ended (a stop string is `stop`, a call `tool_calls`,
        a cancel `cancelled`, MAX_GENERATION_SECONDS `length`)."""
        tail = self.stop.flush()
        events = self.renderer.encode(tail, self.aligner.take(tail) + self.aligner.rest(self.stop.matched))
        events += self.renderer.flush()
        reason = finished.finish_reason
        if session.cancel_requested:
            reason = "cancelled"
        elif session.time_limited:
            reason = "length"
        elif self.renderer.calls and (reason == "stop" or self.renderer.complete):
            reason = "tool_calls"
        elif self.stop.matched:
            reason = "stop"
        self.finished = replace(finished, finish_reason=reason)
        return events + self.renderer.finish(self.finished)


def apply_event(item: EngineEvent, run: ChoiceRun, session: Session) -> list[str]:
    """What one engine event makes of its choice's run: chunks (or the finish), in the session's protocol. The
    same for a live event and for a journaled step replayed by a continuation, so that both give the same text."""
    if isinstance(item, Finished):
        return run.close(item, session)
    chunks = run.renderer.echo(item.scores) if isinstance(item, PromptScores) else run.feed(item)
    if run.stop.matched or run.renderer.complete:
        run.end.set()  # the rest is past the stop string (or the one call): stop this row too
    return chunks


async def generate_into(
    session: Session, engine: Engine, prompts: Sequence[PreparedPrompt], params: GenerationParams,
    gate: GenerationGate, metrics: Metrics, max_seconds: float, runs: list[ChoiceRun],
    resume: Sequence[ChoiceResume] = (),
) -> None:  # fmt: skip
    """Waits for a slot, then appends each choice's chunks (or, for tools and reasoning, what `OutputParser` makes
    of the text) as its deltas come, and its finish as soon as it ends. Stop strings end a choice early; so does
    its first call without parallel calls. Each engine event is journaled (a step) before its chunks."""
    clock = DeltaClock(metrics)
    async with gate.slot(session.cancelled) as acquired:
        if not acquired:
            return  # cancelled while queued: the model never ran
        session.set_state(SessionState.RUNNING)
        timer = limit_runtime(session, max_seconds)
        ends = [run.end for run in runs]
        try:
            async for item in drain_in_thread(engine, prompts, params, session.cancel, ends, resume):
                session.record_step(item)
                chunks = apply_event(item, runs[item.choice], session)
                if isinstance(item, Finished):
                    metrics.tokens.inc(item.completion_tokens)
                elif chunks:
                    clock.tick()
                for chunk in chunks:
                    session.append(chunk)
        finally:
            if timer is not None:
                timer.cancel()


def replay_steps(session: Session, runs: list[ChoiceRun], steps: Sequence[EngineEvent]) -> list[ChoiceResume]:
    """A continuation's first part: the journaled steps through fresh renderers, stop matchers and parsers, which
    so reach the state they had (the events they remake are the session's own and are not appended twice); then
    where each choice stands (one whose prompt scores were not journaled yet is scored again)."""
    for item in steps:
        for chunk in apply_event(item, runs[item.choice], session):
            session.append(chunk)
    return resume_points(steps, len(runs))


async def run_generation(
    session: Session, engine: Engine, prompts: Sequence[PreparedPrompt], params: GenerationParams,
    gate: GenerationGate, metrics: Metrics, max_seconds: float, steps: Sequence[EngineEvent] | None = None,
) -> None:  # fmt: skip
    """Drives one generation into one session, through its protocol's renderers (one per choice): (chat) role
    chunks, content deltas, a finish per choice, usage, or (Responses) created ... completed; then [DONE], the
    session's end marker. `steps` (a restart continuing the session): the engine events journaled so far, replayed
    first; the engine then goes on from the tokens they hold."""
    started, output = time.perf_counter(), prompts[0].output
    prompt_tokens = sum(prompt.prompt_tokens for prompt in prompts)
    choices = params.n * len(prompts)
    runs = [ChoiceRun(make_renderer(session.meta, output, i), StopMatcher(params.stop)) for i in range(choices)]
    if steps is not None:
        session.replayed = session.buffer.next_index  # everything up to here is remade, not appended again
    for run in runs:
        for event in run.renderer.start():
            session.append(event)
    # deliberate: `replayed` may outlast the steps: the journal may hold the closing events (usage) too, which
    # the end of this run remakes just the same
    resume = replay_steps(session, runs, steps) if steps is not None else []
    try:
        await generate_into(session, engine, prompts, params, gate, metrics, max_seconds, runs, resume)
        for index, run in enumerate(runs):
            if run.finished is None:  # cancelled while queued, or the engine ended without a word
                for event in run.close(Finished("cancelled", 0, index), session):
                    session.append(event)
        completion_tokens = sum(run.finished.completion_tokens for run in runs if run.finished is not None)
        cached_tokens = sum(run.finished.cached_tokens for run in runs[:: params.n] if run.finished is not None)
        for event in runs[0].renderer.close(prompt_tokens, completion_tokens, cached_tokens):
            session.append(event)
        cancelled = all(run.finished is not None and run.finished.finish_reason == "cancelled" for run in runs)
        final_state = SessionState.CANCELLED if cancelled else SessionState.FINISHED
        log.info(
            "session %s %s: %d prompt + %d completion tokens in %.2f s",
            session.id,
            ",".join(run.finished.finish_reason for run in runs if run.finished is not None),
            prompt_tokens,
            completion_tokens,
            time.perf_counter() - started,
        )
    except Exception as exc:
        log.exception("session %s failed", session.id)
        for event in runs[0].renderer.failure(to_error_event(exc)):
            session.append(event)
        final_state = SessionState.FAILED
    session.finish(final_state)


class DisconnectWatch:
    """Cancels a running session once nobody has read it for `grace_seconds` (0 disables). A reader that
    comes back before then resets the clock."""

    def __init__(self, grace_seconds: float, metrics: Metrics) -> None:
        self.grace_seconds = grace_seconds
        self.metrics = metrics
        self.auto_cancels = 0
        self.shared: SharedJournal | None = None  # with Redis: readers on every replica count

    def attach(self, session: Session) -> None:
        session.readers += 1
        session.cancel_grace_timer()  # a reader is back: the clock starts again at the next detach
        if self.shared is not None and session.journal is self.shared:
            self.shared.count_reader(session.key, 1)

    def detach(self, session: Session) -> None:
        session.readers -= 1
        if self.shared is not None and session.journal is self.shared:
            self.shared.count_reader(session.key, -1)
        self.unread(session)

    def unread(self, session: Session) -> None:
        """Starts the clock on a session nobody reads (the last reader left, or a restart continued it: its
        readers left with the old process)."""
        if session.readers > 0 or session.ended or self.grace_seconds <= 0 or session.meta.background:
            return  # deliberate: a background response runs whether or not anyone reads
        if session.follower is not None:
            return  # another replica generates it, and keeps its clock
        session.cancel_grace_timer()
        session.grace_timer = asyncio.get_running_loop().call_later(self.grace_seconds, self._expire, session)

    def _expire(self, session: Session) -> None:
        session.grace_timer = None
        if session.readers == 0 and not session.ended and self.shared is not None and session.journal is self.shared:
            self._expire_shared(session)
        elif session.readers == 0 and not session.ended:
            self._cancel(session)

    def _expire_shared(self, session: Session) -> None:
        """The grace window ended with no reader here: readers on other replicas keep it going."""
        shared = self.shared
        assert shared is not None

        async def check() -> None:
            try:
                elsewhere = await asyncio.to_thread(shared.readers, session.key)
            except Exception:  # deliberate: Redis away: the store failure ends the session anyway
                return
            if session.readers == 0 and not session.ended:
                if elsewhere > 0:
                    session.grace_timer = asyncio.get_running_loop().call_later(self.grace_seconds, self._expire,
                                                                                session)  # fmt: skip
                else:
                    self._cancel(session)

        session.grace_check = asyncio.get_running_loop().create_task(check())

    def _cancel(self, session: Session) -> None:
        if session.readers == 0 and not session.ended:
            log.info("session %s: no reader for %.1f s, cancelling", session.id, self.grace_seconds)
            self.auto_cancels += 1
            self.metrics.cancels.labels(kind="auto").inc()
            session.request_cancel()


async def read_events(session: Session, start: int) -> list[Event]:
    """Readable events from `start` on: from the ring buffer, or the journal for what the ring has dropped."""
    end = session.readable_end
    return [event for event in await read_stored_events(session, start) if event.index < end]


async def read_stored_events(session: Session, start: int) -> list[Event]:
    try:
        return session.buffer.read_from(start)
    except EventsGone:
        if session.journal is None or session.journal.error is not None:
            raise
        stop = session.buffer.first_index
        older = await asyncio.to_thread(session.journal.read_events, session.key, start, stop)
        if [e.index for e in older] != list(range(start, stop)):
            raise
        return older + session.buffer.read_from(stop)  # the reader's cursor kept the ring from moving past `stop`


# Inside a burst (a replay reads many events at once) a reader lets the loop run every this many events, so that a
# connection lost mid-burst is noticed (uvicorn's connection_lost) before asyncio starts logging "socket.send()
# raised exception." (from the 5th write into a dead socket). Not after every event: on 2 cores each loop turn is
# taken from the model's threads. A live tail reads one event at a time and never pays it.

BURST_YIELD_EVENTS = 4


async def read_session(
    session: Session, after_index: int, wait_seconds: float, watch: DisconnectWatch, cursor: ReadCursor
) -> AsyncIterator[Event]:
    """Events after `after_index` to the end of the session, waiting for each (re-checking every
    `wait_seconds`). `cursor` holds the unread events in the ring (take it when the response is created, before
    any await)."""
    index = after_index + 1
    watch.attach(session)
    try:
        session.buffer.hold(cursor, index)
        while True:
            for n, event in enumerate(await read_events(session, index), 1):
                if n % BURST_YIELD_EVENTS == 0:
                    await asyncio.sleep(0)  # see BURST_YIELD_EVENTS
                yield event
                index = event.index + 1
            session.buffer.hold(cursor, index)
            if session.ended and index >= session.buffer.next_index:
                return
            if session.suspended:
                return  # the server is stopping; a restart continues the session and the client resumes there
            await session.wait_for_events(index, wait_seconds)
    finally:
        session.buffer.release(cursor)
        watch.detach(session)


ShutdownHook = Callable[[], Awaitable[None]]


READ_WAIT_SECONDS = 60.0  # a reader re-checks its session this often even if nothing woke it (belt and braces)


async def sse_body(
    session: Session, after_index: int, watch: DisconnectWatch, cursor: ReadCursor, on_shutdown: ShutdownHook
) -> AsyncIterator[bytes]:
    """The events of one SSE response. `on_shutdown` waits for the server to begin shutting down and then ends
    the unfinished sessions, so this reader sends their last events before its connection goes."""
    shutdown_watch = asyncio.ensure_future(on_shutdown())
    encode = encode_for(session)
    next_index = after_index + 1
    try:
        async for event in read_session(session, after_index, READ_WAIT_SECONDS, watch, cursor):
            next_index = event.index + 1
            if chunk := encode(event.data, event.index, True):
                yield chunk
        if session.lost_from is not None:
            for data in events_lost_tail(session.lost_from):
                if chunk := encode(data, session.lost_from, False):  # no id: not an index of this session's
                    yield chunk
    except APIError as exc:  # headers are sent: the error becomes the stream's last events
        for data in (json.dumps(exc.body()), DONE):
            if chunk := encode(data, next_index, False):
                yield chunk
    finally:
        shutdown_watch.cancel()


def encode_for(session: Session) -> Callable[[str, int, bool], bytes]:
    """How this session's events go on the wire (its protocol's encoder)."""
    return functools.partial(WIRE_PROTOCOLS[session.meta.protocol].encode, session.id)


async def collect_answer(session: Session, watch: DisconnectWatch) -> Any:
    """The JSON answer: the whole session, read to its end and folded (a chat or text completion, or a
    response object)."""
    events = read_session(session, -1, READ_WAIT_SECONDS, watch, ReadCursor())  # holds from 0 before any await
    return WIRE_PROTOCOLS[session.meta.protocol].fold(session.meta, [event.data async for event in events])


async def current_response(session: Session) -> dict[str, Any]:
    """The response object as it stands (GET, a background POST): its events so far, folded."""
    events = [event.data for event in await read_events(session, 0)]
    return fold_response(json.loads(session.meta.response_json), events)


# ==== 17. Lifecycle =================================================================================================
# Request orchestration (start, launch, cancel); journal open and recovery, replicas, sweeps,
# shutdown.


SWEEP_INTERVAL_SECONDS = 60.0


CANCEL_WAIT_SECONDS = 30.0


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    gate: GenerationGate
    store: SessionStore
    watch: DisconnectWatch
    metrics: Metrics
    journal_error: str | None = None
    continued: int = 0  # sessions this process continued at start-up (and, with Redis, claimed since)
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    closers: list[Callable[[], object]] = field(default_factory=list)  # run at shutdown (background threads)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    ending: asyncio.Future[None] | None = None  # set once the server has begun ending its sessions

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)  # deliberate: keep a reference, or the task may be collected mid-run
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        """Ends every unfinished session, once, however many callers ask (each open stream on a shutdown
        signal, then the lifespan's shutdown)."""
        if self.ending is None:
            self.ending = asyncio.ensure_future(end_unfinished_sessions(self))
        await asyncio.shield(self.ending)

    def persistence(self) -> str:
        journal = self.store.journal
        if not self.settings.persists():
            return "off"
        error = self.journal_error or (journal.error if journal else None)
        return f"failed: {error}" if error else "ok"


async def start_chat(state: AppState, request: ChatCompletionRequest, owner: str) -> Session:
    """Validates, loads, templates and admits one request, then starts its runner. Raises APIError."""

    def meta(params: GenerationParams, prompts: list[PreparedPrompt]) -> StreamMeta:
        include_usage = not request.stream or bool(request.stream_options and request.stream_options.include_usage)
        return StreamMeta(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), state.engine.model_name,
                          include_usage)  # fmt: skip

    async def prepare() -> tuple[GenerationParams, list[PreparedPrompt]]:
        params, prompt = await prepare_chat(state, request)
        return params, [prompt]

    return await start_generation(state, request.session_id, owner, prepare, meta, request.model_dump_json())


async def start_generation(
    state: AppState, session_id: str | None, owner: str,
    prepare: Callable[[], Awaitable[tuple[GenerationParams, list[PreparedPrompt]]]],
    meta: Callable[[GenerationParams, list[PreparedPrompt]], StreamMeta], request_json: str,
) -> Session:  # fmt: skip
    """What chat and legacy completions share: a retry of a named session attaches to it, else the request is
    prepared, admitted and launched."""
    if session_id and (existing := await state.store.find(session_id, owner)):
        return existing  # an SDK retry of a named session attaches to it: never generate twice
    state.store.check_available()
    params, prompts = await prepare()
    if session_id and (existing := state.store.peek(session_id, owner)):
        return existing  # created by a concurrent request while we prepared (no await from here to create)
    state.gate.admit()
    return launch(state, meta(params, prompts), session_id, request_json, owner, prompts, params)


async def start_completion(state: AppState, request: CompletionRequest, owner: str) -> Session:
    """The legacy endpoint: each prompt tokenized as it is (no chat template), its n choices in one session."""
    raw_prompts = to_prompt_list(request.prompt)

    def meta(params: GenerationParams, prompts: list[PreparedPrompt]) -> StreamMeta:
        include_usage = not request.stream or bool(request.stream_options and request.stream_options.include_usage)
        echo = json.dumps([p.text for p in prompts for _ in range(params.n)]) if request.echo else ""
        return StreamMeta(f"cmpl-{secrets.token_hex(12)}", int(time.time()), state.engine.model_name,
                          include_usage, "completions", echo_json=echo)  # fmt: skip

    async def prepare() -> tuple[GenerationParams, list[PreparedPrompt]]:
        params = to_completion_params(request, state.settings)
        await load_engine(state.engine)
        prompts = [await asyncio.to_thread(state.engine.prepare_text, raw, params) for raw in raw_prompts]
        context, limit = state.engine.context_length(), state.settings.max_prompt_tokens
        kv = await asyncio.to_thread(state.engine.kv_limit)
        fitted = [fit_to_context(params, prompt.prompt_tokens, context, limit, kv) for prompt in prompts]
        return min(fitted, key=lambda p: p.max_new_tokens), prompts

    return await start_generation(state, request.session_id, owner, prepare, meta, request.model_dump_json())


async def prepare_chat(state: AppState, request: ChatCompletionRequest) -> tuple[GenerationParams, PreparedPrompt]:
    """Checks a chat request and builds its prompt (model load and templating in worker threads)."""
    check_message_count(request, state.settings.max_messages)
    check_tool_messages(request.messages)
    params = to_generation_params(request, state.settings)
    messages = to_template_messages(request.messages)
    template = TemplateInputs(to_template_tools(request), to_template_kwargs(request))
    await load_engine(state.engine)  # a cold load never blocks the event loop
    prompt = await asyncio.to_thread(state.engine.prepare, messages, params, template)
    kv = await asyncio.to_thread(state.engine.kv_limit)
    params = fit_to_context(
        params, prompt.prompt_tokens, state.engine.context_length(), state.settings.max_prompt_tokens, kv
    )
    return params, prompt


def launch(state: AppState, meta: StreamMeta, session_id: str | None, request_json: str, owner: str,
           prompts: list[PreparedPrompt], params: GenerationParams) -> Session:  # fmt: skip
    """Creates the session (admitted already) and starts its runner: it runs whether or not anyone reads."""
    if params.temperature > 0 and params.seed is None:
        params = replace(params, seed=secrets.randbits(63))  # fixed now, so that a restart draws the same
    params = replace(params, cache_salt=owner)
    plan = continuation_plan(prompts, params) if state.settings.restart_sessions == "continue" else None
    session = state.store.create(meta, session_id, request_json, owner, plan.to_json() if plan else "")
    tokens = sum(prompt.prompt_tokens for prompt in prompts)
    log.info("session %s started: %d prompt tokens, %d choices (%s)", session.id, tokens,
             params.n * len(prompts), meta.protocol)  # fmt: skip
    max_seconds = state.settings.max_generation_seconds
    state.spawn(run_generation(session, state.engine, prompts, params, state.gate, state.metrics, max_seconds))
    return session


async def start_response(state: AppState, request: ResponsesRequest, owner: str) -> Session:
    """A Responses request runs as the chat request it means (`to_chat_request`), in a session whose events are
    Responses events; it records the conversation, so that a later `previous_response_id` continues it."""
    history: list[dict[str, Any]] = []
    if request.previous_response_id is not None:
        previous = await find_response(state, request.previous_response_id, owner, "previous_response_id")
        history = await continued_conversation(previous)
    chat = to_chat_request(request, history)
    state.store.check_available()
    params, prompt = await prepare_chat(state, chat)
    state.gate.admit()
    response_id, created, model = f"resp_{secrets.token_hex(16)}", int(time.time()), state.engine.model_name
    response = make_response_object(response_id, created, model, request)
    asked = history + to_chat_messages(request)  # deliberate: without `instructions`, which are not carried over
    meta = StreamMeta(response_id, created, model, True, "responses", json.dumps(response), json.dumps(asked),
                      json.dumps(to_input_items(request)), background=bool(request.background))  # fmt: skip
    return launch(state, meta, response_id, request.model_dump_json(by_alias=True), owner, [prompt], params)


async def find_response(state: AppState, response_id: str, owner: str, param: str = "response_id") -> Session:
    session = await state.store.find(response_id, owner)
    if session is None or session.meta.protocol != "responses":
        raise NotFound(f"no response {response_id!r}", param=param)
    return session


async def continued_conversation(previous: Session) -> list[dict[str, Any]]:
    """What a response that continues `previous` starts from: the messages it was asked (without its
    instructions) and what it answered."""
    events = [event.data for event in await read_events(previous, 0)]
    response = fold_response(json.loads(previous.meta.response_json), events)
    asked: list[dict[str, Any]] = json.loads(previous.meta.conversation_json)
    return asked + to_chat_history(response["output"])


async def cancel_session(state: AppState, session_id: str, owner: str) -> CancelResult:
    """Stops the generation at its next token; answers once the session has ended."""
    session = await state.store.get(session_id, owner)
    already_ended = session.ended
    if not already_ended:
        state.metrics.cancels.labels(kind="manual").inc()
        session.request_cancel()
        shared = state.store.journal.shared if state.store.journal is not None else None
        if session.follower is not None and shared is not None:
            await asyncio.to_thread(shared.request_cancel, session.key)  # to the replica generating it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_until_ended(session), CANCEL_WAIT_SECONDS)
    return CancelResult(**session.describe().model_dump(), already_ended=already_ended)


async def wait_until_ended(session: Session) -> None:
    while not session.ended:
        await session.wait_for_events(session.buffer.next_index, 1.0)


def continue_policy(settings: Settings) -> ContinuePolicy | None:
    if settings.restart_sessions != "continue":
        return None
    return ContinuePolicy(settings.continue_max_attempts, settings.continue_max_age_seconds)


async def open_journal(state: AppState) -> None:
    """Opens the journal (SQLite, or Redis with SESSION_STORE) and deals with what was left unfinished: continued
    (RESTART_SESSIONS=continue, within the attempt and age limits) or interrupted. With Redis, what another replica
    leaves behind is claimed the same way later (`watch_replicas`)."""
    settings = state.settings
    db_path = beside(APP_DIR, settings.sessions_db_path).expanduser()
    where = f"session store {redact_url(settings.session_store)}" if settings.session_store else (
        f"session journal {db_path.absolute()}")  # fmt: skip
    try:
        journal: Journal
        if settings.session_store:
            ttl, lease = settings.sessions_ttl_seconds, settings.session_lease_seconds
            journal = await asyncio.to_thread(RedisJournal, settings.session_store, state.replica, ttl, lease)
        else:
            journal = await asyncio.to_thread(SqliteJournal, db_path)
        recovery = await claim_unfinished(state, journal)
    except Exception as exc:  # deliberate: sqlite3.Error, OSError, redis.RedisError: serving goes on without it
        state.journal_error = f"{where} could not be opened: {exc}"
        log.error("%s; serving goes on without persistence", state.journal_error)
        return
    state.store.journal = journal
    if (shared := journal.shared) is not None:
        state.watch.shared = shared
        install_replica_hooks(state, shared)
        state.spawn(watch_replicas(state, shared))
    log.info("%s open; %d session(s) continued, %d interrupted", where, state.continued,
             len(recovery.interrupted))  # fmt: skip


async def claim_unfinished(state: AppState, journal: Journal) -> Recovery:
    """Continues (or interrupts) the unfinished sessions this process may take: at start-up, and with Redis
    those whose replica's lease has expired."""
    recovery = await asyncio.to_thread(journal.recover_interrupted, time.time(), continue_policy(state.settings))
    for key in recovery.continued:
        found = await asyncio.to_thread(journal.load_session, key)
        if found is not None:
            state.store.journal = journal
            continue_session(state, found)
    return recovery


def install_replica_hooks(state: AppState, journal: SharedJournal) -> None:
    """What other replicas (and Redis itself) can do to this one's sessions, posted to the event loop: a cancel
    sent to another replica, a lease another replica has taken over, Redis going away."""
    loop = asyncio.get_running_loop()

    def on_loop(action: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing left to act on
            loop.call_soon_threadsafe(action)

    def cancel(key: str) -> None:
        session = state.store.sessions.get(key)
        if session is not None and not session.ended and session.follower is None:
            session.request_cancel()

    def fenced(key: str) -> None:
        session = state.store.sessions.get(key)
        if session is not None and not session.closed:
            log.warning("session %s: another replica holds its lease now; this one stops writing it", session.id)
            session.suspend()

    journal.on_fenced = lambda key: on_loop(lambda: fenced(key))
    journal.on_failure = lambda reason: on_loop(lambda: end_for_store_failure(state))
    stop = threading.Event()
    state.closers.append(stop.set)
    threading.Thread(target=journal.subscribe_cancels, args=(lambda key: on_loop(lambda: cancel(key)), stop),
                     name="redis-cancels", daemon=True).start()  # fmt: skip


def end_for_store_failure(state: AppState) -> None:
    """Redis stopped answering: this replica's running sessions end now, with an error event its readers still
    get (from memory), rather than hang waiting for writes that cannot be acknowledged."""
    for session in list(state.store.sessions.values()):
        if not session.closed and session.follower is None:
            session.cancel.set()
            session.append(json.dumps(make_store_failed_error()))
            session.finish(SessionState.INTERRUPTED)


async def watch_replicas(state: AppState, journal: SharedJournal) -> None:
    """Every third of a lease: renews this replica's leases (a cancel flag set meanwhile is honoured, a lease
    another replica has taken stops the session here), claims the sessions of replicas whose lease expired,
    and, after a Redis failure, notices when it answers again."""
    period = state.settings.session_lease_seconds / 3
    while True:
        await asyncio.sleep(period)
        try:
            if journal.error is not None:
                await asyncio.to_thread(journal.write_loss_marks)
                continue
            owned = [s.key for s in state.store.sessions.values() if not s.closed and s.follower is None]
            lost, cancelled = await asyncio.to_thread(journal.renew_leases, owned)
            for key in lost:
                journal.on_fenced and journal.on_fenced(key)
            for key in cancelled:
                if (session := state.store.sessions.get(key)) is not None and not session.ended:
                    session.request_cancel()
            await claim_unfinished(state, journal)
        except Exception as exc:  # deliberate: redis.RedisError, OSError: the writer reports it; try again
            log.warning("session store %s: lease renewal failed: %s", redact_url(journal.url), exc)


def continue_session(state: AppState, stored: StoredSession) -> None:
    """Puts a session the last process left running back in memory and starts its runner again: it replays the
    journaled steps, then the engine goes on from the tokens they hold. Readers attach as to any session."""
    journal = state.store.journal
    assert journal is not None
    session = Session.restore(stored, state.settings.session_buffer_events, journal)
    state.store.sessions[session.key] = session
    state.watch.unread(session)  # its clients left with the old process: they have the grace window to return
    state.gate.readmit()
    state.continued += 1
    state.metrics.continued.inc()
    log.info("session %s continued after a restart: %d event(s), %d step(s) journaled", session.id,
             len(stored.events), len(stored.steps))  # fmt: skip
    state.spawn(run_continuation(state, session, ContinuationPlan.from_json(stored.plan), stored.steps))


async def load_engine(engine: Engine) -> None:
    """The model load, on a daemon thread of its own: the default executor's threads are joined at exit, so a
    Ctrl+C during the first download would wait for the download to finish."""
    await in_daemon_thread(engine.load)


async def run_continuation(
    state: AppState, session: Session, plan: ContinuationPlan, steps: Sequence[EngineEvent]
) -> None:
    """A continued session's runner: the model loaded and each prompt rebuilt from its token ids (no template
    again: the ids are the prompt), then `run_generation` with the journaled steps."""
    try:
        await load_engine(state.engine)
        prompts = []
        for ids, text in zip(plan.prompts, plan.texts, strict=True):
            prompt = await asyncio.to_thread(state.engine.prepare_text, list(ids), plan.params)
            prompts.append(replace(prompt, output=plan.output, text=text))
    except Exception as exc:
        log.warning("session %s could not be continued: %s", session.id, exc)
        state.gate.release_admission()
        session.append(json.dumps(to_error_event(exc) if isinstance(exc, APIError) else make_interrupted_error()))
        session.finish(SessionState.INTERRUPTED)
        return
    max_seconds = state.settings.max_generation_seconds
    await run_generation(session, state.engine, prompts, plan.params, state.gate, state.metrics, max_seconds, steps)


async def sweep_sessions(state: AppState) -> None:
    """Forgets expired sessions, in memory and in the journal."""
    interval = min(SWEEP_INTERVAL_SECONDS, state.settings.sessions_ttl_seconds / 2)
    while True:
        await asyncio.sleep(interval)
        state.store.evict()
        journal = state.store.journal
        if journal is not None and journal.error is None:
            cutoff = time.time() - state.settings.sessions_ttl_seconds
            with contextlib.suppress(sqlite3.Error):
                await asyncio.to_thread(journal.delete_ended_before, cutoff)
        elif journal is not None:  # failed: mark what was never journaled as soon as the disk takes it
            await asyncio.to_thread(journal.write_loss_marks)


def interrupt_session(session: Session) -> None:
    """Ends a session the server is leaving behind: the same tail a restart's recovery would journal."""
    session.cancel.set()
    session.append(json.dumps(make_interrupted_error()))
    session.finish(SessionState.INTERRUPTED)  # with [DONE]: interrupted_tail(), as a restart's recovery writes it


async def end_unfinished_sessions(state: AppState) -> None:
    """Stops every runner, then leaves what was still running to be continued by the next start (RESTART_SESSIONS=
    continue, the journal healthy: its readers' streams end, the client resumes after the restart), or marks it
    interrupted (its tail goes to its readers)."""
    journal = state.store.journal
    keep = state.settings.restart_sessions == "continue" and journal is not None and journal.error is None
    unfinished = [s for s in state.store.sessions.values() if not s.ended]
    if keep:
        for session in unfinished:
            if session.continuable:
                session.suspend()  # first: nothing the cancelled runners still do is written
    tasks = list(state.tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for session in unfinished:
        if session.suspended:
            log.info("session %s left to be continued after the restart", session.id)
        elif not session.ended:
            log.info("session %s interrupted by shutdown", session.id)
            interrupt_session(session)


async def shut_down(state: AppState) -> None:
    """Ends what is unfinished (if the streams' shutdown signal has not already) and closes the journal."""
    await state.drain()
    for close in state.closers:
        close()
    if state.store.journal is not None:
        if (shared := state.store.journal.shared) is not None:
            await shared.close_tail()
        await asyncio.to_thread(state.store.journal.close)


async def preload(engine: Engine) -> None:
    with contextlib.suppress(ModelNotReady):  # logged by the handle; retried on the first request
        await load_engine(engine)


# ==== 18. HTTP ======================================================================================================
# create_app (route groups), middleware, OpenAPI, SSE responses, routes.


def request_owner(request: Request) -> str:
    """The dependency every /v1 route takes: who is asking (see `key_owner`); 401 without a valid key."""
    state: AppState = request.app.state.server
    return key_owner(request.headers.get("authorization"), state.settings.api_keys())


Owner = Annotated[str, Depends(request_owner)]


def response_json(response: dict[str, Any], session: Session) -> Response:
    return JSONResponse(response, headers={"X-Session-Id": session.id})


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 past `max_bytes` whether or not Content-Length says so."""
    declared = request.headers.get("content-length", "")
    too_large = PayloadTooLarge(f"request body is larger than {max_bytes} bytes")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


BodyModel = TypeVar("BodyModel", bound=BaseModel)


async def parse_body(request: Request, model: type[BodyModel], max_bytes: int) -> BodyModel:
    """The body as `model`; an empty one validates as `{}` (so its missing fields are named in the 400)."""
    return model.model_validate_json(await read_body(request, max_bytes) or b"{}")


class EventStream(EventSourceResponse):
    """sse-starlette's response with one cost taken out: with no send timeout (ours), each send still entered an
    anyio cancel scope (`move_on_after(None)`), about 15 us per event on the loop, which on 2 cores the model's
    threads pay for. Deliberate override of a private method: if a release renames it, only this saving is lost."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # as the original: the transport is in an unknown state
            raise


CHAT_PAGE = Path(__file__).with_name("chat.html")
# deliberate: the page's own inline code and nothing else may run, and it connects only to this server; images
# the user attaches are data: URLs


CHAT_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'",
}


SHUTDOWN_SECONDS, SHUTDOWN_GRACE_SECONDS = shutdown_seconds(sys.platform)  # the whole, and what streams get of it


def check_resume_end(session: Session, after_index: int) -> bool:
    """True when there is nothing left to send: the client already has the ended session's [DONE]. An index past
    that is a client error (a running session's future index just waits for it)."""
    last = session.buffer.next_index - 1
    if not session.ended or after_index < last or session.lost_from is not None:
        return False
    if after_index > last:
        raise BadRequest(
            f"Last-Event-ID {format_event_id(session.id, after_index)} is past the end of the session: its last "
            f"event is {format_event_id(session.id, last)} ([DONE])",
            param="Last-Event-ID", code="invalid_resume_point",
        )  # fmt: skip
    return True


def sse_response(state: AppState, session: Session, after_index: int) -> Response:
    """Every SSE response, through sse-starlette: its ping is the keep-alive comment, its disconnect handling
    ends the body (the reader detaches; the grace window starts), and its shutdown signal ends the server's
    unfinished sessions first, so each open stream still sends its interrupted tail and [DONE]."""
    if check_resume_end(session, after_index):  # 204 stops a browser EventSource from reconnecting for ever
        return Response(status_code=204, headers={"X-Session-Id": session.id})
    if after_index + 1 < session.buffer.first_index and session.journal is None:
        session.buffer.read_from(after_index + 1)  # raises EventsGone (410) while we can still send a status
    cursor = ReadCursor()
    session.buffer.hold(cursor, after_index + 1)  # now: the runner may append a burst before the body starts
    shutdown = anyio.Event()

    async def on_shutdown() -> None:
        await shutdown.wait()
        await state.drain()

    return EventStream(
        sse_body(session, after_index, state.watch, cursor, on_shutdown),
        headers={"X-Session-Id": session.id, "Cache-Control": "no-cache"},
        ping=state.settings.keepalive_seconds, ping_message_factory=make_keepalive, sep=SSE_LINE_END,
        shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
    )  # fmt: skip


REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RequestContext:
    """Pure ASGI middleware: an x-request-id per request (the client's if well-formed), echoed in the response
    and set for every log line; and the requests-by-route-and-status counter."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID_PATTERN.match(given) else secrets.token_hex(8)
        token = REQUEST_ID.set(request_id)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            REQUEST_ID.reset(token)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in [(400, "Invalid request; `param` names the field"), (401, "Missing or invalid API key"),
                         (404, "No such session, model or route"), (503, "The model is not loaded")]
}  # fmt: skip


def sse_content(description: str) -> dict[str, Any]:
    """An SSE body in the schema: each `data:` line holds a ChatCompletionChunk (then `[DONE]`)."""
    schema = {"$ref": "#/components/schemas/ChatCompletionChunk"}
    return {"description": description, "content": {"text/event-stream": {"schema": schema}}}


def responses_responses() -> dict[int | str, dict[str, Any]]:
    """The Responses routes: a response object (JSON), or its events (SSE, `event:` + `id:` lines)."""
    events = {
        "type": "object",
        "description": "SSE: `event: <type>`, `id: <response_id>:<sequence_number>`, "
        "`data: <ResponseStreamEvent>`; no [DONE]",
    }
    body = {
        "application/json": {"schema": {"type": "object", "description": "A Response object"}},
        "text/event-stream": {"schema": events},
    }
    return {200: {"description": "The response, or its events", "content": body}, **ERROR_RESPONSES}  # fmt: skip


def stream_responses() -> dict[int | str, dict[str, Any]]:
    return {200: sse_content("SSE: `id: <session_id>:<index>`, `data: <ChatCompletionChunk>`, then `data: [DONE]`"),
            410: {"model": ErrorBody, "description": "The events asked for are no longer held"},
            **ERROR_RESPONSES}  # fmt: skip


def completions_responses() -> dict[int | str, dict[str, Any]]:
    responses = chat_responses()
    json_body = {"schema": {"$ref": "#/components/schemas/TextCompletion"}}
    sse = {"text/event-stream": {"schema": {"$ref": "#/components/schemas/TextCompletion"}}}
    responses[200] = {"description": "A TextCompletion, or with `stream: true` an SSE stream of its chunks",
                      "content": {"application/json": json_body, **sse}}  # fmt: skip
    return responses


def chat_responses() -> dict[int | str, dict[str, Any]]:
    stream = sse_content("with `stream: true` (or a Last-Event-ID resume): SSE of ChatCompletionChunk")
    json_body = {"schema": {"$ref": "#/components/schemas/ChatCompletion"}}
    ok = {"description": "A ChatCompletion, or with `stream: true` an SSE stream of chunks",
          "content": {"application/json": json_body, **stream["content"]}}  # fmt: skip
    limits = {413: "Request body too large", 429: "Too many queued generations (see Retry-After)"}
    return {**stream_responses(), 200: ok, **{k: {"model": ErrorBody, "description": v} for k, v in limits.items()}}


def document_our_statuses(responses: dict[str, Any]) -> None:
    """FastAPI documents 422 for validation errors, which this server answers with 400 (documented per route),
    and an empty JSON body for routes that stream: drop both."""
    responses.pop("422", None)
    ok = responses.get("200", {}).get("content", {})
    if "text/event-stream" in ok and ok.get("application/json", {}).get("schema") == {}:
        del ok["application/json"]


def install_openapi(app: FastAPI) -> None:
    """The chat and completions routes read their bodies themselves (a resume may send none), so their schemas
    are added here, with examples, for clients and for the fuzzer."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, CompletionRequest, TextCompletion):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}
        schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {"required": False, "content": content}
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/CompletionRequest"}}}
        schema["paths"]["/v1/completions"]["post"]["requestBody"] = {"required": False, "content": content}
        for operation in (op for ops in schema["paths"].values() for op in ops.values()):
            document_our_statuses(operation["responses"])
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return error_response(describe_validation_error(list(exc.errors())))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found" if exc.status_code == 404 else "http_error"
        body = make_error(str(exc.detail), "invalid_request_error", None, kind)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        body = make_error("internal server error", "server_error", None, "internal_error")
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Builds the app; does no I/O. The model loads on first use (or in the lifespan with PRELOAD_MODEL=1);
    the journal opens in the lifespan."""
    engine = engine or TransformersEngine(settings)
    metrics = Metrics()
    metrics.registry.register(CacheCollector(engine))
    state = AppState(
        settings=settings,
        engine=engine,
        gate=GenerationGate(settings.max_concurrent_generations, settings.max_queued_requests),
        store=SessionStore(settings),
        watch=DisconnectWatch(settings.cancel_after_disconnect_seconds, metrics),
        metrics=metrics,
    )
    app = FastAPI(title="llm-server", lifespan=functools.partial(lifespan, state))
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app)
    install_middleware(app, settings, metrics)
    add_generation_route(app, state, "/v1/chat/completions", ChatCompletionRequest, start_chat, chat_responses())
    add_generation_route(app, state, "/v1/completions", CompletionRequest, start_completion, completions_responses())
    add_response_routes(app, state)
    add_session_routes(app, state)
    add_model_routes(app, ModelCard(id=engine.model_name, created=int(time.time()), owned_by="local"))
    add_health_routes(app, state)
    return app


def is_dropped_connection(context: Mapping[str, Any], platform: str) -> bool:
    """The Proactor loop's report of a client that closed its connection ([WinError 10054] from
    `_ProactorBasePipeTransport._call_connection_lost`): on Windows an everyday event (what resume is for), which
    the loop logs as an ERROR with a traceback. Nothing else matches."""
    return (
        platform == "win32"
        and isinstance(context.get("exception"), ConnectionResetError)
        and "_call_connection_lost" in str(context.get("message", ""))
    )


def install_loop_exception_handler(loop: asyncio.AbstractEventLoop, platform: str) -> None:
    """A dropped connection goes to the debug log (the drop itself is handled and counted as anywhere)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if is_dropped_connection(context, platform):
            log.debug("a client dropped its connection: %s", context.get("exception"))
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


@contextlib.asynccontextmanager
async def lifespan(state: AppState, app: FastAPI) -> AsyncIterator[None]:
    settings = state.settings
    configure_logging(settings)
    log.info("serving %s", settings.model_repo_id)  # uvicorn logs the address it really bound
    install_loop_exception_handler(asyncio.get_running_loop(), sys.platform)
    state.spawn(asyncio.to_thread(check_torch_build))
    if settings.persists():
        await open_journal(state)
    if settings.preload_model:
        state.spawn(preload(state.engine))
    state.spawn(sweep_sessions(state))
    yield
    await shut_down(state)


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    if settings.cors_allow_origins.strip():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()],
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-Id"],
            expose_headers=["X-Session-Id", "X-Request-Id", "Retry-After"],
        )
    app.add_middleware(RequestContext, metrics=metrics)  # outermost of ours: sees every response


GenerationRequest = TypeVar("GenerationRequest", ChatCompletionRequest, CompletionRequest)


def add_generation_route(
    app: FastAPI, state: AppState, path: str, body_class: type[GenerationRequest],
    start: Callable[[AppState, GenerationRequest, str], Awaitable[Session]], responses: dict[int | str, Any],
) -> None:  # fmt: skip
    """Chat completions and the legacy completions: a Last-Event-ID resumes (the body is not run again), else
    the body starts a session, streamed or folded into one JSON answer."""

    async def generate(request: Request, owner: Owner, last_event_id: str | None = None) -> Response:
        resume = parse_resume_point(request.headers.get("last-event-id"), last_event_id)
        if resume is not None:
            session = await state.store.get(resume[0], owner)
            state.metrics.resumes.inc()
            return sse_response(state, session, resume[1])
        body = await parse_body(request, body_class, state.settings.max_request_bytes)
        session = await start(state, body, owner)
        if body.stream:
            return sse_response(state, session, -1)
        completion: BaseModel = await collect_answer(session, state.watch)
        return Response(
            completion.model_dump_json(), media_type="application/json", headers={"X-Session-Id": session.id}
        )

    name = path.removeprefix("/v1/").replace("/", "_")  # the operation ids of before: chat_completions, completions
    app.add_api_route(path, generate, methods=["POST"], name=name, response_model=None, responses=responses)


def add_response_routes(app: FastAPI, state: AppState) -> None:
    """The Responses API: create, retrieve (object or events), cancel, input items, delete."""

    @app.post("/v1/responses", response_model=None, responses=responses_responses())
    async def create_response(request: Request, owner: Owner) -> Response:
        body = await parse_body(request, ResponsesRequest, state.settings.max_request_bytes)
        session = await start_response(state, body, owner)
        if body.stream:
            return sse_response(state, session, -1)
        if body.background:  # answered at once; the generation goes on
            return response_json(json.loads(session.meta.response_json), session)
        return response_json(await collect_answer(session, state.watch), session)

    @app.get("/v1/responses/{response_id}", response_model=None, responses=responses_responses())
    async def retrieve_response(
        response_id: str, request: Request, owner: Owner, stream: bool = False, starting_after: int | None = None
    ) -> Response:
        """The response now; with `stream=true` its events from the start (the SDK's stream helper filters them
        itself and needs `response.created` first), or after `starting_after`, then the live tail."""
        session = await find_response(state, response_id, owner)
        resume = parse_resume_point(request.headers.get("last-event-id"), None)
        if stream or resume is not None:
            after = resume[1] if resume is not None and resume[0] == session.id else starting_after
            if after is not None:
                state.metrics.resumes.inc()
            return sse_response(state, session, -1 if after is None else after)
        return response_json(await current_response(session), session)

    @app.post("/v1/responses/{response_id}/cancel", response_model=None, responses=responses_responses())
    async def cancel_response(response_id: str, owner: Owner) -> Response:
        session = await find_response(state, response_id, owner)
        if not session.meta.background:
            raise BadRequest("only background responses can be cancelled", param="response_id")
        if not session.ended:  # deliberate: cancelling again returns the final object, as the API documents
            session.request_cancel()
            await wait_until_ended(session)
        return response_json(await current_response(session), session)

    @app.get("/v1/responses/{response_id}/input_items", response_model=None, responses=responses_responses())
    async def response_input_items(response_id: str, owner: Owner) -> Response:
        session = await find_response(state, response_id, owner)
        items = json.loads(session.meta.input_json or "[]")
        return JSONResponse({"object": "list", "data": items, "has_more": False,
                             "first_id": items[0]["id"] if items else None,
                             "last_id": items[-1]["id"] if items else None})  # fmt: skip

    @app.delete("/v1/responses/{response_id}", response_model=None, responses=responses_responses())
    async def delete_response(response_id: str, owner: Owner) -> Response:
        session = await find_response(state, response_id, owner)
        if not session.ended:
            session.request_cancel()
            await wait_until_ended(session)
        await state.store.delete(session)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})  # the spec's example


def add_session_routes(app: FastAPI, state: AppState) -> None:
    """Any session, whatever API started it: its events (resume), its state, cancel."""

    @app.get("/v1/sessions/{session_id}/events", response_model=None, responses=stream_responses())
    async def session_events(
        session_id: str, request: Request, owner: Owner, last_event_id: str | None = None
    ) -> Response:
        resume = parse_resume_point(request.headers.get("last-event-id"), last_event_id)
        if resume is not None and resume[0] != session_id:
            raise BadRequest("Last-Event-ID names another session", param="Last-Event-ID")
        session = await state.store.get(session_id, owner)
        if resume is not None:
            state.metrics.resumes.inc()
        return sse_response(state, session, resume[1] if resume else -1)

    @app.get("/v1/sessions/{session_id}", responses=ERROR_RESPONSES)
    async def session_info(session_id: str, owner: Owner) -> SessionInfo:
        return (await state.store.get(session_id, owner)).describe()

    @app.post("/v1/cancel/{session_id}", responses=ERROR_RESPONSES)
    async def cancel(session_id: str, owner: Owner) -> CancelResult:
        return await cancel_session(state, session_id, owner)


def add_model_routes(app: FastAPI, model_card: ModelCard) -> None:
    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        """The built-in chat page: one static file, read per request (nothing at import), only the public API."""
        return FileResponse(CHAT_PAGE, media_type="text/html", headers=CHAT_PAGE_HEADERS)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(owner: Owner) -> ModelList:
        return ModelList(data=[model_card])

    @app.get("/v1/models/{model:path}", responses=ERROR_RESPONSES)
    async def retrieve_model(model: str, owner: Owner) -> ModelCard:
        if model != model_card.id:
            raise NotFound(f"The model {model!r} does not exist; this server serves {model_card.id!r}",
                           param="model", code="model_not_found")  # fmt: skip
        return model_card


def placement_fields(placement: Placement | None) -> dict[str, Any]:
    return {"device": placement.device, "dtype": placement.dtype} if placement is not None else {}


def kv_fields(stats: dict[str, int]) -> dict[str, Any]:
    if not stats:
        return {}
    return {"kv_cache_bytes": stats["bytes"], "kv_cache_budget_bytes": stats["budget_bytes"],
            "requests_waiting_for_memory": stats["waiting_rows"]}  # fmt: skip


def add_health_routes(app: FastAPI, state: AppState) -> None:
    engine, metrics = state.engine, state.metrics

    @app.get("/health")
    async def health() -> Health:
        return Health(
            status="ok", model=engine.model_name, model_loaded=engine.is_loaded(), model_error=engine.load_error(),
            generations_running=state.gate.running, generations_queued=state.gate.admitted - state.gate.running,
            sessions=len(state.store.sessions), persistence=state.persistence(), sessions_continued=state.continued,
            **placement_fields(engine.placement()), **kv_fields(engine.batch_stats()),
        )  # fmt: skip

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        metrics.generations_active.set(state.gate.running)
        metrics.generations_queued.set(state.gate.admitted - state.gate.running)
        metrics.sessions_in_memory.set(len(state.store.sessions))
        journal = state.store.journal
        if journal is not None and journal.error is None:
            with contextlib.suppress(Exception):  # deliberate: sqlite3 or Redis errors; /health reports the store
                metrics.sessions_on_disk.set(await asyncio.to_thread(journal.count_sessions))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health/live")
    async def health_live() -> Live:
        return Live(status="ok")

    @app.get("/health/ready", responses={503: {"model": ErrorBody}})
    async def health_ready() -> Ready:
        if not engine.is_loaded():
            raise ModelNotReady(engine.load_error() or f"model {engine.model_name} is not loaded yet")
        return Ready(status="ready", persistence=state.persistence())


# ==== 19. Entrypoint ================================================================================================
# main(): uvicorn.run(...), and the convert-gguf command.


def settings_or_exit(environ: Mapping[str, str], dotenv_path: Path) -> Settings:
    """The settings, or one line naming the bad variable and exit status 2 (not a traceback ending in it)."""
    try:
        return Settings.from_env(environ, dotenv_path)
    except ConfigError as exc:
        sys.stderr.write(f"llm-server: invalid setting: {exc}\n")
        raise SystemExit(2) from None


USAGE = (
    "usage: python main.py                              serve (settings from the environment or .env)\n"
    "       python main.py convert-gguf FILE.gguf FOLDER   turn a GGUF into a folder that loads in seconds\n"
)


def run_command(args: list[str]) -> int:
    """The one command besides serving: convert-gguf."""
    if len(args) != 3 or args[0] != "convert-gguf":
        sys.stderr.write(USAGE)
        return 2
    source, target = Path(args[1]), Path(args[2])
    if not source.is_file() or target.exists():
        sys.stderr.write(
            f"llm-server: {'no such file: ' + str(source) if not source.is_file() else str(target) + ' exists'}\n"
        )
        return 2
    convert_gguf(source, target)
    sys.stderr.write(f"llm-server: wrote {target}; serve it with MODEL_REPO_ID={target}\n")
    return 0


def main() -> None:
    import uvicorn

    if len(sys.argv) > 1:
        raise SystemExit(run_command(sys.argv[1:]))
    settings = settings_or_exit(os.environ, APP_DIR / ".env")
    configure_logging(settings)  # before uvicorn starts, so its own records pass through the redaction too
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                timeout_graceful_shutdown=int(SHUTDOWN_SECONDS))  # fmt: skip


app = create_app(settings_or_exit(os.environ, APP_DIR / ".env"))  # builds objects only: no I/O, no model


if __name__ == "__main__":
    main()
