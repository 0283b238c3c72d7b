"""`dare-pipeline serve` refuses bad settings with one line, before it loads a model or listens."""

import socket

import pytest

from dare_pipeline.cli import main


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
    ("--port", "99999", "between 0 and 65535"),
    ("--port", "-1", "between 0 and 65535"),
    ("--max-tokens", "0", "between 1 and"),
    ("--threads", "100000", "must be between 1 and"),
    ("--threads", "0", "must be between 1 and"),
    ("--api-key", "", "visible ASCII"),
    ("--api-key", "two words", "visible ASCII"),
])
def test_bad_setting_exits_2_with_one_line_naming_the_flag(capsys, flag, value, allowed):
    assert main(["serve", "--recipe", "recipes/baseline.yaml", f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"serve: {flag}" in err and allowed in err and len(err.splitlines()) == 1, err


def test_a_port_in_use_is_a_clear_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--recipe", "recipes/baseline.yaml", "--port", str(port)]) == 2
    assert f"serve: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
