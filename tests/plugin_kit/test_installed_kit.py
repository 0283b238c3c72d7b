"""The plugin-author kit as a third party gets it: from installed wheels, without the repository.

Wheels of dare-pipeline and of examples/input_drift are built offline (no build isolation, no
index) from copies of their sources, and installed without dependencies into a fresh virtual
environment whose only other packages are this interpreter's installed dependencies (torch, pytest,
...: linked, without dare-pipeline's own metadata or an editable install of this repository).
There, from directories that hold only test files:
- dare_pipeline and the plugins import from the environment's site-packages (the wheels);
- the example's own tests, which import the shipped contract, pass;
- `dare-pipeline plugins test input_drift` and `pytest --dare-plugin input_drift` run the contract;
- `dare-pipeline plugins new` writes a package whose wheel passes its own tests.

Marked `installed_wheel` (about a minute): `-m "not installed_wheel"` leaves it out.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.installed_wheel

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "input_drift"
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "dare_pipeline", "plugins"]
SKIP = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".benchmarks")
# installed names of this repository's packages (kept out of the fresh environment but for the wheels)
OURS = ("dare_pipeline", "__editable__", "dare_step_logger", "dare_input_drift", "dare_kit_probe")
TIMEOUT = 300  # per command: a hung build or run fails the test instead of the CI job


def _run(cmd, cwd, env=None, stderr_too=False):
    result = subprocess.run([str(c) for c in cmd], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)  # the assertion below shows the output
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + (result.stderr if stderr_too else "")


def _wheel(source: Path, work: Path, out: Path) -> Path:
    """Build a wheel of `source` (copied to `work` first: the build writes beside the sources). The
    build prints no warning: setuptools' deprecations (a license table, a data directory it would
    ignore) are what a user sees on install, and each has a date after which the build fails."""
    output = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
                   "--wheel-dir", out, "."], cwd=work, stderr_too=True)
    warnings = [line.strip() for line in output.splitlines() if "Warning:" in line]
    assert warnings == [], f"building {source.name} warned:\n" + "\n".join(warnings)
    return out


def _copy(source: Path, target: Path, names=None) -> Path:
    target.mkdir(parents=True)
    for name in names or [p.name for p in source.iterdir()]:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, ignore=SKIP)
        elif path.is_file():
            shutil.copy2(path, target / name)
    return target


def _host_dependencies(target: Path) -> Path:
    """A directory of links to everything this interpreter has installed (torch, pytest, ...) except
    dare-pipeline itself and the example plugins: added as a plain path, so neither an editable
    install of this repository nor its metadata (entry points) reaches the fresh environment."""
    target.mkdir()
    # the site directories on this interpreter's path (a venv's, and the system's with --system-site-packages)
    on_path = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    for directory in dict.fromkeys([*on_path, *site.getsitepackages(), site.getusersitepackages()]):
        if not Path(directory).is_dir():
            continue
        for entry in Path(directory).iterdir():
            key = entry.name.lower().replace("-", "_")
            if key.startswith(OURS) or key.endswith(".pth") or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return target


class Env:
    """A fresh virtual environment with the wheels installed."""

    def __init__(self, root: Path):
        venv.create(root, with_pip=False, symlinks=os.name != "nt")
        self.bin = root / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / ("python.exe" if os.name == "nt" else "python")
        self.site = Path(_run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              cwd=root).strip())
        (self.site / "_host_dependencies.pth").write_text(str(_host_dependencies(root.parent / "host_deps")) + "\n")
        self.environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.environ["PATH"] = f"{self.bin}{os.pathsep}{self.environ.get('PATH', '')}"
        self.environ["OMP_NUM_THREADS"] = "1"  # torch's threads: tiny models on shared cores (as tests/conftest.py)

    def install(self, wheels: Path, *names: str) -> None:
        files = [str(w) for name in names for w in wheels.glob(f"{name}-*.whl")]
        assert len(files) == len(names), f"wheels {names} not all in {sorted(p.name for p in wheels.iterdir())}"
        _run([sys.executable, "-m", "pip", "--python", self.python, "install", "--quiet", "--no-deps", "--no-index",
              *files], cwd=wheels)

    def run(self, *cmd, cwd: Path) -> str:
        return _run(list(cmd), cwd=cwd, env=self.environ)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kit")
    wheels = tmp / "wheels"
    _wheel(ROOT, _copy(ROOT, tmp / "src" / "dare_pipeline", SOURCES), wheels)
    _wheel(EXAMPLE, _copy(EXAMPLE, tmp / "src" / "input_drift"), wheels)
    env = Env(tmp / "venv")
    env.install(wheels, "dare_pipeline", "dare_input_drift")
    return env, tmp


def test_the_wheel_ships_the_license(kit):
    _, tmp = kit
    (wheel,) = (tmp / "wheels").glob("dare_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as z:
        licenses = [n for n in z.namelist() if ".dist-info/licenses/" in n]
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert [n.rsplit("/", 1)[1] for n in licenses] == ["LICENSE"]
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata


def test_the_kit_checks_the_example_from_installed_wheels(kit):
    env, tmp = kit
    where = env.run(env.python, "-c", "import dare_pipeline, dare_pipeline_plugins, dare_input_drift, "
                    "dare_pipeline.plugin_kit.contract as c; from dare_pipeline.core import available_plugins; "
                    "print(dare_pipeline.__file__, dare_pipeline_plugins.__file__, dare_input_drift.__file__, c.__file__, "
                    "available_plugins()['input_drift'].__module__)", cwd=tmp).split()
    for path in where[:-1]:
        assert Path(path).is_relative_to(env.site), f"{path} is not imported from the installed wheel"
    assert where[-1] == "dare_input_drift"  # found through its entry point
    assert (env.site / "dare_pipeline" / "py.typed").is_file()  # type checkers read the installed annotations

    # the example's own tests (the shipped contract included), from a directory without its sources
    tests = _copy(EXAMPLE, tmp / "example_tests", ["tests", "pyproject.toml"])
    out = env.run(env.python, "-m", "pytest", "-v", "-p", "no:cacheprovider", cwd=tests)
    assert "test_exact_options_stacked_on_every_row_feeder_and_policy[llada] PASSED" in out
    assert " passed" in out and "failed" not in out and "skipped" not in out

    # the two other ways in: the CLI, and pytest's --dare-plugin (no test file of one's own)
    out = env.run(env.bin / "dare-pipeline", "plugins", "test", "input_drift", "-k", "stats or batch", cwd=tmp)
    assert "4 passed" in out
    bare = tmp / "bare"
    bare.mkdir()
    out = env.run(env.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--dare-plugin", "input_drift",
                  "-k", "aborted", cwd=bare)
    assert "2 passed" in out


def test_plugins_new_writes_a_package_that_passes_its_own_tests(kit):
    env, tmp = kit
    package = tmp / "new_plugin"
    env.run(env.bin / "dare-pipeline", "plugins", "new", "kit_probe", "--dir", package, cwd=tmp)
    wheels = tmp / "new_wheels"
    _wheel(package, package, wheels)
    env.install(wheels, "dare_kit_probe")
    tests = _copy(package, tmp / "new_plugin_tests", ["tests", "pyproject.toml"])
    out = env.run(env.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=tests)
    assert "passed" in out and "failed" not in out and "skipped" not in out
