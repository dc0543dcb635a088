"""Approximate-time pairing of a thermal and a visible image stream on header stamps (ROS-free).

Why the project has its own synchronizer (docs/node.md, "Pairing"):
message_filters' Python ApproximateTimeSynchronizer pairs on arrival with the nearest partner
already buffered, never with a nearer one still to come, never purges old unmatched messages (only
queue_size pushes them out), runs the callback under its lock and stamps
headerless messages with wall time; the C++ ApproximateTime policy waits up to a period of the
slowest topic. Thermal cores run at about 9 Hz against 30 Hz RGB, pause 0.2-0.5 s for flat-field
correction, and USB cores stamp on host receipt with a constant latency.

So the slow thermal stream is the pivot. A thermal frame is decided as soon as a visible frame
stamped at or after it is buffered: visible frames arrive in stamp order, so the nearest visible
on either side is then known. Where that frame is beyond slop, another frame must bear it out (a
second visible frame, or a thermal frame as late as it): a single visible stamp glitched ahead
would otherwise decide every thermal frame it overtook before its partner arrived. It pairs with
the nearest visible within ``slop`` (ties go to the earlier one) that is newer than the last
paired visible, so output pairs strictly increase in both stamps and each visible frame is used at
most once; but a visible frame after it that the next thermal frame is nearer to, and takes, is
left to that frame. Otherwise a thermal camera as fast as the RGB one, or faster, would after one
dropped visible frame pair every frame with its successor's partner. Whether a nearer thermal
frame can still come is judged from the thermal intervals (INTERVAL_WINDOW): a 9 Hz core against
30 Hz RGB waits for its next frame only where RGB frames around it were dropped, and a frame
waiting when a queue overflows is decided with what is known, not dropped. Visible frames older
than the partner, or too old for any thermal frame still to come, are dropped as unpaired. This
gives the same pairs as the offline greedy (thermal frames in stamp order, each taking the nearest
unused visible within slop newer than the last paired one, or leaving it to the next thermal frame
as above) whatever the delay between the two topics, as long as each topic arrives in order and
the buffers do not overflow. ``expire(now_ns)`` (the live node's timer) decides thermal frames
whose visible partner is overdue (and whose nearer successor would have come: up to 2 x slop
later) and ``flush()`` (end of a bag) decides everything left; both use what is known. Frames out
of order within a topic still pair while their thermal frame is undecided; older ones are late.

Parameters and their names elsewhere:

- ``slop`` (node parameter ``sync.slop``): message_filters ApproximateTimeSynchronizer ``slop``,
  stereo_image_proc ``approximate_sync_tolerance_seconds``. Pairing is always approximate
  (stereo_image_proc ``approximate_sync`` true); slop 0 pairs equal stamps only, like ExactTime.
- ``queue_size`` (``sync.queue_size``): message_filters / stereo_image_proc ``queue_size``,
  messages kept per topic; the oldest is dropped beyond it.
- ``thermal_offset`` / ``visible_offset``: seconds added to that topic's stamps for matching only
  (e.g. -0.06 for a thermal core stamped 60 ms after exposure); pairs keep the original stamps.
  ``thermal_offset`` may change while running (``sync.thermal_offset``): frames still pending
  pair on the new offset.
- ``timeout``: how long after its (offset) stamp a message is expected to have arrived; used only
  by ``expire``, whose ``now_ns`` must be on the offset stamps' clock (``thermal_key`` /
  ``visible_key`` of a stamp: the node clock, sim time included, where the offsets are 0).
- ``reset_threshold``: a stamp this much older than the newest on its topic is a clock jump
  (looping bag, simulation restart) or a glitched stamp. Such a frame is held until the next
  frame tells which (time cannot: dropped frames and FFC pauses make any silence possible). The
  next frame of its topic as far back or going on from it (after it, and nearer to it than to
  the old newest: a short bag looped jumps back little more than the threshold), or a frame of
  the other topic as far back and within the threshold of it, confirm a jump: what is pending is
  flushed and the state starts afresh with the held frame. The next frame of its topic back on
  the old timeline shows a glitch: the held frame is late and nothing is reset. Likewise a frame
  back within the threshold of the stamps before a lone newest frame that stood more than the
  threshold above them shows that newest frame's stamp glitched ahead: it is late, if still
  pending. Frames of the other topic still in flight at a jump (continuing its own stamps: within
  the threshold below its newest then, up to the threshold + timeout above it, a topic delivered
  up to timeout late; and more than slop + timeout ahead of where the jumped topic stands now,
  offsets applied, which a frame of the new timeline delivered within timeout is not) are then
  late rather than a second jump, until that topic's first frame on the new timeline.

Counters (``stats``), per topic, always satisfy
``received == pairs + unpaired + late + overflow + bad stamp + pending``.
"""

import bisect
import collections
import dataclasses
import math
import operator
import statistics
import threading
from typing import Any, NamedTuple, Optional

import numpy as np

