"""Issue 17's pure pieces: request checks, prompt lists, logprob alignment, n-choice folds (tables)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import transformers

import main
from conftest import LiveServer, make_settings


def score(text: str, logprob: float = -0.5) -> main.TokenScore:
    return main.TokenScore(text, logprob, text.encode())


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
    ],
)
def test_completion_params_refuse_what_they_cannot_honour(fields: dict[str, Any], param: str) -> None:
    request = main.CompletionRequest.model_validate({"prompt": "hi", **fields})
    with pytest.raises(main.BadRequest) as caught:
        main.to_completion_params(request, main.Settings())
    assert caught.value.param == param


def test_completion_params_echo_with_logprobs_scores_the_prompt() -> None:
    request = main.CompletionRequest.model_validate({"prompt": "hi", "echo": True, "logprobs": 2, "max_tokens": 0})
    params = main.to_completion_params(request, main.Settings())
    assert (params.max_new_tokens, params.logprobs, params.prompt_logprobs) == (0, 2, True)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_to_prompt_list(prompt: Any, expected: list[Any]) -> None:
    assert main.to_prompt_list(main.CompletionRequest.model_validate({"prompt": prompt}).prompt) == expected


@pytest.mark.parametrize("prompt", [[], [""], [[]]])
def test_empty_prompts_are_400(prompt: Any) -> None:
    with pytest.raises(main.BadRequest):
        main.to_prompt_list(main.CompletionRequest.model_validate({"prompt": prompt}).prompt)


def test_sampling_params_read_every_field() -> None:
    request = main.ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "n": 3, "logprobs": True, "top_logprobs": 5,
        "presence_penalty": 0.5, "frequency_penalty": 1.5, "logit_bias": {"7": -100}, "repetition_penalty": 1.2,
        "top_k": -1, "min_p": 0.1, "min_tokens": 4, "ignore_eos": True,
    })  # fmt: skip
    params = main.to_generation_params(request, main.Settings())
    assert (params.n, params.logprobs, params.presence_penalty, params.frequency_penalty) == (3, 5, 0.5, 1.5)
    assert (params.logit_bias, params.repetition_penalty, params.top_k) == (((7, -100.0),), 1.2, 0)
    assert (params.min_p, params.min_tokens, params.ignore_eos, params.adjusts_logits) == (0.1, 4, True, True)
    plain = main.to_generation_params(main.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}]}), main.Settings())  # fmt: skip
    assert not plain.adjusts_logits and plain.logprobs is None


def test_the_aligner_sends_a_token_with_the_chunk_of_its_first_byte_and_drops_what_a_stop_cut() -> None:
    aligner = main.LogprobAligner()
    aligner.push([score("Hel"), score("lo"), score(" wor"), score("ld")])
    assert [s.token for s in aligner.take("He")] == ["Hel"]
    assert [s.token for s in aligner.take("llo wo")] == ["lo", " wor"]
    assert aligner.rest(cut=True) == []
    aligner.push([score("x")])
    assert [s.token for s in aligner.rest(cut=False)] == ["x"]


def test_n_choices_fold_choice_by_choice_with_their_logprobs() -> None:
    meta = main.StreamMeta("chatcmpl-1", 0, "m", True)
    events = []
    for index in (0, 1):
        events.append(main.ChatRenderer(meta, main.OutputFormat(), index).start()[0])
    first, second = main.ChatRenderer(meta, main.OutputFormat(), 0), main.ChatRenderer(meta, main.OutputFormat(), 1)
    events += first.encode("Hi", [score("Hi")]) + second.encode("Yo") + second.finish(main.Finished("length", 1, 1))
    events += first.finish(main.Finished("stop", 1)) + first.close(3, 2) + [main.DONE]
    completion = main.fold_completion(meta, events)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "Hi", "stop"), (1, "Yo", "length")]  # fmt: skip
    assert completion.choices[0].logprobs is not None
    assert [(t.token, t.logprob, t.bytes) for t in completion.choices[0].logprobs.content or []] == [
        ("Hi", -0.5, [72, 105])]  # fmt: skip
    assert completion.usage == main.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)


def test_legacy_chunks_fold_with_offsets_from_the_echoed_prompt() -> None:
    meta = main.StreamMeta("cmpl-1", 0, "m", True, "completions", echo_json='["Hi"]')
    chunks = main.CompletionsRenderer(meta, 0)
    prompt = (main.TokenScore("Hi", None, b"Hi"),)
    events = chunks.start() + chunks.echo(prompt) + chunks.encode(" there", [score(" there")])
    events += chunks.finish(main.Finished("length", 1)) + chunks.close(1, 1) + [main.DONE]
    completion = main.fold_text_completion(meta, events)
    choice = completion.choices[0]
    assert (choice.text, choice.finish_reason) == ("Hi there", "length")
    assert choice.logprobs == main.LegacyLogprobs(tokens=["Hi", " there"], token_logprobs=[None, -0.5],
                                                  top_logprobs=[None, {}], text_offset=[0, 2])  # fmt: skip


# ---- SmolLM2 through a live server and the openai client (both decode paths) ----------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is Paris."
TOLERANCE = 2e-4  # float32: a batched step and a one-row forward pass differ in the last bits


@pytest.fixture(scope="module", params=["auto", "off"])
def server(request: pytest.FixtureRequest, smollm2_dir: Path) -> Iterator[LiveServer]:
    """A live server per decode path: BATCHING=auto (the continuous batch) and off (`generate`, choices in turn)."""
    settings = make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", temperature=0, max_tokens=32,
                             batching=request.param)  # fmt: skip
    with LiveServer(main.create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> tuple[Any, Any]:
    """The model and tokenizer loaded by plain transformers: the forward pass the server's numbers must match."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, tokenizer


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def log_softmax(model: Any, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def vocabulary_ids(tokenizer: Any, keep: Callable[[str], bool]) -> list[int]:
    return [i for i in range(len(tokenizer)) if keep(tokenizer.decode([i]))]


@pytest.mark.slow
def test_smollm2_chat_logprobs_are_the_forward_pass_of_the_greedy_tokens(
    server: LiveServer, reference: tuple[Any, Any]
) -> None:
    model, tokenizer = reference
    completion = client_for(server).chat.completions.create(
        model="m",
        messages=QUESTION,
        logprobs=True,
        top_logprobs=5,  # type: ignore[arg-type]
    )
    choice = completion.choices[0]
    assert choice.message.content == PARIS
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == PARIS
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert completion.usage is not None and completion.usage.prompt_tokens == len(ids)
    for entry in entries:
        assert len(entry.top_logprobs) == 5
        tops = [t.logprob for t in entry.top_logprobs]
        assert entry.logprob == tops[0] == max(tops) and tops == sorted(tops, reverse=True) and tops[0] <= 0
        expected = log_softmax(model, ids)[-1]
        values, chosen = expected.topk(5)
        assert tokenizer.decode([int(chosen[0])]) == entry.token
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(i)]) for i in chosen]
        assert tops == pytest.approx(values.tolist(), abs=TOLERANCE)
        ids.append(int(chosen[0]))


