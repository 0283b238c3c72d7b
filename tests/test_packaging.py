"""pyproject.toml lists every package directory (setuptools needs them named: plugins/ is remapped)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).parents[1]


def test_every_package_directory_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dare_pipeline").rglob("__init__.py")}
    found.add("dare_pipeline_plugins")
    # the embedded checkpoints are data-only packages (no __init__.py), listed so that the build keeps them quietly
    found |= {".".join(p.parent.relative_to(ROOT).parts)
              for p in (ROOT / "dare_pipeline" / "models" / "default").glob("*/config.json")}
    assert found == listed


def test_the_heldout_problems_are_stored_once_in_the_package():
    def ours(path):  # the repository's own files, not git's, runs' or build outputs
        parts = path.relative_to(ROOT).parts
        return path.is_file() and not any(p in {".git", "runs", "build", "dist"} or p.endswith(".egg-info")
                                           for p in parts)

    files = [p for p in ROOT.rglob("*") if ours(p)]
    assert [p.relative_to(ROOT).as_posix() for p in files if p.name == "heldout.jsonl"] == [
        "dare_pipeline/evaluation/tasks/heldout.jsonl"]
    removed = "data" + "/heldout"  # spelt in two so that this file does not name it
    stale = [p.relative_to(ROOT).as_posix() for p in files if p.suffix in {".py", ".md", ".yaml", ".toml", ".txt"}
             and removed in p.read_text(encoding="utf-8", errors="replace")]
    assert stale == [], f"these still name the removed {removed}.jsonl: {stale}"
