"""nanomeg.py's BERT (sections 7 and 8): cut over tensor and sequence parallel ranks, it equals the serial model.

Each case is a module-level function `case(mesh, ...)` run on every rank of the worker pool with a tp>1 mesh,
and here in the test process on `Mesh.serial()`, as in test_gpt.py.

1. proven equal: hypothesis draws whole BERTs (post / pre norm, binary head, GQA with kv heads replicated over
   tp, token types, dropout, SDPA, recompute, sequence parallel) with padded batches, for the three tasks
   (pretrain: MLM + NSP; classify; multiple choice); loss, logits and every gathered gradient equal serial;
2. the padding mask is real: padded tokens never reach a real position, padded queries see nothing (zeros);
3. communication: one step moves exactly the collectives derived by hand (`bert_comms`);
4. Hugging Face BertFor* / MegatronBertFor* weights give Hugging Face's logits, and go back out unchanged;
5. bad configs, inputs and checkpoints are ValueErrors that name the values, raised on every rank.
"""

import re
from dataclasses import replace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from common import SERIAL, TOL, assert_close, jittered, padding, rand, randint
from harness import value_errors_then_in_step
from hypothesis import example, given, settings
from hypothesis import strategies as st

import parallel as P
from nanomeg import (
    BertConfig,
    GPTConfig,
    bert_attention_mask,
    bert_classify,
    bert_config_from_hf,
    bert_encode,
    bert_loss,
    bert_multiple_choice,
    bert_pretrain,
    bert_shapes,
    bert_specs,
    core_attention,
    from_hf_bert,
    gpt2_config,
    init_bert,
    init_gpt,
    sdpa_attention,
    to_hf_bert,
    to_hf_gpt2,
)

HF_TOL = dict(rtol=1e-5, atol=1e-5)




def bert_params(cfg: BertConfig, seed: int, dtype=torch.float64) -> dict:
    """init_bert's parameters with every norm weight and bias jittered (common.jittered)."""
    return jittered(init_bert(cfg, seed, dtype), seed)




# ---------------------------------------------------------------------------------------------------
# Drawing a valid BERT, a padded batch and a layout
# ---------------------------------------------------------------------------------------------------


class BertCase(NamedTuple):
    tp: int
    cfg: BertConfig
    b: int
    k: int  # choices per question (multiple_choice); 1 otherwise
    s: int
    real: tuple  # per sequence (b * k of them): 1 at a real token, 0 at padding; [CLS] (position 0) always real
    seed: int


@st.composite
def bert_cases(draw, task: str, tps=(1, 2, 4)):
    """A BertConfig for `task`, a padded batch and a tp that can split it: heads a multiple of tp; kv_heads
    dividing the heads, with tp dividing kv_heads or (kv heads replicated) kv_heads dividing tp; the sequence
    a multiple of tp under sequence parallel; a vocabulary never a multiple of 4 (always padded, to a multiple
    of vocab_multiple = 4, which every tp divides)."""
    tp = draw(st.sampled_from(tps))
    heads = draw(st.sampled_from([n for n in range(tp, 9, tp)]))
    kv_heads = draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0 and (g % tp == 0 or
                                                                                          tp % g == 0)]))
    position = draw(st.sampled_from(["learned", "learned", "rope", "relative"]))
    head_dim = draw(st.sampled_from([d for d in ((2, 3, 4) if position == "learned" else (2, 4))
                                     if heads * d <= 32]))
    sp = draw(st.booleans())  # a no-op at tp = 1
    s = tp * draw(st.integers(max(1, 2 // tp), 8 // tp)) if sp else draw(st.integers(2, 8))
    attention_dropout = draw(st.sampled_from([0.0, 0.0, 0.25]))
    cfg = BertConfig(
        vocab_size=4 * draw(st.integers(1, 5)) + draw(st.integers(1, 3)), vocab_multiple=4,
        max_seq=s + draw(st.integers(0, 3)), layers=draw(st.integers(1, 2)),
        hidden=heads * head_dim, heads=heads, kv_heads=kv_heads,
        ffn=draw(st.sampled_from([None, tp, 2 * tp, 3 * tp])),
        norm=draw(st.sampled_from(["layernorm", "layernorm", "rmsnorm"])), norm_eps=1e-5,
        activation=draw(st.sampled_from(["gelu", "gelu_tanh"])), position=position, bias=draw(st.booleans()),
        rel_buckets=draw(st.integers(4, 10)), rel_max_distance=draw(st.integers(6, 12)),
        norm_order=draw(st.sampled_from(["pre", "post"])), type_vocab=draw(st.sampled_from([0, 1, 2, 3])),
        hidden_dropout=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])), attention_dropout=attention_dropout,
        attention="core" if attention_dropout else draw(st.sampled_from(["core", "sdpa"])),
        recompute=draw(st.sampled_from(["none", "selective", "full"])), sequence_parallel=sp,
        init_std=draw(st.sampled_from([0.02, 0.3])), task=task,
        binary_head=draw(st.booleans()) if task == "pretrain" else True,
        num_classes=draw(st.integers(1, 4)) if task == "classify" else 2,
        label_smoothing=draw(st.sampled_from([0.0, 0.1])) if task == "pretrain" else 0.0,
    )
    b = draw(st.integers(1, 2 if task == "multiple_choice" else 3))
    k = draw(st.integers(1, 3)) if task == "multiple_choice" else 1
    return BertCase(tp, cfg, b, k, s, draw(padding(b * k, s)), draw(st.integers(0, 2**16)))


def reference_config(cfg: BertConfig) -> BertConfig:
    """What the serial reference runs: no sequence parallel, no recompute, the core attention."""
    return replace(cfg, sequence_parallel=False, recompute="none", attention="core")


