"""parallel.py: every tensor-parallel layer equals its serial computation.

Each case is a module-level function `case(mesh, ...)` run twice: on every
rank of the worker pool with a tp>1 mesh, and here in the test process on
`Mesh.serial()`. Outputs and gathered gradients must agree in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from harness import WorkerError, value_errors_then_in_step
from hypothesis import given
from hypothesis import strategies as st

import parallel as P

TOL = dict(rtol=1e-10, atol=1e-10)
tps = st.sampled_from([1, 2, 4])


def rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def assert_all_equal(results, serial):
    for rank, got in enumerate(results):
        for key, want in serial.items():
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(got[key], want, **TOL, msg=lambda m, k=key, r=rank: f"rank {r} {k}: {m}")


# ---------------------------------------------------------------- layers


def column_case(mesh, b, s, h_in, h_out, bias, sp, gather, seed):
    x, w, r = rand(seed, b, s, h_in), rand(seed + 1, h_out, h_in), rand(seed + 3, b, s, h_out)
    xs = leaf(P.split(x, mesh, "tp", 1) if sp else x)
    ws = leaf(P.split(w, mesh, "tp", 0))
    bs = leaf(P.split(rand(seed + 2, h_out), mesh, "tp", 0)) if bias else None
    y = P.column_parallel_linear(xs, ws, bs, mesh, gather_output=gather, sequence_parallel=sp)
    (y * (r if gather else P.split(r, mesh, "tp", -1))).sum().backward()
    return dict(
        y=y.detach() if gather else P.all_gather(y.detach(), mesh, "tp", -1),
        gx=P.all_gather(xs.grad, mesh, "tp", 1) if sp else xs.grad,
        gw=P.all_gather(ws.grad, mesh, "tp", 0),
        gb=P.all_gather(bs.grad, mesh, "tp", 0) if bias else None,
    )


def row_case(mesh, b, s, h_in, h_out, bias, sp, input_is_parallel, seed):
    x, w, r = rand(seed, b, s, h_in), rand(seed + 1, h_out, h_in), rand(seed + 3, b, s, h_out)
    xs = leaf(P.split(x, mesh, "tp", -1) if input_is_parallel else x)
    ws = leaf(P.split(w, mesh, "tp", 1))
    bs = leaf(rand(seed + 2, h_out)) if bias else None
    y = P.row_parallel_linear(xs, ws, bs, mesh, input_is_parallel=input_is_parallel, sequence_parallel=sp)
    (y * (P.split(r, mesh, "tp", 1) if sp else r)).sum().backward()
    return dict(
        y=P.all_gather(y.detach(), mesh, "tp", 1) if sp else y.detach(),
        gx=P.all_gather(xs.grad, mesh, "tp", -1) if input_is_parallel else xs.grad,
        gw=P.all_gather(ws.grad, mesh, "tp", 1),
        gb=bs.grad if bias else None,
    )


@given(tp=tps, b=st.integers(1, 3), s_per=st.integers(1, 3), h_in=st.integers(1, 7), o_per=st.integers(1, 3),
       bias=st.booleans(), sp=st.booleans(), gather=st.booleans(), seed=st.integers(0, 2**16))
def test_column_parallel_linear(pool, tp, b, s_per, h_in, o_per, bias, sp, gather, seed):
    args = (b, s_per * tp, h_in, o_per * tp, bias, sp, gather, seed)
    serial = column_case(P.Mesh.serial(), *args)
    x, w = rand(seed, *args[:3]), rand(seed + 1, args[3], h_in)
    torch.testing.assert_close(serial["y"], F.linear(x, w, rand(seed + 2, args[3]) if bias else None), **TOL)
    assert_all_equal(pool.run(column_case, *args, tp=tp), serial)


@given(tp=tps, b=st.integers(1, 3), s_per=st.integers(1, 3), i_per=st.integers(1, 3), h_out=st.integers(1, 7),
       bias=st.booleans(), sp=st.booleans(), input_is_parallel=st.booleans(), seed=st.integers(0, 2**16))
def test_row_parallel_linear(pool, tp, b, s_per, i_per, h_out, bias, sp, input_is_parallel, seed):
    args = (b, s_per * tp, i_per * tp, h_out, bias, sp, input_is_parallel, seed)
    serial = row_case(P.Mesh.serial(), *args)
    x, w = rand(seed, *args[:3]), rand(seed + 1, h_out, args[2])
    torch.testing.assert_close(serial["y"], F.linear(x, w, rand(seed + 2, h_out) if bias else None), **TOL)
    assert_all_equal(pool.run(row_case, *args, tp=tp), serial)


def mlp_pair_case(mesh, b, s, h, f, sp, seed):
    """column -> gelu -> row, as in Megatron's ParallelMLP, recording collectives."""
    x, w1, w2, r = rand(seed, b, s, h), rand(seed + 1, f, h), rand(seed + 2, h, f), rand(seed + 3, b, s, h)
    xs = leaf(P.split(x, mesh, "tp", 1) if sp else x)
    w1s, w2s = leaf(P.split(w1, mesh, "tp", 0)), leaf(P.split(w2, mesh, "tp", 1))
    with P.count_comms() as records:
        hidden = F.gelu(P.column_parallel_linear(xs, w1s, None, mesh, sequence_parallel=sp))
        y = P.row_parallel_linear(hidden, w2s, None, mesh, sequence_parallel=sp)
        (y * (P.split(r, mesh, "tp", 1) if sp else r)).sum().backward()
    return dict(
        y=P.all_gather(y.detach(), mesh, "tp", 1) if sp else y.detach(),
        gx=P.all_gather(xs.grad, mesh, "tp", 1) if sp else xs.grad,
        gw1=P.all_gather(w1s.grad, mesh, "tp", 0), gw2=P.all_gather(w2s.grad, mesh, "tp", 1),
        comms=sorted((c["phase"], c["op"], c["dim"], c["elements"]) for c in records),
    )


