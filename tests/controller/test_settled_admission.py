"""Events with nothing to do end at admission, and only when the controller's index really knows it: every
chunk asked for was last reported (in an event's progress) in the asked form, none reported again or
evicted since, and no event runs on the worker. Otherwise the agent is asked, as before."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.common.v1 import common_pb2
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.core.keys import chunk_spans

from .harness import ControllerThread
from .scripted_agent import ScriptedAgent, chunk, final

LOC = "LocalCPUBackend"
CHUNK = 16
TOKENS = list(range(4 * CHUNK))


class CountingAgent(ScriptedAgent):
    """Streams every chunk asked for as done (``error_at``: that chunk fails), counting the streams."""

    def __init__(self) -> None:
        super().__init__(CHUNK)
        self.streams = 0
        self.error_at: int | None = None
        self.hold_next = False
        self.script = self._all

    async def _all(self, request: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        self.streams += 1
        if self.hold_next:
            self.hold_next = False
            async for msg in self._hold(request):
                yield msg
            return
        n = len(request.tokens)
        chunks = -(-n // CHUNK)
        for i in range(chunks):
            yield chunk(i, CHUNK, n, error="disk full" if i == self.error_at else "")
        failed = int(self.error_at is not None and self.error_at < chunks)
        yield final(n, chunks, chunks - failed, error="1 chunk failed" if failed else "")


@pytest.fixture
def agent() -> Iterator[CountingAgent]:
    with CountingAgent() as a:
        yield a


@pytest.fixture
def c(agent: CountingAgent) -> Iterator[ControllerThread]:
    with ControllerThread() as ctl:
        ctl.register("inst", 0, port=agent.port, chunk_size=CHUNK)
        report(ctl, [(pb.ADMIT, s.key) for s in chunk_spans(TOKENS, CHUNK)], full_resync=True)
        yield ctl


def report(c: ControllerThread, events: list[tuple[int, str]], full_resync: bool = False) -> None:
    """A KV report from the worker, as its agent sends them (the index is complete after a full resync)."""
    c.stub.ReportKVEvents(pb.ReportKVEventsRequest(
        instance_id="inst", worker_id=0, secret=c.secret(), full_resync=full_resync,
        events=[pb.KVEvent(type=t, location=LOC, chunk_key=k, token_end=(i + 1) * CHUNK)
                for i, (t, k) in enumerate(events)]), timeout=10)


def run(c: ControllerThread, rpc: str = "compress", method: str = "lossless") -> pb.WatchEventResponse:
    body = {"instance_id": "inst", "location": LOC, "tokens": TOKENS, "method": method}
    r = c.post(f"/{rpc}", body)
    assert r.status == 200, r.body
    assert r.body["num_tokens"] == len(TOKENS)
    return c.wait_event(r.body["event_id"])


def answered_from_index(c: ControllerThread, operation: str = "compress") -> float:
    assert c.server is not None
    return c.server.metrics.registry.get_sample_value(
        "kvmesh_events_answered_from_index_total", {"operation": operation}) or 0.0


def test_a_compress_of_chunks_already_in_that_form_ends_without_the_agent(c: ControllerThread,
                                                                          agent: CountingAgent) -> None:
    first = run(c)
    assert first.event.status == common_pb2.COMPLETED and agent.streams == 1
    assert answered_from_index(c) == 0
    again = run(c)
    # The agent was not asked; the event says what the agent would have: every chunk already so.
    assert agent.streams == 1 and answered_from_index(c) == 1
    ev = again.event
    assert ev.status == common_pb2.COMPLETED and not ev.error
    assert (ev.chunks_done, ev.chunks_failed, ev.chunks_total) == (4, 0, 4)
    assert (ev.bytes_before, ev.bytes_after) == (0, 0)  # skipped chunks move no bytes
    assert ev.workers[0].status == common_pb2.COMPLETED and ev.workers[0].chunks_done == 4
    done = c.post("/check_finish", {"event_id": ev.event_id}).body
    assert (done["status"], done["chunks_done"], done["chunks_total"]) == ("COMPLETED", 4, 4)
    # Another method: the chunks are not in that form, the agent is asked.
    run(c, method="cachegen")
    assert agent.streams == 2 and answered_from_index(c) == 1


def test_decompress_of_raw_chunks_ends_without_the_agent(c: ControllerThread, agent: CountingAgent) -> None:
    run(c)  # lossless now
    run(c, "decompress", method="")  # the agent decodes them: raw now
    assert agent.streams == 2
    run(c, "decompress", method="")
    assert agent.streams == 2 and answered_from_index(c, "decompress") == 1
    run(c)  # raw chunks: compress asks the agent
    assert agent.streams == 3


def test_what_the_index_does_not_know_goes_to_the_agent(c: ControllerThread, agent: CountingAgent) -> None:
    """A form is forgotten when its chunk is reported again, evicted or fails; never guessed."""
    keys = [s.key for s in chunk_spans(TOKENS, CHUNK)]
    run(c)  # never compressed through this controller before: the agent is asked
    assert agent.streams == 1
    # Chunk 2 reported admitted again (a new chunk under that key, form unknown).
    report(c, [(pb.ADMIT, keys[2])])
    run(c)
    assert agent.streams == 2 and answered_from_index(c) == 0
    # Evicted and admitted again: unknown. The agent is asked, and chunk 1 fails there: its form is
    # unknown now (the old one may or may not stand).
    report(c, [(pb.EVICT, keys[3]), (pb.ADMIT, keys[3])])
    agent.error_at = 1
    assert run(c).event.status == common_pb2.FAILED
    assert agent.streams == 3
    agent.error_at = None
    run(c)
    assert agent.streams == 4
    run(c)  # now everything is known to be lossless
    assert agent.streams == 4 and answered_from_index(c) == 1
    # A full resync (the agent registered again) forgets every form.
    report(c, [(pb.ADMIT, k) for k in keys], full_resync=True)
    run(c)
    assert agent.streams == 5


def test_no_answer_from_the_index_while_an_event_runs_on_the_worker(c: ControllerThread,
                                                                    agent: CountingAgent) -> None:
    """A running event may be changing the chunks (a decompress): admission then asks the agent."""
    run(c)
    assert agent.streams == 1
    agent.release.clear()
    agent.hold_next = True  # the next stream stays open until released
    running = c.post("/decompress", {"instance_id": "inst", "location": LOC, "tokens": TOKENS})
    assert running.status == 200
    r = c.post("/compress", {"instance_id": "inst", "location": LOC, "tokens": TOKENS, "method": "lossless"})
    assert r.status == 200
    agent.release.set()
    assert c.wait_event(r.body["event_id"]).event.status == common_pb2.COMPLETED
    assert agent.streams == 3 and answered_from_index(c) == 0
    c.wait_event(running.body["event_id"])
