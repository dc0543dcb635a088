"""Rates and latency statistics for diagnostics and summaries."""

import collections
import threading
import time

import numpy as np


def process_memory_kib(pid: int | str = 'self') -> dict[str, int]:
    """VmRSS and VmHWM (kB) of a process, from /proc/<pid>/status (Linux); {} once it is gone."""
    try:
        with open(f'/proc/{pid}/status') as status:
            lines = status.read().splitlines()
    except OSError:
        return {}
    memory = {}
    for line in lines:
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'VmHWM'):
            memory[key] = int(value.split()[0])
    return memory


class RecentSenders:
    """The distinct senders of events within a sliding window (thread-safe): two at a time on a
    camera topic means two drivers, or a bag played beside the camera, feed one input; one after
    the other is a driver that restarted."""

    def __init__(self, window: float = 5.0):
        self._window = window
        self._spans = {}  # sender -> [began sending (after a window of silence), last sent]
        self._lock = threading.Lock()

    def add(self, sender, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._spans.setdefault(sender, [now, now])[1] = now

    def recent(self, now: float | None = None) -> int:
        """How many senders were heard within the window up to `now`."""
        return len(self._current(now))

    def concurrent(self, now: float | None = None) -> int:
        """How many of them sent while another one did: 0 when one sent after the other."""
        spans = sorted(self._current(now).values())
        overlapping = set()
        for index, (first, last) in enumerate(spans):
            for other, (later_first, _) in enumerate(spans[index + 1:], index + 1):
                if later_first < last:  # began before this one's latest event
                    overlapping |= {index, other}
        return len(overlapping)

    def _current(self, now: float | None) -> dict:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._spans = {sender: span for sender, span in self._spans.items()
                           if now - span[1] <= self._window}
            return {sender: tuple(span) for sender, span in self._spans.items()}


class RateMeter:
    """Events per second over a sliding window (thread-safe: callbacks and the worker count)."""

    def __init__(self, window: float = 5.0):
        self._window = window
        self._times = collections.deque()
        self._first = None  # time of the first event ever
        self._lock = threading.Lock()
        self.total = 0
        self.last = None  # time of the latest event

    @property
    def window(self) -> float:
        """The window's length (s)."""
        return self._window

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.total += 1
            self.last = now
            self._times.append(now)
            self._first = now if self._first is None else self._first
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        """Events per second over the window up to `now`: it falls as soon as events stop (a
        camera that died), instead of keeping their last rate until the window empties."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if self._first is None or now - self._first < self._window:
                # Still filling: the intervals so far (none yet from a single event).
                if len(self._times) < 2:
                    return 0.0
                return (len(self._times) - 1) / max(now - self._first, 1e-9)
            # A full window counts its events, one alone too: below 2 / window (0.4 Hz) a rate
            # read between events is then still right on average, not 0.
            return len(self._times) / self._window

    def recent(self, now: float | None = None) -> int:
        """Events within the window (one is too few for a rate, but it did happen)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return len(self._times)

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()


class LatencyStats:
    """Mean and percentiles of the most recent latencies, in seconds."""

    def __init__(self, size: int = 200):
        self._values = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def summary(self) -> dict[str, float]:
        """{'mean', 'p95'} in seconds (what the diagnostics publish); NaN when nothing was
        measured yet."""
        with self._lock:
            values = np.array(self._values, dtype=np.float64)
        if values.size == 0:
            return {'mean': float('nan'), 'p95': float('nan')}
        return {'mean': float(values.mean()), 'p95': float(np.percentile(values, 95))}


class CountsWindow:
    """How much integer counts grew over a sliding window of reports (not thread-safe: one
    caller, the node's diagnostics timer)."""

    def __init__(self, window: float):
        self._window = window
        self._reports = collections.deque()  # (time, counts), oldest first

    def clear(self) -> None:
        """Start afresh (what came before is of another state)."""
        self._reports.clear()

    def grown(self, now: float, counts: dict) -> dict:
        """Add a report; return how much each count present in both grew since the newest
        report at least a window old (reports further apart than the window: the one before),
        with the seconds between them as 'span'; {} until they span half a window. Values that
        are not integers (a count not reported) are left out."""
        reports = self._reports
        reports.append((now, counts))
        while len(reports) > 2 and now - reports[1][0] >= self._window:
            reports.popleft()
        then, earlier = reports[0]
        if now - then < self._window / 2:
            return {}
        grown = {key: value - earlier[key] for key, value in counts.items()
                 if type(value) is int and type(earlier.get(key)) is int}
        return {**grown, 'span': now - then}
