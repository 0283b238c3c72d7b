"""lm-eval task configs for the synthetic suite (one task per family, the group `dare_suite`).

This directory is what `--include_path` points at; `heldout.jsonl` holds the 500 held-out problems
(docs/tasks.md), the one copy everything reads (`dare_pipeline.evaluation.suite.HELDOUT_FILE`).
"""

from pathlib import Path

from dare_pipeline.evaluation.suite import HELDOUT_FILE

TASKS_DIR = Path(__file__).parent

__all__ = ["HELDOUT_FILE", "TASKS_DIR"]
