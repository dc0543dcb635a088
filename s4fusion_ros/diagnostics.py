"""The keys of the node's diagnostics values: one definition for the node and whoever reads them.

The node publishes every value as a string under these keys (a diagnostic_msgs/KeyValue each);
the demo, s4fusion-flood and the tests read them back by the same names. Free of ROS imports.
"""

import enum
import math

from . import settings
from .sync import StampLead

ROLES = ('thermal', 'visible')
# End-to-end latency (node clock at publish minus the visible stamp) is only meaningful when the
# stamps come from the node's clock: a bag played in wall time without /clock gives years. Outside
# this range (seconds) the stamps and the clock disagree, and no latency is reported.
PLAUSIBLE_LATENCY_S = (-1.0, 60.0)


class Key(enum.StrEnum):
    """A diagnostics key, compared and formatted as the string the node publishes."""

    THERMAL_RATE = 'thermal rate (Hz)'
    VISIBLE_RATE = 'visible rate (Hz)'
    FUSED_RATE = 'fused rate (Hz)'
    THERMAL_RECEIVED = 'thermal received'
    VISIBLE_RECEIVED = 'visible received'
    THERMAL_BAD_MESSAGE = 'thermal rejected (bad message)'
    VISIBLE_BAD_MESSAGE = 'visible rejected (bad message)'
    PAIRS = 'pairs'
    THERMAL_UNPAIRED = 'thermal unpaired'
    VISIBLE_UNPAIRED = 'visible unpaired'
    THERMAL_LATE = 'thermal late'
    VISIBLE_LATE = 'visible late'
    THERMAL_OVERFLOW = 'thermal overflow'
    VISIBLE_OVERFLOW = 'visible overflow'
    THERMAL_BAD_STAMP = 'thermal rejected (bad stamp)'
    VISIBLE_BAD_STAMP = 'visible rejected (bad stamp)'
    THERMAL_OUTLIERS = 'thermal frames outside the window (scaled by it)'
    THERMAL_PUBLISHERS = 'thermal publishers heard (last 5 s)'
    VISIBLE_PUBLISHERS = 'visible publishers heard (last 5 s)'
    THERMAL_PENDING = 'thermal pending'
    VISIBLE_PENDING = 'visible pending'
    SYNC_RESETS = 'sync resets (clock jumps)'
    PAIRS_DROPPED = 'pairs dropped (inference busy)'
    PAIRS_QUEUED = 'pairs queued'
    PAIRS_IN_INFERENCE = 'pairs in inference'
    PAIRS_FUSED = 'pairs fused'
    INFERENCE_ERRORS = 'inference errors'
    PUBLISH_ERRORS = 'publish errors'
    INFERENCE_LATENCY_MEAN = 'inference latency mean (s)'
    INFERENCE_LATENCY_P95 = 'inference latency p95 (s)'
    END_TO_END_LATENCY_MEAN = 'end-to-end latency mean (s)'
    END_TO_END_LATENCY_P95 = 'end-to-end latency p95 (s)'
    STAMPS_OFF_CLOCK = 'pairs stamped off the node clock (no latency)'
    THERMAL_AHEAD = 'thermal stamped ahead of arrival'
    VISIBLE_AHEAD = 'visible stamped ahead of arrival'
    VISIBLE_CAMERA_INFO = 'visible camera_info received'
    SYNC_BACKEND = 'sync backend'
    DEVICE = 'device'
    MODEL = 'model'


def status_name(node_name: str) -> str:
    """The name of the node's DiagnosticStatus, from its fully qualified name (namespace
    included): what a reader of /diagnostics picks the node's values by."""
    return f'{node_name}: fusion'


def node_status(array, node_name: str):
    """The node's DiagnosticStatus in a /diagnostics DiagnosticArray, None where it holds none."""
    return next((status for status in array.status if status.name == status_name(node_name)),
                None)


def values_of(status) -> dict:
    """A DiagnosticStatus's values as {key: value} (strings, as published)."""
    return {kv.key: kv.value for kv in status.values}


def per_input(role: str, count: str) -> Key:
    """Return the key of one input's count, e.g. per_input('thermal', 'unpaired')."""
    return Key(f'{role} {count}')


# Counted by the node's own synchronizer and subscriptions (whose callbacks see the sender);
# message_filters does not report them.
OWN_SYNC_KEYS = tuple(per_input(role, count) for role in ROLES for count in (
    'unpaired', 'late', 'overflow', 'rejected (bad stamp)', 'pending',
    'publishers heard (last 5 s)'))
LATENCY_KEYS = (Key.INFERENCE_LATENCY_MEAN, Key.INFERENCE_LATENCY_P95,
                Key.END_TO_END_LATENCY_MEAN, Key.END_TO_END_LATENCY_P95)
