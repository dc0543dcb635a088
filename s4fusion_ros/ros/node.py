"""s4fusion_node: fuses synchronized thermal and visible image topics with S4Fusion.

Subscribes  thermal/image_raw, visible/image_raw (sensor_msgs/Image;
            .../compressed with *.transport), visible/camera_info (sensor_msgs/CameraInfo)
Publishes   ~/fused, ~/saliency (sensor_msgs/Image, the visible frame's header; each also as
            image_transport's compressed transport, .../compressed, while subscribed),
            ~/camera_info (the visible camera's, stamped as the outputs), /diagnostics

Message callbacks only decode, pair and queue; the model runs on its own worker thread (see
InferenceWorker), so a slow model never blocks the inputs. The console entry point, with its
handling of stop signals, is run_node.py.
"""

import collections
import contextlib
import copy
import math
import re
import threading
import time
import traceback

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import QoSPolicyKind, QoSProfile, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from .. import precompile, settings
from ..camera_info import (CACHE_SIZE, CameraInfoCache, calibration_fault, camera_info_topic,
                           output_info_topics)
from ..diagnostics import (LATENCY_KEYS, NOT_REPORTED, OWN_SYNC_KEYS, PLAUSIBLE_LATENCY_S, ROLES,
                           Key, inference_stall, late_arrivals, left_at_stop, pairing_shortfall,
                           pairing_summary, per_input, stamp_lead, stamped_ahead_message,
                           status_name, thermal_frames_lost, unpaired_hint)
from ..engine import (FusionEngine, FusionResult, clock_jump_message, fusion_settings,
                      normalizer_settings, output_compression, pipeline_from_params)
from ..imaging.encodings import compress_transport
from ..messages import stamp_to_ns
from ..runtime import model_from_params
from ..stats import CountsWindow, LatencyStats, RateMeter, RecentSenders
from ..sync import ArrivalClock
from ..worker import InferenceWorker
from . import parameters
from .graph import node_of
from .parameters import direction_qos
from .images import compressed_image_message, raw_image_message, set_header
from .logs import CoreLogsToNode

LOG_THROTTLE_S = 5.0
# Pairs made against the frames of the slower camera over this window (s): fewer than half is a
# partial stall (a clock difference near sync.timeout pairs some frames), once the slower camera
# sent at least PAIRING_MIN_FRAMES in it.
PAIRING_WINDOW_S = 5.0
PAIRING_MIN_FRAMES = 6
# An input that sent within this (s) is arriving: the other one's silence is then logged.
ARRIVING_S = 1.0
# Numbers and quoted names (sizes, encodings; repr quotes a name holding an apostrophe with
# double quotes) vary within one kind of fault: a bad-message log line is rate-limited per topic
# and kind, so a flood of one fault cannot hide a different one.
_FAULT_DETAILS = re.compile(r"\d+|'[^']*'|\"[^\"]*\"")
# And per topic, whatever the kind: a publisher whose faults differ every time (a new encoding
# name in each message, random bytes where a compressed stream's magic should be) logged a line
# per message. At most this many lines per topic in LOG_THROTTLE_S, the last saying so.
_FAULT_LINES_PER_TOPIC = 8
# The standard qos_overrides.<topic>.<publisher|subscription>.<history|depth|reliability> start-up
# parameters of the image topics, applied over the profiles of the qos.* parameters.
QOS_OVERRIDES = QoSOverridingOptions.with_default_policies()
# The visible camera_info's also durability: a driver that publishes its info once, latched,
# is heard with transient_local (and reliable).
CAMERA_INFO_OVERRIDES = QoSOverridingOptions([*QOS_OVERRIDES.policy_kinds,
                                              QoSPolicyKind.DURABILITY])
_LOG_KINDS_KEPT = 64  # bounds the throttle's memory against endless distinct faults
FUSING = 'fusing'  # the status's message while all is well
_LEVEL_NAMES = {DiagnosticStatus.WARN: 'WARN', DiagnosticStatus.ERROR: 'ERROR'}
# A status message's headline ends before its details ('waiting for the thermal input (...)',
# 'inputs arrive but no pair was fused lately (since ...); thermal stamps run ...').
_FIRST_CLAUSE = re.compile(r' \(|; ')