@given(tp=tps, b=st.integers(1, 2), s_per=st.integers(1, 3), h=st.integers(1, 6), f_per=st.integers(1, 3),
       sp=st.booleans(), seed=st.integers(0, 2**16))
def test_column_row_pair_and_its_communication(pool, tp, b, s_per, h, f_per, sp, seed):
    s = s_per * tp
    args = (b, s, h, f_per * tp, sp, seed)
    serial = mlp_pair_case(P.Mesh.serial(), *args)
    assert serial["comms"] == []  # a group of one moves nothing
    results = pool.run(mlp_pair_case, *args, tp=tp)
    assert_all_equal(results, serial)
    n = b * s * h
    if tp == 1:
        want = []
    elif not sp:  # Megatron: f (copy_to_tp) and g (reduce_from_tp): one all-reduce each way
        want = [("backward", "all_reduce", "tp", n), ("forward", "all_reduce", "tp", n)]
    else:  # g -> all-gather, g-bar -> reduce-scatter; backward adds the re-gather of the input
        want = sorted([("forward", "all_gather", "tp", n), ("forward", "reduce_scatter", "tp", n),
                       ("backward", "all_gather", "tp", n), ("backward", "all_gather", "tp", n),
                       ("backward", "reduce_scatter", "tp", n)])
    for got in results:
        assert got["comms"] == want


def embedding_case(mesh, b, s, vocab, vocab_padded, h, sp, seed):
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))
    w, r = rand(seed + 1, vocab_padded, h), rand(seed + 2, b, s, h)
    ws = leaf(P.split(w, mesh, "tp", 0))
    y = P.vocab_parallel_embedding(ids, ws, mesh, sequence_parallel=sp, vocab_size=vocab)
    (y * (P.split(r, mesh, "tp", 1) if sp else r)).sum().backward()
    return dict(y=P.all_gather(y.detach(), mesh, "tp", 1) if sp else y.detach(),
                gw=P.all_gather(ws.grad, mesh, "tp", 0))


