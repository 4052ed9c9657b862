"""kernels.py — how nanomeg runs fast.

Megatron-LM's fused kernels, written in Triton, each beside a plain-PyTorch reference with the same
signature (DESIGN.md, idea 5):

| op                 | here                  | Megatron-LM                                                        |
| ------------------ | --------------------- | ------------------------------------------------------------------ |
| scale-mask-softmax | `scale_mask_softmax`  | FusedScaleMaskSoftmax: scaled_upper_triang_masked_softmax (causal) |
|                    |                       | scaled_masked_softmax (padding), scaled_softmax (none)             |
| LayerNorm          | `layer_norm`          | MixedFusedLayerNorm, `apply_layernorm_1p` (zero-centred gamma)     |
| RMSNorm            | `rms_norm`            | MixedFusedRMSNorm                                                  |
| bias + GeLU        | `bias_gelu`           | bias_gelu_impl (fused_bias_gelu.py)                                |

Every op is four things: Triton kernels (forward, backward), a `*_reference` in plain PyTorch
(differentiable by autograd; it also accepts float64, for gradcheck), a `Triton*` autograd function, and
the public dispatcher. The dispatcher decides at every call:

* CUDA tensors take Triton, CPU tensors take the reference;
* `NANOMEG_TRITON` overrides that, read case-insensitively: 1, true, yes or on force Triton (CPU tensors
  then need `TRITON_INTERPRET=1`, set before triton is first imported: the tests do this); 0, false, no
  or off force the reference; unset or empty keeps the rule above; any other value is a ValueError;
* without an importable triton, the references are used, and forcing Triton raises a RuntimeError.

Gradients. The Triton backward kernels give first-order gradients only: a second differentiation
through them (`torch.autograd.grad(..., create_graph=True)`, then a backward through that gradient)
raises a RuntimeError naming the op. The references are plain autograd and differentiate to any order
(gradgradcheck in the tests): use them, `NANOMEG_TRITON=0`, for higher-order gradients.

Bad input is a ValueError naming the sizes, raised before any launch. A non-contiguous input is copied
with `.contiguous()` first: the kernels address row r of a [rows, n] tensor as `x + r * n`.

Memory traffic. These ops do a few flops per element, so their time is the bytes they move. Each kernel's
docstring counts what it reads and writes once, against what the unfused PyTorch chain moves.
The kernels compute in fp32 whatever the storage dtype (fp16, bf16, fp32).

Block sizes. A row that fits in one block (`SOFTMAX_BLOCK`, `NORM_BLOCK` elements) is held in registers
and read once; a longer row is swept in chunks of that size by a "looped" kernel. They are module
constants read at call time, so tests lower them to make "longer than one block" cheap.
"""

import functools
import os
import types

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # e.g. macOS or Windows: only the references can run.
    HAVE_TRITON = False
    # Stand-ins so that the kernel definitions below still parse; the dispatcher never launches them.
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)

SOFTMAX_BLOCK = 8192  # longest softmax row (sk) held in registers; longer rows use the looped kernels
NORM_BLOCK = 8192  # longest LayerNorm/RMSNorm row (hidden size) held in registers
GELU_BLOCK_M, GELU_BLOCK_N = 16, 256  # bias-GeLU tile: rows x columns per program
GROUPS_PER_SM = 4  # bias-GeLU weight-gradient stage 1: row groups per streaming multiprocessor on CUDA
NORM_BWD_WARPS_PER_SM = 32  # norm backward: the warps an SM holds at once (see _norm_bwd_warps)
CPU_ROW_GROUPS = 3  # weight-gradient stage 1: the number of row groups under the CPU interpreter
COLUMN_SUM_BLOCK_G, COLUMN_SUM_BLOCK_N = 64, 32  # weight-gradient stage 2: groups x columns per tile

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
MASK_KINDS = {"none": 0, "causal": 1, "padding": 2}
GELU_APPROXIMATIONS = ("tanh", "none")


# ----------------------------------------------------------------------------------------------------
# Dispatch and shared helpers
# ----------------------------------------------------------------------------------------------------


TRITON_ON = ("1", "true", "yes", "on")  # NANOMEG_TRITON spellings that force the Triton kernels
TRITON_OFF = ("0", "false", "no", "off")  # ... and those that force the references


def _triton_switch() -> bool | None:
    """NANOMEG_TRITON, read: True (force Triton), False (force the references), None (unset or empty:
    decide by device). Case and surrounding spaces do not matter; an unknown value is a ValueError, so
    that a typo cannot silently pick the other path."""
    value = os.environ.get("NANOMEG_TRITON", "")
    word = value.strip().lower()
    if word == "":
        return None
    if word in TRITON_ON or word in TRITON_OFF:
        return word in TRITON_ON
    raise ValueError(
        f"NANOMEG_TRITON={value!r} is not understood: use one of {'/'.join(TRITON_ON)} to force the Triton "
        f"kernels, one of {'/'.join(TRITON_OFF)} to force the references, or leave it unset"
    )


def uses_triton(x: torch.Tensor) -> bool:
    """True when the kernels below send x to Triton (then `bias_gelu` adds a bias inside its one pass,
    and the norms keep only their input); False on the plain-PyTorch references."""
    return _use_triton(x)


def _use_triton(x: torch.Tensor) -> bool:
    """True when `x` should go to the Triton kernels (see the module docstring for the rules)."""
    forced = _triton_switch()
    if forced is None:
        return HAVE_TRITON and x.is_cuda
    if forced:
        value = os.environ["NANOMEG_TRITON"]
        if not HAVE_TRITON:
            raise RuntimeError(f"NANOMEG_TRITON={value} forces the Triton kernels, but triton cannot be imported")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"NANOMEG_TRITON={value} with a {x.device.type} tensor needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported"
            )
    return forced


class _NoHigherOrder(torch.autograd.Function):
    """Passes the gradients a Triton backward computed through unchanged, as a node of the graph that
    create_graph=True builds, with the tensors those gradients depend on (dy and what forward saved)
    as its inputs. Differentiating through it raises: the Triton backward kernels are not themselves
    differentiable, and without this node autograd would take their results for constants, so that
    a second-order gradient would silently lose every term that passes through them."""

    @staticmethod
    def forward(ctx, op, n_grads, *tensors):
        ctx.op = op
        return tensors[:n_grads]  # the rest (dependencies) only connect this node to the graph

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.op}: the Triton kernels give first-order gradients only, so this gradient of a gradient "
            "cannot be computed; for higher-order gradients use the reference (NANOMEG_TRITON=0)"
        )


