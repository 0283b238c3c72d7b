"""Reports rebuilt from results files: a markdown table per setting in the Fast-dLLM layout, a CSV of
every run, and plots (accuracy against speed-up with the Pareto front, reuse against threshold,
each strategy's additive gain).

Tokens/s of a run = the median over its timed repeats (timing.py), else its single pass's.
Speed-up of a run = its tokens/s / the tokens/s of its baseline: the run without any of the
ablation's plugins whose recipe is otherwise identical (same sweep values, tasks, limit, batch size).
Additive gain of strategy S over combination C (C without S, both measured) = speed-up(C+S) /
speed-up(C) = tokens/s(C+S) / tokens/s(C).

Intervals: a ratio a / b of two timed runs ranges over [min(a) / max(b), max(a) / min(b)] (the
extremes of the repeats); a gain whose interval contains 1.0 is "within noise". NFE and FLOPs are
exact (deterministic decoding) and have no interval.
"""

from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path

from .results import dedupe
from .runner import accuracy_mean
from .timing import tokens_per_second as timed_tps

PLOTS = ("accuracy_vs_speedup.png", "reuse_vs_threshold.png", "additive_gain.png")


def _is_plugin_key(key: str) -> bool:
    return key.startswith("plugins.") and key.count(".") >= 2


def canonical(record: dict, drop=()) -> str:
    """What identifies a run up to the plugins in `drop`: the recipe without its name, description
    and the dropped plugins (the others sorted by name), with the tasks, limit and batch size."""
    recipe = dict(record.get("recipe") or {})
    recipe.pop("name", None)
    recipe.pop("description", None)
    plugins = [p for p in recipe.get("plugins") or [] if p.get("name") not in set(drop)]
    recipe["plugins"] = sorted(plugins, key=lambda p: p.get("name", ""))
    return json.dumps({"recipe": recipe, "tasks": record.get("tasks"), "limit": record.get("limit"),
                       "batch_size": record.get("batch_size")}, sort_keys=True, default=str)


