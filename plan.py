"""plan.py — what rank r of any layout holds, sends and computes, without running it.

The plan calls the functions the real run calls, on a virtual mesh (`parallel.Mesh.of_rank`: sizes and
coordinates, no process groups) and on shapes only (the meta device): so it answers for rank 1,234 of
3,072 GPUs in milliseconds, and on the small layouts tests/test_plan.py runs for real it answers what the
run holds and records, exactly where the quantity is exact. Read top to bottom:

1. The layout: the virtual mesh, the schedule, this rank's stages, layers and parameter shards.
2. Bytes held: weights, gradient buckets, optimizer state, as the code allocates them.
3. Activations: Korthikanti et al. 2022's bytes per layer written for this code, summed over the
   microbatches each chunk holds at the schedule's peak, plus the embedding's and the head's and loss's.
4. Communication: the collectives of one training step, in `parallel.count_comms()` records.
5. FLOPs: `nanomeg.gpt_flops` cut per stage; recompute (and zero-bubble's second walk) as work redone.
6. `rank_plan` and `layout_plans`: the whole picture of one rank, and of every kind of rank.
The measurement the activations are checked against is `runlog.SavedPeak` (tests/test_plan.py).

What is exact (tests/test_plan.py compares a real step rank by rank): the shapes, buckets, gradient and
optimizer bytes, every collective (but the elements of ep's token all-to-alls, which follow the routing:
planned for uniform routing), and the activations autograd keeps, to the byte for the kernels that ran
(the CPU references; the Triton kernels' figure differs by the named terms of `differences`). Not
counted as activations: what autograd does not keep (the pipeline's send and receive buffers, a stage's
output held by the executor until its backward, the logits before the loss, gradients in flight, a
full-recompute layer's recomputed tensors during its backward).

Units: bytes (B), elements (el), FLOPs. Notation as in parallel.py: b the microbatch rows, s the
sequence, h hidden, t = tp, n heads, g kv heads, d head dim, f ffn hidden, V padded vocabulary, L layers.
A virtual mesh must never carry a tensor: every collective would find no group and silently do nothing.
Nothing here runs one; every figure is a formula over shapes.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

import nanomeg as N
import parallel as P

# ---------------------------------------------------------------------------
# 1. The layout
# ---------------------------------------------------------------------------


def check_layout(cfg: N.GPTConfig, mesh: P.Mesh, v: int, micro_batch: int, seq: int, microbatches: int,
                 schedule: str) -> None:
    """ValueError naming the values unless cfg cuts over mesh as the real run needs: heads, ffn, vocab and
    kv heads over tp (`GPTConfig.check_mesh`), experts over ep (and ep only with experts), layers over
    pp·v (`parallel.stage_layers`), the sequence over cp (and tp under sequence parallel), the schedule."""
    for name, n in (("micro_batch", micro_batch), ("seq", seq), ("microbatches", microbatches)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={n!r}")
    cfg.check_mesh(mesh)
    cfg.check_seq(seq, mesh)
    P.stage_layers(cfg.layers, mesh.pp, v)
    if cfg.experts and mesh.tp > 1 and seq % mesh.tp:
        raise ValueError(f"mixture-of-experts layers route each tp rank's 1/tp of the sequence: seq={seq} is not "
                         f"divisible by tp={mesh.tp}")
    schedules(schedule, mesh.pp, microbatches, v)


@functools.lru_cache(maxsize=64)
def schedules(name: str, pp: int, m: int, v: int) -> tuple:
    """(action lists, p2p plans, simulation): `parallel.checked_schedule` and `parallel.simulate` of the
    named schedule, computed once per (name, pp, m, v): every stage of a layout shares them."""
    actions, plans = P.checked_schedule(name, pp, m, v)
    return actions, plans, P.simulate(actions, v)


@functools.lru_cache(maxsize=16)
def model_specs(cfg: N.GPTConfig) -> dict:
    """`nanomeg.gpt_specs(cfg)`, computed once per config: every rank of a layout shares them."""
    return N.gpt_specs(cfg)


def stage_shapes(cfg: N.GPTConfig, mesh: P.Mesh, v: int) -> dict:
    """{name: full shape} of the parameters this pipeline rank holds (`nanomeg.stage_params` of
    `nanomeg.gpt_shapes`), in the model's order."""
    return N.stage_params({k: shape for k, (shape, _) in N.gpt_shapes(cfg).items()}, cfg, mesh, v)


def meta_params(shards: list[dict], dtype: torch.dtype) -> dict:
    """{name: a meta tensor of this rank's local shape}: what `GradBuckets`' rule reads (numel, dtype)."""
    return {row["name"]: torch.empty(row["local_shape"], dtype=dtype, device="meta") for row in shards}


# ---------------------------------------------------------------------------
# 2. Bytes held: weights, gradients, optimizer state
# ---------------------------------------------------------------------------


def buckets_of(cfg: N.GPTConfig, mesh: P.Mesh, params: dict, specs: dict, *, zero: bool, bucket_mb: float) -> list:
    """This rank's gradient buckets (`parallel.bucket_layout`, the rule `GradBuckets` allocates by), with
    train.Optimizer's arguments: the tied embedding's copies (pp > 1), the experts' tensors apart, fp32
    gradients for bf16 weights (each bucket's dtype)."""
    experts = [n for n in params if isinstance(specs[n], P.Experts)]
    return P.bucket_layout(params, mesh, bucket_mb=bucket_mb, zero=zero, tied=N.tied_copies(cfg, mesh),
                           experts=experts, grad_dtype=torch.float32)


