"""The KV memory budget (issue 31): what the batch holds is accounted in its real padded layout; requests wait for
memory, rows that outgrow it are preempted and prefilled again later, a request that can never fit is a 400, and an
out-of-memory error in a step preempts instead of failing the batch. The tiny Qwen3 (512 bytes of KV a token):
greedy answers equal their solo ones, the accounted peak never passes the budget."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from test_batching import concurrently, greedy, messages, run

import main
from conftest import LiveServer, iter_sse, make_settings

SHORT = ["What is the capital of France?", "Name a color.", "hi"]
LONG = " ".join(["river"] * 300)  # ~300 tokens: its row makes the short ones' rows as wide


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> main.TransformersEngine:
    """What each request gets alone (the generate() path: no batch, no budget)."""
    engine = main.TransformersEngine(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu", batching="off"))
    engine.load()
    return engine


def budgeted(model_dir: Path, kv_cache_bytes: int, speculative_tokens: int = 0
             ) -> tuple[main.TransformersEngine, main.BatchScheduler]:  # fmt: skip
    """Speculation off unless asked: a verify pass changes when steps happen, not what the budget does."""
    engine = main.TransformersEngine(make_settings(model_repo_id=str(model_dir), device_map="cpu", prefix_cache_bytes=0,
                                                  kv_cache_bytes=kv_cache_bytes,
                                                  speculative_tokens=speculative_tokens))  # fmt: skip
    scheduler = engine.scheduler_for(engine.handle.get())
    assert scheduler is not None
    return engine, scheduler


# ---- accounting, as tables -----------------------------------------------------------------------------------------


def test_a_token_costs_what_the_cache_really_holds(tiny_engine: main.TransformersEngine) -> None:
    from transformers import DynamicCache

    model = tiny_engine.handle.get().model
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.ones((3, 17), dtype=torch.long), past_key_values=cache, use_cache=True)
    assert main.kv_token_bytes(model) == 2 * 2 * 2 * 16 * 4 == 512  # 2 x layers x KV heads x head dim x float32
    assert main.cache_bytes(cache) == 3 * 17 * 512


@pytest.mark.parametrize(
    ("budget", "limit", "rows", "width", "merge_need"),
    [
        (None, None, 4, 1000, 2 * 4 * 1280 * 512),  # no budget: no limit, the same plan
        (1 << 20, main.KvLimit(1792, 1 << 20), 1, 20, 2 * 512 * 512),  # 2048 tokens, less the rounding and room
        (1_600_000, main.KvLimit(2816, 1_600_000), 3, 30, 2 * 3 * 512 * 512),  # room for the next 256 tokens, twice
        (100_000, main.KvLimit(0, 100_000), 1, 257, 2 * 768 * 512),  # less than one room: nothing fits
    ],
)
def test_the_budget_plans_a_merge_as_twice_the_merged_rectangle(
    budget: int | None, limit: main.KvLimit | None, rows: int, width: int, merge_need: int
) -> None:
    kv = main.KvBudget(budget, 512)
    assert (kv.limit(), kv.merge_need(rows, width)) == (limit, merge_need)


ROOM = 256 * 512  # bytes of one row's 256 positions


@pytest.mark.parametrize(
    ("budget", "shapes", "rows", "longest", "placed"),
    [
        (None, [(2, 40)], 1, 3000, (0, 2 * 3 * 13 * ROOM)),  # no budget: always the one group
        (12 * ROOM, [(2, 40)], 1, 30, (0, 2 * 3 * 2 * ROOM)),  # a short row joins the short ones
        (16 * ROOM, [(1, 600)], 3, 30, (1, 4 * ROOM + 2 * 3 * 2 * ROOM)),  # beside a long row: a group of their own
        (32 * ROOM, [(1, 600)], 3, 30, (0, 2 * 4 * 4 * ROOM)),  # ... unless merging fits: one forward a step
        (20 * ROOM, [(1, 600), (3, 40)], 1, 30, (1, 4 * ROOM + 2 * 4 * 2 * ROOM)),  # the group it fits best
        (30 * ROOM, [(1, 600), (3, 40)], 4, 30, (1, 4 * ROOM + 2 * 7 * 2 * ROOM)),  # fits nowhere, no third: waits
    ],
)
def test_rows_go_to_the_group_they_fit_in_or_a_group_of_their_own(
    budget: int | None, shapes: list[tuple[int, int]], rows: int, longest: int, placed: tuple[int, int]
) -> None:
    """A placement needs every group's rectangle with room for 256 more positions, the target's twice."""
    assert main.KvBudget(budget, 512).place(shapes, rows, longest, max_groups=2) == placed


def test_kv_cache_bytes_is_a_budget_zero_none_and_auto_half_the_free_ram(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import psutil

    cpu = torch.device("cpu")
    assert (main.kv_budget(123_456, cpu), main.kv_budget(0, cpu)) == (123_456, None)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 10 << 30})())
    assert main.kv_budget(-1, cpu) == 5 << 30
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: a fixed budget, said once
    with caplog.at_level(logging.WARNING):
        assert main.kv_budget(-1, cpu) == 4 << 30
    assert "psutil is not installed: the KV budget is 4 GiB" in caplog.text


# ---- admission, preemption, out of memory: the tiny Qwen3 ------------------------------------------------------


def test_a_burst_of_long_and_short_requests_completes_within_a_small_budget(
    tiny_model_dir: Path, reference: main.TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The long prompt's row would make every row 300+ positions wide: within 700 kB not all fit at once, so
    some wait (said once in the log), and each answer is still the one it gets alone."""
    engine, scheduler = budgeted(tiny_model_dir, 700_000)
    jobs = [(LONG, 200)] + [(question, 300) for question in SHORT]
    with caplog.at_level(logging.WARNING):
        answers = concurrently(*[lambda q=q, m=m: run(engine, q, greedy(m, ignore_eos=True)) for q, m in jobs])
    assert answers == [run(reference, q, greedy(m, ignore_eos=True)) for q, m in jobs]
    assert "KV budget: holding requests back for memory" in caplog.text
    assert 0 < scheduler.kv.peak <= 700_000


