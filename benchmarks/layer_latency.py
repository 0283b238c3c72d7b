"""Per-layer latency of DARE-KV, DARE-O, FFN reuse and DARE-O + FFN reuse against the plain layer, at
fixed fractions of reused rows.

    python benchmarks/layer_latency.py --prompt-len 256 --gen-length 256 --layer 3 --repeats 7 --iters 20

One layer of the benchmark model runs on the store path (`DiffusionTransformer._layer_rows`, what
every decoding forward with a store runs) over the fed rows, batch 1:
- `plain`: no reuse object (every row computes Q, K/V, attention, FFN);
- `dare_kv` / `dare_o` / `ffn_reuse` / `dare_o + ffn_reuse` at reuse r: the plugins' own LayerReuse objects (drift decision, store
  bookkeeping included) with a threshold no drift reaches, and the token of a random (1 - r) of the
  rows marked as changed before each call (outside the timer), so exactly those rows recompute K/V
  (resp. their attention row, their FFN, both) and the others are reused;
- `layer.forward`: the same layer without the store, for reference.
Conditions are timed round-robin (interleaved) so drifting machine load hits all alike; the table
gives the median and the minimum per-call time over repeats and their ratios to `plain` (on a
shared machine the minimum is the least disturbed sample).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import bench_model, conditions

from dare_pipeline.config.recipe import GenerationConfig
from dare_pipeline.core.registry import available_plugins
from dare_pipeline.core.state import DecodeState
from dare_pipeline.reuse import ATTN_OUT, LayerCall, ReuseSet

FRACTIONS = (0.0, 0.5, 0.8, 0.9)


class Condition:
    """One timed configuration: a reuse set (or none) and the rows it must recompute at each call."""

    def __init__(self, model, state, layer, x, cos, sin, fed, plugins=(), fraction=0.0, seed=0):
        self.model, self.layer, self.x, self.cos, self.sin, self.fed = model, layer, x, cos, sin, fed
        self.store = state.store
        self.step = 0
        self.reuse = ReuseSet([])
        self.plugins, self.token_fields, self.recompute = list(plugins), [], None
        if self.plugins:
            for plugin in self.plugins:
                plugin.dare_generation_start(state)
            self.reuse = ReuseSet([plugin.dare_layer_reuse(state) for plugin in self.plugins])
            for name in self.reuse.fields:
                self.store.track(name)
            self.token_fields = [f"{plugin.name}.token" for plugin in self.plugins]
            n = fed.stop - fed.start
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            self.recompute = fed.start + order[: round((1 - fraction) * n)]
            self.call(refresh=True)  # fill the store: every row recomputed once

    def prepare(self):
        """Outside the timer: mark the rows to recompute as having a changed token."""
        if self.plugins and self.recompute.numel():
            for field in self.token_fields:  # every plugin sees the same rows' tokens change
                tokens = self.store.field(field, self.layer, 1, torch.long)
                tokens[:, self.recompute] = -1

    def call(self, refresh=False):
        module = self.model.layers[self.layer]
        tokens = torch.zeros(1, self.fed.stop - self.fed.start, dtype=torch.long)
        call = LayerCall(layer=self.layer, module=module, store=self.store, fed=self.fed, tokens=tokens,
                         refresh=refresh, step=self.step, key_mask=None, rope=(self.cos, self.sin),
                         cols=torch.arange(self.fed.start, self.fed.stop, device=self.x.device))
        self.step += 1
        return self.model._layer_rows(module, call, self.x, self.cos, self.sin, None, self.reuse, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--fed", type=int, default=None, help="fed rows (default: the whole canvas); fewer = the "
                                                          "answer's first rows, as a dual cache feeds a block")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20, help="calls per timing sample")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = bench_model(device=args.device)
    length = args.prompt_len + args.gen_length
    fed = slice(0, length) if args.fed is None else slice(args.prompt_len, args.prompt_len + args.fed)
    gen = GenerationConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length)
    prompt = torch.randint(0, 31990, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    plugins = available_plugins()

    def fresh_state():
        state = DecodeState.create(model, gen, [prompt], 0)
        state.require_store().track(ATTN_OUT)
        return state

    with torch.inference_mode():
        positions = torch.arange(length, device=model.device)[None]
        cos, sin = model._rope(positions[:, fed])
        x = model.embed(torch.randint(0, 31990, (1, fed.stop - fed.start), device=model.device))
        conds = {"plain": Condition(model, fresh_state(), args.layer, x, cos, sin, fed)}
        conds["plain"].call(refresh=True)
        for stack in (["dare_kv"], ["dare_o"], ["ffn_reuse"], ["dare_o", "ffn_reuse"]):
            for f in FRACTIONS:
                objects = [plugins[name](plugins[name].Options(threshold=1e9, exempt_layers=())) for name in stack]
                conds[f"{' + '.join(stack)} reuse {f:.0%}"] = Condition(model, fresh_state(), args.layer, x, cos,
                                                                        sin, fed, objects, f)
        layer = model.layers[args.layer]
        times = {name: [] for name in [*conds, "layer.forward (no store)"]}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, cond in conds.items():
                total = 0.0
                for _ in range(args.iters):
                    cond.prepare()
                    start = time.perf_counter()
                    cond.call()
                    if model.device.type == "cuda":
                        torch.cuda.synchronize()
                    total += time.perf_counter() - start
                times[name].append(total / args.iters)
            start = time.perf_counter()
            for _ in range(args.iters):
                layer(x, cos, sin, None)
            times["layer.forward (no store)"].append((time.perf_counter() - start) / args.iters)
    for name in times:
        times[name] = times[name][1:]

    plain = statistics.median(times["plain"])
    cond = conditions(model, args.threads, batch=1, canvas=length, fed_rows=fed.stop - fed.start, layer=args.layer,
                      repeats=args.repeats, calls_per_sample=args.iters)
    print(f"Conditions: {cond}; "
          f"model d_model 512, 8 heads, ffn 1376; reused rows chosen at random; decision and store "
          f"bookkeeping inside the timing\n")
    best = min(times["plain"])
    print("| condition | median ms / layer call | ratio to plain (median) | min ms | ratio to plain (min) |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        med, low = statistics.median(samples), min(samples)
        print(f"| {name} | {med * 1e3:.3f} | {med / plain:.3f} | {low * 1e3:.3f} | {low / best:.3f} |")


if __name__ == "__main__":
    main()