def state_bytes(buckets: list, mesh: P.Mesh, params: dict, *, zero: bool, main: bool) -> int:
    """The optimizer state this rank allocates, in B (what `train.Optimizer.state_bytes()` measures).
    * with a main copy (ZeRO-1, or bf16 weights: `parallel.ZeroAdamW`): per bucket, the fp32 main copy and
      two fp32 moments of this rank's slice, numel / size(dim) under ZeRO (padding included), else the whole
      bucket: 3 · 4 B · slice (8 B elements for float64 weights);
    * else torch's AdamW: two moments per tensor, in its dtype: 2 · elem · numel (its `step` counters, one
      4-byte scalar per tensor, are not counted, as `state_bytes()` does not count them)."""
    if main:
        slice_of = lambda b: b["numel"] // (mesh.size(b["dim"]) if zero else 1)
        elem = lambda b: 8 if params[b["names"][0]].dtype == torch.float64 else 4
        return sum(3 * elem(b) * slice_of(b) for b in buckets)
    return sum(2 * p.numel() * p.element_size() for p in params.values())


# ---------------------------------------------------------------------------
# 3. Activations held for the backward
# ---------------------------------------------------------------------------


def formula_bytes(s, b, h, a, t, sp, recompute, elem) -> float:
    """Korthikanti et al. 2022, per layer and tp rank, with `elem`-byte activations (2: the paper's 16-bit)
    and 1-byte dropout masks. Of the paper's 34·s·b·h: (4·elem + 2)·s·b·h stay whole under tensor parallel
    alone (two LayerNorm inputs, the qkv and fc1 inputs, two masks), 12·elem·s·b·h are split (q, k, v, the
    proj input, the GeLU and fc2 inputs of 4h); the attention core is (2·elem + 1)·a·s²·b, split."""
    sbh = s * b * h
    if recompute == "full":
        return elem * sbh / (t if sp else 1)
    whole, split = (4 * elem + 2) * sbh, 12 * elem * sbh
    core = 0 if recompute == "selective" else (2 * elem + 1) * a * s * s * b
    return (whole + split + core) / t if sp else whole + (split + core) / t


def differences(s, b, h, a, ffn, t, sp, recompute, elem, triton, norm="layernorm", gelu=True) -> list[tuple]:
    """(what, bytes) by which one layer's storage on one rank differs from formula_bytes (positive: more).
    elem: the formula's activation bytes (4 for fp32, 2 for bf16). triton: the Triton kernels' path (GPU),
    else the CPU references. norm: the layer's two norms (LayerNorm or RMSNorm); gelu: its MLP runs
    `kernels.bias_gelu` (ffn: its width on this rank's rows, × k for a MoE layer's choices).
    recompute: "none" keeps the attention core's [s, s] tensors, "selective" (also ring attention and
    SDPA: none kept) or "full" (the layer input alone). formula_bytes + the sum is what
    benchmarks/memory.py measures, to the byte (a LayerNorm GeLU layer with dropout on)."""
    whole = s * b * h / (t if sp else 1)  # elements of a [b, s, h] tensor this rank holds whole
    tokens = s * b / (t if sp else 1)
    att, gelu_in = a * s * s * b / t, s * b * ffn / t * gelu  # [b, a/t, s, s] and [b, s, ffn/t]
    body, core, ref, rms = recompute != "full", recompute == "none", not triton, norm == "rmsnorm"
    return [
        ("norms off Triton (torch's F.layer_norm / F.rms_norm on an fp32 copy of x): keep x in fp32, not in "
         "elem B, per norm", 2 * (4 - elem) * whole * (body and ref)),
        ("RMSNorm off Triton: F.rms_norm's autograd also keeps the normalised x (fp32), per norm",
         2 * 4 * whole * (body and ref and rms)),
        ("norm statistics, not in the formula: mean and rstd [b, s] fp32 (RMSNorm: rstd), per norm",
         2 * (1 if rms else 2) * 4 * tokens * body),
        ("softmax output, CPU reference: kept in fp32 (the fp32 compute dtype), not in the scores' dtype",
         (4 - elem) * att * (core and ref)),
        ("GeLU input, CPU reference: kept in fp32 (upcast before F.gelu), not in fc1's output dtype",
         (4 - elem) * gelu_in * (body and ref)),
        ("causal mask, CPU reference: the [s, s] bool that masked_fill_ keeps", s * s * (core and ref)),
    ]


def mlp_width(cfg: N.GPTConfig) -> int:
    """Elements a token's row keeps in the MLP beyond its input, over the whole ffn f (÷t on a rank):
    fused bias-GeLU its input and output (the fc2 input), 2f; ReLU its output alone (it is fc2's input),
    f; gated (SwiGLU, GeGLU) fc1's output (2f), act(gate) and the product (fc2's input), 4f."""
    f = cfg.ffn_hidden
    return 4 * f if cfg.gated else f if cfg.activation == "relu" else 2 * f


