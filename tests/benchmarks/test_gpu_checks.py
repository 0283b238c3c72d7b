"""benchmarks/gpu_checks.py: the CPU smoke run checks every recipe of both families and tabulates it;
a decode whose tokens differ from eager's, that ran in another mode, fell back to eager forwards or
compiled again on a warmed pipeline is reported as a finding, and a failing row does not stop the rest."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
TINY = ["--device", "cpu", "--shape", "tiny", "--prompt-len", "16", "--gen-length", "16", "--block-length", "8"]


@pytest.fixture
def gpu_checks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its siblings as when run as a script
    return importlib.import_module("gpu_checks")


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {(r["family"], r["recipe"]): r for r in records}


def test_every_recipe_of_both_families_is_checked_and_tabulated(gpu_checks, tmp_path):
    assert gpu_checks.main([*TINY, "--mode", "eager", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert set(rows) == {(f, r) for f in ("llada", "dream") for r in gpu_checks.RECIPES}
    for row in rows.values():
        assert row["status"] == "ok" and row["findings"] == [], row
        assert all(row["equal"].values()) and row["stream"]["mode"] == "eager" and row["nfe"] > 0
    table = (tmp_path / "results.md").read_text()
    assert table.count("| OK |") == len(rows) and "shape tiny, float32, batch 2" in table


def test_a_decode_unlike_eagers_is_a_finding_and_a_failing_row_does_not_stop_the_rest(gpu_checks, tmp_path,
                                                                                      monkeypatch):
    """The pipeline in the checked mode ('auto', eager on the CPU) changes one token of each of its
    decodes for dual_cache, and raises for dare_o@0: both rows say so, the others are OK."""
    class Faulty(gpu_checks.Pipeline):
        def generate(self, *args, **kwargs):
            out = super().generate(*args, **kwargs)
            if self.recipe.execution.mode == "auto" and self.recipe.name == "dare_o@0":
                raise RuntimeError("capture failed")
            if self.recipe.execution.mode == "auto" and self.recipe.name == "dual_cache":
                out.sequences[0][-1] += 1
            return out

    monkeypatch.setattr(gpu_checks, "Pipeline", Faulty)
    gpu_checks.main([*TINY, "--mode", "auto", "--families", "llada", "--recipes", "baseline", "dual_cache",
                     "dare_o@0", "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    assert rows["llada", "baseline"]["findings"] == []
    assert "eager: 1 tokens (or commit steps) differ" in rows["llada", "dual_cache"]["findings"]
    assert rows["llada", "dare_o@0"]["status"] == "error: RuntimeError: capture failed"
    table = (tmp_path / "results.md").read_text()
    assert "| llada | dual_cache | **eager: 1 tokens" in table and "| **no** (1) |" in table


def test_findings_name_another_mode_eager_forwards_and_a_recompile(gpu_checks):
    ran = {"mode": "cuda_graphs", "compiles": 0, "eager_forwards": 0, "eager_reason": None}
    res = {"equal": dict.fromkeys(gpu_checks.CHECKS, True), "differing_tokens": dict.fromkeys(gpu_checks.CHECKS, 0),
           **{k: dict(ran) for k in gpu_checks.CHECKS}}
    assert gpu_checks.findings(res, "cuda_graphs") == []
    res["thread"] = dict(ran, mode="eager")
    res["stream"] = dict(ran, eager_forwards=64, eager_reason="a reuse object that cannot be captured")
    res["repeat"] = dict(ran, compiles=2)
    assert gpu_checks.findings(res, "cuda_graphs") == [
        "stream: 64 eager forwards (a reuse object that cannot be captured)", "thread: ran as eager, not cuda_graphs",
        "repeat: compiled 2 time(s) again on a warmed pipeline"]


def test_the_device_script_installs_by_links_when_pip_cannot_and_runs_both_scripts(tmp_path):
    """benchmarks/gpu_device_run.sh on the CPU (tiny shapes), its fallback install forced: the linked
    dist-info names the built-in plugins, which load from it, and both scripts' tables and the log
    are the five files in OUT."""
    import os
    import subprocess
    import sys

    tiny = "--device cpu --shape tiny --prompt-len 16 --gen-length 16 --block-length 8"
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SITE": str(tmp_path / "site"), "WORK": str(tmp_path / "work"),
           "TOTAL_S": "300", "PYTHON": sys.executable, "LINK_INSTALL": "1",
           "CHECKS_ARGS": f"{tiny} --mode eager --families llada --recipes baseline",
           "SUITE_ARGS": f"{tiny} --dtype float32 --modes eager --repeats 1 --only A1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_device_run.sh")], cwd=BENCHMARKS.parent, env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    (dist,) = (tmp_path / "site").glob("dare_pipeline-*.dist-info")
    entry_points = (dist / "entry_points.txt").read_text()
    assert "[dare_pipeline]\nbaseline = dare_pipeline_plugins.baseline:BaselineDecoding" in entry_points
    assert "plugins: ['baseline', 'dare_kv', 'dare_o', 'dllm_cache', 'dual_cache'" in done.stdout
    # five files come back, whatever else the scripts wrote (the device returns at most eight)
    assert sorted(p.name for p in out.iterdir()) == ["checks.jsonl", "checks.md", "run.log", "suite.jsonl",
                                                     "suite.md"]
    assert "| llada | baseline | OK |" in (out / "checks.md").read_text()
    assert "| A1 | llada tiny | baseline |" in (out / "suite.md").read_text()
    assert "gpu_checks: exit 0" in (out / "run.log").read_text()
