"""Speculative decoding from a row's own tokens (issue 32): prompt-lookup drafts verified in one pass, each position's
token chosen exactly as a plain step chooses it, so the output equals plain decoding (greedy and seeded alike).
Tables for the drafting and the cost model; the tiny Qwen3 and SmolLM2 for equality with speculation on and off,
concurrent rows (holes in the rectangle), grammars, max_tokens, stop strings and continuation after a crash."""

from __future__ import annotations

import json
import math
import queue
import random
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from test_batching import concurrently, greedy, messages

import main
from conftest import LiveServer, make_settings

ECHO = "Repeat this list exactly, twice: apple, river, stone, cloud, seven, lantern, apple, river, stone, cloud."
JSON_ECHO = 'Return this JSON unchanged: {"name": "Ada", "tags": ["math", "engines"], "year": 1843, "ok": true}'
PROSE = "Tell me about rivers and the sea and the light over the old city"
PROMPTS = [ECHO, JSON_ECHO, PROSE]


@pytest.mark.parametrize(
    ("tokens", "k", "draft"),
    [
        ([1, 2, 3, 4, 1, 2], 3, [3, 4, 1]),  # the suffix [1, 2] was seen: what followed it
        ([5, 1, 2, 9, 7, 1, 2, 8, 5, 1, 2], 3, [9, 7, 1]),  # the longest suffix wins ([5, 1, 2]), not the latest [1, 2]
        ([1, 2, 5, 1, 2, 6, 1, 2], 2, [6, 1]),  # of equal length, the most recent occurrence
        ([1, 2, 3, 4, 5, 6], 4, []),  # nothing repeats
        ([7, 7], 4, []),  # a one-token suffix is not enough
        ([3, 4, 3, 4], 8, [3, 4]),  # what follows runs to the end
    ],
)
def test_a_draft_is_what_followed_the_longest_earlier_match(tokens: list[int], k: int, draft: list[int]) -> None:
    assert main.draft_tokens(np.asarray(tokens, dtype=np.int64), k) == draft


def lookup_by_definition(tokens: list[int], k: int) -> list[int]:
    """The draft as the words say it: the longest suffix first, its most recent earlier occurrence first."""
    for n in range(main.SPEC_NGRAM_MAX, main.SPEC_NGRAM_MIN - 1, -1):
        for end in range(len(tokens) - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == tokens[-n:]:
                return tokens[end + 1 : end + 1 + k]
    return []


def test_a_draft_matches_its_definition_on_random_repetitive_rows() -> None:
    """Small vocabularies repeat a lot: matches of every length, at the start, overlapping, at the end."""
    rng = random.Random(7)
    for _ in range(3000):
        tokens = [rng.randrange(rng.choice([2, 3, 5, 40])) for _ in range(rng.randrange(0, 40))]
        k = rng.randrange(1, 9)
        assert main.draft_tokens(np.asarray(tokens, dtype=np.int64), k) == lookup_by_definition(tokens, k), tokens


def row(acceptance: float | None = None) -> main.BatchRequest:
    request = main.BatchRequest(None, greedy(8), threading.Event(), None, None)  # type: ignore[arg-type]
    request.acceptance = acceptance
    return request


DRAFT = [11, 12, 13, 14]
ONE_ROW = {(1, 1): 0.030, (1, 5): 0.050}  # a plain step 30 ms (33 tokens/s); 5 positions 50 ms, between: a line


@pytest.mark.parametrize(
    ("chance", "length", "expected"),
    [(0.5, 4, 0.9375), (0.9, 2, 1.71), (1.0, 8, 8.0), (0.0, 8, 0.0), (0.5, 0, 0.0)],
)
def test_a_drafted_token_counts_only_if_all_before_it_were_taken(chance: float, length: int, expected: float) -> None:
    assert main.expected_accepted(chance, length) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("drafted", "accepted", "chance"), [(4, 4, 1.0), (4, 0, 0.0), (4, 3, 0.75), (8, 1, 0.5), (2, 2, 1.0)]
)
def test_a_pass_is_evidence_of_taken_tokens_against_the_first_rejected(
    drafted: int, accepted: int, chance: float
) -> None:
    assert main.observed_chance(drafted, accepted) == chance


