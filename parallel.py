"""parallel.py — how a model is split across ranks.

Read top to bottom:

1. `Mesh`: the tp / cp / dp / pp process groups (Megatron's rank order: tp
   fastest), plus "dpcp", "embed", and ep's "ep" / "edp" carved out of dp.
2. Communication accounting: `count_comms()` records every collective.
3. The raw collectives (all-reduce, all-gather, reduce-scatter along any dim).
4. The region mappings: autograd functions that say what moves forward and
   what moves backward. Every tensor-parallel layer is built from these.
5. The layers: column-, row- and vocab-parallel, vocab-parallel cross-entropy.
6. `shard` / `unshard` of a flat parameter dict.
7. Counter-based dropout: the mask is a pure function of (seed, stream, index).
8. Gradients across ranks: dp averaging, the tp-correct global norm.
9. Retrieval across dp: in-batch negatives from every replica, and an exact
   top-k over an index sharded over dp.
10. Pipeline schedules as data (AFAB, 1F1B, interleaved 1F1B, zero-bubble)
   and the simulator that measures their bubble and draws their timeline.
11. Pipeline execution: the layers of each stage, point-to-point sends
   between neighbouring stages, and the executor that runs a schedule.
12. Data parallel done properly: gradients reduced in buckets during the
   backward (`GradBuckets`) and ZeRO-1 (`ZeroAdamW`).
13. Checkpoints: each rank writes the pieces it holds in the full tensors'
   coordinates and reads whatever overlaps what it holds (any layout to any).
14. Expert parallelism: a MoE layer's token rows travel to the ranks holding
   their experts and back, with all-to-alls over "ep".
15. Context parallelism: each cp rank holds 1/cp of every sequence, and
   ring attention passes k/v around the cp ranks.
16. Where each rank is: what a failing or hanging rank reports, and the
   watchdog that ends a wait past the timeout.

Notation in docstrings: b batch, s sequence, h hidden, t tensor-parallel size,
V vocabulary (padded). "Elements moved" counts the elements of the *full*
tensor the collective produces (all-reduce, all-gather) or consumes
(reduce-scatter); a ring implementation sends about (t-1)/t of that per rank.

Every collective is a no-op on a group of one, so the serial model is the
parallel model on `Mesh.serial()`: there is no second code path.

Collectives that carry a gradient are named autograd functions (sections 4,
5, 9, 14, 15) whose docstrings say what moves forward and backward. The
rest call the raw collectives of section 3 on values no gradient flows
through: statistics inside an autograd function's own forward (the
vocab-parallel softmax's max and sums), integer counts (MoE routing's
choices per expert over tp, the all-to-all's split sizes), detached totals
(the loss-mask token count over cp, the MoE aux loss over pp after the
backward), gradients after the backward (dp buckets, the norm's squares),
and ZeRO-1's parameter all-gather after the optimizer step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

# ---------------------------------------------------------------------------
# 1. Mesh
# ---------------------------------------------------------------------------

MESH_DIMS = ("pp", "dp", "cp", "tp")  # slowest to fastest varying, as in Megatron


@dataclass(frozen=True)
class Mesh:
    """Sizes, this rank's coordinates and process groups of the tp, cp, dp, pp (and ep) dims.

    Global rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank:
    the tp ranks of one model replica are neighbours (on one node, where the
    all-reduces are cheap), then its cp ranks.

    cp: context parallelism. The cp ranks of one replica hold the same
    weights and the same batch rows, each a 1/cp share of every sequence
    (chunks r and 2·cp − 1 − r of 2·cp, `cp_positions`); attention passes
    k/v around their ring (`ring_attention`). For the gradients they are one
    more data-parallel dim: the "dpcp" group (dp × cp ranks) averages them.
    A group is None when its dim has size 1: every collective on it is a no-op.
    With pp > 1 there is one more group, "embed": the first and the last
    stage of a replica (same dp, tp coordinates), which hold the two copies
    of a tied word embedding (Megatron's embedding group).

    ep: expert parallelism, carved out of the dp ranks (Megatron's order tp,
    ep, dp, pp): dp_rank = edp_rank·ep + ep_rank. The ep ranks of one "ep"
    group hold different experts of a mixture-of-experts layer and trade
    tokens with all-to-alls; the dp/ep ranks of one "edp" group (expert data
    parallel) hold the same experts and average their gradients. Every other
    weight is replicated over all dp ranks, as without experts.

    micro, micros: which of a step's microbatches this computation is on
    (0 of 1 without gradient accumulation). Not a process coordinate but a
    batch one, like dp_rank: replica d's microbatch i of b rows holds rows
    (d·micros + i)·b onwards of the global batch (`batch_rows`), so dropout
    draws what one process on the whole batch draws.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    groups: dict = field(default_factory=dict, compare=False, repr=False)
    micro: int = 0
    micros: int = 1

    @staticmethod
    def serial() -> Mesh:
        """A mesh of one rank. Needs no torch.distributed at all."""
        return Mesh()

    @staticmethod
    def of_rank(rank: int, *, tp: int = 1, pp: int = 1, dp: int = 1, cp: int = 1, ep: int = 1) -> Mesh:
        """The sizes and coordinates of global rank `rank` in a world of
        tp·cp·dp·pp ranks, and no process groups: a virtual mesh, for
        planning (plan.py) and for `build`. Megatron's order, tp fastest:
        rank = ((pp_rank·dp + dp_rank)·cp + cp_rank)·tp + tp_rank, and
        ep_rank = dp_rank % ep (ep is carved out of dp). ValueError naming the
        values for a bad size or a rank outside the world. A virtual mesh
        must never carry tensors through a collective: with no groups every
        collective would be a silent no-op (`group` is None)."""
        world = tp * cp * dp * pp if all(isinstance(n, int) for n in (tp, cp, dp, pp)) else 0
        check_cp(cp)
        check_mesh_sizes(tp, pp, dp, world, cp)
        check_ep(ep, dp)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank {rank!r} is outside the world of tp*cp*dp*pp = {tp}*{cp}*{dp}*{pp} = {world} "
                             f"ranks (0 to {world - 1})")
        dp_rank = (rank // (tp * cp)) % dp
        return Mesh(tp=tp, pp=pp, dp=dp, tp_rank=rank % tp, dp_rank=dp_rank, pp_rank=rank // (tp * cp * dp),
                    cp=cp, cp_rank=(rank // tp) % cp, ep=ep, ep_rank=dp_rank % ep)

    @staticmethod
    def build(tp: int = 1, pp: int = 1, dp: int | None = None, device_type: str | None = None,
              ep: int = 1, cp: int = 1, timeout: timedelta | None = None) -> Mesh:
        """Build the mesh over the already-initialised default process group.

        dp defaults to world_size / (tp * cp * pp). Uses
        `torch.distributed.device_mesh.init_device_mesh` with dims (pp, dp,
        cp, tp), with pp > 1 one embedding group per (dp, cp, tp)
        coordinate, with cp > 1 the "dpcp" group, and with ep > 1 the "ep" and
        "edp" groups (see the class docstring): every rank creates every
        group, in the same order (torch's rule).
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_cp(cp)
        if dp is None:  # data parallel fills what tp, cp and pp leave
            check_mesh_sizes(tp, pp, 1, tp * pp)
            if world % (tp * pp * cp):
                what, sizes = ("tp*pp", f"{tp}*{pp}") if cp == 1 else ("tp*cp*pp", f"{tp}*{cp}*{pp}")
                raise ValueError(f"world size {world} is not divisible by {what} = {sizes} = {tp * cp * pp}")
            dp = world // (tp * pp * cp)
        check_mesh_sizes(tp, pp, dp, world, cp)
        check_ep(ep, dp)
        check_nodes(tp, cp, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if ep > 1 and cp > 1:
            raise ValueError(f"ep={ep} with cp={cp}: expert and context parallelism together are not built")
        if world == 1:
            return Mesh()
        from torch.distributed.device_mesh import init_device_mesh

        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        options = None if timeout is None else {d: (dist.get_backend(), _group_options(timeout)) for d in MESH_DIMS}
        dm = init_device_mesh(device_type, (pp, dp, cp, tp), mesh_dim_names=MESH_DIMS, backend_override=options)
        groups = {d: dm.get_group(d) for d, n in zip(MESH_DIMS, (pp, dp, cp, tp)) if n > 1}
        rank = dist.get_rank()
        mesh = replace(Mesh.of_rank(rank, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep), groups=groups)
        at = lambda p, d, t: (p * dp + d) * cp * tp + t  # global rank of (pp, dp, tp) coordinates (cp = 1 with ep)
        if cp > 1 and dp > 1:  # the dp x cp ranks of one (pp, tp) coordinate: they average the gradients
            for p in range(pp):
                for t in range(tp):
                    ranks = [(p * dp * cp + i) * tp + t for i in range(dp * cp)]
                    group = dist.new_group(ranks, timeout=timeout)
                    if rank in ranks:
                        groups["dpcp"] = group
        elif cp > 1 or dp > 1:
            groups["dpcp"] = groups["cp" if cp > 1 else "dp"]
        edp = dp // ep
        # "ep": dp ranks j·ep + e for e < ep (fixed j); "edp": j·ep + e for j < edp (fixed e). Same pp, tp.
        for name, size, others, member in (("ep", ep, edp, lambda j, e: j * ep + e),
                                           ("edp", edp, ep, lambda e, j: j * ep + e)):
            if size == 1 or size == dp:  # no group, or the dp group itself (below)
                continue
            for p in range(pp):
                for other in range(others):
                    for t in range(tp):
                        ranks = [at(p, member(other, i), t) for i in range(size)]
                        group = dist.new_group(ranks, timeout=timeout)
                        if rank in ranks:
                            groups[name] = group
        if ep == dp and "dp" in groups:
            groups["ep"] = groups["dp"]
        if ep == 1 and "dp" in groups:
            groups["edp"] = groups["dp"]
        if pp > 1:
            stage = dp * cp * tp  # ranks per pipeline stage
            for replica in range(stage):  # ranks `replica` (first stage) and the same place on the last stage
                group = dist.new_group([replica, (pp - 1) * stage + replica], timeout=timeout)
                if rank % stage == replica and mesh.pp_rank in (0, pp - 1):
                    groups["embed"] = group
        return mesh

    def size(self, dim: str) -> int:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "embed": 2 if self.pp > 1 else 1, "ep": self.ep,
                "edp": self.dp // self.ep, "cp": self.cp, "dpcp": self.dp * self.cp}[dim]

    def rank(self, dim: str) -> int:
        return {"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.dp_rank, "ep": self.ep_rank,
                "edp": self.dp_rank // self.ep, "cp": self.cp_rank, "dpcp": self.dp_rank * self.cp + self.cp_rank}[dim]

    def group(self, dim: str) -> Any:
        return self.groups.get(dim)

    def global_rank(self, **coords: int) -> int:
        """The global rank at this rank's coordinates, with any of pp, dp, cp,
        tp replaced by `coords` (a ValueError for any other name):
        ((pp·dp_size + dp)·cp_size + cp)·tp_size + tp. ep is not a separate
        term: it is carved out of dp (dp_rank = edp_rank·ep + ep_rank)."""
        if set(coords) - set(MESH_DIMS):
            raise ValueError(f"global_rank takes coordinates {MESH_DIMS}, not {sorted(set(coords) - set(MESH_DIMS))}")
        at = dict(pp=self.pp_rank, dp=self.dp_rank, cp=self.cp_rank, tp=self.tp_rank) | coords
        return ((at["pp"] * self.dp + at["dp"]) * self.cp + at["cp"]) * self.tp + at["tp"]

    def pp_peer(self, step: int) -> int:
        """The global rank `step` stages on (+1 next, -1 previous), wrapping
        around the pipeline (interleaving: the last stage's chunk c feeds the
        first stage's chunk c + 1), at this rank's dp, cp and tp coordinates."""
        return self.global_rank(pp=(self.pp_rank + step) % self.pp)

    def cp_peer(self, step: int) -> int:
        """The global rank `step` places on around this replica's cp ring (+1 next, -1 previous)."""
        return self.global_rank(cp=(self.cp_rank + step) % self.cp)

    def batch_rows(self, b: int) -> tuple[int, int]:
        """(first global row, global batch rows) of this computation's b rows:
        replica dp_rank, microbatch `micro` of `micros`."""
        return (self.dp_rank * self.micros + self.micro) * b, b * self.dp * self.micros


def check_mesh_sizes(tp: int, pp: int, dp: int, world: int, cp: int = 1) -> None:
    """ValueError unless every size is >= 1 and tp * cp * pp * dp == world."""
    for name, n in (("tp", tp), ("pp", pp), ("dp", dp), ("cp", cp)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={n} (world size {world})")
    if tp * pp * dp * cp != world:
        what = "tp*pp*dp" if cp == 1 else "tp*cp*pp*dp"
        sizes = f"{tp}*{pp}*{dp}" if cp == 1 else f"{tp}*{cp}*{pp}*{dp}"
        raise ValueError(f"world size {world} != {what} = {sizes} = {tp * pp * dp * cp}")


def check_cp(cp: int) -> None:
    """ValueError unless cp is an integer >= 1."""
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be an integer >= 1, got cp={cp!r}")


def check_ep(ep: int, dp: int) -> None:
    """ValueError unless ep is an integer >= 1 that divides the data-parallel ranks."""
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep must be an integer >= 1, got ep={ep!r}")
    if dp % ep:
        raise ValueError(f"ep={ep} does not divide the data-parallel ranks dp={dp}: expert parallelism is carved "
                         "out of data parallelism (world = tp x pp x dp, and ep | dp)")


def check_nodes(tp: int, cp: int, world: int, per_node: int) -> None:
    """ValueError unless the tp ranks of every replica share a node, and so
    do its tp·cp ranks when they fit on one. torchrun numbers ranks node by
    node (node · per_node + local rank, per_node = LOCAL_WORLD_SIZE), and the
    mesh puts tp fastest, then cp: so a tp group lies on one node exactly
    when tp divides per_node. A tp group across nodes would all-reduce
    every layer's activations over the inter-node link."""
    if per_node < 1 or world % per_node:
        raise ValueError(f"the world of {world} ranks is not a whole number of nodes of {per_node} ranks "
                         "(LOCAL_WORLD_SIZE): every node must run the same --nproc-per-node")
    if per_node % tp:
        raise ValueError(f"tp={tp} does not divide the {per_node} ranks per node: a tensor-parallel group would "
                         f"cross nodes; choose tp dividing {per_node} (ranks per node)")
    if tp * cp <= per_node and per_node % (tp * cp):
        raise ValueError(f"tp x cp = {tp} x {cp} = {tp * cp} does not divide the {per_node} ranks per node: a "
                         "context-parallel ring would straddle a node boundary; choose tp x cp dividing "
                         f"{per_node}, or a multiple of it")


def _group_options(timeout: timedelta):
    """The backend's process-group options carrying `timeout`: DeviceMesh's
    groups take no timeout argument, and would wait the backend's default."""
    options = dist.ProcessGroupNCCL.Options() if dist.get_backend() == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


def init_distributed(timeout: timedelta | None = None) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (or do nothing
    when run as plain `python`). Returns (rank, world_size). gloo on CPU, nccl
    on CUDA. timeout: how long a collective or a transfer may wait before
    it fails (None: the backend's default); pass the same to `Mesh.build`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------------------
# 2. Communication accounting
# ---------------------------------------------------------------------------

_RECORDERS: list[list[dict]] = []  # the stack of open count_comms() records


@contextlib.contextmanager
def count_comms():
    """Record every collective issued inside the block (forward and backward).

    Yields a list that fills with dicts {op, dim, elements, phase, dtype}:
    * op: all_reduce / all_gather / reduce_scatter / all_to_all (ep's token
      rows, counted as the elements that leave the rank) / send / recv
      (pipeline activations and gradients on "pp", the ring's k/v on "cp");
    * dim: the mesh dim or group: "tp", "cp", "dp", "pp", "dpcp" (gradients
      under cp), "ep", "edp" (expert gradients), "embed" (tied embedding);
    * elements: as defined in the module docstring;
    * phase: "forward", "backward", "after backward" (between backward and
      the optimizer step: dp gradient averaging, the grad norm),
      "optimizer" (ZeRO-1's all-gather of the updated parameters) or "log"
      (train.py's averages for its step line, outside the counted step).
    Collectives on a group of one are not issued and so not recorded.
    Opt-in: costs nothing when not used.
    """
    records: list[dict] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is records)]  # by identity: nested
        # records may be equal lists, and list.remove would drop the wrong one


def _record(op: str, dim: str, elements: int, phase: str, dtype: torch.dtype) -> None:
    WHERE["last"] = f"{op} over {dim} of {int(elements):,} elements ({phase})"  # for a hang's report (section 16)
    for records in _RECORDERS:
        records.append(dict(op=op, dim=dim, elements=int(elements), phase=phase, dtype=dtype))


# ---------------------------------------------------------------------------
# 3. Raw collectives (no autograd). `along` is the tensor dim to gather/scatter.
# ---------------------------------------------------------------------------


def all_reduce(x: torch.Tensor, mesh: Mesh, dim: str, phase: str = "forward", op=None) -> torch.Tensor:
    """Sum (or `op`) x over the ranks of mesh dim `dim`. Moves x.numel() elements."""
    group = mesh.group(dim)
    if group is None:
        return x
    _record("all_reduce", dim, x.numel(), phase, x.dtype)
    x = x.clone(memory_format=torch.contiguous_format)  # reduce into a fresh buffer, never the caller's
    with waiting(f"all_reduce over {dim}"):
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


def all_gather(x: torch.Tensor, mesh: Mesh, dim: str, along: int, phase: str = "forward") -> torch.Tensor:
    """Concatenate every rank's x along tensor dim `along`, in rank order.
    x: [..., n, ...] -> [..., n * size, ...]. Moves size * x.numel() elements."""
    size, group = mesh.size(dim), mesh.group(dim)
    if group is None:
        return x
    _record("all_gather", dim, x.numel() * size, phase, x.dtype)
    x = x.movedim(along, 0).contiguous()  # the collective concatenates along dim 0
    out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
    with waiting(f"all_gather over {dim}"):
        dist.all_gather_single(out, x, group=group)
    return out.movedim(0, along)


def reduce_scatter(x: torch.Tensor, mesh: Mesh, dim: str, along: int, phase: str = "forward") -> torch.Tensor:
    """Sum x over the ranks, each keeping its own 1/size chunk along `along`.
    x: [..., n, ...] -> [..., n / size, ...]. Moves x.numel() elements."""
    size, group = mesh.size(dim), mesh.group(dim)
    if group is None:
        return x
    _check_divisible(x, along, size, "reduce-scatter")
    _record("reduce_scatter", dim, x.numel(), phase, x.dtype)
    x = x.movedim(along, 0).contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    with waiting(f"reduce_scatter over {dim}"):
        dist.reduce_scatter_single(out, x, group=group)
    return out.movedim(0, along)


def split(x: torch.Tensor, mesh: Mesh, dim: str, along: int) -> torch.Tensor:
    """Keep this rank's 1/size chunk of x along `along`. Moves nothing."""
    size = mesh.size(dim)
    if size == 1:
        return x
    _check_divisible(x, along, size, "split")
    return x.chunk(size, dim=along)[mesh.rank(dim)].contiguous()


def _check_divisible(x: torch.Tensor, along: int, size: int, what: str) -> None:
    if x.shape[along] % size:
        raise ValueError(
            f"cannot {what} dim {along} of size {x.shape[along]} over {size} ranks "
            f"(tensor shape {tuple(x.shape)}): {x.shape[along]} % {size} != 0"
        )


# ---------------------------------------------------------------------------
# 4. Region mappings (Megatron's mappings.py), as autograd functions.
#    Each pairs a forward collective with the backward that makes it correct.
#    SEQ = 1: activations are [b, s, h], so the sequence dim is 1.
#    Every backward here (and in section 5) is `first_order_only`.
# ---------------------------------------------------------------------------


def first_order_only(backward):
    """Decorator for a hand-written backward. Autograd cannot see inside a
    collective or a gradient formula built from saved tensors, so a second
    derivative through one would silently miss its terms (torch's
    once_differentiable does not catch every such case). Under
    create_graph=True (grad mode on during backward) it raises instead."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{backward.__qualname__.split('.')[0]}: a hand-written backward gives first-order "
                               "gradients only; create_graph=True (a gradient of a gradient) is not supported")
        return backward(ctx, *grads)

    return wrapper


SEQ = 1


class _CopyToTP(torch.autograd.Function):
    """Enter a tensor-parallel region: every tp rank uses the same x.
    Forward: identity. Backward: all-reduce of the gradient over tp (each rank
    holds the partial gradient from its own shard of the next weight).
    Elements moved: backward b*s*h."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return x

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return all_reduce(g, ctx.mesh, "tp", "backward"), None


class _ReduceFromTP(torch.autograd.Function):
    """Leave a tensor-parallel region by summing the ranks' partial results.
    Forward: all-reduce over tp. Backward: identity (the sum's gradient is the
    same on every rank). Elements moved: forward b*s*h."""

    @staticmethod
    def forward(ctx, x, mesh):
        return all_reduce(x, mesh, "tp", "forward")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    """Split the last dim: rank r keeps chunk r. Forward: split (no traffic).
    Backward: all-gather of the last dim. Elements moved: backward b*s*h."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return split(x, mesh, "tp", -1)

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return all_gather(g, ctx.mesh, "tp", -1, "backward"), None


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the ranks' last-dim chunks. Forward: all-gather of the last
    dim. Backward: split (each rank keeps the gradient of its own chunk).
    Elements moved: forward b*s*h (h the full last dim)."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return all_gather(x, mesh, "tp", -1, "forward")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return split(g, ctx.mesh, "tp", -1), None


class _ScatterToSP(torch.autograd.Function):
    """Enter sequence parallelism: rank r keeps sequence chunk r.
    Forward: split of dim s (no traffic). Backward: all-gather of dim s.
    Elements moved: backward b*s*h."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return split(x, mesh, "tp", SEQ)

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return all_gather(g, ctx.mesh, "tp", SEQ, "backward"), None


class _GatherFromSP(torch.autograd.Function):
    """Leave sequence parallelism into a tensor-parallel region: all-gather the
    sequence chunks. Forward: all-gather of dim s. Backward: reduce-scatter of
    dim s when the consumer is tensor-parallel (each rank's gradient is partial),
    or a plain split when it is not (`tp_output_grad=False`).
    Elements moved: forward b*s*h; backward b*s*h (reduce-scatter) or 0."""

    @staticmethod
    def forward(ctx, x, mesh, tp_output_grad):
        ctx.mesh, ctx.tp_output_grad = mesh, tp_output_grad
        return all_gather(x, mesh, "tp", SEQ, "forward")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        if ctx.tp_output_grad:
            return reduce_scatter(g, ctx.mesh, "tp", SEQ, "backward"), None, None
        return split(g, ctx.mesh, "tp", SEQ), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Leave a tensor-parallel region into sequence parallelism: sum the
    partial results and keep this rank's sequence chunk. Forward:
    reduce-scatter of dim s. Backward: all-gather of dim s.
    Elements moved: forward b*s*h, backward b*s*h."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return reduce_scatter(x, mesh, "tp", SEQ, "forward")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return all_gather(g, ctx.mesh, "tp", SEQ, "backward"), None


def copy_to_tp(x, mesh):
    return _CopyToTP.apply(x, mesh) if mesh.tp > 1 else x


def reduce_from_tp(x, mesh):
    return _ReduceFromTP.apply(x, mesh) if mesh.tp > 1 else x


def scatter_to_tp(x, mesh):
    return _ScatterToTP.apply(x, mesh) if mesh.tp > 1 else x


def gather_from_tp(x, mesh):
    return _GatherFromTP.apply(x, mesh) if mesh.tp > 1 else x


def scatter_to_sp(x, mesh):
    return _ScatterToSP.apply(x, mesh) if mesh.tp > 1 else x


def gather_from_sp(x, mesh, tp_output_grad: bool = True):
    return _GatherFromSP.apply(x, mesh, tp_output_grad) if mesh.tp > 1 else x


def reduce_scatter_to_sp(x, mesh):
    return _ReduceScatterToSP.apply(x, mesh) if mesh.tp > 1 else x


for _f, _cls in [(copy_to_tp, _CopyToTP), (reduce_from_tp, _ReduceFromTP), (scatter_to_tp, _ScatterToTP),
                 (gather_from_tp, _GatherFromTP), (scatter_to_sp, _ScatterToSP),
                 (gather_from_sp, _GatherFromSP), (reduce_scatter_to_sp, _ReduceScatterToSP)]:
    _f.__doc__ = _cls.__doc__


def sync_replicated_grad(param: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Use a replicated parameter inside a sequence-parallel region.

    Under sequence parallelism each tp rank sees only s/t tokens, so the
    gradient of a replicated parameter (LayerNorm weight, row-parallel bias)
    is partial on every rank. Megatron all-reduces such grads after backward;
    here the parameter passes through `copy_to_tp`, whose backward does that
    all-reduce (elements moved: backward param.numel()).
    """
    return copy_to_tp(param, mesh)


class _SyncKVReplicaGrad(torch.autograd.Function):
    """A fused qkv weight (or bias) whose kv heads are replicated over
    rep = tp/g ranks (`HeadGroups`, tp > kv heads). Forward: identity.
    Backward: each replica's k/v rows hold a partial gradient (from its own
    query heads only); they are summed over the group's replicas. Done with
    the tp group alone: every rank writes its k/v gradient rows into its
    group's slot of a zero [g, 2d, ...] buffer, one all-reduce over tp sums
    the slots, and each rank takes its group's slot back.
    Elements moved: backward g·2d·h (+ g·2d for the bias). A process group
    per kv head would move 2d·h, at the cost of groups per layout."""

    @staticmethod
    def forward(ctx, param, groups, head_dim, mesh):
        ctx.groups, ctx.head_dim, ctx.mesh = groups, head_dim, mesh
        return param.view_as(param)

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        rows, mesh = 2 * ctx.head_dim, ctx.mesh
        group = mesh.tp_rank // (mesh.tp // ctx.groups)
        slots = g.new_zeros((ctx.groups, rows, *g.shape[1:]))
        slots[group] = g[-rows:]
        kv = all_reduce(slots, mesh, "tp", "backward")[group]
        return torch.cat([g[:-rows], kv]), None, None, None


def sync_kv_replica_grad(param, spec, mesh: Mesh):
    """Use this rank's qkv weight/bias shard; when its kv heads are replicated
    (spec.replicas(tp) > 1) their gradient is summed over the replicas in
    backward (see _SyncKVReplicaGrad). A no-op otherwise."""
    if param is None or spec.replicas(mesh.tp) == 1:
        return param
    return _SyncKVReplicaGrad.apply(param, spec.groups, spec.head_dim, mesh)


# ---------------------------------------------------------------------------
# 5. Tensor-parallel layers. Weights are [out, in] as in torch.nn.Linear.
# ---------------------------------------------------------------------------


class _SequenceGatherLinear(torch.autograd.Function):
    """y = all_gather_s(x) @ w.T, keeping only the local x shard for backward.

    Megatron's LinearWithGradAccumulationAndAsyncCommunication under sequence
    parallel: storing the gathered input would cost t times the activation
    memory, so backward gathers it again.
    Forward: all-gather of x along s (b*s*h).
    Backward: all-gather of x again (b*s*h) for the weight gradient, and a
    reduce-scatter of the input gradient along s (b*s*h).
    x: [b, s/t, h_in], w: [h_out/t, h_in] -> y: [b, s, h_out/t]
    """

    @staticmethod
    def forward(ctx, x, weight, mesh):
        ctx.mesh = mesh
        ctx.save_for_backward(x, weight)
        return all_gather(x, mesh, "tp", SEQ, "forward") @ weight.t()

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        x_full = all_gather(x, ctx.mesh, "tp", SEQ, "backward")  # [b, s, h_in]
        grad_x = reduce_scatter(g @ weight, ctx.mesh, "tp", SEQ, "backward")  # [b, s/t, h_in]
        grad_w = rearrange(g, "... o -> (...) o").t() @ rearrange(x_full, "... i -> (...) i")
        return grad_x, grad_w, None


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias, name: str) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: input last dim {x.shape[-1]} != weight in-features "
                         f"(weight shape {tuple(weight.shape)}, input shape {tuple(x.shape)})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")


def column_parallel_linear(x, weight, bias, mesh, *, gather_output=False, sequence_parallel=False):
    """Y = X A^T + b with A split by rows (output features) over tp.

    x: [b, s, h_in] (or [b, s/t, h_in] under sequence parallel)
    weight: [h_out/t, h_in], bias: [h_out/t] or None  (this rank's shards)
    returns [b, s, h_out/t], or [b, s, h_out] with gather_output.
    Communication: without sequence parallel, copy_to_tp (backward all-reduce
    of b*s*h_in); with it, the all-gather / re-gather / reduce-scatter of
    `_SequenceGatherLinear`.

    THIS is where a sequence-parallel activation enters the tensor-parallel
    region (Megatron: gather_from_sequence_parallel_region). The model never calls
    gather_from_sp itself; the all-gather lives inside _SequenceGatherLinear,
    fused with the matmul so its full input is never stored. One attention
    block under tensor + sequence parallel:
        x [b, s/t, h] --all-gather(s)--> [b, s, h] --qkv--> [b, s, (n+2g)d/t]
          --attention--> [b, s, h/t] --proj (row-parallel)--> partial [b, s, h]
          --reduce-scatter(s)--> [b, s/t, h]
    """
    _check_linear(x, weight, bias, "column_parallel_linear")
    if sequence_parallel and mesh.tp > 1:
        if torch.is_autocast_enabled(x.device.type):  # autocast does not reach inside a Function's backward:
            dtype = torch.get_autocast_dtype(x.device.type)  # cast here, so forward and backward agree
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        y = _SequenceGatherLinear.apply(x, weight, mesh)
        y = y if bias is None else y + bias
    else:
        y = torch.nn.functional.linear(copy_to_tp(x, mesh), weight, bias)  # x A^T + b in one addmm
    return gather_from_tp(y, mesh) if gather_output else y


def row_parallel_linear(x, weight, bias, mesh, *, input_is_parallel=True, sequence_parallel=False):
    """Y = X A^T + b with A split by columns (input features) over tp.

    x: [b, s, h_in/t] (or [b, s, h_in] when not input_is_parallel: it is split)
    weight: [h_out, h_in/t], bias: [h_out] replicated, added once after the sum.
    returns [b, s, h_out], or [b, s/t, h_out] under sequence parallel.
    Communication: forward all-reduce of b*s*h_out (reduce_from_tp), or a
    reduce-scatter of it under sequence parallel (then backward all-gathers).
    """
    if not input_is_parallel:
        x = scatter_to_tp(x, mesh)
    _check_linear(x, weight, bias, "row_parallel_linear")
    if mesh.tp == 1:  # nothing to sum: the bias joins the matmul (one addmm, no pass of its own)
        return torch.nn.functional.linear(x, weight, bias)
    partial = x @ weight.t()  # this rank's share of the sum over h_in
    if sequence_parallel:
        y = reduce_scatter_to_sp(partial, mesh)
        if bias is not None:
            y = y + sync_replicated_grad(bias, mesh)
        return y
    y = reduce_from_tp(partial, mesh)
    return y if bias is None else y + bias


def vocab_range(vocab_local: int, mesh: Mesh) -> tuple[int, int]:
    """[start, end) of the vocabulary rows held by this tp rank."""
    start = mesh.tp_rank * vocab_local
    return start, start + vocab_local


def real_vocab_columns(vocab_local: int, vocab_size: int, mesh: Mesh, device=None) -> torch.Tensor:
    """bool [V/t]: True where this rank's vocabulary column is a real id
    (< vocab_size), False on the padding rows added to make V divisible."""
    start, end = vocab_range(vocab_local, mesh)
    return torch.arange(start, end, device=device) < vocab_size


ID_DTYPES = (torch.int64, torch.int32)  # the index dtypes torch's embedding and gather take


def check_ids(ids: torch.Tensor, vocab_size: int, what: str = "token id") -> None:
    """ValueError unless ids is int64 or int32 with every id in [0, vocab_size) (checked on every rank)."""
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"{what}s must be an int64 (or int32) tensor, got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)  # one pass over ids, one look at the result (a GPU syncs once)
    if bool((lo < 0) | (hi >= vocab_size)):
        lo, hi = int(lo), int(hi)
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} {bad} out of range [0, {vocab_size})")


def vocab_parallel_embedding(ids, weight, mesh, *, sequence_parallel=False, vocab_size=None):
    """Look up ids in a word-embedding table split by rows (vocabulary) over tp.

    ids: [b, s] int; weight: [V/t, h] this rank's rows; vocab_size: the real
    vocabulary (default V); returns [b, s, h] (or [b, s/t, h] under sequence
    parallel). Each rank looks up the ids in its own range and writes zeros for
    the rest; the ranks' partial rows are summed: an all-reduce of b*s*h
    elements, or a reduce-scatter along s under sequence parallel.
    """
    vocab_local = weight.shape[0]
    check_ids(ids, vocab_size if vocab_size is not None else vocab_local * mesh.tp)
    if mesh.tp == 1:  # one rank holds every row
        return torch.nn.functional.embedding(ids, weight)
    start, end = vocab_range(vocab_local, mesh)
    outside = (ids < start) | (ids >= end)
    local = torch.nn.functional.embedding((ids - start).masked_fill(outside, 0), weight)
    local = local.masked_fill(outside.unsqueeze(-1), 0.0)
    return reduce_scatter_to_sp(local, mesh) if sequence_parallel else reduce_from_tp(local, mesh)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary, without gathering them.

    Megatron's algorithm (cross_entropy.py), with label smoothing taken over
    the *global* real vocabulary (Megatron uses the local shard's size, which
    is wrong for tp > 1) and padded vocabulary columns masked out:
      1. m = max_j logit_j          all-reduce (MAX) of b*s elements
      2. z_target = logit_target - m all-reduce (SUM) of b*s: only the rank
                                     holding the target column contributes
      3. S = sum_j exp(logit_j - m)  all-reduce (SUM) of b*s
      4. loss = log S - z_target
      5. label smoothing: sum_j (logit_j - m) over real columns, one more
         all-reduce (SUM) of b*s.
    Backward needs no communication: d loss / d logit_j = softmax_j - target_j.
    """

    @staticmethod
    def forward(ctx, logits, targets, mesh, vocab_size, label_smoothing):
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        start, end = vocab_range(logits.shape[-1], mesh)
        real = min(max(vocab_size - start, 0), end - start)  # this rank's real columns: a prefix of its V/t
        m = logits[..., :real].max(dim=-1).values if real else logits.new_full(logits.shape[:-1], float("-inf"))
        m = all_reduce(m, mesh, "tp", op=dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)  # [b, s, V/t], <= 0 on the real columns
        shifted[..., real:] = float("-inf")  # the padding never counts: exp(-inf) = 0
        mine = (targets >= start) & (targets < end)
        local_t = (targets - start).masked_fill(~mine, 0)
        z_target = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        z_target = all_reduce(z_target, mesh, "tp")
        if label_smoothing > 0:
            sum_shifted = all_reduce(shifted[..., :real].sum(dim=-1), mesh, "tp")
        exp = shifted.exp_()  # in place: shifted is not needed after this
        sum_exp = all_reduce(exp.sum(dim=-1), mesh, "tp")
        loss = sum_exp.log() - z_target
        if label_smoothing > 0:
            mean_logprob = sum_shifted / vocab_size - sum_exp.log()
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_logprob
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, mine)  # the softmax, in exp's memory
        ctx.label_smoothing, ctx.vocab_size, ctx.real = label_smoothing, vocab_size, real
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        softmax, local_t, mine = ctx.saved_tensors
        eps, g = ctx.label_smoothing, g.unsqueeze(-1)  # g: [b, s, 1]
        grad = softmax * g  # [b, s, V/t], a new tensor: the saved softmax stays intact for another backward
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(1.0 - eps) * mine.unsqueeze(-1).to(grad.dtype) * g)
        if eps > 0:
            grad[..., :ctx.real] -= (eps / ctx.vocab_size) * g
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits, targets, mesh, *, label_smoothing=0.0, vocab_size=None):
    """Per-token cross-entropy of vocab-parallel logits.

    logits: [b, s, V/t] this rank's vocabulary columns (any float dtype; the
    loss is computed in at least fp32); targets: [b, s] global ids;
    vocab_size: the real vocabulary (columns >= it are padding, masked out;
    default V). Returns loss: [b, s], the same on every tp rank.
    Elements moved: 3 all-reduces of b*s (4 with label smoothing).
    """
    vocab_size = logits.shape[-1] * mesh.tp if vocab_size is None else vocab_size
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match targets shape "
                         f"{tuple(targets.shape)} (expected logits [*targets.shape, V/t])")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if vocab_size > logits.shape[-1] * mesh.tp:
        raise ValueError(f"vocab_size {vocab_size} > padded vocabulary {logits.shape[-1]} * tp {mesh.tp}")
    check_ids(targets, vocab_size, "target id")
    return _VocabParallelCrossEntropy.apply(logits, targets, mesh, vocab_size, label_smoothing)


# ---------------------------------------------------------------------------
# 6. shard / unshard a flat parameter dict.
#    specs[name] is the tensor dim split over tp, None (replicated), a
#    `HeadGroups` (a fused qkv tensor, whose kv heads may be replicated), or
#    `Experts` (a stack of experts' tensors, split over ep and maybe tp).
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadGroups:
    """The tp split of a fused qkv weight [(n + 2g)·d, h] or bias [(n + 2g)·d].

    Rows are grouped per kv head: [q heads of group 0, k_0, v_0, q heads of
    group 1, k_1, v_1, ...], each head d = head_dim rows, q_per_group = n/g.
    * tp divides g: rank r holds g/tp whole groups, a contiguous dim-0 slice.
    * g divides tp (more ranks than kv heads, e.g. MQA at tp = 2): each kv
      head is replicated over rep = tp/g ranks. Rank r = group·rep + j holds
      the j-th 1/rep of its group's query heads plus the group's k and v:
      [(n/tp + 2)·d, h]. The replicas' k/v gradients are partial (each saw only
      its own query heads) and are summed by `sync_kv_replica_grad`.
    Either way rank r's query heads are heads [r·n/tp, (r+1)·n/tp)."""

    groups: int
    q_per_group: int
    head_dim: int

    def replicas(self, tp: int) -> int:
        """Ranks that hold each kv head: 1 when tp divides the groups."""
        return max(1, tp // self.groups)

    def check(self, rows: int, tp: int, name: str) -> None:
        want = self.groups * (self.q_per_group + 2) * self.head_dim
        if rows != want:
            raise ValueError(f"parameter {name!r}: {rows} rows, but {self.groups} kv heads x ({self.q_per_group} "
                             f"q + k + v) x head dim {self.head_dim} = {want}")
        rep = self.replicas(tp)
        if (self.groups % tp and tp % self.groups) or self.q_per_group % rep:
            raise ValueError(f"parameter {name!r}: tp={tp} cannot split {self.groups} kv heads of "
                             f"{self.q_per_group} query heads each (one of tp, kv_heads must divide the other, "
                             f"and tp must divide the query heads)")

    def shard(self, full: torch.Tensor, mesh: Mesh) -> torch.Tensor:
        """full [(n + 2g)·d, ...] -> this rank's rows (see the class docstring)."""
        rep = self.replicas(mesh.tp)
        if rep == 1:
            return split(full, mesh, "tp", 0)
        group, j = divmod(mesh.tp_rank, rep)
        heads = rearrange(full, "(g r d) ... -> g r d ...", g=self.groups, d=self.head_dim)[group]  # [n/g + 2, d, ..]
        q = heads[: self.q_per_group].chunk(rep)[j]  # [n/tp, d, ...]
        return torch.cat([q, heads[self.q_per_group:]]).flatten(0, 1)

    def unshard(self, local: torch.Tensor, mesh: Mesh) -> torch.Tensor:
        """Inverse of `shard`: one all-gather over tp of every rank's rows;
        each group's k and v are taken from its first replica."""
        rep = self.replicas(mesh.tp)
        if rep == 1:
            return all_gather(local, mesh, "tp", 0)
        every = rearrange(all_gather(local[None], mesh, "tp", 0), "(g j) (r d) ... -> g j r d ...",
                          j=rep, d=self.head_dim)  # [g, rep, n/tp + 2, d, ...]
        q = rearrange(every[:, :, :-2], "g j r d ... -> g (j r) d ...")  # [g, n/g, d, ...]
        return rearrange(torch.cat([q, every[:, 0, -2:]], dim=1), "g r d ... -> (g r d) ...")

    def counted(self, local: torch.Tensor, mesh: Mesh) -> torch.Tensor:
        """The rows this rank counts in a global norm (a leading slice of dim 0):
        k and v only on a group's first replica."""
        rep = self.replicas(mesh.tp)
        return local if rep == 1 or mesh.tp_rank % rep == 0 else local[: -2 * self.head_dim]


@dataclass(frozen=True)
class Experts:
    """The split of a stacked expert tensor [E, ...] (a mixture-of-experts
    layer's fc1 [E, f, h], fc2 [E, h, f], or their biases): dim 0, the
    experts, over ep (ep rank e holds experts [e·E/ep, (e+1)·E/ep)), and dim
    `tp_dim` over tp as the dense MLP's tensor (fc1 rows: 1, fc2 columns: 2;
    None: replicated over tp, as fc2's bias). The ranks of one "edp" group
    hold the same experts."""

    tp_dim: int | None

    def check(self, shape: tuple, mesh: Mesh, name: str) -> None:
        if shape[0] % mesh.ep:
            raise ValueError(f"parameter {name!r} of shape {tuple(shape)}: its {shape[0]} experts are not divisible "
                             f"by ep={mesh.ep}")
        if self.tp_dim is not None and shape[self.tp_dim] % mesh.tp:
            raise ValueError(f"parameter {name!r} of shape {tuple(shape)}: dim {self.tp_dim} of size "
                             f"{shape[self.tp_dim]} is not divisible by tp={mesh.tp}")

    def shard(self, full: torch.Tensor, mesh: Mesh) -> torch.Tensor:
        mine = split(full, mesh, "ep", 0)
        return mine if self.tp_dim is None else split(mine, mesh, "tp", self.tp_dim)

    def unshard(self, local: torch.Tensor, mesh: Mesh) -> torch.Tensor:
        """All-gather over tp (if split there), then over ep (E/ep experts per rank)."""
        mine = local if self.tp_dim is None else all_gather(local, mesh, "tp", self.tp_dim)
        return all_gather(mine, mesh, "ep", 0)

    def counted(self, local: torch.Tensor, mesh: Mesh) -> torch.Tensor:
        """The elements this rank counts in a global norm (summed over tp and ep; a
        leading slice of dim 0): all of its experts' shard, or nothing off tp rank 0
        when replicated over tp."""
        return local if self.tp_dim is not None or mesh.tp_rank == 0 else local[:0]


def _check_specs(params: dict, specs: dict, mesh: Mesh, full: bool) -> None:
    missing = sorted(set(params) - set(specs))
    if missing:
        raise ValueError(f"no sharding spec for parameter(s) {missing}")
    for name, p in params.items():
        d = specs[name]
        if isinstance(d, HeadGroups) and full:
            d.check(p.shape[0], mesh.tp, name)
        elif isinstance(d, Experts):
            if full:
                d.check(tuple(p.shape), mesh, name)
        elif d is not None and full and p.shape[d] % mesh.tp:
            raise ValueError(f"parameter {name!r} of shape {tuple(p.shape)}: dim {d} of size "
                             f"{p.shape[d]} is not divisible by tp={mesh.tp}")


def shard_tensor(p: torch.Tensor, spec, mesh: Mesh) -> torch.Tensor:
    """This rank's slice of one full tensor under its spec (no communication)."""
    if spec is None:
        return p
    return spec.shard(p, mesh) if isinstance(spec, (HeadGroups, Experts)) else split(p, mesh, "tp", spec)


def unshard_tensor(p: torch.Tensor, spec, mesh: Mesh) -> torch.Tensor:
    """The full tensor from every rank's slice: one all-gather over tp (none if replicated; experts: and over ep)."""
    if spec is None:
        return p
    return spec.unshard(p, mesh) if isinstance(spec, (HeadGroups, Experts)) else all_gather(p, mesh, "tp", spec)


def shard(params: dict, specs: dict, mesh: Mesh) -> dict:
    """This rank's slices of full parameters: fresh tensors, no communication.
    {name: [.., n, ..]} -> {name: [.., n/t, ..]} along specs[name]."""
    _check_specs(params, specs, mesh, full=True)
    return {name: shard_tensor(p, specs[name], mesh).detach().clone() for name, p in params.items()}


def unshard(params: dict, specs: dict, mesh: Mesh) -> dict:
    """Full parameters (or gradients) from every rank's slices: one all-gather
    over tp per split tensor, of its full size. Inverse of `shard`."""
    _check_specs(params, specs, mesh, full=False)
    return {name: unshard_tensor(p.detach(), specs[name], mesh) for name, p in params.items()}


def shard_layout(shapes: dict, specs: dict, mesh: Mesh) -> list[dict]:
    """What this rank holds of each full parameter, from the specs and this
    mesh's coordinates alone: no tensors, no communication. The local shapes
    are the ones `shard` produces (tests/test_train.py checks them slice by slice).

    shapes: {name: full shape}, e.g. {k: s for k, (s, _) in gpt_shapes(cfg).items()}.
    Returns one dict per name, in shapes' order: name, local_shape,
    full_shape and slice_desc, which reads (t = tp, r = tp_rank):
      "whole"                                      tp = 1: nothing is split
      "replicated"                                 spec None: every tp rank holds all of it
      "rows a:b of [n, m]", "columns a:b of [n, m]", "elements a:b of [n]"
                                                   a dim split over tp: a = r·n/t, b = a + n/t
      "q heads 0-1, kv heads 0-1: rows 0:192 of [384, 128]"
                                                   a HeadGroups with t <= kv heads: whole groups
      "q heads 2-3 + kv head 0 (replicated on tp ranks 0-1) of [192, 128]"
                                                   t > kv heads: the kv head's rows sit on t/g ranks
    Raises `shard`'s ValueError when a spec cannot split its shape over tp."""
    _check_specs({name: torch.empty(shape, device="meta") for name, shape in shapes.items()}, specs, mesh,
                 full=True)
    return [dict(name=name, full_shape=tuple(shape), **_local_slice(tuple(shape), specs[name], mesh))
            for name, shape in shapes.items()]


def _local_slice(shape: tuple, spec, mesh: Mesh) -> dict:
    """{local_shape, slice_desc} of one full shape under its spec on this rank."""
    t, r = mesh.tp, mesh.tp_rank
    if isinstance(spec, Experts):
        return _experts_slice(shape, spec, mesh)
    if t == 1 or spec is None:
        return dict(local_shape=shape, slice_desc="whole" if t == 1 else "replicated")
    if isinstance(spec, HeadGroups):
        return _head_groups_slice(shape, spec, mesh)
    dim = spec % len(shape)
    n = shape[dim] // t
    what = "elements" if len(shape) == 1 else {0: "rows", 1: "columns"}.get(dim, f"dim {dim}")
    return dict(local_shape=shape[:dim] + (n,) + shape[dim + 1:],
                slice_desc=f"{what} {r * n}:{(r + 1) * n} of {list(shape)}")


def _experts_slice(shape: tuple, spec: Experts, mesh: Mesh) -> dict:
    """{local_shape, slice_desc} of a stacked expert tensor [E, ...] on this rank (see `Experts`)."""
    n, e = shape[0] // mesh.ep, mesh.ep_rank
    local = (n, *shape[1:])
    what = _heads("expert", e * n, (e + 1) * n)
    if spec.tp_dim is not None and mesh.tp > 1:
        m, r = shape[spec.tp_dim] // mesh.tp, mesh.tp_rank
        local = local[:spec.tp_dim] + (m,) + local[spec.tp_dim + 1:]
        what += f", dim {spec.tp_dim} {r * m}:{(r + 1) * m}"
    elif mesh.tp > 1:
        what += ", replicated over tp"
    return dict(local_shape=local, slice_desc=f"{what} of {list(shape)}" if mesh.ep > 1 or mesh.tp > 1 else "whole")


def _head_groups_slice(shape: tuple, spec: HeadGroups, mesh: Mesh) -> dict:
    """{local_shape, slice_desc} of a fused qkv [(n + 2g)·d, ...] on this rank (see `HeadGroups`)."""
    t, r = mesh.tp, mesh.tp_rank
    rep, q_local = spec.replicas(t), spec.groups * spec.q_per_group // t
    q_heads = _heads("q head", r * q_local, (r + 1) * q_local)
    if rep == 1:  # g/t whole groups: a contiguous slice of rows
        rows, groups = shape[0] // t, spec.groups // t
        return dict(local_shape=(rows, *shape[1:]),
                    slice_desc=f"{q_heads}, {_heads('kv head', r * groups, (r + 1) * groups)}: "
                               f"{'rows' if len(shape) > 1 else 'elements'} {r * rows}:{(r + 1) * rows} of "
                               f"{list(shape)}")
    group = r // rep  # this rank's kv head, shared by tp ranks group·rep .. group·rep + rep - 1
    return dict(local_shape=((q_local + 2) * spec.head_dim, *shape[1:]),
                slice_desc=f"{q_heads} + kv head {group} (replicated on tp ranks {group * rep}-"
                           f"{group * rep + rep - 1}) of {list(shape)}")


def _heads(word: str, lo: int, hi: int) -> str:
    """'q head 2' or 'q heads 2-3': the heads [lo, hi)."""
    return f"{word} {lo}" if hi - lo == 1 else f"{word}s {lo}-{hi - 1}"


# ---------------------------------------------------------------------------
# 7. Counter-based randomness.
#    A dropout mask bit is hash(seed, stream, global element index): no RNG
#    state, so a shard's mask is the slice of the serial mask, and recomputing
#    a layer in backward reproduces its mask for free.
# ---------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply), on int64 tensors or ints
    holding values in [0, 2**32). Constants < 2**31 keep products < 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _stream_id(stream) -> int:
    if isinstance(stream, str):
        import zlib

        return zlib.crc32(stream.encode())  # stable across processes, unlike hash()
    return int(stream) & _M32


def global_index(shape, offset=None, global_shape=None, device=None) -> torch.Tensor:
    """Flat indices, in the global tensor, of the box `shape` placed at `offset`.
    shape/offset/global_shape: per dim. An offset may also be a 1-D tensor of
    the n indices the box takes along its dim (context parallelism's two
    chunks of the sequence). Returns int64 [*shape]."""
    offset = offset or (0,) * len(shape)
    global_shape = global_shape or tuple(n + (o if isinstance(o, int) else 0) for n, o in zip(shape, offset))
    if not (len(shape) == len(offset) == len(global_shape)):
        raise ValueError(f"shape {tuple(shape)}, offset {tuple(offset)} and global_shape "
                         f"{tuple(global_shape)} must have the same length")
    index = torch.zeros((), dtype=torch.int64, device=device)
    for d, (n, o, g) in enumerate(zip(shape, offset, global_shape)):
        if isinstance(o, torch.Tensor):
            if o.shape != (n,) or (n and (int(o.min()) < 0 or int(o.max()) >= g)):
                raise ValueError(f"dim {d}: {n} indices inside the global size {g} needed, got {tuple(o.shape)}")
            along = o.to(device=device, dtype=torch.int64)
        else:
            if o < 0 or o + n > g:
                raise ValueError(f"dim {d}: box [{o}, {o + n}) is outside the global size {g}")
            along = torch.arange(o, o + n, device=device)
        view = [1] * len(shape)
        view[d] = n
        index = index * g + along.view(view)
    return index


def keep_mask(shape, p: float, seed: int, stream, offset=None, global_shape=None, device=None):
    """Boolean [*shape]: True where dropout keeps the element. A pure function
    of (seed, stream, global index), so a shard's mask is the serial mask's slice."""
    index = global_index(shape, offset, global_shape, device)
    key = _mix32((int(seed) & _M32) ^ _mix32(_stream_id(stream)))
    h = _mix32((index & _M32) ^ key)
    h = _mix32(h ^ (index >> 32) ^ _mix32(key ^ 0x5BD1E995))
    return h.to(torch.float64) * (1.0 / 2**32) >= p


def dropout(x, p: float, *, seed: int, stream, training: bool = True, offset=None, global_shape=None):
    """Inverted dropout with a counter-based mask.

    x: the box of the global tensor `global_shape` starting at `offset`
    (defaults: x is the whole tensor). Kept elements are scaled by 1/(1-p).
    `stream` (an int or a name) separates the dropout sites of one step.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    mask = keep_mask(x.shape, p, seed, stream, offset, global_shape, x.device)
    return torch.where(mask, x * (1.0 / (1.0 - p)), 0.0)  # autograd keeps the bool mask: 1 byte an element


# ---------------------------------------------------------------------------
# 8. Gradients across ranks: data-parallel averaging and the global norm.
# ---------------------------------------------------------------------------


def all_reduce_grads_dp(params: dict, mesh: Mesh) -> None:
    """Average every gradient over the data-parallel replicas (and the cp ranks: dp x cp), in place.
    Elements moved: one all-reduce of each parameter shard's size over dp.
    The plain form, after the backward; train.py uses `GradBuckets`, which
    packs them into buckets reduced while the backward runs, as Megatron does."""
    dim = "dpcp" if mesh.cp > 1 else "dp"  # context-parallel ranks hold the whole model too
    if mesh.size(dim) == 1:
        return
    for p in params.values():
        if p.grad is not None:
            p.grad.copy_(all_reduce(p.grad, mesh, dim, "after backward") / mesh.size(dim))


def check_max_norm(max_norm) -> None:
    """ValueError unless max_norm is a finite number >= 0 (0: no clipping)."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or \
            not (math.isfinite(max_norm) and max_norm >= 0):
        raise ValueError(f"max_norm must be a finite number >= 0 (0: no clipping), got {max_norm!r}")


def clip_grad_norm(params: dict, specs: dict, mesh: Mesh, max_norm: float, skip=(),
                   grads: dict | None = None) -> torch.Tensor:
    """Scale all gradients (grads: {name: gradient}, `GradBuckets.grads`; else
    each p.grad) so that their global L2 norm is at most max_norm; return the
    norm before clipping (the same on every rank).

    The norm is over the *full* model: split parameters contribute their
    shard on every tp rank, replicated ones are counted once (on tp rank 0),
    replicated kv heads once (on their first replica, `HeadGroups.counted`),
    `skip`ped names not at all (the last stage's copy of a tied embedding:
    the first stage counts it); experts' squares are summed over ep first
    (`grad_norm_sq`: one all-reduce of a single element, each ep rank holds
    other experts); then one all-reduce of a single element over tp, and
    one over pp (each stage holds other layers), sums the squares.
    Counting a replicated gradient once is right only because it is whole on
    every rank: under sequence parallel the layers all-reduce it over tp in
    backward (`sync_replicated_grad`, nanomeg's `allreduce_grad_if_sp`).
    """
    check_max_norm(max_norm)
    grads = grads if grads is not None else {name: p.grad for name, p in params.items()}
    sq = grad_norm_sq(params, specs, mesh, skip, grads)
    norm = all_reduce(all_reduce(sq, mesh, "tp", phase="after backward"), mesh, "pp", phase="after backward").sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            if g is not None:
                g.mul_(scale.to(g.dtype))
    return norm


# ---------------------------------------------------------------------------
# 9. Retrieval across data-parallel replicas: in-batch negatives from every
#    replica, and an index sharded over dp, searched exactly.
# ---------------------------------------------------------------------------


class _GatherFromDP(torch.autograd.Function):
    """Every replica's rows, in dp-rank order: x [n, e] -> [dp·n, e].
    Forward: all-gather over dp (dp·n·e elements). Backward: REDUCE-SCATTER
    over dp (dp·n·e): every replica scored its own queries against all rows,
    so row block j has a gradient on every replica; their sum is the
    gradient of j's rows, and it goes to replica j, which owns the
    parameters that made them. With the usual dp averaging of parameter
    gradients this is exactly the serial run on the global batch (each
    replica's loss is the mean over its own queries) — no x dp patch."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return all_gather(x, mesh, "dp", 0, "forward")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return reduce_scatter(g, ctx.mesh, "dp", 0, "backward"), None


def gather_from_dp(x, mesh):
    return _GatherFromDP.apply(x, mesh) if mesh.dp > 1 else x


gather_from_dp.__doc__ = _GatherFromDP.__doc__


def sizes_over_dp(n, mesh: Mesh, device=None) -> list:
    """Every replica's n (a count of rows, or a tuple of sizes), in dp-rank
    order: an all-gather of len(n) elements per replica, so all ranks can
    check sizes together and raise the same error before a collective that
    needs them equal."""
    values = torch.tensor([int(v) for v in (n if isinstance(n, tuple) else (n,))], device=device)
    every = all_gather(values[None], mesh, "dp", 0).tolist() if mesh.dp > 1 else [values.tolist()]
    return [tuple(v) for v in every] if isinstance(n, tuple) else [v[0] for v in every]


NO_ID = 2**62  # the id of a padding candidate: after every real block, with score -inf


def top_k(scores, ids, k: int):
    """The k best of scores [m, n] with ids [n] (or [m, n]) -> (scores [m, k],
    ids [m, k], positions [m, k] along n), best first; equal scores in
    ascending id order. One rule for the local search, the merge and the
    serial reference."""
    ids = ids.expand_as(scores)
    by_id = ids.argsort(dim=-1, stable=True)
    best = by_id.gather(-1, scores.gather(-1, by_id).argsort(dim=-1, descending=True, stable=True)[:, :k])
    return scores.gather(-1, best), ids.gather(-1, best), best


def top_k_over_dp(scores_local, ids_local, k: int, mesh: Mesh):
    """Exact maximum-inner-product search over an index sharded over dp.
    scores_local [m, n_r]: the same m queries on every replica against
    this replica's n_r blocks, whose global ids are ids_local [n_r].
    -> (scores [m, k], ids [m, k]) over the whole index, as `top_k` on it.

    Each replica keeps its local top k (padded to k with -inf when n_r < k),
    then ONE ALL-GATHER over dp of m·k scores and m·k ids per replica, and
    every replica merges the dp·k candidates the same way (the blocks'
    vectors never move). ValueError, on every rank, if k exceeds the index."""
    total = sum(sizes_over_dp(ids_local.numel(), mesh, ids_local.device))
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= total:
        raise ValueError(f"k={k!r} must be an integer in [1, {total}] (the index holds {total} blocks)")
    scores, ids, _ = top_k(scores_local, ids_local, k)
    if mesh.dp == 1:
        return scores, ids
    pad = k - scores.shape[1]
    scores = all_gather(F.pad(scores, (0, pad), value=float("-inf")).contiguous(), mesh, "dp", 1)  # [m, dp·k]
    ids = all_gather(F.pad(ids, (0, pad), value=NO_ID).contiguous(), mesh, "dp", 1)
    return top_k(scores, ids, k)[:2]


# ---------------------------------------------------------------------------
# 10. Pipeline schedules as data: one list of actions per rank, built by one
#     function per schedule, replayed by a simulator with unit costs (and run
#     on real stages by the executor of section 11).
# ---------------------------------------------------------------------------


class Action(NamedTuple):
    """One step of a pipeline rank: kind "F" (forward), "B" (backward), or,
    split for zero-bubble, "I" (the input gradient, which the previous stage
    waits for) and "W" (the weight gradient, which nobody waits for); on
    microbatch `micro`, model chunk `chunk` (interleaving: rank r holds
    chunks c = 0..v-1, virtual stage c·p + r). Sends and receives are
    implied: a forward receives from the previous virtual stage and sends to
    the next, a backward (B or I) the other way."""

    kind: str
    micro: int
    chunk: int = 0


UNIT_COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # a backward costs two forwards; zero-bubble halves it


def _one_f_one_b(forwards: list, backwards: list, warmup: int) -> list[Action]:
    """warmup forwards, then alternate one forward and one backward, then the remaining backwards."""
    out, f, b = list(forwards[:warmup]), warmup, 0
    while f < len(forwards):
        out += [forwards[f], backwards[b]]
        f, b = f + 1, b + 1
    return out + backwards[b:]


def afab_schedule(p: int, m: int) -> list[list[Action]]:
    """All forwards, then all backwards (GPipe): every rank holds the
    activations of all m microbatches at its peak. Bubble (p - 1)/m."""
    return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]


def one_f_one_b_schedule(p: int, m: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): rank r runs p - r - 1 warmup forwards, then
    one forward and one backward in turn, then the rest of the backwards.
    The same bubble as AFAB, (p - 1)/m, but at most p microbatches in
    flight on any rank (rank r: p - r)."""
    return [_one_f_one_b([Action("F", i) for i in range(m)], [Action("B", i) for i in range(m)],
                         min(p - r - 1, m)) for r in range(p)]


def interleaved_schedule(p: int, m: int, v: int) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron's virtual pipeline): each rank holds v
    chunks of the layers; microbatches go through the chunks in groups of
    p (m a multiple of p). Warmup (p - r - 1)·2 + (v - 1)·p forwards.
    Bubble (p - 1)/(v·m), at the price of v times the point-to-point traffic."""
    if m % p:
        raise ValueError(f"interleaved 1F1B needs microbatches % pp == 0, got microbatches={m}, pp={p}")
    order = lambda k, backward: (k // (p * v) * p + k % p, (v - 1 - k // p % v) if backward else k // p % v)
    schedules = []
    for r in range(p):
        forwards = [Action("F", *order(k, False)) for k in range(m * v)]
        backwards = [Action("B", *order(k, True)) for k in range(m * v)]
        schedules.append(_one_f_one_b(forwards, backwards, min((p - r - 1) * 2 + (v - 1) * p, m * v)))
    return schedules


def zero_bubble_schedule(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2023): 1F1B with each backward split into I and W.
    The I passes keep 1F1B's order; a W is run whenever its rank would
    otherwise wait (for a forward input or a gradient still on its way), or
    when holding more activations would exceed 1F1B's p - r on rank r, and
    the rest at the end. The lists are built by replaying the unit costs, so
    they are the schedule the simulator then measures: the bubble falls from
    1F1B's (p - 1)/m to about a third of it, at the same peak memory."""
    base = [_one_f_one_b([Action("F", i) for i in range(m)], [Action("I", i) for i in range(m)],
                         min(p - r - 1, m)) for r in range(p)]
    out, pos, free, done = [[] for _ in range(p)], [0] * p, [0.0] * p, {}
    pending = [[] for _ in range(p)]  # microbatches whose I ran and whose W has not
    live = [0] * p  # forwards not yet weight-gradiented: the activations a rank holds

    def ready(r, a):  # when a's inputs are there, or None if not yet known
        if a.kind == "F":
            need = [("F", a.micro, r - 1)] if r > 0 else []
        else:  # I: its own forward, and the gradient from the next stage
            need = [("F", a.micro, r)] + ([("I", a.micro, r + 1)] if r < p - 1 else [])
        return None if any(n not in done for n in need) else max([0.0] + [done[n] for n in need])

    def run(r, a, t):
        out[r].append(a)
        free[r] = done[(a.kind, a.micro, r)] = t + UNIT_COST[a.kind]
        live[r] += {"F": 1, "W": -1}.get(a.kind, 0)
        if a.kind == "I":
            pending[r].append(a.micro)

    while any(pos[r] < len(base[r]) or pending[r] for r in range(p)):
        # the rank that can act earliest: one whose next action's inputs are known, or with a W to run
        nxt = {r: base[r][pos[r]] if pos[r] < len(base[r]) else None for r in range(p)}
        when = {r: None if nxt[r] is None else ready(r, nxt[r]) for r in range(p)}
        can = [r for r in range(p) if pending[r] or when[r] is not None]
        if not can:
            raise ValueError("zero-bubble construction deadlocked")
        r = min(can, key=lambda r: free[r])
        a, t_ready = nxt[r], when[r]
        full = a is not None and a.kind == "F" and live[r] >= p - r  # 1F1B's activation budget on rank r
        if t_ready is not None and not full and (t_ready <= free[r] or not pending[r]):
            run(r, a, max(free[r], t_ready))
            pos[r] += 1
        else:  # the next action would wait (or would exceed the budget): a W fills the gap
            run(r, Action("W", pending[r].pop(0)), free[r])
    return out


def simulate(schedules: list[list[Action]], v: int = 1, cost=None) -> dict:
    """Replay per-rank action lists with unit costs (a chunk's costs are 1/v
    of a stage's) and free communication; `cost`: other costs per kind, one
    dict for every rank or a list of one dict per rank (`cost.py` passes each
    stage's real forward and backward seconds). An action starts when its rank is
    free and its input is ready: F(i) of a virtual stage after F(i) of the
    previous one; B(i) or I(i) after B(i) / I(i) of the next one (the last
    stage's after its own F); W(i) after its own I(i). -> dict(start, end:
    {(rank, index): time}, makespan, busy per rank, bubble = the largest idle
    / busy time of a rank, peak in flight per rank: microbatch chunks
    forwarded whose activations the rank still holds (until B, or W)).
    ValueError if the lists deadlock."""
    p = len(schedules)
    costs = cost if isinstance(cost, list) else [cost or UNIT_COST] * p
    stage = lambda r, c: c * p + r  # virtual stage of chunk c on rank r
    last = p * v - 1
    done, start, end, free, pos = {}, {}, {}, [0.0] * p, [0] * p
    total = sum(len(s) for s in schedules)
    while len(end) < total:
        progressed = False
        for r in range(p):
            if pos[r] == len(schedules[r]):
                continue
            a = schedules[r][pos[r]]
            vs = stage(r, a.chunk)
            if a.kind == "F":
                need = [("F", a.micro, vs - 1)] if vs > 0 else []
            elif a.kind == "W":
                need = [("G", a.micro, vs)]
            else:  # B or I: the gradient from the next virtual stage
                need = [("F", a.micro, vs)] + ([("G", a.micro, vs + 1)] if vs < last else [])
            if any(n not in done for n in need):
                continue
            t0 = max([free[r]] + [done[n] for n in need])
            t1 = t0 + costs[r][a.kind] / v
            start[r, pos[r]], end[r, pos[r]] = t0, t1
            done[("G" if a.kind in ("B", "I") else a.kind, a.micro, vs)] = t1
            free[r], pos[r], progressed = t1, pos[r] + 1, True
        if not progressed:
            raise ValueError("the schedule deadlocks: every rank waits for an action no rank can run")
    makespan = max(end.values())
    busy = [sum(c[a.kind] / v for a in s) for s, c in zip(schedules, costs)]
    peak = []
    for s in schedules:
        live = high = 0
        for a in s:
            live += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
            high = max(high, live)
        peak.append(high)
    return dict(start=start, end=end, makespan=makespan, busy=busy,
                bubble=max((makespan - b) / b for b in busy), peak_in_flight=peak)


def format_schedule(schedules: list[list[Action]], v: int = 1, cost=None) -> str:
    """The simulated timeline as text, one row per rank, one column per 1/v
    unit of time: a forward shows its microbatch ("0", "1", ...), a backward
    the microbatch as a letter ("a" for 0, over two columns: it costs two
    forwards; zero-bubble's I one column, its W a "w"), chunk c > 0 adds c
    primes; idle time is ".". Then the bubble."""
    sim = simulate(schedules, v, cost)
    slots = round(sim["makespan"] * v)
    rows = []
    for r, s in enumerate(schedules):
        cells = ["."] * slots
        for i, a in enumerate(s):
            t0, t1 = round(sim["start"][r, i] * v), round(sim["end"][r, i] * v)
            mark = {"F": str(a.micro), "W": "w"}.get(a.kind, chr(ord("a") + a.micro)) + "'" * a.chunk
            for t in range(t0, t1):
                cells[t] = mark
        rows.append(f"rank {r} |" + "".join(f"{c:<3}" for c in cells).rstrip())
    return "\n".join(rows) + (f"\nbubble {sim['bubble']:.3f} of the compute time; peak in flight per rank "
                              f"{sim['peak_in_flight']}")


# ---------------------------------------------------------------------------
# 11. Pipeline execution: which layers a stage holds, point-to-point
#     transfers between neighbouring stages, and the executor that runs a
#     rank's action list (section 10) on its stages.
# ---------------------------------------------------------------------------


def stage_layers(layers: int, pp: int, v: int = 1) -> list[range]:
    """The layer ids of virtual stages 0 .. pp·v - 1: equal contiguous runs.
    Virtual stage c·pp + r is chunk c of pipeline rank r, so with v = 1
    rank r holds layers [r·L/pp, (r+1)·L/pp), and interleaved (v > 1) it
    holds v runs spread over the stack. ValueError unless pp·v divides L."""
    for name, n in (("pp", pp), ("virtual stages", v)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    if v > 1 and pp == 1:
        raise ValueError(f"virtual stages={v} needs pp > 1: interleaving spreads chunks over pipeline ranks")
    if layers % (pp * v):
        raise ValueError(f"layers={layers} cannot be cut into pp*virtual stages = {pp}*{v} = {pp * v} equal stages")
    per = layers // (pp * v)
    return [range(k * per, (k + 1) * per) for k in range(pp * v)]


# --- Point-to-point order: what each rank posts, checked as data ------------
#
# NCCL matches the transfers between two ranks by posting order alone (it has
# no tags), and a send may not complete before its receive is posted. So the
# executor does not post sends and receives as they come: it posts a plan,
# one `batch_isend_irecv` between two actions holding the previous action's
# send and the next action's receive (Megatron's send_forward_recv_backward /
# send_backward_recv_forward), waited on as a whole. `check_p2p_plans` proves,
# for every schedule the code builds, that the k-th send from rank a to rank b
# is the k-th receive b posts from a, and that no rank can wait forever.

P2P_TAGS = os.environ.get("NANOMEG_P2P_TAGS") == "1"  # a debugging aid: gloo then matches by tag, not order


class Message(NamedTuple):
    """One pipeline transfer as both ends name it: microbatch, the virtual
    stage that receives it, and its direction (an activation forward, or a
    gradient backward). Every message is [b_micro, s(/t), h]."""

    micro: int
    stage: int
    backward: bool


class Post(NamedTuple):
    """One side of a transfer: op "send" or "recv", the pipeline rank at the other end, the message."""

    op: str
    peer: int
    msg: Message


def _transfers(a: Action, rank: int, p: int, v: int) -> tuple[Post | None, Post | None]:
    """(what action a receives before it runs, what it sends after), either None.
    F on virtual stage vs receives from vs - 1 and sends to vs + 1; B and I the
    other way; W moves nothing. Virtual stage vs lives on rank vs % p."""
    if a.kind not in UNIT_COST:
        raise ValueError(f"unknown action kind {a.kind!r} (F, B, I or W)")
    vs, last = a.chunk * p + rank, p * v - 1
    if a.kind == "W":
        return None, None
    if a.kind == "F":
        recv = Post("recv", (vs - 1) % p, Message(a.micro, vs, False)) if vs > 0 else None
        return recv, Post("send", (vs + 1) % p, Message(a.micro, vs + 1, False)) if vs < last else None
    recv = Post("recv", (vs + 1) % p, Message(a.micro, vs, True)) if vs < last else None
    return recv, Post("send", (vs - 1) % p, Message(a.micro, vs - 1, True)) if vs > 0 else None


def p2p_plans(schedules: list[list[Action]], v: int = 1) -> list[list[list[list[Post]]]]:
    """What every pipeline rank posts around its actions, built by replaying
    the schedules together in rounds. In a round, each rank whose next
    action needs a message that its peer has already made gets it: the
    receive and its send are posted in that same round. Then each rank whose
    input is in (or needs none) runs its action, which may make a message
    to send. Every rank's posts of one round are one group: one
    batch_isend_irecv, waited on whole. So a send is posted only when its
    receive is (Megatron pairs them by hand: send_forward_recv_backward).

    -> plans[r][i]: the groups rank r posts just before its action i
    (i = len(actions): after the last one), each a list of `Post`s.
    ValueError if the schedules deadlock even with free transfers."""
    p = len(schedules)
    pos, outbox = [0] * p, [{} for _ in range(p)]  # outbox[r]: messages r made, not yet sent -> receiving rank
    plans = [[[] for _ in range(len(s) + 1)] for s in schedules]
    while any(pos[r] < len(schedules[r]) or outbox[r] for r in range(p)):
        groups, ready = [[] for _ in range(p)], []
        for r in range(p):
            if pos[r] == len(schedules[r]):
                continue
            recv, _ = _transfers(schedules[r][pos[r]], r, p, v)
            if recv is not None and recv.msg in outbox[recv.peer]:
                del outbox[recv.peer][recv.msg]
                groups[recv.peer].append(Post("send", r, recv.msg))
                groups[r].append(recv)
            if recv is None or groups[r] and groups[r][-1] == recv:
                ready.append(r)
        if not ready and not any(groups):
            waiting = {r: schedules[r][pos[r]] for r in range(p) if pos[r] < len(schedules[r])}
            raise ValueError(f"the schedule deadlocks: every rank waits for an input nobody has made: {waiting}")
        for r in range(p):
            if groups[r]:
                plans[r][pos[r]].append(groups[r])
        for r in ready:
            _, send = _transfers(schedules[r][pos[r]], r, p, v)
            if send is not None:
                outbox[r][send.msg] = send.peer
            pos[r] += 1
    return plans


def check_p2p_plans(plans: list[list[list[list[Post]]]]) -> None:
    """ValueError unless the ranks' plans (`p2p_plans`) are correct when
    transfers match by posting order alone and a send completes only once
    its receive is posted (NCCL's rules, no buffering); a rank runs its
    groups in order, blocked in each until every transfer in it has moved:

    1. for every pair a -> b, the messages a sends to b, in order, are the
       messages b receives from a, in order;
    2. replaying the groups, each transfer moving once both its ends are in
       their ranks' current groups, every rank reaches its end (no prefix
       of the posting order deadlocks)."""
    flat = [[group for groups in plan for group in groups] for plan in plans]
    sent, received = {}, {}  # (from, to) -> [(message, group index)]
    for r, groups in enumerate(flat):
        for g, group in enumerate(groups):
            for post in group:
                key = (r, post.peer) if post.op == "send" else (post.peer, r)
                (sent if post.op == "send" else received).setdefault(key, []).append((post.msg, g))
    partner = {}  # (rank, group index, op, message) -> the group index of its other end
    for a, b in sorted(set(sent) | set(received)):
        sends, recvs = sent.get((a, b), []), received.get((a, b), [])
        for k in range(max(len(sends), len(recvs))):
            if k >= len(sends) or k >= len(recvs) or sends[k][0] != recvs[k][0]:
                sent_k, received_k = (side[k][0] if k < len(side) else "nothing" for side in (sends, recvs))
                raise ValueError(f"pipeline ranks {a} -> {b}: transfer {k} is sent as {sent_k} but received as "
                                 f"{received_k}: matched by order, the two ends would trade the wrong tensors")
            partner[a, sends[k][1], "send", sends[k][0]] = recvs[k][1]
            partner[b, recvs[k][1], "recv", recvs[k][0]] = sends[k][1]
    at, moved, progressed = [0] * len(flat), set(), True
    other = {"send": "recv", "recv": "send"}
    while progressed:
        progressed = False
        for r, groups in enumerate(flat):
            while at[r] < len(groups):
                for post in groups[at[r]]:  # a transfer moves once both ends are posted: now, at the same time
                    if at[post.peer] == partner[r, at[r], post.op, post.msg]:
                        moved |= {(r, post.op, post.msg), (post.peer, other[post.op], post.msg)}
                if any((r, post.op, post.msg) not in moved for post in groups[at[r]]):
                    break
                at[r], progressed = at[r] + 1, True
    stuck = {r: flat[r][at[r]] for r in range(len(flat)) if at[r] < len(flat[r])}
    if stuck:
        raise ValueError(f"the point-to-point posts deadlock when a send waits for its receive: {stuck}")


def _tag(tag: int) -> int:
    """The tag a transfer is posted with: 0 (matched by order, as NCCL does) unless P2P_TAGS."""
    return tag if P2P_TAGS else 0


def _exchange(group: list[Post], outgoing: dict, shape, dtype, device, mesh: Mesh, stages: int, clock=None) -> dict:
    """Post one group of a plan as one batch_isend_irecv and wait for all of
    it: each send takes its message's tensor out of `outgoing` (made by an
    earlier action), each receive fills a fresh [shape] tensor.
    -> {message: tensor received}. clock["wait"] adds the seconds spent
    blocked: the bubble."""
    ops, got = [], {}
    for post in group:
        if post.op == "send":
            buf = outgoing.pop(post.msg).contiguous()
        else:
            buf = got[post.msg] = torch.empty(shape, dtype=dtype, device=device)
        _record(post.op, "pp", buf.numel(), "backward" if post.msg.backward else "forward", buf.dtype)
        tag = _tag(2 * (post.msg.micro * stages + post.msg.stage) + post.msg.backward)
        ops.append(dist.P2POp(dist.isend if post.op == "send" else dist.irecv, buf, mesh.global_rank(pp=post.peer),
                              tag=tag))
    what = " + ".join(f"{post.op} {'to' if post.op == 'send' else 'from'} rank {mesh.global_rank(pp=post.peer)}"
                      for post in group)
    t0 = time.perf_counter()
    wait_all(dist.batch_isend_irecv(ops), what)
    if clock is not None:
        clock["wait"] = clock.get("wait", 0.0) + time.perf_counter() - t0
    return got


def run_schedule(actions: list[Action], plan: list, forward, mesh: Mesh, *, v: int = 1, shape, dtype, device,
                 params_of=None, forward_only: bool = False, clock: dict | None = None) -> dict:
    """Run this rank's action list; return the summed loss contributions
    ({} on a rank without the last virtual stage).

    plan: this rank's `p2p_plans` entry, the groups of transfers to post
    before each action (and after the last), checked for all ranks by
    `check_p2p_plans` (`checked_schedule` returns both).

    forward(chunk, micro, x) -> chunk `chunk`'s output for microbatch
    `micro`: the activation [shape] for the next stage, or on the last
    virtual stage a dict of the microbatch's contributions to the step's
    losses ({"loss": scalar with its graph, metrics...}, each already
    weighted so that their sum over microbatches is the full batch's). x is
    None on the first virtual stage (it embeds), else the received activation.

    F: x from the previous virtual stage (shape [b_micro, s(/t), h]: under
       sequence parallel only this tp rank's sequence shard travels,
       Megatron's scatter-gather optimisation), run forward, send the output
       on; keep (x, output) for the backward: the activations in flight.
    B: dy from the next virtual stage, backward through the chunk (weights'
       grads accumulate in .grad), send dx = x.grad back.
    I: the input gradient only (the previous stage waits for it): dx by
       autograd.grad, keeping the graph for
    W: the weight gradients, backward(inputs=the chunk's params). PyTorch's
       autograd cannot stop halfway, so W walks the graph from the output
       again: the order and the numbers are zero-bubble's, the compute saving
       needs linears whose backward is split in two (ZB's WeightGradStore).
       params_of(chunk) -> the chunk's parameter tensors.
    forward_only (evaluation, under no_grad): F actions only, nothing kept.
    clock: a dict that gains "wait" (seconds blocked in transfers) and "run"
    (seconds of the whole list): the measured bubble is wait / (run - wait).
    With a list at clock["trace"], each action appends (kind, micro, chunk,
    waited from, ran from, ended), time.perf_counter seconds: the transfers
    posted before it, then the action (runlog.rank_trace reads them).

    Per step and stage boundary: m sends of b_micro·s(/t)·h elements forward
    and m back."""
    p, stages = mesh.pp, mesh.pp * v
    if len(plan) != len(actions) + 1:
        raise ValueError(f"a plan of {len(plan)} slots for {len(actions)} actions: pass p2p_plans' entry for them")
    held, weight_grads, totals, outgoing, got = {}, {}, {}, {}, {}
    post = lambda groups: [got.update(_exchange(g, outgoing, shape, dtype, device, mesh, stages, clock))
                           for g in groups]
    t_start, step = time.perf_counter(), WHERE["step"]
    trace = clock.get("trace") if clock is not None else None
    for i, (a, groups) in enumerate(zip(actions, plan)):
        at(step, f"action {i} of {len(actions)} {a.kind}(mb {a.micro}, chunk {a.chunk})")
        t_post = time.perf_counter()
        post(groups)
        t_action = time.perf_counter()
        recv, send = _transfers(a, mesh.pp_rank, p, v)
        x = None if recv is None else got.pop(recv.msg)
        if a.kind == "F":
            if x is not None and not forward_only:
                x.requires_grad_(True)
            y = forward(a.chunk, a.micro, x)
            if send is not None and (tuple(y.shape) != tuple(shape) or y.dtype != dtype):
                raise ValueError(f"stage {a.chunk * p + mesh.pp_rank} made {tuple(y.shape)} {y.dtype}, but the "
                                 f"stages exchange {tuple(shape)} {dtype}")
            if send is None:  # the last virtual stage: y holds the losses
                for k, val in y.items():
                    totals[k] = totals.get(k, 0.0) + val.detach()
                y = y["loss"]
            else:
                outgoing[send.msg] = y.detach()
            if not forward_only:
                held[a.micro, a.chunk] = (x, y)
        elif a.kind in ("B", "I"):
            (x_in, y), dy = held.pop((a.micro, a.chunk)), x
            if a.kind == "B":
                torch.autograd.backward(y, dy)
                dx = None if x_in is None else x_in.grad
            else:
                dx = None if x_in is None else torch.autograd.grad(y, x_in, dy, retain_graph=True)[0]
                weight_grads[a.micro, a.chunk] = (y, dy)
            if send is not None:
                outgoing[send.msg] = dx
        else:  # W
            y, dy = weight_grads.pop((a.micro, a.chunk))
            torch.autograd.backward(y, dy, inputs=list(params_of(a.chunk)))
        if trace is not None:
            trace.append((a.kind, a.micro, a.chunk, t_post, t_action, time.perf_counter()))
    at(step, f"action {len(actions)} of {len(actions)} (the last sends)")
    post(plan[-1])
    at(step)
    if clock is not None:
        clock["run"] = clock.get("run", 0.0) + time.perf_counter() - t_start
    if held or weight_grads:
        raise ValueError(f"the schedule left microbatches without backward: {sorted(held) + sorted(weight_grads)}")
    return totals


def pipeline_totals(totals: dict, keys: tuple, mesh: Mesh, device=None) -> dict:
    """The last stage's summed losses on every pipeline rank: one all-reduce
    over pp of len(keys) elements (the other stages contribute zeros)."""
    vec = torch.stack([torch.as_tensor(totals.get(k, 0.0), dtype=torch.float64, device=device) for k in keys])
    vec = all_reduce(vec, mesh, "pp", phase="after backward")
    return dict(zip(keys, vec))


def schedule_for(name: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """The action lists of a named schedule: afab, 1f1b, interleaved (v
    chunks per rank) or zb. ValueError naming the values for a bad combination."""
    if name == "interleaved":
        if v < 2:
            raise ValueError(f"schedule interleaved needs virtual stages >= 2, got {v}")
        return interleaved_schedule(p, m, v)
    if v != 1:
        raise ValueError(f"virtual stages={v} needs schedule interleaved, got {name!r}")
    builders = {"afab": afab_schedule, "1f1b": one_f_one_b_schedule, "zb": zero_bubble_schedule}
    if name not in builders:
        raise ValueError(f"unknown schedule {name!r}: choose afab, 1f1b, interleaved or zb")
    return builders[name](p, m)


def checked_schedule(name: str, p: int, m: int, v: int = 1, forward_only: bool = False) -> tuple[list, list]:
    """(schedules, plans): `schedule_for`'s action lists (only their forwards
    when forward_only) and every rank's `p2p_plans`, after `check_p2p_plans`
    has approved them: the executor posts nothing that could be mismatched
    or deadlock under NCCL's rules."""
    schedules = schedule_for(name, p, m, v)
    if forward_only:
        schedules = [[a for a in s if a.kind == "F"] for s in schedules]
    plans = p2p_plans(schedules, v)
    check_p2p_plans(plans)
    return schedules, plans


# ---------------------------------------------------------------------------
# 12. Data parallelism done properly: gradients in buckets, reduced while the
#     backward runs (Megatron's DistributedDataParallel), and ZeRO-1, the
#     optimizer state sharded over dp (Megatron's distributed optimizer).
# ---------------------------------------------------------------------------


def counted_numel(name: str, p: torch.Tensor, spec, mesh: Mesh, skip=()) -> int:
    """How many of p's elements this rank counts in a global norm: always
    its first ones, flattened (the rule of `clip_grad_norm`: replicated
    tensors on tp rank 0 only, replicated kv heads on their first replica,
    `skip`ped names nowhere; `HeadGroups.counted` and `Experts.counted` cut
    a leading slice of dim 0)."""
    if name in skip or (spec is None and mesh.tp_rank != 0):
        return 0
    return (spec.counted(p, mesh) if isinstance(spec, (HeadGroups, Experts)) else p).numel()


def grad_dtype_for(dtype: torch.dtype, grad_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a parameter's gradient accumulates in: grad_dtype where it is wider (more bytes an element)
    than the parameter's dtype (fp32 for bf16: Megatron's main_grad), else the parameter's own."""
    return grad_dtype if grad_dtype is not None and grad_dtype.itemsize > dtype.itemsize else dtype


def bucket_layout(params: dict, mesh: Mesh, *, bucket_mb: float = 25.0, zero: bool = False, tied=(),
                  experts=(), grad_dtype: torch.dtype | None = None) -> list[dict]:
    """Which gradients share a bucket, and over which dim it is reduced:
    `GradBuckets`' rule, from the tensors' numel, element size and dtype
    alone (params may live on the meta device: plan.py plans with them).
    -> [{names, dim, tied, numel, dtype}] in launch order: parameters in reverse
    (the backward's order), a new bucket when the next tensor would pass
    bucket_mb MB (of gradients, in their dtype: `grad_dtype_for`) or changes
    dtype; the dense gradients' buckets (over "dp",
    "dpcp" under cp), then the experts' (over "edp" when ep > 1), then the
    tied embedding's own (pp > 1). numel: padded to a multiple of the dim's
    size under ZeRO (`padded_numel`), the buffer `GradBuckets` allocates."""
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, numbers.Real) or not bucket_mb > 0:
        raise ValueError(f"bucket size must be a number of MB > 0, got {bucket_mb!r}")
    tied = [n for n in tied if n in params and mesh.pp > 1]  # the first and last stage's copies of one tensor
    limit, dense = bucket_mb * 2**20, "dpcp" if mesh.cp > 1 else "dp"  # context-parallel ranks average grads too
    dtype = lambda n: grad_dtype_for(params[n].dtype, grad_dtype)
    nbytes = lambda n: params[n].numel() * dtype(n).itemsize
    groups = []  # (names, dim, tied)
    for dim in ("dp", "edp"):  # the dense gradients' buckets, then the experts'
        names = [n for n in reversed(list(params)) if n not in tied and (n in experts) == (dim == "edp")]
        current, size = [], 0
        for n in names:
            if current and (size + nbytes(n) > limit or params[n].dtype != params[current[0]].dtype):
                groups.append((current, dim if mesh.ep > 1 else dense, False))
                current, size = [], 0
            current.append(n)
            size += nbytes(n)
        groups += [(current, dim if mesh.ep > 1 else dense, False)] if current else []
    groups += [(tied, dense, True)] if tied else []
    return [dict(names=names, dim=dim, tied=is_tied, dtype=dtype(names[0]),
                 numel=padded_numel(sum(params[n].numel() for n in names), mesh.size(dim) if zero else 1))
            for names, dim, is_tied in groups]


def padded_numel(numel: int, ranks: int) -> int:
    """numel rounded up to a multiple of ranks: a bucket's buffer, cut into equal ZeRO slices."""
    return -(-numel // ranks) * ranks


class GradBuckets:
    """Every gradient of this rank lives in a flat bucket; a bucket is reduced
    over dp as soon as its last gradient is in, while the backward goes on.

    Parameters are bucketed in reverse order (the backward produces the last
    layers' gradients first), up to `bucket_mb` MB a bucket. A bucket holds
    gradients in the parameters' dtype, or in `grad_dtype` where that is
    wider (`grad_dtype_for`: fp32 for bf16 parameters, Megatron's
    accumulate_allreduce_grads_in_fp32). `grads` ({name: its place in its
    bucket}) is where every reader finds a parameter's gradient after the
    backward, in both modes:
    * same dtype: each p.grad is that view, so autograd accumulates in place.
      Whatever detaches a p.grad from its view (a torch optimizer's
      zero_grad() sets it to None; so may the user), `_attach` puts its value
      into the view and the view back into p.grad, before the bucket is
      reduced: in the hook after each accumulation, and in finish() for a
      parameter no backward reached (None counts as zeros);
    * wider (Megatron's main_grad; torch allows no p.grad of another dtype):
      autograd makes a new bf16 p.grad each backward, the hook adds it into
      the fp32 view and sets p.grad = None (freeing it at once), so the view
      holds the fp32 sum of the microbatches' bf16 gradients; p.grad stays None.
    A post-accumulate-grad hook counts each parameter's gradients: when every
    parameter of a bucket has had its `accumulations`-th (one per
    microbatch), the bucket's collective is launched asynchronously, in the
    bucket's dtype:
    * zero=False: an all-reduce of the bucket (its numel elements over dp);
    * zero=True (ZeRO-1): a reduce-scatter; rank d keeps the d-th 1/dp slice
      of the bucket, the one its optimizer shard updates (its "shard"; with
      zero=False the shard is the whole bucket).
    `finish()` (before the optimizer) launches what the backward did not
    complete, waits, and divides by dp: the gradients are then the mean over
    the replicas. `tied` names (a tied embedding held by the first and last
    stage) get a bucket of their own, launched by finish() after one
    all-reduce over the embedding group sums the two stages' copies: their
    layout is then the same on both stages, so even their ZeRO shards match.
    `experts` names (tensors of a mixture-of-experts layer's experts, spec
    `Experts`) get buckets of their own, reduced over the "edp" group only:
    the dp ranks that hold the same experts (each of them already summed,
    through the all-to-all's backward, the gradient from its ep group's
    tokens). They too are divided by dp: the mean over every replica's loss.
    """

    def __init__(self, params: dict, mesh: Mesh, *, bucket_mb: float = 25.0, zero: bool = False,
                 accumulations: int = 1, tied=(), experts=(), grad_dtype: torch.dtype | None = None):
        if isinstance(accumulations, bool) or not isinstance(accumulations, int) or accumulations < 1:
            raise ValueError(f"accumulations must be an integer >= 1, got {accumulations!r}")
        if grad_dtype is not None and not (isinstance(grad_dtype, torch.dtype) and grad_dtype.is_floating_point):
            raise ValueError(f"grad_dtype must be a floating torch dtype or None, got {grad_dtype!r}")
        self.mesh, self.zero, self.accumulations = mesh, zero, accumulations
        self.params = params
        self.grads = {}  # {name: its gradient's place in its bucket (p.grad itself when the dtypes agree)}
        tied = tied if mesh.group("embed") is not None else ()  # (a mesh made by hand may have no embed group)
        self.buckets = [self._bucket(b["names"], tied=b["tied"], dim=b["dim"], dtype=b["dtype"])
                        for b in bucket_layout(params, mesh, bucket_mb=bucket_mb, zero=zero, tied=tied,
                                               experts=experts, grad_dtype=grad_dtype)]
        self.bucket_of = {n: b for b in self.buckets for n in b["names"]}
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params.values()]
        self.name_of = {id(p): n for n, p in params.items()}
        self.zero_grad()

    def _bucket(self, names: list, tied: bool, dim: str, dtype: torch.dtype) -> dict:
        """A flat buffer (of dtype) holding names' gradients, reduced over mesh dim `dim` (dp, or edp for
        experts), padded to a multiple of its size (reduce-scatter needs equal slices: `padded_numel`)."""
        sizes = [self.params[n].numel() for n in names]
        n_ranks, rank = (self.mesh.size(dim), self.mesh.rank(dim)) if self.zero else (1, 0)  # all-reduce: all is ours
        total = padded_numel(sum(sizes), n_ranks)
        buf = torch.zeros(total, dtype=dtype, device=self.params[names[0]].device)
        offsets = [sum(sizes[:i]) for i in range(len(names))]
        for n, off, size in zip(names, offsets, sizes):
            self.grads[n] = buf[off: off + size].view_as(self.params[n])
            if dtype == self.params[n].dtype:
                self.params[n].grad = self.grads[n]
        shard = total // n_ranks
        return dict(names=names, offsets=offsets, sizes=sizes, buf=buf, tied=tied, dim=dim,
                    shard=buf[rank * shard: (rank + 1) * shard],
                    lo=rank * shard, work=None, launched=False, ready=0)

    def _attach(self, name: str) -> None:
        """Bring p.grad into the bucket. Same dtype: make p.grad the bucket's view again, keeping its value
        (None: zeros). Wider: add p.grad (this backward's gradient) into the view, p.grad = None."""
        p, view = self.params[name], self.grads[name]
        if view.dtype != p.dtype:
            if p.grad is not None:
                view.add_(p.grad)
                p.grad = None
            return
        if p.grad is None:
            view.zero_()
        elif p.grad is not view:
            view.copy_(p.grad)
        p.grad = view

    def _on_grad(self, p: torch.Tensor) -> None:
        name = self.name_of[id(p)]
        self._attach(name)  # autograd made a new p.grad if it was None (a torch optimizer's zero_grad; fp32 grads)
        self.count[name] += 1
        bucket = self.bucket_of[name]
        if self.count[name] == self.accumulations:
            bucket["ready"] += 1
            if bucket["ready"] == len(bucket["names"]) and not bucket["tied"]:
                self._launch(bucket, "backward")

    def _launch(self, bucket: dict, phase: str) -> None:
        """Start the bucket's collective over dp (edp for experts) without waiting for it."""
        bucket["launched"] = True
        group = self.mesh.group(bucket["dim"])
        if group is None:
            return
        buf = bucket["buf"]
        if self.zero:  # this rank keeps slice dp_rank; the other slices of its buffer are now stale
            _record("reduce_scatter", bucket["dim"], buf.numel(), phase, buf.dtype)
            out = torch.empty_like(bucket["shard"])
            bucket["work"] = (dist.reduce_scatter_single(out, buf, group=group, async_op=True), out)
        else:
            _record("all_reduce", bucket["dim"], buf.numel(), phase, buf.dtype)
            bucket["work"] = (dist.all_reduce(buf, group=group, async_op=True), None)

    def finish(self) -> None:
        """Complete every bucket's reduction and average over dp (call after the last backward)."""
        for bucket in self.buckets:
            if not bucket["launched"]:  # some parameter's hook did not run: its p.grad may be None or detached
                for name in bucket["names"]:
                    self._attach(name)
            if bucket["tied"]:  # the first and last stage's copies of the tied embedding: sum them first
                group = self.mesh.group("embed")
                _record("all_reduce", "embed", bucket["buf"].numel(), "after backward", bucket["buf"].dtype)
                with waiting("all_reduce over embed"):
                    dist.all_reduce(bucket["buf"], group=group)
            if not bucket["launched"]:
                self._launch(bucket, "after backward")
        for bucket in self.buckets:
            if bucket["work"] is not None:
                work, out = bucket["work"]
                wait_all([work], f"a gradient bucket's {'reduce_scatter' if self.zero else 'all_reduce'} over "
                                 f"{bucket['dim']}")
                if out is not None:
                    bucket["shard"].copy_(out)
            bucket["shard" if self.zero else "buf"].div_(self.mesh.dp * self.mesh.cp)
            bucket["work"], bucket["launched"], bucket["ready"] = None, False, 0
        self.count = dict.fromkeys(self.params, 0)

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket["buf"].zero_()
            bucket["work"], bucket["launched"], bucket["ready"] = None, False, 0
        self.count = dict.fromkeys(self.params, 0)

    def remove(self) -> None:
        """Detach the hooks (the gradients' views stay)."""
        for h in self.hooks:
            h.remove()


def grad_norm_sq(params: dict, specs: dict, mesh: Mesh, skip=(), grads: dict | None = None) -> torch.Tensor:
    """This (tp, pp) coordinate's counted share of the global squared gradient
    norm (float64 scalar): the experts' part summed over ep (each ep rank holds
    other experts; one all-reduce of 1 element), the rest as it is (the same
    on every ep rank). grads: {name: gradient} (`GradBuckets.grads`), else each p.grad."""
    device = next(iter(params.values())).device
    grads = grads if grads is not None else {name: p.grad for name, p in params.items()}
    sq = {False: torch.zeros((), dtype=torch.float64, device=device), True: 0}
    for name, p in params.items():
        if grads[name] is not None:
            expert = isinstance(specs[name], Experts)
            counted = grads[name].reshape(-1)[: counted_numel(name, p, specs[name], mesh, skip)]
            sq[expert] = sq[expert] + counted.double().pow(2).sum()
    if mesh.ep > 1:
        sq[True] = all_reduce(torch.as_tensor(sq[True], dtype=torch.float64, device=device), mesh, "ep",
                              phase="after backward")
    return sq[False] + sq[True]


class ZeroAdamW:
    """ZeRO-1: AdamW whose state is sharded over dp (Megatron's distributed optimizer).

    Rank d owns slice d of every bucket of `GradBuckets(zero=True)`: the
    main (fp32, or float64 for float64 models) copy of those parameter
    elements, and their two AdamW moments. A step:
      1. the gradients were reduce-scattered by the buckets: rank d holds the
         dp-mean gradient of its slice only (in the buckets' dtype: fp32 for
         bf16 parameters under `GradBuckets(grad_dtype=torch.float32)`);
      2. the global norm from the slices (squares summed over dp, tp, pp), clip;
      3. AdamW on the slice, in the main precision (torch.optim.AdamW's formula);
      4. all-gather each bucket's updated slices over dp (its numel elements)
         and copy them into the model parameters, in their own dtype (bf16 stays bf16).
    Optimizer state per rank: the main copy and 2 moments of its slices, and
    nothing else (12 B an element, 24 for float64 models): 1/dp of the
    unsharded optimizer's (1/edp for the experts' buckets), up to the padding.
    `decay(name, p)` says which tensors get weight decay (train.py: matrices
    only); where they, and the elements the norm counts, lie in the slices is
    kept as ranges (`_my_ranges`), not masks. `state_bytes()` measures it.

    Over `GradBuckets(zero=False)` (all-reduced: every dp rank holds the
    whole buckets) the same class is plain AdamW with an fp32 main copy, for
    bf16 parameters without ZeRO (train.py --bf16, Megatron's
    Float16OptimizerWithFloat16Params): each rank's "slice" is the whole
    bucket, the norm is `clip_grad_norm`'s and nothing is all-gathered.
    """

    def __init__(self, params: dict, buckets: GradBuckets, specs: dict, mesh: Mesh, *, lr: float,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, decay=None, skip=()):
        self.params, self.buckets, self.mesh, self.specs, self.skip = params, buckets, mesh, specs, skip
        self.lr, self.betas, self.eps, self.weight_decay, self.steps = lr, betas, eps, weight_decay, 0
        decay = decay or (lambda name, p: p.dim() >= 2)
        self.state, self.decayed, self.counted = [], [], []  # per bucket: tensors; slices of the slice
        for b in buckets.buckets:
            dtype = torch.float64 if b["buf"].dtype == torch.float64 else torch.float32
            with torch.no_grad():
                main = self._my_slice(b, lambda name: params[name].detach(), dtype)
            self.state.append(dict(main=main, exp_avg=torch.zeros_like(main), exp_avg_sq=torch.zeros_like(main)))
            decayed = lambda name: params[name].numel() if decay(name, params[name]) else 0
            counted = lambda name: counted_numel(name, params[name], specs[name], mesh, skip)
            self.decayed.append(self._my_ranges(b, decayed))
            self.counted.append(self._my_ranges(b, counted))

    @staticmethod
    def _my_slice(bucket: dict, per_name, dtype) -> torch.Tensor:
        """per_name(name) for the bucket's tensors, laid out as its buffer (padding 0), this rank's slice only."""
        pad = bucket["buf"].numel() - sum(bucket["sizes"])
        flat = torch.cat([per_name(n).reshape(-1).to(dtype) for n in bucket["names"]] +
                         [torch.zeros(pad, dtype=dtype, device=bucket["buf"].device)])
        return flat[bucket["lo"]: bucket["lo"] + bucket["shard"].numel()].clone()

    @staticmethod
    def _my_ranges(bucket: dict, first) -> list[slice]:
        """Where the first first(name) elements of each of the bucket's tensors
        lie in this rank's slice: slices of the slice, empty ones left out."""
        lo, hi = bucket["lo"], bucket["lo"] + bucket["shard"].numel()
        spans = [(max(off, lo), min(off + first(name), hi)) for name, off in zip(bucket["names"], bucket["offsets"])]
        return [slice(a - lo, b - lo) for a, b in spans if a < b]

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global grad norm from the slices (one all-reduce of 1 element
        over dp, tp and pp each); scale the slices to max_norm (0: no clipping)."""
        if not self.buckets.zero:  # whole buckets: the gradients are their views
            return clip_grad_norm(self.params, self.specs, self.mesh, max_norm, skip=self.skip,
                                  grads=self.buckets.grads)
        check_max_norm(max_norm)  # before the collectives: every rank refuses alike
        sq = torch.zeros((), dtype=torch.float64, device=self.buckets.buckets[0]["buf"].device)
        for ranges, b in zip(self.counted, self.buckets.buckets):
            for r in ranges:
                sq = sq + b["shard"][r].double().pow(2).sum()
        for dim in ("dpcp" if self.mesh.cp > 1 else "dp", "tp", "pp"):
            sq = all_reduce(sq, self.mesh, dim, phase="after backward")
        norm = sq.sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for b in self.buckets.buckets:
                b["shard"].mul_(scale.to(b["shard"].dtype))
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's habit, here: zero the buckets (the gradients live there whatever set_to_none says)."""
        self.buckets.zero_grad()

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        self.steps += 1
        beta1, beta2 = self.betas
        c1, c2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for s, decayed, b in zip(self.state, self.decayed, self.buckets.buckets):
            g = b["shard"].to(s["main"].dtype)
            for r in decayed:
                s["main"][r].mul_(1 - lr * self.weight_decay)
            s["exp_avg"].lerp_(g, 1 - beta1)
            s["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (s["exp_avg_sq"].sqrt() / math.sqrt(c2)).add_(self.eps)
            s["main"].addcdiv_(s["exp_avg"], denom, value=-lr / c1)
            full = s["main"].to(self.params[b["names"][0]].dtype)  # all-gathered in the parameters' dtype
            if self.buckets.zero:
                full = all_gather(full, self.mesh, b["dim"], 0, phase="optimizer")
            for name, off, size in zip(b["names"], b["offsets"], b["sizes"]):
                self.params[name].copy_(full[off: off + size].view_as(self.params[name]))

    def gather_state(self) -> dict:
        """{name: (exp_avg, exp_avg_sq)} for every parameter, whole on every
        dp rank: each bucket's moment slices all-gathered over dp (2 x its
        numel elements). For a checkpoint, as Megatron's distributed optimizer
        gathers its state to dp rank 0 (the "dp_zero" format)."""
        return self._gather(("exp_avg", "exp_avg_sq"))

    def gather_main(self) -> dict:
        """{name: its main (fp32) copy}, whole on every dp rank (all-gathered as gather_state):
        what a checkpoint saves as the parameters when they are bf16."""
        return {name: t for name, (t,) in self._gather(("main",)).items()}

    def _gather(self, keys) -> dict:
        """{name: (state[k] for k in keys)}, each the parameter's shape, whole (all-gathered over dp with ZeRO)."""
        out = {}
        for s, b in zip(self.state, self.buckets.buckets):
            whole = [all_gather(s[k], self.mesh, b["dim"], 0, phase="checkpoint") if self.buckets.zero else s[k]
                     for k in keys]
            for name, off, size in zip(b["names"], b["offsets"], b["sizes"]):
                shape = self.params[name].shape
                out[name] = tuple(m[off: off + size].view(shape).clone() for m in whole)
        return out

    @torch.no_grad()
    def load_state(self, moments: dict, steps: int, main: dict | None = None) -> None:
        """Set the step count and, from {name: (exp_avg, exp_avg_sq)} whole
        per parameter, this rank's slices; the main copy from `main` ({name:
        whole tensor}, then copied into the parameters too), else from the parameters."""
        self.steps = steps
        source = main or {name: p.detach() for name, p in self.params.items()}
        for s, b in zip(self.state, self.buckets.buckets):
            s["main"].copy_(self._my_slice(b, lambda name: source[name], s["main"].dtype))
            if main:
                for name in b["names"]:
                    self.params[name].copy_(main[name])
            for i, k in enumerate(("exp_avg", "exp_avg_sq")):
                s[k].copy_(self._my_slice(b, lambda name, i=i: moments[name][i], s[k].dtype))

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank, measured: the storage of every
        tensor it holds, each storage once (the main copy and two moments)."""
        held = [t.untyped_storage() for s in self.state for t in s.values()]
        return sum({u.data_ptr(): u.nbytes() for u in held}.values())


# ---------------------------------------------------------------------------
# 13. Checkpoints: each rank writes the pieces it holds, in the coordinates of
#     the full (unpadded) tensors, with torch.distributed.checkpoint; a load
#     reads whichever saved pieces overlap what the loading rank holds, so a
#     checkpoint saved at one (tp, pp, dp, ZeRO) layout loads into any other.
# ---------------------------------------------------------------------------


class Piece(NamedTuple):
    """A rectangle of a tensor that a rank holds: local[local_at + i] is
    full[full_at + i] for i < size (per dim). `writer`: the one rank that
    saves it (a replicated piece is held by many, written once)."""

    local_at: tuple
    full_at: tuple
    size: tuple
    writer: bool


def pieces(shape: tuple, spec, mesh: Mesh, real_rows: int | None = None) -> list[Piece]:
    """The rectangles of the full tensor that this rank's tp (and, for
    `Experts`, ep) shard of `shape` (local) holds, per `spec` (as `shard` cuts it). real_rows: a
    vocabulary-padded tensor's real row count: rows beyond it are padding,
    never saved, and the full tensor of a checkpoint is [real_rows, ...]."""
    shape = tuple(shape)
    zeros = (0,) * len(shape)

    def clip(local_at, full_at, size, writer):
        if real_rows is not None:  # drop the padded vocabulary rows
            size = (max(0, min(size[0], real_rows - full_at[0])),) + size[1:]
        return [Piece(local_at, full_at, size, writer)] if size[0] > 0 else []

    if spec is None:
        return clip(zeros, zeros, shape, mesh.tp_rank == 0)
    if isinstance(spec, Experts):  # experts [e·E/ep, ...) and, if split, this tp rank's part of tp_dim
        full_at = [mesh.ep_rank * shape[0]] + [0] * (len(shape) - 1)
        if spec.tp_dim is not None:
            full_at[spec.tp_dim] = mesh.tp_rank * shape[spec.tp_dim]
        return [Piece(zeros, tuple(full_at), shape, spec.tp_dim is not None or mesh.tp_rank == 0)]
    if isinstance(spec, HeadGroups):
        rep = spec.replicas(mesh.tp)
        if rep == 1:
            return clip(zeros, (mesh.tp_rank * shape[0],) + zeros[1:], shape, True)
        group, j = divmod(mesh.tp_rank, rep)
        d, per_group = spec.head_dim, (spec.q_per_group + 2) * spec.head_dim
        q_rows = spec.q_per_group // rep * d
        rest = shape[1:]
        return [Piece(zeros, (group * per_group + j * q_rows,) + zeros[1:], (q_rows,) + rest, True),
                Piece((q_rows,) + zeros[1:], (group * per_group + spec.q_per_group * d,) + zeros[1:],
                      (2 * d,) + rest, j == 0)]  # k, v: replicated over the group's rep ranks
    full_at = list(zeros)
    full_at[spec] = mesh.tp_rank * shape[spec]
    return clip(zeros, tuple(full_at), shape, True)


def full_shape_of(shape: tuple, spec, mesh: Mesh, real_rows: int | None = None) -> tuple:
    """The saved full shape of a tensor whose tp shard is `shape`."""
    full = list(shape)
    if isinstance(spec, Experts):
        full[0] *= mesh.ep
        if spec.tp_dim is not None:
            full[spec.tp_dim] *= mesh.tp
    elif isinstance(spec, HeadGroups):
        full[0] = spec.groups * (spec.q_per_group + 2) * spec.head_dim
    elif spec is not None:
        full[spec] *= mesh.tp
    if real_rows is not None:
        full[0] = real_rows
    return tuple(full)


def _region(at: tuple, size: tuple) -> tuple:
    return tuple(slice(a, a + n) for a, n in zip(at, size))


def _overlap(a_at, a_size, b_at, b_size):
    """The intersection of two rectangles (full coordinates) as (at, size), or None."""
    lo = [max(x, y) for x, y in zip(a_at, b_at)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a_at, a_size, b_at, b_size)]
    return None if any(h <= l for l, h in zip(lo, hi)) else (tuple(lo), tuple(h - l for l, h in zip(lo, hi)))


# Every global the unpickler of a nanomeg checkpoint's .metadata may ask for,
# as (module, name) pairs: what DCP pickles for these checkpoints (listed by
# saving them and recording the unpickler's requests), nothing else. A name
# is never looked up under a module's other names (pickle resolves a dotted
# name, "os.system", through the module's attributes).
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
CHECKPOINT_GLOBALS = frozenset({
    *((_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                   "TensorProperties", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a tensor's layout, by its name ("torch.strided")
    ("torch", "Size"),
    *(("torch", n) for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                             "uint8", "bool")),  # dtypes: values, not callables
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # the save's checkpoint_id (3.13 names it _local)
})


def _refuse(what: str):
    """Raise the one-line refusal of a checkpoint's metadata."""
    import pickle

    raise pickle.UnpicklingError(f"checkpoint metadata {what}: refused (a nanomeg checkpoint's .metadata holds "
                                 "only DCP's tensor metadata)")


def check_dcp_metadata(md) -> None:
    """What the unpickler built must be the shape DCP gives a nanomeg
    checkpoint: a Metadata of tensor entries whose data lie in plain files of
    the checkpoint's own folder. Allowed types called with odd arguments
    (a path out of the folder, a "bytes" entry DCP would torch.load
    unsafely, a Size where a dict belongs) are refused here, one line."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    def sizes(x):
        return isinstance(x, torch.Size) and all(isinstance(n, int) and n >= 0 for n in x)

    if type(md) is not Metadata:
        _refuse(f"is a {type(md).__name__}, not DCP's Metadata")
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        _refuse("has no dicts of entries and files")
    if md.storage_meta is not None and type(md.storage_meta) is not StorageMeta:
        _refuse(f"has a {type(md.storage_meta).__name__} for its StorageMeta")
    for fqn, t in md.state_dict_metadata.items():
        if type(t) is not TensorStorageMetadata:
            _refuse(f"declares entry {str(fqn)[:100]!r} a {type(t).__name__}, not a tensor")
        if type(t.properties) is not TensorProperties or not isinstance(t.properties.dtype, torch.dtype) or \
                not sizes(t.size) or not isinstance(t.chunks, list) or \
                any(type(c) is not ChunkStorageMetadata or not sizes(c.offsets) or not sizes(c.sizes)
                    for c in t.chunks):
            _refuse(f"describes tensor {str(fqn)[:100]!r} with values of the wrong types")
    for idx, info in md.storage_data.items():
        if type(idx) is not MetadataIndex or type(info) is not _StorageInfo:
            _refuse(f"maps {type(idx).__name__} to {type(info).__name__}, not an entry to its file")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name:
            _refuse(f"puts {idx.fqn!r} in {name!r}, not a file of the checkpoint's folder")
        if not all(isinstance(n, int) and n >= 0 for n in (info.offset, info.length)):
            _refuse(f"puts {idx.fqn!r} at offset {info.offset!r}, length {info.length!r}")


class SafeReader:
    """`FileSystemReader` that reads a checkpoint's DCP metadata (.metadata,
    a pickle) without running code from it: its unpickler finds only the
    (module, name) pairs of CHECKPOINT_GLOBALS, and what it builds must
    pass `check_dcp_metadata`, so the one route by which DCP would unpickle
    data unsafely (a "bytes" entry, torch.load(weights_only=False)) is shut
    too; the tensors are read by DCP with torch.load(weights_only=True).
    Only the global .metadata nanomeg writes is read (never a rank-local
    __N.metadata, DCP's fallback); it is read once and kept."""

    def __new__(cls, path):
        import pickle

        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import StorageMeta

        class _Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in CHECKPOINT_GLOBALS:
                    _refuse(f"refers to {module}.{name}")
                return super().find_class(module, name)

        class _Reader(FileSystemReader):
            safe_metadata = None

            def read_metadata(self, *args, **kwargs):
                if kwargs.get("rank") is not None:
                    _refuse(f"asked for rank {kwargs['rank']}'s own __{kwargs['rank']}.metadata")
                if self.safe_metadata is None:
                    with self.fs.create_stream(self._get_metadata_path(), "rb") as f:
                        try:
                            metadata = _Unpickler(f).load()
                        except pickle.UnpicklingError:
                            raise
                        except Exception as e:  # an allowed type given arguments it rejects, a cut file, ...
                            _refuse(f"cannot be read ({type(e).__name__}: {str(e)[:200]})")
                    check_dcp_metadata(metadata)
                    if metadata.storage_meta is None:
                        metadata.storage_meta = StorageMeta()
                    metadata.storage_meta.load_id = self.load_id
                    self.safe_metadata = metadata
                return self.safe_metadata

        return _Reader(path)


def save_pieces(path, tensors: dict, mesh: Mesh, process_group=None) -> dict:
    """Write this rank's pieces of `tensors` ({key: (local tensor, pieces,
    full shape)}; a key names a tensor, e.g. "param/layers.0.attn.qkv.weight")
    into the DCP checkpoint folder `path`; each piece is its own DCP entry
    "key@offsets", written by its writer rank only. Collective over the
    default group (every rank calls it). Returns this rank's index
    {entry: {key, at, size, full}} (the caller gathers the ranks' indexes into
    the checkpoint's JSON metadata)."""
    import torch.distributed.checkpoint as dcp

    state, index = {}, {}
    for key, (local, ps, full) in tensors.items():
        for p in ps:
            if p.writer and all(n > 0 for n in p.size):
                entry = f"{key}@{','.join(map(str, p.full_at))}"
                state[entry] = local.detach()[_region(p.local_at, p.size)].contiguous().cpu()
                index[entry] = dict(key=key, at=list(p.full_at), size=list(p.size), full=list(full))
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group, as asked
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=True),
                 process_group=process_group, no_dist=not dist.is_initialized())
    return index


def check_index(index) -> None:
    """A checkpoint's index ({entry: {key, at, size, full}}, from its
    meta.json) is data from a file: ValueError, naming the entry, unless
    each is a rectangle of non-negative ints inside its full tensor, named
    "key@at" as `save_pieces` names it."""
    def ints(x):
        return isinstance(x, list) and len(x) <= 8 and all(type(n) is int and n >= 0 for n in x)

    if not isinstance(index, dict):
        raise ValueError(f"the index is a {type(index).__name__}, not an object")
    for entry, m in index.items():
        if not (isinstance(m, dict) and isinstance(m.get("key"), str)
                and all(ints(m.get(k)) for k in ("at", "size", "full"))
                and len(m["at"]) == len(m["size"]) == len(m["full"])):
            raise ValueError(f"index entry {entry!r} is not {{key, at, size, full}} with lists of non-negative ints "
                             f"of one length: {str(m)[:200]}")
        if any(a + n > f for a, n, f in zip(m["at"], m["size"], m["full"])) or \
                entry != f"{m['key']}@{','.join(map(str, m['at']))}":
            raise ValueError(f"index entry {entry!r}: a piece at {m['at']} of size {m['size']} is not inside "
                             f"{m['key']!r} {m['full']} under that name")


def _hole(key: str, full: tuple, p: Piece, seen: torch.Tensor) -> str:
    """The error for a piece that the saved entries leave partly unread: the
    tensor, how many elements, and the box (full coordinates) they lie in."""
    missing = (~seen).nonzero()
    lo = [int(v) + a for v, a in zip(missing.min(0).values, p.full_at)]
    hi = [int(v) + a + 1 for v, a in zip(missing.max(0).values, p.full_at)]
    return (f"checkpoint does not hold all of {key!r} {tuple(full)}: {len(missing)} element(s) in no saved piece, "
            f"within [{', '.join(f'{a}:{b}' for a, b in zip(lo, hi))}]")


def _read_plan(wanted: dict, index: dict) -> tuple[list, dict]:
    """What a load copies: [(local tensor, its region's start, entry, the
    entry's region start, size)] and the entries to read {entry: full size
    of the entry}. ValueError when a saved tensor has another full shape or
    when the saved entries leave any element of a wanted piece unread
    (checked element by element: saved pieces may overlap)."""
    by_key = {}
    for entry, meta in index.items():
        by_key.setdefault(meta["key"], []).append((entry, meta))
    plan, reads = [], {}
    for key, (local, ps, full) in wanted.items():
        saved = by_key.get(key, [])
        other = next((m["full"] for _, m in saved if list(m["full"]) != list(full)), None)
        if other is not None:
            raise ValueError(f"checkpoint tensor {key!r} is {tuple(other)}, this model's is {tuple(full)}")
        for p in ps:
            seen = torch.zeros(p.size, dtype=torch.bool)
            for entry, meta in saved:
                hit = _overlap(p.full_at, p.size, meta["at"], meta["size"])
                if hit is None:
                    continue
                at, size = hit
                seen[_region(tuple(a - f for a, f in zip(at, p.full_at)), size)] = True
                reads[entry] = meta["size"]
                plan.append((local, tuple(a - f + la for a, f, la in zip(at, p.full_at, p.local_at)), entry,
                             tuple(a - s for a, s in zip(at, meta["at"])), size))
            if not seen.all():
                raise ValueError(_hole(key, full, p, seen))
    return plan, reads


def _read_dcp_metadata(reader):
    """The checkpoint's DCP metadata, read (once) by SafeReader before DCP
    asks for it: a missing or refused .metadata is one ValueError, not DCP's
    fallback to rank-local files and the tracebacks it logs on the way."""
    import pickle

    try:
        return reader.read_metadata()
    except FileNotFoundError:
        raise ValueError("no .metadata (DCP's index of the saved pieces): not a whole checkpoint") from None
    except (pickle.UnpicklingError, OSError) as e:
        raise ValueError(f".metadata: {e}") from None


def _check_entries(path, md, reads: dict) -> None:
    """Each entry this load reads is in DCP's metadata at the size meta.json
    gives, and its bytes lie in a file of the folder that is long enough."""
    files = {}
    for idx, info in md.storage_data.items():
        files.setdefault(idx.fqn, []).append(info)
    for entry, size in reads.items():
        t = md.state_dict_metadata.get(entry)
        if t is None or list(t.size) != list(size):
            found = "not there" if t is None else f"{tuple(t.size)} there"
            raise ValueError(f"meta.json's piece {entry!r} {tuple(size)} is {found} in .metadata")
        for info in files.get(entry, []):
            f = os.path.join(path, info.relative_path)
            have = os.path.getsize(f) if os.path.isfile(f) else None
            if have is None or have < info.offset + info.length:
                raise ValueError(f"the data file {info.relative_path} of {entry!r} is "
                                 + ("missing" if have is None else f"{have} bytes, cut short of "
                                    f"{info.offset + info.length}"))


def _dcp_failure(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (a
    (exception, traceback) pair, or an object with .exc, by torch version)."""
    for failure in getattr(e, "failures", {}).values():
        failure = failure[0] if isinstance(failure, tuple) else getattr(failure, "exc", failure)
        if isinstance(failure, BaseException):
            return failure
    return e


def _raise_on_every_rank(error: str | None, process_group=None) -> None:
    """A check that fails on some ranks (each checks the pieces it holds)
    fails on all, with the first failing rank's message: no rank goes on
    alone into DCP's collectives (it would wait there for the others), and
    rank 0, the one that prints, says what is wrong."""
    if dist.is_initialized():
        errors = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(errors, error, group=process_group)
        error = next((e for e in errors if e), None)
    if error:
        raise ValueError(error)


def load_pieces(path, wanted: dict, index: dict, process_group=None) -> None:
    """Fill each local tensor of `wanted` ({key: (local tensor, pieces, full
    shape)}) from the saved entries whose rectangles overlap its pieces,
    in place. index: the checkpoint's {entry: {key, at, size, full}}.
    Everything is checked before a tensor is read (`check_index`, element-wise
    coverage, the metadata through `SafeReader`, the files): any fault is one
    ValueError naming it. Collective (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, error = SafeReader(str(path)), None
    try:
        check_index(index)
        plan, sizes = _read_plan(wanted, index)
        _check_entries(path, _read_dcp_metadata(reader), sizes)
    except ValueError as e:
        error = str(e)
    _raise_on_every_rank(error, process_group)
    reads = {}
    for local, _, entry, _, _ in plan:
        reads.setdefault(entry, torch.empty(sizes[entry], dtype=local.dtype))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(reads, storage_reader=reader, process_group=process_group, no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a BaseException: say which rank's error, in one line
        cause = _dcp_failure(e)
        raise ValueError(f"reading the pieces failed: {type(cause).__name__}: "
                         f"{(str(cause).splitlines() or [''])[0][:300]}") from None
    with torch.no_grad():
        for local, local_at, entry, saved_at, size in plan:
            local[_region(local_at, size)] = reads[entry][_region(saved_at, size)].to(local.device, local.dtype)


# ---------------------------------------------------------------------------
# 14. Expert parallelism: a mixture-of-experts layer's token rows travel to
#     the ep rank that holds their expert and back, by all-to-alls with
#     uneven splits (Megatron's MoEAlltoAllTokenDispatcher). The ep group is
#     the ranks that share tp, pp and edp coordinates (section 1).
# ---------------------------------------------------------------------------


class ExpertPlan(NamedTuple):
    """Who sends how many rows to whom, for one MoE layer's forward.
    send[j]: rows this rank sends to ep rank j (its choices of j's experts);
    recv[j]: rows it receives from ep rank j; recv_counts [ep, E/ep]: of
    those, how many for each of this rank's local experts."""

    send: list
    recv: list
    recv_counts: torch.Tensor


def expert_plan(counts: torch.Tensor, mesh: Mesh) -> ExpertPlan:
    """counts [E]: this rank's rows for each expert (rows sorted by expert).
    Ep rank j holds experts [j·E/ep, (j+1)·E/ep). One all-to-all of the
    counts themselves (E/ep integers to each other rank) tells every rank
    what it will receive, so the row all-to-all can be sized before it runs."""
    ep = mesh.ep
    local = counts.numel() // ep
    if ep == 1:
        return ExpertPlan([int(counts.sum())], [int(counts.sum())], counts.view(1, -1))
    recv_counts = torch.empty_like(counts)
    _record("all_to_all", "ep", local * (ep - 1), "forward", counts.dtype)
    with waiting("all_to_all over ep (the counts)"):
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=mesh.group("ep"))
    recv_counts = recv_counts.view(ep, local)
    return ExpertPlan(counts.view(ep, local).sum(1).tolist(), recv_counts.sum(1).tolist(), recv_counts)


def _all_to_all(x: torch.Tensor, send: list, recv: list, mesh: Mesh, phase: str) -> torch.Tensor:
    """x [sum(send), ...] -> [sum(recv), ...] over ep: the first send[0] rows
    go to ep rank 0, the next send[1] to rank 1, ...; the result holds
    recv[j] rows from each rank j, in rank order. Records the elements sent
    to other ranks (a rank's rows for itself stay put)."""
    if mesh.ep == 1:
        return x
    row = math.prod(x.shape[1:])
    _record("all_to_all", "ep", (sum(send) - send[mesh.ep_rank]) * row, phase, x.dtype)
    out = x.new_empty((sum(recv), *x.shape[1:]))
    with waiting("all_to_all over ep"):
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=mesh.group("ep"))
    return out


class _DispatchToExperts(torch.autograd.Function):
    """Send each routed token row to the ep rank that holds its expert.
    Forward: all-to-all over ep; rows [m, h], sorted by expert, go out by
    `plan.send`, and [m', h] come in by `plan.recv` (from each source rank,
    rows for each local expert in turn). Backward: the reverse all-to-all,
    each row's gradient goes back to where the row came from.
    Elements moved per rank: h × its choices of experts on other ranks, each
    way: k·b·s·h·(ep−1)/ep when the routing is uniform (so dispatch +
    combine: 2·k·b·s·h·(ep−1)/ep per direction, forward or backward)."""

    @staticmethod
    def forward(ctx, rows, plan, mesh):
        ctx.plan, ctx.mesh = plan, mesh
        return _all_to_all(rows, plan.send, plan.recv, mesh, "forward")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return _all_to_all(g, ctx.plan.recv, ctx.plan.send, ctx.mesh, "backward"), None, None


class _CombineFromExperts(torch.autograd.Function):
    """Bring the experts' output rows home: the mirror of `_DispatchToExperts`.
    Forward: all-to-all over ep, rows [m', h] go back by `plan.recv`, and
    the source rank gets [m, h] in the order it sent them. Backward: the
    gradients travel to the experts' ranks again (`plan.send`).
    Elements moved per rank: h × the rows its experts ran for the other ep
    ranks, each way (per rank not the dispatch's count, which is the rows it
    sent away; over an ep group the two totals are equal)."""

    @staticmethod
    def forward(ctx, rows, plan, mesh):
        ctx.plan, ctx.mesh = plan, mesh
        return _all_to_all(rows, plan.recv, plan.send, mesh, "forward")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return _all_to_all(g, ctx.plan.send, ctx.plan.recv, ctx.mesh, "backward"), None, None


def dispatch_to_experts(rows, plan: ExpertPlan, mesh: Mesh):
    return _DispatchToExperts.apply(rows, plan, mesh) if mesh.ep > 1 else rows


def combine_from_experts(rows, plan: ExpertPlan, mesh: Mesh):
    return _CombineFromExperts.apply(rows, plan, mesh) if mesh.ep > 1 else rows


dispatch_to_experts.__doc__, combine_from_experts.__doc__ = _DispatchToExperts.__doc__, _CombineFromExperts.__doc__


# ---------------------------------------------------------------------------
# 15. Context parallelism: each cp rank holds 1/cp of every sequence, also
#     inside attention. Its queries stay; the keys and values travel around
#     the cp ring, one block a step, while the local block computes; the
#     partial results merge by their log-sum-exp (online softmax). For causal
#     masks the sequence is cut into 2·cp chunks and rank r holds chunks r and
#     2·cp − 1 − r, so every rank has the same work (the load balancing of
#     Megatron's context parallelism and of Llama 3's training).
# ---------------------------------------------------------------------------

CP_TAG = 1 << 20  # p2p tags of the cp ring, apart from the pipeline's


def check_cp_seq(s: int, mesh: Mesh) -> None:
    """ValueError unless the sequence cuts into 2·cp equal chunks."""
    if s % (2 * mesh.cp):
        raise ValueError(f"context parallel cuts each sequence into 2·cp chunks: seq % (2·cp) == 0 needed, got "
                         f"seq={s}, cp={mesh.cp}")


def cp_positions(s: int, mesh: Mesh, rank: int | None = None, device=None) -> torch.Tensor:
    """The global positions [s/cp] of cp rank `rank`'s tokens (default this
    rank's) in a sequence of s: chunk r, then chunk 2·cp − 1 − r, of 2·cp
    chunks of c = s/(2·cp). Rank 0 holds the first and the last chunk."""
    cp, r = mesh.cp, mesh.cp_rank if rank is None else rank
    c = s // (2 * cp)
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * cp - 1 - r) * c, (2 * cp - r) * c)]).to(
        device)


