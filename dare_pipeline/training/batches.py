"""Training batches: (prompt, answer) pairs from the task suite turned into left-padded canvases.

A row is `[PAD ...] prompt answer EOS ... EOS`: prompts are left-padded to the batch's longest
prompt (attention_mask 0 on the padding, so RoPE positions start at the first real token, exactly
as the decoding loop lays out a batch), and the answer is padded with EOS up to the canvas length,
so the answer region is the same columns [P, P + canvas) for every row.

The curriculum is a list of phases (by fraction of the run); each phase draws a batch kind by
weight (its own pair stream: number of shots, prompt length, canvas lengths). A batch is filled
with pairs until the padded size would exceed a token budget, so short-context batches hold many
rows and long-canvas batches few. A kind may group its pairs by length (`group_by_length`): pairs of
similar answer length share a batch, whose canvas is then only as long as it needs to be. An optional
late family mix takes over from a fraction of the run
(its own pair streams, seeded apart), e.g. more of a slow family once the fast ones are learned.
Everything is seeded, and the sampler's state (random state,
pairs consumed per stream, the pending pair) is saved in checkpoints so a resumed run draws
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence

import attrs
import torch

from ..evaluation.suite import training_pairs
from ..models.tokenizer import EOS_ID, PAD_ID, VOCAB


def encode(text: str) -> list[int]:
    """Character-level ids, identical to the embedded tokenizer (characters outside the vocab are dropped)."""
    return [VOCAB[c] for c in text if c in VOCAB]


@attrs.frozen
class Batch:
    input_ids: torch.Tensor  # (B, P + canvas) clean tokens
    attention_mask: torch.Tensor  # (B, P + canvas) bool, False on left padding
    answer_mask: torch.Tensor  # (B, P + canvas) bool, True on the answer region (answer + EOS tail)
    canvas: int
    kind: str

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def make_batch(pairs: Sequence[tuple[str, str]], canvas: int, kind: str = "", pad_id: int = PAD_ID,
               eos_id: int = EOS_ID) -> Batch:
    prompts = [encode(p) for p, _ in pairs]
    answers = [encode(a) for _, a in pairs]
    for a in answers:
        if len(a) > canvas:
            raise ValueError(f"answer of {len(a)} tokens does not fit the canvas of {canvas}")
    p_len = max(len(p) for p in prompts)
    rows, attn = [], []
    for p, a in zip(prompts, answers):
        pad = p_len - len(p)
        rows.append([pad_id] * pad + p + a + [eos_id] * (canvas - len(a)))
        attn.append([False] * pad + [True] * (len(p) + canvas))
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(attn, dtype=torch.bool)
    answer_mask = torch.zeros_like(attention_mask)
    answer_mask[:, p_len:] = True
    return Batch(input_ids=input_ids, attention_mask=attention_mask, answer_mask=answer_mask, canvas=canvas, kind=kind)


@attrs.frozen
class BatchKind:
    name: str
    weight: float
    max_shots: int
    max_prompt_chars: int = 512
    canvases: tuple[int, ...] = (64,)
    canvas_weights: tuple[float, ...] | None = None
    min_shots: int = 0
    # 0: every batch has a canvas drawn from `canvases`. N > 0: N pairs at a time are sorted by answer
    # length and cut into batches; each batch's canvas is its longest answer plus one EOS, rounded up
    # to whole decode blocks (GROUPED_CANVAS_STEP) and at most max(canvases). LLaDA's SFT pads EOS to
    # the longest answer of the mini-batch; sorting first is what makes that padding short.
    group_by_length: int = attrs.field(default=0, validator=attrs.validators.ge(0))


@attrs.frozen
class Phase:
    until: float  # fraction of the total steps where this phase ends
    kinds: tuple[BatchKind, ...]


LONG_PHASE_ZERO_SHOT = 0.35
# grouped canvases are whole blocks of the decoding's block length (32), so every EOS tail length
# from 1 to 32 still occurs and a block state's blocks are whole
GROUPED_CANVAS_STEP = 32
# the long phase's other kinds share what zero-shot leaves in this proportion (0.4 : 0.25 by default)
_FEWSHOT_TO_LONG_CANVAS = 8 / 5


# the default curriculum: the algorithms on short contexts first (mostly zero-shot: the prompt costs
# compute but carries no loss), then held-out-like few-shot prompts (up to 512 characters) and long
# EOS tails so that generation lengths 64..1024 decode cleanly
def default_curriculum(short_phase: float = 0.35, long_phase_zero_shot: float = LONG_PHASE_ZERO_SHOT,
                       group_by_length: int = 0) -> tuple[Phase, ...]:
    """The shipped curriculum; `short_phase` is the fraction of the steps spent on short contexts,
    `long_phase_zero_shot` the share of zero-shot batches after it. A zero-shot batch carries ~6x the
    answer tokens of a few-shot one (the same token budget, ~30-character prompts instead of ~400),
    so raising the share trades held-out-like prompts and long canvases for more algorithm tokens.
    `group_by_length` (a pool size, 0 = off) groups the zero-shot batches by answer length (BatchKind);
    the other kinds keep canvas 64 and longer, where the long EOS tails are learnt."""
    if not 0.0 <= short_phase < 1.0:
        raise ValueError(f"short_phase must be in [0, 1), got {short_phase!r}")
    if not 0.0 <= long_phase_zero_shot < 1.0:
        raise ValueError(f"long_phase_zero_shot must be in [0, 1) (few-shot batches are needed), "
                         f"got {long_phase_zero_shot!r}")
    rest = 1.0 - long_phase_zero_shot
    fewshot = rest * _FEWSHOT_TO_LONG_CANVAS / (1 + _FEWSHOT_TO_LONG_CANVAS)
    return (
        Phase(short_phase, (BatchKind("zero_shot", 0.8, max_shots=0, group_by_length=group_by_length),
                            BatchKind("short", 0.2, max_shots=2))),
        Phase(1.0, (
            BatchKind("zero_shot", long_phase_zero_shot, max_shots=0, group_by_length=group_by_length),
            BatchKind("fewshot", fewshot, max_shots=8, max_prompt_chars=512, min_shots=3),
            BatchKind("long_canvas", rest - fewshot, max_shots=8, max_prompt_chars=512, min_shots=2,
                      canvases=(128, 256, 512, 1024), canvas_weights=(0.3, 0.3, 0.2, 0.2)),
        )),
    )


DEFAULT_CURRICULUM = default_curriculum()


def _stream_key(kind: BatchKind, late: bool = False) -> str:
    return f"{kind.name}/{kind.min_shots}/{kind.max_shots}/{kind.max_prompt_chars}" + ("/late" if late else "")


def _stream_seed(seed: int, kind: BatchKind, late: bool = False) -> int:
    key = f"{seed}/{_stream_key(kind, late)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


class _PairStream:
    """A training_pairs iterator that counts what it handed out, so it can be fast-forwarded."""

    def __init__(self, seed: int, kind: BatchKind, family_weights: Mapping[str, int] | None = None,
                 late: bool = False):
        self.seed = _stream_seed(seed, kind, late)
        self.kind, self.late = kind, late
        self._it: Iterator[tuple[str, str]] = training_pairs(self.seed, max_shots=kind.max_shots,
                                                             max_prompt_chars=kind.max_prompt_chars,
                                                             min_shots=kind.min_shots, family_weights=family_weights)
        self.consumed = 0
        self.pending: tuple[str, str] | None = None  # drawn but did not fit the previous batch

    def next(self) -> tuple[str, str]:
        if self.pending is not None:
            pair, self.pending = self.pending, None
            return pair
        self.consumed += 1
        return next(self._it)

    def skip_to(self, consumed: int) -> None:
        while self.consumed < consumed:
            next(self._it)
            self.consumed += 1


class BatchSampler:
    """Seeded curriculum sampler; `next_batch(step, total_steps)` draws the batch of that step.

    `late_family_weights`, when given, replace `family_weights` from `late_mix_start` (a fraction
    of the steps) on."""

    def __init__(self, seed: int, curriculum: Sequence[Phase] = DEFAULT_CURRICULUM, token_budget: int = 3072,
                 min_rows: int = 1, max_rows: int = 64, family_weights: Mapping[str, int] | None = None,
                 late_family_weights: Mapping[str, int] | None = None, late_mix_start: float = 0.5):
        self.seed, self.curriculum = seed, tuple(curriculum)
        self.family_weights = dict(family_weights) if family_weights is not None else None
        self.late_family_weights = dict(late_family_weights) if late_family_weights is not None else None
        self.late_mix_start = late_mix_start
        self.token_budget, self.min_rows, self.max_rows = token_budget, min_rows, max_rows
        self.rng = random.Random(seed)
        self.streams: dict[str, _PairStream] = {}
        self.grouped: dict[str, list[list[tuple[str, str]]]] = {}  # per grouped stream: its pool's batches left

    def phase_index(self, step: int, total_steps: int) -> int:
        frac = step / max(1, total_steps)
        for i, phase in enumerate(self.curriculum):
            if frac < phase.until:
                return i
        return len(self.curriculum) - 1

    def is_late(self, step: int, total_steps: int) -> bool:
        return self.late_family_weights is not None and step >= self.late_mix_start * total_steps

    def _new_stream(self, kind: BatchKind, late: bool) -> _PairStream:
        return _PairStream(self.seed, kind, self.late_family_weights if late else self.family_weights, late=late)

    def _stream(self, kind: BatchKind, late: bool) -> _PairStream:
        key = _stream_key(kind, late)
        if key not in self.streams:
            self.streams[key] = self._new_stream(kind, late)
        return self.streams[key]

    def next_batch(self, step: int, total_steps: int) -> Batch:
        phase = self.curriculum[self.phase_index(step, total_steps)]
        kind = self.rng.choices(phase.kinds, weights=[k.weight for k in phase.kinds])[0]
        canvas = self.rng.choices(kind.canvases, weights=kind.canvas_weights)[0]  # drawn for every kind: one rng stream
        late = self.is_late(step, total_steps)
        stream = self._stream(kind, late)
        if kind.group_by_length:
            left = self.grouped.setdefault(_stream_key(kind, late), [])
            if not left:
                left.extend(self._grouped_batches(stream, kind))
            pairs = left.pop()
            return make_batch(pairs, _canvas_for(max(len(encode(a)) for _, a in pairs), kind), kind=kind.name)
        pairs, p_max = [], 0
        while len(pairs) < self.max_rows:
            pair = stream.next()
            p_len = len(encode(pair[0]))
            new_max = max(p_max, p_len)
            if len(pairs) >= self.min_rows and (len(pairs) + 1) * (new_max + canvas) > self.token_budget:
                stream.pending = pair
                break
            pairs.append(pair)
            p_max = new_max
        return make_batch(pairs, canvas, kind=kind.name)

    def _grouped_batches(self, stream: _PairStream, kind: BatchKind) -> list[list[tuple[str, str]]]:
        """The next `group_by_length` pairs of the stream, sorted by (answer, prompt) length and cut
        into batches under the token budget, in random order (so lengths do not rise step by step)."""
        pool = [stream.next() for _ in range(kind.group_by_length)]
        lengths = sorted(((len(encode(a)), len(encode(p)), i) for i, (p, a) in enumerate(pool)))
        batches, rows, p_max = [], [], 0
        for a_len, p_len, i in lengths:  # answers only grow along the sorted pool: the last one is the longest
            size = (len(rows) + 1) * (max(p_max, p_len) + _canvas_for(a_len, kind))
            if len(rows) >= self.min_rows and (len(rows) >= self.max_rows or size > self.token_budget):
                batches.append(rows)
                rows, p_max = [], 0
            rows.append(pool[i])
            p_max = max(p_max, p_len)
        batches.append(rows)
        self.rng.shuffle(batches)
        return batches

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.getstate(),
            "streams": {key: {"kind": attrs.asdict(s.kind), "late": s.late, "consumed": s.consumed, "pending": s.pending}
                        for key, s in self.streams.items()},
            "grouped": {key: [list(map(list, rows)) for rows in left] for key, left in self.grouped.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(_as_rng_state(state["rng"]))
        self.streams = {}
        for key, s in state["streams"].items():
            raw = dict(s["kind"])
            raw["canvases"] = tuple(raw["canvases"])
            if raw.get("canvas_weights") is not None:
                raw["canvas_weights"] = tuple(raw["canvas_weights"])
            stream = self._new_stream(BatchKind(**raw), s.get("late", False))
            stream.skip_to(s["consumed"])
            stream.pending = tuple(s["pending"]) if s["pending"] is not None else None
            self.streams[key] = stream
        # checkpoints from before grouping have no "grouped" entry
        self.grouped = {key: [[tuple(pair) for pair in rows] for rows in left]
                        for key, left in state.get("grouped", {}).items()}


def _canvas_for(longest_answer: int, kind: BatchKind) -> int:
    """A grouped batch's canvas: its longest answer plus one EOS, rounded up to whole blocks, capped by
    the kind's longest canvas."""
    return min(max(kind.canvases), -(-(longest_answer + 1) // GROUPED_CANVAS_STEP) * GROUPED_CANVAS_STEP)


def _as_rng_state(state):
    """random.Random state with its inner list turned back into a tuple (after a round trip)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
