"""Mixture of experts (nanomeg.py `route`, `capacity_keep`, `moe_mlp`, `MoE`; parallel.py section 14, `Experts`,
the "ep" / "edp" mesh groups, expert buckets) against an independent plain-PyTorch reference, in float64.

The reference (`ref_moe`) is written from the spec alone, with Python loops: router logits x·Wᵀ, softmax, top-k
(gates renormalised when k > 1), per-sequence load-balancing loss E·Σ f_i·P_i (f counted before drops),
z = mean logsumexp², capacity C = ceil(c·s·k/E) per sequence with slot-major priority, and
out = Σ over kept choices of gate · expert(x).

1. proven equal, one layer: hypothesis draws E, k, capacity, activation, bias and the aux / z weights; the
   layer's output, the gradients of x and of every weight (the aux and z terms joined through `_AuxLossGrad`)
   and the stats (aux, z, load, dropped) equal the reference's;
2. capacity: `capacity_keep` is the slot-major first-come rule; a token whose choices are all dropped gets
   exactly 0 (and no gradient); the same choices are dropped whichever rows a shard holds (one sequence);
   `gpt_loss` returns LM + Σ weighted aux, and its gradient is the gradient of that number;
3. proven equal, layouts: (tp, ep) on 4 and 8 gloo workers, sequence parallel, dropout, capacity, MoE every
   layer or every other: the dp-mean loss and every full gradient (experts reduced over edp, / dp) equal the
   serial full-batch run; the stats summed over dp equal the serial ones;
4. communication: per MoE layer, the all-to-alls over ep move h × (this rank's kept choices of experts held
   on other ep ranks) each way in forward and again in backward, plus one all-to-all of E/ep·(ep−1) counts;
   nothing at ep = 1;
5. training: GradBuckets (experts over edp) + AdamW, or ZeRO-1, with the global-norm clip, over 3 steps
   equals torch's AdamW + clip_grad_norm_ on the full model; the norm is the full model's;
6. pipeline: a MoE GPT at pp = 2 (1F1B, 2 microbatches) equals the serial loss and gradients; with a loss
   mask that gives the microbatches unequal token shares too (section 8: the aux losses scale by rows);
7. bad configs and layouts are ValueErrors naming the values, raised on every rank before any collective.
"""

import math
from dataclasses import replace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from common import (BETAS, CLIP, LR, SERIAL, STEPS, WEIGHT_DECAY, adamw, assert_close, jittered, merged, rand,
                    randint, serial_gpt_training)
from harness import value_errors_then_in_step
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nanomeg as N
import parallel as P

PRE = "layers.0.moe"


# ---------------------------------------------------------------------------------------------------
# The independent reference
# ---------------------------------------------------------------------------------------------------


def ref_act(y, activation):
    if activation in ("swiglu", "geglu"):  # fc1 rows interleaved [gate_0, up_0, gate_1, up_1, ...]
        gate, up = y[..., 0::2], y[..., 1::2]
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up
    if activation == "relu":
        return F.relu(y)
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def ref_keep(idx, E, capacity):
    """idx [b, s, k] (a list-of-lists walk): per sequence, slot 0 of every token in position order, then slot
    1, ...; each expert keeps its first ceil(c·s·k/E) choices."""
    b, s, k = idx.shape
    keep = torch.ones(b, s, k, dtype=torch.bool)
    if capacity is None:
        return keep
    limit = math.ceil(capacity * s * k / E)
    for row in range(b):
        used = [0] * E
        for slot in range(k):
            for t in range(s):
                e = int(idx[row, t, slot])
                if used[e] < limit:
                    used[e] += 1
                else:
                    keep[row, t, slot] = False
    return keep


def ref_moe(w: dict, x, cfg):
    """w: router [E, h], fc1 [E, f(·2), h], b1 [E, f(·2)] or None, fc2 [E, h, f], b2 [E, h] or None.
    x [b, s, h] -> dict(y, aux, z, load [E], dropped, keep, idx)."""
    E, k = cfg.experts, cfg.moe_topk
    b, s, h = x.shape
    logits = x.double() @ w["router"].double().T
    probs = logits.softmax(-1)
    gates, idx = torch.topk(probs, k, dim=-1)
    if k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    keep = ref_keep(idx, E, cfg.moe_capacity)

    def expert(e, v):
        y = w["fc1"][e] @ v + (0 if w["b1"] is None else w["b1"][e])
        return w["fc2"][e] @ ref_act(y, cfg.activation) + (0 if w["b2"] is None else w["b2"][e])

    out = []
    for row in range(b):
        for t in range(s):
            acc = torch.zeros(h, dtype=x.dtype)
            for slot in range(k):
                if keep[row, t, slot]:
                    acc = acc + gates[row, t, slot] * expert(int(idx[row, t, slot]), x[row, t])
            out.append(acc)
    y = torch.stack(out).view(b, s, h)
    aux = 0.0
    for row in range(b):
        f = torch.bincount(idx[row].reshape(-1), minlength=E).double() / (s * k)
        aux = aux + E * (f * probs[row].mean(0)).sum()
    aux = aux / b
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return dict(y=y, aux=aux, z=z, load=torch.bincount(idx.reshape(-1), minlength=E), dropped=int((~keep).sum()),
                keep=keep, idx=idx)


