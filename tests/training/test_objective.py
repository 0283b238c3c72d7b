import itertools
import json
import math
from collections import Counter

import pytest
import torch

from dare_pipeline.models import DiffusionTransformer
from dare_pipeline.models.tokenizer import EOS_ID, MASK_ID, PAD_ID, build_tokenizer
from dare_pipeline.training import (
    BatchKind,
    BatchSampler,
    Phase,
    TrainConfig,
    Trainer,
    default_curriculum,
    diffusion_loss,
    encode,
    make_batch,
    sample_noise,
    weighted_masked_loss,
)
from dare_pipeline.training.optimizers import build_optimizer
from dare_pipeline.training.trainer import init_weights

PAIRS = [("Q: add 12+34\nA: ", "2+4=6,1+3=4\n#### 46"), ("Q: reverse abc\nA: ", "#### cba"),
         ("Q: sort 3,1\nA: ", "#### 1,3")]
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 64, "embedding_size": 101,
        "max_sequence_length": 1024, "token_budget": 400, "warmup_steps": 2, "lr": 3e-3, "log_every": 1,
        "checkpoint_every": 1000}
CURRICULUM = (Phase(0.5, (BatchKind("zero_shot", 1.0, max_shots=0),)),
              Phase(1.0, (BatchKind("fewshot", 0.5, max_shots=3, max_prompt_chars=200),
                          BatchKind("long_canvas", 0.5, max_shots=1, canvases=(128,)))))


def test_encode_matches_tokenizer():
    tok = build_tokenizer()
    for prompt, answer in PAIRS:
        assert encode(prompt + answer) == tok(prompt + answer, add_special_tokens=False)["input_ids"]


def test_batch_layout():
    b = make_batch(PAIRS, canvas=24)
    p_len = max(len(encode(p)) for p, _ in PAIRS)
    assert b.input_ids.shape == (3, p_len + 24)
    assert b.answer_mask[:, p_len:].all() and not b.answer_mask[:, :p_len].any()
    for row, (prompt, answer) in enumerate(PAIRS):
        pad = p_len - len(encode(prompt))
        assert b.input_ids[row, :pad].eq(PAD_ID).all() and not b.attention_mask[row, :pad].any()
        assert b.attention_mask[row, pad:].all()
        a = encode(answer)
        assert b.input_ids[row, p_len:p_len + len(a)].tolist() == a
        assert b.input_ids[row, p_len + len(a):].eq(EOS_ID).all()
    with pytest.raises(ValueError):
        make_batch(PAIRS, canvas=8)


def test_masking_never_touches_prompt():
    b = make_batch(PAIRS, canvas=32)
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(b.answer_mask)
    for _ in range(50):
        n = sample_noise(b.input_ids, b.answer_mask, MASK_ID, gen)
        assert not (n.masked & ~b.answer_mask).any()
        assert torch.equal(n.noisy[~n.masked], b.input_ids[~n.masked])
        assert n.noisy[n.masked].eq(MASK_ID).all()
        assert ((n.t >= 1e-3) & (n.t <= 1)).all()
        seen |= n.masked
    assert seen[b.answer_mask].all()  # every answer-region position gets masked sometimes


def test_loss_weighting():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.25])
    answer_len = torch.tensor([4, 2])
    logp = torch.log_softmax(logits, -1)
    ce = lambda b, j: -logp[b, j, targets[b, j]].item()
    want = ((ce(0, 1) + ce(0, 2)) / 0.5 / 4 + ce(1, 3) / 0.25 / 2) / 2
    got = weighted_masked_loss(logits, targets, masked, t, answer_len)
    assert math.isclose(got.item(), want, rel_tol=1e-5)
    plain = (ce(0, 1) + ce(0, 2) + ce(1, 3)) / 3  # weighting "none": mean over the masked tokens
    assert math.isclose(weighted_masked_loss(logits, targets, masked, t, answer_len, weighting="none").item(),
                        plain, rel_tol=1e-5)


def test_stratified_noise_levels_cover_the_batch():
    b = make_batch(PAIRS * 4, canvas=24)
    t = sample_noise(b.input_ids, b.answer_mask, MASK_ID, torch.Generator().manual_seed(0), stratified=True).t
    bins = ((t - 1e-3) / (1 - 1e-3) * len(t)).floor().long()
    assert sorted(bins.tolist()) == list(range(len(t)))  # one t per 1/B stratum


