"""The report's figures: accuracy against speed-up with the Pareto front, reuse against threshold,
and what each strategy adds on top of each combination (additive gain). Each figure says what it
shows without its source: a title, axis labels with their units, a legend for every kind of mark,
and a caption with what was measured (plot_parts.caption)."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

from .analysis import (Analysis, by_strategy, combination_label, geometric_mean, is_plugin_key, pareto_front, row_label,
                       section_title)
from ..run import write_text_atomic
from .plot_parts import caption, separate_marks, set_ratio_axis, set_threshold_axis

PLOTS = ("accuracy_vs_speedup.png", "reuse_vs_threshold.png", "additive_gain.png")
_MARKERS = "osD^vP*Xh<>p"
_CAPTION_FONT = 7.5


def _caption_width(fig_width_in: float) -> int:
    """Characters of caption per line at its font size."""
    return int(fig_width_in * 72 / (_CAPTION_FONT * 0.55))


def _titles(fig, title: str, records: list[dict], width: float) -> None:
    """The title above the figure and, below it, the caption saying what was measured."""
    fig.suptitle(title, fontsize=12)
    fig.supxlabel(caption(records, _caption_width(width)), fontsize=_CAPTION_FONT, x=0.01, ha="left",
                  multialignment="left")


def _ablation(records: list[dict]) -> str:
    names = list(dict.fromkeys(str(r.get("ablation")) for r in records if r.get("ablation")))
    return " / ".join(names) or "ablation"


def accuracy_speedup_figure(an: Analysis, plt):
    """Every run a mark of its own (a colour and shape) named in the legend;
    marks that would hide each other are moved apart and joined to their true place; the
    speed-up's interval over the repeats as a horizontal bar; each setting's Pareto front dashed and
    circled (runs of another setting have another baseline: they neither beat nor are beaten); log x.
    None when no run has both a speed-up and an accuracy."""
    from matplotlib.lines import Line2D

    pts, labels, groups, errs, runs = [], [], [], [], []
    sections = an.sections()
    for gi, (key, rows) in enumerate(sections.items()):
        for r in rows:
            s, a = an.speedup(r), an.accuracy(r)
            if r.get("status") == "ok" and s is not None and a is not None:
                pts.append((s, a))
                labels.append(row_label(r))
                groups.append(gi)
                errs.append(an.speedup_interval(r))
                runs.append(r)
    if not pts:
        return None
    columns = 1 + len(pts) // 30  # legend columns: a long ablation's legend stays within the figure
    width = 8 + 3.5 * columns
    fig, ax = plt.subplots(figsize=(width, max(6.0, 0.17 * len(pts) / columns + 2.5)), layout="constrained")
    cmap = plt.get_cmap("tab10")
    titles = [section_title(k) for k in sections]
    several = len(set(groups)) > 1
    fronts = []  # per setting, its runs on the front by speed-up
    for g in sorted(set(groups)):
        members = [i for i, gi in enumerate(groups) if gi == g]
        fronts.append(sorted((members[j] for j in pareto_front([pts[i] for i in members])), key=lambda i: pts[i][0]))
    front = {i for f in fronts for i in f}
    marks, handles = [], []
    for i, ((x, y), label, gi, err) in enumerate(zip(pts, labels, groups, errs)):
        color = cmap(i % 10)  # (colour, shape) pairs name the runs, 120 before one repeats
        name = f"{label} — {titles[gi][:60]}" if several else label
        xerr = None if err is None else [[max(x - err[0], 0)], [max(err[1] - x, 0)]]
        bar = ax.errorbar([x], [y * 100], xerr=xerr, fmt=_MARKERS[(i // 10) % len(_MARKERS)], color=color, ms=7,
                          capsize=3, label=name, zorder=3)
        artists = [bar.lines[0], *bar.lines[1], *bar.lines[2]]
        if i in front:
            artists += ax.plot([x], [y * 100], "o", ms=15, mfc="none", mec="red", mew=1.5, zorder=4)
        marks.append((artists, x, y * 100))
        handles.append(bar)
    for order in fronts:
        ax.plot([pts[i][0] for i in order], [pts[i][1] * 100 for i in order], "--", color="black", lw=1, zorder=2)
    beaten_by = "no run of its setting" if several else "no run"
    handles += [Line2D([], [], ls="--", color="black", lw=1, label=f"Pareto front ({beaten_by} beats it on both axes)"),
                Line2D([], [], ls="none", marker="o", ms=12, mfc="none", mec="red", mew=1.5,
                       label="on the Pareto front")]
    ys = [p[1] * 100 for p in pts]
    ax.set_ylim(max(-2.0, min(ys) - 5), min(102.0, max(ys) + 5))
    ax.set_xscale("log")
    ax.set_xlim(*ax.get_xlim())  # fixed before marks move, so moving them changes no limit
    set_ratio_axis(ax, "x")
    # two lines: a wide legend leaves the axes too narrow for one
    ax.set_xlabel("speed-up over the baseline: tokens/s of the run / tokens/s of the baseline\n"
                  "(log scale; bar: range over the timed passes)")
    ax.set_ylabel(f"accuracy: {an.metric} (% of the problems)")
    _titles(fig, f"{_ablation(runs)}: accuracy against speed-up", runs, width)
    ax.grid(alpha=0.3, which="both")
    legend = dict(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, ncol=columns)
    ax.legend(handles=handles, **legend)
    if separate_marks(ax, marks):
        handles.append(Line2D([], [], ls="-", color="grey", lw=0.6, marker=".", ms=3, mfc="black", mec="black",
                              label="true place of a mark moved apart\nfrom one it would hide"))
        ax.legend(handles=handles, **legend)
    return fig


def _reuse_keys(an: Analysis) -> list[str]:
    """Threshold sweeps of plugins that reuse work: a policy's threshold (threshold_decoding: how
    sure a token must be to commit) reuses nothing, its reuse is 0 everywhere, and gets no plot."""
    keys = []
    for r in an.ok:
        for k in (r.get("sweep") or {}):
            if not (is_plugin_key(k) and k.endswith(".threshold")) or k in keys:
                continue
            plugin = k.split(".")[1]
            with_key = [x for x in an.ok if k in (x.get("sweep") or {})]
            own = [((x.get("reuse") or {}).get("plugins") or {}).get(plugin) for x in with_key]
            if any(own) or any((an.reuse(x) or 0) > 0 for x in with_key):
                keys.append(k)
    return keys


def reuse_threshold_figure(an: Analysis, plt):
    """Per threshold key, the run's FLOPs reuse (solid) and the plugin's own reuse fraction
    (dashed) against the threshold, one colour per plugin set and other sweep values; series
    dodged sideways by a few points so that equal ones stay visible. None without such a sweep."""
    from matplotlib.transforms import offset_copy

    keys = _reuse_keys(an)
    if not keys:
        return None
    width = 6.5 * len(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(width, 5.5), squeeze=False, layout="constrained")
    drawn = False
    used = []
    for ax, k in zip(axes[0], keys):
        plugin = k.split(".")[1]
        series: OrderedDict[str, list[tuple]] = OrderedDict()
        for r in an.ok:
            if k not in (r.get("sweep") or {}):
                continue
            used.append(r)
            rest = {kk.split(".", 1)[1] if kk.startswith("plugins.") else kk: v for kk, v in r["sweep"].items()
                    if kk != k}
            name = " + ".join(r.get("plugins") or []) + (f" {rest}" if rest else "")
            own = ((r.get("reuse") or {}).get("plugins") or {}).get(plugin) or {}
            own_value = next(iter(own.values()), None) if own else None
            series.setdefault(name, []).append((r["sweep"][k], an.reuse(r), own_value))
        lines = []
        for i, (name, pts) in enumerate(series.items()):
            pts.sort(key=lambda p: p[0])
            color = plt.get_cmap("tab10")(i % 10)
            xs = [p[0] for p in pts]
            if any(p[1] is not None for p in pts):
                lines.append((i, ax.plot(xs, [None if p[1] is None else p[1] * 100 for p in pts], "o-", color=color,
                                         label=f"{name[:50]}: FLOPs not computed (% of plain full-canvas "
                                               f"forwards')")))
            if any(p[2] is not None for p in pts):
                lines.append((i, ax.plot(xs, [None if p[2] is None else p[2] * 100 for p in pts], "s--", color=color,
                                         label=f"{name[:50]}: {plugin}'s own reuse (% of the rows it could reuse)")))
        drawn = drawn or bool(lines)
        set_threshold_axis(ax, [p[0] for pts in series.values() for p in pts])
        ax.set_xlim(*ax.get_xlim())  # the limits of the data, before the series are dodged
        for i, drawn_lines in lines:  # series side by side, a few points apart, so equal ones stay visible
            for line in drawn_lines if len(series) > 1 else ():
                line.set_transform(offset_copy(ax.transData, fig=fig, x=4.0 * (i - (len(series) - 1) / 2),
                                               units="points"))
        ax.set_xlabel(f"{plugin} threshold ({k}; a relative drift, no unit)")
        ax.set_ylabel("reuse (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(f"reuse against the {plugin} threshold", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if not drawn:
        plt.close(fig)
        return None
    _titles(fig, f"{_ablation(used)}: how much work each threshold reuses", used, width)
    return fig


def additive_gain_figure(an: Analysis, plt):
    """One panel per strategy S, one row per combination C it was added to, named on the row: the
    gain tokens/s(C + S) / tokens/s(C) with its interval over the repeats, filled when the interval
    excludes 1.0, hollow when within noise, square when untimed; the geometric mean and the 1.0
    line; log x. None without pairs."""
    from matplotlib.lines import Line2D

    gains = an.additive_gains()
    if not gains:
        return None
    by = by_strategy(gains)
    names = list(by)
    rows = {s: [g for g in gains if g["strategy"] == s] for s in names}
    width = 11.0
    height = 2.6 + sum(0.24 * len(v) + 0.55 for v in rows.values())
    fig, grid = plt.subplots(len(names) + 1, 1, figsize=(width, height), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [1.6] + [len(rows[s]) + 1.2 for s in names]})
    fig.get_layout_engine().set(w_pad=0.25)  # room for a ratio label at the right end of the axis
    key, axes = grid[0, 0], grid[1:]  # the legend's own row above the panels, so that it covers none
    for ax in axes[1:, 0]:
        ax.sharex(axes[0, 0])
    kinds = {True: ("o", "none", "C0", "within noise: the interval contains 1.0"),
             False: ("o", None, "C2", "beyond noise: the interval excludes 1.0"),
             None: ("s", None, "C1", "no timed repeats: no interval")}
    seen = set()
    for ax, s in zip(axes[:, 0], names):
        mine = rows[s]
        for j, g in enumerate(mine):
            marker, face, color, _ = kinds[g["within_noise"]]
            seen.add(g["within_noise"])
            xerr = None if g["low"] is None else [[g["gain"] - g["low"]], [g["high"] - g["gain"]]]
            ax.errorbar([g["gain"]], [j], xerr=xerr, fmt=marker, color=color, mfc=face, capsize=3, ms=6, zorder=3)
        mean = geometric_mean(by[s])
        ax.axvline(mean, color="black", lw=1.2, ls=":", zorder=2)
        ax.axvline(1.0, color="grey", lw=1, ls="--", zorder=1)
        ax.set_yticks(range(len(mine)), [_pair_label(g) for g in mine], fontsize=7.5)
        ax.set_ylim(len(mine) - 0.4, -0.6)
        ax.set_title(f"+ {s}: added to {len(mine)} combination{'s' if len(mine) != 1 else ''}, "
                     f"geometric mean {mean:.2f}x", fontsize=9, loc="left")
        ax.grid(alpha=0.3, axis="x", which="both")
    bottom = axes[-1, 0]
    bottom.set_xscale("log")
    lo = min(min(g["low"] or g["gain"] for g in gains), 1.0)
    hi = max(max(g["high"] or g["gain"] for g in gains), 1.0)
    bottom.set_xlim(lo / 1.15, hi * 1.15)
    for ax in axes[:, 0]:
        set_ratio_axis(ax, "x")
    bottom.set_xlabel("gain of adding S to C: tokens/s of C + S / tokens/s of C "
                      "(log scale; bar: range over the timed passes)")
    handles = [Line2D([], [], ls="none", marker=kinds[k][0], mfc=kinds[k][1] or kinds[k][2], mec=kinds[k][2],
                      color=kinds[k][2], label=kinds[k][3]) for k in (False, True, None) if k in seen]
    handles += [Line2D([], [], color="black", ls=":", lw=1.2, label="geometric mean over the combinations"),
                Line2D([], [], color="grey", ls="--", lw=1, label="no gain (1x)")]
    key.axis("off")
    key.legend(handles=handles, loc="center", ncol=3, fontsize=7.5)
    _titles(fig, f"{_ablation(an.ok)}: what each strategy S adds on top of each combination C of the others",
            an.ok, width)
    return fig


def _pair_label(gain: dict) -> str:
    """"over C", and S's own sweep values when it has some: "over baseline (threshold=0.1)"."""
    own = gain.get("strategy_values")
    return f"over {combination_label(gain['combination'])}" + (f" ({own})" if own else "")


def write_plots(an: Analysis, out: Path) -> list[str]:
    """Draw the figures there is data for into `out` (PNG, 120 dpi, each written whole over the last);
    one of an earlier report this data has none for is removed. Returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, build in zip(PLOTS, (accuracy_speedup_figure, reuse_threshold_figure, additive_gain_figure)):
        fig = build(an, plt)
        if fig is None:  # no data for it now: one of an earlier report would describe other data
            (out / name).unlink(missing_ok=True)
            continue
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        plt.close(fig)
        write_text_atomic(out / name, png.getvalue())
        written.append(name)
    return written
