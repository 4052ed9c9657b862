"""kernels.py: every Triton kernel ≡ its plain-PyTorch reference, and every reference ≡ torch's own formula.

* The Triton path runs on CPU under the interpreter (TRITON_INTERPRET=1, from conftest.py), forced by
  NANOMEG_TRITON=1, forward and backward, against the reference; tolerances by dtype.
* The block sizes are lowered for this module (SMALL_BLOCK), so that "a row longer than one block" (the
  looped kernels) is a row of a few dozen elements, cheap under the interpreter.
* Every buffer a kernel writes comes from kernels._empty, replaced here by a NaN-filled allocation: an
  element a kernel forgets to write fails the comparison.
* NANOMEG_TEST_DEVICE=cuda runs the Triton-against-reference comparisons on a GPU, compiled for real
  (no interpreter): `forward_backward` moves every input there.
* Every kernel variant also has one pinned fp32 example (no hypothesis draw), at a few ulps.
* The references: gradcheck and gradgradcheck in float64, and forward against torch.softmax /
  F.layer_norm / F.rms_norm / F.gelu. The Triton ops refuse a second differentiation (RuntimeError).
"""

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import kernels

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {  # (rtol, atol), compared in fp32
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
SMALL_BLOCK = 16  # SOFTMAX_BLOCK and NORM_BLOCK for this module: rows of 17+ elements use the looped kernels
DEVICE = torch.device(os.environ.get("NANOMEG_TEST_DEVICE", "cpu"))
FULL_SOFTMAX_BLOCK, FULL_NORM_BLOCK = kernels.SOFTMAX_BLOCK, kernels.NORM_BLOCK


def nan_empty(shape, dtype, device):
    """kernels._empty for tests: a buffer full of NaN, so an unwritten element cannot pass."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True, scope="module")
def small_blocks_and_poisoned_buffers():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "SOFTMAX_BLOCK", SMALL_BLOCK)
        mp.setattr(kernels, "NORM_BLOCK", SMALL_BLOCK)
        mp.setattr(kernels, "GELU_BLOCK_M", 4)
        mp.setattr(kernels, "GELU_BLOCK_N", 16)
        mp.setattr(kernels, "COLUMN_SUM_BLOCK_G", 2)
        mp.setattr(kernels, "COLUMN_SUM_BLOCK_N", 8)
        mp.setattr(kernels, "_empty", nan_empty)
        yield


def assert_close(actual, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def on_device(obj):
    """obj with its tensors (also inside a functools.partial) moved to DEVICE."""
    if isinstance(obj, torch.Tensor):
        return obj.to(DEVICE)
    if isinstance(obj, functools.partial):
        return functools.partial(obj.func, *map(on_device, obj.args), **{k: on_device(v) for k, v in obj.keywords.items()})
    return obj


def forward_backward(fn, inputs, dy, *, triton, on_cpu=True, **kwargs):
    """fn(*inputs, **kwargs) and the grads of <y, dy> w.r.t. every tensor input, on the chosen path. Runs on
    DEVICE; the results come back to the CPU unless on_cpu=False."""
    fn, dy, kwargs = on_device(fn), on_device(dy), {k: on_device(v) for k, v in kwargs.items()}
    leaves = [on_device(t).detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOMEG_TRITON", "1" if triton else "0")
        y = fn(*leaves, **kwargs)
    assert type(y.grad_fn).__name__.startswith("Triton") == triton, f"wrong path taken: {y.grad_fn}"
    grads = torch.autograd.grad(y, [t for t in leaves if isinstance(t, torch.Tensor)], dy)
    return (y.cpu(), tuple(g.cpu() for g in grads)) if on_cpu else (y, grads)


def check_triton_matches_reference(fn, inputs, dy, dtype, **kwargs):
    y, grads = forward_backward(fn, inputs, dy, triton=True, **kwargs)
    y_ref, grads_ref = forward_backward(fn, inputs, dy, triton=False, **kwargs)
    assert_close(y, y_ref, dtype)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, dtype)


# ----------------------------------------------------------------------------------------------------
# scale-mask-softmax
# ----------------------------------------------------------------------------------------------------


@st.composite
def softmax_cases(draw):
    kind = draw(st.sampled_from(["none", "causal", "padding"]))
    sk = draw(st.integers(1, 3 * SMALL_BLOCK + 3))
    return dict(
        b=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)),
        sq=draw(st.integers(1, min(4, sk) if kind == "causal" else 4)), sk=sk,
        dtype=draw(st.sampled_from(DTYPES)), kind=kind, scale=draw(st.sampled_from([1.0, 0.125, 2.5])),
        mask_broadcast=draw(st.tuples(st.booleans(), st.booleans(), st.booleans())),
        mask_density=draw(st.sampled_from([0.0, 0.3, 0.9])), fully_masked_row=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def softmax_inputs(c):
    """(x, mask, dy) for a case drawn by softmax_cases."""
    g = torch.Generator().manual_seed(c["seed"])
    shape = (c["b"], c["heads"], c["sq"], c["sk"])
    x = (3 * torch.randn(shape, generator=g)).to(c["dtype"])
    dy = torch.randn(shape, generator=g).to(c["dtype"])
    mask = None
    if c["kind"] == "padding":
        mask_shape = [1 if bcast else n for bcast, n in zip(c["mask_broadcast"], shape[:3])] + [c["sk"]]
        mask = torch.rand(mask_shape, generator=g) < c["mask_density"]
        if c["fully_masked_row"]:
            mask[0, 0, -1, :] = True
    return x, mask, dy


def case(**overrides):
    base = dict(b=1, heads=1, sq=1, sk=1, dtype=torch.float32, kind="none", scale=1.0,
                mask_broadcast=(False, False, False), mask_density=0.3, fully_masked_row=False, seed=0)
    return {**base, **overrides}


@given(c=softmax_cases())
@example(c=case(sk=1))
@example(c=case(b=2, heads=2, sq=3, sk=SMALL_BLOCK + 1, kind="causal", dtype=torch.bfloat16, scale=0.125))
@example(c=case(b=2, heads=3, sq=4, sk=2 * SMALL_BLOCK + 5, kind="padding", mask_broadcast=(False, True, False),
                fully_masked_row=True, dtype=torch.float16))
@example(c=case(b=2, heads=2, sq=2, sk=2 * SMALL_BLOCK + 5, kind="causal", dtype=torch.bfloat16))
@example(c=case(sq=2, sk=2, dtype=torch.bfloat16, scale=2.5, mask_density=0.0, seed=218))  # y near one-hot
def test_softmax_triton_matches_reference(c):
    x, mask, dy = softmax_inputs(c)
    kwargs, dtype = dict(scale=c["scale"], mask_kind=c["kind"], mask=mask), c["dtype"]
    y, (dx,) = forward_backward(kernels.scale_mask_softmax, [x], dy, triton=True, **kwargs)
    y_ref, (dx_ref,) = forward_backward(kernels.scale_mask_softmax, [x], dy, triton=False, **kwargs)
    assert_close(y, y_ref, dtype)
    # The backward reads y as stored (as Megatron's kernels do): dx = scale * y * (dy - sum(dy * y)) exactly,
    yf, dyf = y.float(), dy.float()
    assert_close(dx, (c["scale"] * yf * (dyf - (dyf * yf).sum(-1, keepdim=True))).to(dtype), dtype)
    # while autograd through the reference uses y before rounding: the rounding of y (relative error eps)
    # moves dx by up to about 3 * eps * scale * max|dy|, however small dx itself is.
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=rtol, atol=atol * max(1.0, c["scale"] * dy.abs().max()))


@pytest.mark.parametrize("triton", [True, False])
@pytest.mark.parametrize("sk", [5, 2 * SMALL_BLOCK + 3])
def test_softmax_fully_masked_row_is_zeros(triton, sk):
    x = torch.randn(2, 2, 3, sk)
    mask = torch.zeros(2, 1, 3, sk, dtype=torch.bool)
    mask[1, 0, 2, :] = True  # batch 1, every head, query 2: nothing to attend to
    mask[0, 0, 0, 1:] = True  # a row with a single key left
    y, (dx,) = forward_backward(kernels.scale_mask_softmax, [x], torch.randn_like(x), triton=triton,
                                scale=0.5, mask_kind="padding", mask=mask)
    assert torch.equal(y[1, :, 2], torch.zeros(2, sk)) and torch.equal(dx[1, :, 2], torch.zeros(2, sk))
    assert torch.equal(y[0, :, 0], torch.nn.functional.one_hot(torch.zeros(2, dtype=torch.long), sk).float())
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()


def special_rows_case(kind, sk):
    """(x, mask, kinds of row) for [1, 2, 4, sk]: rows of x holding -inf, +inf and NaN, on visible keys
    or on masked ones. Row kinds, by (head, query): "dead" (every visible score -inf: zeros), "nan"
    (a visible +inf or NaN: a NaN row), "finite" (any -inf or non-finite value sits on masked keys)."""
    g = torch.Generator().manual_seed(sk)
    x = 3 * torch.randn(1, 2, 4, sk, generator=g)
    visible = torch.ones(4, sk, dtype=torch.bool)
    mask = None
    if kind == "causal":
        visible = ~causal_mask_from_indices(4, sk)
    if kind == "padding":
        mask = torch.arange(sk).repeat(4, 1) % 3 == 1  # [sq, sk]: every third key masked ...
        mask[3, :] = True  # ... and query 3 sees nothing
        visible, mask = ~mask, mask[None, None]
    inf, nan = float("inf"), float("nan")
    first_visible = [int(v.nonzero()[0, 0]) if v.any() else 0 for v in visible]
    x[0, 0, 0] = -inf  # every score -inf
    x[0, 0, 1, ::2] = -inf  # mixed: some -inf; visible odd keys stay finite for every kind here
    x[0, 0, 2][~visible[2]] = nan  # NaN only on masked keys (none for kind "none", so a finite row)
    x[0, 0, 3, first_visible[3]] = inf  # a visible +inf
    x[0, 1, 0, first_visible[0]] = nan  # a visible NaN
    x[0, 1, 1][visible[1]] = -inf  # every visible key -inf; the masked ones keep finite values
    x[0, 1, 2][~visible[2]] = inf  # +inf only on masked keys
    x[0, 1, 3] = -inf  # one visible key left finite: a one-hot row
    x[0, 1, 3, first_visible[3]] = 1.0
    dead_row = ~visible.any(dim=-1)
    rows = [["dead", "finite", "finite", "nan"], ["nan", "dead", "finite", "finite"]]
    for h in range(2):
        for q in range(4):
            if dead_row[q]:
                rows[h][q] = "dead"
    return x, mask, rows


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("sk", [7, SMALL_BLOCK + 3], ids=["one-block", "looped"])
@pytest.mark.parametrize("kind", ["none", "causal", "padding"])
def test_softmax_inf_and_nan_rows_agree_on_every_path(kind, sk):
    """Reference and Triton agree, forward and backward, on rows holding -inf, +inf and NaN: a row whose
    every visible score is -inf gives zeros and a zero gradient; a visible +inf or NaN gives a NaN row
    (and NaN dx on its visible keys, 0 on its masked ones); values on masked keys are never seen."""
    x, mask, rows = special_rows_case(kind, sk)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    kwargs = dict(scale=0.5, mask_kind=kind, mask=mask)
    y, (dx,) = forward_backward(kernels.scale_mask_softmax, [x], dy, triton=True, **kwargs)
    y_ref, (dx_ref,) = forward_backward(kernels.scale_mask_softmax, [x], dy, triton=False, **kwargs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    for h in range(2):
        for q in range(4):
            row, grad = y[0, h, q], dx[0, h, q]
            if rows[h][q] == "dead":
                assert torch.equal(row, torch.zeros(sk)) and torch.equal(grad, torch.zeros(sk)), (h, q)
            elif rows[h][q] == "nan":
                assert row.isnan().all(), (h, q)
            else:
                assert row.isfinite().all() and grad.isfinite().all() and abs(row.sum() - 1) < 1e-6, (h, q)


def test_softmax_long_rows_at_the_real_block_size():
    """sk = 70000 > 65536 with the library's own SOFTMAX_BLOCK: the looped kernels over 9 chunks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "SOFTMAX_BLOCK", FULL_SOFTMAX_BLOCK)
        for sk, kind in [(70000, "causal"), (FULL_SOFTMAX_BLOCK, "none")]:
            x = torch.randn(1, 2, 1, sk, dtype=torch.bfloat16)
            check_triton_matches_reference(kernels.scale_mask_softmax, [x], torch.randn_like(x), torch.bfloat16,
                                           scale=0.3, mask_kind=kind)


def causal_mask_from_indices(sq, sk):
    """True = masked: query i (aligned to the end of the keys) may see keys j <= i + (sk - sq)."""
    return torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq)


