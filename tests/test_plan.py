"""plan.py: the plan of a rank equals what a real training step on that rank holds and records.

1. The virtual mesh: `Mesh.of_rank` is Megatron's rank order (the inverse of `Mesh.global_rank`), and
   `Mesh.build` gives every rank those coordinates.
2. Plan against measurement: for a grid of eleven small layouts of world 4 on the session pool (tp, cp, dp,
   pp, ep, the four schedules, interleaving, microbatches, sequence parallel, ZeRO-1, bf16, recompute,
   tied and untied, MQA and GQA, LayerNorm GeLU and RMSNorm SwiGLU rope, SDPA, a GPT and MoE GPTs),
   every rank runs one real `train.train_step` (train.py's optimizer, buckets, schedule) under
   `parallel.count_comms()` and `runlog.SavedPeak`, and `plan.rank_plan` of the same rank must give:
   * the same parameter shapes, gradient buckets (names, dim, padded numel), gradient and optimizer bytes
     (`Optimizer.state_bytes()`, measured from storage), exactly;
   * the same collectives, as a multiset of (op, dim, elements, phase, dtype) records, exactly; but for
     ep's all-to-alls of token rows, whose sizes follow the routing: their number and phases exactly, their
     elements planned for uniform routing (the counts' all-to-all is exact);
   * the activation bytes at the schedule's peak (`runlog.SavedPeak`: every storage autograd keeps, once) to
     the byte, planned for the CPU references that run here (`rank_plan(triton=False)`; the message names
     the terms in which a GPU's Triton kernels would differ); under ep within 5%: the rows an ep rank's
     experts receive follow the routing, planned uniform. The default (GPU) figure is checked against the
     Triton kernels themselves, run under the interpreter in one process.
3. Properties of the plan alone (no processes): every rank of a stage is the kind `layout_plans` lists, the
   world's FLOPs are `gpt_flops` of the global batch, every pipeline send has its receive; and the terms a
   layer keeps are Korthikanti's formula for the paper's GPT.
4. Bad input: one ValueError naming the values.
"""

import collections
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nanomeg as N
import parallel as P
import plan
import runlog
import train

WORLD = 4
_MESHES: dict = {}


def mesh_of(tp, cp, pp, ep) -> P.Mesh:
    """This worker's mesh of the layout, built once (every rank builds the same layouts in the same order)."""
    if (tp, cp, pp, ep) not in _MESHES:
        _MESHES[tp, cp, pp, ep] = P.Mesh.build(tp=tp, cp=cp, pp=pp, ep=ep)
    return _MESHES[tp, cp, pp, ep]


# ---------------------------------------------------------------------------------------------------
# 1. The virtual mesh
# ---------------------------------------------------------------------------------------------------


@given(tp=st.integers(1, 4), cp=st.integers(1, 3), dp=st.integers(1, 4), pp=st.integers(1, 3), data=st.data())
def test_of_rank_is_megatrons_order_and_the_inverse_of_global_rank(tp, cp, dp, pp, data):
    ep = data.draw(st.sampled_from([e for e in range(1, dp + 1) if dp % e == 0]))
    world = tp * cp * dp * pp
    seen = set()
    for rank in range(world):
        m = P.Mesh.of_rank(rank, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep)
        assert m.global_rank() == rank and m.groups == {}
        assert rank == ((m.pp_rank * dp + m.dp_rank) * cp + m.cp_rank) * tp + m.tp_rank
        assert m.ep_rank == m.dp_rank % ep
        seen.add((m.tp_rank, m.cp_rank, m.dp_rank, m.pp_rank))
    assert len(seen) == world


# ---------------------------------------------------------------------------------------------------
# 2. Plan against measurement
# ---------------------------------------------------------------------------------------------------

MODEL = ["--layers", "4", "--hidden", "32", "--heads", "4", "--seq", "16", "--max-seq", "16", "--dropout", "0.1",
         "--sample-tokens", "0", "--bucket-mb", "0.004"]