def bert_inputs(case: BertCase) -> dict:
    """ids, token types, the attention mask and the task's targets; shaped [b, s] ([b, K, s] for multiple
    choice). The MLM mask picks some real positions (never padding, at least one)."""
    cfg, seed, n, s = case.cfg, case.seed, case.b * case.k, case.s
    shape = (case.b, case.k, s) if cfg.task == "multiple_choice" else (case.b, s)
    real = torch.tensor(case.real, dtype=torch.int64)  # [n, s]
    out = dict(ids=randint(seed, cfg.vocab_size, n, s).reshape(shape), attention_mask=real.reshape(shape),
               token_types=randint(seed + 1, cfg.type_vocab, n, s).reshape(shape) if cfg.type_vocab else None)
    if cfg.task == "pretrain":
        chosen = (rand(seed + 2, n, s) > 0) & real.bool()
        chosen[0, 0] = True
        out |= dict(mlm_targets=randint(seed + 3, cfg.vocab_size, n, s), mlm_mask=chosen.double(),
                    nsp_labels=randint(seed + 4, 2, n) if cfg.binary_head else None)
    else:
        out["labels"] = randint(seed + 5, cfg.num_classes if cfg.task == "classify" else case.k, case.b)
    return out


def case_of(task, tp, s, real, b=None, k=1, seed=0, **cfg) -> BertCase:
    """A hand-written case (for @example)."""
    b = len(real) // k if b is None else b
    return BertCase(tp, BertConfig(task=task, vocab_multiple=4, norm_eps=1e-5, **cfg), b, k, s, real, seed)


# Hand-picked cases that the derandomised draws must never miss.
POST_SP_TP4 = case_of(
    "pretrain", 4, 8, ((1,) * 8, (1, 1, 1, 1, 1, 0, 0, 0), (1,) + (0,) * 7), seed=11,
    vocab_size=21, max_seq=10, layers=2, hidden=32, heads=8, kv_heads=2, ffn=12, norm_order="post", type_vocab=3,
    hidden_dropout=0.1, attention_dropout=0.25, recompute="full", sequence_parallel=True, init_std=0.3,
    label_smoothing=0.1)
PRE_NO_BINARY_TP2 = case_of(
    "pretrain", 2, 5, ((1, 1, 1, 0, 0), (1, 0, 1, 1, 0)), seed=5, vocab_size=13, max_seq=7, layers=2, hidden=12,
    heads=4, kv_heads=1, norm_order="pre", binary_head=False, attention="sdpa", recompute="selective",
    hidden_dropout=0.5, init_std=0.3)
MC_SP_TP2 = case_of(
    "multiple_choice", 2, 4, ((1, 1, 1, 0), (1, 0, 0, 0), (1, 1, 1, 1), (1, 1, 0, 0), (1, 0, 1, 0), (1, 1, 1, 1)),
    k=3, seed=3, vocab_size=9, max_seq=6, layers=2, hidden=16, heads=4, kv_heads=2, norm_order="post",
    hidden_dropout=0.1, attention="sdpa", sequence_parallel=True, init_std=0.3)
CLASSIFY_SP_TP2 = case_of(
    "classify", 2, 6, ((1, 1, 1, 1, 0, 0), (1,) + (0,) * 5), seed=7, vocab_size=15, max_seq=6, layers=1, hidden=8,
    heads=2, num_classes=3, norm_order="pre", hidden_dropout=0.1, attention_dropout=0.1, sequence_parallel=True,
    recompute="full", init_std=0.3)


# ---------------------------------------------------------------------------------------------------
# 1. Proven equal: losses, logits and every gathered gradient
# ---------------------------------------------------------------------------------------------------


def bert_step_case(mesh, cfg, full, inputs, seed):
    """One forward + backward of this rank's shards, dropout on: the task's loss (pretrain: bert_loss, MLM +
    NSP; classify / multiple choice: cross-entropy of the logits), the gathered logits, every gathered
    gradient, and the collectives the step issued (the pretrain logits are recomputed outside the count)."""
    specs = bert_specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}
    common = dict(token_types=inputs["token_types"], attention_mask=inputs["attention_mask"], seed=seed,
                  training=True)
    out = {}
    with P.count_comms() as records:
        if cfg.task == "pretrain":
            total, mlm, nsp = bert_loss(params, inputs["ids"], cfg, mesh, mlm_targets=inputs["mlm_targets"],
                                        mlm_mask=inputs["mlm_mask"], nsp_labels=inputs["nsp_labels"], **common)
            out["losses"] = [total.detach(), mlm.detach(), None if nsp is None else nsp.detach()]
        else:
            head = bert_classify if cfg.task == "classify" else bert_multiple_choice
            logits = head(params, inputs["ids"], cfg, mesh, **common)
            total = F.cross_entropy(logits, inputs["labels"])
            out["losses"], out["logits"] = [total.detach()], logits.detach()
        total.backward()
    if cfg.task == "pretrain":
        with torch.no_grad():
            mlm_logits, nsp_logits = bert_pretrain(params, inputs["ids"], cfg, mesh, **common)
        out["logits"], out["nsp"] = P.all_gather(mlm_logits, mesh, "tp", -1), nsp_logits
    out["grads"] = P.unshard({k: p.grad for k, p in params.items()}, specs, mesh)
    out["comms"] = sorted((c["phase"], c["op"], c["dim"], c["elements"]) for c in records)
    return out


