"""Compile time of a decode with and without compile regions, by model depth.

    python benchmarks/compile_time.py                       # bench shape, 4 and 16 layers, inductor, CPU
    python benchmarks/compile_time.py --layers 8 32 --recipe dual_cache --device cuda --dtype bfloat16

One process per (layers, regions) setting, each with an empty inductor cache directory of its own, so
nothing compiled earlier is reused (a cold start, as a fresh machine pays it): each prints one JSON
line with the first generation's compile time (`stats.execution.compile_time_s`), the number of
graphs compiled, and whether the decode equals eager. The benchmark model's shape (common.py, vocabulary
cut to 4,096), prompt 64, gen_length 32, block 16, 4 steps, batch 1, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

RECIPES = {"dual_cache": [{"name": "dual_cache"}], "baseline": [], "dare_kv": [{"name": "dare_kv"}],
           "prefix_cache": [{"name": "prefix_cache"}]}


def one(layers: int, regions: bool, recipe: str, device: str, dtype: str) -> dict:
    import common
    import torch

    from dare_pipeline import Pipeline

    torch.set_num_threads(1)
    common.SHAPES["bench"] = dict(common.SHAPES["bench"], n_layers=layers, vocab_size=4096)
    model = common.bench_model("llada", dtype=getattr(torch, dtype), device=device)
    prompts = common.bench_prompts(1, 64, vocab=4000)
    spec = {"name": recipe, "generation": {"gen_length": 32, "block_length": 16, "steps": 4},
            "plugins": RECIPES[recipe], "execution": {"mode": "compiled", "regions": regions}}
    out = Pipeline(model, spec).generate(prompts)
    eager = Pipeline(model, dict(spec, execution={"mode": "eager"})).generate(prompts)
    ex = out.stats.execution
    return {"layers": layers, "regions": ex["regions"], "recipe": recipe, "device": device, "dtype": dtype,
            "compile_time_s": round(ex["compile_time_s"], 1), "graphs": ex["compiles"],
            "regions_error": ex["regions_error"], "equal_to_eager": out.sequences == eager.sequences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="dual_cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--one", nargs=2, metavar=("LAYERS", "REGIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1] == "1", args.recipe, args.device, args.dtype)))
        return
    for layers in args.layers:
        for regions in (False, True):
            cmd = [sys.executable, __file__, "--one", str(layers), str(int(regions)), "--recipe", args.recipe,
                   "--device", args.device, "--dtype", args.dtype]
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
                result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
