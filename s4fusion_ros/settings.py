"""The node's parameters without ROS or torch: the table, its checks and the parameter file.

The live node (ros/node.py; ros/parameters.py adds the rclpy descriptors) and the offline tools
read the same YAML format, and build their pipeline, engine and model from the values with the
factories beside what they build (engine.py, runtime.py), so one parameter file means the same
thing live and offline. Validating parameters loads neither torch nor rclpy.

config/s4fusion.yaml holds the same defaults (a test keeps the two equal). Parameter names map to
the usual ROS names: `sync.queue_size` is message_filters' / stereo_image_proc's `queue_size`,
`sync.slop` is `slop` / `approximate_sync_tolerance_seconds`.
"""

import math
import pathlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from .cli import split_ros_arguments
from .imaging.limits import MAX_PIXELS
from .imaging.normalization import MODES as NORMALIZATION_MODES
from .imaging.registration import validate_homography
from .sync import CLOCK_JUMP_S
from .worker import QUEUE_POLICIES

NODE_NAME = 's4fusion_node'
RELIABILITIES = ('reliable', 'best_effort')
# zstd: image_transport's lossless zstd plugin (Jazzy on).
TRANSPORTS = ('raw', 'compressed', 'zstd')
# 16-bit thermal cores are often sent with image_transport's compressed_depth plugin.
THERMAL_TRANSPORTS = (*TRANSPORTS, 'compressedDepth')
OUTPUT_ENCODINGS = ('bgr8', 'rgb8', 'mono8')  # of the fused image
SALIENCY_ENCODINGS = ('mono8', '32FC1')
SYNC_BACKENDS = ('own', 'message_filters')
IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
# Keys a parameter file may hold for any node (rclpy handles them); the offline tool ignores them.
# ROS 2's per-topic qos_overrides.<topic>.<publisher|subscription>.<policy> start-up parameters.
QOS_OVERRIDES_PREFIX = 'qos_overrides.'
OUTPUT_NAMES = ('fused', 'saliency')  # the node's output topics, ~/fused and ~/saliency
OUTPUT_TOPICS = tuple(f'/{NODE_NAME}/{name}' for name in OUTPUT_NAMES)  # in the root namespace
# The end of either output's resolved name, in any namespace and of a node of any name (the
# launch file's node_name): a regular expression.
OUTPUT_TOPIC_PATTERN = rf'/[^/]+/({"|".join(OUTPUT_NAMES)})'
# An override of a topic the offline tools write with qos.output.*: an output, its compressed
# transport or the camera_info beside them.
OUTPUT_QOS_OVERRIDE = re.compile(
    rf'{re.escape(QOS_OVERRIDES_PREFIX)}.*/[^/]+/'
    rf'(({"|".join(OUTPUT_NAMES)})(/compressed)?|camera_info)\.publisher\.')
ROS_KEYS = ('use_sim_time', QOS_OVERRIDES_PREFIX, 'start_type_description_service')


@dataclass(frozen=True)
class Spec:
    """One parameter: default, description, whether it can change while running, and its limits."""

    default: object
    description: str
    runtime: bool = False
    choices: tuple = ()
    range: tuple | None = None  # inclusive (low, high) for numbers


# The device parameter's forms: checked with the other values, and by runtime.resolve_device.
DEVICE_FORM = re.compile(r'auto|cpu|cuda(:\d+)?')


def compressed_transport_specs(output: str, note: str = '') -> dict:
    """The parameters of ~/`output`/compressed, image_transport's compressed transport of an
    output, named as image_transport names them (`<base topic>.compressed.<parameter>`)."""
    topic = f'~/{output}/compressed'
    return {
        f'{output}.compressed.format': Spec(
            'jpeg', f"codec of {topic}{note} (image_transport's compressed transport; encoded "
            'only while it has a subscriber): jpeg or png', runtime=True, choices=('jpeg', 'png')),
        f'{output}.compressed.jpeg_quality': Spec(95, f'JPEG quality of {topic}', runtime=True,
                                                  range=(1, 100)),
        f'{output}.compressed.png_level': Spec(3, f'PNG compression level of {topic}',
                                               runtime=True, range=(0, 9)),
    }


