"""What the node reports: QoS mismatches per topic, unknown parameters, honest latency.

Also the message_filters synchronizer backend (sync.backend), or its clear absence.
"""

import importlib.util
import os
import re
import resource
import time

import numpy as np
import pytest
from rclpy.node import NodeNameNonExistentError
from rclpy.time import Time

from ros_harness import (Probe, image_message, node_log, received_stamps, running_node,
                         wait_for_log)
from s4fusion_ros.diagnostics import (BUSY_KEYS, LATENCY_KEYS, NOT_REPORTED, Key,
                                      node_status, nothing_pending, values_of)

pytestmark = pytest.mark.ros

PARAMS = {'device': 'cpu', 'inference_size': [80, 60], 'diagnostics.period': 0.2}
THERMAL = np.random.default_rng(0).integers(20000, 30000, (120, 160), dtype=np.uint16)
VISIBLE = np.full((120, 160, 3), 90, np.uint8)
HAVE_MESSAGE_FILTERS = importlib.util.find_spec('message_filters') is not None


class Diagnostics:
    """The node's latest /diagnostics values, as the probe receives them."""

    def __init__(self, probe):
        from diagnostic_msgs.msg import DiagnosticArray
        self.values, self.received, self.message = {}, 0, ''
        self.statuses = []  # (level, message) of every status received
        probe.create_subscription(DiagnosticArray, '/diagnostics', self._on_message, 10)

    def _on_message(self, array) -> None:
        status = node_status(array, '/s4fusion_node')
        if status is not None:
            self.values, self.message = values_of(status), status.message
            self.statuses.append((status.level, status.message))
            self.received += 1


def fuse_pairs(probe, proc, stamp_ns: int, count: int) -> int:
    """Publish pairs stamped from `stamp_ns`, 0.1 s apart, until `count` more fused outputs
    arrived; return the stamp the next pair would have."""
    wanted = len(probe.fused) + count
    end = time.monotonic() + 120
    while len(probe.fused) < wanted:
        probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp_ns, 'thermal'))
        probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp_ns, 'rgb'))
        probe.spin_for(0.2)
        stamp_ns += 100_000_000
        assert time.monotonic() < end and proc.poll() is None, node_log(proc)
    return stamp_ns


def fresh_diagnostics(probe, diagnostics) -> dict:
    """Return the values of a diagnostics message received after this call."""
    seen = diagnostics.received
    assert probe.spin_until(lambda: diagnostics.received > seen + 1, 30), 'no diagnostics'
    return diagnostics.values


def test_incompatible_qos_and_unknown_parameters_are_reported_by_name(ros_context, tmp_path):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    probe = Probe('qos_probe')
    # Best-effort (sensor-data) publishers on both inputs; the node subscribes reliable.
    publishers = [probe.create_publisher(Image, topic, qos_profile_sensor_data)
                  for topic in ('thermal/image_raw', 'visible/image_raw')]
    # And a parameter file written for the node in a namespace it does not run in: rcl ignores
    # it silently.
    elsewhere = tmp_path / 'robot.yaml'
    elsewhere.write_text('/robot/s4fusion_node:\n  ros__parameters:\n    half: false\n')
    with running_node({**PARAMS, 'normalisation.mode': 'minmax'},
                      extra_args=['-p', 'sync.slopp:=0.1', '--params-file', str(elsewhere)]
                      ) as proc:
        log = wait_for_log(proc, "qos.input.reliability:=best_effort")
        log = wait_for_log(proc, '/thermal/image_raw: a publisher offers QoS incompatible',
                           '/visible/image_raw: a publisher offers QoS incompatible')
        # The diagnostics of the silent inputs say why too, for a monitor that reads no log.
        diagnostics = Diagnostics(probe)
        values = fresh_diagnostics(probe, diagnostics)
        # Nothing fused: the latencies say so rather than 'nan'.
        assert all(values[key] == 'n/a: no pair fused yet' for key in LATENCY_KEYS), values
        assert diagnostics.message == (
            'waiting for both inputs (thermal: /qos_probe publishes best_effort to this reliable '
            'input, set qos.input.reliability:=best_effort; visible: /qos_probe publishes '
            'best_effort to this reliable input, set qos.input.reliability:=best_effort)'), \
            diagnostics.message
        # Gone, they are no longer named.
        for publisher in publishers:
            probe.destroy_publisher(publisher)
        assert probe.spin_until(lambda: diagnostics.received and diagnostics.message
                                == 'waiting for both inputs', 30), diagnostics.message
    probe.destroy_node()
    assert 'ignoring unknown parameters' in log, log
    assert 'normalisation.mode, sync.slopp' in log, log
    assert (f'{elsewhere}: none of its sections (/robot/s4fusion_node) applies to '
            "/s4fusion_node, so none of its values is used") in log, log
    assert 'yaml: none of its sections' not in log.replace(str(elsewhere), ''), log
    # Reported before the model loads (seconds), not after it.
    assert log.index('normalisation.mode, sync.slopp') < log.index('loading the model'), log