# Default reset_threshold (the node's sync.clock_jump): a stamp this much older than its topic's
# newest is a clock jump.
CLOCK_JUMP_S = 1.0
# A thermal frame leaves a visible frame after it to the next thermal frame when that one is
# nearer (``_yields``). Whether a nearer one can still come is judged from the shortest interval
# between the last INTERVAL_WINDOW thermal frames decided and this one, times INTERVAL_MARGIN for
# stamp jitter: within half of that none can, and the frame pairs without waiting for the next.
INTERVAL_WINDOW = 8
INTERVAL_MARGIN = 0.9
# _partner's answer while a frame still to come could change the pairing.
_WAIT = object()


class Pair(NamedTuple):
    """A thermal frame and its visible partner, with their original stamps (ns)."""

    thermal_stamp: int
    visible_stamp: int
    thermal: Any
    visible: Any
    timeline: int = 0  # clock jumps (resets) before it was decided


@dataclasses.dataclass(frozen=True)
class SyncStats:
    """Counts since construction; per topic received == pairs + unpaired + late + overflow +
    bad stamp + pending (unconfirmed frames are among the pending)."""

    thermal_received: int = 0
    visible_received: int = 0
    pairs: int = 0
    thermal_unpaired: int = 0  # decided without a partner within slop
    visible_unpaired: int = 0  # left behind by a newer pair or too old for any thermal frame
    thermal_late: int = 0  # not newer than a decided frame, a repeated stamp, pre-jump or glitched
    visible_late: int = 0
    thermal_overflow: int = 0  # dropped as the oldest of a full queue
    visible_overflow: int = 0
    thermal_bad_stamp: int = 0  # zero or negative stamp
    visible_bad_stamp: int = 0
    thermal_pending: int = 0  # buffered, not decided yet (held frames included)
    visible_pending: int = 0
    # Of the pending: frames whose timeline is not known yet, a jump or a glitched stamp (held
    # far behind their topic, or alone far ahead of it): 0 to 2.
    thermal_unconfirmed: int = 0
    visible_unconfirmed: int = 0
    resets: int = 0  # backwards clock jumps


class ArrivalClock:
    """Seconds that time the frames' arrivals for FusionPipeline's `arrived` and `expire`, and so
    `sync.timeout`: steady wall time, or on sim time (use_sim_time, /clock) wall time at the pace
    of the simulation clock where it runs slower than real time. A simulator at a tenth of real
    time delivers a partner 0.04 s later in its stamps 0.4 s later by the wall clock, and wall
    time lost such pairs at the default timeout; a /clock faster than real time must not shorten
    the wall time that transport and decoding take. The pace is measured over the /clock values
    of the last PACE_WINDOW_S (a clock published at 1 Hz steps; this time does not); while /clock
    stands still for more than STILL_S (paused, a bag played with --clock that ended, no /clock
    yet) it is 1, so a frame still waiting is decided, and before it is known (/clock has not
    changed since its first value, the first heard where the node started before it, or since
    it jumped back on a looping bag) 0. It never goes back, and switching between wall and sim
    time (use_sim_time set while running) continues from where it was."""

    PACE_WINDOW_S = 2.0  # wall seconds of /clock values the pace is measured over
    STILL_S = 1.0  # wall seconds without a change of /clock: it stands still

    def __init__(self):
        self._now = 0.0
        self._wall = None  # wall time of the latest reading
        self._changes = collections.deque()  # (wall, sim) where /clock took a new value

    def now(self, wall_s: float, sim_s: float | None = None) -> float:
        """The arrival time at steady wall time `wall_s`, on sim time at simulation time
        `sim_s` (seconds; None: wall time alone)."""
        elapsed = 0.0 if self._wall is None else max(0.0, wall_s - self._wall)
        self._wall = wall_s
        self._now += elapsed * self._pace(wall_s, sim_s)
        return self._now

    def sim_step(self) -> float:
        """The largest step of the simulation clock between the changes of it seen lately (s):
        how far its time at a frame's arrival may stand behind the stamp the simulator gave the
        frame (a /clock published at 10 Hz, as Gazebo classic's by default, by up to 0.1 s);
        inf until two are seen. For sim time only (`now` given `sim_s`)."""
        sims = [sim for _, sim in self._changes]
        return max((later - earlier for earlier, later in zip(sims, sims[1:])),
                   default=math.inf)

    def _pace(self, wall_s: float, sim_s: float | None) -> float:
        """Simulation seconds per wall second, within [0, 1]."""
        changes = self._changes
        if sim_s is None:
            changes.clear()
            return 1.0
        # Jumped back, or first heard: a new clock. rclpy reads sim time 0 until the first
        # /clock; measured from that 0, a node started before the simulator or bag took the
        # first value for a clock far ahead (pace 1 for PACE_WINDOW_S), and a slow simulation's
        # first frames were timed out by the wall clock. While no /clock comes, the 0 stands
        # still like any other value.
        heard_first = changes and changes[-1][1] == 0 and sim_s != 0
        if changes and (sim_s < changes[-1][1] or heard_first):
            changes.clear()
        if not changes or sim_s != changes[-1][1]:
            changes.append((wall_s, sim_s))
        while len(changes) > 2 and wall_s - changes[1][0] > self.PACE_WINDOW_S:
            changes.popleft()
        if wall_s - changes[-1][0] > self.STILL_S:
            return 1.0
        (first_wall, first_sim), (last_wall, last_sim) = changes[0], changes[-1]
        if last_wall <= first_wall:
            return 0.0
        return min(1.0, (last_sim - first_sim) / (last_wall - first_wall))


