"""Parameters: the YAML defaults, start-up validation and live changes of the running node."""

import array
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from paths import REPO
from s4fusion_ros import settings


def test_config_yaml_equals_declared_defaults():
    assert settings.load_offline_params(REPO / 'config' / 's4fusion.yaml') == settings.defaults()


def test_check_rejects_with_reasons():
    assert 'output_encoding' in settings.check({'output_encoding': 'yuv422'})
    # A device of no known form is refused with the others, before the model loads.
    assert settings.check({'device': 'gpu'}) == "device: 'gpu' is not auto, cpu, cuda or cuda:N"
    assert settings.check({'device': ' CUDA:1'}) == ''
    assert 'singular' in settings.check({'registration.homography': [0.0] * 9})
    # Scale does not make a homography singular: the registration's own check decides.
    assert settings.check({'registration.homography': [1e-5, 0.0, 0.0, 0.0, 1e-5, 0.0,
                                                       0.0, 0.0, 1e-5]}) == ''
    assert 'singular' in settings.check({'registration.homography': [1e7, 0.0, 0.0, 0.0, 1e-6,
                                                                     0.0, 0.0, 0.0, 1.0]})
    assert 'inference_size' in settings.check({'inference_size': [320, 0]})
    assert 'expected an array of integers' in settings.check({'inference_size': None})
    reason = settings.check_update(settings.defaults(), {'normalization.low_percentile': 99.5})
    assert 'normalization.low_percentile' in reason
    assert settings.check_update(settings.defaults(), {'sync.slop': 0.1}) == ''
    # message_filters pairs stamps less than slop apart: slop 0 would pair nothing.
    message_filters = {**settings.defaults(), 'sync.backend': 'message_filters'}
    assert settings.check_update(message_filters, {'sync.slop': 0.001}) == ''
    assert 'sync.slop 0 pairs nothing with sync.backend message_filters' in \
        settings.check_update(message_filters, {'sync.slop': 0.0})
    assert settings.check_update(settings.defaults(), {'sync.slop': 0.0}) == ''
    assert 'sync.thermal_offset is not supported with sync.backend message_filters' in \
        settings.check_update(message_filters, {'sync.thermal_offset': 0.02})
    for bad in (float('inf'), float('nan')):
        assert 'normalization.fixed_max: expected a finite' in settings.check(
            {'normalization.fixed_max': bad})
    # The synchronizer needs a timeout > 0: the declared range says so before it is built.
    assert 'sync.timeout: 0.0 is outside' in settings.check({'sync.timeout': 0.0})
    assert 'sync.timeout: expected double' in settings.check_types({'sync.timeout': 1})


def test_check_draws_each_line_where_the_parameters_need_it():
    # Each edge of the checks, one side of it and the other (a mutation review found them
    # unpinned: moving any of them went unnoticed).
    assert settings.check({'sync.slop': 0.0}) == settings.check({'sync.slop': 1.0}) == ''
    assert 'cuda or cuda:N' in settings.check({'device': 'cuda:'})  # no index: no device
    assert settings.check({'inference_size': [0, 0]}) == ''
    for size in ([-1, -1], [-1, 240], [320, 240, 1], [320]):
        assert f'inference_size: expected [width, height] > 0 or [0, 0], got {size}' == \
            settings.check({'inference_size': size})
    defaults = settings.defaults()
    for low, high in (('normalization.low_percentile', 'normalization.high_percentile'),
                      ('normalization.fixed_min', 'normalization.fixed_max')):
        assert f'{low} (50.0) must be below {high} (50.0)' == \
            settings.check_update(defaults, {low: 50.0, high: 50.0})
    message_filters = {**defaults, 'sync.backend': 'message_filters'}
    assert 'sync.thermal_offset is not supported' in settings.check_update(
        message_filters, {'sync.thermal_offset': -0.02})
    # rclpy takes no integer for a bool parameter, nor a bool for an integer or a double one.
    assert settings.check_types({'half': 1}) == 'half: expected bool, got 1'
    assert settings.check_types({'qos.input.depth': True}) == \
        'qos.input.depth: expected integer, got True'
    assert settings.as_declared('saliency.threshold', True) is True
    depth = 'qos_overrides./thermal/image_raw.subscription.depth'
    for good in (1, 1000):
        assert settings.check_qos_overrides({depth: good}) == ''
    for bad in (0, 1001, True, 5.0):
        assert settings.check_qos_overrides({depth: bad}) == \
            f'{depth} must be an integer from 1 to 1000, not {bad!r}'


