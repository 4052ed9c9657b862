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
   parameters, with the gradient clipped by the global norm; whatever zeroes the gradients between steps
   (a torch optimizer's zero_grad(), which sets them to None; p.grad = None), they stay averaged over dp;
3. communication: per step the pipeline sends and the dp / embedding collectives are exactly the counts
   derived from the docstrings, and small buckets are reduced during the backward (the overlap);
4. ZeRO-1 memory: the optimizer state halves at dp = 2; state_bytes() is the storage of every tensor ZeroAdamW
   holds, 12 bytes an element of its slices (24 in float64), and nothing else; bf16 parameters keep an fp32
   main copy that accumulates updates below bf16's resolution;
5. bad inputs are ValueErrors that name the values;
6. pp, cp and dp all 2 (world 8): three training steps under any schedule equal serial AdamW (with any of the
   three at 1, the dp and cp coordinates of a pipeline peer could be swapped unseen);
7. order, not tags: each batch_isend_irecv the executor makes is the next group of its checked plan
   (`checked_schedule`), every tag 0, and the per-message tags of the debugging switch change no bit.
"""

import re
from dataclasses import replace
from typing import NamedTuple

import pytest
import torch
from common import (BETAS, CLIP, LR, SERIAL, STEPS, TOL, WEIGHT_DECAY, adamw, assert_close, jittered, merged,
                    padding, rand, randint, serial_gpt_training)
from hypothesis import example, given, settings
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



def check_losses(results, want: dict, what: str, tol=TOL):
    """Every rank of a replica returns its replica's losses; their mean over replicas is the reference's.
    (BERT's nsp_acc is a float32 fraction: compared to float32's precision.)"""
    by_replica = {}
    for r in results:
        first = by_replica.setdefault(r["coords"][1], r["losses"])
        assert_close(r["losses"], first, f"{what}: rank {r['coords']} vs its replica")
    assert set(results[0]["losses"]) == set(want), (sorted(results[0]["losses"]), sorted(want))
    for k in want:
        got = torch.stack([losses[k] for losses in by_replica.values()]).mean(0)
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
    patterns = [(1, 1, 1, 0, 0, 0, 0, 0)[: case.s], (1,) * case.s, ((1, 0) * case.s)[: case.s]]
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


def eval_case(mesh, cfg, full, batch, schedule, v, m):
    params = my_stage("gpt", mesh, cfg, full, v)
    with P.count_comms() as records, torch.no_grad():
        out = N.pipeline_step("gpt", params, my_rows(batch, mesh), cfg, mesh, schedule=schedule, v=v,
                              microbatches=m, seed=1, training=False)
    return dict(coords=(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), losses=out,
                grads=[k for k, p in params.items() if p.grad is not None],
                phases={c["phase"] for c in records if c["dim"] == "pp"})


def test_evaluation_runs_the_forwards_only(pools):
    """training=False: the forward actions of the same schedule (interleaved here), no dropout, no gradient,
    nothing sent backward; the loss is the serial evaluation loss."""
    cfg = replace(train_config(tied=True, sp=True), hidden_dropout=0.3, attention_dropout=0.3)
    full = full_params("gpt", cfg, 4)
    batch = dict(ids=randint(5, 49, 4, 8), targets=randint(6, 49, 4, 8))
    want = N.gpt_loss(full, batch["ids"], batch["targets"], reference_config(cfg), SERIAL, training=False)
    results = run_layout(pools, eval_case, cfg, full, batch, "interleaved", 2, 4, pp=2, tp=2, dp=1)
    check_losses(results, dict(loss=want), "evaluation")
    for r in results:
        assert r["grads"] == [] and "forward" in r["phases"] and "backward" not in r["phases"], r


def test_relative_positions_run_at_pp_1_and_are_refused_across_stages():
    """position="relative" is a GPT option (test_gpt.py draws it); its bias table `rel_bias` is shared by all
    layers of the stack. At pp = 1 (microbatches only) pipeline_step must equal gpt_loss; across stages, where
    the one table would serve every stage, it is refused with a ValueError naming the position."""
    cfg = N.GPTConfig(vocab_size=45, vocab_multiple=4, max_seq=6, layers=2, hidden=8, heads=2, position="relative",
                      rel_buckets=4, rel_max_distance=6)
    full = full_params("gpt", cfg, 1)
    ids, targets = randint(1, 45, 2, 6), randint(2, 45, 2, 6)
    params = {k: t.clone().requires_grad_(True) for k, t in full.items()}
    out = N.pipeline_step("gpt", params, dict(ids=ids, targets=targets), cfg, SERIAL, microbatches=2)
    ref = {k: t.clone().requires_grad_(True) for k, t in full.items()}
    loss = N.gpt_loss(ref, ids, targets, cfg, SERIAL)
    loss.backward()
    assert_close(out, dict(loss=loss.detach()), "loss")
    assert_close({k: p.grad for k, p in params.items()}, {k: p.grad for k, p in ref.items()}, "gradients")
    with pytest.raises(ValueError, match=r"position='relative' does not pipeline \(pp=2\)"):
        N.stage_params(full, cfg, P.Mesh(pp=2, pp_rank=1))


# ---------------------------------------------------------------------------------------------------
# 2. Three optimizer steps: ZeRO-1 or bucketed dp + AdamW, against serial AdamW
# ---------------------------------------------------------------------------------------------------


def train_config(layers=4, tied=True, sp=False):
    """init_std 0.2: the first steps' gradient norms are above CLIP, so the clipping is exercised."""
    return N.GPTConfig(vocab_size=49, vocab_multiple=4, max_seq=8, layers=layers, hidden=16, heads=4, kv_heads=2,
                       hidden_dropout=0.1, attention_dropout=0.1, tie_embeddings=tied, sequence_parallel=sp,
                       init_std=0.2)


def train_case(mesh, cfg, full, batches, schedule, v, m, zero, bucket_mb):
    """STEPS steps of this rank: pipeline_step, GradBuckets, then ZeroAdamW or the global-norm clip + AdamW."""
    params = my_stage("gpt", mesh, cfg, full, v)
    specs, skip = N.gpt_specs(cfg), N.norm_skip(cfg, mesh)
    buckets = P.GradBuckets(params, mesh, bucket_mb=bucket_mb, zero=zero, accumulations=m,
                            tied=N.tied_copies(cfg, mesh))
    opt = P.ZeroAdamW(params, buckets, specs, mesh, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, skip=skip) \
        if zero else adamw(params)
    losses, norms = [], []
    for step, batch in enumerate(batches):
        buckets.zero_grad()
        out = N.pipeline_step("gpt", params, my_rows(batch, mesh), cfg, mesh, schedule=schedule, v=v, microbatches=m,
                              seed=10 + step)
        buckets.finish()
        norms.append(opt.clip_grad_norm(CLIP) if zero else P.clip_grad_norm(params, specs, mesh, CLIP, skip=skip))
        opt.step()
        losses.append(out["loss"])
    return dict(coords=(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), losses=dict(loss=torch.stack(losses)),
                norms=torch.stack(norms), params=gathered(params, "gpt", cfg, mesh))


TRAIN_LAYOUTS = [  # pp, tp, dp, schedule, v, m, zero, bucket_mb, tied, sequence parallel
    (2, 1, 2, "1f1b", 1, 2, True, TINY_BUCKETS, True, False),
    (2, 2, 1, "interleaved", 2, 2, False, ONE_BUCKET, True, True),
    (4, 1, 1, "zb", 1, 4, True, ONE_BUCKET, True, False),
    (1, 2, 2, "afab", 1, 2, True, TINY_BUCKETS, True, True),
    (2, 2, 2, "zb", 1, 2, True, TINY_BUCKETS, True, True),
    (2, 2, 2, "interleaved", 2, 2, False, ONE_BUCKET, True, False),
    (4, 1, 2, "interleaved", 2, 4, False, TINY_BUCKETS, False, False),
    (4, 2, 1, "afab", 1, 4, True, ONE_BUCKET, True, True),
]


@pytest.mark.parametrize("layout", TRAIN_LAYOUTS, ids=lambda t: "pp{}-tp{}-dp{}-{}-v{}-m{}-{}-{}MB-{}-{}".format(
    *t[:6], "zero" if t[6] else "adamw", t[7], "tied" if t[8] else "untied", "sp" if t[9] else "nosp"))
def test_training_steps_equal_serial_adamw(pools, layout):
    pp, tp, dp, schedule, v, m, zero, bucket_mb, tied, sp = layout
    cfg = train_config(layers=8 if pp * v > 4 else 4, tied=tied, sp=sp)
    full = full_params("gpt", cfg, 3)
    rows = dp * m * (2 if dp * m < 4 else 1)
    batches = [dict(ids=randint(20 + k, 49, rows, 8), targets=randint(30 + k, 49, rows, 8)) for k in range(STEPS)]
    want_losses, want_norms, want = serial_gpt_training(cfg, full, [(b["ids"], b["targets"]) for b in batches])
    assert (want_norms > CLIP).any(), want_norms  # the clipping did something
    results = run_layout(pools, train_case, cfg, full, batches, schedule, v, m, zero, bucket_mb, pp=pp, tp=tp, dp=dp)
    what = f"{layout}"
    check_losses(results, dict(loss=want_losses), what)
    for r in results:
        assert_close(r["norms"], want_norms, f"{what}: grad norm on rank {r['coords']}")
    assert_close(merged([r["params"] for r in results], what), want, f"{what}: parameters after {STEPS} steps")


# The zero_grad habit: a torch optimizer's zero_grad() (set_to_none) between steps, or p.grad = None, must not
# switch the dp averaging off. A small MLP in float64, 8 rows over dp = 4, 3 steps against the serial run.

def mlp_loss(params, x, y):
    return ((torch.tanh(x @ params["w1"].T + params["b1"]) @ params["w2"].T - y) ** 2).mean()


OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params.values(), lr=0.1, momentum=0.9),
    "AdamW": adamw,
}


