"""Building blocks for reuse plugins (DARE-KV, DARE-O, dLLM-Cache, third-party ones).

- `QueryDrift`: DARE's per-row decision "has this row's query drifted since
  its last recompute at this layer?", with the reference query and the token kept per layer and
  column in the activation store (fields `<prefix>.q_ref`, `<prefix>.token`), the mandatory
  recomputes every cache must respect, and reuse counters per layer.
- `ShadowLog`: shadow mode's record of the relative error ||reused - exact|| / ||exact|| of the
  reused activations, per layer and forward.

Counters stay on the model's device (no host sync per layer) and become plain ints in reports.
Padding columns (left-padded prompts) are never counted.
"""

from __future__ import annotations

import math

import torch

from ..core.hookspecs import hookimpl
from ..core.layer_reuse import LayerCall

# why a query-drift plugin and dLLM-Cache are refused together (both DARE plugins declare it)
WHOLE_LAYER_REUSE = ("dLLM-Cache already decides per layer which rows recompute at all (its V-verify picks the "
                     "rows whose values moved most); a query-drift predictor inside those rows would skip work on "
                     "exactly the rows flagged as changed, and no refresh of DARE's ever coincides with "
                     "dLLM-Cache's interval refreshes")

# why a running row was recomputed, first matching reason wins (see QueryDrift.report)
REASONS = ("refresh", "exempt", "no_entry", "token_changed", "block", "drift")


