"""Layer 1: pure builders and parsers, as tables of input -> exact output. No I/O, no model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import main
from conftest import make_settings

META = main.StreamMeta(completion_id="chatcmpl-1", created=1700000000, model="m", include_usage=True)
ROOT = Path(__file__).parent.parent


# ---- SSE bytes and event ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "event_id", "expected"),
    [
        ('{"a":1}', "sid:0", b'id: sid:0\ndata: {"a":1}\n\n'),
        ("[DONE]", "sid:12", b"id: sid:12\ndata: [DONE]\n\n"),
        ("x", None, b"data: x\n\n"),
        ("line1\nline2", "s:3", b"id: s:3\ndata: line1\ndata: line2\n\n"),
        ("", "s:4", b"id: s:4\ndata: \n\n"),
        ('{"t":"é"}', "s:5", 'id: s:5\ndata: {"t":"é"}\n\n'.encode()),
    ],
)
def test_encode_sse(data: str, event_id: str | None, expected: bytes) -> None:
    assert main.encode_sse(data, event_id) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc:0", ("abc", 0)),
        ("abc:42", ("abc", 42)),
        ("a.b_c-D9:7", ("a.b_c-D9", 7)),
        (" abc:5 ", ("abc", 5)),
        ("0123456789abcdef0123456789abcdef:100", ("0123456789abcdef0123456789abcdef", 100)),
        ("abc", None),
        ("abc:", None),
        (":5", None),
        ("abc:-1", None),
        ("abc:1.5", None),
        ("a/b:1", None),
        ("a:b:1", None),
        ("x" * 129 + ":1", None),
        ("abc:1234567890123456789", None),
    ],
)
def test_parse_event_id(text: str, expected: tuple[str, int] | None) -> None:
    assert main.parse_event_id(text) == expected


@pytest.mark.parametrize(("session_id", "index"), [("abc", 0), ("a.b-c_d", 99), ("f" * 32, 123456)])
def test_event_id_round_trip(session_id: str, index: int) -> None:
    assert main.parse_event_id(main.format_event_id(session_id, index)) == (session_id, index)


# ---- OpenAI shapes ---------------------------------------------------------------------------------------------


CHUNK_HEAD = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","choices":'


@pytest.mark.parametrize(
    ("kwargs", "choices"),
    [
        ({"content": "", "role": True},
         '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'),
        ({"content": "Hi"}, '[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]'),
        ({"finish_reason": "stop"}, '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]'),
        ({"finish_reason": "length"}, '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}]'),
        ({"finish_reason": "cancelled"}, '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]'),
    ],
)  # fmt: skip
def test_make_chunk_exact_json(kwargs: dict[str, Any], choices: str) -> None:
    """The exact `data:` payloads; a cancelled generation says "stop" (the spec has no "cancelled")."""
    assert main.make_chunk(META, **kwargs).model_dump_json() == CHUNK_HEAD + choices + "}"


@pytest.mark.parametrize(("prompt", "completion", "total"), [(0, 0, 0), (7, 3, 10), (1000, 1, 1001)])
def test_make_usage(prompt: int, completion: int, total: int) -> None:
    usage = main.make_usage(prompt, completion)
    assert usage.model_dump() == {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    usage_json = f'{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{total}}}'
    assert main.make_usage_chunk(META, usage).model_dump_json() == CHUNK_HEAD + '[],"usage":' + usage_json + "}"


def test_make_completion() -> None:
    usage = main.make_usage(5, 2)
    assert main.make_completion(META, "Hi!", "stop", usage).model_dump() == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def _events(*deltas: str, finish: str = "stop", usage: tuple[int, int] | None = (5, 2)) -> list[str]:
    events = [main.make_chunk(META, "", role=True).model_dump_json()]
    events += [main.make_chunk(META, d).model_dump_json() for d in deltas]
    events.append(main.make_chunk(META, finish_reason=finish).model_dump_json())
    if usage:
        events.append(main.make_usage_chunk(META, main.make_usage(*usage)).model_dump_json())
    return [*events, main.DONE]


@pytest.mark.parametrize(
    ("events", "text", "finish"),
    [
        (_events("Hel", "lo", "!"), "Hello!", "stop"),
        (_events(finish="length"), "", "length"),
        (_events("partial", finish="cancelled", usage=None), "partial", "stop"),
        (["{\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"old\"},\"finish_reason\":\"cancelled\"}]}", main.DONE],
         "old", "stop"),  # a session journaled by an older version replays its own bytes; the fold conforms
    ],
)  # fmt: skip
def test_fold_completion(events: list[str], text: str, finish: str) -> None:
    completion = main.fold_completion(META, events)
    assert completion.choices[0].message.model_dump() == {"role": "assistant", "content": text, "refusal": None}
    assert completion.choices[0].finish_reason == finish


def test_fold_completion_raises_the_error_event() -> None:
    error = json.dumps(main.make_error("boom", "server_error", None, "internal_error"))
    with pytest.raises(main.APIError) as caught:
        main.fold_completion(META, [_events()[0], error, main.DONE])
    assert (caught.value.status, caught.value.message, caught.value.code) == (500, "boom", "internal_error")


def test_make_error_shape() -> None:
    assert main.make_error("bad", "invalid_request_error", "n", "invalid_request") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "invalid_request"}
    }


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (("body", "messages", 1, "content"), "messages[1].content"),
        (("body", "n"), "n"),
        (("body",), None),
        (("body", "messages", 0, "content", "list[tagged-union[TextPart]]", 2, "text", "text"),
         "messages[0].content[2].text"),
        (("query", "x"), "query.x"),
        (("body", "messages", 0, "content", "list[tagged-union[TextPart,ImagePart]]", 0, "image_url", "image_url"),
         "messages[0].content[0].image_url"),
        (("body", "response_format", "json_schema", "json_schema", "name"), "response_format.json_schema.name"),
        (("body", "response_format", "json_schema", "json_schema"), "response_format.json_schema"),
    ],
)  # fmt: skip
def test_to_param_path(location: tuple[int | str, ...], expected: str | None) -> None:
    assert main.to_param_path(location) == expected


# ---- request -> internal records ----------------------------------------------------------------------------


def _request(**fields: Any) -> main.ChatCompletionRequest:
    return main.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, main.GenerationParams(max_new_tokens=256, temperature=0.7)),
        ({"max_tokens": 5}, main.GenerationParams(max_new_tokens=5, temperature=0.7, asked_max_tokens=True)),
        (
            {"max_tokens": 5, "max_completion_tokens": 9},
            main.GenerationParams(max_new_tokens=9, temperature=0.7, asked_max_tokens=True),
        ),
        ({"temperature": 0}, main.GenerationParams(max_new_tokens=256, temperature=0.0)),
        (
            {"temperature": 1, "top_p": 0.5, "seed": 3},
            main.GenerationParams(max_new_tokens=256, temperature=1.0, top_p=0.5, seed=3),
        ),
        ({"stop": "END"}, main.GenerationParams(max_new_tokens=256, temperature=0.7, stop=("END",))),
        ({"stop": ["a", "", "b"]}, main.GenerationParams(max_new_tokens=256, temperature=0.7, stop=("a", "b"))),
    ],
)
def test_to_generation_params(fields: dict[str, Any], expected: main.GenerationParams) -> None:
    assert main.to_generation_params(_request(**fields), make_settings()) == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 9}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ],
)
def test_to_generation_params_rejects(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(main.BadRequest) as caught:
        main.to_generation_params(_request(**fields), make_settings())
    assert caught.value.param == param


def test_to_template_messages() -> None:
    request = main.ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ]
        }
    )
    assert main.to_template_messages(request.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


# ---- stop strings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "matched"),
    [
        ((), ["ab", "cd"], ["ab", "cd", ""], False),
        (("END",), ["hello ", "world"], ["hello ", "world", ""], False),
        (("END",), ["helloEND more"], ["hello", ""], True),
        (("END",), ["hello E", "N", "D tail"], ["hello ", "", "", ""], True),
        (("END",), ["hello E", "x"], ["hello ", "Ex", ""], False),
        (("END",), ["abc E"], ["abc ", "E"], False),
        (("b", "ab"), ["xab"], ["x", ""], True),
        (("\n\n",), ["a\n", "\nb"], ["a", "", ""], True),
    ],
)
def test_stop_matcher(stops: tuple[str, ...], pieces: list[str], emitted: list[str], matched: bool) -> None:
    matcher = main.StopMatcher(stops)
    out = [matcher.feed(piece) for piece in pieces] + [matcher.flush()]
    assert out == emitted
    assert matcher.matched is matched


# ---- config ---------------------------------------------------------------------------------------------------


def test_settings_defaults_match_the_issue() -> None:
    s = main.Settings.from_env({})
    assert (s.port, s.model_repo_id, s.hf_token, s.max_tokens, s.temperature) == (
        3000,
        "unsloth/Qwen3-4B-Instruct-2507",
        "",
        256,
        0.7,
    )
    assert (s.max_video_frames, s.device_map, s.torch_dtype, s.persist_sessions) == (16, "auto", "auto", False)
    assert s.cancel_after_disconnect_seconds == 3600


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PORT": "abc"}, "PORT must be int, got 'abc'"),
        ({"PORT": "70000"}, "PORT must be a port number (0-65535), got 70000"),
        ({"TEMPERATURE": "hot"}, "TEMPERATURE must be float, got 'hot'"),
        ({"PERSIST_SESSIONS": "maybe"}, "PERSIST_SESSIONS must be bool, got 'maybe'"),
        ({"MAX_TOKENS": "0"}, "MAX_TOKENS must be at least 1, got 0"),
        ({"TORCH_DTYPE": "float8"}, "TORCH_DTYPE must be one of auto, float32, float16, bfloat16, got 'float8'"),
        ({"MAX_CONCURRENT_GENERATIONS": "0"}, "MAX_CONCURRENT_GENERATIONS must be at least 1, got 0"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL must be a logging level, got 'chatty'"),
    ],
)
def test_settings_invalid_value_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(main.ConfigError) as caught:
        main.Settings.from_env(environ)
    assert str(caught.value) == message


def test_settings_read_dotenv_under_the_environment(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=4000\nMAX_TOKENS=9\n")
    s = main.Settings.from_env({"PORT": "5000"}, dotenv)
    assert (s.port, s.max_tokens) == (5000, 9)


def test_env_example_lists_every_setting_once_with_its_default() -> None:
    path = ROOT / ".env.example"
    names = re.findall(r"^([A-Z_]+)=", path.read_text(), flags=re.MULTILINE)
    assert sorted(names) == sorted(main.Settings.env_names())
    assert main.Settings.from_env({}, path) == main.Settings()  # every value shown is the default


@pytest.mark.parametrize(
    ("message", "secret_values", "expected"),
    [
        ("token hf_abcdef123 used", ["hf_abcdef123"], "token *** used"),
        ("Authorization: Bearer sk-live-999", [], "Authorization: Bearer ***"),
        ("nothing here", ["hf_abcdef123"], "nothing here"),
    ],
)
def test_redact_secrets(message: str, secret_values: list[str], expected: str) -> None:
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s", (message,), None)
    main.RedactSecrets(secret_values).filter(record)
    assert record.getMessage() == expected


# ---- ring buffer -------------------------------------------------------------------------------------------------


def test_ring_buffer_wraps_and_reports_gone() -> None:
    ring = main.RingBuffer(3)
    assert [ring.append(str(i)) for i in range(5)] == [0, 1, 2, 3, 4]
    assert (ring.first_index, ring.next_index) == (2, 5)
    assert ring.read_from(3) == [main.Event(3, "3"), main.Event(4, "4")]
    assert ring.read_from(5) == []
    assert ring.read_from(9) == []
    with pytest.raises(main.EventsGone):
        ring.read_from(1)


# ---- model ids, validation errors, nullable fields (issue 12) -------------------------------------------------


@pytest.mark.parametrize(
    ("repo_id", "served", "expected"),
    [
        ("unsloth/Qwen3-4B-Instruct-2507", "", "unsloth/Qwen3-4B-Instruct-2507"),
        ("gpt2", "", "gpt2"),
        ("/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("./nothing.gguf", "", "nothing.gguf"),
        ("/home/me/models/qwen3-4b/", "", "qwen3-4b"),
        ("C:\\models\\qwen3-4b\\", "", "qwen3-4b"),
        ("~/models/qwen", "", "qwen"),
        ("/srv/models/x.gguf", "my-model", "my-model"),
    ],
)
def test_served_model_id_is_never_an_absolute_path(repo_id: str, served: str, expected: str) -> None:
    settings = main.Settings.from_env({"MODEL_REPO_ID": repo_id, "SERVED_MODEL_NAME": served})
    assert settings.model_id() == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("unsloth/Qwen3-4B", False), ("gpt2", False), ("./m", True), ("../m", True), ("~/m", True),
     ("/m", True), ("\\\\host\\m", True), ("C:/m", True), ("d:\\m", True), ("m.GGUF", True), ("a/b/c", True),
     ("has space/x", True)],
)  # fmt: skip
def test_looks_like_path(text: str, expected: bool) -> None:
    assert main.looks_like_path(text) is expected


def _validation_error(body: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(main.ValidationError) as caught:
        main.ChatCompletionRequest.model_validate(body)
    error = main.describe_validation_error(list(caught.value.errors()))
    return error.param, error.message


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": [{"role": "user"}]}, "messages[0]", "messages[0]: a user message needs content"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": None}]}, "messages[1]",
         "messages[1]: a system message needs content"),
        ({"messages": [{"role": "developer"}]}, "messages[0]", "messages[0]: a developer message needs content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                    {"type": "input_audio", "input_audio": {"data": ""}}]}]},
         "messages[0].content[1]",
         "messages[0].content[1]: type 'input_audio' is not supported (supported: 'text', 'image_url', 'video_url')"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}, "messages[0].content[0]",
         "messages[0].content[0]: type 'file' is not supported (supported: 'text', 'image_url', 'video_url')"),
        ({"messages": [{"role": "user", "content": "a"}], "stop": [1]}, "stop[0]",
         "stop[0]: Input should be a valid string"),
        ({"messages": [{"role": "user", "content": "a"}], "n": "x"}, "n",
         "n: Input should be a valid integer, unable to parse string as an integer"),
        ({}, "messages", "messages: Field required"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field_at_fault(body: dict[str, Any], param: str, message: str) -> None:
    assert _validation_error(body) == (param, message)


def test_an_assistant_message_may_have_no_content() -> None:
    request = main.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}, {"role": "assistant"}]}
    )
    assert [m.content for m in request.messages] == ["a", None, None]


# Every CreateChatCompletionRequest property the OpenAI spec marks nullable (anyOf null or nullable: true), as
# listed by tests/test_spec.py from the spec itself; null means "the default".
SPEC_NULLABLE_REQUEST_FIELDS = [
    "audio", "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
    "modalities", "moderation", "n", "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_retention",
    "reasoning_effort", "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options",
    "temperature", "top_logprobs", "top_p", "verbosity",
]  # fmt: skip


@pytest.mark.parametrize("name", SPEC_NULLABLE_REQUEST_FIELDS)
def test_every_nullable_request_field_accepts_null_as_the_default(name: str) -> None:
    request = _request(**{name: None})
    assert main.to_generation_params(request, main.Settings()) == main.GenerationParams(
        max_new_tokens=256, temperature=0.7
    )
    assert not request.stream


def test_null_stream_options_fields_mean_the_default() -> None:
    request = _request(stream=True, stream_options={"include_usage": None})
    assert request.stream_options is not None and not request.stream_options.include_usage


@pytest.mark.parametrize(
    "text", ["", " word", 'q"uote\\', "é ü ß", "\u2028\u2029", "\n\t\r", "\x00\x01\x1f\x7f", "😀 🇫🇷", "</script>"]
)
@pytest.mark.parametrize("model", ["m", 'a"b\\c/é', "unsloth/Qwen3-4B-Instruct-2507"])
def test_content_chunks_are_the_typed_chunk_byte_for_byte(text: str, model: str) -> None:
    """The per-token fast path is the model's own bytes, not a second definition of the chunk."""
    meta = main.StreamMeta(completion_id="chatcmpl-9", created=1, model=model, include_usage=False)
    assert main.ContentChunks(meta).encode(text) == main.make_chunk(meta, text).model_dump_json()
