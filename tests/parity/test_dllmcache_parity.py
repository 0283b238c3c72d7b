"""dLLM-Cache parity with the reference runs in tests/data/golden (dllmcache_llada_*.json).

- `nocache` and `cache_p1_g1_r0` (every row refreshed every step): tokens, commit order and NFE
  exactly, like the Fast-dLLM parity tests.
- every cached run: the plugin's step kinds at layers >= 1 equal the reference's
  `refresh_counts_layers_ge1` (the 1-based per-layer step counter runs across blocks).
- `cache_p100_g7_r0.25`, `cache_p50_g7_r0.25`: V-verify ranks the response rows by the cosine
  similarity of their fresh and cached values, and on these models most rows barely change, so
  the rows at the selection boundary often differ in the 7th digit or tie exactly (similarities
  0.9999998). Which of them the reference picked is then decided by its own float32 rounding,
  which no other float32 implementation reproduces (ours matches its logits to ~1e-4, not
  bit-for-bit). The plugin ranks similarities rounded to multiples of 2^-16, ties in column order
  (so a prompt picks the same rows alone and in any batch), where the reference's topk ranks raw
  values with an unspecified tie order. The plugin reports the selection margin per forward
  (`verify_margins`); commits are compared exactly before the first forward whose margin is below
  MARGIN (and before the golden README's fragile forward), and the whole run where no such forward
  exists.
- the plugin equals, token for token over whole runs, a direct transcription of the reference's
  block hook (separate prompt/response caches, keys cached before RoPE, concatenation): the part
  of the trajectory the golden comparison cannot reach is checked against the reference's
  algorithm run with our numerics and the plugin's tie rule.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dare_pipeline_plugins.dllm_cache import TIE_SCALE

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.models.rope import apply_rope, rope_cos_sin
from dare_pipeline.plugin_kit.testing import commit_order

torch.set_num_threads(1)

GOLDEN = Path(__file__).parents[1] / "data" / "golden"
FILES = ["dllmcache_llada_g64_b32_s32.json", "dllmcache_llada_g128_b32.json"]
CONFIGS = ["nocache", "cache_p1_g1_r0", "cache_p100_g7_r0.25", "cache_p50_g7_r0.25"]
# a V-verify selection whose last-selected / first-unselected similarity gap is below this may be a
# tie of the plugin's rounded ranking (and is one at the precision our activations share with the
# reference's)
MARGIN = 1 / TIE_SCALE


@functools.cache
def _golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def _options(config: dict | None) -> list:
    if config is None:
        return []
    return [{"name": "dllm_cache", "prompt_interval": config["prompt_interval_steps"],
             "response_interval": config["gen_interval_steps"], "ratio": config["transfer_ratio"]}]


def _generation(meta: dict) -> dict:
    return {k: meta[k] for k in ("gen_length", "block_length", "steps")}


_OUTPUTS: dict = {}


def _ours(golden_models, fname, config, index):
    key = (fname, config, index)
    if key not in _OUTPUTS:
        data = _golden(fname)
        recipe = Recipe.from_dict({"generation": _generation(data["meta"]),
                                   "plugins": _options(data["results"][config]["cache_config"])})
        _OUTPUTS[key] = Pipeline(golden_models["llada"], recipe).generate([data["meta"]["prompts"][index]])
    return _OUTPUTS[key]


def _params():
    return [pytest.param(f, c, i, id=f"{f.removeprefix('dllmcache_llada_').removesuffix('.json')}-{c}-p{i}")
            for f in FILES for c in CONFIGS for i in range(3)]


@pytest.mark.parametrize("fname, config, index", _params())
def test_dllmcache_run(golden_models, fname, config, index):
    data = _golden(fname)
    result = data["results"][config]
    run = result["runs"][index]
    prompt = data["meta"]["prompts"][index]
    out = _ours(golden_models, fname, config, index)
    ours = commit_order(out.unmask_step[0])

    if result["cache_config"] is not None:
        report = out.stats.plugins["dllm_cache"]
        expected = run["refresh_counts_layers_ge1"]
        assert report["refresh_counts"] == {"full": expected["full"], "response": expected["gen"],
                                            "prompt": expected["prompt"], "none": expected["cached"]}

    stops = [data["robustness"]["first_divergent_step"][config]["0.0001"][index]]
    if result["cache_config"] is not None and result["cache_config"]["transfer_ratio"] > 0:
        margins = out.stats.plugins["dllm_cache"]["verify_margins"]
        stops.append(next((f for f, m in margins if m < MARGIN), None))
    stops = [s for s in stops if s is not None]
    if stops:  # a tie: only the commits before it are determined
        theirs = commit_order(run["unmask_step"], before=min(stops))
        assert ours[: len(theirs)] == theirs
        return

    assert out.sequences[0][len(prompt):] == run["gen_ids"]
    assert ours == commit_order(run["unmask_step"])
    assert out.stats.nfe == run["nfe"]


def test_most_cached_runs_are_compared_beyond_their_first_verify_steps(golden_models):
    """The tie rule must not hollow the comparison out: count the forwards compared exactly (with
    torch 2.13 on CPU: 132 of 960 since ranks are rounded to 2^-16, 184 with raw ranks and a 1e-6
    margin; the rest of every trajectory is checked against the transcribed hook below)."""
    compared, total = 0, 0
    for fname in FILES:
        for config in CONFIGS[2:]:
            for index in range(3):
                out = _ours(golden_models, fname, config, index)
                margins = out.stats.plugins["dllm_cache"]["verify_margins"]
                stop = next((f for f, m in margins if m < MARGIN), None)
                nfe = out.stats.nfe
                compared += nfe if stop is None else stop - 1
                total += nfe
    assert compared >= 0.125 * total, (compared, total)


# ---- the reference's block hook, transcribed ------------------------------------------------------
def _reference_layer(layer, lid, x, cache, s, P, kp, kr, ratio, cos, sin):
    """One LLaDA block under dLLM-Cache's hook: caches per layer 'prompt' and 'gen' K (before RoPE), V,
    attention output and MLP output; refresh kinds from the 1-based step s; V-verify on the others."""
    refresh_gen = (s - 1) % kr == 0 or lid == 0
    refresh_prompt = (s - 1) % kp == 0 or lid == 0
    c = cache.setdefault(lid, {})
    b, length, d = x.shape
    n = int((length - P) * ratio)
    transfer = 0 < ratio <= 1 and n > 0
    positions = torch.arange(length)

    def split(t):
        return t.view(b, t.shape[1], -1, layer.head_dim).transpose(1, 2)

    def attention(q, k, v, qpos):
        qh = apply_rope(split(q), cos[:, :, qpos], sin[:, :, qpos])
        out = F.scaled_dot_product_attention(qh, apply_rope(split(k), cos, sin), split(v))
        return layer.o_proj(out.transpose(1, 2).reshape(b, qpos.numel(), -1))

    def project(h):
        return layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)

    if refresh_gen and refresh_prompt:
        q, k, v = project(layer.attn_norm(x))
        c.update(kp=k[:, :P], vp=v[:, :P], kg=k[:, P:].clone(), vg=v[:, P:])
        att = attention(q, k, v, positions)
        c.update(ap=att[:, :P], ag=att[:, P:].clone())
    elif refresh_gen:
        q, kg, vg = project(layer.attn_norm(x[:, P:]))
        c.update(kg=kg, vg=vg)
        c["ag"] = attention(q, torch.cat([c["kp"], kg], 1), torch.cat([c["vp"], vg], 1), positions[P:])
        att = torch.cat([c["ap"], c["ag"]], 1)
    else:
        if refresh_prompt:
            qp, kp_, vp = project(layer.attn_norm(x[:, :P]))
            c.update(kp=kp_, vp=vp)
        if transfer:
            hg = layer.attn_norm(x[:, P:])
            vg = layer.v_proj(hg)
            sim = F.cosine_similarity(vg, c["vg"], dim=-1)  # the reference: topk(sim, n, largest=False)
            idx = torch.sort(torch.round(sim * TIE_SCALE), dim=-1, stable=True).indices[:, :n]
            e = idx[..., None].expand(-1, -1, d)
            hs = torch.gather(hg, 1, e)
            qs = layer.q_proj(hs)
            c["vg"] = vg
            c["kg"].scatter_(1, e, layer.k_proj(hs))
        k, v = torch.cat([c["kp"], c["kg"]], 1), torch.cat([c["vp"], c["vg"]], 1)
        if refresh_prompt and transfer:
            a = attention(torch.cat([qp, qs], 1), k, v, torch.cat([positions[:P], idx[0] + P]))
            c["ap"] = a[:, :P]
            c["ag"].scatter_(1, e, a[:, P:])
        elif refresh_prompt:
            c["ap"] = attention(qp, k, v, positions[:P])
        elif transfer:
            c["ag"].scatter_(1, e, attention(qs, k, v, idx[0] + P))
        att = torch.cat([c["ap"], c["ag"]], 1)
    x = x + att
    if refresh_gen and refresh_prompt:
        m = layer.ffn(x)
        c.update(mp=m[:, :P], mg=m[:, P:].clone())
    elif refresh_gen:
        c["mg"] = layer.ffn(x[:, P:])
    elif refresh_prompt and transfer:
        m = layer.ffn(torch.cat([x[:, :P], torch.gather(x[:, P:], 1, e)], 1))
        c["mp"] = m[:, :P]
        c["mg"].scatter_(1, e, m[:, P:])
    elif refresh_prompt:
        c["mp"] = layer.ffn(x[:, :P])
    elif transfer:
        c["mg"].scatter_(1, e, layer.ffn(torch.gather(x[:, P:], 1, e)))
    return x + torch.cat([c["mp"], c["mg"]], 1)


@torch.no_grad()
def _reference_generate(model, prompt, gen_length, block_length, steps, kp, kr, ratio):
    """dLLM-Cache's generate (low-confidence, temperature 0, float32 confidence) over the hook above."""
    mask, cfg = model.config.mask_token_id, model.config
    P, length = len(prompt), len(prompt) + gen_length
    x = torch.full((1, length), mask)
    x[0, :P] = torch.tensor(prompt)
    cos, sin = rope_cos_sin(torch.arange(length)[None], cfg.head_dim, cfg.rope_theta)
    blocks = gen_length // block_length
    per_block = steps // blocks
    cache, s = {}, 0
    unmask = [0] * gen_length
    for blk in range(blocks):
        end = P + (blk + 1) * block_length
        masked = int((x[0, end - block_length:end] == mask).sum())
        counts = [masked // per_block + (1 if i < masked % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            s += 1
            h = model.embed(x)
            for lid, layer in enumerate(model.layers):
                h = _reference_layer(layer, lid, h, cache, s, P, kp, kr, ratio, cos, sin)
            logits = model._head(h)
            x0 = logits.argmax(-1)
            conf = torch.gather(F.softmax(logits, -1), -1, x0[..., None])[..., 0]
            conf[:, end:] = -torch.inf
            conf = torch.where(x == mask, conf, -torch.inf)
            for j in torch.topk(conf[0], counts[i]).indices.tolist():
                x[0, j] = x0[0, j]
                unmask[j - P] = s
    return x[0, P:].tolist(), unmask


@pytest.mark.parametrize("fname, config, index", [p for p in _params() if "r0.25" in p.id])
def test_plugin_equals_the_transcribed_reference_hook(golden_models, fname, config, index):
    data = _golden(fname)
    meta, cc = data["meta"], data["results"][config]["cache_config"]
    tokens, unmask = _reference_generate(golden_models["llada"], meta["prompts"][index], meta["gen_length"],
                                         meta["block_length"], meta["steps"], cc["prompt_interval_steps"],
                                         cc["gen_interval_steps"], cc["transfer_ratio"])
    out = _ours(golden_models, fname, config, index)
    assert out.sequences[0][len(meta["prompts"][index]):] == tokens
    assert out.unmask_step[0] == unmask
