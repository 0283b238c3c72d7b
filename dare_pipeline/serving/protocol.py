"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for the request head.

uvicorn times out idle keep-alive connections, but a connection that sends its request line and
headers slowly (or nothing at all) is kept open for ever. Here a connection must send a complete
head within `read_timeout` seconds of connecting, or of its first byte after a response; else it
gets a 408 and is closed. (The body has its own deadline, in app.py.)
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request line and headers did not arrive within {seconds:g} s "
                                            "(--read-timeout)", "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


def timed_protocol(read_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class whose connections must send each request head within `read_timeout` s."""

    class TimedH11Protocol(H11Protocol):
        _head_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_deadline = self.loop.call_later(read_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request head in %g s", read_timeout)
                # h11 cannot answer a request it has not seen: the 408 is written as raw bytes
                self.transport.write(_timeout_response(read_timeout))
                self.transport.close()

    return TimedH11Protocol