@given(tp=tps, b=st.integers(1, 3), s_per=st.integers(1, 3), vocab=st.integers(1, 23), h=st.integers(1, 5),
       sp=st.booleans(), seed=st.integers(0, 2**16))
def test_vocab_parallel_embedding(pool, tp, b, s_per, vocab, h, sp, seed):
    vocab_padded = -(-vocab // 4) * 4  # a multiple of every tp drawn
    args = (b, s_per * tp, vocab, vocab_padded, h, sp, seed)
    serial = embedding_case(P.Mesh.serial(), *args)
    ids = torch.randint(0, vocab, (b, s_per * tp), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(serial["y"], F.embedding(ids, rand(seed + 1, vocab_padded, h)), **TOL)
    assert_all_equal(pool.run(embedding_case, *args, tp=tp), serial)


def cross_entropy_case(mesh, logits, targets, vocab, eps, weights):
    ls = leaf(P.split(logits, mesh, "tp", -1))
    loss = P.vocab_parallel_cross_entropy(ls, targets, mesh, label_smoothing=eps, vocab_size=vocab)
    (loss * weights).sum().backward()
    return dict(loss=loss.detach(), grad=P.all_gather(ls.grad, mesh, "tp", -1))


@given(tp=tps, b=st.integers(1, 3), s=st.integers(1, 4), vocab=st.integers(2, 30),
       eps=st.sampled_from([0.0, 0.1, 0.35]), seed=st.integers(0, 2**16))
def test_vocab_parallel_cross_entropy_equals_torch(pool, tp, b, s, vocab, eps, seed):
    vocab_padded = -(-vocab // 4) * 4 + 4  # at least one padded column
    logits = rand(seed, b, s, vocab_padded) * 3
    logits[..., vocab:] = 100.0  # padding would win every softmax if it were not masked
    targets = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))
    weights = rand(seed + 1, b, s)
    ref_logits = leaf(logits)
    ref = F.cross_entropy(ref_logits[..., :vocab].reshape(-1, vocab), targets.reshape(-1),
                          reduction="none", label_smoothing=eps).view(b, s)
    (ref * weights).sum().backward()
    want = dict(loss=ref.detach(), grad=ref_logits.grad)
    assert_all_equal([cross_entropy_case(P.Mesh.serial(), logits, targets, vocab, eps, weights)], want)
    assert_all_equal(pool.run(cross_entropy_case, logits, targets, vocab, eps, weights, tp=tp), want)


def mappings_case(mesh, x, g):
    """Each region mapping on x: [b, s, h] (every rank holds the same x and upstream grad g):
    its output and input gradient, gathered to full size."""
    out = {}
    seq = lambda t: P.all_gather(t.detach(), mesh, "tp", 1)
    last = lambda t: P.all_gather(t.detach(), mesh, "tp", -1)
    cases = {  # name: (mapping, input given to it, gather its output, slice of g it receives, gather its grad)
        "copy_to_tp": (P.copy_to_tp, x, None, g, None),
        "reduce_from_tp": (P.reduce_from_tp, x, None, g, None),
        "scatter_to_tp": (P.scatter_to_tp, x, last, P.split(g, mesh, "tp", -1), None),
        "gather_from_tp": (P.gather_from_tp, P.split(x, mesh, "tp", -1), None, g, last),
        "scatter_to_sp": (P.scatter_to_sp, x, seq, P.split(g, mesh, "tp", 1), None),
        "gather_from_sp": (P.gather_from_sp, P.split(x, mesh, "tp", 1), None, g, seq),
        "gather_from_sp(no tp grad)": (lambda t, m: P.gather_from_sp(t, m, tp_output_grad=False),
                                       P.split(x, mesh, "tp", 1), None, g, seq),
        "reduce_scatter_to_sp": (P.reduce_scatter_to_sp, x, seq, P.split(g, mesh, "tp", 1), None),
    }
    for name, (mapping, inp, gather_out, grad_in, gather_grad) in cases.items():
        leaf_in = leaf(inp)
        y = mapping(leaf_in, mesh)
        y.backward(grad_in)
        out[name] = ((gather_out or (lambda t: t.detach()))(y), (gather_grad or (lambda t: t))(leaf_in.grad))
    return out


@given(tp=tps, b=st.integers(1, 2), s_per=st.integers(1, 3), h_per=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_region_mappings_move_what_their_docstrings_say(pool, tp, b, s_per, h_per, seed):
    """Forward and backward of each mapping, against what the sum over tp ranks means: f (copy) is
    identity forward, sum backward; g (reduce) the reverse; split / gather are each other's backward;
    reduce-scatter and all-gather along s likewise. Every rank gave the same x and g, so a sum is t * x."""
    x, g = rand(seed, b, s_per * tp, h_per * tp), rand(seed + 1, b, s_per * tp, h_per * tp)
    want = {"copy_to_tp": (x, tp * g), "reduce_from_tp": (tp * x, g), "scatter_to_tp": (x, g),
            "gather_from_tp": (x, g), "scatter_to_sp": (x, g), "gather_from_sp": (x, tp * g),
            "gather_from_sp(no tp grad)": (x, g), "reduce_scatter_to_sp": (tp * x, g)}
    for rank, got in enumerate(pool.run(mappings_case, x, g, tp=tp)):
        for name, (y, grad) in want.items():
            where = f"rank {rank} {name}"
            torch.testing.assert_close(got[name][0], y, **TOL, msg=lambda m, w=where: f"{w} output: {m}")
            torch.testing.assert_close(got[name][1], grad, **TOL, msg=lambda m, w=where: f"{w} grad: {m}")


# ---------------------------------------------------------------- shard / unshard


def roundtrip_case(mesh, params, specs):
    return P.unshard(P.shard(params, specs, mesh), specs, mesh)


@given(tp=tps, shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3), st.sampled_from([None, 0, 1])),
                               min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_unshard_of_shard_is_identity(pool, tp, shapes, seed):
    params, specs = {}, {}
    for i, (a, c, spec) in enumerate(shapes):
        shape = [a * 4 if spec == 0 else a, c * 4 if spec == 1 else c]
        params[f"p{i}"], specs[f"p{i}"] = rand(seed + i, *shape), spec
    for got in pool.run(roundtrip_case, params, specs, tp=tp):
        assert got.keys() == params.keys()
        for k in params:
            assert torch.equal(got[k], params[k])


def shard_slice_case(mesh):
    w = torch.arange(24.0).view(4, 6)
    return P.shard({"w": w, "b": w[0]}, {"w": 1, "b": None}, mesh)


def test_shard_gives_each_rank_its_slice(pool):
    for rank, got in enumerate(pool.run(shard_slice_case, tp=2)):
        want = torch.arange(24.0).view(4, 6)[:, 3 * (rank % 2): 3 * (rank % 2) + 3]
        assert torch.equal(got["w"], want) and torch.equal(got["b"], torch.arange(6.0))


# ---------------------------------------------------------------- mesh


def mesh_case(mesh):
    import torch.distributed as dist

    return dict(rank=dist.get_rank(), tp=(mesh.tp, mesh.tp_rank), dp=(mesh.dp, mesh.dp_rank),
                pp=(mesh.pp, mesh.pp_rank),
                tp_peers=P.all_gather(torch.tensor([dist.get_rank()]), mesh, "tp", 0).tolist())


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)])
def test_mesh_rank_order_is_megatrons(pool, tp, pp):
    dp = 4 // (tp * pp)
    for got in pool.run(mesh_case, tp=tp, pp=pp):
        r = got["rank"]
        assert got["tp"] == (tp, r % tp) and got["dp"] == (dp, (r // tp) % dp) and got["pp"] == (pp, r // (tp * dp))
        assert got["tp_peers"] == list(range(r - r % tp, r - r % tp + tp))  # tp varies fastest


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match=r"world size 4 != tp\*pp\*dp = 3\*1\*1"):
        P.check_mesh_sizes(3, 1, 1, 4)
    with pytest.raises(ValueError, match="tp must be an integer >= 1, got tp=0"):
        P.check_mesh_sizes(0, 1, 1, 4)
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp\*pp = 3\*1 = 3"):
        P.Mesh.build(tp=3)  # no process group: world 1
    with pytest.raises(ValueError, match="pp must be an integer >= 1, got pp=0"):
        P.Mesh.build(pp=0)
    assert P.Mesh.serial() == P.Mesh.build()


# ---------------------------------------------------------------- dropout


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data(),
       seed=st.integers(0, 2**40), stream=st.one_of(st.integers(0, 2**31), st.text(max_size=8)))
