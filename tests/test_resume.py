"""Streams that never lose a token: resume, several readers, retries, cancel, the disconnect grace window, and
restarts with SQLite. Live uvicorn servers; raw httpx, because the openai SDK never sends Last-Event-ID."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import main
from conftest import (
    DroppingProxy,
    LiveServer,
    ScriptedEngine,
    ServerProcess,
    SseEvent,
    iter_sse,
    make_settings,
    read_stream,
    stop_gracefully,
)

ROOT = Path(__file__).parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def start_stream(url: str, limit: int | None, **body: Any) -> tuple[str, list[SseEvent]]:
    """POSTs a streaming request, reads `limit` events (None: all), then drops the connection."""
    request = {"messages": QUESTION, "stream": True, **body}
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=60) as response:
        assert response.status_code == 200, response.read()
        sid = response.headers["x-session-id"]
        return sid, read_stream(response, sid, limit)


def resume(url: str, sid: str, last_index: int, how: str = "header") -> list[SseEvent]:
    """Events after `last_index`; -1 reads the whole session (GET .../events with no Last-Event-ID)."""
    if last_index < 0:
        with httpx.stream("GET", f"{url}/v1/sessions/{sid}/events", timeout=60) as response:
            assert response.status_code == 200, response.read()
            return read_stream(response, sid)
    kwargs: dict[str, Any] = {"timeout": 60}
    path = "/v1/chat/completions"
    if how == "header":
        kwargs["headers"] = {"Last-Event-ID": f"{sid}:{last_index}"}
    elif how == "query":
        kwargs["params"] = {"last_event_id": f"{sid}:{last_index}"}
    method = "GET" if how == "events" else "POST"
    if how == "events":
        path, kwargs["headers"] = f"/v1/sessions/{sid}/events", {"Last-Event-ID": f"{sid}:{last_index}"}
    with httpx.stream(method, url + path, **kwargs) as response:
        assert response.status_code == 200, response.read()
        return read_stream(response, sid)


def content_of(events: list[SseEvent]) -> str:
    text = ""
    for _, data in events:
        if data != "[DONE]":
            payload = json.loads(data)
            text += "".join(c["delta"].get("content") or "" for c in payload.get("choices", []))
    return text


def finish_reason_of(events: list[SseEvent]) -> str | None:
    reasons = [c["finish_reason"] for _, d in events if d != "[DONE]" for c in json.loads(d).get("choices", [])]
    return next((r for r in reversed(reasons) if r), None)


def assert_contiguous(events: list[SseEvent]) -> None:
    assert [i for i, _ in events] == list(range(len(events)))
    assert events[-1][1] == "[DONE]"


def session_state(url: str, sid: str) -> str:
    response = httpx.get(f"{url}/v1/sessions/{sid}", timeout=10)
    return "absent" if response.status_code == 404 else str(response.json()["state"])


def wait_for_state(url: str, sid: str, states: set[str], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while (state := session_state(url, sid)) not in states and time.monotonic() < deadline:
        time.sleep(0.02)
    return state


# ---- resume with a real model --------------------------------------------------------------------------------


def test_disconnect_after_k_events_then_resume_gives_the_uninterrupted_text(tiny_server: LiveServer) -> None:
    url = tiny_server.url
    _, reference = start_stream(url, None, max_tokens=16, temperature=0)
    assert_contiguous(reference)
    expected = content_of(reference)
    assert len(expected.split()) == 16
    for k in range(1, len(reference)):
        how = ("header", "query", "events")[k % 3]
        sid, head = start_stream(url, k, max_tokens=16, temperature=0)
        tail = resume(url, sid, head[-1][0], how)
        events = head + tail
        assert_contiguous(events)  # no gap, no duplicate
        assert content_of(events) == expected, (k, how)
        assert finish_reason_of(events) == "length"


@pytest.mark.slow
def test_smollm2_resume_at_several_points_gives_the_same_answer(smollm2_server: LiveServer) -> None:
    url = smollm2_server.url
    _, reference = start_stream(url, None, temperature=0)
    assert content_of(reference) == "The capital of France is Paris."
    for k in (1, 2, 4, 7):
        sid, head = start_stream(url, k, temperature=0)
        events = head + resume(url, sid, head[-1][0])
        assert_contiguous(events)
        assert content_of(events) == "The capital of France is Paris."
        assert finish_reason_of(events) == "stop"


# ---- the live tail, several readers, retries (scripted engine: deterministic timing) ----------------------------


@pytest.fixture
def slow_server(live_server: Callable[..., LiveServer]) -> Callable[..., tuple[LiveServer, ScriptedEngine]]:
    def start(tokens: int = 30, delay: float = 0.03, **settings: Any) -> tuple[LiveServer, ScriptedEngine]:
        engine = ScriptedEngine([f"t{i} " for i in range(tokens)], delay_seconds=delay)
        return live_server(make_settings(**settings), engine), engine

    return start


def test_resume_mid_generation_follows_the_live_tail(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=30, delay=0.03)
    sid, head = start_stream(server.url, 3)
    assert session_state(server.url, sid) == "running"  # we really left while it was generating
    events = head + resume(server.url, sid, head[-1][0])
    assert_contiguous(events)
    assert content_of(events) == "".join(f"t{i} " for i in range(30))


def test_resume_past_the_end_waits_for_new_events(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=20, delay=0.05)
    sid, _ = start_stream(server.url, 1)
    tail = resume(server.url, sid, 10)  # not produced yet: waits for 11, 12, ...
    assert tail[0][0] == 11 and tail[-1][1] == "[DONE]"
    assert [i for i, _ in tail] == list(range(11, 11 + len(tail)))


def test_two_readers_see_identical_events(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=20, delay=0.03)
    results: dict[str, list[SseEvent]] = {}
    sid_holder: list[str] = []

    def first() -> None:
        sid, events = start_stream(server.url, None, session_id="two-readers")
        sid_holder.append(sid)
        results["a"] = events

    reader = threading.Thread(target=first)
    reader.start()
    wait_for_state(server.url, "two-readers", {"running"})
    with httpx.stream("GET", server.url + "/v1/sessions/two-readers/events", timeout=60) as response:
        results["b"] = read_stream(response, "two-readers")
    reader.join(30)
    assert sid_holder == ["two-readers"]
    assert results["a"] == results["b"]
    assert_contiguous(results["a"])


def test_a_retry_with_the_same_session_id_does_not_generate_twice(slow_server: Callable[..., Any]) -> None:
    server, engine = slow_server(tokens=5, delay=0.01)
    body = {"messages": QUESTION, "session_id": "retry-1"}
    first = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    second = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    _, streamed = start_stream(server.url, None, session_id="retry-1")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.headers["x-session-id"] == "retry-1"
    assert content_of(streamed) == first.json()["choices"][0]["message"]["content"] == "t0 t1 t2 t3 t4 "
    assert len(engine.prompts) == 1


# ---- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "param"),
    [
        ("POST", "/v1/chat/completions", {"Last-Event-ID": "nosuch:3"}, 404, "session_id"),
        ("POST", "/v1/chat/completions?last_event_id=nosuch:3", {}, 404, "session_id"),
        ("POST", "/v1/chat/completions", {"Last-Event-ID": "not an id"}, 400, "Last-Event-ID"),
        ("POST", "/v1/chat/completions", {"Last-Event-ID": "abc:-4"}, 400, "Last-Event-ID"),
        ("GET", "/v1/sessions/nosuch/events", {}, 404, "session_id"),
        ("GET", "/v1/sessions/nosuch", {}, 404, "session_id"),
        ("POST", "/v1/cancel/nosuch", {}, 404, "session_id"),
        ("GET", "/v1/sessions/abc/events", {"Last-Event-ID": "other:1"}, 400, "Last-Event-ID"),
    ],
)
def test_resume_errors(
    slow_server: Callable[..., Any], method: str, path: str, headers: dict[str, str], status: int, param: str
) -> None:
    server, _ = slow_server()
    response = httpx.request(method, server.url + path, headers=headers, timeout=10)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_invalid_session_id_in_the_body_is_400(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server()
    body = {"messages": QUESTION, "session_id": "has spaces/and slashes"}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "session_id"


def test_events_older_than_the_ring_without_persistence_are_410(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=40, delay=0, session_buffer_events=16)
    sid, events = start_stream(server.url, None)
    assert len(events) == 43
    response = httpx.post(server.url + "/v1/chat/completions", headers={"Last-Event-ID": f"{sid}:2"}, timeout=10)
    assert response.status_code == 410
    assert response.json()["error"] == {
        "message": "events before index 27 are no longer held (asked from 3)",
        "type": "invalid_request_error",
        "param": "Last-Event-ID",
        "code": "events_expired",
    }
    assert [i for i, _ in resume(server.url, sid, 30)] == list(range(31, 43))  # inside the window: fine


def test_events_older_than_the_ring_come_from_sqlite(slow_server: Callable[..., Any], tmp_path: Path) -> None:
    server, _ = slow_server(tokens=40, delay=0, session_buffer_events=16, persist_sessions=1,
                            sessions_db_path=tmp_path / "s.db")  # fmt: skip
    sid, events = start_stream(server.url, None)
    assert resume(server.url, sid, 2) == events[3:]


# ---- cancel ------------------------------------------------------------------------------------------------------


def test_cancel_ends_every_stream_with_stop_and_state_cancelled_and_frees_the_slot(
    slow_server: Callable[..., Any],
) -> None:
    server, engine = slow_server(tokens=200, delay=0.05, max_queued_requests=0)
    body = {"messages": QUESTION, "stream": True, "session_id": "to-cancel"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        stream = iter_sse(response)
        head = [next(stream) for _ in range(3)]
        answer = httpx.post(server.url + "/v1/cancel/to-cancel", timeout=10)
        rest = list(stream)
    assert answer.status_code == 200
    assert answer.json()["id"] == "to-cancel"
    assert (answer.json()["state"], answer.json()["already_ended"]) == ("cancelled", False)
    events = [(int(i.rpartition(":")[2]), d) for i, d in head + rest if i]
    assert_contiguous(events)
    assert finish_reason_of(events) == "stop"  # the spec's value; the state says cancelled
    assert len(events) < 12  # it stopped within a token or two, not at 200
    assert engine.active_threads == 0
    after = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=30)
    assert after.status_code == 200  # the only slot is free again (no queue: it would be 429 otherwise)
    again = httpx.post(server.url + "/v1/cancel/to-cancel", timeout=10).json()
    assert (again["state"], again["already_ended"]) == ("cancelled", True)


def test_cancel_a_finished_session_is_harmless(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=3, delay=0)
    sid, events = start_stream(server.url, None)
    answer = httpx.post(f"{server.url}/v1/cancel/{sid}", timeout=10).json()
    assert (answer["state"], answer["already_ended"]) == ("finished", True)
    assert resume(server.url, sid, -1) == events


def test_cancel_a_queued_session_ends_it_without_running(slow_server: Callable[..., Any]) -> None:
    server, engine = slow_server(tokens=100, delay=0.05, max_concurrent_generations=1)
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={"messages": QUESTION, "stream": True}, timeout=60
    ) as running:
        next(iter_sse(running))
        queued = threading.Thread(target=lambda: start_stream(server.url, None, session_id="queued-1"), daemon=True)
        queued.start()
        assert wait_for_state(server.url, "queued-1", {"queued"}) == "queued"
        answer = httpx.post(server.url + "/v1/cancel/queued-1", timeout=10).json()
        queued.join(10)
        assert answer["state"] == "cancelled"
        events = resume(server.url, "queued-1", -1)
        httpx.post(server.url + "/v1/cancel/" + running.headers["x-session-id"], timeout=10)
    assert finish_reason_of(events) == "stop" and content_of(events) == ""  # the state says cancelled
    assert len(engine.prompts) == 2 and server.state.gate.admitted == 0


def test_cancel_a_json_request_returns_the_partial_text(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=200, delay=0.03)
    result: dict[str, httpx.Response] = {}
    body = {"messages": QUESTION, "session_id": "json-cancel"}
    asker = threading.Thread(
        target=lambda: result.update(r=httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60))
    )
    asker.start()
    wait_for_state(server.url, "json-cancel", {"running"})
    time.sleep(0.2)
    httpx.post(server.url + "/v1/cancel/json-cancel", timeout=10)
    asker.join(30)
    choice = result["r"].json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # the spec has no "cancelled"; the session state says it
    assert choice["message"]["content"].startswith("t0 t1 ")
    assert 0 < len(choice["message"]["content"].split()) < 200


def test_cancel_stops_the_real_model_thread(tiny_model_dir: Path, live_server: Callable[..., LiveServer]) -> None:
    settings = make_settings(model_repo_id=str(tiny_model_dir), temperature=0, device_map="cpu")
    server = live_server(settings)
    body = {"messages": QUESTION, "stream": True, "max_tokens": 1900, "session_id": "real-cancel"}  # context 2,048
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        stream = iter_sse(response)
        head = [next(stream) for _ in range(4)]
        answer = httpx.post(server.url + "/v1/cancel/real-cancel", timeout=30).json()
        rest = list(stream)
    assert answer["state"] == "cancelled"
    events = [(int(i.rpartition(":")[2]), d) for i, d in head + rest if i]
    assert finish_reason_of(events) == "stop"  # the spec's value; the state says cancelled
    assert len(content_of(events).split()) < 1500
    assert [t for t in threading.enumerate() if t.name in ("generate", "engine-pump")] == []


# ---- disconnect grace window -----------------------------------------------------------------------------------


def test_auto_cancel_after_the_grace_window_and_not_before(slow_server: Callable[..., Any]) -> None:
    server, engine = slow_server(tokens=400, delay=0.05, cancel_after_disconnect_seconds=1.0)
    sid, _ = start_stream(server.url, 2)
    left = time.monotonic()
    time.sleep(0.4)
    assert session_state(server.url, sid) == "running"  # generation goes on while nobody listens
    assert wait_for_state(server.url, sid, {"cancelled"}) == "cancelled"
    assert time.monotonic() - left >= 1.0
    events = resume(server.url, sid, -1)
    assert finish_reason_of(events) == "stop" and engine.active_threads == 0  # the state says cancelled
    assert server.state.watch.auto_cancels == 1


def test_a_reconnect_resets_the_grace_window(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=400, delay=0.05, cancel_after_disconnect_seconds=1.0)
    sid, _ = start_stream(server.url, 2)
    time.sleep(0.6)
    with httpx.stream(
        "GET", f"{server.url}/v1/sessions/{sid}/events", headers={"Last-Event-ID": f"{sid}:1"}, timeout=30
    ) as response:
        read_stream(response, sid, limit=1)
    left_again = time.monotonic()
    time.sleep(0.6)  # 1.2 s after the first disconnect: without the reset it would be cancelled by now
    assert session_state(server.url, sid) == "running"
    assert wait_for_state(server.url, sid, {"cancelled"}) == "cancelled"
    assert time.monotonic() - left_again >= 1.0


def test_grace_zero_never_auto_cancels(slow_server: Callable[..., Any]) -> None:
    server, _ = slow_server(tokens=40, delay=0.02, cancel_after_disconnect_seconds=0)
    sid, _ = start_stream(server.url, 2)
    assert wait_for_state(server.url, sid, {"finished", "cancelled"}) == "finished"


# ---- restarts with SQLite (real `python main.py` processes) --------------------------------------------------


@pytest.fixture
def persistent_env(tiny_model_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "MODEL_REPO_ID": str(tiny_model_dir),
        "DEVICE_MAP": "cpu",
        "TEMPERATURE": "0",
        "PERSIST_SESSIONS": "1",
        "SESSIONS_DB_PATH": str(tmp_path / "sessions.db"),
    }


def raw_replay(url: str, sid: str) -> bytes:
    with httpx.stream("GET", f"{url}/v1/sessions/{sid}/events", timeout=60) as response:
        assert response.status_code == 200
        return without_keepalives(b"".join(response.iter_bytes()))


def without_keepalives(raw: bytes) -> bytes:
    """The events' bytes: keep-alive lines come whenever the interval ticks (every 50 ms in tests), not with events."""
    return raw.replace(main.KEEPALIVE_LINE, b"")


