"""The `dare-pipeline` command line."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys

from ..config.execution import MODES
from ..config.generation import MAX_TOKENS_HELP
from ..config.loading import ConfigError
from ..config.recipe import BASELINE_HELP
from ..models.loader import CheckpointError
from ..prompts.encode import format_hint
from ..prompts.files import FORMATS, read_prompts
from ..serving.command import add_parser as add_serve_parser
from .args import ChatFlag, non_negative_float, positive_int, thread_count, token_ids


def _recipe(args):
    """--recipe (the baseline recipe without it) with --max-tokens and --set applied."""
    from ..config.generation import with_max_tokens
    from ..config.recipe import recipe_or_baseline

    return recipe_or_baseline(args.recipe, with_max_tokens(getattr(args, "max_tokens", None), args.set))


def _execution_override(args) -> None:
    """--execution MODE is shorthand for --set execution.mode=MODE."""
    if getattr(args, "execution", None):
        args.set.append(f"execution.mode={args.execution}")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_generate(args) -> int:
    from ..api import Pipeline
    from .progress import ProgressBar

    _set_threads(args.threads)
    _execution_override(args)
    pipe = Pipeline.from_recipe(_recipe(args), model_path=args.model)
    recipe = pipe.recipe  # with the model's answer length where the recipe leaves it
    _print_notes(recipe)
    prompts = list(args.prompt_ids or [])
    prompts += list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts(args.prompts, args.prompts_format)
    if not prompts:
        raise ConfigError("generate: give at least one PROMPT, --prompt-ids or --prompts FILE")
    show_bar = not args.json and sys.stderr.isatty() and not args.no_progress and not args.stream
    if show_bar:
        pipe.manager.register(ProgressBar(total=recipe.generation.gen_length * len(prompts)), name="progress")
    view = None
    if args.stream:
        from .progress import CanvasView

        view = CanvasView(len(prompts), recipe.generation.gen_length, pipe.model.tokenizer,
                          file=sys.stderr if args.json else sys.stdout)
    out = pipe.generate(prompts, chat=args.chat, step_callback=view)
    if args.json:
        print(json.dumps({"sequences": out.sequences, "text": out.text, "stats": out.stats.to_dict()}))
        return 0
    for i, answer in enumerate(out.text if out.text is not None else out.answers):
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print(answer if isinstance(answer, str) else ",".join(map(str, answer)))
    for hint in filter(None, (format_hint(pipe.model.tokenizer, p, args.chat) for p in prompts)):
        print(f"note: {hint}", file=sys.stderr)
    print(f"[{recipe.name}] {out.stats.summary()}", file=sys.stderr)
    return 0


def description(cls) -> str:
    """What `plugins` says a plugin does: the first line of the plugin class's own docstring, else of
    its module's; "" without either."""
    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else ""


def conflicts(name: str, classes: dict) -> dict[str, str]:
    """Plugins `name` cannot be combined with and why: those it declares and those that declare it."""
    found = dict(classes[name].conflicts)
    for other, cls in sorted(classes.items()):
        if name in cls.conflicts and other not in found:
            found[other] = cls.conflicts[name]
    return found


def cmd_plugins(args) -> int:
    import attrs

    from ..core.registry import available_plugins, hook_names, plugin_version

    plugins = available_plugins()
    rows = []
    for name, cls in sorted(plugins.items()):
        options = {f.name: f.default for f in attrs.fields(cls.Options)}
        rows.append({"name": name, "version": plugin_version(name), "class": f"{cls.__module__}.{cls.__qualname__}",
                     "description": description(cls), "provides": sorted(cls.provides),
                     "conflicts": conflicts(name, plugins), "hooks": hook_names(cls), "options": options})
    if args.json:
        print(json.dumps(rows, default=repr))
        return 0
    for r in rows:
        print(f"{r['name']} {r['version']}  ({r['class']})")
        if r["description"]:
            print(f"  {r['description']}")
        print(f"  provides: {', '.join(r['provides']) or '-'}")
        print(f"  conflicts: {', '.join(r['conflicts']) or '-'}")  # why: in --json
        print(f"  hooks:    {', '.join(r['hooks'])}")
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items())
        print(f"  options:  {opts or '-'}")
    return 0


