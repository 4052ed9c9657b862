"""Misuse: no public function returns a silently wrong number for any input it accepts.

Each class of misuse is either refused with a ValueError that names the value (on every rank, before
any collective), or computed right:

1. loss_mask: a mask that merely broadcasts is refused; a right-shaped one gives the weighted mean;
2. public logits are -inf at every padded vocabulary column, so no argmax picks a padded id;
3. GPTConfig: every field with a wrong type or range is a ValueError naming the field;
4. a second derivative through a hand-written backward raises instead of being silently wrong;
5. generate() checks its arguments on every rank before any collective;
6. GPT-2 import/export: keys, shapes, paths, untied heads and one rank's shards;
7. tensor parallel over more ranks than kv heads (each kv head replicated) equals the serial model;
8. clip_grad_norm refuses a nan max_norm;
9. an attention mask is checked the same on the core and the SDPA path;
10. ids, labels and gold indices: an int64 (or int32) tensor of exactly the shape;
11. generate at a tiny temperature samples the argmax; search checks its queries on every replica;
12. BERT, T5 and the retrievers refuse cp > 1 in every entry point, on every rank;
13. pipeline_step checks the whole batch on every stage before anything is sent.
"""

import dataclasses
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from common import SERIAL, assert_close, jittered, rand, randint
from einops import rearrange
from harness import value_errors_then_in_step
from hypothesis import example, given
from hypothesis import strategies as st

import nanomeg as N
import parallel as P
from nanomeg import GPTConfig

# Names the old code lacks: looked up lazily, so this file still collects there and each test fails on
# its assertion, not on an import.
HeadGroups = getattr(P, "HeadGroups", None)

NAN, INF = float("nan"), float("inf")



def model_params(cfg: GPTConfig, seed: int) -> dict:
    """init_gpt's parameters with every norm weight and bias jittered (common.jittered)."""
    return jittered(N.init_gpt(cfg, seed, torch.float64), seed)




def raises_naming(call, *fragments):
    """call() raises ValueError whose message holds every fragment; returns the message."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not named in {message!r}"
    return message


TINY = GPTConfig(vocab_size=11, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2)


# ---------------------------------------------------------------------------------------------------
# 1. loss_mask: the targets' shape exactly, bool or float weights >= 0
# ---------------------------------------------------------------------------------------------------

B, S = 2, 3  # distinct, so that every shape below is told apart from the targets' (2, 3)


def loss_inputs(cfg=TINY, seed=0, smoothing=0.0):
    cfg = replace(cfg, label_smoothing=smoothing)
    params = model_params(cfg, seed)
    ids, targets = randint(seed, cfg.vocab_size, B, S), randint(seed + 1, cfg.vocab_size, B, S)
    logits = N.gpt_logits(params, ids, cfg, SERIAL)
    per_token = P.vocab_parallel_cross_entropy(logits, targets, SERIAL, vocab_size=cfg.vocab_size,
                                               label_smoothing=smoothing)  # [b, s]
    return cfg, params, ids, targets, logits, per_token


BROADCASTING_MASKS = {"[b, 1]": (B, 1), "[s]": (S,), "[1]": (1,), "[b, s, 1]": (B, S, 1), "[1, s]": (1, S)}


@pytest.mark.parametrize("shape", BROADCASTING_MASKS.values(), ids=BROADCASTING_MASKS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bool])
def test_loss_mask_that_only_broadcasts_is_refused_naming_both_shapes(shape, dtype):
    """Old code: losses * mask broadcast, and the mean was off by a factor (or over [b, s, s])."""
    cfg, params, ids, targets, logits, _ = loss_inputs()
    mask = torch.ones(shape, dtype=dtype)
    for call in (lambda: N.lm_loss(logits, targets, cfg, SERIAL, mask),
                 lambda: N.gpt_loss(params, ids, targets, cfg, SERIAL, loss_mask=mask, training=False)):
        raises_naming(call, "loss_mask", str(tuple(shape)), str((B, S)))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["bool", "float 0/1", "float weights"])
def test_right_shaped_mask_gives_the_weighted_mean_of_the_per_token_losses(kind, smoothing):
    """sum(loss * mask) / sum(mask), the per-token losses from vocab_parallel_cross_entropy. (Already right
    before the change: this pins it.)"""
    cfg, params, ids, targets, logits, per_token = loss_inputs(smoothing=smoothing)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    mask = {"bool": keep, "float 0/1": keep.double(),
            "float weights": torch.tensor([[0.5, 0.0, 2.0], [1.25, 0.0, 0.75]], dtype=torch.float64)}[kind]
    weights = mask.double()
    want = (per_token * weights).sum() / weights.sum()
    assert_close(N.lm_loss(logits, targets, cfg, SERIAL, mask), want, f"lm_loss, {kind} mask")
    assert_close(N.gpt_loss(params, ids, targets, cfg, SERIAL, loss_mask=mask, training=False), want,
                 f"gpt_loss, {kind} mask")
    if kind != "float weights":
        assert_close(N.lm_loss(logits, targets, cfg, SERIAL, mask), per_token[keep].mean(), "the kept tokens' mean")
    assert_close(N.lm_loss(logits, targets, cfg, SERIAL, None), per_token.mean(), "no mask")


@pytest.mark.parametrize("weight", [0.1, 0.25, 0.5])
def test_float_mask_whose_weights_sum_below_one_gives_the_weighted_mean(weight):
    """lm_loss's docstring: sum(loss * mask) / sum(mask). A float mask of small weights (sum < 1) is
    accepted, so it must give that number: every token weighted the same is the plain mean."""
    cfg, params, ids, targets, logits, per_token = loss_inputs()
    mask = torch.full((B, S), weight, dtype=torch.float64)
    one = torch.zeros(B, S, dtype=torch.float64)
    one[1, 2] = weight  # a single token with weight < 1: the loss is that token's loss
    assert_close(N.lm_loss(logits, targets, cfg, SERIAL, mask), per_token.mean(), f"every weight {weight}")
    assert_close(N.lm_loss(logits, targets, cfg, SERIAL, one), per_token[1, 2], f"one token of weight {weight}")


@pytest.mark.parametrize("mask, fragment", [
    (torch.ones(B, S, dtype=torch.int64), "int64"),
    (torch.ones(B, S, dtype=torch.int32), "int32"),
    (torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64), ">= 0"),
    (torch.tensor([[1.0, NAN, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64), "finite"),
    (torch.tensor([[1.0, INF, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64), "finite"),
], ids=["int64", "int32", "negative", "nan", "inf"])
def test_loss_mask_of_ints_or_bad_weights_is_refused(mask, fragment):
    cfg, params, ids, targets, logits, _ = loss_inputs()
    raises_naming(lambda: N.lm_loss(logits, targets, cfg, SERIAL, mask), "loss_mask", fragment)
    raises_naming(lambda: N.gpt_loss(params, ids, targets, cfg, SERIAL, loss_mask=mask), "loss_mask", fragment)


# ---------------------------------------------------------------------------------------------------
# 2. Public logits are honest: -inf at every padded vocabulary column
# ---------------------------------------------------------------------------------------------------


def public_logits_case(mesh, cfg, full, ids):
    """gpt_logits and lm_logits (after embed and the layers) of this rank's shards, gathered over tp."""
    params = P.shard(full, N.gpt_specs(cfg), mesh)
    x = N.run_layers(params, N.embed(params, ids, cfg, mesh), cfg, mesh)
    return dict(gpt=P.all_gather(N.gpt_logits(params, ids, cfg, mesh), mesh, "tp", -1),
                lm=P.all_gather(N.lm_logits(params, x, cfg, mesh), mesh, "tp", -1))


