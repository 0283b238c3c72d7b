"""The command line (`dare-pipeline`): generate, recipe check, plugins, calibrate, eval, ablate,
report, serve and the plugin kit's commands."""

from .commands import main

__all__ = ["main"]
