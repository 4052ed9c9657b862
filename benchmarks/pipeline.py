"""Pipeline schedules: the simulated bubble beside each schedule's formula, and the activations held.

    python benchmarks/pipeline.py [--pp 2 4 8] [--microbatches 4 8 16 32] [--virtual 2 4]

For every (p, m, v) the per-rank action lists of parallel.py section 10 are replayed by
`parallel.simulate` with unit costs (forward 1, backward 2; zero-bubble's I and W 1 each) and free
communication, and the measured bubble (idle / busy time of the busiest-idle rank) is printed beside:

    AFAB (GPipe), 1F1B          (p - 1) / m
    interleaved 1F1B, v chunks  (p - 1) / (v·m)        (m a multiple of p)
    zero-bubble ZB-H1           2 (p - 1) / (3 m)      idle (p - 1)(F + B - W) against m (F + B)

and the peak number of microbatch chunks whose activations rank 0 holds at once (AFAB m, 1F1B and
ZB-H1 p, interleaved (p - 1)·2 + (v - 1)·p + 1), in units of one microbatch's activations of one
chunk. This part is a model of the schedules, not a timing.

    python benchmarks/pipeline.py --measure

then runs the real executor (`parallel.run_schedule` through `nanomeg.pipeline_step`) on 4 gloo
processes and measures, per pipeline rank, the peak bytes of activations saved for backward (a
saved-tensors hook, `runlog.SavedPeak`, counts every storage autograd keeps that is not a parameter's,
once, until it is freed),
printed in units of one microbatch's activations on that stage beside what the schedule promises
(AFAB m; 1F1B and ZB-H1 p - rank; interleaved from the simulator); and ZeRO-1's optimizer state
per rank at dp = 1, 2, 4, measured from storage (`ZeroAdamW.state_bytes()`: every tensor it holds, each
storage once) beside 12 bytes x parameters / dp (fp32 main copy + two moments).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parallel as P  # noqa: E402
from runlog import SavedPeak  # noqa: E402


def rows(pp, microbatches, virtual):
    for p in pp:
        for m in microbatches:
            cases = [("afab", P.afab_schedule(p, m), 1, (p - 1) / m),
                     ("1f1b", P.one_f_one_b_schedule(p, m), 1, (p - 1) / m),
                     ("zb-h1", P.zero_bubble_schedule(p, m), 1, 2 * (p - 1) / (3 * m))]
            cases += [(f"interleaved v={v}", P.interleaved_schedule(p, m, v), v, (p - 1) / (v * m))
                      for v in virtual if m % p == 0]
            for name, schedules, v, formula in cases:
                sim = P.simulate(schedules, v)
                yield p, m, name, sim["bubble"], formula, sim["peak_in_flight"][0]


def _measure_rank(rank, world, init_file, results):
    import torch
    import torch.distributed as dist

    import nanomeg as N

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = N.GPTConfig(vocab_size=256, layers=8, hidden=64, heads=4, max_seq=64)
    full = N.init_gpt(cfg, 0)
    g = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, 256, (8, 64), generator=g), torch.randint(0, 256, (8, 64), generator=g)
    mesh = P.Mesh.build(tp=1, pp=4)
    out = {}
    for name, v, m in (("afab", 1, 8), ("1f1b", 1, 8), ("zb", 1, 8), ("interleaved", 2, 8), ("1f1b", 1, 1)):
        params = {k: t.clone().requires_grad_() for k, t in N.stage_params(full, cfg, mesh, v).items()}
        with SavedPeak(params.values()) as counter:
            N.pipeline_step("gpt", params, dict(ids=ids, targets=targets), cfg, mesh, schedule=name, v=v,
                            microbatches=m)
        out[name, v, m] = counter.peak
    dist.destroy_process_group()
    results.put((rank, out))


def _zero_rank(rank, world, init_file, results):
    import torch
    import torch.distributed as dist

    import nanomeg as N

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = N.GPTConfig(vocab_size=256, layers=8, hidden=64, heads=4, max_seq=64)
    full, specs = N.init_gpt(cfg, 0), N.gpt_specs(cfg)
    out = {}
    for dp in (1, 2, 4):
        group_ranks = list(range(dp))
        if rank < dp:  # a dp-rank run on the first dp processes; the others wait at the barrier
            mesh = P.Mesh(dp=dp, dp_rank=rank, groups={"dp": dist.new_group(group_ranks)} if dp > 1 else {})
        else:
            dist.new_group(group_ranks) if dp > 1 else None
            mesh = None
        if mesh is not None:
            params = {k: t.clone().requires_grad_() for k, t in full.items()}
            buckets = P.GradBuckets(params, mesh, zero=True)
            opt = P.ZeroAdamW(params, buckets, specs, mesh, lr=1e-3)
            out[dp] = (opt.state_bytes(), sum(t.numel() for t in full.values()))
        dist.barrier()
    dist.destroy_process_group()
    results.put((rank, out))


def spawn(fn, world=4):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(prefix="nanomeg-bench-"), "store")
    procs = [ctx.Process(target=fn, args=(r, world, init_file, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get() for _ in procs)
    for p in procs:
        p.join()
    return got


def measure():
    per_rank = spawn(_measure_rank)
    p, m = 4, 8
    inter = P.simulate(P.interleaved_schedule(p, m, 2), 2)["peak_in_flight"]
    print("activations saved for backward, peak per pipeline rank (GPT 8 layers, hidden 64, batch 8 x 64, "
          "pp 4, m 8; unit: one microbatch on the rank's stage, measured with m = 1):")
    print(f"{'schedule':<14} " + " ".join(f"{'rank ' + str(r):>16}" for r in range(p)) + "   promise")
    for name, v in (("afab", 1), ("1f1b", 1), ("zb", 1), ("interleaved", 2)):
        cells = []
        for r in range(p):
            unit = per_rank[r]["1f1b", 1, 1] / m  # one microbatch of b/m rows: the m = 1 step's activations / m
            cells.append(f"{per_rank[r][name, v, m] / 2**20:6.2f} MiB {per_rank[r][name, v, m] / unit:4.1f}")
        promise = {"afab": "m = 8 on every rank", "1f1b": "p - rank = 4 3 2 1", "zb": "p - rank = 4 3 2 1",
                   "interleaved": f"chunks in flight {' '.join(map(str, inter))}, each half a stage"}[name]
        print(f"{name:<14} " + " ".join(f"{c:>16}" for c in cells) + f"   {promise}")
    zero = spawn(_zero_rank)[0]
    print("\nZeRO-1 optimizer state per rank, measured from storage (fp32 main copy + two moments of its slice):")
    for dp, (nbytes, n) in zero.items():
        print(f"  dp {dp}: {nbytes:>10,} B measured, 12 x {n:,} / {dp} = {12 * n / dp:>12,.0f} B formula")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--virtual", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--measure", action="store_true", help="run the executor on 4 gloo processes and measure")
    args = ap.parse_args(argv)
    if args.measure:
        measure()
        return
    print(f"{'p':>3} {'m':>4}  {'schedule':<17} {'bubble':>8} {'formula':>8}  {'rank 0 holds':>12}")
    for p, m, name, bubble, formula, held in rows(args.pp, args.microbatches, args.virtual):
        print(f"{p:>3} {m:>4}  {name:<17} {bubble:>8.4f} {formula:>8.4f}  {held:>12}")


if __name__ == "__main__":
    main()
