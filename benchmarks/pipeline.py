"""Pipeline schedules: the simulated bubble beside each schedule's formula, and the activations held.

    python benchmarks/pipeline.py [--pp 2 4 8] [--microbatches 4 8 16 32] [--virtual 2 4]

For every (p, m, v) the per-rank action lists of parallel.py section 10 are replayed by
`parallel.simulate` with unit costs (forward 1, backward 2; zero-bubble's I and W 1 each) and free
communication, and the measured bubble (idle / busy time of the busiest-idle rank) is printed beside:

    AFAB (GPipe), 1F1B          (p - 1) / m
    interleaved 1F1B, v chunks  (p - 1) / (v·m)        (m a multiple of p)
    zero-bubble ZB-H1           2 (p - 1) / (3 m)      idle (p - 1)(F + B - W) against m (F + B)

and the peak number of microbatch chunks whose activations rank 0 holds at once (AFAB m, 1F1B and
ZB-H1 p, interleaved (p - 1)·2 + (v - 1)·p + 1), in units of one microbatch's activations of one
chunk. This is a model of the schedules, not a timing: the executor that runs them on stages comes next.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parallel as P  # noqa: E402


def rows(pp, microbatches, virtual):
    for p in pp:
        for m in microbatches:
            cases = [("afab", P.afab_schedule(p, m), 1, (p - 1) / m),
                     ("1f1b", P.one_f_one_b_schedule(p, m), 1, (p - 1) / m),
                     ("zb-h1", P.zero_bubble_schedule(p, m), 1, 2 * (p - 1) / (3 * m))]
            cases += [(f"interleaved v={v}", P.interleaved_schedule(p, m, v), v, (p - 1) / (v * m))
                      for v in virtual if m % p == 0]
            for name, schedules, v, formula in cases:
                sim = P.simulate(schedules, v)
                yield p, m, name, sim["bubble"], formula, sim["peak_in_flight"][0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--virtual", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args(argv)
    print(f"{'p':>3} {'m':>4}  {'schedule':<17} {'bubble':>8} {'formula':>8}  {'rank 0 holds':>12}")
    for p, m, name, bubble, formula, held in rows(args.pp, args.microbatches, args.virtual):
        print(f"{p:>3} {m:>4}  {name:<17} {bubble:>8.4f} {formula:>8.4f}  {held:>12}")


if __name__ == "__main__":
    main()