def cp_split(x: torch.Tensor, mesh: Mesh, dim: int = 1) -> torch.Tensor:
    """This cp rank's two chunks of x along dim (the sequence): [.., s, ..] -> [.., s/cp, ..]."""
    if mesh.cp == 1:
        return x
    check_cp_seq(x.shape[dim], mesh)
    return x.index_select(dim, cp_positions(x.shape[dim], mesh, device=x.device))


def cp_unsplit(x: torch.Tensor, mesh: Mesh, dim: int = 1) -> torch.Tensor:
    """Inverse of `cp_split` (no autograd): every rank's chunks all-gathered
    over cp and put back in sequence order. For tests, logs and demos."""
    if mesh.cp == 1:
        return x
    every = all_gather(x.movedim(dim, 0).contiguous(), mesh, "cp", 0, phase="gather")  # rank order
    s = every.shape[0]
    order = torch.cat([cp_positions(s, mesh, rank=r) for r in range(mesh.cp)]).to(x.device)
    out = torch.empty_like(every)
    out[order] = every
    return out.movedim(0, dim)


def _ring_exchange(sends: list, like: list, mesh: Mesh, phase: str) -> list:
    """Send each tensor of `sends` to the next cp rank and receive as many,
    shaped as `like`, from the previous one: one batch of isend/irecv (the
    same order on every rank, so the pairs match). Returns the work handles
    and the receive buffers; wait on the handles before reading them."""
    recvs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]
    ops = [dist.P2POp(dist.isend, t.contiguous(), mesh.cp_peer(+1), tag=_tag(CP_TAG + i)) for i, t in enumerate(sends)]
    ops += [dist.P2POp(dist.irecv, t, mesh.cp_peer(-1), tag=_tag(CP_TAG + i)) for i, t in enumerate(recvs)]
    for t in sends:
        _record("send", "cp", t.numel(), phase, t.dtype)
    return dist.batch_isend_irecv(ops), recvs


