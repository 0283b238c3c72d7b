"""``python -m dare_pipeline.evaluation.suite generate --heldout 500 --seed 1234`` rewrites the packaged held-out file."""

from __future__ import annotations

import argparse

from .problems import DEFAULT_TARGET_PROMPT_CHARS, HELDOUT_FILE, generate_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dare_pipeline.evaluation.suite")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write <out>/heldout.jsonl (atomically, deterministically)")
    gen.add_argument("--out", default=str(HELDOUT_FILE.parent),
                     help="output directory (default: the package's, dare_pipeline/evaluation/tasks)")
    gen.add_argument("--heldout", type=int, default=500, help="number of held-out problems (default: 500)")
    gen.add_argument("--seed", type=int, default=1234, help="generation seed (default: 1234)")
    gen.add_argument(
        "--target-prompt-chars",
        type=int,
        default=DEFAULT_TARGET_PROMPT_CHARS,
        help=f"few-shot prompt length budget in characters (default: {DEFAULT_TARGET_PROMPT_CHARS})",
    )
    args = parser.parse_args(argv)
    path = generate_data(args.out, args.heldout, args.seed, args.target_prompt_chars)
    print(f"wrote {args.heldout} problems to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
