"""Output paths checked before the work that fills them, and standard output that may go away.

A command that runs for minutes (eval, ablate, calibrate) and then cannot write its results has
wasted the minutes: its output paths are checked first. Running as root, `os.access` says yes to
nearly everything, so a directory's writability is tried with a probe file created and removed in
it, which also meets a read-only file system. A path that exists but is not a regular file (a
FIFO, a device such as /dev/full, a socket) is refused by what it is: results are written through a
temporary file and `os.replace`, which would replace the device node itself.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from ..config.files import file_kind
from ..config.loading import ConfigError


def _nearest_directory(path: Path, option: str) -> Path:
    """The deepest existing ancestor of `path` (where the missing ones would be created); it must be a
    directory this process can create files in."""
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is {file_kind(parent.stat().st_mode)}, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".dare-pipeline-probe.")
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create files in {parent} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return parent


def check_output_file(output, option: str = "--output") -> None:
    """Refuse, before anything runs, a results file path that cannot be written: a directory or other
    non-regular file, a parent that is a file, a directory without write permission or on a
    read-only file system."""
    path = Path(output)
    if path.exists():
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{option} {output}: is a directory; give the results file's path (a file in it, say)")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{option} {output}: is {file_kind(mode)}; give the path of a regular file (results are "
                              f"written to a temporary file beside it, then moved into place)")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{option} {output}: not writable")
    _nearest_directory(path, option)


def check_output_dir(output, option: str = "--out") -> None:
    """Refuse, before anything runs, a directory for written files that is not one or cannot be
    created or written in."""
    path = Path(output)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {output}: is {file_kind(path.stat().st_mode)}, not a directory")
        _nearest_directory(path / "x", option)
    else:
        _nearest_directory(path, option)