# (name, flags, tp, cp, pp, ep): world 4 = tp·cp·pp·dp
LAYOUTS = [
    ("tp2 pp2 sp, 1f1b m4, tied", ["--sequence-parallel", "--microbatches", "4", "--batch", "8"], 2, 1, 2, 1),
    ("pp2 dp2 interleaved v2 m4, ZeRO-1, untied", ["--virtual-stages", "2", "--microbatches", "4", "--batch", "8",
                                                    "--zero", "1", "--untied"], 1, 1, 2, 1),
    ("tp2 cp2, full recompute, kv heads 1", ["--recompute", "full", "--batch", "2", "--kv-heads", "1"], 2, 2, 1, 1),
    ("dp4 bf16, selective recompute, afab m2", ["--bf16", "--recompute", "selective", "--batch", "4",
                                                 "--microbatches", "2", "--schedule", "afab"], 1, 1, 1, 1),
    ("MoE tp2 dp2 ep2, top-2, ZeRO-1", ["--experts", "4", "--topk", "2", "--ep", "2", "--batch", "2",
                                        "--zero", "1"], 2, 1, 1, 2),
    ("MoE every 2nd layer, tp2 sp dp2", ["--experts", "4", "--moe-every", "2", "--batch", "2",
                                         "--sequence-parallel"], 2, 1, 1, 1),
    ("tp2 pp2 zero-bubble m2, full recompute", ["--microbatches", "2", "--batch", "4", "--schedule", "zb",
                                                "--recompute", "full"], 2, 1, 2, 1),
    ("pp4 1f1b m8, ZeRO-1", ["--microbatches", "8", "--batch", "8", "--zero", "1"], 1, 1, 4, 1),
    ("cp2 pp2 interleaved v2 m2, bf16", ["--virtual-stages", "2", "--microbatches", "2", "--batch", "2", "--bf16"],
     1, 2, 2, 1),
    ("Llama-like: RMSNorm, SwiGLU, rope, GQA, bf16, tp2 sp pp2", ["--norm", "rmsnorm", "--activation", "swiglu",
                                                                 "--position", "rope", "--kv-heads", "2", "--bf16",
                                                                 "--sequence-parallel", "--batch", "2"], 2, 1, 2, 1),
    ("SDPA, rope, no dropout, tp2 dp2, 1f1b m2", ["--attention", "sdpa", "--position", "rope", "--dropout", "0",
                                                  "--microbatches", "2", "--batch", "4"], 2, 1, 1, 1),
]


def record(c) -> tuple:
    return c["op"], c["dim"], c["elements"], c["phase"], str(c["dtype"]).removeprefix("torch.")


def real_step(_pool_mesh, argv, layout):
    """One train.train_step on this rank, as train.py runs it: what it holds, records and keeps."""
    mesh = mesh_of(*layout)
    args, cfg = config(argv)
    task = train.TASKS[args.model]
    specs = task.specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in train.rank_params(task, cfg, mesh, specs, args).items()}
    g = torch.Generator().manual_seed(mesh.dp_rank)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    opt = train.make_optimizer(params, args, mesh, specs, cfg)
    with P.count_comms() as comms, runlog.SavedPeak(params.values()) as saved:
        train.train_step(params, opt, dict(ids=ids, targets=ids.roll(-1, 1)), task, cfg, mesh, specs, args, step=1)
    buckets = opt.buckets.buckets
    return dict(rank=torch.distributed.get_rank(), shapes={k: tuple(p.shape) for k, p in params.items()},
                buckets=[(b["names"], b["dim"], b["tied"], b["buf"].numel()) for b in buckets],
                grads=sum(b["buf"].numel() * b["buf"].element_size() for b in buckets),
                optimizer=opt.state_bytes(), comms=[record(c) for c in comms], activations=saved.peak)


