"""Hook points: the order they fire in, their documentation, and layer-reuse hand-over."""

import inspect
from pathlib import Path

import pytest
import torch

from dare_pipeline import Pipeline
from dare_pipeline.core import Plugin, hookimpl, hookspecs
from dare_pipeline.core.registry import registered
from dare_pipeline.plugin_kit.testing import CrashAtStep, tiny_model
from dare_pipeline.reuse import LayerReuse

HOOKS = [n for n, f in vars(hookspecs).items() if n.startswith("dare_") and inspect.isfunction(f)]
GEN = {"gen_length": 8, "block_length": 4, "steps": 4}


class Recorder(Plugin):
    name = "recorder"

    def __init__(self, options=None):
        super().__init__(options)
        self.events = []

    @hookimpl
    def dare_generation_start(self, state):
        self.events.append("generation_start")

    @hookimpl
    def dare_layer_reuse(self, state):
        self.events.append("layer_reuse")

    @hookimpl
    def dare_block_start(self, state):
        self.events.append(f"block_start {state.block}")

    @hookimpl
    def dare_block_min_forwards(self, state):
        self.events.append("block_min_forwards")  # None: the policy's answer (the baseline's) is used

    @hookimpl
    def dare_step_start(self, state):
        self.events.append("step_start")

    @hookimpl
    def dare_plan_forward(self, state):
        self.events.append("plan_forward")

    @hookimpl
    def dare_step_end(self, state, committed):
        self.events.append(f"step_end {int(committed.sum())}")

    @hookimpl
    def dare_block_end(self, state):
        self.events.append("block_end")

    @hookimpl
    def dare_generation_end(self, state):
        self.events.append("generation_end")

    @hookimpl
    def dare_report_stats(self, state):
        self.events.append("report_stats")
        return {"events": len(self.events)}


def test_hooks_fire_in_documented_order():
    with registered(Recorder):
        pipe = Pipeline(tiny_model(), {"generation": GEN, "plugins": ["recorder"]})
    out = pipe.generate([[1, 2, 3]])
    events = pipe.plugins[1].events
    step = ["step_start", "plan_forward", "step_end 2"]
    assert events == (["generation_start", "layer_reuse", "block_start 0", "block_min_forwards"] + step * 2
                      + ["block_end", "block_start 1", "block_min_forwards"] + step * 2
                      + ["block_end", "generation_end", "report_stats"])
    assert out.stats.plugins == {"recorder": {"events": len(events)}}


def test_every_hook_is_tested_and_documented():
    docs = Path(__file__).parents[2].joinpath("docs", "plugins.md").read_text()
    source = Path(__file__).read_text()
    for name in HOOKS:
        signature = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        assert f"`{signature}`" in docs, f"docs/plugins.md lacks the exact signature {signature}"
        assert f"def {name}(" in source, f"{name} is not exercised by this test module"


def test_pipelines_never_share_plugin_instances_or_managers():
    with registered(Recorder):
        a = Pipeline(tiny_model(), {"generation": GEN, "plugins": ["recorder"]})
        b = Pipeline(tiny_model(), {"generation": GEN, "plugins": ["recorder"]})
    assert a.plugins[1] is not b.plugins[1] and a.manager is not b.manager
    a.generate([[1, 2, 3]])
    assert b.plugins[1].events == []


class CountingReuse(LayerReuse):
    decisions = frozenset({"kv_rows"})

    def __init__(self):
        self.calls = 0

    def kv_rows(self, call, q):
        self.calls += 1


class ReusePlugin(Plugin):
    name = "reuse_plugin"
    provides = frozenset({"kv_rows"})

    @hookimpl
    def dare_layer_reuse(self, state):
        self.reuse = CountingReuse()
        return self.reuse


def test_layer_reuse_object_is_called_by_the_model_at_every_layer():
    model = tiny_model(n_layers=3)
    with registered(ReusePlugin):
        pipe = Pipeline(model, {"generation": GEN, "plugins": ["reuse_plugin"]})
    out = pipe.generate([[1, 2, 3]])
    assert pipe.plugins[1].reuse.calls == 3 * out.stats.nfe
    plain = Pipeline(model, {"generation": GEN}).generate([[1, 2, 3]])
    assert out.sequences == plain.sequences
    assert torch.equal(torch.tensor(out.unmask_step), torch.tensor(plain.unmask_step))