class Analysis:
    """Derived numbers of a set of records: baselines, speed-ups, additive gains."""

    def __init__(self, records: list[dict], metric: str | None = None):
        self.records = dedupe(records)
        self.metric = metric or next((r.get("metric") for r in self.records if r.get("metric")), "exact_match")
        self.ok = [r for r in self.records if r.get("status") == "ok"]
        # a skipped record is dropped when a run with the same plugins and sweep values was measured
        # (a plugin registered since), as it no longer describes anything missing
        measured = {(r.get("ablation"), r.get("name")) for r in self.records if r.get("status") != "skipped"}
        self.skipped = [r for r in self.records if r.get("status") == "skipped"
                        and (r.get("ablation"), r.get("name")) not in measured]
        self.failed = [r for r in self.records if r.get("status") == "failed"]
        self.by_canonical = {canonical(r): r for r in self.ok}
        self.baselines = {canonical(r): r for r in self.ok if not r.get("plugins")}

    # ---- per run --------------------------------------------------------------------------------
    def accuracy(self, r: dict) -> float | None:
        return accuracy_mean(r.get("accuracy"), self.metric)

    @staticmethod
    def tps(r: dict) -> float | None:
        """The median tokens/s over the timed repeats, else the single pass's."""
        timed = timed_tps(r)
        if timed is not None:
            return timed["median"]
        v = (r.get("metrics") or {}).get("tokens_per_second")
        return v if isinstance(v, (int, float)) and v > 0 else None

    @staticmethod
    def tps_range(r: dict) -> tuple[float, float] | None:
        """(min, max) tokens/s over the timed repeats (needs two of them); None otherwise."""
        timed = timed_tps(r)
        if timed is None or (timed.get("n") or 0) < 2 or not timed.get("min"):
            return None
        return timed["min"], timed["max"]

    def ratio_interval(self, a: dict, b: dict) -> tuple[float, float] | None:
        """[min(a) / max(b), max(a) / min(b)] of tokens/s, when both runs have timed repeats."""
        ra, rb = self.tps_range(a), self.tps_range(b)
        if ra is None or rb is None:
            return None
        return ra[0] / rb[1], ra[1] / rb[0]

    @staticmethod
    def time_spread(r: dict, field: str) -> dict | None:
        """The spread (median, q1, q3, min, max) of a timing field per request, or None."""
        timing = r.get("timing")
        s = timing.get(field) if isinstance(timing, dict) else None
        requests = (r.get("metrics") or {}).get("requests") or 0
        if not isinstance(s, dict) or not requests:
            return None
        return {k: v / requests for k, v in s.items() if k in ("median", "q1", "q3", "min", "max")}

    @staticmethod
    def flops_per_request(r: dict) -> float | None:
        v = (r.get("metrics") or {}).get("flops_per_request")
        return v if isinstance(v, (int, float)) and v > 0 else None

    def baseline(self, r: dict) -> dict | None:
        return self.baselines.get(canonical(r, r.get("plugins") or ()))

    def speedup(self, r: dict) -> float | None:
        base = self.baseline(r)
        if base is None or self.tps(r) is None or self.tps(base) is None:
            return None
        return self.tps(r) / self.tps(base)

    def speedup_interval(self, r: dict) -> tuple[float, float] | None:
        base = self.baseline(r)
        if base is None or base is r:
            return None
        return self.ratio_interval(r, base)

    @staticmethod
    def _machine(r: dict) -> tuple:
        h = r.get("hardware") or {}
        return tuple(h.get(k) for k in ("platform", "machine", "processor", "cpu_count", "torch_threads", "device",
                                        "gpu", "ranks"))  # ranks: data-parallel processes (absent = 1)

    def other_hardware(self, r: dict) -> bool:
        """The run and its baseline ran on different hardware (merged shards): tokens/s do not compare."""
        base = self.baseline(r)
        return base is not None and self._machine(base) != self._machine(r)

    def flops_ratio(self, r: dict) -> float | None:
        base = self.baseline(r)
        if base is None or self.flops_per_request(r) is None or self.flops_per_request(base) is None:
            return None
        return self.flops_per_request(base) / self.flops_per_request(r)

    @staticmethod
    def reuse(r: dict) -> float | None:
        return ((r.get("reuse") or {}).get("flops"))

    # ---- across runs ----------------------------------------------------------------------------
    def additive_gains(self) -> list[dict]:
        """For each measured C+S whose C (the same run without S) was measured too:
        {strategy: S, combination: C's label, with: C+S's label, gain: tokens/s(C+S) / tokens/s(C),
        low / high: the gain's interval over the repeats (None without repeats), within_noise: the
        interval contains 1.0}."""
        out = []
        for r in self.ok:
            plugins = r.get("plugins") or []
            for s in plugins:
                c = self.by_canonical.get(canonical(r, [s]))
                if c is None or sorted(c.get("plugins") or []) != sorted(p for p in plugins if p != s):
                    continue
                if self.tps(r) is None or self.tps(c) is None:
                    continue
                interval = self.ratio_interval(r, c)
                out.append({"strategy": s, "combination": c.get("name"), "with": r.get("name"),
                            "ablation": r.get("ablation"), "gain": self.tps(r) / self.tps(c),
                            "low": interval[0] if interval else None, "high": interval[1] if interval else None,
                            "within_noise": None if interval is None else interval[0] <= 1.0 <= interval[1]})
        return out

    def sections(self) -> OrderedDict[tuple, list[dict]]:
        """Records grouped by ablation, model, tasks, limit, batch size and the non-plugin sweep values."""
        groups: OrderedDict[tuple, list[dict]] = OrderedDict()
        for r in sorted(self.records, key=lambda r: (str(r.get("ablation")), r.get("index") or 0)):
            if r.get("status") == "skipped" and r not in self.skipped:
                continue
            ctx = tuple((k, json.dumps(v)) for k, v in (r.get("sweep") or {}).items() if not _is_plugin_key(k))
            model = (r.get("recipe") or {}).get("model")
            key = (r.get("ablation"), model, tuple(r.get("tasks") or ()), r.get("limit"), r.get("batch_size"), ctx)
            groups.setdefault(key, []).append(r)
        return groups


