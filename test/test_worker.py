"""The inference worker: an item whose processing raises is counted, and the thread goes on."""

import threading
import time

import pytest

from s4fusion_ros.worker import InferenceWorker


def wait_idle(worker: InferenceWorker, timeout: float) -> bool:
    """Wait until nothing is queued or runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        counts = worker.counts()
        if counts.pending == counts.in_progress == 0:
            return True
        time.sleep(0.01)
    return False


def test_a_raising_item_is_counted_and_the_next_one_still_runs():
    done = []

    def process(item):
        if item == 'bad':
            raise RuntimeError('CUDA error: an illegal memory access was encountered')
        done.append(item)

    worker = InferenceWorker(process, queue_size=2, policy='keep_oldest')
    try:
        assert worker.submit('bad') and worker.submit('good')
        assert wait_idle(worker, 5.0)
        assert done == ['good'] and worker.alive
        assert (worker.processed, worker.failed) == (2, 1)
        assert 'illegal memory access' in worker.last_failure
    finally:
        worker.stop()


def test_counts_never_show_an_item_both_finished_and_in_progress(monkeypatch):
    # Diagnostics read the counts on another thread while items finish, so every state a reader
    # can see (each time the worker's lock is taken) must have every item in exactly one place:
    # finished with an outcome, failed, dropped, queued or in progress.
    seen = []

    class CheckedCondition(threading.Condition):
        worker = None

        def __enter__(self):
            taken = super().__enter__()
            worker = self.worker
            if worker is not None:
                finished = worker.failed + sum(worker.outcomes.values())
                seen.append(worker.processed == finished)
            return taken

    def process(item):
        if item % 7 == 0:
            raise ValueError(item)
        return 'even' if item % 2 == 0 else 'odd'

    with monkeypatch.context() as patch:  # the worker's lock alone is checked
        patch.setattr(threading, 'Condition', CheckedCondition)
        worker = InferenceWorker(process, queue_size=3)
    worker._wakeup.worker = worker
    try:
        end = time.monotonic() + 60
        for item in range(500):
            # Room in the queue first, so that every item runs and finishes between submissions
            # however loaded the machine (a loaded one dropped half of them: too few states seen).
            while worker.counts().pending >= 3:
                assert time.monotonic() < end
                time.sleep(0)
            worker.submit(item)
        assert wait_idle(worker, 10.0)
        counts = worker.counts()
    finally:
        worker.stop()
    assert len(seen) > 1000 and all(seen)
    assert 500 == counts.dropped + counts.failed + sum(counts.outcomes.values())
    assert counts.failed > 0 and set(counts.outcomes) == {'even', 'odd'}


@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_an_item_that_ends_the_thread_is_counted_as_failed():
    def process(item):
        raise SystemExit(item)

    worker = InferenceWorker(process)
    worker.submit('last')
    worker._thread.join(5.0)
    assert not worker.alive
    counts = worker.counts()
    assert (counts.failed, counts.in_progress, worker.processed) == (1, 0, 1)
    assert 'SystemExit' in worker.last_failure


def test_items_still_queued_at_stop_are_counted_as_dropped():
    started, release = threading.Event(), threading.Event()

    def process(item):
        started.set()
        release.wait(5.0)
        return 'done'

    worker = InferenceWorker(process, queue_size=3, policy='keep_oldest')
    for item in range(4):
        worker.submit(item)
    assert started.wait(5.0)
    worker.stop(timeout=0.01)  # while the first item runs: the queued ones never will
    release.set()
    worker._thread.join(5.0)
    counts = worker.counts()
    assert (counts.pending, counts.in_progress, counts.dropped, counts.outcomes) == (
        0, 0, 3, {'done': 1})


def test_the_item_in_progress_is_named_with_how_long_it_has_run():
    # A stall with a pair in inference said only "pairs in inference: 1": a camera sending 4K
    # frames kept the model busy for 20 s a pair, with no word of which pair or how long.
    release = threading.Event()
    worker = InferenceWorker(lambda item: release.wait(10))
    assert worker.current() is None
    worker.submit('4k pair')
    deadline = time.monotonic() + 5
    while worker.current() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    item, seconds = worker.current()
    assert item == '4k pair' and 0.2 <= seconds < 5
    release.set()
    while worker.current() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.current() is None and worker.counts().in_progress == 0
    worker.stop()


def test_the_node_logs_each_kind_of_inference_failure(capfd):
    """The node's log line for a failed inference was throttled per call site: another kind of
    failure within 5 s of the first (an out-of-memory, then a bug) was never logged, however
    rarely each came. Each kind is logged, each at most once per 5 s."""
    pytest.importorskip('rclpy')
    import types

    from rclpy.logging import get_logger

    from s4fusion_ros.diagnostics import Key
    from s4fusion_ros.ros.node import S4FusionNode

    errors = iter([RuntimeError('CUDA out of memory'), RuntimeError('CUDA out of memory'),
                   ValueError('a bug')])

    def infer(pair, settings):
        raise next(errors)
    logger = get_logger('inference_failure_probe')
    node = types.SimpleNamespace(engine=types.SimpleNamespace(infer=infer), logged={},
                                 get_logger=lambda: logger, output_settings=(None, None))
    node._log_due = types.MethodType(S4FusionNode._log_due, node)
    for _ in range(3):
        assert S4FusionNode._fuse_and_publish(node, None) == Key.INFERENCE_ERRORS
    lines = [line for line in capfd.readouterr().err.splitlines() if 'inference failed' in line]
    assert len(lines) == 2, lines
    assert 'out of memory' in lines[0] and 'a bug' in lines[1]


@pytest.mark.parametrize('policy, runs, dropped', [
    ('keep_newest', ['busy', 'c', 'd'], [False, False]),  # a and b dropped for c and d
    ('keep_oldest', ['busy', 'a', 'b'], [False, False]),  # c and d refused
])
def test_a_full_queue_drops_by_policy_and_runs_in_order(policy, runs, dropped):
    started, release = threading.Event(), threading.Event()
    done = []

    def process(item):
        if item == 'busy':
            started.set()
            release.wait(5.0)
        done.append(item)
        return None if item == 'a' else 'fused'

    worker = InferenceWorker(process, queue_size=2, policy=policy)
    try:
        assert worker.submit('busy') and started.wait(5.0)
        assert worker.in_progress == 1 and worker.counts().in_progress == 1
        assert worker.submit('a') and worker.submit('b')  # the queue holds two
        assert [worker.submit(item) for item in ('c', 'd')] == dropped
        assert (worker.counts().pending, worker.dropped) == (2, 2)
        release.set()
        assert wait_idle(worker, 5.0)
    finally:
        worker.stop()
    assert done == runs
    # An item whose process returned None has no outcome.
    assert worker.outcomes == ({'fused': 3} if policy == 'keep_newest' else {'fused': 2})


@pytest.mark.parametrize('queue_size, policy, message', [
    (0, 'keep_newest', 'queue_size must be >= 1'),
    (1, 'newest', "queue policy 'newest' is not one of keep_newest, keep_oldest"),
])
def test_invalid_queue_settings_are_refused(queue_size, policy, message):
    with pytest.raises(ValueError, match=message):
        InferenceWorker(lambda item: None, queue_size=queue_size, policy=policy)
