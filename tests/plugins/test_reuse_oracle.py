"""Oracle tests for DARE-KV, DARE-O, FFN reuse and dLLM-Cache: independent implementations of the documented rules.

The oracle computes every row of every layer and substitutes the cached rows by the rule of
docs/reuse.md (a row reuses when it has a cache entry, its token is the one of its last recompute
at that layer, the forward is not the generation's first, its layer is not exempt, and
||q - q_ref|| / ||q_ref|| < threshold; recomputed rows take q as their reference; ffn_reuse: the same
rule on the FFN's input row x instead of q, substituting the FFN output). It replays the
canvases the plugin's decode fed, forward by forward, and its logits must match the plugin's. A
plugin that computes rows it claims to reuse, reuses rows the rule recomputes, or writes a cached
row at the wrong position fails here; so does one that saves nothing (the counting test below).
Batch of left-padded prompts, both families, thresholds where rows really are reused, eager and
captured execution. dLLM-Cache's oracle (below) follows its interval and V-verify rule the same way.
"""

from __future__ import annotations

import functools

import pytest
import torch
from dare_pipeline_plugins.dllm_cache import TIE_SCALE

from dare_pipeline import Pipeline
from dare_pipeline.plugin_kit.testing import random_prompts, tiny_model

GEN = {"gen_length": 16, "block_length": 8, "steps": 16}
VOCAB = 64
MODES = [{"mode": "eager"}, {"mode": "compiled", "backend": "aot_eager"}]


@functools.cache
def _model(family):
    model = tiny_model(family, seed=6, n_layers=3, vocab_size=VOCAB)
    with torch.no_grad():  # damp attention so queries drift little and rows are really reused
        for layer in model.layers:
            layer.o_proj.weight.mul_(0.05)
    return model


def _prompts():
    return random_prompts(3, VOCAB, seed=9, min_len=2, max_len=7, exclude=(VOCAB - 2, VOCAB - 1))


def _record_forwards(model, monkeypatch):
    """Capture every forward_rows call's inputs and logits."""
    calls = []
    original = type(model).forward_rows

    def spy(self, tokens, fed, positions, key_mask, store, reuse, head_rows=None, **kwargs):
        logits = original(self, tokens, fed, positions, key_mask, store, reuse, head_rows, **kwargs)
        calls.append((tokens.clone(), fed, positions.clone(), None if key_mask is None else key_mask.clone(),
                      None if head_rows is None else head_rows.clone(), logits.clone()))
        return logits

    monkeypatch.setattr(type(model), "forward_rows", spy)
    return calls