class Delivery(NamedTuple):
    """How unevenly an input arrived, stamp for stamp (s; StampSkew.delivery). `behind` is the
    wait that pairs its slow frames, where the cameras' clocks agree."""

    spread: float  # its slow frames (90th percentile of lateness) after its quick ones (10th)
    behind: float  # its slow frames after the other input's typical one (median)


class StampSkew:
    """How far the thermal camera's stamps run ahead of the visible camera's: per topic the
    median of (stamp - arrival) over its last WINDOW frames, thermal minus visible, arrival in
    stamp seconds at the pace the stamps advance (delivery).

    Arrival times cancel what the two clocks share, so cameras stamping on clocks that differ
    show as the skew whatever their rates (and a replay's) and however the synchronizer buffers
    them; a difference in delivery delay adds to it, as it does to what pairs. The median is the
    lower middle value, one a frame had: the mean of two middle ones would give half of an
    offset that has just appeared, when half of the window has it.
    """

    WINDOW = 30
    # Both inputs' stamps advancing this much faster or slower than their arrivals are a
    # replay at another rate (StampSkew.delivery); less may be bursts.
    PACE_TOLERANCE = 0.2
    # A window spanning this much of stamps or more tells its pace: a full one of a camera up to
    # 70 Hz does (30 frames at 30 Hz span 0.97 s), and jitter of tens of ms moves the pace far
    # less than PACE_TOLERANCE. A shorter one (the first frames, a frozen stamp) tells nothing.
    PACE_SPAN_S = 0.4

    def __init__(self):
        # Per role (stamp, arrival) in seconds, of the last WINDOW frames with a stamp.
        self._frames = {'thermal': collections.deque(maxlen=self.WINDOW),
                        'visible': collections.deque(maxlen=self.WINDOW)}

    def add(self, role: str, stamp_ns: int, arrived_s: float) -> None:
        """Note a frame of `role` ('thermal' or 'visible') stamped `stamp_ns`, arrived at
        `arrived_s` (any clock, the same for both topics); an unset stamp (<= 0, which the
        synchronizer rejects) tells nothing of the camera's clock."""
        if stamp_ns > 0:
            self._frames[role].append((stamp_ns / 1e9, arrived_s))

    def seconds(self) -> Optional[float]:
        """Thermal stamps' lead over visible ones (s); None before a frame of each topic."""
        thermal, visible = self._frames['thermal'], self._frames['visible']
        if not thermal or not visible:
            return None
        # At another pace the arrivals drift against the stamps, and a 9 Hz window, reaching
        # seconds further back than a 30 Hz one, read that drift as a skew.
        pace = self._pace()
        return (statistics.median_low(stamp - arrived / pace for stamp, arrived in thermal)
                - statistics.median_low(stamp - arrived / pace for stamp, arrived in visible))

    def clear(self) -> None:
        """Forget every frame: the stamps jumped to a new timeline (the synchronizer reset)."""
        for frames in self._frames.values():
            frames.clear()

    def delivery(self) -> dict[str, Optional[Delivery]]:
        """How unevenly each input arrived, by role, over its last WINDOW frames; None for one
        with fewer than 10.

        A frame's lateness is its arrival less its stamp, at the pace the stamps advance: one
        arrival second per stamp second, unless both inputs' windows (spanning PACE_SPAN_S
        or more of stamps) advance at another pace, alike (a bag played at another rate than it
        was recorded, without /clock). A line fitted on each input alone would take a window
        that holds a single burst for a stopped clock. A middleware delivering one input in
        bursts widens its lateness; so does, for a window's length, a camera clock that steps
        back or ahead without a jump (less than sync.clock_jump).
        """
        pace = self._pace()
        lateness = {role: np.array([arrived - pace * stamp for stamp, arrived in frames])
                    for role, frames in self._frames.items()}
        result = dict.fromkeys(self._frames)
        for role, late in lateness.items():
            if len(late) < 10:
                continue
            quick, slow = np.percentile(late - late[0], [10, 90])  # near 0: well-conditioned
            other = next(lates for name, lates in lateness.items() if name != role)
            typical = np.median(other - late[0]) if len(other) else quick
            result[role] = Delivery(float(slow - quick), float(slow - typical))
        return result

    def _pace(self) -> float:
        """Arrival seconds per stamp second, alike for both inputs (StampSkew.delivery)."""
        paces = []
        for frames in self._frames.values():
            if len(frames) < 2 or frames[-1][0] - frames[0][0] < self.PACE_SPAN_S:
                return 1.0  # too short to tell
            (first_stamp, first_arrival), (last_stamp, last_arrival) = frames[0], frames[-1]
            if last_arrival <= first_arrival:
                return 1.0  # one burst (or a receipt clock stepped back): no replay's pace
            paces.append((last_arrival - first_arrival) / (last_stamp - first_stamp))
        if all(pace > 1 + self.PACE_TOLERANCE for pace in paces) or all(
                pace < 1 - self.PACE_TOLERANCE for pace in paces):
            return statistics.median(paces)
        return 1.0