SPECS = {
    'device': Spec('auto', 'auto (CUDA if available), cpu, cuda or cuda:N'),
    'half': Spec(False, 'fp16 inference through autocast (CUDA only)'),
    'model.preset': Spec('auto', 'auto (authors on CUDA, compact on CPU), authors or compact',
                         choices=('auto', 'authors', 'compact')),
    'model.weights': Spec('', 'checkpoint (.safetensors with its .json), whose network '
                          'model.preset must name unless auto; empty = shipped weights'),
    'model.detail_gain': Spec(0.0, 'gain on the details of the Laplacian base of a model that has '
                              'one (compact); 0 = the weights\' own (1.1 shipped); 1 = the plain '
                              'pyramid\'s detail, which flickers less on video', range=(0.0, 4.0)),
    'thermal.transport': Spec('raw', 'raw: sensor_msgs/Image on thermal/image_raw; compressed: '
                              'CompressedImage on thermal/image_raw/compressed; compressedDepth: '
                              'CompressedImage on thermal/image_raw/compressedDepth (16-bit PNG); '
                              'zstd: CompressedImage on thermal/image_raw/zstd (lossless)',
                              choices=THERMAL_TRANSPORTS),
    'visible.transport': Spec('raw', 'raw: sensor_msgs/Image on visible/image_raw; compressed: '
                              'CompressedImage on visible/image_raw/compressed; zstd: '
                              'CompressedImage on visible/image_raw/zstd (lossless)',
                              choices=TRANSPORTS),
    'qos.input.reliability': Spec('reliable', 'input reliability (reliable receives nothing from '
                                  'a best_effort publisher)', choices=RELIABILITIES),
    'qos.input.depth': Spec(5, 'input history depth (keep last)', range=(1, 1000)),
    'qos.output.reliability': Spec('reliable', 'output reliability', choices=RELIABILITIES),
    'qos.output.depth': Spec(5, 'output history depth (keep last)', range=(1, 1000)),
    'sync.backend': Spec('own', 'pairing: own (each thermal frame with the nearest visible frame '
                         'within slop) or message_filters (its ApproximateTimeSynchronizer with '
                         'sync.queue_size and sync.slop; needs the ROS package message_filters)',
                         choices=SYNC_BACKENDS),
    'sync.slop': Spec(0.05, 'largest stamp difference (s) of a thermal/visible pair', runtime=True,
                      range=(0.0, 1.0)),
    'sync.queue_size': Spec(30, 'messages kept per input while waiting for a partner',
                            range=(1, 1000)),
    'sync.timeout': Spec(0.5, 'seconds past its stamp + sync.slop that a thermal frame waits for '
                         'a later visible frame before it is paired with what has arrived; set it '
                         'above the longest delivery delay of either topic', range=(0.001, 10.0)),
    'sync.thermal_offset': Spec(0.0, 'seconds added to thermal stamps for matching (constant '
                                'driver latency, clocks that differ); outputs keep the original '
                                'stamps', runtime=True, range=(-1.0, 1.0)),
    'sync.clock_jump': Spec(CLOCK_JUMP_S, 'a stamp this many seconds older than the newest of '
                            'its topic is a clock jump (a looping bag, a restarted camera or '
                            'simulation), once the next frame bears it out: pairing restarts on '
                            'the new timeline; else a glitched stamp, late; a smaller jump back '
                            'counts as late', range=(0.001, 3600.0)),
    'inference.queue_size': Spec(1, 'pairs waiting for the model', range=(1, 100)),
    'inference.queue_policy': Spec('keep_newest', 'when the queue is full: keep_newest drops the '
                                   'oldest pair, keep_oldest drops the new one',
                                   choices=QUEUE_POLICIES),
    'inference_size': Spec([0, 0], '[width, height] the model runs at, at most the visible '
                           "image's (detail restored at full resolution); [0, 0] = the visible "
                           'image size'),
    'max_input_pixels': Spec(1 << 25, 'largest input image (width x height) accepted; a larger '
                             'one is dropped as a bad message (the model needs about 300 bytes '
                             'a pixel on the CPU; default: 8K)', range=(1, MAX_PIXELS)),
    'registration.homography': Spec(IDENTITY, 'row-major 3x3 homography from thermal pixels to '
                                    'visible pixels'),
    'normalization.mode': Spec('percentile', 'thermal to [0, 1]: percentile (smoothed over time), '
                               'minmax or fixed', runtime=True, choices=NORMALIZATION_MODES),
    'normalization.low_percentile': Spec(1.0, 'percentile mode: low percentile', runtime=True,
                                         range=(0.0, 100.0)),
    'normalization.high_percentile': Spec(99.0, 'percentile mode: high percentile', runtime=True,
                                          range=(0.0, 100.0)),
    'normalization.smoothing': Spec(0.8, 'percentile mode: weight of the previous range '
                                    '(0 = none)', runtime=True, range=(0.0, 0.999)),
    'normalization.fixed_min': Spec(0.0, 'fixed mode: raw value (counts or temperature) mapped '
                                    'to 0', runtime=True),
    'normalization.fixed_max': Spec(65535.0, 'fixed mode: raw value mapped to 1', runtime=True),
    'output_encoding': Spec('bgr8', 'fused image encoding', runtime=True,
                            choices=OUTPUT_ENCODINGS),
    **compressed_transport_specs('fused'),
    'saliency.encoding': Spec('mono8', 'saliency image encoding: mono8 (0-255) or 32FC1 (0-1)',
                              runtime=True, choices=SALIENCY_ENCODINGS),
    'saliency.contrast': Spec(0.2, 'carried thermal excess (luminance) that counts as fully '
                              'salient', runtime=True, range=(0.01, 1.0)),
    'saliency.threshold': Spec(0.0, 'saliency below this is published as 0', runtime=True,
                               range=(0.0, 1.0)),
    **compressed_transport_specs('saliency', ' (the mono8 map, whatever saliency.encoding)'),
    'diagnostics.period': Spec(1.0, 'seconds between /diagnostics messages', range=(0.1, 60.0)),
}


