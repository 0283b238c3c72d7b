"""Progress of a long command (an ablation's runs, calibration's trials): a rich display (items done /
left with ETA, one line per item in flight with its own progress) on a terminal; otherwise plain
lines: one per finished item, and a few for an item in flight; nothing with --quiet."""

from __future__ import annotations

import sys
import time


def describe(record: dict) -> str:
    status = record.get("status")
    if status == "ok":
        m = record.get("metrics", {})
        acc = record.get("accuracy_mean")
        acc_s = f"acc={acc:.3f} " if isinstance(acc, (int, float)) else ""
        timed = (record.get("timing") or {}).get("tokens_per_second")
        if isinstance(timed, dict) and isinstance(timed.get("median"), (int, float)):  # over the timed repeats
            tps = f"tok/s={timed['median']:.1f} [{timed['min']:.1f}, {timed['max']:.1f}]"
        else:
            tps = f"tok/s={m.get('tokens_per_second') or 0:.1f}"
        resumed = m.get("resumed_requests")
        resumed = f", {resumed} of {m.get('requests')} problems from the journal" if resumed else ""
        return f"ok {acc_s}{tps} nfe/req={m.get('nfe_per_request') or 0:.1f} ({record.get('wall_time_s') or 0:.1f}s{resumed})"
    if status == "failed":
        err = record.get("error") or {}
        return f"FAILED {err.get('type')}: {str(err.get('message', ''))[:160]}"
    return f"skipped: {str(record.get('reason', ''))[:160]}"


class Display:
    """On a terminal, rich bars: runs done / total, and one bar per run in flight. Elsewhere (a log
    file, CI), one line per finished run, and for a run in flight a line at each tenth of its
    progress, at most every `log_every_s` seconds (a run of hours shows it is moving)."""

    def __init__(self, total: int, *, quiet: bool = False, rich: bool | None = None, stream=None,
                 unit: str = "runs", log_every_s: float = 60.0):
        self.stream = stream or sys.stderr
        self.unit = unit
        self.quiet = quiet
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.log_every_s = log_every_s
        self.names: dict[int, str] = {}
        self.logged: dict[int, tuple[int, float]] = {}  # run in flight -> (tenths logged, when)
        if rich is None:
            rich = not quiet and getattr(self.stream, "isatty", lambda: False)()
        self.progress = None
        self.tasks: dict[int, int] = {}
        if rich and not quiet:
            self._start_rich()

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=self.stream)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.progress.start()
        self.overall = self.progress.add_task(f"[bold]{self.unit}", total=self.total)

    # ---- events ---------------------------------------------------------------------------------
    def start_run(self, index: int, name: str) -> None:
        self.names[index] = name
        self.logged[index] = (0, time.perf_counter())
        if self.progress is not None and index not in self.tasks:
            self.tasks[index] = self.progress.add_task(f"  #{index} {name}", total=None)

    def run_progress(self, index: int, done: int, total: int | None) -> None:
        if self.progress is not None:
            if index in self.tasks:
                self.progress.update(self.tasks[index], completed=done, total=total)
            return
        if self.quiet or not total or done >= total:  # the run's own line says it is done
            return
        tenths, when = self.logged.get(index, (0, self.started))
        now = time.perf_counter()
        if done * 10 // total > tenths and now - when >= self.log_every_s:
            self.logged[index] = (done * 10 // total, now)
            print(f"  #{index} {self.names.get(index, '')}: {done}/{total} done, "
                  f"{_clock(now - self.started)} elapsed", file=self.stream, flush=True)

    def finish_run(self, record: dict) -> None:
        index = record.get("index")
        self.finish(index, f"#{index} {record.get('name')}: {describe(record)}")

    def finish(self, index: int, text: str) -> None:
        """Item `index` is done: its line in flight goes, and `[done/total] text` is printed."""
        self.done += 1
        line = f"[{self.done}/{self.total}] {text}"
        if self.progress is not None:
            task = self.tasks.pop(index, None)
            if task is not None:
                self.progress.remove_task(task)
            self.progress.advance(self.overall)
            self.progress.console.print(line, markup=False, highlight=False)
        elif not self.quiet:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        elif not self.quiet:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