def test_a_finished_session_replays_byte_identical_after_a_restart(
    persistent_env: dict[str, str], tmp_path: Path
) -> None:
    first = ServerProcess({**persistent_env, "MAX_TOKENS": "12"}, tmp_path)
    try:
        body = {"messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", first.url + "/v1/chat/completions", json=body, timeout=60) as response:
            sid = response.headers["x-session-id"]
            original = without_keepalives(b"".join(response.iter_bytes()))
    finally:
        first.stop()
    second = ServerProcess(persistent_env, tmp_path)
    try:
        assert raw_replay(second.url, sid) == original
        info = httpx.get(f"{second.url}/v1/sessions/{sid}", timeout=10).json()
        assert info["state"] == "finished"
        resumed = resume(second.url, sid, 5)
        assert resumed[0][0] == 6 and resumed[-1][1] == "[DONE]"
    finally:
        second.stop()


def test_a_session_killed_mid_run_replays_then_says_interrupted(persistent_env: dict[str, str], tmp_path: Path) -> None:
    """RESTART_SESSIONS=interrupt: a restart ends what was running (test_continuation.py: the default continues)."""
    persistent_env = {**persistent_env, "RESTART_SESSIONS": "interrupt"}
    first = ServerProcess({**persistent_env, "MAX_TOKENS": "4000"}, tmp_path)
    body = {"messages": QUESTION, "stream": True, "session_id": "crash-1"}
    with httpx.stream("POST", first.url + "/v1/chat/completions", json=body, timeout=60) as response:
        seen = read_stream(response, "crash-1", limit=12)
        first.kill()
    second = ServerProcess(persistent_env, tmp_path)
    try:
        replay = resume(second.url, "crash-1", 5)
        assert replay[: len(seen) - 6] == seen[6:]  # what we saw is what was journaled
        assert [i for i, _ in replay] == list(range(6, 6 + len(replay)))
        assert json.loads(replay[-2][1]) == {
            "error": {
                "message": "the generation was interrupted: the server stopped before it finished",
                "type": "server_error",
                "param": None,
                "code": "interrupted",
            }
        }
        assert replay[-1][1] == "[DONE]"
        assert httpx.get(second.url + "/v1/sessions/crash-1", timeout=10).json()["state"] == "interrupted"
        again = resume(second.url, "crash-1", 5)
        assert again == replay  # recovery happened once, at start-up; replays are stable
    finally:
        second.stop()


