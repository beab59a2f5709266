"""Continuous batching: concurrent greedy requests give exactly their solo text; requests join mid-way, end at
their own max_tokens, and are cancelled alone; one engine thread steps them all."""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

import main
from conftest import CancelAtCheck, LiveServer, make_settings

QUESTIONS = [
    "What is the capital of France?",
    "Name a color.",
    "Tell me about rivers and the sea and the light over the old city",
    "hi",
]


def messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def greedy(max_new_tokens: int, **kwargs: Any) -> main.GenerationParams:
    return main.GenerationParams(max_new_tokens=max_new_tokens, temperature=kwargs.pop("temperature", 0), **kwargs)


def run(
    engine: main.TransformersEngine,
    text: str,
    params: main.GenerationParams,
    cancel: threading.Event | None = None,
    on_delta: Callable[[int], None] | None = None,
) -> tuple[str, main.Finished]:
    prompt = engine.prepare(messages(text), params)
    pieces: list[str] = []
    finished = None
    for event in engine.stream(prompt, params, cancel or threading.Event()):
        if isinstance(event, main.Delta):
            pieces.append(event.text)
            if on_delta:
                on_delta(len(pieces))
        else:
            finished = event
    assert finished is not None
    return "".join(pieces), dataclasses.replace(finished, cached_tokens=0)  # what is reused varies: the output not


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-engine"]


def concurrently(*jobs: Callable[[], Any]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def call(i: int) -> None:
        barrier.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.fixture(scope="module")
def engine(tiny_engine: main.TransformersEngine) -> main.TransformersEngine:
    return tiny_engine  # the shared one (conftest), under the name these tests use


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> main.TransformersEngine:
    """The same model on the one-generate-per-request path: what each request gets when it runs alone."""
    reference = main.TransformersEngine(
        make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu", batching="off")
    )
    reference.load()
    return reference


# ---- the decoder ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["the capital of france is paris", "café crème, naïve façade", "日本語 and 😀 ok", ""])
def test_incremental_decoder_joins_to_the_full_decode(engine: main.TransformersEngine, text: str) -> None:
    tokenizer = engine.handle.get().tokenizer
    ids = tokenizer(text)["input_ids"]
    decoder = main.IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas if "\ufffd" not in text)  # never half a character


# ---- equal to solo ------------------------------------------------------------------------------------------------


