"""RateMeter and LatencyStats, on a clock the test controls."""

import numpy as np
import pytest

from s4fusion_ros.diagnostics import (Key, NOT_REPORTED, late_arrivals, left_at_stop,
                                      pairing_shortfall)
from s4fusion_ros.stats import (CountsWindow, LatencyStats, RateMeter, RecentSenders,
                                process_memory_kib)


def test_rate_is_the_event_rate_and_falls_once_events_stop():
    meter = RateMeter(window=5.0)
    for k in range(60):  # 2 s at 30 Hz
        meter.tick(now=k / 30)
    assert meter.rate(now=59 / 30) == pytest.approx(30.0)
    # A camera that stopped: the rate falls with the silence, not 5 s later all at once.
    assert meter.rate(now=59 / 30 + 1.0) == pytest.approx(59 / (59 / 30 + 1.0))
    assert meter.rate(now=59 / 30 + 4.5) < 4.0
    assert meter.rate(now=59 / 30 + 5.1) == 0.0 and meter.recent(now=59 / 30 + 5.1) == 0
    assert meter.total == 60


@pytest.mark.parametrize('hz', [30.0, 9.0, 1.0, 0.3])  # 0.3: a slow CPU fusing
def test_rate_is_unbiased_once_the_window_is_full(hz):
    # Read at every phase between two events, as diagnostics are: on average the event rate.
    meter = RateMeter(window=5.0)
    for k in range(int(20 * hz)):
        meter.tick(now=k / hz)
    last = (int(20 * hz) - 1) / hz
    phases = np.linspace(0, 1, 50, endpoint=False)
    readings = [meter.rate(now=last + phase / hz) for phase in phases]
    assert np.mean(readings) == pytest.approx(hz, rel=0.02)


def test_latency_summary():
    stats = LatencyStats(size=3)
    assert all(value != value for value in stats.summary().values())  # NaN before any
    for seconds in (9.0, 1.0, 2.0, 3.0):  # the oldest falls out of the window
        stats.add(seconds)
    summary = stats.summary()
    assert summary == pytest.approx({'mean': 2.0, 'p95': 2.9})  # of 1, 2 and 3


def node_counts(pairs, thermal, visible, bad_stamps=0, unpaired=NOT_REPORTED):
    """The node's diagnostics counts that the partial-pairing WARN reads."""
    return {Key.PAIRS: pairs, Key.THERMAL_RECEIVED: thermal, Key.VISIBLE_RECEIVED: visible,
            Key.THERMAL_BAD_STAMP: bad_stamps, Key.VISIBLE_BAD_STAMP: 0,
            Key.THERMAL_UNPAIRED: unpaired}


def test_counts_window_spans_the_window_or_the_report_period_if_longer():
    window = CountsWindow(5.0)
    assert window.grown(0.0, node_counts(0, 0, 0)) == {}  # under half a window
    grown = {}
    for second in range(1, 9):
        grown = window.grown(float(second), node_counts(second, 5 * second, 15 * second))
    # From the newest report at least 5 s old: 3 s, to 8 s. A count not reported is left out.
    assert grown == {Key.PAIRS: 5, Key.THERMAL_RECEIVED: 25, Key.VISIBLE_RECEIVED: 75,
                     Key.THERMAL_BAD_STAMP: 0, Key.VISIBLE_BAD_STAMP: 0, 'span': 5.0}
    # A report every 6 s (diagnostics.period beyond the window): the one before. It kept only
    # the report just added, and so never warned.
    slow = CountsWindow(5.0)
    slow.grown(0.0, node_counts(0, 0, 0))
    assert slow.grown(6.0, node_counts(3, 30, 90))['span'] == 6.0
    window.clear()
    assert window.grown(9.0, node_counts(9, 45, 135)) == {}


def test_counts_window_reports_from_half_a_window_on():
    # The partial-pairing WARN reads these from half a window after a start or a clear, not
    # a whole window later.
    window = CountsWindow(5.0)
    window.grown(0.0, node_counts(0, 0, 0))
    assert window.grown(2.4, node_counts(2, 12, 36)) == {}
    assert window.grown(2.5, node_counts(2, 12, 36)) == {
        Key.PAIRS: 2, Key.THERMAL_RECEIVED: 12, Key.VISIBLE_RECEIVED: 36,
        Key.THERMAL_BAD_STAMP: 0, Key.VISIBLE_BAD_STAMP: 0, 'span': 2.5}


def test_counts_window_leaves_out_a_count_the_earlier_report_lacks():
    # A count that only the newer report has (the earlier one said "not reported", or had no
    # such key) has not grown by any number: left out, not a TypeError or a KeyError.
    window = CountsWindow(5.0)
    window.grown(0.0, {**node_counts(0, 0, 0), 'new': 'n/a'})
    grown = window.grown(5.0, {**node_counts(4, 20, 60, unpaired=3), 'new': 7, 'added': 1})
    assert grown == {Key.PAIRS: 4, Key.THERMAL_RECEIVED: 20, Key.VISIBLE_RECEIVED: 60,
                     Key.THERMAL_BAD_STAMP: 0, Key.VISIBLE_BAD_STAMP: 0, 'span': 5.0}


def test_process_memory_has_the_resident_and_peak_sizes_and_nothing_once_gone():
    # s4fusion-flood reports the node's peak (VmHWM) and s4fusion-bench its growth.
    memory = process_memory_kib()
    assert set(memory) == {'VmRSS', 'VmHWM'}
    assert 0 < memory['VmRSS'] <= memory['VmHWM']
    assert process_memory_kib(2 ** 22 + 1) == {}  # above Linux's largest pid


