"""Request batching: rows with the same recipe settings decode together, in one worker thread.

The event loop only enqueues rows and awaits their results; the model runs in the worker (a step
of decoding must never block the loop). A batch starts when it has `max_batch` rows or its oldest
row has waited `window_s`, whichever comes first; while a batch decodes, new rows queue for the
next one. Among waiting groups the one with the oldest row goes first.

The worker is the only thread that calls a Pipeline, and it runs one batch at a time: two
generations never share a Pipeline (or the model) at once, whatever the requests do. A batch
that fails is decoded again row by row, so a request that breaks decoding fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

import attrs
import torch

from ..api import GenerationTooLarge, Pipeline
from ..core.streaming import GenerationCancelled
from .metrics import Metrics
from .requests import RequestError, RowSpec

PIPELINES_KEPT = 8  # recipes (after per-request settings) whose plugin stacks stay built
log = logging.getLogger(__name__)


@attrs.define(eq=False)
class RowResult:
    # answer token ids: cut before the first stop token, or through the token that completes a stop
    # string (the tokens counted as the completion's, as vLLM counts them)
    answer: list[int]
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
    # streaming rows get ("step", index, None) and ("done", index, None) items here; None for plain
    # requests. A step item says that `unread` holds steps: at most one is queued a row, the steps a
    # slow reader has not taken yet merge into it, so its memory is bounded by the answer, not the steps
    events: asyncio.Queue | None = None
    unread: dict | None = None
    arrived: float = attrs.Factory(time.monotonic)
    cancelled: bool = False  # the client is gone: drop the row; a batch of only such rows stops
    # the last step whose event this row's stream received: a row decoded again after its batch
    # failed repeats those steps exactly (decoding is batch-invariant), so they are not sent twice
    steps_sent: int = 0

    def step_event(self, step: int, prompt) -> None:
        """(On the event loop) a step's PromptStep for the stream: merged into the unread steps."""
        if self.unread is None:
            self.unread = {"step": step, "positions": list(prompt.positions), "token_ids": list(prompt.token_ids),
                           "settled": prompt.settled, "text": prompt.text}
            self.events.put_nowait(("step", self.spec.index, None))
        else:
            self.unread.update(step=step, settled=prompt.settled, text=prompt.text)
            self.unread["positions"] += prompt.positions
            self.unread["token_ids"] += prompt.token_ids

    def take_steps(self) -> dict:
        """(On the event loop) the steps not read yet, merged: the last step's number, settled length
        and text, and every position committed since the last read with its token."""
        unread, self.unread = self.unread, None
        return unread

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
        self._closed_because = ""  # why rows are refused and running batches cancelled (set by close)
        self._failure: str | None = None  # the worker died of this
        self._running: list[Row] = []  # the batch the worker decodes: answered if the worker dies
        self._pipelines: OrderedDict[str, Pipeline] = OrderedDict()
        self._thread = threading.Thread(target=self._work, name="dare-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def problem(self) -> str | None:
        """Why rows cannot be decoded now (the worker died, or the server is stopping); None when they can."""
        if self._failure is not None:
            return self._failure
        if self._stopping:
            return self._closed_because
        if not self._thread.is_alive():
            return "the decoding worker is not running"
        return None

    # ---- event loop side ------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> None:
        if len(rows) > self.max_queue:
            raise RequestError(400, f"this request has {len(rows)} rows (prompts x n) and the server queues at most "
                               f"{self.max_queue} (--max-queue): it can never fit; send fewer prompts or a smaller n",
                               "n", "too_many_rows")
        with self._cond:
            problem = self.problem()
            if problem is not None:
                raise RequestError(503, problem, kind="server_shutting_down" if self._stopping else "server_error")
            self._drop_cancelled()  # the rows of clients gone hold no place in the queue
            if self._queued + len(rows) > self.max_queue:
                raise RequestError(429, f"the queue is full ({self._queued} rows waiting; --max-queue "
                                   f"{self.max_queue}); retry later", kind="rate_limit_error")
            for row in rows:
                self._groups.setdefault(row.spec.key, []).append(row)
            self._queued += len(rows)
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify()

    def close(self, because: str = "the server is shutting down") -> None:
        """Refuse new rows, answer the queued ones 503 and cancel the running batch at its next step."""
        with self._cond:
            if not self._stopping:  # the reason first: problem() reads it once _stopping is set
                self._closed_because = because
                self._stopping = True
            waiting = self._take_all()
            self._cond.notify()
        for row in waiting:
            row.finish(RequestError(503, f"{self._closed_because} before this request was decoded",
                                    kind="server_shutting_down"))

    def stop(self, timeout: float) -> None:
        """close(), then wait up to `timeout` seconds for the worker to end."""
        self.close()
        self._thread.join(timeout)

    def _take_all(self) -> list[Row]:
        waiting = [row for rows in self._groups.values() for row in rows]
        self._groups.clear()
        self._queued = 0
        self.metrics.queue_depth.set(0)
        return waiting

    # ---- worker side ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._running = batch
                self._run(batch)
                self._running = []
        except BaseException as error:  # the worker is gone (logged here): nobody may wait for it
            log.exception("the decoding worker stopped")
            with self._cond:
                self._failure = f"the decoding worker stopped: {type(error).__name__}: {error}"
                waiting = self._running + self._take_all()
            for row in waiting:  # a row answered already keeps its answer
                row.finish(RequestError(503, self._failure, kind="server_error"))

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
        self.metrics.queue_depth.set(self._queued)

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
        """Decode a batch and hand each row its result. If decoding fails, a batch of several rows is
        decoded again one row at a time: only the rows that fail alone get an error, each its own."""
        def on_step(event) -> None:
            if self._stopping or all(r.cancelled for r in batch):
                raise GenerationCancelled(self._closed_because if self._stopping
                                          else "every request of the batch is gone")
            for row, prompt in zip(batch, event.prompts):
                if row.events is not None and not row.cancelled and event.step > row.steps_sent:
                    row.steps_sent = event.step
                    row.deliver(row.step_event, event.step, prompt)

        self.metrics.batch_size.observe(len(batch))
        started = time.perf_counter()
        try:
            pipe = self._pipeline(batch[0])
            # the step callback (one host read per step) streams, and stops a batch nobody waits for
            out = pipe.generate([r.spec.ids for r in batch], step_callback=on_step,
                                seeds=[r.spec.seed for r in batch])
        except GenerationCancelled as stop:
            self.metrics.cancelled_batches.inc()
            for row in batch:
                row.finish(RequestError(503, f"decoding was cancelled: {stop}", kind="server_shutting_down"))
            return
        except Exception as error:  # noqa: BLE001 -- answered per row, never to another row's client
            if len(batch) == 1 and isinstance(error, GenerationTooLarge):  # refused before any allocation
                batch[0].finish(RequestError(400, str(error), kind="invalid_request_error"))
            elif len(batch) == 1:
                log.error("decoding failed", exc_info=error)
                batch[0].finish(RequestError(500, f"decoding failed: {type(error).__name__}: {error}",
                                             kind="server_error"))
            elif self._stopping:
                for row in batch:
                    row.finish(RequestError(503, f"decoding was cancelled: {self._closed_because}",
                                            kind="server_shutting_down"))
            else:
                log.warning("a batch of %d rows failed (%s: %s); decoding its rows one at a time", len(batch),
                            type(error).__name__, error)
                self.metrics.isolated_batches.inc()
                for row in batch:
                    if not row.cancelled:
                        self._run([row])
            return
        elapsed = time.perf_counter() - started
        try:  # every row is answered, whatever fails here
            results = [_result(pipe, out, i, row, len(batch)) for i, row in enumerate(batch)]
            stats = out.stats
            self.metrics.record_batch(size=len(batch), nfe=stats.nfe, tokens=stats.total_generated, seconds=elapsed)
        except Exception as error:  # noqa: BLE001
            log.error("answering a decoded batch failed", exc_info=error)
            results = [RequestError(500, f"answering failed: {type(error).__name__}: {error}", kind="server_error")
                       for _ in batch]
        for row, result in zip(batch, results):
            row.finish(result)


def _result(pipe: Pipeline, out, i: int, row: Row, batch_size: int) -> RowResult:
    answer = out.answers[i]
    text = None if out.text is None else out.text[i]
    through = None if text is None else _through_stop_string(pipe, answer, row.spec.recipe.generation.stop)
    stopped = len(answer) < row.spec.recipe.generation.gen_length or through is not None
    return RowResult(answer=answer if through is None else through, text=text, nfe=out.stats.nfe,
                     batch_size=batch_size, finish_reason="stop" if stopped else "length")


def _through_stop_string(pipe: Pipeline, answer: list[int], stops) -> list[int] | None:
    """The answer's tokens through the first one whose text completes a stop string; None when its
    text holds none. Bisected, taking a prefix's text to hold a stop string once a shorter one's does;
    a tokenizer whose decode of a longer prefix rewrites earlier text (clean_up_tokenization_spaces)
    may count a few tokens more, never fewer than the text holds."""
    decode = pipe.model.tokenizer.decode

    def stops_at(k: int) -> bool:
        text = decode(answer[:k], skip_special_tokens=True)
        return any(s and s in text for s in stops)

    if not stops or not stops_at(len(answer)):
        return None
    low, high = 1, len(answer)  # stops_at(high) holds
    while low < high:
        mid = (low + high) // 2
        if stops_at(mid):
            high = mid
        else:
            low = mid + 1
    return answer[:high]