def test_an_unopenable_journal_is_reported_and_serving_goes_on(slow_server: Callable[..., Any], tmp_path: Path) -> None:
    server, _ = slow_server(tokens=2, delay=0, persist_sessions=1, sessions_db_path=tmp_path)  # a folder
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION}, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "t0 t1 "
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["persistence"].startswith("failed: session journal")
    ready = httpx.get(server.url + "/health/ready", timeout=10).json()
    assert ready["persistence"].startswith("failed: session journal")


# ---- the README's resume client, through a proxy that drops the connection -----------------------------------


def readme_resume_client() -> dict[str, Any]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- resume-client -->\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md:resume-client", "exec"), namespace)
    return namespace


def test_the_readme_client_resumes_through_dropped_connections(slow_server: Callable[..., Any]) -> None:
    server, engine = slow_server(tokens=40, delay=0.02)
    proxy = DroppingProxy(server.port, cut_bytes=1500, drops=3)
    try:
        chat_stream = readme_resume_client()["chat_stream"]
        text = "".join(chat_stream(proxy.url, {"messages": QUESTION}))
    finally:
        proxy.close()
    assert proxy.drops_left < 0  # all three cuts happened, and a fourth connection finished the stream
    assert text == "".join(f"t{i} " for i in range(40))
    assert len(engine.prompts) == 1  # resumed, never re-generated