def check_parallel_equals_serial(pool, case: BertCase):
    cfg, inputs = case.cfg, bert_inputs(case)
    full = bert_params(cfg, case.seed)
    want = bert_step_case(SERIAL, reference_config(cfg), full, inputs, case.seed)
    del want["comms"]
    # the reference is a model: finite, padded vocabulary gets no gradient, the outputs have the task's shape
    assert all(torch.isfinite(x).all() for x in want["losses"] if x is not None), want["losses"]
    assert all(torch.isfinite(g).all() for g in want["grads"].values())
    if cfg.task == "pretrain":
        n = case.b * case.k
        assert want["logits"].shape == (n, case.s, cfg.padded_vocab)
        assert torch.isfinite(want["logits"][..., : cfg.vocab_size]).all()
        assert (want["logits"][..., cfg.vocab_size:] == float("-inf")).all(), "padded vocabulary is not -inf"
        assert (want["nsp"] is None) == (not cfg.binary_head) and (want["losses"][2] is None) == (not cfg.binary_head)
        if cfg.binary_head:
            assert want["nsp"].shape == (n, 2)
        for name in ("embed.word", "lm_head.bias"):
            assert not want["grads"][name][cfg.vocab_size:].any(), f"padded rows of {name} got a gradient"
    else:
        assert want["logits"].shape == ((case.b, cfg.num_classes) if cfg.task == "classify" else (case.b, case.k))
    for rank, got in enumerate(pool.run(bert_step_case, cfg, full, inputs, case.seed, tp=case.tp)[:case.tp]):
        del got["comms"]
        assert_close(got, want, f"rank {rank} (tp={case.tp})")


@settings(max_examples=2 * settings().max_examples)  # the model that matters most: twice the profile's
@example(case=POST_SP_TP4)
@example(case=PRE_NO_BINARY_TP2)
@given(case=bert_cases("pretrain"))
def test_parallel_bert_pretraining_equals_serial(pool, case):
    check_parallel_equals_serial(pool, case)


@example(case=CLASSIFY_SP_TP2)
@given(case=bert_cases("classify"))
def test_parallel_bert_classification_equals_serial(pool, case):
    check_parallel_equals_serial(pool, case)


@example(case=MC_SP_TP2)
@given(case=bert_cases("multiple_choice"))
def test_parallel_bert_multiple_choice_equals_serial(pool, case):
    check_parallel_equals_serial(pool, case)


def test_bert_loss_is_the_masked_mlm_mean_plus_nsp_in_float64():
    """bert_loss is what its docstring says, at the model's precision: the MLM cross-entropy averaged over the
    chosen positions only, plus the next-sentence cross-entropy. (Fails today: the NSP term is computed with
    nsp_logits.float(), i.e. in float32 for a float64 model: the loss is off by ~1e-8 and returned as float32.)"""
    case = POST_SP_TP4._replace(tp=1)
    cfg = replace(case.cfg, sequence_parallel=False, label_smoothing=0.0)
    inputs, full = bert_inputs(case._replace(cfg=cfg)), bert_params(cfg, case.seed)
    common = dict(token_types=inputs["token_types"], attention_mask=inputs["attention_mask"], training=False)
    mlm_logits, nsp_logits = bert_pretrain(full, inputs["ids"], cfg, SERIAL, **common)
    total, mlm, nsp = bert_loss(full, inputs["ids"], cfg, SERIAL, mlm_targets=inputs["mlm_targets"],
                                mlm_mask=inputs["mlm_mask"], nsp_labels=inputs["nsp_labels"], **common)
    chosen = inputs["mlm_mask"].bool()
    want_mlm = F.cross_entropy(mlm_logits[chosen][:, : cfg.vocab_size], inputs["mlm_targets"][chosen])
    want_nsp = F.cross_entropy(nsp_logits, inputs["nsp_labels"])
    tight = dict(rtol=1e-12, atol=1e-14)
    assert_close(mlm, want_mlm, "MLM loss", tight)
    assert_close(nsp, want_nsp, "NSP loss (float64 model)", tight)
    assert_close(total, want_mlm + want_nsp, "total loss", tight)
    # without the binary head: the MLM loss alone
    plain = replace(cfg, binary_head=False)
    params = {k: v for k, v in full.items() if not k.startswith(("pooler.", "binary_head."))}
    got = bert_loss(params, inputs["ids"], plain, SERIAL, mlm_targets=inputs["mlm_targets"],
                    mlm_mask=inputs["mlm_mask"], **common)
    assert got[2] is None and got[0] is got[1]
    assert_close(got[0], want_mlm, "MLM loss without the binary head", tight)


def test_dropout_is_on_in_every_bert_head():
    """The equivalences above mean little if dropout were silently off: it changes the pretraining and the
    classification outputs, and depends on the seed only."""
    case = POST_SP_TP4._replace(tp=1)
    cfg = replace(case.cfg, sequence_parallel=False, attention_dropout=0.0)
    inputs, full = bert_inputs(case._replace(cfg=cfg)), bert_params(cfg, case.seed)
    common = dict(token_types=inputs["token_types"], attention_mask=inputs["attention_mask"])
    run = lambda seed, training: bert_pretrain(full, inputs["ids"], cfg, SERIAL, seed=seed, training=training,
                                               **common)
    assert not torch.equal(run(1, True)[0], run(2, True)[0])
    assert torch.equal(run(1, True)[1], run(1, True)[1]) and torch.equal(run(1, False)[0], run(2, False)[0])
    ccfg = replace(cfg, task="classify", num_classes=3, hidden_dropout=0.5)
    cparams = bert_params(ccfg, 1)
    classify = lambda seed, training: bert_classify(cparams, inputs["ids"], ccfg, SERIAL, seed=seed,
                                                    training=training, **common)
    assert not torch.equal(classify(1, True), classify(2, True))
    assert torch.equal(classify(1, False), classify(2, False))


# ---------------------------------------------------------------------------------------------------
# 2. The padding mask is real
# ---------------------------------------------------------------------------------------------------

