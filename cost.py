"""cost.py — how long rank r's step takes on a cluster.

`plan.py` says what a rank of any layout holds, sends and computes, from the
code that runs the cut; this file puts seconds on it. The performance model,
all of it (DESIGN.md, "The performance model"):

* compute: a stage's FLOPs / (peak × EFFICIENCY), one matmul efficiency for
  every kernel: the one free constant, calibrated on three published rows
  (benchmarks/plan.py) and fixed everywhere else;
* a collective: alpha-beta on the link its group crosses, n ranks, B bytes,
  bandwidth bw per GPU and direction, latency alpha per hop:
  all-reduce 2(n−1)·alpha + 2(n−1)/n·B/bw (a ring), all-gather and
  reduce-scatter (n−1)·alpha + (n−1)/n·B/bw (B: the whole tensor),
  all-to-all (n−1)·alpha + B/bw (B: what leaves the rank), send alpha + B/bw;
* the link: a group whose ranks all sit on one node uses NVLink; else
  InfiniBand, where k members on a node share k NICs (each GPU has its own);
  the rank order (tp fastest, then cp, dp, pp) decides which;
* overlap, as the code does it (parallel.py): dp buckets are reduced during
  the backward (`GradBuckets`), so they are hidden behind the last
  microbatch's backward except the last bucket and whatever does not fit;
  the tp collectives, the cp ring's backward, ep's all-to-alls and the
  pipeline's transfers are waited on at once: exposed; the cp ring's
  forward transfers overlap the block in hand: hidden;
* the pipeline: `parallel.simulate` replays the schedule with each stage's
  own forward and backward seconds (compute + its exposed transfers), so
  the bubble comes out of the same action lists the executor runs.

Output: step time, tokens/s, TFLOP/s per GPU, MFU, and where the time goes
(compute, tp, cp, ep, dp, pp, bubble).

Sections: 1. presets (clusters, models), 2. links, 3. collectives,
4. one rank's step, 5. the report `train.py --plan` prints, 6. the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

import nanomeg as N
import parallel as P

# ---------------------------------------------------------------------------
# 1. Presets: clusters (NVIDIA's data sheets) and models
# ---------------------------------------------------------------------------

GB = 1e9  # link bandwidths in GB/s, decimal as the data sheets give them
GIB = 2**30  # GPU memory: "80 GB" is 81,920 MiB (nvidia-smi)


@dataclass(frozen=True)
class Cluster:
    """One kind of node, repeated. Bandwidths are per GPU and per direction
    (bytes/s): NVLink's data-sheet figure is both directions together, so it
    is halved; InfiniBand is one NIC per GPU, its line rate / 8 bits. alpha:
    the latency of one ring step (s): an assumption (NCCL's per-step
    latencies are a few µs), not a data-sheet value, and not tuned."""

    name: str
    gpus_per_node: int
    memory: float  # bytes per GPU
    peak: float  # dense bf16 FLOP/s per GPU
    nvlink: float  # bytes/s per GPU, one direction
    ib: float  # bytes/s per GPU (its NIC), one direction
    alpha_nvlink: float = 2e-6
    alpha_ib: float = 5e-6

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"cluster {self.name}: {f.name} must be a finite number > 0, got {value}")
        if int(self.gpus_per_node) != self.gpus_per_node:
            raise ValueError(f"cluster {self.name}: gpus_per_node must be an integer, got {self.gpus_per_node}")


CLUSTERS = {
    # DGX A100 (NVIDIA A100 data sheet, 2021; DGX A100 data sheet): 8 A100 SXM 80 GB, 312 TFLOP/s dense
    # bf16, NVLink 3 at 600 GB/s per GPU both directions (300 one way), 8 x 200 Gb/s HDR InfiniBand
    # (one ConnectX-6 per GPU: 25 GB/s).
    "a100-80gb": Cluster("a100-80gb", 8, 80 * GIB, 312e12, 300 * GB, 200 / 8 * GB),
    # DGX H100 (NVIDIA H100 Tensor Core GPU data sheet; DGX H100 data sheet): 8 H100 SXM5 80 GB,
    # 989 TFLOP/s dense bf16, NVLink 4 at 900 GB/s both directions (450 one way), 8 x 400 Gb/s NDR
    # (one ConnectX-7 per GPU: 50 GB/s).
    "h100-80gb": Cluster("h100-80gb", 8, 80 * GIB, 989e12, 450 * GB, 400 / 8 * GB),
}


def cluster(name: str, **overrides) -> Cluster:
    """A preset, with any field replaced (None: keep the preset's). ValueError
    naming the choices for an unknown name, naming the field for a value <= 0."""
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}: choose {', '.join(CLUSTERS)}")
    return replace(CLUSTERS[name], **{k: v for k, v in overrides.items() if v is not None})


def _gpt(**kw) -> N.GPTConfig:
    return N.GPTConfig(**({"vocab_size": 51200, "max_seq": 2048} | kw))


_LLAMA = dict(norm="rmsnorm", activation="swiglu", position="rope", bias=False, tie_embeddings=False,
              vocab_size=32000)

# name -> (config, training sequence length, published parameter count). Narayanan et al. 2021 ("Efficient
# Large-Scale Language Model Training on GPU Clusters"), Table 1: vocab 51,200, seq 2048, 12·l·h² (1 + 13/12h
# + (V + s)/12lh) parameters; GPT-3 (Brown et al. 2020); Llama 2 (Touvron et al. 2023); Mixtral (Jiang et al.
# 2024). The published counts are as printed (1.7B is 1.652B rounded).
MODELS = {
    "gpt2-small": (N.GPTConfig(vocab_size=50257, max_seq=1024, layers=12, hidden=768, heads=12), 1024, 124e6),
    "gpt3-175b": (_gpt(layers=96, hidden=12288, heads=96), 2048, 175e9),
    "1.7b": (_gpt(layers=24, hidden=2304, heads=24), 2048, 1.7e9),
    "18.4b": (_gpt(layers=40, hidden=6144, heads=48), 2048, 18.4e9),
    "145.6b": (_gpt(layers=80, hidden=12288, heads=96), 2048, 145.6e9),
    "529.6b": (_gpt(layers=105, hidden=20480, heads=128), 2048, 529.6e9),
    "1008b": (_gpt(layers=128, hidden=25600, heads=160), 2048, 1008e9),
    "llama2-70b": (N.GPTConfig(max_seq=4096, layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, **_LLAMA),
                   4096, 69e9),
    "mixtral-8x7b": (N.GPTConfig(max_seq=4096, layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336,
                                 experts=8, moe_topk=2, rope_base=1e6, **_LLAMA), 4096, 46.7e9),
}


def model(name: str) -> tuple[N.GPTConfig, int]:
    """(config, sequence length) of a model preset; ValueError naming the choices."""
    if name not in MODELS:
        raise ValueError(f"unknown model preset {name!r}: choose {', '.join(MODELS)}")
    return MODELS[name][:2]


# ---------------------------------------------------------------------------
# 2. Links: which ranks a collective joins, and the wire between them
# ---------------------------------------------------------------------------


def group_ranks(mesh: P.Mesh, dim: str) -> list[int]:
    """Global ranks of this rank's group on mesh dim `dim` (parallel.Mesh's
    order: rank = ((pp·dp + d)·cp + c)·tp + t; ep is carved out of dp as
    d = edp_rank·ep + ep_rank). "pp" is the pair a pipeline transfer joins:
    this stage and the next."""
    at = lambda **c: mesh.global_rank(**c)
    ep, e, j = mesh.ep, mesh.dp_rank % mesh.ep, mesh.dp_rank // mesh.ep
    groups = {
        "tp": lambda: [at(tp=t) for t in range(mesh.tp)],
        "cp": lambda: [at(cp=c) for c in range(mesh.cp)],
        "dp": lambda: [at(dp=d) for d in range(mesh.dp)],
        "dpcp": lambda: [at(dp=d, cp=c) for d in range(mesh.dp) for c in range(mesh.cp)],
        "ep": lambda: [at(dp=j * ep + i) for i in range(ep)],
        "edp": lambda: [at(dp=i * ep + e) for i in range(mesh.dp // ep)],
        "pp": lambda: sorted({at(), mesh.pp_peer(+1)}),
        "embed": lambda: sorted({at(pp=0), at(pp=mesh.pp - 1)}),
    }
    if dim not in groups:
        raise ValueError(f"no group for mesh dim {dim!r}: choose {', '.join(groups)}")
    return groups[dim]()


def check_nodes(tp: int, cp: int, gpus: int, c: Cluster) -> None:
    """`parallel.check_nodes` on the cluster's nodes: a tp (and tp·cp) group inside one node, whole nodes;
    a job smaller than a node sits on one node."""
    P.check_nodes(tp, cp, gpus, min(int(c.gpus_per_node), gpus))


def link(ranks: list[int], rank: int, c: Cluster) -> tuple[str, float, float]:
    """(name, bytes/s, alpha) of the wire a group of global ranks crosses, seen
    from `rank`: NVLink when every rank is on rank's node (node = rank //
    gpus per node), else InfiniBand at k NICs, k = the group's ranks on this
    node (NCCL runs one ring per NIC; other groups use the other NICs)."""
    node = rank // c.gpus_per_node
    here = sum(r // c.gpus_per_node == node for r in ranks)
    if here == len(ranks):
        return "nvlink", c.nvlink, c.alpha_nvlink
    return "ib", c.ib * here, c.alpha_ib


# ---------------------------------------------------------------------------
# 3. Collectives: the alpha-beta model
# ---------------------------------------------------------------------------

DTYPE_BYTES = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2, "int64": 8, "int32": 4}


def nbytes(record: dict) -> int:
    """Bytes of a `count_comms` record: elements × the dtype's size (a torch.dtype or its short name)."""
    dtype = record["dtype"]
    size = dtype.itemsize if isinstance(dtype, torch.dtype) else DTYPE_BYTES[dtype]
    return record["elements"] * size