# vocab 5 padded to 16: at tp=4 rank 1 holds real id 4 and padded 5..7, ranks 2 and 3 padding only
PADDED = GPTConfig(vocab_size=5, vocab_multiple=16, max_seq=8, layers=1, hidden=16, heads=4)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("untied", [False, True])
def test_public_logits_are_minus_inf_at_every_padded_column(pool, tp, untied):
    v = PADDED.vocab_size
    for cfg in [replace(PADDED, tie_embeddings=not untied), replace(PADDED, tie_embeddings=not untied,
                                                                    sequence_parallel=True)]:
        full, ids = model_params(cfg, 3), randint(3, v, 2, 4)
        serial = public_logits_case(SERIAL, replace(cfg, sequence_parallel=False), full, ids)
        for who, got in [("serial", serial)] + [(f"rank {r}", g) for r, g in
                                               enumerate(pool.run(public_logits_case, cfg, full, ids, tp=tp))]:
            for name, logits in got.items():
                assert logits.shape == (2, 4, cfg.padded_vocab), (who, name)
                assert (logits[..., v:] == -INF).all(), f"{who} (tp={tp}): {name} logits at padded ids are not -inf"
                assert torch.isfinite(logits[..., :v]).all(), f"{who}: {name} real logits"
                assert_close(logits, serial[name], f"{who} (tp={tp}, sp={cfg.sequence_parallel}) {name}")


def imported_like_gpt2(seed=0):
    """A GPT-2-shaped model as from_hf_gpt2 builds it (padded embedding rows are zeros) whose real logits
    are all negative: the final LayerNorm's gain is 0, so its output is its bias c for every token, and
    every real row w of the tied embedding has w.c < 0. A padded row scores 0 and wins every argmax
    unless the logits mask it."""
    cfg = GPTConfig(vocab_size=13, vocab_multiple=8, max_seq=8, layers=1, hidden=16, heads=2,
                    activation="gelu_tanh")
    full = model_params(cfg, seed)
    c = rand(seed + 7, cfg.hidden)
    word = rand(seed + 8, cfg.vocab_size, cfg.hidden)
    margin = 0.5 + rand(seed + 9, cfg.vocab_size).abs()  # each real row: w.c = -margin < 0
    word = word - ((word @ c) + margin)[:, None] * c / (c @ c)
    full["embed.word"] = torch.cat([word, torch.zeros(cfg.padded_vocab - cfg.vocab_size, cfg.hidden,
                                                      dtype=torch.float64)])
    full["final_norm.weight"], full["final_norm.bias"] = torch.zeros(cfg.hidden, dtype=torch.float64), c
    return cfg, full


def test_argmax_never_picks_a_padded_id_of_an_imported_gpt2_like_model(pool):
    cfg, full = imported_like_gpt2()
    v, ids = cfg.vocab_size, randint(1, cfg.vocab_size, 2, 5)
    unmasked = N.norm(full, "final_norm", N.embed(full, ids, cfg, SERIAL), cfg, SERIAL) @ full["embed.word"].t()
    assert (unmasked[..., :v] < 0).all() and (unmasked.argmax(-1) >= v).all(), "the trap is meant to be set"
    serial = public_logits_case(SERIAL, cfg, full, ids)
    for who, got in [("serial", serial)] + [(f"rank {r}", g) for r, g in
                                           enumerate(pool.run(public_logits_case, cfg, full, ids, tp=2))]:
        for name, logits in got.items():
            assert (logits.argmax(-1) < v).all(), f"{who}: {name} logits let a padded id win the argmax"
            assert (logits.softmax(-1)[..., v:] == 0).all(), f"{who}: {name} softmax puts mass on padded ids"
            assert_close(logits[..., :v], unmasked[..., :v], f"{who}: {name} real logits")
    greedy = N.generate(full, ids[:, :2], cfg, SERIAL, 3, temperature=0)
    assert (greedy < v).all()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_padded_mask_changes_neither_the_loss_nor_the_gradients(tie, smoothing):
    """Against torch's cross-entropy of the unmasked logits over the real vocabulary: the same loss and
    gradients, and the padded rows of the output layer get exactly zero gradient."""
    cfg = replace(PADDED, tie_embeddings=tie, label_smoothing=smoothing, layers=2)
    full, v = model_params(cfg, 5), cfg.vocab_size
    ids, targets = randint(5, v, 2, 4), randint(6, v, 2, 4)
    head = "embed.word" if tie else "head.weight"

    def grads(loss_fn):
        params = {k: p.clone().requires_grad_(True) for k, p in full.items()}
        loss = loss_fn(params)
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in params.items()}

    def reference(params):
        x = N.norm(params, "final_norm", N.run_layers(params, N.embed(params, ids, cfg, SERIAL), cfg, SERIAL),
                   cfg, SERIAL)
        raw = x @ params[head].t()  # [b, s, padded vocab], no mask
        return F.cross_entropy(raw[..., :v].flatten(0, 1), targets.flatten(), label_smoothing=smoothing)

    got = grads(lambda params: N.gpt_loss(params, ids, targets, cfg, SERIAL, training=False))
    want = grads(reference)
    assert_close(got, want, "gpt_loss vs cross-entropy of the unmasked real logits")
    assert torch.isfinite(got[0])
    assert not got[1][head][v:].any(), f"padded rows of {head} got a gradient"


# ---------------------------------------------------------------------------------------------------
# 3. Config validation: one place, the field named
# ---------------------------------------------------------------------------------------------------

BASE = dict(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2)

