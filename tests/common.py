"""What the model test files share: seeded tensors, jittered parameters, one
`assert_close` for nested results and the padding patterns the hypothesis
tests draw. Module-level, so worker processes import it by name like harness.py."""

import torch
from hypothesis import strategies as st

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


def merged(per_rank: list[dict], what: str = "") -> dict:
    """The union of the ranks' dicts of full tensors (one pipeline stage each, say); every copy of a name
    (tp ranks, replicas, the tied embedding on the first and the last stage) must equal the first one seen."""
    out = {}
    for rank, got in enumerate(per_rank):
        for k, t in got.items():
            if k in out:
                assert_close(t, out[k], f"{what}: rank {rank}'s copy of {k}")
            else:
                out[k] = t
    return out


@st.composite
def padding(draw, n: int, s: int):
    """n padding patterns of length s >= 2, each with its first token real: a padded tail, the first token
    alone (a fully padded tail), holes, or none; at least one pattern ends in padding."""
    def one():
        style = draw(st.sampled_from(["tail", "first", "holes", "full"]))
        if style == "tail":
            real = draw(st.integers(1, s - 1))
            return (1,) * real + (0,) * (s - real)
        if style == "first":
            return (1,) + (0,) * (s - 1)
        if style == "holes":
            return (1,) + tuple(draw(st.lists(st.sampled_from([0, 1]), min_size=s - 1, max_size=s - 1)))
        return (1,) * s
    patterns = [one() for _ in range(n)]
    if all(p[-1] for p in patterns):
        i = draw(st.integers(0, n - 1))
        patterns[i] = patterns[i][:-1] + (0,)
    return tuple(patterns)


# ---- the multi-step oracle of the training tests (pipeline, MoE, context parallel) ----

LR, BETAS, WEIGHT_DECAY, CLIP, STEPS = 1e-2, (0.9, 0.95), 0.1, 1.0, 3


def adamw(params: dict):
    """torch's AdamW, weight decay on tensors of 2 dims or more (train.py's and ZeroAdamW's rule)."""
    return torch.optim.AdamW([dict(params=[p for p in params.values() if p.dim() >= 2], weight_decay=WEIGHT_DECAY),
                              dict(params=[p for p in params.values() if p.dim() < 2], weight_decay=0.0)],
                             lr=LR, betas=BETAS)


def serial_gpt_training(cfg, full, batches):
    """The oracle: one process on the whole global batch of each step ((ids, targets) pairs), torch's
    clip_grad_norm_ and AdamW. -> (losses [steps], grad norms [steps], final parameters)."""
    from dataclasses import replace

    import nanomeg as N

    params = {k: t.clone().requires_grad_(True) for k, t in full.items()}
    opt = adamw(params)
    losses, norms = [], []
    for step, (ids, targets) in enumerate(batches):
        opt.zero_grad()
        loss = N.gpt_loss(params, ids, targets, replace(cfg, sequence_parallel=False), SERIAL, seed=10 + step,
                          training=True)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP))
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), torch.stack(norms), {k: p.detach() for k, p in params.items()}