@pytest.mark.parametrize('text', [
    'other_node:\n  ros__parameters:\n    half: true\n',
    # A wildcard namespace names none: read for the root namespace, where it does not apply.
    '/*/s4fusion_node:\n  ros__parameters:\n    half: true\n'], ids=['other node', 'any ns'])
def test_a_file_with_no_section_for_the_node_is_refused_offline(tmp_path, text):
    # Read as the defaults, its values would be silently left out.
    path = tmp_path / 'params.yaml'
    path.write_text(text)
    with pytest.raises(settings.SettingsError, match=f'^{path}: no section with ros__parameters '
                       'applies to /s4fusion_node '):
        settings.load_offline_params(path)


@pytest.mark.parametrize('module, unwanted', [('s4fusion_ros.settings', ('torch', 'rclpy')),
                                              ('s4fusion_ros.ros.parameters', ('torch',))])
def test_parameter_modules_import_without_torch(module, unwanted):
    """Validating parameters must not cost torch's start-up (and the table needs no ROS)."""
    if module.endswith('ros.parameters'):
        pytest.importorskip('rcl_interfaces')
    code = f'import sys, {module}; print(sorted(set({unwanted!r}) & set(sys.modules)))'
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == '[]'


# rclpy's helper merges sections per top-level key (a `sync:` group of the node section replaces
# the wildcard's whole group) where rcl, which gives the node its values, merges per parameter as
# the reader does; no file here splits a group between sections. Each file comes with the node
# name rclpy is asked for and why loading it fails ('' when it loads).
TRICKY_FILES = {
    'wildcard, nested, ints, floats and lists': ("""
/**:
  ros__parameters:
    use_sim_time: true
    sync:
      slop: 0.1
      queue_size: 10
    inference_size: [320, 240]
    registration:
      homography: [1.0, 0.0, 2.5, 0.0, 1.0, -3.0, 0.0, 0.0, 1.0]
""", 's4fusion_node', ''),
    'namespaced node over the wildcard': ("""
/**:
  ros__parameters:
    device: cuda
    qos:
      input:
        depth: 10
/robot/s4fusion_node:
  ros__parameters:
    device: cpu
    normalization:
      mode: fixed
      fixed_min: 1000.0
      fixed_max: 2000.0
""", '/robot/s4fusion_node', ''),
    'bare node name, other nodes ignored': ("""
other_node:
  ros__parameters:
    device: cuda
s4fusion_node:
  ros__parameters:
    half: false
    saliency:
      encoding: 32FC1
      threshold: 0.25
""", 's4fusion_node', ''),
    'a string where a double is declared': ("""
/**:
  ros__parameters:
    sync:
      slop: fast
""", 's4fusion_node', "sync.slop: expected double, got 'fast'"),
    'a qos override the offline tools skip, and one of a bad value': ("""
/**:
  ros__parameters:
    qos_overrides:
      /thermal/image_raw:
        subscription:
          reliability: best_effort
      /visible/image_raw:
        subscription:
          history: keep_most
""", 's4fusion_node', "qos_overrides./visible/image_raw.subscription.history must be one of"),
    'an override of an output, which the offline tools write with qos.output.*': ("""
/**:
  ros__parameters:
    qos_overrides:
      /s4fusion_node/fused:
        publisher:
          depth: 10
""", 's4fusion_node', r'instead of qos_overrides\./s4fusion_node/fused\.publisher\.depth'),
}


def rclpy_values(path, node: str) -> dict:
    """What rclpy reads from a parameter file for `node`, as Python values."""
    parameter = pytest.importorskip('rclpy.parameter')
    messages = parameter.parameter_dict_from_yaml_file(str(path), use_wildcard=True,
                                                       target_nodes=[node])
    values = {}
    for name, message in messages.items():
        value = parameter.Parameter.from_parameter_msg(message).value
        values[name] = list(value) if isinstance(value, (list, tuple, array.array)) else value
    return values


def typed(values: dict) -> dict:
    """Values with their types: 1 and 1.0 are different parameters to ROS."""
    def pin(value):
        return [pin(item) for item in value] if isinstance(value, list) else (type(value), value)
    return {name: pin(value) for name, value in values.items()}


@pytest.mark.parametrize('path', sorted((REPO / 'config').glob('*.yaml')), ids=lambda p: p.name)
def test_shipped_params_files_read_as_rclpy_reads_them(path):
    assert typed(settings.read_params_file(path)) == typed(rclpy_values(path, 's4fusion_node'))


