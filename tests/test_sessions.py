"""Sessions and the SQLite journal, without HTTP: ring buffer, store bounds, journal round trip, recovery."""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

import main
from conftest import make_settings

META = main.StreamMeta(completion_id="chatcmpl-1", created=1700000000, model="m", include_usage=False)


def test_journal_round_trip(tmp_path: Path) -> None:
    journal = main.SqliteJournal(tmp_path / "s.db")
    journal.record_session("abc", META, '{"messages": []}', 1700000000.5)
    for index, data in enumerate(['{"a": 1}', '{"b": 2}', main.DONE]):
        journal.record_event("abc", index, data)
    journal.record_state("abc", main.SessionState.FINISHED, 1700000001.0)
    stored = journal.load_session("abc")
    assert stored == main.StoredSession(
        id="abc",
        state="finished",
        meta=META,
        created_at=1700000000.5,
        ended_at=1700000001.0,
        events=[main.Event(0, '{"a": 1}'), main.Event(1, '{"b": 2}'), main.Event(2, "[DONE]")],
    )
    assert journal.read_events("abc", 1, 2) == [main.Event(1, '{"b": 2}')]
    assert journal.load_session("nope") is None
    journal.close()


def test_journal_schema_version_and_wal(tmp_path: Path) -> None:
    main.SqliteJournal(tmp_path / "s.db").close()
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA user_version").fetchone() == (len(main.JOURNAL_MIGRATIONS),)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert main.migrate_journal(conn) == len(main.JOURNAL_MIGRATIONS)  # idempotent on an up-to-date file


def test_recover_interrupted_appends_the_error_and_done(tmp_path: Path) -> None:
    journal = main.SqliteJournal(tmp_path / "s.db")
    journal.record_session("run", META, "{}", 1.0)
    journal.record_event("run", 0, '{"role": 1}')
    journal.record_event("run", 1, '{"content": 2}')
    journal.record_state("run", main.SessionState.RUNNING, None)
    journal.record_session("queued", META, "{}", 1.0)
    journal.record_session("done", META, "{}", 1.0)
    journal.record_event("done", 0, main.DONE)
    journal.record_state("done", main.SessionState.FINISHED, 2.0)
    journal.flush()
    assert sorted(journal.recover_interrupted(now=5.0).interrupted) == ["queued", "run"]
    run = journal.load_session("run")
    assert run is not None and run.state == "interrupted" and run.ended_at == 5.0
    assert [e.index for e in run.events] == [0, 1, 2, 3]
    assert json.loads(run.events[2].data) == main.make_interrupted_error()
    assert run.events[3].data == main.DONE
    queued = journal.load_session("queued")
    assert queued is not None and [e.index for e in queued.events] == [0, 1]
    done = journal.load_session("done")
    assert done is not None and done.state == "finished" and len(done.events) == 1
    journal.close()


def test_delete_ended_before_removes_sessions_and_events(tmp_path: Path) -> None:
    journal = main.SqliteJournal(tmp_path / "s.db")
    for name, ended in (("old", 10.0), ("new", 100.0)):
        journal.record_session(name, META, "{}", 1.0)
        journal.record_event(name, 0, main.DONE)
        journal.record_state(name, main.SessionState.FINISHED, ended)
    journal.record_session("running", META, "{}", 1.0)
    assert journal.delete_ended_before(50.0) == 1
    assert journal.load_session("old") is None
    assert journal.read_events("old", 0, 10) == []
    assert journal.load_session("new") is not None and journal.count_sessions() == 2
    journal.close()


def test_a_failed_write_disables_the_journal_instead_of_raising(tmp_path: Path) -> None:
    journal = main.SqliteJournal(tmp_path / "s.db")
    journal.record_event("x", 0, "a")
    journal._put("INSERT INTO missing_table VALUES (?)", (1,))
    journal.flush()
    assert journal.error is not None and "missing_table" in journal.error
    journal.record_event("x", 5, "after")  # dropped, not raised
    journal.close()


