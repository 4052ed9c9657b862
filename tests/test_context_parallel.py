"""Context parallelism (parallel.py section 15: `cp_positions`, `cp_split`, `cp_unsplit`, `check_cp_seq`,
`ring_attention`; the cp dim of `Mesh`, its "cp" and "dpcp" groups; nanomeg's GPT under cp) against
independent references, in float64, on the 4-process gloo pool.

The pool's own meshes have no cp: each task builds its mesh with `Mesh.build(tp=, cp=, pp=)` (`cp_mesh`,
cached per layout in the worker, since every build creates process groups on every rank).

1. ring attention = plain softmax attention on the whole sequence (written here: repeat_interleave for
   GQA, the causal and/or a pair mask in global positions, rows that see no key give 0): output and
   dq, dk, dv at every rank's positions, for cp in {1, 2, 4} with tp (other heads) and dp (other rows)
   around it; each replica gets other inputs, so a ring that strays out of its replica is seen;
2. attention dropout inside the ring = `nanomeg.core_attention`'s dropout on the whole sequence (the
   same counter-based mask at global rows, heads, query and key positions), values and gradients;
3. communication: one call sends k and v cp − 1 times forward (2·(cp − 1) records "send" on dim "cp" of
   b·g·(s/cp)·d elements) and k, v plus their dk, dv sums backward (4·(cp − 1)); nothing at cp = 1;
4. GPT under (tp, cp, dp) layouts, sequence parallel, rope / learned positions, GQA, hidden and
   attention dropout, loss mask, recompute: the dp·cp-mean loss, every gradient averaged over "dpcp"
   and the logits put back together (`cp_unsplit`, all-gather over tp) equal the serial full batch;
5. training: GradBuckets + AdamW and ZeRO-1 (`ZeroAdamW`) with the global-norm clip, 3 steps at
   (tp, cp) = (1, 2) and (2, 2), equal torch's AdamW + clip_grad_norm_ on the full model;
6. the mesh: rank coordinates (rank order tp, cp, dp, pp), the members and the rank order of the
   "tp", "cp", "dp", "dpcp" groups, `cp_peer`; `cp_positions` cover the sequence once, rank r holding
   chunks r and 2·cp − 1 − r; `cp_split` / `cp_unsplit` are inverse;
7. bad input: a sequence that does not cut into 2·cp chunks, a world that cp does not divide, cp = 0,
   relative positions or experts under cp, ep with cp, a KV cache under cp: ValueErrors naming the
   values, raised on every rank before any collective; ring_attention refuses tokens that do not cut
   into two chunks and k, v that do not fit q.
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from common import (BETAS, CLIP, LR, SERIAL, STEPS, WEIGHT_DECAY, adamw, assert_close, jittered, padding, rand,
                    randint, serial_gpt_training)
from harness import value_errors_then_in_step
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nanomeg as N
import parallel as P

WORLD = 4
_MESHES: dict = {}


def cp_mesh(tp: int = 1, cp: int = 1, pp: int = 1) -> P.Mesh:
    """This worker's mesh of the layout (dp fills the world), built once: every rank runs the same tasks in
    the same order, so every rank builds (and creates the groups of) the same layouts in the same order."""
    if (tp, cp, pp) not in _MESHES:
        _MESHES[(tp, cp, pp)] = P.Mesh.build(tp=tp, cp=cp, pp=pp)
    return _MESHES[(tp, cp, pp)]


# ---------------------------------------------------------------------------------------------------
# The independent reference and the drawn attention inputs
# ---------------------------------------------------------------------------------------------------


def ref_attention(q, k, v, *, scale, causal, mask):
    """softmax(q kᵀ · scale, masked) v on the whole sequence. q [B, N, s, d]; k, v [B, G, s, d] (query head
    h reads kv head h // (N/G)); mask None or bool [B|1, 1, s, s], True = masked. A row that sees no key
    gives 0 and passes no gradient."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q.shape[2]
    hidden = torch.zeros(1, 1, s, s, dtype=torch.bool)
    if causal:
        hidden = hidden | torch.ones(s, s, dtype=torch.bool).triu(1)
    if mask is not None:
        hidden = hidden | mask
    dead = hidden.all(-1, keepdim=True)  # [B|1, 1, s, 1]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(hidden, float("-inf")).masked_fill(dead, 0.0)
    return scores.softmax(-1).masked_fill(dead, 0.0) @ v


def pair_mask_of(style: str, real, B: int, s: int, seed: int):
    """None, or a bool [B|1, 1, s, s] pair mask (True = masked): padded keys; padded keys and queries (the
    queries then see nothing); or random pairs shared by the batch, one query row wholly masked."""
    if style == "none":
        return None
    if style == "keys":
        return ~real[:, None, None, :].expand(B, 1, s, s).clone()
    if style == "pairs":
        return ~(real[:, None, :, None] & real[:, None, None, :])
    mask = rand(seed + 9, 1, 1, s, s) > 0.6
    mask[0, 0, (seed % s)] = True
    return mask


class AttnCase:
    def __init__(self, tp, cp, b, n, g, d, c, causal, style, scale, seed, real):
        self.tp, self.cp, self.b, self.n, self.g, self.d, self.c = tp, cp, b, n, g, d, c
        self.causal, self.style, self.scale, self.seed, self.real = causal, style, scale, seed, real
        self.dp, self.s = WORLD // (tp * cp), 2 * cp * c

    def __repr__(self):
        return (f"AttnCase(tp={self.tp}, cp={self.cp}, dp={self.dp}, b={self.b}, n={self.n}, g={self.g}, d={self.d}, "
                f"s={self.s}, causal={self.causal}, mask={self.style}, scale={self.scale}, seed={self.seed}, "
                f"real={self.real})")

    def tensors(self):
        """q [B, N, s, d], k, v [B, G, s, d], the upstream gradient and the mask: B = dp·b rows (replica i
        takes rows i·b onwards), N = tp·n heads and G = tp·g kv heads (tp rank t takes its n and g)."""
        B, N, G, s, d = self.dp * self.b, self.tp * self.n, self.tp * self.g, self.s, self.d
        q, k, v = rand(self.seed, B, N, s, d), rand(self.seed + 1, B, G, s, d), rand(self.seed + 2, B, G, s, d)
        real = torch.tensor(self.real, dtype=torch.bool)
        return q, k, v, rand(self.seed + 3, B, N, s, d), pair_mask_of(self.style, real, B, s, self.seed)


@st.composite
def attn_cases(draw, cps=(1, 2, 4)):
    cp = draw(st.sampled_from(cps))
    tp = draw(st.sampled_from([t for t in (1, 2, 4) if t * cp <= WORLD]))
    b, g, c = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2])), draw(st.integers(1, 4))
    s, dp = 2 * cp * c, WORLD // (tp * cp)
    return AttnCase(tp, cp, b, n=g * draw(st.sampled_from([1, 2, 3])), g=g, d=draw(st.integers(1, 4)), c=c,
                    causal=draw(st.booleans()), style=draw(st.sampled_from(["none", "keys", "pairs", "random"])),
                    scale=draw(st.sampled_from([0.35, 1.0, 1.7])), seed=draw(st.integers(0, 2**16)),
                    real=draw(padding(dp * b, s)) if s >= 2 else ((1,),) * (dp * b))


