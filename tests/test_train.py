"""train.py: end to end as a user runs it (exit codes, messages, learning),
and its functions one by one (the schedule, the optimizer's groups, clipping,
the per-rank data split, the checks), imported as `train`.

End-to-end runs start processes (a second or two each just to import torch),
so bad input is checked in this process through `train.main(argv)`, which
prints the same line and returns the same exit code; a few cases also run as
a real process, to prove the promise holds there."""

import errno
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nanomeg as N
import parallel as P
import runlog
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--sample-tokens", "0"]
CPU = torch.device("cpu")


def run(*args, torchrun=0, timeout=240):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc-per-node={torchrun}"] if torchrun else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "abc.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


def eval_losses(stdout):
    return [float(v) for v in re.findall(r"eval loss at step \d+: ([0-9.]+)", stdout)]


def args_of(*argv):
    return train.parse_args([*argv])


def tiny_model(dtype=torch.float32, **overrides):
    """A one-layer GPT with layernorm, biases and learned positions: (cfg, params)."""
    cfg = N.GPTConfig(vocab_size=256, max_seq=32, layers=1, hidden=16, heads=2, **overrides)
    params = {k: v.requires_grad_(True) for k, v in N.init_gpt(cfg, seed=0, dtype=dtype).items()}
    return cfg, params


# ---------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------


def test_a_short_run_learns_and_writes_a_sample(text_file):
    out = run("--data", text_file, "--steps", "40", "--log-every", "10", "--eval-every", "40", "--lr", "1e-2",
              *TINY[:-2], "--sample-tokens", "20", "--prompt", "the ")
    assert out.returncode == 0, out.stderr
    first, last = eval_losses(out.stdout)
    assert last < first - 1.0, out.stdout  # a repetitive text is learned fast
    assert re.search(r"step +40 \| loss [0-9.]+ \| lr .* tok/s \| .* GFLOP/s \| MFU .*% \| comm 0 el/step", out.stdout)
    assert "sample:\nthe " in out.stdout


def test_torchrun_tp2_sequence_parallel_learns_and_counts_communication(text_file):
    out = run("--data", text_file, "--steps", "20", "--log-every", "20", "--eval-every", "20", "--lr", "1e-2",
              "--sequence-parallel", "--bf16", *TINY, torchrun=2)  # bf16 + SP: the gather's backward in bf16
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh tp=2 pp=1 dp=1, sequence parallel" in out.stdout
    first, last = eval_losses(out.stdout)
    assert last < first, out.stdout
    comm = int(re.search(r"comm tp ([0-9,]+) el/step", out.stdout).group(1).replace(",", ""))
    assert comm > 0


def test_bf16_and_the_other_architecture_switches_run_and_a_prompt_that_is_not_utf8_samples(text_file):
    # argv bytes that are not UTF-8 reach Python surrogate-escaped; the byte-level model takes them as they are
    out = run("--data", text_file, "--steps", "6", "--log-every", "3", "--eval-every", "6", "--bf16",
              "--position", "rope", "--norm", "rmsnorm", "--activation", "swiglu", "--kv-heads", "1",
              "--attention", "sdpa", "--recompute", "full", *TINY, "--sample-tokens", "4", "--prompt", b"\xff\xfe")
    assert out.returncode == 0, out.stderr
    assert ", bf16" in out.stdout and len(eval_losses(out.stdout)) == 2
    assert "sample:\n\ufffd\ufffd" in out.stdout


PIPE = ["--layers", "4", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--steps", "12",
        "--log-every", "6", "--eval-every", "6", "--eval-batches", "2", "--lr", "1e-2"]


@pytest.mark.parametrize("model,layout,reference", [
    ("gpt", ["--tp", "2", "--pp", "2", "--microbatches", "2", "--sequence-parallel", "--sample-tokens", "8"], []),
    ("bert", ["--tp", "1", "--pp", "4", "--microbatches", "4", "--schedule", "zb"], []),
    # dp = 2 reads other batches than one process: compare ZeRO-1 with small buckets to plain dp instead
    ("gpt", ["--tp", "1", "--pp", "2", "--virtual-stages", "2", "--microbatches", "2", "--zero", "1",
             "--bucket-mb", "0.01"], ["--tp", "1", "--pp", "2", "--virtual-stages", "2", "--microbatches", "2"]),
])
def test_torchrun_pipeline_learns_exactly_what_the_uncut_run_learns(text_file, model, layout, reference):
    """4 processes with pipeline stages (with tp + SP; with zero-bubble over 4 stages; with interleaving, dp = 2,
    ZeRO-1 and small buckets): the same eval losses to the printed four decimals as the one-process run (or,
    with dp = 2, as the same layout without ZeRO-1); the log splits the communication per mesh dim and shows
    the simulated and the measured bubble."""
    common = ["--model", model, "--data", text_file, *PIPE, "--peak-flops", "1e9"]
    want = run(*common, *reference, torchrun=4 if reference else 0)
    got = run(*common, *layout, torchrun=4)
    assert want.returncode == 0, want.stderr[-3000:]
    assert got.returncode == 0, got.stderr[-3000:]
    assert len(eval_losses(want.stdout)) == 3 and eval_losses(got.stdout) == eval_losses(want.stdout), \
        (want.stdout, got.stdout)
    assert "pipeline: " in got.stdout and "simulated bubble" in got.stdout
    step_line = re.search(r"step +12 \|.*", got.stdout)[0]
    assert re.search(r"comm .*pp [0-9,]+.* el/step \| bubble \d+% measured", step_line), step_line
    if model == "gpt" and not reference:
        assert "sample" in got.stdout  # the stages gathered for the demo
    if reference:
        assert "ZeRO-1" in got.stdout and "dp " in step_line
        assert_zero_state_measured(got.stdout)


def assert_zero_state_measured(stdout: str) -> None:
    """The log's ZeRO-1 line: the state measured from storage is 12 B an element of the rank's slices."""
    line = re.search(r"ZeRO-1: AdamW state ([\d,]+) B on rank 0, measured from storage: .* 12 B x ([\d,]+) elements",
                     stdout)
    assert line and int(line[1].replace(",", "")) == 12 * int(line[2].replace(",", "")), stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_this_machine_learn_what_one_process_learns(text_file):
    """Two `torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d` launches started together stand for two
    machines of 2 ranks each: tp 2 inside each node, pp 2 across them. They print the one-process run's eval
    losses."""
    common = ["--data", text_file, *PIPE, "--sample-tokens", "0"]
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}

    def nodes(*argv):
        launches = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"nanomeg-{argv[-1]}",
             str(ROOT / "train.py"), *common, "--tp", "2", "--pp", "2", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
        try:
            outs = [launch.communicate(timeout=300) for launch in launches]
        finally:
            for launch in launches:
                launch.kill()
        assert [launch.returncode for launch in launches] == [0, 0], [err[-3000:] for _, err in outs]
        return "".join(out for out, _ in outs)

    want = run(*common)
    assert want.returncode == 0, want.stderr[-3000:]
    got = nodes("--microbatches", "2")
    assert len(eval_losses(want.stdout)) == 3 and eval_losses(got) == eval_losses(want.stdout), (got, want.stdout)


@pytest.mark.parametrize("argv, world, per_node, words", [
    (["--tp", "4"], 8, 2, "--tp 4 does not divide the 2 ranks per node: a tensor-parallel group would cross nodes"),
    (["--tp", "2", "--cp", "3", "--seq", "60"], 24, 8, "tp x cp = 2 x 3 = 6 does not divide the 8 ranks per node"),
    (["--tp", "2"], 8, 3, "the world of 8 ranks is not a whole number of nodes of 3 ranks"),
])
def test_a_tp_group_across_nodes_is_refused_before_any_process_group(text_file, argv, world, per_node, words):
    """What torchrun tells each rank (WORLD_SIZE, LOCAL_WORLD_SIZE) is checked with the flags: one error line,
    exit 2, before the process group (this lone RANK 0 would otherwise wait for the others forever)."""
    env = {**os.environ, "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(per_node), "RANK": "0"}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", text_file, *TINY, *argv], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {words}") and out.stderr.count("\n") == 1, \
        out.stderr


@pytest.mark.parametrize("rank, words", [(1, "DistNetworkError"), (0, "DistStoreError: Timed out")])
def test_a_rendezvous_nobody_answers_is_one_line_after_the_timeout(text_file, rank, words):
    """MASTER_ADDR:MASTER_PORT where nobody listens (rank 1), or where the other rank never comes (rank 0, which
    hosts the store): after --timeout (and torch's retries) each rank says one line and exits 2, instead of
    torch's retry logs with their C++ stacks."""
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", text_file, *TINY, "--timeout", "2"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-3000:]
    assert out.stderr.startswith(f"error: rank {rank} could not join the 2 ranks at 127.0.0.1:{port} within --timeout "
                                 "2 s: ") and words in out.stderr, out.stderr


@pytest.mark.parametrize("tp, cp, per_node", [(1, 4, 2), (2, 2, 2), (2, 2, 8), (8, 1, 8)])
def test_tp_inside_a_node_and_cp_inside_or_across_nodes_pass(tp, cp, per_node):
    P.check_nodes(tp, cp, 16, per_node)  # tp divides the node; tp·cp divides it or is a multiple of it


HANG = ["--layers", "4", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--steps", "6",
        "--log-every", "3", "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "0", "--pp", "2", "--tp", "1",
        "--microbatches", "4", "--timeout", "3"]


def rank_lines(stderr: str) -> dict[int, str]:
    """The one line each rank says when it fails or gives up waiting, by rank."""
    said = [(int(m[1]), m[0]) for m in re.finditer(r"^rank (\d+) \(tp \d+, pp \d+, dp \d+\): .*$", stderr, re.M)]
    assert len(said) == len(dict(said)), stderr[-4000:]  # one line per rank
    return dict(said)


