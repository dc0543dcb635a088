"""A bounded inference queue on its own thread, so message callbacks never wait for the model."""

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

QUEUE_POLICIES = ('keep_newest', 'keep_oldest')


@dataclasses.dataclass(frozen=True)
class WorkerCounts:
    """The counts at one instant: each submitted item is in one of dropped, pending,
    in_progress, failed, sum(outcomes.values()) or the items whose `process` returned None."""
    dropped: int
    pending: int
    in_progress: int
    failed: int
    outcomes: dict


class InferenceWorker:
    """Runs `process(item)` for queued items on a background thread.

    The queue holds at most `queue_size` items. When it is full, `keep_newest` drops the oldest
    queued item (the output stays as fresh as the model allows: a slow model fuses the latest pair,
    not a growing backlog) and `keep_oldest` refuses the new one. Every dropped item is counted.
    What `process` returns, unless None, is the item's outcome, counted as the item stops being in
    progress, under the same lock: a `counts()` snapshot never shows an item in two places.
    """

    def __init__(self, process: Callable[[object], object], queue_size: int = 1,
                 policy: str = 'keep_newest', name: str = 'inference'):
        if queue_size < 1:
            raise ValueError(f'queue_size must be >= 1, got {queue_size}')
        if policy not in QUEUE_POLICIES:
            raise ValueError(f"queue policy '{policy}' is not one of {', '.join(QUEUE_POLICIES)}")
        self._process = process
        self._queue_size = queue_size
        self._policy = policy
        self._queue = collections.deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self.dropped = 0
        self.processed = 0
        self.failed = 0  # items whose `process` raised (it should handle its own errors)
        self.outcomes = collections.Counter()
        self.last_failure = ''
        self.last_failure_at = None  # time.monotonic() of the last failure
        self._current = None  # (item, time.monotonic() it started) while one is in progress
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item) -> bool:
        """Queue an item; returns False when the policy dropped an item (this one or an older)."""
        with self._wakeup:
            accepted = True
            if len(self._queue) >= self._queue_size:
                self.dropped += 1
                accepted = False
                if self._policy == 'keep_oldest':
                    return False
                self._queue.popleft()
            self._queue.append(item)
            self._wakeup.notify()
            return accepted

    @property
    def in_progress(self) -> int:
        """Items in process now (0 or 1)."""
        with self._wakeup:
            return int(self._current is not None)

    def counts(self) -> WorkerCounts:
        """One consistent snapshot of the counts (for diagnostics read on another thread)."""
        with self._wakeup:
            return WorkerCounts(self.dropped, len(self._queue), self.in_progress, self.failed,
                                dict(self.outcomes))

    def current(self) -> tuple[object, float] | None:
        """The item in progress and for how long (s) it has been; None when idle."""
        with self._wakeup:
            if self._current is None:
                return None
            item, started = self._current
            return item, time.monotonic() - started

    @property
    def alive(self) -> bool:
        """Whether the thread runs: after `stop`, an item still in progress."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 0.5) -> None:
        """Stop taking work; wait briefly for the item in progress (the thread is a daemon, so a
        long inference never holds up process exit)."""
        with self._wakeup:
            self._stopping = True
            self.dropped += len(self._queue)  # never to run: counted, not left as in progress
            self._queue.clear()
            self._wakeup.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                self._wakeup.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                item = self._queue.popleft()
                self._current = (item, time.monotonic())
            # `process` owns its error handling; what escapes it is counted, and the thread lives.
            outcome = failure = None
            try:
                outcome = self._process(item)
            except BaseException as error:  # noqa: BLE001 - one item must not stop every later one
                failure = repr(error)
                if not isinstance(error, Exception):
                    raise  # SystemExit and the like end the thread, the item counted as failed
            finally:
                with self._wakeup:  # one update, so that counts() sees the item in one place
                    if failure is not None:
                        self.failed += 1
                        self.last_failure, self.last_failure_at = failure, time.monotonic()
                    elif outcome is not None:
                        self.outcomes[outcome] += 1
                    self.processed += 1
                    self._current = None
                    self._wakeup.notify_all()
