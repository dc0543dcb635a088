"""What the console tools share (s4fusion_ros.cli): child processes that die with the tool, stop
signals, ROS and output-path arguments."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

# A tool that starts a long child, prints its pid and waits to be killed.
TOOL = '''
import pathlib, sys, time
from s4fusion_ros.cli import start_child
child = start_child([sys.executable, '-c', 'import time; time.sleep(120)'],
                    pathlib.Path(sys.argv[1]))
print(child.pid, flush=True)
time.sleep(120)
'''


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as ended)."""
    try:
        status = pathlib.Path(f'/proc/{pid}/status').read_text()
    except FileNotFoundError:
        return False
    return '\nState:\tZ' not in status


def command_line(pid: int) -> list[str]:
    """The arguments `pid` runs with (none once it has ended)."""
    try:
        return pathlib.Path(f'/proc/{pid}/cmdline').read_text().split('\0')
    except FileNotFoundError:
        return []


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='parent-death signal is Linux')
def test_a_child_is_stopped_when_its_tool_is_killed(tmp_path):
    tool = subprocess.Popen([sys.executable, '-c', TOOL, str(tmp_path / 'child.log')],
                            stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(tool.stdout.readline())
        # Once the launcher has exec'd the command its code is gone: a few ms here, more on a
        # loaded machine.
        deadline = time.monotonic() + 30
        while (command_line(child_pid)[1:3] != ['-c', 'import time; time.sleep(120)']
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert alive(child_pid)
        command = command_line(child_pid)
        assert command[1:3] == ['-c', 'import time; time.sleep(120)'], command
        tool.kill()  # SIGKILL: the tool runs no clean-up
        tool.wait()
        deadline = time.monotonic() + 10
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child_pid), 'the child outlived its killed tool'
    finally:
        tool.kill()
        if child_pid is not None and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='parent-death launcher')
def test_a_ctrl_c_before_the_launcher_execs_ends_it_without_a_traceback(tmp_path):
    # Ctrl-C reaches the whole process group, a child just started included. Before the launcher
    # started with SIGINT blocked, about 1 in 4 of these left a Python traceback in its log.
    import random
    from s4fusion_ros.cli import start_child
    rng = random.Random(0)
    for attempt in range(40):
        log = tmp_path / f'child{attempt}.log'
        child = start_child(['sleep', '10'], log)
        time.sleep(rng.uniform(0, 0.03))
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == -signal.SIGINT, log.read_text()
        assert log.read_text() == '', f'attempt {attempt}: {log.read_text()}'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='/proc and the launcher')
def test_a_child_starts_with_no_signal_blocked_or_ignored_by_its_launcher(tmp_path):
    # The launcher is Python, which ignores SIGPIPE and SIGXFSZ, and it starts with SIGINT
    # blocked: what it leaves ignored or blocked stays so across the exec.
    from s4fusion_ros.cli import start_child
    log = tmp_path / 'status'
    assert start_child(['cat', '/proc/self/status'], log).wait(timeout=30) == 0
    status = dict(line.split(':\t') for line in log.read_text().splitlines())
    ignored = int(status['SigIgn'], 16)
    assert int(status['SigBlk'], 16) == 0
    for number in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & 1 << (number - 1), number.name
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the tool's mask is back


def test_a_ctrl_c_that_c_code_wrapped_in_a_system_error_is_still_one_line(capsys):
    from s4fusion_ros.cli import run_command

    def interrupted_in_a_callback():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as error:
            raise SystemError('returned a result with an exception set') from error

    def broken():
        raise SystemError('something else')

    assert run_command('tool', interrupted_in_a_callback, ()) == 130
    assert capsys.readouterr().err == '\ntool: interrupted\n'
    with pytest.raises(SystemError, match='something else'):
        run_command('tool', broken, ())


CTRL_C_WHILE_FORKING = """
import os, signal, sys
from s4fusion_ros.cli import interrupts_held

def fork(ctrl_c_presses):
    # As a Ctrl-C landing while ray.init forks its processes: in an at-fork hook.
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
    if os.fork() == 0:
        os._exit(0)
    os.wait()
    if ctrl_c_presses == 2:
        os.kill(os.getpid(), signal.SIGINT)
    print('forked', flush=True)

presses = int(sys.argv[2])
if sys.argv[1] == 'held':
    with interrupts_held('held until the block ends'):
        fork(presses)
else:
    fork(presses)
print('went on', flush=True)
"""