def _no_grads(params):
    for p in params.values():
        p.grad = None


HABITS = {  # (the optimizer, the buckets, the parameters) -> what a user calls before a step's backward
    "optimizer.zero_grad()": lambda opt, buckets, params: opt.zero_grad(),
    "optimizer.zero_grad(set_to_none=False)": lambda opt, buckets, params: opt.zero_grad(set_to_none=False),
    "buckets.zero_grad()": lambda opt, buckets, params: buckets.zero_grad(),
    "buckets.zero_grad(), then optimizer.zero_grad()": lambda opt, buckets, params: (buckets.zero_grad(),
                                                                                     opt.zero_grad()),
    "p.grad = None": lambda opt, buckets, params: _no_grads(params),
}


def habit_case(mesh, full, batches, optimizer, habit, bucket_mb, m):
    """STEPS steps of this replica on its rows, in m microbatches: HABITS[habit], backward, finish, step.
    optimizer 'ZeRO': ZeroAdamW (its zero_grad is the buckets')."""
    params = {k: t.clone().requires_grad_(True) for k, t in full.items()}
    zero = optimizer == "ZeRO"
    buckets = P.GradBuckets(params, mesh, bucket_mb=bucket_mb, zero=zero, accumulations=m)
    opt = P.ZeroAdamW(params, buckets, dict.fromkeys(params), mesh, lr=LR, betas=BETAS,
                      weight_decay=WEIGHT_DECAY) if zero else OPTIMIZERS[optimizer](params)
    for batch in batches:
        HABITS[habit](opt, buckets, params)
        mine = my_rows(batch, mesh)
        for x, y in zip(mine["x"].chunk(m), mine["y"].chunk(m)):
            (mlp_loss(params, x, y) / m).backward()
        buckets.finish()
        opt.step()
    return {k: p.detach() for k, p in params.items()}


