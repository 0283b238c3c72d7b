"""Data parallelism over prompts: `dare-pipeline eval` and `dare-pipeline ablate --data-parallel`
launched with torchrun as 2 CPU processes (gloo) give what one process gives: the same answers and
accuracy, the decoding counters summed over the ranks. The launch runs both commands in the same
two processes (one start-up for both); the 1-process references run in this process.

limit 3 over 2 ranks: rank 0 gets 2 problems per task, rank 1 gets 1 and lm-eval pads it with a
copy, which must be neither decoded again nor counted. The ablation's first run resumes from a
journal that one interrupted process left: each rank takes the batches recorded there, whichever
process decoded them."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from dare_pipeline.cli import main
from dare_pipeline.evaluation.ablation.measure import RunStats
from dare_pipeline.evaluation.lm_eval_model import (
    DareLM,
    DecodingStats,
    padding_positions,
)
from dare_pipeline.evaluation.run import evaluate
from dare_pipeline.plugin_kit.testing import save_tiny_suite_checkpoint

GEN_SET = ["generation.gen_length=32", "generation.steps=32", "generation.block_length=16"]
EQUAL_DECODING = ("requests", "batches", "nfe_total", "nfe_per_request", "steps", "generated_tokens",
                  "generated_tokens_per_request", "plugins", "loglikelihood_requests")
TIMES = ("tokens_per_second", "decode_time_s", "decode_cpu_s", "generate_wall_time_s", "eval_wall_time_s", "ranks")
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")

DRIVER = """
import json, sys
from dare_pipeline.cli import main
code = main(json.loads(sys.argv[1]))
sys.exit(code or main(json.loads(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_suite_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def eval_args(tiny_dir, output):
    args = ["eval", "--model", str(tiny_dir), "--tasks", "dare_add,dare_sort", "--limit", "3", "--threads", "1",
            "--log-samples", "--output", str(output)]
    for s in GEN_SET:
        args += ["--set", s]
    return args


def ablation_file(directory, tiny_dir):
    path = directory / "dp.yaml"
    path.write_text(yaml.safe_dump({"name": "dp", "model": str(tiny_dir), "tasks": ["dare_add"], "limit": 3,
                                    "repeats": 0, "set": GEN_SET, "plugins": {"subsets_of": ["prefix_cache"]}}))
    return path


@pytest.fixture(scope="module")
def launched(tiny_dir, tmp_path_factory):
    """torchrun --nproc-per-node 2 --standalone: eval, then ablate --data-parallel, in the same two processes."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dp2")
    driver = out / "driver.py"
    driver.write_text(DRIVER)
    ablate = ["ablate", str(ablation_file(out, tiny_dir)), "--output", str(out / "dp.jsonl"), "--data-parallel",
              "--quiet"]
    _interrupt_after_two_problems(out / "dp.yaml", out / "dp.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(driver), json.dumps(eval_args(tiny_dir, out / "eval.json")), json.dumps(ablate)],
                          env=env, cwd=out, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def _interrupt_after_two_problems(path, output):
    """One process starts the ablation and is interrupted at its third problem: its first run's
    journal holds two decoded problems and the results file nothing."""
    from dare_pipeline.evaluation.ablation import Ablation
    from dare_pipeline.evaluation.ablation.runner import run_ablation
    from dare_pipeline.execution.lifecycle import Interrupted

    real, calls = DareLM._decode_batch, []

    def decode(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DareLM, "_decode_batch", decode)
        with pytest.raises(Interrupted):
            run_ablation(Ablation.from_yaml(path), output, quiet=True)
    assert not output.exists() and len(list(output.with_suffix(".partial").glob("*/rank0.jsonl"))) == 1


def test_eval_on_two_ranks_equals_one_process(launched, tiny_dir, tmp_path, capsys):
    out, stdout = launched
    assert main(eval_args(tiny_dir, tmp_path / "one.json")) == 0
    capsys.readouterr()
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((out / "eval.json").read_text())
    assert stdout.count(f"results: {out / 'eval.json'}") == 1  # rank 0 alone reports and writes
    assert two["tasks"] == one["tasks"] and two["groups"] == one["groups"]
    assert [r["n"] for r in two["tasks"].values()] == [3, 3]
    assert two["samples"] == one["samples"]  # same answers, in problem order
    for key in EQUAL_DECODING:
        assert two["decoding"][key] == one["decoding"][key], key
    assert (one["decoding"]["requests"], one["decoding"]["nfe_total"]) == (6, 6 * 32)  # padding not counted
    assert (one["decoding"]["ranks"], two["decoding"]["ranks"]) == (1, 2)
    assert two["decoding"]["decode_time_s"] > 0 and two["decoding"]["tokens_per_second"] > 0
    assert two["hardware"]["ranks"] == 2 and "ranks" not in one["hardware"]


def test_ablate_data_parallel_equals_one_process(launched, tiny_dir, tmp_path, capsys):
    out, stdout = launched
    path = ablation_file(tmp_path, tiny_dir)
    assert main(["ablate", str(path), "--output", str(tmp_path / "one.jsonl"), "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (out / "dp.jsonl").read_text().splitlines()]
    assert not list(out.glob("dp.rank*"))  # one results file, written by rank 0
    assert (out / "dp" / "report.md").is_file()  # and rank 0 wrote the report
    assert stdout.count("2 runs in this shard") == 1
    assert [r["key"] for r in two] == [r["key"] for r in one] and len(one) == 2
    for a, b in zip(one, two):
        assert b["status"] == "ok", b.get("error")
        assert b["accuracy"] == a["accuracy"] and b["reuse"] == a["reuse"]
        for key, value in a["metrics"].items():
            if key not in TIMES + ("resumed_requests",):
                assert b["metrics"][key] == value, key
        assert a["metrics"]["requests"] == 3 and (a["metrics"]["ranks"], b["metrics"]["ranks"]) == (1, 2)
        assert b["hardware"]["ranks"] == 2 and b["memory"]["ranks"] == 2
    # the first run took the two problems the interrupted process decoded; the journal is gone
    assert [r["metrics"]["resumed_requests"] for r in two] == [2, 0]
    assert [r["metrics"]["resumed_requests"] for r in one] == [0, 0]
    assert not (out / "dp.partial").exists()


# ---- without a launch -----------------------------------------------------------------------------

def test_padding_copies_are_found_by_identity():
    a, b = (Instance("generate_until", {}, (c, {}), i, metadata=("t", i, 1)) for i, c in enumerate("ab"))
    assert padding_positions([a, b]) == {}
    assert padding_positions([a, b, b, b]) == {2: 1, 3: 1}
    c = Instance("generate_until", {}, ("c", {}), 2, metadata=("t", 2, 2))
    assert padding_positions([a, c, c]) == {}  # repeats are not padding
    assert padding_positions([a, c, c, c, c]) == {3: 1, 4: 1}


def test_stats_merge_sums_counts_and_takes_the_slowest_time():
    one = DecodingStats(requests=2, batches=2, nfe_total=64, nfe_request_sum=64, generated_tokens=10,
                        decode_time_s=1.0, wall_time_s=1.5, plugin_counts={"p": {"hits": 3}},
                        plugin_minima={"p": {"min_margin": 0.25}})
    two = DecodingStats(requests=1, batches=1, nfe_total=32, nfe_request_sum=32, generated_tokens=7,
                        decode_time_s=2.0, wall_time_s=2.5, plugin_counts={"p": {"hits": 1, "misses": 2}},
                        plugin_minima={"p": {"min_margin": 0.125}})
    merged = one.merged([one.counters(), two.counters()])
    d = merged.to_dict()
    assert (d["requests"], d["batches"], d["nfe_total"], d["generated_tokens"]) == (3, 3, 96, 17)
    assert (d["decode_time_s"], d["wall_time_s"], d["ranks"]) == (2.0, 2.5, 2)
    assert d["plugins"] == {"p": {"hits": 4, "misses": 2, "min_margin": 0.125}}
    assert d["tokens_per_second"] == round(17 / 2.0, 3)
    assert one.requests == 2  # merged is a copy


def test_plugin_numbers_are_summed_averaged_or_least_by_what_they_are():
    """Over the batches of an eval: counts add up, fractions and settings are averaged per prompt (a
    reuse fraction summed over 13 batches read above 1), a `min_...` is the least."""
    stats = DecodingStats()
    batches = [(2, {"rows_reused": 10, "reuse_fraction": 0.5, "threshold": 0.1, "row_budget": 0.25,
                    "reused_over_budget": 3, "min_verify_margin": 0.03, "margin_listed": None}),
               (1, {"rows_reused": 4, "reuse_fraction": 0.8, "threshold": 0.1, "row_budget": 0.25,
                    "reused_over_budget": 1, "min_verify_margin": 0.01})]
    for size, report in batches:
        stats.add(SimpleNamespace(nfe=4, steps=4, total_generated=3, wall_time_s=0.5, plugins={"dare_o": report}),
                  size, wall=0.5)
    assert stats.to_dict()["plugins"] == {"dare_o": {
        "rows_reused": 14, "reuse_fraction": pytest.approx((0.5 * 2 + 0.8) / 3), "threshold": pytest.approx(0.1),
        "row_budget": pytest.approx(0.25), "reused_over_budget": 4, "min_verify_margin": 0.01}}


def test_run_stats_merge_keeps_weighted_means_and_local_fields():
    def progress(done, total):
        return None

    a = RunStats(config="cfg", progress=progress, flops={"q": 10, "total": 30}, rows={"q": 1},
                 plugin_mean_sums={"p": {"reuse_fraction": 0.5 * 2}}, plugin_weights={"p": {"reuse_fraction": 2}})
    b = RunStats(config="other", flops={"q": 5, "total": 15}, rows={"q": 2},
                 plugin_mean_sums={"p": {"reuse_fraction": 0.8 * 1}}, plugin_weights={"p": {"reuse_fraction": 1}})
    assert "config" not in a.counters() and "progress" not in a.counters()
    merged = a.merged([a.counters(), b.counters()])
    assert merged.config == "cfg" and merged.progress is progress
    assert merged.flops == {"q": 15, "total": 45} and merged.rows == {"q": 3}
    assert merged.plugin_summary()["p"]["reuse_fraction"] == pytest.approx((0.5 * 2 + 0.8) / 3)


def test_a_process_alone_under_a_launcher_gets_its_results(tiny_dir, monkeypatch):
    """One shard of runs per rank (the ablation's default under torchrun): data_parallel=false, and
    lm-eval's LOCAL_RANK == 0 guard must not swallow the results of rank 1."""
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    lm = DareLM(model=str(tiny_dir), data_parallel="false", gen_length=32, steps=32, block_length=16)
    assert (lm.rank, lm.world_size) == (0, 1)
    doc = evaluate(["dare_add"], lm=lm, limit=1)
    assert doc is not None and doc["tasks"]["dare_add"]["n"] == 1 and doc["decoding"]["ranks"] == 1
    assert os.environ["LOCAL_RANK"] == "1"


def test_a_limit_below_the_ranks_is_refused_before_running():
    class TwoRanks:
        world_size = 2

    with pytest.raises(ValueError, match="--limit 1 gives some of the 2 data-parallel processes no problem"):
        evaluate(["dare_add"], lm=TwoRanks(), limit=1)


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0_alone_says_what_an_interrupted_data_parallel_ablation_kept(rank, tmp_path, tiny_dir, capsys,
                                                                         monkeypatch):
    """Rank 0 reads the results file and journals; another rank's line could only be wrong."""
    from dare_pipeline.evaluation import distributed
    from dare_pipeline.evaluation.ablation import runner

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    for k, v in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "init", lambda device: (rank, 2))  # no process group: the collectives
    monkeypatch.setattr(runner, "_select_on_rank0", lambda runs, *args: (list(runs), [], []))  # as one rank
    monkeypatch.setattr(runner, "_together", lambda data_parallel, what, fn: fn())  # sees them
    monkeypatch.setattr(runner, "execute_run", interrupt)
    path = ablation_file(tmp_path, tiny_dir)
    assert main(["ablate", str(path), "--data-parallel", "--output", str(tmp_path / "o.jsonl"), "--quiet"]) == 130
    expected = "dare-pipeline: interrupted; 0 of 2 runs recorded, rerun to resume\n" if rank == 0 else ""
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize("options, says", [
    (["--limit", "1"], "limit 1 gives some of the 2 data-parallel processes no problem; use a limit of at least 2"),
    (["--repeats", "1", "--timing-limit", "1"],
     "timing_limit 1 gives some of the 2 data-parallel processes no problem; use a timing_limit of at least 2")])
def test_a_data_parallel_ablation_with_a_pass_too_small_for_its_ranks_stops_before_any_run(
        options, says, tmp_path, tiny_dir, capsys, monkeypatch):
    """Under 2 ranks, a limit or (with timed passes) a timing_limit of 1 would leave a rank without a
    problem: refused at once, not after the runs' first passes."""
    from dare_pipeline.evaluation import distributed
    from dare_pipeline.evaluation.ablation import runner

    def run(*args, **kwargs):
        raise AssertionError("no run may start")

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "init", lambda device: (0, 2))  # no process group: the collectives
    monkeypatch.setattr(runner, "_select_on_rank0", lambda runs, *args: (list(runs), [], []))  # as one rank
    monkeypatch.setattr(runner, "_together", lambda data_parallel, what, fn: fn())  # sees them
    monkeypatch.setattr(runner, "execute_run", run)
    path = ablation_file(tmp_path, tiny_dir)
    assert main(["ablate", str(path), "--data-parallel", "--output", str(tmp_path / "o.jsonl"), "--quiet",
                 *options]) == 2
    assert says in capsys.readouterr().err


def test_data_parallel_ablation_needs_a_launcher(tmp_path, tiny_dir, capsys):
    path = ablation_file(tmp_path, tiny_dir)
    assert main(["ablate", str(path), "--data-parallel", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "--data-parallel splits each run's problems over the processes of a launcher" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_data_parallel_model_arg():
    from dare_pipeline.evaluation.lm_eval_model import _parse_data_parallel

    assert [_parse_data_parallel(v) for v in (None, "auto", "true", "False", True, "0")] == \
        [None, None, True, False, True, False]
    with pytest.raises(ValueError, match="data_parallel='sometimes'"):
        _parse_data_parallel("sometimes")
