"""The cache invariant: with exact cache contents, a forward over any subset of rows gives the same
logits and hidden states for those rows as the full forward.

Every cache and reuse plugin rests on it: a row feeder feeds some columns and lets attention read the
others' keys and values from the activation store; a reuse object skips work per layer and row. If
the store holds what the full forward computes, the partial forward must reproduce the full one.
`check_invariant` checks that for one case, the way the decoding loop calls the model:

1. the canvas before (`answers` with every real fed token changed) is fed whole through
   `forward_rows`, the plugins' hooks and reuse objects taking part as in a decode (a refresh);
2. the store's keys, values and ATTN_OUT / FFN_OUT deltas at the columns NOT fed next are made
   exact, taken from the full forward of the canvas after (`answers`); the fed columns keep what
   step 1 wrote, now stale;
3. `forward_rows` feeds the columns `fed` of the canvas after, with `head_rows` and step 1.

The full forward is `model(tokens, attention_mask)` on a canvas and padding mask built here from the
prompts (not by the decode state), read through hooks on its layers. Compared on the real (not
padding) rows, which are the rows a decode uses: the logits of step 1 and 3 (the head rows), every
layer's output hidden states of the fed rows (the embedding plus the ATTN_OUT and FFN_OUT deltas the
forward wrote to the store) and every layer's keys and values in the store. Float32 results of
different shapes are not bit-identical (attention and matrix products sum in other orders; up to 9e-6
on the logits of tiny models), so values are compared within TOLERANCE, the bound every exactness test
of the project uses; a wrong position, mask or stale row moves them by 1 or more.
"""

from __future__ import annotations

import contextlib

import attrs
import torch

from ..api import Pipeline
from ..core.layer_reuse import ReuseSet
from ..core.plan import ForwardPlan
from ..core.state import DecodeState
from ..core.store import ATTN_OUT, FFN_OUT

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@attrs.frozen
class Case:
    """One invariant case: a left-padded batch, its answer columns' tokens, and what is fed."""

    prompts: tuple[tuple[int, ...], ...]
    # per prompt, the tokens of the answer columns (all of one length; the mask id is allowed)
    answers: tuple[tuple[int, ...], ...]
    # [start, stop): the canvas columns the partial forward feeds
    fed: tuple[int, int]
    # fed-relative rows whose logits are asked for (None: all fed rows)
    head_rows: tuple[int, ...] | None = None

    @property
    def prompt_end(self) -> int:
        return max(len(p) for p in self.prompts)

    @property
    def length(self) -> int:
        return self.prompt_end + len(self.answers[0])


@attrs.frozen
class FullForward:
    """What `model(tokens, attention_mask)` computed, per layer: input hidden states, K/V, deltas."""

    logits: torch.Tensor  # (B, L, V)
    hidden: list[torch.Tensor]  # n_layers + 1 tensors (B, L, d): each layer's input, then the last output
    keys: list[torch.Tensor]  # (B, kv_heads, L, hd), after RoPE
    values: list[torch.Tensor]
    attn: list[torch.Tensor]  # (B, L, d): attention's residual delta
    ffn: list[torch.Tensor]  # (B, L, d): the FFN's residual delta


