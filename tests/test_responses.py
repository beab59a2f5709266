"""The Responses API on the same sessions: requests as chat requests, engine output as Responses events (validated
against OpenAI's schemas), and the routes through openai-python and the Agents SDK: plain, streamed, background,
retrieve with `starting_after`, cancel, delete, `previous_response_id`, a restart with persistence, API keys."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_spec import assert_valid, load_spec

import main
from conftest import LiveServer, ScriptedEngine, make_settings, weather_tool

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"enum": ["paris", "rome"]}}, "required": ["city"], "additionalProperties": False}}  # fmt: skip


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec()


def request(**fields: Any) -> main.ResponsesRequest:
    return main.ResponsesRequest.model_validate({"input": "hi", **fields})


# ---- pure: requests, events, the fold --------------------------------------------------------------------------


def test_a_responses_request_is_the_chat_request_it_means() -> None:
    wire = request(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "the weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
        tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}}, max_output_tokens=9,
    )  # fmt: skip
    chat = main.to_chat_request(wire, [{"role": "user", "content": "earlier"}])
    assert chat.model_dump(exclude_none=True, by_alias=True) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "earlier"},
            {"role": "user", "content": [{"type": "text", "text": "the weather?"}]},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
            {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]},
        ],
        "max_completion_tokens": 9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }  # fmt: skip


def test_an_output_becomes_the_history_a_continuation_starts_from() -> None:
    output = [
        {"type": "reasoning", "id": "rs", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "id": "m", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "id": "fc", "call_id": "call_7", "name": "f", "arguments": "{}"},
    ]  # fmt: skip
    call = {"id": "call_7", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert main.to_chat_history(output) == [{"role": "assistant", "content": "Let me look.", "tool_calls": [call]}]
    assert main.to_chat_history([]) == []


def render(pieces: list[str], finished: main.Finished, output: main.OutputFormat) -> list[str]:
    response = main.make_response_object("resp_1", 100, "m", request(tools=[WEATHER]))
    events = main.ResponsesRenderer(response, output)
    out = events.start()
    for text in pieces:
        out += events.encode(text)
    return out + events.flush() + events.finish(finished) + events.close(7, finished.completion_tokens)


TEXT_TYPES = ["response.created", "response.in_progress", "response.output_item.added",
              "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
              "response.output_text.done", "response.content_part.done", "response.output_item.done"]  # fmt: skip
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("pieces", "finished", "output", "types", "status"),
    [
        (["Hello", " there"], main.Finished("stop", 2), main.OutputFormat(), [*TEXT_TYPES, "response.completed"],
         "completed"),
        (["Hello", " there"], main.Finished("length", 2), main.OutputFormat(), [*TEXT_TYPES, "response.incomplete"],
         "incomplete"),
        (["Let me see.\n", CALL], main.Finished("stop", 30), main.OutputFormat(tool_calls=True),
         [*TEXT_TYPES[:5], "response.output_text.done", "response.content_part.done", "response.output_item.done",
          "response.output_item.added", "response.function_call_arguments.delta",
          "response.function_call_arguments.done", "response.output_item.done", "response.completed"], "completed"),
        (["I think.\n</think>\n\nHi"], main.Finished("stop", 5), main.OutputFormat(reasoning="open"),
         ["response.created", "response.in_progress", "response.output_item.added", "response.reasoning_text.delta",
          "response.reasoning_text.done", "response.output_item.done", *TEXT_TYPES[2:5], *TEXT_TYPES[6:],
          "response.completed"], "completed"),
    ],
)  # fmt: skip
def test_engine_output_becomes_the_apis_events_in_order_and_valid(
    spec: dict[str, Any],
    pieces: list[str],
    finished: main.Finished,
    output: main.OutputFormat,
    types: list[str],
    status: str,
) -> None:
    events = [json.loads(e) for e in render(pieces, finished, output)]
    assert [e["type"] for e in events] == types
    assert [e["sequence_number"] for e in events] == list(range(len(events)))  # contiguous from 0
    for event in events:
        assert_valid(spec, "ResponseStreamEvent", event)
    final = events[-1]["response"]
    assert final["status"] == status and final["usage"]["output_tokens"] == finished.completion_tokens
    assert_valid(spec, "Response", final)
    folded = main.fold_response({}, [json.dumps(e) for e in events])
    assert folded == final  # the JSON answer is the fold of the stream
    partial = main.fold_response(events[0]["response"], [json.dumps(e) for e in events[:-1]])
    assert partial["output"] == final["output"] and partial["status"] == "in_progress"


SCORED = [{"token": "é", "logprob": -0.25, "bytes": [195, 169], "top_logprobs": [{"token": "é", "logprob": -0.25,
                                                                              "bytes": [195, 169]}]}]  # fmt: skip


@pytest.mark.parametrize("text", ["Hello", ' "quoted"\n', "café 日本 😀", ""])
@pytest.mark.parametrize("logprobs", [[], SCORED, None])  # None: a reasoning_text delta
def test_the_fast_text_delta_is_the_generic_events_bytes(text: str, logprobs: list[dict[str, Any]] | None) -> None:
    events = main.ResponsesRenderer({"id": "resp_1"}, main.OutputFormat())
    events.sequence = 12
    kind = "response.output_text.delta" if logprobs is not None else "response.reasoning_text.delta"
    fields = {"item_id": "msg_1", "output_index": 2, "content_index": 0, "delta": text}
    generic = main.ResponsesRenderer({"id": "resp_1"}, main.OutputFormat())
    generic.sequence = 12
    expected = generic._event(kind, **fields, **({"logprobs": logprobs} if logprobs is not None else {}))
    assert events.text_delta("msg_1", 2, text, logprobs) == expected


def test_the_tool_call_item_carries_the_arguments_written() -> None:
    events = [json.loads(e) for e in render([CALL], main.Finished("stop", 30), main.OutputFormat(tool_calls=True))]
    item = events[-1]["response"]["output"][0]
    assert (item["type"], item["name"], item["arguments"], item["status"]) == (
        "function_call",
        "get_weather",
        '{"city": "paris"}',
        "completed",
    )
    assert item["call_id"].startswith("call_") and item["id"] == "fc_" + item["call_id"].removeprefix("call_")


@pytest.mark.parametrize(
    ("data", "index", "expected"),
    [
        ("[DONE]", 9, None),
        ('{"type":"response.output_text.delta","sequence_number":4}', 4,
         ("response.output_text.delta", '{"type":"response.output_text.delta","sequence_number":4}')),
        (json.dumps(main.make_interrupted_error()), 6, ("error", json.dumps({"type": "error", "code": "interrupted",
         "message": main.make_interrupted_error()["error"]["message"], "param": None, "sequence_number": 6}))),
    ],
)  # fmt: skip
def test_session_events_on_the_responses_wire(data: str, index: int, expected: tuple[str, str] | None) -> None:
    assert main.to_responses_sse(data, index) == expected


# ---- live: openai-python and the Agents SDK on the tiny Qwen3 with the real template ----------------------------


@pytest.fixture(scope="module")
def server(tiny_qwen_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    settings = make_settings(model_repo_id=str(tiny_qwen_dirs["Qwen3-4B-Instruct-2507"]), temperature=0,
                             max_tokens=12, device_map="cpu")  # fmt: skip
    with LiveServer(main.create_app(settings)) as live:
        yield live


def client_for(live: LiveServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=120)


def raw_events(live: LiveServer, response_id: str, **params: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(event, id, data) of GET /v1/responses/{id}?stream=true, as the wire has them."""
    out, event, event_id = [], "", ""
    with httpx.stream("GET", f"{live.url}/v1/responses/{response_id}", params={"stream": "true", **params},
                      timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                out.append((event, event_id, json.loads(line[6:])))
    return out


def wait_for(live: LiveServer, response_id: str, statuses: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = httpx.get(f"{live.url}/v1/responses/{response_id}", timeout=30).json()
        if body["status"] in statuses:
            return body  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"{response_id} never reached {statuses}")


def test_create_plain_and_streamed_agree(spec: dict[str, Any], server: LiveServer) -> None:
    client = client_for(server)
    plain = client.responses.create(model="m", input="the weather in paris", max_output_tokens=6)
    assert plain.status == "incomplete" and plain.incomplete_details is not None  # the tiny model never ends
    assert plain.usage is not None and plain.usage.output_tokens == 6
    events = list(client.responses.create(model="m", input="the weather in paris", max_output_tokens=6, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = events[-1].response  # type: ignore[union-attr]
    assert streamed.output_text == plain.output_text and len(plain.output_text.split()) == 6
    assert_valid(spec, "Response", plain.model_dump(exclude_unset=True))


def test_a_forced_tool_call_completes_with_a_function_call_item(server: LiveServer) -> None:
    response = client_for(server).responses.create(model="m", input="the weather", tools=[WEATHER],  # type: ignore[list-item]
                                                   tool_choice="required", max_output_tokens=120)  # fmt: skip
    assert response.status == "completed"
    assert [(o.type, o.name, o.arguments) for o in response.output] == [  # type: ignore[union-attr]
        ("function_call", "get_weather", '{"city": "paris"}')
    ]


def test_background_then_retrieve_and_resume_after_n(spec: dict[str, Any], server: LiveServer) -> None:
    client = client_for(server)
    started = client.responses.create(model="m", input="hi", background=True, max_output_tokens=10)
    assert started.status == "queued" and started.background
    done = wait_for(server, started.id, {"incomplete"})
    whole = raw_events(server, started.id)
    assert [e for e, _, _ in whole] == [d["type"] for _, _, d in whole]  # the `event:` line is the type
    assert [i for _, i, _ in whole] == [f"{started.id}:{n}" for n in range(len(whole))]
    assert whole[-1][2]["response"] == done
    for n in (0, 3, len(whole) - 2):
        after = list(client.responses.retrieve(started.id, stream=True, starting_after=n))
        assert [e.model_dump(exclude_unset=True) for e in after] == [d for _, _, d in whole[n + 1 :]]
    assert raw_events(server, started.id, starting_after=len(whole) - 1) == []  # past the terminal event: nothing
    headers = {"Last-Event-ID": f"{started.id}:5"}  # what a browser EventSource sends: the same as starting_after=5
    with httpx.stream("GET", f"{server.url}/v1/responses/{started.id}", headers=headers, timeout=60) as response:
        ids = [line[4:] for line in response.iter_lines() if line.startswith("id: ")]
    assert ids == [i for _, i, _ in whole[6:]]
    for _, _, data in whole:
        assert_valid(spec, "ResponseStreamEvent", data)


def test_the_sdk_stream_helper_reattaches_to_a_background_response(server: LiveServer) -> None:
    client = client_for(server)
    started = client.responses.create(model="m", input="the weather", tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                      background=True, max_output_tokens=120)  # fmt: skip
    with client.responses.stream(response_id=started.id, starting_after=2) as stream:
        seen = [event.sequence_number for event in stream]
        final = stream.get_final_response()
    assert seen[0] == 3 and final.status == "completed" and final.output[0].type == "function_call"


def test_cancel_twice_and_delete(server: LiveServer) -> None:
    client = client_for(server)
    started = client.responses.create(model="m", input="hi", background=True, max_output_tokens=2000)
    wait_for(server, started.id, {"in_progress"})
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert client.responses.cancel(started.id).model_dump() == cancelled.model_dump()  # the final object again
    plain = client.responses.create(model="m", input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.cancel(plain.id)
    assert caught.value.body["message"] == "only background responses can be cancelled"  # type: ignore[index]
    deleted = httpx.delete(f"{server.url}/v1/responses/{started.id}", timeout=30)
    assert deleted.json() == {"id": started.id, "object": "response", "deleted": True}  # the spec's example
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(started.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(started.id)


def test_input_items_list_what_the_response_was_asked(spec: dict[str, Any], server: LiveServer) -> None:
    client = client_for(server)
    items = [{"role": "user", "content": "the weather?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "rome"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "rain"}]  # fmt: skip
    response = client.responses.create(model="m", input=items, tools=[WEATHER], max_output_tokens=2)  # type: ignore[arg-type, list-item]
    listed = httpx.get(f"{server.url}/v1/responses/{response.id}/input_items", timeout=30).json()
    assert_valid(spec, "ResponseItemList", listed)
    assert [(i["type"], i.get("role"), i.get("call_id")) for i in listed["data"]] == [
        ("message", "user", None),
        ("function_call", None, "call_1"),
        ("function_call_output", None, "call_1"),
    ]
    assert listed["data"][0]["content"] == [{"type": "input_text", "text": "the weather?"}]
    assert listed["first_id"] == listed["data"][0]["id"] and listed["has_more"] is False


def test_an_unknown_previous_response_is_404(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(server).responses.create(model="m", input="hi", previous_response_id="resp_nope")
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_the_agents_sdk_default_responses_model_runs_a_tool_loop(server: LiveServer) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    seen: list[str] = []
    get_weather = weather_tool(seen)

    model = OpenAIResponsesModel(model="m", openai_client=openai.AsyncOpenAI(base_url=server.url + "/v1",
                                                                             api_key="unused"))  # fmt: skip
    # the tiny model never ends free text by itself (the SDK raises on `response.incomplete`), so the loop ends at
    # the tool's result: call -> the SDK runs the tool -> its output is the final output
    agent = Agent(name="weather", tools=[get_weather], model=model, tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", max_tokens=120))  # fmt: skip
    result = Runner.run_sync(agent, "the weather in paris", max_turns=3)
    assert seen == ["paris"] and result.final_output == "sunny in paris"


# ---- the conversation, restarts and keys (scripted engine: it records the prompts it is given) --------------------


@pytest.fixture
def scripted(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> Callable[..., tuple[LiveServer, ScriptedEngine]]:
    def start(**settings: Any) -> tuple[LiveServer, ScriptedEngine]:
        engine = ScriptedEngine([" It", " is", " sunny", "."])
        defaults = {"persist_sessions": 1, "sessions_db_path": str(tmp_path / "s.db"), **settings}
        return live_server(make_settings(**defaults), engine), engine

    return start


def test_previous_response_id_continues_the_conversation_without_its_instructions(
    scripted: Callable[..., tuple[LiveServer, ScriptedEngine]],
) -> None:
    live, engine = scripted()
    client = client_for(live)
    first = client.responses.create(model="m", input="the weather?", instructions="Be brief.")
    assert first.output_text == " It is sunny."
    second = client.responses.create(model="m", input="and tomorrow?", previous_response_id=first.id)
    assert engine.prompts[-1] == [
        {"role": "user", "content": "the weather?"},
        {"role": "assistant", "content": " It is sunny."},
        {"role": "user", "content": "and tomorrow?"},
    ]
    third = client.responses.create(model="m", input="thanks", previous_response_id=second.id, instructions="Hi.")
    assert engine.prompts[-1][0] == {"role": "system", "content": "Hi."} and len(engine.prompts[-1]) == 6
    assert third.previous_response_id == second.id


def test_a_response_survives_a_restart_and_keys_own_their_responses(
    scripted: Callable[..., tuple[LiveServer, ScriptedEngine]],
) -> None:
    live, _ = scripted(api_key="alice,bob")
    started = client_for(live, "alice").responses.create(model="m", input="the weather?", background=True)
    deadline = time.monotonic() + 30
    while (first := client_for(live, "alice").responses.retrieve(started.id)).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    events = raw_events_with_key(live, first.id, "alice")
    live.__exit__(None, None, None)
    again, engine = scripted(api_key="alice,bob")
    alice = client_for(again, "alice")
    assert alice.responses.retrieve(first.id).model_dump() == first.model_dump()
    assert raw_events_with_key(again, first.id, "alice") == events
    alice.responses.create(model="m", input="and tomorrow?", previous_response_id=first.id)
    assert engine.prompts[-1][1] == {"role": "assistant", "content": " It is sunny."}  # from the journal
    with pytest.raises(openai.NotFoundError):
        client_for(again, "bob").responses.retrieve(first.id)


def raw_events_with_key(live: LiveServer, response_id: str, key: str) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("GET", f"{live.url}/v1/responses/{response_id}", params={"stream": "true"}, headers=headers,
                      timeout=60) as response:  # fmt: skip
        return [line for line in response.iter_lines() if line and line != ": keep-alive"]  # events only


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, (None, None)),
        ({"include": ["message.output_text.logprobs"]}, (True, 0)),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 2}, (True, 2)),
        ({"top_logprobs": 3}, (True, 3)),  # deliberate: asked for, never ignored
        ({"include": ["reasoning.encrypted_content"]}, (None, None)),
    ],
)
def test_logprobs_are_asked_by_include_or_top_logprobs(fields: dict[str, Any], expected: tuple[Any, Any]) -> None:
    chat = main.to_chat_request(request(**fields), [])
    assert (chat.logprobs, chat.top_logprobs) == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"include": ["message.output_text.bogus"]}, "include[0]"), ({"top_logprobs": 21}, "top_logprobs")],
)
def test_what_the_responses_logprobs_cannot_honour_is_a_400(
    scripted: Callable[..., tuple[LiveServer, ScriptedEngine]], fields: dict[str, Any], param: str
) -> None:
    live, _ = scripted()
    answer = httpx.post(live.url + "/v1/responses", json={"input": "hi", **fields}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param
