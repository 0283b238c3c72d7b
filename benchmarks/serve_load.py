"""Load on `dare-pipeline serve`: a fixed number of completion requests from concurrent clients.

    python benchmarks/serve_load.py --requests 32 --concurrency 16 --max-batch 1 16 --max-tokens 32

For each --max-batch value a server is started on a free loopback port (embedded model, the
given recipe, --threads torch threads), warmed with one request, then `--requests` requests
(distinct prompts) are sent by `--concurrency` client threads. Prints a markdown table for
docs/benchmarks.md: requests/s, p50/p99 latency, mean batch size and tokens/s (from /metrics).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+)")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def prompts(count: int) -> list[str]:
    """Distinct reverse questions of the embedded model's task suite (8-12 letters)."""
    out = []
    for i in range(count):
        word = "".join(LETTERS[(i * 7 + j * 3 + j * j) % 26] for j in range(8 + i % 5))
        out.append(f"Q: reverse {word}\nA: ")
    return out


class Server:
    def __init__(self, recipe: str, threads: int, max_batch: int, window_ms: float):
        self.log = Path(tempfile.mkstemp(suffix=".log")[1])
        self._file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dare_pipeline.cli", "serve", "--recipe", recipe, "--port", "0", "--threads",
             str(threads), "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms)],
            cwd=ROOT, stdout=self._file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (found := READY.search(self.log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.url = found.group(1)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()
        self.log.unlink(missing_ok=True)


def run(args, max_batch: int) -> dict:
    server = Server(args.recipe, args.threads, max_batch, args.batch_window_ms)
    try:
        client = httpx.Client(base_url=server.url, timeout=600,
                              limits=httpx.Limits(max_connections=args.concurrency))
        body = {"max_tokens": args.max_tokens}
        client.post("/v1/completions", json={**body, "prompt": "Q: reverse warmup\nA: "}).raise_for_status()
        batches0, rows0 = server.metric("dare_batch_size_count"), server.metric("dare_batch_size_sum")
        tokens0, decode0 = server.metric("dare_generated_tokens_total"), server.metric("dare_decode_seconds_total")

        def one(prompt: str) -> float:
            started = time.perf_counter()
            reply = client.post("/v1/completions", json={**body, "prompt": prompt})
            reply.raise_for_status()
            return time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            latencies = sorted(pool.map(one, prompts(args.requests)))
        wall = time.perf_counter() - started
        batches = server.metric("dare_batch_size_count") - batches0
        rows = server.metric("dare_batch_size_sum") - rows0
        tokens = server.metric("dare_generated_tokens_total") - tokens0
        return {"max_batch": max_batch, "requests_per_s": args.requests / wall, "wall_s": wall,
                "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1,
                                                                             int(0.99 * len(latencies)))],
                "mean_batch": rows / batches if batches else 0.0, "tokens_per_s": tokens / wall,
                "decode_s": server.metric("dare_decode_seconds_total") - decode0}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/baseline.yaml")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    print(f"conditions: CPU {cpu}, {args.threads} torch thread(s) in the server, torch {torch.__version__}; "
          f"model: embedded default (float32); recipe: {args.recipe}; {args.requests} requests from "
          f"{args.concurrency} concurrent clients, max_tokens {args.max_tokens}; --batch-window-ms "
          f"{args.batch_window_ms}\n")
    print(f"({os.cpu_count()} CPU cores; load average = the machine's 1-minute load before / after the row)\n")
    print("| --max-batch | requests/s | p50 latency s | p99 latency s | mean batch | tokens/s | wall s | load average |")
    print("|---|---|---|---|---|---|---|---|")
    for max_batch in args.max_batch:
        load = os.getloadavg()[0]
        r = run(args, max_batch)
        print(f"| {r['max_batch']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
              f"{r['mean_batch']:.1f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} | "
              f"{load:.1f} / {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
