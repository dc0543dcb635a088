"""PairSynchronizer: against a brute-force oracle on random streams, and each rule on its own."""

import dataclasses
import math
import random

from hypothesis import assume, given, settings, strategies as st
import pytest

from s4fusion_ros.sync import (INTERVAL_MARGIN, INTERVAL_WINDOW, ArrivalClock, Pair,
                               PairSynchronizer, StampLead, StampSkew, SyncStats)

MS = 1_000_000
S = 1_000_000_000


def check_counts(stats: SyncStats) -> None:
    """Check the documented invariant: each message is counted exactly once per topic."""
    for topic in ('thermal', 'visible'):
        parts = [stats.pairs] + [getattr(stats, f'{topic}_{name}') for name in
                                 ('unpaired', 'late', 'overflow', 'bad_stamp', 'pending')]
        assert getattr(stats, f'{topic}_received') == sum(parts), (topic, stats)


def oracle(thermal: list[int], visible: list[int], slop: int, thermal_offset: int = 0,
           visible_offset: int = 0) -> list[tuple[int, int]]:
    """Pair greedily in thermal stamp order.

    Each thermal frame takes the nearest unused visible within slop that is newer than the last
    paired one; ties go to the earlier. A visible frame after it goes to the next thermal frame
    instead (the earlier candidate, if any, to this one) where that one is strictly nearer to it
    and not farther from it than from the visible frame after it, unless twice its distance is
    within INTERVAL_MARGIN of the shortest interval of this thermal frame and the
    INTERVAL_WINDOW before it.
    """
    thermal, visible = sorted(thermal), sorted(visible)
    pairs, last = [], None
    for index, t in enumerate(thermal):
        tk = t + thermal_offset
        candidates = [v for v in visible if abs(v + visible_offset - tk) <= slop
                      and (last is None or v > last)]
        if not candidates:
            continue
        best = min(candidates, key=lambda v: (abs(v + visible_offset - tk), v))
        recent = thermal[max(0, index - INTERVAL_WINDOW):index + 1]
        shortest = min((b - a for a, b in zip(recent, recent[1:])), default=math.inf)
        target = best + visible_offset
        if (target > tk and 2 * (target - tk) > INTERVAL_MARGIN * shortest
                and index + 1 < len(thermal)):
            following = thermal[index + 1] + thermal_offset
            after = [v + visible_offset for v in visible if v > best]
            if (abs(target - following) < target - tk
                    and (not after or abs(target - following) <= abs(after[0] - following))):
                earlier = [v for v in candidates if v + visible_offset <= tk]
                if not earlier:
                    continue
                best = max(earlier)
        pairs.append((t, best))
        last = best
    return pairs


def stamps(rng: random.Random, start: int, end: int, rate: float, jitter: int, drop: float,
           gap: bool = False) -> list[int]:
    """Make camera stamps at ``rate`` Hz with jitter, dropped frames and maybe an FFC pause."""
    period = round(S / rate)
    out, t = [], start
    gap_at = rng.randrange(start, end) if gap else None
    while t < end:
        if gap_at is not None and t >= gap_at:
            t += rng.randrange(200, 500) * MS
            gap_at = None
        if rng.random() >= drop:
            out.append(t + rng.randint(-jitter, jitter))
        t += period
    return out


def arrivals(rng: random.Random, topic_stamps: list[int], base: int, spread: int) -> list[int]:
    """Draw arrival times: stamp + a random transport delay, strictly in order per topic."""
    out, last = [], 0
    for stamp in topic_stamps:
        last = max(last + 1, stamp + base + rng.randint(0, spread))
        out.append(last)
    return out


def camera_streams(rng: random.Random, latency_ms: int, thermal_rate: float = 8.7
                   ) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
    """Thermal ~9 Hz (or `thermal_rate`) with host-stamp latency, RGB ~30 Hz, jitter, drops, an
    FFC pause, random transport delays between the topics: (thermal stamps, visible stamps,
    (arrival, topic, stamp) events in arrival order)."""
    start = 1_700_000_000 * S + rng.randrange(S)
    end = start + rng.randint(2, 5) * S
    # 1 ms resolution makes equal distances (ties) common.
    thermal = [s // MS * MS for s in stamps(rng, start, end, thermal_rate, 6 * MS,
                                            rng.random() * 0.2, gap=True)]
    visible = [s // MS * MS for s in stamps(rng, start, end, 30.0, 3 * MS,
                                            rng.random() * 0.2)]
    thermal = sorted(set(t + latency_ms * MS for t in thermal))  # stamped on host receipt
    visible = sorted(set(visible))
    events = [(a, 0, t) for a, t in zip(arrivals(rng, thermal, rng.randint(0, 150) * MS,
                                                 rng.randint(0, 150) * MS), thermal)]
    events += [(a, 1, v) for a, v in zip(arrivals(rng, visible, rng.randint(0, 150) * MS,
                                                  rng.randint(0, 150) * MS), visible)]
    events.sort(key=lambda event: (event[0], rng.random()))
    return thermal, visible, events


@settings(max_examples=100, deadline=None)
@given(rng=st.randoms(use_true_random=False), slop_ms=st.integers(0, 150),
       latency_ms=st.integers(0, 80), use_expire=st.booleans(),
       thermal_rate=st.sampled_from([8.7, 8.7, 30.0, 60.0]))
def test_random_streams_match_oracle(rng, slop_ms, latency_ms, use_expire, thermal_rate):
    """Give the offline greedy's pairs on realistic streams: a ~9 Hz thermal core, or one as
    fast as the RGB camera or faster, where a frame may leave its nearest to the next."""
    thermal, visible, events = camera_streams(rng, latency_ms, thermal_rate)
    sync = PairSynchronizer(slop_ms / 1000, queue_size=10_000, thermal_offset=-latency_ms / 1000,
                            timeout=0.5)
    got = []
    for arrival, topic, stamp in events:
        if use_expire:
            got += sync.expire(arrival)
        add = sync.add_visible if topic else sync.add_thermal
        got += add(stamp, ('payload', stamp))
        check_counts(sync.stats)
    got += sync.flush()

    assert [(p.thermal_stamp, p.visible_stamp) for p in got] == oracle(
        thermal, visible, slop_ms * MS, thermal_offset=-latency_ms * MS)
    assert all(p.thermal == ('payload', p.thermal_stamp) and p.visible == ('payload',
               p.visible_stamp) for p in got)
    stats = sync.stats
    check_counts(stats)
    assert stats.thermal_pending == stats.visible_pending == 0
    assert stats.thermal_received == len(thermal) and stats.visible_received == len(visible)
    assert stats.thermal_late + stats.visible_late + stats.thermal_overflow == 0


# (sync.clock_jump, the smallest glitch drawn, ms): the default, and a lower threshold that
# catches smaller glitches (node.md).
@pytest.mark.parametrize('threshold, smallest_ms', [(1.0, 2_000), (0.3, 800)])
@settings(max_examples=100, deadline=None)
@given(rng=st.randoms(use_true_random=False), slop_ms=st.integers(0, 150),
       latency_ms=st.integers(0, 80), extra_ms=st.integers(0, 8_000), ahead=st.booleans(),
       glitched_topic=st.integers(0, 1), pick=st.integers(0, 10**6), use_expire=st.booleans())
def test_one_glitched_stamp_costs_only_its_own_frame(threshold, smallest_ms, rng, slop_ms,
                                                     latency_ms, extra_ms, ahead, glitched_topic,
                                                     pick, use_expire):
    """One frame's stamp glitched back or ahead of the frames around it (its arrival where it
    was) by more than the clock-jump threshold plus the longest silence of its topic (an FFC
    pause, dropped frames): no reset, and the offline greedy's pairs without that frame."""
    glitch_ms = (smallest_ms + extra_ms) * (1 if ahead else -1)
    thermal, visible, events = camera_streams(rng, latency_ms)
    indices = [k for k, event in enumerate(events) if event[1] == glitched_topic][1:-1]
    assume(indices)
    # A glitch into a silence longer than it (a pause, or frames dropped) is a real frame for
    # all the stamps tell.
    own = visible if glitched_topic else thermal
    assume(abs(glitch_ms) * MS > threshold * S + max(b - a for a, b in zip(own, own[1:])))
    index = indices[pick % len(indices)]  # neither its topic's first frame nor its last
    arrival, topic, stamp = events[index]
    events[index] = (arrival, topic, stamp + glitch_ms * MS)
    sync = PairSynchronizer(slop_ms / 1000, queue_size=10_000, thermal_offset=-latency_ms / 1000,
                            timeout=0.5, reset_threshold=threshold)
    # With expiry on the stamps' clock as the node keeps it: anchored on the frames taken, so
    # the glitched frame must not move it.
    got = play(sync, events) if use_expire else [
        pair for _, kind, when in events
        for pair in (sync.add_visible if kind else sync.add_thermal)(when, when)] + sync.flush()
    thermal, visible = ([t for t in thermal if (0, t) != (topic, stamp)],
                        [v for v in visible if (1, v) != (topic, stamp)])
    assert [(p.thermal_stamp, p.visible_stamp) for p in got] == oracle(
        thermal, visible, slop_ms * MS, thermal_offset=-latency_ms * MS)
    stats = sync.stats
    check_counts(stats)
    assert stats.resets == 0 and stats.thermal_late + stats.visible_late == 1


