"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for the request head and a connection limit.

uvicorn times out idle keep-alive connections, but a connection that sends its request line and
headers slowly (or nothing at all) is kept open for ever. Here a connection must send a complete
head within `read_timeout` seconds of connecting, or of its first byte after a response; else it
gets a 408 and is closed. (The body has its own deadline, in app.py.)

Every connection holds a file descriptor and buffers until it closes, so at most `max_connections`
are served at once; one more is answered 503 as soon as it connects, and closed. A refused
connection lingers a moment so that its client reads the 503; at most REFUSED_LINGERING of them
at once, beyond which they are closed at once. So a flood of connections holds about
REFUSED_LINGERING descriptors beyond the served ones (those closed at once are released when the
event loop next turns).
"""

from __future__ import annotations

import json
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ServerLimits

# a refused connection reads and drops what its client sends for this long before it is closed:
# closing a socket with unread bytes resets the connection, and the client may lose the 503 unread
REFUSED_LINGER_S = 2.0
REFUSED_LINGERING = 64  # refused connections lingering at once at most
REFUSAL_LOG_EVERY_S = 10.0  # a flood of connections logs one line this often, not one each


def _raw_response(status: str, message: str, code: str, kind: str, extra_headers: bytes = b"") -> bytes:
    """A JSON error response written before h11 has seen a request (h11 cannot answer one it has not
    parsed): OpenAI's error shape, and the connection closed after it."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n%scontent-length: %d\r\n\r\n"
            % (status.encode(), extra_headers, len(body))) + body


def guarded_protocol(limits: ServerLimits, on_refused=lambda: None) -> type[H11Protocol]:
    """An H11Protocol class whose connections must send each request head within `limits.read_timeout`
    seconds, and of which at most `limits.max_connections` are open; `on_refused()` is called for
    each connection refused."""
    read_timeout, most = limits.read_timeout, limits.max_connections
    timeout_response = _raw_response(
        "408 Request Timeout", f"the request line and headers did not arrive within {read_timeout:g} s "
        "(--read-timeout)", "request_timeout", "invalid_request_error")
    refusal = _raw_response(
        "503 Service Unavailable", f"the server has {most} connections open, the most it serves at once "
        "(--max-connections); retry later", "too_many_connections", "server_error", b"retry-after: 1\r\n")
    refusals = {"logged_at": None, "since": 0, "due": None}  # due: the next line's timer
    # refused connections not closed yet: uvicorn's set of connections holds them too (so that a
    # shutdown closes them), but they are not served and do not count against the limit
    refused = set()
    lingering = set()  # of those, the ones left open for their clients to read the 503

    class GuardedH11Protocol(H11Protocol):
        _deadline = None
        _refused = False
        refused_open, lingering_open = refused, lingering  # for tests and diagnostics

        def connection_made(self, transport) -> None:
            super().connection_made(transport)  # adds it to self.connections
            if len(self.connections) - len(refused) > most:
                self._refuse()
            else:
                self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # answered already: drained and dropped
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            refused.discard(self)
            lingering.discard(self)
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(read_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request head in %g s", read_timeout)
                self.transport.write(timeout_response)
                self.transport.close()

        def _refuse(self) -> None:
            self._refused = True
            refused.add(self)
            on_refused()
            self._log_refusal()
            self.transport.write(refusal)
            if len(lingering) >= REFUSED_LINGERING:  # a flood: no descriptor is held for its clients' sake
                self.transport.close()
                return
            lingering.add(self)
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the client reads the 503, then the end of the stream
            self._deadline = self.loop.call_later(REFUSED_LINGER_S, self.transport.close)

        def _log_refusal(self) -> None:
            """One line for the first refusal, then at most one every REFUSAL_LOG_EVERY_S with the
            count since the last: a line falls due when the time has passed, flood or not, so the
            count of a flood's last seconds is logged too."""
            refusals["since"] += 1
            if refusals["due"] is not None:
                return  # the line already due counts this one
            logged_at = refusals["logged_at"]
            wait = 0.0 if logged_at is None else logged_at + REFUSAL_LOG_EVERY_S - time.monotonic()
            if wait <= 0:
                self._write_refusal_line()
            else:
                refusals["due"] = self.loop.call_later(wait, self._write_refusal_line)

        def _write_refusal_line(self) -> None:
            now, logged_at = time.monotonic(), refusals["logged_at"]
            span = "" if logged_at is None else f" in the last {now - logged_at:.3g} s"
            self.logger.warning("refused %d connection(s) with 503%s: %d open, --max-connections %d",
                                refusals["since"], span, len(self.connections) - len(refused), most)
            refusals.update(logged_at=now, since=0, due=None)

    return GuardedH11Protocol