def fail_the_store(session: main.Session) -> None:
    main.end_for_store_failure(stub_state(session))


@pytest.mark.parametrize(("end", "code"), [(main.interrupt_session, "interrupted"),
                                           (fail_the_store, "session_store_unavailable")])  # fmt: skip
def test_nothing_follows_the_done_of_a_session_ended_under_its_runner(
    end: Callable[[main.Session], None], code: str
) -> None:
    """A store failure or a shutdown ends a running session (error, [DONE]) and cancels its runner, which then
    closes its choice as the engine stops: that cancelled finish, the usage and a second [DONE] came after the
    first [DONE] (the flake of test_redis_going_away: a fast reader saw them), and the state became cancelled."""
    session = main.Session("s", META, 16)
    session.set_state(main.SessionState.RUNNING)
    session.append("content")
    end(session)
    ended = [e.data for e in session.buffer.read_from(0)]
    assert ended[0] == "content" and json.loads(ended[1])["error"]["code"] == code
    assert ended[2:] == [main.DONE] and session.cancel.is_set()
    assert session.append("the runner's cancelled finish") == 2
    session.finish(main.SessionState.CANCELLED)
    assert [e.data for e in session.buffer.read_from(0)] == ended and session.state == main.SessionState.INTERRUPTED


def stub_state(session: main.Session) -> main.AppState:
    """What end_for_store_failure reads of the app: its sessions."""
    return cast(main.AppState, SimpleNamespace(store=SimpleNamespace(sessions={session.key: session})))


def test_store_evicts_expired_then_oldest_ended_never_running() -> None:
    async def scenario() -> list[str]:
        store = main.SessionStore(make_settings(max_sessions=3, sessions_ttl_seconds=100))
        sessions = [store.create(META, f"s{i}", "{}") for i in range(3)]
        now = time.time()
        sessions[0].set_state(main.SessionState.FINISHED)
        sessions[0].ended_at = now - 50
        sessions[1].set_state(main.SessionState.RUNNING)
        sessions[2].set_state(main.SessionState.FINISHED)
        sessions[2].ended_at = now - 20
        store.evict(now=now)  # nothing expired and 3 sessions fit the cap of 3
        assert sorted(store.sessions) == ["s0", "s1", "s2"]
        store.create(META, "s3", "{}")  # at the cap: the oldest ended (s0) goes
        assert sorted(store.sessions) == ["s1", "s2", "s3"]
        store.evict(now=now + 90)  # s2 expired (ended 110 s before > ttl 100); s1 runs, s3 is new
        return sorted(store.sessions)

    assert asyncio.run(scenario()) == ["s1", "s3"]


def test_session_restore_rebuilds_the_ring_without_journaling_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        journal = main.SqliteJournal(tmp_path / "s.db")
        events = [main.Event(i, f"e{i}") for i in range(20)]
        stored = main.StoredSession("r", "finished", META, 1.0, 2.0, events)
        session = main.Session.restore(stored, capacity=16, journal=journal)
        assert (session.buffer.first_index, session.buffer.next_index) == (4, 20)
        assert session.ended and session.state == "finished"
        journal.flush()
        assert journal.read_events("r", 0, 100) == []  # restoring wrote nothing
        journal.close()

    asyncio.run(scenario())


def test_read_events_falls_back_to_the_journal_for_dropped_events(tmp_path: Path) -> None:
    async def scenario() -> list[main.Event]:
        journal = main.SqliteJournal(tmp_path / "s.db")
        session = main.Session("j", META, capacity=16, journal=journal)
        for i in range(40):
            session.append(f"e{i}")
        assert session.buffer.first_index == 24
        await asyncio.to_thread(journal.flush)
        await asyncio.sleep(0.05)  # the commit callbacks reach the loop
        events = await main.read_events(session, 10)
        journal.close()
        return events

    assert asyncio.run(scenario()) == [main.Event(i, f"e{i}") for i in range(10, 40)]


