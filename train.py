"""train.py — how it learns. The torchrun entry point.

    torchrun --nproc-per-node 2 train.py          # tp = 2 on CPU (gloo)
    python train.py                               # one process, tp = 1
    python train.py --data notes.txt --steps 500  # your own text

Reads bytes (a 256-id byte-level tokenizer; the default data is the Python
standard library's own source, found from the running interpreter), trains a
GPT cut over `--tp` tensor-parallel ranks (the remaining ranks are data
parallel), logs loss / lr / tokens/s / MFU / communication per step, evaluates
on held-out files and writes a sample at the end.

Follow one token: `batch()` cuts it out of the corpus -> `nanomeg.gpt_loss`
embeds it (`parallel.vocab_parallel_embedding`), runs it through the blocks
(`nanomeg.transformer_block`: `kernels.layer_norm`, column/row-parallel
linears, `kernels.scale_mask_softmax`, `kernels.bias_gelu`) and scores the
next one (`parallel.vocab_parallel_cross_entropy`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

import nanomeg as N
import parallel as P


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train a tensor-parallel GPT on bytes.")
    ap.add_argument("--data", help="a text file or a folder of text files (default: the Python stdlib's source)")
    ap.add_argument("--tp", type=int, help="tensor-parallel size (default: the world size)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per training sequence")
    ap.add_argument("--max-seq", type=int, default=1024, help="rows of the learned position table")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, help="grouped-query attention (default: = heads)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step, per data-parallel rank")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default: lr / 10)")
    ap.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay, on matrices only")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0: off)")
    ap.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--recompute", choices=N.CHOICES["recompute"], default="none")
    ap.add_argument("--norm", choices=N.CHOICES["norm"], default="layernorm")
    ap.add_argument("--activation", choices=N.CHOICES["activation"], default="gelu")
    ap.add_argument("--position", choices=N.CHOICES["position"], default="learned")
    ap.add_argument("--attention", choices=N.CHOICES["attention"], default="core")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast; master weights stay fp32")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--peak-flops", type=float,
                    help="peak FLOP/s of one rank's device for MFU (default: measured with a matmul at start)")
    ap.add_argument("--sample-tokens", type=int, default=200, help="bytes generated at the end (0: none)")
    ap.add_argument("--prompt", default="def ", help="the sample's prompt")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------
# Data: bytes in, one uint8 tensor per split
# ---------------------------------------------------------------------------


def read_text_file(path: Path) -> bytes:
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise UsageError(f"--data {path}: looks binary (a NUL byte at offset {nul}); expected text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data


def load_corpus(path: str | None) -> tuple[list[bytes], str]:
    """The texts to train on: the default stdlib sources or --data's files."""
    if path is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(stdlib.glob("*.py"))
        if not files:
            raise UsageError(f"found no *.py files in the standard library at {stdlib}; pass --data PATH")
        return [f.read_bytes() for f in files], f"{len(files)} files of the Python standard library ({stdlib})"
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--data {path}: no such file or directory")
    if p.is_file():
        texts = [read_text_file(p)]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UsageError(f"--data {path}: the folder holds no files")
        texts = [read_text_file(f) for f in files]
    if sum(map(len, texts)) == 0:
        raise UsageError(f"--data {path}: empty (0 bytes)")
    return texts, f"{len(texts)} file(s) from {path}"


