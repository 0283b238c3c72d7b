"""The command line: generate (text, ids, chat, prompt files, --json, --set, batches), plugins, recipe check,
--version, errors."""

import importlib.metadata
import io
import json
from pathlib import Path

import pytest
import yaml

from dare_pipeline import Recipe, load_model
from dare_pipeline.cli import main
from dare_pipeline.models.default import EMBEDDED

GOLDEN_ARGS = ["--set", "generation.gen_length=32", "--set", "generation.steps=32"]


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


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


PYTHONWIZARD = "Q: reverse pythonwizard\nA: "


def test_generate_needs_no_recipe_and_the_model_chooses_the_length(capsys):
    # the baseline recipe, and the embedded model's generation_config.json: 64 tokens, one per step
    assert main(["generate", PYTHONWIZARD, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == ["#### draziwnohtyp"] and out["stats"]["nfe"] == 64
    assert len(out["sequences"][0]) == len(PYTHONWIZARD) + 64
    # --max-tokens: the answer length; steps follow it
    assert main(["generate", PYTHONWIZARD, "--json", "--max-tokens", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["nfe"] == 32 and len(out["sequences"][0]) == len(PYTHONWIZARD) + 32
    assert main(["generate", PYTHONWIZARD, "--max-tokens", "32", "--set", "generation.gen_length=64"]) == 2
    assert "--max-tokens 32 and --set generation.gen_length=64 both set gen_length: give one" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_help_names_the_default_recipe_and_max_tokens(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the baseline recipe, as recipes/baseline.yaml" in text and "--max-tokens N" in text


def test_text_prompt_without_tokenizer_is_a_clear_error(golden_dir, capsys):
    assert main(["generate", "hello", "--recipe", "recipes/baseline.yaml", "--model",
                 str(golden_dir / "llada"), *GOLDEN_ARGS]) == 2
    assert "has no tokenizer; pass token ids" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("generation.gen_length=48", "gen_length = 48 (recipes/baseline.yaml override) is not a multiple of block_length = 32 "
                                 "(" + str(EMBEDDED["default"] / "generation_config.json") + ")"),
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


EMBEDDED_ARGS = ["--recipe", "recipes/baseline.yaml", "--set", "generation.gen_length=64", "--set",
                 "generation.steps=64", "--no-progress"]


def test_version_is_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dare-pipeline {importlib.metadata.version('dare-pipeline')}"


def test_generate_wraps_a_plain_question_for_the_embedded_model(capsys):
    assert main(["generate", "add 3+4+5+6", *EMBEDDED_ARGS]) == 0
    captured = capsys.readouterr()
    assert captured.out == "3+4=7,7+5=12,12+6=18\n#### 18\n"
    assert "note:" not in captured.err


def test_generate_no_chat_says_why_the_answer_is_empty_or_nonsense(capsys):
    assert main(["generate", "add 12+34", "Q: add 3+4+5+6\nA: ", "--no-chat", *EMBEDDED_ARGS]) == 0
    captured = capsys.readouterr()
    assert captured.out == "--- [0]\n\n--- [1]\n3+4=7,7+5=12,12+6=18\n#### 18\n"
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert notes == [("note: 'add 12+34' is not in this model's prompt format 'Q: <question>\\nA: ' (docs/tasks.md), "
                      "so its answer is empty or nonsense; without --no-chat (chat=False) its chat template adds it")]


def test_generate_reads_jsonl_prompts_from_stdin(capsys, monkeypatch):
    lines = [json.dumps([{"role": "user", "content": "reverse pythonwizard"}]),
             json.dumps({"prompt": "Q: add 3+4+5+6\nA: "}),
             json.dumps({"messages": [{"role": "user", "content": "sort c,m,k,u,h,x,n,f"}]}),
             json.dumps("eval 3+8+9-5")]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["generate", "--prompts", "-", "--json", *EMBEDDED_ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == [
        "#### draziwnohtyp", "3+4=7,7+5=12,12+6=18\n#### 18", "#### c,f,h,k,m,n,u,x", "3+8=11,11+9=20,20-5=15\n#### 15"]


def test_generate_reads_one_prompt_per_line_after_the_command_line_ones(capsys, tmp_path):
    (tmp_path / "prompts.txt").write_text("reverse pythonwizard\n\nadd 3+4+5+6\n")
    assert main(["generate", "sort c,m,k,u,h,x,n,f", "--prompts", str(tmp_path / "prompts.txt"), *EMBEDDED_ARGS]) == 0
    assert capsys.readouterr().out == ("--- [0]\n#### c,f,h,k,m,n,u,x\n--- [1]\n#### draziwnohtyp\n"
                                       "--- [2]\n3+4=7,7+5=12,12+6=18\n#### 18\n")


def test_generate_bad_prompts_file_names_the_line(capsys, tmp_path):
    (tmp_path / "p.jsonl").write_text('"add 1+2"\n{"prompt": \n')
    assert main(["generate", "--prompts", str(tmp_path / "p.jsonl"), *EMBEDDED_ARGS]) == 2
    assert f"{tmp_path / 'p.jsonl'}:2: not JSON" in capsys.readouterr().err


def test_recipe_check_reports_every_file_and_every_error(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation: {gen_length: 0, colour: red}\ndtype: float8\n")
    assert main(["recipe", "check", "recipes/baseline.yaml", str(bad), "recipes/dual_cache_threshold.yaml"]) == 2
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["recipes/baseline.yaml",
                                                                          "recipes/dual_cache_threshold.yaml"]
    errors = captured.err.splitlines()
    assert len(errors) == 3 and all(e.startswith(f"dare-pipeline: error: {bad}: ") for e in errors)
    assert any("generation.colour: unknown key" in e for e in errors)
    assert any("gen_length = 0: must be >= 1" in e for e in errors)
    assert any("dtype = 'float8': allowed values" in e for e in errors)


def test_recipe_check_print_gives_the_resolved_recipes_as_yaml(capsys, default_model):
    paths = sorted(str(p) for p in Path("recipes").glob("*.yaml"))
    assert main(["recipe", "check", *paths, "--print", "--set", "generation.seed=7"]) == 0
    captured = capsys.readouterr()
    docs = list(yaml.safe_load_all(captured.out))
    assert len(docs) == len(paths) and all(d["generation"]["seed"] == 7 for d in docs)
    for path, doc in zip(paths, docs):  # as they decode on their model: the embedded one chooses the length
        assert Recipe.from_dict(doc) == Recipe.from_yaml(path, overrides=["generation.seed=7"]).for_model(default_model)
        assert "execution" in doc and "max_steps_per_block" in doc["generation"]  # defaults filled in
        assert (doc["generation"]["gen_length"], doc["generation"]["block_length"], doc["generation"]["steps"]) == \
            (64, 32, 64)
    assert len(captured.err.splitlines()) == len(paths) and ": ok" in captured.err


def test_plugins_show_a_description_and_conflicts(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(r["description"] and "\n" not in r["description"] for r in rows.values())
    assert rows["dare_o"]["description"].startswith("DARE-O: reuse a row's cached attention output")
    assert set(rows["dllm_cache"]["conflicts"]) == {"prefix_cache", "dual_cache", "dare_kv", "dare_o", "ffn_reuse"}
    assert set(rows["dual_cache"]["conflicts"]) == {"dllm_cache"}  # declared by dllm_cache only
    assert rows["baseline"]["conflicts"] == {}
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "  DARE-O: reuse a row's cached attention output" in text
    assert "  conflicts: dllm_cache\n" in text and "  conflicts: -\n" in text
