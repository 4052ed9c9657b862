"""train.py end to end, as a user runs it: exit codes, messages, learning.

train.py is run as a program (nothing imports it), on a small model and a
data file written by the test."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--sample-tokens", "0"]


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
              "--sequence-parallel", *TINY, torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh tp=2 dp=1, sequence parallel" in out.stdout
    first, last = eval_losses(out.stdout)
    assert last < first, out.stdout
    comm = int(re.search(r"comm ([0-9,]+) el/step", out.stdout).group(1).replace(",", ""))
    assert comm > 0


def test_bf16_and_the_other_architecture_switches_run(text_file):
    out = run("--data", text_file, "--steps", "6", "--log-every", "3", "--eval-every", "6", "--bf16",
              "--position", "rope", "--norm", "rmsnorm", "--activation", "swiglu", "--kv-heads", "1",
              "--attention", "sdpa", "--recompute", "full", *TINY)
    assert out.returncode == 0, out.stderr
    assert ", bf16" in out.stdout and len(eval_losses(out.stdout)) == 2


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/file"], "error: --data /no/such/file: no such file or directory"),
    (["--heads", "3", "--hidden", "96", "--tp", "2"], "error: --tp 2 does not divide the world size 1"),
    (["--heads", "3", "--hidden", "32"], "error: hidden=32 is not divisible by heads=3"),
    (["--seq", "2048"], "error: sequence of 2048 tokens is longer than max_seq=1024"),
    (["--steps", "0"], "error: --steps must be >= 1, got 0"),
    (["--warmup", "-3"], "error: --warmup must be >= 0, got -3"),
    (["--lr", "1e9", "--steps", "50", *TINY], "error: loss is nan at step"),
])
def test_bad_input_is_one_line_and_exit_code_2(text_file, args, message):
    out = run("--data", text_file, *args) if "--data" not in args else run(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip().startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # no traceback wall


def test_an_unknown_flag_is_exit_code_2():
    out = run("--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


def test_empty_and_binary_data_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    for name, message in [("empty.txt", "empty (0 bytes)"), ("blob.bin", "looks binary (a NUL byte at offset 4)")]:
        out = run("--data", str(tmp_path / name))
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_tp_that_does_not_divide_heads_under_torchrun_exits_2_on_every_rank(text_file):
    out = run("--data", text_file, "--heads", "3", "--hidden", "48", "--steps", "1", torchrun=2)
    assert "error: tp=2 does not divide heads=3" in out.stderr
    assert out.stderr.count("error: tp=2") == 1  # said once, by rank 0
    codes = re.findall(r"exitcode\s*: (-?\d+)", out.stderr)
    # every rank exits 2 on its own; torchrun may SIGTERM (-15) a rank that had not exited yet
    assert "2" in codes and set(codes) <= {"2", "-15"}, out.stderr