def test_integers_for_decimals_in_a_params_file_are_those_decimals_offline(tmp_path):
    # rclpy refuses them; the node takes them as the decimals they are, and so do the tools.
    path = tmp_path / 'params.yaml'
    path.write_text('/**:\n  ros__parameters:\n    sync:\n      slop: 1\n    registration:\n'
                    '      homography: [1, 0, 2, 0, 1, 0, 0, 0, 1]\n')
    values = settings.load_offline_params(path)
    assert typed({'slop': values['sync.slop']}) == typed({'slop': 1.0})
    homography = [1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert typed({'h': values['registration.homography']}) == typed({'h': homography})
    # One too large for a double stays the integer it is, and is refused as the wrong type.
    path.write_text(f'/**:\n  ros__parameters:\n    sync:\n      slop: {10**400}\n')
    with pytest.raises(settings.SettingsError, match='sync.slop: expected double'):
        settings.load_offline_params(path)


@pytest.mark.parametrize('text, node, refusal', TRICKY_FILES.values(), ids=TRICKY_FILES.keys())
def test_params_files_read_as_rclpy_reads_them(tmp_path, text, node, refusal):
    path = tmp_path / 'params.yaml'
    path.write_text(text)
    expected = rclpy_values(path, node)
    assert typed(settings.read_params_file(path)) == typed(expected)
    if refusal:
        with pytest.raises(settings.SettingsError, match=refusal):
            settings.load_offline_params(path)
        return
    node_values = {k: v for k, v in expected.items() if not k.startswith(settings.ROS_KEYS)}
    assert (typed(settings.load_offline_params(path))
            == typed({**settings.defaults(), **node_values}))


# Files whose sections rcl itself applies in ways rclpy's helper above does not show: in file
# order (a later section wins), with `*` one name and `**` any number of them. Each comes with
# the namespace the offline tools read it for (the one its own sections name, else the root).
RCL_ORDER_FILES = {
    'the node section, then a wildcard over it': ("""
/s4fusion_node:
  ros__parameters:
    sync:
      slop: 0.1
/**:
  ros__parameters:
    sync:
      slop: 0.2
""", '/'),
    'a one-name wildcard and a namespaced node section': ("""
/*:
  ros__parameters:
    device: cuda
/robot/s4fusion_node:
  ros__parameters:
    half: false
""", '/robot'),
    'the node in any namespace, and a section for another node': ("""
/**/s4fusion_node:
  ros__parameters:
    device: cpu
/*/other_node:
  ros__parameters:
    device: cuda
/**:
  ros__parameters:
    half: false
""", '/'),
    'a node name nested in its namespace, then a wildcard': ("""
/robot:
  s4fusion_node:
    ros__parameters:
      device: cpu
/**:
  ros__parameters:
    half: false
""", '/robot'),
    'every node of a namespace': ("""
/robot/*:
  ros__parameters:
    half: false
""", '/robot'),
}

# Files rcl refuses at init (so the node does not start), with the offline tools' reason.
RCL_REFUSED_FILES = {
    'a value where a node name belongs': (
        '/**:\n  ros__parameters:\n    half: false\nother:\n  device: cpu\n',
        "'other/device' has a value where a node name or ros__parameters belongs"),
    'an empty name after a slash': ('/s4fusion_node/:\n  ros__parameters:\n    half: false\n',
                                    "'/s4fusion_node/' is not a node name"),
    'a name starting with a digit': ('7:\n  ros__parameters:\n    half: false\n',
                                     "'7' is not a node name"),
    'no parameters under ros__parameters': ('/**:\n  ros__parameters:\n',
                                            r'/\*\*: ros__parameters must be a mapping'),
    # Not as a byte that is not UTF-8: a control character is a ReaderError too (of a character
    # in the text), a syntax error another YAMLError. On one line with where: PyYAML's own text
    # spans six, with a snippet of the file, and calls it '<byte string>'.
    'a control character': (
        '/**:\n  ros__parameters:\n    # bell \x07\n    half: false\n',
        r'cannot read the parameter file: unacceptable character #x0007 on line 3 \(special '
        r'characters are not allowed\)$'),
    'a YAML syntax error': (
        '/**:\n  ros__parameters:\n    half: [false\n',
        r"cannot read the parameter file: line 4, column 1: expected ',' or '\]', but got "
        r"'<stream end>' \(while parsing a flow sequence at line 3, column 11\)$"),
    'a key indented off its mapping': (
        '/**:\n  ros__parameters:\n    half: false\n   device: cpu\n',
        r"cannot read the parameter file: line 4, column 4: expected <block end>, but found "
        r"'<block mapping start>' \(while parsing a block mapping at line 2, column 3\)$"),
}


def rcl_values(path, namespace: str) -> dict:
    """The parameters rcl gives a node `s4fusion_node` in `namespace` started with
    --params-file `path` (ROS's own keys left out)."""
    rclpy = pytest.importorskip('rclpy')
    from rclpy.node import Node
    context = rclpy.Context()
    rclpy.init(args=['s4fusion_node', '--ros-args', '--params-file', str(path)], context=context)
    try:
        node = Node('s4fusion_node', namespace=namespace, context=context,
                    start_parameter_services=False,
                    automatically_declare_parameters_from_overrides=True)
        values = {name: parameter.value
                  for name, parameter in node.get_parameters_by_prefix('').items()
                  if not name.startswith(settings.ROS_KEYS)}
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    return values


@pytest.mark.parametrize('text, namespace', RCL_ORDER_FILES.values(), ids=RCL_ORDER_FILES.keys())
def test_params_files_read_as_rcl_gives_them_to_the_node(tmp_path, text, namespace):
    path = tmp_path / 'params.yaml'
    path.write_text(text)
    expected = rcl_values(path, namespace)
    assert typed(settings.read_params_file(path)) == typed(expected)
    assert typed(settings.load_offline_params(path)) == typed({**settings.defaults(), **expected})


@pytest.mark.parametrize('text, reason', RCL_REFUSED_FILES.values(),
                         ids=RCL_REFUSED_FILES.keys())
def test_params_files_rcl_refuses_are_refused_offline(tmp_path, text, reason):
    rclpy = pytest.importorskip('rclpy')
    path = tmp_path / 'params.yaml'
    path.write_text(text)
    with pytest.raises(RuntimeError, match="Couldn.t parse params file"):  # rcl's RCLError
        rclpy.init(args=['s4fusion_node', '--ros-args', '--params-file', str(path)],
                   context=rclpy.Context())
    with pytest.raises(settings.SettingsError, match=f'^{path}: {reason}'):
        settings.load_offline_params(path)


def test_params_files_are_utf8_whatever_the_locale_as_rcl_reads_them(tmp_path):
    # A Latin-1 comment ended s4fusion-bag with "'utf-8' codec can't decode byte 0xe9 in
    # position 33: invalid continuation byte; the partial output was removed", naming no file
    # (rcl refuses it too); a UTF-8 one failed so in the C locale without UTF-8 mode, where
    # Python's text is ASCII (rcl reads it).
    rclpy = pytest.importorskip('rclpy')
    path = tmp_path / 'params.yaml'
    text = '/**:\n  ros__parameters:\n    # caméra thermique\n    half: true\n'
    path.write_bytes(text.encode('latin-1'))
    with pytest.raises(RuntimeError, match="Couldn.t parse params file"):  # rcl's RCLError
        rclpy.init(args=['s4fusion_node', '--ros-args', '--params-file', str(path)],
                   context=rclpy.Context())
    with pytest.raises(settings.SettingsError, match=(
            f'^{path}: cannot read the parameter file: byte 0xe9 on line 3 is not UTF-8, '
            'which ROS 2 reads YAML files in$')):
        settings.load_offline_params(path)
    path.write_bytes(text.encode())
    code = ('import sys\nfrom s4fusion_ros import settings\n'
            'print(settings.load_offline_params(sys.argv[1])["half"])\n')
    environment = {**os.environ, 'LC_ALL': 'C', 'PYTHONCOERCECLOCALE': '0', 'PYTHONUTF8': '0'}
    done = subprocess.run([sys.executable, '-c', code, path], env=environment,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, 'True\n'), done.stderr


def test_a_file_for_the_node_in_two_namespaces_is_refused_offline(tmp_path):
    path = tmp_path / 'params.yaml'
    path.write_text('s4fusion_node:\n  ros__parameters:\n    half: false\n'
                    '/robot/s4fusion_node:\n  ros__parameters:\n    half: true\n')
    with pytest.raises(settings.SettingsError, match=r'several namespaces \(/, /robot\)'):
        settings.load_offline_params(path)


@pytest.fixture(scope='module')
def node(ivif_dir):
    """One node process; every change below goes through its real parameter services."""
    from ros_harness import Probe, rclpy, running_node
    rclpy.init()
    # Shut down however the set-up ends: a node that did not come up left rclpy initialised,
    # and every later rclpy.init() in the process failed ('must only be called once').
    try:
        probe = Probe('parameter_probe')
        # Integers for decimals at start-up (a YAML 1 or [1, 0, ...]): rclpy alone refuses them.
        with running_node({'device': 'cpu', 'inference_size': [80, 60], 'sync.timeout': 1,
                           'registration.homography': [1, 0, 0, 0, 1, 0, 0, 0, 1]}) as proc:
            probe.wait_for_node(proc)
            yield probe
        probe.destroy_node()
    finally:
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
def test_a_parameter_dump_of_the_running_node_is_read_by_the_offline_tools(node, tmp_path):
    # `ros2 param dump` (list, get, nest on dots under the node's name) holds a qos_overrides
    # entry per topic, each equal to qos.* where not set apart: the offline tools refused the
    # publisher ones (found by a review), so a tuned node's dump could not fuse its bags.
    import yaml
    from rclpy.parameter import parameter_value_to_python
    from rclpy.parameter_client import AsyncParameterClient
    client = AsyncParameterClient(node, 's4fusion_node')
    assert client.wait_for_services(timeout_sec=20.0)
    names = sorted(call(node, client.list_parameters()).result.names)
    dumped = dict(zip(names, map(parameter_value_to_python,
                                 call(node, client.get_parameters(names)).values)))
    assert any(settings.OUTPUT_QOS_OVERRIDE.match(name) for name in dumped), names
    nested = settings.nest(dumped)
    path = tmp_path / 'dump.yaml'
    path.write_text(yaml.safe_dump({'/s4fusion_node': {'ros__parameters': nested}}))
    values = settings.load_offline_params(path)
    assert values == {name: dumped[name] for name in settings.SPECS}
    assert values['sync.timeout'] == 1.0 and values['inference_size'] == [80, 60]
    # One output set apart from qos.output.* is still refused, by name, as is a compressed
    # transport or the camera_info the tools write with the outputs.
    for topic in ('saliency', 'fused/compressed', 'camera_info'):
        publisher = nested['qos_overrides'][f'/s4fusion_node/{topic}']['publisher']
        publisher['depth'] += 2
        path.write_text(yaml.safe_dump({'/s4fusion_node': {'ros__parameters': nested}}))
        with pytest.raises(settings.SettingsError, match=r'set those instead of '
                           rf'qos_overrides\./s4fusion_node/{topic}\.publisher\.depth$'):
            settings.load_offline_params(path)
        publisher['depth'] -= 2


@pytest.mark.ros
def test_descriptors_say_what_each_parameter_takes(node):
    from rclpy.parameter_client import AsyncParameterClient
    client = AsyncParameterClient(node, 's4fusion_node')
    assert client.wait_for_services(timeout_sec=20.0)
    names = ['output_encoding', 'sync.slop', 'device']
    encoding, slop, device = call(node, client.describe_parameters(names)).descriptors
    assert encoding.additional_constraints == 'one of: bgr8, rgb8, mono8'
    assert 'encoding' in encoding.description and not encoding.read_only
    [slop_range] = slop.floating_point_range
    assert (slop_range.from_value, slop_range.to_value) == (0.0, 1.0) and not slop.read_only
    assert device.read_only and device.additional_constraints == ''
    [quality] = call(node, client.describe_parameters(
        ['fused.compressed.jpeg_quality'])).descriptors
    [quality_range] = quality.integer_range
    assert (quality_range.from_value, quality_range.to_value) == (1, 100)
    assert not quality.floating_point_range


@pytest.mark.ros
def test_valid_change_is_accepted(node):
    [result] = set_parameters(node, {'sync.slop': 0.08})
    assert result.successful, result.reason
    assert get_parameter(node, 'sync.slop') == pytest.approx(0.08)


@pytest.mark.ros
def test_an_integer_for_a_decimal_is_that_decimal(node):
    # `ros2 param set /s4fusion_node sync.thermal_offset 0` sends an integer: rclpy refused it
    # with "Wrong parameter type, expected '3' got '2'".
    [result] = set_parameters(node, {'sync.thermal_offset': 0})
    assert result.successful, result.reason
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    for name, value in (('sync.thermal_offset', 0.0), ('sync.timeout', 1.0),
                        ('registration.homography', identity)):
        assert typed({name: get_parameter(node, name)}) == typed({name: value})


@pytest.mark.ros
@pytest.mark.parametrize('name, value, reason', [
    ('output_encoding', 'yuv422', 'output_encoding'),
    ('sync.slop', 5.0, ''),  # outside the descriptor's range: rclpy's own reason
    ('normalization.low_percentile', 99.5, 'normalization.high_percentile'),
    ('device', 'cuda', 'read-only'),
    ('diagnostics.period', 'fast', 'read-only'),  # read-only first, whatever the value
    ('saliency.encoding', 'mono16', 'saliency.encoding'),
    # No range on these: rclpy itself would store them, and the normalizer would then refuse.
    ('normalization.fixed_max', float('inf'), 'normalization.fixed_max: expected a finite'),
    ('normalization.fixed_min', float('nan'), 'normalization.fixed_min: expected a finite'),
    # rclpy lets this through its 0-100 range (a relative tolerance of 1e-6); the normalizer not.
    ('normalization.high_percentile', 100.00005, 'normalization.high_percentile: 100.00005 is '
                                                 'outside [0.0, 100.0]'),
    # rclpy's reason named neither the parameter nor the types ("Wrong parameter type, expected
    # '3' got '4'"): in a request of several, which one was wrong?
    ('sync.slop', 'fast', "sync.slop: expected double, got 'fast'"),
    ('fused.compressed.jpeg_quality', 95.5,
     'fused.compressed.jpeg_quality: expected integer, got 95.5'),
    ('saliency.threshold', True, 'saliency.threshold: expected double, got True'),
])
def test_bad_change_is_rejected_and_changes_nothing(node, name, value, reason):
    before = get_parameter(node, name)
    [result] = set_parameters(node, {name: value})
    assert not result.successful
    assert reason in result.reason
    assert get_parameter(node, name) == before


@pytest.mark.ros
def test_a_parameter_the_node_does_not_have_or_a_deletion_is_refused_by_name(node):
    # `ros2 param set /s4fusion_node sync.slopp 0.1` got rclpy's "Invalid access to undeclared
    # parameter(s): []": its check consumes the generator of names it then lists.
    [typo, good] = set_parameters(node, {'sync.slopp': 0.1, 'sync.slop': 0.09})
    assert not typo.successful and typo.reason.startswith("'sync.slopp': no such parameter")
    assert good.successful, good.reason
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient
    client = AsyncParameterClient(node, 's4fusion_node')
    answer = call(node, client.set_parameters_atomically(
        [Parameter('sync.slop', value=0.06), Parameter('saliency.thresold', value=0.1)]))
    assert not answer.result.successful
    assert answer.result.reason.startswith("'saliency.thresold': no such parameter")
    assert get_parameter(node, 'sync.slop') == pytest.approx(0.09)  # all or none
    # `ros2 param delete`: rclpy's "Static parameter cannot be undeclared" named none either.
    [deleted] = call(node, client.delete_parameters(['sync.slop'])).results
    assert not deleted.successful
    assert deleted.reason.startswith("'sync.slop': the node's parameters cannot be deleted")
    assert get_parameter(node, 'sync.slop') == pytest.approx(0.09)


@pytest.mark.ros
@pytest.mark.parametrize('atomically', [False, True])
def test_a_request_rclpy_cannot_read_is_refused_and_the_node_goes_on(node, atomically):
    # A SetParameters request with a value type outside rcl_interfaces' 0-9 (a buggy or
    # hostile client) raised ValueError in rclpy's service callback: the executor stopped the
    # node ("99 is not a valid Parameter.Type"). An empty name slipped past rclpy's check for
    # undeclared parameters and was declared.
    from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters, SetParametersAtomically
    srv_type = SetParametersAtomically if atomically else SetParameters
    client = node.create_client(
        srv_type, '/s4fusion_node/set_parameters' + ('_atomically' if atomically else ''))
    try:
        assert client.wait_for_service(timeout_sec=20.0)
        good = ParameterMsg(name='sync.slop', value=ParameterValue(
            type=ParameterType.PARAMETER_DOUBLE, double_value=0.06))
        for bad in (ParameterMsg(name='sync.slop', value=ParameterValue(type=99)),
                    ParameterMsg(name='', value=ParameterValue(
                        type=ParameterType.PARAMETER_STRING, string_value='x'))):
            answer = call(node, client.call_async(srv_type.Request(parameters=[bad, good])))
            if atomically:  # all or none
                assert not answer.result.successful
                assert get_parameter(node, 'sync.slop') != pytest.approx(0.06)
            else:  # each on its own
                assert [result.successful for result in answer.results] == [False, True]
                assert get_parameter(node, 'sync.slop') == pytest.approx(0.06)
                set_parameters(node, {'sync.slop': 0.05})
            reason = (answer.result if atomically else answer.results[0]).reason
            assert ('unknown parameter type 99' in reason if bad.name else
                    reason == 'a parameter with an empty name'), reason
    finally:
        node.destroy_client(client)
    from rclpy.parameter_client import AsyncParameterClient
    names = call(node, AsyncParameterClient(node, 's4fusion_node').list_parameters()).result.names
    assert '' not in names
    [result] = set_parameters(node, {'sync.slop': 0.07})  # still up, and taking changes
    assert result.successful, result.reason


@pytest.mark.ros
def test_output_encoding_change_takes_effect(node, ivif_dir):
    from ros_harness import image_message, load_pairs
    results = set_parameters(node, {'output_encoding': 'mono8', 'saliency.encoding': '32FC1'})
    assert all(result.successful for result in results), [r.reason for r in results]
    thermal, visible = load_pairs(ivif_dir, ['00004N.png'])[0]
    stamp = node.get_clock().now().nanoseconds
    node.fused.clear()
    node.saliency.clear()
    end = time.monotonic() + 60
    while not node.spin_until(lambda: node.fused and node.saliency, timeout=1.0):
        assert time.monotonic() < end, 'the node fused nothing after the change'
        node.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'ir'))
        node.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
        stamp += 100_000_000
    assert node.fused[-1].encoding == 'mono8'
    saliency = node.saliency[-1]
    assert saliency.encoding == '32FC1' and saliency.step == 4 * saliency.width
    values = np.frombuffer(saliency.data, np.float32)
    assert values.min() >= 0.0 and values.max() <= 1.0