def test_a_glitched_stamp_does_not_anchor_expiry_as_another_topic_frame_is_confirmed():
    # Hypothesis found it (threshold 0.3 s): visible 933 ms glitched to 1799 arrives alone far
    # ahead while it decides thermal 822, itself alone above a silence: one frame confirmed, one
    # not, so the count of frames taken rose. Anchored on 1799, expiry pruned visible 900 before
    # thermal 935, its partner, arrived.
    base = 1_700_000_000 * S
    visible = [300, 333, 366, 400, 432, 466, 499, 533, 566, 600, 633, 666, 700, 766, 900, 966,
               1002, 1033]
    events = [(base + v * MS, 1, base + v * MS) for v in visible]
    events.append((base + 933 * MS, 1, base + 1799 * MS))
    events += [(base + (t + latency) * MS, 0, base + t * MS)
               for t, latency in ((271, 19), (386, 19), (822, 19), (935, 59), (1050, 19))]
    sync = PairSynchronizer(0.042, 10_000, thermal_offset=-0.042, timeout=0.5,
                            reset_threshold=0.3)
    got = [(p.thermal_stamp - base, p.visible_stamp - base) for p in play(sync, events)]
    assert (935 * MS, 900 * MS) in got
    assert got == [(t - base, v - base) for t, v in oracle(
        [base + t * MS for t in (271, 386, 822, 935, 1050)], [base + v * MS for v in visible],
        42 * MS, thermal_offset=-42 * MS)]
    assert sync.stats.visible_late == 1


def test_oracle_catches_a_first_within_slop_pairing():
    """The oracle itself: nearest, not first, within slop; ties go to the earlier stamp."""
    assert oracle([100], [80, 95, 104], slop=30) == [(100, 104)]
    assert oracle([100], [90, 110], slop=30) == [(100, 90)]
    assert oracle([100, 101], [100], slop=30) == [(100, 100)]


def test_takes_the_nearest_visible_not_the_first_within_slop():
    sync = PairSynchronizer(0.030, 10)
    assert sync.add_visible(80 * MS, 'a') == []
    assert sync.add_visible(95 * MS, 'b') == []
    assert sync.add_thermal(100 * MS, 't') == []  # a nearer frame may still come
    assert sync.add_visible(104 * MS, 'c') == [Pair(100 * MS, 104 * MS, 't', 'c')]
    stats = sync.stats
    assert (stats.pairs, stats.visible_unpaired, stats.visible_pending) == (1, 2, 0)
    check_counts(stats)


def test_tie_goes_to_the_earlier_visible():
    sync = PairSynchronizer(0.030, 10)
    sync.add_visible(90 * MS, 'early')
    sync.add_thermal(100 * MS, 't')
    assert sync.add_visible(110 * MS, 'late') == [Pair(100 * MS, 90 * MS, 't', 'early')]


def test_exact_stamp_pairs_at_once_and_slop_zero_means_exact_only():
    sync = PairSynchronizer(0.0, 10)
    sync.add_thermal(100 * MS, 't')
    assert sync.add_visible(100 * MS, 'v') == [Pair(100 * MS, 100 * MS, 't', 'v')]
    sync.add_thermal(200 * MS, 't2')
    assert sync.add_visible(201 * MS, 'v2') == []  # beyond slop: a second frame is awaited
    assert sync.add_visible(233 * MS, 'v3') == []
    assert sync.stats.thermal_unpaired == 1


def test_delayed_thermal_pairs_on_arrival():
    sync = PairSynchronizer(0.020, 10)
    for ms in (0, 33, 67, 100, 133):
        sync.add_visible(1000 * MS + ms * MS, ms)
    assert sync.add_thermal(1000 * MS + 70 * MS, 't') == [
        Pair(1070 * MS, 1067 * MS, 't', 67)]
    check_counts(sync.stats)


def test_each_visible_pairs_once_and_pairs_are_monotonic():
    sync = PairSynchronizer(0.050, 10)
    sync.add_thermal(100 * MS, 't1')
    sync.add_thermal(110 * MS, 't2')
    pairs = sync.add_visible(105 * MS, 'v')  # nearest to both: t1 takes it
    assert pairs == [Pair(100 * MS, 105 * MS, 't1', 'v')]
    assert sync.add_visible(170 * MS, 'w') == []  # t2 is 60 ms away: out of slop
    assert sync.add_visible(203 * MS, 'x') == []  # ... and the second frame beyond slop
    assert sync.stats.thermal_unpaired == 1


def test_one_dropped_visible_frame_at_equal_rates_costs_one_pair_not_a_shift():
    # Each thermal frame took the nearest visible frame still unused: after a drop, thermal
    # frame k took visible k + 1 (33 ms off, within slop), and so on, every later pair a frame
    # out of step.
    sync = PairSynchronizer(0.050, 30)
    period, got = 33 * MS, []
    for k in range(30):
        at_once = sync.add_thermal(S + k * period, k)
        if k != 10:
            at_once += sync.add_visible(S + k * period, k)
            assert k == 11 or at_once[-1:] == [Pair(S + k * period, S + k * period, k, k)]
        got += at_once
    got += sync.flush()
    assert [(pair.thermal, pair.visible) for pair in got] == [(k, k) for k in range(30)
                                                              if k != 10]
    stats = sync.stats
    assert (stats.thermal_unpaired, stats.visible_unpaired) == (1, 0)
    check_counts(stats)


def test_a_thermal_camera_twice_as_fast_pairs_each_visible_frame_with_its_own_instant():
    sync = PairSynchronizer(0.050, 30)
    got = []
    for k in range(40):
        got += sync.add_thermal(S + k * 16_667_000, k)
        if k % 2 == 0:
            got += sync.add_visible(S + k * 16_667_000, k)
    got += sync.flush()
    assert [(pair.thermal, pair.visible) for pair in got] == [(k, k) for k in range(0, 40, 2)]


def test_a_frame_waiting_for_the_next_is_decided_before_a_full_queue_drops_it():
    # The visible frame 46 ms after t1 could be the next thermal frame's (2 x 46 ms is beyond
    # INTERVAL_MARGIN of the 100 ms interval before t1); while t1 waited for it, the next frame
    # overflowed a queue of one and dropped t1 (and then its partner).
    sync = PairSynchronizer(0.050, queue_size=1)
    got = sync.add_thermal(S, 't0') + sync.add_visible(S, 'v0')
    got += sync.add_thermal(S + 100 * MS, 't1') + sync.add_visible(S + 146 * MS, 'v1')
    assert sync.stats.thermal_pending == 1  # t1 waits
    got += sync.add_thermal(S + 200 * MS, 't2') + sync.add_visible(S + 200 * MS, 'v2')
    got += sync.flush()
    assert [(pair.thermal, pair.visible) for pair in got] == [('t0', 'v0'), ('t1', 'v1'),
                                                              ('t2', 'v2')]
    assert sync.stats.thermal_overflow == sync.stats.visible_overflow == 0


@pytest.mark.parametrize('next_ms, after_ms', [(292, 350), (290, 330)],
                         ids=['sooner by jitter', 'a tie'])
def test_a_thermal_frame_leaves_its_nearest_to_a_next_one_nearer_to_it(next_ms, after_ms):
    # Thermal frames 100 ms apart: t200's nearest, v250, is beyond half of INTERVAL_MARGIN of
    # that interval, so the next thermal frame could be nearer to it, and is: 8 ms sooner than
    # the intervals before (stamp jitter), or as near to v250 as to the visible frame after
    # it (a tie goes to the earlier visible frame).
    sync = PairSynchronizer(0.1, 30)
    got = []
    for ms, visible_ms in ((0, 0), (100, 100), (200, 250), (next_ms, after_ms)):
        got += sync.add_thermal(S + ms * MS, ms) + sync.add_visible(S + visible_ms * MS,
                                                                    visible_ms)
    got += sync.flush()
    assert [(pair.thermal, pair.visible) for pair in got] == [(0, 0), (100, 100),
                                                              (next_ms, 250)]
    assert sync.stats.thermal_unpaired == 1


def test_expiry_waits_for_a_thermal_frame_that_could_still_come_nearer():
    # t300's nearest, v380, is 80 ms after it: a thermal frame up to 160 ms after t300 is
    # nearer to v380. At a cutoff 120 ms after t300, one may still come, and does.
    sync = PairSynchronizer(0.1, 30, timeout=0.5)
    got = []
    for ms, visible_ms in ((0, 0), (150, 150), (300, 380)):
        got += sync.add_thermal(S + ms * MS, ms) + sync.add_visible(S + visible_ms * MS,
                                                                    visible_ms)
    got += sync.expire(S + 420 * MS + 500 * MS)
    got += sync.add_thermal(S + 450 * MS, 450) + sync.add_visible(S + 530 * MS, 530)
    got += sync.flush()
    assert [(pair.thermal, pair.visible) for pair in got] == [(0, 0), (150, 150), (450, 380)]


def test_a_stamp_glitched_ahead_is_not_taken_for_the_next_frame():
    # 30 Hz cameras; t67's nearest, v87, is 20 ms after it: the next thermal frame decides.
    def pairs(events):
        sync = PairSynchronizer(0.050, 30)
        got = [pair for topic, ms in events for pair in
               (sync.add_visible if topic else sync.add_thermal)(S + ms * MS, ms)]
        return [(pair.thermal, pair.visible) for pair in got + sync.flush()]

    start = [(0, 0), (1, 0), (0, 33), (1, 33), (0, 67), (1, 87)]
    # The next thermal frame, glitched 5 s ahead, is not t100, which is nearer to v87.
    assert pairs(start + [(0, 5100), (0, 100), (1, 120)]) == [(0, 0), (33, 33), (100, 87)]
    # The visible frame after v87, glitched 5 s ahead, is not v105, which t100 is nearer to.
    assert pairs(start + [(0, 100), (1, 5105), (1, 105)]) == [(0, 0), (33, 33), (67, 87),
                                                              (100, 105)]


def test_a_next_thermal_frame_before_the_visible_one_settles_it_at_once():
    # The next thermal frame stamped before the visible frame takes it whatever visible frame
    # comes after: t0 waited for that one all the same.
    sync = PairSynchronizer(0.050, 30)
    sync.add_thermal(S - 16 * MS, 'earlier')  # a 16 ms interval (a 60 Hz core)
    sync.add_visible(S - 25 * MS, 'v-25')
    sync.add_thermal(S, 't0')
    sync.add_thermal(S + 16 * MS, 't16')
    got = sync.add_visible(S + 20 * MS, 'v20')
    assert [(pair.thermal, pair.visible) for pair in got] == [('earlier', 'v-25'),
                                                              ('t16', 'v20')]
    assert sync.stats.thermal_unpaired == 1 and sync.stats.thermal_pending == 0