MASK_REAL = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0],
                          [1, 0, 1, 1, 0, 1, 0, 0]])


@pytest.mark.parametrize("attention", ["core", "sdpa"])
@pytest.mark.parametrize("norm_order", ["post", "pre"])
def test_padded_tokens_never_reach_real_positions(attention, norm_order):
    cfg = BertConfig(vocab_size=23, vocab_multiple=4, max_seq=8, layers=2, hidden=16, heads=4, ffn=24,
                     type_vocab=3, norm_order=norm_order, attention=attention, norm_eps=1e-5, init_std=0.3)
    full = bert_params(cfg, 3)
    ids, types = randint(1, 23, 4, 8), randint(2, 3, 4, 8)
    pad = MASK_REAL == 0
    swapped = dict(ids=torch.where(pad, (ids + 5) % 23, ids), types=torch.where(pad, (types + 1) % 3, types))
    run = lambda ids, types: bert_pretrain(full, ids, cfg, SERIAL, token_types=types, attention_mask=MASK_REAL)
    (mlm, nsp), (mlm_swapped, nsp_swapped) = run(ids, types), run(swapped["ids"], swapped["types"])
    assert torch.isfinite(mlm[..., :23]).all() and torch.isfinite(mlm_swapped[..., :23]).all()
    torch.testing.assert_close(mlm_swapped[~pad], mlm[~pad], **TOL)
    torch.testing.assert_close(nsp_swapped, nsp, **TOL)
    # while a padded position's own logits do change (the swap is seen where it stands)
    assert not torch.allclose(mlm_swapped[pad], mlm[pad])
    encode = lambda ids, types: bert_encode(full, ids, cfg, SERIAL, token_types=types, attention_mask=MASK_REAL)
    torch.testing.assert_close(encode(swapped["ids"], swapped["types"])[~pad], encode(ids, types)[~pad], **TOL)
    # a classifier over the same encoder: its logits see only real tokens too
    ccfg = replace(cfg, task="classify", num_classes=3)
    cparams = bert_params(ccfg, 4)
    classify = lambda ids, types: bert_classify(cparams, ids, ccfg, SERIAL, token_types=types,
                                                attention_mask=MASK_REAL)
    torch.testing.assert_close(classify(swapped["ids"], swapped["types"]), classify(ids, types), **TOL)
    # and the padding mask is not a no-op: without it, the swap reaches the real positions
    unmasked = bert_pretrain(full, swapped["ids"], cfg, SERIAL, token_types=swapped["types"])[0]
    assert not torch.allclose(unmasked[~pad], bert_pretrain(full, ids, cfg, SERIAL, token_types=types)[0][~pad])


def test_bert_attention_mask_is_megatrons():
    """A pair (query, key) is masked when either is padding: [b, 1, s, s], True = masked."""
    real = torch.tensor([[1, 1, 0], [1, 0, 1]])
    got = bert_attention_mask(real, torch.zeros(2, 3, dtype=torch.int64))
    want = torch.tensor([[[0, 0, 1], [0, 0, 1], [1, 1, 1]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]]]).bool()[:, None]
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert torch.equal(bert_attention_mask(real.bool(), torch.zeros(2, 3, dtype=torch.int64)), want)
    assert bert_attention_mask(None, torch.zeros(2, 3, dtype=torch.int64)) is None


