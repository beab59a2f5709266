"""Tool calling and reasoning output: the incremental output parser as tables (every split point of real
outputs), the wire types and templates, and the server end to end with the real Qwen3 chat templates."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from test_resume import read_stream, resume
from test_spec import assert_stream_valid, assert_valid, load_spec

import main
from conftest import TEMPLATES_DIR, LiveServer, make_settings, weather_tool

CALLS = main.OutputFormat(tool_calls=True)
ONE_CALL = main.OutputFormat(tool_calls=True, parallel_tool_calls=False)
THINKING = main.OutputFormat(reasoning="open")
HYBRID = main.OutputFormat(tool_calls=True, reasoning="maybe")


def fold(pieces: list[main.OutputPiece]) -> dict[str, Any]:
    """Pieces -> what a client assembles: content, reasoning, and calls by index (name once, arguments joined)."""
    out: dict[str, Any] = {"content": "", "reasoning": "", "calls": []}
    for piece in pieces:
        if isinstance(piece, main.ContentPiece):
            out["content"] += piece.text
        elif isinstance(piece, main.ReasoningPiece):
            out["reasoning"] += piece.text
        elif isinstance(piece, main.ToolCallStart):
            assert piece.index == len(out["calls"])
            out["calls"].append({"name": piece.name, "arguments": ""})
        else:
            out["calls"][piece.index]["arguments"] += piece.text
    return out


def parse(output: main.OutputFormat, deltas: list[str]) -> tuple[dict[str, Any], list[main.OutputPiece]]:
    ids = (f"call_{i}" for i in itertools.count())
    parser = main.OutputParser(output, call_id=lambda: next(ids))
    pieces = [p for d in deltas for p in parser.feed(d)] + parser.flush()
    return fold(pieces), pieces


def splits(text: str) -> list[list[str]]:
    """The text whole, char by char, and cut in two at every point."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