# Nothing left to decide or fuse when all of these read 0 (`nothing_pending`).
BUSY_KEYS = (Key.THERMAL_PENDING, Key.VISIBLE_PENDING, Key.PAIRS_QUEUED, Key.PAIRS_IN_INFERENCE)
# The value of the keys a synchronizer does not report (OWN_SYNC_KEYS under message_filters).
NOT_REPORTED = 'n/a (sync.backend message_filters)'


def nothing_pending(values: dict) -> bool:
    """Whether a diagnostics message shows no frame pending and no pair queued or in inference;
    pending counts message_filters keeps to itself are not reported, so they do not wait."""
    return all(values.get(key) in ('0', NOT_REPORTED) for key in BUSY_KEYS)


def number(values: dict, key: Key) -> float:
    """Return a published value as a number (NaN when absent or not numeric)."""
    try:
        return float(values[key])
    except (KeyError, ValueError):
        return math.nan


# Why a frame was dropped before pairing, as a summary says it, and the per-input count's name.
REJECTIONS = (('late', 'late'), ('overflowed', 'overflow'), ('bad stamp', 'rejected (bad stamp)'),
              ('bad message', 'rejected (bad message)'))


def pairing_summary(values: dict, fused, dropped_detail: str = '') -> str:
    """'F pairs fused of P paired (D dropped while inference was busy[: detail]) from T thermal
    + V visible frames (unpaired: ...)[; frames dropped before pairing: ...]' from diagnostics
    values (numbers, or the strings /diagnostics publishes): 'n/a' for a count not known yet; one
    not reported (NaN, as under sync.backend message_filters) is left out with the zeros."""
    def count(key: Key) -> str:
        value = number(values, key)
        return 'n/a' if math.isnan(value) else f'{value:.0f}'

    rejected = [f'{count(per_input(role, key))} {role} {reason}' for role in ROLES
                for reason, key in REJECTIONS if number(values, per_input(role, key)) > 0]
    detail = f': {dropped_detail}' if dropped_detail else ''
    return (f'{fused} pairs fused of {count(Key.PAIRS)} paired ({count(Key.PAIRS_DROPPED)} '
            f'dropped while inference was busy{detail}) from {count(Key.THERMAL_RECEIVED)} '
            f'thermal + {count(Key.VISIBLE_RECEIVED)} visible frames (unpaired: '
            f'{count(Key.THERMAL_UNPAIRED)} thermal, {count(Key.VISIBLE_UNPAIRED)} visible)'
            + (f'; frames dropped before pairing: {", ".join(rejected)}' if rejected else ''))


def left_at_stop(values: dict) -> str:
    """'left at the stop: ...' from diagnostics values taken as a node stops (its queue counted
    as dropped), or '': the pair the stop cut short (in inference, or fused as ROS shut down
    under its publishing) and the frames still waiting for a partner, so that a run's summary
    accounts for every frame it received. Counts not reported (NaN) are left out."""
    outcomes = (Key.PAIRS_FUSED, Key.PAIRS_DROPPED, Key.INFERENCE_ERRORS, Key.PUBLISH_ERRORS,
                Key.PAIRS_QUEUED)
    counts = {('pair', 'cut short'): number(values, Key.PAIRS)
              - sum(number(values, key) for key in outcomes),
              ('thermal frame', 'pending'): number(values, Key.THERMAL_PENDING),
              ('visible frame', 'pending'): number(values, Key.VISIBLE_PENDING)}
    left = [f'{count:.0f} {noun}{"s" if count > 1 else ""} {state}'
            for (noun, state), count in counts.items() if count > 0]
    return f'left at the stop: {", ".join(left)}' if left else ''


def thermal_frames_lost(grown: dict) -> bool:
    """Whether thermal frames found no partner over a window (`grown`: counts grown): unpaired,
    or, stamped ahead of the stamps' clock, waiting for it until they overflowed
    sync.queue_size. Where they did, `unpaired_hint` says what the stamps tell."""
    return any(grown.get(key, 0) > 0 for key in (Key.THERMAL_UNPAIRED, Key.THERMAL_OVERFLOW))


# Where the live node gives a hint: the setting it names takes effect at the next start.
RESTART = 'read at start: restart the node with it'