def ring_task(_pool_mesh, tp, cp, q, k, v, go, mask, causal, scale, drop_p=0.0, seed=0):
    """This rank's rows, heads and positions of q, k, v through ring_attention and back; its results and the
    sends it recorded, forward and backward apart."""
    mesh = cp_mesh(tp, cp)
    b, n, g, s = q.shape[0] // mesh.dp, q.shape[1] // tp, k.shape[1] // tp, q.shape[2]
    rows, pos = slice(mesh.dp_rank * b, (mesh.dp_rank + 1) * b), P.cp_positions(s, mesh)
    heads, kv_heads = slice(mesh.tp_rank * n, (mesh.tp_rank + 1) * n), slice(mesh.tp_rank * g, (mesh.tp_rank + 1) * g)
    ql, kl, vl = (t[rows, h][:, :, pos].clone().requires_grad_(True) for t, h in ((q, heads), (k, kv_heads),
                                                                                  (v, kv_heads)))
    m = None if mask is None else mask if mask.shape[0] == 1 else mask[rows]
    drop = (drop_p, seed, "1.attn", mesh.dp_rank * b, q.shape[0], mesh.tp_rank * n, q.shape[1]) if drop_p else None
    with P.count_comms() as fwd:
        out = P.ring_attention(ql, kl, vl, mesh, scale=scale, causal=causal, mask=m, dropout=drop)
    with P.count_comms() as bwd:
        (out * go[rows, heads][:, :, pos]).sum().backward()
    comms = lambda recs: [(r["op"], r["dim"], r["elements"], r["phase"]) for r in recs]
    return dict(rows=rows, heads=heads, kv_heads=kv_heads, pos=pos, out=out.detach(), dq=ql.grad, dk=kl.grad,
                dv=vl.grad, fwd=comms(fwd), bwd=comms(bwd))


def assembled(results, q, k):
    """The ranks' blocks put back into whole tensors; every (row, head, position) written exactly once."""
    full = dict(out=torch.zeros_like(q), dq=torch.zeros_like(q), dk=torch.zeros_like(k), dv=torch.zeros_like(k))
    seen = dict(q=torch.zeros(q.shape[:3], dtype=torch.int64), k=torch.zeros(k.shape[:3], dtype=torch.int64))
    for r in results:
        for name, heads in (("out", r["heads"]), ("dq", r["heads"]), ("dk", r["kv_heads"]), ("dv", r["kv_heads"])):
            view = full[name][r["rows"], heads]
            view[:, :, r["pos"]] = r[name]
        seen["q"][r["rows"], r["heads"]][:, :, r["pos"]] += 1
        seen["k"][r["rows"], r["kv_heads"]][:, :, r["pos"]] += 1
    assert (seen["q"] == 1).all() and (seen["k"] == 1).all(), "the ranks' positions do not tile the tensors"
    return full


