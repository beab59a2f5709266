"""Issue 18: generations that survive a restart. A running session's engine events are journaled as steps; a
restart replays them through fresh renderers (rebuilding the stop matcher, the tool-call parser, the logprob
alignment) and the engine goes on from the tokens they hold."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_resume import QUESTION, assert_contiguous, content_of, finish_reason_of, resume, start_stream

import main
from conftest import (
    ScriptedEngine,
    ServerProcess,
    SseEvent,
    iter_sse,
    read_stream,
    read_streams_then_kill,
    stop_gracefully,
)

SCORE = main.TokenScore("\\xe6\\x97", -0.25, b"\xe6\x97", (("\\xe6\\x97", -0.25, b"\xe6\x97"), ("a", -2.0, b"a")))


# ---- the journal's records (tables) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [
        main.Delta("Hel", 0, (), (9906,)),
        main.Delta("", 2, (SCORE,), (1, 2)),
        main.Delta('日本 "q"\n', 1, (SCORE, main.TokenScore("x", -0.5, b"x")), (5,)),
        main.Finished("length", 17, 3),
        main.Finished("stop", 0),
        main.PromptScores((main.TokenScore("The", None, b"The"), SCORE), 1),
    ],
)
def test_a_step_decodes_to_the_engine_event_it_was(item: main.EngineEvent) -> None:
    encoded = main.encode_step(item)
    assert main.decode_step(encoded) == item
    assert "\n" not in encoded  # one compact JSON text per row


def test_a_plan_round_trips_with_its_constraint_bias_and_seed() -> None:
    params = main.GenerationParams(
        max_new_tokens=64, temperature=0.8, top_p=0.9, seed=123, stop=("\n\n", "END"), n=2, logprobs=3,
        constraint=main.ConstraintSpec('{"type":"object"}', "response_format.json_schema.schema"),
        logit_bias=((7, -100.0), (9, 2.5)), presence_penalty=0.5, min_tokens=3, top_k=0,
    )  # fmt: skip
    plan = main.ContinuationPlan(((1, 2, 3), (4,)), ("", "x"), main.OutputFormat(True, "open", False), params)
    assert main.ContinuationPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], [main.ChoiceResume(), main.ChoiceResume()]),
        (
            [main.Delta("a", 0, (), (1,)), main.Delta("b", 1, (), (2, 3)), main.Delta("c", 0, (), (4,))],
            [main.ChoiceResume((1, 4)), main.ChoiceResume((2, 3))],
        ),
        (
            [main.PromptScores((), 0), main.Delta("a", 0, (), (1,)), main.Finished("stop", 2, 0)],
            [main.ChoiceResume((1,), True, True), main.ChoiceResume()],
        ),
    ],
)
def test_resume_points(steps: list[main.EngineEvent], expected: list[main.ChoiceResume]) -> None:
    assert main.resume_points(steps, 2) == expected


def test_a_draw_depends_on_its_seed_and_position_only() -> None:
    seeds = {main.position_seed(7, position) for position in range(1000)}
    assert len(seeds) == 1000 and main.position_seed(7, 5) == main.position_seed(7, 5)
    assert main.position_seed(7, 5) != main.position_seed(8, 5)
    assert all(0 <= seed < 1 << 63 for seed in seeds)


# ---- the restart's choice: continue or interrupt (a real SQLite file) ---------------------------------------


META = main.StreamMeta("chatcmpl-1", 0, "m", False)


def journal_with(path: Path, sessions: dict[str, tuple[str, float]]) -> main.SqliteJournal:
    """A journal holding running sessions: id -> (plan, created_at)."""
    journal = main.SqliteJournal(path)
    for session_id, (plan, created_at) in sessions.items():
        journal.record_session(session_id, META, "{}", created_at, plan)
        journal.record_state(session_id, main.SessionState.RUNNING, None)
        journal.record_event(session_id, 0, '{"x":1}')
        journal.record_step(session_id, 0, main.encode_step(main.Delta("x", 0, (), (1,))))
    journal.flush()
    return journal


def test_a_restart_continues_within_its_limits_and_interrupts_the_rest(tmp_path: Path) -> None:
    plan = main.ContinuationPlan(((1,),), ("",), main.OutputFormat(), main.GenerationParams(8, 0.0)).to_json()
    journal = journal_with(tmp_path / "j.db", {"fresh": (plan, 100.0), "old": (plan, 1.0), "media": ("", 100.0)})
    policy = main.ContinuePolicy(max_attempts=2, max_age_seconds=50)
    first = journal.recover_interrupted(120.0, policy)
    assert (first.continued, sorted(first.interrupted)) == (["fresh"], ["media", "old"])
    stored = journal.load_session("fresh")
    assert stored is not None and stored.plan == plan and stored.steps == (main.Delta("x", 0, (), (1,)),)
    assert [e.data for e in stored.events] == ['{"x":1}']  # left as it was: the runner goes on after it
    assert journal.recover_interrupted(120.0, policy).continued == ["fresh"]  # attempt 2
    third = journal.recover_interrupted(120.0, policy)  # it crashed the server twice: ended now
    assert (third.continued, third.interrupted) == ([], ["fresh"])
    again = journal.load_session("fresh")
    assert again is not None and again.state == "interrupted" and again.steps == ()
    assert json.loads(again.events[-2].data)["error"]["code"] == "interrupted" and again.events[-1].data == "[DONE]"
    journal.close()
    with sqlite3.connect(tmp_path / "j.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM steps").fetchone() == (0,)  # ended sessions keep no steps


def test_without_a_policy_every_running_session_is_interrupted(tmp_path: Path) -> None:
    plan = main.ContinuationPlan(((1,),), ("",), main.OutputFormat(), main.GenerationParams(8, 0.0)).to_json()
    journal = journal_with(tmp_path / "j.db", {"s": (plan, 100.0)})
    recovery = journal.recover_interrupted(120.0, None)
    assert (recovery.continued, recovery.interrupted) == ([], ["s"])
    journal.close()


# ---- replay at every crash point: the continued events are the uninterrupted ones (in process) ---------------


CALL_PIECES = ["<tool", "_call>\n", '{"name": "get_', 'weather", "arguments": {"ci', 'ty": "pa', 'ris"}}',
               "\n</tool_call>", " after"]  # fmt: skip


def responses_meta() -> main.StreamMeta:
    request = main.ResponsesRequest.model_validate({"input": "hi"})
    response = main.make_response_object("resp_1", 100, "m", request)
    return main.StreamMeta("resp_1", 100, "m", True, "responses", json.dumps(response))


# deliberate: each stop string ends at the last token, as a row that ran one token past it (the engine stops a row
# at the step after its stop matched) would count one token more or less by timing alone, restart or not
CASES = {
    "stop string across tokens": (["Hel", "lo", " ST", "O", "P"], ("STOP",), 1, main.OutputFormat(), None),
    "tool call mid-arguments": (CALL_PIECES, (), 1, main.OutputFormat(tool_calls=True), None),
    "two choices": (["a", "b", "c", "d"], ("cd",), 2, main.OutputFormat(), None),
    "responses events": (["Hi", " there", " you"], (), 1, main.OutputFormat(), responses_meta()),
}


def run_session(
    engine: ScriptedEngine, params: main.GenerationParams, prompt: main.PreparedPrompt, meta: main.StreamMeta,
    held: list[str] | None = None, steps: list[main.EngineEvent] | None = None,
) -> tuple[list[str], list[main.EngineEvent], list[int]]:  # fmt: skip
    """Runs one session to its end (a continuation when `steps` is given, holding `held`); returns its events,
    the steps it journaled, and how many events it held as each step was journaled."""
    recorded: list[main.EngineEvent] = []
    marks: list[int] = []

    async def scenario() -> list[str]:
        session = main.Session("s", meta, 4096)
        for data in held or []:
            session.buffer.append(data)

        def record(item: main.EngineEvent) -> None:
            marks.append(session.buffer.next_index)
            recorded.append(item)

        session.record_step = record  # type: ignore[method-assign]
        gate = main.GenerationGate(4, 4)
        gate.admit()
        await main.run_generation(session, engine, [prompt], params, gate, main.Metrics(), 0, steps)
        return [event.data for event in session.buffer.read_from(0)]

    return asyncio.run(scenario()), recorded, marks


@pytest.mark.parametrize("case", list(CASES))
def test_a_continuation_from_any_crash_point_gives_the_uninterrupted_events(case: str) -> None:
    tokens, stop, n, output, meta = CASES[case]
    engine = ScriptedEngine(tokens)
    params = main.GenerationParams(max_new_tokens=len(tokens), temperature=0.0, stop=stop, n=n)
    prompt = main.PreparedPrompt(engine.ids(), 7, output=output)
    meta = meta or main.StreamMeta("chatcmpl-1", 100, "m", True)
    uninterrupted, steps, marks = run_session(engine, params, prompt, meta)
    assert len(steps) >= len(tokens)
    ends = [*marks[1:], len(uninterrupted) - 1]  # events held once step k's events are all appended
    for k in range(len(steps) + 1):
        # the journal commits in order: steps[:k], and any number of the events made before step k's successor
        for held in sorted({marks[k] if k < len(marks) else ends[-1], ends[k - 1] if k else marks[0]}):
            continued, _, _ = run_session(engine, params, prompt, meta, uninterrupted[:held], steps[:k])
            assert continued == uninterrupted, (case, k, held)


# ---- a real server killed and restarted (subprocesses, the tiny model) -------------------------------------


@pytest.fixture
def continuing_env(tiny_model_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {"MODEL_REPO_ID": str(tiny_model_dir), "DEVICE_MAP": "cpu", "TEMPERATURE": "0", "PERSIST_SESSIONS": "1",
            "SESSIONS_DB_PATH": str(tmp_path / "sessions.db"), "MAX_TOKENS": "1500"}  # fmt: skip


def crash_mid_stream(server: ServerProcess, sid: str, events: int, how: str = "kill", **body: Any) -> list[SseEvent]:
    """Starts a stream, reads `events` events, then kills (or SIGTERMs) the server; what the client got."""
    request = {"messages": QUESTION, "stream": True, "session_id": sid, **body}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        if how == "kill":
            head = read_stream(response, sid, limit=events)
            server.kill()
            return head
        stream = iter_sse(response)
        head = [next(stream) for _ in range(events)]
        stop_gracefully(server.proc)
        rest = list(stream)  # the stream ends (no [DONE]): the session is left to be continued
    server.proc.wait(30)
    server.log.close()
    got = [(int(i.rpartition(":")[2]), d) for i, d in head + rest if i]
    assert got[-1][1] != "[DONE]"
    return got


def uninterrupted(url: str, **body: Any) -> list[SseEvent]:
    _, events = start_stream(url, None, **body)
    return events


def test_a_killed_server_continues_the_stream_after_its_restart(continuing_env: dict[str, str], tmp_path: Path) -> None:
    head = crash_mid_stream(ServerProcess(continuing_env, tmp_path), "crash-1", 10)
    second = ServerProcess(continuing_env, tmp_path)
    try:
        events = head + resume(second.url, "crash-1", head[-1][0])
        assert_contiguous(events)  # no duplicate, no gap
        reference = uninterrupted(second.url)
        assert content_of(events) == content_of(reference) and len(content_of(reference).split()) == 1500
        assert finish_reason_of(events) == "length"
        assert httpx.get(second.url + "/health", timeout=10).json()["sessions_continued"] == 1
        assert "llm_sessions_continued_total 1.0" in httpx.get(second.url + "/metrics", timeout=10).text
        assert httpx.get(second.url + "/v1/sessions/crash-1", timeout=10).json()["state"] == "finished"
    finally:
        second.stop()
    log_text = (tmp_path / f"server-{second.port}.log").read_text()
    assert "1 session(s) continued, 0 interrupted" in log_text


def test_sigterm_leaves_streams_to_be_continued(continuing_env: dict[str, str], tmp_path: Path) -> None:
    head = crash_mid_stream(ServerProcess(continuing_env, tmp_path), "term-1", 10, how="sigterm")
    with sqlite3.connect(tmp_path / "sessions.db") as conn:
        assert conn.execute("SELECT state FROM sessions WHERE id = 'term-1'").fetchone() == ("running",)
    second = ServerProcess(continuing_env, tmp_path)
    try:
        events = head + resume(second.url, "term-1", head[-1][0])
        assert_contiguous(events)
        assert content_of(events) == content_of(uninterrupted(second.url))
    finally:
        second.stop()


def test_four_sessions_in_one_batch_all_continue(continuing_env: dict[str, str], tmp_path: Path) -> None:
    bodies = [{"messages": [{"role": "user", "content": f"Tell me about {topic}."}], "stream": True,
               "session_id": f"batch-{i}"} for i, topic in enumerate(["cats", "the sea", "Paris", "rain"])]  # fmt: skip
    heads = read_streams_then_kill(ServerProcess(continuing_env, tmp_path), bodies, 8)
    second = ServerProcess(continuing_env, tmp_path)
    try:
        assert httpx.get(second.url + "/health", timeout=10).json()["sessions_continued"] == 4
        for i, body in enumerate(bodies):
            events = heads[i] + resume(second.url, f"batch-{i}", heads[i][-1][0])
            assert_contiguous(events)
            reference = uninterrupted(second.url, **{k: v for k, v in body.items() if k != "session_id"})
            assert content_of(events) == content_of(reference), i
    finally:
        second.stop()


def test_a_seeded_sampled_stream_continues_with_the_same_draws(continuing_env: dict[str, str], tmp_path: Path) -> None:
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 1200}
    head = crash_mid_stream(ServerProcess(continuing_env, tmp_path), "seeded-1", 10, **sampled)
    second = ServerProcess(continuing_env, tmp_path)
    try:
        events = head + resume(second.url, "seeded-1", head[-1][0])
        assert_contiguous(events)
        reference = content_of(uninterrupted(second.url, **sampled))
        assert content_of(events) == reference
        assert reference != content_of(uninterrupted(second.url, **{**sampled, "seed": 12}))
    finally:
        second.stop()


CRASHING_SERVER = Path(__file__).parent / "crashing_server.py"


def ask_briefly(url: str) -> str:
    body = {"messages": QUESTION, "max_tokens": 3}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_a_request_that_crashes_every_attempt_is_ended_and_others_are_served(tmp_path: Path) -> None:
    env = {"PERSIST_SESSIONS": "1", "SESSIONS_DB_PATH": str(tmp_path / "s.db"), "CONTINUE_MAX_ATTEMPTS": "2"}
    server = ServerProcess(env, tmp_path, CRASHING_SERVER)
    assert ask_briefly(server.url) == "t0 t1 t2 "
    poison = {"messages": QUESTION, "stream": True, "session_id": "poison", "max_tokens": 13}
    url = server.url + "/v1/chat/completions"
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", url, json=poison, timeout=60) as response:
        list(response.iter_lines())  # the process dies under the stream
    assert server.proc.wait(30) == 3
    server.log.close()
    for _ in range(2):  # each restart continues it (one more token), and it crashes the server again
        server = ServerProcess(env, tmp_path, CRASHING_SERVER)
        assert httpx.get(server.url + "/health", timeout=10).json()["sessions_continued"] == 1
        assert ask_briefly(server.url) == "t0 t1 t2 "  # served meanwhile
        assert server.proc.wait(30) == 3
        server.log.close()
    server = ServerProcess(env, tmp_path, CRASHING_SERVER)  # the attempts are spent: ended, not continued
    try:
        assert httpx.get(server.url + "/health", timeout=10).json()["sessions_continued"] == 0
        events = resume(server.url, "poison", -1)
        assert_contiguous(events)
        assert content_of(events) == "t0 t1 t2 "  # one token per run: the first and each continuation
        assert json.loads(events[-2][1])["error"]["code"] == "interrupted"
        assert httpx.get(server.url + "/v1/sessions/poison", timeout=10).json()["state"] == "interrupted"
        assert ask_briefly(server.url) == "t0 t1 t2 "
    finally:
        server.stop()


NOTE_TOOL = {"type": "function", "function": {"name": "write_note", "parameters": {
    "type": "object", "required": ["note"], "additionalProperties": False,
    "properties": {"note": {"type": "string", "minLength": 3000}}}}}  # fmt: skip
# minLength: the forced call cannot close before max_tokens, so the crash lands inside its arguments


def arguments_of(events: list[SseEvent]) -> str:
    chunks = [json.loads(d) for _, d in events if d != "[DONE]"]
    return "".join(call["function"].get("arguments") or "" for chunk in chunks for choice in chunk.get("choices", [])
                   for call in choice["delta"].get("tool_calls") or [])  # fmt: skip


def test_a_forced_tool_call_streamed_at_the_crash_continues_inside_its_grammar(
    tiny_qwen_dirs: dict[str, Path], tmp_path: Path
) -> None:
    env = {"MODEL_REPO_ID": str(tiny_qwen_dirs["Qwen3-4B-Instruct-2507"]), "DEVICE_MAP": "cpu", "TEMPERATURE": "0",
           "PERSIST_SESSIONS": "1", "SESSIONS_DB_PATH": str(tmp_path / "s.db"), "MAX_TOKENS": "600"}  # fmt: skip
    forced = {"tools": [NOTE_TOOL], "tool_choice": "required"}
    head = crash_mid_stream(ServerProcess(env, tmp_path), "call-1", 12, **forced)
    assert arguments_of(head).startswith('{"note": "') and finish_reason_of(head) is None
    second = ServerProcess(env, tmp_path)
    try:
        events = head + resume(second.url, "call-1", head[-1][0])
        assert_contiguous(events)
        reference = uninterrupted(second.url, **forced)
        assert arguments_of(events) == arguments_of(reference) and len(arguments_of(reference)) > 600
        assert finish_reason_of(events) == finish_reason_of(reference) == "length"
        first_call = next(json.loads(d)["choices"][0]["delta"]["tool_calls"][0] for _, d in events[1:] if "id" in d)
        assert first_call["id"].startswith("call_")  # named once, before the crash; the rest continue it
    finally:
        second.stop()


# ---- the same with the real SmolLM2 --------------------------------------------------------------------------

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


@pytest.fixture
def smollm2_env(smollm2_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {"MODEL_REPO_ID": str(smollm2_dir), "DEVICE_MAP": "cpu", "TEMPERATURE": "0", "PERSIST_SESSIONS": "1",
            "SESSIONS_DB_PATH": str(tmp_path / "sessions.db"), "MAX_TOKENS": "96"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_smollm2_a_greedy_story_continues_after_a_restart_as_if_none_happened(
    smollm2_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    head = crash_mid_stream(ServerProcess(smollm2_env, tmp_path), "story-1", 10, how, messages=STORY)
    second = ServerProcess(smollm2_env, tmp_path)
    try:
        events = head + resume(second.url, "story-1", head[-1][0])
        assert_contiguous(events)
        reference = uninterrupted(second.url, messages=STORY)
        assert content_of(events) == content_of(reference) and len(content_of(reference)) > 300
        assert finish_reason_of(events) == finish_reason_of(reference)
    finally:
        second.stop()


@pytest.mark.slow
def test_smollm2_four_sessions_of_one_batch_continue_after_a_kill(smollm2_env: dict[str, str], tmp_path: Path) -> None:
    topics = ["a lighthouse keeper", "a cat that runs a bakery", "a garden on the moon", "the last train"]
    bodies = [{"messages": [{"role": "user", "content": f"Write a long story about {topic}."}], "stream": True,
               "session_id": f"four-{i}"} for i, topic in enumerate(topics)]  # fmt: skip
    heads = read_streams_then_kill(ServerProcess(smollm2_env, tmp_path), bodies, 6, timeout=120)
    second = ServerProcess(smollm2_env, tmp_path)
    try:
        assert httpx.get(second.url + "/health", timeout=10).json()["sessions_continued"] == 4
        continued = [heads[i] + resume(second.url, f"four-{i}", heads[i][-1][0]) for i in range(4)]
        references: dict[int, list[SseEvent]] = {}
        threads = [threading.Thread(target=lambda i=i: references.__setitem__(
            i, uninterrupted(second.url, messages=bodies[i]["messages"]))) for i in range(4)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for i, events in enumerate(continued):
            assert_contiguous(events)
            assert content_of(events) == content_of(references[i]), i
    finally:
        second.stop()


def responses_text(lines: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in lines if e["type"] == "response.output_text.delta")


def test_a_background_response_continues_after_a_kill(continuing_env: dict[str, str], tmp_path: Path) -> None:
    first = ServerProcess(continuing_env, tmp_path)
    body = {"input": "Tell me a story.", "background": True, "stream": True, "max_output_tokens": 1000}
    with httpx.stream("POST", first.url + "/v1/responses", json=body, timeout=60) as response:
        head = [json.loads(d) for _, d in itertools.islice(iter_sse(response), 12)]
        first.kill()
    response_id = head[0]["response"]["id"]
    second = ServerProcess(continuing_env, tmp_path)
    try:
        query = {"stream": "true", "starting_after": head[-1]["sequence_number"]}
        with httpx.stream("GET", f"{second.url}/v1/responses/{response_id}", params=query, timeout=60) as response:
            tail = [json.loads(d) for _, d in iter_sse(response)]
        events = head + tail
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.incomplete"  # max_output_tokens
        reference = httpx.post(second.url + "/v1/responses", json={**body, "background": False, "stream": False},
                               timeout=60).json()  # fmt: skip
        assert responses_text(events) == reference["output"][0]["content"][0]["text"]
        assert events[-1]["response"]["output"][0]["id"] == head[2]["item"]["id"]  # the item the client saw
    finally:
        second.stop()


def completion_text(events: list[SseEvent]) -> str:
    return "".join(c["text"] for _, d in events if d != "[DONE]" for c in json.loads(d).get("choices", []))


def test_a_legacy_completion_with_echo_and_two_choices_continues_after_a_kill(
    continuing_env: dict[str, str], tmp_path: Path
) -> None:
    first = ServerProcess(continuing_env, tmp_path)
    body = {"prompt": "Once upon a time", "max_tokens": 700, "n": 2, "echo": True, "logprobs": 1, "stream": True,
            "session_id": "legacy-1"}  # fmt: skip
    with httpx.stream("POST", first.url + "/v1/completions", json=body, timeout=60) as response:
        head = read_stream(response, "legacy-1", limit=10)
        first.kill()
    second = ServerProcess(continuing_env, tmp_path)
    try:
        headers = {"Last-Event-ID": f"legacy-1:{head[-1][0]}"}
        with httpx.stream("POST", second.url + "/v1/completions", headers=headers, timeout=60) as response:
            events = head + read_stream(response, "legacy-1")
        assert_contiguous(events)
        unsent = {k: v for k, v in body.items() if k != "session_id"}
        with httpx.stream("POST", second.url + "/v1/completions", json=unsent, timeout=60) as response:
            reference = read_stream(response, response.headers["x-session-id"])
        for choice in (0, 1):

            def mine(evs: list[SseEvent], c: int = choice) -> list[SseEvent]:
                return [(i, json.dumps({"choices": [x for x in json.loads(d)["choices"] if x["index"] == c]}))
                        for i, d in evs if d != "[DONE]" and json.loads(d).get("choices")]  # fmt: skip

            assert completion_text(mine(events)) == completion_text(mine(reference))
            assert completion_text(mine(events)).startswith("Once upon a time")  # the echo, once
    finally:
        second.stop()
