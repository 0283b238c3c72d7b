"""Cost of the hook machinery: decoding with a no-op plugin on every hook vs with none.

    python benchmarks/hook_overhead.py --prompt-len 256 --gen-length 256 --block-length 32 --repeats 3

Two measurements, printed as markdown for docs/benchmarks.md:
1. end to end: the same decode with and without the no-op plugin, interleaved, in process CPU
   seconds (robust to other load on the machine) and wall seconds;
2. direct: the CPU time of one step's hook dispatch (every per-step hook called once through
   pluggy with the no-op plugin registered), times the number of steps, over the decode's time.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import bench_model, bench_prompts, conditions, interleaved, median

from dare_pipeline import Pipeline
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.core.registry import registered


class NoOpEverywhere(Plugin):
    name = "noop_everywhere"

    @hookimpl
    def dare_generation_start(self, state):
        pass

    @hookimpl
    def dare_layer_reuse(self, state):
        return None

    @hookimpl
    def dare_block_start(self, state):
        pass

    @hookimpl
    def dare_step_start(self, state):
        pass

    @hookimpl
    def dare_plan_forward(self, state):
        return None

    @hookimpl
    def dare_step_end(self, state, committed):
        pass

    @hookimpl
    def dare_block_end(self, state):
        pass

    @hookimpl
    def dare_generation_end(self, state):
        pass

    @hookimpl
    def dare_report_stats(self, state):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = bench_model()
    gen = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.gen_length}
    prompts = bench_prompts(args.batch, args.prompt_len)
    with registered(NoOpEverywhere):
        pipes = {"no plugin": Pipeline(model, {"generation": gen}),
                 "no-op plugin on every hook": Pipeline(model, {"generation": gen, "plugins": ["noop_everywhere"]})}
    cpu = interleaved(pipes, prompts, args.repeats, clock=time.process_time)
    wall = interleaved(pipes, prompts, 1)
    print(conditions(model, args.threads, prompt=args.prompt_len, gen_length=args.gen_length,
                     block_length=args.block_length, batch=args.batch, steps=args.gen_length,
                     repeats=args.repeats))
    base = median(cpu["no plugin"])
    print("| configuration | median CPU s / generation | all runs (CPU s) | wall s (1 run) | vs no plugin (CPU) |")
    print("|---|---|---|---|---|")
    for name, ts in cpu.items():
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"| {name} | {median(ts):.3f} | {runs} | {wall[name][0]:.2f} | {median(ts) / base:.4f}x |")

    # direct: one step's hook dispatch, as the loop makes it
    hook = pipes["no-op plugin on every hook"].manager.hook
    state, committed, n = object(), None, 20000
    start = time.process_time()
    for _ in range(n):
        hook.dare_step_start(state=state)
        hook.dare_plan_forward(state=state)
        hook.dare_step_end(state=state, committed=committed)
    per_step = (time.process_time() - start) / n
    share = per_step * args.gen_length / base
    print(f"\nper-step hook dispatch (3 hooks through pluggy, no-op plugin + baseline registered): "
          f"{per_step * 1e6:.1f} us; x {args.gen_length} steps = {per_step * args.gen_length * 1e3:.2f} ms "
          f"= {share * 100:.4f}% of the no-plugin decode")


if __name__ == "__main__":
    main()
