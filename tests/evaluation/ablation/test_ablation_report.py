"""FLOPs formula, speed-up / additive gain / Pareto front arithmetic on hand-made records, the
progress display, and the results file's crash safety (no model needed)."""

import io
import json
import math

import pytest
import torch

from dare_pipeline.evaluation.ablation.display import Display
from dare_pipeline.evaluation.ablation.analysis import Analysis, pareto_front
from dare_pipeline.evaluation.ablation.report import markdown, write_report
from dare_pipeline.evaluation.ablation.results import append_record, dedupe, read_records
from dare_pipeline.plugin_kit.testing import tiny_config
from dare_pipeline.reuse import flops


def test_flops_per_row_formula():
    cfg = tiny_config("dream", d_model=48, n_heads=4, n_kv_heads=2, vocab_size=64)  # d_kv = 2 * 12 = 24
    d, f, v, length = 48, 96, 64, 100
    cost = flops.per_row(cfg, length)
    assert cost == {"q": 2 * d * d, "kv": 2 * 2 * d * 24, "attn": 4 * length * d + 2 * d * d, "ffn": 6 * d * f,
                    "v": 2 * d * 24, "lm_head": 2 * d * v}
    rows = torch.tensor([[10, 4, 3, 10], [10, 0, 10, 10]])  # (layers, [q, kv, attn, ffn])
    est = flops.estimate(cfg, rows, length, head_rows=5)
    assert est["q"] == 20 * cost["q"] and est["kv"] == 4 * cost["kv"] and est["attn"] == 13 * cost["attn"]
    assert est["ffn"] == 20 * cost["ffn"] and est["lm_head"] == 5 * cost["lm_head"]
    assert est["total"] == sum(v for k, v in est.items() if k != "total")
    # the same rows given as dicts per layer, or already summed
    as_dicts = [dict(zip(flops.SUB_OPS, r)) for r in rows.tolist()]
    assert flops.estimate(cfg, as_dicts, length, 5) == est
    assert flops.estimate(cfg, {"q": 20, "kv": 4, "attn": 13, "ffn": 20}, length, 5) == est
    full = flops.full_recompute(cfg, forwards=2, rows_per_forward=5, key_length=length, head_rows=5)
    assert full == flops.estimate(cfg, torch.full((2, 4), 10), length, 5)  # no value-only rows in a plain forward
    with_v = flops.estimate(cfg, torch.tensor([[10, 4, 3, 10, 7], [10, 0, 10, 10, 0]]), length, 5)
    assert with_v["v"] == 7 * cost["v"] and with_v["total"] == est["total"] + 7 * cost["v"]
    assert flops.format_flops(2.5e9) == "2.50 GFLOP"


def _rec(index, plugins, tps, acc, sweep=None, flops_per_request=100.0, status="ok", **extra):
    recipe = {"name": "+".join(plugins) or "baseline", "model": "m", "generation": {"gen_length": 64,
                                                                                     **(extra.pop("gen", {}))},
              "plugins": [{"name": p, "x": 1} for p in plugins]}
    return {"key": f"k{index}", "index": index, "ablation": "a", "label": recipe["name"], "name": recipe["name"],
            "plugins": list(plugins), "sweep": sweep or {}, "tasks": ["t"], "limit": 2, "batch_size": 1,
            "status": status, "recipe": recipe, "finished": f"2026-01-01T00:00:{index:02d}",
            "accuracy": {"t": {"exact_match": acc, "final_match": acc, "n": 2}},
            "metrics": {"tokens_per_second": tps, "flops_per_request": flops_per_request, "nfe_per_request": 10},
            "reuse": {"flops": 0.5 if plugins else 0.0}, **extra}


