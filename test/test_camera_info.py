"""The visible camera's calibration beside the outputs: matched by stamp, on image_transport's
camera_info topic, following a remapped visible topic."""

import time

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from ros_harness import Probe, image_message, node_log, received_stamps, running_node  # noqa: E402
from s4fusion_ros.messages import stamp_to_ns  # noqa: E402
from s4fusion_ros.camera_info import (CameraInfoCache, calibration_fault,  # noqa: E402
                                      camera_info_topic)
from s4fusion_ros.ros.images import set_stamp  # noqa: E402

THERMAL = np.random.default_rng(0).integers(20000, 30000, (120, 160), dtype=np.uint16)
VISIBLE = np.full((120, 160, 3), 90, np.uint8)


def camera_info(stamp_ns: int, focal: float, frame_id: str = 'rgb_optical') -> CameraInfo:
    info = CameraInfo(width=160, height=120, distortion_model='plumb_bob',
                      k=[focal, 0.0, 80.0, 0.0, focal, 60.0, 0.0, 0.0, 1.0])
    info.header.frame_id = frame_id
    set_stamp(info, stamp_ns)
    return info


def test_the_camera_info_topic_is_the_image_topics_sibling():
    assert camera_info_topic('/camera/color/image_raw') == '/camera/color/camera_info'
    assert camera_info_topic('/robot1/visible/image_raw') == '/robot1/visible/camera_info'
    assert camera_info_topic('/image') == '/camera_info'
    # A transport's topic (a CompressedImage) lies below its base topic, as image_transport has it.
    assert camera_info_topic('/camera/color/image_raw/compressed', transport=True) \
        == '/camera/color/camera_info'


def test_an_image_gets_the_info_of_its_stamp_or_else_the_latest():
    cache = CameraInfoCache(size=3)
    assert cache.for_image(5) is None
    for stamp, focal in ((10, 100.0), (20, 200.0), (30, 300.0), (40, 400.0)):
        cache.add(camera_info(stamp, focal))
    assert cache.for_image(20).k[0] == 200.0
    # 35 never came (a lost or separately timed info): the newest stamped before it, whatever
    # came after it; 10 left the cache, and none of the rest is older: the last to arrive.
    assert cache.for_image(35).k[0] == 300.0
    assert cache.for_image(10).k[0] == cache.for_image(50).k[0] == 400.0
    cache.add(camera_info(0, 1.0))  # a static publisher that leaves its stamp at 0
    assert cache.for_image(10).k[0] == 1.0
    assert cache.received == 5
    # An info sent again with a stamp it had is the last to arrive, not where it first came.
    cache = CameraInfoCache(size=3)
    for stamp, focal in ((30, 300.0), (40, 400.0), (30, 301.0)):
        cache.add(camera_info(stamp, focal))
    assert cache.for_image(10).k[0] == 301.0
    # Infos out of stamp order (a reordering link, a bag recorded from two sources): the one
    # stamped nearest before the image, not the last before it to arrive.
    cache = CameraInfoCache(size=3)
    for stamp, focal in ((20, 200.0), (40, 400.0), (10, 100.0)):
        cache.add(camera_info(stamp, focal))
    assert cache.for_image(30).k[0] == 200.0


@pytest.mark.ros
def test_an_info_that_does_not_describe_its_images_is_named():
    info = camera_info(0, 100.0)
    assert calibration_fault(info, 160, 120) == ''
    assert calibration_fault(info, 80, 60) == ('it describes 160x120 images, the visible images '
                                               'are 80x60')
    info.binning_x = info.binning_y = 2  # a binned camera's info keeps its sensor's size
    assert calibration_fault(info, 80, 60) == ''
    info.roi.width, info.roi.height = 100, 50
    assert calibration_fault(info, 80, 60) == ('it describes 50x25 images with its region of '
                                               'interest and binning, the visible images are '
                                               '80x60')
    info.roi.width = info.roi.height = 0
    info.binning_y = 1  # each side binned by its own factor
    assert calibration_fault(info, 80, 120) == ''
    info.width = 0  # half of a size is no uncalibrated camera's
    assert calibration_fault(info, 80, 120) == ('it describes 0x120 images, the visible images '
                                                'are 80x120')
    uncalibrated = CameraInfo()  # all zeros: sensor_msgs' uncalibrated camera
    assert calibration_fault(uncalibrated, 160, 120) == ''
    info = camera_info(0, float('nan'))
    assert calibration_fault(info, 160, 120) == 'its camera matrix K is not finite'
    info = camera_info(0, 100.0)
    info.k[2] = float('inf')  # any element of K, not only the focal length
    assert calibration_fault(info, 160, 120) == 'its camera matrix K is not finite'


