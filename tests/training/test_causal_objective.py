import pytest
import torch

from dare_pipeline.models.tokenizer import PAD_ID
from dare_pipeline.training import causal_lm_loss, encode, loss_mask, make_batch, shot_answer_mask
from dare_pipeline.training.causal_objective import position_ids

FEWSHOT = ("Q: add 1+2\nA: 1+2=3\n#### 3\n\nQ: sort b,a\nA: #### a,b\n\nQ: add 4+5\nA: ", "4+5=9\n#### 9")
ZERO_SHOT = ("Q: reverse abc\nA: ", "#### cba")


def _decode(ids):
    from dare_pipeline.models.tokenizer import VOCAB

    chars = {i: c for c, i in VOCAB.items()}
    return "".join(chars[i] for i in ids)


def _spans(row_ids, row_mask):
    """The runs of marked tokens of one row, decoded."""
    spans, current = [], []
    for token, marked in zip(row_ids.tolist(), row_mask.tolist()):
        if marked:
            current.append(token)
        elif current:
            spans.append(_decode(current))
            current = []
    if current:
        spans.append(_decode(current))
    return spans


def test_shot_answer_mask_marks_each_shot_answer_and_nothing_else():
    b = make_batch([FEWSHOT, ZERO_SHOT], canvas=16)
    mask = shot_answer_mask(b.input_ids, b.attention_mask, b.answer_mask)
    assert _spans(b.input_ids[0], mask[0]) == ["1+2=3\n#### 3", "#### a,b"]
    assert not mask[1].any()  # a zero-shot prompt has no shot answers
    assert not (mask & b.answer_mask).any() and not (mask & ~b.attention_mask).any()


def test_loss_mask_is_the_answer_region_plus_shot_answers():
    b = make_batch([FEWSHOT, ZERO_SHOT], canvas=16)
    with_shots = loss_mask(b.input_ids, b.attention_mask, b.answer_mask, shot_answers=True)
    without = loss_mask(b.input_ids, b.attention_mask, b.answer_mask, shot_answers=False)
    assert torch.equal(without, b.answer_mask)
    # the answer region: the answer and its EOS tail up to the canvas, never the prompt
    p_len = b.input_ids.shape[1] - 16
    assert without[:, p_len:].all() and not without[:, :p_len].any()
    answer_region = _decode(b.input_ids[0, p_len:].tolist())
    assert answer_region.startswith("4+5=9\n#### 9<|eos|>")
    assert _spans(b.input_ids[0], with_shots[0]) == ["1+2=3\n#### 3", "#### a,b", answer_region]
    assert torch.equal(with_shots[1], without[1])


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits do not depend on the input: the loss then depends on the targets alone."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, position_ids):
        assert input_ids.shape == self.logits.shape[:2]
        return type("Out", (), {"logits": self.logits})()


def test_loss_is_the_mean_next_token_ce_over_targets_only():
    torch.manual_seed(0)
    b = make_batch([FEWSHOT, ZERO_SHOT], canvas=16)
    logits = torch.randn(*b.input_ids.shape, 101)
    targets = loss_mask(b.input_ids, b.attention_mask, b.answer_mask)
    model = FixedLogits(logits)
    loss, n = causal_lm_loss(model, b.input_ids, b.attention_mask, targets)
    logp = torch.log_softmax(logits, -1)
    expected = [-logp[r, j - 1, b.input_ids[r, j]] for r, j in targets.nonzero().tolist()]
    assert n == len(expected) == int(targets.sum())
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)

    # a token that is not a target (question, marker, separator, padding) does not change the loss ...
    changed = b.input_ids.clone()
    not_target = (~targets).nonzero().tolist()
    for r, j in not_target:
        changed[r, j] = 7
    assert causal_lm_loss(model, changed, b.attention_mask, targets)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # ... every target token does
    for r, j in targets.nonzero().tolist()[::5]:
        moved = b.input_ids.clone()
        moved[r, j] = (moved[r, j] + 1) % 101
        assert causal_lm_loss(model, moved, b.attention_mask, targets)[0].item() != pytest.approx(loss.item(), rel=1e-6)


def test_column_zero_cannot_be_a_target():
    b = make_batch([ZERO_SHOT], canvas=8)
    targets = torch.zeros_like(b.attention_mask)
    targets[0, 0] = True
    with pytest.raises(ValueError, match="column 0"):
        causal_lm_loss(FixedLogits(torch.zeros(*b.input_ids.shape, 101)), b.input_ids, b.attention_mask, targets)


def test_left_padded_rows_score_as_they_would_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    pairs = [FEWSHOT, ZERO_SHOT]
    b = make_batch(pairs, canvas=16)
    assert b.input_ids[1, 0] == PAD_ID  # the zero-shot row is left-padded
    targets = loss_mask(b.input_ids, b.attention_mask, b.answer_mask)
    batched, n = causal_lm_loss(model, b.input_ids, b.attention_mask, targets)
    total = 0.0
    for pair in pairs:
        alone = make_batch([pair], canvas=16)
        t = loss_mask(alone.input_ids, alone.attention_mask, alone.answer_mask)
        loss, k = causal_lm_loss(model, alone.input_ids, alone.attention_mask, t)
        total += loss.item() * k
    assert batched.item() == pytest.approx(total / n, rel=1e-5)


def test_position_ids_start_at_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]

