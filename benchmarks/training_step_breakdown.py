"""What a training step of the default model carries and where its time goes.

    python benchmarks/training_step_breakdown.py --threads 2
    python benchmarks/training_step_breakdown.py --long-phase-zero-shot 0.75 --profile-steps 0
    python benchmarks/training_step_breakdown.py --long-phase-zero-shot 0.75 --group-by-length 512 --profile-steps 0

1. Answer tokens (the EOS tail excluded) per batch kind under the token budget, over --batches
   batches of each curriculum phase: the tokens the loss learns the algorithms from. The
   second phase's mean per step follows from its kind weights (--long-phase-zero-shot);
   --group-by-length groups the zero-shot batches by answer length (shorter EOS tails).
2. `torch.profiler` over --profile-steps second-phase steps of the given size, self CPU time grouped
   into matrix products, the attention kernel, element-wise work and the rest, beside the time
   spent building the batches. Profiling itself adds a little to every op.
The sampler uses the eighth from-scratch run's family mix (docs/from_scratch_runs.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from dare_pipeline.models.tokenizer import EOS_ID
from dare_pipeline.training import (
    BatchSampler,
    TrainConfig,
    Trainer,
    default_curriculum,
)
from dare_pipeline.training.batches import LONG_PHASE_ZERO_SHOT
from dare_pipeline.training.trainer import PRESETS

FAMILY_WEIGHTS = {"add": 3, "expr": 3, "sort": 2, "reverse": 2}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm"}
ELEMENTWISE_OPS = {"aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::div", "aten::pow",
                   "aten::neg", "aten::sqrt", "aten::rsqrt", "aten::silu", "aten::silu_backward", "aten::sum",
                   "aten::mean", "aten::lerp_", "aten::addcmul_", "aten::addcdiv_"}


def answer_tokens_per_kind(long_phase_zero_shot: float, batches: int, seed: int = 0, group_by_length: int = 0) -> dict:
    """{(phase, kind): (batches drawn, mean answer tokens, mean real tokens)}, phases 0 and 1."""
    total = 10 * batches  # a run length whose phase boundary (short_phase 0.5) leaves room for both
    sampler = BatchSampler(seed, default_curriculum(0.5, long_phase_zero_shot, group_by_length),
                           family_weights=FAMILY_WEIGHTS)
    sums = defaultdict(lambda: [0, 0, 0])
    for phase, first in ((0, 0), (1, total // 2)):
        for step in range(first, first + batches):
            batch = sampler.next_batch(step, total)
            entry = sums[(phase, batch.kind)]
            entry[0] += 1
            entry[1] += int((batch.answer_mask & (batch.input_ids != EOS_ID)).sum())
            entry[2] += batch.real_tokens
    return {key: (n, answer / n, real / n) for key, (n, answer, real) in sorted(sums.items())}


def step_time_breakdown(cfg: TrainConfig, steps: int, warmup: int = 3) -> tuple[dict, float, float]:
    """({group: share of self CPU time}, seconds a step, seconds building one batch)."""
    trainer = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    for _ in range(warmup):
        trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        step_s = (time.perf_counter() - t0) / steps
    groups = defaultdict(float)
    for event in prof.key_averages():
        if "scaled_dot_product" in event.key:
            group = "attention kernel"
        elif event.key in MATMUL_OPS:
            group = "matrix products"
        elif event.key in ELEMENTWISE_OPS:
            group = "element-wise"
        else:
            group = "rest"
        groups[group] += event.self_cpu_time_total
    total = sum(groups.values())
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.sampler.next_batch(trainer.step + i, cfg.steps)
    build_s = (time.perf_counter() - t0) / steps
    return {g: t / total for g, t in groups.items()}, step_s, build_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-phase-zero-shot", type=float, default=LONG_PHASE_ZERO_SHOT)
    ap.add_argument("--group-by-length", type=int, default=0, help="pool size of length-grouped zero-shot batches")
    ap.add_argument("--batches", type=int, default=400, help="batches drawn per phase")
    ap.add_argument("--size", default="160:4:5:448", help="d_model:n_layers:n_heads:ffn_hidden of the profiled model")
    ap.add_argument("--profile-steps", type=int, default=20, help="0 skips the profile")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"token budget {TrainConfig().token_budget}; family mix {FAMILY_WEIGHTS}; "
          f"--long-phase-zero-shot {args.long_phase_zero_shot}; --group-by-length {args.group_by_length}; "
          f"{args.batches} batches per phase")
    print("| phase | kind | batches | answer tokens / batch | real tokens / batch |")
    print("|---|---|---|---|---|")
    counts = answer_tokens_per_kind(args.long_phase_zero_shot, args.batches, group_by_length=args.group_by_length)
    for (phase, kind), (n, answer, real) in counts.items():
        print(f"| {phase} | {kind} | {n} | {answer:.0f} | {real:.0f} |")
    weights = {k.name: round(k.weight, 3) for k in default_curriculum(0.5, args.long_phase_zero_shot)[1].kinds}
    expected = sum(w * counts[(1, kind)][1] for kind, w in weights.items() if (1, kind) in counts)
    print(f"second phase, kind weights {weights}: {expected:.0f} answer tokens a step on average")

    if args.profile_steps > 0:
        d, layers, heads, ffn = (int(x) for x in args.size.split(":"))
        cfg = TrainConfig(**{**PRESETS["llada"], "d_model": d, "n_layers": layers, "n_heads": heads,
                             "n_kv_heads": heads, "ffn_hidden": ffn}, steps=1000, short_phase=0.0,
                          block_prefix_prob=0.5, long_phase_zero_shot=args.long_phase_zero_shot,
                          group_by_length=args.group_by_length)
        shares, step_s, build_s = step_time_breakdown(cfg, args.profile_steps)
        print(f"\nprofile: {args.size}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
              f"{args.profile_steps} second-phase steps, block states on: {step_s:.3f} s a step (profiled), "
              f"building a batch {1000 * build_s:.1f} ms")
        for group in ("matrix products", "attention kernel", "element-wise", "rest"):
            print(f"  {group:17s} {100 * shares.get(group, 0.0):5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
