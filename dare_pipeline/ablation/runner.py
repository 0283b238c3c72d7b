"""Running an ablation: the runs of this shard that the results file does not have yet, in process or
in spawned worker processes, each record appended as its run finishes.

With `data_parallel=True` (the processes of a torchrun / accelerate launch) every rank takes part in
every run: lm-eval's evaluator gives each rank its share of the run's problems, rank 0 gets the
gathered accuracy and the merged counters and is the only one that writes."""

from __future__ import annotations

import contextlib
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

from .display import Display
from .results import SCHEMA, append_record, dedupe, read_records
from .schema import Ablation, RunSpec, plan_runs

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


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's environment report (`pip list` through a subprocess, ~1.3 s a run) is replaced by
    our own versions; its INFO/WARNING logs are held back while a run goes."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info
    logger = logging.getLogger("lm_eval")
    level = logger.level
    evaluator.add_env_info = lambda results: None
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        evaluator.add_env_info = saved
        logger.setLevel(level)


def _load(recipe):
    from ..models import load_model

    key = (recipe.model, recipe.dtype, recipe.device)
    if key not in _MODELS:
        _MODELS[key] = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    return _MODELS[key]


def _together(data_parallel: bool, what: str, fn):
    """fn(); with data parallelism, on every rank and raising on all of them when one failed."""
    if not data_parallel:
        return fn()
    from ..evaluation import distributed

    return distributed.together(fn, what)


def _highest_peak(memories: list[dict]) -> dict:
    """The memory record of the rank with the highest peak, with the number of ranks."""
    peak = max(range(len(memories)), key=lambda r: memories[r].get("peak_bytes") or 0)
    return memories[peak] | {"rank": peak, "ranks": len(memories)}


def execute_run(spec: RunSpec, ablation: dict, progress=None, data_parallel: bool = False) -> dict:
    """Run one planned run; never raises for the run's own failures (they are in the record).

    data_parallel: every rank of the process group calls this for the same run and decodes its
    share of the problems; rank 0's record holds the whole run, the other ranks' only the status."""
    record = base_record(spec, ablation)
    record["started"] = _now()
    record["worker"] = {"pid": os.getpid()}
    t0 = time.perf_counter()
    captured = io.StringIO()
    device = None
    ranks = 1
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            from ..evaluation.run import evaluate, set_offline
            from ..recipe import Recipe

            set_offline()
            from .measure import AblationLM

            def load():
                nonlocal device
                recipe = Recipe.from_dict(spec.recipe, source=f"{ablation.get('source')} [{spec.name}]")
                device = recipe.device
                return AblationLM(recipe=recipe, model=_load(recipe), batch_size=spec.batch_size, progress=progress,
                                  data_parallel=data_parallel)

            lm = _together(data_parallel, "loading the run", load)
            ranks = lm.world_size

            def measure():
                with _quiet_lm_eval():
                    lm.memory.start()
                    doc = evaluate(list(spec.tasks), lm=lm, limit=spec.limit)
                    return doc, lm.memory.stop()

            doc, memory = _together(data_parallel, "the evaluation", measure)
            stats = lm.gathered_stats()  # every rank's counters (collective with several ranks)
            if ranks > 1:
                from ..evaluation import distributed

                memory = _highest_peak(distributed.all_gather_object(memory))
        if doc is not None:  # None: a rank other than 0, whose share is in rank 0's record
            record.update(_results(doc, stats, memory, record["metric"]))
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 -- the run failed, whatever the cause: record it, the others go on
        record["status"] = "failed"
        record["error"] = _error(exc, captured.getvalue())
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    record["finished"] = _now()
    if record["status"] != "ok":
        from ..evaluation.run import hardware, versions

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
        "tokens_per_second": d["tokens_per_second"], "decode_time_s": d["decode_time_s"], "ranks": d["ranks"],
        "generate_wall_time_s": d["wall_time_s"], "eval_wall_time_s": doc["eval"]["wall_time_s"],
        "flops": stats.flops, "flops_per_request": flops_total / requests,
        "flops_full_recompute": stats.flops_full.get("total", 0),
        "layer_rows": stats.rows, "rows_fed_x_layers": stats.rows_fed_layers,
        "canvas_rows_x_layers": stats.canvas_rows_layers, "lm_head_rows": stats.head_rows,
        "plugins": stats.plugin_summary(),
    }
    return {"accuracy": accuracy, "accuracy_mean": accuracy_mean(accuracy, metric), "metrics": metrics,
            "reuse": stats.reuse(), "memory": memory, "recipe": doc["recipe"], "model": doc["model"],
            "versions": doc["versions"], "hardware": doc["hardware"]}