BAD_FIELDS = [
    ("vocab_size", 10.0), ("vocab_size", True), ("vocab_size", None), ("vocab_size", 0), ("vocab_size", "10"),
    ("max_seq", 8.5), ("max_seq", None), ("max_seq", 0), ("max_seq", -8),
    ("layers", 1.5), ("layers", True), ("layers", 1.0), ("layers", 0),
    ("hidden", 8.0), ("hidden", None), ("hidden", "8"), ("hidden", False),
    ("heads", 2.0), ("heads", True), ("heads", None), ("heads", 0),
    ("kv_heads", 1.0), ("kv_heads", True), ("kv_heads", 0), ("kv_heads", -2),
    ("ffn", 16.0), ("ffn", True), ("ffn", 0), ("ffn", -4),
    ("norm", 1), ("norm", None), ("norm", "batchnorm"),
    ("norm_eps", 0), ("norm_eps", 0.0), ("norm_eps", -1), ("norm_eps", NAN), ("norm_eps", INF), ("norm_eps", True),
    ("norm_eps", "1e-5"), ("norm_eps", None),
    ("zero_centered_gamma", 1), ("zero_centered_gamma", "no"), ("zero_centered_gamma", None),
    ("activation", None), ("activation", "tanh"), ("activation", 0),
    ("position", None), ("position", "alibi"),
    ("rope_base", 0), ("rope_base", -1), ("rope_base", NAN), ("rope_base", INF), ("rope_base", None),
    ("bias", "no"), ("bias", 1), ("bias", 0), ("bias", None),
    ("tie_embeddings", "yes"), ("tie_embeddings", 0),
    ("residual_post_norm", 1), ("residual_post_norm", "false"),
    ("hidden_dropout", NAN), ("hidden_dropout", 1.0), ("hidden_dropout", -0.1), ("hidden_dropout", None),
    ("attention_dropout", NAN), ("attention_dropout", 1.0), ("attention_dropout", True),
    ("attention", 1), ("attention", "flash"),
    ("recompute", True), ("recompute", "some"), ("recompute", None),
    ("sequence_parallel", 1), ("sequence_parallel", "yes"), ("sequence_parallel", None),
    ("init_std", NAN), ("init_std", -0.1), ("init_std", INF), ("init_std", None), ("init_std", "0.02"),
    ("vocab_multiple", 0), ("vocab_multiple", 8.0), ("vocab_multiple", True),
    ("label_smoothing", NAN), ("label_smoothing", 1.0), ("label_smoothing", -0.5), ("label_smoothing", INF),
    ("norm_order", None), ("norm_order", "mid"), ("norm_order", 0),
    ("type_vocab", -1), ("type_vocab", 1.5), ("type_vocab", True), ("type_vocab", None),
    ("kv_channels", 0), ("kv_channels", 4.0), ("kv_channels", True),
    ("rel_buckets", 2), ("rel_buckets", 32.0), ("rel_buckets", None),
    ("rel_max_distance", 0), ("rel_max_distance", 128.0), ("rel_max_distance", None),
    ("scale_attention", 1), ("scale_attention", None),
    ("scale_output", 0), ("scale_output", "no"),
    ("experts", -1), ("experts", 2.0), ("experts", True), ("experts", None),
    ("moe_topk", 0), ("moe_topk", 1.5), ("moe_topk", None),
    ("moe_renormalize", 1), ("moe_renormalize", "yes"),
    ("moe_every", 0), ("moe_every", True),
    ("moe_capacity", 0), ("moe_capacity", -1.0), ("moe_capacity", NAN), ("moe_capacity", INF), ("moe_capacity", "1"),
    ("moe_aux_loss", -0.1), ("moe_aux_loss", NAN), ("moe_aux_loss", None),
    ("moe_z_loss", -1), ("moe_z_loss", INF),
]

GOOD_FIELDS = [
    ("init_std", 0), ("init_std", 0.0), ("norm_eps", 1e-12), ("norm_eps", 1), ("rope_base", 10000), ("rope_base", 0.5),
    ("kv_heads", None), ("kv_heads", 1), ("ffn", None), ("ffn", 1), ("hidden_dropout", 0), ("label_smoothing", 0.999),
    ("attention_dropout", 0.5), ("max_seq", 1), ("vocab_multiple", 1), ("type_vocab", 0),
    ("kv_channels", None), ("kv_channels", 3), ("rel_buckets", 4), ("activation", "relu"), ("activation", "geglu"),
    ("experts", 0), ("experts", 2), ("moe_capacity", None), ("moe_capacity", 0.25), ("moe_aux_loss", 0),
    ("moe_z_loss", 0), ("moe_every", 3), ("moe_renormalize", None), ("moe_renormalize", True),
]


def test_the_lists_cover_every_field_of_gptconfig():
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    assert {name for name, _ in BAD_FIELDS} == names, names ^ {name for name, _ in BAD_FIELDS}


@pytest.mark.parametrize("name, value", BAD_FIELDS, ids=[f"{n}={v!r}" for n, v in BAD_FIELDS])
def test_a_field_of_wrong_type_or_range_is_a_value_error_naming_it(name, value):
    with pytest.raises(ValueError) as info:
        GPTConfig(**{**BASE, name: value})
    assert re.search(rf"(?<![a-z_]){name}(?![a-z_])", str(info.value)), f"{name} not named in {str(info.value)!r}"


@pytest.mark.parametrize("name, value", GOOD_FIELDS, ids=[f"{n}={v!r}" for n, v in GOOD_FIELDS])
def test_valid_edge_values_are_accepted_and_give_a_finite_model(name, value):
    """(Accepted before the change too: this pins that the checks are not too strict.)"""
    cfg = GPTConfig(**{**BASE, name: value, **({"position": "rope"} if name == "rope_base" else {})})
    assert getattr(cfg, name) == value
    ids = randint(0, cfg.vocab_size, 1, min(4, cfg.max_seq))
    assert torch.isfinite(N.gpt_loss(N.init_gpt(cfg, 0, torch.float64), ids, ids, cfg, SERIAL, training=False))


# ---------------------------------------------------------------------------------------------------
# 4. Double backward through a hand-written backward raises
# ---------------------------------------------------------------------------------------------------


def test_cross_entropy_second_derivative_raises():
    """The loss squared, so the upstream gradient depends on the logits: old code differentiated the
    hand-written backward as if softmax were a constant and returned a wrong Hessian-vector product."""
    logits = rand(0, 2, 3, 7).requires_grad_(True)
    targets = randint(1, 5, 2, 3)
    loss = P.vocab_parallel_cross_entropy(logits, targets, SERIAL, vocab_size=5).pow(2).mean()
    with pytest.raises(RuntimeError):  # refused at create_graph=True already, or at the second backward
        (g,) = torch.autograd.grad(loss, logits, create_graph=True)
        g.pow(2).sum().backward()
    # weighted per-token losses, the weights being parameters, likewise
    weights = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    loss = (P.vocab_parallel_cross_entropy(logits, targets, SERIAL, vocab_size=5) * weights).sum()
    with pytest.raises(RuntimeError):
        (g,) = torch.autograd.grad(loss, logits, create_graph=True)
        g.pow(2).sum().backward()


def test_gradient_penalty_through_cross_entropy_is_right_or_raises():
    """A gradient penalty (d/dW |d loss / d x|^2, as in WGAN-GP or input-gradient regularisers) through
    the cross-entropy of x @ W^T. The upstream gradient of the mean is a constant, so the backward's own
    inputs need no grad, but its output (softmax - onehot) depends on W: a second derivative must either
    raise or equal torch's own cross-entropy's."""
    x, w, targets = rand(0, 2, 3, 4), rand(1, 7, 4), randint(2, 7, 2, 3)

    def penalty_grad(ce):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(ce(xs @ ws.t()), xs, create_graph=True)
        gx.pow(2).sum().backward()
        return ws.grad

    want = penalty_grad(lambda logits: F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    try:
        got = penalty_grad(lambda logits: P.vocab_parallel_cross_entropy(logits, targets, SERIAL).mean())
    except RuntimeError:
        return
    assert_close(got, want, "d/dW |d loss/dx|^2 through vocab_parallel_cross_entropy (silently wrong)")


def double_backward_case(mesh, x, w1, w2, sp, upstream):
    """x -> column-parallel w1 -> tanh -> row-parallel w2 -> y; d/dx of a loss with create_graph, then a
    second backward. Returns (the RuntimeError message of either, or None, in step)."""
    xs = (P.split(x, mesh, "tp", 1) if sp else x).clone().requires_grad_(True)
    w1s = P.split(w1, mesh, "tp", 0).clone().requires_grad_(True)
    w2s = P.split(w2, mesh, "tp", 1).clone().requires_grad_(True)
    h = torch.tanh(P.column_parallel_linear(xs, w1s, None, mesh, sequence_parallel=sp))
    y = P.row_parallel_linear(h, w2s, None, mesh, sequence_parallel=sp)
    loss = y.pow(2).sum() if upstream == "square" else (y * x.sum()).sum()
    try:
        (gx,) = torch.autograd.grad(loss, xs, create_graph=True)
        gx.pow(2).sum().backward()
        error = None
    except RuntimeError as e:
        error = str(e)
    return error, P.all_reduce(torch.ones(1), mesh, "tp").item()


@pytest.mark.parametrize("sp", [False, True])
def test_double_backward_through_a_column_row_parallel_pair_raises_on_every_rank(pool, sp):
    x, w1, w2 = rand(0, 2, 4, 6), rand(1, 8, 6), rand(2, 6, 8)
    for rank, (error, in_step) in enumerate(pool.run(double_backward_case, x, w1, w2, sp, "square", tp=2)):
        assert error is not None, f"rank {rank} (sp={sp}): a second derivative through the collectives returned"
        assert in_step == 2.0, f"rank {rank}: out of step"


# ---------------------------------------------------------------------------------------------------
# 5. generate() checks its arguments on every rank, before any collective
# ---------------------------------------------------------------------------------------------------

GEN = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2)
PROMPT = torch.tensor([[1, 2, 3]])

