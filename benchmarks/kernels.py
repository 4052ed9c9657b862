"""benchmarks/kernels.py — nanomeg's Triton kernels against torch eager and torch.compile, on one CUDA GPU.

For each op at an LLM shape, the forward pass and the forward + backward pass are timed with
triton.testing.do_bench (the median of many runs) and reported

* as GB/s: the bytes the pass must move at the least (read each input once, write each output once,
  counted below per op) divided by the time;
* as a fraction of the bandwidth of a device-to-device copy (y.copy_(x) of 1 GiB), measured in the same run:
  a memory-bound kernel cannot beat a copy, so this says how close to the roof each implementation gets.

The peers run the same inputs: "torch eager" is the plain PyTorch a model would write (the fp32 masked
softmax as Megatron's unfused path, F.layer_norm, F.rms_norm, F.gelu(x + b)), "torch.compile" is that same
function compiled by Inductor. The column "max |Δ| vs eager" checks that each implementation agrees
with eager: the output y for the forward, the gradient dx for the forward + backward; "dw, db rel Δ" is
the largest difference of a parameter gradient (weight, bias) from eager's, relative to eager's largest.

Run: python benchmarks/kernels.py [--quick] [--only NAME ...]   (--quick: smaller shapes, for a smoke run;
--only norm: the cases whose op name contains "norm", i.e. LayerNorm and RMSNorm forward and backward)
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `import kernels`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16


def time_ms(fn, grad_to_none=None) -> float:
    """Median time of fn() in milliseconds."""
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """GB/s of y.copy_(x) for x of nbytes: nbytes read + nbytes written."""
    x = torch.empty(nbytes // 2, dtype=DTYPE, device=DEVICE).normal_()
    y = torch.empty_like(x)
    return 2 * nbytes / time_ms(lambda: y.copy_(x)) / 1e6


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------------------------------
# The cases: (op name, shape label, make(), bytes forward, bytes backward)
# make() returns (inputs, {impl name: function of the inputs}); inputs[0] is x.
# ----------------------------------------------------------------------------------------------------


def softmax_torch(x, scale, mask):
    """The unfused PyTorch path (Megatron's with softmax_in_fp32): fp32 scores, masked_fill, softmax."""
    return torch.softmax((x.float() * scale).masked_fill(mask, float("-inf")), dim=-1).to(x.dtype)


def softmax_case(b, heads, s, mask_kind):
    """Attention scores [b, heads, s, s]. Causal: only the visible keys (the lower triangle, with the
    diagonal) must be read, forward and backward; every output is written. Padding: x, the mask
    [b, 1, s, s] (one byte per key) and y."""
    scale = 1 / math.sqrt(128)
    x = torch.randn(b, heads, s, s, dtype=DTYPE, device=DEVICE)
    if mask_kind == "causal":
        mask = torch.ones(s, s, dtype=torch.bool, device=DEVICE).triu(1)
        visible = (s * (s + 1) // 2) / (s * s)
        kw = dict(mask_kind="causal")
    else:
        lengths = torch.randint(s // 2, s + 1, (b,), device=DEVICE)  # each sequence padded after its length
        mask = (torch.arange(s, device=DEVICE) >= lengths[:, None])[:, None, None, :].expand(b, 1, s, s).contiguous()
        visible = 1.0
        kw = dict(mask_kind="padding", mask=mask)
    impls = {
        "nanomeg triton": lambda x: kernels.scale_mask_softmax(x, scale=scale, **kw),
        "torch eager": lambda x: softmax_torch(x, scale, mask),
        "torch.compile": torch.compile(lambda x: softmax_torch(x, scale, mask)),
    }
    mask_bytes = 0 if mask_kind == "causal" else nbytes(mask)
    fwd = visible * nbytes(x) + nbytes(x) + mask_bytes
    bwd = 2 * visible * nbytes(x) + nbytes(x)  # read y, dy (visible part); write dx
    return [x], impls, fwd, bwd


def norm_case(rows, h, op):
    """x: [rows, h], weight (and bias for LayerNorm): [h]. Forward: read x, w, b; write y and the fp32
    mean / rstd per row. Backward: read x, dy, w, the statistics; write dx, dw, db."""
    x = torch.randn(rows, h, dtype=DTYPE, device=DEVICE)
    w = torch.randn(h, dtype=DTYPE, device=DEVICE)
    stats = 4 * rows * (2 if op == "layer_norm" else 1)
    if op == "layer_norm":
        b = torch.randn(h, dtype=DTYPE, device=DEVICE)
        eager = lambda x, w, b: F.layer_norm(x, (h,), w, b, eps=1e-5)
        impls = {"nanomeg triton": kernels.layer_norm, "torch eager": eager, "torch.compile": torch.compile(eager)}
        inputs = [x, w, b]
    else:
        eager = lambda x, w: F.rms_norm(x, (h,), w, eps=1e-5)
        impls = {"nanomeg triton": kernels.rms_norm, "torch eager": eager, "torch.compile": torch.compile(eager)}
        inputs = [x, w]
    params = nbytes(*inputs[1:])
    return inputs, impls, 2 * nbytes(x) + params + stats, 3 * nbytes(x) + 2 * params + stats


def bias_gelu_case(rows, h):
    """x: [rows, h], bias: [h]. Forward: read x, b; write y. Backward: read x, b, dy; write dx, db
    (x + b is recomputed, not saved)."""
    x = torch.randn(rows, h, dtype=DTYPE, device=DEVICE)
    b = torch.randn(h, dtype=DTYPE, device=DEVICE)
    eager = lambda x, b: F.gelu(x + b, approximate="tanh")
    impls = {"nanomeg triton": kernels.bias_gelu, "torch eager": eager, "torch.compile": torch.compile(eager)}
    return [x, b], impls, 2 * nbytes(x) + nbytes(b), 3 * nbytes(x) + 2 * nbytes(b)


def cases(quick: bool):
    s, rows = (512, 2048) if quick else (2048, 16384)
    yield "softmax causal", f"[4, 32, {s}, {s}]", lambda: softmax_case(4, 32, s, "causal")
    yield "softmax padding", f"[4, 32, {s}, {s}]", lambda: softmax_case(4, 32, s, "padding")
    for h in (4096, 8192):
        yield "layer_norm", f"[{rows}, {h}]", lambda h=h: norm_case(rows, h, "layer_norm")
        yield "rms_norm", f"[{rows}, {h}]", lambda h=h: norm_case(rows, h, "rms_norm")
    yield "bias_gelu tanh", f"[{rows}, {4 * 4096}]", lambda: bias_gelu_case(rows, 4 * 4096)


# ----------------------------------------------------------------------------------------------------
# Measuring and printing
# ----------------------------------------------------------------------------------------------------


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def max_rel_diff(grads, eager_grads) -> float:
    """max over the parameter gradients (weight, bias) of max |Δ| / max |eager's|; NaN when there are none."""
    return max((max_diff(g, e) / e.float().abs().max().item() for g, e in zip(grads, eager_grads)), default=math.nan)


def measure(inputs, impls, fwd_bytes, bwd_bytes):
    """Rows (impl, pass, ms, GB/s, max |Δ| vs eager, parameter grads' relative Δ) for the forward and the
    forward + backward passes."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    dy = torch.randn_like(inputs[0])

    def forward_backward(fn):
        fn(*leaves).backward(dy)

    def grads_of(fn):
        for t in leaves:
            t.grad = None
        forward_backward(fn)
        return [t.grad for t in leaves]

    eager_y, eager_grads = impls["torch eager"](*inputs).detach(), grads_of(impls["torch eager"])
    rows = []
    for name, fn in impls.items():
        with torch.no_grad():
            err = max_diff(fn(*inputs), eager_y)
            ms = time_ms(lambda fn=fn: fn(*inputs))
        rows.append((name, "forward", ms, fwd_bytes / ms / 1e6, err, math.nan))
        grads = grads_of(fn)
        err, param_err = max_diff(grads[0], eager_grads[0]), max_rel_diff(grads[1:], eager_grads[1:])
        ms = time_ms(lambda fn=fn: forward_backward(fn), grad_to_none=leaves)
        rows.append((name, "fwd+bwd", ms, (fwd_bytes + bwd_bytes) / ms / 1e6, err, param_err))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME",
                        help="only the ops whose name contains one of these (e.g. norm, softmax, gelu)")
    args = parser.parse_args()
    chosen = [c for c in cases(args.quick) if not args.only or any(name in c[0] for name in args.only)]
    if not chosen:
        parser.error(f"--only {' '.join(args.only)} matches none of: {', '.join(sorted({c[0] for c in cases(False)}))}")
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured.")
        return 0
    copy_gbs = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {DTYPE}")
    print(f"device-to-device copy (y.copy_(x), 1 GiB): {copy_gbs:.0f} GB/s\n")
    header = f"{'op':<16} {'shape':<20} {'pass':<8} {'implementation':<15} {'ms':>8} {'GB/s':>7} {'of copy':>8}"
    print(f"{header} {'max |Δ| vs eager':>17} {'dw, db rel Δ':>13}\n{'-' * (len(header) + 32)}")
    for op, shape, make in chosen:
        for impl, pass_, ms, gbs, err, param_err in measure(*make()):
            print(f"{op:<16} {shape:<20} {pass_:<8} {impl:<15} {ms:8.3f} {gbs:7.0f} {gbs / copy_gbs:8.0%} {err:17.2e} "
                  f"{param_err:13.2e}")
        torch.cuda.empty_cache()
    print("\nGB/s = the bytes each pass must move at the least (see each case's docstring) / median time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
