"""nanomeg.py: the GPT model, cut over tensor and sequence parallel ranks, equals the serial model.

Each case is a module-level function `case(mesh, ...)` run twice, as in test_parallel.py: on every
rank of the worker pool with a tp>1 mesh, and here in the test process on `Mesh.serial()`. Logits,
loss and every gathered gradient must agree in float64.

1. proven equal: hypothesis draws whole models (GQA, rope, SwiGLU, RMSNorm, dropout, recompute,
   sequence parallel, ...) and layouts tp in {1, 2, 4};
2. communication: one step moves exactly what Megatron's papers count;
3. generation: greedy = argmax of a full forward, the KV cache changes nothing, sampling agrees
   on every rank and never picks a padded id;
4. GPT-2 (and Llama-style) weights from Hugging Face give Hugging Face's logits;
5. bad configs and inputs are ValueErrors that name the values, raised on every rank;
6. Megatron's init, the sharding specs and shard/unshard.
"""

import math
import re
from dataclasses import replace
from typing import NamedTuple

import pytest
import torch
from common import SERIAL, TOL, assert_close, jittered, rand, randint
from harness import value_errors_then_in_step
from hypothesis import example, given, settings
from hypothesis import strategies as st

import parallel as P
from nanomeg import (
    GPTConfig,
    from_hf_gpt2,
    from_hf_llama,
    generate,
    gpt2_config,
    gpt_logits,
    gpt_loss,
    gpt_shapes,
    gpt_specs,
    init_gpt,
    layer_ids,
    llama_config_from_hf,
    llama_hf_config,
    lm_loss,
    to_hf_gpt2,
    to_hf_llama,
)


def model_params(cfg: GPTConfig, seed: int, dtype=torch.float64) -> dict:
    """init_gpt's parameters with every norm weight and bias jittered (common.jittered)."""
    return jittered(init_gpt(cfg, seed, dtype), seed)




# ---------------------------------------------------------------------------------------------------
# Drawing a valid model and layout
# ---------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    tp: int
    cfg: GPTConfig
    b: int
    s: int
    seed: int
    masked: bool  # a loss mask with some zeros


@st.composite
def gpt_cases(draw, tps=(1, 2, 4)):
    """A GPT config, a batch shape and a tp that can split it: heads and kv_heads are multiples of tp
    (MQA, kv_heads = 1, only at tp = 1), hidden = heads * head_dim, ffn % tp == 0, the sequence a
    multiple of tp under sequence parallel, a vocabulary that is never a multiple of 4 (so always
    padded, to a multiple of vocab_multiple = 4, which every tp divides)."""
    tp = draw(st.sampled_from(tps))
    kv_heads = draw(st.sampled_from([tp, 2 * tp] if tp > 1 else [1, 2]))
    heads = kv_heads * draw(st.sampled_from([g for g in (1, 2, 4) if kv_heads * g <= 8]))
    position = draw(st.sampled_from(["learned", "rope", "relative"]))
    head_dim = draw(st.sampled_from([d for d in ((2, 3, 4) if position == "learned" else (2, 4))
                                     if heads * d <= 32]))
    sp = draw(st.booleans())  # a no-op at tp = 1
    s = tp * draw(st.integers(1, 8 // tp)) if sp else draw(st.integers(1, 8))
    attention_dropout = draw(st.sampled_from([0.0, 0.0, 0.25]))
    cfg = GPTConfig(
        vocab_size=4 * draw(st.integers(1, 5)) + draw(st.integers(1, 3)), vocab_multiple=4,
        max_seq=s + draw(st.integers(0, 3)), layers=draw(st.integers(1, 2)),
        hidden=heads * head_dim, heads=heads, kv_heads=kv_heads,
        ffn=draw(st.sampled_from([None, tp, 2 * tp, 3 * tp])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), zero_centered_gamma=draw(st.booleans()),
        activation=draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "swiglu", "geglu"])), position=position,
        rel_buckets=draw(st.integers(4, 10)), rel_max_distance=draw(st.integers(6, 12)),
        scale_attention=draw(st.booleans()), scale_output=draw(st.booleans()),
        bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()), residual_post_norm=draw(st.booleans()),
        hidden_dropout=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])), attention_dropout=attention_dropout,
        attention="core" if attention_dropout else draw(st.sampled_from(["core", "sdpa"])),
        recompute=draw(st.sampled_from(["none", "selective", "full"])), sequence_parallel=sp,
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
    )
    return Case(tp, cfg, b=draw(st.integers(1, 2)), s=s, seed=draw(st.integers(0, 2**16)), masked=draw(st.booleans()))


def reference_config(cfg: GPTConfig) -> GPTConfig:
    """What the serial reference runs: no sequence parallel, no recompute, the core attention. All
    three change how, never what, is computed (SDPA only without attention dropout)."""
    return replace(cfg, sequence_parallel=False, recompute="none", attention="core")


def batch(case: Case):
    """Token ids, targets and the loss mask (or None) of a case."""
    v = case.cfg.vocab_size
    ids, targets = randint(case.seed, v, case.b, case.s), randint(case.seed + 1, v, case.b, case.s)
    mask = None
    if case.masked:
        mask = (rand(case.seed + 2, case.b, case.s) > 0).double()
        mask[0, 0] = 1.0  # never all masked
    return ids, targets, mask


# Three hand-picked cases that the derandomised draws must never miss.
EVERYTHING_ON = Case(4, GPTConfig(
    vocab_size=21, vocab_multiple=4, max_seq=10, layers=2, hidden=32, heads=8, kv_heads=4, ffn=12,
    norm="rmsnorm", zero_centered_gamma=True, activation="swiglu", position="rope", bias=False,
    tie_embeddings=False, hidden_dropout=0.1, attention_dropout=0.25, recompute="full",
    sequence_parallel=True, label_smoothing=0.1), b=2, s=8, seed=11, masked=True)
GPT2_LIKE = Case(2, GPTConfig(
    vocab_size=13, vocab_multiple=4, max_seq=9, layers=2, hidden=12, heads=4, activation="gelu_tanh",
    residual_post_norm=True, hidden_dropout=0.5, attention="sdpa", recompute="selective"),
    b=2, s=7, seed=5, masked=False)
MQA = Case(1, GPTConfig(
    vocab_size=9, vocab_multiple=4, max_seq=6, layers=1, hidden=16, heads=4, kv_heads=1, position="rope",
    attention_dropout=0.25, sequence_parallel=True, recompute="full"), b=1, s=5, seed=3, masked=False)


