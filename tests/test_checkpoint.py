"""Checkpoints (parallel.py section 13, train.py's "Checkpoints" section): tested against facts that do not
come from the checkpoint code itself: the uninterrupted run, the serial float64 model, and the files on
disk read back with torch.distributed.checkpoint directly.

1. the init does not depend on the layout (tp 1/2/4 with train.py's vocabulary padding, pp 1/2/4), and
   `python train.py` equals `torchrun --nproc-per-node 4 train.py --tp 4`;
2. pieces algebra (hypothesis): the writer pieces of all tp ranks tile the full, unpadded tensor exactly once;
3. a resume in the same layout is bit-exact (loss lines and every saved tensor), with dropout and microbatches;
4. resharding, float64 on the worker pool: save at one (tp, pp, dp, cp, ep, ZeRO, sequence parallel) layout, load
   at another (ZeRO-1 under cp and under ep, a MoE's experts split over ep, then not, then again), and the
   losses and final parameters are the serial run's;
5. atomic saves: real SIGKILLs of saving processes (one process and torchrun with 2 ranks, and one in the
   middle of --keep-last's pruning) leave only complete step folders and a load that resumes; a stale .tmp
   folder is never picked up;
6. preemption: SIGTERM / SIGINT finish the step, save, exit 0, and the resume lands on the uninterrupted run;
   the same torchrun command run again after a worker is SIGKILLed resumes from the last checkpoint;
7. loading is safe: a checkpoint whose metadata would run code (a pickle of os.system / eval, or DCP's own
   types pointing a "bytes" entry at a pickle) is refused and no code runs; meta.json is JSON only;
8. bad input is one `error:` line and exit 2;
9. --keep-last;
10. the metadata allow-list from the inside: dotted names, torch callables, allowed types with odd values;
11. no save lost: --save refuses a folder holding later steps, --keep-last keeps what it just wrote;
12. --load takes the newest complete step, whatever `latest` says;
13. output paths checked before the first step; meta.json and DCP's files checked as data;
14. coverage element by element: overlapping pieces that leave a hole are refused.

Processes are started only where the promise is about processes (signals, kills, torchrun); the other runs
call `train.main(argv)` in this process with one thread, as a `python train.py` with OMP_NUM_THREADS=1 runs.
"""

import argparse
import concurrent.futures
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from common import assert_close, merged
from hypothesis import given, settings
from hypothesis import strategies as st

import nanomeg as N
import parallel as P
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--peak-flops", "1e9",
        "--eval-batches", "1", "--sample-tokens", "0"]
S = 30  # steps of the runs that are interrupted and resumed (long enough that a kill lands before the end)
VOCAB_TABLES = ("embed.word", "head.weight", "lm_head.bias")  # one row per (padded) vocabulary id


def is_vocab_table(name: str) -> bool:
    """embed.word, head.weight, lm_head.bias, under any stack prefix ("query.embed.word"); not
    "binary_head.weight"."""
    return any(name == t or name.endswith("." + t) for t in VOCAB_TABLES)


# ---------------------------------------------------------------------------------------------------
# Running train.py: as a process (torchrun or not), or in this process
# ---------------------------------------------------------------------------------------------------