# ---- issue 13: edges found by fault injection ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["header", "events"])
def test_a_resume_at_done_is_204_and_past_it_400(slow_server: Callable[..., Any], how: str) -> None:
    """A client that already has [DONE] (a browser EventSource reconnects by itself) got 200 with an empty body
    and reconnected for ever. 204 stops an EventSource; an index past [DONE] is a client error."""
    server, _ = slow_server(tokens=3, delay=0)
    sid, events = start_stream(server.url, None)
    done = events[-1][0]
    assert events[-1][1] == "[DONE]"

    def ask(index: int) -> httpx.Response:
        headers = {"Last-Event-ID": f"{sid}:{index}"}
        if how == "events":
            return httpx.get(f"{server.url}/v1/sessions/{sid}/events", headers=headers, timeout=10)
        return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=10)

    at_done, past = ask(done), ask(done + 1)
    assert (at_done.status_code, at_done.content, at_done.headers["x-session-id"]) == (204, b"", sid)
    message = f"Last-Event-ID {sid}:{done + 1} is past the end of the session: its last event is {sid}:{done} ([DONE])"
    assert past.status_code == 400
    assert past.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": "Last-Event-ID", "code": "invalid_resume_point"
    }  # fmt: skip
    assert resume(server.url, sid, done - 1) == events[-1:]  # the one before [DONE] still gets [DONE]


