"""The masked-diffusion training objective (LLaDA SFT style) and its Dream (shifted) twin.

A training sequence is `[PAD ...] prompt answer EOS ... EOS`: the answer region (answer plus its EOS
tail up to the canvas length) is the only part that is ever masked; the prompt stays clean. Per
sequence a noise level t ~ U(eps, 1) is drawn and every answer-region token is masked with
probability t. The loss is the cross-entropy on the masked positions weighted by 1/t and
normalised by the answer-region length of the sequence, then averaged over the batch (LLaDA's SFT
loss, an upper bound on the negative log-likelihood of the answer region).

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


def sample_noise(input_ids: torch.Tensor, answer_mask: torch.Tensor, mask_id: int, generator: torch.Generator | None,
                 eps: float = DEFAULT_EPS) -> NoisedBatch:
    """Mask each answer-region token with probability t ~ U(eps, 1) (one t per sequence)."""
    b, n = input_ids.shape
    t = eps + (1.0 - eps) * torch.rand(b, generator=generator, device=input_ids.device)
    draw = torch.rand(b, n, generator=generator, device=input_ids.device)
    masked = (draw < t[:, None]) & answer_mask.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return NoisedBatch(noisy=noisy, masked=masked, t=t)


def weighted_masked_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                         answer_len: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """sum_j masked_j * CE(logits row for j, target_j) / t, divided by the answer length, batch mean.

    shift=False: the row for column j is j (LLaDA). shift=True: it is j-1 (Dream); column 0 can then
    not be scored and must not be masked (it never is: the prompt comes first).
    """
    if shift:
        if bool(masked[:, 0].any()):
            raise ValueError("shifted objective: column 0 has no preceding row to predict it from")
        logits, targets, masked = logits[:, :-1], targets[:, 1:], masked[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view(targets.shape) * masked
    per_seq = ce.sum(1) / t / answer_len.clamp(min=1).to(ce.dtype)
    return per_seq.mean()


def diffusion_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, answer_mask: torch.Tensor,
                   generator: torch.Generator | None, eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, NoisedBatch]:
    """The model's masked-diffusion loss on one batch; the shift follows `model.config.logits_shift`."""
    cfg = model.config
    noised = sample_noise(input_ids, answer_mask, cfg.mask_token_id, generator, eps)
    logits = model(noised.noisy, attention_mask=attention_mask)
    loss = weighted_masked_loss(logits, input_ids, noised.masked, noised.t, answer_mask.sum(1),
                                shift=cfg.logits_shift)
    return loss, noised
