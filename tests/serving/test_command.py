"""`dare-pipeline serve` refuses bad settings with one line, before it loads a model or listens."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dare_pipeline.cli import main
from dare_pipeline.config import ConfigError


@pytest.mark.parametrize("flag, value, allowed", [
    ("--max-batch", "0", "between 1 and 4,096"),
    ("--max-queue", "0", "between 1 and 1,000,000"),
    ("--batch-window-ms", "-1", "between 0 and 60000"),
    ("--batch-window-ms", "inf", "finite number"),  # once killed the batching worker
    ("--batch-window-ms", "nan", "finite number"),
    ("--shutdown-timeout", "nan", "finite number"),
    ("--shutdown-timeout", "1e9", "between 0 and 3600"),
    ("--read-timeout", "0", "must be > 0"),
    ("--keep-alive-timeout", "-inf", "finite number"),
    ("--max-body-bytes", "10", "between 1024 and"),
    ("--max-connections", "0", "between 1 and 1,000,000"),
    ("--port", "99999", "between 0 and 65535"),
    ("--port", "-1", "between 0 and 65535"),
    ("--max-tokens", "0", "must be >= 1"),
    ("--max-tokens-limit", "0", "between 1 and"),
    ("--threads", "100000", "must be between 1 and"),
    ("--threads", "0", "must be between 1 and"),
    ("--api-key", "", "visible ASCII"),
    ("--api-key", "two words", "visible ASCII"),
])
def test_bad_setting_exits_2_with_one_line_naming_the_flag(capsys, flag, value, allowed):
    assert main(["serve", "--recipe", "recipes/baseline.yaml", f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"serve: {flag}" in err and allowed in err and len(err.splitlines()) == 1, err


ROOT = Path(__file__).resolve().parents[2]


def _under_ulimit(limits: str, *python: str) -> subprocess.CompletedProcess:
    """Run Python with its open files limited by bash's `ulimit` (set before Python starts)."""
    return subprocess.run(["bash", "-c", f'{limits} && exec "$0" "$@"', sys.executable, *python], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash's ulimit")
def test_more_connections_than_the_open_files_limit_allows_is_a_clear_error():
    done = _under_ulimit("ulimit -n 500", "-m", "dare_pipeline.cli", "serve", "--max-connections", "1000")
    assert done.returncode == 2
    assert done.stderr.strip() == ("dare-pipeline: error: serve: --max-connections = 1000: this process may open at "
                                   "most 500 files (ulimit -Hn) and keeps 256 for itself; allowed: 1 to 244, or "
                                   "raise the limit"), done.stderr


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash's ulimit")
def test_the_open_files_limit_is_raised_to_what_the_connections_need():
    show = ("import resource; from dare_pipeline.serving.command import allow_open_files as allow; "
            "allow(512); print(resource.getrlimit(resource.RLIMIT_NOFILE))")
    done = _under_ulimit("ulimit -Sn 100 && ulimit -Hn 2000", "-c", show)
    assert done.stdout.strip() == "(768, 2000)", done.stderr  # 512 connections + 256 of its own


def test_a_port_in_use_is_a_clear_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--recipe", "recipes/baseline.yaml", "--port", str(port)]) == 2
    assert f"serve: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, lengths, default_max_tokens", [
    ([], (64, 32, 64), 64),  # the baseline recipe, the embedded model's 64 tokens
    (["--max-tokens", "32"], (32, 32, 32), 32),
    (["--recipe", "recipes/threshold.yaml", "--max-tokens", "128", "--max-tokens-limit", "96"], (128, 32, 128), 96),
])
def test_the_default_recipe_and_max_tokens(monkeypatch, capsys, argv, lengths, default_max_tokens):
    from dare_pipeline.serving import app
    from dare_pipeline.serving.requests import request_recipe
    from dare_pipeline.serving.schemas import CompletionRequest

    seen = {}

    def served_then_stop(served, **settings):
        seen["served"] = served
        raise ConfigError("stop before listening")

    monkeypatch.setattr(app, "create_app", served_then_stop)
    assert main(["serve", *argv]) == 2
    assert "stop before listening" in capsys.readouterr().err
    served = seen["served"]
    g = served.recipe.generation
    assert served.recipe.name == (argv[1].split("/")[1][:-5] if "--recipe" in argv else "baseline")
    assert (g.gen_length, g.block_length, g.steps) == lengths
    # a request that sends no max_tokens gets that length (at most the limit)
    request = CompletionRequest(prompt="Q: reverse abc\nA: ")
    assert request_recipe(request, served).generation.gen_length == default_max_tokens