TWO = ONE + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": {"name": "CET"}}}\n</tool_call>'
CASES = [
    ("plain text", CALLS, "The capital of France is Paris.", "The capital of France is Paris.", "", []),
    ("one call", CALLS, ONE, "", "", [("get_weather", '{"city": "Paris", "unit": "°C"}')]),
    ("text then a call", CALLS, "Let me check.\n" + ONE, "Let me check.", "",
     [("get_weather", '{"city": "Paris", "unit": "°C"}')]),
    ("two calls", CALLS, TWO, "", "",
     [("get_weather", '{"city": "Paris", "unit": "°C"}'), ("get_time", '{"zone": {"name": "CET"}}')]),
    ("one call allowed", ONE_CALL, TWO, "", "", [("get_weather", '{"city": "Paris", "unit": "°C"}')]),
    ("text after a call", CALLS, ONE + "\n\nIt is sunny in Paris.", "It is sunny in Paris.", "",
     [("get_weather", '{"city": "Paris", "unit": "°C"}')]),
    ("not a call", CALLS, "<tool_call>\nnot json\n</tool_call> ok", "<tool_call>\nnot json\n</tool_call> ok", "", []),
    ("a tag-like word", CALLS, "use <tool> or <tool_calls", "use <tool> or <tool_calls", "", []),
    ("tools off", main.OutputFormat(), ONE, ONE, "", []),
    ("unfinished call", CALLS, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', "", "", [("f", '{"a": 1}')]),
    ("cut mid arguments", CALLS, '<tool_call>\n{"name": "f", "arguments": {"a": "x', "", "", [("f", '{"a": "x')]),
    ("escaped name", CALLS, '<tool_call>\n{"name": "a\\"b", "arguments": {}}\n</tool_call>', "", "", [('a"b', "{}")]),
    ("thinking", THINKING, "I should say hi.\n</think>\n\nHello!", "Hello!", "I should say hi.", []),
    ("hybrid, thinking", HYBRID, "<think>\nHmm.\n</think>\n\n" + ONE, "", "Hmm.",
     [("get_weather", '{"city": "Paris", "unit": "°C"}')]),
    ("hybrid, not thinking", HYBRID, "Hello <think> there", "Hello <think> there", "", []),
    ("unfinished thought", THINKING, "still thinking", "", "still thinking", []),
]  # fmt: skip


@pytest.mark.parametrize(("name", "output", "text", "content", "reasoning", "calls"), CASES, ids=[c[0] for c in CASES])
def test_the_parser_gives_the_same_answer_at_every_split_point(
    name: str, output: main.OutputFormat, text: str, content: str, reasoning: str, calls: list[tuple[str, str]]
) -> None:
    for deltas in splits(text):
        folded, pieces = parse(output, deltas)
        assert folded == {"content": content, "reasoning": reasoning,
                          "calls": [{"name": n, "arguments": a} for n, a in calls]}, deltas  # fmt: skip
        if name not in ("not a call", "tools off"):
            assert not any(isinstance(p, main.ContentPiece) and "tool_call>" in p.text for p in pieces)


def test_arguments_stream_as_they_are_written_and_the_name_comes_once() -> None:
    parser = main.OutputParser(CALLS, call_id=lambda: "call_x")
    deltas = ["<tool_call>", '\n{"name": "get_', 'weather", "arguments": ', '{"city": ', '"Paris"}', "}\n</tool_call>"]
    assert [parser.feed(d) for d in deltas] == [
        [], [], [main.ToolCallStart(0, "call_x", "get_weather")], [main.ToolCallArguments(0, '{"city": ')],
        [main.ToolCallArguments(0, '"Paris"')], [main.ToolCallArguments(0, "}")],
    ]  # fmt: skip
    assert parser.flush() == []


def test_non_ascii_text_around_a_call_across_deltas() -> None:
    """The parser takes text; a character split across tokens is joined before it (IncrementalDecoder, tested in
    test_batching). Here: non-ASCII text and a tag cut across deltas."""
    folded, _ = parse(CALLS, ["Caf", "é ", "<tool", "_call>\n", '{"name": "f", "arguments": {"s": "日', '本"}}'])
    assert folded == {"content": "Café", "reasoning": "", "calls": [{"name": "f", "arguments": '{"s": "日本"}'}]}


@pytest.mark.parametrize(
    ("text", "tag", "held"),
    [
        ("abc<tool", "<tool_call>", 5),
        ("abc", "<tool_call>", 0),
        ("x</thi", "</think>", 5),
        ("<tool_call>", "<tool_call>", 0),
    ],
)
def test_partial_suffix(text: str, tag: str, held: int) -> None:
    assert main.partial_suffix(text, tag) == held


def test_call_ids_are_unique() -> None:
    assert len({main.new_call_id() for _ in range(100)}) == 100
    assert json.dumps(main.new_call_id()).startswith('"call_')


# ---- the real templates, their rendering, and what the engine reads from them -----------------------------------

TEMPLATE_SHA256 = {
    "Qwen3-4B-Instruct-2507.jinja": "40c21f34cf67d8c760ef72f8ad3ae5afad514299d4b06e91dd9a8d705af7b541",
    "Qwen3-4B-Thinking-2507.jinja": "3802169b2a02b81e6adb7ab4f64f91ff02db753c8c3a64a01c35192d3a61d8d7",
    "Qwen3-4B.jinja": "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["paris", "rome"]}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["cet", "utc"]}},
                                                    "required": ["zone"], "additionalProperties": False}},
}  # fmt: skip
ASK = [{"role": "user", "content": "the weather in paris"}]
CALLED = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "paris", "unit": "celsius"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny, 21"}]}]  # fmt: skip


@pytest.mark.parametrize("name", sorted(TEMPLATE_SHA256))
def test_the_templates_are_the_real_ones(name: str) -> None:
    assert hashlib.sha256((TEMPLATES_DIR / name).read_bytes()).hexdigest() == TEMPLATE_SHA256[name]


@pytest.fixture(scope="module")
def engines(tiny_qwen_dirs: dict[str, Path]) -> dict[str, main.TransformersEngine]:
    return {name: main.TransformersEngine(make_settings(model_repo_id=str(path), device_map="cpu"))
            for name, path in tiny_qwen_dirs.items()}  # fmt: skip


