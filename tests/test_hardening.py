"""Production hardening: API keys, session ownership, limits, CORS, request ids, metrics, secrets, fuzzing,
graceful shutdown, and a bounded load test with random disconnects and resumes."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from test_resume import assert_contiguous, content_of, resume

import main
from conftest import LiveServer, ScriptedEngine, ServerProcess, iter_sse, make_settings, read_stream

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY_A, KEY_B = "sk-alpha-0123456789", "sk-bravo-9876543210"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed_client(engine: ScriptedEngine | None = None, **settings: Any) -> TestClient:
    settings = {"api_key": f"{KEY_A},{KEY_B}", **settings}
    app = main.create_app(make_settings(**settings), engine or ScriptedEngine(["a", "b"]))
    return TestClient(app, raise_server_exceptions=False)


# ---- API keys -------------------------------------------------------------------------------------------------


UNAUTHORIZED = {
    "error": {
        "message": "missing or invalid API key: send Authorization: Bearer <key>",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/sessions/x"),
     ("GET", "/v1/sessions/x/events"), ("POST", "/v1/cancel/x")],
)  # fmt: skip
@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": KEY_A}, {"Authorization": "Basic x"}])
def test_v1_routes_need_a_valid_key(method: str, path: str, headers: dict[str, str]) -> None:
    with keyed_client() as client:
        response = client.request(method, path, headers=headers, json={"messages": QUESTION})
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_every_listed_key_works_and_health_and_metrics_stay_open(key: str) -> None:
    with keyed_client() as client:
        assert client.post("/v1/chat/completions", headers=bearer(key), json={"messages": QUESTION}).status_code == 200
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        for path in ("/health", "/health/live", "/metrics"):
            assert client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    ("header", "keys", "owner"),
    [
        ("Bearer k1", ["k1", "k2"], main.hashlib.sha256(b"k1").hexdigest()[:16]),
        ("bearer  k2 ", ["k1", "k2"], main.hashlib.sha256(b"k2").hexdigest()[:16]),
        (None, [], ""),
        ("Bearer anything", [], ""),
    ],
)
def test_key_owner(header: str | None, keys: list[str], owner: str) -> None:
    assert main.key_owner(header, keys) == owner


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer k3", "Token k1", "k1"])
def test_key_owner_refuses(header: str | None) -> None:
    with pytest.raises(main.Unauthorized):
        main.key_owner(header, ["k1", "k2"])


# ---- session ownership ------------------------------------------------------------------------------------------


def test_sessions_are_invisible_to_other_keys() -> None:
    engine = ScriptedEngine(["x", "y"])
    with keyed_client(engine) as client:
        created = client.post("/v1/chat/completions", headers=bearer(KEY_A),
                              json={"messages": QUESTION, "session_id": "mine"})  # fmt: skip
        assert created.status_code == 200
        for method, path, headers in [
            ("GET", "/v1/sessions/mine", {}),
            ("GET", "/v1/sessions/mine/events", {}),
            ("POST", "/v1/cancel/mine", {}),
            ("POST", "/v1/chat/completions", {"Last-Event-ID": "mine:0"}),
        ]:
            other = client.request(method, path, headers={**bearer(KEY_B), **headers})
            assert other.status_code == 404, path  # 404, not 403: ids cannot be probed
            assert other.json()["error"]["message"] == "no session 'mine'"
            assert client.request(method, path, headers={**bearer(KEY_A), **headers}).status_code == 200, path
        # the same client-chosen id under another key is another session: no hijack, no attach
        theirs = client.post("/v1/chat/completions", headers=bearer(KEY_B),
                             json={"messages": [{"role": "user", "content": "B"}], "session_id": "mine"})  # fmt: skip
        assert theirs.status_code == 200 and theirs.headers["x-session-id"] == "mine"
    assert [p[0]["content"] for p in engine.prompts] == [QUESTION[0]["content"], "B"]


# ---- limits -------------------------------------------------------------------------------------------------------


def test_request_body_cap_is_413() -> None:
    with keyed_client(api_key="", max_request_bytes=2000) as client:
        big = {"messages": [{"role": "user", "content": "x" * 3000}]}
        declared = client.post("/v1/chat/completions", json=big)
        chunked = client.post("/v1/chat/completions", content=iter([json.dumps(big).encode()]),
                              headers={"content-type": "application/json"})  # fmt: skip
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"] == {
            "message": "request body is larger than 2000 bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }


def test_too_many_messages_is_400() -> None:
    with keyed_client(api_key="", max_messages=2) as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION * 3})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "too many messages: 3 (at most 2)"
    assert response.json()["error"]["param"] == "messages"


@pytest.mark.parametrize(
    ("context", "max_prompt", "message"),
    [
        (5, 0, "This model's maximum context length is 5 tokens. However, your messages resulted in 7 tokens."),
        (
            0,
            6,
            "The server's prompt limit (MAX_PROMPT_TOKENS) is 6 tokens. However, your messages resulted in 7 tokens.",
        ),
        (7, 0, "This model's maximum context length is 7 tokens. However, your messages resulted in 7 tokens."),
    ],
)
def test_prompt_past_the_limit_is_context_length_exceeded(context: int, max_prompt: int, message: str) -> None:
    engine = ScriptedEngine(["a"], prompt_tokens=7)
    engine.context_tokens = context or None
    with keyed_client(engine, api_key="", max_prompt_tokens=max_prompt) as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
    }  # fmt: skip


def test_a_default_max_tokens_is_capped_to_the_context_left() -> None:
    engine = ScriptedEngine(["w"] * 50, prompt_tokens=7)
    engine.context_tokens = 10
    with keyed_client(engine, api_key="") as client:
        body = client.post("/v1/chat/completions", json={"messages": QUESTION}).json()
    assert body["choices"][0]["message"]["content"] == "www"
    assert (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]) == ("length", 3)


KV_LIMIT = main.KvLimit(tokens=9, budget_bytes=3 << 29)


@pytest.mark.parametrize(
    ("context", "kv", "body", "message"),
    [
        (10, None, {"max_tokens": 4}, "This model's maximum context length is 10 tokens. However, you requested 11 "
         "tokens (7 in the messages, 4 in the completion). Please reduce the length of the messages or completion."),
        (None, KV_LIMIT, {"max_completion_tokens": 3}, "The server's KV cache budget (KV_CACHE_BYTES, 1.50 GiB) for "
         "one request is 9 tokens. However, you requested 10 tokens (7 in the messages, 3 in the completion). Please "
         "reduce the length of the messages or completion."),
        (None, main.KvLimit(7, 1 << 30), {}, "The server's KV cache budget (KV_CACHE_BYTES, 1.00 GiB) for one "
         "request is 7 tokens. However, your messages resulted in 7 tokens."),
    ],
)  # fmt: skip
def test_a_request_that_can_never_fit_is_a_400_with_the_figures(
    context: int | None, kv: main.KvLimit | None, body: dict[str, Any], message: str
) -> None:
    """Past the model's context or what the KV budget holds for one request: refused before any work, naming
    the figures (OpenAI's wording). A default max_tokens is capped instead (above and below)."""
    engine = ScriptedEngine(["w"] * 50, prompt_tokens=7)
    engine.context_tokens, engine.kv_tokens = context, kv
    with keyed_client(engine, api_key="") as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION, **body})
        capped = client.post("/v1/chat/completions", json={"messages": QUESTION}).json()
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
    }  # fmt: skip
    if kv is KV_LIMIT:
        assert capped["usage"]["completion_tokens"] == 2  # 9 - 7