def test_speedup_additive_gain_and_pareto():
    records = [_rec(0, [], 10, 0.5), _rec(1, ["a"], 20, 0.5, flops_per_request=50),
               _rec(2, ["b"], 30, 0.4), _rec(3, ["a", "b"], 90, 0.3),
               # another setting: its own baseline
               _rec(4, [], 5, 0.6, gen={"gen_length": 128}), _rec(5, ["a"], 20, 0.6, gen={"gen_length": 128})]
    an = Analysis(records)
    sp = {r["index"]: an.speedup(r) for r in an.ok}
    assert sp == {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0, 4: 1.0, 5: 4.0}
    assert an.flops_ratio(records[1]) == 2.0
    gains = sorted((g["strategy"], g["combination"], g["gain"]) for g in an.additive_gains())
    # a over {} (once per setting), a over {b}, b over {}, b over {a}
    assert gains == [("a", "b", 3.0), ("a", "baseline", 2.0), ("a", "baseline", 4.0), ("b", "a", 4.5),
                     ("b", "baseline", 3.0)]
    pts = [(1.0, 0.5), (2.0, 0.5), (3.0, 0.4), (9.0, 0.3), (1.5, 0.2)]
    assert pareto_front(pts) == [1, 2, 3]


def test_report_without_a_baseline_or_plots_data(tmp_path):
    records = [_rec(1, ["a"], 20, 0.5), _rec(2, ["b"], 0, None, status="failed",
                                             error={"type": "ValueError", "message": "bad\nthing"}),
               _rec(3, ["c"], None, None, status="skipped", reason="unknown plugin 'c'")]
    files = write_report(records, tmp_path)
    names = {f.name for f in files}
    assert names == {"report.md", "results.csv"}  # nothing to plot: no speed-up without a baseline
    md = (tmp_path / "report.md").read_text()
    assert "| a |" in md and "failed: **b** — `ValueError`: bad thing" in md
    assert "skipped: **c** — unknown plugin 'c'" in md
    # speed-up is "-" without a baseline run
    row = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert row.split(" | ")[4] == "-"