def config(argv):
    """train.py's args and config for argv; "--untied" (not a train.py flag) unties the embedding."""
    args = train.parse_args([a for a in argv if a != "--untied"])
    cfg, _ = train.check_args(args, world=WORLD)
    return args, replace(cfg, tie_embeddings="--untied" not in argv)


def planned(argv, tp, cp, pp, ep, rank, triton=False):
    """rank_plan of this rank for train.py's flags, with the CPU references' activations (what runs here),
    or the Triton kernels' (a GPU's)."""
    args, cfg = config(argv)
    dp = WORLD // (tp * cp * pp)
    return cfg, args, plan.rank_plan(cfg, rank, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, v=args.virtual_stages,
                                     micro_batch=args.batch // args.microbatches, seq=args.seq,
                                     microbatches=args.microbatches, schedule=args.schedule, zero=args.zero == 1,
                                     bf16=args.bf16, bucket_mb=args.bucket_mb, triton=triton)


@pytest.mark.parametrize("name, flags, tp, cp, pp, ep", LAYOUTS, ids=[case[0] for case in LAYOUTS])
def test_the_plan_is_what_a_real_step_holds_and_sends(pool, name, flags, tp, cp, pp, ep):
    argv = [*MODEL, "--tp", str(tp), "--pp", str(pp), "--cp", str(cp), *flags]
    for real in pool.run(real_step, argv, (tp, cp, pp, ep)):
        rank = real["rank"]
        cfg, args, p = planned(argv, tp, cp, pp, ep, rank)
        what = f"{name}, rank {rank} ({p['mesh']})"
        assert {r["name"]: r["local_shape"] for r in p["shards"]} == real["shapes"], what
        assert [(b["names"], b["dim"], b["tied"], b["numel"]) for b in p["buckets"]] == real["buckets"], what
        assert (p["bytes"]["grads"], p["bytes"]["optimizer"]) == (real["grads"], real["optimizer"]), what
        routed = lambda c: c[0] == "all_to_all" and c[4] != "int64"  # ep's token rows: sized by the routing
        want = collections.Counter(record(c) for c in p["comms"] if not routed(record(c)))
        got = collections.Counter(c for c in real["comms"] if not routed(c))
        assert got == want, f"{what}: real - planned {got - want}, planned - real {want - got}"
        assert collections.Counter(c[3] for c in real["comms"] if routed(c)) == \
            collections.Counter(c[3] for c in map(record, p["comms"]) if routed(c)), what
        acts, gpu = p["activations"], planned(argv, tp, cp, pp, ep, rank, triton=True)[2]["activations"]
        cpu_only = [(term, cpu - g) for c in acts["terms"] for (term, cpu), (_, g) in
                    zip(acts["terms"][c], gpu["terms"][c]) if cpu != g]  # the CPU references' own storage
        within = 0.05 if ep > 1 else 0  # the rows an ep rank's experts receive follow the routing
        assert abs(real["activations"] - acts["total"]) <= within * real["activations"], \
            (f"{what}: measured {real['activations']:,} B, planned {acts['total']:,} B = microbatches held at the "
             f"peak {acts['peak_chunks']} x per chunk {acts['terms']}; of which the CPU references' terms, "
             f"per microbatch, not a GPU's: {cpu_only}")


# ---------------------------------------------------------------------------------------------------
# 3. Properties of the plan alone (no processes)
# ---------------------------------------------------------------------------------------------------

SMALL = N.GPTConfig(vocab_size=300, max_seq=32, layers=4, hidden=32, heads=4, vocab_multiple=64)


