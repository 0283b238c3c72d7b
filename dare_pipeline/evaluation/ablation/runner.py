"""Running an ablation: the runs of this shard that the results file does not have yet, in process or
in spawned worker processes, each record appended as its run finishes.

With `data_parallel=True` (the processes of a torchrun / accelerate launch) every rank takes part in
every run: lm-eval's evaluator gives each rank its share of the run's problems, rank 0 gets the
gathered accuracy and the merged counters and is the only one that writes."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone

import attrs

from ...config.loading import ConfigError
from ...execution.lifecycle import children_start_ignoring_interrupts
from ...execution.outputs import check_output_file
from . import journal, timing
from .display import Display, describe
from .results import SCHEMA, append_record, dedupe, read_records
from .schema import Ablation, RunSpec, plan_runs
from .timing import needs_timing

log = logging.getLogger(__name__)

METRICS = ("exact_match", "final_match")
_MODELS: dict = {}  # (model, dtype, device) -> loaded model, per process


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_shard(text: str | None) -> tuple[int, int]:
    """"i/n" -> (i, n), 0 <= i < n."""
    if not text:
        return 0, 1
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: expected I/N with 0 <= I < N (shards are numbered from 0)")
    return i, n


def accuracy_mean(accuracy: dict | None, metric: str) -> float | None:
    """One accuracy per run: the mean over groups when the run has groups (dare_suite), else the mean
    over tasks weighted by their problems."""
    if not accuracy:
        return None
    groups = [v for v in accuracy.values() if v.get("group") and isinstance(v.get(metric), (int, float))]
    if groups:
        return sum(v[metric] for v in groups) / len(groups)
    rows = [v for v in accuracy.values() if isinstance(v.get(metric), (int, float))]
    weight = sum(v.get("n") or 1 for v in rows)
    return sum(v[metric] * (v.get("n") or 1) for v in rows) / weight if rows else None


def _clean(value):
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def base_record(spec: RunSpec, ablation: dict) -> dict:
    return {
        "schema": SCHEMA, "key": spec.key, "index": spec.index, "ablation": ablation.get("name"),
        "ablation_file": ablation.get("source"), "label": spec.label, "name": spec.name,
        "plugins": list(spec.plugins), "sweep": dict(spec.sweep), "tasks": list(spec.tasks), "limit": spec.limit,
        "batch_size": spec.batch_size, "metric": ablation.get("metric", "exact_match"),
        "status": spec.status, "reason": spec.reason, "error": spec.error, "recipe": spec.recipe,
    }


def _error(exc: BaseException, captured: str = "") -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb).splitlines()[-40:]
    out = {"type": type(exc).__name__, "message": str(exc), "traceback": "\n".join(tail)}
    if captured:
        out["output_tail"] = captured[-3000:]
    return out


def _load(recipe):
    from ...models import load_model

    key = (recipe.model, recipe.dtype, recipe.device)
    if key not in _MODELS:
        _MODELS[key] = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    return _MODELS[key]


def _together(data_parallel: bool, what: str, fn):
    """fn(); with data parallelism, on every rank and raising on all of them when one failed."""
    if not data_parallel:
        return fn()
    from .. import distributed

    return distributed.together(fn, what)


def _highest_peak(memories: list[dict]) -> dict:
    """The memory record of the rank with the highest peak, with the number of ranks."""
    peak = max(range(len(memories)), key=lambda r: memories[r].get("peak_bytes") or 0)
    return memories[peak] | {"rank": peak, "ranks": len(memories)}


def execute_run(spec: RunSpec, ablation: dict, progress=None, data_parallel: bool = False, timed: bool = False
                ) -> dict:
    """Run one planned run; never raises for the run's own failures (they are in the record).

    timed: a timed pass (or its warm-up), which decodes the first `spec.timing_limit` problems per
    task when the run has one, instead of all `spec.limit`.

    data_parallel: every rank of the process group calls this for the same run and decodes its
    share of the problems; rank 0's record holds the whole run, the other ranks' only the status.

    A first pass (not timed) keeps each batch it decodes in the run's journal under
    `ablation["journal"]` (when given) and takes the batches an interrupted attempt recorded there
    from it (journal.py)."""
    record = base_record(spec, ablation)
    record["started"] = _now()
    record["worker"] = {"pid": os.getpid()}
    t0 = time.perf_counter()
    captured = io.StringIO()
    device = None
    ranks = 1
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            from ...config.recipe import Recipe
            from ..run import evaluate, set_offline

            set_offline()
            from .measure import AblationLM

            def load():
                nonlocal device
                recipe = Recipe.from_dict(spec.recipe, source=f"{ablation.get('source')} [{spec.name}]")
                device = recipe.device
                model = _load(recipe)
                if spec.calibrate is not None:  # a target_reuse: the threshold that gives it
                    from .calibrated import resolve

                    recipe, record["calibration"] = resolve(recipe, spec.calibrate, model, spec.key)
                journal_dir = (None if timed or not ablation.get("journal")
                               else journal.run_directory(ablation["journal"], spec.key))
                return AblationLM(recipe=recipe, model=model, batch_size=spec.batch_size, progress=progress,
                                  data_parallel=data_parallel, journal=journal_dir)

            lm = _together(data_parallel, "loading the run", load)
            ranks = lm.world_size

            def measure():
                lm.memory.start()
                limit = spec.timing_limit if timed and spec.timing_limit is not None else spec.limit
                doc = evaluate(list(spec.tasks), lm=lm, limit=limit)  # lm-eval's logs held back
                return doc, lm.memory_record()

            doc, memory = _together(data_parallel, "the evaluation", measure)
            stats = lm.gathered_stats()  # every rank's counters (collective with several ranks)
            if ranks > 1:
                from .. import distributed

                memory = _highest_peak(distributed.all_gather_object(memory))
        if doc is not None:  # None: a rank other than 0, whose share is in rank 0's record
            record.update(_results(doc, stats, memory, record["metric"]))
        if lm.journal is not None and lm.journal.error is not None:
            record["journal_error"] = lm.journal.error
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 -- the run failed, whatever the cause: record it, the others go on
        record["status"] = "failed"
        record["error"] = _error(exc, captured.getvalue())
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    record["finished"] = _now()
    if record["status"] != "ok":
        from ..run import hardware, versions

        record["versions"] = versions()
        try:
            record["hardware"] = hardware(device or "cpu", ranks=ranks)
        except Exception:  # noqa: BLE001 -- an unusable device string: say so rather than fail again
            record["hardware"] = hardware("cpu", ranks=ranks)
    return _clean(record)


def _results(doc: dict, stats, memory: dict, metric: str) -> dict:
    d = doc["decoding"]
    accuracy = {name: {k: v for k, v in row.items() if k != "tasks"} for name, row in doc["tasks"].items()}
    for name, row in doc["groups"].items():
        accuracy[name] = {k: v for k, v in row.items()} | {"group": True}
    requests = max(d["requests"], 1)
    flops_total = stats.flops.get("total", 0)
    metrics = {
        "requests": d["requests"], "batches": d["batches"], "nfe_total": d["nfe_total"],
        "nfe_per_request": d["nfe_per_request"], "steps": d["steps"], "generated_tokens": d["generated_tokens"],
        "generated_tokens_per_request": d["generated_tokens_per_request"],
        "tokens_per_second": d["tokens_per_second"], "decode_time_s": d["decode_time_s"],
        "decode_cpu_s": d.get("decode_cpu_s"), "ranks": d["ranks"],
        "generate_wall_time_s": d["wall_time_s"], "eval_wall_time_s": doc["eval"]["wall_time_s"],
        "flops": stats.flops, "flops_per_request": flops_total / requests,
        "flops_full_recompute": stats.flops_full.get("total", 0),
        "layer_rows": stats.rows, "rows_fed_x_layers": stats.rows_fed_layers,
        "canvas_rows_x_layers": stats.canvas_rows_layers, "lm_head_rows": stats.head_rows,
        "plugins": stats.plugin_summary(),
        "resumed_requests": stats.resumed_requests,
    }
    return {"accuracy": accuracy, "accuracy_mean": accuracy_mean(accuracy, metric), "metrics": metrics,
            "reuse": stats.reuse(), "memory": memory, "recipe": doc["recipe"], "model": doc["model"],
            "versions": doc["versions"], "hardware": doc["hardware"]}


# ---- worker processes ---------------------------------------------------------------------------

_QUEUE = None


def _worker_init(threads: int | None, queue, parent_pid: int) -> None:
    global _QUEUE
    from ...execution.lifecycle import die_with_parent

    die_with_parent(parent_pid)  # first: a worker never outlives the runner, whatever ends it
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    if threads:
        torch.set_num_threads(threads)
    _QUEUE = queue


_WARM: set = set()  # run keys this worker has executed a pass of


def _worker_execute(spec: RunSpec, ablation: dict, round_: int = 0, timed: bool = False) -> dict:
    index = spec.index

    def progress(done, total):
        _QUEUE.put(("progress", index, done, total))

    _QUEUE.put(("start", index, round_, os.getpid()))
    if round_ > 0 and spec.key not in _WARM:  # a timed repeat is never a process's first pass of its run
        execute_run(spec, ablation, timed=True)
    _WARM.add(spec.key)
    return execute_run(spec, ablation, progress=progress, timed=timed)


@attrs.define
class Summary:
    planned: int = 0  # runs of the whole ablation
    in_shard: int = 0  # runs of this shard
    executed: int = 0  # runs executed now (ok or failed)
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # refused / unknown plugin, recorded now
    already: int = 0  # found in the results file and not run again
    reused: int = 0  # first passes taken from other results files (reuse_runs)
    records: list = attrs.Factory(list)  # the records written now

    def line(self) -> str:
        reused = f", {self.reused} first pass(es) reused from other results files" if self.reused else ""
        return (f"{self.in_shard} runs in this shard ({self.planned} planned): {self.executed} executed "
                f"({self.ok} ok, {self.failed} failed), {self.skipped} skipped, {self.already} already in the "
                f"results file{reused}")

    def interrupted_line(self, kept: int = 0) -> str:
        partial = f" ({kept} problem(s) of unfinished runs kept)" if kept else ""
        return (f"interrupted; {self.already + len(self.records)} of {self.in_shard} runs recorded{partial}, "
                f"rerun to resume")


def select(runs: list[RunSpec], existing: list[dict], shard=(0, 1), retry_failed: bool = False, repeats: int = 0):
    """(runs to execute, records to write without running, runs already done) for this shard. A
    finished run whose record lacks the `repeats` timed passes (on its timing_limit) is run again
    for them (see run_ablation: its recorded first pass is kept)."""
    i, n = shard
    done = {r["key"]: r for r in dedupe(existing)}
    todo, write_now, already = [], [], []
    for spec in runs:
        if spec.index % n != i:
            continue
        prev = done.get(spec.key)
        if spec.status != "pending":  # skipped / recipe failed: recorded once, never executed
            if prev is None or (retry_failed and prev.get("status") == "failed" and spec.status == "failed"):
                write_now.append(spec)
            else:
                already.append(spec)
            continue
        finished = prev is not None and prev.get("status") == "ok" and not needs_timing(prev, repeats,
                                                                                      spec.timing_limit)
        if finished or (prev is not None and prev.get("status") == "failed" and not retry_failed):
            already.append(spec)
            continue
        todo.append(spec)
    return todo, write_now, already


# what a first pass measured, as a record from another results file gives it (reuse_runs)
_FIRST_PASS_FIELDS = ("accuracy", "accuracy_mean", "metrics", "reuse", "memory", "recipe", "model", "versions",
                      "hardware", "calibration", "started", "finished", "wall_time_s", "worker")


def reused_first_passes(specs: list[RunSpec], files, ablation: dict) -> dict[int, dict]:
    """run index -> this run's record made from the first pass another results file holds for its key
    (measured, status ok; the first file that has it), with `reused_from` naming that file, its
    ablation and index. The decoding is deterministic: the same key decodes the same answers."""
    donors: dict[str, tuple] = {}
    for path in files or ():
        if not os.path.isfile(path):
            raise ConfigError(f"--reuse-runs {path}: results file not found")
        for r in dedupe(read_records(path)):
            if r.get("status") == "ok":
                donors.setdefault(r["key"], (path, r))
    out = {}
    for spec in specs:
        if spec.status == "pending" and spec.key in donors:
            path, r = donors[spec.key]
            source = {"file": str(path), "ablation": r.get("ablation"), "index": r.get("index")}
            out[spec.index] = first_pass_record(spec, r | {"reused_from": source}, ablation)
    return out


def first_pass_record(spec: RunSpec, recorded: dict, ablation: dict) -> dict:
    """A run's record from a first pass recorded before (here or in another results file): what was
    measured, under the names this ablation file gives the run now."""
    measured = {k: recorded[k] for k in (*_FIRST_PASS_FIELDS, "reused_from") if k in recorded}
    return _clean(base_record(spec, ablation) | measured | {"status": "ok"})


def check_models(runs: list[RunSpec]) -> None:
    """Refuse before running anything when a run's checkpoint cannot serve lm-eval (missing, or
    without tokenizer files), rather than record every run as failed (failed runs count as done)."""
    from ...models.default import resolve_model_path

    for model in dict.fromkeys(str((r.recipe or {}).get("model")) for r in runs):
        directory = resolve_model_path(model)
        if not (directory / "config.json").is_file():
            raise ConfigError(f"model {model!r}: no checkpoint at {directory} (config.json missing)")
        if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ConfigError(f"model {model!r} ({directory}) has no tokenizer files; lm-eval works on text. "
                              f"Pass --model DIR with a checkpoint that has one (e.g. --model default, the "
                              f"embedded model)")


def _select_on_rank0(runs: list[RunSpec], output, shard, retry_failed: bool, repeats: int = 0):
    """select() as rank 0 sees the results file, on every rank of the process group (the ranks
    must run the same runs in the same order; only rank 0 reads and writes the file)."""
    from .. import distributed

    chosen = None
    if distributed.rank() == 0:
        chosen = [[(s.index, s.key) for s in part] for part in select(runs, read_records(output), shard, retry_failed, repeats)]
    chosen = distributed.broadcast_object(chosen)
    by_index = {s.index: s for s in runs}
    mismatch = [i for part in chosen for i, key in part if i not in by_index or by_index[i].key != key]
    error = ValueError(f"the runs planned on this rank differ from rank 0's (indices {mismatch[:5]}): the ranks "
                       f"must see the same ablation file, model, plugins and options") if mismatch else None
    distributed.agree(error, "planning the runs")
    return tuple([by_index[i] for i, _ in part] for part in chosen)


def run_ablation(abl: Ablation, output, *, limit=None, model=None, extra_set=(), batch_size=None, shard=(0, 1),
                 workers: int = 0, threads: int | None = 1, retry_failed: bool = False, quiet: bool = False,
                 rich: bool | None = None, data_parallel: bool = False, repeats: int | None = None,
                 timing_limit=None, reuse_runs=()) -> Summary:
    """Execute the runs of `abl` for this shard that `output` does not hold yet; append a record per
    run as it finishes. workers=0 runs in this process; K >= 1 in K spawned worker processes.

    repeats (default: the file's): timed passes per run after its first (accuracy) pass, interleaved
    across the runs (see timing.py); a run's record is written after its first pass (timing pending)
    and again, complete, after its last repeat. timing_limit (default: the file's; None: the limit):
    problems per task of the timed passes. A run the results file holds measured but without these
    timed passes keeps its recorded first pass: a pass over the timed problems warms it up instead
    (with data parallelism its first pass runs again).

    reuse_runs: other results files; a run to do whose key one of them holds measured (the same
    recipe, tasks, limit and batch size, so the same answers and counts) takes that record's first
    pass instead of decoding its problems again, marked `reused_from`; its timed passes still run
    here, round-robin with this ablation's runs.

    data_parallel: this process is one rank of a torchrun / accelerate launch (the process group is
    joined here); every rank takes part in every run with its share of the problems, and rank 0
    alone reads and writes `output` and shows progress.

    An interruption (KeyboardInterrupt) stops the workers and raises lifecycle.Interrupted with the
    line to show ("interrupted; N of M runs recorded, rerun to resume"; none on ranks other than 0)."""
    from ...execution.lifecycle import as_interrupted

    repeats = abl.repeats if repeats is None else repeats
    if repeats < 0:
        raise ConfigError(f"--repeats {repeats}: must be >= 0")
    if output is not None:
        check_output_file(output)
    runs = plan_runs(abl, model=model, limit=limit, extra_set=extra_set, batch_size=batch_size,
                     timing_limit=timing_limit)
    rank = 0
    kept: dict[int, dict] = {}  # run index -> its recorded first pass, for runs that only need timing
    reused: dict[int, dict] = {}  # run index -> its first pass taken from another results file
    if data_parallel:
        from .. import distributed

        if workers:
            raise ValueError("data parallelism runs in the launched processes themselves: workers must be 0")
        if reuse_runs:
            raise ValueError("--reuse-runs takes first passes from other results files: not under data parallelism")
        device = next((str(r.recipe.get("device", "cpu")) for r in runs if isinstance(r.recipe, dict)), "cpu")
        rank, world = distributed.init(device)
        todo, write_now, already = _select_on_rank0(runs, output, shard, retry_failed, repeats)
        # every rank needs a problem of every task in every pass (see evaluation.run.evaluate)
        small = sorted({(name, n) for s in todo for name, n in (("limit", s.limit), ("timing_limit", s.timing_limit))
                        if isinstance(n, int) and n < world and (name == "limit" or repeats > 0)})
        if small:
            name, n = small[0]
            raise ValueError(f"{name} {n} gives some of the {world} data-parallel processes no problem; use a "
                             f"{name} of at least {world} or fewer processes")
        _together(True, "checking the models", lambda: check_models(todo))
    else:
        existing = read_records(output)
        todo, write_now, already = select(runs, existing, shard, retry_failed, repeats)
        done = {r["key"]: r for r in dedupe(existing)}
        about = {"name": abl.name, "source": abl.source, "metric": abl.metric}
        # the recorded first pass under this file's names (labels and sweeps may have changed since)
        kept = {s.index: first_pass_record(s, done[s.key], about) for s in todo
                if (done.get(s.key) or {}).get("status") == "ok"}
        reused = reused_first_passes([s for s in todo if s.key not in done], reuse_runs, about)
        check_models(todo)
    if todo:
        check_tasks(abl.tasks)
    summary = Summary(planned=len(runs), in_shard=len(todo) + len(write_now) + len(already), already=len(already))
    journal_root = None if output is None else journal.root_for(output)
    info = {"name": abl.name, "source": abl.source, "metric": abl.metric,
            "journal": None if journal_root is None else str(journal_root)}
    display = Display(len(todo) + len(write_now), quiet=quiet or rank != 0, rich=rich)
    warning = oversubscription(workers, threads)
    if warning and todo:
        display.message(f"warning: {warning}")
    recorded = {r["key"] for r in dedupe(read_records(output))} if rank == 0 and output is not None else set()
    if journal_root is not None and rank == 0:
        journal.prune(journal_root, recorded)

    def record_run(record):
        # `recorded` orders records of one run when files are merged: a run timed here on a first pass
        # reused from another file shares that pass's `finished` with the donor's record
        append_record(output, record | {"recorded": _now()})
        if journal_root is not None:  # the run's first pass (or its failure) is in the file now
            journal.remove(journal_root, record["key"])

    def write(record, final: bool = True):
        if rank == 0:
            record_run(record)
        if not final:
            return
        summary.records.append(record)
        status = record["status"]
        summary.ok += status == "ok"
        summary.failed += status == "failed"
        summary.skipped += status == "skipped"
        summary.executed += status in ("ok", "failed") and record.get("started") is not None
        display.finish_run(record)

    for spec in [s for s in todo if s.index in reused]:
        record = reused[spec.index]
        if repeats == 0:  # nothing left to do for it
            record_run(record)
            summary.records.append(record)
            summary.ok += 1
            summary.reused += 1
            display.finish_run(record)
            todo.remove(spec)
        else:  # its timed passes run here, after a warm-up pass
            record_run(record | {"timing": timing.pending(repeats)})
            recorded.add(spec.key)
            kept[spec.index] = record
            summary.reused += 1

    def first_pass(spec, record):
        display.message(f"#{spec.index} {spec.name}: first pass {describe(record)}; {repeats} timed repeat(s) follow, "
                        f"round-robin")

    rounds = _Rounds(repeats, write, recorded, first_pass, kept)
    try:
        for spec in write_now:
            record = _clean(base_record(spec, info) | {"finished": _now()})
            write(record)
        if threads and workers == 0:
            import torch

            torch.set_num_threads(threads)
        tasks = [(spec, r) for r in range(repeats + 1) for spec in todo]  # round-robin over the runs
        if workers == 0:
            for spec, r in tasks:
                if rounds.dead(spec):
                    continue
                display.start_run(spec.index, spec.name)
                record = execute_run(spec, info, data_parallel=data_parallel, timed=r > 0 or spec.index in kept,
                                     progress=functools.partial(display.run_progress, spec.index))
                rounds.result(spec, r, record)
        else:
            _run_pool(tasks, info, workers, threads, display, rounds, kept)
    except KeyboardInterrupt as exc:
        problems_kept = 0
        if rank == 0 and output is not None:  # the file, not the summary: the signal may land between the two
            left, _, done_now = select(runs, read_records(output), shard, retry_failed, repeats)
            summary.already, summary.records = len(done_now), []
            problems_kept = journal.requests_kept(journal_root, [s.key for s in left])
        # under data parallelism rank 0 alone says it (the others do not read the results file)
        raise as_interrupted(exc).with_message(summary.interrupted_line(problems_kept) if rank == 0 else "") from None
    finally:
        display.close()
    return summary


class _Rounds:
    """The passes of each run: the first (accuracy, counters; the warm-up) and the timed repeats.
    Writes a run's record after its first pass when the file has none yet (timing pending), and
    the complete record after its last repeat; a failed pass ends the run with a failed record.
    kept: run index -> its recorded first pass, which stands for the first pass of that run (then
    only a warm-up)."""

    def __init__(self, repeats: int, write, recorded: set, on_first=None, kept: dict | None = None):
        self.repeats, self.write, self.recorded, self.on_first = repeats, write, recorded, on_first
        self.kept = kept or {}
        self.first: dict[int, dict] = {}
        self.samples: dict[int, list] = {}
        self.ended: set[int] = set()

    def dead(self, spec: RunSpec) -> bool:
        return spec.index in self.ended

    def result(self, spec: RunSpec, round_: int, record: dict) -> None:
        if spec.index in self.ended:
            return
        if record.get("status") != "ok":
            if round_ > 0:
                record["error"] = dict(record.get("error") or {}, round=round_)
            return self._end(spec, record)
        if round_ == 0:
            if spec.index in self.kept:  # this pass was the warm-up; the recorded first pass stands
                record = {k: v for k, v in self.kept[spec.index].items() if k != "timing"}
            self.first[spec.index] = record
            if self.repeats == 0:
                return self._end(spec, record)
            if spec.key not in self.recorded:  # the accuracy is kept if the repeats are interrupted
                self.write(record | {"timing": timing.pending(self.repeats)}, final=False)
            if self.on_first is not None:
                self.on_first(spec, record)
        else:  # with workers a repeat can finish before its run's first pass
            self.samples.setdefault(spec.index, []).append(timing.sample(record) | {"round": round_})
        samples = sorted(self.samples.get(spec.index, []), key=lambda x: x["round"])
        if spec.index in self.first and len(samples) >= self.repeats:
            self._end(spec, self.first[spec.index] | {"timing": timing.summarize(samples, self.repeats,
                                                                                  spec.timing_limit)})

    def _end(self, spec: RunSpec, record: dict) -> None:
        self.ended.add(spec.index)
        self.write(_clean(record))


def oversubscription(workers: int, threads: int | None) -> str | None:
    """A warning when the processes' torch threads exceed the machine's cores (timings then measure
    the contention)."""
    cores = os.cpu_count() or 1
    if threads:
        per_process = threads
    else:
        import torch

        per_process = torch.get_num_threads()
    total = max(workers, 1) * per_process
    if total <= cores:
        return None
    return (f"{max(workers, 1)} process(es) x {per_process} torch thread(s) = {total} threads on {cores} cores: "
            f"the runs compete for the cores and their timings measure that contention (use --workers "
            f"{max(cores // per_process, 1)} or fewer, or fewer --threads)")


def check_tasks(tasks) -> None:
    """Refuse unknown tasks before any run starts (rather than one failed record per run)."""
    from ..run import check_tasks as check

    try:
        check(list(tasks))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _run_pool(tasks: list, info: dict, workers: int, threads, display: Display, rounds: _Rounds,
              kept: dict | None = None) -> None:
    """The passes in `workers` spawned processes, submitted in round-robin order. No multiprocessing
    Manager (its server process would outlive a killed runner): progress comes back through a plain
    queue, and every worker dies with this process (lifecycle.die_with_parent)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    remaining = list(tasks)
    attempts: dict[tuple, int] = {}
    queue = ctx.Queue()
    try:
        while remaining:
            started: dict[int, int] = {}  # run index -> round in flight
            finished: set[tuple] = set()
            broken = None
            pool = ProcessPoolExecutor(max_workers=min(workers, len({s.index for s, _ in remaining})), mp_context=ctx,
                                       initializer=_worker_init, initargs=(threads, queue, os.getpid()))
            try:
                with children_start_ignoring_interrupts():  # submit spawns the workers
                    futures = {pool.submit(_worker_execute, spec, info, r, r > 0 or spec.index in (kept or {})):
                               (spec, r) for spec, r in remaining}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(queue, display, started, {s.index: s for s, _ in remaining})
                    for fut in done:
                        spec, r = futures[fut]
                        try:
                            record = fut.result()
                        except BrokenProcessPool as exc:
                            broken = exc
                            continue
                        finished.add((spec.index, r))
                        rounds.result(spec, r, record)
                    if broken is not None:
                        break
            except BaseException:
                _stop(pool)
                raise
            pool.shutdown(wait=True)
            _drain(queue, display, started, {s.index: s for s, _ in remaining})
            if broken is None:
                return
            # a worker died (killed, out of memory, a crash in native code) and the pool with it: a pass
            # in flight alone, or in flight at two such deaths, ends its run as failed; the others go
            # to a fresh pool
            in_flight = [(s, r) for s, r in remaining if started.get(s.index) == r and (s.index, r) not in finished]
            for spec, r in in_flight:
                attempts[(spec.index, r)] = attempts.get((spec.index, r), 0) + 1
                if len(in_flight) == 1 or attempts[(spec.index, r)] >= 2:
                    record = base_record(spec, info) | {
                        "status": "failed", "started": _now(), "finished": _now(),
                        "error": {"type": "WorkerDied", "message": f"the worker process running this run died "
                                                                  f"({broken})", "traceback": ""}}
                    finished.add((spec.index, r))
                    rounds.result(spec, r, _clean(record))
            remaining = [(s, r) for s, r in remaining if (s.index, r) not in finished and not rounds.dead(s)]
    finally:
        queue.close()
        queue.cancel_join_thread()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the pool now: kill its workers (their passes can no longer be recorded) and do not wait."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public way before Python 3.14
    for p in processes:
        with contextlib.suppress(Exception):
            p.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(timeout=5)


def _drain(queue, display: Display, started: dict, specs: dict) -> None:
    import queue as queue_mod

    while True:
        try:
            msg = queue.get_nowait()
        except (queue_mod.Empty, EOFError, OSError, ValueError):
            return
        if msg[0] == "start":
            started[msg[1]] = msg[2]
            display.start_run(msg[1], specs[msg[1]].name if msg[1] in specs else str(msg[1]))
        elif msg[0] == "progress":
            display.run_progress(msg[1], msg[2], msg[3])