def prompt_text(engine: main.TransformersEngine, request: dict[str, Any]) -> str:
    wire = main.ChatCompletionRequest.model_validate(request)
    template = main.TemplateInputs(main.to_template_tools(wire), wire.chat_template_kwargs or {})
    params = main.to_generation_params(wire, make_settings())
    prepared = engine.prepare(main.to_template_messages(wire.messages), params, template)
    return str(engine.handle.get().tokenizer.decode(prepared.inputs["input_ids"][0]))


def test_tools_calls_and_results_render_as_the_template_itself_renders_them(
    engines: dict[str, main.TransformersEngine],
) -> None:
    engine = engines["Qwen3-4B-Instruct-2507"]
    ours = prompt_text(engine, {"messages": CALLED, "tools": [WEATHER]})
    flat = [*CALLED[:2], {**CALLED[2], "content": "sunny, 21"}]  # the template renders list content as empty
    theirs = engine.handle.get().tokenizer.apply_chat_template(flat, tools=[WEATHER], add_generation_prompt=True,
                                                                tokenize=False)  # fmt: skip
    assert ours == theirs
    assert (
        '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city"'
        in ours
    )
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris", "unit": '
            '"celsius"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21\n</tool_response>'
            '<|im_end|>\n<|im_start|>assistant\n') in ours  # fmt: skip


@pytest.mark.parametrize(
    ("template", "kwargs", "mode"),
    [
        ("Qwen3-4B-Instruct-2507", {}, "off"),  # its template mentions <think> only for history
        ("Qwen3-4B-Thinking-2507", {}, "open"),
        ("Qwen3-4B", {}, "maybe"),
        ("Qwen3-4B", {"enable_thinking": False}, "off"),
    ],
)
def test_the_reasoning_mode_comes_from_the_template_and_the_prompt(
    engines: dict[str, main.TransformersEngine], template: str, kwargs: dict[str, Any], mode: str
) -> None:
    engine = engines[template]
    wire = main.ChatCompletionRequest.model_validate({"messages": ASK, "chat_template_kwargs": kwargs})
    params = main.to_generation_params(wire, make_settings())
    prepared = engine.prepare(main.to_template_messages(wire.messages), params, main.TemplateInputs(None, kwargs))
    assert prepared.output == main.OutputFormat(tool_calls=False, reasoning=mode)  # type: ignore[arg-type]