def _ring_words(mesh: Mesh) -> str:
    return f"the cp ring: send to rank {mesh.cp_peer(+1)} + recv from rank {mesh.cp_peer(-1)}"


def _sub_blocks(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> list:
    """The (query chunk, key chunk, needs a mask) triples of one step: each
    rank holds 2 chunks, so a step is 2 x 2 sub-blocks. Causal: a key chunk
    wholly after a query chunk is skipped (no work), one wholly before needs
    no mask, the diagonal needs the causal mask."""
    c = q_pos.numel() // 2
    out = []
    for a in range(2):
        for b in range(2):
            qa, kb = q_pos[a * c:(a + 1) * c], k_pos[b * c:(b + 1) * c]
            if causal and kb.min() > qa.max():
                continue
            out.append((slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), causal and bool(kb.max() > qa.min())))
    return out


def _scores(q, k, q_pos, k_pos, scale, causal_part: bool, mask):
    """q [b, g, r, c, d] (r query heads per kv head), k [b, g, c, d] -> masked scores [b, g, r, c, c] (fp32+)."""
    s = torch.einsum("bgrqd,bgkd->bgrqk", q, k) * scale
    hidden = None
    if causal_part:
        hidden = (k_pos[None, :] > q_pos[:, None])  # [c_q, c_k]
    if mask is not None:  # [b|1, 1, s|1, s] in global positions, True = masked
        m = (mask if mask.shape[2] == 1 else mask[:, :, q_pos])[..., k_pos][:, :, None]  # [b|1, 1, 1, c_q|1, c_k]
        hidden = m if hidden is None else (m | hidden)
    return s if hidden is None else s.masked_fill(hidden, float("-inf"))