BAD_GENERATE = [  # (keyword overrides, fragments the message must hold)
    (dict(prompt=torch.zeros(1, 0, dtype=torch.int64)), ["prompt_ids", "(1, 0)"]),
    (dict(prompt=torch.zeros(0, 3, dtype=torch.int64)), ["prompt_ids", "(0, 3)"]),
    (dict(prompt=torch.tensor([1, 2, 3])), ["prompt_ids", "(3,)"]),
    (dict(prompt=torch.ones(1, 2, 3, dtype=torch.int64)), ["prompt_ids", "(1, 2, 3)"]),
    (dict(prompt=torch.tensor([[1.0, 2.0]])), ["prompt_ids", "float"]),
    (dict(prompt=torch.tensor([[True, False]])), ["prompt_ids", "bool"]),
    (dict(max_new_tokens=-1), ["max_new_tokens", "-1"]),
    (dict(max_new_tokens=1.5), ["max_new_tokens", "1.5"]),
    (dict(max_new_tokens=2.0), ["max_new_tokens", "2.0"]),
    (dict(max_new_tokens=True), ["max_new_tokens", "True"]),
    (dict(temperature=NAN), ["temperature", "nan"]),
    (dict(temperature=INF), ["temperature", "inf"]),
    (dict(temperature=-0.5), ["temperature", "-0.5"]),
    (dict(temperature=True), ["temperature", "True"]),
    (dict(top_k=0), ["top_k", "0"]),
    (dict(top_k=1.5), ["top_k", "1.5"]),
    (dict(top_k=-3), ["top_k", "-3"]),
    (dict(seed=-1), ["seed", "-1"]),
    (dict(seed=1.5), ["seed", "1.5"]),
]


def bad_generate_case(mesh):
    params = P.shard(N.init_gpt(GEN, 0), N.gpt_specs(GEN), mesh)

    def call(prompt=PROMPT, max_new_tokens=2, **kw):
        return lambda: N.generate(params, prompt, GEN, mesh, max_new_tokens, **kw)

    return value_errors_then_in_step([call(**overrides) for overrides, _ in BAD_GENERATE], mesh)


def test_generate_refuses_bad_arguments_on_every_rank_before_any_collective(pool):
    for rank, messages in enumerate(pool.run(bad_generate_case, tp=2)):
        assert messages[-1] == 2.0, f"rank {rank}: out of step"
        for (overrides, fragments), message in zip(BAD_GENERATE, messages, strict=False):
            assert message is not None, f"rank {rank}: generate({overrides}) did not raise a ValueError"
            for fragment in fragments:
                assert fragment in message, f"rank {rank}: {fragment!r} not named in {message!r}"


def test_generate_still_takes_the_edge_values():
    params = N.init_gpt(GEN, 0)
    assert torch.equal(N.generate(params, PROMPT, GEN, SERIAL, 0), PROMPT)  # nothing new
    greedy = N.generate(params, PROMPT, GEN, SERIAL, 5, temperature=0)  # exactly max_seq
    assert greedy.shape == (1, 8) and torch.equal(N.generate(params, PROMPT, GEN, SERIAL, 5, top_k=1), greedy)
    assert N.generate(params, PROMPT.int(), GEN, SERIAL, 2, top_k=100, seed=2**63 - 1).shape == (1, 5)


# ---------------------------------------------------------------------------------------------------
# 6. GPT-2 import / export
# ---------------------------------------------------------------------------------------------------

HF_SIZES = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)


@pytest.fixture(scope="module")
def gpt2_sd():
    """A tiny random GPT2LMHeadModel's state dict (wte and lm_head.weight the same tensor), its config."""
    transformers = pytest.importorskip("transformers", reason="GPT-2 state dicts come from Hugging Face")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SIZES, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():  # biases 0 and gains 1 at init would hide a mixed-up tensor
        for i, p in enumerate(model.parameters()):
            p.add_(0.05 * rand(i, *p.shape).float())
    return model.state_dict(), N.gpt2_config(**HF_SIZES)


def fresh(sd):
    """A copy of the state dict with its own storage per tensor (safetensors refuses shared tensors)."""
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("key", ["transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.bias",
                                 "transformer.h.0.attn.c_attn.bias", "transformer.h.0.ln_2.weight"])
def test_gpt2_import_names_a_missing_key(gpt2_sd, key):
    sd, cfg = gpt2_sd
    raises_naming(lambda: N.from_hf_gpt2({k: v for k, v in sd.items() if k != key}, cfg),
                  "missing", key.removeprefix("transformer."))


def test_gpt2_import_names_a_wrongly_shaped_tensor_with_both_shapes(gpt2_sd):
    sd, cfg = gpt2_sd
    name = "transformer.h.0.attn.c_attn.weight"  # HF's Conv1D is [in, out] = (32, 96)
    raises_naming(lambda: N.from_hf_gpt2({**sd, name: sd[name].t()}, cfg), "h.0.attn.c_attn.weight",
                  "(96, 32)", "(32, 96)")
    name = "transformer.h.1.mlp.c_fc.bias"
    raises_naming(lambda: N.from_hf_gpt2({**sd, name: sd[name][:-1]}, cfg), "h.1.mlp.c_fc.bias", "(127,)", "(128,)")