def ref_weights(params: dict, prefix=PRE) -> dict:
    return dict(router=params[f"{prefix}.router.weight"], fc1=params[f"{prefix}.fc1.weight"],
                b1=params.get(f"{prefix}.fc1.bias"), fc2=params[f"{prefix}.fc2.weight"],
                b2=params.get(f"{prefix}.fc2.bias"))


def layer_params(cfg, seed: int) -> dict:
    """One MoE layer's tensors, drawn here in the documented layout (not from nanomeg's init)."""
    E, h, f = cfg.experts, cfg.hidden, cfg.ffn_hidden
    f1 = 2 * f if cfg.activation in ("swiglu", "geglu") else f
    out = {f"{PRE}.router.weight": rand(seed, E, h), f"{PRE}.fc1.weight": 0.5 * rand(seed + 1, E, f1, h),
           f"{PRE}.fc2.weight": 0.5 * rand(seed + 2, E, h, f)}
    if cfg.bias:
        out |= {f"{PRE}.fc1.bias": 0.3 * rand(seed + 3, E, f1), f"{PRE}.fc2.bias": 0.3 * rand(seed + 4, E, h)}
    return out


def moe_config(**kw) -> N.GPTConfig:
    base = dict(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=6, heads=2, ffn=4)
    return N.GPTConfig(**(base | kw))


def model_params(cfg, seed: int) -> dict:
    """init_gpt's parameters, jittered: the 1-D ones by common.jittered, and the experts' [E, ...] biases
    (zeros at init, 2-D) here."""
    full = jittered(N.init_gpt(cfg, seed, torch.float64), seed)
    return {k: v + 0.1 * rand(seed + 77 + i, *v.shape) if ".moe." in k and k.endswith("bias") else v
            for i, (k, v) in enumerate(full.items())}


def expert_names(specs: dict) -> list:
    return [k for k, s in specs.items() if isinstance(s, P.Experts)]


# ---------------------------------------------------------------------------------------------------
# 1. One layer, serial, against the reference
# ---------------------------------------------------------------------------------------------------


class LayerCase(NamedTuple):
    cfg: N.GPTConfig
    b: int
    s: int
    seed: int


@st.composite
def layer_cases(draw, capacities=(None, 0.5, 1.0, 1.5)):
    E = draw(st.sampled_from([2, 3, 4, 8]))
    k = draw(st.sampled_from([k for k in (1, 2) if k <= E]))
    cfg = moe_config(experts=E, moe_topk=k, moe_capacity=draw(st.sampled_from(capacities)),
                     activation=draw(st.sampled_from(["gelu", "swiglu", "relu"])), bias=draw(st.booleans()),
                     ffn=draw(st.sampled_from([3, 4])), moe_aux_loss=draw(st.sampled_from([0.0, 0.01, 0.7])),
                     moe_z_loss=draw(st.sampled_from([0.0, 0.3])))
    return LayerCase(cfg, draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(0, 2**16)))


def run_layer(params, x, cfg, dy, mesh=SERIAL):
    """nanomeg's layer: (y·dy).sum() backward (the aux terms join through _AuxLossGrad)."""
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    x = x.clone().requires_grad_(True)
    moe = N.MoE()
    y = N.moe_mlp(params, PRE, x, cfg, mesh, layer=0, moe=moe, training=True)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {k: v.grad for k, v in params.items()}, moe.stats


def run_reference(params, x, cfg, dy):
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    x = x.clone().requires_grad_(True)
    ref = ref_moe(ref_weights(params), x, cfg)
    ((ref["y"] * dy).sum() + cfg.moe_aux_loss * ref["aux"] + cfg.moe_z_loss * ref["z"]).backward()
    grads = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in params.items()}
    return ref, x.grad, grads


MIXTRAL_DROPS = LayerCase(moe_config(experts=4, moe_topk=2, moe_capacity=0.5, activation="swiglu", moe_z_loss=0.3,
                                     moe_aux_loss=0.7), 2, 6, 11)
SWITCH_DROPS = LayerCase(moe_config(experts=3, moe_topk=1, moe_capacity=1.0, activation="relu", bias=False), 3, 5, 2)


@example(case=MIXTRAL_DROPS)
@example(case=SWITCH_DROPS)
@given(case=layer_cases())
def test_layer_equals_reference(case):
    cfg, b, s, seed = case
    params = layer_params(cfg, seed)
    shapes = N.gpt_shapes(replace(cfg, layers=1))
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: sh for k, (sh, _) in shapes.items() if
                                                               k.startswith(PRE)}
    x, dy = rand(seed + 10, b, s, cfg.hidden), rand(seed + 11, b, s, cfg.hidden)
    y, gx, grads, stats = run_layer(params, x, cfg, dy)
    ref, want_gx, want_grads = run_reference(params, x, cfg, dy)
    assert_close(y, ref["y"], "output")
    assert_close(gx, want_gx, "x gradient")
    assert_close(grads, want_grads, "weight gradients")
    assert set(stats) == {(0, 0)}
    st_ = stats[(0, 0)]
    assert_close(st_.aux, ref["aux"].detach(), "stats.aux")
    assert_close(st_.z, ref["z"].detach(), "stats.z")
    assert torch.equal(st_.load, ref["load"]), (st_.load, ref["load"])
    assert int(st_.dropped) == ref["dropped"] and st_.choices == b * s * cfg.moe_topk, (st_, ref["dropped"])
    if case in (MIXTRAL_DROPS, SWITCH_DROPS):
        assert ref["dropped"] > 0  # the hand-picked cases do drop