@pytest.mark.ros
def test_a_slop_change_reaches_the_pairing(node, ivif_dir):
    # Frames 0.2 s apart pair only under the new slop: the parameter alone changing (what the
    # other tests read back) would not show a synchronizer left at the old one.
    from rclpy.time import Time
    from ros_harness import image_message, load_pairs
    [result] = set_parameters(node, {'sync.slop': 0.3})
    assert result.successful, result.reason
    thermal, visible = load_pairs(ivif_dir, ['00004N.png'])[0]
    stamp = node.get_clock().now().nanoseconds
    sent = set()

    def ours():  # not a late output of an earlier test's frames
        return any(Time.from_msg(msg.header.stamp).nanoseconds in sent for msg in node.fused)
    try:
        for _ in range(30):
            node.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'ir'))
            node.visible_pub.publish(image_message(visible, 'bgr8', stamp + 200_000_000, 'rgb'))
            sent.update((stamp, stamp + 200_000_000))  # whichever stamp the output keeps
            stamp += 1_000_000_000
            if node.spin_until(ours, timeout=1.0):
                break
        assert ours(), 'no pair fused under sync.slop 0.3'
    finally:
        set_parameters(node, {'sync.slop': 0.05})


def fuse_one(probe, thermal, visible) -> np.ndarray:
    """The fused image of the pair, sent with a new stamp until the node publishes it."""
    from rclpy.time import Time
    from ros_harness import image_message
    stamp = probe.get_clock().now().nanoseconds

    def fused():
        return [m for m in probe.fused if Time.from_msg(m.header.stamp).nanoseconds == stamp]
    for _ in range(30):
        stamp += 1_000_000_000
        probe.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'ir'))
        probe.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
        if probe.spin_until(fused, timeout=1.0):
            message = fused()[0]
            return np.frombuffer(message.data, np.uint8).reshape(message.height, -1)
    raise AssertionError('no pair fused')


