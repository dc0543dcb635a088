"""Start s4fusion_node with its parameters file and topic remappings (the node loads the package's
Fast DDS profile itself: README, "Transport and QoS").

`device`, `weights`, `use_sim_time` and `input_reliability` override the parameters file only
when given: left empty, the file's values (or the node's defaults) stand. `use_sim_time`,
`log_level` and `input_reliability` take any case ('True', 'INFO'), as parent launch files often
pass them.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from rclpy.validate_node_name import validate_node_name
from rclpy.validate_topic_name import validate_topic_name

LOG_LEVELS = ('debug', 'info', 'warn', 'error', 'fatal')
# settings.RELIABILITIES, written out: the launch process need not import the package (cv2, ...).
RELIABILITIES = ('reliable', 'best_effort')


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory('s4fusion_ros'), 'config',
                                  's4fusion.yaml')
    arguments = [
        DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
        DeclareLaunchArgument('node_name', default_value='s4fusion_node',
                              description='node name (two fusion nodes in one namespace, e.g. '
                                          'fusion_left and fusion_right; a params file section '
                                          'named for the node takes this name)'),
        DeclareLaunchArgument('thermal_topic', default_value='thermal/image_raw',
                              description='thermal sensor_msgs/Image topic (its /compressed, '
                                          '/compressedDepth and /zstd with thermal.transport)'),
        DeclareLaunchArgument('visible_topic', default_value='visible/image_raw',
                              description='visible (RGB) sensor_msgs/Image topic (its /compressed '
                                          'and /zstd with visible.transport)'),
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='node parameters (YAML)'),
        DeclareLaunchArgument('device', default_value='',
                              description='auto, cpu, cuda or cuda:N; empty: the params file\'s'),
        DeclareLaunchArgument('weights', default_value='',
                              description='checkpoint (.safetensors); empty: the params file\'s '
                                          '(shipped weights by default)'),
        # No `choices`: launch checks them case-sensitively, also on a value inherited from an
        # including launch file, and 'True' there would abort the whole bringup.
        DeclareLaunchArgument('use_sim_time', default_value='',
                              description='true or false: use /clock (rosbag replay); empty: the '
                                          'params file\'s'),
        DeclareLaunchArgument('input_reliability', default_value='',
                              description='reliable or best_effort (to receive from a camera '
                                          'driver publishing best effort); empty: the params '
                                          'file\'s'),
        DeclareLaunchArgument('log_level', default_value='info',
                              description=f'node log level: {", ".join(LOG_LEVELS)}'),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_node)])


def _node(context):
    """The node, with the launch arguments that were given on top of the parameters file."""
    params_file = LaunchConfiguration('params_file').perform(context)
    if not os.path.isfile(params_file):  # launch_ros would only log it and start on defaults
        raise FileNotFoundError(f"params_file '{params_file}' is not a file")
    # Else rcl refuses the remap rules only as the node starts.
    validate_node_name(LaunchConfiguration('node_name').perform(context))
    for argument in ('thermal_topic', 'visible_topic'):
        validate_topic_name(LaunchConfiguration(argument).perform(context))
    overrides = {}
    for argument, name in (('device', 'device'), ('weights', 'model.weights')):
        value = LaunchConfiguration(argument).perform(context)
        if value:
            overrides[name] = value
    input_reliability = LaunchConfiguration('input_reliability').perform(context).lower()
    if input_reliability not in ('', *RELIABILITIES):
        raise ValueError(f"input_reliability must be {' or '.join(RELIABILITIES)} or empty, "
                         f"got '{input_reliability}'")
    if input_reliability:
        overrides['qos.input.reliability'] = input_reliability
    use_sim_time = LaunchConfiguration('use_sim_time').perform(context).lower()
    if use_sim_time not in ('', 'true', 'false'):
        raise ValueError(f"use_sim_time must be true, false or empty, got '{use_sim_time}'")
    if use_sim_time:
        overrides['use_sim_time'] = use_sim_time == 'true'
    log_level = LaunchConfiguration('log_level').perform(context).lower()
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got '{log_level}'")
    # The node sets up its own Fast DDS profile (README, "Transport and QoS").
    return [Node(
        package='s4fusion_ros',
        executable='s4fusion_node',
        name=LaunchConfiguration('node_name'),
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        parameters=[params_file, *([overrides] if overrides else [])],
        # The node puts a transport's topic (/compressed, ...) under its remapped base topic.
        remappings=[
            ('thermal/image_raw', LaunchConfiguration('thermal_topic')),
            ('visible/image_raw', LaunchConfiguration('visible_topic')),
        ],
        ros_arguments=['--log-level', log_level],
    )]