@given(c=softmax_cases())
def test_softmax_reference_matches_torch_softmax(c):
    x, mask, _ = softmax_inputs({**c, "dtype": torch.float64})
    y = kernels.scale_mask_softmax_reference(x, scale=c["scale"], mask_kind=c["kind"], mask=mask)
    if c["kind"] == "causal":
        mask = causal_mask_from_indices(c["sq"], c["sk"])
    scores = x * c["scale"] if mask is None else (x * c["scale"]).masked_fill(mask, float("-inf"))
    expected = torch.softmax(scores, dim=-1)
    fully_masked = torch.isinf(scores).all(dim=-1)  # torch.softmax gives NaN there; nanomeg gives zeros
    torch.testing.assert_close(y[~fully_masked], expected[~fully_masked], rtol=1e-12, atol=1e-12)
    assert torch.equal(y[fully_masked], torch.zeros_like(y[fully_masked]))


# ----------------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm
# ----------------------------------------------------------------------------------------------------


@st.composite
def norm_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        op=draw(st.sampled_from(["layer_norm", "rms_norm"])),
        lead=draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)), h=draw(st.integers(1, 3 * SMALL_BLOCK + 3)),
        dtype=dtype, weight_dtype=draw(st.sampled_from([torch.float32, dtype])), bias=draw(st.booleans()),
        zero_centered=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-2])), seed=draw(st.integers(0, 2**16)),
    )


