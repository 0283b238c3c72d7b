"""An interrupted run resumes at the batch it was on: its journal (journal.py) keeps each decoded
batch's answers and counters, and the resumed run's record counts exactly what an uninterrupted run
counts."""

import errno
import json

import pytest

from dare_pipeline.cli import main
from dare_pipeline.evaluation.ablation import Ablation, plan_runs
from dare_pipeline.evaluation.ablation import journal as journal_mod
from dare_pipeline.evaluation.ablation.display import describe
from dare_pipeline.evaluation.ablation.journal import BatchJournal, add_counters, counters_delta
from dare_pipeline.evaluation.ablation.measure import RunStats
from dare_pipeline.evaluation.ablation.results import dedupe, read_records
from dare_pipeline.evaluation.ablation.runner import execute_run, run_ablation
from dare_pipeline.evaluation.lm_eval_model import DareLM
from dare_pipeline.execution.lifecycle import Interrupted

# what the record of a resumed run must count exactly as an uninterrupted one does
COUNTED = ("requests", "batches", "nfe_total", "nfe_per_request", "steps", "generated_tokens", "flops",
           "flops_full_recompute", "layer_rows", "rows_fed_x_layers", "canvas_rows_x_layers", "lm_head_rows",
           "plugins")


def _count_decodes(monkeypatch, interrupt_at=None):
    """Wrap the real batch decode: count its calls, and raise KeyboardInterrupt at call `interrupt_at`."""
    calls = []
    real = DareLM._decode_batch

    def decode(self, contexts, *args):
        calls.append(list(contexts))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(self, contexts, *args)

    monkeypatch.setattr(DareLM, "_decode_batch", decode)
    return calls


def test_an_interrupted_run_resumes_at_its_batch_and_counts_all_its_work(write_ablation, tmp_path, monkeypatch,
                                                                         capsys):
    path = write_ablation(name="journal", limit=3, plugins={"sets": [["prefix_cache"]]})
    abl = Ablation.from_yaml(path)
    whole = tmp_path / "whole.jsonl"
    run_ablation(abl, whole, quiet=True)
    (reference,) = read_records(whole)

    out = tmp_path / "cut.jsonl"
    root = tmp_path / "cut.partial"
    calls = _count_decodes(monkeypatch, interrupt_at=3)
    with pytest.raises(Interrupted) as caught:
        run_ablation(abl, out, quiet=True)
    assert caught.value.message == "interrupted; 0 of 1 runs recorded (2 problem(s) of unfinished runs kept), rerun to resume"
    assert read_records(out) == []
    (run_dir,) = root.iterdir()
    assert run_dir.name == reference["key"]
    assert len(read_records(run_dir / "rank0.jsonl", schemas=(journal_mod.SCHEMA,))) == 2
    assert main(["ablate", str(path), "--dry-run", "--output", str(out)]) == 0
    (line, _) = capsys.readouterr().out.splitlines()
    assert " resume " in line and line.endswith("(2 problem(s) already decoded, kept in its journal)")

    calls = _count_decodes(monkeypatch)
    summary = run_ablation(abl, out, quiet=True)
    assert summary.ok == 1
    assert len(calls) == 1  # only the batch the interruption stopped is decoded again
    (resumed,) = read_records(out)
    assert resumed["metrics"]["resumed_requests"] == 2 and reference["metrics"]["resumed_requests"] == 0
    assert describe(resumed).endswith("s, 2 of 3 problems from the journal)") and "journal" not in describe(reference)
    for name in COUNTED:
        assert resumed["metrics"][name] == reference["metrics"][name], name
    assert resumed["accuracy"] == reference["accuracy"]
    assert resumed["reuse"] == reference["reuse"]
    # the time of the batches decoded before the interruption is in the run's decode time
    assert resumed["metrics"]["decode_time_s"] > 0 and resumed["metrics"]["tokens_per_second"] > 0
    assert not root.exists()  # the record is written: its journal is gone