@example(optimizer="SGD", habit="optimizer.zero_grad()", bucket_mb=ONE_BUCKET, m=1)
@example(optimizer="AdamW", habit="buckets.zero_grad(), then optimizer.zero_grad()", bucket_mb=TINY_BUCKETS, m=2)
@example(optimizer="ZeRO", habit="optimizer.zero_grad()", bucket_mb=TINY_BUCKETS, m=1)
@example(optimizer="ZeRO", habit="p.grad = None", bucket_mb=ONE_BUCKET, m=2)
@given(optimizer=st.sampled_from([*OPTIMIZERS, "ZeRO"]), habit=st.sampled_from(list(HABITS)),
       bucket_mb=st.sampled_from([TINY_BUCKETS, ONE_BUCKET]), m=st.sampled_from([1, 2]))
def test_zero_grad_habits_keep_averaging_over_dp(pool, optimizer, habit, bucket_mb, m):
    """Whatever zeroes the gradients between steps, every step's gradient is the mean over the dp = 4
    replicas: the replicas agree and equal one process on the whole batch with the same optimizer."""
    full = dict(w1=rand(1, 6, 5), b1=rand(2, 6), w2=rand(3, 3, 6))
    batches = [dict(x=rand(10 + k, 8, 5), y=rand(20 + k, 8, 3)) for k in range(STEPS)]
    serial = {k: t.clone().requires_grad_(True) for k, t in full.items()}
    opt = (adamw if optimizer == "ZeRO" else OPTIMIZERS[optimizer])(serial)
    for batch in batches:
        opt.zero_grad()
        mlp_loss(serial, batch["x"], batch["y"]).backward()
        opt.step()
    for rank, got in enumerate(pool.run(habit_case, full, batches, optimizer, habit, bucket_mb, m)):
        assert_close(got, {k: p.detach() for k, p in serial.items()}, f"{optimizer}, {habit}: dp rank {rank}")



def test_a_parameter_no_backward_reached_gets_zeros_in_its_bucket_not_last_steps_gradient():
    """After a torch optimizer's zero_grad() (every p.grad None), a step whose loss leaves b out: finish() puts
    b's view back into b.grad, zeroed (None means zeros), so the bucket reduces this step's gradients only."""
    params = dict(a=torch.ones(3, dtype=torch.float64, requires_grad=True),
                  b=torch.ones(2, dtype=torch.float64, requires_grad=True))
    buckets = P.GradBuckets(params, SERIAL)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    (params["a"].sum() + 5 * params["b"].sum()).backward()
    buckets.finish()
    opt.step()
    opt.zero_grad()
    (2 * params["a"].sum()).backward()
    buckets.finish()
    assert all(p.grad is buckets.grads[k] for k, p in params.items())
    assert torch.equal(buckets.buckets[0]["buf"], torch.tensor([0.0, 0.0, 2.0, 2.0, 2.0], dtype=torch.float64))


def fp32_grads_case(mesh, full, batch, m, zero):
    """bf16 parameters, GradBuckets(grad_dtype=torch.float32), m microbatches of this replica's rows, finish,
    clip to half the norm, one ZeroAdamW step. Returns this rank's bucket slice (its ZeRO shard, or the whole
    bucket) and the same slice of the float64 reference: every replica's per-microbatch bf16 gradients (each
    recomputed apart by torch.autograd.grad on a copy of the parameters) summed in float64 and divided by dp;
    also the norm it computed, the reference norm, the clip's scale and the first AdamW moment."""
    params = {k: t.bfloat16().requires_grad_(True) for k, t in full.items()}
    buckets = P.GradBuckets(params, mesh, zero=zero, accumulations=m, grad_dtype=torch.float32)
    opt = P.ZeroAdamW(params, buckets, dict.fromkeys(params), mesh, lr=LR, betas=BETAS)
    for x, y in zip(my_rows(batch, mesh)["x"].chunk(m), my_rows(batch, mesh)["y"].chunk(m)):
        (mlp_loss(params, x.bfloat16(), y.bfloat16()) / m).backward()
        assert all(p.grad is None for p in params.values())  # the hook moved it into the fp32 bucket and freed it
    buckets.finish()
    [bucket] = buckets.buckets  # one bucket (25 MB)
    ref, mag = ({k: torch.zeros_like(t) for k, t in full.items()} for _ in range(2))  # sum, sum of |g|
    for d in range(mesh.dp):
        rows = replace(mesh, dp_rank=d)
        for x, y in zip(my_rows(batch, rows)["x"].chunk(m), my_rows(batch, rows)["y"].chunk(m)):
            copy = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
            grads = torch.autograd.grad(mlp_loss(copy, x.bfloat16(), y.bfloat16()) / m, list(copy.values()))
            for k, g in zip(copy, grads):
                assert g.dtype == torch.bfloat16
                ref[k] += g.double()
                mag[k] += g.double().abs()
    laid_out = lambda t: torch.cat([t[n].reshape(-1) / mesh.dp for n in bucket["names"]] +
                                   [torch.zeros(bucket["buf"].numel() - sum(bucket["sizes"]), dtype=torch.float64)])
    flat = laid_out(ref)
    lo, n = bucket["lo"], bucket["shard"].numel()
    got = bucket["shard"].double().clone()
    want_norm = flat.norm()
    norm = opt.clip_grad_norm(float(want_norm) / 2)
    scale = bucket["shard"].double() / got.where(got != 0, 1)
    opt.step()
    return dict(dtype=bucket["buf"].dtype, got=got, want=flat[lo: lo + n], mag=laid_out(mag)[lo: lo + n],
                norm=norm, want_norm=want_norm,
                scale=scale[got != 0], exp_avg=opt.state[0]["exp_avg"].double(), sums=m * mesh.dp)


