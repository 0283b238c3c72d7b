"""`dare-pipeline plugins test` and the pytest plugin's `--dare-plugin`, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

from dare_pipeline.cli import main


def _pytest(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_plugins_test_names_what_is_installed_for_an_unknown_plugin(capsys):
    assert main(["plugins", "test", "ffn_reuse", "no_such_plugin"]) == 2
    err = capsys.readouterr().err
    assert "no installed plugin named 'no_such_plugin'" in err and "dare_o" in err


def test_dare_plugin_option_runs_the_contract_in_any_directory(tmp_path):
    out = _pytest(["-q", "--dare-plugin", "ffn_reuse", "-k", "aborted and llada"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


def test_the_contract_imported_without_a_plugin_name_says_how_to_give_one(tmp_path):
    (tmp_path / "test_mine.py").write_text("from dare_pipeline.plugin_kit.contract import *\n")
    out = _pytest(["-q", "-k", "aborted and llada"], tmp_path)
    assert out.returncode != 0
    assert "run pytest with --dare-plugin NAME, or define a `dare_plugin` fixture" in out.stdout + out.stderr