def layer_terms(cfg: N.GPTConfig, mesh: P.Mesh, i: int, b: int, seq: int, elem: int,
                triton: bool = True) -> list[tuple[str, float]]:
    """(what, B) layer i keeps for the backward on this rank, one microbatch of b sequences: Korthikanti's
    terms for this code (`formula_bytes` for a LayerNorm GeLU GPT of ffn 4h, MHA, dropout on), generalised,
    then the kernels' own (`differences`: norm statistics, or the CPU references' extra storage with
    triton=False). s = seq / cp tokens per sequence here; a "whole" [b, s, h] tensor is split over tp
    only under sequence parallel.
      whole, elem B: the two norm inputs, the qkv and fc1 inputs (4), plus 1 B per hidden dropout mask;
      split over tp, elem B per token: q, k, v (`qkv_kept`: 3·n·d as copies, or views of the qkv output),
        the proj input (n·d; under cp in fp32 or SDPA the attention output itself), the MLP (`mlp_width`);
      the attention core [b, n/t, s, s]: its softmax output (elem) and, with attention dropout, the mask (1)
        and the dropped probabilities (elem); none under selective recompute; ring attention (cp) and SDPA
        keep none of it but their output and fp32 log-sum-exp, 4 B per token and head (ring: its output
        in fp32, 4·d more);
      rope: the cos and sin tables [s, d] of each rotation (q and k), elem B;
      full recompute: the layer input alone (elem · whole).
    A mixture-of-experts layer's MLP (`nanomeg.moe_mlp`): `moe_terms`, for uniform routing."""
    t, s, h = mesh.tp, seq // mesh.cp, cfg.hidden
    sp = cfg.sequence_parallel and t > 1
    tokens = b * s
    whole = tokens * h / (t if sp else 1)
    if cfg.recompute == "full":
        return [("the layer input (full recompute keeps nothing else)", elem * whole)]
    n, d, g = cfg.heads // t, cfg.head_dim, max(1, cfg.num_kv_heads // t)
    ring, sdpa, rope = mesh.cp > 1, cfg.attention == "sdpa" and mesh.cp == 1, cfg.position == "rope"
    fused = cfg.recompute == "selective" or ring or sdpa  # q, k, v kept as views of the qkv output
    # the attention's output is the proj input's storage: ring attention's fp32 output read as it is, or
    # SDPA's, laid out [b, s, n, d] (torch's CPU kernel returns [b, n, s, d] for several groups of several
    # heads: then a copy, n·d more)
    shared_out = (sdpa and (n == g or g == 1)) or (ring and elem >= 4)
    qkv = qkv_kept(cfg, n, g, b, fused)
    terms = [("two norm inputs, the qkv and fc1 inputs", 4 * elem * whole),
             ("hidden dropout masks (1 B)", 2 * whole * (cfg.hidden_dropout > 0)),
             ("q, k, v" + (" (the qkv output" + (", rotated q and k)" if rope else ")") if fused else ""),
              elem * tokens * qkv),
             ("the proj input" + (" (the attention's output itself)" if shared_out else ""),
              0 if shared_out and not sdpa else elem * tokens * n * d * (1 + (sdpa and not shared_out))),
             ("rope's cos and sin, for q and for k", 4 * elem * s * d * rope)]
    mlp = [(f"the MLP ({cfg.activation}): fc1's output, the activation's", elem * tokens * mlp_width(cfg) / t)]
    terms += moe_terms(cfg, mesh, b, seq, elem) if cfg.is_moe(i) else mlp
    if ring:
        terms.append(("ring attention's fp32 output and log-sum-exp", 4 * b * n * s * (d + 1)))
    elif sdpa:
        terms.append(("SDPA's log-sum-exp (fp32)", 4 * b * n * s))
    elif cfg.recompute == "none":
        terms.append(("the softmax output", elem * b * n * s * s))
        terms.append(("attention dropout mask (1 B) and dropped probabilities",
                      (1 + elem) * b * n * s * s * (cfg.attention_dropout > 0)))
    core_kept = "selective" if ring or sdpa else cfg.recompute  # ring attention and SDPA keep no [s, s] tensor
    terms.append(("the two norms' weights (and biases) cast to fp32, off Triton, for 16-bit weights",
                  2 * norm_copies(cfg, elem, triton)))
    ffn = cfg.ffn_hidden * (cfg.moe_topk if cfg.is_moe(i) else 1)  # a MoE layer: k rows a token
    return terms + differences(s, b, h, cfg.heads, ffn, t, sp, core_kept, elem, triton, cfg.norm,
                               cfg.activation in ("gelu", "gelu_tanh"))


def qkv_kept(cfg: N.GPTConfig, n: int, g: int, b: int, fused: bool) -> int:
    """Elements a token keeps of q, k and v (n query and g kv heads on this rank, d each). Fused (selective
    recompute, cp, SDPA): q, k, v are kept as views of the qkv output, (n + 2g)·d, and under rope the
    rotated q and k besides, (n + g)·d (without rope, a q of several groups of several heads is a copy,
    n·d more). Else the two attention matmuls keep q, k^T and v, each either a
    tensor of its own or a view of the qkv output (its whole (n + 2g)·d, once):
      q: rotated (rope), n·d; else a view when the matmul can fold its batch dims (b, n) without a copy
        (b = 1 or n = 1) and its heads lie one stride apart (one kv group, or MHA); else a copy, n·d;
      k and v: repeated to n heads (GQA, g > 1), a copy, n·d; one kv head repeated (MQA, g = 1) is an
        expanded view, which folds only at b = 1 (then k keeps its source: the rotated k, g·d, or the
        qkv output; v the qkv output), else a copy; without repeat as q (a rotated k is n·d)."""
    d, rope = cfg.head_dim, cfg.position == "rope"
    repeated = n // g > 1
    if fused:  # q of several groups of several heads is a copy: its heads are not one stride apart
        return (n + 2 * g) * d + (n + g) * d * rope + n * d * (not rope and g > 1 and repeated)
    fold = b == 1 or n == 1  # a view's batch dims (b, n/t) merge without a copy
    own, view = 0, False  # elements of tensors of their own; whether the qkv output is kept
    if rope:
        own += n * d
    elif fold and (g == 1 or not repeated):
        view = True
    else:
        own += n * d
    for is_k in (True, False):
        if repeated and g > 1:
            own += n * d
        elif is_k and rope:
            own += g * d if repeated and b == 1 else n * d  # rotated k, expanded (MQA) at b = 1, or itself
        elif fold:
            view = True
        else:
            own += n * d
    return own + (n + 2 * g) * d * view