@st.composite
def layouts(draw):
    """A layout of at most 16 ranks for SMALL (or its MoE twin): sizes, schedule, microbatches, flags."""
    tp, pp, dp = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2]))
    moe = draw(st.booleans())
    cp = 1 if moe else draw(st.sampled_from([1, 2]))
    ep = draw(st.sampled_from([e for e in (1, 2) if dp % e == 0])) if moe else 1
    v = draw(st.sampled_from([1, 2])) if pp > 1 and pp * 2 <= SMALL.layers else 1
    schedule = "interleaved" if v > 1 else draw(st.sampled_from(["afab", "1f1b", "zb"]))
    m = draw(st.sampled_from([pp, 2 * pp])) if v > 1 else draw(st.integers(1, 4))
    cfg = replace(SMALL, experts=4 * moe, moe_topk=1 + moe, sequence_parallel=draw(st.booleans()) and tp > 1,
                  tie_embeddings=draw(st.booleans()), recompute=draw(st.sampled_from(["none", "selective", "full"])))
    return cfg, dict(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, v=v, schedule=schedule, microbatches=m, micro_batch=2,
                     seq=16, zero=draw(st.booleans()), bf16=draw(st.booleans()))


def multiset(comms) -> collections.Counter:
    return collections.Counter(record(c) for c in comms)


@given(layouts())
def test_every_rank_is_one_of_the_kinds_layout_plans_lists_and_the_world_computes_gpt_flops(drawn):
    """layout_plans' claim: the plan of any rank is its pipeline stage's kind (the bytes, the collectives, the
    FLOPs and the local shapes), so 3,072 ranks are a few pictures; and the world's FLOPs per step add up to
    `gpt_flops` of the global batch; the pipeline's sends and receives pair up, stage by stage."""
    cfg, layout = drawn
    kinds = plan.layout_plans(cfg, **layout)
    world = layout["tp"] * layout["cp"] * layout["dp"] * layout["pp"]
    assert len(kinds) == layout["pp"]
    for rank in range(world):
        p = plan.rank_plan(cfg, rank, **layout)
        kind = kinds[p["stage"]]
        assert p["bytes"] == kind["bytes"] and p["flops"] == kind["flops"], rank
        assert multiset(p["comms"]) == multiset(kind["comms"]), rank
        assert [r["local_shape"] for r in p["shards"]] == [r["local_shape"] for r in kind["shards"]], rank
    for k in kinds:  # work redone: recompute (selective: the core path's checkpoint), zero-bubble's second walk
        redo = cfg.recompute == "full" or (cfg.recompute == "selective" and layout["cp"] == 1) or \
            (layout["schedule"] == "zb" and k["stage"] > 0)
        flops = k["flops"]
        assert (flops["recompute"] > 0) == redo
    model = sum(k["flops"]["model"] * k["ranks"] for k in kinds)
    batch = layout["micro_batch"] * layout["microbatches"] * layout["dp"]
    assert model == pytest.approx(N.gpt_flops(cfg, batch, layout["seq"]), rel=1e-9)
    sent = lambda k, op, phase: sum(c["elements"] for c in k["comms"] if (c["dim"], c["op"], c["phase"]) ==
                                    ("pp", op, phase))
    for phase in ("forward", "backward"):
        assert sum(sent(k, "send", phase) for k in kinds) == sum(sent(k, "recv", phase) for k in kinds)


# ---------------------------------------------------------------------------------------------------
# 4. Bad input
# ---------------------------------------------------------------------------------------------------