def test_standard_qos_overrides_set_one_topic_over_the_qos_parameters(ros_context):
    # ROS 2's qos_overrides parameters (read at start) change one topic; qos.* set the rest.
    from rclpy.qos import ReliabilityPolicy
    # best_available (which the node refused at start) takes the reliability of the publishers
    # the node has discovered as it subscribes: with none, reliable. In a namespace of its own,
    # where no earlier test's best-effort publisher may still be discovered.
    ns = '/qos'
    probe = Probe('qos_override_probe', namespace=ns)
    overrides = {f'{ns}/thermal/image_raw': {'subscription': {'reliability': 'best_effort'}},
                 f'{ns}/visible/image_raw': {'subscription': {'reliability': 'best_available'}},
                 f'{ns}/s4fusion_node/fused': {'publisher': {'reliability': 'reliable'}}}
    # And one for a topic the node does not have, a typo it reports.
    overrides[f'{ns}/thermal/image'] = {'subscription': {'reliability': 'best_effort'}}
    # qos.input.* at their defaults, as config/s4fusion.yaml gives them; qos.output.* not.
    with running_node({**PARAMS, 'qos.input.reliability': 'reliable',
                       'qos.output.reliability': 'best_effort',
                       'qos_overrides': overrides}, namespace=ns) as proc:
        probe.wait_for_node(proc)

        def endpoints():
            thermal = probe.get_subscriptions_info_by_topic(f'{ns}/thermal/image_raw')
            visible = probe.get_subscriptions_info_by_topic(f'{ns}/visible/image_raw')
            outputs = [probe.get_publishers_info_by_topic(f'{ns}/s4fusion_node/{name}')
                       for name in ('fused', 'saliency')]
            found = [thermal, visible, *outputs]
            return all(found) and [endpoint[0] for endpoint in found]

        assert probe.spin_until(endpoints, 30), node_log(proc)
        thermal, visible, fused, saliency = endpoints()
        # The overrides are reported after the endpoints exist: wait for the last of them.
        log = wait_for_log(proc, f'qos_overrides.{ns}/thermal/image.subscription.reliability;',
                           f'on {ns}/thermal/image_raw', f'on {ns}/visible/image_raw',
                           f'on {ns}/s4fusion_node/fused')
    probe.destroy_node()
    assert thermal.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
    assert visible.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    assert fused.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    assert saliency.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT  # qos.output.*
    assert ('ignoring unknown parameters (this node does not declare them): '
            f'qos_overrides.{ns}/thermal/image.subscription.reliability;') in log, log
    # Reported once, and the overrides the topics took are no parameter update.
    assert log.count('ignoring unknown parameters') == 1 and 'parameters updated' not in log, log
    # Said at start: a `ros2 param dump` file's overrides silently outvoted qos.* (and the
    # launch file's input_reliability). A warning where qos.* was given too, other than its
    # default (the output's), else information: one topic set apart is what an override is for.
    assert re.search(rf'\[INFO\] .*: qos_overrides\.{ns}/thermal/image_raw\.subscription\.'
                     r'reliability best_effort overrides qos\.input\.reliability reliable on '
                     rf'{ns}/thermal/image_raw$', log, re.MULTILINE), log
    assert re.search(rf'\[WARN\] .*: qos_overrides\.{ns}/s4fusion_node/fused\.publisher\.'
                     r'reliability reliable overrides qos\.output\.reliability best_effort on '
                     rf'{ns}/s4fusion_node/fused, both given at start \(a `ros2 param dump` '
                     r'file holds one override for each topic\); remove the override to use '
                     r'qos\.output\.reliability$', log, re.MULTILINE), log
    assert log.count(' overrides qos.') == 3, log  # thermal, visible, fused; not saliency


def test_a_remapped_input_takes_its_transport_topics_along(ros_context):
    # As image_transport does since Kilted: `-r thermal/image_raw:=/lwir/image_raw` left the node
    # on /robot1/thermal/image_raw/compressed, silent. A remap of the transport's own topic
    # still applies.
    params = {**PARAMS, 'thermal': {'transport': 'compressed'},
              'visible': {'transport': 'compressed'}}
    with running_node(params, namespace='/robot1', extra_args=[
            '-r', 'thermal/image_raw:=/lwir/image_raw',
            '-r', 'visible/image_raw/compressed:=/front/jpeg']) as proc:
        wait_for_log(proc, 'fusing /lwir/image_raw/compressed + /front/jpeg -> '
                           '/robot1/s4fusion_node/fused')


def test_remapped_outputs_take_their_transport_and_camera_info_topics_along(ros_context):
    # As image_transport's publishers do: `-r ~/fused:=/detector/image_raw` left the compressed
    # transport on ~/fused/compressed and the camera_info on ~/camera_info, where a viewer and a
    # detector beside /detector/image_raw found nothing. Outputs remapped apart each get one.
    probe = Probe('output_remap_probe')
    expected = {'/detector/image_raw', '/detector/image_raw/compressed', '/detector/camera_info',
                '/robot1/maps/saliency', '/robot1/maps/saliency/compressed',
                '/robot1/maps/camera_info', '/diagnostics'}
    with running_node(PARAMS, namespace='/robot1', extra_args=[
            '-r', '~/fused:=/detector/image_raw', '-r', '~/saliency:=maps/saliency']) as proc:
        wait_for_log(proc, '-> /detector/camera_info, /robot1/maps/camera_info')

        def published() -> set:
            try:
                topics = probe.get_publisher_names_and_types_by_node('s4fusion_node', '/robot1')
            except NodeNameNonExistentError:  # not discovered yet
                return set()
            return {name for name, _ in topics if not name.startswith(('/rosout', '/parameter'))}
        probe.spin_until(lambda: published() == expected, 30)
        assert published() == expected, node_log(proc)
    probe.destroy_node()