def norm_inputs(c):
    """(inputs list for the op, dy) for a case drawn by norm_cases."""
    g = torch.Generator().manual_seed(c["seed"])
    shape = (*c["lead"], c["h"])
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(c["dtype"])
    weight = (torch.randn(c["h"], generator=g) * (0.1 if c["zero_centered"] else 1)).to(c["weight_dtype"])
    dy = torch.randn(shape, generator=g).to(c["dtype"])
    if c["op"] == "rms_norm":
        return [x, weight], dy
    bias = torch.randn(c["h"], generator=g).to(c["weight_dtype"]) if c["bias"] else None
    return [x, weight, bias], dy


def norm_case(**overrides):
    base = dict(op="layer_norm", lead=[3], h=1, dtype=torch.float32, weight_dtype=torch.float32, bias=True,
                zero_centered=False, eps=1e-5, seed=0)
    return {**base, **overrides}


@given(c=norm_cases())
@example(c=norm_case(h=1))
@example(c=norm_case(op="rms_norm", lead=[2, 4], h=SMALL_BLOCK + 1, dtype=torch.bfloat16, zero_centered=True))
@example(c=norm_case(lead=[7], h=3 * SMALL_BLOCK - 1, dtype=torch.bfloat16, weight_dtype=torch.bfloat16))
@example(c=norm_case(lead=[], h=SMALL_BLOCK, dtype=torch.float16, bias=False, zero_centered=True))
def test_norm_triton_matches_reference(c):
    inputs, dy = norm_inputs(c)
    fn, dtype = getattr(kernels, c["op"]), c["dtype"]
    kwargs = dict(eps=c["eps"], zero_centered_gamma=c["zero_centered"])
    y, grads = forward_backward(fn, inputs, dy, triton=True, **kwargs)
    y_ref, grads_ref = forward_backward(fn, inputs, dy, triton=False, **kwargs)
    assert_close(y, y_ref, dtype)
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        assert_close(g, g_ref, dtype)
    # dx = rstd * (w*dy - the row's mean terms): a rounding of w*dy (a compiled kernel may fuse it into an
    # FMA, the reference does not) is multiplied by rstd, up to 1/sqrt(eps) for a row of equal values
    # (any row at h = 1). So dx's absolute tolerance grows with rstd * max|w*dy| * fp32's unit roundoff.
    x, w = inputs[0].double(), (inputs[1].double() + (1 if c["zero_centered"] else 0))
    centred = x - x.mean(-1, keepdim=True) if c["op"] == "layer_norm" else x
    rstd = (centred.pow(2).mean(-1) + c["eps"]).rsqrt().max().item()
    rtol, atol = TOLERANCE[dtype]
    slack = 4 * 2**-24 * rstd * (w * dy.double()).abs().max().item()
    torch.testing.assert_close(grads[0].float(), grads_ref[0].float(), rtol=rtol, atol=atol + slack)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_hidden_65536_at_the_real_block_size(op):
    """h = 65536 with the library's own NORM_BLOCK: the looped kernels over 8 chunks; 5 rows in 3 groups."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "NORM_BLOCK", FULL_NORM_BLOCK)
        mp.setattr(kernels, "COLUMN_SUM_BLOCK_N", 4096)  # 16 programs, not 2048, under the interpreter
        c = norm_case(op=op, lead=[5], h=65536, dtype=torch.bfloat16)
        inputs, dy = norm_inputs(c)
        check_triton_matches_reference(getattr(kernels, op), inputs, dy, torch.bfloat16)


@given(c=norm_cases())
def test_norm_references_match_torch(c):
    c = {**c, "dtype": torch.float64, "weight_dtype": torch.float64}
    inputs, _ = norm_inputs(c)
    x, weight, h = inputs[0], inputs[1], c["h"]
    gamma = weight + 1 if c["zero_centered"] else weight
    if c["op"] == "layer_norm":
        y = kernels.layer_norm_reference(*inputs, eps=c["eps"], zero_centered_gamma=c["zero_centered"])
        expected = F.layer_norm(x, (h,), gamma, inputs[2], eps=c["eps"])
    else:
        y = kernels.rms_norm_reference(*inputs, eps=c["eps"], zero_centered_gamma=c["zero_centered"])
        expected = F.rms_norm(x, (h,), gamma, eps=c["eps"])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows, h, programs, split, dtype", [
    (7, 13, 3, [3, 3, 1], torch.bfloat16),  # rows not a multiple of the group; h not a power of two
    (8, 16, 3, [3, 3, 2], torch.float32),  # h = BLOCK exactly
    (1, 13, 3, [1], torch.float16),  # a single row: one program
    (3, 10, 8, [1, 1, 1], torch.float32),  # more programs asked for than rows: one row each
    (10, 40, 4, [3, 3, 3, 1], torch.bfloat16),  # h > BLOCK: the looped kernel's partial rows
])
def test_norm_weight_gradients_over_row_groups_match_torch(op, rows, h, programs, split, dtype):
    """The backward's weight gradients are summed per group of rows (a partial row per program), then over
    the groups: every way of splitting the rows gives torch's dx, dw and db (F.layer_norm / F.rms_norm,
    autograd in float64 on the same inputs)."""
    row_groups = kernels._row_groups
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "CPU_ROW_GROUPS", programs)  # and the CPU's split on a GPU too, not the SM count's:
        mp.setattr(kernels, "_row_groups", lambda n_rows, device, per_sm=1: row_groups(n_rows, torch.device("cpu")))
        groups, per_group = kernels._row_groups(rows, DEVICE)
        assert [min(per_group, rows - g * per_group) for g in range(groups)] == split
        g = torch.Generator().manual_seed(rows * h)
        x, dy = (torch.randn(rows, h, generator=g) * 2 + 0.5).to(dtype), torch.randn(rows, h, generator=g).to(dtype)
        params = [torch.randn(h, generator=g).to(dtype) for _ in range(2 if op == "layer_norm" else 1)]
        y, grads = forward_backward(getattr(kernels, op), [x, *params], dy, triton=True)
    leaves = [t.double().requires_grad_() for t in (x, *params)]
    if op == "layer_norm":
        expected = F.layer_norm(leaves[0], (h,), *leaves[1:], eps=1e-5)
    else:
        expected = F.rms_norm(leaves[0], (h,), leaves[1], eps=1e-5)
    expected_grads = torch.autograd.grad(expected, leaves, dy.double())
    assert_close(y, expected.to(dtype), dtype)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad.to(dtype), dtype)


# ----------------------------------------------------------------------------------------------------
# bias-GeLU
# ----------------------------------------------------------------------------------------------------


@st.composite
def gelu_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        lead=draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)), h=draw(st.integers(1, 40)), dtype=dtype,
        bias=draw(st.sampled_from([None, torch.float32, dtype])), approximate=draw(st.sampled_from(["tanh", "none"])),
        seed=draw(st.integers(0, 2**16)),
    )


def gelu_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    shape = (*c["lead"], c["h"])
    x = (3 * torch.randn(shape, generator=g)).to(c["dtype"])
    bias = None if c["bias"] is None else torch.randn(c["h"], generator=g).to(c["bias"])
    return [x, bias], torch.randn(shape, generator=g).to(c["dtype"])


@given(c=gelu_cases())
@example(c=dict(lead=[3, 7], h=37, dtype=torch.bfloat16, bias=torch.float32, approximate="tanh", seed=1))
@example(c=dict(lead=[], h=1, dtype=torch.float32, bias=torch.float32, approximate="none", seed=2))
def test_bias_gelu_triton_matches_reference(c):
    inputs, dy = gelu_inputs(c)
    check_triton_matches_reference(kernels.bias_gelu, inputs, dy, c["dtype"], approximate=c["approximate"])


@given(c=gelu_cases())
def test_bias_gelu_reference_matches_torch(c):
    (x, bias), _ = gelu_inputs({**c, "dtype": torch.float64, "bias": c["bias"] and torch.float64})
    y = kernels.bias_gelu_reference(x, bias, approximate=c["approximate"])
    expected = F.gelu(x if bias is None else x + bias, approximate=c["approximate"])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_bias_gelu_saturates_without_nan():
    """Large |x|: the kernel's tanh and erf saturate to +-1, and gelu' to 0 or 1, with no inf or NaN."""
    x = torch.tensor([[-1e4, -60.0, -10.0, 0.0, 10.0, 60.0, 1e4]])
    for approximate in ["tanh", "none"]:
        check_triton_matches_reference(kernels.bias_gelu, [x, None], torch.ones_like(x), torch.float32,
                                       approximate=approximate)


# ----------------------------------------------------------------------------------------------------
# Every kernel variant, pinned: one fixed fp32 example each, Triton against the reference
# ----------------------------------------------------------------------------------------------------

PINNED_TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # fp32: a few ulps, far below any formula mistake


def pinned_variants():
    """pytest.param(fn, inputs, dy) for every variant of every kernel, on fixed fp32 inputs uniform in
    [-4, 4]: large enough that the tanh term of the GeLU derivative matters (it peaks near |z| = 1.5).
    dy is uniform in [-1, 1]: PINNED_TOLERANCE is absolute near 0, and the fp32 reference's own error
    grows with |dy| (in the GeLU tail torch's 1 + tanh(u) cancels: about 2.5e-7 * |dy| off)."""
    g = torch.Generator().manual_seed(2024)
    uniform = lambda *shape, r=4.0: (2 * torch.rand(*shape, generator=g) - 1) * r
    sizes = {"one-block": SMALL_BLOCK - 3, "looped": 2 * SMALL_BLOCK + 5}  # looped: 3 chunks, the last partial
    cases = []
    for size, n in sizes.items():
        for kind in kernels.MASK_KINDS:
            x = uniform(1, 2, 3, n)
            mask = None
            if kind == "padding":
                mask = torch.rand(1, 1, 3, n, generator=g) < 0.3  # broadcast over heads
                mask[0, 0, 2] = True  # a fully masked row
            fn = functools.partial(kernels.scale_mask_softmax, scale=0.7, mask_kind=kind, mask=mask)
            cases.append(pytest.param(fn, [x], uniform(*x.shape, r=1.0), id=f"softmax-{kind}-{size}"))
        norms = [("layer_norm", True, "-bias"), ("layer_norm", False, "-no_bias"), ("rms_norm", False, "")]
        for (op, bias, bias_id), zero_centered in itertools.product(norms, [False, True]):
            x = uniform(5, n) + 0.5
            inputs = [x, uniform(n, r=0.5 if zero_centered else 2.0)]  # weight: a zero-centred one is near 0
            if op == "layer_norm":
                inputs.append(uniform(n, r=1.0) if bias else None)
            fn = functools.partial(getattr(kernels, op), zero_centered_gamma=zero_centered)
            name = f"{op}{bias_id}-zc_{zero_centered}-{size}"
            cases.append(pytest.param(fn, inputs, uniform(*x.shape, r=1.0), id=name))
    for approximate in kernels.GELU_APPROXIMATIONS:
        for bias in [True, False]:
            x = uniform(5, 24)  # 2 x 2 tiles of GELU_BLOCK_M x GELU_BLOCK_N (4 x 16 here), both partial
            fn = functools.partial(kernels.bias_gelu, approximate=approximate)
            inputs = [x, uniform(24, r=1.0) if bias else None]
            name = f"bias_gelu-{approximate}-{'bias' if bias else 'no_bias'}"
            cases.append(pytest.param(fn, inputs, uniform(*x.shape, r=1.0), id=name))
    return cases


@pytest.mark.parametrize("fn, inputs, dy", pinned_variants())
def test_every_variant_in_fp32_matches_the_reference(fn, inputs, dy):
    """No draw of luck: each variant's forward and every gradient (x, weight, bias), Triton against the
    reference, in fp32 at a few ulps."""
    y, grads = forward_backward(fn, inputs, dy, triton=True)
    y_ref, grads_ref = forward_backward(fn, inputs, dy, triton=False)
    torch.testing.assert_close(y, y_ref, **PINNED_TOLERANCE)
    assert len(grads) == len([t for t in inputs if t is not None])
    for name, g, g_ref in zip(["x", "weight or bias", "bias"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **PINNED_TOLERANCE, msg=lambda m, name=name: f"grad of {name}: {m}")


# ----------------------------------------------------------------------------------------------------
# The references: gradcheck in float64
# ----------------------------------------------------------------------------------------------------


def gradcheck_cases():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 3, 5, generator=g) < 0.4
    mask[1, 0, 2] = True  # a fully masked row
    x_dead = rand(2, 2, 3, 5)
    x_dead[0, 1, 2] = float("-inf")  # a row of -inf scores, which the reference must turn into zeros
    x_dead[1, 0, 0, :2] = float("-inf")  # and a row with some
    return [
        ("softmax none", lambda x: kernels.scale_mask_softmax_reference(x, scale=0.7), [rand(2, 2, 3, 5)]),
        ("softmax none, -inf rows", lambda x: kernels.scale_mask_softmax_reference(x, scale=0.7), [x_dead]),
        ("softmax causal", lambda x: kernels.scale_mask_softmax_reference(x, mask_kind="causal"), [rand(2, 2, 3, 5)]),
        ("softmax padding",
         lambda x: kernels.scale_mask_softmax_reference(x, scale=2.0, mask_kind="padding", mask=mask),
         [rand(2, 2, 3, 5)]),
        ("layer_norm", lambda x, w, b: kernels.layer_norm_reference(x, w, b), [rand(3, 6), rand(6), rand(6)]),
        ("layer_norm, no bias", lambda x, w: kernels.layer_norm_reference(x, w), [rand(3, 6), rand(6)]),
        ("layer_norm 1p", lambda x, w, b: kernels.layer_norm_reference(x, w, b, zero_centered_gamma=True),
         [rand(3, 6), rand(6), rand(6)]),
        ("layer_norm 1p, no bias", lambda x, w: kernels.layer_norm_reference(x, w, zero_centered_gamma=True),
         [rand(2, 3, 6), rand(6)]),
        ("rms_norm", lambda x, w: kernels.rms_norm_reference(x, w), [rand(3, 6), rand(6)]),
        ("rms_norm 1p", lambda x, w: kernels.rms_norm_reference(x, w, zero_centered_gamma=True), [rand(4, 5), rand(5)]),
        ("bias_gelu tanh", lambda x, b: kernels.bias_gelu_reference(x, b), [rand(3, 4), rand(4)]),
        ("bias_gelu erf", lambda x, b: kernels.bias_gelu_reference(x, b, approximate="none"), [rand(2, 3, 4), rand(4)]),
        ("bias_gelu no bias", lambda x: kernels.bias_gelu_reference(x), [rand(5)]),
    ]


@pytest.mark.parametrize("name, fn, inputs", gradcheck_cases(), ids=[c[0] for c in gradcheck_cases()])
def test_reference_gradcheck(name, fn, inputs):
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in inputs])