def test_gpt2_import_reads_a_path_or_a_folder(gpt2_sd, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd, cfg = gpt2_sd
    want = N.from_hf_gpt2(sd, cfg)
    file = tmp_path / "gpt2.safetensors"
    safetensors_torch.save_file(fresh(sd), str(file))
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    safetensors_torch.save_file({k: v for k, v in fresh(sd).items() if k != "lm_head.weight"},
                                str(folder / "model.safetensors"))
    for source in (file, str(file), folder, str(folder)):
        assert_close(N.from_hf_gpt2(source, cfg), want, f"from_hf_gpt2({type(source).__name__} {source})")


def test_gpt2_import_names_a_path_it_cannot_read(tmp_path):
    cfg = N.gpt2_config(**HF_SIZES)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    pickled = tmp_path / "model.bin"
    torch.save({"wte.weight": torch.zeros(2, 2)}, pickled)
    for path in (empty, tmp_path / "missing.safetensors", tmp_path / "no" / "such" / "folder", junk, pickled):
        for source in (path, str(path)):
            raises_naming(lambda source=source: N.from_hf_gpt2(source, cfg), str(path))


def test_gpt2_import_refuses_an_untied_head(gpt2_sd):
    sd, cfg = gpt2_sd
    untied = {**fresh(sd), "lm_head.weight": sd["lm_head.weight"] + 0.01}
    raises_naming(lambda: N.from_hf_gpt2(untied, cfg), "lm_head.weight")
    assert_close(N.from_hf_gpt2(fresh(sd), cfg), N.from_hf_gpt2(sd, cfg), "an equal, separate lm_head is fine")


SHARDED = ["embed.word", "layers.0.attn.qkv.weight", "layers.1.attn.qkv.bias", "layers.0.attn.proj.weight",
           "layers.1.mlp.fc1.weight", "layers.0.mlp.fc1.bias", "layers.1.mlp.fc2.weight"]


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_gpt2_export_refuses_one_ranks_shards_naming_the_parameter(gpt2_sd, tp_rank):
    sd, cfg = gpt2_sd
    full = N.from_hf_gpt2(sd, cfg)
    specs = N.gpt_specs(cfg)
    shards = P.shard(full, specs, P.Mesh(tp=2, tp_rank=tp_rank))  # shard needs no communication
    split = {n for n in shards if shards[n].shape != full[n].shape}
    assert split == {n for n, spec in specs.items() if spec is not None} and set(SHARDED) <= split
    raises_naming(lambda: N.to_hf_gpt2(shards, cfg), "embed.word")
    for name in SHARDED:  # one shard among full parameters is named too
        raises_naming(lambda name=name: N.to_hf_gpt2({**full, name: shards[name]}, cfg), name)


def test_gpt2_full_params_still_round_trip(gpt2_sd):
    """(Already right before the change: pinned.)"""
    sd, cfg = gpt2_sd
    out = N.to_hf_gpt2(N.from_hf_gpt2(sd, cfg), cfg)
    assert out.keys() == sd.keys()
    for k in sd:
        assert torch.equal(out[k], sd[k]), k


# ---------------------------------------------------------------------------------------------------
# 7. Tensor parallel over more ranks than kv heads: each kv head replicated over tp / kv_heads ranks
# ---------------------------------------------------------------------------------------------------


def kv_step_case(mesh, cfg, full, ids, targets, mask, seed):
    """One training step of this rank's shards: loss, gathered logits, unsharded grads, the global grad
    norm, shard/unshard of the full parameters, and this rank's own qkv shards and their grads."""
    specs = N.gpt_specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}
    logits = N.gpt_logits(params, ids, cfg, mesh, seed=seed, training=True)
    loss = N.lm_loss(logits, targets, cfg, mesh, mask)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    return dict(loss=loss.detach(), logits=P.all_gather(logits.detach(), mesh, "tp", -1),
                grads=P.unshard(grads, specs, mesh), norm=P.clip_grad_norm(params, specs, mesh, 0.0),
                roundtrip=P.unshard(P.shard(full, specs, mesh), specs, mesh),
                qkv={k: (params[k].detach(), grads[k]) for k in params if ".attn.qkv." in k}, tp_rank=mesh.tp_rank)