def test_a_start_and_an_end_of_the_inputs_report_no_stall_and_no_stopped_camera(ros_context):
    # Before the first pair came out of the model the node logged "inputs arrive but no pair
    # was fused lately" (and, later, still reported it as a WARN on /diagnostics), and between
    # a camera's first two frames, or as a recording ended, "no thermal frame ... while visible
    # frames arrive".
    from diagnostic_msgs.msg import DiagnosticStatus
    probe = Probe('start_end_probe')
    diagnostics = Diagnostics(probe)
    thermal = np.random.default_rng(1).integers(20000, 30000, (480, 640), dtype=np.uint16)
    visible = np.full((480, 640, 3), 90, np.uint8)
    with running_node({'device': 'cpu', 'diagnostics.period': 0.1}) as proc:
        probe.wait_for_node(proc)
        end, stamp = time.monotonic() + 4.0, probe.get_clock().now().nanoseconds
        while time.monotonic() < end:  # thermal at 10 Hz, visible at 20 Hz
            probe.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'thermal'))
            for half in range(2):
                probe.visible_pub.publish(image_message(visible, 'bgr8',
                                                        stamp + half * 50_000_000, 'rgb'))
                probe.spin_for(0.05)
            stamp += 100_000_000
        assert probe.fused, node_log(proc)
        # The visible recording runs 2 s longer: once the thermal input reads silent, the
        # visible one no longer arrives either, and no camera stopped while the other sends.
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            probe.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
            probe.spin_for(0.05)
            stamp += 50_000_000
        probe.spin_for(6.5)  # past the rate window: both inputs silent
        log = node_log(proc)
    probe.destroy_node()
    assert 'no pair was fused' not in log and 'frames arrive' not in log, log
    assert not [status for status in diagnostics.statuses if 'no pair was fused' in status[1]]
    # The first model step after both inputs arrived: OK, and said so.
    assert (DiagnosticStatus.OK, 'both inputs arrive: waiting for the first fused pair') \
        in diagnostics.statuses, diagnostics.statuses


def test_a_subscriber_the_best_effort_outputs_cannot_serve_is_reported_by_topic(ros_context):
    probe = Probe('output_qos_probe')  # subscribes to both outputs reliable
    with running_node({**PARAMS, 'qos.output.reliability': 'best_effort'}) as proc:
        log = wait_for_log(proc, '/s4fusion_node/fused: a subscriber requests QoS incompatible',
                           '/s4fusion_node/saliency: a subscriber requests QoS incompatible')
    probe.destroy_node()
    assert 'set qos.output.reliability:=reliable' in log, log


def test_latency_is_reported_only_when_stamps_and_clock_agree(ros_context):
    probe = Probe('latency_probe')
    diagnostics = Diagnostics(probe)
    with running_node(PARAMS) as proc:
        probe.wait_for_node(proc)
        # A recording from 2020 played in wall time without /clock: years "late".
        fuse_pairs(probe, proc, 1_600_000_000 * 10**9, count=2)
        old = fresh_diagnostics(probe, diagnostics)
        fuse_pairs(probe, proc, probe.get_clock().now().nanoseconds, count=2)
        live = fresh_diagnostics(probe, diagnostics)
        # Off the clock again: the live pairs' latencies stayed on show, frozen.
        fuse_pairs(probe, proc, 1_600_000_000 * 10**9, count=2)
        again = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert old[Key.END_TO_END_LATENCY_MEAN].startswith('n/a: the stamps are not on'), old
    assert int(old[Key.STAMPS_OFF_CLOCK]) >= 2, old
    assert 0.0 <= float(live[Key.END_TO_END_LATENCY_MEAN]) < 60.0, live
    assert 0.0 <= float(live[Key.END_TO_END_LATENCY_P95]) < 60.0, live
    assert again[Key.END_TO_END_LATENCY_MEAN].startswith('n/a: the stamps are not on'), again
    assert int(again[Key.STAMPS_OFF_CLOCK]) >= int(old[Key.STAMPS_OFF_CLOCK]) + 2, again


def test_a_backward_clock_jump_is_logged_and_pairing_goes_on(ros_context):
    probe = Probe('clock_jump_probe')
    diagnostics = Diagnostics(probe)
    # Back by 0.7 s from the newest stamps: late at the default sync.clock_jump (1 s), a jump
    # at 0.5 s.
    with running_node({**PARAMS, 'sync.clock_jump': 0.5}) as proc:
        probe.wait_for_node(proc)
        after = fuse_pairs(probe, proc, probe.get_clock().now().nanoseconds, count=2)
        fuse_pairs(probe, proc, after - 800_000_000, count=2)  # a camera restarted, say
        log = wait_for_log(proc, 'the input stamps jumped back')
        values = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert 'pairing restarted on the new timeline (1 time(s) so far)' in log, log
    assert values[Key.SYNC_RESETS] == '1', values


def test_two_publishers_on_one_input_are_reported_by_name(ros_context):
    # A second thermal driver (or a bag played beside the camera) stamping on the same clock:
    # its frames paired as the camera's, and the status stayed OK.
    from rclpy.node import Node
    from sensor_msgs.msg import Image
    probe = Probe('mixed_probe')
    second = Node('second_camera')
    second_thermal = second.create_publisher(Image, 'thermal/image_raw', 50)
    diagnostics = Diagnostics(probe)
    with running_node(PARAMS) as proc:
        probe.wait_for_node(proc)
        assert probe.spin_until(lambda: second_thermal.get_subscription_count() > 0, 30)
        stamp_ns = probe.get_clock().now().nanoseconds
        end = time.monotonic() + 60
        while 'publishers at a time' not in diagnostics.message:  # both go on sending
            assert time.monotonic() < end, (diagnostics.message, node_log(proc))
            second_thermal.publish(image_message(THERMAL // 2, 'mono16', stamp_ns - 50_000_000,
                                                 'thermal'))
            stamp_ns = fuse_pairs(probe, proc, stamp_ns, count=1)
        values, message = diagnostics.values, diagnostics.message
        log = wait_for_log(proc, 'publishers at a time')
    second.destroy_node()
    probe.destroy_node()
    assert values[Key.THERMAL_PUBLISHERS] == '2' and values[Key.VISIBLE_PUBLISHERS] == '1'
    assert message.startswith('/thermal/image_raw: frames from 2 publishers at a time in the last '
                              '5 s (its publishers now: /mixed_probe, /second_camera)'), message
    assert 'paired as one camera' in log