def collective_time(op: str, nbytes: float, n: int, bw: float, alpha: float) -> float:
    """Seconds of one collective over n ranks (alpha-beta, ring algorithms).
    nbytes as `count_comms` counts elements: all-reduce and reduce-scatter
    the whole input, all-gather the whole output, all-to-all what leaves
    the rank, send the message; a recv is its send's transfer (0 here)."""
    if n <= 1 or op == "recv":
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) * alpha + (n - 1) / n * nbytes / bw
    if op == "all_to_all":
        return (n - 1) * alpha + nbytes / bw
    if op == "send":
        return alpha + nbytes / bw
    raise ValueError(f"no time model for collective {op!r}")


def comm_times(comms: list[dict], mesh: P.Mesh, rank: int, c: Cluster) -> list[dict]:
    """Each record with its link and seconds added (group size from the mesh;
    a pipeline send goes to the next stage, or in the backward to the previous)."""
    out, wires = [], {}  # wires: {(dim, backward pp?): (link name, bw, alpha, n)}, once per group
    for r in comms:
        if r["phase"] == "log":
            continue
        back = r["dim"] == "pp" and r["phase"] == "backward"  # a gradient goes to the previous stage
        if (r["dim"], back) not in wires:
            ranks = sorted({rank, mesh.pp_peer(-1)}) if back else group_ranks(mesh, r["dim"])
            wires[r["dim"], back] = (*link(ranks, rank, c), 2 if r["dim"] == "pp" else len(ranks))
        name, bw, alpha, n = wires[r["dim"], back]
        size = nbytes(r)
        out.append(r | dict(link=name, bytes=size, seconds=collective_time(r["op"], size, n, bw, alpha)))
    return out