@settings(max_examples=4)
@given(m=st.sampled_from([1, 2, 3]), zero=st.booleans(), seed=st.integers(0, 2**16))
def test_bf16_parameters_accumulate_and_reduce_their_gradients_in_fp32(pool, m, zero, seed):
    """Megatron's main_grad: with bf16 parameters and grad_dtype fp32, at dp 1 and dp 2 (tp 2 on the pool),
    with or without ZeRO, the fp32 bucket holds the fp32 sum of the microbatches' bf16 gradients, averaged over
    dp: the float64 sum of the same bf16 gradients up to fp32 rounding, each of the m·dp additions off by at
    most 2^-24 of its running sum, itself at most the sum of the |gradients| -- while rounding that sum to
    bf16 (bf16 buckets) misses by far more (two gradients or more). The grad norm and the clip read and
    scale those fp32 gradients, and the optimizer's first moment after one step is (1 - beta1) times the
    clipped fp32 gradient."""
    full = dict(w1=rand(seed, 16, 5), b1=rand(seed + 1, 16), w2=rand(seed + 2, 3, 16))
    batch = dict(x=rand(seed + 3, 12, 5), y=rand(seed + 4, 12, 3))  # 12 rows: m = 1, 2, 3 at dp 1 and 2
    for r in [fp32_grads_case(SERIAL, full, batch, m, zero), *pool.run(fp32_grads_case, full, batch, m, zero, tp=2)]:
        assert r["dtype"] == torch.float32
        bound = r["sums"] * 2.0 ** -24 * r["mag"]  # per element
        assert ((r["got"] - r["want"]).abs() <= bound).all(), ((r["got"] - r["want"]).abs() - bound).max()
        if r["sums"] > 1:  # (one microbatch at dp 1: a single bf16 gradient, exact in either dtype)
            assert (r["want"].bfloat16().double() - r["want"]).abs().max() > 100 * bound.max()  # bf16 sums fail
        assert abs(r["norm"] - r["want_norm"]) <= 2.0 ** -20 * r["want_norm"], (r["norm"], r["want_norm"])
        assert_close(r["scale"], torch.full_like(r["scale"], 0.5), "clip scale", dict(rtol=1e-5, atol=0))
        assert_close(r["exp_avg"], (1 - BETAS[0]) * r["got"] * r["scale"][0], "exp_avg", dict(rtol=1e-6, atol=0))

# ---------------------------------------------------------------------------------------------------
# 3. Communication: what one step moves, from the docstrings' formulas
# ---------------------------------------------------------------------------------------------------


def comms_case(mesh, cfg, full, batch, schedule, v, m, zero, bucket_mb):
    """One step and, with ZeRO, the clip and the optimizer step: the pp, dp and embed collectives in order."""
    params = my_stage("gpt", mesh, cfg, full, v)
    buckets = P.GradBuckets(params, mesh, bucket_mb=bucket_mb, zero=zero, accumulations=m,
                            tied=N.tied_copies(cfg, mesh))
    opt = P.ZeroAdamW(params, buckets, N.gpt_specs(cfg), mesh, lr=LR, skip=N.norm_skip(cfg, mesh)) if zero else None
    with P.count_comms() as records:
        N.pipeline_step("gpt", params, my_rows(batch, mesh), cfg, mesh, schedule=schedule, v=v, microbatches=m)
        buckets.finish()
        if zero:
            opt.clip_grad_norm(CLIP)
            opt.step()
    return dict(coords=(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), numel={k: p.numel() for k, p in params.items()},
                comms=[(c["phase"], c["op"], c["dim"], c["elements"]) for c in records if c["dim"] != "tp"])


