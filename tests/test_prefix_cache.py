"""Prefix caching (issue 30): a prompt prefills only what follows the longest cached prefix of earlier prompts and
answers. Pure tables for the cache itself; the tiny Qwen3 for greedy equality with the cache on and off, concurrency,
cancel and eviction; SmolLM2 (slow) for real multi-turn chats through the openai client, the first step's logprobs
against a full prefill, the Responses API and API-key isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

import main
from conftest import LiveServer, make_settings


def ids(*tokens: int) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


def kv(length: int, fill: float = 1.0, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer for `length` tokens: 1 row, 2 heads, head dim 4, float32 (64 bytes a token a
    layer for keys and values together)."""
    return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill)) for _ in range(layers)]


# ---- the cache itself ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "prompt", "salt", "expected"),
    [
        ([(1, 2, 3, 4)], (1, 2, 3, 4, 5, 6), "", ((1, 2, 3, 4), 4)),  # a strict prefix: all of it
        ([(1, 2, 3, 4)], (1, 2, 3, 4), "", ((1, 2, 3, 4), 3)),  # the whole prompt: its last token is computed
        ([(1, 2, 3, 4)], (1, 2, 9, 4), "", ((1, 2, 3, 4), 2)),  # diverges at the third token
        ([(1, 2, 3), (1, 2, 3, 4, 5, 9)], (1, 2, 3, 4, 5, 6, 7), "", ((1, 2, 3, 4, 5, 9), 5)),  # the longest shared
        ([(9, 2, 3, 4)], (1, 2, 3, 4), "", None),  # nothing shared
        ([(1, 2, 3, 4)], (1, 2, 3, 4, 5), "bob", None),  # another owner's entry is never seen
        ([(1, 2, 3, 4)], (1,), "", None),  # a one-token prompt is computed whole
    ],
)
def test_lookup_finds_the_longest_shared_prefix_of_its_owner(
    stored: list[tuple[int, ...]], prompt: tuple[int, ...], salt: str, expected: tuple[tuple[int, ...], int] | None
) -> None:
    cache = main.PrefixCache(1 << 20)
    for tokens in stored:
        cache.store("", ids(*tokens), kv(len(tokens)))
    found = cache.lookup(salt, ids(*prompt))
    assert (None if found is None else (tuple(found[0].tokens.tolist()), found[1])) == expected
    assert cache.stats["lookups"] == 1 and cache.stats["hits"] == (expected is not None)


def test_an_entry_is_a_copy_and_a_prefix_of_a_newer_one_is_dropped() -> None:
    cache = main.PrefixCache(1 << 20)
    prompt = kv(4)
    cache.store("", ids(1, 2, 3, 4), prompt)
    prompt[0][0].fill_(7.0)  # the live cache goes on changing: the entry must not
    [entry] = cache.entries.values()
    assert torch.equal(entry.layers[0][0], torch.full((1, 2, 4, 4), 1.0))
    cache.store("", ids(1, 2, 3, 4, 5, 6), kv(6))  # prompt + answer: the prompt's entry is redundant now
    assert [e.tokens.tolist() for e in cache.entries.values()] == [[1, 2, 3, 4, 5, 6]]
    cache.store("", ids(1, 2, 3), kv(3))  # already held, in full
    assert len(cache.entries) == 1 and cache.held == 6 * 64 * 2


def test_a_tiny_budget_evicts_the_least_recently_used_and_zero_stores_nothing() -> None:
    cache = main.PrefixCache(3 * 4 * 128)  # three 4-token entries of 2 layers
    for first in (1, 2, 3):
        cache.store("", ids(first, 0, 0, 0), kv(4))
    assert cache.lookup("", ids(1, 0, 0, 0, 5)) is not None  # 1 is the most recently used now
    cache.store("", ids(4, 0, 0, 0), kv(4))
    assert sorted(e.tokens[0] for e in cache.entries.values()) == [1, 3, 4]  # 2 went
    assert cache.stats["evictions"] == 1 and cache.held <= cache.budget == cache.peak
    off = main.PrefixCache(0)
    off.store("", ids(1, 2, 3), kv(3))
    assert off.entries == {} and off.held == 0


# ---- the tiny model through the engine ----------------------------------------------------------------------------

CONVERSATIONS = [
    ["the capital of france", "and the river", "and the light over the old city"],
    ["a small model learns", "to speak in short clear words"],
    ["people walk along old streets", "under green trees", "while a small model learns", "to speak"],
]


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> tuple[main.TransformersEngine, main.TransformersEngine]:
    """(cache on, cache off) on the same model: what each request gets without reuse is the reference."""
    on = main.TransformersEngine(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"))
    off = main.TransformersEngine(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu",
                                                prefix_cache_bytes=0))  # fmt: skip
    return on, off