def test_aux_loss_is_float64_exact():
    """s = 5, k = 1: f_i = n/5 is not a float32 number, so a float32 f_i would show at ~1e-8 (it did: route()
    divided an integer tensor by an int, which torch makes float32)."""
    cfg = moe_config(experts=3, moe_topk=1, moe_aux_loss=0.5)
    params = layer_params(cfg, 2)
    x = rand(12, 3, 5, cfg.hidden)
    _, _, _, stats = run_layer(params, x, cfg, torch.zeros_like(x))
    assert_close(stats[(0, 0)].aux, ref_moe(ref_weights(params), x, cfg)["aux"], "aux")


def test_eval_and_no_grad_leave_the_aux_out():
    """training=False: no aux gradient (the router gets the main loss's gradient only)."""
    cfg = MIXTRAL_DROPS.cfg
    params = {k: v.requires_grad_(True) for k, v in layer_params(cfg, 5).items()}
    x, dy = rand(1, 2, 6, cfg.hidden), rand(2, 2, 6, cfg.hidden)
    y = N.moe_mlp(params, PRE, x, cfg, SERIAL, layer=0, training=False)
    (y * dy).sum().backward()
    ref_p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    (ref_moe(ref_weights(ref_p), x, cfg)["y"] * dy).sum().backward()
    assert_close({k: v.grad for k, v in params.items()}, {k: v.grad for k, v in ref_p.items()}, "eval grads")


# ---------------------------------------------------------------------------------------------------
# 2. Capacity drops
# ---------------------------------------------------------------------------------------------------


@given(data=st.data())
def test_capacity_keep_is_the_slot_major_rule(data):
    E = data.draw(st.sampled_from([2, 3, 4, 8]), label="E")
    k = data.draw(st.sampled_from([k for k in (1, 2, 3) if k <= E]), label="k")
    b, s = data.draw(st.integers(1, 3), label="b"), data.draw(st.integers(1, 9), label="s")
    c = data.draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0]), label="capacity")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    idx = rand(seed, b, s, E).argsort(-1)[..., :k]  # k distinct experts per token, as top-k gives
    want = ref_keep(idx, E, c)
    assert torch.equal(N.capacity_keep(idx, E, c), want)
    for split in range(1, b):  # the rule reads one sequence: any cut of the rows drops the same choices
        parts = torch.cat([N.capacity_keep(idx[:split], E, c), N.capacity_keep(idx[split:], E, c)])
        assert torch.equal(parts, want)


def crowded(cfg, b, s, seed):
    """Inputs whose every token ranks expert 0 first and expert 1 second (feature 0 is large and the router
    reads it with weights 3, 2, 0, -1, ...)."""
    params = layer_params(cfg, seed)
    router = 0.01 * rand(seed + 5, cfg.experts, cfg.hidden)
    router[:, 0] = torch.tensor([3.0, 2.0] + [-float(i) for i in range(cfg.experts - 2)])
    params[f"{PRE}.router.weight"] = router
    x = rand(seed + 6, b, s, cfg.hidden)
    x[..., 0] = 5.0
    return params, x


@pytest.mark.parametrize("k", [1, 2])
def test_a_token_with_every_choice_dropped_gets_exactly_zero(k):
    """s = 8, E = 4, c = 1: C = ceil(8k/4) = 2k. All first choices go to expert 0, all second to expert 1:
    tokens 2k.. of every sequence lose all their choices. Their output is exactly 0 and, with no aux/z
    loss, so is their input gradient; the other tokens' output is not 0."""
    cfg = moe_config(experts=4, moe_topk=k, moe_capacity=1.0, moe_aux_loss=0.0)
    b, s = 2, 8
    params, x = crowded(cfg, b, s, 3)
    dy = rand(9, b, s, cfg.hidden)
    y, gx, _, stats = run_layer(params, x, cfg, dy)
    ref = ref_moe(ref_weights(params), x, cfg)
    assert (ref["idx"][..., 0] == 0).all() and (k == 1 or (ref["idx"][..., 1] == 1).all())
    cut = 2 * k
    assert torch.equal(y[:, cut:], torch.zeros_like(y[:, cut:]))
    assert torch.equal(gx[:, cut:], torch.zeros_like(gx[:, cut:]))
    assert (y[:, :cut].abs().sum(-1) > 0).all()
    assert int(stats[(0, 0)].dropped) == b * (s - cut) * k == ref["dropped"]
    assert_close(y, ref["y"], "output")


@given(case=layer_cases(capacities=(0.5, 1.0, 1.5)))
def test_drops_do_not_depend_on_the_rows_a_shard_holds(case):
    """The layer on any cut of the batch's rows (a dp shard, a microbatch) gives the full batch's output rows
    and drops as many choices in total."""
    cfg, b, s, seed = case
    b = max(b, 2)
    params = layer_params(cfg, seed)
    x = rand(seed + 10, b, s, cfg.hidden)
    whole = N.moe_mlp(params, PRE, x, cfg, SERIAL, layer=0, moe=(m0 := N.MoE()))
    cut = 1 + seed % (b - 1)
    parts = [(N.moe_mlp(params, PRE, x[rows], cfg, SERIAL, layer=0, moe=(m := N.MoE())), m)
             for rows in (slice(0, cut), slice(cut, b))]
    assert_close(torch.cat([p[0] for p in parts]), whole, "shards vs whole")
    assert sum(int(p[1].stats[(0, 0)].dropped) for p in parts) == int(m0.stats[(0, 0)].dropped)
    assert int(m0.stats[(0, 0)].dropped) == ref_moe(ref_weights(params), x, cfg)["dropped"]