def test_timed_passes_neither_read_nor_write_the_journal(write_ablation, tmp_path, monkeypatch):
    path = write_ablation(name="timed", limit=2, repeats=1)
    abl = Ablation.from_yaml(path)
    out = tmp_path / "t.jsonl"
    _count_decodes(monkeypatch, interrupt_at=2)
    with pytest.raises(Interrupted):
        run_ablation(abl, out, quiet=True)
    (run_dir,) = (tmp_path / "t.partial").iterdir()
    journal_file = run_dir / "rank0.jsonl"
    assert len(journal_file.read_text().splitlines()) == 1

    # a timed pass decodes every problem itself, the recorded one too, and records nothing
    calls = _count_decodes(monkeypatch)
    (spec,) = plan_runs(abl)
    info = {"name": abl.name, "source": abl.source, "metric": abl.metric, "journal": str(tmp_path / "t.partial")}
    assert execute_run(spec, info, timed=True)["status"] == "ok"
    assert len(calls) == 2
    assert len(journal_file.read_text().splitlines()) == 1

    # the whole run: its first pass takes the recorded batch, and the journal is gone at the end
    calls = _count_decodes(monkeypatch)
    run_ablation(abl, out, quiet=True)
    (record,) = dedupe(read_records(out))
    assert record["timing"]["repeats"] == 1 and record["metrics"]["resumed_requests"] == 1
    assert len(calls) == 1 + 2  # the first pass's second problem, then the timed pass
    assert not (tmp_path / "t.partial").exists()


def test_a_recorded_batch_stands_for_one_decode_whichever_rank_recorded_it(tmp_path):
    run_dir = tmp_path / "run"
    BatchJournal(run_dir, rank=0).add("k", ["a"], {"requests": 1})
    BatchJournal(run_dir, rank=1).add("k", ["b"], {"requests": 1})
    (run_dir / "rank1.jsonl").open("a").write('{"schema": "dare-pipeline/ablation-batch/v1", "key": "k", "te')
    resumed = BatchJournal(run_dir, rank=0)
    assert resumed.take("k", 2) is None  # another batch size: not this batch
    assert sorted(resumed.take("k", 1)["texts"] + resumed.take("k", 1)["texts"]) == ["a", "b"]
    assert resumed.take("k", 1) is None  # the partial line is no batch


def test_counters_add_back_to_what_the_batch_counted():
    stats = RunStats(requests=2, flops={"total": 10.0, "ffn": 4.0}, rows={"q": 3}, plugin_counts={})
    before = stats.counters()
    # a plugin's first reuse fraction is 0: a value the delta keeps (else a run resumed wholly from
    # its journal would report no reuse fraction at all)
    batch = RunStats(requests=3, flops={"total": 15.0, "ffn": 4.0, "attn": 1.0}, rows={"q": 5},
                     plugin_counts={"dare_o": {"rows_reused": 7}}, ranks=1,
                     plugin_mean_sums={"dare_o": {"reuse_fraction": 0.0}},
                     plugin_weights={"dare_o": {"reuse_fraction": 1}})
    after = batch.counters()
    delta = counters_delta(before, batch)
    assert delta == {"requests": 1, "flops": {"total": 5.0, "attn": 1.0}, "rows": {"q": 2},
                     "plugin_counts": {"dare_o": {"rows_reused": 7}},
                     "plugin_mean_sums": {"dare_o": {"reuse_fraction": 0.0}},
                     "plugin_weights": {"dare_o": {"reuse_fraction": 1}}}
    add_counters(stats, delta)
    assert stats.counters() == after
    resumed = RunStats()  # a run whose every batch comes from the journal
    add_counters(resumed, delta)
    assert resumed.plugin_summary() == {"dare_o": {"rows_reused": 7, "reuse_fraction": 0.0}}


