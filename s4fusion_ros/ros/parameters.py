"""rclpy glue for the node's parameters: descriptors and set-parameters results.

The table itself (names, defaults, checks) is ROS-free in s4fusion_ros/settings.py, so the offline
bag tool reads the same parameters without rclpy.
"""

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rcl_interfaces.msg import SetParametersResult
from rcl_interfaces.srv import SetParameters, SetParametersAtomically
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..settings import SPECS, Spec, as_declared, check_types, check_update


def descriptor(name: str, spec: Spec) -> ParameterDescriptor:
    """Build a ParameterDescriptor with the description, range or choices (as the additional
    constraints, which `ros2 param describe` shows) and read-only flag of a spec."""
    result = ParameterDescriptor(name=name, description=spec.description,
                                 read_only=not spec.runtime)
    if spec.choices:
        result.additional_constraints = f"one of: {', '.join(spec.choices)}"
    if spec.range is not None:
        low, high = spec.range
        if isinstance(spec.default, int) and not isinstance(spec.default, bool):
            result.integer_range = [IntegerRange(from_value=low, to_value=high, step=0)]
        else:
            result.floating_point_range = [FloatingPointRange(from_value=float(low),
                                                              to_value=float(high), step=0.0)]
    return result


def as_declared_types(given: list[Parameter]) -> list[Parameter]:
    """The parameters, integers given for a decimal one as decimals (`settings.as_declared`)."""
    def declared(parameter: Parameter) -> Parameter:
        value = as_declared(parameter.name, parameter.value)
        return parameter if value is parameter.value else Parameter(parameter.name, value=value)
    return [declared(parameter) for parameter in given]


def validate_update(current: dict, updates: dict) -> SetParametersResult:
    """Check parameter changes against the current values as a whole (settings.check_update)."""
    reason = check_update(current, updates)
    return SetParametersResult(successful=not reason, reason=reason)


# A ParameterValue's type as rcl_interfaces defines them (PARAMETER_NOT_SET 0 to
# PARAMETER_STRING_ARRAY 9): rclpy's set-parameters services raise on any other, in the executor.
_PARAMETER_TYPES = frozenset(kind.value for kind in Parameter.Type)
SET_PARAMETERS_SERVICES = (SetParameters, SetParametersAtomically)


def request_fault(parameter, declared=lambda name: True) -> str:
    """Why rclpy's set-parameters services cannot take this rcl_interfaces/Parameter of a
    request ('' if they can): a value type it does not know (rclpy raises ValueError in the
    service callback, which stops the node's spin), an empty name (rclpy's check for
    undeclared parameters lets '' through and declares it), a name `declared` says the node
    does not have (rclpy refuses it naming none: "Invalid access to undeclared parameter(s):
    []", its check consuming the names it then lists), or no value, which deletes (`ros2 param
    delete`; rclpy's "Static parameter cannot be undeclared" named none either)."""
    if parameter.value.type not in _PARAMETER_TYPES:
        return (f'{parameter.name!r}: unknown parameter type {parameter.value.type} '
                f'(rcl_interfaces types are {min(_PARAMETER_TYPES)} to {max(_PARAMETER_TYPES)})')
    if not parameter.name:
        return 'a parameter with an empty name'
    if not declared(parameter.name):
        return (f'{parameter.name!r}: no such parameter on this node (`ros2 param list` shows '
                'its parameters)')
    if parameter.value.type == Parameter.Type.NOT_SET.value:
        return (f'{parameter.name!r}: the node\'s parameters cannot be deleted (`ros2 param '
                'set` changes one)')
    return type_fault(parameter)


def type_fault(parameter) -> str:
    """Why the value a request gives a run-time parameter has the wrong type, in this package's
    words (`settings.check_types`, as at start-up: "sync.slop: expected double, got 'fast'"),
    an integer for a decimal taken as that decimal; '' if it has the right one. rclpy's own
    reason named neither the parameter nor the types ("Wrong parameter type, expected '3' got
    '4'"). Read-only ones are left to rclpy, which refuses them as read-only, by name."""
    spec = SPECS.get(parameter.name)
    if spec is None or not spec.runtime:
        return ''
    value = parameter_value_to_python(parameter.value)
    return check_types({parameter.name: as_declared(parameter.name, value)})


def guarded_set_parameters(handle, srv_type, refused, declared=lambda name: True):
    """rclpy's set-parameters service callback `handle` (of SetParameters or
    SetParametersAtomically, `srv_type`), answering a parameter it cannot take (`request_fault`
    with `declared`, or an error it raises) with a failed result instead of raising, which would
    stop the node; `refused(reason)` is called with each such reason."""
    def fail(reason: str) -> SetParametersResult:
        refused(reason)
        return SetParametersResult(successful=False, reason=reason)

    def call(request, response):
        try:
            return handle(request, response)
        except Exception as error:  # noqa: BLE001 - raised in the executor, it stops the node
            return error

    def callback(request, response):
        faults = [request_fault(parameter, declared) for parameter in request.parameters]
        if srv_type is SetParametersAtomically:  # all or none
            fault = next(filter(None, faults), '')
            if not fault:
                answer = call(request, response)
                if not isinstance(answer, Exception):
                    return answer
                fault = f'refused: {answer!r}'
            response.result = fail(fault)
            return response
        for parameter, fault in zip(request.parameters, faults):  # each on its own
            if fault:
                response.results.append(fail(fault))
                continue
            answer = call(SetParameters.Request(parameters=[parameter]), SetParameters.Response())
            response.results.extend(
                [fail(f'{parameter.name!r}: refused: {answer!r}')]
                if isinstance(answer, Exception) else answer.results)
        return response
    return callback


def qos_profile(reliability: str, depth: int) -> QoSProfile:
    """The QoS of a qos.*.reliability / qos.*.depth pair of parameters (keep last `depth`)."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth,
        reliability=(ReliabilityPolicy.RELIABLE if reliability == 'reliable'
                     else ReliabilityPolicy.BEST_EFFORT))


def direction_qos(values: dict, direction: str) -> QoSProfile:
    """The profile of the qos.<direction>.* parameters ('input' or 'output') in `values`, new for
    each topic: rclpy applies a topic's qos_overrides to the very profile it is given."""
    return qos_profile(values[f'qos.{direction}.reliability'], values[f'qos.{direction}.depth'])


# The policies whose stricter value a subscription can ask of publishers that offer less. Not
# deadlines and leases: the graph reports unset ones as finite, so rclpy's whole-profile check
# (qos_check_compatible) finds mismatches there where there are none.
STRICTER = {'reliability': ReliabilityPolicy.RELIABLE,
            'durability': DurabilityPolicy.TRANSIENT_LOCAL}


def kept_apart(offered: QoSProfile, requested: QoSProfile) -> list[str]:
    """The policies ('reliability', 'durability') by which a publisher offering `offered`
    never reaches a subscription requesting `requested`: a reliable subscription hears no
    best-effort publisher, a transient-local one no volatile one."""
    return [name for name, strict in STRICTER.items()
            if getattr(requested, name) == strict and getattr(offered, name) != strict]