def turn(engine: main.TransformersEngine, conversation: list[dict[str, str]], new_tokens: int = 12,
         salt: str = "", cancel: threading.Event | None = None) -> tuple[str, main.Finished]:  # fmt: skip
    params = main.GenerationParams(max_new_tokens=new_tokens, temperature=0, cache_salt=salt)
    prompt = engine.prepare(conversation, params)
    pieces, finished = [], None
    for event in engine.stream(prompt, params, cancel or threading.Event()):
        if isinstance(event, main.Delta):
            pieces.append(event.text)
        elif isinstance(event, main.Finished):
            finished = event
    assert finished is not None
    return "".join(pieces), finished


def chat(engine: main.TransformersEngine, users: list[str], **kwargs: Any) -> Iterator[tuple[str, int]]:
    """An agent's loop: each turn sends the whole conversation again, with the previous answer."""
    conversation: list[dict[str, str]] = []
    for text in users:
        conversation.append({"role": "user", "content": text})
        answer, finished = turn(engine, conversation, **kwargs)
        conversation.append({"role": "assistant", "content": answer})
        yield answer, finished.cached_tokens


@pytest.mark.parametrize("users", CONVERSATIONS)
def test_greedy_turns_are_the_same_with_the_cache_and_reuse_the_conversation(
    engines: tuple[main.TransformersEngine, main.TransformersEngine], users: list[str]
) -> None:
    on, off = engines
    with_cache, without = list(chat(on, users)), list(chat(off, users))
    assert [a for a, _ in with_cache] == [a for a, _ in without]
    assert all(cached == 0 for _, cached in without)
    assert all(cached > 0 for _, cached in with_cache[1:])  # every later turn starts from the earlier ones


