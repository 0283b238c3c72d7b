"""A progress bar over committed tokens, attached to a pipeline as an extra hook implementation."""

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
