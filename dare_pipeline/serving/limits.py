"""What one server allows: batch and queue sizes, open connections, the request body, and how long a
connection may take to send a request or to finish when the server stops. Each limit is a `serve`
option of the same name (docs/serving.md); values are checked here, for the command line and
`create_app` alike."""

from __future__ import annotations

import attrs

from ..config import in_range


def _count(low: int, high: int):
    """attrs validator: a whole number (not a bool) with low <= value <= high."""

    def check(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{attribute.name} = {value!r}: expected a whole number")
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} = {value!r}: must be between {low} and {high:,}")

    return check


def _seconds(low: float, high: float, strict: bool = False):
    """attrs validator: a finite number of seconds in [low, high] (low excluded when strict)."""
    within = in_range(low, high)

    def check(instance, attribute, value):
        within(instance, attribute, value)
        if strict and value == low:
            raise ValueError(f"{attribute.name} = {value!r}: must be > {low}")

    return check


@attrs.frozen(kw_only=True)
class ServerLimits:
    max_batch: int = attrs.field(default=16, validator=_count(1, 4096))  # rows decoded together at most
    # how long a row waits at most for others to join its batch
    batch_window_ms: float = attrs.field(default=20.0, validator=_seconds(0, 60_000))
    max_queue: int = attrs.field(default=256, validator=_count(1, 1_000_000))  # rows waiting at most
    # open client connections at most; one more is answered 503 and closed (each holds a file descriptor)
    max_connections: int = attrs.field(default=512, validator=_count(1, 1_000_000))
    # a request body larger than this is refused (413) before it is read
    max_body_bytes: int = attrs.field(default=4 * 2**20, validator=_count(1024, 2**30))
    # seconds a connection gets to send a request's line and headers, and then its body
    read_timeout: float = attrs.field(default=30.0, validator=_seconds(0, 3600, strict=True))
    # seconds an idle keep-alive connection stays open
    keep_alive_timeout: float = attrs.field(default=5.0, validator=_seconds(0, 3600, strict=True))
    # on SIGTERM, seconds in-flight requests get before they are cancelled
    shutdown_timeout: float = attrs.field(default=30.0, validator=_seconds(0, 3600))


def flag(field_name: str) -> str:
    """The `serve` option of a limit: max_body_bytes -> --max-body-bytes."""
    return "--" + field_name.replace("_", "-")