# ---------------------------------------------------------------------------
# 4. One rank's step: its stage's seconds per microbatch, the pipeline
#    replayed with every stage's seconds, the step and where it goes
# ---------------------------------------------------------------------------

# Fixed after calibration on the three published rows of benchmarks/plan.py (and only there).
EFFICIENCY = 0.46
CAUSES = ("compute", "tp", "cp", "ep", "dp", "pp", "bubble")
CAUSE_OF = {"tp": "tp", "cp": "cp", "ep": "ep", "pp": "pp", "dp": "dp", "dpcp": "dp", "edp": "dp", "embed": "dp"}


@dataclass(frozen=True)
class Layout:
    """How a job is cut (`plan.rank_plan`'s keywords): gpus = tp·cp·pp·dp;
    each dp replica runs `microbatches` microbatches of `micro_batch`
    sequences of `seq` tokens a step (global batch dp·microbatches·micro_batch)."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    microbatches: int
    seq: int
    cp: int = 1
    ep: int = 1
    v: int = 1
    schedule: str = "1f1b"
    zero: int = 0
    bf16: bool = True

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.dp * self.microbatches * self.micro_batch

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def words(self) -> str:
        dims = " x ".join(f"{d} {getattr(self, d)}" for d in ("tp", "cp", "pp", "dp") if d in ("tp", "pp", "dp")
                          or getattr(self, d) > 1)
        extra = (f", ep {self.ep}" if self.ep > 1 else "") + (f", {self.v} chunks per rank" if self.v > 1 else "")
        return (f"{self.gpus:,} GPUs = {dims}{extra}; global batch {self.global_batch:,} = dp {self.dp} x "
                f"{self.microbatches} microbatches x {self.micro_batch}, seq {self.seq:,}; schedule {self.schedule}"
                f"{', ZeRO-1' if self.zero else ''}; {'bf16' if self.bf16 else 'fp32'}")


def stage_seconds(plan: dict, layout: Layout, c: Cluster, efficiency: float = EFFICIENCY) -> dict:
    """One pipeline rank's seconds, from its plan (`plan.rank_plan`: mesh,
    flops {forward, backward, recompute} per step, comms of one step).
    -> {"micro": {cause: {"F": s, "B": s}}: per microbatch, what a forward
    and a backward take on this rank (compute, and each exposed dim);
    "after": {cause: s}: what the step waits for after its last backward
    (the dp buckets not hidden, the embedding's and the norm's all-reduces,
    ZeRO's all-gather); "hidden": {mesh dim: s}: transfers under compute}.
    Compute: FLOPs / (peak · efficiency); a backward's includes the
    recomputed forward. The dp buckets launched during the backward hide
    behind the last microbatch's backward, all but the last one launched."""
    m, mesh = layout.microbatches, plan["mesh"]
    speed = c.peak * efficiency
    flops = plan["flops"]
    micro = {cause: {"F": 0.0, "B": 0.0} for cause in CAUSES[:-1]}
    micro["compute"] = {"F": flops["forward"] / m / speed, "B": (flops["backward"] + flops["recompute"]) / m / speed}
    after, hidden, buckets = dict.fromkeys(CAUSES[1:-1], 0.0), {}, []
    for r in comm_times(plan["comms"], mesh, mesh.global_rank(), c):
        cause = CAUSE_OF[r["dim"]]
        if cause == "dp" and r["phase"] == "backward":
            buckets.append(r)
        elif r["phase"] in ("after backward", "optimizer") or cause == "dp":
            after[cause] += r["seconds"]
        elif cause == "cp" and r["phase"] == "forward":  # the ring passes the block on while it computes
            hidden["cp"] = hidden.get("cp", 0.0) + r["seconds"]
        else:
            micro[cause]["B" if r["phase"] == "backward" else "F"] += r["seconds"] / m
    cover = micro["compute"]["B"]  # all but the last bucket run under the last backward, as far as it lasts
    for k, r in enumerate(buckets):
        under = 0.0 if k == len(buckets) - 1 else min(r["seconds"], cover)
        cover -= under
        hidden[r["dim"]] = hidden.get(r["dim"], 0.0) + under
        after["dp"] += r["seconds"] - under
    return dict(micro=micro, after=after, hidden=hidden)


def step_seconds(stages: list[dict], layout: Layout, rank_pp: int = 0) -> dict:
    """The step from every pipeline rank's `stage_seconds` (stages[p] for pp
    rank p): the schedule replayed by `parallel.simulate` with each rank's
    forward F and backward B seconds (zero-bubble's I and W: half a B each),
    then each rank's after-backward wait. -> {step: s, busy, sim, share:
    {cause: s} of the rank at pp coordinate rank_pp, summing to the step}."""
    costs = []
    for st in stages:
        f = sum(v["F"] for v in st["micro"].values())
        b = sum(v["B"] for v in st["micro"].values())
        costs.append({"F": f, "B": b, "I": b / 2, "W": b / 2})
    schedules = P.schedule_for(layout.schedule, layout.pp, layout.microbatches, layout.v)
    sim = P.simulate(schedules, layout.v, costs)
    ends = [max(sim["end"][r, i] for i in range(len(s))) for r, s in enumerate(schedules)]
    step = max(e + sum(st["after"].values()) for e, st in zip(ends, stages))
    me, m = stages[rank_pp], layout.microbatches
    share = {cause: m * (v["F"] + v["B"]) for cause, v in me["micro"].items()}
    for cause, s in me["after"].items():
        share[cause] += s
    share["bubble"] = step - sum(share.values())
    return dict(step=step, sim=sim, costs=costs, share=share)


def throughput(step: float, cfg: N.GPTConfig, layout: Layout, c: Cluster, hardware_flops: float) -> dict:
    """Tokens/s, model TFLOP/s per GPU (`nanomeg.gpt_flops`: forward and
    backward, recompute not counted) and MFU = that / peak; hardware TFLOP/s
    per GPU counts the recomputed forwards too (hardware_flops: the step's
    FLOPs on all GPUs; Narayanan et al. 2021 report this one)."""
    model_flops = N.gpt_flops(cfg, layout.global_batch, layout.seq)
    per_gpu = model_flops / step / layout.gpus
    return dict(tokens_per_s=layout.global_batch * layout.seq / step, tflops=per_gpu / 1e12, mfu=per_gpu / c.peak,
                hw_tflops=hardware_flops / step / layout.gpus / 1e12, model_flops=model_flops)


def stage_plans(cfg: N.GPTConfig, layout: Layout, rank: int = 0) -> list[dict]:
    """`plan.rank_plan` for every pipeline rank at `rank`'s dp, cp, tp
    coordinates (stage p: global rank p·(tp·cp·dp) + rank's place in its stage)."""
    import plan as PL  # plan.py: what a rank holds and sends (shapes only)

    stage = layout.gpus // layout.pp  # ranks per pipeline stage
    return [PL.rank_plan(cfg, p * stage + rank % stage, **layout.kwargs()) for p in range(layout.pp)]


def rank_time(cfg: N.GPTConfig, layout: Layout, c: Cluster, rank: int = 0, efficiency: float = EFFICIENCY,
              plans: list[dict] | None = None) -> dict:
    """The performance model end to end for one rank of a layout: its
    stage's plan, every stage's seconds, the replayed pipeline, the step,
    its share per cause, tokens/s, TFLOP/s per GPU and MFU."""
    plans = plans or stage_plans(cfg, layout, rank)
    stages = [stage_seconds(p, layout, c, efficiency) for p in plans]
    pp_rank = rank // (layout.gpus // layout.pp)
    out = step_seconds(stages, layout, pp_rank)
    hardware = layout.gpus // layout.pp * sum(p["flops"]["forward"] + p["flops"]["backward"] + p["flops"]["recompute"]
                                              for p in plans)
    return out | throughput(out["step"], cfg, layout, c, hardware) | dict(plans=plans, stages=stages, rank=rank)


# ---------------------------------------------------------------------------
# 5. The report `train.py --plan` prints: memory per stage, communication
#    per dim, the schedule's timeline, where the step goes
# ---------------------------------------------------------------------------


def gib(n: float) -> str:
    """Bytes in the largest binary unit (B, KiB, MiB, GiB, TiB) that keeps the figure >= 1."""
    k = 0 if n < 1024 else min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**k:,.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[k]}" if k else f"{n:,.0f} B"