@pytest.mark.parametrize("name, fn, inputs", gradcheck_cases(), ids=[c[0] for c in gradcheck_cases()])
def test_reference_gradgradcheck(name, fn, inputs):
    """The references differentiate twice correctly: they are the path for higher-order gradients."""
    assert torch.autograd.gradgradcheck(fn, [t.requires_grad_() for t in inputs])


OP_NAMES = {"softmax": "scale_mask_softmax", "layer_norm": "layer_norm", "rms_norm": "rms_norm",
            "bias_gelu": "bias_gelu"}


@pytest.mark.parametrize("first_loss", ["sum", "square"])
@pytest.mark.parametrize("op", list(OP_NAMES))
def test_triton_double_backward_raises(op, first_loss):
    """A gradient taken with create_graph=True through a Triton op is right, but differentiating it again
    raises a RuntimeError naming the op and the way out (it used to leave out every term through the
    kernels and return a wrong number). With first_loss "sum", dy itself needs no gradient."""
    _, fn, inputs, kwargs = next(c for c in all_ops() if c[0] == op)
    loss = (lambda y: y.sum()) if first_loss == "sum" else (lambda y: (y * y).sum())
    leaves = [t.requires_grad_() for t in inputs]
    firsts = []
    for triton in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NANOMEG_TRITON", "1" if triton else "0")
            y = fn(*leaves, **kwargs)
        firsts.append((y, torch.autograd.grad(loss(y), leaves, create_graph=True)))
    (y, grads), (y_ref, grads_ref) = firsts
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    second_loss = lambda y, grads: sum((g * g).sum() for g in grads) + y.sum()  # a gradient penalty
    assert all(h.isfinite().all() for h in torch.autograd.grad(second_loss(y_ref, grads_ref), leaves))
    with pytest.raises(RuntimeError, match=rf"{OP_NAMES[op]}: the Triton kernels give first-order gradients only"
                                           r".*use the reference \(NANOMEG_TRITON=0\)"):
        torch.autograd.grad(second_loss(y, grads), leaves)