def test_no_socket_send_warnings_when_a_reader_drops_during_a_replay_burst(
    slow_server: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that left in the middle of a long replay made asyncio log "socket.send() raised exception." once
    per write: the replay never yielded to the loop, so the lost connection went unnoticed."""
    server, _ = slow_server(tokens=3000, delay=0, session_buffer_events=8192)
    sid, events = start_stream(server.url, None, max_tokens=3000)
    assert len(events) > 3000
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
            sock.close()
        time.sleep(1.0)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert resume(server.url, sid, -1) == events  # and the server is fine


def test_sigterm_sends_open_streams_their_interrupted_tail(tiny_model_dir: Path, tmp_path: Path) -> None:
    """uvicorn cancels connections when its graceful timeout ends and runs the lifespan only then: readers saw a
    torn connection and the log had a CancelledError per stream. Now every open stream receives the interrupted
    error and [DONE] on the wire, and the log has no traceback."""
    env = {"MODEL_REPO_ID": str(tiny_model_dir), "DEVICE_MAP": "cpu", "TEMPERATURE": "0", "MAX_TOKENS": "4000"}
    server = ServerProcess(env, tmp_path)
    body = {"messages": QUESTION, "stream": True, "session_id": "sigterm-1"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        stream = iter_sse(response)
        head = [next(stream) for _ in range(5)]
        started = time.monotonic()
        stop_gracefully(server.proc)
        rest = list(stream)
    took = time.monotonic() - started
    server.proc.wait(30)
    server.log.close()
    events = [(int(i.rpartition(":")[2]), d) for i, d in head + rest if i]
    assert_contiguous(events)
    assert json.loads(events[-2][1])["error"]["code"] == "interrupted" and events[-1][1] == "[DONE]"
    log_text = (tmp_path / f"server-{server.port}.log").read_text()
    assert "Traceback" not in log_text and "CancelledError" not in log_text
    assert took < 8  # not uvicorn's 10 s cap: the tail went out as soon as the runners stopped


def mount_small_disk(path: Path, size_kib: int) -> bool:
    """A real tmpfs to fill up; False where it cannot be mounted (not root, not Linux)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                            capture_output=True, check=False)  # fmt: skip
    return result.returncode == 0


