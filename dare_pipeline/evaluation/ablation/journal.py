"""A run's first pass kept batch by batch, so that an interrupted run resumes at the batch it was on.

As each batch of a first pass ends, its answers and what it added to the run's counters (requests,
NFE, FLOPs, rows, plugin counters, decode time) are appended to the run's journal, one fsynced line
(results.append_record). When the run starts again, a batch the journal holds is not decoded again:
its answers and counters are taken as recorded, so the run's record still counts all the work done
for it, in whichever process and session that was. The decoding is deterministic (every generation
is seeded), so a batch's answers do not depend on what was decoded before it.

One directory per run under `<results file>.partial/` (named by the run key, which covers the recipe,
tasks, limit and batch size), one file per data-parallel rank. A batch is found by its contexts and
generation arguments, in any of the run's files; within a rank each recorded batch stands for one
decode. The runner removes a run's directory once the run's record (ok or failed) is in the results
file: a retried failure starts over, with whatever was fixed since."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from ..lm_eval_model import least_values
from .results import append_record, read_records

log = logging.getLogger(__name__)

SCHEMA = "dare-pipeline/ablation-batch/v1"


def root_for(output) -> Path:
    """Where the journals of a results file's runs live: `runs/x.jsonl` -> `runs/x.partial/`."""
    path = Path(output)
    return path.parent / f"{path.stem if path.suffix == '.jsonl' else path.name}.partial"


def run_directory(root, run_key: str) -> Path:
    return Path(root) / run_key


def remove(root, run_key: str) -> None:
    """Drop a run's journal (its record is written); the root too once it is empty."""
    shutil.rmtree(run_directory(root, run_key), ignore_errors=True)
    try:
        Path(root).rmdir()
    except OSError:  # not empty (other runs' journals) or not there
        pass


def prune(root, finished_keys) -> None:
    """Drop the journals of runs the results file holds a record of (a process that ended between
    writing the record and removing the journal leaves one behind)."""
    for key in finished_keys:
        if run_directory(root, key).is_dir():
            remove(root, key)


def requests_kept(root, run_keys) -> int:
    """Requests whose answers the journals of these runs hold."""
    return sum(len(e["texts"]) for key in run_keys for e in _entries(run_directory(root, key)))


def batch_key(contexts: list[str], gen_kwargs) -> str:
    doc = {"contexts": list(contexts), "gen_kwargs": gen_kwargs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=repr).encode()).hexdigest()


def counters_delta(before: dict, stats) -> dict:
    """What a batch added to `stats` (an attrs stats object) since its counters were `before`."""
    return _difference(before, stats.counters(), stats._MIN_FIELDS)


def _difference(before: dict, after: dict, minima=()) -> dict:
    """`after - before` for numbers, key by key in dicts; other values left out. A number the batch
    brought in is kept though it is 0 (a plugin's reuse fraction of 0 is a value: a run resumed wholly
    from its journal reports it). Fields named in `minima` hold least values, not sums: they are
    recorded whole (`add_counters` takes the least)."""
    out = {}
    for name, value in after.items():
        old = before.get(name)
        if name in minima:
            if value:
                out[name] = value
        elif isinstance(value, dict):
            inner = _difference(old if isinstance(old, dict) else {}, value)
            if inner:
                out[name] = inner
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            known = isinstance(old, (int, float)) and not isinstance(old, bool)
            diff = value - (old if known else 0)
            if diff or not known:
                out[name] = diff
    return out


def _plus(value, delta):  # not lm_eval_model._merge_values: that keeps the first of non-numbers
    if isinstance(delta, dict):
        base = dict(value) if isinstance(value, dict) else {}
        for key, d in delta.items():
            base[key] = _plus(base.get(key), d)
        return base
    return (value or 0) + delta


def add_counters(stats, delta: dict) -> None:
    """Add a recorded batch's counters to `stats` (an attrs stats object); names it lacks are ignored,
    those in its `_MIN_FIELDS` keep the least value."""
    for name, d in delta.items():
        if hasattr(stats, name):
            mine = getattr(stats, name)
            setattr(stats, name, least_values([mine, d]) if name in stats._MIN_FIELDS else _plus(mine, d))


def _entries(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("rank*.jsonl")):
        for e in read_records(path, schemas=(SCHEMA,)):
            texts, counters = e.get("texts"), e.get("counters")
            if isinstance(texts, list) and all(isinstance(t, str) for t in texts) and isinstance(counters, dict):
                out.append(e)
    return out


class BatchJournal:
    """The journal of one run as one rank sees it: the batches recorded so far (by every rank, in
    every earlier attempt), and the file this rank appends its new batches to."""

    def __init__(self, directory, rank: int = 0):
        self.directory = Path(directory)
        self.path = self.directory / f"rank{rank}.jsonl"
        self.error: str | None = None  # why this rank stopped recording (a failed write)
        self._found: dict[str, list[dict]] = {}
        for e in _entries(self.directory):
            self._found.setdefault(e["key"], []).append(e)

    def take(self, key: str, size: int) -> dict | None:
        """A recorded batch of these contexts (`size` of them: a line cut short otherwise), once per
        recording; None when none is left."""
        entries = self._found.get(key) or []
        for i, e in enumerate(entries):
            if len(e["texts"]) == size:
                return entries.pop(i)
        return None

    def add(self, key: str, texts: list[str], counters: dict, peak_bytes: int | None = None) -> None:
        """Record a decoded batch. A write that fails (a full disk; a counter that is not a finite
        number) stops the recording, not the run: the run goes on, only less of it can resume."""
        if self.error is not None:
            return
        line = {"schema": SCHEMA, "key": key, "texts": list(texts), "counters": counters, "peak_bytes": peak_bytes}
        try:
            append_record(self.path, line)
        except (OSError, ValueError) as exc:
            self.error = f"{self.path}: {exc}"
            log.warning("the run's journal stops here (%s): an interruption now resumes from its last "
                        "recorded batch", self.error)
