"""Guides for the guided-diffusion tests: real tiny transformers models built from a config and saved
with the embedded tokenizer (no download), and a test double with no model at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from dare_pipeline.models.default import EMBEDDED
from dare_pipeline.training.guide import TOKENIZER_FILES
from dare_pipeline_plugins.guided_diffusion import Guide


def save_guide(directory: Path, arch: str = "llama", vocab_size: int = 101, tokenizer: bool = True,
               uniform: bool = False, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM / Qwen2ForCausalLM saved in `directory` with the embedded
    model's tokenizer files. `uniform`: its final norm is zero, so every logit is 0 (every token
    ties: under `argmax` it agrees with any draft, under `min_prob` above 1/V with none)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config)
    if uniform:
        with torch.no_grad():
            model.model.norm.weight.zero_()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(EMBEDDED["default"] / name, directory / name)
    return directory


def edit_vocab(directory: Path, edit) -> None:
    """Rewrite the guide's tokenizer.json: `edit(vocab)` changes the token -> id mapping in place
    (added tokens follow it; a removed one is dropped)."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    edit(vocab)
    data["added_tokens"] = [dict(t, id=vocab[t["content"]]) for t in data["added_tokens"] if t["content"] in vocab]
    path.write_text(json.dumps(data))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # drop special tokens no longer there
        cfg = json.loads((directory / name).read_text())
        for key in list(cfg):
            if isinstance(cfg[key], str) and cfg[key].startswith("<|") and cfg[key] not in vocab:
                del cfg[key]
        (directory / name).write_text(json.dumps(cfg))


class FakeCache:
    """Stands in for DynamicCache: only its length."""

    def __init__(self):
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, n: int) -> None:
        assert n < 0, "the plugin drops a positive count of tokens"
        self.length += n


class FakeGuide(Guide):
    """A guide without a model: `agree` gives every token the same logit (every draft ties with the
    top: agreement under `argmax`), `never` puts all weight on `token`, an id never drafted."""

    def __init__(self, mode: str, vocab_size: int, token: int):
        self.mode, self.vocab, self.token = mode, vocab_size, token
        self.source = f"<fake guide: {mode}>"
        self.d = self.layers = self.q_dim = self.kv_dim = self.ffn = 1
        self.calls = []

    def new_cache(self):
        return FakeCache()

    def forward(self, tokens, attention_mask, positions, cache, keep):
        assert attention_mask.shape[1] == cache.length + tokens.shape[1]
        self.calls.append((cache.length, tokens.shape[1], keep))
        cache.length += tokens.shape[1]
        logits = torch.zeros(tokens.shape[0], keep, self.vocab)
        if self.mode == "never":
            logits[..., self.token] = 10.0
        return logits