# ---- formatting -----------------------------------------------------------------------------------

def _f(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{fmt}}{suffix}"


def row_label(r: dict) -> str:
    plugins = r.get("plugins") or []
    label = "baseline" if not plugins else " + ".join(plugins)
    own = [f"{k.split('.', 2)[1]}.{k.split('.', 2)[2]}={v}" for k, v in (r.get("sweep") or {}).items()
           if _is_plugin_key(k)]
    return f"{label} ({', '.join(own)})" if own else label


def _section_title(key: tuple) -> str:
    ablation, model, tasks, limit, batch, ctx = key
    parts = [f"{k}={json.loads(v)}" for k, v in ctx]
    parts += [f"model {model}", f"tasks {', '.join(tasks)}", f"limit {limit}", f"batch {batch}"]
    return f"{ablation} — " + " · ".join(parts)


def markdown(an: Analysis, plots: list[str] = ()) -> str:
    lines = ["# Ablation report", ""]
    n_ok, n_failed, n_skipped = len(an.ok), len(an.failed), len(an.skipped)
    counts = [len((r.get("timing") or {}).get("samples") or []) for r in an.ok]
    repeats = sorted(set(counts) - {0})
    timed = (f"median over {'/'.join(map(str, repeats))} timed repeats per run (after an untimed first pass, "
             f"round-robin across the runs), [min, max] in brackets" if repeats else
             "one pass per run (no timed repeats: no spread)")
    if repeats and 0 in counts:
        timed += f" ({counts.count(0)} run(s) without repeats: their single pass, no spread)"
    lines.append(f"{len(an.records)} runs: {n_ok} measured, {n_failed} failed, {n_skipped} skipped. "
                 f"Accuracy: `{an.metric}` x 100 (mean over the groups, else over the tasks, in the run's "
                 f"own columns per task). Times: {timed}; tokens/s: generated tokens per second of decoding; "
                 f"s/req and CPU s/req: decoding wall time and process CPU time per request. Speed-up: "
                 f"tokens/s over the run without the ablation's plugins and otherwise the same recipe, with "
                 f"[min/max, max/min] of the repeats. NFE/req, GFLOPs/req, FLOPs x (that run's estimated "
                 f"FLOPs per request over this one's) and reuse (share of the FLOPs of plain full-canvas "
                 f"forwards at the same NFE not computed) are exact counts.")
    lines.append("")
    for key, rows in an.sections().items():
        measured = [r for r in rows if r.get("status") != "skipped"]
        tasks: list[str] = []
        for r in measured:
            for t in (r.get("accuracy") or {}):
                if t not in tasks:
                    tasks.append(t)
        lines += [f"## {_section_title(key)}", ""]
        if measured:
            head = ["strategy", *tasks, "mean", "tokens/s", "speed-up", "s/req", "CPU s/req", "NFE/req", "GFLOPs/req",
                    "FLOPs x", "reuse"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
            for r in measured:
                if r.get("status") == "failed":
                    err = r.get("error") or {}
                    cells = [row_label(r), *(["-"] * (len(head) - 2)), f"failed: {err.get('type')}"]
                    lines.append("| " + " | ".join(cells) + " |")
                    continue
                acc = r.get("accuracy") or {}
                m = r.get("metrics") or {}
                cells = [row_label(r)]
                cells += [_f((acc.get(t) or {}).get(an.metric) * 100 if isinstance((acc.get(t) or {}).get(an.metric),
                                                                                  (int, float)) else None, ".1f")
                          for t in tasks]
                mean = an.accuracy(r)
                mark = " †" if an.other_hardware(r) and an.speedup(r) is not None else ""
                cells += [_f(None if mean is None else mean * 100, ".1f"),
                          _f(an.tps(r), ".1f") + _bracket(an.tps_range(r), ".1f"),
                          _f(an.speedup(r), ".2f", "x" + mark) + _bracket(an.speedup_interval(r), ".2f"),
                          _spread_cell(an.time_spread(r, "decode_time_s")),
                          _spread_cell(an.time_spread(r, "decode_cpu_s")), _f(m.get("nfe_per_request"), ".1f"),
                          _f(None if an.flops_per_request(r) is None else an.flops_per_request(r) / 1e9, ".3f"),
                          _f(an.flops_ratio(r), ".2f", "x"),
                          _f(None if an.reuse(r) is None else an.reuse(r) * 100, ".0f", "%")]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        for r in rows:
            if r.get("status") == "failed":
                err = r.get("error") or {}
                lines.append(f"- failed: **{row_label(r)}** — `{err.get('type')}`: {_one_line(err.get('message'))}")
        for r in rows:
            if r.get("status") == "skipped":
                lines.append(f"- skipped: **{row_label(r)}** — {_one_line(r.get('reason'))}")
        if any(r.get("status") != "ok" for r in rows):
            lines.append("")
    if any(an.other_hardware(r) for r in an.ok):
        lines += [("† measured on other hardware than its baseline (results merged from several machines): the "
                   "speed-up compares tokens/s across machines; FLOPs x does not depend on it."), ""]
    gains = an.additive_gains()
    if gains:
        lines += ["## Additive gain per strategy", "",
                  ("speed-up(C + S) / speed-up(C) over every measured combination C without S, from the median "
                   "tokens/s; its interval [min(C + S) / max(C), max(C + S) / min(C)] spans the timed repeats. "
                   "A gain whose interval contains 1.0 is within noise: the repeats do not tell it from no gain."),
                  "", "| strategy | pairs | mean | min | max | within noise |", "|---|---:|---:|---:|---:|---:|"]
        for s, vals in _by_strategy(gains).items():
            noisy = [g for g in gains if g["strategy"] == s and g["within_noise"]]
            untimed = [g for g in gains if g["strategy"] == s and g["within_noise"] is None]
            noise = f"{len(noisy)} of {len(vals)}" + (f" ({len(untimed)} untimed)" if untimed else "")
            lines.append(f"| {s} | {len(vals)} | {_geo(vals):.2f}x | {min(vals):.2f}x | {max(vals):.2f}x | {noise} |")
        lines += ["", "(mean: geometric mean)", "", "| strategy | over | gain | interval | |",
                  "|---|---|---:|---|---|"]
        for g in gains:
            interval = "-" if g["low"] is None else f"[{g['low']:.2f}, {g['high']:.2f}]"
            verdict = {True: "within noise", False: "", None: "untimed"}[g["within_noise"]]
            lines.append(f"| {g['strategy']} | {g['combination']} | {g['gain']:.2f}x | {interval} | {verdict} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _bracket(interval, fmt: str) -> str:
    return "" if interval is None else f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def _spread_cell(spread: dict | None) -> str:
    if spread is None:
        return "-"
    return f"{spread['median']:.3g} [{spread['min']:.3g}, {spread['max']:.3g}]"


def _one_line(text) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= 300 else text[:297] + "..."


def _by_strategy(gains: list[dict]) -> OrderedDict[str, list[float]]:
    out: OrderedDict[str, list[float]] = OrderedDict()
    for g in gains:
        out.setdefault(g["strategy"], []).append(g["gain"])
    return out


def _geo(vals: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


CSV_FIELDS = ["ablation", "index", "key", "name", "label", "plugins", "sweep", "status", "reason", "error_type",
              "error_message", "tasks", "limit", "batch_size", "accuracy_metric", "accuracy_mean", "tokens_per_second",
              "tokens_per_second_min", "tokens_per_second_max", "repeats", "decode_s_per_request",
              "decode_s_per_request_min", "decode_s_per_request_max", "cpu_s_per_request", "cpu_s_per_request_min",
              "cpu_s_per_request_max", "speedup_low", "speedup_high",
              "speedup", "flops_ratio", "nfe_total", "nfe_per_request", "generated_tokens", "requests",
              "decode_time_s", "flops_total", "flops_per_request", "flops_q", "flops_kv", "flops_attn", "flops_ffn",
              "flops_lm_head", "reuse_flops", "reuse_canvas_q", "reuse_canvas_kv", "reuse_canvas_attn",
              "reuse_canvas_ffn", "reuse_fed_q", "reuse_fed_kv", "reuse_fed_attn", "reuse_fed_ffn", "reuse_plugins",
              "peak_memory_bytes", "memory_delta_bytes", "memory_method", "wall_time_s", "finished", "device"]


def _range_fields(name: str, interval) -> dict:
    return {f"{name}_min": interval[0] if interval else None, f"{name}_max": interval[1] if interval else None}


def _spread_fields(name: str, spread: dict | None) -> dict:
    spread = spread or {}
    return {name: spread.get("median"), f"{name}_min": spread.get("min"), f"{name}_max": spread.get("max")}


def csv_rows(an: Analysis) -> tuple[list[str], list[dict]]:
    tasks: list[str] = []
    for r in an.records:
        for t in (r.get("accuracy") or {}):
            if t not in tasks:
                tasks.append(t)
    acc_fields = [f"{t}.{m}" for t in tasks for m in ("exact_match", "final_match")]
    rows = []
    for r in sorted(an.records, key=lambda r: (str(r.get("ablation")), r.get("index") or 0)):
        m, reuse, mem = r.get("metrics") or {}, r.get("reuse") or {}, r.get("memory") or {}
        fl, err = m.get("flops") or {}, r.get("error") or {}
        row = {"ablation": r.get("ablation"), "index": r.get("index"), "key": r.get("key"), "name": r.get("name"),
               "label": r.get("label"), "plugins": "+".join(r.get("plugins") or []),
               "sweep": json.dumps(r.get("sweep") or {}), "status": r.get("status"), "reason": r.get("reason"),
               "error_type": err.get("type"), "error_message": _one_line(err.get("message")) if err else None,
               "tasks": ",".join(r.get("tasks") or []), "limit": r.get("limit"), "batch_size": r.get("batch_size"),
               "accuracy_metric": an.metric, "accuracy_mean": an.accuracy(r), "tokens_per_second": an.tps(r),
               **_range_fields("tokens_per_second", an.tps_range(r)),
               "repeats": len((r.get("timing") or {}).get("samples") or []) if r.get("timing") else None,
               **_spread_fields("decode_s_per_request", an.time_spread(r, "decode_time_s")),
               **_spread_fields("cpu_s_per_request", an.time_spread(r, "decode_cpu_s")),
               "speedup_low": (an.speedup_interval(r) or (None, None))[0],
               "speedup_high": (an.speedup_interval(r) or (None, None))[1],
               "speedup": an.speedup(r), "flops_ratio": an.flops_ratio(r), "nfe_total": m.get("nfe_total"),
               "nfe_per_request": m.get("nfe_per_request"), "generated_tokens": m.get("generated_tokens"),
               "requests": m.get("requests"), "decode_time_s": m.get("decode_time_s"),
               "flops_total": fl.get("total"), "flops_per_request": m.get("flops_per_request"),
               **{f"flops_{op}": fl.get(op) for op in ("q", "kv", "attn", "ffn", "lm_head")},
               "reuse_flops": reuse.get("flops"),
               **{f"reuse_canvas_{op}": (reuse.get("canvas") or {}).get(op) for op in ("q", "kv", "attn", "ffn")},
               **{f"reuse_fed_{op}": (reuse.get("fed") or {}).get(op) for op in ("q", "kv", "attn", "ffn")},
               "reuse_plugins": json.dumps(reuse.get("plugins")) if reuse.get("plugins") else None,
               "peak_memory_bytes": mem.get("peak_bytes"), "memory_delta_bytes": mem.get("delta_bytes"),
               "memory_method": mem.get("method"), "wall_time_s": r.get("wall_time_s"), "finished": r.get("finished"),
               "device": (r.get("hardware") or {}).get("gpu") or (r.get("hardware") or {}).get("device")}
        for t in tasks:
            for metric in ("exact_match", "final_match"):
                row[f"{t}.{metric}"] = ((r.get("accuracy") or {}).get(t) or {}).get(metric)
        rows.append(row)
    return CSV_FIELDS + acc_fields, rows


# ---- plots ----------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both), by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


_MARKERS = "osD^vP*Xh<>p"


def _ratio_ticks(axis) -> None:
    """Plain "2x" labels at 1, 2, 5 x 10^k on a log axis (not 2 x 10^0), unlabelled minor ticks,
    so neighbouring labels never overprint."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}x"))
    axis.set_minor_formatter(NullFormatter())


def _plot_accuracy_speedup(an: Analysis, path: Path, plt) -> bool:
    """Every run a mark of its own (colour: the setting, shape: the run) named in the legend, so no
    label overprints another; the speed-up's interval over the repeats as a horizontal bar; log x."""
    pts, labels, groups, errs = [], [], [], []
    sections = an.sections()
    for gi, (key, rows) in enumerate(sections.items()):
        for r in rows:
            s, a = an.speedup(r), an.accuracy(r)
            if r.get("status") == "ok" and s is not None and a is not None:
                pts.append((s, a))
                labels.append(row_label(r))
                groups.append(gi)
                errs.append(an.speedup_interval(r))
    if not pts:
        return False
    columns = 1 + len(pts) // 30  # legend columns: a long ablation's legend stays within the figure
    fig, ax = plt.subplots(figsize=(8 + 3.5 * columns, max(5.5, 0.16 * len(pts) / columns + 1.5)))
    cmap = plt.get_cmap("tab10")
    titles = [_section_title(k) for k in sections]
    several = len(set(groups)) > 1
    for i, ((x, y), label, gi, err) in enumerate(zip(pts, labels, groups, errs)):
        # colour: the setting; past 12 runs the shapes repeat with the next colour, so every
        # (shape, colour) pair names one run (up to 120)
        color = cmap(((gi if several else 0) + i // len(_MARKERS)) % 10)
        name = f"{label} — {titles[gi][:60]}" if several else label
        xerr = None if err is None else [[max(x - err[0], 0)], [max(err[1] - x, 0)]]
        ax.errorbar([x], [y * 100], xerr=xerr, fmt=_MARKERS[i % len(_MARKERS)], color=color, ms=7, capsize=3,
                    label=name, zorder=3)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] * 100 for i in front], "--", color="black", lw=1, zorder=2,
            label="Pareto front")
    ax.scatter([pts[i][0] for i in front], [pts[i][1] * 100 for i in front], s=200, facecolors="none",
               edgecolors="red", lw=1.5, zorder=4, label="on the Pareto front")
    ys = [p[1] * 100 for p in pts]
    ax.set_ylim(max(-2.0, min(ys) - 5), min(102.0, max(ys) + 5))
    ax.set_xscale("log")
    _ratio_ticks(ax.xaxis)
    ax.set_xlabel("speed-up over baseline (tokens/s, log scale; bars: range over the timed repeats)")
    ax.set_ylabel(f"accuracy ({an.metric}, %)")
    ax.set_title("Accuracy against speed-up")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, ncol=columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _reuse_keys(an: Analysis) -> list[str]:
    """Threshold sweeps of plugins that reuse work: a policy's threshold (threshold_decoding: how
    sure a token must be to commit) reuses nothing, its reuse is 0 everywhere, and gets no plot."""
    keys = []
    for r in an.ok:
        for k in (r.get("sweep") or {}):
            if not (_is_plugin_key(k) and k.endswith(".threshold")) or k in keys:
                continue
            plugin = k.split(".")[1]
            with_key = [x for x in an.ok if k in (x.get("sweep") or {})]
            own = [((x.get("reuse") or {}).get("plugins") or {}).get(plugin) for x in with_key]
            if any(own) or any((an.reuse(x) or 0) > 0 for x in with_key):
                keys.append(k)
    return keys


def _plot_reuse_threshold(an: Analysis, path: Path, plt) -> bool:
    keys = _reuse_keys(an)
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    drawn = False
    for ax, k in zip(axes[0], keys):
        plugin = k.split(".")[1]
        series: OrderedDict[str, list[tuple]] = OrderedDict()
        for r in an.ok:
            if k not in (r.get("sweep") or {}):
                continue
            rest = {kk: v for kk, v in r["sweep"].items() if kk != k}
            name = (r.get("label") or "") + (f" {rest}" if rest else "")
            own = ((r.get("reuse") or {}).get("plugins") or {}).get(plugin) or {}
            own_value = next(iter(own.values()), None) if own else None
            series.setdefault(name, []).append((r["sweep"][k], an.reuse(r), own_value))
        for i, (name, pts) in enumerate(series.items()):
            pts.sort(key=lambda p: p[0])
            color = plt.get_cmap("tab10")(i % 10)
            xs = [p[0] for p in pts]
            if any(p[1] is not None for p in pts):
                ax.plot(xs, [None if p[1] is None else p[1] * 100 for p in pts], "o-", color=color,
                        label=f"{name[:50]}: FLOPs not computed")
                drawn = True
            if any(p[2] is not None for p in pts):
                ax.plot(xs, [None if p[2] is None else p[2] * 100 for p in pts], "s--", color=color,
                        label=f"{name[:50]}: {plugin}'s own reuse")
                drawn = True
        ax.set_xlabel(k)
        ax.set_ylabel("reuse (%)")
        ax.set_title(f"Reuse against {plugin} threshold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def _plot_additive(an: Analysis, path: Path, plt) -> bool:
    """Each pair C -> C + S a mark at its gain with its interval over the repeats; filled when the
    interval excludes 1.0, hollow when the gain is within noise; log y."""
    gains = an.additive_gains()
    if not gains:
        return False
    by = _by_strategy(gains)
    names = list(by)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(by) + 3), 4.5))
    kinds = {True: ("within noise (interval contains 1.0)", "none"), False: ("beyond noise", None),
             None: ("no timed repeats", None)}
    drawn = set()
    for i, name in enumerate(names, 1):
        mine = [g for g in gains if g["strategy"] == name]
        for j, g in enumerate(mine):
            x = i + 0.3 * (j - (len(mine) - 1) / 2) / max(len(mine), 1)
            kind = g["within_noise"]
            label, face = kinds[kind]
            yerr = None if g["low"] is None else [[g["gain"] - g["low"]], [g["high"] - g["gain"]]]
            ax.errorbar([x], [g["gain"]], yerr=yerr, fmt="o" if kind is not None else "s", color="C0" if kind
                        else ("C1" if kind is None else "C2"), mfc=face, capsize=3, ms=6,
                        label=None if kind in drawn else label, zorder=3)
            drawn.add(kind)
        ax.scatter([i], [_geo(by[name])], marker="_", s=500, color="black", zorder=4,
                   label=None if "mean" in drawn else "geometric mean")
        drawn.add("mean")
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="no gain (1.0)")
    ax.set_yscale("log")
    _ratio_ticks(ax.yaxis)
    ax.set_ylabel("speed-up(C + S) / speed-up(C) (log scale)")
    ax.set_title("Additive gain of each strategy S over combinations C")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(records: list[dict], out_dir, metric: str | None = None) -> list[Path]:
    """Write report.md, results.csv, additive_gain.csv (when there are pairs) and the PNG plots
    (when there is something to plot) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    an = Analysis(records, metric)
    written: list[Path] = []
    plots: list[str] = []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in PLOTS:  # stale plots from an earlier report would describe other data
        (out / name).unlink(missing_ok=True)
    for name, fn in zip(PLOTS, (_plot_accuracy_speedup, _plot_reuse_threshold, _plot_additive)):
        if fn(an, out / name, plt):
            plots.append(name)
            written.append(out / name)
    fields, rows = csv_rows(an)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    written.append(out / "results.csv")
    gains = an.additive_gains()
    if gains:
        with open(out / "additive_gain.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["ablation", "strategy", "combination", "with", "gain", "low", "high",
                                              "within_noise"])
            w.writeheader()
            w.writerows(gains)
        written.append(out / "additive_gain.csv")
    (out / "report.md").write_text(markdown(an, plots), encoding="utf-8")
    written.insert(0, out / "report.md")
    return written
