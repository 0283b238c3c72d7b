"""A complete third-party plugin: writes one JSON line per decoding step.

    plugins:
      - {name: step_logger, path: steps.jsonl}
"""

from __future__ import annotations

import json
import sys
from typing import Any, ClassVar

import attrs

from dare_pipeline.core import Plugin, hookimpl


@attrs.frozen
class StepLoggerOptions:
    path: str = ""  # file to append JSON lines to; empty = standard error
    every: int = attrs.field(default=1, validator=attrs.validators.ge(1))  # log every n-th step


class StepLogger(Plugin):
    name = "step_logger"
    Options = StepLoggerOptions
    exact_options: ClassVar[dict[str, Any]] = {}  # it only observes: decoding with it must equal decoding without it

    @hookimpl
    def dare_generation_start(self, state):
        # records are kept until the generation ends, so no file stays open across hooks: a
        # generation that raises leaves neither an open handle nor a half-written log
        self.records: list[str] = []

    @hookimpl
    def dare_step_end(self, state, committed):
        if state.step % self.options.every:
            return
        record = {"step": state.step, "block": state.block, "nfe": state.stats.nfe,
                  "fed": [state.plan.fed.start, state.plan.fed.stop],
                  "committed": committed.sum(-1).tolist()}
        self.records.append(json.dumps(record) + "\n")

    @hookimpl
    def dare_generation_end(self, state):
        if not self.options.path:
            sys.stderr.writelines(self.records)
            return
        with open(self.options.path, "a") as stream:
            stream.writelines(self.records)

    @hookimpl
    def dare_report_stats(self, state):
        return {"lines_written": len(self.records)}
