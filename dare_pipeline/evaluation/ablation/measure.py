"""What a run measures beyond lm-eval's accuracy: the `dare` model with extra counters (FLOPs from
the per-layer row counts, reuse fractions, per-generation plugin counters, request progress) and
the peak memory of the run. Imports lm-eval: load lazily."""

from __future__ import annotations

import copy
import os
import resource
import sys

import attrs
import torch

from ...core.hookspecs import hookimpl
from ...core.stats import ROW_OPS, SUB_OPS
from ...reuse import flops as flops_mod
from ..lm_eval_model import DareLM, DecodingStats
from .journal import BatchJournal, add_counters, batch_key, counters_delta


def _is_fraction(key: str) -> bool:
    key = key.lower()
    return "fraction" in key or key.endswith(("reuse", "hit_rate"))


@attrs.define
class RunStats(DecodingStats):
    """DecodingStats plus FLOPs and row counts against fed and full-canvas rows."""

    _LOCAL_FIELDS = ("config", "progress")

    config: object = None
    progress: object = None  # callable(done_requests, expected_requests) or None
    requests_expected: int = 0
    flops_full: dict = attrs.Factory(dict)  # plain forwards over the whole canvas, same NFE
    rows: dict = attrs.Factory(lambda: dict.fromkeys(SUB_OPS, 0))  # computed, summed over layers
    rows_fed_layers: int = 0  # rows entering the model x layers
    canvas_rows_layers: int = 0  # full-canvas rows x layers (what plain forwards compute)
    head_rows: int = 0
    resumed_requests: int = 0  # requests whose answers and counters came from the run's journal

    def add_generation(self, state) -> None:
        """Called at the end of each generation (the observer below), before stats.plugins is filled."""
        st, cfg = state.stats, self.config
        length, mb = state.length, state.model_batch
        head_rows = st.nfe * mb * state.gen.block_length
        layer_rows = st.layer_rows  # (`flops` itself is added by the lm-eval model's own counter)
        self.flops_full = flops_mod.add(self.flops_full,
                                        flops_mod.full_recompute(cfg, st.nfe, mb * length, length, head_rows))
        for op, v in zip(SUB_OPS, layer_rows.sum(0).tolist()):
            self.rows[op] += int(v)
        self.rows_fed_layers += st.rows_fed * cfg.n_layers
        self.canvas_rows_layers += st.nfe * mb * length * cfg.n_layers
        self.head_rows += head_rows

    def add(self, stats, size: int, wall: float, cpu: float = 0.0) -> None:
        super().add(stats, size, wall, cpu)
        self.report_progress()

    def report_progress(self) -> None:
        if self.progress is not None:
            self.progress(self.requests, self.requests_expected or None)

    def plugin_reuse(self) -> dict:
        """Reuse fractions plugins report (numbers named like a fraction), plus the share of
        cached rows read among rows needed where a plugin counts both (`cached_rows_read`,
        `rows_recomputed`: the Fast-dLLM caches)."""
        out = {}
        for name, counters in self.plugin_summary().items():
            mine = {k: v for k, v in counters.items() if _is_fraction(k)}
            cached, recomputed = counters.get("cached_rows_read"), counters.get("rows_recomputed")
            if cached is not None and recomputed is not None and cached + recomputed > 0:
                mine["cached_rows_fraction"] = cached / (cached + recomputed)
            if mine:
                out[name] = mine
        return out

    def reuse(self) -> dict:
        """1 - computed / fed rows (per sub-operation: rows that entered the model but skipped it),
        1 - computed / full-canvas rows (against plain forwards at the same NFE), the same for FLOPs,
        and the plugins' own fractions."""
        fed = {op: (1 - self.rows[op] / self.rows_fed_layers) if self.rows_fed_layers else None for op in ROW_OPS}
        canvas = {op: (1 - self.rows[op] / self.canvas_rows_layers) if self.canvas_rows_layers else None
                  for op in ROW_OPS}
        full = self.flops_full.get("total", 0)
        return {"fed": fed, "canvas": canvas,
                "flops": (1 - self.flops.get("total", 0) / full) if full else None,
                "plugins": self.plugin_reuse()}