@pytest.mark.slow
def test_smollm2_streamed_logprobs_are_the_json_ones(server: LiveServer) -> None:
    client = client_for(server)
    completion = client.chat.completions.create(model="m", messages=QUESTION, logprobs=True, top_logprobs=2)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, logprobs=True, top_logprobs=2,  # type: ignore[arg-type]
                                                 stream=True))  # fmt: skip
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content or []]
    assert completion.choices[0].logprobs is not None
    assert [(e.token, e.bytes) for e in streamed] == [
        (e.token, e.bytes) for e in completion.choices[0].logprobs.content or []
    ]
    # The streamed request reuses the first one's cached prompt prefix, so its prefill covers fewer positions and
    # its float32 sums run in another order: equal to TOLERANCE, not to the last bit (CI saw 1.7e-6).
    assert [e.logprob for e in streamed] == pytest.approx(
        [e.logprob for e in completion.choices[0].logprobs.content or []], abs=TOLERANCE
    )


@pytest.mark.slow
def test_smollm2_logit_bias_bans_paris_and_forces_a_token(server: LiveServer, reference: tuple[Any, Any]) -> None:
    _, tokenizer = reference
    client = client_for(server)
    banned = vocabulary_ids(tokenizer, lambda text: text.startswith(" Paris"))
    assert banned
    completion = client.chat.completions.create(model="m", messages=QUESTION, logit_bias={str(i): -100 for i in banned})
    assert "Paris" not in (completion.choices[0].message.content or "")
    forced = tokenizer.encode(" banana")
    assert len(forced) == 1
    completion = client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=4, logit_bias={str(forced[0]): 100}
    )
    assert completion.choices[0].message.content == " banana" * 4
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_smollm2_frequency_penalty_ends_a_repetition(server: LiveServer) -> None:
    client = client_for(server)
    ask = [{"role": "user", "content": "Say the word hello twenty times."}]
    plain = client.chat.completions.create(model="m", messages=ask, frequency_penalty=0)  # type: ignore[arg-type]
    penalized = client.chat.completions.create(model="m", messages=ask, frequency_penalty=2)  # type: ignore[arg-type]
    assert (plain.choices[0].message.content or "").lower().count("hello") >= 10
    assert plain.choices[0].finish_reason == "length"
    assert (penalized.choices[0].message.content or "").lower().count("hello") <= 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=ask, frequency_penalty=2.5)  # type: ignore[arg-type]
    assert caught.value.status_code == 400 and caught.value.param == "frequency_penalty"