@pytest.mark.parametrize("fault", ["raise", "sleep"])
def test_a_rank_that_raises_or_stalls_mid_pipeline_step_ends_the_job_and_every_rank_says_where(text_file, fault):
    """NANOMEG_FAULT plants a fault on rank 1 (the last stage) at step 3, before its action 2 (F of microbatch 1),
    while rank 0 waits in that action's transfer: the job exits non-zero within --timeout 3 plus a few seconds of
    the fault, and each rank says one line naming its coordinates, step, action and what it waits in."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOMEG_FAULT": f"{fault}:1:3:2"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(ROOT / "train.py"),
                          "--data", text_file, *HANG], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode != 0
    lines = rank_lines(out.stderr)
    assert sorted(lines) == [0, 1], out.stderr[-4000:]
    assert lines[1].startswith("rank 1 (tp 0, pp 1, dp 0): step 3, action 2 of 8 F(mb 1, chunk 0): "), lines[1]
    assert lines[0].startswith("rank 0 (tp 0, pp 0, dp 0): step 3, action 2 of 8 B(mb 0, chunk 0): waiting "), lines[0]
    assert "recv from rank 1" in lines[0] and "eval loss at step 0" in out.stdout and "step 3" not in out.stdout
    if fault == "raise":
        assert lines[1].endswith("RuntimeError: the fault planted by NANOMEG_FAULT=raise:1:3:2"), lines[1]
    else:  # both waited about --timeout (3 s): the stalled rank and the one waiting for it
        assert "waiting" in lines[1] and "a stall planted by NANOMEG_FAULT=sleep:1:3:2" in lines[1], lines[1]
        for line in lines.values():
            assert 2 <= int(re.search(r"waiting (\d+) s", line)[1]) <= 6, line


MOE = ["--experts", "4", "--topk", "2", "--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch",
       "4", "--steps", "8", "--log-every", "4", "--eval-every", "4", "--eval-batches", "2", "--lr", "1e-2",
       "--capacity-factor", "1.5", "--z-loss", "1e-3", "--peak-flops", "1e9", "--sample-tokens", "0"]


@pytest.mark.parametrize("layout,reference", [
    ((["--tp", "2", "--sequence-parallel"], 2), ([], 0)),  # expert-TP + SP against one process
    # ep = 2 of dp = 2, 2 stages, microbatches, ZeRO-1, small buckets: against plain dp = 2 (the same batches)
    ((["--tp", "1", "--pp", "2", "--ep", "2", "--microbatches", "2", "--zero", "1", "--bucket-mb", "0.01"], 4),
     (["--tp", "1"], 2)),
])
def test_torchrun_mixture_of_experts_learns_exactly_what_the_reference_learns(text_file, layout, reference):
    """MoE GPT (4 experts, top-2, capacity 1.5, aux and z losses) under torchrun: the same eval losses to the
    printed four decimals as one process (tp 2 + SP), or as dp 2 without ep (pp 2 x ep 2, ZeRO-1); the log has
    the LM loss, the auxiliary losses, a bar per expert and, with ep, all-to-alls on ep."""
    common = ["--data", text_file, *MOE]
    (args, n), (ref_args, ref_n) = layout, reference
    want, got = run(*common, *ref_args, torchrun=ref_n), run(*common, *args, torchrun=n)
    assert want.returncode == 0, want.stderr[-3000:]
    assert got.returncode == 0, got.stderr[-3000:]
    assert len(eval_losses(want.stdout)) == 3 and eval_losses(got.stdout) == eval_losses(want.stdout), \
        (want.stdout, got.stdout)
    step_line = re.search(r"step +8 \|.*", got.stdout)[0]
    assert re.search(r"\| lm \d\.\d{4} \| aux \d\.\d{4} \|", step_line), step_line
    assert re.search(r"\| experts [▁▂▃▄▅▆▇█]{4} \d+/\d+/\d+/\d+%", step_line), step_line
    assert "experts: 2 of 2 layers have 4 experts, top-2, capacity factor 1.5" in got.stdout
    if "--ep" in args:
        assert re.search(r"comm .*ep [0-9,]+", step_line) and "each rank holds 2 experts of each layer" in got.stdout
        assert_zero_state_measured(got.stdout)


CP = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "64", "--batch", "4", "--steps", "8", "--log-every",
      "4", "--eval-every", "4", "--eval-batches", "2", "--lr", "1e-2", "--dropout", "0.1", "--peak-flops", "1e9",
      "--sample-tokens", "8"]


@pytest.mark.parametrize("layout", [
    ["--cp", "2", "--tp", "2", "--sequence-parallel"],
    ["--cp", "2", "--pp", "2", "--tp", "1", "--microbatches", "2", "--zero", "1", "--position", "rope"],
])
def test_torchrun_context_parallel_learns_exactly_what_one_process_learns(text_file, layout):
    """4 processes with context parallelism (ring attention; with tp 2 + SP, or with 2 pipeline stages, ZeRO-1
    over dp x cp and rotary positions), dropout on: the same eval losses to the printed four decimals as one
    process; the log counts the cp ring's sends and the dp x cp gradient reduction."""
    common = ["--data", text_file, *CP, *(["--position", "rope"] if "rope" in layout else [])]
    want = run(*common, torchrun=0)
    got = run(*common, *[a for a in layout if a not in ("--position", "rope")], torchrun=4)
    assert want.returncode == 0, want.stderr[-3000:]
    assert got.returncode == 0, got.stderr[-3000:]
    assert len(eval_losses(want.stdout)) == 3 and eval_losses(got.stdout) == eval_losses(want.stdout), \
        (want.stdout, got.stdout)
    step_line = re.search(r"step +8 \|.*", got.stdout)[0]
    assert re.search(r"comm .*cp [0-9,]+ .*dpcp [0-9,]+", step_line), step_line
    assert " cp=2 " in got.stdout and "sample" in got.stdout
    if "--zero" in layout:
        assert_zero_state_measured(got.stdout)


def test_cp_flags_that_need_the_world_size_are_refused_before_any_process_group():
    for argv, world, message in [
        (["--cp", "2", "--seq", "30"], 2, "--seq 30 does not cut into 2 x --cp 2 = 4 equal chunks"),
        (["--cp", "2", "--tp", "2", "--sequence-parallel", "--seq", "36"], 4,
         "--seq 36 does not cut into 2 x --cp 2 x --tp 2 (sequence parallel) = 8 equal chunks"),
        (["--cp", "2", "--model", "bert"], 2, "--cp is for --model gpt"),
        (["--cp", "2", "--experts", "4"], 2, "--cp with --experts"),
        (["--cp", "2", "--position", "relative"], 2, "--cp with --position relative"),
        (["--cp", "3"], 4, "--cp 3 x --pp 1 does not divide the world size 4"),
    ]:
        with pytest.raises(train.UsageError, match=re.escape(message)):
            train.check_args(args_of(*argv), world=world)


def test_moe_flags_that_need_the_world_size_are_refused_before_any_process_group():
    for argv, world, message in [
        (["--experts", "3", "--ep", "2"], 2, "--experts 3 is not divisible by --ep 2"),
        (["--experts", "4", "--ep", "2", "--tp", "2"], 2, "--ep 2 does not divide the data-parallel ranks dp = 1"),
        (["--experts", "4", "--tp", "2", "--seq", "33"], 2, "each tp rank routes 1/tp of the sequence, so --seq 33"),
        (["--model", "bert", "--experts", "4"], 1, "--experts is for --model gpt"),
    ]:
        with pytest.raises(train.UsageError, match=re.escape(message)):
            train.check_args(args_of(*argv), world=world)