class Oracle:
    """Every row computed; cached rows substituted by the rule (kind: 'kv', 'o' or 'ffn': the FFN
    output, decided by the drift of the FFN's input row instead of the query)."""

    def __init__(self, model, kind: str, threshold: float, exempt: tuple[int, ...], recompute_block: bool):
        self.model, self.kind, self.threshold, self.exempt = model, kind, threshold, set(exempt)
        self.recompute_block = recompute_block
        self.cache: dict[int, dict] = {}  # per layer: reference query, token, cached values
        self.reused_real = 0  # reused rows that are not padding (what the plugin counts)

    def forward(self, tokens, positions, key_mask, head_rows):
        model = self.model
        real = torch.ones_like(tokens, dtype=torch.bool) if key_mask is None else key_mask
        cos, sin = model._rope(positions)
        x = model.embed(tokens)
        for i, layer in enumerate(model.layers):
            h = layer.attn_norm(x)
            q = layer.project_q(h, cos, sin)
            # the row the rule compares: the query (DARE), or the FFN's input row (after attention)
            probe = q
            if self.kind != "ffn":
                keep = self._decide(i, q, tokens, real)
            k, v = layer.project_kv(h, cos, sin)
            if self.kind == "kv":
                k, v = self._substitute(i, keep, [k, v], row_dim=2)
            delta = layer.attend(q, k, v, key_mask)
            if self.kind == "o":
                (delta,) = self._substitute(i, keep, [delta], row_dim=1)
            x = x + delta
            f = layer.ffn(x)
            if self.kind == "ffn":
                probe = x[:, None]  # one "head" of width d_model
                keep = self._decide(i, probe, tokens, real)
                (f,) = self._substitute(i, keep, [f], row_dim=1)
            self._remember(i, probe, tokens, keep)
            x = x + f
        return model._head(x if head_rows is None else x[:, head_rows])

    def _decide(self, layer, probe, tokens, real) -> torch.Tensor:
        keep = self._keep(layer, probe, tokens)
        if self.recompute_block:
            keep = keep & ~_current_block(tokens, self.model.config.mask_token_id)
        self.reused_real += int((keep & real).sum())
        return keep

    def _keep(self, layer, q, tokens) -> torch.Tensor:
        entry = self.cache.get(layer)
        if entry is None or layer in self.exempt:
            return torch.zeros(tokens.shape, dtype=torch.bool)
        qf = _flat(q)
        drift = (qf - entry["q"]).norm(dim=-1) / entry["q"].norm(dim=-1).clamp_min(torch.finfo(torch.float).tiny)
        return (tokens == entry["token"]) & (drift < self.threshold)

    def _substitute(self, layer, keep, fresh, row_dim):
        entry = self.cache.setdefault(layer, {})
        cached = entry.get("values", fresh)
        shape = [1, 1, 1, 1] if row_dim == 2 else [1, 1, 1]
        shape[0], shape[row_dim] = keep.shape
        mask = keep.view(shape)
        entry["values"] = [torch.where(mask, c, f) for c, f in zip(cached, fresh)]
        return entry["values"]

    def _remember(self, layer, q, tokens, keep):
        entry = self.cache.setdefault(layer, {})
        qf = _flat(q)
        entry["q"] = torch.where(keep[..., None], entry["q"], qf) if "q" in entry else qf
        entry["token"] = torch.where(keep, entry["token"], tokens) if "token" in entry else tokens.clone()


def _current_block(tokens, mask_id):
    """(1, L) bool: the columns of the block being decoded, the first block of the answer (the last
    GEN["gen_length"] columns) that still holds a mask token in some prompt."""
    start = tokens.shape[1] - GEN["gen_length"]
    masked = (tokens[:, start:] == mask_id).any(0).view(-1, GEN["block_length"]).any(-1)
    block = int(masked.float().argmax())
    out = torch.zeros(1, tokens.shape[1], dtype=torch.bool)
    out[:, start + block * GEN["block_length"]: start + (block + 1) * GEN["block_length"]] = True
    return out


def _flat(q):
    b, heads, n, hd = q.shape
    return q.transpose(1, 2).reshape(b, n, heads * hd).float()


EAGER, CAPTURED = MODES


def _cases():
    """Every plugin x family x threshold eagerly (0.3: drift decides; 1e9: only a changed token or the
    first forward makes a row recompute); the captured path once per plugin (compiling is slow here,
    and test_compiled_execution already holds every recipe's captured tokens to the eager ones)."""
    for name, kind in (("dare_kv", "kv"), ("dare_o", "o"), ("ffn_reuse", "ffn")):
        for family in ("llada", "dream"):
            for threshold in (0.3, 1e9):
                yield pytest.param(name, kind, threshold, family, EAGER, id=f"{name}-{family}-{threshold:g}-eager")
        family = "dream" if name == "dare_o" else "llada"
        yield pytest.param(name, kind, 0.3, family, CAPTURED, id=f"{name}-{family}-0.3-compiled")


@pytest.mark.parametrize("name, kind, threshold, family, execution", list(_cases()))
def test_plugin_logits_equal_the_oracles(name, kind, threshold, family, execution, monkeypatch):
    model = _model(family)
    pipe = Pipeline(model, {"generation": GEN, "execution": execution,
                            "plugins": [{"name": name, "threshold": threshold}]})
    pipe.generate(_prompts())  # warm-up (compiles in the captured mode)
    calls = _record_forwards(model, monkeypatch)
    out = pipe.generate(_prompts())
    options = pipe.plugins[-1].options
    oracle = Oracle(model, kind, threshold, options.exempt_layers, options.recompute_block)
    for step, (tokens, fed, positions, key_mask, head_rows, logits) in enumerate(calls):
        assert fed == slice(0, tokens.shape[1])  # no row feeder: the whole canvas every forward
        expected = oracle.forward(tokens, positions, key_mask, head_rows)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=f"forward {step}")
    report = out.stats.plugins[name]
    assert report["rows_reused"] > 0.2 * report["rows_eligible"]  # the threshold really reuses rows
    assert report["rows_reused"] == oracle.reused_real


