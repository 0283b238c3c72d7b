"""Plugins are found through the `dare_pipeline` entry-point group: built-ins and an installed package."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dare_pipeline import Pipeline
from dare_pipeline.core.registry import ENTRY_POINT_GROUP, PluginLoadError, available_plugins
from dare_pipeline.plugin_kit.testing import tiny_model

EXAMPLE = Path(__file__).parents[2] / "examples" / "step_logger"


def test_builtins_come_from_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert "baseline" in names
    assert set(names) <= set(available_plugins())


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """pip-install the example plugin package (offline, no dependencies) into a temporary directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(EXAMPLE)], check=True)
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    for mod in [m for m in sys.modules if m.startswith("dare_step_logger")]:
        del sys.modules[mod]


def test_installed_third_party_plugin_is_found_and_runs(installed_example, tmp_path):
    assert "step_logger" in available_plugins()
    log = tmp_path / "steps.jsonl"
    pipe = Pipeline(tiny_model(), {"generation": {"gen_length": 8, "block_length": 4, "steps": 8},
                                   "plugins": [{"name": "step_logger", "path": str(log)}]})
    out = pipe.generate([[1, 2, 3]])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == out.stats.nfe == 8
    assert lines[0]["committed"] == [1] and lines[-1]["block"] == 1
    assert out.stats.plugins["step_logger"] == {"lines_written": 8}


def test_broken_entry_point_names_itself(monkeypatch):
    from importlib import metadata

    broken = metadata.EntryPoint(name="broken", value="no_such_module_xyz:Thing", group=ENTRY_POINT_GROUP)
    real = metadata.entry_points
    monkeypatch.setattr("dare_pipeline.core.registry.entry_points",
                        lambda group: list(real(group=group)) + [broken])
    with pytest.raises(PluginLoadError, match=r"plugin entry point 'broken' \(no_such_module_xyz:Thing\) failed"):
        available_plugins()
