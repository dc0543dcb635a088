"""The ROS-free core's log records on a node's rcl logger."""

import logging

CORE_LOGGER = 's4fusion_ros'  # the core's modules log under it (logging.getLogger(__name__))


class CoreLogsToNode(logging.Handler):
    """Passes the core's Python log records to a node's logger while the node lives.

    The core logs with Python's logging (it runs without ROS too), which rcl neither formats
    nor sends to /rosout: a damaged kernel cache's warning reached the node's stderr as a bare
    line, unseen by rqt_console, a log aggregator and --log-level.
    """

    def __init__(self, ros_logger):
        super().__init__()
        self.ros_logger = ros_logger
        logging.getLogger(CORE_LOGGER).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own convention for a record it cannot format
            self.handleError(record)
            return
        # One call per severity: rclpy refuses a call site that logs at two severities
        # ("Logger severity cannot be changed between calls").
        if record.levelno >= logging.ERROR:
            self.ros_logger.error(message)
        elif record.levelno >= logging.WARNING:
            self.ros_logger.warning(message)
        elif record.levelno >= logging.INFO:
            self.ros_logger.info(message)
        else:
            self.ros_logger.debug(message)

    def close(self) -> None:
        logging.getLogger(CORE_LOGGER).removeHandler(self)
        super().close()