def small_gpt(**kw) -> N.GPTConfig:
    base = dict(vocab_size=13, vocab_multiple=4, max_seq=8, layers=2, hidden=8, heads=4, ffn=8, experts=4,
                moe_topk=2, init_std=0.3, moe_aux_loss=0.3, moe_z_loss=0.2)
    return N.GPTConfig(**(base | kw))


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_gpt_loss_adds_the_weighted_aux_and_its_gradient_is_exact(capacity):
    """gpt_loss(training=True) = LM loss + Σ_layers (w_aux·aux + w_z·z) (the stats' values), and its backward
    is the gradient of that number: a central finite difference along a random direction matches."""
    cfg = small_gpt(moe_capacity=capacity, moe_every=1)
    full = model_params(cfg, 4)
    ids, tg = randint(1, cfg.vocab_size, 3, 6), randint(2, cfg.vocab_size, 3, 6)
    params = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    moe = N.MoE()
    loss = N.gpt_loss(params, ids, tg, cfg, SERIAL, moe=moe)
    loss.backward()
    lm = N.gpt_loss(full, ids, tg, cfg, SERIAL, training=False)
    assert set(moe.stats) == {(0, 0), (1, 0)}
    extra = sum(cfg.moe_aux_loss * s.aux + cfg.moe_z_loss * s.z for s in moe.stats.values())
    assert_close(loss.detach(), lm + extra, "loss = lm + weighted aux")
    assert extra > 1e-3
    direction = {k: rand(100 + i, *v.shape) for i, (k, v) in enumerate(full.items())}
    eps = 1e-6
    f = lambda t: N.gpt_loss({k: v + t * eps * direction[k] for k, v in full.items()}, ids, tg, cfg, SERIAL)
    numeric = (f(1) - f(-1)) / (2 * eps)
    analytic = sum((params[k].grad * direction[k]).sum() for k in full)
    assert_close(analytic, numeric, "directional derivative", dict(rtol=1e-6, atol=1e-8))
    # the aux part alone is not negligible in that derivative: without it the check would fail
    cfg0 = replace(cfg, moe_aux_loss=0.0, moe_z_loss=0.0)
    f0 = lambda t: N.gpt_loss({k: v + t * eps * direction[k] for k, v in full.items()}, ids, tg, cfg0, SERIAL)
    assert abs(float((f0(1) - f0(-1)) / (2 * eps) - numeric)) > 1e-4


# ---------------------------------------------------------------------------------------------------
# 3. Layouts: (tp, ep, sp) on the worker pools equal the serial full-batch run
# ---------------------------------------------------------------------------------------------------


def my_rows(mesh, *tensors):
    """This dp rank's rows of each global-batch tensor: dp_rank·b onwards."""
    b = tensors[0].shape[0] // mesh.dp
    return [t[mesh.dp_rank * b: (mesh.dp_rank + 1) * b] for t in tensors]


def local_params(full, specs, mesh) -> dict:
    return {k: v.requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}


def dp_mean_grads(params: dict, specs: dict, mesh) -> dict:
    """The brief's reduction: dense gradients all-reduced over dp, experts' over edp, all divided by dp."""
    return {k: P.all_reduce(v.grad, mesh, "edp" if isinstance(specs[k], P.Experts) else "dp") / mesh.dp
            for k, v in params.items()}


def step_task(mesh, cfg, full, ids, tg, seed):
    specs = N.gpt_specs(cfg)
    params = local_params(full, specs, mesh)
    ids, tg = my_rows(mesh, ids, tg)
    moe = N.MoE()
    loss = N.gpt_loss(params, ids, tg, cfg, mesh, seed=seed, moe=moe)
    loss.backward()
    return dict(loss=P.all_reduce(loss.detach(), mesh, "dp") / mesh.dp,
                grads=P.unshard(dp_mean_grads(params, specs, mesh), specs, mesh), tp_rank=mesh.tp_rank,
                stats={layer: (s.aux, s.load, int(s.dropped)) for (layer, _), s in moe.stats.items()})


class GptCase(NamedTuple):
    tp: int
    ep: int
    cfg: N.GPTConfig
    rows: int
    s: int
    seed: int