def test_the_first_steps_logits_match_a_full_prefill(
    engines: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    """The scores of the first generated tokens (raw log-softmax) from a cached prefill against a full one: they
    differ only by the numerics of a shorter matrix product."""
    on, off = engines
    conversation = [{"role": "user", "content": "the capital of france is paris and the river runs"}]
    params = main.GenerationParams(max_new_tokens=4, temperature=0, logprobs=5, cache_salt="logits")
    first = turn(on, conversation[:1], salt="logits")  # stores the prompt
    conversation += [{"role": "assistant", "content": first[0]}, {"role": "user", "content": "and the light"}]

    def scores(engine: main.TransformersEngine) -> tuple[list[float], int]:
        events = list(engine.stream(engine.prepare(conversation, params), params, threading.Event()))
        entries = [s for e in events if isinstance(e, main.Delta) for s in e.logprobs]
        [finished] = [e for e in events if isinstance(e, main.Finished)]
        return [t[1] for s in entries for t in s.top], finished.cached_tokens

    cached, reused = scores(on)
    full, _ = scores(off)
    assert reused > 0
    assert cached == pytest.approx(full, abs=1e-4)  # measured: 4.8e-7 here, 2.7e-5 on SmolLM2 (float32, top-20)


def test_rows_that_continue_from_an_entry_never_write_into_it(
    engines: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    on, _ = engines
    users = ["the capital of france", "and the river"]
    list(chat(on, users[:1], salt="intact"))
    scheduler = on._scheduler
    assert scheduler is not None
    settled(scheduler)  # the finished row's entry is stored after its Finished went out
    held = [(e, [(k.clone(), v.clone()) for k, v in e.layers]) for e in scheduler.prefix.entries.values()]
    answers = list(chat(on, users, salt="intact"))
    settled(scheduler)
    assert answers[1][1] > 0 and held
    for entry, copies in held:  # (an entry that a newer one made redundant leaves the cache, unchanged)
        assert all(torch.equal(a, k) and torch.equal(b, v) for (a, b), (k, v) in zip(copies, entry.layers, strict=True))


def settled(scheduler: main.BatchScheduler) -> None:
    """Waits until the batch thread has retired every row (and stored their entries)."""
    deadline = time.monotonic() + 30
    while scheduler.rows.batches or scheduler.rows.chunked is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def follow_up(engine: main.TransformersEngine, salt: str, first: str, then: str) -> list[dict[str, str]]:
    """A second turn whose first turn (asked and answered now, as `salt`) is in the cache."""
    base = [{"role": "user", "content": first}]
    answer = turn(engine, base, salt=salt)[0]
    return [*base, {"role": "assistant", "content": answer}, {"role": "user", "content": then}]


def test_two_concurrent_requests_on_one_entry_and_a_cancel_leave_it_whole(
    engines: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    on, off = engines
    follow = follow_up(on, "shared", "people walk along old streets under green trees", "and then")
    expected = turn(off, follow)[0]
    cancel = threading.Event()
    cancel.set()  # cancelled before its prefill from the entry runs
    assert turn(on, follow, salt="shared", cancel=cancel)[1].finish_reason == "cancelled"
    results: list[Any] = [None, None]

    def ask(i: int) -> None:
        results[i] = turn(on, follow, salt="shared")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == [expected, expected]
    assert all(r[1].cached_tokens > 0 for r in results)


def test_n_choices_of_a_prompt_that_hits_are_the_choices_without_the_cache(
    engines: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    on, off = engines
    follow = follow_up(on, "n", "the river runs through a city of light", "and the people")
    params = main.GenerationParams(max_new_tokens=10, temperature=1.0, seed=5, n=2, cache_salt="n")

    def choices(engine: main.TransformersEngine) -> list[tuple[str, int]]:
        events = list(engine.stream(engine.prepare(follow, params), params, threading.Event()))
        texts = ["".join(e.text for e in events if isinstance(e, main.Delta) and e.choice == i) for i in range(2)]
        cached = [e.cached_tokens for e in events if isinstance(e, main.Finished)]
        return list(zip(texts, cached, strict=True))

    with_cache, without = choices(on), choices(off)
    assert [t for t, _ in with_cache] == [t for t, _ in without] and with_cache[0][0] != with_cache[1][0]
    assert all(c > 0 for _, c in with_cache) and all(c == 0 for _, c in without)


def test_another_owners_conversation_is_never_reused(
    engines: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    on, _ = engines
    users = ["a city where it never stops raining", "and its people"]
    assert [c for _, c in chat(on, users, salt="alice")][1] > 0
    assert next(c for _, c in chat(on, users, salt="bob")) == 0  # alice's entries are not bob's


# ---- SmolLM2 through the API (slow) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", temperature=0, max_tokens=24,
                             api_key="alice-key,bob-key")  # fmt: skip
    with LiveServer(main.create_app(settings)) as live:
        yield live


def client(server: LiveServer, key: str = "alice-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.slow
def test_an_openai_client_chat_reports_cached_tokens_turn_after_turn(server: LiveServer) -> None:
    messages: list[Any] = [{"role": "system", "content": "You are a terse assistant."}]
    reported = []
    for question in ("What is the capital of France?", "And of Italy?", "And of Spain?"):
        messages.append({"role": "user", "content": question})
        answer = client(server).chat.completions.create(model="m", messages=messages)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
        details = answer.usage.prompt_tokens_details if answer.usage is not None else None
        reported.append(details.cached_tokens if details is not None else 0)
    assert reported[0] == 0 and all(0 < c < 200 for c in reported[1:]), reported
    streamed = list(client(server).chat.completions.create(model="m", messages=messages[:-1], stream=True,
                                                           stream_options={"include_usage": True}))  # fmt: skip
    usage = streamed[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt again: all but one
    other = client(server, "bob-key").chat.completions.create(model="m", messages=messages)
    assert other.usage is not None and other.usage.prompt_tokens_details is None  # bob shares nothing of alice's
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert "llm_prefix_cache_hits_total" in text and "llm_prefix_cache_bytes" in text


@pytest.mark.slow
def test_smollm2_multi_turn_answers_are_the_same_without_the_cache(server: LiveServer, smollm2_dir: Path) -> None:
    settings = make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", temperature=0, max_tokens=24,
                             prefix_cache_bytes=0)  # fmt: skip
    with LiveServer(main.create_app(settings)) as off:
        for users in (["What is the capital of France?", "And of Italy?", "Which is larger?"],
                      ["Name a color.", "Another one.", "And a third."]):  # fmt: skip
            answers: dict[str, list[str]] = {}
            for name, live, key in (("on", server, "alice-key"), ("off", off, "unused")):
                messages: list[Any] = []
                for text in users:
                    messages.append({"role": "user", "content": text})
                    reply = client(live, key).chat.completions.create(model="m", messages=messages)
                    messages.append({"role": "assistant", "content": reply.choices[0].message.content})
                    answers.setdefault(name, []).append(str(reply.choices[0].message.content))
            assert answers["on"] == answers["off"]


@pytest.mark.slow
def test_a_responses_chain_and_legacy_completions_report_cached_tokens(server: LiveServer) -> None:
    alice = client(server)
    first = alice.responses.create(model="m", input="What is the capital of France?")
    second = alice.responses.create(model="m", input="And of Italy?", previous_response_id=first.id)
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # all the first turn, at least
    prompt = "The capital of France is Paris. The capital of Italy is"
    alice.completions.create(model="m", prompt=prompt, max_tokens=4)
    again = alice.completions.create(model="m", prompt=prompt + " Rome.", max_tokens=4)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    scored = alice.completions.create(model="m", prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    assert scored.usage is not None and scored.usage.prompt_tokens_details is None  # echo scores need every position


def test_a_budget_below_minus_one_is_refused() -> None:
    with pytest.raises(main.ConfigError, match="PREFIX_CACHE_BYTES must be -1"):
        main.Settings.from_env({"PREFIX_CACHE_BYTES": "-2"})