# ---- counted work is work done -----------------------------------------------------------------------
COUNTED = {"q": "q_proj", "kv": "k_proj", "attn": "o_proj", "ffn": "gate_proj", "v": "v_proj"}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("plugins, saves", [
    ([{"name": "dare_kv", "threshold": 0.3}], "kv"),
    ([{"name": "dare_o", "threshold": 0.3}], "attn"),
    ([{"name": "dllm_cache", "prompt_interval": 4, "response_interval": 2}], "q"),
    ([{"name": "dual_cache"}, {"name": "dare_kv", "threshold": 0.3}], "kv"),
    ([{"name": "prefix_cache"}, {"name": "dare_o", "threshold": 0.3}], "attn"),
    ([{"name": "ffn_reuse", "threshold": 0.3}], "ffn"),
    ([{"name": "dual_cache"}, {"name": "dare_o", "threshold": 0.3}, {"name": "ffn_reuse", "threshold": 0.3}], "ffn"),
])
def test_rows_counted_are_rows_that_entered_the_projections(plugins, saves, family):
    """Counting wrappers around the projections see exactly the rows the stats report (V-verify's
    value projections included), and fewer than were fed for the sub-operation the plugin skips: a
    plugin that computes every row and then overwrites the reused ones fails here."""
    model = _model(family)
    seen = {sub: [0] * len(model.layers) for sub in COUNTED}
    handles = []
    for i, layer in enumerate(model.layers):
        for sub, proj in COUNTED.items():
            def count(module, args, output, sub=sub, i=i):
                seen[sub][i] += args[0].numel() // args[0].shape[-1]
            handles.append(getattr(layer, proj).register_forward_hook(count))
    try:
        out = Pipeline(model, {"generation": GEN, "plugins": plugins}).generate(_prompts())
    finally:
        for handle in handles:
            handle.remove()
    counted = out.stats.rows_by_layer()
    for i in range(len(model.layers)):
        for sub in ("q", "kv", "attn", "ffn"):
            assert seen[sub][i] == counted[i][sub], (i, sub)
        # values are projected with the keys, and alone by dLLM-Cache's V-verify (counted as `v`)
        assert seen["v"][i] == counted[i]["kv"] + counted[i]["v"], i
    fed = out.stats.rows_fed * len(model.layers)
    assert sum(seen[saves]) < fed  # the plugin really skipped rows of its sub-operation


# ---- dLLM-Cache --------------------------------------------------------------------------------------
FULL, RESPONSE, PROMPT, NONE = range(4)


