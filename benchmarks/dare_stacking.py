"""What DARE adds on top of a cache and threshold decoding, on the embedded model: forwards, FLOPs,
reuse and exact matches for a few recipes over held-out problems (the first N of each family).

    python benchmarks/dare_stacking.py                      # one problem per family, gen_length 64
    python benchmarks/dare_stacking.py --per-family 5 --gen-length 256
    python benchmarks/dare_stacking.py --per-family 125 --recipes "dual_cache + threshold" "+ dare_kv" "+ dare_o"
    python benchmarks/dare_stacking.py --per-family 25 --repeats 3 --recipes "dual_cache + threshold" "+ dare_kv" "+ dare_o"

FLOPs are estimated from the rows each sub-operation computed (dare_pipeline/reuse/flops.py), so they
count what ran; reuse is rows reused over rows eligible (the plugins' own counters). With
`--repeats N` each recipe decodes the problem set N times, round-robin across recipes, and the
table adds its CPU seconds (median and min-max over the repeats, one torch thread) and the ratio
of the first recipe's median to its own.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dare_pipeline import Pipeline, load_model
from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score
from dare_pipeline.reuse import flops

ROOT = Path(__file__).resolve().parents[1]
CACHE_THRESHOLD = [{"name": "dual_cache"}, {"name": "threshold_decoding", "threshold": 0.9}]
RECIPES = {
    "dual_cache + threshold": CACHE_THRESHOLD,
    "+ dare_kv": CACHE_THRESHOLD + [{"name": "dare_kv", "threshold": 0.1}],
    "+ dare_kv (recompute_at_refresh)": CACHE_THRESHOLD + [{"name": "dare_kv", "threshold": 0.1,
                                                            "recompute_at_refresh": True}],
    "+ dare_o": CACHE_THRESHOLD + [{"name": "dare_o", "threshold": 0.1}],
    "+ dare_o (recompute_block: false)": CACHE_THRESHOLD + [{"name": "dare_o", "threshold": 0.1,
                                                             "recompute_block": False}],
    "+ dare_o (recompute_at_refresh)": CACHE_THRESHOLD + [{"name": "dare_o", "threshold": 0.1,
                                                           "recompute_at_refresh": True}],
    "+ dare_o 0.3": CACHE_THRESHOLD + [{"name": "dare_o", "threshold": 0.3}],
    "dual_cache + dare_kv": [{"name": "dual_cache"}, {"name": "dare_kv", "threshold": 0.1}],
    # the paper's setting: DARE-O on the plain model (the baseline policy, no cache)
    "baseline": [],
    "dare_o alone 0.05": [{"name": "dare_o", "threshold": 0.05}],
    "dare_o alone 0.1": [{"name": "dare_o", "threshold": 0.1}],
    "dare_o alone 0.2": [{"name": "dare_o", "threshold": 0.2}],
    "dare_o alone 0.1, layer 0 too": [{"name": "dare_o", "threshold": 0.1, "exempt_layers": []}],
    "ffn_reuse alone": [{"name": "ffn_reuse"}],
    "dare_o + ffn_reuse alone": [{"name": "dare_o", "threshold": 0.1}, {"name": "ffn_reuse"}],
}


def problems(per_family: int) -> list[dict]:
    picked: dict[str, list[dict]] = {}
    for p in read_jsonl(HELDOUT_FILE):
        if len(picked.setdefault(p["family"], [])) < per_family:
            picked[p["family"]].append(p)
    return [p for family in picked.values() for p in family]


def measure(model, plugins, probs, gen) -> dict:
    pipe = Pipeline(model, {"generation": gen, "plugins": plugins})
    started = time.process_time()
    nfe = total = exact = reused = eligible = 0
    for p in probs:
        out = pipe.generate([p["prompt"]])
        nfe += out.stats.nfe
        total += flops.estimate(model.config, out.stats.layer_rows, len(out.sequences[0]))["total"]
        exact += score(p, out.text[0])["exact_match"]
        for report in out.stats.plugins.values():
            if "rows_reused" in report:
                reused += report["rows_reused"]
                eligible += report["rows_eligible"]
    return {"nfe": nfe, "gflops": total / 1e9, "exact": exact, "reuse": reused / eligible if eligible else 0.0,
            "cpu_s": time.process_time() - started}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-family", type=int, default=1)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--recipes", nargs="*", choices=list(RECIPES), help="a subset of the rows (default: all)")
    ap.add_argument("--repeats", type=int, default=0, help="also time N decodes of the set per recipe")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model("default")
    probs = problems(args.per_family)
    gen = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.gen_length}
    print(f"embedded model, {len(probs)} held-out problems ({args.per_family} per family), gen_length "
          f"{args.gen_length}, block {args.block_length}, batch 1, float32, 1 thread")
    names = [name for name in RECIPES if not args.recipes or name in args.recipes]
    runs = {name: [measure(model, RECIPES[name], probs, gen)] for name in names}
    for _ in range(args.repeats - 1):  # round-robin, so drifting load hits every recipe alike
        for name in names:
            runs[name].append(measure(model, RECIPES[name], probs, gen))
    timed = args.repeats > 0
    print(f"| recipe | NFE | GFLOPs | FLOPs gain vs {names[0]} | reuse | exact |"
          + (" CPU s (median, min-max) | time ratio |" if timed else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if timed else ""))
    reference = runs[names[0]][0]["gflops"]
    reference_s = statistics.median(r["cpu_s"] for r in runs[names[0]])
    for name in names:
        m = runs[name][0]
        row = (f"| {name} | {m['nfe']} | {m['gflops']:.2f} | {reference / m['gflops']:.3f}x | "
               f"{100 * m['reuse']:.1f} % | {m['exact']}/{len(probs)} |")
        if timed:
            seconds = [r["cpu_s"] for r in runs[name]]
            median = statistics.median(seconds)
            row += f" {median:.1f} ({min(seconds):.1f}-{max(seconds):.1f}) | {reference_s / median:.3f}x |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
