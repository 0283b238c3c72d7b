"""The masked-diffusion training objective (LLaDA SFT style) and its Dream (shifted) twin.

A training sequence is `[PAD ...] prompt answer EOS ... EOS`: the answer region (answer plus its EOS
tail up to the canvas length) is the only part that is ever masked; the prompt stays clean. Per
sequence a noise level t ~ U(eps, 1) is drawn and every answer-region token is masked with
probability t. The loss is the cross-entropy on the masked positions weighted by 1/t and
normalised by the answer-region length of the sequence, then averaged over the batch (LLaDA's SFT
loss, an upper bound on the negative log-likelihood of the answer region).

Semi-autoregressive states (`block_prefix_prob` > 0): decoding with blocks shows the model states
that i.i.d. masking almost never produces: every block before the current one clean, every block
after it all masks. A model trained only on i.i.d. masks can fail there (the embedded model wrote
running sums past the last operand whenever its work crossed into the second block of 32). So a
fraction of the sequences is noised block-wise instead: for a block k drawn uniformly among the
answer region's blocks, the earlier blocks stay clean, block k is masked with probability t, the
later blocks are all masked, and the loss covers block k only (1/t-weighted, normalised by the
block's length): the same ELBO, for p(block k | prompt, blocks < k), as block diffusion trains.

LLaDA predicts token j from the output at row j. Dream's logits are shifted: the output at row j-1
predicts token j, so the loss for a masked column j reads logits[:, j-1].
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-3


@attrs.frozen
class NoisedBatch:
    noisy: torch.Tensor  # (B, L) input ids with the masked answer positions replaced by the mask id
    masked: torch.Tensor  # (B, L) bool, True where a token was masked
    t: torch.Tensor  # (B,) noise level per sequence
    scored: torch.Tensor  # (B, L) bool, masked positions the loss covers (= masked for i.i.d. rows)
    region_len: torch.Tensor  # (B,) length the row's loss is normalised by (answer region, or one block)


def sample_noise(input_ids: torch.Tensor, answer_mask: torch.Tensor, mask_id: int, generator: torch.Generator | None,
                 eps: float = DEFAULT_EPS, stratified: bool = False, block_prefix_prob: float = 0.0,
                 block_length: int = 32) -> NoisedBatch:
    """Mask each answer-region token with probability t ~ U(eps, 1) (one t per sequence).

    stratified: the batch's t values are u + i/B (mod 1) for one uniform u (each t is still
    U(eps, 1)-distributed, so the loss stays unbiased), which spreads the noise levels over the batch
    and lowers the variance of the 1/t-weighted loss (as MDLM's low-discrepancy sampler)."""
    b, n = input_ids.shape
    u = torch.rand(1 if stratified else b, generator=generator, device=input_ids.device)
    if stratified:
        u = (u + torch.arange(b, device=input_ids.device) / b) % 1.0
    t = eps + (1.0 - eps) * u
    draw = torch.rand(b, n, generator=generator, device=input_ids.device)
    answer = answer_mask.bool()
    masked = (draw < t[:, None]) & answer
    scored, region_len = masked, answer.sum(1)
    if block_prefix_prob > 0:  # extra draws only then, so i.i.d.-only runs keep their random stream
        masked, scored, region_len = _block_states(answer, masked, region_len, block_prefix_prob, block_length,
                                                   generator)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return NoisedBatch(noisy=noisy, masked=masked, t=t, scored=scored, region_len=region_len)


def _block_states(answer, iid_masked, answer_len, prob: float, block_length: int, generator):
    """Turn a `prob` fraction of the rows into semi-autoregressive states (module docstring)."""
    b, device = answer.shape[0], answer.device
    pick = torch.rand(b, generator=generator, device=device) < prob
    n_blocks = (answer_len + block_length - 1) // block_length
    k = (torch.rand(b, generator=generator, device=device) * n_blocks).floor().long()
    block_of = torch.div(answer.long().cumsum(1) - 1, block_length, rounding_mode="floor")  # valid on the answer
    current = answer & (block_of == k[:, None])
    later = answer & (block_of > k[:, None])
    rows = pick[:, None]
    masked = torch.where(rows, (iid_masked & current) | later, iid_masked)
    scored = torch.where(rows, iid_masked & current, iid_masked)
    current_len = torch.clamp(answer_len - k * block_length, max=block_length)
    return masked, scored, torch.where(pick, current_len, answer_len)


WEIGHTINGS = ("inv_t", "none")


def weighted_masked_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                         answer_len: torch.Tensor, shift: bool = False, weighting: str = "inv_t") -> torch.Tensor:
    """weighting "inv_t" (LLaDA SFT): sum_j masked_j * CE(row for j, target_j) / t, divided by the
    answer length, batch mean. weighting "none": the plain mean CE over all masked tokens of the batch
    (MaskGIT style; no 1/t factor, so low-noise sequences do not dominate the gradient).

    shift=False: the row for column j is j (LLaDA). shift=True: it is j-1 (Dream); column 0 can then
    not be scored and must not be masked (it never is: the prompt comes first).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS}")
    if shift:
        if bool(masked[:, 0].any()):
            raise ValueError("shifted objective: column 0 has no preceding row to predict it from")
        logits, targets, masked = logits[:, :-1], targets[:, 1:], masked[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view(targets.shape) * masked
    if weighting == "none":
        return ce.sum() / masked.sum().clamp(min=1)
    per_seq = ce.sum(1) / t / answer_len.clamp(min=1).to(ce.dtype)
    return per_seq.mean()


def diffusion_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, answer_mask: torch.Tensor,
                   generator: torch.Generator | None, eps: float = DEFAULT_EPS,
                   stratified: bool = False, weighting: str = "inv_t", block_prefix_prob: float = 0.0,
                   block_length: int = 32) -> tuple[torch.Tensor, NoisedBatch]:
    """The model's masked-diffusion loss on one batch; the shift follows `model.config.logits_shift`."""
    cfg = model.config
    noised = sample_noise(input_ids, answer_mask, cfg.mask_token_id, generator, eps, stratified,
                          block_prefix_prob, block_length)
    logits = model(noised.noisy, attention_mask=attention_mask)
    loss = weighted_masked_loss(logits, input_ids, noised.scored, noised.t, noised.region_len,
                                shift=cfg.logits_shift, weighting=weighting)
    return loss, noised
