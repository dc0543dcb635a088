"""Command-line helpers the console tools share: arguments, exit codes, child processes (no ROS,
no torch)."""

import argparse
import signal
import subprocess
import sys


def parse_size(text: str, minimum: int = 1) -> tuple[int, int]:
    """'WxH' -> (W, H), width first as cameras name their sizes; each at least `minimum`."""
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got '{text}'") from None
    if width < minimum or height < minimum:
        raise argparse.ArgumentTypeError(f"sizes must be at least {minimum}, got '{text}'")
    return width, height


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt, so a tool cleans up as for Ctrl-C.

    `kill` and service managers send SIGTERM; a shell starts background jobs with SIGINT ignored
    and children inherit that, so a supervisor's SIGINT (`interrupt`) would go unheard.
    """
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)


def run_command(prog: str, command, errors: tuple, interrupted: str = 'interrupted') -> int:
    """Return command()'s exit code; one of `errors` prints one line (1), Ctrl-C gives 130."""
    try:
        return command()
    except errors as error:
        print(f'{prog}: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'\n{prog}: {interrupted}', file=sys.stderr)
        return 130


def interrupt(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """Ctrl-C a child process (SIGINT, as ros2 launch stops nodes), kill it after `timeout`
    seconds; return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