def reference_grads(attend, q, k, v, go):
    """attend(q, k, v) and the gradients of <attend(q, k, v), go> by autograd."""
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attend(q, k, v)
    (out * go).sum().backward()
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


# ---------------------------------------------------------------------------------------------------
# 1. Ring attention = plain attention on the whole sequence
# ---------------------------------------------------------------------------------------------------

# padded queries (rows that see no key) under the causal mask, GQA, cp = 4
DEAD_ROWS = AttnCase(1, 4, b=1, n=4, g=2, d=3, c=2, causal=True, style="pairs", scale=0.5, seed=4,
                     real=((1,) * 5 + (0,) * 11,))
# the random pair mask with a wholly masked row and no causal mask, cp = 2 at tp = 2 (heads split)
RANDOM_PAIRS = AttnCase(2, 2, b=2, n=1, g=1, d=2, c=3, causal=False, style="random", scale=1.7, seed=7,
                        real=((1,) * 12, (1,) * 12))


@settings(max_examples=2 * settings().max_examples)
@example(case=DEAD_ROWS)
@example(case=RANDOM_PAIRS)
@given(case=attn_cases())
def test_ring_attention_equals_plain_attention(pool, case):
    q, k, v, go, mask = case.tensors()
    want = reference_grads(lambda q, k, v: ref_attention(q, k, v, scale=case.scale, causal=case.causal, mask=mask),
                           q, k, v, go)
    results = pool.run(ring_task, case.tp, case.cp, q, k, v, go, mask, case.causal, case.scale)
    got = assembled(results, q, k)
    assert_close(got, want, repr(case))
    # rows that see no key: exactly zero, and no gradient to their queries
    hidden = torch.ones(case.s, case.s, dtype=torch.bool).triu(1) if case.causal else torch.zeros(1, 1, 1, 1).bool()
    dead = (hidden | (mask if mask is not None else False)).all(-1)  # [B|1, 1, s]
    if dead.any():
        dead = dead.expand(q.shape[0], q.shape[1], case.s)
        assert (got["out"][dead] == 0).all() and (got["dq"][dead] == 0).all()
    if case.style == "pairs" and not all(all(r) for r in case.real) or case is DEAD_ROWS:
        assert dead.any(), "the case meant to hold rows that see no key holds none"


def test_ring_attention_sees_the_other_ranks_keys(pool):
    """Not only its own block: attention to the whole sequence differs from attention to the own chunks."""
    case = AttnCase(1, 4, b=1, n=2, g=1, d=2, c=1, causal=False, style="none", scale=1.0, seed=3, real=((1,) * 8,))
    q, k, v, go, _ = case.tensors()
    got = assembled(pool.run(ring_task, 1, 4, q, k, v, go, None, False, 1.0), q, k)
    pos = P.cp_positions(8, replace(SERIAL, cp=4), rank=1)
    local = ref_attention(q[:, :, pos], k[:, :, pos], v[:, :, pos], scale=1.0, causal=False, mask=None)
    assert not torch.allclose(got["out"][:, :, pos], local)


# ---------------------------------------------------------------------------------------------------
# 2. Attention dropout inside the ring = core_attention's dropout on the whole sequence
# ---------------------------------------------------------------------------------------------------


def core_reference(case, p, seed):
    """nanomeg.core_attention on the whole q, k, v (a serial mesh), attention dropout p, training."""
    cfg = N.GPTConfig(hidden=case.tp * case.n * 2, heads=case.tp * case.n, kv_heads=case.tp * case.g,
                      attention_dropout=p, scale_attention=case.scale != 1.0)

    def attend(q, k, v, mask):
        hidden = torch.ones(case.s, case.s, dtype=torch.bool).triu(1) if case.causal else None
        if mask is not None:
            hidden = mask if hidden is None else mask | hidden
        kind = "none" if hidden is None else "causal" if mask is None else "padding"
        return N.core_attention(q, k, v, cfg, SERIAL, mask_kind=kind, mask=hidden if kind == "padding" else None,
                                seed=seed, stream="1.attn", training=True)
    return attend


