"""`dare-pipeline plugins new`: what it writes, and what it refuses (the written package's own tests
run from installed wheels in test_installed_kit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dare_pipeline.cli import main
from dare_pipeline.plugin_kit import skeleton

EXAMPLE = Path(__file__).parents[2] / "examples" / "input_drift"
BUILT = {"build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", ".hypothesis"}


def test_the_example_is_exactly_what_plugins_new_writes():
    """examples/input_drift is `plugins new input_drift`: regenerate it when the skeleton changes."""
    def built(path: Path) -> bool:  # what building or testing the example leaves beside its files
        return any(part in BUILT or part.endswith(".egg-info") for part in path.relative_to(EXAMPLE).parts)

    on_disk = {str(p.relative_to(EXAMPLE)): p.read_text() for p in EXAMPLE.rglob("*") if p.is_file() and not built(p)}
    assert on_disk == skeleton.files("input_drift")


def test_new_writes_a_named_package(tmp_path, capsys):
    assert main(["plugins", "new", "my_reuse", "--dir", str(tmp_path / "pkg")]) == 0
    pkg = tmp_path / "pkg"
    assert 'my_reuse = "dare_my_reuse:MyReuse"' in (pkg / "pyproject.toml").read_text()
    assert 'name = "dare-my-reuse"' in (pkg / "pyproject.toml").read_text()
    assert "class MyReuse(Plugin):" in (pkg / "dare_my_reuse" / "__init__.py").read_text()
    assert 'return "my_reuse"' in (pkg / "tests" / "test_contract.py").read_text()
    assert (pkg / "tests" / "test_my_reuse.py").is_file()
    assert "pip install -e" in capsys.readouterr().out
    compile((pkg / "dare_my_reuse" / "__init__.py").read_text(), "plugin", "exec")


@pytest.mark.parametrize("name", ["My-Reuse", "1st", "class", "", "dare o"])
def test_new_refuses_a_name_that_is_no_module_name(name, tmp_path, capsys):
    assert main(["plugins", "new", name, "--dir", str(tmp_path / "pkg")]) == 2
    assert f"plugin name {name!r}" in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()


def test_new_refuses_a_directory_that_holds_files(tmp_path, capsys):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mine.txt").write_text("keep me")
    assert main(["plugins", "new", "my_reuse", "--dir", str(tmp_path / "pkg")]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["mine.txt"]


def test_new_writes_all_files_or_none(tmp_path, monkeypatch):
    real_write = Path.write_text
    written = []

    def fail_on_third(self, text, *args, **kwargs):
        written.append(self)
        if len(written) == 3:
            raise OSError("disk full")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        skeleton.write("my_reuse", tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []  # neither the package nor the staging directory
