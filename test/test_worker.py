"""The inference worker: an item whose processing raises is counted, and the thread goes on."""

import time

from s4fusion_ros.worker import InferenceWorker


def test_a_raising_item_is_counted_and_the_next_one_still_runs():
    done = []

    def process(item):
        if item == 'bad':
            raise RuntimeError('CUDA error: an illegal memory access was encountered')
        done.append(item)

    worker = InferenceWorker(process, queue_size=2, policy='keep_oldest')
    try:
        assert worker.submit('bad') and worker.submit('good')
        assert worker.wait_idle(5.0)
        assert done == ['good'] and worker.alive
        assert (worker.processed, worker.failed) == (2, 1)
        assert 'illegal memory access' in worker.last_failure
    finally:
        worker.stop()


def test_counts_never_show_an_item_both_finished_and_in_progress():
    # Diagnostics read the counts on another thread while items finish: each snapshot must add
    # up, with every item in exactly one place (finished with an outcome, failed, dropped,
    # queued or in progress).
    def process(item):
        if item % 7 == 0:
            raise ValueError(item)
        return 'even' if item % 2 == 0 else 'odd'

    worker = InferenceWorker(process, queue_size=3)
    snapshots = []
    try:
        for item in range(3000):
            worker.submit(item)
            time.sleep(0)  # let the worker run, so that items finish between snapshots
            snapshots.append((item + 1, worker.counts()))
        assert worker.wait_idle(10.0)
        snapshots.append((3000, worker.counts()))
    finally:
        worker.stop()
    for submitted, counts in snapshots:
        finished = counts.failed + sum(counts.outcomes.values())
        assert submitted == counts.dropped + counts.pending + counts.in_progress + finished
        assert counts.in_progress in (0, 1)
    final = snapshots[-1][1]
    assert final.failed == worker.failed > 0 and final.in_progress == final.pending == 0
    assert set(final.outcomes) == {'even', 'odd'}
