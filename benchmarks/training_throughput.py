"""Training throughput of the default model's trainer at a few model sizes, in float32, under bf16
autocast and compiled (torch.compile): real (non-padding) tokens per second of `Trainer.train_step`,
which is what decides how many tokens a from-scratch run sees in its time (docs/from_scratch_runs.md).

    python benchmarks/training_throughput.py --threads 2
    python benchmarks/training_throughput.py --threads 2 --sizes 192:5:6:512 160:4:5:448 --steps 40

A size is d_model:n_layers:n_heads:ffn_hidden; the rest is the training script's LLaDA preset.
Batches are the few-shot phase's mix (zero-shot, few-shot, long canvases), the same batches for every
size; the first --warmup steps are not timed. Sizes and precisions run in one process, so their
ratios are comparable; absolute figures depend on the machine's load. A bare matrix product of the
model's shapes in both precisions shows what bf16 could give before casts and element-wise work.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch
from common import median

from dare_pipeline.models.transformer import DiffusionTransformer
from dare_pipeline.training import TrainConfig, Trainer
from dare_pipeline.training.trainer import PRESETS

DEFAULT_SIZES = ("192:5:6:512", "160:4:5:448", "128:4:4:384")
PRECISIONS = ("float32", "bf16-autocast", "float32-compiled")  # compiled: torch.compile(dynamic=True), inductor


def _size(text: str) -> dict:
    try:
        d, layers, heads, ffn = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected d_model:n_layers:n_heads:ffn_hidden") from None
    return {"d_model": d, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads, "ffn_hidden": ffn}


def tokens_per_second(cfg: TrainConfig, precision: str, warmup: int, steps: int) -> float:
    trainer = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    if precision == "float32-compiled":
        # batch shapes change every step; dynamic shapes keep them from recompiling. The compilation
        # itself falls in the untimed warmup steps.
        trainer.model = torch.compile(trainer.model, dynamic=True)

    def autocast():
        if precision == "bf16-autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    for _ in range(warmup):
        with autocast():
            trainer.train_step()
    tokens0, t0 = trainer.tokens, time.perf_counter()
    for _ in range(steps):
        with autocast():
            trainer.train_step()
    return (trainer.tokens - tokens0) / (time.perf_counter() - t0)


def matmul_gflops(d_model: int, ffn: int, rows: int, dtype: torch.dtype, repeats: int = 50) -> float:
    """GFLOP/s of the up- and down-projection products of one FFN on `rows` token rows."""
    x, w_up = torch.randn(rows, d_model, dtype=dtype), torch.randn(d_model, 2 * ffn, dtype=dtype)
    h, w_down = torch.randn(rows, ffn, dtype=dtype), torch.randn(ffn, d_model, dtype=dtype)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ w_up
        h @ w_down
        times.append(time.perf_counter() - t0)
    flops = 2 * rows * d_model * 2 * ffn + 2 * rows * ffn * d_model
    return flops / median(times[5:]) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=_size, default=[_size(s) for s in DEFAULT_SIZES])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS["llada"]
    print(f"hardware: CPU, {args.threads} torch thread(s); torch {torch.__version__}; "
          f"{args.steps} timed steps after {args.warmup}; token budget {TrainConfig().token_budget}; few-shot phase mix")
    print("| d_model x layers | parameters | precision | real tokens/s | vs first size, float32 |")
    print("|---|---|---|---|---|")
    reference = None
    for size in args.sizes:
        cfg = TrainConfig(**{**preset, **size}, steps=1000, short_phase=0.0)
        params = sum(p.numel() for p in DiffusionTransformer(cfg.model_config()).parameters())
        for precision in PRECISIONS:
            rate = tokens_per_second(cfg, precision, args.warmup, args.steps)
            reference = reference or rate
            print(f"| {size['d_model']} x {size['n_layers']} | {params / 1e6:.2f} M | {precision} | {rate:.0f} | "
                  f"{rate / reference:.2f}x |", flush=True)
    d, ffn = args.sizes[0]["d_model"], args.sizes[0]["ffn_hidden"]
    fp32, bf16 = (matmul_gflops(d, ffn, TrainConfig().token_budget, dt) for dt in (torch.float32, torch.bfloat16))
    print(f"bare FFN matrix products (d {d}, ffn {ffn}, {TrainConfig().token_budget} rows): "
          f"float32 {fp32:.0f} GFLOP/s, bfloat16 {bf16:.0f} GFLOP/s ({bf16 / fp32:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
