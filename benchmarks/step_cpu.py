"""Forward+backward step time of a small GPT on CPU: nanomeg beside two peers, several shapes.

    python benchmarks/step_cpu.py [--shapes 6x384x128x8x256,4x256x256x8x8192,4x256x128x4x50257]
                                  [--steps 7] [--threads N] [--core]

Each shape is layers x hidden x seq x batch x vocab (heads = hidden / 64). At
each shape, in one process and with the same threads, three implementations
take turns, one step each, `--steps` times (after one warm-up step each), so
that other load on the machine hits them alike. Printed: each one's median
step, and for each peer the median of the rounds' ratios nanomeg/peer (one
round: the two steps ran back to back, so a slow spell of the machine hits
both) with the rounds' quartiles: a ratio whose quartiles straddle 1 is a
tie on this machine. `--threads 1` gives the steadiest figures on a shared
machine:

  nanomeg   nanomeg.gpt_loss, attention="sdpa", serial mesh (tp = 1), float32
  nanogpt   a plain nn.Module GPT written below in nanoGPT's layout: fused qkv
            Linear, F.scaled_dot_product_attention(is_causal=True), tanh GeLU,
            tied head, F.cross_entropy
  hf        transformers' GPT2LMHeadModel, attn_implementation="sdpa"

All three do the same work: float32, dropout off, biases, the tied output
layer over nanomeg's padded vocabulary (cfg.padded_vocab: the peers' tables
have those rows too; nanomeg masks them to -inf, the peers let them take a
share of the softmax), the mean next-token cross-entropy over every position.
`--core` adds nanomeg's core attention (the [b, n, s, s] scores path).

On a GPU (benchmarks/gpu.sh): `--device cuda --bf16` (autocast, as train.py),
`--compile` adds torch.compile'd twins of all three, and `--peak-flops F`
adds each one's MFU (nanomeg.gpt_flops per step / F).
"""

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import nanomeg as N  # noqa: E402
import parallel as P  # noqa: E402


class Block(nn.Module):
    """nanoGPT's block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.c_attn, self.attn_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)  # fused qkv
        self.c_fc, self.mlp_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):  # x: [b, s, h]
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))  # [b, n, s, d]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (Karpathy), the plain-PyTorch peer: ids [b, s] -> mean loss."""

    def __init__(self, vocab: int, max_seq: int, layers: int, h: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(max_seq, h)
        self.blocks = nn.ModuleList(Block(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)
        for name, p in self.named_parameters():  # nanoGPT's init
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "weight" in name and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids, targets):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def nanomeg_step(cfg, ids, targets, args, compiled=False):
    params = {k: v.to(args.device).requires_grad_(True) for k, v in N.init_gpt(cfg, 0).items()}
    mesh = P.Mesh.serial()
    loss = torch.compile(N.gpt_loss) if compiled else N.gpt_loss

    def step():
        with torch.autocast(args.device, torch.bfloat16, enabled=args.bf16):
            out = loss(params, ids, targets, cfg, mesh)
        out.backward()
        for p in params.values():
            p.grad = None
    return step


def module_step(model, loss, args, compiled=False):
    model = model.to(args.device)
    run = torch.compile(model) if compiled else model

    def step():
        with torch.autocast(args.device, torch.bfloat16, enabled=args.bf16):
            out = loss(run)
        out.backward()
        model.zero_grad(set_to_none=True)
    return step


def hf_model(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=cfg.padded_vocab, n_positions=cfg.max_seq, n_embd=cfg.hidden,
                                      n_layer=cfg.layers, n_head=cfg.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                      attn_implementation="sdpa"))


def measure(steps: dict, n: int) -> dict:
    """{name: step} -> {name: [seconds of each round]}: one warm-up each, then n rounds of one step each, in turn."""
    times = {name: [] for name in steps}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for step in steps.values():
        step()  # compiled ones compile here
    for _ in range(n):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def run_shape(layers, hidden, seq, batch, vocab, args) -> tuple[N.GPTConfig, dict]:
    cfg = N.GPTConfig(vocab_size=vocab, max_seq=seq, layers=layers, hidden=hidden, heads=hidden // 64,
                      activation="gelu_tanh", attention="sdpa")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
    torch.manual_seed(0)
    steps = {}
    for compiled in (False, True) if args.compile else (False,):
        tag = " compiled" if compiled else ""
        steps["nanomeg" + tag] = nanomeg_step(cfg, ids, targets, args, compiled)
        if args.core:
            steps["nanomeg core" + tag] = nanomeg_step(N.GPTConfig(**{**cfg.__dict__, "attention": "core"}), ids,
                                                       targets, args, compiled)
        if compiled or not args.compile:  # with --compile: the peers compiled only (their best)
            nano = NanoGPT(cfg.padded_vocab, seq, layers, hidden, cfg.heads)
            steps["nanogpt" + tag] = module_step(nano, lambda m: m(ids, targets), args, compiled)
            try:  # labels=ids: it shifts them inside (pads the labels, ignores the last position's logits)
                steps["hf" + tag] = module_step(hf_model(cfg), lambda m: m(ids, labels=ids).loss, args, compiled)
            except ImportError:
                print("(transformers is not installed: no hf peer; pip install transformers)")
    return cfg, measure(steps, args.steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="6x384x128x8x256,4x256x256x8x8192,4x256x128x4x50257",
                    help="comma-separated layers x hidden x seq x batch x vocab")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per implementation and shape (median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--core", action="store_true", help="also nanomeg's core attention path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as train.py --bf16)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd twins (the peers: compiled only)")
    ap.add_argument("--peak-flops", type=float, help="the chip's dense peak FLOP/s: print MFU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, {'bf16' if args.bf16 else 'float32'}, "
          f"median of {args.steps} alternating steps")
    for shape in args.shapes.split(","):
        layers, hidden, seq, batch, vocab = map(int, shape.split("x"))
        cfg, times = run_shape(layers, hidden, seq, batch, vocab, args)
        med = {name: statistics.median(t) for name, t in times.items()}
        me = min((k for k in med if k.startswith("nanomeg") and "core" not in k), key=med.get)  # nanomeg's best
        print(f"{shape} (heads {cfg.heads}, padded vocab {cfg.padded_vocab}):")
        for name, sec in med.items():
            mfu = f"  MFU {N.gpt_flops(cfg, batch, seq) / sec / args.peak_flops:6.1%}" if args.peak_flops else ""
            ratio = ""
            if not name.startswith("nanomeg"):  # the median of the rounds' ratios (the two ran back to back:
                # a slow spell of the machine hits both) and its spread, the rounds' quartiles
                q = statistics.quantiles([a / b for a, b in zip(times[me], times[name])], n=4)
                ratio = f"  {me}/{name} {q[1]:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})"
            print(f"  {name:22s} {sec * 1e3:10.1f} ms {batch * seq / sec:12,.0f} tokens/s{mfu}{ratio}", flush=True)


if __name__ == "__main__":
    main()
