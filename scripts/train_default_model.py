#!/usr/bin/env python
"""Train the embedded default diffusion LM (LLaDA layout, or its Dream twin) on the task suite.

    python scripts/train_default_model.py --family llada --out runs/llada --steps 3600 --minutes 80
    python scripts/train_default_model.py --out runs/llada --resume            # continue a stopped run

The run stops at --steps (the length of the LR schedule) or after --minutes of wall time, whichever
comes first, always leaving a resumable checkpoint (runs/.../checkpoint.pt) and the latest weights
as an HF-format checkpoint (runs/.../model). See docs/default_model.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dare_pipeline.training import TrainConfig, Trainer
from dare_pipeline.training.optimizers import OPTIMIZERS
from dare_pipeline.training.trainer import (CHECKPOINT, PRESETS, SCHEDULES, add_shape_flags, family_weights_arg,
                                            stop_on_sigterm)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(PRESETS), default="llada")
    ap.add_argument("--out", required=True, help="output directory (checkpoint.pt, model/, train_log.jsonl)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this session")
    ap.add_argument("--steps", type=int, default=None, help="total optimizer steps (LR schedule length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                    help="adamw (default), or muon: Muon on the hidden matrices, AdamW on the rest")
    ap.add_argument("--muon-lr-scale", type=float, default=None,
                    help="--optimizer muon: the hidden matrices' lr as a multiple of --lr (1.0)")
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--token-budget", type=int, default=None, help="padded tokens per batch")
    ap.add_argument("--init-from", default=None,
                    help="start from the weights of this HF checkpoint directory (fresh optimizer and schedule)")
    ap.add_argument("--short-phase", type=float, default=None,
                    help="fraction of the steps on short contexts before few-shot and long canvases (0.35)")
    ap.add_argument("--long-phase-zero-shot", type=float, default=None,
                    help="share of zero-shot batches after the short phase (0.35); few-shot and long-canvas "
                         "batches share the rest 8:5")
    ap.add_argument("--group-by-length", type=int, default=None, metavar="POOL",
                    help="batch zero-shot pairs POOL at a time sorted by answer length, each batch's canvas "
                         "its longest answer plus one EOS in whole blocks of 32 (0 = canvas 64 always)")
    ap.add_argument("--block-prefix-prob", type=float, default=None,
                    help="fraction of sequences noised as semi-autoregressive block states (0 = i.i.d. only)")
    ap.add_argument("--block-prefix-start", type=float, default=None,
                    help="fraction of the steps on i.i.d. masks before block states begin (0)")
    ap.add_argument("--schedule", choices=SCHEDULES, default=None,
                    help="lr schedule: cosine decay over the run (default) or warmup-stable-decay")
    ap.add_argument("--decay-fraction", type=float, default=None,
                    help="wsd: fraction of the steps in the final linear decay (0.2)")
    ap.add_argument("--max-rows", type=int, default=None, help="cap on rows per batch")
    ap.add_argument("--family-weights", type=family_weights_arg, default=None, metavar="FAMILY=N,...",
                    help="share of the training problems per family, e.g. expr=3,add=2,sort=1,reverse=1 "
                         "(default: the families in turn; a family left out is not trained on)")
    ap.add_argument("--late-family-weights", type=family_weights_arg, default=None, metavar="FAMILY=N,...",
                    help="the family mix from --late-mix-start on (default: --family-weights throughout)")
    ap.add_argument("--late-mix-start", type=float, default=None,
                    help="fraction of the steps after which --late-family-weights apply (0.5)")
    ap.add_argument("--weighting", choices=["inv_t", "none"], default=None,
                    help="loss weighting: inv_t = LLaDA 1/t ELBO, none = mean masked CE")
    ap.add_argument("--init-std", type=float, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this session")
    add_shape_flags(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    # every TrainConfig field given on the command line (the --flag names are the field names)
    fields = ("steps", "lr", "optimizer", "muon_lr_scale", "warmup_steps", "token_budget", "max_rows", "family_weights", "late_family_weights",
              "late_mix_start", "short_phase", "long_phase_zero_shot", "group_by_length", "block_prefix_prob",
              "block_prefix_start", "schedule", "decay_fraction", "init_from", "weighting", "init_std",
              "checkpoint_every", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.resume:
        if not (out / CHECKPOINT).exists():
            print(f"{out / CHECKPOINT}: no checkpoint to resume from", file=sys.stderr)
            return 2
        saved = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)["train_config"]
        saved["betas"] = tuple(saved["betas"])
        cfg = TrainConfig(**{**saved, **overrides})
    else:
        if (out / CHECKPOINT).exists():
            print(f"{out / CHECKPOINT} exists; pass --resume to continue it or choose another --out", file=sys.stderr)
            return 2
        cfg = TrainConfig(**{**PRESETS[args.family], "seed": args.seed, **overrides})
    if args.late_mix_start is not None and cfg.late_family_weights is None:
        # the config's 0.5 default cannot tell an unused start apart; the command line can
        print(f"--late-mix-start {args.late_mix_start}: has no effect without --late-family-weights "
              "(given here or saved in the run resumed)", file=sys.stderr)
        return 2
    trainer = Trainer(cfg, out, progress=not args.no_progress, device=args.device)
    if args.resume:
        trainer.load()
    (out / "train_config.json").write_text(json.dumps(attrs.asdict(cfg), indent=2) + "\n")
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"{cfg.family}: {n_params / 1e6:.2f}M parameters, step {trainer.step}/{cfg.steps}, "
          f"threads {torch.get_num_threads()}", file=sys.stderr)
    done = trainer.run(max_steps=args.max_steps, minutes=args.minutes)
    summary = {"step": trainer.step, "steps": cfg.steps, "done": done, "last_loss": trainer.last_loss,
               "elapsed_s": round(trainer.elapsed, 1), "tokens": trainer.tokens}
    print(json.dumps(summary), file=sys.stderr)
    if not done:
        print(f"stopped before the end of the schedule; continue with: python {sys.argv[0]} --out {out} --resume",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