def norm_copies(cfg: N.GPTConfig, elem: int, triton: bool) -> int:
    """B a norm keeps off Triton with 16-bit weights: torch's norm runs on fp32 copies of its weight (and
    bias), 4·h B each, made at every call (not counted by benchmarks/memory.py, which leaves out what is
    computed from parameters alone; they are held all the same)."""
    return 0 if triton or elem >= 4 else 4 * cfg.hidden * (2 if cfg.norm == "layernorm" else 1)


def moe_terms(cfg: N.GPTConfig, mesh: P.Mesh, b: int, seq: int, elem: int) -> list[tuple[str, float]]:
    """(what, B) a mixture-of-experts MLP (`nanomeg.moe_mlp`) keeps instead of the dense MLP's fc1 output
    and fc2 input, dropless, for uniform routing. Every tp rank runs its 1/t of each chosen expert for
    the whole sequences: m = k·b·s rows ("choices"), each of h in and h out (the rows, the experts'
    output, and output · gate for the scatter-add back to the tokens) and `mlp_width`/t in the expert's
    MLP; four int64 indices a choice (the gather of the rows, the sort by expert, its inverse, the gate's
    place) and its gate; the router, on this rank's 1/t of the tokens: its probabilities and the logits
    the z-loss reads (E each), the top-k ids (int64), the log-sum-exp and, when the gates are
    renormalised (k > 1), the gates and their sum, fp32, the aux loss's [b, E]; it reads its tokens (and,
    for 16-bit weights, its weight) in fp32, a copy that replaces the dense MLP's input among the kept
    tensors (under tp without sequence parallel its own 1/t of them: the layer's input is not kept).
    Exact for the routing's expected row counts; with ep the rows a rank receives follow the routing
    (within a few % at these sizes), and a capacity factor drops rows: the plan is then the dropless
    upper bound."""
    t, s, k, E, h = mesh.tp, seq // mesh.cp, cfg.moe_topk, cfg.experts, cfg.hidden
    sp = cfg.sequence_parallel and t > 1
    m = k * b * s  # choices: rows through the experts
    routed = b * s / t if t > 1 else b * s  # the tokens this rank routes
    return [("experts: the rows in, their outputs and outputs · gates", 3 * elem * m * h),
            ("experts: their MLPs (`mlp_width`)", elem * m * mlp_width(cfg) / t),
            ("the choices' int64 indices (4) and gates", (32 + elem) * m),
            ("the router: probabilities and logits (fp32, E each), top-k ids, log-sum-exp (and the gates and "
             "their sum, renormalised)", (8 * E + 8 * k + 4 + (4 * k + 4) * cfg.renormalizes_gates) * routed
             + 4 * b * E),
            ("the router's input, its 1/t of the tokens in fp32 (16-bit weights: and its weight), in place of the "
             "dense MLP's input", max(elem, 4) * routed * h - elem * b * s * h / (t if sp else 1)
             + 4 * E * h * (elem < 4))]


def end_terms(cfg: N.GPTConfig, mesh: P.Mesh, b: int, seq: int, elem: int, first: bool, last: bool,
              triton: bool = True) -> list[tuple[str, float]]:
    """(what, B) a microbatch keeps outside the layers. First stage: the token ids the embedding lookup keeps
    (int64; under tp the ids shifted into this rank's range, and the out-of-range mask, 1 B) and the
    embedding dropout's mask (1 B an element). Last stage: the final norm's input and the output layer's
    input (elem B each, [b, s, h], ÷t under sequence parallel; the norm as in `differences`) with the
    norm's fp32 statistics, and the vocab-parallel cross-entropy's softmax
    [b, s, V/t] in fp32, its local targets (int64) and their in-range mask (bool)."""
    t, s = mesh.tp, seq // mesh.cp
    sp = cfg.sequence_parallel and t > 1
    tokens = b * s
    whole = tokens * cfg.hidden / (t if sp else 1)
    terms = []
    if first:
        terms += [("the embedding's token ids (int64)" + (" and out-of-range mask" if t > 1 else ""),
                   (8 + (t > 1)) * tokens * (t > 1 or mesh.cp > 1)),  # else a view of the batch: `activation_bytes`
                  ("the positions of this cp rank's tokens (int64), for the position table", 8 * s *
                   (mesh.cp > 1 and cfg.position == "learned")),
                  ("the embedding dropout's mask", whole * (cfg.hidden_dropout > 0))]
    if last:
        rms = cfg.norm == "rmsnorm"
        terms += [("the final norm's input (fp32 off Triton) and statistics (off Triton: fp32 weights; RMSNorm's "
                   "normalised x)", (elem if triton else 4) * whole + (4 if rms else 8) * tokens / (t if sp else 1)
                   + norm_copies(cfg, elem, triton) + 4 * whole * (rms and not triton)),
                  ("the output layer's input", elem * whole),
                  ("the cross-entropy's fp32 softmax [b, s, V/t]", 4 * tokens * cfg.padded_vocab / t),
                  ("the cross-entropy's targets (int64) and in-range mask", 9 * tokens)]
    return terms