@pytest.mark.ros
def test_a_normalization_change_reaches_the_image(node, ivif_dir):
    # The counts mapped as fixed over 0-65535 (a narrow grey band) fuse to another image than
    # the percentile range: the parameter alone changing would not show a normalizer left as
    # it was.
    from ros_harness import load_pairs
    thermal, visible = load_pairs(ivif_dir, ['00004N.png'])[0]
    before = fuse_one(node, thermal, visible)
    [result] = set_parameters(node, {'normalization.mode': 'fixed'})
    try:
        assert result.successful, result.reason
        after = fuse_one(node, thermal, visible)
    finally:
        set_parameters(node, {'normalization.mode': 'percentile'})
    assert np.abs(after.astype(int) - before).mean() > 5


@pytest.mark.ros
def test_a_pair_in_inference_as_a_change_lands_goes_out_all_with_the_values_before(ivif_dir):
    # The node in this process, so that an atomic change lands while its model runs on a pair
    # (the real model, called as the change is made): its fused image and that image's
    # compressed transport must both be of the values before. Read apart, a stress run
    # toggling two output states sent 15 of 345 pairs fused as mono8 but compressed as the
    # other state's JPEG.
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image
    from ros_harness import load_pairs, rclpy
    from s4fusion_ros.diagnostics import Key
    from s4fusion_ros.engine import PreparedPair
    from s4fusion_ros.ros.node import S4FusionNode
    context = Context()
    rclpy.init(args=[], context=context)
    fusion = S4FusionNode(context=context, namespace='/change_in_inference', parameter_overrides=[
        Parameter('device', value='cpu'), Parameter('inference_size', value=[80, 60]),
        Parameter('output_encoding', value='mono8'),
        Parameter('fused.compressed.format', value='png')])
    probe = Node('change_in_inference_probe', namespace='/change_in_inference',
                 context=context)
    received = {}
    probe.create_subscription(Image, 's4fusion_node/fused',
                              lambda msg: received.update(fused=msg.encoding), 5)
    probe.create_subscription(CompressedImage, 's4fusion_node/fused/compressed',
                              lambda msg: received.update(compressed=msg.format), 5)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe)

    def spin_until(condition):
        end = time.monotonic() + 20.0
        while not condition() and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        return condition()
    try:
        assert spin_until(lambda: fusion.fused_compressed_pub.get_subscription_count()
                          and fusion.fused_pub.get_subscription_count())
        run_model = fusion.engine._run_model

        def run_model_as_a_change_lands(*images):
            change = fusion.set_parameters_atomically([
                Parameter('output_encoding', value='bgr8'),
                Parameter('fused.compressed.format', value='jpeg')])
            assert change.successful, change.reason
            return run_model(*images)
        fusion.engine._run_model = run_model_as_a_change_lands
        thermal, visible = load_pairs(ivif_dir, ['00004N.png'])[0]
        stamp = 1_000_000_000
        pair = PreparedPair(stamp, stamp, 'rgb', thermal.astype(np.float32) / 65535.0, visible)
        assert fusion._fuse_and_publish(pair) == Key.PAIRS_FUSED
        assert spin_until(lambda: len(received) == 2), received
        assert received == {'fused': 'mono8', 'compressed': 'mono8; png compressed '}
    finally:
        executor.shutdown()
        probe.destroy_node()
        fusion.destroy_node()
        rclpy.shutdown(context=context)


