"""Operators dispatched per decoding step (each one a kernel launch on a GPU) and host
synchronisations per step, for the plain path and the cached paths.

    python benchmarks/op_count.py
    python benchmarks/op_count.py --plugins prefix_cache dare_kv --layers 32
    python benchmarks/op_count.py --plugins dual_cache dare_kv dare_o dllm_cache threshold_decoding --execution compiled

At batch 1 on a GPU every eager operator costs the host ~10-20 us whatever its size, so a step
cannot be faster than (ops per step) x (dispatch cost); counting on the CPU with a tiny model gives
the same operator sequence as on the GPU, without needing one.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dare_pipeline import Pipeline
from dare_pipeline.execution.host_sync import count_host_syncs
from dare_pipeline.plugin_kit.testing import tiny_model

# Operators that launch no kernel (views, dispatch wrappers) or are counted as syncs below.
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::slice", "aten::select",
    "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::reshape",
    "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::permute", "aten::contiguous",
    "aten::matmul", "aten::linear", "aten::to", "aten::_to_copy", "aten::scaled_dot_product_attention",
    "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::split", "aten::chunk", "aten::narrow",
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero",
}


def count(plugins: list[str], layers: int, gen_length: int = 64, block_length: int = 32,
          execution: str = "eager") -> tuple[float, float]:
    """(kernel-launching operators, host syncs) per forward of one decode.

    Operators come from the profiler (eager execution: under `compiled` one captured graph replaces
    them); host syncs from `count_host_syncs` (scalar reads, data-dependent shapes, `.tolist()`),
    over the whole generation, its start and end included."""
    model = tiny_model("llada", d_model=32, n_heads=2, n_layers=layers, max_sequence_length=1024)
    prompt = [[10 + (i % 20) for i in range(64)]]
    gen = {"gen_length": gen_length, "block_length": block_length, "steps": gen_length}
    # fullgraph off: dynamo does not trace while the sync counter (a dispatch mode) is active, so the
    # counted decode runs the capture code paths without compiling them
    pipe = Pipeline(model, {"generation": gen, "plugins": [{"name": p} for p in plugins],
                            "execution": {"mode": execution, "backend": "aot_eager", "fullgraph": False}})
    pipe.generate(prompt)  # warm-up: first-call allocations, lazy imports, compilation
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = pipe.generate(prompt)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sum(e.count for e in events if e.key not in NO_KERNEL)
    with count_host_syncs() as syncs:
        pipe.generate(prompt)
    return ops / out.stats.nfe, syncs.total / out.stats.nfe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugins", nargs="*", default=["prefix_cache", "dual_cache"],
                    help="row-feed / reuse plugins to count, each alone (the baseline is always counted)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--execution", default="eager", choices=["eager", "compiled"],
                    help="compiled: count host syncs on the capture paths (operators are the eager ones)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in ["baseline", *args.plugins]:
        ops, syncs = count([] if name == "baseline" else [name], args.layers, execution=args.execution)
        print(f"{name}: {ops:.0f} kernel-launching ops per step ({ops / args.layers:.0f} per layer incl. the step's "
              f"share), {syncs:.1f} host syncs per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