def test_inputs_not_heard_yet_read_no_publishers_rather_than_a_middleware_that_cannot_say(
        ros_context):
    # Until the first frame came, the count read 'n/a (the middleware does not say)' on a
    # middleware that does: misleading beside 'waiting for both inputs'.
    probe = Probe('no_input_probe')
    diagnostics = Diagnostics(probe)
    with running_node(PARAMS) as proc:
        probe.wait_for_node(proc)
        before = fresh_diagnostics(probe, diagnostics)
        fuse_pairs(probe, proc, probe.get_clock().now().nanoseconds, count=1)
        after = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert before[Key.THERMAL_PUBLISHERS] == before[Key.VISIBLE_PUBLISHERS] == '0', before
    assert after[Key.THERMAL_PUBLISHERS] == after[Key.VISIBLE_PUBLISHERS] == '1', after


@pytest.mark.parametrize('remap, named', [
    (['-r', 'thermal/image_raw:=/lwir/image_raw'],
     r'/lwir/image_raw \(0 publishers\) in \d+ s: nothing is fused; where no publisher is'),
    ([], r'/thermal/image_raw \(1 publisher\) in \d+ s: nothing is fused$'),
], ids=['a topic nobody publishes', 'a publisher that sends nothing'])
def test_an_input_never_heard_is_logged_with_its_publishers(ros_context, remap, named):
    # A thermal topic misnamed or remapped wrong: visible frames came, the diagnostics said
    # 'waiting for the thermal input', and the log nothing (the stopped-camera line times a
    # camera's silence from its last frame).
    probe = Probe('unheard_probe')
    with running_node(PARAMS, extra_args=remap) as proc:
        wait_for_log(proc, 'fusing ')
        end, stamp = time.monotonic() + 60, probe.get_clock().now().nanoseconds
        # A line every 5 s; the first names the visible topic too where no visible frame came
        # in the node's first 5 s (discovery held up on a loaded machine): the next does not.
        while not (line := re.search(rf'\]: no frame on {named}', node_log(proc), re.MULTILINE)):
            probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp, 'rgb'))
            probe.spin_for(0.1)
            stamp += 100_000_000
            assert time.monotonic() < end and proc.poll() is None, node_log(proc)
        log = node_log(proc)
    probe.destroy_node()
    assert 'visible/image_raw (' not in log[line.start():], log  # heard: not named
    # Never before the node listened for a rate window: a camera's first frames take time.
    assert all(int(n) >= 5 for n in re.findall(r'\]: no frame on .* in (\d+) s: ', log)), log


def test_a_second_node_of_the_same_name_is_reported_by_both():
    # A node left over from an earlier launch: rcl lets a second one of the same full name start
    # without a word, and both then fuse the same inputs onto the same outputs, while
    # `ros2 param set` and /diagnostics reach either.
    duplicate = 'another node of this name, /s4fusion_node, is in the graph'
    with running_node(PARAMS) as first:
        wait_for_log(first, 'fusing /thermal/image_raw')
        with running_node(PARAMS) as second:
            log = wait_for_log(second, 'fusing /thermal/image_raw', duplicate)
            first_log = wait_for_log(first, duplicate)
    assert first_log.count(duplicate) == 1 and log.count(duplicate) == 1, (first_log, log)


@pytest.mark.skipif(HAVE_MESSAGE_FILTERS, reason='message_filters is installed here')
def test_message_filters_backend_without_the_package_is_a_clear_start_up_error():
    with running_node({**PARAMS, 'sync.backend': 'message_filters'}) as proc:
        code = proc.wait(timeout=120)
    log = node_log(proc)
    assert code == 1, log
    assert 'sync.backend message_filters needs the ROS 2 package message_filters' in log, log
    assert 'Traceback' not in log and 'loading the model' not in log, log


@pytest.mark.parametrize('setting, reason', [
    ({'sync.slop': 0.0}, 'sync.slop 0 pairs nothing with sync.backend message_filters'),
    ({'sync.thermal_offset': 0.02}, 'sync.thermal_offset is not supported with sync.backend')])
def test_message_filters_backend_refuses_settings_it_cannot_pair_with(setting, reason):
    # Checked as the parameters are declared, before the package is looked for.
    with running_node({**PARAMS, 'sync.backend': 'message_filters', **setting}) as proc:
        code = proc.wait(timeout=120)
    log = node_log(proc)
    assert code == 1 and reason in log, log
    assert 'Traceback' not in log and 'loading the model' not in log, log


