"""The plugin contract: checks every plugin must pass, built-in or third-party, by its registered name.

Each check decodes on tiny seeded random models of both families (`dare_pipeline.plugin_kit.testing.tiny_model`:
no checkpoint, no download) and raises AssertionError with what differs. The repository's own
contract test and `pytest --dare-plugin NAME` (the test module `plugin_kit.contract`) call these
same functions, so there is one contract.

- `check_exact_options`: under its `exact_options` the plugin decodes exactly the tokens and commit
  steps of the recipe without it, and every forward's logits of the prompts still decoding are
  equal (within float noise: 1e-4);
- `check_cache_invariant`: the plugin's reuse objects, under its `exact_options`, keep the invariant
  every cache rests on (`plugin_kit.invariant`): with exact cache contents, a forward over any
  subset of rows (the whole canvas, a prefix cache's suffix, a dual cache's block, some head rows)
  gives the logits, hidden states and stored keys/values of the full forward, eagerly and (Dream)
  in a compiled forward;
- `check_exact_stacked`: the same stacked on every row feeder and every decoding policy installed
  (each with its default options, combinations the plugins refuse left out), over batches of
  left-padded prompts, two block layouts and greedy and sampled decoding (the contract's tests
  alternate them over the stacks and families);
- `check_stats_and_reset`: the stats are complete, a plugin with `dare_report_stats` reports a dict,
  and two generations with one Pipeline give identical outputs and plugin stats;
- `check_counted_rows`: the rows the stats count per layer and sub-operation are the rows that
  entered the projections (counting hooks on them), so reported savings are real;
- `check_batch_invariance`: a batch decodes each prompt exactly as alone, under the default policy
  and under every installed decoding policy (where a prompt whose block is done waits for the rest);
- `check_abort_recovery`: after a generation that raised part-way, the Pipeline decodes as a new one.

A plugin enters every check with its default options, or with what its `contract_options` returns
for the tiny model (a plugin that needs a second model, as guided diffusion's guide, builds it
there); a decoding policy stacked under another plugin enters the same way.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import torch

from ..api import Pipeline
from ..config.recipe import Recipe
from ..core.hookspecs import hookimpl
from ..core.plugin import Plugin
from ..core.registry import DEFAULT_POLICY, available_plugins, registered
from ..core.stats import SUB_OPS
from .testing import CrashAtStep, commit_order, random_prompts, tiny_model
from .invariant import Case, check_invariant

FAMILIES = ("llada", "dream")
VOCAB = 64
GEN = {"gen_length": 16, "block_length": 8, "steps": 16}
# the stacked exactness check: two block layouts, greedy and sampled
STACKED_GENS = ({"gen_length": 16, "block_length": 8, "steps": 16},
                {"gen_length": 16, "block_length": 4, "steps": 8, "temperature": 0.9, "seed": 3})
# the cache invariant's compiled cases: capture without code generation (fast to compile)
COMPILED = {"mode": "compiled", "backend": "aot_eager"}
# the projection each counted sub-operation's rows go through (`v`: values projected alone)
PROJECTIONS = {"q": "q_proj", "kv": "k_proj", "attn": "o_proj", "ffn": "gate_proj", "v": "v_proj"}


@functools.cache
def model(family: str):
    return tiny_model(family, seed=5, d_model=48, n_layers=3, vocab_size=VOCAB)


def prompts(n: int = 3, seed: int = 11) -> list[list[int]]:
    """n prompts of different lengths (a batch is left-padded), without the EOS and mask ids."""
    return random_prompts(n, VOCAB, seed=seed, min_len=2, max_len=9, exclude=(VOCAB - 2, VOCAB - 1))


# working folders of plugins' contract_options (a guide saved for the tiny model), removed at exit
_WORKDIRS: list[tempfile.TemporaryDirectory] = []


@functools.cache
def _contract_options(name: str, family: str) -> tuple:
    cls = plugin_class(name)
    if getattr(cls.contract_options, "__func__", None) is Plugin.contract_options.__func__:
        return ()
    folder = tempfile.TemporaryDirectory(prefix=f"dare-contract-{name}-{family}-")
    _WORKDIRS.append(folder)
    return tuple((cls.contract_options(model(family), Path(folder.name)) or {}).items())


def entry(name: str, family: str) -> dict:
    """The recipe entry a check runs plugin `name` with on `family`'s tiny model: its defaults, or its
    `contract_options` for that model."""
    return {"name": name, **dict(_contract_options(name, family))}


def plugin_class(name: str):
    plugins = available_plugins()
    if name not in plugins:
        raise AssertionError(f"no plugin named {name!r} is installed (entry-point group 'dare_pipeline'); "
                             f"found: {sorted(plugins)}")
    return plugins[name]


def _run(family, plugins, batch, gen=None, pipe=None):
    pipe = pipe or Pipeline(model(family), Recipe.from_dict({"generation": gen or GEN, "plugins": plugins}))
    return pipe.generate(batch), pipe


def _same_decode(got, want, what: str) -> None:
    assert got.sequences == want.sequences, f"{what}: tokens differ"
    assert got.unmask_step == want.unmask_step, f"{what}: commit steps differ"


@contextlib.contextmanager
def _logits(family: str):
    """The LM head's output of every forward (tokens can hide a small inexactness; logits do not)."""
    seen: list[torch.Tensor] = []
    handle = model(family).lm_head.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


