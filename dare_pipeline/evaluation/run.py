"""`dare-pipeline eval`: lm-eval's simple_evaluate with the `dare` model and the packaged tasks,
written as one results JSON (accuracy, recipe, decoding stats, versions, hardware).

Under torchrun / accelerate launch (WORLD_SIZE > 1) the problems are split over the processes
(lm-eval's data parallelism, see lm_eval_model.DareLM): every rank decodes its share, rank 0 gets
the gathered scores and the merged decoding statistics, and only rank 0 gets a results document.

Everything runs offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set (unless already set) before
lm-eval or datasets are imported, and the dare_* tasks read the packaged held-out file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ..config.loading import ConfigError

SCHEMA = "dare-pipeline/eval-results/v1"
METRICS = ("exact_match", "final_match")


def set_offline() -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def git_describe() -> str | None:
    """lm-eval's get_git_commit_hash without the noise: it runs `git describe` in the working
    directory and lets git print "fatal: not a git repository" to stderr wherever that is not a
    checkout. The same command with git's stderr discarded; None outside a checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def quiet_lm_eval_git() -> None:
    """Route lm-eval's git version lookup through git_describe (idempotent)."""
    from lm_eval import evaluator

    evaluator.get_git_commit_hash = git_describe


@contextlib.contextmanager
def quiet_lm_eval(verbose: bool = False):
    """lm-eval's warnings and log lines and its own progress bar (the one it draws while it builds
    the requests) kept off stderr while it runs, unless `verbose`; errors still show. The decoding's
    progress is ours (DareLM.show_progress)."""
    if verbose:
        yield
        return
    import functools
    import logging

    from lm_eval.api import task as lm_eval_task

    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, getattr(lm_eval_task, "tqdm", None)
    logger.setLevel(logging.ERROR)
    if bar is not None:
        lm_eval_task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is not None:
            lm_eval_task.tqdm = bar


@contextlib.contextmanager
def without_env_report():
    """lm-eval's environment report (`pip list` through a subprocess, ~1.3 s an evaluation) is left
    out: the results document has its own versions() and hardware()."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        evaluator.add_env_info = saved


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("transformers", "transformers"), ("lm_eval", "lm_eval"),
                       ("datasets", "datasets"), ("dare_pipeline", "dare-pipeline")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    return out


def hardware(device, ranks: int = 1) -> dict:
    """The machine (of rank 0 with data parallelism: `ranks` processes, each on its own device)."""
    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "cuda_available": torch.cuda.is_available()}
    if ranks > 1:
        info["ranks"] = ranks
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write via a temp file in the same directory + os.replace: readers never see a partial file."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write `text` (UTF-8, or bytes as they are) via a temp file in the same directory + os.replace:
    never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: this one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return path


def _metrics(entry: dict) -> dict:
    """lm-eval's "<metric>,<filter>" keys -> {metric: value, metric_stderr: value}."""
    out = {}
    for key, value in entry.items():
        name, _, _filter = key.partition(",")
        base = name.removesuffix("_stderr")
        if base in METRICS:
            out[name] = None if value == "N/A" else value
    return out


def summarize(raw: dict) -> tuple[dict, dict]:
    """Per-task and per-group accuracy from simple_evaluate's results."""
    groups = set(raw.get("groups", {}))
    tasks, group_rows = {}, {}
    for name, entry in raw.get("results", {}).items():
        row = _metrics(entry)
        n = raw.get("n-samples", {}).get(name, {})
        if name in groups:
            group_rows[name] = row | {"tasks": list(raw.get("group_subtasks", {}).get(name, []))}
        else:
            tasks[name] = row | {"n": n.get("effective"), "n_total": n.get("original")}
    for name, row in group_rows.items():
        row["n"] = sum(tasks[t]["n"] or 0 for t in row["tasks"] if t in tasks)
    return tasks, group_rows


def _samples(raw_samples: dict) -> dict:
    out = {}
    for task, rows in (raw_samples or {}).items():
        # by filter, then problem (with data parallelism the ranks' samples come one rank after the other)
        filters: dict = {}
        for r in rows:
            filters.setdefault(r.get("filter"), len(filters))
        rows = sorted(rows, key=lambda r: (filters[r.get("filter")], r.get("doc_id") or 0))
        out[task] = [{"doc_id": r.get("doc_id"), "id": r.get("doc", {}).get("id"),
                      "prompt": (r.get("arguments") or [[None]])[0][0], "target": r.get("target"),
                      "response": (r.get("filtered_resps") or [None])[0], **{m: r.get(m) for m in METRICS}}
                     for r in rows]
    return out


@contextlib.contextmanager
def _local_rank_zero(lm):
    """lm-eval's simple_evaluate hands back results only where LOCAL_RANK is 0 (its guard for
    tensor-parallel launches). A process that evaluates alone under a launcher (one shard of runs
    per rank, or data_parallel=false) must get its results too: LOCAL_RANK reads 0 meanwhile."""
    if lm.world_size > 1 or os.environ.get("LOCAL_RANK", "0") == "0":
        yield
        return
    saved = os.environ["LOCAL_RANK"]
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        os.environ["LOCAL_RANK"] = saved