# ---------------------------------------------------------------------------------------------------
# 1. Proven equal: loss, logits and every gathered gradient
# ---------------------------------------------------------------------------------------------------


def train_step_case(mesh, cfg, full, ids, targets, loss_mask, seed):
    """One forward + backward of this rank's shards, with dropout on; the collectives it issued."""
    specs = gpt_specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}
    with P.count_comms() as records:
        logits = gpt_logits(params, ids, cfg, mesh, seed=seed, training=True)  # [b, s, V/t]
        loss = lm_loss(logits, targets, cfg, mesh, loss_mask)
        loss.backward()
    return dict(
        loss=loss.detach(),
        logits=P.all_gather(logits.detach(), mesh, "tp", -1),
        grads=P.unshard({k: p.grad for k, p in params.items()}, specs, mesh),
        comms=sorted((c["phase"], c["op"], c["dim"], c["elements"]) for c in records),
    )


@settings(max_examples=2 * settings().max_examples)  # the test that matters most: twice the profile's
@example(case=EVERYTHING_ON)
@example(case=GPT2_LIKE)
@example(case=MQA)
@given(case=gpt_cases())
def test_parallel_gpt_equals_serial(pool, case):
    cfg, (ids, targets, mask) = case.cfg, batch(case)
    full = model_params(cfg, case.seed)
    want = train_step_case(SERIAL, reference_config(cfg), full, ids, targets, mask, case.seed)
    del want["comms"]
    # the reference is a model: padded vocabulary rows get no gradient, and a real loss is finite
    assert torch.isfinite(want["loss"]) and want["loss"] > 0
    for name in ("embed.word", "head.weight"):
        if name in want["grads"]:
            assert not want["grads"][name][cfg.vocab_size:].any(), f"padded rows of {name} got a gradient"
    assert_close({k: v for k, v in train_step_case(SERIAL, cfg, full, ids, targets, mask, case.seed).items()
                  if k != "comms"}, want, "serial with this cfg")
    replica0 = pool.run(train_step_case, cfg, full, ids, targets, mask, case.seed, tp=case.tp)[:case.tp]
    for rank, got in enumerate(replica0):
        del got["comms"]
        assert_close(got, want, f"rank {rank} (tp={case.tp})")


def padded_stack_case(mesh, cfg, full, ids, targets, key_padding, seed):
    """The stack with a padding mask instead of the causal one (the bidirectional, BERT-style path):
    embed -> run_layers(mask_kind="padding") -> lm_logits -> loss, forward and backward."""
    from nanomeg import embed, lm_logits, run_layers

    specs = gpt_specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}
    mask = key_padding[:, None, None, :]  # [b, 1, 1, s], True = a padded key nobody attends to
    x = embed(params, ids, cfg, mesh, seed=seed, training=True)
    x = run_layers(params, x, cfg, mesh, mask_kind="padding", mask=mask, seed=seed, training=True)
    loss = lm_loss(lm_logits(params, x, cfg, mesh), targets, cfg, mesh)
    loss.backward()
    return dict(loss=loss.detach(), grads=P.unshard({k: p.grad for k, p in params.items()}, specs, mesh))