@pytest.mark.skipif(not HAVE_MESSAGE_FILTERS, reason='message_filters needs a ROS 2 distro')
def test_message_filters_backend_pairs_and_fuses(ros_context):
    probe = Probe('message_filters_probe')
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'sync.backend': 'message_filters'}) as proc:
        probe.wait_for_node(proc)
        fuse_pairs(probe, proc, probe.get_clock().now().nanoseconds, count=3)
        values = fresh_diagnostics(probe, diagnostics)
        # A negative stamp raises in message_filters' synchronizer, inside the subscription
        # callback: it stopped the node. It is dropped and counted before it.
        negative = image_message(THERMAL, 'mono16', 0, 'thermal')
        negative.header.stamp.sec = -5
        probe.thermal_pub.publish(negative)
        # Stamps 20 ms apart pair within the default slop (50 ms).
        stamp = probe.get_clock().now().nanoseconds
        pair = (image_message(THERMAL, 'mono16', stamp, 'thermal'),
                image_message(VISIBLE, 'bgr8', stamp + 20_000_000, 'offset'))
        for _ in range(2):  # sent twice: its synchronizer paired the copies again
            probe.thermal_pub.publish(pair[0])
            probe.visible_pub.publish(pair[1])
        assert probe.spin_until(lambda: any(m.header.frame_id == 'offset' for m in probe.fused),
                                60), node_log(proc)
        after = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert [m.header.frame_id for m in probe.fused].count('offset') == 1
    assert after[Key.THERMAL_BAD_STAMP] == '2' and after[Key.VISIBLE_BAD_STAMP] == '1', after
    assert 'pairing is by header stamp, and a message just before had it' in node_log(proc)
    assert values[Key.SYNC_BACKEND] == 'message_filters', values
    assert int(values[Key.PAIRS]) >= 3, values
    assert values[Key.THERMAL_UNPAIRED] == NOT_REPORTED, values
    # Its subscriber hands over no MessageInfo: not 0 publishers while fusing.
    assert values[Key.THERMAL_PUBLISHERS] == values[Key.VISIBLE_PUBLISHERS] == NOT_REPORTED
    assert nothing_pending(values), values  # what s4fusion-flood waits for
    assert 'dropped a message stamped -5000000000 ns' in node_log(proc)


@pytest.mark.skipif(not HAVE_MESSAGE_FILTERS, reason='message_filters needs a ROS 2 distro')
def test_message_filters_backend_counts_each_bad_message_of_a_pair(ros_context):
    # Its pairs are decoded once paired: a pair of two bad messages counted only the thermal
    # one, and the visible one as received.
    probe = Probe('message_filters_bad_probe')
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'sync.backend': 'message_filters'}) as proc:
        probe.wait_for_node(proc)
        stamp = probe.get_clock().now().nanoseconds
        thermal = image_message(THERMAL, 'mono16', stamp, 'thermal')
        thermal.encoding = 'nv21'
        visible = image_message(VISIBLE, 'bgr8', stamp, 'rgb')
        visible.data = bytes(visible.data[:1000])  # cut short
        probe.thermal_pub.publish(thermal)
        probe.visible_pub.publish(visible)
        fuse_pairs(probe, proc, stamp + 100_000_000, count=1)  # after the bad pair
        values = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert values[Key.THERMAL_BAD_MESSAGE] == '1' and values[Key.VISIBLE_BAD_MESSAGE] == '1', \
        values
    # Each input's frames: its bad one and those paired.
    assert values[Key.THERMAL_RECEIVED] == values[Key.VISIBLE_RECEIVED] == values[Key.PAIRS], \
        values
    log = node_log(proc)
    assert "/thermal/image_raw: dropped a 'nv21' message" in log, log
    assert "/visible/image_raw: dropped a 'bgr8' message" in log, log


@pytest.mark.skipif(not HAVE_MESSAGE_FILTERS, reason='message_filters needs a ROS 2 distro')
def test_message_filters_backend_pairs_again_after_the_stamps_jump_back(ros_context):
    # Its synchronizer keeps the sync.queue_size newest stamps of each input and drops the
    # oldest: once a 30 Hz camera beside a 10 Hz one filled its queue with frames that found no
    # partner, every frame after a jump back (a looping bag, a restarted camera) was the oldest
    # and dropped as it came, so nothing paired again.
    probe = Probe('message_filters_jump_probe')
    params = {**PARAMS, 'sync.backend': 'message_filters', 'sync.queue_size': 10}
    with running_node(params) as proc:
        probe.wait_for_node(proc)
        start = probe.get_clock().now().nanoseconds
        for i in range(8):  # 16 visible frames without a partner
            stamp = start + i * 100_000_000
            for k in range(3):
                probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp + k * 33_000_000,
                                                        'before'))
            probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp, 'before'))
            probe.spin_for(0.05)
        probe.spin_for(1.0)  # the model may still fuse a pair of those
        fused_before = len(probe.fused)
        for i in range(10):  # pairs 10 s back
            stamp = start - 10 * 10**9 + i * 100_000_000
            probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp, 'after'))
            probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp, 'after'))
            probe.spin_for(0.2)
        probe.spin_until(lambda: any(m.header.frame_id == 'after' for m in probe.fused), 30)
        log = node_log(proc)
    probe.destroy_node()
    after = [m.header.frame_id for m in probe.fused[fused_before:]]
    assert after and set(after) == {'after'}, (after, log)
    assert 'the input stamps jumped back' in log, log


@pytest.mark.skipif(not HAVE_MESSAGE_FILTERS, reason='message_filters needs a ROS 2 distro')
def test_message_filters_backend_pairs_every_frame_of_a_short_looped_bag(ros_context):
    # A 2 s bag played with --loop: the restart at each wrap kept the ended pass's stamps up to
    # sync.clock_jump past the new one in the repeat filter, so the new pass's first second was
    # dropped as repeated stamps (11 frames of each input per wrap). Its resets read n/a.
    probe = Probe('message_filters_loop_probe')
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'sync.backend': 'message_filters'}) as proc:
        probe.wait_for_node(proc)
        start = probe.get_clock().now().nanoseconds
        for _ in range(3):
            for stamp in range(start, start + 2 * 10**9, 100_000_000):
                probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp, 'thermal'))
                probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp, 'rgb'))
                probe.spin_for(0.1)
        values = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert values[Key.THERMAL_BAD_STAMP] == values[Key.VISIBLE_BAD_STAMP] == '0', values
    assert values[Key.PAIRS] == '60', values
    # Both inputs jump at a wrap: one reset each, as the own synchronizer counts them.
    assert values[Key.SYNC_RESETS] == '2', values
    assert 'pairing restarted on the new timeline (1 time(s) so far)' in node_log(proc)