def test_dropout_mask_of_a_shard_is_the_slice_of_the_serial_mask(shape, data, seed, stream):
    full = P.keep_mask(shape, 0.3, seed, stream)
    lo = [data.draw(st.integers(0, n - 1)) for n in shape]
    hi = [data.draw(st.integers(a + 1, n)) for a, n in zip(lo, shape)]
    box = P.keep_mask([b - a for a, b in zip(lo, hi)], 0.3, seed, stream, offset=lo, global_shape=shape)
    assert torch.equal(box, full[tuple(slice(a, b) for a, b in zip(lo, hi))])


def test_dropout_statistics_and_independence():
    x = torch.ones(200_000, dtype=torch.float64)
    y = P.dropout(x, 0.25, seed=7, stream="attn")
    kept = (y != 0).double().mean().item()
    assert abs(kept - 0.75) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.75, dtype=torch.float64))
    other = P.dropout(x, 0.25, seed=7, stream="mlp")
    assert ((y != 0) == (other != 0)).double().mean().item() < 0.7  # independent: ~0.625 agree
    assert torch.equal(P.dropout(x, 0.25, seed=7, stream="attn"), y)  # a pure function
    assert torch.equal(P.dropout(x, 0.25, seed=7, stream="attn", training=False), x)
    with pytest.raises(ValueError, match="got 1.0"):
        P.dropout(x, 1.0, seed=0, stream=0)