class StampLead:
    """How far each input's stamps run ahead of the frames' arrival on the clock the stamps
    should be on (the node's: ROS time, or sim time under use_sim_time), as matched
    (sync.thermal_offset added to thermal stamps).

    No delivery makes a stamp later than its arrival: a frame stamped ahead of it by more than
    TOLERANCE_S comes from a camera clock ahead of the node's (a camera on another computer
    without chrony or PTP, a driver stamping with its device's clock). A clock behind looks like
    delivery latency and is not told. Stamps more than `off_clock_s` ahead are off the node
    clock altogether (a clock on another epoch, counted apart by the node), not counted here.
    Per input, `ahead` counts the frames stamped ahead; `fault` names the input whose frames,
    over the last PAIRS pairs made, were stamped ahead of their arrival and of their partners'
    (both cameras on one such clock pair frames as captured): those pairs join frames captured
    apart.
    """

    # chrony and PTP keep clocks within a millisecond, a driver's stamp lies before the frame's
    # arrival: 50 ms ahead is no jitter, and well below the 0.5 s a clock left unsynchronized
    # for weeks drifts.
    TOLERANCE_S = 0.05
    # Pairs the fault is read over (medians): one glitched stamp names nothing, and a fault
    # fixed (sync.thermal_offset set) stops being named after 5 pairs.
    PAIRS = 10

    def __init__(self, off_clock_s: float, frames: int):
        """`frames`: the most frames of an input that may arrive between a frame's arrival and
        its pairing (the synchronizer's queue and more)."""
        self.off_clock_s = off_clock_s
        self.ahead = {'thermal': 0, 'visible': 0}
        # Per input {stamp ns: lead s} of its last `frames` frames (stamp less arrival, before
        # the offset), for the pairs they make.
        self._leads = {role: collections.OrderedDict() for role in self.ahead}
        self._frames = frames
        self._pairs = collections.deque(maxlen=self.PAIRS)  # matched (thermal, visible) leads

    def add(self, role: str, stamp_ns: int, arrived_s: float, thermal_offset_s: float = 0.0,
            allowance_s: float = 0.0) -> None:
        """Note a frame of `role` stamped `stamp_ns`, arrived at `arrived_s` on the stamps'
        clock, matched with sync.thermal_offset (`thermal_offset_s`) added to a thermal stamp;
        `allowance_s`: how far behind the stamps that clock may read at an arrival (sim time's
        steps). An unset stamp tells nothing, nor an arrival on a clock whose steps are not
        known yet (inf)."""
        if stamp_ns <= 0 or allowance_s == math.inf:
            return
        leads = self._leads[role]
        leads[stamp_ns] = stamp_ns / 1e9 - arrived_s - allowance_s
        if len(leads) > self._frames:
            leads.popitem(last=False)
        offset_s = thermal_offset_s if role == 'thermal' else 0.0
        if self._is_ahead(leads[stamp_ns] + offset_s):
            self.ahead[role] += 1

    def pair(self, thermal_ns: int, visible_ns: int, thermal_offset_s: float) -> None:
        """Note a pair made of the frames stamped so, with this sync.thermal_offset."""
        thermal = self._leads['thermal'].get(thermal_ns)
        visible = self._leads['visible'].get(visible_ns)
        if thermal is not None and visible is not None:
            self._pairs.append((thermal + thermal_offset_s, visible))

    def fault(self) -> tuple[str, float, float] | None:
        """(role, lead, apart) over the last PAIRS pairs (medians, s): the input whose frames
        were stamped `lead` ahead of their arrival and `apart` ahead of their partners', which
        were captured that much later; None while none was (or fewer pairs were made)."""
        if len(self._pairs) < self.PAIRS:
            return None
        thermal = statistics.median_low(lead for lead, _ in self._pairs)
        visible = statistics.median_low(lead for _, lead in self._pairs)
        apart = statistics.median_low(thermal - visible for thermal, visible in self._pairs)
        for role, lead, ahead in (('thermal', thermal, apart), ('visible', visible, -apart)):
            if self._is_ahead(lead) and ahead > self.TOLERANCE_S:
                return role, lead, ahead
        return None

    def _is_ahead(self, lead_s: float) -> bool:
        return self.TOLERANCE_S < lead_s <= self.off_clock_s


class _Frame(NamedTuple):
    key: int  # stamp + offset: what is matched
    stamp: int
    payload: Any


def _key(frame: _Frame) -> int:
    return frame.key