def _kept(drop, p, q_pos, k_pos):
    """The attention-dropout factor of a sub-block's probabilities p [b, g, r, c, c]: 0 or 1/(1 − p_drop)
    by the counter-based mask at (row, head, query position, key position) of the global [B, N, s, s]
    (what core_attention draws on the whole sequence); 1 without dropout."""
    if drop is None:
        return 1.0
    prob, seed, stream, row, rows, head0, heads, seq = drop
    b, g, r, cq, ck = p.shape
    keep = keep_mask((b, g * r, cq, ck), prob, seed, stream, offset=(row, head0, q_pos, k_pos),
                     global_shape=(rows, heads, seq, seq), device=p.device)
    return keep.view(b, g, r, cq, ck).to(p.dtype) / (1.0 - prob)


def _block_forward(q, k, v, q_pos, k_pos, scale, causal, mask, out, lse, drop=None):
    """Attend this rank's queries to one k/v block and merge into (out, lse) in place.
    q [b, g, r, 2c, d]; k, v [b, g, 2c, d]; out [b, g, r, 2c, d]; lse [b, g, r, 2c] (−inf: nothing seen yet).
    Dropout (drop) scales the probabilities that meet v, not the lse: the merge stays exact."""
    for qs, ks, causal_part in _sub_blocks(q_pos, k_pos, causal):
        s = _scores(q[..., qs, :], k[..., ks, :], q_pos[qs], k_pos[ks], scale, causal_part, mask)
        blk = torch.logsumexp(s, dim=-1)  # [b, g, r, c]
        p = torch.exp(s - blk[..., None]).nan_to_num(0.0)  # rows that see nothing: 0
        p = p * _kept(drop, p, q_pos[qs], k_pos[ks])
        o = torch.einsum("bgrqk,bgkd->bgrqd", p, v[..., ks, :])
        new = torch.logaddexp(lse[..., qs], blk)
        w_old = torch.exp(lse[..., qs] - new).nan_to_num(0.0)
        w_new = torch.exp(blk - new).nan_to_num(0.0)
        out[..., qs, :] = out[..., qs, :] * w_old[..., None] + o * w_new[..., None]
        lse[..., qs] = new


