"""Processes that never outlive their parent, and interruptions that end a command cleanly.

Worker processes (the ablation runner's `--workers`) call `die_with_parent(parent_pid)` first
thing: on Linux the kernel sends them SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG),
whatever killed it, `kill -9` included; a daemon thread also polls the parent's pid (the portable
fallback, and a guard against the race where the parent died before prctl ran). The kernel
signal follows the parent *thread* that started the worker: the runner starts its workers from
the main thread (ProcessPoolExecutor.submit with the spawn method), which lives as long as the
process. Workers ignore
SIGINT: Ctrl-C in a terminal reaches the whole process group, and the parent is the one that
stops them and says how far the work got.

The command line turns SIGINT and SIGTERM into `Interrupted` (a KeyboardInterrupt), which the
commands catch to say what was kept; the process exits with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """An interruption (SIGINT or SIGTERM) with the line to show and the exit status."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT):
        super().__init__(message)
        self.message = message
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)

    def with_message(self, message: str) -> Interrupted:
        return Interrupted(message, self.signum)


def interrupted_line(command: str, output, message: str) -> str:
    """The line a command ends with when interrupted: the command's own (ablate says how many runs
    it recorded), else what was kept for the one-shot commands."""
    if message != "interrupted":
        return message
    if command == "eval":
        written = f" ({output} not written)" if output else ""
        return f"interrupted; 0 of 1 runs recorded{written}, rerun to resume"
    if command == "generate":
        return "interrupted; nothing generated, nothing written"
    return "interrupted"


def as_interrupted(exc: KeyboardInterrupt) -> Interrupted:
    return exc if isinstance(exc, Interrupted) else Interrupted()


def _raise_interrupted(signum, frame):
    raise Interrupted(signum=signum)


@contextlib.contextmanager
def _handlers_within(handlers: dict):
    """Within: the signal handlers `handlers` (signal -> handler), the previous ones back on exit.
    Only the main thread may set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in handlers}
    for s, handler in handlers.items():
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def interrupt_handlers():
    """Within: SIGINT and SIGTERM raise Interrupted in the main thread (SIGTERM would otherwise end
    the process at once, leaving no chance to stop the workers or to say what was kept). The
    previous handlers come back on exit."""
    return _handlers_within({signal.SIGINT: _raise_interrupted, signal.SIGTERM: _raise_interrupted})


def children_start_ignoring_interrupts():
    """Within: processes started here (the runner's spawned workers) begin with SIGINT ignored.
    A spawned worker runs the interpreter's start-up and its imports (seconds, with torch) before
    it can ignore SIGINT itself in die_with_parent, and a handler does not survive exec while
    SIG_IGN does; without this, Ctrl-C to the group in that window printed a KeyboardInterrupt
    traceback from every starting worker. A SIGINT to this process within (the few milliseconds
    the process starts take) is lost: a second Ctrl-C stops the command."""
    return _handlers_within({signal.SIGINT: signal.SIG_IGN})


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval: float) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent is gone: nobody will read this process's results
        time.sleep(interval)


def die_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Make this process end when the process `parent_pid` ends (call it in a child process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, interval), name="watch-parent", daemon=True).start()
