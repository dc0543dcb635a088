"""Spinning a node until something has happened, for the commands and tests that drive one."""

import time

import rclpy


def spin_until(node, condition, timeout: float, step: float = 0.05) -> bool:
    """Spin `node` until condition() holds or `timeout` seconds pass; return condition()."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        rclpy.spin_once(node, timeout_sec=step)
    return condition()