def activation_bytes(cfg: N.GPTConfig, mesh: P.Mesh, stages: dict, actions: list, b: int, seq: int, elem: int,
                     triton: bool = True) -> dict:
    """The activations this rank holds at its peak, in B: walk its action list (a forward F adds its
    chunk's bytes for the microbatch, a backward B or weight-gradient W frees them) and keep the largest
    sum. A chunk's bytes: `layer_terms` of its layers + `end_terms` (the first and the last virtual stage).
    One more on the first stage at tp = cp = 1: the lookup keeps its microbatch's ids, a view of the
    replica's batch [b·m, s] (int64), whose one storage is held while any microbatch is in flight.
    -> {total, chunk: {chunk: B a microbatch}, terms: {chunk: [(what, B)]}, peak_chunks: {chunk:
    microbatches held at the peak}, batch_ids: that storage's B (0 if none)}."""
    terms = {c: [term for i in st.layers for term in layer_terms(cfg, mesh, i, b, seq, elem, triton)] +
             end_terms(cfg, mesh, b, seq, elem, st.first, st.last, triton) for c, st in stages.items()}
    chunk = {c: sum(v for _, v in ts) for c, ts in terms.items()}
    first = next((c for c, st in stages.items() if st.first), None)  # the chunk that embeds, if here
    m = sum(a.kind == "F" and a.chunk == first for a in actions)
    batch_ids = 8 * b * m * seq if first is not None and mesh.tp == mesh.cp == 1 else 0
    held = dict.fromkeys(stages, 0)
    high, at_peak = 0.0, dict(held)
    for a in actions:
        held[a.chunk] += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
        live = sum(n * chunk[c] for c, n in held.items()) + (batch_ids if first is not None and held[first] else 0)
        if live > high:
            high, at_peak = live, dict(held)
    return dict(total=int(round(high)), chunk=chunk, terms=terms, peak_chunks=at_peak, batch_ids=batch_ids)


# ---------------------------------------------------------------------------
# 4. Communication of one training step
# ---------------------------------------------------------------------------


class Comms:
    """The collectives of one piece of the model (a layer, the embedding, the head) on one microbatch, as
    `parallel.count_comms()` records them, in three lists: `forward`; `act`, the backward collectives of
    activation gradients (they lie on the path to the stage's input, and to its weights); `param`, those of
    parameter gradients alone (a replicated weight's gradient summed over tp). The split matters to
    zero-bubble, whose I pass redoes the first kind only, and to full recompute, which redoes `forward`."""

    def __init__(self, adtype: torch.dtype, pdtype: torch.dtype):
        self.adtype, self.pdtype = adtype, pdtype  # the activations' and the parameters' dtype
        self.forward, self.act, self.param = [], [], []

    def fwd(self, op: str, dim: str, elements, dtype=None) -> None:
        self.forward.append(dict(op=op, dim=dim, elements=elements, phase="forward", dtype=dtype or self.adtype))

    def bwd(self, op: str, dim: str, elements, dtype=None) -> None:
        self.act.append(dict(op=op, dim=dim, elements=elements, phase="backward", dtype=dtype or self.adtype))

    def grad(self, numel: int) -> None:
        """A replicated parameter's gradient, all-reduced over tp in the backward."""
        self.param.append(dict(op="all_reduce", dim="tp", elements=numel, phase="backward", dtype=self.pdtype))

    def column(self, bsh: int, sp: bool) -> None:
        """A column-parallel linear's input [b, s, h]: copy_to_tp (backward all-reduce), or under sequence
        parallel _SequenceGatherLinear (forward all-gather; backward all-gather again and reduce-scatter)."""
        if sp:
            self.fwd("all_gather", "tp", bsh)
            self.bwd("all_gather", "tp", bsh)
            self.bwd("reduce_scatter", "tp", bsh)
        else:
            self.bwd("all_reduce", "tp", bsh)

    def row(self, bsh: int, sp: bool) -> None:
        """A row-parallel linear's output [b, s, h]: forward all-reduce, or under sequence parallel a
        reduce-scatter (and its backward all-gather)."""
        if sp:
            self.fwd("reduce_scatter", "tp", bsh)
            self.bwd("all_gather", "tp", bsh)
        else:
            self.fwd("all_reduce", "tp", bsh)