def test_offsets_match_shifted_stamps_and_pairs_keep_originals():
    sync = PairSynchronizer(0.010, 10, thermal_offset=-0.060, visible_offset=0.002)
    sync.add_visible(98 * MS, 'v')
    sync.add_visible(131 * MS, 'w')
    assert sync.add_thermal(160 * MS, 't') == [Pair(160 * MS, 98 * MS, 't', 'v')]


def _aligned_pair_at_1300_ms() -> PairSynchronizer:
    """Slop 10 ms, offsets 0: thermal 1.30 s paired with visible 1.30 s (1.00-1.25 s unpaired)."""
    sync = PairSynchronizer(0.010, 30)
    sync.add_thermal(1300 * MS, 't1300')
    for stamp in range(1000, 1300, 50):
        assert sync.add_visible(stamp * MS, f'v{stamp}') == []
    assert sync.add_visible(1300 * MS, 'v1300') == [Pair(1300 * MS, 1300 * MS, 't1300', 'v1300')]
    return sync


def test_a_thermal_offset_set_while_running_pairs_the_frames_pending_on_it():
    # The thermal stamps now run 300 ms ahead; sync.thermal_offset -0.3 set while the frame of
    # exposure 1.35 s (stamped 1.65 s) waits pairs it with the visible frame of 1.35 s.
    sync = _aligned_pair_at_1300_ms()
    assert sync.add_thermal(1650 * MS, 't1650') == []
    for stamp in (1350, 1400):
        assert sync.add_visible(stamp * MS, f'v{stamp}') == []
    sync.thermal_offset = -0.3
    assert sync.thermal_offset == -0.3
    assert sync.add_visible(1450 * MS, 'v1450') == [Pair(1650 * MS, 1350 * MS, 't1650', 'v1350')]
    stats = sync.stats
    assert (stats.thermal_late, stats.thermal_unpaired, stats.pairs) == (0, 0, 2)
    check_counts(stats)


def test_a_thermal_offset_set_while_running_does_not_make_new_frames_late():
    # Thermal 1.45 s is 1.15 s on the new offset, before the 1.30 s decided on the old one: it
    # is new, not late (there is no visible frame of 1.15 s left: unpaired), and thermal 1.70 s
    # pairs with visible 1.40 s.
    sync = _aligned_pair_at_1300_ms()
    sync.thermal_offset = -0.3
    assert sync.add_thermal(1450 * MS, 't1450') == []
    for stamp in (1350, 1400):
        assert sync.add_visible(stamp * MS, f'v{stamp}') == []
    assert sync.add_thermal(1700 * MS, 't1700') == [Pair(1700 * MS, 1400 * MS, 't1700', 'v1400')]
    stats = sync.stats
    assert (stats.thermal_late, stats.thermal_unpaired, stats.pairs) == (0, 1, 2)
    check_counts(stats)


def test_zero_and_negative_stamps_are_rejected():
    sync = PairSynchronizer(0.010, 10)
    assert sync.add_thermal(0, 't') == [] and sync.add_visible(-5, 'v') == []
    stats = sync.stats
    assert (stats.thermal_bad_stamp, stats.visible_bad_stamp, stats.pairs) == (1, 1, 0)
    check_counts(stats)


def test_late_and_repeated_stamps_are_dropped_and_counted():
    sync = PairSynchronizer(0.020, 10)
    sync.add_thermal(100 * MS, 't')
    sync.add_visible(100 * MS, 'v')
    assert sync.add_thermal(90 * MS, 'old') == []  # older than the decided thermal frame
    assert sync.add_visible(95 * MS, 'old') == []  # older than the paired visible frame
    sync.add_thermal(200 * MS, 't2')
    sync.add_thermal(200 * MS, 'again')  # same stamp as a pending frame
    stats = sync.stats
    assert (stats.thermal_late, stats.visible_late, stats.thermal_pending) == (2, 1, 1)
    check_counts(stats)


def test_out_of_order_arrivals_that_can_still_pair_do():
    sync = PairSynchronizer(0.020, 10)
    sync.add_thermal(211 * MS, 't2')
    sync.add_thermal(100 * MS, 't1')  # t1 is not decided yet: it is not late
    sync.add_visible(99 * MS, 'v1')
    sync.add_visible(95 * MS, 'v0')  # swapped visible frames, both before t1 is decided
    pairs = sync.add_visible(120 * MS, 'v2')
    pairs += sync.add_visible(210 * MS, 'v3')
    pairs += sync.add_visible(240 * MS, 'v4')
    pairs += sync.add_visible(273 * MS, 'v5')
    assert [(p.thermal, p.visible) for p in pairs] == [('t1', 'v1'), ('t2', 'v3')]
    stats = sync.stats
    assert stats.thermal_late == stats.visible_late == 0 and stats.visible_unpaired == 2


def test_backwards_clock_jump_flushes_resets_and_pairs_again():
    """A looping bag: the same stream twice gives the same pairs twice and one reset."""
    thermal = [S + k * 111 * MS for k in range(20)]
    visible = [S + 5 * MS + k * 33 * MS for k in range(70)]
    events = sorted([(t, 0) for t in thermal] + [(v, 1) for v in visible])
    sync = PairSynchronizer(0.020, 10)
    got = []
    for _ in range(2):
        for stamp, topic in events:
            got += (sync.add_visible if topic else sync.add_thermal)(stamp, stamp)
    got += sync.flush()
    once = oracle(thermal, visible, 20 * MS)
    assert [(p.thermal_stamp, p.visible_stamp) for p in got] == once * 2
    stats = sync.stats
    assert stats.resets == 1 and stats.thermal_late == stats.visible_late == 0
    check_counts(stats)


def test_old_timeline_frame_in_flight_at_a_jump_is_not_a_second_reset():
    """A looping bag whose thermal topic jumps back first: the visible frame still in flight
    from the end of the first pass must not count as the start of a timeline of its own. It
    comes while the thermal jump is held, so it is buffered, then flushed by the reset."""
    thermal = [S + k * 111 * MS for k in range(20)]
    visible = [S + 5 * MS + k * 33 * MS for k in range(70)]
    events = sorted([(t, 0) for t in thermal] + [(v, 1) for v in visible])
    in_flight = events.pop(events.index((visible[-1], 1)))
    sync = PairSynchronizer(0.020, 10)
    got = []
    for stamp, topic in events + [events[0], in_flight] + events[1:]:
        got += (sync.add_visible if topic else sync.add_thermal)(stamp, stamp)
    got += sync.flush()
    once = oracle(thermal, visible[:-1], 20 * MS)
    assert [(p.thermal_stamp, p.visible_stamp) for p in got] == once * 2
    assert [p.timeline for p in got] == [0] * len(once) + [1] * len(once)
    stats = sync.stats
    assert stats.resets == 1 and stats.thermal_late == stats.visible_late == 0
    check_counts(stats)


def test_old_timeline_filter_ends_with_the_other_topics_first_new_frame():
    # The visible camera was silent long before the thermal clock jumped: its next frame, on
    # the new timeline though far above where the visible stamps stood, is not taken as stale.
    sync = PairSynchronizer(0.020, 10)
    sync.add_visible(50 * S, 'v-old')
    sync.add_thermal(100 * S, 't-old')
    sync.add_thermal(60 * S, 't')  # the jump: 40 s back, held until a frame bears it out
    assert sync.stats.thermal_unconfirmed == 1
    # Near it and as far behind where the thermal stamps stood: the jump is confirmed.
    assert sync.add_visible(60 * S + 5 * MS, 'v') == [Pair(60 * S, 60 * S + 5 * MS, 't', 'v', 1)]
    stats = sync.stats
    assert stats.resets == 1 and stats.visible_late == 0
    check_counts(stats)


@pytest.mark.parametrize('thermal_before', [None, 1])
def test_a_frame_far_above_where_either_topic_stood_is_of_the_new_timeline(thermal_before):
    # The visible stamps jump back from 2 s to 1 ns. A thermal frame at 2000 s cannot have been
    # in flight from the old timeline, which stood at 2 s (and at 1 ns for the thermal topic,
    # where it had a frame): it was taken as late, and its partner lost (found twice by
    # test_robustness's property test).
    sync = PairSynchronizer(0.05, 4)
    if thermal_before is not None:
        sync.add_thermal(thermal_before, 't-old')
    sync.add_visible(2 * S, 'v-old')
    sync.add_visible(1, 'v-back')
    sync.add_visible(2, 'v-back-again')  # borne out: a jump
    assert sync.stats.resets == 1
    assert sync.add_thermal(2000 * S, 't') == []
    assert sync.add_visible(2000 * S, 'v') == [Pair(2000 * S, 2000 * S, 't', 'v', 1)]
    stats = sync.stats
    assert stats.thermal_late == 0
    check_counts(stats)


def test_a_frame_in_flight_after_the_other_topic_paused_before_the_jump_is_no_new_timeline():
    # A looping bag whose thermal frames stop 0.6 s before the end of the pass: the visible frame
    # in flight stands far above where the thermal stamps stood, but continues its own topic's
    # stamps. Taken as the new timeline, it caused a second reset and lost the pair after it.
    sync = PairSynchronizer(0.05, 30)
    got = sync.add_thermal(100 * S, 't0') + sync.add_visible(100 * S, 'v0')
    got += sync.add_thermal(98_900 * MS, 't1')  # the loop: the thermal topic jumps first
    got += sync.add_visible(100_600 * MS, 'v-in-flight')
    got += sync.add_visible(98_900 * MS, 'v1')
    assert got == [Pair(100 * S, 100 * S, 't0', 'v0'),
                   Pair(98_900 * MS, 98_900 * MS, 't1', 'v1', 1)]
    stats = sync.stats
    assert (stats.resets, stats.visible_late, stats.visible_unpaired) == (1, 0, 1)
    check_counts(stats)


