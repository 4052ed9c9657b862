"""parallel.py section 10: pipeline schedules as data, replayed by the simulator.

The bubble of each schedule is a formula from its paper; here it is measured by replaying the action lists
with unit costs (a backward costs two forwards) and compared with the formula, for drawn p, m and v. The
lists themselves are checked as data: every microbatch chunk forwarded and backpropagated exactly once, in
an order the ranks can run without deadlock, holding at most the activations each schedule promises.
"""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import parallel as P

SCHEDULES = {
    "afab": lambda p, m, v: P.afab_schedule(p, m),
    "1f1b": lambda p, m, v: P.one_f_one_b_schedule(p, m),
    "interleaved": lambda p, m, v: P.interleaved_schedule(p, m, v),
    "zb": lambda p, m, v: P.zero_bubble_schedule(p, m),
}


def layouts(name):
    """(p, m, v) a schedule can take: interleaving needs m a multiple of p and v >= 2."""
    p = st.integers(1, 6)
    if name != "interleaved":
        return st.tuples(p, st.integers(1, 16), st.just(1))
    return p.flatmap(lambda p: st.tuples(st.just(p), st.integers(1, 4).map(lambda k: k * p), st.integers(2, 4)))


@pytest.mark.parametrize("name", SCHEDULES)
@given(data=st.data())
def test_every_microbatch_chunk_runs_forward_then_backward_once_per_rank(name, data):
    p, m, v = data.draw(layouts(name))
    for rank, actions in enumerate(SCHEDULES[name](p, m, v)):
        want = {(i, c) for i in range(m) for c in range(v)}
        forwards = [(a.micro, a.chunk) for a in actions if a.kind == "F"]
        backwards = [(a.micro, a.chunk) for a in actions if a.kind in ("B", "I")]
        assert sorted(forwards) == sorted(want) and sorted(backwards) == sorted(want), rank
        weights = [(a.micro, a.chunk) for a in actions if a.kind == "W"]
        assert sorted(weights) == (sorted(want) if name == "zb" else []), rank
        assert len(actions) == (3 if name == "zb" else 2) * m * v
        for i, a in enumerate(actions):
            before = [(b.kind, b.micro, b.chunk) for b in actions[:i]]
            if a.kind in ("B", "I"):
                assert ("F", a.micro, a.chunk) in before, (rank, a)
            if a.kind == "W":
                assert ("I", a.micro, a.chunk) in before, (rank, a)


@pytest.mark.parametrize("name", ["afab", "1f1b"])
@given(p=st.integers(1, 8), m=st.integers(1, 24))
def test_the_bubble_is_p_minus_1_over_m(name, p, m):
    """AFAB and 1F1B idle (p - 1)(F + B) per rank against m (F + B) of work: bubble (p - 1)/m."""
    sim = P.simulate(SCHEDULES[name](p, m, 1))
    assert sim["bubble"] == pytest.approx((p - 1) / m)
    assert sim["makespan"] == pytest.approx(3 * (m + p - 1))
    assert all(b == pytest.approx(3 * m) for b in sim["busy"])


@given(data=st.data())
def test_interleaving_divides_the_bubble_by_v(data):
    p, m, v = data.draw(layouts("interleaved"))
    sim = P.simulate(P.interleaved_schedule(p, m, v), v)
    assert sim["bubble"] == pytest.approx((p - 1) / (v * m))
    assert sim["makespan"] == pytest.approx(3 * m + 3 * (p - 1) / v)


@given(p=st.integers(1, 8), m=st.integers(1, 24))
def test_peak_activations_in_flight(p, m):
    """AFAB holds all m microbatches on every rank; 1F1B at most p - r on rank r (never more than m), the
    same bubble for a fraction of the memory."""
    assert P.simulate(P.afab_schedule(p, m))["peak_in_flight"] == [m] * p
    assert P.simulate(P.one_f_one_b_schedule(p, m))["peak_in_flight"] == [min(p - r, m) for r in range(p)]


@given(data=st.data())
def test_interleaved_warmup_holds_megatrons_count(data):
    """Megatron's interleaved warmup: (p - r - 1)·2 + (v - 1)·p forwards, then one more in flight."""
    p, m, v = data.draw(layouts("interleaved"))
    peak = P.simulate(P.interleaved_schedule(p, m, v), v)["peak_in_flight"]
    assert peak == [min((p - r - 1) * 2 + (v - 1) * p + 1, m * v) for r in range(p)]


@given(p=st.integers(1, 8), m=st.integers(1, 24))
def test_zero_bubble_cuts_the_bubble_by_a_third_at_1f1bs_memory(p, m):
    """ZB-H1: only the input-gradient half of a backward is on the critical path; the weight halves fill
    the waits. Idle per rank (p - 1)(F + B - W) = 2(p - 1) against 1F1B's 3(p - 1), with the same peak
    activations per rank (p - r)."""
    zb, one = P.simulate(P.zero_bubble_schedule(p, m)), P.simulate(P.one_f_one_b_schedule(p, m))
    assert zb["bubble"] == pytest.approx(2 * (p - 1) / (3 * m))
    assert zb["bubble"] <= one["bubble"] and (p == 1 or zb["bubble"] < one["bubble"])
    assert zb["peak_in_flight"] == one["peak_in_flight"] == [min(p - r, m) for r in range(p)]


def test_a_schedule_that_cannot_run_is_refused():
    """Rank 1 (the last stage) backpropagates microbatch 1 before it has it: every rank waits forever."""
    bad = [[P.Action("F", 0), P.Action("F", 1), P.Action("B", 0), P.Action("B", 1)],
           [P.Action("B", 1), P.Action("F", 0), P.Action("F", 1), P.Action("B", 0)]]
    with pytest.raises(ValueError, match="deadlocks"):
        P.simulate(bad)


def test_interleaving_needs_microbatches_a_multiple_of_p():
    with pytest.raises(ValueError, match=re.escape("microbatches % pp == 0, got microbatches=6, pp=4")):
        P.interleaved_schedule(4, 6, 2)


def test_the_picture_is_the_simulation():
    """One row per rank, one column per 1/v unit of time; the idle cells are the bubble."""
    for schedules, v in ((P.one_f_one_b_schedule(4, 8), 1), (P.interleaved_schedule(2, 4, 2), 2)):
        text = P.format_schedule(schedules, v)
        rows = [line.split("|", 1)[1] for line in text.splitlines() if line.startswith("rank ")]
        sim = P.simulate(schedules, v)
        assert len(rows) == len(schedules)
        for r, row in enumerate(rows):
            cells = [row[i: i + 3].strip() for i in range(0, len(row), 3)]
            assert len(cells) == round(sim["makespan"] * v)
            assert cells.count(".") == pytest.approx((sim["makespan"] - sim["busy"][r]) * v), (r, row)
        assert f"bubble {sim['bubble']:.3f}" in text
    # by hand: rank 0 forwards 0 and 1, then waits for rank 1's backward of 0 (done at t = 4), and of 1 (t = 7)
    assert P.format_schedule(P.one_f_one_b_schedule(2, 2)).splitlines()[:2] == [
        "rank 0 |0  1  .  .  a  a  .  b  b",
        "rank 1 |.  0  a  a  1  b  b  .  ."]
