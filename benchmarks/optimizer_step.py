"""Time of one optimiser step of the training script's optimisers on a default-model size.

    python benchmarks/optimizer_step.py --threads 1
    python benchmarks/optimizer_step.py --threads 2 --size 192:5:6:512

Compared, in one process and interleaved (so their ratios are comparable): AdamW alone (the
default), torch.optim.Muon (Newton-Schulz in bfloat16) with AdamW on the rest, and the trainer's
Float32Muon (the same iteration in float32) with AdamW on the rest. Gradients are random; the first
--warmup steps are not timed. A size is d_model:n_layers:n_heads:ffn_hidden on the LLaDA preset.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from common import median

from dare_pipeline.models.transformer import DiffusionTransformer
from dare_pipeline.training import TrainConfig
from dare_pipeline.training.optimizers import MuonWithAdamW, build_optimizer
from dare_pipeline.training.trainer import PRESETS


def torch_muon(model: torch.nn.Module) -> MuonWithAdamW:
    """MuonWithAdamW with torch's own bfloat16 Muon in place of Float32Muon."""
    opt = MuonWithAdamW(model, 1e-3, 0.1, (0.9, 0.98))
    opt.muon = torch.optim.Muon([p for g in opt.muon.param_groups for p in g["params"]], lr=1e-3,
                                weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    return opt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="160:4:5:448", help="d_model:n_layers:n_heads:ffn_hidden")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, layers, heads, ffn = (int(x) for x in args.size.split(":"))
    cfg = TrainConfig(**{**PRESETS["llada"], "d_model": d, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads,
                         "ffn_hidden": ffn})
    model = DiffusionTransformer(cfg.model_config())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {
        "adamw": build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.98)),
        "muon, torch (bf16 Newton-Schulz)": torch_muon(model),
        "muon, Float32Muon": build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.98)),
    }
    times = {name: [] for name in optimizers}
    for i in range(args.warmup + args.repeats):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"size {args.size} ({n_params / 1e6:.2f} M parameters), float32 weights, {torch.get_num_threads()} "
          f"thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}; "
          f"median of {args.repeats} steps")
    print("| optimiser | seconds a step | x AdamW |")
    print("|---|---|---|")
    base = median(times["adamw"])
    for name, ts in times.items():
        print(f"| {name} | {median(ts):.4f} | {median(ts) / base:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
