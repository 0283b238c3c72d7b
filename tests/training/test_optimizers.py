import pytest
import torch

from dare_pipeline.models import DiffusionTransformer
from dare_pipeline.training import TrainConfig
from dare_pipeline.training.optimizers import (
    Float32Muon,
    MuonWithAdamW,
    build_optimizer,
    optimizer_step,
    orthogonalise,
)

SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "embedding_size": 101}


def _model(family="dream"):
    torch.manual_seed(0)
    return DiffusionTransformer(TrainConfig(family=family, **SMALL).model_config())


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = _model("dream")  # has q/k/v biases, which must stay with AdamW
    opt = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.98))
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon == {n for n in names.values() if n.endswith(".weight") and n.split(".")[-2] in projections}
    assert {"embed.weight", "lm_head.weight", "final_norm.weight", "layers.0.q_proj.bias"} <= adamw
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)


def test_muon_step_is_orthogonalised():
    # one step from fresh momentum moves a hidden matrix along an (approximately) orthogonal matrix:
    # all singular values of the update alike, whatever the gradient's spectrum
    model = _model("llada")
    lr = 1e-2
    opt = build_optimizer(model, "muon", lr, 0.0, (0.9, 0.98))
    w = model.layers[0].up_proj.weight
    before = w.detach().clone()
    grad = torch.randn(w.shape[0], 4) @ torch.randn(4, w.shape[1]) + 0.01 * torch.randn(w.shape)  # nearly rank 4
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = grad
    opt.step()
    scale = lr * 0.2 * max(w.shape) ** 0.5  # match_rms_adamw
    s = torch.linalg.svdvals((before - w.detach()) / scale)
    assert s[:4].min() > 0.5 and s[:4].max() < 1.3  # Newton-Schulz pushes the four large directions toward 1
    assert torch.linalg.svdvals(grad)[:4].max() / torch.linalg.svdvals(grad)[:4].min() > 1.5  # they were unequal


def test_a_stack_is_orthogonalised_matrix_by_matrix():
    # the step stacks same-shape matrices; each must come out as if iterated alone (its own norm, tall or wide)
    torch.manual_seed(0)
    coefficients = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults
    for shape in [(3, 24, 40), (2, 40, 24)]:
        stack = torch.randn(shape) * torch.tensor([1.0, 30.0, 0.01][: shape[0]]).view(-1, 1, 1)
        together = orthogonalise(stack, coefficients, 5, 1e-7)
        for m, out in zip(stack, together):
            assert torch.allclose(out, orthogonalise(m, coefficients, 5, 1e-7), atol=1e-5)


def test_muon_step_matches_one_parameter_at_a_time():
    # two parameters of one shape stepped together move exactly as each does in an optimiser of its own
    torch.manual_seed(0)
    pair = [torch.nn.Parameter(0.02 * torch.randn(16, 48)) for _ in range(2)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in pair]
    together = Float32Muon(pair, lr=1e-2, weight_decay=0.1)
    separate = [Float32Muon([p], lr=1e-2, weight_decay=0.1) for p in alone]
    for _ in range(3):
        for p, q in zip(pair, alone):
            p.grad = torch.randn(16, 48)
            q.grad = p.grad.clone()
        together.step()
        for opt in separate:
            opt.step()
    for p, q in zip(pair, alone):
        assert torch.allclose(p, q, atol=1e-6)


def test_optimizer_state_round_trips_and_refuses_adamw_state():
    model = _model("llada")
    opt = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.98))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    again = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.98))
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["muon"]["state"].keys() == opt.state_dict()["muon"]["state"].keys()
    adamw_state = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.98)).state_dict()
    with pytest.raises(ValueError, match="--optimizer adamw"):
        again.load_state_dict(adamw_state)


def test_optimizer_is_validated():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="allowed adamw, muon"):
        build_optimizer(_model(), "sgd", 1e-3, 0.1, (0.9, 0.98))


def test_float32_muon_follows_torchs_muon():
    # the same algorithm as torch.optim.Muon (bfloat16 Newton-Schulz there): a few steps agree to bf16 rounding
    torch.manual_seed(0)
    ours = torch.nn.Parameter(0.02 * torch.randn(48, 96))
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = Float32Muon([ours], lr=1e-2, weight_decay=0.1)
    b = torch.optim.Muon([theirs], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = ours.detach().clone()
    for _ in range(3):
        g = torch.randn(48, 96)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    moved = (theirs.detach() - start).norm()
    assert (ours.detach() - theirs.detach()).norm() < 0.05 * moved
    assert a.state[ours]["momentum_buffer"].shape == (48, 96)


def test_trainer_scales_only_the_muon_learning_rate(tmp_path):
    from dare_pipeline.training import Trainer
    from dare_pipeline.training.trainer import lr_at

    cfg = TrainConfig(family="llada", steps=4, warmup_steps=2, lr=2e-3, token_budget=400, optimizer="muon",
                      muon_lr_scale=4.0, checkpoint_every=1000, **SMALL)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.train_step()
    trainer.train_step()
    schedule = lr_at(1, cfg)
    assert [g["lr"] for g in trainer.optimizer.muon.param_groups] == [4.0 * schedule]
    assert [g["lr"] for g in trainer.optimizer.adamw.param_groups] == [schedule, schedule]
    with pytest.raises(ValueError, match="muon_lr_scale"):
        TrainConfig(muon_lr_scale=0.0)


def test_optimizer_step_updates_at_the_scheduled_rate_with_clipped_gradients():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = 100 * model(torch.ones(3, 4)).sum()
    norm = optimizer_step(model, optimizer, loss, lr=0.2, grad_clip=1.0)
    assert norm > 1.0  # the norm before clipping
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.2]
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])) == pytest.approx(1.0)
    step_w, step_b = before[0] - model.weight.detach(), before[1] - model.bias.detach()
    assert torch.allclose(step_w, 0.1 * model.weight.grad) and torch.allclose(step_b, 0.2 * model.bias.grad)

