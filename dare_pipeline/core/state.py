"""DecodeState: the canvas and everything hooks may read about one generation in progress.

Layout: prompts are left-padded to a common prompt end P, so the answer region [P, L) and every
block are the same columns for all rows of a batch; RoPE positions come from the padding mask,
so each row sees exactly the positions it would see decoded alone.
"""

from __future__ import annotations

import hashlib

import attrs
import torch

from .plan import ForwardPlan
from .stats import GenerationStats
from .store import ActivationStore


@attrs.define(eq=False)
class DecodeState:
    model: torch.nn.Module
    gen: object  # recipe.GenerationConfig
    x: torch.Tensor  # (B, L) canvas: padding, prompt, answer
    attention_mask: torch.Tensor  # (B, L) bool, False on left padding
    positions: torch.Tensor  # (B, L) RoPE positions
    prompt_end: int  # P: first answer column
    mask_id: int
    generators: list[torch.Generator]  # one per prompt, see prompt_generators
    stats: GenerationStats
    prompt_lengths: list[int]
    # classifier-free guidance doubles the model batch: rows B.. are the prompt-masked copies
    cfg_scale: float = 0.0
    store: ActivationStore | None = None
    block: int = -1
    step: int = 0  # forwards so far in this generation
    step_in_block: int = 0
    plan: ForwardPlan | None = None
    unmask_step: torch.Tensor | None = None  # (B, G): 1-based forward after which each answer column was committed
    scratch: dict = attrs.Factory(dict)  # per-generation notes plugins may share with the loop
    # padding mask for attention keys, None when nothing is padded (the fast SDPA path); fixed for
    # the generation, so worked out once in `create` (it costs a host sync)
    key_mask: torch.Tensor | None = None
    executor: object = None  # execution.Executor: how the model's forwards run (None: eagerly)
    # per prompt: its current block still has masked columns (set by the loop before each step, on
    # the host; a prompt that is done only waits for the rest of its batch)
    unfinished: list[bool] = attrs.Factory(list)
    # the model's stop tokens on the device, copied there once (fill_after_stop reads them each step)
    stop_ids: torch.Tensor | None = None

    @classmethod
    def create(cls, model, gen, prompts: list[list[int]], seed: int | list[int], executor=None) -> DecodeState:
        cfg = model.config
        device = model.device
        batch = len(prompts)
        p_end = max(len(p) for p in prompts)
        length = p_end + gen.gen_length
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
        x = torch.full((batch, length), cfg.mask_token_id, dtype=torch.long, device=device)
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        for b, prompt in enumerate(prompts):
            start = p_end - len(prompt)
            x[b, :start] = pad
            attention_mask[b, :start] = False
            x[b, start:p_end] = torch.tensor(prompt, dtype=torch.long, device=device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        stats = GenerationStats(batch=batch, n_layers=cfg.n_layers)
        state = cls(model=model, gen=gen, x=x, attention_mask=attention_mask, positions=positions, prompt_end=p_end,
                    mask_id=cfg.mask_token_id, generators=prompt_generators(seed, prompts, device), stats=stats,
                    prompt_lengths=[len(p) for p in prompts], cfg_scale=gen.cfg_scale, executor=executor)
        state.unmask_step = torch.zeros(batch, gen.gen_length, dtype=torch.long, device=device)
        state.key_mask = None if bool(attention_mask.all()) else state.model_rows(attention_mask)
        state.stop_ids = torch.tensor(cfg.stop_token_ids, dtype=torch.long, device=device)
        return state

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def family(self) -> str:
        return self.model.config.family

    @property
    def num_blocks(self) -> int:
        return self.gen.gen_length // self.gen.block_length

    @property
    def steps_per_block(self) -> int:
        return self.gen.steps // self.num_blocks

    def block_slice(self, block: int) -> slice:
        start = self.prompt_end + block * self.gen.block_length
        return slice(start, start + self.gen.block_length)

    @property
    def block_columns(self) -> slice:
        return self.block_slice(self.block)

    @property
    def answer_columns(self) -> slice:
        return slice(self.prompt_end, self.length)

    @property
    def masked(self) -> torch.Tensor:
        """(B, L) bool: columns still holding the mask token."""
        return self.x == self.mask_id

    def block_masked(self) -> torch.Tensor:
        """(B, b) bool: masked columns of the current block."""
        return self.masked[:, self.block_columns]

    # ---- model batch (classifier-free guidance doubles it) -------------------------------------
    @property
    def model_batch(self) -> int:
        return self.batch * (2 if self.cfg_scale > 0 else 1)

    def model_tokens(self, fed: slice) -> torch.Tensor:
        tokens = self.x[:, fed]
        if self.cfg_scale <= 0:
            return tokens
        uncond = self.x.clone()
        uncond[:, : self.prompt_end] = torch.where(self.attention_mask[:, : self.prompt_end], self.mask_id,
                                                   uncond[:, : self.prompt_end])
        return torch.cat([tokens, uncond[:, fed]])

    def model_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.cfg_scale <= 0 else torch.cat([t, t])

    @property
    def unfinished_model_rows(self) -> list[bool]:
        """`unfinished` per model batch row (on the host): an unconditional row decodes with its prompt."""
        return self.unfinished * (self.model_batch // self.batch)

    def fill_after_stop(self) -> torch.Tensor:
        """End each answer at its first committed stop token: every masked answer column after it
        becomes EOS, committed by the forward that just ran (call it from `dare_step_end`; its
        `unmask_step` is that forward's and the step's commit counts include it). Later blocks left
        without a masked column take no forward. Returns the (B,) device tensor of columns filled.

        Only columns after the row's first committed stop change: the answer is cut there anyway,
        so what is lost is never answer text, only forwards over the tail (guided diffusion's
        early stop; any policy may call it). A fill can end a block early: a policy that calls it
        must not promise more forwards from `dare_block_min_forwards` than its fills leave."""
        answer = self.x[:, self.prompt_end:]
        index = torch.arange(answer.shape[1], device=answer.device)
        first_stop = torch.where(torch.isin(answer, self.stop_ids), index, answer.shape[1]).amin(-1, keepdim=True)
        fill = (answer == self.mask_id) & (index > first_stop)
        self.x[:, self.prompt_end:] = torch.where(fill, self.model.config.eos_token_id, answer)
        self.unmask_step.copy_(torch.where(fill, self.step, self.unmask_step))
        filled = fill.sum(-1)
        self.stats.record_extra_commits(filled)
        return filled

    def require_store(self) -> ActivationStore:
        """The activation store of this generation, created on first request."""
        if self.store is None:
            self.store = (self.model.new_store(self.model_batch, self.length) if self.executor is None
                          else self.executor.new_store(self.model, self.model_batch, self.length))
        return self.store


def prompt_generators(seed: int | list[int], prompts: list[list[int]], device) -> list[torch.Generator]:
    """A generator per prompt, seeded from the seed (one for all, or one per prompt) and the prompt's
    tokens, so that sampling is reproducible and a prompt decodes the same alone or in any batch."""
    seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
    gens = []
    for seed, prompt in zip(seeds, prompts, strict=True):
        digest = hashlib.sha256(f"{seed}:{','.join(map(str, prompt))}".encode()).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        gens.append(g)
    return gens