def test_a_least_value_is_recorded_whole_and_resumes_as_the_least():
    """A `min_...` plugin number is the least over the run's generations: a journal line keeps the
    value (a difference of minima means nothing) and a resumed run takes the least of its lines."""
    stats = RunStats(plugin_minima={"dllm_cache": {"min_verify_margin": 0.25}})
    before = stats.counters()
    stats.plugin_minima = {"dllm_cache": {"min_verify_margin": 0.125}}
    delta = counters_delta(before, stats)
    assert delta["plugin_minima"] == {"dllm_cache": {"min_verify_margin": 0.125}}
    resumed = RunStats()
    add_counters(resumed, {"plugin_minima": {"dllm_cache": {"min_verify_margin": 0.5}}})
    add_counters(resumed, delta)
    assert resumed.plugin_summary() == {"dllm_cache": {"min_verify_margin": 0.125}}


def test_a_resumed_run_keeps_the_peak_memory_of_its_earlier_pieces(write_ablation, tmp_path, monkeypatch):
    path = write_ablation(name="peak", limit=2)
    abl = Ablation.from_yaml(path)
    out = tmp_path / "p.jsonl"
    _count_decodes(monkeypatch, interrupt_at=2)
    with pytest.raises(Interrupted):
        run_ablation(abl, out, quiet=True)
    (journal_file,) = (tmp_path / "p.partial").glob("*/rank0.jsonl")
    (line,) = read_records(journal_file, schemas=(journal_mod.SCHEMA,))
    assert line["peak_bytes"] > 0
    journal_file.write_text(json.dumps(line | {"peak_bytes": 10**15}) + "\n")  # an earlier piece's higher peak
    monkeypatch.undo()
    run_ablation(abl, out, quiet=True)
    (record,) = read_records(out)
    assert record["memory"]["peak_bytes"] == record["memory"]["journal_peak_bytes"] == 10**15


def test_a_failed_journal_write_stops_the_journal_not_the_run(write_ablation, tmp_path, monkeypatch):
    def disk_full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(journal_mod, "append_record", disk_full)
    out = tmp_path / "f.jsonl"
    run_ablation(Ablation.from_yaml(write_ablation(name="full", limit=2)), out, quiet=True)
    (record,) = read_records(out)
    assert record["status"] == "ok" and record["metrics"]["requests"] == 2
    assert "No space left on device" in record["journal_error"]


def test_a_failed_run_drops_its_journal_and_a_retry_starts_over(write_ablation, tmp_path, monkeypatch):
    path = write_ablation(name="fails", limit=2)
    abl = Ablation.from_yaml(path)
    out = tmp_path / "x.jsonl"
    real, calls = DareLM._decode_batch, []

    def fail_second(self, contexts, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug, fixed before the retry")
        return real(self, contexts, *args)

    monkeypatch.setattr(DareLM, "_decode_batch", fail_second)
    run_ablation(abl, out, quiet=True)
    assert read_records(out)[0]["status"] == "failed"
    assert not (tmp_path / "x.partial").exists()
    monkeypatch.undo()
    calls = _count_decodes(monkeypatch)
    run_ablation(abl, out, quiet=True, retry_failed=True)
    assert len(calls) == 2 and read_records(out)[-1]["status"] == "ok"


def test_journals_of_recorded_runs_are_dropped(write_ablation, tmp_path):
    """A process that ends between writing a run's record and removing its journal leaves one behind;
    so does a run whose first pass comes from another results file."""
    path = write_ablation(name="left", limit=2)
    abl = Ablation.from_yaml(path)
    donor = tmp_path / "donor.jsonl"
    run_ablation(abl, donor, quiet=True)
    (key,) = [r["key"] for r in read_records(donor)]
    left_behind = tmp_path / "donor.partial" / key
    left_behind.mkdir(parents=True)
    assert run_ablation(abl, donor, quiet=True).already == 1
    assert not (tmp_path / "donor.partial").exists()

    out = tmp_path / "taker.jsonl"
    (tmp_path / "taker.partial" / key).mkdir(parents=True)
    assert run_ablation(abl, out, quiet=True, reuse_runs=[donor]).reused == 1
    assert not (tmp_path / "taker.partial").exists()
