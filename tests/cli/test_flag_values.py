"""Command-line values that were taken silently or crashed: --chat with --no-chat, --threads past
any machine (OpenMP crashed), calibrate's --tolerance / --max-trials / --limit below their ranges,
paths that exist but are not regular files (named by what they are, not "not found"), and
`plugins new` with the name of an installed plugin."""

from __future__ import annotations

import os

import pytest

from dare_pipeline.cli import main
from dare_pipeline.evaluation.calibration import calibrate
from dare_pipeline.config import ConfigError

CALIBRATE = ["calibrate", "--recipe", "recipes/dare_kv.yaml", "--prompts", "p.txt", "--target-reuse", "0.5"]


def _argparse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", [["generate", "hi"], CALIBRATE])
@pytest.mark.parametrize("flags", [["--chat", "--no-chat"], ["--no-chat", "--chat"]])
def test_chat_and_no_chat_exclude_each_other(capsys, command, flags):
    assert _argparse_error(command + flags, capsys).endswith("error: --chat and --no-chat exclude each other; give one")


def test_chat_given_twice_the_same_way_is_fine():
    from dare_pipeline.cli.commands import build_parser
    assert build_parser().parse_args(["generate", "hi", "--chat", "--chat"]).chat is True


@pytest.mark.parametrize("command", [["generate", "hi"], CALIBRATE, ["eval", "--tasks", "dare_add"],
                                     ["ablate", "a.yaml"]])
def test_threads_past_four_per_cpu_are_refused(capsys, command):
    cores = os.cpu_count() or 1
    assert _argparse_error(command + ["--threads", "100000"], capsys).endswith(
        f"argument --threads: 100000 is more than 4 x this machine's {cores} CPUs; expected 1 to {4 * cores}")


@pytest.mark.parametrize("flag, value, message", [
    ("--tolerance", "-1", "-1 is not allowed; expected a finite number >= 0"),
    ("--tolerance", "nan", "nan is not allowed; expected a finite number >= 0"),
    ("--max-trials", "0", "0 is not allowed; expected an integer >= 1"),
    ("--limit", "-1", "-1 is not allowed; expected an integer >= 1"),
])
def test_calibrate_counts_and_tolerance_have_ranges(capsys, flag, value, message):
    assert _argparse_error(CALIBRATE + [flag, value], capsys).endswith(f"argument {flag}: {message}")


@pytest.mark.parametrize("keyword, value, message", [("tolerance", -1.0, "tolerance = -1.0: must be a finite number"),
                                                     ("max_trials", 0, "max_trials = 0: must be an integer >= 1")])
def test_calibrate_checks_its_arguments_in_python_too(keyword, value, message):
    with pytest.raises(ConfigError, match=message):
        calibrate(None, None, [[5, 6]], 0.5, **{keyword: value})


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompts", "{dir}"], "{dir}: is a directory, not a regular file; expected a prompts file"),
    (["generate", "--prompts", "{fifo}"], "{fifo}: is a FIFO (named pipe), not a regular file; expected a prompts "
                                          "file"),
    (["generate", "--prompts", "/dev/zero"], "/dev/zero: is a character device, not a regular file; expected a "
                                             "prompts file"),
    (["report", "{dir}"], "{dir}: is a directory, not a regular file; expected a results file"),
    (["report", "/dev/zero"], "/dev/zero: is a character device, not a regular file; expected a results file"),
    (["generate", "hi", "--model", "/dev/zero"], "/dev/zero: is a device, not a directory; a checkpoint is a "
                                                 "directory of config.json and *.safetensors files"),
])
def test_paths_that_are_not_regular_files_say_what_they_are(tmp_path, capsys, argv, message):
    os.mkfifo(tmp_path / "fifo")
    names = {"dir": str(tmp_path), "fifo": str(tmp_path / "fifo")}
    assert main([a.format(**names) for a in argv]) == 2
    assert capsys.readouterr().err.endswith(f"dare-pipeline: error: {message.format(**names)}\n")


def test_plugins_new_refuses_the_name_of_an_installed_plugin(tmp_path, capsys):
    assert main(["plugins", "new", "baseline", "--dir", str(tmp_path / "pkg")]) == 2
    assert capsys.readouterr().err == (
        "dare-pipeline: error: plugin name 'baseline': an installed plugin has it "
        "(dare_pipeline_plugins.baseline:BaselineDecoding); recipes name plugins by entry point, so the two would "
        "shadow each other: choose another name\n")
    assert not (tmp_path / "pkg").exists()
