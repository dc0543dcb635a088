"""The README's main job: s4fusion-demo plays the shipped sample bag through the live node."""

import contextlib
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import time

import cv2
import pytest
import yaml
from rosbags.interfaces import QosReliability

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from paths import executable  # noqa: E402
from support import exited, reading, wait_while_running  # noqa: E402
from s4fusion_ros.bagio import open_bag  # noqa: E402

pytestmark = pytest.mark.ros
DEMO = executable('s4fusion-demo')


def test_demo_records_fused_and_saliency_from_the_sample_bag(tmp_path):
    out = tmp_path / 'demo'
    out.mkdir()
    (out / 'preview_7.png').write_bytes(b'an earlier run made more previews')
    done = subprocess.run([str(DEMO), '--output-dir', str(out), '--timeout', '240'],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / 'summary.txt').read_text()
    fused, paired, dropped = (int(n) for n in re.match(
        r'(\d+) pairs fused of (\d+) paired \((\d+) dropped', summary).groups())
    # The demo waits until the node decided every pair: each was fused or dropped, none lost.
    assert 'stopped at the timeout' not in summary, summary
    assert fused > 0 and fused + dropped == paired, summary
    with open_bag(out / 'fused_bag') as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts == {'/s4fusion_node/fused': fused, '/s4fusion_node/saliency': fused}
    # Spread over the bag, as many as it fused up to 4; none left over from the earlier run.
    assert sorted(path.name for path in out.glob('preview_*.png')) == [
        f'preview_{index}.png' for index in range(min(4, fused))]
    video = cv2.VideoCapture(str(out / 'demo.mp4'))  # one frame per fused pair, four panels
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == fused and video.read()[0]
    assert 'playback rate' in summary and 'dropped while inference was busy' in summary
    assert 'Traceback' not in done.stderr


def in_session(session: int) -> list[int]:
    """The processes of a session (a process started with start_new_session leads its own)."""
    found = []
    for entry in pathlib.Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    found.append(int(entry.name))
            except ProcessLookupError:
                pass
    return found


