"""benchmarks/context_parallel.py — activation memory per rank under context parallelism, measured.

    python benchmarks/context_parallel.py [--quick] [--budget-mib 64]

A 2-layer GPT (hidden 128, 4 heads, batch 1) runs one training forward on 4 gloo ranks at cp = 1, 2 and 4
(dp fills the rest) for a growing sequence. Every tensor autograd saves for the backward passes through
torch.autograd.graph.saved_tensors_hooks; each storage is counted once and the parameters are left out:
that is the activation memory one rank holds at the end of its forward. cp = 1 runs SDPA (a flash-style
kernel: no s x s probabilities kept), cp > 1 ring attention (q, k, v, out and the log-sum-exp of its own
tokens only), so every term is linear in the tokens a rank holds, s / cp. Printed beside each measured
figure: the cp = 1 figure / cp, the formula for perfect splitting.

Then, from the measured bytes per token of a rank, the longest sequence whose activations fit a per-rank
budget (--budget-mib) at each cp: it grows cp-fold.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import nanomeg as N  # noqa: E402
import parallel as P  # noqa: E402


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params.values()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def worker(rank, world, init, seqs, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    for cp in (1, 2, 4):
        mesh = P.Mesh.build(tp=1, cp=cp)
        for s in seqs:
            cfg = N.GPTConfig(layers=2, hidden=128, heads=4, vocab_size=256, max_seq=s, position="rope",
                              attention="sdpa")
            params = {k: v.requires_grad_() for k, v in N.init_gpt(cfg, seed=0).items()}
            g = torch.Generator().manual_seed(mesh.dp_rank)
            ids = torch.randint(0, 256, (1, s), generator=g)
            nbytes = saved_bytes(lambda: N.gpt_loss(params, ids, ids, cfg, mesh), params)
            rows.append(dict(cp=cp, s=s, rank=rank, bytes=nbytes))
    out.put(rows)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter sequences, for a smoke run")
    ap.add_argument("--budget-mib", type=float, default=64.0, help="activation memory per rank, MiB")
    args = ap.parse_args()
    seqs = [256, 512] if args.quick else [512, 1024, 2048, 4096]
    world = 4
    init = os.path.join(tempfile.mkdtemp(prefix="nanomeg-cp-"), "store")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, init, seqs, out)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [row for _ in procs for row in out.get(timeout=1200)]
    for p in procs:
        p.join()
    per = {}  # (cp, s) -> the largest rank's bytes
    for r in rows:
        per[r["cp"], r["s"]] = max(per.get((r["cp"], r["s"]), 0), r["bytes"])
    print("activation bytes saved for backward, per rank (the largest of 4), GPT 2 layers, hidden 128, 4 heads, "
          "batch 1, fp32:")
    print(f"{'seq':>6} | " + " | ".join(f"{'cp=' + str(cp):>13} {'cp1/cp':>13}" for cp in (1, 2, 4)))
    for s in seqs:
        base = per[1, s]
        print(f"{s:>6} | " + " | ".join(f"{per[cp, s]:>13,} {base // cp:>13,}" for cp in (1, 2, 4)))
    print("ratio measured / (cp=1 figure / cp) at the longest sequence: "
          + ", ".join(f"cp={cp}: {per[cp, seqs[-1]] / (per[1, seqs[-1]] / cp):.3f}" for cp in (1, 2, 4)))
    budget = args.budget_mib * 2**20
    print(f"\nlongest sequence whose activations fit {args.budget_mib:g} MiB per rank (bytes per token from the "
          f"seq={seqs[-1]} row):")
    for cp in (1, 2, 4):
        per_token = per[cp, seqs[-1]] / seqs[-1]
        longest = int(budget / per_token) // (2 * cp) * (2 * cp)
        print(f"  cp={cp}: {per_token:,.0f} B per token of the sequence -> {longest:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
