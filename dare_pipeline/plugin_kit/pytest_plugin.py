"""pytest plugin (entry point `pytest11`, active wherever dare-pipeline is installed).

- `pytest --dare-plugin NAME` (repeatable) adds the plugin contract (`plugin_kit.contract`) to the
  run, against the installed plugin NAME;
- a test module that imports the contract's tests (`from dare_pipeline.plugin_kit.contract import *`)
  names its plugin with a `dare_plugin` fixture instead, so plain `pytest` runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONTRACT = Path(__file__).with_name("contract.py")


def pytest_addoption(parser):
    group = parser.getgroup("dare-pipeline")
    group.addoption("--dare-plugin", action="append", default=[], metavar="NAME",
                    help="run the dare-pipeline plugin contract against the installed plugin NAME (repeatable)")


def pytest_configure(config):
    if config.getoption("dare_plugin") and not any(Path(a).resolve() == CONTRACT.resolve() for a in config.args
                                                   if a.endswith(".py")):
        config.args.append(str(CONTRACT))  # collected like a path given on the command line


def pytest_generate_tests(metafunc):
    names = metafunc.config.getoption("dare_plugin")
    if names and "dare_plugin" in metafunc.fixturenames and metafunc.definition.path.resolve() == CONTRACT.resolve():
        metafunc.parametrize("dare_plugin", names)


@pytest.fixture
def dare_plugin():
    """The plugin the contract checks: override it in a test module, or pass --dare-plugin NAME."""
    raise pytest.UsageError("the dare-pipeline plugin contract needs a plugin: run pytest with --dare-plugin NAME, "
                            "or define a `dare_plugin` fixture returning its name")