# A message_filters whose synchronizer keeps its queues under names of its own, as a later
# version may: the clock-jump restart reaches into the private `queues` and `lock` of 4.x to 6.x.
OTHER_MESSAGE_FILTERS = '''
class SimpleFilter:
    def __init__(self):
        self.callbacks = []

    def registerCallback(self, callback, *args):
        self.callbacks.append((callback, args))

    def signalMessage(self, *msgs):
        for callback, args in self.callbacks:
            callback(*msgs, *args)


class Subscriber(SimpleFilter):
    def __init__(self, node, msg_type, topic, qos_profile=10, **options):
        super().__init__()
        self.sub = node.create_subscription(msg_type, topic, self.signalMessage, qos_profile,
                                            **options)
        self.topic_name = self.sub.topic_name


class ApproximateTimeSynchronizer(SimpleFilter):
    """Pairs equal stamps, which is all the test sends."""

    def __init__(self, fs, queue_size, slop):
        super().__init__()
        self._pending = [{} for _ in fs]
        for f, pending in zip(fs, self._pending):
            f.registerCallback(self._add, pending)

    def _add(self, msg, pending):
        pending[msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec] = msg
        common = set.intersection(*(set(queue) for queue in self._pending))
        for stamp in sorted(common):
            self.signalMessage(*(queue.pop(stamp) for queue in self._pending))
'''


@pytest.fixture
def other_message_filters(tmp_path, monkeypatch):
    """The node's processes import OTHER_MESSAGE_FILTERS as message_filters."""
    (tmp_path / 'message_filters').mkdir()
    (tmp_path / 'message_filters' / '__init__.py').write_text(OTHER_MESSAGE_FILTERS)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
        filter(None, (str(tmp_path), os.environ.get('PYTHONPATH')))))


def test_a_message_filters_keeping_its_queues_elsewhere_survives_a_clock_jump(
        ros_context, other_message_filters):
    # The node stopped on an AttributeError at the first stamp that jumped back.
    probe = Probe('other_message_filters_probe')
    with running_node({**PARAMS, 'sync.backend': 'message_filters'}) as proc:
        probe.wait_for_node(proc)
        start = probe.get_clock().now().nanoseconds
        fuse_pairs(probe, proc, start, count=1)
        fuse_pairs(probe, proc, start - 10 * 10**9, count=1)  # 10 s back
        log = node_log(proc)
    probe.destroy_node()
    assert "this message_filters keeps its synchronizer's queues where the node cannot" in log
    assert 'the input stamps jumped back' in log, log


def test_message_filters_backend_warns_of_a_camera_clock_ahead(
        ros_context, other_message_filters):
    # Its Subscriber hands the node each message too: a thermal camera whose clock runs 0.5 s
    # ahead pairs with visible frames captured 0.5 s later there as well (the stand-in pairs
    # equal stamps), and sync.thermal_offset, which message_filters has not, is not offered.
    from diagnostic_msgs.msg import DiagnosticStatus
    probe = Probe('message_filters_ahead_probe')
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'sync.backend': 'message_filters'}) as proc:
        probe.wait_for_node(proc)
        captured = []  # the thermal frames' stamps, which the visible camera's take as it comes
        end = time.monotonic() + 60
        while not (diagnostics.message.startswith('pairs of frames captured')
                   and diagnostics.values.get(Key.THERMAL_AHEAD, '0') != '0'):
            assert time.monotonic() < end and proc.poll() is None, \
                (diagnostics.message, node_log(proc))
            now = probe.get_clock().now().nanoseconds
            captured.append(now + 500_000_000)
            probe.thermal_pub.publish(image_message(THERMAL, 'mono16', captured[-1], 'thermal'))
            while captured[0] <= now:
                probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', captured.pop(0), 'rgb'))
            probe.spin_for(0.1)
        message, level = diagnostics.message, diagnostics.statuses[-1][0]
    probe.destroy_node()
    assert level == DiagnosticStatus.WARN, message
    assert re.search(r'thermal stamps run 0\.[45]\d\d s ahead of their arrival', message), message
    assert message.endswith('(sync.thermal_offset, which could compensate it, needs '
                            'sync.backend own)'), message
    assert diagnostics.values[Key.VISIBLE_AHEAD] == '0', diagnostics.values


def test_nothing_pending_reads_the_counts_a_backend_does_not_report_as_none():
    idle = {key: '0' for key in BUSY_KEYS}
    assert nothing_pending(idle)
    assert not nothing_pending({**idle, Key.PAIRS_QUEUED: '1'})
    assert not nothing_pending({})  # no diagnostics yet
    assert nothing_pending({**idle, Key.THERMAL_PENDING: NOT_REPORTED,
                            Key.VISIBLE_PENDING: NOT_REPORTED})