class SettingsError(ValueError):
    """A parameter file or value that cannot be used; the message names the file or parameter."""


def defaults() -> dict:
    """Every parameter at its default value."""
    return {name: spec.default for name, spec in SPECS.items()}


def check(values: dict) -> str:
    """Why `values` (a full or partial set of parameter values) is invalid; '' when it is valid.

    Types are `check_types`'s (at start-up; rclpy checks live changes by the descriptors); this
    checks the rest. Ranges are checked here too: rclpy lets a double through within a relative
    1e-6 of a range's edge (and NaN and inf through a double without one), which the parts behind
    the parameters (the normalizer's percentiles, for one) refuse.
    """
    for name, value in values.items():
        spec = SPECS.get(name)
        if spec is not None and value is None:  # what rclpy makes of [] or ~: no type
            return (f'{name}: no value given (an empty list or ~ has no type); expected '
                    f'{_kind(spec.default)}')
        if spec is not None and spec.choices and value not in spec.choices:
            return f"{name}: '{value}' is not one of {', '.join(spec.choices)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f'{name}: expected a finite number, got {value}'
        if spec is not None and spec.range is not None and not (
                spec.range[0] <= value <= spec.range[1]):
            return f'{name}: {value} is outside [{spec.range[0]}, {spec.range[1]}]'
    # The form only: whether this machine has that device is known once torch loads.
    if isinstance(values.get('device'), str) and not DEVICE_FORM.fullmatch(
            values['device'].strip().lower()):
        return f"device: '{values['device']}' is not auto, cpu, cuda or cuda:N"
    if 'inference_size' in values:
        size = list(values['inference_size'])
        if len(size) != 2 or min(size) < 0 or (0 in size and any(size)):
            return f'inference_size: expected [width, height] > 0 or [0, 0], got {size}'
    if 'registration.homography' in values:
        try:  # the registration's own check, so both agree on what is singular
            validate_homography(values['registration.homography'])
        except ValueError as error:
            return f'registration.homography: {error}'
    return ''


