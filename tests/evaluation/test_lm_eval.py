"""Accuracy through lm-eval: the `dare` model, the offline dare_* tasks, `dare-pipeline eval` and
lm-eval's own CLI (through the wrapper). A tiny random LLaDA with the project's character tokenizer
stands in for a trained model, so accuracies are ~0 here; what is checked is the plumbing."""

import json
import math
import re
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from dare_pipeline.cli import main
from dare_pipeline.config.recipe import Recipe
from dare_pipeline.evaluation import SUITE_TASKS, TASKS_DIR
from dare_pipeline.evaluation.lm_eval_cli import with_include_path
from dare_pipeline.evaluation.lm_eval_model import DareLM, build_recipe, cut_at_stops
from dare_pipeline.plugin_kit.testing import save_tiny_suite_checkpoint

ROOT = Path(__file__).parents[2]
GEN = {"gen_length": 32, "steps": 32, "block_length": 32}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_suite_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def lm(tiny_dir):
    return DareLM(model=str(tiny_dir), **GEN)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def heldout(n=4):
    with open(TASKS_DIR / "heldout.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


def gen_request(context, **gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


# ---- tasks --------------------------------------------------------------------------------------

def test_task_yamls_load_offline(no_network):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(SUITE_TASKS) | {"dare_suite"} <= set(manager.all_tasks)
    tasks = manager.load(["dare_suite"])["tasks"]
    assert sorted(tasks) == sorted(SUITE_TASKS)
    first = heldout(4)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        family = name.removeprefix("dare_")
        assert len(docs) == 125 and all(d["family"] == family for d in docs)
        expected = next(p for p in first if p["family"] == family)
        assert task.doc_to_text(docs[0]) == expected["prompt"]
        assert task.doc_to_target(docs[0]) == expected["answer"]
        assert task.config.generation_kwargs["until"] == ["\n\n"]
        assert task.config.num_fewshot == 0 and task.OUTPUT_TYPE == "generate_until"


def test_process_results_uses_the_suite_score():
    from dare_pipeline.evaluation.tasks.utils import process_results

    doc = heldout(1)[0]
    assert process_results(doc, [doc["answer"] + "\n\nQ: next"]) == {"exact_match": 1.0, "final_match": 1.0}
    wrong_steps = "x\n#### " + doc["final"]
    assert process_results(doc, [wrong_steps]) == {"exact_match": 0.0, "final_match": 1.0}
    assert process_results(doc, ["garbage"]) == {"exact_match": 0.0, "final_match": 0.0}


# ---- the model: construction ---------------------------------------------------------------------

def test_model_args_string_shortcuts_and_set(tiny_dir):
    lm = DareLM.create_from_arg_string(f"model={tiny_dir},gen_length=64,block_length=32,steps=64,"
                                       "set=generation.seed=3;generation.temperature=0.5",
                                       {"batch_size": "4", "device": "cuda:0"})
    g = lm.recipe.generation
    assert (g.gen_length, g.block_length, g.steps, g.seed, g.temperature) == (64, 32, 64, 3, 0.5)
    assert lm.batch_size == 4
    assert lm.recipe.model == str(tiny_dir)
    if not torch.cuda.is_available():  # lm-eval's CLI passes cuda:0 by default
        assert lm.recipe.device == "cpu" and lm.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown model_args"):
        DareLM(model=str(tiny_dir), colour=1)


def test_default_recipe_is_the_baseline_recipe():
    assert build_recipe(None) == Recipe.from_yaml(ROOT / "recipes" / "baseline.yaml")
    recipe = build_recipe(ROOT / "recipes" / "baseline.yaml", ["generation.seed=7"], gen_length=64)
    assert (recipe.generation.gen_length, recipe.generation.seed) == (64, 7)


def test_checkpoint_without_tokenizer_is_a_clear_error(golden_dir):
    with pytest.raises(ValueError, match="has no tokenizer"):
        DareLM(model=str(golden_dir / "llada"), **GEN)


def test_chat_template_is_the_tokenizer_one(lm):
    chat = [{"role": "user", "content": "add 1+2"}, {"role": "assistant", "content": "1+2=3\n#### 3"},
            {"role": "user", "content": "add 2+2"}]
    assert lm.apply_chat_template(chat) == "Q: add 1+2\nA: 1+2=3\n#### 3\n\nQ: add 2+2\nA: "
    assert lm.chat_template(True) == lm.tokenizer.chat_template
    assert lm.tokenizer_name


# ---- generate_until -------------------------------------------------------------------------------

def test_sampling_kwargs_apply_only_when_the_task_samples(lm):
    kwargs = {"until": ["\n\n"], "temperature": 0.7, "top_p": 0.9, "top_k": 5, "steps": 32}
    assert lm._generation_overrides({**kwargs, "do_sample": True}) == (
        {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "steps": 32}, ["\n\n"])
    for greedy in ({"do_sample": False}, {}):  # transformers ignores them too
        assert lm._generation_overrides({**kwargs, **greedy}) == ({"steps": 32}, ["\n\n"])


def test_cut_at_stops_takes_the_earliest():
    assert cut_at_stops("abc\n\nQ: x", ["\n\n"]) == "abc"
    assert cut_at_stops("a;b,c", [",", ";"]) == "a"
    assert cut_at_stops("abc", ["", "z"]) == "abc"


def test_generate_until_cuts_at_stop_strings(lm):
    prompt = heldout(1)[0]["prompt"]
    raw = lm.generate_until([gen_request(prompt, until=[])])[0]
    assert len(raw) >= 8, raw
    early, late = raw[2:4], raw[6:8]
    got = lm.generate_until([gen_request(prompt, until=[late, early]),
                             gen_request(prompt, until=[late]),
                             gen_request(prompt, until="\x7f never")])
    assert got[0] == raw[: min(raw.index(early), raw.index(late))]
    assert got[1] == raw[: raw.index(late)]
    assert got[2] == raw  # a string `until` is one stop string


def test_batching_gives_the_same_outputs(tiny_dir):
    prompts = [p["prompt"] for p in heldout(4)]
    single = DareLM(model=str(tiny_dir), batch_size=1, **GEN)
    batched = DareLM(model=str(tiny_dir), batch_size=4, **GEN)
    requests = [gen_request(p, until=["\n\n"], do_sample=False) for p in prompts]
    assert batched.generate_until(requests) == single.generate_until(requests)
    assert (single.stats.batches, batched.stats.batches) == (4, 1)
    assert single.stats.requests == batched.stats.requests == 4
    assert single.stats.to_dict()["nfe_per_request"] == batched.stats.to_dict()["nfe_per_request"] == 32
    assert (single.stats.nfe_total, batched.stats.nfe_total) == (128, 32)


def test_gen_kwargs_groups_keep_request_order(lm):
    prompts = [p["prompt"] for p in heldout(3)]
    mixed = [gen_request(prompts[0], until=["\n\n"]), gen_request(prompts[1], until=["\n\n"], steps=16),
             gen_request(prompts[2], until=["\n\n"])]
    alone = [lm.generate_until([r])[0] for r in mixed]
    assert lm.generate_until(mixed) == alone


# ---- likelihoods ------------------------------------------------------------------------------------

def test_loglikelihood_of_one_token_is_exact(lm):
    context, continuation = "Q: add 1+2\nA:", "3"
    ids = lm.tok_encode(context)
    target = lm.tok_encode(continuation)[0]
    x = torch.tensor([ids + [lm.config.mask_token_id]])
    logp = torch.log_softmax(lm.model(x)[0, -1].float(), -1)
    [(ll, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    assert ll == pytest.approx(float(logp[target]), abs=1e-4)
    assert greedy == (int(logp.argmax()) == target)


def test_loglikelihood_monte_carlo_estimates_the_elbo(tiny_dir):
    lm = DareLM(model=str(tiny_dir), mc_samples=400, mc_batch_size=100, **GEN)
    ctx, (a, b) = lm.tok_encode("Q: sort 3,1\nA:"), lm.tok_encode("#1")
    m = lm.config.mask_token_id

    def ce(seq, pos, tok):
        return -float(torch.log_softmax(lm.model(torch.tensor([ctx + seq]))[0, len(ctx) + pos].float(), -1)[tok])

    # L=2: half the samples mask one token (weight 2), half both (weight 1)
    one_a, one_b = ce([m, b], 0, a), ce([a, m], 1, b)
    exact = -(0.5 * (one_a + one_b) + 0.5 * (ce([m, m], 0, a) + ce([m, m], 1, b)))
    ll, _ = lm.score_continuation(ctx, [a, b])
    assert ll < 0 and math.isfinite(ll)
    assert ll == pytest.approx(exact, abs=4 * abs(one_a - one_b) / 200 ** 0.5 + 1e-3)
    assert lm.score_continuation(ctx, [a, b]) == (ll, _)  # seeded: reproducible


def test_loglikelihood_rolling_is_the_whole_string_score(lm):
    text = "Q: reverse abc\nA: #### cba"
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    expected, _ = lm.score_continuation([lm.prefix_token_id], lm.tok_encode(text))
    assert total == pytest.approx(expected) and total < 0


# ---- the runners ------------------------------------------------------------------------------------

def _bars(err: str) -> list[str]:
    """The tqdm frames written to stderr."""
    return [frame for frame in re.split(r"[\r\n]", err) if "%|" in frame]


def test_eval_command_writes_results_json(tiny_dir, tmp_path, capsys, caplog, no_network):
    out = tmp_path / "results.json"
    # without --recipe: the baseline recipe; --max-tokens sets gen_length, and steps follow it
    code = main(["eval", "--model", str(tiny_dir), "--tasks", "dare_add,dare_sort", "--limit", "2",
                 "--batch-size", "2", "--max-tokens", "32", "--output", str(out), "--log-samples"])
    assert code == 0
    captured = capsys.readouterr()
    assert "dare_add" in captured.out
    # lm-eval's warnings and progress bars stay away (not --verbose), and stderr is no terminal here
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")] and not _bars(captured.err)
    doc = json.loads(out.read_text())
    assert {"schema", "tasks", "groups", "recipe", "decoding", "versions", "hardware", "eval", "model",
            "samples"} <= set(doc)
    assert set(doc["tasks"]) == {"dare_add", "dare_sort"}
    for row in doc["tasks"].values():
        assert row["n"] == 2 and row["n_total"] == 125
        assert 0.0 <= row["exact_match"] <= 1.0 and 0.0 <= row["final_match"] <= 1.0
    assert doc["recipe"]["name"] == "baseline" and doc["recipe_source"] == "<the baseline recipe>"
    assert [doc["recipe"]["generation"][k] for k in ("gen_length", "block_length", "steps")] == [32, 32, 32]
    d = doc["decoding"]
    assert (d["requests"], d["batches"], d["nfe_total"], d["nfe_per_request"]) == (4, 2, 64, 32)
    assert d["generated_tokens"] > 0 and d["tokens_per_second"] > 0 and d["wall_time_s"] > 0
    assert doc["versions"]["lm_eval"] and doc["versions"]["torch"] and doc["hardware"]["device"] == "cpu"
    assert [s["id"] for s in doc["samples"]["dare_add"]] == ["add-000000", "add-000001"]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_eval_verbose_lets_lm_eval_speak_and_a_terminal_gets_the_decoding_bar(tiny_dir, capsys, caplog,
                                                                              monkeypatch, no_network):
    from lm_eval import evaluator

    from dare_pipeline.evaluation import run

    env_reports = []  # lm-eval's `pip list` report: ours has its own versions, with or without --verbose
    monkeypatch.setattr(evaluator, "add_env_info", env_reports.append)
    argv = ["eval", "--model", str(tiny_dir), "--tasks", "dare_add", "--limit", "1", "--max-tokens", "32"]
    assert main([*argv, "--verbose"]) == 0
    err = capsys.readouterr().err
    assert [r for r in caplog.records if r.name.startswith("lm_eval") and r.levelname == "WARNING"]
    bars = _bars(err)
    assert any("dare generate_until" in b for b in bars) and any("dare generate_until" not in b for b in bars)
    caplog.clear()
    monkeypatch.setattr(run, "_on_a_terminal", lambda: True)
    assert main(argv) == 0  # on a terminal: the decoding's bar only
    bars = _bars(capsys.readouterr().err)
    assert bars and all("dare generate_until" in b for b in bars)
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")]
    assert env_reports == []


def test_eval_command_unknown_suite_task_is_a_clear_error(tiny_dir, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "dare_ad", "--limit", "1"]) == 2
    assert "unknown task(s) ['dare_ad']" in capsys.readouterr().err


def test_lm_eval_own_cli_through_the_wrapper(tiny_dir, monkeypatch, capsys, no_network):
    from lm_eval.tasks import manager

    from dare_pipeline.evaluation import lm_eval_cli

    # lm-eval's CLI indexes its ~15k built-in task YAMLs (about 15 s); skip them in this test
    original = manager.TaskManager.__init__
    monkeypatch.setattr(manager.TaskManager, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "include_defaults": False}))
    lm_eval_cli.main(["--model", "dare", "--model_args", f"model={tiny_dir},gen_length=32,steps=32",
                      "--tasks", "dare_suite", "--limit", "1", "--device", "cpu"])
    table = capsys.readouterr().out
    assert "dare_suite" in table and "exact_match" in table and "dare_expr" in table


def test_wrapper_adds_our_include_path_once():
    assert with_include_path(["--model", "dare"], "/t") == ["--model", "dare", "--include_path", "/t"]
    assert with_include_path(["ls", "tasks"], "/t") == ["ls", "tasks", "--include_path", "/t"]
    assert with_include_path(["--include_path", "/mine"], "/t") == ["--include_path", "/mine"]
    assert with_include_path(["--help"], "/t") == ["--help"]


def test_lm_eval_results_json_has_the_decoding_stats_and_the_recipe_name(tiny_dir, tmp_path, monkeypatch, capfd,
                                                                         no_network):
    from lm_eval.tasks import manager

    from dare_pipeline.evaluation import lm_eval_cli

    original = manager.TaskManager.__init__
    monkeypatch.setattr(manager.TaskManager, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "include_defaults": False}))
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's git lookup must stay quiet
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("name: my_fast_recipe\nplugins: [{name: prefix_cache}]\n")
    lm_eval_cli.main(["--model", "dare", "--model_args", f"recipe={recipe},model={tiny_dir},gen_length=32,steps=32",
                      "--tasks", "dare_add", "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert "not a git repository" not in err and "fatal:" not in err, err
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert [f.parent.name for f in files] == ["my_fast_recipe"]  # named after the recipe, not a random id
    doc = json.loads(files[0].read_text())
    assert doc["model_name"] == "my_fast_recipe"
    d = doc["config"]["dare_decoding"]
    assert d["requests"] == 2 and d["nfe_total"] == 64 and d["tokens_per_second"] > 0 and d["decode_cpu_s"] > 0
    assert d["flops"]["total"] == sum(d["flops"][k] for k in ("q", "kv", "attn", "ffn", "v", "lm_head")) > 0
    assert d["plugins"]["prefix_cache"]["cached_rows_read"] > 0  # the plugin's own counters
    assert doc["git_hash"] is None
