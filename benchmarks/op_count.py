"""Operators dispatched per decoding step (each one a kernel launch on a GPU) and host
synchronisations per step, for the plain path and the cached paths.

    python benchmarks/op_count.py

At batch 1 on a GPU every eager operator costs the host ~10-20 us whatever its size, so a step
cannot be faster than (ops per step) x (dispatch cost); counting on the CPU with a tiny model gives
the same operator sequence as on the GPU, without needing one.
"""

import torch
from torch.profiler import ProfilerActivity, profile

from dare_pipeline import Pipeline
from dare_pipeline.testing import tiny_model

torch.set_num_threads(1)
L = 8
m = tiny_model("llada", d_model=32, n_heads=2, n_layers=L, max_sequence_length=1024)
prompt = [[10 + (i % 20) for i in range(64)]]
gen = {"gen_length": 64, "block_length": 32, "steps": 64}
for name, plugins in [("baseline", []), ("prefix_cache", [{"name": "prefix_cache"}]), ("dual_cache", [{"name": "dual_cache"}])]:
    pipe = Pipeline(m, {"generation": gen, "plugins": plugins})
    pipe.generate(prompt)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = pipe.generate(prompt)
    ev = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    # count only leaf-ish compute ops, the ones that launch kernels on a GPU
    skip = {"aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::slice", "aten::select",
            "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::reshape",
            "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::permute", "aten::contiguous",
            "aten::matmul", "aten::linear", "aten::to", "aten::_to_copy", "aten::scaled_dot_product_attention",
            "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::split", "aten::chunk", "aten::narrow",
            "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}
    n = sum(e.count for e in ev if e.key not in skip)
    syncs = sum(e.count for e in ev if e.key in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero"))
    steps = out.stats.nfe
    print(f"{name}: {n / steps:.0f} kernel-launching ops per step ({n / steps / L:.0f} per layer incl. the step's share), "
          f"{syncs / steps:.1f} host syncs per step")