# ---- worker processes ---------------------------------------------------------------------------

_QUEUE = None


def _worker_init(threads: int | None, queue) -> None:
    global _QUEUE
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    if threads:
        torch.set_num_threads(threads)
    _QUEUE = queue


def _worker_execute(spec: RunSpec, ablation: dict) -> dict:
    index = spec.index

    def progress(done, total):
        _QUEUE.put(("progress", index, done, total))

    _QUEUE.put(("start", index, os.getpid()))
    return execute_run(spec, ablation, progress=progress)


@attrs.define
class Summary:
    planned: int = 0  # runs of the whole ablation
    in_shard: int = 0  # runs of this shard
    executed: int = 0  # runs executed now (ok or failed)
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # refused / unknown plugin, recorded now
    already: int = 0  # found in the results file and not run again
    records: list = attrs.Factory(list)  # the records written now

    def line(self) -> str:
        return (f"{self.in_shard} runs in this shard ({self.planned} planned): {self.executed} executed "
                f"({self.ok} ok, {self.failed} failed), {self.skipped} skipped, {self.already} already in the "
                f"results file")


def select(runs: list[RunSpec], existing: list[dict], shard=(0, 1), retry_failed: bool = False):
    """(runs to execute, records to write without running, runs already done) for this shard."""
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
        if prev is not None and (prev.get("status") == "ok" or (prev.get("status") == "failed" and not retry_failed)):
            already.append(spec)
            continue
        todo.append(spec)
    return todo, write_now, already


def check_models(runs: list[RunSpec]) -> None:
    """Refuse before running anything when a run's checkpoint cannot serve lm-eval (missing, or
    without tokenizer files), rather than record every run as failed (failed runs count as done)."""
    from ..config_loading import ConfigError
    from ..default_model import resolve_model_path

    for model in dict.fromkeys(str((r.recipe or {}).get("model")) for r in runs):
        directory = resolve_model_path(model)
        if not (directory / "config.json").is_file():
            raise ConfigError(f"model {model!r}: no checkpoint at {directory} (config.json missing)")
        if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ConfigError(f"model {model!r} ({directory}) has no tokenizer files; lm-eval works on text. "
                              f"Pass --model DIR with a checkpoint that has one (the embedded default model is "
                              f"a placeholder until the trained one lands)")


def _select_on_rank0(runs: list[RunSpec], output, shard, retry_failed: bool):
    """select() as rank 0 sees the results file, on every rank of the process group (the ranks
    must run the same runs in the same order; only rank 0 reads and writes the file)."""
    from ..evaluation import distributed

    chosen = None
    if distributed.rank() == 0:
        chosen = [[(s.index, s.key) for s in part] for part in select(runs, read_records(output), shard, retry_failed)]
    chosen = distributed.broadcast_object(chosen)
    by_index = {s.index: s for s in runs}
    mismatch = [i for part in chosen for i, key in part if i not in by_index or by_index[i].key != key]
    error = ValueError(f"the runs planned on this rank differ from rank 0's (indices {mismatch[:5]}): the ranks "
                       f"must see the same ablation file, model, plugins and options") if mismatch else None
    distributed.agree(error, "planning the runs")
    return tuple([by_index[i] for i, _ in part] for part in chosen)


