"""Pipeline parallelism (parallel.py sections 11 and 12, nanomeg.py section 13) equals the serial model.

A layout is (pp, tp, dp) with pp in {1, 2, 4}, tp in {1, 2}, dp in {1, 2}: world 4 runs on the session's
`pool`, world 8 on `pool8`. Each rank builds its stage's parameters (`stage_params` of its tp shards), runs
`pipeline_step` on its replica's rows of the global batch and returns its stage's tp-gathered tensors; the
test merges the ranks' dicts (every copy of a name, the tied embedding's two stages included, must agree)
and compares them with independent oracles in float64: the serial model on the whole global batch, and
`torch.optim.AdamW` with `torch.nn.utils.clip_grad_norm_`.

1. proven equal, one step: hypothesis draws GPTs and BERTs (tied or not, dropout, rope or learned positions,
   GQA, sequence parallel, recompute, post- or pre-norm, padded BERT batches with unequal masked-LM counts
   per microbatch), layouts and schedules (AFAB, 1F1B, zero-bubble, interleaved with v = 2) and microbatch
   counts: the losses and every gradient after `GradBuckets.finish()` equal the serial step's;
2. three optimizer steps with ZeRO-1 (`ZeroAdamW`) or bucketed dp + torch's AdamW land on serial AdamW's
   parameters, with the gradient clipped by the global norm;
3. communication: per step the pipeline sends and the dp / embedding collectives are exactly the counts
   derived from the docstrings, and small buckets are reduced during the backward (the overlap);
4. ZeRO-1 memory: the optimizer state halves at dp = 2; bf16 parameters keep an fp32 main copy that
   accumulates updates below bf16's resolution;
5. bad inputs are ValueErrors that name the values.
"""

import math
import re
from dataclasses import replace
from typing import NamedTuple

import pytest
import torch
from common import SERIAL, TOL, assert_close, jittered, padding, rand, randint
from hypothesis import example, given
from hypothesis import strategies as st

import nanomeg as N
import parallel as P

LAYOUTS = [  # (pp, tp, dp); world = pp * tp * dp is 4 (pool) or 8 (pool8)
    (1, 2, 2), (2, 1, 2), (2, 2, 1), (4, 1, 1),
    (2, 2, 2), (4, 1, 2), (4, 2, 1),
]
SCHEDULES = ("afab", "1f1b", "zb", "interleaved")
TINY_BUCKETS, ONE_BUCKET = 1e-5, 25.0  # MB: every tensor its own bucket / everything in one


@pytest.fixture(scope="session")
def pools(pool, pool8):
    """The worker pool of each world size."""
    return {4: pool, 8: pool8}


def run_layout(pools, fn, *args, pp, tp, dp):
    return pools[pp * tp * dp].run(fn, *args, tp=tp, pp=pp)


# ---------------------------------------------------------------------------------------------------
# What every rank does, and the merge of the ranks' answers
# ---------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    pp: int
    tp: int
    dp: int
    schedule: str
    v: int
    m: int  # microbatches per replica
    b_micro: int  # rows per microbatch; the global batch has dp * m * b_micro rows
    s: int
    cfg: N.GPTConfig
    seed: int
    masked: bool  # GPT: a loss mask with zeros; BERT: one microbatch per replica with no masked-LM token
    bucket_mb: float

    @property
    def rows(self):
        return self.dp * self.m * self.b_micro


def specs_of(model, cfg):
    return N.gpt_specs(cfg) if model == "gpt" else N.bert_specs(cfg)


def my_rows(batch: dict, mesh) -> dict:
    """This replica's rows of the global batch: dp_rank·(b/dp) onwards."""
    rows = next(iter(batch.values())).shape[0] // mesh.dp
    return {k: t[mesh.dp_rank * rows: (mesh.dp_rank + 1) * rows] for k, t in batch.items()}


def my_stage(model, mesh, cfg, full, v):
    """This rank's trainable parameters: the tp shards of its pipeline stage(s)."""
    local = P.shard(full, specs_of(model, cfg), mesh)
    return {k: t.clone().requires_grad_(True) for k, t in N.stage_params(local, cfg, mesh, v).items()}


