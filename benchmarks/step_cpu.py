"""Forward+backward step time of a small GPT on CPU: nanomeg beside a peer.

    python benchmarks/step_cpu.py [--layers 6 --hidden 384 --heads 6 --seq 256 --batch 8 --threads N]

The peer is Hugging Face transformers' GPT2LMHeadModel (a mainstream PyTorch
GPT-2) at the same shape, the same vocabulary and the same threads, measured
in the same run. Prints tokens/s and model GFLOP/s (nanomeg.gpt_flops) for
nanomeg's core attention path, its SDPA path, and the peer (eager and SDPA).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import nanomeg as N  # noqa: E402
import parallel as P  # noqa: E402


def time_steps(step, warmup: int, iters: int) -> float:
    """Median seconds of `step()` over iters runs, after warmup runs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def nanomeg_step(cfg, ids, targets):
    params = {k: v.requires_grad_(True) for k, v in N.init_gpt(cfg, 0).items()}
    mesh = P.Mesh.serial()

    def step():
        N.gpt_loss(params, ids, targets, cfg, mesh).backward()
        for p in params.values():
            p.grad = None
    return step


def hf_step(cfg, ids, targets, attn_implementation):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.padded_vocab, n_positions=cfg.max_seq, n_embd=cfg.hidden,
                                    n_layer=cfg.layers, n_head=cfg.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                    attn_implementation=attn_implementation))

    def step():
        hf(ids, labels=targets).loss.backward()  # labels are shifted inside: same work
        hf.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256, help="bytes, as train.py")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=5, help="timed steps per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all implementations (best median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = N.GPTConfig(vocab_size=args.vocab, max_seq=args.seq, layers=args.layers, hidden=args.hidden,
                      heads=args.heads, activation="gelu_tanh")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    flops = N.gpt_flops(cfg, args.batch, args.seq)
    print(f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, batch {args.batch}, "
          f"vocab {cfg.padded_vocab}; {args.threads} threads; torch {torch.__version__}")
    print(f"{'implementation':42s} {'ms/step':>9s} {'tokens/s':>10s} {'GFLOP/s':>9s}")
    runs = [("nanomeg (core attention)", lambda: nanomeg_step(cfg, ids, targets)),
            ("nanomeg (attention='sdpa')",
             lambda: nanomeg_step(N.GPTConfig(**{**cfg.__dict__, "attention": "sdpa"}), ids, targets))]
    try:
        import transformers  # noqa: F401
        runs += [("peer: transformers GPT2LMHeadModel eager", lambda: hf_step(cfg, ids, targets, "eager")),
                 ("peer: transformers GPT2LMHeadModel sdpa", lambda: hf_step(cfg, ids, targets, "sdpa"))]
    except ImportError:
        print("(transformers is not installed: no peer; pip install transformers)")
    steps = []
    for name, make in runs:
        torch.manual_seed(0)
        steps.append((name, make()))
    best = {name: float("inf") for name, _ in steps}
    for _ in range(args.rounds):  # alternate the implementations, keep each one's best median
        for name, step in steps:
            best[name] = min(best[name], time_steps(step, warmup=1, iters=args.iters))
    for name, sec in best.items():
        print(f"{name:42s} {sec * 1e3:9.1f} {args.batch * args.seq / sec:10,.0f} {flops / sec / 1e9:9.2f}")

if __name__ == "__main__":
    main()
