"""rclpy glue for the node's parameters: descriptors and set-parameters results.

The table itself (names, defaults, checks) is ROS-free in s4fusion_ros/settings.py, so the offline
bag tool reads the same parameters without rclpy.
"""

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rcl_interfaces.msg import SetParametersResult
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..settings import Spec, check_update


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


def validate_update(current: dict, updates: dict) -> SetParametersResult:
    """Check parameter changes against the current values as a whole (settings.check_update)."""
    reason = check_update(current, updates)
    return SetParametersResult(successful=not reason, reason=reason)


def qos_profile(reliability: str, depth: int) -> QoSProfile:
    """The QoS of a qos.*.reliability / qos.*.depth pair of parameters (keep last `depth`)."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth,
        reliability=(ReliabilityPolicy.RELIABLE if reliability == 'reliable'
                     else ReliabilityPolicy.BEST_EFFORT))