@given(tp=st.sampled_from([2, 4]), sp=st.booleans(), sdpa=st.booleans(), s_per=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_padding_mask_parallel_equals_serial(pool, tp, sp, sdpa, s_per, seed):
    s = 4 * s_per
    cfg = GPTConfig(vocab_size=11, vocab_multiple=4, max_seq=s, layers=2, hidden=16, heads=4, ffn=8,
                    sequence_parallel=sp, attention="sdpa" if sdpa else "core",
                    hidden_dropout=0.0 if sdpa else 0.1, attention_dropout=0.0 if sdpa else 0.2)
    full = model_params(cfg, seed)
    ids, targets = randint(seed, 11, 2, s), randint(seed + 1, 11, 2, s)
    key_padding = rand(seed + 2, 2, s) > 0.3
    key_padding[:, 0] = False  # every query sees at least one key
    want = padded_stack_case(SERIAL, replace(cfg, sequence_parallel=False, attention="core"), full, ids, targets,
                             key_padding, seed)
    # the mask is real: what stands at padded positions never reaches the other positions' logits
    from nanomeg import embed, lm_logits, run_layers

    def logits_of(tokens):
        x = run_layers(full, embed(full, tokens, cfg, SERIAL), replace(cfg, sequence_parallel=False), SERIAL,
                       mask_kind="padding", mask=key_padding[:, None, None, :])
        return lm_logits(full, x, replace(cfg, sequence_parallel=False), SERIAL)
    swapped = torch.where(key_padding, (ids + 1) % 11, ids)
    seen = ~key_padding
    torch.testing.assert_close(logits_of(swapped)[seen], logits_of(ids)[seen], **TOL)
    if key_padding.any():  # while a padded position's own logits do change
        assert not torch.allclose(logits_of(swapped)[key_padding], logits_of(ids)[key_padding])
    for rank, got in enumerate(pool.run(padded_stack_case, cfg, full, ids, targets, key_padding, seed, tp=tp)[:tp]):
        assert_close(got, want, f"rank {rank} (tp={tp}, sp={sp}, sdpa={sdpa})")


def test_dropout_is_on_and_depends_on_the_seed():
    """The equivalence above means little if dropout were silently off."""
    case = GPT2_LIKE
    cfg, (ids, targets, _) = case.cfg, batch(case)
    full = model_params(cfg, case.seed)
    loss = lambda cfg, seed, training: gpt_loss(full, ids, targets, cfg, SERIAL, seed=seed, training=training)
    cfgs = [cfg, replace(cfg, hidden_dropout=0.0, attention_dropout=0.3, attention="core")]
    for c in cfgs:
        assert loss(c, 1, True) != loss(c, 2, True)
        assert loss(c, 1, True) == loss(c, 1, True)
        assert loss(c, 1, False) == loss(c, 2, False) == loss(replace(c, hidden_dropout=0.0, attention_dropout=0.0),
                                                             1, True)


def test_equivalent_parameterisations_give_the_same_model():
    """Switches that change how the weights are stored, never the function: a zero-centred gain w is
    the gain 1 + w; an untied head holding the embedding is the tied model; a loss mask averages the
    per-token losses it keeps."""
    case = EVERYTHING_ON._replace(tp=1)
    cfg, (ids, targets, _) = replace(case.cfg, sequence_parallel=False), batch(case)
    full = model_params(cfg, case.seed)
    logits = lambda params, cfg: gpt_logits(params, ids, cfg, SERIAL)
    want = logits(full, cfg)
    gains = {k: v + 1 if k.endswith(("ln1.weight", "ln2.weight", "final_norm.weight")) else v for k, v in full.items()}
    assert_close(logits(gains, replace(cfg, zero_centered_gamma=False)), want, "1 + w")
    tied = {k: v for k, v in full.items() if k != "head.weight"}
    untied = tied | {"head.weight": tied["embed.word"].clone()}
    assert_close(logits(untied, cfg), logits(tied, replace(cfg, tie_embeddings=True)), "untied = tied")
    mask = torch.tensor([[1.0, 0, 0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    plain = replace(cfg, label_smoothing=0.0)
    per_token = torch.nn.functional.cross_entropy(want[..., : cfg.vocab_size].flatten(0, 1), targets.flatten(),
                                                  reduction="none")
    assert_close(lm_loss(want, targets, plain, SERIAL, mask), per_token[mask.flatten() > 0].mean(), "masked loss")
    assert_close(lm_loss(want, targets, plain, SERIAL), per_token.mean(), "loss")


# ---------------------------------------------------------------------------------------------------
# 2. Communication: exactly Megatron's count
# ---------------------------------------------------------------------------------------------------


def megatron_comms(cfg: GPTConfig, b: int, s: int, tp: int) -> list[tuple]:
    """The tensor-parallel collectives of one forward + backward of a GPT, as (phase, op, dim,
    elements), elements being those of the full tensor (see parallel.py). Megatron-LM papers:
    Shoeybi et al. 2019, fig. 4 (f and g: one all-reduce each way per attention and per MLP);
    Korthikanti et al. 2022, sec. 4.2.2 (sequence parallel: each all-reduce becomes an all-gather
    plus a reduce-scatter of the same volume; the column-parallel input is re-gathered in backward)."""
    if tp == 1:
        return []
    n, tokens = b * s * cfg.hidden, b * s  # an activation [b, s, h]; a per-token scalar [b, s]
    fwd = lambda op, elements, times=1: [("forward", op, "tp", elements)] * times
    bwd = lambda op, elements, times=1: [("backward", op, "tp", elements)] * times
    got = fwd("all_reduce", tokens, 4 if cfg.label_smoothing else 3)  # vocab-parallel CE: max, target, sum(exp)[, sum]
    if not cfg.sequence_parallel:
        got += fwd("all_reduce", n)  # embedding: sum the ranks' vocabulary rows (g)
        for _ in range(cfg.layers):
            got += fwd("all_reduce", n, 2)  # g after the attention proj and after fc2
            got += bwd("all_reduce", n, 2)  # f before qkv and before fc1
        got += bwd("all_reduce", n)  # f before the column-parallel output layer
        return sorted(got)
    got += fwd("reduce_scatter", n) + bwd("all_gather", n)  # embedding: sum the rows, keep my s/t
    if cfg.position == "learned":
        got += bwd("all_reduce", s * cfg.hidden)  # the position rows used, a replicated parameter
    replicated = 2 if cfg.norm == "layernorm" else 1  # per norm: weight (and bias)
    for _ in range(cfg.layers):
        got += fwd("all_gather", n, 2)  # g: gather s before qkv and before fc1 ...
        got += bwd("all_gather", n, 2) + bwd("reduce_scatter", n, 2)  # ... re-gathered, input grads scattered
        got += fwd("reduce_scatter", n, 2)  # g-bar: after the attention proj and after fc2 ...
        got += bwd("all_gather", n, 2)  # ... and its backward
        got += bwd("all_reduce", cfg.hidden, 2 * replicated + (2 if cfg.bias else 0))  # ln1, ln2, proj/fc2 biases
    got += fwd("all_gather", n) + bwd("all_gather", n) + bwd("reduce_scatter", n)  # output layer
    got += bwd("all_reduce", cfg.hidden, replicated)  # final norm
    return sorted(got)


@given(case=gpt_cases())
def test_communication_is_megatrons_count(pool, case):
    cfg, (ids, targets, mask) = case.cfg, batch(case)
    full = model_params(cfg, case.seed)
    assert train_step_case(SERIAL, cfg, full, ids, targets, mask, case.seed)["comms"] == []  # a group of one
    want = megatron_comms(cfg, case.b, case.s, case.tp)
    replica0 = pool.run(train_step_case, cfg, full, ids, targets, mask, case.seed, tp=case.tp)[:case.tp]
    for rank, got in enumerate(replica0):
        if cfg.recompute != "full":
            assert got["comms"] == want, f"rank {rank}"
        else:  # full recompute re-runs (part of) each block's forward, collectives included, in backward
            assert [c for c in got["comms"] if c[0] == "backward"] == [c for c in want if c[0] == "backward"]
            extra = list(got["comms"])
            for c in want:
                extra.remove(c)
            n = case.b * case.s * cfg.hidden
            assert len(extra) <= (4 if cfg.sequence_parallel else 2) * cfg.layers  # a block's forward ones
            assert all(c in {("forward", "all_reduce", "tp", n), ("forward", "all_gather", "tp", n),
                             ("forward", "reduce_scatter", "tp", n)} for c in extra), extra


def test_communication_formula_by_hand():
    """The formula itself, against the numbers of the papers, for one small model."""
    cfg = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=3, hidden=8, heads=2)
    b, s, n = 2, 4, 2 * 4 * 8
    plain = megatron_comms(cfg, b, s, tp=2)
    count = lambda recs, phase, op, elements: sum(c == (phase, op, "tp", elements) for c in recs)
    assert count(plain, "forward", "all_reduce", n) == 3 * 2 + 1  # 2 per layer + embedding
    assert count(plain, "backward", "all_reduce", n) == 3 * 2 + 1  # 2 per layer + output layer
    assert count(plain, "forward", "all_reduce", b * s) == 3 and len(plain) == 17
    sp = megatron_comms(replace(cfg, sequence_parallel=True), b, s, tp=2)
    assert count(sp, "forward", "all_gather", n) == 3 * 2 + 1
    assert count(sp, "forward", "reduce_scatter", n) == 3 * 2 + 1
    assert count(sp, "backward", "all_gather", n) == 3 * 4 + 1 + 1
    assert count(sp, "backward", "reduce_scatter", n) == 3 * 2 + 1
    assert count(sp, "backward", "all_reduce", 8) == 3 * 6 + 2  # ln1, ln2 (w, b), proj, fc2 biases; final norm
    assert count(sp, "backward", "all_reduce", s * 8) == 1  # positions
    assert megatron_comms(cfg, b, s, tp=1) == []


def train_step_comms_case(mesh, argv):
    """One real train.py step (train.train_step: forward, backward, dp averaging, grad-norm clipping,
    AdamW) of the model train.py builds from argv; the collectives it issued, as (phase, op, dim, elements),
    and the elements of this rank's parameter shards."""
    import train

    args = train.parse_args(argv)
    cfg, _ = train.check_args(args, world=mesh.tp * mesh.dp)
    task = train.TASKS[args.model]
    specs = task.specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(task.init(cfg, args.seed), specs, mesh).items()}
    inputs = task.batch(torch.randint(0, 256, (10_000,), dtype=torch.uint8), args, seed=1)
    with P.count_comms() as records:
        train.train_step(params, train.make_optimizer(params, args, mesh, specs, cfg), inputs, task, cfg, mesh, specs,
                         args, step=1)
    return [(c["phase"], c["op"], c["dim"], c["elements"]) for c in records], sum(p.numel() for p in params.values())


@pytest.mark.parametrize("argv", [[], ["--layers", "2", "--hidden", "64", "--seq", "32", "--batch", "3"]])
def test_the_readmes_communication_figure_is_what_a_train_step_moves(pool, argv):
    """README: 'comm 4,724,737 el/step' for the default run at tp = 2, by hand: L layers x 4 all-reduces
    of b·s·h + the embedding's and the output layer's b·s·h + 3 x b·s for the loss + 1 for the grad norm.
    Checked on the real step of train.py, for the default sizes and another."""
    import train

    args = train.parse_args(argv)
    b, s, h, layers = args.batch, args.seq, args.hidden, args.layers
    formula = layers * 4 * b * s * h + 2 * b * s * h + 3 * b * s + 1
    if not argv:
        assert formula == 4_724_737  # the figure printed in the README
    for rank, (records, local) in enumerate(pool.run(train_step_comms_case, argv, tp=2)):  # the pool: dp = 2
        assert sum(e for _, _, dim, e in records if dim == "tp") == formula, (rank, records)
        assert ("after backward", "all_reduce", "tp", 1) in records  # the grad norm: not in forward
        assert {phase for phase, _, _, _ in records} == {"forward", "backward", "after backward"}
        assert sum(e for _, _, dim, e in records if dim == "dp") == local  # each grad shard averaged over dp


# ---------------------------------------------------------------------------------------------------
# 3. Generation
# ---------------------------------------------------------------------------------------------------


def real_logits(params, ids, cfg, mesh, **kw):
    """Gathered logits over the real vocabulary, [b, s, vocab_size]."""
    return P.gather_from_tp(gpt_logits(params, ids, cfg, mesh, **kw), mesh)[..., : cfg.vocab_size]


@torch.no_grad()
def generate_case(mesh, cfg, full, prompt, new, seed):
    """generate() under cfg (it switches sequence parallel and recompute off itself), and the logits
    behind every step by full forwards without cache, gathered, over the real vocabulary."""
    params = P.shard(full, gpt_specs(cfg), mesh)
    plain = replace(cfg, sequence_parallel=False, recompute="none")  # any sequence length, no cache
    steps = lambda ids: [real_logits(params, ids[:, : s0 + i], plain, mesh)[:, -1] for i in range(new)]
    s0 = prompt.shape[1]
    out = dict(greedy=generate(params, prompt, cfg, mesh, new, temperature=0))
    out["greedy_logits"] = steps(out["greedy"])
    public = P.gather_from_tp(gpt_logits(params, prompt, plain, mesh), mesh)  # [b, s0, V_padded]
    out["padded_wins"] = bool((public.argmax(-1) >= cfg.vocab_size).any())
    out["padded_columns"] = public[..., cfg.vocab_size:]
    # the KV cache: the prompt in two chunks (queries aligned to the end of the keys), then token by token
    caches, cached, uncached = {i: {} for i in layer_ids(params)}, [], []
    seq = out["greedy"]
    bounds = sorted({0, max(1, s0 // 2), *range(s0, seq.shape[1] + 1)})
    for a, z in zip(bounds, bounds[1:]):
        cached.append(real_logits(params, seq[:, a:z], plain, mesh, caches=caches, pos_offset=a))
        uncached.append(real_logits(params, seq[:, :z], plain, mesh)[:, a:z])
    out["cached"], out["uncached"] = cached, uncached
    for name, kw in dict(hot=dict(temperature=1.5), top3=dict(temperature=0.7, top_k=3),
                         top1=dict(temperature=2.0, top_k=1)).items():
        out[name] = generate(params, prompt, cfg, mesh, new, seed=seed, **kw)
        out[name + "_logits"] = steps(out[name])
    return out


@st.composite
def generation_cases(draw):
    """tp=2 models for decoding. LayerNorm, so that a final-norm bias of ones and output rows of
    ones make every padded vocabulary id win by far, unless generation masks them."""
    kv_heads = draw(st.sampled_from([2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 4]))
    s0, new = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    cfg = GPTConfig(vocab_size=4 * draw(st.integers(1, 4)) + draw(st.integers(1, 3)), vocab_multiple=4,
                    max_seq=s0 + new + draw(st.integers(0, 2)), layers=draw(st.integers(1, 2)),
                    hidden=heads * head_dim, heads=heads, kv_heads=kv_heads,
                    activation=draw(st.sampled_from(["gelu", "swiglu"])),
                    position=draw(st.sampled_from(["learned", "rope"])),
                    attention=draw(st.sampled_from(["core", "sdpa"])), tie_embeddings=draw(st.booleans()),
                    bias=draw(st.booleans()), sequence_parallel=draw(st.booleans()),
                    recompute=draw(st.sampled_from(["none", "full"])))
    return cfg, draw(st.integers(1, 2)), s0, new, draw(st.integers(0, 2**16))


@given(case=generation_cases())
def test_generation(pool, case):
    cfg, b, s0, new, seed = case
    full = model_params(cfg, seed)
    full["final_norm.bias"] = torch.ones(cfg.hidden, dtype=torch.float64)
    full["embed.word" if cfg.tie_embeddings else "head.weight"][cfg.vocab_size:] = 1.0
    prompt = randint(seed, cfg.vocab_size, b, s0)
    serial = generate_case(SERIAL, cfg, full, prompt, new, seed)
    results = pool.run(generate_case, cfg, full, prompt, new, seed, tp=2)
    # the trap is real: without the mask in lm_logits every padded id would win by far
    from nanomeg import embed, norm, run_layers
    x = norm(full, "final_norm", run_layers(full, embed(full, prompt, cfg, SERIAL), cfg, SERIAL), cfg, SERIAL)
    head = full["embed.word" if cfg.tie_embeddings else "head.weight"]
    assert ((x @ head.t()).argmax(-1) >= cfg.vocab_size).all(), "the padded ids are meant to be the trap"
    for who, got in [("serial", serial)] + [(f"rank {r}", g) for r, g in enumerate(results)]:
        assert not got["padded_wins"], f"{who}: gpt_logits let a padded id win an argmax"
        assert (got["padded_columns"] == float("-inf")).all(), f"{who}: padded logits are not -inf"
        for name in ("greedy", "hot", "top3", "top1"):
            ids = got[name]
            assert ids.shape == (b, s0 + new) and torch.equal(ids[:, :s0], prompt), (who, name)
            assert 0 <= ids.min() and ids.max() < cfg.vocab_size, f"{who} {name}: a padded id was sampled"
            # same tokens on every rank, and the same as serial
            assert torch.equal(ids, serial[name]), (who, name, ids, serial[name])
        for i in range(new):
            for name, rank_ok in (("greedy", 1), ("top1", 1), ("top3", 3)):
                logits, token = got[name + "_logits"][i], got[name][:, s0 + i]
                picked = logits.gather(-1, token[:, None])
                # at most rank_ok - 1 real ids score strictly higher than the one picked
                assert ((logits > picked + 1e-9).sum(-1) < rank_ok).all(), (who, name, i)
        assert torch.equal(got["top1"], got["greedy"]), who
        assert_close(got["cached"], got["uncached"], f"{who}: KV-cache logits")
        assert_close(got["greedy_logits"], serial["greedy_logits"], f"{who}: logits")


def test_generation_refuses_to_overflow_max_seq():
    cfg = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=6, layers=1, hidden=8, heads=2)
    params, prompt = init_gpt(cfg, 0), randint(0, 10, 1, 4)
    assert generate(params, prompt, cfg, SERIAL, 2).shape == (1, 6)  # exactly max_seq is fine
    with pytest.raises(ValueError, match=re.escape("prompt of 4 + 3 new tokens is longer than max_seq=6")):
        generate(params, prompt, cfg, SERIAL, 3)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(params, prompt, cfg, SERIAL, 1, temperature=-1)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(params, prompt, cfg, SERIAL, 1, top_k=0)


# ---------------------------------------------------------------------------------------------------
# 4. Hugging Face weights: GPT-2 in and out (and Llama-style options, against HF Llama)
# ---------------------------------------------------------------------------------------------------

HF_SIZES = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=32)


@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers", reason="GPT-2 weights are checked against Hugging Face")
    config = transformers.GPT2Config(**HF_SIZES, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases 0 and gains 1 at init would hide a mis-ordered bias
        for i, p in enumerate(model.parameters()):
            p.add_(0.05 * rand(i, *p.shape).float())
    return transformers, model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def logits_case(mesh, cfg, full, ids):
    return real_logits(P.shard(full, gpt_specs(cfg), mesh), ids, cfg, mesh)


GPT2_IDS = randint(7, HF_SIZES["vocab_size"], 2, 11)


def test_gpt2_from_hugging_face_gives_its_logits_and_loss(hf_gpt2):
    _, model = hf_gpt2
    cfg = gpt2_config(**HF_SIZES)
    params = from_hf_gpt2(model.state_dict(), cfg)
    assert params.keys() == gpt_shapes(cfg).keys()
    assert all(params[k].shape == shape for k, (shape, _) in gpt_shapes(cfg).items())
    want = hf_logits(model, GPT2_IDS)
    got = real_logits(params, GPT2_IDS, cfg, SERIAL)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        hf_loss = model(GPT2_IDS, labels=GPT2_IDS).loss  # HF shifts the labels itself
    loss = gpt_loss(params, GPT2_IDS[:, :-1], GPT2_IDS[:, 1:], cfg, SERIAL, training=False)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)


def test_gpt2_from_a_safetensors_file(hf_gpt2, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="the .safetensors path needs safetensors")
    _, model = hf_gpt2
    cfg = gpt2_config(**HF_SIZES)
    # as on the Hub: no "transformer." prefix, and the tied lm_head stored once (as wte)
    sd = {k.removeprefix("transformer."): v.clone().contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sd, str(path))
    got = real_logits(from_hf_gpt2(str(path), cfg), GPT2_IDS, cfg, SERIAL)
    torch.testing.assert_close(got, hf_logits(model, GPT2_IDS), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        from_hf_gpt2({k: v for k, v in sd.items() if not k.startswith("h.1.")}, cfg)
    with pytest.raises(ValueError, match=re.escape("wte.weight: the checkpoint has shape (101, 32), the config "
                                                   "needs (100, 32)")):
        from_hf_gpt2(sd, gpt2_config(**{**HF_SIZES, "vocab_size": 100}))


def test_gpt2_round_trips_through_to_hf(hf_gpt2):
    transformers, model = hf_gpt2
    cfg = gpt2_config(**HF_SIZES)
    sd = to_hf_gpt2(from_hf_gpt2(model.state_dict(), cfg), cfg)
    fresh = transformers.GPT2LMHeadModel(model.config).eval()
    result = fresh.load_state_dict(sd, strict=False)
    buffers = {name for name, _ in fresh.named_buffers()}
    assert not result.unexpected_keys and set(result.missing_keys) <= buffers, result
    original = model.state_dict()
    assert sd.keys() == original.keys()
    for k in original:
        assert torch.equal(sd[k], original[k]), k
    torch.testing.assert_close(hf_logits(fresh, GPT2_IDS), hf_logits(model, GPT2_IDS), rtol=0, atol=0)


def test_gpt2_import_checks_what_it_cannot_hold(hf_gpt2):
    """A checkpoint that does not fit the config is a ValueError naming the sizes, never a model
    that silently differs (fails today: only wte's shape and missing layers are checked)."""
    _, model = hf_gpt2
    sd = model.state_dict()
    # a position table shorter than max_seq: today a [32, h] embed.pos where the spec says [64, h],
    # then a RuntimeError deep in the forward of a 40-token sequence
    with pytest.raises(ValueError, match="wpe"):
        from_hf_gpt2(sd, gpt2_config(**{**HF_SIZES, "n_positions": 64}))
    # more layers than the config: today the second layer is silently dropped
    with pytest.raises(ValueError, match="h.1"):
        from_hf_gpt2(sd, gpt2_config(**{**HF_SIZES, "n_layer": 1}))


def test_gpt2_export_never_drops_an_untied_head():
    """to_hf_gpt2 of an untied model must export its own output layer (or refuse): today it writes
    lm_head.weight = wte and head.weight is silently lost."""
    cfg = gpt2_config(**HF_SIZES, tie_embeddings=False)
    params = init_gpt(cfg, 0)
    try:
        sd = to_hf_gpt2(params, cfg)
    except ValueError:
        return
    assert torch.equal(sd["lm_head.weight"], params["head.weight"][: cfg.vocab_size])


def test_gpt2_weights_split_over_tp_equal_serial(hf_gpt2, pool):
    _, model = hf_gpt2
    cfg = gpt2_config(**HF_SIZES)
    full = {k: v.double() for k, v in from_hf_gpt2(model.state_dict(), cfg).items()}
    want = logits_case(SERIAL, cfg, full, GPT2_IDS)
    torch.testing.assert_close(want.float(), hf_logits(model, GPT2_IDS), rtol=1e-5, atol=1e-5)
    for rank, got in enumerate(pool.run(logits_case, cfg, full, GPT2_IDS, tp=2)):
        assert_close(got, want, f"rank {rank}")


def hf_llama_family(kind: str, tied: bool = False, **extra):
    """A randomly initialised LlamaForCausalLM or MixtralForCausalLM (4 experts, top-2), eval mode, its
    weights jittered away from the init so that no tensor is trivially ones or zeros."""
    transformers = pytest.importorskip("transformers", reason="Llama / Mixtral weights are checked against HF")
    common = dict(vocab_size=37, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=500.0,
                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=None, pad_token_id=0, **extra)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4,
                                                                           num_experts_per_tok=2, **common))
    torch.manual_seed(0)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_((0.3 if p.dim() > 1 else 0.1) * rand(i, *p.shape).float())
    return model.eval()


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("mixtral", False)])
def test_llama_and_mixtral_weights_give_hugging_faces_logits_and_greedy_text(kind, tied):
    """What parallel ≡ serial cannot prove: that the serial rope, RMSNorm, SwiGLU, GQA and Mixtral's top-2
    experts (softmax, top-k, renormalised gates) are the usual ones. nanomeg.from_hf_llama (= from_hf_mixtral)
    on transformers' randomly initialised models: logits to 1e-5, the same greedy continuation, and
    to_hf_llama gives the state dict back exactly."""
    model = hf_llama_family(kind, tied)
    cfg = llama_config_from_hf(model.config.to_dict(), vocab_multiple=8)
    assert (cfg.experts, cfg.moe_topk, cfg.tie_embeddings) == ((4, 2) if kind == "mixtral" else (0, 1)) + (tied,)
    params = from_hf_llama(model.state_dict(), cfg)
    assert {k: v.shape for k, v in params.items()} == {k: shape for k, (shape, _) in gpt_shapes(cfg).items()}
    ids = randint(1, 37, 2, 9)
    torch.testing.assert_close(real_logits(params, ids, cfg, SERIAL), hf_logits(model, ids), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert generate(params, ids[:1], cfg, SERIAL, max_new_tokens=6, temperature=0.0).tolist() == want.tolist()
    back, sd = to_hf_llama(params, cfg), model.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert llama_config_from_hf(llama_hf_config(cfg), vocab_multiple=8) == cfg


def mixtral_case(mesh, cfg, full, ids):
    return real_logits(P.shard(full, gpt_specs(cfg), mesh), ids, cfg, mesh)


@pytest.mark.parametrize("tp,ep", [(2, 2), (1, 4), (4, 1)])
def test_mixtral_cut_over_tensor_and_expert_parallel_ranks_gives_hugging_faces_logits(pool, tp, ep):
    """The imported Mixtral on 4 ranks, its experts split over ep and inside over tp: every rank's gathered
    logits equal transformers' (float32, 1e-5)."""
    model = hf_llama_family("mixtral")
    cfg = llama_config_from_hf(model.config.to_dict(), vocab_multiple=8 * tp)
    full, ids = from_hf_llama(model.state_dict(), cfg), randint(2, 37, 2, 8)
    want = hf_logits(model, ids)
    for rank, got in enumerate(pool.run(mixtral_case, cfg, full, ids, tp=tp, ep=ep)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {rank}: {m}")


def test_mixtral_older_per_expert_tensors_load_too():
    """Checkpoints saved before transformers 5 name each expert (block_sparse_moe.experts.{j}.w1 gate, w3 up,
    w2 down): they give the same parameters as the fused tensors."""
    model = hf_llama_family("mixtral")
    cfg = llama_config_from_hf(model.config.to_dict(), vocab_multiple=8)
    sd = model.state_dict()
    old = {k: v for k, v in sd.items() if ".mlp." not in k}
    for i in range(cfg.layers):
        gate, up = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"].chunk(2, dim=1)
        old[f"model.layers.{i}.block_sparse_moe.gate.weight"] = sd[f"model.layers.{i}.mlp.gate.weight"]
        for j in range(cfg.experts):
            for name, t in (("w1", gate[j]), ("w3", up[j]), ("w2", sd[f"model.layers.{i}.mlp.experts.down_proj"][j])):
                old[f"model.layers.{i}.block_sparse_moe.experts.{j}.{name}.weight"] = t
    assert_close(from_hf_llama(old, cfg), from_hf_llama(sd, cfg), "per-expert import", dict(rtol=0, atol=0))


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling.rope_type='linear'"),
    (dict(model_type="gpt2"), "model_type='gpt2': nanomeg's Llama / Mixtral import computes only 'llama' or 'mixtral'"),
])
def test_llama_configs_nanomeg_cannot_hold_are_refused(change, message):
    hf = hf_llama_family("llama").config.to_dict()
    if "rope_scaling" in change:
        hf.pop("rope_parameters", None)
    with pytest.raises(ValueError, match=re.escape(message)):
        llama_config_from_hf({**hf, **change})