def _block_backward(q, k, v, q_pos, k_pos, scale, causal, mask, do, lse, delta, dq, dk, dv, drop=None):
    """Gradients of one k/v block's part of the attention, added in place:
    p = exp(scores − lse) (the final lse), dv += pᵀ·do, ds = p·(do·vᵀ − delta),
    dq += ds·k·scale, dk += dsᵀ·q·scale (summed over a kv head's query heads)."""
    for qs, ks, causal_part in _sub_blocks(q_pos, k_pos, causal):
        s = _scores(q[..., qs, :], k[..., ks, :], q_pos[qs], k_pos[ks], scale, causal_part, mask)
        p = torch.exp(s - lse[..., qs, None]).nan_to_num(0.0)
        kept = _kept(drop, p, q_pos[qs], k_pos[ks])  # dropout: out = (p·kept) v, so dp = kept·(do vᵀ)
        dv[..., ks, :] += torch.einsum("bgrqk,bgrqd->bgkd", p * kept, do[..., qs, :])
        ds = p * (torch.einsum("bgrqd,bgkd->bgrqk", do[..., qs, :], v[..., ks, :]) * kept - delta[..., qs, None])
        dq[..., qs, :] += torch.einsum("bgrqk,bgkd->bgrqd", ds, k[..., ks, :]) * scale
        dk[..., ks, :] += torch.einsum("bgrqk,bgrqd->bgkd", ds, q[..., qs, :]) * scale