@pytest.mark.parametrize(
    ("steps", "first_index", "length"),
    [
        ([("append", 10)], 6, 4),  # no reader: the last `capacity` events
        ([("hold", 0), ("append", 10)], 0, 10),  # a reader at 0 keeps all it has not read
        ([("hold", 2), ("append", 10)], 2, 8),
        ([("hold", 0), ("append", 10), ("hold", 5)], 5, 5),  # read up to 5: those go, down to capacity at most
        ([("hold", 0), ("append", 10), ("hold", 9)], 6, 4),
        ([("hold", 0), ("append", 10), ("release", 0)], 6, 4),
        ([("hold", 0), ("append", 3), ("release", 0), ("append", 2)], 1, 4),
        ([("hold", 0), ("append", 10), ("forget", 0), ("append", 1)], 7, 4),  # a cursor gone unreleased holds nothing
    ],
)
def test_ring_keeps_what_an_attached_reader_has_not_read(steps: list[tuple[str, int]], first_index: int,
                                                         length: int) -> None:  # fmt: skip
    ring, cursor = main.RingBuffer(capacity=4), main.ReadCursor()
    for action, n in steps:
        if action == "append":
            for _ in range(n):
                ring.append("e")
        elif action == "hold":
            ring.hold(cursor, n)
        elif action == "release":
            ring.release(cursor)
        else:
            del cursor
            gc.collect()
    assert (ring.first_index, ring.next_index - ring.first_index) == (first_index, length)


def test_a_burst_larger_than_the_ring_reaches_a_live_reader_whole() -> None:
    """The runner can append many events before a reader task runs (it drains its queue without yielding). Without
    a journal those used to be gone: the stream ended in `events_expired` (a CI flake with a 16-event ring)."""

    async def scenario() -> list[int]:
        session = main.Session("b", META, capacity=16)
        watch = main.DisconnectWatch(0, main.Metrics())
        cursor = main.ReadCursor()
        session.buffer.hold(cursor, 0)  # what sse_response does when it creates the response
        reader = main.read_session(session, -1, 5.0, watch, cursor)
        for i in range(40):
            session.append(f"e{i}")
        session.set_state(main.SessionState.FINISHED)
        indices = [event.index async for event in reader if event is not None]
        assert session.buffer.first_index == 24  # once read, the ring is back to its capacity
        return indices

    assert asyncio.run(scenario()) == list(range(40))


def test_a_ring_that_moves_on_during_a_journal_read_loses_nothing(tmp_path: Path) -> None:
    """A resumed reader behind the ring reads the journal in a thread while generation goes on. Its cursor keeps
    the ring from dropping past it meanwhile, so the journal's part and the ring's part meet (this race once ended
    a live stream in an error on CI)."""

    async def scenario() -> list[int]:
        journal = main.SqliteJournal(tmp_path / "s.db")
        session = main.Session("m", META, capacity=16, journal=journal)
        for i in range(40):
            session.append(f"e{i}")
        await asyncio.to_thread(journal.flush)
        await asyncio.sleep(0.05)  # the commit callbacks reach the loop
        reading, go_on = threading.Event(), threading.Event()
        read = journal.read_events

        def held_read(session_id: str, start: int, stop: int) -> list[main.Event]:
            reading.set()
            go_on.wait(10)
            return read(session_id, start, stop)

        journal.read_events = held_read  # type: ignore[method-assign]
        reader = main.read_session(session, 9, 5.0, main.DisconnectWatch(0, main.Metrics()), main.ReadCursor())
        first = asyncio.create_task(anext(reader))
        await asyncio.to_thread(reading.wait, 10)
        for i in range(40, 60):  # generation goes on: 20 more into a 16-event ring that starts at 24
            session.append(f"e{i}")
        session.set_state(main.SessionState.FINISHED)
        go_on.set()
        head = await first
        indices = [head.index] + [event.index async for event in reader if event is not None]
        journal.close()
        return indices

    assert asyncio.run(scenario()) == list(range(10, 60))