def check_update(current: dict, updates: dict) -> str:
    """Why changing `current` by `updates` is invalid, cross-parameter rules too ('' if valid)."""
    merged = {**current, **updates}
    reason = check(updates)
    for low, high in (('normalization.low_percentile', 'normalization.high_percentile'),
                      ('normalization.fixed_min', 'normalization.fixed_max')):
        if not reason and low in merged and high in merged and merged[low] >= merged[high]:
            reason = f'{low} ({merged[low]}) must be below {high} ({merged[high]})'
    if not reason and merged.get('sync.backend') == 'message_filters':
        if merged.get('sync.thermal_offset', 0.0) != 0.0:
            reason = ('sync.thermal_offset is not supported with sync.backend message_filters '
                      '(it pairs the stamps as they are)')
        elif merged.get('sync.slop') == 0.0:
            reason = ('sync.slop 0 pairs nothing with sync.backend message_filters (it pairs '
                      'stamps less than slop apart); exact stamps pair with sync.backend own')
    return reason


# ROS 2's qos_overrides.<topic>.<publisher|subscription>.<policy> values the node takes (the
# policies QoSOverridingOptions.with_default_policies covers, and the visible camera_info's
# durability, with the values rclpy parses; depth as the qos.*.depth range). A durability rclpy
# cannot parse stopped the start only after the model had loaded, naming neither the parameter
# nor the topic ("Unexpected QoS override for policy `durability`: `latched`").
QOS_OVERRIDE_CHOICES = {'history': ('keep_last', 'keep_all', 'system_default'),
                        'reliability': ('reliable', 'best_effort', 'best_available',
                                        'system_default'),
                        'durability': ('volatile', 'transient_local', 'best_available',
                                       'system_default')}


def check_qos_overrides(values: dict) -> str:
    """Why start-up values of qos_overrides.* cannot be used ('' if they can): checked before
    the model loads, where rclpy would refuse them only as the topic is made, without naming
    it, and would take any depth."""
    low, high = SPECS['qos.input.depth'].range
    for name, value in sorted(values.items()):
        if not name.startswith(QOS_OVERRIDES_PREFIX):
            continue
        policy = name.rsplit('.', 1)[-1]
        if policy == 'depth':
            if type(value) is not int or not low <= value <= high:
                return f'{name} must be an integer from {low} to {high}, not {value!r}'
        elif policy in QOS_OVERRIDE_CHOICES and value not in QOS_OVERRIDE_CHOICES[policy]:
            return (f"{name} must be one of {', '.join(QOS_OVERRIDE_CHOICES[policy])}, "
                    f'not {value!r}')
    return ''


def as_declared(name: str, value):
    """`value` as parameter `name` takes it: integers given for a decimal parameter or array
    (a YAML `0` or `[1, 0, 0, ...]`, `ros2 param set ... sync.thermal_offset 0`) are those
    decimals, which the node takes where rclpy's type check alone would refuse them naming type
    codes only. Any other value is returned as it is."""
    default = SPECS[name].default if name in SPECS else None

    def integer(item):  # bool is a subclass of int, and is no number here; a YAML integer
        return type(item) is int and abs(item) <= sys.float_info.max  # may exceed a double
    if type(default) is float and integer(value):
        return float(value)
    if (isinstance(default, list) and default and type(default[0]) is float
            and isinstance(value, Sequence) and not isinstance(value, str) and len(value)
            and all(map(integer, value))):
        return [float(item) for item in value]
    return value


def check_start_up(given: dict) -> str:
    """Why start-up values (`given` by name, after `as_declared`: -p, --params-file) cannot be
    used ('' if they can), checked as a whole with the defaults of those not given: types, values,
    rules between parameters and qos_overrides.*. Other names are left to the caller."""
    values = {**defaults(), **{name: value for name, value in given.items() if name in SPECS}}
    return check_types(values) or check_update({}, values) or check_qos_overrides(given)


def check_types(values: dict) -> str:
    """Check the types rclpy enforces from the descriptors (after `as_declared`, as the node
    applies it), in this package's words; `check` names a value without a type (None)."""
    for name, value in values.items():
        expected = _kind(SPECS[name].default)
        if value is not None and _kind(value) != expected:
            return f'{name}: expected {expected}, got {value!r}'
    return ''


