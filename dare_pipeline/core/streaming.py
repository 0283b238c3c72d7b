"""Step callbacks and streaming: what each denoising step committed, reported while decoding runs.

A diffusion model commits answer positions in any order, so an event carries, per prompt, the
positions and token ids committed by this step and the *settled prefix*: the longest run of
committed positions from the start of the answer. Only the settled prefix is text a reader can
show, since every position after its first gap may still change.

A callback reads the canvas on the host once per step (the committed positions and tokens); in
eager mode that costs little, but it is one device synchronisation per step that plain
`generate` does not pay.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import attrs
import torch

from .hookspecs import hookimpl


@attrs.frozen
class PromptStep:
    """One prompt's part of a step. Positions are answer-relative (0 = the first answer token)."""

    positions: tuple[int, ...]  # answer positions committed by this step, ascending
    token_ids: tuple[int, ...]  # the token committed at each of those positions
    settled: int  # length of the settled prefix: answer positions 0..settled-1 are all committed
    # text of the settled prefix (cut at the first stop token and at stop strings), None without a
    # tokenizer. It only grows from step to step: while the prompt is not finished, a tail that may
    # still become a stop string (or is an incomplete character) is held back.
    text: str | None
    # the answer is final: its settled prefix reaches a stop token or a stop string, or every
    # position is committed. The final `text` equals GenerationOutput.text of this prompt.
    finished: bool


@attrs.frozen
class StepEvent:
    """What one denoising step (one model forward) committed, for every prompt of the batch."""

    step: int  # forwards so far in this generation (1 for the first); equals GenerationOutput.unmask_step
    block: int  # the block being decoded
    prompts: tuple[PromptStep, ...]  # one per prompt, in batch order


class GenerationCancelled(RuntimeError):
    """Raised inside the decoding loop to stop a generation whose stream was closed early."""


class StepReporter:
    """An observer hook object registered on a pipeline's plugin manager for one generation: after
    every step it builds a StepEvent and hands it to `callback`."""

    name = "step_reporter"

    def __init__(self, callback: Callable[[StepEvent], None], tokenizer, stop_ids, stop_strings):
        self.callback = callback
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._texts: list[str | None] = []

    @hookimpl
    def dare_generation_start(self, state):
        self._texts = [None if self.tokenizer is None else "" for _ in range(state.batch)]

    @hookimpl(trylast=True)  # after every plugin's own step end: it reports the step as they leave it
    def dare_step_end(self, state, committed):
        # the step's one host read: the answer canvas and which of its positions this step committed
        answer = state.x[:, state.prompt_end:]
        fresh = state.unmask_step == state.step
        tokens, fresh = torch.stack([answer, fresh.long()]).tolist()
        mask_id = state.mask_id
        prompts = []
        for b, (row, new) in enumerate(zip(tokens, fresh)):
            positions = tuple(i for i, n in enumerate(new) if n)
            settled = next((i for i, t in enumerate(row) if t == mask_id), len(row))
            prompts.append(self._prompt_step(b, row, positions, settled))
        self.callback(StepEvent(step=state.step, block=state.block, prompts=tuple(prompts)))

    def _prompt_step(self, b: int, row: list[int], positions: tuple[int, ...], settled: int) -> PromptStep:
        prefix = row[:settled]
        cut = next((i for i, t in enumerate(prefix) if t in self.stop_ids), None)
        finished = cut is not None or settled == len(row)
        if cut is not None:
            prefix = prefix[:cut]
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(prefix, skip_special_tokens=True)
            hit = min((text.index(s) for s in self.stop_strings if s in text), default=None)
            if hit is not None:
                text, finished = text[:hit], True
            elif not finished:
                text = self._hold_back(text)
            previous = self._texts[b]
            if not finished and not text.startswith(previous):  # a tokenizer whose decode is not prefix-stable
                text = previous
            self._texts[b] = text
        return PromptStep(positions=positions, token_ids=tuple(row[i] for i in positions), settled=settled,
                          text=text, finished=finished)

    def _hold_back(self, text: str) -> str:
        """`text` without a tail that could still grow into a stop string or is a partial character."""
        text = text.rstrip("\ufffd")
        keep = len(text)
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = min(keep, len(text) - n)
                    break
        return text[:keep]


class GenerationStream:
    """Iterate to get each step's StepEvent while the generation runs in a worker thread; `output`
    holds the GenerationOutput once the iteration is done. Closing the stream early (`close()`, or
    dropping it) stops the generation at its next step."""

    def __init__(self, run: Callable[[Callable[[StepEvent], None]], object]):
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._output = None
        self._done = False
        # the thread holds the queue and the flag, not the stream: a dropped stream is collected,
        # and its __del__ stops the generation
        self._thread = threading.Thread(target=_work, args=(run, self._events, self._cancel), name="dare-stream",
                                        daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[StepEvent]:
        while not self._done:
            item = self._events.get()
            if isinstance(item, tuple) and item[0] is _END:
                self._done = True
                _, self._output, error = item
                if error is not None and not isinstance(error, GenerationCancelled):
                    raise error
                return
            yield item

    @property
    def output(self):
        """The GenerationOutput, after the events are exhausted."""
        if not self._done:
            raise RuntimeError("the stream is not exhausted yet: iterate over it first")
        return self._output

    def close(self) -> None:
        """Stop the generation at its next step and wait for its thread."""
        self._cancel.set()
        self._thread.join()
        self._done = True

    def __del__(self):
        self._cancel.set()


_END = object()  # the worker's last queue item: (_END, output or None, error or None)


def _work(run, events: queue.Queue, cancel: threading.Event) -> None:
    def on_step(event: StepEvent) -> None:
        if cancel.is_set():
            raise GenerationCancelled("the stream was closed")
        events.put(event)

    on_step.cancelled = cancel  # a generation waiting for its turn on the model gives up when it is set
    try:
        events.put((_END, run(on_step), None))
    except BaseException as error:  # noqa: BLE001 -- handed to the consumer, raised there
        events.put((_END, None, error))