class LeftmostFirst(Plugin):
    """A policy: commit the leftmost masked candidate, whatever the confidence."""

    name = "leftmost_first"
    provides = frozenset({"commit_policy"})

    @hookimpl
    def dare_select_commits(self, state, proposal):
        first = proposal.candidates.long().argmax(-1)
        mask = torch.zeros_like(proposal.candidates)
        mask[torch.arange(mask.shape[0]), first] = True
        return mask & proposal.candidates


def test_commit_policy_hook_replaces_the_baseline():
    with registered(LeftmostFirst):
        pipe = Pipeline(tiny_model(), {"generation": GEN, "plugins": ["leftmost_first"]})
    assert [p.name for p in pipe.plugins] == ["leftmost_first"]  # the default policy is not added
    out = pipe.generate([[1, 2, 3], [4, 5]])
    assert out.unmask_step == [list(range(1, 9))] * 2  # strictly left to right, one per forward


class AbortRecorder(Plugin):
    name = "abort_recorder"

    def __init__(self, options=None):
        super().__init__(options)
        self.aborts, self.ends = [], 0

    @hookimpl
    def dare_generation_end(self, state):
        self.ends += 1

    @hookimpl
    def dare_generation_abort(self, state, error):
        self.aborts.append((state.step, str(error)))


class FailingRelease(Plugin):
    name = "failing_release"

    @hookimpl
    def dare_generation_abort(self, state, error):
        raise OSError("cannot close")


def test_generation_abort_replaces_the_end_when_anything_raises():
    with registered(CrashAtStep, AbortRecorder):
        pipe = Pipeline(tiny_model(), {"generation": GEN, "plugins": ["abort_recorder", "crash_at_step"]})
    recorder, crasher = pipe.plugins[1], pipe.plugins[2]
    with pytest.raises(RuntimeError, match="crash at step 2"):
        pipe.generate([[1, 2, 3]])
    assert recorder.aborts == [(2, "crash at step 2")] and recorder.ends == 0
    crasher.armed = False  # the same pipeline decodes as a fresh one afterwards
    out = pipe.generate([[1, 2, 3]])
    plain = Pipeline(tiny_model(), {"generation": GEN}).generate([[1, 2, 3]])
    assert out.sequences == plain.sequences and out.unmask_step == plain.unmask_step
    assert recorder.aborts == [(2, "crash at step 2")] and recorder.ends == 1


def test_a_failing_release_neither_hides_the_error_nor_stops_the_other_releases():
    with registered(CrashAtStep, AbortRecorder, FailingRelease):
        pipe = Pipeline(tiny_model(), {"generation": GEN,
                                       "plugins": ["abort_recorder", "failing_release", "crash_at_step"]})
    with pytest.raises(RuntimeError, match="crash at step 2") as caught:
        pipe.generate([[1, 2, 3]])
    assert pipe.plugins[1].aborts == [(2, "crash at step 2")]
    assert any("failing_release.dare_generation_abort also failed: OSError('cannot close')" in note
               for note in caught.value.__notes__)


class FailingEnd(Plugin):
    name = "failing_end"

    @hookimpl
    def dare_generation_end(self, state):
        raise OSError("cannot write the log")


class FailingReport(Plugin):
    name = "failing_report"

    @hookimpl
    def dare_report_stats(self, state):
        raise ValueError("cannot report")


@pytest.mark.parametrize("failing, message", [("failing_end", "cannot write the log"),
                                              ("failing_report", "cannot report")])
def test_a_failing_end_or_report_aborts_the_generation(failing, message):
    """A plugin's generation end or report that raises still lets every plugin release what it holds."""
    with registered(AbortRecorder, FailingEnd, FailingReport):
        pipe = Pipeline(tiny_model(), {"generation": GEN, "plugins": ["abort_recorder", failing]})
    with pytest.raises((OSError, ValueError), match=message):
        pipe.generate([[1, 2, 3]])
    assert [error for _, error in pipe.plugins[1].aborts] == [message]


def test_progress_bar_closes_when_the_generation_aborts():
    import io

    from dare_pipeline.cli.progress import ProgressBar

    with registered(CrashAtStep):
        pipe = Pipeline(tiny_model(), {"generation": GEN, "plugins": ["crash_at_step"]})
    bar = ProgressBar(total=GEN["gen_length"], file=io.StringIO())
    pipe.manager.register(bar, name="progress")
    with pytest.raises(RuntimeError):
        pipe.generate([[1, 2, 3]])
    assert bar.bar.disable  # tqdm marks a closed bar disabled
