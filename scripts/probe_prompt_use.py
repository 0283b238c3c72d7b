#!/usr/bin/env python
"""Does a model read the question? Masked loss with each problem's own answer against a swapped one.

    python scripts/probe_prompt_use.py --model runs/llada/model
    python scripts/probe_prompt_use.py --model default --per-family 32 --t 0.5

For each family, the first --per-family held-out problems are laid out zero-shot (the question
alone, canvas 64, as in training) and every answer token is masked with probability --t (the same
draw for every run). The loss is the mean cross-entropy over the masked answer tokens (the EOS
tail excluded). "swapped" pairs each question with the next problem's answer of the same family.
A model that ignores the question scores both alike; one that uses it has a much lower loss on
its own answers. This is how docs/from_scratch_runs.md dates when a training run learnt to copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dare_pipeline import load_model
from dare_pipeline.evaluation.suite import FAMILY_NAMES, HELDOUT_FILE, format_prompt, read_jsonl
from dare_pipeline.models.tokenizer import EOS_ID
from dare_pipeline.training.batches import make_batch
from dare_pipeline.training.objective import weighted_masked_loss

CANVAS = 64


def masked_answer_loss(model, pairs: list[tuple[str, str]], t: float, seed: int) -> float:
    batch = make_batch(pairs, CANVAS)
    in_answer = batch.answer_mask & (batch.input_ids != EOS_ID)  # the answers carry no EOS: this drops the tail
    draw = torch.rand(batch.input_ids.shape, generator=torch.Generator().manual_seed(seed))
    masked = in_answer & (draw < t)
    noisy = torch.where(masked, torch.full_like(batch.input_ids, model.config.mask_token_id), batch.input_ids)
    with torch.no_grad():
        logits = model(noisy, attention_mask=batch.attention_mask)
    # weighting "none" is the plain mean CE over the masked tokens; t and the lengths are unused by it
    unused = torch.ones(len(pairs))
    return float(weighted_masked_loss(logits, batch.input_ids, masked, unused, unused,
                                      shift=model.config.logits_shift, weighting="none"))


def probe(model, problems: list[dict], per_family: int, t: float, seed: int) -> dict[str, dict[str, float]]:
    out = {}
    for family in FAMILY_NAMES:
        chosen = [p for p in problems if p["family"] == family][:per_family]
        if len(chosen) < 2:
            continue
        prompts = [format_prompt(p) for p in chosen]
        answers = [p["answer"] for p in chosen]
        swapped = answers[1:] + answers[:1]
        own = masked_answer_loss(model, list(zip(prompts, answers)), t, seed)
        other = masked_answer_loss(model, list(zip(prompts, swapped)), t, seed)
        out[family] = {"own": round(own, 4), "swapped": round(other, 4), "gap": round(other - own, 4)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="checkpoint directory or embedded name")
    ap.add_argument("--data", default=str(HELDOUT_FILE))
    ap.add_argument("--per-family", type=int, default=16)
    ap.add_argument("--t", type=float, default=0.5, help="masking probability of the answer tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0.0 < args.t <= 1.0:
        ap.error(f"--t must be in (0, 1], got {args.t}")
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    result = probe(model, read_jsonl(args.data), args.per_family, args.t, args.seed)
    for family, r in result.items():
        print(f"{family:8s} own {r['own']:.3f}  swapped {r['swapped']:.3f}  gap {r['gap']:+.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
