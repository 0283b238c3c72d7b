"""Guided diffusion on the embedded pair (the 2.3M LLaDA default guided by the 0.56M embedded guide):
accuracy, diffusion forwards, guide forwards, FLOPs (diffusion + guide) and CPU time per held-out
problem, for the shipped recipes against the baseline and dual cache + threshold.

    python benchmarks/guided.py --gen-length 64 --out runs/guided/g64.jsonl             # all 500, batch 1
    python benchmarks/guided.py --gen-length 64 --recipes baseline --out runs/guided/g64_baseline.jsonl
    python benchmarks/guided.py --gen-length 256 --recipes baseline --limit 100 --out runs/guided/g256_baseline.jsonl
    python benchmarks/guided.py --report runs/guided/g64*.jsonl runs/guided/g256*.jsonl  # the tables
    python benchmarks/guided.py --gen-length 64 --timing --limit 20 --repeats 3         # CPU time, spread

Each problem decodes alone (batch 1), greedy, float32, one torch thread; the recipes are the files
in recipes/ (`generation` set to --gen-length, blocks of 32, steps = gen_length), plus the guided
ones with the early stop turned off (`stop_at_eos: false`), which shows what the stop is worth.
A record per problem and recipe is appended to --out as it finishes (a restart skips what is
there): exact and final-answer match, diffusion forwards, guide forwards, drafts accepted,
fall-backs, FLOPs of the diffusion model (estimated from the rows each layer computed,
dare_pipeline/reuse/flops.py, LM head over the block) and of the guide (its own count), and the
process CPU seconds of the decode.

--timing decodes the first --limit problems --repeats times per recipe, round-robin across recipes
(drifting load hits all alike), and prints each recipe's CPU seconds per problem: median and
min-max over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from dare_pipeline import Pipeline, Recipe, load_model
from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score
from dare_pipeline.reuse import flops

ROOT = Path(__file__).resolve().parents[1]
NO_STOP = ["plugins.guided_diffusion.stop_at_eos=false"]
RECIPES = {  # name: (recipe file, overrides)
    "baseline": ("baseline.yaml", []),
    "dual_cache + threshold": ("dual_cache_threshold.yaml", []),
    "guided": ("guided.yaml", []),
    "guided + dual_cache": ("guided_dual_cache.yaml", []),
    "guided + dual_cache + threshold": ("guided_dual_cache_threshold.yaml", []),
    "guided, no EOS stop": ("guided.yaml", NO_STOP),
    "guided + dual_cache, no EOS stop": ("guided_dual_cache.yaml", NO_STOP),
}
FAMILIES = ("add", "sort", "reverse", "expr")


def pipelines(model, names) -> dict[str, Pipeline]:
    return {name: Pipeline(model, Recipe.from_yaml(ROOT / "recipes" / RECIPES[name][0], overrides=RECIPES[name][1]))
            for name in names}


def decode(pipe: Pipeline, problem: dict, gen: dict) -> dict:
    started = time.process_time()
    out = pipe.generate([problem["prompt"]], **gen)
    cpu = time.process_time() - started
    st = out.stats
    guided = st.plugins.get("guided_diffusion", {})
    diffusion = flops.estimate(pipe.model.config, st.layer_rows, len(out.sequences[0]), st.nfe * gen["block_length"])
    scores = score(problem, out.text[0])
    return {"exact": scores["exact_match"], "final": scores["final_match"],
            "nfe": st.nfe, "guide_forwards": guided.get("guide_forwards", 0), "accepted": guided.get("accepted", 0),
            "fallbacks": guided.get("fallbacks", 0), "eos_filled": guided.get("eos_filled", 0),
            "flops_diffusion": diffusion["total"], "flops_guide": st.extra_flops.get("guide", 0),
            "cpu_s": cpu, "text": out.text[0]}


def measure(args, model, problems, gen) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["recipe"], r["gen_length"], r["id"]) for r in _records(out)}
    pipes = pipelines(model, args.recipes)
    with open(out, "a") as f:
        for name, pipe in pipes.items():
            todo = [p for p in problems if (name, args.gen_length, p["id"]) not in done]
            print(f"{name}: {len(todo)} of {len(problems)} problems to decode", flush=True)
            if todo:  # warm-up, not recorded: the guide loads at a pipeline's first generation
                pipe.generate([todo[0]["prompt"]], **gen)
            for i, p in enumerate(todo):
                record = {"recipe": name, "gen_length": args.gen_length, "id": p["id"], "family": p["family"],
                          **decode(pipe, p, gen)}
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
                if (i + 1) % 50 == 0:
                    print(f"  {i + 1}/{len(todo)}", flush=True)


def timing(args, model, problems, gen) -> None:
    pipes = pipelines(model, args.recipes)
    for pipe in pipes.values():  # warm-up: the guide loads, the first allocations happen
        pipe.generate([problems[0]["prompt"]], **gen)
    seconds = defaultdict(list)
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            started = time.process_time()
            for p in problems:
                pipe.generate([p["prompt"]], **gen)
            seconds[name].append((time.process_time() - started) / len(problems))
    print(f"CPU seconds per problem, first {len(problems)} held-out problems, gen_length {args.gen_length}, batch 1, "
          f"1 thread, {args.repeats} repeats round-robin: median (min-max), ratio to the first recipe's median")
    first = statistics.median(seconds[args.recipes[0]])
    for name in args.recipes:
        s = seconds[name]
        print(f"| {name} | {statistics.median(s):.3f} ({min(s):.3f}-{max(s):.3f}) | {first / statistics.median(s):.2f}x |")


def _records(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _by_run(paths) -> list[tuple[tuple[int, str], list[dict]]]:
    """The records of the files, grouped by (gen_length, recipe), in gen_length then RECIPES order."""
    by = defaultdict(list)
    for path in paths:
        for r in _records(Path(path)):
            by[(r["gen_length"], r["recipe"])].append(r)
    return sorted(by.items(), key=lambda kv: (kv[0][0], list(RECIPES).index(kv[0][1])))


def report(paths) -> None:
    print("| gen | recipe | problems | exact % | add | sort | reverse | expr | final % | diffusion fwd / problem | "
          "guide fwd / problem | accepted / guided fwd | fall-backs | GFLOPs / problem (diffusion + guide) | "
          "CPU s / problem |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (g, name), rs in _by_run(paths):
        n = len(rs)
        fam = {f: [r["exact"] for r in rs if r["family"] == f] for f in FAMILIES}
        guided = sum(r["guide_forwards"] for r in rs)
        gf_d = sum(r["flops_diffusion"] for r in rs) / n / 1e9
        gf_g = sum(r["flops_guide"] for r in rs) / n / 1e9
        cells = [str(g), name, str(n), f"{100 * sum(r['exact'] for r in rs) / n:.1f}",
                 *[f"{100 * sum(v) / len(v):.1f}" if v else "-" for v in fam.values()],
                 f"{100 * sum(r['final'] for r in rs) / n:.1f}", f"{sum(r['nfe'] for r in rs) / n:.2f}",
                 f"{guided / n:.2f}" if guided else "-",
                 f"{sum(r['accepted'] for r in rs) / guided:.1f}" if guided else "-",
                 f"{100 * sum(r['fallbacks'] for r in rs) / guided:.1f} %" if guided else "-",
                 f"{gf_d + gf_g:.2f} ({gf_d:.2f} + {gf_g:.2f})", f"{sum(r['cpu_s'] for r in rs) / n:.3f}"]
        print("| " + " | ".join(cells) + " |")


def analysis(paths) -> None:
    """Per family, for the guided recipes: answer length, the fewest forwards the early stop allows
    (the blocks up to the one holding the answer's EOS, one forward each), the forwards taken, the
    drafts accepted per guided forward and the fall-back rate; and the goal's two ratios."""
    answers = {p["id"]: len(p["answer"]) for p in read_jsonl(HELDOUT_FILE)}  # character tokens
    runs = _by_run(paths)
    by = dict(runs)
    print("| gen | recipe | family | answer tokens | fewest forwards (EOS stop) | diffusion fwd / problem | "
          "accepted / guided fwd | fall-backs | exact % |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for (g, name), rs in runs:
        if name not in ("dual_cache + threshold", "guided + dual_cache", "guided + dual_cache, no EOS stop"):
            continue
        for fam in FAMILIES:
            f = [r for r in rs if r["family"] == fam]
            if not f:
                continue
            tokens = sum(answers[r["id"]] for r in f) / len(f)
            floor = sum(min(g // 32, -(-(answers[r["id"]] + 1) // 32)) for r in f) / len(f)
            guided = sum(r["guide_forwards"] for r in f)
            print(f"| {g} | {name} | {fam} | {tokens:.1f} | {floor:.2f} | {sum(r['nfe'] for r in f) / len(f):.2f} | "
                  + (f"{sum(r['accepted'] for r in f) / guided:.1f} | {100 * sum(r['fallbacks'] for r in f) / guided:.1f} %"
                     if guided else "- | -") + f" | {100 * sum(r['exact'] for r in f) / len(f):.1f} |")
    for g in sorted({k[0] for k in by}):
        _same_problems(g, {name: rs for (gen, name), rs in by.items() if gen == g})
    for g in sorted({k[0] for k in by}):
        ref, ours = by.get((g, "dual_cache + threshold")), by.get((g, "guided + dual_cache"))
        if ref and ours and {r["id"] for r in ref} == {r["id"] for r in ours}:
            ratio = sum(r["nfe"] for r in ours) / sum(r["nfe"] for r in ref)
            points = 100 * (sum(r["exact"] for r in ours) - sum(r["exact"] for r in ref)) / len(ref)
            print(f"gen {g}: guided + dual_cache takes {ratio:.2f} of dual_cache + threshold's diffusion forwards, "
                  f"{points:+.1f} points exact match ({len(ref)} problems)")


def _same_problems(g: int, runs: dict[str, list[dict]]) -> None:
    """Where a recipe was measured on fewer problems (the baseline at long answers costs gen_length
    forwards a problem), every recipe again on just those problems, so that they compare alike."""
    fewest = min(runs.values(), key=len)
    ids = {r["id"] for r in fewest}
    if all({r["id"] for r in rs} == ids for rs in runs.values()):
        return
    print(f"\ngen {g}, the {len(ids)} problems every recipe was measured on:")
    print("| recipe | exact % | final % | diffusion fwd / problem | GFLOPs / problem | CPU s / problem |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in RECIPES:
        rs = [r for r in runs.get(name, []) if r["id"] in ids]
        if len(rs) != len(ids):
            continue
        n = len(rs)
        print(f"| {name} | {100 * sum(r['exact'] for r in rs) / n:.1f} | {100 * sum(r['final'] for r in rs) / n:.1f} | "
              f"{sum(r['nfe'] for r in rs) / n:.2f} | "
              f"{sum(r['flops_diffusion'] + r['flops_guide'] for r in rs) / n / 1e9:.2f} | "
              f"{sum(r['cpu_s'] for r in rs) / n:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--limit", type=int, default=500, help="first N held-out problems (family-interleaved)")
    ap.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=None)
    ap.add_argument("--out", default="runs/guided/results.jsonl")
    ap.add_argument("--timing", action="store_true", help="time --repeats passes instead of recording problems")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--report", nargs="+", metavar="JSONL", help="print the table of these result files")
    args = ap.parse_args(argv)
    if args.report:
        report(args.report)
        print()
        analysis(args.report)
        return 0
    args.recipes = args.recipes or [n for n in RECIPES if n != "baseline"]
    torch.set_num_threads(1)
    model = load_model("default")
    problems = read_jsonl(HELDOUT_FILE)[: args.limit]
    gen = {"gen_length": args.gen_length, "block_length": 32, "steps": args.gen_length}
    (timing if args.timing else measure)(args, model, problems, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
