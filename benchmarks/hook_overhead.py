"""Cost of the hook machinery: decoding with a no-op plugin on every hook vs with none.

    python benchmarks/hook_overhead.py --prompt-len 256 --gen-length 256 --block-length 32 --repeats 3

Prints a markdown table row set for docs/benchmarks.md; ratios come from interleaved runs.
"""

from __future__ import annotations

import argparse

import torch

from common import bench_model, bench_prompts, conditions, interleaved, median
from dare_pipeline import Pipeline
from dare_pipeline.hookspecs import hookimpl
from dare_pipeline.plugin import Plugin
from dare_pipeline.registry import registered


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
    times = interleaved(pipes, prompts, args.repeats)
    base = median(times["no plugin"])
    print(conditions(model, args.threads, prompt=args.prompt_len, gen_length=args.gen_length,
                     block_length=args.block_length, batch=args.batch, steps=args.gen_length,
                     repeats=args.repeats))
    print("| configuration | median s / generation | all runs (s) | vs no plugin |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"| {name} | {median(ts):.3f} | {runs} | {median(ts) / base:.4f}x |")


if __name__ == "__main__":
    main()
