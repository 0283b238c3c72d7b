"""Seeded problem streams, the train/held-out split, few-shot prompts and scoring.

A problem is a plain dict: ``id``, ``family``, ``question``, ``answer`` (full
worked answer ending in ``#### <final>``) and ``final``.

The split is a property of the question text alone (sha256 of the question,
mod 10 == 0 -> held-out), so no seed or stream position can ever put a held-out
question into training.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path

from .families import FAMILIES, FINAL_MARKER

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
HELDOUT_MODULUS = 10  # 1 question in 10 is held-out
SHOT_POOL_SIZE = 256  # train problems per family that held-out prompts draw shots from
DEFAULT_TARGET_PROMPT_CHARS = 448
DEFAULT_MAX_SHOTS = 8

Problem = dict


# ---------------------------------------------------------------- split & streams


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_heldout(question: str) -> bool:
    """True iff the question belongs to the held-out split (depends on the text only)."""
    return _digest(question.strip()) % HELDOUT_MODULUS == 0


def _rng(*parts: object) -> random.Random:
    # Derived through sha256 rather than hash() so streams do not depend on
    # PYTHONHASHSEED, and each (seed, purpose, family) gets an independent stream.
    return random.Random(_digest("/".join(map(str, parts))))


def family_stream(family: str, seed: int, split: str = "train") -> Iterator[Problem]:
    """Infinite stream of one family's problems from one split.

    Train ids are ``<family>-t<n>``, held-out ids ``<family>-<n>`` (6+ digits).
    The held-out stream skips repeated questions; the train stream does not
    (repeats are harmless for training and deduplicating an infinite stream
    would need unbounded memory).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    gen, rng = FAMILIES[family], _rng(seed, split, family)
    want_heldout = split == "heldout"
    seen: set[str] = set()
    index = 0
    while True:
        question, answer, final = gen(rng)
        if is_heldout(question) != want_heldout:
            continue
        if want_heldout:
            if question in seen:
                continue
            seen.add(question)
        prefix = f"{family}-" if want_heldout else f"{family}-t"
        yield {"id": f"{prefix}{index:06d}", "family": family, "question": question, "answer": answer, "final": final}
        index += 1


def train_stream(seed: int, families: Sequence[str] = FAMILY_NAMES,
                 weights: Mapping[str, int] | None = None) -> Iterator[Problem]:
    """Infinite training problems, families interleaved round-robin.

    With ``weights`` (family -> positive int) family f gets ``weights[f]`` problems of every
    ``sum(weights)``, spread evenly by a smooth weighted round-robin (deterministic, so the
    stream stays a pure function of the seed). Families missing from ``weights`` are left out.
    """
    if weights is None:
        streams = [family_stream(f, seed, "train") for f in families]
        while True:
            for stream in streams:
                yield next(stream)
    chosen = [f for f in families if weights.get(f, 0) > 0]
    if not chosen:
        raise ValueError(f"family weights {dict(weights)} leave no family of {list(families)}")
    streams = {f: family_stream(f, seed, "train") for f in chosen}
    total = sum(weights[f] for f in chosen)
    credit = dict.fromkeys(chosen, 0)
    while True:
        for f in chosen:
            credit[f] += weights[f]
        pick = max(chosen, key=lambda f: credit[f])  # first of the largest: ties break in family order
        credit[pick] -= total
        yield next(streams[pick])


