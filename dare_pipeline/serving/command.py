"""The `serve` subcommand: its arguments and the uvicorn server around the app."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

import attrs

from ..config.loading import ConfigError
from ..config.recipe import BASELINE_HELP
from .limits import ServerLimits, flag

API_KEY = re.compile(r"[\x21-\x7e]{1,512}")  # what an HTTP header carries unchanged


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, batching)")
    serve.add_argument("--recipe", help=f"recipe YAML file every request starts from ({BASELINE_HELP})")
    serve.add_argument("--model", help="checkpoint directory (overrides the recipe's model)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed when ready)")
    d = ServerLimits()
    serve.add_argument("--max-batch", type=int, default=d.max_batch,
                       help=f"rows decoded together at most (default {d.max_batch})")
    serve.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                       help="how long a request waits at most for others to share its batch (default "
                            f"{d.batch_window_ms:g})")
    serve.add_argument("--max-queue", type=int, default=d.max_queue,
                       help=f"rows waiting at most; beyond, 429 (default {d.max_queue})")
    serve.add_argument("--max-connections", type=int, default=d.max_connections,
                       help=f"client connections served at once; one more is answered 503 (default "
                            f"{d.max_connections})")
    serve.add_argument("--max-tokens", type=int, metavar="N", help="the answer length of a request that sends no "
                       "max_tokens (generation.gen_length; default: the recipe's, else the model's, else 256)")
    serve.add_argument("--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask "
                       "for (default 1024)")
    serve.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                       help=f"larger request bodies are refused with 413 (default {d.max_body_bytes:,})")
    serve.add_argument("--read-timeout", type=float, default=d.read_timeout,
                       help=f"seconds a connection gets to send a request's headers, and then its body (default "
                            f"{d.read_timeout:g})")
    serve.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
                       help=f"seconds an idle keep-alive connection stays open (default {d.keep_alive_timeout:g})")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    serve.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                       help="on SIGTERM, seconds in-flight requests get to finish before they are cancelled "
                            f"(default {d.shutdown_timeout:g})")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)


def check_options(args) -> ServerLimits:
    """The server's limits from the command line; any option out of range is a one-line ConfigError
    naming it (before the model loads or a port is taken)."""
    values = {f.name: getattr(args, f.name) for f in attrs.fields(ServerLimits)}
    try:
        limits = ServerLimits(**values)
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        raise ConfigError(f"serve: {str(error).replace(name, flag(name), 1)}") from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"serve: --port = {args.port}: must be between 0 and 65535 (0: any free port)")
    if not 1 <= args.max_tokens_limit <= 10**7:
        raise ConfigError(f"serve: --max-tokens-limit = {args.max_tokens_limit}: must be between 1 and 10,000,000")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError(f"serve: --max-tokens = {args.max_tokens}: must be >= 1")
    cores = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= 4 * cores:
        raise ConfigError(f"serve: --threads = {args.threads}: must be between 1 and {4 * cores} (4 x this "
                          f"machine's {cores} CPUs)")
    if args.api_key is not None and not API_KEY.fullmatch(args.api_key):
        raise ConfigError("serve: --api-key: must be 1 to 512 visible ASCII characters (no spaces), as clients "
                          "send it in an HTTP header")
    return limits


def cmd_serve(args) -> int:
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        raise ConfigError("serve needs FastAPI and uvicorn: pip install 'dare-pipeline[serve]'")
    limits = check_options(args)
    allow_open_files(limits.max_connections)
    import torch
    import uvicorn

    from ..config.generation import with_max_tokens
    from ..config.recipe import recipe_or_baseline
    from ..models import load_model
    from .app import SHUTDOWN_GRACE_S, create_app
    from .protocol import guarded_protocol
    from .requests import Served

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_or_baseline(args.recipe, with_max_tokens(args.max_tokens, args.set))
    model_path = args.model or recipe.model
    model = load_model(model_path, dtype=recipe.dtype, device=recipe.device)
    name = args.served_model_name or (model_path if model_path.startswith("default") else Path(model_path).name)
    served = Served(name=name, model=model, recipe=recipe,
                    max_tokens=min(args.max_tokens_limit, model.config.max_sequence_length - 1))
    app = create_app(served, limits=limits, api_key=args.api_key, threads=args.threads)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    # uvicorn's own deadline comes SHUTDOWN_GRACE_S after ours: by then the scheduler has answered
    # what was still running (503, or an error event), and uvicorn only closes the connections
    protocol = guarded_protocol(limits, on_refused=app.state.metrics.refused_connections.inc)
    config = uvicorn.Config(app, log_level="info", access_log=args.access_log, http=protocol,
                            timeout_keep_alive=limits.keep_alive_timeout,
                            timeout_graceful_shutdown=limits.shutdown_timeout + SHUTDOWN_GRACE_S)
    server = _make_server(config, ready=f"dare-pipeline: serving {name!r} with recipe {recipe.name!r} on {url}",
                          scheduler=app.state.scheduler, shutdown_timeout=limits.shutdown_timeout)
    server.run(sockets=[sock])
    return 0


# file descriptors the server needs besides the connections it serves: refused connections while
# they linger (protocol.REFUSED_LINGERING), the listening socket, logs, checkpoint files while they
# load, the worker's pipes, and what a GPU driver opens
OWN_FILES = 256


def allow_open_files(max_connections: int) -> None:
    """Raise this process's soft limit on open files (`ulimit -n`) to what `max_connections` needs, as
    far as the hard limit allows; beyond it, a ConfigError naming the option (before the model loads)."""
    try:
        import resource
    except ImportError:  # not on Unix: no per-process limit to raise
        return
    needed = max_connections + OWN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(f"serve: --max-connections = {max_connections}: this process may open at most {hard} "
                          f"files (ulimit -Hn) and keeps {OWN_FILES} for itself; allowed: 1 to "
                          f"{max(hard - OWN_FILES, 0)}, or raise the limit")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (ValueError, OSError) as error:
        raise ConfigError(f"serve: --max-connections = {max_connections}: cannot raise the open files limit "
                          f"(ulimit -n) from {soft} to {needed}: {error}") from None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so that port 0 resolves to a known port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise ConfigError(f"serve: cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def _make_server(config, ready: str, scheduler, shutdown_timeout: float):
    """uvicorn's server, saying on stderr when it accepts connections (tests and scripts wait for it),
    and cancelling what still decodes `shutdown_timeout` seconds after a shutdown begins."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(ready, file=sys.stderr, flush=True)

        async def shutdown(self, sockets=None) -> None:
            deadline = asyncio.get_running_loop().call_later(
                shutdown_timeout, scheduler.close, f"the server shut down (--shutdown-timeout {shutdown_timeout:g} s)")
            try:
                await super().shutdown(sockets=sockets)
            finally:
                deadline.cancel()

    return Server(config)
