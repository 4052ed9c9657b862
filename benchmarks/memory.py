"""Activation memory per transformer layer, measured, beside Korthikanti et al. 2022's formula.

    python benchmarks/memory.py [--seq 256 --batch 4 --hidden 256 --heads 4 --dropout 0.1 --tp 1 2 4]
                                [--detail] [--triton]

What is measured: the bytes one GPT transformer layer (nanomeg.run_layers over layer 0 alone, training,
causal mask, hidden and attention dropout on) saves for backward on one tp rank. Every tensor autograd
saves passes through torch.autograd.graph.saved_tensors_hooks' pack hook; each storage is counted once
(by untyped_storage().data_ptr(), its whole untyped_storage().nbytes()), and parameters are left out:
the parameter dict's tensors and anything computed from parameters alone (a bf16 autocast copy of a
weight, w.t()). The layer input is an activation, as in the formula (the previous layer's output).
For recompute none / selective / full, with and without sequence parallel, at tp 1, 2 and 4 (the ranks
run for real: t gloo processes, each measures its own layer; rank 0's figure is printed, all ranks'
must agree), in fp32 and in bf16 as train.py --bf16 runs: bf16 parameters and layer input (the residual
stream is bf16), under torch.autocast(bf16).

Against: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
bytes per layer with 16-bit activations and 1-byte dropout masks (a = heads, t = tp):

    no parallelism              s·b·h·(34 + 5·a·s/h)
    tensor parallel             s·b·h·(10 + 24/t + 5·a·s/(h·t))
    tensor + sequence parallel  s·b·h·(34 + 5·a·s/h) / t
    selective recompute         drops the 5·a·s/h term: s·b·h·34/t with sequence parallel
    full recompute              2·s·b·h (the layer input only; /t with sequence parallel)

Of the 34: 2+2 the two LayerNorm inputs, 2 the qkv input, 4+2 q, k and v, 2 the proj input, 2 the fc1
input, 8 the GeLU input, 8 the fc2 input, 1+1 the two hidden dropout masks; of the 5·a·s/h: 2 the
softmax output, 1 its dropout mask, 2 the dropped probabilities (the input of probs @ v). For fp32
the formula column keeps the 1-byte masks and doubles every 16-bit term (4-byte elements), so that a
ratio of 1.00 means "stores exactly what Korthikanti stores, in our dtype".

The last column adds to the formula every difference the run then lists (`plan.differences`: the norms'
statistics and, in bf16, their fp32 copies of x, the CPU references' fp32 softmax and GeLU input, ...) and says "= measured" when that sum is the
measured figure to the byte: each extra tensor is accounted for, at every tp, with and without sequence
parallel. The layers run on the CPU references (NANOMEG_TRITON=0). --triton adds tp = 1 rows through the
Triton kernels, what a GPU runs (on a CPU under the Triton interpreter: about 2 minutes more).

--detail prints every saved tensor of each tp = 1 configuration: shape, dtype, the bytes of its storage
(0 when it shares one already counted), the autograd node(s) that saved it and the line of nanomeg.py,
parallel.py or kernels.py that was running.
"""

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import timedelta

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import nanomeg as N  # noqa: E402
import parallel as P  # noqa: E402
from plan import differences, formula_bytes  # noqa: E402

RECOMPUTE = ("none", "selective", "full")
OURS = tuple(os.path.join(os.path.abspath(ROOT), f) for f in ("nanomeg.py", "parallel.py", "kernels.py"))


# The formula (`formula_bytes`) and where this code's storage differs from it (`differences`) live in plan.py,
# the library's planner, which plans every layout's activations with them.


# ----------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------