class QueryDrift:
    """The query-drift decision of one generation for one reuse plugin.

    `decide(call, q, entry)` returns the (B, m) bool mask of running rows to recompute (None when
    every row recomputes). A row may be reused only if it has a cache entry (`entry`, (B, L)) and a
    reference query, its token is the one it had at its last recompute at this layer, the forward
    is not a full recompute (the generation's first forward, every `refresh_every` forwards, and,
    with `recompute_at_refresh`, the row feeder's refreshes), the layer is not exempt, and its drift
    is strictly below the threshold. Recomputed rows get a new reference query and token. Without
    `recompute_at_refresh` the references and cached rows outlive the row feeder's refreshes: a
    refresh forward feeds every row, and the rule decides which of them recompute.
    """

    def __init__(self, prefix: str, options, n_layers: int, real: torch.Tensor):
        """`options` carries threshold, exempt_layers, refresh_every (see the DARE plugins)."""
        if any(layer >= n_layers for layer in options.exempt_layers):
            raise ValueError(f"{prefix}: exempt_layers = {list(options.exempt_layers)!r}: the model has "
                             f"{n_layers} layers (0..{n_layers - 1})")
        self.prefix = prefix
        self.ref_field, self.token_field = f"{prefix}.q_ref", f"{prefix}.token"
        self.threshold = options.threshold
        self.exempt = frozenset(options.exempt_layers)
        self.refresh_every = options.refresh_every
        # recompute every row at the row feeder's refreshes too (otherwise the references and cached
        # rows outlive them, and a refresh recomputes only the rows the rule asks for)
        self.recompute_at_refresh = getattr(options, "recompute_at_refresh", False)
        # the rows of the block being decoded always recompute (see `set_block`)
        self.recompute_block = getattr(options, "recompute_block", False)
        self.block = torch.zeros(real.shape[1], dtype=torch.bool, device=real.device)
        # under capture: the fraction of running rows a layer may recompute (None: all of them)
        self.row_budget = getattr(options, "row_budget", None)
        self.real = real  # (B, L) bool: not padding
        self.n_layers = n_layers
        # per layer: eligible rows, reused rows, one column per entry of REASONS, then rows reused only
        # because a compiled forward's row budget was full (see `_within_capacity`)
        self.counts = torch.zeros(n_layers, 3 + len(REASONS), dtype=torch.long, device=real.device)
        self._seen_step: int | None = None
        self._full = False
        # (B,) which prompts decode this forward; a prompt whose block is done only waits for the rest
        # of its batch (see `set_running`)
        self.running = torch.ones(real.shape[0], dtype=torch.bool, device=real.device)
        self._running = [True] * real.shape[0]
        self._all_running = True
        # per prompt: forwards it took part in, and the one of its last full recompute (a full recompute
        # comes every `refresh_every` of the prompt's own forwards, as it would alone); (B,) which
        # prompts recompute every row in this forward
        self._forwards = [0] * real.shape[0]
        self._last_full_of: list[int | None] = [None] * real.shape[0]
        self.forced = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
        self._any_forced = False

    def prepare(self, store, q_dim: int, dtype: torch.dtype) -> None:
        """Create the store fields and the counters up front (a compiled forward cannot create them)."""
        for layer in range(self.n_layers):
            store.field(self.ref_field, layer, q_dim, dtype)
            store.field(self.token_field, layer, 1, torch.long)
        self.counts = store.buffer(f"{self.prefix}.counts", tuple(self.counts.shape), torch.long)
        self.block = store.buffer(f"{self.prefix}.block", tuple(self.block.shape), torch.bool)
        self.running = store.buffer(f"{self.prefix}.running", tuple(self.running.shape), torch.bool)
        self.running.fill_(True)
        self.forced = store.buffer(f"{self.prefix}.forced", tuple(self.forced.shape), torch.bool)

    def set_running(self, running: list[bool]) -> None:
        """Which prompts (model batch rows) decode this forward, at each step start on the host. The rows
        of a prompt that waits for its batch are reused, never recomputed: nothing of it is written
        or counted, so its references and cached rows stay as they would be alone."""
        self._running = list(running)
        self._all_running = all(running)
        self.running.copy_(torch.tensor(running, dtype=torch.bool), non_blocking=True)

    def set_block(self, columns: slice) -> None:
        """The canvas columns of the block being decoded (at each block start, on the host)."""
        self.block.zero_()
        self.block[columns] = True

    def begin_forward(self, refresh: bool, step: int) -> None:
        """Decide on the host whether this forward recomputes every row (see `_forced`)."""
        self._forced_at(refresh, step)

    def capacity(self, layer: int, rows: int) -> int:
        """Rows a compiled forward recomputes at `layer`: all at a forced forward, an exempt layer,
        without a budget, or at threshold 0 (the rule reuses nothing, so no budget may overrule it)."""
        if self._any_forced or layer in self.exempt or self.row_budget is None or self.threshold == 0:
            return rows
        return max(1, min(rows, math.ceil(self.row_budget * rows)))

    def _forced(self, call: LayerCall) -> bool:
        """Whether this forward recomputes every row (decided once per forward, at its first layer call;
        under capture in `begin_forward`, since the step is not known inside a compiled forward)."""
        if call.capture:
            return self._full
        return self._forced_at(call.refresh, call.step)

    def _forced_at(self, refresh: bool, step: int) -> bool:
        """Whether every running prompt recomputes every row in this forward; which prompts do is in
        `forced` (each prompt's schedule counts its own forwards)."""
        if step != self._seen_step:
            self._seen_step = step
            every = self.refresh_every
            forced = []
            for b, running in enumerate(self._running):
                if running:
                    self._forwards[b] += 1
                last = self._last_full_of[b]
                due = running and ((refresh and self.recompute_at_refresh) or last is None
                                   or (every > 0 and self._forwards[b] - last >= every))
                if due:
                    self._last_full_of[b] = self._forwards[b]
                forced.append(due)
            self._any_forced = any(forced)
            self._full = self._any_forced and all(f or not r for f, r in zip(forced, self._running))
            if self._any_forced and not self._full:
                self.forced.copy_(torch.tensor(forced, dtype=torch.bool), non_blocking=True)
            else:
                self.forced.fill_(False)
        return self._full

    def decide(self, call: LayerCall, q: torch.Tensor, entry: torch.Tensor) -> torch.Tensor | None:
        store, layer = call.store, call.layer
        batch, heads, m, hd = q.shape
        if call.run is None:  # the running rows are exactly the fed ones: index with slices (views, no gathers)
            cols, tokens = (call.cols if call.capture else slice(call.fed.start, call.fed.stop)), call.tokens
            real = self.real[:, cols]
        else:
            rows = call.active_rows if call.active_rows is not None else call.active - call.fed.start
            cols, tokens = call.active, call.tokens[:, rows]
            real = self.real[:, cols] & call.run
        waiting = ~self.running[:, None]  # (B, 1)
        real = real & ~waiting
        qf = q.transpose(1, 2).reshape(batch, m, heads * hd)
        ref = store.field(self.ref_field, layer, heads * hd, qf.dtype)
        last_token = store.field(self.token_field, layer, 1, torch.long)
        n_real = real.sum()
        zero = torch.zeros_like(n_real)

        forced = self._forced(call)
        if forced or layer in self.exempt:
            # a waiting prompt's rows are reused, except at exempt layers, which cache nothing to reuse
            # (what they write there is rewritten at every forward)
            waits = not self._all_running and layer not in self.exempt
            recompute = ~waiting.expand(batch, m) if waits else None
            counts = _row_counts(n_real, **{"refresh" if forced else "exempt": n_real})
        else:
            has = entry[:, cols] & store.written(self.ref_field, layer)[:, cols]
            same = last_token[:, cols, 0] == tokens
            q_ref = ref[:, cols].float()
            drift = torch.linalg.vector_norm(qf.float() - q_ref, dim=-1) / \
                torch.linalg.vector_norm(q_ref, dim=-1).clamp_min(torch.finfo(torch.float).tiny)
            close = drift < self.threshold
            valid = has & same
            in_block = zero.bool()  # a 0-d False: no row is held back for being in the block
            if self.recompute_block:
                in_block = self.block[cols][None]
                valid = valid & ~in_block
            free = ~self.forced[:, None]  # (B, 1) prompts on their own full recompute take no reuse
            refreshed = (~free & real).sum()
            real = real & free
            reuse = (valid & close & free) | waiting
            over = zero
            capacity = self.capacity(layer, m)
            if call.capture and capacity < m:
                reuse, over_rows = _within_capacity(reuse, valid, drift, capacity)
                over = (over_rows & real).sum()
            counts = _row_counts(n_real, reused=(reuse & real).sum(), over_budget=over, refresh=refreshed,
                                 no_entry=(~has & real).sum(), token_changed=(has & ~same & real).sum(),
                                 block=(has & same & in_block & real).sum(), drift=(valid & ~close & real).sum())
            # eager: skip the gathers when nothing is reused (a host read; under capture always a mask)
            recompute = ~reuse if call.capture or bool(reuse.any()) else None

        update = recompute if call.run is None else (call.run if recompute is None else recompute & call.run)
        store.write(self.ref_field, layer, cols, qf, update)
        store.write(self.token_field, layer, cols, tokens[..., None], update)
        self.counts[layer] += torch.stack(counts)
        return recompute

    def real_rows(self, call: LayerCall) -> torch.Tensor:
        """(B, m) bool over the running rows: real (not padding) and running for that batch element."""
        real = self.real[:, call.active]
        return real if call.run is None else real & call.run

    def report(self, sub_op: str) -> dict:
        """Reuse counters: overall and per layer; `sub_op` names the sub-operation reused rows skip."""
        counts = self.counts.cpu().tolist()
        per_layer = []
        for layer, (eligible, reused, *_) in enumerate(counts):
            per_layer.append({"layer": layer, "eligible": eligible, "reused": reused,
                              "reuse_fraction": _fraction(reused, eligible),
                              "recomputed": {"q": eligible, sub_op: eligible - reused}})
        eligible = sum(c[0] for c in counts)
        reused = sum(c[1] for c in counts)
        reasons = {name: sum(c[2 + i] for c in counts) for i, name in enumerate(REASONS)}
        return {"threshold": self.threshold, "row_budget": self.row_budget, "rows_eligible": eligible,
                "rows_reused": reused, "reuse_fraction": _fraction(reused, eligible),
                "reused_over_budget": sum(c[-1] for c in counts), "per_layer": per_layer,
                "recompute_reasons": reasons}


