"""The results file: one JSON object per line, one line per run, appended as each run finishes.

Appends are crash-safe: each record is one `os.write` of a complete line (with its newline) on a
descriptor opened with O_APPEND, followed by fsync. A crash can at worst leave a partial last line
(a write interrupted by power loss); readers skip lines that do not parse (with a warning), and the
next append starts on a fresh line, so resuming always works. One process writes a results file at
a time (the parent process, with --workers); shards on different machines write different files,
merged afterwards by `dare-pipeline report a.jsonl b.jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = "dare-pipeline/ablation-run/v2"
# v1 records (no timed repeats) are read as they are: their runs are done, and a run asked for with
# repeats gets them on the next invocation; records of another schema are skipped with a warning
READABLE_SCHEMAS = ("dare-pipeline/ablation-run/v1", SCHEMA)
# when two records share a run key: a finished run beats a failed one, which beats a skipped one;
# among equals the later record wins
_RANK = {"ok": 2, "failed": 1, "skipped": 0}


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a complete line, flushed to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=False, default=str, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:  # a partial last line left by a crash: start on a fresh line
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:  # a failed write names no file: this one (a partial line is skipped on reading)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike, schemas=READABLE_SCHEMAS) -> list[dict]:
    """Every complete record of a results file, in file order. A line that is not a record is
    skipped with a warning naming the file and line: a partial line from a crash, bytes that are not
    UTF-8, JSON that is not an object with a string `key`, a record of a schema not in `schemas`.
    A missing file has no records."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            problem = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                log.warning("%s:%d: not UTF-8 (%s); line ignored", path, n, exc.reason)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: not a complete JSON record (interrupted write?); ignored", path, n)
                continue
            if not isinstance(record, dict) or "key" not in record:
                problem = "not a run record"
            elif not isinstance(record["key"], str):
                problem = f"run key {record['key']!r} is not a string"
            elif record.get("schema") is not None and record.get("schema") not in schemas:
                problem = f"schema {record.get('schema')!r} is not one this version reads ({list(schemas)})"
            if problem:
                log.warning("%s:%d: %s; ignored", path, n, problem)
                continue
            out.append(record)
    return out


def _order(record: dict) -> tuple:
    status = record.get("status")
    return (_RANK.get(status, -1) if isinstance(status, str) else -1, str(record.get("finished") or ""),
            str(record.get("recorded") or ""))


def dedupe(records: list[dict]) -> list[dict]:
    """One record per run key (a finished run over a failed one over a skipped one; among equals the
    one whose first pass finished last, then the one recorded last, then the later one), in the
    order the keys first appear."""
    best: dict[str, dict] = {}
    for r in records:
        k = r["key"]
        if k not in best or _order(r) >= _order(best[k]):
            best[k] = r
    return list(best.values())


def merge(paths) -> list[dict]:
    """The records of several results files, deduplicated by run key."""
    records = []
    for p in paths:
        records.extend(read_records(p))
    return dedupe(records)


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write a whole results file atomically (temp file + os.replace)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: this one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return path
