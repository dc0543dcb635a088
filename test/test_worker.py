"""The inference worker: an item whose processing raises is counted, and the thread goes on."""

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
