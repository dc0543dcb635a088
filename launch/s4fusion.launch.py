"""Start s4fusion_node with its parameters file, topic remappings and a large-data transport.

`device`, `weights` and `use_sim_time` override the parameters file only when given: left empty,
the file's values (or the node's defaults) stand.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory('s4fusion_ros'), 'config',
                                  's4fusion.yaml')
    arguments = [
        DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
        DeclareLaunchArgument('thermal_topic', default_value='thermal/image_raw',
                              description='thermal sensor_msgs/Image topic'),
        DeclareLaunchArgument('visible_topic', default_value='visible/image_raw',
                              description='visible (RGB) sensor_msgs/Image topic'),
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='node parameters (YAML)'),
        DeclareLaunchArgument('device', default_value='',
                              description='auto, cpu, cuda or cuda:N; empty: the params file\'s'),
        DeclareLaunchArgument('weights', default_value='',
                              description='checkpoint (.safetensors); empty: the params file\'s '
                                          '(shipped weights by default)'),
        DeclareLaunchArgument('use_sim_time', default_value='', choices=['', 'true', 'false'],
                              description='use /clock (rosbag replay); empty: the params file\'s'),
        DeclareLaunchArgument('log_level', default_value='info',
                              choices=['debug', 'info', 'warn', 'error', 'fatal'],
                              description='node log level'),
    ]
    node = OpaqueFunction(function=_node)
    return LaunchDescription([
        # Large images over Fast DDS: shared memory / TCP instead of fragmented UDP (about 3x lower
        # latency measured for 640x512 and 1280x720 images); see README "Transport and QoS".
        # A value the user already set is kept.
        SetEnvironmentVariable('FASTDDS_BUILTIN_TRANSPORTS',
                               EnvironmentVariable('FASTDDS_BUILTIN_TRANSPORTS',
                                                   default_value='LARGE_DATA')),
        *arguments,
        node,
    ])


def _node(context):
    """The node, with the launch arguments that were given on top of the parameters file."""
    overrides = {}
    for argument, name in (('device', 'device'), ('weights', 'model.weights')):
        value = LaunchConfiguration(argument).perform(context)
        if value:
            overrides[name] = value
    use_sim_time = LaunchConfiguration('use_sim_time').perform(context)
    if use_sim_time:
        overrides['use_sim_time'] = use_sim_time == 'true'
    return [Node(
        package='s4fusion_ros',
        executable='s4fusion_node',
        name='s4fusion_node',
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        parameters=[LaunchConfiguration('params_file'), *([overrides] if overrides else [])],
        remappings=[
            ('thermal/image_raw', LaunchConfiguration('thermal_topic')),
            ('visible/image_raw', LaunchConfiguration('visible_topic')),
            ('thermal/image_raw/compressed',
             [LaunchConfiguration('thermal_topic'), '/compressed']),
            ('visible/image_raw/compressed',
             [LaunchConfiguration('visible_topic'), '/compressed']),
        ],
        ros_arguments=['--log-level', LaunchConfiguration('log_level')],
    )]
