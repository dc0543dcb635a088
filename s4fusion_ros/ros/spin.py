"""Spinning a node until something has happened, for the commands and tests that drive one."""

import time

import rclpy

from ..cli import interrupts_held


def spin_until(node, condition, timeout: float, step: float = 0.05) -> bool:
    """Spin `node` until condition() holds or `timeout` seconds pass; return condition().

    A Ctrl-C is raised between spins, not inside rclpy's executor: there it can leave a task
    half made, whose finalizer complains as the process exits (demo, under load)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        with interrupts_held():
            rclpy.spin_once(node, timeout_sec=step)
    return condition()
