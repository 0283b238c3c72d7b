"""pyproject.toml lists every package directory (setuptools needs them named: plugins/ is remapped)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).parents[1]


def test_every_package_directory_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dare_pipeline").rglob("__init__.py")}
    found.add("dare_pipeline_plugins")
    assert found == listed
