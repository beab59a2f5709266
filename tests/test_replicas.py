"""Issue 19: replicas behind a load balancer share sessions through a real Redis: resume, cancel and claims
across server processes (subprocesses of `python main.py`, the tiny model)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_resume import QUESTION, assert_contiguous, content_of, finish_reason_of, resume, start_stream

from conftest import RedisServer, ServerProcess, SseEvent, iter_sse, read_stream


@pytest.fixture
def replica_env(tiny_model_dir: Path, redis_server: RedisServer) -> dict[str, str]:
    return {"MODEL_REPO_ID": str(tiny_model_dir), "DEVICE_MAP": "cpu", "TEMPERATURE": "0", "MAX_TOKENS": "1500",
            "SESSION_STORE": redis_server.url, "SESSION_LEASE_SECONDS": "2"}  # fmt: skip


def head_of(url: str, sid: str, events: int, **body: Any) -> list[SseEvent]:
    """Starts a stream on one replica and leaves after `events` events (the generation goes on there)."""
    request = {"messages": QUESTION, "stream": True, "session_id": sid, **body}
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        return read_stream(response, sid, limit=events)


def test_a_stream_started_on_one_replica_resumes_exactly_on_another(
    replica_env: dict[str, str], tmp_path: Path
) -> None:
    a, b = ServerProcess(replica_env, tmp_path), ServerProcess(replica_env, tmp_path)
    try:
        head = head_of(a.url, "shared-1", 10)
        events = head + resume(b.url, "shared-1", head[-1][0])
        assert_contiguous(events)
        _, reference = start_stream(a.url, None)
        assert content_of(events) == content_of(reference) and finish_reason_of(events) == "length"
        assert httpx.get(b.url + "/v1/sessions/shared-1", timeout=10).json()["state"] == "finished"
        assert resume(b.url, "shared-1", -1) == events  # the whole session from the start, on B
    finally:
        a.stop()
        b.stop()


def test_a_cancel_sent_to_another_replica_stops_the_generation(replica_env: dict[str, str], tmp_path: Path) -> None:
    a, b = ServerProcess(replica_env, tmp_path), ServerProcess(replica_env, tmp_path)
    try:
        body = {"messages": QUESTION, "stream": True, "session_id": "cancel-1", "max_tokens": 1500}
        with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=60) as response:
            stream = iter_sse(response)
            head = [next(stream) for _ in range(5)]
            started = time.monotonic()
            answer = httpx.post(b.url + "/v1/cancel/cancel-1", timeout=30).json()
            rest = list(stream)
        assert time.monotonic() - started < 10
        assert answer["state"] == "cancelled" and answer["already_ended"] is False
        events = [(int(i.rpartition(":")[2]), d) for i, d in head + rest if i]
        assert_contiguous(events)
        assert finish_reason_of(events) == "stop" and len(content_of(events).split()) < 1500
        assert httpx.get(a.url + "/v1/sessions/cancel-1", timeout=10).json()["state"] == "cancelled"
    finally:
        a.stop()
        b.stop()


def test_a_killed_replicas_session_is_claimed_and_continued_by_another(
    replica_env: dict[str, str], tmp_path: Path
) -> None:
    a, b = ServerProcess(replica_env, tmp_path), ServerProcess(replica_env, tmp_path)
    try:
        body = {"messages": QUESTION, "stream": True, "session_id": "claim-1"}
        with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=60) as response:
            head = read_stream(response, "claim-1", limit=10)
            a.kill()  # mid-generation; its lease runs out in SESSION_LEASE_SECONDS
        events = head + resume(b.url, "claim-1", head[-1][0])
        assert_contiguous(events)
        _, reference = start_stream(b.url, None)
        assert content_of(events) == content_of(reference) and finish_reason_of(events) == "length"
        assert httpx.get(b.url + "/health", timeout=10).json()["sessions_continued"] == 1
    finally:
        b.stop()


def test_redis_going_away_ends_streams_gives_503_and_recovers(
    replica_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    a = ServerProcess(replica_env, tmp_path)
    try:
        body = {"messages": QUESTION, "stream": True, "session_id": "outage-1"}
        with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=60) as response:
            stream = iter_sse(response)
            head = [next(stream) for _ in range(5)]
            redis_server.stop()
            rest = list(stream)  # ends: never hangs
        data = [d for _, d in head + rest]
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "session_store_unavailable"
        refused = httpx.post(a.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "session_store_unavailable"
        assert httpx.get(a.url + "/health/ready", timeout=10).json()["persistence"].startswith("failed:")
        redis_server.start()  # the same port, empty
        deadline = time.monotonic() + 20
        while (answer := httpx.post(a.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2},
                                    timeout=30)).status_code == 503 and time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.2)
        assert answer.status_code == 200
        assert httpx.get(a.url + "/health/ready", timeout=10).json()["persistence"] == "ok"
        # the runner, cancelled by the failure, ended its choice since: nothing of that follows the [DONE] read
        resumed = {"headers": {"Last-Event-ID": head[-1][0] or ""}, "timeout": 10}  # it used to wait forever
        with httpx.stream("POST", a.url + "/v1/chat/completions", **resumed) as response:
            assert list(iter_sse(response)) == rest
        assert httpx.get(a.url + "/v1/sessions/outage-1", timeout=10).json()["state"] == "interrupted"
    finally:
        a.stop()


SCRIPTED_SERVER = Path(__file__).parent / "crashing_server.py"


def test_the_grace_window_counts_readers_on_every_replica(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"SESSION_STORE": redis_server.url, "SESSION_LEASE_SECONDS": "2", "CANCEL_AFTER_DISCONNECT_SECONDS": "1",
           "SCRIPTED_TOKENS": "400", "SCRIPTED_DELAY": "0.05"}  # fmt: skip  # 20 s of tokens
    a, b = ServerProcess(env, tmp_path, SCRIPTED_SERVER), ServerProcess(env, tmp_path, SCRIPTED_SERVER)
    try:
        head = head_of(a.url, "grace-1", 3, max_tokens=400)  # the reader leaves A ...
        request = {"headers": {"Last-Event-ID": f"grace-1:{head[-1][0]}"}, "timeout": 60}
        with httpx.stream("POST", b.url + "/v1/chat/completions", **request) as response:  # ... and reads on B
            started, read = time.monotonic(), 0
            for _ in iter_sse(response):
                read += 1
                if time.monotonic() - started > 4:  # four grace windows with no reader on A
                    break
        assert read > 40
        assert httpx.get(a.url + "/v1/sessions/grace-1", timeout=10).json()["state"] == "running"
        deadline = time.monotonic() + 10  # now nobody reads anywhere: cancelled after the window
        while httpx.get(a.url + "/v1/sessions/grace-1", timeout=10).json()["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(a.url + "/v1/sessions/grace-1", timeout=10).json()["state"] == "cancelled"
    finally:
        a.stop()
        b.stop()
