"""Request batching: rows with the same recipe settings decode together, in one worker thread.

The event loop only enqueues rows and awaits their results; the model runs in the worker (torch
is not re-entrant across requests, and a step of decoding must never block the loop). A batch
starts when it has `max_batch` rows or its oldest row has waited `window_s`, whichever comes
first; while a batch decodes, new rows queue for the next one. Among waiting groups the one with
the oldest row goes first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict

import attrs
import torch

from ..api import Pipeline
from ..core.streaming import GenerationCancelled
from .metrics import Metrics
from .requests import RequestError, RowSpec

PIPELINES_KEPT = 8  # recipes (after per-request settings) whose plugin stacks stay built


@attrs.define(eq=False)
class RowResult:
    answer: list[int]  # answer token ids, cut before the first stop token
    text: str | None  # the answer text, cut at stop strings
    finish_reason: str  # "stop": a stop token or string ended it; "length": the canvas filled up
    nfe: int
    batch_size: int


@attrs.define(eq=False)
class Row:
    """A RowSpec on its way through the scheduler; results come back on the request's event loop."""

    spec: RowSpec
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future  # resolves to a RowResult (or a RequestError / exception)
    # streaming rows get ("step", index, PromptStep) items here; None for plain requests
    events: asyncio.Queue | None = None
    arrived: float = attrs.Factory(time.monotonic)
    cancelled: bool = False  # the client is gone: drop the row; a batch of only such rows stops

    def finish(self, value) -> None:
        """Hand the row's RowResult (or error) to its request; a stream also gets a "done" item."""
        self.deliver(_resolve, self.future, value)
        if self.events is not None:
            self.deliver(self.events.put_nowait, ("done", self.spec.index, None))

    def deliver(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (shutdown): nobody waits any more
            pass


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


class BatchScheduler:
    def __init__(self, model, max_batch: int, window_s: float, max_queue: int, metrics: Metrics,
                 threads: int | None = None):
        self.model, self.threads = model, threads
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self.metrics = metrics
        self._groups: OrderedDict[str, list[Row]] = OrderedDict()
        self._queued = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._pipelines: OrderedDict[str, Pipeline] = OrderedDict()
        self._thread = threading.Thread(target=self._work, name="dare-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- event loop side ------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> None:
        with self._cond:
            if self._stopping:
                raise RequestError(503, "the server is shutting down", kind="server_shutting_down")
            if self._queued + len(rows) > self.max_queue:
                raise RequestError(429, f"the queue is full ({self._queued} rows waiting; --max-queue "
                                   f"{self.max_queue}); retry later", kind="rate_limit_error")
            for row in rows:
                self._groups.setdefault(row.spec.key, []).append(row)
            self._queued += len(rows)
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify()

    def stop(self, timeout: float) -> None:
        """Refuse new rows, cancel the queued ones and the running batch, wait for the worker."""
        with self._cond:
            self._stopping = True
            waiting = [row for rows in self._groups.values() for row in rows]
            self._groups.clear()
            self._queued = 0
            self._cond.notify()
        for row in waiting:
            row.finish(RequestError(503, "the server shut down before this request was decoded",
                                    kind="server_shutting_down"))
        self._thread.join(timeout)

    # ---- worker side ----------------------------------------------------------------------
    def _work(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Row] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._drop_cancelled()
                if not self._groups:
                    self._cond.wait()
                    continue
                key, rows = min(self._groups.items(), key=lambda item: item[1][0].arrived)
                wait = rows[0].arrived + self.window_s - time.monotonic()
                if len(rows) < self.max_batch and wait > 0:
                    self._cond.wait(wait)  # more rows may join (or an older group appear)
                    continue
                batch, rest = rows[: self.max_batch], rows[self.max_batch:]
                if rest:
                    self._groups[key] = rest
                else:
                    del self._groups[key]
                self._queued -= len(batch)
                self.metrics.queue_depth.set(self._queued)
                return batch

    def _drop_cancelled(self) -> None:
        for key in list(self._groups):
            rows = [r for r in self._groups[key] if not r.cancelled]
            self._queued -= len(self._groups[key]) - len(rows)
            if rows:
                self._groups[key] = rows
            else:
                del self._groups[key]

    def _pipeline(self, row: Row) -> Pipeline:
        key = row.spec.key
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
        else:
            self._pipelines[key] = Pipeline(self.model, row.spec.recipe)
            while len(self._pipelines) > PIPELINES_KEPT:
                self._pipelines.popitem(last=False)
        return self._pipelines[key]

    def _run(self, batch: list[Row]) -> None:
        def on_step(event) -> None:
            if self._stopping or all(r.cancelled for r in batch):
                raise GenerationCancelled("every request of the batch is gone" if not self._stopping
                                          else "the server is shutting down")
            for row, prompt in zip(batch, event.prompts):
                if row.events is not None and not row.cancelled:
                    row.deliver(row.events.put_nowait, ("step", row.spec.index, (event.step, prompt)))

        self.metrics.batch_size.observe(len(batch))
        started = time.perf_counter()
        try:
            pipe = self._pipeline(batch[0])
            # the step callback (one host read per step) streams, and stops a batch nobody waits for
            out = pipe.generate([r.spec.ids for r in batch], step_callback=on_step)
        except GenerationCancelled:
            self.metrics.cancelled_batches.inc()
            for row in batch:
                row.finish(RequestError(503, "decoding was cancelled", kind="server_shutting_down"))
            return
        except Exception as error:  # noqa: BLE001 -- the rows' requests answer 500 with the message
            for row in batch:
                row.finish(error)
            return
        elapsed = time.perf_counter() - started
        stats = out.stats
        self.metrics.record_batch(size=len(batch), nfe=stats.nfe, tokens=stats.total_generated, seconds=elapsed)
        gen_length = batch[0].spec.recipe.generation.gen_length
        for i, row in enumerate(batch):
            answer = out.answers[i]
            text = None if out.text is None else out.text[i]
            stopped = len(answer) < gen_length or (text is not None and _cut_by_stop_string(
                pipe, answer, text, row.spec.recipe.generation.stop))
            row.finish(RowResult(answer=answer, text=text, nfe=stats.nfe, batch_size=len(batch),
                                 finish_reason="stop" if stopped else "length"))


def _cut_by_stop_string(pipe: Pipeline, answer: list[int], text: str, stops) -> bool:
    full = pipe.model.tokenizer.decode(answer, skip_special_tokens=True)
    return any(s and s in full for s in stops)