class DllmOracle:
    """dLLM-Cache by its documented rule, every projection computed for every row: per layer the
    forward counter s picks the kind (prompt rows refresh when (s-1) % Kp == 0, response rows when
    (s-1) % Kr == 0, layer 0 always); V-verify (prompt-only and no refresh) replaces the cached values
    of the response rows and the floor(ratio G) least similar run the layer; the other rows add
    their cached attention and FFN deltas."""

    def __init__(self, model, prompt_end, kp, kr, ratio):
        self.model, self.P, self.kp, self.kr, self.ratio = model, prompt_end, kp, kr, ratio
        self.s = 0
        self.cache: dict[int, dict] = {}

    def forward(self, tokens, positions, key_mask, head_rows):
        model, P = self.model, self.P
        self.s += 1
        b, n = tokens.shape
        cos, sin = model._rope(positions)
        x = model.embed(tokens)
        for i, layer in enumerate(model.layers):
            response = (self.s - 1) % self.kr == 0 or i == 0
            prompt = (self.s - 1) % self.kp == 0 or i == 0
            h = layer.attn_norm(x)
            q = layer.project_q(h, cos, sin)
            k, v = layer.project_kv(h, cos, sin)
            c = self.cache.setdefault(i, {"k": k, "v": v, "attn": None, "ffn": None})
            run = torch.zeros(b, n, dtype=torch.bool)
            run[:, P:] = response
            run[:, :P] = prompt
            if not response and self.ratio > 0:  # V-verify
                g = n - P
                sim = torch.nn.functional.cosine_similarity(
                    v[:, :, P:].transpose(1, 2).reshape(b, g, -1), c["v"][:, :, P:].transpose(1, 2).reshape(b, g, -1),
                    dim=-1)
                # the least similar rows; similarities rounded to multiples of 1 / TIE_SCALE, ties in column order
                picked = torch.sort(torch.round(sim * TIE_SCALE), dim=-1, stable=True).indices[:, :int(g * self.ratio)]
                run[:, P:] |= torch.zeros(b, g, dtype=torch.bool).scatter_(1, picked, True)
                c["v"] = torch.cat([c["v"][:, :, :P], v[:, :, P:]], dim=2)
            mask = run[:, None, :, None]
            c["k"], c["v"] = torch.where(mask, k, c["k"]), torch.where(mask, v, c["v"])
            attn = layer.attend(q, c["k"], c["v"], key_mask)
            ffn = layer.ffn(x + attn)
            if c["attn"] is not None:
                attn = torch.where(run[..., None], attn, c["attn"])
                ffn = torch.where(run[..., None], ffn, c["ffn"])
            c["attn"], c["ffn"] = attn, ffn
            x = x + attn + ffn
        return model._head(x if head_rows is None else x[:, head_rows])


@pytest.mark.parametrize("family, execution", [("llada", EAGER), ("dream", EAGER), ("llada", CAPTURED)],
                         ids=["llada-eager", "dream-eager", "llada-compiled"])
def test_dllm_cache_logits_equal_the_oracles(family, execution, monkeypatch):
    model = _model(family)
    options = {"name": "dllm_cache", "prompt_interval": 5, "response_interval": 3, "ratio": 0.25}
    gen = {"gen_length": 16, "block_length": 16, "steps": 16}
    pipe = Pipeline(model, {"generation": gen, "execution": execution, "plugins": [options]})
    pipe.generate(_prompts())
    calls = _record_forwards(model, monkeypatch)
    out = pipe.generate(_prompts())
    prompt_end = calls[0][0].shape[1] - gen["gen_length"]  # every prompt left-padded to one end
    oracle = DllmOracle(model, prompt_end, kp=5, kr=3, ratio=0.25)
    for step, (tokens, fed, positions, key_mask, head_rows, logits) in enumerate(calls):
        expected = oracle.forward(tokens, positions, key_mask, head_rows)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=f"forward {step}")
    assert out.stats.plugins["dllm_cache"]["rows_reused"] > 0


def test_v_verify_values_are_not_projected_a_second_time():
    """Intervals that refresh only at the first forward: every later forward at layers >= 1 is
    V-verify alone, whose picks take the values it projected; the value projection then sees the
    G response rows once per forward, not G plus the picks."""
    model = _model("llada")
    prompt, gen = [[5, 6, 7, 8]], {"gen_length": 16, "block_length": 16, "steps": 16}
    seen = {"k": [0] * len(model.layers), "v": [0] * len(model.layers)}
    handles = [getattr(layer, f"{sub}_proj").register_forward_hook(
        lambda module, args, output, sub=sub, i=i: seen[sub].__setitem__(i, seen[sub][i] + args[0].shape[1]))
        for i, layer in enumerate(model.layers) for sub in ("k", "v")]
    try:
        out = Pipeline(model, {"generation": gen, "plugins": [
            {"name": "dllm_cache", "prompt_interval": 1000, "response_interval": 1000, "ratio": 0.25}]}) \
            .generate(prompt)
    finally:
        for handle in handles:
            handle.remove()
    length, answer, nfe = len(prompt[0]) + 16, 16, out.stats.nfe
    picks = int(answer * 0.25)
    for i in range(1, len(model.layers)):
        assert seen["v"][i] == length + (nfe - 1) * answer  # V-verify's values only
        assert seen["k"][i] == length + (nfe - 1) * picks  # keys for the picks