@pytest.mark.slow
def test_smollm2_n_choices_are_identical_greedy_and_reproducible_with_a_seed(server: LiveServer) -> None:
    client = client_for(server)
    greedy = client.chat.completions.create(model="m", messages=QUESTION, n=3)  # type: ignore[arg-type]
    assert [(c.index, c.message.content, c.finish_reason) for c in greedy.choices] == [
        (i, PARIS, "stop") for i in range(3)]  # fmt: skip
    assert greedy.usage is not None and greedy.usage.completion_tokens == 3 * 8  # every choice counts
    sampled = dict(model="m", messages=QUESTION, n=3, temperature=1, seed=7, max_tokens=12)
    first = client.chat.completions.create(**sampled)  # type: ignore[call-overload]
    again = client.chat.completions.create(**sampled)  # type: ignore[call-overload]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1
    chunks = list(client.chat.completions.create(**sampled, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
    streamed = ["", "", ""]
    for chunk in chunks:
        for delta in chunk.choices:
            streamed[delta.index] += delta.delta.content or ""
    assert streamed == texts
    assert chunks[-1].usage == first.usage


@pytest.mark.slow
def test_smollm2_completions_echo_logprobs_are_the_forward_pass(server: LiveServer, reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    prompt = "The capital of France is"
    completion = client_for(server).completions.create(model="m", prompt=prompt, echo=True, logprobs=1, max_tokens=4)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.finish_reason == "length"
    tokens, logprobs = choice.logprobs.tokens or [], choice.logprobs.token_logprobs or []
    ids = tokenizer.encode(prompt)
    assert completion.usage is not None and (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        len(ids),
        4,
    )
    assert choice.text == "".join(tokens) and choice.text.startswith(prompt) and len(tokens) == len(ids) + 4
    assert choice.logprobs.text_offset == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert logprobs[0] is None and (choice.logprobs.top_logprobs or [])[0] is None
    for _ in range(4):  # the greedy continuation, extended one token at a time
        ids.append(int(log_softmax(model, ids)[-1].argmax()))
    expected = log_softmax(model, ids)
    assert tokens == [tokenizer.decode([i]) for i in ids]
    assert logprobs[1:] == pytest.approx([float(expected[i - 1, ids[i]]) for i in range(1, len(ids))], abs=TOLERANCE)


@pytest.mark.slow
def test_smollm2_completions_stream_and_resume(server: LiveServer) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 6, "stream": True, "logprobs": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        sid = response.headers["x-session-id"]
        events = [(i, d) for i, d in sse(response)]
    assert events[-1][1] == "[DONE]" and [i for i, _ in events] == [f"{sid}:{k}" for k in range(len(events))]
    pieces = [json.loads(d)["choices"] for _, d in events[:-1]]
    text = "".join(c["text"] for cs in pieces for c in cs)
    json_answer = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    assert text == json_answer["choices"][0]["text"] and len(text) > 0
    with httpx.stream(
        "POST", server.url + "/v1/completions", headers={"Last-Event-ID": f"{sid}:2"}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert [(i, d) for i, d in sse(response)] == events[3:]


def sse(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    event_id: str | None = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]


@pytest.mark.slow
@pytest.mark.parametrize(("text", "splits"), [("日本語 and 😀 ok", True), ("café crème", False), (" Paris.", False)])
def test_smollm2_token_bytes_join_to_the_text_even_mid_character(
    reference: tuple[Any, Any], text: str, splits: bool
) -> None:
    _, tokenizer = reference
    texts = main.TokenTexts(tokenizer)
    pieces = [texts.lookup(i) for i in tokenizer.encode(text)]
    assert b"".join(raw for _, raw in pieces) == text.encode()
    assert any(not is_utf8(raw) for _, raw in pieces) == splits  # half a character keeps its raw bytes
    assert texts.lookup(tokenizer.eos_token_id) == ("<|im_end|>", b"")  # a special token adds no bytes


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.slow
def test_lm_eval_local_completions_scores_a_continuation_that_ends_the_answer(
    server: LiveServer, reference: tuple[Any, Any], smollm2_dir: Path
) -> None:
    """Issue 27: lm-evaluation-harness' `local-completions` sends echo + max_tokens 1 + logprobs 1 and drops the
    last entry as the generated token's. Here the greedy next token is end-of-text: without its entry, the harness
    dropped the continuation's last token instead and scored the wrong thing."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tokenizer = reference
    context = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(context + PARIS)
    assert int(log_softmax(model, ids)[-1].argmax()) == tokenizer.eos_token_id  # the answer ends here
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="m", tokenizer_backend="huggingface",
                             tokenizer=str(smollm2_dir), num_concurrent=1, max_retries=1)  # fmt: skip
    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, PARIS), idx=0)
    [(logprob, greedy)] = lm.loglikelihood([request])
    start = len(tokenizer.encode(context))
    expected = log_softmax(model, ids)
    assert logprob == pytest.approx(sum(float(expected[i - 1, ids[i]]) for i in range(start, len(ids))), abs=1e-3)
    assert greedy is True
    body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1}
    choice = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and len(choice["logprobs"]["tokens"]) == len(ids) + 1
    assert choice["logprobs"]["tokens"][-1] == "<|im_end|>" and choice["text"].endswith(PARIS)


def entries(logprobs: list[Any]) -> list[tuple[str, float, list[str]]]:
    """(token, logprob, alternatives) of each entry, from the SDK's objects or plain JSON."""
    plain = [e if isinstance(e, dict) else e.model_dump() for e in logprobs]
    return [(e["token"], round(e["logprob"], 5), [t["token"] for t in e["top_logprobs"]]) for e in plain]


@pytest.fixture(scope="module")
def chat_logprobs(server: LiveServer) -> list[tuple[str, float, list[str]]]:
    chat = client_for(server).chat.completions.create(model="m", messages=QUESTION, logprobs=True, top_logprobs=2)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == PARIS and chat.choices[0].logprobs is not None
    return entries(chat.choices[0].logprobs.content or [])


@pytest.mark.slow
def test_responses_logprobs_are_the_chat_ones_in_the_object_and_the_stream(
    server: LiveServer, chat_logprobs: list[tuple[str, float, list[str]]]
) -> None:
    """Issue 27: `top_logprobs` + `include: ["message.output_text.logprobs"]` were answered with empty lists."""
    client = client_for(server)
    asked: dict[str, Any] = {"model": "m", "input": QUESTION[0]["content"], "top_logprobs": 2,
                             "include": ["message.output_text.logprobs"]}  # fmt: skip
    response = client.responses.create(**asked)
    assert response.output_text == PARIS and len(chat_logprobs) == 7
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert entries(part.logprobs or []) == chat_logprobs  # type: ignore[union-attr]
    assert b"".join(bytes(e.bytes) for e in part.logprobs or []).decode() == PARIS  # type: ignore[union-attr]
    events = [e.model_dump() for e in client.responses.create(**asked, stream=True)]
    streamed = [entry for e in events if e["type"] == "response.output_text.delta" for entry in e["logprobs"]]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert entries(streamed) == entries(done["logprobs"]) == chat_logprobs
    plain = client.responses.create(model="m", input=QUESTION[0]["content"])
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]  # not asked: none


@pytest.mark.slow
def test_pydantic_ai_responses_model_reads_the_logprobs(
    server: LiveServer, chat_logprobs: list[tuple[str, float, list[str]]]
) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import TextPart
    from pydantic_ai.models.openai import OpenAIResponsesModel, OpenAIResponsesModelSettings
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIResponsesModel("m", provider=OpenAIProvider(base_url=server.url + "/v1", api_key="unused"))
    settings = OpenAIResponsesModelSettings(openai_logprobs=True, openai_top_logprobs=2)
    result = Agent(model, model_settings=settings).run_sync(QUESTION[0]["content"])
    [part] = [p for p in result.all_messages()[-1].parts if isinstance(p, TextPart)]
    assert part.content == PARIS and part.provider_details is not None
    assert entries(part.provider_details["logprobs"]) == chat_logprobs


@pytest.mark.slow
def test_the_ai_sdk_responses_provider_reads_the_logprobs(
    server: LiveServer, chat_logprobs: list[tuple[str, float, list[str]]]
) -> None:
    from test_clients import run_node

    found = run_node("responses_logprobs.mjs", server, QUESTION[0]["content"])
    assert found["text"] == PARIS
    joined = [[entry for part in found[key] for entry in part] for key in ("logprobs", "streamed")]  # by part, delta
    assert entries(joined[0]) == entries(joined[1]) == chat_logprobs
