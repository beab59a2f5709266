"""Layer 3: a live uvicorn on 127.0.0.1 and the official `openai` client (raw httpx where the SDK cannot go)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from conftest import LiveServer, ScriptedEngine, make_settings

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def stream_text(client: openai.OpenAI, **kwargs: object) -> tuple[str, list[object]]:
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, stream=True, **kwargs))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---- tiny model ------------------------------------------------------------------------------------------------


def test_openai_client_json_and_stream_agree_on_the_tiny_model(tiny_server: LiveServer) -> None:
    client = client_for(tiny_server)
    completion = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=12)
    text, chunks = stream_text(client, temperature=0, max_tokens=12)
    assert completion.choices[0].message.content == text
    assert len(text.split()) == 12  # the tiny model emits one word per token
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert chunks[0].choices[0].delta.role == "assistant"  # type: ignore[attr-defined]
    assert len(chunks) > 10


def test_include_usage_gives_a_final_usage_chunk_with_no_choices(tiny_server: LiveServer) -> None:
    client = client_for(tiny_server)
    completion = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=5)
    _, chunks = stream_text(client, temperature=0, max_tokens=5, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == []  # type: ignore[attr-defined]
    assert last.usage == completion.usage  # type: ignore[attr-defined]
    assert last.usage.completion_tokens == 5  # type: ignore[attr-defined]


def test_models_list_and_retrieve_serve_the_folder_name_not_its_path(
    tiny_server: LiveServer, tiny_model_dir: Path
) -> None:
    client = client_for(tiny_server)
    assert [m.id for m in client.models.list().data] == [tiny_model_dir.name]  # never the server's file system
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": f"The model 'gpt-4o' does not exist; this server serves {tiny_model_dir.name!r}",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }  # fmt: skip
    answer = client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert answer.model == tiny_model_dir.name  # the request's `model` is informational; the reply names ours


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"n": 99}, "n"), ({"temperature": 5}, "temperature"), ({"messages": []}, "messages")],
)
def test_bad_requests_raise_bad_request_error(tiny_server: LiveServer, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(tiny_server).chat.completions.create(**{"model": "m", "messages": QUESTION, **kwargs})  # type: ignore[call-overload]
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param  # type: ignore[index]


def test_stream_event_ids_are_contiguous_from_zero(tiny_server: LiveServer) -> None:
    body = {"messages": QUESTION, "stream": True, "max_tokens": 6, "temperature": 0}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        sid = response.headers["x-session-id"]
        lines = [line for line in response.iter_lines() if line]
    ids = [line[4:] for line in lines if line.startswith("id: ")]
    assert len(ids) >= 8  # role, at least 5 content deltas, finish, [DONE]
    assert ids == [f"{sid}:{i}" for i in range(len(ids))]
    assert lines[-2:] == [f"id: {sid}:{len(ids) - 1}", "data: [DONE]"]


# ---- scripted engine: timing races -----------------------------------------------------------------------------


def test_health_live_answers_while_the_model_loads(live_server: Callable[..., LiveServer]) -> None:
    engine = ScriptedEngine(["Paris"])
    engine.load_gate.clear()  # the load blocks until the test lets it finish
    server = live_server(make_settings(), engine)
    result: dict[str, object] = {}

    def ask() -> None:
        result["response"] = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION}, timeout=60)

    asker = threading.Thread(target=ask)
    asker.start()
    assert engine.load_started.wait(10)
    live = httpx.get(server.url + "/health/live", timeout=5)
    ready = httpx.get(server.url + "/health/ready", timeout=5)
    engine.load_gate.set()
    asker.join(30)
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert ready.status_code == 503
    response = result["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Paris"


def test_keepalive_comments_while_waiting_for_the_first_token(live_server: Callable[..., LiveServer]) -> None:
    engine = ScriptedEngine(["late"], delay_seconds=1.0)
    server = live_server(make_settings(keepalive_seconds=0.2), engine)
    body = {"messages": QUESTION, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert ": keep-alive" in lines
    assert lines[-1] == "data: [DONE]"


def test_requests_past_the_queue_get_429(live_server: Callable[..., LiveServer]) -> None:
    engine = ScriptedEngine(["tok"] * 40, delay_seconds=0.05)
    server = live_server(make_settings(max_concurrent_generations=1, max_queued_requests=0), engine)
    body = {"messages": QUESTION, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as first:
        next(first.iter_lines())  # the first generation holds the only slot
        with pytest.raises(openai.RateLimitError) as caught:
            client_for(server).chat.completions.create(model="m", messages=QUESTION)  # type: ignore[call-overload]
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"


def test_queued_request_waits_for_the_slot_then_runs(live_server: Callable[..., LiveServer]) -> None:
    engine = ScriptedEngine(["a", "b", "c"], delay_seconds=0.05)
    server = live_server(make_settings(max_concurrent_generations=1, max_queued_requests=4), engine)
    client = client_for(server)
    results: list[str | None] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                client.chat.completions.create(model="m", messages=QUESTION).choices[0].message.content  # type: ignore[call-overload]
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["abc", "abc", "abc"]
    assert server.state.gate.admitted == 0


# ---- SmolLM2 (real text) -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_paris_through_the_openai_client(smollm2_server: LiveServer) -> None:
    client = client_for(smollm2_server)
    completion = client.chat.completions.create(model="m", messages=QUESTION, temperature=0)
    text, chunks = stream_text(client, temperature=0)
    assert completion.choices[0].message.content == "The capital of France is Paris."
    assert text == completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].finish_reason == "stop"  # type: ignore[attr-defined]
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 8  # 7 text tokens + <|im_end|>
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.slow
def test_smollm2_stop_string_is_honoured(smollm2_server: LiveServer) -> None:
    completion = client_for(smollm2_server).chat.completions.create(
        model="m", messages=QUESTION, temperature=0, stop=[" is"]
    )
    assert completion.choices[0].message.content == "The capital of France"
    assert completion.choices[0].finish_reason == "stop"


def test_model_load_failure_through_the_client_is_503(live_server: Callable[..., LiveServer], tmp_path: object) -> None:
    server = live_server(make_settings(model_repo_id=f"{tmp_path}/missing-model", device_map="cpu"))
    with pytest.raises(openai.InternalServerError) as caught:
        client_for(server).chat.completions.create(model="m", messages=QUESTION)  # type: ignore[call-overload]
    assert caught.value.status_code == 503
    assert "could not be loaded" in caught.value.message
