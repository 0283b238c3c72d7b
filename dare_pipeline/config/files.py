"""Reading the files a command is given (recipes, ablation files, prompt files, results) and the YAML
in them, within bounds.

Only regular files are read: a directory, a FIFO (which would block until something writes to it)
or a device such as /dev/zero (which never ends) is refused by name. YAML is read by a strict loader:
a key given twice in one mapping is an error (PyYAML keeps the last silently), and a document may be
at most MAX_DEPTH levels deep and expand to at most MAX_NODES nodes and MAX_CHARS characters of
scalars, anchors and aliases counted as often as they are used, so a small "billion laughs" file or
`--set` value cannot take the machine's memory. Anchors and aliases within these bounds are allowed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from .loading import ConfigError

MAX_FILE_BYTES = 4 << 20  # a recipe or ablation file is a few kB
MAX_DEPTH = 64  # levels of nested mappings and lists (a recipe uses four)
MAX_NODES = 100_000  # mappings, lists and scalars after expanding aliases
MAX_CHARS = 10_000_000  # characters of all scalars after expanding aliases
_MERGE_TAG = "tag:yaml.org,2002:merge"


def not_a_regular_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file ("not found", "a directory", "a FIFO", ...), None when it can
    (a symlink is followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    return f"is {file_kind(mode)}, not a regular file"


def file_kind(mode: int) -> str:
    """What a file is, from its st_mode: "a regular file", "a directory", "a FIFO (named pipe)", ..."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a file of an unknown kind")


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of regular file `path`, or a ConfigError naming it and `what` it should be."""
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem == "not found":
        raise ConfigError(f"{path}: {what} not found")
    if problem:
        raise ConfigError(f"{path}: {problem}; expected a {what}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{path}: {size} bytes; a {what} may have at most {max_bytes} bytes")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None


def read_yaml_file(path: str | os.PathLike, what: str):
    """The YAML document of file `path` (None when it is empty), read within the bounds above."""
    return parse_yaml(read_text_file(path, what), str(path))


def parse_yaml(text: str, source: str, value: bool = False):
    """The YAML document `text` (None when empty); errors are ConfigErrors naming `source` (`value`:
    the text is one value, such as a `--set`'s, and a syntax error is told in one line)."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader checks the characters: a control character fails here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        if value:
            problem = str(getattr(exc, "problem", None) or exc).strip()
            raise ConfigError(f"{source}: the value is not valid YAML ({problem})") from None
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except ValueError as exc:  # a scalar YAML reads but Python refuses: an integer of over 4300 digits
        raise ConfigError(f"{source}: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def check_nesting(data, source: str) -> None:
    """Plain data (from YAML or Python) within the same bounds: depth, size, no container holding
    itself; walked without recursion, so any depth gets this error rather than a RecursionError."""
    counted, stack = 0, [(data, 1, ())]
    while stack:
        value, depth, parents = stack.pop()
        counted += 1
        if counted > MAX_NODES:
            raise ConfigError(f"{source}: more than {MAX_NODES} values; a configuration this large is refused")
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep; a configuration this deep "
                                  f"is refused")
            if id(value) in parents:
                raise ConfigError(f"{source}: a mapping or list contains itself")
            children = list(value.values()) if isinstance(value, dict) else list(value)
            stack.extend((child, depth + 1, (*parents, id(value))) for child in children)


class _Refused(Exception):
    """A YAML document outside the bounds, or with a duplicate key (the message says which)."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep; a configuration this "
                           f"deep is refused")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise _Refused(f"line {line}: key {_short(key)} given twice in one mapping (first at line "
                                   f"{first[key]}); YAML would keep only the last")
                first[key] = line
        return super().construct_mapping(node, deep)


def _check_expansion(root, source: str) -> None:
    """Nodes and scalar characters of the document with every alias expanded, from the node graph
    (an alias is the node it names, so shared nodes are counted once per use without expanding)."""
    sizes: dict[int, tuple[int, int]] = {}
    stack = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            nodes, chars = 1, 0
            for child in _children(node):
                n, c = sizes[id(child)]
                nodes, chars = nodes + n, chars + c
            open_nodes.discard(key)
            sizes[key] = (nodes, chars)
            if nodes > MAX_NODES:
                raise _Refused(f"expands to more than {MAX_NODES} values (anchors and aliases counted at every use); "
                               f"a configuration this large is refused")
            if chars > MAX_CHARS:
                raise _Refused(f"expands to more than {MAX_CHARS} characters (anchors and aliases counted at every "
                               f"use); a configuration this large is refused")
            continue
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value))
            continue
        if key in open_nodes:
            raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