def test_show_schedule_draws_the_timeline_and_exits_without_processes(capsys):
    assert train.main(["--pp", "4", "--layers", "4", "--microbatches", "8", "--show-schedule"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^rank \d \|", out, re.M)) == 4 and "formula: (p-1)/m = 0.375" in out
    assert "bubble 0.375 of the compute time; peak in flight per rank [4, 3, 2, 1]" in out


def test_bad_input_is_one_line_and_exit_code_2_as_a_process():
    for args, message in [(["--no-such-flag"], "error: unrecognized arguments: --no-such-flag (see --help)"),
                          (["--lr", "nan"], "error: --lr must be a finite number > 0, got nan")]:
        out = run(*args)
        assert out.returncode == 2, (out.stdout, out.stderr)
        assert out.stderr == message + "\n"  # one line: no usage line, no traceback


def test_tp_that_does_not_divide_heads_under_torchrun_exits_2_on_every_rank(text_file):
    out = run("--data", text_file, "--heads", "3", "--hidden", "48", "--steps", "1", torchrun=2)
    assert "error: --tp 2 does not divide --heads 3" in out.stderr
    assert out.stderr.count("error: --tp 2") == 1  # said once, by rank 0
    codes = re.findall(r"exitcode\s*: (-?\d+)", out.stderr)
    # every rank exits 2 on its own; torchrun may SIGTERM (-15) a rank that had not exited yet
    assert "2" in codes and set(codes) <= {"2", "-15"}, out.stderr


# ---------------------------------------------------------------------------
# Bad input, in this process: one line `error: ...`, exit code 2
# ---------------------------------------------------------------------------

TOO_BIG = "the model and one step need about"


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/file"], "--data /no/such/file: no such file or directory"),
    (["--data", ""], "--data is an empty path"),
    (["--data", "/dev/null"], "--data /dev/null: not a regular file or folder"),
    (["--heads", "3", "--hidden", "96", "--tp", "2"], "--tp 2 does not divide the world size 1"),
    (["--heads", "3", "--hidden", "32"], "--hidden 32 is not divisible by --heads 3"),
    (["--heads", "4", "--kv-heads", "3"], "--heads 4 is not divisible by --kv-heads 3"),
    (["--dropout", "0.1", "--attention", "sdpa"], "--attention sdpa has no counter-based dropout: use --attention "
                                                  "core with --dropout 0.1"),
    (["--seq", "2048", "--max-seq", "1024"], "--seq 2048 is longer than --max-seq 1024"),
    (["--max-seq", "0"], "--max-seq must be >= 1, got 0"),
    (["--steps", "-1"], "--steps must be >= 0, got -1"),
    (["--warmup", "-3"], "--warmup must be >= 0, got -3"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
    (["--weight-decay=-inf"], "--weight-decay must be a finite number >= 0, got -inf"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above --lr 0.01"),
    (["--peak-flops", "0"], "--peak-flops must be a finite number > 0, got 0.0"),
    (["--peak-flops", "nan"], "--peak-flops must be a finite number > 0, got nan"),
    (["--dropout", "nan"], "--dropout must be a finite number in [0, 1), got nan"),
    (["--dropout", "1"], "--dropout must be a finite number in [0, 1), got 1.0"),
    (["--seed", "-1"], "--seed must be in [0, 2**31), got -1"),
    (["--seed", str(2**31)], f"--seed must be in [0, 2**31), got {2**31}"),
    (["--sample-tokens", "5", "--prompt", "x" * 32], "--prompt is 32 bytes, not shorter than --seq 32"),
    (["--hidden", "1048576"], TOO_BIG),
    (["--batch", "1000000000"], TOO_BIG),
    (["--layers", "100000000"], TOO_BIG),  # refused at once: nothing is O(layers) before the check
    (["--show-layout", "--hidden", "1048576"], TOO_BIG),  # --show-layout checks what training checks
    (["--show-layout", "--heads", "3", "--hidden", "32"], "--hidden 32 is not divisible by --heads 3"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag (see --help)"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast' (see --help)"),
    (["--pp", "0"], "--pp must be >= 1, got 0"),
    (["--pp", "2"], "--layers 1 cannot be cut into --pp 2 x --virtual-stages 1 = 2 equal stages"),
    (["--layers", "2", "--pp", "2"], "--pp 2 does not divide the world size 1"),
    (["--layers", "2", "--pp", "1", "--tp", "2"], "--tp 2 does not divide the world size 1"),
    (["--virtual-stages", "2"], "--virtual-stages 2 needs --pp > 1"),
    (["--microbatches", "3"], "--microbatches 3 does not divide --batch 4"),
    (["--microbatches", "0"], "--microbatches must be >= 1, got 0"),
    (["--schedule", "interleaved"], "--schedule interleaved needs --virtual-stages >= 2, got 1"),
    (["--layers", "4", "--pp", "2", "--virtual-stages", "2", "--schedule", "zb"],
     "--virtual-stages 2 needs --schedule interleaved, got zb"),
    (["--layers", "4", "--pp", "2", "--virtual-stages", "2", "--microbatches", "1", "--show-schedule"],
     "--schedule interleaved needs --microbatches a multiple of --pp: got --microbatches 1, --pp 2"),
    (["--bucket-mb", "0"], "--bucket-mb must be a finite number > 0, got 0.0"),
    (["--layers", "2", "--pp", "2", "--position", "relative"], "--position relative does not pipeline (--pp 2)"),
    (["--zero", "2"], "argument --zero: invalid choice: 2"),
    (["--cp", "2"], "--cp 2 x --pp 1 does not divide the world size 1"),
    (["--cp", "0"], "--cp must be >= 1, got 0"),
    (["--timeout", "0"], "--timeout must be a finite number > 0, got 0.0"),
    (["--timeout", "-5"], "--timeout must be a finite number > 0, got -5.0"),
    (["--timeout", "inf"], "--timeout must be a finite number > 0, got inf"),
    (["--experts", "4", "--topk", "5"], "--topk 5 is more than --experts 4"),
    (["--experts", "4", "--ep", "2"], "--ep 2 x --pp 1 does not divide the world size 1"),
    (["--experts", "4", "--ep", "2", "--tp", "1"], "--ep 2 does not divide the data-parallel ranks dp = 1 (world 1 / "
                                                   "(tp 1 x pp 1))"),
    (["--experts", "4", "--ep", "0"], "--ep must be >= 1, got 0"),
    (["--experts", "4", "--capacity-factor", "0"], "--capacity-factor must be a finite number > 0, got 0.0"),
    (["--experts", "4", "--capacity-factor=-1.5"], "--capacity-factor must be a finite number > 0, got -1.5"),
    (["--experts", "4", "--aux-loss=-0.1"], "--aux-loss must be a finite number >= 0, got -0.1"),
    (["--experts", "4", "--z-loss", "nan"], "--z-loss must be a finite number >= 0, got nan"),
    (["--experts=-2"], "--experts must be >= 0, got -2"),
    (["--topk", "2"], "--topk need --experts E (a mixture-of-experts model)"),
    (["--ep", "2", "--tp", "1", "--capacity-factor", "1.0"], "--capacity-factor, --ep need --experts E"),
    (["--experts", "4", "--export-hf", "out"], "GPT-2 cannot hold this config: {'experts': 4}"),
])
def test_bad_input_is_one_line_and_exit_code_2(text_file, capsys, args, message):
    # a case wrongly accepted would train for one step on TINY and fail on its exit code
    base = ["--data", text_file, *TINY, "--steps", "1", "--eval-batches", "1", "--peak-flops", "1e9"]
    code = train.main(base + args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: " + message), err
    assert err.count("\n") == 1 and err.endswith("\n"), err


def test_a_diverging_run_stops_with_the_facts_not_a_guess(text_file, capsys):
    code = train.main(["--data", text_file, *TINY, "--steps", "50", "--lr", "1e9", "--peak-flops", "1e9"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert re.match(r"error: (loss|grad norm) is (nan|inf).* at step \d+: stopping \(lr at that step .*, last finite "
                    r"grad norm .*, gradient clipping on at --grad-clip 1.0\)", err), err


def test_diverged_message_states_step_lr_last_finite_norm_and_clipping():
    args = args_of("--lr", "0.01", "--warmup", "10", "--grad-clip", "0")
    assert train.diverged_message(5, math.nan, math.nan, (4, 2.5), args) == (
        "loss is nan at step 5: stopping (lr at that step 0.005, last finite grad norm 2.5 at step 4, "
        "gradient clipping off (--grad-clip 0))")
    args.grad_clip = 1.0
    assert train.diverged_message(1, 3.25, math.inf, None, args) == (
        "grad norm is inf (loss 3.25) at step 1: stopping (lr at that step 0.001, last finite grad norm none "
        "(not one step was finite), gradient clipping on at --grad-clip 1.0)")


def test_config_messages_name_the_flags():
    with pytest.raises(ValueError) as e:
        N.GPTConfig(hidden=32, heads=3)
    assert train.in_flags(str(e.value)) == "--hidden 32 is not divisible by --heads 3"
    with pytest.raises(ValueError) as e:
        N.GPTConfig(hidden_dropout=1.5)
    assert train.in_flags(str(e.value)).startswith("--dropout must be ")
    for config, flags in [
        ("max_seq must be >= 1, got 0", "--max-seq must be >= 1, got 0"),
        ("attention_dropout must be in [0, 1), got nan", "--dropout must be in [0, 1), got nan"),
        ("tp=2 does not divide kv_heads=3", "--tp 2 does not divide --kv-heads 3"),
        ("sequence parallel needs seq % tp == 0, got seq=33, tp=2",
         "sequence parallel needs seq % tp == 0, got --seq 33, --tp 2"),
        ("attention='sdpa' has no counter-based dropout: use attention='core' with attention_dropout=0.1",
         "--attention sdpa has no counter-based dropout: use --attention core with --dropout 0.1"),
        ("layers must be an integer, got 1.5 (float)", "--layers must be an integer, got 1.5 (float)"),
        ("norm_eps must be a finite number > 0, got nan", "norm_eps must be a finite number > 0, got nan"),  # no flag
        ("tp=4 does not divide ffn=6", "--tp 4 does not divide ffn=6"),
    ]:
        assert train.in_flags(config) == flags


# ---------------------------------------------------------------------------
# --data
# ---------------------------------------------------------------------------


def test_empty_binary_and_not_utf8_data_are_refused(tmp_path):
    for name, content, message in [("empty.txt", b"", "empty (0 bytes)"),
                                   ("blob.bin", b"\x7fELF\x00\x01\x02" * 50, "looks binary (a NUL byte at offset 4)"),
                                   ("latin1.txt", b"caf\xe9 au lait", "not UTF-8 text (invalid continuation byte")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(train.UsageError, match=re.escape(message)):
            train.load_corpus(str(tmp_path / name))


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   IsADirectoryError(errno.EISDIR, "Is a directory")])
def test_data_that_cannot_be_read_names_the_path_and_the_reason(tmp_path, monkeypatch, error):
    # chmod 000 does not stop root, so the read itself is made to fail
    path = tmp_path / "notes.txt"
    path.write_text("some text")

    def read_bytes(self):
        raise error

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for given in (path, tmp_path):  # the file itself, and the file in a folder
        with pytest.raises(train.UsageError) as e:
            train.load_corpus(str(given))
        assert str(e.value) == f"--data {path}: cannot read it ({error.strerror})"


def test_a_data_folder_that_cannot_be_listed_names_it(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "sub":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # what os.walk lists a folder with
    with pytest.raises(train.UsageError) as e:
        train.load_corpus(str(tmp_path))
    assert str(e.value) == f"--data {tmp_path}: cannot list {tmp_path / 'sub'} (Permission denied)"


def test_data_that_is_a_pipe_or_a_device_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    for path in (str(tmp_path / "fifo"), "/dev/null"):
        with pytest.raises(train.UsageError, match=f"--data {path}: not a regular file or folder"):
            train.load_corpus(path)
    with pytest.raises(train.UsageError, match="--data is an empty path"):  # Path("") would be the cwd
        train.load_corpus("")


def test_a_data_folder_skips_hidden_folders_and_files_at_any_depth(tmp_path):
    root = tmp_path / os.fsdecode(b"notes\xff")  # a folder name that is not UTF-8 still prints
    for name, content in [("a.txt", b"aaa"), ("sub/b.txt", b"bbb"), (".hidden.txt", b"hhh"),
                          (".git/objects/ab/cdef", b"x\0\x01binary"), ("sub/.cache/c.txt", b"ccc")]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    texts, source = train.load_corpus(str(root))
    assert texts == [b"aaa", b"bbb"]
    assert source.encode("utf-8") and "2 file(s) from" in source
    only_hidden = tmp_path / "repo"
    (only_hidden / ".git").mkdir(parents=True)
    (only_hidden / ".git" / "HEAD").write_text("ref: refs/heads/main")
    with pytest.raises(train.UsageError, match="the folder holds no files"):
        train.load_corpus(str(only_hidden))


# ---------------------------------------------------------------------------
# The schedule, the optimizer's groups, clipping, the per-rank data split
# ---------------------------------------------------------------------------


def test_lr_schedule_warms_up_linearly_to_lr_then_decays_to_min_lr():
    args = args_of("--lr", "3e-3", "--min-lr", "1e-4", "--warmup", "3", "--steps", "13")
    assert train.lr_at(1, args) == pytest.approx(1e-3, rel=1e-12)  # 1/3 of the way, not 0 nor 2/3
    assert train.lr_at(2, args) == pytest.approx(2e-3, rel=1e-12)
    assert train.lr_at(3, args) == 3e-3  # the peak at step --warmup, exactly --lr
    just_after = 1e-4 + 0.5 * (3e-3 - 1e-4) * (1 + math.cos(math.pi * 1 / 10))
    assert train.lr_at(4, args) == pytest.approx(just_after, rel=1e-12)
    assert train.lr_at(13, args) == 1e-4  # exactly --min-lr at --steps
    after = [train.lr_at(s, args) for s in range(3, 14)]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly down after the warmup
    args.min_lr = None
    assert train.lr_at(13, args) == pytest.approx(3e-4, rel=1e-12)  # default --min-lr: --lr / 10
    args.warmup = 0
    assert train.lr_at(1, args) == pytest.approx(3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi / 13)), rel=1e-12)
    assert train.lr_at(1, args) < 3e-3


def test_weight_decay_on_matrices_only_never_on_biases_or_norms():
    _, params = tiny_model()
    opt = train.make_optimizer(params, args_of("--weight-decay", "0.25"))
    decay_of = {id(p): group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    assert len(decay_of) == len(params)  # every parameter in exactly one group
    decay = {name for name, p in params.items() if decay_of[id(p)] == 0.25}
    no_decay = {name for name, p in params.items() if decay_of[id(p)] == 0.0}
    assert decay == {"embed.word", "embed.pos", "layers.0.attn.qkv.weight", "layers.0.attn.proj.weight",
                     "layers.0.mlp.fc1.weight", "layers.0.mlp.fc2.weight"}
    assert no_decay == {"layers.0.ln1.weight", "layers.0.ln1.bias", "layers.0.ln2.weight", "layers.0.ln2.bias",
                        "final_norm.weight", "final_norm.bias", "layers.0.attn.qkv.bias",
                        "layers.0.attn.proj.bias", "layers.0.mlp.fc1.bias", "layers.0.mlp.fc2.bias"}


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_train_step_applies_grad_clip(clip):
    """With plain SGD the applied update is -lr * grad: the grads scaled to norm
    --grad-clip when it is below their norm, and untouched with --grad-clip 0."""
    cfg, params = tiny_model(torch.float64)
    args = args_of("--lr", "0.5", "--warmup", "0", "--steps", "10", "--grad-clip", str(clip))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    before = {k: v.detach().clone() for k, v in params.items()}
    grads = torch.autograd.grad(N.gpt_loss(params, x, y, cfg, P.Mesh.serial()), list(params.values()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    scale = clip / norm if clip else 1.0
    assert clip == 0 or scale < 0.01  # clipping must matter for the test to mean anything

    opt = train.Optimizer(params, args, specs=N.gpt_specs(cfg), inner=torch.optim.SGD(list(params.values()), lr=1.0))
    _, grad_norm = train.train_step(params, opt, dict(ids=x, targets=y), train.GPTTask, cfg, P.Mesh.serial(),
                                    N.gpt_specs(cfg), args, step=1)
    assert grad_norm.item() == pytest.approx(norm.item(), rel=1e-9)  # the norm before clipping
    lr = train.lr_at(1, args)
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(p.detach(), before[name] - lr * scale * g, rtol=1e-6, atol=1e-12, msg=name)


def test_compile_trains_to_the_eager_losses(monkeypatch):
    """--compile (torch.compile of the stage forward, and so its backward): three float32 AdamW steps of
    the one-layer GPT give the eager run's losses to 1e-6, and the step really ran compiled. The probe
    (check_compile) and the step use the aot_eager backend: the same dynamo graphs and AOTAutograd backward
    without inductor's C++ build, which takes minutes on CI's CPUs."""
    monkeypatch.setattr(train, "COMPILE_BACKEND", "aot_eager")
    try:
        train.check_compile(CPU)
    except train.UsageError as e:
        pytest.skip(str(e))
    train.compiled_stage_forward.cache_clear()
    ids = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = dict(ids=ids[:, :-1], targets=ids[:, 1:])
    losses = {}
    for flags in ((), ("--compile",)):
        cfg, params = tiny_model()
        args = args_of("--lr", "1e-2", "--warmup", "0", "--steps", "3", *flags)
        opt = train.make_optimizer(params, args, specs=N.gpt_specs(cfg), cfg=cfg)
        losses[flags] = [train.train_step(params, opt, batch, train.GPTTask, cfg, P.Mesh.serial(), N.gpt_specs(cfg),
                                          args, step)[0]["loss"].item() for step in (1, 2, 3)]
    assert train.compiled_stage_forward.cache_info().currsize == 1  # the compiled twin was made and used
    train.compiled_stage_forward.cache_clear()  # not to leave an aot_eager twin to later tests
    assert losses[()][2] < losses[()][0]  # it learns: the comparison is between steps that move
    assert losses[("--compile",)] == pytest.approx(losses[()], abs=1e-6, rel=0)


def test_compile_is_refused_for_a_model_that_does_not_pipeline_or_where_torch_compile_cannot_run(monkeypatch):
    with pytest.raises(train.UsageError, match="--compile compiles a pipeline stage's forward"):
        train.check_pipeline_args(args_of("--model", "t5", "--compile"))

    def no_compiler(fn, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")
    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.raises(train.UsageError, match=r"^--compile: torch.compile cannot run on cpu here \(RuntimeError: "
                                               r"InvalidCxxCompiler: No working C\+\+ compiler found\); run without"):
        train.check_compile(CPU)


def test_batch_seed_one_stream_per_data_parallel_replica_shared_by_its_tensor_parallel_ranks():
    args = args_of("--seed", "1234")
    data = torch.arange(10_000, dtype=torch.int64) % 251
    seeds = {(step, dp, tp): train.batch_seed(args, step, P.Mesh(tp=2, dp=3, tp_rank=tp, dp_rank=dp))
             for step in (1, 2) for dp in range(3) for tp in range(2)}
    batches = {key: train.batch(data, 4, 16, seed)[0] for key, seed in seeds.items()}
    for step in (1, 2):
        for dp in range(3):
            assert seeds[step, dp, 0] == seeds[step, dp, 1]  # the tp ranks of one replica: the same tokens
            assert torch.equal(batches[step, dp, 0], batches[step, dp, 1])
    distinct = {seeds[step, dp, 0] for step in (1, 2) for dp in range(3)}
    assert len(distinct) == 6  # every replica at every step its own batch
    for a, b in [((1, 0, 0), (1, 1, 0)), ((1, 1, 0), (1, 2, 0)), ((1, 0, 0), (2, 0, 0))]:
        assert not torch.equal(batches[a], batches[b]), (a, b)


def test_every_derived_seed_fits_torch_generator_for_any_step():
    args = args_of("--seed", str(2**31 - 1))  # the largest --seed
    for step in (1, 10**6, 10**30):
        seed = train.batch_seed(args, step, P.Mesh(tp=1, dp=8, dp_rank=7))
        assert 0 <= seed < 2**63
        torch.Generator().manual_seed(seed)
    train.check_args(args, world=1)
    for seed in (-1, 2**31, 2**63):
        with pytest.raises(train.UsageError, match=r"--seed must be in \[0, 2\*\*31\)"):
            train.check_args(args_of("--seed", str(seed)), world=1)


# ---------------------------------------------------------------------------
# Memory, the sample
# ---------------------------------------------------------------------------


def test_memory_estimate_from_the_config_and_the_refusal_names_the_figures(monkeypatch):
    args = args_of()  # the default run: 4 layers, hidden 128, heads 4, seq 128, batch 16, fp32
    cfg, tp = train.check_args(args, world=1)
    params, activations = train.memory_needed(cfg, args, tp, CPU)
    n = N.num_params(cfg)
    assert n == sum(p.numel() for p in N.init_gpt(cfg).values())
    assert params == 16 * n + 4 * n  # weights, grads, 2 AdamW moments + init's full copy (on CPU)
    b, s, h, a = 16, 128, 128, 4
    assert activations == b * s * h * (34 + 5 * a * s / h) * 4 * 2 + 3 * b * s * 256 * 4
    train.check_memory(cfg, args, tp, CPU)  # the default run fits this machine

    monkeypatch.setattr(train, "memory_available", lambda device: 2**27)  # 0.125 GiB free
    with pytest.raises(train.UsageError) as e:
        train.check_memory(cfg, args, tp, CPU)
    figures = re.fullmatch(r"the model and one step need about (\S+) GiB \(parameters (\S+) GiB, activations (\S+) "
                           r"GiB\) but this machine has 0.12 GiB free: lower --hidden/--layers/--batch/--seq",
                           str(e.value))
    assert figures, str(e.value)
    total, in_params, in_activations = (float(v) for v in figures.groups())
    assert (in_params, in_activations) == (round(params / 2**30, 3), round(activations / 2**30, 2))
    assert total == pytest.approx(in_params + in_activations, abs=0.01)


def test_sample_takes_the_prompts_bytes_and_says_when_seq_caps_it():
    cfg, params = tiny_model()
    not_utf8 = os.fsdecode(b"\xff\xfedef")  # what argv gives for these bytes (surrogateescape)
    args = args_of("--seq", "16", "--sample-tokens", "100", "--prompt", not_utf8)
    text = train.sample(params, cfg, P.Mesh.serial(), args, CPU)
    assert text.startswith("sample (11 of --sample-tokens 100 bytes: --prompt + sample must fit in --seq 16):\n"
                           "\ufffd\ufffddef"), text
    args.sample_tokens = 3
    assert train.sample(params, cfg, P.Mesh.serial(), args, CPU).startswith("sample:\n\ufffd\ufffddef")
    args.sample_tokens = None  # the default: all that fits, nothing to say
    text = train.sample(params, cfg, P.Mesh.serial(), args, CPU)
    assert text.startswith("sample:\n\ufffd\ufffddef")
    args.prompt, args.sample_tokens = "x" * 16, 0  # a long prompt is fine when nothing is sampled
    train.check_args(args, world=1)


# ---------------------------------------------------------------------------
# --model bert: the data, the run, its own bad input
# ---------------------------------------------------------------------------

BERT_TINY = TINY[:-2]  # no --sample-tokens: that flag is GPT's


def test_bert_batch_is_bert_pretraining_data():
    """[CLS] A [SEP] B [SEP] [PAD]..., token types 0 then 1, B after A or random (50/50), 15% of the
    bytes chosen with 80/10/10 [MASK]/random/kept, some pairs short (padding), and the same batch for
    the same seed. data[i] = i % 251, so "B follows A" is checkable from the bytes themselves."""
    data = (torch.arange(50_000) % 251).to(torch.uint8)
    b, seq = 400, 32
    out = train.bert_batch(data, b, seq, seed=7)
    assert all(torch.equal(out[k], v) for k, v in train.bert_batch(data, b, seq, seed=7).items())
    ids, targets, types, real = out["ids"], out["mlm_targets"], out["token_types"], out["attention_mask"].bool()
    assert {k: tuple(v.shape) for k, v in out.items()} == {**dict.fromkeys(
        ["ids", "token_types", "attention_mask", "mlm_targets", "mlm_mask"], (b, seq)), "nsp_labels": (b,)}
    assert torch.equal(real, targets != train.PAD) and (targets[:, 0] == train.CLS).all()
    short = 0
    for i in range(b):
        n = int(real[i].sum())
        short += n < seq
        seps = (targets[i, :n] == train.SEP).nonzero().flatten().tolist()
        assert len(seps) == 2 and seps[1] == n - 1, targets[i]
        assert not real[i, n:].any() and (types[i, n:] == 0).all()
        assert (types[i, : seps[0] + 1] == 0).all() and (types[i, seps[0] + 1: n] == 1).all()
        a_last, b_first = int(targets[i, seps[0] - 1]), int(targets[i, seps[0] + 1])
        if out["nsp_labels"][i] == 0:
            assert b_first == (a_last + 1) % 251, (i, targets[i])  # B continues A in the corpus
    assert 0.4 < out["nsp_labels"].float().mean() < 0.6 and 0.04 < short / b < 0.2
    chosen = out["mlm_mask"].bool()
    text = real & (targets < train.CLS)
    assert not (chosen & ~text).any() and chosen.any(-1).all()
    assert torch.equal(ids[~chosen], targets[~chosen])  # what was not chosen is untouched
    assert 0.13 < chosen.sum() / text.sum() < 0.17
    masked, kept = (ids[chosen] == train.MASK).float().mean(), (ids[chosen] == targets[chosen]).float().mean()
    assert 0.76 < masked < 0.84 and 0.07 < kept < 0.14 and (ids[chosen] <= train.MASK).all()


def test_torchrun_bert_tp2_sequence_parallel_learns_and_fills_in(text_file):
    out = run("--model", "bert", "--data", text_file, "--steps", "30", "--log-every", "15", "--eval-every", "30",
              "--lr", "1e-2", "--sequence-parallel", *BERT_TINY, torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model: BERT 1 layers" in out.stdout and "post-norm" in out.stdout and "sequence parallel" in out.stdout
    assert re.search(r"step +30 \| loss [0-9.]+ \| mlm [0-9.]+ \| nsp [0-9.]+ \| lr ", out.stdout), out.stdout
    mlm = [float(v) for v in re.findall(r"eval loss at step \d+: [0-9.]+ \(mlm ([0-9.]+), nsp [0-9.]+, nsp acc",
                                        out.stdout)]
    assert len(mlm) == 2 and mlm[1] < mlm[0] - 1.0, out.stdout  # a repetitive text is learned fast
    assert "fill-in (" in out.stdout and "--- the model's guesses:" in out.stdout


# ---------------------------------------------------------------------------
# --model t5: span corruption, the run, its own bad input
# ---------------------------------------------------------------------------


def test_t5_batch_is_span_corruption():
    """Putting each hidden span back in place of its sentinel gives back a contiguous window of the corpus;
    about 15% of the bytes are hidden, in spans of mean length about 3; the decoder reads the targets shifted
    right after the start token; padding and the loss mask agree; some windows are short; seeds repeat.
    data[i] = i % 251, so "contiguous" is checkable from the bytes themselves."""
    data = (torch.arange(50_000) % 251).to(torch.uint8)
    b, seq = 300, 40
    dec_seq = train.t5_dec_seq(seq, 1)
    out = train.t5_batch(data, b, seq, dec_seq, seed=3)
    assert all(torch.equal(out[k], v) for k, v in train.t5_batch(data, b, seq, dec_seq, seed=3).items())
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        **dict.fromkeys(["enc_ids", "enc_padding"], (b, seq)),
        **dict.fromkeys(["dec_ids", "dec_padding", "targets", "loss_mask"], (b, dec_seq))}
    hidden = total = spans = short = 0
    for i in range(b):
        enc = out["enc_ids"][i][out["enc_padding"][i].bool()].tolist()
        real = out["loss_mask"][i].bool()
        tgt = out["targets"][i][real].tolist()
        assert torch.equal(out["dec_padding"][i].bool(), real) and real[: len(tgt)].all()
        assert out["dec_ids"][i, 0] == train.T5_PAD and out["dec_ids"][i, 1: len(tgt)].tolist() == tgt[:-1]
        assert enc[-1] == train.EOS and tgt[-1] == train.EOS and train.T5_PAD not in enc
        sentinels = [t for t in enc if t >= train.SENTINEL]
        assert sentinels == list(range(train.SENTINEL, train.SENTINEL + len(sentinels)))
        assert [t for t in tgt if t >= train.SENTINEL] == sentinels
        pieces = []  # the target cut at its sentinels: span k follows sentinel k
        for t in tgt[:-1]:
            if t >= train.SENTINEL:
                pieces.append([])
            else:
                pieces[-1].append(t)
        restored = []
        for t in enc[:-1]:
            restored += pieces[t - train.SENTINEL] if t >= train.SENTINEL else [t]
        assert all(p for p in pieces) and all((y - x) % 251 == 1 for x, y in zip(restored, restored[1:])), i
        hidden, total, spans = hidden + sum(map(len, pieces)), total + len(restored), spans + len(pieces)
        short += len(restored) < seq - 1
    assert 0.13 < hidden / total < 0.17 and 2.5 < hidden / spans < 3.5 and 0.04 < short / b < 0.2


def test_torchrun_t5_tp2_sequence_parallel_learns_and_fills_spans(text_file):
    out = run("--model", "t5", "--data", text_file, "--steps", "30", "--log-every", "15", "--eval-every", "30",
              "--lr", "1e-2", "--sequence-parallel", *BERT_TINY, torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model: T5 1+1 (encoder+decoder) layers" in out.stdout and "sequence parallel" in out.stdout
    losses = [float(v) for v in re.findall(r"eval loss at step \d+: ([0-9.]+)", out.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0] - 1.0, out.stdout  # a repetitive text is learned fast
    fill = re.search(r"span fill-in .*?gets (\d+)% of the (\d+) target ids in place\):\ninput: (.*)\ntruth: (.*)\n"
                     r"model: (.*)", out.stdout, re.S)
    assert fill and "<0>" in fill[3] and fill[4].startswith("<0>"), out.stdout


# ---------------------------------------------------------------------------
# --model biencoder / realm: ICT blocks, masked queries, the runs, their bad input
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lines_file(tmp_path_factory):
    """Numbered lines of varied words: blocks of several lines, each line its own."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    path = tmp_path_factory.mktemp("lines") / "lines.txt"
    path.write_text("".join(f"    {i:04d} {words[i % 12]} {words[(i * 7) % 12]} {words[(i * 5) % 12]}\n"
                            for i in range(3000)))
    return str(path)


def test_ict_batch_is_a_line_and_its_block():
    """The query is one line of the block (without its indentation); the block keeps it about 10% of the
    time; both are [CLS] ... [SEP] padded; the same seed gives the same batch."""
    text = b"".join(b"  line %04d of the corpus\n" % i for i in range(2000))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    starts = train.line_starts(data)
    b, seq = 300, 96
    out = train.ict_batch(data, starts, b, seq, seed=5)
    assert all(torch.equal(out[k], v) for k, v in train.ict_batch(data, starts, b, seq, seed=5).items())
    assert out["query_ids"].shape == (b, train.query_len(seq)) and out["context_ids"].shape == (b, seq)
    kept = 0
    for i in range(b):
        q = bytes(t for t in out["query_ids"][i].tolist() if t < 256)
        c = bytes(t for t in out["context_ids"][i].tolist() if t < 256)
        assert out["query_ids"][i, 0] == train.CLS and out["context_ids"][i, 0] == train.CLS
        assert torch.equal(out["query_mask"][i].bool(), out["query_ids"][i] != train.PAD)
        assert q.startswith(b"line ") and not q.startswith(b" "), q
        n = int(q.split()[1])
        numbers = [int(x) for x in re.findall(rb"line (\d{4})", c)]
        whole = sorted(set(numbers) | {n})  # the block's lines, the query's own put back: consecutive
        assert whole == list(range(whole[0], whole[0] + len(whole))) and len(whole) > 1, (q, c)
        kept += n in numbers
    assert 0.04 < kept / b < 0.2, kept / b


def test_realm_queries_mask_a_line_of_their_gold_block():
    gen = torch.Generator().manual_seed(0)
    data = torch.frombuffer(bytearray(b"".join(b"row %04d abcdefgh\n" % i for i in range(500))), dtype=torch.uint8)
    corpus = [train.draw_block(data, train.line_starts(data), 64, gen) for _ in range(50)]
    out = train.realm_queries(corpus, 40, 64, seed=3)
    for i in range(40):
        chosen = out["target_mask"][i].bool()
        assert chosen.any() and (out["query_ids"][i][chosen] == train.MASK).all()
        assert torch.equal(out["query_ids"][i][~chosen], out["targets"][i][~chosen])
        line = bytes(t for t in out["targets"][i].tolist() if t < 256)
        assert line in b"".join(bytes(x) for x in corpus[out["gold"][i]]), line


def test_torchrun_biencoder_tp2_sequence_parallel_retrieves(lines_file):
    out = run("--model", "biencoder", "--data", lines_file, "--steps", "20", "--log-every", "10", "--eval-every", "20",
              "--sequence-parallel", *BERT_TINY, torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model: bi-encoder 1+1 (query+context) layers" in out.stdout and "sequence parallel" in out.stdout
    accs = re.findall(r"eval loss at step \d+: [0-9.]+ \(top1 acc [0-9.]+%, top5 acc [0-9.]+%, acc@1 ([0-9.]+)%, "
                      r"acc@5 [0-9.]+%, acc@20 ([0-9.]+)%\)", out.stdout)
    assert len(accs) == 2, out.stdout
    assert re.search(r"retrieval of a held-out query from the index of 256 held-out blocks:\nquery: .+\n"
                     r"[ *]1\. .*\n[ *]2\. .*\n[ *]3\. ", out.stdout), out.stdout


def test_torchrun_realm_dp2_trains_end_to_end(lines_file):
    out = run("--model", "realm", "--data", lines_file, "--steps", "6", "--log-every", "3", "--eval-every", "6",
              "--index-every", "3", "--top-k", "2", "--towers", "shared", "--layers", "1", "--hidden", "32",
              "--heads", "2", "--seq", "32", "--batch", "2", "--eval-batches", "1", "--tp", "1", torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model: REALM 1+1 (retriever+reader) layers" in out.stdout and "dp=2" in out.stdout, out.stdout
    losses = [float(v) for v in re.findall(r"eval loss at step \d+: ([0-9.]+) \(retrieval acc", out.stdout)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), out.stdout
    assert re.search(r"retrieve-and-read of a held-out masked line .*\nquery: .*\nfill:  .*\n[ *]1\. .*\n"
                     r"[ *]2\. .*\n[ *]3\. ", out.stdout), out.stdout


@pytest.mark.parametrize("model,args,message", [
    ("bert", ["--prompt", "x"], "--prompt is for --model gpt"),
    ("bert", ["--sample-tokens", "0"], "--sample-tokens is for --model gpt"),
    ("bert", ["--activation", "swiglu"], "--activation swiglu: BERT's MLP and LM head use GeLU"),
    ("bert", ["--seq", "4"], "--seq 4 is too short for BERT"),
    ("bert", ["--model", "t9"], "argument --model: invalid choice: 't9'"),
    ("t5", ["--seq", "6"], "--seq 6 is too short for T5's span corruption"),
    ("t5", ["--prompt", "x"], "--prompt is for --model gpt"),
    ("t5", ["--position", "relative", "--heads", "3", "--hidden", "33", "--tp", "1", "--max-seq", "5"],
     "--seq 32 is longer than --max-seq 5"),
    ("biencoder", ["--top-k", "3"], "--top-k is for --model realm"),
    ("gpt", ["--towers", "shared"], "--towers is for --model biencoder / realm"),
    ("realm", ["--top-k", "600"], "--top-k 600 is larger than the corpus index (512 blocks)"),
    ("realm", ["--index-every", "0"], "--index-every must be >= 1, got 0"),
    ("biencoder", ["--seq", "12"], "--seq 12 is too short for a block of lines"),
    ("biencoder", ["--prompt", "x"], "--prompt is for --model gpt"),
    ("t5", ["--pp", "2"], "--pp 2: --model t5 does not pipeline (pipeline stages exist for gpt / bert)"),
    ("biencoder", ["--data", "ONE_LINE"], "--data: the training split has no newline, so no lines"),
    ("realm", ["--microbatches", "2"], "--microbatches 2: --model realm does not pipeline"),
])
def test_model_bad_input_is_one_line_and_exit_code_2(text_file, capsys, model, args, message):
    """Each model's own flags and limits, refused with one line and exit code 2."""
    if "ONE_LINE" in args:  # the text file is one long line: the retrievers have no lines to draw
        args = [text_file if a == "ONE_LINE" else a for a in args]
    base = ["--model", model, "--data", text_file, *BERT_TINY, "--steps", "1", "--eval-batches", "1",
            "--peak-flops", "1e9"]
    code = train.main(base + args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: " + message), err
    assert err.count("\n") == 1 and err.endswith("\n"), err


# ---------------------------------------------------------------------------
# --show-layout: each rank's shards (parallel.shard_layout) and one counted step
# ---------------------------------------------------------------------------

LAYOUT_MODELS = {  # heads 4: tp = 4 gives MHA one kv head per rank, MQA its kv head on all four
    "gpt-mha": (N.GPTConfig, N.init_gpt, N.gpt_shapes, N.gpt_specs, dict(kv_heads=4)),
    "gpt-mqa": (N.GPTConfig, N.init_gpt, N.gpt_shapes, N.gpt_specs, dict(kv_heads=1)),
    "bert": (N.BertConfig, N.init_bert, N.bert_shapes, N.bert_specs, {}),
    "t5": (N.T5Config, N.init_t5, N.t5_shapes, N.t5_specs, {}),
    "t5-google": (N.google_t5_config, N.init_t5, N.t5_shapes, N.t5_specs, dict(kv_channels=6)),
}


def slice_of(full: torch.Tensor, desc: str, spec) -> torch.Tensor:
    """The part of full that a shard_layout slice_desc names, cut out of full independently of P.shard."""
    if desc in ("whole", "replicated"):
        return full
    if m := re.fullmatch(r"(rows|columns|elements) (\d+):(\d+) of \[[\d, ]+\]", desc):
        return full.narrow(1 if m[1] == "columns" else 0, int(m[2]), int(m[3]) - int(m[2]))
    m = re.fullmatch(r"q heads? (\d+)(?:-(\d+))?(?:, kv heads? (\d+)(?:-(\d+))?: (?:rows|elements) \d+:\d+"
                     r"| \+ kv head (\d+) \(replicated on tp ranks \d+-\d+\)) of \[[\d, ]+\]", desc)
    assert m, desc
    q = range(int(m[1]), int(m[2] or m[1]) + 1)
    kv = range(int(m[3]), int(m[4] or m[3]) + 1) if m[3] else [int(m[5])]
    heads = full.unflatten(0, (spec.groups, spec.q_per_group + 2, spec.head_dim))  # [g, q heads + k + v, d, ...]
    rows = [heads[g, [i % spec.q_per_group for i in q if i // spec.q_per_group == g] + [-2, -1]] for g in kv]
    return torch.cat(rows).flatten(0, 1)  # per kv head: its q heads here, then its k and v


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("model", LAYOUT_MODELS)
def test_shard_layout_is_what_shard_cuts(model, tp):
    """For every rank: the local shape is P.shard's, and the slice the words name is P.shard's tensor."""
    config, init, shapes_of, specs_of, extra = LAYOUT_MODELS[model]
    cfg = config(vocab_size=260, max_seq=16, layers=2, hidden=32, heads=4, vocab_multiple=128, **extra)
    full, specs = init(cfg), specs_of(cfg)
    shapes = {name: shape for name, (shape, _) in shapes_of(cfg).items()}
    kv_ranks = {}
    for rank in range(tp):
        mesh = P.Mesh(tp=tp, tp_rank=rank)
        layout, shards = P.shard_layout(shapes, specs, mesh), P.shard(full, specs, mesh)
        assert [row["name"] for row in layout] == list(shapes)
        for row in layout:
            name, desc = row["name"], row["slice_desc"]
            assert row["full_shape"] == tuple(full[name].shape), name
            assert row["local_shape"] == tuple(shards[name].shape), (name, desc)
            assert torch.equal(slice_of(full[name], desc, specs[name]), shards[name]), (name, desc)
            assert (desc == "whole") == (tp == 1) and (desc == "replicated") == (tp > 1 and specs[name] is None)
            if m := re.search(r"kv head (\d+) \(replicated on tp ranks (\d+)-(\d+)\)", desc):
                kv_ranks.setdefault(int(m[1]), set()).add(rank)
                assert rank in range(int(m[2]), int(m[3]) + 1), desc
    if model == "gpt-mqa" and tp > 1:
        assert kv_ranks == {0: set(range(tp))}  # one kv head, on every tp rank


def test_shard_layout_says_which_slice_in_words():
    cfg = N.GPTConfig(vocab_size=256, max_seq=16, layers=1, hidden=32, heads=4, kv_heads=1)
    shapes = {name: shape for name, (shape, _) in N.gpt_shapes(cfg).items()}
    words = {row["name"]: (row["local_shape"], row["slice_desc"])
             for row in P.shard_layout(shapes, N.gpt_specs(cfg), P.Mesh(tp=2, tp_rank=1))}
    assert words["embed.word"] == ((128, 32), "rows 128:256 of [256, 32]")
    assert words["layers.0.ln1.weight"] == ((32,), "replicated")
    assert words["layers.0.attn.proj.weight"] == ((32, 16), "columns 16:32 of [32, 32]")
    assert words["layers.0.attn.qkv.weight"] == ((32, 32), "q heads 2-3 + kv head 0 (replicated on tp ranks 0-1) "
                                                           "of [48, 32]")
    with pytest.raises(ValueError, match="tp=8 cannot split 1 kv heads"):  # shard's own refusal
        P.shard_layout(shapes, N.gpt_specs(cfg), P.Mesh(tp=8))


def layout_and_counted_step(mesh, argv, data_path):
    """On every rank: train.rank_layout's picture; the same step (parameters, batch) run by train_step
    under count_comms; and whether rank_layout left the parameters as they were."""
    args = train.parse_args(argv)
    cfg, _ = train.check_args(args, world=mesh.tp * mesh.cp * mesh.dp)
    task = train.TASKS[args.model]
    specs = task.specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in P.shard(task.init(cfg, args.seed), specs, mesh).items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    data, _ = train.split_corpus(train.load_corpus(data_path)[0], args.seq)
    inputs = task.batch(data, args, train.batch_seed(args, 1, mesh))
    picture = train.rank_layout(params, inputs, task, cfg, mesh, specs, args)
    untouched = all(torch.equal(p, before[k]) and p.grad is None for k, p in params.items())
    with P.count_comms() as counted:
        opt = train.make_optimizer(params, args, mesh, specs, cfg)
        train.train_step(params, opt, inputs, task, cfg, mesh, specs, args, step=1)
    return picture, counted, untouched


def rank_blocks(stdout: str) -> dict[int, str]:
    """--show-layout's output cut into each rank's block."""
    return {int(m[1]): m[2] for m in re.finditer(r"^rank (\d+): (.*?)(?=^rank \d+:|\Z)", stdout, re.M | re.S)}


def printed_comms(block: str) -> dict[str, int]:
    """{'tp forward': elements, ...} summed from a rank's collective lines, e.g.
    '    tp forward   5 x all_reduce  262,144 el fp32  =  1,310,720 el  5,242,880 B'
    (a line without a label continues the one above); each line's product is checked."""
    elements, label = {}, None
    for row in re.finditer(r"^    (\w+ (?:after )?\w+)? +(\d+) x \w+ +([\d,]+) el \w+ += +([\d,]+) el +[\d,]+ B$",
                           block, re.M):
        label = row[1] or label
        count, each, product = int(row[2]), int(row[3].replace(",", "")), int(row[4].replace(",", ""))
        assert product == count * each, row[0]
        elements[label] = elements.get(label, 0) + product
    return elements


def test_show_layout_under_torchrun_prints_what_shard_holds_and_what_the_step_moves(text_file, pool):
    argv = [*TINY, "--layers", "3", "--kv-heads", "1", "--data", text_file]
    out = run(*argv, "--show-layout", torchrun=2)  # tp = 2: the MQA kv head on both ranks
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval loss" not in out.stdout and not re.search(r"^step ", out.stdout, re.M)  # no training
    blocks = rank_blocks(out.stdout)
    assert sorted(blocks) == [0, 1], out.stdout

    # the same step in the pool at tp = 2 (dp = 2 there: the same tp collectives, and dp's)
    results = pool.run(layout_and_counted_step, [*argv, "--tp", "2"], text_file, tp=2)
    cfg, _ = train.check_args(args_of(*argv), world=2)
    full = N.init_gpt(cfg)
    for rank, block in blocks.items():
        picture, counted, untouched = results[rank]  # pool rank r: tp rank r, dp rank 0
        assert untouched
        assert block.startswith(f"tp rank {rank} of 2, dp rank 0 of 1, pp rank 0 of 1; host {socket.gethostname()}, "
                                f"local rank {rank}\n"), block

        shards = P.shard(full, N.gpt_specs(cfg), P.Mesh(tp=2, tp_rank=rank))
        rows = dict(re.findall(r"^    (\S+) +(\[[\d, ]*\]) ", block, re.M))
        assert "layers.1-2: the same 12 shards as layers.0 (3 layers, 36 layer tensors in all)" in block
        assert set(rows) == {k for k in shards if not k.startswith(("layers.1.", "layers.2."))}
        assert rows == {k: str(list(shards[k].shape)) for k in rows}
        n = sum(p.numel() for p in shards.values())
        assert f"memory: weights {4 * n:,} B (fp32) + grads {4 * n:,} B + AdamW state {8 * n:,} B" in block
        assert picture["bytes"] == dict(weights=4 * n, grads=4 * n, moments=8 * n, dtypes=["fp32"])

        # the picture is the counted step: the same collectives in the same order; dp's gradients in one
        # 25 MB bucket, all-reduced during the backward as soon as the last gradient is in (padded to dp = 2)
        assert [(c["op"], c["dim"], c["elements"]) for c in picture["comms"]] == \
            [(c["op"], c["dim"], c["elements"]) for c in counted]
        assert [(c["op"], c["phase"], c["elements"]) for c in counted if c["dim"] == "dp"] == \
            [("all_reduce", "backward", n + n % 2)]

        # what torchrun printed (dp = 1) is the tp part of it, per phase and in total
        tp_part = [c for c in picture["comms"] if c["dim"] == "tp"]
        want = {}
        for c in tp_part:
            want[f"tp {c['phase']}"] = want.get(f"tp {c['phase']}", 0) + c["elements"]
        assert printed_comms(block) == want and set(want) == {"tp forward", "tp backward", "tp after backward"}
        total = re.search(rf"^    total +{len(tp_part)} collectives += +([\d,]+) el", block, re.M)
        assert total and int(total[1].replace(",", "")) == sum(c["elements"] for c in counted if c["dim"] == "tp")


def cp_layout_task(_pool_mesh, argv, data_path):
    """rank_layout's picture on a (tp 1, cp 2, dp 2) mesh: (its rank, its mesh coordinates, torch's rank)."""
    picture = layout_and_counted_step(P.Mesh.build(cp=2), argv, data_path)[0]
    return picture["rank"], picture["mesh"], torch.distributed.get_rank()


def test_show_layout_under_cp_names_each_rank_once(text_file, pool):
    """Under cp the picture's rank is the mesh's global rank (tp, cp, dp, pp), not one recomputed without cp:
    four ranks, four names, each torch's own."""
    got = pool.run(cp_layout_task, [*TINY, "--cp", "2", "--data", text_file], text_file)
    assert [rank for rank, _, _ in got] == [torch_rank for _, _, torch_rank in got] == [0, 1, 2, 3]
    assert [(m["cp"], m["dp"]) for _, m, _ in got] == [((r % 2, 2), (r // 2, 2)) for r in range(4)]


def test_show_layout_in_one_process_bert_exits_0_without_training(text_file, capsys):
    argv = ["--model", "bert", "--data", text_file, *BERT_TINY, "--show-layout"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "eval loss" not in out and "fill-in" not in out
    cfg, _ = train.check_args(args_of(*argv), world=1)
    n = N.num_params(cfg, N.bert_shapes)
    assert re.search(rf"^rank 0: tp rank 0 of 1, dp rank 0 of 1, pp rank 0 of 1; host .+, local rank 0\n  parameters: \d+ tensors, {n:,} of "
                     rf"their full tensors' {n:,} elements$", out, re.M), out
    assert re.search(rf"^    lm_head.bias +\[{cfg.padded_vocab}\] +whole$", out, re.M), out
    assert f"memory: weights {4 * n:,} B (fp32) + grads {4 * n:,} B + AdamW state {8 * n:,} B" in out
    assert "collectives in one training step: none (no mesh dim of more than one rank)" in out


# ---------------------------------------------------------------------------
# Hugging Face's format out (--export-hf) and in (--init-hf, --tokenizer)
# ---------------------------------------------------------------------------

HF_TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--eval-batches", "1",
           "--peak-flops", "1e9", "--log-every", "3", "--eval-every", "3"]


def checkpoint_params(model, argv, path):
    """The full parameters a one-process run of argv would hold after loading the checkpoint at path."""
    args = train.parse_args(["--model", model, *argv])
    cfg, _ = train.check_args(args, world=1)
    task, mesh = train.TASKS[model], P.Mesh.serial()
    specs = task.specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in train.rank_params(task, cfg, mesh, specs, args).items()}
    opt = train.make_optimizer(params, args, mesh, specs, cfg)
    found = train.find_checkpoint(path)
    train.load_checkpoint(found, train.read_meta(found, cfg, args), params, opt, cfg, mesh, specs)
    return cfg, {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize("model,extra", [("gpt", ["--sample-tokens", "0"]), ("bert", ["--position", "learned"]),
                                         ("biencoder", ["--position", "learned"])])
def test_export_hf_is_what_transformers_loads_with_the_same_logits(text_file, lines_file, tmp_path, model, extra):
    """Train under torchrun (tp 2), save and export; transformers' from_pretrained of the export gives the
    logits nanomeg computes from the checkpoint (GPT2LMHeadModel; BertForPreTraining: MLM and NSP; the
    bi-encoder's two towers as DPRQuestionEncoder and DPRContextEncoder: the embeddings)."""
    transformers = pytest.importorskip("transformers")
    out, ck = tmp_path / "hf", tmp_path / "ck"
    argv = [*HF_TINY, *extra, "--data", lines_file if model == "biencoder" else text_file]
    done = run("--model", model, *argv, "--steps", "3", "--save", str(ck), "--export-hf", str(out), torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"exported the model in Hugging Face's format to {out}" in done.stdout
    cfg, params = checkpoint_params(model, argv, str(ck))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    if model == "gpt":
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        want = N.gpt_logits(params, ids, cfg, P.Mesh.serial())[..., : cfg.vocab_size]
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-5)
    elif model == "biencoder":
        for tower, sub, cls in (("query", "question_encoder", transformers.DPRQuestionEncoder),
                                ("context", "ctx_encoder", transformers.DPRContextEncoder)):
            hf = cls.from_pretrained(out / sub).eval()
            want = N.embed_text(params, ids, cfg, P.Mesh.serial(), tower=tower)
            torch.testing.assert_close(hf(ids).pooler_output, want, rtol=1e-4, atol=1e-5)
    else:
        hf = transformers.BertForPreTraining.from_pretrained(out).eval()
        mlm, nsp = N.bert_pretrain(params, ids, cfg, P.Mesh.serial())
        got = hf(ids)
        torch.testing.assert_close(got.prediction_logits, mlm[..., : cfg.vocab_size], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.seq_relationship_logits, nsp, rtol=1e-4, atol=1e-5)


def test_init_hf_and_tokenizer_fine_tune_a_gpt2_under_torchrun(text_file, tmp_path):
    """A randomly initialised GPT2LMHeadModel saved with save_pretrained, a BPE tokenizer trained here: the
    run starts from exactly that model (its eval loss at step 0 equals transformers' own loss on the
    same held-out windows, at tp 2 as in one process) and learns."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([Path(text_file).read_text()],
                            tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf_cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    argv = ["--data", text_file, "--seq", "32", "--batch", "4", "--eval-batches", "1", "--peak-flops", "1e9",
            "--log-every", "4", "--eval-every", "4", "--steps", "8", "--lr", "1e-2", "--sample-tokens", "8",
            "--init-hf", str(tmp_path / "gpt2"), "--tokenizer", str(tmp_path / "tokenizer.json")]
    one, two = run(*argv), run(*argv, torchrun=2)
    for out in (one, two):
        assert out.returncode == 0, out.stderr[-3000:]
        assert "vocab 300 padded to" in out.stdout and "sample:" in out.stdout
    losses = eval_losses(one.stdout)
    assert losses == eval_losses(two.stdout) and losses[-1] < losses[0]
    # step 0: transformers' own model on the same held-out windows
    args = train.parse_args(argv)
    train.check_args(args, world=1)
    _, eval_data = train.split_corpus(train.load_corpus(text_file)[0], args.seq)
    ids, targets = train.batch(train.tokenize(args, eval_data), args.batch, args.seq, seed=10_000_019)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    with torch.no_grad():
        want = F.cross_entropy(hf(ids).logits.flatten(0, 1), targets.flatten()).item()
    assert f"{want:.4f}" == f"{losses[0]:.4f}"


@pytest.mark.parametrize("args,message", [
    (["--model", "t5", "--export-hf", "out"], "--export-hf: --model t5 has no Hugging Face twin here"),
    (["--model", "bert", "--export-hf", "out"], "Hugging Face's BERT cannot hold this config: {'position': 'rope'}"),
    (["--export-hf", "out", "--activation", "swiglu"], "GPT-2 cannot hold this config"),
    (["--export-hf", ""], "--export-hf is an empty path"),
    (["--init-hf", "/no/such/dir"], "--init-hf /no/such/dir: cannot read config.json"),
    (["--model", "t5", "--init-hf", "x"], "--init-hf is for --model gpt / bert, not t5"),
    (["--model", "bert", "--tokenizer", "x.json"], "--tokenizer is for --model gpt"),
    (["--tokenizer", "/no/such/tokenizer.json"], "--tokenizer /no/such/tokenizer.json: not a readable tokenizer.json"),
])
def test_hf_flags_bad_input_is_one_line_and_exit_code_2(text_file, capsys, args, message):
    code = train.main(["--data", text_file, *HF_TINY, "--steps", "1", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: " + message), err
    assert err.count("\n") == 1, err



# ---------------------------------------------------------------------------
# The logged training loss under context parallelism: train.logged_metrics,
# what the step line prints, on the worker pool against one process
# ---------------------------------------------------------------------------

LOGGED = ["--model", "gpt", "--layers", "2", "--hidden", "16", "--heads", "2", "--seq", "8", "--max-seq", "8",
          "--batch", "2", "--dropout", "0.1", "--lr", "1e-2", "--warmup", "1", "--steps", "2"]
_CP_MESHES: dict = {}


def logged_steps(pool_mesh, argv, data, cp):
    """Two float64 train_steps of this rank as train.py takes them (its replica's batch from batch_seed) and
    the step line's numbers (train.logged_metrics), on a mesh of the pool's tp and pp with this cp (built
    once per worker; dp fills the rest). -> (each step's global batch, the replicas' rows in order; the
    logged losses; the grad norms)."""
    key = (pool_mesh.tp, pool_mesh.pp, cp)
    if key not in _CP_MESHES:
        _CP_MESHES[key] = P.Mesh.build(tp=key[0], pp=key[1], cp=cp)
    mesh = _CP_MESHES[key]
    args = train.parse_args([*argv, "--tp", str(mesh.tp), "--pp", str(mesh.pp), "--cp", str(mesh.cp)])
    cfg, _ = train.check_args(args, mesh.tp * mesh.pp * mesh.dp * mesh.cp)
    task, specs = train.TASKS["gpt"], N.gpt_specs(cfg)
    local = N.stage_params(P.shard(task.init(cfg, args.seed, dtype=torch.float64), specs, mesh), cfg, mesh)
    params = {k: v.requires_grad_(True) for k, v in local.items()}
    opt = train.Optimizer(params, args, mesh, specs, cfg)
    batches, losses, norms = [], [], []
    for step in (1, 2):
        inputs = task.batch(data, args, train.batch_seed(args, step, mesh))
        batches.append({k: P.all_gather(v, mesh, "dp", 0) for k, v in inputs.items()})
        metrics, norm = train.train_step(params, opt, inputs, task, cfg, mesh, specs, args, step)
        losses.append(train.logged_metrics(metrics, mesh)["loss"])
        norms.append(norm.item())
    return batches, losses, norms


@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2)], ids=["cp2-dp2", "cp2-pp2"])
def test_the_logged_training_loss_under_cp_is_the_one_process_loss(pool, tp, pp):
    """The step line's loss (train.logged_metrics) and grad norm at --cp 2 (with dp 2, or with pp 2) are the
    one-process run's on the same global batch, dropout on: each cp rank's loss is its chunks' share of its
    replica's, so the line must average over all dp·cp ranks (only eval losses were compared before)."""
    data = torch.arange(3000, dtype=torch.int64) * 7 % 251
    results = pool.run(logged_steps, [*LOGGED, "--microbatches", str(pp)], data, 2, tp=tp, pp=pp)
    batches = results[0][0]
    for rank, (got, _, _) in enumerate(results):
        assert all(torch.equal(g[k], b[k]) for g, b in zip(got, batches) for k in b), f"rank {rank}: other batches"
    rows = batches[0]["ids"].shape[0]
    assert rows == 2 * 4 // (2 * pp * tp)  # --batch 2 per replica
    args = train.parse_args([*LOGGED, "--batch", str(rows), "--tp", "1"])
    cfg, _ = train.check_args(args, 1)
    task, specs, serial = train.TASKS["gpt"], N.gpt_specs(cfg), P.Mesh.serial()
    params = {k: v.requires_grad_(True) for k, v in task.init(cfg, args.seed, dtype=torch.float64).items()}
    opt = train.Optimizer(params, args, serial, specs, cfg)
    want_losses, want_norms = [], []
    for step, inputs in zip((1, 2), batches):
        metrics, norm = train.train_step(params, opt, inputs, task, cfg, serial, specs, args, step)
        want_losses.append(train.logged_metrics(metrics, serial)["loss"])
        want_norms.append(norm.item())
    for rank, (_, losses, norms) in enumerate(results):
        assert losses == pytest.approx(want_losses, rel=1e-6), f"rank {rank}: logged losses"
        assert norms == pytest.approx(want_norms, rel=1e-9), f"rank {rank}: grad norms"


# ---------------------------------------------------------------------------
# --bf16: bf16 parameters and activations, an fp32 main copy in the optimizer
# ---------------------------------------------------------------------------


def test_adamw_with_a_main_copy_over_all_reduced_buckets_is_torch_adamw():
    """P.ZeroAdamW over GradBuckets(zero=False) (the non-ZeRO main-copy path of --bf16), in float64 so that its
    arithmetic is checked exactly: three steps equal torch.optim.AdamW's, weight decay on matrices only."""
    cfg, params = tiny_model(torch.float64)
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    decay = lambda name, p: p.dim() >= 2
    opt = P.ZeroAdamW(params, P.GradBuckets(params, P.Mesh.serial()), N.gpt_specs(cfg), P.Mesh.serial(), lr=1e-2,
                      betas=(0.9, 0.95), weight_decay=0.1, decay=decay)
    torch_opt = torch.optim.AdamW([{"params": [p for n, p in ref.items() if decay(n, p)], "weight_decay": 0.1},
                                   {"params": [p for n, p in ref.items() if not decay(n, p)], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for ps, o in ((params, opt), (ref, torch_opt)):
            o.zero_grad()
            N.gpt_loss(ps, ids[:, :-1], ids[:, 1:], cfg, P.Mesh.serial()).backward()
            o.step()
    for name in params:
        torch.testing.assert_close(params[name].detach(), ref[name].detach(), rtol=1e-12, atol=1e-14, msg=name)


def bf16_or_fp32_losses(text: bytes, bf16: bool, steps: int):
    """`steps` train steps of a tiny GPT as train.py runs them (rank_params, make_optimizer, train_step), with
    or without --bf16. -> (losses, params, optimizer)."""
    args = args_of("--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "8",
                   "--lr", "1e-2", "--warmup", "2", "--steps", str(steps), "--dropout", "0", *(["--bf16"] * bf16))
    cfg, _ = train.check_args(args, 1)
    mesh, specs = P.Mesh.serial(), train.GPTTask.specs(cfg)
    params = {k: v.requires_grad_(True) for k, v in train.rank_params(train.GPTTask, cfg, mesh, specs, args).items()}
    opt = train.make_optimizer(params, args, mesh, specs, cfg)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    losses = [train.train_step(params, opt, train.GPTTask.batch(data, args, step), train.GPTTask, cfg, mesh, specs,
                               args, step)[0]["loss"].item() for step in range(1, steps + 1)]
    return losses, params, opt


def test_bf16_parameters_are_bf16_the_main_copy_fp32_and_the_run_learns_as_fp32():
    """--bf16: rank_params makes every parameter bf16, its gradient accumulates in an fp32 bucket (p.grad stays
    None); the optimizer holds an fp32 main copy and two fp32 moments
    (12 B an element, measured from storage), the parameters are the main copy rounded to bf16, and what a
    checkpoint saves (main_params) is the fp32 copy. Ten steps learn as the fp32 run does: each loss finite and
    within 0.05 of fp32's. Why 0.05: the two start from the same init, rounded to bf16 (2^-9 relative), and
    bf16 activations round every matmul input likewise, so the losses drift apart by what those roundings
    add up to: 0.007 measured at most over these ten steps (2026-12-03), at 3.6-5.6 nats; 0.05 is 7 times
    that, and 40 times smaller than the 1.9 nats the runs learn."""
    text = b"the quick brown fox jumps over the lazy dog. " * 200
    want, params32, _ = bf16_or_fp32_losses(text, bf16=False, steps=10)
    got, params, opt = bf16_or_fp32_losses(text, bf16=True, steps=10)
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert all(p.dtype == torch.float32 for p in params32.values())
    n = sum(p.numel() for p in params.values())
    assert opt.state_bytes() == 12 * n  # fp32 main + exp_avg + exp_avg_sq, the storage of what it holds
    assert {t.dtype for s in opt.opt.state for t in s.values()} == {torch.float32}
    assert {b["buf"].dtype for b in opt.buckets.buckets} == {torch.float32}  # fp32 gradients (Megatron's main_grad):
    assert all(p.grad is None for p in params.values())  # the hook added each bf16 p.grad into them and freed it
    assert all(opt.buckets.grads[k].dtype == torch.float32 and opt.buckets.grads[k].shape == p.shape
               for k, p in params.items())
    assert runlog.state_bytes(params, opt.state_bytes(), opt.buckets.grads) == 18 * n  # 2 + 4 + 12: Megatron's
    main = opt.main_params()
    for name, p in params.items():
        assert main[name].dtype == torch.float32
        assert torch.equal(p.detach(), main[name].to(torch.bfloat16)), name
    assert any(not torch.equal(main[n_].to(torch.bfloat16).float(), main[n_]) for n_ in main)  # finer than bf16
    assert all(math.isfinite(v) for v in got)
    assert max(abs(a - b) for a, b in zip(got, want)) < 0.05, (got, want)
    assert got[-1] < got[0] - 1.0  # it learns
