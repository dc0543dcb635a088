"""Stop signals at any moment of the node's life end it cleanly: exit code 0, no traceback.

`ros2 launch` sends SIGINT (then SIGTERM) and treats any other exit code as a crash; Ctrl-C on
`ros2 launch` signals the node twice (the terminal's SIGINT, then launch's). The node runs as its
own process from its console entry point, as launch starts it.
"""

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from paths import executable
from ros_harness import (NODE_EXECUTABLE, Probe, image_message, node_log, running_node,
                         wait_for_log)
from support import address_space_limit

pytestmark = pytest.mark.ros

PARAMS = {'device': 'cpu', 'inference_size': [160, 120]}
STOP_TIMEOUT_S = 30


def stopped_cleanly(proc, *signals, gap: float = 0.0) -> str:
    """Send the signals (`gap` s apart) and return the node's log once it has exited with 0."""
    for number in signals:
        proc.send_signal(number)
        time.sleep(gap)
    code = proc.wait(timeout=STOP_TIMEOUT_S)
    log = node_log(proc)
    assert code == 0, f'exit code {code}\n{log}'
    assert 'Traceback' not in log, log
    return log


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its caught-signal mask in /proc)."""
    with open(f'/proc/{pid}/status') as status:
        caught = next(line for line in status if line.startswith('SigCgt:'))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize('number', [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize('delay', [0.0, 1.0])
def test_a_signal_while_python_loads_is_a_clean_exit(number, delay):
    """Right after the entry point's first statement torch, numba and rclpy are still to load.

    Before that statement (the interpreter's own start, about 0.1 s) the default action of SIGTERM
    applies; from it on, a stop signal is a clean exit.
    """
    with running_node(PARAMS) as proc:
        end = time.monotonic() + 60
        while not catches_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < end, node_log(proc)
            time.sleep(0.005)
        time.sleep(delay)
        if not delay:
            assert 'loading the model' not in node_log(proc), 'too late: the imports were done'
        stopped_cleanly(proc, number)


@pytest.mark.parametrize('number', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_model_loads_is_a_clean_exit(number, tmp_path, monkeypatch):
    """After its parameters the node loads and warms up the model (seconds) before subscribing."""
    # A cold numba kernel cache: the kernels compile (15-30 s) where a warm one loads them in
    # 0.6 s, within which a test held up on a loaded machine found the model warmed up.
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(tmp_path / 'numba'))
    with running_node(PARAMS) as proc:
        end = time.monotonic() + 60
        while 'loading the model' not in node_log(proc) and time.monotonic() < end:
            assert proc.poll() is None, node_log(proc)
            time.sleep(0.02)
        proc.send_signal(number)
        log_at_signal = node_log(proc)
        stopped_cleanly(proc)
    assert 'loading the model' in log_at_signal, log_at_signal
    assert 'model warmed up' not in log_at_signal, 'the model was ready: nothing was tested'


@pytest.mark.parametrize('signals', [(signal.SIGINT, signal.SIGINT),
                                     (signal.SIGINT, signal.SIGTERM),
                                     (signal.SIGINT, signal.SIGINT, signal.SIGTERM)])
def test_more_signals_during_shutdown_do_not_break_it(ros_context, signals):
    """Ctrl-C on ros2 launch: SIGINT from the terminal, SIGINT from launch, maybe SIGTERM."""
    probe = Probe('shutdown_probe')
    # Full-size inference of 1280x960 (about 1 s a pair here; at 640x480 a quiet machine's
    # 0.2 s could end before the second signal) and a queue that never runs dry: the node stops
    # with an inference in progress, which it waits for, so the later signals arrive then.
    thermal = np.random.default_rng(0).integers(0, 65535, (960, 1280), dtype=np.uint16)
    visible = np.full((960, 1280, 3), 90, np.uint8)
    with running_node({'device': 'cpu', 'inference.queue_size': 100}) as proc:
        probe.wait_for_node(proc)
        stamp = probe.get_clock().now().nanoseconds
        end = time.monotonic() + 120
        while len(probe.fused) < 2:
            probe.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'thermal'))
            probe.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
            probe.spin_for(0.1)
            stamp += 100_000_000
            assert proc.poll() is None and time.monotonic() < end, node_log(proc)
        log = stopped_cleanly(proc, *signals, gap=0.05)
    probe.destroy_node()
    assert 'while stopping: ignored' in log, log
    # Its last line sums up the run: every pair fused, dropped (the queue it stopped with too)
    # or cut short by the stop (in inference, which it waits for briefly).
    fused, paired, dropped, thermal, visible = (int(n) for n in re.search(
        r'stopped: (\d+) pairs fused of (\d+) paired \((\d+) dropped while inference was '
        r'busy\) from (\d+) thermal \+ (\d+) visible frames \(unpaired: ', log).groups())
    cut = re.search(r'left at the stop: (\d+) pairs? cut short', log)
    cut = int(cut.group(1)) if cut else 0
    # A pair cut short may have been published as the node stopped, before it was counted.
    assert fused + cut >= len(probe.fused), log
    assert fused + dropped + cut == paired, log
    assert paired <= min(thermal, visible), log
    stopped = log[log.rindex('stopped: '):].splitlines()[0]
    assert 'errors' not in stopped, stopped  # none: not listed as 0


def test_a_start_up_error_is_one_line_and_exit_code_1():
    """What is not a stop signal still fails: an unusable parameter value."""
    with running_node({**PARAMS, 'model.preset': 'huge'}) as proc:
        code = proc.wait(timeout=120)
    log = node_log(proc)
    assert code == 1, log
    assert 'Traceback' not in log and 'model.preset' in log, log


def test_a_start_under_too_small_an_address_space_limit_names_the_limit():
    # Under ulimit -v (systemd's LimitAS=) a few hundred MB above what torch, OpenCV and numba
    # take, the node ended on "Could not find/load shared object file 'libllvmlite.so' ... the
    # permissions are incorrect" (numba's LLVM not loading); lower, on oneDNN's "could not
    # create a primitive" or "pthread_create failed: Resource temporarily unavailable" (Fast
    # DDS's threads): none says memory. (Lower still, Fast DDS can wait forever for its logging
    # thread that did not start: not tested.)
    proc = subprocess.run([str(NODE_EXECUTABLE), '--ros-args', '-p', 'device:=cpu'],
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=address_space_limit(300 << 20))
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert re.fullmatch(r's4fusion_node: .* \(this process reached its address space limit of '
                        r'[\d.]+ GiB, ulimit -v: an allocation failed, whatever the error says; '
                        r'allow more\)', last), proc.stderr


def test_a_home_where_rcl_cannot_log_is_named_with_the_fix(tmp_path, monkeypatch):
    # A systemd service's user with a read-only home, or without HOME: rcl said only
    # "Failed to create log directory '.../.ros/log': 20" (or "rcutils_expand_user failed").
    (tmp_path / 'home').write_text('')  # no folder can be made under it, not even by root
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('ROS_LOG_DIR', raising=False)
    monkeypatch.delenv('ROS_HOME', raising=False)
    with running_node(PARAMS) as proc:
        code = proc.wait(timeout=120)
    log = node_log(proc)
    assert code == 1 and 'Traceback' not in log, log
    assert re.search(r'^s4fusion_node: failed to initialize logging: .*: set ROS_LOG_DIR to a '
                     r'folder this user may write$', log, re.MULTILINE), log


def test_a_model_warning_goes_to_the_ros_log():
    # It went to Python's logging: a bare line, not on /rosout, deaf to --log-level.
    with running_node({**PARAMS, 'model.preset': 'authors', 'model.detail_gain': 1.0}) as proc:
        wait_for_log(proc, 'model warmed up', timeout=120)
        log = stopped_cleanly(proc, signal.SIGINT)
    assert re.search(r'^\[WARN\] \[[0-9.]+\] \[s4fusion_node\]: model.detail_gain 1 ignored: '
                     's4fusion_authors has no Laplacian base$', log, re.MULTILINE), log


def test_help_prints_the_usage_and_stray_arguments_are_refused():
    # rclpy ignores arguments before --ros-args: --help would start the node, and a parameter
    # given without --ros-args would be dropped silently.
    node = str(executable('s4fusion_node'))
    shown = subprocess.run([node, '--help'], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith('usage: s4fusion_node [-h]')
    assert '--ros-args --params-file config/s4fusion.yaml' in shown.stdout
    # `s4fusion_node --help | head -1`: the reader is gone before the usage is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        piped = subprocess.run([node, '--help'], stdout=write_end, stderr=subprocess.PIPE,
                               text=True, timeout=60)
    finally:
        os.close(write_end)
    assert piped.returncode == 0 and piped.stderr == ''
    stray = subprocess.run([node, '-p', 'device:=cpu', '--ros-args', '-p', 'device:=cpu'],
                           capture_output=True, text=True, timeout=60)
    assert stray.returncode == 2
    assert stray.stderr.startswith('s4fusion_node: unrecognized arguments: -p device:=cpu\n')
    # After '--' the ROS arguments end (as rcl reads them): what follows is the node's own.
    from s4fusion_ros.ros.run_node import command_line_help
    assert command_line_help(['--ros-args', '-p', 'a:=1', '--', 'stray']).startswith(
        's4fusion_node: unrecognized arguments: stray\n')
    assert command_line_help(['--ros-args', '-r', '__ns:=/a', '--', '--ros-args', '-p',
                              'a:=1']) is None
