"""benchmarks/moe.py — a mixture-of-experts layer's all-to-all traffic against its formula, and the step time of
dense against MoE GPTs at equal active parameters.

    python benchmarks/moe.py [--device cpu|cuda] [--quick]

1. All-to-all elements per MoE layer (measured with parallel.count_comms on real gloo ranks, ep = 2 and 4,
   k = 1 and 2, dropless): each rank sends every (token, expert) choice whose expert lives on another ep
   rank, h elements a row, to dispatch; the combine sends back the rows the other ranks' choices brought to
   its experts; the backward moves the gradients the same two ways, reversed. With uniform routing the expected count per direction (forward or backward) is

       2 · k · b · s · h · (ep − 1) / ep

   printed beside the measured one and the exact count from the routing the ranks drew (which the measured
   one must equal). The counts exchange first (E/ep integers to each other rank), listed apart.
2. Step time (forward + backward, the median of timed steps) of a dense GPT and MoE GPTs with the same
   active parameters per token: dense ffn 4h; Switch-style top-1 over E experts of 4h; top-2 over E
   experts of 2h. Total parameters grow with E, active ones (and so the FLOPs) do not: the time should
   stay near the dense one, plus the routing and the per-expert loop.
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import nanomeg as N  # noqa: E402
import parallel as P  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# 1. All-to-all traffic per layer, on gloo ranks
# ----------------------------------------------------------------------------------------------------


def traffic_worker(rank, world, init, cases, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    for ep, k, b, s, h, E in cases:
        mesh = P.Mesh.build(tp=1, ep=ep)  # dp = world; ep of its ranks trade tokens
        cfg = N.GPTConfig(layers=1, hidden=h, heads=4, vocab_size=64, vocab_multiple=8, max_seq=s, experts=E,
                          moe_topk=k, moe_z_loss=1e-3)
        full = N.init_gpt(cfg, seed=1)
        params = {n: p.requires_grad_() for n, p in P.shard(full, N.gpt_specs(cfg), mesh).items()}
        draw = lambda dp_rank: torch.randn(b, s, h, generator=torch.Generator().manual_seed(100 + dp_rank))
        x = draw(mesh.dp_rank).requires_grad_()
        moe = N.MoE()
        with P.count_comms() as comms:
            y = N.moe_mlp(params, "layers.0.moe", x, cfg, mesh, layer=0, moe=moe, training=True)
            y.sum().backward()
        # exact, from the routing: the dispatch sends this rank's choices of experts on the other ep ranks;
        # the combine sends back the rows the other ep ranks' choices brought to its own experts
        owner = lambda x: (x.reshape(-1, h) @ full["layers.0.moe.router.weight"].T).softmax(-1).topk(k, -1).indices \
            // (E // ep)  # the ep rank of each choice's expert
        group = [mesh.dp_rank - mesh.ep_rank + e for e in range(ep)]  # the dp ranks of this rank's ep group
        with torch.no_grad():
            out_rows = int((owner(x) != mesh.ep_rank).sum())
            in_rows = sum(int((owner(draw(d)) == mesh.ep_rank).sum()) for d in group if d != mesh.dp_rank)
        exact = (out_rows + in_rows) * h
        per = {ph: sum(c["elements"] for c in comms if c["op"] == "all_to_all" and c["phase"] == ph
                       and c["dtype"].is_floating_point) for ph in ("forward", "backward")}
        counts = sum(c["elements"] for c in comms if c["op"] == "all_to_all" and not c["dtype"].is_floating_point)
        rows.append(dict(ep=ep, k=k, b=b, s=s, h=h, E=E, rank=rank, fwd=per["forward"], bwd=per["backward"],
                         exact=exact, counts=counts, formula=2 * k * b * s * h * (ep - 1) / ep))
    out.put(rows)
    dist.destroy_process_group()


def traffic(quick: bool) -> None:
    world = 4
    b, s, h = (2, 64, 64) if quick else (4, 256, 128)
    cases = [(ep, k, b, s, h, 8) for ep in (2, 4) for k in (1, 2)]
    init = os.path.join(tempfile.mkdtemp(prefix="nanomeg-moe-"), "store")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=traffic_worker, args=(r, world, init, cases, out)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [row for _ in procs for row in out.get(timeout=600)]
    for p in procs:
        p.join()
    print(f"1. all-to-all elements per MoE layer per rank ({world} gloo ranks, dp = 4, E = 8, dropless, "
          f"b = {b}, s = {s}, h = {h})")
    print(f"{'ep':>3} {'k':>2} {'rank':>4} {'forward':>10} {'backward':>10} {'exact':>10} {'formula':>10} "
          f"{'fwd/formula':>11}  counts")
    for r in sorted(rows, key=lambda r: (r["ep"], r["k"], r["rank"])):
        assert r["fwd"] == r["exact"] == r["bwd"], r  # measured = the routing's own count, both directions
        print(f"{r['ep']:>3} {r['k']:>2} {r['rank']:>4} {r['fwd']:>10,} {r['bwd']:>10,} {r['exact']:>10,} "
              f"{r['formula']:>10,.0f} {r['fwd'] / r['formula']:>11.3f}  {r['counts']}")
    print("forward = backward = exact on every rank; fwd/formula is the routing's imbalance (1.000: uniform). "
          "counts: the integers of the count exchange.\n")


# ----------------------------------------------------------------------------------------------------
# 2. Step time: dense against MoE at equal active parameters
# ----------------------------------------------------------------------------------------------------


def step_time(cfg, device, batch: int, seq: int, warmup: int, iters: int) -> float:
    params = {n: p.to(device).requires_grad_() for n, p in N.init_gpt(cfg, seed=0).items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def step():
        with ctx:
            N.gpt_loss(params, ids[:, :-1], ids[:, 1:], cfg, P.Mesh.serial()).backward()
        for p in params.values():
            p.grad = None

    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def timing(device, quick: bool) -> None:
    if device.type == "cuda":
        h, layers, heads, seq, batch, E = (1024, 8, 16, 1024, 8, 8)
    else:
        h, layers, heads, seq, batch, E = (128, 2, 4, 128, 4, 8) if quick else (256, 4, 4, 256, 8, 8)
    base = dict(layers=layers, hidden=h, heads=heads, vocab_size=256, max_seq=seq, attention="sdpa")
    models = [("dense, ffn 4h", N.GPTConfig(ffn=4 * h, **base)),
              (f"top-1 of {E}, ffn 4h", N.GPTConfig(ffn=4 * h, experts=E, moe_topk=1, **base)),
              (f"top-2 of {E}, ffn 2h", N.GPTConfig(ffn=2 * h, experts=E, moe_topk=2, **base))]
    print(f"2. step time, forward + backward, one {device.type} process "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}"
          f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}), {layers} layers, h = {h}, "
          f"batch {batch} x seq {seq - 1}")
    print(f"{'model':<22} {'params':>10} {'active':>10} {'GFLOP/step':>11} {'ms/step':>9} {'vs dense':>9}")
    dense_ms = None
    for name, cfg in models:
        ms = 1e3 * step_time(cfg, device, batch, seq, warmup=2 if quick else 3, iters=3 if quick else 10)
        dense_ms = dense_ms or ms
        per_expert = sum(math.prod(shape) for n, (shape, _) in N.moe_shapes("m", cfg).items()
                         if "router" not in n) // E if cfg.experts else 0
        active = N.num_params(cfg) - layers * (cfg.experts - cfg.moe_topk) * per_expert  # k experts a token
        print(f"{name:<22} {N.num_params(cfg) / 1e6:>9.2f}M {active / 1e6:>9.2f}M "
              f"{N.gpt_flops(cfg, batch, seq - 1) / 1e9:>11.1f} {ms:>9.1f} {ms / dense_ms:>8.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    args = ap.parse_args()
    traffic(args.quick)
    timing(torch.device(args.device), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
