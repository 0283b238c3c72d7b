"""The ablation runner end to end on a tiny model: results lines, resume, failures, shards, merge,
the report rebuilt from the JSONL, and the ablation file's schema errors."""

import json
from pathlib import Path

import attrs
import pytest
import yaml

from dare_pipeline.cli import main
from dare_pipeline.config import ConfigError
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.core.registry import registered
from dare_pipeline.evaluation.ablation import Ablation, plan_runs
from dare_pipeline.evaluation.ablation.results import append_record, dedupe, merge, read_records
from dare_pipeline.evaluation.ablation.runner import parse_shard, run_ablation, select

ROOT = Path(__file__).parents[3]
RECORD_KEYS = {"schema", "key", "index", "ablation", "label", "name", "plugins", "sweep", "tasks", "limit",
               "batch_size", "status", "recipe", "accuracy", "metrics", "reuse", "memory", "wall_time_s",
               "versions", "hardware", "started", "finished", "recorded"}
METRIC_KEYS = {"tokens_per_second", "nfe_total", "nfe_per_request", "generated_tokens", "flops", "flops_per_request",
               "layer_rows", "requests", "decode_time_s"}


@attrs.frozen
class ExplodeOptions:
    fail: bool = False


class Explode(Plugin):
    """Observes; raises at the first step when its option says so (a run-time failure)."""

    name = "explode"
    Options = ExplodeOptions

    @hookimpl
    def dare_step_start(self, state):
        if self.options.fail:
            raise RuntimeError("explode: failing on purpose")


# ---- the main path: run, records, resume, report ------------------------------------------------

