"""`dare-pipeline plugins test NAME` and `dare-pipeline plugins new NAME` (the listing stays in cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_subcommands(plugins_parser) -> None:
    """The kit's subcommands under `dare-pipeline plugins` (which alone still lists the plugins)."""
    sub = plugins_parser.add_subparsers(dest="plugins_command", metavar="{test,new}")
    test = sub.add_parser("test", help="run the plugin contract (pytest) against installed plugins")
    test.add_argument("names", nargs="+", metavar="NAME", help="installed plugin name(s)")
    test.add_argument("-k", dest="keyword", help="only the contract tests matching this pytest -k expression")
    test.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failure")
    test.set_defaults(func=cmd_test)
    new = sub.add_parser("new", help="write a package skeleton for a new reuse plugin, with the contract wired in")
    new.add_argument("name", help="plugin name: lowercase letters, digits, underscores")
    new.add_argument("--dir", help="where to write it (default ./dare-NAME; must not exist or be empty)")
    new.set_defaults(func=cmd_new)


def cmd_test(args) -> int:
    from ..core.registry import available_plugins
    from .pytest_plugin import CONTRACT

    try:
        import pytest
    except ImportError:
        print("dare-pipeline: error: plugins test needs pytest: pip install pytest", file=sys.stderr)
        return 2
    installed = available_plugins()
    missing = [n for n in args.names if n not in installed]
    if missing:
        print(f"dare-pipeline: error: no installed plugin named {', '.join(map(repr, missing))}; "
              f"installed: {', '.join(sorted(installed))}", file=sys.stderr)
        return 2
    argv = [str(CONTRACT), "-q", "-p", "no:cacheprovider", "--rootdir", str(CONTRACT.parent)]
    for name in args.names:
        argv += ["--dare-plugin", name]
    if args.keyword:
        argv += ["-k", args.keyword]
    if args.exitfirst:
        argv.append("-x")
    return int(pytest.main(argv))


def cmd_new(args) -> int:
    from .skeleton import check_name, write

    check_name(args.name)
    directory = Path(args.dir or f"dare-{args.name.replace('_', '-')}")
    try:
        write(args.name, directory)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from exc
    print(f"wrote {directory}/ (plugin {args.name!r}); next:\n"
          f"  cd {directory} && pip install -e '.[test]' && python -m pytest")
    return 0