def canvas(model, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, real) (B, L): the left-padded canvas of the case and its padding mask (True = real)."""
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
    p_end = case.prompt_end
    rows = [[pad] * (p_end - len(p)) + list(p) + list(a) for p, a in zip(case.prompts, case.answers)]
    tokens = torch.tensor(rows, dtype=torch.long, device=model.device)
    real = torch.tensor([[False] * (p_end - len(p)) + [True] * (case.length - p_end + len(p)) for p in case.prompts],
                        device=model.device)
    return tokens, real


def full_forward(model, tokens: torch.Tensor, real: torch.Tensor) -> FullForward:
    """The model's plain forward over every row, with every layer's inputs and outputs read by hooks
    (K/V and deltas are the layer's own sub-operations on the input the forward gave it)."""
    out = FullForward(None, [], [], [], [], [])

    def layer_input(module, args):
        x, cos, sin, key_mask = args
        h = module.attn_norm(x)
        k, v = module.project_kv(h, cos, sin)
        attn = module.attend(module.project_q(h, cos, sin), k, v, key_mask)
        out.hidden.append(x)
        out.keys.append(k)
        out.values.append(v)
        out.attn.append(attn)
        out.ffn.append(module.ffn(x + attn))

    handles = [layer.register_forward_pre_hook(layer_input) for layer in model.layers]
    handles.append(model.final_norm.register_forward_pre_hook(lambda module, args: out.hidden.append(args[0])))
    try:
        logits = model(tokens, attention_mask=real)
    finally:
        for handle in handles:
            handle.remove()
    return attrs.evolve(out, logits=logits)


def stale_tokens(model, tokens: torch.Tensor, real: torch.Tensor, fed: slice) -> torch.Tensor:
    """The canvas before: every real fed token replaced by the next id, so that every fed row's cached
    state is stale (a mask committed since, or a token remasked)."""
    before = tokens.clone()
    changed = (tokens[:, fed] + 1) % model.config.vocab_size
    before[:, fed] = torch.where(real[:, fed], changed, tokens[:, fed])
    return before


@attrs.frozen
class Result:
    """What a case that held measured."""

    errors: dict[str, float]  # per quantity compared, the largest absolute difference
    execution: dict  # the executor's report: how the forwards ran (eager, compiled, eager fallbacks)


def check_invariant(model, case: Case, plugins=(), execution=None, what: str = "") -> Result:
    """Run the case (module docstring) with the recipe's `plugins` (their reuse objects take part) and
    `execution` section; raise AssertionError naming the forward, quantity and layer that differ."""
    pipe = Pipeline(model, {"generation": _generation(case), "plugins": list(plugins),
                            "execution": dict(execution or {})})
    after, real = canvas(model, case)
    fed = slice(*case.fed)
    before = stale_tokens(model, after, real, fed)
    what = what or f"{[p if isinstance(p, str) else p.get('name') for p in plugins] or 'no reuse'}, fed {case.fed}"
    errors: dict[str, float] = {}
    with torch.inference_mode():
        exact_before, exact_after = full_forward(model, before, real), full_forward(model, after, real)
        with _decode_state(pipe, case) as (state, forward):
            state.x.copy_(before)
            whole = slice(0, case.length)
            logits = forward(whole, None, refresh=True)
            _compare(errors, f"{what}: refresh forward", exact_before, state.store, model.embed(state.x),
                     logits, whole, None, real)
            state.x.copy_(after)
            _make_exact(state.store, exact_after, fed, real)
            logits = forward(fed, case.head_rows, refresh=False)
            _compare(errors, f"{what}: forward of columns [{fed.start}, {fed.stop})", exact_after, state.store,
                     model.embed(state.x[:, fed]), logits, fed, case.head_rows, real)
    return Result(errors, pipe.executor.report())


def _generation(case: Case) -> dict:
    answer = len(case.answers[0])
    return {"gen_length": answer, "block_length": answer, "steps": answer}


@contextlib.contextmanager
def _decode_state(pipe: Pipeline, case: Case):
    """A decode state of the case with the pipeline's plugins started as the loop starts them, and a
    `forward(fed, head_rows, refresh)` that runs one step around `forward_rows` as the loop does."""
    model, hooks, executor = pipe.model, pipe.manager.hook, pipe.executor
    executor.begin_generation()
    state = DecodeState.create(model, pipe.recipe.generation, [list(p) for p in case.prompts], seed=0,
                               executor=executor)
    hooks.dare_generation_start(state=state)
    reuse = ReuseSet([r for r in hooks.dare_layer_reuse(state=state) if r is not None])
    store = state.require_store()
    for name in reuse.fields | {ATTN_OUT, FFN_OUT}:  # the deltas are the partial forward's hidden states
        store.track(name)
        for layer in range(model.config.n_layers):  # made before any forward: a compiled one cannot
            store.field(name, layer, model.config.d_model)
    state.block, state.step_in_block = 0, 0
    hooks.dare_block_start(state=state)
    state.unfinished = [True] * state.batch

    def forward(fed: slice, head_rows, refresh: bool) -> torch.Tensor:
        hooks.dare_step_start(state=state)
        state.plan = ForwardPlan(fed=fed, refresh=refresh)
        rows = None if head_rows is None else torch.tensor(head_rows, dtype=torch.long, device=model.device)
        logits = model.forward_rows(state.model_tokens(fed), fed, state.model_rows(state.positions), state.key_mask,
                                    store, reuse, head_rows=rows, refresh=refresh, step=state.step,
                                    executor=executor)
        state.step += 1
        state.step_in_block += 1
        committed = torch.zeros(state.batch, case.length - case.prompt_end, dtype=torch.bool, device=model.device)
        hooks.dare_step_end(state=state, committed=committed)
        return logits

    try:
        yield state, forward
    except BaseException as error:  # plugins release what they hold, as after an aborted decode
        with contextlib.suppress(Exception):
            hooks.dare_generation_abort(state=state, error=error)
        raise
    hooks.dare_block_end(state=state)
    hooks.dare_generation_end(state=state)


def _make_exact(store, exact: FullForward, fed: slice, real: torch.Tensor) -> None:
    """The store's rows at the columns not fed made the full forward's (keys, values, both deltas)."""
    length = real.shape[1]
    columns = torch.tensor([c for c in range(length) if not fed.start <= c < fed.stop], dtype=torch.long,
                           device=real.device)
    if columns.numel() == 0:
        return
    for layer in range(store.n_layers):
        store.write_kv(layer, columns, exact.keys[layer][:, :, columns], exact.values[layer][:, :, columns])
        store.write(ATTN_OUT, layer, columns, exact.attn[layer][:, columns])
        store.write(FFN_OUT, layer, columns, exact.ffn[layer][:, columns])


def _compare(errors: dict, what: str, exact: FullForward, store, embedded: torch.Tensor, logits: torch.Tensor,
             fed: slice, head_rows, real: torch.Tensor) -> None:
    """`embedded`: the embedding of the fed tokens, the partial forward's hidden states before layer 0."""
    rows = torch.arange(fed.start, fed.stop, device=real.device)
    head = rows if head_rows is None else rows[torch.tensor(head_rows, dtype=torch.long, device=real.device)]
    _close(errors, "logits", what, logits, exact.logits[:, head], real[:, head])
    fed_real = real[:, fed]
    hidden = embedded
    for layer in range(store.n_layers):
        hidden = hidden + store.read(ATTN_OUT, layer, fed) + store.read(FFN_OUT, layer, fed)
        _close(errors, "hidden states", f"{what}, output of layer {layer}", hidden, exact.hidden[layer + 1][:, fed],
               fed_real)
        # every column's keys and values: the fed rows written back, the others untouched
        real_kv = real[:, None, :, None].expand_as(exact.keys[layer])
        _close(errors, "keys", f"{what}, layer {layer}", store.keys(layer), exact.keys[layer], real_kv)
        _close(errors, "values", f"{what}, layer {layer}", store.values(layer), exact.values[layer], real_kv)


def _close(errors: dict, quantity: str, what: str, got: torch.Tensor, want: torch.Tensor, where: torch.Tensor) -> None:
    """got == want within TOLERANCE where `where` (a bool mask broadcast over trailing dimensions)."""
    assert got.shape == want.shape, f"{what}: {quantity} of shape {tuple(got.shape)}, not {tuple(want.shape)}"
    a, b = got[where], want[where]
    if a.numel():
        errors[quantity] = max(errors.get(quantity, 0.0), float((a.float() - b.float()).abs().max()))
    torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"{what}: {quantity} differ from the full forward's: {m}")
