"""Every response body and every streamed chunk, validated against the official OpenAI OpenAPI specification.

The spec is pinned in this repository: `tests/spec/openapi.json.gz` is openai/openai-openapi's `openapi.json` at
commit f85dbe223d40e1a31cba812ab2d755c7e98a92a3 (2026-08-21, the newest on its main branch when pinned), gzipped;
`tests/spec/SOURCE.md` names the commit and the sha256 of the uncompressed document, which is checked here.
CLAUDE.md says how to refresh it. Deliberate: fetch-free (CI has no network) but current, where the PyPI copy
used before lagged the official document (it lacked the Responses usage's required `cache_write_tokens`). The
schemas a test needs are taken from it with every schema they reference (`schema_closure`).

Real responses come from the tiny Qwen3 (live uvicorn): JSON and streams with and without usage, finished by
`stop` (a stop string) and by `length`, a cancelled stream, in-stream and HTTP errors, and /v1/models.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

import main
from conftest import LiveServer, ScriptedEngine, make_settings

SPEC_FILE = Path(__file__).parent / "spec" / "openapi.json.gz"
SPEC_SHA256 = "bbfd19abcde0e7412da99378deb2a959ccdd3a812f97c9e35901921e8e973f9a"  # the uncompressed openapi.json
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---- the spec ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec()


def load_spec() -> dict[str, Any]:
    raw = gzip.decompress(SPEC_FILE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == SPEC_SHA256, "the pinned spec changed: review, then update the hash"
    return json.loads(raw)  # type: ignore[no-any-return]


def allow_null_where_nullable(schema: Any) -> Any:
    """A few schemas still say OpenAPI 3.0's `nullable: true`, which JSON Schema 2020-12 ignores; the spec means
    "or null" (the SDKs generated from it read it so)."""
    if isinstance(schema, list):
        return [allow_null_where_nullable(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: allow_null_where_nullable(value) for key, value in schema.items() if key != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") is True else out


def schema_closure(spec: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The named component schemas and every schema they reference, transitively."""
    schemas = spec["components"]["schemas"]
    todo, kept = list(names), {}
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = schemas[name]
        text = json.dumps(schemas[name])
        todo += [ref.split('"')[0] for ref in text.split('"#/components/schemas/')[1:]]
    return kept


def validator(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    components = {"schemas": allow_null_where_nullable(copy.deepcopy(schema_closure(spec, [name])))}
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    return jsonschema.Draft202012Validator(schema, format_checker=None)


def assert_valid(spec: dict[str, Any], name: str, body: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(spec, name).iter_errors(body)]
    assert errors == [], f"{name}: {errors} in {body}"


def test_the_validator_rejects_what_the_issue_found(spec: dict[str, Any]) -> None:
    """The check can fail: the two spec violations of before (no `refusal`, finish_reason "cancelled")."""
    body = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": None,
                     "finish_reason": "cancelled"}],
    }  # fmt: skip
    messages = sorted(e.message for e in validator(spec, "CreateChatCompletionResponse").iter_errors(body))
    assert messages == ["'cancelled' is not one of ['stop', 'length', 'tool_calls', 'content_filter', 'function_call']",
                        "'refusal' is a required property"]  # fmt: skip