@dataclasses.dataclass
class _Stream:
    """One topic's buffer (sorted by key), clock state and counters."""

    offset: int
    frames: list[_Frame] = dataclasses.field(default_factory=list)
    newest: Optional[int] = None  # newest stamp on the timeline, for clock-jump detection
    runner_up: Optional[int] = None  # the newest stamp before it, to tell a glitch ahead
    held: Optional[_Frame] = None  # far behind ``newest``: a jump back or a glitched stamp
    decided: Optional[int] = None  # newest key paired or dropped: older arrivals are late
    # After the other topic jumped back in time: stamps in [stale_from, stale_to] may be of the
    # old timeline, still in flight (see _accept).
    stale_from: Optional[int] = None
    stale_to: Optional[int] = None
    received: int = 0
    unpaired: int = 0
    late: int = 0
    overflow: int = 0
    bad_stamp: int = 0

    def note_stamp(self, stamp: int) -> None:
        """Track the two newest stamps on the timeline."""
        if self.newest is None or stamp > self.newest:
            self.runner_up, self.newest = self.newest, stamp
        elif stamp < self.newest and (self.runner_up is None or stamp > self.runner_up):
            self.runner_up = stamp

    def lone_ahead(self, threshold: int) -> bool:
        """Whether the newest frame, still pending, stands alone more than ``threshold`` above
        the stamps before it: a stamp glitched ahead, or a jump ahead not borne out yet."""
        return (self.runner_up is not None and self.newest - self.runner_up > threshold
                and bool(self.frames) and self.frames[-1].stamp == self.newest)

    def unconfirmed(self, threshold: int) -> int:
        """Pending frames whose timeline is not known yet."""
        return (self.held is not None) + self.lone_ahead(threshold)

    def drop_oldest(self, count: int) -> None:
        """Remove the ``count`` oldest frames (the caller counts why)."""
        self.decided = _newest(self.decided, self.frames[count - 1].key)
        del self.frames[:count]


def _newest(current: Optional[int], candidate: int) -> int:
    return candidate if current is None else max(current, candidate)


def _seconds_to_ns(value: float, name: str, minimum: float, inclusive: bool = True) -> int:
    """Validate a parameter in seconds (ValueError with a reason) and convert it to ns."""
    low_ok = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and low_ok):
        bound = '>=' if inclusive else '>'
        raise ValueError(f'{name} must be finite and {bound} {minimum} s, got {value}')
    return round(value * 1e9)


