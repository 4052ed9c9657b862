"""nanomeg.py — what is computed.

The transformer core of Megatron-LM's legacy models, as pure functions over a
flat parameter dict. Read top to bottom:

1. `GPTConfig`: sizes and switches, validated with messages that name values.
2. `init_gpt` / `gpt_specs`: the full parameters (Megatron's init) and, per
   name, the dim split over tensor-parallel ranks.
3. Layers: norm, rotary and the relative bias, embedding, attention (core
   and SDPA), cross-attention, MLP,
   dropout-add, the transformer block.
4. The GPT model: forward to vocab-parallel logits, the loss.
5. Generation with a KV cache.
6. GPT-2 weights from / to Hugging Face's GPT2LMHeadModel.
7. BERT: the core with a padding mask, token types, a pooler and its heads.
8. BERT weights from / to Hugging Face.
9. T5: two stacks of the core, the decoder's blocks with cross-attention.
10. T5 weights from / to Hugging Face's T5ForConditionalGeneration.
11. Retrievers: the bi-encoder (ICT), its index and exact search, REALM.
12. DPR weights from Hugging Face.
13. Pipeline stages: GPT and BERT cut into stages, one step run by a schedule.

Every function takes this rank's parameter shards and a `parallel.Mesh`; on
`Mesh.serial()` it is the plain serial model. Activations are [b, s, h]
(under sequence parallel [b, s/t, h]); t is the tensor-parallel size.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.checkpoint import checkpoint

import kernels
import parallel as P
from parallel import Mesh

# ---------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------

CHOICES = dict(
    norm=("layernorm", "rmsnorm"),
    activation=("gelu", "gelu_tanh", "relu", "swiglu", "geglu"),  # the last two gated: act(gate) * up
    position=("learned", "rope", "relative"),  # relative: T5's bucketed bias on the attention scores
    attention=("core", "sdpa"),
    recompute=("none", "selective", "full"),
    norm_order=("pre", "post"),
    task=("pretrain", "classify", "multiple_choice"),  # BertConfig
    pooling=("cls", "ict"),  # BiEncoderConfig
)


# Ranges of the config fields; their types come from the annotations. Shared
# by every model's config, so a nan, a float size or a string switch is caught
# in one place, with the field named.
FIELD_RANGES = {
    **dict.fromkeys(("vocab_size", "max_seq", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab_multiple",
                     "num_classes", "kv_channels", "decoder_layers", "rel_max_distance"), (">=", 1)),
    "rel_buckets": (">=", 4),
    **dict.fromkeys(("norm_eps", "rope_base"), (">", 0)),
    **dict.fromkeys(("init_std", "type_vocab", "projection_dim"), (">=", 0)),
    "top_k": (">=", 1),
    **dict.fromkeys(("experts", "moe_aux_loss", "moe_z_loss"), (">=", 0)),
    **dict.fromkeys(("moe_topk", "moe_every"), (">=", 1)),
    "moe_capacity": (">", 0),
    **dict.fromkeys(("hidden_dropout", "attention_dropout", "label_smoothing"), ("in [0, 1)", None)),
}


def _has_type(value, kind: str) -> bool:
    """int: an integer, not a bool; float: a finite real number, not a bool; bool: True or False only."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) if kind == "int" else math.isfinite(value)


def shape_of(x) -> tuple | str:
    """For error messages: x's shape, or its type's name when x is no tensor."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_id_tensor(x, shape: tuple, name: str, high: int | None = None, what: str = "id") -> None:
    """ValueError naming `name` unless x is an int64 (or int32) tensor of
    exactly `shape` (None: any size in that dim), with every value (a `what`)
    in [0, high) when high is given. Exactly: ids, labels or gold indices
    that only broadcast to the shape ([m, 1] for [m]) would score wrong pairs."""
    if not isinstance(x, torch.Tensor) or x.dtype not in P.ID_DTYPES or x.dim() != len(shape) or \
            any(n is not None and n != got for n, got in zip(shape, x.shape)):
        want = ", ".join("*" if n is None else str(n) for n in shape)
        got = f"{shape_of(x)} {getattr(x, 'dtype', '')}".rstrip()
        raise ValueError(f"{name} must be an int64 (or int32) tensor of shape [{want}], got {got}")
    if high is not None:
        P.check_ids(x, high, what)


def check_fields(cfg) -> None:
    """ValueError naming the field unless every field of the dataclass `cfg`
    has its annotated type (`int`, `float` (finite), `bool`, `str`; `X | None`
    also takes None), is in FIELD_RANGES, and is one of CHOICES."""
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), f.type.removesuffix(" | None")
        if value is None and f.type.endswith("| None"):
            continue
        if not _has_type(value, kind):
            what = {"int": "an integer", "float": "a finite number", "bool": "True or False", "str": "a string"}[kind]
            raise ValueError(f"{f.name} must be {what}, got {value!r} ({type(value).__name__})")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ValueError(f"{f.name}={value!r} is not one of {CHOICES[f.name]}")
        op, bound = FIELD_RANGES.get(f.name, (None, None))
        if (op == ">=" and value < bound) or (op == ">" and value <= bound) or \
                (op == "in [0, 1)" and not 0.0 <= value < 1.0):
            raise ValueError(f"{f.name} must be {op} {'' if bound is None else bound}".rstrip()
                             + f", got {value}")


@dataclass(frozen=True)
class GPTConfig:
    """The shared core's config: every switch the layers of section 3 read.
    GPT uses it as it is; `BertConfig` (section 7) adds BERT's heads."""

    vocab_size: int = 256
    max_seq: int = 256  # rows of the position table / longest sequence
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int | None = None  # None: = heads (MHA); 1: MQA; else GQA
    kv_channels: int | None = None  # the head dim (Megatron's kv_channels, T5's d_kv); None: hidden / heads
    ffn: int | None = None  # None: 4 * hidden
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    zero_centered_gamma: bool = False  # Megatron's LayerNorm "1p": weight stored as w - 1
    activation: str = "gelu"
    position: str = "learned"
    rope_base: float = 10000.0
    rel_buckets: int = 32  # position="relative": buckets of T5's relative distances (half exact, half log-spaced)
    rel_max_distance: int = 128  # ... and the distance from which all fall into the last bucket
    bias: bool = True  # biases of the linear layers
    tie_embeddings: bool = True
    scale_output: bool = False  # x * hidden^-0.5 before the output layer (T5 v1.0's tied head)
    residual_post_norm: bool = False  # Megatron's apply_residual_connection_post_layernorm
    norm_order: str = "pre"  # pre: x + f(norm(x)), a final norm; post (original BERT): norm(x + f(x)), embedding norm
    type_vocab: int = 0  # token types (BERT's segment ids) added to the embedding; 0: none
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention: str = "core"  # core: QK^T -> fused softmax -> dropout -> .V;  sdpa: torch's fused path
    scale_attention: bool = True  # scores / sqrt(head dim); Google's T5 does not scale (its init does instead)
    recompute: str = "none"  # activation recompute: selective = the attention core only
    sequence_parallel: bool = False
    init_std: float = 0.02
    vocab_multiple: int = 128  # Megatron's make-vocab-size-divisible-by (times tp, set by train.py)
    label_smoothing: float = 0.0
    # Mixture of experts (`moe_mlp`): 0 experts keeps every MLP dense.
    experts: int = 0  # experts per MoE layer, each an MLP of ffn hidden units
    moe_topk: int = 1  # experts per token: 1 is Switch (Megatron's SwitchMLP), 2 is Mixtral
    moe_renormalize: bool | None = None  # top-k gates / their sum; None: when moe_topk > 1 (Mixtral: always)
    moe_every: int = 1  # layer i is a MoE layer when i % moe_every == 0 (Megatron's moe_layer_freq)
    moe_capacity: float | None = None  # None: dropless; c: each expert takes <= ceil(c·s·k/E) choices per sequence
    moe_aux_loss: float = 0.01  # weight of the load-balancing loss E·Σ_i f_i·P_i (Switch)
    moe_z_loss: float = 0.0  # weight of the router z-loss mean(logsumexp(logits)²) (ST-MoE)
    context_parallel: ClassVar[bool] = True  # ring attention over the causal stack: GPT's; BERT's and T5's: False

    def __post_init__(self):
        check_fields(self)
        if self.kv_channels is None and self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.num_kv_heads:
            raise ValueError(f"heads={self.heads} is not divisible by kv_heads={self.num_kv_heads}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.head_dim}")
        if self.position == "relative" and self.rel_max_distance <= self.rel_buckets // 2:
            raise ValueError(f"rel_max_distance={self.rel_max_distance} must be above rel_buckets/2 = "
                             f"{self.rel_buckets // 2} (the exactly-counted distances of a causal stack)")
        if self.attention == "sdpa" and self.attention_dropout > 0:
            raise ValueError("attention='sdpa' has no counter-based dropout: use attention='core' "
                             f"with attention_dropout={self.attention_dropout}")
        if self.experts and self.moe_topk > self.experts:
            raise ValueError(f"moe_topk={self.moe_topk} is more than experts={self.experts}: a token cannot choose "
                             "more experts than there are")
        if self.norm_order == "post" and self.residual_post_norm:
            raise ValueError("residual_post_norm=True is a pre-norm option; norm_order='post' already adds the "
                             "residual before the norm")

    # kv_heads and ffn stay as given (None: the default), so dataclasses.replace(cfg, heads=...)
    # re-derives them; these two properties are the resolved sizes.
    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def ffn_hidden(self) -> int:
        return 4 * self.hidden if self.ffn is None else self.ffn

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads if self.kv_channels is None else self.kv_channels

    @property
    def gated(self) -> bool:
        """SwiGLU / GeGLU: fc1 makes a gate and an up projection, act(gate) * up."""
        return self.activation in ("swiglu", "geglu")

    @property
    def renormalizes_gates(self) -> bool:
        """Whether a token's top-k gates are divided by their sum (at k = 1 that makes the gate 1)."""
        return self.moe_topk > 1 if self.moe_renormalize is None else self.moe_renormalize

    def is_moe(self, i: int) -> bool:
        """Whether layer i's MLP is a mixture of experts."""
        return self.experts > 0 and i % self.moe_every == 0

    def stacks(self) -> dict[str, int]:
        """Parameter-name prefix of each layer stack -> its layer count."""
        return {"": self.layers}

    @property
    def padded_vocab(self) -> int:
        """vocab_size rounded up to a multiple of vocab_multiple; the extra
        rows never win a softmax, a loss or a sample."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def check_mesh(self, mesh: Mesh) -> None:
        """ValueError naming the sizes if this model cannot be split over mesh.
        With more tp ranks than kv heads, each kv head is replicated over
        tp/kv_heads ranks (`parallel.HeadGroups`), so one must divide the other.
        cp > 1: GPT only (`context_parallel`), learned or rotary, no experts.
        Every model's entry points call it first, before any collective."""
        t = mesh.tp
        for name, n in (("heads", self.heads), ("ffn", self.ffn_hidden), ("padded vocab", self.padded_vocab)):
            if n % t:
                also = " (nor the relative-bias table's columns, one per head)" if name == "heads" and \
                    self.position == "relative" else ""
                raise ValueError(f"tp={t} does not divide {name}={n}{also}")
        if self.num_kv_heads % t and t % self.num_kv_heads:
            raise ValueError(f"tp={t} and kv_heads={self.num_kv_heads}: one must divide the other (tp > kv_heads "
                             "replicates each kv head over tp/kv_heads ranks)")
        if mesh.cp > 1:
            if not self.context_parallel:
                raise ValueError(f"cp={mesh.cp}: context parallelism is built for GPT, not {type(self).__name__} "
                                 "(run it with cp=1)")
            cannot = {k: getattr(self, k) for k, ok in (("position", ("learned", "rope")), ("experts", (0,)))
                      if getattr(self, k) not in ok}
            if cannot:
                raise ValueError(f"cp={mesh.cp}: context parallelism is built for learned or rotary positions "
                                 f"without experts, got {cannot}")
        if mesh.ep > 1 and not self.experts:
            raise ValueError(f"ep={mesh.ep} needs a mixture-of-experts model (experts > 0), got experts=0")
        if self.experts % mesh.ep:
            raise ValueError(f"experts={self.experts} is not divisible by ep={mesh.ep}: each ep rank holds "
                             "experts/ep whole experts")

    def check_seq(self, s: int, mesh: Mesh, pos_offset: int = 0) -> None:
        """ValueError unless a whole sequence of s tokens (after pos_offset)
        fits max_seq and cuts as the mesh needs: into 2·cp equal chunks under
        context parallel, each rank's s/cp tokens over tp under sequence parallel."""
        if pos_offset + s > self.max_seq:
            raise ValueError(f"sequence of {pos_offset + s} tokens is longer than max_seq={self.max_seq}")
        if mesh.cp > 1:
            P.check_cp_seq(s, mesh)
        if self.sequence_parallel and s // mesh.cp % mesh.tp:
            raise ValueError(f"sequence parallel needs seq % tp == 0, got seq={s}, tp={mesh.tp}" if mesh.cp == 1 else
                             f"sequence parallel under cp needs each cp rank's seq/cp tokens divisible by tp, got "
                             f"seq={s}, cp={mesh.cp}, tp={mesh.tp}")



# ---------------------------------------------------------------------------
# 2. Parameters: init (full, the same on every rank) and sharding specs
# ---------------------------------------------------------------------------


def norm_shapes(name: str, cfg: GPTConfig) -> dict:
    """A norm's weight [h] (and bias [h] for LayerNorm)."""
    return {f"{name}.weight": ((cfg.hidden,), "gamma")} | (
        {f"{name}.bias": ((cfg.hidden,), "zeros")} if cfg.norm == "layernorm" else {})


def linear_shapes(name: str, out: int, inp: int, rule: str, bias: bool) -> dict:
    """A linear layer's weight [out, inp] (and bias [out])."""
    return {f"{name}.weight": ((out, inp), rule)} | ({f"{name}.bias": ((out,), "zeros")} if bias else {})


