"""What every report figure shares: readable ticks on a log axis of ratios over any range, marks
moved apart when they would hide each other, and the caption that says what was measured.

Matplotlib is imported by the caller (plots.py) and only when a report is written."""

from __future__ import annotations

import math
import textwrap

from .timing import timed_hardware, timed_ranks

# marks closer than this (in points, centre to centre) are moved apart; a 7-point mark is 7 wide
MARK_SPACING_PT = 11.0


# ---- ticks ----------------------------------------------------------------------------------------

def ratio_ticks(lo: float, hi: float, min_ticks: int = 4) -> list[float]:
    """Tick values for a log axis of ratios spanning [lo, hi]: 1, 2, 5 x 10^k when the range holds
    at least `min_ticks` of them (a wide range), else evenly spaced round values (0.9, 0.95, 1,
    1.05 ... for a narrow one); 1 whenever it is in range (the no-change line); no two ticks so
    close on the log axis that their labels would overprint."""
    from matplotlib.ticker import MaxNLocator

    if not (lo > 0 and hi > lo):
        return []
    def inside(t):  # the range's ends count as inside (a float step can land a hair past them)
        return lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)

    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5) if inside(m * 10.0 ** e)]
    if len(ticks) < min_ticks:
        ticks = [float(t) for t in MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
                 if t > 0 and inside(t)]
    ticks = [float(f"{t:.12g}") for t in ticks]
    first = [1.0] if lo <= 1.0 <= hi else []
    span = math.log10(hi / lo)
    kept: list[float] = []
    for t in first + [t for t in ticks if t != 1.0]:  # 1 first: it is never the one dropped
        if all(abs(math.log10(t / k)) >= span / 14 for k in kept):
            kept.append(t)
    return sorted(kept)


def ratio_label(value: float) -> str:
    """"0.95x", "1x", "12.5x": at most four significant digits, no trailing zeros."""
    return f"{value:.4g}x"


def set_ratio_axis(ax, which: str) -> None:
    """Log scale with ratio_ticks over the axis' current limits (call once the data is drawn):
    labelled major ticks, unlabelled minor ones for the grid."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    axis.set_major_locator(FixedLocator(ratio_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: ratio_label(v)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
    axis.set_minor_formatter(NullFormatter())


def set_threshold_axis(ax, values: list[float]) -> None:
    """Thresholds that span a decade or more (0.001, 0.01, 0.1) on a log axis, or symlog when 0 is
    among them (linear up to the smallest positive one), so that no decade is crowded into a corner;
    a narrower sweep keeps a linear axis. Either way the swept values themselves are the labelled
    ticks (a single one is not surrounded by ticks of values never run)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    swept = sorted(set(values))
    positive = [v for v in swept if v > 0]
    if len(positive) >= 2 and positive[-1] / positive[0] >= 10:
        if swept[0] <= 0:
            ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
        else:
            ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(swept))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


# ---- marks that would hide each other -------------------------------------------------------------

def spread_positions(points_pt: list[tuple[float, float]], spacing: float = MARK_SPACING_PT
                     ) -> list[tuple[float, float]]:
    """Offsets (in points) that leave every pair of marks at least `spacing` apart: each mark in
    turn keeps its place when that is free, else takes the nearest free place on rings around it
    (first straight up or down). Marks already apart are not moved."""
    placed: list[tuple[float, float]] = []
    offsets = []
    for x, y in points_pt:
        for dx, dy in _candidates(spacing):
            if all(math.hypot(x + dx - px, y + dy - py) >= spacing - 1e-9 for px, py in placed):
                break
        placed.append((x + dx, y + dy))
        offsets.append((dx, dy))
    return offsets


def _candidates(spacing: float):
    yield 0.0, 0.0
    ring = 1
    while True:
        n = 6 * ring
        angles = [math.pi / 2 + 2 * math.pi * k / n for k in range(n)]  # from straight up
        for a in sorted(angles, key=lambda a: abs(math.cos(a)) > 1e-9):  # up and down first
            yield ring * spacing * math.cos(a), ring * spacing * math.sin(a)
        ring += 1