def _row_counts(eligible: torch.Tensor, reused=None, over_budget=None, **reasons) -> list[torch.Tensor]:
    """One layer's row of `QueryDrift.counts`: eligible, reused, one per entry of REASONS (by name),
    over-budget; what is not given is 0."""
    zero = torch.zeros_like(eligible)
    return [eligible, zero if reused is None else reused, *(reasons.get(r, zero) for r in REASONS),
            zero if over_budget is None else over_budget]


def _within_capacity(reuse: torch.Tensor, valid: torch.Tensor, drift: torch.Tensor, capacity: int):
    """Limit the rows to recompute (those not in `reuse`, (B, m)) to `capacity` columns over the batch,
    without a data-dependent shape. Columns are ranked by their most urgent row: a row whose cache
    entry is missing or whose token changed first, then by drift. Rows left out are reused although
    the threshold says otherwise; returns (reuse, over) with `over` marking them."""
    need = ~reuse
    urgency = torch.where(valid, drift, torch.full_like(drift, torch.inf))
    urgency = torch.where(need, urgency, torch.full_like(drift, -1.0)).amax(0)  # (m,)
    picked = torch.zeros_like(urgency, dtype=torch.bool).scatter_(0, torch.topk(urgency, capacity).indices, True)
    over = need & ~picked
    return reuse | over, over


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


