"""Accuracy through lm-eval: the `dare` lm-eval model, the offline task suite and the eval runner.

Importing this package registers the model `dare` with lm-eval (when lm-eval is installed:
`pip install dare-pipeline[eval]`). lm-eval has no plugin entry points for models, so its own
CLI needs our import first: use `python -m dare_pipeline.evaluation.lm_eval_cli` (or the
`dare-lm-eval` script), which does that and then runs lm-eval's CLI unchanged.
"""

from __future__ import annotations

import importlib.util

from .tasks import HELDOUT_FILE, TASKS_DIR

SUITE_GROUP = "dare_suite"
SUITE_TASKS = ("dare_add", "dare_sort", "dare_reverse", "dare_expr")

__all__ = ["HELDOUT_FILE", "SUITE_GROUP", "SUITE_TASKS", "TASKS_DIR"]

if importlib.util.find_spec("lm_eval") is not None:
    # importing registers the "dare" lm-eval model
    from .lm_eval_model import DareLM, DecodingStats

    __all__ += ["DareLM", "DecodingStats"]