def _print_notes(recipe) -> None:
    from ..config.recipe import recipe_notes

    for note in recipe_notes(recipe):
        print(f"note: {note}", file=sys.stderr)


def _for_its_model(recipe):
    """`recipe` resolved as it decodes on its own model (the lengths it leaves unset taken from the
    model's generation_config.json, read without loading the weights); with a model directory that
    is not here, the library defaults fill them and a note says so."""
    from ..models.default import resolve_model_path
    from ..models.loader import read_generation_config

    directory = resolve_model_path(recipe.model)
    if not directory.is_dir():
        print(f"note: {recipe.source}: model {recipe.model!r} not found here; the lengths the recipe leaves unset "
              f"are shown as the library defaults (the model's generation_config.json may choose others)",
              file=sys.stderr)
        return recipe.resolved()
    return recipe.resolved(read_generation_config(directory), str(directory / "generation_config.json"))


def cmd_recipe_check(args) -> int:
    """Validate each recipe file (every error of each); --print writes the resolved recipes as YAML."""
    import yaml

    from ..config.recipe import Recipe

    failed = 0
    for i, path in enumerate(args.recipe):
        try:
            recipe = _for_its_model(Recipe.from_yaml(path, overrides=args.set))
        except (ConfigError, CheckpointError) as exc:
            failed += 1
            _print_error(exc)
            continue
        _print_notes(recipe)
        plugins = ", ".join(p.name for p in recipe.plugins) or "none (baseline policy)"
        g = recipe.generation
        print(f"{path}: ok — {recipe.name}: model={recipe.model} gen_length={g.gen_length} "
              f"block_length={g.block_length} steps={g.steps} plugins: {plugins}",
              file=sys.stderr if args.print else sys.stdout)
        if args.print:  # several files: one YAML document each
            print(("---\n" if i else "") + f"# {path} resolved\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False),
                  end="")
    return 2 if failed else 0


