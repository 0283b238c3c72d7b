"""`dare-pipeline plugins new NAME`: an installable package with one reuse plugin that passes its tests.

The package: pyproject.toml (the entry point in the `dare_pipeline` group), the plugin module (an
options class with validators, one LayerReuse owning `attn_rows`, a Plugin), tests/test_contract.py
(the shipped contract) and tests/test_<name>.py (its own behaviour). `examples/input_drift` in the
repository is exactly what `dare-pipeline plugins new input_drift` writes.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from ..core.registry import ENTRY_POINT_GROUP

NAME_RULE = re.compile(r"[a-z][a-z0-9_]*\Z")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A dare-pipeline reuse plugin: reuse a row's attention output while its attention input barely moves."
requires-python = ">=3.10"
dependencies = ["dare-pipeline"]

[project.optional-dependencies]
test = ["pytest>=8"]

# what makes dare-pipeline find the plugin: an entry point in its group, named like the plugin
[project.entry-points.dare_pipeline]
{name} = "{module}:{cls}"

[tool.setuptools]
packages = ["{module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''\
# {dist}

A dare-pipeline reuse plugin, `{name}`: at every layer, a
row whose attention input (its normed residual row) moved less than `threshold` (relative) since its
attention output was last computed reuses that output; the rest recompute it.

```bash
pip install -e ".[test]"
python -m pytest                     # the dare-pipeline plugin contract + this plugin's own tests
dare-pipeline plugins test {name}    # the contract alone
dare-pipeline generate $'Q: reverse pythonwizard\\nA: ' --recipe RECIPE.yaml \\
    --set 'plugins=[{{name: {name}, threshold: 0.05}}]'
```
'''

MODULE = '''\
"""{name}: reuse a row's attention output while its attention input barely moves.

At every layer each running row's attention input h (its normed residual row, `call.h`) is
compared with the h it had when its attention output was last computed at that layer. Rows with
||h - h_ref|| / ||h_ref|| < threshold skip their attention row and output projection and add the
cached attention delta (store field ATTN_OUT); the others recompute it and take h as their new
reference. Strict `<`: threshold 0 reuses nothing and decodes exactly as without the plugin.

    plugins:
      - {{name: {name}, threshold: 0.05}}
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from dare_pipeline.config import at_least, layer_indices
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.reuse import ATTN_OUT, LayerReuse

REF = "{name}.h_ref"  # store field: per layer and column, the h of the row's last recompute


@attrs.frozen(kw_only=True)
class {cls}Options:
    # a row reuses its attention output when ||h - h_ref|| / ||h_ref|| < threshold (0: never)
    threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
    # layers where every row recomputes
    exempt_layers: tuple[int, ...] = attrs.field(default=(0,), validator=layer_indices)


class _AttnReuse(LayerReuse):
    decisions = frozenset({{"attn_rows"}})  # the one decision this object owns
    fields = frozenset({{ATTN_OUT}})  # the core keeps every layer's attention output in the store
    # compiled execution needs the store fields and counters made before the first forward and the
    # capacities declared (docs/plugins.md, "Reuse inside a compiled forward"); until then: eager forwards
    capturable = False

    def __init__(self, plugin: {cls}):
        self.plugin = plugin

    def attn_rows(self, call, q):
        """(B, m) bool over the running rows (`call.active` are their canvas columns): True = recompute."""
        p, store, layer = self.plugin, call.store, call.layer
        if layer in p.options.exempt_layers:
            return None  # every row recomputes
        cols, h = call.active, call.h
        ref = store.field(REF, layer, h.shape[-1], h.dtype)[:, cols]
        cached = store.written(REF, layer)[:, cols] & store.written(ATTN_OUT, layer)[:, cols]
        drift = torch.linalg.vector_norm(h - ref, dim=-1) / \\
            torch.linalg.vector_norm(ref, dim=-1).clamp_min(torch.finfo(h.dtype).tiny)
        reuse = cached & (drift < p.options.threshold)
        running = torch.ones_like(reuse) if call.run is None else call.run  # rows this element runs
        # a prompt whose block is done only waits for its batch: alone it would not run this forward,
        # so its rows are reused, neither written nor counted
        running = running & p.decoding[:, None]
        real = p.real[:, cols] & running  # padding is never counted
        recompute = running & ~reuse
        store.write(REF, layer, cols, h, recompute)  # recomputed rows take h as their reference
        p.counts += torch.stack([real.sum(), (reuse & real).sum()])
        return recompute


class {cls}(Plugin):
    name = "{name}"
    Options = {cls}Options
    provides = frozenset({{"attn_rows"}})
    conflicts: ClassVar[dict[str, str]] = {{}}
    exact_options: ClassVar[dict[str, Any]] = {{"threshold": 0.0}}  # the contract checks exactness here
    store_fields: ClassVar[frozenset[str]] = frozenset({{REF, ATTN_OUT}})  # the memory check counts them

    @hookimpl
    def dare_generation_start(self, state):
        n_layers = state.model.config.n_layers
        if any(layer >= n_layers for layer in self.options.exempt_layers):
            raise ValueError(f"{{self.name}}: exempt_layers = {{list(self.options.exempt_layers)}}: the model has "
                             f"{{n_layers}} layers (0..{{n_layers - 1}})")
        state.require_store()
        self.real = state.model_rows(state.attention_mask)  # (B, L) bool: not padding
        self.counts = torch.zeros(2, dtype=torch.long, device=self.real.device)  # eligible, reused

    @hookimpl
    def dare_step_start(self, state):
        # (B,) which prompts decode this forward (a decoding policy may finish a prompt's block early)
        self.decoding = torch.tensor(state.unfinished_model_rows, device=self.real.device)

    @hookimpl
    def dare_layer_reuse(self, state):
        return _AttnReuse(self)

    @hookimpl
    def dare_report_stats(self, state):
        eligible, reused = self.counts.tolist()
        return {{"threshold": self.options.threshold, "rows_eligible": eligible, "rows_reused": reused,
                "reuse_fraction": round(reused / eligible, 6) if eligible else 0.0}}
