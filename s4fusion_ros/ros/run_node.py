"""Console entry point of s4fusion_node: a stop signal at any moment is a clean exit (code 0).

This module imports nothing heavy, so its signal handlers are in place before torch, numba and
rclpy load (seconds): `ros2 launch` may send SIGINT while the node is still starting. Ctrl-C on
`ros2 launch` signals the whole process group, so the node gets the terminal's SIGINT and then
launch's (and SIGTERM if it is slow to stop): only the first signal interrupts, any later one is
noted and ignored, so it cannot turn a clean stop into a traceback.
"""

import gc
import os
import signal
import sys
import traceback

from ..cli import (STOP_SIGNALS, address_space_note, ignore_stop_signals, split_ros_arguments,
                   write_nowhere)
from ..entry_points import configure_process

PROG = 's4fusion_node'
USAGE = f"""usage: {PROG} [-h] [--ros-args ...]

The S4Fusion node: pairs thermal/image_raw with visible/image_raw by header stamp, fuses each
pair and publishes ~/fused and ~/saliency (sensor_msgs/Image) and /diagnostics. It takes ROS
arguments only, after --ros-args:

  {PROG} --ros-args --params-file config/s4fusion.yaml -p device:=cpu -r __ns:=/robot
  ros2 launch s4fusion_ros s4fusion.launch.py

Parameters, topics and QoS: config/s4fusion.yaml and docs/node.md of the package."""


def command_line_help(argv: list[str]) -> str | None:
    """What to print instead of starting: the usage for -h/--help outside the ROS arguments, a
    note for any other argument there (rclpy would ignore it silently); None when there is none.
    """
    own, _ = split_ros_arguments(argv)
    if {'-h', '--help'} & set(own):
        return USAGE
    if own:
        return f'{PROG}: unrecognized arguments: {" ".join(own)}\n{USAGE}'
    return None


class StopSignals:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; after that, or once stopping began, none.

    rclpy's own handlers (installed at rclpy.init) wake the executor and then call these.
    """

    def __init__(self):
        self.stopping = False
        self.received = False

    def install(self) -> None:
        """Handle SIGINT and SIGTERM with this object, and the interrupts Python cannot raise."""
        for number in STOP_SIGNALS:
            signal.signal(number, self)
        sys.unraisablehook = self.unraisable

    def __call__(self, number, frame) -> None:
        """Handle a stop signal (Python calls this in the main thread)."""
        if self.stopping:
            print(f'{PROG}: {signal.Signals(number).name} while stopping: ignored, still '
                  'stopping', file=sys.stderr, flush=True)
            return
        self.stopping = self.received = True
        raise KeyboardInterrupt

    def unraisable(self, unraisable) -> None:
        """Drop what a stop signal's KeyboardInterrupt leaves behind where it cannot propagate.

        The handler can run inside a callback from C (numba loads its cached kernels through
        llvmlite's ctypes callbacks), where Python prints the exception with a traceback and
        drops it. `raise_if_received` then stops at the end of that start-up step instead.
        The interrupt can also land inside rclpy's Task constructor (the executor builds one for
        every callback): the half-built Task's ``__del__`` then misses an attribute, which
        Python prints with a traceback as the Task is collected.
        """
        task = sys.modules.get('rclpy.task')  # imported by then, if a Task was built
        half_built_task = task is not None and isinstance(
            getattr(unraisable.exc_value, 'obj', None), task.Future)
        after_stop = self.received and (
            issubclass(unraisable.exc_type, KeyboardInterrupt)
            or (issubclass(unraisable.exc_type, AttributeError) and half_built_task))
        if not after_stop:
            sys.__unraisablehook__(unraisable)

    def raise_if_received(self) -> None:
        """Stop here if a stop signal came whose KeyboardInterrupt was dropped."""
        if self.received:
            raise KeyboardInterrupt


def print_usage(text: str, stream) -> None:
    """Print the usage or a usage error; a reader that left (`--help | head -1`) is no error,
    as argparse's own help treats it."""
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        write_nowhere(stream)


def main(args=None) -> int:
    """Start the node and spin until a stop signal or a ROS shutdown; return the exit code."""
    text = command_line_help(sys.argv[1:] if args is None else list(args[1:]))
    if text is not None:
        asked = text is USAGE
        print_usage(text, sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    stop = StopSignals()
    node = None
    code, worker_alive = 0, False
    try:
        stop.install()  # inside the try: a signal right after it must land in its except
        configure_process()
        import rclpy
        from rclpy.executors import ExternalShutdownException
        from rclpy.impl.implementation_singleton import rclpy_implementation

        from .context import init_rclpy
        from .node import S4FusionNode
        stop.raise_if_received()
        try:
            init_rclpy(args=args)
        except rclpy_implementation.UnknownROSArgsError as error:  # its text: the list alone
            raise ValueError(f'unknown ROS arguments (after --ros-args): {error}') from None
        try:
            node = S4FusionNode(command_line=sys.argv if args is None else args)
            stop.raise_if_received()
            rclpy.spin(node)
        except ExternalShutdownException:
            pass
        finally:
            stop.stopping = True  # from here on a signal must not interrupt the clean-up
            if node is not None:
                node.destroy_node()  # waits briefly for an inference in progress
                worker_alive = node.worker.alive
                node.get_logger().info(f'stopped: {node.run_summary()}')
            rclpy.try_shutdown()
    except KeyboardInterrupt:
        pass
    except Exception as error:  # noqa: BLE001 - start-up errors get one clear line, no traceback
        # A signal during an import can surface as that import's error (rclpy's C extension
        # reports an ImportError): after a stop signal, any error is part of stopping.
        if not stop.received:
            # One raised while spinning is a fault of the running node: its traceback says where.
            print(f'{PROG}: {error}{address_space_note()}' if node is None
                  else f'{PROG}: stopped by an error:\n'
                  + ''.join(traceback.format_exception(error)).rstrip(), file=sys.stderr)
            code = 1
    # Python's exit resets its handlers to the default, which ends the process by the signal
    # (exit code -2 or -15): during the exit a late signal is ignored instead.
    ignore_stop_signals()
    if worker_alive:
        # An inference cannot be interrupted, and finalizing the interpreter under a thread
        # inside torch aborts ('terminate called without an active exception'). ROS is shut
        # down, so end the process here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # The exit-time garbage collection of torch's objects takes most of a second on a busy CPU;
    # the process frees them anyway, so a signal ends the node within a second.
    gc.freeze()
    return code


if __name__ == '__main__':
    sys.exit(main())
