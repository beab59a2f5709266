"""What real clients found (issue 27): every client the project tests with, streaming while keep-alives arrive.

The server sends its keep-alive as one comment line with no blank line after it. openai-python's SSE decoder
dispatches an event at every blank line once it has seen an `id:` (it never resets the last event id), so a
comment followed by its own blank line became an empty event that the SDK parsed as JSON: every stream that
outlived one KEEPALIVE_SECONDS failed mid-way, in the SDK and in everything built on it (LangChain, LiteLLM, the
Agents SDK). Here the scripted engine writes 40 tokens over about a second with a keep-alive every 50 ms, so each
stream below meets some twenty of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import main
from conftest import LiveServer, ScriptedEngine, make_settings

TOKENS = [f" word{i}" for i in range(40)]
ANSWER = "".join(TOKENS)
QUESTION = [{"role": "user", "content": "Say forty words."}]
JS_DIR = Path(__file__).parent / "js"


@pytest.fixture
def server(live_server: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    engine = ScriptedEngine(TOKENS, delay_seconds=0.025)
    settings = make_settings(keepalive_seconds=0.05, persist_sessions=1, sessions_db_path=str(tmp_path / "s.db"))
    return live_server(settings, engine)


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_raw_stream_carries_keepalives_each_without_a_blank_line(server: LiveServer) -> None:
    body = {"messages": QUESTION, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        raw = b"".join(response.iter_bytes())
    assert raw.count(b": keep-alive\n") >= 5
    assert b": keep-alive\n\n" not in raw
    blocks, lines = raw.decode().split("\n\n"), [line for line in raw.decode().split("\n") if line]
    assert blocks[-1] == "" and all(line.startswith((": keep-alive", "id: ", "data: ")) for line in lines)
    datas = [line[6:] for line in lines if line.startswith("data: ")]
    assert len(datas) == len(blocks) - 1  # every blank line ends a real event
    chunks = [json.loads(d) for d in datas[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == ANSWER
    assert datas[-1] == "[DONE]"


def test_openai_python_sync_and_async_streams_end_with_the_json_answer(server: LiveServer) -> None:
    client = client_for(server)
    whole = client.chat.completions.create(model="m", messages=QUESTION)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, stream=True))  # type: ignore[arg-type]
    assert whole.choices[0].message.content == ANSWER
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"

    async def stream_async() -> str:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = await client.chat.completions.create(model="m", messages=QUESTION, stream=True)  # type: ignore[arg-type]
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(stream_async()) == ANSWER


def test_the_responses_stream_and_its_retrieve_from_a_point(server: LiveServer) -> None:
    client = client_for(server)
    events = list(client.responses.create(model="m", input="Say forty words.", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == ANSWER  # type: ignore[union-attr]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER  # type: ignore[union-attr]
    response_id = events[0].response.id  # type: ignore[union-attr]
    after = list(client.responses.retrieve(response_id, stream=True, starting_after=3))
    assert [e.sequence_number for e in after] == list(range(4, len(events)))
    assert client.responses.retrieve(response_id).output_text == ANSWER


def test_a_background_response_followed_while_it_runs(server: LiveServer) -> None:
    client = client_for(server)
    started = client.responses.create(model="m", input="Say forty words.", background=True)
    followed = list(client.responses.retrieve(started.id, stream=True, starting_after=1))
    assert followed[0].sequence_number == 2 and followed[-1].type == "response.completed"
    assert "".join(e.delta for e in followed if e.type == "response.output_text.delta") == ANSWER  # type: ignore[union-attr]


def test_langchain_chat_openai_streams_to_the_end(server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="m", base_url=server.url + "/v1", api_key="unused", max_retries=0)  # type: ignore[arg-type]
    assert "".join(str(chunk.content) for chunk in chat.stream("Say forty words.")) == ANSWER
    assert chat.invoke("Say forty words.").content == ANSWER


def test_litellm_streams_to_the_end(server: LiveServer) -> None:
    litellm = pytest.importorskip("litellm", reason="pip install -r requirements-dev.txt")
    kwargs: dict[str, Any] = {"model": "openai/m", "api_base": server.url + "/v1", "api_key": "unused",
                              "messages": QUESTION}  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **kwargs))
    assert streamed == ANSWER
    assert litellm.completion(**kwargs).choices[0].message.content == ANSWER


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_the_agents_sdk_streams_a_run_to_the_end(server: LiveServer, api: str) -> None:
    from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = OpenAIChatCompletionsModel("m", client) if api == "chat" else OpenAIResponsesModel("m", client)

    async def run() -> tuple[str, str]:
        result = Runner.run_streamed(Agent(name="talker", model=model), "Say forty words.")
        deltas = [
            event.data.delta
            async for event in result.stream_events()
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
        ]
        return "".join(deltas), str(result.final_output)

    assert asyncio.run(run()) == (ANSWER, ANSWER)


def node_modules() -> Path:
    """The npm clients of tests/js (installed by .ci/run: `npm ci --prefix tests/js`)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        pytest.skip("npm clients not installed: npm ci --prefix tests/js")
    return JS_DIR / "node_modules"


def run_node(script: str, server: LiveServer, *args: str) -> dict[str, Any]:
    """Runs a tests/js script against the server; it prints one JSON line."""
    node_modules()
    done = subprocess.run(["node", str(JS_DIR / script), server.url + "/v1", *args], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "NODE_NO_WARNINGS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_openai_node_streams_chat_and_responses_to_the_end(server: LiveServer) -> None:
    assert run_node("stream.mjs", server) == {"chat": ANSWER, "responses": ANSWER, "json": ANSWER}


def test_the_keepalive_bytes_are_one_comment_line() -> None:
    assert main.make_keepalive().encode() == b": keep-alive\n"