def embedding_shapes(cfg: GPTConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The embedding: word rows [padded V, h], learned positions [max_seq, h],
    token types [type_vocab, h], and a post-norm stack's embedding norm."""
    h = cfg.hidden
    shapes = {"embed.word": ((cfg.padded_vocab, h), "normal")}
    if cfg.position == "learned":
        shapes["embed.pos"] = ((cfg.max_seq, h), "normal")
    if cfg.type_vocab:
        shapes["embed.type"] = ((cfg.type_vocab, h), "normal")
    if cfg.norm_order == "post":
        shapes |= norm_shapes("embed.norm", cfg)
    return shapes


def layer_shapes(cfg: GPTConfig, layers: int, cross: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """A stack of `layers` blocks, then the final norm (pre-norm) and the
    relative-bias table [buckets, heads] (position="relative": one per stack,
    shared by its layers). cross: each block also attends to an encoder's
    output (T5's decoder): ln_cross, cross_attn.q [n·d, h], cross_attn.kv
    [2·n·d, h] (rows per head [k_i, v_i]), cross_attn.proj [h, n·d].
    Layouts: qkv rows grouped per kv head as [q heads of the group, k, v];
    gated fc1 rows interleaved [gate_i, up_i]; so a contiguous tp slice of
    either always holds whole heads / matching halves."""
    h, inner = cfg.hidden, cfg.heads * cfg.head_dim
    qkv = (cfg.heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    fc1 = cfg.ffn_hidden * (2 if cfg.gated else 1)
    shapes = {}
    for i in range(layers):
        pre = f"layers.{i}"
        shapes |= norm_shapes(f"{pre}.ln1", cfg) | linear_shapes(f"{pre}.attn.qkv", qkv, h, "normal", cfg.bias) \
            | linear_shapes(f"{pre}.attn.proj", h, inner, "scaled", cfg.bias)
        if cross:
            shapes |= norm_shapes(f"{pre}.ln_cross", cfg) \
                | linear_shapes(f"{pre}.cross_attn.q", inner, h, "normal", cfg.bias) \
                | linear_shapes(f"{pre}.cross_attn.kv", 2 * inner, h, "normal", cfg.bias) \
                | linear_shapes(f"{pre}.cross_attn.proj", h, inner, "scaled", cfg.bias)
        shapes |= norm_shapes(f"{pre}.ln2", cfg)
        shapes |= moe_shapes(f"{pre}.moe", cfg) if cfg.is_moe(i) else \
            linear_shapes(f"{pre}.mlp.fc1", fc1, h, "normal", cfg.bias) \
            | linear_shapes(f"{pre}.mlp.fc2", h, cfg.ffn_hidden, "scaled", cfg.bias)
    if cfg.norm_order == "pre":
        shapes |= norm_shapes("final_norm", cfg)
    if cfg.position == "relative":
        shapes["rel_bias"] = ((cfg.rel_buckets, cfg.heads), "normal")
    return shapes


def moe_shapes(name: str, cfg: GPTConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """A mixture-of-experts MLP: the router [E, h] (no bias), and E experts'
    fc1 [E, f(·2), h] and fc2 [E, h, f] stacked on dim 0 (with biases
    [E, f(·2)], [E, h]); each expert's rows laid out as the dense MLP's."""
    E, h, f = cfg.experts, cfg.hidden, cfg.ffn_hidden
    fc1 = f * (2 if cfg.gated else 1)
    shapes = {f"{name}.router.weight": ((E, h), "normal"), f"{name}.fc1.weight": ((E, fc1, h), "normal")}
    shapes |= {f"{name}.fc1.bias": ((E, fc1), "zeros")} if cfg.bias else {}
    shapes[f"{name}.fc2.weight"] = ((E, h, f), "scaled")
    return shapes | ({f"{name}.fc2.bias": ((E, h), "zeros")} if cfg.bias else {})


def stack_shapes(cfg: GPTConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shared core's parameters, GPT's and BERT's: the embedding and one
    stack of cfg.layers blocks. name -> (full shape, init rule), in a fixed
    order. Init rules: normal, scaled (the residual branch ends), gamma (norm
    weights), zeros (biases)."""
    return embedding_shapes(cfg) | layer_shapes(cfg, cfg.layers)


def gpt_shapes(cfg: GPTConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """GPT: the core stack plus, when untied, its own output layer."""
    shapes = stack_shapes(cfg)
    if not cfg.tie_embeddings:
        shapes["head.weight"] = ((cfg.padded_vocab, cfg.hidden), "normal")
    return shapes


def num_params(cfg: GPTConfig, shapes_of=None) -> int:
    """Elements of the full (padded-vocabulary) parameters of a model whose
    shapes come from shapes_of (default: gpt_shapes), from one layer's shapes
    per stack times the stack's layer count: O(1) in the layers, so a size
    can be checked before anything is allocated."""
    count = lambda shapes: sum(math.prod(shape) for shape, _ in shapes.values())
    if getattr(cfg, "experts", 0) and cfg.moe_every > 1:  # layers differ (MoE or dense): count them all
        return count((shapes_of or gpt_shapes)(cfg))
    stacks = cfg.stacks()
    one = (shapes_of or gpt_shapes)(replace(cfg, layers=1, **({"decoder_layers": 1} if isinstance(cfg, T5Config)
                                                               else {})))
    total = count(one)
    for prefix, layers in stacks.items():
        total += (layers - 1) * count({k: v for k, v in one.items() if k.startswith(f"{prefix}layers.0.")})
    return total


def init_gpt(cfg: GPTConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full GPT parameters, the same on every rank (see `init_params`)."""
    return init_params(gpt_shapes(cfg), cfg, seed, dtype)


def pad_vocab_rows(t: torch.Tensor, padded: int) -> torch.Tensor:
    """t [V, ...] -> [padded, ...]: zero rows for the padded vocabulary ids."""
    return torch.cat([t, t.new_zeros((padded - t.shape[0], *t.shape[1:]))])


def init_params(shapes: dict, cfg: GPTConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full parameters of `shapes` (name -> (shape, rule)), with Megatron's
    init: normal(0, init_std) for every matrix, the output projections of
    attention and MLP scaled by 1/sqrt(2 * layers), norm weights 1 (0 when
    zero-centred, applied as 1 + w), biases 0.

    Layout-independent: each tensor is drawn from its own generator, keyed
    by (seed, name), and a vocabulary-sized tensor draws only its real rows
    (the padding rows are zeros). So the full parameters are the same
    whatever tp (and so the padding multiple), the other names or their
    order: a model cut over 4 ranks starts exactly where the uncut one does."""
    std = {"normal": cfg.init_std, "scaled": cfg.init_std / math.sqrt(2 * cfg.layers)}
    params = {}
    for name, (shape, rule) in shapes.items():
        if rule in std:
            real = (real_vocab_rows(name, shape, cfg), *shape[1:]) if real_vocab_rows(name, shape, cfg) else shape
            draw = torch.randn(real, generator=param_generator(seed, name)) * std[rule]
            params[name] = pad_vocab_rows(draw, shape[0]).to(dtype)
        else:
            fill = 1.0 if rule == "gamma" and not cfg.zero_centered_gamma else 0.0
            params[name] = torch.full(shape, fill, dtype=dtype)
    return params


VOCAB_ROWS = ("embed.word", "head.weight", "lm_head.bias")  # tensors with one row per (padded) vocabulary id


def real_vocab_rows(name: str, shape: tuple, cfg: GPTConfig) -> int | None:
    """cfg.vocab_size when `name` (under any stack prefix: "query.embed.word")
    is a vocabulary table whose full rows are the padded vocabulary, else
    None. Its rows beyond the real vocabulary are padding: zeros at init,
    never saved in a checkpoint."""
    table = any(name == v or name.endswith("." + v) for v in VOCAB_ROWS)
    return cfg.vocab_size if table and shape[0] == cfg.padded_vocab else None


def param_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one parameter: a pure function of (seed, name)."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


# The tensor-parallel split, by parameter name without its "layers.{i}." prefix:
# column-parallel weights and biases split dim 0 (output features), row-parallel
# weights dim 1 (input features); everything else is replicated.
# (attn.qkv is split by whole kv-head groups: `qkv_split`.)
TP_SPLIT = {"embed.word": 0, "head.weight": 0, "lm_head.bias": 0, "attn.proj.weight": 1, "mlp.fc1.weight": 0,
            "mlp.fc1.bias": 0, "mlp.fc2.weight": 1, "rel_bias": 1, "cross_attn.proj.weight": 1,
            **dict.fromkeys((f"cross_attn.{w}.{part}" for w in ("q", "kv") for part in ("weight", "bias")), 0)}
# (the relative-bias table [buckets, heads] by its head columns, as the heads;
# the output bias beside a vocab-parallel output layer by vocabulary rows)
# A MoE layer's experts: stacked on dim 0, which ep splits; inside, tp splits
# each expert as the dense MLP (fc1 rows, fc2 columns; fc2's bias replicated).
TP_SPLIT |= {"moe.fc1.weight": P.Experts(1), "moe.fc1.bias": P.Experts(1), "moe.fc2.weight": P.Experts(2),
             "moe.fc2.bias": P.Experts(None)}


def qkv_split(cfg: GPTConfig) -> P.HeadGroups:
    """The tp split of the fused qkv rows: whole kv-head groups per rank, or,
    with more ranks than kv heads, each kv head replicated over tp/kv_heads."""
    return P.HeadGroups(cfg.num_kv_heads, cfg.heads // cfg.num_kv_heads, cfg.head_dim)


def gpt_specs(cfg: GPTConfig) -> dict[str, int | P.HeadGroups | None]:
    """name -> the dim split over tp (qkv: a `parallel.HeadGroups`), or None for replicated."""
    return _stack_specs(gpt_shapes(cfg), cfg)


def _stack_specs(shapes: dict, cfg: GPTConfig) -> dict[str, int | P.HeadGroups | None]:
    """The split of every name in `shapes` by the core's rules (TP_SPLIT, qkv_split).
    A name is looked up without its stack and layer ("decoder.layers.3.")."""
    local = lambda name: re.sub(r"^(encoder\.|decoder\.|query\.|context\.|reader\.)?(layers\.\d+\.)?", "", name)
    split = lambda name: qkv_split(cfg) if local(name).startswith("attn.qkv.") else TP_SPLIT.get(local(name))
    return {name: split(name) for name in shapes}


# ---------------------------------------------------------------------------
# 3. Layers
# ---------------------------------------------------------------------------


def allreduce_grad_if_sp(param, cfg: GPTConfig, mesh: Mesh):
    """A replicated parameter (norm weight, row-parallel bias, position or
    token-type rows, BERT's LM-head dense) used on a sequence-parallel
    activation [b, s/t, h]: each tp rank sees only its s/t tokens, so its
    gradient is partial. Under sequence parallel the parameter passes through
    `parallel.sync_replicated_grad`, whose backward ALL-REDUCES THE GRADIENT
    OVER TP (param.numel() elements); without it, a no-op. `clip_grad_norm`
    counts replicated gradients once, which is right only because of this."""
    return P.sync_replicated_grad(param, mesh) if cfg.sequence_parallel and param is not None else param


def norm(params, prefix, x, cfg: GPTConfig, mesh: Mesh):
    """LayerNorm or RMSNorm over the last dim, through the fused kernel.
    x: [b, s(/t), h] -> same shape. Weights are replicated on every tp rank."""
    w = allreduce_grad_if_sp(params[f"{prefix}.weight"], cfg, mesh)
    if cfg.norm == "rmsnorm":
        return kernels.rms_norm(x, w, cfg.norm_eps, zero_centered_gamma=cfg.zero_centered_gamma)
    b = allreduce_grad_if_sp(params.get(f"{prefix}.bias"), cfg, mesh)
    return kernels.layer_norm(x, w, b, cfg.norm_eps, zero_centered_gamma=cfg.zero_centered_gamma)


def rotary(x, positions, base: float):
    """Rotary position embedding (rotate-half form, as Megatron and GPT-NeoX).
    x: [b, n, s, d], positions: [s] -> [b, n, s, d]."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # [d/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None]  # [s, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def hidden_dropout(x, p, cfg: GPTConfig, mesh: Mesh, *, seed, stream, training):
    """Dropout on a hidden state [b, s(/t), h]. Under sequence parallel this
    rank holds sequence chunk tp_rank, and under data parallel batch rows
    dp_rank·b onwards, so its mask is that slice of the global batch's one:
    a run over dp replicas draws what one process on the whole batch does."""
    if not training or p == 0.0:
        return x
    b, s, h = x.shape
    row, rows = mesh.batch_rows(b)  # this replica's (and microbatch's) rows of the global batch
    t = mesh.tp if cfg.sequence_parallel else 1
    at = mesh.tp_rank * s if t > 1 else 0  # this rank's first position of the (cp rank's) sequence
    if mesh.cp > 1:  # the cp rank's two chunks: the global positions of its tokens
        at = P.cp_positions(s * t * mesh.cp, mesh, device=x.device)[at: at + s]
    return P.dropout(x, p, seed=seed, stream=stream, offset=(row, at, 0), global_shape=(rows, s * t * mesh.cp, h))


def embed(params, ids, cfg: GPTConfig, mesh: Mesh, *, token_types=None, seed=0, training=False, pos_offset=0,
          stream="embed"):
    """Token ids [b, s] -> hidden [b, s, h] ([b, s/t, h] under sequence parallel).
    Word rows are vocab-parallel (an all-reduce, or a reduce-scatter along s);
    learned positions and token types [b, s] (BERT's segments; default all 0)
    are replicated and added to this rank's sequence chunk. Post-norm models
    normalise the sum (BERT's embedding LayerNorm); then dropout."""
    check_id_tensor(ids, (None, None), "ids")  # the range: by the vocab-parallel lookup
    cfg.check_seq(ids.shape[1] * mesh.cp, mesh, pos_offset)  # under cp, ids are this rank's two chunks
    check_token_types(token_types, ids, cfg)
    x = P.vocab_parallel_embedding(ids, params["embed.word"], mesh,
                                   sequence_parallel=cfg.sequence_parallel, vocab_size=cfg.vocab_size)
    local = lambda rows, dim: P.split(rows, mesh, "tp", dim) if cfg.sequence_parallel else rows  # this chunk of s
    if cfg.position == "learned":
        rows = params["embed.pos"][pos_offset: pos_offset + ids.shape[1]] if mesh.cp == 1 else \
            params["embed.pos"].index_select(0, P.cp_positions(ids.shape[1] * mesh.cp, mesh, device=ids.device))
        x = x + local(allreduce_grad_if_sp(rows, cfg, mesh), 0)
    if cfg.type_vocab:
        types = torch.zeros_like(ids) if token_types is None else token_types
        x = x + local(F.embedding(types, allreduce_grad_if_sp(params["embed.type"], cfg, mesh)), 1)  # [b, s(/t), h]
    if cfg.norm_order == "post":
        x = norm(params, "embed.norm", x, cfg, mesh)
    return hidden_dropout(x, cfg.hidden_dropout, cfg, mesh, seed=seed, stream=stream, training=training)


def check_token_types(token_types, ids, cfg: GPTConfig) -> None:
    """ValueError unless token_types is None or integer [b, s] like ids, with
    every id in [0, type_vocab); a model without token types takes none."""
    if token_types is None:
        return
    if not cfg.type_vocab:
        raise ValueError("token_types given, but the model has none (type_vocab=0)")
    if not isinstance(token_types, torch.Tensor) or token_types.shape != ids.shape:
        raise ValueError(f"token_types shape {shape_of(token_types)} != ids shape {tuple(ids.shape)}")
    P.check_ids(token_types, cfg.type_vocab, "token type id")


def core_attention(q, k, v, cfg: GPTConfig, mesh: Mesh, *, mask_kind, mask, bias=None, seed, stream, training):
    """Megatron's CoreAttention, the path a student reads.
    q: [b, n/t, sq, d]; k, v: [b, g/t, sk, d] (g kv heads) -> [b, n/t, sq, d].
    scores = q k^T (/ sqrt(d)) (+ relative bias [1, n/t, sq, sk]) -> fused
    scale-mask-softmax -> dropout -> probs v."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query: each kv head serves `groups` query heads
        k = repeat(k, "b g s d -> b (g r) s d", r=groups)
        v = repeat(v, "b g s d -> b (g r) s d", r=groups)
    scores = q @ k.transpose(-1, -2)  # [b, n/t, sq, sk]
    scale = attention_scale(q, cfg)
    if bias is not None:  # the bias is added after the scale; the kernel then scales by 1
        scores, scale = scores * scale + bias, 1.0
    probs = kernels.scale_mask_softmax(scores, scale=scale, mask_kind=mask_kind, mask=mask)
    if training and cfg.attention_dropout > 0:
        b, n_local, sq, sk = probs.shape  # this rank holds heads [tp_rank*n/t, (tp_rank+1)*n/t)
        row, rows = mesh.batch_rows(b)
        probs = P.dropout(probs, cfg.attention_dropout, seed=seed, stream=stream,
                          offset=(row, mesh.tp_rank * n_local, 0, 0), global_shape=(rows, n_local * mesh.tp, sq, sk))
    return probs.to(v.dtype) @ v


def attention_scale(q, cfg: GPTConfig) -> float:
    """1/sqrt(head dim), or 1 for Google's T5 (scale_attention=False)."""
    return 1.0 / math.sqrt(q.shape[-1]) if cfg.scale_attention else 1.0


def sdpa_attention(q, k, v, *, mask_kind, mask, bias=None, scale=None):
    """The fast path: torch's fused scaled_dot_product_attention (flash or
    memory-efficient kernels on GPU). Same shapes as core_attention.
    Megatron's mask is True = masked out; SDPA's is True = attend (or a float
    mask, added: how the relative bias goes in); scale: None for 1/sqrt(d). A query that may see no key
    (a padded query under BERT's mask) gets zeros, as from the fused softmax,
    where SDPA alone would give NaN."""
    sq, sk = q.shape[-2], k.shape[-2]
    if mask_kind == "causal" and (sq != sk or bias is not None):  # shifted diagonal, or a bias to add: a tensor
        mask_kind, mask = "padding", causal_mask(sq, sk, q.device)
    attend, blind = None, None
    if mask_kind == "padding":
        blind = mask.all(dim=-1, keepdim=True)  # [b|1, n|1, sq|1, 1]: rows with nothing to see
        attend = ~mask | blind  # let them see everything, then zero their output
    if bias is not None:
        attend = bias if attend is None else bias.masked_fill(~attend, float("-inf"))
        attend = attend.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, is_causal=mask_kind == "causal",
                                         scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out if blind is None else out.masked_fill(blind, 0.0)


def causal_mask(sq: int, sk: int, device=None):
    """[sq, sk] bool, True = masked: query i (aligned to the end) sees keys j <= i + sk - sq."""
    i = torch.arange(sq, device=device)[:, None]
    return torch.arange(sk, device=device)[None] > i + (sk - sq)


def relative_buckets(sq: int, sk: int, cfg: GPTConfig, *, bidirectional: bool, q_offset: int = 0, device=None):
    """T5's bucketed relative positions: [sq, sk] long in [0, rel_buckets).
    The distance key - query (queries at q_offset + i, keys at j): half the
    buckets count small distances exactly, the rest grow logarithmically up
    to rel_max_distance, beyond which all share the last. Bidirectional (an
    encoder) gives keys after the query their own half of the buckets; a
    causal stack has only keys at or before the query."""
    distance = torch.arange(sk, device=device)[None] - torch.arange(q_offset, q_offset + sq, device=device)[:, None]
    buckets, base = cfg.rel_buckets, torch.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        base = (distance > 0).long() * buckets  # keys ahead of the query: the upper half
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)  # how far back the key is (a later key is masked anyway)
    exact = buckets // 2
    # float32, in Mesh TensorFlow's order of operations: at distances where the bucket is an integer in
    # exact arithmetic, float64 would round to the other side of it than every trained T5 checkpoint
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(cfg.rel_max_distance / exact)
    far = (exact + (log_ratio * (buckets - exact)).long()).clamp(max=buckets - 1)
    return base + torch.where(distance < exact, distance, far)


def position_bias(params, sq: int, sk: int, cfg: GPTConfig, *, bidirectional: bool, q_offset: int = 0):
    """The relative-position bias of one stack: -> [1, n/t, sq, sk], added to
    every layer's attention scores. The table rel_bias [buckets, n/t] is
    split over tp by heads like the heads themselves, so each rank looks up
    only its own heads' columns; the full [sq, sk] grid is made on every rank
    (attention sees the whole sequence even under sequence parallel), so the
    table's gradient is already complete: no collective."""
    table = params["rel_bias"]
    buckets = relative_buckets(sq, sk, cfg, bidirectional=bidirectional, q_offset=q_offset, device=table.device)
    return rearrange(F.embedding(buckets, table), "sq sk n -> 1 n sq sk")


def attend(q, k, v, cfg: GPTConfig, mesh: Mesh, *, mask_kind, mask, bias, seed, stream, training):
    """Self- or cross-attention's core: q [b, n/t, sq, d], k, v [b, g/t, sk, d]
    -> context [b, sq, n/t·d], by cfg.attention's path. The mask is checked
    the same way for both paths."""
    if mesh.cp > 1:  # this rank's queries against the whole sequence's k/v, passed around the cp ring
        if bias is not None:
            raise ValueError("context parallelism has no relative-position bias")
        drop = None
        if training and cfg.attention_dropout > 0:  # the mask core_attention draws, at this rank's positions
            row, rows = mesh.batch_rows(q.shape[0])
            drop = (cfg.attention_dropout, seed, stream, row, rows, mesh.tp_rank * q.shape[1], q.shape[1] * mesh.tp)
        ctx = P.ring_attention(q, k, v, mesh, scale=attention_scale(q, cfg), causal=mask_kind == "causal",
                               mask=mask if mask_kind == "padding" else None, dropout=drop)
        return rearrange(ctx, "b n s d -> b s (n d)")
    kernels.check_mask(mask_kind, mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.device)
    if cfg.attention == "sdpa":
        ctx = sdpa_attention(q, k, v, mask_kind=mask_kind, mask=mask, bias=bias, scale=attention_scale(q, cfg))
    else:
        core = lambda q, k, v, bias: core_attention(q, k, v, cfg, mesh, mask_kind=mask_kind, mask=mask, bias=bias,
                                                    seed=seed, stream=stream, training=training)
        # selective recompute: keep only q, k, v; redo the s^2-sized softmax and dropout in backward
        ctx = checkpoint(core, q, k, v, bias, use_reentrant=False) if cfg.recompute == "selective" \
            else core(q, k, v, bias)
    return rearrange(ctx, "b n s d -> b s (n d)")


def attention(params, prefix, x, cfg: GPTConfig, mesh: Mesh, *, mask_kind, mask=None, bias=None, seed=0, stream=0,
              training=False, cache=None, pos_offset=0):
    """Self-attention. x: [b, s(/t), h] -> out [b, s(/t), h].

    qkv is column-parallel: this rank computes whole heads, n/t query and g/t
    kv heads (one replicated kv head when t > g); proj is row-parallel: partial outputs summed over tp (or
    reduce-scattered along s). The proj bias is added once, after the sum
    (in the matmul itself at tp = 1). `cache` (a dict, decoding only) keeps k and v.
    bias: the relative-position bias [1, n/t, sq, sk] (`position_bias`) or None."""
    split = qkv_split(cfg)  # with tp > kv heads each kv head is replicated: its grad summed over the replicas
    weight, qkv_bias = (P.sync_kv_replica_grad(params.get(f"{prefix}.qkv.{n}"), split, mesh)
                        for n in ("weight", "bias"))
    qkv = P.column_parallel_linear(x, weight, qkv_bias, mesh,
                                   sequence_parallel=cfg.sequence_parallel)  # [b, s, (n/t + 2 g_local) d]
    # The qkv rows, grouped per kv head (GQA, 4 query heads, 2 kv heads, tp = 2):
    #   full:    [q0 q1 k0 v0 | q2 q3 k1 v1]      each entry head_dim rows
    #   rank 0:  [q0 q1 k0 v0]    rank 1: [q2 q3 k1 v1]    (a contiguous half)
    # MQA (1 kv head) at tp = 2: the kv head is replicated (parallel.HeadGroups):
    #   full:    [q0 q1 q2 q3 k0 v0]
    #   rank 0:  [q0 q1 k0 v0]    rank 1: [q2 q3 k0 v0]
    local_kv_groups = max(1, cfg.num_kv_heads // mesh.tp)  # kv heads on this rank
    q_per_group = cfg.heads // mesh.tp // local_kv_groups  # query heads per local kv head
    qkv = rearrange(qkv, "b s (kv_group rows_per_group d) -> b s kv_group rows_per_group d",
                    kv_group=local_kv_groups, rows_per_group=q_per_group + 2, d=cfg.head_dim)
    # one split of each group's rows, before any transpose: its backward is one cat that writes qkv's
    # gradient in qkv's own layout (split after moving s, and a second copy would put it back)
    q, k, v = qkv.split([q_per_group, 1, 1], dim=3)
    q = rearrange(q, "b s kv_group q d -> b (kv_group q) s d")  # [b, n/t, s, d]
    k, v = k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)  # [b, g/t, s, d]
    if cfg.position == "rope":  # under cp this rank's two chunks (see parallel.cp_positions)
        positions = torch.arange(pos_offset, pos_offset + q.shape[2], device=x.device) if mesh.cp == 1 else \
            P.cp_positions(q.shape[2] * mesh.cp, mesh, device=x.device)
        q, k = rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base)
    if cache is not None:
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
    ctx = attend(q, k, v, cfg, mesh, mask_kind=mask_kind, mask=mask, bias=bias, seed=seed, stream=stream,
                 training=training)  # [b, s, n/t·d]
    return P.row_parallel_linear(ctx, params[f"{prefix}.proj.weight"], params.get(f"{prefix}.proj.bias"), mesh,
                                 sequence_parallel=cfg.sequence_parallel)


class Memory(NamedTuple):
    """What a decoder block attends to: the encoder's output x [b, s_e(/t), h]
    and the encoder-decoder mask ("none", or "padding" with a bool mask
    [b, 1, s_d or 1, s_e], True = masked)."""

    x: torch.Tensor
    mask_kind: str = "none"
    mask: torch.Tensor | None = None


def cross_attention(params, prefix, x, memory: Memory, cfg: GPTConfig, mesh: Mesh, *, seed=0, stream=0,
                    training=False, cache=None):
    """The decoder's attention to the encoder (T5, Megatron's inter-attention).
    x: the decoder stream [b, s_d(/t), h]; memory.x: the encoder's output
    [b, s_e(/t), h] -> out [b, s_d(/t), h].

    Queries come from the decoder, keys and values from the encoder, so the
    two sequence lengths differ and nothing is causal. Under tensor parallel:
    q = x Wq^T is column-parallel (this rank's n/t heads, [b, s_d, n/t·d]);
    [k v] = memory Wkv^T is column-parallel too (the same n/t heads: kv rows
    are grouped per head [k_i, v_i], so a contiguous tp slice holds them);
    proj is row-parallel: the partial outputs are ALL-REDUCED over tp (b·s_d·h).
    Under sequence parallel each rank holds s_d/t decoder and s_e/t encoder
    tokens: the decoder chunk is ALL-GATHERED along s (b·s_d·h), and so is the
    encoder output for k and v (b·s_e·h, in every decoder layer), whose
    gradient is REDUCE-SCATTERED back along s_e in backward; proj's output is
    reduce-scattered along s_d. `cache` (decoding): k, v are computed from
    the encoder once, at the first step, and kept."""
    sp = cfg.sequence_parallel
    q = P.column_parallel_linear(x, params[f"{prefix}.q.weight"], params.get(f"{prefix}.q.bias"), mesh,
                                 sequence_parallel=sp)  # [b, s_d, n/t·d]
    q = rearrange(q, "b s (n d) -> b n s d", d=cfg.head_dim)
    if cache is not None and "cross_k" in cache:
        k, v = cache["cross_k"], cache["cross_v"]
    else:
        kv = P.column_parallel_linear(memory.x, params[f"{prefix}.kv.weight"], params.get(f"{prefix}.kv.bias"), mesh,
                                      sequence_parallel=sp)  # [b, s_e, 2·n/t·d]
        k, v = rearrange(kv, "b s (n two d) -> two b n s d", two=2, d=cfg.head_dim)
        if cache is not None:
            cache["cross_k"], cache["cross_v"] = k, v
    ctx = attend(q, k, v, cfg, mesh, mask_kind=memory.mask_kind, mask=memory.mask, bias=None, seed=seed,
                 stream=stream, training=training)  # [b, s_d, n/t·d]
    return P.row_parallel_linear(ctx, params[f"{prefix}.proj.weight"], params.get(f"{prefix}.proj.bias"), mesh,
                                 sequence_parallel=sp)


def mlp(params, prefix, x, cfg: GPTConfig, mesh: Mesh):
    """x: [b, s(/t), h] -> out [b, s(/t), h].
    fc1 column-parallel ([b, s, ffn/t]: fused bias-GeLU, ReLU, or a gated
    act(gate) * up: SwiGLU with SiLU, GeGLU with tanh-GeLU, T5 v1.1's),
    fc2 row-parallel. fc1's bias joins its matmul (an addmm), unless the
    Triton bias-GeLU kernel adds it in the pass it makes anyway."""
    b1 = params.get(f"{prefix}.fc1.bias")
    late = b1 if kernels.uses_triton(x) and not cfg.gated and cfg.activation != "relu" else None
    y = P.column_parallel_linear(x, params[f"{prefix}.fc1.weight"], None if late is not None else b1, mesh,
                                 sequence_parallel=cfg.sequence_parallel)
    y = activate(y, late, cfg)
    return P.row_parallel_linear(y, params[f"{prefix}.fc2.weight"], params.get(f"{prefix}.fc2.bias"), mesh,
                                 sequence_parallel=cfg.sequence_parallel)


def activate(y, bias, cfg: GPTConfig):
    """fc1's output [..., f(·2)] (+ its bias) -> [..., f]: fused bias-GeLU,
    ReLU, or gated act(gate) * up (rows interleaved [gate_i, up_i])."""
    if cfg.gated:
        y = y if bias is None else y + bias
        gate, up = rearrange(y, "... (f two) -> two ... f", two=2)
        return (F.silu(gate) if cfg.activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up
    if cfg.activation == "relu":
        return F.relu(y if bias is None else y + bias)
    return kernels.bias_gelu(y, bias, approximate="tanh" if cfg.activation == "gelu_tanh" else "none")


# --- Mixture of experts -----------------------------------------------------


class MoEStats(NamedTuple):
    """One MoE layer on one (micro)batch: aux and z, its losses (unweighted,
    times the batch share), load [E], the choices each expert was given
    before any drop, dropped / choices, the (token, expert) choices that
    overflowed capacity of all made. Counts cover this dp rank's sequences."""

    aux: torch.Tensor
    z: torch.Tensor
    load: torch.Tensor
    dropped: torch.Tensor
    choices: int


@dataclass
class MoE:
    """What a forward's MoE layers report, and how their losses enter the gradient.

    scale: this computation's share of the step's batch (1, or a
    microbatch's sequences / the step's), by which the auxiliary losses'
    gradients are scaled, as the main loss's are. stats: {(layer, micro):
    MoEStats}, written by each layer (a recomputed layer writes the same
    entry again). `dataclasses.replace(moe, scale=...)` shares the stats."""

    scale: float = 1.0
    stats: dict = field(default_factory=dict)

    def aux_loss(self, cfg: GPTConfig) -> torch.Tensor | float:
        """Σ over layers (and microbatches) of the weighted auxiliary losses: the term they add to the loss."""
        return sum(cfg.moe_aux_loss * st.aux + cfg.moe_z_loss * st.z for st in self.stats.values())

    def totals(self) -> dict:
        """{layer: MoEStats} summed over microbatches."""
        out = {}
        for (layer, _), st in sorted(self.stats.items(), key=lambda kv: kv[0]):
            old = out.get(layer)
            out[layer] = st if old is None else MoEStats(*(a + b for a, b in zip(old, st)))
        return out


class _AuxLossGrad(torch.autograd.Function):
    """Attach a loss term to an activation (Megatron's MoEAuxLossAutoScaler).
    Forward: x unchanged. Backward: x's gradient passes, and `aux` receives
    gradient `scale`: so scale·aux joins the gradient of whatever loss x
    feeds, in the same backward, with no need to carry the term through the
    later layers, pipeline stages and microbatches to the loss."""

    @staticmethod
    def forward(ctx, x, aux, scale):
        ctx.scale, ctx.like = scale, aux.new_empty(())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full_like(ctx.like, ctx.scale), None


def capacity_keep(idx, experts: int, capacity: float):
    """idx [b, s, k] expert ids -> keep [b, s, k] bool. Per sequence each
    expert takes at most C = ceil(capacity·s·k/E) choices, first come first
    served in GShard's order: every token's first choice in position order,
    then every second choice. The rule reads one sequence only, so the same
    choices are dropped whatever the batch, microbatch or layout."""
    b, s, k = idx.shape
    limit = math.ceil(capacity * s * k / experts)
    slot_major = rearrange(idx, "b s k -> b (k s)")
    chosen = F.one_hot(slot_major, experts)  # [b, k·s, E]
    place = (chosen.cumsum(1) * chosen).sum(-1)  # 1-based place of each choice in its expert's queue
    return rearrange(place <= limit, "b (k s) -> b s k", k=k)


def route(params, prefix, x, cfg: GPTConfig, mesh: Mesh, shared: bool):
    """The router on this rank's tokens x [b, s', h]: 1/tp of the sequence
    when `shared` (each tp rank routes its own share), else all of it.
    -> (gates [b, s', k], experts [b, s', k], aux, z). Gates: the top-k
    softmax probabilities, renormalised to sum 1 when `cfg.renormalizes_gates`
    (by default when k > 1; Mixtral always); else raw (Switch's k = 1 rule, so
    the main loss trains the router).
    aux = mean over sequences of E·Σ_i f_i·P_i, f_i the share of the
    sequence's choices made for expert i, P_i its mean router probability;
    z = mean over tokens of logsumexp(logits)². Both over whole sequences:
    when shared, the per-sequence sums are all-reduced over tp (E and 1
    numbers per sequence); P's all-reduce passes the gradient unchanged
    (`reduce_from_tp`), as each rank differentiates its own tokens."""
    E, k = cfg.experts, cfg.moe_topk
    tp = mesh.tp if shared else 1
    if not shared:  # every tp rank routes all the tokens: no collective over tp here
        mesh = replace(mesh, tp=1, tp_rank=0, groups={d: g for d, g in mesh.groups.items() if d != "tp"})
    router = params[f"{prefix}.router.weight"]
    router = P.sync_replicated_grad(router, mesh) if tp > 1 else router  # each tp rank routes other tokens
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 (or float64)
        logits = F.linear(x.to(dtype), router.to(dtype))  # [b, s', E]
    probs = logits.softmax(-1)
    gates, experts = probs.topk(k, dim=-1)
    if cfg.renormalizes_gates:
        gates = gates / gates.sum(-1, keepdim=True)
    s = x.shape[1] * tp
    load = P.all_reduce(F.one_hot(experts, E).sum((1, 2)), mesh, "tp")  # [b, E] choices per expert
    mean_prob = P.reduce_from_tp(probs.sum(1), mesh) / s  # [b, E]
    aux = E * (load.to(mean_prob.dtype) / (s * k) * mean_prob).sum(-1).mean()  # (int / int would be float32)
    z = P.reduce_from_tp(torch.logsumexp(logits, -1).pow(2).sum(1), mesh).mean() / s
    return gates, experts, aux, z


def moe_mlp(params, prefix, x, cfg: GPTConfig, mesh: Mesh, *, layer: int, moe: MoE | None = None,
            training: bool = False):
    """A mixture-of-experts MLP. x: [b, s(/t), h] -> out [b, s(/t), h].

    1. Route each tp rank's 1/tp of the sequence (without sequence parallel
       the replicated x is cut first, `scatter_to_sp`): top-k experts and
       gates per token, the auxiliary losses per sequence (`route`). Why cut:
       a replicated router would get the aux loss's gradient whole on every
       tp rank but the main loss's only in part (each rank sees its part of
       the experts' output), and no one reduction makes both right. Without
       gradients (generation: one token at a time) every rank routes all.
    2. Every tp rank then takes the whole sequences and their routing (an
       all-gather over tp): expert e's weights are cut over tp as the dense
       MLP's, so each tp rank computes its part of every chosen expert.
    3. Capacity mode: per sequence, drop the choices past each expert's
       capacity (`capacity_keep`); a dropped choice adds nothing, so a token
       whose choices are all dropped skips the layer through the residual.
    4. Sort the kept (token, expert) choices by expert; all-to-all the rows
       to the ep ranks that hold their experts (`parallel.dispatch_to_experts`);
       each local expert runs its MLP on its rows (`run_experts`); all-to-all
       them back (`parallel.combine_from_experts`).
    5. out[token] = Σ over its kept choices of gate · expert(token): still a
       partial sum over tp, reduce-scattered to the sequence shard (or, without
       sequence parallel, all-reduced), as the dense MLP's fc2 output is.
    6. The weighted auxiliary losses join the gradient through `_AuxLossGrad`
       (training only); `moe.stats` records them and the experts' load."""
    tp, sp, k = mesh.tp, cfg.sequence_parallel, cfg.moe_topk
    shared = tp > 1 and (sp or torch.is_grad_enabled())  # each tp rank routes 1/tp of the sequence
    if shared and not sp and x.shape[1] % tp:
        raise ValueError(f"mixture-of-experts layers route each tp rank's 1/tp of the sequence: seq % tp == 0 "
                         f"needed, got seq={x.shape[1]}, tp={tp}")
    mine = P.scatter_to_sp(x, mesh) if shared and not sp else x  # [b, s/t, h]: the tokens this rank routes
    gates, experts, aux, z = route(params, prefix, mine, cfg, mesh, shared)
    if shared:
        gates = P.gather_from_sp(gates, mesh)  # backward: the partial gate gradients summed over tp
        experts = P.all_gather(experts, mesh, "tp", 1)
    if tp > 1:
        x = P.gather_from_sp(x, mesh) if sp else P.copy_to_tp(x, mesh)  # [b, s, h] on every tp rank
    b, s, h = x.shape
    keep = capacity_keep(experts, cfg.experts, cfg.moe_capacity) if cfg.moe_capacity is not None else None
    choice = torch.arange(b * s * k, device=x.device)
    if keep is not None:
        choice = choice[keep.reshape(-1)]
    expert_of = experts.reshape(-1)[choice]
    order = torch.argsort(expert_of, stable=True)
    choice, expert_of = choice[order], expert_of[order]
    token_of = torch.div(choice, k, rounding_mode="floor")
    rows = x.reshape(b * s, h)[token_of]  # [m, h], sorted by expert
    if torch.is_autocast_enabled(x.device.type):  # move (and compute) in the autocast dtype
        rows = rows.to(torch.get_autocast_dtype(x.device.type))
    plan = P.expert_plan(torch.bincount(expert_of, minlength=cfg.experts), mesh)
    received = P.dispatch_to_experts(rows, plan, mesh)  # [m', h]: every ep rank's rows for this rank's experts
    done = run_experts(params, prefix, received, plan, cfg, mesh)  # [m', h]
    out = P.combine_from_experts(done, plan, mesh)  # [m, h]: back home, in `rows` order
    gate = gates.reshape(-1)[choice].to(out.dtype)
    y = out.new_zeros(b * s, h).index_add(0, token_of, out * gate[:, None]).view(b, s, h)
    if tp > 1:
        y = P.reduce_scatter_to_sp(y, mesh) if sp else P.reduce_from_tp(y, mesh)
    if moe is not None:
        dropped = (~keep).sum() if keep is not None else torch.zeros((), dtype=torch.long, device=x.device)
        load = torch.bincount(experts.reshape(-1), minlength=cfg.experts)  # whole sequences (gathered over tp)
        moe.stats[(layer, mesh.micro)] = MoEStats(aux.detach() * moe.scale, z.detach() * moe.scale, load, dropped,
                                                  b * s * k)
    weight = cfg.moe_aux_loss * aux + cfg.moe_z_loss * z
    if training and (cfg.moe_aux_loss or cfg.moe_z_loss) and torch.is_grad_enabled():
        y = _AuxLossGrad.apply(y, weight, 1.0 if moe is None else moe.scale)
    return y


def run_experts(params, prefix, rows, plan, cfg: GPTConfig, mesh: Mesh):
    """This ep rank's E/ep experts on the rows sent to them. rows [m', h],
    from each source ep rank in turn, rows for each local expert in turn
    (`plan.recv_counts`) -> outputs [m', h] in the same order (a partial sum
    over tp when tp > 1). Each expert is the dense MLP on its rows, one
    after the other (a GPU would use one grouped GEMM)."""
    local = cfg.experts // mesh.ep
    per_row = torch.arange(local, device=rows.device).repeat(mesh.ep).repeat_interleave(plan.recv_counts.reshape(-1))
    order = torch.argsort(per_row, stable=True)  # group the rows by local expert
    w1, w2 = params[f"{prefix}.fc1.weight"], params[f"{prefix}.fc2.weight"]  # [E/ep, f(·2)/t, h], [E/ep, h, f/t]
    b1, b2 = params.get(f"{prefix}.fc1.bias"), params.get(f"{prefix}.fc2.bias")
    if b2 is not None and mesh.tp > 1:  # replicated over tp: added once, on tp rank 0, before the sum over tp
        b2 = P.sync_replicated_grad(b2, mesh) * (mesh.tp_rank == 0)
    # unbind, not w1[j]: indexing one expert in a loop would give each a whole [E/ep, ...] gradient to sum
    none = [None] * local
    outs = []
    for r, w1j, w2j, b1j, b2j in zip(rows[order].split(plan.recv_counts.sum(0).tolist()), w1.unbind(0), w2.unbind(0),
                                     none if b1 is None else b1.unbind(0), none if b2 is None else b2.unbind(0)):
        outs.append(F.linear(activate(F.linear(r, w1j), b1j, cfg), w2j, b2j))
    return torch.cat(outs)[torch.argsort(order)]


def dropout_add(x, residual, cfg: GPTConfig, mesh: Mesh, *, seed, stream, training):
    """residual + dropout(x): the end of each residual branch (x's bias is in
    already: Megatron hands it apart, for a bias-dropout-add fused in one
    kernel; here the matmul adds it, as an addmm, at no extra pass)."""
    return residual + hidden_dropout(x, cfg.hidden_dropout, cfg, mesh, seed=seed, stream=stream, training=training)


def transformer_block(params, i, x, cfg: GPTConfig, mesh: Mesh, *, mask_kind, mask=None, bias=None, memory=None,
                      seed=0, training=False, cache=None, pos_offset=0, stream_prefix="", moe=None):
    """Block i. x: [b, s(/t), h] -> [b, s(/t), h].
    Pre-norm: x = x + attn(norm1(x)); x = x + mlp(norm2(x)) (the residual
    taken after the norm instead, with residual_post_norm). Post-norm (the
    original BERT): x = norm1(x + attn(x)); x = norm2(x + mlp(x)). Per block
    without sequence parallel: 2 all-reduces of b*s*h forward and 2 backward.
    memory (a `Memory`: T5's decoder): a cross-attention sub-block to the
    encoder's output sits between attention and MLP, with its own norm
    ln_cross (one more all-reduce each way). stream_prefix names this
    stack's dropout streams ("dec.": T5's decoder draws its own masks).
    A MoE layer (`cfg.is_moe(i)`) has `moe_mlp`
    for its MLP, reporting into `moe` (a `MoE`)."""
    layer = i
    pre, i = f"layers.{i}", f"{stream_prefix}{i}"
    branch = dict(seed=seed, training=training)
    attn = lambda h: attention(params, f"{pre}.attn", h, cfg, mesh, mask_kind=mask_kind, mask=mask, bias=bias,
                               stream=f"{i}.attn", cache=cache, pos_offset=pos_offset, **branch)
    cross = lambda h: cross_attention(params, f"{pre}.cross_attn", h, memory, cfg, mesh, stream=f"{i}.cross_attn",
                                      cache=cache, **branch)
    ffn = (lambda h: moe_mlp(params, f"{pre}.moe", h, cfg, mesh, layer=layer, moe=moe, training=training)) \
        if cfg.is_moe(layer) else (lambda h: mlp(params, f"{pre}.mlp", h, cfg, mesh))
    sublayers = [("ln1", attn, "attn_out")] + ([("ln_cross", cross, "cross_out")] if memory is not None else []) \
        + [("ln2", ffn, "mlp_out")]
    for norm_name, f, stream in sublayers:
        if cfg.norm_order == "post":  # x = norm(x + f(x))
            x = norm(params, f"{pre}.{norm_name}", dropout_add(f(x), x, cfg, mesh, stream=f"{i}.{stream}", **branch),
                     cfg, mesh)
        else:  # x = x + f(norm(x))
            h = norm(params, f"{pre}.{norm_name}", x, cfg, mesh)
            x = dropout_add(f(h), h if cfg.residual_post_norm else x, cfg, mesh, stream=f"{i}.{stream}", **branch)
    return x


# ---------------------------------------------------------------------------
# 4. GPT: a stack that can be cut into pipeline stages
# ---------------------------------------------------------------------------


def layer_ids(params) -> list[int]:
    """The transformer layers present in a (stage's) parameter dict, in order."""
    return sorted({int(name.split(".")[1]) for name in params if name.startswith("layers.")})


def run_layers(params, x, cfg: GPTConfig, mesh: Mesh, *, mask_kind="causal", mask=None, memory=None,
               bidirectional=None, seed=0, training=False, caches=None, pos_offset=0, stream_prefix="", moe=None):
    """The contiguous run of layers held in params (a pipeline stage's body,
    or one stack of T5: params is then the stack's slice, `substack`).
    x: [b, s(/t), h] -> [b, s(/t), h]. With position="relative" the stack's
    bias is made once here and shared by its layers (bidirectional: default
    unless the mask is causal; T5's decoder says False). memory: the
    encoder's output for cross-attention (`Memory`), or None."""
    bias = None
    if cfg.position == "relative":
        sq = x.shape[1] * (mesh.tp if cfg.sequence_parallel else 1)
        bias = position_bias(params, sq, pos_offset + sq, cfg, q_offset=pos_offset,
                             bidirectional=mask_kind != "causal" if bidirectional is None else bidirectional)
    for i in layer_ids(params):
        block = lambda x, i=i: transformer_block(params, i, x, cfg, mesh, mask_kind=mask_kind, mask=mask, bias=bias,
                                                 memory=memory, seed=seed, training=training, pos_offset=pos_offset,
                                                 cache=None if caches is None else caches[i],
                                                 stream_prefix=stream_prefix, moe=moe)
        # full recompute: keep only the block's input; redo the whole block in backward
        x = checkpoint(block, x, use_reentrant=False) if cfg.recompute == "full" and training else block(x)
    return x


def substack(params, prefix: str) -> dict:
    """The parameters under prefix ("encoder."), without it: one stack of a
    two-stack model, so run_layers and final_norm read it as they read GPT's."""
    return {name[len(prefix):]: p for name, p in params.items() if name.startswith(prefix)}


def final_norm(params, x, cfg: GPTConfig, mesh: Mesh):
    """The norm after the last layer of a pre-norm stack (post-norm stacks end normalised already)."""
    return norm(params, "final_norm", x, cfg, mesh) if cfg.norm_order == "pre" else x


def lm_logits(params, x, cfg: GPTConfig, mesh: Mesh):
    """Final norm and output layer. x: [b, s(/t), h] -> logits [b, s, V/t],
    kept vocab-parallel for the loss (see `output_layer`)."""
    return output_layer(params, final_norm(params, x, cfg, mesh), cfg, mesh)


def output_layer(params, x, cfg: GPTConfig, mesh: Mesh):
    """x: [b, s(/t), h] (normalised) -> logits [b, s, V/t]: the tied embedding
    (or head.weight) as a column-parallel output layer, plus the
    vocab-parallel lm_head.bias when the model has one (T5 with biases);
    x scaled by hidden^-0.5 first with scale_output (T5 v1.0). The padded
    vocabulary columns (ids >= cfg.vocab_size) are -inf, so no argmax,
    softmax or sample of these logits can pick a padded id."""
    if cfg.scale_output:
        x = x * cfg.hidden ** -0.5
    weight = params["embed.word"] if cfg.tie_embeddings else params["head.weight"]
    return P.column_parallel_linear(x, weight, padded_vocab_bias(params.get("lm_head.bias"), weight, cfg, mesh),
                                    mesh, sequence_parallel=cfg.sequence_parallel)


def padded_vocab_bias(bias, weight, cfg: GPTConfig, mesh: Mesh):
    """The output layer's bias [V/t] (or None) with -inf on this rank's padded
    vocabulary columns (ids >= cfg.vocab_size), for weight [V/t, h]: added in
    the output matmul itself (one addmm, no pass over the logits), so those
    logits are -inf, and their softmax, hence their gradient, is 0."""
    if P.vocab_range(weight.shape[0], mesh)[1] <= cfg.vocab_size:
        return bias  # this rank holds no padding
    real = P.real_vocab_columns(weight.shape[0], cfg.vocab_size, mesh, weight.device)
    pad = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device).masked_fill(~real, float("-inf"))
    return pad if bias is None else bias + pad


def gpt_logits(params, ids, cfg: GPTConfig, mesh: Mesh, *, seed=0, training=False, caches=None, pos_offset=0,
               moe=None):
    """ids [b, s] -> vocab-parallel logits [b, s, V/t]. moe: a `MoE` the MoE layers report into.
    Under context parallelism (mesh.cp > 1) every cp rank is given the whole
    ids [b, s], keeps its two chunks (`parallel.cp_split`) and returns their
    logits [b, s/cp, V/t], at the positions `parallel.cp_positions` names."""
    cfg.check_mesh(mesh)
    check_id_tensor(ids, (None, None), "ids")
    if mesh.cp > 1:
        if caches is not None or pos_offset:
            raise ValueError(f"cp={mesh.cp}: generation with a KV cache runs without context parallelism")
        cfg.check_seq(ids.shape[1], mesh)
        ids = P.cp_split(ids, mesh)
    x = embed(params, ids, cfg, mesh, seed=seed, training=training, pos_offset=pos_offset)
    x = run_layers(params, x, cfg, mesh, seed=seed, training=training, caches=caches, pos_offset=pos_offset,
                   moe=moe)
    return lm_logits(params, x, cfg, mesh)


def lm_loss(logits, targets, cfg: GPTConfig, mesh: Mesh, loss_mask=None):
    """Mean vocab-parallel cross-entropy, weighted by loss_mask.
    logits [b, s, V/t], targets [b, s] -> scalar. loss_mask: None (every
    token counts) or [b, s] exactly, bool or float weights >= 0 (Megatron's
    0/1 float mask): sum(loss * mask) / sum(mask), 0 when the mask is all 0."""
    check_loss_mask(loss_mask, targets)
    if mesh.cp > 1 and logits.shape[1] != targets.shape[1]:  # whole targets: this cp rank's chunks of them
        targets, loss_mask = P.cp_split(targets, mesh), None if loss_mask is None else P.cp_split(loss_mask, mesh)
    losses = P.vocab_parallel_cross_entropy(logits, targets, mesh, label_smoothing=cfg.label_smoothing,
                                            vocab_size=cfg.vocab_size)  # [b, s(/cp)]
    if loss_mask is None:
        return losses.mean()
    loss_mask = loss_mask.to(losses.dtype)
    total = loss_mask.sum()
    if mesh.cp > 1:  # the global weighted mean, once the cp ranks' losses are averaged (as their gradients are)
        total = P.all_reduce(total.detach(), mesh, "cp") / mesh.cp
    return (losses * loss_mask).sum() / torch.where(total > 0, total, 1.0)  # an all-zero mask: 0, not nan


def check_loss_mask(loss_mask, targets) -> None:
    """ValueError unless loss_mask is None or has targets' exact shape (a mask
    that merely broadcasts, [b, 1] or [s], would scale the mean by its size),
    a bool or float dtype, and finite weights >= 0."""
    if loss_mask is None:
        return
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != targets.shape:
        raise ValueError(f"loss_mask shape {shape_of(loss_mask)} != targets shape {tuple(targets.shape)}: "
                         "give one weight per target")
    if loss_mask.dtype != torch.bool and not loss_mask.is_floating_point():
        raise ValueError(f"loss_mask must be bool or float, got dtype {loss_mask.dtype}")
    if loss_mask.is_floating_point() and not bool(((loss_mask >= 0) & loss_mask.isfinite()).all()):
        raise ValueError("loss_mask weights must be finite and >= 0")


def gpt_loss(params, ids, targets, cfg: GPTConfig, mesh: Mesh, *, loss_mask=None, seed=0, training=True, moe=None):
    """ids, targets: [b, s] -> scalar loss (the same on every tp rank).
    With MoE layers, training: the LM loss plus the weighted auxiliary
    losses (`MoE.aux_loss`). Their value is added detached: their gradient
    reaches the router through `_AuxLossGrad`, so loss.backward() gives the
    gradient of the returned number (at unit scale: a scaled loss would
    not scale the auxiliary part). moe: a `MoE` to read the layers' stats."""
    check_id_tensor(ids, (None, None), "ids")
    check_id_tensor(targets, tuple(ids.shape), "targets")
    moe = MoE() if moe is None and cfg.experts else moe
    loss = lm_loss(gpt_logits(params, ids, cfg, mesh, seed=seed, training=training, moe=moe), targets, cfg, mesh,
                   loss_mask)
    return loss + moe.aux_loss(cfg) if cfg.experts and training else loss


def gpt_flops(cfg: GPTConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one forward + backward step (backward = 2x forward;
    recompute not counted, as in MFU). 2 FLOPs per multiply-add of every
    matmul plus the two [s, s] attention matmuls; for a GPT with ffn = 4h
    this is Megatron's 72 B s l h^2 (1 + s/6h + V/12lh). A MoE layer counts
    the FLOPs a token spends: the router and its k experts (dropless)."""
    h, d = cfg.hidden, cfg.head_dim
    mlp_weights = h * cfg.ffn_hidden * (3 if cfg.gated else 2)
    per_layer = h * (cfg.heads + 2 * cfg.num_kv_heads) * d + cfg.heads * d * h + mlp_weights  # matmul weights
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.layers))  # each token: the router and k experts' MLPs
    moe_extra = moe_layers * (h * cfg.experts + (cfg.moe_topk - 1) * mlp_weights)
    tokens = batch * seq
    attn = 4 * batch * seq * seq * cfg.heads * d * cfg.layers  # q k^T and probs v
    forward = 2 * tokens * (cfg.layers * per_layer + moe_extra + h * cfg.padded_vocab) + attn
    return 3.0 * forward


# ---------------------------------------------------------------------------
# 5. Generation
# ---------------------------------------------------------------------------


@torch.no_grad()
def generate(params, prompt_ids, cfg: GPTConfig, mesh: Mesh, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0):
    """Sample max_new_tokens after prompt_ids [b, s0] -> [b, s0 + max_new_tokens].

    A KV cache per layer keeps k, v, so each step feeds one token. The last
    position's vocab-parallel logits are all-gathered (b * V elements) so every
    tp rank samples the same token from the same generator. temperature 0 is
    greedy; padded vocabulary ids are never sampled."""
    check_generate_args(prompt_ids, cfg, max_new_tokens, temperature, top_k, seed)
    cfg = replace(cfg, sequence_parallel=False, recompute="none")
    gen = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    caches = {i: {} for i in layer_ids(params)}
    ids, feed, pos = prompt_ids, prompt_ids, 0
    for _ in range(max_new_tokens):
        local = gpt_logits(params, feed, cfg, mesh, caches=caches, pos_offset=pos)[:, -1]  # [b, V/t]
        nxt = next_token(local, cfg, mesh, temperature, top_k, gen)
        pos += feed.shape[1]
        feed = nxt[:, None]
        ids = torch.cat([ids, feed], dim=1)
    return ids


def next_token(local_logits, cfg: GPTConfig, mesh: Mesh, temperature: float, top_k, gen):
    """local_logits [b, V/t] (the last position, vocab-parallel) -> ids [b].
    ALL-GATHERS the logits over tp (b·V elements) so every rank draws the
    same token with the same generator; temperature 0 is greedy. Sampling
    shifts the logits to max 0, then divides in float64 (where no positive
    temperature rounds to 0): logits in [-inf, 0] with the max at 0, so
    however small the temperature (1e-300), the softmax has no nan."""
    logits = P.gather_from_tp(local_logits, mesh).double()[:, : cfg.vocab_size]  # [b, V]
    if temperature == 0:
        return logits.argmax(-1)
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def check_generate_args(prompt_ids, cfg: GPTConfig, max_new_tokens, temperature, top_k, seed) -> None:
    """ValueError naming the value unless: prompt_ids is an int64 (or int32)
    tensor [b >= 1, s0 >= 1]; max_new_tokens an int >= 0 with s0 + max_new_tokens <=
    max_seq; temperature a finite number >= 0; top_k None or an int >= 1; seed
    an int in [0, 2**63). (Token ids are range-checked by the embedding.)"""
    is_int = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
    check_id_tensor(prompt_ids, (None, None), "prompt_ids")
    if 0 in prompt_ids.shape:
        raise ValueError(f"prompt_ids must hold at least one token, got {shape_of(prompt_ids)}")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_ids.shape[1] + max_new_tokens > cfg.max_seq:
        raise ValueError(f"prompt of {prompt_ids.shape[1]} + {max_new_tokens} new tokens is longer than "
                         f"max_seq={cfg.max_seq}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got temperature={temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got top_k={top_k!r}")
    if not is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


# ---------------------------------------------------------------------------
# 6. Hugging Face weights in and out: GPT-2 (GPT2LMHeadModel), Llama
#    (LlamaForCausalLM) and Mixtral (MixtralForCausalLM, a Llama with MoE)
# ---------------------------------------------------------------------------


# HF's activation names -> nanomeg's: GPT-2's activation_function and BERT's hidden_act; T5's feed_forward_proj
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
HF_T5_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gated-gelu": "geglu",
                     "gated-gelu_new": "geglu", "gated-silu": "swiglu"}

# What each import computes, key by key: the keys of a transformers config
# (config.json) that change the math, each with the values nanomeg computes
# (transformers' default among them: an absent key is that default). A config
# whose model_type, architectures or any of these keys holds another value is
# refused. The sizes are read by each importer; every other field of the
# transformers config classes changes nothing computed (dropouts, token ids,
# init ranges, output and generation switches): tests/test_import_checks.py
# sorts each field of each class into one of these three.
_BERT_KEYS = dict(hidden_act=tuple(HF_ACTIVATIONS), position_embedding_type=("absolute",),
                  is_decoder=(False,), add_cross_attention=(False,), is_encoder_decoder=(False,),
                  tie_word_embeddings=(True,), problem_type=(None, "single_label_classification"))
_BERT_HEADS = ("ForPreTraining", "Model", "ForMaskedLM", "ForSequenceClassification", "ForMultipleChoice")
_ROPE_DEFAULT = {f"{k}.{t}": ("default",) for k in ("rope_parameters", "rope_scaling") for t in ("rope_type", "type")}
HF_KEYS = {
    "GPT-2": dict(model_type=("gpt2",), architectures=("GPT2LMHeadModel", "GPT2Model"),
                  activation_function=tuple(HF_ACTIVATIONS), scale_attn_weights=(True, False),
                  scale_attn_by_inverse_layer_idx=(False,), reorder_and_upcast_attn=(False, True),  # fp32 softmax only
                  add_cross_attention=(False,), is_encoder_decoder=(False,), tie_word_embeddings=(True,)),
    "Llama / Mixtral": dict(model_type=("llama", "mixtral"), architectures=("LlamaForCausalLM", "MixtralForCausalLM"),
                            hidden_act=("silu",), attention_bias=(False,), mlp_bias=(False,), sliding_window=(None,),
                            router_jitter_noise=(0.0,), is_encoder_decoder=(False,), **_ROPE_DEFAULT),
    "BERT": dict(model_type=("bert", "megatron-bert"),
                 architectures=tuple(f"{m}{h}" for m in ("Bert", "MegatronBert") for h in _BERT_HEADS), **_BERT_KEYS),
    "DPR": dict(model_type=("dpr",), architectures=("DPRQuestionEncoder", "DPRContextEncoder"), **_BERT_KEYS),
    "T5": dict(model_type=("t5",), architectures=("T5ForConditionalGeneration", "T5WithLMHeadModel"),
               feed_forward_proj=tuple(HF_T5_ACTIVATIONS), is_encoder_decoder=(True,), is_decoder=(False,)),
}


def hf_config_dict(hf) -> dict:
    """A transformers config as a dict: config.json's dict as it is, a
    config object's `to_dict()` (a named tuple's fields, or an object's attributes)."""
    if isinstance(hf, dict):
        return hf
    for method in ("to_dict", "_asdict"):
        if hasattr(hf, method):
            return getattr(hf, method)()
    return vars(hf)


def check_hf_config(hf: dict, what: str) -> dict:
    """ValueError naming the key, its value and what nanomeg computes unless
    every key of HF_KEYS[what] in hf (nested dicts as "outer.inner"; each
    entry of `architectures`) holds an allowed value; model_type must be
    there. -> hf, for the importer to read its sizes from."""
    if "model_type" not in hf:
        raise ValueError(f"the HF config has no model_type: nanomeg's {what} import needs one of "
                         f"{HF_KEYS[what]['model_type']}")
    flat = hf | {f"{k}.{inner}": v for k, d in hf.items() if isinstance(d, dict) for inner, v in d.items()}
    for key, allowed in HF_KEYS[what].items():
        values = (flat.get(key) or []) if key == "architectures" else [flat[key]] if key in flat else []
        for value in values if isinstance(values, list) else [values]:
            if value not in allowed:
                raise ValueError(f"HF config {key}={value!r}: nanomeg's {what} import computes only "
                                 f"{' or '.join(map(repr, allowed))}")
    return hf


def gpt2_config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, **overrides) -> GPTConfig:
    """The nanomeg config of a GPT-2 checkpoint (tanh GeLU, learned positions, tied)."""
    return GPTConfig(vocab_size=vocab_size, max_seq=n_positions, layers=n_layer, hidden=n_embd, heads=n_head,
                     activation="gelu_tanh", position="learned", norm="layernorm", **overrides)


def gpt2_hf_config(cfg: GPTConfig) -> dict:
    """The config.json of a GPT2LMHeadModel holding cfg (plain JSON values)."""
    check_gpt2_compatible(cfg)
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                n_positions=cfg.max_seq, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads, n_inner=cfg.ffn,
                activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
                scale_attn_weights=cfg.scale_attention,
                layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
                attn_pdrop=cfg.attention_dropout, initializer_range=cfg.init_std, tie_word_embeddings=True,
                bos_token_id=None, eos_token_id=None)


def gpt2_config_from_hf(hf, **overrides) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json (a dict, or a transformers
    GPT2Config), plus overrides (the layout fields). What nanomeg does not
    compute is refused (`check_hf_config`, HF_KEYS["GPT-2"])."""
    hf = check_hf_config(hf_config_dict(hf), "GPT-2")
    return GPTConfig(**dict(vocab_size=hf["vocab_size"], max_seq=hf["n_positions"], layers=hf["n_layer"],
                            hidden=hf["n_embd"], heads=hf["n_head"], ffn=hf.get("n_inner"),
                            activation=HF_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
                            scale_attention=hf.get("scale_attn_weights", True), position="learned",
                            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5)) | overrides)


def gpt2_hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The GPT2LMHeadModel tensors a config needs (without the "transformer."
    prefix), with their shapes. HF's Conv1D weights are [in, out]. wpe may
    hold more positions than max_seq (only the first max_seq are used)."""
    h, f = cfg.hidden, cfg.ffn_hidden
    shapes = {"wte.weight": (cfg.vocab_size, h), "wpe.weight": (cfg.max_seq, h), "ln_f.weight": (h,),
              "ln_f.bias": (h,)}
    for i in range(cfg.layers):
        shapes |= {f"h.{i}.{k}": v for k, v in {
            "ln_1.weight": (h,), "ln_1.bias": (h,), "attn.c_attn.weight": (h, 3 * h), "attn.c_attn.bias": (3 * h,),
            "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,), "ln_2.weight": (h,), "ln_2.bias": (h,),
            "mlp.c_fc.weight": (h, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, h),
            "mlp.c_proj.bias": (h,)}.items()}
    return shapes


def load_state_dict(source) -> dict[str, torch.Tensor]:
    """A state dict as given, or read from a .safetensors file, or from a
    folder holding model.safetensors (as save_pretrained writes it)."""
    if isinstance(source, dict):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"expected a state dict or a path to a .safetensors file, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise ValueError(f"{path}: a folder without model.safetensors (only safetensors weights are read)")
        path = path / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None


def check_checkpoint(sd: dict, want: dict, *, what: str, positions: str | None, next_layer: str | tuple) -> None:
    """ValueError naming the key unless the state dict sd holds every name of
    `want` (name -> shape) at that shape (the position table `positions` may
    hold more rows than max_seq) and no layer beyond the config's
    (`next_layer`: a key of the layer after the last; a tuple for two stacks). Shared by the imports."""
    missing = [k for k in want if k not in sd]
    if missing:
        raise ValueError(f"not a {what} state dict for this config: missing {missing[:3]}"
                         f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    for key in (next_layer,) if isinstance(next_layer, str) else next_layer:
        if key in sd:
            raise ValueError(f"the state dict holds more layers than the config's ({key} is there)")
    for name, shape in want.items():
        got, pos = tuple(sd[name].shape), name == positions
        if got != shape and not (pos and got[1:] == shape[1:] and got[0] >= shape[0]):
            raise ValueError(f"{name}: the checkpoint has shape {got}, the config needs {shape}"
                             f"{' (at least max_seq rows)' if pos else ''}")


def check_tied(sd: dict, tied: str, source: str, fix: str = "this import (always tied) does not hold it") -> None:
    """ValueError if the state dict holds `tied` and it differs from `source`:
    a tied output layer is the word embedding itself, so an untied one is
    refused rather than silently dropped."""
    if tied in sd and sd[tied].data_ptr() != sd[source].data_ptr() and not torch.equal(sd[tied], sd[source]):
        raise ValueError(f"{tied} differs from {source}: an untied output layer ({fix}); refusing rather than "
                         "dropping it")


def from_hf_gpt2(state_dict, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """nanomeg parameters from a GPT2LMHeadModel state dict (or a path to a
    .safetensors file, or a folder holding model.safetensors). Every tensor the
    config needs is checked by name and shape first; HF's Conv1D weights are
    transposed, c_attn's [q | k | v] columns regrouped per head as [q_i, k_i, v_i]."""
    check_gpt2_compatible(cfg)
    sd = {k.removeprefix("transformer."): v for k, v in load_state_dict(state_dict).items()}
    check_checkpoint(sd, gpt2_hf_shapes(cfg), what="GPT-2", positions="wpe.weight",
                     next_layer=f"h.{cfg.layers}.attn.c_attn.weight")
    check_tied(sd, "lm_head.weight", "wte.weight")
    regroup = lambda w: rearrange(w, "(three n d) ... -> (n three d) ...", three=3, n=cfg.heads)
    p = {"embed.word": pad_vocab_rows(sd["wte.weight"], cfg.padded_vocab),
         "embed.pos": sd["wpe.weight"][: cfg.max_seq],
         "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"]}
    for i in range(cfg.layers):
        h, pre = f"h.{i}", f"layers.{i}"
        p |= {f"{pre}.ln1.weight": sd[f"{h}.ln_1.weight"], f"{pre}.ln1.bias": sd[f"{h}.ln_1.bias"],
              f"{pre}.attn.qkv.weight": regroup(sd[f"{h}.attn.c_attn.weight"].t()),
              f"{pre}.attn.qkv.bias": regroup(sd[f"{h}.attn.c_attn.bias"]),
              f"{pre}.attn.proj.weight": sd[f"{h}.attn.c_proj.weight"].t(),
              f"{pre}.attn.proj.bias": sd[f"{h}.attn.c_proj.bias"],
              f"{pre}.ln2.weight": sd[f"{h}.ln_2.weight"], f"{pre}.ln2.bias": sd[f"{h}.ln_2.bias"],
              f"{pre}.mlp.fc1.weight": sd[f"{h}.mlp.c_fc.weight"].t(), f"{pre}.mlp.fc1.bias": sd[f"{h}.mlp.c_fc.bias"],
              f"{pre}.mlp.fc2.weight": sd[f"{h}.mlp.c_proj.weight"].t(),
              f"{pre}.mlp.fc2.bias": sd[f"{h}.mlp.c_proj.bias"]}
    return {k: v.contiguous().clone() for k, v in p.items()}


def check_full_params(params: dict, shapes: dict) -> None:
    """ValueError unless params holds exactly the names of `shapes` (name ->
    (full shape, rule)) at their full shapes; names the first that does not."""
    missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
    if missing or extra:
        raise ValueError(f"the parameters do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, (shape, _) in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(params[name].shape)}, the full parameter is {shape}: "
                             "one rank's tensor-parallel shards? Gather them with parallel.unshard first")


def check_gpt2_compatible(cfg: GPTConfig) -> None:
    """GPT-2 holds only: LayerNorm, GeLU (tanh, its own, or exact: HF's
    activation_function), learned positions, biases, tied embeddings,
    multi-head attention (scaled or not: scale_attn_weights), any ffn (n_inner).
    Anything else is a ValueError."""
    want = dict(norm="layernorm", activation="gelu_tanh" if cfg.activation != "gelu" else "gelu",
                position="learned", bias=True, tie_embeddings=True,
                num_kv_heads=cfg.heads, head_dim=cfg.hidden // cfg.heads, zero_centered_gamma=False, scale_output=False,
                residual_post_norm=False, norm_order="pre", type_vocab=0, experts=0)
    wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"GPT-2 cannot hold this config: {wrong} (GPT-2 has {dict((k, want[k]) for k in wrong)})")


def to_hf_gpt2(params, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict from full nanomeg parameters (inverse of
    from_hf_gpt2). One rank's shards are refused: unshard them first."""
    check_gpt2_compatible(cfg)
    check_full_params(params, gpt_shapes(cfg))
    ungroup = lambda w: rearrange(w, "(n three d) ... -> (three n d) ...", three=3, n=cfg.heads)
    sd = {"transformer.wte.weight": params["embed.word"][: cfg.vocab_size],
          "transformer.wpe.weight": params["embed.pos"],
          "transformer.ln_f.weight": params["final_norm.weight"], "transformer.ln_f.bias": params["final_norm.bias"]}
    for i in range(cfg.layers):
        h, pre = f"transformer.h.{i}", f"layers.{i}"
        sd |= {f"{h}.ln_1.weight": params[f"{pre}.ln1.weight"], f"{h}.ln_1.bias": params[f"{pre}.ln1.bias"],
               f"{h}.attn.c_attn.weight": ungroup(params[f"{pre}.attn.qkv.weight"]).t(),
               f"{h}.attn.c_attn.bias": ungroup(params[f"{pre}.attn.qkv.bias"]),
               f"{h}.attn.c_proj.weight": params[f"{pre}.attn.proj.weight"].t(),
               f"{h}.attn.c_proj.bias": params[f"{pre}.attn.proj.bias"],
               f"{h}.ln_2.weight": params[f"{pre}.ln2.weight"], f"{h}.ln_2.bias": params[f"{pre}.ln2.bias"],
               f"{h}.mlp.c_fc.weight": params[f"{pre}.mlp.fc1.weight"].t(),
               f"{h}.mlp.c_fc.bias": params[f"{pre}.mlp.fc1.bias"],
               f"{h}.mlp.c_proj.weight": params[f"{pre}.mlp.fc2.weight"].t(),
               f"{h}.mlp.c_proj.bias": params[f"{pre}.mlp.fc2.bias"]}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return {k: v.contiguous().clone() for k, v in sd.items()}


def llama_config_from_hf(hf, **overrides) -> GPTConfig:
    """The GPTConfig of a Llama or Mixtral config.json (a dict, or a
    transformers config): RMSNorm, rotary, SwiGLU, GQA, no biases; Mixtral
    adds E experts, top-k with the gates always renormalised (at k = 1 the
    gate is 1), and its router_aux_loss_coef as the aux weight. Options
    nanomeg does not compute (rope scaling in either spelling, biases,
    another activation, a sliding window, router jitter) are refused."""
    hf = check_hf_config(hf_config_dict(hf), "Llama / Mixtral")
    rope = hf.get("rope_parameters") or {}
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    moe = dict(experts=hf["num_local_experts"], moe_topk=hf["num_experts_per_tok"], moe_renormalize=True,
               moe_aux_loss=hf.get("router_aux_loss_coef", 0.001)) if hf["model_type"] == "mixtral" else {}
    return GPTConfig(**{**dict(
        vocab_size=hf["vocab_size"], max_seq=hf.get("max_position_embeddings", 2048), layers=hf["num_hidden_layers"],
        hidden=hidden, heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == hidden else head_dim, ffn=hf["intermediate_size"], norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu", position="rope",
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **moe), **overrides})


def check_llama_compatible(cfg: GPTConfig) -> None:
    """Llama / Mixtral hold only: RMSNorm, SwiGLU, rotary positions, no
    biases, pre-norm; MoE on every layer (Mixtral), dropless, gates
    renormalised over the top k (even at k = 1). Else ValueError."""
    want = dict(norm="rmsnorm", activation="swiglu", position="rope", bias=False, zero_centered_gamma=False,
                residual_post_norm=False, norm_order="pre", type_vocab=0, scale_output=False)
    if cfg.experts:
        want |= dict(moe_every=1, moe_capacity=None, renormalizes_gates=True)
    wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"Llama / Mixtral cannot hold this config: {wrong} (they have "
                         f"{dict((k, want[k]) for k in wrong)})")


def _llama_qkv(sd: dict, hf: str, cfg: GPTConfig) -> torch.Tensor:
    """q_proj [n·d, h], k_proj, v_proj [g·d, h] -> nanomeg's qkv rows, grouped per kv head [its q heads, k, v]."""
    g, d = cfg.num_kv_heads, cfg.head_dim
    q = rearrange(sd[f"{hf}.q_proj.weight"], "(g rd) h -> g rd h", g=g)
    k, v = (rearrange(sd[f"{hf}.{x}_proj.weight"], "(g d) h -> g d h", d=d) for x in "kv")
    return rearrange(torch.cat([q, k, v], 1), "g x h -> (g x) h")


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., f, h] -> fc1 [..., 2f, h] with rows [gate_0, up_0, gate_1, up_1, ...] (nanomeg's gated fc1)."""
    return rearrange(torch.stack([gate, up], -2), "... f two h -> ... (f two) h")


def _mixtral_experts(sd: dict, hf: str, cfg: GPTConfig) -> tuple:
    """(router [E, h], fc1 [E, 2f, h], fc2 [E, h, f]) of one Mixtral layer,
    from transformers 5's fused tensors (mlp.gate, mlp.experts.gate_up_proj
    [E, 2f, h] = [gate; up], down_proj [E, h, f]) or the older per-expert
    ones (block_sparse_moe.gate, experts.{j}.w1 gate, w3 up, w2 down)."""
    if f"{hf}.mlp.gate.weight" in sd:
        gate, up = sd[f"{hf}.mlp.experts.gate_up_proj"].chunk(2, dim=1)
        return sd[f"{hf}.mlp.gate.weight"], _interleave(gate, up), sd[f"{hf}.mlp.experts.down_proj"]
    old = f"{hf}.block_sparse_moe"
    if f"{old}.gate.weight" not in sd:
        raise KeyError(f"{hf}.mlp.gate.weight (or the older {old}.gate.weight)")
    w = lambda n: torch.stack([sd[f"{old}.experts.{j}.{n}.weight"] for j in range(cfg.experts)])
    return sd[f"{old}.gate.weight"], _interleave(w("w1"), w("w3")), w("w2")


def from_hf_llama(state_dict, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """nanomeg parameters from a LlamaForCausalLM or MixtralForCausalLM state
    dict (or a .safetensors file, or a folder holding model.safetensors), for
    cfg from `llama_config_from_hf`: q/k/v regrouped per kv head, gate and up
    interleaved into fc1; Mixtral's router and experts stacked on dim 0.
    Every tensor is checked by name and shape; vocabulary rows are padded."""
    check_llama_compatible(cfg)
    sd = load_state_dict(state_dict)
    try:
        p = _llama_params(sd, cfg)
    except KeyError as e:
        raise ValueError(f"not a {'Mixtral' if cfg.experts else 'Llama'} state dict for this config: missing "
                         f"{e.args[0]!r}") from None
    want = gpt_shapes(cfg)
    for name, t in p.items():
        if tuple(t.shape) != want[name][0]:
            raise ValueError(f"{name}: the checkpoint gives shape {tuple(t.shape)}, the config needs {want[name][0]}")
    return {k: v.contiguous().clone() for k, v in p.items()}


def _llama_params(sd: dict, cfg: GPTConfig) -> dict:
    """`from_hf_llama`'s renaming (KeyError on a missing tensor)."""
    p = {"embed.word": sd["model.embed_tokens.weight"], "final_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        p["head.weight"] = sd["lm_head.weight"]
    else:
        check_tied(sd, "lm_head.weight", "model.embed_tokens.weight", "tie_word_embeddings is true")
    if f"model.layers.{cfg.layers}.input_layernorm.weight" in sd:
        raise ValueError(f"the state dict holds more layers than the config's (model.layers.{cfg.layers} is there)")
    for i in range(cfg.layers):
        hf, pre = f"model.layers.{i}", f"layers.{i}"
        p |= {f"{pre}.ln1.weight": sd[f"{hf}.input_layernorm.weight"],
              f"{pre}.attn.qkv.weight": _llama_qkv(sd, f"{hf}.self_attn", cfg),
              f"{pre}.attn.proj.weight": sd[f"{hf}.self_attn.o_proj.weight"],
              f"{pre}.ln2.weight": sd[f"{hf}.post_attention_layernorm.weight"]}
        if cfg.experts:
            router, fc1, fc2 = _mixtral_experts(sd, hf, cfg)
            p |= {f"{pre}.moe.router.weight": router, f"{pre}.moe.fc1.weight": fc1, f"{pre}.moe.fc2.weight": fc2}
        else:
            p |= {f"{pre}.mlp.fc1.weight": _interleave(sd[f"{hf}.mlp.gate_proj.weight"], sd[f"{hf}.mlp.up_proj.weight"]),
                  f"{pre}.mlp.fc2.weight": sd[f"{hf}.mlp.down_proj.weight"]}
    for name in ("embed.word", "head.weight"):
        if name in p and p[name].shape[0] == cfg.vocab_size:
            p[name] = pad_vocab_rows(p[name], cfg.padded_vocab)
    return p


def llama_hf_config(cfg: GPTConfig) -> dict:
    """The config.json of a LlamaForCausalLM (or, with experts, MixtralForCausalLM) holding cfg."""
    check_llama_compatible(cfg)
    kind = "mixtral" if cfg.experts else "llama"
    out = dict(model_type=kind, architectures=[f"{kind.capitalize()}ForCausalLM"], vocab_size=cfg.vocab_size,
               hidden_size=cfg.hidden, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.layers,
               num_attention_heads=cfg.heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               max_position_embeddings=cfg.max_seq, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
               rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False)
    if cfg.experts:
        out |= dict(num_local_experts=cfg.experts, num_experts_per_tok=cfg.moe_topk,
                    router_aux_loss_coef=cfg.moe_aux_loss)
    return out


def to_hf_llama(params, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM (with experts: MixtralForCausalLM, transformers 5's
    fused expert tensors) state dict from full nanomeg parameters; inverse
    of `from_hf_llama`. One rank's shards are refused: unshard them first."""
    check_llama_compatible(cfg)
    check_full_params(params, gpt_shapes(cfg))
    g, d = cfg.num_kv_heads, cfg.head_dim
    split_fc1 = lambda w: rearrange(w, "... (f two) h -> two ... f h", two=2)
    word = params["embed.word"][: cfg.vocab_size]
    sd = {"model.embed_tokens.weight": word, "model.norm.weight": params["final_norm.weight"],
          "lm_head.weight": word if cfg.tie_embeddings else params["head.weight"][: cfg.vocab_size]}
    for i in range(cfg.layers):
        hf, pre = f"model.layers.{i}", f"layers.{i}"
        qkv = rearrange(params[f"{pre}.attn.qkv.weight"], "(g x) h -> g x h", g=g)
        q, k, v = qkv[:, :-2 * d], qkv[:, -2 * d:-d], qkv[:, -d:]
        sd |= {f"{hf}.input_layernorm.weight": params[f"{pre}.ln1.weight"],
               f"{hf}.self_attn.q_proj.weight": rearrange(q, "g x h -> (g x) h"),
               f"{hf}.self_attn.k_proj.weight": rearrange(k, "g x h -> (g x) h"),
               f"{hf}.self_attn.v_proj.weight": rearrange(v, "g x h -> (g x) h"),
               f"{hf}.self_attn.o_proj.weight": params[f"{pre}.attn.proj.weight"],
               f"{hf}.post_attention_layernorm.weight": params[f"{pre}.ln2.weight"]}
        if cfg.experts:
            gate, up = split_fc1(params[f"{pre}.moe.fc1.weight"])
            sd |= {f"{hf}.mlp.gate.weight": params[f"{pre}.moe.router.weight"],
                   f"{hf}.mlp.experts.gate_up_proj": torch.cat([gate, up], dim=1),
                   f"{hf}.mlp.experts.down_proj": params[f"{pre}.moe.fc2.weight"]}
        else:
            gate, up = split_fc1(params[f"{pre}.mlp.fc1.weight"])
            sd |= {f"{hf}.mlp.gate_proj.weight": gate, f"{hf}.mlp.up_proj.weight": up,
                   f"{hf}.mlp.down_proj.weight": params[f"{pre}.mlp.fc2.weight"]}
    return {k: v.contiguous().clone() for k, v in sd.items()}


from_hf_mixtral, to_hf_mixtral = from_hf_llama, to_hf_llama  # one function each: a Mixtral is a Llama with experts


# ---------------------------------------------------------------------------
# 7. BERT: the same stack with a padding mask, token types and three heads
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BertConfig(GPTConfig):
    """BERT = the core stack, bidirectional, with token types and heads.
    Defaults are the original BERT's arrangement (post-norm, exact GeLU, two
    token types, LayerNorm eps 1e-12); norm_order="pre" is Megatron's BERT.
    task: "pretrain" (masked-LM head, plus the next-sentence head on the
    pooler when binary_head), "classify" (pooler -> dropout -> [num_classes]),
    "multiple_choice" (each of K choices pooled -> one score)."""

    max_seq: int = 512
    norm_eps: float = 1e-12
    norm_order: str = "post"
    type_vocab: int = 2
    binary_head: bool = True
    task: str = "pretrain"
    num_classes: int = 2
    context_parallel: ClassVar[bool] = False  # BERT, and the retrievers built on it

    def __post_init__(self):
        super().__post_init__()
        if self.activation == "swiglu":
            raise ValueError("activation='swiglu': BERT's MLP and LM head use GeLU ('gelu' or 'gelu_tanh')")
        if not self.tie_embeddings:
            raise ValueError("tie_embeddings=False: BERT's LM head always uses the word embedding")

    @property
    def has_pooler(self) -> bool:
        return self.task != "pretrain" or self.binary_head


def bert_shapes(cfg: BertConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The core stack plus the pooler and the task's heads (name -> (shape, rule))."""
    h = cfg.hidden
    shapes = stack_shapes(cfg)
    if cfg.has_pooler:
        shapes |= linear_shapes("pooler", h, h, "normal", bias=True)
    if cfg.task == "pretrain":
        shapes |= linear_shapes("lm_head.dense", h, h, "normal", bias=True) | norm_shapes("lm_head.norm", cfg)
        shapes["lm_head.bias"] = ((cfg.padded_vocab,), "zeros")  # vocab-parallel, beside the tied embedding
        if cfg.binary_head:
            shapes |= linear_shapes("binary_head", 2, h, "normal", bias=True)
    else:
        shapes |= linear_shapes("classifier", cfg.num_classes if cfg.task == "classify" else 1, h, "normal", True)
    return shapes


def init_bert(cfg: BertConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full BERT parameters, the same on every rank (Megatron's init, `init_params`)."""
    return init_params(bert_shapes(cfg), cfg, seed, dtype)


def bert_specs(cfg: BertConfig) -> dict[str, int | P.HeadGroups | None]:
    """The core's specs (`gpt_specs`' rules) plus the heads: the LM output
    bias is vocab-parallel (dim 0); pooler, LM-head dense and norm, binary
    and task heads are replicated."""
    return _stack_specs(bert_shapes(cfg), cfg)


def bert_attention_mask(attention_mask, ids):
    """Megatron's bert_extended_attention_mask. attention_mask [b, s]: 1/True
    at real tokens, 0 at padding (as HF and Megatron take it) -> [b, 1, s, s]
    bool, True = masked: a pair (query, key) is masked when EITHER is
    padding. A padded query so sees nothing and its output is zeros."""
    if attention_mask is None:
        return None
    real = real_tokens(attention_mask, ids)
    return pair_mask(real, real)


def real_tokens(attention_mask, ids, name: str = "attention_mask") -> torch.Tensor:
    """A padding mask [b, s] of 0/1 (or bool), checked against ids -> bool [b, s], True = a real token."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
        raise ValueError(f"{name} shape {shape_of(attention_mask)} != ids shape {shape_of(ids)}: one 1/0 per token")
    if attention_mask.is_floating_point():
        raise ValueError(f"{name} must be bool or integer 0/1, got dtype {attention_mask.dtype}")
    bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
    if bad.numel():
        raise ValueError(f"{name} must hold only 0 and 1, got {bad[0].item()}")
    return attention_mask.bool()


def pair_mask(q_real, k_real):
    """q_real [b, sq], k_real [b, sk] bool -> [b, 1, sq, sk], True = masked:
    Megatron's make_attention_mask, a pair is masked when either side is padding."""
    return ~(q_real[:, None, :, None] & k_real[:, None, None, :])


def bert_encode(params, ids, cfg: BertConfig, mesh: Mesh, *, token_types=None, attention_mask=None, seed=0,
                training=False, stream_prefix=""):
    """ids [b, s] -> the sequence output [b, s(/t), h] (after the final norm
    of a pre-norm stack). The same embed / run_layers as GPT, with the padding
    mask of `bert_attention_mask` instead of the causal one. stream_prefix
    names the dropout streams (a retriever's towers and reader draw their own)."""
    cfg.check_mesh(mesh)
    mask = bert_attention_mask(attention_mask, ids)
    x = embed(params, ids, cfg, mesh, token_types=token_types, seed=seed, training=training,
              stream=f"{stream_prefix}embed")
    x = run_layers(params, x, cfg, mesh, mask_kind="none" if mask is None else "padding", mask=mask, seed=seed,
                   training=training, stream_prefix=stream_prefix)
    return final_norm(params, x, cfg, mesh)


def bert_pool(params, x, cfg: BertConfig, mesh: Mesh):
    """The pooler: x [b, s(/t), h] -> tanh(dense(x[:, 0])) [b, h], replicated.
    Under sequence parallel [CLS] sits on tp rank 0's chunk, so the sequence
    is all-gathered first (b*s*h); the backward is a split, not a
    reduce-scatter: the pooler is replicated, so every rank's gradient is
    already the whole (Megatron's tensor_parallel_output_grad=False)."""
    if cfg.sequence_parallel:
        x = P.gather_from_sp(x, mesh, tp_output_grad=False)
    return torch.tanh(F.linear(x[:, 0], params["pooler.weight"], params["pooler.bias"]))


def bert_lm_logits(params, x, cfg: BertConfig, mesh: Mesh):
    """The masked-LM head: x [b, s(/t), h] -> vocab-parallel logits [b, s, V/t]:
    dense -> GeLU -> norm (replicated), then the tied word embedding as a
    column-parallel output layer plus its vocab-parallel bias [V/t]. Padded
    columns are -inf."""
    gelu = "tanh" if cfg.activation == "gelu_tanh" else "none"
    y = F.linear(x, allreduce_grad_if_sp(params["lm_head.dense.weight"], cfg, mesh))
    y = kernels.bias_gelu(y, allreduce_grad_if_sp(params["lm_head.dense.bias"], cfg, mesh), approximate=gelu)
    y = norm(params, "lm_head.norm", y, cfg, mesh)
    return P.column_parallel_linear(y, params["embed.word"],
                                    padded_vocab_bias(params["lm_head.bias"], params["embed.word"], cfg, mesh),
                                    mesh, sequence_parallel=cfg.sequence_parallel)


def bert_pretrain(params, ids, cfg: BertConfig, mesh: Mesh, *, token_types=None, attention_mask=None, seed=0,
                  training=False, stream_prefix=""):
    """-> (masked-LM logits [b, s, V/t] vocab-parallel, next-sentence logits
    [b, 2] or None without the binary head)."""
    _check_task(cfg, "pretrain")
    x = bert_encode(params, ids, cfg, mesh, token_types=token_types, attention_mask=attention_mask, seed=seed,
                    training=training, stream_prefix=stream_prefix)
    return bert_heads(params, x, cfg, mesh)


def bert_heads(params, x, cfg: BertConfig, mesh: Mesh):
    """The pretraining heads on the encoded x [b, s(/t), h] -> (masked-LM
    logits [b, s, V/t], next-sentence logits [b, 2] or None)."""
    nsp = None
    if cfg.binary_head:
        nsp = F.linear(bert_pool(params, x, cfg, mesh), params["binary_head.weight"], params["binary_head.bias"])
    return bert_lm_logits(params, x, cfg, mesh), nsp


def bert_loss(params, ids, cfg: BertConfig, mesh: Mesh, *, mlm_targets, mlm_mask, nsp_labels=None,
              token_types=None, attention_mask=None, seed=0, training=True):
    """BERT pretraining: -> (total, masked-LM loss, next-sentence loss or None).
    mlm_targets [b, s] the original ids; mlm_mask [b, s]: 1 where a token was
    chosen for prediction (the loss is the mean over those only); nsp_labels
    [b]: 1 when segment B is random, 0 when it follows A (HF's convention).
    `bert_loss_and_metrics` also returns the next-sentence accuracy."""
    out = bert_loss_and_metrics(params, ids, cfg, mesh, mlm_targets=mlm_targets, mlm_mask=mlm_mask,
                                nsp_labels=nsp_labels, token_types=token_types, attention_mask=attention_mask,
                                seed=seed, training=training)
    return out["loss"], out["mlm"], out.get("nsp")


def bert_loss_and_metrics(params, ids, cfg: BertConfig, mesh: Mesh, *, mlm_targets, mlm_mask, nsp_labels=None,
                          token_types=None, attention_mask=None, seed=0, training=True) -> dict:
    """As `bert_loss`, as a dict: loss (MLM + NSP), mlm, and with the binary
    head nsp and nsp_acc (the fraction of next-sentence labels right)."""
    mlm_logits, nsp_logits = bert_pretrain(params, ids, cfg, mesh, token_types=token_types,
                                           attention_mask=attention_mask, seed=seed, training=training)
    return bert_pretrain_losses(mlm_logits, nsp_logits, cfg, mesh, mlm_targets=mlm_targets, mlm_mask=mlm_mask,
                                nsp_labels=nsp_labels)


def bert_pretrain_losses(mlm_logits, nsp_logits, cfg: BertConfig, mesh: Mesh, *, mlm_targets, mlm_mask,
                         nsp_labels=None) -> dict:
    """The heads' logits -> dict(loss, mlm[, nsp, nsp_acc]) (see `bert_loss_and_metrics`)."""
    check_nsp_labels(nsp_labels, mlm_logits.shape[0], cfg)
    mlm = lm_loss(mlm_logits, mlm_targets, cfg, mesh, loss_mask=mlm_mask)
    if nsp_logits is None:
        return dict(loss=mlm, mlm=mlm)
    nsp = F.cross_entropy(nsp_logits.float() if nsp_logits.dtype in (torch.float16, torch.bfloat16) else nsp_logits,
                          nsp_labels.long())
    nsp_acc = (nsp_logits.detach().argmax(-1) == nsp_labels).float().mean()
    return dict(loss=mlm + nsp, mlm=mlm, nsp=nsp, nsp_acc=nsp_acc)


def check_nsp_labels(nsp_labels, b: int, cfg: BertConfig) -> None:
    """ValueError unless nsp_labels is [b] of 0/1 with the binary head, None without it."""
    if not cfg.binary_head and nsp_labels is not None:
        raise ValueError("nsp_labels given, but the model has no next-sentence head (binary_head=False)")
    if cfg.binary_head:
        check_id_tensor(nsp_labels, (b,), "nsp_labels", 2, "next-sentence label")


def bert_classify(params, ids, cfg: BertConfig, mesh: Mesh, *, token_types=None, attention_mask=None, seed=0,
                  training=False):
    """Sequence classification: ids [b, s] -> logits [b, num_classes]:
    pooled -> dropout -> classifier. Replicated on every tp rank."""
    _check_task(cfg, "classify")
    return _pooled_head(params, ids, cfg, mesh, token_types, attention_mask, seed, training)


def bert_multiple_choice(params, ids, cfg: BertConfig, mesh: Mesh, *, token_types=None, attention_mask=None,
                         seed=0, training=False):
    """Multiple choice: ids [b, K, s] (one sequence per choice) -> scores
    [b, K]: the K sequences are encoded as a batch of b*K, each pooled and
    scored by classifier [1, h]; a softmax over K picks the answer."""
    _check_task(cfg, "multiple_choice")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 3 or 0 in ids.shape[:2]:
        raise ValueError(f"multiple choice takes ids [b, K, s] with b, K >= 1, got {shape_of(ids)}")
    b, k, s = ids.shape
    for name, t in (("token_types", token_types), ("attention_mask", attention_mask)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != ids.shape):
            raise ValueError(f"{name} shape {shape_of(t)} != ids shape {tuple(ids.shape)}")
    flat = lambda t: None if t is None else t.reshape(b * k, s)
    scores = _pooled_head(params, flat(ids), cfg, mesh, flat(token_types), flat(attention_mask), seed, training)
    return rearrange(scores, "(b k) 1 -> b k", b=b)


def _pooled_head(params, ids, cfg: BertConfig, mesh: Mesh, token_types, attention_mask, seed, training):
    """ids [n, s] -> classifier(dropout(pool(encode(ids)))) [n, C]."""
    x = bert_encode(params, ids, cfg, mesh, token_types=token_types, attention_mask=attention_mask, seed=seed,
                    training=training)
    pooled = bert_pool(params, x, cfg, mesh)  # [n, h], the same on every tp rank
    if training:
        row, rows = mesh.batch_rows(pooled.shape[0])  # this replica's rows of the global batch, as in hidden_dropout
        pooled = P.dropout(pooled, cfg.hidden_dropout, seed=seed, stream="classifier", offset=(row, 0),
                           global_shape=(rows, pooled.shape[1]))
    return F.linear(pooled, params["classifier.weight"], params["classifier.bias"])


BERT_HEADS = ("pooler.", "lm_head.", "binary_head.", "classifier.")  # every BERT task's heads, by name prefix


def check_encoder(params: dict, cfg: GPTConfig, heads: tuple = BERT_HEADS) -> None:
    """ValueError naming the tensors unless params, but for the names
    starting with `heads`, are exactly cfg's embedding and stack
    (`stack_shapes`) at their full shapes: a builder may draw a missing head
    fresh, never a missing layer or norm, and drops no extra one."""
    check_full_params({k: v for k, v in params.items() if not k.startswith(heads)}, stack_shapes(cfg))


def bert_for_task(params, cfg: BertConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fine-tuning's start: keep the encoder (and pooler) of full BERT
    parameters from any task, e.g. a pretraining checkpoint, drop the heads
    cfg.task does not use, and draw the heads it needs but params lack
    (Megatron's init; the pooler too when params have none). The encoder must
    be cfg's, name for name and shape for shape (`check_encoder`).
    -> full parameters for cfg, ready to `shard`."""
    check_encoder(params, cfg)
    shapes = bert_shapes(cfg)
    fresh = init_params({k: v for k, v in shapes.items() if k not in params}, cfg, seed,
                        next(iter(params.values())).dtype)
    out = {k: v for k, v in params.items() if k in shapes} | fresh
    check_full_params(out, shapes)
    return {k: out[k] for k in shapes}


def bert_flops(cfg: BertConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one BERT forward + backward (as `gpt_flops`): the stack
    and, when pretraining, the LM head's dense h x h and the tied output
    layer per token; the pooler and the small heads per sequence. batch
    counts sequences (b*K for multiple choice)."""
    h = cfg.hidden
    stack = gpt_flops(replace(cfg, vocab_size=1, vocab_multiple=1), batch, seq) - 3.0 * 2 * batch * seq * h
    head = 2 * batch * seq * (h * h + h * cfg.padded_vocab) if cfg.task == "pretrain" else 0
    pooled = 2 * batch * h * (h + 2) if cfg.has_pooler else 0
    return stack + 3.0 * (head + pooled)


def _check_task(cfg: BertConfig, task: str) -> None:
    if not isinstance(cfg, BertConfig) or cfg.task != task:
        raise ValueError(f"this entry point needs a BertConfig with task={task!r}, got "
                         f"{getattr(cfg, 'task', type(cfg).__name__)!r}")


# ---------------------------------------------------------------------------
# 8. BERT weights from / to Hugging Face: BertForPreTraining (post-norm),
#    MegatronBertForPreTraining (pre-norm), and their classification heads
# ---------------------------------------------------------------------------


def bert_config_from_hf(hf_config, **overrides) -> BertConfig:
    """The BertConfig of a transformers BertConfig or MegatronBertConfig (or
    its config.json's dict; model_type "megatron-bert" is pre-norm, "bert"
    post-norm). What nanomeg does not compute is refused (HF_KEYS["BERT"])."""
    hf = check_hf_config(hf_config_dict(hf_config), "BERT")
    return BertConfig(**_bert_sizes(hf) | dict(norm_order="pre" if hf["model_type"] == "megatron-bert" else "post")
                      | overrides)


def _bert_sizes(hf: dict) -> dict:
    """The BertConfig fields read from a checked BERT (or DPR) config dict."""
    act = HF_ACTIVATIONS[hf.get("hidden_act", "gelu")]
    return dict(vocab_size=hf["vocab_size"], max_seq=hf["max_position_embeddings"], layers=hf["num_hidden_layers"],
                hidden=hf["hidden_size"], heads=hf["num_attention_heads"], ffn=hf["intermediate_size"],
                type_vocab=hf["type_vocab_size"], norm_eps=hf["layer_norm_eps"], activation=act)


def bert_hf_config(cfg: BertConfig) -> dict:
    """The config.json of a BertForPreTraining (post-norm) or
    MegatronBertForPreTraining (pre-norm) holding cfg (plain JSON values)."""
    check_bert_compatible(cfg)
    post = cfg.norm_order == "post"
    return dict(model_type="bert" if post else "megatron-bert",
                architectures=["BertForPreTraining" if post else "MegatronBertForPreTraining"],
                vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, intermediate_size=cfg.ffn_hidden,
                hidden_act="gelu" if cfg.activation == "gelu" else "gelu_new",
                max_position_embeddings=cfg.max_seq, type_vocab_size=cfg.type_vocab, layer_norm_eps=cfg.norm_eps,
                hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
                initializer_range=cfg.init_std, pad_token_id=0)


def check_bert_compatible(cfg: BertConfig) -> None:
    """HF's BERTs hold only: LayerNorm, biases, learned positions, multi-head
    attention, no zero-centred gamma. Anything else is a ValueError."""
    want = dict(norm="layernorm", bias=True, position="learned", num_kv_heads=cfg.heads, zero_centered_gamma=False,
                residual_post_norm=False)
    if cfg.type_vocab < 1:
        raise ValueError("Hugging Face's BERT always has token types: type_vocab must be >= 1, got 0")
    wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if not isinstance(cfg, BertConfig) or wrong:
        raise ValueError(f"Hugging Face's BERT cannot hold this config: {wrong or type(cfg).__name__}")


def bert_hf_names(cfg: BertConfig) -> dict[str, str]:
    """nanomeg name -> HF name, for every tensor that maps one to one (the
    fused qkv is made of HF's three query/key/value tensors: apart)."""
    pair = lambda ours, theirs: {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}
    post = cfg.norm_order == "post"
    names = {"embed.word": "bert.embeddings.word_embeddings.weight",
             "embed.pos": "bert.embeddings.position_embeddings.weight",
             "embed.type": "bert.embeddings.token_type_embeddings.weight"}
    if post:
        names |= pair("embed.norm", "bert.embeddings.LayerNorm")
    for i in range(cfg.layers):
        ours, theirs = f"layers.{i}", f"bert.encoder.layer.{i}"
        names |= (pair(f"{ours}.attn.proj", f"{theirs}.attention.output.dense")
                  | pair(f"{ours}.mlp.fc1", f"{theirs}.intermediate.dense")
                  | pair(f"{ours}.mlp.fc2", f"{theirs}.output.dense")
                  | pair(f"{ours}.ln1", f"{theirs}.attention.output.LayerNorm" if post else f"{theirs}.attention.ln")
                  | pair(f"{ours}.ln2", f"{theirs}.output.LayerNorm" if post else f"{theirs}.ln"))
    if not post:
        names |= pair("final_norm", "bert.encoder.ln")
    if cfg.has_pooler:
        names |= pair("pooler", "bert.pooler.dense")
    if cfg.task == "pretrain":
        names |= pair("lm_head.dense", "cls.predictions.transform.dense")
        names |= pair("lm_head.norm", "cls.predictions.transform.LayerNorm") | {"lm_head.bias": "cls.predictions.bias"}
        if cfg.binary_head:
            names |= pair("binary_head", "cls.seq_relationship")
    else:
        names |= pair("classifier", "classifier")
    return names


def _hf_qkv_names(i: int, part: str) -> list[str]:
    return [f"bert.encoder.layer.{i}.attention.self.{n}.{part}" for n in ("query", "key", "value")]


def from_hf_bert(state_dict, cfg: BertConfig, *, encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """nanomeg parameters from a BertForPreTraining / MegatronBertForPreTraining
    (or ...ForSequenceClassification / ...ForMultipleChoice with the matching
    task; a bare BertModel's keys, without "bert.", are taken too) state dict,
    .safetensors file or folder. Every tensor is checked by name and shape
    first; the untied-decoder case is refused, not dropped. encoder_only:
    the embedding and the stack alone (`stack_shapes`), whatever heads the
    checkpoint has (a retriever's tower, DPR's BERT)."""
    check_bert_compatible(cfg)
    sd = load_state_dict(state_dict)
    if "bert.embeddings.word_embeddings.weight" not in sd and "embeddings.word_embeddings.weight" in sd:
        sd = {(k if k.startswith(("cls.", "classifier.")) else f"bert.{k}"): v for k, v in sd.items()}
    shapes = {name: shape for name, (shape, _) in (stack_shapes(cfg) if encoder_only else bert_shapes(cfg)).items()}
    names = {ours: theirs for ours, theirs in bert_hf_names(cfg).items() if ours in shapes}
    want = {theirs: shapes[ours] for ours, theirs in names.items()}
    want |= {"bert.embeddings.word_embeddings.weight": (cfg.vocab_size, cfg.hidden)}
    if "lm_head.bias" in names:
        want["cls.predictions.bias"] = (cfg.vocab_size,)
    for i in range(cfg.layers):
        want |= {n: (cfg.hidden, cfg.hidden) for n in _hf_qkv_names(i, "weight")}
        want |= {n: (cfg.hidden,) for n in _hf_qkv_names(i, "bias")}
    check_checkpoint(sd, want, what="BERT", positions="bert.embeddings.position_embeddings.weight",
                     next_layer=f"bert.encoder.layer.{cfg.layers}.attention.self.query.weight")
    if "lm_head.bias" in names:
        check_tied(sd, "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
        check_tied(sd, "cls.predictions.decoder.bias", "cls.predictions.bias")
    params = {ours: sd[theirs] for ours, theirs in names.items()}
    params["embed.pos"] = params["embed.pos"][: cfg.max_seq]
    for name in ("embed.word", "lm_head.bias"):
        if name in params:
            params[name] = pad_vocab_rows(params[name], cfg.padded_vocab)
    regroup = lambda q, k, v: rearrange(torch.stack([q, k, v]), "three (n d) ... -> (n three d) ...", n=cfg.heads)
    for i in range(cfg.layers):
        for part in ("weight", "bias"):
            params[f"layers.{i}.attn.qkv.{part}"] = regroup(*(sd[n] for n in _hf_qkv_names(i, part)))
    return {name: params[name].contiguous().clone() for name in shapes}


def to_hf_bert(params, cfg: BertConfig, *, encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """An HF state dict (BertForPreTraining or MegatronBertForPreTraining
    keys, with the tied decoder written out) from full nanomeg parameters.
    One rank's shards are refused: unshard them first. encoder_only: the
    embedding and the stack alone ("bert." keys; a retriever's tower)."""
    check_bert_compatible(cfg)
    shapes = stack_shapes(cfg) if encoder_only else bert_shapes(cfg)
    check_full_params(params, shapes)
    sd = {theirs: params[ours] for ours, theirs in bert_hf_names(cfg).items() if ours in shapes}
    sd["bert.embeddings.word_embeddings.weight"] = params["embed.word"][: cfg.vocab_size]
    if cfg.task == "pretrain" and not encoder_only:
        sd["cls.predictions.bias"] = params["lm_head.bias"][: cfg.vocab_size]
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    for i in range(cfg.layers):
        for part in ("weight", "bias"):
            qkv = rearrange(params[f"layers.{i}.attn.qkv.{part}"], "(n three d) ... -> three (n d) ...", three=3,
                            n=cfg.heads)
            sd |= dict(zip(_hf_qkv_names(i, part), qkv))
    return {k: v.contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------------------
# 9. T5: two stacks of the core. The encoder is BERT's bidirectional stack,
#    the decoder GPT's causal stack with cross-attention to the encoder; one
#    word embedding serves the encoder input, the decoder input and the head.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class T5Config(GPTConfig):
    """T5: `layers` encoder blocks and `decoder_layers` decoder blocks.
    The defaults are Megatron's T5: learned absolute positions (one table,
    used by both stacks), LayerNorm, GeLU, biases, 1/sqrt(d) scaling, the
    tied head plus a vocab-parallel output bias. `google_t5_config` gives
    Hugging Face's T5ForConditionalGeneration (v1.0 and v1.1): the same code,
    other switches (relative bias, RMSNorm, no biases, no scaling, ReLU or
    GeGLU, kv_channels, scale_output or an untied head)."""

    max_seq: int = 512
    decoder_layers: int | None = None  # None: = layers
    context_parallel: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.type_vocab:
            raise ValueError(f"type_vocab={self.type_vocab}: T5 has no token types (use 0)")

    @property
    def num_decoder_layers(self) -> int:
        return self.layers if self.decoder_layers is None else self.decoder_layers

    def stacks(self) -> dict[str, int]:
        return {"encoder.": self.layers, "decoder.": self.num_decoder_layers}


def google_t5_config(version: str = "1.1", **overrides) -> T5Config:
    """Hugging Face's T5 as a T5Config: relative position bias (32 buckets,
    max distance 128), RMSNorm (eps 1e-6) and no biases, no 1/sqrt(d).
    v1.0: ReLU, the tied head with the decoder output scaled by hidden^-0.5.
    v1.1: GeGLU (tanh-GeLU gate) and an untied head, unscaled."""
    if version not in ("1.0", "1.1"):
        raise ValueError(f"version={version!r}: Google's T5 is '1.0' or '1.1'")
    v10 = version == "1.0"
    return T5Config(**dict(position="relative", norm="rmsnorm", norm_eps=1e-6, bias=False, scale_attention=False,
                           activation="relu" if v10 else "geglu", tie_embeddings=v10, scale_output=v10) | overrides)


def t5_shapes(cfg: T5Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shared embedding, "encoder." + a stack, "decoder." + a stack with
    cross-attention (each with its own final norm and relative-bias table),
    the untied head if any, and the vocab-parallel output bias with biases."""
    shapes = embedding_shapes(cfg)
    shapes |= {f"encoder.{k}": v for k, v in layer_shapes(cfg, cfg.layers).items()}
    shapes |= {f"decoder.{k}": v for k, v in layer_shapes(cfg, cfg.num_decoder_layers, cross=True).items()}
    if not cfg.tie_embeddings:
        shapes["head.weight"] = ((cfg.padded_vocab, cfg.hidden), "normal")
    if cfg.bias:
        shapes["lm_head.bias"] = ((cfg.padded_vocab,), "zeros")
    return shapes


def init_t5(cfg: T5Config, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full T5 parameters, the same on every rank (Megatron's init, `init_params`)."""
    return init_params(t5_shapes(cfg), cfg, seed, dtype)


def t5_specs(cfg: T5Config) -> dict[str, int | P.HeadGroups | None]:
    """The core's split for both stacks (cross_attn q and kv by heads, its proj
    by input features, each relative-bias table by head columns) and the
    vocab-parallel output bias by rows, so the grad norm counts it once."""
    return _stack_specs(t5_shapes(cfg), cfg)


def t5_masks(enc_ids, dec_ids, *, enc_padding=None, dec_padding=None, masks=None):
    """The three attention masks, as (mask_kind, mask) pairs for the encoder,
    the decoder and the encoder-decoder attention. Either from the padding
    of both sides (HF's attention_mask and decoder_attention_mask: [b, s_e],
    [b, s_d], 1 = real token), a pair masked when either side is padding;
    or Megatron's three masks `masks` = (enc [b, s_e, s_e], dec [b, s_d,
    s_d], enc_dec [b, s_d, s_e]), bool, True = masked. The decoder's is
    always also causal (Megatron's history mask), whatever it says."""
    b, s_e, s_d = enc_ids.shape[0], enc_ids.shape[1], dec_ids.shape[1]
    if masks is not None:
        if enc_padding is not None or dec_padding is not None:
            raise ValueError("give either the three masks or enc_padding / dec_padding, not both")
        if not isinstance(masks, (tuple, list)) or len(masks) != 3:
            raise ValueError(f"masks must be (enc_mask, dec_mask, enc_dec_mask), got {type(masks).__name__}")
        for name, m, want in zip(("enc_mask", "dec_mask", "enc_dec_mask"), masks,
                                 ((b, s_e, s_e), (b, s_d, s_d), (b, s_d, s_e))):
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != want or m.dtype != torch.bool:
                got = f"{shape_of(m)} {getattr(m, 'dtype', '')}".rstrip()
                raise ValueError(f"{name} must be bool {list(want)} ([b, s_q, s_k], True = masked), got {got}")
        enc, dec, enc_dec = (m[:, None] for m in masks)
    else:
        enc_real = None if enc_padding is None else real_tokens(enc_padding, enc_ids, "enc_padding")
        dec_real = None if dec_padding is None else real_tokens(dec_padding, dec_ids, "dec_padding")
        ones = lambda s: torch.ones(b, s, dtype=torch.bool, device=enc_ids.device)
        enc = None if enc_real is None else pair_mask(enc_real, enc_real)
        dec = None if dec_real is None else pair_mask(dec_real, dec_real)
        enc_dec = None if enc_real is None and dec_real is None else \
            pair_mask(ones(s_d) if dec_real is None else dec_real, ones(s_e) if enc_real is None else enc_real)
    padding = lambda m: ("none", None) if m is None else ("padding", m)
    dec = ("causal", None) if dec is None else ("padding", dec | causal_mask(s_d, s_d, dec.device))
    return padding(enc), dec, padding(enc_dec)


def t5_encode(params, enc_ids, cfg: T5Config, mesh: Mesh, *, mask=("none", None), seed=0, training=False):
    """enc_ids [b, s_e] -> the encoder's output [b, s_e(/t), h] (after its
    final norm): the shared embedding, the bidirectional encoder stack.
    mask: the encoder's (mask_kind, mask) from `t5_masks`."""
    cfg.check_mesh(mesh)
    x = embed(params, enc_ids, cfg, mesh, seed=seed, training=training, stream="enc.embed")
    stack = substack(params, "encoder.")
    x = run_layers(stack, x, cfg, mesh, mask_kind=mask[0], mask=mask[1], bidirectional=True, seed=seed,
                   training=training, stream_prefix="enc.")
    return final_norm(stack, x, cfg, mesh)


def t5_decode(params, dec_ids, memory: Memory, cfg: T5Config, mesh: Mesh, *, mask=("causal", None), seed=0,
              training=False, caches=None, pos_offset=0):
    """dec_ids [b, s_d] and the encoder's output (memory.x [b, s_e(/t), h] with
    the encoder-decoder mask) -> vocab-parallel logits [b, s_d, V/t]: the
    shared embedding, the causal decoder stack with cross-attention, its
    final norm, the output layer. caches / pos_offset: incremental decoding."""
    cfg.check_mesh(mesh)
    if not isinstance(memory, Memory) or not isinstance(memory.x, torch.Tensor):
        raise ValueError(f"the decoder needs the encoder's output: memory must be a Memory(x=[b, s_e, h], ...), "
                         f"got {type(memory).__name__}")
    b, h = dec_ids.shape[0], cfg.hidden
    if memory.x.dim() != 3 or memory.x.shape[0] != b or memory.x.shape[2] != h:
        raise ValueError(f"encoder output shape {tuple(memory.x.shape)} does not fit the decoder's batch {b} and "
                         f"hidden {h}: expected [{b}, s_e{'/tp' if cfg.sequence_parallel else ''}, {h}]")
    x = embed(params, dec_ids, cfg, mesh, seed=seed, training=training, pos_offset=pos_offset, stream="dec.embed")
    stack = substack(params, "decoder.")
    x = run_layers(stack, x, cfg, mesh, mask_kind=mask[0], mask=mask[1], memory=memory, bidirectional=False,
                   seed=seed, training=training, caches=caches, pos_offset=pos_offset, stream_prefix="dec.")
    return output_layer(params, final_norm(stack, x, cfg, mesh), cfg, mesh)


def t5_logits(params, enc_ids, dec_ids, cfg: T5Config, mesh: Mesh, *, enc_padding=None, dec_padding=None,
              masks=None, seed=0, training=False):
    """enc_ids [b, s_e], dec_ids [b, s_d] -> vocab-parallel logits [b, s_d, V/t].
    Masks from the padding of both sides, or Megatron's three (`t5_masks`)."""
    check_id_tensor(enc_ids, (None, None), "enc_ids")
    check_id_tensor(dec_ids, (None, None), "dec_ids")
    if enc_ids.shape[0] != dec_ids.shape[0]:
        raise ValueError(f"enc_ids batch {enc_ids.shape[0]} != dec_ids batch {dec_ids.shape[0]}")
    enc_mask, dec_mask, enc_dec_mask = t5_masks(enc_ids, dec_ids, enc_padding=enc_padding, dec_padding=dec_padding,
                                                masks=masks)
    memory = Memory(t5_encode(params, enc_ids, cfg, mesh, mask=enc_mask, seed=seed, training=training),
                    *enc_dec_mask)
    return t5_decode(params, dec_ids, memory, cfg, mesh, mask=dec_mask, seed=seed, training=training)


def t5_loss(params, enc_ids, dec_ids, targets, cfg: T5Config, mesh: Mesh, *, loss_mask=None, enc_padding=None,
            dec_padding=None, masks=None, seed=0, training=True):
    """-> the mean cross-entropy of the decoder's targets [b, s_d] (weighted by
    loss_mask [b, s_d], e.g. 0 at decoder padding)."""
    logits = t5_logits(params, enc_ids, dec_ids, cfg, mesh, enc_padding=enc_padding, dec_padding=dec_padding,
                       masks=masks, seed=seed, training=training)
    return lm_loss(logits, targets, cfg, mesh, loss_mask)


@torch.no_grad()
def t5_generate(params, enc_ids, cfg: T5Config, mesh: Mesh, max_new_tokens: int, *, enc_padding=None,
                start_id: int = 0, eos_id: int | None = None, pad_id: int | None = None, temperature: float = 1.0,
                top_k: int | None = None, seed: int = 0):
    """Decode max_new_tokens after start_id for each encoder input [b, s_e]
    -> [b, 1 + max_new_tokens] (start_id first, as HF's generate returns).

    The encoder runs once. Each step feeds the decoder one token: its
    self-attention k, v grow in a per-layer cache, and its cross-attention
    k, v are computed from the encoder output at the first step and kept.
    Greedy (temperature 0), temperature and top-k, the same on every tp
    rank (`next_token`). With eos_id, a sequence that has emitted it goes
    on with pad_id (default start_id), as HF's generate pads."""
    check_id_tensor(enc_ids, (None, None), "enc_ids")
    b = enc_ids.shape[0]
    for name, value in (("start_id", start_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)
                                  or not 0 <= value < cfg.vocab_size):
            raise ValueError(f"{name}={value!r} is not a token id in [0, {cfg.vocab_size})")
    ids = torch.full((b, 1), start_id, dtype=torch.long, device=enc_ids.device)
    check_generate_args(ids, cfg, max_new_tokens, temperature, top_k, seed)
    cfg = replace(cfg, sequence_parallel=False, recompute="none")
    enc_mask, _, enc_dec_mask = t5_masks(enc_ids, ids, enc_padding=enc_padding)
    memory = Memory(t5_encode(params, enc_ids, cfg, mesh, mask=enc_mask), *enc_dec_mask)  # mask [b, 1, 1, s_e]
    gen = torch.Generator(device=enc_ids.device).manual_seed(seed)
    caches = {i: {} for i in layer_ids(substack(params, "decoder."))}
    done = torch.zeros(b, dtype=torch.bool, device=enc_ids.device)
    for pos in range(max_new_tokens):
        local = t5_decode(params, ids[:, -1:], memory, cfg, mesh, caches=caches, pos_offset=pos)[:, -1]
        nxt = next_token(local, cfg, mesh, temperature, top_k, gen)
        if eos_id is not None:
            nxt = torch.where(done, start_id if pad_id is None else pad_id, nxt)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def t5_flops(cfg: T5Config, batch: int, enc_seq: int, dec_seq: int) -> float:
    """Model FLOPs of one T5 forward + backward (as `gpt_flops`): the encoder
    stack on s_e tokens, the decoder stack on s_d tokens plus, per decoder
    layer, cross-attention (q and proj on s_d tokens, k and v on s_e, the
    two [s_d, s_e] matmuls), and the output layer on s_d tokens."""
    inner = cfg.heads * cfg.head_dim
    stack = lambda layers, s: gpt_flops(replace(cfg, layers=layers, vocab_size=1, vocab_multiple=1), batch, s) \
        - 3.0 * 2 * batch * s * cfg.hidden
    cross = 2 * batch * (dec_seq * 2 * cfg.hidden * inner + enc_seq * 2 * cfg.hidden * inner
                         + 2 * dec_seq * enc_seq * inner)
    head = 2 * batch * dec_seq * cfg.hidden * cfg.padded_vocab
    return stack(cfg.layers, enc_seq) + stack(cfg.num_decoder_layers, dec_seq) \
        + 3.0 * (cfg.num_decoder_layers * cross + head)


# ---------------------------------------------------------------------------
# 10. T5 weights from / to Hugging Face's T5ForConditionalGeneration
# ---------------------------------------------------------------------------


def t5_config_from_hf(hf_config, **overrides) -> T5Config:
    """The T5Config of a transformers T5Config (or its config.json's dict;
    HF_KEYS["T5"] checked: a UMT5 or mT5 is refused). max_seq (T5 has no
    position table) defaults to 512: a cap on both sequences, override it
    freely. transformers 5 always ties the head and says scale_decoder_outputs;
    older configs say tie_word_embeddings (False: v1.1's untied head, unscaled)."""
    hf = check_hf_config(hf_config_dict(hf_config), "T5")
    tied = hf.get("tie_word_embeddings", True)
    return google_t5_config(**dict(
        vocab_size=hf["vocab_size"], layers=hf["num_layers"], decoder_layers=hf.get("num_decoder_layers"),
        hidden=hf["d_model"], heads=hf["num_heads"], kv_channels=hf["d_kv"], ffn=hf["d_ff"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=HF_T5_ACTIVATIONS[hf.get("feed_forward_proj", "relu")],
        rel_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128), tie_embeddings=tied,
        scale_output=hf.get("scale_decoder_outputs", tied)) | overrides)


def check_t5_compatible(cfg: T5Config) -> None:
    """HF's T5 holds only: pre-norm RMSNorm (no zero-centred gamma), no
    biases, relative positions, multi-head attention, no 1/sqrt(d), an
    activation it names. Anything else is a ValueError naming the fields."""
    want = dict(norm="rmsnorm", bias=False, position="relative", num_kv_heads=cfg.heads, zero_centered_gamma=False,
                residual_post_norm=False, norm_order="pre", scale_attention=False)
    wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if not isinstance(cfg, T5Config) or wrong:
        raise ValueError(f"Hugging Face's T5 cannot hold this config: {wrong or type(cfg).__name__} "
                         f"(it needs {want | {'num_kv_heads': 'heads'}})")


def t5_hf_names(cfg: T5Config) -> dict[str, str | tuple[str, ...]]:
    """nanomeg name -> HF name, or the HF names fused into it, in order: the
    self-attention's qkv from q, k, v (rows regrouped per head [q_i, k_i,
    v_i]); the cross-attention's kv from k, v ([k_i, v_i]); a gated fc1 from
    wi_0 (the gate) and wi_1 ([gate_i, up_i])."""
    names = {"embed.word": "shared.weight"}
    for stack, layers in cfg.stacks().items():
        hf = stack.rstrip(".")
        names[f"{stack}final_norm.weight"] = f"{hf}.final_layer_norm.weight"
        names[f"{stack}rel_bias"] = f"{hf}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        for i in range(layers):
            ours, theirs = f"{stack}layers.{i}", f"{hf}.block.{i}.layer"
            attn, ff = f"{theirs}.0.SelfAttention", f"{theirs}.{2 if stack == 'decoder.' else 1}"
            names |= {f"{ours}.ln1.weight": f"{theirs}.0.layer_norm.weight",
                      f"{ours}.attn.qkv.weight": tuple(f"{attn}.{p}.weight" for p in "qkv"),
                      f"{ours}.attn.proj.weight": f"{attn}.o.weight",
                      f"{ours}.ln2.weight": f"{ff}.layer_norm.weight",
                      f"{ours}.mlp.fc1.weight": (f"{ff}.DenseReluDense.wi_0.weight", f"{ff}.DenseReluDense.wi_1.weight")
                      if cfg.gated else f"{ff}.DenseReluDense.wi.weight",
                      f"{ours}.mlp.fc2.weight": f"{ff}.DenseReluDense.wo.weight"}
            if stack == "decoder.":
                cross = f"{theirs}.1.EncDecAttention"
                names |= {f"{ours}.ln_cross.weight": f"{theirs}.1.layer_norm.weight",
                          f"{ours}.cross_attn.q.weight": f"{cross}.q.weight",
                          f"{ours}.cross_attn.kv.weight": (f"{cross}.k.weight", f"{cross}.v.weight"),
                          f"{ours}.cross_attn.proj.weight": f"{cross}.o.weight"}
    if not cfg.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    return names


def _fuse(parts: list[torch.Tensor], name: str, cfg: T5Config) -> torch.Tensor:
    """HF's separate projections -> nanomeg's fused rows (see t5_hf_names)."""
    if name.endswith("mlp.fc1.weight"):
        return rearrange(torch.stack(parts), "two f h -> (f two) h")
    return rearrange(torch.stack(parts), "parts (n d) h -> (n parts d) h", n=cfg.heads)


def _unfuse(fused: torch.Tensor, name: str, cfg: T5Config, parts: int) -> list[torch.Tensor]:
    if name.endswith("mlp.fc1.weight"):
        return list(rearrange(fused, "(f two) h -> two f h", two=2))
    return list(rearrange(fused, "(n parts d) h -> parts (n d) h", n=cfg.heads, parts=parts))


def from_hf_t5(state_dict, cfg: T5Config) -> dict[str, torch.Tensor]:
    """nanomeg parameters from a T5ForConditionalGeneration state dict (v1.0
    or v1.1 layout), a .safetensors file or a folder holding model.safetensors.
    Every tensor is checked by name and shape first; an untied lm_head with a
    tied config (or the reverse) is refused, not dropped or guessed."""
    check_t5_compatible(cfg)
    sd = load_state_dict(state_dict)
    shapes = {name: shape for name, (shape, _) in t5_shapes(cfg).items()}
    names = t5_hf_names(cfg)
    want = {"shared.weight": (cfg.vocab_size, cfg.hidden)}
    for ours, theirs in names.items():
        if isinstance(theirs, tuple):
            want |= {t: (shapes[ours][0] // len(theirs), shapes[ours][1]) for t in theirs}
        elif ours != "embed.word":
            want[theirs] = (cfg.vocab_size, cfg.hidden) if ours == "head.weight" else shapes[ours]
    check_checkpoint(sd, want, what="T5 (T5ForConditionalGeneration)", positions=None,
                     next_layer=tuple(f"{stack}block.{n}.layer.0.SelfAttention.q.weight"
                                      for stack, n in (("encoder.", cfg.layers), ("decoder.", cfg.num_decoder_layers))))
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        check_tied(sd, alias, "shared.weight", "T5 has one word embedding for both stacks")
    if cfg.tie_embeddings:
        check_tied(sd, "lm_head.weight", "shared.weight", "set tie_embeddings=False, as T5 v1.1 has it")
    params = {}
    for ours, theirs in names.items():
        params[ours] = _fuse([sd[t] for t in theirs], ours, cfg) if isinstance(theirs, tuple) else sd[theirs]
    for name in ("embed.word", "head.weight"):
        if name in params:
            params[name] = pad_vocab_rows(params[name], cfg.padded_vocab)
    return {name: params[name].contiguous().clone() for name in shapes}


def to_hf_t5(params, cfg: T5Config) -> dict[str, torch.Tensor]:
    """A T5ForConditionalGeneration state dict from full nanomeg parameters
    (shared.weight with its encoder/decoder aliases; lm_head.weight: the
    untied head, or the shared embedding when tied). Shards are refused:
    unshard them first."""
    check_t5_compatible(cfg)
    check_full_params(params, t5_shapes(cfg))
    sd = {}
    for ours, theirs in t5_hf_names(cfg).items():
        if isinstance(theirs, tuple):
            sd |= dict(zip(theirs, _unfuse(params[ours], ours, cfg, len(theirs))))
        else:
            sd[theirs] = params[ours]
    sd["shared.weight"] = params["embed.word"][: cfg.vocab_size]
    sd["encoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    sd["lm_head.weight"] = params["head.weight"][: cfg.vocab_size] if not cfg.tie_embeddings else sd["shared.weight"]
    return {k: v.contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------------------
# 11. Retrievers: a bi-encoder (two BERT towers, or one shared), the in-batch
#     retrieval loss across data-parallel replicas, an index searched
#     exactly, and REALM's retrieve-and-read loss.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BiEncoderConfig(BertConfig):
    """Two BERT towers that map queries and contexts (blocks) to vectors.
    shared: one parameter set for both (unprefixed names, a BERT's own);
    else "query." and "context." prefixes. pooling "cls": the [CLS] hidden
    state, through a linear projection [projection_dim, h] when
    projection_dim > 0 (Megatron's PretrainedBertModel, DPR); "ict": the
    pooler, then an ICT head [projection_dim, h] (Megatron's IREncoderBertModel).
    score_scale: scores / sqrt(h) (Megatron's --retriever-score-scaling)."""

    shared: bool = True
    pooling: str = "cls"
    projection_dim: int = 0
    score_scale: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.pooling == "ict" and self.projection_dim < 1:
            raise ValueError(f"pooling='ict' needs the ICT head's size: projection_dim >= 1, got {self.projection_dim}")

    @property
    def embed_dim(self) -> int:
        return self.projection_dim or self.hidden

    def stacks(self) -> dict[str, int]:
        return {"": self.layers} if self.shared else {"query.": self.layers, "context.": self.layers}

    def tower_prefix(self, tower: str) -> str:
        if tower not in ("query", "context"):
            raise ValueError(f"tower={tower!r} is not 'query' or 'context'")
        return "" if self.shared else f"{tower}."


def tower_shapes(cfg: BiEncoderConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """One tower: the core stack, then the pooler and ICT head, or the projection."""
    shapes = stack_shapes(cfg)
    if cfg.pooling == "ict":
        shapes |= linear_shapes("pooler", cfg.hidden, cfg.hidden, "normal", True)
        shapes |= linear_shapes("ict_head", cfg.projection_dim, cfg.hidden, "normal", True)
    elif cfg.projection_dim:
        shapes |= linear_shapes("projection", cfg.projection_dim, cfg.hidden, "normal", True)
    return shapes


def biencoder_shapes(cfg: BiEncoderConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """One tower (shared) or two, "query." and "context."."""
    one = tower_shapes(cfg)
    return one if cfg.shared else {f"{t}.{k}": v for t in ("query", "context") for k, v in one.items()}


def init_biencoder(cfg: BiEncoderConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full bi-encoder parameters (Megatron's init; two separate towers start different)."""
    return init_params(biencoder_shapes(cfg), cfg, seed, dtype)


def biencoder_specs(cfg: BiEncoderConfig) -> dict[str, int | P.HeadGroups | None]:
    """The core's split in each tower; the pooler, ICT head and projection are replicated."""
    return _stack_specs(biencoder_shapes(cfg), cfg)


def biencoder_from_bert(bert_params: dict, cfg: BiEncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Both towers from one BERT's full parameters (Megatron's
    init_state_dict_from_bert): its embedding and stack (and pooler, for ICT)
    copied into each tower; the projection or ICT head drawn fresh (the
    pooler too when the BERT has none). The BERT's encoder must be cfg's
    (`check_encoder`): no layer or norm is drawn fresh or dropped."""
    check_encoder(bert_params, cfg)
    one = tower_shapes(cfg)
    fresh = init_params({k: v for k, v in one.items() if k not in bert_params}, cfg, seed,
                        next(iter(bert_params.values())).dtype)
    tower = {k: bert_params[k] for k in one if k in bert_params} | fresh
    check_full_params(tower, one)
    out = {k: tower[k] for k in one}
    return {k: v.clone() for k, v in out.items()} if cfg.shared else \
        {f"{t}.{k}": v.clone() for t in ("query", "context") for k, v in out.items()}


def embed_text(params, ids, cfg: BiEncoderConfig, mesh: Mesh, *, tower: str, attention_mask=None, seed=0,
               training=False):
    """ids [b, s] (with a 1/0 attention_mask) -> vectors [b, e], the same on
    every tp rank: the tower's BERT encoder, then its [CLS] state. Under
    sequence parallel [CLS] is on tp rank 0's chunk, so the sequence is
    all-gathered first (b·s·h; the backward is a split, as for BERT's pooler)."""
    cfg.check_mesh(mesh)
    prefix = cfg.tower_prefix(tower)
    p = substack(params, prefix) if prefix else params
    x = bert_encode(p, ids, cfg, mesh, attention_mask=attention_mask, seed=seed, training=training,
                    stream_prefix=f"{tower}.")  # each tower draws its own dropout masks
    if cfg.pooling == "ict":
        return F.linear(bert_pool(p, x, cfg, mesh), p["ict_head.weight"], p["ict_head.bias"])
    if cfg.sequence_parallel:
        x = P.gather_from_sp(x, mesh, tp_output_grad=False)
    cls = x[:, 0]  # [b, h]
    return F.linear(cls, p["projection.weight"], p["projection.bias"]) if cfg.projection_dim else cls


def retrieval_scores(q, c, cfg: BiEncoderConfig):
    """q [m, e] . c [n, e]^T -> [m, n] (/ sqrt(h) with score_scale)."""
    scores = q @ c.transpose(0, 1)
    return scores / math.sqrt(cfg.hidden) if cfg.score_scale else scores


def retrieval_loss(q, c, cfg: BiEncoderConfig, mesh: Mesh) -> dict[str, torch.Tensor]:
    """In-batch negatives: query i's positive is context i, every other
    context of the GLOBAL batch is a negative. q, c: this replica's [n, e].
    The contexts are gathered over dp (`parallel.gather_from_dp`: all-gather
    forward, reduce-scatter backward), each replica scores its n queries
    against all dp·n contexts, log-softmax, cross-entropy with label
    dp_rank·n + i, mean over its queries. With dp-averaged gradients this is
    exactly the serial run on the global batch. -> dict(loss, top1_acc,
    top5_acc) (accuracies of this replica's queries, no gradient)."""
    if not (isinstance(q, torch.Tensor) and isinstance(c, torch.Tensor) and q.dim() == c.dim() == 2):
        raise ValueError(f"queries {shape_of(q)} and contexts {shape_of(c)} must be [n, e] tensors")
    # every replica's shapes first (one small all-gather), so that a bad batch on one replica is an
    # error on all of them, not a hang in the context gather
    shapes = P.sizes_over_dp((*q.shape, *c.shape), mesh, q.device)  # [(n_q, e_q, n_c, e_c)] per replica
    bad = [(r, s) for r, s in enumerate(shapes) if s[:2] != s[2:]]
    if bad:
        r, s = bad[0]
        raise ValueError(f"queries {s[:2]} and contexts {s[2:]} must be the same [n, e] (on dp rank {r}): one "
                         "context (the positive) per query")
    if len({s[0] for s in shapes}) > 1:
        raise ValueError(f"uneven batches across data-parallel ranks: {[s[0] for s in shapes]} queries; every "
                         "replica needs the same batch size")
    n = q.shape[0]
    scores = retrieval_scores(q, P.gather_from_dp(c, mesh), cfg)  # [n, dp·n]
    labels = torch.arange(n, device=q.device) + mesh.dp_rank * n
    loss = F.cross_entropy(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, labels)
    with torch.no_grad():
        top = scores.topk(min(5, scores.shape[1]), dim=-1).indices
        return dict(loss=loss, top1_acc=(top[:, 0] == labels).float().mean(),
                    top5_acc=(top == labels[:, None]).any(-1).float().mean())


def biencoder_loss(params, batch: dict, cfg: BiEncoderConfig, mesh: Mesh, *, seed=0, training=True) -> dict:
    """batch: query_ids, query_mask [n, s_q]; context_ids, context_mask [n, s_c]
    (context i is query i's positive) -> `retrieval_loss`'s dict."""
    q = embed_text(params, batch["query_ids"], cfg, mesh, tower="query", attention_mask=batch.get("query_mask"),
                   seed=seed, training=training)
    c = embed_text(params, batch["context_ids"], cfg, mesh, tower="context",
                   attention_mask=batch.get("context_mask"), seed=seed, training=training)
    return retrieval_loss(q, c, cfg, mesh)


class Index(NamedTuple):
    """This replica's shard of an index: vectors [n_r, e] and their global block ids [n_r]."""

    vectors: torch.Tensor
    ids: torch.Tensor


@torch.no_grad()
def build_index(params, blocks, masks, cfg: BiEncoderConfig, mesh: Mesh, *, batch: int = 64) -> Index:
    """Embed a corpus of blocks [N, s] (1/0 masks [N, s]) with the context
    tower, no gradients, `batch` blocks at a time. The corpus is cut into dp
    contiguous shares, replica r embedding share r only: nothing moves (each
    replica keeps its vectors; `search` sends only candidates)."""
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"the corpus must be a non-empty [blocks, tokens] tensor, got {shape_of(blocks)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    ids = torch.tensor_split(torch.arange(blocks.shape[0], device=blocks.device), mesh.dp)[mesh.dp_rank]
    vectors = [embed_text(params, blocks[chunk], cfg, mesh, tower="context",
                          attention_mask=None if masks is None else masks[chunk])
               for chunk in ids.split(batch)]
    e = cfg.embed_dim
    dtype = next(iter(params.values())).dtype
    return Index(torch.cat(vectors) if vectors else torch.empty(0, e, dtype=dtype, device=blocks.device), ids)


def search(q, index: Index, k: int, cfg: BiEncoderConfig, mesh: Mesh):
    """Exact top-k of this replica's queries q [m, e] over the index sharded
    over dp -> (scores [m, k], global block ids [m, k]), best first, ties to
    the lower id. Every shard must see every query: the queries are
    ALL-GATHERED over dp (dp·m·e elements), each replica scores all of them
    against its own blocks, and `parallel.top_k_over_dp` merges the
    candidates (one all-gather of dp·m·k scores and ids per replica); each
    replica keeps its own m rows. No gradient. Every replica needs the same m."""
    check_queries(q, index, mesh)
    every = P.all_gather(q.detach(), mesh, "dp", 0)  # [dp·m, e]
    scores, ids = P.top_k_over_dp(retrieval_scores(every, index.vectors, cfg), index.ids, k, mesh)
    m = q.shape[0]
    return scores[mesh.dp_rank * m: (mesh.dp_rank + 1) * m], ids[mesh.dp_rank * m: (mesh.dp_rank + 1) * m]


def check_queries(q, index: Index, mesh: Mesh) -> None:
    """ValueError, on every replica alike, unless each replica's q is a float
    [m, e] with the index's e and every replica has the same m: the shapes go
    round first (one all-gather of 2 numbers), so one bad replica stops all."""
    e = index.vectors.shape[1]
    ok = isinstance(q, torch.Tensor) and q.is_floating_point() and q.dim() == 2 and q.shape[1] == e
    every = P.sizes_over_dp((ok, q.shape[0] if ok else 0), mesh, index.vectors.device)  # [(ok, m)] per replica
    bad = [r for r, (fine, _) in enumerate(every) if not fine]
    if bad:
        here = "" if ok else f", here {shape_of(q)} {getattr(q, 'dtype', '')}".rstrip()
        raise ValueError(f"queries must be float [m, {e}] (the index's width), not on dp ranks {bad}{here}")
    if len({m for _, m in every}) > 1:
        raise ValueError(f"uneven query batches across data-parallel ranks: {[m for _, m in every]}; every replica "
                         "needs the same")


def retrieval_accuracy(found_ids, gold_ids, ks=(1, 5, 20)) -> dict[str, float]:
    """found_ids [m, k] (best first), gold_ids [m] -> {"acc@k": fraction of
    queries whose gold block is among the first k}, for each k <= found."""
    check_id_tensor(found_ids, (None, None), "found_ids")
    check_id_tensor(gold_ids, (found_ids.shape[0],), "gold_ids")
    hit = found_ids == gold_ids[:, None]
    return {f"acc@{k}": hit[:, :k].any(-1).float().mean().item() for k in ks if k <= found_ids.shape[1]}


@dataclass(frozen=True)
class RealmConfig(BiEncoderConfig):
    """REALM: the bi-encoder as the retriever, plus a reader ("reader." + a
    BERT masked LM of the same sizes); top_k blocks retrieved per query."""

    top_k: int = 4

    def stacks(self) -> dict[str, int]:
        return super().stacks() | {"reader.": self.layers}


def reader_config(cfg: BiEncoderConfig) -> BertConfig:
    """REALM's reader: a BERT masked LM of the retriever's sizes (no NSP head)."""
    return BertConfig(**{f.name: getattr(cfg, f.name) for f in fields(BertConfig)} | dict(task="pretrain",
                                                                                          binary_head=False))


def realm_shapes(cfg: RealmConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The bi-encoder (the retriever) plus "reader." + a BERT masked LM."""
    return biencoder_shapes(cfg) | {f"reader.{k}": v for k, v in bert_shapes(reader_config(cfg)).items()}


def init_realm(cfg: RealmConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return init_params(realm_shapes(cfg), cfg, seed, dtype)


def realm_specs(cfg: RealmConfig) -> dict[str, int | P.HeadGroups | None]:
    return _stack_specs(realm_shapes(cfg), cfg)


def realm_loss(params, batch: dict, index: Index, corpus: tuple, cfg: RealmConfig, mesh: Mesh, *, seed=0,
               training=True) -> dict[str, torch.Tensor]:
    """REALM's retrieve-and-read loss for masked queries.

    batch: query_ids [b, s_q] ([CLS] x [SEP], some ids masked), query_mask
    (1 = real), targets [b, s_q] and target_mask [b, s_q] (1 where a masked
    id is to be restored); optionally gold [b], the block each query came
    from (for the retrieval accuracy only). index: the context tower's
    vectors of the corpus (`build_index`), stale between refreshes; corpus:
    (ids [N, s_b], mask [N, s_b]) of the blocks, z [SEP], on every rank.

    1. the query tower embeds x: q [b, e] (with gradient);
    2. `search` picks the top k blocks z with the stale index; as in REALM
       their scores are then recomputed with the current towers (the k
       blocks re-embedded by the context tower): p(z|x) = softmax over the
       k of q . z, so the gradient reaches both towers through the scores;
    3. the reader reads [x; z] for each of the b·k pairs (token type 0 for x,
       1 for z) and scores the masked ids: log p(y|x,z) = -sum of their
       cross-entropies (vocab-parallel);
    4. loss = -mean over queries of log sum_z p(y|x,z) p(z|x).
    -> dict(loss, retrieval_acc: the gold block among the k, when gold is given)."""
    blocks, block_mask = corpus
    x, k = batch["query_ids"], cfg.top_k
    check_id_tensor(x, (None, None), "query_ids")
    check_id_tensor(batch["targets"], tuple(x.shape), "targets")
    chosen = real_tokens(batch["target_mask"], x, "target_mask")
    if batch.get("gold") is not None:
        check_id_tensor(batch["gold"], (x.shape[0],), "gold")
    check_id_tensor(blocks, (None, None), "corpus blocks")
    q = embed_text(params, x, cfg, mesh, tower="query", attention_mask=batch["query_mask"], seed=seed,
                   training=training)  # [b, e]
    _, top = search(q, index, k, cfg, mesh)  # [b, k] global block ids
    z = embed_text(params, blocks[top].flatten(0, 1), cfg, mesh, tower="context",
                   attention_mask=block_mask[top].flatten(0, 1), seed=seed, training=training)  # [b·k, e]
    scores = torch.einsum("be,bke->bk", q, z.unflatten(0, (-1, k)))
    log_pz = torch.log_softmax(scores / (math.sqrt(cfg.hidden) if cfg.score_scale else 1.0), dim=-1)  # [b, k]
    pair = lambda a, bk: rearrange(torch.cat([repeat(a, "b s -> b k s", k=k), bk], dim=2), "b k s -> (b k) s")
    ids = pair(x, blocks[top])  # [b·k, s_q + s_b]
    mask = pair(batch["query_mask"], block_mask[top])
    types = pair(torch.zeros_like(x), torch.ones_like(blocks[top]))
    targets = pair(batch["targets"], torch.zeros_like(blocks[top]))
    chosen = pair(chosen.to(q.dtype), torch.zeros(blocks[top].shape, dtype=q.dtype, device=x.device))
    reader = substack(params, "reader.")
    logits, _ = bert_pretrain(reader, ids, reader_config(cfg), mesh, token_types=types, attention_mask=mask,
                              seed=seed, training=training, stream_prefix="reader.")
    nll = P.vocab_parallel_cross_entropy(logits, targets, mesh, vocab_size=cfg.vocab_size)  # [b·k, s]
    log_py = -rearrange((nll * chosen).sum(-1), "(b k) -> b k", k=k)
    loss = -torch.logsumexp(log_py + log_pz, dim=-1).mean()
    out = dict(loss=loss)
    if batch.get("gold") is not None:
        out["retrieval_acc"] = (top == batch["gold"][:, None]).any(-1).float().mean()
    return out


# ---------------------------------------------------------------------------
# 12. DPR weights (Hugging Face DPRQuestionEncoder / DPRContextEncoder) in
# ---------------------------------------------------------------------------

DPR_PREFIXES = ("question_encoder.", "ctx_encoder.")


def dpr_config_from_hf(hf_config, **overrides) -> BiEncoderConfig:
    """The BiEncoderConfig of a transformers DPRConfig (a post-norm BERT's
    sizes plus projection_dim; HF_KEYS["DPR"] checked); overrides, e.g.
    shared=False for two towers."""
    hf = check_hf_config(hf_config_dict(hf_config), "DPR")
    return BiEncoderConfig(**_bert_sizes(hf) | dict(projection_dim=hf["projection_dim"]) | overrides)


def check_dpr_compatible(cfg: BiEncoderConfig) -> None:
    """DPR's towers are post-norm BERTs (learned positions, biases) embedding with the [CLS] state."""
    check_bert_compatible(cfg)
    if cfg.pooling != "cls" or cfg.norm_order != "post":
        raise ValueError(f"DPR cannot hold this config: {{'pooling': {cfg.pooling!r}, 'norm_order': "
                         f"{cfg.norm_order!r}}} (DPR has [CLS] pooling and a post-norm BERT)")


def dpr_hf_config(cfg: BiEncoderConfig) -> dict:
    """The config.json of each DPR encoder holding cfg's towers (plain JSON values)."""
    check_dpr_compatible(cfg)
    return bert_hf_config(cfg) | dict(model_type="dpr", projection_dim=cfg.projection_dim)


def to_hf_dpr(params, cfg: BiEncoderConfig) -> dict[str, dict[str, torch.Tensor]]:
    """{"question_encoder": a DPRQuestionEncoder's state dict, "ctx_encoder":
    a DPRContextEncoder's} from full bi-encoder parameters (inverse of
    `from_hf_dpr`; a shared tower is written to both)."""
    check_dpr_compatible(cfg)
    out = {}
    for tower, prefix in zip(("query", "context"), DPR_PREFIXES):
        sub = substack(params, cfg.tower_prefix(tower)) if not cfg.shared else params
        bert = to_hf_bert({k: v for k, v in sub.items() if k in stack_shapes(cfg)}, cfg, encoder_only=True)
        sd = {f"{prefix}bert_model.{k.removeprefix('bert.')}": v for k, v in bert.items()}
        if cfg.projection_dim:
            sd |= {f"{prefix}encode_proj.weight": sub["projection.weight"], f"{prefix}encode_proj.bias":
                   sub["projection.bias"]}
        out[prefix.rstrip(".")] = {k: v.contiguous().clone() for k, v in sd.items()}
    return out


def from_hf_dpr(state_dict, cfg: BiEncoderConfig) -> dict[str, torch.Tensor]:
    """One tower's parameters (unprefixed) from a DPRQuestionEncoder or
    DPRContextEncoder state dict, .safetensors file or folder: its BERT
    (post-norm, no pooler: `from_hf_bert(encoder_only=True)`) and, with
    projection_dim > 0, encode_proj as the projection. DPR embeds with the
    [CLS] state: cfg.pooling must be "cls". Two towers: prefix them
    "query." / "context." (cfg.shared=False); one: use it as it is."""
    if cfg.pooling != "cls":
        raise ValueError(f"DPR embeds with the [CLS] state: pooling must be 'cls', got {cfg.pooling!r}")
    sd = load_state_dict(state_dict)
    found = [p for p in DPR_PREFIXES if f"{p}bert_model.embeddings.word_embeddings.weight" in sd]
    if not found:
        raise ValueError(f"not a DPRQuestionEncoder / DPRContextEncoder state dict: no key "
                         f"'{{{'|'.join(DPR_PREFIXES)}}}bert_model.embeddings.word_embeddings.weight' "
                         f"(first keys: {list(sd)[:3]})")
    prefix = found[0]
    bert = {f"bert.{k.removeprefix(prefix + 'bert_model.')}": v for k, v in sd.items()
            if k.startswith(prefix + "bert_model.")}
    params = from_hf_bert(bert, cfg, encoder_only=True)
    proj = f"{prefix}encode_proj."
    has_proj = f"{proj}weight" in sd
    if has_proj != bool(cfg.projection_dim):
        got = tuple(sd[f"{proj}weight"].shape) if has_proj else "none"
        raise ValueError(f"the checkpoint's projection ({proj}weight: {got}) does not match "
                         f"projection_dim={cfg.projection_dim}")
    if has_proj:
        check_checkpoint(sd, {f"{proj}weight": (cfg.projection_dim, cfg.hidden), f"{proj}bias": (cfg.projection_dim,)},
                         what="DPR", positions=None, next_layer=())
        params |= {"projection.weight": sd[f"{proj}weight"].clone(), "projection.bias": sd[f"{proj}bias"].clone()}
    return params


# ---------------------------------------------------------------------------
# 13. Pipeline stages: GPT and BERT cut into stages, and one training step
#     run by a pipeline schedule (parallel.py sections 10 and 11)
# ---------------------------------------------------------------------------

PIPELINE_MODELS = ("gpt", "bert")  # T5 and the retrievers do not pipeline here (they train with tp and dp)


class Stage(NamedTuple):
    """What one virtual stage computes: its run of layers; the first stage
    also embeds, the last also applies the final norm, the head and the loss."""

    layers: range
    first: bool
    last: bool


def stages_of(cfg: GPTConfig, mesh: Mesh, v: int = 1) -> dict[int, Stage]:
    """This pipeline rank's stages, by chunk: chunk c is virtual stage
    c·pp + pp_rank of pp·v (`parallel.stage_layers`)."""
    if cfg.position == "relative" and mesh.pp > 1:
        raise ValueError(f"position='relative' does not pipeline (pp={mesh.pp}): its one bias table serves the "
                         "layers of every stage; use learned or rope positions, or pp=1")
    runs = P.stage_layers(cfg.layers, mesh.pp, v)
    return {c: Stage(runs[c * mesh.pp + mesh.pp_rank], c * mesh.pp + mesh.pp_rank == 0,
                     c * mesh.pp + mesh.pp_rank == mesh.pp * v - 1) for c in range(v)}


def owned_by(name: str, stage: Stage, cfg: GPTConfig) -> bool:
    """Does the stage hold parameter `name`? Its layers' `layers.{i}.*`; the
    embedding tables on the first stage; everything else (final norm, output
    layer, BERT's heads) on the last. A tied word embedding is used by both
    ends, so the last stage holds its own copy of `embed.word` (Megatron's
    initialize_word_embeddings): both start equal (init is the same
    everywhere), and their gradients are summed over the embedding group
    each step (`parallel.GradBuckets`), so they stay equal."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) in stage.layers
    if name.startswith("embed."):
        return stage.first or (stage.last and name == "embed.word" and cfg.tie_embeddings)
    return stage.last


def stage_params(params: dict, cfg: GPTConfig, mesh: Mesh, v: int = 1) -> dict:
    """The slice of the flat dict (full or tp-sharded) this pipeline rank
    holds: the union of its chunks' parameters. `shard` / `unshard` and the
    specs work on it unchanged; with pp = 1 it is all of params."""
    stages = stages_of(cfg, mesh, v).values()
    return {n: p for n, p in params.items() if any(owned_by(n, s, cfg) for s in stages)}


def tied_copies(cfg: GPTConfig, mesh: Mesh) -> tuple:
    """Names whose two copies, on the first and the last pipeline rank, have
    their gradients summed over the embedding group: the tied word
    embedding when pp > 1. () otherwise."""
    return ("embed.word",) if cfg.tie_embeddings and mesh.pp > 1 else ()


def norm_skip(cfg: GPTConfig, mesh: Mesh) -> tuple:
    """Names this rank leaves out of the global grad norm: the last stage's
    copy of a tied embedding (the first stage counts it, once)."""
    return tied_copies(cfg, mesh) if mesh.pp_rank == mesh.pp - 1 else ()


def split_microbatches(inputs: dict, m: int, counted: str | None = None) -> list[dict]:
    """Cut a batch (dict of [b, ...] tensors) into m microbatches of b/m rows.
    Each gets `share`: its share of the batch's token-mean loss, the
    fraction of the counted tokens (inputs[counted]: a loss mask) it holds,
    or 1/m; and `rows`, 1/m, for per-row means (BERT's next sentence). With
    these weights the sum over microbatches is the full batch's loss exactly."""
    b = next(iter(inputs.values())).shape[0]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or b % m:
        raise ValueError(f"microbatches={m!r} must be an integer >= 1 dividing the batch's {b} rows")
    parts = [{k: v[i * (b // m): (i + 1) * (b // m)] for k, v in inputs.items()} for i in range(m)]
    total = inputs[counted].sum() if counted is not None and inputs.get(counted) is not None else None
    for part in parts:
        part["share"] = 1 / m if total is None else part[counted].sum() / torch.where(total > 0, total, 1)
        part["rows"] = 1 / m
    return parts


def stage_forward(model: str, params, x, micro: dict, cfg: GPTConfig, mesh: Mesh, stage: Stage, *, seed=0,
                  training=True, moe=None):
    """One stage of GPT or BERT on one microbatch. params: the stage's own.
    x: None on the first stage (it embeds micro["ids"]), else [b, s(/t), h]
    from the previous stage. -> [b, s(/t), h] for the next stage, or on the
    last a dict of this microbatch's weighted loss contributions. moe: a `MoE`
    collecting the MoE layers' stats (its scale: this microbatch's rows share)."""
    ids = micro["ids"]
    mask = bert_attention_mask(micro.get("attention_mask"), ids) if model == "bert" else None
    if stage.first:  # under cp: this rank's two chunks of each sequence (the loss splits the targets alike)
        x = embed(params, P.cp_split(ids, mesh), cfg, mesh, token_types=micro.get("token_types"), seed=seed,
                  training=training)
    layers = {n: p for n, p in params.items() if n.startswith("layers.") or n == "rel_bias"}  # the stack's own
    kind = "causal" if model == "gpt" else "none" if mask is None else "padding"
    x = run_layers(layers, x, cfg, mesh, mask_kind=kind, mask=mask, seed=seed, training=training,
                   moe=None if moe is None else replace(moe, scale=micro["rows"]))
    if not stage.last:
        return x
    if model == "gpt":
        loss = lm_loss(lm_logits(params, x, cfg, mesh), micro["targets"], cfg, mesh, micro.get("loss_mask"))
        return dict(loss=loss * micro["share"])
    out = bert_pretrain_losses(*bert_heads(params, final_norm(params, x, cfg, mesh), cfg, mesh), cfg, mesh,
                               mlm_targets=micro["mlm_targets"], mlm_mask=micro.get("mlm_mask"),
                               nsp_labels=micro.get("nsp_labels"))
    out = {k: val * (micro["share"] if k == "mlm" else micro["rows"]) for k, val in out.items() if k != "loss"}
    return dict(loss=out["mlm"] + out.get("nsp", 0.0), **out)


PIPELINE_INPUTS = dict(gpt=("ids", "targets", "loss_mask"),
                       bert=("ids", "mlm_targets", "mlm_mask", "nsp_labels", "token_types", "attention_mask"))


def check_pipeline_batch(model: str, inputs: dict, cfg: GPTConfig, mesh: Mesh) -> None:
    """ValueError, alike on every pipeline rank before anything is sent, unless
    inputs is a batch the stages can run: only the model's keys
    (`PIPELINE_INPUTS`), ids [b, s] in the vocabulary with s fitting max_seq
    and the mesh (`check_seq`), the targets [b, s] and every other entry as
    the serial model checks it. Each stage reads only part of the batch (the
    first embeds the ids, the last reads the targets), so a check left to the
    stage that reads it would stop that stage and leave its peers waiting."""
    if not isinstance(inputs, dict) or "ids" not in inputs:
        raise ValueError(f"inputs must be a dict of tensors with 'ids', got {type(inputs).__name__}")
    unknown = sorted(set(inputs) - set(PIPELINE_INPUTS[model]))
    if unknown:
        raise ValueError(f"inputs {unknown} are not read by the {model} pipeline (it reads {PIPELINE_INPUTS[model]})")
    ids, (targets, mask) = inputs["ids"], PIPELINE_INPUTS[model][1:3]
    check_id_tensor(ids, (None, None), "ids", cfg.vocab_size, "token id")
    cfg.check_seq(ids.shape[1], mesh)
    check_id_tensor(inputs.get(targets), tuple(ids.shape), targets, cfg.vocab_size, "target id")
    check_loss_mask(inputs.get(mask), inputs[targets])
    if model == "bert":
        check_nsp_labels(inputs.get("nsp_labels"), ids.shape[0], cfg)
        check_token_types(inputs.get("token_types"), ids, cfg)
        bert_attention_mask(inputs.get("attention_mask"), ids)


def pipeline_step(model: str, params, inputs: dict, cfg: GPTConfig, mesh: Mesh, *, schedule: str = "1f1b",
                  v: int = 1, microbatches: int = 1, seed: int = 0, training: bool = True, clock=None,
                  moe=None, stage_fn=stage_forward) -> dict:
    """One step of GPT or BERT on this rank: params is the rank's
    `stage_params` (tp-sharded), inputs the replica's batch (every pipeline
    rank reads the same batch; only the first and last stages use it). The
    batch is cut into microbatches, run by the named schedule's action list
    for this rank (`parallel.run_schedule`); training: the gradients
    accumulate into the params' .grad (the caller averages them over dp and
    syncs tied copies: `parallel.GradBuckets`, whose hook moves them into
    fp32 buckets for bf16 params under train.py). Not training: forward only.
    -> the losses of the batch (as the one-process run on it computes them),
    the same on every rank: {"loss"} for GPT, {"loss", "mlm", "nsp",
    "nsp_acc"} for BERT with its next-sentence head. clock: see `run_schedule`.
    With MoE layers, training: "loss" adds the weighted auxiliary losses
    of every stage's layers (summed over pp), and "lm" is the LM loss alone;
    moe: a `MoE` that collects this rank's layers' stats. stage_fn:
    `stage_forward`, or a compiled twin of it (train.py's --compile)."""
    if model not in PIPELINE_MODELS:
        raise ValueError(f"model {model!r} does not pipeline: pipeline stages exist for {PIPELINE_MODELS}")
    if model == "bert":
        _check_task(cfg, "pretrain")
    cfg.check_mesh(mesh)
    moe = MoE() if moe is None and cfg.experts else moe
    m = microbatches
    stages = stages_of(cfg, mesh, v)
    chunks = {c: {n: p for n, p in params.items() if owned_by(n, st, cfg)} for c, st in stages.items()}
    check_pipeline_batch(model, inputs, cfg, mesh)
    micros = split_microbatches(inputs, m, "loss_mask" if model == "gpt" else "mlm_mask")
    schedules, plans = P.checked_schedule(schedule, mesh.pp, m, v, forward_only=not training)
    b, s = inputs["ids"].shape
    shape = (b // m, s // mesh.cp // (mesh.tp if cfg.sequence_parallel else 1), cfg.hidden)
    dtype = next(iter(params.values())).dtype

    def forward(c, i, x):
        return stage_fn(model, chunks[c], x, micros[i], cfg, replace(mesh, micro=i, micros=m), stages[c],
                        seed=seed, training=training, moe=moe)

    totals = P.run_schedule(schedules[mesh.pp_rank], plans[mesh.pp_rank], forward, mesh, v=v, shape=shape,
                            dtype=dtype, device=inputs["ids"].device, params_of=lambda c: chunks[c].values(),
                            forward_only=not training, clock=clock)
    keys = ("loss",) if model == "gpt" else ("loss", "mlm", "nsp", "nsp_acc") if cfg.binary_head else ("loss", "mlm")
    out = P.pipeline_totals(totals, keys, mesh, device=inputs["ids"].device)
    if cfg.experts and training:
        aux = torch.as_tensor(moe.aux_loss(cfg), dtype=out["loss"].dtype, device=out["loss"].device)
        out["lm"], out["loss"] = out["loss"], out["loss"] + P.all_reduce(aux, mesh, "pp", phase="after backward")
    return out