def test_the_scheduler_passes_the_cache_by_the_name_forward_takes(engine: main.TransformersEngine) -> None:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; the old name printed a FutureWarning at
    the first step of every run. The name chosen for the installed version raises none."""
    import torch
    from transformers import DynamicCache

    model = engine.handle.get().model
    keyword = main.cache_keyword(model)
    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        model(input_ids=ids, **{keyword: DynamicCache(config=model.config)}, use_cache=True)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_the_batched_path_is_chosen_for_text_models(engine: main.TransformersEngine) -> None:
    loaded = engine.handle.get()
    assert main.batchable(loaded) and engine.scheduler_for(loaded) is not None


def test_four_concurrent_greedy_requests_equal_their_solo_outputs(
    engine: main.TransformersEngine, reference: main.TransformersEngine
) -> None:
    solo = [run(reference, q, greedy(20)) for q in QUESTIONS]
    before = set(batch_threads())
    together = concurrently(*[lambda q=q: run(engine, q, greedy(20)) for q in QUESTIONS])
    assert [text for text, _ in together] == [text for text, _ in solo]
    assert [f for _, f in together] == [main.Finished("length", 20)] * 4
    generate_threads = [t for t in threading.enumerate() if t.name == "generate"]
    assert generate_threads == []  # no generate() thread per request: one batch thread did it all
    assert len(set(batch_threads()) - before) <= 1  # other modules' engines may have theirs already


def test_different_max_tokens_end_at_their_own_lengths(
    engine: main.TransformersEngine, reference: main.TransformersEngine
) -> None:
    lengths = [3, 17, 8, 30]
    together = concurrently(
        *[lambda q=q, n=n: run(engine, q, greedy(n)) for q, n in zip(QUESTIONS, lengths, strict=True)]
    )
    assert [f.completion_tokens for _, f in together] == lengths
    assert [f.finish_reason for _, f in together] == ["length"] * 4
    assert [t for t, _ in together] == [
        run(reference, q, greedy(n))[0] for q, n in zip(QUESTIONS, lengths, strict=True)
    ]


def join_mid_way(
    engine: main.TransformersEngine, first: tuple[str, int], second: tuple[str, int], after_deltas: int
) -> tuple[str, str]:
    """Greedy texts of (question, max_tokens) `first`, and of `second` sent once `first` has `after_deltas`
    deltas, so while it is decoding."""
    decoding = threading.Event()
    results: dict[str, str] = {}

    def run_first() -> None:
        on_delta = lambda n: n == after_deltas and decoding.set()  # noqa: E731
        results["first"] = run(engine, first[0], greedy(first[1]), on_delta=on_delta)[0]

    thread = threading.Thread(target=run_first)
    thread.start()
    assert decoding.wait(60)
    second_text = run(engine, second[0], greedy(second[1]))[0]
    thread.join(60)
    return results["first"], second_text


def test_a_request_joining_mid_way_gets_its_solo_text(
    engine: main.TransformersEngine, reference: main.TransformersEngine
) -> None:
    texts = join_mid_way(engine, (QUESTIONS[2], 60), (QUESTIONS[0], 25), after_deltas=10)
    assert texts == (run(reference, QUESTIONS[2], greedy(60))[0], run(reference, QUESTIONS[0], greedy(25))[0])


def test_cancel_of_one_leaves_the_others_intact(
    engine: main.TransformersEngine, reference: main.TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.scheduler_for(engine.handle.get()), "spec", None)  # a token a step (a verify pass
    # may take several): the cancel is seen once at admission, then once per step
    cancel = CancelAtCheck(6)
    jobs = [
        lambda: run(engine, QUESTIONS[0], greedy(40)),
        lambda: run(engine, QUESTIONS[1], greedy(200), cancel),
        lambda: run(engine, QUESTIONS[2], greedy(40)),
    ]
    (a, fa), (_, fb), (c, fc) = concurrently(*jobs)
    assert (fb.finish_reason, fb.completion_tokens) == ("cancelled", 5)
    assert (a, fa) == run(reference, QUESTIONS[0], greedy(40))
    assert (c, fc) == run(reference, QUESTIONS[2], greedy(40))


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(engine: main.TransformersEngine) -> None:
    sampled = greedy(15, temperature=1.0, top_p=0.9, seed=1234)
    alone = run(engine, QUESTIONS[0], sampled)[0]
    beside = concurrently(
        lambda: run(engine, QUESTIONS[0], sampled),
        lambda: run(engine, QUESTIONS[1], greedy(15, temperature=1.0, seed=99)),
    )
    assert beside[0][0] == alone
    other_seed = run(engine, QUESTIONS[0], greedy(15, temperature=1.0, top_p=0.9, seed=4321))[0]
    assert other_seed != alone


def test_both_decode_paths_draw_the_same_seeded_sample(
    engine: main.TransformersEngine, reference: main.TransformersEngine
) -> None:
    """Issue 28: one sampler. The generate() path (BATCHING=off, media) used generate()'s own warpers under a
    process-global seed; now it draws with the batch's sampler, seeded per (seed, position)."""
    for seed in (1234, 7):
        sampled = greedy(15, temperature=1.0, top_p=0.9, top_k=40, seed=seed)
        assert run(reference, QUESTIONS[0], sampled) == run(engine, QUESTIONS[0], sampled)


def test_a_reader_that_leaves_frees_its_row(engine: main.TransformersEngine) -> None:
    params = greedy(5000)
    cancel = threading.Event()
    stream = engine.stream(engine.prepare(messages("hi"), params), params, cancel)
    next(stream)
    stream.close()
    assert cancel.is_set()
    assert run(engine, QUESTIONS[0], greedy(5))[1] == main.Finished("length", 5)  # the batch moves on


def test_vision_models_and_batching_off_use_generate(engine: main.TransformersEngine, tiny_vl_dir: Path) -> None:
    vl = main.TransformersEngine(make_settings(model_repo_id=str(tiny_vl_dir), device_map="cpu"))
    assert vl.scheduler_for(vl.handle.get()) is None
    off = main.TransformersEngine(make_settings(model_repo_id=str(engine.handle.settings.model_repo_id),
                                                device_map="cpu", batching="off"))  # fmt: skip
    assert off.scheduler_for(off.handle.get()) is None