class _RingAttention(torch.autograd.Function):
    """Attention over a sequence cut across the cp ranks.

    q [b, n, s/cp, d], k, v [b, g, s/cp, d] (g kv heads, GQA) -> [b, n, s/cp, d],
    each rank's tokens at the global positions `cp_positions` gives.
    Forward, cp steps: attend to the k/v block in hand (own first), merge by
    log-sum-exp, and meanwhile pass it on: step i sends the block to the next
    rank and receives the one of rank r − i − 1 (2 block transfers, k and v,
    of b·g·(s/cp)·d elements each, for each of the cp − 1 steps).
    Backward, cp rounds over the same ring: the k/v blocks travel again, and
    with each goes the running sum of its dk, dv, which reaches the block's
    owner after the last round (4 transfers a round for cp − 1 rounds: twice
    the forward's). Saved: q, k, v, out and the lse [b, n, s/cp]; nothing of
    size s² and nothing of another rank's."""

    @staticmethod
    def forward(ctx, q, k, v, mesh, scale, causal, mask, drop):
        b, n, sl, d = q.shape
        g = k.shape[1]
        s = sl * mesh.cp
        dtype = torch.promote_types(q.dtype, torch.float32)  # the softmax in fp32 (or float64)
        qg = q.reshape(b, g, n // g, sl, d).to(dtype)
        q_pos = cp_positions(s, mesh, device=q.device)
        out = torch.zeros_like(qg)
        lse = torch.full((b, g, n // g, sl), float("-inf"), dtype=dtype, device=q.device)
        kv = [k.to(dtype).contiguous(), v.to(dtype).contiguous()]
        for i in range(mesh.cp):
            if i < mesh.cp - 1:  # pass the block in hand on while it computes
                works, nxt = _ring_exchange(kv, kv, mesh, "forward")
            j = (mesh.cp_rank - i) % mesh.cp  # whose block this is
            _block_forward(qg, kv[0], kv[1], q_pos, cp_positions(s, mesh, rank=j, device=q.device), scale, causal,
                           mask, out, lse, drop)
            if i < mesh.cp - 1:
                wait_all(works, _ring_words(mesh))
                kv = nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mesh, ctx.scale, ctx.causal, ctx.mask, ctx.drop = mesh, scale, causal, mask, drop
        return out.reshape(b, n, sl, d).to(q.dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        mesh, cp = ctx.mesh, ctx.mesh.cp
        b, n, sl, d = q.shape
        g, s, dtype = k.shape[1], sl * cp, out.dtype
        qg, do = q.reshape(b, g, n // g, sl, d).to(dtype), grad.reshape(b, g, n // g, sl, d).to(dtype)
        delta = (do * out).sum(-1)  # [b, g, r, sl]: rowsum(do · out)
        q_pos = cp_positions(s, mesh, device=q.device)
        dq = torch.zeros_like(qg)
        kv = [k.to(dtype).contiguous(), v.to(dtype).contiguous()]
        acc = [torch.zeros_like(kv[0]), torch.zeros_like(kv[1])]  # dk, dv of the block in hand
        own = None
        for i in range(cp):
            j = (mesh.cp_rank - i) % cp
            _block_backward(qg, kv[0], kv[1], q_pos, cp_positions(s, mesh, rank=j, device=q.device), ctx.scale,
                            ctx.causal, ctx.mask, do, lse, delta, dq, acc[0], acc[1], ctx.drop)
            if i == 0:  # the own block's dk, dv stay here; the sums from the other ranks come back at the end
                own, acc = acc, [torch.zeros_like(acc[0]), torch.zeros_like(acc[1])]
                if cp > 1:
                    works, (kv0, kv1) = _ring_exchange(kv, kv, mesh, "backward")
                    wait_all(works, _ring_words(mesh))
                    kv = [kv0, kv1]
                continue
            sends = (kv if i < cp - 1 else []) + acc  # the block moves on (not after its last stop) with its sums
            works, recvs = _ring_exchange(sends, sends, mesh, "backward")
            wait_all(works, _ring_words(mesh))
            if i < cp - 1:
                kv, acc = recvs[:2], recvs[2:]  # the next block, and its sums so far (from the ranks it visited)
            else:
                own = [own[0] + recvs[0], own[1] + recvs[1]]  # the own block's sums, home from the last rank
        dk, dv = own if own is not None else acc
        return (dq.view(b, n, sl, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None)


def ring_attention(q, k, v, mesh: Mesh, *, scale: float, causal: bool, mask=None, dropout=None):
    """Attention of this cp rank's queries to the whole sequence (see `_RingAttention`).
    q [b, n, s/cp, d]; k, v [b, g, s/cp, d]; mask: None or [b|1, 1, s, s] bool in
    global positions, True = masked (a padding mask; [b, 1, 1, s] masks keys
    only); causal: the causal mask
    too. A query that sees no key gets zeros (as the fused softmax gives).
    dropout: None, or (p, seed, stream, first row, rows, first head, heads) of
    the global [rows, heads, s, s] probabilities: the mask core attention draws."""
    check_cp_seq(q.shape[2] * mesh.cp, mesh)  # this rank's tokens must be two equal chunks
    if k.shape != v.shape or k.shape[2] != q.shape[2] or k.shape[0] != q.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(f"ring attention needs q [b, n, s/cp, d] and k, v [b, g, s/cp, d] with g | n, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    s = q.shape[2] * mesh.cp
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, q.shape[0])
                             or mask.shape[1] != 1 or mask.shape[2] not in (1, s) or mask.shape[3] != s):
        raise ValueError(f"ring attention's mask must be bool [b|1, 1, s|1, s] over the whole sequence (b={q.shape[0]}, "
                         f"s={s}), got {mask.dtype} {tuple(mask.shape)}")
    drop = None if dropout is None else (*dropout, s)
    return _RingAttention.apply(q, k, v, mesh, scale, causal, mask, drop)


# ---------------------------------------------------------------------------
# 16. Where each rank is. A rank that raises, or waits too long in a
#     collective or a transfer, says one line naming its place: its mesh
#     coordinates, step, pipeline action, and what it waits in (or the last
#     collective it entered). Every rank keeps its place in WHERE, cheaply:
#     the collectives of section 3, the executor and the training loop set it.
# ---------------------------------------------------------------------------

WHERE: dict = dict(who=None, step=None, action=None, last=None, waiting=None, since=None, signal=None)
_REPORTED = threading.Lock()  # one line per rank, whoever says it first (main thread or watchdog)


def locate(mesh: Mesh) -> None:
    """Name this rank in every report: its global rank and mesh coordinates."""
    coords = [f"{d} {mesh.rank(d)}" for d in ("tp", "cp", "pp", "dp", "ep") if mesh.size(d) > 1 or d in ("tp", "dp")]
    WHERE["who"] = f"rank {mesh.global_rank()} ({', '.join(coords)})"


def at(step=None, action=None) -> None:
    """This rank is now at `step` (and, inside a pipeline step, `action`:
    e.g. "action 7 of 24 B(mb 2, chunk 0)"). Fires a planted fault here."""
    WHERE["step"], WHERE["action"] = step, action
    if FAULT and (FAULT["rank"], FAULT["step"], FAULT["action"]) == (_rank(), step, _index(action)):
        if FAULT["kind"] == "raise":
            raise RuntimeError(f"the fault planted by NANOMEG_FAULT={os.environ['NANOMEG_FAULT']}")
        with waiting(f"a stall planted by NANOMEG_FAULT={os.environ['NANOMEG_FAULT']}"):
            time.sleep(FAULT["seconds"])


@contextlib.contextmanager
def waiting(what: str):
    """Mark this rank as blocked in `what` while the block runs. If the
    block raises (a timeout, a peer gone), the mark stays for the report."""
    WHERE["waiting"], WHERE["since"] = what, time.monotonic()
    yield
    WHERE["waiting"] = WHERE["since"] = None


def wait_all(works, what: str) -> None:
    """Wait for every async work handle, marked as blocked in `what`."""
    with waiting(what):
        for work in works:
            work.wait()


def whereabouts() -> str:
    """This rank's place, one line: 'rank 3 (tp 1, pp 1, dp 0): step 12,
    action 7 of 24 B(mb 2, chunk 0): waiting 41 s in recv from rank 1'."""
    line = WHERE["who"] or f"rank {_rank()}"
    place = ", ".join(str(p) for p in (WHERE["step"] is not None and f"step {WHERE['step']}", WHERE["action"]) if p)
    line += f": {place or 'before the first step'}"
    if WHERE["waiting"]:
        return line + f": waiting {time.monotonic() - WHERE['since']:.0f} s in {WHERE['waiting']}"
    return line + (f": last collective {WHERE['last']}" if WHERE["last"] else "")


def report(why: str = "") -> bool:
    """Print this rank's place (and why) to stderr, once per rank; False if already said."""
    if not _REPORTED.acquire(blocking=False):
        return False
    print(whereabouts() + (f": {why}" if why else ""), file=sys.stderr, flush=True)
    return True


def start_watchdog(timeout: float, grace: float = 5.0) -> threading.Thread:
    """A daemon thread that ends this process (exit 1) with its report when
    it has waited in one place longer than `timeout` (the process group's own
    timeout raises about then on gloo; NCCL may block elsewhere), or longer
    than `grace` after a SIGTERM / SIGINT (`WHERE["signal"]`: when another
    rank failed, the launcher stops the job, and a rank blocked on the failed
    one would never finish its step). If the main thread is already
    reporting, it gets a moment to finish."""
    def watch():
        while True:
            time.sleep(0.2)
            since, signal = WHERE["since"], WHERE["signal"]
            if since is None:
                continue
            now = time.monotonic()
            if signal is not None and now - max(since, signal[0]) > grace:
                why = f"stopped by {signal[1]} while waiting"
            elif now - since > timeout:
                why = f"no progress for {now - since:.0f} s (--timeout {timeout:g})"
            else:
                continue
            if not report(why):
                time.sleep(grace)
            os._exit(1)

    thread = threading.Thread(target=watch, name="nanomeg-watchdog", daemon=True)
    thread.start()
    return thread


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _index(action) -> int | None:
    """7 from 'action 7 of 24 ...' (None outside a pipeline step)."""
    return int(action.split()[1]) if action else None


def _planted_fault(spec: str | None) -> dict | None:
    """NANOMEG_FAULT, a testing aid: 'raise:RANK:STEP[:ACTION]' makes that rank
    raise there, 'sleep:RANK:STEP[:ACTION[:SECONDS]]' stalls it (an hour by default)."""
    if not spec:
        return None
    kind, *where = spec.split(":")
    if kind not in ("raise", "sleep") or not 2 <= len(where) <= 4 - (kind == "raise"):
        raise ValueError(f"NANOMEG_FAULT={spec!r}: want raise:RANK:STEP[:ACTION] or sleep:RANK:STEP[:ACTION[:SECONDS]]")
    numbers = [int(w) for w in where[:3]] + [None] * (3 - len(where[:3]))
    return dict(kind=kind, rank=numbers[0], step=numbers[1], action=numbers[2],
                seconds=float(where[3]) if len(where) == 4 else 3600.0)


FAULT = _planted_fault(os.environ.get("NANOMEG_FAULT"))