def _kind(value) -> str:
    """Name rclpy's parameter type of a Python value."""
    if isinstance(value, (list, tuple)):
        kinds = {_kind(item) for item in value}
        return f'an array of {kinds.pop()}s' if len(kinds) == 1 else 'a mixed array'
    for kind, name in ((bool, 'bool'), (int, 'integer'), (float, 'double'), (str, 'string')):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def load_offline_params(path: pathlib.Path | str | None) -> dict:
    """Every parameter of the node as a --params-file gives it to the offline tools (s4fusion-bag,
    -batch, -demo): the file's value, else the default (every default without a file).

    Raises SettingsError naming the file for unreadable YAML, a missing section, unknown names,
    invalid values and publisher qos_overrides that differ from qos.output.*: the offline tools
    write the outputs with the QoS of qos.output.*, so an override that would change one output
    is refused rather than silently left out (the ones a `ros2 param dump` of the node holds
    for every topic are equal to it, unless set apart).
    """
    if path is None:
        return defaults()
    path = pathlib.Path(path)
    given = read_params_file(path)
    values = _values_of(path, given)
    as_outputs = {'depth': values['qos.output.depth'],
                  'reliability': values['qos.output.reliability'], 'history': 'keep_last'}
    overridden = sorted(name for name, value in given.items() if OUTPUT_QOS_OVERRIDE.match(name)
                        and value != as_outputs.get(name.rsplit('.', 1)[-1]))
    if overridden:
        raise SettingsError(f'{path}: the offline tools write the outputs with the QoS of '
                            f'qos.output.*; set those instead of {", ".join(overridden)}')
    return values


def _values_of(path: pathlib.Path, given: dict) -> dict:
    """Every parameter: the file's value (`given`), else its default; SettingsError naming
    the file for unknown names and invalid values."""
    taken = {}
    for name, value in given.items():
        if name.startswith(ROS_KEYS):
            continue
        if name not in SPECS:
            raise SettingsError(f"{path}: unknown parameter '{name}'")
        taken[name] = as_declared(name, value)
    reason = check_start_up({**given, **taken})
    if reason:
        raise SettingsError(f'{path}: {reason}')
    return {**defaults(), **taken}


def read_params_file(path: pathlib.Path | str) -> dict:
    """The values a --params-file gives the node, unchecked, as rcl reads them for it.

    A section applies when its name matches the node's full name, `*` standing for one name and
    `**` for any number of them (`/**`, `/**/s4fusion_node`, `/robot/s4fusion_node`); the file's
    later sections override its earlier ones. The offline tools run outside any namespace: they
    read the file for the node in the one namespace the file's own sections name for it
    (`/robot/s4fusion_node` or `/robot/*`: /robot), else in the root namespace. Nested keys
    become dotted names (`sync: {slop: 0.1}` is `sync.slop`). Raises SettingsError naming the
    file for unreadable YAML or what rcl refuses (params_file_sections), sections for the node
    in several namespaces, or when no section applies to the node.
    """
    path = pathlib.Path(path)
    sections = params_file_sections(path)
    namespaces = sorted({_namespace_naming(key, NODE_NAME) for key, _ in sections} - {None})
    if len(namespaces) > 1:
        raise SettingsError(f"{path}: sections for {NODE_NAME} in several namespaces "
                            f"({', '.join(namespace or '/' for namespace in namespaces)}); the "
                            'offline tools read one, so keep only its sections')
    full_name = (namespaces[0] if namespaces else '') + '/' + NODE_NAME
    values, applied = {}, False
    for key, parameters in sections:  # in file order: a later section wins, as in rcl
        if section_applies(key, full_name):
            values.update(_flatten(parameters))
            applied = True
    if not applied:
        raise SettingsError(f"{path}: no section with ros__parameters applies to {full_name} "
                            f"('/**', '{NODE_NAME}' or '/NAMESPACE/{NODE_NAME}')")
    return values


def yaml_fault(error: yaml.YAMLError, data: bytes) -> str:
    """What PyYAML found wrong in the file `data` (a parameter file, a bag's metadata.yaml), on
    one line with where (its own text spans lines, a snippet of the file among them, and names
    the file '<byte string>')."""
    if isinstance(error, yaml.reader.ReaderError) and error.encoding == 'utf-8':
        line = data[:error.position].count(b'\n') + 1  # its position counts bytes here
        return (f'byte 0x{error.character:02x} on line {line} is not UTF-8, which ROS 2 '
                'reads YAML files in')
    if isinstance(error, yaml.reader.ReaderError) and error.encoding == 'unicode':
        # A character YAML does not allow; its position counts the characters before it.
        line = data.decode(errors='replace')[:error.position].count('\n') + 1
        return f'unacceptable character #x{error.character:04x} on line {line} ({error.reason})'
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        fault = f'{_yaml_place(error.problem_mark)}: {error.problem}'
        if error.context:
            place = (f' at {_yaml_place(error.context_mark)}' if error.context_mark is not None
                     else '')
            fault += f' ({error.context}{place})'
        return fault
    return ' '.join(str(error).split())