def test_short_rows_run_beside_a_long_one_in_a_group_of_their_own(
    tiny_model_dir: Path, reference: main.TransformersEngine
) -> None:
    """Merged with the long row, the short rows would be 4 x 768 positions, twice: 3.1 MB; in a group of their own
    (a second forward pass a step) they need 0.4 + 1.6 MB, within 2 MB, so they run beside it instead of waiting."""
    engine, scheduler = budgeted(tiny_model_dir, 2_000_000)
    groups: list[int] = []
    step = scheduler._step
    scheduler._step = lambda batch: (groups.append(len(scheduler.rows.batches)), step(batch))[1]  # type: ignore[method-assign]
    jobs = [(LONG, 300)] + [(question, 100) for question in SHORT]
    answers = concurrently(*[lambda q=q, m=m: run(engine, q, greedy(m, ignore_eos=True)) for q, m in jobs])
    assert answers == [run(reference, q, greedy(m, ignore_eos=True)) for q, m in jobs]
    assert max(groups) == 2 and scheduler.kv.preempted == 0
    assert 0 < scheduler.kv.peak <= 2_000_000


@pytest.mark.parametrize("speculative_tokens", [0, 4])
def test_rows_that_outgrow_the_budget_are_preempted_and_answer_as_alone(
    tiny_model_dir: Path, reference: main.TransformersEngine, speculative_tokens: int
) -> None:
    """Three short rows fit at first (3 x 512 positions, twice, is 1.57 MB); past 1,024 positions they do not, so
    the youngest is preempted, then prefilled again from its prompt and the tokens it had. Greedy and seeded
    rows give what they give alone."""
    engine, scheduler = budgeted(tiny_model_dir, 1_600_000, speculative_tokens)
    params = [greedy(1200, ignore_eos=True), greedy(1200, ignore_eos=True),
              greedy(1200, ignore_eos=True, temperature=1.0, seed=7)]  # fmt: skip
    answers = concurrently(*[lambda q=q, p=p: run(engine, q, p) for q, p in zip(SHORT, params, strict=True)])
    assert answers == [run(reference, q, p) for q, p in zip(SHORT, params, strict=True)]
    assert scheduler.kv.preempted >= 1
    assert 0 < scheduler.kv.peak <= 1_600_000


def test_a_request_waiting_for_memory_is_cancelled_at_once(tiny_model_dir: Path) -> None:
    engine, scheduler = budgeted(tiny_model_dir, 700_000)
    started, cancel = threading.Event(), threading.Event()

    def waiting() -> tuple[str, main.Finished]:
        started.wait(30)
        result: list[tuple[str, main.Finished]] = []
        thread = threading.Thread(target=lambda: result.append(run(engine, SHORT[0], greedy(50), cancel)))
        thread.start()
        while scheduler.kv.waiting == 0 and thread.is_alive():
            threading.Event().wait(0.01)
        cancel.set()
        thread.join(30)
        return result[0]

    def long() -> int:
        run(engine, LONG, greedy(700, ignore_eos=True), on_delta=lambda n: started.set())
        return scheduler.kv.waiting

    waited, waiting_after = concurrently(waiting, long)
    assert waited == ("", main.Finished("cancelled", 0, 0, 0))  # before the long one ended and made room
    assert waiting_after == 0


