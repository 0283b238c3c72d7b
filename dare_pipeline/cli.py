"""The `dare-pipeline` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .config_loading import ConfigError
from .models.loader import CheckpointError


def _recipe(args):
    from .recipe import Recipe

    return Recipe.from_yaml(args.recipe, overrides=args.set)


def cmd_generate(args) -> int:
    from .api import Pipeline
    from .progress import ProgressBar

    recipe = _recipe(args)
    pipe = Pipeline.from_recipe(recipe, model_path=args.model)
    prompts = [[int(t) for t in ids.split(",") if t.strip()] for ids in args.prompt_ids or []]
    prompts += list(args.prompt or [])
    if not prompts:
        raise ConfigError("generate: give at least one PROMPT or --prompt-ids")
    show_bar = not args.json and sys.stderr.isatty() and not args.no_progress
    if show_bar:
        pipe.manager.register(ProgressBar(total=recipe.generation.gen_length * len(prompts)), name="progress")
    out = pipe.generate(prompts, chat=args.chat)
    if args.json:
        print(json.dumps({"sequences": out.sequences, "text": out.text, "stats": out.stats.to_dict()}))
        return 0
    for i, answer in enumerate(out.text if out.text is not None else out.answers):
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print(answer if isinstance(answer, str) else ",".join(map(str, answer)))
    print(f"[{recipe.name}] {out.stats.summary()}", file=sys.stderr)
    return 0


def cmd_plugins(args) -> int:
    import attrs

    from .registry import available_plugins, hook_names, plugin_version

    plugins = available_plugins()
    rows = []
    for name, cls in sorted(plugins.items()):
        options = {f.name: f.default for f in attrs.fields(cls.Options)}
        rows.append({"name": name, "version": plugin_version(name), "class": f"{cls.__module__}.{cls.__qualname__}",
                     "provides": sorted(cls.provides), "hooks": hook_names(cls), "options": options})
    if args.json:
        print(json.dumps(rows, default=repr))
        return 0
    for r in rows:
        print(f"{r['name']} {r['version']}  ({r['class']})")
        print(f"  provides: {', '.join(r['provides']) or '-'}")
        print(f"  hooks:    {', '.join(r['hooks'])}")
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items())
        print(f"  options:  {opts or '-'}")
    return 0


def cmd_recipe_check(args) -> int:
    recipe = _recipe(args)
    plugins = ", ".join(p.name for p in recipe.plugins) or "none (baseline policy)"
    g = recipe.generation
    print(f"{args.recipe}: ok — {recipe.name}: model={recipe.model} gen_length={g.gen_length} "
          f"block_length={g.block_length} steps={g.steps} plugins: {plugins}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dare-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode prompts with a recipe (several prompts decode as one batch)")
    gen.add_argument("prompt", nargs="*", help="prompt text (needs a checkpoint with a tokenizer)")
    gen.add_argument("--recipe", required=True, help="recipe YAML file")
    gen.add_argument("--model", help="checkpoint directory (overrides the recipe's model)")
    gen.add_argument("--prompt-ids", action="append", metavar="1,2,3", help="a prompt as comma-separated token ids")
    gen.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object: sequences, text, stats")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    plug = sub.add_parser("plugins", help="list the loaded plugins with version, hooks and options")
    plug.add_argument("--json", action="store_true")
    plug.set_defaults(func=cmd_plugins)

    rec = sub.add_parser("recipe", help="recipe tools")
    rec_sub = rec.add_subparsers(dest="recipe_command", required=True)
    check = rec_sub.add_parser("check", help="validate a recipe")
    check.add_argument("recipe")
    check.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    check.set_defaults(func=cmd_recipe_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"dare-pipeline: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