def check_tasks(tasks: list[str], include_path=None):
    """The lm-eval TaskManager that knows `tasks`; ValueError naming the unknown ones (checked before
    anything runs). Our dare_* tasks are looked up first; lm-eval's own only when a task is not ours."""
    set_offline()
    from lm_eval.tasks import TaskManager

    from . import TASKS_DIR

    if not tasks:
        raise ValueError("no task given; the suite's tasks: dare_suite, dare_add, dare_sort, dare_reverse, dare_expr")
    paths = [str(TASKS_DIR)] + [str(p) for p in ([include_path] if isinstance(include_path, (str, Path))
                                                 else include_path or [])]
    manager = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    ours = [t for t in missing if t.startswith("dare_")]
    if ours:
        raise ValueError(f"unknown task(s) {ours}; the suite's tasks: {sorted(manager.all_tasks)}")
    if missing:  # lm-eval's own tasks (these may need the network)
        manager = TaskManager(include_path=paths, include_defaults=True)
        unknown = [t for t in missing if not manager.match_tasks([t])]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: neither one of the suite's tasks "
                             f"(dare_suite, dare_add, dare_sort, dare_reverse, dare_expr) nor an lm-eval task")
    return manager


def evaluate(tasks: list[str], recipe=None, model=None, overrides=(), batch_size: int = 1, limit=None,
             chat: bool = False, log_samples: bool = False, include_path=None, lm=None, command=None,
             verbose: bool = False) -> dict | None:
    """Run the tasks and return the results document (see docs/evaluation.md).

    Without `verbose`, lm-eval's warnings and its own progress bars stay off stderr, and the
    decoding's progress bar shows only on a terminal.

    With data parallelism (several ranks) every rank must call it; rank 0 gets the document (with
    every rank's problems and decoding statistics), the other ranks get None."""
    set_offline()
    from lm_eval import simple_evaluate

    from .lm_eval_model import DareLM

    quiet_lm_eval_git()

    t0 = time.perf_counter()
    manager = check_tasks(tasks, include_path)  # before the model loads
    if lm is None:
        lm = DareLM(recipe=recipe, model=model, set=list(overrides), batch_size=batch_size)
    lm.show_progress = verbose or _on_a_terminal()
    if lm.world_size > 1 and limit is not None and limit >= 1 and int(limit) < lm.world_size:
        # lm-eval gives rank r the problems r, r + W, ...: a rank without any stops with "did not find
        # any docs" while the others wait for it
        raise ValueError(f"--limit {limit} gives some of the {lm.world_size} data-parallel processes no problem; "
                         f"use a limit of at least {lm.world_size} or fewer processes")
    with _local_rank_zero(lm), quiet_lm_eval(verbose), without_env_report():
        raw = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                              log_samples=log_samples, apply_chat_template=chat, fewshot_as_multiturn=False,
                              bootstrap_iters=1000)
    stats = lm.gathered_stats() if hasattr(lm, "gathered_stats") else lm.stats  # collective with several ranks
    if raw is None:  # another rank than 0: its share is in rank 0's results
        return None
    task_rows, group_rows = summarize(raw)
    decoding = stats.to_dict()
    doc = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": task_rows,
        "groups": group_rows,
        "recipe": lm.recipe.to_dict(),
        "recipe_source": lm.recipe.source,
        "model": {"source": str(lm.model.source), "family": lm.config.family, "dtype": str(lm.model.dtype),
                  "device": str(lm.model.device), "parameters": sum(p.numel() for p in lm.model.parameters())},
        "decoding": decoding,
        "eval": {"tasks": list(tasks), "limit": limit, "batch_size": lm.batch_size, "chat_template": bool(chat),
                 "num_fewshot": {t: c.get("num_fewshot") for t, c in raw.get("configs", {}).items()},
                 "task_versions": dict(raw.get("versions", {})), "wall_time_s": round(time.perf_counter() - t0, 3),
                 "command": command, "git_hash": raw.get("git_hash")},
        "versions": versions(),
        "hardware": hardware(lm.model.device, ranks=lm.world_size),
    }
    if log_samples:
        doc["samples"] = _samples(raw.get("samples"))
    return doc


def _on_a_terminal() -> bool:
    import sys

    return getattr(sys.stderr, "isatty", lambda: False)()


def format_table(doc: dict) -> str:
    rows = [("task", "n", "exact_match", "final_match")]
    for name, row in list(doc["tasks"].items()) + list(doc["groups"].items()):
        rows.append((name, str(row.get("n")), *(f"{row[m]:.4f}" if isinstance(row.get(m), (int, float)) else "-"
                                                for m in METRICS)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    d = doc["decoding"]
    lines.append(f"[{doc['recipe']['name']}] requests={d['requests']} nfe_total={d['nfe_total']} "
                 f"nfe/request={d['nfe_per_request']:.1f} generated={d['generated_tokens']} "
                 f"tokens/s={d['tokens_per_second']:.1f} decode={d['decode_time_s']:.2f}s "
                 f"total={doc['eval']['wall_time_s']:.2f}s")
    return "\n".join(lines)
