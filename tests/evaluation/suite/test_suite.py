"""Tests of the synthetic task suite: correctness, determinism, split, prompts, scoring, data file."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from dare_pipeline.evaluation.suite import (
    FAMILIES,
    FAMILY_NAMES,
    HELDOUT_FILE,
    extract_final,
    family_stream,
    format_prompt,
    generate_data,
    heldout_problems,
    is_heldout,
    read_jsonl,
    score,
    select_shots,
    shot_pool,
    train_stream,
    training_pairs,
)
from dare_pipeline.evaluation.suite.__main__ import main

REPO = Path(__file__).resolve().parents[3]
SEED = 1234


def sample(family: str, n: int, seed: int = 0) -> list[dict]:
    return list(islice(family_stream(family, seed, "train"), n))


# ---------------------------------------------------------------- families


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_answers_are_well_formed(family):
    for p in sample(family, 1500):
        assert 16 <= len(p["answer"]) <= 64, p
        assert p["answer"].endswith("\n#### " + p["final"]) or p["answer"] == "#### " + p["final"]
        assert p["question"].startswith({"add": "add ", "sort": "sort ", "reverse": "reverse ", "expr": "eval "}[family])
        assert "\n\n" not in p["answer"] and "<" not in p["answer"] + p["question"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_finals_are_correct(family):
    # Recompute each final answer independently of the generator.
    for p in sample(family, 1000):
        arg = p["question"].split(" ", 1)[1]
        if family == "add":
            assert re.fullmatch(r"[1-9](\+[1-9]){3,6}", arg)
            expected = str(sum(map(int, arg.split("+"))))
        elif family == "sort":
            expected = ",".join(sorted(arg.split(",")))
        elif family == "reverse":
            expected = arg[::-1]
        else:
            assert re.fullmatch(r"[1-9]([+-][1-9]){3,5}", arg)
            expected = str(eval(arg))  # left to right, like Python for + and -
        assert p["final"] == expected, p


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_items_of_a_question_are_distinct(family):
    for p in sample(family, 500):
        items = re.findall(r"[a-z]" if family in ("sort", "reverse") else r"[1-9]", p["question"].split(" ", 1)[1])
        assert len(items) == len(set(items)), p


@pytest.mark.parametrize("family", ["add", "expr"])
def test_steps_are_a_running_result(family):
    for p in sample(family, 500):
        arg = p["question"].split(" ", 1)[1]
        operands = re.findall(r"[1-9]", arg)
        ops = re.findall(r"[+-]", arg)
        steps = p["answer"].split("\n")[0].split(",")
        assert len(steps) == len(ops)
        value = int(operands[0])
        for step, op, x in zip(steps, ops, operands[1:]):
            result = value + int(x) if op == "+" else value - int(x)
            assert step == f"{value}{op}{x}={result}" and result >= 0
            value = result
        assert str(value) == p["final"]


def test_longest_add_fits_64_chars():
    class MaxRng(random.Random):
        def randint(self, a, b):
            return b  # seven operands: the longest chain

        def sample(self, population, k):
            return sorted(population, reverse=True)[:k]  # 9+8+...: the largest running sums

    _, answer, final = FAMILIES["add"](MaxRng())
    assert final == "42" and len(answer) <= 64


# ---------------------------------------------------------------- determinism & split


def test_streams_are_deterministic_and_seeded():
    first = list(islice(train_stream(7), 200))
    assert first == list(islice(train_stream(7), 200))
    assert first != list(islice(train_stream(8), 200))
    assert [p["family"] for p in first[:8]] == list(FAMILY_NAMES) * 2
    assert len({p["id"] for p in first}) == 200


def test_family_weights_set_the_mix_and_keep_each_family_stream():
    weights = {"expr": 3, "add": 2, "sort": 1, "reverse": 0}
    mixed = list(islice(train_stream(7, weights=weights), 120))
    counts = Counter(p["family"] for p in mixed)
    assert counts == {"expr": 60, "add": 40, "sort": 20}
    # spread evenly: every window of one period (6 problems) holds the weights exactly
    for start in range(0, 120, 6):
        assert Counter(p["family"] for p in mixed[start:start + 6]) == {"expr": 3, "add": 2, "sort": 1}
    # each family's problems are that family's own stream, in order (only the interleaving changes)
    plain = list(islice(train_stream(7), 400))
    for family in ("expr", "add", "sort"):
        assert [p for p in mixed if p["family"] == family] == [p for p in plain if p["family"] == family][:counts[family]]
    assert mixed == list(islice(train_stream(7, weights=weights), 120))
    with pytest.raises(ValueError, match="leave no family"):
        next(train_stream(7, weights={"add": 0}))


def test_streams_ignore_global_random():
    random.seed(1)
    a = list(islice(train_stream(3), 50))
    random.seed(2)
    assert a == list(islice(train_stream(3), 50))


def test_split_never_overlaps():
    heldout = heldout_problems(500, SEED)
    heldout_q = {p["question"] for p in heldout}
    assert all(is_heldout(q) for q in heldout_q)
    for seed in (SEED, 99):  # any seed: membership depends on the question only
        train_q = {p["question"] for p in islice(train_stream(seed), 20_000)}
        assert not train_q & heldout_q
        assert not any(is_heldout(q) for q in train_q)


def test_split_is_about_ten_percent():
    qs = [FAMILIES["reverse"](random.Random(i))[0] for i in range(4000)]
    assert 0.07 < sum(map(is_heldout, qs)) / len(qs) < 0.13


def test_heldout_is_balanced_interleaved_and_distinct():
    probs = heldout_problems(502, SEED)
    assert Counter(p["family"] for p in probs) == {"add": 126, "sort": 126, "reverse": 125, "expr": 125}
    assert [p["family"] for p in probs[:4]] == list(FAMILY_NAMES)
    assert len({p["question"] for p in probs}) == len({p["id"] for p in probs}) == 502
    assert probs[0]["id"] == "add-000000"


# ---------------------------------------------------------------- prompts


def test_format_prompt():
    q = {"question": "reverse abc", "answer": "#### cba"}
    s = {"question": "reverse xyz", "answer": "#### zyx"}
    assert format_prompt(q) == "Q: reverse abc\nA: "
    assert format_prompt(q, [s, s]) == "Q: reverse xyz\nA: #### zyx\n\n" * 2 + "Q: reverse abc\nA: "


def test_select_shots_deterministic_same_family_train_only():
    pool = shot_pool(SEED, "sort")
    for p in heldout_problems(40, SEED):
        if p["family"] != "sort":
            continue
        shots = select_shots(p, pool, SEED)
        assert shots == select_shots(p, pool, SEED)
        assert 4 <= len(shots) <= 8
        assert all(s["family"] == "sort" and not is_heldout(s["question"]) for s in shots)
        assert 256 <= len(format_prompt(p, shots)) <= 448
        assert len(select_shots(p, pool, SEED, num_shots=3)) == 3


def test_training_pairs_vary_the_number_of_shots():
    pairs = list(islice(training_pairs(5, max_shots=8, max_prompt_chars=512), 800))
    assert pairs == list(islice(training_pairs(5, max_shots=8, max_prompt_chars=512), 800))
    shot_counts = Counter(prompt.count("Q: ") - 1 for prompt, _ in pairs)
    assert shot_counts[0] > 0 and max(shot_counts) >= 6
    for prompt, answer in pairs:
        assert len(prompt) <= 512 and prompt.endswith("\nA: ")
        assert 16 <= len(answer) <= 64
        assert not is_heldout(prompt.rsplit("Q: ", 1)[1][: -len("\nA: ")])


# ---------------------------------------------------------------- scoring

PROBLEM = {"question": "eval 3+4*2", "answer": "4*2=8,3+8=11\n#### 11", "final": "11"}


@pytest.mark.parametrize(
    "generated, exact, final",
    [
        ("4*2=8,3+8=11\n#### 11", True, True),
        ("4*2=8,3+8=11\n#### 11<|eos|><|eos|><|pad|>", True, True),
        ("4*2=8,3+8=11\n#### 11\n\nQ: eval 1+1\nA: 1+1=2", True, True),
        ("4*2=8,3+8=11\n#### 11\njunk", True, True),
        ("4*2=9,3+8=11\n#### 11", False, True),
        ("4*2=8,3+8=11\n#### 12", False, False),
        ("4*2=8,3+8=11\n#### 110", False, False),
        ("4*2=8,3+8=11 #### 11", False, False),
        ("4*2=8\n\n#### 11", False, False),
        ("", False, False),
    ],
)
def test_score(generated, exact, final):
    assert score(PROBLEM, generated) == {"exact_match": exact, "final_match": final}


def test_extract_final():
    assert extract_final("x\n#### 1,2,3\n#### 4") == "1,2,3"
    assert extract_final("#### abc<|eos|>") == "abc"
    assert extract_final("no marker") is None


def test_every_reference_answer_scores_perfectly():
    for p in read_jsonl(HELDOUT_FILE):
        assert score(p, p["answer"] + "<|eos|>") == {"exact_match": True, "final_match": True}


# ---------------------------------------------------------------- data file & command


def test_generate_is_byte_identical_and_atomic(tmp_path):
    main(["generate", "--out", str(tmp_path / "a"), "--heldout", "40", "--seed", "3"])
    main(["generate", "--out", str(tmp_path / "a"), "--heldout", "40", "--seed", "3"])
    generate_data(tmp_path / "b", 40, 3)
    a, b = (tmp_path / d / "heldout.jsonl" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["heldout.jsonl"]  # no temp file left


def test_committed_heldout_matches_the_command(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "dare_pipeline.evaluation.suite", "generate", "--out", str(tmp_path), "--heldout", "500", "--seed", "1234"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "heldout.jsonl").read_bytes() == HELDOUT_FILE.read_bytes()


def test_committed_heldout_records():
    records = read_jsonl(HELDOUT_FILE)
    assert len(records) == 500
    assert Counter(r["family"] for r in records) == dict.fromkeys(FAMILY_NAMES, 125)
    pools = {f: {p["id"]: p for p in shot_pool(SEED, f)} for f in FAMILY_NAMES}
    for r in records:
        assert set(r) == {"id", "family", "question", "answer", "final", "shots", "prompt"}
        assert is_heldout(r["question"])
        shots = [pools[r["family"]][i] for i in r["shots"]]  # shot ids resolve in the train pool
        assert r["prompt"] == format_prompt(r, shots)
