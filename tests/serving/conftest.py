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



@pytest.fixture(scope="session")
def default_model():
    from dare_pipeline import load_model

    return load_model("default")


def _asgi_client(app, **headers):
    """An httpx client talking to `app` in process (its batching worker must be started)."""
    import httpx

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a server logs, then answers 500
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60, headers=headers)


def _post_all(app, bodies, path="/v1/completions", timeout=120, **headers):
    """Post every body at once (raw bytes or JSON) and return the replies in order; a request not
    answered within `timeout` seconds fails the test (in process, httpx's own timeouts do not apply)."""
    import asyncio

    async def go():
        async with _asgi_client(app, **headers) as client:
            return await asyncio.wait_for(asyncio.gather(*(client.post(path, content=b) if isinstance(b, bytes) else
                                                           client.post(path, json=b) for b in bodies)), timeout)

    return asyncio.run(go())


@pytest.fixture
def asgi_client():
    """asgi_client(app, **headers): an httpx.AsyncClient for `app` in process."""
    return _asgi_client


@pytest.fixture
def post_all():
    """post_all(app, bodies, path=..., timeout=..., **headers): every body posted at once, the replies in order."""
    return _post_all