def secs(t: float) -> str:
    return f"{t:.3f} s" if t >= 0.1 or t == 0 else f"{t * 1e3:.3f} ms" if t >= 1e-4 else f"{t * 1e6:.1f} µs"


def span(numbers: list[int]) -> str:
    """[1, 2, 3] -> '1-3', [4] -> '4', [1, 3] -> '1,3'."""
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def memory_table(plans: list[dict], c: Cluster, most: int = 8) -> list[str]:
    """Bytes per pipeline stage by component (`plan.rank_plan`'s bytes; the
    activations at the schedule's peak in flight), stages with equal bytes
    on one row, and whether each fits in the GPU's memory; of more than
    `most` rows, the first and last most/2."""
    keys = ("weights", "grads", "optimizer", "activations", "total")
    rows = []  # (stage ids, bytes, peak in flight)
    for p, plan in enumerate(plans):
        b = tuple(plan["bytes"][k] for k in keys)
        if rows and rows[-1][1] == b:
            rows[-1][0].append(p)
        else:
            rows.append(([p], b, plan["activations"]["peak_in_flight"]))
    lines = [f"  {'stage':<7}" + "".join(f"{k:>13}" for k in keys) + f"  {'held':>4}  in {gib(c.memory)}"]
    for k, (ids, b, flight) in enumerate(rows):
        if len(rows) > most and most // 2 <= k < len(rows) - most // 2:  # the middle of a long pipeline
            if k == most // 2:
                lines.append(f"  ... stages {ids[0]}-{rows[-most // 2 - 1][0][-1]}: between the rows around them, "
                             + ("all fit" if all(r[1][-1] <= c.memory for r in rows) else "not all fit"))
            continue
        fits = "fits" if b[-1] <= c.memory else f"does not fit ({gib(b[-1] - c.memory)} over)"
        lines.append(f"  {span(ids):<7}" + "".join(f"{gib(n):>13}" for n in b) + f"  {flight:>4}  {fits}")
    return lines + ["  (held: the microbatch chunks whose activations a rank holds at its peak, parallel.simulate)"]