def heldout_problems(n: int, seed: int, families: Sequence[str] = FAMILY_NAMES) -> list[Problem]:
    """``n`` distinct held-out problems, balanced over families and interleaved
    round-robin (so any prefix of the list is balanced too)."""
    counts = [n // len(families) + (i < n % len(families)) for i in range(len(families))]
    per_family = [list(islice(family_stream(f, seed, "heldout"), c)) for f, c in zip(families, counts)]
    out = []
    for i in range(max(counts, default=0)):
        out.extend(problems[i] for problems in per_family if i < len(problems))
    return out


# ---------------------------------------------------------------- few-shot prompts


def format_example(problem: Problem) -> str:
    """One worked example as it appears inside a prompt."""
    return f"Q: {problem['question']}\nA: {problem['answer']}\n\n"


def format_prompt(problem: Problem, shots: Iterable[Problem] = ()) -> str:
    """Worked examples, then the question; the model continues after ``A: ``."""
    return "".join(map(format_example, shots)) + f"Q: {problem['question']}\nA: "


def shot_pool(seed: int, family: str, size: int = SHOT_POOL_SIZE) -> list[Problem]:
    """The first ``size`` distinct-question train problems of a family."""
    pool, seen = [], set()
    for p in family_stream(family, seed, "train"):
        if p["question"] not in seen:
            seen.add(p["question"])
            pool.append(p)
            if len(pool) == size:
                return pool
    raise AssertionError("unreachable: the stream is infinite")


def select_shots(
    problem: Problem,
    pool: Sequence[Problem],
    seed: int,
    *,
    num_shots: int | None = None,
    target_prompt_chars: int = DEFAULT_TARGET_PROMPT_CHARS,
    max_shots: int = DEFAULT_MAX_SHOTS,
) -> list[Problem]:
    """Deterministically pick shots for ``problem`` from ``pool``.

    The pool is shuffled by a generator keyed on (seed, question). With
    ``num_shots`` set, exactly that many are taken. Otherwise shots are taken
    in shuffled order until the next one would push the prompt past
    ``target_prompt_chars`` or ``max_shots`` is reached; stopping (rather than
    skipping to a shorter example) avoids biasing shots toward short answers.
    """
    candidates = [p for p in pool if p["question"] != problem["question"]]
    _rng(seed, "shots", problem["question"]).shuffle(candidates)
    if num_shots is not None:
        if num_shots > len(candidates):
            raise ValueError(f"asked for {num_shots} shots, pool has {len(candidates)}")
        return candidates[:num_shots]
    shots: list[Problem] = []
    length = len(format_prompt(problem))
    for cand in candidates[:max_shots]:
        length += len(format_example(cand))
        if length > target_prompt_chars:
            break
        shots.append(cand)
    return shots


def training_pairs(
    seed: int,
    *,
    max_shots: int = DEFAULT_MAX_SHOTS,
    max_prompt_chars: int = 512,
    families: Sequence[str] = FAMILY_NAMES,
    window: int = 64,
    min_shots: int = 0,
    family_weights: Mapping[str, int] | None = None,
) -> Iterator[tuple[str, str]]:
    """Infinite ``(prompt, answer)`` pairs for training.

    Each prompt has a uniformly random number of shots in ``min_shots..max_shots``
    (fewer if the prompt would exceed ``max_prompt_chars``), drawn from the last
    ``window`` train problems of the same family, so the model learns to answer
    with both short and long contexts. The answer carries no EOS; the trainer
    appends ``<|eos|>``. ``family_weights`` skews the family mix (see ``train_stream``).
    """
    rng = _rng(seed, "pairs")
    recent: dict[str, deque] = {f: deque(maxlen=window) for f in families}
    for problem in train_stream(seed, families, family_weights):
        history = [p for p in recent[problem["family"]] if p["question"] != problem["question"]]
        shots = rng.sample(history, min(rng.randint(min(min_shots, max_shots), max_shots), len(history)))
        while shots and len(format_prompt(problem, shots)) > max_prompt_chars:
            shots.pop(0)
        recent[problem["family"]].append(problem)
        yield format_prompt(problem, shots), problem["answer"]


# ---------------------------------------------------------------- scoring


def cut_answer(text: str) -> str:
    """The answer part of a generation: stops at a decoded special token
    (``<|eos|>``, ``<|pad|>``...), at the first blank line, and after the
    ``####`` line. ``<`` never occurs in the suite, so the first cut is safe."""
    text = text.split("<|", 1)[0].split("\n\n", 1)[0]
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(FINAL_MARKER.strip()):
            lines = lines[: i + 1]
            break
    return "\n".join(lines).strip()


def extract_final(text: str) -> str | None:
    """The final answer after ``####`` (None if there is no such line)."""
    for line in cut_answer(text).split("\n"):
        if line.startswith(FINAL_MARKER.strip()):
            return line[len(FINAL_MARKER.strip()) :].strip()
    return None


def score(problem: Problem, generated_text: str) -> dict[str, bool]:
    """``exact_match``: the whole worked answer is right; ``final_match``: the
    final answer after ``####`` is right."""
    return {
        "exact_match": cut_answer(generated_text) == problem["answer"],
        "final_match": extract_final(generated_text) == problem["final"],
    }


def accuracy(rows: Sequence[Mapping]) -> dict:
    """Exact-match and final-answer accuracy of scored rows (each with its ``family`` and the
    ``score`` keys), overall and per family in the order families first appear."""
    def share(subset):
        n = len(subset)
        return {"n": n, "exact_match": sum(r["exact_match"] for r in subset) / max(1, n),
                "final_match": sum(r["final_match"] for r in subset) / max(1, n)}

    families: dict[str, list] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    return {"overall": share(rows), "per_family": {f: share(v) for f, v in families.items()}}


def accuracy_table(summary: dict) -> list[str]:
    """`accuracy`'s result as the lines of a table: a row per family, then the overall row."""
    lines = [f"{'family':<10}{'n':>5}{'exact':>9}{'final':>9}"]
    for fam, s in [*summary["per_family"].items(), ("overall", summary["overall"])]:
        lines.append(f"{fam:<10}{s['n']:>5}{100 * s['exact_match']:>8.1f}%{100 * s['final_match']:>8.1f}%")
    return lines


# ---------------------------------------------------------------- data files


def heldout_records(
    n: int = 500, seed: int = 1234, target_prompt_chars: int = DEFAULT_TARGET_PROMPT_CHARS
) -> list[dict]:
    """Held-out problems with their ready few-shot ``prompt`` and ``shots`` ids."""
    pools = {f: shot_pool(seed, f) for f in FAMILY_NAMES}
    records = []
    for p in heldout_problems(n, seed):
        shots = select_shots(p, pools[p["family"]], seed, target_prompt_chars=target_prompt_chars)
        records.append({**p, "shots": [s["id"] for s in shots], "prompt": format_prompt(p, shots)})
    return records


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write JSON lines via a temp file + os.replace, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=True) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files should be world-readable
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# the 500 held-out problems, shipped in the package (the lm-eval tasks, scripts and tests read it)
HELDOUT_FILE = Path(__file__).resolve().parents[1] / "tasks" / "heldout.jsonl"


def generate_data(
    out_dir: str | os.PathLike = HELDOUT_FILE.parent,
    n_heldout: int = 500,
    seed: int = 1234,
    target_prompt_chars: int = DEFAULT_TARGET_PROMPT_CHARS,
) -> Path:
    """Write ``<out_dir>/heldout.jsonl``; byte-identical for identical arguments."""
    records = heldout_records(n_heldout, seed, target_prompt_chars)
    return write_jsonl_atomic(Path(out_dir) / "heldout.jsonl", records)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
