"""Record topics into a rosbag2 with rosbags: the `ros2 bag record` the PyPI ROS wheels lack.

Subscriptions are raw (rclpy hands over the CDR bytes), so nothing is decoded or re-encoded and
the bag holds exactly what was received. As with ros2 bag record, the log time of a message is
when it arrived on the recording node's clock (sim time when the node uses it), or, on sim time
before the node's first /clock message (which can come after the first outputs), its header
stamp: the clock's 0 would put decades between the bag's first messages and the rest.
"""

from rclpy.node import Node
from rclpy.qos import QoSProfile
from rclpy.serialization import deserialize_message
from rosbags.interfaces import Qos
from rosbags.rosbag2 import Writer

from ..bagio import RELIABLE_QOS, typestore
from ..messages import stamp_to_ns
from .player import message_class


class TopicRecorder:
    """Writes every message `node` receives on `topics` ({topic: type name of a message with a
    header}) into `writer`."""

    def __init__(self, node: Node, writer: Writer, topics: dict[str, str], qos: QoSProfile,
                 offered: Qos = RELIABLE_QOS):
        """Subscribe (raw) with `qos` and register each topic in the bag with its type and the
        QoS its publisher offers (`offered`), as a replay should offer it."""
        self.node = node
        self.writer = writer
        self.counts = dict.fromkeys(topics, 0)
        self.classes = {topic: message_class(msgtype) for topic, msgtype in topics.items()}
        self.subscriptions = []
        for topic, msgtype in topics.items():
            connection = writer.add_connection(topic, msgtype, typestore=typestore(),
                                               offered_qos_profiles=[offered])
            self.subscriptions.append(node.create_subscription(
                self.classes[topic], topic,
                lambda data, t=topic, c=connection: self._write(t, c, data), qos, raw=True))

    def _write(self, topic: str, connection, data: bytes) -> None:
        log_time = self.node.get_clock().now().nanoseconds
        if not log_time:  # sim time before the first /clock
            log_time = stamp_to_ns(deserialize_message(data, self.classes[topic]).header.stamp)
        self.writer.write(connection, log_time, data)
        self.counts[topic] += 1