def test_a_second_stop_signal_does_not_leave_the_node_running(tmp_path):
    # Ctrl-C, then SIGTERM (ros2 launch's, or an impatient user's) while the demo stops its node:
    # it still waits for it, so nothing it started runs on after it has exited.
    out = tmp_path / 'demo'
    demo = subprocess.Popen([str(DEMO), '--output-dir', str(out), '--timeout', '240'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    player_log = out / 'logs' / 'player.log'
    try:
        with reading(demo, demo.stderr) as said:
            wait_while_running(
                demo, lambda: 'playing' in (player_log.read_text() if player_log.exists() else ''),
                120, lambda: f'the demo did not play:\n{said.text()}')
            time.sleep(1.0)  # fusing
            demo.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 60
            while 'stopped' not in player_log.read_text() and demo.poll() is None:
                assert time.monotonic() < deadline, \
                    f'the player did not stop:\n{player_log.read_text()}\n{said.text()}'
                time.sleep(0.01)
            demo.send_signal(signal.SIGTERM)  # while it stops the node (a second or so)
            assert exited(demo, 60), f'the demo did not stop:\n{said.text()}'
            left_running = in_session(demo.pid)
    finally:
        # Its node and player too (its session), which a failed check would leave running.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
    error = said.text()
    assert demo.returncode == 130, error
    assert left_running == [], error
    assert error.strip().endswith('interrupted; no fused bag written'), error


def test_demo_records_a_best_effort_node(tmp_path):
    # The node's outputs best effort (qos.output.*): the demo still hears them, and its bag
    # records the QoS they were offered with.
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'device': 'cpu', 'inference_size': [160, 120],
        'qos': {'output': {'reliability': 'best_effort', 'depth': 10}}}}}))
    out = tmp_path / 'demo'
    done = subprocess.run([str(DEMO), '--output-dir', str(out), '--timeout', '240',
                           '--params', str(params)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with open_bag(out / 'fused_bag') as reader:
        connections = {c.topic: c for c in reader.connections}
    assert sorted(connections) == ['/s4fusion_node/fused', '/s4fusion_node/saliency']
    for connection in connections.values():
        assert connection.msgcount > 0
        (qos,) = connection.ext.offered_qos_profiles
        assert (qos.reliability, qos.depth) == (QosReliability.BEST_EFFORT, 10)


def test_the_fast_dds_profile_gives_way_to_the_user_s_configuration(monkeypatch, tmp_path):
    # Its profile, under the name the distro's Fast DDS reads, unless the user configured Fast
    # DDS (DEFAULT; a profile of their own) or shared memory is scarce.
    import os
    from s4fusion_ros.entry_points import FASTDDS_CHOICES, FASTDDS_SEGMENT_BYTES, fastdds_settings
    for name in FASTDDS_CHOICES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv('ROS_DISTRO', raising=False)  # the Kilted wheels set none
    [(name, profile)] = fastdds_settings(str(tmp_path)).items()
    assert name == 'FASTDDS_DEFAULT_PROFILES_FILE' and os.path.isfile(profile)
    assert f'<segment_size>{FASTDDS_SEGMENT_BYTES}</segment_size>' in open(profile).read()
    monkeypatch.setenv('ROS_DISTRO', 'jazzy')  # Fast DDS 2
    assert fastdds_settings(str(tmp_path)) == {'FASTRTPS_DEFAULT_PROFILES_FILE': profile}
    monkeypatch.setenv('ROS_DISTRO', 'kilted')
    for name, value in (('FASTDDS_BUILTIN_TRANSPORTS', 'DEFAULT'),
                        ('FASTDDS_DEFAULT_PROFILES_FILE', '/etc/robot/fastdds.xml'),
                        ('FASTRTPS_DEFAULT_PROFILES_FILE', '/etc/robot/fastrtps.xml')):
        monkeypatch.setenv(name, value)
        assert fastdds_settings(str(tmp_path)) == {}
        monkeypatch.delenv(name)
    assert fastdds_settings(str(tmp_path / 'no_shared_memory')) == {}


def test_the_demo_plays_a_bag_too_fast_for_the_model_at_its_slowest_rate():
    # A thermal camera far faster than the model: the rate would round to 0 and never play.
    from s4fusion_ros import settings
    from s4fusion_ros.bagio import image_topics, pick_topics
    from s4fusion_ros.ros.demo import MIN_RATE, sample_bag, sustainable_rate
    bag = sample_bag()
    with open_bag(bag) as reader:
        thermal, visible = pick_topics(image_topics(reader, bag), bag)
    values = {**settings.defaults(), 'device': 'cpu'}
    # The sample's thermal frames 1 us apart: the model takes thousands of periods a pair.
    rate, model_s = sustainable_rate(bag, thermal, visible, values, period=1e-6)
    assert rate == MIN_RATE and model_s > 1000 * 1e-6
    # A camera far slower than the model: played as recorded, never faster.
    rate, model_s = sustainable_rate(bag, thermal, visible, values, period=1000.0)
    assert rate == 1.0 and model_s < 1000.0


def test_the_thermal_period_counts_the_intervals_between_frames():
    from s4fusion_ros.ros.demo import thermal_period
    assert thermal_period(2.0, 21) == 0.1
    assert thermal_period(0.0, 1) == 0.0  # one frame: no interval, no division by 0


@pytest.mark.parametrize('rate', ['1e7', '1e-7', 'inf', '0'])
def test_the_demo_refuses_a_rate_its_player_would_refuse(rate, capsys):
    from s4fusion_ros.ros.demo import parse_args
    with pytest.raises(SystemExit):
        parse_args(['--rate', rate])
    assert '--rate must be from 1e-06 to 1e+06' in capsys.readouterr().err


def test_the_demo_takes_a_rate_and_a_domain_at_their_limits():
    from s4fusion_ros.ros.demo import parse_args
    for rate, domain in (('1e-6', '0'), ('1e6', '232')):
        args = parse_args(['--rate', rate, '--domain-id', domain])
        assert (args.rate, args.domain_id) == (float(rate), int(domain))


@pytest.mark.parametrize('domain', ['-1', '233'])
def test_the_demo_refuses_a_domain_dds_would_not_keep_apart(domain, capsys):
    # -1 ran the demo in domain 0, among real cameras; above 232 Fast DDS ended the demo at its
    # first node (exit code 1) with a line of its own and none of the demo's.
    from s4fusion_ros.ros.demo import parse_args
    with pytest.raises(SystemExit):
        parse_args(['--domain-id', domain])
    assert '--domain-id must be from 0 to 232' in capsys.readouterr().err


def test_the_demo_refuses_qos_overrides_of_the_outputs_it_records(tmp_path):
    # Its recorder subscribes with qos.output.*: an override would leave it hearing nothing.
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {'qos_overrides': {
        '/s4fusion_node/fused': {'publisher': {'reliability': 'best_effort'}}}}}}))
    done = subprocess.run([str(DEMO), '--output-dir', str(tmp_path / 'demo'), '--params',
                           str(params)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert ('the offline tools write the outputs with the QoS of qos.output.*; set those instead '
            'of qos_overrides./s4fusion_node/fused.publisher.reliability') in done.stderr
    assert 'Traceback' not in done.stderr
    assert not (tmp_path / 'demo').exists()  # a run refused before playing makes no folder


def test_an_output_dir_that_cannot_be_made_is_named_before_the_bag_is_read(tmp_path):
    # It was "[Errno 20] Not a directory: '.../logs'", after the bag had been read.
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    done = subprocess.run([str(DEMO), '--output-dir', str(a_file / 'demo')], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert f'{a_file / "demo"}: {a_file} is not a folder' in done.stderr, done.stderr


def test_the_demo_never_replaces_its_own_input_bag(tmp_path):
    # --bag OUT/fused_bag: the fused bag it writes would replace the recording (the demo then
    # crashed on a bag without its topics, the recording gone).
    from s4fusion_ros.ros.demo import sample_bag
    out = tmp_path / 'demo'
    shutil.copytree(sample_bag(), out / 'fused_bag')
    before = {path: path.read_bytes() for path in (out / 'fused_bag').rglob('*')
              if path.is_file()}
    # The bag is the fused bag, or the fused bag would go inside it.
    for bag, output_dir in ((out / 'fused_bag', out), (out / 'fused_bag', out / 'fused_bag')):
        done = subprocess.run([str(DEMO), '--bag', str(bag), '--output-dir', str(output_dir)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert 'cannot be the input bag, hold it or lie inside it' in done.stderr
        assert 'Traceback' not in done.stderr
    assert {path: path.read_bytes() for path in (out / 'fused_bag').rglob('*')
            if path.is_file()} == before


def test_the_demo_exits_non_zero_when_the_bag_is_not_fused_to_its_end(tmp_path):
    # Stopped at --timeout, it would hold only part of the bag: it fails, says so, writes
    # nothing and leaves an earlier run's outputs as they were.
    from s4fusion_ros.bagio import add_topic, create_bag
    out = tmp_path / 'demo'
    out.mkdir()
    with create_bag(out / 'fused_bag', 'mcap') as writer:
        add_topic(writer, '/earlier')
    earlier = {name: f'an earlier {name}'.encode() for name in
               ('summary.txt', 'demo.mp4', 'preview_0.png')}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    (out / 'logs' / 'ros').mkdir(parents=True)
    (out / 'logs' / 'ros' / 'earlier.log').write_text('an earlier run\'s')  # they piled up
    done = subprocess.run([str(DEMO), '--output-dir', str(out), '--timeout', '1'],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f'the outputs of an earlier run in {out} are replaced once this run has fused the '
            'whole bag') in done.stderr  # it replaced them without a word
    assert not (out / 'logs' / 'ros' / 'earlier.log').exists()
    assert (f'the bag was not fused to its end within --timeout 1 s; nothing was written in '
            f'{out} (the outputs of an earlier run there stay)') in done.stderr
    assert 'stopped at the timeout' in done.stderr and 'nan' not in done.stderr
    assert all((out / name).read_bytes() == data for name, data in earlier.items())
    with open_bag(out / 'fused_bag') as reader:
        assert [connection.topic for connection in reader.connections] == ['/earlier']


def _limit_file_size() -> None:
    # A real write failure: files may not grow past 1 MiB (EFBIG, as ENOSPC on a full disk);
    # the fused bag's first chunk is larger.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_full_disk_while_recording_names_the_bag_and_keeps_the_earlier_outputs(tmp_path):
    # rosbags' write error reached the user as '[Errno 27] File too large' alone: no file named,
    # nor what became of the outputs.
    from s4fusion_ros.bagio import add_topic, create_bag
    out = tmp_path / 'demo'
    out.mkdir()
    with create_bag(out / 'fused_bag', 'mcap') as writer:
        add_topic(writer, '/earlier')
    (out / 'summary.txt').write_text('an earlier summary')
    done = subprocess.run([str(DEMO), '--output-dir', str(out), '--rate', '1'],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f'recording {out / "fused_bag"} failed: [Errno 27] File too large; nothing was '
            f'written in {out} (the outputs of an earlier run there stay)') in done.stderr
    assert 'Traceback' not in done.stderr
    assert (out / 'summary.txt').read_text() == 'an earlier summary'
    assert sorted(path.name for path in out.iterdir()) == ['fused_bag', 'logs', 'summary.txt']
    with open_bag(out / 'fused_bag') as reader:
        assert [connection.topic for connection in reader.connections] == ['/earlier']


def test_the_demo_domain_is_never_the_callers(monkeypatch):
    # Derived from the pid alone, it was the caller's own domain once in 40 runs.
    import os
    from s4fusion_ros.ros.demo import demo_domain
    monkeypatch.setenv('ROS_DOMAIN_ID', str(60 + os.getpid() % 40))
    domain = demo_domain()
    assert 60 <= domain <= 99 and str(domain) != os.environ['ROS_DOMAIN_ID']


def test_reading_topics_a_bag_does_not_hold_gives_no_message():
    # rosbags reads an empty connection filter as none at all.
    from s4fusion_ros.bagio import read_messages
    from s4fusion_ros.ros.demo import sample_bag
    with open_bag(sample_bag()) as reader:
        assert list(read_messages(reader, sample_bag(), ['/absent'])) == []
        assert list(read_messages(reader, sample_bag(), ['/thermal/image_raw']))


def test_the_summary_names_frames_dropped_before_pairing():
    # Late, overflowed, badly stamped and undecodable frames never reach a pair: the summary
    # names each per input, and leaves out what is 0 or not reported (message_filters).
    from s4fusion_ros.diagnostics import NOT_REPORTED
    from s4fusion_ros.ros.demo import summary_line
    status = {'pairs': '10', 'pairs fused': '9', 'pairs dropped (inference busy)': '0',
              'thermal received': '14', 'visible received': '12', 'thermal unpaired': '0',
              'visible unpaired': '1', 'thermal late': '2', 'visible late': '0',
              'thermal overflow': '0', 'visible overflow': '0',
              'thermal rejected (bad stamp)': '1', 'visible rejected (bad stamp)': NOT_REPORTED,
              'thermal rejected (bad message)': '0', 'visible rejected (bad message)': '3'}
    line = summary_line(status, 9, 5.0, True, 1.0, 0.1)
    assert ('(unpaired: 0 thermal, 1 visible); frames dropped before pairing: 2 thermal late, '
            '1 thermal bad stamp, 3 visible bad message; end-to-end latency') in line
    clean = {**status, 'thermal late': '0', 'thermal rejected (bad stamp)': '0',
             'visible rejected (bad message)': '0'}
    assert 'visible); end-to-end latency' in summary_line(clean, 9, 5.0, True, 1.0, 0.1)
    # Before the node's first diagnostics nothing is known: n/a, not nan.
    line = summary_line({}, 0, 1.0, False, 1.0, 0.1)
    assert line.startswith('0 pairs fused of n/a paired (n/a dropped while inference was busy: '
                           'inference took n/a mean') and 'nan' not in line


def test_the_summary_gives_the_node_s_frame_period_at_the_playback_rate():
    # Half speed: a thermal frame every 200 ms of wall time for a 100 ms camera; nothing dropped,
    # so no word of why pairs are dropped.
    from s4fusion_ros.ros.demo import summary_line
    status = {'pairs': '10', 'pairs fused': '10', 'pairs dropped (inference busy)': '0',
              'inference latency mean (s)': '0.05'}
    line = summary_line(status, 10, 5.0, True, 0.5, 0.1)
    assert 'inference took 50 ms mean against a thermal frame every 200 ms at playback rate 0.5' \
        in line
    assert 'drops' not in line


def test_an_undecodable_message_in_the_bag_does_not_hold_the_demo_to_its_timeout(tmp_path):
    # The first 2 s of the sample bag with one thermal message cut short: the player skips it,
    # so the node can never receive it; the demo must finish, not wait for it until --timeout.
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer
    from s4fusion_ros.bagio import typestore
    from s4fusion_ros.ros.demo import sample_bag
    bag = tmp_path / 'cut'
    with Reader(sample_bag()) as reader, Writer(bag, version=9,
                                                storage_plugin=StoragePlugin.MCAP) as writer:
        copies = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=typestore())
                  for c in reader.connections}
        thermal = 0
        for connection, log_time, raw in reader.messages():
            if log_time - reader.start_time > 2 * 10**9:
                break
            if connection.topic == '/thermal/image_raw':
                thermal += 1
                raw = raw[:40] if thermal == 3 else raw
            writer.write(copies[connection.id], log_time, raw)
    out = tmp_path / 'demo'
    done = subprocess.run([str(DEMO), '--bag', str(bag), '--output-dir', str(out), '--timeout',
                           '150'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'1 undecodable message(s) in {bag} not played' in done.stderr
    summary = (out / 'summary.txt').read_text()
    assert re.match(rf'\d+ pairs fused of \d+ paired .* from {thermal - 1} thermal \+', summary)


def test_the_demo_is_done_at_the_end_of_its_cameras_not_of_the_bag(monkeypatch, tmp_path):
    # A status topic recorded a minute past the cameras: the demo waited for the player's
    # /clock to reach the bag's end, so it stopped at --timeout with every pair long fused.
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer
    from s4fusion_ros.bagio import typestore
    from s4fusion_ros.ros import demo
    bag, string = tmp_path / 'status', 'std_msgs/msg/String'
    with Reader(demo.sample_bag()) as reader, Writer(bag, version=9,
                                                     storage_plugin=StoragePlugin.MCAP) as writer:
        copies = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=typestore())
                  for c in reader.connections}
        cameras_end = 0
        for connection, log_time, raw in reader.messages():
            if log_time - reader.start_time > 10**9:
                break
            writer.write(copies[connection.id], log_time, raw)
            cameras_end = log_time
        status = writer.add_connection('/status', string, typestore=typestore())
        writer.write(status, cameras_end + 60 * 10**9, typestore().serialize_cdr(
            typestore().types[string](data='ok'), string))
    waited_for = []

    def record(fused_bag, values, node_command, play, expected, done_after, *_):
        waited_for.append(done_after)
        raise demo.BagError('not started')

    monkeypatch.setattr(demo, 'record', record)
    monkeypatch.setattr(demo, 'isolate_dds', lambda *_: None)  # this process's DDS settings
    args = demo.parse_args(['--bag', str(bag), '--output-dir', str(tmp_path / 'demo'),
                            '--rate', '1'])
    with pytest.raises(demo.BagError, match='not started'):
        demo.run(args)
    values = demo.settings.defaults()
    assert waited_for == [cameras_end + round(
        (values['sync.timeout'] + values['sync.slop'] + 1) * 1e9)]


def test_outputs_recorded_before_the_first_clock_message_are_logged_at_their_stamps(tmp_path):
    # The demo's recorder runs on the player's /clock, which reached it after the first outputs
    # in about one run in two: those were logged at 0, a fused bag 55 years long to play.
    import numpy as np
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.serialization import serialize_message
    from s4fusion_ros.bagio import IMAGE, create_bag, read_messages
    from s4fusion_ros.ros.images import image_message
    from s4fusion_ros.ros.parameters import qos_profile
    from s4fusion_ros.ros.recorder import TopicRecorder
    stamp_ns = 1_735_000_000 * 10**9 + 5
    context = rclpy.Context()
    rclpy.init(args=[], context=context)
    try:
        node = rclpy.create_node('recorder_test', context=context, parameter_overrides=[
            Parameter('use_sim_time', value=True)])  # no /clock: its time is 0
        with create_bag(tmp_path / 'bag') as writer:
            recorder = TopicRecorder(node, writer, {'/fused': IMAGE}, qos_profile('reliable', 5))
            message = image_message(np.zeros((2, 2), np.uint8), 'mono8', stamp_ns, 'camera')
            recorder._write('/fused', writer.connections[0], serialize_message(message))
        node.destroy_node()
    finally:
        context.try_shutdown()
    with open_bag(tmp_path / 'bag') as reader:
        assert [log_time for _, log_time, _ in read_messages(reader, tmp_path / 'bag',
                                                             ['/fused'])] == [stamp_ns]


def test_the_recorder_writes_each_topic_as_received_at_its_arrival_with_its_offered_qos(
        ros_context, tmp_path):
    # Two topics of two types on one best-effort recorder, one more on a second with the default
    # offer: each message in its own topic's connection, as it was sent, logged when it
    # arrived (the wall clock here, not its stamp decades back).
    import numpy as np
    import rclpy
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CameraInfo
    from s4fusion_ros.bagio import IMAGE, create_bag, output_qos, read_messages
    from s4fusion_ros.camera_info import CAMERA_INFO
    from s4fusion_ros.ros.images import image_message, set_header
    from s4fusion_ros.ros.parameters import qos_profile
    from s4fusion_ros.ros.recorder import TopicRecorder
    from s4fusion_ros.ros.spin import spin_until
    topics = {'/recorded/image': IMAGE, '/recorded/camera_info': CAMERA_INFO}
    info = CameraInfo(width=3, height=2)
    set_header(info, 5, 'rgb')
    sent = {'/recorded/image': [image_message(np.full((2, 3), level, np.uint8), 'mono8', 7, 'rgb')
                                for level in (1, 2)],
            '/recorded/camera_info': [info], '/recorded/reliable': [info]}
    node = rclpy.create_node('recorder_test')
    try:
        best_effort = qos_profile('best_effort', 10)
        publishers = {topic: node.create_publisher(type(messages[0]), topic, best_effort)
                      for topic, messages in sent.items()}
        with create_bag(tmp_path / 'bag') as writer:
            recorder = TopicRecorder(node, writer, topics, best_effort,
                                     output_qos('best_effort', 10))
            reliable = TopicRecorder(node, writer, {'/recorded/reliable': CAMERA_INFO},
                                     qos_profile('reliable', 10))
            before_ns = time.time_ns()
            for topic, messages in sent.items():
                for message in messages:
                    publishers[topic].publish(message)
            assert spin_until(node, lambda: recorder.counts == {
                '/recorded/image': 2, '/recorded/camera_info': 1}, 10), recorder.counts
            spin_until(node, lambda: False, 0.3)  # a reliable reader hears no best-effort writer
            after_ns = time.time_ns()
            assert reliable.counts == {'/recorded/reliable': 0}
    finally:
        node.destroy_node()
    with open_bag(tmp_path / 'bag') as reader:
        connections = {c.topic: c for c in reader.connections}
        assert {topic: c.msgtype for topic, c in connections.items()} == {
            **topics, '/recorded/reliable': CAMERA_INFO}
        assert {topic: c.ext.offered_qos_profiles[0].reliability
                for topic, c in connections.items()} == {
            '/recorded/image': QosReliability.BEST_EFFORT,
            '/recorded/camera_info': QosReliability.BEST_EFFORT,
            '/recorded/reliable': QosReliability.RELIABLE}
        recorded = {}
        for connection, log_time, data in read_messages(reader, tmp_path / 'bag', topics):
            assert before_ns <= log_time <= after_ns
            recorded.setdefault(connection.topic, []).append(bytes(data))
    # Compared as messages: the publisher's serializer leaves CDR's alignment padding as it
    # found it (one byte after an Image's encoding read 'q' once), so the bytes are the
    # middleware's and not re-serialized ones, but not one fixed string.
    assert {topic: [deserialize_message(data, type(sent[topic][0])) for data in recorded[topic]]
            for topic in recorded} == {topic: sent[topic] for topic in topics}


def report_to(monitor, stamp_ns: int, values: dict) -> None:
    """Hand the demo's monitor the node's diagnostics `values`, as the node publishes them."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from s4fusion_ros import settings
    from s4fusion_ros.diagnostics import status_name
    array = DiagnosticArray(status=[DiagnosticStatus(
        name=status_name(f'/{settings.NODE_NAME}'), values=[
            KeyValue(key=str(key), value=str(value)) for key, value in values.items()])])
    array.header.stamp.sec, array.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    monitor._on_diagnostics(array)


def test_the_demo_stops_waiting_for_frames_the_middleware_lost(ros_context):
    # A node behind its inputs loses frames on the way (a publisher's KEEP_LAST history
    # overwrites what its reader has not taken): the demo waited for them until its timeout
    # (240 s in CI) and wrote nothing.
    from types import SimpleNamespace
    from s4fusion_ros import settings
    from s4fusion_ros.diagnostics import Key, per_input
    from s4fusion_ros.ros.demo import ARRIVALS_SETTLE_S, Arrivals, Monitor, drained
    monitor = Monitor()

    def report(stamp_ns: int, visible: int) -> None:
        report_to(monitor, stamp_ns, {
            per_input('thermal', 'received'): 54, per_input('visible', 'received'): visible,
            Key.THERMAL_BAD_MESSAGE: 0, Key.VISIBLE_BAD_MESSAGE: 0,
            Key.PAIRS: 53, Key.PAIRS_FUSED: 44, Key.PAIRS_DROPPED: 9,
            Key.INFERENCE_ERRORS: 0, Key.PUBLISH_ERRORS: 0})

    recorder = SimpleNamespace(counts={settings.OUTPUT_TOPICS[1]: 44})
    expected, end = {'thermal': 54, 'visible': 180}, 5 * 10**9
    arrivals = Arrivals()
    report(end, 175)
    assert monitor.status, 'the report was not taken for the node\'s'
    assert not drained(monitor, recorder, expected, end, arrivals)  # more may come yet
    arrivals.since -= ARRIVALS_SETTLE_S  # as if nothing had come for that long
    assert drained(monitor, recorder, expected, end, arrivals)
    report(end, 176)  # one more came: wait again
    assert not drained(monitor, recorder, expected, end, arrivals)
    arrivals.since -= ARRIVALS_SETTLE_S
    report(end - 1, 176)  # the bag not played to its end: its frames are still to come
    assert not drained(monitor, recorder, expected, end, arrivals)
    report(end, 180)  # all of them: no wait
    assert drained(monitor, recorder, expected, end, Arrivals())
    monitor.destroy_node()


def test_the_demo_is_drained_once_every_frame_came_and_every_pair_was_decided(ros_context):
    # Frames the node could not decode came all the same, and a pair it failed to publish was
    # decided; but until the clock passes the last frames' sync timeout, pairs may yet be made.
    from types import SimpleNamespace
    from s4fusion_ros import settings
    from s4fusion_ros.diagnostics import Key
    from s4fusion_ros.ros.demo import Arrivals, Monitor, drained
    monitor = Monitor()
    values = {Key.THERMAL_RECEIVED: 50, Key.THERMAL_BAD_MESSAGE: 4,
              Key.VISIBLE_RECEIVED: 180, Key.VISIBLE_BAD_MESSAGE: 0,
              Key.PAIRS: 50, Key.PAIRS_FUSED: 40, Key.PAIRS_DROPPED: 9,
              Key.INFERENCE_ERRORS: 0, Key.PUBLISH_ERRORS: 1}
    recorder = SimpleNamespace(counts={settings.OUTPUT_TOPICS[1]: 40})
    expected, end = {'thermal': 54, 'visible': 180}, 5 * 10**9
    report_to(monitor, end - 1, values)
    assert not drained(monitor, recorder, expected, end, Arrivals())
    report_to(monitor, end, values)
    assert drained(monitor, recorder, expected, end, Arrivals())
    monitor.destroy_node()