@pytest.mark.parametrize("attention", ["core", "sdpa"])
def test_padded_queries_attend_to_nothing(attention):
    """After attention a padded query's row is exactly zeros, in both paths (SDPA alone would give NaN for a
    row with no key to see); a real query's row is the softmax over the real keys only; nothing is NaN,
    forward or backward, and padded keys and values get no gradient."""
    b, n, g, s, d = 4, 4, 2, 8, 3
    q, k, v = rand(1, b, n, s, d), rand(2, b, g, s, d), rand(3, b, g, s, d)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    mask = bert_attention_mask(MASK_REAL, torch.zeros(b, s, dtype=torch.int64))
    if attention == "sdpa":
        out = sdpa_attention(q, k, v, mask_kind="padding", mask=mask)
    else:
        cfg = GPTConfig(hidden=n * d, heads=n, kv_heads=g)
        out = core_attention(q, k, v, cfg, SERIAL, mask_kind="padding", mask=mask, seed=0, stream=0, training=False)
    assert out.shape == (b, n, s, d) and torch.isfinite(out).all()
    pad = MASK_REAL == 0  # [b, s]
    assert (out.detach().permute(0, 2, 1, 3)[pad] == 0).all(), "a padded query's attention output is not zero"
    kk, vv = k.repeat_interleave(n // g, 1), v.repeat_interleave(n // g, 1)
    scores = (q @ kk.transpose(-1, -2) / d**0.5).masked_fill(pad[:, None, None, :], float("-inf"))
    want = scores.softmax(-1) @ vv
    real = ~pad
    torch.testing.assert_close(out.permute(0, 2, 1, 3)[real], want.permute(0, 2, 1, 3)[real], **TOL)
    (out * rand(4, b, n, s, d)).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"{name}: a NaN gradient"
        assert (t.grad.permute(0, 2, 1, 3)[pad] == 0).all(), f"a padded position's {name} got a gradient"


# ---------------------------------------------------------------------------------------------------
# 3. Communication: the count derived by hand
# ---------------------------------------------------------------------------------------------------


def bert_comms(cfg: BertConfig, b: int, s: int, tp: int) -> list[tuple]:
    """The tensor-parallel collectives of one forward + backward of a BERT (bert_loss, or a classify / multiple
    choice head; b counts every sequence, b*K for multiple choice), as (phase, op, dim, elements).
    The core as GPT (test_gpt.megatron_comms, README table); plus, under sequence parallel, one backward
    all-reduce per replicated parameter used on a sequence-parallel activation (token types: the whole
    table; post-norm: the embedding norm; the LM head's dense and norm), the pooler's all-gather of the
    sequence (its backward a split: nothing), and the LM output layer as GPT's (its vocab-parallel bias:
    nothing); and with more tp ranks than kv heads, per layer a backward all-reduce of the replicated
    k/v weight (g*2d*h) and bias (g*2d) gradients."""
    if tp == 1:
        return []
    h = cfg.hidden
    n, tokens = b * s * h, b * s
    fwd = lambda op, elements, times=1: [("forward", op, "tp", elements)] * times
    bwd = lambda op, elements, times=1: [("backward", op, "tp", elements)] * times
    norm = 2 if cfg.norm == "layernorm" else 1  # per norm: weight (and bias)
    pretrain = cfg.task == "pretrain"
    got = fwd("all_reduce", tokens, 4 if cfg.label_smoothing else 3) if pretrain else []  # vocab-parallel CE
    if cfg.num_kv_heads < tp:
        kv = cfg.num_kv_heads * 2 * cfg.head_dim
        got += bwd("all_reduce", kv * h, cfg.layers) + (bwd("all_reduce", kv, cfg.layers) if cfg.bias else [])
    if not cfg.sequence_parallel:
        got += fwd("all_reduce", n)  # embedding: the ranks' vocabulary rows summed
        got += fwd("all_reduce", n, 2 * cfg.layers) + bwd("all_reduce", n, 2 * cfg.layers)  # g / f per layer
        if pretrain:
            got += bwd("all_reduce", n)  # f before the column-parallel output layer
        return sorted(got)
    got += fwd("reduce_scatter", n) + bwd("all_gather", n)  # embedding
    if cfg.position == "learned":
        got += bwd("all_reduce", s * h)  # the position rows used
    if cfg.type_vocab:
        got += bwd("all_reduce", cfg.type_vocab * h)  # the token-type table
    if cfg.norm_order == "post":
        got += bwd("all_reduce", h, norm)  # the embedding norm
    for _ in range(cfg.layers):
        got += fwd("all_gather", n, 2) + fwd("reduce_scatter", n, 2)
        got += bwd("all_gather", n, 4) + bwd("reduce_scatter", n, 2)
        got += bwd("all_reduce", h, 2 * norm + (2 if cfg.bias else 0))  # ln1, ln2; proj and fc2 biases
    if cfg.norm_order == "pre":
        got += bwd("all_reduce", h, norm)  # the final norm
    if cfg.has_pooler:
        got += fwd("all_gather", n)  # the pooler reads [CLS], on rank 0's chunk: gather the sequence
    if pretrain:
        got += bwd("all_reduce", h * h) + bwd("all_reduce", h) + bwd("all_reduce", h, norm)  # LM dense, norm
        got += fwd("all_gather", n) + bwd("all_gather", n) + bwd("reduce_scatter", n)  # LM output layer
    return sorted(got)


COMM_CASES = {
    "post-pretrain": case_of("pretrain", 2, 4, ((1, 1, 0, 0), (1, 1, 1, 1), (1, 0, 0, 0)), seed=1, vocab_size=13,
                             max_seq=6, layers=2, hidden=12, heads=4, ffn=16, type_vocab=3, hidden_dropout=0.1),
    "pre-pretrain-no-binary": case_of("pretrain", 2, 4, ((1, 1, 0, 0), (1, 1, 1, 1)), seed=2, vocab_size=13,
                                      max_seq=4, layers=2, hidden=12, heads=4, norm_order="pre",
                                      binary_head=False, label_smoothing=0.1),
    "post-pretrain-rms-nobias": case_of("pretrain", 2, 6, ((1, 1, 1, 1, 1, 0),), seed=3, vocab_size=9, max_seq=6,
                                        layers=1, hidden=8, heads=2, norm="rmsnorm", bias=False),
    "pre-pretrain-mqa": case_of("pretrain", 2, 4, ((1, 1, 0, 0), (1, 1, 1, 0)), seed=4, vocab_size=13, max_seq=6,
                                layers=2, hidden=12, heads=2, kv_heads=1, norm_order="pre"),
    "classify": case_of("classify", 2, 4, ((1, 1, 0, 0), (1, 0, 0, 0)), seed=5, vocab_size=10, max_seq=4,
                        layers=2, hidden=8, heads=2, num_classes=3),
    "multiple-choice": case_of("multiple_choice", 2, 4, ((1, 1, 0, 0), (1, 0, 0, 0), (1, 1, 1, 1), (1, 1, 1, 0)),
                               k=2, seed=6, vocab_size=10, max_seq=4, layers=1, hidden=8, heads=2,
                               norm_order="pre"),
}


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("name", list(COMM_CASES))
def test_communication_is_the_derived_count(pool, name, sp):
    case = COMM_CASES[name]
    case = case._replace(cfg=replace(case.cfg, sequence_parallel=sp))
    cfg, inputs = case.cfg, bert_inputs(case)
    full = bert_params(cfg, case.seed)
    assert bert_step_case(SERIAL, cfg, full, inputs, case.seed)["comms"] == []  # a group of one
    want = bert_comms(cfg, case.b * case.k, case.s, case.tp)
    for rank, got in enumerate(pool.run(bert_step_case, cfg, full, inputs, case.seed, tp=case.tp)[:case.tp]):
        assert got["comms"] == want, f"rank {rank}: {name} sp={sp}"


def test_communication_formula_by_hand():
    """The formula for one model, counted by hand: post-norm, LayerNorm, biases, binary head, b=2, s=4,
    h=12, 3 layers, 2 token types, t=2."""
    cfg = BertConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=3, hidden=12, heads=2)
    b, s, h = 2, 4, 12
    n = b * s * h
    count = lambda recs, phase, op, elements: sum(c == (phase, op, "tp", elements) for c in recs)
    plain = bert_comms(cfg, b, s, tp=2)
    assert count(plain, "forward", "all_reduce", n) == 3 * 2 + 1  # 2 per layer + embedding
    assert count(plain, "backward", "all_reduce", n) == 3 * 2 + 1  # 2 per layer + the LM output layer
    assert count(plain, "forward", "all_reduce", b * s) == 3 and len(plain) == 17
    sp = bert_comms(replace(cfg, sequence_parallel=True), b, s, tp=2)
    assert count(sp, "forward", "all_gather", n) == 3 * 2 + 1 + 1  # 2 per layer + pooler + LM output layer
    assert count(sp, "forward", "reduce_scatter", n) == 3 * 2 + 1  # 2 per layer + embedding
    assert count(sp, "backward", "all_gather", n) == 3 * 4 + 1 + 1  # 4 per layer + embedding + LM output layer
    assert count(sp, "backward", "reduce_scatter", n) == 3 * 2 + 1  # 2 per layer + LM output layer
    # embedding norm (2), per layer ln1, ln2 (w, b), proj, fc2 biases (6), LM dense bias, LM norm (2)
    assert count(sp, "backward", "all_reduce", h) == 2 + 3 * 6 + 1 + 2
    assert count(sp, "backward", "all_reduce", h * h) == 1  # LM dense weight
    assert count(sp, "backward", "all_reduce", s * h) == 1  # positions
    assert count(sp, "backward", "all_reduce", 2 * h) == 1  # token types
    assert count(sp, "forward", "all_reduce", b * s) == 3 and len(sp) == 8 + 7 + 14 + 7 + 23 + 3 + 3
    assert bert_comms(cfg, b, s, tp=1) == []