# ----------------------------------------------------------------------------------------------------
# Dispatch, buffers, bad input, layouts
# ----------------------------------------------------------------------------------------------------


def all_ops(dtype=torch.float32):
    """(name, fn, inputs, kwargs) for one small call of every public op."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    return [
        ("softmax", kernels.scale_mask_softmax, [rand(1, 2, 3, 20)], dict(mask_kind="causal")),
        ("layer_norm", kernels.layer_norm, [rand(4, 20), rand(20), rand(20)], {}),
        ("rms_norm", kernels.rms_norm, [rand(4, 20), rand(20)], {}),
        ("bias_gelu", kernels.bias_gelu, [rand(4, 20), rand(20)], {}),
    ]


@pytest.mark.parametrize("forced, expect_triton", [(None, False), ("0", False), ("1", True)])
def test_dispatch_on_cpu_follows_the_switch(forced, expect_triton):
    for _, fn, inputs, kwargs in all_ops():
        with pytest.MonkeyPatch.context() as mp:
            if forced is None:
                mp.delenv("NANOMEG_TRITON", raising=False)
            else:
                mp.setenv("NANOMEG_TRITON", forced)
            y = fn(*[t.requires_grad_() for t in inputs], **kwargs)
        assert type(y.grad_fn).__name__.startswith("Triton") == expect_triton


@pytest.mark.parametrize("value, expect_triton", [
    *[(v, True) for v in ["1", "true", "True", "YES", "on", " On "]],
    *[(v, False) for v in ["0", "false", "FALSE", "no", "Off", "0 "]],
    ("", False),  # empty is unset: CPU tensors take the reference
])
def test_nanomeg_triton_spellings(value, expect_triton):
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOMEG_TRITON", value)
        y = kernels.bias_gelu(x)
    assert type(y.grad_fn).__name__.startswith("Triton") == expect_triton


@pytest.mark.parametrize("value", ["2", "maybe", "tru", "1.0", "y", "enable"])
def test_nanomeg_triton_unknown_value_is_a_value_error(value):
    """A typo must not silently choose a path: the error names the variable and the value."""
    for _, fn, inputs, kwargs in all_ops():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NANOMEG_TRITON", value)
            with pytest.raises(ValueError, match=rf"NANOMEG_TRITON={value!r} is not understood: use one of "
                                                 r"1/true/yes/on .* 0/false/no/off"):
                fn(*inputs, **kwargs)


def test_without_triton_the_references_run_and_forcing_raises():
    for _, fn, inputs, kwargs in all_ops():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "HAVE_TRITON", False)
            mp.delenv("NANOMEG_TRITON", raising=False)
            assert not type(fn(*[t.requires_grad_() for t in inputs], **kwargs).grad_fn).__name__.startswith("Triton")
            mp.setenv("NANOMEG_TRITON", "1")
            with pytest.raises(RuntimeError, match="triton cannot be imported"):
                fn(*inputs, **kwargs)


def test_module_imports_and_runs_when_triton_cannot_be_imported():
    """A fresh interpreter where `import triton` fails: kernels.py still imports, and the references run."""
    script = (
        "import sys; sys.modules['triton'] = None; import os, torch, kernels\n"
        "assert not kernels.HAVE_TRITON\n"
        "y = kernels.layer_norm(torch.randn(3, 8), torch.ones(8)); assert y.shape == (3, 8)\n"
        "os.environ['NANOMEG_TRITON'] = '1'\n"
        "try: kernels.bias_gelu(torch.randn(3, 8))\n"
        "except RuntimeError as e: print('raised:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised: NANOMEG_TRITON=1 forces the Triton kernels, but triton cannot be imported" in out.stdout


def test_outputs_and_grads_come_from_the_poisoned_allocator():
    """Every output and gradient a Triton op returns lives in a buffer from kernels._empty (so the NaN
    poisoning of this module covers it), and the poison does catch an element left unwritten."""
    for name, fn, inputs, kwargs in all_ops(torch.bfloat16):
        allocated = []

        def recording_empty(*args, allocated=allocated):
            allocated.append(nan_empty(*args))
            return allocated[-1]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "_empty", recording_empty)
            y, grads = forward_backward(fn, inputs, torch.ones_like(inputs[0]), triton=True, on_cpu=False, **kwargs)
        pointers = {t.untyped_storage().data_ptr() for t in allocated}
        for out in [y, *grads]:
            assert out.untyped_storage().data_ptr() in pointers, f"{name}: a result not from kernels._empty"
    x = torch.randn(1, 1, 1, 12).to(DEVICE)
    y = nan_empty(x.shape, x.dtype, x.device)
    kernels._softmax_fwd_kernel[(1,)](x, y, x, 1, 12, 1, 1.0, 0, 0, 0, MASK_KIND=0, BLOCK=8)  # block too short
    assert y[..., :8].isfinite().all() and y[..., 8:].isnan().all()


def bad_inputs():
    x4, x2, w = torch.randn(2, 3, 4, 8), torch.randn(4, 8), torch.randn(8)
    smx = kernels.scale_mask_softmax
    return [
        (lambda: smx(torch.randn(3, 4, 8)), r"must be \[b, heads, sq, sk\], got shape \(3, 4, 8\)"),
        (lambda: smx(x4, mask_kind="upper"), r"unknown mask_kind 'upper'"),
        (lambda: smx(x4, mask_kind="padding"), r"mask_kind='padding' needs a boolean mask"),
        (lambda: smx(x4, mask_kind="padding", mask=torch.zeros(2, 3, 4, 7, dtype=torch.bool)),
         r"mask of shape \(2, 3, 4, 7\) does not broadcast to scores of shape \(2, 3, 4, 8\)"),
        (lambda: smx(x4, mask_kind="padding", mask=torch.zeros(2, 2, 1, 8, dtype=torch.bool)),
         r"mask of shape \(2, 2, 1, 8\) does not broadcast"),
        (lambda: smx(x4, mask_kind="padding", mask=torch.zeros(2, 3, 4, 8)), r"mask must be torch.bool"),
        (lambda: smx(x4, mask_kind="causal", mask=torch.zeros(2, 3, 4, 8, dtype=torch.bool)), r"takes no mask"),
        (lambda: smx(torch.randn(1, 1, 5, 4), mask_kind="causal"), r"sq <= sk.*sq=5, sk=4"),
        (lambda: smx(x4.long()), r"x has dtype torch.int64; supported"),
        (lambda: kernels.layer_norm(x2, torch.randn(7)), r"weight must have shape \(8,\) .* got \(7,\)"),
        (lambda: kernels.layer_norm(x2, w, torch.randn(4)), r"bias must have shape \(8,\) .* got \(4,\)"),
        (lambda: kernels.rms_norm(x2, torch.randn(8, 1)), r"weight must have shape \(8,\) .* got \(8, 1\)"),
        (lambda: kernels.rms_norm(torch.tensor(1.0), w), r"at least one dim, got shape \(\)"),
        (lambda: kernels.rms_norm(x2.int(), w), r"x has dtype torch.int32"),
        (lambda: kernels.layer_norm(x2, w.int()), r"weight has dtype torch.int32"),
        (lambda: kernels.bias_gelu(x2, torch.randn(5)), r"bias must have shape \(8,\) .* got \(5,\)"),
        (lambda: kernels.bias_gelu(x2, approximate="fast"), r"unknown approximate 'fast'"),
    ]


@pytest.mark.parametrize("triton", [True, False])
@pytest.mark.parametrize("call, message", bad_inputs())
def test_bad_input_is_a_value_error_before_any_launch(call, message, triton):
    def no_launch(*args):
        raise AssertionError("a buffer was allocated for a launch before the input was checked")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOMEG_TRITON", "1" if triton else "0")
        mp.setattr(kernels, "_empty", no_launch)
        with pytest.raises(ValueError, match=message):
            call()


def test_float64_is_for_the_references_only():
    x = torch.randn(4, 8, dtype=torch.float64)
    kernels.bias_gelu(x)  # CPU: the reference, which takes float64
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOMEG_TRITON", "1")
        with pytest.raises(ValueError, match=r"bias_gelu: x has dtype torch.float64; supported: float16, bfloat16"):
            kernels.bias_gelu(x)


def test_non_contiguous_inputs_are_copied():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 5, 3, 20, generator=g).transpose(1, 2)  # [b, heads=3, sq=5, sk]: not contiguous
    mask = (torch.rand(2, 1, 1, 20, generator=g) < 0.3).expand(2, 1, 5, 20)  # a stride-0 view
    check_triton_matches_reference(kernels.scale_mask_softmax, [scores], torch.randn(2, 3, 5, 20), torch.float32,
                                   mask_kind="padding", mask=mask)
    x = torch.randn(20, 6, generator=g).t()  # [6, 20], column-major
    w2, b = torch.randn(20, 2, generator=g), torch.randn(20, generator=g)  # w2[:, 0]: a weight with stride 2
    dy = torch.randn(6, 20, generator=g)
    check_triton_matches_reference(lambda x, w2, b: kernels.layer_norm(x, w2[:, 0], b), [x, w2, b], dy, torch.float32)
    check_triton_matches_reference(lambda x, w2: kernels.rms_norm(x, w2[:, 0]), [x, w2], dy, torch.float32)
    check_triton_matches_reference(lambda x, w2: kernels.bias_gelu(x, w2[:, 0]), [x, w2], dy, torch.float32)


def test_empty_input_goes_to_the_reference():
    x = torch.randn(0, 8, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOMEG_TRITON", "1")
        y = kernels.layer_norm(x, torch.ones(8))
    assert y.shape == (0, 8)


# ----------------------------------------------------------------------------------------------------
# The kernels compile for a real GPU (the interpreter accepts code that the compiler does not)
# ----------------------------------------------------------------------------------------------------

COMPILE_SCRIPT = r"""
import inspect, kernels, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
P = lambda t: "*" + t
def compile(kernel, types, constexprs):
    params = inspect.signature(kernel.fn).parameters
    signature = {p: "constexpr" if p in constexprs else types[p] for p in params}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