class _Observer:
    """Registered on the run's plugin manager: observes, decides nothing."""

    name = "ablation_observer"

    def __init__(self, stats: RunStats, memory: MemoryProbe):
        self.stats, self.memory = stats, memory

    @hookimpl
    def dare_step_end(self, state, committed):
        self.memory.sample()

    @hookimpl
    def dare_generation_end(self, state):
        self.stats.add_generation(state)


class AblationLM(DareLM):
    """The `dare` lm-eval model with RunStats and an observer (not registered with lm-eval).

    journal: the run's journal directory (a first pass): every decoded batch is recorded there, and
    a batch recorded before is taken from it instead of decoded again (see journal.py)."""

    def __init__(self, *args, progress=None, journal=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats = RunStats(config=self.config, progress=progress)
        self.memory = MemoryProbe(self.model.device)
        self.pipeline.manager.register(_Observer(self.stats, self.memory), name=_Observer.name)
        self.journal = None if journal is None else BatchJournal(journal, rank=self.rank)
        self.journal_peak_bytes = 0  # the highest peak memory of the batches taken from the journal

    def _decode_batch(self, contexts, gen_kwargs, gen, overrides, until):
        if self.journal is None:
            return super()._decode_batch(contexts, gen_kwargs, gen, overrides, until)
        key = batch_key(contexts, gen_kwargs)
        recorded = self.journal.take(key, len(contexts))
        if recorded is not None:
            add_counters(self.stats, recorded["counters"])
            self.stats.resumed_requests += len(contexts)
            self.journal_peak_bytes = max(self.journal_peak_bytes, recorded.get("peak_bytes") or 0)
            self.stats.report_progress()
            return recorded["texts"]
        before = copy.deepcopy(self.stats.counters())
        texts = super()._decode_batch(contexts, gen_kwargs, gen, overrides, until)
        delta = counters_delta(before, self.stats)
        self.journal.add(key, texts, delta, self.memory.stop()["peak_bytes"])
        return texts

    def memory_record(self) -> dict:
        """The run's peak memory: this process's, or the peak the journal recorded for the batches
        decoded before an interruption where that is higher (the longest prompts decode first)."""
        memory = self.memory.stop()
        if self.journal_peak_bytes:
            memory["journal_peak_bytes"] = self.journal_peak_bytes
            if self.journal_peak_bytes > memory["peak_bytes"]:
                memory["peak_bytes"] = self.journal_peak_bytes
                memory["delta_bytes"] = max(self.journal_peak_bytes - memory["start_bytes"], 0)
        return memory

    def _generate_until(self, requests, disable_tqdm: bool = False):
        self.stats.requests_expected += len(requests)  # this rank's share, without lm-eval's padding
        self.stats.report_progress()
        return super()._generate_until(requests, disable_tqdm=True)


# ---- memory -------------------------------------------------------------------------------------

def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # kilobytes on Linux


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryProbe:
    """Peak memory of a run. CUDA: torch.cuda.max_memory_allocated after resetting the peak.
    CPU: the process's max RSS (resource.getrusage) against the RSS at the start; when the
    high-water mark was set by an earlier run of the same process it cannot move, and the peak is
    then the highest RSS sampled at step ends (`exact: false`)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.start_bytes = self.maxrss_start = self.sampled = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = _current_rss() or _maxrss_bytes()
            self.maxrss_start = _maxrss_bytes()
            self.sampled = self.start_bytes

    def sample(self) -> None:
        if not self.cuda:
            rss = _current_rss()
            if rss is not None and rss > self.sampled:
                self.sampled = rss

    def stop(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"device": str(self.device), "method": "torch.cuda.max_memory_allocated", "peak_bytes": peak,
                    "start_bytes": self.start_bytes, "delta_bytes": peak - self.start_bytes, "exact": True}
        self.sample()
        maxrss = _maxrss_bytes()
        exact = maxrss > self.maxrss_start
        peak = maxrss if exact else self.sampled
        return {"device": str(self.device), "method": "ru_maxrss" if exact else "rss sampled per step",
                "peak_bytes": peak, "start_bytes": self.start_bytes,
                "delta_bytes": max(peak - self.start_bytes, 0), "max_rss_bytes": maxrss, "exact": exact}
