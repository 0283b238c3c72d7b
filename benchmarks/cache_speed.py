"""Fast-dLLM cache speed-ups on the random-weight benchmark model (speed only: random weights are
never confident, so threshold decoding would commit one token per step and is not measured here).

    python benchmarks/cache_speed.py --gen-length 256 --steps 256
    python benchmarks/cache_speed.py --gen-length 1024 --steps 256 --no-warmup
    python benchmarks/cache_speed.py --shape llada-8b --device cuda --dtype bfloat16 --prompt-len 512 --gen-length 256

On CUDA the clock is wall time after a device synchronize (the process's CPU time says nothing
about GPU work).

Every configuration decodes the same prompt with the same number of steps (the baseline policy
commits gen_length/steps tokens per step), interleaved, timed in process CPU seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    SHAPES,
    bench_model,
    bench_prompts,
    conditions,
    cuda_clock,
    interleaved,
    median,
)

from dare_pipeline import Pipeline

CONFIGS = {
    "baseline": [],
    "+prefix cache": [{"name": "prefix_cache"}],
    "+dual cache": [{"name": "dual_cache"}],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="total steps (default: gen_length)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up decode (long generations)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench", help="bench (42M, CPU) or llada-8b (GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or args.gen_length
    model = bench_model(dtype=getattr(torch, args.dtype), device=args.device, shape=args.shape)
    gen = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": steps}
    prompts = bench_prompts(args.batch, args.prompt_len, vocab=model.config.vocab_size - 500)
    cuda = torch.device(args.device).type == "cuda"
    unit = "s" if cuda else "CPU s"
    pipes = {name: Pipeline(model, {"generation": gen, "plugins": plugins}) for name, plugins in CONFIGS.items()}
    outputs = {}
    cpu = interleaved(pipes, prompts, args.repeats, clock=cuda_clock if cuda else time.process_time,
                      warmup=not args.no_warmup, outputs=outputs)
    nfe = {name: out.stats.nfe for name, out in outputs.items()}
    print(conditions(model, args.threads, prompt=args.prompt_len, gen_length=args.gen_length,
                     block_length=args.block_length, steps=steps, batch=args.batch, repeats=args.repeats,
                     shape=args.shape))
    base = median(cpu["baseline"])
    print(f"| configuration | NFE | {unit} / generation | tokens/s | speed-up vs baseline |")
    print("|---|---|---|---|---|")
    for name, ts in cpu.items():
        t = median(ts)
        print(f"| {name} | {nfe[name]} | {t:.2f} | {args.gen_length * args.batch / t:.1f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