def test_a_template_without_tools_is_400(tiny_model_dir: Path) -> None:
    engine = main.TransformersEngine(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"))
    with pytest.raises(main.BadRequest) as caught:
        prompt_text(engine, {"messages": ASK, "tools": [WEATHER]})
    assert (caught.value.message, caught.value.param) == (
        f"the chat template of {tiny_model_dir.name} cannot render tools",
        "tools",
    )


@pytest.mark.parametrize(
    ("request_fields", "message", "param"),
    [
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name: 'get_weather' is given twice",
         "tools[1].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name: no tool is named 'nope'", "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
         "messages[1].tool_call_id: 'call_9' answers no earlier tool call", "messages[1].tool_call_id"),
        ({"chat_template_kwargs": {"enable_thinking": False, "tokenize": False}},
         "chat_template_kwargs.tokenize is set by the server", "chat_template_kwargs.tokenize"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400_naming_the_param(request_fields: dict[str, Any], message: str, param: str) -> None:
    wire = main.ChatCompletionRequest.model_validate({"messages": ASK, **request_fields})
    with pytest.raises(main.BadRequest) as caught:
        main.check_tool_messages(wire.messages)
        main.to_template_tools(wire)
        main.to_template_kwargs(wire)
    assert (caught.value.message, caught.value.param) == (message, param)


@pytest.mark.parametrize(
    ("choice", "parallel", "kind", "names"),
    [("required", None, "tool_calls", ["get_weather", "get_time"]), ("required", False, "tool_call", ["get_weather",
     "get_time"]), ({"type": "function", "function": {"name": "get_time"}}, None, "tool_call", ["get_time"]),
     ("auto", None, None, []), ("none", None, None, [])],
)  # fmt: skip
def test_a_forced_choice_is_a_constraint_on_the_allowed_calls(
    choice: Any, parallel: bool | None, kind: str | None, names: list[str]
) -> None:
    wire = main.ChatCompletionRequest.model_validate(
        {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice, "parallel_tool_calls": parallel}
    )
    constraint = main.to_tool_constraint(wire)
    if kind is None:
        assert constraint is None
        return
    assert constraint is not None and (constraint.kind, constraint.param) == (kind, "tools")
    schema = json.loads(constraint.source)
    branches = schema.get("anyOf", [schema])
    assert [b["properties"]["name"]["const"] for b in branches] == names
    lark = main.tool_call_lark(constraint, json.dumps)
    assert lark.startswith('start: call ("\\n" call)*\n' if kind == "tool_calls" else "start: call\n")
    assert '\ncall: "<tool_call>" "\\n" body "\\n" "</tool_call>"\nbody: %json {' in lark


def prepare_request(engine: main.TransformersEngine, wire: main.ChatCompletionRequest) -> main.PreparedPrompt:
    template = main.TemplateInputs(main.to_template_tools(wire), wire.chat_template_kwargs or {})
    params = main.to_generation_params(wire, make_settings())
    return engine.prepare(main.to_template_messages(wire.messages), params, template)


STRICT_WEATHER = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}


@pytest.mark.parametrize(
    ("parallel", "start"),
    [
        (None, 'start: TEXT? (call ("\\n" call)*)?\nTEXT: /(?s:.+)/\n'),
        (False, "start: TEXT? (call)?\nTEXT: /(?s:.+)/\n"),
    ],
)
def test_strict_with_auto_is_free_text_then_optional_calls(parallel: bool | None, start: str) -> None:
    wire = main.ChatCompletionRequest.model_validate(
        {"messages": ASK, "tools": [STRICT_WEATHER, TIME], "parallel_tool_calls": parallel}
    )
    constraint = main.to_tool_constraint(wire)
    assert constraint is not None and constraint.kind == ("auto_tool_calls" if parallel is None else "auto_tool_call")
    branches = json.loads(constraint.source)["anyOf"]
    assert branches[0]["properties"]["arguments"] == {**WEATHER["function"]["parameters"]}  # type: ignore[index]
    assert branches[1]["properties"]["arguments"] == {"type": "object"}  # not strict: any object
    assert main.tool_call_lark(constraint, json.dumps).startswith(start)


def test_strict_with_auto_enforces_a_call_once_the_model_starts_one(
    engines: dict[str, main.TransformersEngine],
) -> None:
    import torch

    engine = engines["Qwen3-4B-Instruct-2507"]
    loaded = engine.handle.get()
    tokenizer = loaded.tokenizer
    wire = main.ChatCompletionRequest.model_validate({"messages": ASK, "tools": [STRICT_WEATHER]})
    prepared = prepare_request(engine, wire)
    assert prepared.grammar is not None
    row = torch.zeros(main.bitmask_words(main.vocab_size(loaded)), dtype=torch.int32)

    def allowed(constraint: main.RowConstraint, token: int) -> bool:
        constraint.fill(row)
        return bool((int(row[token // 32]) >> (token % 32)) & 1)

    open_tag = tokenizer.convert_tokens_to_ids("<tool_call>")
    constraint = prepared.grammar.start()
    for token in tokenizer.encode("the city is"):  # free text first
        assert allowed(constraint, token)
        constraint.advance(token)
    assert allowed(constraint, tokenizer.eos_token_id) and allowed(constraint, open_tag)
    for token in [open_tag, *tokenizer.encode('\n{"name": "get_weather", "arguments": {"city": "')]:
        constraint.advance(token)
    assert allowed(constraint, tokenizer.encode("paris")[0])
    assert not allowed(constraint, tokenizer.encode("x")[0])  # only "paris" or "rome" may follow


def test_strict_with_auto_is_not_enforced_where_the_model_may_think(
    engines: dict[str, main.TransformersEngine],
) -> None:
    engine = engines["Qwen3-4B-Thinking-2507"]
    wire = main.ChatCompletionRequest.model_validate({"messages": ASK, "tools": [STRICT_WEATHER]})
    prepared = prepare_request(engine, wire)
    assert prepared.grammar is None and prepared.output.reasoning == "open"


# ---- live: the openai SDK, LangChain and the Agents SDK on the tiny Qwen3 with the real template -----------------


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec()


@pytest.fixture(scope="module")
def qwen_server(tiny_qwen_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    settings = make_settings(model_repo_id=str(tiny_qwen_dirs["Qwen3-4B-Instruct-2507"]), temperature=0,
                             max_tokens=80, device_map="cpu")  # fmt: skip
    with LiveServer(main.create_app(settings)) as server:
        yield server


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_valid_call(call: Any, tool: dict[str, Any]) -> None:
    assert call.id.startswith("call_") and len(call.id) == 29 and call.type == "function"
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_required_gives_a_call_whose_arguments_validate(qwen_server: LiveServer) -> None:
    completion = client_for(qwen_server).chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",  # type: ignore[list-item]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0], WEATHER)
    assert choice.message.tool_calls[0].function.arguments == '{"city": "paris", "unit": "celsius"}'


def test_a_named_choice_calls_that_function_once(qwen_server: LiveServer) -> None:
    completion = client_for(qwen_server).chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_time"]
    assert_valid_call(calls[0], TIME)


def test_none_never_calls_and_auto_lets_the_model_answer(qwen_server: LiveServer) -> None:
    client = client_for(qwen_server)
    for choice in ("none", "auto"):
        completion = client.chat.completions.create(
            model="m",
            messages=ASK,
            tools=[WEATHER],
            tool_choice=choice,
            max_tokens=8,  # type: ignore[list-item]
        )
        message = completion.choices[0].message
        assert message.tool_calls is None and message.content and completion.choices[0].finish_reason == "length"


def test_the_stream_helper_assembles_what_the_json_answer_says(spec: dict[str, Any], qwen_server: LiveServer) -> None:
    client = client_for(qwen_server)
    kwargs: dict[str, Any] = {"model": "m", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required"}
    answer = client.chat.completions.create(**kwargs)
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls or []] == [
        (c.function.name, c.function.arguments) for c in answer.choices[0].message.tool_calls or []
    ]
    with httpx.stream("POST", qwen_server.url + "/v1/chat/completions", json={**kwargs, "stream": True}) as response:
        chunks = assert_stream_valid(spec, [line[6:] for line in response.iter_lines() if line.startswith("data: ")])
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
    assert deltas[0]["function"] == {"name": answer.choices[0].message.tool_calls[0].function.name, "arguments": ""}  # type: ignore[index]
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas[1:])
    assert len([d for d in deltas if d["index"] == 0]) > 3  # the arguments come as they are written
    assert_valid(spec, "CreateChatCompletionResponse", answer.model_dump(exclude_unset=True))


def test_parallel_calls_off_gives_one_call(qwen_server: LiveServer) -> None:
    completion = client_for(qwen_server).chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,  # type: ignore[list-item]
    )
    assert len(completion.choices[0].message.tool_calls or []) == 1


def test_a_full_loop_call_result_answer(qwen_server: LiveServer) -> None:
    client = client_for(qwen_server)
    first = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required")  # type: ignore[list-item]
    call = (first.choices[0].message.tool_calls or [])[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21"}]  # fmt: skip
    final = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], max_tokens=6)  # type: ignore[arg-type, list-item]
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content


def test_a_resumed_tool_call_stream_replays_the_same_calls(qwen_server: LiveServer) -> None:
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "stream": True}
    with httpx.stream("POST", qwen_server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        sid = response.headers["x-session-id"]
        whole = read_stream(response, sid)
    assert resume(qwen_server.url, sid, 2) == whole[3:]
    answer = httpx.post(qwen_server.url + "/v1/chat/completions", json={**body, "stream": False}).json()
    streamed = main.fold_completion(main.StreamMeta("x", 0, "m", False), [d for _, d in whole])
    assert streamed.choices[0].message.tool_calls is not None
    assert [c.function.model_dump() for c in streamed.choices[0].message.tool_calls] == [
        c["function"] for c in answer["choices"][0]["message"]["tool_calls"]
    ]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, 400,
         "tool_choice.function.name"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "c", "content": "x"}]}, 400, "messages[1].tool_call_id"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
          "tool_choice": "required"}, 400, "tools"),
    ],
)  # fmt: skip
def test_bad_tool_requests_over_http(qwen_server: LiveServer, body: dict[str, Any], status: int, param: str) -> None:
    response = httpx.post(qwen_server.url + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=60)
    assert (response.status_code, response.json()["error"]["param"]) == (status, param)


