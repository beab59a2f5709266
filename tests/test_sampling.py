"""Issue 17's pure pieces: request checks, prompt lists, logprob alignment, n-choice folds (tables)."""

from __future__ import annotations

from typing import Any

import pytest

import main


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
        events.append(main.AnswerChunks(meta, main.OutputFormat(), index).start()[0])
    first, second = main.AnswerChunks(meta, main.OutputFormat(), 0), main.AnswerChunks(meta, main.OutputFormat(), 1)
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
    chunks = main.CompletionChunks(meta, 0)
    prompt = (main.TokenScore("Hi", None, b"Hi"),)
    events = chunks.start() + chunks.echo(prompt) + chunks.encode(" there", [score(" there")])
    events += chunks.finish(main.Finished("length", 1)) + chunks.close(1, 1) + [main.DONE]
    completion = main.fold_text_completion(meta, events)
    choice = completion.choices[0]
    assert (choice.text, choice.finish_reason) == ("Hi there", "length")
    assert choice.logprobs == main.LegacyLogprobs(tokens=["Hi", " there"], token_logprobs=[None, -0.5],
                                                  top_logprobs=[None, {}], text_offset=[0, 2])  # fmt: skip