def run_ablation(abl: Ablation, output, *, limit=None, model=None, extra_set=(), batch_size=None, shard=(0, 1),
                 workers: int = 0, threads: int | None = 1, retry_failed: bool = False, quiet: bool = False,
                 rich: bool | None = None, data_parallel: bool = False) -> Summary:
    """Execute the runs of `abl` for this shard that `output` does not hold yet; append a record per
    run as it finishes. workers=0 runs in this process; K >= 1 in K spawned worker processes.

    data_parallel: this process is one rank of a torchrun / accelerate launch (the process group is
    joined here); every rank takes part in every run with its share of the problems, and rank 0
    alone reads and writes `output` and shows progress."""
    runs = plan_runs(abl, model=model, limit=limit, extra_set=extra_set, batch_size=batch_size)
    rank = 0
    if data_parallel:
        from ..evaluation import distributed

        if workers:
            raise ValueError("data parallelism runs in the launched processes themselves: workers must be 0")
        device = next((str(r.recipe.get("device", "cpu")) for r in runs if isinstance(r.recipe, dict)), "cpu")
        rank, world = distributed.init(device)
        todo, write_now, already = _select_on_rank0(runs, output, shard, retry_failed)
        small = sorted({s.limit for s in todo if isinstance(s.limit, int) and s.limit < world})
        if small:  # every rank needs a problem of every task (see evaluation.run.evaluate)
            raise ValueError(f"limit {small[0]} gives some of the {world} data-parallel processes no problem; use a "
                             f"limit of at least {world} or fewer processes")
        _together(True, "checking the models", lambda: check_models(todo))
    else:
        todo, write_now, already = select(runs, read_records(output), shard, retry_failed)
        check_models(todo)
    summary = Summary(planned=len(runs), in_shard=len(todo) + len(write_now) + len(already), already=len(already))
    info = {"name": abl.name, "source": abl.source, "metric": abl.metric}
    display = Display(len(todo) + len(write_now), quiet=quiet or rank != 0, rich=rich)

    def write(record):
        if rank == 0:
            append_record(output, record)
        summary.records.append(record)
        status = record["status"]
        summary.ok += status == "ok"
        summary.failed += status == "failed"
        summary.skipped += status == "skipped"
        summary.executed += status in ("ok", "failed") and record.get("started") is not None
        display.finish_run(record)

    try:
        for spec in write_now:
            record = _clean(base_record(spec, info) | {"finished": _now()})
            write(record)
        if threads and workers == 0:
            import torch

            torch.set_num_threads(threads)
        if workers == 0:
            for spec in todo:
                display.start_run(spec.index, spec.name)
                write(execute_run(spec, info, progress=lambda d, t, i=spec.index: display.run_progress(i, d, t),
                                  data_parallel=data_parallel))
        else:
            _run_pool(todo, info, workers, threads, display, write)
    finally:
        display.close()
    return summary


def _run_pool(todo: list[RunSpec], info: dict, workers: int, threads, display: Display, write) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    remaining = list(todo)
    attempts: dict[int, int] = {}
    with ctx.Manager() as manager:
        queue = manager.Queue()
        while remaining:
            started: dict[int, int] = {}
            finished: set[int] = set()
            broken = None
            with ProcessPoolExecutor(max_workers=min(workers, len(remaining)), mp_context=ctx,
                                     initializer=_worker_init, initargs=(threads, queue)) as pool:
                futures = {pool.submit(_worker_execute, spec, info): spec for spec in remaining}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(queue, display, started, {s.index: s for s in remaining})
                    for fut in done:
                        spec = futures[fut]
                        try:
                            record = fut.result()
                        except BrokenProcessPool as exc:
                            broken = exc
                            continue
                        finished.add(spec.index)
                        write(record)
                    if broken is not None:
                        break
            _drain(queue, display, started, {s.index: s for s in remaining})
            if broken is None:
                return
            # a worker died (killed, out of memory, a crash in native code) and the pool with it: a run
            # in flight alone, or in flight at two such deaths, is recorded as failed; the others go
            # to a fresh pool
            in_flight = [s for s in remaining if s.index in started and s.index not in finished]
            for spec in in_flight:
                attempts[spec.index] = attempts.get(spec.index, 0) + 1
                if len(in_flight) == 1 or attempts[spec.index] >= 2:
                    record = base_record(spec, info) | {
                        "status": "failed", "started": _now(), "finished": _now(),
                        "error": {"type": "WorkerDied", "message": f"the worker process running this run died "
                                                                  f"({broken})", "traceback": ""}}
                    finished.add(spec.index)
                    write(_clean(record))
            remaining = [s for s in remaining if s.index not in finished]


def _drain(queue, display: Display, started: dict, specs: dict) -> None:
    import queue as queue_mod

    while True:
        try:
            msg = queue.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        if msg[0] == "start":
            started[msg[1]] = msg[2]
            display.start_run(msg[1], specs[msg[1]].name if msg[1] in specs else str(msg[1]))
        elif msg[0] == "progress":
            display.run_progress(msg[1], msg[2], msg[3])