def _where() -> str:
    """The innermost frame in nanomeg.py, parallel.py or kernels.py: 'kernels.py:layer_norm_reference:733'."""
    f = sys._getframe(2)
    while f is not None:
        if os.path.abspath(f.f_code.co_filename) in OURS:
            return f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _in_checkpoint() -> bool:
    """Whether torch.utils.checkpoint is on the stack: packing a checkpointed region's inputs (it keeps them
    itself, in no autograd node), or re-running the region (reading a checkpointed node's saved tensors
    during the owner walk does that; its reads of the region's inputs are not owners)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.endswith(os.path.join("utils", "checkpoint.py")):
            return True
        f = f.f_back
    return False


def _depends_on(t: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether t's autograd history reaches `leaf` (the activation fed to the layer)."""
    stack, seen = [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if getattr(fn, "variable", None) is leaf:
            return True
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return False


def _owners(out: torch.Tensor, owner: dict, stop) -> None:
    """Name, for each packed tensor, the autograd node(s) that saved it: walk the graph from `out` and read
    every node's saved tensors, which runs the unpack hook with the current node's name in `owner[None]`."""
    stack, seen = [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or fn is stop:
            continue
        seen.add(fn)
        names = [a for a in dir(fn) if a.startswith("_saved_")]
        for attr in names:
            owner[None] = f"{fn.name()}.{attr.removeprefix('_saved_')}"
            try:
                getattr(fn, attr)
            except RuntimeError:
                pass
        if hasattr(fn, "saved_tensors") and not names:  # a Python autograd.Function's ctx
            owner[None] = fn.name()
            try:
                _ = fn.saved_tensors
            except RuntimeError:
                pass
        stack.extend(nxt for nxt, _ in fn.next_functions)
    owner[None] = None


def measure(cfg: N.GPTConfig, mesh: P.Mesh, s: int, b: int, bf16: bool, detail: bool = False,
            device: str = "cpu") -> dict:
    """Bytes layer 0 saves for backward on this rank: {'bytes', 'params' (left out), 'rows' (with detail)}."""
    full = N.init_gpt(replace(cfg, layers=1), seed=0)
    dtype = torch.bfloat16 if bf16 else torch.float32  # --bf16: bf16 parameters (train.rank_params), bf16 stream
    params = {k: v.to(device, dtype).requires_grad_(True) for k, v in P.shard(full, N.gpt_specs(cfg), mesh).items()
              if k.startswith("layers.")}
    param_storages = {p.untyped_storage().data_ptr() for p in params.values()}
    s_local = s // mesh.tp if cfg.sequence_parallel else s
    x0 = torch.randn(b, s_local, cfg.hidden, generator=torch.Generator().manual_seed(mesh.tp_rank))
    x0 = x0.to(device, dtype).requires_grad_(True)
    x = x0.clone()  # the layer input: an activation with a history, as the previous layer's output
    packed, owner = [], {None: None}

    def pack(t):
        packed.append((t, _where() if detail else "", detail and _in_checkpoint()))
        return len(packed) - 1

    def unpack(i):
        if owner[None] is not None and not _in_checkpoint():
            owner.setdefault(i, []).append(owner[None])
        return packed[i][0]

    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16), \
            torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = N.run_layers(params, x, cfg, mesh, mask_kind="causal", seed=1, training=True)
    if detail:
        _owners(out, owner, stop=x.grad_fn)
    counted, total, left_out, rows = set(), 0, 0, []
    for i, (t, where, checkpoint_input) in enumerate(packed):
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        is_param = ptr in param_storages or (t.requires_grad and not _depends_on(t, x0))
        new = ptr not in counted
        counted.add(ptr)
        if new:
            if is_param:
                left_out += nbytes
            else:
                total += nbytes
        if detail:
            rows.append(dict(shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                             bytes=nbytes if new else 0, param=is_param, where=where,
                             node="checkpoint input" if checkpoint_input else ", ".join(owner.get(i, ["?"]))))
    return dict(bytes=total, params=left_out, rows=rows)


def configs(tp: int, recomputes=RECOMPUTE):
    """(recompute, sequence parallel, bf16) measured at this tp; sequence parallel is a no-op at tp = 1."""
    for bf16 in (False, True):
        for sp in ((False,) if tp == 1 else (False, True)):
            for recompute in recomputes:
                yield recompute, sp, bf16


def run_tp(mesh: P.Mesh, cfg: N.GPTConfig, s: int, b: int, detail: bool, recomputes=RECOMPUTE,
           device: str = "cpu") -> dict:
    """{(recompute, sp, bf16): measure(...)} for every config of this tp."""
    return {key: measure(replace(cfg, recompute=key[0], sequence_parallel=key[1]), mesh, s, b, key[2],
                         detail, device)
            for key in configs(mesh.tp, recomputes)}


def _worker(rank, tp, init_file, args, results):
    """One gloo rank: build the mesh, measure every config, send rank 0's rows (with --detail) and bytes."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp,
                                timeout=timedelta(seconds=300))
        out = run_tp(P.Mesh.build(tp=tp), *args)
        results.put((rank, True, out if rank == 0 else {k: dict(bytes=v["bytes"]) for k, v in out.items()}))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(tp: int, args, env=None) -> dict:
    """Spawn tp gloo ranks running run_tp(mesh, *args); return {config: (rank 0's result, [bytes per rank])}.
    env: variables set for the children (read when they import kernels and triton)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory(prefix="nanomeg-memory-") as tmp:
            procs = [ctx.Process(target=_worker, args=(r, tp, os.path.join(tmp, "store"), args, results))
                     for r in range(tp)]
            for p in procs:
                p.start()
            got = {}
            for _ in range(tp):
                rank, ok, value = results.get(timeout=900)
                if not ok:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"tp={tp} rank {rank} failed:\n{value}")
                got[rank] = value
            for p in procs:
                p.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {key: (got[0][key], [got[r][key]["bytes"] for r in range(tp)]) for key in got[0]}


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------


def label(key, tp: int, triton: bool = False) -> str:
    recompute, sp, bf16 = key
    return (f"{'bf16' if bf16 else 'fp32'}  tp {tp}  {'sp' if sp else '  '}  recompute {recompute:9s}"
            + ("  triton" if triton else "")).rstrip()


def print_detail(title: str, rows: list) -> None:
    print(f"\n{title}: every saved tensor (bytes: its storage, 0 if already counted; * = parameter, left out)")
    print(f"  {'shape':22s} {'dtype':9s} {'bytes':>10s}  {'saved by':40s} at")
    for r in rows:
        mark = "*" if r["param"] else " "
        print(f"  {str(r['shape']):22s} {r['dtype']:9s} {r['bytes']:>10,d}{mark} {r['node'][:40]:40s} {r['where']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--detail", action="store_true", help="list every saved tensor of the tp = 1 configs")
    ap.add_argument("--triton", action="store_true",
                    help="also measure tp = 1 through the Triton kernels (what a GPU runs; on CPU under the "
                         "Triton interpreter: minutes)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    s, b, h, a = args.seq, args.batch, args.hidden, args.heads
    cfg = N.GPTConfig(vocab_size=256, max_seq=s, layers=1, hidden=h, heads=a, hidden_dropout=args.dropout,
                      attention_dropout=args.dropout)
    os.environ["NANOMEG_TRITON"] = "0"  # the CPU references, whatever the device (--triton: a child process)
    print(f"Activation bytes saved for backward by one GPT layer on one tp rank: seq {s}, batch {b}, hidden {h}, "
          f"{a} heads, ffn {cfg.ffn_hidden}, hidden and attention dropout {args.dropout}, causal, "
          f"{cfg.activation} MLP; torch {torch.__version__}, {torch.get_num_threads()} threads; kernels: the CPU "
          "references (rows marked triton: the Triton kernels)")
    print("formula: Korthikanti et al. 2022 with 1-byte dropout masks and 2-byte (bf16) or 4-byte (fp32) "
          "activations; bf16 = bf16 parameters and residual stream under torch.autocast(bf16), as train.py --bf16",
          flush=True)
    runs = []  # (tp, triton, {key: (rank 0's result, [bytes per rank])})
    for tp in args.tp:
        if tp == 1:
            res = run_tp(P.Mesh.serial(), cfg, s, b, args.detail)
            runs.append((1, False, {k: (v, [v["bytes"]]) for k, v in res.items()}))
        else:
            runs.append((tp, False, run_ranks(tp, (cfg, s, b, False))))
    if args.triton:
        cuda = torch.cuda.is_available()
        env = {"NANOMEG_TRITON": "1", **({} if cuda else {"TRITON_INTERPRET": "1"})}
        runs.append((1, True, run_ranks(1, (cfg, s, b, args.detail, ("none", "selective"),
                                            "cuda" if cuda else "cpu"), env)))

    print(f"\n{'config':44s} {'measured B/layer':>17s} {'formula B/layer':>16s} {'ratio':>6s}  "
          "formula + differences below")
    unexplained = []
    for tp, triton, res in runs:
        for key, (r0, per_rank) in res.items():
            recompute, sp, bf16 = key
            elem = 2 if bf16 else 4
            f = formula_bytes(s, b, h, a, tp, sp, recompute, elem)
            explained = f + sum(v for _, v in differences(s, b, h, a, cfg.ffn_hidden, tp, sp, recompute, elem,
                                                          triton))
            check = "= measured" if explained == r0["bytes"] else f"{explained:,.0f}"
            if explained != r0["bytes"]:
                unexplained.append(label(key, tp, triton))
            if len(set(per_rank)) > 1:
                check += f"  (ranks differ: {per_rank})"
            print(f"{label(key, tp, triton):44s} {r0['bytes']:>17,d} {f:>16,.0f} {r0['bytes'] / f:>6.2f}  {check}")

    tmax = max(args.tp)
    cols = [(4, 1, False, "none"), (2, 1, False, "none"), (2, tmax, tmax > 1, "selective")]
    names = ["fp32 tp 1 none", "bf16 tp 1 none", f"bf16 tp {tmax}{' sp' if tmax > 1 else ''} selective"]
    print("\nWhere our storage differs from the formula (CPU references), bytes per layer and rank; the [b, s, h] "
          "terms are whole on every tp rank (split by t under sequence parallel), the attention and GeLU terms split:")
    print("  " + " | ".join(f"{n:>18s}" for n in names))
    terms = [differences(s, b, h, a, cfg.ffn_hidden, t, sp, rc, e, False) for e, t, sp, rc in cols]
    for i, (what, _) in enumerate(terms[0]):
        print("  " + " | ".join(f"{col[i][1]:>+18,.0f}" for col in terms) + f"  {what}")
    print(VERDICTS)
    if unexplained:
        print(f"NOT explained to the byte by the lines above: {unexplained}")
    if args.detail:
        for tp, triton, res in runs:
            if tp == 1:
                for key, (r0, _) in res.items():
                    print_detail(label(key, tp, triton), r0["rows"])
    print(f"\n({time.perf_counter() - t0:.0f} s)")


VERDICTS = """
Verdicts (what is needed, what could go):
  * dropout masks: parallel.dropout is torch.where(mask, x * scale, 0), so autograd keeps the bool mask,
    1 B an element, the formula's (it was x * mask.to(x.dtype) * scale: a float mask, 4 B in fp32; fixed
    2026-11-25). A custom autograd.Function could keep nothing and re-hash the counter-based mask in
    backward (0 B, at the cost of the hash).
  * the residual stream is bf16 under --bf16 (bf16 parameters, fp32 main copy in the optimizer, as
    Megatron's bf16 model without --fp32-residual-connection): the full-recompute layer input is 2 B, the
    formula exactly. (Until 2026-12-03 the parameters stayed fp32 under autocast, the stream was fp32, and
    full recompute kept 2x the formula.)
  * LayerNorm off Triton: torch's F.layer_norm on an fp32 copy of x (since 2026-12, "LayerNorm off Triton
    through F.layer_norm"; before, the written-out reference kept x - mean and the normalised value) keeps
    x, mean and rstd like the Triton kernel: the formula's input, in fp32 (bf16 pays 2 B more an element).
  * softmax output and GeLU input in fp32, CPU reference: the reference computes in fp32 and autograd keeps
    its fp32 intermediates; the Triton kernels keep y (softmax) and x (GeLU) in the input's dtype, as the
    formula. Only bf16 on CPU pays it.
  * causal mask and LayerNorm statistics: s*s bytes and 4-8 B per token per LayerNorm, < 0.3% here.
  * q, k, v: the q k^T and probs v matmuls keep contiguous copies of the head views of qkv (the qkv output
    itself is freed), so they cost the formula's 3 [b, s, h/t]; selective recompute keeps the qkv output.
  * sequence parallel + bf16: column_parallel_linear casts x, weight and bias to the autocast dtype before
    _SequenceGatherLinear (autocast does not reach a Function's backward); before that fix (2026-11-25) the
    Function saved an fp32 x and its backward failed on bf16 g @ fp32 weight.
  * not found: a saved gathered input under sequence parallel (_SequenceGatherLinear keeps x's shard),
    or a copy of the probabilities beyond the formula's two (softmax output, dropout output)."""


if __name__ == "__main__":
    main()
