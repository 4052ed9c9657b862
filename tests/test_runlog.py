"""runlog.py and train.py's --log-dir, --plot, --trace-step: what a run leaves to look at.

Most runs are in this process (`train.main(argv)`, a one-layer GPT, a few steps); one torchrun run of
pp = 2 writes the schedule as it ran. The oracles: TensorBoard's own reader (EventAccumulator) for the
event files; a straight run's own records for a killed-and-resumed one (the same layout resumes bit for
bit); benchmarks/memory.py's count of one layer's saved bytes (which matches Korthikanti et al.'s
formula to the byte) for the live counter; the schedule's own causality for the trace's clocks."""

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanomeg as N
import parallel as P
import runlog
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--sample-tokens", "0",
        "--eval-batches", "1", "--peak-flops", "1e10", "--log-every", "2", "--eval-every", "3"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "abc.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


def main(*argv) -> int:
    return train.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(text_file, tmp_path_factory):
    """Three logs: 'straight' (6 steps, checkpoints at 3 and 6), 'resumed' (the same run's log, then a kill
    cutting its last line, then --load of step 3: steps 4-6 again, appended), and 'pp2' (torchrun, pp = 2,
    4 microbatches, step 2 traced)."""
    tmp = tmp_path_factory.mktemp("runs")
    base = ["--data", text_file, *TINY, "--steps", 6]
    assert main(*base, "--log-dir", tmp / "straight") == 0
    assert main(*base, "--log-dir", tmp / "resumed", "--save", tmp / "ckpt", "--save-every", 3) == 0
    with open(tmp / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # the line a kill cut short
    assert main(*base, "--log-dir", tmp / "resumed", "--load", tmp / "ckpt" / "step-00000003") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(ROOT / "train.py"),
                          *map(str, base), "--pp", "2", "--microbatches", "4", "--log-dir", str(tmp / "pp2"),
                          "--trace-step", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, out.stdout


def records(folder) -> list[dict]:
    return runlog.read_records(str(folder))[0]


def test_a_log_holds_run_json_and_a_record_per_log_step_and_eval(runs):
    tmp, _ = runs
    info = json.loads((tmp / "straight" / "run.json").read_text())
    assert info["model"] == "gpt" and info["config"]["layers"] == 2 and info["config"]["hidden"] == 32
    assert info["layout"] == dict(tp=1, cp=1, pp=1, dp=1, ep=1, zero=0, virtual_stages=1, world=1)
    assert info["flags"]["steps"] == 6 and info["versions"]["torch"] == torch.__version__ and info["start"]
    got = records(tmp / "straight")
    assert [(r["kind"], r["step"]) for r in got] == [("eval", 0), ("train", 2), ("eval", 3), ("train", 4),
                                                     ("train", 6), ("eval", 6)]
    step4 = got[3]
    assert step4["tokens"] == 4 * 4 * 32 and step4["opt/lr"] == train.lr_at(4, train.parse_args(["--steps", "6"]))
    for key in ("loss/total", "opt/grad_norm", "throughput/tokens_per_s", "throughput/tflops", "throughput/mfu",
                "memory/peak_bytes", "memory/peak_bytes_rank_0"):
        assert isinstance(step4[key], float | int) and step4[key] > 0, key
    # memory: at least the fp32 weights, their grads and AdamW's two moments, 16 B a parameter
    n = N.num_params(N.GPTConfig(vocab_size=256, max_seq=1024, layers=2, hidden=32, heads=2))
    assert 16 * n < step4["memory/peak_bytes"] < 16 * n + 2**21, (step4["memory/peak_bytes"], n)
    # the plan of this very run (plan.rank_plan, shapes only) beside the measured peak: within 0.1%
    assert abs(step4["memory/planned_bytes_rank_0"] / step4["memory/peak_bytes_rank_0"] - 1) < 1e-3, step4


def test_tensorboard_holds_the_same_scalars_read_back_with_its_own_reader(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = runs
    events = EventAccumulator(str(tmp / "straight" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    want = records(tmp / "straight")
    for name in ("loss/total", "eval/loss", "throughput/tokens_per_s", "opt/lr", "memory/peak_bytes"):
        expect = [(r["step"], r[name]) for r in want if name in r]
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in expect], name
        torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expect],
                                                                                   dtype=torch.float32))