def _yaml_place(mark: yaml.Mark) -> str:
    return f'line {mark.line + 1}, column {mark.column + 1}'


def params_file_sections(path: pathlib.Path) -> list[tuple[str, dict]]:
    """The (node name, ros__parameters) sections of a parameter file, in file order, as rcl
    reads them: a name may also be nested (`robot: {s4fusion_node: {ros__parameters: ...}}` is
    `robot/s4fusion_node`). SettingsError naming the file for unreadable YAML and what rcl
    refuses: a value where a name or ros__parameters belongs, a name part that is not a ROS name
    or wildcard."""
    try:
        data = path.read_bytes()  # not text in the locale's encoding (ASCII in the C locale)
        document = yaml.safe_load(data)  # as UTF-8, as rcl reads it
    except OSError as error:
        raise SettingsError(f'{path}: cannot read the parameter file: {error}') from None
    except yaml.YAMLError as error:
        raise SettingsError(f'{path}: cannot read the parameter file: '
                            f'{yaml_fault(error, data)}') from None
    sections = []

    def walk(mapping: dict, prefix: str) -> None:
        for key, body in mapping.items():
            name = f'{prefix}/{key}' if prefix else str(key)
            if key == 'ros__parameters' and prefix:
                if not isinstance(body, dict):
                    raise SettingsError(f'{path}: {prefix}: ros__parameters must be a mapping')
                sections.append((prefix, body))
                continue
            if not all(_ROS_NAME_PART.fullmatch(part) for part in
                       (name[1:] if name.startswith('/') else name).split('/')):
                raise SettingsError(f"{path}: '{name}' is not a node name (names and namespaces "
                                    "of letters, digits and '_', not starting with a digit, or "
                                    "the wildcards * and **)")
            if not isinstance(body, dict):
                raise SettingsError(f"{path}: '{name}' has a value where a node name or "
                                    'ros__parameters belongs')
            walk(body, name)

    if isinstance(document, dict):
        walk(document, '')
    return sections


_ROS_NAME_PART = re.compile(r'\*\*?|[A-Za-z_][A-Za-z0-9_]*')


def params_file_arguments(argv: list[str]) -> list[pathlib.Path]:
    """The files of the `--params-file` options in the ROS arguments of a command line."""
    _, ros = split_ros_arguments(argv)
    return [pathlib.Path(path) for option, path in zip(ros, ros[1:])
            if option == '--params-file']


def section_applies(key: str, full_name: str) -> bool:
    """Whether a parameter file's section `key` applies to the node of `full_name`, as rcl
    matches them: `*` one name, `**` any number of them."""
    parts = key.strip('/').split('/')
    pattern = ''.join(r'(/[^/]+)*' if part == '**' else
                      '/' + re.escape(part).replace(r'\*', '[^/]+') for part in parts)
    return re.fullmatch(pattern, full_name) is not None


def _namespace_naming(key: str, node_name: str) -> str | None:
    """The namespace a section names for the node ('' for the root): its own section, or
    `/robot/*` for every node of /robot. None for a section that names none (a wildcard
    namespace, another node, `/*`)."""
    *namespace, name = key.strip('/').split('/')
    names_node = name == node_name or (name == '*' and namespace)
    if not names_node or any('*' in part for part in namespace):
        return None
    return ''.join('/' + part for part in namespace)


def nest(values: dict) -> dict:
    """Turn dotted names into the nested mapping of a parameter file ({'a.b': 1} -> a: b: 1)."""
    tree = {}
    for name, value in values.items():
        *parents, leaf = name.split('.')
        branch = tree
        for parent in parents:
            branch = branch.setdefault(parent, {})
        branch[leaf] = value
    return tree


def _flatten(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(_flatten(value, name + '.'))
        else:
            flat[name] = value
    return flat