def out_of_memory_on_steps(scheduler: main.BatchScheduler, fails: Callable[[int], bool]) -> list[int]:
    """The model raises the device's out-of-memory error on decode steps (one new position a row) for which
    `fails(rows)` is true; returns the rows of each failed step."""
    model, failed = scheduler.loaded.model, []
    forward = model.forward

    def failing_forward(*args: Any, **kwargs: Any) -> Any:
        rows, width = kwargs["input_ids"].shape
        if width == 1 and fails(rows):
            failed.append(rows)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(*args, **kwargs)

    model.forward = failing_forward
    return failed


def test_an_out_of_memory_step_preempts_every_row_and_none_is_lost(
    tiny_model_dir: Path, reference: main.TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine, scheduler = budgeted(tiny_model_dir, 0)  # no budget: the error is the first word of one
    steps = iter(range(100))
    failed = out_of_memory_on_steps(scheduler, lambda rows: rows == 3 and next(steps) == 10)
    with caplog.at_level(logging.WARNING):
        answers = concurrently(*[lambda q=q: run(engine, q, greedy(80, ignore_eos=True)) for q in SHORT])
    assert answers == [run(reference, q, greedy(80, ignore_eos=True)) for q in SHORT]
    assert failed == [3] and scheduler.kv.preempted >= 3
    assert scheduler.kv.budget == int(3 * 256 * 512 * 0.9)  # 90% of the 3 rows' buffers held at the error
    assert "out of memory in a step of 3 rows (OutOfMemoryError): KV budget lowered to" in caplog.text


def test_out_of_memory_alone_ends_the_stream_with_a_clear_error_and_done(
    tiny_model_dir: Path, live_server: Callable[..., LiveServer]
) -> None:
    settings = make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu", api_key="", prefix_cache_bytes=0)
    engine = main.TransformersEngine(settings)
    scheduler = engine.scheduler_for(engine.handle.get())
    assert scheduler is not None
    out_of_memory_on_steps(scheduler, lambda rows: True)
    server = live_server(settings, engine)
    body = {"messages": messages("hi"), "stream": True, "max_tokens": 20}
    with httpx.Client(base_url=server.url, timeout=30) as client, client.stream("POST", "/v1/chat/completions",
                                                                               json=body) as response:  # fmt: skip
        events = [data for _, data in iter_sse(response)]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"] == {
        "message": "the device ran out of memory for this request (OutOfMemoryError); retry it with fewer tokens, "
        "or lower KV_CACHE_BYTES", "type": "service_unavailable_error", "param": None, "code": "out_of_memory",
    }  # fmt: skip


# ---- over HTTP: the 400, /health, /metrics -------------------------------------------------------------------------


def test_the_budget_shows_in_health_and_metrics_and_refuses_what_never_fits(
    tiny_model_dir: Path, live_server: Callable[..., LiveServer]
) -> None:
    settings = make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu", api_key="", kv_cache_bytes=1 << 20)
    server = live_server(settings)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=5)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=1790)  # type: ignore[arg-type]
    prompt = answer.usage.prompt_tokens if answer.usage else 0
    assert refused.value.body == {
        "message": f"The server's KV cache budget (KV_CACHE_BYTES, 1.0 MiB) for one request is 1792 tokens. However, "
        f"you requested {prompt + 1790} tokens ({prompt} in the messages, 1790 in the completion). Please reduce the "
        "length of the messages or completion.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
    }  # fmt: skip
    health = httpx.get(f"{server.url}/health").json()
    assert (health["kv_cache_budget_bytes"], health["requests_waiting_for_memory"]) == (1 << 20, 0)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "llm_kv_cache_budget_bytes 1.048576e+06" in metrics
    assert "llm_kv_preemptions_total 0.0" in metrics and "llm_kv_waiting_rows 0.0" in metrics
    peak = next(line for line in metrics.splitlines() if line.startswith("llm_kv_cache_peak_bytes "))
    assert 0 < float(peak.split()[1]) <= 1 << 20
