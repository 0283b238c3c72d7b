"""Optimisers of the training loop: AdamW everywhere, or Muon on the hidden matrices with AdamW on the rest.

Muon (torch.optim.Muon, arXiv 2502.16982) orthogonalises each hidden matrix's momentum with a few Newton-Schulz
iterations, so every direction of the matrix moves at the same rate; it is meant for the 2-D weights
inside the blocks only. Embeddings, the output head, norms and biases stay with AdamW, as in the
Muon and Moonlight recipes. `adjust_lr_fn="match_rms_adamw"` scales Muon's step to the RMS an AdamW
step would have, so one peak learning rate and one schedule serve both halves.

torch's own Muon.step runs Newton-Schulz in bfloat16, which CPUs without bf16 matrix units do at a
crawl (2.1 s a step for the 1.31 M-parameter model, against 0.013 s for AdamW, one thread);
Float32Muon keeps torch's class (parameter groups, validation, state layout), does the
iteration in float32, and stacks the matrices of one shape so that each shape is one batched
iteration rather than one per matrix.
"""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "muon")


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    # by name part: the diffusion models' "embed.weight", transformers' "model.embed_tokens.weight"
    return p.ndim == 2 and not any(part.startswith(("embed", "lm_head")) for part in name.split("."))


def _adamw_groups(named, weight_decay: float):
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def orthogonalise(m: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Approximately U V^T of m = U S V^T (or of each matrix of a stack m, shape (..., rows, cols)): the
    quintic Newton-Schulz iteration of the Muon paper, in float32. Its coefficients favour speed over
    convergence: singular values end between ~0.7 and ~1.2."""
    a, b, c = coefficients
    x = m.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    # Frobenius >= spectral norm, so every singular value starts <= 1 (each matrix of a stack by its own norm)
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in float32 and the step of match_rms_adamw."""

    def __init__(self, params, lr: float, weight_decay: float):
        super().__init__(params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault(tuple(p.shape), []).append((p, update))
            # one batched iteration per shape: a block's many small matrices cost one set of products
            for shape, pairs in by_shape.items():
                updates = orthogonalise(torch.stack([u for _, u in pairs]), group["ns_coefficients"],
                                        group["ns_steps"], group["eps"])
                # match_rms_adamw: an orthogonal update's RMS is 1/sqrt(max dim); 0.2 is AdamW's typical RMS
                alpha = -lr * 0.2 * math.sqrt(max(shape))
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=alpha)


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for every other parameter, stepped together.

    Exposes what the trainer uses of an optimiser: param_groups (lr set per step), zero_grad,
    step, state_dict and load_state_dict."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                 muon_lr_scale: float = 1.0):
        named = list(model.named_parameters())
        hidden = [p for n, p in named if _is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
        # "lr_scale": the trainer sets each group's lr to the schedule's value times this
        self.muon = Float32Muon([{"params": hidden, "lr_scale": muon_lr_scale}], lr=lr * muon_lr_scale,
                                weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW(_adamw_groups(rest, weight_decay), lr=lr, betas=betas)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError(f"optimizer state has keys {sorted(state)}; a muon run saves 'muon' and 'adamw' "
                             "(was the checkpoint trained with --optimizer adamw?)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                    muon_lr_scale: float = 1.0):
    """The optimiser called `name` (one of OPTIMIZERS) over the model's parameters; muon_lr_scale
    multiplies the Muon groups' learning rate (AdamW's stays the schedule's)."""
    if name == "adamw":
        return torch.optim.AdamW(_adamw_groups(list(model.named_parameters()), weight_decay), lr=lr, betas=betas)
    if name == "muon":
        return MuonWithAdamW(model, lr, weight_decay, betas, muon_lr_scale)
    raise ValueError(f"optimizer {name!r}: allowed {', '.join(OPTIMIZERS)}")


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
                   grad_clip: float) -> float:
    """One update of `model` from `loss` at learning rate `lr` (each group scaled by its `lr_scale`),
    gradients clipped to `grad_clip`; returns the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(grad_norm)
