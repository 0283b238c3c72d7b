"""pytest plugin (entry point `pytest11`): `pytest --dare-plugin NAME` runs the plugin contract
(`plugin_kit.contract`) against the installed plugin NAME, alongside the tests pytest collects anyway."""

from __future__ import annotations

from pathlib import Path

CONTRACT = Path(__file__).with_name("contract.py")


def pytest_addoption(parser):
    group = parser.getgroup("dare-pipeline")
    group.addoption("--dare-plugin", action="append", default=[], metavar="NAME",
                    help="run the dare-pipeline plugin contract against the installed plugin NAME (repeatable)")


def pytest_configure(config):
    config.addinivalue_line("markers", "dare_contract: a test of the dare-pipeline plugin contract")
    if config.getoption("dare_plugin") and str(CONTRACT) not in config.args:
        config.args.append(str(CONTRACT))  # collected like a path given on the command line


def pytest_generate_tests(metafunc):
    if "dare_plugin" in metafunc.fixturenames:
        names = metafunc.config.getoption("dare_plugin")
        if not names:
            raise ValueError(f"{metafunc.definition.nodeid} needs a plugin name: run pytest with --dare-plugin NAME")
        metafunc.parametrize("dare_plugin", names)
