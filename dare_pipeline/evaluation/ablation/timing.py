"""Timing a run: the first pass of each run (accuracy, counters) is its warm-up and is not timed;
then `repeats` timed passes, interleaved across the runs (round-robin: every run's first repeat,
then every run's second, ...), so a slow phase of the machine hits every configuration alike. The
timed passes decode the first `timing_limit` problems per task (all of the run's by default), so
accuracy can be measured on many problems and speed on a few, several times.

A record's `timing` holds each repeat's decode wall time, process CPU time and tokens/s, and their
median, quartiles and range. NFE and FLOPs are exact (the decoding is deterministic) and stay the
first pass's.
"""

from __future__ import annotations

import statistics

# what each timed repeat keeps from its pass's metrics
# (ranks: the processes the pass ran in; the timed passes may run in another invocation than the
# first, e.g. accuracy under --data-parallel and timing in one process)
SAMPLE_FIELDS = ("decode_time_s", "decode_cpu_s", "tokens_per_second", "generated_tokens", "nfe_total", "requests",
                 "ranks")
SPREAD_FIELDS = ("decode_time_s", "decode_cpu_s", "tokens_per_second")


def sample(record: dict) -> dict:
    """One timed repeat, from the record its pass produced (with the machine it ran on: a run's first
    pass may come from another machine, --reuse-runs, or another invocation)."""
    m = record.get("metrics") or {}
    out = {k: m.get(k) for k in SAMPLE_FIELDS}
    out["wall_time_s"] = record.get("wall_time_s")
    out["hardware"] = record.get("hardware")
    return out


def spread(values: list[float]) -> dict | None:
    """median, quartiles (inclusive method) and range of the values; None without values."""
    values = sorted(v for v in values if isinstance(v, (int, float)))
    if not values:
        return None
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": values[0], "max": values[-1],
            "n": len(values)}


def summarize(samples: list[dict], repeats: int, limit=None) -> dict:
    """The timing of a run: its samples and their spreads; `limit`: problems per task of the timed
    passes (None: the run's limit)."""
    out = {"repeats": repeats, "limit": limit, "warmup": "the run's first (accuracy) pass, untimed",
           "order": "round-robin", "samples": samples, "complete": len(samples) >= repeats}
    for field in SPREAD_FIELDS:
        out[field] = spread([s.get(field) for s in samples])
    return out


def pending(repeats: int) -> dict:
    """The timing of a record written after its first pass, before its repeats ran."""
    return {"repeats": repeats, "samples": [], "complete": False}


def needs_timing(record: dict, repeats: int, limit=None) -> bool:
    """A finished record that lacks the timed repeats asked for now (recorded before they ran, by an
    interrupted invocation, by an older version without repeats, or timed on another number of
    problems than `limit` per task; None: the run's limit)."""
    if repeats <= 0:
        return False
    timing = record.get("timing")
    if not isinstance(timing, dict):
        return True
    samples = timing.get("samples")
    timed_on = timing.get("limit") if timing.get("limit") is not None else record.get("limit")
    wanted = limit if limit is not None else record.get("limit")
    return not isinstance(samples, list) or len(samples) < repeats or timed_on != wanted


def tokens_per_second(record: dict) -> dict | None:
    """The spread of tokens/s over the timed repeats, or None (no repeats recorded)."""
    timing = record.get("timing")
    if not isinstance(timing, dict):
        return None
    s = timing.get("tokens_per_second")
    return s if isinstance(s, dict) and isinstance(s.get("median"), (int, float)) and s["median"] > 0 else None


def timed_hardware(record: dict) -> dict:
    """The machine that gave the record's tokens/s: its timed passes' when they say (a record timed
    before samples kept it, or never timed: its first pass's)."""
    timing = record.get("timing")
    samples = timing.get("samples") if isinstance(timing, dict) else None
    machines = [s.get("hardware") if isinstance(s, dict) else None for s in samples or []]
    if machines and all(isinstance(h, dict) for h in machines):
        return machines[-1]
    return record.get("hardware") or {}


def timed_ranks(record: dict) -> int:
    """The processes that gave the record's tokens/s: its timed passes' when they say (a record
    timed before samples kept it, or never timed: its first pass's)."""
    timing = record.get("timing")
    samples = timing.get("samples") if isinstance(timing, dict) else None
    ranks = {s.get("ranks") for s in samples or [] if isinstance(s, dict)}
    if samples and None not in ranks:
        return max(ranks)
    return ((record.get("hardware") or {}).get("ranks") or (record.get("metrics") or {}).get("ranks") or 1)
