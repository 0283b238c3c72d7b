"""The causal-LM objective of the embedded guide: next-token cross-entropy on answer tokens only.

A training row is the diffusion model's layout (`batches.make_batch`): `[PAD ...] prompt answer EOS
... EOS`, prompts left-padded with attention mask 0 on the padding. The guide reads it teacher-forced,
left to right; RoPE positions start at the first real token (`position_ids`), so a row sees the
positions it would see decoded alone, as in the decoding loop.

Which targets carry the loss (`loss_mask`):
- the answer region: the answer and its EOS tail up to the canvas. Guided decoding asks the guide
  about every drafted column of a block, the EOS tail included, so EOS after EOS is learnt too;
- with `shot_answers`, also the answers of the prompt's few-shot examples (`shot_answer_mask`):
  each is the answer of another train problem of the same family, after its own `Q: ...\\nA: `.
  They are answer tokens like the last one, with fewer examples before them, and carry ~6x the
  answer tokens a few-shot row has otherwise. The blank line after a shot's answer is not a
  target, so an answer is only ever followed by EOS.
Questions, `Q: `/`A: ` markers, separators and padding are never targets. The loss is the mean
cross-entropy over the batch's targets (every answer token weighs the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.tokenizer import VOCAB

_ANSWER_MARKER = [VOCAB[c] for c in "A: "]
_NEWLINE = VOCAB["\n"]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions counted from each row's first real token (0 on the left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def shot_answer_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answer_mask: torch.Tensor) -> torch.Tensor:
    """Bool (B, L): the tokens of the few-shot answers inside each row's prompt.

    A shot answer starts after an `A: ` at the start of a line (the chat template's assistant
    marker) and ends before the next blank line (`\\n\\n`, which never occurs inside a question or an
    answer of the suite). The prompt's last `A: ` opens the answer region, which is not the prompt's."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    prompt = attention_mask.bool() & ~answer_mask.bool()
    for row in range(input_ids.shape[0]):
        cols = prompt[row].nonzero().flatten().tolist()
        if not cols:
            continue
        start, end = cols[0], cols[-1] + 1
        ids = input_ids[row, start:end].tolist()
        i = 0
        while i + len(_ANSWER_MARKER) <= len(ids):
            line_start = i == 0 or ids[i - 1] == _NEWLINE
            if not (line_start and ids[i:i + len(_ANSWER_MARKER)] == _ANSWER_MARKER):
                i += 1
                continue
            first = i + len(_ANSWER_MARKER)
            last = first
            while last < len(ids) and not (ids[last] == _NEWLINE and last + 1 < len(ids) and ids[last + 1] == _NEWLINE):
                last += 1
            if last < len(ids):  # an answer closed by a blank line; the final `A: ` has none
                mask[row, start + first:start + last] = True
            i = max(last, i + 1)
    return mask


def loss_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor,
              shot_answers: bool = True) -> torch.Tensor:
    """Bool (B, L): the targets the loss covers (module docstring)."""
    mask = answer_mask.bool() & attention_mask.bool()
    if shot_answers:
        mask = mask | shot_answer_mask(input_ids, attention_mask, answer_mask)
    return mask


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy of a transformers causal LM over the `targets` columns (bool
    (B, L)); column j is predicted from the logits of column j-1. Returns (loss, number of targets)."""
    if bool(targets[:, 0].any()):
        raise ValueError("column 0 has no preceding column to predict it from")
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=position_ids(attention_mask)).logits
    scored = targets[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                         reduction="none").view_as(scored)
    n = int(scored.sum())
    # where, not a product: a value the mask drops never reaches the sum, even a non-finite one
    return torch.where(scored, ce, torch.zeros_like(ce)).sum() / max(1, n), n
