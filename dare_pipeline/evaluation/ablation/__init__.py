"""Ablations: run the product of plugin sets and parameter sweeps through lm-eval, one JSONL line
per run, resumable, in parallel or sharded; rebuild tables and plots from the results.

    dare-pipeline ablate ablations/fastdllm_table.yaml --limit 2 --workers 2
    dare-pipeline report runs/ablation/fastdllm_table.jsonl --out runs/ablation/fastdllm_table

See docs/ablation.md.
"""

from __future__ import annotations

from .schema import Ablation, PluginAxis, RunSpec, plan_runs, run_key

__all__ = ["Ablation", "PluginAxis", "RunSpec", "plan_runs", "run_key"]