def clock_skew_hint(skew_s: float | None, slop_s: float, thermal_offset_s: float,
                    timeout_s: float, node_name: str = '', live: bool = True) -> str:
    """What the stamps tell when thermal frames find no partner ('' where they tell nothing):
    the thermal camera's stamps running ahead of or behind the visible one's by more than
    sync.slop (after sync.thermal_offset), arrival for arrival. Clocks that differ and one topic
    delivered that much later look alike, so both fixes are named: the offset that pairs them,
    if the parameter can take it (with the command that sets it on the running node
    `node_name`, where given), and the sync.timeout that waits for the late topic, where the
    one set is shorter (an offset would pair such frames with the wrong partners). `live`: for
    the node, which reads sync.timeout at start only (offline, a tool's run)."""
    if skew_s is None or abs(skew_s + thermal_offset_s) <= slop_s:
        return ''
    text = (f'thermal stamps run {abs(skew_s):.3f} s {"ahead of" if skew_s > 0 else "behind"} '
            f'visible ones, arrival for arrival (sync.slop {slop_s:g} s, sync.thermal_offset '
            f'{thermal_offset_s:g} s): if the cameras stamp on clocks that differ, ')
    low, high = settings.SPECS['sync.thermal_offset'].range
    if low <= -skew_s <= high:
        text += f'sync.thermal_offset {-skew_s:.3f} pairs them{_set_offset(node_name, -skew_s)}'
    else:
        text += (f'that is more than sync.thermal_offset can take up ({low:g} to {high:g} s): '
                 "synchronize the cameras' clocks (chrony, PTP)")
    wait = abs(skew_s) + slop_s
    if timeout_s < wait <= settings.SPECS['sync.timeout'].range[1]:
        text += (f'; if the {"visible" if skew_s > 0 else "thermal"} frames arrive that much '
                 f'later instead, sync.timeout {wait:.3f} (now {timeout_s:g}'
                 f'{"; " + RESTART if live else ""}) pairs them as stamped')
    return text


def _set_offset(node_name: str, seconds: float) -> str:
    """' (the command that sets sync.thermal_offset to `seconds` on the running node)', or ''
    without a node name."""
    return (f' (ros2 param set {node_name} sync.thermal_offset {seconds:.3f})' if node_name
            else '')


def stamp_lead(queue_size: int) -> StampLead:
    """The StampLead of the synchronizer's inputs, live and offline: frames stamped ahead of
    their arrival, up to where the stamps are off the node clock altogether; any frame of the
    synchronizer's queue (`queue_size`: sync.queue_size) may pair."""
    return StampLead(-PLAUSIBLE_LATENCY_S[0], 2 * queue_size)


def stamped_ahead_message(role: str, lead_s: float, apart_s: float, thermal_offset_s: float,
                          node_name: str = '', offset_settable: bool = True,
                          live: bool = True) -> str:
    """The status while pairs are made of frames captured apart (StampLead.fault): `role`'s
    frames stamped `lead_s` ahead of their arrival on the node clock and `apart_s` ahead of
    their partners'. Only a camera clock ahead does that: the fix is its clock synchronized,
    or the sync.thermal_offset that compensates (added to thermal stamps: less by `apart_s`
    for a thermal camera ahead, more for a visible one), with the command that sets it, where
    the parameter takes it and the backend has it (`offset_settable`: not message_filters).
    Offline (not `live`) the arrival is the bag's log time, on the recorder's clock, and the
    offset is set in the tool's --params file."""
    other = next(name for name in ROLES if name != role)
    clock, machine = (('the node clock', 'this machine') if live else
                      ("the recorder's clock, as logged", 'the recording machine'))
    offset = f', sync.thermal_offset {thermal_offset_s:g} s added' if role == 'thermal' else ''
    text = (f'pairs of frames captured about {apart_s:.3f} s apart: {role} stamps run '
            f'{lead_s:.3f} s ahead of their arrival on {clock} (median over the last '
            f'{StampLead.PAIRS} pairs{offset}; no delivery does that: the {role} camera\'s '
            f'clock runs ahead of {machine}\'s), so its frames pair with {other} frames '
            f'captured that much later; synchronize its clock with {machine} (chrony, PTP)')
    compensating = thermal_offset_s + (-apart_s if role == 'thermal' else apart_s)
    low, high = settings.SPECS['sync.thermal_offset'].range
    if not offset_settable:
        return text + ' (sync.thermal_offset, which could compensate it, needs sync.backend own)'
    if not low <= compensating <= high:
        return text + (f' (the sync.thermal_offset that would compensate it, '
                       f'{compensating:.3f}, is beyond its {low:g} to {high:g} s)')
    text += (f', or set sync.thermal_offset {compensating:.3f}'
             + (_set_offset(node_name, compensating) if live else ' in --params'))
    # The outputs carry the visible stamps: only its clock set right moves them.
    return text + (' (the outputs keep its stamps)' if role == 'visible' else '')