def _first_order_only(op: str):
    """Decorator for the backward of a Triton autograd function. Under create_graph=True the gradients
    it returns pass through _NoHigherOrder, so that a second differentiation raises a RuntimeError
    naming `op`. (torch's once_differentiable is not enough: it hangs its error node on detached
    copies, which autograd.grad(..., inputs=x) prunes, and adds none when dy needs no gradient; either
    way the second-order gradient then comes back short, without an error.)"""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # create_graph=False: the usual first-order backward
                return grads
            depends_on = [t for t in (*grad_outputs, *ctx.saved_tensors) if t is not None and t.requires_grad]
            tensors = [g for g in grads if g is not None]
            guarded = iter(_NoHigherOrder.apply(op, len(tensors), *tensors, *depends_on))
            return tuple(None if g is None else next(guarded) for g in grads)

        return wrapper

    return decorate


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here, so that a test can swap in a NaN-filled one and
    catch any element a kernel forgets to write."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_dtype(op: str, what: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{op}: {what} has dtype {t.dtype}; supported: {names}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The references compute in fp32, or in float64 for float64 input (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _num_warps(block: int) -> int:
    """Warps per program for a row block of `block` elements (as in the Triton softmax tutorial)."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _norm_bwd_warps(block: int, element_size: int) -> int:
    """Warps per program of the norm backward: one 16-byte vector of a row per thread (8 elements of bf16,
    4 of fp32), which keeps the kernel near 64 registers a thread (ptxas for sm_90: 40-64 at n = 1024..8192,
    bf16 and fp32), so that an SM's 65536 registers hold NORM_BWD_WARPS_PER_SM = 32 warps of it. (16
    elements per thread, as the forward's _num_warps gives, took 80-113 registers in bf16: at n = 4096,
    the SM then held 2 programs of 8 warps, 16 warps in all.)"""
    return max(1, min(32, block * element_size // (32 * 16)))


def _row_groups(n_rows: int, device: torch.device, per_sm: int = GROUPS_PER_SM) -> tuple[int, int]:
    """Stage 1 of a weight-gradient reduction splits the rows into contiguous groups, one program each,
    `per_sm` programs per streaming multiprocessor (CPU_ROW_GROUPS in all under the interpreter).
    Returns (groups, rows_per_group); every group holds at least one row."""
    if device.type == "cuda":
        target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = CPU_ROW_GROUPS
    rows_per_group = -(-n_rows // max(1, min(n_rows, target)))
    return -(-n_rows // rows_per_group), rows_per_group


@triton.jit
def _column_sum_kernel(PART, OUT, groups, n, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage 2 of a weight-gradient reduction: out[c] = sum over g of part[g, c]. PART: [groups, n] fp32.
    One program per BLOCK_N columns; it adds [BLOCK_G, BLOCK_N] tiles of groups, always in the same order:
    deterministic, no atomics. Traffic: reads the partial sums once (groups * n floats, small next to
    the activations), writes n."""
    groups_in_tile = tl.arange(0, BLOCK_G)[:, None]
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g in range(0, groups, BLOCK_G):
        in_tile = (g + groups_in_tile < groups) & (cols < n)
        acc += tl.load(PART + (g + groups_in_tile) * n + cols, mask=in_tile, other=0.0)
    out = tl.sum(acc, axis=0)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(OUT + cols, out.to(OUT.dtype.element_ty), mask=cols < n)