@pytest.mark.ros
@pytest.mark.parametrize('params, message', [
    ({'output_encoding': 'yuv422'}, 'output_encoding'),
    ({'device': 'cuda'}, 'CUDA is not available'),
    ({'device': 'gpu'}, "device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    ({'model.weights': '/nonexistent/weights.safetensors'}, '/nonexistent/weights.safetensors'),
    ({'model.preset': 'authors', 'model.weights': str(REPO / 's4fusion_ros' / 'weights' /
                                                      's4fusion_compact.safetensors')},
     'holds the compact network, but the preset asked for is authors'),
    ({'qos_overrides': {'/thermal/image_raw': {'subscription': {'reliability': 'besteffort'}}}},
     "qos_overrides./thermal/image_raw.subscription.reliability must be one of reliable, "
     "best_effort, best_available, system_default, not 'besteffort'"),
    ({'qos_overrides': {'/s4fusion_node/fused': {'publisher': {'depth': 0}}}},
     'qos_overrides./s4fusion_node/fused.publisher.depth must be an integer from 1 to 1000'),
    # The visible camera_info's durability (a latched driver's info): rclpy refused a value it
    # cannot parse after the model had loaded, naming neither the parameter nor the topic.
    ({'qos_overrides': {'/visible/camera_info': {'subscription': {'durability': 'latched'}}}},
     "qos_overrides./visible/camera_info.subscription.durability must be one of volatile, "
     "transient_local, best_available, system_default, not 'latched'"),
    # rclpy gives the node an untyped empty list as None: it raised a TypeError naming nothing
    # (inference_size), or started on the shipped weights (model.weights).
    ({'inference_size': []}, 'inference_size: no value given (an empty list or ~ has no type)'),
    ({'model.weights': []}, 'model.weights: no value given'),
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


@pytest.mark.ros
@pytest.mark.parametrize('params, line', [
    # rclpy declared these one by one and named the second of the two as the invalid one:
    # "Invalid parameter value (99.0) for parameter. Reason: ...: normalization.high_percentile".
    ({'normalization': {'low_percentile': 99.5}},
     'normalization.low_percentile (99.5) must be below normalization.high_percentile (99.0)'),
    # "Trying to set parameter 'sync.slop' to 'fast' of type 'STRING', expecting type 'DOUBLE'".
    ({'sync': {'slop': 'fast'}}, "sync.slop: expected double, got 'fast'"),
    ({'sync': {'slop': 5.0}}, 'sync.slop: 5.0 is outside [0.0, 1.0]'),
])
def test_bad_start_up_values_are_named_in_this_package_words(params, line, tmp_path):
    from ros_harness import NODE_EXECUTABLE, write_params
    params_file = write_params(params, tmp_path)
    done = subprocess.run([str(NODE_EXECUTABLE), '--ros-args', '--params-file', str(params_file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f's4fusion_node: {line}'