# ---------------------------------------------------------------------------------------------------
# 4. Hugging Face weights: BertFor* (post-norm) and MegatronBertFor* (pre-norm), in and out
# ---------------------------------------------------------------------------------------------------

HF_SIZES = dict(vocab_size=37, hidden_size=12, num_attention_heads=3, num_hidden_layers=2, intermediate_size=20,
                max_position_embeddings=16, type_vocab_size=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
HF_REAL = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [1] * 8])  # [3, 8]
HF_IDS, HF_TYPES = randint(7, 37, 3, 8), randint(8, 2, 3, 8)
HF_TASKS = {"PreTraining": "pretrain", "SequenceClassification": "classify", "MultipleChoice": "multiple_choice"}
_HF_MODELS = {}


def hf_model(kind: str, head: str, **sizes):
    """A random transformers Bert/MegatronBert ForPreTraining / ForSequenceClassification / ForMultipleChoice
    with an odd vocabulary (37) and, unless `sizes` say otherwise, an odd head count (3); every parameter
    jittered (biases 0 and gains 1 at init would hide a mis-ordered bias)."""
    transformers = pytest.importorskip("transformers", reason="BERT weights are checked against Hugging Face")
    key = (kind, head, tuple(sorted(sizes.items())))
    if key not in _HF_MODELS:
        prefix = {"bert": "Bert", "megatron": "MegatronBert"}[kind]
        config = getattr(transformers, f"{prefix}Config")(**(HF_SIZES | sizes), num_labels=3)
        torch.manual_seed(0)
        model = getattr(transformers, f"{prefix}For{head}")(config).eval()
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.1 * rand(i, *p.shape).float())
        _HF_MODELS[key] = model
    return _HF_MODELS[key]


def nanomeg_config(model, **overrides) -> BertConfig:
    task = HF_TASKS[type(model).__name__.split("For")[-1]]
    return bert_config_from_hf(model.config, vocab_multiple=4, task=task, num_classes=model.config.num_labels,
                               **overrides)


def hf_inputs(task: str) -> dict:
    if task != "multiple_choice":
        return dict(ids=HF_IDS, token_types=HF_TYPES, attention_mask=HF_REAL)
    k = lambda t: torch.cat([t, t.roll(1, 0)])[:4].reshape(2, 2, 8)  # 2 questions x 2 choices
    return dict(ids=k(HF_IDS), token_types=k(HF_TYPES), attention_mask=k(HF_REAL))


