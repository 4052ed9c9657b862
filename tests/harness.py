"""A pool of gloo worker processes that lives for the whole test session.

Spawning a process and importing torch takes seconds; a hypothesis example
should take milliseconds. So `WorkerPool` starts `world` processes once, each
joins one gloo process group, and then runs task after task:

    pool.run(fn, *args, tp=2)  ->  [fn(mesh, *args) on rank 0, ..., rank world-1]

`fn` must be a module-level function (it is pickled by reference). Every rank
runs it with a `parallel.Mesh` of the asked layout (dp fills the world; `ep=` carves expert parallelism out of dp), so a
layout with tp < world runs world/tp replicas of the same inputs. They are
identical but for dropout: a replica's masks are those of its rows of the
global batch (rows dp_rank·b onwards), so with dropout on only the first
replica, ranks [0, tp), equals the serial run on these inputs; tests that
draw dropout compare `pool.run(...)[:tp]`.

A worker that raises fails the test with its traceback; a worker that dies,
or ranks left waiting on one that failed, get the whole pool killed and
restarted for the next test, so the suite never hangs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from datetime import timedelta


def _worker_main(rank, world, init_file, sys_path, tasks, results):
    sys.path[:] = sys_path
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    import parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    meshes = {}
    while (task := tasks.get()) is not None:
        task_id, fn, args, kwargs, layout = task
        try:
            if layout not in meshes:
                tp, pp, ep = layout
                meshes[layout] = parallel.Mesh.build(tp=tp, pp=pp, ep=ep)
            results.put((task_id, rank, True, fn(meshes[layout], *args, **kwargs)))
        except BaseException:
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerError(AssertionError):
    """A worker raised, died or hung; the message holds its traceback."""


class WorkerPool:
    def __init__(self, world: int = 4, timeout: float = 120.0, grace: float = 5.0):
        self.world, self.timeout, self.grace = world, timeout, grace
        self.procs: list = []
        self._task_id = 0

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        init_file = os.path.join(tempfile.mkdtemp(prefix="nanomeg-gloo-"), "store")
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker_main, daemon=True,
                        args=(r, self.world, init_file, list(sys.path), self.tasks[r], self.results))
            for r in range(self.world)
        ]
        for p in self.procs:
            p.start()

    def stop(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.procs = []

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        self.procs = []

    def run(self, fn, *args, tp: int = 1, pp: int = 1, ep: int = 1, **kwargs) -> list:
        """Run fn(mesh, *args, **kwargs) on every rank; return the per-rank results.
        ep: expert parallelism, carved out of the data-parallel ranks (world / (tp·pp))."""
        if self.world % (tp * pp) or (self.world // (tp * pp)) % ep:
            raise ValueError(f"tp*pp = {tp}*{pp} (and ep={ep} of the dp ranks) does not fit the pool's world size "
                             f"{self.world}")
        if not self.procs:
            self.start()
        self._task_id += 1
        for q in self.tasks:
            q.put((self._task_id, fn, args, kwargs, (tp, pp, ep)))
        done, errors = {}, {}
        deadline = time.monotonic() + self.timeout
        while len(done) + len(errors) < self.world:
            if errors:  # the others may be stuck in a collective with the failed rank
                deadline = min(deadline, time.monotonic() + self.grace)
            try:
                task_id, rank, ok, value = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = {r: p.exitcode for r, p in enumerate(self.procs) if not p.is_alive()}
                if dead or time.monotonic() > deadline:
                    waiting = sorted(set(range(self.world)) - set(done) - set(errors))
                    self.kill()
                    why = (f"worker(s) died (rank: exit code {dead})" if dead
                           else f"ranks {waiting} did not finish in time")
                    raise WorkerError(f"{why}; pool restarted\n" + "\n".join(errors.values())) from None
                continue
            if task_id == self._task_id:
                (done if ok else errors)[rank] = value
        if errors:
            raise WorkerError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
        return [done[r] for r in range(self.world)]


def value_errors_then_in_step(cases, mesh, dims=("tp",)) -> list:
    """Run each zero-argument case on this rank; collect str(ValueError) (None
    when a case did not raise), then one all-reduce over each mesh dim of
    `dims`: it returns only if every rank is still in step, i.e. no case left
    a rank inside a collective."""
    import torch

    import parallel

    messages = []
    for case in cases:
        try:
            case()
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    messages += [parallel.all_reduce(torch.ones(1), mesh, dim).item() for dim in dims]
    return messages
