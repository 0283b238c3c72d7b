"""One contract for every registered plugin (built-in, third-party, added later: it joins automatically).

For each plugin found through the entry-point group, plus the example third-party plugin in
examples/step_logger installed the way tests/core/test_entry_points.py does it:

- exactness: a plugin with `exact_options` decodes, under those options, exactly the tokens and
  commit steps of the same recipe without it (decoding policies, which own `commit_policy`, are the
  decoder being compared and are skipped);
- stats: the generation stats are complete, and a plugin implementing dare_report_stats reports a dict;
- state reset: two generations with one Pipeline give identical outputs and identical plugin stats;
- batch invariance: a batch of left-padded prompts decodes each prompt as alone (tokens, and the
  commit order as per-forward commit sets with empty forwards left out, as in test_cache_property);
- recovery: after a generation that raised part-way (dare_generation_abort), the same Pipeline
  decodes exactly as a fresh one.

Every plugin runs with its default options (plus the exact ones for the exactness check), on tiny
random models of both families.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.registry import available_plugins, registered
from dare_pipeline.stats import SUB_OPS
from dare_pipeline.testing import CrashAtStep, commit_order, random_prompts, tiny_model

torch.set_num_threads(1)

EXAMPLE = Path(__file__).parents[2] / "examples" / "step_logger"
GEN = {"gen_length": 16, "block_length": 8, "steps": 16}
VOCAB = 64


def _install_example(target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(EXAMPLE)], check=True)


@pytest.fixture(scope="module", autouse=True)
def example_plugin(tmp_path_factory):
    """The example third-party plugin, installed into a temporary directory for this module."""
    target = tmp_path_factory.mktemp("site")
    _install_example(target)
    sys.path.insert(0, str(target))
    yield
    sys.path.remove(str(target))
    for mod in [m for m in sys.modules if m.startswith("dare_step_logger")]:
        del sys.modules[mod]


def _plugin_names() -> list[str]:
    # the example's entry point is not visible at collection time (installed by the fixture)
    return sorted(set(available_plugins()) | {"step_logger"})


@functools.cache
def _model(family: str):
    return tiny_model(family, seed=5, d_model=48, n_layers=3, vocab_size=VOCAB)


def _run(family, plugins, prompts, pipe=None):
    pipe = pipe or Pipeline(_model(family), Recipe.from_dict({"generation": GEN, "plugins": plugins}))
    return pipe.generate(prompts), pipe


def _prompts(n=3):
    return random_prompts(n, VOCAB, seed=11, min_len=2, max_len=9, exclude=(VOCAB - 2, VOCAB - 1))


def _cls(name):
    return available_plugins()[name]


FAMILIES = ["llada", "dream"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_exact_options_reproduce_the_recipe_without_the_plugin(name, family):
    cls = _cls(name)
    if cls.exact_options is None or "commit_policy" in cls.provides:
        pytest.skip(f"{name}: no exactness setting (exact_options None) or a decoding policy")
    prompts = _prompts()
    with_it, _ = _run(family, [{"name": name, **cls.exact_options}], prompts)
    without, _ = _run(family, [], prompts)
    assert with_it.sequences == without.sequences
    assert with_it.unmask_step == without.unmask_step


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_stats_are_complete_and_reset_between_generations(name, family):
    prompts = _prompts(2)
    first, pipe = _run(family, [name], prompts)
    second, _ = _run(family, [name], prompts, pipe=pipe)
    stats = first.stats
    assert stats.nfe > 0 and stats.steps == stats.nfe
    assert len(stats.tokens_per_step) == len(prompts)
    assert all(sum(t) == GEN["gen_length"] for t in stats.tokens_per_step)
    assert stats.layer_rows.shape == (_model(family).config.n_layers, len(SUB_OPS)) and int(stats.layer_rows.sum()) > 0
    assert len(stats.generated_tokens) == len(prompts)
    if callable(getattr(_cls(name), "dare_report_stats", None)):
        assert isinstance(stats.plugins.get(name), dict), f"{name} implements dare_report_stats but reported nothing"
    # one Pipeline, two generations: identical outputs and identical plugin stats
    assert second.sequences == first.sequences
    assert second.unmask_step == first.unmask_step
    assert second.stats.plugins == first.stats.plugins
    assert second.stats.nfe == first.stats.nfe


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_batch_decodes_each_prompt_as_alone(name, family):
    prompts = _prompts(3)
    batch, _ = _run(family, [name], prompts)
    for i, prompt in enumerate(prompts):
        alone, _ = _run(family, [name], [prompt])
        assert batch.sequences[i] == alone.sequences[0]
        assert commit_order(batch.unmask_step[i]) == commit_order(alone.unmask_step[0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_an_aborted_generation_leaves_the_pipeline_as_new(name, family):
    prompts = _prompts(2)
    with registered(CrashAtStep):
        pipe = Pipeline(_model(family), Recipe.from_dict({"generation": GEN, "plugins": [name, "crash_at_step"]}))
    crasher = next(p for p in pipe.plugins if p.name == "crash_at_step")
    with pytest.raises(RuntimeError, match="crash at step 2"):
        pipe.generate(prompts)
    crasher.armed = False
    after, _ = _run(family, [name, "crash_at_step"], prompts, pipe=pipe)
    fresh, _ = _run(family, [name], prompts)
    assert after.sequences == fresh.sequences
    assert after.unmask_step == fresh.unmask_step
    assert after.stats.plugins.get(name) == fresh.stats.plugins.get(name)