class DriftHooks:
    """The loop events a plugin deciding with `self.drift` (a QueryDrift) passes on to it: which prompts
    decode this step, and which block is being decoded. A plugin class lists it beside `Plugin`."""

    drift: QueryDrift

    @hookimpl
    def dare_step_start(self, state):
        # a prompt whose block is complete waits for the rest of its batch: none of its rows recompute
        self.drift.set_running(state.unfinished_model_rows)

    @hookimpl
    def dare_block_start(self, state):
        self.drift.set_block(state.block_columns)


class ShadowLog:
    """Relative error of reused activations against their exact values, per layer and forward.

    `record(step, layer, reused, exact, weight)` takes tensors (B, r, ...) of the reused and the exact
    values of some rows and a (B, r) weight (1 for a reused real row, 0 otherwise); the error of one
    (step, layer) is sqrt(sum w ||reused - exact||^2 / sum w ||exact||^2) over its rows.
    """

    def __init__(self, n_layers: int, per_step_limit: int = 256):
        self.n_layers = n_layers
        self.per_step_limit = per_step_limit
        self._entries: list[tuple[int, int, torch.Tensor]] = []

    def record(self, step: int, layer: int, reused: torch.Tensor, exact: torch.Tensor, weight: torch.Tensor) -> None:
        w = weight.to(torch.float64)
        diff = (reused.to(torch.float64) - exact.to(torch.float64)).flatten(2).pow(2).sum(-1)
        norm = exact.to(torch.float64).flatten(2).pow(2).sum(-1)
        self._entries.append((step, layer, torch.stack([(diff * w).sum(), (norm * w).sum(), w.sum()])))

    def report(self) -> dict:
        per_layer = [{"layer": i, "records": 0, "rows": 0, "mean_rel_error": None, "max_rel_error": None}
                     for i in range(self.n_layers)]
        if not self._entries:
            return {"per_layer": per_layer, "mean_rel_error": None, "max_rel_error": None, "per_step": []}
        values = torch.stack([e[2] for e in self._entries]).cpu().tolist()
        errors = [(d / n) ** 0.5 if n > 0 else 0.0 for d, n, _ in values]
        for (step, layer, _), (_, _, rows), err in zip(self._entries, values, errors):
            entry = per_layer[layer]
            entry["records"] += 1
            entry["rows"] += int(rows)
            entry["mean_rel_error"] = (entry["mean_rel_error"] or 0.0) + err
            entry["max_rel_error"] = max(entry["max_rel_error"] or 0.0, err)
        for entry in per_layer:
            if entry["records"]:
                entry["mean_rel_error"] /= entry["records"]
        report = {"per_layer": per_layer, "mean_rel_error": sum(errors) / len(errors), "max_rel_error": max(errors)}
        if len(self._entries) <= self.per_step_limit:
            report["per_step"] = [{"step": s, "layer": layer, "rows": int(v[2]), "rel_error": err}
                                  for (s, layer, _), v, err in zip(self._entries, values, errors)]
        else:
            report["per_step"] = f"{len(self._entries)} records (more than {self.per_step_limit}): left out"
        return report
