"""Helpers for tests that run the real node as a process and talk to it with rclpy."""

import atexit
import contextlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import cv2
import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from s4fusion_ros.cli import interrupt  # noqa: E402
from s4fusion_ros.messages import stamp_to_ns  # noqa: E402
from s4fusion_ros.ros.images import image_message  # noqa: E402,F401 (for the tests)
from s4fusion_ros.ros.spin import spin_until  # noqa: E402

from paths import executable  # noqa: E402

NODE_EXECUTABLE = executable('s4fusion_node')
THERMAL_OFFSET_COUNTS = 20000.0  # MSRS 8-bit IR -> 16-bit radiometric-looking counts
THERMAL_GAIN_COUNTS = 30.0


def thermal_counts(ir8: np.ndarray) -> np.ndarray:
    """A real 8-bit IR image as uint16 counts, as a radiometric thermal core would publish."""
    return (THERMAL_OFFSET_COUNTS + THERMAL_GAIN_COUNTS * ir8.astype(np.float64)).astype(np.uint16)


def load_pairs(ivif_dir: pathlib.Path, names: list[str], dataset: str = 'msrs'):
    """[(thermal uint16 (H, W), visible BGR uint8 (H, W, 3))] for the given file names."""
    pairs = []
    for name in names:
        ir = cv2.imread(str(ivif_dir / dataset / 'ir' / name), cv2.IMREAD_GRAYSCALE)
        vi = cv2.imread(str(ivif_dir / dataset / 'vi' / name), cv2.IMREAD_COLOR)
        pairs.append((thermal_counts(ir), vi))
    return pairs


def write_params(params: dict, directory: pathlib.Path) -> pathlib.Path:
    """A --params-file YAML for s4fusion_node."""
    path = directory / 'params.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': params}}))
    return path


@contextlib.contextmanager
def running_node(params: dict, extra_args=(), namespace: str = ''):
    """Start s4fusion_node (its console entry point) as a process; stop it with SIGINT at the end.

    Yields the Popen; its output is in `proc.log_path`.
    """
    directory = pathlib.Path(tempfile.mkdtemp(prefix='s4fusion-node-'))
    # Removed as the session ends, not with the node: tests read its log after stopping it.
    atexit.register(shutil.rmtree, directory, True)
    params_file = write_params(params, directory)
    command = [str(NODE_EXECUTABLE), '--ros-args', '--params-file', str(params_file)]
    if namespace:
        command += ['-r', f'__ns:={namespace}']
    command += list(extra_args)
    log_path = directory / 'node.log'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ.copy())
    proc.log_path = log_path
    try:
        yield proc
    finally:
        interrupt(proc)


def node_log(proc) -> str:
    return pathlib.Path(proc.log_path).read_text(errors='replace')


def wait_for_log(proc, *needles, timeout: float = 60.0) -> str:
    """Return the node's log once it contains every needle."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        log = node_log(proc)
        if all(needle in log for needle in needles):
            return log
        assert proc.poll() is None, log
        time.sleep(0.1)
    raise AssertionError(f'{needles} not in the log:\n{node_log(proc)}')


class Probe(Node):
    """The test's own rclpy node: publishes inputs and records the node's outputs."""

    def __init__(self, name: str = 'probe', namespace: str = ''):
        super().__init__(name, namespace=namespace)
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.thermal_pub = self.create_publisher(Image, 'thermal/image_raw', qos)
        self.visible_pub = self.create_publisher(Image, 'visible/image_raw', qos)
        self.fused, self.saliency = [], []
        self.create_subscription(Image, 's4fusion_node/fused', self.fused.append, qos)
        self.create_subscription(Image, 's4fusion_node/saliency', self.saliency.append, qos)

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rclpy.spin_once(self, timeout_sec=0.01)

    def spin_until(self, condition, timeout: float) -> bool:
        return spin_until(self, condition, timeout, step=0.02)

    def wait_for_node(self, proc, timeout: float = 60.0) -> None:
        """Wait until the node's subscriptions and publishers are matched with ours."""
        def matched():
            return (self.thermal_pub.get_subscription_count() > 0
                    and self.visible_pub.get_subscription_count() > 0
                    and self.count_publishers(f'{self._prefix()}s4fusion_node/fused') > 0)
        if not self.spin_until(lambda: matched() or proc.poll() is not None, timeout) \
                or proc.poll() is not None:
            raise AssertionError(f'node did not come up:\n{node_log(proc)}')

    def _prefix(self) -> str:
        namespace = self.get_namespace()
        return '/' if namespace == '/' else namespace + '/'


def received_stamps(messages) -> list[int]:
    return [stamp_to_ns(m.header.stamp) for m in messages]