def split_corpus(texts: list[bytes], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every 10th file held out for evaluation (the last 10% of the bytes when
    there are fewer than 10 files). Returns (train, eval) uint8 tensors."""
    if len(texts) >= 10:
        train, held = b"".join(t for i, t in enumerate(texts) if i % 10), b"".join(texts[::10])
    else:
        data = b"".join(texts)
        cut = len(data) - max(len(data) // 10, seq + 1)
        train, held = data[:cut], data[cut:]
    for name, part in (("training", train), ("held-out", held)):
        if len(part) < seq + 1:
            raise UsageError(f"--data: {len(b''.join(texts))} bytes leave {len(part)} {name} bytes, too few for "
                             f"--seq {seq} (need at least {seq + 1} in each split)")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return as_tensor(train), as_tensor(held)


def batch(data: torch.Tensor, batch_size: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows: ids [b, seq] and next-byte targets [b, seq].
    The same seed gives the same batch on every tensor-parallel rank."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, len(data) - seq, (batch_size,), generator=gen)
    window = torch.stack([data[i: i + seq + 1] for i in start.tolist()]).long()
    return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------
# Setup, the training loop, evaluation, the sample
# ---------------------------------------------------------------------------


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --steps."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step <= args.warmup:
        return args.lr * step / max(args.warmup, 1)
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def check_args(args, world: int) -> tuple[N.GPTConfig, int]:
    """All validation, before any process group exists: every rank raises the
    same UsageError, so no rank is left waiting."""
    tp = world if args.tp is None else args.tp
    if tp < 1 or world % tp:
        raise UsageError(f"--tp {tp} does not divide the world size {world} (data parallel fills the rest)")
    for name in ("seq", "layers", "hidden", "heads", "batch", "steps", "log_every", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    for name in ("warmup", "min_lr", "weight_decay", "grad_clip", "sample_tokens"):
        if (getattr(args, name) or 0) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    try:
        cfg = N.GPTConfig(vocab_size=256, max_seq=args.max_seq, layers=args.layers, hidden=args.hidden,
                          heads=args.heads, kv_heads=args.kv_heads, norm=args.norm, activation=args.activation,
                          position=args.position, attention=args.attention, recompute=args.recompute,
                          hidden_dropout=args.dropout, attention_dropout=args.dropout,
                          sequence_parallel=args.sequence_parallel and tp > 1, vocab_multiple=128 * tp)
        cfg.check_mesh(P.Mesh(tp=tp))
        cfg.check_seq(args.seq, P.Mesh(tp=tp))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg, tp


def evaluate(params, data, cfg, mesh, args, device) -> float:
    """Mean loss over --eval-batches fixed held-out batches (no dropout)."""
    losses = []
    with torch.no_grad(), autocast(args):
        for i in range(args.eval_batches):
            x, y = batch(data, args.batch, args.seq, seed=10_000_019 + i)
            x, y = x.to(device), y.to(device)
            losses.append(N.gpt_loss(params, x, y, cfg, mesh, training=False).float())
    return torch.stack(losses).mean().item()


def autocast(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)


def measure_peak_flops(args, device) -> float:
    """FLOP/s of a large matmul in the run's dtype on this rank's device: the
    achievable peak that MFU is reported against when --peak-flops is not given."""
    n = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def make_optimizer(params: dict, args) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


class Progress:
    """A one-line progress bar on rank 0's terminal (nothing when not a tty)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()

    def update(self, step: int, loss: float) -> None:
        if self.enabled:
            filled = 30 * step // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total} loss {loss:.3f} ")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 70 + "\r")


def train(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, tp = check_args(args, world)
    texts, source = load_corpus(args.data)
    train_data, eval_data = split_corpus(texts, args.seq)

    rank, world = P.init_distributed()  # nccl and one GPU per rank when CUDA is there, else gloo on CPU
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    torch.manual_seed(args.seed)
    mesh = P.Mesh.build(tp=tp)
    say = print if rank == 0 else (lambda *a, **k: None)
    specs = N.gpt_specs(cfg)
    params = {k: v.to(device).requires_grad_(True)
              for k, v in P.shard(N.init_gpt(cfg, args.seed), specs, mesh).items()}
    opt = make_optimizer(params, args)
    n_params = sum(math.prod(shape) for shape, _ in N.gpt_shapes(cfg).values())
    tokens_per_step = args.batch * args.seq * mesh.dp
    flops_per_step = N.gpt_flops(cfg, args.batch * mesh.dp, args.seq)
    say(f"data: {source}: {len(train_data):,} training bytes, {len(eval_data):,} held out")
    say(f"model: GPT {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, {n_params / 1e6:.2f}M parameters "
        f"(vocab 256 padded to {cfg.padded_vocab}); mesh tp={mesh.tp} dp={mesh.dp}"
        f"{', sequence parallel' if cfg.sequence_parallel else ''}{', bf16' if args.bf16 else ''}")
    peak = args.peak_flops or measure_peak_flops(args, device)
    say(f"MFU is against {peak / 1e9:,.1f} GFLOP/s per rank ("
        f"{'--peak-flops' if args.peak_flops else 'measured: a matmul on this device, all ranks at once'})")
    say(f"eval loss at step 0: {evaluate(params, eval_data, cfg, mesh, args, device):.4f}")

    bar = Progress(args.steps, rank == 0)
    t_last, steps_since = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = batch(train_data, args.batch, args.seq, seed=args.seed * 1_000_003 + step * 7919 + mesh.dp_rank)
        x, y = x.to(device), y.to(device)
        with P.count_comms() as comms:
            with autocast(args):
                loss = N.gpt_loss(params, x, y, cfg, mesh, seed=args.seed + step, training=True)
            loss.backward()
            P.all_reduce_grads_dp(params, mesh)
            grad_norm = P.clip_grad_norm(params, specs, mesh, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = (P.all_reduce(loss.detach().float(), mesh, "dp") / mesh.dp).item()
        if not math.isfinite(loss_value):
            bar.clear()
            raise UsageError(f"loss is {loss_value} at step {step}: stopping (try a lower --lr, now {args.lr})")
        steps_since += 1
        bar.update(step, loss_value)
        if step % args.log_every == 0 or step == args.steps:
            dt = (time.perf_counter() - t_last) / steps_since
            t_last, steps_since = time.perf_counter(), 0
            flops = flops_per_step / dt
            bar.clear()
            say(f"step {step:5d} | loss {loss_value:.4f} | lr {lr_at(step, args):.2e} | grad norm "
                f"{grad_norm.item():.3f} | {tokens_per_step / dt:,.0f} tok/s | {flops / 1e9:.2f} GFLOP/s | "
                f"MFU {flops / (world * peak):.1%} | comm {sum(c['elements'] for c in comms):,} el/step")
        if step % args.eval_every == 0 or step == args.steps:
            bar.clear()
            say(f"eval loss at step {step}: {evaluate(params, eval_data, cfg, mesh, args, device):.4f}")

    if args.sample_tokens > 0:
        prompt = torch.tensor([list(args.prompt.encode() or b"\n")], device=device)
        n = min(args.sample_tokens, args.seq - prompt.shape[1])  # positions beyond --seq were never trained
        out = N.generate({k: v.detach() for k, v in params.items()}, prompt, cfg, mesh, n,
                         temperature=0.8, top_k=40, seed=args.seed)
        say("sample:\n" + bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except UsageError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        else:  # every rank stops; let rank 0 be the first, so torchrun's
            time.sleep(2)  # first signal to the others never cuts its message
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