def test_shifted_loss_reads_previous_row():
    targets = torch.tensor([[5, 6, 7, 8]])
    masked = torch.tensor([[False, True, True, True]])
    logits = torch.full((1, 4, 10), -20.0)
    for j in range(1, 4):  # row j-1 is sure of token j; row j itself is sure of something else
        logits[0, j - 1, targets[0, j]] = 20.0
    logits[0, 3, 0] = 20.0
    t, n = torch.tensor([1.0]), torch.tensor([3])
    assert weighted_masked_loss(logits, targets, masked, t, n, shift=True).item() < 1e-6
    assert weighted_masked_loss(logits, targets, masked, t, n, shift=False).item() > 10
    with pytest.raises(ValueError):
        weighted_masked_loss(logits, targets, torch.ones_like(masked), t, n, shift=True)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_steps_reduce_loss_on_fixed_batch(family, optimizer):
    torch.manual_seed(0)
    cfg = TrainConfig(family=family, **{**TINY, "n_kv_heads": 2 if family == "dream" else 4})
    model = DiffusionTransformer(cfg.model_config())
    init_weights(model, 0.02, torch.Generator().manual_seed(0))
    b = make_batch(PAIRS, canvas=24)
    opt = build_optimizer(model, optimizer, 3e-3, 0.0, (0.9, 0.98))

    def loss_at():
        return diffusion_loss(model, b.input_ids, b.attention_mask, b.answer_mask,
                              torch.Generator().manual_seed(123))[0]

    with torch.no_grad():
        before = loss_at().item()
    for _ in range(30):
        opt.zero_grad()
        loss_at().backward()
        opt.step()
    with torch.no_grad():
        after = loss_at().item()
    assert after < 0.5 * before


def test_sampler_state_round_trip():
    a = BatchSampler(7, CURRICULUM, token_budget=400)
    for step in range(3):
        a.next_batch(step, 6)
    state = a.state_dict()
    b = BatchSampler(7, CURRICULUM, token_budget=400)
    b.load_state_dict(state)
    for step in range(3, 6):
        x, y = a.next_batch(step, 6), b.next_batch(step, 6)
        assert x.kind == y.kind and torch.equal(x.input_ids, y.input_ids)
    assert {x.kind for x in [a.next_batch(s, 6) for s in range(3, 9)]} <= {"fewshot", "long_canvas"}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_uninterrupted_run(tmp_path, optimizer):
    cfg = TrainConfig(family="llada", steps=6, seed=3, optimizer=optimizer, **TINY)
    straight = Trainer(cfg, tmp_path / "a", curriculum=CURRICULUM, progress=False)
    straight.run()
    first = Trainer(cfg, tmp_path / "b", curriculum=CURRICULUM, progress=False)
    assert not first.run(max_steps=4)
    resumed = Trainer(cfg, tmp_path / "b", curriculum=CURRICULUM, progress=False)
    resumed.load()
    assert resumed.step == 4
    assert resumed.run()
    assert resumed.last_loss == straight.last_loss
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    logs = [(tmp_path / d / "train_log.jsonl").read_text().splitlines() for d in ("a", "b")]
    strip = lambda lines: [{k: v for k, v in __import__("json").loads(x).items() if k != "elapsed"} for x in lines]
    assert strip(logs[0]) == strip(logs[1])
    assert (tmp_path / "b" / "model" / "model.safetensors").exists()


def test_wsd_run_resumed_with_more_steps_equals_one_started_with_them(tmp_path):
    # the documented way to lengthen a run: --resume --steps N while still in the stable phase
    wsd = {**TINY, "warmup_steps": 1, "schedule": "wsd", "decay_fraction": 0.25}
    longer = TrainConfig(family="llada", steps=12, seed=3, **wsd)
    straight = Trainer(longer, tmp_path / "a", curriculum=CURRICULUM, progress=False)
    straight.run()
    first = Trainer(TrainConfig(family="llada", steps=8, seed=3, **wsd), tmp_path / "b", curriculum=CURRICULUM,
                    progress=False)
    first.run(max_steps=3)  # before every boundary of either length: decay 6 / 9, curriculum 4 / 6
    resumed = Trainer(longer, tmp_path / "b", curriculum=CURRICULUM, progress=False)
    resumed.load()
    assert resumed.run()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_init_from_starts_at_the_exported_weights(tmp_path):
    cfg = TrainConfig(family="llada", steps=3, seed=3, **TINY)
    first = Trainer(cfg, tmp_path / "a", curriculum=CURRICULUM, progress=False)
    first.run()
    tuned = Trainer(TrainConfig(family="llada", steps=3, seed=4, init_from=str(tmp_path / "a" / "model"), **TINY),
                    tmp_path / "b", curriculum=CURRICULUM, progress=False)
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, tuned.model.state_dict()[k]), k
    assert tuned.step == 0 and tuned.optimizer.state_dict()["state"] == {}
    # the exported model suggests the suite's answer canvas to a recipe that leaves it unset
    exported = json.loads((tmp_path / "a" / "model" / "generation_config.json").read_text())
    assert {k: exported[k] for k in ("max_new_tokens", "block_length", "steps")} == {
        "max_new_tokens": 64, "block_length": 32, "steps": 64}


