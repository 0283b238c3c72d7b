"""The `serve` subcommand: its arguments and the uvicorn server around the app."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..config.loading import ConfigError
from ..config.recipe import BASELINE_HELP


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, batching)")
    serve.add_argument("--recipe", help=f"recipe YAML file every request starts from ({BASELINE_HELP})")
    serve.add_argument("--model", help="checkpoint directory (overrides the recipe's model)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed when ready)")
    serve.add_argument("--max-batch", type=int, default=16, help="rows decoded together at most (default 16)")
    serve.add_argument("--batch-window-ms", type=float, default=20.0,
                       help="how long a request waits at most for others to share its batch (default 20)")
    serve.add_argument("--max-queue", type=int, default=256, help="rows waiting at most; beyond, 429 (default 256)")
    serve.add_argument("--max-tokens", type=int, metavar="N", help="the answer length of a request that sends no "
                       "max_tokens (generation.gen_length; default: the recipe's, else the model's, else 256)")
    serve.add_argument("--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask "
                       "for (default 1024)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds in-flight requests get to finish before they are cancelled")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        raise ConfigError("serve needs FastAPI and uvicorn: pip install 'dare-pipeline[serve]'")
    import torch
    import uvicorn

    from ..config.generation import with_max_tokens
    from ..config.recipe import recipe_or_baseline
    from ..models import load_model
    from .app import create_app
    from .requests import Served

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-tokens-limit", args.max_tokens_limit, 1), ("--max-tokens", 1 if args.max_tokens is None else args.max_tokens, 1),
                             ("--batch-window-ms", args.batch_window_ms, 0),
                             ("--shutdown-timeout", args.shutdown_timeout, 0)):
        if value < low:
            raise ConfigError(f"serve: {flag} = {value}: must be >= {low}")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_or_baseline(args.recipe, with_max_tokens(args.max_tokens, args.set))
    model_path = args.model or recipe.model
    model = load_model(model_path, dtype=recipe.dtype, device=recipe.device)
    name = args.served_model_name or (model_path if model_path.startswith("default") else Path(model_path).name)
    served = Served(name=name, model=model, recipe=recipe,
                    max_tokens=min(args.max_tokens_limit, model.config.max_sequence_length - 1))
    app = create_app(served, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                     max_queue=args.max_queue, api_key=args.api_key, threads=args.threads)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    config = uvicorn.Config(app, log_level="info", access_log=args.access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = _make_server(config, ready=f"dare-pipeline: serving {name!r} with recipe {recipe.name!r} on {url}")
    server.run(sockets=[sock])
    return 0


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


def _make_server(config, ready: str):
    """uvicorn's server, saying on stderr when it accepts connections (tests and scripts wait for it)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(ready, file=sys.stderr, flush=True)

    return Server(config)
