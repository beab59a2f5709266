"""Structured outputs: `response_format` json_object and json_schema, enforced by a per-row grammar in the decode
loop (both the continuous batch and `generate()`), from the pure pieces up to the openai SDK, LangChain and the
OpenAI Agents SDK against a live server on SmolLM2."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_batching import concurrently, greedy, run
from test_resume import content_of, finish_reason_of, read_stream, resume

import main
from conftest import CancelAtCheck, LiveServer, make_settings

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["paris", "rome"]}, "ok": {"type": "boolean"}},
    "required": ["city", "ok"],
    "additionalProperties": False,
}


def spec(schema: dict[str, Any] | str, param: str = "response_format.json_schema.schema") -> main.ConstraintSpec:
    text = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
    return main.ConstraintSpec(text, param)


def json_schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


# ---- pure: the wire -> a constraint ------------------------------------------------------------------------------


def _format(value: Any) -> Any:
    request = main.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "response_format": value}
    )
    return request.response_format


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, main.ConstraintSpec('{"type":"object"}', "response_format")),
        (
            json_schema_format({"type": "object", "properties": {"b": {"type": "integer"}, "a": {"const": "é"}}}),
            main.ConstraintSpec(
                '{"type":"object","properties":{"b":{"type":"integer"},"a":{"const":"é"}},"additionalProperties":false}',
                "response_format.json_schema.schema",
            ),
        ),
    ],
)
def test_to_constraint(response_format: Any, expected: main.ConstraintSpec | None) -> None:
    assert main.to_constraint(_format(response_format), max_bytes=1000) == expected


CLOSED = False


@pytest.mark.parametrize(
    ("schema", "closed"),
    [
        ({"type": "object"}, {"type": "object"}),  # no properties: any object, as json_object
        ({"properties": {"a": {}}}, {"properties": {"a": {}}, "additionalProperties": False}),
        ({"properties": {}, "additionalProperties": True}, {"properties": {}, "additionalProperties": True}),
        ({"properties": {"o": {"properties": {"x": {}}}}},
         {"properties": {"o": {"properties": {"x": {}}, "additionalProperties": CLOSED}},
          "additionalProperties": CLOSED}),
        ({"items": {"properties": {}}, "anyOf": [{"properties": {}}, True]},
         {"items": {"properties": {}, "additionalProperties": CLOSED},
          "anyOf": [{"properties": {}, "additionalProperties": CLOSED}, True]}),
        ({"$defs": {"P": {"properties": {}}}, "$ref": "#/$defs/P"},
         {"$defs": {"P": {"properties": {}, "additionalProperties": False}}, "$ref": "#/$defs/P"}),
        ({"const": {"properties": {}}}, {"const": {"properties": {}}}),  # data, not a schema
    ],
)  # fmt: skip
def test_close_objects(schema: dict[str, Any], closed: dict[str, Any]) -> None:
    assert main.close_objects(schema) == closed


@pytest.mark.parametrize(
    ("response_format", "max_bytes", "message"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            1000,
            "response_format.json_schema.schema is required for a json_schema response format",
        ),
        (
            json_schema_format({"type": "string", "description": "x" * 100}),
            64,
            "response_format.json_schema.schema is larger than 64 bytes (MAX_SCHEMA_BYTES)",
        ),
    ],
)
def test_to_constraint_rejects(response_format: Any, max_bytes: int, message: str) -> None:
    with pytest.raises(main.BadRequest) as caught:
        main.to_constraint(_format(response_format), max_bytes=max_bytes)
    assert (caught.value.message, caught.value.param) == (message, "response_format.json_schema.schema")


def test_generation_params_carry_the_constraint() -> None:
    request = main.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}
    )
    params = main.to_generation_params(request, make_settings())
    assert params.constraint == main.ConstraintSpec('{"type":"object"}', "response_format")


def test_the_request_journalled_says_schema_and_reads_back_the_same() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": json_schema_format(CITY_SCHEMA)}
    request = main.ChatCompletionRequest.model_validate(body)
    assert json.loads(request.model_dump_json())["response_format"]["json_schema"]["schema"] == CITY_SCHEMA
    assert main.ChatCompletionRequest.model_validate_json(request.model_dump_json()) == request


@pytest.mark.parametrize(
    ("allowed", "width"),
    [([0, 5, 33], 40), ([31, 32], 64), ([], 8), ([2], 70)],  # 70: logits wider than the bitmask's 64 ids
)
def test_apply_token_bitmask_leaves_exactly_the_allowed_ids(allowed: list[int], width: int) -> None:
    import torch

    bitmask = torch.zeros((3, 2), dtype=torch.int32)
    for token in allowed:
        word = bitmask[1, token // 32].item()
        bitmask[1, token // 32] = torch.tensor(word | (1 << (token % 32))).to(torch.int32)  # bit 31: negative
    logits = torch.zeros((3, width))
    main.apply_token_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == allowed
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()  # rows not listed are untouched


# ---- the grammar engine on a real tokenizer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_generate_engine(tiny_model_dir: Path) -> main.TransformersEngine:
    engine = main.TransformersEngine(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu", batching="off"))
    engine.load()
    return engine


def compiler_for(engine: main.TransformersEngine, **kwargs: Any) -> main.GrammarCompiler:
    loaded = engine.handle.get()
    options = {"timeout_seconds": 10.0, "cache_size": 8, **kwargs}
    return main.GrammarCompiler(loaded.tokenizer, main.vocab_size(loaded), main.eos_ids(loaded), **options)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "foo"}, "Invalid type: foo"),
        ({"$ref": "#/$defs/missing"}, "Pointer '/$defs/missing' does not exist"),
        ({"not": {"type": "string"}}, 'Unimplemented keys: ["not"]'),
        ({"type": "integer", "minimum": 5, "maximum": 1},
         "Unsatisfiable schema: minimum (5) is greater than maximum (1)"),
        ({"type": "string", "format": "password"}, "Unknown format: password"),
    ],
)  # fmt: skip
def test_a_schema_the_engine_cannot_compile_is_400_with_its_reason(
    tiny_engine: main.TransformersEngine, schema: dict[str, Any], reason: str
) -> None:
    with pytest.raises(main.BadRequest) as caught:
        compiler_for(tiny_engine).compile(spec(schema))
    assert caught.value.message == f"response_format.json_schema.schema: {reason}"
    assert caught.value.param == "response_format.json_schema.schema"


def test_a_repeated_schema_compiles_once_and_the_cache_is_bounded(tiny_engine: main.TransformersEngine) -> None:
    compiler = compiler_for(tiny_engine, cache_size=2)
    first = compiler.compile(spec(CITY_SCHEMA))
    assert compiler.compile(spec(CITY_SCHEMA)) is first
    compiler.compile(spec({"type": "boolean"}))
    compiler.compile(spec(CITY_SCHEMA))  # used again: now the most recent
    compiler.compile(spec({"type": "integer"}))  # evicts the boolean one, the least recent
    assert list(compiler.cache) == [spec(CITY_SCHEMA), spec({"type": "integer"})]
    assert compiler.compile(spec(CITY_SCHEMA)) is first


def test_a_compile_past_the_time_limit_is_400(tiny_engine: main.TransformersEngine, monkeypatch: Any) -> None:
    """A compile that has not ended within the limit (held here: a real one can finish before the waiting thread
    gets the GIL back) is a 400; it goes on unseen and is not cached."""
    release = threading.Event()
    real = main.compile_grammar
    monkeypatch.setattr(main, "compile_grammar", lambda *args: release.wait(30) and real(*args))
    compiler = compiler_for(tiny_engine, timeout_seconds=0.05)
    with pytest.raises(main.BadRequest) as caught:
        compiler.compile(spec({"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,40}$"}}))
    release.set()
    assert caught.value.message == (
        "response_format.json_schema.schema: compiling the schema took longer than 0.05 s "
        "(GRAMMAR_COMPILE_TIMEOUT_SECONDS)"
    )
    assert compiler.cache == {}


def test_a_row_constraint_follows_its_tokens_to_completion(tiny_engine: main.TransformersEngine) -> None:
    import torch

    tokenizer = tiny_engine.handle.get().tokenizer
    constraint = compiler_for(tiny_engine).compile(spec({"enum": ["paris"]})).start()
    row = torch.zeros(main.bitmask_words(main.vocab_size(tiny_engine.handle.get())), dtype=torch.int32)
    for token in tokenizer.encode('"paris"'):
        constraint.fill(row)
        assert (int(row[token // 32]) >> (token % 32)) & 1  # the next token of the only value is allowed
        assert not constraint.complete
        constraint.advance(token)
    assert constraint.complete
    with pytest.raises(main.ConstraintError, match="constrained decoding failed"):
        constraint.advance(tokenizer.encode("x")[0])


# ---- the decode loop: the batch and generate() -------------------------------------------------------------------


def constrained(max_new_tokens: int, schema: dict[str, Any] | str, **kwargs: Any) -> main.GenerationParams:
    return greedy(max_new_tokens, constraint=spec(schema), **kwargs)


@pytest.mark.parametrize("which", ["batched", "generate"])
def test_the_tiny_model_writes_what_the_schema_allows_and_stops(request: pytest.FixtureRequest, which: str) -> None:
    engine = request.getfixturevalue("tiny_engine" if which == "batched" else "tiny_generate_engine")
    text, finished = run(engine, "the capital of france", constrained(60, CITY_SCHEMA))
    assert text == '{"city": "paris", "ok": true}'
    assert finished.finish_reason == "stop" and finished.completion_tokens < 60
    unconstrained, _ = run(engine, "the capital of france", greedy(12))
    assert not unconstrained.startswith("{")  # the model alone writes words, never JSON


def test_max_tokens_before_the_end_of_the_json_is_length(tiny_engine: main.TransformersEngine) -> None:
    text, finished = run(tiny_engine, "the capital of france", constrained(5, CITY_SCHEMA))
    assert finished == main.Finished("length", 5)
    assert text == '{"city":'  # five tokens: `{`, `"`, `city`, `"`, `:`; cut off, as on OpenAI


def test_a_constrained_row_beside_free_rows_leaves_their_text_alone(
    tiny_engine: main.TransformersEngine, tiny_generate_engine: main.TransformersEngine
) -> None:
    questions = ["the capital of france", "a small model", "old streets"]
    solo = [run(tiny_generate_engine, q, greedy(20))[0] for q in questions]
    jobs = [lambda q=q: run(tiny_engine, q, greedy(20)) for q in questions]
    jobs.insert(1, lambda: run(tiny_engine, "the capital of france", constrained(60, CITY_SCHEMA)))
    together = concurrently(*jobs)
    assert [text for text, _ in together] == [solo[0], '{"city": "paris", "ok": true}', solo[1], solo[2]]


class FailingConstraint(main.RowConstraint):
    """A real matcher that reports a dead end at its `n`-th mask, as the engine does when a grammar exhausts its
    resource limits mid-output."""

    def __init__(self, matcher: Any, n: int) -> None:
        super().__init__(matcher)
        self.n, self.fills = n, 0

    def fill(self, bitmask_row: Any) -> None:
        self.fills += 1
        if self.fills == self.n:
            raise main.ConstraintError("constrained decoding failed: the grammar allows no next token")
        super().fill(bitmask_row)


def test_a_failing_constraint_ends_only_its_row_with_the_error(
    tiny_engine: main.TransformersEngine, tiny_generate_engine: main.TransformersEngine, monkeypatch: Any
) -> None:
    grammar = compiler_for(tiny_engine).compile(spec({"type": "string", "maxLength": 200}))
    monkeypatch.setattr(grammar, "start", lambda: FailingConstraint(grammar.matcher.deep_copy(), n=4))
    loaded = tiny_engine.handle.get()
    scheduler = tiny_engine.scheduler_for(loaded)
    assert scheduler is not None
    params = greedy(30, constraint=spec({"type": "string", "maxLength": 200}))
    prompt = tiny_engine.prepare([{"role": "user", "content": "a small model"}], greedy(30))
    prompt.grammar = grammar
    deltas: list[str] = []

    def failing() -> BaseException | None:
        try:
            for event in main.stream_batched(scheduler, prompt, params, threading.Event()):
                if isinstance(event, main.Delta):
                    deltas.append(event.text)
        except main.ConstraintError as exc:
            return exc
        return None

    solo = run(tiny_generate_engine, "old streets", greedy(20))[0]
    error, (free, _) = concurrently(failing, lambda: run(tiny_engine, "old streets", greedy(20)))
    assert str(error) == "constrained decoding failed: the grammar allows no next token"
    assert "".join(deltas).startswith('"') and len(deltas) <= 3  # what came before the failure, then nothing
    assert free == solo
    assert run(tiny_engine, "the capital of france", constrained(60, CITY_SCHEMA))[0] == '{"city": "paris", "ok": true}'


def test_cancel_mid_json_stops_the_constrained_row(tiny_engine: main.TransformersEngine) -> None:
    text, finished = run(
        tiny_engine, "a small model", constrained(200, {"type": "string", "maxLength": 500}), cancel=CancelAtCheck(6)
    )
    assert finished.finish_reason == "cancelled"
    assert text.startswith('"') and 0 < finished.completion_tokens < 10


# ---- live: the openai SDK, LangChain and the Agents SDK ----------------------------------------------------------


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, prompt: str, **kwargs: Any) -> Any:
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(model="m", messages=messages, **kwargs)  # type: ignore[call-overload]


def test_tiny_a_stop_string_still_ends_a_constrained_answer(tiny_server: LiveServer) -> None:
    client = client_for(tiny_server)
    response_format = json_schema_format(CITY_SCHEMA)
    whole = ask(client, "the capital of france", response_format=response_format, max_tokens=60, temperature=0)
    assert whole.choices[0].message.content == '{"city": "paris", "ok": true}'
    cut = ask(client, "the capital of france", response_format=response_format, max_tokens=60, temperature=0,
              stop=['"ok"'])  # fmt: skip
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ('{"city": "paris", ', "stop")


# ---- live on SmolLM2 -----------------------------------------------

NAME = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "city": NAME,
            "location": {
                "type": "object",
                "properties": {"country": NAME, "continent": {"enum": ["Europe", "Asia", "Africa", "America"]}},
                "required": ["country", "continent"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "location"],
        "additionalProperties": False,
    },
    "enum and const": {
        "type": "object",
        "properties": {"kind": {"const": "answer"}, "mood": {"enum": ["happy", "sad"]}, "sure": {"type": "boolean"}},
        "required": ["kind", "mood", "sure"],
        "additionalProperties": False,
    },
    "array bounds": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 3}},
        "required": ["items"],
        "additionalProperties": False,
    },
    "anyOf": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, NAME]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "oneOf": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
    "$defs and $ref": {
        "$defs": {
            "Person": {
                "type": "object",
                "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/Person"}, "minItems": 1, "maxItems": 2}},
        "required": ["people"],
        "additionalProperties": False,
    },
    "pattern and bounded number": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
        },
        "required": ["code", "score"],
        "additionalProperties": False,
    },
}
PROMPTS = ["Tell me about Paris.", "Describe your favourite food.", "What is 2 + 2?"]


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


@pytest.mark.slow
def test_smollm2_parse_with_a_pydantic_model_returns_the_parsed_object(smollm2_server: LiveServer) -> None:
    completion = client_for(smollm2_server).chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "Tell me about Paris."}], response_format=City
    )
    message = completion.choices[0].message
    assert message.parsed == City(name="Paris", country="France")
    assert message.content == '{"name": "Paris", "country": "France"}'
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_smollm2_every_output_validates_against_its_schema(smollm2_server: LiveServer) -> None:
    client = client_for(smollm2_server)
    cases = [(name, prompt, temperature) for name in SCHEMAS for prompt in PROMPTS for temperature in (0, 1)]

    def one(case: tuple[str, str, int]) -> Any:
        name, prompt, temperature = case
        response_format = json_schema_format(SCHEMAS[name])
        return ask(client, prompt, response_format=response_format, temperature=temperature, seed=7, max_tokens=160)

    with ThreadPoolExecutor(8) as pool:  # a full batch at a time, within the server's queue
        completions = list(pool.map(one, cases))
    for (name, prompt, temperature), completion in zip(cases, completions, strict=True):
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (name, prompt, temperature, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


@pytest.mark.slow
def test_smollm2_json_object_is_a_json_object(smollm2_server: LiveServer) -> None:
    completion = ask(client_for(smollm2_server), "Describe a cat as JSON with a name and an age.",
                     response_format={"type": "json_object"}, max_tokens=100)  # fmt: skip
    assert completion.choices[0].message.content == '{"name": "Felix", "age": 12}'
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_smollm2_streamed_and_json_answers_agree(smollm2_server: LiveServer) -> None:
    client = client_for(smollm2_server)
    response_format = json_schema_format(SCHEMAS["nested"])
    completion = ask(client, "Tell me about Paris.", response_format=response_format)
    chunks = list(ask(client, "Tell me about Paris.", response_format=response_format, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == completion.choices[0].message.content
    assert completion.choices[0].message.content == (
        '{"city": "Paris", "location": {"country": "France", "continent": "Europe"}}'
    )
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert len(chunks) > 10  # streamed token by token, not in one piece


@pytest.mark.slow
def test_smollm2_free_requests_beside_constrained_ones_keep_their_solo_text(smollm2_server: LiveServer) -> None:
    client = client_for(smollm2_server)
    free_prompts = ["What is the capital of France?", "What color is the sky?"]
    solo = [ask(client, p).choices[0].message.content for p in free_prompts]
    constrained_format = json_schema_format(SCHEMAS["nested"])
    results = concurrently(
        lambda: ask(client, free_prompts[0]),
        lambda: ask(client, "Tell me about Paris.", response_format=constrained_format),
        lambda: ask(client, free_prompts[1]),
        lambda: ask(client, "Tell me about Paris.", response_format={"type": "json_object"}),
    )
    assert [results[0].choices[0].message.content, results[2].choices[0].message.content] == solo
    assert results[1].choices[0].message.content == (
        '{"city": "Paris", "location": {"country": "France", "continent": "Europe"}}'
    )
    assert isinstance(json.loads(results[3].choices[0].message.content), dict)


@pytest.mark.slow
def test_smollm2_a_resumed_constrained_stream_replays_exactly(smollm2_server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me about Paris."}], "stream": True, "temperature": 0,
            "response_format": json_schema_format(SCHEMAS["$defs and $ref"]), "max_tokens": 160}  # fmt: skip
    with httpx.stream("POST", smollm2_server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        sid = response.headers["x-session-id"]
        whole = read_stream(response, sid)
    assert finish_reason_of(whole) == "stop"
    jsonschema.validate(json.loads(content_of(whole)), SCHEMAS["$defs and $ref"])
    for last_index in (3, len(whole) // 2):
        assert resume(smollm2_server.url, sid, last_index) == whole[last_index + 1 :]


@pytest.mark.slow
def test_smollm2_an_invalid_schema_is_400_and_the_next_request_is_served(smollm2_server: LiveServer) -> None:
    client = client_for(smollm2_server)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "hi", response_format=json_schema_format({"type": "object", "properties": {"a": {"type": "foo"}}}))
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": "response_format.json_schema.schema: Invalid type: foo",
        "type": "invalid_request_error", "param": "response_format.json_schema.schema", "code": "invalid_request",
    }  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "hi", response_format={"type": "xml"})
    assert caught.value.body["message"] == (  # type: ignore[index]
        "response_format: type 'xml' is not supported (supported: 'text', 'json_object', 'json_schema')"
    )
    assert ask(client, "What is the capital of France?").choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_smollm2_langchain_with_structured_output(smollm2_server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", model="m", temperature=0)  # type: ignore[arg-type]
    structured = llm.with_structured_output(City, method="json_schema")
    assert structured.invoke("Tell me about Paris.") == City(name="Paris", country="France")


@pytest.mark.slow
def test_smollm2_agents_sdk_output_type(smollm2_server: LiveServer) -> None:
    from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    model = OpenAIChatCompletionsModel(
        model="m", openai_client=openai.AsyncOpenAI(base_url=smollm2_server.url + "/v1", api_key="unused")
    )
    agent = Agent(name="geo", instructions="Answer in JSON.", output_type=City, model=model)
    assert Runner.run_sync(agent, "Tell me about Paris.").final_output == City(name="Paris", country="France")