def expected_comms(r, numel: dict, *, p, t, dp, v, m, b_micro, s, h, sp, tied, zero, one_bucket) -> list:
    """The non-tp collectives of pipeline rank r (holding tensors of `numel` elements) in one step.
    * pp: rank r runs virtual stages c·p + r; each not-last one sends its output [b_micro, s(/t), h] on in
      every forward and receives its dy back; each not-first one receives its input and sends dx back;
      then pipeline_totals all-reduces the GPT loss (1 element) over pp.
    * embed: with a tied embedding, its two copies (first and last stage) are all-reduced once.
    * dp: each bucket is all-reduced (ZeRO: reduce-scattered) once, padded to a multiple of dp; tiny
      buckets hold one tensor each, ONE_BUCKET all but the tied copy; launched in the backward, except the
      tied bucket (after the embed all-reduce). ZeRO: the clip's 1-element all-reduce over dp and pp, and
      an all-gather of every bucket in the optimizer step."""
    act = b_micro * (s // t if sp else s) * h
    stages = [c * p + r for c in range(v)]
    not_last, not_first = sum(vs != p * v - 1 for vs in stages), sum(vs != 0 for vs in stages)
    want = [("forward", "send", "pp", act)] * (m * not_last) + [("forward", "recv", "pp", act)] * (m * not_first)
    want += [("backward", "send", "pp", act)] * (m * not_first) + [("backward", "recv", "pp", act)] * (m * not_last)
    if p > 1:
        want.append(("after backward", "all_reduce", "pp", 1))
    pad = lambda n: -(-n // dp) * dp
    tied_here = tied and p > 1 and r in (0, p - 1)
    rest = [n for k, n in numel.items() if not (tied_here and k == "embed.word")]
    buckets = [sum(rest)] if one_bucket else rest
    if tied_here:
        want.append(("after backward", "all_reduce", "embed", pad(numel["embed.word"])))
    if dp > 1:
        op = "reduce_scatter" if zero else "all_reduce"
        want += [("backward", op, "dp", pad(n)) for n in buckets]
        if tied_here:
            want.append(("after backward", op, "dp", pad(numel["embed.word"])))
    if zero:
        want += [("after backward", "all_reduce", dim, 1) for dim, n in (("dp", dp), ("pp", p)) if n > 1]
        if dp > 1:
            want += [("optimizer", "all_gather", "dp", pad(n))
                     for n in buckets + ([numel["embed.word"]] if tied_here else [])]
    return want


COMMS_LAYOUTS = [  # pp, tp, dp, schedule, v, m, sequence parallel, bucket_mb
    (2, 2, 2, "interleaved", 2, 2, True, TINY_BUCKETS),
    (4, 1, 2, "1f1b", 1, 4, False, ONE_BUCKET),
]


@pytest.mark.parametrize("zero", [False, True], ids=["allreduce", "zero"])
@pytest.mark.parametrize("layout", COMMS_LAYOUTS, ids=lambda t: "pp{}-tp{}-dp{}-{}-v{}-m{}".format(*t[:6]))
def test_communication_per_step(pools, layout, zero):
    pp, tp, dp, schedule, v, m, sp, bucket_mb = layout
    cfg, b_micro, s = train_config(layers=4, tied=True, sp=sp), 1, 8
    batch = dict(ids=randint(1, 49, dp * m * b_micro, s), targets=randint(2, 49, dp * m * b_micro, s))
    results = run_layout(pools, comms_case, cfg, full_params("gpt", cfg, 3), batch, schedule, v, m, zero, bucket_mb,
                         pp=pp, tp=tp, dp=dp)
    act = b_micro * (s // tp if sp else s) * cfg.hidden
    for r in results:
        (stage, replica, tp_rank), comms = r["coords"], r["comms"]
        want = expected_comms(stage, r["numel"], p=pp, t=tp, dp=dp, v=v, m=m, b_micro=b_micro, s=s, h=cfg.hidden,
                              sp=sp, tied=True, zero=zero, one_bucket=bucket_mb == ONE_BUCKET)
        assert sorted(comms) == sorted(want), (r["coords"], sorted(comms), sorted(want))
        # the overlap: the last stage launches a dp collective before its last backward send has been posted
        dp_at = [i for i, c in enumerate(comms) if c[2] == "dp"]
        sends = [i for i, c in enumerate(comms) if c[:3] == ("backward", "send", "pp")]
        if stage == pp - 1:
            assert dp_at and comms[dp_at[0]][0] == "backward" and dp_at[0] < sends[-1], (r["coords"], comms)
        assert any(c[2] == "embed" for c in comms) == (stage in (0, pp - 1)), r["coords"]
    # within one replica (one tp rank of it): p·v - 1 virtual stage boundaries, m sends each way per boundary
    for replica in range(dp):
        for tp_rank in range(tp):
            mine = [c for r in results if r["coords"][1:] == (replica, tp_rank) for c in r["comms"]]
            for phase in ("forward", "backward"):
                assert mine.count((phase, "send", "pp", act)) == mine.count((phase, "recv", "pp", act)) \
                    == m * (pp * v - 1), (replica, tp_rank, phase)


# ---------------------------------------------------------------------------------------------------
# 4. ZeRO-1 memory and precision
# ---------------------------------------------------------------------------------------------------


def zero_state_case(mesh, cfg, full, v):
    params = my_stage("gpt", mesh, cfg, full, v)
    tied = N.tied_copies(cfg, mesh)
    buckets = P.GradBuckets(params, mesh, bucket_mb=ONE_BUCKET, zero=True, tied=tied)
    opt = P.ZeroAdamW(params, buckets, N.gpt_specs(cfg), mesh, lr=LR)
    return dict(coords=(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), bytes=opt.state_bytes(),
                numel=sum(p.numel() for p in params.values()),
                tied=sum(params[k].numel() for k in tied if k in params and mesh.pp_rank in (0, mesh.pp - 1)))


def test_zero_state_halves_at_dp_2(pools):
    """The same layout (pp 2, tp 2) at dp 1 (world 4) and dp 2 (world 8): float64 main copy plus two moments,
    24 bytes an element; at dp 2 each rank holds half of each bucket (rounded up: the padding)."""
    cfg = train_config(tied=True)
    full = full_params("gpt", cfg, 3)
    alone = {r["coords"][::2]: r for r in run_layout(pools, zero_state_case, cfg, full, 1, pp=2, tp=2, dp=1)}
    for r in run_layout(pools, zero_state_case, cfg, full, 1, pp=2, tp=2, dp=2):
        one = alone[r["coords"][::2]]
        assert one["numel"] == r["numel"] and one["bytes"] == 24 * one["numel"], (r["coords"], one)
        half = lambda n: -(-n // 2)
        assert r["bytes"] == 24 * (half(r["numel"] - r["tied"]) + half(r["tied"])), r
        assert 0 <= 2 * r["bytes"] - one["bytes"] <= 2 * 24, (r, one)


def tensors_held(x, seen=None) -> list:
    """Every tensor reachable from x: through dicts, lists, tuples and objects' attributes, each object once."""
    seen = set() if seen is None else seen
    if id(x) in seen:
        return []
    seen.add(id(x))
    if isinstance(x, torch.Tensor):
        return [x]
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple, set)) else \
        vars(x).values() if hasattr(x, "__dict__") and not isinstance(x, type) else ()
    return [t for item in items for t in tensors_held(item, seen)]


def zero_storage_case(mesh, cfg, full, batch, dtype, bucket_mb):
    """One step of this rank with ZeRO-1. -> the storage of every tensor ZeroAdamW holds (but the parameters and
    buckets it was given), what its state_bytes() says, its slices' elements, the grad norm it computes."""
    specs = N.gpt_specs(cfg)
    params = {k: t.to(dtype).requires_grad_(True) for k, t in P.shard(full, specs, mesh).items()}
    buckets = P.GradBuckets(params, mesh, bucket_mb=bucket_mb, zero=True)
    opt = P.ZeroAdamW(params, buckets, specs, mesh, lr=LR, weight_decay=WEIGHT_DECAY)
    N.gpt_loss(params, *my_rows(batch, mesh).values(), cfg, mesh).backward()
    buckets.finish()
    held = tensors_held({k: v for k, v in vars(opt).items() if k not in ("params", "buckets")})
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    return dict(measured=sum(storages.values()), reported=opt.state_bytes(),
                elements=sum(b["shard"].numel() for b in buckets.buckets), norm=opt.clip_grad_norm(0))


@pytest.mark.parametrize("bucket_mb", [TINY_BUCKETS, 1e-3], ids=["tiny buckets", "buckets of 1 kB"])
@pytest.mark.parametrize("dtype, per_element", [(torch.bfloat16, 12), (torch.float32, 12), (torch.float64, 24)],
                         ids=["bf16", "fp32", "fp64"])
def test_zero_state_bytes_are_measured_and_12_an_element(pool, dtype, per_element, bucket_mb):
    """tp 2, dp 2: state_bytes() is the storage of every tensor ZeroAdamW holds, and that is the main copy and two
    moments of its slices and nothing else: 12 bytes an element (24 for a float64 model), padding included.
    The grad norm it computes from its slices (which elements count: ranges from the layout, not a stored
    mask) is the serial model's, kv heads replicated over tp (kv_heads = 1) included."""
    cfg = N.GPTConfig(vocab_size=21, vocab_multiple=4, max_seq=8, layers=2, hidden=16, heads=4, kv_heads=1)
    full = jittered(N.init_gpt(cfg, 3, torch.float64), 3)
    batch = dict(ids=randint(4, 21, 4, 8), targets=randint(5, 21, 4, 8))
    serial = {k: t.clone().requires_grad_(True) for k, t in full.items()}
    N.gpt_loss(serial, batch["ids"], batch["targets"], cfg, SERIAL).backward()
    want = torch.stack([p.grad.norm() for p in serial.values()]).norm()
    for r in pool.run(zero_storage_case, cfg, full, batch, dtype, bucket_mb, tp=2):
        assert r["measured"] == r["reported"] == per_element * r["elements"], r
        assert_close(r["norm"], want, "ZeRO's grad norm", TOL if dtype == torch.float64 else dict(rtol=2e-2, atol=0))


def test_zero_keeps_an_fp32_main_copy_of_bf16_parameters():
    """bf16 parameters at 1.0 (bf16 steps there: 2^-8 below, 2^-7 above) with lr 1e-4: one AdamW step moves
    each by about 1e-4, below bf16's resolution. torch's AdamW on the bf16 tensors themselves never moves
    them; ZeroAdamW's fp32 main copy accumulates the steps, and its bf16 parameters are at every step
    exactly the fp32 AdamW run rounded to bf16: unmoved after one step, moved after 30 (the decreasing ones
    cross the rounding midpoint 1 - 2^-9 after 20 steps of 1e-4)."""
    lr, steps = 1e-4, 30
    coef = dict(w=torch.tensor([[1.0, -0.5, 2.0, 0.25]] * 4), b=torch.tensor([-1.0, 0.5, 4.0, -0.125]))
    make = lambda dtype: {k: torch.ones_like(c, dtype=dtype).requires_grad_(True) for k, c in coef.items()}
    loss_of = lambda params: sum((params[k].float() * c).sum() for k, c in coef.items())
    params, fp32, plain = make(torch.bfloat16), make(torch.float32), make(torch.bfloat16)
    buckets = P.GradBuckets(params, SERIAL, zero=True)
    opt = P.ZeroAdamW(params, buckets, dict.fromkeys(params), SERIAL, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    assert opt.state_bytes() == 3 * 4 * 20  # main copy and two moments in float32
    torch_opts = [torch.optim.AdamW([ps["w"]], lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY) for ps in (fp32, plain)]
    torch_opts += [torch.optim.AdamW([ps["b"]], lr=lr, betas=BETAS, weight_decay=0.0) for ps in (fp32, plain)]
    for step in range(1, steps + 1):
        buckets.zero_grad()
        loss_of(params).backward()
        buckets.finish()
        opt.step()
        for o in torch_opts:
            o.zero_grad()
        loss_of(fp32).backward()
        loss_of(plain).backward()
        for o in torch_opts:
            o.step()
        for k in params:
            assert params[k].dtype == torch.bfloat16
            assert torch.equal(params[k].detach(), fp32[k].detach().bfloat16()), (step, k, params[k], fp32[k])
            assert (plain[k] == 1).all(), (step, k)
        if step == 1:
            assert all((params[k] == 1).all() and (fp32[k] != 1).all() for k in params)
    assert all((params[k] != 1).any() for k in params)


# ---------------------------------------------------------------------------------------------------
# 5. Bad inputs: ValueErrors that name the values
# ---------------------------------------------------------------------------------------------------


def tiny_gpt():
    cfg = N.GPTConfig(vocab_size=9, vocab_multiple=4, max_seq=4, layers=2, hidden=4, heads=2)
    params = {k: t.requires_grad_(True) for k, t in N.init_gpt(cfg, 0, torch.float64).items()}
    return cfg, params, dict(ids=randint(0, 9, 6, 4), targets=randint(1, 9, 6, 4))


def one_param():
    return {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}


def bad_pipeline_step(model, m):
    cfg, params, batch = tiny_gpt()
    N.pipeline_step(model, params, batch, cfg, SERIAL, microbatches=m)


BAD_INPUTS = {
    "layers not a multiple of pp": (lambda: P.stage_layers(6, 4), "layers=6 cannot be cut into pp*virtual stages = "
                                                                  "4*1 = 4 equal stages"),
    "layers not a multiple of pp*v": (lambda: P.stage_layers(8, 2, 3), "layers=8 cannot be cut into pp*virtual "
                                                                       "stages = 2*3 = 6"),
    "v > 1 without pp": (lambda: P.stage_layers(4, 1, 2), "virtual stages=2 needs pp > 1"),
    "unknown schedule": (lambda: P.schedule_for("gpipe", 2, 2), "unknown schedule 'gpipe'"),
    "interleaved with v = 1": (lambda: P.schedule_for("interleaved", 2, 4, 1),
                               "schedule interleaved needs virtual stages >= 2, got 1"),
    "v = 2 not interleaved": (lambda: P.schedule_for("1f1b", 2, 4, 2),
                              "virtual stages=2 needs schedule interleaved, got '1f1b'"),
    "interleaved, m % p": (lambda: P.schedule_for("interleaved", 4, 6, 2), "microbatches=6, pp=4"),
    "m does not divide the batch": (lambda: N.split_microbatches(dict(ids=torch.zeros(6, 3)), 4),
                                    "microbatches=4 must be an integer >= 1 dividing the batch's 6 rows"),
    "m = 0": (lambda: N.split_microbatches(dict(ids=torch.zeros(6, 3)), 0), "microbatches=0"),
    "pipeline_step, m does not divide": (lambda: bad_pipeline_step("gpt", 4), "microbatches=4 must be an integer >= 1 "
                                                                              "dividing the batch's 6 rows"),
    "pipeline_step, t5": (lambda: bad_pipeline_step("t5", 2), "model 't5' does not pipeline"),
    "bucket_mb = 0": (lambda: P.GradBuckets(one_param(), SERIAL, bucket_mb=0), "bucket size must be a number of "
                                                                               "MB > 0, got 0"),
    "bucket_mb < 0": (lambda: P.GradBuckets(one_param(), SERIAL, bucket_mb=-1.5), "got -1.5"),
    "bucket_mb nan": (lambda: P.GradBuckets(one_param(), SERIAL, bucket_mb=float("nan")), "got nan"),
    "accumulations = 0": (lambda: P.GradBuckets(one_param(), SERIAL, accumulations=0),
                          "accumulations must be an integer >= 1, got 0"),
    "grad_dtype int": (lambda: P.GradBuckets(one_param(), SERIAL, grad_dtype=torch.int32),
                       "grad_dtype must be a floating torch dtype or None, got torch.int32"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_value_errors_naming_the_values(case):
    fn, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        fn()


@pytest.mark.parametrize("made", [((1, 3, 4), torch.float64), ((1, 4, 4), torch.float32)], ids=["shape", "dtype"])
def test_a_stage_output_the_schedule_cannot_send_is_refused_before_sending(made):
    """Stage 0 of 2 (a mesh built by hand: no process group is touched unless something is sent) makes an
    output that is not the [b_micro, s(/t), h] the receiver will post: a ValueError, and no send recorded."""
    shape, dtype = made
    mesh = P.Mesh(pp=2, pp_rank=0)
    forward = lambda chunk, micro, x: torch.zeros(shape, dtype=dtype, requires_grad=True)
    with P.count_comms() as records, pytest.raises(ValueError, match=re.escape(
            f"stage 0 made {shape} {dtype}, but the stages exchange (1, 4, 4) torch.float64")):
        schedules, plans = P.checked_schedule("1f1b", 2, 1)
        P.run_schedule(schedules[0], plans[0], forward, mesh, shape=(1, 4, 4), dtype=torch.float64, device="cpu")
    assert records == []


# ---------------------------------------------------------------------------------------------------
# 6. Pipeline x context x data parallel, all above 1: pp = cp = dp = 2 on the 8 workers
# ---------------------------------------------------------------------------------------------------

_CP_MESHES: dict = {}


def cp_mesh(tp: int, cp: int, pp: int) -> P.Mesh:
    """The pool's meshes have no cp: this worker's mesh of the layout (dp fills the world), built once (every
    rank runs the same tasks in the same order, so every rank creates the same groups in the same order)."""
    if (tp, cp, pp) not in _CP_MESHES:
        _CP_MESHES[(tp, cp, pp)] = P.Mesh.build(tp=tp, cp=cp, pp=pp)
    return _CP_MESHES[(tp, cp, pp)]


def cp_train_case(_pool_mesh, cp, pp, *args):
    """train_case at (tp 1, cp, pp): each cp rank's loss is its chunks' share, so the replica's loss is their
    mean over cp; coords gain the cp rank."""
    mesh = cp_mesh(1, cp, pp)
    out = train_case(mesh, *args)
    out["losses"] = {k: P.all_reduce(v, mesh, "cp") / cp for k, v in out["losses"].items()}
    out["coords"] += (mesh.cp_rank,)
    return out


@st.composite
def pp_cp_dp_cases(draw):
    schedule = draw(st.sampled_from(SCHEDULES))
    v = 2 if schedule == "interleaved" else 1
    m = 2 if v > 1 else draw(st.integers(1, 2))
    return (schedule, v, m, draw(st.booleans()), draw(st.sampled_from([TINY_BUCKETS, ONE_BUCKET])),
            draw(st.booleans()), draw(st.sampled_from(["learned", "rope"])))


@settings(max_examples=1)
@example(case=("1f1b", 1, 2, True, TINY_BUCKETS, True, "rope"))
@given(case=pp_cp_dp_cases())
def test_training_at_pp2_cp2_dp2_equals_serial_adamw(pool8, case):
    """pp, cp and dp all 2 (with any of them 1 a mix-up of the dp and cp coordinates, in `Mesh.pp_peer` say,
    goes unseen): three steps of pipeline_step (each stage sends its two chunks of every sequence to the same
    cp and dp coordinates on the next stage), GradBuckets over dp x cp (ZeRO-1 or AdamW), the global-norm clip:
    the losses, grad norms and parameters equal serial AdamW's on the global batch."""
    schedule, v, m, zero, bucket_mb, tied, position = case
    cfg = replace(train_config(layers=4, tied=tied), position=position)
    full = full_params("gpt", cfg, 3)
    rows, s = 2 * m, 8  # dp = 2 replicas of m microbatches of one row
    batches = [dict(ids=randint(20 + k, 49, rows, s), targets=randint(30 + k, 49, rows, s)) for k in range(STEPS)]
    want_losses, want_norms, want = serial_gpt_training(cfg, full, [(b["ids"], b["targets"]) for b in batches])
    results = pool8.run(cp_train_case, 2, 2, cfg, full, batches, schedule, v, m, zero, bucket_mb)
    assert {r["coords"] for r in results} == {(p, d, 0, c) for p in (0, 1) for d in (0, 1) for c in (0, 1)}
    what = f"pp=2 cp=2 dp=2 {case}"
    check_losses(results, dict(loss=want_losses), what)
    for r in results:
        assert_close(r["norms"], want_norms, f"{what}: grad norm on rank {r['coords']}")
    assert_close(merged([r["params"] for r in results], what), want, f"{what}: parameters after {STEPS} steps")


# ---------------------------------------------------------------------------------------------------
# 7. Order, not tags: the executor posts exactly the checked plan; tags change nothing
# ---------------------------------------------------------------------------------------------------


def posted_case(mesh, cfg, full, batch, schedule, v, m, tags):
    """One training step with P2P_TAGS = tags, every batch_isend_irecv the executor makes recorded as
    [(op, peer global rank, tag)]."""
    calls, batch_isend_irecv = [], torch.distributed.batch_isend_irecv

    def recorded(ops):
        calls.append([(op.op.__name__, op.peer, op.tag) for op in ops])
        return batch_isend_irecv(ops)

    params = my_stage("gpt", mesh, cfg, full, v)
    saved, P.P2P_TAGS, torch.distributed.batch_isend_irecv = P.P2P_TAGS, tags, recorded
    try:
        out = N.pipeline_step("gpt", params, my_rows(batch, mesh), cfg, mesh, schedule=schedule, v=v, microbatches=m)
    finally:
        P.P2P_TAGS, torch.distributed.batch_isend_irecv = saved, batch_isend_irecv
    return dict(pp_rank=mesh.pp_rank, calls=calls, loss=out["loss"], grads={k: p.grad for k, p in params.items()})


@pytest.mark.parametrize("schedule, v, m, pp, tp", [("interleaved", 2, 4, 2, 2), ("zb", 1, 3, 4, 1)])
def test_the_executor_posts_the_checked_plan_and_tags_change_nothing(pools, schedule, v, m, pp, tp):
    """Each batch_isend_irecv is one group of the rank's p2p_plans entry, in order, to the planned peers;
    tags are 0 (matched by order, as NCCL does) unless P2P_TAGS, the debugging aid, and both runs give
    bitwise the same loss and gradients."""
    cfg, dp = train_config(layers=4), 4 // (pp * tp)
    full = full_params("gpt", cfg, 5)
    batch = dict(ids=randint(7, 49, dp * m, 8), targets=randint(8, 49, dp * m, 8))
    untagged = run_layout(pools, posted_case, cfg, full, batch, schedule, v, m, False, pp=pp, tp=tp, dp=dp)
    tagged = run_layout(pools, posted_case, cfg, full, batch, schedule, v, m, True, pp=pp, tp=tp, dp=dp)
    _, plans = P.checked_schedule(schedule, pp, m, v)
    for rank, (plain, debug) in enumerate(zip(untagged, tagged)):
        mesh = P.Mesh(tp=tp, pp=pp, dp=dp, tp_rank=rank % tp, pp_rank=plain["pp_rank"], dp_rank=rank // tp % dp)
        want = [[(("isend" if post.op == "send" else "irecv"), mesh.global_rank(pp=post.peer)) for post in group]
                for groups in plans[plain["pp_rank"]] for group in groups]
        assert [[(op, peer) for op, peer, _ in call] for call in plain["calls"]] == want, rank
        assert {tag for call in plain["calls"] for _, _, tag in call} == {0}
        assert len({tag for call in debug["calls"] for _, _, tag in call}) == sum(map(len, want))  # one per message
        assert torch.equal(plain["loss"], debug["loss"])
        assert all(torch.equal(plain["grads"][k], debug["grads"][k]) for k in plain["grads"])