@pytest.mark.parametrize('held, presses, printed', [
    (False, 1, 'forked\nwent on\n'),  # Python alone: the interrupt is lost, the program goes on
    (True, 1, 'forked\n'),  # held: the block ends, then the interrupt is raised
    (True, 2, 'forked\n'),  # a second one too
], ids=['plain', 'held', 'held-twice'])
def test_a_ctrl_c_while_forking_is_held_to_the_end_of_the_block(held, presses, printed):
    result = subprocess.run([sys.executable, '-c', CTRL_C_WHILE_FORKING,
                             'held' if held else 'plain', str(presses)],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == printed, result.stderr
    if held:
        assert result.returncode == -signal.SIGINT, result.stderr  # the KeyboardInterrupt's exit
        assert 'Exception ignored' not in result.stderr
        assert result.stderr.count('held until the block ends') == 1, result.stderr
    else:
        assert result.returncode == 0 and 'Exception ignored' in result.stderr, result.stderr


def test_ros_arguments_run_from_each_ros_args_to_the_next_double_dash():
    from s4fusion_ros.cli import split_ros_arguments
    from s4fusion_ros.settings import params_file_arguments
    argv = ['own', '--ros-args', '--params-file', 'a.yaml', '-p', 'x:=1', '--', '--params-file',
            'b.yaml', '--ros-args', '--params-file', 'c.yaml']
    assert split_ros_arguments(argv) == (
        ['own', '--params-file', 'b.yaml'],
        ['--params-file', 'a.yaml', '-p', 'x:=1', '--params-file', 'c.yaml'])
    assert params_file_arguments(argv) == [pathlib.Path('a.yaml'), pathlib.Path('c.yaml')]
    # Outside the ROS arguments '--' is an argument as any, the tool's to read.
    assert split_ros_arguments(['--', 'x', '--ros-args', '-p', 'y:=1']) == (
        ['--', 'x'], ['-p', 'y:=1'])


def _parsers():
    from s4fusion_ros.ros import demo
    from s4fusion_ros.tools import bag, batch, evaluate, fuse, train
    return {'s4fusion-fuse': fuse.parse_args, 's4fusion-bag': bag.parse_args,
            's4fusion-batch': batch.parse_args, 's4fusion-eval': evaluate.parse_args,
            's4fusion-demo': demo.parse_args, 's4fusion-train': train.build_parser().parse_args}


@pytest.mark.parametrize('tool, argv', [
    ('s4fusion-fuse', ['--ir', 'ir', '--vi', 'vi', '--out', '']),
    ('s4fusion-bag', ['in', '']), ('s4fusion-bag', ['in', 'out', '--export-png', '']),
    ('s4fusion-batch', ['in', '']), ('s4fusion-eval', ['--save-outputs', '']),
    ('s4fusion-eval', ['--out', '']), ('s4fusion-demo', ['--output-dir', '']),
    ('s4fusion-train', ['--out', ''])])
def test_an_empty_output_path_is_refused(tool, argv, capsys):
    # `--out "$RUN"` with RUN unset: pathlib reads '' as the current folder, and s4fusion-batch,
    # say, wrote its bags and manifest there.
    with pytest.raises(SystemExit) as stopped:
        _parsers()[tool](argv)
    assert stopped.value.code == 2
    assert 'an empty path: name the output' in capsys.readouterr().err


@pytest.mark.parametrize('unbuffered', [True, False])
def test_a_reader_of_the_results_that_left_ends_the_tool_quietly(unbuffered):
    # `s4fusion-bench scan | head -1`: it printed 's4fusion-bench: [Errno 32] Broken pipe' and
    # exited 1, and s4fusion-flood (whose errors leave OSError out) a traceback. Without
    # PYTHONUNBUFFERED (a shell's default) a pipe holds the results back until the exit, where
    # Python said 'Exception ignored ... BrokenPipeError' and exited 120.
    from paths import executable
    from s4fusion_ros.cli import READER_LEFT
    env = {name: value for name, value in os.environ.items() if name != 'PYTHONUNBUFFERED'}
    if unbuffered:
        env['PYTHONUNBUFFERED'] = '1'
    read, write = os.pipe()
    os.close(read)  # the reader left before the first result
    try:
        done = subprocess.run([executable('s4fusion-bench'), 'scan', '--d', '4', '--length', '64',
                               '--slow-length', '16', '--repeats', '1'], env=env,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == READER_LEFT == 141, done.stderr
    assert 'Broken pipe' not in done.stderr and 'Traceback' not in done.stderr, done.stderr


@pytest.mark.parametrize('closed', ['>&-', '2>&-'])
def test_a_tool_started_without_stdout_or_stderr_does_its_work_and_exits_0(
        closed, ivif_dir, tmp_path):
    # A job started with a standard stream closed (`>&-`, a daemon's habit): Python leaves
    # sys.stdout or sys.stderr None, and s4fusion-fuse wrote its images, then exited 1 with a
    # traceback ('NoneType' object has no attribute 'flush' / 'write').
    from paths import executable
    for kind in ('ir', 'vi'):
        (tmp_path / kind).mkdir()
        shutil.copy(ivif_dir / 'msrs' / kind / '00004N.png', tmp_path / kind)
    command = [executable('s4fusion-fuse'), '--ir', tmp_path / 'ir', '--vi', tmp_path / 'vi',
               '--out', tmp_path / 'out']
    done = subprocess.run(['sh', '-c', f'exec "$0" "$@" {closed}', *map(str, command)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / 'out' / 'fused' / '00004N.png').is_file()


def test_a_broken_pipe_other_than_stdout_is_an_error_as_any(capsys):
    from s4fusion_ros.cli import run_command

    def child_left():
        raise BrokenPipeError(32, 'Broken pipe')

    assert run_command('tool', child_left, (OSError,)) == 1
    assert capsys.readouterr().err == 'tool: [Errno 32] Broken pipe\n'


def test_the_node_names_unknown_ros_arguments_as_such():
    # rclpy's UnknownROSArgsError says only "['--foo']": the node printed that line alone.
    from paths import executable
    done = subprocess.run([executable('s4fusion_node'), '--ros-args', '--foo'],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr == ("s4fusion_node: unknown ROS arguments (after --ros-args): "
                           "['--foo']\n"), done.stderr


def test_the_node_names_a_malformed_ros_argument_with_rcl_s_reason():
    # Only rcl's logging failure is reworded (ros/context.py); any other failure of rclpy.init
    # must still stop the node with rcl's words, not "rclpy.init() has not been called".
    from paths import executable
    done = subprocess.run([executable('s4fusion_node'), '--ros-args', '--log-level', 'loud'],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "s4fusion_node: failed to initialize rcl: Couldn't parse log level: '--log-level loud'"
    ), done.stderr


def test_a_size_is_width_by_height_each_at_least_the_minimum():
    import argparse
    from s4fusion_ros.cli import parse_size
    assert parse_size('64X48') == (64, 48) and parse_size('1x1') == (1, 1)
    assert parse_size('2x3', minimum=2) == (2, 3)
    for text in ('0x48', '64x0', '-1x-1'):
        with pytest.raises(argparse.ArgumentTypeError, match=f"at least 1, got '{text}'"):
            parse_size(text)
    with pytest.raises(argparse.ArgumentTypeError, match="expected WIDTHxHEIGHT, got '64x'"):
        parse_size('64x')


def test_a_file_option_ending_in_a_separator_names_a_folder_and_is_refused(capsys):
    # pathlib drops the separator: `--out reports/` wrote a file named reports.
    from s4fusion_ros.tools import evaluate
    with pytest.raises(SystemExit) as stopped:
        evaluate.parse_args(['--out', 'reports/'])
    assert stopped.value.code == 2
    assert "'reports/' names a folder: name the file in it" in capsys.readouterr().err
    from s4fusion_ros.cli import file_path
    assert file_path('reports/table.md') == pathlib.Path('reports/table.md')


def test_a_time_window_is_whole_only_from_the_start_to_the_end():
    from s4fusion_ros.cli import TimeWindow
    assert TimeWindow().whole and TimeWindow().describe() == 'from 0 s to the end'
    assert not TimeWindow(2.0).whole and not TimeWindow(0.0, 5.0).whole
    window = TimeWindow(2.0, 1.5)
    assert window.describe() == 'from 2 s to 3.5 s'
    assert window.options() == {'--start-offset': 2.0, '--playback-duration': 1.5}


def test_seconds_are_a_finite_number_from_zero_or_above_zero():
    import argparse
    from s4fusion_ros.cli import parse_seconds
    assert parse_seconds('0') == 0.0 and parse_seconds('1e-9', positive=True) == 1e-9
    for text, positive in (('nan', False), ('inf', False), ('-1e-9', False), ('x', False),
                           ('0', True), ('-0.5', True), ('nan', True)):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{text}'"):
            parse_seconds(text, positive=positive)


def test_stop_signals_handled_puts_the_handlers_back_after_the_block():
    from s4fusion_ros.cli import STOP_SIGNALS, stop_signals_handled
    before = [signal.getsignal(number) for number in STOP_SIGNALS]
    with stop_signals_handled(signal.SIG_IGN):
        assert all(signal.getsignal(number) is signal.SIG_IGN for number in STOP_SIGNALS)
    assert [signal.getsignal(number) for number in STOP_SIGNALS] == before


# Two tests run in one process: a tool's main (here its stop_on_signals) gets a Ctrl-C, as
# test_video's stopped video does; then one that starts a Python child and Ctrl-Cs it, and one
# whose finalizer raises.
IN_ONE_PROCESS = '''
import signal, subprocess, sys
import pytest
from s4fusion_ros.cli import stop_on_signals


def test_a_tool_run_in_the_test_process_gets_a_ctrl_c():
    stop_on_signals()
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_a_child_started_next_stops_at_its_ctrl_c():
    child = subprocess.run([sys.executable, '-c', 'import os, signal; '
                            'os.kill(os.getpid(), signal.SIGINT); print("went on")'],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGINT and child.stdout == ''


class LostInAFinalizer:
    def __del__(self):
        raise ValueError('lost in a finalizer')


def test_an_exception_lost_in_a_finalizer_is_reported():
    LostInAFinalizer()
'''


def test_a_tools_stop_signal_handling_in_the_test_process_ends_with_its_test(tmp_path):
    # Test modules run tools' mains in the pytest process (bag_tool.main, evaluate.main): their
    # handlers stayed for the next tests, and after a Ctrl-C there, every child started later
    # ignored SIGINT and SIGTERM (test_a_ctrl_c_while_forking_is_held_to_the_end_of_the_block
    # failed after test_bag's and test_video's tests in one pytest-xdist worker).
    (tmp_path / 'test_in_one_process.py').write_text(IN_ONE_PROCESS)
    here = pathlib.Path(__file__).resolve().parent
    env = {name: value for name, value in os.environ.items() if name != 'PYTEST_ADDOPTS'}
    done = subprocess.run([sys.executable, '-m', 'pytest', '-p', 'conftest', '-p',
                           'no:cacheprovider', '-p', 'no:xdist', 'test_in_one_process.py'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, 'PYTHONPATH': os.pathsep.join(
                              [str(here), env.get('PYTHONPATH', '')])})
    assert re.search(r'\b3 passed\b', done.stdout), done.stdout + done.stderr
    assert 'PytestUnraisableExceptionWarning' in done.stdout, done.stdout


def test_a_ctrl_c_that_c_code_raised_an_error_over_is_still_one_line(capsys):
    # Raised while the KeyboardInterrupt was handled, without `from`: its __context__.
    from s4fusion_ros.cli import run_command

    def interrupted_in_a_callback():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemError('error return without exception set')

    assert run_command('tool', interrupted_in_a_callback, ()) == 130
    assert capsys.readouterr().err == '\ntool: interrupted\n'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='parent-death launcher')
def test_the_launcher_starts_with_sigint_blocked(tmp_path, monkeypatch):
    # A Ctrl-C before the launcher set its handler ended it in a traceback (now unblocked only
    # once its handler is the default): the mask it inherits from the Popen call is the proof.
    from s4fusion_ros import cli
    masks, popen = [], subprocess.Popen

    def recording(*args, **kwargs):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return popen(*args, **kwargs)

    monkeypatch.setattr(cli.subprocess, 'Popen', recording)
    assert cli.start_child(['true'], tmp_path / 'log').wait(timeout=30) == 0
    assert masks == [{signal.SIGINT}]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()


def test_a_librarys_error_text_is_said_on_one_line():
    # Said after a tool's own 'FILE: what failed': OpenCV's text named its source file and
    # ended in a line break, a MemoryError said nothing, torch's lines headed a list of faults.
    import cv2
    import numpy as np
    import torch
    from s4fusion_ros.cli import one_line_reason
    with pytest.raises(cv2.error) as opencv:
        cv2.resize(np.zeros((0, 0), np.uint8), (3, 3))
    assert str(opencv.value).endswith('\n')
    assert one_line_reason(opencv.value) == '!ssize.empty()'
    assert one_line_reason(MemoryError()) == 'MemoryError'
    layer = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError) as loading:
        layer.load_state_dict({'weight': torch.zeros(1, 3), 'other': torch.zeros(1)})
    assert one_line_reason(loading.value) == (
        'Error(s) in loading state_dict for Linear: Missing key(s) in state_dict: "bias"; '
        'Unexpected key(s) in state_dict: "other"; size mismatch for weight: copying a param '
        'with shape torch.Size([1, 3]) from checkpoint, the shape in current model is '
        'torch.Size([1, 2])')
    # Lines that are no list of faults: the first alone; a one-line text as it is.
    traceback = ValueError('Traceback (most recent call last):\n  File "x", line 1\nKeyError: 1')
    assert one_line_reason(traceback) == 'Traceback (most recent call last):'
    assert one_line_reason(OSError('a: b. c')) == 'a: b. c'
