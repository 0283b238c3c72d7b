"""Shared benchmark pieces: the random-weight benchmark model, timing, and the conditions line.

The benchmark model is LLaDA-architecture at a size where matrix work dominates on a CPU
(d_model 512, 8 layers, vocab 32000); random weights, so only speed is meaningful.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from dare_pipeline import Pipeline
from dare_pipeline.models.config import ModelConfig
from dare_pipeline.models.transformer import DiffusionTransformer

BENCH_CONFIG = {
    "d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "ffn_hidden": 1376, "vocab_size": 32000,
    "embedding_size": 32000, "rope_theta": 500000.0, "max_sequence_length": 4096, "mask_token_id": 31999,
    "eos_token_id": 31998, "pad_token_id": 31998,
}


# LLaDA-8B-Instruct's published shape (config.json of GSAI-ML/LLaDA-8B-Instruct), for GPU runs
LLADA_8B_CONFIG = {
    "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "ffn_hidden": 12288, "vocab_size": 126464,
    "embedding_size": 126464, "rope_theta": 500000.0, "max_sequence_length": 4096, "mask_token_id": 126336,
    "eos_token_id": 126081, "pad_token_id": 126081,
}
SHAPES = {"bench": BENCH_CONFIG, "llada-8b": LLADA_8B_CONFIG}

# Dream-v0-Instruct-7B's published shape (Qwen2 layout, GQA 28/4 heads; family "dream" adds the QKV
# bias and the one-position logit shift in bench_model), for GPU runs
DREAM_7B_CONFIG = {
    "d_model": 3584, "n_layers": 28, "n_heads": 28, "n_kv_heads": 4, "ffn_hidden": 18944, "vocab_size": 152064,
    "embedding_size": 152064, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_sequence_length": 4096,
    "mask_token_id": 151666, "eos_token_id": 151643, "pad_token_id": 151643,
}
# a ~0.2M-parameter model for CPU smoke runs of the GPU scripts (every code path, no meaningful speed)
TINY_CONFIG = {
    "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 128, "vocab_size": 512,
    "embedding_size": 512, "rope_theta": 10000.0, "max_sequence_length": 4096, "mask_token_id": 511,
    "eos_token_id": 510, "pad_token_id": 510,
}
SHAPES.update({"dream-7b": DREAM_7B_CONFIG, "tiny": TINY_CONFIG})


def bench_model(family: str = "llada", dtype=torch.float32, device="cpu", seed: int = 0,
                shape: str = "bench") -> DiffusionTransformer:
    cfg = ModelConfig(family=family, logits_shift=family == "dream", qkv_bias=family == "dream", **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiffusionTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
        model.lm_head.weight[cfg.mask_token_id] = 0
    model = model.to(dtype).eval().requires_grad_(False)
    model.tokenizer, model.source = None, "<benchmark model>"
    return model


def bench_prompts(batch: int, prompt_len: int, seed: int = 0, vocab: int = 31990) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()


def cuda_clock() -> float:
    """Wall seconds after the GPU has finished the queued work."""
    torch.cuda.synchronize()
    return time.perf_counter()


def time_generate(pipe: Pipeline, prompts, repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` generations (after one warm-up)."""
    pipe.generate(prompts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.generate(prompts)
        times.append(time.perf_counter() - start)
    return times


def interleaved(pipes: dict[str, Pipeline], prompts, repeats: int, clock=time.perf_counter,
                warmup: bool = True, outputs: dict | None = None) -> dict[str, list[float]]:
    """Time several pipelines round-robin so drifting machine load hits all of them alike.

    `clock=time.process_time` measures this process's CPU seconds, which another busy process on
    the machine disturbs far less than wall time (with one torch thread they are the same work).
    `outputs`, when given, receives each pipeline's last GenerationOutput (for NFE and stats)."""
    if warmup:
        for pipe in pipes.values():
            pipe.generate(prompts)
    times = {name: [] for name in pipes}
    for _ in range(repeats):
        for name, pipe in pipes.items():
            start = clock()
            out = pipe.generate(prompts)
            times[name].append(clock() - start)
            if outputs is not None:
                outputs[name] = out
    return times


def median(xs):
    return statistics.median(xs)


def conditions(model, threads: int, **extra) -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({cpu}), {threads} torch thread(s)"
    parts = [f"hardware: {dev}", f"dtype: {str(model.dtype).removeprefix('torch.')}", f"torch {torch.__version__}"]
    parts += [f"{k}: {v}" for k, v in extra.items()]
    return "; ".join(parts)