def test_the_nullable_request_fields_are_those_the_spec_lists(spec: dict[str, Any]) -> None:
    """test_protocol's table of nullable request fields is the spec's own list."""
    from test_protocol import SPEC_NULLABLE_REQUEST_FIELDS

    schemas = spec["components"]["schemas"]

    def resolve(s: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in s:
            s = schemas[s["$ref"].rpartition("/")[2]]
        return s

    def properties(s: dict[str, Any]) -> dict[str, Any]:
        s, out = resolve(s), {}
        for part in s.get("allOf", []):
            out.update(properties(part))
        return {**out, **s.get("properties", {})}

    def nullable(s: dict[str, Any]) -> bool:
        alternatives = s.get("anyOf", []) + s.get("oneOf", [])
        if s.get("nullable") or any(a.get("type") == "null" for a in alternatives):
            return True
        return any(nullable(resolve(a)) for a in alternatives if "$ref" in a) or ("$ref" in s and nullable(resolve(s)))

    fields = properties(schemas["CreateChatCompletionRequest"])
    assert sorted(name for name, s in fields.items() if nullable(s)) == SPEC_NULLABLE_REQUEST_FIELDS


# ---- real responses ------------------------------------------------------------------------------------------


def sse_payloads(lines: Iterator[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def stream(server: LiveServer, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        return sse_payloads(response.iter_lines())


def assert_stream_valid(spec: dict[str, Any], payloads: list[str]) -> list[dict[str, Any]]:
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        assert_valid(spec, "CreateChatCompletionStreamResponse", chunk)
    return chunks


@pytest.mark.parametrize(
    ("extra", "finish"),
    [({"max_tokens": 4}, "length"), ({"max_tokens": 40, "stop": ["is is"]}, "stop")],
)
def test_json_completions_validate(
    spec: dict[str, Any], tiny_server: LiveServer, extra: dict[str, Any], finish: str
) -> None:
    response = httpx.post(tiny_server.url + "/v1/chat/completions", json={"messages": QUESTION, **extra}, timeout=60)
    body = response.json()
    assert_valid(spec, "CreateChatCompletionResponse", body)
    assert body["choices"][0]["finish_reason"] == finish and body["choices"][0]["message"]["refusal"] is None


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize(
    ("extra", "finish"),
    [({"max_tokens": 4}, "length"), ({"max_tokens": 40, "stop": "is is"}, "stop")],
)
def test_streams_validate_chunk_by_chunk(
    spec: dict[str, Any], tiny_server: LiveServer, extra: dict[str, Any], finish: str, include_usage: bool
) -> None:
    body = {"messages": QUESTION, "stream": True, "stream_options": {"include_usage": include_usage}, **extra}
    chunks = assert_stream_valid(spec, stream(tiny_server, body))
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == finish and set(reasons[:-1]) == {None}
    assert [c for c in chunks if not c["choices"]] == ([chunks[-1]] if include_usage else [])


@pytest.fixture(scope="module")
def slow_scripted() -> Iterator[LiveServer]:
    engine = ScriptedEngine([f" t{i}" for i in range(400)], delay_seconds=0.02)
    with LiveServer(main.create_app(make_settings(), engine)) as server:
        yield server


def test_a_cancelled_stream_and_its_json_validate(spec: dict[str, Any], slow_scripted: LiveServer) -> None:
    body = {"messages": QUESTION, "stream": True, "session_id": "spec-cancel"}
    with httpx.stream("POST", slow_scripted.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        head = [next(line for line in lines if line.startswith("data: "))[len("data: ") :]]
        cancelled = httpx.post(slow_scripted.url + "/v1/cancel/spec-cancel", timeout=30).json()
        payloads = head + sse_payloads(lines)
    chunks = assert_stream_valid(spec, payloads)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and cancelled["state"] == "cancelled"


def test_in_stream_errors_and_http_errors_validate(spec: dict[str, Any], slow_scripted: LiveServer) -> None:
    bad = httpx.post(slow_scripted.url + "/v1/chat/completions", json={"messages": [{"role": "user"}]}, timeout=10)
    missing = httpx.get(slow_scripted.url + "/v1/sessions/nope", timeout=10)
    unknown_model = httpx.get(slow_scripted.url + "/v1/models/gpt-4o", timeout=10)
    for response, status in [(bad, 400), (missing, 404), (unknown_model, 404)]:
        assert response.status_code == status
        assert_valid(spec, "ErrorResponse", response.json())
    engine = ScriptedEngine(["a", "b", "c"])
    engine.fail_stream_after = 1
    with LiveServer(main.create_app(make_settings(), engine)) as failing:
        payloads = stream(failing, {"messages": QUESTION, "stream": True})
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    assert_valid(spec, "ErrorResponse", error)
    assert_stream_valid(spec, [*payloads[:-2], "[DONE]"])


def test_models_validate(spec: dict[str, Any], tiny_server: LiveServer, tiny_model_dir: Path) -> None:
    listed = httpx.get(tiny_server.url + "/v1/models", timeout=10).json()
    one = httpx.get(f"{tiny_server.url}/v1/models/{tiny_model_dir.name}", timeout=10).json()
    assert_valid(spec, "ListModelsResponse", listed)
    assert_valid(spec, "Model", one)
    assert listed["data"] == [one]
