"""train.py — how it learns. The torchrun entry point.

    torchrun --nproc-per-node 2 train.py          # tp = 2 on CPU (gloo)
    python train.py                               # one process, tp = 1
    python train.py --data notes.txt --steps 500  # your own text
    torchrun --nproc-per-node 2 train.py --show-layout  # what each rank holds and moves; no training
    torchrun --nproc-per-node 2 train.py --model bert   # masked-LM + next-sentence pretraining
    torchrun --nproc-per-node 2 train.py --model t5     # span-corruption pretraining of an encoder-decoder

Reads bytes (a 256-id byte-level tokenizer; the default data is the Python
standard library's own source, found from the running interpreter), trains a
GPT (or, with --model bert / t5, a BERT or a T5: a task per model in TASKS)
cut over `--tp` tensor-parallel ranks (the remaining ranks are data parallel), logs loss / lr /
tokens/s / MFU / communication per step, evaluates on held-out files and ends
with a sample (GPT), a fill-in of held-out text (BERT) or of its dropped spans (T5).

Follow one token: `batch()` cuts it out of the corpus at a window drawn from
`batch_seed()` (one stream per data-parallel replica) -> `train_step()` ->
`nanomeg.gpt_loss` embeds it (`parallel.vocab_parallel_embedding`), runs it
through the blocks (`nanomeg.transformer_block`: `kernels.layer_norm`,
column/row-parallel linears, `kernels.scale_mask_softmax`, `kernels.bias_gelu`)
and scores the next one (`parallel.vocab_parallel_cross_entropy`); its gradient
is averaged over data parallel, clipped with the others, and AdamW steps.

Bad input is one line `error: ...` on stderr and exit code 2, on every rank,
before any process group exists: `check_args` (every flag's range, the model
config), `check_memory` (what the model and one step need) and `load_corpus`
raise `UsageError`, and so does the argument parser itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch

import cost as C
import kernels
import nanomeg as N
import parallel as P
import plan as PL
import runlog


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2.
    Said by rank 0 (every rank raises the same), or by every rank that
    raises it when `every_rank` (what only this rank could see)."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but its errors (an unknown flag, a value that is not a number)
    are a UsageError like every other: one line, exit 2, said once by rank 0."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(description="Train a tensor-parallel GPT (or BERT, or T5) on bytes.")
    ap.add_argument("--model", choices=tuple(TASKS), default="gpt",
                    help="gpt: next-byte prediction; bert: masked-LM + next-sentence pretraining; t5: span "
                         "corruption (an encoder-decoder restores the dropped spans); biencoder: ICT retrieval "
                         "pretraining (a line finds its block); realm: retrieve-and-read masked lines")
    ap.add_argument("--data", help="a text file or a folder of text files (default: the Python stdlib's source)")
    ap.add_argument("--tp", type=int, help="tensor-parallel size (default: the world size / (--pp x --cp x --ep))")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (gpt, bert); data parallel fills "
                                                      "what tp x pp leave of the world")
    ap.add_argument("--virtual-stages", type=int, default=1,
                    help="model chunks per pipeline rank (interleaved 1F1B; > 1 needs --pp > 1)")
    ap.add_argument("--microbatches", type=int, default=1,
                    help="microbatches per step; --batch is cut into them (gradient accumulation; the pipeline's m)")
    ap.add_argument("--schedule", choices=("afab", "1f1b", "interleaved", "zb"),
                    help="pipeline schedule: all-forward-all-backward (GPipe), 1F1B, interleaved 1F1B, zero-bubble "
                         "ZB-H1 (default: 1f1b, interleaved with --virtual-stages > 1)")
    ap.add_argument("--zero", type=int, choices=(0, 1), default=0,
                    help="1: ZeRO-1, AdamW's state and fp32 main weights sharded over data parallel")
    ap.add_argument("--bucket-mb", type=float, default=25.0,
                    help="gradient bucket size: each bucket is reduced over data parallel as soon as it is full, "
                         "during the backward")
    ap.add_argument("--show-schedule", action="store_true",
                    help="print the pipeline schedule's timeline per rank and its bubble, then exit (no processes "
                         "needed)")
    ap.add_argument("--cp", type=int, default=1,
                    help="gpt only: context-parallel ranks, each holding 1/cp of every sequence (ring attention; "
                         "--seq must divide into 2 x cp chunks)")
    ap.add_argument("--experts", type=int, default=0,
                    help="gpt only: mixture-of-experts MLPs of E experts each (0: dense; see --topk, --ep)")
    ap.add_argument("--topk", type=int, default=None, help="MoE: experts per token (1: Switch, 2: Mixtral; default 1)")
    ap.add_argument("--ep", type=int, default=1,
                    help="MoE: expert-parallel ranks, carved out of data parallel (each holds experts/ep experts)")
    ap.add_argument("--moe-every", type=int, default=None, help="MoE: layer i has experts when i %% N == 0 (default 1)")
    ap.add_argument("--capacity-factor", type=float, default=None,
                    help="MoE: each expert takes at most ceil(c x seq x topk / experts) of a sequence's choices, the "
                         "rest skip the layer (default: dropless)")
    ap.add_argument("--aux-loss", type=float, default=None,
                    help="MoE: weight of the load-balancing loss (default 0.01)")
    ap.add_argument("--z-loss", type=float, default=None, help="MoE: weight of the router z-loss (default 0)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per training sequence")
    ap.add_argument("--max-seq", type=int, help="rows of the learned position table (default: 1024, or --seq if longer)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, help="grouped-query attention (default: = heads)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step, per data-parallel rank")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 for gpt, 1e-3 for bert, whose "
                                             "post-norm stack learns slower at 3e-3, and t5)")
    ap.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default: lr / 10)")
    ap.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay, on matrices only")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0: off)")
    ap.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--recompute", choices=N.CHOICES["recompute"], default="none")
    ap.add_argument("--norm", choices=N.CHOICES["norm"], default="layernorm")
    ap.add_argument("--norm-order", choices=N.CHOICES["norm_order"],
                    help="pre: x + f(norm(x)) (GPT's and Megatron BERT's); post: norm(x + f(x)) (the original BERT's); "
                         "default: the model's (gpt pre, bert post)")
    ap.add_argument("--activation", choices=N.CHOICES["activation"], default="gelu")
    ap.add_argument("--position", choices=N.CHOICES["position"],
                    help="default: learned for gpt; rope for bert, whose byte-level masked LM with learned "
                         "positions sits at the unigram entropy (~3.1 nats) for hundreds of steps")
    ap.add_argument("--attention", choices=N.CHOICES["attention"], default="core")
    ap.add_argument("--seed", type=int, default=1234, help="in [0, 2**31)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 parameters and activations; gradients accumulated and reduced over data parallel "
                         "in fp32 (Megatron's main_grad); the optimizer keeps an fp32 main copy")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each pipeline stage's forward in training (and, through it, its backward); "
                         "GPT and BERT; schedule, transfers, optimizer and evaluation stay eager")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--peak-flops", type=float,
                    help="peak FLOP/s of one rank's device for MFU (default: measured with a matmul at start)")
    ap.add_argument("--sample-tokens", type=int,
                    help="gpt only: bytes generated at the end (default: as many as fit in --seq after the prompt; "
                         "0: none)")
    ap.add_argument("--prompt",
                    help="gpt only: the sample's prompt (its raw bytes; shorter than --seq; default 'def ')")
    ap.add_argument("--towers", choices=("separate", "shared"), default="separate",
                    help="biencoder / realm only: a query and a context tower, or one shared (default separate, as "
                         "Megatron's ICT)")
    ap.add_argument("--top-k", type=int, help="realm only: blocks retrieved per query (default 4)")
    ap.add_argument("--index-every", type=int, help="realm only: steps between index refreshes (default 50)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds a collective or a pipeline transfer may wait (the process groups' timeout); "
                         "then every rank that can says where it is (step, action, what it waits in) and the job "
                         "exits non-zero (default 600)")
    ap.add_argument("--save", metavar="DIR", help="save checkpoints into DIR (at the end, every --save-every "
                                                  "steps, and on SIGTERM / SIGINT)")
    ap.add_argument("--save-every", type=int, help="steps between checkpoints (with --save; default: only the last)")
    ap.add_argument("--keep-last", type=int, help="keep the checkpoint just saved and the K-1 before it in --save's "
                                                  "DIR (default: all)")
    ap.add_argument("--load", metavar="DIR",
                    help="resume from DIR's newest complete checkpoint (or DIR/step-N), at any --tp / --pp / data "
                         "parallel / --zero (the load reshards); a DIR without one starts fresh")
    ap.add_argument("--export-hf", metavar="OUT",
                    help="at the end, write the model in Hugging Face's format (config.json + model.safetensors) "
                         "into OUT: gpt as GPT2LMHeadModel, bert as (Megatron)BertForPreTraining")
    ap.add_argument("--init-hf", metavar="DIR",
                    help="start from a Hugging Face model folder (config.json + model.safetensors; gpt: GPT-2, "
                         "bert: BERT / MegatronBERT); its config replaces --layers/--hidden/--heads/...")
    ap.add_argument("--tokenizer", metavar="FILE",
                    help="gpt only: a Hugging Face tokenizer.json (read with the `tokenizers` library) instead of "
                         "bytes")
    ap.add_argument("--show-layout", action="store_true",
                    help="print every rank's mesh coordinates, parameter shards, memory and the collectives of "
                         "one training step (run on a copy of the parameters), then exit without training")
    ap.add_argument("--log-dir", metavar="DIR",
                    help="rank 0 writes DIR/run.json (config, layout, flags, versions), DIR/metrics.jsonl (a record "
                         "per log step and eval) and TensorBoard events under DIR/tb (with the tensorboard package); "
                         "--load appends to DIR's log, marking the resume")
    ap.add_argument("--trace-step", type=int, metavar="N",
                    help="with --log-dir and --pp > 1: write DIR/schedule.json and DIR/trace.json (Chrome / Perfetto) "
                         "of step N as it ran, every rank's actions (default: the run's second step)")
    ap.add_argument("--plot", nargs="+", metavar="DIR",
                    help="draw the --log-dir folders' curves, overlaid, into the first DIR's run.png, then exit "
                         "(matplotlib)")
    plan = ap.add_argument_group("--plan: a layout at scale, planned without processes (cost.py, plan.py)")
    plan.add_argument("--plan", action="store_true",
                      help="print what one rank of the layout holds, sends and waits for on the cluster, each "
                           "stage's memory, the schedule and the predicted step time, then exit (bf16, no processes)")
    plan.add_argument("--plan-search", action="store_true",
                      help="rank every layout of --gpus by predicted step time: the best ten and why the best "
                           "rejected ones fail")
    plan.add_argument("--plan-rank", type=int, help="the rank --plan pictures (default 0: the first stage's)")
    plan.add_argument("--preset", help=f"a model: {', '.join(C.MODELS)} (its shape and --seq replace --layers, "
                                       "--hidden, --heads, ...)")
    plan.add_argument("--gpus", type=int, help="GPUs of the job (default tp x cp x pp x ep: dp = ep)")
    plan.add_argument("--cluster", default="a100-80gb", help=f"the nodes: {', '.join(C.CLUSTERS)}")
    plan.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the cluster's, 8)")
    plan.add_argument("--gpu-memory", type=float, help="memory per GPU in GiB (default: the cluster's, 80)")
    plan.add_argument("--nvlink", type=float, help="GB/s per GPU and direction inside a node (default: the cluster's)")
    plan.add_argument("--ib", type=float, help="GB/s per GPU and direction between nodes (default: the cluster's)")
    plan.add_argument("--global-batch", type=int,
                      help="sequences per step over all replicas (default dp x --micro-batch x --microbatches)")
    plan.add_argument("--micro-batch", type=int, default=1, help="sequences per microbatch (default 1)")
    args = ap.parse_args(argv)
    task = TASKS[args.model]  # the defaults that depend on the model
    args.lr = task.lr if args.lr is None else args.lr
    args.position = task.position if args.position is None else args.position
    args.schedule = args.schedule or ("interleaved" if args.virtual_stages > 1 else "1f1b")
    args.tokenizer_obj = args.load_path = args.load_meta = args.log_old = args.log = None  # filled by check_args
    if args.model == "realm":
        args.top_k = 4 if args.top_k is None else args.top_k
        args.index_every = 50 if args.index_every is None else args.index_every
    return args


# ---------------------------------------------------------------------------
# Data: bytes in, one uint8 tensor per split
# ---------------------------------------------------------------------------


def printable(text: str) -> str:
    """text safe to print: a path that is not UTF-8 reaches Python with lone
    surrogates (surrogateescape), which print() would refuse to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def read_bytes(path: Path, what: str = "--data") -> bytes:
    """path's bytes; an OS error (no permission, a folder, a vanished file) is
    a UsageError naming the path and the reason."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def read_text_file(path: Path) -> bytes:
    """A --data file's bytes, refused unless it is UTF-8 text."""
    data = read_bytes(path)
    nul = data.find(b"\0")
    if nul >= 0:
        raise UsageError(f"--data {path}: looks binary (a NUL byte at offset {nul}); expected text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data


def data_files(folder: Path) -> list[Path]:
    """The regular files under folder, sorted, skipping hidden ones: any name
    starting with '.' below folder, files and folders (.git, .venv) alike."""
    def fail(e: OSError):
        raise UsageError(f"--data {folder}: cannot list {e.filename} ({e.strerror})")

    files = []
    for root, dirs, names in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # os.walk does not descend into what is removed
        files += [Path(root, n) for n in names if not n.startswith(".")]
    return sorted(f for f in files if f.is_file())


def load_corpus(path: str | None) -> tuple[list[bytes], str]:
    """The texts to train on: the default stdlib sources or --data's files."""
    if path is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(stdlib.glob("*.py"))
        if not files:
            raise UsageError(f"found no *.py files in the standard library at {stdlib}; pass --data PATH")
        texts = [read_bytes(f, "the standard library's") for f in files]
        return texts, f"{len(files)} files of the Python standard library ({printable(str(stdlib))})"
    if path == "":
        raise UsageError("--data is an empty path: give a text file or a folder of text files")
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"--data {path}: no such file or directory") from None
    except OSError as e:
        raise UsageError(f"--data {path}: cannot use it ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        texts = [read_text_file(p)]
    elif stat.S_ISDIR(mode):
        files = data_files(p)
        if not files:
            raise UsageError(f"--data {path}: the folder holds no files (hidden ones are skipped)")
        texts = [read_text_file(f) for f in files]
    else:  # a FIFO would block the read forever, /dev/zero never end it
        raise UsageError(f"--data {path}: not a regular file or folder (a pipe, a socket or a device)")
    if sum(map(len, texts)) == 0:
        raise UsageError(f"--data {path}: empty (0 bytes)")
    return texts, printable(f"{len(texts)} file(s) from {path}")


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


def tokenize(args, data: torch.Tensor) -> torch.Tensor:
    """A split's bytes (UTF-8) as --tokenizer's ids [n] (int64)."""
    ids = args.tokenizer_obj.encode(bytes(data.tolist()).decode("utf-8", errors="replace")).ids
    if len(ids) < args.seq + 1:
        raise UsageError(f"--tokenizer {args.tokenizer}: a data split is {len(ids)} tokens, too few for --seq "
                         f"{args.seq}")
    return torch.tensor(ids, dtype=torch.int64)


def batch(data: torch.Tensor, batch_size: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows: ids [b, seq] and next-byte targets [b, seq].
    The same seed gives the same batch on every tensor-parallel rank."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, len(data) - seq, (batch_size,), generator=gen)
    window = torch.stack([data[i: i + seq + 1] for i in start.tolist()]).long()
    return window[:, :-1], window[:, 1:]


def batch_seed(args, step: int, mesh: P.Mesh) -> int:
    """The seed of this rank's training batch at step. Every tp rank of one
    replica gets the same (they must see the same tokens: no tp_rank in it);
    each dp replica (dp_rank < 7919) and each step gets its own. Kept in
    [0, 2**63), which torch.Generator.manual_seed takes, for any --seed and --steps."""
    return (args.seed * 1_000_003 + step * 7919 + mesh.dp_rank) % 2**63


# BERT's ids: the 256 bytes, then four special tokens.
CLS, SEP, MASK, PAD = 256, 257, 258, 259


def bert_batch(data: torch.Tensor, batch_size: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """batch_size sentence pairs for masked-LM + next-sentence pretraining,
    each [CLS] A [SEP] B [SEP] [PAD]... of --seq ids (A, B: byte runs):
    * B follows A in the corpus (nsp_label 0) or starts anywhere (1), 50/50;
    * 10% of the pairs are shorter than --seq, so batches hold padding
      (Megatron's short_seq_prob);
    * 15% of A's and B's bytes (at least one) are chosen for prediction:
      80% become [MASK], 10% a random byte, 10% stay (BERT's 80/10/10).
    Returns ids, token_types (0 for A, 1 for B), attention_mask (1 = real),
    mlm_targets (the original ids), mlm_mask (1 = chosen), all [b, seq],
    and nsp_labels [b]. The same seed gives the same batch on every tp rank."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=gen)
    pick = lambda lo, hi: int(torch.randint(lo, hi, (), generator=gen))  # in [lo, hi)
    ids = torch.full((batch_size, seq), PAD, dtype=torch.long)
    types = torch.zeros(batch_size, seq, dtype=torch.long)
    nsp = (rand(batch_size) < 0.5).long()
    for i in range(batch_size):
        n = seq - 3 if rand(1).item() >= 0.1 else pick(2, seq - 2)  # bytes of A + B
        la = pick(1, n)
        a = pick(0, len(data) - n)
        b = pick(0, len(data) - (n - la)) if nsp[i] else a + la
        pair = [CLS, *data[a: a + la].tolist(), SEP, *data[b: b + n - la].tolist(), SEP]
        ids[i, : len(pair)] = torch.tensor(pair)
        types[i, la + 2: len(pair)] = 1
    real = ids != PAD
    text = real & (ids < CLS)  # the bytes of A and B
    chosen = text & (rand(batch_size, seq) < 0.15)
    chosen[~chosen.any(-1), 1] = True  # a pair with nothing chosen gets its first byte
    roll = rand(batch_size, seq)
    inputs = torch.where(chosen & (roll < 0.8), MASK, ids)
    random_bytes = torch.randint(0, 256, (batch_size, seq), generator=gen)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_bytes, inputs)
    return dict(ids=inputs, token_types=types, attention_mask=real.long(), mlm_targets=ids,
                mlm_mask=chosen.float(), nsp_labels=nsp)


# T5's ids: the 256 bytes, then end-of-sequence, padding (also the decoder's
# start token, as in Hugging Face's T5), and the sentinels <0>, <1>, ... that
# stand for the dropped spans.
EOS, T5_PAD, SENTINEL, SENTINELS = 256, 257, 258, 64


def corrupted_lengths(raw: int) -> tuple[int, int]:
    """(noise tokens, spans) of T5's span corruption of `raw` bytes: 15% of
    them (at least 1) dropped, in spans of mean length 3 (at least 1 span)."""
    noise = max(1, round(0.15 * raw))
    return noise, max(1, min(round(noise / 3), raw - noise, SENTINELS))


def t5_dec_seq(seq: int, tp: int) -> int:
    """The decoder length for encoder inputs of `seq` ids: the longest target
    ([sentinel, span] per span, then EOS) of a window of seq - 1 bytes,
    rounded up to a multiple of tp (sequence parallel splits it too)."""
    noise, spans = corrupted_lengths(seq - 1)
    return -(-(noise + spans + 1) // tp) * tp


def segments(total: int, parts: int, gen) -> list[int]:
    """total split into `parts` positive lengths at random cut points."""
    cuts = (torch.randperm(total - 1, generator=gen)[: parts - 1] + 1).sort().values.tolist()
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def span_corrupt(raw: list[int], gen) -> tuple[list[int], list[int]]:
    """T5's span corruption of one byte window -> (encoder input, target):
    the bytes cut into alternating kept / dropped runs (kept first); the
    input keeps the kept runs, each dropped run replaced by the next
    sentinel; the target lists each sentinel with the run it hides, then EOS.
    'The quick brown fox' -> 'The <0> brown<1>x' EOS, '<0>quick<1> fo' EOS."""
    noise, spans = corrupted_lengths(len(raw))
    kept, dropped = segments(len(raw) - noise, spans, gen), segments(noise, spans, gen)
    inputs, targets, at = [], [], 0
    for k, (keep, drop) in enumerate(zip(kept, dropped)):
        inputs += [*raw[at: at + keep], SENTINEL + k]
        targets += [SENTINEL + k, *raw[at + keep: at + keep + drop]]
        at += keep + drop
    return inputs + [EOS], targets + [EOS]


def t5_batch(data: torch.Tensor, batch_size: int, seq: int, dec_seq: int, seed: int) -> dict[str, torch.Tensor]:
    """batch_size span-corrupted byte windows: seq - 1 bytes each (10% of
    them shorter, so both sides hold padding). Returns enc_ids [b, seq] and
    enc_padding (1 = real); the decoder's input dec_ids [b, dec_seq] (the
    start token, then the target shifted right), dec_padding, the targets and
    loss_mask (1 at real targets). The same seed gives the same batch on
    every tp rank."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi, (), generator=gen))  # in [lo, hi)
    enc = torch.full((batch_size, seq), T5_PAD, dtype=torch.long)
    dec = torch.full((batch_size, dec_seq), T5_PAD, dtype=torch.long)
    targets = torch.full((batch_size, dec_seq), T5_PAD, dtype=torch.long)
    for i in range(batch_size):
        n = seq - 1 if torch.rand((), generator=gen) >= 0.1 else pick(4, seq)
        start = pick(0, len(data) - n)
        inputs, target = span_corrupt(data[start: start + n].tolist(), gen)
        enc[i, : len(inputs)] = torch.tensor(inputs)
        targets[i, : len(target)] = torch.tensor(target)
        dec[i, 1: len(target)] = torch.tensor(target[:-1])
    real = targets != T5_PAD
    return dict(enc_ids=enc, enc_padding=(enc != T5_PAD).long(), dec_ids=dec, dec_padding=real.long(),
                targets=targets, loss_mask=real.float())


# Retrieval data (--model biencoder, realm): blocks of a few lines, BERT's ids.


def line_starts(data: torch.Tensor) -> torch.Tensor:
    """The offset of every line of the corpus (after each newline, and 0)."""
    return torch.cat([torch.zeros(1, dtype=torch.long), (data == 10).nonzero().flatten() + 1])


def check_lines(train_data: torch.Tensor, eval_data: torch.Tensor, args) -> None:
    """UsageError unless each split holds whole lines to draw blocks from (a
    block is the lines from a random one on; a split without a newline has none)."""
    for name, data in (("training", train_data), ("held-out", eval_data)):
        if int((data == 10).sum()) < 1:
            raise UsageError(f"--data: the {name} split has no newline, so no lines: --model {args.model} draws "
                             "blocks of lines (give text with many lines)")


def query_len(seq: int) -> int:
    """Query ids: half a block's (a line, with [CLS] and [SEP])."""
    return max(seq // 2, 4)


def draw_block(data: torch.Tensor, starts: torch.Tensor, seq: int, gen) -> list[list[int]]:
    """A block: the lines from a random one on, as many as fit in seq - 2
    bytes ([CLS] and [SEP] around them); a line longer than that is cut."""
    i = int(torch.randint(0, len(starts) - 1, (), generator=gen))
    lines, room = [], seq - 2
    while i + 1 < len(starts) and room > 0:
        line = data[starts[i]: starts[i + 1]].tolist()[:room]
        lines.append(line)
        room -= len(line)
        i += 1
    return lines


def pick_query_line(lines: list[list[int]], gen) -> int:
    """A line with at least 8 bytes that are not white space (any line if none has)."""
    good = [j for j, line in enumerate(lines) if sum(b not in b" \t\n" for b in line) >= 8] or list(range(len(lines)))
    return good[int(torch.randint(0, len(good), (), generator=gen))]


def padded(rows: list[list[int]], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] row [SEP] for each row, padded to seq -> (ids [n, seq], mask [n, seq])."""
    ids = torch.full((len(rows), seq), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        full = [CLS, *row[: seq - 2], SEP]
        ids[i, : len(full)] = torch.tensor(full)
    return ids, (ids != PAD).long()


def ict_batch(data: torch.Tensor, starts: torch.Tensor, batch_size: int, seq: int, seed: int) -> dict:
    """The Inverse Cloze Task (Lee et al. 2019, Megatron's ICT): a block of
    lines and one of its lines as the query; the line is taken out of its
    block 90% of the time (so the match is not mere copying) and left in 10%.
    Returns query_ids / query_mask [b, query_len(seq)] and context_ids /
    context_mask [b, seq]; context i is query i's positive."""
    gen = torch.Generator().manual_seed(seed)
    queries, contexts = [], []
    for _ in range(batch_size):
        lines = draw_block(data, starts, seq, gen)
        j = pick_query_line(lines, gen)
        queries.append(list(bytes(lines[j]).strip()))  # the line without its indentation
        keep = torch.rand((), generator=gen) < 0.1 or len(lines) == 1  # a block is never left empty
        contexts.append([b for k, line in enumerate(lines) if keep or k != j for b in line])
    q, qm = padded(queries, query_len(seq))
    c, cm = padded(contexts, seq)
    return dict(query_ids=q, query_mask=qm, context_ids=c, context_mask=cm)


def show(ids: torch.Tensor) -> str:
    """BERT ids as one line of text: bytes (U+FFFD where not UTF-8), specials as [MASK] etc., newlines as ⏎."""
    names = {CLS: "", SEP: "", PAD: "", MASK: "_"}
    out, run = [], []
    for t in ids.tolist():
        if t < 256:
            run.append(t)
            continue
        out += [bytes(run).decode("utf-8", errors="replace"), names[t]]
        run = []
    return ("".join(out) + bytes(run).decode("utf-8", errors="replace")).replace("\n", "⏎").strip()


# ---------------------------------------------------------------------------
# Tasks: what a model contributes to the one training loop
# ---------------------------------------------------------------------------


class GPTTask:
    """Next-byte prediction with nanomeg's GPT: a batch is ids and targets."""

    name, vocab, position, lr = "GPT", 256, "learned", 3e-3
    shapes, init, specs, flops = N.gpt_shapes, N.init_gpt, N.gpt_specs, N.gpt_flops

    @staticmethod
    def config(args, **common) -> N.GPTConfig:
        return N.GPTConfig(vocab_size=256, **common)

    @staticmethod
    def batch(data, args, seed) -> dict[str, torch.Tensor]:
        ids, targets = batch(data, args.batch, args.seq, seed)
        return dict(ids=ids, targets=targets)

    @staticmethod
    def loss(params, inputs, cfg, mesh, *, seed, training) -> dict[str, torch.Tensor]:
        return dict(loss=N.gpt_loss(params, inputs["ids"], inputs["targets"], cfg, mesh, seed=seed,
                                    training=training))


class BertTask:
    """Masked-LM + next-sentence pretraining with nanomeg's BERT: a batch is
    `bert_batch`'s sentence pairs; the loss is MLM + NSP."""

    name, vocab, position, lr = "BERT", PAD + 1, "rope", 1e-3
    shapes, init, specs, flops = N.bert_shapes, N.init_bert, N.bert_specs, N.bert_flops

    @staticmethod
    def config(args, **common) -> N.BertConfig:
        return N.BertConfig(vocab_size=PAD + 1, **common)

    @staticmethod
    def batch(data, args, seed) -> dict[str, torch.Tensor]:
        return bert_batch(data, args.batch, args.seq, seed)

    @staticmethod
    def loss(params, inputs, cfg, mesh, *, seed, training) -> dict[str, torch.Tensor]:
        return N.bert_loss_and_metrics(params, inputs["ids"], cfg, mesh, mlm_targets=inputs["mlm_targets"],
                                       mlm_mask=inputs["mlm_mask"], nsp_labels=inputs["nsp_labels"],
                                       token_types=inputs["token_types"], attention_mask=inputs["attention_mask"],
                                       seed=seed, training=training)


class T5Task:
    """Span-corruption pretraining with nanomeg's T5 (Megatron's by default:
    learned positions, LayerNorm, GeLU, biases): a batch is `t5_batch`'s
    corrupted windows; the loss is the decoder's cross-entropy on the spans."""

    name, vocab, position, lr = "T5", SENTINEL + SENTINELS, "learned", 1e-3
    shapes, init, specs = N.t5_shapes, N.init_t5, N.t5_specs

    @staticmethod
    def config(args, **common) -> N.T5Config:
        return N.T5Config(vocab_size=SENTINEL + SENTINELS, **common)

    @staticmethod
    def flops(cfg, batch_size, seq) -> float:
        return N.t5_flops(cfg, batch_size, seq, t5_dec_seq(seq, 1))

    @staticmethod
    def batch(data, args, seed) -> dict[str, torch.Tensor]:
        return t5_batch(data, args.batch, args.seq, args.dec_seq, seed)

    @staticmethod
    def loss(params, inputs, cfg, mesh, *, seed, training) -> dict[str, torch.Tensor]:
        return dict(loss=N.t5_loss(params, inputs["enc_ids"], inputs["dec_ids"], inputs["targets"], cfg, mesh,
                                   loss_mask=inputs["loss_mask"], enc_padding=inputs["enc_padding"],
                                   dec_padding=inputs["dec_padding"], seed=seed, training=training))


def tower_flops(cfg, batch_size: int, seq: int) -> float:
    """FLOPs of one retriever tower's forward + backward on batch_size texts of seq ids: a BERT
    encoder and its pooled head, no vocabulary (`nanomeg.bert_flops` of a classifier)."""
    sizes = {f: getattr(cfg, f) for f in ("layers", "hidden", "heads", "kv_heads", "ffn")}
    return N.bert_flops(N.BertConfig(**sizes, task="classify", vocab_size=1), batch_size, seq)


class BiEncoderTask:
    """ICT pretraining of a bi-encoder (two BERT towers, or one shared):
    a batch is `ict_batch`'s queries and blocks; the loss is the in-batch
    retrieval loss against every replica's blocks. Eval also builds an index
    of held-out blocks and reports retrieval accuracy@1/5/20 of their queries."""

    name, vocab, position, lr = "bi-encoder", PAD + 1, "rope", 1e-3
    shapes, init, specs = N.biencoder_shapes, N.init_biencoder, N.biencoder_specs
    eval_blocks = 256  # held-out blocks in the eval index (rounded to a multiple of dp)

    @staticmethod
    def config(args, **common) -> N.BiEncoderConfig:
        return N.BiEncoderConfig(vocab_size=PAD + 1, shared=args.towers == "shared", **common)

    @staticmethod
    def flops(cfg, batch_size, seq) -> float:
        return tower_flops(cfg, batch_size, seq) + tower_flops(cfg, batch_size, query_len(seq))

    @staticmethod
    def batch(data, args, seed) -> dict[str, torch.Tensor]:
        return ict_batch(data, starts_of(data), args.batch, args.seq, seed)

    @staticmethod
    def loss(params, inputs, cfg, mesh, *, seed, training) -> dict[str, torch.Tensor]:
        return N.biencoder_loss(params, inputs, cfg, mesh, seed=seed, training=training)

    @staticmethod
    def eval_set(data, args, dp: int) -> dict[str, torch.Tensor]:
        """The fixed held-out blocks and their queries (query i's block is block i)."""
        n = -(-BiEncoderTask.eval_blocks // dp) * dp
        return ict_batch(data, starts_of(data), n, args.seq, seed=20_000_003)

    @staticmethod
    @torch.no_grad()
    def index_eval(params, data, cfg, mesh, args, device) -> tuple[dict[str, float], dict]:
        """Index the held-out blocks (sharded over dp), search each replica's
        share of their queries: accuracy@k (the mean over replicas) and this
        replica's search results (for the report)."""
        ev = {k: v.to(device) for k, v in BiEncoderTask.eval_set(data, args, mesh.dp).items()}
        index = N.build_index(params, ev["context_ids"], ev["context_mask"], cfg, mesh)
        share = torch.tensor_split(torch.arange(len(ev["query_ids"]), device=device), mesh.dp)[mesh.dp_rank]
        q = N.embed_text(params, ev["query_ids"][share], cfg, mesh, tower="query",
                         attention_mask=ev["query_mask"][share])
        _, found = N.search(q, index, 20, cfg, mesh)
        acc = N.retrieval_accuracy(found, share)
        acc = {k: P.all_reduce(torch.tensor(v, device=device), mesh, "dp").item() / mesh.dp for k, v in acc.items()}
        return acc, dict(found=found, share=share, eval_set=ev)


def starts_of(data: torch.Tensor) -> torch.Tensor:
    """line_starts, computed once per corpus tensor."""
    key = (data.data_ptr(), len(data))
    if key not in _STARTS:
        _STARTS[key] = line_starts(data)
    return _STARTS[key]


_STARTS: dict = {}


def realm_queries(corpus_lines: list, n: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """n masked queries for REALM: a line of a random corpus block (gold: that
    block), 15% of its bytes (at least one) replaced by [MASK] and to be restored."""
    gen = torch.Generator().manual_seed(seed)
    rows, gold = [], []
    for _ in range(n):
        z = int(torch.randint(0, len(corpus_lines), (), generator=gen))
        gold.append(z)
        rows.append(list(bytes(corpus_lines[z][pick_query_line(corpus_lines[z], gen)]).strip()))
    targets, mask = padded(rows, query_len(seq))
    chosen = (targets < 256) & (torch.rand(targets.shape, generator=gen) < 0.15)
    first = (targets < 256).long().argmax(-1)
    chosen[torch.arange(n), first] |= ~chosen.any(-1)  # at least one byte per query
    return dict(query_ids=torch.where(chosen, MASK, targets), query_mask=mask, targets=targets,
                target_mask=chosen.long(), gold=torch.tensor(gold))


class RealmTask:
    """REALM-style retrieve-and-read: masked lines are restored by a reader
    that reads [query; block] for the top-k blocks a retriever finds in a
    corpus index (refreshed every --index-every steps, stale in between);
    the loss marginalises over the k blocks. The corpus is a fixed set of
    training blocks; each query is a line of one of them (its gold block)."""

    name, vocab, position, lr = "REALM", PAD + 1, "rope", 1e-3
    shapes, init, specs = N.realm_shapes, N.init_realm, N.realm_specs
    corpus_blocks = 512
    state: dict = {}  # the corpus and the current index, set by refresh

    @staticmethod
    def config(args, **common) -> N.RealmConfig:
        return N.RealmConfig(vocab_size=PAD + 1, shared=args.towers == "shared", top_k=args.top_k, **common)

    @staticmethod
    def flops(cfg, batch_size, seq) -> float:
        reader = N.bert_flops(N.reader_config(cfg), batch_size * cfg.top_k, seq + query_len(seq))
        return tower_flops(cfg, batch_size, query_len(seq)) + tower_flops(cfg, batch_size * cfg.top_k, seq) + reader

    @staticmethod
    def corpus(data, args) -> tuple[list, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(30_000_001)
        lines = [draw_block(data, starts_of(data), args.seq, gen) for _ in range(RealmTask.corpus_blocks)]
        ids, mask = padded([[b for line in block for b in line] for block in lines], args.seq)
        return lines, ids, mask

    @staticmethod
    def refresh(params, data, cfg, mesh, args, device, step: int) -> None:
        """Before the first step and every --index-every steps: re-embed the
        corpus with the current context tower (REALM's asynchronous refresh,
        here in step with training)."""
        state = RealmTask.state
        if "corpus" not in state:
            lines, ids, mask = RealmTask.corpus(data, args)
            state["corpus"] = (lines, ids.to(device), mask.to(device))
        if "index" not in state or step - state["built_at"] >= args.index_every:
            _, ids, mask = state["corpus"]
            state["index"] = N.build_index({k: v.detach() for k, v in params.items()}, ids, mask, cfg, mesh)
            state["built_at"] = step

    @staticmethod
    def batch(data, args, seed) -> dict[str, torch.Tensor]:
        lines = RealmTask.state["corpus"][0]
        return realm_queries(lines, args.batch, args.seq, seed)

    @staticmethod
    def loss(params, inputs, cfg, mesh, *, seed, training) -> dict[str, torch.Tensor]:
        _, ids, mask = RealmTask.state["corpus"]
        return N.realm_loss(params, inputs, RealmTask.state["index"], (ids, mask), cfg, mesh, seed=seed,
                            training=training)


TASKS = {"gpt": GPTTask, "bert": BertTask, "t5": T5Task, "biencoder": BiEncoderTask, "realm": RealmTask}


# ---------------------------------------------------------------------------
# Validation: every flag, the config, the memory, before any process group
# ---------------------------------------------------------------------------

AT_LEAST_1, AT_LEAST_0, ABOVE_0 = (">= 1", lambda v: v >= 1), (">= 0", lambda v: v >= 0), ("> 0", lambda v: v > 0)

# Every numeric flag and its range (a float must also be finite: nan fails
# every comparison, inf passes "> 0"). A flag left at None takes a default.
RANGES = {
    "tp": AT_LEAST_1, "seq": AT_LEAST_1, "max_seq": AT_LEAST_1, "layers": AT_LEAST_1, "hidden": AT_LEAST_1,
    "heads": AT_LEAST_1, "kv_heads": AT_LEAST_1, "batch": AT_LEAST_1, "steps": AT_LEAST_0,
    "log_every": AT_LEAST_1, "eval_every": AT_LEAST_1, "eval_batches": AT_LEAST_1,
    "warmup": AT_LEAST_0, "sample_tokens": AT_LEAST_0, "seed": ("in [0, 2**31)", lambda v: 0 <= v < 2**31),
    "lr": ABOVE_0, "min_lr": AT_LEAST_0, "weight_decay": AT_LEAST_0, "grad_clip": AT_LEAST_0,
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1), "peak_flops": ABOVE_0, "top_k": AT_LEAST_1, "timeout": ABOVE_0,
    "index_every": AT_LEAST_1, "pp": AT_LEAST_1, "virtual_stages": AT_LEAST_1, "microbatches": AT_LEAST_1,
    "bucket_mb": ABOVE_0, "save_every": AT_LEAST_1, "keep_last": AT_LEAST_1,
    "experts": AT_LEAST_0, "topk": AT_LEAST_1, "ep": AT_LEAST_1, "moe_every": AT_LEAST_1, "capacity_factor": ABOVE_0,
    "aux_loss": AT_LEAST_0, "z_loss": AT_LEAST_0, "cp": AT_LEAST_1, "trace_step": AT_LEAST_1,
    "plan_rank": AT_LEAST_0, "gpus": AT_LEAST_1, "gpus_per_node": AT_LEAST_1, "gpu_memory": ABOVE_0,
    "nvlink": ABOVE_0, "ib": ABOVE_0, "global_batch": AT_LEAST_1, "micro_batch": AT_LEAST_1,
}
MOE_FLAGS = ("topk", "moe_every", "capacity_factor", "aux_loss", "z_loss")  # their GPTConfig fields: MOE_FIELDS
MOE_FIELDS = dict(topk="moe_topk", moe_every="moe_every", capacity_factor="moe_capacity", aux_loss="moe_aux_loss",
                  z_loss="moe_z_loss")

# GPTConfig's fields (and check_mesh's / check_seq's names) -> the flag that sets them.
CONFIG_FLAGS = {"max_seq": "--max-seq", "layers": "--layers", "hidden": "--hidden", "heads": "--heads",
                "kv_heads": "--kv-heads", "hidden_dropout": "--dropout", "attention_dropout": "--dropout",
                "norm": "--norm", "activation": "--activation", "position": "--position",
                "attention": "--attention", "recompute": "--recompute", "sequence_parallel": "--sequence-parallel",
                "norm_order": "--norm-order", "tp": "--tp", "seq": "--seq", "experts": "--experts",
                "moe_topk": "--topk", "ep": "--ep", "moe_every": "--moe-every", "moe_capacity": "--capacity-factor",
                "moe_aux_loss": "--aux-loss", "moe_z_loss": "--z-loss", "cp": "--cp"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(args) -> None:
    """UsageError naming the flag unless every numeric flag is in its range."""
    for name, (rule, ok) in RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, float) and not (math.isfinite(value) and ok(value)):
            raise UsageError(f"{flag(name)} must be a finite number {rule}, got {value}")
        if not ok(value):
            raise UsageError(f"{flag(name)} must be {rule}, got {value}")


def in_flags(message: str) -> str:
    """A GPTConfig message in the words of the command line: `field=value`
    becomes `--flag value` and `field must` becomes `--flag must`, for every
    field a flag sets ("hidden=32 is not divisible by heads=3" -> "--hidden 32
    is not divisible by --heads 3"). Fields without a flag are left as they are."""
    fields = "|".join(sorted(CONFIG_FLAGS, key=len, reverse=True))
    message = re.sub(rf"\b({fields})='?([^\s,;:')]*)'?", lambda m: f"{CONFIG_FLAGS[m[1]]} {m[2]}", message)
    return re.sub(rf"\b({fields}) must\b", lambda m: f"{CONFIG_FLAGS[m[1]]} must", message)


def prompt_bytes(args) -> bytes:
    """--prompt's raw bytes (a byte-level model: argv that is not UTF-8 comes
    back exactly as typed), a newline when empty."""
    return os.fsencode("def " if args.prompt is None else args.prompt) or b"\n"


def check_args(args, world: int) -> tuple[N.GPTConfig, int]:
    """All validation of the flags, before any process group exists: every
    rank raises the same UsageError, so no rank is left waiting."""
    check_ranges(args)
    check_pipeline_args(args)
    if world % args.pp:
        raise UsageError(f"--pp {args.pp} does not divide the world size {world}")
    ep = args.ep if args.ep and args.ep > 0 else 1  # the default tp leaves room for data parallel of ep ranks
    cp = args.cp
    if args.tp is None and world % (args.pp * ep * cp):
        what = " x ".join(f"--{k} {v}" for k, v in (("cp", cp), ("ep", ep), ("pp", args.pp)) if v > 1 or k == "pp")
        raise UsageError(f"{what} does not divide the world size {world}")
    tp = world // (args.pp * ep * cp) if args.tp is None else args.tp
    if world % (tp * args.pp * cp):
        what = " x ".join(f"--{k} {v}" for k, v in (("tp", tp), ("cp", cp), ("pp", args.pp)) if v > 1 or k == "tp")
        what += f" = {tp * cp * args.pp}" if " x " in what else ""
        raise UsageError(f"{what} does not divide the world size {world} (data parallel fills the rest)")
    check_cp_args(args, tp)
    try:  # torchrun's LOCAL_WORLD_SIZE: the ranks of one node (--nproc-per-node)
        P.check_nodes(tp, cp, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    except ValueError as e:
        raise UsageError(in_flags(str(e))) from None
    if args.min_lr is not None and args.min_lr > args.lr:
        raise UsageError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine decays from --lr to --min-lr")
    if args.max_seq is None:
        args.max_seq = max(1024, args.seq)
    if args.seq > args.max_seq:
        raise UsageError(f"--seq {args.seq} is longer than --max-seq {args.max_seq} (the position table's rows)")
    if args.model != "gpt":
        for name in ("prompt", "sample_tokens"):
            if getattr(args, name) is not None:
                raise UsageError(f"{flag(name)} is for --model gpt (its sample); {args.model} ends with its own "
                                 "held-out example instead")
        if args.model == "bert" and args.seq < 5:
            raise UsageError(f"--seq {args.seq} is too short for BERT: [CLS] A [SEP] B [SEP] needs at least 5")
        if args.model == "t5" and args.seq < 8:
            raise UsageError(f"--seq {args.seq} is too short for T5's span corruption: at least 8")
        if args.model in ("biencoder", "realm") and args.seq < 16:
            raise UsageError(f"--seq {args.seq} is too short for a block of lines: at least 16")
    check_moe_args(args, world, tp)
    for name, models in (("top_k", ("realm",)), ("index_every", ("realm",))):
        if args.model not in models and getattr(args, name) is not None:
            raise UsageError(f"{flag(name)} is for --model {' / '.join(models)}")
    if args.model not in ("biencoder", "realm") and args.towers != "separate":
        raise UsageError("--towers is for --model biencoder / realm")
    if args.model == "realm" and args.top_k > RealmTask.corpus_blocks:
        raise UsageError(f"--top-k {args.top_k} is larger than the corpus index ({RealmTask.corpus_blocks} blocks)")
    elif args.sample_tokens != 0 and len(prompt_bytes(args)) >= args.seq:
        raise UsageError(f"--prompt is {len(prompt_bytes(args))} bytes, not shorter than --seq {args.seq}: "
                         "no room to sample (shorten it, or --sample-tokens 0)")
    try:
        order = {} if args.norm_order is None else dict(norm_order=args.norm_order)
        layout = dict(attention=args.attention, recompute=args.recompute, hidden_dropout=args.dropout,
                      attention_dropout=args.dropout, sequence_parallel=args.sequence_parallel and tp > 1,
                      vocab_multiple=128 * tp)
        args.tokenizer_obj = load_tokenizer(args)
        if args.init_hf is not None:
            cfg = hf_config_of(args, layout)
        else:
            vocab = {} if args.tokenizer_obj is None else dict(vocab_size=args.tokenizer_obj.get_vocab_size())
            moe = {MOE_FIELDS[k]: getattr(args, k) for k in MOE_FLAGS if getattr(args, k) is not None}
            cfg = TASKS[args.model].config(
                args, max_seq=args.max_seq, layers=args.layers, hidden=args.hidden, heads=args.heads,
                kv_heads=args.kv_heads, norm=args.norm, activation=args.activation, position=args.position,
                **layout, **order, **(dict(experts=args.experts, **moe) if args.experts else {}))
            cfg = replace(cfg, **vocab) if vocab else cfg
        if args.export_hf is not None:
            if args.model not in HF_EXPORTS:
                raise ValueError(f"--export-hf: --model {args.model} has no Hugging Face twin here (gpt, bert, "
                                 "biencoder have)")
            HF_EXPORTS[args.model][0](cfg)  # a config the twin cannot hold is refused now, not after training
        cfg.check_mesh(P.Mesh(tp=tp, ep=args.ep))
        cfg.check_seq(args.seq, P.Mesh(tp=tp))
        if args.model == "t5":
            args.dec_seq = t5_dec_seq(args.seq, tp)
            cfg.check_seq(args.dec_seq, P.Mesh(tp=tp))
        if args.model in ("biencoder", "realm"):
            cfg.check_seq(query_len(args.seq), P.Mesh(tp=tp))
        if args.model == "realm":
            cfg.check_seq(query_len(args.seq) + args.seq, P.Mesh(tp=tp))
    except ValueError as e:
        raise UsageError(in_flags(str(e))) from None
    for name in ("save_every", "keep_last"):
        if getattr(args, name) is not None and args.save is None:
            raise UsageError(f"{flag(name)} needs --save DIR")
    if args.save is not None and not args.save:
        raise UsageError("--save is an empty path")
    if args.load is not None and not args.load:
        raise UsageError("--load is an empty path")
    if args.tokenizer_obj is not None and args.tokenizer_obj.get_vocab_size() > cfg.vocab_size:
        raise UsageError(f"--tokenizer {args.tokenizer} has {args.tokenizer_obj.get_vocab_size():,} ids, the model's "
                         f"vocabulary {cfg.vocab_size:,}")
    for name in ("export_hf", "init_hf"):
        if getattr(args, name) == "":
            raise UsageError(f"{flag(name)} is an empty path")
    for name in ("save", "export_hf"):
        if getattr(args, name) is not None:
            check_output_folder(getattr(args, name), flag(name))
    args.load_path = find_checkpoint(args.load) if args.load else None
    args.load_meta = read_meta(args.load_path, cfg, args) if args.load_path else None
    if args.save is not None:
        check_save_folder(args.save, args.load_meta["step"] if args.load_meta else 0, args.load_path)
    check_log_args(args, cfg)
    return cfg, tp


def check_log_args(args, cfg) -> None:
    """--log-dir: a folder that is or can be made, holding no log or this run's (runlog.check_log_dir;
    args.log_old: its run.json, when resumed); --trace-step: with --log-dir and --pp > 1, a step this run
    takes (default: its second, the first without the first step's one-time costs)."""
    if args.log_dir == "":
        raise UsageError("--log-dir is an empty path")
    args.log_old = None
    if args.log_dir is not None:
        check_output_folder(args.log_dir, "--log-dir")
        try:
            args.log_old = runlog.check_log_dir(args.log_dir, args.model, config_dict(cfg), args.load is not None)
        except ValueError as e:
            raise UsageError(str(e)) from None
    start = args.load_meta["step"] + 1 if args.load_meta else 1
    if args.trace_step is not None:
        if args.log_dir is None or args.pp == 1:
            raise UsageError(f"--trace-step {args.trace_step} needs --log-dir DIR and --pp > 1 (it traces the "
                             "pipeline schedule)")
        if not start <= args.trace_step <= args.steps:
            raise UsageError(f"--trace-step {args.trace_step} is not a step of this run (steps {start} to "
                             f"{args.steps})")
    elif args.log_dir is not None and args.pp > 1 and start <= args.steps:
        args.trace_step = min(start + 1, args.steps)


def check_cp_args(args, tp: int) -> None:
    """Context parallelism: gpt only, without experts; the sequence cuts into 2 x cp chunks (x tp under SP)."""
    if args.cp == 1:
        return
    if args.model != "gpt":
        raise UsageError(f"--cp is for --model gpt (ring attention over its causal stack), not {args.model}")
    if args.experts:
        raise UsageError("--cp with --experts: context and expert parallelism together are not built")
    if args.position == "relative":
        raise UsageError("--cp with --position relative: context parallelism has no relative-position bias")
    chunks = 2 * args.cp * (tp if args.sequence_parallel and tp > 1 else 1)
    if args.seq % chunks:
        raise UsageError(f"--seq {args.seq} does not cut into 2 x --cp {args.cp}"
                         + (f" x --tp {tp} (sequence parallel)" if chunks != 2 * args.cp else "")
                         + f" = {chunks} equal chunks")


def check_moe_args(args, world: int, tp: int) -> None:
    """The mixture-of-experts flags: gpt only, the others need --experts,
    --ep divides the data-parallel ranks, the sequence cuts over tp."""
    if args.experts and args.model != "gpt":
        raise UsageError(f"--experts is for --model gpt (mixture-of-experts MLPs), not {args.model}")
    given = [flag(k) for k in (*MOE_FLAGS, "ep") if getattr(args, k) not in (None, 1 if k == "ep" else None)]
    if given and not args.experts:
        raise UsageError(f"{', '.join(given)} need --experts E (a mixture-of-experts model)")
    if not args.experts:
        return
    dp = world // (tp * args.pp * args.cp)
    if dp % args.ep:
        raise UsageError(f"--ep {args.ep} does not divide the data-parallel ranks dp = {dp} (world {world} / "
                         f"(tp {tp} x pp {args.pp})): expert parallelism is carved out of data parallelism")
    if args.topk is not None and args.topk > args.experts:
        raise UsageError(f"--topk {args.topk} is more than --experts {args.experts}")
    if args.init_hf is not None:
        raise UsageError("--experts with --init-hf: the GPT-2 import has no experts")
    if tp > 1 and args.seq % tp:
        raise UsageError(f"--experts with --tp {tp}: each tp rank routes 1/tp of the sequence, so --seq {args.seq} "
                         "must be divisible by --tp")


# model -> (config check + config.json, state dict out, state dict in), for --export-hf / --init-hf
HF_EXPORTS = {"gpt": (N.gpt2_hf_config, N.to_hf_gpt2, N.from_hf_gpt2),
              "bert": (N.bert_hf_config, N.to_hf_bert, N.from_hf_bert),
              "biencoder": (N.dpr_hf_config, N.to_hf_dpr, None)}  # DPR: two folders, question_encoder, ctx_encoder


def load_tokenizer(args):
    """--tokenizer FILE as a `tokenizers.Tokenizer` (gpt only), or None: bytes."""
    if args.tokenizer is None:
        return None
    if args.model != "gpt":
        raise UsageError(f"--tokenizer is for --model gpt (--model {args.model} reads bytes and its own special ids)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the `tokenizers` library: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(args.tokenizer)
    except Exception as e:  # the library raises its own Exception type for a missing or malformed file
        raise UsageError(f"--tokenizer {args.tokenizer}: not a readable tokenizer.json ({e})") from None


def hf_config_of(args, layout: dict):
    """The model config of --init-hf DIR's config.json (plain JSON), with this run's layout fields."""
    if args.model not in ("gpt", "bert"):
        raise UsageError(f"--init-hf is for --model gpt / bert, not {args.model}")
    path = Path(args.init_hf) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--init-hf {args.init_hf}: cannot read config.json ({e})") from None
    if not isinstance(hf, dict):
        raise UsageError(f"--init-hf {args.init_hf}: config.json is not a JSON object")
    try:
        return (N.gpt2_config_from_hf if args.model == "gpt" else N.bert_config_from_hf)(hf, **layout)
    except KeyError as e:
        raise UsageError(f"--init-hf {args.init_hf}: config.json lacks {e}") from None


def check_pipeline_args(args) -> None:
    """UsageError unless --pp, --virtual-stages, --microbatches, --schedule fit
    the model, its layers and the batch. Needs no world size (--show-schedule runs alone)."""
    pp, v, m = args.pp, args.virtual_stages, args.microbatches
    if args.compile and args.model not in N.PIPELINE_MODELS:
        raise UsageError(f"--compile compiles a pipeline stage's forward (--model {' / '.join(N.PIPELINE_MODELS)}); "
                         f"--model {args.model} runs eager")
    if (pp > 1 or m > 1) and args.model not in N.PIPELINE_MODELS:
        used = "--pp" if pp > 1 else "--microbatches"
        raise UsageError(f"{used} {pp if pp > 1 else m}: --model {args.model} does not pipeline (pipeline stages "
                         f"exist for {' / '.join(N.PIPELINE_MODELS)}); train it with --tp and data parallel")
    if v > 1 and pp == 1:
        raise UsageError(f"--virtual-stages {v} needs --pp > 1: interleaving spreads chunks over pipeline ranks")
    if pp > 1 and args.position == "relative":
        raise UsageError(f"--position relative does not pipeline (--pp {pp}): its one bias table serves the layers "
                         "of every stage; use --position learned or rope")
    if args.layers % (pp * v):
        raise UsageError(f"--layers {args.layers} cannot be cut into --pp {pp} x --virtual-stages {v} = {pp * v} "
                         "equal stages")
    if args.batch % m:
        raise UsageError(f"--microbatches {m} does not divide --batch {args.batch}")
    if args.schedule == "interleaved" and v < 2:
        raise UsageError(f"--schedule interleaved needs --virtual-stages >= 2, got {v}")
    if args.schedule != "interleaved" and v > 1:
        raise UsageError(f"--virtual-stages {v} needs --schedule interleaved, got {args.schedule}")
    if args.schedule == "interleaved" and m % pp:
        raise UsageError(f"--schedule interleaved needs --microbatches a multiple of --pp: got --microbatches {m}, "
                         f"--pp {pp}")


def show_schedule(args) -> str:
    """--show-schedule: the timeline of the run's schedule on pp ranks (unit
    costs: a forward 1, a backward 2), its bubble beside the formula."""
    p, m, v = args.pp, args.microbatches, args.virtual_stages
    formula = {"afab": ("(p-1)/m", (p - 1) / m), "1f1b": ("(p-1)/m", (p - 1) / m),
               "interleaved": ("(p-1)/(v·m)", (p - 1) / (v * m)), "zb": ("1F1B's (p-1)/m", (p - 1) / m)}
    text, value = formula[args.schedule]
    return (f"schedule {args.schedule}: pp {p}, {m} microbatches" + (f", {v} chunks per rank" if v > 1 else "") +
            " (digits: a microbatch's forward; letters: its backward, two columns (zb: its input-gradient pass, "
            "one); w: a weight-gradient pass; ': a later chunk; . idle)\n" +
            P.format_schedule(P.schedule_for(args.schedule, p, m, v), v) + f"\nformula: {text} = {value:.3f}")


def plan_args(args) -> tuple[N.GPTConfig, C.Layout, C.Cluster, int]:
    """--plan's flags as (model config, layout, cluster, rank), or a UsageError naming the values: the
    GPU count cut by tp x cp x pp (dp fills the rest), the global batch by dp x --micro-batch, the model by
    the layout (`plan.check_layout`), the cluster's values > 0."""
    check_ranges(args)
    if args.model != "gpt":
        raise UsageError(f"--plan plans --model gpt, not {args.model}")
    try:
        cl = C.cluster(args.cluster, gpus_per_node=args.gpus_per_node, nvlink=args.nvlink and args.nvlink * C.GB,
                       ib=args.ib and args.ib * C.GB, memory=args.gpu_memory and args.gpu_memory * C.GIB,
                       peak=args.peak_flops)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tp, pp, cp, ep = args.tp or 1, args.pp, args.cp, args.ep
    gpus = args.gpus or tp * cp * pp * ep
    if gpus % (tp * cp * pp):
        what = " x ".join(f"--{k} {v}" for k, v in (("tp", tp), ("cp", cp), ("pp", pp)) if v > 1 or k == "tp")
        raise UsageError(f"--gpus {gpus} is not divisible by {what} = {tp * cp * pp}")
    dp = gpus // (tp * cp * pp)
    mb = args.micro_batch
    if args.global_batch is not None and args.global_batch % (dp * mb):
        raise UsageError(f"--global-batch {args.global_batch} is not divisible by dp {dp} x --micro-batch {mb} = "
                         f"{dp * mb}")
    m = args.global_batch // (dp * mb) if args.global_batch is not None else args.microbatches
    if args.plan_rank is not None and args.plan_rank >= gpus:
        raise UsageError(f"--plan-rank {args.plan_rank} is not a rank of --gpus {gpus}")
    try:
        if args.preset is not None:
            cfg, seq = C.model(args.preset)
        else:
            moe = {MOE_FIELDS[k]: getattr(args, k) for k in MOE_FLAGS if getattr(args, k) is not None}
            if moe and not args.experts:
                raise UsageError(f"{', '.join(flag(k) for k in MOE_FLAGS if getattr(args, k) is not None)} need "
                                 "--experts E (a mixture-of-experts model)")
            cfg, seq = N.GPTConfig(max_seq=max(1024, args.seq), layers=args.layers, hidden=args.hidden,
                                   heads=args.heads, kv_heads=args.kv_heads, norm=args.norm,
                                   activation=args.activation, position=args.position,
                                   **({"experts": args.experts, **moe} if args.experts else {})), args.seq
        cfg = replace(cfg, recompute=args.recompute, sequence_parallel=args.sequence_parallel and tp > 1,
                      vocab_multiple=128 * tp, attention=args.attention)
        C.check_nodes(tp, cp, gpus, cl)
        layout = C.Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, v=args.virtual_stages, micro_batch=mb, microbatches=m,
                          seq=seq, schedule=args.schedule, zero=args.zero)
        PL.check_layout(cfg, P.Mesh.of_rank(0, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep), layout.v, mb, seq, m,
                        layout.schedule)
    except ValueError as e:
        raise UsageError(in_flags(str(e))) from None
    return cfg, layout, cl, args.plan_rank or 0


def plan_report(args) -> str:
    """--plan / --plan-search: the text (cost.py section 5) of the layout's plan, or of the search."""
    cfg, layout, cl, rank = plan_args(args)
    name = args.preset or f"GPT {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads"
    head = [f"model: {name}, {N.num_params(cfg):,} parameters; recompute {cfg.recompute}"
            + (", sequence parallel" if cfg.sequence_parallel else ""),
            f"cluster: {cl.name}, {(nodes := -(-layout.gpus // cl.gpus_per_node)):,} node{'s' * (nodes > 1)} of "
            f"{cl.gpus_per_node}, "
            f"{cl.peak / 1e12:,.0f} TFLOP/s, {C.gib(cl.memory)}, NVLink {cl.nvlink / C.GB:,.0f} GB/s, "
            f"InfiniBand {cl.ib / C.GB:,.0f} GB/s per GPU and direction"]
    if args.plan_search:
        valid, rejected = C.search(cfg, layout.gpus, cl, global_batch=layout.global_batch,
                                   micro_batch=layout.micro_batch, seq=layout.seq, schedule="1f1b", zero=layout.zero)
        lines = head + [f"layouts of {layout.gpus:,} GPUs at global batch {layout.global_batch:,}: {len(valid)} fit, "
                        f"{len(rejected)} rejected; the best ten (1f1b):"]
        for step, lay, out in valid[:10]:
            lines.append(f"  {step:9.3f} s  {out['mfu']:6.1%} MFU  tp {lay.tp} pp {lay.pp} dp {lay.dp}"
                         + (f" ep {lay.ep}" if lay.ep > 1 else "") + f", {lay.microbatches} microbatches")
        lines.append("the best rejected:")
        lines += [f"  {'' if math.isinf(step) else f'{step:9.3f} s  '}{why}" for step, _, why in rejected[:10]]
        return "\n".join(lines)
    out = C.rank_time(cfg, layout, cl, rank)
    plan = out["plans"][out["rank"] // (layout.gpus // layout.pp)]  # rank's own plan (`cost.stage_plans`)
    mesh, st = plan["mesh"], out["stages"][plan["stage"]]
    where = ", ".join(f"{d} rank {mesh.rank(d)} of {mesh.size(d)}" for d in ("tp", "cp", "dp", "ep", "pp")
                      if mesh.size(d) > 1 or d in ("tp", "dp", "pp"))
    layers = ", ".join(f"{ch.layers[0]}-{ch.layers[-1]}" for ch in plan["chunks"].values())
    b = plan["bytes"]
    return "\n".join(head + [
        f"layout: {layout.words()}",
        f"rank {rank}: {where}; layers {layers}",
        *shard_lines(plan["shards"]),
        f"  memory: weights {b['weights']:,} B (bf16) + grads {b['grads']:,} B + optimizer {b['optimizer']:,} B + "
        f"activations {b['activations']:,} B = {b['total']:,} B ({C.gib(b['total'])})",
        "memory per pipeline stage (plan.rank_plan):", *C.memory_table(out["plans"], cl),
        "sent per step by a rank of each stage, per mesh dim:", *C.sends_table(out["plans"]),
        f"communication of rank {rank} in one step, per mesh dim:", *C.comm_table(plan, st, layout, cl),
        "schedule:", *C.timeline(layout),
        "time (cost.py):", *C.time_lines(out, layout, cl)])


def memory_needed(cfg: N.GPTConfig, args, tp: int, device: torch.device) -> tuple[float, float]:
    """(parameter bytes, activation bytes) one rank needs for training, from
    the config alone: nothing allocated, O(1) in --layers.

    Parameters: this rank's 1/tp share of the fp32 weights, their grads and
    AdamW's two moments (16 B per element; --bf16: bf16 weight 2 + fp32 grad
    4 + fp32 main copy and moments 12 = 18 B); on CPU also init_gpt's full
    fp32 copy, which every rank builds before keeping its shard.
    Activations stored for backward, per layer b·s·h·(34 + 5·heads·s/h) bytes
    in 16-bit (Korthikanti et al. 2022; 10 of the 34 are not split by tp
    unless sequence parallel; selective recompute drops the 5·heads·s/h of
    the attention core, full recompute keeps only the layer's 2·b·s·h input),
    doubled in fp32; plus the fp32 logits, their softmax and gradient, 3·b·s·V/tp·4 B."""
    b, s, h, n = args.batch, args.seq, cfg.hidden, N.num_params(cfg, TASKS[args.model].shapes)
    params = (18 if args.bf16 else 16) * n / (tp * args.pp) + (4 * n if device.type == "cpu" else 0)
    if cfg.recompute == "full":
        per_layer = 2 / (tp if cfg.sequence_parallel else 1)
    else:
        split = 24 + (0 if cfg.recompute == "selective" else 5 * cfg.heads * s / h)
        per_layer = (10 + split) / tp if cfg.sequence_parallel else 10 + split / tp
    layers = sum(cfg.stacks().values())  # T5: the encoder's and the decoder's (on its shorter sequence: an upper bound)
    activations = b * s * h * per_layer * layers * (1 if args.bf16 else 2) + 3 * b * s * cfg.padded_vocab / tp * 4
    return params, activations


def _read_int(path: str, key: str | None = None) -> int | None:
    """An integer from a /proc or /sys file (the line starting with key), or None."""
    try:
        with open(path) as f:
            for line in f:
                if key is None or line.startswith(key):
                    return int(line.split()[1 if key else 0])
    except (OSError, ValueError, IndexError):  # no such file; "max" (no limit)
        return None


def memory_available(device: torch.device) -> int | None:
    """Bytes this run can use: the GPU's free memory; on CPU the kernel's
    MemAvailable (or the physical memory), capped by a container's cgroup limit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = _read_int("/proc/meminfo", "MemAvailable:")
    if free is not None:
        free *= 1024
    elif hasattr(os, "sysconf"):  # no /proc (macOS): the physical memory
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return None  # unknown: no check
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    return min(free, limit - used) if limit is not None and used is not None else free


def check_memory(cfg: N.GPTConfig, args, tp: int, device: torch.device) -> None:
    """UsageError with the figures when the model and one step cannot fit. The
    CPU ranks of one machine share its memory; each GPU rank has its own device."""
    ranks = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    params, activations = (ranks * m for m in memory_needed(cfg, args, tp, device))
    have = memory_available(device)
    if have is not None and params + activations > have:
        gib = lambda n: f"{n / 2**30:,.1f}" if n >= 2**30 else f"{n / 2**30:.2g}"
        where = f"{ranks} ranks on this machine" if ranks > 1 else "this machine"
        raise UsageError(f"the model and one step need about {gib(params + activations)} GiB (parameters "
                         f"{gib(params)} GiB, activations {gib(activations)} GiB) but "
                         f"{'this GPU has' if device.type == 'cuda' else f'{where} has'} {gib(have)} GiB free: "
                         "lower --hidden/--layers/--batch/--seq")


# ---------------------------------------------------------------------------
# The schedule, the optimizer, one step, evaluation, the sample
# ---------------------------------------------------------------------------


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr (reached exactly at step --warmup), then cosine
    decay to --min-lr (reached exactly at --steps). Steps count from 1."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step <= args.warmup:
        return args.lr * (step / max(args.warmup, 1))  # exactly --lr at step --warmup
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class Optimizer:
    """AdamW (betas 0.9, 0.95; weight decay on matrices only, not on norms and
    biases) over this rank's parameters, with the gradients in buckets
    reduced over data parallel while the backward runs (`P.GradBuckets`,
    --bucket-mb), the tied embedding's two pipeline copies summed, the
    global norm clipped (--grad-clip) and, with --zero 1, the optimizer state
    sharded over data parallel (`P.ZeroAdamW`). bf16 parameters (--bf16)
    without ZeRO take the same `P.ZeroAdamW` over the all-reduced buckets:
    AdamW on an fp32 main copy with fp32 moments, written back in bf16. Under
    either, bf16 parameters' gradients accumulate and are reduced in fp32
    buckets (`P.GradBuckets(grad_dtype=torch.float32)`, Megatron's main_grad):
    2 B weight + 4 B gradient + 12 B optimizer state = 18 B a parameter.
    inner: another torch optimizer over the same params instead of AdamW
    (tests use SGD)."""

    def __init__(self, params: dict, args, mesh: P.Mesh | None = None, specs: dict | None = None, cfg=None,
                 inner=None):
        mesh = mesh or P.Mesh.serial()
        self.params, self.mesh, self.specs = params, mesh, specs or dict.fromkeys(params)
        tied = N.tied_copies(cfg, mesh) if cfg is not None else ()
        self.skip = N.norm_skip(cfg, mesh) if cfg is not None else ()
        self.zero = args.zero == 1
        bf16 = any(p.dtype == torch.bfloat16 for p in params.values())
        self.main = self.zero or (inner is None and bf16)
        accumulations = args.microbatches if args.model in N.PIPELINE_MODELS else 1
        experts = [n for n in params if isinstance(self.specs[n], P.Experts)]  # reduced over edp only
        self.buckets = P.GradBuckets(params, mesh, bucket_mb=args.bucket_mb, zero=self.zero,
                                     accumulations=accumulations, tied=tied, experts=experts,
                                     grad_dtype=torch.float32 if self.main and bf16 else None)
        decay = lambda name, p: p.dim() >= 2
        if self.main:  # the optimizer keeps a main copy: ZeRO-1 (sharded) or bf16 parameters (whole)
            self.opt = P.ZeroAdamW(params, self.buckets, self.specs, mesh, lr=args.lr, betas=(0.9, 0.95),
                                   weight_decay=args.weight_decay, decay=decay, skip=self.skip)
        else:
            groups = [[p for n, p in params.items() if decay(n, p)], [p for n, p in params.items() if not decay(n, p)]]
            cuda = all(p.is_cuda for p in params.values())  # fused: one kernel for all tensors (CUDA only)
            self.opt = inner or torch.optim.AdamW([{"params": groups[0], "weight_decay": args.weight_decay},
                                                   {"params": groups[1], "weight_decay": 0.0}],
                                                  lr=args.lr, betas=(0.9, 0.95), fused=True if cuda else None)

    @property
    def param_groups(self) -> list:
        return self.opt.param_groups

    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        """After the backward: finish the dp reductions, clip, step at lr,
        zero the buckets. -> the global grad norm before clipping."""
        self.buckets.finish()
        if self.main:
            norm = self.opt.clip_grad_norm(max_norm)
            self.opt.step(lr)
        else:
            norm = P.clip_grad_norm(self.params, self.specs, self.mesh, max_norm, skip=self.skip)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
        self.buckets.zero_grad()
        return norm

    @property
    def steps(self) -> int:
        """Optimizer steps taken (AdamW's bias correction counts them)."""
        if self.main:
            return self.opt.steps
        return max((int(s["step"]) for s in self.opt.state.values() if "step" in s), default=0)

    def moments(self) -> dict:
        """{name: (exp_avg, exp_avg_sq)}, each the shape of the parameter's
        shard (zeros before the first step). ZeRO-1 gathers them over dp."""
        if self.main:
            return self.opt.gather_state()
        zeros = lambda p: torch.zeros_like(p, memory_format=torch.contiguous_format)
        return {n: (self.opt.state[p]["exp_avg"], self.opt.state[p]["exp_avg_sq"]) if p in self.opt.state
                else (zeros(p), zeros(p)) for n, p in self.params.items()}

    def main_params(self) -> dict:
        """{name: the parameter's truth}, each the shape of its shard: the
        optimizer's fp32 main copy for bf16 parameters, else the parameters."""
        if any(p.dtype == torch.bfloat16 for p in self.params.values()):
            return self.opt.gather_main()
        return self.params

    def load_state(self, moments: dict, steps: int, main: dict | None = None) -> None:
        """AdamW's state from {name: (exp_avg, exp_avg_sq)} and the step count;
        `main` ({name: tensor}): the main copy, also copied into the parameters."""
        if self.main:
            return self.opt.load_state(moments, steps, main)
        if main is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(main[n])
        for n, p in self.params.items():
            if steps:
                self.opt.state[p] = dict(step=torch.tensor(float(steps)), exp_avg=moments[n][0].clone(),
                                         exp_avg_sq=moments[n][1].clone())

    def state_bytes(self) -> int:
        """AdamW's state on this rank: the two moments (with a main copy: measured from storage, it included)."""
        if self.main:
            return self.opt.state_bytes()
        return sum(s[k].numel() * s[k].element_size() for s in self.opt.state.values()
                   for k in ("exp_avg", "exp_avg_sq") if k in s)


def make_optimizer(params: dict, args, mesh: P.Mesh | None = None, specs: dict | None = None, cfg=None) -> Optimizer:
    """This rank's `Optimizer` (AdamW; decay on matrices only)."""
    return Optimizer(params, args, mesh, specs, cfg)


def train_step(params, opt: Optimizer, inputs, task, cfg, mesh, specs, args, step: int,
               clock: dict | None = None) -> tuple[dict, torch.Tensor]:
    """One step at lr_at(step): forward and backward, the gradients averaged
    over data parallel (in buckets, during the backward), their global norm
    clipped to --grad-clip (0: off), AdamW. GPT and BERT run as a pipeline
    schedule over --microbatches (`N.pipeline_step`: at --pp 1 and one
    microbatch, a forward then a backward); the other models call their
    task's loss. Returns (the replica's losses and metrics, detached, the same
    on every pipeline rank; the global grad norm before clipping). Its
    collectives are recorded by a surrounding `P.count_comms()`, in phases
    forward, backward, after backward (dp, the tied embedding, the grad
    norm) and optimizer (ZeRO-1's all-gather)."""
    moe = N.MoE() if getattr(cfg, "experts", 0) else None
    with autocast(args):
        if args.model in N.PIPELINE_MODELS:
            metrics = N.pipeline_step(args.model, params, inputs, cfg, mesh, schedule=args.schedule,
                                      v=args.virtual_stages, microbatches=args.microbatches, seed=args.seed + step,
                                      clock=clock, moe=moe, stage_fn=stage_fn(args))
        else:
            metrics = task.loss(params, inputs, cfg, mesh, seed=args.seed + step, training=True)
            metrics["loss"].backward()
    grad_norm = opt.step(lr_at(step, args), args.grad_clip)
    metrics = {k: v.detach() for k, v in metrics.items()}
    if moe is not None:  # this rank's MoE layers (a pipeline stage may hold none), summed
        load, dropped, choices = torch.zeros(cfg.experts, dtype=torch.float64), 0.0, 0.0
        for t in moe.totals().values():
            load, dropped, choices = load + t.load.cpu(), dropped + float(t.dropped), choices + t.choices
        metrics["moe"] = torch.cat([load, torch.tensor([dropped, choices], dtype=torch.float64)]).to(grad_norm.device)
    return metrics, grad_norm  # metrics["moe"]: [load per expert..., dropped, choices], read by moe_stats


COMPILE_BACKEND = "inductor"  # tests set "aot_eager": the same captured graphs and backward, no C++ build


@functools.cache
def compiled_stage_forward():
    """torch.compile of `N.stage_forward`, made once per process (its graphs are cached per shape and config)."""
    return torch.compile(N.stage_forward, backend=COMPILE_BACKEND)


def stage_fn(args):
    """What a training step runs per stage and microbatch: N.stage_forward, or its compiled twin (--compile)."""
    return compiled_stage_forward() if args.compile else N.stage_forward


def check_compile(device: torch.device) -> None:
    """UsageError unless torch.compile runs on device (on CPU it needs a C++ compiler): a tiny function
    is compiled and run once, so a missing toolchain is one line now, not a traceback at step 1."""
    try:
        torch.compile(lambda x: x * 2 + 1, backend=COMPILE_BACKEND)(torch.zeros(2, device=device))
    except Exception as e:  # torch raises a variety of backend errors: say the first line of the one it raised
        raise UsageError(f"--compile: torch.compile cannot run on {device.type} here ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]}); run without --compile") from None


def logged_metrics(metrics: dict, mesh: P.Mesh) -> dict[str, float]:
    """The numbers of the step line: train_step's metrics of this rank (its
    replica's, and under cp its chunks' share of every sequence) averaged
    over the dp replicas and the cp ranks, dp·cp in all: the one-process
    run's on the global batch. MoE: "aux", the loss less the LM loss, added."""
    replicas = "dpcp" if mesh.cp > 1 else "dp"
    out = {k: (P.all_reduce(v.float(), mesh, replicas, phase="log") / mesh.size(replicas)).item()
           for k, v in metrics.items()}
    if "lm" in out:  # MoE: the loss is lm + the weighted auxiliary losses
        out["aux"] = out["loss"] - out["lm"]
    return out


def moe_stats(stats, mesh: P.Mesh) -> dict | None:
    """The experts' load this step, over every MoE layer, stage and dp rank:
    {"share": each expert's share of the choices, "dropped": the share of the
    choices dropped by capacity}; None without MoE. Collective over pp and dp.
    stats: this rank's [load per expert..., dropped, choices] (`train_step`)."""
    if stats is None:
        return None
    stats = P.all_reduce(P.all_reduce(stats.double(), mesh, "pp", phase="log"), mesh, "dp", phase="log")
    load, dropped, choices = stats[:-2], stats[-2].item(), stats[-1].item()
    return dict(share=(load / load.sum().clamp(min=1)).tolist(), dropped=dropped / max(choices, 1))


def moe_summary(moe: dict | None) -> str:
    """moe_stats as the log line says it: ' | experts ▆█▅▇ 24/27/23/26% | dropped 1.2%'
    (a bar per expert, its share of the choices, the share dropped), '' without MoE."""
    if moe is None:
        return ""
    share = moe["share"]
    bars = "".join("▁▂▃▄▅▆▇█"[min(7, int(8 * x / max(share)))] if max(share) > 0 else "▁" for x in share)
    line = f" | experts {bars} {'/'.join(f'{100 * x:.0f}' for x in share)}%"
    return line + (f" | dropped {moe['dropped']:.1%}" if moe["dropped"] else "")


def diverged_message(step: int, loss: float, grad_norm: float, last_finite, args) -> str:
    """The facts of a run whose loss or grad norm is no longer finite, without
    guessing which flag is at fault. last_finite: (step, grad norm) or None."""
    what = f"loss is {loss}" if not math.isfinite(loss) else f"grad norm is {grad_norm} (loss {loss:.4g})"
    last = f"{last_finite[1]:.4g} at step {last_finite[0]}" if last_finite else "none (not one step was finite)"
    clip = f"on at --grad-clip {args.grad_clip}" if args.grad_clip > 0 else "off (--grad-clip 0)"
    return (f"{what} at step {step}: stopping (lr at that step {lr_at(step, args):.3g}, "
            f"last finite grad norm {last}, gradient clipping {clip})")


def evaluate(params, data, task, cfg, mesh, args, device) -> dict[str, float]:
    """The task's losses and metrics, each the mean over --eval-batches fixed
    held-out batches (no dropout)."""
    totals = {}
    with torch.no_grad(), autocast(args):
        for i in range(args.eval_batches):
            inputs = {k: v.to(device) for k, v in task.batch(data, args, seed=10_000_019 + i).items()}
            if args.model in N.PIPELINE_MODELS:  # forward only, through the stages
                losses = N.pipeline_step(args.model, params, inputs, cfg, mesh, schedule=args.schedule,
                                         v=args.virtual_stages, microbatches=args.microbatches, training=False)
            else:
                losses = task.loss(params, inputs, cfg, mesh, seed=0, training=False)
            for k, v in losses.items():
                v = P.all_reduce(v.float(), mesh, "cp", phase="eval") / mesh.cp  # cp: each rank scored its chunks
                totals[k] = totals.get(k, 0.0) + v.item() / args.eval_batches
    return totals


def metrics_line(metrics: dict[str, float], style: str) -> str:
    """The metrics beside the loss: '' for GPT (the loss alone); for BERT
    ' | mlm 2.1000 | nsp 0.6900' in the step line ('log') or
    ' (mlm 2.1000, nsp 0.6900, nsp acc 51.2%)' in the eval line ('eval').
    Accuracies (bi-encoder: in-batch top1/top5, index acc@1/5/20) are eval only."""
    is_acc = lambda k: "acc" in k  # nsp_acc, top1_acc, acc@5: a percentage, shown at eval only
    parts = [f"{k.replace('_acc', ' acc')} {v:.1%}" if is_acc(k) else f"{k} {v:.4f}"
             for k, v in metrics.items() if k != "loss" and (style == "eval" or not is_acc(k))]
    if not parts:
        return ""
    return "".join(f" | {p}" for p in parts) if style == "log" else f" ({', '.join(parts)})"


def fill_in(params, data, cfg, mesh, args, device) -> str:
    """BERT's sample: one held-out pair with its chosen bytes shown as '_',
    and the model's guess for each (bytes that are not UTF-8 as U+FFFD)."""
    inputs = {k: v.to(device) for k, v in bert_batch(data, 1, args.seq, seed=10_000_019).items()}
    with torch.no_grad():
        logits, _ = N.bert_pretrain(params, inputs["ids"], cfg, mesh, token_types=inputs["token_types"],
                                    attention_mask=inputs["attention_mask"])
    guess = P.gather_from_tp(logits, mesh)[0, :, :256].argmax(-1)  # bytes only: never a special id
    target, chosen = inputs["mlm_targets"][0], inputs["mlm_mask"][0].bool()
    text = lambda ids: bytes(t for t in ids.tolist() if t < 256).decode("utf-8", errors="replace")
    right = (guess == target)[chosen].float().mean().item()
    return (f"fill-in ({int(chosen.sum())} held-out bytes hidden as _, {right:.0%} guessed right):\n"
            f"{text(torch.where(chosen, ord('_'), target))}\n--- the model's guesses:\n"
            f"{text(torch.where(chosen, guess, target))}")


def t5_text(ids) -> str:
    """T5 ids as text: bytes (U+FFFD where not UTF-8), sentinels as <k>; EOS and padding dropped."""
    out, run = [], []
    for t in ids:
        if t < 256:
            run.append(t)
            continue
        out.append(bytes(run).decode("utf-8", errors="replace"))
        run = []
        if t >= SENTINEL:
            out.append(f"<{t - SENTINEL}>")
    return "".join(out) + bytes(run).decode("utf-8", errors="replace")


def span_fill(params, data, cfg, mesh, args, device) -> str:
    """T5's sample: one held-out corrupted window, the spans it hides (the
    truth) and the model's greedy fill (`nanomeg.t5_generate`: the encoder
    once, then the decoder token by token with its caches)."""
    inputs = {k: v.to(device) for k, v in t5_batch(data, 1, args.seq, args.dec_seq, seed=10_000_019).items()}
    truth = inputs["targets"][0][inputs["loss_mask"][0].bool()].tolist()
    out = N.t5_generate({k: v.detach() for k, v in params.items()}, inputs["enc_ids"], cfg, mesh, len(truth),
                        enc_padding=inputs["enc_padding"], start_id=T5_PAD, eos_id=EOS, pad_id=T5_PAD,
                        temperature=0)[0, 1:].tolist()
    right = sum(a == b for a, b in zip(out, truth)) / len(truth)
    return (f"span fill-in (a held-out window; the model's greedy fill gets {right:.0%} of the {len(truth)} target "
            "ids in place):\n"
            f"input: {t5_text(inputs['enc_ids'][0].tolist())}\ntruth: {t5_text(truth)}\nmodel: {t5_text(out)}")


def retrieved(params, data, cfg, mesh, args, device) -> str:
    """The bi-encoder's report: this replica's first held-out query and the
    three blocks the index returns for it (* marks its own block)."""
    _, found = BiEncoderTask.index_eval(params, data, cfg, mesh, args, device)
    ev, share = found["eval_set"], found["share"]
    lines = [f"retrieval of a held-out query from the index of {len(ev['context_ids'])} held-out blocks:",
             f"query: {show(ev['query_ids'][share[0]])}"]
    for rank, block in enumerate(found["found"][0, :3].tolist(), 1):
        mark = "*" if block == share[0] else " "
        lines.append(f"{mark}{rank}. {show(ev['context_ids'][block])[:150]}")
    return "\n".join(lines)


@torch.no_grad()
def read_back(params, cfg, mesh, args, device) -> str:
    """REALM's report: a held-out masked query, the top-3 blocks the
    retriever finds (* marks its gold block) and the reader's fill given the first."""
    lines, ids, mask = RealmTask.state["corpus"]
    query = {k: v.to(device) for k, v in realm_queries(lines, 1, args.seq, seed=10_000_019).items()}
    q = N.embed_text(params, query["query_ids"], cfg, mesh, tower="query", attention_mask=query["query_mask"])
    _, top = N.search(q, RealmTask.state["index"], 3, cfg, mesh)
    top = top[0].tolist()
    pair = torch.cat([query["query_ids"], ids[top[:1]]], dim=1)
    types = torch.cat([torch.zeros_like(query["query_ids"]), torch.ones_like(ids[top[:1]])], dim=1)
    logits, _ = N.bert_pretrain(N.substack(params, "reader."), pair, N.reader_config(cfg), mesh, token_types=types,
                                attention_mask=torch.cat([query["query_mask"], mask[top[:1]]], dim=1))
    guess = P.gather_from_tp(logits, mesh)[0, : query["query_ids"].shape[1], :256].argmax(-1)
    chosen = query["target_mask"][0].bool()
    filled = torch.where(chosen, guess, query["targets"][0])
    right = (guess == query["targets"][0])[chosen].float().mean().item()
    gold = int(query["gold"][0])
    out = [f"retrieve-and-read of a held-out masked line ({int(chosen.sum())} bytes hidden as _, {right:.0%} "
           "restored by the reader from the first block):", f"query: {show(query['query_ids'][0])}",
           f"fill:  {show(filled)}"]
    out += [f"{'*' if z == gold else ' '}{i}. {show(ids[z])[:150]}" for i, z in enumerate(top, 1)]
    return "\n".join(out)


def sample(params, cfg, mesh, args, device) -> str:
    """The text to print: --sample-tokens bytes (default: all that fit) after
    --prompt's bytes, capped so prompt + sample fit in --seq (positions beyond
    it were never trained); the header says so when it cuts what was asked.
    Bytes that are not UTF-8 print as U+FFFD."""
    prompt = prompt_bytes(args)
    if args.tokenizer_obj is not None:
        prompt = args.tokenizer_obj.encode(prompt.decode("utf-8", errors="replace")).ids or [0]
    room = args.seq - len(prompt)
    n = room if args.sample_tokens is None else min(args.sample_tokens, room)
    out = N.generate({k: v.detach() for k, v in params.items()}, torch.tensor([list(prompt)], device=device),
                     cfg, mesh, n, temperature=0.8, top_k=40, seed=args.seed)
    if args.tokenizer_obj is not None:
        return "sample:\n" + args.tokenizer_obj.decode(out[0].tolist())
    capped = args.sample_tokens is not None and n < args.sample_tokens
    note = f" ({n} of --sample-tokens {args.sample_tokens} bytes: --prompt + sample must fit in --seq {args.seq})"
    return f"sample{note if capped else ''}:\n" + bytes(out[0].tolist()).decode("utf-8", errors="replace")


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


# ---------------------------------------------------------------------------
# Checkpoints: sharded (each rank writes its pieces), atomic (a rename commits),
# resharding (a load reads what overlaps this rank's pieces, at any layout)
# ---------------------------------------------------------------------------

LAYOUT_FIELDS = ("sequence_parallel", "vocab_multiple", "recompute", "attention")  # free to change on resume
STEP_DIR = re.compile(r"step-(\d{8})")


def config_dict(cfg) -> dict:
    """The config as plain JSON values, without the fields a layout may change."""
    import dataclasses

    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in LAYOUT_FIELDS}


def checkpoint_tensors(params: dict, moments: dict, cfg, mesh: P.Mesh, specs: dict) -> dict:
    """{key: (local tensor, its pieces, full shape)} of everything a checkpoint
    holds for this rank: "param/NAME", "exp_avg/NAME", "exp_avg_sq/NAME".
    A piece is written by one rank only: dp rank 0 (the replicas hold the
    same), tp rank 0 for a replicated tensor, the first stage for a tied
    embedding; vocabulary tables only up to their real rows."""
    skip = N.norm_skip(cfg, mesh)  # the last stage's copy of a tied embedding: the first stage writes it
    out = {}
    for name, p in params.items():
        real = N.real_vocab_rows(name, P.full_shape_of(p.shape, specs[name], mesh), cfg)
        replicas = "edp" if isinstance(specs[name], P.Experts) else "dp"  # the ranks holding the same piece
        ps = [pc._replace(writer=pc.writer and mesh.rank(replicas) == 0 and mesh.cp_rank == 0 and name not in skip)
              for pc in P.pieces(p.shape, specs[name], mesh, real)]
        full = P.full_shape_of(p.shape, specs[name], mesh, real)
        for key, t in (("param", p), ("exp_avg", moments[name][0]), ("exp_avg_sq", moments[name][1])):
            out[f"{key}/{name}"] = (t, ps, full)
    return out


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str, step: int, params, opt, cfg, mesh: P.Mesh, specs, args) -> Path:
    """Save step's state under root/step-NNNNNNNN, atomically. Every rank
    writes its pieces into root/.tmp-step-NNNNNNNN (torch.distributed.checkpoint,
    files flushed); rank 0 adds meta.json (config, layout, step, the index of
    every piece), flushes it, renames the folder to step-NNNNNNNN (the commit:
    a folder under that name is complete), then points root/latest at it
    (written aside, renamed over) and prunes to --keep-last (`prune_checkpoints`).
    A kill at any moment leaves the previous checkpoint loadable and no
    partial one that a load would pick."""
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that was killed
            shutil.rmtree(tmp)
    barrier()
    tensors = checkpoint_tensors(opt.main_params(), opt.moments(), cfg, mesh, specs)  # fp32 under --bf16 too
    index = P.save_pieces(tmp, tensors, mesh)
    indexes = gather_to_rank0(index)
    if rank == 0:
        meta = dict(format=1, model=args.model, step=step, optimizer_steps=opt.steps, config=config_dict(cfg),
                    layout=dict(tp=mesh.tp, pp=mesh.pp, dp=mesh.dp, ep=mesh.ep, cp=mesh.cp, zero=args.zero,
                                virtual_stages=args.virtual_stages),
                    seed=args.seed, index={k: v for part in indexes for k, v in part.items()})
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        old = root / f".old-step-{step:08d}"
        if final.exists():  # the same step saved again (a new run in the same folder)
            final.rename(old)
        tmp.rename(final)  # the commit
        fsync_path(root)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        with open(pointer) as f:
            os.fsync(f.fileno())
        os.replace(pointer, root / "latest")
        fsync_path(root)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        if args.keep_last:
            prune_checkpoints(root, args.keep_last, final)
    barrier()
    return final


def barrier() -> None:
    if torch.distributed.is_initialized():
        with P.waiting("a barrier of every rank"):  # a hang here names it (parallel.report)
            torch.distributed.barrier()


def prune_checkpoints(root: Path, keep: int, written: Path) -> None:
    """--keep-last K: keep `written` (the save just made) and the K - 1
    newest committed steps before it; remove the older ones. Steps after it
    (another run's, which check_save_folder refuses up front) are never
    counted nor removed, so neither the new checkpoint nor what `latest`
    names can go."""
    before = [d for d in committed_steps(root) if d.name < written.name]
    for stale in before[:max(0, len(before) - (keep - 1))]:
        gone = root / f".old-{stale.name}"
        stale.rename(gone)  # first out of the step-* names, so a kill mid-delete leaves no broken step
        shutil.rmtree(gone, ignore_errors=True)


def committed_steps(root: Path) -> list[Path]:
    """root's committed checkpoints (step-NNNNNNNN folders with their
    meta.json: a save renames a finished folder to that name), oldest first."""
    try:
        return sorted(d for d in root.iterdir() if STEP_DIR.fullmatch(d.name) and (d / "meta.json").is_file())
    except OSError as e:
        raise UsageError(f"{root}: cannot list it ({e.strerror})") from None


def find_checkpoint(root: str) -> Path | None:
    """The checkpoint --load DIR resumes from: DIR itself when it is a
    committed step folder, else the newest committed step folder in DIR;
    None when DIR holds none (or does not exist): the run starts fresh.
    `latest` is not read: it names that same folder, but for a kill between
    a commit and latest's update, after which it names the one before
    (both whole: the newest loses less)."""
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise UsageError(f"--load {root}: not a folder")
    if STEP_DIR.fullmatch(root.name) and (root / "meta.json").is_file():
        return root
    steps = committed_steps(root)
    return steps[-1] if steps else None


def check_output_folder(path: str, what: str) -> None:
    """An output folder (--save DIR, --export-hf OUT) is one, or can be
    made: its nearest existing ancestor is a folder this process may write
    in. Checked before the first step, so a run is never lost at its end."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {path}: not a folder (a file is there)")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: not a folder, nor one that can be made ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {parent} is not writable")


def check_save_folder(root: str, start: int, loaded: Path | None) -> None:
    """--save DIR must not hold committed steps after the one this run
    starts from (another run's, or this run's abandoned future): a later
    --load DIR takes the newest step, so it would resume those, and
    --keep-last would count them. --load DIR (its newest) resumes from them."""
    later = [d for d in committed_steps(Path(root)) if int(d.name[5:]) > start] if Path(root).is_dir() else []
    if later:
        since = f"resumes from {loaded} (step {start})" if loaded else "starts fresh (step 0)"
        raise UsageError(f"--save {root} holds {later[-1].name}, later than this run, which {since}: the next "
                         f"--load {root} would resume that; --load {root} to continue it, or save elsewhere")


META_TYPES = {"format": int, "model": str, "step": int, "optimizer_steps": int, "config": dict, "layout": dict,
              "index": dict}  # what a load reads from meta.json


def check_meta(meta, folder: Path) -> None:
    """meta.json is data from a file: an object with every key a load reads,
    of its type; the step its folder's name says, optimizer steps 0..step;
    a layout of sizes >= 1; an index that parallel.check_index passes.
    ValueError naming the first fault."""
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    for key, kind in META_TYPES.items():
        if key not in meta:
            raise ValueError(f"no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ValueError(f"{key!r} is {str(meta[key])[:60]!r}, not {kind.__name__}")
    named = STEP_DIR.fullmatch(folder.name)
    if (named and meta["step"] != int(named[1])) or not 0 <= meta["optimizer_steps"] <= meta["step"]:
        raise ValueError(f"step {meta['step']} and optimizer_steps {meta['optimizer_steps']} in a folder named "
                         f"{folder.name}")
    sizes = {k: meta["layout"].get(k, 1) for k in ("tp", "pp", "dp", "cp", "ep")}
    if not all(type(v) is int and v >= 1 for v in sizes.values()) or meta["layout"].get("zero") not in (0, 1):
        raise ValueError(f"layout {str(meta['layout'])[:200]}: tp, pp, dp, cp, ep must be ints >= 1, zero 0 or 1")
    P.check_index(meta["index"])


def read_meta(path: Path, cfg, args) -> dict:
    """The checkpoint's meta.json (plain JSON: nothing in it runs), checked
    (`check_meta`) and against this run: the same model and config but for
    the layout fields."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"--load {path}: cannot read meta.json ({str(e)[:200]})") from None
    if isinstance(meta, dict) and (meta.get("format") != 1 or meta.get("model") != args.model):
        raise UsageError(f"--load {path}: a checkpoint of --model {str(meta.get('model'))[:60]} (format "
                         f"{str(meta.get('format'))[:60]}), this run is --model {args.model}")
    try:
        check_meta(meta, path)
    except ValueError as e:
        raise UsageError(f"--load {path}: meta.json: {e}") from None
    want, got = config_dict(cfg), meta["config"]
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if differ:
        raise UsageError(f"--load {path}: the checkpoint's model differs from this run's in "
                         + ", ".join(f"{k} ({got.get(k)!r} saved, {want.get(k)!r} now)" for k in differ))
    return meta


def load_checkpoint(path: Path, meta: dict, params, opt, cfg, mesh: P.Mesh, specs) -> int:
    """Fill this rank's parameters and optimizer state from the checkpoint,
    whatever layout saved it; return its step. Checkpoints hold fp32 (the
    main copy under --bf16): bf16 parameters are read into fp32 tensors,
    which become the optimizer's main copy, and then cast."""
    wide = lambda p: torch.zeros_like(p, dtype=torch.float32 if p.dtype == torch.bfloat16 else p.dtype)
    main = {n: wide(p) for n, p in params.items()}
    moments = {n: (wide(p), wide(p)) for n, p in params.items()}
    tensors = checkpoint_tensors(main, moments, cfg, mesh, specs)
    if meta["optimizer_steps"] == 0:
        tensors = {k: v for k, v in tensors.items() if k.startswith("param/")}
    try:
        P.load_pieces(path, tensors, meta["index"])
    except ValueError as e:  # the library says what is wrong in one line
        raise UsageError(f"--load {path}: {str(e)[:500]}") from None
    opt.load_state(moments, meta["optimizer_steps"], main)
    return meta["step"]


# ---------------------------------------------------------------------------
# --show-layout: what each rank holds and what one step moves
# ---------------------------------------------------------------------------

PHASES = ("forward", "backward", "after backward")  # train_step's order
MESH_ORDER = ("tp", "cp", "ep", "dp", "dpcp", "edp", "pp")
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
LAYER = re.compile(r"((?:\w+\.)?)layers\.(\d+)\.(.+)")  # (stack prefix, layer, name in the layer)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def rank_layout(params: dict, inputs: dict, task, cfg, mesh: P.Mesh, specs: dict, args, step: int = 1) -> dict:
    """This rank's picture, for `format_layout`. Collective only where the
    step itself is: every rank of the mesh must call it together.

    * host: (host name, local rank on it): where torchrun put this rank;
    * rank, mesh: the global rank (`Mesh.global_rank`, Megatron's order:
      ((pp_rank·dp + dp_rank)·cp + cp_rank)·tp + tp_rank) and the sizes and
      this rank's coordinates of every mesh dim in use (tp, cp, dp, pp, ep, ...);
    * shards: `P.shard_layout` of the task's full shapes (name, local_shape,
      full_shape, slice_desc), from the specs and the mesh alone; a ValueError
      if params (this rank's shards, as `P.shard` makes them) disagree;
    * bytes: weights, their grads (the gradient buckets' buffers: one element
      per weight, in fp32 for bf16 weights, plus ZeRO's padding) and AdamW's
      state, as measured on the optimizer after the step;
    * comms: the collectives of one real `train_step` at `step` on inputs
      (the task's batch), run on a throwaway copy of params with a fresh
      AdamW, so params are untouched; each {op, dim, phase, elements, dtype, bytes}."""
    shapes = {name: shape for name, (shape, _) in task.shapes(cfg).items()}
    if args.model in N.PIPELINE_MODELS:  # this pipeline rank's stage only
        shapes = N.stage_params(shapes, cfg, mesh, args.virtual_stages)
    shards = P.shard_layout(shapes, specs, mesh)
    if set(params) != set(shapes):
        raise ValueError(f"params and the model's shapes differ: {sorted(set(params) ^ set(shapes))}")
    for row in shards:
        if tuple(params[row["name"]].shape) != row["local_shape"]:
            raise ValueError(f"{row['name']} has shape {list(params[row['name']].shape)} but this rank's shard of "
                             f"{list(row['full_shape'])} is {list(row['local_shape'])}: pass P.shard's output")
    throwaway = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = make_optimizer(throwaway, args, mesh, specs, cfg)
    with P.count_comms() as comms:
        train_step(throwaway, opt, inputs, task, cfg, mesh, specs, args, step)
    weights = sum(p.numel() * p.element_size() for p in throwaway.values())
    moments = opt.state_bytes()
    return dict(
        rank=mesh.global_rank(), host=(socket.gethostname(), int(os.environ.get("LOCAL_RANK", "0"))),
        mesh={d: (mesh.rank(d), mesh.size(d)) for d in MESH_ORDER
              if (mesh.ep > 1 or d not in ("ep", "edp")) and (mesh.cp > 1 or d not in ("cp", "dpcp"))},
        shards=shards,
        bytes=dict(weights=weights, grads=sum(b["buf"].numel() * b["buf"].element_size() for b in opt.buckets.buckets),
                   moments=moments,
                   dtypes=sorted({dtype_name(p.dtype) for p in throwaway.values()})),
        comms=[dict(op=c["op"], dim=c["dim"], phase=c["phase"], elements=c["elements"],
                    dtype=dtype_name(c["dtype"]), bytes=c["elements"] * c["dtype"].itemsize) for c in comms])


def shard_lines(shards: list[dict]) -> list[str]:
    """One line per tensor: name, local shape, slice. In each stack (T5 has
    two), the layers that hold the same shards as its first layer here (all
    of them, today) are one line."""
    layers = {}  # stack prefix -> layer -> its rows
    for row in shards:
        if m := LAYER.fullmatch(row["name"]):
            layers.setdefault(m[1], {}).setdefault(int(m[2]), []).append(
                (m[3], row["local_shape"], row["full_shape"], row["slice_desc"]))
    first = {stack: min(ls) for stack, ls in layers.items()}
    repeats = {stack: [i for i in sorted(ls) if i != first[stack] and ls[i] == ls[first[stack]]]
               for stack, ls in layers.items()}
    here = sum(math.prod(r["local_shape"]) for r in shards)
    lines = [f"  parameters: {len(shards)} tensors, {here:,} of their full "
             f"tensors' {sum(math.prod(r['full_shape']) for r in shards):,} elements"]
    rows = [r for r in shards if not ((m := LAYER.fullmatch(r["name"])) and int(m[2]) in repeats[m[1]])]
    width = max(len(r["name"]) for r in rows)
    shape_width = max(len(str(list(r["local_shape"]))) for r in rows)
    for row in rows:
        lines.append(f"    {row['name']:<{width}}  {str(list(row['local_shape'])):<{shape_width}}  {row['slice_desc']}")
        for stack, ls in layers.items():
            i = first[stack]
            if repeats[stack] and row["name"] == f"{stack}layers.{i}.{ls[i][-1][0]}":  # after the first layer
                lines.append(f"    {stack}layers.{C.span(repeats[stack])}: the same {len(ls[i])} shards as "
                             f"{stack}layers.{i} ({len(ls)} layers, {len(ls) * len(ls[i])} layer tensors in all)")
    return lines


def memory_line(nbytes: dict) -> str:
    """What the parameters cost this rank: weights + grads + AdamW's moments."""
    total = nbytes["weights"] + nbytes["grads"] + nbytes["moments"]
    return (f"  memory: weights {nbytes['weights']:,} B ({'/'.join(nbytes['dtypes'])}) + grads {nbytes['grads']:,} B "
            f"+ AdamW state {nbytes['moments']:,} B = {total:,} B ({total / 2**20:.2f} MiB)")


def comm_lines(comms: list[dict]) -> list[str]:
    """The step's collectives grouped by mesh dim and phase; within a group
    one line per (op, elements, dtype) with how many were issued; then the total."""
    if not comms:
        return ["  collectives in one training step: none (no mesh dim of more than one rank)"]
    order = lambda seq, known: sorted(set(seq), key=lambda v: (known.index(v) if v in known else len(known), v))
    lines, rows = ["  collectives in one training step (parallel.count_comms), by mesh dim and phase:"], []
    for dim in order([c["dim"] for c in comms], MESH_ORDER):
        for phase in order([c["phase"] for c in comms if c["dim"] == dim], PHASES):
            groups = {}
            for c in comms:
                if (c["dim"], c["phase"]) == (dim, phase):
                    groups.setdefault((c["op"], c["elements"], c["dtype"]), []).append(c)
            label = f"{dim} {phase}"
            for (op, elements, dtype), same in sorted(groups.items(), key=lambda kv: -kv[0][1]):  # largest first
                rows.append((f"{label:<20} {len(same):>3} x {op:<14} {elements:>11,} el {dtype}",
                             elements * len(same), sum(c["bytes"] for c in same)))
                label = ""
    rows.append((f"{'total':<20} {len(comms):>3} collectives", sum(c["elements"] for c in comms),
                 sum(c["bytes"] for c in comms)))
    width = max(len(left) for left, _, _ in rows)
    lines += [f"    {left:<{width}}  = {elements:>12,} el {nbytes:>13,} B" for left, elements, nbytes in rows]
    return lines


def format_layout(picture: dict) -> str:
    """One rank's picture (`rank_layout`) as text."""
    where = ", ".join(f"{d} rank {r} of {n}" for d, (r, n) in picture["mesh"].items())
    host, local = picture["host"]
    return "\n".join([f"rank {picture['rank']}: {where}; host {host}, local rank {local}",
                      *shard_lines(picture["shards"]), memory_line(picture["bytes"]), *comm_lines(picture["comms"])])


def gather_to_rank0(obj) -> list | None:
    """Every rank's obj, in rank order, on rank 0 (None on the others); [obj]
    without a process group. A pickled gather: not a model collective."""
    if not torch.distributed.is_initialized():
        return [obj]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = [None] * world if rank == 0 else None
    with P.waiting("a gather of every rank's figures to rank 0"):
        torch.distributed.gather_object(obj, out, dst=0)
    return out


def show_layout(params, data, task, cfg, mesh, specs, args, device) -> None:
    """--show-layout: every rank's picture, printed by rank 0 in rank order.
    The step runs on the batch step 1 would train on, on a copy of params."""
    inputs = {k: v.to(device) for k, v in task.batch(data, args, batch_seed(args, 1, mesh)).items()}
    pictures = gather_to_rank0(rank_layout(params, inputs, task, cfg, mesh, specs, args))
    if pictures is not None:
        print(f"layout: {len(pictures)} rank(s); one training step = batch {args.batch} x seq {args.seq} per "
              "data-parallel replica, run on a copy of the parameters; then exit without training")
        print("\n\n".join(map(format_layout, pictures)))


def stop_requested(stop: dict, device) -> bool:
    """Did any rank get SIGTERM / SIGINT? One all-reduce (max) of one
    element over all ranks, so every rank stops after the same step."""
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def rank_params(task, cfg, mesh: P.Mesh, specs: dict, args) -> dict:
    """This rank's parameters: the full init (the same on every rank), cut
    to its tp shards and, for a pipelined model, to its pipeline stage's names;
    bf16 under --bf16 (the one place that decides the parameters' dtype)."""
    full = task.init(cfg, args.seed) if args.init_hf is None else hf_params(args, cfg)
    if args.bf16:
        full = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in full.items()}
    local = P.shard(full, specs, mesh)
    return N.stage_params(local, cfg, mesh, args.virtual_stages) if args.model in N.PIPELINE_MODELS else local


def hf_params(args, cfg) -> dict:
    """The full parameters of --init-hf DIR's model.safetensors (read with safetensors: no code runs)."""
    path = Path(args.init_hf) / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"--init-hf {args.init_hf}: no model.safetensors there")
    try:
        if args.model == "bert":
            return N.from_hf_bert(str(path), cfg)
        return N.from_hf_gpt2(str(path), cfg)
    except ValueError as e:
        raise UsageError(f"--init-hf {args.init_hf}: {e}") from None


def export_hf(params: dict, cfg, mesh: P.Mesh, specs: dict, args) -> str | None:
    """--export-hf OUT: the full model (this rank's stages gathered, then its
    tp shards) on rank 0, written as config.json + model.safetensors."""
    full = {k: P.unshard_tensor(v.detach(), specs[k], mesh) for k, v in params.items()}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return None
    from safetensors.torch import save_file

    config_of, to_hf, _ = HF_EXPORTS[args.model]
    out = Path(args.export_hf)
    models = to_hf(full, cfg)
    parts = {sub: (out / sub, sd) for sub, sd in models.items()} if args.model == "biencoder" else {"": (out, models)}
    arch = {"question_encoder": "DPRQuestionEncoder", "ctx_encoder": "DPRContextEncoder"}
    for sub, (folder, sd) in parts.items():
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.float().cpu().contiguous() for k, v in sd.items()}
        if args.model == "gpt":
            state.pop("lm_head.weight")  # tied to transformer.wte.weight: safetensors stores a tensor once
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = config_of(cfg) | ({"architectures": [arch[sub]]} if sub else {})
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    what = " and ".join(f"{sub}/" for sub in parts if sub) or "config.json + model.safetensors"
    return f"exported the model in Hugging Face's format to {out} ({what})"


def gather_stages(params: dict, task, cfg, mesh: P.Mesh, specs: dict, args, device) -> dict:
    """Every parameter of this rank's tp shard, from whichever pipeline rank
    holds it: one broadcast over pp per tensor from its first holder. For the
    end-of-run demos (sampling, fill-in), which run the whole model on every rank."""
    out = {}
    template = P.shard(task.init(cfg, args.seed), specs, P.Mesh(tp=mesh.tp, tp_rank=mesh.tp_rank))
    stages = [N.stages_of(cfg, P.Mesh(tp=mesh.tp, pp=mesh.pp, pp_rank=r), args.virtual_stages).values()
              for r in range(mesh.pp)]
    for name, like in template.items():
        owner = next(r for r in range(mesh.pp) if any(N.owned_by(name, s, cfg) for s in stages[r]))
        x = params[name].detach().clone() if mesh.pp_rank == owner else torch.empty_like(like, device=device)
        torch.distributed.broadcast(x, src=mesh.pp_peer(owner - mesh.pp_rank), group=mesh.group("pp"))
        out[name] = x
    return out


def comm_by_dim(comms: list[dict]) -> dict[str, tuple[int, int]]:
    """Elements and bytes moved in one step, per mesh dim, in MESH_ORDER:
    {dim: (elements, bytes)} (pp: the sends only, each transfer once)."""
    per = {}
    for c in comms:
        if c["op"] != "recv":
            elements, nbytes = per.get(c["dim"], (0, 0))
            per[c["dim"]] = (elements + c["elements"], nbytes + c["elements"] * c["dtype"].itemsize)
    return dict(sorted(per.items(), key=lambda kv: MESH_ORDER.index(kv[0]) if kv[0] in MESH_ORDER else 9))


def comm_per_dim(per: dict[str, tuple[int, int]]) -> str:
    """comm_by_dim as the log line says it: 'tp 1,234 + pp 567 + dp 89'; '0' when nothing moved."""
    return " + ".join(f"{d} {n:,}" for d, (n, _) in per.items()) or "0"


def measured_bubble(clock: dict, mesh: P.Mesh) -> float | None:
    """Since the last log line, the largest over pipeline ranks of the time a
    rank waited for a neighbour over the time it computed (the simulator's
    idle / busy); None without a pipeline. Collective over pp."""
    if mesh.pp == 1 or not clock.get("run"):
        return None
    wait = clock.get("wait", 0.0)
    frac = torch.tensor([wait / max(clock["run"] - wait, 1e-9)], dtype=torch.float64)  # idle / busy, as simulated
    return P.all_reduce(frac, mesh, "pp", phase="log", op=torch.distributed.ReduceOp.MAX).item()


def bubble_note(bubble: float | None) -> str:
    """' | bubble 23% measured', '' without a pipeline."""
    return "" if bubble is None else f" | bubble {bubble:.0%} measured"


@contextlib.contextmanager
def held_stderr():
    """Hold what is written to file descriptor 2 (C++ logs too) while the
    block runs: written out after it if it succeeds, dropped if it raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


def join(timeout: timedelta) -> tuple[int, int]:
    """P.init_distributed, with a rendezvous that fails (nobody at
    MASTER_ADDR:MASTER_PORT, or not every rank there) within the timeout
    said in one line by each rank that sees it. -> (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return P.init_distributed(timeout)
    try:
        with held_stderr():  # torch's C++ store logs each retry with a stack of frames: say one line instead
            return P.init_distributed(timeout)
    except (RuntimeError, TimeoutError) as e:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UsageError(f"rank {os.environ.get('RANK', '?')} could not join the {os.environ.get('WORLD_SIZE')} ranks "
                         f"at {where} within --timeout {timeout.total_seconds():g} s: "
                         f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", every_rank=True) from None


def open_log(args, cfg, mesh: P.Mesh, start: int, say) -> runlog.RunLog:
    """Rank 0's --log-dir: a new log (run.json), or, resumed (args.log_old), a resume record appended."""
    layout = dict(tp=mesh.tp, cp=mesh.cp, pp=mesh.pp, dp=mesh.dp, ep=mesh.ep, zero=args.zero,
                  virtual_stages=args.virtual_stages, world=mesh.tp * mesh.cp * mesh.pp * mesh.dp)
    flags = {k: v for k, v in vars(args).items() if k not in ("tokenizer_obj", "load_meta", "log_old", "log")}
    info = runlog.run_info(args.model, config_dict(cfg), layout, flags | dict(load_path=args.load_path and str(args.load_path)))
    resume = None if args.log_old is None else dict(kind="resume", step=start - 1, loaded=str(args.load_path),
                                                    flags=info["flags"], versions=info["versions"])
    log = runlog.RunLog(args.log_dir, info, resume)
    for note in log.notes:
        say(note)
    say(f"log: {'appending to' if resume else 'writing'} {args.log_dir}/{runlog.METRICS}"
        + ("" if log.tb is None else f" and TensorBoard events in {args.log_dir}/{runlog.TB}"))
    return log


def planned_memory(cfg, mesh: P.Mesh, args, device) -> list[int] | None:
    """Each rank's bytes at its peak as `plan.rank_plan` plans them for this very run (weights, gradients,
    optimizer state, the activations of the schedule's peak), in rank order, for the log line beside the
    measured peak; None where the plan does not cover the run (models other than GPT) or a world of more
    than 64 ranks (the line then shows the largest measured figure alone)."""
    world = mesh.tp * mesh.cp * mesh.pp * mesh.dp
    if args.model != "gpt" or world > 64:
        return None
    layout = dict(tp=mesh.tp, pp=mesh.pp, dp=mesh.dp, cp=mesh.cp, ep=mesh.ep, v=args.virtual_stages,
                  micro_batch=args.batch // args.microbatches, seq=args.seq, microbatches=args.microbatches,
                  schedule=args.schedule, zero=args.zero, bf16=args.bf16, bucket_mb=args.bucket_mb,
                  triton=kernels.uses_triton(torch.empty(0, device=device)))
    return [PL.rank_plan(cfg, r, **layout)["bytes"]["total"] for r in range(world)]


def trace_schedule(spans: list, step: int, mesh: P.Mesh, args, log) -> None:
    """--trace-step: every rank's actions of this step to rank 0, which writes schedule.json and trace.json."""
    coords = dict(rank=mesh.global_rank(), pp_rank=mesh.pp_rank, tp_rank=mesh.tp_rank, dp_rank=mesh.dp_rank)
    ranks = gather_to_rank0(runlog.rank_trace(spans, coords))
    if log:
        record = runlog.schedule_record(step, args.schedule, mesh.pp, args.virtual_stages, args.microbatches, ranks)
        paths = runlog.write_schedule(args.log_dir, record)
        print(f"traced step {step}: {' and '.join(map(str, paths))}")


def train(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if args.plan or args.plan_search:  # a plan: no model, no processes
        print(plan_report(args))
        return 0
    if args.show_schedule:  # a simulation: no model, no processes
        check_ranges(args)
        check_pipeline_args(args)
        print(show_schedule(args))
        return 0
    cfg, tp = check_args(args, world)
    check_memory(cfg, args, tp, device)
    if args.compile:
        check_compile(device)
    texts, source = load_corpus(args.data)
    train_data, eval_data = split_corpus(texts, args.seq)
    if args.model in ("biencoder", "realm"):
        check_lines(train_data, eval_data, args)
    if args.tokenizer_obj is not None:
        train_data, eval_data = tokenize(args, train_data), tokenize(args, eval_data)

    timeout = timedelta(seconds=args.timeout)  # nccl and one GPU per rank when CUDA is there, else gloo on CPU
    rank, world = join(timeout)
    torch.manual_seed(args.seed)
    mesh = P.Mesh.build(tp=tp, pp=args.pp, ep=args.ep, cp=args.cp, timeout=timeout)
    P.locate(mesh)  # a failure or a hang names this rank's place (P.report)
    if world > 1:
        P.start_watchdog(args.timeout)
    say = print if rank == 0 else (lambda *a, **k: None)
    task = TASKS[args.model]
    specs = task.specs(cfg)
    params = {k: v.to(device).requires_grad_(True) for k, v in rank_params(task, cfg, mesh, specs, args).items()}
    opt = make_optimizer(params, args, mesh, specs, cfg)
    n_params = N.num_params(cfg, task.shapes)
    tokens_per_step = args.batch * args.seq * mesh.dp
    flops_per_step = task.flops(cfg, args.batch * mesh.dp, args.seq)
    say(f"data: {source}: {len(train_data):,} training bytes, {len(eval_data):,} held out")
    stacks = cfg.stacks()  # T5: encoder, decoder; a bi-encoder: query, context (REALM: + reader)
    layers = "+".join(map(str, stacks.values())) + \
        (f" ({'+'.join(p.rstrip('.') or 'retriever' for p in stacks)})" if len(stacks) > 1 else "")
    say(f"model: {task.name} {layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, {cfg.norm_order}-norm, "
        f"{n_params / 1e6:.2f}M parameters (vocab {cfg.vocab_size} padded to {cfg.padded_vocab}); "
        f"mesh tp={mesh.tp}{f' cp={mesh.cp}' if mesh.cp > 1 else ''} pp={mesh.pp} dp={mesh.dp}"
        f"{f' (ep={mesh.ep})' if mesh.ep > 1 else ''}"
        f"{', sequence parallel' if cfg.sequence_parallel else ''}"
        f"{', bf16' if args.bf16 else ''}{', ZeRO-1' if args.zero else ''}")
    if getattr(cfg, "experts", 0):
        moe_layers = sum(cfg.is_moe(i) for i in range(cfg.layers))
        per_expert = sum(math.prod(shape) for name, (shape, _) in N.moe_shapes("moe", cfg).items()
                         if "router" not in name) // cfg.experts
        active = N.num_params(cfg) - moe_layers * (cfg.experts - cfg.moe_topk) * per_expert  # k experts per token
        say(f"experts: {moe_layers} of {cfg.layers} layers have {cfg.experts} experts, top-{cfg.moe_topk}, "
            f"{'dropless' if cfg.moe_capacity is None else f'capacity factor {cfg.moe_capacity:g}'}; "
            f"{active / 1e6:.2f}M parameters active per token; aux loss x {cfg.moe_aux_loss:g}, z-loss x "
            f"{cfg.moe_z_loss:g}" + (f"; ep={mesh.ep}: each rank holds {cfg.experts // mesh.ep} experts of each layer, "
                                     f"their gradients averaged over the {mesh.dp // mesh.ep} rank(s) holding the "
                                     "same ones" if mesh.ep > 1 else ""))
    if args.model in N.PIPELINE_MODELS and (mesh.pp > 1 or args.microbatches > 1):
        sim = P.simulate(P.schedule_for(args.schedule, mesh.pp, args.microbatches, args.virtual_stages),
                         args.virtual_stages)
        held = ", ".join(C.span(list(r)) for r in P.stage_layers(cfg.layers, mesh.pp, args.virtual_stages))
        say(f"pipeline: {args.schedule}, {args.microbatches} microbatches of {args.batch // args.microbatches}, "
            f"virtual stages hold layers {held}; simulated bubble {sim['bubble']:.1%} of the compute "
            f"(--show-schedule draws it)")
    if mesh.dp * mesh.cp > 1:
        over = f"dp x cp = {mesh.dp * mesh.cp}" if mesh.cp > 1 else f"dp = {mesh.dp}"
        sliced = sum(b["shard"].numel() for b in opt.buckets.buckets)
        say(f"data parallel: {len(opt.buckets.buckets)} gradient bucket(s) of <= {args.bucket_mb:g} MB, each "
            f"{'reduce-scattered' if args.zero else 'all-reduced'} over {over} as soon as its gradients are in"
            + (f" (the experts' over the dp / ep = {mesh.dp // mesh.ep} rank(s) that hold them)" if mesh.ep > 1 else "")
            + (f"; ZeRO-1: AdamW state {opt.state_bytes():,} B on rank 0, measured from storage: the fp32 main copy "
               f"+ 2 moments of its slice of each bucket, 12 B x {sliced:,} elements" if args.zero else ""))
    start = 1
    if args.load_path is not None:
        saved = args.load_meta["layout"]
        start = load_checkpoint(args.load_path, args.load_meta, params, opt, cfg, mesh, specs) + 1
        saved_cp = f" cp={saved['cp']}" if saved.get("cp", 1) > 1 else ""
        say(f"loaded {args.load_path} (step {start - 1}; saved at tp={saved['tp']}{saved_cp} pp={saved['pp']} "
            f"dp={saved['dp']}"
            f"{' ZeRO-1' if saved['zero'] else ''}, resharded to this run's layout)")
    elif args.load is not None:
        say(f"--load {args.load}: no checkpoint there yet, starting fresh")
    stop = {}  # SIGTERM / SIGINT: finish the step, save, exit 0 (or, blocked for good, the watchdog reports)

    def on_signal(signum, frame):
        stop.setdefault("signal", signal.Signals(signum).name)
        P.WHERE["signal"] = (time.monotonic(), signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    refresh = getattr(task, "refresh", lambda *a: None)  # REALM's index of its corpus
    refresh(params, train_data, cfg, mesh, args, device, start)
    if args.show_layout:
        show_layout(params, train_data, task, cfg, mesh, specs, args, device)
        return 0
    peak = args.peak_flops or measure_peak_flops(args, device)
    say(f"MFU is against {peak / 1e9:,.1f} GFLOP/s per rank ("
        f"{'--peak-flops' if args.peak_flops else 'measured: a matmul on this device, all ranks at once'})")
    log = args.log = open_log(args, cfg, mesh, start, say) if rank == 0 and args.log_dir else None
    planned = planned_memory(cfg, mesh, args, device) if rank == 0 else None
    if planned:
        say(f"memory planned per rank (plan.rank_plan: weights, grads, optimizer state, activations at the peak): "
            f"{'/'.join(f'{b / 2**20:.1f}' for b in planned)} MiB; each log line ends with the measured peak")

    def say_eval(step):
        metrics = evaluate(params, eval_data, task, cfg, mesh, args, device)
        if hasattr(task, "index_eval"):  # the bi-encoder: retrieval from an index of held-out blocks
            metrics |= task.index_eval(params, eval_data, cfg, mesh, args, device)[0]
        say(f"eval loss at step {step}: {metrics['loss']:.4f}{metrics_line(metrics, 'eval')}")
        if log:
            log.write(runlog.eval_record(step, step * tokens_per_step, metrics))

    say_eval(start - 1)

    bar = runlog.Progress(args.steps, rank == 0, start - 1, tokens_per_step)
    clock = {}  # seconds this rank waited for its pipeline neighbours, and ran its schedule
    t_last, steps_since, last_finite, mem_peak = time.perf_counter(), 0, None, 0
    for step in range(start, args.steps + 1):
        P.at(step)
        refresh(params, train_data, cfg, mesh, args, device, step)
        inputs = {k: v.to(device) for k, v in task.batch(train_data, args, batch_seed(args, step, mesh)).items()}
        if step == args.trace_step:
            clock["trace"] = []
        measured = runlog.measured_memory(params, opt.state_bytes, device, opt.buckets.grads)  # fp32 grads: theirs
        with P.count_comms() as comms, measured as memory:
            metrics, grad_norm = train_step(params, opt, inputs, task, cfg, mesh, specs, args, step, clock)
        mem_peak = max(mem_peak, memory["peak"])
        if step == args.trace_step:
            trace_schedule(clock.pop("trace"), step, mesh, args, log)
        moe = moe_stats(metrics.pop("moe", None), mesh)
        metrics = logged_metrics(metrics, mesh)
        loss_value = metrics["loss"]
        norm_value = grad_norm.item()  # the same on every rank, so every rank stops at the same step
        if math.isfinite(norm_value):
            last_finite = (step, norm_value)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            bar.clear()
            raise UsageError(diverged_message(step, loss_value, norm_value, last_finite, args))
        steps_since += 1
        bar.update(step, loss_value)
        if step % args.log_every == 0 or step == args.steps:
            dt = (time.perf_counter() - t_last) / steps_since
            t_last, steps_since = time.perf_counter(), 0
            flops = flops_per_step / dt
            comm, bubble, peaks = comm_by_dim(comms), measured_bubble(clock, mesh), gather_to_rank0(mem_peak)
            bar.clear()
            say(f"step {step:5d} | loss {loss_value:.4f}{metrics_line(metrics, 'log')} | lr {lr_at(step, args):.2e} "
                f"| grad norm "
                f"{norm_value:.3f} | {tokens_per_step / dt:,.0f} tok/s | {flops / 1e9:.2f} GFLOP/s | "
                f"MFU {flops / (world * peak):.1%} | comm {comm_per_dim(comm)} el/step{bubble_note(bubble)}"
                f"{moe_summary(moe)}{runlog.memory_note(peaks, planned) if peaks else ''}")
            if log:
                log.write(runlog.train_record(
                    step, step * tokens_per_step, metrics, lr=lr_at(step, args), grad_norm=norm_value,
                    tokens_per_s=tokens_per_step / dt, flops_per_s=flops, mfu=flops / (world * peak), comm=comm,
                    bubble=bubble, moe=moe, peak_bytes=peaks, planned_bytes=planned))
            clock.clear()
            mem_peak = 0
        if step % args.eval_every == 0 or step == args.steps:
            bar.clear()
            say_eval(step)
        signalled = stop_requested(stop, device)
        if args.save and (signalled or step == args.steps or (args.save_every and step % args.save_every == 0)):
            bar.clear()
            say(f"saved step {step} to {save_checkpoint(args.save, step, params, opt, cfg, mesh, specs, args)}")
        if signalled:
            say(f"stopped by {stop.get('signal', 'a signal on another rank')} after step {step}"
                + ("" if args.save else " (no --save: nothing saved)"))
            return 0

    params = opt.main_params()  # under --bf16 the fp32 main copy: what --export-hf writes and the demos run
    if mesh.pp > 1:  # the held-out demos below run the whole model: every rank takes every stage's tensors
        params = gather_stages(params, task, cfg, mesh, specs, args, device)
        mesh = P.Mesh(tp=mesh.tp, dp=mesh.dp, tp_rank=mesh.tp_rank, dp_rank=mesh.dp_rank, ep=mesh.ep,
                      ep_rank=mesh.ep_rank, groups={d: g for d, g in mesh.groups.items() if d in ("tp", "dp", "ep", "edp")})
    if mesh.cp > 1:  # every cp rank holds the whole model: the demos run without the ring
        mesh = replace(mesh, cp=1, cp_rank=0, groups={d: g for d, g in mesh.groups.items() if d not in ("cp", "dpcp")})
    if args.export_hf is not None:
        said = export_hf(params, cfg, mesh, specs, args)
        if said:
            say(said)
    if args.model == "bert":
        say(fill_in(params, eval_data, cfg, mesh, args, device))
    elif args.model == "t5":
        say(span_fill(params, eval_data, cfg, mesh, args, device))
    elif args.model == "biencoder":
        say(retrieved(params, eval_data, cfg, mesh, args, device))
    elif args.model == "realm":
        say(read_back(params, cfg, mesh, args, device))
    elif args.sample_tokens != 0:
        say(sample(params, cfg, mesh, args, device))
    return 0


def plot_runs(folders: list[str]) -> int:
    """--plot DIR [DIR ...]: the runs' curves overlaid in the first DIR's run.png (runlog.plot)."""
    try:
        path, drawn, notes = runlog.plot(folders)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}: {len(drawn)} panels ({'; '.join(drawn)})")
    return 0


def main(argv=None) -> int:
    args = None
    try:
        args = parse_args(argv)
        return plot_runs(args.plot) if args.plot else train(args)
    except UsageError as e:
        if int(os.environ.get("RANK", "0")) == 0 or e.every_rank:
            print(f"error: {e}", file=sys.stderr)
        else:  # every rank stops; let rank 0 be the first, so torchrun's
            time.sleep(2)  # first signal to the others never cuts its message
        return 2
    except Exception as e:  # a bug, a timeout, a peer gone: the traceback, then one line of where this rank was
        if not torch.distributed.is_initialized():
            raise
        traceback.print_exc()
        P.report(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        return 1
    finally:
        if getattr(args, "log", None) is not None:
            args.log.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