def late_delivery_hint(deliveries: dict, timeout_s: float, live: bool = True) -> str:
    """What the arrivals tell where thermal frames find no partner ('' where they tell nothing):
    an input delivered in bursts (`deliveries`: StampSkew.delivery), whose slow frames come
    more than sync.timeout after its quick ones, loses partners the synchronizer stopped
    waiting for; a longer sync.timeout waits for most of them. `live` as for clock_skew_hint."""
    late = {role: delivery for role, delivery in deliveries.items()
            if delivery is not None and delivery.spread > timeout_s}
    if not late:
        return ''
    bursts = (f'{role} frames arrive in bursts: a tenth of the latest came '
              f'{delivery.spread:.2f} s or more later for their stamps than another tenth'
              for role, delivery in late.items())
    text = (' and '.join(bursts) + ' (a busy machine, a transport that queues, or a publisher '
            "whose Fast DDS shared memory cannot hold its images: the package's README, "
            f'"Transport and QoS"), past sync.timeout {timeout_s:g} s')
    wait = max(max(delivery.spread, delivery.behind) for delivery in late.values())
    if wait <= settings.SPECS['sync.timeout'].range[1]:
        restart = f' ({RESTART})' if live else ''
        return text + f': sync.timeout {wait:.2f}{restart} waits for most of them'
    return text + ': more than sync.timeout can wait for; lighten the machine or the transport'


# Bursts delivered evenly over B seconds spread the lateness about 0.8 B (10th to 90th percentile)
# and move the median about 0.5 B: a skew under this share of the spread may be theirs alone. Of
# a burst of few frames the percentiles span less: a 20 Hz camera delivered in 0.5 s bursts has a
# skew of 0.83 of its spread (0.75 named it an offset). An offset that appears in the window (a
# step) spreads it no more than the skew it makes (0.95-0.99 of it with a little jitter); under
# this share, it reads as bursts until the window has passed the step.
SKEW_OF_BURSTS = 0.9


def unpaired_hint(skew, slop_s: float, thermal_offset_s: float, timeout_s: float,
                  node_name: str = '', live: bool = True) -> str:
    """Why thermal frames found no partner, where the stamps and arrivals tell (`skew`: the
    pipeline's StampSkew; the rest as for clock_skew_hint): an input delivered in bursts, else
    cameras on clocks that differ; '' if neither. Bursts move the stamps' medians too: a skew
    (after sync.thermal_offset) they could make (SKEW_OF_BURSTS) tells no clock difference,
    and an offset chosen from it would pair frames with the wrong partners."""
    deliveries = skew.delivery()
    delivery = late_delivery_hint(deliveries, timeout_s, live)
    uneven = max((each.spread for each in deliveries.values() if each is not None), default=0.0)
    seconds = skew.seconds()
    if delivery or seconds is None or abs(seconds + thermal_offset_s) < SKEW_OF_BURSTS * uneven:
        return delivery
    return clock_skew_hint(seconds, slop_s, thermal_offset_s, timeout_s, node_name, live)


def inference_stall(size: tuple[int, int], seconds: float, window_s: float,
                    full_size: bool) -> str:
    """The stall cause a pair in inference gives ('' where it is none): one in inference for a
    whole window (a camera's huge frames?) with its `size` (width, height) and how long, not
    one just begun after frames that found no partner; with inference_size where the model
    runs at `full_size`."""
    if seconds < window_s:
        return ''
    smaller = '; inference_size runs the model smaller' if full_size else ''
    return (f'{Key.PAIRS_IN_INFERENCE}: 1 (a {size[0]}x{size[1]} pair, for {seconds:.0f} s'
            f'{smaller})')


def late_arrivals(grown: dict, minimum_frames: int) -> str:
    """Which inputs had more than a tenth of their frames come late over a window (`grown`:
    CountsWindow.grown of the node's values), once they sent at least `minimum_frames`: say so
    and what it means ('' where none did). A late frame is dropped uncounted in the pairs, and
    a steady share of them is a source fault rather than noise."""
    late = [f'{grown[per_input(role, "late")]} of {received} {role} frames'
            for role in ROLES
            if (received := grown.get(per_input(role, 'received'), 0)) >= minimum_frames
            and 10 * grown.get(per_input(role, 'late'), 0) > received]
    if not late:
        return ''
    return (f'{" and ".join(late)} came late in the last {grown["span"]:.0f} s (stamped no newer '
            'than a frame already paired or dropped, and dropped: a driver that reorders or '
            'repeats frames, two publishers on one topic, or a camera clock that stepped back, '
            'by less than sync.clock_jump or on the other camera, whose jump restarted pairing?)')


def pairing_shortfall(grown: dict, minimum_frames: int) -> tuple[int, int] | None:
    """(pairs, frames of the slower camera) where fewer than half of those frames found a partner
    over a window (`grown`: CountsWindow.grown of the node's values), once that camera sent at
    least `minimum_frames` with a stamp set; None otherwise. A repeated stamp counts as a frame."""
    if Key.PAIRS not in grown:
        return None
    possible = min(grown.get(per_input(role, 'received'), 0)
                   - grown.get(per_input(role, 'rejected (bad stamp)'), 0) for role in ROLES)
    if possible < minimum_frames or 2 * grown[Key.PAIRS] >= possible:
        return None
    return grown[Key.PAIRS], possible