def test_llama_import_refuses_a_wrong_or_sharded_state_dict():
    model = hf_llama_family("mixtral")
    cfg = llama_config_from_hf(model.config.to_dict(), vocab_multiple=8)
    sd = model.state_dict()
    with pytest.raises(ValueError, match=r"not a Mixtral state dict for this config: missing 'model.layers.1.mlp.gate.weight \(or the older "
                       r"model.layers.1.block_sparse_moe.gate.weight\)'"):
        from_hf_llama({k: v for k, v in sd.items() if not k.startswith("model.layers.1.mlp")}, cfg)
    with pytest.raises(ValueError, match=r"layers.0.moe.fc1.weight: the checkpoint gives shape \(4, 40, 32\), the "
                                         r"config needs \(4, 48, 32\)"):
        from_hf_llama({**sd, "model.layers.0.mlp.experts.gate_up_proj": sd["model.layers.0.mlp.experts.gate_up_proj"][
            :, :40]}, cfg)
    with pytest.raises(ValueError, match=r"Llama / Mixtral cannot hold this config: \{'moe_capacity': 1.0\}"):
        from_hf_llama(sd, replace(cfg, moe_capacity=1.0))
    params = from_hf_llama(sd, cfg)
    with pytest.raises(ValueError, match="one rank's tensor-parallel shards"):
        to_hf_llama({**params, "layers.0.moe.fc1.weight": params["layers.0.moe.fc1.weight"][:2]}, cfg)