def fp32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmaxes, the router and ring attention compute in: fp32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_comms(cfg: N.GPTConfig, mesh: P.Mesh, i: int, b: int, seq: int, c: Comms) -> None:
    """Add layer i's collectives on one microbatch to c. Under tp, per layer: the qkv and fc1 inputs
    (`Comms.column`), the proj and fc2 outputs (`Comms.row`); under sequence parallel the replicated norm
    weights and biases, the proj and fc2 biases sum their gradients over tp (h each); kv heads replicated
    over tp (t > g) sum their gradient rows, g·2d·h (+ g·2d bias). Under cp, ring attention sends the k and
    v blocks [b, g/t, s/cp, d] (fp32) cp − 1 times forward, with their running dk, dv twice that backward."""
    t, cp, s, h, d = mesh.tp, mesh.cp, seq // mesh.cp, cfg.hidden, cfg.head_dim
    sp = cfg.sequence_parallel and t > 1
    bsh = b * s * h
    norm = lambda: [c.grad(h) for _ in range(2 if cfg.norm == "layernorm" else 1)] if sp else None
    if t > 1:
        norm()
        c.column(bsh, sp)
        split = N.qkv_split(cfg)
        if split.replicas(t) > 1:  # _SyncKVReplicaGrad: one all-reduce of every group's slot over tp
            c.grad(split.groups * 2 * d * h)
            if cfg.bias:
                c.grad(split.groups * 2 * d)
        c.row(bsh, sp)
        if cfg.bias and sp:
            c.grad(h)  # proj bias
        norm()
    if cfg.is_moe(i):
        moe_comms(cfg, mesh, b, seq, c)
    elif t > 1:
        c.column(bsh, sp)
        c.row(bsh, sp)
        if cfg.bias and sp:
            c.grad(h)  # fc2 bias
    if cp > 1:
        kv = b * max(1, cfg.num_kv_heads // t) * s * d
        for _ in range(2 * (cp - 1)):
            c.fwd("send", "cp", kv, fp32_or_wider(c.adtype))
        for _ in range(4 * (cp - 1)):
            c.bwd("send", "cp", kv, fp32_or_wider(c.adtype))


def moe_comms(cfg: N.GPTConfig, mesh: P.Mesh, b: int, seq: int, c: Comms) -> None:
    """Add a mixture-of-experts MLP's collectives (`nanomeg.moe_mlp`) on one microbatch to c. Under tp:
    each rank routes 1/t of the tokens (without sequence parallel they are split off: an all-gather in the
    backward), the router's gradient summed (E·h), three forward all-reduces for the aux and z losses (the
    choices per expert b·E int64, the mean probabilities b·E and the z sums b, fp32), the gates all-gathered
    (b·s·k fp32; reduce-scattered back) and the expert ids (b·s·k int64), the whole sequences for the
    experts (copy_to_tp, or gather_from_sp: a forward all-gather and a backward reduce-scatter of b·s·h),
    the output summed as a row-parallel one (fc2's bias, replicated:
    E/ep·h). Under ep: the counts' all-to-all (E/ep·(ep − 1) int64), and the rows' dispatch and combine,
    forward and backward: as many elements as the routing sends to other ranks, planned for uniform routing
    (k·b·s·(ep − 1)/ep rows of h, an expectation: not an integer in general)."""
    t, s, k, E, h = mesh.tp, seq, cfg.moe_topk, cfg.experts, cfg.hidden
    sp = cfg.sequence_parallel and t > 1
    bsh, wide = b * s * h, fp32_or_wider(c.adtype)
    if t > 1:
        if not sp:
            c.bwd("all_gather", "tp", bsh)  # scatter_to_sp's backward
        c.grad(E * h)  # the router, replicated over tp
        c.fwd("all_reduce", "tp", b * E, torch.int64)
        c.fwd("all_reduce", "tp", b * E, wide)
        c.fwd("all_reduce", "tp", b, wide)
        c.fwd("all_gather", "tp", b * s * k, wide)  # the gates ...
        c.bwd("reduce_scatter", "tp", b * s * k, wide)
        c.fwd("all_gather", "tp", b * s * k, torch.int64)  # ... and the expert ids
        if sp:  # the whole sequences for the experts: gather_from_sp, or copy_to_tp
            c.fwd("all_gather", "tp", bsh)
            c.bwd("reduce_scatter", "tp", bsh)
        else:
            c.bwd("all_reduce", "tp", bsh)
    if mesh.ep > 1:
        ep = mesh.ep
        c.fwd("all_to_all", "ep", E // ep * (ep - 1), torch.int64)
        away = k * b * s * (ep - 1) / ep * h
        for _ in range(2):  # dispatch, combine
            c.fwd("all_to_all", "ep", away)
            c.bwd("all_to_all", "ep", away)
    if t > 1:
        if cfg.bias:
            c.grad(E // mesh.ep * h)  # fc2 bias, replicated over tp
        c.row(bsh, sp)


def end_comms(cfg: N.GPTConfig, mesh: P.Mesh, b: int, seq: int, first: bool, last: bool, c: Comms) -> None:
    """Add the embedding's (first stage) and the head's (last stage) collectives on one microbatch to c.
    Under tp: the vocab-parallel lookup's partial rows summed (a forward all-reduce, or under sequence
    parallel a reduce-scatter whose backward all-gathers; the position rows' gradient summed, s·h); the
    final norm's gradients (sequence parallel), the output layer's input (`Comms.column`) and the
    cross-entropy's three forward all-reduces of b·s in fp32 (four with label smoothing)."""
    t, s, h = mesh.tp, seq // mesh.cp, cfg.hidden
    sp = cfg.sequence_parallel and t > 1
    bsh = b * s * h
    if t == 1:
        return
    if first:
        if sp:
            c.fwd("reduce_scatter", "tp", bsh, c.pdtype)
            c.param.append(dict(op="all_gather", dim="tp", elements=bsh, phase="backward", dtype=c.pdtype))
            if cfg.position == "learned":
                c.grad(s * h)
        else:
            c.fwd("all_reduce", "tp", bsh, c.pdtype)
    if last:
        if sp:
            for _ in range(2 if cfg.norm == "layernorm" else 1):
                c.grad(h)
        c.column(bsh, sp)
        for _ in range(4 if cfg.label_smoothing > 0 else 3):
            c.fwd("all_reduce", "tp", b * s, fp32_or_wider(c.adtype))


def step_comms(cfg: N.GPTConfig, mesh: P.Mesh, stages: dict, actions: list, p2p: list, buckets: list, *,
               b: int, seq: int, zero: bool, schedule: str, adtype, pdtype) -> list[dict]:
    """Every collective of one `train.train_step` on this rank, as `parallel.count_comms()` records them:
    * each microbatch through each of its chunks (one forward F in the action list): the chunk's layers'
      and ends' `Comms`; every walk of the backward redoes the activation gradients' collectives and,
      under full recompute, the layers' forward: one walk, but under zero-bubble two on all but the first
      virtual stage (I to the input, then W from the output again: autograd cannot stop halfway,
      `parallel.run_schedule`);
    * the pipeline's sends and receives: this rank's `parallel.p2p_plans` posts, [b, s/cp(/t), h] each;
    * the gradient buckets: an all-reduce, or ZeRO's reduce-scatter, of each bucket's padded numel in its
      dtype (fp32 gradients of bf16 weights) over its dim (dp, dpcp, edp), launched during the backward; the
      tied embedding's after it, first summed over "embed"; none over a dim of size 1;
    * the grad norm: one float64 element over ep (experts' squares), tp and pp, or under ZeRO over
      dp (dpcp), tp and pp; the loss (and the MoE aux loss) from the last stage over pp;
    * ZeRO: each bucket's updated slices all-gathered (phase "optimizer")."""
    out = []
    for chunk, st in stages.items():
        layers, ends = Comms(adtype, pdtype), Comms(adtype, pdtype)
        for i in st.layers:
            layer_comms(cfg, mesh, i, b, seq, layers)
        end_comms(cfg, mesh, b, seq, st.first, st.last, ends)
        walks = 2 if schedule == "zb" and not st.first else 1  # backward walks: zero-bubble's I, then W
        one = layers.forward * (1 + walks * (cfg.recompute == "full")) + ends.forward + \
            (layers.act + ends.act) * walks + layers.param + ends.param
        out += [dict(r) for a in actions if a.kind == "F" and a.chunk == chunk for r in one]
    s_msg = seq // mesh.cp // (mesh.tp if cfg.sequence_parallel and mesh.tp > 1 else 1)
    out += [dict(op=post.op, dim="pp", elements=b * s_msg * cfg.hidden, phase="backward" if post.msg.backward
                 else "forward", dtype=pdtype) for group in p2p for slot in group for post in slot]
    after = lambda dim, n=1, op="all_reduce", dtype=torch.float64: dict(op=op, dim=dim, elements=n,
                                                                        phase="after backward", dtype=dtype)
    for bucket in buckets:
        if bucket["tied"]:
            out.append(after("embed", bucket["numel"], dtype=bucket["dtype"]))
        if mesh.size(bucket["dim"]) > 1:
            out.append(after(bucket["dim"], bucket["numel"], "reduce_scatter" if zero else "all_reduce",
                             bucket["dtype"]) |
                       ({} if bucket["tied"] else dict(phase="backward")))
    norm = ("dpcp" if mesh.cp > 1 else "dp", "tp", "pp") if zero else ("ep", "tp", "pp")
    out += [after(dim) for dim in norm if mesh.size(dim) > 1]
    out += [after("pp") for _ in range(2 if cfg.experts else 1) if mesh.pp > 1]  # the loss; the aux loss
    out += [dict(op="all_gather", dim=b["dim"], elements=b["numel"], phase="optimizer", dtype=pdtype)
            for b in buckets if zero and mesh.size(b["dim"]) > 1]
    return out


def per_dim(comms: list[dict]) -> dict:
    """{(dim, op, phase): (collectives, elements, bytes)} summed over the records (bytes: elements × the
    dtype's size): the table a reader, or a cost model, wants."""
    out = {}
    for c in comms:
        n, e, nbytes = out.get((c["dim"], c["op"], c["phase"]), (0, 0, 0))
        out[c["dim"], c["op"], c["phase"]] = (n + 1, e + c["elements"], nbytes + c["elements"] * c["dtype"].itemsize)
    return out


# ---------------------------------------------------------------------------
# 5. FLOPs
# ---------------------------------------------------------------------------


def layer_flops(cfg: N.GPTConfig, tokens_b: int, seq: int) -> dict:
    """Model FLOPs (forward + backward, `nanomeg.gpt_flops`' count) of one dense layer, one MoE layer and
    the logits, for tokens_b sequences of seq tokens, read off gpt_flops itself as differences:
    dense = F(2 layers) − F(1 layer) of the dense model, logits = F(1 layer) − dense, moe = F(1 MoE layer)
    − logits. attention_forward: the two [s, s] matmuls' forward, 4·b·s²·n·d (what selective recompute
    redoes)."""
    dense_cfg = replace(cfg, experts=0, layers=1)
    one = N.gpt_flops(dense_cfg, tokens_b, seq)
    dense = N.gpt_flops(replace(dense_cfg, layers=2), tokens_b, seq) - one
    logits = one - dense
    moe = N.gpt_flops(replace(cfg, layers=1, moe_every=1), tokens_b, seq) - logits if cfg.experts else dense
    return dict(dense=dense, moe=moe, logits=logits, attention_forward=4 * tokens_b * seq * seq * cfg.heads *
                cfg.head_dim)


def stage_flops(cfg: N.GPTConfig, mesh: P.Mesh, stages: dict, b: int, seq: int, microbatches: int,
                schedule: str = "1f1b") -> dict:
    """This rank's FLOPs, per microbatch and chunk and per step: the chunk's layers (MoE or dense) and, on
    the last virtual stage, the logits; forward = 1/3, backward = 2/3 of gpt_flops' count (`model`, what
    MFU counts). `recompute` is the work this code does again, per backward walk of the chunk (one; two under
    zero-bubble off the first virtual stage, as in `step_comms`): under full recompute the layers' forward;
    under selective recompute the attention core's forward, 4·b·s²·n·d a layer (the core path only: ring
    attention and SDPA are not checkpointed); and zero-bubble's W pass, which walks the graph again from
    the output, redoes the input-gradient half of the backward. Each rank does 1/(t·cp) of its stage's
    work (tp splits every matmul, cp the tokens, and ring attention the [s, s] work evenly)."""
    f = layer_flops(cfg, b, seq)
    share = 1 / (mesh.tp * mesh.cp)
    checkpointed = cfg.recompute == "selective" and mesh.cp == 1 and cfg.attention == "core"
    chunks = {}
    for c, st in stages.items():
        layers = sum(f["moe"] if cfg.is_moe(i) else f["dense"] for i in st.layers)
        model = layers + (f["logits"] if st.last else 0)
        walks = 2 if schedule == "zb" and not st.first else 1
        redo = walks * (layers / 3 if cfg.recompute == "full" else f["attention_forward"] * len(st.layers) *
                        checkpointed) + (walks - 1) * model / 3  # zero-bubble: W redoes dX, half the backward
        chunks[c] = dict(forward=model / 3 * share, backward=2 * model / 3 * share, recompute=redo * share)
    per_step = {k: microbatches * sum(ch[k] for ch in chunks.values()) for k in ("forward", "backward", "recompute")}
    return dict(per_microbatch=chunks, **per_step, model=per_step["forward"] + per_step["backward"],
                total=sum(per_step.values()))


# ---------------------------------------------------------------------------
# 6. One rank's plan, and every kind of rank
# ---------------------------------------------------------------------------


def rank_plan(cfg: N.GPTConfig, rank: int, *, tp: int = 1, pp: int = 1, dp: int = 1, cp: int = 1, ep: int = 1,
              v: int = 1, micro_batch: int, seq: int, microbatches: int, schedule: str = "1f1b", zero: bool = False,
              bf16: bool = False, bucket_mb: float = 25.0, triton: bool = True) -> dict:
    """What global rank `rank` of the layout (tp, pp, dp, cp, ep; v chunks per pipeline rank) holds, sends
    and computes in one training step of `microbatches` microbatches of micro_batch sequences of seq tokens
    per data-parallel replica (train.py's --batch = micro_batch · microbatches), as train.py runs a GPT
    (AdamW, buckets of bucket_mb MB; ZeRO-1 with zero; bf16 weights and activations with bf16, the
    optimizer's fp32 main copy). cfg as train.py makes it (its vocab_multiple, 128·tp, pads the vocabulary).
    triton: the activations the Triton kernels keep (a GPU), or the CPU references' (False). Shapes only:
    no tensor of the model is made. ValueError naming the values for a layout the model cannot take.
    Returns (B: bytes; el: elements; per step unless said):
      mesh: the virtual `parallel.Mesh` (every dim's size and this rank's coordinate; mesh.size(d) for a
        group: "dpcp", "edp", "embed"); rank; stage: the pipeline rank; chunks: {chunk: nanomeg.Stage};
      shards: `parallel.shard_layout` rows of the parameters it holds (name, local and full shape, slice),
        with the local elements and bytes;
      params: el held; buckets: its gradient buckets (`parallel.bucket_layout`: names, dim, tied, numel);
      bytes: {weights, grads (the buckets' padded buffers, fp32 for bf16 weights), optimizer (`state_bytes`),
        activations (at the peak), total};
      activations: {total: B at the peak, chunk: {chunk: B one microbatch keeps}, terms: {chunk: [(what,
        B)]}, peak_chunks: {chunk: microbatches held at the peak}, peak_in_flight: microbatch chunks held
        at the peak (`parallel.simulate`)};
      comms: the step's collectives as `parallel.count_comms()` records {op, dim, elements, phase, dtype}
        (`step_comms`; ep's token all-to-alls: their uniform-routing expectation); `per_dim` sums them;
      flops: {per_microbatch: {chunk: {forward, backward, recompute}}, forward, backward, recompute (work
        redone: recompute, and zero-bubble's second walk), model (forward + backward: what MFU counts),
        total} on this rank (`stage_flops`);
      schedule: {name, actions: this rank's action list, simulation: `parallel.simulate` at unit costs}."""
    mesh = P.Mesh.of_rank(rank, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep)
    check_layout(cfg, mesh, v, micro_batch, seq, microbatches, schedule)
    actions, p2p, sim = schedules(schedule, pp, microbatches, v)
    mine = actions[mesh.pp_rank]
    stages = N.stages_of(cfg, mesh, v)
    specs = model_specs(cfg)
    shards = P.shard_layout(stage_shapes(cfg, mesh, v), specs, mesh)
    pdtype = torch.bfloat16 if bf16 else torch.float32
    adtype = pdtype  # train.py: the activations in the weights' dtype (bf16 weights under --bf16: no casts)
    params = meta_params(shards, pdtype)
    buckets = buckets_of(cfg, mesh, params, specs, zero=zero, bucket_mb=bucket_mb)
    elem = pdtype.itemsize
    shards = [dict(row, elements=params[row["name"]].numel(), bytes=params[row["name"]].numel() * elem)
              for row in shards]
    weights = sum(p.numel() for p in params.values()) * elem
    grads = sum(b["numel"] * b["dtype"].itemsize for b in buckets)  # fp32 for bf16 weights (18 B a parameter)
    optimizer = state_bytes(buckets, mesh, params, zero=zero, main=zero or bf16)
    acts = activation_bytes(cfg, mesh, stages, mine, micro_batch, seq, elem, triton)
    acts["peak_in_flight"] = sim["peak_in_flight"][mesh.pp_rank]
    comms = step_comms(cfg, mesh, stages, mine, p2p[mesh.pp_rank], buckets, b=micro_batch, seq=seq, zero=zero,
                       schedule=schedule, adtype=adtype, pdtype=pdtype)
    return dict(mesh=mesh, rank=rank, stage=mesh.pp_rank, chunks=stages, shards=shards,
                params=sum(p.numel() for p in params.values()), buckets=buckets,
                bytes=dict(weights=weights, grads=grads, optimizer=optimizer, activations=acts["total"],
                           total=weights + grads + optimizer + acts["total"]),
                activations=acts, comms=comms,
                flops=stage_flops(cfg, mesh, stages, micro_batch, seq, microbatches, schedule),
                schedule=dict(name=schedule, actions=mine, simulation=sim))


def layout_plans(cfg: N.GPTConfig, *, tp: int = 1, pp: int = 1, dp: int = 1, cp: int = 1, ep: int = 1, **kw) -> list:
    """One `rank_plan` per kind of rank: every pipeline stage (the first and the last hold the embedding
    and the head, interleaving gives each rank its own chunks), at tp, cp, dp and ep coordinate 0 (the
    other coordinates hold the same shapes, buckets and collectives: shards differ only in which slice).
    Each plan gains `ranks`: how many ranks of the world it stands for (tp·cp·dp)."""
    plans = []
    for stage in range(pp):
        plan = rank_plan(cfg, stage * tp * cp * dp, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, **kw)
        plan["ranks"] = tp * cp * dp
        plans.append(plan)
    return plans
