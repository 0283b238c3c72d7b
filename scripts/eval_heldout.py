#!/usr/bin/env python
"""Decode the held-out problems with a recipe (the baseline by default) and score them.

    python scripts/eval_heldout.py --model default --limit 500 --batch-size 16 --gen-length 64 --block-length 32
    python scripts/eval_heldout.py --recipe recipes/dual_cache_threshold.yaml --limit 500 --batch-size 50

Baseline recipe: one token per step (steps = gen_length), low-confidence remasking, greedy, blocks
of --block-length. With --recipe, that recipe's plugins and settings decode, and --gen-length,
--block-length and --steps still set the canvas (so every recipe is scored on the same problem);
--set, applied last, overrides any recipe key (the result records what decoded). The model is always --model. Prints exact-match and
final-answer accuracy overall and per family, and writes a JSON result (summary, forward passes,
per-problem generations) atomically to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dare_pipeline import Pipeline, Recipe, load_model
from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="checkpoint directory or embedded name (default, default-dream)")
    ap.add_argument("--data", default=str(HELDOUT_FILE))
    ap.add_argument("--limit", type=int, default=None, help="first N problems (the file is family-interleaved)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first problems (for a sample further in)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen_length, one token per step)")
    ap.add_argument("--recipe", default=None, help="recipe YAML to decode with (default: the baseline recipe)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="torch device to decode on (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="result JSON (default runs/eval/<model>_g<gen_length>.json)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def summarize(rows: list[dict]) -> dict:
    def acc(subset):
        n = len(subset)
        return {"n": n, "exact_match": sum(r["exact_match"] for r in subset) / max(1, n),
                "final_match": sum(r["final_match"] for r in subset) / max(1, n)}

    families = defaultdict(list)
    for r in rows:
        families[r["family"]].append(r)
    return {"overall": acc(rows), "per_family": {f: acc(v) for f, v in families.items()}}


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = read_jsonl(args.data)[args.offset:]
    if args.limit is not None:
        problems = problems[: args.limit]
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    gen = {"gen_length": args.gen_length, "block_length": args.block_length,
           "steps": args.steps or args.gen_length}
    canvas = [f"generation.{key}={value}" for key, value in gen.items()]
    if args.recipe is None:
        recipe = Recipe.from_dict({"name": "baseline", "generation": gen}, overrides=args.set)
    else:
        recipe = Recipe.from_yaml(args.recipe, overrides=[*canvas, *args.set])
    pipe = Pipeline(model, recipe)
    gen = {key: getattr(pipe.recipe.generation, key) for key in gen}  # what decodes, after any --set

    from tqdm import tqdm

    rows, nfe, started = [], 0, time.perf_counter()
    bar = tqdm(total=len(problems), file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    for i in range(0, len(problems), args.batch_size):
        chunk = problems[i: i + args.batch_size]
        out = pipe.generate([p["prompt"] for p in chunk])
        nfe += out.stats.nfe * len(chunk)  # a batch's forwards serve each of its rows
        for p, text in zip(chunk, out.text):
            rows.append({"id": p["id"], "family": p["family"], "text": text, **score(p, text)})
        bar.update(len(chunk))
        s = summarize(rows)["overall"]
        bar.set_postfix(em=f"{s['exact_match']:.3f}", final=f"{s['final_match']:.3f}")
    bar.close()
    wall = time.perf_counter() - started

    summary = summarize(rows)
    result = {"model": str(model.source), "family": model.config.family, "data": args.data, "offset": args.offset,
              "limit": args.limit, "recipe": recipe.to_dict(), "generation": gen,
              "nfe_per_problem_batched": round(nfe / max(1, len(rows)), 2), "threads": args.threads, "device": args.device,
              "batch_size": args.batch_size, "wall_s": round(wall, 1), **summary, "problems": rows}
    name = Path(str(args.model)).name if args.model not in ("default", "default-llada", "default-dream") else args.model
    if args.recipe is not None:
        name += "_" + recipe.name
    out_path = Path(args.out) if args.out else ROOT / "runs" / "eval" / f"{name}_g{gen['gen_length']}.json"
    write_json_atomic(out_path, result)

    print(f"model {model.source} ({model.config.family}), recipe {recipe.name}, {len(rows)} problems, "
          f"gen_length {gen['gen_length']}, block_length {gen['block_length']}, steps {gen['steps']}, {wall:.0f}s, "
          f"{result['nfe_per_problem_batched']} forwards per problem (batch {args.batch_size})")
    print(f"{'family':<10}{'n':>5}{'exact':>9}{'final':>9}")
    for fam, s in [*summary["per_family"].items(), ("overall", summary["overall"])]:
        print(f"{fam:<10}{s['n']:>5}{100 * s['exact_match']:>8.1f}%{100 * s['final_match']:>8.1f}%")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
