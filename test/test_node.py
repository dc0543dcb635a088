"""The node as its own process over Fast DDS: pairing, outputs, pixels, parameters, diagnostics."""

import random

import numpy as np
import pytest

from ros_harness import (Probe, image_message, load_pairs, node_log, received_stamps,
                         running_node)
from support import camera_schedule
from s4fusion_ros import settings
from s4fusion_ros.engine import FusionEngine, fusion_settings, pipeline_from_params
from s4fusion_ros.messages import stamp_to_ns
from s4fusion_ros.runtime import model_from_params

pytestmark = pytest.mark.ros

SCENES = ['00004N.png', '00008N.png', '00012N.png', '00537D.png']
NODE_PARAMS = {
    'device': 'cpu',
    'inference_size': [160, 120],
    'inference.queue_size': 100,  # fuse every pair, to check each against the offline path
    # Keep every input: with the default depth of 5 a node slowed by load drops frames before
    # pairing, and its pairs then differ from the offline path's.
    'qos.input.depth': 100,
    'sync.slop': 0.02,
    # On a busy machine a large image can reach the node seconds late; a long timeout keeps such a
    # thermal frame waiting for its partner, so the pairs do not depend on the machine's load.
    'sync.timeout': 5.0,
    # Stateless, so the warm-up frames (some may be lost during discovery) cannot change the pixels
    # of what follows; test_replay checks the smoothed percentile mode live against offline.
    'normalization.mode': 'minmax',
    # Not the default, so the comparison shows the node applies it (other tests run the default).
    'model.detail_gain': 1.0,
}


def warm_up(probe, thermal, visible, start_ns):
    """Publish pairs until the node answers: DDS may drop the first messages after discovery."""
    stamp = start_ns
    while not probe.fused:
        probe.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'warmup'))
        probe.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'warmup'))
        probe.spin_for(0.5)
        stamp += 10_000_000
        assert stamp - start_ns < 60 * 10_000_000, 'the node never answered the warm-up pairs'


def offline_results(messages, params):
    """The expected outputs: the same messages through the ROS-free pipeline, in publish order,
    built from the parameters by the factories the node uses."""
    values = {**settings.defaults(), **params}
    pipeline = pipeline_from_params(values)
    engine = FusionEngine(model_from_params(values), fusion_settings(values))
    prepared = []
    for role, msg in messages:
        add = pipeline.add_thermal if role == 'thermal' else pipeline.add_visible
        prepared += add(msg, stamp_to_ns(msg.header.stamp), msg.header.frame_id)
    prepared += pipeline.flush()
    return {pair.visible_stamp_ns: (pair, engine.infer(pair)) for pair in prepared}


def test_node_fuses_jittered_thermal_and_rgb_streams(ros_context, ivif_dir, tmp_path):
    pairs = load_pairs(ivif_dir, SCENES)
    probe = Probe('pairing_probe')
    with running_node(NODE_PARAMS) as proc:
        probe.wait_for_node(proc)
        start_ns = probe.get_clock().now().nanoseconds
        warm_up(probe, *pairs[0], start_ns)
        start_ns += 10**9  # past the warm-up stamps by more than slop: no pair spans the two
        published = []
        for offset, role, scene in camera_schedule(2.0, len(SCENES), random.Random(1)):
            thermal, visible = pairs[scene]
            stamp = start_ns + int(offset * 1e9)
            if role == 'thermal':
                msg = image_message(thermal, 'mono16', stamp, 'thermal_optical_frame')
                probe.thermal_pub.publish(msg)
            else:
                msg = image_message(visible, 'bgr8', stamp, 'rgb_optical_frame')
                probe.visible_pub.publish(msg)
            published.append((role, msg))
            probe.spin_for(0.01)
        expected = offline_results(published, NODE_PARAMS)
        assert len(expected) >= 15, 'about 9 Hz x 2 s of thermal frames should pair'

        def measured(messages):  # warm-up outputs may still arrive: they carry another frame_id
            return [m for m in messages if m.header.frame_id != 'warmup']
        got_all = probe.spin_until(
            lambda: len(measured(probe.fused)) >= len(expected)
            and len(measured(probe.saliency)) >= len(expected), timeout=120)
        assert got_all, f'{len(measured(probe.fused))}/{len(expected)} fused\n{node_log(proc)}'

    fused_messages, saliency_messages = measured(probe.fused), measured(probe.saliency)
    assert sorted(received_stamps(fused_messages)) == sorted(expected)
    assert sorted(received_stamps(saliency_messages)) == sorted(expected)
    for fused, saliency in zip(fused_messages, saliency_messages):
        pair, result = expected[stamp_to_ns(fused.header.stamp)]
        assert fused.header.frame_id == saliency.header.frame_id == 'rgb_optical_frame'
        assert (fused.encoding, fused.width, fused.height) == ('bgr8', 640, 480)
        assert (saliency.encoding, saliency.width, saliency.height) == ('mono8', 640, 480)
        got = np.frombuffer(fused.data, np.uint8).reshape(480, 640, 3)
        # Same pair, same model, same code: equal up to float rounding in the model.
        assert np.abs(got.astype(int) - result.fused.astype(int)).max() <= 2
        got_saliency = np.frombuffer(saliency.data, np.uint8).reshape(480, 640)
        assert np.abs(got_saliency.astype(int) - result.saliency_image.astype(int)).max() <= 3
        # The thermal partner is the nearest within slop: scenes agree except at scene changes.
        assert abs(pair.thermal_stamp_ns - pair.visible_stamp_ns) <= 0.02e9
    probe.destroy_node()