@st.composite
def gpt_cases(draw, world: int, layouts):
    tp, ep = draw(st.sampled_from(layouts))
    dp = world // tp
    sp = tp > 1 and draw(st.booleans())
    s = tp * draw(st.integers(1, 8 // tp)) if tp > 1 else draw(st.integers(2, 8))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    cfg = small_gpt(experts=draw(st.sampled_from([e for e in (4, 8) if e % ep == 0])),
                    moe_topk=draw(st.sampled_from([1, 2])), moe_capacity=draw(st.sampled_from([None, 1.0, 1.5])),
                    moe_every=draw(st.sampled_from([1, 2])), activation=draw(st.sampled_from(["gelu", "swiglu"])),
                    hidden_dropout=dropout, sequence_parallel=sp, bias=draw(st.booleans()),
                    tie_embeddings=draw(st.booleans()), moe_aux_loss=draw(st.sampled_from([0.0, 0.01, 0.5])),
                    moe_z_loss=draw(st.sampled_from([0.0, 0.1])))
    return GptCase(tp, ep, cfg, dp * draw(st.integers(1, 2)), s, draw(st.integers(0, 2**16)))


def check_gpt_case(pool, case: GptCase):
    cfg, what = case.cfg, f"tp={case.tp} ep={case.ep}"
    full = model_params(cfg, case.seed)
    ids = randint(case.seed + 1, cfg.vocab_size, case.rows, case.s)
    tg = randint(case.seed + 2, cfg.vocab_size, case.rows, case.s)
    params = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    moe = N.MoE()
    loss = N.gpt_loss(params, ids, tg, replace(cfg, sequence_parallel=False), SERIAL, seed=case.seed, moe=moe)
    loss.backward()
    want = {k: v.grad for k, v in params.items()}
    results = pool.run(step_task, cfg, full, ids, tg, case.seed, tp=case.tp, ep=case.ep)
    for rank, r in enumerate(results):
        assert_close(r["loss"], loss.detach(), f"{what}: loss on rank {rank}")
        assert_close(r["grads"], want, f"{what}: gradients on rank {rank}")
    firsts = [r["stats"] for r in results if r["tp_rank"] == 0]  # one per dp rank, its own rows
    assert set(firsts[0]) == {i for i in range(cfg.layers) if cfg.is_moe(i)}
    for (layer, _), (aux, _, load, dropped, _) in moe.stats.items():
        assert_close(sum(f[layer][0] for f in firsts) / len(firsts), aux, f"{what}: aux of layer {layer}")
        assert torch.equal(sum(f[layer][1] for f in firsts), load), what
        assert sum(f[layer][2] for f in firsts) == int(dropped), what


LAYOUTS4 = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]  # (tp, ep) on 4 ranks
LAYOUTS8 = [(2, 2), (2, 4), (1, 8)]

EVERYTHING4 = GptCase(2, 2, small_gpt(experts=4, moe_topk=2, moe_capacity=1.0, moe_every=1, activation="swiglu",
                                      hidden_dropout=0.1, sequence_parallel=True, tie_embeddings=False), 4, 6, 21)
EP4_DROPLESS = GptCase(1, 4, small_gpt(experts=8, moe_topk=1, moe_every=2, moe_z_loss=0.1), 4, 5, 8)


@example(case=EVERYTHING4)
@example(case=EP4_DROPLESS)
@given(case=gpt_cases(4, LAYOUTS4))
def test_layouts_equal_serial(pool, case):
    check_gpt_case(pool, case)


@settings(max_examples=3)
@example(case=GptCase(2, 4, small_gpt(experts=8, moe_topk=2, moe_capacity=1.5, sequence_parallel=True,
                                      hidden_dropout=0.1), 4, 4, 5))
@given(case=gpt_cases(8, LAYOUTS8))
def test_layouts_equal_serial_on_8_ranks(pool8, case):
    check_gpt_case(pool8, case)


# ---------------------------------------------------------------------------------------------------
# 4. Communication of one MoE layer: the all-to-alls over ep
# ---------------------------------------------------------------------------------------------------


def layer_task(mesh, cfg, params, x, dy):
    """moe_mlp on this dp rank's rows (its tp shard of the sequence under sequence parallel), forward and
    backward, under count_comms; the gradients summed (not averaged) over dp / edp."""
    specs = {k: v for k, v in N.gpt_specs(cfg).items() if k.startswith(PRE)}
    loc = local_params(params, specs, mesh)
    x, dy = my_rows(mesh, x, dy)
    if cfg.sequence_parallel and mesh.tp > 1:
        x, dy = (t.chunk(mesh.tp, 1)[mesh.tp_rank] for t in (x, dy))
    x = x.clone().requires_grad_(True)
    with P.count_comms() as records:
        y = N.moe_mlp(loc, PRE, x, cfg, mesh, layer=0, moe=N.MoE(), training=True)
        (y * dy).sum().backward()
    grads = {k: P.all_reduce(v.grad, mesh, "edp" if isinstance(specs[k], P.Experts) else "dp")
             for k, v in loc.items()}
    return dict(a2a=[c for c in records if c["op"] == "all_to_all"], y=y.detach(), gx=x.grad, dp_rank=mesh.dp_rank,
                ep_rank=mesh.ep_rank, tp_rank=mesh.tp_rank, grads=P.unshard(grads, specs, mesh))


