"""What `dare-pipeline generate` shows while it decodes: a progress bar over committed tokens (an
extra hook implementation on the pipeline), or with `--stream` each prompt's answer canvas after
every step, so the reader sees diffusion fill it in (in any order), not only the final answer."""

from __future__ import annotations

import sys

from tqdm import tqdm

from ..core.hookspecs import hookimpl


class ProgressBar:
    """Registers like a plugin (it only observes); shows committed answer tokens out of the total."""

    name = "progress"

    def __init__(self, total: int, file=sys.stderr):
        self.total, self.file = total, file
        self.bar = None

    @hookimpl
    def dare_generation_start(self, state):
        self.bar = tqdm(total=self.total, unit="tok", file=self.file, leave=False)

    @hookimpl
    def dare_step_end(self, state, committed):
        self.bar.update(int(committed.sum()))
        self.bar.set_postfix(nfe=state.stats.nfe, block=state.block)

    @hookimpl
    def dare_generation_end(self, state):
        self.bar.close()

    @hookimpl
    def dare_generation_abort(self, state, error):
        if self.bar is not None:
            self.bar.close()


# the canvas symbols (documented in README.md, "Streaming")
MASKED = "_"  # a position not committed yet
BLANK = "·"  # a committed token that prints as nothing (end of text, padding)
LINE_BREAK = "↵"  # a committed line break
NO_TOKENIZER = "#"  # any committed token of a model without a tokenizer


class CanvasView:
    """A step callback. On a terminal the canvases are redrawn in place; elsewhere (a pipe, a file)
    each step adds one line per prompt: `step N [i] canvas`."""

    def __init__(self, batch: int, gen_length: int, tokenizer, file=None):
        self.file = file or sys.stdout
        self.tokenizer = tokenizer
        self.canvases = [[MASKED] * gen_length for _ in range(batch)]
        self.live = self.file.isatty()
        self._drawn = False

    def _token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return NO_TOKENIZER
        text = self.tokenizer.decode([token_id], skip_special_tokens=True)
        return text.replace("\n", LINE_BREAK) or BLANK

    def __call__(self, event) -> None:
        for canvas, prompt in zip(self.canvases, event.prompts):
            for position, token in zip(prompt.positions, prompt.token_ids):
                canvas[position] = self._token(token)
        lines = ["".join(c) for c in self.canvases]
        if self.live:
            if self._drawn:  # back to the first canvas line, then overwrite every line
                self.file.write(f"\x1b[{len(lines)}F")
            self.file.write("".join(f"\x1b[2K[{i}] {line}\n" for i, line in enumerate(lines)))
            self._drawn = True
        else:
            self.file.write("".join(f"step {event.step} [{i}] {line}\n" for i, line in enumerate(lines)))
        self.file.flush()