def gathered(tensors: dict, model, cfg, mesh) -> dict:
    specs = specs_of(model, cfg)
    return {k: P.unshard_tensor(t.detach(), specs[k], mesh) for k, t in tensors.items()}


def step_case(mesh, model, cfg, full, batch, schedule, v, m, seed, bucket_mb):
    """One pipeline step of this rank, the gradients averaged over dp by GradBuckets (zero=False)."""
    params = my_stage(model, mesh, cfg, full, v)
    buckets = P.GradBuckets(params, mesh, bucket_mb=bucket_mb, accumulations=m, tied=N.tied_copies(cfg, mesh))
    out = N.pipeline_step(model, params, my_rows(batch, mesh), cfg, mesh, schedule=schedule, v=v, microbatches=m,
                          seed=seed)
    buckets.finish()
    return dict(coords=(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), losses=out,
                grads=gathered({k: p.grad for k, p in params.items()}, model, cfg, mesh))


def merged(per_rank: list[dict], what: str) -> dict:
    """The union of the ranks' dicts of full tensors; every copy of a name (tp ranks, replicas, the tied
    embedding on the first and the last stage) must equal the first one seen."""
    out = {}
    for rank, got in enumerate(per_rank):
        for k, t in got.items():
            if k in out:
                assert_close(t, out[k], f"{what}: rank {rank}'s copy of {k}")
            else:
                out[k] = t
    return out


def check_losses(results, want: dict, what: str, tol=TOL):
    """Every rank of a replica returns its replica's losses; their mean over replicas is the reference's.
    (BERT's nsp_acc is a float32 fraction: compared to float32's precision.)"""
    by_replica = {}
    for r in results:
        first = by_replica.setdefault(r["coords"][1], r["losses"])
        assert_close(r["losses"], first, f"{what}: rank {r['coords']} vs its replica")
    assert set(results[0]["losses"]) == set(want), (sorted(results[0]["losses"]), sorted(want))
    for k in want:
        got = torch.stack([losses[k] for losses in by_replica.values()]).mean()
        assert_close(got, want[k].to(got.dtype), f"{what}: {k}",
                     dict(rtol=1e-6, atol=1e-7) if k == "nsp_acc" else tol)


def replica_mean_weights(mask: torch.Tensor, dp: int) -> torch.Tensor:
    """Token weights that make ONE masked mean over the global batch equal the mean over the dp replicas of
    each replica's own masked mean: each replica's counted tokens weigh 1 / (its count). (lm_loss divides by
    the weights' sum, dp, then.) Every replica must count at least one token."""
    w = mask.double().clone()
    for rows in w.chunk(dp):
        assert rows.sum() > 0
        rows /= rows.sum()
    return w


# ---------------------------------------------------------------------------------------------------
# Drawing a case
# ---------------------------------------------------------------------------------------------------


