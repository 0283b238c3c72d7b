"""lm-eval task configs for the synthetic suite (one task per family, the group `dare_suite`).

This directory is what `--include_path` points at; `heldout.jsonl` is a packaged copy of the
repository's `data/heldout.jsonl` (a test checks they are identical).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
HELDOUT_FILE = TASKS_DIR / "heldout.jsonl"
