"""Reports rebuilt from results files: a markdown table per setting in the Fast-dLLM layout, a CSV of
every run, and plots (accuracy against speed-up with the Pareto front, reuse against threshold,
each strategy's additive gain).

Speed-up of a run = its tokens/s / the tokens/s of its baseline: the run without any of the
ablation's plugins whose recipe is otherwise identical (same sweep values, tasks, limit, batch size).
Additive gain of strategy S over combination C (C without S, both measured) = speed-up(C+S) /
speed-up(C) = tokens/s(C+S) / tokens/s(C).
"""

from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path

from .results import dedupe
from .runner import accuracy_mean

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
        v = (r.get("metrics") or {}).get("tokens_per_second")
        return v if isinstance(v, (int, float)) and v > 0 else None

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
        {strategy: S, combination: C's label, with: C+S's label, gain: tokens/s(C+S) / tokens/s(C)}."""
        out = []
        for r in self.ok:
            plugins = r.get("plugins") or []
            for s in plugins:
                c = self.by_canonical.get(canonical(r, [s]))
                if c is None or sorted(c.get("plugins") or []) != sorted(p for p in plugins if p != s):
                    continue
                if self.tps(r) is None or self.tps(c) is None:
                    continue
                out.append({"strategy": s, "combination": c.get("name"), "with": r.get("name"),
                            "ablation": r.get("ablation"), "gain": self.tps(r) / self.tps(c)})
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
    lines.append(f"{len(an.records)} runs: {n_ok} measured, {n_failed} failed, {n_skipped} skipped. "
                 f"Accuracy: `{an.metric}` x 100 (mean over the groups, else over the tasks, in the run's "
                 f"own columns per task). Speed-up: tokens/s over the run without the ablation's plugins "
                 f"and otherwise the same recipe; FLOPs x: that run's estimated FLOPs per request over this "
                 f"one's; reuse: share of the FLOPs of plain full-canvas forwards (same NFE) not computed.")
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
            head = ["strategy", *tasks, "mean", "tokens/s", "speed-up", "NFE/req", "GFLOPs/req", "FLOPs x", "reuse"]
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
                cells += [_f(None if mean is None else mean * 100, ".1f"), _f(an.tps(r), ".1f"),
                          _f(an.speedup(r), ".2f", "x" + mark), _f(m.get("nfe_per_request"), ".1f"),
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
                  "speed-up(C + S) / speed-up(C) over every measured combination C without S.", "",
                  "| strategy | pairs | mean | min | max |", "|---|---:|---:|---:|---:|"]
        for s, vals in _by_strategy(gains).items():
            lines.append(f"| {s} | {len(vals)} | {_geo(vals):.2f}x | {min(vals):.2f}x | {max(vals):.2f}x |")
        lines += ["", "(mean: geometric mean)", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


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
              "speedup", "flops_ratio", "nfe_total", "nfe_per_request", "generated_tokens", "requests",
              "decode_time_s", "flops_total", "flops_per_request", "flops_q", "flops_kv", "flops_attn", "flops_ffn",
              "flops_lm_head", "reuse_flops", "reuse_canvas_q", "reuse_canvas_kv", "reuse_canvas_attn",
              "reuse_canvas_ffn", "reuse_fed_q", "reuse_fed_kv", "reuse_fed_attn", "reuse_fed_ffn", "reuse_plugins",
              "peak_memory_bytes", "memory_delta_bytes", "memory_method", "wall_time_s", "finished", "device"]


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


def _plot_accuracy_speedup(an: Analysis, path: Path, plt) -> bool:
    pts, labels, groups = [], [], []
    sections = an.sections()
    for gi, (key, rows) in enumerate(sections.items()):
        for r in rows:
            s, a = an.speedup(r), an.accuracy(r)
            if r.get("status") == "ok" and s is not None and a is not None:
                pts.append((s, a))
                labels.append(row_label(r))
                groups.append(gi)
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("tab10")
    titles = [_section_title(k) for k in sections]
    for gi in sorted(set(groups)):
        xs = [p[0] for p, g in zip(pts, groups) if g == gi]
        ys = [p[1] * 100 for p, g in zip(pts, groups) if g == gi]
        ax.scatter(xs, ys, color=cmap(gi % 10), label=titles[gi][:70], zorder=3)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] * 100 for i in front], "--", color="black", lw=1, zorder=2,
            label="Pareto front")
    ax.scatter([pts[i][0] for i in front], [pts[i][1] * 100 for i in front], s=140, facecolors="none",
               edgecolors="red", lw=1.5, zorder=4)
    offsets = ((4, 4), (4, -10), (4, 12), (4, -18))  # neighbours' labels on different lines
    for i, ((x, y), text) in enumerate(sorted(zip(pts, labels))):
        ax.annotate(text, (x, y * 100), fontsize=6, xytext=offsets[i % len(offsets)], textcoords="offset points")
    ys = [p[1] * 100 for p in pts]
    ax.set_ylim(max(-2.0, min(ys) - 5), min(102.0, max(ys) + 5))
    ax.set_xlabel("speed-up over baseline (tokens/s)")
    ax.set_ylabel(f"accuracy ({an.metric}, %)")
    ax.set_title("Accuracy against speed-up")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_reuse_threshold(an: Analysis, path: Path, plt) -> bool:
    keys = []
    for r in an.ok:
        for k in (r.get("sweep") or {}):
            if _is_plugin_key(k) and k.endswith(".threshold") and k not in keys:
                keys.append(k)
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
    gains = an.additive_gains()
    if not gains:
        return False
    by = _by_strategy(gains)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(by)), 4.5))
    names = list(by)
    ax.boxplot([by[n] for n in names], showmeans=True)
    for i, n in enumerate(names, 1):
        vals = by[n]
        xs = [i + 0.08 * ((j % 5) - 2) for j in range(len(vals))]
        ax.scatter(xs, vals, s=14, alpha=0.7, zorder=3)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel("speed-up(C + S) / speed-up(C)")
    ax.set_title("Additive gain of each strategy S over combinations C")
    ax.grid(alpha=0.3, axis="y")
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
            w = csv.DictWriter(f, fieldnames=["ablation", "strategy", "combination", "with", "gain"])
            w.writeheader()
            w.writerows(gains)
        written.append(out / "additive_gain.csv")
    (out / "report.md").write_text(markdown(an, plots), encoding="utf-8")
    written.insert(0, out / "report.md")
    return written
