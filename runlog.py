"""runlog.py — what a run leaves to look at: metrics.jsonl, run.json, TensorBoard, plots, a schedule trace.

    python train.py --log-dir runs/tp1                   # rank 0 writes runs/tp1/{run.json,metrics.jsonl,tb/}
    python train.py --plot runs/tp2 runs/tp1             # runs/tp2/run.png: both runs' curves overlaid
    torchrun --nproc-per-node 2 train.py --pp 2 --microbatches 4 --log-dir runs/pp2 --trace-step 3
                                                         # + schedule.json and trace.json (chrome://tracing)

A record is one flat JSON object per line of metrics.jsonl, its numbers named by group, the names
TensorBoard shows: {"kind": "train", "step": 25, "time": 12.3, "tokens": 51200, "loss/total": 3.01,
"opt/lr": 0.0025, "throughput/tokens_per_s": 8312, "comm/tp_elements": 4724737,
"memory/peak_bytes": 3276800, ...}; "kind" is "train", "eval" or "resume". train.py computes the
numbers (it is glue); this file writes them, reads them back and draws them, and every function here
is one a test calls. Nothing here joins a process group: train.py gathers what rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import parallel as P

# ---------------------------------------------------------------------------
# 1. The log folder: checked before the first step, started (or resumed) once
# ---------------------------------------------------------------------------

RUN, METRICS, TB, SCHEDULE, TRACE, PNG = "run.json", "metrics.jsonl", "tb", "schedule.json", "trace.json", "run.png"


def check_log_dir(path: str, model: str, config: dict, resuming: bool) -> dict | None:
    """--log-dir DIR for a run of `model` with `config`: DIR holds no log, or the log of this same model
    and config and the run resumes (--load). -> the existing run.json's dict (None: a new log).
    ValueError naming the fault otherwise: a log is never overwritten, nor shared by two runs.
    (That DIR is, or can be made as, a writable folder is train.check_output_folder's check.)"""
    folder = Path(path)
    run, metrics = folder / RUN, folder / METRICS
    if not run.exists():
        if metrics.exists():
            raise ValueError(f"--log-dir {path}: holds {METRICS} but no {RUN}: not a log this run can continue; "
                             "log elsewhere")
        return None
    try:
        old = json.loads(run.read_text())
        old_model, old_config = old["model"], old["config"]
        if not isinstance(old_config, dict):
            raise TypeError(f"its config is a {type(old_config).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--log-dir {path}: {RUN} is not a run's record ({type(e).__name__}: {str(e)[:100]}); "
                         "log elsewhere") from None
    differ = sorted(k for k in set(config) | set(old_config) if config.get(k) != old_config.get(k))
    if old_model != model or differ:
        what = f"--model {old_model}" if old_model != model else "a model differing in " + ", ".join(
            f"{k} ({old_config.get(k)!r} there, {config.get(k)!r} now)" for k in differ[:4])
        raise ValueError(f"--log-dir {path}: holds the log of another run, of {what}: log elsewhere")
    if not resuming:
        raise ValueError(f"--log-dir {path}: holds the log of a run started {old.get('start', '?')}: --load its "
                         "checkpoint to resume it (the records continue), or log elsewhere")
    if metrics.exists() and not os.access(metrics, os.W_OK):
        raise ValueError(f"--log-dir {path}: {metrics} is not writable")
    return old


def git_commit(folder: Path) -> str | None:
    """The git commit of the checkout holding `folder` (nanomeg's source), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_info(model: str, config: dict, layout: dict, flags: dict) -> dict:
    """run.json: the model, its config, the layout, the flags, the versions (python, torch, nanomeg's git
    commit when there is one) and the start time (UTC, ISO 8601)."""
    plain = {k: v for k, v in flags.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    return dict(model=model, config=config, layout=layout, flags=plain,
                versions=dict(python=sys.version.split()[0], torch=torch.__version__,
                              nanomeg=git_commit(Path(__file__).resolve().parent)),
                start=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


class RunLog:
    """Rank 0's writer of one log folder: run.json once, a line of metrics.jsonl per record (flushed, so a
    kill loses at most the line being written) and the same numbers to TensorBoard under DIR/tb."""

    def __init__(self, path: str, info: dict, resume: dict | None = None, tensorboard: bool = True):
        """info: `run_info` (written as run.json for a new log). resume: a record {"kind": "resume",
        "step": the step resumed from, ...} appended to an existing log (run.json is then left as it is)."""
        self.folder, self.t0 = Path(path), time.time()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics = self.folder / METRICS
        self.notes = []
        if resume is None:
            (self.folder / RUN).write_text(json.dumps(info, indent=1) + "\n")
        else:
            cut = cut_partial_line(self.metrics)
            self.write(resume | (dict(partial_line_dropped=cut) if cut else {}) | dict(layout=info["layout"]),
                       tensorboard=False)
        self.tb, note = open_tensorboard(self.folder / TB) if tensorboard else (None, None)
        if note:
            self.notes.append(note)

    def write(self, record: dict, tensorboard: bool = True) -> None:
        """Append record (with "time": seconds since this log was opened) as one line; its numbers to TB."""
        record = dict(record, time=round(time.time() - self.t0, 3))
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if tensorboard and self.tb is not None:
            for name, value in scalars(record).items():
                self.tb.add_scalar(name, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def cut_partial_line(path: Path) -> str | None:
    """A file whose last line was cut by a kill (no final newline) loses that partial line, which is
    returned (the resume record keeps its text); None when the file ends with a whole line or is absent."""
    if not path.exists():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return data[keep:].decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# 2. Records: what train.py's numbers become, and reading them back
# ---------------------------------------------------------------------------


def train_record(step: int, tokens: int, metrics: dict[str, float], *, lr: float, grad_norm: float,
                 tokens_per_s: float, flops_per_s: float, mfu: float, comm: dict[str, tuple[int, int]],
                 bubble: float | None, moe: dict | None, peak_bytes: list[int],
                 planned_bytes: list[int] | None = None) -> dict:
    """One log step as a flat record. metrics: train.logged_metrics (the loss and the model's own terms:
    lm, aux, z, mlm, nsp, accuracies); comm: {mesh dim: (elements, bytes)} of one step (train.comm_by_dim);
    bubble: the measured idle / busy (pp > 1); moe: train.moe_stats ({"share": per expert, "dropped"});
    peak_bytes: per rank (`measured_memory`); planned_bytes: per rank, `plan.rank_plan`'s (train.planned_memory)."""
    out = dict(kind="train", step=step, tokens=tokens, **named_metrics(metrics, "loss"))
    out |= {"opt/lr": lr, "opt/grad_norm": grad_norm, "throughput/tokens_per_s": tokens_per_s,
            "throughput/tflops": flops_per_s / 1e12, "throughput/mfu": mfu}
    for dim, (elements, nbytes) in comm.items():
        out |= {f"comm/{dim}_elements": elements, f"comm/{dim}_bytes": nbytes}
    if bubble is not None:
        out["pipeline/bubble"] = bubble
    if moe is not None:
        out |= {f"moe/load_expert_{i}": x for i, x in enumerate(moe["share"])} | {"moe/dropped": moe["dropped"]}
    out["memory/peak_bytes"] = max(peak_bytes)
    out |= {f"memory/peak_bytes_rank_{r}": b for r, b in enumerate(peak_bytes)}
    out |= {f"memory/planned_bytes_rank_{r}": b for r, b in enumerate(planned_bytes or ())}
    return out


