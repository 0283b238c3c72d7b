"""The command line, `dare-pipeline` (commands.py): generate, recipe check, plugins, calibrate, eval,
ablate, report, serve and the plugin kit's commands."""

from .commands import main

__all__ = ["main"]