def test_langchain_bind_tools_and_the_tool_message(qwen_server: LiveServer) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["paris", "rome"]) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(base_url=qwen_server.url + "/v1", api_key="unused", model="m", temperature=0, max_tokens=120)  # type: ignore[arg-type]
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    asked = bound.invoke([HumanMessage("the weather in paris")])
    assert [c["name"] for c in asked.tool_calls] == ["get_weather"]  # type: ignore[attr-defined]
    assert asked.tool_calls[0]["args"] == {"city": "paris"}  # type: ignore[attr-defined]
    result = ToolMessage(get_weather.invoke(asked.tool_calls[0]["args"]), tool_call_id=asked.tool_calls[0]["id"])  # type: ignore[attr-defined]
    answer = llm.bind_tools([get_weather]).invoke([HumanMessage("the weather in paris"), asked, result])
    assert answer.content and not answer.tool_calls  # type: ignore[attr-defined]


def test_the_agents_sdk_runs_a_function_tool(qwen_server: LiveServer) -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    seen: list[str] = []
    get_weather = weather_tool(seen)

    model = OpenAIChatCompletionsModel(model="m", openai_client=openai.AsyncOpenAI(base_url=qwen_server.url + "/v1",
                                                                                   api_key="unused"))  # fmt: skip
    agent = Agent(name="weather", tools=[get_weather], model=model,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=120))  # fmt: skip
    result = Runner.run_sync(agent, "the weather in paris", max_turns=3)
    assert seen == ["paris"] and isinstance(result.final_output, str) and result.final_output