@given(data=st.data())
def test_all_to_all_moves_the_kept_choices_of_other_ranks_experts(pool, data):
    """Per MoE layer and rank, all on dim "ep", in order: forward, the count all-to-all (int64, E/ep·(ep−1)),
    the dispatch (sends h × n_out: this rank's kept choices whose expert another ep rank holds) and the combine
    (sends back h × n_in: the rows its experts ran for the other ep ranks' kept choices); backward, the
    combine's (h × n_out) and the dispatch's (h × n_in) again. None at ep = 1. (Each all-to-all records what
    the rank sends, parallel._all_to_all; summed over an ep group dispatch and combine move the same.) The
    output, the input's and the weights' gradients equal the reference's (the aux terms counted once per dp
    rank)."""
    tp, ep = data.draw(st.sampled_from(LAYOUTS4), label="tp, ep")
    dp = 4 // tp
    E = data.draw(st.sampled_from([e for e in (4, 8) if e % ep == 0]), label="E")
    cfg = moe_config(hidden=8, heads=4, ffn=4 * data.draw(st.integers(1, 2)), experts=E,
                     moe_topk=data.draw(st.sampled_from([1, 2]), label="k"),
                     moe_capacity=data.draw(st.sampled_from([None, 1.0]), label="capacity"),
                     sequence_parallel=tp > 1 and data.draw(st.booleans(), label="sp"),
                     activation=data.draw(st.sampled_from(["gelu", "swiglu"]), label="activation"),
                     moe_aux_loss=0.3, moe_z_loss=0.1)
    s, seed = data.draw(st.sampled_from([4, 8]), label="s"), data.draw(st.integers(0, 2**16), label="seed")
    b = dp * data.draw(st.integers(1, 2), label="rows per dp rank")
    params = layer_params(cfg, seed)
    x, dy = rand(seed + 1, b, s, cfg.hidden), rand(seed + 2, b, s, cfg.hidden)
    # the reference: Σ y·dy over the global batch, plus the aux terms of each dp rank's rows (mean over its
    # sequences: their sum over dp is dp × the global mean)
    ref_p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    xr = x.clone().requires_grad_(True)
    ref = ref_moe(ref_weights(ref_p), xr, cfg)
    ((ref["y"] * dy).sum() + dp * (cfg.moe_aux_loss * ref["aux"] + cfg.moe_z_loss * ref["z"])).backward()
    results = pool.run(layer_task, cfg, params, x, dy, tp=tp, ep=ep)
    rows = b // dp
    for r in results:
        what = f"tp={tp} ep={ep} E={E} rank (dp {r['dp_rank']}, tp {r['tp_rank']})"
        mine = slice(r["dp_rank"] * rows, (r["dp_rank"] + 1) * rows)
        seq = slice(None)
        if cfg.sequence_parallel and tp > 1:
            seq = slice(r["tp_rank"] * s // tp, (r["tp_rank"] + 1) * s // tp)
        assert_close(r["y"], ref["y"][mine, seq].detach(), f"{what}: output")
        assert_close(r["gx"], xr.grad[mine, seq], f"{what}: x gradient")
        assert_close(r["grads"], {k: v.grad for k, v in ref_p.items()}, f"{what}: weight gradients")
        home = ref["idx"] // (E // ep)  # the ep rank that holds each choice's expert
        kept = ref["keep"]
        n_out = int((kept[mine] & (home[mine] != r["ep_rank"])).sum())
        group = [d for d in range(dp) if d // ep == r["dp_rank"] // ep and d != r["dp_rank"]]  # my ep group
        n_in = sum(int((kept[d * rows:(d + 1) * rows] & (home[d * rows:(d + 1) * rows] == r["ep_rank"])).sum())
                   for d in group)
        got = [(c["phase"], str(c["dtype"]), c["elements"], c["dim"]) for c in r["a2a"]]
        h, f64 = cfg.hidden, "torch.float64"
        want = [] if ep == 1 else [("forward", "torch.int64", E // ep * (ep - 1), "ep"),
                                   ("forward", f64, h * n_out, "ep"), ("forward", f64, h * n_in, "ep"),
                                   ("backward", f64, h * n_out, "ep"), ("backward", f64, h * n_in, "ep")]
        assert got == want, f"{what}: {got} != {want}"


# ---------------------------------------------------------------------------------------------------
# 5. Training steps: GradBuckets / ZeRO-1 with expert buckets, against serial AdamW
# ---------------------------------------------------------------------------------------------------



def train_task(mesh, cfg, full, batches, zero, bucket_mb):
    specs = N.gpt_specs(cfg)
    params = local_params(full, specs, mesh)
    buckets = P.GradBuckets(params, mesh, bucket_mb=bucket_mb, zero=zero, experts=expert_names(specs))
    opt = P.ZeroAdamW(params, buckets, specs, mesh, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY) if zero \
        else adamw(params)
    losses, norms = [], []
    for step, (ids, tg) in enumerate(batches):
        buckets.zero_grad()
        ids, tg = my_rows(mesh, ids, tg)
        loss = N.gpt_loss(params, ids, tg, cfg, mesh, seed=10 + step)
        loss.backward()
        buckets.finish()
        norms.append(opt.clip_grad_norm(CLIP) if zero else P.clip_grad_norm(params, specs, mesh, CLIP))
        opt.step()
        losses.append(P.all_reduce(loss.detach(), mesh, "dp") / mesh.dp)
    return dict(losses=torch.stack(losses), norms=torch.stack(norms),
                params=P.unshard({k: p.detach() for k, p in params.items()}, specs, mesh))


@pytest.mark.parametrize("tp, ep, zero, bucket_mb", [(1, 2, True, 1e-5), (1, 2, False, 25.0), (2, 2, True, 25.0),
                                                     (2, 2, False, 1e-5), (1, 4, True, 1e-5), (1, 4, False, 1e-5)])
def test_training_steps_equal_serial_adamw(pool, tp, ep, zero, bucket_mb):
    cfg = small_gpt(experts=4, moe_topk=2, moe_capacity=1.0, moe_every=1, hidden_dropout=0.1,
                    sequence_parallel=tp > 1, tie_embeddings=False)
    full = model_params(cfg, 3)
    batches = [(randint(20 + i, cfg.vocab_size, 4, 6), randint(30 + i, cfg.vocab_size, 4, 6)) for i in range(STEPS)]
    want_losses, want_norms, want = serial_gpt_training(cfg, full, batches)
    assert (want_norms > CLIP).all(), want_norms  # the clip does something at every step
    what = f"tp={tp} ep={ep} {'zero' if zero else 'adamw'} bucket {bucket_mb} MB"
    for rank, r in enumerate(pool.run(train_task, cfg, full, batches, zero, bucket_mb, tp=tp, ep=ep)):
        assert_close(r["losses"], want_losses, f"{what}: losses on rank {rank}")
        assert_close(r["norms"], want_norms, f"{what}: grad norms on rank {rank}")
        assert_close(r["params"], want, f"{what}: parameters after {STEPS} steps on rank {rank}")


# ---------------------------------------------------------------------------------------------------
# 6. Pipeline: a MoE GPT over 2 stages
# ---------------------------------------------------------------------------------------------------


def check_pipeline_results(results, loss, lm, params, what):
    """Every rank's loss and LM loss are the serial ones; the ranks' gradients, merged, are the serial params'."""
    for rank, r in enumerate(results):
        assert_close(r["loss"], loss.detach(), f"{what}: loss on rank {rank}")
        assert_close(r["lm"], lm, f"{what}: lm loss on rank {rank}")
    assert_close(merged([r["grads"] for r in results], what), {k: v.grad for k, v in params.items()},
                 f"{what}: gradients")


def pipeline_task(mesh, cfg, full, ids, tg, m, seed, loss_mask=None):
    specs = N.gpt_specs(cfg)
    local = P.shard(full, specs, mesh)
    params = {k: t.clone().requires_grad_(True) for k, t in N.stage_params(local, cfg, mesh).items()}
    buckets = P.GradBuckets(params, mesh, accumulations=m, tied=N.tied_copies(cfg, mesh),
                            experts=expert_names({k: specs[k] for k in params}))
    batch = dict(ids=ids, targets=tg) | ({} if loss_mask is None else dict(loss_mask=loss_mask))
    out = N.pipeline_step("gpt", params, dict(zip(batch, my_rows(mesh, *batch.values()))), cfg, mesh,
                          schedule="1f1b", microbatches=m, seed=seed)
    buckets.finish()
    return dict(loss=P.all_reduce(out["loss"].detach(), mesh, "dp") / mesh.dp,
                lm=P.all_reduce(out["lm"].detach(), mesh, "dp") / mesh.dp,
                grads={k: P.unshard_tensor(p.grad, specs[k], mesh) for k, p in params.items()})


@pytest.mark.parametrize("tp, ep", [(1, 2), (2, 1), (1, 1)])
def test_pipeline_step_equals_serial(pool, tp, ep):
    """pp = 2, 4 layers, MoE every other layer (layers 0 and 2: one per stage), 1F1B over 2 microbatches,
    capacity drops and dropout: the loss (LM + aux over both stages), the LM loss alone, and every gradient
    (the tied embedding's two copies included) equal the serial run on the global batch."""
    cfg = small_gpt(layers=4, experts=4, moe_topk=2, moe_capacity=1.0, moe_every=2, hidden_dropout=0.1,
                    sequence_parallel=tp > 1)
    full = model_params(cfg, 6)
    dp, m = 4 // (2 * tp), 2
    ids, tg = randint(1, cfg.vocab_size, 2 * dp, 4), randint(2, cfg.vocab_size, 2 * dp, 4)
    params = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    loss = N.gpt_loss(params, ids, tg, replace(cfg, sequence_parallel=False), SERIAL, seed=4)
    loss.backward()
    lm = N.lm_loss(N.gpt_logits(full, ids, replace(cfg, sequence_parallel=False), SERIAL, seed=4, training=True),
                   tg, cfg, SERIAL)
    results = pool.run(pipeline_task, cfg, full, ids, tg, m, 4, tp=tp, pp=2, ep=ep)
    check_pipeline_results(results, loss, lm, params, f"pp=2 tp={tp} ep={ep}")


# ---------------------------------------------------------------------------------------------------
# 7. Bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, words", [
    (dict(experts=2, moe_topk=3), ["moe_topk=3", "experts=2"]),
    (dict(experts=2, moe_capacity=0), ["moe_capacity", "0"]),
    (dict(experts=2, moe_capacity=-1.0), ["moe_capacity", "-1"]),
    (dict(experts=2, moe_aux_loss=-0.1), ["moe_aux_loss", "-0.1"]),
    (dict(experts=2, moe_z_loss=-1.0), ["moe_z_loss", "-1"]),
    (dict(experts=-1), ["experts", "-1"]),
    (dict(experts=2, moe_every=0), ["moe_every", "0"]),
])
def test_bad_config_is_a_value_error_naming_it(kw, words):
    with pytest.raises(ValueError) as e:
        moe_config(**kw)
    assert all(w in str(e.value) for w in words), str(e.value)


def bad_layout_case(mesh):
    ok = small_gpt(experts=4)
    three, dense = replace(ok, experts=3, moe_topk=1), replace(ok, experts=0)
    ids = randint(1, ok.vocab_size, 2, 4)
    messages = value_errors_then_in_step([
        lambda: N.gpt_loss(N.init_gpt(three, 0, torch.float64), ids, ids, three, mesh),
        lambda: N.pipeline_step("gpt", N.init_gpt(three, 0, torch.float64), dict(ids=ids, targets=ids), three,
                                mesh),
        lambda: N.gpt_loss(N.init_gpt(dense, 0, torch.float64), ids, ids, dense, mesh),
        lambda: P.Mesh.build(ep=3),
        lambda: P.Mesh.build(ep=0),
    ], mesh)
    return messages + [P.all_reduce(torch.ones(1), mesh, "dp").item()]  # every dp rank in step too


def test_bad_layout_raises_on_every_rank_before_any_collective(pool):
    want = ["experts=3 is not divisible by ep=2", "experts=3 is not divisible by ep=2",
            "ep=2 needs a mixture-of-experts model (experts > 0), got experts=0",
            "ep=3 does not divide the data-parallel ranks dp=4", "ep must be an integer >= 1, got ep=0", 2.0, 2.0]
    for rank, messages in enumerate(pool.run(bad_layout_case, tp=2, ep=2)):
        for got, expected in zip(messages, want, strict=True):
            ok = got == expected if isinstance(expected, float) else (got is not None and expected in got)
            assert ok, f"rank {rank}: {got!r}, want {expected!r}"


# ---------------------------------------------------------------------------------------------------
# 8. Pipeline with a loss mask: the microbatches' LM shares follow the counted tokens, the aux losses'
#    follow the rows (the aux loss is a mean over sequences, whatever the mask)
# ---------------------------------------------------------------------------------------------------


class MaskedPipelineCase(NamedTuple):
    tp: int
    ep: int
    m: int  # microbatches per replica, one row each
    s: int
    counts: tuple  # counted tokens of each global row (the loss mask); every replica counts one at least
    cfg: N.GPTConfig
    seed: int


@st.composite
def masked_pipeline_cases(draw):
    tp, ep = draw(st.sampled_from([(1, 2), (2, 1), (1, 1)]))
    m, s = draw(st.sampled_from([2, 4])), tp * draw(st.integers(2, 3))
    dp = 4 // (2 * tp)
    counts = [draw(st.integers(0, s)) for _ in range(dp * m)]
    for d in range(dp):
        counts[d * m] = max(counts[d * m], 1)
    cfg = small_gpt(layers=2, experts=4, moe_topk=draw(st.sampled_from([1, 2])),
                    moe_capacity=draw(st.sampled_from([None, 1.0])), moe_every=1, max_seq=s,
                    hidden_dropout=draw(st.sampled_from([0.0, 0.1])), sequence_parallel=tp > 1 and draw(st.booleans()),
                    moe_aux_loss=draw(st.sampled_from([0.3, 1.0])), moe_z_loss=draw(st.sampled_from([0.0, 0.2])))
    return MaskedPipelineCase(tp, ep, m, s, tuple(counts), cfg, draw(st.integers(0, 2**16)))


# one counted token in each replica's first microbatch, all in its second: LM shares 1/7 and 6/7, rows 1/2 each
UNEQUAL_SHARES = MaskedPipelineCase(1, 2, 2, 6, (1, 6, 1, 6), small_gpt(layers=2, max_seq=6, moe_every=1,
                                                                       moe_aux_loss=1.0), 5)


@settings(max_examples=4)
@example(case=UNEQUAL_SHARES)
@given(case=masked_pipeline_cases())
def test_pipeline_step_with_a_loss_mask_equals_serial(pool, case):
    """pp = 2 (one MoE layer a stage), 1F1B, a loss mask that gives the microbatches unequal token shares:
    the loss (masked LM + aux), the LM loss and every gradient equal the serial run's. The serial mask weighs
    each replica's counted tokens 1 / (its count): one masked mean over the global batch is then the mean of
    the replicas' masked means, which is what dp averages."""
    tp, ep, m, s, counts, cfg, seed = case
    dp, rows = 4 // (2 * tp), len(counts)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.stack([torch.randperm(s, generator=gen) < c for c in counts]).double()
    weights = mask.clone()
    for replica in weights.chunk(dp):
        replica /= replica.sum()
    full = model_params(cfg, seed)
    ids, tg = randint(seed + 1, cfg.vocab_size, rows, s), randint(seed + 2, cfg.vocab_size, rows, s)
    serial = replace(cfg, sequence_parallel=False)
    params = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    loss = N.gpt_loss(params, ids, tg, serial, SERIAL, loss_mask=weights, seed=seed)
    loss.backward()
    lm = N.lm_loss(N.gpt_logits(full, ids, serial, SERIAL, seed=seed, training=True), tg, serial, SERIAL, weights)
    assert not torch.allclose(loss, lm), "the aux losses add nothing: the case cannot see their scale"
    results = pool.run(pipeline_task, cfg, full, ids, tg, m, seed, mask, tp=tp, pp=2, ep=ep)
    check_pipeline_results(results, loss, lm, params, f"{case}")