def test_dropout_mask_beyond_two_to_the_32_elements():
    # indices past 2**32 must not wrap onto the first ones
    far = P.keep_mask([4096], 0.5, 3, 0, offset=[2**32], global_shape=[2**32 + 4096])
    assert not torch.equal(far, P.keep_mask([4096], 0.5, 3, 0))


# ---------------------------------------------------------------- bad input


def bad_input_case(mesh):
    """Every case must raise ValueError on every rank before any collective."""
    cases = [
        lambda: P.shard({"w": torch.zeros(3, 4)}, {"w": 0}, mesh),
        lambda: P.shard({"w": torch.zeros(3, 4)}, {}, mesh),
        lambda: P.column_parallel_linear(torch.zeros(2, 4, 5), torch.zeros(2, 6), None, mesh),
        lambda: P.row_parallel_linear(torch.zeros(2, 4, 3), torch.zeros(5, 2), None, mesh),
        lambda: P.row_parallel_linear(torch.zeros(2, 3, 2), torch.zeros(5, 2), None, mesh, sequence_parallel=True),
        lambda: P.vocab_parallel_embedding(torch.tensor([[1, 8]]), torch.zeros(4, 3), mesh),
        lambda: P.vocab_parallel_embedding(torch.tensor([[-1, 2]]), torch.zeros(4, 3), mesh),
        lambda: P.vocab_parallel_cross_entropy(torch.zeros(1, 2, 4), torch.tensor([[0, 9]]), mesh, vocab_size=7),
        lambda: P.vocab_parallel_cross_entropy(torch.zeros(1, 2, 4), torch.tensor([[0, 1, 2]]), mesh),
    ]
    return value_errors_then_in_step(cases, mesh)