def test_pairing_shortfall_is_fewer_pairs_than_half_the_slower_cameras_frames():
    # Thermal 5 Hz against visible 15 Hz over 5 s: 25 frames of the slower camera.
    assert pairing_shortfall({Key.PAIRS: 12, Key.THERMAL_RECEIVED: 25,
                              Key.VISIBLE_RECEIVED: 75}, 6) == (12, 25)
    assert pairing_shortfall({Key.PAIRS: 13, Key.THERMAL_RECEIVED: 25,
                              Key.VISIBLE_RECEIVED: 75}, 6) is None
    # Frames without a stamp cannot pair; too few frames tell nothing; the message_filters
    # backend reports no unpaired count, and the pairs and frames suffice.
    assert pairing_shortfall({Key.PAIRS: 10, Key.THERMAL_RECEIVED: 25,
                              Key.THERMAL_BAD_STAMP: 6, Key.VISIBLE_RECEIVED: 75}, 6) is None
    assert pairing_shortfall({Key.PAIRS: 0, Key.THERMAL_RECEIVED: 5,
                              Key.VISIBLE_RECEIVED: 75}, 6) is None
    assert pairing_shortfall({}, 6) is None
    # Half of them paired is no shortfall; a camera that sent the minimum already tells one.
    assert pairing_shortfall({Key.PAIRS: 12, Key.THERMAL_RECEIVED: 24,
                              Key.VISIBLE_RECEIVED: 75}, 6) is None
    assert pairing_shortfall({Key.PAIRS: 0, Key.THERMAL_RECEIVED: 6,
                              Key.VISIBLE_RECEIVED: 75}, 6) == (0, 6)


def test_recent_senders_tell_two_at_a_time_from_one_after_the_other():
    senders = RecentSenders(window=5.0)
    senders.add('driver', 0.0)
    senders.add('driver', 1.0)
    senders.add('restarted driver', 1.5)  # a new publisher once the old one stopped
    senders.add('restarted driver', 2.0)
    assert senders.recent(2.0) == 2 and senders.concurrent(2.0) == 0
    senders.add('bag', 2.5)  # a bag played beside it
    senders.add('restarted driver', 3.0)
    assert senders.recent(3.0) == 3 and senders.concurrent(3.0) == 2
    # Out of the window: the bag last sent at 2.5.
    assert senders.recent(7.8) == 1 and senders.concurrent(7.8) == 0


def test_a_pair_in_inference_is_a_stall_cause_once_it_ran_a_whole_window():
    # A pair that had just begun, after 5 s of frames that found no partner, was named as the
    # cause with "inference_size runs the model smaller": the model was not why.
    from s4fusion_ros.diagnostics import inference_stall
    assert inference_stall((640, 480), 0.2, 5.0, True) == ''
    assert inference_stall((640, 480), 5.0, 5.0, False) == (
        'pairs in inference: 1 (a 640x480 pair, for 5 s)')  # a whole window
    assert inference_stall((3840, 2160), 21.4, 5.0, True) == (
        'pairs in inference: 1 (a 3840x2160 pair, for 21 s; inference_size runs the model '
        'smaller)')
    assert inference_stall((3840, 2160), 6.0, 5.0, False) == (
        'pairs in inference: 1 (a 3840x2160 pair, for 6 s)')


def test_left_at_stop_names_what_the_stop_cut_short():
    stopped = {Key.PAIRS: 8, Key.PAIRS_FUSED: 1, Key.PAIRS_DROPPED: 6, Key.INFERENCE_ERRORS: 0,
               Key.PUBLISH_ERRORS: 0, Key.PAIRS_QUEUED: 0, Key.THERMAL_PENDING: 0,
               Key.VISIBLE_PENDING: 2}
    assert left_at_stop(stopped) == 'left at the stop: 1 pair cut short, 2 visible frames pending'
    assert left_at_stop({**stopped, Key.PAIRS_FUSED: 2, Key.VISIBLE_PENDING: 0}) == ''
    # A pair still queued is accounted for by the queue's count, not cut short too.
    assert left_at_stop({**stopped, Key.PAIRS_DROPPED: 5, Key.PAIRS_QUEUED: 1}) == (
        'left at the stop: 1 pair cut short, 2 visible frames pending')
    # message_filters keeps its pending frames to itself: not reported, not guessed.
    assert left_at_stop({**stopped, Key.VISIBLE_PENDING: NOT_REPORTED}) == (
        'left at the stop: 1 pair cut short')


def test_late_arrivals_are_named_past_a_tenth_of_an_inputs_frames():
    # Counts grown over a 5 s window, as the node's status reads them (at least 6 frames).
    grown = {Key.THERMAL_RECEIVED: 30, Key.THERMAL_LATE: 4, Key.VISIBLE_RECEIVED: 90,
             Key.VISIBLE_LATE: 9, 'span': 5.0}
    assert late_arrivals(grown, 6).startswith(
        '4 of 30 thermal frames came late in the last 5 s (stamped no newer than a frame')
    # A tenth exactly is noise, not a fault of the source.
    assert late_arrivals({**grown, Key.THERMAL_LATE: 3}, 6) == ''
    # Too few frames tell nothing; from the minimum on they do.
    few = {**grown, Key.THERMAL_RECEIVED: 6, Key.THERMAL_LATE: 1}
    assert late_arrivals(few, 6).startswith('1 of 6 thermal frames came late')
    assert late_arrivals(few, 7) == ''