BAD = {
    "a rank outside the world": (dict(rank=8, tp=2, pp=2), ["rank 8", "2*1*1*2 = 4"]),
    "a negative rank": (dict(rank=-1), ["rank -1"]),
    "heads that tp does not divide": (dict(tp=3), ["tp=3", "heads=4"]),
    "layers that pp x v do not divide": (dict(pp=3), ["layers=4", "pp*virtual stages = 3*1"]),
    "ep without experts": (dict(dp=2, ep=2), ["ep=2", "experts=0"]),
    "ep that does not divide dp": (dict(dp=2, ep=3), ["ep=3", "dp=2"]),
    "interleaving whose microbatches do not fill the pipeline": (
        dict(pp=2, v=2, schedule="interleaved", microbatches=3), ["microbatches=3", "pp=2"]),
    "a sequence cp cannot cut": (dict(cp=3), ["seq=16", "cp=3"]),
    "no microbatch": (dict(microbatches=0), ["microbatches=0"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_layouts_are_one_value_error_naming_the_values(case):
    kw, words = BAD[case]
    kw = dict(dict(rank=0, micro_batch=2, seq=16, microbatches=2), **kw)
    with pytest.raises(ValueError) as e:
        plan.rank_plan(SMALL, kw.pop("rank"), **kw)
    assert all(w in str(e.value) for w in words), (case, str(e.value))


@given(tp=st.sampled_from([1, 2, 4]), sp=st.booleans(), recompute=st.sampled_from(["none", "selective", "full"]),
       elem=st.sampled_from([2, 4]), b=st.integers(1, 3), s=st.sampled_from([8, 16, 32]))
def test_layer_terms_are_korthikantis_formula_for_the_papers_gpt(tp, sp, recompute, elem, b, s):
    """For the GPT of Korthikanti et al. (LayerNorm, GeLU MLP of 4h, MHA, dropout on, the core attention)
    the generalised terms a layer keeps on a GPU are `formula_bytes` plus the LayerNorm statistics (mean and
    rstd, fp32), which the paper leaves out: the plan's terms are the paper's, written for this code."""
    cfg = replace(SMALL, hidden_dropout=0.1, attention_dropout=0.1, recompute=recompute, sequence_parallel=sp)
    mesh = P.Mesh.of_rank(0, tp=tp)
    got = sum(v for _, v in plan.layer_terms(cfg, mesh, 0, b, s, elem, triton=True))
    stats = 2 * 2 * 4 * b * s / (tp if sp and tp > 1 else 1) * (recompute != "full")
    assert got == pytest.approx(plan.formula_bytes(s, b, cfg.hidden, cfg.heads, tp, sp and tp > 1, recompute, elem)
                                + stats, rel=1e-12)


def one_process_step(argv) -> tuple:
    """One train.train_step in this process (a mesh of one): (the activations SavedPeak measured, its args and
    config)."""
    args, cfg = config(argv)
    task, mesh = train.TASKS[args.model], P.Mesh.serial()
    specs = task.specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in train.rank_params(task, cfg, mesh, specs, args).items()}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    opt = train.make_optimizer(params, args, mesh, specs, cfg)
    with runlog.SavedPeak(params.values()) as saved:
        train.train_step(params, opt, dict(ids=ids, targets=ids.roll(-1, 1)), task, cfg, mesh, specs, args, step=1)
    return saved.peak, args, cfg


@pytest.mark.parametrize("flags", [
    ["--microbatches", "2", "--batch", "4"],
    ["--norm", "rmsnorm", "--activation", "swiglu", "--position", "rope", "--kv-heads", "2", "--bf16", "--recompute",
     "selective", "--batch", "1"],
], ids=["LayerNorm GeLU fp32, 1f1b m2", "RMSNorm SwiGLU rope GQA bf16, selective, b 1"])
def test_the_triton_figure_is_what_the_triton_kernels_keep(monkeypatch, flags):
    """rank_plan's default figure is a GPU's: the Triton kernels' storage. Here they run under the Triton
    interpreter (NANOMEG_TRITON=1, on a CPU, one layer: seconds), and keep to the byte what the plan says."""
    monkeypatch.setenv("NANOMEG_TRITON", "1")
    argv = [*MODEL, "--layers", "1", *flags]
    measured, args, cfg = one_process_step(argv)
    p = plan.rank_plan(cfg, 0, micro_batch=args.batch // args.microbatches, seq=args.seq,
                       microbatches=args.microbatches, bf16=args.bf16, bucket_mb=args.bucket_mb)
    assert measured == p["activations"]["total"], (measured, p["activations"]["terms"])