dt, n = "bf16", 0
for kind in (0, 1, 2):
    for k in (kernels._softmax_fwd_kernel, kernels._softmax_fwd_looped_kernel):
        compile(k, dict(X=P(dt), Y=P(dt), MASK="*u8", sq="i32", sk="i32", heads="i32", scale="fp32", m_sb="i32",
                        m_sh="i32", m_sq="i32"), dict(MASK_KIND=kind, BLOCK=1024)); n += 1
    for k in (kernels._softmax_bwd_kernel, kernels._softmax_bwd_looped_kernel):
        compile(k, dict(Y=P(dt), DY=P(dt), DX=P(dt), MASK="*u8", sq="i32", sk="i32", heads="i32", scale="fp32",
                        m_sb="i32", m_sh="i32", m_sq="i32"), dict(MASK_KIND=kind, BLOCK=1024)); n += 1
for is_rms, has_bias, zero_centered in ((False, True, False), (False, False, True), (True, False, True)):
    c = dict(IS_RMS=is_rms, HAS_BIAS=has_bias, ZERO_CENTERED=zero_centered, BLOCK=1024)
    for k in (kernels._norm_fwd_kernel, kernels._norm_fwd_looped_kernel):
        compile(k, dict(X=P(dt), W="*fp32", B="*fp32", Y=P(dt), MEAN="*fp32", RSTD="*fp32", n="i32", eps="fp32"), c)
        n += 1
    for k in (kernels._norm_bwd_kernel, kernels._norm_bwd_looped_kernel):
        compile(k, dict(X=P(dt), W="*fp32", DY=P(dt), DX=P(dt), MEAN="*fp32", RSTD="*fp32", DW_PART="*fp32",
                        DB_PART="*fp32", n_rows="i32", n="i32", rows_per_group="i32"), c); n += 1
for has_bias, tanh in ((True, True), (False, False)):
    c = dict(HAS_BIAS=has_bias, APPROX_TANH=tanh, BLOCK_M=16, BLOCK_N=256)
    compile(kernels._bias_gelu_fwd_kernel, dict(X=P(dt), B="*fp32", Y=P(dt), n_rows="i32", n="i32"), c)
    compile(kernels._bias_gelu_bwd_kernel, dict(X=P(dt), B="*fp32", DY=P(dt), DX=P(dt), DB_PART="*fp32",
                                                n_rows="i32", n="i32", rows_per_group="i32"), c); n += 2
compile(kernels._column_sum_kernel, dict(PART="*fp32", OUT=P(dt), groups="i32", n="i32"), dict(BLOCK_G=64, BLOCK_N=32))
print("compiled", n + 1)
"""


def test_every_kernel_compiles_for_sm90(tmp_path):
    """Compile each kernel (each mask kind, norm variant, GeLU form) to a cubin for an H100, without a GPU,
    in a fresh interpreter with TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled 29" in out.stdout