def test_on_sim_time_a_slow_simulation_pairs_within_its_own_timeout(ros_context):
    # A simulator at a tenth of real time: a visible frame 0.04 s of sim time after its thermal
    # partner comes 0.4 s later by the wall clock, past a 0.2 s sync.timeout timed by the wall
    # clock, so every thermal frame went unpaired (and the skew hint offered -0.36 s).
    from rosgraph_msgs.msg import Clock
    probe = Probe('slow_sim_probe')
    clock_pub = probe.create_publisher(Clock, '/clock', 10)
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'use_sim_time': True, 'sync.timeout': 0.2}) as proc:
        probe.wait_for_node(proc)
        events = sorted([(100.0 + 0.1 * k, 'thermal') for k in range(1, 5)]
                        + [(100.04 + 0.1 * k, 'visible') for k in range(1, 5)])
        # The simulation runs 3 s before its cameras send: until the node hears /clock, which
        # took it up to a second or two after its image topics matched (with the package's Fast
        # DDS profile), it times arrivals by the wall clock and the first pair was lost.
        started = time.monotonic() + 3.0
        while events:
            sim = 100.0 + 0.1 * (time.monotonic() - started)
            clock_pub.publish(Clock(clock=Time(seconds=sim).to_msg()))
            while events and events[0][0] <= sim:
                stamp, role = events.pop(0)
                image = (image_message(THERMAL, 'mono16', round(stamp * 1e9), 'thermal')
                         if role == 'thermal' else
                         image_message(VISIBLE, 'bgr8', round(stamp * 1e9), 'rgb'))
                getattr(probe, f'{role}_pub').publish(image)
            probe.spin_for(0.02)
        assert probe.spin_until(lambda: len(probe.fused) == 4, 30), node_log(proc)
        values = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert values[Key.THERMAL_UNPAIRED] == values[Key.VISIBLE_UNPAIRED] == '0', values


def test_on_sim_time_a_clock_jump_back_does_not_count_pairs_stamped_before_it(ros_context):
    # A bag looped with --clock: /clock jumps back at each wrap under the pairs of the pass that
    # ended, still in flight or in inference. Fused after the jump they read seconds "early":
    # counted as stamped off the node clock, one or two more at every wrap, and the latency
    # read 'n/a ... is /clock published?' until the next pair.
    from rosgraph_msgs.msg import Clock
    probe = Probe('clock_wrap_probe')
    clock_pub = probe.create_publisher(Clock, '/clock', 10)
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'use_sim_time': True}) as proc:
        probe.wait_for_node(proc)

        def play(clock_s: float, stamp_ns: int, pairs: int = 0, fused: int = 0) -> int:
            """Publish /clock from `clock_s` and pairs stamped from `stamp_ns` together, 0.1 s
            apart, `pairs` of them or until `fused` more came out; the next stamp."""
            wanted, end, published = len(probe.fused) + fused, time.monotonic() + 60, 0
            while published < pairs if pairs else len(probe.fused) < wanted:
                published += 1
                clock_pub.publish(Clock(clock=Time(seconds=clock_s).to_msg()))
                probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp_ns, 'thermal'))
                probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp_ns, 'rgb'))
                probe.spin_for(0.2)
                clock_s, stamp_ns = clock_s + 0.1, stamp_ns + 100_000_000
                assert time.monotonic() < end and proc.poll() is None, node_log(proc)
            return stamp_ns

        # The clock first: a pair fused before the node heard it is rightly off the clock (0).
        assert probe.spin_until(lambda: clock_pub.get_subscription_count() > 0, 30)
        for tick in range(5):
            clock_pub.publish(Clock(clock=Time(seconds=199.5 + 0.1 * tick).to_msg()))
            probe.spin_for(0.1)
        wrap_ns = play(200.0, 200 * 10**9, fused=2)
        # The clock wraps back 10 s under the ended pass's last two pairs; the next pass.
        play(190.0, wrap_ns, pairs=2)
        play(190.2, 190_200_000_000, fused=2)
        wrapped = fresh_diagnostics(probe, diagnostics)
        # Stamps ahead of where the clock ever was are off it, jump or not.
        play(190.0, 300 * 10**9, fused=2)
        ahead = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert wrap_ns in received_stamps(probe.fused), 'no pair of the ended pass was fused'
    assert wrapped[Key.STAMPS_OFF_CLOCK] == '0', wrapped
    assert -1.0 <= float(wrapped[Key.END_TO_END_LATENCY_MEAN]) < 60.0, wrapped
    assert int(ahead[Key.STAMPS_OFF_CLOCK]) >= 2, ahead


def test_on_sim_time_with_no_clock_the_node_reports_and_decides_its_last_frame(ros_context):
    # A bag played with --clock that ended (or was paused): /clock stands still. The node's
    # timers used to run on sim time, so they stopped too: no diagnostics, and a thermal frame
    # waiting for a later visible one (or its timeout) was never fused.
    probe = Probe('sim_time_probe')
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'use_sim_time': True}) as proc:
        probe.wait_for_node(proc)
        stamp_ns = 100 * 10**9
        probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp_ns - 10**7, 'rgb'))
        probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp_ns, 'thermal'))
        assert probe.spin_until(lambda: probe.fused, 30), node_log(proc)
        values = fresh_diagnostics(probe, diagnostics)
    probe.destroy_node()
    assert values[Key.PAIRS_FUSED] == '1', values


