"""benchmarks/guided.py: a record per problem and recipe with what ran, a restart that decodes only what
is missing, and a report that compares recipes measured on different numbers of problems on the
problems they share."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def guided(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("guided")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_what_ran_and_a_restart_decodes_only_what_is_missing(guided, tmp_path):
    out = tmp_path / "g.jsonl"
    args = ["--gen-length", "64", "--recipes", "guided + dual_cache", "--out", str(out)]
    assert guided.main([*args, "--limit", "2"]) == 0
    first = _records(out)
    assert [r["id"] for r in first] == ["add-000000", "sort-000000"]
    for r in first:
        assert r["recipe"] == "guided + dual_cache" and r["gen_length"] == 64
        assert 1 <= r["nfe"] <= 2 and r["guide_forwards"] >= r["nfe"]  # at most two blocks; a guide forward each
        assert r["flops_guide"] > 0 and r["flops_diffusion"] > 0 and r["cpu_s"] > 0
    assert guided.main([*args, "--limit", "3"]) == 0
    again = _records(out)
    assert again[:2] == first and [r["id"] for r in again[2:]] == ["reverse-000000"]


def _record(recipe: str, problem: int, exact: bool, nfe: int) -> dict:
    family = ("add", "sort", "reverse", "expr")[problem % 4]
    return {"recipe": recipe, "gen_length": 256, "id": f"{family}-{problem:06d}", "family": family, "exact": exact,
            "final": exact, "nfe": nfe, "guide_forwards": 0, "accepted": 0, "fallbacks": 0, "eos_filled": 0,
            "flops_diffusion": 10**9, "flops_guide": 0, "cpu_s": 1.0, "text": ""}


def test_the_report_compares_a_partial_recipe_on_the_problems_it_shares(guided, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    rows = [_record("dual_cache + threshold", i, i != 3, 10) for i in range(8)]
    rows += [_record("baseline", i, True, 256) for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert guided.main(["--report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "| 256 | baseline | 4 | 100.0 |" in text
    assert "| 256 | dual_cache + threshold | 8 | 87.5 |" in text
    assert "the 4 problems every recipe was measured on" in text
    assert "| dual_cache + threshold | 75.0 | 75.0 | 10.00 |" in text  # 3 of the shared 4