class S4FusionNode(Node):
    """The live fusion node (thin: decoding, pairing and fusion live in the ROS-free core)."""

    def __init__(self, command_line: list[str] = (), **kwargs):
        """`command_line`: the process's, to name a --params-file none of whose sections applies
        to this node."""
        super().__init__(settings.NODE_NAME, **kwargs)
        self.worker = None  # rclpy may destroy a node whose constructor failed (bad parameters)
        self.core_logs = CoreLogsToNode(self.get_logger())  # e.g. the kernel cache's, at load
        # Start-up values are rclpy's parameter overrides (private, as of rclpy 9.1.2), which
        # pre-set callbacks never see. They are checked as a whole before any is declared:
        # declaring them one by one, rclpy would name only the second of two values that
        # disagree (low >= high), as invalid, and a wrong type in its own terms.
        self._parameter_overrides.update((parameter.name, parameter) for parameter in
                                         parameters.as_declared_types(
                                             list(self._parameter_overrides.values())))
        reason = settings.check_start_up({name: parameter.value for name, parameter
                                          in self._parameter_overrides.items()})
        if reason:
            raise settings.SettingsError(reason)
        for name, spec in settings.SPECS.items():
            self.declare_parameter(name, spec.default, parameters.descriptor(name, spec))
        self.add_pre_set_parameters_callback(parameters.as_declared_types)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        p = self._values()
        self._report_params_files_for_other_nodes(command_line)
        self._report_unknown_parameters(qos_overrides=False)
        # Checked before the model loads (seconds), so a missing package fails at once.
        self.message_filters = _import_message_filters(p)
        self.approximate_sync = None  # message_filters' synchronizer, with that backend

        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.get_logger().info('loading the model')
        with self._reporting_start_up(p['diagnostics.period']):
            self.loaded = model_from_params(p, warn=self.get_logger().warning)
            self.engine = FusionEngine(self.loaded, fusion_settings(p))
            seconds = self.engine.warm_up()
        # The offline bag tool uses the same factories: same parameters, same pairs and pixels.
        self.pipeline = pipeline_from_params(p)
        kernels, log = '', self.get_logger().info
        if self.loaded.device.type == 'cpu':
            kernels = f' ({precompile.describe(precompile.kernel_cache_stats())})'
            if not precompile.kernels_cacheable():
                log = self.get_logger().warning  # every start compiles them again (15-30 s)
        log(f'model warmed up in {seconds:.1f} s{kernels}')

        self.thermal_rate, self.visible_rate, self.fused_rate = (RateMeter() for _ in range(3))
        self.inference_latency, self.end_to_end_latency = LatencyStats(), LatencyStats()
        self.bad_messages = {'thermal': 0, 'visible': 0}
        self.bad_stamps = {'thermal': 0, 'visible': 0}  # dropped before message_filters
        self.senders = {role: RecentSenders() for role in ROLES}  # publisher gids heard
        # Whether rclpy's MessageInfo names the publisher: None until a message tells (no input
        # yet is 0 publishers heard, not a middleware that does not say).
        self.senders_known = None
        self.arrivals = ArrivalClock()  # times arrivals (sync.timeout): on sim time its pace
        self.stamp_lead = stamp_lead(p['sync.queue_size'])  # a camera clock ahead
        self.logged = {}  # (role, kind of fault) -> monotonic time of its last log line
        # role -> monotonic times of its bad-message lines in the last LOG_THROTTLE_S
        self.fault_lines = {role: collections.deque() for role in ROLES}
        self._guard_parameter_services()
        self.stamps_off_clock = 0  # fused pairs whose stamps disagree with the node's clock
        self.inference_failure = None  # (monotonic time, repr) of the model's latest failure
        self.latest_off_clock = False  # the last one fused did: the latencies are of older ones
        # Where the node clock stood before it last jumped back (ns; a looped bag's /clock at
        # each wrap): pairs stamped up to there were on the clock, whenever they are fused.
        self.clock_jumped_back_from_ns = None
        self.clock_jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(seconds=PLAUSIBLE_LATENCY_S[0]),
                          on_clock_change=False), post_callback=self._on_clock_jump_back)
        self.notices_logged = 0  # pipeline.notices are one-time warnings about the inputs
        self.resets_logged = 0  # synchronizer resets (backward clock jumps) logged so far
        self.worker_failures_logged = 0
        self.namesakes_logged = 0  # other nodes of this full name last warned of
        # The counts as a pair was last fused (set by the worker): a stall's causes are what
        # grew since.
        self.counts_while_fusing = {}
        # Whether this stall's log said what the stamps tell: the first line often comes before
        # the stamps of the stall outnumber the older ones, and the hint must not wait 5 s.
        self.stall_hint_logged = False
        # The status's latest spell at WARN or ERROR, (monotonic time it began, its worst
        # level, its latest message), and whether a log line warned of it: a line says it
        # cleared once the node fuses again (_report_cleared_fault).
        self.fault, self.fault_logged = None, False
        self.arriving_since = None  # monotonic time both inputs have arrived since
        self.listening_since = None  # monotonic time of the first status: the executor runs
        # How many pairs were made lately against the frames that came.
        self.recent_counts = CountsWindow(PAIRING_WINDOW_S)
        self.worker = InferenceWorker(self._fuse_and_publish, p['inference.queue_size'],
                                      p['inference.queue_policy'])

        self.fused_pub, self.saliency_pub = (self._output_publisher(Image, f'~/{name}', p)
                                             for name in settings.OUTPUT_NAMES)
        images = (self.fused_pub, self.saliency_pub)
        # image_transport's compressed transports of the outputs, for viewers over a network, and
        # the camera_info its CameraPublisher pairs with them: named, as image_transport names
        # them, from the image topics as remapped (`-r ~/fused:=/detector/image_raw` moves them to
        # /detector/image_raw/compressed and /detector/camera_info); one info topic unless the
        # two outputs were remapped apart.
        self.fused_compressed_pub, self.saliency_compressed_pub = (
            self._output_publisher(CompressedImage, f'{image.topic_name}/compressed', p)
            for image in images)
        # Fusion's and the compressed transports' settings, replaced as one and read once per
        # pair: a pair in inference during a change is fused, encoded and compressed all with
        # the values before it or all with those after (read apart, a pair fused as mono8
        # before an atomic change went out as JPEG after it).
        self.output_settings = (self.engine.settings, output_compression(p))
        self.camera_info_pubs = [self._output_publisher(CameraInfo, topic, p) for topic in
                                 output_info_topics(image.topic_name for image in images)]
        self.camera_infos = CameraInfoCache()
        # Best effort, which hears reliable publishers too: a lost info is made up by the one
        # stamped before it (CameraInfoCache.for_image). As deep as the cache: an executor held
        # up by image callbacks on a busy CPU lost infos from sensor-data QoS's 5.
        info_qos = QoSProfile(depth=CACHE_SIZE, reliability=qos_profile_sensor_data.reliability,
                              durability=qos_profile_sensor_data.durability)
        self.camera_info_sub = self.create_subscription(
            CameraInfo, camera_info_topic(self.resolve_topic_name('visible/image_raw')),
            self.camera_infos.add, info_qos, qos_overriding_options=CAMERA_INFO_OVERRIDES)
        # Timers on the steady clock: on sim time they would stop with /clock (a paused or
        # ended bag), leaving the last thermal frame unfused and no diagnostics published.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        if self.message_filters is None:
            self.thermal_sub = self._subscribe('thermal', p['thermal.transport'],
                                               direction_qos(p, 'input'))
            self.visible_sub = self._subscribe('visible', p['visible.transport'],
                                               direction_qos(p, 'input'))
            self.create_timer(0.05, self._expire_pending, clock=steady)
        else:
            self._subscribe_message_filters(p)
        self.create_timer(p['diagnostics.period'], self._publish_diagnostics, clock=steady)
        # Creating the topics declared the qos_overrides.* parameters they read: one left
        # undeclared names a topic this node does not have.
        self._report_unknown_parameters(qos_overrides=True)
        self._report_overridden_qos(p)
        self.get_logger().info(
            f'fusing {self.thermal_sub.topic_name} + {self.visible_sub.topic_name} -> '
            f'{self.fused_pub.topic_name}, {self.saliency_pub.topic_name} with {self.loaded.name} '
            f'on {self.loaded.device}{" (fp16)" if self.loaded.half else ""}; '
            f'{self.camera_info_sub.topic_name} -> '
            + ', '.join(pub.topic_name for pub in self.camera_info_pubs))

    @contextlib.contextmanager
    def _reporting_start_up(self, period: float):
        """Publish an OK status every `period` while the block runs (the model's load, which
        holds up the executor: 15-30 s on a cold numba kernel cache), as a driver reports while
        it opens its device: a diagnostic_aggregator marks a status STALE after 5 s without one,
        and a monitor would show a node that never reported."""
        done, started = threading.Event(), time.monotonic()

        def report() -> None:
            while True:
                try:
                    self._publish_status(DiagnosticStatus.OK, 'starting: loading the model '
                                         f'({time.monotonic() - started:.0f} s so far)', '', {})
                except Exception:  # noqa: BLE001 - a stop signal shut ROS down: so ends the start
                    if self.context.ok():
                        raise
                    return
                if done.wait(period):
                    return
        thread = threading.Thread(target=report, name='start-up diagnostics', daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _output_publisher(self, msg_type, topic: str, p: dict):
        """The publisher of an output topic, with the outputs' QoS, overrides and QoS reports."""
        resolved = self.resolve_topic_name(topic)
        return self.create_publisher(
            msg_type, topic, direction_qos(p, 'output'), qos_overriding_options=QOS_OVERRIDES,
            event_callbacks=PublisherEventCallbacks(
                incompatible_qos=lambda info: self._on_incompatible_qos('output', resolved,
                                                                        info)))

    # Parameters -----------------------------------------------------------------------------

    def _values(self) -> dict:
        return {name: value.value for name, value in self._parameters.items()
                if name in settings.SPECS}

    def _report_params_files_for_other_nodes(self, command_line: list[str]) -> None:
        """Warn of a --params-file of whose sections none applies to this node: rcl ignores it
        without a word (a `s4fusion_node:` section read by a node in a namespace, or another
        package's file passed down by a parent launch file)."""
        full_name = self.get_fully_qualified_name()
        for path in settings.params_file_arguments(list(command_line)):
            try:
                sections = settings.params_file_sections(path)
            except settings.SettingsError:
                continue  # rcl read it at init; removed since, say
            if not any(settings.section_applies(name, full_name) for name, _ in sections):
                names = ', '.join(name for name, _ in sections) or 'none'
                self.get_logger().warning(
                    f"{path}: none of its sections ({names}) applies to {full_name}, so none of "
                    f"its values is used; name its section '/**' or '{full_name}'")

    def _report_unknown_parameters(self, qos_overrides: bool) -> None:
        """Warn of start-up values no parameter took: those of qos_overrides.* (declared as the
        topics are created) or all others (checked before the slow model load)."""
        # rclpy keeps start-up values (-p, --params-file) of names nobody declared in
        # _parameter_overrides and ignores them; a typo there would silently change nothing.
        unknown = sorted(name for name in set(self._parameter_overrides) - set(self._parameters)
                         if name.startswith(settings.QOS_OVERRIDES_PREFIX) == qos_overrides)
        if unknown:
            self.get_logger().warning(
                f"ignoring unknown parameters (this node does not declare them): "
                f"{', '.join(unknown)}; `ros2 param list` shows the node's parameters")

    def _report_overridden_qos(self, p: dict) -> None:
        """Say where a start-up qos_overrides.* value sets a topic's QoS against qos.*: a
        warning where that qos.* value was given too (a parameters file from `ros2 param dump`
        holds every topic's, so the launch file's input_reliability and the qos.* values in it
        would otherwise change nothing), else a line of information (one topic set apart, as
        the override is meant)."""
        topics = [('input', 'subscription', sub.topic_name)
                  for sub in (self.thermal_sub, self.visible_sub)]
        topics += [('output', 'publisher', pub.topic_name)
                   for pub in (self.fused_pub, self.saliency_pub, self.fused_compressed_pub,
                               self.saliency_compressed_pub, *self.camera_info_pubs)]
        for direction, kind, topic in topics:
            for policy in ('reliability', 'depth'):
                name = f'{settings.QOS_OVERRIDES_PREFIX}{topic}.{kind}.{policy}'
                own = f'qos.{direction}.{policy}'
                if not (name in self._parameter_overrides and self.has_parameter(name)
                        and self.get_parameter(name).value != p[own]):
                    continue
                line = (f'{name} {self.get_parameter(name).value} overrides {own} {p[own]} on '
                        f'{topic}')
                given = self._parameter_overrides.get(own)
                # Given, and not at its default (config/s4fusion.yaml sets every qos.* value).
                if given is not None and given.value != settings.SPECS[own].default:
                    self.get_logger().warning(
                        f'{line}, both given at start (a `ros2 param dump` file holds one '
                        f'override for each topic); remove the override to use {own}')
                else:
                    self.get_logger().info(line)

    def _guard_parameter_services(self) -> None:
        """Answer set-parameters requests rclpy would raise on (an unknown value type, from a
        hostile or buggy client) with a failed result and a log line: raised in a service
        callback, rclpy's error stopped the node. A name the node does not have (a typo) is
        refused by name, where rclpy's reason named none."""
        def refused(reason: str) -> None:
            if self._log_due(('parameters', 'refused request')):
                self.get_logger().warning(f'refused a set-parameters request: {reason}')
        for service in self.services:
            if service.srv_type in parameters.SET_PARAMETERS_SERVICES:
                service.callback = parameters.guarded_set_parameters(
                    service.callback, service.srv_type, refused, self.has_parameter)

    def _validate_parameters(self, params):
        return parameters.validate_update(self._values(), {p.name: p.value for p in params})

    def _apply_parameters(self, params) -> None:
        # Only this node's own: rclpy declares each topic's qos_overrides.* as it is made.
        params = [param for param in params if param.name in settings.SPECS]
        if not params:
            return
        names = {p.name for p in params}
        values = self._values()
        if 'sync.slop' in names:
            self.pipeline.synchronizer.slop = values['sync.slop']
            if self.approximate_sync is not None:
                self.approximate_sync.slop = Duration(seconds=values['sync.slop'])
        if 'sync.thermal_offset' in names:  # 0 with message_filters (check_update)
            self.pipeline.synchronizer.thermal_offset = values['sync.thermal_offset']
        if any(name.startswith('normalization.') for name in names):
            self.pipeline.normalizer.configure(**normalizer_settings(values))
        # One assignment, read once per pair (see __init__); inference_size is read-only.
        self.output_settings = (fusion_settings(values), output_compression(values))
        self.get_logger().info('parameters updated: ' + ', '.join(
            f'{p.name}={p.value}' for p in params))

    # Inputs ---------------------------------------------------------------------------------

    def _subscribe(self, role: str, transport: str, qos: QoSProfile):
        def on_message(msg, info, r=role):  # info: rclpy's MessageInfo
            if info.get('publisher_gid'):
                self.senders_known = True
                self.senders[r].add(bytes(info['publisher_gid']['data']))
            elif self.senders_known is None:
                self.senders_known = False
            self._on_image(r, msg, info['received_timestamp'])
        topic = self._input_topic(role, transport)
        return self.create_subscription(*topic, on_message, qos,
                                        event_callbacks=self._input_events(topic[1]),
                                        qos_overriding_options=QOS_OVERRIDES)

    def _input_topic(self, role: str, transport: str) -> tuple[type, str]:
        """Message type and topic name of an input, named as image_transport names it: a
        transport's topic lies under the base topic as remapped, so `-r thermal/image_raw:=/lwir`
        moves `.../compressed` too (a remap of the transport's own name still applies)."""
        base = f'{role}/image_raw'
        if transport == 'raw':
            return Image, base
        return CompressedImage, f'{self.resolve_topic_name(base)}/{transport}'

    def _input_events(self, topic: str) -> SubscriptionEventCallbacks:
        resolved = self.resolve_topic_name(topic)
        return SubscriptionEventCallbacks(
            incompatible_qos=lambda info: self._on_incompatible_qos('input', resolved, info))

    def _subscribe_message_filters(self, p: dict) -> None:
        """Pair with message_filters' ApproximateTimeSynchronizer (sync.backend)."""
        gates = []
        for role in ROLES:  # the order of its queues (_restart_message_filters)
            subscriber = self._message_filters_subscriber(role, p)
            # Its synchronizer raises on a negative stamp inside the subscription callback,
            # which stops the node: bad stamps are dropped before it, as the own one drops them.
            gate = self.message_filters.SimpleFilter()
            subscriber.registerCallback(
                lambda msg, r=role, g=gate: self._pass_good_stamp(r, g, msg))
            setattr(self, f'{role}_sub', subscriber)
            gates.append(gate)
        # Its synchronizer pairs a repeated stamp again (a driver or a bag that sends a frame
        # twice): each input's latest stamps, to drop repeats before it as the own one does.
        self.recent_stamps = {role: collections.deque(maxlen=p['sync.queue_size'])
                              for role in ROLES}
        self.newest_stamps = {role: 0 for role in ROLES}  # ns, for clock jumps
        self.clock_jump_ns = int(p['sync.clock_jump'] * 1e9)
        self.sync_resets = 0
        # The stamp the latest counted restart began its timeline at, and the inputs that
        # restarted onto it: both inputs of a looped bag restart at a wrap, one reset.
        self.restarted_at_ns, self.restarted_roles = 0, set()
        self.approximate_sync = self.message_filters.ApproximateTimeSynchronizer(
            gates, p['sync.queue_size'], p['sync.slop'])
        self.approximate_sync.registerCallback(self._on_synchronized_pair)
        # What a clock jump clears is private to the synchronizer: {stamp ns: message} per input
        # and the lock its add holds (so from Humble to rolling 6.0.6, checked). A version that
        # keeps them otherwise keeps its queues through a jump, where the node stopped on an
        # AttributeError at the first jump.
        sync = self.approximate_sync
        self.sync_queues = ((sync.queues, sync.lock) if isinstance(
            getattr(sync, 'queues', None), list) and hasattr(sync, 'lock') else None)
        if self.sync_queues is None:
            self.get_logger().warning(
                'this message_filters keeps its synchronizer\'s queues where the node cannot '
                'clear them: after the stamps jump back (a looping bag, a restarted camera) it '
                'may pair nothing again until the node restarts; sync.backend:=own recovers')
        self.synchronized_pairs = 0
        self.synchronized_pair_failures = 0  # raised past decoding: counted as inference errors

    def _message_filters_subscriber(self, role: str, p: dict):
        """A message_filters Subscriber with the own backend's QoS events and overrides.

        message_filters' Subscriber took no keyword arguments beyond the profile in Jazzy
        4.11.10 and Kilted 7.1.5 (January 2026, ros2/message_filters#226 backported), so
        neither can be passed to it there (Jazzy 4.11.11 and Kilted 7.1.6, February 2026, pass
        them on again, ros2/message_filters#247): the node then runs without them and says so.
        """
        topic, qos = self._input_topic(role, p[f'{role}.transport']), direction_qos(p, 'input')
        try:
            return self.message_filters.Subscriber(
                self, *topic, qos_profile=qos, event_callbacks=self._input_events(topic[1]),
                qos_overriding_options=QOS_OVERRIDES)
        except TypeError as error:
            if 'unexpected keyword argument' not in str(error):
                raise  # not the missing keywords: a fault of its own, not to be run around
            self.get_logger().warning(
                f'this message_filters takes no event_callbacks or qos_overriding_options '
                f'({error}): {topic[1]} runs without incompatible-QoS reports and '
                'qos_overrides; message_filters 4.11.11 (Jazzy) or 7.1.6 (Kilted) or later '
                'has them')
            return self.message_filters.Subscriber(self, *topic, qos_profile=qos)

    def _rate(self, role: str) -> RateMeter:
        return self.thermal_rate if role == 'thermal' else self.visible_rate

    def _pass_good_stamp(self, role: str, gate, msg) -> None:
        self._rate(role).tick()
        sim = self._sim_time()
        self.arrivals.now(time.monotonic(), sim)  # the steps of /clock (_note_stamp_lead)
        self._note_stamp_lead(role, msg, sim, sim)  # its Subscriber gives no receipt time
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if stamp_ns > 0 and self.newest_stamps[role] - stamp_ns > self.clock_jump_ns:
            self._restart_message_filters(role, stamp_ns)
        repeated = stamp_ns in self.recent_stamps[role]
        if stamp_ns <= 0 or repeated:
            self.bad_stamps[role] += 1
            self._log_bad_stamp(role, stamp_ns, repeated)
            return
        self.recent_stamps[role].append(stamp_ns)
        self.newest_stamps[role] = max(self.newest_stamps[role], stamp_ns)
        gate.signalMessage(msg)

    def _restart_message_filters(self, role: str, stamp_ns: int) -> None:
        """Drop what lies more than sync.clock_jump after `stamp_ns`, a stamp that much older
        than the newest of its input (a looping bag, a restarted camera; or one glitched stamp,
        which costs the frames waiting for a partner). Its synchronizer keeps the
        sync.queue_size newest stamps of each input and drops the oldest: with a queue full of
        the old timeline's frames that found no partner (a 30 Hz camera beside a 9 Hz one), each
        frame of the new one was dropped as it came, and nothing paired again."""
        # This input's frames so far are of the old timeline: those stamped at or after this
        # one are dropped (a short looped bag repeats them: kept in the repeat filter, the new
        # pass's first sync.clock_jump was dropped as repeated stamps). The other input's are
        # dropped beyond sync.clock_jump after it (it may have jumped first).
        limits = {other: stamp_ns + self.clock_jump_ns for other in ROLES}
        limits[role] = stamp_ns - 1
        queues, lock = self.sync_queues or ((), contextlib.nullcontext())
        with lock:
            for queue, limit in zip(queues, limits.values()):  # {stamp ns: message} per input
                for old in [stamp for stamp in queue if stamp > limit]:
                    del queue[old]
            # The old scene's range must not scale the new timeline's first frames.
            self.pipeline.normalizer.reset()
        for other, stamps in self.recent_stamps.items():
            kept = [stamp for stamp in stamps if stamp <= limits[other]]
            stamps.clear()
            stamps.extend(kept)
        self.newest_stamps[role] = stamp_ns
        if (role in self.restarted_roles or not self.restarted_roles
                or abs(stamp_ns - self.restarted_at_ns) > self.clock_jump_ns):
            self.sync_resets += 1
            self.restarted_at_ns, self.restarted_roles = stamp_ns, set()
        self.restarted_roles.add(role)
        if self._log_due(('sync', 'reset')):
            self.get_logger().warning(clock_jump_message(self.sync_resets))

    def _on_synchronized_pair(self, thermal_msg, visible_msg) -> None:
        # message_filters calls this holding its lock, released by no finally: whatever this
        # raised would stop both inputs for good. A pair that fails is logged and dropped.
        try:
            self._fuse_synchronized_pair(thermal_msg, visible_msg)
        except Exception as error:  # noqa: BLE001 - would leave message_filters locked
            self.synchronized_pair_failures += 1
            if self._log_due(('sync', 'pair failure')):
                self.get_logger().error(
                    f'dropped a pair message_filters synchronized: {error!r}\n'
                    + ''.join(traceback.format_exception(error)))

    def _fuse_synchronized_pair(self, thermal_msg, visible_msg) -> None:
        frames = []
        for role, msg in (('thermal', thermal_msg), ('visible', visible_msg)):
            decode = (self.pipeline.thermal_frame if role == 'thermal'
                      else self.pipeline.visible_frame)
            try:
                frames.append(decode(msg, stamp_to_ns(msg.header.stamp), msg.header.frame_id))
            except ValueError as error:  # ImageDecodeError: message_filters paired it already
                # Both are decoded, so that each bad one is counted, as the own backend does.
                self.bad_messages[role] += 1
                self._log_rejection(role, msg, error)
        if len(frames) < len(ROLES):
            return
        self._submit(self.pipeline.add_pair(*frames))
        self.synchronized_pairs += 1

    def _best_effort_publishers(self, role: str) -> list[str]:
        """The publishers on a reliable input that offer best effort, which it never hears, as
        the graph shows them now (the QoS events say only that one came, not whether it left)."""
        topic = getattr(self, f'{role}_sub').topic_name
        own = [info for info in self.get_subscriptions_info_by_topic(topic)
               if info.node_name == self.get_name()
               and info.node_namespace == self.get_namespace()]
        if not own:
            return []
        return [f'{role}: {node_of(info)} publishes '
                'best_effort to this reliable input, set qos.input.reliability:=best_effort'
                for info in self.get_publishers_info_by_topic(topic)
                if 'reliability' in parameters.kept_apart(info.qos_profile, own[0].qos_profile)]

    def _on_incompatible_qos(self, direction: str, topic: str, info) -> None:
        """Log a peer whose QoS cannot match this node's `direction` ('input' or 'output')
        endpoint on `topic`."""
        # Throttled per topic: rclpy's throttle is per call site, which every topic shares.
        if not self._log_due((topic, 'incompatible qos')):
            return
        policy = QoSPolicyKind(int(info.last_policy_kind))
        what, hint = _QOS_MISMATCH[direction]
        self.get_logger().error(f'{topic}: {what} ({policy.name}).'
                                + (hint if policy == QoSPolicyKind.RELIABILITY else ''))

    def _on_image(self, role: str, msg, received_ns: int = 0) -> None:
        """One input image; `received_ns`: when the middleware received it (system clock, 0 if
        the rmw does not say), which the clock-skew hint compares across topics: the callback
        runs later by however far behind the executor is, one topic's more than the other's.
        On sim time the hint compares the callback's time on the simulation clock instead: the
        receipt time is wall time, the stamps sim time. Arrivals are timed by `arrivals`."""
        self._rate(role).tick()
        sim = self._sim_time()
        received = received_ns / 1e9 if received_ns else None
        if sim is not None:  # the stamps are sim time: so is the receipt
            received = sim
        arrived = self.arrivals.now(time.monotonic(), sim)
        self._note_stamp_lead(role, msg, received, sim)
        try:
            prepared = self.pipeline.add_message(role, msg, arrived, received)
        except ValueError as error:  # ImageDecodeError, or a frame registration cannot use
            self.bad_messages[role] += 1
            self._log_rejection(role, msg, error)
            return
        # Decoded, so counted by the synchronizer as a bad stamp, not as a bad message.
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if stamp_ns <= 0:
            self._log_bad_stamp(role, stamp_ns)
        self._submit(prepared)

    def _note_stamp_lead(self, role: str, msg, received: float | None,
                         sim: float | None) -> None:
        """Note how far a frame's stamp, as matched, runs ahead of its arrival on the node clock
        (StampLead): `received`, the middleware's receipt (the system clock, which ROS time
        reads off sim time), else now; on sim time, the simulation clock's time, which may
        stand up to a step of /clock behind the stamps."""
        arrived = self.get_clock().now().nanoseconds / 1e9 if received is None else received
        self.stamp_lead.add(role, stamp_to_ns(msg.header.stamp), arrived,
                            self.pipeline.synchronizer.thermal_offset,
                            0.0 if sim is None else self.arrivals.sim_step())

    def _log_bad_stamp(self, role: str, stamp_ns: int, repeated: bool = False) -> None:
        if self._log_due((role, 'bad stamp')):
            why = ('and a message just before had it' if repeated else
                   'which its driver leaves unset' if stamp_ns == 0 else 'before the epoch')
            self.get_logger().warning(
                f'{getattr(self, f"{role}_sub").topic_name}: dropped a message stamped '
                f'{stamp_ns} ns: pairing is by header stamp, {why}')

    def _log_due(self, key) -> bool:
        """Whether a log line of this kind may be written now (one per LOG_THROTTLE_S)."""
        now = time.monotonic()
        if now - self.logged.get(key, -math.inf) < LOG_THROTTLE_S:
            return False
        if len(self.logged) >= _LOG_KINDS_KEPT:
            self.logged.clear()
        self.logged[key] = now
        return True

    def _log_rejection(self, role: str, msg, error: Exception) -> None:
        now, lines = time.monotonic(), self.fault_lines[role]
        while lines and now - lines[0] >= LOG_THROTTLE_S:
            lines.popleft()
        if (len(lines) >= _FAULT_LINES_PER_TOPIC
                or not self._log_due((role, _FAULT_DETAILS.sub('', str(error))))):
            return
        lines.append(now)
        topic = getattr(self, f'{role}_sub').topic_name
        encoding = msg.format if isinstance(msg, CompressedImage) else msg.encoding
        # repr: the encoding comes from the sender and may hold anything, line breaks too.
        line = f'{topic}: dropped a {encoding!r} message: {error}'
        if len(lines) == _FAULT_LINES_PER_TOPIC:
            line += (f' ({_FAULT_LINES_PER_TOPIC} kinds of fault on this topic in '
                     f'{LOG_THROTTLE_S:.0f} s: more are not logged for now; /diagnostics counts '
                     'every dropped message)')
        self.get_logger().warning(line)

    def _expire_pending(self) -> None:
        # The pipeline extrapolates the stamps' clock from arrivals (sync.timeout is its own).
        self._submit(self.pipeline.expire(self.arrivals.now(time.monotonic(), self._sim_time())))

    def _sim_time(self) -> float | None:
        """Now on the simulation clock (s) where use_sim_time is on, else None: what the
        arrivals' clock (ArrivalClock) takes its pace from."""
        clock = self.get_clock()
        return clock.now().nanoseconds / 1e9 if clock.ros_time_is_active else None

    def _submit(self, prepared) -> None:
        while len(self.pipeline.notices) > self.notices_logged:
            self.get_logger().warning(self.pipeline.notices[self.notices_logged])
            self.notices_logged += 1
        resets = self.pipeline.synchronizer.stats.resets
        if resets > self.resets_logged and self._log_due(('sync', 'reset')):
            self.resets_logged = resets
            self.get_logger().warning(clock_jump_message(resets))
        offset = self.pipeline.synchronizer.thermal_offset
        for pair in prepared:
            self.stamp_lead.pair(pair.thermal_stamp_ns, pair.visible_stamp_ns, offset)
            self.worker.submit(pair)

    # Inference and outputs ------------------------------------------------------------------

    def _fuse_and_publish(self, pair) -> Key | None:
        """Fuse and publish one pair; returns the counter its outcome goes to (the worker counts
        it as the pair leaves inference, so diagnostics never count it twice)."""
        fusion, compressions = self.output_settings
        try:
            result = self.engine.infer(pair, fusion)
        except Exception as error:  # noqa: BLE001 - one bad pair (e.g. CUDA OOM) must not stop us
            # Throttled per kind: rclpy's throttle is per call site, so a recurring out-of-memory
            # hid any other failure within 5 s of it. (From the worker thread: a race costs at
            # most a repeated line.)
            if self._log_due(('inference', type(error).__name__)):
                self.get_logger().error(f'inference failed, pair dropped: {error!r}')
            self.inference_failure = (time.monotonic(), repr(error))
            return Key.INFERENCE_ERRORS
        self.inference_latency.add(result.inference_seconds)
        try:
            self._publish(result, compressions)
        except Exception as error:  # noqa: BLE001 - e.g. RCLError "cannot publish data"
            if not self.context.ok():
                return None  # stopping: a stop signal shut ROS down under the worker
            self.get_logger().warning(f'publishing failed: {error}',
                                      throttle_duration_sec=LOG_THROTTLE_S)
            return Key.PUBLISH_ERRORS
        self.fused_rate.tick()
        # Here, not at the next report: that may come after the fused rate's window (a
        # diagnostics.period over 5 s), when a stall's counts would start from an older report.
        self.counts_while_fusing = self._counts()
        latency = (self.get_clock().now().nanoseconds - result.pair.visible_stamp_ns) / 1e9
        if latency < PLAUSIBLE_LATENCY_S[0] and self._stamped_before_clock_jump(result.pair):
            return Key.PAIRS_FUSED  # on the clock as it was: no latency to tell, nothing off
        self.latest_off_clock = not PLAUSIBLE_LATENCY_S[0] <= latency <= PLAUSIBLE_LATENCY_S[1]
        if self.latest_off_clock:
            self.stamps_off_clock += 1
        else:
            self.end_to_end_latency.add(latency)
        return Key.PAIRS_FUSED

    def _on_clock_jump_back(self, jump) -> None:
        self.clock_jumped_back_from_ns = (self.get_clock().now().nanoseconds
                                          - jump.delta.nanoseconds)

    def _stamped_before_clock_jump(self, pair) -> bool:
        """Whether the clock stood (near) at or after the pair's stamp before it last jumped
        back: a pair of a looped bag's pass that ended, fused after /clock wrapped."""
        before = self.clock_jumped_back_from_ns
        return (before is not None
                and pair.visible_stamp_ns <= before - PLAUSIBLE_LATENCY_S[0] * 1e9)

    def _publish(self, result: FusionResult, compressions: list) -> None:
        for publisher, raw in zip((self.fused_pub, self.saliency_pub), result.packed()):
            publisher.publish(raw_image_message(raw, result.pair.visible_stamp_ns,
                                                result.pair.frame_id))
        # Encoded only for a subscriber, as image_transport's publishers do (a 640x480 colour
        # PNG takes 27 ms here).
        for name, publisher, compression in zip(
                settings.OUTPUT_NAMES, (self.fused_compressed_pub, self.saliency_compressed_pub),
                compressions):
            if publisher.get_subscription_count():
                publisher.publish(compressed_image_message(
                    *compress_transport(*result.transported(name), *compression),
                    result.pair.visible_stamp_ns, result.pair.frame_id))
        info = self.camera_infos.for_image(result.pair.visible_stamp_ns)
        if info is not None:
            fault = calibration_fault(info, *result.pair.visible_bgr.shape[1::-1])
            if fault and self._log_due(('visible', 'camera_info')):
                self.get_logger().warning(f'{self.camera_info_sub.topic_name}: {fault}; '
                                          'published beside the outputs as it came')
            info = copy.copy(info)  # the calibration is shared, not changed
            set_header(info, result.pair.visible_stamp_ns, result.pair.frame_id)
            for publisher in self.camera_info_pubs:
                publisher.publish(info)

    def _counts(self) -> dict:
        """The counts /diagnostics reports, as they are now: what a stall and a partial pairing
        compare (NOT_REPORTED for those the message_filters backend does not keep)."""
        sync = self.pipeline.synchronizer.stats
        work = self.worker.counts()
        counts = {
            Key.THERMAL_RECEIVED: sync.thermal_received,
            Key.VISIBLE_RECEIVED: sync.visible_received,
            Key.THERMAL_BAD_MESSAGE: self.bad_messages['thermal'],
            Key.VISIBLE_BAD_MESSAGE: self.bad_messages['visible'],
            # Per input: received == pairs + unpaired + late + overflow + rejected (bad stamp)
            # + pending; bad messages are dropped before pairing and not in 'received'.
            Key.PAIRS: sync.pairs,
            Key.THERMAL_UNPAIRED: sync.thermal_unpaired,
            Key.VISIBLE_UNPAIRED: sync.visible_unpaired,
            Key.THERMAL_LATE: sync.thermal_late,
            Key.VISIBLE_LATE: sync.visible_late,
            Key.THERMAL_OVERFLOW: sync.thermal_overflow,
            Key.VISIBLE_OVERFLOW: sync.visible_overflow,
            Key.THERMAL_BAD_STAMP: sync.thermal_bad_stamp,
            Key.VISIBLE_BAD_STAMP: sync.visible_bad_stamp,
            Key.THERMAL_PENDING: sync.thermal_pending,
            Key.VISIBLE_PENDING: sync.visible_pending,
            Key.THERMAL_OUTLIERS: self.pipeline.normalizer.outliers,
            Key.SYNC_RESETS: sync.resets,
            # pairs == fused + dropped + inference errors + publish errors + queued + in progress
            Key.PAIRS_DROPPED: work.dropped,
            Key.PAIRS_QUEUED: work.pending,
            Key.PAIRS_IN_INFERENCE: work.in_progress,
            Key.PAIRS_FUSED: work.outcomes.get(Key.PAIRS_FUSED, 0),
            # A pair whose handling raised past _fuse_and_publish (the worker caught it) is
            # neither fused nor published: an inference error too, so the counts still add up.
            Key.INFERENCE_ERRORS: work.outcomes.get(Key.INFERENCE_ERRORS, 0) + work.failed,
            Key.PUBLISH_ERRORS: work.outcomes.get(Key.PUBLISH_ERRORS, 0),
            Key.STAMPS_OFF_CLOCK: self.stamps_off_clock,
            Key.THERMAL_AHEAD: self.stamp_lead.ahead['thermal'],
            Key.VISIBLE_AHEAD: self.stamp_lead.ahead['visible'],
            Key.VISIBLE_CAMERA_INFO: self.camera_infos.received,
        }
        if self.approximate_sync is not None:
            # message_filters reports no pairing counts: what it dropped is not known here.
            for key in OWN_SYNC_KEYS:
                counts[key] = NOT_REPORTED
            counts[Key.SYNC_RESETS] = self.sync_resets  # the node restarts it (clock jumps)
            # A bad message is found only once paired: counted as rejected, not as received
            # (as the own synchronizer counts it), and its partner is lost with the pair.
            counts.update({per_input(role, 'received'): self._rate(role).total
                           - self.bad_messages[role] for role in ROLES})
            counts.update({per_input(role, 'rejected (bad stamp)'): self.bad_stamps[role]
                           for role in ROLES})
            failures = self.synchronized_pair_failures
            counts[Key.PAIRS] = self.synchronized_pairs + failures
            counts[Key.INFERENCE_ERRORS] += failures
        return counts

    def _publishers_heard(self) -> dict:
        """The publishers each input heard in the last 5 s, where the subscriptions name them:
        none under message_filters, whose subscriber hands over no MessageInfo (_counts reports
        those keys as not reported), nor on an rclpy before mid-2025."""
        if self.approximate_sync is not None:
            return {}
        return {per_input(role, 'publishers heard (last 5 s)'): self.senders[role].recent()
                if self.senders_known is not False else 'n/a (the middleware does not say)'
                for role in ROLES}

    def _diagnostic_values(self) -> dict:
        """The rates, counts, latencies and set-up /diagnostics reports, as they are now."""
        inference = self.inference_latency.summary()
        end_to_end = self.end_to_end_latency.summary()
        values = {
            Key.THERMAL_RATE: self.thermal_rate.rate(),
            Key.VISIBLE_RATE: self.visible_rate.rate(),
            Key.FUSED_RATE: self.fused_rate.rate(),
            **self._counts(),
            **self._publishers_heard(),
            Key.INFERENCE_LATENCY_MEAN: inference['mean'],
            Key.INFERENCE_LATENCY_P95: inference['p95'],
            Key.END_TO_END_LATENCY_MEAN: end_to_end['mean'],
            Key.END_TO_END_LATENCY_P95: end_to_end['p95'],
            Key.SYNC_BACKEND: 'own' if self.approximate_sync is None else 'message_filters',
            Key.DEVICE: str(self.loaded.device) + (' fp16' if self.loaded.half else ''),
            Key.MODEL: self.loaded.name,
        }
        for key in LATENCY_KEYS:  # NaN before the first: say why rather than 'nan'
            if isinstance(values[key], float) and math.isnan(values[key]):
                values[key] = 'n/a: no pair fused yet'
        if self.latest_off_clock:  # else the figures of pairs before would show, frozen
            why = ('use_sim_time is on: is /clock published?' if
                   self.get_clock().ros_time_is_active else
                   'a bag played without /clock and use_sim_time, or a camera stamping '
                   'with its own clock, such as its boot time?')
            note = f'n/a: the stamps are not on the node clock ({why})'
            values[Key.END_TO_END_LATENCY_MEAN] = values[Key.END_TO_END_LATENCY_P95] = note
        return values

    def _status(self, values: dict) -> tuple[int, str]:
        """The level and message of the node's status for these values (logging what a stall
        tells); notes which counts pairs were last fused at."""
        level, message, partial = DiagnosticStatus.OK, FUSING, ''
        fusing = False
        self._log_worker_failures()
        if self.listening_since is None:
            self.listening_since = time.monotonic()
        silent = [role for role in ROLES if self._rate(role).rate() == 0.0]
        if silent:
            self.arriving_since = None
        elif self.arriving_since is None:
            self.arriving_since = time.monotonic()
        failing = self._failing_message(values)
        if not self.worker.alive:
            level = DiagnosticStatus.ERROR
            message = 'the inference thread stopped: restart the node'
        elif failing:
            level, message = DiagnosticStatus.ERROR, failing
        elif not self.loaded.trained:
            level, message = DiagnosticStatus.WARN, 'running untrained weights'
        elif silent:
            level, message = DiagnosticStatus.WARN, self._waiting_message(silent)
        elif not self.fused_rate.recent():
            quiet_since = max(self.fused_rate.last or 0.0, self.arriving_since)
            if time.monotonic() - quiet_since < self.fused_rate.window:
                # The first pair after a start or a pause waits for a model step: no stall (and
                # no log line) before a whole window, so a monitor sees no WARN at every start.
                message = ('both inputs arrive: waiting for the first fused pair'
                           if self.fused_rate.last is None else
                           'both inputs arrive again: waiting for a fused pair')
            else:
                level, message = DiagnosticStatus.WARN, self._stall_message(values)
        else:
            fusing = True
            self.stall_hint_logged = False
            grown = self.recent_counts.grown(time.monotonic(), values)
            partial = (self._mixed_senders() or self._stamped_ahead()
                       or self._partial_pairing(grown) or self._late_arrivals(grown))
            if partial:
                level, message = DiagnosticStatus.WARN, partial
        if not fusing:
            # Counted afresh once fusing again: a stall's frames are not a partial one's.
            self.recent_counts.clear()
        return level, message

    def _failing_message(self, values: dict) -> str:
        """Pairs leave inference, but every one failed over the fused rate's window (none was
        fused in it, and the latest failure lies in it): how many since pairs were last fused,
        and the latest failure, from the model or outside it; '' otherwise."""
        outside = self.worker.last_failure_at, f'outside the model: {self.worker.last_failure}'
        failures = [failure for failure in (self.inference_failure, outside)
                    if failure is not None and failure[0] is not None]
        if not failures or self.fused_rate.recent():
            return ''
        at, what = max(failures)
        if time.monotonic() - at >= self.fused_rate.window:
            return ''
        since, counts = self._since_fusing()
        failed = values[Key.INFERENCE_ERRORS] - counts.get(Key.INFERENCE_ERRORS, 0)
        return (f'every pair fails: {failed} {Key.INFERENCE_ERRORS} since {since} and none '
                f'fused in the last {self.fused_rate.window:.0f} s; latest: {what}')

    def _since_fusing(self) -> tuple[str, dict]:
        """Since when a stall's counts are taken, and the counts then (read once: the worker
        replaces them as it fuses)."""
        counts = self.counts_while_fusing
        return 'pairs were last fused' if counts else 'the start', counts

    def _waiting_message(self, silent: list[str]) -> str:
        """The inputs of `silent` send nothing: which, and a best-effort publisher on one, which
        a reliable input never hears. A camera that stopped while the other sends is logged."""
        if len(silent) == len(ROLES):
            message = 'waiting for both inputs'
        else:
            [role] = silent
            message = f'waiting for the {role} input'
            other = next(name for name in ROLES if name != role)
            meter, now = self._rate(role), time.monotonic()
            # By the last frames' times: the rate is 0 too while a camera's first frames fill
            # its window, and when a bag ends one camera's last frame leaves it first.
            if (meter.last is not None and now - meter.last >= meter.window
                    and now - self._rate(other).last < ARRIVING_S):
                self.fault_logged |= self.get_logger().warning(
                    f'{getattr(self, f"{role}_sub").topic_name}: no {role} frame for '
                    f'{now - meter.last:.0f} s while {other} frames arrive: nothing is fused',
                    throttle_duration_sec=LOG_THROTTLE_S)
        self._log_unheard(silent)
        mismatched = [line for role in silent for line in self._best_effort_publishers(role)]
        if mismatched:
            message += f' ({"; ".join(mismatched)})'
        return message

    def _log_unheard(self, silent: list[str]) -> None:
        """Log the inputs of `silent` that sent nothing since the node listens, once it has
        for a rate window, with the publishers on each: a topic name or remapping that matches
        no camera is the usual cause, and the line for a camera that stopped needs its frames."""
        unheard = [role for role in silent if self._rate(role).last is None]
        listened = time.monotonic() - self.listening_since
        if (not unheard or listened < self._rate(unheard[0]).window
                or not self._log_due(('unheard',))):  # before the graph is asked
            return
        topics = [getattr(self, f'{role}_sub').topic_name for role in unheard]
        publishers = {topic: self.count_publishers(topic) for topic in topics}
        named = ' or '.join(f'{topic} ({count} publisher{"" if count == 1 else "s"})'
                            for topic, count in publishers.items())
        hint = ('; where no publisher is, check the topic name or its remapping against '
                '`ros2 topic list`' if 0 in publishers.values() else '')
        self.fault_logged |= self.get_logger().warning(
            f'no frame on {named} in {listened:.0f} s: nothing is fused' + hint)

    def _partial_pairing(self, grown: dict) -> str:
        """Pairs are fused, but fewer than half of the frames of the slower camera found a
        partner lately (a clock difference near sync.timeout pairs only some): what and why."""
        shortfall = pairing_shortfall(grown, PAIRING_MIN_FRAMES)
        if shortfall is None:
            return ''
        pairs, possible = shortfall
        message = (f'only {pairs} pairs made from {possible} frames of the slower camera in the '
                   f'last {grown["span"]:.0f} s')
        hint = self._unpaired_hint(grown)
        if hint:
            message += f'; {hint}'
            # Logged here, not in a helper shared with _stall_message: rclpy throttles per call
            # site, and a partial stall's line must not silence the full stall's that follows.
            self.fault_logged |= self.get_logger().warning(
                f'few pairs made lately: {hint}', throttle_duration_sec=LOG_THROTTLE_S)
        return message

    def _mixed_senders(self) -> str:
        """Pairs are fused, but an input heard two publishers at a time lately: the images of two
        sources are paired as one camera's (a second driver, a bag played beside the camera)."""
        lines = []
        for role in ROLES:
            senders = self.senders[role].concurrent()
            if senders < 2:
                continue
            topic = getattr(self, f'{role}_sub').topic_name
            # By name from the graph: not every rmw gives a message the gid the graph has.
            names = sorted(node_of(info) for info in self.get_publishers_info_by_topic(topic))
            lines.append(f'{topic}: frames from {senders} publishers at a time in the last 5 s '
                         f'(its publishers now: {", ".join(names) or "none"}): their images '
                         'are paired as one camera\'s (a second driver, or a bag played beside '
                         'the camera?)')
        message = '; '.join(lines)
        if message:
            self.fault_logged |= self.get_logger().warning(
                message, throttle_duration_sec=LOG_THROTTLE_S)
        return message

    def _stamped_ahead(self) -> str:
        """Pairs are fused, but lately of frames captured apart: an input's frames were stamped
        ahead of their arrival, and of their partners' (a camera clock ahead: StampLead)."""
        fault = self.stamp_lead.fault()
        if fault is None:
            return ''
        message = stamped_ahead_message(*fault, self.pipeline.synchronizer.thermal_offset,
                                        self.get_fully_qualified_name(),
                                        offset_settable=self.approximate_sync is None)
        self.fault_logged |= self.get_logger().warning(
            message, throttle_duration_sec=LOG_THROTTLE_S)
        return message

    def _late_arrivals(self, grown: dict) -> str:
        """Pairs are fused, but more than a tenth of an input's frames came late lately."""
        message = late_arrivals(grown, PAIRING_MIN_FRAMES)
        if message:
            self.fault_logged |= self.get_logger().warning(
                message, throttle_duration_sec=LOG_THROTTLE_S)
        return message

    def _unpaired_hint(self, grown: dict) -> str:
        """What the stamps and arrivals tell, where thermal frames found no partner lately
        (`grown`): cameras on clocks that differ, an input delivered in bursts; '' if nothing."""
        if not thermal_frames_lost(grown):
            return ''
        sync = self.pipeline.synchronizer
        return unpaired_hint(self.pipeline.stamp_skew, sync.slop,
                             self._values()['sync.thermal_offset'], sync.timeout,
                             self.get_fully_qualified_name())

    def _stall_message(self, values: dict) -> str:
        """Both inputs arrive and nothing comes out: where the pairs went since pairs were last
        fused (not since the start: an old overload would take the blame), and what the stamps
        tell (logged too)."""
        since, counts = self._since_fusing()
        grown = {key: values[key] - counts.get(key, 0) for key in (
            Key.THERMAL_BAD_MESSAGE, Key.VISIBLE_BAD_MESSAGE, Key.THERMAL_BAD_STAMP,
            Key.VISIBLE_BAD_STAMP, Key.THERMAL_LATE, Key.VISIBLE_LATE, Key.THERMAL_OVERFLOW,
            Key.VISIBLE_OVERFLOW, Key.THERMAL_UNPAIRED, Key.VISIBLE_UNPAIRED,
            Key.INFERENCE_ERRORS, Key.PUBLISH_ERRORS, Key.PAIRS_DROPPED)
            if isinstance(values[key], int)}
        causes = [f'{key}: +{count}' for key, count in grown.items() if count > 0]
        current = self.worker.current()
        if current is not None:
            pair, seconds = current
            height, width = pair.visible_bgr.shape[:2]
            cause = inference_stall((width, height), seconds, self.fused_rate.window,
                                    not any(self._values()['inference_size']))
            causes += [cause] if cause else []
        message = 'inputs arrive but no pair was fused lately' + (
            f' (since {since}: {", ".join(causes)})' if causes else '')
        hint = self._unpaired_hint(grown)
        if hint:
            message += f'; {hint}'
        if hint and not self.stall_hint_logged:
            self.fault_logged |= self.get_logger().warning(message)
        else:
            self.fault_logged |= self.get_logger().warning(
                message, throttle_duration_sec=LOG_THROTTLE_S)
        self.stall_hint_logged |= bool(hint)
        return message

    def _report_namesakes(self) -> None:
        """Warn as other nodes of this node's full name appear in the graph (a node left over
        from an earlier launch): rcl starts a second one without a word, and both then fuse the
        same inputs onto the same outputs, while parameter services and /diagnostics reach
        either. Checked with the diagnostics, as discovery takes its time: both nodes say it."""
        namesakes = self.get_node_names_and_namespaces().count(
            (self.get_name(), self.get_namespace())) - 1  # the graph lists this node too
        if namesakes > self.namesakes_logged:
            self.get_logger().warning(
                f'another node of this name, {self.get_fully_qualified_name()}, is in the graph '
                f'({namesakes} besides this one): they publish the same outputs, and `ros2 param` '
                'and /diagnostics reach any of them; stop it, or name this node apart '
                '(-r __node:=NAME)')
        self.namesakes_logged = namesakes

    def _publish_diagnostics(self) -> None:
        self._report_namesakes()
        values = self._diagnostic_values()
        level, message = self._status(values)
        self._report_cleared_fault(level, message)
        self._publish_status(level, message, str(self.loaded.device), values)

    def _report_cleared_fault(self, level: int, message: str) -> None:
        """Follow the status's spells at WARN or ERROR, and say on the console when it reads
        'fusing' again after one a line warned of (a stopped camera, a stall, failing pairs):
        read on the console or /rosout alone, a fault that lasted 10 s and one still going
        looked alike. A spell no line warned of (a bag's end) ends as quietly as it began."""
        if level == DiagnosticStatus.OK and message == FUSING:
            if self.fault is not None and self.fault_logged:
                began, worst, latest = self.fault
                self.get_logger().info(
                    f'back to OK: fusing after {time.monotonic() - began:.0f} s at '
                    f'{_LEVEL_NAMES[worst]} ({_FIRST_CLAUSE.split(latest, maxsplit=1)[0]})')
            self.fault, self.fault_logged = None, False
        elif level != DiagnosticStatus.OK:
            began, worst = (time.monotonic(), level) if self.fault is None else self.fault[:2]
            self.fault = (began, max(worst, level), message)
            self.fault_logged |= level == DiagnosticStatus.ERROR  # its errors were logged

    def _publish_status(self, level: int, message: str, hardware_id: str, values: dict) -> None:
        status = DiagnosticStatus(
            level=level, name=status_name(self.get_fully_qualified_name()), message=message,
            hardware_id=hardware_id,
            values=[KeyValue(key=k, value=_format_value(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    def _log_worker_failures(self) -> None:
        if self.worker.failed > self.worker_failures_logged:
            self.worker_failures_logged = self.worker.failed
            self.get_logger().error(f'{self.worker.failed} pair(s) failed outside the model, '
                                    f'last: {self.worker.last_failure}')

    def destroy_node(self):
        if self.worker is not None:
            self.worker.stop()
        self.core_logs.close()
        super().destroy_node()

    def run_summary(self) -> str:
        """What the node did with what it received, over its whole run: the line it logs as it
        stops (/diagnostics, which had these counts, stops with it)."""
        values = self._diagnostic_values()
        errors = [f'{values[key]} {key}' for key in (Key.INFERENCE_ERRORS, Key.PUBLISH_ERRORS)
                  if values[key]]
        left = left_at_stop(values)
        return '; '.join([pairing_summary(values, values[Key.PAIRS_FUSED]), *errors]
                         + ([left] if left else []))


# What an incompatible-QoS peer means for an input and an output, and the usual fix where the
# mismatch is reliability.
_QOS_MISMATCH = {
    'input': ('a publisher offers QoS incompatible with this subscription, so nothing is '
              'received from it', ' The usual cause is a best_effort (sensor-data) publisher: '
              'set qos.input.reliability:=best_effort'),
    'output': ('a subscriber requests QoS incompatible with this publisher, so it receives '
               'nothing', ' A subscriber asking for reliable delivery (rviz does by default) gets '
               'nothing from a best_effort output: set qos.output.reliability:=reliable'),
}


def _import_message_filters(p: dict):
    """Return the message_filters module for sync.backend message_filters; None for our own."""
    if p['sync.backend'] != 'message_filters':
        return None
    try:
        import message_filters
    except ImportError:
        raise settings.SettingsError(
            'sync.backend message_filters needs the ROS 2 package message_filters (not on PyPI: '
            'install ros-$ROS_DISTRO-message-filters and source the distro), or use '
            'sync.backend:=own') from None
    return message_filters


def _format_value(value) -> str:
    return f'{value:.4g}' if isinstance(value, float) else str(value)