def test_runs_resume_and_report(write_ablation, tiny_ckpt, tmp_path):
    path = write_ablation(plugins={"subsets_of": ["prefix_cache", "threshold_decoding"]},
                          plugin_options={"threshold_decoding": {"threshold": 0.5}})
    out = tmp_path / "results.jsonl"
    assert main(["ablate", str(path), "--output", str(out), "--quiet", "--report-dir", str(tmp_path / "rep")]) == 0
    records = read_records(out)
    assert len(out.read_text().splitlines()) == len(records) == 4
    assert [r["label"] for r in records] == ["baseline", "prefix_cache", "threshold_decoding",
                                             "prefix_cache+threshold_decoding"]
    for r in records:
        assert r["status"] == "ok", r.get("error")
        assert RECORD_KEYS <= set(r)
        assert METRIC_KEYS <= set(r["metrics"])
        assert set(r["accuracy"]["dare_add"]) >= {"exact_match", "final_match", "n"}
        assert r["accuracy"]["dare_add"]["n"] == 2
        assert r["metrics"]["requests"] == 2 and r["metrics"]["nfe_total"] > 0
        assert r["metrics"]["flops"]["total"] == sum(r["metrics"]["flops"][k]
                                                     for k in ("q", "kv", "attn", "ffn", "lm_head"))
        assert r["memory"]["peak_bytes"] > 0 and r["memory"]["method"]
        assert r["recipe"]["model"] == str(tiny_ckpt) and r["model"]["parameters"] > 0
    base, prefix = records[0], records[1]
    # the prefix cache feeds fewer rows: fewer FLOPs at the same NFE, and its reuse is visible
    assert prefix["metrics"]["nfe_total"] == base["metrics"]["nfe_total"]
    assert prefix["metrics"]["flops"]["total"] < base["metrics"]["flops"]["total"]
    assert base["reuse"]["flops"] == 0
    assert 0 < prefix["reuse"]["flops"] < 1
    assert 0 < prefix["reuse"]["plugins"]["prefix_cache"]["cached_rows_fraction"] < 1
    assert records[2]["recipe"]["plugins"] == [{"name": "threshold_decoding", "threshold": 0.5, "quota": "auto"}]
    # the report written at the end of ablate
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "results.csv").is_file()

    # resume: nothing left to run
    abl = Ablation.from_yaml(path)
    again = run_ablation(abl, out, quiet=True)
    assert again.executed == 0 and again.already == 4
    assert len(read_records(out)) == 4

    # one line gone: exactly that run again
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2] + lines[3:]))
    again = run_ablation(abl, out, quiet=True)
    assert again.executed == 1 and again.records[0]["label"] == "threshold_decoding"
    assert sorted(r["index"] for r in read_records(out)) == [0, 1, 2, 3]

    # report rebuilds markdown, CSV and PNGs from the JSONL alone
    rep = tmp_path / "rebuilt"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    for label in ("| baseline |", "| prefix_cache |", "| threshold_decoding |", "| prefix_cache + threshold_decoding |"):
        assert label in md, md
    assert "1.00x" in md and "Additive gain" in md
    rows = (rep / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("ablation,index,key")
    for png in ("accuracy_vs_speedup.png", "additive_gain.png"):
        assert (rep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gains = (rep / "additive_gain.csv").read_text().splitlines()
    # prefix over {} and {threshold}; threshold over {} and {prefix}
    assert len(gains) == 1 + 4


def test_failing_runs_are_recorded_and_the_others_complete(write_ablation, tmp_path):
    path = write_ablation(name="fails", plugins={"sets": [[], ["explode"], ["threshold_decoding"]]},
                          sweep={"plugins.explode.fail": [False, True],
                                 "plugins.threshold_decoding.threshold": [0.5, 1.5]})
    out = tmp_path / "fails.jsonl"
    with registered(Explode):
        abl = Ablation.from_yaml(path)
        summary = run_ablation(abl, out, quiet=True)
    records = {r["name"]: r for r in read_records(out)}
    assert len(records) == 5
    boom = records["explode [explode.fail=True]"]
    assert boom["status"] == "failed"
    assert boom["error"]["type"] == "RuntimeError" and "failing on purpose" in boom["error"]["message"]
    assert "dare_step_start" in boom["error"]["traceback"]
    assert boom["versions"]["torch"] and boom["hardware"]["device"] == "cpu"
    bad = records["threshold_decoding [threshold_decoding.threshold=1.5]"]
    assert bad["status"] == "failed" and bad["error"]["type"] == "ConfigError"
    assert "threshold = 1.5" in bad["error"]["message"] and "between 0.0 and 1.0" in bad["error"]["message"]
    ok = [n for n, r in records.items() if r["status"] == "ok"]
    assert sorted(ok) == ["baseline", "explode [explode.fail=False]", "threshold_decoding [threshold_decoding.threshold=0.5]"]
    assert summary.failed == 2 and summary.ok == 3 and summary.executed == 4  # the bad recipe never ran

    # failed runs are done unless asked to retry; --retry-failed runs the run-time failure again
    with registered(Explode):
        assert run_ablation(abl, out, quiet=True).executed == 0
        retry = run_ablation(abl, out, quiet=True, retry_failed=True)
    assert retry.executed == 1 and retry.records[-1]["status"] == "failed"
    md_dir = tmp_path / "rep"
    main(["report", str(out), "--out", str(md_dir)])
    md = (md_dir / "report.md").read_text()
    assert "failed: RuntimeError" in md and "ConfigError" in md


def test_refused_combinations_are_skipped_with_the_reason(write_ablation, tmp_path):
    path = write_ablation(name="skips", plugins={"subsets_of": ["prefix_cache", "dual_cache"]})
    abl = Ablation.from_yaml(path)
    runs = plan_runs(abl)
    by = {r.name: r for r in runs}
    refused = by["prefix_cache+dual_cache"]
    assert refused.status == "skipped"
    assert "refused at recipe load" in refused.reason and "both decide 'row_feed'" in refused.reason
    assert [r.name for r in runs if r.status == "pending"] == ["baseline", "prefix_cache", "dual_cache"]

    out = tmp_path / "skips.jsonl"
    summary = run_ablation(abl, out, quiet=True)
    assert summary.executed == 3 and summary.skipped == 1
    records = read_records(out)
    assert len(records) == 4
    assert {r["reason"] for r in records if r["status"] == "skipped"} == {refused.reason}
    # skipped runs are recorded once, not again on resume
    again = run_ablation(abl, out, quiet=True)
    assert again.executed == 0 and again.skipped == 0 and len(read_records(out)) == 4
    rep = tmp_path / "rep"
    main(["report", str(out), "--out", str(rep)])
    assert "skipped: **prefix_cache + dual_cache** — refused at recipe load" in (rep / "report.md").read_text()


@pytest.mark.parametrize("fields, where", [
    ({"plugins": {"subsets_of": ["prefix_cache", "prefix_cahce"]}}, "plugins.subsets_of[1]: unknown plugin 'prefix_cahce'"),
    ({"plugins": {"sets": [[], ["dual_cache", "no_such_plugin"]]}}, "plugins.sets[1]: unknown plugin 'no_such_plugin'"),
    ({"plugin_options": {"treshold_decoding": {"threshold": 0.9}}}, "plugin_options.treshold_decoding: unknown plugin"),
    ({"sweep": {"plugins.dare_k.threshold": [0.1]}}, "sweep.plugins.dare_k.threshold: unknown plugin 'dare_k'"),
])
def test_an_unknown_plugin_is_an_error_at_load(write_ablation, fields, where, capsys, tmp_path):
    path = write_ablation(name="typo", **fields)
    with pytest.raises(ConfigError) as err:
        Ablation.from_yaml(path)
    assert str(err.value).startswith(f"{path}: {where}"), str(err.value)
    assert "registered plugins: [" in str(err.value)
    if "cahce" in where:
        assert "did you mean 'prefix_cache'?" in str(err.value)
    assert main(["ablate", str(path), "--output", str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    assert "unknown plugin" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--limit", "0"], "--limit 0: must be > 0"),
    (["--repeats", "-1"], "--repeats -1: must be >= 0"),
    (["--output", "{tmp}"], "is a directory; give the results file's path"),
])
def test_bad_arguments_are_refused_before_any_run(write_ablation, tmp_path, capsys, args, message):
    path = write_ablation(name="bad")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = ["--output", str(tmp_path / "o.jsonl")] if "--output" not in args else []
    assert main(["ablate", str(path), *out, *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_an_unknown_task_is_refused_before_any_run(write_ablation, tmp_path, capsys, monkeypatch):
    from dare_pipeline.evaluation.ablation import runner

    ran = []
    monkeypatch.setattr(runner, "execute_run", lambda *a, **k: ran.append(a))
    path = write_ablation(name="task", tasks=["dare_add", "dare_nothing"])
    assert main(["ablate", str(path), "--output", str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    assert "unknown task(s) ['dare_nothing']" in capsys.readouterr().err
    assert ran == [] and not (tmp_path / "o.jsonl").exists()


def test_eval_refuses_a_directory_output_before_evaluating(tmp_path, capsys, monkeypatch):
    from dare_pipeline.evaluation import run

    monkeypatch.setattr(run, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --output"))
    assert main(["eval", "--tasks", "dare_add", "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path}: is a directory" in capsys.readouterr().err


def test_too_many_threads_for_the_cores_is_warned(monkeypatch):
    from dare_pipeline.evaluation.ablation.runner import oversubscription

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert oversubscription(4, 1) is None and oversubscription(0, 4) is None
    warning = oversubscription(2, 4)
    assert warning.startswith("2 process(es) x 4 torch thread(s) = 8 threads on 4 cores") and "--workers 1" in warning


# ---- timed repeats -----------------------------------------------------------------------------------

def test_repeats_run_round_robin_and_resume(write_ablation, tmp_path, monkeypatch):
    from dare_pipeline.evaluation.ablation import runner

    order = []
    real = runner.execute_run

    def spy(spec, *args, **kwargs):
        order.append(spec.index)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "execute_run", spy)
    path = write_ablation(name="timed", limit=1, repeats=2, plugins={"sets": [[], ["prefix_cache"]]})
    abl = Ablation.from_yaml(path)
    assert abl.repeats == 2
    out = tmp_path / "timed.jsonl"
    summary = run_ablation(abl, out, quiet=True)
    assert order == [0, 1, 0, 1, 0, 1]  # first passes, then every run's first repeat, then the second
    assert summary.executed == 2 and summary.ok == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # each run's record after its first pass (timing pending), then the complete one
    assert [(r["index"], r["timing"]["complete"]) for r in lines] == [(0, False), (1, False), (0, True), (1, True)]
    final = read_records(out)[2]
    t = final["timing"]
    assert [s["round"] for s in t["samples"]] == [1, 2] and t["tokens_per_second"]["n"] == 2
    assert t["tokens_per_second"]["min"] <= t["tokens_per_second"]["median"] <= t["tokens_per_second"]["max"]
    assert all(s["nfe_total"] == final["metrics"]["nfe_total"] for s in t["samples"])  # exact counters
    assert all(s["hardware"] == final["hardware"] for s in t["samples"])  # the machine each repeat ran on
    assert t["decode_cpu_s"]["median"] > 0 and final["schema"].endswith("/v2")

    # interrupted during the repeats: the first-pass records are kept; a rerun times those runs again
    out.write_text("\n".join(out.read_text().splitlines()[:2]) + "\n")
    order.clear()
    again = run_ablation(abl, out, quiet=True)
    assert order == [0, 1, 0, 1, 0, 1] and again.executed == 2
    assert len(out.read_text().splitlines()) == 4  # no second first-pass record
    assert run_ablation(abl, out, quiet=True).executed == 0
    # a v1 record (no timing) counts as done without repeats, and is timed when repeats are asked for
    assert run_ablation(abl, tmp_path / "none.jsonl", quiet=True, repeats=0).executed == 2
    order.clear()
    assert run_ablation(abl, tmp_path / "none.jsonl", quiet=True, repeats=1).executed == 2 and len(order) == 4


def test_timed_passes_decode_the_first_timing_limit_problems(write_ablation, tmp_path, monkeypatch):
    from dare_pipeline.evaluation.ablation import runner
    from dare_pipeline.evaluation.ablation.analysis import Analysis

    passes = []  # (run index, timed) of every pass
    real = runner.execute_run

    def spy(spec, *args, timed=False, **kwargs):
        passes.append((spec.index, timed))
        return real(spec, *args, timed=timed, **kwargs)

    monkeypatch.setattr(runner, "execute_run", spy)
    path = write_ablation(name="subset", limit=2, repeats=2, timing_limit=1, plugins={"sets": [[], ["prefix_cache"]]})
    abl = Ablation.from_yaml(path)
    out = tmp_path / "subset.jsonl"
    assert run_ablation(abl, out, quiet=True).ok == 2
    assert passes == [(0, False), (1, False), (0, True), (1, True), (0, True), (1, True)]
    final = dedupe(read_records(out))
    for r in final:  # accuracy and counters over both problems, the timed passes over the first one
        assert r["metrics"]["requests"] == 2 and r["accuracy"]["dare_add"]["n"] == 2
        assert r["timing"]["limit"] == 1 and [s["requests"] for s in r["timing"]["samples"]] == [1, 1]
        spread = Analysis(final).time_spread(r, "decode_time_s")  # seconds per timed request
        assert spread["min"] == min(s["decode_time_s"] for s in r["timing"]["samples"])

    # asked for timing on both problems now: each run is timed again; its recorded first pass is
    # kept and a pass over the timed problems (here all of them) warms it up
    passes.clear()
    again = run_ablation(abl, out, quiet=True, timing_limit=2)
    assert again.ok == 2 and passes == [(0, True), (1, True)] * 3
    retimed = dedupe(read_records(out))
    assert [r["started"] for r in retimed] == [r["started"] for r in final]  # the same first passes
    assert all(r["timing"]["limit"] is None and [s["requests"] for s in r["timing"]["samples"]] == [2, 2]
               for r in retimed)
    passes.clear()
    assert run_ablation(abl, out, quiet=True, timing_limit=2).executed == 0 and passes == []


def test_first_passes_are_reused_from_another_results_file(write_ablation, tmp_path, monkeypatch):
    from dare_pipeline.evaluation.ablation import runner

    passes = []
    real = runner.execute_run

    def spy(spec, *args, timed=False, **kwargs):
        passes.append((spec.label, timed))
        return real(spec, *args, timed=timed, **kwargs)

    monkeypatch.setattr(runner, "execute_run", spy)
    first = tmp_path / "first.jsonl"
    run_ablation(Ablation.from_yaml(write_ablation(name="first", plugins={"sets": [[], ["prefix_cache"]]})), first,
                 quiet=True)
    donor = {r["label"]: r for r in read_records(first)}
    passes.clear()
    other = Ablation.from_yaml(write_ablation(name="other", plugins={"sets": [[], ["dual_cache"]]}))
    out = tmp_path / "other.jsonl"
    summary = run_ablation(other, out, quiet=True, reuse_runs=[first])
    assert passes == [("dual_cache", False)] and summary.reused == 1 and summary.ok == 2
    assert "1 first pass(es) reused from other results files" in summary.line()
    base = {r["label"]: r for r in read_records(out)}["baseline"]
    assert base["ablation"] == "other" and base["reused_from"] == {"file": str(first), "ablation": "first", "index": 0}
    assert base["accuracy"] == donor["baseline"]["accuracy"] and base["metrics"] == donor["baseline"]["metrics"]
    # with timed passes the reused run is warmed up and timed here, round-robin with the others
    passes.clear()
    timed = tmp_path / "timed.jsonl"
    assert run_ablation(other, timed, quiet=True, reuse_runs=[first], repeats=1).ok == 2
    assert passes == [("baseline", True), ("dual_cache", False), ("baseline", True), ("dual_cache", True)]
    final = {r["label"]: r for r in dedupe(read_records(timed))}["baseline"]
    assert final["timing"]["complete"] and final["accuracy"] == donor["baseline"]["accuracy"]
    with pytest.raises(ConfigError, match="--reuse-runs .*nothing.jsonl: results file not found"):
        run_ablation(other, tmp_path / "x.jsonl", quiet=True, reuse_runs=[tmp_path / "nothing.jsonl"])


def test_a_timing_limit_above_the_limit_is_refused(write_ablation):
    with pytest.raises(ConfigError, match=r"subset.yaml: timing_limit = 3: above the limit 2"):
        plan_runs(Ablation.from_yaml(write_ablation(name="subset", limit=2, timing_limit=3)))
    with pytest.raises(ConfigError, match=r"timing_limit = 0: must be > 0"):
        plan_runs(Ablation.from_yaml(write_ablation(name="subset", limit=2)), timing_limit=0)
    assert plan_runs(Ablation.from_yaml(write_ablation(name="subset", limit=2, timing_limit=2)))[0].timing_limit is None


# ---- shards, merge, crash safety ------------------------------------------------------------------

def test_shards_partition_the_runs_and_merge_dedupes(write_ablation, tmp_path):
    path = write_ablation(name="shards", plugins={"subsets_of": [["prefix_cache", "dual_cache"]]},
                          sweep={"generation.seed": [0, 1]})
    abl = Ablation.from_yaml(path)
    runs = plan_runs(abl)
    assert len(runs) == 6
    parts = [select(runs, [], (i, 3))[0] for i in range(3)]
    assert sorted(r.index for p in parts for r in p) == list(range(6))
    assert all(r.index % 3 == i for i, p in enumerate(parts) for r in p)
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    abl2 = attrs.evolve(abl, plugins=attrs.evolve(abl.plugins, subsets_of=(), sets=((), ("prefix_cache",))))
    sa = run_ablation(abl2, a, shard=(0, 2), quiet=True)
    sb = run_ablation(abl2, b, shard=(1, 2), quiet=True)
    assert sa.executed + sb.executed == 4 and sa.executed == sb.executed == 2
    keys_a = {r["key"] for r in read_records(a)}
    keys_b = {r["key"] for r in read_records(b)}
    assert not keys_a & keys_b
    # a third file overlapping both: merge keeps one record per run, a finished one over a failure
    c = tmp_path / "c.jsonl"
    first = read_records(a)[0]
    append_record(c, first | {"status": "failed", "error": {"type": "X", "message": "m"}, "finished": "9999"})
    append_record(c, read_records(b)[0])
    merged = merge([a, b, c])
    assert len(merged) == 4 and {r["key"] for r in merged} == keys_a | keys_b
    assert next(r for r in merged if r["key"] == first["key"])["status"] == "ok"
    out = tmp_path / "merged"
    assert main(["report", str(a), str(b), str(c), "--out", str(out), "--merged", str(tmp_path / "m.jsonl")]) == 0
    assert len(read_records(tmp_path / "m.jsonl")) == 4
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4
    # the two seeds are two settings of the table, each with its own baseline
    md = (out / "report.md").read_text()
    assert md.count("## shards — generation.seed=0") == 1 and md.count("## shards — generation.seed=1") == 1 and md.count("| baseline |") == 2


def test_a_partial_last_line_does_not_break_resume(write_ablation, tmp_path):
    path = write_ablation(name="crash", plugins={"sets": [[], ["prefix_cache"]]})
    abl = Ablation.from_yaml(path)
    out = tmp_path / "crash.jsonl"
    run_ablation(abl, out, quiet=True)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # a crash in the middle of the second line
    assert len(read_records(out)) == 1
    again = run_ablation(abl, out, quiet=True)
    assert again.executed == 1
    records = read_records(out)
    assert [r["index"] for r in records] == [0, 1]
    assert all(json.loads(line) for line in out.read_text().splitlines()[-1:])


def test_workers_run_in_spawned_processes(write_ablation, tmp_path):
    # one spawned worker serving two runs (each worker pays for importing torch and lm-eval)
    path = write_ablation(name="workers", limit=1, plugins={"sets": [[], ["dual_cache"]]})
    out = tmp_path / "workers.jsonl"
    summary = run_ablation(Ablation.from_yaml(path), out, workers=1, quiet=True)
    records = read_records(out)
    assert summary.executed == 2 and all(r["status"] == "ok" for r in records), records
    import os

    assert len({r["worker"]["pid"] for r in records}) == 1 and records[0]["worker"]["pid"] != os.getpid()
    assert records[0]["hardware"]["torch_threads"] == 1


# ---- the ablation file ------------------------------------------------------------------------------

def test_subsets_with_at_most_one_of_a_group_and_sweeps_only_where_they_apply():
    abl = Ablation.from_dict({"name": "x", "plugins": {"subsets_of": [["prefix_cache", "dual_cache"],
                                                                      "threshold_decoding"]},
                              "sweep": {"plugins.threshold_decoding.threshold": [0.7, 0.9],
                                        "generation.gen_length,generation.steps": [[32, 32], [64, 64]]}})
    assert abl.plugins.expand() == [(), ("prefix_cache",), ("dual_cache",), ("threshold_decoding",),
                                    ("prefix_cache", "threshold_decoding"), ("dual_cache", "threshold_decoding")]
    runs = plan_runs(abl)
    # 3 sets without threshold x 2 lengths + 3 sets with it x 2 thresholds x 2 lengths
    assert len(runs) == 3 * 2 + 3 * 2 * 2
    assert all(r.status == "pending" for r in runs)
    assert len({r.key for r in runs}) == len(runs)
    base = [r for r in runs if r.label == "baseline"]
    assert [r.sweep for r in base] == [{"generation.gen_length": 32, "generation.steps": 32},
                                       {"generation.gen_length": 64, "generation.steps": 64}]
    r = next(r for r in runs if r.label == "dual_cache+threshold_decoding")
    assert r.recipe["plugins"][1]["threshold"] == 0.7 and r.recipe["generation"]["gen_length"] == 32
    # the key is stable: planning again gives the same keys, and the name does not enter it
    assert [x.key for x in plan_runs(abl)] == [x.key for x in runs]
    renamed = attrs.evolve(abl, name="other")
    assert [x.key for x in plan_runs(renamed)] == [x.key for x in runs]
    assert plan_runs(abl, limit=3)[0].key != runs[0].key


def test_a_sweep_point_may_hold_a_list_value():
    abl = Ablation.from_dict({"name": "x", "plugins": {"sets": [["dare_o"]]},
                              "sweep": {"plugins.dare_o.threshold,plugins.dare_o.exempt_layers":
                                        [[0.01, [0]], [0.1, [0]], [0.1, []], [0.1, []]]}})
    runs = plan_runs(abl)
    assert [(r.recipe["plugins"][-1]["threshold"], list(r.recipe["plugins"][-1]["exempt_layers"])) for r in runs] == [
        (0.01, [0]), (0.1, [0]), (0.1, [])]  # the repeated point runs once


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "colour": 1}, "colour: unknown key; allowed keys: ["),
    ({"tasks": ["dare_add"]}, "name: missing"),
    ({"name": "x", "metric": "acc"}, "metric = 'acc': allowed values: ['exact_match', 'final_match']"),
    ({"name": "x", "sweep": {"generation.gen_length": 64}}, "sweep.generation.gen_length = 64: expected a non-empty list"),
    ({"name": "x", "sweep": {"plugins.dare_o": [1]}}, "is not a KEY.PATH"),
    ({"name": "x", "sweep": {"a.b,c.d": [[1, 2], [3]]}}, "sweep.a.b,c.d[1] = [3]: tied keys"),
    ({"name": "x", "plugins": {"subsets_of": "prefix_cache"}}, "plugins.subsets_of = 'prefix_cache': expected a list"),
    ({"name": "x", "plugins": {"sizes": 1}}, "plugins.sizes: unknown key; allowed keys: ['max_size', 'min_size', 'sets', 'subsets_of']"),
    ({"name": "x", "limit": 0}, "limit = 0: must be > 0"),
    ({"name": "x", "batch_size": "4"}, "batch_size = '4': expected int"),
    ({"name": "x", "plugin_options": {"threshold_decoding": 0.9}}, "plugin_options.threshold_decoding = 0.9"),
    ({"name": "x", "set": ["generation.gen_length"]}, "set[0] = 'generation.gen_length': expected KEY.PATH=VALUE"),
])
def test_schema_errors_name_the_file_key_value_and_allowed(data, message):
    with pytest.raises(ConfigError) as err:
        Ablation.from_dict(data, source="abl.yaml")
    assert str(err.value).startswith("abl.yaml: ") and message in str(err.value), str(err.value)


def test_every_mistake_of_an_ablation_file_is_reported_at_once():
    data = {"tasks": ["dare_add"], "batch_size": 0, "colour": 1, "metric": "acc", "set": ["generation.steps"],
            "plugins": {"sets": [["dual_cache", "treshold_decoding"]]}, "sweep": {"generation.gen_length": 64},
            "plugin_options": {"dare_oo": {"threshold": 0.1}}}
    with pytest.raises(ConfigError) as err:
        Ablation.from_dict(data, source="abl.yaml")
    expected = ["name: missing", "colour: unknown key", "batch_size = 0: must be >= 1",
                "metric = 'acc': allowed values", "sweep.generation.gen_length = 64: expected a non-empty list",
                "plugins.sets[0]: unknown plugin 'treshold_decoding'; did you mean 'threshold_decoding'?",
                "plugin_options.dare_oo: unknown plugin 'dare_oo'", "set[0] = 'generation.steps': expected KEY.PATH"]
    errors = err.value.errors
    assert len(errors) == len(expected), errors
    for message in expected:
        assert sum(e.startswith("abl.yaml: ") and message in e for e in errors) == 1, (message, errors)


def test_base_recipe_errors_name_the_recipe(tmp_path):
    abl = Ablation.from_dict({"name": "x", "recipe": "nowhere.yaml"}, source=str(tmp_path / "abl.yaml"))
    with pytest.raises(ConfigError, match="recipe = 'nowhere.yaml': recipe file not found"):
        plan_runs(abl)
    abl = Ablation.from_dict({"name": "x", "set": ["generation.gen_length=33", "generation.block_length=32"]},
                             source="abl.yaml")
    with pytest.raises(ConfigError, match="gen_length \\(33\\) must be a multiple of block_length"):
        plan_runs(abl)


def test_shipped_ablations_load_and_plan():
    files = sorted((ROOT / "ablations").glob("*.yaml"))
    assert {f.name for f in files} >= {"fastdllm_table.yaml", "dare_thresholds.yaml", "dllm_cache_intervals.yaml",
                                       "stacking_matrix.yaml"}
    for f in files:
        abl = Ablation.from_yaml(f)
        assert abl.model == "default" and list(abl.tasks) == ["dare_suite"] and abl.limit
        runs = plan_runs(abl)
        assert runs and runs[0].label == "baseline" and runs[0].status == "pending"
        for r in runs:
            assert r.status in ("pending", "skipped"), (f.name, r.name, r.error)
            if r.status == "skipped":
                assert r.reason.startswith(("refused at recipe load", "unknown plugin")), r.reason
    table = {r.label for r in plan_runs(Ablation.from_yaml(ROOT / "ablations" / "fastdllm_table.yaml"))}
    assert table == {"baseline", "prefix_cache", "threshold_decoding", "prefix_cache+threshold_decoding",
                     "dual_cache+threshold_decoding"}


def test_the_docs_table_of_shipped_ablations_says_what_the_files_say():
    import re

    text = (ROOT / "docs" / "ablation.md").read_text()
    table = text.split("Shipped files", 1)[1].split("\n\n", 2)[1]  # the paragraph, then the table
    rows = [line for line in table.splitlines() if re.match(r"\| `\w+\.yaml` \|", line)]
    documented = {}
    for row in rows:
        name, _what, runs, gen_length, problems, timed = (c.strip() for c in row.strip("|").split("|"))
        documented[name.strip("`")] = (runs, gen_length, problems, timed)
    assert set(documented) == {f.name for f in (ROOT / "ablations").glob("*.yaml")}
    for name, (runs, gen_length, problems, timed) in documented.items():
        abl = Ablation.from_yaml(ROOT / "ablations" / name)
        planned = plan_runs(abl)
        pending = sum(r.status == "pending" for r in planned)
        assert int(runs.split()[0]) == len(planned), name
        assert (int(re.search(r"(\d+) run$", runs).group(1)) if runs.endswith(" run") else len(planned)) == pending
        lengths = sorted({r.recipe["generation"]["gen_length"] for r in planned if r.status == "pending"})
        assert gen_length == ", ".join(map(str, lengths)), name  # the lengths the runs decode
        assert problems == f"{4 * abl.limit} ({abl.limit})", name  # dare_suite: 4 families
        if abl.repeats == 0:
            assert timed.startswith("none"), name
        else:
            per_task = abl.timing_limit or abl.limit
            assert timed == f"{abl.repeats} over {4 * per_task} ({per_task})", name


def test_a_checkpoint_without_tokenizer_is_refused_before_any_run(write_ablation, golden_dir, tmp_path, capsys):
    path = write_ablation(name="notok", model=str(golden_dir / "llada"))
    out = tmp_path / "notok.jsonl"
    assert main(["ablate", str(path), "--output", str(out), "--quiet"]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_lists_the_runs(write_ablation, tmp_path, capsys):
    path = write_ablation(name="dry", plugins={"subsets_of": ["prefix_cache", "dual_cache"]})
    assert main(["ablate", str(path), "--dry-run", "--shard", "1/2", "--output", str(tmp_path / "o.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "4 runs planned; this shard: 1 to run, 1 to record without running" in out
    assert "other shard" in out and "refused at recipe load" in out
    assert not (tmp_path / "o.jsonl").exists()


def test_dry_run_says_which_runs_only_need_their_timed_passes(write_ablation, tmp_path, capsys):
    path = write_ablation(name="dry_timed", plugins={"sets": [[]]})
    out = tmp_path / "o.jsonl"
    assert main(["ablate", str(path), "--output", str(out), "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["ablate", str(path), "--dry-run", "--output", str(out)]) == 0
    assert "this shard: 0 to run, 0 to record without running, 1 already in" in capsys.readouterr().out
    assert main(["ablate", str(path), "--dry-run", "--repeats", "2", "--output", str(out)]) == 0
    listing = capsys.readouterr().out
    assert " time " in listing.splitlines()[0]
    assert "this shard: 0 to run, 1 to time (2 timed passes after its recorded first pass), 0 to record" in listing


def test_under_torchrun_each_rank_takes_its_shard_and_its_own_file(write_ablation, tmp_path, capsys, monkeypatch):
    path = write_ablation(name="ranks", plugins={"subsets_of": ["prefix_cache", "dual_cache"]})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["ablate", str(path), "--dry-run", "--output", str(tmp_path / "o.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "this shard: 1 to run, 1 to record without running" in out
    assert str(tmp_path / "o.rank1-of-2.jsonl") in out


# ---- target_reuse sweeps: calibrated per run --------------------------------------------------------

def test_a_target_reuse_sweep_calibrates_each_run_on_the_embedded_model(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cal", "model": "default", "tasks": ["dare_add"], "limit": 1, "repeats": 0,
        "set": ["generation.gen_length=16", "generation.block_length=16", "generation.steps=16"],
        "plugins": {"sets": [["dare_kv"]]}, "sweep": {"plugins.dare_kv.target_reuse": [0.5]},
        # the same single problem the run evaluates: the run's reuse is the calibration's
        "calibration": {"limit": 1, "tolerance": 0.05, "max_trials": 10}}))
    abl = Ablation.from_yaml(path)
    (spec,) = plan_runs(abl)
    assert spec.calibrate["plugin"] == "dare_kv" and spec.calibrate["target"] == 0.5 and spec.name.endswith(
        "[dare_kv.target_reuse=0.5]")
    assert spec.key != plan_runs(attrs.evolve(abl, sweep={"plugins.dare_kv.target_reuse": [0.6]}))[0].key
    out = tmp_path / "cal.jsonl"
    summary = run_ablation(abl, out, quiet=True)
    (record,) = read_records(out)
    assert summary.ok == 1, record.get("error")
    cal = record["calibration"]
    assert cal["converged"] and abs(cal["reuse"] - 0.5) <= 0.05 and cal["threshold"] > 0
    assert record["recipe"]["plugins"][0]["threshold"] == cal["threshold"]  # the run used the chosen threshold
    assert record["reuse"]["plugins"]["dare_kv"]["reuse_fraction"] == pytest.approx(cal["reuse"], abs=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"sweep": {"plugins.prefix_cache.target_reuse": [0.5]}}, "target_reuse is calibrated for ['dare_kv', 'dare_o', 'ffn_reuse'] only"),
    ({"sweep": {"plugins.dare_kv.target_reuse": [0.5, 1.5]}},
     "sweep.plugins.dare_kv.target_reuse[1] = 1.5: a reuse fraction between 0 and 1"),
    ({"sweep": {"plugins.dare_o.target_reuse": [0.5], "plugins.dare_o.threshold": [0.1]}},
     "sweep either dare_o's threshold or its target_reuse"),
    ({"sweep": {"plugins.dare_kv.target_reuse": [0.5]}, "calibration": {"prompts": "nowhere.jsonl"}},
     "calibration.prompts = 'nowhere.jsonl': prompts file not found"),
    ({"calibration": {"limit": 0}}, "calibration: limit = 0: must be >= 1"),
])
def test_target_reuse_errors_name_the_key_and_value(fields, message):
    with pytest.raises(ConfigError) as err:
        Ablation.from_dict({"name": "x", **fields}, source="abl.yaml")
    assert str(err.value).startswith("abl.yaml: ") and message in str(err.value), str(err.value)


def test_workers_take_the_repeats_round_robin(write_ablation, tmp_path):
    path = write_ablation(name="pooled", limit=1, repeats=1, plugins={"sets": [[], ["dual_cache"]]})
    out = tmp_path / "pooled.jsonl"
    summary = run_ablation(Ablation.from_yaml(path), out, workers=2, quiet=True)
    records = read_records(out)
    assert summary.ok == 2 and len(out.read_text().splitlines()) == 4, records
    final = dedupe(records)
    assert all(r["timing"]["complete"] and [s["round"] for s in r["timing"]["samples"]] == [1] for r in final)
    assert all(s["nfe_total"] == r["metrics"]["nfe_total"] for r in final for s in r["timing"]["samples"])


def test_a_repeat_that_finishes_before_its_first_pass_waits_for_it():
    from dare_pipeline.evaluation.ablation.runner import _Rounds

    written = []
    rounds = _Rounds(2, lambda record, final=True: written.append((record, final)), recorded=set())
    spec = plan_runs(Ablation.from_dict({"name": "x"}))[0]

    def passed(tps):
        return {"status": "ok", "metrics": {"tokens_per_second": tps, "nfe_total": 4}, "wall_time_s": 1.0}

    rounds.result(spec, 2, passed(30.0))  # two workers: the repeats come back first
    rounds.result(spec, 1, passed(10.0))
    assert written == []
    rounds.result(spec, 0, passed(99.0))
    (pending, final_a), (done, final_b) = written
    assert not final_a and pending["timing"]["complete"] is False
    assert final_b and [s["round"] for s in done["timing"]["samples"]] == [1, 2]
    assert done["timing"]["tokens_per_second"]["median"] == 20.0 and done["metrics"]["tokens_per_second"] == 99.0
    assert rounds.dead(spec)


def test_an_interruption_right_after_a_record_is_written_counts_it(write_ablation, tmp_path, monkeypatch):
    """The signal may land between writing a run's record and noting it: the line counts the file."""
    from dare_pipeline.evaluation.ablation import runner
    from dare_pipeline.execution.lifecycle import Interrupted

    path = write_ablation(name="window", plugins={"sets": [[], ["prefix_cache"]]})
    out = tmp_path / "o.jsonl"

    def write_then_interrupt(output, record):
        append_record(output, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "append_record", write_then_interrupt)
    with pytest.raises(Interrupted) as caught:
        run_ablation(Ablation.from_yaml(path), out, quiet=True)
    assert len(read_records(out)) == 1
    assert caught.value.message == "interrupted; 1 of 2 runs recorded, rerun to resume"


def test_an_ablation_naming_an_empty_recipe_file_is_refused(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    abl = Ablation.from_dict({"name": "x", "recipe": "empty.yaml"}, source=str(tmp_path / "abl.yaml"))
    with pytest.raises(ConfigError, match=r"empty.yaml: the file is empty; a recipe is a mapping"):
        plan_runs(abl)


def test_a_run_timed_later_is_recorded_under_the_names_the_file_gives_it_now(write_ablation, tmp_path):
    out = tmp_path / "o.jsonl"
    first = write_ablation(name="first", plugins={"sets": [[]]})
    assert main(["ablate", str(first), "--output", str(out), "--quiet", "--no-report"]) == 0
    now = write_ablation(name="renamed", plugins={"sets": [[]]})
    assert main(["ablate", str(now), "--output", str(out), "--quiet", "--no-report", "--repeats", "1",
                 "--timing-limit", "1"]) == 0
    records = read_records(out)
    assert len(records) == 2 and records[0]["key"] == records[1]["key"]
    timed = records[1]
    assert timed["ablation"] == "renamed" and timed["ablation_file"].endswith("renamed.yaml")
    assert timed["accuracy"] == records[0]["accuracy"] and timed["timing"]["complete"]