@pytest.mark.parametrize(
    ("measured", "acceptances", "drafts", "width"),
    [
        ({}, [None], [DRAFT], 1),  # nothing measured: a plain step first (what a pass has to beat)
        ({(1, 1): 0.030}, [None], [DRAFT], 5),  # no pass measured at this batch size: the widest, once
        (ONE_ROW, [None], [[]], 1),  # no draft
        # the prior 0.5: 3 positions (1.75 tokens in 40 ms: 44/s) beat 2 (43/s), 4 (42/s), 5 (39/s) and a step (33/s)
        (ONE_ROW, [None], [DRAFT], 3),
        (ONE_ROW, [0.95], [DRAFT], 5),  # a row copying a long run: 4.5 tokens in 50 ms
        (ONE_ROW, [0.1], [DRAFT], 1),  # at best 31/s
        (ONE_ROW, [0.2], [DRAFT], 1),  # at best 34/s: past 33 but not by SPEC_MARGIN
        ({(1, 1): 0.030, (1, 3): 0.040}, [0.9], [DRAFT], 5),  # nothing measured as wide as 4: the widest, once
        # two rows, one drafting: 2 positions (83/s) beat 3 (74/s), 5 (64/s) and a step (67/s)
        ({(2, 1): 0.030, (2, 2): 0.035, (2, 5): 0.080}, [0.9, None], [DRAFT, []], 2),
    ],
)
def test_a_verify_pass_is_as_wide_as_pays_best_against_a_plain_step(
    measured: dict[tuple[int, int], float], acceptances: list[float | None], drafts: list[list[int]], width: int
) -> None:
    spec = main.Speculation(4)
    spec.seconds.update(measured)
    assert spec.width([row(a) for a in acceptances], drafts) == width


def test_a_declined_pass_is_taken_now_and_then_to_measure_it_again() -> None:
    """Every 64 declined drafts times what the pass costs in plain steps (2 positions: 35 ms against 30), so the
    passes taken anyway cost about the same share of the time at any batch size."""
    spec = main.Speculation(4)
    spec.seconds.update(ONE_ROW)
    widths = [spec.width([row(0.1)], [DRAFT]) for _ in range(200)]
    every = math.ceil(main.SPEC_EXPLORE_EVERY * 0.035 / 0.030)  # 75
    assert [i for i, w in enumerate(widths) if w != 1] == [every - 1, 2 * every - 1]
    assert widths[every - 1] == 2  # the best of the passes: 1.1 tokens in 35 ms


def test_a_row_that_has_not_drafted_is_expected_to_take_what_rows_took_lately() -> None:
    """Prose: every draft rejected, so the next request's rows start from what rows took, not the first guess."""
    spec = main.Speculation(4)
    fresh, rejected = row(), row()
    assert spec.acceptance(fresh) == main.SPEC_PRIOR_ACCEPTANCE
    for _ in range(4):
        spec.taken(rejected, 4, 0)
    assert spec.acceptance(rejected) == pytest.approx(0.5 * 0.7**4)
    assert spec.acceptance(fresh) == pytest.approx(0.5 * 0.7**4)  # the prior followed
    assert (spec.drafted, spec.accepted) == (16, 0)
    spec.taken(fresh, 4, 4)
    assert spec.acceptance(fresh) == pytest.approx(0.7 * 0.5 * 0.7**4 + 0.3)  # from the prior, towards 1


def engines(model_dir: Path, always: bool = False) -> tuple[main.TransformersEngine, main.TransformersEngine]:
    """(speculation on, off) on the same model, prefix cache off (each run prefills alike). `always`: every draft
    is verified, whatever the cost model says (the tiny model's passes are too short to time)."""
    made = []
    for tokens in (main.Settings().speculative_tokens, 0):
        settings = make_settings(model_repo_id=str(model_dir), device_map="cpu", speculative_tokens=tokens,
                                 prefix_cache_bytes=0)  # fmt: skip
        engine = main.TransformersEngine(settings)
        engine.load()
        made.append(engine)
    spec = made[0].scheduler_for(made[0].handle.get()).spec  # type: ignore[union-attr]
    if always and spec is not None:
        spec.width = lambda requests, drafts: 1 + max(map(len, drafts), default=0)  # type: ignore[method-assign]
    return made[0], made[1]


def tokens_of(engine: main.TransformersEngine, text: str, params: main.GenerationParams,
              resume: tuple[int, ...] = ()) -> tuple[list[int], main.Finished]:  # fmt: skip
    """Every token id the engine emitted (the journal's view), and how it finished."""
    prompt = engine.prepare(messages(text), params)
    emitted: list[int] = []
    finished = None
    for event in engine.stream(prompt, params, threading.Event(), resume=[main.ChoiceResume(resume)]):
        if isinstance(event, main.Delta):
            emitted.extend(event.tokens)
        elif isinstance(event, main.Finished):
            finished = event
    assert finished is not None
    return emitted, finished


def spec_figures(engine: main.TransformersEngine) -> tuple[int, int]:
    stats = engine.batch_stats()
    return stats["drafted_tokens"], stats["accepted_tokens"]


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_dir: Path) -> tuple[main.TransformersEngine, main.TransformersEngine]:
    return engines(tiny_model_dir, always=True)


@pytest.mark.parametrize("text", PROMPTS)
@pytest.mark.parametrize("max_tokens", [7, 120])
def test_greedy_output_is_the_same_with_speculation_on_and_off(
    tiny_pair: tuple[main.TransformersEngine, main.TransformersEngine], text: str, max_tokens: int
) -> None:
    """Including max_tokens inside what a draft would have covered (7): drafts are cut where it ends."""
    on, off = tiny_pair
    params = greedy(max_tokens, ignore_eos=True)
    assert tokens_of(on, text, params) == tokens_of(off, text, params)