class _Decoding(Plugin):
    """Observer: which prompts still decode at each forward (a finished prompt's logits are unused,
    and a plugin may leave its rows stale: dLLM-Cache does)."""

    name = "contract_decoding"

    @hookimpl
    def dare_generation_start(self, state):
        self.rows = []

    @hookimpl
    def dare_step_start(self, state):
        self.rows.append(list(state.unfinished))


def _exact_run(family, plugins, batch, gen=None):
    """Decode, and return the output with each forward's (logits, prompts still decoding)."""
    with registered(_Decoding), _logits(family) as seen:
        out, pipe = _run(family, [*plugins, _Decoding.name], batch, gen)
    decoding = next(p for p in pipe.plugins if p.name == _Decoding.name).rows
    return out, list(zip(seen, decoding))


def _same_logits(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} forwards instead of {len(want)}"
    for i, ((a, decoding), (b, expected)) in enumerate(zip(got, want)):
        assert decoding == expected, f"{what}: forward {i} decodes prompts {decoding}, not {expected}"
        assert a.shape == b.shape, f"{what}: forward {i} computed logits of shape {tuple(a.shape)}, not {tuple(b.shape)}"
        rows = torch.tensor(decoding).repeat(a.shape[0] // len(decoding))  # model batch rows (x2 with guidance)
        torch.testing.assert_close(a[rows], b[rows], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, i=i: f"{what}: logits of forward {i}: {m}")


def has_exactness_check(name: str) -> bool:
    """Whether the exactness checks apply: the plugin declares `exact_options` and is no decoding
    policy (a policy is the decoder the others are compared under)."""
    cls = plugin_class(name)
    return cls.exact_options is not None and "commit_policy" not in cls.provides


def check_exact_options(name: str, family: str) -> None:
    cls = plugin_class(name)
    batch = prompts()
    with_it, logits = _exact_run(family, [{**entry(name, family), **cls.exact_options}], batch)
    without, expected = _exact_run(family, [], batch)
    what = f"{name} with exact_options {cls.exact_options}"
    _same_decode(with_it, without, what)
    _same_logits(logits, expected, what)


def has_invariant_check(name: str) -> bool:
    """Whether the cache invariant check applies: the exactness checks do and the plugin hands the
    model reuse objects (`dare_layer_reuse`)."""
    return has_exactness_check(name) and callable(getattr(plugin_class(name), "dare_layer_reuse", None))


def invariant_cases(whole_canvas_only: bool = False) -> list[Case]:
    """The invariant's cases on `prompts(3)` (left-padded) and an answer of 8 columns, committed
    tokens and masks mixed: the whole canvas (logits of the answer rows), and unless the plugin
    refuses row feeders, a prefix cache's feed (from column 2 of the answer to the end) and a dual
    cache's (answer columns 2-5, the suffix after them read from the store; three head rows)."""
    batch = prompts(3, seed=30)
    tokens = random_prompts(3, VOCAB, seed=31, min_len=8, max_len=8, exclude=(VOCAB - 2, VOCAB - 1))
    answers = tuple(tuple(VOCAB - 1 if (j + b) % 3 else t for j, t in enumerate(row)) for b, row in enumerate(tokens))
    end = max(len(p) for p in batch)
    length = end + 8
    prompts_ = tuple(tuple(p) for p in batch)
    cases = [Case(prompts_, answers, fed=(0, length), head_rows=tuple(range(end, length)))]
    if not whole_canvas_only:
        cases += [Case(prompts_, answers, fed=(end + 2, length)),
                  Case(prompts_, answers, fed=(end + 2, end + 6), head_rows=(0, 2, 3))]
    return cases


def check_cache_invariant(name: str, family: str) -> None:
    """Every invariant case eagerly; on Dream (grouped-query attention) the last one again in a
    compiled forward (compiling costs seconds per shape; where the plugin's reuse objects are not
    capturable that forward runs eagerly and is checked the same). A plugin that refuses every row
    feeder (a declared conflict) is checked on whole-canvas forwards only."""
    cls = plugin_class(name)
    plugins = [{**entry(name, family), **cls.exact_options}]
    cases = invariant_cases(whole_canvas_only=all(feeder is None for feeder, _ in stacks(name)))
    what = f"{name} with exact_options {cls.exact_options}"
    for case in cases:
        check_invariant(model(family), case, plugins, what=f"{what}, fed columns {case.fed}")
    if family == "dream":
        check_invariant(model(family), cases[-1], plugins, execution=COMPILED,
                        what=f"{what}, compiled, fed columns {cases[-1].fed}")


def _compatible(name: str, other: str, classes) -> bool:
    a, b = classes[name], classes[other]
    return (name != other and not (set(a.provides) & set(b.provides))
            and other not in a.conflicts and name not in b.conflicts)


def stacks(name: str) -> list[tuple[str | None, str | None]]:
    """(row feeder, decoding policy) pairs the plugin is checked under: None (no feeder; the default
    policy, `baseline`) and every installed plugin providing `row_feed` / `commit_policy`, without the pairs a
    plugin refuses (declared conflicts, or the same decision)."""
    classes = available_plugins()
    feeders = [None] + sorted(n for n, c in classes.items() if "row_feed" in c.provides and _compatible(name, n, classes))
    policies = [None] + sorted(n for n, c in classes.items()  # None: the default policy
                               if "commit_policy" in c.provides and n != DEFAULT_POLICY
                               and _compatible(name, n, classes))
    return [(f, p) for f in feeders for p in policies
            if f is None or p is None or _compatible(f, p, classes)]


def check_exact_stacked(name: str, family: str, feeder: str | None, policy: str | None, variant: int = 0) -> None:
    """One stack under one of STACKED_GENS (`variant`, taken modulo their number), a batch of three
    left-padded prompts."""
    cls = plugin_class(name)
    base = [entry(p, family) for p in (feeder, policy) if p]
    gen = STACKED_GENS[variant % len(STACKED_GENS)]
    batch = prompts(3, seed=20 + variant)
    with_it, logits = _exact_run(family, [*base, {**entry(name, family), **cls.exact_options}], batch, gen)
    without, expected = _exact_run(family, base, batch, gen)
    what = f"{name} {cls.exact_options} on {[p['name'] for p in base] or 'the default recipe'}, generation {gen}"
    _same_decode(with_it, without, what)
    assert with_it.stats.nfe == without.stats.nfe, f"{what}: forwards differ"
    _same_logits(logits, expected, what)


def check_stats_and_reset(name: str, family: str) -> None:
    batch = prompts(2)
    first, pipe = _run(family, [entry(name, family)], batch)
    second, _ = _run(family, [entry(name, family)], batch, pipe=pipe)
    stats = first.stats
    assert stats.nfe > 0 and stats.steps == stats.nfe
    assert len(stats.tokens_per_step) == len(batch)
    assert all(sum(t) == GEN["gen_length"] for t in stats.tokens_per_step), "every answer token is committed once"
    n_layers = model(family).config.n_layers
    assert stats.layer_rows.shape == (n_layers, len(SUB_OPS)) and int(stats.layer_rows.sum()) > 0
    assert len(stats.generated_tokens) == len(batch)
    if callable(getattr(plugin_class(name), "dare_report_stats", None)):
        assert isinstance(stats.plugins.get(name), dict), f"{name} implements dare_report_stats but reported nothing"
    # one Pipeline, two generations: per-generation state is reset in dare_generation_start
    _same_decode(second, first, f"{name}: the second generation of one Pipeline")
    assert second.stats.plugins == first.stats.plugins, f"{name}: plugin stats differ between two generations"
    assert second.stats.nfe == first.stats.nfe


def check_counted_rows(name: str, family: str) -> None:
    net = model(family)
    seen = {sub: [0] * len(net.layers) for sub in PROJECTIONS}
    handles = []
    for i, layer in enumerate(net.layers):
        for sub, proj in PROJECTIONS.items():
            def count(module, args, output, sub=sub, i=i):
                seen[sub][i] += args[0].numel() // args[0].shape[-1]
            handles.append(getattr(layer, proj).register_forward_hook(count))
    try:
        out, _ = _run(family, [entry(name, family)], prompts())
    finally:
        for handle in handles:
            handle.remove()
    for i, counted in enumerate(out.stats.rows_by_layer()):
        for sub in ("q", "kv", "attn", "ffn"):
            assert seen[sub][i] == counted[sub], \
                f"{name}: layer {i} counts {counted[sub]} {sub} rows, {seen[sub][i]} entered {PROJECTIONS[sub]}"
        # values are projected with the keys, and alone where a plugin counts `v` rows
        assert seen["v"][i] == counted["kv"] + counted["v"], f"{name}: layer {i}: value rows miscounted"


def check_batch_invariance(name: str, family: str) -> None:
    """Under the default policy, where every prompt finishes a block together, and under every installed
    decoding policy the plugin stacks on, where a prompt whose block is done waits for the rest of its
    batch (its rows are fed meanwhile: alone it would not have had those forwards)."""
    for policy in [None, *sorted({p for f, p in stacks(name) if f is None and p is not None})]:
        plugins = [entry(p, family) for p in (policy,) if p] + [entry(name, family)]
        where = f" under {policy}" if policy else ""
        batch = prompts(3)
        together, _ = _run(family, plugins, batch)
        for i, prompt in enumerate(batch):
            alone, _ = _run(family, plugins, [prompt])
            assert together.sequences[i] == alone.sequences[0], \
                f"{name}: prompt {i} decodes differently in a batch{where}"
            assert commit_order(together.unmask_step[i]) == commit_order(alone.unmask_step[0]), \
                f"{name}: prompt {i} commits in another order in a batch{where}"


def check_abort_recovery(name: str, family: str) -> None:
    batch = prompts(2)
    with registered(CrashAtStep):
        pipe = Pipeline(model(family), Recipe.from_dict({"generation": GEN,
                                                         "plugins": [entry(name, family), "crash_at_step"]}))
        crasher = next(p for p in pipe.plugins if p.name == "crash_at_step")
        try:
            pipe.generate(batch)
        except RuntimeError as exc:
            assert "crash at step 2" in str(exc), exc
        else:
            raise AssertionError("the crashing observer did not stop the generation")
        crasher.armed = False
        after, _ = _run(family, [entry(name, family), "crash_at_step"], batch, pipe=pipe)
    fresh, _ = _run(family, [entry(name, family)], batch)
    _same_decode(after, fresh, f"{name}: after an aborted generation")
    assert after.stats.plugins.get(name) == fresh.stats.plugins.get(name)

