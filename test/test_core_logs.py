"""The core's Python log records on a node's rcl logger, as /rosout carries them."""

import logging

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.logging import LoggingSeverity  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

from s4fusion_ros.ros.logs import CORE_LOGGER, CoreLogsToNode  # noqa: E402
from s4fusion_ros.ros.spin import spin_until  # noqa: E402

pytestmark = pytest.mark.ros


def test_core_records_reach_rosout_at_their_severity_until_the_handler_closes(ros_context,
                                                                              monkeypatch):
    # Only the kernel cache's warnings were checked: an error read as a warning, an info as a
    # debug line, a record logging cannot format raising into the core, or a closed handler
    # still passing records on would all have gone unnoticed.
    node = rclpy.create_node('core_logs_node')
    listener = rclpy.create_node('core_logs_listener')
    heard = []
    listener.create_subscription(  # as /rosout offers it: what was logged before is kept
        Log, '/rosout', lambda msg: heard.append(msg) if msg.name == node.get_name() else None,
        QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                   durability=DurabilityPolicy.TRANSIENT_LOCAL))
    node.get_logger().set_level(LoggingSeverity.DEBUG)
    core = logging.getLogger(f'{CORE_LOGGER}.test_core_logs')
    core.setLevel(logging.DEBUG)
    # pytest's own handler fails a test on a record it cannot format; this one must not.
    monkeypatch.setattr(logging.getLogger(CORE_LOGGER), 'propagate', False)
    handler = CoreLogsToNode(node.get_logger())
    try:
        core.critical('critical')
        core.error('error')
        core.warning('warning')
        core.info('info')
        core.debug('debug')
        core.warning('%d kernels', 'two')  # logging's convention: a report on stderr, no raise
        try:
            raise OSError('disk full')
        except OSError:
            core.warning('not cached', exc_info=True)
        handler.close()
        core.error('after close')
        node.get_logger().info('end')  # published after all the above
        assert spin_until(listener, lambda: any(msg.msg == 'end' for msg in heard), 60), heard
    finally:
        handler.close()
        core.setLevel(logging.NOTSET)
        listener.destroy_node()
        node.destroy_node()
    said = [(msg.level, msg.msg) for msg in heard]
    assert said[:5] == [(Log.ERROR, 'critical'), (Log.ERROR, 'error'), (Log.WARN, 'warning'),
                        (Log.INFO, 'info'), (Log.DEBUG, 'debug')], said
    (level, text), end = said[5:]
    assert level == Log.WARN and text.startswith('not cached\nTraceback (most recent call') \
        and text.endswith('OSError: disk full'), said
    assert end == (Log.INFO, 'end'), said
    assert handler not in logging.getLogger(CORE_LOGGER).handlers