def test_a_killed_and_resumed_run_is_one_continuous_record(runs):
    tmp, _ = runs
    raw = records(tmp / "resumed")
    resume = [r for r in raw if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 3 and resume[0]["loaded"].endswith("step-00000003")
    assert resume[0]["partial_line_dropped"] == '{"kind": "train", "step": 7, "lo'  # kept, not lost
    assert (tmp / "resumed" / "metrics.jsonl").read_text().endswith("}\n")
    one = [(r["kind"], r["step"], r.get("loss/total", r.get("eval/loss")))
           for r in runlog.continuous(raw) if r["kind"] != "resume"]
    straight = [(r["kind"], r["step"], r.get("loss/total", r.get("eval/loss"))) for r in records(tmp / "straight")]
    assert one == straight  # steps 4-6 after the resume: the straight run's, bit for bit


def test_pp2_traces_the_schedule_as_it_ran_and_learns_what_one_process_learns(runs):
    tmp, stdout = runs
    assert "traced step 2" in stdout
    pp2, straight = records(tmp / "pp2"), records(tmp / "straight")
    loss = lambda rs: [(r["kind"], r["step"], r.get("loss/total", r.get("eval/loss"))) for r in rs]
    assert [r[:2] for r in loss(pp2)] == [r[:2] for r in loss(straight)]
    torch.testing.assert_close([r[2] for r in loss(pp2)], [r[2] for r in loss(straight)], rtol=0, atol=1e-5)
    step4 = next(r for r in pp2 if r["step"] == 4)
    assert step4["comm/pp_elements"] > 0 and step4["pipeline/bubble"] >= 0
    for r in (0, 1):  # each pipeline rank's plan (its stage, the microbatches 1F1B keeps in flight) vs measured
        assert abs(step4[f"memory/planned_bytes_rank_{r}"] / step4[f"memory/peak_bytes_rank_{r}"] - 1) < 1e-3, step4
    assert "memory planned per rank" in stdout and "(planned " in stdout
    sched = json.loads((tmp / "pp2" / "schedule.json").read_text())
    assert (sched["step"], sched["pp"], sched["microbatches"], sched["schedule"]) == (2, 2, 4, "1f1b")
    plan = P.schedule_for("1f1b", 2, 4)
    ran = {r["pp_rank"]: r["actions"] for r in sched["ranks"]}
    for rank, actions in ran.items():
        assert [(a["kind"], a["micro"]) for a in actions] == [(a.kind, a.micro) for a in plan[rank]]
        times = [t for a in actions for t in (a["wait_start"], a["start"], a["end"])]
        assert times == sorted(times) and times[0] >= 0, rank  # each rank's actions one after another
    for m in range(4):  # the clocks line up across ranks: a microbatch's forward on stage 1 starts after stage
        f0, f1 = (next(a for a in ran[r] if (a["kind"], a["micro"]) == ("F", m)) for r in (0, 1))  # 0's ended
        b0, b1 = (next(a for a in ran[r] if (a["kind"], a["micro"]) == ("B", m)) for r in (0, 1))
        assert f1["start"] >= f0["end"] and b0["start"] >= b1["end"], m
    trace = json.loads((tmp / "pp2" / "trace.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1} and all(set(e) >= {"name", "ts", "dur", "pid", "tid"} for e in spans)
    assert sorted(e["name"] for e in spans if e["name"] != "wait") == sorted(
        f"{k} mb {m}" for k in "FB" for m in range(4) for _ in range(2))


def test_plot_overlays_the_runs_and_draws_the_schedule(runs, capsys):
    tmp, _ = runs
    path, drawn, notes = runlog.plot([str(tmp / "pp2"), str(tmp / "resumed")])
    assert path == tmp / "pp2" / "run.png" and notes == []
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 1_000_000, len(data)
    for run in ("pp2: tp=1 pp=2 dp=1", "resumed: tp=1 pp=1 dp=1"):
        assert {f"{run} train", f"{run} eval"} <= set(drawn["loss against steps"]), drawn
        assert {f"{run} train", f"{run} eval"} <= set(drawn["loss against tokens"]), drawn
        assert run in drawn["tokens/s"] and run in drawn["MFU"]
    assert "resumed: tp=1 pp=1 dp=1 resumed at step 3" in drawn["loss against steps"]
    assert drawn["elements moved per step, per mesh dim"] == ["pp2: tp=1 pp=2 dp=1 embed", "pp2: tp=1 pp=2 dp=1 pp"]
    assert drawn["pp2: tp=1 pp=2 dp=1: step 2 as it ran (1f1b)"] == ["rank 0", "rank 1"]


def test_a_metrics_file_cut_by_a_kill_is_read_to_its_last_whole_line(tmp_path, capsys):
    whole = [dict(kind="eval", step=0, tokens=0, **{"eval/loss": 5.5}),
             dict(kind="train", step=2, tokens=256, **{"loss/total": 5.0})]
    (tmp_path / "run.json").write_text(json.dumps(dict(layout=dict(tp=1, pp=1, dp=1))))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"kind": "tr')
    got, note = runlog.read_records(str(tmp_path))
    assert got == whole and "last line is cut short" in note and "up to line 2" in note
    assert main("--plot", tmp_path) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"note: {tmp_path / 'metrics.jsonl'}: its last line is cut short"), out
    # a broken line before the last is no kill's doing: refused
    (tmp_path / "metrics.jsonl").write_text(json.dumps(whole[0]) + "\n{oops\n" + json.dumps(whole[1]) + "\n")
    with pytest.raises(ValueError, match="line 2 is not a record"):
        runlog.read_records(str(tmp_path))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["a file", "not writable", "another run's log", "another model's log",
                                  "not a run.json", "a run.json whose config is no object", "metrics without run.json",
                                  "plot: no metrics",
                                  "plot: a file", "plot: a broken line", "trace-step without log-dir",
                                  "trace-step at pp 1", "trace-step beyond the run"])
def test_bad_log_input_is_one_line_exit_2_and_leaves_the_log_untouched(runs, text_file, tmp_path, monkeypatch,
                                                                       capsys, case):
    tmp, _ = runs
    log = tmp_path / "log"
    log.mkdir()
    (log / "run.json").write_text((tmp / "straight" / "run.json").read_text())
    (log / "metrics.jsonl").write_text((tmp / "straight" / "metrics.jsonl").read_text())
    base = ["--data", text_file, *TINY, "--steps", 2]
    argv, words = {
        "a file": ([*base, "--log-dir", log / "metrics.jsonl"], "metrics.jsonl: not a folder (a file is there)"),
        "not writable": ([*base, "--log-dir", log / "sub"], f"{log} is not writable"),
        "another run's log": ([*base, "--log-dir", log], "holds the log of a run started"),
        "another model's log": ([*base, "--hidden", 64, "--log-dir", log, "--load", tmp_path / "none"],
                                "holds the log of another run, of a model differing in hidden (32 there, 64 now)"),
        "not a run.json": ([*base, "--log-dir", log], "run.json is not a run's record"),
        "a run.json whose config is no object": ([*base, "--log-dir", log],
                                                 "run.json is not a run's record (TypeError: its config is a int"),
        "metrics without run.json": ([*base, "--log-dir", log], "holds metrics.jsonl but no run.json"),
        "plot: no metrics": (["--plot", log, tmp_path], f"--plot {tmp_path}: no metrics.jsonl there"),
        "plot: a file": (["--plot", log / "run.json"], "not a folder"),
        "plot: a broken line": (["--plot", log], "metrics.jsonl line 1 is not a record"),
        "trace-step without log-dir": ([*base, "--pp", 2, "--trace-step", 1], "--trace-step 1 needs --log-dir DIR"),
        "trace-step at pp 1": ([*base, "--log-dir", tmp_path / "new", "--trace-step", 1],
                               "needs --log-dir DIR and --pp > 1"),
        "trace-step beyond the run": ([*base, "--pp", 2, "--log-dir", tmp_path / "new", "--trace-step", 3],
                                      "--trace-step 3 is not a step of this run (steps 1 to 2)"),
    }[case]
    if "--pp" in argv:  # checked with the world size torchrun would give; refused before any process group
        monkeypatch.setenv("WORLD_SIZE", "2")
    if case == "not writable":
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == log else real(p, mode))
    if case == "not a run.json":
        (log / "run.json").write_text("[1, 2")
    if case == "a run.json whose config is no object":
        (log / "run.json").write_text('{"model": "gpt", "config": 5}')
    if case == "metrics without run.json":
        (log / "run.json").unlink()
    if case == "plot: a broken line":
        (log / "metrics.jsonl").write_text("{oops\n" + (tmp / "straight" / "metrics.jsonl").read_text())
    before = snapshot(log)
    assert main(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (case, err)
    assert snapshot(log) == before
    assert not (tmp_path / "new").exists()


def test_without_tensorboard_one_line_says_it_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    log = runlog.RunLog(str(tmp_path), runlog.run_info("gpt", {}, {}, {}))
    log.write(dict(kind="train", step=1, tokens=1, **{"loss/total": 1.0}))
    assert log.tb is None and log.notes == [f"tensorboard: not installed, {tmp_path / 'tb'} skipped "
                                            "(pip install -e '.[viz]')"]
    assert not (tmp_path / "tb").exists() and len(runlog.read_records(str(tmp_path))[0]) == 1


def test_saved_peak_counts_what_benchmarks_memory_counts_and_frees_it_after_backward():
    """One fp32 GPT layer with dropout, no recompute: the live counter's peak (nothing is freed before the
    backward) equals benchmarks/memory.py's total of the storages saved for backward, which matches
    Korthikanti et al.'s formula term by term; after the backward nothing is held."""
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = N.GPTConfig(vocab_size=256, max_seq=64, layers=1, hidden=32, heads=2, hidden_dropout=0.1,
                      attention_dropout=0.1)
    want = bench.measure(cfg, P.Mesh.serial(), s=16, b=2, bf16=False)["bytes"]
    params = {k: v.requires_grad_(True) for k, v in N.init_gpt(cfg, seed=0).items() if k.startswith("layers.")}
    x0 = torch.randn(2, 16, 32, requires_grad=True)
    with runlog.SavedPeak(params.values()) as saved:
        x = x0.clone()
        out = N.run_layers(params, x, cfg, P.Mesh.serial(), mask_kind="causal", seed=1, training=True)
    assert saved.peak == want > 0, (saved.peak, want)
    out.sum().backward()
    del out, x
    assert saved.live == 0 and saved.refs == {}


def test_storage_bytes_counts_each_storage_once():
    a = torch.zeros(10, 4)
    assert runlog.storage_bytes([a, a[2:], a.t(), None, torch.zeros(3, dtype=torch.float64)]) == 160 + 24


def test_progress_shows_step_loss_tokens_per_second_and_time_left_on_a_tty_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar = runlog.Progress(100, True, start=0, tokens_per_step=1000, stream=Tty())
    assert bar.line(50, 2.0, now=bar.t0 + 10).endswith("] 50/100 loss 2.000 | 5,000 tok/s | 0:10 left")
    bar.update(50, 2.0)
    assert "50/100" in bar.stream.getvalue()
    quiet = runlog.Progress(100, True, stream=io.StringIO())  # not a tty: nothing, as before
    quiet.update(50, 2.0)
    assert quiet.stream.getvalue() == ""


def test_moe_load_per_expert_is_logged_and_plotted(text_file, tmp_path):
    log = tmp_path / "moe"
    assert main("--data", text_file, *TINY, "--steps", 2, "--experts", 4, "--topk", 2, "--log-dir", log) == 0
    step2 = next(r for r in records(log) if r["kind"] == "train")
    share = [step2[f"moe/load_expert_{i}"] for i in range(4)]
    assert abs(sum(share) - 1) < 1e-9 and step2["moe/dropped"] == 0.0  # dropless: each choice lands
    assert step2["loss/total"] == step2["loss/lm"] + step2["loss/aux"]
    _, drawn, _ = runlog.plot([str(log)], out=str(tmp_path / "moe.png"))
    assert drawn["MoE: share of the choices per expert"] == [f"moe: tp=1 pp=1 dp=1 expert {i}" for i in range(4)]