def test_resume_refuses_another_optimizer(tmp_path):
    Trainer(TrainConfig(family="llada", steps=2, seed=3, **TINY), tmp_path / "a", curriculum=CURRICULUM,
            progress=False).run(max_steps=1)
    muon = Trainer(TrainConfig(family="llada", steps=2, seed=3, optimizer="muon", **TINY), tmp_path / "a",
                   curriculum=CURRICULUM, progress=False)
    with pytest.raises(ValueError, match="optimizer='adamw', this run has 'muon'"):
        muon.load()


def test_init_from_rejects_another_architecture(tmp_path):
    Trainer(TrainConfig(family="llada", steps=1, seed=3, **TINY), tmp_path / "a", curriculum=CURRICULUM,
            progress=False).run()
    wider = {**TINY, "d_model": 64}
    with pytest.raises(ValueError, match="init_from .*d_model"):
        Trainer(TrainConfig(family="llada", steps=1, init_from=str(tmp_path / "a" / "model"), **wider),
                tmp_path / "b", curriculum=CURRICULUM, progress=False)


def test_short_phase_moves_the_curriculum_boundary(tmp_path):
    late = Trainer(TrainConfig(family="llada", steps=10, short_phase=0.8, **TINY), tmp_path / "a", progress=False)
    assert late.sampler.phase_index(7, 10) == 0 and late.sampler.phase_index(8, 10) == 1
    with pytest.raises(ValueError, match="short_phase"):
        Trainer(TrainConfig(family="llada", steps=10, short_phase=1.0, **TINY), tmp_path / "b", progress=False)


def test_default_long_phase_keeps_the_shipped_kind_weights_exactly():
    # a run without --long-phase-zero-shot must draw the batch kinds it drew before the option existed
    kinds = default_curriculum(0.6)[1].kinds
    assert [(k.name, k.weight) for k in kinds] == [("zero_shot", 0.35), ("fewshot", 0.4), ("long_canvas", 0.25)]


def test_long_phase_zero_shot_shifts_the_late_batches_to_zero_shot(tmp_path):
    def late_kinds(share):
        cfg = TrainConfig(family="llada", steps=1000, short_phase=0.5, long_phase_zero_shot=share, **TINY)
        sampler = Trainer(cfg, tmp_path / str(share), progress=False).sampler
        return Counter(sampler.next_batch(step, 1000).kind for step in range(500, 900))

    shipped, heavy = late_kinds(0.35), late_kinds(0.8)
    assert 100 < shipped["zero_shot"] < 180 and 20 < heavy["fewshot"] + heavy["long_canvas"] < 120
    assert heavy["fewshot"] > heavy["long_canvas"] > 0  # the rest is still split 8:5
    with pytest.raises(ValueError, match="long_phase_zero_shot"):
        TrainConfig(family="llada", long_phase_zero_shot=1.0)
    with pytest.raises(ValueError, match="long_phase_zero_shot"):
        default_curriculum(0.5, -0.1)