def test_the_visible_calibration_is_republished_with_each_output(ros_context):
    # A remapped visible topic takes its camera_info sibling along, as image_transport's
    # CameraSubscriber does; the node's info is ~/camera_info, where rviz and image_proc look
    # for the info of ~/fused and ~/saliency.
    probe = Probe('camera_info_probe', namespace='/robot1')
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    visible_pub = probe.create_publisher(Image, '/front/image_raw', qos)
    info_pub = probe.create_publisher(CameraInfo, '/front/camera_info', qos)
    infos = []
    probe.create_subscription(CameraInfo, 's4fusion_node/camera_info', infos.append, qos)
    params = {'device': 'cpu', 'inference_size': [80, 60]}
    with running_node(params, namespace='/robot1',
                      extra_args=['-r', 'visible/image_raw:=/front/image_raw']) as proc:
        assert probe.spin_until(lambda: info_pub.get_subscription_count() > 0
                                and probe.thermal_pub.get_subscription_count() > 0
                                and visible_pub.get_subscription_count() > 0
                                or proc.poll() is not None, 60), node_log(proc)
        stamp = probe.get_clock().now().nanoseconds
        sent = {}  # stamp -> focal length of its info (every third pair has none)
        for index in range(40):
            if len(probe.fused) >= 8:
                break
            if index % 3 != 1:
                sent[stamp] = 100.0 + index
                info_pub.publish(camera_info(stamp, sent[stamp]))
                probe.spin_for(0.05)  # before its image, as a driver sends them
            probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp, 'thermal'))
            visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp, 'rgb_optical'))
            probe.spin_for(0.3)
            stamp += 100_000_000
        last = stamp - 100_000_000  # the last pair's fused image and (after it) its info
        probe.spin_until(lambda: last in received_stamps(probe.fused)
                         and last in received_stamps(infos), 30)
        log = node_log(proc)
    probe.destroy_node()
    assert len(probe.fused) >= 8, log
    assert '/front/camera_info -> /robot1/s4fusion_node/camera_info' in log, log
    # One info per fused pair from the first the node heard (a best-effort sample can be lost
    # just after discovery), stamped and framed as the pair.
    fused, got = received_stamps(probe.fused), received_stamps(infos)
    assert len(got) >= 4 and got == fused[len(fused) - len(got):], (fused, got, log)
    exact, had_one_stamped_before = 0, False
    for info in infos:
        stamp_ns = stamp_to_ns(info.header.stamp)
        assert info.header.frame_id == 'rgb_optical'
        assert (info.width, info.height, info.distortion_model) == (160, 120, 'plumb_bob')
        # Its own stamp's info, or else (none sent, or lost) one stamped before it; failing
        # that (the first ones lost, and the node a pair behind on a loaded machine) the last
        # to arrive, stamped after it: only until one stamped before a pair has arrived.
        if info.k[0] in [focal for sent_ns, focal in sent.items() if sent_ns <= stamp_ns]:
            had_one_stamped_before = True
        else:
            assert not had_one_stamped_before and info.k[0] in sent.values(), (info, sent)
        exact += info.k[0] == sent.get(stamp_ns)
    assert exact >= 2, infos


@pytest.mark.ros
def test_an_info_published_once_latched_is_heard_with_a_durability_override(ros_context):
    # A static publisher sends its info once, transient_local: a node started after it hears
    # it only where its subscription is transient_local too, which qos_overrides sets.
    probe = Probe('latched_info_probe')
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    info_pub = probe.create_publisher(CameraInfo, 'visible/camera_info', latched)
    info_pub.publish(camera_info(0, 321.0))  # stamp 0, as such publishers often leave it
    infos = []
    probe.create_subscription(CameraInfo, 's4fusion_node/camera_info', infos.append, 10)
    override = 'qos_overrides./visible/camera_info.subscription.'
    params = {'device': 'cpu', 'inference_size': [80, 60],
              override + 'durability': 'transient_local', override + 'reliability': 'reliable'}
    with running_node(params) as proc:
        probe.wait_for_node(proc)
        stamp = probe.get_clock().now().nanoseconds
        # Pairs until the probe has both outputs: under load its info subscription can match the
        # node's publisher after the first fused image came.
        deadline = time.monotonic() + 60
        while not (probe.fused and infos) and time.monotonic() < deadline:
            probe.thermal_pub.publish(image_message(THERMAL, 'mono16', stamp, 'thermal'))
            probe.visible_pub.publish(image_message(VISIBLE, 'bgr8', stamp, 'rgb_optical'))
            probe.spin_for(0.3)
            stamp += 100_000_000
            assert proc.poll() is None, node_log(proc)
        log = node_log(proc)
    probe.destroy_node()
    assert infos, log
    assert infos[0].k[0] == 321.0
    # Stamped as the pair it went with.
    assert stamp_to_ns(infos[0].header.stamp) in received_stamps(probe.fused)