class PairSynchronizer:
    """Pair thermal and visible frames by header stamp (int ns); see the module docstring.

    ``add_thermal`` / ``add_visible`` / ``expire`` / ``flush`` return the pairs decided by that
    call, oldest first. Calls are serialized by an internal lock, and no user code runs under it.
    """

    def __init__(self, slop: float, queue_size: int, thermal_offset: float = 0.0,
                 visible_offset: float = 0.0, timeout: float = 0.5,
                 reset_threshold: float = CLOCK_JUMP_S) -> None:
        """Validate the parameters (ValueError with a reason); times are in seconds."""
        self._slop = _seconds_to_ns(slop, 'slop', 0.0)
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f'queue_size must be an integer >= 1, got {queue_size!r}')
        self._queue_size = queue_size
        self._timeout = _seconds_to_ns(timeout, 'timeout', 0.0, inclusive=False)
        self._reset_threshold = _seconds_to_ns(reset_threshold, 'reset_threshold', 0.0,
                                               inclusive=False)
        self._thermal = _Stream(_seconds_to_ns(thermal_offset, 'thermal_offset', -math.inf))
        self._visible = _Stream(_seconds_to_ns(visible_offset, 'visible_offset', -math.inf))
        self._floor: Optional[int] = None  # thermal frames still to come have keys above this
        # The stamps of the thermal frames decided last, for their shortest interval.
        self._recent_thermal = collections.deque(maxlen=INTERVAL_WINDOW)
        self._pairs = 0
        self._resets = 0
        self._inserted: Optional[_Frame] = None  # the frame _place buffered last
        self._took_last = False
        self._lock = threading.Lock()

    @property
    def slop(self) -> float:
        """Largest stamp difference of a pair, in seconds (may change while running)."""
        return self._slop / 1e9

    @slop.setter
    def slop(self, seconds: float) -> None:
        slop = _seconds_to_ns(seconds, 'slop', 0.0)
        with self._lock:
            self._slop = slop

    @property
    def timeout(self) -> float:
        """Seconds past its stamp + slop that a thermal frame waits for its partner."""
        return self._timeout / 1e9

    @property
    def queue_size(self) -> int:
        """Frames a topic's queue holds before the oldest is decided (sync.queue_size)."""
        return self._queue_size

    @property
    def thermal_offset(self) -> float:
        """Seconds added to thermal stamps for matching (may change while running)."""
        return self._thermal.offset / 1e9

    @thermal_offset.setter
    def thermal_offset(self, seconds: float) -> None:
        offset = _seconds_to_ns(seconds, 'thermal_offset', -math.inf)
        with self._lock:
            # Every thermal key (pending, held, the newest decided, and the floor that frames
            # still to come stay above) moves by the change, as if the new offset had been set
            # all along: their order and what is late stay as they were, pairs made stay made,
            # and frames pending pair on the new keys from the next call on.
            shift, stream = offset - self._thermal.offset, self._thermal
            stream.offset = offset
            stream.frames = [frame._replace(key=frame.key + shift) for frame in stream.frames]
            if stream.held is not None:
                stream.held = stream.held._replace(key=stream.held.key + shift)
            if stream.decided is not None:
                stream.decided += shift
            if self._floor is not None:
                self._floor += shift

    def thermal_key(self, stamp_ns: int) -> int:
        """A thermal stamp on the clock frames are matched and expired on (stamp + offset)."""
        return stamp_ns + self._thermal.offset

    def visible_key(self, stamp_ns: int) -> int:
        """A visible stamp on the clock frames are matched and expired on (stamp + offset)."""
        return stamp_ns + self._visible.offset

    def add_thermal(self, stamp_ns: int, payload: Any) -> list[Pair]:
        """Take a thermal frame; return the pairs it completes."""
        with self._lock:
            return self._add(self._thermal, stamp_ns, payload)

    def add_visible(self, stamp_ns: int, payload: Any) -> list[Pair]:
        """Take a visible frame; return the pairs it completes."""
        with self._lock:
            return self._add(self._visible, stamp_ns, payload)

    @property
    def took_last(self) -> bool:
        """Whether the last add_thermal / add_visible took its frame on a known timeline:
        buffered or paired, neither late, of a bad stamp, held far behind its topic nor alone
        far ahead of it. Only such a frame may anchor the stamps' clock (FusionPipeline.expire):
        the counts of ``stats`` also change as the other topic's frames are confirmed."""
        with self._lock:
            return self._took_last

    def expire(self, now_ns: int) -> list[Pair]:
        """Decide thermal frames whose visible partner is overdue by ``timeout`` at ``now_ns``."""
        with self._lock:
            cutoff = operator.index(now_ns) - self._timeout
            pairs = []
            while self._thermal.frames and self._thermal.frames[0].key + self._slop <= cutoff:
                decided = self._decide_oldest(known_until=cutoff)
                if decided is None:
                    break
                pairs += decided
            # Thermal frames stamped before the cutoff would have arrived by now. The cutoff is
            # not kept as a floor: when both topics pause (a paused bag) it runs ahead of frames
            # still to come, and those would lose their visible partners after the pause.
            self._prune_visible(cutoff)
            return pairs

    def flush(self) -> list[Pair]:
        """Decide every buffered frame with what is known (end of stream)."""
        with self._lock:
            pairs = self._flush()
            self._flush_held()
            return pairs

    @property
    def stats(self) -> SyncStats:
        """A snapshot of the counters."""
        with self._lock:
            thermal, visible = self._thermal, self._visible
            return SyncStats(
                thermal_received=thermal.received, visible_received=visible.received,
                pairs=self._pairs, thermal_unpaired=thermal.unpaired,
                visible_unpaired=visible.unpaired, thermal_late=thermal.late,
                visible_late=visible.late, thermal_overflow=thermal.overflow,
                visible_overflow=visible.overflow, thermal_bad_stamp=thermal.bad_stamp,
                visible_bad_stamp=visible.bad_stamp,
                thermal_pending=len(thermal.frames) + (thermal.held is not None),
                visible_pending=len(visible.frames) + (visible.held is not None),
                thermal_unconfirmed=thermal.unconfirmed(self._reset_threshold),
                visible_unconfirmed=visible.unconfirmed(self._reset_threshold),
                resets=self._resets)

    def _add(self, stream: _Stream, stamp_ns: int, payload: Any) -> list[Pair]:
        self._inserted = None
        pairs = self._accept(stream, stamp_ns, payload)
        frame = self._inserted  # of this call: a jump places the held frames before it
        pairs += self._decide_ready()
        self._took_last = frame is not None and frame.stamp == stamp_ns and not (
            stream.lone_ahead(self._reset_threshold) and stream.frames[-1] is frame)
        return pairs

    def _accept(self, stream: _Stream, stamp_ns: int, payload: Any) -> list[Pair]:
        """Buffer one frame unless its stamp is bad or late; return pairs flushed by a clock
        jump or decided by a full queue."""
        stamp = operator.index(stamp_ns)
        stream.received += 1
        if stamp <= 0:
            stream.bad_stamp += 1
            return []
        if stream.stale_from is not None:
            # In flight when the other topic jumped back: continuing this topic's own stamps
            # (from its newest then less the jump threshold up to that plus the threshold and
            # the timeout: a frame far beyond it jumped too), and further ahead (offsets applied)
            # of where the other stands now than a frame of the new timeline can be (a single
            # glitched stamp of the other topic leaves this topic's frames level with its own).
            other = self._other(stream)
            ahead = (stamp + stream.offset) - (other.newest + other.offset) > (
                self._slop + self._timeout)
            if stream.stale_from <= stamp <= stream.stale_to and ahead:
                stream.late += 1
                return []
            stream.stale_from = stream.stale_to = None  # its first frame on the new timeline
        return self._place(stream, _Frame(stamp + stream.offset, stamp, payload))

    def _place(self, stream: _Stream, frame: _Frame) -> list[Pair]:
        """Buffer a frame, hold it if far behind its topic, or confirm a held frame's jump with
        it; return the pairs a confirmed jump flushed or a full queue decided."""
        other = self._other(stream)
        if stream.held is not None and frame.stamp == stream.held.stamp:
            stream.late += 1  # a repeat of the held frame tells nothing of its timeline
            return []
        if other.held is not None and self._on_held_timeline(other, frame.key):
            # This topic's frame on the other's held timeline: both topics jumped back.
            return self._jump(other, other_in_flight=False) + self._place(stream, frame)
        if stream.held is not None and self._continues_held(stream, frame.stamp):
            # Its topic's next frame goes on from the held one: a jump.
            return self._jump(stream, other_in_flight=True) + self._place(stream, frame)
        if stream.newest is not None and frame.stamp < stream.newest - self._reset_threshold:
            if not self._drop_glitch_ahead(stream, frame.stamp):
                stream.held = frame
                return []
        elif stream.held is not None:
            stream.held = None  # back on its timeline: the held frame's stamp was glitched
            stream.late += 1
        stream.note_stamp(frame.stamp)
        index = bisect.bisect_left(stream.frames, frame.key, key=_key)
        repeated = index < len(stream.frames) and stream.frames[index].key == frame.key
        if repeated or (stream.decided is not None and frame.key <= stream.decided):
            stream.late += 1
            return []
        stream.frames.insert(index, frame)
        self._inserted = frame
        pairs = []
        if len(stream.frames) > self._queue_size and self._borne_out():
            # The oldest thermal frame waits for the next (``_yields``): decided now with what
            # is known, so the overflow costs neither it nor its partner.
            pairs = self._decide_oldest(known_until=math.inf)
        if len(stream.frames) > self._queue_size:
            stream.drop_oldest(1)
            stream.overflow += 1
        return pairs

    def _continues_held(self, stream: _Stream, stamp: int) -> bool:
        """Whether the next frame of ``stream`` bears out its held frame's timeline: as far
        behind the old newest, or after the held frame and nearer to it than to the old newest
        (a short bag looped jumps back little more than the threshold)."""
        newest, held = stream.newest, stream.held.stamp
        return (stamp < newest - self._reset_threshold
                or held <= stamp and stamp - held < newest - stamp)

    def _on_held_timeline(self, stream: _Stream, key: int) -> bool:
        """Whether a frame of the other topic (offset stamp ``key``) bears out the timeline of
        ``stream``'s held frame: near it, and as far behind where ``stream`` stood."""
        threshold = self._reset_threshold
        return (abs(key - stream.held.key) <= threshold
                and key < stream.newest + stream.offset - threshold)

    def _drop_glitch_ahead(self, stream: _Stream, stamp: int) -> bool:
        """Where ``stamp`` goes on from the runner-up (after it, as a topic's frames arrive in
        order), and the newest frame alone stood more than the threshold above it, is still
        pending and is not borne out by the other topic, that frame's stamp glitched ahead:
        drop it as late and return True. Otherwise the newest is a real frame above a gap
        (dropped frames, a pause) and ``stamp`` the one out of order: held like any far behind
        the newest."""
        if not self._maybe_glitched_ahead(stream) or stamp <= stream.runner_up:
            return False
        stream.frames.pop()
        stream.late += 1
        stream.newest, stream.runner_up = stream.runner_up, None
        return True

    def _maybe_glitched_ahead(self, stream: _Stream) -> bool:
        """Whether the newest frame of ``stream`` stands alone far ahead (``lone_ahead``) and
        the other camera's frames have not reached its time (within slop): it may be a glitched
        stamp. Once they have, it is a real frame after a silence."""
        if not stream.lone_ahead(self._reset_threshold):
            return False
        other = self._other(stream)
        return (other.newest is None
                or other.newest + other.offset < stream.newest + stream.offset - self._slop)

    def _jump(self, stream: _Stream, other_in_flight: bool) -> list[Pair]:
        """A confirmed jump back of ``stream``: flush, then start the new timeline with the
        held frames (``other_in_flight``: the other topic may still send old-timeline frames)."""
        other = self._other(stream)
        held = [(topic, topic.held) for topic in (stream, other) if topic.held is not None]
        pairs = self._reset(stream, other_in_flight)
        for topic, first in held:
            self._place(topic, first)
        return pairs

    def _decide_ready(self) -> list[Pair]:
        """Decide the thermal frames that have a visible frame stamped at or after them within
        slop, or beyond slop one that another frame bears out: a second visible frame after
        them, or a thermal frame as late as it, within slop. A lone frame far ahead may be a
        glitched stamp, whose real time is still to come in order: deciding on it would lose
        every thermal frame it overtook."""
        pairs = []
        while self._borne_out():
            decided = self._decide_oldest()
            if decided is None:
                break
            pairs += decided
        self._prune_visible()
        return pairs

    def _borne_out(self) -> bool:
        """Whether the oldest thermal frame has a visible frame stamped at or after it within
        slop, or beyond slop one another frame bears out (``_decide_ready``)."""
        thermal, visible = self._thermal.frames, self._visible.frames
        if not thermal:
            return False
        key = thermal[0].key
        first = bisect.bisect_left(visible, key, key=_key)  # the first at or after it
        if first == len(visible):
            return False
        ahead = visible[first].key
        return (ahead - key <= self._slop or first < len(visible) - 1
                or thermal[-1].key >= ahead - self._slop)

    def _decide_oldest(self, known_until: Optional[int] = None) -> Optional[list[Pair]]:
        """Pair the oldest thermal frame with the nearest buffered visible within slop, if any,
        unless it leaves that one to the next thermal frame (``_partner``); None while a frame
        still to come could change that. Every frame with a key up to ``known_until`` has
        arrived (expire's cutoff; None: only what is buffered is known; inf at the end)."""
        partner = self._partner(known_until)
        if partner is _WAIT:
            return None
        frame = self._thermal.frames[0]
        self._thermal.drop_oldest(1)
        self._floor = _newest(self._floor, frame.key)
        self._recent_thermal.append(frame.stamp)
        if partner is None:
            self._thermal.unpaired += 1
            return []
        # Visible frames older than the partner can no longer pair: pairs stay monotonic.
        self._visible.unpaired += partner
        visible = self._visible.frames[partner]
        self._visible.drop_oldest(partner + 1)
        self._pairs += 1
        return [Pair(frame.stamp, visible.stamp, frame.payload, visible.payload, self._resets)]

    def _partner(self, known_until: Optional[int]):
        """The index in the visible buffer of the oldest thermal frame's partner, None for none,
        or _WAIT: the nearest visible within slop (ties go to the earlier), but not one after
        it that the next thermal frame is nearer to and takes (``_yields``): a thermal frame
        taking the partner of the next, as one dropped visible frame would make every frame at
        equal rates do, would shift every pair after it by a frame."""
        thermal, visible = self._thermal.frames, self._visible.frames
        key = thermal[0].key
        after = bisect.bisect_right(visible, key, key=_key)
        nearest = [index for index in (after - 1, after) if 0 <= index < len(visible)
                   and abs(visible[index].key - key) <= self._slop]
        if not nearest:
            return None
        best = min(nearest, key=lambda index: abs(visible[index].key - key))
        if best != after:
            return best
        yields = self._yields(best, known_until)
        if yields is _WAIT:
            return _WAIT
        if not yields:
            return best
        return after - 1 if after - 1 in nearest else None

    def _yields(self, index: int, known_until: Optional[int]):
        """Whether the next thermal frame takes visible frame ``index``, after the oldest thermal
        frame: it is nearer to it (its key below ``reach``), and nearer to it than to the
        visible frame after it; _WAIT while a frame still to come could tell."""
        thermal, visible = self._thermal.frames, self._visible.frames
        key, target = thermal[0].key, visible[index].key
        reach = 2 * target - key  # a thermal frame keyed below this is nearer to the target
        recent = [*self._recent_thermal, thermal[0].stamp]
        shortest = min((b - a for a, b in zip(recent, recent[1:])), default=math.inf)
        if reach - key <= INTERVAL_MARGIN * shortest:
            return False  # the next thermal frame comes later than the reach
        # A lone frame far ahead may be a glitched stamp, before which the next still comes.
        known = thermal[1:-1] if self._maybe_glitched_ahead(self._thermal) else thermal[1:]
        if not known:
            return _WAIT if known_until is None or known_until < reach else False
        following = known[0].key
        if following >= reach:
            return False
        if following <= target:  # every visible frame after the target is farther from it
            return True
        # The next thermal frame takes the target unless the visible frame after it is nearer.
        later = (visible[index + 1:-1] if self._maybe_glitched_ahead(self._visible)
                 else visible[index + 1:])
        if later:
            return abs(target - following) <= abs(later[0].key - following)
        # By then a visible frame nearer to the next thermal frame would have come.
        return _WAIT if known_until is None or known_until < following + abs(
            target - following) else True

    def _prune_visible(self, cutoff: Optional[int] = None) -> None:
        """Drop visible frames too old to pair with a pending or future thermal frame.

        Future thermal frames have keys above the last decided one, and above ``cutoff`` if given.
        """
        floors = [floor for floor in (self._floor, cutoff) if floor is not None]
        if not floors:
            return
        limit = max(floors)
        if self._thermal.frames:
            limit = min(limit, self._thermal.frames[0].key - 1)
        count = bisect.bisect_right(self._visible.frames, limit - self._slop, key=_key)
        if count:
            self._visible.drop_oldest(count)
            self._visible.unpaired += count

    def _flush(self) -> list[Pair]:
        pairs = []
        while self._thermal.frames:
            pairs += self._decide_oldest(known_until=math.inf)
        if self._visible.frames:
            self._visible.unpaired += len(self._visible.frames)
            self._visible.drop_oldest(len(self._visible.frames))
        return pairs

    def _flush_held(self) -> None:
        """End of stream: a held frame's timeline is never told, so it pairs with nothing."""
        for stream in (self._thermal, self._visible):
            if stream.held is not None:
                stream.held = None
                stream.unpaired += 1

    def _other(self, stream: _Stream) -> _Stream:
        return self._visible if stream is self._thermal else self._thermal

    def _reset(self, jumped: _Stream, other_in_flight: bool) -> list[Pair]:
        """Flush, then forget the clock state of both topics (counters are kept); the caller
        places the held frames."""
        pairs = self._flush()
        # The other topic's frames still in flight continue its own stamps (where the jumped
        # topic stood says little: it may have paused before the jump). Without a frame since
        # the last reset, it keeps the filter it has (none if it never had a frame).
        other = self._other(jumped)
        if other_in_flight and other.newest is not None:
            other.stale_from = other.newest - self._reset_threshold
            other.stale_to = other.newest + self._reset_threshold + self._timeout
        for stream in (self._thermal, self._visible):
            stream.newest = stream.runner_up = stream.decided = stream.held = None
        self._floor = None
        self._recent_thermal.clear()
        self._resets += 1
        return pairs