def test_bad_input_raises_on_every_rank_and_nothing_hangs(pool):
    results = pool.run(bad_input_case, tp=2)
    want = ["dim 0 of size 3 is not divisible by tp=2", "no sharding spec for parameter(s) ['w']",
            "input last dim 5 != weight in-features", "input last dim 3 != weight in-features",
            "cannot reduce-scatter dim 1 of size 3 over 2 ranks", "token id 8 out of range [0, 8)",
            "token id -1 out of range [0, 8)", "target id 9 out of range [0, 7)",
            "does not match targets shape (1, 3)", 2.0]
    for messages in results:
        for got, expected in zip(messages, want, strict=True):
            assert got == expected if isinstance(expected, float) else (got is not None and expected in got), got


# ---------------------------------------------------------------- the harness itself


def raise_on_rank_one(mesh):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank one")
    return P.all_reduce(torch.ones(1), mesh, "dp")  # the others wait for rank 1 forever


def die_on_rank_two(mesh):
    import os

    import torch.distributed as dist

    if dist.get_rank() == 2:
        os._exit(3)
    return P.all_reduce(torch.ones(1), mesh, "dp")


def test_a_failing_or_dying_worker_fails_the_test_and_never_hangs(pool):
    with pytest.raises(WorkerError, match="boom on rank one"):
        pool.run(raise_on_rank_one)
    with pytest.raises(WorkerError, match=r"died \(rank: exit code \{2: 3\}\)"):
        pool.run(die_on_rank_two)
    assert [r["tp"] for r in pool.run(mesh_case, tp=2)] == [(2, 0), (2, 1)] * 2  # the pool restarted


# ---------------------------------------------------------------- gradients across ranks


def clip_case(mesh, grads, specs, max_norm):
    params = P.shard({k: torch.zeros_like(g) for k, g in grads.items()}, specs, mesh)
    for name, g in P.shard(grads, specs, mesh).items():
        params[name].grad = g
    norm = P.clip_grad_norm(params, specs, mesh, max_norm)
    return dict(norm=norm, grads=P.unshard({k: p.grad for k, p in params.items()}, specs, mesh))


@given(tp=tps, shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3), st.sampled_from([None, 0, 1])),
                               min_size=1, max_size=4), max_norm=st.sampled_from([0.0, 0.5, 100.0]),
       seed=st.integers(0, 2**16))
def test_clip_grad_norm_is_the_norm_of_the_full_model(pool, tp, shapes, max_norm, seed):
    grads, specs = {}, {}
    for i, (a, c, spec) in enumerate(shapes):
        grads[f"p{i}"] = rand(seed + i, a * 4 if spec == 0 else a, c * 4 if spec == 1 else c)
        specs[f"p{i}"] = spec
    full = torch.cat([g.flatten() for g in grads.values()]).norm()
    serial = clip_case(P.Mesh.serial(), grads, specs, max_norm)
    torch.testing.assert_close(serial["norm"], full, **TOL)
    scale = min(1.0, max_norm / (full.item() + 1e-6)) if max_norm > 0 else 1.0
    for k, g in grads.items():
        torch.testing.assert_close(serial["grads"][k], g * scale, **TOL)
    for got in pool.run(clip_case, grads, specs, max_norm, tp=tp):
        torch.testing.assert_close(got["norm"], serial["norm"], **TOL)
        for k in grads:
            torch.testing.assert_close(got["grads"][k], serial["grads"][k], **TOL)


def dp_average_case(mesh):
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.full((3,), float(mesh.dp_rank))
    P.all_reduce_grads_dp({"p": p}, mesh)
    return p.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_data_parallel_grads_are_averaged(pool, tp):
    dp = 4 // tp
    for got in pool.run(dp_average_case, tp=tp):
        assert torch.equal(got, torch.full((3,), sum(range(dp)) / dp))


def test_nested_count_comms_each_keep_recording():
    """Leaving an inner count_comms removes that recorder only, even when the outer record is an equal
    (here: empty) list: removal is by identity, not by value."""
    with P.count_comms() as outer:
        with P.count_comms() as inner:
            pass
        P._record("all_reduce", "tp", 5, "forward", torch.float32)
    assert len(outer) == 1 and inner == [] and not P._RECORDERS