def test_a_frame_in_flight_at_a_jump_is_told_by_its_offset_stamp():
    # Thermal stamps 0.5 s behind (thermal_offset +0.5): the thermal frame in flight after the
    # visible jump is confirmed is ahead of the new timeline only once the offset is applied.
    # Compared raw, it counted as new: a second reset, and the next thermal frame paired with
    # the wrong one.
    sync = PairSynchronizer(0.05, 30, thermal_offset=0.5)
    got = []
    for topic, stamp_ms, name in ((1, 99_900, 'v0'), (0, 99_400, 't0'), (1, 100_000, 'v1'),
                                  (1, 98_950, 'v2'), (1, 98_983, 'v3'),
                                  (0, 99_500, 't-in-flight'), (0, 98_450, 't2'),
                                  (1, 99_016, 'v4')):
        got += (sync.add_visible if topic else sync.add_thermal)(stamp_ms * MS, name)
    assert [(p.thermal, p.visible) for p in got] == [('t0', 'v0'), ('t2', 'v2')]
    stats = sync.stats
    assert (stats.resets, stats.thermal_late) == (1, 1)
    check_counts(stats)


@pytest.mark.parametrize('expire', [False, True])
@pytest.mark.parametrize('repeated', [False, True])
def test_one_thermal_stamp_glitched_back_costs_only_its_own_pair(expire, repeated):
    # A single thermal frame stamped 2 s in the past is held, and the next thermal frame, back
    # on the timeline, shows it glitched: no reset (which cost the visible frame after it and
    # the thermal range), only its own pair lost. Sent twice by its driver, the copy is late:
    # it was taken for the next frame as far back, a jump.
    events = []
    for k in range(30):
        stamp = 10 * S + k * 100 * MS
        events += [(stamp + 20 * MS, 0, stamp - 2 * S if k == 10 else stamp),
                   (stamp + 30 * MS, 1, stamp)]
        if repeated and k == 10:
            events.append((stamp + 25 * MS, 0, stamp - 2 * S))
    sync = PairSynchronizer(0.010, 10, timeout=0.5)
    got = play(sync, events) if expire else [
        pair for _, topic, stamp in events
        for pair in (sync.add_visible if topic else sync.add_thermal)(stamp, stamp)]
    assert sorted(p.visible_stamp for p in got) == [10 * S + k * 100 * MS for k in range(30)
                                                    if k != 10]
    stats = sync.stats
    assert (stats.resets, stats.thermal_late, stats.visible_late) == (0, 1 + repeated, 0)
    check_counts(stats)


def test_a_short_bag_looped_jumps_back_at_each_pass():
    # A bag of 1.023 s looped: each pass jumps back little more than the threshold, so the next
    # frame of the topic is not that far back itself; nearer the held frame than the old
    # newest, it bears the jump out. Taken for a glitch, every later pass was late (10 pairs
    # of 28). The thermal stamps span 0.999 s: their own step back is under the threshold, so
    # each later pass's first thermal frame is late, as before.
    thermal = [100 * S + k * 111 * MS for k in range(10)]
    visible = [100 * S + k * 33 * MS for k in range(32)]
    events = sorted([(loop * 1100 * MS + stamp - 100 * S, 0, stamp)
                     for loop in range(3) for stamp in thermal]
                    + [(loop * 1100 * MS + stamp - 100 * S, 1, stamp)
                       for loop in range(3) for stamp in visible])
    sync = PairSynchronizer(0.020, 30)
    got = [pair for _, topic, stamp in events
           for pair in (sync.add_visible if topic else sync.add_thermal)(stamp, stamp)]
    got += sync.flush()
    again = oracle(thermal[1:], visible, 20 * MS)
    assert [(p.thermal_stamp, p.visible_stamp) for p in got] == oracle(
        thermal, visible, 20 * MS) + again * 2
    stats = sync.stats
    assert (stats.resets, stats.thermal_late, stats.visible_late) == (2, 2, 0)
    check_counts(stats)


def test_a_jump_back_waits_for_the_next_frame_however_long_it_takes():
    # The thermal stamps jump 5 s back; the next thermal frame is slow to come (dropped frames,
    # an FFC pause): no silence is long enough to tell a jump from a glitch, so the held frame
    # waits, and the expiry goes on deciding the old timeline's frames.
    sync = PairSynchronizer(0.010, 10, timeout=0.5)
    sync.add_thermal(10 * S, 't0')
    sync.add_thermal(10 * S + 111 * MS, 't1')
    sync.add_visible(10 * S, 'v0')
    sync.add_thermal(5 * S, 't-back')
    assert sync.expire(20 * S) == []
    stats = sync.stats
    assert (stats.resets, stats.thermal_unconfirmed, stats.thermal_unpaired) == (0, 1, 1)
    got = sync.add_thermal(5 * S + 111 * MS, 't')  # borne out: a jump
    got += sync.add_visible(5 * S + 5 * MS, 'v-back')
    assert got + sync.add_visible(5 * S + 116 * MS, 'v') == [
        Pair(5 * S, 5 * S + 5 * MS, 't-back', 'v-back', 1),
        Pair(5 * S + 111 * MS, 5 * S + 116 * MS, 't', 'v', 1)]
    check_counts(sync.stats)


def test_a_held_frame_at_the_end_of_the_stream_is_unpaired():
    sync = PairSynchronizer(0.010, 10)
    sync.add_visible(10 * S, 'v0')
    sync.add_visible(5 * S, 'v-back')
    assert sync.flush() == []
    stats = sync.stats
    assert (stats.visible_unpaired, stats.visible_pending, stats.resets) == (2, 0, 0)
    check_counts(stats)


def play(sync: PairSynchronizer, events: list[tuple[int, int, int]],
         flush: bool = True) -> list[Pair]:
    """Feed (arrival, topic, stamp) events (topic 0 thermal, 1 visible) as the node does: the
    expire timer every 50 ms, on the offset stamps' clock extrapolated from the arrival of the
    latest frame the synchronizer took since its last reset (FusionPipeline.expire); then flush,
    if asked."""
    got, wall, anchor = [], events[0][0], None
    for arrival, topic, stamp in sorted(events):
        while wall + 50 * MS < arrival:
            wall += 50 * MS
            if anchor is not None:
                got += sync.expire(anchor[0] + wall - anchor[1])
        resets = sync.stats.resets
        got += (sync.add_visible if topic else sync.add_thermal)(stamp, stamp)
        if sync.stats.resets != resets:
            anchor = None  # the old timeline's clock
        if sync.took_last:
            anchor = (sync.visible_key if topic else sync.thermal_key)(stamp), arrival
        check_counts(sync.stats)
    return got + sync.flush() if flush else got


