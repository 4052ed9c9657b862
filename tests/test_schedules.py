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


# ---------------------------------------------------------------------------------------------------
# Order, not tags: what each rank posts (parallel.p2p_plans), checked under NCCL's rules
# ---------------------------------------------------------------------------------------------------


def nccl_layouts(name):
    """(p, m, v) for the NCCL-order checks: p in 2..8, m in 1..16, v in 1..4 (interleaved: m a multiple of p)."""
    p = st.integers(2, 8)
    if name != "interleaved":
        return st.tuples(p, st.integers(1, 16), st.just(1))
    return p.flatmap(lambda p: st.tuples(st.just(p), st.integers(1, 16 // p).map(lambda k: k * p), st.integers(2, 4)))


def posts(plan):
    """A rank's plan flattened: [(slot, group index, Post)], in posting order."""
    return [(slot, g, post) for slot, groups in enumerate(plan) for g, group in enumerate(groups) for post in group]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("forward_only", [False, True], ids=["training", "eval"])
@given(data=st.data())
def test_every_plan_pairs_each_transfer_in_order_and_cannot_deadlock(name, forward_only, data):
    """checked_schedule approves the plans the executor will post, and they are what the actions need: each
    action's input is received in the slot just before it, each output sent once, after the action made it,
    to the rank that holds the next (forward) or previous (backward) virtual stage."""
    p, m, v = data.draw(nccl_layouts(name))
    schedules, plans = P.checked_schedule(name, p, m, v, forward_only=forward_only)
    assert len(schedules) == len(plans) == p
    for r, (actions, plan) in enumerate(zip(schedules, plans)):
        assert len(plan) == len(actions) + 1
        sends = {post.msg: (slot, post.peer) for slot, _, post in posts(plan) if post.op == "send"}
        recvs = {post.msg: (slot, post.peer) for slot, _, post in posts(plan) if post.op == "recv"}
        assert len(sends) + len(recvs) == len(posts(plan))  # no message posted twice
        made, needed = {}, {}
        for i, a in enumerate(actions):
            vs, last = a.chunk * p + r, p * v - 1
            if a.kind == "F":
                if vs > 0:
                    needed[P.Message(a.micro, vs, False)] = (i, (vs - 1) % p)
                if vs < last:
                    made[P.Message(a.micro, vs + 1, False)] = (i, (vs + 1) % p)
            elif a.kind in ("B", "I"):
                if vs < last:
                    needed[P.Message(a.micro, vs, True)] = (i, (vs + 1) % p)
                if vs > 0:
                    made[P.Message(a.micro, vs - 1, True)] = (i, (vs - 1) % p)
        assert recvs == needed
        assert sends.keys() == made.keys()
        for msg, (slot, peer) in sends.items():
            assert slot > made[msg][0] and peer == made[msg][1], (msg, slot, made[msg])


def one_post_per_group(schedules, v=1):
    """The executor's old posting order: each action's receive in a group of its own just before it, its
    send in a group of its own just after (gloo buffers the send; NCCL may not)."""
    p, plans = len(schedules), []
    for r, actions in enumerate(schedules):
        plan = [[] for _ in range(len(actions) + 1)]
        for i, a in enumerate(actions):
            recv, send = P._transfers(a, r, p, v)
            plan[i] += [[recv]] if recv else []
            plan[i + 1] += [[send]] if send else []
        plans.append(plan)
    return plans


@pytest.mark.parametrize("name, p, m, v", [("1f1b", 2, 4, 1), ("zb", 4, 8, 1), ("interleaved", 2, 4, 2)])
def test_a_send_posted_before_the_receive_its_peer_waits_on_deadlocks(name, p, m, v):
    """Each send alone, posted before the next receive: in 1F1B's steady state stage r sends F's output while
    stage r + 1 sends B's input gradient, and each waits for the other to post its receive. Gloo buffered
    the sends, so this ran there; under NCCL it hangs, and the checker says so, naming the stuck posts."""
    schedules = P.schedule_for(name, p, m, v)
    with pytest.raises(ValueError, match=r"deadlock when a send waits for its receive: \{0: \[Post\(op='send'"):
        P.check_p2p_plans(one_post_per_group(schedules, v))
    P.check_p2p_plans(P.p2p_plans(schedules, v))  # the plans the executor posts


def test_two_ranks_that_both_send_first_deadlock_and_in_one_group_do_not():
    a_to_b, b_to_a = P.Message(0, 1, False), P.Message(0, 0, True)
    first = [[[P.Post("send", 1, a_to_b)], [P.Post("recv", 1, b_to_a)]]]
    second = [[[P.Post("send", 0, b_to_a)], [P.Post("recv", 0, a_to_b)]]]
    with pytest.raises(ValueError, match="deadlock"):
        P.check_p2p_plans([first, second])
    P.check_p2p_plans([[[sum(first[0], [])]], [[sum(second[0], [])]]])  # one batch each: both move
    P.check_p2p_plans([first, [[second[0][1], second[0][0]]]])  # or the peer receives first


@pytest.mark.parametrize("name", SCHEDULES)
@given(data=st.data())
def test_swapping_two_posts_to_one_peer_fails_the_checker(name, data):
    """Swap the messages of two sends (or two receives) one rank posts to the same peer: the k-th send no
    longer carries the k-th receive's message, so by order the peers would trade the wrong tensors."""
    p, m, v = data.draw(nccl_layouts(name))
    _, plans = P.checked_schedule(name, p, m, v)
    r = data.draw(st.integers(0, p - 1))
    flat = posts(plans[r])
    pairs = [(i, j) for i in range(len(flat)) for j in range(i + 1, len(flat))
             if flat[i][2].op == flat[j][2].op and flat[i][2].peer == flat[j][2].peer]
    if not pairs:
        return
    i, j = data.draw(st.sampled_from(pairs))
    (si, gi, a), (sj, gj, b) = flat[i], flat[j]
    mutated = [[list(map(list, groups)) for groups in plan] for plan in plans]
    mutated[r][si][gi][mutated[r][si][gi].index(a)] = b
    mutated[r][sj][gj][mutated[r][sj][gj].index(b)] = a
    with pytest.raises(ValueError, match="would trade the wrong tensors"):
        P.check_p2p_plans(mutated)


def test_a_message_nobody_receives_is_refused():
    lone = [[[P.Post("send", 1, P.Message(0, 1, False))]]]
    with pytest.raises(ValueError, match=r"pipeline ranks 0 -> 1: transfer 0 is sent as .* but received as nothing"):
        P.check_p2p_plans([lone, [[]]])