# ---------------------------------------------------------------------------------------------------
# 5. Bad configs and inputs: ValueErrors that name the values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden=30, heads=4), "hidden=30 is not divisible by heads=4"),
    (dict(heads=4, kv_heads=3), "heads=4 is not divisible by kv_heads=3"),
    (dict(heads=4, kv_heads=0), "kv_heads must be >= 1, got 0"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of ('layernorm', 'rmsnorm')"),
    (dict(activation="tanh"), "activation='tanh' is not one of"),
    (dict(position="alibi"), "position='alibi' is not one of"),
    (dict(recompute="some"), "recompute='some' is not one of"),
    (dict(hidden_dropout=1.0), "hidden_dropout must be in [0, 1), got 1.0"),
    (dict(attention_dropout=-0.1), "attention_dropout must be in [0, 1), got -0.1"),
    (dict(label_smoothing=1.0), "label_smoothing must be in [0, 1), got 1.0"),
    (dict(hidden=12, heads=4, position="rope"), "rotary embeddings need an even head dim, got 3"),
    (dict(attention="sdpa", attention_dropout=0.1), "attention_dropout=0.1"),
    (dict(layers=0), "layers must be >= 1, got 0"),
    (dict(vocab_size=0), "vocab_size must be >= 1, got 0"),
    (dict(ffn=0), "ffn must be >= 1, got 0"),  # fails today: ffn is not checked (0 builds an empty MLP)
])
def test_bad_config_names_the_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GPTConfig(**kwargs)