@st.composite
def kv_replicated_cases(draw):
    """Configs with kv_heads < tp: tp in {2, 4}, kv_heads in {1, 2} dividing tp, heads a multiple of tp."""
    tp = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2) if k < tp]))
    heads = tp * draw(st.sampled_from([1, 2]))
    position = draw(st.sampled_from(["learned", "rope"]))
    head_dim = draw(st.sampled_from([d for d in (2, 4) if heads * d <= 32]))
    sp = draw(st.booleans())
    s = tp * draw(st.integers(1, 8 // tp)) if sp else draw(st.integers(1, 8))
    attention_dropout = draw(st.sampled_from([0.0, 0.25]))
    cfg = GPTConfig(
        vocab_size=4 * draw(st.integers(1, 4)) + draw(st.integers(1, 3)), vocab_multiple=4, max_seq=s,
        layers=draw(st.integers(1, 2)), hidden=heads * head_dim, heads=heads, kv_heads=kv_heads,
        ffn=tp * draw(st.integers(1, 3)), position=position, bias=draw(st.booleans()),
        activation=draw(st.sampled_from(["gelu", "swiglu"])), tie_embeddings=draw(st.booleans()),
        hidden_dropout=draw(st.sampled_from([0.0, 0.1])), attention_dropout=attention_dropout,
        attention="core" if attention_dropout else draw(st.sampled_from(["core", "sdpa"])),
        recompute=draw(st.sampled_from(["none", "selective", "full"])), sequence_parallel=sp)
    return tp, cfg, draw(st.integers(1, 2)), draw(st.integers(0, 2**16)), draw(st.booleans())


MQA_TP2 = (2, GPTConfig(vocab_size=9, vocab_multiple=4, max_seq=6, layers=2, hidden=16, heads=4, kv_heads=1, ffn=8,
                        position="rope", attention_dropout=0.25, hidden_dropout=0.1, sequence_parallel=True,
                        recompute="selective"), 2, 3, True)
GQA2_TP4 = (4, GPTConfig(vocab_size=13, vocab_multiple=4, max_seq=8, layers=2, hidden=32, heads=8, kv_heads=2, ffn=8,
                         activation="swiglu", tie_embeddings=False, attention="sdpa", recompute="full"), 2, 7, False)


@example(case=MQA_TP2)
@example(case=GQA2_TP4)
@given(case=kv_replicated_cases())
def test_tp_over_replicated_kv_heads_equals_serial(pool, case):
    tp, cfg, b, seed, masked = case
    s = cfg.max_seq
    full = model_params(cfg, seed)
    ids, targets = randint(seed, cfg.vocab_size, b, s), randint(seed + 1, cfg.vocab_size, b, s)
    mask = (rand(seed + 2, b, s) > 0) | (torch.arange(s) == 0) if masked else None
    reference = replace(cfg, sequence_parallel=False, recompute="none", attention="core")
    want = kv_step_case(SERIAL, reference, full, ids, targets, mask, seed)
    serial_norm = torch.stack([g.pow(2).sum() for g in want["grads"].values()]).sum().sqrt()
    assert_close(want["norm"], serial_norm, "serial norm")
    rep, d, q = tp // cfg.num_kv_heads, cfg.head_dim, cfg.heads // cfg.num_kv_heads
    results = pool.run(kv_step_case, cfg, full, ids, targets, mask, seed, tp=tp)[:tp]
    for rank, got in enumerate(results):
        who = f"rank {rank} (tp={tp}, kv_heads={cfg.num_kv_heads})"
        for key in ("loss", "logits", "grads", "norm"):
            assert_close(got[key], want[key], f"{who} {key}")
        for name, p in full.items():
            assert torch.equal(got["roundtrip"][name], p), f"{who}: unshard(shard({name})) is not exact"
        # every replica holds its group's k and v rows, and after backward their full (summed) gradient
        group = got["tp_rank"] // rep
        for name, (local_p, local_g) in got["qkv"].items():
            rows = lambda full_t, group=group: rearrange(full_t, "(g r d) ... -> g r d ...", g=cfg.num_kv_heads,
                                                         d=d)[group, q:]
            assert local_p.shape[0] == (cfg.heads // tp + 2) * d, (who, name)
            assert torch.equal(local_p[-2 * d:], rows(full[name]).flatten(0, 1)), f"{who}: {name} k/v rows"
            assert_close(local_g[-2 * d:], rows(want["grads"][name]).flatten(0, 1), f"{who}: {name} k/v grad")
            for other in results:
                if other["tp_rank"] // rep == group:
                    assert torch.equal(other["qkv"][name][0][-2 * d:], local_p[-2 * d:]), (who, name)
                    assert torch.equal(other["qkv"][name][1][-2 * d:], local_g[-2 * d:]), (who, name, "grad")


def test_tp_and_kv_heads_that_divide_neither_way_are_still_refused():
    """heads=6, kv_heads=3 at tp=2: tp divides the query heads but neither tp nor kv_heads divides the
    other. (check_mesh named tp and kv_heads before the change too; P.shard silently split the qkv rows
    mid-group.)"""
    cfg = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=12, heads=6, kv_heads=3)
    raises_naming(lambda: cfg.check_mesh(P.Mesh(tp=2)), "tp=2", "kv_heads=3")
    raises_naming(lambda: P.shard(N.init_gpt(cfg, 0), N.gpt_specs(cfg), P.Mesh(tp=2, tp_rank=0)),
                  "layers.0.attn.qkv.weight")
    for tp, kv_heads in [(2, 1), (4, 1), (4, 2)]:  # the old "tp=2 does not divide kv_heads=1" is gone
        replace(cfg, hidden=16, heads=4, kv_heads=kv_heads, position="rope").check_mesh(P.Mesh(tp=tp))


def test_head_groups_shard_rows_by_hand():
    """MQA at tp=2 on a hand-numbered qkv [q0, q1, q2, q3, k, v] (head_dim 1): rank 0 holds q0, q1, k, v and
    rank 1 q2, q3, k, v; at tp=1 everything."""
    assert HeadGroups is not None, "parallel.HeadGroups is missing"
    spec, full = HeadGroups(groups=1, q_per_group=4, head_dim=1), torch.arange(6.0)[:, None]
    shard = lambda tp, rank: spec.shard(full, P.Mesh(tp=tp, tp_rank=rank))[:, 0].tolist()
    assert shard(2, 0) == [0, 1, 4, 5] and shard(2, 1) == [2, 3, 4, 5] and shard(1, 0) == list(range(6))
    spec = HeadGroups(groups=2, q_per_group=2, head_dim=1)  # [q0, q1, k0, v0, q2, q3, k1, v1]
    full = torch.arange(8.0)[:, None]
    assert [spec.shard(full, P.Mesh(tp=4, tp_rank=r))[:, 0].tolist() for r in range(4)] == [
        [0, 2, 3], [1, 2, 3], [4, 6, 7], [5, 6, 7]]


# ---------------------------------------------------------------------------------------------------
# 8. clip_grad_norm
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [NAN, -1.0])
def test_clip_grad_norm_refuses_a_nan_or_negative_max_norm(max_norm):
    params = {"w": rand(0, 3, 4).requires_grad_(True)}
    params["w"].grad = rand(1, 3, 4)
    before = params["w"].grad.clone()
    raises_naming(lambda: P.clip_grad_norm(params, {"w": None}, SERIAL, max_norm), "max_norm", repr(max_norm))
    assert torch.equal(params["w"].grad, before)
    norm = P.clip_grad_norm(params, {"w": None}, SERIAL, 1.0)
    assert_close(norm, before.norm(), "the norm before clipping")
    assert_close(params["w"].grad.norm(), torch.tensor(1.0, dtype=torch.float64), "clipped to 1",
                 dict(rtol=1e-5, atol=1e-6))


# ---------------------------------------------------------------------------------------------------
# 9. An attention mask is checked the same on both paths (SDPA alone would broadcast a [b, sk] mask)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["core", "sdpa"])
@pytest.mark.parametrize("mask, mask_kind, fragment", [
    (torch.zeros(2, 4, dtype=torch.bool), "padding", "does not broadcast"),  # [b, sk]: SDPA read it as [sq, sk]
    (torch.zeros(4, 4, dtype=torch.bool), "padding", "does not broadcast"),
    (torch.zeros(2, 1, 1, 4), "padding", "torch.bool"),
    (torch.zeros(2, 1, 1, 4, dtype=torch.bool), "causal", "takes no mask tensor"),
    (None, "padding", "needs a boolean mask"),
])
def test_attention_mask_is_checked_on_both_paths(attention, mask, mask_kind, fragment):
    from nanomeg import embed, init_gpt, run_layers

    cfg = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2, attention=attention)
    params = init_gpt(cfg, 0, torch.float64)
    x = embed(params, randint(0, 10, 2, 4), cfg, SERIAL)
    with pytest.raises(ValueError, match=fragment):
        run_layers(params, x, cfg, SERIAL, mask_kind=mask_kind, mask=mask)


# ---------------------------------------------------------------------------------------------------
# 10. ids, labels and gold indices: an int64 (or int32) tensor of exactly the shape, or a ValueError
# ---------------------------------------------------------------------------------------------------

BERT = N.BertConfig(vocab_size=11, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2)
T5 = N.T5Config(vocab_size=11, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2)
REALM = N.RealmConfig(vocab_size=11, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2, top_k=2)
IDS = randint(0, 11, B, S)  # [2, 3]


def test_retrieval_accuracy_refuses_gold_ids_that_only_broadcast():
    """Gold ids [m, 1] once scored every query against every gold id (0.333 here, where the answer is 0.667)."""
    found = torch.tensor([[0, 1], [2, 3], [4, 5]])
    assert N.retrieval_accuracy(found, torch.tensor([0, 2, 9])) == pytest.approx({"acc@1": 2 / 3})
    raises_naming(lambda: N.retrieval_accuracy(found, torch.tensor([[0], [2], [9]])), "gold_ids", "[3]", "(3, 1)")
    raises_naming(lambda: N.retrieval_accuracy(found, torch.tensor([0.0, 2.0, 9.0])), "gold_ids", "float32")
    raises_naming(lambda: N.retrieval_accuracy(found[0], torch.tensor([0])), "found_ids", "(2,)")


def realm_case(**changes):
    """realm_loss on a tiny corpus with one entry of the batch replaced."""
    params = N.init_realm(REALM, 0, torch.float64)
    blocks, block_mask = randint(1, 11, 4, 3), torch.ones(4, 3, dtype=torch.int64)
    index = N.build_index(params, blocks, block_mask, REALM, SERIAL)
    batch = dict(query_ids=IDS, query_mask=torch.ones(B, S, dtype=torch.int64), targets=randint(2, 11, B, S),
                 target_mask=torch.ones(B, S, dtype=torch.int64), gold=torch.tensor([0, 3])) | changes
    return lambda: N.realm_loss(params, batch, index, (blocks, block_mask), REALM, SERIAL)