@given(case=attn_cases(cps=(2, 4)), p=st.sampled_from([0.2, 0.5]), seed=st.integers(0, 2**16))
def test_ring_attention_dropout_is_core_attentions(pool, case, p, seed):
    case.scale = 1.0 / case.d ** 0.5 if case.scale != 1.0 else 1.0  # core_attention's two scales
    q, k, v, go, mask = case.tensors()
    attend = core_reference(case, p, seed)
    want = reference_grads(lambda q, k, v: attend(q, k, v, mask), q, k, v, go)
    got = assembled(pool.run(ring_task, case.tp, case.cp, q, k, v, go, mask, case.causal, case.scale, p, seed), q, k)
    assert_close(got, want, f"{case} p={p} seed={seed}")
    no_drop = ref_attention(q, k, v, scale=case.scale, causal=case.causal, mask=mask)
    assert not torch.allclose(got["out"], no_drop), "dropout dropped nothing"


# ---------------------------------------------------------------------------------------------------
# 3. Communication: k, v around the ring forward; k, v and their dk, dv sums backward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp, cp", [(1, 1), (4, 1), (1, 2), (2, 2), (1, 4)])
def test_ring_attention_sends_k_and_v_forward_and_their_sums_backward(pool, tp, cp):
    case = AttnCase(tp, cp, b=2, n=3, g=1, d=2, c=2, causal=True, style="keys", scale=1.0, seed=1,
                    real=((1,) * (4 * cp),) * (2 * WORLD // (tp * cp)))
    q, k, v, go, mask = case.tensors()
    block = case.b * case.g * (case.s // cp) * case.d  # one k (or v, dk, dv) block: b·g·(s/cp)·d
    for rank, r in enumerate(pool.run(ring_task, tp, cp, q, k, v, go, mask, True, 1.0, 0.3, 5)):
        assert r["fwd"] == [("send", "cp", block, "forward")] * (2 * (cp - 1)), f"rank {rank}: {r['fwd']}"
        assert r["bwd"] == [("send", "cp", block, "backward")] * (4 * (cp - 1)), f"rank {rank}: {r['bwd']}"


# ---------------------------------------------------------------------------------------------------
# 4. GPT under context parallelism = the serial model on the whole batch
# ---------------------------------------------------------------------------------------------------

LAYOUTS = [(1, 2), (1, 4), (2, 2), (4, 1), (1, 1)]  # (tp, cp); dp = 4 / (tp·cp)


def gpt_step_task(_pool_mesh, tp, cp, cfg, full, ids, targets, loss_mask, seed):
    """One forward + backward of this rank (whole ids of its replica's rows; gpt_logits keeps its chunks):
    the dp·cp-mean loss, the gradients averaged over dpcp and unsharded, and its replica's whole logits."""
    mesh = cp_mesh(tp, cp)
    specs = N.gpt_specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}
    b = ids.shape[0] // mesh.dp
    rows = slice(mesh.dp_rank * b, (mesh.dp_rank + 1) * b)
    logits = N.gpt_logits(params, ids[rows], cfg, mesh, seed=seed, training=True)
    loss = N.lm_loss(logits, targets[rows], cfg, mesh, None if loss_mask is None else loss_mask[rows])
    loss.backward()
    n = mesh.dp * mesh.cp
    whole = P.all_gather(P.cp_unsplit(logits.detach(), mesh), mesh, "tp", -1)
    return dict(rows=rows, logits=whole, loss=P.all_reduce(loss.detach(), mesh, "dpcp") / n,
                grads=P.unshard({k: P.all_reduce(p.grad, mesh, "dpcp") / n for k, p in params.items()}, specs, mesh))


def serial_step(cfg, full, ids, targets, loss_mask, seed):
    ref = replace(cfg, sequence_parallel=False, recompute="none", attention="core")
    params = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    logits = N.gpt_logits(params, ids, ref, SERIAL, seed=seed, training=True)
    loss = N.lm_loss(logits, targets, ref, SERIAL, loss_mask)
    loss.backward()
    return dict(logits=logits.detach(), loss=loss.detach(), grads={k: p.grad for k, p in params.items()})


@st.composite
def gpt_cp_cases(draw):
    tp, cp = draw(st.sampled_from(LAYOUTS))
    dp = WORLD // (tp * cp)
    sp = tp > 1 and draw(st.booleans())
    position = draw(st.sampled_from(["learned", "rope"]))
    head_dim = draw(st.sampled_from([2, 4]))
    if cp > 1:
        s = 2 * cp * draw(st.integers(1, 2))
    else:
        s = tp * draw(st.integers(1, 2)) if sp else draw(st.integers(1, 6))
    attention_dropout = draw(st.sampled_from([0.0, 0.1, 0.2]))
    cfg = N.GPTConfig(
        vocab_size=4 * draw(st.integers(1, 3)) + draw(st.integers(1, 3)), vocab_multiple=4,
        max_seq=s + draw(st.integers(0, 2)), layers=draw(st.integers(1, 2)), hidden=4 * head_dim, heads=4,
        kv_heads=draw(st.sampled_from([1, 2, 4])), ffn=draw(st.sampled_from([None, 4, 8])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), activation=draw(st.sampled_from(["gelu", "swiglu"])),
        position=position, bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
        hidden_dropout=draw(st.sampled_from([0.0, 0.1, 0.2])), attention_dropout=attention_dropout,
        attention="core" if attention_dropout else draw(st.sampled_from(["core", "sdpa"])),
        recompute=draw(st.sampled_from(["none", "selective", "full"])), sequence_parallel=sp,
        label_smoothing=draw(st.sampled_from([0.0, 0.1])))
    b = draw(st.integers(1, 2))
    masked = dp == 1 and draw(st.booleans())  # a loss mask only on one replica (see test docstring)
    return tp, cp, cfg, dp * b, s, masked, draw(st.integers(0, 2**16))


EVERYTHING_ON = (2, 2, N.GPTConfig(
    vocab_size=13, vocab_multiple=4, max_seq=8, layers=2, hidden=16, heads=4, kv_heads=2, ffn=8, norm="rmsnorm",
    activation="swiglu", position="rope", bias=False, tie_embeddings=False, hidden_dropout=0.2,
    attention_dropout=0.2, recompute="full", sequence_parallel=True, label_smoothing=0.1), 2, 8, True, 11)
LEARNED_CP4 = (1, 4, N.GPTConfig(
    vocab_size=10, vocab_multiple=4, max_seq=9, layers=1, hidden=8, heads=4, kv_heads=1, hidden_dropout=0.1,
    attention_dropout=0.2, recompute="selective"), 1, 8, True, 3)
DP2_CP2 = (1, 2, N.GPTConfig(
    vocab_size=9, vocab_multiple=4, max_seq=8, layers=2, hidden=16, heads=4, kv_heads=4, position="rope",
    hidden_dropout=0.1, attention_dropout=0.1), 4, 8, False, 5)


@settings(max_examples=2 * settings().max_examples)
@example(case=EVERYTHING_ON)
@example(case=LEARNED_CP4)
@example(case=DP2_CP2)
@given(case=gpt_cp_cases())
def test_gpt_under_context_parallel_equals_serial(pool, case):
    tp, cp, cfg, B, s, masked, seed = case
    full = jittered(N.init_gpt(cfg, seed, torch.float64), seed)
    ids, targets = randint(seed, cfg.vocab_size, B, s), randint(seed + 1, cfg.vocab_size, B, s)
    loss_mask = None
    if masked:
        loss_mask = (rand(seed + 2, B, s) > 0).double()
        loss_mask[0, -1] = 1.0  # never all masked; the last chunk (rank 0's second) counts
    want = serial_step(cfg, full, ids, targets, loss_mask, seed)
    what = f"tp={tp} cp={cp} dp={WORLD // (tp * cp)} {cfg}"
    for rank, got in enumerate(pool.run(gpt_step_task, tp, cp, cfg, full, ids, targets, loss_mask, seed)):
        assert_close(got["loss"], want["loss"], f"{what}: loss on rank {rank}")
        assert_close(got["grads"], want["grads"], f"{what}: grads on rank {rank}")
        assert_close(got["logits"], want["logits"][got["rows"]], f"{what}: logits on rank {rank}")


def test_gpt_dropout_in_the_cases_above_is_on():
    """A different seed, or either dropout off, changes the serial loss of EVERYTHING_ON: so its agreement
    above with dropout on says that the cp ranks drew the serial masks (at the global positions)."""
    tp, cp, cfg, B, s, masked, seed = EVERYTHING_ON
    full = jittered(N.init_gpt(cfg, seed, torch.float64), seed)
    ids, targets = randint(seed, cfg.vocab_size, B, s), randint(seed + 1, cfg.vocab_size, B, s)
    serial = lambda cfg, seed: serial_step(cfg, full, ids, targets, None, seed)["loss"]
    assert serial(cfg, seed) != serial(cfg, seed + 1)
    assert serial(cfg, seed) != serial(replace(cfg, attention_dropout=0.0), seed)
    assert serial(cfg, seed) != serial(replace(cfg, hidden_dropout=0.0), seed)


# ---------------------------------------------------------------------------------------------------
# 5. Training steps: GradBuckets + AdamW, or ZeRO-1, over dp x cp, against serial AdamW
# ---------------------------------------------------------------------------------------------------



def train_task(_pool_mesh, tp, cp, cfg, full, batches, zero, bucket_mb):
    mesh = cp_mesh(tp, cp)
    specs = N.gpt_specs(cfg)
    params = {k: v.clone().requires_grad_(True) for k, v in P.shard(full, specs, mesh).items()}
    buckets = P.GradBuckets(params, mesh, bucket_mb=bucket_mb, zero=zero)
    opt = P.ZeroAdamW(params, buckets, specs, mesh, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY) if zero \
        else adamw(params)
    losses, norms = [], []
    for step, (ids, tg) in enumerate(batches):
        buckets.zero_grad()
        b = ids.shape[0] // mesh.dp
        rows = slice(mesh.dp_rank * b, (mesh.dp_rank + 1) * b)
        loss = N.gpt_loss(params, ids[rows], tg[rows], cfg, mesh, seed=10 + step)
        loss.backward()
        buckets.finish()
        norms.append(opt.clip_grad_norm(CLIP) if zero else P.clip_grad_norm(params, specs, mesh, CLIP))
        opt.step()
        losses.append(P.all_reduce(loss.detach(), mesh, "dpcp") / (mesh.dp * mesh.cp))
    return dict(losses=torch.stack(losses), norms=torch.stack(norms),
                params=P.unshard({k: p.detach() for k, p in params.items()}, specs, mesh))


@pytest.mark.parametrize("tp, cp, zero, bucket_mb", [(1, 2, False, 25.0), (1, 2, True, 1e-5), (2, 2, False, 1e-5),
                                                     (2, 2, True, 25.0)])
def test_training_steps_equal_serial_adamw(pool, tp, cp, zero, bucket_mb):
    cfg = N.GPTConfig(vocab_size=21, vocab_multiple=4, max_seq=8, layers=2, hidden=16, heads=4, kv_heads=2,
                      position="rope" if zero else "learned", hidden_dropout=0.1, attention_dropout=0.1,
                      sequence_parallel=tp > 1, tie_embeddings=not zero, init_std=0.2)
    full = jittered(N.init_gpt(cfg, 3, torch.float64), 3)
    B = 2 * WORLD // (tp * cp)
    batches = [(randint(20 + i, cfg.vocab_size, B, 8), randint(30 + i, cfg.vocab_size, B, 8)) for i in range(STEPS)]
    want_losses, want_norms, want = serial_gpt_training(cfg, full, batches)
    assert (want_norms > CLIP).all(), want_norms  # the clip does something at every step
    what = f"tp={tp} cp={cp} {'zero' if zero else 'adamw'} bucket {bucket_mb} MB"
    for rank, r in enumerate(pool.run(train_task, tp, cp, cfg, full, batches, zero, bucket_mb)):
        assert_close(r["losses"], want_losses, f"{what}: losses on rank {rank}")
        assert_close(r["norms"], want_norms, f"{what}: grad norms on rank {rank}")
        assert_close(r["params"], want, f"{what}: parameters after {STEPS} steps on rank {rank}")


# ---------------------------------------------------------------------------------------------------
# 6. The mesh, cp_positions, cp_split / cp_unsplit
# ---------------------------------------------------------------------------------------------------

MESH_LAYOUTS = [(1, 2, 1), (2, 2, 1), (1, 4, 1), (1, 2, 2), (2, 1, 1)]  # (tp, cp, pp); dp fills the world


def mesh_task(_pool_mesh, layouts):
    """Per layout: this rank's coordinates, cp peers, and, per group, its members in group-rank order."""
    out = []
    me = torch.tensor([dist.get_rank()])
    for tp, cp, pp in layouts:
        mesh = cp_mesh(tp, cp, pp)
        groups = {dim: P.all_gather(me, mesh, dim, 0).tolist() for dim in ("tp", "cp", "dp", "dpcp", "pp")}
        out.append(dict(coords=(mesh.tp, mesh.cp, mesh.dp, mesh.pp, mesh.tp_rank, mesh.cp_rank, mesh.dp_rank,
                                mesh.pp_rank), peers=(mesh.cp_peer(1), mesh.cp_peer(-1), mesh.cp_peer(0)),
                        groups=groups, ranks={d: mesh.rank(d) for d in groups}, sizes={d: mesh.size(d) for d in groups},
                        global_rank=mesh.global_rank(), pp_peers=(mesh.pp_peer(1), mesh.pp_peer(-1))))
    return out


def test_mesh_coordinates_groups_and_peers(pool):
    per_rank = pool.run(mesh_task, MESH_LAYOUTS)
    for i, (tp, cp, pp) in enumerate(MESH_LAYOUTS):
        dp = WORLD // (tp * cp * pp)
        coords = lambda r: dict(tp=r % tp, cp=(r // tp) % cp, dp=(r // (tp * cp)) % dp, pp=r // (tp * cp * dp))
        at = lambda c: ((c["pp"] * dp + c["dp"]) * cp + c["cp"]) * tp + c["tp"]
        for rank in range(WORLD):
            got, c = per_rank[rank][i], coords(rank)
            what = f"tp={tp} cp={cp} pp={pp} dp={dp}, rank {rank}"
            assert got["coords"] == (tp, cp, dp, pp, c["tp"], c["cp"], c["dp"], c["pp"]), what
            assert got["peers"] == (at(c | dict(cp=(c["cp"] + 1) % cp)), at(c | dict(cp=(c["cp"] - 1) % cp)), rank), what
            assert got["global_rank"] == rank, what
            assert got["pp_peers"] == (at(c | dict(pp=(c["pp"] + 1) % pp)), at(c | dict(pp=(c["pp"] - 1) % pp))), what
            # members: the ranks that differ from this one only in the group's dims, in the order of the
            # group rank (dpcp: dp_rank·cp + cp_rank), which is where the collectives put them
            for dim, varying in (("tp", ["tp"]), ("cp", ["cp"]), ("dp", ["dp"]), ("pp", ["pp"]),
                                 ("dpcp", ["dp", "cp"])):
                sizes = dict(tp=tp, cp=cp, dp=dp, pp=pp)
                members = [at(c | dict(zip(varying, idx))) for idx in
                           ((i // cp, i % cp) if dim == "dpcp" else (i,) for i in range(got["sizes"][dim]))]
                assert got["sizes"][dim] == (dp * cp if dim == "dpcp" else sizes[dim]), (what, dim)
                assert got["groups"][dim] == members, (what, dim, got["groups"][dim], members)
                assert members[got["ranks"][dim]] == rank, (what, dim)


@given(cp=st.integers(1, 6), c=st.integers(1, 5))
def test_cp_positions_tile_the_sequence_in_load_balanced_chunk_pairs(cp, c):
    s, mesh = 2 * cp * c, replace(SERIAL, cp=cp)
    every = [P.cp_positions(s, mesh, rank=r) for r in range(cp)]
    assert sorted(torch.cat(every).tolist()) == list(range(s))
    for r, pos in enumerate(every):
        assert pos.dtype == torch.int64 and pos.shape == (s // cp,)
        assert pos.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
        assert P.cp_positions(s, replace(mesh, cp_rank=r)).tolist() == pos.tolist()  # default: this rank's
    # causal work is balanced: every rank's queries see the same number of (query, key) pairs
    work = {int(sum(p + 1 for p in pos.tolist())) for pos in every}
    assert len(work) == 1, work


def split_task(_pool_mesh, tp, cp, x):
    mesh = cp_mesh(tp, cp)
    out = {}
    for dim in (0, 1, -1):
        local = P.cp_split(x, mesh, dim)
        out[dim] = (P.cp_positions(x.shape[dim], mesh), local, P.cp_unsplit(local, mesh, dim))
    return out


@pytest.mark.parametrize("tp, cp", [(1, 1), (2, 2), (1, 4)])
def test_cp_split_keeps_the_chunks_and_cp_unsplit_restores(pool, tp, cp):
    x = rand(1, 8, 8 * cp, 8)
    for rank, got in enumerate(pool.run(split_task, tp, cp, x)):
        for dim, (pos, local, back) in got.items():
            assert torch.equal(local, x.index_select(dim, pos)), (rank, dim)
            assert torch.equal(back, x), (rank, dim)


# ---------------------------------------------------------------------------------------------------
# 7. Bad input
# ---------------------------------------------------------------------------------------------------


def test_check_cp_seq_names_seq_and_cp():
    for s, cp in ((6, 2), (4, 4), (9, 3), (1, 2)):
        with pytest.raises(ValueError) as e:
            P.check_cp_seq(s, replace(SERIAL, cp=cp))
        assert f"seq={s}" in str(e.value) and f"cp={cp}" in str(e.value), str(e.value)
    for s, cp in ((4, 2), (8, 4), (6, 3), (2, 1), (8, 1)):
        P.check_cp_seq(s, replace(SERIAL, cp=cp))


SMALL = N.GPTConfig(vocab_size=9, vocab_multiple=4, max_seq=12, layers=1, hidden=8, heads=2)


def bad_cp_case(_pool_mesh):
    mesh = cp_mesh(1, 2)
    full = N.init_gpt(SMALL, 0, torch.float64)
    ids8, ids6 = randint(1, 9, 1, 8), randint(1, 9, 1, 6)
    relative = replace(SMALL, position="relative")
    moe = replace(SMALL, experts=2)
    cases = [
        lambda: N.gpt_loss(full, ids6, ids6, SMALL, mesh),
        lambda: N.gpt_logits(full, randint(1, 9, 1, 10), SMALL, mesh),
        lambda: N.gpt_loss(N.init_gpt(relative, 0, torch.float64), ids8, ids8, relative, mesh),
        lambda: N.gpt_loss(N.init_gpt(moe, 0, torch.float64), ids8, ids8, moe, mesh),
        lambda: N.gpt_logits(full, ids8, SMALL, mesh, caches=[{}]),
        lambda: N.gpt_logits(full, ids8, SMALL, mesh, pos_offset=2),
        lambda: N.gpt_logits(full, randint(1, 9, 1, 16), SMALL, mesh),  # longer than max_seq
        lambda: P.Mesh.build(cp=3),
        lambda: P.Mesh.build(cp=0),
        lambda: P.Mesh.build(tp=2, cp=4),
        lambda: P.Mesh.build(ep=2, cp=2),
        lambda: P.ring_attention(*(rand(0, 1, 1, 3, 2),) * 3, mesh, scale=1.0, causal=True),  # 3 tokens a rank
    ]
    # every rank still in step over cp and dp x cp: no case left one inside a collective (this would hang)
    messages = value_errors_then_in_step(cases, mesh, dims=("cp", "dpcp"))
    # and the ring still works after the refusals
    q = rand(mesh.cp_rank, 1, 1, 4, 2)
    messages.append(P.ring_attention(q, q, q, mesh, scale=1.0, causal=True).shape == q.shape)
    return messages


def test_bad_cp_input_raises_on_every_rank_before_any_collective(pool):
    want = [["seq=6", "cp=2"], ["seq=10", "cp=2"], ["cp=2", "relative"], ["cp=2", "experts"], ["cp=2", "cache"],
            ["cp=2", "cache"], ["16", "max_seq=12"], ["world size 4", "1*3*1 = 3"], ["cp", "cp=0"],
            ["world size 4", "2*4*1 = 8"], ["ep=2", "cp=2"], ["seq=6", "cp=2"], 2.0, 4.0, True]
    for rank, messages in enumerate(pool.run(bad_cp_case)):
        for i, (got, words) in enumerate(zip(messages, want, strict=True)):
            if isinstance(words, list):
                assert got is not None and all(w in got for w in words), f"rank {rank}, case {i}: {got!r} {words}"
            else:
                assert got == words, f"rank {rank}, case {i}: {got!r}"


@pytest.mark.parametrize("kw, words", [(dict(position="relative"), ["cp=2", "position", "relative"]),
                                       (dict(experts=2), ["cp=2", "experts"])])
def test_check_mesh_refuses_what_cp_does_not_build(kw, words):
    cfg = replace(SMALL, **kw)
    with pytest.raises(ValueError) as e:
        cfg.check_mesh(replace(SERIAL, cp=2))
    assert all(w in str(e.value) for w in words), str(e.value)
    cfg.check_mesh(SERIAL)  # fine without cp


@pytest.mark.parametrize("shapes, words", [
    (((1, 1, 3, 2), (1, 1, 3, 2), (1, 1, 3, 2)), ["seq=3", "cp=1"]),  # 3 tokens: chunks of 1 would cover 2
    (((1, 2, 4, 2), (1, 1, 4, 2), (1, 1, 2, 2)), ["ring attention needs", "(1, 1, 2, 2)"]),  # v not like k
    (((1, 2, 4, 2), (1, 1, 2, 2), (1, 1, 2, 2)), ["ring attention needs", "(1, 1, 2, 2)"]),  # k, v not like q
    (((1, 3, 4, 2), (1, 2, 4, 2), (1, 2, 4, 2)), ["ring attention needs", "g | n"]),  # 2 kv heads, 3 heads
    (((2, 2, 4, 2), (1, 2, 4, 2), (1, 2, 4, 2)), ["ring attention needs", "(2, 2, 4, 2)"]),  # other batch
])
def test_ring_attention_refuses_shapes_it_cannot_attend(shapes, words):
    """Once a silent wrong answer (3 tokens: the last query got 0 and its key was never seen); now refused."""
    q, k, v = (rand(i, *shape) for i, shape in enumerate(shapes))
    with pytest.raises(ValueError) as e:
        P.ring_attention(q, k, v, SERIAL, scale=1.0, causal=False)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_ring_attention_takes_a_key_only_padding_mask_and_refuses_a_bad_one():
    """A [b, 1, 1, s] mask (keys only, the serial padding path's form) is the pair mask that masks those keys for
    every query; a mask of the wrong shape or dtype is a ValueError, not an IndexError."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    keys = torch.rand(2, 8, generator=g) < 0.4
    got = P.ring_attention(q, k, v, P.Mesh.serial(), scale=0.5, causal=True, mask=keys[:, None, None, :])
    want = P.ring_attention(q, k, v, P.Mesh.serial(), scale=0.5, causal=True,
                            mask=keys[:, None, None, :].expand(2, 1, 8, 8))
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(keys[:, None, None, :] | torch.ones(8, 8).triu(1).bool(),
                                                         float("-inf"))
    assert_close(got, want, "key-only mask vs its pair mask")
    assert_close(got, torch.softmax(scores, -1).nan_to_num(0.0) @ v, "key-only mask vs plain attention")
    for bad in (keys[:, None, :, None], keys.float()[:, None, None, :], keys[:, None, None, :4]):
        with pytest.raises(ValueError, match=r"ring attention's mask must be bool \[b\|1, 1, s\|1, s\]"):
            P.ring_attention(q, k, v, P.Mesh.serial(), scale=0.5, causal=True, mask=bad)
