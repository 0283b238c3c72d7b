"""Output paths are checked before the work that fills them; a full disk is one line naming what
could not be written; a reader that goes away (`| head -1`) ends the command quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dare_pipeline.api as api
import dare_pipeline.evaluation.ablation.results as results
from dare_pipeline.cli import main

RECORD = '{"key": "a", "status": "ok"}\n'


def _cli(*argv, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "dare_pipeline.cli", *argv], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120)


def test_json_to_a_full_device_is_one_line_without_a_traceback():
    with open("/dev/full", "w") as full:
        done = _cli("plugins", "--json", stdout=full)
    assert done.returncode == 1
    assert done.stderr == "dare-pipeline: error: cannot write to standard output: No space left on device\n"


def test_a_closed_pipe_ends_the_command_quietly():
    read_end, write_end = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "dare_pipeline.cli", "plugins"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    os.close(read_end)  # gone before the command writes (it is still importing)
    assert child.wait(timeout=120) == 141  # 128 + SIGPIPE, as `yes | head -1` ends
    assert child.stderr.read() == ""


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or run fails the test: the output check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")
    monkeypatch.setattr(api.Pipeline, "from_recipe", refuse)
    import dare_pipeline.evaluation.ablation.runner as runner
    import dare_pipeline.evaluation.run as run
    monkeypatch.setattr(run, "evaluate", refuse)
    monkeypatch.setattr(runner, "plan_runs", refuse)
    monkeypatch.setattr(results, "merge", refuse)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_calibrate_output_is_checked_before_the_trials(tmp_path, capsys, no_work):
    prompts = tmp_path / "p.txt"
    prompts.write_text("add 1+2\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error(["calibrate", "--recipe", "recipes/dare_kv.yaml", "--prompts", str(prompts), "--target-reuse", "0.3", "--output",
                  str(blocker / "out.yaml")], capsys)
    assert err == f"dare-pipeline: error: --output {blocker}/out.yaml: {blocker} is a regular file, not a directory\n"
    err = _error(["calibrate", "--recipe", "recipes/dare_kv.yaml", "--prompts", str(prompts), "--target-reuse", "0.3", "--output", "/dev/full"], capsys)
    assert err.startswith("dare-pipeline: error: --output /dev/full: is a character device; give the path of a "
                          "regular file"), err


def test_eval_output_is_checked_before_the_evaluation(tmp_path, capsys, no_work):
    os.mkfifo(tmp_path / "fifo")
    err = _error(["eval", "--tasks", "dare_add", "--output", str(tmp_path / "fifo")], capsys)
    assert f"--output {tmp_path / 'fifo'}: is a FIFO (named pipe); give the path of a regular file" in err


def test_ablate_report_dir_is_checked_before_the_runs(tmp_path, capsys, no_work):
    ablation = tmp_path / "a.yaml"
    ablation.write_text("name: a\nplugins: {sets: [[]]}\n")
    blocker = tmp_path / "taken"
    blocker.write_text("")
    err = _error(["ablate", str(ablation), "--output", str(tmp_path / "r.jsonl"), "--report-dir", str(blocker)],
                 capsys)
    assert err == f"dare-pipeline: error: --report-dir {blocker}: is a regular file, not a directory\n"


def test_report_out_and_merged_are_checked_before_reading(tmp_path, capsys, no_work):
    found = tmp_path / "r.jsonl"
    found.write_text(RECORD)
    blocker = tmp_path / "taken"
    blocker.write_text("")
    err = _error(["report", str(found), "--out", str(blocker)], capsys)
    assert err == f"dare-pipeline: error: --out {blocker}: is a regular file, not a directory\n"
    err = _error(["report", str(found), "--out", str(tmp_path / "rep"), "--merged", "/dev/zero"], capsys)
    assert "--merged /dev/zero: is a character device" in err, err


def test_a_full_disk_names_the_file_that_could_not_be_written(tmp_path, capsys, monkeypatch):
    found = tmp_path / "r.jsonl"
    found.write_text(RECORD)
    real_fdopen = os.fdopen

    def full(fd, *args, **kwargs):  # the temporary file's writes land on a full device
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), *args, **kwargs)
    monkeypatch.setattr(results.os, "fdopen", full)
    merged = tmp_path / "m.jsonl"
    assert main(["report", str(found), "--out", str(tmp_path / "rep"), "--merged", str(merged)]) == 1
    assert capsys.readouterr().err == f"dare-pipeline: error: cannot write {merged}: No space left on device\n"
    assert not merged.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.jsonl")] == []


def test_report_on_a_file_without_records_is_an_error(tmp_path, capsys):
    garbage = tmp_path / "g.jsonl"
    garbage.write_bytes(b"\x00\xff not json\n[1, 2]\n")
    err = _error(["report", str(garbage), "--out", str(tmp_path / "rep")], capsys)
    assert err.endswith(f"dare-pipeline: error: {garbage}: no run records (a results file holds one JSON object "
                        f"with a string 'key' per line, as ablate writes; lines skipped are listed above)\n"), err
    assert not (tmp_path / "rep").exists()