# ---- through the server, and on the real model ----------------------------------------------------------------


def openai_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, question: str) -> str:
    """The streamed answer's text, through the openai SDK."""
    chunks = client.chat.completions.create(model="m", messages=messages(question), stream=True)  # type: ignore[call-overload]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_eight_concurrent_openai_streams_equal_their_solo_text(
    tiny_model_dir: Path, reference: main.TransformersEngine
) -> None:
    settings = make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu", temperature=0, max_tokens=16)
    with LiveServer(main.create_app(settings)) as server:
        client = openai_client(server)
        questions = [QUESTIONS[i % 4] + " " * (i // 4) for i in range(8)]
        texts = concurrently(*[lambda q=q: ask(client, q) for q in questions])
    assert texts == [run(reference, q, greedy(16))[0] for q in questions]


@pytest.mark.slow
def test_smollm2_concurrent_answers_equal_solo_answers(smollm2_dir: Path) -> None:
    batched = main.TransformersEngine(make_settings(model_repo_id=str(smollm2_dir), device_map="cpu"))
    solo = main.TransformersEngine(make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", batching="off"))
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name a planet.", "Say hello in Spanish."]
    expected = [run(solo, q, greedy(24)) for q in questions]
    together = concurrently(*[lambda q=q: run(batched, q, greedy(24)) for q in questions])
    assert together == expected
    assert together[0][0] == "The capital of France is Paris."


def mean_log_likelihood(engine: main.TransformersEngine, question: str, answer: str) -> float:
    """The mean log-probability per token of `answer` after `question`, teacher-forced through the engine's model."""
    import torch

    loaded = engine.handle.get()
    prompt = engine.prepare(messages(question), greedy(1)).inputs["input_ids"]
    answer_ids = loaded.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.cat([prompt, answer_ids], dim=1)).logits.float()
    predicted = logits[0, prompt.shape[1] - 1 : -1].log_softmax(-1)
    return float(predicted.gather(-1, answer_ids[0, :, None]).mean())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_smollm2_in_half_precision_batched_answers_equal_solo_answers(smollm2_dir: Path, dtype: str) -> None:
    """The dtypes a GPU serves in, run here on CPU: the batched path's padding, masks, merged caches and sampling
    make no float32 assumption. In half precision a batch rounds differently from one prompt alone (bfloat16 keeps
    8 bits: a logit near 20 moves in steps of 0.125), so where the two best next tokens nearly tie a greedy answer
    can change, in transformers' own batched `generate` too (CLAUDE.md). So: the clear-margin answer must be exact,
    and every batched answer as likely under the solo model as the solo answer (a near tie costs a few hundredths
    of a nat per token; a broken mask or cache costs several)."""
    settings = {"model_repo_id": str(smollm2_dir), "device_map": "cpu", "torch_dtype": dtype}
    batched = main.TransformersEngine(make_settings(**settings))
    solo = main.TransformersEngine(make_settings(**settings, batching="off"))
    assert str(batched.handle.get().model.dtype) == f"torch.{dtype}"
    questions = ["What is the capital of France?", "What color is the sky?", "hi"]
    expected = [run(solo, q, greedy(16)) for q in questions]
    together = concurrently(*[lambda q=q: run(batched, q, greedy(16)) for q in questions])
    assert together[0] == expected[0] == ("The capital of France is Paris.", main.Finished("stop", 8))
    for question, (answer, _), (solo_answer, _) in zip(questions, together, expected, strict=True):
        likelihood = mean_log_likelihood(solo, question, answer)
        assert likelihood >= mean_log_likelihood(solo, question, solo_answer) - 0.5, (question, answer, solo_answer)


@pytest.mark.slow
def test_smollm2_a_stop_string_ends_only_its_own_request_in_the_batch(
    smollm2_dir: Path, smollm2_server: LiveServer
) -> None:
    """Through the openai client: a stop string cancels its own row at the next step; the request decoding beside
    it ends with its solo answer."""
    client = openai_client(smollm2_server)

    def france() -> tuple[str | None, str]:
        completion = client.chat.completions.create(
            model="m", messages=messages("What is the capital of France?"), stop=[" is"], max_tokens=32
        )  # type: ignore[call-overload]
        return completion.choices[0].message.content, completion.choices[0].finish_reason

    solo = main.TransformersEngine(make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", batching="off"))
    stopped, beside = concurrently(france, lambda: ask(client, "Name a planet."))
    assert stopped == ("The capital of France", "stop")
    assert beside == run(solo, "Name a planet.", greedy(32))[0]


@pytest.mark.slow
def test_smollm2_over_http_answers_the_same_with_prompts_prefilled_in_slices(
    smollm2_dir: Path, live_server: Callable[..., LiveServer]
) -> None:
    """PREFILL_BATCH_TOKENS=8: every prompt (~35 tokens) is prefilled in slices, two at once through the openai
    client; the answers are the solo ones."""
    settings = make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", temperature=0, max_tokens=24,
                             prefill_batch_tokens=8)  # fmt: skip
    client = openai_client(live_server(settings))
    solo = main.TransformersEngine(make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", batching="off"))
    questions = ["What is the capital of France?", "Name a planet."]
    assert prompt_length(solo, questions[0]) > 3 * 8
    answers = concurrently(*[lambda q=q: ask(client, q) for q in questions])
    assert answers == [run(solo, q, greedy(24))[0] for q in questions]
    assert answers[0] == "The capital of France is Paris."


def scheduled_engine(model_dir: Path, **settings: Any) -> tuple[main.TransformersEngine, main.BatchScheduler]:
    engine = main.TransformersEngine(make_settings(model_repo_id=str(model_dir), device_map="cpu", **settings))
    scheduler = engine.scheduler_for(engine.handle.get())
    assert scheduler is not None
    return engine, scheduler


def record_prefill_groups(scheduler: main.BatchScheduler) -> list[list[int]]:
    """The prompt lengths of each group the scheduler prefills, from now on."""
    groups: list[list[int]] = []
    prefill = scheduler._prefill

    def recording_prefill(group: list[main.Family]) -> None:
        groups.append([int(family[0].input_ids.shape[1]) for family in group])
        prefill(group)

    scheduler._prefill = recording_prefill  # type: ignore[method-assign]
    return groups


def test_newcomers_are_prefilled_in_groups_and_give_the_same_text(
    tiny_model_dir: Path, reference: main.TransformersEngine
) -> None:
    """Prompts of different lengths in one left-padded forward (the default 256-token budget on CPU). Without the
    prefix cache: prompts that share a cached prefix are prefilled alone, after it."""
    engine, scheduler = scheduled_engine(tiny_model_dir, prefix_cache_bytes=0)
    assert scheduler.prefill_tokens == main.CPU_PREFILL_TOKENS
    groups = record_prefill_groups(scheduler)
    expected = [run(reference, q, greedy(12))[0] for q in QUESTIONS]
    for _ in range(5):  # arrivals race the batch thread; a few tries give a group of several
        texts = [t for t, _ in concurrently(*[lambda q=q: run(engine, q, greedy(12)) for q in QUESTIONS])]
        assert texts == expected
        if max(map(len, groups)) > 1:
            break
    assert max(map(len, groups)) > 1


def prompt_length(engine: main.TransformersEngine, text: str) -> int:
    return engine.prepare(messages(text), greedy(1)).prompt_tokens


def test_prefill_groups_stay_within_the_budget(tiny_model_dir: Path, reference: main.TransformersEngine) -> None:
    budget = max(prompt_length(reference, q) for q in QUESTIONS)  # each prompt fits alone: none is sliced
    engine, scheduler = scheduled_engine(tiny_model_dir, prefill_batch_tokens=budget, prefix_cache_bytes=0)
    groups = record_prefill_groups(scheduler)  # (no prefix cache: a hit is prefilled alone, after its prefix)
    expected = [run(reference, q, greedy(12))[0] for q in QUESTIONS]
    for _ in range(3):
        texts = [t for t, _ in concurrently(*[lambda q=q: run(engine, q, greedy(12)) for q in QUESTIONS])]
        assert texts == expected
    assert sum(len(g) for g in groups) == 3 * len(QUESTIONS)
    assert all(len(g) * max(g) <= budget for g in groups)


LONG_QUESTION = " ".join([QUESTIONS[2]] * 6)


def test_a_prompt_longer_than_the_budget_is_prefilled_in_slices_between_steps(
    tiny_model_dir: Path, reference: main.TransformersEngine
) -> None:
    """Chunked prefill: the running request keeps getting a step between the slices, and both texts are the
    solo ones."""
    budget = prompt_length(reference, QUESTIONS[0])
    slices = -(-prompt_length(reference, LONG_QUESTION) // budget)
    assert slices >= 4
    engine, scheduler = scheduled_engine(tiny_model_dir, prefill_batch_tokens=budget, prefix_cache_bytes=0)
    ops: list[str] = []  # (no prefix cache: the slices are those of the whole prompt)
    chunk, step = scheduler._prefill_chunk, scheduler._step
    scheduler._prefill_chunk = lambda chunked: (ops.append("slice"), chunk(chunked))[1]  # type: ignore[method-assign]
    scheduler._step = lambda batch: (ops.append("step"), step(batch))[1]  # type: ignore[method-assign]
    texts = join_mid_way(engine, (QUESTIONS[0], 80), (LONG_QUESTION, 10), after_deltas=5)
    assert texts == (run(reference, QUESTIONS[0], greedy(80))[0], run(reference, LONG_QUESTION, greedy(10))[0])
    assert ops.count("slice") == slices
    first_slice = ops.index("slice")
    assert ops[first_slice : first_slice + 2 * slices] == ["slice", "step"] * slices


def test_cancel_during_a_sliced_prefill_ends_only_that_request(
    tiny_model_dir: Path, reference: main.TransformersEngine
) -> None:
    budget = prompt_length(reference, QUESTIONS[0])
    engine, scheduler = scheduled_engine(tiny_model_dir, prefill_batch_tokens=budget, prefix_cache_bytes=0)
    cancel = threading.Event()
    chunk = scheduler._prefill_chunk
    scheduler._prefill_chunk = lambda chunked: (chunk(chunked), cancel.set())[0]  # type: ignore[method-assign]
    text, finished = run(engine, LONG_QUESTION, greedy(10), cancel)
    assert (text, finished.finish_reason, finished.completion_tokens) == ("", "cancelled", 0)
    assert scheduler.rows.chunked is None
    scheduler._prefill_chunk = chunk  # type: ignore[method-assign]
    assert run(engine, QUESTIONS[0], greedy(12))[0] == run(reference, QUESTIONS[0], greedy(12))[0]


@pytest.mark.parametrize(
    ("size", "longest", "length", "budget", "joins"),
    [
        (0, 0, 5000, 256, True),  # the first prompt of a group always goes, however long
        (1, 50, 50, 256, True),  # 2 x 50 = 100
        (4, 50, 50, 256, True),  # 5 x 50 = 250
        (5, 50, 50, 256, False),  # 6 x 50 = 300
        (1, 20, 200, 256, False),  # padded to the newcomer's length: 2 x 200 = 400
        (1, 200, 20, 256, False),  # padded to the longest in the group: 2 x 200 = 400
        (3, 64, 64, 256, True),  # exactly the budget
    ],
)
def test_joins_prefill_group(size: int, longest: int, length: int, budget: int, joins: bool) -> None:
    assert main.joins_prefill_group(size, longest, length, budget) is joins


def test_growing_layer_matches_concatenation_across_growth_and_replacement() -> None:
    """Keys/values equal what DynamicLayer's torch.cat gives: after a prefill (kept as computed), past the
    buffer's room, after a dropped row, and after a trim replaces them (adopted into a fresh buffer)."""
    import torch

    layer = main.growing_layer()()
    generator = torch.Generator().manual_seed(0)

    def states(rows: int, length: int) -> Any:
        return torch.randn(rows, 2, length, 4, generator=generator)

    keys, values = states(3, 250), states(3, 250)
    out_k, out_v = layer.update(keys, values)
    assert out_k is keys and out_v is values and layer.buffers is None  # no copy before the first token
    for step in range(10):  # 250 -> 260: adopted into a 256-position buffer, then crosses its room once
        k, v = states(3, 1), states(3, 1)
        out_k, out_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        assert torch.equal(out_k, keys) and torch.equal(out_v, values)
        if step == 0:
            first_buffer = layer.buffers[0]
            assert first_buffer.shape[-2] == main.KV_ROOM_TOKENS
    assert layer.buffers[0] is not first_buffer and layer.buffers[0].shape[-2] == 2 * main.KV_ROOM_TOKENS
    layer.batch_select_indices(torch.tensor([0, 2]))  # a row leaves: its buffers shrink, their room kept
    keys, values = keys[[0, 2]], values[[0, 2]]
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    selected = layer.buffers[0]
    k, v = states(2, 1), states(2, 1)
    out_k, out_v = layer.update(k, v)
    keys, values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
    assert torch.equal(out_k, keys) and torch.equal(out_v, values)
    assert layer.buffers[0] is selected and selected.shape[0] == 2  # written in place: no second copy
    layer.keys, layer.values = keys[:, :, 5:], values[:, :, 5:]  # leading padding trimmed: replaced by a view
    k, v = states(2, 1), states(2, 1)
    out_k, out_v = layer.update(k, v)
    assert torch.equal(out_k, torch.cat([keys[:, :, 5:], k], dim=-2))
    assert torch.equal(out_v, torch.cat([values[:, :, 5:], v], dim=-2))
    assert layer.buffers[0] is not selected


def test_a_failed_step_fails_the_batch_and_the_next_request_is_served(
    tiny_model_dir: Path, reference: main.TransformersEngine
) -> None:
    engine, scheduler = scheduled_engine(tiny_model_dir)
    step = scheduler._step
    failures = [RuntimeError("step broke")]

    def failing_step(batch: main.Batch) -> None:
        if failures:
            raise failures.pop()
        step(batch)

    scheduler._step = failing_step  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"^step broke$"):
        run(engine, QUESTIONS[0], greedy(10))
    assert scheduler.rows.batches == []
    assert run(engine, QUESTIONS[1], greedy(10)) == run(reference, QUESTIONS[1], greedy(10))


def test_a_failed_prefill_fails_only_its_group(tiny_model_dir: Path, reference: main.TransformersEngine) -> None:
    engine, scheduler = scheduled_engine(tiny_model_dir, prefix_cache_bytes=0)  # the group path, not a hit's
    joined = threading.Event()
    prefill = scheduler._prefill

    def prefill_failing_once_others_decode(group: list[main.Family]) -> None:
        if joined.is_set():
            raise RuntimeError("prefill broke")
        prefill(group)
        joined.set()

    scheduler._prefill = prefill_failing_once_others_decode  # type: ignore[method-assign]

    def newcomer() -> Any:
        joined.wait(30)
        with pytest.raises(RuntimeError, match=r"^prefill broke$"):
            run(engine, QUESTIONS[2], greedy(5))
        return "failed"

    first, second = concurrently(lambda: run(engine, QUESTIONS[0], greedy(200)), newcomer)
    assert second == "failed"
    assert first == run(reference, QUESTIONS[0], greedy(200))  # the running request went on untouched


def test_a_merge_that_fails_part_way_fails_only_the_newcomers(
    tiny_model_dir: Path, reference: main.TransformersEngine
) -> None:
    """A failure while a prefilled group is merged into the running batch (out of GPU memory in a `torch.cat`, say)
    after some layers were merged: those layers are put back, so the running request goes on to its solo text."""
    engine, scheduler = scheduled_engine(tiny_model_dir, prefix_cache_bytes=0)  # a group's merge, not a hit's
    decoding, join = threading.Event(), scheduler._join
    padded_old: list[bool] = []

    def join_breaking_the_last_layer(
        requests: list[main.BatchRequest], lengths: list[int], cache: Any, mask: Any, logits: Any
    ) -> None:
        if scheduler.rows.batches:  # joining a running batch: layer 0 merges, the last layer cannot
            padded_old.append(mask.shape[1] > scheduler.rows.batches[0].mask.shape[1])
            cache.layers[-1].keys = cache.layers[-1].keys[:, :1]  # one head too few: its torch.cat raises
        join(requests, lengths, cache, mask, logits)
        decoding.set()

    scheduler._join = join_breaking_the_last_layer  # type: ignore[method-assign]

    def newcomer() -> str:
        decoding.wait(30)
        with pytest.raises(RuntimeError, match=r"^Sizes of tensors must match"):
            run(engine, " ".join(["river"] * 120), greedy(5))
        return "failed"

    first, second = concurrently(lambda: run(engine, QUESTIONS[0], greedy(60)), newcomer)
    assert second == "failed" and padded_old == [True]  # the batch's rows had to be padded on the left
    assert first == run(reference, QUESTIONS[0], greedy(60))
