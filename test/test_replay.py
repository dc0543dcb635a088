"""A bag replayed live (s4fusion-play -> s4fusion_node on sim time) fuses what s4fusion-bag does.

Same pairs (stamps) and same pixels within float tolerance: the node and the bag tool share the
pipeline, the parameter file and, with /clock, the synchronizer's notion of time.
"""

import pathlib
import re
import subprocess
import threading

import numpy as np
import pytest
import yaml
from sensor_msgs.msg import CameraInfo

from paths import executable
from ros_harness import Probe, node_log, received_stamps, running_node
from s4fusion_ros import settings
from s4fusion_ros.cli import interrupt
from s4fusion_ros.engine import pipeline_from_params
from s4fusion_ros.messages import stamp_to_ns
from s4fusion_ros.tools import bag as bag_tool
from s4fusion_ros.video import bag_pairs
from support import (SIZE, THERMAL_TOPIC, TYPESTORE, VISIBLE_TOPIC, camera_messages, most_frames,
                     read_bag, with_thermal_stall, write_bag)

pytestmark = pytest.mark.ros

PLAYER = executable('s4fusion-play')
NODE_PARAMS = {
    'device': 'cpu',
    'inference_size': [96, 72],
    'sync.slop': 0.02,
    # Fuse every pair and lose no input while the model runs, so all can be compared offline.
    'inference.queue_size': 100,
    'qos.input.depth': 100,
    'use_sim_time': True,
}


def offline_outputs(source: pathlib.Path, tmp_path: pathlib.Path,
                    window: tuple = ()) -> dict[int, tuple]:
    """{stamp: (fused, saliency, camera_info message)} from s4fusion-bag with the node's
    parameters (and the `window` options)."""
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': settings.nest(NODE_PARAMS)}}))
    output = tmp_path / 'offline'
    assert bag_tool.main([str(source), str(output), '--params', str(params),
                          *window]) == 0
    messages = read_bag(output)
    by_stamp = {}
    for topic in ('/s4fusion_node/fused', '/s4fusion_node/saliency',
                  '/s4fusion_node/camera_info'):
        for _, msgtype, raw in messages[topic]:
            message = TYPESTORE.deserialize_cdr(raw, msgtype)
            by_stamp.setdefault(stamp_to_ns(message.header.stamp), []).append(message)
    return by_stamp


# A window of the bag (ros2 bag play's options), 0.55 s to 1.45 s: both tools read only what the
# bag logged in it, the frames at its edges whose partners lie outside left unpaired alike.
WINDOW = ('--start-offset', '0.55', '--playback-duration', '0.9')


@pytest.mark.parametrize('stall, window', [(False, ()), (True, ()), (False, WINDOW)],
                         ids=['on time', 'thermal stall', 'window'])
def test_live_replay_matches_the_offline_tool(ros_context, ivif_dir, tmp_path, stall, window):
    events = camera_messages(ivif_dir, duration=2.0)
    if stall:
        events = with_thermal_stall(events)
    # In the window, a driver that published its calibration once, before it: the player
    # publishes it first, and it is in effect from the window's start, as s4fusion-bag takes it.
    once = next(stamp for _, topic, stamp, *_ in events if topic == VISIBLE_TOPIC)
    source = write_bag(tmp_path / 'recording', events, 'mcap',
                       visible_infos=(lambda stamp: stamp == once) if window else most_frames)
    start = events[0][0] + (round(float(window[1]) * 1e9) if window else 0)
    stop = start + round(float(window[3]) * 1e9) if window else events[-1][0] + 1
    counts = [sum(1 for event in events if event[1] == topic and start <= event[0] < stop)
              for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)]
    expected = offline_outputs(source, tmp_path, window)
    # The schedule's 18 thermal frames, all paired; with the stall 6 fewer (the pause), and the
    # 2 held ones unpaired; in the window 9 of them.
    assert (counts[0], len(expected)) == ((12, 10) if stall else (9, 9) if window else (18, 18))
    if not window:  # The demo's video rebuilds the pairs from the input bag: the same ones.
        pipeline = pipeline_from_params({**settings.defaults(), **NODE_PARAMS})
        assert sorted(pair.visible_stamp_ns for pair in bag_pairs(
            source, THERMAL_TOPIC, VISIBLE_TOPIC, pipeline)) == sorted(expected)

    ended = 'end of window' if window else 'end of bag'
    probe = Probe('replay_probe')
    infos = []
    probe.create_subscription(CameraInfo, 's4fusion_node/camera_info', infos.append, 50)
    with running_node(NODE_PARAMS) as node:
        probe.wait_for_node(node)
        player = subprocess.Popen(
            [str(PLAYER), str(source), '--clock', '--keep-alive', *window,
             '--remap', f'{THERMAL_TOPIC}:=/thermal/image_raw',
             '--remap', f'{VISIBLE_TOPIC}:=/visible/image_raw'],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        player_lines = []
        reader = threading.Thread(target=lambda: player_lines.extend(player.stdout), daemon=True)
        reader.start()
        try:
            # To the bag's end (its last pairs can come before it), and the pairs still in the
            # node's queue (a loaded machine fuses slower than the bag plays): nothing more may
            # come.
            played = probe.spin_until(
                lambda: any(line.rstrip().endswith(ended) for line in player_lines),
                timeout=90)
            # The node publishes a pair's saliency map and info after its fused image.
            probe.spin_until(lambda: min(map(len, (probe.fused, probe.saliency, infos)))
                             >= len(expected), timeout=30)
            probe.spin_for(0.5)
        finally:
            interrupt(player, timeout=15)  # killed if deaf to it: kept alive, it plays on
            reader.join(timeout=15)
        player_log = ''.join(player_lines)
        assert played, f'{len(probe.fused)}/{len(expected)} fused\n{player_log}\n{node_log(node)}'
    assert player.returncode == 0, player_log
    summary = next(line for line in player_lines if line.rstrip().endswith(ended))
    assert f'/thermal/image_raw {counts[0]}' in summary
    assert f'/visible/image_raw {counts[1]}' in summary
    # The visible camera_info went along with its remapped image topic.
    assert re.search(r'/visible/camera_info \d+', summary), summary

    assert sorted(received_stamps(probe.fused)) == sorted(expected)
    assert sorted(received_stamps(probe.saliency)) == sorted(expected)
    width, height = SIZE
    live_saliency = {stamp_to_ns(m.header.stamp): m for m in probe.saliency}
    for live_fused in probe.fused:
        stamp = stamp_to_ns(live_fused.header.stamp)
        fused, saliency, _ = expected[stamp]
        assert live_fused.header.frame_id == fused.header.frame_id
        assert (live_fused.encoding, live_saliency[stamp].encoding) == ('bgr8', 'mono8')
        got = np.frombuffer(live_fused.data, np.uint8).reshape(height, width, 3)
        assert np.abs(got.astype(int) - fused.data.reshape(height, width, 3)).max() <= 2
        got = np.frombuffer(live_saliency[stamp].data, np.uint8).reshape(height, width)
        assert np.abs(got.astype(int) - saliency.data.reshape(height, width)).max() <= 3
    # The calibration beside the outputs: one per pair, the offline tool's (the player lets
    # discovery settle before it plays, so the node's best-effort info subscription loses none).
    assert sorted(received_stamps(infos)) == sorted(expected)
    for info in infos:
        assert list(info.k) == list(expected[stamp_to_ns(info.header.stamp)][2].k)
    probe.destroy_node()
