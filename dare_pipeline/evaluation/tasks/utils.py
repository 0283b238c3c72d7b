"""Dataset loading and scoring for the dare_* lm-eval tasks.

lm-eval imports this file by path (`!function utils.load_add` in the task YAMLs), not as a module
of the package, so every import here is absolute. Importing it also registers the `dare` model.
"""

from __future__ import annotations

import json
from pathlib import Path

from dare_pipeline.evaluation.suite import HELDOUT_FILE, score

try:  # so that `lm_eval --model dare --tasks <this directory>` finds the model
    import dare_pipeline.evaluation  # noqa: F401
except ImportError:  # pragma: no cover - lm-eval itself missing: nothing imports this file then
    pass


def read_family(family: str, path: str | Path = HELDOUT_FILE) -> list[dict]:
    """The held-out problems of one family, in file order (the few-shot `prompt` is ready-made)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record["family"] == family:
                    rows.append(record)
    if not rows:
        raise ValueError(f"{path}: no problems of family {family!r}")
    return rows


def _dataset(family: str, **_metadata):
    # lm-eval passes the run's metadata (model_args included) as keyword arguments: ignored.
    import datasets

    return {"test": datasets.Dataset.from_list(read_family(family))}


def load_add(**metadata):
    return _dataset("add", **metadata)


def load_sort(**metadata):
    return _dataset("sort", **metadata)


def load_reverse(**metadata):
    return _dataset("reverse", **metadata)


def load_expr(**metadata):
    return _dataset("expr", **metadata)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: the whole worked answer is right; final_match: the answer after `####` is."""
    got = score(doc, results[0])
    return {"exact_match": float(got["exact_match"]), "final_match": float(got["final_match"])}