def command(args, torchrun=0, torchrun_args=()):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", *torchrun_args] \
        if torchrun else []  # standalone: a free port of its own, so runs at the same time do not meet
    return [sys.executable, *launcher, str(ROOT / "train.py"), *map(str, args)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(*args, torchrun=0, timeout=240):
    return subprocess.run(command(args, torchrun), capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=ROOT)


class Result(NamedTuple):
    code: object  # the exit code, or the exception train.main raised
    out: str
    err: str


def main(*argv) -> Result:
    """train.main(argv) in this process, on one thread (as the subprocesses run), its SIGTERM / SIGINT
    handlers put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = train.main([str(a) for a in argv])
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                code = e
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    return Result(code, out.getvalue(), err.getvalue())


def step_losses(out: str) -> dict[int, str]:
    """{step: its printed loss} of the step lines."""
    return {int(s): v for s, v in re.findall(r"^step +(\d+) \| loss ([0-9.]+)", out, re.M)}


def eval_losses(out: str) -> dict[int, str]:
    return {int(s): v for s, v in re.findall(r"^eval loss at step (\d+): ([0-9.]+)", out, re.M)}


def close_to_print(got: dict, want: dict, what: str) -> None:
    """The same steps and losses to the printed four decimals, up to one unit of the last digit (float32
    sums in another order at another tp may round the other way)."""
    assert got.keys() == want.keys(), (what, got, want)
    for k in want:
        assert abs(float(got[k]) - float(want[k])) <= 1.01e-4, (what, k, got[k], want[k])


def workers(pid: int) -> dict[int, int]:
    """{RANK: pid} of the train.py processes whose parent is pid (torchrun's workers), from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                    continue
                if b"train.py" not in Path(f"/proc/{entry}/cmdline").read_bytes():
                    continue
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                env = dict(v.split(b"=", 1) for v in environ if b"=" in v)
            except OSError:
                continue
            out[int(env[b"RANK"])] = int(entry)
    return out


def kill_all(p) -> None:
    """SIGKILL a run: torchrun's workers (each in a session of its own, so not in the agent's process group)
    first, then the process itself."""
    for pid in [*workers(p.pid).values(), p.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def watched(args, *, on_line, torchrun=0, torchrun_args=(), timeout=180) -> Result:
    """Start train.py (own session), call on_line(process, line) on every stdout line, wait; -> Result."""
    p = subprocess.Popen(command(args, torchrun, torchrun_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=ROOT, start_new_session=True)
    err = []
    drain = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    drain.start()
    timer = threading.Timer(timeout, lambda: kill_all(p))
    timer.start()
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            on_line(p, line)
        code = p.wait()
    finally:
        timer.cancel()
        drain.join(10)
    return Result(code, "".join(lines), "".join(err))


# ---------------------------------------------------------------------------------------------------
# Reading a checkpoint's files directly (DCP's own reader, our own assembly of the pieces)
# ---------------------------------------------------------------------------------------------------


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(meta.json, {key: full tensor}) of a checkpoint folder, read with torch.distributed.checkpoint's plain
    FileSystemReader (these are files the tests wrote) and assembled here from the index: every element of
    every full tensor must be written by exactly one saved piece."""
    import torch.distributed.checkpoint as dcp

    meta = json.loads((folder / "meta.json").read_text())
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    assert set(md.state_dict_metadata) == set(meta["index"]), (folder, "DCP entries != meta.json's index")
    state = {e: torch.empty(m["size"], dtype=md.state_dict_metadata[e].properties.dtype)
             for e, m in meta["index"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    full, count = {}, {}
    for e, m in meta["index"].items():
        assert e == f"{m['key']}@{','.join(map(str, m['at']))}", e
        key = m["key"]
        if key not in full:
            full[key] = torch.full(m["full"], math.nan, dtype=state[e].dtype)
            count[key] = torch.zeros(m["full"], dtype=torch.int64)
        assert list(full[key].shape) == m["full"], (e, m)
        region = tuple(slice(a, a + n) for a, n in zip(m["at"], m["size"]))
        full[key][region] = state[e]
        count[key][region] += 1
    for key, c in count.items():
        assert (c == 1).all(), f"{folder}: {key} has elements saved {sorted(set(c.flatten().tolist()))} times"
    return meta, full


def step_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.name.startswith("step-")) if root.exists() else []


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "abc.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


@pytest.fixture(scope="module")
def base(text_file):
    """The flags of the interrupted / resumed / uninterrupted runs (all but --steps, --save, --load)."""
    return ["--data", text_file, *TINY, "--lr", "1e-2", "--log-every", "1", "--eval-every", "1000"]


@pytest.fixture(scope="module")
def reference(base):
    """The uninterrupted run of S steps: its step and eval losses."""
    got = main(*base, "--steps", S)
    assert got.code == 0, got.err
    assert len(step_losses(got.out)) == S and set(eval_losses(got.out)) == {0, S}, got.out
    return got


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """A GPT checkpoint of 2 steps (for the bad-input and the safety tests): its root folder."""
    root = tmp_path_factory.mktemp("saved")
    got = main(*base, "--steps", 2, "--save", root)
    assert got.code == 0, got.err
    return root


# ---------------------------------------------------------------------------------------------------
# 1. The init does not depend on the layout
# ---------------------------------------------------------------------------------------------------

INIT_ARGV = {"gpt": ["--layers", "4", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--seq", "16"],
             "bert": ["--layers", "4", "--hidden", "32", "--heads", "4", "--seq", "16"],
             "t5": ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq", "16"]}


def config_at(model, argv, tp, pp=1, world=None):
    """train.py's config for this layout: vocab_multiple = 128·tp, as check_args pads it."""
    args = train.parse_args(["--model", model, *argv, "--tp", str(tp), "--pp", str(pp)])
    cfg, _ = train.check_args(args, world or tp * pp)
    return args, cfg


def init_unsharded_case(mesh, model, argv):
    """Rank's init at this tp (train.py's padding), cut with P.shard and put back with P.unshard."""
    args, cfg = config_at(model, argv, mesh.tp, world=torch.distributed.get_world_size())
    task = train.TASKS[args.model]
    specs = task.specs(cfg)
    full = P.unshard(P.shard(task.init(cfg, 5), specs, mesh), specs, mesh)  # collective: every rank
    return dict(padded=cfg.padded_vocab, full=full) if mesh.tp_rank == 0 else None


@pytest.mark.parametrize("model", ["gpt", "bert", "t5"])
def test_init_is_the_same_at_every_tp_and_the_stages_partition_it(pool, model):
    """The full init at tp 1/2/4 (vocabulary padded to 128·tp as train.py pads it: more padding rows at tp 4)
    has the same real vocabulary rows and the same other tensors, zero padding rows; sharded over the tp
    ranks and gathered back it is the same again. Pipeline stages (pp 1/2/4, v 1/2) partition the dict:
    their union is the dict, every name on one stage (the tied embedding's copy on the last stage the same
    tensor)."""
    vocab = train.TASKS[model].vocab
    want = train.TASKS[model].init(config_at(model, INIT_ARGV[model], 1)[1], 5)
    for tp in (1, 2, 4):
        args, cfg = config_at(model, INIT_ARGV[model], tp)
        got = train.TASKS[model].init(cfg, 5)
        assert cfg.vocab_multiple == 128 * tp
        gathered = [r for r in pool.run(init_unsharded_case, model, INIT_ARGV[model], tp=tp) if r is not None]
        assert len(gathered) == 4 // tp and all(g["padded"] == cfg.padded_vocab for g in gathered)
        assert got.keys() == want.keys()
        for name, p in got.items():
            for g in gathered:
                assert torch.equal(g["full"][name], p), (model, tp, name, "shard -> unshard")
            if is_vocab_table(name):
                assert p.shape[0] == cfg.padded_vocab and not p[vocab:].any(), (model, tp, name)
                p, ref = p[:vocab], want[name][:vocab]
            else:
                ref = want[name]
            assert torch.equal(p, ref), (model, tp, name)
    if model in N.PIPELINE_MODELS:
        cfg = config_at(model, INIT_ARGV[model], 1)[1]
        for pp, v in ((1, 1), (2, 1), (4, 1), (2, 2)):
            union, owners = {}, {}
            for r in range(pp):
                for name, p in N.stage_params(want, cfg, P.Mesh(pp=pp, pp_rank=r), v).items():
                    assert name not in union or union[name] is p, (pp, v, name)
                    union[name] = p
                    owners.setdefault(name, []).append(r)
            assert union.keys() == want.keys() and all(union[k] is want[k] for k in want), (pp, v)
            for name, ranks in owners.items():
                tied_copy = pp > 1 and name == "embed.word" and cfg.tie_embeddings
                assert ranks == ([0, pp - 1] if tied_copy else ranks[:1]), (pp, v, name, ranks)


def test_tp4_under_torchrun_prints_the_one_process_eval_losses(text_file):
    """`python train.py` (tp 1) and `torchrun --nproc-per-node 4 train.py --tp 4` start from the same
    parameters and learn the same: the eval losses at steps 0, 2, 4 agree to the printed four decimals."""
    argv = ["--data", text_file, *TINY, "--heads", "4", "--steps", "4", "--eval-every", "2", "--lr", "1e-2"]
    one = main(*argv)
    four = run(*argv, "--tp", "4", torchrun=4)
    assert one.code == 0, one.err
    assert four.returncode == 0, four.stderr[-3000:]
    assert "mesh tp=4 pp=1 dp=1" in four.stdout
    assert set(eval_losses(one.out)) == {0, 2, 4}
    close_to_print(eval_losses(four.stdout), eval_losses(one.out), "tp 4 vs tp 1")


# ---------------------------------------------------------------------------------------------------
# 2. Pieces algebra
# ---------------------------------------------------------------------------------------------------


@st.composite
def sharded_tensors(draw):
    """(full shape, spec, tp, real_rows): a replicated, row- or column-split tensor (maybe with padded
    vocabulary rows) or a fused qkv (HeadGroups, kv heads split over tp or replicated)."""
    tp = draw(st.sampled_from([1, 2, 4]))
    kind = draw(st.sampled_from(["none", "rows", "cols", "heads"]))
    if kind == "heads":
        groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if g % tp == 0 or tp % g == 0]))
        rep = max(1, tp // groups)
        spec = P.HeadGroups(groups, rep * draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        rows = groups * (spec.q_per_group + 2) * spec.head_dim
        return (rows, *draw(st.sampled_from([(), (3,), (2, 2)]))), spec, tp, None
    ndim = draw(st.integers(2 if kind == "cols" else 1, 3))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    spec = {"none": None, "rows": 0, "cols": 1}[kind]
    if spec is not None:
        shape[spec] *= tp
    real = draw(st.none() | st.integers(1, shape[0])) if kind in ("none", "rows") else None
    return tuple(shape), spec, tp, real


def region(at, size):
    return tuple(slice(a, a + n) for a, n in zip(at, size))


@settings(max_examples=60)  # pure and fast: more draws than the session profile's default
@given(sharded_tensors())
def test_the_writer_pieces_of_all_tp_ranks_tile_the_full_tensor_once(drawn):
    """For every tp rank of P.shard(full): each piece's local rectangle holds the full tensor's rectangle at
    full_at; the rank's pieces cover each of its local elements once, except the padded rows (never in a
    piece); the writer pieces of all ranks cover every element of the saved tensor ([real_rows, ...] when
    padded) exactly once; full_shape_of is that saved shape on every rank."""
    shape, spec, tp, real = drawn
    full = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    padded = torch.zeros(shape, dtype=torch.bool)
    if real is not None:
        padded[real:] = True
    saved_shape = (real if real is not None else shape[0], *shape[1:])
    written = torch.zeros(saved_shape, dtype=torch.int64)
    for r in range(tp):
        mesh = P.Mesh(tp=tp, tp_rank=r)
        local, local_padded = P.shard_tensor(full, spec, mesh), P.shard_tensor(padded, spec, mesh)
        ps = P.pieces(tuple(local.shape), spec, mesh, real)
        assert P.full_shape_of(tuple(local.shape), spec, mesh, real) == saved_shape, (drawn, r)
        held = torch.zeros(local.shape, dtype=torch.int64)
        for p in ps:
            assert len(p.local_at) == len(p.full_at) == len(p.size) == len(shape), p
            assert all(n > 0 for n in p.size), (drawn, r, p)
            assert all(a + n <= m for a, n, m in zip(p.full_at, p.size, saved_shape)), (drawn, r, p, "outside")
            assert torch.equal(local[region(p.local_at, p.size)], full[region(p.full_at, p.size)]), (drawn, r, p)
            held[region(p.local_at, p.size)] += 1
            if p.writer:
                written[region(p.full_at, p.size)] += 1
        assert torch.equal(held, (~local_padded).long()), (drawn, r, "local elements not held once")
    assert (written == 1).all(), (drawn, written)


def test_pieces_of_train_py_specs_tile_once_and_skip_the_padding():
    """The same on a real GPT with GQA (kv heads replicated at tp 4) and the padded vocabulary of tp 4:
    the writer pieces of the 4 ranks tile every tensor of its real size exactly once."""
    _, cfg = config_at("gpt", INIT_ARGV["gpt"], 4)
    full, specs = N.init_gpt(cfg, 1), N.gpt_specs(cfg)
    assert specs["layers.0.attn.qkv.weight"].replicas(4) == 2 and cfg.padded_vocab == 512
    for name, p in full.items():
        real = N.real_vocab_rows(name, tuple(p.shape), cfg)
        assert (real is not None) == is_vocab_table(name), name
        saved = (real or p.shape[0], *p.shape[1:])
        written = torch.zeros(saved, dtype=torch.int64)
        for r in range(4):
            mesh = P.Mesh(tp=4, tp_rank=r)
            local = P.shard_tensor(p, specs[name], mesh)
            assert P.full_shape_of(tuple(local.shape), specs[name], mesh, real) == saved, name
            for pc in P.pieces(tuple(local.shape), specs[name], mesh, real):
                assert torch.equal(local[region(pc.local_at, pc.size)], p[region(pc.full_at, pc.size)]), name
                written[region(pc.full_at, pc.size)] += pc.writer
        assert (written == 1).all(), name


# ---------------------------------------------------------------------------------------------------
# 3. Bit-exact resume in the same layout
# ---------------------------------------------------------------------------------------------------


def test_resume_is_bit_exact_with_dropout_and_microbatches(base, tmp_path):
    """6 steps straight vs 3 steps, then --load and 3 more (dropout 0.1, 2 microbatches, float32, one
    process): the same step-loss lines, and the two step-6 checkpoints hold bitwise the same parameters
    and AdamW moments. (The lr is in its linear warmup, which does not depend on --steps.)"""
    argv = [*base, "--dropout", "0.1", "--microbatches", "2"]
    straight = main(*argv, "--steps", 6, "--save", tmp_path / "straight")
    half = main(*argv, "--steps", 3, "--save", tmp_path / "half")
    resumed = main(*argv, "--steps", 6, "--load", tmp_path / "half", "--save", tmp_path / "resumed")
    for r in (straight, half, resumed):
        assert r.code == 0, r.err
    assert "loaded " in resumed.out and "(step 3;" in resumed.out
    assert len(step_losses(straight.out)) == 6
    assert step_losses(half.out) | step_losses(resumed.out) == step_losses(straight.out)
    assert set(step_losses(resumed.out)) == {4, 5, 6}
    want_meta, want = read_checkpoint(tmp_path / "straight" / "step-00000006")
    got_meta, got = read_checkpoint(tmp_path / "resumed" / "step-00000006")
    assert got.keys() == want.keys() and {k.split("/")[0] for k in want} == {"param", "exp_avg", "exp_avg_sq"}
    for k in want:
        assert want[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    assert (got_meta["step"], got_meta["optimizer_steps"]) == (want_meta["step"], want_meta["optimizer_steps"])
    assert (want_meta["step"], want_meta["optimizer_steps"]) == (6, 6)
    # the dropout changed the run: without it the losses differ
    plain = main(*base, "--microbatches", "2", "--steps", 2)
    assert step_losses(plain.out)[2] != step_losses(straight.out)[2]


def test_bf16_saves_the_fp32_main_copy_and_resumes_bit_exact(base, tmp_path):
    """--bf16: a checkpoint holds the optimizer's fp32 main copy as the parameters (the bf16 parameters are its
    rounding; saving them would lose what the updates added below bf16's resolution), so 4 steps straight and
    2 + --load + 2 print the same losses and save bitwise the same fp32 tensors; the checkpoint, fp32 as any
    other, loads into a run without --bf16 as well."""
    argv = [*base, "--bf16"]
    straight = main(*argv, "--steps", 4, "--save", tmp_path / "straight")
    half = main(*argv, "--steps", 2, "--save", tmp_path / "half")
    resumed = main(*argv, "--steps", 4, "--load", tmp_path / "half", "--save", tmp_path / "resumed")
    for r in (straight, half, resumed):
        assert r.code == 0, r.err
    assert step_losses(half.out) | step_losses(resumed.out) == step_losses(straight.out)
    _, want = read_checkpoint(tmp_path / "straight" / "step-00000004")
    _, got = read_checkpoint(tmp_path / "resumed" / "step-00000004")
    assert got.keys() == want.keys()
    for k in want:
        assert want[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    params = [t for k, t in want.items() if k.startswith("param/")]
    assert any(not torch.equal(t, t.bfloat16().float()) for t in params)  # the main copy, not bf16 values
    fp32 = main(*base, "--steps", 4, "--load", tmp_path / "half")
    assert fp32.code == 0 and "(step 2;" in fp32.out, fp32.err


# ---------------------------------------------------------------------------------------------------
# 4. Resharding: float64 on the worker pool, against the serial run
# ---------------------------------------------------------------------------------------------------

RESHARD_ARGV = ["--hidden", "32", "--heads", "4", "--layers", "2", "--seq", "16", "--max-seq", "16",
                "--warmup", "2", "--lr", "1e-2", "--seed", "7"]
K = 2  # steps per phase
GLOBAL_BATCH = 4


def global_batch(task, data, args, step, rows):
    g = argparse.Namespace(**vars(args))
    g.batch = rows
    batch = task.batch(data, g, seed=1000 + step)
    # float64 runs: BERT's float32 mlm_mask would make the microbatches' loss shares float32 (1e-8 off)
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def replica_rows(batch, mesh):
    b = next(iter(batch.values())).shape[0] // mesh.dp
    return {k: v[mesh.dp_rank * b: (mesh.dp_rank + 1) * b] for k, v in batch.items()}


_CP_MESHES: dict = {}


def reshard_phase(mesh, model, argv, text, root, first, last):
    """Steps first..last of this rank as train.py takes them, in float64: the params at this layout
    (another init seed when resuming: the load must overwrite every real element), train.Optimizer, the
    checkpoint of step first-1 loaded (find_checkpoint / read_meta / load_checkpoint), train_step on this
    replica's rows of the global batch, then save_checkpoint of step `last` on every rank. With --cp in argv
    the pool's mesh (which has no cp) gives way to one with that cp, built once per worker."""
    world = torch.distributed.get_world_size()
    cp = train.parse_args(["--model", model, *argv]).cp
    if cp > 1:
        if (mesh.tp, mesh.pp, cp) not in _CP_MESHES:
            _CP_MESHES[(mesh.tp, mesh.pp, cp)] = P.Mesh.build(tp=mesh.tp, pp=mesh.pp, cp=cp)
        mesh = _CP_MESHES[(mesh.tp, mesh.pp, cp)]
    args = train.parse_args(["--model", model, *argv, "--tp", str(mesh.tp), "--pp", str(mesh.pp),
                             "--batch", str(GLOBAL_BATCH // mesh.dp)])
    cfg, _ = train.check_args(args, world)
    task = train.TASKS[model]
    specs = task.specs(cfg)
    local = P.shard(task.init(cfg, args.seed + (1 if first > 1 else 0), dtype=torch.float64), specs, mesh)
    if model in N.PIPELINE_MODELS:
        local = N.stage_params(local, cfg, mesh, args.virtual_stages)
    params = {k: v.requires_grad_(True) for k, v in local.items()}
    opt = train.Optimizer(params, args, mesh, specs, cfg)
    saved_layout = None
    if first > 1:
        path = train.find_checkpoint(root)
        meta = train.read_meta(path, cfg, args)
        saved_layout = meta["layout"]
        assert train.load_checkpoint(path, meta, params, opt, cfg, mesh, specs) == first - 1
        assert opt.steps == first - 1
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    losses = []
    for step in range(first, last + 1):
        inputs = replica_rows(global_batch(task, data, args, step, GLOBAL_BATCH), mesh)
        metrics, _ = train.train_step(params, opt, inputs, task, cfg, mesh, specs, args, step)
        replicas = "dpcp" if mesh.cp > 1 else "dp"  # under cp each rank's loss is its chunks' share
        losses.append(P.all_reduce(metrics["loss"].double(), mesh, replicas) / mesh.size(replicas))
    train.save_checkpoint(root, last, params, opt, cfg, mesh, specs, args)
    return dict(coords=(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), losses=torch.stack(losses),
                saved_layout=saved_layout, sp=cfg.sequence_parallel,
                params={k: P.unshard_tensor(p.detach(), specs[k], mesh) for k, p in params.items()})


def serial_run(model, argv, text, steps, replicas):
    """The oracle: one process, float64, the serial model's loss on the global batch (BERT: the mean of the
    replicas' losses, as dp averages them; no dropout there), backward, train.Optimizer at lr_at(step)."""
    args = train.parse_args(["--model", model, *argv, "--tp", "1", "--batch", str(GLOBAL_BATCH)])
    cfg, _ = train.check_args(args, 1)
    task = train.TASKS[model]
    params = {k: v.requires_grad_(True) for k, v in task.init(cfg, args.seed, dtype=torch.float64).items()}
    opt = train.Optimizer(params, args, P.Mesh.serial(), task.specs(cfg), cfg)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    losses = []
    for step in range(1, steps + 1):
        batch = global_batch(task, data, args, step, GLOBAL_BATCH)
        parts = [batch] if model == "gpt" else [replica_rows(batch, P.Mesh(dp=replicas, dp_rank=d))
                                                  for d in range(replicas)]
        loss = sum(task.loss(params, part, cfg, P.Mesh.serial(), seed=args.seed + step, training=True)["loss"]
                   for part in parts) / len(parts)
        loss.backward()
        opt.step(train.lr_at(step, args), args.grad_clip)
        losses.append(loss.detach())
    return torch.stack(losses), {k: p.detach() for k, p in params.items()}, cfg



# (model, extra flags for every phase, phases: (tp, pp, flags)); world 4, data parallel fills the rest
RESHARD_CASES = {
    "gpt-tp2sp-tp1-tp4sp-gqa-dropout": ("gpt", ["--kv-heads", "2", "--dropout", "0.1"], [
        (2, 1, ["--sequence-parallel"]), (1, 1, []), (4, 1, ["--sequence-parallel"])]),
    "gpt-pp2tp2-pp1-pp2v2-tied": ("gpt", ["--layers", "4"], [
        (2, 2, ["--microbatches", "2", "--sequence-parallel"]), (1, 1, []),
        (1, 2, ["--microbatches", "2", "--virtual-stages", "2"])]),
    "gpt-zero1dp2-zero0dp1-zero0dp2-zero1dp4": ("gpt", ["--bucket-mb", "0.01"], [
        (2, 1, ["--zero", "1"]), (4, 1, []), (2, 1, []), (1, 1, ["--zero", "1"])]),
    "bert-tp2sp-pp2-tp2zero": ("bert", [], [  # dp stays 2: BERT's dp mean is a mean of replica means
        (2, 1, ["--sequence-parallel"]), (1, 2, ["--microbatches", "2"]), (2, 1, ["--zero", "1"])]),
    # ZeRO-1 under cp: the optimizer state sliced over the dp x cp ranks (4 here), saved, then sliced over dp 4
    "gpt-cp2zero1-dp4zero1-cp2tp2sp": ("gpt", ["--bucket-mb", "0.01", "--dropout", "0.1"], [
        (1, 1, ["--cp", "2", "--zero", "1"]), (1, 1, ["--zero", "1"]), (2, 1, ["--cp", "2", "--sequence-parallel"])]),
    # experts split over ep (ZeRO-1: their state sliced over edp), resharded to ep 1, and back to ep 2 at tp 2
    "gpt-moe-ep2zero1-ep1tp2-ep2tp2zero1": ("gpt", ["--experts", "4", "--topk", "2", "--capacity-factor", "1.5",
                                                    "--aux-loss", "0.1", "--bucket-mb", "0.01"], [
        (1, 1, ["--ep", "2", "--zero", "1"]), (2, 1, []), (2, 1, ["--ep", "2", "--zero", "1", "--sequence-parallel"])]),
}


@pytest.mark.parametrize("case", RESHARD_CASES, ids=list(RESHARD_CASES))
def test_a_checkpoint_resumes_at_another_layout_as_the_serial_run(pool, text_file, tmp_path, case):
    """Each phase: K float64 steps at its layout, loading the previous phase's checkpoint (saved at another
    tp / pp / dp / ZeRO / sequence parallel) and saving its own. The losses of every step and the final
    parameters (tp-gathered, stages merged, real vocabulary rows; padding rows still zero) equal the serial
    float64 run's to 1e-9, and the meta.json of each checkpoint says the layout that saved it. A phase's
    --cp and --ep flags set those dims too."""
    model, extra, phases = RESHARD_CASES[case]
    text = Path(text_file).read_bytes()
    argv = [*RESHARD_ARGV, *extra, "--steps", str(K * len(phases))]
    root = str(tmp_path / "ckpt")
    losses, previous = [], None
    for i, (tp, pp, flags) in enumerate(phases):
        cp, ep = (int(flags[flags.index(f) + 1]) if f in flags else 1 for f in ("--cp", "--ep"))
        results = pool.run(reshard_phase, model, [*argv, *flags], text, root, i * K + 1, (i + 1) * K, tp=tp, pp=pp,
                           ep=ep)
        for r in results:
            assert_close(r["losses"], results[0]["losses"], f"{case} phase {i}: rank {r['coords']}'s losses")
            assert r["saved_layout"] == previous, (case, i, r["saved_layout"], previous)
            assert r["sp"] == ("--sequence-parallel" in flags and tp > 1), (case, i)
        losses.append(results[0]["losses"])
        meta = json.loads((Path(root) / f"step-{(i + 1) * K:08d}" / "meta.json").read_text())
        previous = dict(tp=tp, pp=pp, dp=4 // (tp * pp * cp), ep=ep, cp=cp, zero=int("--zero" in flags),
                        virtual_stages=2 if "--virtual-stages" in flags else 1)
        assert meta["layout"] == previous and meta["step"] == meta["optimizer_steps"] == (i + 1) * K, meta
        assert (Path(root) / "latest").read_text().strip() == f"step-{(i + 1) * K:08d}"
    want_losses, want, cfg = serial_run(model, argv, text, K * len(phases), 4 // (phases[0][0] * phases[0][1]))
    assert_close(torch.cat(losses), want_losses, f"{case}: losses")
    got = merged([r["params"] for r in results])
    assert got.keys() == want.keys()
    for name, p in got.items():
        if is_vocab_table(name):
            assert not p[cfg.vocab_size:].any(), (case, name, "padding rows moved")
            p, want[name] = p[:cfg.vocab_size], want[name][:cfg.vocab_size]
        assert_close(p, want[name], f"{case}: {name} after {K * len(phases)} steps")
    init = train.TASKS[model].init(cfg, 7)
    for name in ("layers.0.attn.qkv.weight", "layers.0.mlp.fc1.weight", "layers.0.moe.fc1.weight"):
        assert name not in want or not torch.equal(want[name], init[name].double()), name  # the steps moved it


# ---------------------------------------------------------------------------------------------------
# 5. Atomic: kills at any moment leave loadable checkpoints only
# ---------------------------------------------------------------------------------------------------


def check_after_kill(root: Path) -> int:
    """Every committed step folder is complete and loads; find_checkpoint picks the newest; `latest`, if
    there, names a complete one (the newest, or the one before when the kill fell between the commit and
    latest's update); -> the newest's step."""
    names = step_folders(root)
    assert names, f"{root}: nothing saved before the kill"
    for name in names:
        assert re.fullmatch(r"step-\d{8}", name), name
        meta, tensors = read_checkpoint(root / name)  # meta.json there, every piece there, tiles once
        assert meta["step"] == int(name[5:]) and all(not t.isnan().any() for t in tensors.values()), name
    found = train.find_checkpoint(str(root))
    assert found == root / names[-1], (found, names)
    pointer = root / "latest"
    if pointer.exists():
        named = pointer.read_text().strip()
        assert named in names[-2:], (named, names)
    return int(found.name[5:])


def killed_run(args, at_step, delay, torchrun=0) -> Result:
    """A run saving every step, SIGKILLed (torchrun: its workers and itself) `delay` seconds after it prints
    its step `at_step` line, i.e. while it saves that step (a save takes ~40 ms here) or just after."""
    def on_line(p, line):
        if line.startswith(f"step {at_step:5d} |"):
            threading.Timer(delay, lambda: kill_all(p)).start()
    return watched(args, on_line=on_line, torchrun=torchrun)


KILLS = ((2, 0.0), (3, 0.005), (4, 0.012), (5, 0.025), (6, 0.045))  # (step, delay)


def test_sigkill_while_saving_leaves_only_complete_checkpoints_and_resume_finishes(base, reference, tmp_path):
    """Five one-process runs with --save-every 1 and one torchrun run (tp 2) are SIGKILLed at different
    moments of their saving; each time every step folder is complete, find_checkpoint picks a complete one,
    and --load resumes (the torchrun checkpoint at tp 1) and finishes with exit 0 and the uninterrupted
    run's losses."""
    jobs = {f"kill-{k}": ([*base, "--steps", S, "--save-every", 1, "--save", tmp_path / f"kill-{k}"], k, d, 0)
            for k, d in KILLS}
    jobs["torchrun"] = ([*base, "--tp", 2, "--steps", S, "--save-every", 1, "--save", tmp_path / "torchrun"],
                        3, 0.01, 2)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
        done = {name: ex.submit(killed_run, *job) for name, job in jobs.items()}
        done = {name: f.result() for name, f in done.items()}
    want = step_losses(reference.out)
    for name, killed in done.items():
        assert killed.code == -signal.SIGKILL, (name, killed.code, killed.out[-2000:], killed.err[-2000:])
        root = tmp_path / name
        step = check_after_kill(root)
        assert 1 <= step < S, (name, killed.out[-1500:])
        resumed = main(*base, "--steps", S, "--load", root)
        assert resumed.code == 0, (name, resumed.err)
        assert f"(step {step}; saved at tp={2 if name == 'torchrun' else 1} pp=1 dp=1" in resumed.out, resumed.out
        got = step_losses(resumed.out)
        assert min(got) == step + 1, (name, step, got)
        if name == "torchrun":  # resharded tp 2 -> 1: float32 sums in another order
            close_to_print(got, {k: v for k, v in want.items() if k > step}, name)
        else:
            assert got == {k: v for k, v in want.items() if k > step}, name


def test_a_stale_tmp_folder_is_ignored_and_replaced_by_the_next_save(base, tmp_path):
    """A .tmp-step-* folder left by a killed save (here with junk and even a meta.json), a `latest` that names
    it, or names a missing, incomplete or older folder: find_checkpoint and --load skip them all and resume
    from the newest complete step (`latest` is not read); the next save of that step replaces the .tmp
    folder."""
    root = tmp_path / "ckpt"
    assert main(*base, "--steps", 2, "--save-every", 1, "--save", root).code == 0
    stale = root / ".tmp-step-00000003"
    stale.mkdir()
    (stale / "junk.distcp").write_bytes(b"half a tensor")
    shutil.copy(root / "step-00000002" / "meta.json", stale / "meta.json")
    for named in (".tmp-step-00000003", "step-00000009", "step-00000001x", ""):
        (root / "latest").write_text(named + "\n")
        assert train.find_checkpoint(str(root)) == root / "step-00000002", named
    (root / "step-00000005").mkdir()  # a folder of the right name but no meta.json: never committed
    (root / "step-00000005" / "__0_0.distcp").write_bytes(b"")
    (root / "latest").write_text("step-00000005\n")
    assert train.find_checkpoint(str(root)) == root / "step-00000002"
    shutil.rmtree(root / "step-00000005")
    (root / "latest").write_text("step-00000001\n")  # an older complete one that latest names: still the newest
    assert train.find_checkpoint(str(root)) == root / "step-00000002"
    (root / "latest").write_text(".tmp-step-00000003\n")
    got = main(*base, "--steps", 3, "--load", root, "--save", root)
    assert got.code == 0, got.err
    assert "(step 2;" in got.out and set(step_losses(got.out)) == {3}
    assert not stale.exists() and not (root / "step-00000003" / "junk.distcp").exists()
    assert (root / "latest").read_text().strip() == "step-00000003"
    assert read_checkpoint(root / "step-00000003")[0]["step"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000002", "step-00000003"]


PRUNE_KILLER = '''
import os, re, runpy, shutil, signal, sys
from pathlib import Path

real = shutil.rmtree


def rmtree(path, *args, **kwargs):  # --keep-last's removal of an old step folder: SIGKILL after its first file
    path = Path(path)
    if re.fullmatch(r"([.]old-)?step-[0-9]{8}", path.name):
        for f in sorted(path.iterdir()):
            if f.name != "meta.json":
                f.unlink()
                os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)


shutil.rmtree = rmtree
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_a_kill_while_keep_last_prunes_leaves_no_step_folder_that_does_not_load(base, tmp_path):
    """A real SIGKILL of a real process in the middle of --keep-last's removal of an old step folder (the
    process kills itself right after the removal's first unlink, the files taken in name order: .metadata,
    then the data, meta.json last; shutil.rmtree takes them in directory order, so any order can happen).
    Every step-* folder left must still be complete (a step folder is committed or absent), as after a kill
    at any other moment."""
    killer = tmp_path / "prune_killer.py"
    killer.write_text(PRUNE_KILLER)
    root = tmp_path / "ckpt"
    got = subprocess.run([sys.executable, str(killer), str(ROOT / "train.py"), *map(str, base), "--steps", "3",
                          "--save-every", "1", "--keep-last", "1", "--save", str(root)],
                         capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert got.returncode == -signal.SIGKILL, (got.returncode, got.stdout, got.stderr[-3000:])
    assert "saved step 2" not in got.stdout and (root / "step-00000002" / "meta.json").is_file()
    assert train.find_checkpoint(str(root)) == root / "step-00000002"  # a load still picks the good one
    for name in step_folders(root):
        assert (root / name / "meta.json").is_file(), name
        files = sorted(f.name for f in (root / name).iterdir())
        assert ".metadata" in files and any(f.endswith(".distcp") for f in files), (
            f"{name} looks committed (meta.json) but its data is partly gone: {files}")
        read_checkpoint(root / name)



# ---------------------------------------------------------------------------------------------------
# 6. Preemption: SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------------


def signalled_run(args, sig, at_step=2, torchrun=0, who="self", torchrun_args=()) -> Result:
    """Send sig once the run prints its step `at_step` line: to the process itself (torchrun: to the agent),
    or to every worker of torchrun ("workers"), or to the worker of the highest rank ("one worker")."""
    sent = []

    def on_line(p, line):
        if not sent and line.startswith(f"step {at_step:5d} |"):
            sent.append(True)
            if who == "self":
                pids = [p.pid]
            else:
                ranks = workers(p.pid)
                assert sorted(ranks) == list(range(torchrun)), ranks
                pids = [ranks[torchrun - 1]] if who == "one worker" else list(ranks.values())
            for pid in pids:
                os.kill(pid, sig)
    got = watched(args, on_line=on_line, torchrun=torchrun, torchrun_args=torchrun_args)
    assert sent, ("never signalled", got.out[-2000:], got.err[-2000:])
    return got


def stopped_at(got: Result, sig_name: str) -> int:
    m = re.search(rf"^stopped by {sig_name} after step (\d+)$", got.out, re.M)
    assert m, (got.out[-2000:], got.err[-2000:])
    return int(m[1])


def test_sigterm_and_sigint_finish_the_step_save_and_exit_0_and_the_resume_is_the_uninterrupted_run(
        base, reference, tmp_path):
    """SIGTERM to `python train.py --save DIR`, SIGINT to both workers of `torchrun --nproc-per-node 2
    train.py --tp 2 --save DIR`: exit 0, "saved step N", "stopped by SIG... after step N" with N the last
    step line, latest names step N, the only step folder; --load DIR continues at step N+1 and ends on the
    uninterrupted run's losses (the tp 2 checkpoint loaded at tp 1)."""
    jobs = dict(
        term=([*base, "--steps", S, "--save", tmp_path / "term"], signal.SIGTERM, 2, 0, "self"),
        int=([*base, "--tp", 2, "--steps", S, "--save", tmp_path / "int"], signal.SIGINT, 2, 2, "workers"),
    )
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
        done = {name: ex.submit(signalled_run, *job) for name, job in jobs.items()}
        done = {name: f.result() for name, f in done.items()}
    want = step_losses(reference.out)
    for name, sig_name, tp in (("term", "SIGTERM", 1), ("int", "SIGINT", 2)):
        got = done[name]
        assert got.code == 0, (name, got.code, got.err[-3000:])
        n = stopped_at(got, sig_name)
        assert 2 <= n < S and max(step_losses(got.out)) == n, (name, n, got.out)
        assert re.search(rf"^saved step {n} to .*step-{n:08d}$", got.out, re.M), got.out
        root = tmp_path / name
        assert (root / "latest").read_text().strip() == f"step-{n:08d}" and step_folders(root) == [f"step-{n:08d}"]
        assert read_checkpoint(root / f"step-{n:08d}")[0]["layout"]["tp"] == tp
        resumed = main(*base, "--steps", S, "--load", root)
        assert resumed.code == 0, resumed.err
        assert f"(step {n}; saved at tp={tp} pp=1 dp=1" in resumed.out
        got_losses = step_losses(resumed.out)
        assert min(got_losses) == n + 1
        if tp == 1:
            assert got_losses == {k: v for k, v in want.items() if k > n}, name
            assert eval_losses(resumed.out)[S] == eval_losses(reference.out)[S]
        else:
            close_to_print(step_losses(got.out), {k: v for k, v in want.items() if k <= n}, name)
            close_to_print(got_losses, {k: v for k, v in want.items() if k > n}, name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_without_save_finishes_the_step_and_exits_0_saying_nothing_was_saved(base, monkeypatch, sig):
    """The signal is raised for real in this process right after step 3's optimizer step (train_step wrapped):
    step 3 is still logged, then the run stops with exit 0 and says that nothing was saved."""
    real = train.train_step

    def step_then_signal(*a, **k):
        out = real(*a, **k)
        if a[8] == 3:  # train_step(params, opt, inputs, task, cfg, mesh, specs, args, step, ...)
            signal.raise_signal(sig)
        return out
    monkeypatch.setattr(train, "train_step", step_then_signal)
    got = main(*base, "--steps", S)
    assert got.code == 0, got
    assert re.search(rf"^stopped by {sig.name} after step 3 \(no --save: nothing saved\)$", got.out, re.M), got.out
    assert set(step_losses(got.out)) == {1, 2, 3} and "saved step" not in got.out


def test_the_same_torchrun_command_run_again_after_a_worker_is_killed_resumes(base, reference, tmp_path):
    """`torchrun --nproc-per-node 2 train.py --tp 2 --load DIR --save DIR --save-every 1`, rank 1 SIGKILLed
    after its step 3 line: the job fails (not exit 0), and the same command run again (what a scheduler's
    restart does) resumes from the newest checkpoint and finishes with exit 0 on the uninterrupted run's
    losses. (torchrun --max-restarts is not used: on this torch, gloo's connect of the restarted workers
    now and then fails or hangs inside init_process_group, before any train.py code runs.)"""
    root = tmp_path / "ckpt"
    argv = [*base, "--tp", 2, "--steps", S, "--load", root, "--save", root, "--save-every", 1]
    killed = signalled_run(argv, signal.SIGKILL, 3, 2, "one worker")
    assert killed.code != 0 and "no checkpoint there yet, starting fresh" in killed.out, killed.out
    step = check_after_kill(root)
    assert 2 <= step < S
    again = run(*argv, torchrun=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"^loaded .*step-{step:08d} \(step {step}; saved at tp=2 pp=1 dp=1", again.stdout, re.M), \
        again.stdout
    assert step_folders(root)[-1] == f"step-{S:08d}"
    close_to_print(step_losses(again.stdout), {k: v for k, v in step_losses(reference.out).items() if k > step},
                   "run again")


# ---------------------------------------------------------------------------------------------------
# 7. Loading is safe: no code from the checkpoint runs
# ---------------------------------------------------------------------------------------------------


class RunsCode:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Evals:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.eval, (self.code,))


def copy_checkpoint(saved: Path, to: Path) -> Path:
    shutil.copytree(saved, to)
    return to / train.find_checkpoint(str(to)).name


def wanted_of(folder: Path, cfg) -> tuple[dict, dict]:
    """load_pieces' arguments for the GPT of `cfg` at tp 1 (what load_checkpoint builds)."""
    meta = json.loads((folder / "meta.json").read_text())
    params = N.init_gpt(cfg, 0)
    specs = N.gpt_specs(cfg)
    zeros = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    return train.checkpoint_tensors(params, zeros, cfg, P.Mesh.serial(), specs), meta["index"]


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "rank-local os.system"])
def test_a_metadata_pickle_that_runs_code_is_refused(base, saved, tmp_path, payload):
    """A .metadata (or, the global one gone, the rank-local __0.metadata DCP falls back to) that would run
    code: --load fails (not exit 0), parallel.load_pieces and SafeReader raise, the marker file that the code
    would write is never created."""
    folder = copy_checkpoint(saved, tmp_path / "ckpt")
    marker = tmp_path / "marker"
    evil = RunsCode(f"touch {marker}") if "os.system" in payload else \
        Evals(f"open({str(marker)!r}, 'w').close()")
    (folder / ".metadata").write_bytes(pickle.dumps(evil))
    if payload.startswith("rank-local"):
        (folder / ".metadata").rename(folder / "__0.metadata")
    said = "no .metadata" if payload.startswith("rank-local") else "refused"  # a rank-local one is never read
    got = main(*base, "--steps", 3, "--load", tmp_path / "ckpt")
    assert got.code != 0 and said in f"{got.code} {got.err}", got
    assert not marker.exists()
    _, cfg = config_at("gpt", TINY[:8], 1)
    with pytest.raises(ValueError, match=said):
        P.load_pieces(folder, *wanted_of(folder, cfg))
    if not payload.startswith("rank-local"):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            P.SafeReader(str(folder)).read_metadata()
    assert not marker.exists()


def test_a_metadata_of_allowed_types_cannot_make_the_load_unpickle_the_data(base, saved, tmp_path):
    """The metadata pickle may only hold DCP's own types, but those types can still say "this entry is
    pickled bytes" (BytesStorageMetadata) and point it at a file: DCP's default planner loads such bytes with
    torch.load(weights_only=False). A safe load must refuse that too: the marker file must never appear."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    folder = copy_checkpoint(saved, tmp_path / "ckpt")
    marker = tmp_path / "marker"
    md = P.SafeReader(str(folder)).read_metadata()  # the real metadata, read the safe way
    payload = pickle.dumps(RunsCode(f"touch {marker}"))
    (folder / "payload.distcp").write_bytes(payload)
    for fqn in list(md.state_dict_metadata):
        md.state_dict_metadata[fqn] = BytesStorageMetadata()
        md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != fqn}
        md.storage_data[MetadataIndex(fqn)] = _StorageInfo("payload.distcp", 0, len(payload))
    md.storage_meta = None
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(pickle.UnpicklingError, match="BytesStorageMetadata: refused"):  # never in a nanomeg one
        P.SafeReader(str(folder)).read_metadata()
    got = main(*base, "--steps", 3, "--load", tmp_path / "ckpt")
    ran_on_load = marker.exists()
    marker.unlink(missing_ok=True)
    _, cfg = config_at("gpt", TINY[:8], 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P.load_pieces(folder, *wanted_of(folder, cfg))
    except BaseException:  # noqa: BLE001 - refusing is what is asked (DCP raises a BaseException)
        pass
    ran_in_load_pieces = marker.exists()
    assert not ran_on_load and not ran_in_load_pieces, (
        f"code from the checkpoint ran: train.py --load {ran_on_load}, parallel.load_pieces {ran_in_load_pieces}"
        f" (exit {got.code!r})")
    assert got.code != 0


def test_meta_json_is_json_only(base, saved, tmp_path):
    """meta.json is read as JSON only: a pickle there (or any text that is not JSON) is one error line that
    names the file, exit 2, and nothing in it runs."""
    folder = copy_checkpoint(saved, tmp_path / "ckpt")
    marker = tmp_path / "marker"
    for content in (pickle.dumps(RunsCode(f"touch {marker}")), b"{not json", b""):
        (folder / "meta.json").write_bytes(content)
        got = main(*base, "--steps", 3, "--load", tmp_path / "ckpt")
        assert got.code == 2, got
        lines = got.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --load ") and "cannot read meta.json" in lines[0], lines
        assert not marker.exists() and got.out == ""


# ---------------------------------------------------------------------------------------------------
# 8. Bad input: one error line, exit 2
# ---------------------------------------------------------------------------------------------------


def one_error(got: Result) -> str:
    assert got.code == 2, got
    lines = got.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), got.err
    assert "Traceback" not in got.err and "step " not in got.out
    return lines[0]


def test_bad_checkpoint_flags_are_one_error_line_and_exit_2(base, saved, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--hidden", "64", "--load", saved], ["hidden (32 saved, 64 now)"]),
        (["--layers", "3", "--load", saved], ["layers (2 saved, 3 now)"]),
        (["--save-every", "2"], ["--save-every", "--save"]),
        (["--keep-last", "2"], ["--keep-last", "--save"]),
        (["--save", a_file], ["--save", "not a folder"]),
        (["--load", ""], ["--load", "empty"]),
        (["--load", a_file], ["--load", "not a folder"]),
        (["--save", tmp_path / "s", "--keep-last", "0"], ["--keep-last", ">= 1", "0"]),
        (["--save", tmp_path / "s", "--save-every", "0"], ["--save-every", ">= 1", "0"]),
    ]
    for argv, words in cases:
        line = one_error(main(*base, "--steps", 2, *argv))
        for w in words:
            assert str(w) in line, (argv, w, line)
    i = base.index("--sample-tokens")
    bert = base[:i] + base[i + 2:]  # --sample-tokens is for gpt only
    line = one_error(main(*bert, "--model", "bert", "--steps", 2, "--load", saved))
    assert "a checkpoint of --model gpt" in line and "this run is --model bert" in line, line
    assert not (tmp_path / "s").exists()


def test_layout_fields_may_change_on_resume(base, saved):
    """The layout fields (sequence parallel, the vocabulary padding of another tp, recompute, attention) are
    not the model: a checkpoint loads with them changed."""
    got = main(*base, "--steps", 3, "--load", saved, "--recompute", "full", "--attention", "sdpa")
    assert got.code == 0, got.err
    assert "(step 2;" in got.out and set(step_losses(got.out)) == {3}


def test_load_of_a_folder_without_a_checkpoint_starts_fresh(base, tmp_path):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        got = main(*base, "--steps", 1, "--load", where)
        assert got.code == 0, got.err
        assert f"--load {where}: no checkpoint there yet, starting fresh" in got.out
        assert "eval loss at step 0:" in got.out and set(step_losses(got.out)) == {1}


# ---------------------------------------------------------------------------------------------------
# 9. --keep-last
# ---------------------------------------------------------------------------------------------------


def test_keep_last_keeps_the_newest_and_latest_names_the_newest(base, tmp_path):
    root = tmp_path / "ckpt"
    got = main(*base, "--steps", 5, "--save-every", 1, "--keep-last", 2, "--save", root)
    assert got.code == 0, got.err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    assert (root / "latest").read_text().strip() == "step-00000005"
    assert [m for m in re.findall(r"^saved step (\d+)", got.out, re.M)] == ["1", "2", "3", "4", "5"]
    got = main(*base, "--steps", 7, "--save-every", 1, "--keep-last", 2, "--save", root, "--load", root)
    assert got.code == 0, got.err
    assert "(step 5;" in got.out
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000007"]
    assert (root / "latest").read_text().strip() == "step-00000007"
    for name in ("step-00000006", "step-00000007"):
        assert read_checkpoint(root / name)[0]["step"] == int(name[5:])


# ---------------------------------------------------------------------------------------------------
# 10. The metadata allow-list, tested from the inside: (module, name) pairs only, never a dotted name
# ---------------------------------------------------------------------------------------------------


def global_call(module: str, name: str, *args) -> bytes:
    """A protocol-4 pickle that asks the unpickler for `name` under `module` (STACK_GLOBAL, which resolves a
    dotted name through the module's attributes: "os.system" under a module that imports os) and calls it
    with args (str or bytes)."""
    def push(a):
        b = a.encode() if isinstance(a, str) else a
        return (b"X" if isinstance(a, str) else b"B") + len(b).to_bytes(4, "little") + b
    return b"\x80\x04" + push(module) + push(name) + b"\x93(" + b"".join(map(push, args)) + b"tR."


DCP_MD, DCP_FS = "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"
PLANTED = {  # name -> (module, name, args); {marker} is the file the call would create
    "metadata: os.system": (DCP_MD, "os.system", "touch {marker}"),
    "metadata: torch.save": (DCP_MD, "torch.save", "x", "{marker}"),
    "filesystem: os.system": (DCP_FS, "os.system", "touch {marker}"),
    "filesystem: pickle.loads": (DCP_FS, "pickle.loads", "pickled os.system"),
    "filesystem: an unlisted class": (DCP_FS, "FileSystemWriter", "{marker}"),
    "serialization: os.system": ("torch.serialization", "os.system", "touch {marker}"),
    "torch: a callable": ("torch", "save", "x", "{marker}"),
    "torch: a dotted dtype": ("torch", "float32.__class__", "x"),
    "pathlib: os.system": ("pathlib", "os.system", "touch {marker}"),
}


@pytest.mark.parametrize("case", PLANTED, ids=list(PLANTED))
def test_planted_globals_under_allowed_modules_are_refused_and_never_run(base, saved, tmp_path, case):
    """A .metadata that asks an allowed module for a dotted name (os.system, torch.save, pickle.loads of a
    second pickle), for a callable torch attribute, or for an unlisted name: --load is one error line naming
    module.name, exit 2, SafeReader raises, and the marker file the call would write never appears.
    (Before the allow-list was made of (module, name) pairs, the dotted names ran.)"""
    folder = copy_checkpoint(saved, tmp_path / "ckpt")
    marker = tmp_path / "marker"
    module, name, *args = PLANTED[case]
    args = [pickle.dumps(RunsCode(f"touch {marker}")) if a == "pickled os.system" else a.format(marker=marker)
            for a in args]
    (folder / ".metadata").write_bytes(global_call(module, name, *args))
    got = main(*base, "--steps", 3, "--load", tmp_path / "ckpt")
    assert not marker.exists(), f"{module}.{name} ran"
    line = one_error(got)
    assert f"refers to {module}.{name}: refused" in line, line
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        P.SafeReader(str(folder)).read_metadata()
    assert not marker.exists(), f"{module}.{name} ran"


def recorded_globals(folder: Path) -> set:
    """The (module, name) pairs the unpickler asks for when it reads folder's .metadata (plain pickle: these
    are files the tests wrote)."""
    asked = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            asked.add((module, name))
            return super().find_class(module, name)

    with open(folder / ".metadata", "rb") as f:
        Recorder(f).load()
    return asked


def test_the_allow_list_is_what_dcp_pickles_for_nanomeg_checkpoints(base, saved, tmp_path):
    """The allow-list is the globals DCP's pickle of real checkpoints asks for (a GPT, a BERT, a MoE GPT saved
    by train.py), no more: beyond them only the other dtypes and pathlib's 3.13 name; nothing callable in
    torch, no name with a dot."""
    folders = [train.find_checkpoint(str(saved))]
    i = base.index("--sample-tokens")
    for name, extra in (("bert", ["--model", "bert"]), ("moe", ["--experts", "4", "--sample-tokens", "0"])):
        assert main(*base[:i], *base[i + 2:], *extra, "--steps", 1, "--save", tmp_path / name).code == 0
        folders.append(train.find_checkpoint(str(tmp_path / name)))
    asked = set().union(*map(recorded_globals, folders))
    assert asked <= P.CHECKPOINT_GLOBALS, asked - P.CHECKPOINT_GLOBALS
    extra = {(m, n) for m, n in P.CHECKPOINT_GLOBALS - asked
             if not (m == "torch" and isinstance(getattr(torch, n), torch.dtype)) and m != "pathlib._local"}
    assert not extra, extra
    assert all("." not in n for _, n in P.CHECKPOINT_GLOBALS)
    assert all(not callable(getattr(torch, n)) for m, n in P.CHECKPOINT_GLOBALS if m == "torch" and n != "Size")


def odd_metadata(folder: Path, case: str, tmp_path: Path) -> None:
    """Rewrite folder's .metadata with allowed types only, given odd values."""
    md = P.SafeReader(str(folder)).read_metadata()
    md.storage_meta = None
    if case == "not a Metadata":
        md = torch.Size([1, 2])
    elif case == "storage_meta a path":
        md.storage_meta = Path("/")
    elif case == "entries a Size":
        md.state_dict_metadata = torch.Size([3])
    elif case == "a file out of the folder":  # the data moved next to the folder, the metadata pointing there
        data = next(folder.glob("*.distcp"))
        data.rename(folder.parent / "outside.distcp")
        md.storage_data = {k: v.__class__("../outside.distcp", v.offset, v.length)
                           for k, v in md.storage_data.items()}
    elif case == "a negative offset":
        md.storage_data = {k: v.__class__(v.relative_path, -1, v.length) for k, v in md.storage_data.items()}
    (folder / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("case", ["not a Metadata", "storage_meta a path", "entries a Size",
                                  "a file out of the folder", "a negative offset"])
def test_allowed_types_with_odd_values_are_refused_in_one_line(base, saved, tmp_path, case):
    """Allowed types put together oddly (a Size for the whole metadata or for its entries, a path where the
    StorageMeta belongs, an entry whose data file lies outside the checkpoint's folder, a negative offset):
    --load is one error line, exit 2; nothing is read from outside the folder. (Before: tracebacks logged by
    DCP, or a load that read the tensors from ../outside.distcp.)"""
    folder = copy_checkpoint(saved, tmp_path / "ckpt")
    odd_metadata(folder, case, tmp_path)
    line = one_error(main(*base, "--steps", 3, "--load", tmp_path / "ckpt"))
    assert "refused" in line, line


# ---------------------------------------------------------------------------------------------------
# 11. No save lost: --save refuses a folder of another run's later steps; --keep-last keeps what it wrote
# ---------------------------------------------------------------------------------------------------


def test_save_into_a_folder_holding_later_steps_is_refused_before_the_first_step(base, tmp_path):
    """Run A saves steps 1..4 into DIR. A fresh run with --save DIR --keep-last 1 used to prune by step
    number: it deleted the step 2 it had just written, left `latest` naming it, and the next --load DIR
    resumed A's step 4 without a word. Now it is one error line naming A's step 4, before any step, and so
    is a rollback into the same folder (--load DIR/step-00000002 --save DIR); DIR is untouched. --load DIR
    --save DIR continues A."""
    root = tmp_path / "ckpt"
    assert main(*base, "--steps", 4, "--save-every", 1, "--save", root).code == 0
    before = step_folders(root)
    line = one_error(main(*base, "--steps", 2, "--keep-last", 1, "--save", root))
    assert f"--save {root} holds step-00000004" in line and "starts fresh" in line, line
    line = one_error(main(*base, "--steps", 3, "--load", root / "step-00000002", "--save", root))
    assert "holds step-00000004" in line and "(step 2)" in line, line
    assert step_folders(root) == before and (root / "latest").read_text().strip() == "step-00000004"
    got = main(*base, "--steps", 5, "--keep-last", 1, "--load", root, "--save", root)
    assert got.code == 0 and "(step 4;" in got.out, got
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000005"]
    assert (root / "latest").read_text().strip() == "step-00000005"


def test_keep_last_never_removes_the_save_just_made_nor_later_steps(tmp_path):
    """prune_checkpoints keeps the checkpoint just written and the K - 1 newest before it; steps after it (a
    run the CLI check could not see, e.g. one started at the same time) are neither counted nor removed."""
    for k in range(1, 7):
        (tmp_path / f"step-{k:08d}").mkdir()
        (tmp_path / f"step-{k:08d}" / "meta.json").write_text("{}")
    (tmp_path / "step-00000007").mkdir()  # not committed (no meta.json): not a checkpoint, left alone
    train.prune_checkpoints(tmp_path, 2, tmp_path / "step-00000003")
    assert step_folders(tmp_path) == [f"step-{k:08d}" for k in (2, 3, 4, 5, 6, 7)]
    train.prune_checkpoints(tmp_path, 1, tmp_path / "step-00000003")
    assert step_folders(tmp_path) == [f"step-{k:08d}" for k in (3, 4, 5, 6, 7)]


# ---------------------------------------------------------------------------------------------------
# 12. --load takes the newest complete checkpoint, as the README says
# ---------------------------------------------------------------------------------------------------


def test_load_takes_the_newest_complete_step_whatever_latest_says(base, tmp_path):
    """A kill between a commit and latest's update leaves `latest` naming the step before: --load DIR takes
    the newest complete step (both are whole; the newest loses less work), as the README says (the code
    used to follow `latest`). A `latest` of bytes that are not UTF-8 (a traceback before) is not read
    either. --load DIR/step-NNNNNNNN takes that step."""
    root = tmp_path / "ckpt"
    assert main(*base, "--steps", 2, "--save-every", 1, "--save", root).code == 0
    for pointer in (b"step-00000001\n", b"\xff\xfe\x00 not utf-8\n"):
        (root / "latest").write_bytes(pointer)
        got = main(*base, "--steps", 3, "--load", root)
        assert got.code == 0 and "(step 2;" in got.out, (pointer, got)
    got = main(*base, "--steps", 3, "--load", root / "step-00000001")
    assert got.code == 0 and "(step 1;" in got.out and set(step_losses(got.out)) == {2, 3}, got


# ---------------------------------------------------------------------------------------------------
# 13. Every output path is checked before the first step; meta.json is checked as data
# ---------------------------------------------------------------------------------------------------


def test_output_paths_are_checked_before_the_first_step(base, tmp_path):
    """--save below a regular file and --export-hf onto (or below) one used to fail after training, with a
    traceback: now one error line before the first step."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--save", a_file / "ckpt"], ["--save", f"({a_file} is a file)"]),
             (["--export-hf", a_file], ["--export-hf", "not a folder (a file is there)"]),
             (["--export-hf", a_file / "a" / "b"], ["--export-hf", f"({a_file} is a file)"])]
    for argv, words in cases:
        line = one_error(main(*base, "--steps", 2, *argv))
        for w in words:
            assert str(w) in line, (argv, w, line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder_is_one_error_line(base, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = one_error(main(*base, "--steps", 2, "--save", locked / "ckpt"))
    assert f"{locked} is not writable" in line, line


META_FAULTS = {  # name -> a change of the saved meta.json (a function of it), and words of the error line
    "not an object": (lambda m: [m], ["a JSON list, not an object"]),
    "no index": (lambda m: {k: v for k, v in m.items() if k != "index"}, ["no 'index'"]),
    "no layout": (lambda m: {k: v for k, v in m.items() if k != "layout"}, ["no 'layout'"]),
    "step a string": (lambda m: m | {"step": "2"}, ["'step' is '2', not int"]),
    "config a list": (lambda m: m | {"config": []}, ["'config' is '[]', not dict"]),
    "step of another folder": (lambda m: m | {"step": 10**12}, ["step 1000000000000", "step-00000002"]),
    "tp zero": (lambda m: m | {"layout": m["layout"] | {"tp": 0}}, ["layout", "ints >= 1"]),
    "index a list": (lambda m: m | {"index": []}, ["'index' is '[]', not dict"]),
    "entry of absurd size": (lambda m: m | {"index": {e: v | {"size": [10**12] + v["size"][1:]}
                                                      for e, v in m["index"].items()}}, ["not inside"]),
    "entry not ints": (lambda m: m | {"index": {e: v | {"at": ["0"] * len(v["at"])}
                                                for e, v in m["index"].items()}}, ["non-negative ints"]),
    "a tensor saved bigger": (lambda m: m | {"index": {e: v | {"full": [10**9] * len(v["full"])}
                                                       for e, v in m["index"].items()}}, ["this model's is"]),
}


def test_meta_json_of_missing_keys_wrong_types_or_absurd_sizes_is_one_error_line(base, saved, tmp_path):
    """meta.json is data from a file: not an object, a key missing, a value of the wrong type, sizes far
    out of range: one error line naming the fault, exit 2 (each was a traceback, or an allocation of the
    absurd size)."""
    folder = copy_checkpoint(saved, tmp_path / "ckpt")
    good = json.loads((folder / "meta.json").read_text())
    for name, (change, words) in META_FAULTS.items():
        (folder / "meta.json").write_text(json.dumps(change(json.loads(json.dumps(good)))))
        line = one_error(main(*base, "--steps", 3, "--load", tmp_path / "ckpt"))
        assert line.startswith(f"error: --load {folder}: "), (name, line)
        for w in words:
            assert w in line, (name, w, line)


def test_a_checkpoint_without_dcp_metadata_or_data_is_one_error_line(base, saved, tmp_path):
    """A checkpoint missing DCP's .metadata used to print 35 lines (two tracebacks logged by DCP's reader on
    its way to the rank-local fallback) before the error; a missing or cut data file printed DCP's wrapped
    exception with its frames. Now one line each, naming the file."""
    for fault, words in (("no .metadata", ["no .metadata"]), ("no data", ["__0_0.distcp", "is missing"]),
                         ("cut data", ["__0_0.distcp", "cut short"])):
        folder = copy_checkpoint(saved, tmp_path / fault)
        if fault == "no .metadata":
            (folder / ".metadata").unlink()
        elif fault == "no data":
            (folder / "__0_0.distcp").unlink()
        else:
            os.truncate(folder / "__0_0.distcp", 1000)
        got = main(*base, "--steps", 3, "--load", tmp_path / fault)
        line = one_error(got)
        for w in words:
            assert w in line, (fault, w, line)


# ---------------------------------------------------------------------------------------------------
# 14. A load covers every element: coverage checked element by element, not by summed areas
# ---------------------------------------------------------------------------------------------------

COVERS = {  # name -> saved pieces (at, size) of a [4, 6] tensor, and the box left unread (None: all covered)
    "rows overlap, last row unread": ([((0, 0), (3, 6)), ((1, 0), (1, 6))], "[3:4, 0:6]"),
    "columns overlap, a block unread": ([((0, 0), (4, 4)), ((0, 2), (2, 2)), ((2, 2), (2, 2))], "[0:4, 4:6]"),
    "a hole in the middle": ([((0, 0), (1, 6)), ((3, 0), (1, 6)), ((1, 0), (2, 2)), ((1, 4), (2, 2)),
                              ((0, 2), (1, 4))], "[1:3, 2:4]"),
    "overlapping but whole": ([((0, 0), (3, 6)), ((2, 0), (2, 6))], None),
}


@pytest.mark.parametrize("case", COVERS, ids=list(COVERS))
def test_load_pieces_refuses_overlapping_pieces_that_leave_a_hole(tmp_path, case):
    """Saved pieces that overlap can sum to the tensor's area and still leave elements unread (which kept
    their fresh values before, silently): load_pieces names the tensor and the box of the unread
    elements; overlapping pieces that do cover it load it exactly (they were refused before: "30 of 24
    elements")."""
    saved_pieces, hole = COVERS[case]
    full = torch.arange(24.0).view(4, 6)
    ps = [P.Piece(at, at, size, True) for at, size in saved_pieces]
    P.save_pieces(tmp_path / "ck", {"w": (full, ps, (4, 6))}, P.Mesh.serial())
    index = {f"w@{at[0]},{at[1]}": dict(key="w", at=list(at), size=list(size), full=[4, 6])
             for at, size in saved_pieces}
    local = torch.full((4, 6), math.nan)
    wanted = {"w": (local, [P.Piece((0, 0), (0, 0), (4, 6), True)], (4, 6))}
    if hole is None:
        P.load_pieces(tmp_path / "ck", wanted, index)
        assert torch.equal(local, full)
        return
    with pytest.raises(ValueError, match=re.escape("does not hold all of 'w' (4, 6)")) as e:
        P.load_pieces(tmp_path / "ck", wanted, index)
    assert hole in str(e.value), str(e.value)
    assert local.isnan().all()  # nothing was read


def load_with_a_hole(mesh, folder):
    """'w' [4, 6] split by rows over tp, loaded from `folder`, whose one saved piece (rows 0..2) leaves row 3
    unread: a row that only tp rank 1 holds at tp 2. -> the error this rank raised."""
    local = torch.zeros(4 // mesh.tp, 6)
    index = {"w@0,0": dict(key="w", at=[0, 0], size=[3, 6], full=[4, 6])}
    try:
        P.load_pieces(folder, {"w": (local, P.pieces(local.shape, 0, mesh), (4, 6))}, index)
    except ValueError as e:
        return str(e)
    return None


def test_a_hole_that_one_rank_finds_fails_the_load_on_every_rank(pool, tmp_path):
    """Each rank checks the pieces it holds, so a hole may show on some ranks only: all of them raise the
    same error (the failing rank's, naming the box), none goes on alone into DCP's collectives (where it
    would wait for the others), and rank 0, which prints, says what is wrong."""
    full = torch.arange(24.0).view(4, 6)
    P.save_pieces(tmp_path / "ck", {"w": (full, [P.Piece((0, 0), (0, 0), (3, 6), True)], (4, 6))}, P.Mesh.serial())
    got = pool.run(load_with_a_hole, str(tmp_path / "ck"), tp=2)
    assert len(set(got)) == 1 and "does not hold all of 'w' (4, 6)" in got[0] and "[3:4, 0:6]" in got[0], got
