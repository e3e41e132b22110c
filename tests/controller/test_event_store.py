"""Events persist in SQLite (WAL): a new table on the same file finds them; events that were in flight
end FAILED with the restart as their reason; the file stays as bounded as the table."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmesh.api.common.v1 import common_pb2
from kvmesh.controller import events as events_module
from kvmesh.controller.events import RESTARTED, EventStore, EventTable, event_db_path
from kvmesh.controller.metrics import ControllerMetrics

from .harness import ControllerThread


def rows(path: Path) -> dict[str, float]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT event_id, finished_time FROM events"))


async def test_events_survive_a_new_table_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    t = EventTable(ControllerMetrics())
    t.attach_store(EventStore(path))
    done = t.create(common_pb2.COMPRESS, instance_id="i", method="lossless", location="L", worker_ids=[0])
    t.start(done.event_id, {0: 1})
    t.chunk_done(done.event_id, common_pb2.ChunkProgress(worker_id=0, chunk_index=0, bytes_before=100,
                                                         bytes_after=25))
    t.worker_finished(done.event_id, 0)
    t.finish(done.event_id, common_pb2.COMPLETED)
    running = t.create(common_pb2.DECOMPRESS, instance_id="i", worker_ids=[0, 1])
    t.start(running.event_id, {0: 3, 1: 3})
    await t.flush()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert set(rows(path)) == {done.event_id, running.event_id}
    # A crash: no close, no final flush. A second table on the file loads both.
    again = EventTable(ControllerMetrics())
    assert again.attach_store(EventStore(path)) == 2
    got = again.get(done.event_id)
    assert got.status == common_pb2.COMPLETED and got.compression_ratio == pytest.approx(4.0)
    lost = again.get(running.event_id)
    assert lost.status == common_pb2.FAILED and lost.error == RESTARTED and lost.finished_time > 0
    assert all(w.status == common_pb2.FAILED and w.error == RESTARTED for w in lost.workers)
    assert again.in_flight() == []
    # The new verdict is written back.
    await again.close_store()
    assert rows(path)[running.event_id] > 0
    await t.close_store()


async def _finish_pins(t: EventTable, n: int, trim: bool | None = None,
                       after_each: Callable[[list[str]], None] | None = None) -> list[str]:
    """``n`` pin events created and completed one after the other, the store flushed after each (``trim``
    passed on when given; ``after_each`` called with the ids so far); returns their ids in order."""
    ids: list[str] = []
    for _ in range(n):
        ev = t.create(common_pb2.PIN, instance_id="i")
        t.finish(ev.event_id, common_pb2.COMPLETED)
        ids.append(ev.event_id)
        await (t.flush() if trim is None else t.flush(trim=trim))
        if after_each is not None:
            after_each(ids)
    return ids


async def test_store_is_bounded_like_the_table(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    t = EventTable(ControllerMetrics(), max_events=5)
    t.attach_store(EventStore(path))
    ids = await _finish_pins(t, 20)
    # The count bound is trimmed about once a second, and on demand.
    assert len(rows(path)) <= 20
    await t.flush(trim=True)
    assert set(rows(path)) == set(ids[-5:])
    await t.close_store()


async def test_every_write_drops_the_rows_of_events_the_table_dropped(tmp_path: Path) -> None:
    """No count trim needed: each write's one range delete leaves exactly the events still held."""
    path = tmp_path / "events.sqlite3"
    t = EventTable(ControllerMetrics(), max_events=5)
    t.attach_store(EventStore(path))

    def held_exactly_the_last_five(ids: list[str]) -> None:
        assert set(rows(path)) == set(ids[-5:])

    ids = await _finish_pins(t, 20, trim=False, after_each=held_exactly_the_last_five)
    running = t.create(common_pb2.PIN, instance_id="i")  # in flight: never dropped from the store
    await t.flush(trim=False)
    assert set(rows(path)) == {*ids[-4:], running.event_id}
    await t.close_store()


class SteppingClock:
    """``time`` for the events module with a wall clock the test sets (monotonic stays real)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.monotonic = time.monotonic

    def time(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return int(self.now * 1e9)


async def test_a_wall_clock_stepped_back_keeps_every_held_event_in_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SteppingClock(1_000_000.0)
    monkeypatch.setattr(events_module, "time", clock)
    path = tmp_path / "events.sqlite3"
    t = EventTable(ControllerMetrics(), max_events=5)
    t.attach_store(EventStore(path))
    ids = []
    for step in (0.0, 1.0, 2.0, -500.0, 1.0):  # the clock steps back by 500 s before the fourth
        clock.now += step
        ev = t.create(common_pb2.PIN, instance_id="i")
        t.finish(ev.event_id, common_pb2.COMPLETED)
        ids.append(ev.event_id)
        await t.flush()
    # The two events that ended "before" the held ones are held too: their rows stay.
    assert set(rows(path)) == set(ids)
    for _ in range(3):  # the table drops the three oldest; every event it holds keeps its row
        clock.now += 1.0
        ev = t.create(common_pb2.PIN, instance_id="i")
        t.finish(ev.event_id, common_pb2.COMPLETED)
        ids.append(ev.event_id)
        await t.flush()
    held = {ev.event_id for ev in t.recent()}
    assert held == set(ids[3:]) and held <= set(rows(path))
    await t.close_store()


def test_default_path_is_under_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMESH_STATE_DIR", str(tmp_path / "state"))
    assert event_db_path("", "", 9001) == tmp_path / "state" / "controller-events-9001.sqlite3"
    assert event_db_path("", str(tmp_path / "s2"), 9001) == tmp_path / "s2" / "controller-events-9001.sqlite3"
    assert event_db_path("", "", 0) is None  # a free port each start: no stable name
    assert event_db_path(":memory:", "", 9001) is None
    assert event_db_path(str(tmp_path / "x.db"), "", 1) == tmp_path / "x.db"


def test_in_process_controller_keeps_events_across_a_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "ctl.sqlite3")
    with ControllerThread(event_db=db) as c:
        c.register("inst", 0)
        r = c.post("/compress", {"instance_id": "inst", "method": "lossless", "location": "LocalCPUBackend"})
        event_id = r.body["event_id"]
    with ControllerThread(event_db=db) as c:
        got = c.http("GET", f"/events/{event_id}")
        assert got.status == 200 and got.body["event"]["status"] == "COMPLETED"
        assert c.post("/check_finish", {"event_id": event_id}).body["status"] == "COMPLETED"


def test_unwritable_event_db_is_a_clear_start_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    c = ControllerThread(event_db=str(blocker / "sub" / "ctl.sqlite3"))
    try:
        with pytest.raises(OSError, match="cannot open the event database .*--event-db"):
            c.start()
    finally:
        c.stop()
