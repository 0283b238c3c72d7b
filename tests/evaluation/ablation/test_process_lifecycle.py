"""Real `dare-pipeline` processes on the embedded model, stopped by real signals: `kill -9` and
`kill -TERM` of `ablate --workers 2` leave no descendant alive; SIGINT ends generate, eval and
ablate with status 130 and one line, no traceback. Every child runs in its own session and is
killed with its group in `finally`, whatever the test's outcome."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CLI = [sys.executable, "-m", "dare_pipeline.cli"]
# long enough that a run is still decoding when the signal comes (the signal ends it early)
LONG_GEN = ["generation.gen_length=64", "generation.block_length=32", "generation.steps=64"]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant (the start time tells a reused pid apart)."""
    tree, out, todo = _children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            start = _start_time(child)
            if start is not None:
                out[child] = start
                todo.append(child)
    return out


def alive(procs: dict[int, str]) -> list[int]:
    out = []
    for pid, start in procs.items():
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and _start_time(pid) == start:
            out.append(pid)
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    err = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 -- closed by the test in finally
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env=env,
                            start_new_session=True)
    return proc, err


def stop_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _ablation(tmp_path, name="procs", limit=4, seeds=(0, 1)):
    """Baseline runs (the slow ones) that differ by their seed only."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "model": "default", "tasks": ["dare_add"], "limit": limit,
                                    "repeats": 0, "set": LONG_GEN, "sweep": {"generation.seed": list(seeds)}}))
    return path


def _workers_busy(proc, n):
    """The spawned workers once n of them are computing (their CPU time has moved)."""
    procs = descendants(proc.pid)
    workers = [p for p in procs if "multiprocessing" in _cmdline(p) and "resource_tracker" not in _cmdline(p)]
    busy = [p for p in workers if _cpu_ticks(p) > 100]  # > ~1 s of CPU: past the imports, into a run
    return procs if len(busy) >= n else None


def _cpu_ticks(pid: int) -> int:
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


@pytest.mark.parametrize("signum, group", [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGINT, False),
                                           (signal.SIGINT, True)], ids=["kill-9", "term", "int", "ctrl-c-to-the-group"])
def test_no_worker_outlives_a_killed_ablate(tmp_path, signum, group):
    """group: the signal goes to the whole process group, as Ctrl-C in a terminal does."""
    path = _ablation(tmp_path)
    proc, err = start(["ablate", str(path), "--workers", "2", "--output", str(tmp_path / "out.jsonl"), "--quiet",
                       "--no-report"], tmp_path)
    try:
        wait_for(lambda: _workers_busy(proc, 2), 240, "two busy workers")
        procs = descendants(proc.pid)  # workers, resource tracker: everything below the runner
        assert len(procs) >= 2
        if group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        rc = proc.wait(timeout=30)
        wait_for(lambda: not alive(procs), 10, "every descendant of the killed runner to exit")
        err.seek(0)
        text = err.read()
        if signum != signal.SIGKILL:
            assert rc == 128 + signum, text
            assert text.strip().splitlines()[-1] == "dare-pipeline: interrupted; 0 of 2 runs recorded, rerun to resume"
            assert "Traceback" not in text
        else:
            assert rc == -signal.SIGKILL
    finally:
        stop_group(proc)
        err.close()


def _workers_started(proc, n):
    """The spawned workers once n of them exist, before their imports are done (a worker's
    interpreter start-up and imports take seconds)."""
    procs = descendants(proc.pid)
    workers = [p for p in procs if "multiprocessing" in _cmdline(p) and "resource_tracker" not in _cmdline(p)]
    return procs if len(workers) >= n else None


def test_ctrl_c_while_the_workers_start_prints_one_line_and_no_traceback(tmp_path):
    path = _ablation(tmp_path)
    proc, err = start(["ablate", str(path), "--workers", "2", "--output", str(tmp_path / "out.jsonl"), "--quiet",
                       "--no-report"], tmp_path)
    try:
        procs = wait_for(lambda: _workers_started(proc, 2), 240, "two started workers")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole group, workers included
        rc = proc.wait(timeout=60)
        wait_for(lambda: not alive(procs), 10, "every descendant of the interrupted runner to exit")
        err.seek(0)
        text = err.read()
        assert rc == 130, text
        assert text.strip().splitlines()[-1] == "dare-pipeline: interrupted; 0 of 2 runs recorded, rerun to resume"
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    finally:
        stop_group(proc)
        err.close()


def test_sigint_ends_ablate_with_one_line_and_resume_keeps_the_runs(tmp_path):
    path = _ablation(tmp_path, name="sigint", limit=2, seeds=(0, 1, 2))
    out = tmp_path / "out.jsonl"
    proc, err = start(["ablate", str(path), "--output", str(out), "--no-report"], tmp_path)
    try:
        wait_for(lambda: out.is_file() and out.read_text().count("\n") >= 1, 240, "the first run's record")
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
        err.seek(0)
        text = err.read()
        assert rc == 130, text
        last = text.strip().splitlines()[-1]
        recorded = out.read_text().count("\n")
        # the run in flight may have journaled a batch before the signal came
        assert re.fullmatch(rf"dare-pipeline: interrupted; {recorded} of 3 runs recorded( \(\d+ problem\(s\) of "
                            r"unfinished runs kept\))?, rerun to resume", last), text
        assert "Traceback" not in text and 1 <= recorded < 3
    finally:
        stop_group(proc)
        err.close()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_sigint_ends_eval_and_generate_with_one_line(tmp_path, command):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "slow", "model": "default",
                                      "generation": {"gen_length": 256, "block_length": 32, "steps": 256}}))
    if command == "eval":
        args = ["eval", "--recipe", str(recipe), "--tasks", "dare_add", "--limit", "4", "--threads", "1",
                "--output", str(tmp_path / "res.json")]
        expected = (f"dare-pipeline: interrupted; 0 of 1 runs recorded ({tmp_path / 'res.json'} not written), "
                    f"rerun to resume")
    else:
        args = ["generate", "--recipe", str(recipe), "--threads", "1", "Q: 1+2\nA: ", "Q: 3+4\nA: "]
        expected = "dare-pipeline: interrupted; nothing generated, nothing written"
    proc, err = start(args, tmp_path)
    try:
        # interrupt once it decodes (CPU time past the imports and the model load)
        wait_for(lambda: _cpu_ticks(proc.pid) > 600, 240, "the command to start decoding")
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
        err.seek(0)
        text = err.read()
        assert rc == 130, text
        assert text.strip().splitlines()[-1] == expected, text
        assert "Traceback" not in text
        assert not (tmp_path / "res.json").exists()
    finally:
        stop_group(proc)
        err.close()
