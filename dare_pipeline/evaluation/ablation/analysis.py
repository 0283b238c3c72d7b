"""The arithmetic of a report, on the records of a results file: baselines, speed-ups, additive gains,
the Pareto front, the labels runs and settings go by.

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

import json
import math
from collections import OrderedDict

from .results import dedupe
from .runner import accuracy_mean
from .schema import device_kind
from .timing import spread, timed_hardware, timed_ranks
from .timing import tokens_per_second as timed_tps


def is_plugin_key(key: str) -> bool:
    return key.startswith("plugins.") and key.count(".") >= 2


def canonical(record: dict, drop=()) -> str:
    """What identifies a run up to the plugins in `drop`: the recipe without its name, description
    and the dropped plugins (the others sorted by name; `cuda:N` counted as `cuda`, as in run_key),
    with the tasks, limit and batch size."""
    recipe = dict(record.get("recipe") or {})
    if "device" in recipe:
        recipe["device"] = device_kind(recipe["device"])
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
        """The spread (median, q1, q3, min, max) of a timing field per request, or None. Each timed
        pass counts its own requests (the timed problems can be fewer than the run's)."""
        timing = r.get("timing")
        if not isinstance(timing, dict):
            return None
        samples = timing.get("samples") or []
        if samples and all(isinstance(s.get(field), (int, float)) and s.get("requests") for s in samples):
            s = spread([s[field] / s["requests"] for s in samples])
            return {k: v for k, v in s.items() if k in ("median", "q1", "q3", "min", "max")}
        s = timing.get(field)
        requests = (r.get("metrics") or {}).get("requests") or 0
        if not isinstance(s, dict) or not requests:
            return None
        return {k: v / requests for k, v in s.items() if k in ("median", "q1", "q3", "min", "max")}

    @staticmethod
    def timed_requests(r: dict) -> list[int]:
        """The problems each timed pass decoded (distinct values; empty without timed passes)."""
        samples = (r.get("timing") or {}).get("samples") or []
        return sorted({s["requests"] for s in samples if s.get("requests")})

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
        h = timed_hardware(r)  # where its tokens/s were measured
        return (*(h.get(k) for k in ("platform", "machine", "processor", "cpu_count", "torch_threads", "gpu")),
                device_kind(h.get("device")),  # the GPU's model is `gpu`; its index on the machine does not matter
                timed_ranks(r))  # the data-parallel processes its tokens/s came from

    def other_hardware(self, r: dict) -> bool:
        """The run and its baseline ran on different hardware (merged shards): tokens/s do not compare."""
        base = self.baseline(r)
        return base is not None and self._machine(base) != self._machine(r)

    @staticmethod
    def timing_basis(r: dict) -> tuple:
        """How a run's tokens/s were measured: timed repeats (over how many problems a task; None: the
        run's limit), or its single untimed first pass (a cold pass, over every problem)."""
        if timed_tps(r) is None:
            return ("first pass",)
        return ("timed repeats", (r.get("timing") or {}).get("limit"))

    def other_timing(self, r: dict) -> bool:
        """The run's tokens/s and its baseline's were measured differently (one run's repeats still
        pending after an interruption, or files timed over other numbers of problems merged)."""
        base = self.baseline(r)
        return base is not None and self.timing_basis(base) != self.timing_basis(r)

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
        {strategy: S, strategy_values: S's own sweep values in C + S ("threshold=0.1"), combination: C's
        label, with: C+S's label, gain: tokens/s(C+S) / tokens/s(C),
        low / high: the gain's interval over the repeats (None without repeats), within_noise: the
        interval contains 1.0, unlike_timing: the two tokens/s were measured differently (timing_basis)}."""
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
                own = ", ".join(f"{k.split('.', 2)[2]}={v}" for k, v in (r.get("sweep") or {}).items()
                                if is_plugin_key(k) and k.split(".")[1] == s)
                out.append({"strategy": s, "strategy_values": own, "combination": c.get("name"),
                            "with": r.get("name"), "ablation": r.get("ablation"), "gain": self.tps(r) / self.tps(c),
                            "low": interval[0] if interval else None, "high": interval[1] if interval else None,
                            "within_noise": None if interval is None else interval[0] <= 1.0 <= interval[1],
                            "unlike_timing": self.timing_basis(r) != self.timing_basis(c)})
        return out

    def sections(self) -> OrderedDict[tuple, list[dict]]:
        """Records grouped by ablation, model, tasks, limit, batch size and the non-plugin sweep values."""
        groups: OrderedDict[tuple, list[dict]] = OrderedDict()
        for r in sorted(self.records, key=lambda r: (str(r.get("ablation")), r.get("index") or 0)):
            if r.get("status") == "skipped" and r not in self.skipped:
                continue
            ctx = tuple((k, json.dumps(v)) for k, v in (r.get("sweep") or {}).items() if not is_plugin_key(k))
            model = (r.get("recipe") or {}).get("model")
            key = (r.get("ablation"), model, tuple(r.get("tasks") or ()), r.get("limit"), r.get("batch_size"), ctx)
            groups.setdefault(key, []).append(r)
        return groups


def row_label(r: dict) -> str:
    """A run's plugins ("baseline" without any) with its own sweep values."""
    plugins = r.get("plugins") or []
    label = "baseline" if not plugins else " + ".join(plugins)
    own = [f"{k.split('.', 2)[1]}.{k.split('.', 2)[2]}={v}" for k, v in (r.get("sweep") or {}).items()
           if is_plugin_key(k)]
    return f"{label} ({', '.join(own)})" if own else label


def section_title(key: tuple) -> str:
    ablation, model, tasks, limit, batch, ctx = key
    parts = [f"{k}={json.loads(v)}" for k, v in ctx]
    parts += [f"model {model}", f"tasks {', '.join(tasks)}", f"limit {limit}", f"batch {batch}"]
    return f"{ablation} — " + " · ".join(parts)


def by_strategy(gains: list[dict]) -> OrderedDict[str, list[float]]:
    out: OrderedDict[str, list[float]] = OrderedDict()
    for g in gains:
        out.setdefault(g["strategy"], []).append(g["gain"])
    return out


def geometric_mean(vals: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both), by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def combination_label(name) -> str:
    """A run's name as the additive-gain rows show it: its plugins joined by " + "."""
    plugins, _, rest = str(name).partition(" [")
    return plugins.replace("+", " + ") + (f" [{rest}" if rest else "")