'''

CONTRACT_TEST = '''\
"""The dare-pipeline plugin contract, shipped with dare-pipeline, run against this package's plugin
(installed: `pip install -e .`): exactness under exact_options, alone and stacked on every row feeder
and decoding policy, the cache invariant, batch invariance, complete stats, counted rows, state reset,
abort recovery."""

import pytest

# the contract's tests, collected in this module (new checks of later dare-pipeline versions join)
from dare_pipeline.plugin_kit.contract import *


@pytest.fixture
def dare_plugin():
    return "{name}"
'''

OWN_TEST = '''\
"""{name}'s own behaviour on the contract's tiny random models."""

import pytest

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.plugin_kit import checks


def test_a_negative_threshold_is_refused_with_the_key_and_value():
    with pytest.raises(ConfigError, match=r"plugins\\[0\\]: threshold = -1.0: must be >= 0.0"):
        Recipe.from_dict({{"plugins": [{{"name": "{name}", "threshold": -1.0}}]}})


def test_exempt_layers_beyond_the_model_are_refused():
    recipe = {{"generation": checks.GEN, "plugins": [{{"name": "{name}", "exempt_layers": [7]}}]}}
    with pytest.raises(ValueError, match=r"exempt_layers = \\[7\\]: the model has 3 layers"):
        Pipeline(checks.model("llada"), recipe).generate(checks.prompts())


@pytest.mark.parametrize("family", checks.FAMILIES)
def test_a_loose_threshold_reuses_attention_rows_and_computes_fewer(family):
    model = checks.model(family)
    recipe = {{"generation": checks.GEN, "plugins": [{{"name": "{name}", "threshold": 0.5}}]}}
    out = Pipeline(model, recipe).generate(checks.prompts())
    report = out.stats.plugins["{name}"]
    assert 0 < report["rows_reused"] <= report["rows_eligible"]
    rows = out.stats.rows_by_layer()
    assert sum(r["attn"] for r in rows) < sum(r["q"] for r in rows)  # reused rows skipped attention


@pytest.mark.parametrize("family", checks.FAMILIES)
def test_a_prompt_waiting_for_its_batch_is_neither_counted_nor_changed(family):
    """Threshold decoding finishes some prompts' blocks early; they wait, fed, for the rest of the batch.
    Each prompt's rows are counted as alone, so the batch's counts are the sum of theirs."""
    model, batch = checks.model(family), checks.prompts()
    recipe = {{"generation": checks.GEN, "plugins": ["threshold_decoding", {{"name": "{name}", "threshold": 0.5}}]}}
    together = Pipeline(model, recipe).generate(batch).stats
    alone = [Pipeline(model, recipe).generate([prompt]).stats for prompt in batch]
    assert together.nfe > min(s.nfe for s in alone)  # some prompt waited
    for key in ("rows_eligible", "rows_reused"):
        assert together.plugins["{name}"][key] == sum(s.plugins["{name}"][key] for s in alone), key
'''


def _names(name: str) -> dict[str, str]:
    return {"name": name, "module": f"dare_{name}", "dist": "dare-" + name.replace("_", "-"),
            "cls": "".join(part.capitalize() for part in name.split("_") if part)}


def check_name(name: str) -> None:
    """A plugin name is a lowercase Python identifier (it names a module and an entry point) that no
    installed plugin has: two entry points of one name shadow each other, whichever loads last wins."""
    if not NAME_RULE.match(name) or keyword.iskeyword(name):
        raise ValueError(f"plugin name {name!r}: use lowercase letters, digits and underscores, starting with a letter")
    taken = entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    if taken:
        where = next(iter(taken)).value
        raise ValueError(f"plugin name {name!r}: an installed plugin has it ({where}); recipes name plugins by "
                         f"entry point, so the two would shadow each other: choose another name")


def files(name: str) -> dict[str, str]:
    """Relative path -> text of every file of the package for plugin `name`."""
    check_name(name)
    n = _names(name)
    return {"pyproject.toml": PYPROJECT.format(**n), "README.md": README.format(**n),
            f"{n['module']}/__init__.py": MODULE.format(**n), "tests/test_contract.py": CONTRACT_TEST.format(**n),
            f"tests/test_{name}.py": OWN_TEST.format(**n)}


def write(name: str, directory: Path) -> Path:
    """Write the package into `directory`, which must not exist yet (or be empty); all or nothing:
    the files are written into a temporary sibling directory that is then renamed."""
    directory = Path(directory)
    content = files(name)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory}: already exists and is not an empty directory; choose another --dir")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's directory is private
        for rel, text in content.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