def fill_disk(path: Path) -> Path:
    filler = path / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as handle:  # the open may fail too: full already
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    return filler


def test_after_the_journal_failed_mid_stream_a_restart_never_reuses_indices(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The database on a small tmpfs, filled while a stream runs: events go on being sent unjournaled. After the
    disk is freed and the server restarted, recovery used to append the interrupted tail at indices the client
    already held as content. Now the replay stops at the first lost index and says the rest is lost (no ids)."""
    disk = tmp_path / "disk"
    if not mount_small_disk(disk, 8192):  # room for the database and its WAL (events and steps) until filled
        pytest.skip("needs root on Linux to mount a tmpfs that can be filled")
    try:
        env = {"MODEL_REPO_ID": str(tiny_model_dir), "DEVICE_MAP": "cpu", "TEMPERATURE": "0", "MAX_TOKENS": "1500",
               "PERSIST_SESSIONS": "1", "SESSIONS_DB_PATH": str(disk / "s.db")}  # fmt: skip
        first = ServerProcess(env, tmp_path)
        body = {"messages": QUESTION, "stream": True, "session_id": "full-disk"}
        with httpx.stream("POST", first.url + "/v1/chat/completions", json=body, timeout=60) as response:
            stream = iter_sse(response)
            seen = [next(stream) for _ in range(20)]
            filler = fill_disk(disk)
            seen += list(stream)  # the whole answer still arrives: serving goes on without the journal
        assert httpx.get(first.url + "/health", timeout=5).json()["persistence"].startswith("failed:")
        filler.unlink()  # the disk is free again
        first.stop()  # the shutdown writes the marks
        events = [(int(i.rpartition(":")[2]), d) for i, d in seen if i]
        assert_contiguous(events)
        assert events[-1][1] == "[DONE]"
        second = ServerProcess(env, tmp_path)
        try:
            with httpx.stream("GET", f"{second.url}/v1/sessions/full-disk/events", timeout=30) as replay:
                replayed = list(iter_sse(replay))
            with httpx.stream("POST", second.url + "/v1/chat/completions", timeout=30,
                              headers={"Last-Event-ID": f"full-disk:{events[-1][0]}"}) as late:  # fmt: skip
                late_tail = list(iter_sse(late))
            state = httpx.get(second.url + "/v1/sessions/full-disk", timeout=5).json()["state"]
        finally:
            second.stop()
        with_ids = [(int(i.rpartition(":")[2]), d) for i, d in replayed if i]
        lost_from = len(with_ids)
        assert 0 < lost_from < len(events)
        assert with_ids == events[:lost_from]  # every index replayed carries what the client got for it
        tail = [(i, json.loads(d)["error"]["code"] if d != "[DONE]" else d) for i, d in replayed[lost_from:]]
        assert tail == [(None, "events_lost"), (None, "[DONE]")]
        assert [(i, d if d == "[DONE]" else json.loads(d)["error"]["code"]) for i, d in late_tail] == tail
        assert state == "interrupted"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