def test_read_events_without_journal_is_gone() -> None:
    async def scenario() -> None:
        session = main.Session("g", META, capacity=16)
        for i in range(40):
            session.append(f"e{i}")
        with pytest.raises(main.EventsGone):
            await main.read_events(session, 3)

    asyncio.run(scenario())


def test_with_a_journal_events_are_readable_only_once_committed(tmp_path: Path) -> None:
    """Write-ahead: a client never receives an event a crash could take back."""

    async def scenario() -> None:
        journal = main.SqliteJournal(tmp_path / "s.db")
        commit_allowed = threading.Event()
        commit = journal._commit

        def held_commit(ops: list[main.JournalOp]) -> None:
            commit_allowed.wait(10)
            commit(ops)

        journal._commit = held_commit  # type: ignore[method-assign]
        session = main.Session("w", META, capacity=16, journal=journal)
        session.append("e0")
        session.append("e1")
        assert session.readable_end == 0
        assert await main.read_events(session, 0) == []
        assert await session.wait_for_events(0, 0.05) is False  # nothing to send yet: a keep-alive tick
        commit_allowed.set()
        assert await session.wait_for_events(0, 5) is True
        await asyncio.sleep(0.05)
        assert await main.read_events(session, 0) == [main.Event(0, "e0"), main.Event(1, "e1")]
        journal.close()

    asyncio.run(scenario())


# ---- issue 13: the journal's edges ------------------------------------------------------------------------------


def test_done_and_the_final_state_are_one_journal_operation(tmp_path: Path) -> None:
    """run_generation used to journal [DONE] and the state as two operations; a crash between two batches left
    [DONE] under a running session, and recovery appended an error and a second [DONE]."""

    async def scenario() -> list[main.JournalOp]:
        journal = main.SqliteJournal(tmp_path / "s.db")
        queued: list[main.JournalOp] = []
        put = journal._put_op
        journal._put_op = lambda op: (queued.append(op), put(op))  # type: ignore[method-assign, func-returns-value]
        session = main.Session("s", META, 16, journal)
        session.finish(main.SessionState.FINISHED)
        await asyncio.to_thread(journal.flush)
        journal.close()
        return queued

    (op,) = asyncio.run(scenario())
    assert [sql.split()[0] for sql, _ in op.statements] == ["INSERT", "UPDATE", "DELETE"]  # DELETE: its steps
    assert op.statements[0][1] == ("s", 0, main.DONE) and op.statements[1][1][0] == "finished"


def test_recovery_treats_a_session_whose_last_event_is_done_as_ended(tmp_path: Path) -> None:
    """A journal written before the fix (or by any path that lost only the state) never gets a second [DONE]."""
    journal = main.SqliteJournal(tmp_path / "s.db")
    journal.record_session("ended", META, "{}", 1.0)
    for index, data in enumerate(['{"a": 1}', main.DONE]):
        journal.record_event("ended", index, data)
    journal.record_state("ended", main.SessionState.RUNNING, None)
    journal.flush()
    assert journal.recover_interrupted(now=5.0).interrupted == []
    ended = journal.load_session("ended")
    assert ended is not None and (ended.state, ended.ended_at) == ("finished", 5.0)
    assert [e.data for e in ended.events] == ['{"a": 1}', main.DONE]
    journal.close()