def test_the_node_reports_while_its_model_loads(ros_context, tmp_path, monkeypatch):
    # Nothing came on /diagnostics while the model loaded (15-30 s on a cold numba kernel
    # cache): a diagnostic_aggregator showed the node STALE, or not at all, through its start.
    from diagnostic_msgs.msg import DiagnosticStatus
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(tmp_path / 'numba'))  # cold: the kernels compile
    probe = Probe('start_up_probe')
    diagnostics = Diagnostics(probe)
    with running_node({'device': 'cpu', 'diagnostics.period': 0.5}) as proc:
        assert probe.spin_until(lambda: diagnostics.received or proc.poll() is not None,
                                120), node_log(proc)
        log_at_first_status = node_log(proc)
        probe.wait_for_node(proc, timeout=180)
        seen = diagnostics.received
        assert probe.spin_until(lambda: diagnostics.received > seen, 30), node_log(proc)
    probe.destroy_node()
    assert 'model warmed up' not in log_at_first_status, 'the model was ready: nothing tested'
    level, message = diagnostics.statuses[0]
    assert level == DiagnosticStatus.OK, diagnostics.statuses
    assert re.fullmatch(r'starting: loading the model \(\d+ s so far\)', message), message
    assert diagnostics.statuses[-1] == (DiagnosticStatus.WARN, 'waiting for both inputs')


def test_a_stall_after_a_period_longer_than_the_rate_window_counts_since_the_last_pair(
        ros_context):
    # With diagnostics.period over the fused rate's 5 s window, a pair fused just after a report
    # was no longer recent at the next: the stall then counted its causes "since the start" and
    # blamed frames dropped before that pair.
    probe = Probe('long_period_probe')
    diagnostics = Diagnostics(probe)
    with running_node({**PARAMS, 'diagnostics.period': 10.0}) as proc:
        probe.wait_for_node(proc)
        for _ in range(2):  # dropped before pairing, before the pair: stamps left unset
            probe.thermal_pub.publish(image_message(THERMAL, 'mono16', 0, 'thermal'))
            probe.spin_for(0.1)
        seen = diagnostics.received
        assert probe.spin_until(lambda: diagnostics.received > seen, 30), node_log(proc)
        fuse_pairs(probe, proc, probe.get_clock().now().nanoseconds, 1)
        end = time.monotonic() + 60  # the next report sees both inputs arrive, the one after
        while 'no pair was fused' not in diagnostics.message:  # stamps 0.3 s apart: unpaired
            assert time.monotonic() < end and proc.poll() is None, diagnostics.statuses
            stamp = probe.get_clock().now().nanoseconds
            probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp, 'thermal'))
            probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp + 300_000_000, 'rgb'))
            probe.spin_for(0.5)
    probe.destroy_node()
    assert 'since pairs were last fused: ' in diagnostics.message, diagnostics.message
    assert 'thermal unpaired: +' in diagnostics.message, diagnostics.message
    assert 'bad stamp' not in diagnostics.message, diagnostics.message


def _address_space(pid: int) -> int:
    with open(f'/proc/{pid}/status') as status:
        return 1024 * int(next(line for line in status if line.startswith('VmSize:')).split()[1])


def test_every_pair_failing_in_inference_reads_error_naming_the_failure(ros_context):
    # When every pair failed in the model (memory, here a real allocation failure), the status
    # read WARN as a stall, with the failures among its counts, instead of ERROR.
    from diagnostic_msgs.msg import DiagnosticStatus
    probe = Probe('failing_probe')
    diagnostics = Diagnostics(probe)
    # At full size the model needs hundreds of MB for this pair, which the limit below denies.
    big_thermal = np.random.default_rng(2).integers(20000, 30000, (960, 1280), dtype=np.uint16)
    big_visible = np.full((960, 1280, 3), 90, np.uint8)
    with running_node({**PARAMS, 'inference_size': [0, 0]}) as proc:
        probe.wait_for_node(proc)
        stamp = fuse_pairs(probe, proc, probe.get_clock().now().nanoseconds, 1)
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_AS)
        # 64 MB more address space than the node has: enough to take the big frames in.
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (_address_space(proc.pid) + (64 << 20),
                                                        hard))
        try:
            end = time.monotonic() + 60
            while diagnostics.statuses[-1][0] != DiagnosticStatus.ERROR:
                assert time.monotonic() < end and proc.poll() is None, (
                    diagnostics.statuses[-1], node_log(proc))
                probe.thermal_pub.publish(image_message(big_thermal, 'mono16', stamp, 'thermal'))
                probe.visible_pub.publish(image_message(big_visible, 'bgr8', stamp, 'rgb'))
                probe.spin_for(0.5)
                stamp += 100_000_000
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_AS, (soft, hard))
        message = diagnostics.message
        # The cameras stop too (a WARN after the ERROR), then come back: the spell ends on the
        # console with its worst level, whose errors were logged.
        end = time.monotonic() + 60
        while diagnostics.message != 'waiting for both inputs':
            assert time.monotonic() < end and proc.poll() is None, diagnostics.statuses[-1]
            probe.spin_for(0.2)
        fuse_pairs(probe, proc, stamp, 1)
        fresh_diagnostics(probe, diagnostics)
        log = wait_for_log(proc, 'back to OK: fusing after')
    probe.destroy_node()
    named = re.fullmatch(r'every pair fails: \d+ inference errors since pairs were last fused '
                         r'and none fused in the last 5 s; latest: (.+)', message)
    assert named, message
    # The error of the model (torch's) or of its pre- and post-processing (OpenCV's), as logged
    # (the sizes it tried to allocate vary).
    assert re.search(r"can't allocate memory|Insufficient memory", named[1]), message
    assert 'inference failed, pair dropped: ' + named[1].split('(')[0] in log, log
    assert diagnostics.statuses[-1][0] != DiagnosticStatus.ERROR, diagnostics.statuses[-1]
    assert re.search(r'back to OK: fusing after \d+ s at ERROR \(waiting for both inputs\)$',
                     log, re.MULTILINE), log