def test_generation_time_cap_ends_with_length_and_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine(["t "] * 200, delay_seconds=0.02)
    with keyed_client(engine, api_key="", max_generation_seconds=0.3) as client, caplog.at_level(logging.WARNING):
        body = client.post("/v1/chat/completions", json={"messages": QUESTION, "session_id": "slow"}).json()
    words = body["choices"][0]["message"]["content"].split()
    assert body["choices"][0]["finish_reason"] == "length"
    assert 3 < len(words) < 100
    assert "session slow reached MAX_GENERATION_SECONDS (0.3 s)" in caplog.text


# ---- CORS -------------------------------------------------------------------------------------------------------


def test_cors_is_off_by_default_and_configurable() -> None:
    preflight = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,last-event-id,content-type"}  # fmt: skip
    with keyed_client(api_key="") as client:
        off = client.options("/v1/chat/completions", headers=preflight)
    with keyed_client(api_key="", cors_allow_origins="http://app.test,http://other.test") as client:
        on = client.options("/v1/chat/completions", headers=preflight)
        simple = client.get("/v1/models", headers={"Origin": "http://app.test"})
        foreign = client.get("/v1/models", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in off.headers
    assert on.status_code == 200 and on.headers["access-control-allow-origin"] == "http://app.test"
    assert "last-event-id" in on.headers["access-control-allow-headers"].lower()
    assert simple.headers["access-control-allow-origin"] == "http://app.test"
    assert "x-session-id" in simple.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in foreign.headers


# ---- request ids, logs, secrets ----------------------------------------------------------------------------------


def test_request_id_is_echoed_or_made_and_tags_every_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with keyed_client(api_key="") as client, caplog.at_level(logging.INFO, logger="llm_server"):
        given = client.post("/v1/chat/completions", headers={"x-request-id": "req-42"}, json={"messages": QUESTION})
        made = client.get("/health")
        invalid = client.get("/health", headers={"x-request-id": "bad id with spaces"})
    assert given.headers["x-request-id"] == "req-42"
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{16}", invalid.headers["x-request-id"])
    session_lines = [r for r in caplog.records if "session" in r.getMessage()]
    assert len(session_lines) >= 2  # started, finished (the runner task inherits the request's id)
    assert {getattr(r, "request_id", None) for r in session_lines} == {"req-42"}


def test_no_secret_in_logs_or_error_bodies(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    hf_token = "hf_TopSecretToken123"
    settings = make_settings(api_key=KEY_A, hf_token=hf_token, model_repo_id=str(tmp_path / "missing"),
                             device_map="cpu")  # fmt: skip
    app = main.create_app(settings)
    bodies = []
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.DEBUG):
        bodies.append(client.post("/v1/chat/completions", headers=bearer(KEY_A), json={"messages": QUESTION}).text)
        bodies.append(client.post("/v1/chat/completions", headers=bearer(KEY_A + "x"), json={}).text)
        main.log.warning("echo of a header: Authorization: Bearer %s", KEY_A)
        main.log.warning("echo of the token %s", hf_token)
    text = caplog.text + "".join(bodies)
    assert "could not be loaded" in text  # the request really ran
    assert KEY_A not in text and hf_token not in text


# ---- metrics ---------------------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"{name} {labels} not in metrics"
    return float(match.group(1))


def test_metrics_count_requests_tokens_resumes_and_cancels() -> None:
    engine = ScriptedEngine(["a ", "b ", "c "], prompt_tokens=4)
    with keyed_client(engine, api_key="") as client:
        for _ in range(2):
            client.post("/v1/chat/completions", json={"messages": QUESTION})
        client.post("/v1/chat/completions", json={"messages": QUESTION, "n": 99})
        sid = client.post("/v1/chat/completions", json={"messages": QUESTION}).headers["x-session-id"]
        client.get(f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": f"{sid}:1"})
        client.post(f"/v1/cancel/{sid}")
        text = client.get("/metrics").text
    assert metric(text, "llm_requests_total", route="/v1/chat/completions", status="200") == 3
    assert metric(text, "llm_requests_total", route="/v1/chat/completions", status="400") == 1
    assert metric(text, "llm_generated_tokens_total") == 9
    assert metric(text, "llm_time_to_first_token_seconds_count") == 3
    assert metric(text, "llm_token_latency_seconds_count") == 6  # 2 gaps in each of 3 streams
    assert metric(text, "llm_resumes_total") == 1
    assert metric(text, "llm_cancels_total", kind="manual") == 0  # the session had already finished
    assert metric(text, "llm_sessions_in_memory") == 3
    assert metric(text, "llm_generations_active") == 0 and metric(text, "llm_generations_queued") == 0


def test_metrics_count_manual_and_automatic_cancels(live_server: Callable[..., LiveServer]) -> None:
    engine = ScriptedEngine(["t "] * 300, delay_seconds=0.02)
    server = live_server(make_settings(cancel_after_disconnect_seconds=0.3), engine)
    for sid in ("manual-1", "auto-1"):
        body = {"messages": QUESTION, "stream": True, "session_id": sid}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            next(iter_sse(response))
            if sid.startswith("manual"):
                httpx.post(f"{server.url}/v1/cancel/{sid}", timeout=10)
    deadline = time.monotonic() + 10
    while server.state.watch.auto_cancels == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert metric(text, "llm_cancels_total", kind="manual") == 1
    assert metric(text, "llm_cancels_total", kind="auto") == 1


# ---- fuzzing with schemathesis against the app's own OpenAPI schema ------------------------------------------


def openai_shaped(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]


def fuzz_app(api_key: str) -> Any:
    engine = ScriptedEngine(["fuzz ", "ok"])
    settings = make_settings(api_key=api_key, max_request_bytes=100_000, preload_model=1)  # ready: no 503 by design
    return main.create_app(settings, engine)


def test_openapi_documents_the_chat_request_with_examples() -> None:
    schema = fuzz_app("").openapi()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    request_schema = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert request_schema["examples"][0]["messages"][0]["content"] == "What is the capital of France?"


@pytest.mark.parametrize("auth", ["none", "keyed-with-key", "keyed-without-key"])
def test_fuzz_every_route_no_5xx_and_errors_openai_shaped(auth: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = fuzz_app("" if auth == "none" else KEY_A)
    headers = bearer(KEY_A) if auth == "keyed-with-key" else {}
    seen: list[tuple[str, int]] = []
    with LiveServer(app) as server:  # one event loop for the whole run, as in production
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case: Any) -> None:
            response = case.call(base_url=server.url, headers=headers, timeout=30)
            seen.append((case.path, response.status_code))
            openai_shaped(response)

        operations = [result.ok() for result in schema.get_all_operations()]
        for operation in operations:
            given(operation.as_strategy())(check)()
    paths = {path for path, _ in seen}
    assert {"/v1/chat/completions", "/v1/cancel/{session_id}", "/health/ready", "/metrics"} <= paths
    v1_statuses = {status for path, status in seen if path.startswith("/v1/")}
    if auth == "keyed-without-key":
        assert v1_statuses == {401}  # every /v1 route needs the key
    else:
        assert 200 in v1_statuses and 401 not in v1_statuses


# ---- graceful shutdown -------------------------------------------------------------------------------------------


def test_graceful_shutdown_marks_running_sessions_interrupted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """RESTART_SESSIONS=interrupt (the default leaves them to be continued: test_continuation.py)."""
    env = {"MODEL_REPO_ID": str(tiny_model_dir), "DEVICE_MAP": "cpu", "TEMPERATURE": "0", "PERSIST_SESSIONS": "1",
           "SESSIONS_DB_PATH": str(tmp_path / "s.db"), "MAX_TOKENS": "4000",
           "RESTART_SESSIONS": "interrupt"}  # fmt: skip
    first = ServerProcess(env, tmp_path)
    body = {"messages": QUESTION, "stream": True, "session_id": "shutdown-1"}
    with httpx.stream("POST", first.url + "/v1/chat/completions", json=body, timeout=60) as response:
        seen = read_stream(response, "shutdown-1", limit=5)
        first.stop()  # SIGTERM: uvicorn's graceful shutdown, then our lifespan
    import sqlite3

    with sqlite3.connect(tmp_path / "s.db") as conn:
        state = conn.execute("SELECT state FROM sessions WHERE id = 'shutdown-1'").fetchone()[0]
        rows = conn.execute("SELECT idx, data FROM events WHERE session_id = 'shutdown-1' ORDER BY idx").fetchall()
    assert state == "interrupted"  # marked by the shutdown itself, not by the next start's recovery
    assert [r[0] for r in rows] == list(range(len(rows)))  # no gap, no half-written batch
    assert json.loads(rows[-2][1])["error"]["code"] == "interrupted" and rows[-1][1] == "[DONE]"
    second = ServerProcess(env, tmp_path)
    try:
        replay = resume(second.url, "shutdown-1", 2)
        assert replay[: len(seen) - 3] == seen[3:]
        assert replay[-1][1] == "[DONE]"
    finally:
        second.stop()


# ---- bounded load test: 32 streams, random disconnects and resumes ----------------------------------------------


@pytest.mark.slow
def test_32_streams_with_random_disconnects_and_resumes(
    tiny_model_dir: Path, live_server: Callable[..., LiveServer]
) -> None:
    settings = make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu", temperature=0, max_tokens=24,
                             max_concurrent_generations=4, max_queued_requests=64,
                             sessions_ttl_seconds=1.5)  # fmt: skip
    server = live_server(settings)
    reference = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION}, timeout=120).json()
    expected = reference["choices"][0]["message"]["content"]
    failures: list[str] = []
    sessions: list[weakref.ref[main.Session]] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        try:
            body = {"messages": QUESTION, "stream": True, "session_id": f"load-{i}"}
            events: list[tuple[int, str]] = []
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
                events += read_stream(response, f"load-{i}", limit=rng.randint(1, 8))
            sessions.append(weakref.ref(server.state.store.sessions[f"load-{i}"]))
            for _ in range(rng.randint(0, 2)):  # drop again after a few more events
                if events[-1][1] == "[DONE]":
                    break
                with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                                  headers={"Last-Event-ID": f"load-{i}:{events[-1][0]}"}) as response:  # fmt: skip
                    events += read_stream(response, f"load-{i}", limit=rng.randint(1, 6))
            if events[-1][1] != "[DONE]":
                events += resume(server.url, f"load-{i}", events[-1][0])
            assert_contiguous(events)
            assert content_of(events) == expected
        except Exception as exc:  # collected: an assertion in a thread would be lost
            failures.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert failures == []
    assert len(sessions) == 32
    deadline = time.monotonic() + 20  # after the TTL the sweeper forgets every session
    while server.state.store.sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.state.store.sessions == {}
    assert server.state.gate.admitted == 0
    import gc

    gc.collect()
    assert [ref for ref in sessions if ref() is not None] == []  # nothing else holds them: memory is back
    assert [t for t in threading.enumerate() if t.name in ("generate", "engine-pump")] == []