def sends_table(plans: list[dict]) -> list[str]:
    """What a rank of each pipeline stage sends in one step, per mesh dim
    (bytes of its collectives; a transfer counted at its send), stages that
    send the same on one row."""
    dims = [d for d in ("tp", "cp", "ep", "edp", "dp", "dpcp", "embed", "pp")
            if any(r["dim"] == d for p in plans for r in p["comms"])]
    if not dims:
        return ["  nothing: every mesh dim is one rank"]
    rows = []
    for p, plan in enumerate(plans):
        sent = tuple(sum(nbytes(r) for r in plan["comms"] if r["dim"] == d and r["op"] != "recv") for d in dims)
        if rows and rows[-1][1] == sent:
            rows[-1][0].append(p)
        else:
            rows.append(([p], sent))
    lines = [f"  {'stage':<7}" + "".join(f"{d:>12}" for d in dims)]
    return lines + [f"  {span(ids):<7}" + "".join(f"{gib(n) if n else '-':>12}" for n in sent) for ids, sent in rows]


def comm_table(plan: dict, st: dict, layout: Layout, c: Cluster) -> list[str]:
    """One rank's step per mesh dim: collectives, bytes, the link they cross,
    seconds, and how many of them the step waits for (the rest overlap)."""
    mesh = plan["mesh"]
    times = comm_times(plan["comms"], mesh, mesh.global_rank(), c)
    lines = [f"  {'dim':<6} {'collectives':>11} {'bytes':>12}  {'link':<14} {'time':>10}  exposed"]
    for dim in ("tp", "cp", "ep", "edp", "dp", "dpcp", "embed", "pp"):
        mine = [r for r in times if r["dim"] == dim and r["op"] != "recv"]
        if not mine:
            continue
        ranks = group_ranks(mesh, dim)
        name, bw, _ = link(ranks, mesh.global_rank(), c)
        seconds = sum(r["seconds"] for r in mine)
        hidden = st["hidden"].get(dim, 0.0)
        wire = f"{name} {bw / GB:,.0f} GB/s"
        lines.append(f"  {dim:<6} {len(mine):>11,} {gib(sum(r['bytes'] for r in mine)):>12}  {wire:<14} "
                     f"{secs(seconds):>10}  {secs(max(seconds - hidden, 0.0))}")
    return lines if len(lines) > 1 else ["  no collectives (one rank)"]