def cmd_calibrate(args) -> int:
    """Pick a DARE plugin's threshold for a target reuse on given prompts; write the recipe with it."""
    import yaml

    from ..api import Pipeline
    from ..evaluation.ablation.display import Display
    from ..evaluation.calibration import calibrate
    from ..evaluation.run import write_text_atomic
    from ..execution.outputs import check_output_file

    if args.output:
        check_output_file(args.output)  # before the trials, not after them
    _set_threads(args.threads)
    prompts = read_prompts(args.prompts)[: args.limit]
    pipe = Pipeline.from_recipe(_recipe(args), model_path=args.model)
    recipe = pipe.recipe  # calibrated, and written, with the lengths it decodes with
    ids = pipe.encode(prompts, chat=args.chat)

    # the ablation's display: trials done with ETA (at most --max-trials), the trial in flight with its
    # prompts decoded, on a terminal; one line per trial otherwise
    display = Display(args.max_trials, unit=f"trials (at most {args.max_trials})")

    def prompt_done(threshold, done, total):  # trial number display.done + 1 is in flight
        display.start_run(display.done + 1, f"threshold {threshold:.6g}: prompts")
        display.run_progress(display.done + 1, done, total)

    def progress(trial):
        display.finish(display.done + 1, f"threshold {trial.threshold:.6g}: reuse {trial.reuse:.4f} "
                                         f"({trial.nfe} forwards)")

    try:
        result = calibrate(pipe.model, recipe, ids, args.target_reuse, plugin=args.plugin, tolerance=args.tolerance,
                           max_trials=args.max_trials, progress=progress, prompt_done=prompt_done)
    finally:
        display.close()
    doc = result.recipe.to_dict()
    header = (f"# {result.plugin}.threshold calibrated by `dare-pipeline calibrate`: target reuse "
              f"{result.target}, measured {result.reuse:.4f} on {len(ids)} prompts from {args.prompts}\n")
    text = header + yaml.safe_dump(doc, sort_keys=False)
    if args.output:
        write_text_atomic(args.output, text)
    else:
        print(text, end="")
    print(f"{result.plugin}: threshold {result.threshold:.6g} gives reuse {result.reuse:.4f} "
          f"(target {result.target}, {len(result.trials)} trials)" + (f"; wrote {args.output}" if args.output else ""),
          file=sys.stderr)
    if not result.converged:
        print(f"warning: no threshold tried gives reuse within {args.tolerance} of {result.target}: the reuse "
              f"jumps between thresholds on these prompts; the closest is written", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    """Accuracy on lm-eval tasks (the dare_* suite by default) with a recipe; writes a results JSON.
    Under torchrun / accelerate launch the problems are split over the processes; rank 0 reports."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval needs lm-eval: pip install 'dare-pipeline[eval]'")
    from ..evaluation.run import evaluate, format_table, set_offline, write_json_atomic

    set_offline()
    _set_threads(args.threads)
    _execution_override(args)
    tasks = [t.strip() for spec in args.tasks for t in spec.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and float(limit).is_integer() and float(limit) >= 1:
        limit = int(limit)
    if args.output:
        from ..execution.outputs import check_output_file

        check_output_file(args.output)  # before the evaluation, not after it
    from ..config.generation import with_max_tokens

    overrides = with_max_tokens(args.max_tokens, args.set)
    doc = evaluate(tasks, recipe=args.recipe, model=args.model, overrides=overrides, batch_size=args.batch_size,
                   limit=limit, chat=args.chat, log_samples=args.log_samples, include_path=args.include_path,
                   command={k: v for k, v in vars(args).items() if k != "func"}, verbose=args.verbose)
    if doc is None:  # a data-parallel rank other than 0: rank 0 has the results and writes them
        return 0
    if args.output:
        write_json_atomic(args.output, doc)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(format_table(doc))
        if args.output:
            print(f"results: {args.output}")
    return 0


def cmd_ablate(args) -> int:
    """Run an ablation file's product of plugin sets and sweeps; one JSONL line per run; reports at the end."""
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("ablate needs lm-eval: pip install 'dare-pipeline[eval]'")
    from ..core.registry import PluginLoadError
    from ..evaluation import distributed
    from ..evaluation.ablation import Ablation
    from ..evaluation.ablation.report import write_report
    from ..evaluation.ablation.results import dedupe, read_records
    from ..evaluation.ablation.runner import parse_shard, run_ablation
    from ..evaluation.run import set_offline

    set_offline()
    abl = Ablation.from_yaml(args.ablation)
    shard = parse_shard(args.shard)
    limit = _whole(args.limit)
    output = Path(args.output or Path("runs") / "ablation" / f"{abl.name}.jsonl")
    _execution_override(args)
    extra_set = list(args.set)
    base_output = output
    world = distributed.launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    per_rank_shards = world > 1 and args.shard is None and not args.data_parallel
    if args.data_parallel:
        if world <= 1:
            raise ConfigError("--data-parallel splits each run's problems over the processes of a launcher: start it "
                              "with torchrun --nproc-per-node N -m dare_pipeline.cli ablate ... --data-parallel "
                              "(or accelerate launch)")
        if args.workers:
            raise ConfigError("--data-parallel and --workers exclude each other (the launched processes are the "
                              "workers)")
    if per_rank_shards or args.data_parallel:  # torchrun / accelerate launch: a CUDA run on this rank's GPU
        try:
            device = str(abl.base_recipe_dict(model=args.model, extra_set=extra_set).get("device", "cpu"))
        except PluginLoadError as exc:
            raise ConfigError(str(exc)) from exc
        if device.startswith("cuda"):
            extra_set.append(f"device={distributed.device_for_rank(device)}")
    if per_rank_shards:  # one shard of the runs and one results file per rank
        shard = (rank, world)
        output = output.with_name(f"{output.stem}.rank{rank}-of-{world}{output.suffix}")
        args.no_report = True
    if args.dry_run and args.data_parallel and rank != 0:  # rank 0 lists them
        return 0
    if not args.dry_run and not args.no_report:  # before the runs (run_ablation checks `output` itself)
        from ..execution.outputs import check_output_dir

        check_output_dir(args.report_dir or output.with_suffix(""), "--report-dir")
    if args.dry_run:
        from ..evaluation.ablation.journal import requests_kept, root_for
        from ..evaluation.ablation.runner import select
        from ..evaluation.ablation.schema import plan_runs

        runs = plan_runs(abl, model=args.model, limit=limit, extra_set=extra_set, batch_size=args.batch_size,
                         timing_limit=_whole(args.timing_limit))
        records = read_records(output)
        existing = {r["key"]: r for r in dedupe(records)}
        repeats = abl.repeats if args.repeats is None else args.repeats
        todo, write_now, already = select(runs, records, shard, args.retry_failed, repeats)
        # a run recorded without the timed passes asked for keeps its first pass: only timing is left
        state = ({id(r): "time" if (existing.get(r.key) or {}).get("status") == "ok" else "run" for r in todo}
                 | {id(r): r.status for r in write_now} | {id(r): "done" for r in already})
        # an interrupted run resumes at the problem it was on (its journal, beside the results file)
        kept = {id(r): requests_kept(root_for(output), [r.key]) for r in todo if state[id(r)] == "run"}
        for r in runs:
            mark = "resume" if kept.get(id(r)) else state.get(id(r), "other shard")
            note = r.reason or (f"{kept[id(r)]} problem(s) already decoded, kept in its journal" if kept.get(id(r)) else None)
            print(f"#{r.index:<4} {r.key}  {mark:<11} {r.name}" + (f"  ({note})" if note else ""))
        timing_only = sum(state[id(r)] == "time" for r in todo)
        timing_note = f"{timing_only} to time ({repeats} timed passes after its recorded first pass), " if timing_only else ""
        print(f"{len(runs)} runs planned; this shard: {len(todo) - timing_only} to run, {timing_note}"
              f"{len(write_now)} to record without running, {len(already)} already in {output}")
        return 0
    try:
        summary = run_ablation(abl, output, limit=limit, model=args.model, extra_set=extra_set,
                               batch_size=args.batch_size, shard=shard, workers=args.workers, threads=args.threads,
                               retry_failed=args.retry_failed, quiet=args.quiet, data_parallel=args.data_parallel,
                               repeats=args.repeats, timing_limit=_whole(args.timing_limit),
                               reuse_runs=args.reuse_runs)
    except PluginLoadError as exc:  # a broken plugin entry point: no recipe can load
        raise ConfigError(str(exc)) from exc
    if args.data_parallel and distributed.rank() != 0:  # rank 0 wrote the records and reports
        return 1 if summary.failed else 0
    print(summary.line())
    print(f"results: {output}")
    if per_rank_shards:
        pattern = base_output.with_name(f"{base_output.stem}.rank*-of-{world}{base_output.suffix}")
        print(f"rank {shard[0]} of {world} done; merge the ranks' files with: dare-pipeline report {pattern}")
    if not args.no_report:
        out_dir = Path(args.report_dir) if args.report_dir else output.with_suffix("")
        files = write_report(read_records(output), out_dir)
        print(f"report: {files[0]}")
    return 1 if summary.failed else 0


def _whole(limit):
    """A --limit-like number: an int when whole and >= 1 (N problems), else as given (a share)."""
    if limit is not None and float(limit).is_integer() and float(limit) >= 1:
        return int(limit)
    return limit


def cmd_report(args) -> int:
    """Rebuild the ablation report (markdown, CSV, plots) from one or more results files."""
    from pathlib import Path

    from ..evaluation.ablation.report import write_report
    from ..evaluation.ablation.results import merge, write_records

    from ..execution.outputs import check_output_dir, check_output_file

    from ..config.files import not_a_regular_file

    for path in args.results:
        problem = not_a_regular_file(Path(path))
        if problem == "not found":
            raise ConfigError(f"{path}: results file not found")
        if problem:
            raise ConfigError(f"{path}: {problem}; expected a results file")
    if args.merged:
        check_output_file(args.merged, "--merged")
    check_output_dir(args.out or Path(args.results[0]).with_suffix(""), "--out")
    records = merge(args.results)
    if not records:  # garbage, or an empty file: an empty report would look like a finished one
        raise ConfigError(f"{', '.join(map(str, args.results))}: no run records (a results file holds one JSON "
                          f"object with a string 'key' per line, as ablate writes; lines skipped are listed above)")
    if args.merged:
        write_records(args.merged, records)
        print(f"merged: {len(records)} runs -> {args.merged}")
    out_dir = Path(args.out) if args.out else Path(args.results[0]).with_suffix("")
    files = write_report(records, out_dir, metric=args.metric)
    for f in files:
        print(f)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dare-pipeline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode prompts with a recipe (several prompts decode as one batch)")
    gen.add_argument("prompt", nargs="*", help="prompt text (needs a checkpoint with a tokenizer)")
    gen.add_argument("--recipe", help=f"recipe YAML file ({BASELINE_HELP})")
    gen.add_argument("--max-tokens", type=positive_int, metavar="N", help=MAX_TOKENS_HELP)
    gen.add_argument("--model", help="checkpoint directory (overrides the recipe's model)")
    gen.add_argument("--prompt-ids", action="append", type=token_ids, metavar="1,2,3", help="a prompt as comma-separated token ids")
    gen.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    gen.add_argument("--prompts", metavar="FILE", help="more prompts from a file, - for stdin: one per line, or "
                     "JSONL (text, token ids, chat messages; docs/prompts.md)")
    gen.add_argument("--prompts-format", choices=FORMATS, default="auto", help="how --prompts is read (default "
                     "auto: JSONL for *.jsonl or a first line starting with { [ or \", else one prompt per line)")
    gen.add_argument("--chat", action=ChatFlag, help="wrap text prompts in the tokenizer's "
                     "chat template (default: only for the embedded model, when not in its 'Q: ...\\nA: ' format)")
    gen.add_argument("--execution", choices=MODES, help="how forwards run: eager, compiled (torch.compile), "
                     "cuda_graphs (compiled + CUDA graphs), auto (the recipe's default: cuda_graphs on CUDA, "
                     "eager on CPU); shorthand for --set execution.mode=MODE")
    gen.add_argument("--json", action="store_true", help="print one JSON object: sequences, text, stats")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--stream", action="store_true", help="draw each answer canvas after every step (on stderr "
                     "with --json); one host read per step")
    gen.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    gen.set_defaults(func=cmd_generate)

    plug = sub.add_parser("plugins", help="list the loaded plugins: version, description, decisions, conflicts, "
                          "hooks and options (--json: with why each conflict exists)")
    plug.add_argument("--json", action="store_true")
    plug.set_defaults(func=cmd_plugins)
    from ..plugin_kit.cli import add_subcommands  # plugins test / plugins new
    add_subcommands(plug)

    rec = sub.add_parser("recipe", help="recipe tools")
    rec_sub = rec.add_subparsers(dest="recipe_command", required=True)
    check = rec_sub.add_parser("check", help="validate a recipe")
    check.add_argument("recipe", nargs="+", help="recipe YAML file(s); every error of each is reported")
    check.add_argument("--print", action="store_true", help="print each resolved recipe (defaults filled in) as "
                       "YAML on stdout, the ok lines on stderr")
    check.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    check.set_defaults(func=cmd_recipe_check)

    cal = sub.add_parser("calibrate", help="choose a DARE plugin's threshold for a target reuse on given prompts")
    cal.add_argument("--recipe", required=True, help="recipe YAML with one DARE plugin (dare_kv, dare_o or ffn_reuse)")
    cal.add_argument("--prompts", required=True, help="prompts file (- for stdin), read as generate --prompts "
                     "(e.g. dare_pipeline/evaluation/tasks/heldout.jsonl)")
    cal.add_argument("--target-reuse", type=float, required=True, help="reused / eligible rows wanted, e.g. 0.8")
    cal.add_argument("--limit", type=positive_int, help="the first N prompts of the file only")
    cal.add_argument("--plugin", choices=["dare_kv", "dare_o", "ffn_reuse"], help="which DARE plugin (when the recipe has several)")
    cal.add_argument("--output", help="write the calibrated recipe here (atomically; default: print it)")
    cal.add_argument("--tolerance", type=non_negative_float, default=0.01, help="accepted |reuse - target| (default 0.01)")
    cal.add_argument("--max-trials", type=positive_int, default=16, help="decodes of the prompt set at most (default 16)")
    cal.add_argument("--model", help="checkpoint directory (overrides the recipe's model)")
    cal.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    cal.add_argument("--max-tokens", type=positive_int, metavar="N", help=MAX_TOKENS_HELP)
    cal.add_argument("--chat", action=ChatFlag, help="wrap text prompts in the tokenizer's "
                     "chat template (default: as generate)")
    cal.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="accuracy on lm-eval tasks (dare_suite, dare_add, ...) with a recipe")
    ev.add_argument("--recipe", help=f"recipe YAML file ({BASELINE_HELP})")
    ev.add_argument("--max-tokens", type=positive_int, metavar="N", help=MAX_TOKENS_HELP)
    ev.add_argument("--tasks", required=True, action="append", metavar="T[,T2]",
                    help="lm-eval tasks or groups: dare_suite, dare_add, dare_sort, dare_reverse, dare_expr")
    ev.add_argument("--limit", type=float, help="at most N problems per task (a fraction < 1: that share)")
    ev.add_argument("--model", help="checkpoint directory (overrides the recipe's model)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    ev.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    ev.add_argument("--execution", choices=MODES, help="shorthand for --set execution.mode=MODE (see generate)")
    ev.add_argument("--output", help="write the results JSON here (atomically)")
    ev.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (lm-eval's)")
    ev.add_argument("--log-samples", action="store_true", help="keep every response in the results JSON")
    ev.add_argument("--include-path", help="another directory of lm-eval task YAMLs")
    ev.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    ev.add_argument("--verbose", action="store_true", help="let lm-eval print its warnings, log lines and progress "
                    "bars (default: only errors, and the decoding's progress bar on a terminal)")
    ev.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    ev.set_defaults(func=cmd_eval)

    ab = sub.add_parser("ablate", help="run an ablation file (plugin sets x sweeps) through lm-eval; resumable")
    ab.add_argument("ablation", help="ablation YAML file (see docs/ablation.md)")
    ab.add_argument("--limit", type=float, help="problems per task (overrides the file's limit)")
    ab.add_argument("--output", help="results JSONL (default runs/ablation/<name>.jsonl); runs already in it are skipped")
    ab.add_argument("--shard", metavar="I/N", help="run only runs whose index %% N == I (0 <= I < N)")
    ab.add_argument("--workers", type=int, default=0,
                    help="worker processes (spawned, one run each at a time); 0 = in this process (default)")
    ab.add_argument("--threads", type=thread_count, default=1, help="torch threads per process (default 1)")
    ab.add_argument("--data-parallel", action="store_true",
                    help="under torchrun / accelerate launch: every process decodes its share of each run's problems "
                         "and rank 0 writes the merged record (default there: each process runs its own shard of "
                         "the runs)")
    ab.add_argument("--model", help="checkpoint directory (overrides the file's and the recipe's model)")
    ab.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a key of the base recipe (repeatable)")
    ab.add_argument("--batch-size", type=int, help="prompts decoded together (overrides the file's batch_size)")
    ab.add_argument("--execution", choices=MODES, help="shorthand for --set execution.mode=MODE (see generate)")
    ab.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    ab.add_argument("--repeats", type=int, help="timed passes per run after its untimed first pass, round-robin "
                    "across the runs (overrides the file's repeats, default 3; 0: time the first pass only)")
    ab.add_argument("--timing-limit", type=float, help="problems per task of the timed passes: the first N of "
                    "those the accuracy pass decodes (overrides the file's timing_limit; default: all of them)")
    ab.add_argument("--reuse-runs", action="append", default=[], metavar="RESULTS.jsonl",
                    help="another results file whose measured runs with the same key (recipe, tasks, limit, batch "
                         "size) give their first pass instead of decoding again; timed passes still run (repeatable)")
    ab.add_argument("--report-dir", help="where the report goes (default: the output path without .jsonl)")
    ab.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    ab.add_argument("--dry-run", action="store_true", help="list the runs and what would happen to each; run nothing")
    ab.add_argument("--quiet", action="store_true", help="no progress display and no per-run lines")
    ab.set_defaults(func=cmd_ablate)

    rep = sub.add_parser("report", help="markdown table, CSV and plots from ablation results (several files merge)")
    rep.add_argument("results", nargs="+", help="results JSONL file(s); runs are deduplicated by run key")
    rep.add_argument("--out", help="output directory (default: the first results path without .jsonl)")
    rep.add_argument("--metric", choices=["exact_match", "final_match"], help="accuracy metric shown")
    rep.add_argument("--merged", help="also write the merged, deduplicated results to this JSONL")
    rep.set_defaults(func=cmd_report)

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..execution.lifecycle import as_interrupted, interrupt_handlers, interrupted_line

    args = build_parser().parse_args(argv)
    try:
        with interrupt_handlers():
            status = args.func(args)
            sys.stdout.flush()  # a write error of buffered output shows here, not at exit
            return status
    except BrokenPipeError:  # the reader went away (`... | head -1`): end quietly, as other tools do
        return _stdout_gone()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        _print_error(exc)
        return 2
    except OSError as exc:  # a write that failed: no space left, an I/O error, a file system gone read-only
        if exc.filename is not None:
            what = "cannot write " if exc.errno in _WRITE_ERRORS else ""
            print(f"dare-pipeline: error: {what}{exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if exc.errno in _WRITE_ERRORS:  # the files written name themselves: this is standard output
            print(f"dare-pipeline: error: cannot write to standard output: {exc.strerror}", file=sys.stderr)
            _stdout_gone()
            return 1
        raise
    except KeyboardInterrupt as exc:  # SIGINT / SIGTERM: one line, no traceback (execution/lifecycle.py)
        stop = as_interrupted(exc)
        line = interrupted_line(args.command, getattr(args, "output", None), stop.message)
        if line:  # a data-parallel rank other than 0 leaves the line to rank 0
            print(f"dare-pipeline: {line}", file=sys.stderr)
        return stop.exit_status


# errors of a write to a full, failing or over-quota file system
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


def _stdout_gone() -> int:
    """Point standard output at /dev/null, so that the interpreter's last flush of what is still
    buffered does not fail again at exit; the exit status of a process ended by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _print_error(exc: Exception) -> None:
    """One line per error (a recipe with several mistakes reports each on its own line)."""
    for line in str(exc).splitlines() or [""]:
        print(f"dare-pipeline: error: {line}", file=sys.stderr)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dare-pipeline")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from .. import __version__

        return __version__


if __name__ == "__main__":
    sys.exit(main())
