"""Reports rebuilt from results files: a markdown table per setting in the Fast-dLLM layout, a CSV of
every run, and the plots (plots.py). The numbers come from analysis.py."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..run import write_text_atomic
from .analysis import Analysis, by_strategy, geometric_mean, row_label, section_title
from .plots import write_plots


# ---- formatting -----------------------------------------------------------------------------------

def _marks(an: Analysis, r: dict) -> str:
    """The footnote marks of a run's speed-up: † other hardware, ‡ measured otherwise than its baseline."""
    marks = ("†" if an.other_hardware(r) else "") + ("‡" if an.other_timing(r) else "")
    return f" {marks}" if marks else ""


def _f(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{fmt}}{suffix}"


def markdown(an: Analysis, plots: list[str] = ()) -> str:
    lines = ["# Ablation report", ""]
    n_ok, n_failed, n_skipped = len(an.ok), len(an.failed), len(an.skipped)
    counts = [len((r.get("timing") or {}).get("samples") or []) for r in an.ok]
    repeats = sorted(set(counts) - {0})
    timed = (f"median over {'/'.join(map(str, repeats))} timed repeats per run (after an untimed first pass, "
             f"round-robin across the runs), [min, max] in brackets" if repeats else
             "one pass per run (no timed repeats: no spread)")
    subsets = sorted({n for r in an.ok for n in an.timed_requests(r)} - {(r.get("metrics") or {}).get("requests")
                                                                        for r in an.ok})
    if subsets:
        timed += (f"; the timed passes decode {'/'.join(map(str, subsets))} of the problems (the first of each "
                  f"task), the accuracy pass all of them")
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
        lines += [f"## {section_title(key)}", ""]
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
                mark = _marks(an, r) if an.speedup(r) is not None else ""
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
    if any(an.other_timing(r) for r in an.ok):
        lines += [("‡ its tokens/s measured otherwise than its baseline's (one from a single untimed first pass, "
                   "the other from timed repeats, or timed over another number of problems): the speed-up "
                   "compares unlike measurements; rerun the ablation to time what is pending."), ""]
    gains = an.additive_gains()
    if gains:
        lines += ["## Additive gain per strategy", "",
                  ("speed-up(C + S) / speed-up(C) over every measured combination C without S, from the median "
                   "tokens/s; its interval [min(C + S) / max(C), max(C + S) / min(C)] spans the timed repeats. "
                   "A gain whose interval contains 1.0 is within noise: the repeats do not tell it from no gain."),
                  "", "| strategy | pairs | mean | min | max | within noise |", "|---|---:|---:|---:|---:|---:|"]
        for s, vals in by_strategy(gains).items():
            noisy = [g for g in gains if g["strategy"] == s and g["within_noise"]]
            untimed = [g for g in gains if g["strategy"] == s and g["within_noise"] is None]
            noise = f"{len(noisy)} of {len(vals)}" + (f" ({len(untimed)} untimed)" if untimed else "")
            lines.append(f"| {s} | {len(vals)} | {geometric_mean(vals):.2f}x | {min(vals):.2f}x | {max(vals):.2f}x "
                         f"| {noise} |")
        lines += ["", "(mean: geometric mean)", "", "| strategy | over | gain | interval | |",
                  "|---|---|---:|---|---|"]
        for g in gains:
            interval = "-" if g["low"] is None else f"[{g['low']:.2f}, {g['high']:.2f}]"
            verdict = {True: "within noise", False: "", None: "untimed"}[g["within_noise"]]
            if g["unlike_timing"]:
                verdict = f"{verdict} ‡".strip()
            own = g.get("strategy_values")
            strategy = f"{g['strategy']} ({own})" if own else g["strategy"]
            lines.append(f"| {strategy} | {g['combination']} | {g['gain']:.2f}x | {interval} | {verdict} |")
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


CSV_FIELDS = ["ablation", "index", "key", "name", "label", "plugins", "sweep", "status", "reason", "error_type",
              "error_message", "tasks", "limit", "batch_size", "accuracy_metric", "accuracy_mean", "tokens_per_second",
              "tokens_per_second_min", "tokens_per_second_max", "repeats", "timed_requests", "decode_s_per_request",
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
               "timed_requests": "/".join(map(str, an.timed_requests(r))) or None,
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


def write_report(records: list[dict], out_dir, metric: str | None = None) -> list[Path]:
    """Write report.md, results.csv, additive_gain.csv (when there are pairs) and the PNG plots
    (when there is something to plot) into out_dir, each whole (a temporary file moved into place);
    an additive_gain.csv or plot of an earlier report that this one has no data for is removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    an = Analysis(records, metric)
    plots = write_plots(an, out)
    written = [out / name for name in plots]
    fields, rows = csv_rows(an)
    written.append(write_text_atomic(out / "results.csv", _csv(fields, rows)))
    gains = an.additive_gains()
    if gains:
        written.append(write_text_atomic(out / "additive_gain.csv", _csv(GAIN_FIELDS, gains)))
    else:  # one from an earlier report would describe other data
        (out / "additive_gain.csv").unlink(missing_ok=True)
    written.insert(0, write_text_atomic(out / "report.md", markdown(an, plots)))
    return written


GAIN_FIELDS = ["ablation", "strategy", "strategy_values", "combination", "with", "gain", "low", "high", "within_noise",
               "unlike_timing"]


def _csv(fields: list[str], rows: list[dict]) -> bytes:
    """The CSV as bytes (its \\r\\n line ends as the csv module writes them, on every platform)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return text.getvalue().encode("utf-8")
