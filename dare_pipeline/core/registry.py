"""Finding plugins and wiring them into pluggy.

Built-in and third-party plugins are found the same way: entry points of the group
`dare_pipeline`, whose name is the plugin name and whose object is a `Plugin` subclass.
Every pipeline gets a fresh PluginManager, so repeated in-process runs never leak plugins.
"""

from __future__ import annotations

import contextlib
import os
import sys
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .plugin import DECISIONS, Plugin

ENTRY_POINT_GROUP = "dare_pipeline"
# set to 1 to print every hook call and its result to stderr
TRACE_ENV = "DARE_PIPELINE_TRACE_HOOKS"
DEFAULT_POLICY = "baseline"

_extra: dict[str, type[Plugin]] = {}


class PluginLoadError(RuntimeError):
    pass


def available_plugins() -> dict[str, type[Plugin]]:
    """Plugin name -> class, from the entry-point group (plus classes added with `registered`)."""
    found: dict[str, type[Plugin]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one it is
            raise PluginLoadError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        _check_class(ep.name, cls, ep.value)
        found[ep.name] = cls
    found.update(_extra)
    return found


def plugin_version(name: str) -> str:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name and ep.dist is not None:
            return ep.dist.version
    return "unregistered"


def _check_class(name: str, cls, where: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginLoadError(f"plugin {name!r} ({where}) is not a dare_pipeline.core.Plugin subclass")
    if cls.name != name:
        raise PluginLoadError(f"plugin class {cls.__name__} declares name {cls.name!r} but is registered as {name!r}")
    unknown = set(cls.provides) - set(DECISIONS)
    if unknown:
        raise PluginLoadError(f"plugin {name!r} provides unknown decisions {sorted(unknown)}; known: {list(DECISIONS)}")


@contextlib.contextmanager
def registered(*classes: type[Plugin]):
    """Make plugin classes available without an entry point, for the duration of a `with` block."""
    for cls in classes:
        _check_class(cls.name, cls, cls.__module__)
        _extra[cls.name] = cls
    try:
        yield
    finally:
        for cls in classes:
            _extra.pop(cls.name, None)


def hook_names(obj) -> list[str]:
    """Names of the hooks a plugin class or instance implements."""
    return sorted(n for n in dir(hookspecs) if n.startswith("dare_") and callable(getattr(obj, n, None)))


def make_manager(plugins: list[Plugin]) -> pluggy.PluginManager:
    """A fresh PluginManager with the hookspecs and the given plugin instances registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin, name=plugin.name)
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()
    return pm
