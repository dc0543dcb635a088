"""The launch file's arguments as a robot's bringup passes them: included from a parent launch
file, in any case, mistakes refused before anything starts, and the user's transport kept.

Runs the real launch service where a ROS 2 distro provides launch and launch_ros (`colcon test`);
those have no PyPI wheels, so on a machine without a distro this module is skipped.
"""

import os

import pytest
import yaml

pytest.importorskip('launch_ros', reason='launch_ros needs a ROS 2 distro')

# Guarded above: PyPI's unrelated `launch` must not satisfy these imports.
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from launch import LaunchDescription, LaunchService  # noqa: E402
from launch.actions import (EmitEvent, ExecuteProcess, IncludeLaunchDescription,  # noqa: E402
                            RegisterEventHandler, SetLaunchConfiguration, TimerAction)
from launch.event_handlers import OnProcessStart  # noqa: E402
from launch.events import Shutdown  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

LAUNCH_FILE = os.path.join(get_package_share_directory('s4fusion_ros'), 'launch',
                           's4fusion.launch.py')


def bringup(arguments: dict, inherited: dict = {}) -> tuple[int, dict]:
    """Include the launch file as a parent would, with another process started after it.

    Returns launch's exit code and, per started process (by name), its command line, its
    environment and the parameters launch_ros wrote for it; the launch stops once both started.
    """
    started = {}

    def record(event, context):
        environment = dict(event.env if event.env is not None else os.environ)
        parameters = {}
        for previous, argument in zip(event.cmd, event.cmd[1:]):
            if previous == '--params-file':
                with open(argument) as file:
                    parameters.update(next(iter(yaml.safe_load(file).values()))['ros__parameters'])
        started[event.action.name.rsplit('-', 1)[0]] = (event.cmd, environment, parameters)
        if len(started) == 2:  # past the node's first statement, so its stop is a clean one
            return TimerAction(period=1.0, actions=[EmitEvent(event=Shutdown(reason='done'))])

    description = LaunchDescription([
        *(SetLaunchConfiguration(name, value) for name, value in inherited.items()),
        RegisterEventHandler(OnProcessStart(on_start=record)),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(LAUNCH_FILE),
                                 launch_arguments=arguments.items()),
        ExecuteProcess(cmd=['true'], name='other_node'),
    ])
    service = LaunchService()
    service.include_launch_description(description)
    return service.run(), started


def test_an_including_bringup_passes_its_values_and_no_transport(monkeypatch):
    monkeypatch.delenv('FASTDDS_BUILTIN_TRANSPORTS', raising=False)
    code, started = bringup({'device': 'cpu', 'log_level': 'WARN',
                             'input_reliability': 'Best_Effort'},
                            inherited={'use_sim_time': 'True'})
    assert code == 0 and set(started) == {'s4fusion_node', 'other_node'}, started
    command, environment, parameters = started['s4fusion_node']
    assert command[command.index('--log-level') + 1] == 'warn'
    assert parameters['use_sim_time'] is True and parameters['device'] == 'cpu'
    assert parameters['qos.input.reliability'] == 'best_effort'
    # The node loads the package's Fast DDS profile itself; the launch file used to set
    # LARGE_DATA, which lost most pairs a bag player published once a second.
    for name in ('s4fusion_node', 'other_node'):
        assert 'FASTDDS_BUILTIN_TRANSPORTS' not in started[name][1], name


def test_a_node_name_sets_two_fusion_nodes_apart_in_one_namespace():
    # Without it two includes in one namespace made two /robot1/s4fusion_node on the same topics.
    code, started = bringup({'device': 'cpu', 'namespace': 'robot1', 'node_name': 'fusion_left',
                             'thermal_topic': '/left/lwir'})
    assert code == 0
    command = started['s4fusion_node'][0]
    for remap in ('__node:=fusion_left', '__ns:=/robot1', 'thermal/image_raw:=/left/lwir'):
        assert command[command.index(remap) - 1] == '-r', command
    # The node puts the transports' topics under the remapped base topic itself.
    assert not any('/compressed' in argument for argument in command), command


def test_a_transport_the_user_chose_is_kept(monkeypatch):
    # The test process exported the package's profile, which would outvote the transport.
    for name in ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('FASTDDS_BUILTIN_TRANSPORTS', 'DEFAULT')
    code, started = bringup({'device': 'cpu'})
    assert code == 0
    environment = started['s4fusion_node'][1]
    assert environment['FASTDDS_BUILTIN_TRANSPORTS'] == 'DEFAULT'
    assert 'FASTDDS_DEFAULT_PROFILES_FILE' not in environment


@pytest.mark.parametrize('arguments', [
    {'params_file': '/nonexistent/s4fusion.yaml'},  # launch_ros would start on the defaults
    {'use_sim_time': 'maybe'},
    {'log_level': 'loud'},
    {'input_reliability': 'sometimes'},
    {'thermal_topic': ''},  # rcl refused the remap rule only as the node started
    {'visible_topic': 'front/'},
    {'node_name': 'fusion-left'},
])
def test_a_mistaken_argument_stops_the_launch_before_the_node_starts(arguments):
    code, started = bringup(arguments)
    assert code != 0 and 's4fusion_node' not in started