def bert_case(cfg=BERT, **kw):
    params = N.init_bert(cfg, 0, torch.float64)
    return lambda: N.bert_loss(params, kw.pop("ids", IDS), cfg, SERIAL, **dict(mlm_targets=IDS, mlm_mask=None,
                                                                                nsp_labels=torch.tensor([0, 1])) | kw)


BAD_IDS = {  # each once a broadcast, an IndexError or a dtype error deep inside torch, or a silent wrong number
    "gpt ids [s]": (lambda: N.gpt_logits(N.init_gpt(TINY, 0), IDS[0], TINY, SERIAL), ["ids", "(3,)"]),
    "gpt ids [b, s, 1]": (lambda: N.gpt_logits(N.init_gpt(TINY, 0), IDS[..., None], TINY, SERIAL),
                          ["ids", "(2, 3, 1)"]),
    "gpt ids uint8": (lambda: N.gpt_logits(N.init_gpt(TINY, 0), IDS.to(torch.uint8), TINY, SERIAL), ["uint8"]),
    "gpt ids int16": (lambda: N.gpt_logits(N.init_gpt(TINY, 0), IDS.short(), TINY, SERIAL), ["int16"]),
    "gpt targets int16": (lambda: N.gpt_loss(N.init_gpt(TINY, 0), IDS, IDS.short(), TINY, SERIAL),
                          ["targets", "int16"]),
    "gpt targets [b, 1]": (lambda: N.gpt_loss(N.init_gpt(TINY, 0), IDS, IDS[:, :1], TINY, SERIAL),
                           ["targets", "[2, 3]", "(2, 1)"]),
    "generate uint8": (lambda: N.generate(N.init_gpt(TINY, 0), IDS.to(torch.uint8), TINY, SERIAL, 1),
                       ["prompt_ids", "uint8"]),
    "bert nsp_labels [b, 1]": (bert_case(nsp_labels=torch.tensor([[0], [1]])), ["nsp_labels", "[2]", "(2, 1)"]),
    "bert nsp_labels int16": (bert_case(nsp_labels=torch.tensor([0, 1]).short()), ["nsp_labels", "int16"]),
    "bert ids uint8": (bert_case(ids=IDS.to(torch.uint8)), ["ids", "uint8"]),
    "t5 dec_ids [s]": (lambda: N.t5_logits(N.init_t5(T5, 0), IDS, IDS[0], T5, SERIAL), ["dec_ids", "(3,)"]),
    "t5_generate int16": (lambda: N.t5_generate(N.init_t5(T5, 0), IDS.short(), T5, SERIAL, 1), ["enc_ids", "int16"]),
    "embed_text [b, s, 1]": (lambda: N.embed_text(N.init_biencoder(REALM, 0), IDS[..., None], REALM, SERIAL,
                                                  tower="query"), ["ids", "(2, 3, 1)"]),
    "build_index uint8": (lambda: N.build_index(N.init_biencoder(REALM, 0), IDS.to(torch.uint8), None, REALM, SERIAL),
                          ["uint8"]),
    "realm gold [b, 1]": (realm_case(gold=torch.tensor([[0], [3]])), ["gold", "[2]", "(2, 1)"]),
    "realm targets [b, 1]": (realm_case(targets=IDS[:, :1]), ["targets", "[2, 3]", "(2, 1)"]),
    "realm target_mask [b, 1]": (realm_case(target_mask=torch.ones(B, 1, dtype=torch.int64)),
                                 ["target_mask", "(2, 1)"]),
}


@pytest.mark.parametrize("case", BAD_IDS)
def test_ids_labels_and_gold_of_a_wrong_shape_or_dtype_are_refused_naming_them(case):
    call, fragments = BAD_IDS[case]
    raises_naming(call, *fragments)


def test_int32_ids_and_labels_still_work_like_int64():
    params = N.init_bert(BERT, 0, torch.float64)
    loss = lambda cast: N.bert_loss(params, cast(IDS), BERT, SERIAL, mlm_targets=cast(IDS), mlm_mask=None,
                                    nsp_labels=cast(torch.tensor([0, 1])))
    assert_close(loss(torch.Tensor.int), loss(torch.Tensor.long), "int32 vs int64")


# ---------------------------------------------------------------------------------------------------
# 11. generate at a tiny temperature; search with queries of a wrong rank or width
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_generate_at_a_tiny_temperature_samples_the_greedy_tokens(temperature):
    """Once a nan softmax and a RuntimeError in torch.multinomial: the logits were divided in float32."""
    params = N.init_gpt(GEN, 0)
    greedy = N.generate(params, PROMPT, GEN, SERIAL, 4, temperature=0)
    assert torch.equal(N.generate(params, PROMPT, GEN, SERIAL, 4, temperature=temperature, seed=3), greedy)


def search_case(mesh, case):
    """search over a 6-block index with this rank's queries of BAD_QUERIES[case]; its message, then in step."""
    q_of_rank = BAD_QUERIES[case][0]
    params = N.init_biencoder(REALM, 0, torch.float64)
    index = N.build_index(params, randint(1, 11, 6, 3), None, REALM, mesh)
    return value_errors_then_in_step([lambda: N.search(q_of_rank(mesh.dp_rank), index, 2, REALM, mesh)], mesh,
                                     dims=("dp",))


BAD_QUERIES = {  # e = 8
    "[e]": (lambda r: rand(0, 8), ["queries", "[m, 8]", "(8,)"]),
    "[m, e + 1]": (lambda r: rand(0, 2, 9), ["queries", "[m, 8]", "(2, 9)"]),
    "[m, e, 1]": (lambda r: rand(0, 2, 8, 1), ["(2, 8, 1)"]),
    "int": (lambda r: randint(0, 3, 2, 8), ["queries", "int64"]),
    "replica 1 only, [e]": (lambda r: rand(0, 8) if r == 1 else rand(0, 2, 8), ["queries", "dp ranks [1]"]),
    "uneven m": (lambda r: rand(0, 1 + r % 2, 8), ["uneven query batches", "[1, 2, 1, 2]"]),
}


@pytest.mark.parametrize("case", BAD_QUERIES)
def test_search_refuses_queries_of_a_wrong_rank_or_width_on_every_replica(pool, case):
    """Once an IndexError or a matmul error on the replica with the bad queries, and the others left waiting."""
    for rank, (message, in_step) in enumerate(pool.run(search_case, case)):
        assert in_step == 4.0, f"rank {rank}: out of step"
        assert message is not None and all(f in message for f in BAD_QUERIES[case][1]), f"rank {rank}: {message!r}"


# ---------------------------------------------------------------------------------------------------
# 12. cp > 1: every entry point of a model that context parallelism does not build refuses it
# ---------------------------------------------------------------------------------------------------

_CP_MESHES = {}


def cp2_mesh():
    """This worker's cp = 2 mesh (dp fills the world), built once: every rank builds it in the same task."""
    if "cp2" not in _CP_MESHES:
        _CP_MESHES["cp2"] = P.Mesh.build(cp=2)
    return _CP_MESHES["cp2"]


