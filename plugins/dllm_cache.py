"""dLLM-Cache: long-interval prompt refresh, short-interval response refresh,
and V-verify in between.

Every forward feeds the whole canvas (the plugin refuses row feeders). Per layer and prompt, with s
the layer's forward counter (1-based, running across blocks, reset per generation, as the
reference's `dLLMCache` step counter; in a batch it counts the forwards the prompt takes part in: a
prompt whose block is complete, waiting for the rest of its batch under a variable-step policy,
neither counts the forward nor changes any of its caches, so it decodes as it would alone):
- prompt rows (columns < prompt end) recompute when (s - 1) % prompt_interval == 0, response rows
  when (s - 1) % response_interval == 0; both at s = 1; layer 0 always recomputes every row;
- rows that do not recompute add their cached attention and FFN deltas (store fields ATTN_OUT and
  FFN_OUT) to their fresh residual input;
- V-verify, at every forward where the response rows are not refreshed (also at prompt-only
  refreshes, as the reference): the values of all response rows are computed, the floor(ratio * G)
  response rows whose values have the lowest cosine similarity with the cached ones recompute the
  whole layer (query, key, attention, FFN), and the cached values of every response row are
  replaced by the fresh ones (their keys stay cached).

Everything cached lives in the activation store (K/V, ATTN_OUT, FFN_OUT); the plugin holds the
per-layer counters only. Unlike the reference, left-padded batches are exact: padding is masked out
of attention, never selected and never counted.

Options:
  prompt_interval    Kp (default 100)
  response_interval  Kr (default 7)
  ratio              rho, fraction of response rows V-verify recomputes (default 0.25; 0: none)
  shadow             also compute the exact layer output of every row that reuses its deltas and
                     report the relative error of the reused attention + FFN delta (slower; the
                     decode still uses the cached deltas)

Stats (under `dllm_cache`): refresh_counts (forwards of each kind at layer 1, like every layer >= 1:
full, response, prompt, none; summed over the prompts of a batch), rows_eligible / rows_reused /
reuse_fraction (real rows that added cached deltas instead of running the layer, over all layers
and forwards), per_layer (eligible, reused,
reuse_fraction, recomputed {q, kv, attn, ffn, v_verify}), min_verify_margin and verify_margins
(per forward: the cosine-similarity gap between the last row V-verify selected and the first it did
not; below 2^-16 the two may tie: similarities are ranked rounded to multiples of 2^-16, equal ones in
column order, so a prompt picks the same rows alone and in any batch), and `shadow` in shadow mode.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F

from dare_pipeline.config import at_least, in_range
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.reuse import ATTN_OUT, FFN_OUT, LayerReuse, ShadowLog

KINDS = ("full", "response", "prompt", "none")
FULL, RESPONSE, PROMPT, NONE = range(4)
WAITING = len(KINDS)  # a prompt whose block is done, waiting for the rest of its batch
# V-verify ranks cosine similarities rounded to multiples of 1 / TIE_SCALE (2^-16, about 1.5e-5), equal
# ones in column order. The forward's float rounding differs by ~1e-7 between batch shapes (the
# attention sums run over the padded length), and most rows barely move (similarities 0.9999999 ±
# one ulp): ranked raw, those near-ties would be decided by a prompt's batch.
TIE_SCALE = 2.0 ** 16

ROW_FEEDER = ("dLLM-Cache schedules its own prompt and response refreshes over the whole canvas (V-verify picks "
              "floor(ratio * G) of all G response rows); prefix_cache / dual_cache feed only part of the canvas "
              "and serve their own stale rows on their own schedule, so each would serve the other's stale rows")
DRIFT_REUSE = ("dLLM-Cache already decides per layer which rows recompute at all (its V-verify picks the rows whose "
               "values moved most); a query-drift predictor inside those rows would skip work on exactly the rows "
               "flagged as changed, and no refresh of DARE's ever coincides with dLLM-Cache's interval refreshes")


@attrs.frozen(kw_only=True)
class DllmCacheOptions:
    prompt_interval: int = attrs.field(default=100, validator=at_least(1))
    response_interval: int = attrs.field(default=7, validator=at_least(1))
    ratio: float = attrs.field(default=0.25, validator=in_range(0.0, 1.0))
    shadow: bool = False


class _LayerCache(LayerReuse):
    """The per-layer decision. What each prompt refreshes at each layer is decided on the host in
    `begin_forward` (it depends on Python counters only); the rows are then selected on the device
    from those kinds, so the same code runs eagerly and inside a compiled forward."""

    decisions = frozenset({"layer_rows"})
    fields = frozenset({ATTN_OUT, FFN_OUT})

    def __init__(self, plugin: DllmCache, state):
        self.p = plugin
        self.capturable = plugin.shadow is None
        self.prompt_end, self.length = state.prompt_end, state.length
        self.real = state.model_rows(state.attention_mask)
        self.n_verify = int((self.length - self.prompt_end) * plugin.options.ratio)  # floor(rho * G)
        self.columns = torch.arange(self.length, device=self.real.device)
        self.n_layers = state.model.config.n_layers

    def begin_forward(self, refresh, step):
        """Advance each taking-part prompt's counters and fix, per layer, what it refreshes."""
        p = self.p
        kinds = [[self._kind(b, layer) if on else WAITING for layer in range(self.n_layers)]
                 for b, on in enumerate(p.active)]
        self.kinds = kinds
        # layers where every prompt runs every row (a waiting prompt's layer 0 is recomputed too: its
        # layer-0 caches are never read)
        self.all_rows = [all(k[layer] == FULL or (k[layer] == WAITING and layer == 0) for k in kinds)
                         for layer in range(self.n_layers)]
        self.kind_codes = torch.tensor(kinds, dtype=torch.long).to(self.real.device, non_blocking=True)
        self.active = torch.tensor(p.active).to(self.real.device, non_blocking=True)

    def capacity(self, decision, layer, rows):
        """Rows the batch runs at `layer`: all, or the prompt rows if any prompt refreshes them plus the
        response rows if any refreshes them, else V-verify's picks of every verifying prompt."""
        if self.all_rows[layer]:
            return rows
        kinds = [k[layer] for k in self.kinds]
        prompt = self.prompt_end if any(k in (FULL, PROMPT) for k in kinds) else 0
        response = rows - self.prompt_end
        if not any(k in (FULL, RESPONSE) for k in kinds):
            response = min(response, self.n_verify * sum(k in (PROMPT, NONE) for k in kinds))
        return min(rows, prompt + response)

    def value_rows(self, layer, batch):
        """V-verify's value projections: every response row of the batch where a prompt verifies."""
        verifies = self.n_verify > 0 and any(k[layer] in (PROMPT, NONE) for k in self.kinds)
        return batch * (self.length - self.prompt_end) if verifies else 0

    def values_fresh(self, layer):
        """Where every prompt verifies (or waits), the rows that run are V-verify's picks, whose values
        it has just written: the model does not project them again."""
        kinds = [k[layer] for k in self.kinds]
        return (self.n_verify > 0 and not self.all_rows[layer] and NONE in kinds
                and all(k in (NONE, WAITING) for k in kinds))

    def layer_rows(self, call, x):
        p, layer = self.p, call.layer
        if x.shape[1] != self.length:
            raise RuntimeError(f"dllm_cache needs every canvas column fed; this forward feeds {call.fed} "
                               f"(a row feeder is active)")
        code = self.kind_codes[:, layer]
        run = None if self.all_rows[layer] else self._rows(call, x, code)
        real = self.real & self.active[:, None]  # waiting prompts are not counted
        ran = real if run is None else run & real
        verified = (code == PROMPT) | (code == NONE)
        verify_rows = (real[:, self.prompt_end:].sum(-1) * verified).sum() if self.n_verify > 0 else real.sum() * 0
        p.counts[layer] += torch.stack([real.sum(), (real & ~ran).sum(), verify_rows])
        if p.shadow is not None and run is not None:
            _shadow_layer(p, call, x, real & ~run)
        return run

    def _kind(self, b: int, layer: int) -> int:
        """Advance prompt b's step counter at `layer` and return what this forward refreshes for it."""
        p, opts = self.p, self.p.options
        p.counter[b][layer] += 1
        s = p.counter[b][layer]
        response = (s - 1) % opts.response_interval == 0 or layer == 0
        prompt = (s - 1) % opts.prompt_interval == 0 or layer == 0
        kind = FULL if response and prompt else RESPONSE if response else PROMPT if prompt else NONE
        p.kinds[layer][kind] += 1
        return kind

    def _rows(self, call, x, code) -> torch.Tensor:
        """(B, n) rows that run the layer, per prompt: all (full refresh), the response (response refresh),
        the real prompt rows (prompt refresh; padding is never selected), plus V-verify's picks where
        the response is not refreshed; none for a prompt that only waits for the rest of its batch."""
        response_col = (self.columns >= self.prompt_end)[None]
        code = code[:, None]
        run = (code == FULL) | ((code == RESPONSE) & response_col) | ((code == PROMPT) & ~response_col & self.real)
        verify = ((code == PROMPT) | (code == NONE))[:, 0]
        if self.n_verify > 0 and any(k[call.layer] in (PROMPT, NONE) for k in self.kinds):
            picked = self._verify(call, x, verify)
            run = run | F.pad(picked, (self.prompt_end, 0))
        return run

    def _verify(self, call, x, verify: torch.Tensor) -> torch.Tensor:
        """V-verify for the batch rows `verify` ((B,) bool): fresh values of every response row, the n
        least similar to the cached ones recompute the layer, and every verified prompt's cached
        response values become the fresh ones. Returns the (B, G) picks (none for other prompts)."""
        P, store, layer, n = self.prompt_end, call.store, call.layer, self.n_verify
        v = call.module.project_v(call.module.attn_norm(x[:, P:]))  # (B, kv_heads, G, hd)
        cached = store.values(layer)[:, :, P:]
        b, _, g, _ = v.shape
        sim = F.cosine_similarity(v.transpose(1, 2).reshape(b, g, -1), cached.transpose(1, 2).reshape(b, g, -1), dim=-1)
        # ascending rounded similarity, ties in column order (a stable sort; topk's tie order depends on
        # the batch shape), so a prompt's picks are the same alone and in any batch
        order = torch.sort(torch.round(sim * TIE_SCALE), dim=-1, stable=True).indices
        idx = order[:, :n]
        if n < g:  # how far the selection is from a tie: last selected vs first unselected similarity
            ranked = torch.topk(sim, n + 1, largest=False).values
            margin = torch.where(verify, ranked[:, n] - ranked[:, n - 1], torch.inf).amin()
            margins = self.p.margin_buffer
            margins[layer] = torch.minimum(margins[layer], margin)
        mask = verify[:, None].expand(b, g)
        store.write_v(layer, self.columns[P:] if call.capture else slice(P, self.length), v, mask,
                      check=not call.capture)
        picked = torch.zeros(b, g, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
        return picked & mask


def _shadow_layer(plugin: DllmCache, call, x: torch.Tensor, reused: torch.Tensor) -> None:
    """Exact attention + FFN delta of the rows that reuse their cached deltas, with every fed row's K/V
    recomputed from this forward's input (nothing is written), vs the cached deltas."""
    sel = reused.any(0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return
    module, store, layer = call.module, call.store, call.layer
    cos, sin = call.rope
    h = module.attn_norm(x)
    q = module.project_q(h[:, sel], cos[:, :, sel], sin[:, :, sel])
    k, v = module.project_kv(h, cos, sin)
    keys, values = store.keys(layer).clone(), store.values(layer).clone()
    keys[:, :, call.fed], values[:, :, call.fed] = k, v
    attn = module.attend(q, keys, values, call.key_mask)
    exact = attn + module.ffn(x[:, sel] + attn)
    cols = sel + call.fed.start
    cached = store.read(ATTN_OUT, layer, cols) + store.read(FFN_OUT, layer, cols)
    plugin.shadow.record(call.step, layer, cached, exact, reused[:, sel])


class DllmCache(Plugin):
    """dLLM-Cache: long-interval prompt refresh, short-interval response refresh, V-verify between."""

    name = "dllm_cache"
    Options = DllmCacheOptions
    provides = frozenset({"layer_rows"})
    store_fields = frozenset({ATTN_OUT, FFN_OUT})
    conflicts: ClassVar[dict[str, str]] = {"prefix_cache": ROW_FEEDER, "dual_cache": ROW_FEEDER, "dare_kv": DRIFT_REUSE, "dare_o": DRIFT_REUSE}
    exact_options: ClassVar[dict[str, Any]] = {"prompt_interval": 1, "response_interval": 1}

    @hookimpl
    def dare_generation_start(self, state):
        store = state.require_store()
        n_layers = state.model.config.n_layers
        # per prompt (model batch row) and layer: forwards it took part in (1-based step counter)
        self.counter = [[0] * n_layers for _ in range(state.model_batch)]
        self.active = [True] * state.model_batch
        self.kinds = [[0] * len(KINDS) for _ in range(n_layers)]  # per layer: (prompt, forward)s of each kind
        # per layer: eligible real rows, real rows that reused their deltas, rows V-verify computed V for
        self.counts = store.buffer("dllm_cache.counts", (n_layers, 3), torch.long)
        self.margins: list[tuple[int, torch.Tensor]] = []  # (forward, V-verify selection margin)
        # per layer, the current forward's margin (inf: no verification), written inside the forward
        self.margin_buffer = store.buffer("dllm_cache.margins", (n_layers,), torch.float)
        self.shadow = ShadowLog(n_layers) if self.options.shadow else None

    @hookimpl
    def dare_step_start(self, state):
        # a prompt whose block is complete only waits for the rest of its batch: the forward does not
        # count for it and changes none of its caches, so it decodes as it would alone (the loop has
        # read which prompts go on: no host read here)
        self.active = state.unfinished_model_rows
        self.margin_buffer.fill_(torch.inf)

    @hookimpl
    def dare_step_end(self, state, committed):
        self.margins.append((state.step - 1, self.margin_buffer.amin()))  # on the device, read at the report

    @hookimpl
    def dare_layer_reuse(self, state):
        return _LayerCache(self, state)

    @hookimpl
    def dare_report_stats(self, state):
        kinds = self.kinds
        counts = self.counts.cpu().tolist()
        per_layer = []
        for layer, (eligible, reused, verify) in enumerate(counts):
            ran = eligible - reused
            per_layer.append({"layer": layer, "eligible": eligible, "reused": reused,
                              "reuse_fraction": _fraction(reused, eligible),
                              "recomputed": {"q": ran, "kv": ran, "attn": ran, "ffn": ran, "v_verify": verify}})
        eligible, reused = sum(c[0] for c in counts), sum(c[1] for c in counts)
        report = {"refresh_counts": dict(zip(KINDS, kinds[min(1, len(kinds) - 1)])),
                  "rows_eligible": eligible, "rows_reused": reused, "reuse_fraction": _fraction(reused, eligible),
                  "per_layer": per_layer}
        report.update(self._margin_report())
        if self.shadow is not None:
            report["shadow"] = self.shadow.report()
        return report

    def _margin_report(self, limit: int = 512) -> dict:
        """V-verify's selection margin: the similarity gap between the last selected and the first
        unselected response row (min over layers and prompts), per forward (1-based, as unmask_step).
        A margin below 2^-16 may be a tie, broken by column order: an implementation that ranks the raw
        similarities (the reference's topk) may pick other rows there."""
        if not self.margins:
            return {"min_verify_margin": None, "verify_margins": []}
        values = torch.stack([m for _, m in self.margins]).cpu().tolist()
        per_forward: dict[int, float] = {}
        for (step, _), value in zip(self.margins, values):
            if value != float("inf"):  # a forward without V-verify has no margin
                per_forward[step + 1] = min(value, per_forward.get(step + 1, value))
        values = list(per_forward.values())
        if not values:
            return {"min_verify_margin": None, "verify_margins": []}
        listed = [[f, m] for f, m in sorted(per_forward.items())] if len(per_forward) <= limit else \
            f"{len(per_forward)} forwards (more than {limit}): left out"
        return {"min_verify_margin": min(values), "verify_margins": listed}


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0
