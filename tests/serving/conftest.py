"""A `dare-pipeline serve` subprocess on a free loopback port, always killed when the test ends."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

READY = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+)")
ROOT = Path(__file__).resolve().parents[2]


# the child asks for SIGTERM when the test process dies (Linux), so no server outlives a killed pytest;
# done in the child's own Python rather than a preexec_fn, which is unsafe in a process with threads
LAUNCH = ("import ctypes, runpy, signal, sys\n"
          "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
          "except OSError:\n    pass\n"
          "sys.argv[0] = 'dare-pipeline'\nrunpy.run_module('dare_pipeline.cli', run_name='__main__')")


class ServerProcess:
    def __init__(self, log: Path, *args: str):
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", "--recipe", "recipes/baseline.yaml", "--port", "0",
             "--threads", "1", *args], cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.url = self._wait_ready(timeout=90)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = READY.search(self.log.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Start servers with extra arguments; each is stopped when the module's tests end (or fail)."""
    started = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(tmp_path_factory.mktemp("serve") / "server.log", *args)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