def bad_input_case(mesh):
    """Every case must raise ValueError on every rank before any collective."""
    cfg = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2)
    params = P.shard(init_gpt(cfg, 0), gpt_specs(cfg), mesh)
    ids = torch.zeros(1, 4, dtype=torch.int64)
    unsplittable = lambda **kw: (lambda: gpt_logits(init_gpt(replace(cfg, **kw), 0), ids, replace(cfg, **kw), mesh))
    cases = [
        unsplittable(hidden=12, heads=3, kv_heads=3),
        unsplittable(hidden=12, heads=6, kv_heads=3),
        unsplittable(ffn=5),
        lambda: gpt_logits(params, torch.zeros(1, 9, dtype=torch.int64), cfg, mesh),
        lambda: gpt_logits(params, torch.tensor([[1, 10, 2, 3]]), cfg, mesh),  # 10 is a padded id: not a token
        lambda: gpt_logits(params, torch.zeros(1, 3, dtype=torch.int64), replace(cfg, sequence_parallel=True), mesh),
        lambda: gpt_loss(params, ids, torch.tensor([[0, 1, 11, 2]]), cfg, mesh),
        lambda: generate(params, ids, cfg, mesh, 5),
    ]
    return value_errors_then_in_step(cases, mesh)


def test_bad_input_raises_on_every_rank_and_nothing_hangs(pool):
    want = ["tp=2 does not divide heads=3", "tp=2 and kv_heads=3: one must divide the other",
            "tp=2 does not divide ffn=5",
            "sequence of 9 tokens is longer than max_seq=8", "token id 10 out of range [0, 10)",
            "sequence parallel needs seq % tp == 0, got seq=3, tp=2", "target id 11 out of range [0, 10)",
            "prompt of 4 + 5 new tokens is longer than max_seq=8", 2.0]
    for rank, messages in enumerate(pool.run(bad_input_case, tp=2)):
        for got, expected in zip(messages, want, strict=True):
            ok = got == expected if isinstance(expected, float) else (got is not None and expected in got)
            assert ok, f"rank {rank}: {got!r}, want {expected!r}"