@st.composite
def cases(draw, model: str):
    pp, tp, dp = draw(st.sampled_from(LAYOUTS))
    schedule = draw(st.sampled_from(SCHEDULES if pp > 1 else SCHEDULES[:3]))
    v = 2 if schedule == "interleaved" else 1
    layers = pp * v * draw(st.integers(1, max(1, 4 // (pp * v))))
    m = pp * draw(st.integers(1, 2)) if v > 1 else draw(st.integers(1, 4))
    heads = draw(st.sampled_from([h for h in (2, 4) if h % tp == 0]))
    kv_heads = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0 and (g % tp == 0 or tp % g == 0)]))
    sp = tp > 1 and draw(st.booleans())
    s = tp * draw(st.integers(1, 8 // tp)) if sp else draw(st.integers(2, 8))
    dropout = draw(st.sampled_from([0.0, 0.2]))
    common = dict(
        vocab_size=4 * draw(st.integers(10, 12)) + draw(st.integers(1, 3)), vocab_multiple=4,
        max_seq=s + draw(st.integers(0, 2)), layers=layers, hidden=heads * draw(st.sampled_from([2, 4])),
        heads=heads, kv_heads=kv_heads, position=draw(st.sampled_from(["learned", "rope"])),
        hidden_dropout=dropout, attention_dropout=dropout,
        attention="core" if dropout else draw(st.sampled_from(["core", "sdpa"])),
        recompute=draw(st.sampled_from(["none", "selective", "full"])), sequence_parallel=sp,
    )
    if model == "gpt":
        cfg = N.GPTConfig(tie_embeddings=draw(st.booleans()), **common)
    else:
        cfg = N.BertConfig(norm_order=draw(st.sampled_from(["post", "pre"])), norm_eps=1e-5, type_vocab=2,
                           binary_head=draw(st.booleans()), init_std=0.3, **common)
    return Case(pp, tp, dp, schedule, v, m, draw(st.integers(1, 2)), s, cfg, draw(st.integers(0, 2**16)),
                draw(st.booleans()), draw(st.sampled_from([TINY_BUCKETS, ONE_BUCKET])))


def gpt_batch(case: Case) -> dict:
    v, n, s, seed = case.cfg.vocab_size, case.rows, case.s, case.seed
    batch = dict(ids=randint(seed, v, n, s), targets=randint(seed + 1, v, n, s))
    if case.masked:
        mask = (rand(seed + 2, n, s) > 0).double()
        mask[:: n // case.dp, 0] = 1.0  # every replica counts a token
        batch["loss_mask"] = mask
    return batch


def bert_batch(case: Case, real: tuple) -> dict:
    """A BERT batch with the padding patterns `real` (one per row); the masked-LM positions are real tokens,
    a different number per microbatch; with case.masked the last microbatch of every replica (m > 1) has
    none at all (its loss weight must then be 0, not a division by 0)."""
    cfg, n, s, seed = case.cfg, case.rows, case.s, case.seed
    real = torch.tensor(real, dtype=torch.int64)
    chosen = (rand(seed + 2, n, s) > 0) & real.bool()
    chosen[:: n // case.dp, 0] = True  # every replica's first row: [CLS] is real
    if case.masked and case.m > 1:
        for replica in chosen.chunk(case.dp):
            replica[-case.b_micro:] = False
    batch = dict(ids=randint(seed, cfg.vocab_size, n, s), token_types=randint(seed + 1, 2, n, s),
                 attention_mask=real, mlm_targets=randint(seed + 3, cfg.vocab_size, n, s), mlm_mask=chosen.double())
    if cfg.binary_head:
        batch["nsp_labels"] = randint(seed + 4, 2, n)
    return batch


def padded(case: Case) -> tuple:
    """A fixed padding for the hand-picked cases: a padded tail, none, holes."""
    patterns = [(1, 1, 1, 0, 0, 0)[: case.s], (1,) * case.s, (1, 0) * (case.s // 2)]
    return tuple(patterns[i % 3] for i in range(case.rows))


def reference_config(cfg):
    """The serial reference: no sequence parallel, no recompute, the core attention (how, never what)."""
    return replace(cfg, sequence_parallel=False, recompute="none", attention="core")


def full_params(model, cfg, seed):
    init = N.init_gpt if model == "gpt" else N.init_bert
    return jittered(init(cfg, seed, torch.float64), seed)


# Hand-picked cases the derandomised draws must never miss.
GPT_EVERYTHING = Case(2, 2, 2, "zb", 1, 4, 1, 6, N.GPTConfig(
    vocab_size=49, vocab_multiple=4, max_seq=8, layers=4, hidden=16, heads=4, kv_heads=2, position="rope",
    hidden_dropout=0.2, attention_dropout=0.2, recompute="full", sequence_parallel=True), seed=7, masked=True,
    bucket_mb=TINY_BUCKETS)
GPT_INTERLEAVED_PP4 = Case(4, 2, 1, "interleaved", 2, 4, 1, 5, N.GPTConfig(
    vocab_size=50, vocab_multiple=4, max_seq=5, layers=8, hidden=8, heads=2, kv_heads=1, tie_embeddings=True,
    hidden_dropout=0.2, attention_dropout=0.2), seed=3, masked=False, bucket_mb=ONE_BUCKET)
BERT_POST_UNEQUAL = Case(2, 1, 2, "1f1b", 1, 3, 1, 6, N.BertConfig(
    vocab_size=45, vocab_multiple=4, max_seq=6, layers=2, hidden=8, heads=2, norm_order="post", norm_eps=1e-5,
    type_vocab=2, hidden_dropout=0.2, attention_dropout=0.2, init_std=0.3), seed=5, masked=True,
    bucket_mb=TINY_BUCKETS)
BERT_PRE_INTERLEAVED = Case(2, 2, 2, "interleaved", 2, 2, 2, 4, N.BertConfig(
    vocab_size=47, vocab_multiple=4, max_seq=4, layers=4, hidden=8, heads=2, kv_heads=1, norm_order="pre",
    norm_eps=1e-5, type_vocab=2, sequence_parallel=True, recompute="selective", init_std=0.3), seed=9, masked=True,
    bucket_mb=ONE_BUCKET)


# ---------------------------------------------------------------------------------------------------
# 1. One step: losses and every gradient equal the serial step on the global batch
# ---------------------------------------------------------------------------------------------------


def check_step(pools, case: Case, model: str, batch: dict):
    cfg, what = case.cfg, f"{model} {case.schedule} v={case.v} m={case.m} pp={case.pp} tp={case.tp} dp={case.dp}"
    full = full_params(model, cfg, case.seed)
    params = {k: t.clone().requires_grad_(True) for k, t in full.items()}
    ref = reference_config(cfg)
    # Each replica's loss is the (masked) mean over its own rows and GradBuckets averages the gradients over
    # dp, so the step optimises the mean over replicas of the replicas' means. Without a mask that is the
    # global batch's mean; with one (GPT's loss mask, BERT's masked-LM positions) it is not: the reference
    # weighs each replica's tokens by 1 / its count (`replica_mean_weights`), on the whole global batch, so
    # dropout draws the global batch's masks.
    if model == "gpt":
        mask = batch.get("loss_mask")
        mask = None if mask is None else replica_mean_weights(mask, case.dp)
        want = dict(loss=N.gpt_loss(params, batch["ids"], batch["targets"], ref, SERIAL, loss_mask=mask,
                                    seed=case.seed, training=True))
    else:
        want = N.bert_loss_and_metrics(
            params, batch["ids"], ref, SERIAL, mlm_targets=batch["mlm_targets"],
            mlm_mask=replica_mean_weights(batch["mlm_mask"], case.dp), nsp_labels=batch.get("nsp_labels"),
            token_types=batch["token_types"], attention_mask=batch["attention_mask"], seed=case.seed, training=True)
    want["loss"].backward()
    want = {k: t.detach() for k, t in want.items()}
    assert torch.isfinite(want["loss"]) and want["loss"] > 0
    results = run_layout(pools, step_case, model, cfg, full, batch, case.schedule, case.v, case.m, case.seed,
                         case.bucket_mb, pp=case.pp, tp=case.tp, dp=case.dp)
    check_losses(results, want, what)
    for r in results:  # the last stage holds a second copy of a tied embedding
        assert ("embed.word" in r["grads"]) == (r["coords"][0] == 0 or (r["coords"][0] == case.pp - 1 and
                                                                           cfg.tie_embeddings)), r["coords"]
    grads = merged([r["grads"] for r in results], what)
    assert_close(grads, {k: p.grad for k, p in params.items()}, f"{what}: gradients")


@example(case=GPT_EVERYTHING)
@example(case=GPT_INTERLEAVED_PP4)
@given(case=cases("gpt"))
def test_gpt_pipeline_step_equals_serial(pools, case):
    check_step(pools, case, "gpt", gpt_batch(case))


@example(case=BERT_POST_UNEQUAL, data=None)
@example(case=BERT_PRE_INTERLEAVED, data=None)
@given(case=cases("bert"), data=st.data())
def test_bert_pipeline_step_equals_serial(pools, case, data):
    real = padded(case) if data is None else data.draw(padding(case.rows, case.s), label="padding")
    check_step(pools, case, "bert", bert_batch(case, real))
