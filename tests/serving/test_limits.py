"""A live server's limits (docs/serving.md): /health answers within a second while a 50 MB body,
a maximal body or a long decode is handled; slow connections are timed out; connections beyond
--max-connections get a 503; past --shutdown-timeout what still decodes gets a JSON 503 or a stream
error event."""

import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

KEY = "limits-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIB = 2**20
DEFAULT_BODY_LIMIT = 4 * MIB


class HealthWatch:
    """Asks /health every 50 ms in a thread while the block runs; keeps the slowest answer."""

    def __init__(self, url: str):
        self.url, self.times, self.failures = f"{url}/health", [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError as error:
                    ok = False
                    self.failures.append(repr(error))
                self.times.append(time.monotonic() - started if ok else 5.0)
                self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def check(self, polls: int = 5):
        assert len(self.times) >= polls, self.times
        assert max(self.times) < 1.0, (max(self.times), self.failures)


def _raw(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--api-key", KEY)


def test_a_body_declared_too_large_is_refused_before_it_is_read(server):
    with HealthWatch(server.url) as health, _raw(server.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (50 * MIB))
        reply = _read_all(sock)  # the server answers and closes without waiting for the 50 MB
        time.sleep(0.3)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["message"] == f"the request body is larger than {DEFAULT_BODY_LIMIT:,} bytes " \
                                                   "(--max-body-bytes)"
    health.check()


def test_health_answers_while_a_50mb_body_is_sent_and_refused(server):
    def fifty_megabytes():  # chunked: no length is declared, the server counts what arrives
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"a" * MIB
        yield b'", "max_tokens": 32}'

    with HealthWatch(server.url) as health:
        try:
            reply = httpx.post(f"{server.url}/v1/completions", content=fifty_megabytes(), headers=AUTH, timeout=60)
            assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
        except httpx.TransportError:  # the server may close the connection before the client reads the 413
            pass
        time.sleep(0.3)
    health.check()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_health_answers_while_a_maximal_body_is_refused(server):
    body = {"prompt": "", "max_tokens": 32}
    body["prompt"] = "a" * (DEFAULT_BODY_LIMIT - len(json.dumps(body)))  # exactly --max-body-bytes
    content = json.dumps(body).encode()
    assert len(content) == DEFAULT_BODY_LIMIT
    with HealthWatch(server.url) as health, ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/completions", content=content, headers=AUTH,
                                                     timeout=60), range(4)))
        time.sleep(0.3)
    health.check()
    for reply in replies:
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    over = httpx.post(f"{server.url}/v1/completions", content=content + b" ", headers=AUTH, timeout=60)
    assert over.status_code == 413


def test_health_answers_while_a_long_decode_runs(server):
    body = {"prompt": "Q: reverse pythonwizard\nA: ", "max_tokens": 128}
    with HealthWatch(server.url) as health:
        reply = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["dare"]["nfe"] == 128
    health.check(polls=10)


@pytest.fixture(scope="module")
def impatient(start_server):
    return start_server("--read-timeout", "1", "--keep-alive-timeout", "1")


def _timed_out(sock: socket.socket, sent: bytes) -> tuple[float, bytes]:
    started = time.monotonic()
    if sent:
        sock.sendall(sent)
    reply = _read_all(sock)
    return time.monotonic() - started, reply


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"])
def test_a_request_head_that_does_not_arrive_in_time_gets_408(impatient, sent):
    with _raw(impatient.url) as sock:
        waited, reply = _timed_out(sock, sent)
    assert 0.8 < waited < 5 and reply.startswith(b"HTTP/1.1 408")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_a_body_that_does_not_arrive_in_time_gets_408(impatient):
    with _raw(impatient.url) as sock:
        waited, reply = _timed_out(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                                         b'{"prompt": ')
    head, _, body = reply.partition(b"\r\n\r\n")
    assert 0.8 < waited < 5 and head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["message"] == "the request body did not arrive within 1 s (--read-timeout)"


def test_an_idle_keep_alive_connection_is_closed(impatient):
    with _raw(impatient.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b'{"status":"ok"}'):  # the whole answer, kept alive after it
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        waited, rest = _timed_out(sock, b"")
    assert rest == b"" and 0.8 < waited < 5


@pytest.fixture(scope="module")
def crowded(start_server):
    return start_server("--max-connections", "2", "--keep-alive-timeout", "60")


