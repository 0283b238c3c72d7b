"""The GPU speed suite: the decoding speed figures of one GPU in one command, budgeted to a 6-minute slot.

    PYTHONPATH=. python benchmarks/gpu_suite.py --out $OUT/gpu_suite            # the suite, H100/H200
    python benchmarks/gpu_suite.py --out /tmp/s --only A2 E F B2                 # a subset of row groups
    python benchmarks/gpu_suite.py --out /tmp/s --quick                          # 4x shorter decodes
    python benchmarks/gpu_suite.py --out /tmp/s --shape tiny --device cpu --dtype float32 --modes eager
                                                                                 # CPU smoke run (seconds)

Random-weight models of the published shapes (`common.bench_model`: LLaDA-8B-Instruct, `--shape
llada-8b`, and Dream-v0-Instruct-7B, `dream-7b`; `tiny` for CPU smoke runs), so only speed is
meaningful. Every decode feeds random prompt tokens and commits a fixed number of tokens per step
(the baseline policy), so a configuration's NFE is fixed, and ms/step = wall of a decode / NFE (the
host's sampling and bookkeeping included: what a user waits for).

Row groups, in the order they run (most important first: the budget may cut the tail). `--only`
takes group letters (A B D E F), sub-groups (A1 A2 B1 B2) or row ids, e.g. `--only A1 D`:
  A1  batch 1, prompt 512, gen_length 256, block 32, steps 256: baseline, dual_cache, prefix_cache
      (dual_cache before prefix_cache: D reuses its warmed graphs, and prefix_cache is the recipe
      whose compile count depends on the suffix lengths)
  D   GPU-busy fraction of that dual_cache decode in the graph mode, after its warm-up: one decode
      under torch.profiler (CPU + CUDA activities); busy time = the union of the intervals of the
      device's kernels, memcpys and memsets (read from the profiler's device events; GPU-side user
      annotations, which span kernels, are left out, and overlapping kernels count once), divided by
      the profiled decode's wall time, and by an unprofiled decode's wall time (the profiler slows
      the host side, not the kernels); the plain sum of kernel times is reported too
  B1  batch 32, steps 64 (4 tokens per step): dual_cache; ms/step and tokens/s (batch * gen_length / wall)
  A2  batch 1, steps 64 (4 tokens per step, 8 steps per block: eager DARE-O costs ~0.2 s a step, 256
      steps would not fit): dare_kv, dare_o, dllm_cache, dual_cache + dare_kv (recipe defaults:
      threshold 0.05, dare_o exempts layer 0; `--reuse-row-budget` sets their row_budget option)
  E   Dream-7B shape, batch 1, the A1 lengths: baseline, prefix_cache, dual_cache, dare_kv
  F   plain model forward (no loop), batch 1, over 32 and 768 rows: eager vs torch.compile(model,
      mode="reduce-overhead", dynamic=False); ms per forward, `--f-iters` forwards per sample
  B2  batch 32, steps 64: baseline, prefix_cache (when the budget is left)
  G   guided diffusion, batch 1, the A1 lengths: guided and dual_cache+guided on the LLaDA shape,
      dual_cache+guided on the Dream shape. The guide is a random-weight Qwen2.5-0.5B-shape causal LM
      (`--guide-shape`; Qwen2ForCausalLM built from a config, no download) of the diffusion model's
      vocabulary, saved under --out and loaded by the plugin (the diffusion model runs in the row's
      mode, the guide eagerly). A random guide agrees with few drafts, so most forwards commit the
      fall-back's one token (early stop off): NFE is at most steps (the row reports the guide's
      counters), and ms/step is a diffusion forward plus the guide's check of the block's drafts (one
      guide forward over up to 32 columns after its cache of the committed prefix)
  (C) every decode row reports the compile/capture time its warm-up paid (the executor's
      `stats.execution.compile_time_s`, and the warm-up's wall minus a timed decode's, which also
      covers CUDA graph capture) and its peak memory (`torch.cuda.max_memory_allocated`, reset at
      the row's start); "n/a on cpu" on the CPU.
Each A/B/E recipe runs in each of `--modes` (default: eager and cuda_graphs), side by side in the
table with the speed-up. The executor keeps compiled graphs per (model, execution config) for the
process, so the first row that meets a shape pays its compile and later rows reuse it: a compile
time of 0 means "already compiled by an earlier row".

Timing: each decode row runs one warm-up decode (eager: only the first block, nothing to compile;
compiled modes: the whole decode, which pays compile and capture), then `--repeats` (default 2)
timed decodes, each between two `torch.cuda.synchronize()`; the table gives the median and
(min-max) of ms per step. `--quick` divides gen_length and every steps count by 4 (the first two
blocks, the same steps per block, canvas 576 instead of 768 rows).

The conditions (GPU name, torch, CUDA, Triton and transformers versions, dtype, shapes, lengths,
batches, repeats, modes, budget) are the first JSON line and head the table.

Robustness: rows go to DIR/results.jsonl (one JSON object a line, flushed and fsynced; a "setup"
line per model creation) and DIR/results.md (rewritten) as each finishes, so a kill leaves
everything measured so far. A row that raises is recorded with its error and traceback and the
suite goes on. A row still running after `--row-timeout-s` (default 150) is interrupted (SIGALRM)
and recorded as a timeout; at `--budget-s` (default 330, counted from the start of main: model
creation and compiles included) the running row is interrupted and it and the rest are marked
"skipped (budget)"; SIGTERM records the running row and still writes and prints the table.

Time estimate on one H200 at the defaults, from the known figures (eager ~31 ms/step at 768 rows,
compiled 32-row forward 5.6 ms, ~40 s for a whole-model inductor compile without regions; graph-mode
decode times are estimates): setup (CUDA init, 8B random init) ~10 s; A1 eager 3 x ~17 s (a
one-block warm-up + 2 x 256 x ~31 ms). Compiled forwards use compile regions (execution.regions,
dare_pipeline/execution/regions.py): the layer's sub-operations are code-generated once, not 32
times, so a new graph costs a fraction of the 40 s (on the CPU, `benchmarks/compile_time.py`,
docs/benchmarks.md); with regions shapes are static, so prefix_cache compiles once per suffix length
(8 at these lengths). Eager decoding is the floor of the list: A1, A2, E and B1/B2 eager take
~250 s together (B2's baseline at batch 32 is compute-bound, ~0.5-0.7 s a step), so the default
budget measures A1, D, B1, A2 and as much of E as fits, and `--only E F B2` measures the rest in a
second slot. Each row's `regions` and `regions_error` say whether its compile used regions (a compile
that fails with them falls back to inline layers, and says why).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import SHAPES, bench_model, bench_prompts

from dare_pipeline import Pipeline

RECIPES: dict[str, list[dict]] = {
    "baseline": [],
    "prefix_cache": [{"name": "prefix_cache"}],
    "dual_cache": [{"name": "dual_cache"}],
    "dare_kv": [{"name": "dare_kv", "threshold": 0.05}],
    "dare_o": [{"name": "dare_o", "threshold": 0.05, "exempt_layers": [0]}],
    "dllm_cache": [{"name": "dllm_cache"}],
    "dual_cache+dare_kv": [{"name": "dual_cache"}, {"name": "dare_kv", "threshold": 0.05}],
}
# guided diffusion's guide: a random-weight causal LM built from a config at the row's vocabulary
GUIDE = "<random guide>"
RECIPES.update({
    "guided": [{"name": "guided_diffusion", "guide": GUIDE, "stop_at_eos": False}],
    "dual_cache+guided": [{"name": "dual_cache", "head_commit": "off"},
                          {"name": "guided_diffusion", "guide": GUIDE, "stop_at_eos": False}],
})
# Qwen2.5-0.5B's published shape (config.json of Qwen/Qwen2.5-0.5B-Instruct) and a tiny one for CPU runs
GUIDE_SHAPES = {
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096, "tie_word_embeddings": True},
}
GROUP_ORDER = ("A1", "D", "B1", "A2", "E", "F", "B2", "G")
MODE_LABEL = {"cuda_graphs": "graphs"}
F_COMPILED = "reduce-overhead"


@dataclass
class Row:
    id: str
    group: str  # A, B, D, E, F
    sub: str  # A1, A2, B1, B2, D, E, F
    kind: str  # decode | profile | forward
    family: str
    shape: str
    mode: str
    recipe: str = ""
    batch: int = 1
    prompt_len: int = 0
    gen_length: int = 0
    block_length: int = 0
    steps: int = 0
    rows: int = 0  # F: rows of the plain forward


class Interrupted(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that torch code catching Exception lets it through."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "budget" | "timeout"


# ---- measurement helpers -------------------------------------------------------------------------------------

def save_record(out: Path, record: dict, table: str) -> None:
    """Append `record` to out/results.jsonl (flushed and fsynced: a kill keeps it) and replace
    out/results.md with `table`."""
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    md = out / "results.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(table)
    tmp.replace(md)


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def clock(device) -> float:
    """Wall seconds after the device has finished the queued work."""
    if _is_cuda(device):
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak(device) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    if _is_cuda(device):
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return "n/a on cpu"


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def execution_stats(out) -> dict:
    """The executor's report of a generation (mode, compile_time_s, eager_reason, ...), {} before it exists."""
    stats = out.stats
    ex = getattr(stats, "execution", None)
    if not isinstance(ex, dict):
        try:
            ex = stats.to_dict().get("execution")
        except Exception:  # noqa: BLE001 - a stats object without it
            ex = None
    return dict(ex) if isinstance(ex, dict) else {}


