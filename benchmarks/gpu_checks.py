"""Is the compiled execution right on a GPU? Tokens, host syncs and threads of every exact recipe, in one command.

    PYTHONPATH=. python benchmarks/gpu_checks.py --out $OUT/gpu_checks                  # ~1-2 minutes on a GPU
    python benchmarks/gpu_checks.py --device cpu --mode eager --shape tiny --out /tmp/c   # CPU smoke run

For each family (LLaDA, Dream) and each recipe whose decisions are deterministic (the caches, the
reuse plugins at threshold 0, threshold decoding, the stack that pays with its shipped options), on a
random-weight model (`common.bench_model`, `--shape`), the same random prompts are decoded:

1. eagerly, the reference;
2. in `--mode` (default cuda_graphs) on the main thread: the first decode compiles and captures;
3. again, under `torch.cuda.set_sync_debug_mode("warn")`: every host synchronisation it makes is
   caught as a warning and counted by the source line that made it (CUDA only);
4. from a `Pipeline.stream` (its own thread, as every stream runs) and from a thread pool (as the
   server's worker runs): CUDA graph trees belong to a thread, so a thread may compile or capture anew
   (its compiles, and its wall time against the warm repeat's, say so).

A row is OK when every decode has the eager decode's tokens and commit order (`sequences` and
`unmask_step`), ran in the mode asked for with no eager forward, and did not compile again on the
warmed pipeline (a recompile there would be paid every generation). Anything else is a finding:
the row says which check failed. Float32 by default: in bf16 a fused kernel's rounding may flip an
argmax the random weights leave nearly tied, which is no bug.

Rows go to DIR/results.jsonl as each finishes (flushed and fsynced) and DIR/results.md (rewritten),
so a kill keeps what was checked. A row that raises is recorded with its traceback and the rest go
on; `--row-timeout-s` and `--budget-s` bound a row and the run as in gpu_suite.py.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import SHAPES, bench_model, bench_prompts
from gpu_suite import Interrupted, _Alarm, _is_cuda, clock, execution_stats, prompt_vocab, save_record

from dare_pipeline import Pipeline

THRESHOLD = {"name": "threshold_decoding", "threshold": 0.9}
RECIPES: dict[str, list[dict]] = {
    "baseline": [],
    "prefix_cache": [{"name": "prefix_cache"}],
    "dual_cache": [{"name": "dual_cache"}],
    "dare_kv@0": [{"name": "dare_kv", "threshold": 0.0}],
    "dare_o@0": [{"name": "dare_o", "threshold": 0.0, "exempt_layers": [0]}],
    "ffn_reuse@0": [{"name": "ffn_reuse", "threshold": 0.0}],
    "dllm_cache": [{"name": "dllm_cache"}],
    "threshold": [THRESHOLD],
    "dual_cache+threshold": [{"name": "dual_cache"}, THRESHOLD],
    # the stack that pays (docs/benchmarks.md), with its options there
    "dual_cache+threshold+dare_o+ffn_reuse": [{"name": "dual_cache"}, THRESHOLD,
                                              {"name": "dare_o", "threshold": 0.1, "exempt_layers": []},
                                              {"name": "ffn_reuse"}],
}
CHECKS = ("eager", "repeat", "stream", "thread")


def same_decode(a, b) -> bool:
    """The same tokens at every canvas position, committed at the same steps."""
    return a.sequences == b.sequences and a.unmask_step == b.unmask_step


def differing_tokens(a, b) -> int:
    return sum(x != y for p, q in zip(a.sequences, b.sequences) for x, y in zip(p, q))


@contextlib.contextmanager
def syncs_recorded(device):
    """The host synchronisations of the block, as warnings (`set_sync_debug_mode("warn")`); an empty
    list off CUDA, where there is no device to wait for."""
    found: list = []
    if not _is_cuda(device):
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(w for w in caught if "synchroniz" in str(w.message))


def sync_summary(found: list) -> dict:
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in found)
    return {"count": len(found), "sites": dict(sites.most_common(8)),
            "message": str(found[0].message).splitlines()[0] if found else None}


class Checks:
    """The models of the families (kept: rows alternate between them), the output files and the clock."""

    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / "results.jsonl"
        self.jsonl.write_text("")
        self.records: list[dict] = []
        self._models: dict[str, torch.nn.Module] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def model(self, family: str):
        if family not in self._models:
            self._models[family] = bench_model(family, dtype=getattr(torch, self.args.dtype), device=self.args.device,
                                               seed=0, shape=self.args.shape)
        return self._models[family]

    def forget(self) -> None:
        """After a row cut short (maybe inside a compile): new models and graphs for the next rows."""
        self._models.clear()
        torch._dynamo.reset()

    def write(self, record: dict) -> None:
        self.records.append(record)
        save_record(self.out, record, markdown(self.records, self.args))


def check_recipe(checks: Checks, family: str, recipe: str) -> dict:
    """Decode the recipe eagerly, then in the mode asked for: warm, under the sync debug mode, from a
    stream and from a thread pool; what each gave."""
    args = checks.args
    model = checks.model(family)
    prompts = bench_prompts(args.batch, args.prompt_len, seed=0, vocab=prompt_vocab(model.config))
    doc = {"name": recipe, "plugins": [dict(p) for p in RECIPES[recipe]],
           "generation": {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps}}
    reference = Pipeline(model, {**doc, "execution": {"mode": "eager"}}).generate(prompts)
    pipe = Pipeline(model, {**doc, "execution": {"mode": args.mode}})
    walls = {}

    def timed(name, decode):
        start = clock(args.device)
        out = decode()
        walls[name] = clock(args.device) - start
        return out

    def streamed():
        stream = pipe.stream(prompts)
        for _ in stream:
            pass
        return stream.output

    first = timed("eager", lambda: pipe.generate(prompts))  # "eager": the decode compared with eager's
    with syncs_recorded(args.device) as found:
        repeat = timed("repeat", lambda: pipe.generate(prompts))
    stream_out = timed("stream", streamed)
    with ThreadPoolExecutor(1) as pool:
        threaded = timed("thread", lambda: pool.submit(pipe.generate, prompts).result())
    decodes = {"eager": first, "repeat": repeat, "stream": stream_out, "thread": threaded}
    against = {"eager": reference, "repeat": first, "stream": first, "thread": first}
    res = {"equal": {k: same_decode(against[k], out) for k, out in decodes.items()},
           "differing_tokens": {k: differing_tokens(against[k], out) for k, out in decodes.items()},
           "nfe": first.stats.nfe, "syncs": sync_summary(found)}
    for name, out in decodes.items():
        ex = execution_stats(out)
        res[name] = {"wall_s": round(walls[name], 4), "mode": ex.get("mode"), "compiles": ex.get("compiles"),
                     "compile_time_s": ex.get("compile_time_s"), "eager_forwards": ex.get("eager_forwards"),
                     "eager_reason": ex.get("eager_reason")}
    res["findings"] = findings(res, args.mode)
    return res


def findings(res: dict, mode: str) -> list[str]:
    """What is wrong with a checked row (empty: OK)."""
    out = [f"{k}: {res['differing_tokens'][k]} tokens (or commit steps) differ"
           for k in CHECKS if not res["equal"][k]]
    for k in CHECKS:
        ran = res[k]
        if mode != "auto" and ran["mode"] not in (None, mode):
            out.append(f"{k}: ran as {ran['mode']}, not {mode}")
        if ran["eager_forwards"]:
            out.append(f"{k}: {ran['eager_forwards']} eager forwards ({ran['eager_reason']})")
    if res["repeat"]["compiles"]:
        out.append(f"repeat: compiled {res['repeat']['compiles']} time(s) again on a warmed pipeline")
    return out


def run(checks: Checks, rows: list[tuple[str, str]]) -> None:
    args = checks.args
    for family, recipe in rows:
        record = {"type": "row", "family": family, "recipe": recipe, "mode": args.mode}
        left = args.budget_s - checks.elapsed()
        started = time.perf_counter()
        if left <= 0:
            record["status"] = "skipped (budget)"
        else:
            limit, reason = (left, "budget") if left <= args.row_timeout_s else (args.row_timeout_s, "timeout")
            try:
                with _Alarm(limit, reason):
                    record.update(check_recipe(checks, family, recipe))
                record["status"] = "ok"
            except Interrupted as stop:
                record["status"] = f"{'skipped (budget)' if stop.reason == 'budget' else 'error: timeout'} after " \
                                   f"{time.perf_counter() - started:.0f} s"
                checks.forget()
            except Exception as exc:  # noqa: BLE001 - one recipe's failure is a finding, not the end
                record["status"] = f"error: {type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc()
        record["row_s"], record["elapsed_s"] = time.perf_counter() - started, checks.elapsed()
        checks.write(record)
        verdict = record["status"] if record["status"] != "ok" else ("; ".join(record["findings"]) or "OK")
        print(f"[{checks.elapsed():6.1f}s] {family} {recipe}: {verdict[:300]}", flush=True)


def markdown(records: list[dict], args) -> str:
    lines = [f"# GPU checks: {args.mode} against eager", "",
             f"{conditions_line(args)}", "",
             "| family | recipe | verdict | = eager | repeat | stream | thread | compiles (first / repeat / "
             "stream / thread) | wall s (first / repeat / stream / thread) | host syncs of a warm decode (top lines) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in records if r.get("type") == "row"):
        if r["status"] != "ok":
            lines.append(f"| {r['family']} | {r['recipe']} | {r['status'].splitlines()[0][:120]} | | | | | | | |")
            continue
        eq = ["yes" if r["equal"][k] else f"**no** ({r['differing_tokens'][k]})" for k in CHECKS]
        compiles = " / ".join(str(r[k]["compiles"]) for k in CHECKS)
        walls = " / ".join(f"{r[k]['wall_s']:.2f}" for k in CHECKS)
        syncs = r["syncs"]
        sites = ", ".join(f"{site} x{n}" for site, n in syncs["sites"].items()) or "-"
        verdict = "OK" if not r["findings"] else "**" + "; ".join(r["findings"]) + "**"
        lines.append(f"| {r['family']} | {r['recipe']} | {verdict} | {' | '.join(eq)} | {compiles} | {walls} | "
                     f"{syncs['count']}: {sites} |")
    return "\n".join(lines) + "\n"


def conditions_line(args) -> str:
    device = torch.cuda.get_device_name() if _is_cuda(args.device) else "CPU"
    return (f"{device}; torch {torch.__version__}, CUDA {torch.version.cuda}; shape {args.shape}, {args.dtype}, "
            f"batch {args.batch}, prompt {args.prompt_len}, gen_length {args.gen_length}, block {args.block_length}, "
            f"steps {args.steps}; random weights and prompts (seed 0)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_checks_out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", default="cuda_graphs", choices=["auto", "eager", "compiled", "cuda_graphs"])
    ap.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--families", nargs="+", default=["llada", "dream"], choices=["llada", "dream"])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="default gen_length")
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--row-timeout-s", type=float, default=90.0)
    args = ap.parse_args(argv)
    args.steps = args.steps or args.gen_length
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if _is_cuda(args.device) and not torch.cuda.is_available():
        print("--device cuda but torch sees no CUDA device (use --device cpu --shape tiny for a smoke run)",
              file=sys.stderr)
        return 2
    if not _is_cuda(args.device):
        torch.set_num_threads(1)
    checks = Checks(args)
    # recipe by recipe, both families each: a budget cut leaves the last recipes, not a whole family
    rows = [(family, recipe) for recipe in args.recipes for family in args.families]
    print(conditions_line(args), flush=True)
    try:
        run(checks, rows)
    finally:
        print(markdown(checks.records, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
