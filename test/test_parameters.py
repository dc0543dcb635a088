"""Parameters: the YAML defaults, start-up validation and live changes of the running node."""

import subprocess

import numpy as np
import pytest

from paths import REPO
from s4fusion_ros import settings


def test_config_yaml_equals_declared_defaults():
    assert settings.load_params_file(REPO / 'config' / 's4fusion.yaml') == settings.defaults()


def test_check_rejects_with_reasons():
    assert 'output_encoding' in settings.check({'output_encoding': 'yuv422'})
    assert 'singular' in settings.check({'registration.homography': [0.0] * 9})
    assert 'inference_size' in settings.check({'inference_size': [320, 0]})
    reason = settings.check_update(settings.defaults(), {'normalization.low_percentile': 99.5})
    assert 'normalization.low_percentile' in reason
    assert settings.check_update(settings.defaults(), {'sync.slop': 0.1}) == ''


@pytest.fixture(scope='module')
def node(ivif_dir):
    """One node process; every change below goes through its real parameter services."""
    from ros_harness import Probe, rclpy, running_node
    rclpy.init()
    probe = Probe('parameter_probe')
    with running_node({'device': 'cpu', 'inference_size': [80, 60]}) as proc:
        probe.wait_for_node(proc)
        yield probe
    probe.destroy_node()
    rclpy.shutdown()


def call(probe, future):
    from ros_harness import rclpy
    rclpy.spin_until_future_complete(probe, future, timeout_sec=20.0)
    assert future.done(), 'the parameter service did not answer'
    return future.result()


def set_parameters(probe, values: dict):
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient
    client = AsyncParameterClient(probe, 's4fusion_node')
    assert client.wait_for_services(timeout_sec=20.0)
    params = [Parameter(name, value=value) for name, value in values.items()]
    return call(probe, client.set_parameters(params)).results


def get_parameter(probe, name):
    from rclpy.parameter import parameter_value_to_python
    from rclpy.parameter_client import AsyncParameterClient
    client = AsyncParameterClient(probe, 's4fusion_node')
    return parameter_value_to_python(call(probe, client.get_parameters([name])).values[0])


@pytest.mark.ros
def test_valid_change_is_accepted(node):
    [result] = set_parameters(node, {'sync.slop': 0.08})
    assert result.successful, result.reason
    assert get_parameter(node, 'sync.slop') == pytest.approx(0.08)


@pytest.mark.ros
@pytest.mark.parametrize('name, value, reason', [
    ('output_encoding', 'yuv422', 'output_encoding'),
    ('sync.slop', 5.0, ''),  # outside the descriptor's range: rclpy's own reason
    ('normalization.low_percentile', 99.5, 'normalization.high_percentile'),
    ('device', 'cuda', 'read-only'),
    ('saliency.encoding', 'mono16', 'saliency.encoding'),
])
def test_bad_change_is_rejected_and_changes_nothing(node, name, value, reason):
    before = get_parameter(node, name)
    [result] = set_parameters(node, {name: value})
    assert not result.successful
    assert reason in result.reason
    assert get_parameter(node, name) == before


@pytest.mark.ros
def test_output_encoding_change_takes_effect(node, ivif_dir):
    from ros_harness import image_message, load_pairs
    results = set_parameters(node, {'output_encoding': 'mono8', 'saliency.encoding': '32FC1'})
    assert all(result.successful for result in results), [r.reason for r in results]
    thermal, visible = load_pairs(ivif_dir, ['00004N.png'])[0]
    stamp = node.get_clock().now().nanoseconds
    node.fused.clear()
    node.saliency.clear()
    while not node.spin_until(lambda: node.fused and node.saliency, timeout=1.0):
        node.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'ir'))
        node.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
        stamp += 100_000_000
    assert node.fused[-1].encoding == 'mono8'
    saliency = node.saliency[-1]
    assert saliency.encoding == '32FC1' and saliency.step == 4 * saliency.width
    values = np.frombuffer(saliency.data, np.float32)
    assert values.min() >= 0.0 and values.max() <= 1.0


@pytest.mark.ros
@pytest.mark.parametrize('params, message', [
    ({'output_encoding': 'yuv422'}, 'output_encoding'),
    ({'device': 'cuda'}, 'CUDA is not available'),
    ({'model.weights': '/nonexistent/weights.safetensors'}, '/nonexistent/weights.safetensors'),
])
def test_bad_start_up_values_stop_the_node_with_a_clear_message(params, message, tmp_path):
    from ros_harness import NODE_EXECUTABLE, write_params
    if message == 'CUDA is not available':
        import torch
        if torch.cuda.is_available():
            pytest.skip('this machine has CUDA')
    params_file = write_params(params, tmp_path)
    done = subprocess.run([str(NODE_EXECUTABLE), '--ros-args', '--params-file', str(params_file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
    assert 'Traceback' not in done.stderr