def cp_entry_points_case(_pool_mesh):
    mesh, ids = cp2_mesh(), randint(0, 11, 2, 4)  # 4 tokens: 2·cp chunks, so only the model can be refused
    bert, t5, realm = N.init_bert(BERT, 0), N.init_t5(T5, 0), N.init_realm(REALM, 0)
    classify, choice = replace(BERT, task="classify"), replace(BERT, task="multiple_choice")
    index = N.build_index(realm, ids, None, REALM, SERIAL)
    batch = dict(query_ids=ids, query_mask=torch.ones_like(ids), targets=ids, target_mask=torch.ones_like(ids))
    cases = [
        lambda: N.bert_pretrain(bert, ids, BERT, mesh),
        lambda: N.bert_loss(bert, ids, BERT, mesh, mlm_targets=ids, mlm_mask=None, nsp_labels=torch.tensor([0, 1])),
        lambda: N.bert_classify(N.init_bert(classify, 0), ids, classify, mesh),
        lambda: N.bert_multiple_choice(N.init_bert(choice, 0), ids[None], choice, mesh),
        lambda: N.t5_logits(t5, ids, ids, T5, mesh),
        lambda: N.t5_loss(t5, ids, ids, ids, T5, mesh),
        lambda: N.t5_decode(t5, ids, N.Memory(torch.zeros(2, 4, 8)), T5, mesh),
        lambda: N.t5_generate(t5, ids, T5, mesh, 2),
        lambda: N.embed_text(realm, ids, REALM, mesh, tower="query"),
        lambda: N.biencoder_loss(realm, dict(query_ids=ids, context_ids=ids), REALM, mesh),
        lambda: N.build_index(realm, ids, None, REALM, mesh),
        lambda: N.realm_loss(realm, batch, index, (ids, torch.ones_like(ids)), REALM, mesh),
        lambda: N.pipeline_step("bert", bert, dict(ids=ids, mlm_targets=ids, nsp_labels=torch.tensor([0, 1])), BERT,
                                mesh),
        # GPT does run under cp; targets [b, s/cp] must not pass for this rank's chunks of [b, s]
        lambda: N.gpt_loss(N.init_gpt(TINY, 0), ids, ids[:, :2], TINY, mesh),
    ]
    return value_errors_then_in_step(cases, mesh, dims=("cp", "dpcp"))


def test_every_entry_point_of_bert_t5_and_the_retrievers_refuses_cp_on_every_rank(pool):
    """Once bert_classify under cp ran, and its logits were 2.1 away from the serial ones."""
    names = ["BertConfig"] * 4 + ["T5Config"] * 4 + ["RealmConfig"] * 4 + ["BertConfig"]
    for rank, messages in enumerate(pool.run(cp_entry_points_case)):
        assert messages[-2:] == [2.0, 4.0], f"rank {rank}: out of step"
        for i, name in enumerate(names):
            assert messages[i] is not None and "cp=2" in messages[i] and name in messages[i], \
                f"rank {rank}, case {i}: {messages[i]!r}"
        assert "targets" in messages[len(names)] and "(2, 2)" in messages[len(names)], messages[len(names)]


# ---------------------------------------------------------------------------------------------------
# 13. pipeline_step: a bad batch is refused on every stage before anything is sent
# ---------------------------------------------------------------------------------------------------

PIPE_GPT = replace(TINY, layers=2)
PIPE_BERT = replace(BERT, layers=2)
IDS4 = randint(3, 11, 2, 4)
GOOD = dict(gpt=dict(ids=IDS4, targets=IDS4, loss_mask=torch.ones(2, 4)),
            bert=dict(ids=IDS4, token_types=torch.zeros_like(IDS4), attention_mask=torch.ones_like(IDS4),
                      mlm_targets=IDS4, mlm_mask=torch.ones(2, 4), nsp_labels=torch.tensor([0, 1])))
TOO_BIG = torch.tensor([[1, 2, 3, 11], [1, 2, 3, 4]])  # 11: one past the vocabulary
BAD_BATCHES = [  # (model, entries replaced in the good batch, fragments of the message)
    ("gpt", dict(ids=TOO_BIG), ["token id 11 out of range [0, 11)"]),
    ("gpt", dict(ids=randint(3, 11, 2, 10), targets=randint(3, 11, 2, 10), loss_mask=None), ["10", "max_seq=8"]),
    ("gpt", dict(ids=IDS4.short()), ["ids", "int16"]),
    ("gpt", dict(targets=TOO_BIG), ["target id 11 out of range [0, 11)"]),
    ("gpt", dict(targets=IDS4[:, :1]), ["targets", "(2, 1)"]),
    ("gpt", dict(loss_mask=torch.ones(2, 1)), ["loss_mask", "(2, 1)"]),
    ("gpt", dict(loss_mask=-torch.ones(2, 4)), ["loss_mask", ">= 0"]),
    ("gpt", dict(loss_msk=torch.ones(2, 4)), ["loss_msk"]),
    ("bert", dict(ids=randint(3, 11, 2, 10), token_types=None, attention_mask=None, mlm_targets=randint(3, 11, 2, 10),
                  mlm_mask=None), ["10", "max_seq=8"]),
    ("bert", dict(ids=TOO_BIG), ["token id 11 out of range [0, 11)"]),
    ("bert", dict(token_types=torch.full((2, 4), 2)), ["token type id 2"]),
    ("bert", dict(attention_mask=torch.full((2, 4), 2)), ["attention_mask", "2"]),
    ("bert", dict(mlm_targets=TOO_BIG), ["target id 11 out of range [0, 11)"]),
    ("bert", dict(mlm_mask=torch.ones(2, 1)), ["loss_mask", "(2, 1)"]),
    ("bert", dict(nsp_labels=torch.tensor([[0], [1]])), ["nsp_labels", "(2, 1)"]),
    ("bert", dict(nsp_labels=None), ["nsp_labels", "NoneType"]),
    ("bert", dict(nsp_labels=torch.tensor([0, 2])), ["next-sentence label 2"]),
]


def pipeline_batches_case(mesh):
    """Every bad batch at pp = 2 (messages), then a good GPT and BERT step: in step over pp and dp."""
    params = {}
    for model, cfg, init in (("gpt", PIPE_GPT, N.init_gpt), ("bert", PIPE_BERT, N.init_bert)):
        params[model] = {k: t.requires_grad_(True) for k, t in N.stage_params(init(cfg, 0), cfg, mesh).items()}
    step = lambda model, batch: N.pipeline_step(model, params[model], batch, PIPE_GPT if model == "gpt" else PIPE_BERT,
                                                mesh, microbatches=2)
    cases = [lambda m=model, c=changes: step(m, {k: v for k, v in (GOOD[m] | c).items() if v is not None})
             for model, changes, _ in BAD_BATCHES]
    messages = value_errors_then_in_step(cases, mesh, dims=("pp", "dp"))
    return messages + [bool(step(m, GOOD[m])["loss"].isfinite()) for m in ("gpt", "bert")]


def test_pipeline_step_refuses_a_bad_batch_on_every_stage_before_any_transfer(pool):
    """Once the first stage raised (an id out of range, a BERT batch longer than max_seq) while the last stage
    waited forever in its receive; or the last raised (targets, masks, labels) and the first waited."""
    for rank, messages in enumerate(pool.run(pipeline_batches_case, pp=2)):
        assert messages[len(BAD_BATCHES):] == [2.0, 2.0, True, True], f"rank {rank}: {messages[len(BAD_BATCHES):]}"
        for (model, changes, fragments), message in zip(BAD_BATCHES, messages):
            assert message is not None and all(f in message for f in fragments), \
                f"rank {rank}, {model} {sorted(changes)}: {message!r}"