def separate_marks(ax, artists_xy: list[tuple[list, float, float]]) -> int:
    """Move the marks that would hide each other apart (spread_positions, on the figure as laid
    out now) and join each moved mark to its true place (a small dot) by a thin line. artists_xy:
    (the artists drawing one mark, its x, its y in data coordinates). Returns how many moved."""
    from matplotlib.transforms import offset_copy

    fig = ax.figure
    fig.canvas.draw()  # the layout, so data -> points is final
    to_pt = 72.0 / fig.dpi
    pts = [tuple(v * to_pt for v in ax.transData.transform((x, y))) for _, x, y in artists_xy]
    offsets = spread_positions(pts)
    moved = 0
    for (artists, x, y), (dx, dy) in zip(artists_xy, offsets):
        if (dx, dy) == (0.0, 0.0):
            continue
        moved += 1
        shifted = offset_copy(ax.transData, fig=fig, x=dx, y=dy, units="points")
        for artist in artists:
            artist.set_transform(shifted)
        ax.plot([x], [y], ".", color="black", ms=3, zorder=5)
        ax.annotate("", xy=(x, y), xytext=(dx, dy), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 0, "shrinkB": 0}, zorder=2)
    return moved


# ---- what was measured ----------------------------------------------------------------------------

def _distinct(records: list[dict], fn) -> list:
    out = []
    for r in records:
        v = fn(r)
        if v is not None and v not in out:
            out.append(v)
    return out


def _joined(values: list, none: str = "?") -> str:
    return " / ".join(str(v) for v in values) if values else none


def _model(r: dict) -> str | None:
    name = (r.get("recipe") or {}).get("model")
    m = r.get("model") or {}
    details = [str(m["family"]).replace("llada", "LLaDA").replace("dream", "Dream")] if m.get("family") else []
    if m.get("parameters"):
        details.append(f"{m['parameters'] / 1e6:.2f}M parameters")
    if m.get("dtype"):
        details.append(str(m["dtype"]).replace("torch.", ""))
    return f"{name} ({', '.join(details)})" if details else name


def _generation(r: dict) -> str | None:
    g = (r.get("recipe") or {}).get("generation") or {}
    if "gen_length" not in g:
        return None
    return f"gen_length {g['gen_length']}, block {g.get('block_length')}, steps {g.get('steps')}"


def _hardware(r: dict) -> str | None:
    h = timed_hardware(r)  # where the tokens/s were measured
    if not h:
        return None
    cpu = f"{h.get('machine') or 'CPU'} with {h.get('cpu_count')} cores"
    threads = f"{h.get('torch_threads')} torch thread{'s' if h.get('torch_threads') != 1 else ''}"
    where = h.get("gpu") or ("CPU" if str(h.get("device", "cpu")).startswith("cpu") else h.get("device"))
    ranks = timed_ranks(r)  # where the tokens/s came from (the accuracy pass may have had more processes)
    return f"{where} ({cpu}, {threads}{f', {ranks} processes' if ranks > 1 else ''})"


def _problems(r: dict) -> str | None:
    n = (r.get("metrics") or {}).get("requests")
    return None if n is None else f"{n} problems"


def _timing(r: dict) -> str:
    timing = r.get("timing") or {}
    samples = timing.get("samples") or []
    if not samples:
        return "tokens/s of the single pass"
    per_pass = _distinct(samples, lambda s: s.get("requests"))
    subset = "" if not per_pass or per_pass == [(r.get("metrics") or {}).get("requests")] else \
        f" over {_joined(per_pass)} of the problems"
    return f"tokens/s: median of {len(samples)} timed passes{subset} after an untimed one"


def caption(records: list[dict], width: int) -> str:
    """What the figure's runs measured, wrapped to `width` characters: ablation, model, tasks and
    problems per run, generation settings, batch size, how tokens/s were timed, the hardware and
    the date (several values of a field are joined by " / ")."""
    ok = [r for r in records if r.get("status") == "ok"] or records
    dates = sorted(str(r.get("finished"))[:10] for r in ok if r.get("finished"))
    parts = [
        f"{_joined(_distinct(ok, lambda r: r.get('ablation')))}: model {_joined(_distinct(ok, _model))}",
        f"tasks {_joined(_distinct(ok, lambda r: ', '.join(r.get('tasks') or []) or None))}, "
        f"{_joined(_distinct(ok, _problems))} a run ({_joined(_distinct(ok, lambda r: r.get('limit')))} per task)",
        _joined(_distinct(ok, _generation)), f"batch {_joined(_distinct(ok, lambda r: r.get('batch_size')))}",
        _joined(_distinct(ok, _timing)),
        f"on {_joined(_distinct(ok, _hardware))}" + (f", {dates[0]}" if dates and dates[0] == dates[-1] else
                                                     f", {dates[0]} to {dates[-1]}" if dates else ""),
    ]
    return "\n".join(textwrap.wrap(" · ".join(parts), width=width))