# ---- reasoning: thinking templates ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking_servers(tiny_qwen_dirs: dict[str, Path]) -> Iterator[dict[str, LiveServer]]:
    servers = {}
    for name in ("Qwen3-4B-Thinking-2507", "Qwen3-4B"):
        settings = make_settings(model_repo_id=str(tiny_qwen_dirs[name]), temperature=0, max_tokens=6, device_map="cpu")
        servers[name] = LiveServer(main.create_app(settings)).__enter__()
    yield servers
    for server in servers.values():
        server.__exit__(None, None, None)


def test_a_thinking_model_streams_reasoning_apart_from_content(
    spec: dict[str, Any], thinking_servers: dict[str, LiveServer]
) -> None:
    server = thinking_servers["Qwen3-4B-Thinking-2507"]
    body = {"messages": ASK, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        chunks = assert_stream_valid(spec, [line[6:] for line in response.iter_lines() if line.startswith("data: ")])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    thought = "".join(d.get("reasoning_content", "") for d in deltas)
    assert thought and thought == "".join(d.get("reasoning", "") for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == ""  # the tiny model never closes </think>
    message = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK}, timeout=60).json()["choices"][0]
    assert message["message"]["reasoning_content"] == message["message"]["reasoning"] == thought


def test_enable_thinking_false_gives_plain_content(thinking_servers: dict[str, LiveServer]) -> None:
    server = thinking_servers["Qwen3-4B"]
    body = {"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}}
    message = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
    assert message["content"] and "reasoning_content" not in message
