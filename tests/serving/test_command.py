"""`dare-pipeline serve` refuses bad settings with one line, before it listens."""

import socket

import pytest

from dare_pipeline.cli import main


@pytest.mark.parametrize("flag, value", [("--max-batch", "0"), ("--max-queue", "0"), ("--batch-window-ms", "-1")])
def test_bad_setting_exits_2_naming_the_flag(capsys, flag, value):
    assert main(["serve", "--recipe", "recipes/baseline.yaml", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"serve: {flag} = " in err and "must be >=" in err and len(err.splitlines()) == 1


def test_a_port_in_use_is_a_clear_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--recipe", "recipes/baseline.yaml", "--port", str(port)]) == 2
    assert f"serve: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