def test_check_mesh_and_check_seq():
    cfg = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=8, hidden=12, heads=6, kv_heads=3, ffn=8)
    cfg.check_mesh(P.Mesh(tp=1))
    for tp, message in [(4, "tp=4 does not divide heads=6"), (2, "tp=2 and kv_heads=3: one must divide the other"),
                        (3, "tp=3 does not divide ffn=8")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            cfg.check_mesh(P.Mesh(tp=tp))
    with pytest.raises(ValueError, match=re.escape("tp=8 does not divide padded vocab=12")):
        replace(cfg, heads=8, kv_heads=8, hidden=16, ffn=16).check_mesh(P.Mesh(tp=8))
    with pytest.raises(ValueError, match=re.escape("sequence of 9 tokens is longer than max_seq=8")):
        cfg.check_seq(5, SERIAL, pos_offset=4)
    cfg.check_seq(4, SERIAL, pos_offset=4)  # exactly max_seq is fine


# ---------------------------------------------------------------------------------------------------
# 6. Megatron's init, the sharding specs, shard / unshard
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, zero_centered, bias, tie", [("layernorm", False, True, True),
                                                            ("rmsnorm", True, False, False)])
def test_init_is_megatrons(norm, zero_centered, bias, tie):
    layers = 4
    cfg = GPTConfig(vocab_size=1000, max_seq=256, layers=layers, hidden=256, heads=4, norm=norm,
                    zero_centered_gamma=zero_centered, bias=bias, tie_embeddings=tie)
    params = init_gpt(cfg, seed=3, dtype=torch.float64)
    shapes = gpt_shapes(cfg)
    assert list(params) == list(shapes) and all(params[k].shape == shapes[k][0] for k in shapes)
    assert all(p.dtype == torch.float64 for p in params.values())
    assert params["embed.word"].shape == (1024, 256)  # padded to a multiple of 128
    scaled = 0.02 / math.sqrt(2 * layers)
    for name, p in params.items():
        if p.dim() == 2:
            std = scaled if name.endswith(("attn.proj.weight", "mlp.fc2.weight")) else 0.02
            assert abs(p.std().item() / std - 1) < 0.03, (name, p.std().item(), std)
            assert abs(p.mean().item()) < 5 * std / math.sqrt(p.numel()), name
        elif name.endswith(".bias"):
            assert not p.any(), name
        else:  # a norm weight: the gain 1, stored as 0 when zero-centred
            assert torch.equal(p, torch.full_like(p, 0.0 if zero_centered else 1.0)), name
    assert ("layers.0.ln1.bias" in params) == (norm == "layernorm")
    assert ("layers.0.attn.qkv.bias" in params) == bias and ("head.weight" in params) == (not tie)
    # a pure function of the seed, and every matrix drawn afresh
    assert all(torch.equal(p, q) for p, q in zip(params.values(), init_gpt(cfg, 3, torch.float64).values()))
    assert not torch.equal(params["embed.word"], init_gpt(cfg, 4, torch.float64)["embed.word"])
    assert not torch.equal(params["layers.0.attn.qkv.weight"][:256], params["layers.1.attn.qkv.weight"][:256])