def test_the_tiny_model_drafts_and_accepts(tiny_pair: tuple[main.TransformersEngine, main.TransformersEngine]) -> None:
    """The tiny random model repeats itself, so prompt lookup finds drafts and some are taken."""
    on, _ = tiny_pair
    before = spec_figures(on)
    tokens_of(on, ECHO, greedy(200, ignore_eos=True))
    drafted, accepted = (a - b for a, b in zip(spec_figures(on), before, strict=True))
    assert drafted > 0 and 0 < accepted <= drafted


def test_concurrent_rows_with_different_acceptance_equal_their_solo_output(
    tiny_pair: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    """Rows that take different numbers of draft tokens leave holes in the shared rectangle (masked, then
    compacted): each row's output is still its plain one; logprobs and penalties ride along per position."""
    on, off = tiny_pair
    jobs = [(ECHO, greedy(150, ignore_eos=True)), (PROSE, greedy(150, ignore_eos=True, logprobs=3)),
            (JSON_ECHO, greedy(150, ignore_eos=True, frequency_penalty=0.5, presence_penalty=0.3)),
            ("hi", greedy(150, ignore_eos=True, logit_bias=((5, 2.0),), min_tokens=20))]  # fmt: skip
    together = concurrently(*[lambda t=t, p=p: tokens_of(on, t, p) for t, p in jobs])
    assert together == [tokens_of(off, t, p) for t, p in jobs]


def test_seeded_sampling_is_the_same_tokens_with_speculation_and_continues_exactly(
    tiny_pair: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    """Each position's token is drawn by the row's sampler seeded by (seed, position), so a verify pass draws
    what a plain step would: the same tokens on and off, twice, and from any point a restart continues at
    (the journal holds only emitted tokens, never a rejected draft)."""
    on, off = tiny_pair
    params = greedy(120, ignore_eos=True, temperature=0.9, seed=11)
    first, finished = tokens_of(on, ECHO, params)
    assert (first, finished) == tokens_of(on, ECHO, params) == tokens_of(off, ECHO, params)
    for cut in (1, 17, 60, 119):
        rest, end = tokens_of(on, ECHO, params, resume=tuple(first[:cut]))
        assert (rest, end.finish_reason) == (first[cut:], "length")


def test_a_grammar_cuts_a_draft_at_its_first_refused_token(tiny_engine: main.TransformersEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = greedy(30, constraint=main.ConstraintSpec(json.dumps(schema), "response_format"))
    prompt = tiny_engine.prepare(messages("give json"), params)
    assert prompt.grammar is not None
    tokenizer = tiny_engine.handle.get().tokenizer
    opening, word = (
        tokenizer.encode('{"', add_special_tokens=False),
        tokenizer.encode("hello", add_special_tokens=False),
    )
    row = main.make_row(tiny_engine.handle.get(), prompt, params, threading.Event(), queue.Queue(), 0, 0, None,
                        main.ChoiceResume())  # fmt: skip
    assert row.constraint is not None
    assert row.constraint.valid_prefix(opening + word) == len(opening)  # '{"' may open the object; "hello" not next
    assert row.constraint.valid_prefix(word) == 0


def test_a_constrained_row_gives_the_same_output(
    tiny_pair: tuple[main.TransformersEngine, main.TransformersEngine],
) -> None:
    on, off = tiny_pair
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}}, "required": ["name"]}
    params = greedy(80, constraint=main.ConstraintSpec(json.dumps(schema), "response_format"))
    assert tokens_of(on, JSON_ECHO, params) == tokens_of(off, JSON_ECHO, params)


# ---- SmolLM2 (it does copy): equality, acceptance, a stop string over HTTP, /metrics -----------------------------


@pytest.mark.slow
def test_smollm2_copies_with_long_accepted_drafts_and_the_same_output(smollm2_dir: Path) -> None:
    on, off = engines(smollm2_dir)
    for text in PROMPTS:
        params = greedy(60)
        assert tokens_of(on, text, params) == tokens_of(off, text, params)
    drafted, accepted = spec_figures(on)
    assert accepted >= 20 and accepted / drafted > 0.3  # the echo and the JSON are copied


@pytest.mark.slow
def test_smollm2_a_stop_string_inside_an_accepted_draft_ends_the_answer_alike(
    smollm2_dir: Path, live_server: Callable[..., LiveServer]
) -> None:
    answers = []
    for tokens in (4, 0):
        settings = make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", api_key="", prefix_cache_bytes=0,
                                 speculative_tokens=tokens)  # fmt: skip
        server = live_server(settings)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=messages(JSON_ECHO), temperature=0,  # type: ignore[arg-type]
                                                max_tokens=80, stop=['"year"'])  # fmt: skip
        metrics = httpx.get(f"{server.url}/metrics").text
        answers.append((answer.choices[0].message.content, answer.choices[0].finish_reason))
        drafted = next(line for line in metrics.splitlines() if line.startswith("llm_spec_drafted_tokens_total "))
        assert (float(drafted.split()[1]) > 0) is (tokens > 0)
    assert answers[0] == answers[1] and answers[0][1] == "stop"