def eval_record(step: int, tokens: int, metrics: dict[str, float]) -> dict:
    """An evaluation: {"eval/loss": ..., "eval/mlm": ..., "eval/nsp_acc": ...}."""
    return dict(kind="eval", step=step, tokens=tokens, **named_metrics(metrics, "eval"))


def named_metrics(metrics: dict[str, float], group: str) -> dict[str, float]:
    """Train: the loss as loss/total, each term as loss/NAME, each accuracy as accuracy/NAME; eval: eval/NAME."""
    if group == "eval":
        return {f"eval/{k}": v for k, v in metrics.items()}
    return {("loss/total" if k == "loss" else f"accuracy/{k}" if "acc" in k else f"loss/{k}"): v
            for k, v in metrics.items()}


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers TensorBoard shows: every group/name entry."""
    return {k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_records(folder: str) -> tuple[list[dict], str | None]:
    """DIR/metrics.jsonl's records and a note when its last line was cut short (a killed run): read up to
    the last whole line. ValueError when there is none, or a line before the last is not a record."""
    path = Path(folder) / METRICS
    if not Path(folder).is_dir():
        raise ValueError(f"--plot {folder}: not a folder")
    if not path.is_file():
        raise ValueError(f"--plot {folder}: no {METRICS} there (a --log-dir of a run)")
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except OSError as e:
        raise ValueError(f"--plot {folder}: cannot read {METRICS} ({e.strerror or e})") from None
    records, note = [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError("not a record with a step")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: the line a kill cut short
                note = f"{path}: its last line is cut short (a killed run?): read up to line {i}"
                break
            raise ValueError(f"--plot {folder}: {METRICS} line {i + 1} is not a record ({str(e)[:80]})") from None
        records.append(record)
    if not any(r.get("kind") in ("train", "eval") for r in records):
        raise ValueError(f"--plot {folder}: {METRICS} holds no train or eval record yet")
    return records, note


def continuous(records: list[dict]) -> list[dict]:
    """A killed and resumed run as one record: a resume from step N drops the earlier records past N (the
    steps the kill threw away, which the resumed run logs again)."""
    out = []
    for r in records:
        if r.get("kind") == "resume":
            out = [o for o in out if o["step"] <= r["step"] and not (o["step"] == r["step"] and o["kind"] == "eval")]
        out.append(r)
    return out


# ---------------------------------------------------------------------------
# 3. Memory, measured per rank
# ---------------------------------------------------------------------------


def storage_bytes(tensors) -> int:
    """The bytes of the storages under `tensors` (None skipped), each storage counted once, by data_ptr:
    views (p.grad in a gradient bucket) share their bucket's."""
    held = {}
    for t in tensors:
        if t is not None:
            u = t.untyped_storage()
            held[u.data_ptr()] = u.nbytes()
    return sum(held.values())