def hf_outputs(model, inputs) -> dict:
    kw = dict(attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_types"])
    with torch.no_grad():
        out = model(inputs["ids"], **kw)
        if hasattr(out, "prediction_logits"):  # and the bare encoder's (Bert/MegatronBertModel) sequence output
            return dict(mlm=out.prediction_logits, nsp=out.seq_relationship_logits,
                        seq=model.bert(inputs["ids"], **kw).last_hidden_state)
    return dict(logits=out.logits)


def nanomeg_outputs(mesh, cfg, full, inputs) -> dict:
    """What hf_outputs holds, from this rank's shards: MLM logits gathered and cut to the real vocabulary,
    NSP logits, the sequence output (gathered along s under sequence parallel); or the task's logits."""
    params = P.shard(full, bert_specs(cfg), mesh)
    kw = dict(token_types=inputs["token_types"], attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        if cfg.task == "pretrain":
            mlm, nsp = bert_pretrain(params, inputs["ids"], cfg, mesh, **kw)
            seq = bert_encode(params, inputs["ids"], cfg, mesh, **kw)
            seq = P.all_gather(seq, mesh, "tp", 1) if cfg.sequence_parallel else seq
            return dict(mlm=P.all_gather(mlm, mesh, "tp", -1)[..., : cfg.vocab_size], nsp=nsp, seq=seq)
        head = bert_classify if cfg.task == "classify" else bert_multiple_choice
        return dict(logits=head(params, inputs["ids"], cfg, mesh, **kw))


def assert_hf_close(got, want, what, real, tol=HF_TOL):
    """HF masks only keys, Megatron (and nanomeg) (query, key) pairs: padded positions legitimately differ,
    so token-level outputs are compared at the real positions only."""
    for name in want:
        g, w = got[name], want[name]
        if name in ("mlm", "seq"):
            g, w = g[real.bool()], w[real.bool()]
        torch.testing.assert_close(g.to(w.dtype), w, **tol, msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.parametrize("head", list(HF_TASKS))
@pytest.mark.parametrize("kind", ["bert", "megatron"])
def test_hugging_face_bert_gives_its_logits(kind, head):
    model = hf_model(kind, head)
    cfg = nanomeg_config(model)
    assert cfg.norm_order == ("post" if kind == "bert" else "pre")
    params = from_hf_bert(model.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: s for k, (s, _) in bert_shapes(cfg).items()}
    inputs = hf_inputs(cfg.task)
    want = hf_outputs(model, inputs)
    assert_hf_close(nanomeg_outputs(SERIAL, cfg, params, inputs), want, f"{kind} {head}", inputs["attention_mask"])


@pytest.mark.parametrize("head", list(HF_TASKS))
@pytest.mark.parametrize("kind", ["bert", "megatron"])
def test_hugging_face_bert_round_trips(kind, head):
    """to_hf_bert(from_hf_bert(sd)) holds every tensor HF has, unchanged; a fresh HF model loads it strictly
    and gives identical logits."""
    model = hf_model(kind, head)
    cfg = nanomeg_config(model)
    original = model.state_dict()
    sd = to_hf_bert(from_hf_bert(original, cfg), cfg)
    assert sd.keys() == original.keys(), (sorted(set(sd) ^ set(original)))
    for k in original:
        assert torch.equal(sd[k], original[k]), k
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(sd, strict=True)
    inputs = hf_inputs(cfg.task)
    assert_close(hf_outputs(fresh, inputs), hf_outputs(model, inputs), "re-loaded HF model", dict(rtol=0, atol=0))


@pytest.mark.parametrize("kind", ["bert", "megatron"])
def test_hugging_face_bert_split_over_tp_equals_serial(pool, kind):
    """A checkpoint sharded over tp = 2 (sequence parallel on) gives the serial float64 logits, which are HF's.
    (Four heads: tp = 2 cannot split three; the vocabulary stays odd, 37, padded to 40.)"""
    model = hf_model(kind, "PreTraining", hidden_size=16, num_attention_heads=4)
    cfg = nanomeg_config(model, sequence_parallel=True)
    full = {k: v.double() for k, v in from_hf_bert(model.state_dict(), cfg).items()}
    inputs = hf_inputs("pretrain")
    want = nanomeg_outputs(SERIAL, replace(cfg, sequence_parallel=False), full, inputs)
    assert_hf_close(want, hf_outputs(model, inputs), kind, inputs["attention_mask"])
    for rank, got in enumerate(pool.run(nanomeg_outputs, cfg, full, inputs, tp=2)):
        assert_close(got, want, f"rank {rank}")


def finetune_case(mesh, cfg, full, inputs, labels, steps):
    """Fine-tune a classifier from full parameters: shard them, then `steps` AdamW steps on the
    cross-entropy of bert_classify (dropout on), the grads clipped by their tp-correct global norm.
    Returns the losses and the full parameters after training."""
    specs = bert_specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for step in range(steps):
        logits = bert_classify(params, inputs["ids"], cfg, mesh, token_types=inputs["token_types"],
                               attention_mask=inputs["attention_mask"], seed=step, training=True)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        P.clip_grad_norm(params, specs, mesh, 0.5)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return dict(losses=losses, params=P.unshard(params, specs, mesh))


def test_a_pretrained_checkpoint_fine_tunes_as_a_classifier_over_tp(pool):
    """The user's path: an HF BertForPreTraining checkpoint -> from_hf_bert -> bert_for_task (keeps the
    encoder and pooler, draws a fresh classifier, drops the MLM/NSP heads) -> sharded over tp = 2 with
    sequence parallel -> AdamW steps. Every loss and every trained parameter equals the serial run."""
    from nanomeg import bert_for_task

    model = hf_model("bert", "PreTraining", hidden_size=16, num_attention_heads=4)
    pretrained = {k: v.double() for k, v in from_hf_bert(model.state_dict(), nanomeg_config(model)).items()}
    cfg = replace(nanomeg_config(model), task="classify", num_classes=3, hidden_dropout=0.1, attention_dropout=0.1,
                  sequence_parallel=True)
    full = bert_for_task(pretrained, cfg, seed=5)
    assert full.keys() == bert_shapes(cfg).keys() and "lm_head.bias" not in full
    assert all(torch.equal(full[k], pretrained[k]) for k in full if not k.startswith("classifier."))
    inputs, labels = hf_inputs("classify"), torch.tensor([0, 2, 1])
    want = finetune_case(SERIAL, replace(cfg, sequence_parallel=False), full, inputs, labels, steps=3)
    assert want["losses"][-1] < want["losses"][0]
    for rank, got in enumerate(pool.run(finetune_case, cfg, full, inputs, labels, 3, tp=2)[:2]):
        assert_close(got, want, f"rank {rank}")


def test_hugging_face_bert_from_a_safetensors_file(tmp_path):
    """save_pretrained's folder (tied decoder not stored), and its model.safetensors file, load as the state dict."""
    pytest.importorskip("safetensors.torch", reason="the .safetensors path needs safetensors")
    model = hf_model("megatron", "PreTraining")
    cfg = nanomeg_config(model)
    model.save_pretrained(tmp_path)
    want = from_hf_bert(model.state_dict(), cfg)
    for source in (tmp_path, tmp_path / "model.safetensors", str(tmp_path / "model.safetensors")):
        assert_close(from_hf_bert(source, cfg), want, f"from {source!r}", dict(rtol=0, atol=0))


def test_bert_export_without_token_types_is_refused():
    """type_vocab=0 is a valid BertConfig (no token-type table), but Hugging Face's BERT always looks up
    token types (an Embedding(0, h) cannot run): export and import refuse it, naming type_vocab, instead
    of a KeyError on 'embed.type'."""
    cfg = BertConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2, type_vocab=0)
    params = init_bert(cfg, 0)
    with pytest.raises(ValueError, match="type_vocab"):
        to_hf_bert(params, cfg)
    with pytest.raises(ValueError, match="type_vocab"):
        from_hf_bert({}, cfg)


# ---------------------------------------------------------------------------------------------------
# 5. Bad configs, inputs and checkpoints: ValueErrors that name the values
# ---------------------------------------------------------------------------------------------------


def bad_bert_input_case(mesh):
    """Every case must raise ValueError on every rank before any collective (or on every rank alike)."""
    cfg = BertConfig(vocab_size=10, vocab_multiple=4, max_seq=8, layers=1, hidden=8, heads=2, type_vocab=2)
    params = P.shard(init_bert(cfg, 0), bert_specs(cfg), mesh)
    mc = replace(cfg, task="multiple_choice")
    mc_params = P.shard(init_bert(mc, 0), bert_specs(mc), mesh)
    ids = torch.tensor([[1, 2, 3, 4]])
    pretrain = lambda **kw: (lambda: bert_pretrain(params, kw.pop("ids", ids), cfg, mesh, **kw))
    sd = to_hf_bert(init_bert(cfg, 0), cfg)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    gpt2 = gpt2_config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8)
    cases = [
        pretrain(token_types=torch.tensor([[0, 1, 2, 0]])),
        pretrain(token_types=torch.tensor([[0, 1, 1]])),
        pretrain(attention_mask=torch.tensor([[1, 1, 0]])),
        pretrain(attention_mask=torch.tensor([[1, 2, 1, 0]])),
        lambda: bert_multiple_choice(mc_params, torch.zeros(1, 0, 4, dtype=torch.int64), mc, mesh),
        lambda: replace(cfg, task="classify", num_classes=0),
        lambda: from_hf_bert(to_hf_gpt2(init_gpt(gpt2, 0), gpt2), cfg),
        lambda: from_hf_bert(sd | {query: sd[query][:, :-1]}, cfg),
        lambda: from_hf_bert(sd | {"cls.predictions.decoder.weight": sd["cls.predictions.decoder.weight"] + 1}, cfg),
        lambda: replace(cfg, activation="swiglu"),
        lambda: replace(cfg, tie_embeddings=False),
        lambda: bert_classify(params, ids, cfg, mesh),
        lambda: bert_pretrain(params, ids, GPTConfig(vocab_size=10, max_seq=8, layers=1, hidden=8, heads=2), mesh),
        lambda: bert_loss(params, ids, cfg, mesh, mlm_targets=ids, mlm_mask=torch.ones(1, 4)),
        lambda: bert_loss(params, ids, cfg, mesh, mlm_targets=ids, mlm_mask=torch.ones(1, 4),
                          nsp_labels=torch.tensor([2])),
        pretrain(ids=torch.tensor([[1, 2, 10, 4]])),
        lambda: to_hf_bert(params, cfg),  # one rank's shards
    ]
    return value_errors_then_in_step(cases, mesh)


BAD_BERT_INPUT = [
    r"token type id 2 out of range \[0, 2\)",
    re.escape("token_types shape (1, 3) != ids shape (1, 4)"),
    re.escape("attention_mask shape (1, 3) != ids shape (1, 4)"),
    r"attention_mask.*\b2\b",  # the offending value, not only the dtype (fails today: "got dtype torch.int64")
    re.escape("(1, 0, 4)"),
    re.escape("num_classes must be >= 1, got 0"),
    r"not a BERT state dict.*missing.*bert\.embeddings\.word_embeddings\.weight",
    re.escape("bert.encoder.layer.0.attention.self.query.weight: the checkpoint has shape (8, 7), the config "
              "needs (8, 8)"),
    r"cls\.predictions\.decoder\.weight differs .* untied output layer",
    r"activation='swiglu'",
    r"tie_embeddings=False",
    re.escape("task='classify', got 'pretrain'"),
    re.escape("task='pretrain', got 'GPTConfig'"),
    r"nsp_labels must be .* of shape \[1\], got NoneType",
    r"next-sentence label 2 out of range \[0, 2\)",
    r"token id 10 out of range \[0, 10\)",
    re.escape("embed.word has shape (6, 8), the full parameter is (12, 8)"),
]


def test_bad_bert_input_raises_on_every_rank_and_nothing_hangs(pool):
    """(Fails today on one entry: an attention_mask holding a 2 is refused with "got dtype torch.int64",
    which names neither the value nor a wrong dtype.)"""
    wrong = []
    for rank, messages in enumerate(pool.run(bad_bert_input_case, tp=2)):
        assert messages[-1] == 2.0, f"rank {rank}: out of step"
        wrong += [f"rank {rank}: {got!r}, want /{pattern}/"
                  for got, pattern in zip(messages[:-1], BAD_BERT_INPUT, strict=True)
                  if got is None or not re.search(pattern, got)]
    assert not wrong, "\n".join(wrong)
