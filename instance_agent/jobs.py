"""The per-chunk runner of compress, decompress and the like: a bounded window of chunks in
flight on the codec pool, each under its chunk's lock, reported as it finishes, then the totals."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from .keys import ChunkSpan
from .lifecycle import AgentCore
from .results import ChunkOutcome, ChunkProgress, OperationResult, Progress
from .storage import StorageBackend

logger = logging.getLogger(__name__)

MAX_ERRORS_IN_MESSAGE = 5


def summarize_errors(operation: str, method: str, location: str, total: int, errors: list[str]) -> str:
    """One line for the final message: how many chunks failed, and the first few reasons."""
    if not errors:
        return ""
    shown = "; ".join(errors[:MAX_ERRORS_IN_MESSAGE]) + ("; ..." if len(errors) > MAX_ERRORS_IN_MESSAGE else "")
    return f"{len(errors)} of {total} chunks failed ({operation} {method or 'any'} in {location}); {shown}"


class JobRunner(AgentCore):
    async def _run_chunks(self, operation: str, method: str, backend: StorageBackend, spans: list[ChunkSpan],
                          event_id: str, work: Callable[[ChunkSpan], ChunkOutcome]) -> AsyncIterator[Progress]:
        """Run ``work(span)`` for each chunk, a few chunks at a time, reporting each as it finishes."""
        total_before = total_after = 0
        done = 0
        errors: list[tuple[int, str]] = []
        todo = iter(spans)
        running: set[asyncio.Future[tuple[ChunkSpan, ChunkOutcome]]] = set()

        async def one(span: ChunkSpan) -> tuple[ChunkSpan, ChunkOutcome]:
            async with self._locks.hold((backend.name, span.key)):
                return span, await self._run_codec(work, span)

        def refill() -> None:
            # A bounded window: enough chunks in flight to keep the codec threads busy, few
            # enough that their raw and encoded copies stay small.
            while len(running) < self.chunk_parallelism:
                span = next(todo, None)
                if span is None:
                    return
                running.add(asyncio.ensure_future(one(span)))

        # The operation's chunks are not evicted while it runs (a decompress growing one chunk must
        # not push out the next); the guard goes when the stream ends, however it ends.
        guard = backend.protecting([span.key for span in spans])
        guard.__enter__()
        refill()
        try:
            while running:
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(finished, key=lambda t: t.result()[0].index):
                    running.discard(task)
                    span, outcome = task.result()
                    self._count(operation, method or outcome.method, backend.name, outcome)
                    if outcome.error:
                        errors.append((span.index, f"chunk {span.index}: {outcome.error}"))
                        logger.warning("%s %s chunk %d (%s) in %s failed: %s", operation, event_id, span.index,
                                       span.key, backend.name, outcome.error)
                    else:
                        done += 1
                        total_before += outcome.bytes_before
                        total_after += outcome.bytes_after
                    yield ChunkProgress(self.worker_id, span.index, span.key, span.start, span.end,
                                        outcome.bytes_before, outcome.bytes_after, outcome.codec_seconds,
                                        outcome.skipped, outcome.error)
                self._refresh_storage_metrics()
                refill()
        finally:
            # The caller went away (stream cancelled): let the chunks in flight finish their swap
            # before their locks go, and start no more.
            if running:
                await asyncio.gather(*running, return_exceptions=True)
                self._refresh_storage_metrics()
            guard.__exit__(None, None, None)
        texts = [text for _, text in sorted(errors)]
        yield OperationResult(num_tokens=spans[-1].end if spans else 0, chunks_total=len(spans), chunks_done=done,
                              chunks_failed=len(texts), bytes_before=total_before, bytes_after=total_after,
                              error=summarize_errors(operation, method, backend.name, len(spans), texts),
                              errors=tuple(texts))

    def _count(self, operation: str, method: str, location: str, outcome: ChunkOutcome) -> None:
        m = self.metrics
        result = "failed" if outcome.error else "skipped" if outcome.skipped else "ok"
        m.chunks.labels(operation, method, location, result).inc()
        if result != "ok":
            return
        m.codec_seconds.labels(operation, method).observe(outcome.codec_seconds)
        m.codec_input_bytes.labels(operation, method).inc(outcome.bytes_before)
        m.codec_output_bytes.labels(operation, method).inc(outcome.bytes_after)
        if operation == "compress" and outcome.bytes_after > 0:
            m.compression_ratio.labels(method).observe(outcome.bytes_before / outcome.bytes_after)