def prompt_vocab(config) -> int:
    """Random prompt tokens stay below every special id (mask, eos, pad)."""
    ids = [config.vocab_size, config.mask_token_id, config.eos_token_id, config.pad_token_id]
    return max(2, min(i for i in ids if i is not None) - 10)


def short_warmup(row: Row) -> dict:
    """Generation overrides of an eager warm-up: the first block only, the same steps per block."""
    blocks = row.gen_length // row.block_length
    return {"gen_length": row.block_length, "steps": max(1, row.steps // blocks)}


# ---- device intervals of a profile -----------------------------------------------------------------------------

def device_events(prof) -> tuple[list[tuple[str, str, float, float]], str]:
    """(name, kind, start_us, duration_us) of every device-side event of a finished torch.profiler run;
    kind is kernel | memcpy | memset | other (GPU user annotations, syncs: spans over kernels, never
    added). Read from the raw kineto events (no FunctionEvent tree to build); prof.events() if that fails."""
    try:
        raw = prof.profiler.kineto_results.events()
        cpu_names = {e.name() for e in raw if e.device_type() != torch.autograd.DeviceType.CUDA}
        out = []
        for e in raw:
            if e.device_type() != torch.autograd.DeviceType.CUDA:
                continue
            activity = e.activity_type() if hasattr(e, "activity_type") else None
            annotation = e.is_user_annotation() if hasattr(e, "is_user_annotation") else False
            kind = classify(e.name(), activity, annotation, cpu_names)
            out.append((e.name(), kind, e.start_ns() / 1e3, e.duration_ns() / 1e3))
        return out, "kineto events, device_type CUDA"
    except Exception:  # noqa: BLE001 - fall back to the public API
        events = prof.events()
        cpu_names = {e.name for e in events if e.device_type != torch.autograd.DeviceType.CUDA}
        out = []
        for e in events:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            kind = classify(e.name, getattr(e, "activity_type", None), bool(getattr(e, "is_user_annotation", False)),
                            cpu_names)
            out.append((e.name, kind, e.time_range.start, e.time_range.end - e.time_range.start))
        return out, "prof.events(), device_type CUDA"


def classify(name: str, activity: str | None, annotation: bool, cpu_names: set[str]) -> str:
    if activity:
        a = activity.lower()
        if "annotation" in a or "sync" in a:
            return "other"
        if "memcpy" in a:
            return "memcpy"
        if "memset" in a:
            return "memset"
        if "kernel" in a:
            return "kernel"
        return "other"
    if annotation or name in cpu_names:  # a GPU-side copy of a record_function range
        return "other"
    if name.startswith("Memcpy"):
        return "memcpy"
    if name.startswith("Memset"):
        return "memset"
    return "kernel"


def busy_summary(events: list[tuple[str, str, float, float]]) -> dict:
    """Device time of kernels (sum), memcpy/memset (sum), and the union of all their intervals (busy
    time: overlapping kernels on several streams counted once), in ms."""
    spans = sorted((start, start + dur) for _, kind, start, dur in events if kind != "other")
    union, end = 0.0, None
    cur_start = None
    for s, e in spans:
        if end is None or s > end:
            if end is not None:
                union += end - cur_start
            cur_start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        union += end - cur_start
    kernels = [dur for _, kind, _, dur in events if kind == "kernel"]
    memops = [dur for _, kind, _, dur in events if kind in ("memcpy", "memset")]
    return {"kernels": len(kernels), "kernel_ms": sum(kernels) / 1e3, "memops": len(memops),
            "memop_ms": sum(memops) / 1e3, "busy_ms": union / 1e3,
            "span_ms": (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0,
            "other_events": sum(1 for _, kind, _, _ in events if kind == "other")}


# ---- the suite ----------------------------------------------------------------------------------------------

class Suite:
    """Models, pipelines and output files shared by the rows."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.dtype = getattr(torch, args.dtype)
        self._model_key = None
        self._model = None
        self.pipes: dict[tuple, tuple[Pipeline, bool]] = {}  # key -> (pipe, warmed with a full decode)
        self.compiled_forward = None
        self.records: list[dict] = []
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / "results.jsonl"
        self.jsonl.write_text("")
        self.conditions: dict = {}
        self.started = time.perf_counter()
        self.guides: dict[tuple, str] = {}  # (family, shape) -> directory of its random guide

    # -- output --
    def write(self, record: dict) -> None:
        self.records.append(record)
        save_record(self.out, record, markdown(self.records, self.args))

    # -- models and pipelines --
    def model(self, family: str, shape: str):
        key = (family, shape)
        if self._model_key != key:
            self.release_model()
            started = time.perf_counter()
            self._model = bench_model(family, dtype=self.dtype, device=self.device, seed=0, shape=shape)
            if _is_cuda(self.device):
                torch.cuda.synchronize()
            self._model_key = key
            self.write({"type": "setup", "what": f"model {family} {shape}", "seconds": time.perf_counter() - started,
                        "elapsed_s": self.elapsed()})
        return self._model

    def release_model(self) -> None:
        """Drop the model, its pipelines and every compiled graph of it (a new model compiles anew anyway)."""
        had_model = self._model is not None
        self.pipes.clear()
        self.compiled_forward = None
        self._model, self._model_key = None, None
        if had_model:
            _best_effort(torch._dynamo.reset, "torch._dynamo.reset()")
        gc.collect()
        if _is_cuda(self.device):
            torch.cuda.empty_cache()

    def pipe(self, row: Row) -> tuple[Pipeline, bool]:
        key = (row.family, row.shape, row.recipe, row.mode, row.batch, row.prompt_len, row.gen_length,
               row.block_length, row.steps)
        if key not in self.pipes:
            execution = {"mode": row.mode}
            if row.mode != "eager" and self.args.backend:
                execution["backend"] = self.args.backend
            plugins = [dict(p) for p in RECIPES[row.recipe]]
            for p in plugins:
                if p["name"] in ("dare_kv", "dare_o") and self.args.reuse_row_budget is not None:
                    p["row_budget"] = self.args.reuse_row_budget
                if p.get("guide") == GUIDE:
                    p["guide"] = self.guide(row.family, row.shape)
            recipe = {"name": row.recipe, "plugins": plugins, "execution": execution,
                      "generation": {"gen_length": row.gen_length, "block_length": row.block_length,
                                     "steps": row.steps}}
            self.pipes[key] = (Pipeline(self.model(row.family, row.shape), recipe), False)
        return self.pipes[key]

    def guide(self, family: str, shape: str) -> str:
        """The directory of a random-weight guide (`--guide-shape`) of the model's vocabulary, built
        from a config once and saved under --out (no tokenizer: neither has one, the sizes match)."""
        key = (family, shape)
        if key not in self.guides:
            from transformers import Qwen2Config, Qwen2ForCausalLM

            started = time.perf_counter()
            cfg = self.model(family, shape).config
            config = Qwen2Config(vocab_size=cfg.vocab_size, bos_token_id=None, eos_token_id=cfg.eos_token_id,
                                 pad_token_id=cfg.pad_token_id, **GUIDE_SHAPES[self.args.guide_shape])
            torch.manual_seed(0)
            directory = self.out / f"guide-{self.args.guide_shape}-{family}-{shape}"
            Qwen2ForCausalLM(config).to(self.dtype).save_pretrained(directory)
            self.guides[key] = str(directory)
            self.write({"type": "setup", "what": f"random {self.args.guide_shape} guide for {family} {shape}",
                        "seconds": time.perf_counter() - started, "elapsed_s": self.elapsed()})
        return self.guides[key]

    def mark_warm(self, row: Row, pipe: Pipeline) -> None:
        for key, (p, _) in self.pipes.items():
            if p is pipe:
                self.pipes[key] = (p, True)

    def prompts(self, row: Row):
        model = self.model(row.family, row.shape)
        return bench_prompts(row.batch, row.prompt_len, seed=0, vocab=prompt_vocab(model.config))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def after_interrupt(self) -> None:
        """A row was cut short (maybe inside a compile): drop compiled state and warmed pipelines."""
        self.pipes.clear()
        self.compiled_forward = None
        _best_effort(torch._dynamo.reset, "torch._dynamo.reset()")
        gc.collect()


def measure_decode(suite: Suite, row: Row) -> dict:
    device = suite.device
    pipe, warmed = suite.pipe(row)
    prompts = suite.prompts(row)
    reset_peak(device)
    res: dict = {}
    if not warmed:
        overrides = short_warmup(row) if row.mode == "eager" else {}
        start = clock(device)
        out = pipe.generate(prompts, **overrides)
        res["warmup_s"] = clock(device) - start
        res["warmup"] = "first block" if overrides else "full decode"
        ex = execution_stats(out)
        res["compile_time_s"] = ex.get("compile_time_s")
        res["compiles"] = ex.get("compiles")
        res["regions"], res["regions_error"] = ex.get("regions"), ex.get("regions_error")
        if not overrides:
            suite.mark_warm(row, pipe)
    else:
        res["warmup"] = "reused a warmed pipeline"
    walls, timed_compile = [], 0.0
    out = None
    for _ in range(suite.args.repeats):
        start = clock(device)
        out = pipe.generate(prompts)
        walls.append(clock(device) - start)
        timed_compile += execution_stats(out).get("compile_time_s") or 0.0
    if row.mode != "eager":
        suite.mark_warm(row, pipe)
    ex = execution_stats(out)
    nfe = out.stats.nfe
    ms = [w / nfe * 1e3 for w in walls]
    med_wall = statistics.median(walls)
    res.update({
        "nfe": nfe, "wall_s": walls, "ms_per_step": spread(ms),
        "tokens_per_s": row.batch * row.gen_length / med_wall,
        "stats_tokens_per_s": out.stats.tokens_per_second,
        "execution": ex, "resolved_mode": ex.get("mode"), "eager_reason": ex.get("eager_reason"),
        "eager_forwards": ex.get("eager_forwards"), "timed_compile_time_s": timed_compile,
        "peak_mem_gib": peak_gib(device),
    })
    if "guided_diffusion" in out.stats.plugins:  # the guide's forwards, rows, FLOPs and agreement
        res["guided"] = out.stats.plugins["guided_diffusion"]
    if res.get("warmup") == "full decode":
        res["compile_est_s"] = res["warmup_s"] - med_wall  # the warm-up's extra time over a timed decode
    return res


def measure_profile(suite: Suite, row: Row) -> dict:
    from torch.profiler import ProfilerActivity, profile

    device = suite.device
    pipe, warmed = suite.pipe(row)
    prompts = suite.prompts(row)
    reset_peak(device)
    res: dict = {"warmup": "reused a warmed pipeline" if warmed else "full decode"}
    if not warmed:
        pipe.generate(prompts)
        suite.mark_warm(row, pipe)
    start = clock(device)
    out = pipe.generate(prompts)
    unprofiled = clock(device) - start
    cuda = _is_cuda(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False) as prof:
        start = clock(device)
        out = pipe.generate(prompts)
        wall = clock(device) - start
    started = time.perf_counter()
    nfe = out.stats.nfe
    res.update({"nfe": nfe, "profiled_wall_ms": wall * 1e3, "unprofiled_wall_ms": unprofiled * 1e3,
                "ms_per_step_profiled": wall / nfe * 1e3, "ms_per_step_unprofiled": unprofiled / nfe * 1e3,
                "resolved_mode": execution_stats(out).get("mode"), "peak_mem_gib": peak_gib(device)})
    if not cuda:
        res["cpu_events"] = len(prof.profiler.kineto_results.events())
        res["busy_fraction"] = "n/a on cpu"
        return res
    events, method = device_events(prof)
    busy = busy_summary(events)
    res.update(busy)
    res.update({"method": method, "parse_s": time.perf_counter() - started,
                "busy_fraction": busy["busy_ms"] / (wall * 1e3),
                "busy_fraction_unprofiled": busy["busy_ms"] / (unprofiled * 1e3),
                "kernel_sum_fraction": busy["kernel_ms"] / (wall * 1e3),
                "device_ms_per_forward": busy["busy_ms"] / nfe})
    if not events:
        res["note"] = "no device events recorded (CUPTI unavailable?)"
    return res


def measure_forward(suite: Suite, row: Row) -> dict:
    device = suite.device
    model = suite.model(row.family, row.shape)
    x = torch.randint(0, prompt_vocab(model.config), (1, row.rows), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    cuda = _is_cuda(device)
    reset_peak(device)
    res: dict = {}
    if row.mode == "eager":
        fn = model
    else:
        if suite.compiled_forward is None:
            suite.compiled_forward = torch.compile(model, mode=F_COMPILED, dynamic=False)
        fn = suite.compiled_forward

    def call():
        if cuda and row.mode != "eager":
            torch.compiler.cudagraph_mark_step_begin()
        return fn(x)

    with torch.inference_mode():
        start = clock(device)
        call()
        res["first_call_s"] = clock(device) - start  # the compile, for the compiled model
        for _ in range(2):  # CUDA graph trees record on the second/third call
            call()
        samples = []
        for _ in range(max(1, suite.args.repeats) + 1):
            start = clock(device)
            for _ in range(suite.args.f_iters):
                call()
            samples.append((clock(device) - start) / suite.args.f_iters * 1e3)
    res.update({"ms_per_forward": spread(samples), "iters_per_sample": suite.args.f_iters,
                "peak_mem_gib": peak_gib(device)})
    if row.mode != "eager":
        res["compile_time_s"] = res["first_call_s"]
    return res


MEASURE = {"decode": measure_decode, "profile": measure_profile, "forward": measure_forward}


def run_row(suite: Suite, row: Row) -> dict:
    """The measurements of one row (a dict merged into its record); raises on failure."""
    return MEASURE[row.kind](suite, row)


# ---- rows ---------------------------------------------------------------------------------------------------

def plan_rows(args) -> list[Row]:
    family, shape = "llada", args.shape
    dream_shape = args.dream_shape or ("dream-7b" if shape == "llada-8b" else shape)
    modes = args.modes
    graph_mode = next((m for m in reversed(modes) if m != "eager"), modes[-1])
    base = {"prompt_len": args.prompt_len, "gen_length": args.gen_length, "block_length": args.block_length}
    rows: dict[str, list[Row]] = {g: [] for g in GROUP_ORDER}

    def decode(sub, recipes, fam, shp, batch, steps):
        for recipe in recipes:
            for mode in modes:
                tag = f"{sub}.{recipe}" + (f".b{batch}" if batch != 1 else "") + (".dream" if fam == "dream" else "")
                rows[sub].append(Row(id=f"{tag}.{mode}", group=sub[0], sub=sub, kind="decode", family=fam,
                                     shape=shp, mode=mode, recipe=recipe, batch=batch, steps=steps, **base))

    decode("A1", ["baseline", "dual_cache", "prefix_cache"], family, shape, 1, args.steps)
    rows["D"].append(Row(id=f"D.dual_cache.{graph_mode}", group="D", sub="D", kind="profile", family=family,
                         shape=shape, mode=graph_mode, recipe="dual_cache", batch=1, steps=args.steps, **base))
    decode("B1", ["dual_cache"], family, shape, args.b_batch, args.b_steps)
    decode("A2", ["dare_kv", "dare_o", "dllm_cache", "dual_cache+dare_kv"], family, shape, 1, args.reuse_steps)
    decode("E", ["baseline", "prefix_cache", "dual_cache", "dare_kv"], "dream", dream_shape, 1, args.steps)
    f_modes = ["eager"] + ([F_COMPILED] if any(m != "eager" for m in modes) else [])
    for mode in f_modes:
        for n in args.f_rows:
            rows["F"].append(Row(id=f"F.rows{n}.{mode}", group="F", sub="F", kind="forward", family=family,
                                 shape=shape, mode=mode, rows=n))
    decode("B2", ["baseline", "prefix_cache"], family, shape, args.b_batch, args.b_steps)
    decode("G", ["guided", "dual_cache+guided"], family, shape, 1, args.steps)
    decode("G", ["dual_cache+guided"], "dream", dream_shape, 1, args.steps)
    ordered = [r for g in GROUP_ORDER for r in rows[g]]
    if args.only:
        wanted = {t.strip().upper() for item in args.only for t in item.split(",") if t.strip()}
        ordered = [r for r in ordered if {r.group, r.sub, r.id.upper()} & wanted]
    return ordered


# ---- the run loop -------------------------------------------------------------------------------------------

class _Alarm:
    """SIGALRM after `seconds` raising Interrupted(reason); a no-op off the main thread or without SIGALRM."""

    def __init__(self, seconds: float, reason: str):
        self.seconds, self.reason, self.armed = seconds, reason, False
        self.usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def _fire(self, signum, frame):
        if self.armed:
            self.armed = False
            raise Interrupted(self.reason)

    def __enter__(self):
        if self.usable:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1e-3))
        return self

    def __exit__(self, *exc):
        if self.usable:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def _best_effort(fn, what: str) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - cleanup between rows must not stop the suite
        print(f"warning: {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def run_suite(suite: Suite, rows: list[Row]) -> None:
    args = suite.args
    budget_hit = False
    for row in rows:
        record = {"type": "row", **asdict(row), "mode_label": MODE_LABEL.get(row.mode, row.mode)}
        left = args.budget_s - suite.elapsed()
        if budget_hit or left <= 0:
            budget_hit = True
            record.update(status="skipped (budget)", elapsed_s=suite.elapsed())
            suite.write(record)
            print(f"[{suite.elapsed():7.1f}s] {row.id}: skipped (budget)", flush=True)
            continue
        limit, reason = (left, "budget") if left <= args.row_timeout_s else (args.row_timeout_s, "timeout")
        started = time.perf_counter()
        try:
            with _Alarm(limit, reason):
                record.update(run_row(suite, row))
            record["status"] = "ok"
        except Interrupted as stop:
            took = time.perf_counter() - started
            if stop.reason == "budget":
                budget_hit = True
                record["status"] = f"skipped (budget): interrupted after {took:.0f} s"
            else:
                record["status"] = f"error: timeout after {took:.0f} s (--row-timeout-s {args.row_timeout_s:g})"
            suite.after_interrupt()
        except (SystemExit, KeyboardInterrupt):  # SIGTERM (the slot's time limit) or ^C: keep what we know
            record.update(status="killed during this row", row_s=time.perf_counter() - started,
                          elapsed_s=suite.elapsed())
            suite.write(record)
            raise
        except Exception as exc:  # noqa: BLE001 - one row's failure must not stop the suite
            record["status"] = f"error: {type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()
            gc.collect()
            if _is_cuda(suite.device):  # a broken CUDA context fails here too: later rows record it
                _best_effort(torch.cuda.empty_cache, "torch.cuda.empty_cache()")
        record["row_s"] = time.perf_counter() - started
        record["elapsed_s"] = suite.elapsed()
        suite.write(record)
        print(f"[{suite.elapsed():7.1f}s] {row.id}: {_one_line(record)}", flush=True)


def _one_line(rec: dict) -> str:
    if rec.get("status") != "ok":
        return rec.get("status", "?").splitlines()[0][:200]
    if rec["kind"] == "decode":
        ms = rec["ms_per_step"]
        text = (f"{ms['median']:.2f} ms/step ({ms['min']:.2f}-{ms['max']:.2f}), NFE {rec['nfe']}, "
                f"{rec['tokens_per_s']:.1f} tok/s, ran as {rec.get('resolved_mode')}")
        if rec["mode"] != "eager":
            text += f", compile {_compile_cell(rec)} s"
        return text
    if rec["kind"] == "profile":
        return f"busy fraction {_num(rec.get('busy_fraction'), 3)}, {rec['ms_per_step_profiled']:.2f} ms/step profiled"
    ms = rec["ms_per_forward"]
    return f"{ms['median']:.2f} ms/forward ({ms['min']:.2f}-{ms['max']:.2f})"


def conditions(args) -> dict:
    cuda = _is_cuda(args.device)
    info = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}), "
                                                            f"{torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": args.dtype, "shape": args.shape,
        "dream_shape": args.dream_shape or ("dream-7b" if args.shape == "llada-8b" else args.shape),
        "prompt_len": args.prompt_len, "gen_length": args.gen_length, "block_length": args.block_length,
        "steps (A1, D, E)": args.steps, "steps (A2)": args.reuse_steps, "batch (B)": args.b_batch,
        "steps (B)": args.b_steps, "F rows": args.f_rows, "F iters per sample": args.f_iters,
        "repeats": args.repeats, "modes": args.modes, "backend": args.backend or "executor default",
        "guide (G)": f"random {args.guide_shape}",
        "reuse row_budget": "plugin default" if args.reuse_row_budget is None else args.reuse_row_budget,
        "budget_s": args.budget_s, "row_timeout_s": args.row_timeout_s, "quick": args.quick,
        "argv": sys.argv[1:] if args.argv is None else args.argv,
    }
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional
            info[name] = None
    return info


# ---- markdown -----------------------------------------------------------------------------------------------

def _num(x, digits: int = 1) -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{x:.{digits}f}"
    return "n/a" if x is None else str(x)


def _spread(s: dict | None, digits: int = 2) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _short(text: str, n: int = 90) -> str:
    text = text.splitlines()[0] if text else ""
    return (text[: n - 1] + "…" if len(text) > n else text).replace("|", "/")


def markdown(records: list[dict], args) -> str:
    lines = ["# GPU suite", ""]
    cond = next((r for r in records if r.get("type") == "conditions"), None)
    if cond:
        lines.append("Conditions: " + "; ".join(f"{k}: {v}" for k, v in cond["conditions"].items() if k != "argv"))
        lines.append("")
    rows = [r for r in records if r.get("type") == "row"]
    modes = list(args.modes)
    labels = [MODE_LABEL.get(m, m) for m in modes]

    decode = [r for r in rows if r["kind"] == "decode"]
    if decode:
        table: dict[tuple, dict[str, dict]] = {}
        for r in decode:
            key = (r["sub"], r["family"], r["shape"], r["recipe"], r["batch"], r["steps"], r["gen_length"])
            table.setdefault(key, {})[r["mode"]] = r
        lines.append(f"## Decoding (A, B, E, G): ms per step, median (min-max) of {args.repeats} timed decodes "
                     f"after a warm-up")
        lines.append("")
        head = ["group", "model", "recipe", "batch", "gen/steps", "NFE"]
        head += [f"{lab} ms/step" for lab in labels]
        head += [f"speed-up {lab}" for lab in labels[1:]]
        head += [f"{lab} tok/s" for lab in labels]
        compiled = [m for m in modes if m != "eager"]
        head += [f"compile s {MODE_LABEL.get(m, m)} (stats / warm-up extra)" for m in compiled]
        head += ["peak GiB " + " / ".join(labels), "notes"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (sub, family, shape, recipe, batch, steps, gen), per in table.items():
            ok = {m: r for m, r in per.items() if r.get("status") == "ok"}
            nfe = next((r["nfe"] for r in ok.values()), "-")
            cells = [sub, f"{family} {shape}", recipe, str(batch), f"{gen}/{steps}", str(nfe)]
            cells += [_spread(ok[m]["ms_per_step"]) if m in ok else "-" for m in modes]
            first = ok.get(modes[0])
            for m in modes[1:]:
                if first and m in ok:
                    cells.append(f"{first['ms_per_step']['median'] / ok[m]['ms_per_step']['median']:.2f}x")
                else:
                    cells.append("-")
            cells += [_num(ok[m]["tokens_per_s"]) if m in ok else "-" for m in modes]
            cells += [_compile_cell(ok.get(m)) for m in compiled]
            cells.append(" / ".join(_num(ok[m].get("peak_mem_gib"), 2) if m in ok else "-" for m in modes))
            cells.append(_notes(per, modes))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    prof = [r for r in rows if r["kind"] == "profile"]
    if prof:
        lines.append("## D: GPU-busy fraction of the A1 dual_cache decode (torch.profiler; busy = union of "
                     "the device intervals of kernels, memcpy, memset)")
        lines.append("")
        head = ["recipe", "mode", "batch", "NFE", "wall ms (profiled)", "ms/step profiled / unprofiled",
                "device busy ms", "busy fraction", "busy vs unprofiled wall", "kernel ms (sum)", "kernels",
                "device ms/forward", "notes"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in prof:
            if r.get("status") != "ok":
                lines.append(f"| {r['recipe']} | {r['mode']} | {r['batch']} |" + " - |" * 9 + f" {_short(r['status'])} |")
                continue
            cells = [r["recipe"], str(r.get("resolved_mode") or r["mode"]), str(r["batch"]), str(r["nfe"]),
                     _num(r["profiled_wall_ms"]),
                     f"{r['ms_per_step_profiled']:.2f} / {r['ms_per_step_unprofiled']:.2f}",
                     _num(r.get("busy_ms", "n/a on cpu")), _num(r.get("busy_fraction"), 3),
                     _num(r.get("busy_fraction_unprofiled", "n/a on cpu"), 3),
                     _num(r.get("kernel_ms", "n/a on cpu")), _num(r.get("kernels", "n/a")),
                     _num(r.get("device_ms_per_forward", "n/a on cpu"), 2), _short(r.get("note", ""))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    fwd = [r for r in rows if r["kind"] == "forward"]
    if fwd:
        lines.append("## F: plain model forward (batch 1, no decoding loop): ms per forward, median (min-max)")
        lines.append("")
        f_modes = list(dict.fromkeys(r["mode"] for r in fwd))
        head = ["model", "rows"] + [f"{m} ms" for m in f_modes] + [f"speed-up {m}" for m in f_modes[1:]]
        head += [f"compile s {m}" for m in f_modes[1:]] + ["peak GiB " + " / ".join(f_modes), "notes"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by_rows: dict[tuple, dict[str, dict]] = {}
        for r in fwd:
            by_rows.setdefault((r["shape"], r["rows"]), {})[r["mode"]] = r
        for (shape, n), per in by_rows.items():
            ok = {m: r for m, r in per.items() if r.get("status") == "ok"}
            cells = [f"llada {shape}", str(n)]
            cells += [_spread(ok[m]["ms_per_forward"]) if m in ok else "-" for m in f_modes]
            for m in f_modes[1:]:
                base = ok.get(f_modes[0])
                cells.append(f"{base['ms_per_forward']['median'] / ok[m]['ms_per_forward']['median']:.2f}x"
                             if base and m in ok else "-")
            cells += [_num(ok[m].get("compile_time_s")) if m in ok else "-" for m in f_modes[1:]]
            cells.append(" / ".join(_num(ok[m].get("peak_mem_gib"), 2) if m in ok else "-" for m in f_modes))
            cells.append(_notes(per, f_modes))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    skipped = [r for r in rows if r.get("status", "").startswith("skipped")]
    errors = [r for r in rows if r.get("status", "").startswith("error")]
    if skipped or errors:
        lines.append("## Not measured")
        lines.append("")
        lines += [f"- {r['id']}: {_short(r['status'], 300)}" for r in errors + skipped]
        lines.append("")
    done = [r for r in records if r.get("type") == "end"]
    if done:
        lines.append(f"Suite wall time: {done[-1]['elapsed_s']:.1f} s "
                     f"({sum(r.get('status') == 'ok' for r in rows)} of {len(rows)} rows measured).")
    return "\n".join(lines) + "\n"


def _compile_cell(r: dict | None) -> str:
    if not r or r.get("mode") == "eager":
        return "-"
    if r.get("warmup") != "full decode":
        return "0 (warm)"
    stat, extra = r.get("compile_time_s"), _num(r.get("compile_est_s"))
    return f"{stat:.1f} / {extra}" if isinstance(stat, (int, float)) else f"n/a / {extra}"


def _notes(per: dict[str, dict], modes: list[str]) -> str:
    notes = []
    for m in modes:
        r = per.get(m)
        label = MODE_LABEL.get(m, m)
        if r is None:
            continue
        if r.get("status") != "ok":
            notes.append(f"{label}: {_short(r.get('status', '?'), 80)}")
            continue
        resolved = r.get("resolved_mode")
        if r["kind"] == "decode" and resolved and resolved != m:
            notes.append(f"{label} ran as {resolved}")
        if r["kind"] == "decode" and r.get("execution") == {}:
            notes.append(f"{label}: no execution stats")
        if r.get("eager_forwards"):
            notes.append(f"{label}: {r['eager_forwards']} eager forwards ({_short(str(r.get('eager_reason')), 60)})")
        if r.get("timed_compile_time_s"):
            notes.append(f"{label}: compiled during timing ({r['timed_compile_time_s']:.1f} s)")
    return "; ".join(notes)


# ---- entry point --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_suite_out", help="output directory (results.jsonl, results.md)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llada-8b", choices=sorted(SHAPES), help="LLaDA shape of A, B, D, F")
    ap.add_argument("--dream-shape", default=None, choices=sorted(SHAPES),
                    help="shape of E (default: dream-7b with llada-8b, else --shape)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--guide-shape", default=None, choices=sorted(GUIDE_SHAPES),
                    help="shape of G's random guide (default: qwen2.5-0.5b, tiny with --shape tiny)")
    ap.add_argument("--modes", nargs="+", default=["eager", "cuda_graphs"],
                    choices=["auto", "eager", "compiled", "cuda_graphs"])
    ap.add_argument("--backend", default=None, choices=["inductor", "aot_eager", "eager"],
                    help="execution.backend of the non-eager modes (default: the executor's)")
    ap.add_argument("--reuse-row-budget", type=float, default=None,
                    help="row_budget option of dare_kv / dare_o (compiled execution; default: the plugin's)")
    ap.add_argument("--only", nargs="+", default=None, metavar="ROWS",
                    help="row groups (A B D E F), sub-groups (A1 A2 B1 B2) or row ids; space or comma separated")
    ap.add_argument("--repeats", type=int, default=2, help="timed decodes per row after one warm-up")
    ap.add_argument("--quick", action="store_true", help="gen_length and every steps count / 4 (first two blocks)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=None, help="default 256 (64 with --quick)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="steps of A1, D, E (default gen_length)")
    ap.add_argument("--reuse-steps", type=int, default=None, help="steps of A2 (default gen_length / 4)")
    ap.add_argument("--b-batch", type=int, default=32)
    ap.add_argument("--b-steps", type=int, default=None, help="steps of B (default gen_length / 4)")
    ap.add_argument("--f-rows", type=lambda s: [int(x) for x in s.split(",")], default=[32, 768],
                    help="row counts of F, comma separated")
    ap.add_argument("--f-iters", type=int, default=10, help="F: forwards per timing sample")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--row-timeout-s", type=float, default=150.0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on --device cpu)")
    ap.add_argument("--inductor-cache-dir", default=None,
                    help="TORCHINDUCTOR_CACHE_DIR (a directory kept between runs makes later compiles cheaper)")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    if args.gen_length is None:
        args.gen_length = 64 if args.quick else 256
    if args.guide_shape is None:
        args.guide_shape = "tiny" if args.shape == "tiny" else "qwen2.5-0.5b"
    if args.steps is None:
        args.steps = args.gen_length
    quarter = max(args.gen_length // args.block_length, args.gen_length // 4)
    args.reuse_steps = args.reuse_steps or quarter
    args.b_steps = args.b_steps or quarter
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inductor_cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.inductor_cache_dir).resolve())
    if _is_cuda(args.device) and not torch.cuda.is_available():
        print("--device cuda but torch sees no CUDA device (use --device cpu --shape tiny for a smoke run)",
              file=sys.stderr)
        return 2
    if args.threads or not _is_cuda(args.device):
        torch.set_num_threads(args.threads or 1)
    suite = Suite(args)
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _terminate)
    else:
        previous_term = None
    try:
        suite.conditions = conditions(args)
        suite.write({"type": "conditions", "conditions": suite.conditions})
        print("Conditions: " + "; ".join(f"{k}: {v}" for k, v in suite.conditions.items() if k != "argv"),
              flush=True)
        rows = plan_rows(args)
        print(f"{len(rows)} rows: " + " ".join(r.id for r in rows), flush=True)
        run_suite(suite, rows)
    finally:
        suite.write({"type": "end", "elapsed_s": suite.elapsed()})
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        print()
        print(markdown(suite.records, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