def timeline(layout: Layout, widest: int = 16, most: int = 12) -> list[str]:
    """The schedule's drawing (`parallel.format_schedule`, unit costs) when
    it stays readable: at most `widest` pipeline ranks; with many
    microbatches the first `most` are drawn (the steady state repeats)."""
    p, m, v = layout.pp, layout.microbatches, layout.v
    if p == 1:
        return ["  one pipeline stage: no schedule to draw"]
    if p > widest:
        return [f"  not drawn: {p} pipeline ranks are too many rows (at most {widest})"]
    shown = m if m <= most else max(p, most // p * p) if layout.schedule == "interleaved" else most
    note = "" if shown == m else f" (the first {shown} of {m} microbatches; the steady state repeats)"
    lines = P.format_schedule(P.schedule_for(layout.schedule, p, shown, v), v).splitlines()
    if shown != m:  # the drawing's bubble is the drawn microbatches'; say the whole step's too
        sim = P.simulate(P.schedule_for(layout.schedule, p, m, v), v)
        lines[-1] += f" (drawn); all {m} microbatches: bubble {sim['bubble']:.3f}"
    return [f"  {layout.schedule}, unit costs{note}:"] + ["  " + line for line in lines]


def time_lines(out: dict, layout: Layout, c: Cluster, efficiency: float = EFFICIENCY) -> list[str]:
    """The step, its throughput, and its share per cause for the planned rank."""
    step = out["step"]
    share = ", ".join(f"{k} {v / step:.1%}" for k, v in out["share"].items() if abs(v) / step >= 0.0005)
    return [f"  step {secs(step)} | {out['tokens_per_s']:,.0f} tokens/s | {flop_rate(out['tflops'])} per GPU "
            f"(model), MFU {out['mfu']:.1%} | {flop_rate(out['hw_tflops'])} with recompute",
            f"  rank {out['rank']}'s step: {share}",
            f"  (peak {flop_rate(c.peak / 1e12)} x matmul efficiency {efficiency}; alpha-beta collectives; "
            "DESIGN.md, \"The performance model\")"]


def flop_rate(tera: float) -> str:
    """'91.2 TFLOP/s', or '48.1 GFLOP/s' below one TFLOP/s (a CPU's plan)."""
    return f"{tera:,.1f} TFLOP/s" if tera >= 1 else f"{tera * 1e3:,.1f} GFLOP/s"


# ---------------------------------------------------------------------------
# 6. The search: every layout of a GPU count, ranked by the model
# ---------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: N.GPTConfig, gpus: int, c: Cluster, *, global_batch: int, micro_batch: int, seq: int,
           schedule: str = "1f1b", zero: int = 0, efficiency: float = EFFICIENCY) -> tuple[list, list]:
    """Every (tp, pp, dp, ep) of `gpus` (cp 1; tp within a node, as
    `parallel.check_nodes` asks; ep for a
    MoE model, dividing dp and the experts), at the given batch: ->
    (valid, rejected). valid: (step seconds, layout, rank_time) that fit,
    fastest first; rejected: (step seconds or inf, layout or None, why), the
    ones that do not fit first (by their step), then those that cannot be cut."""
    valid, rejected = [], []
    for tp in [t for t in divisors(gpus) if t <= c.gpus_per_node]:
        try:
            check_nodes(tp, 1, gpus, c)  # a tp group must not straddle two nodes
        except ValueError as e:
            rejected.append((math.inf, None, f"tp {tp}: {e}"))
            continue
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for ep in [e for e in divisors(dp) if cfg.experts % e == 0] if cfg.experts else [1]:
                words = f"tp {tp} pp {pp} dp {dp}" + (f" ep {ep}" if ep > 1 else "")
                if global_batch % (dp * micro_batch):
                    rejected.append((math.inf, None, f"{words}: global batch {global_batch} is not divisible by dp "
                                                     f"{dp} x micro batch {micro_batch}"))
                    continue
                layout = Layout(tp=tp, pp=pp, dp=dp, ep=ep, micro_batch=micro_batch, seq=seq, schedule=schedule,
                                microbatches=global_batch // (dp * micro_batch), zero=zero)
                one = replace(cfg, vocab_multiple=128 * tp, sequence_parallel=cfg.sequence_parallel and tp > 1)
                try:
                    out = rank_time(one, layout, c, efficiency=efficiency)
                except ValueError as e:
                    rejected.append((math.inf, None, f"{words}: {e}"))
                    continue
                most = max(p["bytes"]["total"] for p in out["plans"])
                if most > c.memory:
                    rejected.append((out["step"], layout, f"{words}: does not fit, {gib(most)} > {gib(c.memory)}"))
                else:
                    valid.append((out["step"], layout, out))
    key = lambda row: row[0]
    return sorted(valid, key=key), sorted(rejected, key=key)