def _column_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part: [groups, n] fp32 -> [n] in `dtype`, summed over groups by _column_sum_kernel."""
    groups, n = part.shape
    out = _empty((n,), dtype, part.device)
    block_n = COLUMN_SUM_BLOCK_N
    _column_sum_kernel[(triton.cdiv(n, block_n),)](part, out, groups, n, BLOCK_G=COLUMN_SUM_BLOCK_G, BLOCK_N=block_n)
    return out


# ----------------------------------------------------------------------------------------------------
# Scale-mask-softmax: y = softmax(scale * x masked), over the last dim of x: [b, heads, sq, sk]
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _finite_or_zero(m):
    """A row max of -inf means every key is masked: shift by 0 instead, so exp(-inf - 0) = 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _inv_or_zero(d):
    """1 / (sum of exps), or 0 for a fully masked row (d = 0), whose output is then zeros."""
    return tl.where(d == 0.0, 0.0, 1.0 / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _visible(MASK, row, cols, sq, sk, heads, m_sb, m_sh, m_sq, MASK_KIND: tl.constexpr):
    """Columns `cols` of row `row` of [b * heads * sq, sk] that are keys its query may attend to.
    MASK_KIND 1 (causal): from indices, no mask read: query q (aligned to the end of the keys) sees keys
    k <= q + (sk - sq). MASK_KIND 2 (padding): mask[b, h, q, k], True = masked out, broadcast dims with
    stride 0."""
    keep = cols < sk
    if MASK_KIND == 1:
        keep = keep & (cols <= row % sq + (sk - sq))
    if MASK_KIND == 2:
        bh = row // sq
        mask_row = MASK + (bh // heads) * m_sb + (bh % heads) * m_sh + (row % sq) * m_sq
        keep = keep & (tl.load(mask_row + cols, mask=cols < sk, other=1) == 0)
    return keep


@triton.jit
def _masked_scores(X, MASK, row, cols, sq, sk, heads, scale, m_sb, m_sh, m_sq, MASK_KIND: tl.constexpr):
    """Scores for columns `cols` of row `row` of x: [b * heads * sq, sk]: scale * x in fp32, -inf where
    masked (see _visible). Masked keys of x are never read from memory."""
    keep = _visible(MASK, row, cols, sq, sk, heads, m_sb, m_sh, m_sq, MASK_KIND)
    x = tl.load(X + row * sk + cols, mask=keep, other=0.0)
    return tl.where(keep, x.to(tl.float32) * scale, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(X, Y, MASK, sq, sk, heads, scale, m_sb, m_sh, m_sq,
                        MASK_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of x: [b * heads * sq, sk], the whole row in one block (sk <= BLOCK).
    Traffic: reads x once (only the visible keys: about half of it for causal; and for padding the mask
    row), writes y once. Unfused PyTorch (float(), * scale, masked_fill, softmax, to(dtype)) reads and writes the whole
    tensor five times each, mostly in fp32: about 9x the bytes for fp16/bf16 (36 vs 4 per element)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    s = _masked_scores(X, MASK, row, cols, sq, sk, heads, scale, m_sb, m_sh, m_sq, MASK_KIND)
    e = tl.exp(s - _finite_or_zero(tl.max(s, axis=0)))
    y = e * _inv_or_zero(tl.sum(e, axis=0))
    tl.store(Y + row * sk + cols, y.to(Y.dtype.element_ty), mask=cols < sk)


@triton.jit
def _softmax_fwd_looped_kernel(X, Y, MASK, sq, sk, heads, scale, m_sb, m_sh, m_sq,
                               MASK_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row, for rows longer than one block (sk > BLOCK): two sweeps in chunks of BLOCK.
    Sweep 1 is the online softmax: a running max m and a running sum d of exp(s - m), with d rescaled
    by exp(m_old - m_new) whenever the max grows. Sweep 2 writes exp(s - m) / d.
    Traffic: reads x twice, writes y once (unfused: as in _softmax_fwd_kernel)."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.zeros([], dtype=tl.float32)
    for start in range(0, sk, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s = _masked_scores(X, MASK, row, cols, sq, sk, heads, scale, m_sb, m_sh, m_sq, MASK_KIND)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        shift = _finite_or_zero(m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(s - shift), axis=0)
        m = m_new
    shift = _finite_or_zero(m)
    inv_d = _inv_or_zero(d)
    for start in range(0, sk, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s = _masked_scores(X, MASK, row, cols, sq, sk, heads, scale, m_sb, m_sh, m_sq, MASK_KIND)
        y = tl.exp(s - shift) * inv_d
        tl.store(Y + row * sk + cols, y.to(Y.dtype.element_ty), mask=cols < sk)


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, MASK, sq, sk, heads, scale, m_sb, m_sh, m_sq,
                        MASK_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """dx = scale * y * (dy - sum(dy * y)), one program per row, the row in one block (sk <= BLOCK).
    Needs only y, dy and the mask: masked keys' y and dy are not read (above the diagonal for causal),
    and their dx is written as exactly 0, as the reference's gradient is, even in a NaN row.
    Traffic: reads y and dy once (and for padding the mask row), writes dx once. Unfused autograd:
    softmax backward (reads y, dy, writes dx in fp32), then masked_fill's, the scale's and the casts'
    backwards each read and write the whole tensor again."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    visible = _visible(MASK, row, cols, sq, sk, heads, m_sb, m_sh, m_sq, MASK_KIND)
    y = tl.load(Y + row * sk + cols, mask=visible, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * sk + cols, mask=visible, other=0.0).to(tl.float32)
    dx = tl.where(visible, scale * y * (dy - tl.sum(dy * y, axis=0)), 0.0)
    tl.store(DX + row * sk + cols, dx.to(DX.dtype.element_ty), mask=cols < sk)


@triton.jit
def _softmax_bwd_looped_kernel(Y, DY, DX, MASK, sq, sk, heads, scale, m_sb, m_sh, m_sq,
                               MASK_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """As _softmax_bwd_kernel, for sk > BLOCK: sweep 1 sums dy * y in chunks, sweep 2 writes dx.
    Traffic: reads y and dy twice (and for padding the mask row twice), writes dx once."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, sk, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        visible = _visible(MASK, row, cols, sq, sk, heads, m_sb, m_sh, m_sq, MASK_KIND)
        y = tl.load(Y + row * sk + cols, mask=visible, other=0.0).to(tl.float32)
        acc += y * tl.load(DY + row * sk + cols, mask=visible, other=0.0).to(tl.float32)
    dot = tl.sum(acc, axis=0)
    for start in range(0, sk, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        visible = _visible(MASK, row, cols, sq, sk, heads, m_sb, m_sh, m_sq, MASK_KIND)
        y = tl.load(Y + row * sk + cols, mask=visible, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * sk + cols, mask=visible, other=0.0).to(tl.float32)
        dx = tl.where(visible, scale * y * (dy - dot), 0.0)
        tl.store(DX + row * sk + cols, dx.to(DX.dtype.element_ty), mask=cols < sk)


def _check_softmax_args(x, scale, mask_kind, mask, dtypes) -> None:
    """ValueError unless x: [b, heads, sq, sk] and the mask fit (see scale_mask_softmax)."""
    op = "scale_mask_softmax"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [b, heads, sq, sk], got shape {tuple(x.shape)}")
    _check_dtype(op, "x", x, dtypes)
    if not isinstance(scale, (int, float)):
        raise ValueError(f"{op}: scale must be a Python number, got {type(scale).__name__}")
    check_mask(mask_kind, mask, tuple(x.shape), x.device, op)


def check_mask(mask_kind, mask, shape, device, op="attention") -> None:
    """ValueError unless mask_kind and mask fit attention scores of `shape` =
    (b, heads, sq, sk) on `device`: "none" and "causal" (sq <= sk) take no
    tensor; "padding" takes a bool mask [b or 1, heads or 1, sq or 1, sk],
    True = masked out. Shared by the fused softmax and nanomeg's SDPA path,
    so both refuse what one would read differently (a [b, sk] mask, say)."""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"{op}: unknown mask_kind {mask_kind!r}; expected one of {sorted(MASK_KINDS)}")
    b, heads, sq, sk = shape
    if mask_kind == "causal" and sq > sk:
        raise ValueError(f"{op}: causal mask needs sq <= sk (queries aligned to the end), got sq={sq}, sk={sk}")
    if mask_kind != "padding":
        if mask is not None:
            raise ValueError(f"{op}: mask_kind={mask_kind!r} takes no mask tensor (got shape {tuple(mask.shape)})")
        return
    if mask is None:
        raise ValueError(f"{op}: mask_kind='padding' needs a boolean mask of shape [b or 1, heads or 1, sq or 1, sk]")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.device != device:
        got = f"{mask.dtype} on {mask.device}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{op}: mask must be torch.bool on {device}, got {got}")
    if mask.dim() != 4 or mask.shape[3] != sk or any(m not in (1, n) for m, n in zip(mask.shape[:3], shape[:3])):
        raise ValueError(
            f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to scores of shape {tuple(shape)}: "
            f"need [{b} or 1, {heads} or 1, {sq} or 1, {sk}]"
        )


def _mask_operand(x, mask):
    """(pointer tensor, strides over b, heads, sq) for the kernel; stride 0 on a broadcast dim."""
    if mask is None:
        return x, (0, 0, 0)
    mask = mask.contiguous().view(torch.uint8)
    return mask, tuple(0 if mask.shape[d] == 1 else mask.stride(d) for d in range(3))


def _softmax_fwd(x, scale, mask_kind, mask):
    """x: [b, heads, sq, sk] -> y of the same shape and dtype, by the one-block or looped kernel."""
    _check_softmax_args(x, scale, mask_kind, mask, KERNEL_DTYPES)
    b, heads, sq, sk = x.shape
    x = x.contiguous()
    y = _empty(x.shape, x.dtype, x.device)
    block = min(triton.next_power_of_2(sk), SOFTMAX_BLOCK)
    kernel = _softmax_fwd_kernel if sk <= block else _softmax_fwd_looped_kernel
    mask_ptr, (m_sb, m_sh, m_sq) = _mask_operand(x, mask)
    kernel[(b * heads * sq,)](x, y, mask_ptr, sq, sk, heads, float(scale), m_sb, m_sh, m_sq,
                              MASK_KIND=MASK_KINDS[mask_kind], BLOCK=block, num_warps=_num_warps(block))
    return y


def _softmax_bwd(y, dy, scale, mask_kind, mask):
    """y, dy: [b, heads, sq, sk] -> dx, in y's dtype."""
    b, heads, sq, sk = y.shape
    dy = dy.contiguous()
    dx = _empty(y.shape, y.dtype, y.device)
    block = min(triton.next_power_of_2(sk), SOFTMAX_BLOCK)
    kernel = _softmax_bwd_kernel if sk <= block else _softmax_bwd_looped_kernel
    mask_ptr, (m_sb, m_sh, m_sq) = _mask_operand(y, mask)
    kernel[(b * heads * sq,)](y, dy, dx, mask_ptr, sq, sk, heads, float(scale), m_sb, m_sh, m_sq,
                              MASK_KIND=MASK_KINDS[mask_kind], BLOCK=block, num_warps=_num_warps(block))
    return dx


class TritonScaleMaskSoftmax(torch.autograd.Function):
    """scale_mask_softmax on the Triton kernels. Saves y for backward (as Megatron's kernels) and the
    padding mask, so that the backward skips masked keys and gives them dx = 0 exactly."""

    @staticmethod
    def forward(ctx, x, scale, mask_kind, mask):
        y = _softmax_fwd(x, scale, mask_kind, mask)
        ctx.save_for_backward(y, mask)
        ctx.scale, ctx.mask_kind = scale, mask_kind
        return y

    @staticmethod
    @_first_order_only("scale_mask_softmax")
    def backward(ctx, dy):
        y, mask = ctx.saved_tensors
        return _softmax_bwd(y, dy, ctx.scale, ctx.mask_kind, mask), None, None, None


def scale_mask_softmax_reference(x, *, scale=1.0, mask_kind="none", mask=None):
    """Plain-PyTorch twin of scale_mask_softmax (same arguments, same result; accepts float64 too)."""
    _check_softmax_args(x, scale, mask_kind, mask, REFERENCE_DTYPES)
    s = x.to(_compute_dtype(x)) * scale
    sq, sk = x.shape[-2:]
    if mask_kind == "causal":  # query i sees keys j <= i + (sk - sq)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(sk - sq + 1)
    if mask is not None:
        s.masked_fill_(mask, float("-inf"))  # s is our own fresh tensor: in place
    with torch.no_grad():  # a row whose every score is -inf (masked, or -inf in x): torch.softmax gives NaN
        dead = s.amax(dim=-1, keepdim=True) == float("-inf")  # a NaN or +inf score is not -inf: NaN row
    if not dead.any():  # the common case costs one read of s (and, on CUDA, a sync: this is the CPU path)
        return torch.softmax(s, dim=-1).to(x.dtype)
    # Give the dead rows a finite score first, so that neither softmax nor its backward meets 0/0 there,
    # then zero them: output and gradient are exactly 0 in those rows.
    y = torch.softmax(s.masked_fill_(dead, 0.0), dim=-1)
    return y.masked_fill(dead, 0.0).to(x.dtype)


def scale_mask_softmax(x, *, scale=1.0, mask_kind="none", mask=None):
    """softmax(scale * x, masked) over the last dim, computed in fp32, returned in x's dtype.

    x: [b, heads, sq, sk] fp16, bf16 or fp32 (attention scores q·k).
    mask_kind: "none"; "causal" (query i sees keys j <= i + (sk - sq): sq <= sk, the queries aligned to
    the end of the keys, as when decoding with a KV cache; no mask tensor); "padding" (mask: bool
    [b or 1, heads or 1, sq or 1, sk], True = masked out, as in Megatron).
    A row with nothing to attend to gives zeros (and zero gradient), never NaN: every key masked, or
    every score -inf (-inf in x), for any mask_kind. Masked keys of x are never read, so what they hold
    (even NaN or inf) does not matter. A +inf or NaN score on a visible key makes its whole row NaN, on
    every path (softmax of +inf is inf / inf). Differentiable w.r.t. x.
    """
    _check_softmax_args(x, scale, mask_kind, mask, REFERENCE_DTYPES)
    if x.numel() == 0 or not _use_triton(x):
        return scale_mask_softmax_reference(x, scale=scale, mask_kind=mask_kind, mask=mask)
    return TritonScaleMaskSoftmax.apply(x, scale, mask_kind, mask)


# ----------------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm over the last dim of x: [rows, n]
#   LayerNorm: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)
#   RMSNorm:   y = x * rstd * w,               rstd = 1 / sqrt(mean(x^2) + eps)
#   zero-centred gamma ("1p"): w is stored around 0 and applied as 1 + w.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_gamma(W, cols, in_row, ZERO_CENTERED: tl.constexpr):
    """The weight in fp32, as applied: w, or 1 + w when stored zero-centred."""
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = w + 1.0
    return w


@triton.jit
def _norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n, eps, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of x: [rows, n], the whole row in one block (n <= BLOCK).
    Traffic: reads x once, writes y once, plus mean and rstd (2 floats per row, kept for backward);
    w and b are shared by all rows and come from cache. Unfused PyTorch (float(), mean, subtract,
    square, mean, rsqrt, two multiplies, add, to(dtype)) reads and writes the whole tensor ~8 times."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n
    x = tl.load(X + row * n + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = 0.0
    if not IS_RMS:
        mean = tl.sum(x, axis=0) / n
        tl.store(MEAN + row, mean)
    xc = tl.where(in_row, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n + eps)
    tl.store(RSTD + row, rstd)
    y = xc * rstd * _load_gamma(W, cols, in_row, ZERO_CENTERED)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + row * n + cols, y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _norm_fwd_looped_kernel(X, W, B, Y, MEAN, RSTD, n, eps, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                            ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    """As _norm_fwd_kernel, for rows longer than one block (n > BLOCK), swept in chunks of BLOCK:
    the mean (LayerNorm only), then the variance about it (two passes: no cancellation), then y.
    Traffic: reads x three times (RMSNorm: twice), writes y once."""
    row = tl.program_id(0).to(tl.int64)
    mean = 0.0
    if not IS_RMS:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            acc += tl.load(X + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / n
        tl.store(MEAN + row, mean)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
        xc = tl.where(cols < n, x - mean, 0.0)
        acc += xc * xc
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / n + eps)
    tl.store(RSTD + row, rstd)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * _load_gamma(W, cols, cols < n, ZERO_CENTERED)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cols < n, other=0.0).to(tl.float32)
        tl.store(Y + row * n + cols, y.to(Y.dtype.element_ty), mask=cols < n)


@triton.jit
def _norm_dx_terms(X, W, DY, MEAN, RSTD, row, cols, n, IS_RMS: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    """For columns `cols` of row `row`: (xhat, dy, g = dy * w, rstd), in fp32, zero outside the row."""
    in_row = cols < n
    x = tl.load(X + row * n + cols, mask=in_row, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * n + cols, mask=in_row, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    if not IS_RMS:
        x = x - tl.load(MEAN + row)
    xhat = tl.where(in_row, x * rstd, 0.0)
    return xhat, dy, dy * _load_gamma(W, cols, in_row, ZERO_CENTERED), rstd


@triton.jit
def _load_norm_row(X, DY, MEAN, RSTD, row, row_end, cols, n, IS_RMS: tl.constexpr):
    """(x, dy, mean, rstd) of row `row`: x and dy in their storage dtype, mean 0 for RMSNorm. A row at
    or past row_end loads nothing (zeros): the prefetch after a group's last row."""
    ok = row < row_end
    width = tl.where(ok, n, 0)  # (not `(cols < n) & ok`: the interpreter makes that mask int32 and refuses it)
    x = tl.load(X + row * n + cols, mask=cols < width, other=0.0)
    dy = tl.load(DY + row * n + cols, mask=cols < width, other=0.0)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(MEAN + row, mask=ok, other=0.0)
    return x, dy, mean, tl.load(RSTD + row, mask=ok, other=0.0)


@triton.jit
def _norm_bwd_kernel(X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART, n_rows, n, rows_per_group,
                     IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                     BLOCK: tl.constexpr):
    """One program per group of rows_per_group consecutive rows of x: [rows, n], each row in one block
    (n <= BLOCK); _row_groups makes as many groups as the GPU holds at once. With xhat = (x - mean) * rstd
    and g = dy * w:
        dx = rstd * (g - xhat * mean(g * xhat) - mean(g))      (RMSNorm: no mean(g) term)
    Weight gradients, stage 1: the group's sums of dw = dy * xhat and db = dy stay in registers and are
    written once, as row `group` of DW_PART, DB_PART: [groups, n] fp32; _column_sum_kernel adds those rows
    (stage 2). No atomics, no locks, and the sum does not depend on scheduling.
    Latency: row r + 1 is loaded (prefetched) before row r's two reductions, which wait on barriers, so that
    its bytes are in flight while row r is computed, and each program always has a row on its way from memory.
    Traffic per row: reads x and dy once, writes dx once (6 bytes an element in bf16), 8 bytes of mean, rstd;
    w is re-read from L1 (holding it in registers would cost ~30 registers a thread and halve the programs an
    SM holds). Per program, its partial rows once: 4n bytes each for dw and db, written here and read by
    stage 2, a few % of the activations' bytes with one group per resident program.
    Unfused autograd re-reads the saved tensors op by op and reduces dw, db in passes of their own."""
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = group.to(tl.int64) * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, n_rows)
    next_row = _load_norm_row(X, DY, MEAN, RSTD, row_start, row_end, cols, n, IS_RMS)
    for row in range(row_start, row_end):
        x, dy, mean, rstd = next_row
        next_row = _load_norm_row(X, DY, MEAN, RSTD, row + 1, row_end, cols, n, IS_RMS)
        dy = dy.to(tl.float32)
        xhat = tl.where(in_row, (x.to(tl.float32) - mean) * rstd, 0.0)
        g = dy * _load_gamma(W, cols, in_row, ZERO_CENTERED)
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / n)
        if not IS_RMS:
            dx -= tl.sum(g, axis=0) / n
        tl.store(DX + row * n + cols, (dx * rstd).to(DX.dtype.element_ty), mask=in_row)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + group * n + cols, dw, mask=in_row)
    if HAS_BIAS:
        tl.store(DB_PART + group * n + cols, db, mask=in_row)


@triton.jit
def _norm_row_means(X, W, DY, MEAN, RSTD, row, n, IS_RMS: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                    BLOCK: tl.constexpr):
    """mean(g * xhat) and mean(g) over row `row` (g = dy * w), swept in chunks of BLOCK."""
    sum_gx = tl.zeros([BLOCK], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        xhat, dy, g, rstd = _norm_dx_terms(X, W, DY, MEAN, RSTD, row, cols, n, IS_RMS, ZERO_CENTERED)
        sum_gx += g * xhat
        sum_g += g
    return tl.sum(sum_gx, axis=0) / n, tl.sum(sum_g, axis=0) / n


@triton.jit
def _norm_bwd_looped_kernel(X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART, n_rows, n, rows_per_group,
                            IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                            BLOCK: tl.constexpr):
    """As _norm_bwd_kernel, for n > BLOCK: each row in two sweeps of chunks, the two row means, then dx.
    Row `group` of DW_PART, DB_PART belongs to this program alone: it zeroes it, then every row of the
    group adds its dy * xhat and dy to it (read, add, write: no atomics).
    Traffic: reads x and dy twice, writes dx once; the partial rows are re-read and re-written per row
    (n floats each, from cache)."""
    group = tl.program_id(0)
    DW_PART += group * n
    DB_PART += group * n
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(DW_PART + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n)
        tl.store(DB_PART + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n)
    row_start = group.to(tl.int64) * rows_per_group
    for row in range(row_start, tl.minimum(row_start + rows_per_group, n_rows)):
        mean_gx, mean_g = _norm_row_means(X, W, DY, MEAN, RSTD, row, n, IS_RMS, ZERO_CENTERED, BLOCK)
        if IS_RMS:
            mean_g = 0.0
        tl.debug_barrier()  # partial sums stored by any thread of this program are visible below
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            xhat, dy, g, rstd = _norm_dx_terms(X, W, DY, MEAN, RSTD, row, cols, n, IS_RMS, ZERO_CENTERED)
            tl.store(DX + row * n + cols, ((g - xhat * mean_gx - mean_g) * rstd).to(DX.dtype.element_ty),
                     mask=cols < n)
            tl.store(DW_PART + cols, tl.load(DW_PART + cols, mask=cols < n) + dy * xhat, mask=cols < n)
            if HAS_BIAS:
                tl.store(DB_PART + cols, tl.load(DB_PART + cols, mask=cols < n) + dy, mask=cols < n)


def _check_param(op, name, p, x, dtypes) -> None:
    """ValueError unless the parameter p (weight or bias) is [h] for x: [..., h], on x's device."""
    h = x.shape[-1]
    if p.shape != (h,):
        raise ValueError(f"{op}: {name} must have shape ({h},) for x of shape {tuple(x.shape)}, got {tuple(p.shape)}")
    _check_dtype(op, name, p, dtypes)
    if p.device != x.device:
        raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")


def _check_norm_args(op, x, weight, bias, dtypes) -> None:
    """ValueError unless x: [..., h] and weight, bias: [h] of a supported dtype (bias may be None)."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be [..., h] with at least one dim, got shape {tuple(x.shape)}")
    _check_dtype(op, "x", x, dtypes)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{op}: weight must be a tensor of shape ({x.shape[-1]},), got {type(weight).__name__}")
    _check_param(op, "weight", weight, x, dtypes)
    if bias is not None:
        _check_param(op, "bias", bias, x, dtypes)


def _norm_fwd(x, weight, bias, eps, zero_centered, is_rms):
    """x: [..., n] -> (y like x, mean [rows] fp32 or None for RMSNorm, rstd [rows] fp32)."""
    _check_norm_args("rms_norm" if is_rms else "layer_norm", x, weight, bias, KERNEL_DTYPES)
    n = x.shape[-1]
    x2, weight = x.contiguous().view(-1, n), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = _empty(x2.shape, x.dtype, x.device)
    mean = None if is_rms else _empty((x2.shape[0],), torch.float32, x.device)
    rstd = _empty((x2.shape[0],), torch.float32, x.device)
    block = min(triton.next_power_of_2(n), NORM_BLOCK)
    kernel = _norm_fwd_kernel if n <= block else _norm_fwd_looped_kernel
    kernel[(x2.shape[0],)](x2, weight, x2 if bias is None else bias, y, rstd if mean is None else mean, rstd,
                           n, float(eps), IS_RMS=is_rms, HAS_BIAS=bias is not None, ZERO_CENTERED=zero_centered,
                           BLOCK=block, num_warps=_num_warps(block))
    return y.view(x.shape), mean, rstd


def _norm_bwd(dy, x, weight, bias, mean, rstd, zero_centered, is_rms):
    """dy, x: [..., n] -> (dx like x, dw like weight, db like bias or None)."""
    n = x.shape[-1]
    x2, dy2, weight = x.contiguous().view(-1, n), dy.contiguous().view(-1, n), weight.contiguous()
    dx = _empty(x2.shape, x.dtype, x.device)
    block = min(triton.next_power_of_2(n), NORM_BLOCK)
    warps = _norm_bwd_warps(block, x.element_size())
    # One wave: as many row groups as the GPU holds programs at once, each streaming its rows.
    groups, rows_per_group = _row_groups(x2.shape[0], x.device, per_sm=max(1, NORM_BWD_WARPS_PER_SM // warps))
    dw_part = _empty((groups, n), torch.float32, x.device)
    db_part = dw_part if bias is None else _empty((groups, n), torch.float32, x.device)
    kernel = _norm_bwd_kernel if n <= block else _norm_bwd_looped_kernel
    kernel[(groups,)](x2, weight, dy2, dx, rstd if mean is None else mean, rstd, dw_part, db_part,
                      x2.shape[0], n, rows_per_group, IS_RMS=is_rms, HAS_BIAS=bias is not None,
                      ZERO_CENTERED=zero_centered, BLOCK=block, num_warps=warps)
    db = None if bias is None else _column_sum(db_part, bias.dtype)
    return dx.view(x.shape), _column_sum(dw_part, weight.dtype), db


class TritonLayerNorm(torch.autograd.Function):
    """layer_norm on the Triton kernels. Saves x, mean and rstd for backward (as MixedFusedLayerNorm)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, zero_centered_gamma):
        y, mean, rstd = _norm_fwd(x, weight, bias, eps, zero_centered_gamma, is_rms=False)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.zero_centered_gamma = zero_centered_gamma
        return y

    @staticmethod
    @_first_order_only("layer_norm")
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _norm_bwd(dy, x, weight, bias, mean, rstd, ctx.zero_centered_gamma, is_rms=False)
        return dx, dw, db, None, None


class TritonRMSNorm(torch.autograd.Function):
    """rms_norm on the Triton kernels. Saves x and rstd for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, zero_centered_gamma):
        y, _, rstd = _norm_fwd(x, weight, None, eps, zero_centered_gamma, is_rms=True)
        ctx.save_for_backward(x, weight, rstd)
        ctx.zero_centered_gamma = zero_centered_gamma
        return y

    @staticmethod
    @_first_order_only("rms_norm")
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw, _ = _norm_bwd(dy, x, weight, None, None, rstd, ctx.zero_centered_gamma, is_rms=True)
        return dx, dw, None, None


def _gamma(weight, zero_centered_gamma, dtype):
    """The weight as applied, in the compute dtype: w, or 1 + w when stored zero-centred ("1p")."""
    w = weight.to(dtype)
    return w + 1.0 if zero_centered_gamma else w


def layer_norm_reference(x, weight, bias=None, eps=1e-5, *, zero_centered_gamma=False):
    """Plain-PyTorch twin of layer_norm (same arguments, same result; accepts float64 too)."""
    _check_norm_args("layer_norm", x, weight, bias, REFERENCE_DTYPES)
    xf = x.to(_compute_dtype(x))
    xc = xf - xf.mean(dim=-1, keepdim=True)  # written out, not F.layer_norm: its fp32 backward leaves
    y = xc * torch.rsqrt((xc * xc).mean(dim=-1, keepdim=True) + eps)  # ~1e-5 noise where dx is exactly 0
    y = y * _gamma(weight, zero_centered_gamma, xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def rms_norm_reference(x, weight, eps=1e-5, *, zero_centered_gamma=False):
    """Plain-PyTorch twin of rms_norm (same arguments, same result; accepts float64 too)."""
    _check_norm_args("rms_norm", x, weight, None, REFERENCE_DTYPES)
    xf = x.to(_compute_dtype(x))
    return F.rms_norm(xf, xf.shape[-1:], _gamma(weight, zero_centered_gamma, xf.dtype), eps).to(x.dtype)


def layer_norm(x, weight, bias=None, eps=1e-5, *, zero_centered_gamma=False):
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * w + b, statistics in fp32.

    x: [..., h] fp16, bf16 or fp32, any h >= 1; weight, bias: [h], fp32 or low precision (bias may be
    None). The output has x's dtype. zero_centered_gamma: weight stored around 0, applied as 1 + weight
    (Megatron's apply_layernorm_1p). Differentiable w.r.t. x, weight and bias.
    An inf or NaN in a row of x makes that row NaN (inf - inf), alike on every path.
    """
    _check_norm_args("layer_norm", x, weight, bias, REFERENCE_DTYPES)
    if x.numel() == 0 or not _use_triton(x):
        if x.shape[-1] == 1:  # rows of one value: the written-out reference's gradients are exactly 0 there
            return layer_norm_reference(x, weight, bias, eps, zero_centered_gamma=zero_centered_gamma)
        xf = x.to(_compute_dtype(x))  # else torch's fused op: the same formula in one pass forward and back
        b = None if bias is None else bias.to(xf.dtype)
        return F.layer_norm(xf, xf.shape[-1:], _gamma(weight, zero_centered_gamma, xf.dtype), b, eps).to(x.dtype)
    return TritonLayerNorm.apply(x, weight, bias, eps, zero_centered_gamma)


def rms_norm(x, weight, eps=1e-5, *, zero_centered_gamma=False):
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * w, statistics in fp32.

    x: [..., h] fp16, bf16 or fp32, any h >= 1; weight: [h]. The output has x's dtype.
    zero_centered_gamma: weight applied as 1 + weight. Differentiable w.r.t. x and weight.
    An inf or NaN in a row of x gives NaN where the formula does (inf / inf), alike on every path.
    """
    _check_norm_args("rms_norm", x, weight, None, REFERENCE_DTYPES)
    if x.numel() == 0 or not _use_triton(x):
        return rms_norm_reference(x, weight, eps, zero_centered_gamma=zero_centered_gamma)
    return TritonRMSNorm.apply(x, weight, eps, zero_centered_gamma)


# ----------------------------------------------------------------------------------------------------
# Bias + GeLU: y = gelu(x + b), over x: [rows, n], b: [n]
#   tanh:  gelu(z) = z/2 * (1 + tanh(sqrt(2/pi) * (z + 0.044715 z^3)))
#   exact: gelu(z) = z/2 * (1 + erf(z / sqrt(2)))
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gelu_and_grad(z, APPROX_TANH: tl.constexpr):
    """(gelu(z), gelu'(z)) in fp32; the compiler drops the derivative where it is unused."""
    if APPROX_TANH:
        # gelu(z) = z * s with s = (1 + tanh(u)) / 2 = sigmoid(2u). Written as 1 + tanh(u), s loses most of
        # its digits where tanh(u) is near -1 (gelu' at z = -4 came out 1e-3 off, relative); from
        # e = exp(-2|u|) <= 1 neither s nor 1 - s cancels: they are 1 / (1 + e) and e / (1 + e).
        k = 0.7978845608028654  # sqrt(2 / pi)
        u = k * (z + 0.044715 * z * z * z)
        e = tl.exp(-2.0 * tl.abs(u))  # never overflows
        r = 1.0 / (1.0 + e)  # sigmoid(2|u|); e * r = sigmoid(-2|u|)
        s = tl.where(u >= 0, r, e * r)
        one_minus_s = tl.where(u >= 0, e * r, r)
        y = z * s
        # s' = 2 s (1 - s) du/dz (that is, (1 - tanh^2) / 2 * du/dz), du/dz = k (1 + 3 * 0.044715 z^2)
        dy_dz = s + 2.0 * z * s * one_minus_s * k * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))  # Phi(z)
        y = z * cdf
        dy_dz = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)  # Phi(z) + z phi(z)
    return y, dy_dz


@triton.jit
def _bias_gelu_tile(X, B, rows, cols, n_rows, n, HAS_BIAS: tl.constexpr):
    """(offsets, in-bounds mask, z = x + b in fp32) for the tile rows x cols of x: [n_rows, n]."""
    offs = rows[:, None].to(tl.int64) * n + cols[None, :]
    in_tile = (rows[:, None] < n_rows) & (cols[None, :] < n)
    z = tl.load(X + offs, mask=in_tile, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    return offs, in_tile, z


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, n_rows, n, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per [BLOCK_M, BLOCK_N] tile of x: [rows, n]: y = gelu(x + b).
    Traffic: reads x once (and a BLOCK_N slice of b), writes y once. Unfused PyTorch writes x + b to a
    temporary and reads it back for gelu (and the tanh formula written as tensor ops, as in Megatron's
    bias_gelu without fusion, makes several more temporaries)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs, in_tile, z = _bias_gelu_tile(X, B, rows, cols, n_rows, n, HAS_BIAS)
    y, _ = _gelu_and_grad(z, APPROX_TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=in_tile)


@triton.jit
def _bias_gelu_bwd_kernel(X, B, DY, DX, DB_PART, n_rows, n, rows_per_group, HAS_BIAS: tl.constexpr,
                          APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (group, j) walks its group's rows in tiles [BLOCK_M, BLOCK_N] at columns block j:
    dx = dy * gelu'(x + b), recomputing x + b rather than saving it; the column sums of dx (the bias
    gradient) stay in registers and are written once to row `group` of DB_PART: [groups, n] (stage 1).
    Traffic: reads x and dy once, writes dx once. Unfused autograd reads the saved x + b and dy, writes
    dx, then reads dx again to sum the bias gradient."""
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = group * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, n_rows)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        offs, in_tile, z = _bias_gelu_tile(X, B, rows, cols, row_end, n, HAS_BIAS)
        _, dy_dz = _gelu_and_grad(z, APPROX_TANH)
        dx = tl.load(DY + offs, mask=in_tile, other=0.0).to(tl.float32) * dy_dz
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=in_tile)
        db += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB_PART + group * n + cols, db, mask=cols < n)


def _check_bias_gelu_args(x, bias, approximate, dtypes) -> None:
    """ValueError unless x: [..., h], bias: [h] or None, and approximate is "tanh" or "none"."""
    op = "bias_gelu"
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"{op}: unknown approximate {approximate!r}; expected one of {GELU_APPROXIMATIONS}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be [..., h] with at least one dim, got shape {tuple(x.shape)}")
    _check_dtype(op, "x", x, dtypes)
    if bias is not None:
        _check_param(op, "bias", bias, x, dtypes)


def _bias_gelu_fwd(x, bias, approximate):
    """x: [..., n] -> y like x."""
    _check_bias_gelu_args(x, bias, approximate, KERNEL_DTYPES)
    n = x.shape[-1]
    x2, bias = x.contiguous().view(-1, n), None if bias is None else bias.contiguous()
    y = _empty(x2.shape, x.dtype, x.device)
    grid = (triton.cdiv(x2.shape[0], GELU_BLOCK_M), triton.cdiv(n, GELU_BLOCK_N))
    _bias_gelu_fwd_kernel[grid](x2, x2 if bias is None else bias, y, x2.shape[0], n, HAS_BIAS=bias is not None,
                                APPROX_TANH=approximate == "tanh", BLOCK_M=GELU_BLOCK_M, BLOCK_N=GELU_BLOCK_N)
    return y.view(x.shape)


def _bias_gelu_bwd(dy, x, bias, approximate):
    """dy, x: [..., n] -> (dx like x, db like bias or None)."""
    n = x.shape[-1]
    x2, dy2 = x.contiguous().view(-1, n), dy.contiguous().view(-1, n)
    bias = None if bias is None else bias.contiguous()
    dx = _empty(x2.shape, x.dtype, x.device)
    groups, rows_per_group = _row_groups(x2.shape[0], x.device)
    db_part = dx if bias is None else _empty((groups, n), torch.float32, x.device)
    grid = (groups, triton.cdiv(n, GELU_BLOCK_N))
    _bias_gelu_bwd_kernel[grid](x2, x2 if bias is None else bias, dy2, dx, db_part, x2.shape[0], n,
                                rows_per_group, HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
                                BLOCK_M=GELU_BLOCK_M, BLOCK_N=GELU_BLOCK_N)
    return dx.view(x.shape), None if bias is None else _column_sum(db_part, bias.dtype)


class TritonBiasGelu(torch.autograd.Function):
    """bias_gelu on the Triton kernels. Saves x and b (not x + b) for backward, as bias_gelu_impl."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return _bias_gelu_fwd(x, bias, approximate)

    @staticmethod
    @_first_order_only("bias_gelu")
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = _bias_gelu_bwd(dy, x, bias, ctx.approximate)
        return dx, db, None


def bias_gelu_reference(x, bias=None, *, approximate="tanh"):
    """Plain-PyTorch twin of bias_gelu (same arguments, same result; accepts float64 too)."""
    _check_bias_gelu_args(x, bias, approximate, REFERENCE_DTYPES)
    z = x.to(_compute_dtype(x))
    if bias is not None:
        z = z + bias.to(z.dtype)
    return F.gelu(z, approximate=approximate).to(x.dtype)  # tanh: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))


def bias_gelu(x, bias=None, *, approximate="tanh"):
    """gelu(x + bias), computed in fp32, returned in x's dtype.

    x: [..., h] fp16, bf16 or fp32; bias: [h] or None. approximate: "tanh" (Megatron's bias_gelu_impl)
    or "none" (exact, with erf). Differentiable w.r.t. x and bias (db = dx summed over leading dims).

    Non-finite z = x + b, as the formula z * Phi(z) gives in fp32: NaN gives NaN, -inf gives NaN
    (-inf * 0), +inf gives +inf; the gradient at +-inf is NaN. The same on every path, with two
    exceptions outside the range of real activations: torch's vectorized CPU F.gelu, which the exact
    form's reference calls, gives NaN at +inf and inf for z >= ~1.7e38 where Triton gives z; and the
    tanh form's gradient is NaN on every path for |z| >= ~1.8e19, where z^2 overflows fp32.
    """
    _check_bias_gelu_args(x, bias, approximate, REFERENCE_DTYPES)
    if x.numel() == 0 or not _use_triton(x):
        return bias_gelu_reference(x, bias, approximate=approximate)
    return TritonBiasGelu.apply(x, bias, approximate)
