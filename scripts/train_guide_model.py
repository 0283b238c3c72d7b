#!/usr/bin/env python
"""Train the embedded guide: a small causal LM (LlamaForCausalLM) with the embedded diffusion model's
tokenizer, on the same task suite, for guided decoding.

    python scripts/train_guide_model.py --out runs/guide --minutes 30 --threads 2
    python scripts/train_guide_model.py --out runs/guide --resume          # continue a stopped run

The run stops at --steps or after --minutes of training time over all its sessions, whichever comes
first; without --steps the learning-rate schedule and the curriculum follow the training time, so a
wall-clock budget always ends with the decayed learning rate. It checkpoints every
--checkpoint-every steps, at the end and when interrupted (Ctrl-C, SIGTERM), leaving a resumable
OUT/checkpoint.pt and the latest weights as an HF-format directory OUT/model (with the tokenizer
files), loadable with `AutoModelForCausalLM.from_pretrained(OUT/model, local_files_only=True)`.

The default shape (d_model 128, 4 layers, 4 heads with 2 key/value heads, SwiGLU 224, tied
embeddings: 0.55 M parameters) costs ~1.1 MFLOPs a token in its matrices, a quarter of the embedded
diffusion model's ~4.5 M (2.26 M parameters); guided decoding runs it over a block's draft only,
with its own KV cache over the committed prefix.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dare_pipeline.training.guide import CHECKPOINT, SCHEDULES, GuideConfig, GuideTrainer  # noqa: E402
from dare_pipeline.training.optimizers import OPTIMIZERS  # noqa: E402
from dare_pipeline.training.trainer import add_shape_flags, family_weights_arg, stop_on_sigterm  # noqa: E402

# every GuideConfig field the command line may set (the --flag names are the field names)
FIELDS = ("steps", "minutes", "lr", "warmup_steps", "schedule", "decay_fraction", "optimizer", "muon_lr_scale",
          "token_budget", "max_rows", "short_phase", "group_by_length", "family_weights", "shot_answers",
          "checkpoint_every", "log_every", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (checkpoint.pt, model/, train_log.jsonl)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training-time budget of the whole run (all sessions); without --steps the schedule spans it")
    ap.add_argument("--steps", type=int, default=None, help="total optimizer steps (the schedule's length)")
    ap.add_argument("--seed", type=int, default=None, help="run seed (init, batches); default 0")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this session")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (1.5e-3)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (100)")
    ap.add_argument("--schedule", choices=SCHEDULES, default=None,
                    help="wsd: peak held, then a linear decay over the last --decay-fraction (default); cosine")
    ap.add_argument("--decay-fraction", type=float, default=None, help="wsd: fraction of the run decaying (0.2)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                    help="muon (default): Muon on the hidden matrices, AdamW on the rest; adamw")
    ap.add_argument("--muon-lr-scale", type=float, default=None, help="Muon's lr as a multiple of --lr (1.0)")
    ap.add_argument("--token-budget", type=int, default=None, help="padded tokens per batch (3072)")
    ap.add_argument("--max-rows", type=int, default=None, help="cap on rows per batch (64)")
    ap.add_argument("--short-phase", type=float, default=None,
                    help="fraction of the run on zero-shot and short prompts before few-shot ones (0.2)")
    ap.add_argument("--group-by-length", type=int, default=None, metavar="POOL",
                    help="zero-shot pairs batched POOL at a time by answer length, canvases cut to whole "
                         "blocks of 32 (256; 0 = canvas 64)")
    ap.add_argument("--family-weights", type=family_weights_arg, default=None, metavar="FAMILY=N,...",
                    help="share of the training problems per family, e.g. add=3,expr=3,sort=2,reverse=2")
    ap.add_argument("--shot-answers", action=argparse.BooleanOptionalAction, default=None,
                    help="the answers of the prompt's few-shot examples are targets too (default: yes)")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (100)")
    ap.add_argument("--log-every", type=int, default=None, help="steps between log lines (10)")
    add_shape_flags(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    overrides = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
    checkpoint = out / CHECKPOINT
    try:
        if args.resume:
            if not checkpoint.exists():
                print(f"{checkpoint}: no checkpoint to resume from", file=sys.stderr)
                return 2
            if args.seed is not None:
                overrides["seed"] = args.seed
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["guide_config"]
            cfg = GuideConfig.from_json(saved, **overrides)
        else:
            if checkpoint.exists():
                print(f"{checkpoint} exists; pass --resume to continue it or choose another --out", file=sys.stderr)
                return 2
            cfg = GuideConfig(seed=args.seed or 0, **overrides)
    except (TypeError, ValueError) as error:
        print(f"train_guide_model: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    trainer = GuideTrainer(cfg, out, progress=not args.no_progress)
    if args.resume:
        trainer.load()
    (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    print(f"guide: {trainer.n_parameters / 1e6:.3f}M parameters, step {trainer.step}, "
          f"{trainer.elapsed / 60:.1f} min trained, threads {torch.get_num_threads()}", file=sys.stderr)
    done = trainer.run(max_steps=args.max_steps)
    summary = {"step": trainer.step, "done": done, "last_loss": trainer.last_loss,
               "elapsed_s": round(trainer.elapsed, 1), "tokens": trainer.tokens, "targets": trainer.targets}
    print(json.dumps(summary), file=sys.stderr)
    if not done:
        print(f"stopped before the end of the run; continue with: python {sys.argv[0]} --out {out} --resume",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
