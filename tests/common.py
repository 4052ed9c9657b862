"""What the model test files share: seeded tensors, jittered parameters and one
`assert_close` for nested results. Module-level, so worker processes import
it by name like harness.py."""

import torch

import parallel as P

TOL = dict(rtol=1e-9, atol=1e-10)  # parallel vs serial, float64
SERIAL = P.Mesh.serial()


def rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randint(seed, high, *shape):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def jittered(params: dict, seed: int) -> dict:
    """params with every 1-D tensor (norm weights, biases) moved by 0.1 * noise: at init they are all 1 or
    0, and a bias added on every rank before a reduce, or a gain applied twice, would go unseen."""
    return {k: v + 0.1 * rand(seed + 1000 + i, *v.shape).to(v.dtype) if v.dim() == 1 else v
            for i, (k, v) in enumerate(params.items())}


def assert_close(got, want, what, tol=TOL):
    """Tensors, or dicts / lists of them, equal to `tol` (infinities must match); the message names the entry."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close(got[k], want[k], f"{what}[{k}]", tol)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{what}: {len(got)} entries, want {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{what}[{i}]", tol)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"
