"""The command line: generate (text, ids, --json, --set, batches), plugins, recipe check, errors."""

import json

import pytest

from dare_pipeline.cli import main

GOLDEN_ARGS = ["--set", "generation.gen_length=32", "--set", "generation.steps=32"]


def test_generate_json_with_prompt_ids(golden_dir, capsys):
    code = main(["generate", "--recipe", "recipes/baseline.yaml", "--model", str(golden_dir / "llada"),
                 "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--json", *GOLDEN_ARGS])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [s[:3] for s in out["sequences"]] == [[1, 2, 3], [4, 5, out["sequences"][1][2]]]
    assert len(out["sequences"][0]) == 3 + 32 and len(out["sequences"][1]) == 2 + 32
    assert out["text"] is None  # no tokenizer in the golden checkpoint
    assert out["stats"]["nfe"] == 32 and len(out["stats"]["layer_rows"]) == 4


def test_generate_prints_answer_and_stats_line(golden_dir, capsys):
    assert main(["generate", "--recipe", "recipes/baseline.yaml", "--model", str(golden_dir / "dream"),
                 "--prompt-ids", "7,8,9", *GOLDEN_ARGS]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().split(",")) == 32
    assert "[baseline] nfe=32" in captured.err


def test_text_prompt_without_tokenizer_is_a_clear_error(golden_dir, capsys):
    assert main(["generate", "hello", "--recipe", "recipes/baseline.yaml", "--model",
                 str(golden_dir / "llada"), *GOLDEN_ARGS]) == 2
    assert "has no tokenizer; pass token ids" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("generation.gen_length=30", "gen_length (30) must be a multiple of block_length (32)"),
    ("generation.colour=1", "generation.colour: unknown key"),
])
def test_bad_override_exits_2_with_message(override, message, capsys):
    assert main(["recipe", "check", "recipes/baseline.yaml", "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_recipe_check_ok(capsys):
    assert main(["recipe", "check", "recipes/baseline.yaml"]) == 0
    assert "recipes/baseline.yaml: ok" in capsys.readouterr().out


def test_plugins_lists_baseline_with_hooks(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["baseline"]["provides"] == ["commit_policy"]
    assert "dare_select_commits" in rows["baseline"]["hooks"]
    assert rows["baseline"]["version"] != "unregistered"


def test_missing_model_directory(capsys, tmp_path):
    assert main(["generate", "--recipe", "recipes/baseline.yaml", "--model", str(tmp_path / "x"),
                 "--prompt-ids", "1"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