class SavedPeak:
    """The peak bytes of the tensors autograd holds for backward while the block runs, counted live:
    a saved tensor's storage (each once, by data_ptr) counts from its pack until autograd drops it (the
    node's backward has run: the `Held` wrapper is collected). Storages in `exclude` (the parameters,
    counted with the state) are left out. Use: with SavedPeak(params.values()) as saved: ...; saved.peak.
    What measures the memory in the log line, and what plan.py's activations are checked against
    (tests/test_plan.py, benchmarks/pipeline.py --measure)."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs, self.live, self.peak = {}, 0, 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def _pack(self, t):
        return Held(t, self)

    def _add(self, ptr: int, nbytes: int, sign: int) -> None:
        if ptr in self.exclude:
            return
        n = self.refs.get(ptr, 0) + sign
        if n == 0:
            self.refs.pop(ptr, None)
            self.live -= nbytes
        else:
            self.refs[ptr] = n
            if n == 1 and sign == 1:
                self.live += nbytes
                self.peak = max(self.peak, self.live)


class Held:
    """A tensor saved for backward, as `SavedPeak` hands it to autograd: counted while it lives."""

    __slots__ = ("tensor", "counter", "ptr", "nbytes")

    def __init__(self, tensor, counter: SavedPeak):
        u = tensor.untyped_storage()
        self.tensor, self.counter, self.ptr, self.nbytes = tensor, counter, u.data_ptr(), u.nbytes()
        counter._add(self.ptr, self.nbytes, +1)

    def __del__(self):
        self.counter._add(self.ptr, self.nbytes, -1)


def state_bytes(params: dict, optimizer_bytes: int, grads: dict | None = None) -> int:
    """Parameters and their gradients, from their storage (the gradients: their buckets, once each), plus
    the optimizer's state (train.Optimizer.state_bytes, measured from storage too). grads: {name: gradient}
    (`parallel.GradBuckets.grads`: fp32 buckets of bf16 parameters, whose p.grad is None), else each p.grad."""
    grads = grads if grads is not None else {name: p.grad for name, p in params.items()}
    return storage_bytes([*params.values(), *grads.values()]) + optimizer_bytes


@contextlib.contextmanager
def measured_memory(params: dict, optimizer_bytes, device: torch.device, grads: dict | None = None):
    """The peak bytes this rank holds while the block (a training step) runs, measured: on CUDA torch's
    max_memory_allocated; on CPU `state_bytes` (parameters, gradients, optimizer_bytes() after the block)
    plus the live peak of what autograd saves for backward (`SavedPeak`, the parameters left out); grads
    as `state_bytes` takes them.
    Yields {"peak": bytes}, filled when the block ends."""
    out = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["peak"] = torch.cuda.max_memory_allocated(device)
        return
    with SavedPeak(params.values()) as saved:
        yield out
    out["peak"] = saved.peak + state_bytes(params, optimizer_bytes(), grads)


def memory_note(peak_bytes: list[int], planned: list[int] | None = None) -> str:
    """' | mem 3.1 MiB' (one rank), ' | mem 3.1/3.0 MiB' (per rank, up to 8; beyond, the largest), and
    with the plan of the same layout (`plan.rank_plan`'s bytes per rank, in rank order) its figures
    beside: ' | mem 3.1/3.0 MiB (planned 2.9/2.9)'."""
    mib = lambda b: f"{b / 2**20:.1f}"
    shown = lambda nbytes: "/".join(map(mib, nbytes)) if len(nbytes) <= 8 else f"max {mib(max(nbytes))}"
    return f" | mem {shown(peak_bytes)} MiB" + (f" (planned {shown(planned)})" if planned else "")


# ---------------------------------------------------------------------------
# 4. TensorBoard (optional: pip install -e '.[viz]')
# ---------------------------------------------------------------------------


def open_tensorboard(folder: Path):
    """(torch's SummaryWriter on folder, None), or (None, the one line saying why it is skipped)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None, f"tensorboard: not installed, {folder} skipped (pip install -e '.[viz]')"
    return SummaryWriter(str(folder)), None


# ---------------------------------------------------------------------------
# 5. The schedule as it ran: schedule.json and a Chrome trace
# ---------------------------------------------------------------------------


def rank_trace(spans: list[tuple], coords: dict) -> dict:
    """One rank's actions of the traced step: spans from `parallel.run_schedule`'s clock["trace"], each
    (kind, micro, chunk, waited from, ran from, ended) in time.perf_counter seconds, put on the wall clock
    (time.time) so that ranks line up (one machine: the same clock; several: as synchronised as theirs).
    coords: the rank's place ({"rank", "pp_rank", ...})."""
    to_wall = time.time() - time.perf_counter()
    return dict(coords, actions=[dict(kind=k, micro=m, chunk=c, wait_start=w + to_wall, start=s + to_wall,
                                      end=e + to_wall) for k, m, c, w, s, e in spans])


def schedule_record(step: int, schedule: str, pp: int, v: int, microbatches: int, ranks: list[dict]) -> dict:
    """schedule.json: every rank's actions (`rank_trace`), times in seconds from the first action's
    wait on any rank."""
    t0 = min(a["wait_start"] for r in ranks for a in r["actions"])
    shift = lambda a: {k: round(x - t0, 6) if k in ("wait_start", "start", "end") else x for k, x in a.items()}
    return dict(step=step, schedule=schedule, pp=pp, virtual_stages=v, microbatches=microbatches,
                unit="seconds from the first action", ranks=[dict(r, actions=[shift(a) for a in r["actions"]])
                                                            for r in ranks])


def chrome_trace(record: dict) -> dict:
    """The Chrome / Perfetto trace of a schedule record: one row (tid) per rank, an "X" event per action
    ("F mb 0", "B mb 0", chunk c > 0 adds " c1") and one per wait for a neighbour; times in µs."""
    us = lambda s: round(s * 1e6, 1)
    events = []
    for r in record["ranks"]:
        tid = r["rank"]
        events.append(dict(name="thread_name", ph="M", pid=0, tid=tid,
                           args=dict(name=f"rank {tid} (pp {r['pp_rank']})")))
        for a in r["actions"]:
            name = f"{a['kind']} mb {a['micro']}" + (f" c{a['chunk']}" if a["chunk"] else "")
            if a["start"] > a["wait_start"]:
                events.append(dict(name="wait", ph="X", ts=us(a["wait_start"]), dur=us(a["start"] - a["wait_start"]),
                                   pid=0, tid=tid))
            events.append(dict(name=name, ph="X", ts=us(a["start"]), dur=us(a["end"] - a["start"]), pid=0, tid=tid))
    return dict(traceEvents=events, displayTimeUnit="ms")


def write_schedule(folder: str, record: dict) -> list[Path]:
    """schedule.json and trace.json in folder. -> their paths."""
    out = [Path(folder) / SCHEDULE, Path(folder) / TRACE]
    out[0].write_text(json.dumps(record, indent=1) + "\n")
    out[1].write_text(json.dumps(chrome_trace(record)) + "\n")
    return out


def planned_timeline(record: dict) -> dict:
    """The simulator's timeline of the same schedule (unit costs: F 1, B 2): {pp rank: [(kind, micro,
    chunk, start, end)]}, what --show-schedule draws as text."""
    lists = P.schedule_for(record["schedule"], record["pp"], record["microbatches"], record["virtual_stages"])
    sim = P.simulate(lists, record["virtual_stages"])
    return {r: [(a.kind, a.micro, a.chunk, sim["start"][r, i], sim["end"][r, i]) for i, a in enumerate(s)]
            for r, s in enumerate(lists)}


# ---------------------------------------------------------------------------
# 6. Plots: --plot DIR [DIR ...] -> DIR/run.png
# ---------------------------------------------------------------------------

KIND_COLORS = {"F": "tab:blue", "B": "tab:orange", "I": "tab:orange", "W": "tab:green"}


def run_label(folder: str) -> str:
    """A run's legend: its folder's name and layout ('tp2: tp=2 pp=1 dp=1')."""
    try:
        layout = json.loads((Path(folder) / RUN).read_text())["layout"]
        shown = " ".join(f"{k}={layout[k]}" for k in ("tp", "cp", "pp", "dp", "ep") if k in layout
                         and (layout[k] > 1 or k in ("tp", "pp", "dp")))
    except (OSError, ValueError, KeyError, TypeError):
        shown = "?"
    return f"{Path(folder).resolve().name}: {shown}"


def bar(ax, row: int, t0: float, t1: float, kind: str, micro: int, chunk: int) -> None:
    """One action of a timeline: a bar coloured by its kind, its microbatch written in it (a prime per
    later chunk, as --show-schedule writes it)."""
    ax.broken_barh([(t0, t1 - t0)], (row - 0.4, 0.8), color=KIND_COLORS[kind], edgecolor="white")
    ax.text((t0 + t1) / 2, row, str(micro) + "'" * chunk, ha="center", va="center", fontsize=6, color="white")


def series(records: list[dict], key: str) -> tuple[list, list, list]:
    """(steps, tokens, values) of the records that hold key."""
    rs = [r for r in records if key in r]
    return [r["step"] for r in rs], [r["tokens"] for r in rs], [r[key] for r in rs]


def plot(folders: list[str], out: str | None = None) -> tuple[Path, dict[str, list[str]], list[str]]:
    """Draw the runs of `folders` (their metrics.jsonl, and schedule.json where there is one) into one PNG
    (default: the first folder's run.png), their curves overlaid: loss against steps and against tokens
    (train and eval), tokens/s, MFU, elements per mesh dim per step, peak memory, MoE load per expert,
    and each traced schedule as it ran beside the simulator's plan.
    -> (the PNG's path, {panel title: the names of the series drawn in it}, the notes of cut files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, notes = [], []
    for folder in folders:
        records, note = read_records(folder)
        notes += [note] if note else []
        runs.append((run_label(folder), continuous(records), Path(folder) / SCHEDULE))
    panels = {}  # title -> [(x, y, label, style)]

    def add(title, x, y, label, style="-"):
        if x:
            panels.setdefault(title, []).append((x, y, label, style))

    for label, records, _ in runs:
        train = [r for r in records if r["kind"] == "train"]
        ev = [r for r in records if r["kind"] == "eval"]
        for rs, key, name, style in ((train, "loss/total", "train", "-"), (ev, "eval/loss", "eval", "o--")):
            steps, tokens, y = series(rs, key)
            add("loss against steps", steps, y, f"{label} {name}", style)
            add("loss against tokens", tokens, y, f"{label} {name}", style)
        for r in records:
            if r["kind"] == "resume":
                add("loss against steps", [r["step"]], None, f"{label} resumed at step {r['step']}", "resume")
        for key, title, scale in (("throughput/tokens_per_s", "tokens/s", 1), ("throughput/mfu", "MFU", 1),
                                  ("memory/peak_bytes", "peak memory (MiB, largest rank), measured", 2**20)):
            steps, _, y = series(train, key)
            add(title, steps, [v / scale for v in y], label)
        for key in sorted({k for r in train for k in r if k.startswith("comm/") and k.endswith("_elements")}):
            steps, _, y = series(train, key)
            add("elements moved per step, per mesh dim", steps, y, f"{label} {key[5:-9]}")
        for key in sorted({k for r in train for k in r if k.startswith("moe/load_expert_")}, key=lambda k: int(k[16:])):
            steps, _, y = series(train, key)
            add("MoE: share of the choices per expert", steps, y, f"{label} expert {key[16:]}")
    timelines = [(label, json.loads(path.read_text())) for label, _, path in runs if path.is_file()]
    n = len(panels) + 2 * len(timelines)
    cols = 2
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(12, 3.2 * -(-n // cols)), squeeze=False)
    drawn = {}
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for x, y, label, style in lines:
            if style == "resume":
                ax.axvline(x[0], linestyle=":", color="gray", label=label)
            else:
                ax.plot(x, y, style, label=label, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tokens" if "tokens" in title and "tokens/s" not in title else "step", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
        drawn[title] = [label for _, _, label, _ in lines]
    free = list(axes.flat)[len(panels):]
    for (label, record), ax_run, ax_plan in zip(timelines, free[0::2], free[1::2]):
        rows = sorted(record["ranks"], key=lambda r: r["rank"])
        for y, r in enumerate(rows):
            for a in r["actions"]:
                bar(ax_run, y, a["start"] * 1e3, a["end"] * 1e3, a["kind"], a["micro"], a["chunk"])
        ax_run.set_yticks(range(len(rows)), [f"rank {r['rank']}" for r in rows], fontsize=7)
        ax_run.set_xlabel("ms (measured)", fontsize=8)
        title = f"{label}: step {record['step']} as it ran ({record['schedule']})"
        ax_run.set_title(title, fontsize=9)
        for pr, actions in planned_timeline(record).items():
            for kind, micro, chunk, t0, t1 in actions:
                bar(ax_plan, pr, t0, t1, kind, micro, chunk)
        ax_plan.set_yticks(range(record["pp"]), [f"pp {r}" for r in range(record["pp"])], fontsize=7)
        ax_plan.set_xlabel("units (a forward = 1, a backward = 2)", fontsize=8)
        ax_plan.set_title(f"{label}: the plan (simulated; blue F, orange B/I, green W)", fontsize=9)
        drawn[title] = [f"rank {r['rank']}" for r in rows]
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(out) if out else Path(folders[0]) / PNG
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path, drawn, notes


# ---------------------------------------------------------------------------
# 7. Progress on a terminal
# ---------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on rank 0's terminal (nothing when stderr is not a tty): step, loss,
    tokens/s and the time left (the steps left at the mean pace since the bar started)."""

    def __init__(self, total: int, enabled: bool, start: int = 0, tokens_per_step: int = 0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.start, self.tokens = total, start, tokens_per_step
        self.enabled, self.t0 = enabled and self.stream.isatty(), time.perf_counter()

    def line(self, step: int, loss: float, now: float | None = None) -> str:
        """'[#####.....] 120/500 loss 2.314 | 8,312 tok/s | 0:45 left'."""
        elapsed = (time.perf_counter() if now is None else now) - self.t0
        done = max(step - self.start, 1)
        left = elapsed / done * (self.total - step)
        filled = 30 * step // max(self.total, 1)
        rate = f" | {self.tokens * done / max(elapsed, 1e-9):,.0f} tok/s" if self.tokens else ""
        return (f"[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total} loss {loss:.3f}{rate} | "
                f"{int(left // 60)}:{int(left % 60):02d} left")

    def update(self, step: int, loss: float) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line(step, loss) + " ")
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