def test_events_that_never_reached_a_failed_journal_are_marked_and_dropped_at_recovery(tmp_path: Path) -> None:
    """After the journal fails mid-stream, events are still sent. The first index that never reached the file is
    marked (once the disk takes a write again) and recovery drops what is past it instead of appending the
    interrupted tail at indices clients already hold as content."""
    journal = main.SqliteJournal(tmp_path / "s.db")
    journal.record_session("s", META, "{}", 1.0)
    journal.record_state("s", main.SessionState.RUNNING, None)
    for index in range(3):
        journal.record_event("s", index, f'{{"i": {index}}}')
    journal.flush()
    journal._put("INSERT INTO missing_table VALUES (?)", (1,))  # the failure (a full disk, say)
    journal.record_event("s", 3, '{"i": 3}')  # in the failing batch or dropped after it: lost either way
    journal.flush()
    journal.record_event("s", 4, '{"i": 4}')
    assert journal.error is not None and journal.lost_from == {"s": 3}
    journal.close()  # writes the mark on a connection of its own
    reopened = main.SqliteJournal(tmp_path / "s.db")
    assert reopened.recover_interrupted(now=9.0).interrupted == ["s"]
    stored = reopened.load_session("s")
    assert stored is not None and (stored.state, stored.lost_from) == ("interrupted", 3)
    assert [e.data for e in stored.events] == ['{"i": 0}', '{"i": 1}', '{"i": 2}']  # no tail at 3, 4, ...
    reopened.close()


def test_store_find_reads_sqlite_after_a_journal_failure(tmp_path: Path) -> None:
    """After a failed write, `find` ignored SQLite, so a session from before the restart became a 404."""
    journal = main.SqliteJournal(tmp_path / "s.db")
    journal.record_session("old", META, "{}", 1.0)
    journal.record_event("old", 0, main.DONE)
    journal.record_state("old", main.SessionState.FINISHED, 2.0)
    journal.flush()
    journal.error = "session journal failed: database or disk is full"
    store = main.SessionStore(make_settings())
    store.journal = journal
    found = asyncio.run(store.find("old"))
    journal.close()
    assert found is not None and found.state == "finished" and found.buffer.next_index == 1


def test_a_failed_journal_takes_writes_again_once_its_loss_marks_are_written(tmp_path: Path) -> None:
    """Issue 28: both journals share one writer and one failure semantics. SQLite used to stay failed until a
    restart while Redis recovered; now either marks what it lost, then writes again."""
    journal = main.SqliteJournal(tmp_path / "s.db")
    journal.record_session("s", META, "{}", 1.0)
    journal.flush()
    journal._put("INSERT INTO missing_table VALUES (?)", (1,))  # the failure (a full disk, say)
    journal.record_event("s", 0, "lost")
    journal.flush()
    assert journal.error is not None and journal.lost_from == {"s": 0}
    assert journal.write_loss_marks() is True
    assert journal.error is None and journal.lost_from == {}
    journal.record_event("s", 1, "kept")
    stored = journal.load_session("s")
    assert stored is not None and stored.lost_from == 0 and [e.data for e in stored.events] == ["kept"]
    journal.close()


def test_events_written_while_the_journal_failed_stay_readable_once_it_recovers(tmp_path: Path) -> None:
    """The events appended while the store was failed were handed out (`readable_end` is the ring's end then) but
    never committed: once the store took writes again, `readable_end` fell back to the last committed index, and a
    resume of a session that ended in the outage (the Redis test's error and [DONE]) waited forever."""

    async def scenario() -> tuple[int, list[str]]:
        journal = main.SqliteJournal(tmp_path / "s.db")
        session = main.Session("s", META, 16, journal)
        session.append("committed")
        await asyncio.to_thread(journal.flush)
        journal._put("INSERT INTO missing_table VALUES (?)", (1,))  # the failure
        await asyncio.to_thread(journal.flush)
        session.append("sent in the outage")
        session.finish(main.SessionState.INTERRUPTED)
        assert journal.write_loss_marks() is True and journal.error is None
        await asyncio.sleep(0)  # the commit callbacks run on the loop
        events = [e.data for e in await main.read_events(session, 0)]
        journal.close()
        return session.readable_end, events

    assert asyncio.run(scenario()) == (3, ["committed", "sent in the outage", main.DONE])
