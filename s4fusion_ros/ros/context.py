"""rclpy's start in the package's processes."""

import rclpy
from rclpy.impl.implementation_singleton import rclpy_implementation


class LogFolderError(RuntimeError):
    """rcl could not make the folder of its log file."""


def init_rclpy(**options) -> None:
    """rclpy.init(**options); where rcl cannot make its log folder (a service's user with HOME
    unset or a read-only home) LogFolderError says how to give it one, where rcl says only
    what failed ('rcutils_expand_user failed', 'Failed to create log directory ...: 13')."""
    try:
        rclpy.init(**options)
    except rclpy_implementation.RCLError as error:
        if 'failed to initialize logging' not in str(error):
            raise
        raise LogFolderError(
            f'{error}; rcl writes its log files into ROS_LOG_DIR, else ROS_HOME/log, else '
            '~/.ros/log (HOME): set ROS_LOG_DIR to a folder this user may write') from None
