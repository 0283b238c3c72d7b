#!/usr/bin/env python
"""Score a guide (an HF causal-LM directory) alone on the held-out problems: greedy decoding with
transformers' `generate`, the same answer checking as scripts/eval_heldout.py; and time its forward
against the embedded diffusion model's.

    python scripts/eval_guide.py --model runs/guide/model --limit 500 --batch-size 50 --threads 1
    python scripts/eval_guide.py --model runs/guide/model --time-forward --length 512 --threads 1

Prompts are the held-out file's few-shot prompts, encoded as the pipeline encodes them (no BOS),
left-padded within a batch. Each generation stops at the tokenizer's stop ids (`<|eos|>`,
`<|eot|>`) or after --max-new-tokens, is decoded without special tokens and scored by
`dare_pipeline.evaluation.suite.score` (exact match of the worked answer, match of the final answer).

--time-forward times, in one process and interleaved, (a) one forward of the guide and one of the
diffusion model over --length tokens (no cache), and (b) the guide's forward over one block of
--block tokens after a KV cache of --length minus --block tokens: what guided decoding pays per
check. Medians of --repeats, batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score  # noqa: E402
from dare_pipeline.models.tokenizer import EOS_ID, EOT_ID, PAD_ID  # noqa: E402
from dare_pipeline.training import encode  # noqa: E402

STOP_IDS = (EOS_ID, EOT_ID)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the guide's HF directory")
    ap.add_argument("--data", default=str(HELDOUT_FILE))
    ap.add_argument("--limit", type=int, default=None, help="first N problems (the file is family-interleaved)")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="result JSON (default: <model>/heldout_greedy.json)")
    ap.add_argument("--time-forward", action="store_true", help="time forwards instead of scoring")
    ap.add_argument("--diffusion-model", default="default", help="diffusion model to time against")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    return ap.parse_args(argv)


def load_guide(directory: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    return model.eval()


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of `prompts`, each cut before its first stop id."""
    ids, mask = left_pad(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID)
    answers = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in STOP_IDS), len(row))
        answers.append(row[:cut])
    return answers


def summarize(rows: list[dict]) -> dict:
    def acc(subset):
        n = len(subset)
        return {"n": n, "exact_match": sum(r["exact_match"] for r in subset) / max(1, n),
                "final_match": sum(r["final_match"] for r in subset) / max(1, n)}

    families = defaultdict(list)
    for r in rows:
        families[r["family"]].append(r)
    return {"overall": acc(rows), "per_family": {f: acc(v) for f, v in families.items()}}


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def evaluate(args) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = load_guide(args.model)
    problems = read_jsonl(args.data)[args.offset:]
    if args.limit is not None:
        problems = problems[: args.limit]
    rows, started = [], time.perf_counter()
    for i in range(0, len(problems), args.batch_size):
        chunk = problems[i: i + args.batch_size]
        answers = greedy(model, [encode(p["prompt"]) for p in chunk], args.max_new_tokens)
        for p, answer in zip(chunk, answers):
            text = tok.decode(answer, skip_special_tokens=True)
            rows.append({"id": p["id"], "family": p["family"], "text": text, **score(p, text)})
    wall = time.perf_counter() - started
    summary = summarize(rows)
    result = {"model": args.model, "data": args.data, "offset": args.offset, "limit": args.limit,
              "decoding": "greedy", "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "threads": args.threads, "wall_s": round(wall, 1), **summary, "problems": rows}
    out = Path(args.out) if args.out else Path(args.model) / "heldout_greedy.json"
    write_json_atomic(out, result)
    print(f"guide {args.model}, greedy, {len(rows)} problems, max_new_tokens {args.max_new_tokens}, {wall:.0f}s")
    print(f"{'family':<10}{'n':>5}{'exact':>9}{'final':>9}")
    for fam, s in [*summary["per_family"].items(), ("overall", summary["overall"])]:
        print(f"{fam:<10}{s['n']:>5}{100 * s['exact_match']:>8.1f}%{100 * s['final_match']:>8.1f}%")
    print(f"wrote {out}")
    return 0


@torch.no_grad()
def time_forwards(args) -> int:
    from transformers import DynamicCache

    from dare_pipeline import load_model

    guide = load_guide(args.model)
    diffusion = load_model(args.diffusion_model)
    diffusion.eval()
    if args.block >= args.length:
        print(f"--block {args.block} must be shorter than --length {args.length}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 101, (1, args.length), generator=gen)
    prefix = args.length - args.block

    def guide_full():
        guide(input_ids=ids, use_cache=False)

    def diffusion_full():
        diffusion(ids)

    cache = DynamicCache()
    guide(input_ids=ids[:, :prefix], cache=cache, use_cache=True)

    def guide_block():
        extra = cache.get_seq_length() - prefix  # as after a verification: only the committed prefix stays
        if extra > 0:
            cache.crop(-extra)  # transformers 5: a negative count of tokens to drop
        guide(input_ids=ids[:, prefix:], cache=cache, use_cache=True)

    timings = {"guide_full": [], "diffusion_full": [], "guide_block_cached": []}
    calls = {"guide_full": guide_full, "diffusion_full": diffusion_full, "guide_block_cached": guide_block}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved, so a load change hits all three alike
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in timings.items()}
    spread = {k: (min(v), max(v)) for k, v in timings.items()}
    n_guide = sum(p.numel() for p in guide.parameters())
    n_diff = sum(p.numel() for p in diffusion.parameters())
    print(f"guide {args.model}: {n_guide / 1e6:.3f} M parameters; "
          f"diffusion {args.diffusion_model}: {n_diff / 1e6:.3f} M")
    print(f"length {args.length}, block {args.block}, batch 1, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} (min-max)")
    for name in timings:
        lo, hi = spread[name]
        print(f"  {name:<20}{1e3 * med[name]:8.2f} ms  ({1e3 * lo:.2f}-{1e3 * hi:.2f})")
    print(f"  guide_full / diffusion_full         {med['guide_full'] / med['diffusion_full']:.3f}")
    print(f"  guide_block_cached / diffusion_full {med['guide_block_cached'] / med['diffusion_full']:.3f}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return time_forwards(args) if args.time_forward else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
