"""Layer 2: the app in-process (TestClient) over a scripted engine: routes, shapes, errors, admission."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

import main
from conftest import ScriptedEngine, make_settings

HELLO = [{"role": "user", "content": "hi"}]


def client_for(engine: ScriptedEngine, **settings: Any) -> TestClient:
    return TestClient(main.create_app(make_settings(**settings), engine), raise_server_exceptions=False)


def parse_sse(body: str) -> list[tuple[str | None, str]]:
    """SSE text -> [(id, data)], skipping comments."""
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            events.append((fields.get("id"), fields["data"]))
    return events


def test_json_completion_folds_the_scripted_tokens() -> None:
    with client_for(ScriptedEngine(["Hel", "lo", "!"], prompt_tokens=5)) as client:
        response = client.post("/v1/chat/completions", json={"model": "x", "messages": HELLO})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "scripted"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert len(response.headers["x-session-id"]) == 32


def test_sse_events_in_order_with_ids_role_first_finish_usage_done() -> None:
    with client_for(ScriptedEngine(["a", "b"], prompt_tokens=4)) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    sid = response.headers["x-session-id"]
    events = parse_sse(response.text)
    assert [event_id for event_id, _ in events] == [f"{sid}:{i}" for i in range(6)]
    payloads = [json.loads(data) for _, data in events[:-1]]
    assert [p["choices"][0]["delta"] if p["choices"] else None for p in payloads] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
        {"content": "b"},
        {},
        None,
    ]
    assert [p["choices"][0]["finish_reason"] for p in payloads[:4]] == [None, None, None, "stop"]
    assert payloads[4]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert events[-1][1] == "[DONE]"
    assert {p["id"] for p in payloads} == {payloads[0]["id"]}


def test_sse_without_include_usage_has_no_usage_chunk() -> None:
    with client_for(ScriptedEngine(["a"])) as client:
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
    datas = [data for _, data in parse_sse(response.text)]
    assert len(datas) == 4 and datas[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in datas[:-1])


def test_max_tokens_gives_finish_reason_length() -> None:
    with client_for(ScriptedEngine(["a", "b", "c", "d"])) as client:
        body = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()
    assert body["choices"][0]["message"]["content"] == "ab"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_stop_string_is_cut_and_not_emitted() -> None:
    engine = ScriptedEngine(["one ", "two", " ST", "OP three"])
    with client_for(engine) as client:
        body = client.post("/v1/chat/completions", json={"messages": HELLO, "stop": ["STOP"]}).json()
    assert body["choices"][0]["message"]["content"] == "one two "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_messages_reach_the_engine_in_template_form() -> None:
    engine = ScriptedEngine(["x"])
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    with client_for(engine) as client:
        client.post("/v1/chat/completions", json={"messages": messages, "unknown_field": 1})
    assert engine.prompts == [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": HELLO, "n": 9}, "n", "n must be at most 8 on this server (MAX_N, MAX_BATCH_SIZE)"),
        ({"messages": []}, "messages", "messages: List should have at least 1 item after validation, not 0"),
        ({}, "messages", "messages: Field required"),
        ({"messages": HELLO, "temperature": 3}, "temperature", "temperature: Input should be less than or equal to 2"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "max_tokens: Input should be greater than or equal to 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
            "messages[0].content[0]",
            "image_url parts are only allowed in user messages",
        ),
    ],
)
def test_bad_requests_are_400_in_openai_shape(body: dict[str, Any], param: str, message: str | None) -> None:
    with client_for(ScriptedEngine(["x"])) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_request")
    if message is not None:
        assert error["message"] == message


def test_malformed_json_is_400() -> None:
    with client_for(ScriptedEngine(["x"])) as client:
        response = client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_is_404_in_openai_shape() -> None:
    with client_for(ScriptedEngine(["x"])) as client:
        response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": "not_found"}
    }


def test_failed_load_is_503_with_the_reason_and_retried() -> None:
    engine = ScriptedEngine(["ok"])
    engine.fail_load_with = "model m could not be loaded (no network and no local copy?): offline"
    with client_for(engine) as client:
        first = client.post("/v1/chat/completions", json={"messages": HELLO})
        ready = client.get("/health/ready")
        engine.fail_load_with = None
        second = client.post("/v1/chat/completions", json={"messages": HELLO})
        ready_after = client.get("/health/ready")
    assert first.status_code == 503
    assert first.json()["error"] == {
        "message": "model m could not be loaded (no network and no local copy?): offline",
        "type": "service_unavailable_error",
        "param": None,
        "code": "model_not_ready",
    }
    assert ready.status_code == 503
    assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"] == "ok"
    assert ready_after.status_code == 200 and ready_after.json() == {"status": "ready", "persistence": "off"}


def test_engine_failure_is_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine(["a", "b", "c"])
    engine.fail_stream_after = 1
    with client_for(engine) as client, caplog.at_level(logging.ERROR):
        response = client.post("/v1/chat/completions", json={"messages": HELLO})
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "internal error during generation",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "/home/user/model.bin" not in response.text
    assert "scripted failure" in caplog.text  # the stack goes to the log, not the client


def test_error_after_stream_start_is_one_error_event_then_done() -> None:
    engine = ScriptedEngine(["a", "b", "c"])
    engine.fail_stream_after = 1
    with client_for(engine) as client:
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
    datas = [data for _, data in parse_sse(response.text)]
    assert response.status_code == 200
    assert json.loads(datas[1])["choices"][0]["delta"] == {"content": "a"}
    assert json.loads(datas[2]) == {
        "error": {
            "message": "internal error during generation",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert datas[3:] == ["[DONE]"]


def test_overload_is_429_with_retry_after() -> None:
    engine = ScriptedEngine(["a"] * 50, delay_seconds=0.05)
    app = main.create_app(make_settings(max_concurrent_generations=1, max_queued_requests=1), engine)
    with TestClient(app) as client:
        state: main.AppState = app.state.server
        state.gate.admit()  # one running
        state.gate.admit()  # one queued: the gate is full
        response = client.post("/v1/chat/completions", json={"messages": HELLO})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.json()["error"]["code"] == "server_overloaded"


def test_models_and_health() -> None:
    engine = ScriptedEngine(["x"], model_name="my/model")
    with client_for(engine) as client:
        models = client.get("/v1/models").json()
        live = client.get("/health/live")
        ready = client.get("/health/ready")
        health = client.get("/health").json()
    assert models == {
        "object": "list",
        "data": [{"id": "my/model", "object": "model", "created": models["data"][0]["created"], "owned_by": "local"}],
    }
    assert abs(models["data"][0]["created"] - time.time()) < 60  # when the server started
    assert live.json() == {"status": "ok"}
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "model_not_ready"
    assert health["model_loaded"] is False and health["model"] == "my/model"


def test_preload_model_loads_at_start_up() -> None:
    engine = ScriptedEngine(["x"])
    with client_for(engine, preload_model=1) as client:
        engine.load_started.wait(5)
        for _ in range(100):
            if client.get("/health/ready").status_code == 200:
                break
            engine.load_started.wait(0.05)
        assert client.get("/health/ready").status_code == 200


def test_logs_never_contain_the_hf_token_or_bearer_keys(caplog: pytest.LogCaptureFixture, tmp_path: Any) -> None:
    secret = "hf_SeCrEt_0123456789"
    settings = make_settings(model_repo_id=f"{tmp_path}/{secret}/missing", hf_token=secret, device_map="cpu")
    app = main.create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.DEBUG):
        response = client.post("/v1/chat/completions", json={"messages": HELLO})
        main.log.info("client sent Authorization: Bearer sk-abc123")
    assert response.status_code == 503
    assert "could not be loaded" in caplog.text
    assert secret not in caplog.text
    assert "sk-abc123" not in caplog.text


def test_openapi_documents_every_response_of_every_route() -> None:
    """Typed response models: every route's 200 has a schema (a $ref or an SSE of chunks); no 422, which this
    server never sends (validation errors are 400 with the OpenAI error body)."""
    with client_for(ScriptedEngine(["x"])) as client:
        schema = client.get("/openapi.json").json()
    documented = {}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            content = operation["responses"]["200"]["content"]
            documented[f"{method.upper()} {path}"] = {kind: body.get("schema", {}).get("$ref", "").rpartition("/")[2]
                                                      for kind, body in content.items()}  # fmt: skip
    assert documented == {
        "POST /v1/chat/completions": {"application/json": "ChatCompletion", "text/event-stream": "ChatCompletionChunk"},
        "POST /v1/completions": {"application/json": "TextCompletion", "text/event-stream": "TextCompletion"},
        "GET /v1/sessions/{session_id}/events": {"text/event-stream": "ChatCompletionChunk"},
        "GET /v1/sessions/{session_id}": {"application/json": "SessionInfo"},
        "POST /v1/cancel/{session_id}": {"application/json": "CancelResult"},
        "GET /v1/models": {"application/json": "ModelList"},
        "GET /v1/models/{model}": {"application/json": "ModelCard"},
        "GET /health": {"application/json": "Health"},
        "GET /metrics": {main.CONTENT_TYPE_LATEST: ""},
        "GET /health/live": {"application/json": "Live"},
        "GET /health/ready": {"application/json": "Ready"},
        **{route: {"application/json": "", "text/event-stream": ""} for route in (  # OpenAI's own Response schemas
            "POST /v1/responses", "GET /v1/responses/{response_id}", "POST /v1/responses/{response_id}/cancel",
            "DELETE /v1/responses/{response_id}", "GET /v1/responses/{response_id}/input_items")},
    }  # fmt: skip
    assert schema["paths"]["/v1/models"]["get"]["responses"]["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert {"ChatCompletionRequest", "Usage", "ChunkDelta", "ErrorDetail"} <= set(schema["components"]["schemas"])