def _kept_alive(url: str) -> socket.socket:
    """A connection that asked /health and stays open (counted by the server)."""
    sock = _raw(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while not reply.endswith(b'{"status":"ok"}'):
        reply += sock.recv(65536)
    return sock


def _until_served(url: str, seconds: float = 5.0) -> tuple[httpx.Response, int]:
    """GET `url` until it is not refused (a closed connection is counted out when the server sees it
    go); the reply and how many times it was refused first."""
    deadline, refusals = time.monotonic() + seconds, 0
    while (reply := httpx.get(url, timeout=10)).status_code == 503 and time.monotonic() < deadline:
        refusals += 1
        time.sleep(0.05)
    return reply, refusals


def _refused_so_far(url: str) -> tuple[float, int]:
    """dare_refused_connections_total, and the refusals met asking for it."""
    reply, refusals = _until_served(f"{url}/metrics")
    return float(re.search(r"^dare_refused_connections_total (\S+)$", reply.text, re.M).group(1)), refusals


def test_a_connection_beyond_max_connections_gets_503_and_a_freed_slot_serves_again(crowded):
    before, _ = _refused_so_far(crowded.url)
    first, second = _kept_alive(crowded.url), _kept_alive(crowded.url)
    with first, second:
        refused = httpx.get(f"{crowded.url}/health", timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        assert refused.json()["error"] == {
            "message": "the server has 2 connections open, the most it serves at once (--max-connections); retry "
                       "later", "type": "server_error", "param": None, "code": "too_many_connections"}
        second.close()
        served, refused_meanwhile = _until_served(f"{crowded.url}/health")
        assert served.status_code == 200
        after, refused_asking = _refused_so_far(crowded.url)
        assert after == before + 1 + refused_meanwhile + refused_asking
    assert re.search(r"refused \d+ connection\(s\) with 503: 2 open, --max-connections 2", crowded.output())


def test_a_refused_connection_still_open_does_not_count(crowded):
    """While a refused connection lingers (its client keeps it open), a freed slot serves at once."""
    first, second = _kept_alive(crowded.url), _kept_alive(crowded.url)
    with first, _raw(crowded.url) as refused:
        reply = b""
        while not reply.endswith(b'"too_many_connections"}}'):
            reply += refused.recv(65536)
        second.close()
        served, _ = _until_served(f"{crowded.url}/health", seconds=1.0)  # within the refused one's 2 s
        assert served.status_code == 200


def test_a_refused_connection_that_sends_nothing_is_answered_and_closed(crowded):
    with _kept_alive(crowded.url), _kept_alive(crowded.url), _raw(crowded.url) as silent:
        waited, reply = _timed_out(silent, b"")
    assert reply.startswith(b"HTTP/1.1 503") and b'"too_many_connections"' in reply
    assert waited < 1  # answered and ended at once, not when a read deadline passes


def test_past_the_shutdown_timeout_requests_get_503_and_streams_an_error_event(start_server):
    server = start_server("--shutdown-timeout", "1", "--batch-window-ms", "300")
    url = f"{server.url}/v1/completions"
    long = {"prompt": "Q: reverse pythonwizard\nA: ", "max_tokens": 512}
    started = threading.Event()
    stream_lines = []

    def stream():
        with httpx.stream("POST", url, json={**long, "stream": True}, timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    stream_lines.append(line.removeprefix("data: "))
                    started.set()

    with ThreadPoolExecutor(3) as pool:
        plain = pool.submit(httpx.post, url, json=long, timeout=60)  # decodes in one batch with the stream
        streamed = pool.submit(stream)
        assert started.wait(60)
        queued = pool.submit(httpx.post, url, json={**long, "max_tokens": 256}, timeout=60)  # waits for the batch
        time.sleep(0.5)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        replies = plain.result(), queued.result()
        streamed.result()
    assert time.monotonic() - signalled < 10
    for reply, says in zip(replies, ("decoding was cancelled: the server shut down (--shutdown-timeout 1 s)",
                                     "the server shut down (--shutdown-timeout 1 s) before this request was decoded")):
        assert reply.status_code == 503 and reply.headers["content-type"] == "application/json"
        assert reply.json()["error"] == {"message": says, "type": "server_shutting_down", "param": None, "code": None}
    last = json.loads(stream_lines[-1])
    assert last["error"]["type"] == "server_shutting_down" and "--shutdown-timeout 1 s" in last["error"]["message"]
    assert all("error" not in json.loads(line) for line in stream_lines[:-1])
    assert server.proc.wait(timeout=15) == 128 + signal.SIGTERM
    assert "Traceback" not in server.output() and "timeout graceful shutdown exceeded" not in server.output()


async def _in_process(max_connections: int, refusals: list):
    """The guarded protocol alone, served in this event loop: (protocol class, uvicorn's server state
    whose `connections` it counts, the asyncio server, its port); `refusals` gets one item a refusal."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from dare_pipeline.serving.limits import ServerLimits
    from dare_pipeline.serving.protocol import guarded_protocol

    async def app(scope, receive, send):  # never reached: no request is sent
        raise AssertionError(scope)

    config = uvicorn.Config(app, log_level="warning")
    config.load()
    protocol = guarded_protocol(ServerLimits(max_connections=max_connections), on_refused=lambda: refusals.append(1))
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0)
    return protocol, state, server, server.sockets[0].getsockname()[1]


def test_a_flood_of_connections_lingers_only_refused_lingering_of_them():
    """In process, the protocol alone: max_connections 1, then 1 + REFUSED_LINGERING + 10 clients
    that keep their connections open; the first is served, REFUSED_LINGERING refused ones linger
    and the last 10 are closed at once; every refused client reads its 503."""
    import asyncio

    from dare_pipeline.serving.protocol import REFUSED_LINGERING

    async def flood():
        refusals = []
        protocol, state, server, port = await _in_process(1, refusals)
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(1 + REFUSED_LINGERING + 10)]
        for _ in range(200):
            if len(refusals) == REFUSED_LINGERING + 10 and len(state.connections) == 1 + REFUSED_LINGERING:
                break
            await asyncio.sleep(0.01)
        lingering, open_ = len(protocol.lingering_open), len(state.connections)
        replies = [await asyncio.wait_for(reader.read(), 5) for reader, _ in clients[1:]]
        for _, writer in clients:
            writer.close()
        for _ in range(200):  # the server sees them go
            if not state.connections:
                break
            await asyncio.sleep(0.01)
        left = len(state.connections), len(protocol.refused_open), len(protocol.lingering_open)
        server.close()
        await server.wait_closed()
        return lingering, open_, replies, left

    lingering, open_, replies, left = asyncio.run(flood())
    assert (lingering, open_) == (REFUSED_LINGERING, 1 + REFUSED_LINGERING)
    assert left == (0, 0, 0)  # nothing kept for connections gone
    assert all(reply.startswith(b"HTTP/1.1 503") and reply.endswith(b'"too_many_connections"}}') for reply in replies)


def test_refusals_are_logged_at_most_once_an_interval_and_a_floods_last_count_too(monkeypatch):
    """In process, max_connections 1 and the log interval cut to 0.5 s: 1 served and 5 refused
    clients. The first refusal is logged at once; the others, refused within the interval, are
    counted in a line when it has passed, though no refusal follows them; lines are an interval apart."""
    import asyncio
    import logging

    from dare_pipeline.serving import protocol as protocol_module

    interval = 0.5
    monkeypatch.setattr(protocol_module, "REFUSAL_LOG_EVERY_S", interval)
    records = []
    handler = logging.Handler()
    handler.emit = records.append

    async def flood():
        refusals = []
        protocol, state, server, port = await _in_process(1, refusals)
        logger.addHandler(handler)  # after uvicorn's logging set-up, which drops the handlers it meets
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
        for _ in range(200):
            if len(refusals) == 5:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(2 * interval)  # the line due after the last refusal
        for _, writer in clients:
            writer.close()
        server.close()
        await server.wait_closed()
        return len(refusals)

    logger = logging.getLogger("uvicorn.error")
    try:
        refused = asyncio.run(flood())
    finally:
        logger.removeHandler(handler)
    lines = [r for r in records if "with 503" in r.getMessage()]
    counts = [int(re.match(r"refused (\d+) connection\(s\) with 503", r.getMessage()).group(1)) for r in lines]
    assert refused == 5 and sum(counts) == 5 and counts[0] == 1, [r.getMessage() for r in lines]
    assert lines[0].getMessage() == "refused 1 connection(s) with 503: 1 open, --max-connections 1"
    later = re.fullmatch(r"refused \d+ connection\(s\) with 503 in the last ([\d.]+) s: 1 open, --max-connections 1",
                         lines[1].getMessage())
    assert later and float(later.group(1)) >= interval - 0.01, lines[1].getMessage()
    assert all(b.created - a.created >= interval - 0.01 for a, b in zip(lines, lines[1:]))