def test_family_weights_skew_the_training_problems(tmp_path):
    weighted = Trainer(TrainConfig(family="llada", steps=4, family_weights={"expr": 1, "sort": 1}, **TINY),
                       tmp_path / "a", curriculum=CURRICULUM, progress=False)
    tok = build_tokenizer()
    text = "".join(tok.decode(row, skip_special_tokens=True)
                   for b in (weighted.sampler.next_batch(s, 4) for s in range(4)) for row in b.input_ids.tolist())
    assert "eval " in text and "sort " in text and "add " not in text and "reverse " not in text
    for bad, match in (({"mul": 1}, "unknown family 'mul'"), ({"add": -1}, "non-negative int"),
                       ({"add": 0}, "weight 0"), ({}, "non-empty")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(family="llada", family_weights=bad)


def _families_per_step(sampler: BatchSampler, total: int) -> list[set[str]]:
    """The task families (by their prompt verbs) of the problems each step's batch asks about."""
    tok = build_tokenizer()
    verbs = {"add": "Q: add ", "expr": "Q: eval ", "sort": "Q: sort ", "reverse": "Q: reverse "}
    out = []
    for step in range(total):
        rows = [tok.decode(row, skip_special_tokens=True) for row in sampler.next_batch(step, total).input_ids.tolist()]
        # the last question of a row is the one it answers (earlier ones are its worked examples)
        asked = [row[row.rindex("Q: "):] for row in rows]
        out.append({fam for fam, verb in verbs.items() for q in asked if q.startswith(verb)})
    return out


def test_late_family_mix_takes_over_at_late_mix_start():
    sampler = BatchSampler(5, CURRICULUM, token_budget=400, family_weights={"add": 1},
                           late_family_weights={"sort": 1, "reverse": 1}, late_mix_start=0.5)
    per_step = _families_per_step(sampler, 8)
    assert all(f == {"add"} for f in per_step[:4])
    assert all(f and f <= {"sort", "reverse"} for f in per_step[4:])
    assert set().union(*per_step[4:]) == {"sort", "reverse"}
    # without a late mix nothing changes: the same batches as a sampler that never heard of one
    plain, unset = (BatchSampler(5, CURRICULUM, token_budget=400, family_weights={"add": 1}, **extra)
                    for extra in ({}, {"late_mix_start": 0.25}))
    for step in range(8):
        assert torch.equal(plain.next_batch(step, 8).input_ids, unset.next_batch(step, 8).input_ids)


def test_sampler_resumed_after_the_late_mix_began_draws_the_same_batches():
    make = lambda: BatchSampler(7, CURRICULUM, token_budget=400, family_weights={"add": 1, "expr": 1},
                                late_family_weights={"sort": 1}, late_mix_start=0.25)
    a = make()
    for step in range(4):
        a.next_batch(step, 8)
    b = make()
    b.load_state_dict(a.state_dict())
    assert {s.late for s in b.streams.values()} == {False, True}
    for step in range(4, 8):
        assert torch.equal(a.next_batch(step, 8).input_ids, b.next_batch(step, 8).input_ids)


def test_late_family_mix_is_validated_and_reaches_the_sampler(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'mul'"):
        TrainConfig(late_family_weights={"mul": 1})
    with pytest.raises(ValueError, match="late_mix_start"):
        TrainConfig(late_mix_start=1.0)
    cfg = TrainConfig(family="llada", steps=4, family_weights={"add": 1}, late_family_weights={"sort": 1},
                      late_mix_start=0.5, **TINY)
    sampler = Trainer(cfg, tmp_path / "a", curriculum=CURRICULUM, progress=False).sampler
    assert [sampler.is_late(s, 4) for s in range(4)] == [False, False, True, True]


def _training_script():
    """scripts/train_default_model.py as a module (scripts/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_family_weights_on_the_command_line():
    script = _training_script()
    args = script.parse_args(["--out", "x", "--family-weights", "expr=4,add=2"])
    assert args.family_weights == {"expr": 4, "add": 2}
    with pytest.raises(SystemExit):
        script.parse_args(["--out", "x", "--family-weights", "expr=lots"])


@pytest.fixture
def training_main(monkeypatch):
    """The training script's main(), run in-process without touching pytest's signals or thread count."""
    import signal

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    return _training_script().main


def test_training_script_passes_the_schedule_options_to_the_config(tmp_path, training_main):
    import json

    out = tmp_path / "run"
    assert training_main(["--out", str(out), "--steps", "10", "--max-steps", "0", "--no-progress", "--schedule", "wsd",
                          "--decay-fraction", "0.3", "--block-prefix-prob", "0.5", "--block-prefix-start", "0.75",
                          "--late-family-weights", "sort=3,add=1", "--late-mix-start", "0.4",
                          "--long-phase-zero-shot", "0.7", "--group-by-length", "256", "--optimizer", "muon",
                          "--muon-lr-scale", "4"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["schedule"], saved["decay_fraction"], saved["block_prefix_start"]) == ("wsd", 0.3, 0.75)
    assert (saved["late_family_weights"], saved["late_mix_start"]) == ({"sort": 3, "add": 1}, 0.4)
    assert (saved["long_phase_zero_shot"], saved["group_by_length"]) == (0.7, 256)
    assert (saved["optimizer"], saved["muon_lr_scale"]) == ("muon", 4.0)


def test_training_script_refuses_a_late_mix_start_without_a_late_mix(tmp_path, training_main, capsys):
    out = tmp_path / "run"
    assert training_main(["--out", str(out), "--steps", "10", "--max-steps", "0", "--no-progress",
                          "--late-mix-start", "0.4"]) == 2
    assert "--late-mix-start 0.4: has no effect without --late-family-weights" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_block_states_clean_before_masked_after_scored_inside():
    b, p_len, canvas, block = 64, 5, 96, 32
    ids = torch.randint(5, 90, (b, p_len + canvas))
    answer = torch.zeros(b, p_len + canvas, dtype=torch.bool)
    answer[:, p_len:] = True
    g = torch.Generator().manual_seed(0)
    n = sample_noise(ids, answer, MASK_ID, g, block_prefix_prob=1.0, block_length=block)
    seen = set()
    for r in range(b):
        per_block = n.masked[r, p_len:].view(-1, block)
        first = next((i for i in range(per_block.shape[0]) if per_block[i].any()), None)
        if first is None:
            continue  # block k drew no mask at a tiny t
        seen.add(first)
        assert per_block[first + 1:].all()  # every later block is all masks
        scored = n.scored[r, p_len:].view(-1, block)
        assert not scored[:first].any() and not scored[first + 1:].any()  # loss inside one block only
        assert torch.equal(n.scored[r] & n.masked[r], n.scored[r]) and n.region_len[r] == block
    assert seen == {0, 1, 2}
    assert not n.masked[:, :p_len].any()  # the prompt is never masked


def test_block_states_off_keeps_the_iid_stream():
    ids = torch.randint(5, 90, (8, 40))
    answer = torch.zeros(8, 40, dtype=torch.bool)
    answer[:, 10:] = True
    a = sample_noise(ids, answer, MASK_ID, torch.Generator().manual_seed(1), block_prefix_prob=0.0)
    # the i.i.d. objective's draws, in its order: one t per row, then one uniform per position
    g = torch.Generator().manual_seed(1)
    t = 1e-3 + (1 - 1e-3) * torch.rand(8, generator=g)
    want = (torch.rand(8, 40, generator=g) < t[:, None]) & answer
    assert torch.equal(a.masked, want) and torch.equal(a.scored, want) and torch.equal(a.t, t)
    assert a.region_len.tolist() == [30] * 8


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    from dare_pipeline.training.trainer import lr_at

    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.05, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert all(lr_at(s, cfg) == pytest.approx(1e-3) for s in (100, 500, 800))
    assert lr_at(900, cfg) == pytest.approx(1e-3 * (1 - 0.95 * 0.5))
    assert lr_at(1000, cfg) == pytest.approx(5e-5)
    decay = [lr_at(s, cfg) for s in range(800, 1001)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    cosine = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.05)
    assert lr_at(500, cosine) < 0.7e-3 and lr_at(1000, cosine) == pytest.approx(5e-5)


@pytest.mark.parametrize("field, value, match", [("schedule", "linear", "schedule"),
                                                 ("decay_fraction", 0.0, "decay_fraction"),
                                                 ("block_prefix_start", 1.0, "block_prefix_start")])
def test_schedule_options_are_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_block_states_begin_at_block_prefix_start(tmp_path, monkeypatch):
    import dare_pipeline.training.trainer as trainer_module

    seen = []
    real_loss = trainer_module.diffusion_loss

    def recording_loss(*args, block_prefix_prob, **kwargs):
        seen.append(block_prefix_prob)
        return real_loss(*args, block_prefix_prob=block_prefix_prob, **kwargs)

    monkeypatch.setattr(trainer_module, "diffusion_loss", recording_loss)
    cfg = TrainConfig(family="llada", steps=4, block_prefix_prob=0.5, block_prefix_start=0.5, **TINY)
    Trainer(cfg, tmp_path / "a", curriculum=CURRICULUM, progress=False).run()
    assert seen == [0.0, 0.0, 0.5, 0.5]