def test_a_jump_just_past_the_threshold_keeps_late_frames_of_the_old_timeline_out():
    # Timeline B restarts 1.1 s below the end of A (threshold 1 s), and the thermal topic is
    # delivered 250 ms after the visible one: B's visible frames climb past A's last thermal
    # stamps while A's thermal frames are still in flight. Those must stay late, not restart the
    # expiry clock on A's time and so lose B's thermal frames.
    a, b = 100 * S, 100 * S + 400 * MS
    events = []
    for start, wall, frames in ((a, 0, 15), (b, 1500 * MS, 30)):
        events += [(wall + k * 100 * MS + 250 * MS, 0, start + k * 100 * MS)
                   for k in range(frames)]
        events += [(wall + k * 25 * MS, 1, start + k * 25 * MS) for k in range(4 * frames)]
    sync = PairSynchronizer(0.020, 100, timeout=0.5)
    got = play(sync, events)
    # A's last two thermal frames arrive after the jump, their partners flushed: late. Every
    # thermal frame of B pairs.
    assert [(p.thermal_stamp - b) // MS for p in got[13:]] == [k * 100 for k in range(30)]
    assert sync.stats.thermal_late == 2 and sync.stats.resets == 1


def looped(thermal: list[int], visible: list[int], length: int, thermal_lag: int = 0,
           visible_lag: int = 0) -> list[tuple[int, int, int]]:
    """(arrival, topic, stamp) events of a bag of ``length`` ns played twice in a loop, each topic
    delivered its lag after its stamps."""
    return [(loop * length + stamp + lag, topic, stamp) for loop in range(2)
            for topic, stamps, lag in ((0, thermal, thermal_lag), (1, visible, visible_lag))
            for stamp in stamps]


def test_frames_delivered_up_to_the_timeout_late_are_in_flight_at_a_jump():
    # A 2 s bag looped, sync.clock_jump lowered to 0.3 s, the visible topic delivered 0.6 s
    # after the thermal one (within sync.timeout 1 s): when the thermal jump back is borne out,
    # the first pass's visible frames still in flight reach more than the threshold above the
    # newest visible stamp. Counted in flight only within the threshold, those beyond it started
    # a timeline of their own: a second reset, and the second pass lost every pair.
    thermal = [100 * S + k * 111 * MS for k in range(18)]
    visible = [100 * S + 5 * MS + k * 33 * MS for k in range(60)]
    sync = PairSynchronizer(0.020, 30, timeout=1.0, reset_threshold=0.3)
    got = play(sync, looped(thermal, visible, 2 * S, visible_lag=600 * MS))
    once = oracle(thermal, visible, 20 * MS)
    first = [(p.thermal_stamp, p.visible_stamp) for p in got if p.timeline == 0]
    # The first pass's last 4 pairs lose their visible frames, still in flight, to the reset.
    assert first == once[:-4]
    assert [(p.thermal_stamp, p.visible_stamp) for p in got if p.timeline == 1] == once
    assert sync.stats.resets == 1


def test_a_new_timeline_frame_up_to_the_timeout_ahead_of_the_other_topic_is_taken():
    # A 2 s bag looped whose visible frames stop 0.8 s into it (the camera dropped out), the
    # thermal topic delivered 0.2 s after the visible one (within sync.timeout): the thermal
    # topic jumps back first, and the second pass's visible frames, near where the visible
    # stamps stood, run up to 0.2 s ahead of the newest thermal frame. Taken for frames in flight
    # from the first pass when more than slop ahead, they were late and their pairs lost.
    thermal = [100 * S + k * 111 * MS for k in range(18)]
    visible = [100 * S + 400 * MS + k * 33 * MS for k in range(13)]
    sync = PairSynchronizer(0.020, 30, timeout=0.5)
    got = play(sync, looped(thermal, visible, 2 * S, thermal_lag=200 * MS))
    once = oracle(thermal, visible, 20 * MS)
    assert [(p.thermal_stamp, p.visible_stamp, p.timeline) for p in got] == (
        [(*pair, 0) for pair in once] + [(*pair, 1) for pair in once])
    stats = sync.stats
    assert (stats.resets, stats.visible_late) == (1, 0)


@pytest.mark.parametrize('topic, index, ahead_ms, late', [
    (1, 30, 900, 0),  # under the reset threshold: the expiry clock must not stay on it
    (1, 31, 1035, 1),  # past it: the next frame, back, shows the glitch
    (0, 8, 1115, 1)])
def test_one_stamp_glitched_forward_costs_at_most_the_pairs_around_it(topic, index, ahead_ms,
                                                                      late):
    # Thermal arrives 30 ms after visible. Neither the expiry clock nor the clock-jump detection
    # may hold on to the glitch: a frame standing alone more than the threshold ahead of its
    # topic, followed by one back on the timeline, glitched; it is dropped, nothing is reset.
    events = [(100 * S + k * 111 * MS + 30 * MS, 0, 100 * S + k * 111 * MS) for k in range(30)]
    events += [(100 * S + 5 * MS + k * 33 * MS, 1, 100 * S + 5 * MS + k * 33 * MS)
               for k in range(100)]
    arrival, _, stamp = events[index if topic == 0 else 30 + index]
    events[index if topic == 0 else 30 + index] = (arrival, topic, stamp + ahead_ms * MS)
    sync = PairSynchronizer(0.020, 30, timeout=0.5)
    assert len(play(sync, events)) >= 29
    stats = sync.stats
    assert stats.resets == 0 and stats.thermal_late + stats.visible_late == late


@pytest.mark.parametrize('slop_ms, visible_ms, glitched_ms, pairs', [
    (57, 1666, 1308, [(1609, 1666)]),  # between: the visible frame bears out the one above
    (0, 1600, 1139, [])])  # before the frame under the gap: not the next in order
def test_a_frame_above_a_gap_is_no_glitch_when_the_next_one_is_glitched_back(
        slop_ms, visible_ms, glitched_ms, pairs):
    # Two cases hypothesis found: thermal frames with a gap (dropped frames) over the threshold
    # (0.3 s) under the one stamped 1609 ms, then a frame stamped back (its real time 2620 ms).
    # The one at 1609 stood alone above the threshold and was taken for a glitch ahead: dropped
    # with the glitched one (and its pair with it).
    sync = PairSynchronizer(slop_ms / 1000, 100, timeout=0.5, reset_threshold=0.3)
    got = [pair for stamp in (0, 229, 459, 574, 689, 804, 1034, 1264)
           for pair in sync.add_thermal(stamp * MS, stamp)]
    for add, stamp in sorted([(sync.add_visible, visible_ms), (sync.add_thermal, 1609)],
                             key=lambda event: event[1]) + [(sync.add_thermal, glitched_ms)]:
        got += add(stamp * MS, stamp)
    for stamp in (2735, 2850, 2965, 3310):
        got += sync.add_thermal(stamp * MS, stamp)
    got += sync.flush()
    assert [(pair.thermal, pair.visible) for pair in got] == pairs
    assert sync.stats.thermal_late == 1 and sync.stats.resets == 0


def test_a_stamp_glitched_ahead_and_repeated_is_still_unconfirmed():
    # A driver that sends the glitched frame twice: the repeat is late and bears out nothing.
    sync = PairSynchronizer(0.020, 10)
    for ms in (0, 33, 67):
        sync.add_visible(S + ms * MS, ms)
    for _ in range(2):
        sync.add_visible(6 * S, 'glitched')
    stats = sync.stats
    assert stats.visible_unconfirmed == 1 and stats.visible_late == 1
    sync.add_visible(S + 100 * MS, 100)  # the next frame in order: the glitch is late
    stats = sync.stats
    assert (stats.visible_unconfirmed, stats.visible_late, stats.resets) == (0, 2, 0)


def test_a_thermal_frame_as_late_bears_out_a_lone_visible_frame_ahead():
    # t1 has no partner; the one visible frame after it is far ahead, but t2 comes with it: no
    # glitch, so both are decided without waiting for another visible frame.
    sync = PairSynchronizer(0.020, 10)
    assert sync.add_thermal(100 * MS, 't1') == []
    assert sync.add_visible(500 * MS, 'v') == []  # alone and far ahead: it could be a glitch
    assert sync.add_thermal(500 * MS, 't2') == [Pair(500 * MS, 500 * MS, 't2', 'v')]
    assert sync.stats.thermal_unpaired == 1
    # As late as the visible frame's slop is late enough: t1 is decided without a partner.
    sync = PairSynchronizer(0.050, 10)
    sync.add_thermal(S, 't1')
    sync.add_thermal(S + 100 * MS, 't2')
    sync.add_visible(S + 150 * MS, 'v')
    assert sync.stats.thermal_unpaired == 1


@pytest.mark.parametrize('expire', [False, True])
def test_one_visible_stamp_glitched_ahead_costs_no_other_pair(expire):
    # Visible arrives 40 ms after thermal; one visible frame is stamped 0.9 s ahead (under the
    # reset threshold). Deciding the thermal frames it overtook on it would lose their partners,
    # still to come (8 of 30 pairs, before).
    def events(glitch):
        thermal = [(100 * S + k * 111 * MS, 0, 100 * S + k * 111 * MS) for k in range(30)]
        visible = [(100 * S + 45 * MS + k * 33 * MS, 1, 100 * S + 5 * MS + k * 33 * MS)
                   for k in range(100)]
        if glitch:
            arrival, _, stamp = visible[10]
            visible[10] = arrival, 1, stamp + 900 * MS
        return thermal + visible

    def pairs(glitch):
        sync = PairSynchronizer(0.020, 30, timeout=0.5)
        got = play(sync, events(glitch)) if expire else [
            pair for arrival, topic, stamp in sorted(events(glitch))
            for pair in (sync.add_visible if topic else sync.add_thermal)(stamp, stamp)]
        return {p.thermal_stamp for p in got}, sync.stats

    clean, _ = pairs(False)
    glitched, stats = pairs(True)
    # Only the glitched frame's own thermal partner is lost (the glitch may still take the
    # place of the real partner of the thermal frame it lands beside: stamps cannot tell).
    assert len(clean) == 30 and clean - glitched == {100 * S + 3 * 111 * MS}
    assert stats.resets == 0
    check_counts(stats)


def test_a_repeated_stamp_does_not_hold_off_the_expiry_clock():
    # A thermal frame, a visible frame 10 ms before it, then the visible driver republishing that
    # frame (same stamp, late) every 33 ms: the thermal frame is still decided by the timeout.
    events = [(0, 0, 100 * S)] + [(10 * MS + k * 33 * MS, 1, 100 * S - 10 * MS)
                                  for k in range(90)]
    sync = PairSynchronizer(0.020, 30, timeout=0.5)
    assert play(sync, events, flush=False) == [Pair(100 * S, 100 * S - 10 * MS, 100 * S,
                                                    100 * S - 10 * MS)]
    assert sync.stats.visible_late == 89


def test_pause_of_both_topics_keeps_nearest_pairing_after_it():
    """A bag paused mid-play: ``expire`` runs on the stamps' clock extrapolated from the latest
    arrival (as FusionPipeline does), so it runs on past the stamps during the pause. After
    the pause every thermal frame still takes its nearest visible frame."""
    thermal = [S + k * 111 * MS for k in range(60)]
    visible = [S + 5 * MS + k * 33 * MS for k in range(200)]
    pause_after, pause = S + 2 * S, 3 * S
    events = [(stamp - S + (pause if stamp > pause_after else 0), topic, stamp)
              for stamp, topic in [(t, 0) for t in thermal] + [(v, 1) for v in visible]]
    sync = PairSynchronizer(0.020, 100, timeout=0.5)
    got = play(sync, events)
    after = [(p.thermal_stamp, p.visible_stamp) for p in got if p.thermal_stamp > pause_after]
    expected = oracle([t for t in thermal if t > pause_after],
                      [v for v in visible if v > pause_after], 20 * MS)
    assert after == expected and len(after) == 41
    check_counts(sync.stats)


def test_small_backwards_step_is_late_not_a_reset():
    sync = PairSynchronizer(0.020, 10, reset_threshold=1.0)
    sync.add_thermal(5 * S, 't')
    sync.add_visible(5 * S, 'v')
    sync.add_thermal(5 * S - 500 * MS, 'old')
    assert sync.stats.resets == 0 and sync.stats.thermal_late == 1
    sync.add_thermal(3 * S, 'restart')  # held: a jump, or a glitched stamp
    stats = sync.stats
    assert stats.resets == 0 and stats.thermal_unconfirmed == stats.thermal_pending == 1
    sync.add_thermal(3 * S + 111 * MS, 'restart-2')  # its topic carries on from it: a jump
    assert sync.stats.resets == 1 and sync.stats.thermal_pending == 2


def test_a_frame_near_a_held_one_but_not_as_far_back_confirms_no_jump():
    # 'held' is 1.5 s behind the thermal frames; a visible frame 0.7 s after it is only 0.8 s
    # behind them (a late one): no timeline of its own, so no jump back.
    sync = PairSynchronizer(0.020, 10, reset_threshold=1.0)
    for ms in (9_900, 10_000):
        sync.add_thermal(ms * MS, ms)
        sync.add_visible(ms * MS, ms)
    sync.add_thermal(8_500 * MS, 'held')
    sync.add_visible(9_200 * MS, 'late')
    stats = sync.stats
    assert stats.resets == 0 and stats.thermal_unconfirmed == 1 and stats.visible_late == 1


def test_queue_overflow_drops_the_oldest():
    sync = PairSynchronizer(0.010, 3)
    for k in range(5):
        sync.add_thermal(S + k * 100 * MS, k)
    for k in range(5):
        sync.add_visible(S + 10 * S + k * 33 * MS, k)  # far later: no thermal frame decides
    stats = sync.stats
    assert (stats.thermal_overflow, stats.thermal_pending) == (2, 0)
    assert stats.thermal_unpaired == 3
    assert (stats.visible_overflow, stats.visible_pending) == (2, 3)
    check_counts(stats)


def test_overflowed_thermal_frame_is_gone():
    sync = PairSynchronizer(0.010, 2)
    for k in range(3):
        sync.add_thermal(S + k * 100 * MS, k)
    pairs = sync.add_visible(S, 'v0')  # its partner, frame 0, was dropped
    pairs += sync.add_visible(S + 100 * MS, 'v1')
    assert [(p.thermal, p.visible) for p in pairs] == [(1, 'v1')]


def test_flush_decides_with_what_is_known():
    sync = PairSynchronizer(0.020, 10)
    sync.add_visible(S, 'v0')
    sync.add_visible(S + 33 * MS, 'v1')
    sync.add_thermal(S + 40 * MS, 't')  # no visible frame after it yet
    assert sync.stats.thermal_pending == 1
    assert sync.flush() == [Pair(S + 40 * MS, S + 33 * MS, 't', 'v1')]
    stats = sync.stats
    assert (stats.thermal_pending, stats.visible_pending, stats.visible_unpaired) == (0, 0, 1)
    check_counts(stats)


def test_expire_decides_overdue_thermal_and_purges_old_visible():
    sync = PairSynchronizer(0.020, 100, timeout=0.5)
    sync.add_visible(S, 'v0')
    sync.add_thermal(S + 10 * MS, 't')  # the visible camera stalls after this
    # Not overdue yet (10 + 20 + 500 ms); v0 is kept although a thermal frame still to come
    # could not pair with it, because the pending one can.
    assert sync.expire(S + 525 * MS) == []
    assert sync.stats.visible_pending == 1
    assert sync.expire(S + 530 * MS) == [Pair(S + 10 * MS, S, 't', 'v0')]
    # The thermal camera pauses (flat-field correction): visible frames too old for any
    # thermal frame still to come are unpaired, not left to overflow the queue.
    for k in range(30):
        sync.add_visible(2 * S + k * 33 * MS, k)
    cutoff = 2 * S + 700 * MS
    sync.expire(cutoff + 500 * MS)  # thermal frames stamped before the cutoff are overdue
    stats = sync.stats
    assert stats.visible_overflow == 0
    assert stats.visible_pending == len([k for k in range(30) if 2 * S + k * 33 * MS > cutoff
                                         - 20 * MS]) == 9
    check_counts(stats)
    # A visible frame exactly slop before a pending thermal frame is kept for it.
    sync = PairSynchronizer(0.020, 100, timeout=0.5)
    sync.add_visible(S - 20 * MS, 'v')
    sync.add_thermal(S, 't')
    assert sync.expire(S + 510 * MS) == []
    assert sync.expire(S + 520 * MS) == [Pair(S, S - 20 * MS, 't', 'v')]


def test_parameters_are_the_nearest_nanosecond_of_their_seconds():
    # 0.0157 s is 15699999.999999998 ns in floating point: the slop must not lose that 1 ns.
    sync = PairSynchronizer(0.0157, 10)
    sync.add_thermal(S, 't')
    assert sync.add_visible(S + 15_700_000, 'v') == [Pair(S, S + 15_700_000, 't', 'v')]


@pytest.mark.parametrize('kwargs', [
    dict(slop=-0.1, queue_size=10), dict(slop=float('nan'), queue_size=10),
    dict(slop=0.1, queue_size=0), dict(slop=0.1, queue_size=2.5),
    dict(slop=0.1, queue_size=10, thermal_offset=float('inf')),
    dict(slop=0.1, queue_size=10, timeout=0.0),
    dict(slop=0.1, queue_size=10, reset_threshold=-1.0)])
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(ValueError, match='must be'):
        PairSynchronizer(**kwargs)


def test_stats_snapshot_is_frozen():
    sync = PairSynchronizer(0.01, 5)
    stats = sync.stats
    sync.add_thermal(S, 't')
    assert stats.thermal_received == 0 and sync.stats.thermal_received == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.pairs = 3


def test_the_stamp_skew_is_the_clock_difference_whatever_the_rates_and_delays():
    # A 9 Hz thermal camera stamping 2 s ahead of a 30 Hz visible one, on a host clock 1000 s
    # from both; delivery delays jitter by up to 20 ms. The synchronizer's buffers would tell
    # a gap of whatever visible frame is still held; arrivals tell the clocks' difference.
    rng = random.Random(0)
    skew = StampSkew()
    assert skew.seconds() is None
    for step in range(300):
        now = step / 90
        if step % 10 == 0:
            skew.add('thermal', round((now + 2.0) * 1e9), 1000 + now + rng.uniform(0.005, 0.02))
        if step % 3 == 0:
            skew.add('visible', round(now * 1e9), 1000 + now + rng.uniform(0.005, 0.02))
    assert abs(skew.seconds() - 2.0) < 0.01
    for _ in range(40):  # a driver that stopped stamping: its unset stamps say nothing
        skew.add('thermal', 0, 1003.5)
    assert abs(skew.seconds() - 2.0) < 0.01


def test_an_offset_that_appears_is_told_whole_or_not_yet_never_in_part():
    # The thermal driver restarts on a clock 0.5 s ahead: while the window holds frames of both,
    # the skew was the mean of the two middle ones, 0.25 s, and the hint offered that offset.
    skew = StampSkew()
    for frame in range(2 * StampSkew.WINDOW):
        now = 1 + frame / 30
        ahead = 0.5 if frame >= StampSkew.WINDOW else 0.0
        skew.add('thermal', round((now + ahead) * 1e9), 1000 + now)
        skew.add('visible', round(now * 1e9), 1000 + now)
        assert min(abs(skew.seconds()), abs(skew.seconds() - 0.5)) < 1e-6, frame


def test_the_clock_skew_hint_offers_an_offset_only_where_the_parameter_takes_it():
    from s4fusion_ros.diagnostics import clock_skew_hint
    assert clock_skew_hint(None, 0.05, 0.0, 0.5) == ''
    assert clock_skew_hint(0.04, 0.05, 0.0, 0.5) == ''  # within slop: the clocks are not the cause
    assert clock_skew_hint(0.3, 0.05, -0.3, 0.5) == ''  # the offset set already takes it up
    assert clock_skew_hint(0.3, 0.05, 0.0, 0.5).endswith('sync.thermal_offset -0.300 pairs them')
    assert clock_skew_hint(-0.3, 0.05, 0.0, 0.5).endswith('sync.thermal_offset 0.300 pairs them')
    assert clock_skew_hint(0.3, 0.05, 0.0, 0.5, '/robot/s4fusion_node').endswith(
        'sync.thermal_offset -0.300 pairs them (ros2 param set /robot/s4fusion_node '
        'sync.thermal_offset -0.300)')
    far = clock_skew_hint(2.0, 0.05, 0.0, 0.5)
    assert far.startswith('thermal stamps run 2.000 s ahead of visible ones')
    assert ("that is more than sync.thermal_offset can take up (-1 to 1 s): synchronize the "
            "cameras' clocks (chrony, PTP)") in far
    # At the edges: a skew of sync.slop pairs (the synchronizer's slop is inclusive), and the
    # parameter's own limits are offsets it takes.
    assert clock_skew_hint(0.25, 0.25, 0.0, 0.5) == ''
    assert clock_skew_hint(1.0, 0.05, 0.0, 0.5).startswith(
        'thermal stamps run 1.000 s ahead of visible ones')
    assert 'sync.thermal_offset -1.000 pairs them;' in clock_skew_hint(1.0, 0.05, 0.0, 0.5)
    assert 'sync.thermal_offset 1.000 pairs them;' in clock_skew_hint(-1.0, 0.05, 0.0, 0.5)


def test_a_wrong_offset_on_cameras_in_step_is_still_named():
    # The stamps agree within 2 ms of jitter, but sync.thermal_offset 0.3 was set by mistake:
    # every thermal frame goes unpaired, and the offset 0 that pairs them is named, not
    # passed over as within the inputs' delivery spread.
    from s4fusion_ros.diagnostics import unpaired_hint
    rng = random.Random(1)
    skew = StampSkew()
    for frame in range(StampSkew.WINDOW):
        now = frame / 10
        skew.add('thermal', round((100 + now) * 1e9), 1000 + now + rng.uniform(0, 0.002))
        skew.add('visible', round((100 + now) * 1e9), 1000 + now + rng.uniform(0, 0.002))
    hint = unpaired_hint(skew, 0.05, 0.3, 0.5)
    assert 'sync.thermal_offset -0.00' in hint or 'sync.thermal_offset 0.00' in hint, hint
    assert unpaired_hint(skew, 0.05, 0.0, 0.5) == ''


def test_an_offset_that_appeared_in_the_window_is_named_not_taken_for_bursts():
    # The thermal driver restarts on a clock 0.25 s ahead; 11 of the window's frames are from
    # before. The step spreads the lateness as wide as the skew, and the offset went unnamed.
    from s4fusion_ros.diagnostics import unpaired_hint
    skew = StampSkew()
    for frame in range(StampSkew.WINDOW):
        now = frame / 3
        ahead = 0.25 if frame >= 11 else 0.0
        skew.add('thermal', round((100 + now + ahead) * 1e9), 1000 + now + 0.002 * (frame % 3))
        skew.add('visible', round((100 + now) * 1e9), 1000 + now + 0.002 * (frame % 2))
    assert skew.delivery()['thermal'].spread == pytest.approx(0.25, abs=0.01)
    assert unpaired_hint(skew, 0.05, 0.0, 0.5).endswith('sync.thermal_offset -0.248 pairs them')


@pytest.mark.parametrize('rate', [0.5, 2.0])
def test_a_bag_replayed_at_another_rate_names_no_bursts_with_a_30_hz_camera(rate):
    # A 9 Hz thermal and a 30 Hz visible camera played back at another rate without /clock:
    # the 30 visible frames of the window span 0.97 s of stamps, which was too short to tell
    # the pace (a second), so their steady drift read as bursts and the hint asked for a
    # sync.timeout of 2.58 s at half rate. Nor may the drift read as a skew: the thermal window
    # reaches 2.3 s further back.
    from s4fusion_ros.diagnostics import unpaired_hint
    skew = StampSkew()
    events = sorted([(k / 9, 'thermal') for k in range(60)]
                    + [(k / 30, 'visible') for k in range(200)])
    for stamp, role in events:
        skew.add(role, round((100 + stamp) * 1e9), 1000 + stamp / rate + 0.01)
    delivery = skew.delivery()
    assert delivery['thermal'].spread < 0.01 and delivery['visible'].spread < 0.01, delivery
    assert skew.seconds() == pytest.approx(0.0, abs=1e-6)
    assert unpaired_hint(skew, 0.05, 0.0, 0.5) == ''


def test_a_frozen_stamp_tells_no_pace():
    # A visible driver whose stamp stopped advancing: its window spans no stamp time, which
    # tells no pace (nor can divide one), and its arrivals read as lateness.
    skew = StampSkew()
    for frame in range(90):
        now = frame / 30
        if frame % 3 == 0:
            skew.add('thermal', round((100 + now) * 1e9), 1000 + now)
        skew.add('visible', 100 * S, 1000 + now)
    # The 10th to 90th percentile of 30 arrivals 1/30 s apart.
    assert skew.delivery()['visible'].spread == pytest.approx(0.8 * 29 / 30)


def test_windows_that_arrived_at_one_instant_are_a_burst_not_a_replay_pace():
    # The node's executor blocked for longer than both windows, then took every frame at once:
    # arrivals that did not advance tell no replay's pace (dividing by it failed) but a burst.
    from s4fusion_ros.diagnostics import unpaired_hint
    skew = StampSkew()
    for stamp, role in sorted([(k / 9, 'thermal') for k in range(30)]
                              + [(k / 30, 'visible') for k in range(100)]):
        skew.add(role, round((100 + stamp) * 1e9), 1005.0)
    assert skew.delivery()['thermal'].spread > 2.5
    assert unpaired_hint(skew, 0.05, 0.0, 0.5).startswith('thermal frames arrive in bursts')


def test_the_clock_skew_hint_names_a_longer_timeout_where_one_topic_may_arrive_late():
    # Thermal frames stamped right but delivered 0.7 s late look like a thermal clock 0.7 s
    # behind: the hint offered only the offset, which pairs each with a visible frame 0.7 s on.
    from s4fusion_ros.diagnostics import clock_skew_hint
    behind = clock_skew_hint(-0.7, 0.05, 0.0, 0.5)
    assert behind.startswith('thermal stamps run 0.700 s behind visible ones')
    assert behind.endswith('sync.thermal_offset 0.700 pairs them; if the thermal frames arrive '
                           'that much later instead, sync.timeout 0.750 (now 0.5; read at '
                           'start: restart the node with it) pairs them as stamped')
    assert 'if the visible frames arrive that much later' in clock_skew_hint(0.7, 0.05, 0.0, 0.5)
    assert 'sync.timeout' not in clock_skew_hint(-0.7, 0.05, 0.0, 1.0)  # it waits long enough
    # A timeout of the skew plus sync.slop waits long enough too.
    assert 'sync.timeout' not in clock_skew_hint(-0.75, 0.25, 0.0, 1.0)


def test_the_delivery_hint_names_spreads_past_the_timeout_and_the_longest_it_can_wait():
    from s4fusion_ros.diagnostics import late_delivery_hint
    from s4fusion_ros.sync import Delivery
    # A spread of sync.timeout is waited for; the longest timeout is still offered.
    assert late_delivery_hint({'thermal': Delivery(0.5, 0.5), 'visible': None}, 0.5) == ''
    longest = late_delivery_hint({'thermal': Delivery(10.0, 3.0), 'visible': None}, 0.5)
    assert longest.endswith('past sync.timeout 0.5 s: sync.timeout 10.00 (read at start: '
                            'restart the node with it) waits for most of them'), longest


def test_bursts_past_the_timeout_are_named_before_a_clock_skew():
    # A thermal clock 0.6 s ahead, and visible frames delivered in bursts a second apart,
    # past sync.timeout: frames the synchronizer stopped waiting for are lost whatever the
    # offset, so the bursts are named (with the timeout that waits for them), not the offset.
    from s4fusion_ros.diagnostics import SKEW_OF_BURSTS, unpaired_hint
    skew = StampSkew()
    events = sorted([(k / 10 + 0.01, 'thermal', k / 10 + 0.6) for k in range(60)]
                    + [(math.floor(k / 10 + 1) + 0.01, 'visible', k / 10) for k in range(60)])
    for arrival, role, stamp in events:
        skew.add(role, round((100 + stamp) * S), 1000 + arrival)
    assert skew.seconds() > SKEW_OF_BURSTS * skew.delivery()['visible'].spread > 0.5
    assert unpaired_hint(skew, 0.05, 0.0, 0.5).startswith('visible frames arrive in bursts')


def test_bursts_within_the_timeout_are_not_taken_for_a_clock_skew():
    # A 30 Hz thermal camera delivered in half-second bursts on a clock in step with the
    # visible one: the bursts move its stamps' median 0.27 s, two thirds of their spread, and
    # an offset chosen from that would pair frames with the wrong partners.
    from s4fusion_ros.diagnostics import unpaired_hint
    skew = StampSkew()
    events = sorted([(math.floor(k / 15 + 1) / 2 + 0.01, 'thermal', k / 30) for k in range(60)]
                    + [(k / 30 + 0.01, 'visible', k / 30) for k in range(60)])
    for arrival, role, stamp in events:
        skew.add(role, round((100 + stamp) * S), 1000 + arrival)
    assert skew.seconds() == pytest.approx(-0.267, abs=0.01)
    assert skew.delivery()['thermal'].spread == pytest.approx(0.4, abs=0.01)
    assert unpaired_hint(skew, 0.05, 0.0, 0.5) == ''
    # A 20 Hz one whose driver sends what it took every half second: ten frames a burst span
    # less of it between the percentiles, and the skew is 0.83 of the spread.
    skew = StampSkew()
    events = sorted([(math.floor(k / 10 + 1) / 2 + 0.01, 'thermal', k / 20) for k in range(60)]
                    + [(k / 30 + 0.01, 'visible', k / 30) for k in range(90)])
    for arrival, role, stamp in events:
        skew.add(role, round((100 + stamp) * S), 1000 + arrival)
    assert skew.seconds() / skew.delivery()['thermal'].spread == pytest.approx(-0.83, abs=0.02)
    assert unpaired_hint(skew, 0.05, 0.0, 0.5) == ''


def _cameras(lead: StampLead, pairs: int, ahead_s: dict, offset_s: float = 0.0,
             start_s: float = 1000.0, allowance_s: float = 0.0) -> float:
    """Feed `pairs` pairs of cameras that stamp at capture, each on a clock `ahead_s` of the
    node's (by role), delivered 5 ms (thermal) and 8 ms (visible) after capture, 0.1 s apart,
    paired as matched (the thermal stamp plus `offset_s` is the visible one); the next start."""
    for k in range(pairs):
        visible_captured = start_s + 0.1 * k
        visible = round((visible_captured + ahead_s.get('visible', 0.0)) * S)
        thermal = visible - round(offset_s * S)  # matched: thermal + offset == visible
        thermal_captured = thermal / S - ahead_s.get('thermal', 0.0)
        lead.add('thermal', thermal, thermal_captured + 0.005, offset_s, allowance_s)
        lead.add('visible', visible, visible_captured + 0.008, 0.0, allowance_s)
        lead.pair(thermal, visible, offset_s)
    return start_s + 0.1 * pairs


def test_a_camera_clock_ahead_is_told_from_stamps_ahead_of_their_arrival():
    lead = StampLead(off_clock_s=1.0, frames=60)
    start = _cameras(lead, StampLead.PAIRS - 1, {'thermal': 0.5})
    assert lead.ahead == {'thermal': StampLead.PAIRS - 1, 'visible': 0}
    assert lead.fault() is None  # not before a window of pairs
    start = _cameras(lead, 1, {'thermal': 0.5}, start_s=start)
    role, ahead, apart = lead.fault()
    assert role == 'thermal' and ahead == pytest.approx(0.495) and apart == pytest.approx(0.503)
    # sync.thermal_offset compensating it: those frames are no longer ahead as matched, and
    # the fault is not named once they are most of the window.
    start = _cameras(lead, StampLead.PAIRS // 2 - 1, {'thermal': 0.5}, -0.5, start)
    assert lead.fault()[0] == 'thermal'
    start = _cameras(lead, 1, {'thermal': 0.5}, -0.5, start)
    assert lead.fault() is None and lead.ahead['thermal'] == StampLead.PAIRS
    # A visible camera ahead; and one glitched pair in a window of good ones tells nothing.
    start = _cameras(lead, StampLead.PAIRS, {'visible': 0.3}, start_s=start)
    role, ahead, apart = lead.fault()
    assert role == 'visible' and ahead == pytest.approx(0.292) and apart == pytest.approx(0.297)
    start = _cameras(lead, StampLead.PAIRS - 1, {}, start_s=start)
    _cameras(lead, 1, {'visible': 0.3}, start_s=start)
    assert lead.fault() is None


@pytest.mark.parametrize('ahead_s, counted', [
    ({'thermal': 0.04, 'visible': 0.04}, False),  # within the tolerance
    ({'thermal': 0.5, 'visible': 0.5}, True),  # both on one clock ahead: pairs as captured
    ({'thermal': -30e6, 'visible': -30e6}, False),  # a recording played without /clock
    ({'thermal': 3600.0, 'visible': 3600.0}, False),  # off the node clock: a wrong time zone
    ({'thermal': 0.07, 'visible': 0.07}, True),  # beyond the tolerance
    ({'visible': -0.3}, False),  # a clock behind looks like delivery latency: not told
])
def test_stamps_that_pair_as_captured_or_are_off_the_clock_name_no_fault(ahead_s, counted):
    lead = StampLead(off_clock_s=1.0, frames=60)
    _cameras(lead, StampLead.PAIRS, ahead_s)
    assert lead.fault() is None
    assert lead.ahead == dict.fromkeys(('thermal', 'visible'), StampLead.PAIRS * counted)


def test_on_sim_time_stamps_ahead_by_less_than_a_step_of_clock_are_not_ahead():
    # Gazebo classic publishes /clock at 10 Hz: the node's sim time at a frame's arrival
    # stands up to 0.1 s behind the stamp the simulator gave it.
    clock = ArrivalClock()
    assert clock.now(0.0, 100.0) == 0.0 and clock.sim_step() == math.inf  # not known yet
    lead = StampLead(off_clock_s=1.0, frames=60)
    start = _cameras(lead, StampLead.PAIRS, {'thermal': 0.5}, allowance_s=clock.sim_step())
    assert lead.ahead['thermal'] == 0 and lead.fault() is None
    for k in range(1, 40):  # read at 20 Hz
        clock.now(k / 20, 100.0 + math.floor(k / 2) / 10)
    assert clock.sim_step() == pytest.approx(0.1)
    # The frames of a clock whose steps were not known made no pair of the window.
    start = _cameras(lead, StampLead.PAIRS - 1, {'thermal': 0.5}, start_s=start,
                     allowance_s=clock.sim_step())
    assert lead.ahead['thermal'] == StampLead.PAIRS - 1 and lead.fault() is None
    start = _cameras(lead, 1, {'thermal': 0.5}, start_s=start, allowance_s=clock.sim_step())
    assert lead.ahead['thermal'] == StampLead.PAIRS and lead.fault()[0] == 'thermal'
    _cameras(lead, StampLead.PAIRS, {'thermal': 0.09}, start_s=start,
             allowance_s=clock.sim_step())
    assert lead.ahead['thermal'] == StampLead.PAIRS and lead.fault() is None
    # The largest step is the allowance: a /clock that skipped a value.
    clock = ArrivalClock()
    for wall, sim in ((0.0, 100.0), (0.1, 100.1), (0.2, 100.3), (0.3, 100.4)):
        clock.now(wall, sim)
    assert clock.sim_step() == pytest.approx(0.2)


def test_one_glitched_stamp_of_cameras_on_one_clock_ahead_names_no_fault():
    # Both cameras 0.2 s ahead pair as captured; one thermal frame stamped 0.99 s ahead of
    # its capture is no camera's fault (a mean of the window would name one).
    lead = StampLead(off_clock_s=1.0, frames=60)
    start = _cameras(lead, StampLead.PAIRS - 1, {'thermal': 0.2, 'visible': 0.2})
    _cameras(lead, 1, {'thermal': 0.99, 'visible': 0.2}, start_s=start)
    assert lead.fault() is None


def test_a_pair_of_a_frame_unstamped_or_no_longer_kept_tells_nothing():
    lead = StampLead(off_clock_s=1.0, frames=1)  # each input's latest frame kept
    start = _cameras(lead, StampLead.PAIRS - 1, {'thermal': 0.5})
    visible = round(start * S)
    lead.add('thermal', 0, start + 0.005)
    lead.add('visible', visible, start + 0.008)
    lead.pair(0, visible, 0.0)
    kept_no_longer = visible - 1
    lead.add('thermal', kept_no_longer, start - 0.495)
    lead.add('thermal', visible, start - 0.494)
    lead.pair(kept_no_longer, visible, 0.0)
    assert lead.fault() is None and lead.ahead['thermal'] == StampLead.PAIRS + 1
    _cameras(lead, 1, {'thermal': 0.5}, start_s=start + 0.1)
    assert lead.fault()[0] == 'thermal'


def test_the_fix_named_for_a_camera_clock_ahead_is_the_offset_that_compensates_it():
    from s4fusion_ros.diagnostics import stamped_ahead_message
    thermal = stamped_ahead_message('thermal', 0.495, 0.5, 0.1, '/robot/fusion')
    assert thermal.startswith('pairs of frames captured about 0.500 s apart: thermal stamps '
                              'run 0.495 s ahead of their arrival on the node clock (')
    assert thermal.endswith('or set sync.thermal_offset -0.400 (ros2 param set /robot/fusion '
                            'sync.thermal_offset -0.400)'), thermal
    # The window's medians are of thermal stamps as matched: with the offset that was added.
    assert (f'(median over the last {StampLead.PAIRS} pairs, sync.thermal_offset 0.1 s added; '
            in thermal) and 'its frames pair with visible frames captured' in thermal, thermal
    visible = stamped_ahead_message('visible', 0.3, 0.3, 0.0, '/robot/fusion')
    assert 'or set sync.thermal_offset 0.300 (ros2' in visible, visible
    assert (f'(median over the last {StampLead.PAIRS} pairs; ' in visible
            and 'its frames pair with thermal frames captured' in visible), visible
    assert 'beyond its -1 to 1 s' in stamped_ahead_message('thermal', 0.9, 1.2, 0.0)
    assert stamped_ahead_message('thermal', 0.5, 0.5, 0.0, offset_settable=False).endswith(
        'needs sync.backend own)')


def test_arrivals_keep_the_slower_pace_of_sim_and_wall_time_and_never_go_back():
    clock = ArrivalClock()

    def run(wall_from, wall_to, sim_from=None, pace=None, clock_hz=100.0):
        """Read the clock every 10 ms of wall time, /clock (at `pace`) at `clock_hz`."""
        value = None
        for k in range(round((wall_to - wall_from) * 100) + 1):
            wall = wall_from + k / 100
            sim = None if pace is None else sim_from + pace * (
                math.floor((wall - wall_from) * clock_hz) / clock_hz)
            value = clock.now(wall, sim)
        return value

    assert run(0.0, 1.0) == pytest.approx(1.0)  # wall time
    # A simulator at a tenth of real time: its pace, once measured (a second at most).
    start = run(1.0, 3.0, 100.0, 0.1)
    assert run(3.0, 5.0, 100.2, 0.1) - start == pytest.approx(0.2, abs=0.01)
    # Real time with /clock at 1 Hz: no loss to the steps (the pace is measured over 2 s).
    start = run(5.0, 8.0, 100.4, 1.0, clock_hz=1.0)
    assert run(8.0, 12.0, 103.4, 1.0, clock_hz=1.0) - start == pytest.approx(4.0, abs=0.05)
    # Faster than real time (x10): the wall's pace, as transport and decoding take wall time.
    start = run(12.0, 14.0, 107.4, 10.0)
    assert run(14.0, 16.0, 127.4, 10.0) - start == pytest.approx(2.0, abs=0.01)
    # Standing still (paused, a bag that ended): after STILL_S at wall rate.
    start = clock.now(16.0, 147.4)
    assert clock.now(16.5, 147.4) - start == pytest.approx(0.5)  # the pace known before
    assert clock.now(18.0, 147.4) - start == pytest.approx(2.0)
    # A looping bag's clock jumps back: no time goes back, the pace is measured again.
    start = clock.now(18.01, 1.0)
    assert clock.now(18.02, 1.001) - start == pytest.approx(0.001)  # a tenth: measured anew
    assert run(18.02, 21.0, 1.001, 0.5) - start == pytest.approx(0.5 * 3.0, abs=0.05)
    # use_sim_time set off while running: wall time on from there.
    start = clock.now(21.0)
    assert clock.now(21.5) - start == pytest.approx(0.5)


def test_a_clock_first_heard_after_the_start_is_timed_at_its_own_pace():
    # A node started before the simulator (or bag) that publishes /clock: rclpy's sim time
    # reads 0 until the first /clock. Measured from that 0, the first value looked like a clock
    # 100 s ahead, its pace read 1 for PACE_WINDOW_S, and a simulator at a tenth of real time
    # had its first frames timed out by the wall clock.
    clock = ArrivalClock()
    for k in range(200):  # 10 s without /clock: it stands still, so frames are decided
        clock.now(k / 20, 0.0)
    assert clock.now(10.0, 0.0) == pytest.approx(10.0 - ArrivalClock.STILL_S, abs=0.06)
    start = clock.now(10.0, 100.0)
    for k in range(1, 41):  # 2 s of a simulation at 0.1, /clock at 20 Hz
        value = clock.now(10.0 + k / 20, 100.0 + 0.1 * k / 20)
    assert value - start == pytest.approx(0.2, abs=0.01)