def test_specs_cover_every_parameter_as_the_design_table_says():
    cfg = GPTConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=2, hidden=8, heads=2, kv_heads=1,
                    activation="swiglu", tie_embeddings=False)
    specs = gpt_specs(cfg)
    assert specs.keys() == gpt_shapes(cfg).keys() == init_gpt(cfg).keys()
    qkv = P.HeadGroups(groups=1, q_per_group=2, head_dim=4)  # rows [q0, q1, k, v] of the one kv head
    table = {"embed.word": 0, "head.weight": 0, "embed.pos": None, "final_norm.weight": None,
             "final_norm.bias": None}
    for i in range(cfg.layers):
        table |= {f"layers.{i}.{k}": v for k, v in {
            "ln1.weight": None, "ln1.bias": None, "ln2.weight": None, "ln2.bias": None,
            "attn.qkv.weight": qkv, "attn.qkv.bias": qkv, "attn.proj.weight": 1, "attn.proj.bias": None,
            "mlp.fc1.weight": 0, "mlp.fc1.bias": 0, "mlp.fc2.weight": 1, "mlp.fc2.bias": None}.items()}
    assert specs == table
    assert gpt_shapes(cfg)["layers.0.attn.qkv.weight"][0] == ((2 + 2 * 1) * 4, 8)
    assert gpt_shapes(cfg)["layers.0.mlp.fc1.weight"][0] == (2 * 32, 8)


def shard_roundtrip_case(mesh, cfg, full):
    specs = gpt_specs(cfg)
    shards = P.shard(full, specs, mesh)
    return dict(shapes={k: tuple(v.shape) for k, v in shards.items()}, full=P.unshard(shards, specs, mesh))


def test_shard_unshard_round_trip_at_tp4(pool):
    cfg = GPTConfig(vocab_size=13, vocab_multiple=4, max_seq=8, layers=2, hidden=16, heads=4, activation="swiglu",
                    tie_embeddings=False)
    full, specs = init_gpt(cfg, 0, torch.float64), gpt_specs(cfg)
    for rank, got in enumerate(pool.run(shard_roundtrip_case, cfg, full, tp=4)):
        for name, p in full.items():
            want = list(p.shape)
            if specs[name] is not None:
                want[0 if isinstance(specs[name], P.HeadGroups) else specs[name]] //= 4
            assert got["shapes"][name] == tuple(want), (rank, name)
            assert torch.equal(got["full"][name], p), (rank, name)


def test_replace_re_derives_the_default_sizes():
    """kv_heads and ffn left at None follow heads and hidden through dataclasses.replace."""
    cfg = GPTConfig(hidden=16, heads=4)
    wider = replace(cfg, hidden=32, heads=8)
    assert (wider.num_kv_heads, wider.ffn_hidden) == (8, 128)
    assert (replace(cfg, kv_heads=2).num_kv_heads, replace(cfg, ffn=7).ffn_hidden) == (2, 7)


def test_init_does_not_depend_on_the_layout():
    """Each tensor is drawn from its own (seed, name) generator, the real vocabulary rows before padding:
    the padding multiple train.py sets for tp = 1, 2, 4 (128·tp), the layer count and the other switches
    change none of the shared tensors; padded rows are zeros. (Before, one generator drew everything in
    order, so a larger padded embedding shifted every later weight.)"""
    base = GPTConfig(vocab_size=200, layers=2, hidden=16, heads=4, tie_embeddings=False)
    inits = {tp: init_gpt(replace(base, vocab_multiple=128 * tp), seed=9) for tp in (1, 2, 4)}
    for tp, params in inits.items():
        for name, p in params.items():
            if name in ("embed.word", "head.weight"):
                assert p.shape[0] == 256 * (1 if tp < 4 else 2) and not p[200:].any(), (tp, name)
                p = p[:200]
            ref = inits[1][name][:200] if name in ("embed.word", "head.weight") else inits[1][name]
            assert torch.equal(p, ref), (tp, name)
    deeper = init_gpt(replace(base, layers=3, vocab_multiple=128), seed=9)  # the scaled std is 0.02/sqrt(2·layers)
    for k, v in inits[1].items():
        scale = math.sqrt(4 / 6) if k.endswith(("attn.proj.weight", "mlp.fc2.weight")) else 1.0
        torch.testing.assert_close(deeper[k], v * scale, rtol=1e-6, atol=0, msg=k)
    assert not torch.equal(init_gpt(base, seed=10)["embed.word"], inits[1]["embed.word"])
    assert not torch.equal(inits[1]["layers.0.attn.qkv.weight"], inits[1]["layers.1.attn.qkv.weight"])
