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


def cmd_eval(args) -> int:
    """Accuracy on lm-eval tasks (the dare_* suite by default) with a recipe; writes a results JSON."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval needs lm-eval: pip install 'dare-pipeline[eval]'")
    from .evaluation.run import evaluate, format_table, set_offline, write_json_atomic

    set_offline()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tasks = [t.strip() for spec in args.tasks for t in spec.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and float(limit).is_integer() and float(limit) >= 1:
        limit = int(limit)
    doc = evaluate(tasks, recipe=args.recipe, model=args.model, overrides=args.set, batch_size=args.batch_size,
                   limit=limit, chat=args.chat, log_samples=args.log_samples, include_path=args.include_path,
                   command={k: v for k, v in vars(args).items() if k != "func"})
    if args.output:
        write_json_atomic(args.output, doc)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(format_table(doc))
        if args.output:
            print(f"results: {args.output}")
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

    ev = sub.add_parser("eval", help="accuracy on lm-eval tasks (dare_suite, dare_add, ...) with a recipe")
    ev.add_argument("--recipe", help="recipe YAML file (default: the baseline settings)")
    ev.add_argument("--tasks", required=True, action="append", metavar="T[,T2]",
                    help="lm-eval tasks or groups: dare_suite, dare_add, dare_sort, dare_reverse, dare_expr")
    ev.add_argument("--limit", type=float, help="at most N problems per task (a fraction < 1: that share)")
    ev.add_argument("--model", help="checkpoint directory (overrides the recipe's model)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    ev.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    ev.add_argument("--output", help="write the results JSON here (atomically)")
    ev.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (lm-eval's)")
    ev.add_argument("--log-samples", action="store_true", help="keep every response in the results JSON")
    ev.add_argument("--include-path", help="another directory of lm-eval task YAMLs")
    ev.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ev.set_defaults(func=cmd_eval)
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
