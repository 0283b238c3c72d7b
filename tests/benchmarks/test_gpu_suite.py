"""benchmarks/gpu_suite.py: the CPU smoke run (tiny shape, eager) measures every row and writes the JSON
lines and the markdown table; a failing, overlong or over-budget row is recorded and the suite goes on."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
TINY = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--modes", "eager", "--prompt-len", "16",
        "--gen-length", "16", "--block-length", "8", "--b-batch", "2", "--f-rows", "8,24", "--f-iters", "2",
        "--repeats", "1"]


@pytest.fixture
def gpu_suite(monkeypatch):
    # the benchmark scripts import their sibling `common` as a top-level module, as when run as scripts
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_suite")


def read(out: Path) -> tuple[list[dict], dict[str, dict], str]:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rows = {r["id"]: r for r in records if r["type"] == "row"}
    return records, rows, (out / "results.md").read_text()


def test_every_row_of_the_cpu_smoke_run_is_measured_and_tabulated(gpu_suite, tmp_path, capsys):
    assert gpu_suite.main([*TINY, "--out", str(tmp_path)]) == 0
    planned = [r.id for r in gpu_suite.plan_rows(gpu_suite.parse_args(TINY))]
    records, rows, md = read(tmp_path)
    assert records[0]["type"] == "conditions" and records[-1]["type"] == "end"
    assert list(rows) == planned
    assert {r.sub for r in gpu_suite.plan_rows(gpu_suite.parse_args(TINY))} == {"A1", "D", "B1", "A2", "E", "F", "B2",
                                                                               "G"}
    for row_id, r in rows.items():
        assert r["status"] == "ok", (row_id, r["status"], r.get("traceback"))
        if r["kind"] == "decode" and r["sub"] == "G":  # a run of drafts a random guide agrees with saves forwards
            assert r["nfe"] <= r["steps"] and r["ms_per_step"]["min"] > 0
            assert r["guided"]["guide_forwards"] == r["nfe"] and r["guided"]["guide_flops"] > 0
            assert r["guided"]["fallbacks"] + r["guided"]["accepted"] >= r["nfe"]
            assert r["guided"]["guide_execution"] == "eager"
        elif r["kind"] == "decode":
            assert r["nfe"] == r["steps"] and r["ms_per_step"]["min"] > 0
            assert r["peak_mem_gib"] == "n/a on cpu"
            assert r["resolved_mode"] in ("eager", None)
    assert rows["D.dual_cache.eager"]["busy_fraction"] == "n/a on cpu"
    for recipe in gpu_suite.RECIPES:
        assert f"| {recipe} |" in md
    assert "## D:" in md and "## F:" in md and "| llada tiny | 24 |" in md and "Not measured" not in md
    assert md in capsys.readouterr().out  # the table is printed at the end


def test_a_failing_row_is_recorded_and_the_rest_continue(gpu_suite, tmp_path, monkeypatch):
    measure = gpu_suite.MEASURE["decode"]

    def flaky(suite, row):
        if row.recipe == "prefix_cache":
            raise RuntimeError("injected failure")
        return measure(suite, row)

    monkeypatch.setitem(gpu_suite.MEASURE, "decode", flaky)
    gpu_suite.main([*TINY, "--only", "A1", "F", "--out", str(tmp_path)])
    _, rows, md = read(tmp_path)
    assert list(rows) == ["A1.baseline.eager", "A1.dual_cache.eager", "A1.prefix_cache.eager", "F.rows8.eager",
                          "F.rows24.eager"]
    failed = rows.pop("A1.prefix_cache.eager")
    assert failed["status"] == "error: RuntimeError: injected failure"
    assert "injected failure" in failed["traceback"]
    assert all(r["status"] == "ok" for r in rows.values())
    assert "- A1.prefix_cache.eager: error: RuntimeError: injected failure" in md


def test_an_overlong_row_times_out_and_the_budget_skips_the_rest(gpu_suite, tmp_path, monkeypatch):
    measure = gpu_suite.MEASURE["decode"]

    def slow_baseline(suite, row):
        if row.recipe == "baseline":
            time.sleep(30)  # interrupted by the alarm
        return measure(suite, row)

    monkeypatch.setitem(gpu_suite.MEASURE, "decode", slow_baseline)
    started = time.perf_counter()
    gpu_suite.main([*TINY, "--only", "A1", "--row-timeout-s", "3", "--out", str(tmp_path / "timeout")])
    _, rows, _ = read(tmp_path / "timeout")
    assert rows["A1.baseline.eager"]["status"].startswith("error: timeout after")
    assert rows["A1.dual_cache.eager"]["status"] == rows["A1.prefix_cache.eager"]["status"] == "ok"

    gpu_suite.main([*TINY, "--only", "A1", "D", "--budget-s", "1", "--out", str(tmp_path / "budget")])
    _, rows, md = read(tmp_path / "budget")
    assert time.perf_counter() - started < 30
    assert rows.pop("A1.baseline.eager")["status"].startswith("skipped (budget): interrupted after")
    assert {r["status"] for r in rows.values()} == {"skipped (budget)"}
    assert "- D.dual_cache.eager: skipped (budget)" in md


def test_only_and_quick_select_rows_and_lengths(gpu_suite):
    args = gpu_suite.parse_args(["--only", "A1,d", "--quick"])
    assert [r.id for r in gpu_suite.plan_rows(args)] == [
        "A1.baseline.eager", "A1.baseline.cuda_graphs", "A1.dual_cache.eager", "A1.dual_cache.cuda_graphs",
        "A1.prefix_cache.eager", "A1.prefix_cache.cuda_graphs", "D.dual_cache.cuda_graphs"]
    assert (args.gen_length, args.steps, args.reuse_steps, args.b_steps) == (64, 64, 16, 16)
    full = gpu_suite.parse_args([])
    assert (full.gen_length, full.steps, full.reuse_steps, full.b_steps, full.b_batch) == (256, 256, 64, 64, 32)
    f_rows = [r.id for r in gpu_suite.plan_rows(gpu_suite.parse_args(["--only", "F"]))]
    assert f_rows == ["F.rows32.eager", "F.rows768.eager", "F.rows32.reduce-overhead", "F.rows768.reduce-overhead"]


def test_busy_time_is_the_union_of_device_intervals(gpu_suite):
    events = [("gemm", "kernel", 0.0, 100.0), ("gemm2", "kernel", 50.0, 100.0),  # overlap: busy 0-150
              ("Memcpy HtoD", "memcpy", 300.0, 50.0), ("## replay ##", "other", 0.0, 400.0)]
    busy = gpu_suite.busy_summary(events)
    assert busy["busy_ms"] == pytest.approx(0.2)  # 150 us + 50 us; the annotation is not device work
    assert busy["kernel_ms"] == pytest.approx(0.2) and busy["kernels"] == 2 and busy["memop_ms"] == pytest.approx(0.05)
    assert gpu_suite.busy_summary([])["busy_ms"] == 0.0
    classify = gpu_suite.classify
    assert classify("x", "gpu_user_annotation", True, set()) == "other"
    assert classify("triton_poi_fused_0", "kernel", False, set()) == "kernel"
    assert classify("Memset (Device)", None, False, set()) == "memset"
    assert classify("CUDAGraphNode.replay", None, False, {"CUDAGraphNode.replay"}) == "other"
    assert classify("sm90_xmma_gemm", None, False, {"aten::mm"}) == "kernel"


class _FakeKinetoEvent:
    def __init__(self, name, device, start_us, dur_us, activity):
        self._name, self._device, self._start, self._dur, self._activity = name, device, start_us, dur_us, activity

    def name(self):
        return self._name

    def device_type(self):
        return self._device

    def start_ns(self):
        return int(self._start * 1e3)

    def duration_ns(self):
        return int(self._dur * 1e3)

    def activity_type(self):
        return self._activity

    def is_user_annotation(self):
        return "annotation" in self._activity


def test_device_events_reads_only_device_work_from_a_profile(gpu_suite):
    import torch

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    raw = [_FakeKinetoEvent("aten::mm", cpu, 0, 500, "cpu_op"),
           _FakeKinetoEvent("cudaGraphLaunch", cpu, 0, 10, "cuda_runtime"),
           _FakeKinetoEvent("gemm", cuda, 10, 100, "kernel"),
           _FakeKinetoEvent("## replay ##", cuda, 0, 400, "gpu_user_annotation"),
           _FakeKinetoEvent("Memcpy DtoH", cuda, 200, 20, "gpu_memcpy")]

    class Prof:
        class profiler:
            class kineto_results:
                @staticmethod
                def events():
                    return raw

    events, method = gpu_suite.device_events(Prof)
    assert method.startswith("kineto")
    assert [(name, kind) for name, kind, _, _ in events] == [("gemm", "kernel"), ("## replay ##", "other"),
                                                             ("Memcpy DtoH", "memcpy")]
    busy = gpu_suite.busy_summary(events)
    assert busy["busy_ms"] == pytest.approx(0.12) and busy["kernel_ms"] == pytest.approx(0.1)