def test_a_report_replaces_the_last_one_whole_and_drops_what_no_longer_has_data(tmp_path, monkeypatch):
    """A report over an earlier one: its additive gains and plots go when the new records have no
    pairs; an interruption while a file is written leaves that file as it was, and no temporary file."""
    from dare_pipeline.evaluation import run

    with_pairs = [_rec(0, [], 10, 0.5), _rec(1, ["a"], 20, 0.5), _rec(2, ["b"], 30, 0.4),
                  _rec(3, ["a", "b"], 90, 0.3)]
    assert {f.name for f in write_report(with_pairs, tmp_path)} >= {"additive_gain.csv", "additive_gain.png"}
    write_report([_rec(1, ["a"], 20, 0.5)], tmp_path)  # no baseline: no pairs, nothing to plot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.csv"]

    before = {name: (tmp_path / name).read_bytes() for name in ("report.md", "results.csv")}
    replace = run.os.replace

    def interrupted(src, dst):
        if str(dst).endswith("results.csv"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(run.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(with_pairs, tmp_path)
    assert (tmp_path / "results.csv").read_bytes() == before["results.csv"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    written = write_report(with_pairs, tmp_path)
    assert all(f.read_bytes() for f in written) and (tmp_path / "additive_gain.png").read_bytes()[:4] == b"\x89PNG"


def test_skipped_record_superseded_by_a_measured_run_is_not_listed(tmp_path):
    skipped = _rec(1, ["a"], None, None, status="skipped", reason="unknown plugin 'a'")
    skipped["key"] = "raw"
    an = Analysis([_rec(0, [], 10, 0.5), skipped, _rec(1, ["a"], 20, 0.5)])
    assert an.skipped == [] and len(an.ok) == 2


def test_dedupe_prefers_finished_runs_then_the_latest():
    a = {"key": "k", "status": "failed", "finished": "2"}
    b = {"key": "k", "status": "ok", "finished": "1"}
    c = {"key": "k", "status": "ok", "finished": "3"}
    assert dedupe([a, b]) == [b] and dedupe([b, a]) == [b] and dedupe([c, b, a]) == [c]
    assert dedupe([{"key": "k", "status": "skipped"}, a]) == [a]
    # a run timed here on a first pass reused from another file: the same `finished`, recorded later
    donor = {"key": "k", "status": "ok", "finished": "1", "recorded": "1"}
    taker = {"key": "k", "status": "ok", "finished": "1", "recorded": "2"}
    assert dedupe([taker, donor]) == [taker] and dedupe([donor, taker]) == [taker]


def test_append_is_line_complete_and_partial_lines_are_skipped(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    append_record(path, {"key": "a", "x": 1})
    with open(path, "a") as f:
        f.write('{"key": "b", "x"')  # a write cut short
    append_record(path, {"key": "c", "x": 3})
    assert [r["key"] for r in read_records(path)] == ["a", "c"]
    assert "not a complete JSON record" in caplog.text
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1]) == {"key": "c", "x": 3} and path.read_text().endswith("\n")
    with pytest.raises(ValueError):  # NaN would not be JSON: the runner cleans values before writing
        append_record(path, {"key": "d", "x": float("nan")})


def test_display_rich_and_plain():
    stream = io.StringIO()
    d = Display(2, rich=True, stream=stream)
    d.start_run(0, "baseline")
    d.run_progress(0, 1, 2)
    d.finish_run({"index": 0, "name": "baseline", "status": "ok", "accuracy_mean": 0.5, "wall_time_s": 1.0,
                  "metrics": {"tokens_per_second": 10.0, "nfe_per_request": 4.0}})
    d.finish_run({"index": 1, "name": "x", "status": "failed", "error": {"type": "E", "message": "m"}})
    d.close()
    text = stream.getvalue()
    assert "[1/2] #0 baseline: ok acc=0.500" in text and "FAILED E: m" in text
    plain = io.StringIO()
    d = Display(1, stream=plain)  # not a TTY: one line per run, no bars
    d.finish_run({"index": 3, "name": "y", "status": "skipped", "reason": "refused"})
    assert plain.getvalue() == "[1/1] #3 y: skipped: refused\n"
    quiet = io.StringIO()
    d = Display(1, quiet=True, stream=quiet)
    d.start_run(3, "y")
    d.run_progress(3, 5, 10)
    d.finish_run({"index": 3, "name": "y", "status": "skipped", "reason": "refused"})
    assert quiet.getvalue() == ""


def test_a_long_run_logs_its_progress_by_tenths_at_most_every_interval(monkeypatch):
    from dare_pipeline.evaluation.ablation import display

    clock = [0.0]
    monkeypatch.setattr(display.time, "perf_counter", lambda: clock[0])
    log = io.StringIO()
    d = Display(1, stream=log, log_every_s=60)
    d.start_run(0, "baseline")
    for done, at in ((10, 30), (19, 61), (20, 62), (30, 100), (95, 122), (99, 900), (100, 1000)):
        clock[0] = at
        d.run_progress(0, done, 100)
    assert log.getvalue().splitlines() == [
        "  #0 baseline: 19/100 done, 0:01:01 elapsed",    # 30 s in: too early; 61 s: past its first tenth
        "  #0 baseline: 95/100 done, 0:02:02 elapsed"]    # a tenth more, but each line waits its interval
    # 99: no new tenth; 100/100: the run's own line says it


def test_threshold_sweep_gets_a_reuse_plot(tmp_path):
    records = [_rec(0, [], 10, 0.5)]
    for i, t in enumerate((0.05, 0.1, 0.2), 1):
        r = _rec(i, ["dare_o"], 10 + i, 0.5 - 0.1 * i, sweep={"plugins.dare_o.threshold": t})
        r["recipe"]["plugins"][0]["threshold"] = t
        r["reuse"] = {"flops": 0.1 * i, "plugins": {"dare_o": {"reuse_fraction": 0.2 * i}}}
        records.append(r)
    files = {f.name for f in write_report(records, tmp_path)}
    assert {"reuse_vs_threshold.png", "accuracy_vs_speedup.png", "additive_gain.png"} <= files
    md = (tmp_path / "report.md").read_text()
    assert "| dare_o (dare_o.threshold=0.2) |" in md
    assert (tmp_path / "reuse_vs_threshold.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("thresholds, scale, shown", [
    ((0.001, 0.01, 0.1), "log", ["0.001", "0.01", "0.1"]),          # decades: each gets its own room
    ((0.0, 0.0005, 0.01, 0.1), "symlog", ["0", "0.0005", "0.01", "0.1"]),  # 0 swept too
    ((0.05, 0.1, 0.2), "linear", ["0.05", "0.1", "0.2"]),            # less than a decade: linear
    ((0.1,), "linear", ["0.1"])])                                    # one value: only its own tick
def test_thresholds_spanning_decades_get_a_log_axis_labelled_with_the_swept_values(thresholds, scale, shown):
    from dare_pipeline.evaluation.ablation.plots import reuse_threshold_figure

    records = [_rec(0, [], 10, 0.5)]
    for i, t in enumerate(thresholds, 1):
        r = _rec(i, ["dare_o"], 10 + i, 0.5, sweep={"plugins.dare_o.threshold": t})
        r["reuse"] = {"flops": 0.1 * i, "plugins": {"dare_o": {"reuse_fraction": 0.2 * i}}}
        records.append(r)
    fig, plt = _figure(reuse_threshold_figure, records)
    ax = fig.axes[0]
    scale_seen, ticks = ax.get_xscale(), _shown_ticks(ax)
    xs = [ax.transData.transform((t, 0))[0] for t in thresholds]
    plt.close(fig)
    assert scale_seen == scale and ticks == shown
    if scale != "linear":
        gaps = [b - a for a, b in zip(xs, xs[1:])]
        assert min(gaps) > 0.25 * max(gaps)  # no swept value crowded against its neighbour


# ---- timed repeats: spreads, intervals, within noise ------------------------------------------------

def _timed(record, tps_values):
    from dare_pipeline.evaluation.ablation import timing

    samples = [{"tokens_per_second": t, "decode_time_s": 10 / t, "decode_cpu_s": 5 / t} for t in tps_values]
    record["metrics"]["requests"] = 2
    return record | {"timing": timing.summarize(samples, len(samples))}


def test_the_processes_named_are_those_the_tokens_per_second_came_from():
    """Accuracy under --data-parallel (2 processes), timing later in one process: the caption and
    the comparison with the baseline go by the timed passes' processes."""
    from dare_pipeline.evaluation.ablation import timing
    from dare_pipeline.evaluation.ablation.plot_parts import caption

    def run(index, plugins, first_pass_ranks, timed_ranks):
        r = _rec(index, plugins, 10, 0.5)
        r["hardware"] = {"machine": "x86_64", "cpu_count": 2, "torch_threads": 1, "device": "cpu",
                         **({"ranks": first_pass_ranks} if first_pass_ranks > 1 else {})}
        if timed_ranks is not None:
            passes = [{"metrics": {"tokens_per_second": t, "decode_time_s": 1.0, "requests": 4, "ranks": timed_ranks}}
                      for t in (9.0, 11.0)]
            r["timing"] = timing.summarize([timing.sample(p) for p in passes], 2)
        return r

    assert timing.sample({"metrics": {"ranks": 2}})["ranks"] == 2
    one = " ".join(caption([run(0, [], 2, 1)], 200).split())
    assert "(x86_64 with 2 cores, 1 torch thread)" in one and "processes" not in one
    assert "1 torch thread, 2 processes)" in " ".join(caption([run(0, [], 2, 2)], 200).split())
    assert "1 torch thread, 2 processes)" in " ".join(caption([run(0, [], 2, None)], 200).split())  # untimed
    old = run(0, [], 2, 1)
    for s in old["timing"]["samples"]:
        del s["ranks"]  # timed by a version that did not keep them: the first pass's processes
    assert "2 processes" in " ".join(caption([old], 200).split())
    # a run timed in one process against a baseline timed in two: not comparable, marked
    assert Analysis([run(0, [], 2, 2), run(1, ["a"], 2, 1)]).other_hardware(run(1, ["a"], 2, 1))
    assert not Analysis([run(0, [], 2, 1), run(1, ["a"], 1, 1)]).other_hardware(run(1, ["a"], 1, 1))


def test_runs_of_per_rank_gpu_shards_compare_with_a_baseline_on_another_gpu():
    """torchrun with one shard of the runs per GPU: each rank's recipes say cuda:<rank>. A run whose
    baseline ran on another GPU of the same model has its speed-up and gains, and no mark; a baseline
    on a GPU of another model is marked."""
    def on(index, plugins, tps, gpu_index, gpu="NVIDIA H100"):
        r = _rec(index, plugins, tps, 0.5)
        r["recipe"]["device"] = f"cuda:{gpu_index}"
        r["hardware"] = {"machine": "x86_64", "cpu_count": 16, "torch_threads": 1, "device": f"cuda:{gpu_index}",
                         "gpu": gpu}
        return r

    records = [on(0, [], 10, 0), on(1, ["a"], 20, 1), on(2, ["b"], 30, 2), on(3, ["a", "b"], 90, 3)]
    an = Analysis(records)
    assert [an.speedup(r) for r in records] == [1.0, 2.0, 3.0, 9.0]
    assert not any(an.other_hardware(r) for r in records)
    assert sorted((g["strategy"], g["combination"], g["gain"]) for g in an.additive_gains()) == [
        ("a", "b", 3.0), ("a", "baseline", 2.0), ("b", "a", 4.5), ("b", "baseline", 3.0)]
    elsewhere = on(1, ["a"], 20, 1, gpu="NVIDIA H200")
    assert Analysis([records[0], elsewhere]).other_hardware(elsewhere)


def test_a_speed_up_of_tokens_per_second_measured_otherwise_than_its_baselines_is_marked(tmp_path):
    """An interrupted ablation with repeats: the baseline timed, a run's repeats still pending (its
    tokens/s from its cold first pass). Its speed-up and gain are marked ‡ and explained; runs timed
    like their baseline are not."""
    from dare_pipeline.evaluation.ablation import timing

    base, done, pending = _timed(_rec(0, [], 10, 0.5), [9, 10, 11]), _timed(_rec(1, ["a"], 20, 0.5), [19, 21]), \
        _rec(2, ["b"], 30, 0.5)
    pending["timing"] = timing.pending(3)
    an = Analysis([base, done, pending])
    assert [an.other_timing(r) for r in (base, done, pending)] == [False, False, True]
    regimes = {g["with"]: g["unlike_timing"] for g in an.additive_gains()}
    assert regimes == {"a": False, "b": True}
    md = markdown(an)
    table = md.split("## Additive gain")[0]
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "3.00x ‡" in rows["| b"] and "‡" not in rows["| a"]
    assert "‡ its tokens/s measured otherwise than its baseline's" in md
    assert "| b | baseline | 3.00x | - | untimed ‡ |" in md
    # timed over another number of problems a task than its baseline
    other = _timed(_rec(2, ["b"], 30, 0.5), [29, 31])
    other["timing"]["limit"] = 1
    assert Analysis([base, other]).other_timing(other)
    assert "‡" not in markdown(Analysis([base, done]))


def test_a_run_timed_elsewhere_than_its_first_pass_compares_by_where_it_was_timed():
    """First passes measured on a 16-core machine (or taken from another results file), the timed
    passes on the baseline's 2-core machine: the speed-up compares like with like (no †), and the
    caption names the machine of the timed passes."""
    from dare_pipeline.evaluation.ablation import timing
    from dare_pipeline.evaluation.ablation.plot_parts import caption

    here = {"machine": "x86_64", "cpu_count": 2, "torch_threads": 1, "device": "cpu"}
    there = dict(here, cpu_count=16, torch_threads=8)

    def run(index, plugins, first_pass_on, timed_on):
        r = _rec(index, plugins, 10, 0.5)
        r["hardware"] = first_pass_on
        passes = [{"metrics": {"tokens_per_second": t, "decode_time_s": 1.0, "requests": 4}, "hardware": timed_on}
                  for t in (9.0, 11.0)]
        r["timing"] = timing.summarize([timing.sample(p) for p in passes], 2)
        return r

    base, moved = run(0, [], here, here), run(1, ["a"], there, here)
    assert not Analysis([base, moved]).other_hardware(moved)
    assert "(x86_64 with 2 cores, 1 torch thread)" in " ".join(caption([moved], 200).split())
    assert Analysis([base, run(1, ["a"], here, there)]).other_hardware(run(1, ["a"], here, there))


def test_spread_is_median_quartiles_and_range():
    from dare_pipeline.evaluation.ablation.timing import needs_timing, spread

    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "q1": 1.5, "q3": 2.5, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([]) is None and spread([4.0])["q1"] == 4.0
    assert needs_timing({"status": "ok"}, 3)  # a v1 record: no timing
    assert needs_timing({"timing": {"samples": [{}]}}, 3) and not needs_timing({"timing": {"samples": [{}] * 3}}, 3)
    assert not needs_timing({"status": "ok"}, 0)


def test_gains_whose_interval_contains_one_are_within_noise(tmp_path):
    base = _timed(_rec(0, [], 10, 0.5), [9, 10, 11])
    a = _timed(_rec(1, ["a"], 20, 0.5), [19, 20, 22])  # 20/10: [19/11, 22/9] = [1.73, 2.44]
    b = _timed(_rec(2, ["b"], 10.5, 0.5), [10, 10.5, 11])  # [10/11, 11/9]: contains 1.0
    an = Analysis([base, a, b])
    assert an.tps(a) == 20 and an.tps_range(a) == (19, 22)
    assert an.speedup_interval(a) == pytest.approx((19 / 11, 22 / 9))
    gains = {g["strategy"]: g for g in an.additive_gains()}
    assert gains["a"]["within_noise"] is False and gains["b"]["within_noise"] is True
    assert gains["b"]["low"] == pytest.approx(10 / 11) and gains["b"]["high"] == pytest.approx(11 / 9)
    write_report([base, a, b], tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| a | 1 | 2.00x | 2.00x | 2.00x | 0 of 1 |" in md
    assert "| b | 1 | 1.05x | 1.05x | 1.05x | 1 of 1 |" in md
    assert "| b | baseline | 1.05x | [0.91, 1.22] | within noise |" in md
    # the run's row: median tokens/s with its range, the speed-up's interval, seconds per request
    assert "| a | 50.0 | 50.0 | 20.0 [19.0, 22.0] | 2.00x [1.73, 2.44] | 0.25 [0.227, 0.263] |" in md
    csv_text = (tmp_path / "results.csv").read_text()
    assert "tokens_per_second_min" in csv_text.splitlines()[0]
    gains_csv = (tmp_path / "additive_gain.csv").read_text()
    assert gains_csv.splitlines()[0].endswith("gain,low,high,within_noise,unlike_timing") and "True" in gains_csv
    # untimed records (an older results file): no interval, said so
    an = Analysis([_rec(0, [], 10, 0.5), _rec(1, ["a"], 20, 0.5)])
    assert an.additive_gains()[0]["within_noise"] is None and an.speedup_interval(an.ok[1]) is None


def test_a_policy_threshold_sweep_gets_no_reuse_plot(tmp_path):
    records = [_rec(0, [], 10, 0.5)]
    for i, t in enumerate((0.7, 0.9), 1):
        r = _rec(i, ["threshold_decoding"], 10 + i, 0.5, sweep={"plugins.threshold_decoding.threshold": t})
        r["reuse"] = {"flops": 0.0, "plugins": {}}
        records.append(r)
    files = {f.name for f in write_report(records, tmp_path)}
    assert "reuse_vs_threshold.png" not in files and "accuracy_vs_speedup.png" in files


def test_unreadable_lines_are_skipped_naming_the_file_and_line(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    append_record(path, {"key": "a", "status": "ok"})
    with open(path, "ab") as f:
        f.write(b'{"key": "\xff\xfe", "status": "ok"}\n')  # not UTF-8
        f.write(b'{"key": ["un", "hashable"], "status": "ok"}\n')
        f.write(b'{"key": "c", "status": ["odd"], "schema": "dare-pipeline/ablation-run/v1"}\n')
        f.write(b'{"key": "d", "status": "ok", "schema": "someone-else/v9"}\n')
    append_record(path, {"key": "b", "status": "ok"})
    with caplog.at_level("WARNING"):
        records = read_records(path)
    assert [r["key"] for r in records] == ["a", "c", "b"]
    assert f"{path}:2: not UTF-8" in caplog.text and f"{path}:3: run key ['un', 'hashable'] is not a string" in caplog.text
    assert f"{path}:5: schema 'someone-else/v9'" in caplog.text
    assert [r["key"] for r in dedupe(records)] == ["a", "c", "b"]  # an odd status does not break dedupe


# ---- figures: ticks, marks that would hide each other, labels ---------------------------------------

def _figure(build, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = build(Analysis(records), plt)
    fig.canvas.draw()
    return fig, plt


def _shown_ticks(ax, which="x"):
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    return [t.get_text() for t, v in zip(axis.get_majorticklabels(), axis.get_majorticklocs())
            if lo <= v <= hi and t.get_text()]


def test_ratio_ticks_are_readable_over_narrow_and_wide_ranges():
    from dare_pipeline.evaluation.ablation.plot_parts import ratio_label, ratio_ticks

    narrow = ratio_ticks(0.9, 1.2)
    assert len(narrow) >= 4 and 1.0 in narrow and min(narrow) >= 0.9 and max(narrow) <= 1.2
    assert [ratio_label(t) for t in narrow] == ["0.9x", "0.95x", "1x", "1.05x", "1.1x", "1.15x", "1.2x"]
    assert ratio_ticks(0.5, 40) == [0.5, 1, 2, 5, 10, 20]
    assert ratio_ticks(1.0, 4.0) == [1, 1.5, 2, 2.5, 3, 3.5, 4]
    for lo, hi in ((0.97, 1.03), (0.3, 300), (1.5, 12), (0.01, 1000)):
        ticks = ratio_ticks(lo, hi)
        gaps = [math.log10(b / a) for a, b in zip(ticks, ticks[1:])]
        assert len(ticks) >= 3 and min(gaps) >= math.log10(hi / lo) / 14 - 1e-12, (lo, hi, ticks)
        assert len({ratio_label(t) for t in ticks}) == len(ticks)


def test_a_sweep_between_0_9x_and_1_2x_has_several_speedup_ticks():
    from dare_pipeline.evaluation.ablation.plots import accuracy_speedup_figure

    records = [_rec(0, [], 10, 0.5)] + [_rec(i, ["a"], 10 * s, 0.5 + 0.01 * i, sweep={"plugins.a.t": i})
                                        for i, s in enumerate((0.92, 1.05, 1.1, 1.18), 1)]
    fig, plt = _figure(accuracy_speedup_figure, records)
    labels = _shown_ticks(fig.axes[0])
    plt.close(fig)
    assert len(labels) >= 4 and "1x" in labels and len(set(labels)) == len(labels), labels


def test_coincident_runs_are_each_visible():
    from dare_pipeline.evaluation.ablation.plot_parts import MARK_SPACING_PT, spread_positions
    from dare_pipeline.evaluation.ablation.plots import accuracy_speedup_figure

    # unit: marks apart stay put, marks on top of each other are moved at least the spacing apart
    assert spread_positions([(0, 0), (100, 0)]) == [(0.0, 0.0), (0.0, 0.0)]
    moved = spread_positions([(0, 0)] * 5 + [(3, 1)])
    placed = [(dx, dy + (1 if i == 5 else 0)) for i, (dx, dy) in enumerate(moved)]
    placed[5] = (3 + moved[5][0], 1 + moved[5][1])
    assert all(math.dist(a, b) >= MARK_SPACING_PT - 1e-9 for i, a in enumerate(placed) for b in placed[i + 1:])
    # figure: four runs at the same speed-up and accuracy as the baseline, one a hair away
    records = [_rec(0, [], 10, 0.5)] + [_rec(i, [f"p{i}"], 10, 0.5) for i in range(1, 5)] + [_rec(5, ["q"], 10.02, 0.5)]
    fig, plt = _figure(accuracy_speedup_figure, records)
    ax = fig.axes[0]
    marks = [line for line in ax.lines if line.get_marker() not in (None, "None", "", ".") and line.get_markersize() == 7]
    assert len(marks) == 6
    pixels = [line.get_transform().transform(line.get_xydata())[0] for line in marks]
    points = [(x * 72 / fig.dpi, y * 72 / fig.dpi) for x, y in pixels]
    assert all(math.dist(a, b) >= MARK_SPACING_PT - 0.5 for i, a in enumerate(points) for b in points[i + 1:])
    assert "true place of a mark moved apart" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)


def test_the_additive_gain_plot_names_the_combination_of_each_point():
    from dare_pipeline.evaluation.ablation.plots import additive_gain_figure

    records = [_rec(0, [], 10, 0.5), _rec(1, ["a"], 20, 0.5), _rec(2, ["b"], 30, 0.5), _rec(3, ["a", "b"], 90, 0.5)]
    for i, t in enumerate((0.1, 0.2), 4):
        r = _rec(i, ["c"], 10 + i, 0.5, sweep={"plugins.c.threshold": t})
        r["recipe"]["plugins"][0]["threshold"] = t
        records.append(r)
    fig, plt = _figure(additive_gain_figure, records)
    rows = {ax.get_title(loc="left").split(":")[0]: [t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes
            if ax.get_title(loc="left")}  # (the legend's row has no title)
    plt.close(fig)
    assert rows == {"+ a": ["over baseline", "over b"], "+ b": ["over baseline", "over a"],
                    "+ c": ["over baseline (threshold=0.1)", "over baseline (threshold=0.2)"]}


def test_each_setting_has_its_own_pareto_front():
    """Two settings (gen_length 64 and 128), each over its own baseline: the best run of the first is
    on its front though a run of the second beats it on both axes; one dashed line per setting."""
    from dare_pipeline.evaluation.ablation.plots import accuracy_speedup_figure

    records = [_rec(0, [], 10, 0.5), _rec(1, ["a"], 20, 0.6),
               *(_rec(i, p, tps, 0.9, sweep={"generation.gen_length": 128}, gen={"gen_length": 128})
                 for i, p, tps in ((2, [], 5), (3, ["a"], 20)))]
    fig, plt = _figure(accuracy_speedup_figure, records)
    ax = fig.axes[0]
    circled = sorted((round(float(line.get_xdata()[0]), 3), round(float(line.get_ydata()[0]), 3))
                     for line in ax.lines if line.get_markeredgecolor() == "red")
    assert circled == [(2.0, 60.0), (4.0, 90.0)]  # 2x / 60 % is beaten only by the other setting's 4x / 90 %
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 2
    plt.close(fig)


def test_every_figure_says_what_was_measured(tmp_path):
    from dare_pipeline.evaluation.ablation.plots import (accuracy_speedup_figure, additive_gain_figure,
                                                         reuse_threshold_figure)

    records = [_rec(0, [], 10, 0.5)]
    for i, t in enumerate((0.05, 0.1), 1):
        r = _rec(i, ["dare_o"], 10 + i, 0.5, sweep={"plugins.dare_o.threshold": t})
        r["reuse"] = {"flops": 0.1 * i, "plugins": {"dare_o": {"reuse_fraction": 0.2 * i}}}
        records.append(r)
    for r in records:
        r["metrics"]["requests"] = 200
        r["recipe"]["generation"].update(block_length=32, steps=64)
        r["hardware"] = {"machine": "x86_64", "cpu_count": 2, "torch_threads": 1, "device": "cpu"}
        r["model"] = {"family": "llada", "parameters": 2263104, "dtype": "torch.float32"}
    for build in (accuracy_speedup_figure, reuse_threshold_figure, additive_gain_figure):
        fig, plt = _figure(build, records)
        text = " ".join(t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text")))
        plt.close(fig)
        for words in ("a:", "model m (LLaDA, 2.26M parameters, float32)", "tasks t, 200 problems a run (2 per task)",
                      "gen_length 64, block 32, steps 64", "batch 1", "tokens/s of the single pass",
                      "CPU (x86_64 with 2 cores, 1 torch thread)", "2026-01-01"):
            assert words in " ".join(text.split()), (build.__name__, words)


def test_no_text_of_a_figure_is_cut_at_its_edges():
    from dare_pipeline.evaluation.ablation.plots import accuracy_speedup_figure, additive_gain_figure

    # long run names (two swept keys) push the legend wide, as dllm_cache_intervals' do
    keys = ("plugins.dllm_cache.response_interval", "plugins.dllm_cache.ratio")
    records = [_rec(0, [], 10, 0.9)] + [_rec(i, ["dllm_cache"], 10 * (1 + i), 0.6 + 0.05 * i,
                                             sweep={keys[0]: kr, keys[1]: rho})
                                        for i, (kr, rho) in enumerate(((2, 0.25), (7, 0.1), (7, 0.25), (7, 0.5)), 1)]
    for build in (accuracy_speedup_figure, additive_gain_figure):
        fig, plt = _figure(build, records)
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        for text in fig.findobj(lambda o: hasattr(o, "get_text") and hasattr(o, "get_window_extent")):
            if not text.get_visible() or not text.get_text().strip():
                continue
            box = text.get_window_extent(renderer)
            assert box.x0 >= -1 and box.x1 <= width + 1 and box.y0 >= -1 and box.y1 <= height + 1, (
                build.__name__, text.get_text(), box)
        plt.close(fig)
