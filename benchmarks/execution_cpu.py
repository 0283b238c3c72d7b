"""CPU seconds of one generation per recipe, eager, and eager against compiled (inductor).

    python benchmarks/execution_cpu.py eager                 # run in two checkouts to compare releases
    python benchmarks/execution_cpu.py compiled              # eager vs execution.mode: compiled

`eager`: the benchmark model (common.bench_model), prompt 128, gen_length 64, block 32, 64 steps,
batch 1, one thread; CPU seconds of one generation after a warm-up, per recipe (one JSON line).
`compiled`: the embedded model and the benchmark model, baseline and dual cache; the first
generation's wall time (it compiles) and the median of 3 CPU-second timings after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import bench_model, bench_prompts

from dare_pipeline import Pipeline, load_model

GEN = {"gen_length": 64, "block_length": 32, "steps": 64}
RECIPES = {"baseline": [], "prefix_cache": [{"name": "prefix_cache"}], "dual_cache": [{"name": "dual_cache"}],
           "dare_kv": [{"name": "dare_kv"}], "dual_cache+dare_kv": [{"name": "dual_cache"}, {"name": "dare_kv"}]}


def cpu_seconds(pipe, prompts) -> float:
    started = time.process_time()
    pipe.generate(prompts)
    return time.process_time() - started


def eager() -> None:
    model, prompts = bench_model(), bench_prompts(1, 128)
    times = {}
    for name, plugins in RECIPES.items():
        pipe = Pipeline(model, {"generation": GEN, "plugins": plugins})
        pipe.generate(prompts)
        times[name] = round(cpu_seconds(pipe, prompts), 3)
    print(json.dumps(times))


def compiled() -> None:
    models = {"embedded": (load_model("default"), [[5 + i % 40 for i in range(48)]]),
              "benchmark": (bench_model(), bench_prompts(1, 128))}
    print("| model | recipe | eager | compiled | compile (first generation) |")
    print("|---|---|---|---|---|")
    for label, (model, prompts) in models.items():
        for name in ("baseline", "dual_cache"):
            seconds = {}
            for mode in ("eager", "compiled"):
                pipe = Pipeline(model, {"generation": GEN, "plugins": RECIPES[name], "execution": {"mode": mode}})
                first = pipe.generate(prompts).stats.execution.get("compile_time_s", 0.0)
                seconds[mode] = (statistics.median(cpu_seconds(pipe, prompts) for _ in range(3)), first)
            (e, _), (c, compile_s) = seconds["eager"], seconds["compiled"]
            print(f"| {label} | {name} | {e:.3f} s | {c:.3f} s ({e / c:.2f}x) | {compile_s:.1f} s |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["eager", "compiled"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    eager() if args.what == "eager" else compiled()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
